//! Which statements may leave the primary. Fail closed: a statement is a
//! read only if the parser understood it and it is certainly a plain
//! read — a query with no locking clause, no `SELECT INTO`, no
//! data-modifying CTE, and only functions known to have no side effects.
//! Anything else (unparsed SQL, DML, DDL, `nextval`, user functions) runs on
//! the primary. The secondary's read sessions are also read-only at the
//! engine, so a misclassification fails there and is retried on the primary.

use sqlparser::ast::{
    Expr, Query, SetExpr, Statement, TableFactor, TransactionAccessMode, TransactionMode, Visit,
    Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::HashMap;
use std::ops::ControlFlow;

/// What routing needs to know about one statement text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Certainly a read: may be served by the secondary when idle.
    Read,
    /// `BEGIN READ ONLY` / `START TRANSACTION READ ONLY`: the whole
    /// transaction may be served by the secondary.
    ReadOnlyBegin,
    /// A session-level `SET`/`RESET` (not LOCAL): runs on the primary and is
    /// replayed on the session's secondary connection before its next read.
    SessionSet,
    /// `DISCARD`/`DEALLOCATE`: runs on the primary and forgets the
    /// session's statements and settings on the secondary too.
    SessionReset,
    /// Runs on the primary and changes session settings cutover cannot
    /// replay (a `SET` among other statements, `set_config(...)`): the
    /// session's reads stay on the primary from then on.
    SessionChanging,
    /// Everything else: the primary.
    Write,
}

/// Functions that read and compute but never write, take locks or change
/// session state. Anything not listed keeps a statement on the primary.
const SAFE_FUNCTIONS: &[&str] = &[
    "abs",
    "array_agg",
    "array_length",
    "array_position",
    "array_to_string",
    "avg",
    "bit_length",
    "bool_and",
    "bool_or",
    "btrim",
    "cardinality",
    "cast",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "coalesce",
    "concat",
    "concat_ws",
    "count",
    "current_database",
    "current_date",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "date_part",
    "date_trunc",
    "dense_rank",
    "every",
    "exp",
    "extract",
    "floor",
    "format",
    "generate_series",
    "greatest",
    "initcap",
    "json_agg",
    "json_build_array",
    "json_build_object",
    "jsonb_agg",
    "jsonb_array_length",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "jsonb_object_agg",
    "jsonb_typeof",
    "least",
    "left",
    "length",
    "ln",
    "localtime",
    "localtimestamp",
    "log",
    "lower",
    "lpad",
    "ltrim",
    "max",
    "min",
    "mod",
    "now",
    "nullif",
    "octet_length",
    "position",
    "power",
    "rank",
    "regexp_replace",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "row_number",
    "rpad",
    "rtrim",
    "sign",
    "split_part",
    "sqrt",
    "statement_timestamp",
    "string_agg",
    "strpos",
    "substr",
    "substring",
    "sum",
    "to_char",
    "to_date",
    "to_number",
    "to_timestamp",
    "transaction_timestamp",
    "trim",
    "trunc",
    "unnest",
    "upper",
    "version",
];

/// Classifies one statement text (a simple Query's string, or a Parse's).
pub fn classify(sql: &str) -> Class {
    let statements = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(s) if !s.is_empty() => s,
        _ => return Class::Write,
    };
    if let [single] = statements.as_slice() {
        match single {
            Statement::StartTransaction { modes, .. }
                if modes.contains(&TransactionMode::AccessMode(
                    TransactionAccessMode::ReadOnly,
                )) =>
            {
                return Class::ReadOnlyBegin
            }
            Statement::Discard { .. } | Statement::Deallocate { .. } => return Class::SessionReset,
            _ => {}
        }
    }
    let sets: Vec<bool> = statements.iter().map(is_session_set).collect();
    if sets.iter().all(|s| *s) {
        return Class::SessionSet;
    }
    if sets.iter().any(|s| *s) || sql.to_ascii_lowercase().contains("set_config") {
        return Class::SessionChanging;
    }
    if statements.iter().all(is_plain_read) {
        Class::Read
    } else {
        Class::Write
    }
}

/// A `SET`/`RESET` that outlives the transaction (not `SET LOCAL`, not
/// `SET TRANSACTION ...`).
fn is_session_set(statement: &Statement) -> bool {
    match statement {
        Statement::Set(set) => {
            let text = set.to_string().to_ascii_uppercase();
            !(text.starts_with("SET LOCAL") || text.contains("TRANSACTION"))
        }
        _ => false,
    }
}

fn is_plain_read(statement: &Statement) -> bool {
    let Statement::Query(query) = statement else {
        return false;
    };
    let mut check = ReadCheck;
    query.visit(&mut check).is_continue()
}

/// Walks a query; breaks at the first thing that is not a plain read.
struct ReadCheck;

impl Visitor for ReadCheck {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if !query.locks.is_empty() || query.for_clause.is_some() || !body_is_read(&query.body) {
            return ControlFlow::Break(());
        }
        if let Some(with) = &query.with {
            if with
                .cte_tables
                .iter()
                .any(|cte| !body_is_read(&cte.query.body))
            {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        match statement {
            Statement::Query(_) => ControlFlow::Continue(()),
            _ => ControlFlow::Break(()),
        }
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table { name, args, .. } => match args {
                Some(_) if !is_safe_function(&name.to_string()) => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            },
            TableFactor::Derived { .. } | TableFactor::NestedJoin { .. } => {
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Break(()),
        }
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Function(f) if !is_safe_function(&f.name.to_string()) => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    }
}

fn body_is_read(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(select) => select.into.is_none(),
        SetExpr::Query(q) => body_is_read(&q.body),
        SetExpr::SetOperation { left, right, .. } => body_is_read(left) && body_is_read(right),
        SetExpr::Values(_) | SetExpr::Table(_) => true,
        _ => false,
    }
}

fn is_safe_function(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let name = name.strip_prefix("pg_catalog.").unwrap_or(&name);
    SAFE_FUNCTIONS.binary_search(&name).is_ok()
}

/// Classifications by statement shape, per session, bounded.
#[derive(Default)]
pub struct ClassCache {
    entries: HashMap<Box<str>, Class>,
}

const CACHE_ENTRIES: usize = 512;

impl ClassCache {
    pub fn classify(&mut self, sql: &str) -> Class {
        let shape = shape(sql);
        let key = shape.as_deref().unwrap_or(sql);
        if let Some(class) = self.entries.get(key) {
            return *class;
        }
        let class = classify(sql);
        if self.entries.len() >= CACHE_ENTRIES {
            self.entries.clear();
        }
        self.entries.insert(key.into(), class);
        class
    }
}

/// The text with its string and number literals replaced, so statements
/// that differ only in literal values share one cache entry (a literal's
/// value never changes what a statement is). None — cache by the exact
/// text — for anything this simple scanner does not fully understand:
/// backslashes, dollar quoting or parameters, comments, E/U&/B/X strings.
fn shape(sql: &str) -> Option<String> {
    if sql.contains(['\\', '$']) || sql.contains("--") || sql.contains("/*") {
        return None;
    }
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let after_word = i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        match c {
            b'\'' => {
                if after_word {
                    // E'...', U&'...', B'...', X'...' and the like.
                    return None;
                }
                i += 1;
                loop {
                    match bytes.get(i) {
                        None => return None,
                        Some(b'\'') if bytes.get(i + 1) == Some(&b'\'') => i += 2,
                        Some(b'\'') => break,
                        Some(_) => i += 1,
                    }
                }
                out.push_str("'?'");
                i += 1;
            }
            b'"' => {
                let end = sql[i + 1..].find('"')? + i + 1;
                out.push_str(&sql[i..=end]);
                i = end + 1;
            }
            b'0'..=b'9' if !after_word => {
                while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                    i += 1;
                }
                out.push('0');
            }
            _ => {
                let ch = sql[i..].chars().next()?;
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_functions_are_sorted_for_binary_search() {
        let mut sorted = SAFE_FUNCTIONS.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, SAFE_FUNCTIONS);
    }

    #[test]
    fn plain_reads_are_reads() {
        for sql in [
            "SELECT 1",
            "select abalance from pgbench_accounts where aid = 5",
            "SELECT count(*), max(x) FROM t WHERE y > $1",
            "SELECT * FROM a JOIN b ON a.id = b.id ORDER BY 1 LIMIT 10",
            "WITH c AS (SELECT id FROM t) SELECT * FROM c",
            "SELECT now(), lower(name) FROM t UNION ALL SELECT now(), 'x'",
            "SELECT * FROM (SELECT id FROM t) s",
            "VALUES (1), (2)",
            "SELECT 1; SELECT 2",
            "SELECT * FROM generate_series(1, 10)",
        ] {
            assert_eq!(classify(sql), Class::Read, "{sql}");
        }
    }

    #[test]
    fn anything_that_could_write_stays_on_the_primary() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET x = 1",
            "DELETE FROM t",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "WITH u AS (UPDATE t SET x = 1 RETURNING *) SELECT count(*) FROM u",
            "SELECT nextval('s')",
            "SELECT setval('s', 5)",
            "SELECT * FROM t FOR UPDATE",
            "SELECT * FROM t FOR SHARE",
            "SELECT my_function(1)",
            "SELECT * FROM my_set_returning_function()",
            "SELECT * INTO new_table FROM t",
            "SELECT pg_advisory_lock(1)",
            "SELECT 1; DELETE FROM t",
            "CREATE TABLE x (a int)",
            "COPY t TO STDOUT",
            "SHOW search_path",
            "BEGIN",
            "SET LOCAL work_mem = '1MB'",
            "this is not sql",
            "",
            "SELECT lower((SELECT nextval('s'))::text)",
            "SELECT * FROM t WHERE id IN (SELECT my_func())",
        ] {
            assert_eq!(classify(sql), Class::Write, "{sql}");
        }
    }

    #[test]
    fn statements_differing_only_in_literals_share_a_shape() {
        assert_eq!(
            shape("SELECT abalance FROM pgbench_accounts WHERE aid = 4711;"),
            shape("SELECT abalance FROM pgbench_accounts WHERE aid = 12;")
        );
        assert_eq!(
            shape("SELECT 'it''s', t1.x FROM t1"),
            Some("SELECT '?', t1.x FROM t1".into())
        );
        assert_eq!(
            shape("SELECT \"a'b\" FROM t"),
            Some("SELECT \"a'b\" FROM t".into())
        );
        for unsure in [
            "SELECT E'\\''",
            "SELECT $$x$$",
            "SELECT 1 -- c",
            "SELECT /* c */ 1",
            "SELECT 'open",
            "SELECT x'1F'",
        ] {
            assert_eq!(shape(unsure), None, "{unsure}");
        }
    }

    #[test]
    fn the_cache_gives_the_class_of_the_exact_text() {
        let mut cache = ClassCache::default();
        for sql in [
            "SELECT 1",
            "SELECT 2",
            "DELETE FROM t WHERE id = 1",
            "SELECT * FROM t WHERE id = 1 FOR UPDATE",
            "SELECT * FROM t WHERE id = 2",
            "SELECT 'x'; DELETE FROM t WHERE id = 3",
            "SELECT 'y'",
            "SELECT nextval('s')",
            "SELECT lower('s')",
            "SET TIME ZONE 'UTC'",
            "SET TIME ZONE 'UTC'; SELECT 1",
        ] {
            assert_eq!(cache.classify(sql), classify(sql), "{sql}");
            assert_eq!(cache.classify(sql), classify(sql), "{sql} (cached)");
        }
    }

    #[test]
    fn session_statements_are_recognised() {
        assert_eq!(classify("BEGIN READ ONLY"), Class::ReadOnlyBegin);
        assert_eq!(
            classify("START TRANSACTION READ ONLY"),
            Class::ReadOnlyBegin
        );
        assert_eq!(
            classify("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
            Class::ReadOnlyBegin
        );
        assert_eq!(classify("SET search_path = app, public"), Class::SessionSet);
        assert_eq!(classify("SET TIME ZONE 'UTC'"), Class::SessionSet);
        assert_eq!(classify("DISCARD ALL"), Class::SessionReset);
        assert_eq!(
            classify("SET a.b = 1; SET TIME ZONE 'UTC'"),
            Class::SessionSet
        );
        assert_eq!(
            classify("SET TIME ZONE 'UTC'; SELECT 1"),
            Class::SessionChanging
        );
        assert_eq!(
            classify("SELECT set_config('TimeZone', 'UTC', false)"),
            Class::SessionChanging
        );
        assert_eq!(
            classify("SET LOCAL work_mem = '1MB'; SELECT 1"),
            Class::Write
        );
        assert_eq!(classify("DEALLOCATE ALL"), Class::SessionReset);
    }
}
