//! SQLite's errors as the ErrorResponse PostgreSQL would send for the same
//! failure on the converted database: SQLSTATE, message in PostgreSQL's
//! words, and the table, column and constraint names the converted schema
//! uses.

use crate::translate::SqlError;
use cutover_sqlite::rusqlite::{self, ErrorCode};
use cutover_sqlite::SchemaMap;
use cutover_wire::messages::ErrorResponse;

/// An error for the client with PostgreSQL's fields.
#[derive(Debug, Clone)]
pub struct Failure(pub Box<ErrorResponse>);

impl From<SqlError> for Failure {
    fn from(e: SqlError) -> Failure {
        let mut r = ErrorResponse::error(e.code, e.message);
        r.position = e.position;
        Failure(Box::new(r))
    }
}

impl Failure {
    pub fn new(code: &str, message: impl Into<String>) -> Failure {
        Failure(Box::new(ErrorResponse::error(code, message)))
    }

    pub fn code(&self) -> &str {
        &self.0.code
    }
}

/// `table.column, table.column` from SQLite's constraint messages.
fn constraint_columns(message: &str, prefix: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix(prefix)?.trim();
    let mut table = String::new();
    let mut columns = Vec::new();
    for part in rest.split(',') {
        let (t, c) = part.trim().split_once('.')?;
        table = t.to_string();
        columns.push(c.to_string());
    }
    Some((table, columns))
}

pub fn from_sqlite(e: &rusqlite::Error, map: &SchemaMap) -> Failure {
    let (code, message) = match e {
        rusqlite::Error::SqliteFailure(f, Some(m)) => (f.code, m.clone()),
        rusqlite::Error::SqliteFailure(f, None) => (f.code, f.to_string()),
        rusqlite::Error::SqlInputError { error, msg, .. } => (error.code, msg.clone()),
        rusqlite::Error::UserFunctionError(inner) => {
            let text = inner.to_string();
            let code = if text.starts_with("invalid input syntax") {
                "22P02"
            } else if text == "division by zero" {
                "22012"
            } else if text == "integer out of range" || text == "smallint out of range" {
                "22003"
            } else if text.starts_with("invalid regular expression") {
                "2201B"
            } else {
                "XX000"
            };
            return Failure::new(code, text);
        }
        other => return Failure::new("XX000", other.to_string()),
    };
    let mut r = match code {
        ErrorCode::ConstraintViolation => constraint(&message, map),
        ErrorCode::OperationInterrupted => {
            ErrorResponse::error("57014", "canceling statement due to user request")
        }
        ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => ErrorResponse::error(
            "55P03",
            "could not obtain lock: the SQLite file is locked by another process",
        ),
        ErrorCode::ReadOnly => ErrorResponse::error(
            "25006",
            "cannot execute a write: the SQLite file is read-only",
        ),
        ErrorCode::DiskFull => ErrorResponse::error("53100", "could not write: disk full"),
        ErrorCode::TooBig => ErrorResponse::error("54000", "value too large"),
        _ => {
            if let Some(t) = message.strip_prefix("no such table: ") {
                ErrorResponse::error("42P01", format!("relation \"{t}\" does not exist"))
            } else if let Some(c) = message.strip_prefix("no such column: ") {
                ErrorResponse::error("42703", format!("column \"{c}\" does not exist"))
            } else if let Some(f) = message.strip_prefix("no such function: ") {
                ErrorResponse::error(
                    "42883",
                    format!("function {}() does not exist", f.to_ascii_lowercase()),
                )
            } else if message.contains("syntax error") {
                ErrorResponse::error("42601", message.clone())
            } else if message.starts_with("invalid input syntax") {
                ErrorResponse::error("22P02", message.clone())
            } else if message.starts_with("invalid regular expression") {
                ErrorResponse::error("2201B", message.clone())
            } else if message == "division by zero" {
                ErrorResponse::error("22012", message.clone())
            } else if message == "numeric value out of range" || message == "smallint out of range"
            {
                ErrorResponse::error("22003", message.clone())
            } else if message == "integer out of range" || message.contains("integer overflow") {
                ErrorResponse::error("22003", "integer out of range")
            } else {
                ErrorResponse::error("XX000", format!("SQLite: {message}"))
            }
        }
    };
    if r.code == "XX000" {
        tracing::warn!(error = %message, "SQLite error without a PostgreSQL equivalent");
    }
    r.severity = "ERROR";
    Failure(Box::new(r))
}

fn constraint(message: &str, map: &SchemaMap) -> ErrorResponse {
    if let Some((table, columns)) = constraint_columns(message, "UNIQUE constraint failed:") {
        let t = map.tables.iter().find(|t| t.name == table);
        let name = t
            .and_then(|t| {
                if t.primary_key == columns {
                    return Some(format!("{}_pkey", t.name));
                }
                t.indexes.iter().find_map(|i| {
                    let cols: Vec<&str> =
                        i.columns.iter().filter_map(|(c, _)| c.as_deref()).collect();
                    (i.unique && cols == columns.iter().map(String::as_str).collect::<Vec<_>>())
                        .then(|| {
                            if i.constraint {
                                format!("{}_{}_key", t.name, cols.join("_"))
                            } else {
                                i.name.clone()
                            }
                        })
                })
            })
            .unwrap_or_else(|| format!("{table}_{}_key", columns.join("_")));
        let mut r = ErrorResponse::error(
            "23505",
            format!("duplicate key value violates unique constraint \"{name}\""),
        );
        r.table = Some(table);
        r.schema = Some("public".to_string());
        r.constraint = Some(name);
        return r;
    }
    if let Some((table, columns)) = constraint_columns(message, "NOT NULL constraint failed:") {
        let column = columns.into_iter().next().unwrap_or_default();
        let mut r = ErrorResponse::error(
            "23502",
            format!("null value in column \"{column}\" of relation \"{table}\" violates not-null constraint"),
        );
        r.table = Some(table);
        r.schema = Some("public".to_string());
        r.column = Some(column);
        return r;
    }
    if message.starts_with("FOREIGN KEY constraint failed") {
        // SQLite does not say which key; PostgreSQL would name it.
        return ErrorResponse::error(
            "23503",
            "insert, update or delete violates a foreign key constraint",
        );
    }
    if let Some(rest) = message.strip_prefix("CHECK constraint failed:") {
        // SQLite names the constraint, or for an unnamed one repeats its
        // expression; the converted schema calls that table_checkN.
        let said = rest.trim();
        let plain = |s: &str| -> String {
            s.chars()
                .filter(|c| !c.is_whitespace() && !matches!(c, '"' | '`' | '[' | ']'))
                .collect::<String>()
                .to_ascii_lowercase()
        };
        let name = map
            .tables
            .iter()
            .find_map(|t| {
                t.checks
                    .iter()
                    .position(|c| plain(c) == plain(said))
                    .map(|n| format!("{}_check{}", t.name, n + 1))
            })
            .unwrap_or_else(|| said.to_string());
        let mut r = ErrorResponse::error(
            "23514",
            format!("new row violates check constraint \"{name}\""),
        );
        r.constraint = Some(name);
        return r;
    }
    ErrorResponse::error("23000", message.to_string())
}
