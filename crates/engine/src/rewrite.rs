//! Changes SQLite's ALTER TABLE cannot make — a constraint added to a
//! table, a column's NULL-ness, default or declared type — made by
//! SQLite's documented procedure for changes that leave the stored rows as
//! they are: the table's CREATE statement is rewritten in `sqlite_master`
//! (`writable_schema`) and the schema version moved, so every connection,
//! of cutover or another process, reads the schema again. Guarded: the new
//! statement is first tried on an empty in-memory database, everything not
//! asked to change must read back unchanged (columns, indexes, foreign
//! keys), and the rows there are checked as PostgreSQL checks them; any
//! failure leaves the caller's transaction to roll it all back.

use crate::ddl::{ColumnChange, Verify};
use crate::errors::{from_sqlite, Failure};
use cutover_sqlite::rusqlite::{self, Connection};
use cutover_sqlite::schema_map::quote;
use cutover_sqlite::SchemaMap;
use sqlparser::ast::{ColumnOption, DataType, ObjectName};

/// Adds `constraint` to `table` by writing it into the table's CREATE
/// statement, inside the caller's write transaction: the statement is
/// tried on an empty in-memory database first, the table's columns must
/// read back unchanged, the schema version is moved so every connection
/// reads the schema again, and the rows there are checked as PostgreSQL
/// checks them (a failure rolls it all back with the transaction).
pub(crate) fn add_constraint(
    conn: &Connection,
    table: &str,
    constraint: &str,
    verify: &Verify,
    map: &SchemaMap,
) -> Result<(), Failure> {
    let sqlite = |e: rusqlite::Error| from_sqlite(&e, map);
    let refuse = |why: String| {
        Failure::new(
            "0A000",
            format!("ALTER TABLE {table} ADD {constraint}: {why}"),
        )
    };
    let sql = create_statement(conn, table).map_err(sqlite)?;
    let close = column_list_end(&sql)
        .ok_or_else(|| refuse("cutover cannot find the end of its column list".to_string()))?;
    let new_sql = format!("{}, {constraint}{}", &sql[..close], &sql[close..]);
    let adds_key = matches!(verify, Verify::ForeignKeys(_))
        || constraint.to_ascii_uppercase().contains("FOREIGN KEY");
    rewrite_create(conn, table, &new_sql, map, adds_key, |before, after| {
        before == after
    })
    .map_err(|why| why.into_failure(refuse))?;
    match verify {
        Verify::Nothing => Ok(()),
        Verify::ForeignKeys(name) => {
            let broken: i64 = conn
                .query_row(
                    &format!(
                        "SELECT count(*) FROM pragma_foreign_key_check({})",
                        quote_literal(table)
                    ),
                    [],
                    |r| r.get(0),
                )
                .map_err(sqlite)?;
            if broken > 0 {
                return Err(violation(
                    "23503",
                    format!("insert or update on table \"{table}\" violates foreign key constraint \"{name}\" ({broken} row(s) reference no row)"),
                    name,
                ));
            }
            Ok(())
        }
        Verify::Check(name, expr) => {
            let broken: i64 = conn
                .query_row(
                    &format!("SELECT count(*) FROM {} WHERE NOT ({expr})", quote(table)),
                    [],
                    |r| r.get(0),
                )
                .map_err(sqlite)?;
            if broken > 0 {
                return Err(violation(
                    "23514",
                    format!("check constraint \"{name}\" of relation \"{table}\" is violated by some row"),
                    name,
                ));
            }
            Ok(())
        }
    }
}

fn violation(code: &str, message: String, constraint: &str) -> Failure {
    let mut f = Failure::new(code, message);
    f.0.constraint = Some(constraint.to_string());
    f
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A CREATE TABLE statement's column list: the byte ranges of its
/// top-level items (columns and table constraints) and where it closes
/// (the parenthesis matching its first), past strings, quoted names and
/// comments.
fn column_list(sql: &str) -> Option<(Vec<(usize, usize)>, usize)> {
    let b = sql.as_bytes();
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"' | b'`') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += 1;
                }
            }
            b'[' => {
                while i < b.len() && b[i] != b']' {
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'(' => {
                depth += 1;
                if depth == 1 {
                    start = i + 1;
                }
            }
            b',' if depth == 1 => {
                items.push((start, i));
                start = i + 1;
            }
            b')' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    items.push((start, i));
                    return Some((items, i));
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Where a CREATE TABLE statement's column list closes.
fn column_list_end(sql: &str) -> Option<usize> {
    column_list(sql).map(|(_, close)| close)
}

/// Changes one column's definition in `table`'s CREATE statement, inside
/// the caller's write transaction, with the checks of [`add_constraint`]:
/// the new statement tried on an empty in-memory database, every other
/// column, the foreign keys and the indexes reading back unchanged, the
/// changed column changed only as asked, and the rows there checked as
/// PostgreSQL checks them (NULLs for SET NOT NULL, lengths for a shorter
/// varchar; a type of another affinity or family is refused).
pub(crate) fn alter_column(
    conn: &Connection,
    table: &str,
    column: &str,
    change: &ColumnChange,
    map: &SchemaMap,
) -> Result<(), Failure> {
    let sqlite = |e: rusqlite::Error| from_sqlite(&e, map);
    let refuse = |why: String| {
        Failure::new(
            "0A000",
            format!("ALTER TABLE {table} ALTER COLUMN {column}: {why}"),
        )
    };
    let sql = create_statement(conn, table).map_err(sqlite)?;
    let (start, end) = column_definition(&sql, column).ok_or_else(|| {
        refuse("cutover cannot find its definition in the table's CREATE statement".to_string())
    })?;
    let old_item = &sql[start..end];
    let dialect = sqlparser::dialect::SQLiteDialect {};
    let mut def = sqlparser::parser::Parser::new(&dialect)
        .try_with_sql(old_item)
        .and_then(|mut p| p.parse_column_def())
        .map_err(|e| refuse(format!("cutover cannot read its definition ({e})")))?;
    let count = |sql: String| -> Result<i64, Failure> {
        conn.query_row(&sql, [], |r| r.get(0)).map_err(sqlite)
    };
    match change {
        ColumnChange::SetNotNull => {
            let nulls = count(format!(
                "SELECT count(*) FROM {} WHERE {} IS NULL",
                quote(table),
                quote(column)
            ))?;
            if nulls > 0 {
                let mut f = Failure::new(
                    "23502",
                    format!("column \"{column}\" of relation \"{table}\" contains null values"),
                );
                f.0.column = Some(column.to_string());
                f.0.table = Some(table.to_string());
                return Err(f);
            }
            def.options
                .retain(|o| !matches!(o.option, ColumnOption::NotNull | ColumnOption::Null));
            def.options.push(sqlparser::ast::ColumnOptionDef {
                name: None,
                option: ColumnOption::NotNull,
            });
        }
        ColumnChange::DropNotNull => def
            .options
            .retain(|o| !matches!(o.option, ColumnOption::NotNull)),
        ColumnChange::DropDefault => def
            .options
            .retain(|o| !matches!(o.option, ColumnOption::Default(_))),
        ColumnChange::SetDefault(expression) => {
            let value = sqlparser::parser::Parser::new(&dialect)
                .try_with_sql(expression)
                .and_then(|mut p| p.parse_expr())
                .map_err(|e| refuse(format!("cutover cannot write the default ({e})")))?;
            def.options
                .retain(|o| !matches!(o.option, ColumnOption::Default(_)));
            def.options.push(sqlparser::ast::ColumnOptionDef {
                name: None,
                option: ColumnOption::Default(value),
            });
        }
        ColumnChange::Type {
            declared,
            max_length,
        } => {
            let old = def.data_type.to_string();
            if affinity(&old) != affinity(declared) || type_family(&old) != type_family(declared) {
                return Err(refuse(format!(
                    "TYPE from {old} to {declared} would change how SQLite stores its values; a changed type means a new table and a copy, which is a migration of its own"
                )));
            }
            if let Some(n) = max_length {
                let long = count(format!(
                    "SELECT count(*) FROM {} WHERE length({}) > {n}",
                    quote(table),
                    quote(column)
                ))?;
                if long > 0 {
                    return Err(Failure::new(
                        "22001",
                        format!("value too long for type character varying({n})"),
                    ));
                }
            }
            def.data_type = DataType::Custom(
                ObjectName::from(vec![sqlparser::ast::Ident::new(declared.clone())]),
                Vec::new(),
            );
        }
    }
    let new_item = def.to_string();
    for keyword in ["AUTOINCREMENT", "COLLATE", "GENERATED", "AS ("] {
        if old_item.to_ascii_uppercase().contains(keyword)
            != new_item.to_ascii_uppercase().contains(keyword)
        {
            return Err(refuse(format!(
                "cutover would not write its {keyword} back as it was"
            )));
        }
    }
    let new_sql = format!("{}{new_item}{}", &sql[..start], &sql[end..]);
    rewrite_create(conn, table, &new_sql, map, false, |before, after| {
        before.len() == after.len()
            && before.iter().zip(after).all(|(b, a)| {
                if b.starts_with(&format!("{column}\u{1f}")) {
                    changed_as_asked(b, a, change)
                } else {
                    b == a
                }
            })
    })
    .map_err(|why| why.into_failure(refuse))
}

/// Why a CREATE statement was not rewritten.
enum Rewrite {
    Refused(String),
    Failed(Failure),
}

impl Rewrite {
    /// The error for the client: a refusal worded by `refuse`, or the
    /// failure as it came.
    fn into_failure(self, refuse: impl Fn(String) -> Failure) -> Failure {
        match self {
            Rewrite::Refused(why) => refuse(why),
            Rewrite::Failed(f) => f,
        }
    }
}

/// `table`'s CREATE statement as the file holds it.
fn create_statement(conn: &Connection, table: &str) -> rusqlite::Result<String> {
    conn.query_row(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [table],
        |r| r.get(0),
    )
}

/// Replaces `table`'s CREATE statement with `new_sql` by SQLite's
/// documented procedure for changes that leave stored rows as they are,
/// after trying it on an empty in-memory database; `same` judges the
/// table's columns (`name␟type␟notnull␟default␟pk`) before and after, and
/// the indexes and foreign keys must not change (but for foreign keys
/// added when `adds_key`).
fn rewrite_create(
    conn: &Connection,
    table: &str,
    new_sql: &str,
    map: &SchemaMap,
    adds_key: bool,
    same: impl Fn(&[String], &[String]) -> bool,
) -> Result<(), Rewrite> {
    let sqlite = |e: rusqlite::Error| Rewrite::Failed(from_sqlite(&e, map));
    Connection::open_in_memory()
        .and_then(|scratch| scratch.execute_batch(new_sql))
        .map_err(|e| Rewrite::Refused(format!("SQLite does not accept the changed table ({e})")))?;
    let shape = |conn: &Connection| -> rusqlite::Result<(Vec<String>, Vec<String>)> {
        let lines = |sql: String| -> rusqlite::Result<Vec<String>> {
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        };
        let t = quote_literal(table);
        let columns = lines(format!(
            "SELECT name || char(31) || type || char(31) || \"notnull\" || char(31) || ifnull(dflt_value, '') || char(31) || pk FROM pragma_table_xinfo({t}) ORDER BY cid"
        ))?;
        let mut rest = lines(format!(
            "SELECT 'fk' || char(31) || \"table\" || char(31) || \"from\" || char(31) || ifnull(\"to\", '') || char(31) || on_update || char(31) || on_delete FROM pragma_foreign_key_list({t})"
        ))?;
        rest.extend(lines(format!(
            "SELECT 'index' || char(31) || name || char(31) || \"unique\" || char(31) || partial FROM pragma_index_list({t})"
        ))?);
        rest.sort();
        Ok((columns, rest))
    };
    let (before, before_rest) = shape(conn).map_err(sqlite)?;
    let version = crate::schema_version(conn).map_err(sqlite)?;
    conn.execute_batch("PRAGMA writable_schema = ON")
        .map_err(sqlite)?;
    let written = conn
        .execute(
            "UPDATE sqlite_master SET sql = ?1 WHERE type = 'table' AND name = ?2",
            [new_sql, table],
        )
        .and_then(|_| conn.execute_batch(&format!("PRAGMA schema_version = {}", version + 1)));
    conn.execute_batch("PRAGMA writable_schema = OFF")
        .map_err(sqlite)?;
    written.map_err(sqlite)?;
    let (after, after_rest) = shape(conn).map_err(sqlite)?;
    let rest_kept = if adds_key {
        before_rest.iter().all(|r| after_rest.contains(r))
            && after_rest
                .iter()
                .all(|r| before_rest.contains(r) || r.starts_with("fk\u{1f}"))
            && after_rest.len() > before_rest.len()
    } else {
        before_rest == after_rest
    };
    if !same(&before, &after) || !rest_kept {
        return Err(Rewrite::Refused(
            "the table would read differently after it than asked".to_string(),
        ));
    }
    Ok(())
}

/// Whether the changed column's row (`name␟type␟notnull␟default␟pk`)
/// after the rewrite differs from the one before only as `change` asks:
/// the NULL-ness set, the default dropped, or the default or type (whose
/// new spelling is SQLite's) left free.
fn changed_as_asked(before: &str, after: &str, change: &ColumnChange) -> bool {
    let mut expected: Vec<&str> = before.split('\u{1f}').collect();
    let mut got: Vec<&str> = after.split('\u{1f}').collect();
    if expected.len() != 5 || got.len() != 5 {
        return false;
    }
    match change {
        ColumnChange::SetNotNull => expected[2] = "1",
        ColumnChange::DropNotNull => expected[2] = "0",
        ColumnChange::DropDefault => expected[3] = "",
        ColumnChange::SetDefault(_) => (expected[3], got[3]) = ("", ""),
        ColumnChange::Type { .. } => (expected[1], got[1]) = ("", ""),
    }
    expected == got
}

/// SQLite's affinity of a declared type (its rules, in their order).
fn affinity(declared: &str) -> &'static str {
    let d = declared.to_ascii_uppercase();
    if d.contains("INT") {
        "INTEGER"
    } else if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") {
        "TEXT"
    } else if d.contains("BLOB") || d.is_empty() {
        "BLOB"
    } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
        "REAL"
    } else {
        "NUMERIC"
    }
}

/// What the schema map makes of a declaration, by the names it looks for.
fn type_family(declared: &str) -> &'static str {
    let d = declared.to_ascii_uppercase();
    if d.contains("BOOL") {
        "boolean"
    } else if d.contains("DATETIME") || d.contains("TIMESTAMP") {
        "timestamp"
    } else if d == "DATE" {
        "date"
    } else if d.contains("JSON") {
        "json"
    } else if d.contains("UUID") {
        "uuid"
    } else {
        affinity(declared)
    }
}

/// The byte range of `column`'s definition among the items of a CREATE
/// TABLE statement's column list (comments before it left out).
fn column_definition(sql: &str, column: &str) -> Option<(usize, usize)> {
    let (items, _) = column_list(sql)?;
    items.into_iter().find_map(|(s, e)| {
        let text = &sql[s..e];
        let lead = text.len() - skip_comments(text).len();
        let trimmed = text[lead..].trim_end();
        let name = match trimmed.as_bytes().first()? {
            b'"' => trimmed[1..].split('"').next()?.to_string(),
            b'`' => trimmed[1..].split('`').next()?.to_string(),
            b'[' => trimmed[1..].split(']').next()?.to_string(),
            _ => trimmed
                .split(|c: char| c.is_whitespace())
                .next()?
                .to_string(),
        };
        (name == column).then(|| (s + lead, s + lead + trimmed.len()))
    })
}

/// `text` past leading whitespace and comments.
fn skip_comments(mut text: &str) -> &str {
    loop {
        text = text.trim_start();
        if let Some(rest) = text.strip_prefix("--") {
            text = rest.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(rest) = text.strip_prefix("/*") {
            text = rest.split_once("*/").map_or("", |(_, after)| after);
        } else {
            return text;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_definitions_are_found_past_strings_comments_and_nesting() {
        let sql = "CREATE TABLE \"t\" (\n  -- a (comment), with commas\n  \"id\" INTEGER PRIMARY KEY AUTOINCREMENT,\n  [name] TEXT DEFAULT 'a, (b)' CHECK (length(name) > 0),\n  `price` NUMERIC(10,2),\n  qty INT NOT NULL, /* ) */ FOREIGN KEY (qty) REFERENCES q(id)\n) WITHOUT ROWID";
        let end = column_list_end(sql).unwrap();
        assert_eq!(&sql[end..], ") WITHOUT ROWID");
        let def = |c| column_definition(sql, c).map(|(s, e)| &sql[s..e]);
        assert_eq!(
            def("name"),
            Some("[name] TEXT DEFAULT 'a, (b)' CHECK (length(name) > 0)")
        );
        assert_eq!(def("price"), Some("`price` NUMERIC(10,2)"));
        assert_eq!(def("qty"), Some("qty INT NOT NULL"));
        assert_eq!(def("missing"), None);
        // The column after a comment holding a comma and parentheses.
        assert_eq!(def("id"), Some("\"id\" INTEGER PRIMARY KEY AUTOINCREMENT"));
    }

    #[test]
    fn type_changes_keep_affinity_and_family() {
        assert_eq!(affinity("VARCHAR(20)"), affinity("TEXT"));
        assert_eq!(affinity("BIGINT"), "INTEGER");
        assert_eq!(affinity("DOUBLE PRECISION"), "REAL");
        assert_eq!(affinity("NUMERIC(10,2)"), "NUMERIC");
        assert_ne!(type_family("TEXT"), type_family("JSONB"));
        assert_ne!(type_family("INTEGER"), type_family("BOOLEAN"));
        assert_eq!(type_family("DATETIME"), type_family("TIMESTAMP"));
    }
}
