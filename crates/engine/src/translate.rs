//! PostgreSQL-dialect SQL to what the engine runs: session commands
//! recognized by their leading keywords, and reads and writes parsed with
//! sqlparser, rewritten for SQLite in the AST (placeholders, casts, ILIKE,
//! NULL ordering, schema-qualified names, DEFAULT in VALUES, locking
//! clauses, comparisons of values the file stores in several forms), and
//! printed. Types of parameters and result columns are inferred from the
//! schema map as PostgreSQL would infer them. Anything not translated is
//! refused with 0A000 naming the construct, never run as something else.

use crate::types::PgType;
use cutover_sqlite::{Codec, SchemaMap, Table};
use sqlparser::ast::{
    BinaryOperator, CastKind, DataType, Expr, Function, FunctionArg, FunctionArgExpr,
    FunctionArguments, Ident, ObjectName, ObjectNamePart, OrderByExpr, Query, Select, SelectItem,
    SetExpr, Statement, TableFactor, UnaryOperator, Value, VisitMut, VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::ops::ControlFlow;

/// An error for the client: SQLSTATE, message, optional 1-based position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError {
    pub code: &'static str,
    pub message: String,
    pub position: Option<usize>,
}

impl SqlError {
    pub fn new(code: &'static str, message: impl Into<String>) -> SqlError {
        SqlError {
            code,
            message: message.into(),
            position: None,
        }
    }

    pub fn unsupported(construct: impl std::fmt::Display) -> SqlError {
        SqlError::new(
            "0A000",
            format!("{construct} is not supported by cutover's SQLite engine"),
        )
    }
}

/// What a statement is, for the session.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Empty,
    Begin,
    Commit,
    Rollback,
    Savepoint(String),
    Release(String),
    RollbackTo(String),
    Set {
        name: String,
        value: Option<String>,
    },
    /// SET LOCAL: until the transaction ends.
    SetLocal {
        name: String,
        value: Option<String>,
    },
    Show(String),
    /// SET CONSTRAINTS … DEFERRED / IMMEDIATE: foreign keys checked at
    /// commit, or each as it is written (those declared INITIALLY
    /// DEFERRED are checked at commit either way: SQLite cannot check them
    /// sooner).
    SetConstraints {
        deferred: bool,
    },
    /// DISCARD ALL, DEALLOCATE, UNLISTEN: reset the named state.
    Discard,
    Deallocate(Option<String>),
    Listen(String),
    Unlisten(Option<String>),
    Notify {
        channel: String,
        payload: String,
    },
    /// `CREATE … IF NOT EXISTS` of an object that exists (or `DROP … IF
    /// EXISTS` of one that does not): nothing to do but say so.
    Noop {
        tag: String,
        notice: String,
    },
    /// DDL: the SQLite statements that make the change, and the tag.
    Ddl {
        tag: String,
        steps: Vec<crate::ddl::Step>,
        /// CREATE TEMPORARY TABLE: the session's own, not the file's
        /// schema (allowed while capture runs).
        temporary: bool,
    },
    Copy(Box<CopyPlan>),
    /// TRUNCATE: the DELETEs that empty the tables.
    Truncate(Vec<String>),
    Sql(Box<Translated>),
}

/// `COPY … FROM STDIN` or `COPY … TO STDOUT`.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyPlan {
    /// COPY FROM: the table written and its columns, in the data's order.
    pub table: String,
    pub columns: Vec<String>,
    /// COPY TO: what is read.
    pub query: Option<Translated>,
    pub format: crate::copy::Format,
}

/// How a locking read locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    Wait,
    NoWait,
    SkipLocked,
}

/// A read or write ready for SQLite.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    pub sql: String,
    /// `SELECT`, `INSERT`, `UPDATE` or `DELETE`, for the command tag.
    pub verb: &'static str,
    pub lock: Option<Lock>,
    /// The type of each `$n` (index n-1), as PostgreSQL would infer it,
    /// and the column it is compared with or stored into.
    pub params: Vec<Param>,
    /// Result column types from the statement's own expressions, where
    /// SQLite's column metadata cannot say (expressions, not columns).
    pub result_hints: Vec<Option<PgType>>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Param {
    pub pg_type: Option<PgType>,
    /// Where the value goes: stored into this column in its codec.
    pub stored: Option<(String, String)>,
    /// An array of `pg_type` (`x = ANY($1)`).
    pub array: bool,
}

/// Splits a simple query into statements (outside quotes, dollar quotes
/// and comments), keeping each statement's text.
pub fn split(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        match b[i] {
            b'\'' | b'"' => {
                let q = b[i];
                let escapes = q == b'\'' && i > 0 && (b[i - 1] == b'E' || b[i - 1] == b'e');
                i += 1;
                while i < b.len() {
                    if escapes && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b[i] == q {
                        if b.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
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
            b'$' => {
                let tag_end = sql[i + 1..]
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .map(|n| i + 1 + n);
                if let Some(end) = tag_end.filter(|e| b.get(*e) == Some(&b'$')) {
                    let tag = &sql[i..=end];
                    if !tag[1..tag.len() - 1].starts_with(|c: char| c.is_ascii_digit()) {
                        match sql[end + 1..].find(tag) {
                            Some(close) => i = end + 1 + close + tag.len() - 1,
                            None => i = b.len(),
                        }
                    }
                }
            }
            b';' => {
                out.push(&sql[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(&sql[start.min(sql.len())..]);
    out.retain(|s| !is_blank(s));
    out
}

/// True when `s` holds only whitespace and comments.
pub fn is_blank(s: &str) -> bool {
    let mut rest = s.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("--") {
            rest = r
                .split_once('\n')
                .map(|(_, r)| r)
                .unwrap_or("")
                .trim_start();
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r
                .split_once("*/")
                .map(|(_, r)| r)
                .unwrap_or("")
                .trim_start();
        } else {
            return rest.is_empty();
        }
    }
}

/// The statement's words in upper case, up to `n`, for recognizing
/// session commands.
fn words(sql: &str, n: usize) -> Vec<String> {
    sql.split(|c: char| c.is_whitespace() || c == ';' || c == '(')
        .filter(|w| !w.is_empty())
        .take(n)
        .map(|w| w.to_ascii_uppercase())
        .collect()
}

fn unquote_ident(w: &str) -> String {
    match w.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => w.to_ascii_lowercase(),
    }
}

fn unquote_literal(w: &str) -> String {
    let w = w.trim();
    match w.strip_prefix('\'').and_then(|w| w.strip_suffix('\'')) {
        Some(inner) => inner.replace("''", "'"),
        None => w.to_string(),
    }
}

/// Recognizes one statement.
pub fn command(sql: &str, map: &SchemaMap) -> Result<Command, SqlError> {
    if is_blank(sql) {
        return Ok(Command::Empty);
    }
    let text = strip_comments(sql);
    let text = text.trim();
    let w = words(text, 4);
    let first = w.first().map(String::as_str).unwrap_or("");
    let second = w.get(1).map(String::as_str).unwrap_or("");
    let rest_after = |n: usize| -> String {
        let mut s = text;
        for _ in 0..n {
            s = s.trim_start();
            let end = s.find(char::is_whitespace).unwrap_or(s.len());
            s = &s[end..];
        }
        s.trim().to_string()
    };
    Ok(match first {
        "BEGIN" | "START" => {
            if text.to_ascii_uppercase().contains("SERIALIZABLE")
                || text.to_ascii_uppercase().contains("REPEATABLE READ")
            {
                // Writes are serialized by the writer lease; reads see the
                // latest commit. Anything stronger than READ COMMITTED
                // would be a promise not kept.
                return Err(SqlError::unsupported(
                    "an isolation level above READ COMMITTED",
                ));
            }
            Command::Begin
        }
        "COMMIT" | "END" if second != "PREPARED" => Command::Commit,
        "ROLLBACK" | "ABORT" if second != "PREPARED" => {
            let up: Vec<String> = words(text, 5);
            match up.iter().position(|x| x == "TO") {
                Some(i) => {
                    let name = text
                        .split_whitespace()
                        .skip(i + 1)
                        .find(|x| !x.eq_ignore_ascii_case("SAVEPOINT"))
                        .ok_or_else(|| SqlError::new("42601", "syntax error at end of input"))?;
                    Command::RollbackTo(unquote_ident(name))
                }
                None => Command::Rollback,
            }
        }
        "SAVEPOINT" => Command::Savepoint(unquote_ident(&rest_after(1))),
        "RELEASE" => {
            let name = if second == "SAVEPOINT" {
                rest_after(2)
            } else {
                rest_after(1)
            };
            Command::Release(unquote_ident(&name))
        }
        "PREPARE" if second == "TRANSACTION" => {
            return Err(SqlError::unsupported(
                "PREPARE TRANSACTION (two-phase commit)",
            ))
        }
        "COMMIT" | "ROLLBACK" => {
            return Err(SqlError::unsupported(format!(
                "{first} PREPARED (two-phase commit)"
            )))
        }
        "SET" if second == "CONSTRAINTS" => {
            let rest = rest_after(2).to_ascii_uppercase();
            if rest.ends_with("DEFERRED") {
                Command::SetConstraints { deferred: true }
            } else if rest.ends_with("IMMEDIATE") {
                Command::SetConstraints { deferred: false }
            } else {
                return Err(SqlError::new("42601", "syntax error in SET CONSTRAINTS"));
            }
        }
        "SET" => set_command(&rest_after(1))?,
        "RESET" => {
            let name = rest_after(1).to_ascii_lowercase();
            Command::Set {
                name: if name == "all" { String::new() } else { name },
                value: None,
            }
        }
        "SHOW" => Command::Show(show_name(&rest_after(1))),
        "DISCARD" => Command::Discard,
        "DEALLOCATE" => {
            let rest = rest_after(1);
            let rest = rest
                .strip_prefix("PREPARE ")
                .or_else(|| rest.strip_prefix("prepare "))
                .unwrap_or(&rest)
                .trim()
                .to_string();
            if rest.eq_ignore_ascii_case("all") {
                Command::Deallocate(None)
            } else {
                Command::Deallocate(Some(unquote_ident(&rest)))
            }
        }
        "LISTEN" => Command::Listen(unquote_ident(&rest_after(1))),
        "UNLISTEN" => {
            let ch = rest_after(1);
            Command::Unlisten(if ch == "*" {
                None
            } else {
                Some(unquote_ident(&ch))
            })
        }
        "NOTIFY" => {
            let rest = rest_after(1);
            let (ch, payload) = rest.split_once(',').unwrap_or((&rest, ""));
            Command::Notify {
                channel: unquote_ident(ch.trim()),
                payload: unquote_literal(payload),
            }
        }
        "CREATE" | "DROP" | "ALTER" => ddl(text, map)?,
        "COMMENT" | "GRANT" | "REVOKE" | "REINDEX" | "CLUSTER" => {
            return Err(SqlError::unsupported(format!(
                "{first} {second} (the SQLite engine runs CREATE/DROP TABLE, CREATE/DROP INDEX and ALTER TABLE ADD/DROP/RENAME)"
            )))
        }
        "TRUNCATE" => truncate(text, map)?,
        "COPY" => Command::Copy(Box::new(copy(text, map)?)),
        "SELECT" | "WITH" | "INSERT" | "UPDATE" | "DELETE" | "VALUES" | "TABLE" | "(" => {
            Command::Sql(Box::new(translate(text, map)?))
        }
        _ if first.starts_with('(') => Command::Sql(Box::new(translate(text, map)?)),
        _ => {
            let construct = w.iter().take(2).cloned().collect::<Vec<_>>().join(" ");
            return Err(SqlError::unsupported(construct));
        }
    })
}

fn strip_comments(sql: &str) -> String {
    let mut rest = sql.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("--") {
            rest = r
                .split_once('\n')
                .map(|(_, r)| r)
                .unwrap_or("")
                .trim_start();
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r
                .split_once("*/")
                .map(|(_, r)| r)
                .unwrap_or("")
                .trim_start();
        } else {
            return rest.to_string();
        }
    }
}

/// The parameter SHOW names, lowercased; the SQL-standard spellings
/// (`SHOW TRANSACTION ISOLATION LEVEL`, SQLAlchemy's first query, `SHOW
/// TIME ZONE`, `SHOW SESSION AUTHORIZATION`) as the parameters they are.
fn show_name(rest: &str) -> String {
    let words: Vec<String> = rest
        .split_whitespace()
        .map(|w| w.trim_end_matches(';').to_ascii_lowercase())
        .filter(|w| !w.is_empty())
        .collect();
    match words.join(" ").as_str() {
        "transaction isolation level" => "transaction_isolation".to_string(),
        "time zone" => "timezone".to_string(),
        "session authorization" => "session_authorization".to_string(),
        other => other.to_string(),
    }
}

fn set_command(rest: &str) -> Result<Command, SqlError> {
    let mut rest = rest.trim();
    let mut local = false;
    for prefix in ["SESSION ", "session ", "LOCAL ", "local "] {
        if let Some(r) = rest.strip_prefix(prefix) {
            rest = r.trim();
            local |= prefix.eq_ignore_ascii_case("LOCAL ");
        }
    }
    let command = set_value(rest)?;
    Ok(match command {
        Command::Set { name, value } if local && !name.is_empty() => {
            Command::SetLocal { name, value }
        }
        other => other,
    })
}

/// SET's name and value, after SESSION or LOCAL.
fn set_value(rest: &str) -> Result<Command, SqlError> {
    let upper = rest.to_ascii_uppercase();
    if upper.starts_with("TIME ZONE") {
        let zone = rest[9..].trim();
        // `SET TIME ZONE INTERVAL '+00:00' HOUR TO MINUTE` (Sequelize's
        // connect): an offset from UTC.
        let value = match zone.get(..8) {
            Some(word) if word.eq_ignore_ascii_case("INTERVAL") => {
                let offset =
                    unquote_literal(zone[8..].split_whitespace().next().unwrap_or_default());
                let zero = offset
                    .trim_start_matches(['+', '-'])
                    .chars()
                    .all(|c| c == '0' || c == ':' || c == '.');
                if zero {
                    "UTC".to_string()
                } else {
                    format!("INTERVAL '{offset}'")
                }
            }
            _ => unquote_literal(zone),
        };
        return Ok(Command::Set {
            name: "timezone".to_string(),
            value: Some(value),
        });
    }
    if upper.starts_with("TRANSACTION") || upper.starts_with("CHARACTERISTICS") {
        if upper.contains("SERIALIZABLE") || upper.contains("REPEATABLE READ") {
            return Err(SqlError::unsupported(
                "an isolation level above READ COMMITTED",
            ));
        }
        return Ok(Command::Set {
            name: String::new(),
            value: Some(String::new()),
        });
    }
    let (name, value) = match rest.split_once('=') {
        Some((n, v)) => (n, v),
        None => {
            let lower = rest.to_ascii_lowercase();
            match lower.find(" to ") {
                Some(i) => (&rest[..i], &rest[i + 4..]),
                None => return Err(SqlError::new("42601", "syntax error in SET")),
            }
        }
    };
    let value = value.trim();
    let value = if value.eq_ignore_ascii_case("default") {
        None
    } else {
        Some(
            value
                .split(',')
                .map(unquote_literal)
                .collect::<Vec<_>>()
                .join(", "),
        )
    };
    Ok(Command::Set {
        name: name.trim().to_ascii_lowercase(),
        value,
    })
}

/// TRUNCATE as the DELETE it amounts to, table by table (and with
/// RESTART IDENTITY, the ids starting over as SQLite counts them).
fn truncate(text: &str, map: &SchemaMap) -> Result<Command, SqlError> {
    let mut statements =
        Parser::parse_sql(&PostgreSqlDialect {}, text).map_err(parse_error_in(text))?;
    let Some(Statement::Truncate {
        table_names,
        identity,
        ..
    }) = statements.pop()
    else {
        return Err(SqlError::new("42601", "syntax error in TRUNCATE"));
    };
    let mut sql = Vec::new();
    for t in &table_names {
        let name = last_part(&t.name);
        let Some(table) = map.tables.iter().find(|x| x.name == name) else {
            return Err(SqlError::new(
                "42P01",
                format!("relation \"{name}\" does not exist"),
            ));
        };
        sql.push(format!(
            "DELETE FROM {}",
            Ident::with_quote('"', name.clone())
        ));
        if table.autoincrement
            && matches!(
                identity,
                Some(sqlparser::ast::TruncateIdentityOption::Restart)
            )
        {
            sql.push(format!(
                "DELETE FROM sqlite_sequence WHERE name = '{}'",
                name.replace('\'', "''")
            ));
        }
    }
    Ok(Command::Truncate(sql))
}

fn copy(text: &str, map: &SchemaMap) -> Result<CopyPlan, SqlError> {
    use sqlparser::ast::{CopyOption, CopySource, CopyTarget};
    // sqlparser reads COPY FROM STDIN's data inline after the statement,
    // up to `\.`: the data comes later here, so give it none.
    let inline = if text.to_ascii_uppercase().contains("STDIN") {
        format!("{};\n\\.\n", text.trim_end().trim_end_matches(';'))
    } else {
        text.to_string()
    };
    let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, &inline).map_err(parse_error)?;
    let Some(Statement::Copy {
        source,
        to,
        target,
        options,
        legacy_options,
        ..
    }) = statements.pop()
    else {
        return Err(SqlError::new("42601", "syntax error in COPY"));
    };
    if !matches!(target, CopyTarget::Stdin | CopyTarget::Stdout) {
        return Err(SqlError::unsupported(
            "COPY to or from a file or program (use STDIN/STDOUT, as psql's \\copy does)",
        ));
    }
    let mut format = crate::copy::Format::text();
    for o in &options {
        match o {
            CopyOption::Format(f) if f.value.eq_ignore_ascii_case("csv") => {
                format = crate::copy::Format {
                    header: format.header,
                    ..crate::copy::Format::csv()
                }
            }
            CopyOption::Format(f) if f.value.eq_ignore_ascii_case("text") => {}
            CopyOption::Format(f) => {
                return Err(SqlError::unsupported(format!("COPY format {}", f.value)))
            }
            CopyOption::Header(h) => format.header = *h,
            CopyOption::Delimiter(d) => format.delimiter = *d,
            CopyOption::Null(n) => format.null = n.clone(),
            CopyOption::Quote(q) => format.quote = *q,
            CopyOption::Encoding(e)
                if e.eq_ignore_ascii_case("utf8") || e.eq_ignore_ascii_case("utf-8") => {}
            other => return Err(SqlError::unsupported(format!("COPY option {other}"))),
        }
    }
    for o in &legacy_options {
        match o {
            sqlparser::ast::CopyLegacyOption::Csv(_) => {
                format = crate::copy::Format {
                    header: format.header,
                    ..crate::copy::Format::csv()
                }
            }
            other => return Err(SqlError::unsupported(format!("COPY option {other}"))),
        }
    }
    let (table, columns) = match source {
        CopySource::Table {
            table_name,
            columns,
        } => {
            let name = last_part(&table_name);
            let t = map.tables.iter().find(|t| t.name == name).ok_or_else(|| {
                SqlError::new("42P01", format!("relation \"{name}\" does not exist"))
            })?;
            let columns: Vec<String> = if columns.is_empty() {
                t.columns.iter().map(|c| c.name.clone()).collect()
            } else {
                columns.iter().map(|c| c.value.clone()).collect()
            };
            if let Some(c) = columns
                .iter()
                .find(|c| !t.columns.iter().any(|x| &x.name == *c))
            {
                return Err(SqlError::new(
                    "42703",
                    format!("column \"{c}\" of relation \"{name}\" does not exist"),
                ));
            }
            (name, columns)
        }
        CopySource::Query(q) if to => {
            return Ok(CopyPlan {
                table: String::new(),
                columns: Vec::new(),
                query: Some(translate(&q.to_string(), map)?),
                format,
            })
        }
        CopySource::Query(_) => return Err(SqlError::new("42601", "COPY FROM needs a table")),
    };
    let query = if to {
        let list: Vec<String> = columns
            .iter()
            .map(|c| Ident::with_quote('"', c.clone()).to_string())
            .collect();
        Some(translate(
            &format!(
                "SELECT {} FROM {}",
                list.join(", "),
                Ident::with_quote('"', table.clone())
            ),
            map,
        )?)
    } else {
        None
    };
    Ok(CopyPlan {
        table,
        columns,
        query,
        format,
    })
}

/// DDL, written into the file as SQLite's (see ddl.rs).
fn ddl(text: &str, map: &SchemaMap) -> Result<Command, SqlError> {
    let mut statements =
        Parser::parse_sql(&PostgreSqlDialect {}, text).map_err(parse_error_in(text))?;
    match (statements.pop(), statements.is_empty()) {
        (Some(statement), true) => crate::ddl::translate(statement, map),
        _ => Err(SqlError::new("42601", "one statement expected")),
    }
}

fn last_part(name: &ObjectName) -> String {
    name.0
        .last()
        .and_then(|p| p.as_ident())
        .map(|i| i.value.clone())
        .unwrap_or_default()
}

fn parse_error(e: sqlparser::parser::ParserError) -> SqlError {
    let text = e.to_string();
    let message = text
        .strip_prefix("sql parser error: ")
        .unwrap_or(&text)
        .to_string();
    SqlError::new("42601", format!("syntax error: {message}"))
}

/// [`parse_error`] with the 1-based character position PostgreSQL gives,
/// from sqlparser's line and column in `sql`.
fn parse_error_in(sql: &str) -> impl Fn(sqlparser::parser::ParserError) -> SqlError + '_ {
    move |e| {
        let mut error = parse_error(e);
        let at = |key: &str| -> Option<usize> {
            let rest = &error.message[error.message.find(key)? + key.len()..];
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        if let (Some(line), Some(column)) = (at("Line:"), at("Column:")) {
            let before: usize = sql
                .split_inclusive('\n')
                .take(line.saturating_sub(1))
                .map(|l| l.chars().count())
                .sum();
            error.position = Some(before + column);
        }
        error
    }
}

/// A read or write for SQLite, with its parameter and result types.
pub fn translate(text: &str, map: &SchemaMap) -> Result<Translated, SqlError> {
    let mut statements =
        Parser::parse_sql(&PostgreSqlDialect {}, text).map_err(parse_error_in(text))?;
    if statements.len() != 1 {
        return Err(SqlError::new(
            "42601",
            "cannot insert multiple commands into a prepared statement",
        ));
    }
    let mut statement = statements.remove(0);
    let verb = match &statement {
        Statement::Query(_) => "SELECT",
        Statement::Insert(_) => "INSERT",
        Statement::Update { .. } => "UPDATE",
        Statement::Delete(_) => "DELETE",
        other => {
            let first = other.to_string();
            let construct = first
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            return Err(SqlError::unsupported(construct));
        }
    };
    pg_literals(&mut statement);
    name_columns(&mut statement);
    unnest_laterals(&mut statement)?;
    let scope = Scope::of(&statement, map);
    let mut params = Vec::new();
    infer_params(&statement, &scope, &mut params);
    let result_hints = result_hints(&statement, &scope);
    distinct_on(&mut statement)?;
    unnest_insert(&mut statement)?;
    let mut rewrite = Rewrite {
        scope: &scope,
        lock: None,
        error: None,
    };
    let _ = statement.visit(&mut rewrite);
    if let Some(e) = rewrite.error {
        return Err(e);
    }
    if let Statement::Insert(insert) = &mut statement {
        drop_default_columns(insert, &scope)?;
    }
    store_in_codecs(&mut statement, &scope);
    Ok(Translated {
        sql: statement.to_string(),
        verb,
        lock: rewrite.lock,
        params,
        result_hints,
    })
}

/// PostgreSQL's spellings SQLite reads otherwise: `E'…'` strings (whose
/// escapes the parser has already applied) as plain strings, and LIKE's
/// default escape character, the backslash, made explicit (SQLite's LIKE
/// has none).
fn pg_literals(statement: &mut Statement) {
    let _ = sqlparser::ast::visit_expressions_mut(statement, |e| {
        match e {
            Expr::Value(v) => {
                if let Value::EscapedStringLiteral(text) = &v.value {
                    v.value = Value::SingleQuotedString(text.clone());
                }
            }
            Expr::Like { escape_char, .. } | Expr::ILike { escape_char, .. }
                if escape_char.is_none() =>
            {
                *escape_char = Some(Value::SingleQuotedString("\\".to_string()));
            }
            // The database's default collation (psql's `COLLATE
            // pg_catalog.default`) and "C" are SQLite's binary order.
            Expr::Collate { expr, collation }
                if matches!(
                    collation.to_string().to_ascii_lowercase().as_str(),
                    "pg_catalog.default" | "default" | "\"default\"" | "\"c\"" | "pg_catalog.\"c\""
                ) =>
            {
                *e = std::mem::replace(expr.as_mut(), Expr::value(Value::Null));
            }
            _ => {}
        }
        ControlFlow::<()>::Continue(())
    });
}

/// The tables a statement names, by alias and by name.
struct Scope<'a> {
    tables: Vec<(String, &'a Table)>,
    /// Subqueries in FROM, under their alias: each column's name and the
    /// type its expression gives.
    derived: Vec<(String, Vec<DerivedColumn>)>,
    map: &'a SchemaMap,
}

/// A column of a subquery in FROM: its name, and its type when known.
type DerivedColumn = (String, Option<PgType>);

impl<'a> Scope<'a> {
    fn of(statement: &Statement, map: &'a SchemaMap) -> Scope<'a> {
        let mut tables = Vec::new();
        let mut add = |name: &ObjectName, alias: Option<&Ident>| {
            let n = last_part(name);
            if let Some(t) = map.tables.iter().find(|t| t.name == n) {
                tables.push((alias.map(|a| a.value.clone()).unwrap_or(n), t));
            }
        };
        type Subquery = (String, Query, Vec<String>);
        struct Names<'f, F: FnMut(&ObjectName, Option<&Ident>)>(&'f mut F, Vec<Subquery>);
        impl<F: FnMut(&ObjectName, Option<&Ident>)> sqlparser::ast::Visitor for Names<'_, F> {
            type Break = ();
            fn pre_visit_table_factor(&mut self, f: &TableFactor) -> ControlFlow<()> {
                match f {
                    TableFactor::Table { name, alias, .. } => {
                        (self.0)(name, alias.as_ref().map(|a| &a.name));
                    }
                    TableFactor::Derived {
                        subquery,
                        alias: Some(alias),
                        ..
                    } => self.1.push((
                        alias.name.value.clone(),
                        (**subquery).clone(),
                        alias.columns.iter().map(|c| c.name.value.clone()).collect(),
                    )),
                    _ => {}
                }
                ControlFlow::Continue(())
            }
        }
        if let Statement::Insert(i) = statement {
            if let sqlparser::ast::TableObject::TableName(name) = &i.table {
                add(name, i.table_alias.as_ref());
            }
        }
        let mut names = Names(&mut add, Vec::new());
        let _ = sqlparser::ast::Visit::visit(statement, &mut names);
        let subqueries = names.1;
        let derived = subqueries
            .into_iter()
            .map(|(alias, query, columns)| (alias, derived_columns(query, &columns, map)))
            .collect();
        Scope {
            tables,
            derived,
            map,
        }
    }

    /// The type of a column of a subquery in FROM an identifier names.
    fn derived_type(&self, parts: &[Ident]) -> Option<PgType> {
        let name = &parts.last()?.value;
        let qualifier = parts.len().checked_sub(2).map(|i| &parts[i].value);
        self.derived
            .iter()
            .filter(|(alias, _)| qualifier.is_none_or(|q| q == alias))
            .find_map(|(_, columns)| columns.iter().find(|(n, _)| n == name))
            .and_then(|(_, ty)| *ty)
    }

    /// The column an identifier names, if it names one.
    fn column(&self, parts: &[Ident]) -> Option<(&'a Table, &'a cutover_sqlite::Column)> {
        let name = &parts.last()?.value;
        let qualifier = parts.len().checked_sub(2).map(|i| &parts[i].value);
        self.tables
            .iter()
            .filter(|(alias, t)| qualifier.is_none_or(|q| q == alias || *q == t.name))
            .find_map(|(_, t)| t.columns.iter().find(|c| &c.name == name).map(|c| (*t, c)))
    }

    fn table(&self, name: &str) -> Option<&'a Table> {
        self.map.tables.iter().find(|t| t.name == name)
    }
}

/// `INSERT … SELECT * FROM UNNEST($1::t1[], …, $n::tn[])`, Django's
/// bulk_create: each array parameter arrives as JSON (see bind), is read
/// with json_each, and the arrays are zipped by position, in order (the
/// RETURNING rows follow the arrays' order, as the ids are handed back to
/// the objects in it). Other UNNEST is refused by the rewrite.
fn unnest_insert(statement: &mut Statement) -> Result<(), SqlError> {
    let Statement::Insert(insert) = statement else {
        return Ok(());
    };
    let Some(source) = insert.source.as_mut() else {
        return Ok(());
    };
    let SetExpr::Select(select) = source.body.as_ref() else {
        return Ok(());
    };
    let [from] = select.from.as_slice() else {
        return Ok(());
    };
    let TableFactor::UNNEST {
        array_exprs,
        with_offset: false,
        with_ordinality: false,
        ..
    } = &from.relation
    else {
        return Ok(());
    };
    if !from.joins.is_empty()
        || !matches!(select.projection.as_slice(), [SelectItem::Wildcard(_)])
        || select.selection.is_some()
    {
        return Ok(());
    }
    // Each array: a parameter (server-side binding), or an array literal
    // under casts (psycopg's client-side binding, Django's default:
    // `('{1,2}'::int2[])::bigint[]`), read as the outermost cast's type.
    let mut arrays = Vec::new();
    for e in array_exprs {
        let mut elem = None;
        let mut core = e;
        loop {
            match core {
                Expr::Nested(inner) => core = inner,
                Expr::Cast {
                    expr, data_type, ..
                } => {
                    if let (
                        None,
                        DataType::Array(
                            sqlparser::ast::ArrayElemTypeDef::SquareBracket(t, _)
                            | sqlparser::ast::ArrayElemTypeDef::AngleBracket(t),
                        ),
                    ) = (elem, data_type)
                    {
                        elem = PgType::from_name(&t.to_string());
                    }
                    core = expr;
                }
                _ => break,
            }
        }
        let unsupported = || {
            SqlError::unsupported(
                "INSERT … SELECT FROM UNNEST of anything but arrays of built-in types",
            )
        };
        let source = match (placeholder(core), core) {
            (Some(n), _) => format!("${n}"),
            (
                None,
                Expr::Value(sqlparser::ast::ValueWithSpan {
                    value: Value::SingleQuotedString(text),
                    ..
                }),
            ) => {
                let elem = elem.ok_or_else(unsupported)?;
                let json =
                    crate::types::array_param_json(elem, 0, text.as_bytes()).map_err(|bad| {
                        SqlError::new(
                            "22P02",
                            format!("malformed array literal: \"{}\"", bad.text),
                        )
                    })?;
                format!("'{}'", json.replace('\'', "''"))
            }
            _ => return Err(unsupported()),
        };
        arrays.push(source);
    }
    let Some(first) = arrays.first() else {
        return Ok(());
    };
    let items: Vec<String> = (0..arrays.len()).map(|i| format!("u{i}.value")).collect();
    let mut from_sql = format!("json_each({first}) AS u0");
    for (i, a) in arrays.iter().enumerate().skip(1) {
        from_sql.push_str(&format!(
            " JOIN json_each({a}) AS u{i} ON u{i}.key = u0.key"
        ));
    }
    let sql = format!(
        "SELECT {} FROM {from_sql} ORDER BY u0.key",
        items.join(", ")
    );
    match Parser::parse_sql(&PostgreSqlDialect {}, &sql).map(|mut s| s.pop()) {
        Ok(Some(Statement::Query(q))) => {
            **source = *q;
            Ok(())
        }
        _ => Err(SqlError::unsupported("this INSERT … SELECT FROM UNNEST")),
    }
}

/// The columns of a subquery in FROM (named by the alias's column list
/// when it has one) with the types their expressions give.
fn derived_columns(query: Query, names: &[String], map: &SchemaMap) -> Vec<DerivedColumn> {
    let body = query.body.clone();
    let inner = Scope::of(&Statement::Query(Box::new(query)), map);
    let named = |i: usize, own: String| names.get(i).cloned().unwrap_or(own);
    match *body {
        SetExpr::Select(select) => select
            .projection
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let (expr, own) = match item {
                    SelectItem::ExprWithAlias { expr, alias } => (expr, alias.value.clone()),
                    SelectItem::UnnamedExpr(expr) => (
                        expr,
                        ident_parts(expr)
                            .and_then(|p| p.last().map(|l| l.value.clone()))
                            .unwrap_or_else(|| "?column?".to_string()),
                    ),
                    _ => return None,
                };
                Some((named(i, own), expr_type(expr, &inner)))
            })
            .collect(),
        SetExpr::Values(values) => values
            .rows
            .first()
            .map(|row| {
                row.iter()
                    .enumerate()
                    .map(|(i, e)| (named(i, format!("column{}", i + 1)), expr_type(e, &inner)))
                    .collect()
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn ident_parts(e: &Expr) -> Option<Vec<Ident>> {
    match e {
        Expr::Identifier(i) => Some(vec![i.clone()]),
        Expr::CompoundIdentifier(p) => Some(p.clone()),
        Expr::Nested(inner) => ident_parts(inner),
        _ => None,
    }
}

fn placeholder(e: &Expr) -> Option<usize> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => p.strip_prefix('$')?.parse::<usize>().ok(),
            _ => None,
        },
        Expr::Nested(inner) => placeholder(inner),
        _ => None,
    }
}

/// The text of an interval literal: `INTERVAL '7 days'`, `INTERVAL '7'
/// DAY`, `'7 days'::interval`.
fn interval_text(e: &Expr) -> Option<String> {
    let literal = |v: &Expr| match v {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    };
    match e {
        Expr::Nested(inner) => interval_text(inner),
        Expr::Interval(iv) => {
            let text = literal(&iv.value)?;
            Some(match &iv.leading_field {
                Some(field) => format!("{text} {field}"),
                None => text,
            })
        }
        Expr::Cast {
            expr,
            data_type: DataType::Interval { .. },
            ..
        } => literal(expr),
        _ => None,
    }
}

/// Whether an expression yields a decimal as text (exact sums and
/// averages, extract): compared as a number it must be read as one.
fn decimal_text(e: &Expr) -> bool {
    match e {
        Expr::Nested(inner) => decimal_text(inner),
        Expr::Function(f) => matches!(
            last_part(&f.name).as_str(),
            "cutover_sum_numeric" | "cutover_avg" | "cutover_extract"
        ),
        _ => false,
    }
}

/// PostgreSQL's type category, which decides what compares with what.
fn category(t: PgType) -> char {
    match t {
        PgType::Text | PgType::Varchar | PgType::Name | PgType::Char => 'S',
        PgType::Int2
        | PgType::Int4
        | PgType::Int8
        | PgType::Numeric
        | PgType::Float8
        | PgType::Oid => 'N',
        PgType::Date | PgType::Timestamp | PgType::Timestamptz => 'D',
        PgType::Bool => 'B',
        PgType::Json => 'J',
        PgType::Jsonb => 'j',
        PgType::Uuid => 'U',
        PgType::Bytea => 'X',
        PgType::Array(_) => 'A',
    }
}

fn is_string_literal(e: &Expr) -> bool {
    match e {
        Expr::Nested(inner) => is_string_literal(inner),
        Expr::Value(v) => matches!(v.value, Value::SingleQuotedString(_)),
        _ => false,
    }
}

/// The already rewritten placeholder (`?n`) an expression is.
fn placeholder_text(e: &Expr) -> Option<String> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) if p.starts_with('?') || p.starts_with('$') => {
                Some(format!("?{}", &p[1..]))
            }
            _ => None,
        },
        Expr::Nested(inner) => placeholder_text(inner),
        _ => None,
    }
}

fn set_param(params: &mut Vec<Param>, n: usize, param: Param) {
    if n == 0 {
        return;
    }
    if params.len() < n {
        params.resize(n, Param::default());
    }
    let slot = &mut params[n - 1];
    if slot.pg_type.is_none() {
        slot.pg_type = param.pg_type;
    }
    if slot.stored.is_none() {
        slot.stored = param.stored;
    }
    slot.array |= param.array;
}

/// Infers each `$n`'s type from what it is compared with, stored into or
/// cast to, as PostgreSQL's parser does.
fn infer_params(statement: &Statement, scope: &Scope, params: &mut Vec<Param>) {
    struct Infer<'s, 'a> {
        scope: &'s Scope<'a>,
        params: &'s mut Vec<Param>,
    }
    impl sqlparser::ast::Visitor for Infer<'_, '_> {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            match e {
                Expr::AnyOp { left, right, .. } | Expr::AllOp { left, right, .. } => {
                    if let Some(n) = placeholder(right) {
                        let ty = expr_type(left, self.scope);
                        set_param(
                            self.params,
                            n,
                            Param {
                                pg_type: ty,
                                stored: None,
                                array: true,
                            },
                        );
                    }
                }
                Expr::BinaryOp { left, right, .. } => {
                    for (p, other) in [(left, right), (right, left)] {
                        if let Some(n) = placeholder(p) {
                            let ty = expr_type(other, self.scope);
                            set_param(
                                self.params,
                                n,
                                Param {
                                    pg_type: ty,
                                    stored: None,
                                    array: false,
                                },
                            );
                        }
                    }
                }
                Expr::Cast {
                    expr, data_type, ..
                } => {
                    if let Some(n) = placeholder(expr) {
                        // `$1::bigint[]`: an array of bigints.
                        let (ty, array) = match data_type {
                            DataType::Array(
                                sqlparser::ast::ArrayElemTypeDef::SquareBracket(elem, _)
                                | sqlparser::ast::ArrayElemTypeDef::AngleBracket(elem),
                            ) => (PgType::from_name(&elem.to_string()), true),
                            other => (PgType::from_name(&other.to_string()), false),
                        };
                        set_param(
                            self.params,
                            n,
                            Param {
                                pg_type: ty,
                                stored: None,
                                array,
                            },
                        );
                    }
                }
                Expr::Like { expr, pattern, .. } | Expr::ILike { expr, pattern, .. } => {
                    for p in [expr, pattern] {
                        if let Some(n) = placeholder(p) {
                            set_param(
                                self.params,
                                n,
                                Param {
                                    pg_type: Some(PgType::Text),
                                    stored: None,
                                    array: false,
                                },
                            );
                        }
                    }
                }
                Expr::InList { expr, list, .. } => {
                    let ty = expr_type(expr, self.scope);
                    for item in list {
                        if let Some(n) = placeholder(item) {
                            set_param(
                                self.params,
                                n,
                                Param {
                                    pg_type: ty,
                                    stored: None,
                                    array: false,
                                },
                            );
                        }
                    }
                }
                Expr::Between {
                    expr, low, high, ..
                } => {
                    let ty = expr_type(expr, self.scope);
                    for item in [low, high] {
                        if let Some(n) = placeholder(item) {
                            set_param(
                                self.params,
                                n,
                                Param {
                                    pg_type: ty,
                                    stored: None,
                                    array: false,
                                },
                            );
                        }
                    }
                }
                _ => {}
            }
            ControlFlow::Continue(())
        }

        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            if let Some(limit) = &q.limit_clause {
                let text = limit.to_string();
                for piece in text.split(|c: char| !(c == '$' || c.is_ascii_digit())) {
                    if let Some(n) = piece
                        .strip_prefix('$')
                        .and_then(|d| d.parse::<usize>().ok())
                    {
                        set_param(
                            self.params,
                            n,
                            Param {
                                pg_type: Some(PgType::Int8),
                                stored: None,
                                array: false,
                            },
                        );
                    }
                }
            }
            ControlFlow::Continue(())
        }
    }
    // Values stored into columns first: they decide the codec.
    match statement {
        Statement::Insert(insert) => {
            let table = match &insert.table {
                sqlparser::ast::TableObject::TableName(n) => scope.table(&last_part(n)),
                _ => None,
            };
            if let (Some(table), Some(source)) = (table, &insert.source) {
                let columns: Vec<String> = if insert.columns.is_empty() {
                    table.columns.iter().map(|c| c.name.clone()).collect()
                } else {
                    insert.columns.iter().map(|c| c.value.clone()).collect()
                };
                if let SetExpr::Values(values) = source.body.as_ref() {
                    for row in &values.rows {
                        for (i, e) in row.iter().enumerate() {
                            if let (Some(n), Some(col)) = (placeholder(e), columns.get(i)) {
                                stored_param(params, n, table, col);
                            }
                        }
                    }
                }
            }
            if let (Some(table), Some(sqlparser::ast::OnInsert::OnConflict(oc))) =
                (table, &insert.on)
            {
                if let sqlparser::ast::OnConflictAction::DoUpdate(du) = &oc.action {
                    for a in &du.assignments {
                        assignment_param(params, table, a);
                    }
                }
            }
        }
        Statement::Update {
            table, assignments, ..
        } => {
            if let TableFactor::Table { name, .. } = &table.relation {
                if let Some(t) = scope.table(&last_part(name)) {
                    for a in assignments {
                        assignment_param(params, t, a);
                    }
                }
            }
        }
        _ => {}
    }
    let _ = sqlparser::ast::Visit::visit(statement, &mut Infer { scope, params });
}

fn assignment_param(params: &mut Vec<Param>, table: &Table, a: &sqlparser::ast::Assignment) {
    if let (Some(n), sqlparser::ast::AssignmentTarget::ColumnName(col)) =
        (placeholder(&a.value), &a.target)
    {
        stored_param(params, n, table, &last_part(col));
    }
}

fn stored_param(params: &mut Vec<Param>, n: usize, table: &Table, column: &str) {
    if let Some(c) = table.columns.iter().find(|c| c.name == column) {
        set_param(
            params,
            n,
            Param {
                pg_type: Some(PgType::of_column(&c.pg_type)),
                stored: Some((table.name.clone(), c.name.clone())),
                array: false,
            },
        );
    }
}

/// The PostgreSQL type of an expression, where it can be told.
fn expr_type(e: &Expr, scope: &Scope) -> Option<PgType> {
    if let Some(parts) = ident_parts(e) {
        return scope
            .column(&parts)
            .map(|(_, c)| PgType::of_column(&c.pg_type))
            .or_else(|| scope.derived_type(&parts));
    }
    Some(match e {
        Expr::Nested(inner) => return expr_type(inner, scope),
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => {
                if n.parse::<i32>().is_ok() {
                    PgType::Int4
                } else if n.parse::<i64>().is_ok() {
                    PgType::Int8
                } else {
                    PgType::Numeric
                }
            }
            Value::SingleQuotedString(_) => PgType::Text,
            Value::Boolean(_) => PgType::Bool,
            _ => return None,
        },
        Expr::Cast { data_type, .. } => return PgType::from_name(&data_type.to_string()),
        Expr::Position { .. } => PgType::Int4,
        Expr::Substring { .. } => PgType::Text,
        // PostgreSQL's float8 versions take integers; numeric its own.
        Expr::Ceil { expr, .. } | Expr::Floor { expr, .. } => match expr_type(expr, scope)? {
            PgType::Numeric => PgType::Numeric,
            _ => PgType::Float8,
        },
        Expr::BinaryOp { left, op, right } => match op {
            BinaryOperator::Eq
            | BinaryOperator::NotEq
            | BinaryOperator::Lt
            | BinaryOperator::LtEq
            | BinaryOperator::Gt
            | BinaryOperator::GtEq
            | BinaryOperator::And
            | BinaryOperator::Or
            | BinaryOperator::PGRegexMatch
            | BinaryOperator::PGRegexIMatch
            | BinaryOperator::PGRegexNotMatch
            | BinaryOperator::PGRegexNotIMatch => PgType::Bool,
            BinaryOperator::StringConcat => {
                let l = expr_type(left, scope);
                if l == Some(PgType::Jsonb) {
                    PgType::Jsonb
                } else {
                    PgType::Text
                }
            }
            BinaryOperator::Arrow | BinaryOperator::HashArrow => return expr_type(left, scope),
            BinaryOperator::LongArrow | BinaryOperator::HashLongArrow => PgType::Text,
            BinaryOperator::AtArrow
            | BinaryOperator::ArrowAt
            | BinaryOperator::Question
            | BinaryOperator::QuestionAnd
            | BinaryOperator::QuestionPipe => PgType::Bool,
            BinaryOperator::Plus | BinaryOperator::Minus
                if interval_text(left).is_some() || interval_text(right).is_some() =>
            {
                PgType::Timestamptz
            }
            BinaryOperator::Plus
            | BinaryOperator::Minus
            | BinaryOperator::Multiply
            | BinaryOperator::Divide
            | BinaryOperator::Modulo => {
                let (l, r) = (expr_type(left, scope)?, expr_type(right, scope)?);
                arithmetic(l, r)
            }
            _ => return None,
        },
        Expr::UnaryOp {
            op: UnaryOperator::Not,
            ..
        } => PgType::Bool,
        Expr::UnaryOp { expr, .. } => return expr_type(expr, scope),
        Expr::IsNull(_)
        | Expr::IsNotNull(_)
        | Expr::IsTrue(_)
        | Expr::IsFalse(_)
        | Expr::IsNotTrue(_)
        | Expr::IsNotFalse(_)
        | Expr::InList { .. }
        | Expr::InSubquery { .. }
        | Expr::Between { .. }
        | Expr::Like { .. }
        | Expr::ILike { .. }
        | Expr::Exists { .. } => PgType::Bool,
        Expr::Function(f) => return function_type(f, scope),
        Expr::Extract { .. } => PgType::Numeric,
        Expr::Case {
            conditions,
            else_result,
            ..
        } => {
            return conditions
                .iter()
                .find_map(|c| expr_type(&c.result, scope))
                .or_else(|| else_result.as_ref().and_then(|e| expr_type(e, scope)))
        }
        Expr::Subquery(q) => return query_first_type(q, scope),
        _ => return None,
    })
}

fn arithmetic(l: PgType, r: PgType) -> PgType {
    use PgType::*;
    match (l, r) {
        (Date, Date) => Int4,
        (Date, _) | (_, Date) => Date,
        (Timestamptz, _) | (_, Timestamptz) => Timestamptz,
        (Float8, _) | (_, Float8) => Float8,
        (Numeric, _) | (_, Numeric) => Numeric,
        (Int8, _) | (_, Int8) => Int8,
        (Int4, _) | (_, Int4) => Int4,
        (Int2, Int2) => Int2,
        (a, _) => a,
    }
}

fn first_arg(f: &Function) -> Option<&Expr> {
    match &f.args {
        FunctionArguments::List(list) => list.args.first().and_then(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
            _ => None,
        }),
        _ => None,
    }
}

fn function_type(f: &Function, scope: &Scope) -> Option<PgType> {
    let name = last_part(&f.name).to_ascii_lowercase();
    let arg = || first_arg(f).and_then(|e| expr_type(e, scope));
    Some(match name.as_str() {
        "count" | "row_number" | "rank" | "dense_rank" => PgType::Int8,
        "sum" => match arg()? {
            PgType::Int2 | PgType::Int4 => PgType::Int8,
            PgType::Float8 => PgType::Float8,
            _ => PgType::Numeric,
        },
        "avg" => match arg()? {
            PgType::Float8 => PgType::Float8,
            _ => PgType::Numeric,
        },
        "min" | "max" | "coalesce" | "abs" | "nullif" | "greatest" | "least" => return arg(),
        "array_agg" => return arg().map(PgType::array),
        "lower" | "upper" | "concat" | "trim" | "btrim" | "ltrim" | "rtrim" | "substr"
        | "substring" | "replace" | "regexp_replace" | "version" | "string_agg" | "to_char"
        | "md5" => PgType::Text,
        "current_database" | "current_schema" | "current_user" | "session_user"
        | "pg_get_userbyid" => PgType::Name,
        "pg_table_size" | "pg_relation_size" | "pg_total_relation_size" => PgType::Int8,
        "pg_get_indexdef" => PgType::Text,
        "pg_size_pretty" => PgType::Text,
        "current_setting" | "format_type" | "obj_description" | "col_description" => PgType::Text,
        "pg_table_is_visible"
        | "pg_type_is_visible"
        | "has_table_privilege"
        | "has_schema_privilege" => PgType::Bool,
        "length" | "char_length" | "pg_backend_pid" | "strpos" | "position" => PgType::Int4,
        "to_regtype" => PgType::Oid,
        "now"
        | "current_timestamp"
        | "statement_timestamp"
        | "transaction_timestamp"
        | "clock_timestamp" => PgType::Timestamptz,
        "date_trunc" | "cutover_date_trunc" | "cutover_ts_add" | "cutover_ts_text" => {
            PgType::Timestamptz
        }
        "current_date" | "cutover_current_date" | "cutover_date_add" => PgType::Date,
        "date_part" | "cutover_date_part" => PgType::Float8,
        "cutover_extract"
        | "cutover_num_add"
        | "cutover_num_sub"
        | "cutover_num_mul"
        | "cutover_sum_numeric"
        | "cutover_avg"
        | "cutover_numeric" => PgType::Numeric,
        "cutover_ts" => PgType::Int8,
        "cutover_jsonb_concat" => PgType::Jsonb,
        "cutover_bool" => PgType::Bool,
        "random" => PgType::Float8,
        "gen_random_uuid" | "uuid_generate_v4" => PgType::Uuid,
        "json_agg" | "json_build_object" | "json_build_array" | "to_json" | "json_object_agg" => {
            PgType::Json
        }
        "jsonb_agg" | "jsonb_build_object" | "jsonb_build_array" | "to_jsonb" => PgType::Jsonb,
        "cutover_json_array"
        | "cutover_json_object"
        | "cutover_json_agg"
        | "cutover_json_value"
        | "cutover_to_json" => PgType::Json,
        "round" | "trunc" | "mod" => return arg(),
        // PostgreSQL's float8 versions take integers; numeric its own.
        "ceil" | "ceiling" | "floor" => match arg()? {
            PgType::Numeric => PgType::Numeric,
            _ => PgType::Float8,
        },
        "sqrt" | "exp" | "ln" | "log" | "log10" | "power" | "pow" | "pi" | "cbrt" | "sign" => {
            PgType::Float8
        }
        "split_part"
        | "left"
        | "right"
        | "lpad"
        | "rpad"
        | "initcap"
        | "repeat"
        | "reverse"
        | "concat_ws"
        | "translate"
        | "chr"
        | "jsonb_extract_path_text"
        | "json_extract_path_text"
        | "jsonb_typeof"
        | "json_typeof" => PgType::Text,
        "character_length" | "octet_length" | "ascii" | "jsonb_array_length"
        | "json_array_length" => PgType::Int4,
        "starts_with" => PgType::Bool,
        "jsonb_set" | "jsonb_strip_nulls" => PgType::Jsonb,
        "to_timestamp" => PgType::Timestamptz,
        "pg_try_advisory_lock" | "pg_advisory_unlock" => PgType::Bool,
        "pg_advisory_lock" | "pg_advisory_unlock_all" => PgType::Text,
        _ => return None,
    })
}

fn query_first_type(q: &Query, scope: &Scope) -> Option<PgType> {
    let SetExpr::Select(s) = q.body.as_ref() else {
        return None;
    };
    let e = match s.projection.first()? {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
        _ => return None,
    };
    expr_type(e, scope).or_else(|| {
        // A column of a subquery in FROM has the type of its expression.
        let name = ident_parts(e)?.last()?.value.clone();
        s.from.iter().find_map(|f| match &f.relation {
            TableFactor::Derived { subquery, .. } => match subquery.body.as_ref() {
                SetExpr::Select(inner) => inner.projection.iter().find_map(|item| match item {
                    SelectItem::ExprWithAlias { expr, alias } if alias.value == name => {
                        expr_type(expr, scope)
                    }
                    _ => None,
                }),
                _ => None,
            },
            _ => None,
        })
    })
}

/// The types of the result columns the statement's own expressions give.
fn result_hints(statement: &Statement, scope: &Scope) -> Vec<Option<PgType>> {
    let items: &[SelectItem] = match statement {
        Statement::Query(q) => match q.body.as_ref() {
            SetExpr::Select(s) => &s.projection,
            _ => &[],
        },
        Statement::Insert(i) => i.returning.as_deref().unwrap_or(&[]),
        Statement::Update { returning, .. } => returning.as_deref().unwrap_or(&[]),
        Statement::Delete(d) => d.returning.as_deref().unwrap_or(&[]),
        _ => &[],
    };
    let mut hints = Vec::new();
    for item in items {
        match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                hints.push(expr_type(e, scope))
            }
            // A wildcard's columns come from SQLite's column metadata.
            _ => return Vec::new(),
        }
    }
    hints
}

/// Rewrites the AST for SQLite.
struct Rewrite<'s, 'a> {
    scope: &'s Scope<'a>,
    lock: Option<Lock>,
    error: Option<SqlError>,
}

impl Rewrite<'_, '_> {
    fn refuse(&mut self, construct: &str) -> ControlFlow<()> {
        if self.error.is_none() {
            self.error = Some(SqlError::unsupported(construct));
        }
        ControlFlow::Break(())
    }

    /// A boolean column used as a condition reads as its truth value,
    /// whatever form the file stores it in ('true' text is not true to
    /// SQLite).
    fn truth(&self, e: &mut Expr) {
        if let Some((PgType::Bool, codec)) = self.codec_of(e) {
            if codec != Codec::Native {
                let inner = std::mem::replace(e, Expr::value(Value::Null));
                *e = call("cutover_bool", inner);
            }
        }
    }

    /// Whether values of `e` may be stored in forms that do not compare
    /// as SQLite values (times as epoch numbers or text, booleans as
    /// text): such comparisons go through the normalizing functions.
    fn codec_of(&self, e: &Expr) -> Option<(PgType, Codec)> {
        let parts = ident_parts(e)?;
        let (_, c) = self.scope.column(&parts)?;
        Some((PgType::of_column(&c.pg_type), c.codec))
    }
}

fn call(name: &str, arg: Expr) -> Expr {
    call_with(name, vec![arg])
}

fn call2(name: &str, a: Expr, b: Expr) -> Expr {
    call_with(name, vec![a, b])
}

fn call_with(name: &str, args: Vec<Expr>) -> Expr {
    Expr::Function(Function {
        name: ObjectName(vec![ObjectNamePart::Identifier(Ident::new(name))]),
        uses_odbc_syntax: false,
        parameters: FunctionArguments::None,
        args: FunctionArguments::List(sqlparser::ast::FunctionArgumentList {
            duplicate_treatment: None,
            args: args
                .into_iter()
                .map(|a| FunctionArg::Unnamed(FunctionArgExpr::Expr(a)))
                .collect(),
            clauses: vec![],
        }),
        filter: None,
        null_treatment: None,
        over: None,
        within_group: vec![],
    })
}

/// The SQLite function that puts values of a type in one comparable form.
fn normalizer(ty: PgType) -> Option<&'static str> {
    match ty {
        PgType::Timestamptz | PgType::Timestamp => Some("cutover_ts"),
        PgType::Bool => Some("cutover_bool"),
        _ => None,
    }
}

impl VisitorMut for Rewrite<'_, '_> {
    type Break = ();

    fn pre_visit_query(&mut self, q: &mut Query) -> ControlFlow<()> {
        // OFFSET without LIMIT (Prisma's count over a skipped page): SQLite
        // wants a LIMIT, and -1 means none.
        if let Some(sqlparser::ast::LimitClause::LimitOffset {
            limit: limit @ None,
            offset: Some(_),
            ..
        }) = &mut q.limit_clause
        {
            *limit = Some(Expr::value(Value::Number("-1".to_string(), false)));
        }
        for lock in q.locks.drain(..) {
            self.lock = Some(match lock.nonblock {
                Some(sqlparser::ast::NonBlock::Nowait) => Lock::NoWait,
                Some(sqlparser::ast::NonBlock::SkipLocked) => Lock::SkipLocked,
                None => Lock::Wait,
            });
        }
        if let Some(order) = &mut q.order_by {
            if let sqlparser::ast::OrderByKind::Expressions(exprs) = &mut order.kind {
                for o in exprs.iter_mut() {
                    order_nulls_as_postgresql(o);
                    // Times stored as epoch numbers next to text sort by
                    // what they mean.
                    if let Some(f) = self.codec_of(&o.expr).and_then(|(ty, _)| normalizer(ty)) {
                        let inner = std::mem::replace(&mut o.expr, Expr::value(Value::Null));
                        o.expr = call(f, inner);
                    }
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, name: &mut ObjectName) -> ControlFlow<()> {
        strip_public(name);
        ControlFlow::Continue(())
    }

    /// `(subquery) AS t (a, b)`: SQLite takes no column list on an alias.
    /// The names go onto the subquery's own columns instead: VALUES
    /// (whose columns SQLite calls column1, column2, ...) is selected from
    /// under those names, and a SELECT's items are aliased in order.
    /// (SQLAlchemy 2 inserts ORM objects with `INSERT ... SELECT p0, ...
    /// FROM (VALUES ...) AS imp_sen (p0, ..., sen_counter)`.)
    fn pre_visit_table_factor(&mut self, f: &mut TableFactor) -> ControlFlow<()> {
        if matches!(f, TableFactor::UNNEST { .. }) {
            return self.refuse(
                "UNNEST in FROM (other than INSERT … SELECT * FROM UNNEST of array parameters)",
            );
        }
        // A session function in FROM (TypeORM's `SELECT * FROM
        // current_schema()`): one row, one column named as the function.
        if let TableFactor::Table {
            name,
            args: Some(args),
            alias,
            ..
        } = f
        {
            let function = last_part(name).to_ascii_lowercase();
            if args.args.is_empty()
                && matches!(
                    function.as_str(),
                    "current_schema"
                        | "current_database"
                        | "current_user"
                        | "session_user"
                        | "version"
                        | "pg_backend_pid"
                        | "now"
                )
            {
                let alias = alias
                    .as_ref()
                    .map(|a| a.name.clone())
                    .unwrap_or_else(|| Ident::with_quote('"', function.clone()));
                let sql = format!("SELECT {function}() AS \"{function}\"");
                if let Ok(Some(Statement::Query(q))) =
                    Parser::parse_sql(&PostgreSqlDialect {}, &sql).map(|mut s| s.pop())
                {
                    *f = TableFactor::Derived {
                        lateral: false,
                        subquery: q,
                        alias: Some(sqlparser::ast::TableAlias {
                            name: alias,
                            columns: Vec::new(),
                        }),
                    };
                }
                return ControlFlow::Continue(());
            }
        }
        let TableFactor::Derived {
            subquery,
            alias: Some(alias),
            ..
        } = f
        else {
            return ControlFlow::Continue(());
        };
        if alias.columns.is_empty() {
            return ControlFlow::Continue(());
        }
        let names: Vec<Ident> = alias.columns.drain(..).map(|c| c.name).collect();
        match subquery.body.as_mut() {
            SetExpr::Values(values)
                if values.rows.first().is_some_and(|r| r.len() == names.len()) =>
            {
                let items: Vec<String> = names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| format!("column{} AS {n}", i + 1))
                    .collect();
                let sql = format!("SELECT {} FROM ({subquery})", items.join(", "));
                match Parser::parse_sql(&PostgreSqlDialect {}, &sql).map(|mut s| s.pop()) {
                    Ok(Some(Statement::Query(q))) => *subquery = q,
                    _ => {
                        self.error =
                            Some(SqlError::unsupported("this column list on a VALUES alias"));
                        return ControlFlow::Break(());
                    }
                }
            }
            SetExpr::Select(select)
                if select.projection.len() == names.len()
                    && select.projection.iter().all(|item| {
                        matches!(
                            item,
                            SelectItem::UnnamedExpr(_) | SelectItem::ExprWithAlias { .. }
                        )
                    }) =>
            {
                for (item, name) in select.projection.iter_mut().zip(names) {
                    let expr =
                        match std::mem::replace(item, SelectItem::Wildcard(Default::default())) {
                            SelectItem::UnnamedExpr(e)
                            | SelectItem::ExprWithAlias { expr: e, .. } => e,
                            other => {
                                *item = other;
                                continue;
                            }
                        };
                    *item = SelectItem::ExprWithAlias { expr, alias: name };
                }
            }
            _ => {
                self.error = Some(SqlError::unsupported(
                    "a column list on the alias of a subquery with * or of another width",
                ));
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, q: &mut Query) -> ControlFlow<()> {
        if let SetExpr::Select(s) = q.body.as_mut() {
            for condition in [&mut s.selection, &mut s.having].into_iter().flatten() {
                self.truth(condition);
            }
        }
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, statement: &mut Statement) -> ControlFlow<()> {
        let condition = match statement {
            Statement::Update { selection, .. } => selection.as_mut(),
            Statement::Delete(d) => d.selection.as_mut(),
            _ => None,
        };
        if let Some(c) = condition {
            self.truth(c);
        }
        ControlFlow::Continue(())
    }

    /// `x = ANY(ARRAY[a, b])` is `x IN (a, b)` and `x <> ALL(ARRAY[...])`
    /// is NOT IN, rewritten before the array itself is visited.
    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        // t ± interval: the interval has no SQLite form; the whole
        // expression becomes one call before its parts are visited.
        if let Expr::BinaryOp {
            left,
            op: op @ (BinaryOperator::Plus | BinaryOperator::Minus),
            right,
        } = e
        {
            let sign = if matches!(op, BinaryOperator::Minus) {
                -1
            } else {
                1
            };
            let (time, text) = match (interval_text(left), interval_text(right)) {
                (_, Some(t)) => (
                    std::mem::replace(left.as_mut(), Expr::value(Value::Null)),
                    t,
                ),
                (Some(t), None) if sign > 0 => (
                    std::mem::replace(right.as_mut(), Expr::value(Value::Null)),
                    t,
                ),
                _ => (Expr::value(Value::Null), String::new()),
            };
            if !text.is_empty() {
                *e = call_with(
                    "cutover_ts_add",
                    vec![
                        time,
                        Expr::value(Value::SingleQuotedString(text)),
                        Expr::value(Value::Number(sign.to_string(), false)),
                    ],
                );
                return ControlFlow::Continue(());
            }
        }
        let listed = match e {
            Expr::AnyOp {
                compare_op: BinaryOperator::Eq,
                right,
                ..
            }
            | Expr::AllOp {
                compare_op: BinaryOperator::NotEq,
                right,
                ..
            } => {
                matches!(right.as_ref(), Expr::Array(_))
            }
            _ => false,
        };
        if listed {
            let negated = matches!(e, Expr::AllOp { .. });
            if let Expr::AnyOp { left, right, .. } | Expr::AllOp { left, right, .. } =
                std::mem::replace(e, Expr::value(Value::Null))
            {
                if let Expr::Array(array) = *right {
                    *e = Expr::InList {
                        expr: left,
                        list: array.elem,
                        negated,
                    };
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        match e {
            Expr::Value(v) => {
                if let Value::Placeholder(p) = &mut v.value {
                    if let Some(n) = p.strip_prefix('$') {
                        *p = format!("?{n}");
                    }
                }
            }
            Expr::CompoundIdentifier(parts) if parts.len() == 3 && parts[0].value == "public" => {
                parts.remove(0);
            }
            Expr::Cast {
                expr, data_type, ..
            } => {
                let ty = PgType::from_name(&data_type.to_string());
                let Some(ty) = ty else {
                    return self.refuse(&format!("a cast to {data_type}"));
                };
                let inner = std::mem::replace(expr.as_mut(), Expr::value(Value::Null));
                *e = match ty {
                    PgType::Int2 | PgType::Int4 | PgType::Int8 => Expr::Cast {
                        kind: CastKind::Cast,
                        expr: Box::new(call("cutover_int", inner)),
                        data_type: DataType::Integer(None),
                        format: None,
                    },
                    PgType::Float8 => Expr::Cast {
                        kind: CastKind::Cast,
                        expr: Box::new(inner),
                        data_type: DataType::Real,
                        format: None,
                    },
                    PgType::Text | PgType::Varchar | PgType::Name => Expr::Cast {
                        kind: CastKind::Cast,
                        expr: Box::new(inner),
                        data_type: DataType::Text,
                        format: None,
                    },
                    PgType::Bool => call("cutover_bool", inner),
                    PgType::Timestamptz | PgType::Timestamp => call("cutover_ts_text", inner),
                    PgType::Json | PgType::Jsonb => call("cutover_json", inner),
                    PgType::Numeric => call("cutover_numeric", inner),
                    PgType::Date
                    | PgType::Uuid
                    | PgType::Bytea
                    | PgType::Char
                    | PgType::Oid
                    | PgType::Array(_) => inner,
                };
            }
            Expr::ILike {
                negated,
                expr,
                pattern,
                escape_char,
                any,
            } => {
                if *any {
                    return self.refuse("ILIKE ANY");
                }
                let lhs = call(
                    "lower",
                    std::mem::replace(expr.as_mut(), Expr::value(Value::Null)),
                );
                let rhs = call(
                    "lower",
                    std::mem::replace(pattern.as_mut(), Expr::value(Value::Null)),
                );
                *e = Expr::Like {
                    negated: *negated,
                    any: false,
                    expr: Box::new(lhs),
                    pattern: Box::new(rhs),
                    escape_char: escape_char.clone(),
                };
            }
            Expr::BinaryOp { left, op, right } => {
                let comparison = matches!(
                    op,
                    BinaryOperator::Eq
                        | BinaryOperator::NotEq
                        | BinaryOperator::Lt
                        | BinaryOperator::LtEq
                        | BinaryOperator::Gt
                        | BinaryOperator::GtEq
                );
                if comparison {
                    // Values of unrelated types do not compare in
                    // PostgreSQL (text = integer is an error).
                    let (lt, rt) = (expr_type(left, self.scope), expr_type(right, self.scope));
                    if let (Some(l), Some(r)) = (lt, rt) {
                        if !is_string_literal(left)
                            && !is_string_literal(right)
                            && category(l) != category(r)
                        {
                            if self.error.is_none() {
                                self.error = Some(SqlError::new(
                                    "42883",
                                    format!(
                                        "operator does not exist: {} {op} {}",
                                        l.name(),
                                        r.name()
                                    ),
                                ));
                            }
                            return ControlFlow::Break(());
                        }
                    }
                    let typed = self.codec_of(left).or_else(|| self.codec_of(right));
                    if let Some(f) = typed.and_then(|(ty, _)| normalizer(ty)) {
                        for side in [&mut **left, &mut **right] {
                            let inner = std::mem::replace(side, Expr::value(Value::Null));
                            *side = call(f, inner);
                        }
                    } else {
                        for side in [&mut **left, &mut **right] {
                            if decimal_text(side) {
                                let inner = std::mem::replace(side, Expr::value(Value::Null));
                                *side = call("cutover_numeric", inner);
                            }
                        }
                    }
                }
                let (lt, rt) = (expr_type(left, self.scope), expr_type(right, self.scope));
                // Arithmetic on text, booleans or JSON is an error in
                // PostgreSQL (SQLite would coerce); a quoted literal is
                // still untyped there and adapts.
                let arithmetic_op = matches!(
                    op,
                    BinaryOperator::Plus
                        | BinaryOperator::Minus
                        | BinaryOperator::Multiply
                        | BinaryOperator::Divide
                        | BinaryOperator::Modulo
                );
                let not_a_number = |t: Option<PgType>, side: &Expr| {
                    !is_string_literal(side)
                        && matches!(
                            t,
                            Some(
                                PgType::Text
                                    | PgType::Varchar
                                    | PgType::Name
                                    | PgType::Bool
                                    | PgType::Json
                                    | PgType::Jsonb
                                    | PgType::Uuid
                                    | PgType::Bytea
                            )
                        )
                };
                if arithmetic_op && (not_a_number(lt, left) || not_a_number(rt, right)) {
                    let name = |t: Option<PgType>| t.map(PgType::name).unwrap_or("unknown");
                    if self.error.is_none() {
                        self.error = Some(SqlError::new(
                            "42883",
                            format!("operator does not exist: {} {op} {}", name(lt), name(rt)),
                        ));
                    }
                    return ControlFlow::Break(());
                }
                let exact = match op {
                    BinaryOperator::Plus => Some("cutover_num_add"),
                    BinaryOperator::Minus => Some("cutover_num_sub"),
                    BinaryOperator::Multiply => Some("cutover_num_mul"),
                    _ => None,
                };
                // date ± integer is a date.
                if lt == Some(PgType::Date) && rt.is_some_and(PgType::is_integer) {
                    if let BinaryOperator::Plus | BinaryOperator::Minus = op {
                        let l = std::mem::replace(left.as_mut(), Expr::value(Value::Null));
                        let mut r = std::mem::replace(right.as_mut(), Expr::value(Value::Null));
                        if matches!(op, BinaryOperator::Minus) {
                            r = Expr::UnaryOp {
                                op: UnaryOperator::Minus,
                                expr: Box::new(Expr::Nested(Box::new(r))),
                            };
                        }
                        *e = call2("cutover_date_add", l, r);
                        return ControlFlow::Continue(());
                    }
                }
                // numeric arithmetic in exact decimals (the file may hold
                // the values as doubles: 0.1 + 0.2 must be 0.3).
                if let Some(f) =
                    exact.filter(|_| lt == Some(PgType::Numeric) || rt == Some(PgType::Numeric))
                {
                    if lt != Some(PgType::Float8) && rt != Some(PgType::Float8) {
                        let l = std::mem::replace(left.as_mut(), Expr::value(Value::Null));
                        let r = std::mem::replace(right.as_mut(), Expr::value(Value::Null));
                        *e = call2(f, l, r);
                        return ControlFlow::Continue(());
                    }
                }
                // jsonb || jsonb merges objects and concatenates arrays;
                // SQLite's || would join the texts.
                if matches!(op, BinaryOperator::StringConcat)
                    && (lt == Some(PgType::Jsonb) || rt == Some(PgType::Jsonb))
                {
                    let l = std::mem::replace(left.as_mut(), Expr::value(Value::Null));
                    let r = std::mem::replace(right.as_mut(), Expr::value(Value::Null));
                    *e = call2("cutover_jsonb_concat", l, r);
                    return ControlFlow::Continue(());
                }
                if matches!(op, BinaryOperator::Divide) {
                    let l = std::mem::replace(left.as_mut(), Expr::value(Value::Null));
                    let r = std::mem::replace(right.as_mut(), Expr::value(Value::Null));
                    *e = call2("cutover_div", l, r);
                    return ControlFlow::Continue(());
                }
                if matches!(op, BinaryOperator::And | BinaryOperator::Or) {
                    for side in [&mut **left, &mut **right] {
                        self.truth(side);
                    }
                    return ControlFlow::Continue(());
                }
                let regex = match op {
                    BinaryOperator::PGRegexMatch => Some((false, false)),
                    BinaryOperator::PGRegexIMatch => Some((true, false)),
                    BinaryOperator::PGRegexNotMatch => Some((false, true)),
                    BinaryOperator::PGRegexNotIMatch => Some((true, true)),
                    // psql spells them OPERATOR(pg_catalog.~).
                    BinaryOperator::PGCustomBinaryOperator(parts) if matches!(parts.as_slice(), [s, _] if s == "pg_catalog") => {
                        match parts[1].as_str() {
                            "~" => Some((false, false)),
                            "~*" => Some((true, false)),
                            "!~" => Some((false, true)),
                            "!~*" => Some((true, true)),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                if let Some((insensitive, negated)) = regex {
                    // Text only, as in PostgreSQL (integer ~ text is 42883).
                    if let Some(t) = expr_type(left, self.scope) {
                        if category(t) != 'S' {
                            if self.error.is_none() {
                                self.error = Some(SqlError::new(
                                    "42883",
                                    format!("operator does not exist: {} ~ unknown", t.name()),
                                ));
                            }
                            return ControlFlow::Break(());
                        }
                    }
                    let l = std::mem::replace(left.as_mut(), Expr::value(Value::Null));
                    let r = std::mem::replace(right.as_mut(), Expr::value(Value::Null));
                    let flag = Expr::value(Value::Number(
                        if insensitive { "1" } else { "0" }.to_string(),
                        false,
                    ));
                    let test = call_with("cutover_regex", vec![l, r, flag]);
                    *e = if negated {
                        Expr::UnaryOp {
                            op: sqlparser::ast::UnaryOperator::Not,
                            expr: Box::new(Expr::Nested(Box::new(test))),
                        }
                    } else {
                        test
                    };
                    return ControlFlow::Continue(());
                }
                // jsonb's path, containment and key operators.
                let json = match op {
                    BinaryOperator::HashArrow => Some(("cutover_json_path", Some("0"))),
                    BinaryOperator::HashLongArrow => Some(("cutover_json_path", Some("1"))),
                    BinaryOperator::AtArrow | BinaryOperator::ArrowAt => {
                        Some(("cutover_jsonb_contains", None))
                    }
                    BinaryOperator::Question => Some(("cutover_jsonb_exists", Some("'one'"))),
                    BinaryOperator::QuestionPipe => Some(("cutover_jsonb_exists", Some("'any'"))),
                    BinaryOperator::QuestionAnd => Some(("cutover_jsonb_exists", Some("'all'"))),
                    _ => None,
                };
                if let Some((f, extra)) = json {
                    let mut l = std::mem::replace(left.as_mut(), Expr::value(Value::Null));
                    let mut r = std::mem::replace(right.as_mut(), Expr::value(Value::Null));
                    if matches!(op, BinaryOperator::ArrowAt) {
                        std::mem::swap(&mut l, &mut r);
                    }
                    let mut args = vec![l, r];
                    if let Some(extra) = extra {
                        match Parser::new(&PostgreSqlDialect {})
                            .try_with_sql(extra)
                            .and_then(|mut p| p.parse_expr())
                        {
                            Ok(x) => args.push(x),
                            Err(_) => return self.refuse("a jsonb operator"),
                        }
                    }
                    *e = call_with(f, args);
                    return ControlFlow::Continue(());
                }
                if matches!(
                    op,
                    BinaryOperator::HashMinus
                        | BinaryOperator::AtQuestion
                        | BinaryOperator::AtAt
                        | BinaryOperator::PGOverlap
                        | BinaryOperator::PGStartsWith
                        | BinaryOperator::PGExp
                        | BinaryOperator::PGBitwiseXor
                        | BinaryOperator::PGCustomBinaryOperator(_)
                        | BinaryOperator::Custom(_)
                        | BinaryOperator::Spaceship
                        | BinaryOperator::Xor
                        | BinaryOperator::Overlaps
                        | BinaryOperator::DoubleHash
                        | BinaryOperator::LtDashGt
                        | BinaryOperator::AndLt
                        | BinaryOperator::AndGt
                        | BinaryOperator::LtLtPipe
                        | BinaryOperator::PipeGtGt
                ) {
                    return self.refuse(&format!("the operator {op}"));
                }
            }
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr,
            } => self.truth(expr),
            // x = ANY($1): the array arrives as JSON (see bind), and SQLite
            // reads it with json_each.
            Expr::AnyOp {
                compare_op: BinaryOperator::Eq,
                right,
                ..
            }
            | Expr::AllOp {
                compare_op: BinaryOperator::NotEq,
                right,
                ..
            } if placeholder_text(right).is_some() => {
                let negated = matches!(e, Expr::AllOp { .. });
                let (Expr::AnyOp { left, right, .. } | Expr::AllOp { left, right, .. }) =
                    std::mem::replace(e, Expr::value(Value::Null))
                else {
                    return ControlFlow::Continue(());
                };
                let Some(p) = placeholder_text(&right) else {
                    return ControlFlow::Continue(());
                };
                let normal = self.codec_of(&left).and_then(|(ty, _)| normalizer(ty));
                let (lhs, value) = match normal {
                    Some(f) => (call(f, *left), format!("{f}(value)")),
                    None => (*left, "value".to_string()),
                };
                let sql = format!("SELECT {value} FROM json_each({p})");
                let Ok(Some(Statement::Query(q))) =
                    Parser::parse_sql(&sqlparser::dialect::SQLiteDialect {}, &sql)
                        .map(|mut v| v.pop())
                else {
                    return self.refuse("= ANY over this array");
                };
                *e = Expr::InSubquery {
                    expr: Box::new(lhs),
                    subquery: q,
                    negated,
                };
            }
            Expr::AnyOp { .. } | Expr::AllOp { .. } => return self.refuse("= ANY/ALL over arrays"),
            Expr::Array(_) => return self.refuse("ARRAY values"),
            Expr::Interval(_) => return self.refuse("INTERVAL arithmetic"),
            Expr::Function(f)
                if matches!(f.args, FunctionArguments::None)
                    && last_part(&f.name).eq_ignore_ascii_case("current_timestamp") =>
            {
                *e = call_with("now", vec![]);
            }
            Expr::Function(f)
                if matches!(f.args, FunctionArguments::None)
                    && last_part(&f.name).eq_ignore_ascii_case("current_date") =>
            {
                *e = call_with("cutover_current_date", vec![]);
            }
            // SQL's keyword forms, as SQLite's functions.
            Expr::Position { expr, r#in } => {
                let needle = std::mem::replace(expr.as_mut(), Expr::value(Value::Null));
                let haystack = std::mem::replace(r#in.as_mut(), Expr::value(Value::Null));
                *e = call2("strpos", haystack, needle);
            }
            Expr::Substring {
                expr,
                substring_from,
                substring_for,
                ..
            } => {
                let mut args = vec![std::mem::replace(expr.as_mut(), Expr::value(Value::Null))];
                args.push(
                    substring_from
                        .take()
                        .map_or(Expr::value(Value::Number("1".into(), false)), |f| *f),
                );
                if let Some(n) = substring_for.take() {
                    args.push(*n);
                }
                *e = call_with("substr", args);
            }
            Expr::Extract { field, expr, .. } => {
                let date = expr_type(expr, self.scope) == Some(PgType::Date);
                let inner = std::mem::replace(expr.as_mut(), Expr::value(Value::Null));
                *e = call_with(
                    "cutover_extract",
                    vec![
                        Expr::value(Value::SingleQuotedString(field.to_string())),
                        inner,
                        Expr::value(Value::Boolean(date)),
                    ],
                );
            }
            Expr::Function(f) if last_part(&f.name).eq_ignore_ascii_case("pg_get_indexdef") => {
                // The catalog keeps each index's definition; only the
                // whole definition is given (not one column's).
                let Some(index) = first_arg(f).cloned() else {
                    return self.refuse("pg_get_indexdef()");
                };
                let template = "SELECT def FROM pg_catalog.cutover_indexdef WHERE oid = NULL";
                let Ok(Some(Statement::Query(mut q))) =
                    Parser::parse_sql(&PostgreSqlDialect {}, template).map(|mut s| s.pop())
                else {
                    return self.refuse("pg_get_indexdef()");
                };
                if let SetExpr::Select(select) = q.body.as_mut() {
                    if let Some(Expr::BinaryOp { right, .. }) = &mut select.selection {
                        **right = index;
                    }
                }
                *e = Expr::Subquery(q);
            }
            Expr::Function(f) => {
                let name = last_part(&f.name).to_ascii_lowercase();
                if name == "date_trunc" {
                    f.name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(
                        "cutover_date_trunc",
                    ))]);
                    return ControlFlow::Continue(());
                }
                if name == "date_part" {
                    let is_date = match &f.args {
                        FunctionArguments::List(list) => list.args.get(1).is_some_and(|a| {
                            matches!(a, FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) if expr_type(x, self.scope) == Some(PgType::Date))
                        }),
                        _ => false,
                    };
                    if let FunctionArguments::List(list) = &mut f.args {
                        list.args
                            .push(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::value(
                                Value::Boolean(is_date),
                            ))));
                    }
                    f.name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(
                        "cutover_date_part",
                    ))]);
                    return ControlFlow::Continue(());
                }
                // pg_catalog.version(): SQLite functions have no schema.
                if f.name.0.len() == 2
                    && f.name.0[0]
                        .as_ident()
                        .is_some_and(|i| i.value.eq_ignore_ascii_case("pg_catalog"))
                {
                    f.name.0.remove(0);
                }
                // sum and avg over numerics in exact decimal arithmetic.
                let arg = first_arg(f).and_then(|a| expr_type(a, self.scope));
                let exact = match (name.as_str(), arg) {
                    ("sum", Some(PgType::Numeric)) => Some("cutover_sum_numeric"),
                    ("avg", Some(t)) if t.is_integer() || t == PgType::Numeric => {
                        Some("cutover_avg")
                    }
                    _ => None,
                };
                // Computed in doubles: a numeric argument would get a
                // double's digits, not PostgreSQL's numeric result.
                if matches!(
                    name.as_str(),
                    "sqrt" | "exp" | "ln" | "log" | "log10" | "power" | "pow" | "cbrt"
                ) && arg == Some(PgType::Numeric)
                {
                    return self.refuse(&format!(
                        "{name}() of numeric (cast it to double precision)"
                    ));
                }
                if name == "to_char"
                    && !matches!(
                        arg,
                        Some(PgType::Timestamptz | PgType::Timestamp | PgType::Date)
                    )
                {
                    // PostgreSQL has no to_char of text or booleans.
                    if let Some(t) =
                        arg.filter(|t| matches!(category(*t), 'S' | 'B' | 'J' | 'j' | 'U' | 'X'))
                    {
                        if self.error.is_none() {
                            self.error = Some(SqlError::new(
                                "42883",
                                format!("function to_char({}, unknown) does not exist", t.name()),
                            ));
                        }
                        return ControlFlow::Break(());
                    }
                    return self.refuse(&format!(
                        "to_char of {}",
                        arg.map(|t| t.name())
                            .unwrap_or("an expression of unknown type")
                    ));
                }
                if name == "string_agg" {
                    f.name =
                        ObjectName(vec![ObjectNamePart::Identifier(Ident::new("group_concat"))]);
                    return ControlFlow::Continue(());
                }
                if name == "array_agg" {
                    // Arrays of what PostgreSQL and the file spell alike
                    // (catalog queries aggregate names and numbers).
                    let ok = matches!(
                        arg,
                        Some(
                            PgType::Int2
                                | PgType::Int4
                                | PgType::Int8
                                | PgType::Oid
                                | PgType::Text
                                | PgType::Varchar
                                | PgType::Name
                        )
                    );
                    if !ok || f.over.is_some() {
                        return self.refuse(&format!(
                            "array_agg of {}",
                            arg.map(|t| t.name())
                                .unwrap_or("an expression of unknown type")
                        ));
                    }
                    f.name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(
                        "cutover_array_agg",
                    ))]);
                    return ControlFlow::Continue(());
                }
                if let Some(json) = json_function(&name) {
                    // Each argument becomes JSON text the way PostgreSQL
                    // renders its type; the functions only assemble.
                    if let FunctionArguments::List(list) = &mut f.args {
                        for arg in &mut list.args {
                            if let FunctionArg::Unnamed(FunctionArgExpr::Expr(a)) = arg {
                                let ty = expr_type(a, self.scope);
                                let inner = std::mem::replace(a, Expr::value(Value::Null));
                                *a = call2(
                                    "cutover_to_json",
                                    inner,
                                    Expr::value(Value::SingleQuotedString(
                                        ty.map(|t| t.name()).unwrap_or("unknown").to_string(),
                                    )),
                                );
                            }
                        }
                    }
                    f.name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(json))]);
                    return ControlFlow::Continue(());
                }
                if let Some(exact) = exact {
                    if f.over.is_some() {
                        return self
                            .refuse(&format!("{name}() as a window function over numerics"));
                    }
                    f.name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(exact))]);
                    return ControlFlow::Continue(());
                }
                if f.over.is_some()
                    && !matches!(
                        name.as_str(),
                        "row_number"
                            | "rank"
                            | "dense_rank"
                            | "count"
                            | "sum"
                            | "avg"
                            | "min"
                            | "max"
                            | "lag"
                            | "lead"
                            | "first_value"
                            | "last_value"
                    )
                {
                    return self.refuse(&format!("window function {name}"));
                }
                if !known_function(&name) {
                    return self.refuse(&format!("function {name}()"));
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// The engine's function for one of PostgreSQL's JSON constructors.
fn json_function(name: &str) -> Option<&'static str> {
    Some(match name {
        "json_build_array" | "jsonb_build_array" => "cutover_json_array",
        "json_build_object" | "jsonb_build_object" => "cutover_json_object",
        "json_agg" | "jsonb_agg" => "cutover_json_agg",
        "to_json" | "to_jsonb" => "cutover_json_value",
        _ => return None,
    })
}

/// Whether a statement may call `name`.
fn known_function(name: &str) -> bool {
    KNOWN_FUNCTIONS.contains(&name)
}

/// Functions SQLite or the engine provides with PostgreSQL's meaning
/// (the engine's own `cutover_*` helpers included).
const KNOWN_FUNCTIONS: &[&str] = &[
    "substr",
    "substring",
    // builtins.rs
    "to_char",
    "split_part",
    "strpos",
    "left",
    "right",
    "lpad",
    "rpad",
    "initcap",
    "repeat",
    "reverse",
    "concat_ws",
    "char_length",
    "character_length",
    "octet_length",
    "translate",
    "btrim",
    "starts_with",
    "md5",
    "chr",
    "ascii",
    "ceil",
    "ceiling",
    "floor",
    "sign",
    "exp",
    "cbrt",
    "sqrt",
    "ln",
    "log",
    "log10",
    "power",
    "pow",
    "pi",
    "mod",
    "trunc",
    "jsonb_array_length",
    "json_array_length",
    "jsonb_typeof",
    "json_typeof",
    "jsonb_extract_path_text",
    "json_extract_path_text",
    "jsonb_strip_nulls",
    "jsonb_set",
    "clock_timestamp",
    "to_timestamp",
    "regexp_replace",
    "array_agg",
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "coalesce",
    "nullif",
    "abs",
    "lower",
    "upper",
    "length",
    "replace",
    "trim",
    "ltrim",
    "rtrim",
    "round",
    "row_number",
    "rank",
    "dense_rank",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "now",
    "current_timestamp",
    "version",
    "current_database",
    "current_schema",
    "current_user",
    "session_user",
    "pg_backend_pid",
    "gen_random_uuid",
    "uuid_generate_v4",
    "random",
    "greatest",
    "least",
    "concat",
    "transaction_timestamp",
    "statement_timestamp",
    "pg_try_advisory_lock",
    "pg_advisory_lock",
    "pg_advisory_unlock",
    "pg_advisory_unlock_all",
    "current_setting",
    "pg_table_is_visible",
    "pg_type_is_visible",
    "has_table_privilege",
    "has_schema_privilege",
    "pg_get_userbyid",
    "pg_table_size",
    "pg_relation_size",
    "pg_total_relation_size",
    "pg_size_pretty",
    "obj_description",
    "col_description",
    "format_type",
    "to_regtype",
    "cutover_json_path",
    "cutover_jsonb_contains",
    "cutover_jsonb_exists",
    "cutover_ts",
    "cutover_bool",
    "cutover_int",
    "cutover_ts_text",
    "cutover_json",
    "cutover_numeric",
    "cutover_store",
    "cutover_div",
    "cutover_sum_numeric",
    "cutover_avg",
    "cutover_to_json",
    "cutover_json_array",
    "cutover_json_object",
    "cutover_json_agg",
    "cutover_json_value",
    "cutover_num_add",
    "cutover_num_sub",
    "cutover_num_mul",
    "cutover_ts_add",
    "cutover_date_add",
    "cutover_current_date",
    "cutover_date_trunc",
    "cutover_extract",
    "cutover_date_part",
    "cutover_jsonb_concat",
];

fn strip_public(name: &mut ObjectName) {
    if name.0.len() == 2 {
        if let Some(first) = name.0[0].as_ident() {
            if first.value == "public" {
                name.0.remove(0);
            }
        }
    }
}

/// PostgreSQL sorts NULLs last ascending and first descending; SQLite the
/// other way round. Unless the statement says, say it for SQLite.
fn order_nulls_as_postgresql(o: &mut OrderByExpr) {
    if o.options.nulls_first.is_none() {
        let descending = o.options.asc == Some(false);
        o.options.nulls_first = Some(descending);
    }
}

/// `SELECT DISTINCT ON (k) ... ORDER BY k, o` keeps the first row of each
/// k in the ORDER BY's order; SQLite has no DISTINCT ON, so the same is
/// asked with window functions: number the rows within each k in that
/// order, keep the first, and keep the ORDER BY's order overall.
fn distinct_on(statement: &mut Statement) -> Result<(), SqlError> {
    let Statement::Query(q) = statement else {
        return Ok(());
    };
    let SetExpr::Select(select) = q.body.as_mut() else {
        return Ok(());
    };
    let Some(sqlparser::ast::Distinct::On(keys)) = select.distinct.take() else {
        return Ok(());
    };
    let mut items = Vec::new();
    for item in &select.projection {
        match item {
            SelectItem::ExprWithAlias { expr, alias } => {
                items.push((expr.clone(), alias.value.clone()))
            }
            SelectItem::UnnamedExpr(e) => {
                items.push((e.clone(), column_name(e).unwrap_or_default()))
            }
            _ => return Err(SqlError::unsupported("SELECT DISTINCT ON with *")),
        }
    }
    // ORDER BY may name an output column; the window needs its expression.
    let order: Vec<String> = match q.order_by.take() {
        Some(order) => match order.kind {
            sqlparser::ast::OrderByKind::Expressions(exprs) => exprs
                .into_iter()
                .map(|mut o| {
                    if let Expr::Identifier(i) = &o.expr {
                        if let Some((e, _)) = items.iter().find(|(_, name)| *name == i.value) {
                            o.expr = e.clone();
                        }
                    }
                    order_nulls_as_postgresql(&mut o);
                    o.to_string()
                })
                .collect(),
            _ => return Err(SqlError::unsupported("ORDER BY ALL with DISTINCT ON")),
        },
        None => Vec::new(),
    };
    let order_clause = if order.is_empty() {
        String::new()
    } else {
        format!(" ORDER BY {}", order.join(", "))
    };
    let partition: Vec<String> = keys.iter().map(ToString::to_string).collect();
    let mut inner = select.clone();
    inner.projection = items
        .iter()
        .enumerate()
        .map(|(i, (e, _))| SelectItem::ExprWithAlias {
            expr: e.clone(),
            alias: Ident::with_quote('"', format!("__c{i}")),
        })
        .collect();
    let outer_columns: Vec<String> = items
        .iter()
        .enumerate()
        .map(|(i, (_, name))| format!("\"__c{i}\" AS {}", Ident::with_quote('"', name.clone())))
        .collect();
    let tail = q
        .limit_clause
        .as_ref()
        .map(|l| format!(" {l}"))
        .unwrap_or_default();
    let sql = format!(
        "SELECT {} FROM (SELECT {}, row_number() OVER (PARTITION BY {}{order_clause}) AS \"__rn\", row_number() OVER ({}) AS \"__ord\" FROM {}) AS \"__d\" WHERE \"__rn\" = 1 ORDER BY \"__ord\"{tail}",
        outer_columns.join(", "),
        inner.projection.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        partition.join(", "),
        order_clause.trim_start(),
        inner_from(&inner),
    );
    let mut parsed = Parser::parse_sql(&PostgreSqlDialect {}, &sql).map_err(parse_error)?;
    match parsed.pop() {
        Some(rebuilt @ Statement::Query(_)) => {
            *statement = rebuilt;
            Ok(())
        }
        _ => Err(SqlError::unsupported("this SELECT DISTINCT ON")),
    }
}

/// A SELECT's text from FROM on (FROM, WHERE, GROUP BY, HAVING).
fn inner_from(select: &Select) -> String {
    let mut s = select
        .from
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if let Some(w) = &select.selection {
        s.push_str(&format!(" WHERE {w}"));
    }
    if let sqlparser::ast::GroupByExpr::Expressions(exprs, _) = &select.group_by {
        if !exprs.is_empty() {
            s.push_str(&format!(
                " GROUP BY {}",
                exprs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if let Some(h) = &select.having {
        s.push_str(&format!(" HAVING {h}"));
    }
    s
}

/// `LEFT JOIN LATERAL (SELECT agg(...) ...) x ON true`, the shape ORMs
/// (drizzle's relational queries) use to nest rows as JSON, has no SQLite
/// spelling; a lateral subquery that yields one row is the same as scalar
/// subqueries in place of its columns, which SQLite runs (correlated to
/// the outer row). Laterals that may yield several rows are refused.
fn unnest_laterals(statement: &mut Statement) -> Result<(), SqlError> {
    struct Unnest {
        error: Option<SqlError>,
    }
    impl VisitorMut for Unnest {
        type Break = ();
        fn pre_visit_query(&mut self, q: &mut Query) -> ControlFlow<()> {
            let SetExpr::Select(select) = q.body.as_mut() else {
                return ControlFlow::Continue(());
            };
            let mut laterals: Vec<(String, Query)> = Vec::new();
            for from in &mut select.from {
                let mut kept = Vec::new();
                for join in from.joins.drain(..) {
                    let on_true = match &join.join_operator {
                        sqlparser::ast::JoinOperator::Left(c)
                        | sqlparser::ast::JoinOperator::LeftOuter(c)
                        | sqlparser::ast::JoinOperator::Inner(c)
                        | sqlparser::ast::JoinOperator::Join(c) => matches!(
                            c,
                            sqlparser::ast::JoinConstraint::On(Expr::Value(v)) if v.value == Value::Boolean(true)
                        ),
                        sqlparser::ast::JoinOperator::CrossJoin(_) => true,
                        _ => false,
                    };
                    match join.relation {
                        TableFactor::Derived {
                            lateral: true,
                            subquery,
                            alias,
                        } => {
                            let Some(alias) = alias.filter(|_| on_true) else {
                                self.error = Some(SqlError::unsupported(
                                    "a LATERAL join other than ... ON true with an alias",
                                ));
                                return ControlFlow::Break(());
                            };
                            if !yields_one_row(&subquery) {
                                self.error = Some(SqlError::unsupported(
                                    "a LATERAL subquery that may return several rows",
                                ));
                                return ControlFlow::Break(());
                            }
                            laterals.push((alias.name.value.clone(), *subquery));
                        }
                        relation => kept.push(sqlparser::ast::Join { relation, ..join }),
                    }
                }
                from.joins = kept;
            }
            if laterals.is_empty() {
                return ControlFlow::Continue(());
            }
            let mut replace = ReplaceLateral {
                laterals: &laterals,
            };
            for item in &mut select.projection {
                let _ = item.visit(&mut replace);
            }
            for e in [&mut select.selection, &mut select.having]
                .into_iter()
                .flatten()
            {
                let _ = e.visit(&mut replace);
            }
            if let Some(order) = &mut q.order_by {
                let _ = order.visit(&mut replace);
            }
            ControlFlow::Continue(())
        }
    }
    struct ReplaceLateral<'l> {
        laterals: &'l [(String, Query)],
    }
    impl VisitorMut for ReplaceLateral<'_> {
        type Break = ();
        fn post_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
            if let Expr::CompoundIdentifier(parts) = e {
                if let [table, column] = parts.as_slice() {
                    if let Some((alias, sub)) =
                        self.laterals.iter().find(|(a, _)| *a == table.value)
                    {
                        let sql = format!(
                            "SELECT {} FROM ({sub}) AS {}",
                            Ident::with_quote('"', column.value.clone()),
                            Ident::with_quote('"', alias.clone())
                        );
                        if let Ok(mut parsed) = Parser::parse_sql(&PostgreSqlDialect {}, &sql) {
                            if let Some(Statement::Query(q)) = parsed.pop() {
                                *e = Expr::Subquery(q);
                            }
                        }
                    }
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut unnest = Unnest { error: None };
    let _ = statement.visit(&mut unnest);
    match unnest.error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A query that returns at most one row: aggregates without GROUP BY, or
/// LIMIT 1.
fn yields_one_row(q: &Query) -> bool {
    if let Some(sqlparser::ast::LimitClause::LimitOffset {
        limit: Some(Expr::Value(v)),
        ..
    }) = &q.limit_clause
    {
        if v.value == Value::Number("1".to_string(), false) {
            return true;
        }
    }
    let SetExpr::Select(s) = q.body.as_ref() else {
        return false;
    };
    let grouped =
        !matches!(&s.group_by, sqlparser::ast::GroupByExpr::Expressions(e, _) if e.is_empty());
    !grouped
        && !s.projection.is_empty()
        && s.projection.iter().all(|item| match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                is_aggregate(e)
            }
            _ => false,
        })
}

fn is_aggregate(e: &Expr) -> bool {
    match e {
        Expr::Nested(inner) => is_aggregate(inner),
        Expr::Cast { expr, .. } => is_aggregate(expr),
        Expr::Function(f) => {
            let name = last_part(&f.name).to_ascii_lowercase();
            matches!(
                name.as_str(),
                "count"
                    | "sum"
                    | "avg"
                    | "min"
                    | "max"
                    | "json_agg"
                    | "jsonb_agg"
                    | "string_agg"
                    | "bool_and"
                    | "bool_or"
            ) || (matches!(name.as_str(), "coalesce") && first_arg(f).is_some_and(is_aggregate))
        }
        _ => false,
    }
}

/// PostgreSQL's name for an unnamed result column (FigureColname): the
/// column's or function's name, `case`, `exists`, a cast's type, else
/// `?column?`.
fn column_name(e: &Expr) -> Option<String> {
    Some(match e {
        Expr::Identifier(i) => i.value.clone(),
        Expr::CompoundIdentifier(parts) => parts.last()?.value.clone(),
        Expr::Nested(inner) => return column_name(inner),
        Expr::Function(f) => last_part(&f.name).to_ascii_lowercase(),
        Expr::Case { .. } => "case".to_string(),
        Expr::Exists { .. } => "exists".to_string(),
        Expr::Position { .. } => "position".to_string(),
        Expr::Substring { .. } => "substring".to_string(),
        Expr::Ceil { .. } => "ceil".to_string(),
        Expr::Floor { .. } => "floor".to_string(),
        Expr::Value(v) if matches!(v.value, Value::Boolean(_)) => "bool".to_string(),
        Expr::Cast {
            expr, data_type, ..
        } => match column_name(expr) {
            Some(n) if n != "?column?" => n,
            _ => PgType::from_name(&data_type.to_string())
                .map(PgType::short_name)
                .unwrap_or("?column?")
                .to_string(),
        },
        Expr::Subquery(q) => match q.body.as_ref() {
            SetExpr::Select(s) => match s.projection.first()? {
                SelectItem::ExprWithAlias { alias, .. } => alias.value.clone(),
                SelectItem::UnnamedExpr(e) => return column_name(e),
                _ => "?column?".to_string(),
            },
            _ => "?column?".to_string(),
        },
        _ => "?column?".to_string(),
    })
}

/// Gives every unnamed result column PostgreSQL's name for it, so SQLite
/// reports the same names (it would say `count(*)`).
fn name_columns(statement: &mut Statement) {
    fn name_items(items: &mut [SelectItem]) {
        for item in items {
            // An unquoted alias is folded to lower case, as PostgreSQL
            // folds it, and quoted, so that a keyword of SQLite's
            // (Sequelize's `AS primary`) stays a name.
            if let SelectItem::ExprWithAlias { alias, .. } = item {
                if alias.quote_style.is_none() {
                    *alias = Ident::with_quote('"', alias.value.to_lowercase());
                }
            }
            if let SelectItem::UnnamedExpr(e) = item {
                if let Some(name) = column_name(e) {
                    let expr = std::mem::replace(e, Expr::value(Value::Null));
                    *item = SelectItem::ExprWithAlias {
                        expr,
                        alias: Ident::with_quote('"', name),
                    };
                }
            }
        }
    }
    fn first_select(body: &mut SetExpr) -> Option<&mut Select> {
        match body {
            SetExpr::Select(s) => Some(s),
            SetExpr::SetOperation { left, .. } => first_select(left),
            SetExpr::Query(q) => first_select(&mut q.body),
            _ => None,
        }
    }
    match statement {
        Statement::Query(q) => {
            if let Some(s) = first_select(&mut q.body) {
                name_items(&mut s.projection);
            }
        }
        Statement::Insert(i) => {
            if let Some(r) = &mut i.returning {
                name_items(r);
            }
        }
        Statement::Update {
            returning: Some(r), ..
        } => name_items(r),
        Statement::Delete(d) => {
            if let Some(r) = &mut d.returning {
                name_items(r);
            }
        }
        _ => {}
    }
}

/// Values written to a column whose file stores them in a form of its own
/// (epoch milliseconds, 0/1, 'true'/'false', ...) pass through
/// `cutover_store`, so the file keeps its conventions whatever form the
/// value arrives in.
fn store_in_codecs(statement: &mut Statement, scope: &Scope) {
    let wrap = |e: &mut Expr, table: &Table, column: &str| {
        let Some(c) = table.columns.iter().find(|c| c.name == column) else {
            return;
        };
        // integer and smallint columns (declared through the engine, or
        // set by the configuration) hold PostgreSQL's ranges.
        let bits = match c.pg_type.as_str() {
            "integer" => Some("32"),
            "smallint" => Some("16"),
            _ => None,
        };
        if let Some(bits) = bits.filter(|_| c.codec == Codec::Native) {
            let inner = std::mem::replace(e, Expr::value(Value::Null));
            *e = call2(
                "cutover_int_range",
                inner,
                Expr::value(Value::Number(bits.to_string(), false)),
            );
            return;
        }
        if c.codec == Codec::Native || c.codec == Codec::JsonText || c.codec == Codec::DateText {
            return;
        }
        let inner = std::mem::replace(e, Expr::value(Value::Null));
        *e = call2(
            "cutover_store",
            inner,
            Expr::value(Value::SingleQuotedString(c.codec.name().to_string())),
        );
    };
    let assignments = |list: &mut Vec<sqlparser::ast::Assignment>, table: &Table| {
        for a in list.iter_mut() {
            if let sqlparser::ast::AssignmentTarget::ColumnName(col) = &a.target {
                let col = last_part(col);
                wrap(&mut a.value, table, &col);
            }
        }
    };
    match statement {
        Statement::Insert(insert) => {
            let table = match &insert.table {
                sqlparser::ast::TableObject::TableName(n) => scope.table(&last_part(n)),
                _ => None,
            };
            let Some(table) = table else { return };
            let columns: Vec<String> = if insert.columns.is_empty() {
                table.columns.iter().map(|c| c.name.clone()).collect()
            } else {
                insert.columns.iter().map(|c| c.value.clone()).collect()
            };
            if let Some(source) = &mut insert.source {
                match source.body.as_mut() {
                    SetExpr::Values(values) => {
                        for row in &mut values.rows {
                            for (i, e) in row.iter_mut().enumerate() {
                                if let Some(col) = columns.get(i) {
                                    wrap(e, table, col);
                                }
                            }
                        }
                    }
                    // INSERT … SELECT: each selected expression goes into
                    // its column (a `*` is left as SQLite expands it).
                    SetExpr::Select(select) => {
                        for (i, item) in select.projection.iter_mut().enumerate() {
                            let (SelectItem::UnnamedExpr(e)
                            | SelectItem::ExprWithAlias { expr: e, .. }) = item
                            else {
                                continue;
                            };
                            if let Some(col) = columns.get(i) {
                                wrap(e, table, col);
                            }
                        }
                    }
                    _ => {}
                }
            }
            if let Some(sqlparser::ast::OnInsert::OnConflict(oc)) = &mut insert.on {
                if let sqlparser::ast::OnConflictAction::DoUpdate(du) = &mut oc.action {
                    assignments(&mut du.assignments, table);
                }
            }
        }
        Statement::Update {
            table,
            assignments: list,
            ..
        } => {
            if let TableFactor::Table { name, .. } = &table.relation {
                if let Some(t) = scope.table(&last_part(name)) {
                    assignments(list, t);
                }
            }
        }
        _ => {}
    }
}

/// A column's default as the file declares it, as an expression SQLite
/// evaluates (NULL when it declares none).
fn file_default(declared: Option<&str>) -> Result<Expr, SqlError> {
    let Some(declared) = declared else {
        return Ok(Expr::Value(sqlparser::ast::Value::Null.into()));
    };
    let dialect = sqlparser::dialect::SQLiteDialect {};
    Parser::new(&dialect)
        .try_with_sql(declared)
        .and_then(|mut p| p.parse_expr())
        .map_err(|_| {
            SqlError::unsupported(format!(
                "DEFAULT in some rows of a multi-row VALUES into a column whose default ({declared}) cutover cannot read"
            ))
        })
}

/// `VALUES (DEFAULT, $1)`: SQLite has no DEFAULT there, so a column that
/// is DEFAULT in every row is left out of the INSERT, and a column that is
/// DEFAULT in some rows only (TypeORM's multi-row save) gets the file's
/// default expression there, or NULL without one (a rowid alias then takes
/// the next id, as SQLite gives it).
fn drop_default_columns(
    insert: &mut sqlparser::ast::Insert,
    scope: &Scope<'_>,
) -> Result<(), SqlError> {
    let table = match &insert.table {
        sqlparser::ast::TableObject::TableName(n) => scope.table(&last_part(n)),
        _ => None,
    };
    let Some(source) = &mut insert.source else {
        return Ok(());
    };
    let SetExpr::Values(values) = source.body.as_mut() else {
        return Ok(());
    };
    let is_default = |e: &Expr| matches!(e, Expr::Identifier(i) if i.quote_style.is_none() && i.value.eq_ignore_ascii_case("default"));
    let width = values.rows.first().map(Vec::len).unwrap_or(0);
    let mut drop = Vec::new();
    for col in 0..width {
        let defaults = values
            .rows
            .iter()
            .filter(|r| r.get(col).is_some_and(is_default))
            .count();
        if defaults == values.rows.len() {
            drop.push(col);
        } else if defaults > 0 {
            let name = match insert.columns.get(col) {
                Some(c) => Some(c.value.as_str()),
                None if insert.columns.is_empty() => table
                    .and_then(|t| t.columns.get(col))
                    .map(|c| c.name.as_str()),
                None => None,
            };
            let column = table
                .zip(name)
                .and_then(|(t, n)| t.columns.iter().find(|c| c.name == n))
                .ok_or_else(|| {
                    SqlError::unsupported(
                        "DEFAULT in some rows of a multi-row VALUES into a column cutover cannot name",
                    )
                })?;
            let default = file_default(column.default.as_deref())?;
            for row in &mut values.rows {
                if let Some(e) = row.get_mut(col).filter(|e| is_default(e)) {
                    *e = default.clone();
                }
            }
        }
    }
    if drop.is_empty() {
        return Ok(());
    }
    if insert.columns.len() != width {
        return Err(SqlError::unsupported(
            "DEFAULT in VALUES without a column list",
        ));
    }
    for col in drop.iter().rev() {
        insert.columns.remove(*col);
        for row in &mut values.rows {
            row.remove(*col);
        }
    }
    if insert.columns.is_empty() {
        let on = insert.on.take();
        let returning = insert.returning.take();
        insert.source = None;
        let table = insert.table.to_string();
        let mut tail = String::new();
        if on.is_some() {
            return Err(SqlError::unsupported(
                "ON CONFLICT with only DEFAULT values",
            ));
        }
        if let Some(r) = returning {
            tail = format!(
                " RETURNING {}",
                r.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let rebuilt = format!("INSERT INTO {table} DEFAULT VALUES{tail}");
        let mut parsed = Parser::parse_sql(&sqlparser::dialect::SQLiteDialect {}, &rebuilt)
            .map_err(parse_error)?;
        if let Some(Statement::Insert(i)) = parsed.pop() {
            *insert = i;
        }
    }
    Ok(())
}

/// Whether a `SELECT` list item is a plain reference to a column: its type
/// comes from SQLite's column metadata.
pub fn select_of(statement: &Statement) -> Option<&Select> {
    match statement {
        Statement::Query(q) => match q.body.as_ref() {
            SetExpr::Select(s) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_outside_quotes_and_comments() {
        let parts = split("select 'a;b'; select $$x;y$$ ; -- c;\nselect \"q;\" /* ; */;;");
        assert_eq!(parts.len(), 3, "{parts:?}");
        assert_eq!(parts[1].trim(), "select $$x;y$$");
    }

    #[test]
    fn recognizes_session_commands() {
        let map = SchemaMap {
            tables: vec![],
            skipped: vec![],
        };
        assert_eq!(command("BEGIN", &map).unwrap(), Command::Begin);
        assert_eq!(
            command("start transaction read write", &map).unwrap(),
            Command::Begin
        );
        assert_eq!(
            command("ROLLBACK TO SAVEPOINT sp1", &map).unwrap(),
            Command::RollbackTo("sp1".into())
        );
        assert_eq!(
            command("SET TIME ZONE 'UTC'", &map).unwrap(),
            Command::Set {
                name: "timezone".into(),
                value: Some("UTC".into())
            }
        );
        assert_eq!(
            command("set application_name = 'x'", &map).unwrap(),
            Command::Set {
                name: "application_name".into(),
                value: Some("x".into())
            }
        );
        assert_eq!(
            command("PREPARE TRANSACTION 'x'", &map).unwrap_err().code,
            "0A000"
        );
        // DDL is the file's own (ddl.rs); what is not there is PostgreSQL's
        // error, what SQLite cannot do a refusal naming it.
        assert_eq!(command("DROP TABLE x", &map).unwrap_err().code, "42P01");
        assert_eq!(
            command("CREATE SEQUENCE s", &map).unwrap_err().code,
            "0A000"
        );
    }
}
