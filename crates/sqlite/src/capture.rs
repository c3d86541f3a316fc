//! Capture of every committed write to a SQLite file as a row image, for
//! the live migration's change stream. Triggers on each table write, in
//! the same transaction as the write itself, one row per changed row into
//! the change log `_cutover_changes`: the table, the operation, the key
//! and (for inserts and updates) the whole new row. Writes by other
//! processes (the previous app version, cron jobs, a `sqlite3` shell) are
//! captured too, since the triggers live in the file. The log's `seq`
//! (AUTOINCREMENT) gives the commit order: SQLite has one writer at a
//! time, so seq order is commit order. A reader that reads the log in a
//! read transaction sees only whole committed transactions (WAL
//! snapshots), which is what lets the stream apply each batch it reads as
//! one transaction on PostgreSQL without ever showing half of one.
//!
//! Each value is logged with its storage class (`["integer", 1]`,
//! `["blob", "00ff"]`, ...), so the stream converts it through the schema
//! map exactly as the copy does.

use crate::schema_map::{quote, SchemaMap, Table};
use rusqlite::types::Value;
use rusqlite::Connection;

/// The change log table.
pub const LOG_TABLE: &str = "_cutover_changes";

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A new row (or a row written again: applied as an upsert).
    Insert,
    /// A row changed in place (same key).
    Update,
    /// A row gone (or moved to another key: its old key).
    Delete,
}

/// One captured row change.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub seq: i64,
    pub table: String,
    pub op: Op,
    /// The key columns' values, in the table's key order.
    pub key: Vec<Value>,
    /// Every column's value, in the table's column order (None for a delete).
    pub row: Option<Vec<Value>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the change log row {seq} cannot be read: {reason}")]
    Log { seq: i64, reason: String },
}

/// What must be fixed before capture can start, one sentence each.
pub fn preconditions(conn: &Connection, map: &SchemaMap) -> Result<Vec<String>, CaptureError> {
    let mut problems = Vec::new();
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        problems.push(format!(
            "the file's journal_mode is {mode}: set PRAGMA journal_mode = WAL (readers and the capture's reader must run beside the writer)"
        ));
    }
    for t in &map.tables {
        if t.primary_key.is_empty() {
            problems.push(format!(
                "table \"{}\" has no primary key: its rows are keyed only by SQLite's implicit rowid, which VACUUM renumbers; add a PRIMARY KEY (or a rowid alias: id INTEGER PRIMARY KEY) so each change names its row",
                t.name
            ));
        }
    }
    Ok(problems)
}

/// How the file's schema differs from the one capture was installed for,
/// one sentence each: tables created or dropped since, and tables whose
/// columns changed. Capture logs the columns its triggers were made for,
/// so a new table's writes and a new column's values would not reach
/// PostgreSQL; the stream stops on any of these rather than lose them.
pub fn drift(conn: &Connection, map: &SchemaMap) -> Result<Vec<String>, CaptureError> {
    let mut problems = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
         AND name NOT LIKE '\\_cutover\\_%' ESCAPE '\\' ORDER BY name",
    )?;
    let tables: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for name in &tables {
        let known = map.tables.iter().any(|t| &t.name == name)
            || map.skipped.iter().any(|(s, _)| s == name);
        if !known {
            problems.push(format!(
                "table \"{name}\" was created after capture started (its writes are not captured)"
            ));
        }
    }
    for t in &map.tables {
        if !tables.contains(&t.name) {
            problems.push(format!(
                "table \"{}\" was dropped or renamed after capture started",
                t.name
            ));
            continue;
        }
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({})", quote(&t.name)))?;
        let now: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(1))?
            .collect::<Result<_, _>>()?;
        let captured: Vec<&String> = t.columns.iter().map(|c| &c.name).collect();
        if now.iter().collect::<Vec<_>>() != captured {
            problems.push(format!(
                "table \"{}\" has columns ({}) now; capture logs ({})",
                t.name,
                now.join(", "),
                captured
                    .iter()
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    Ok(problems)
}

/// The file's schema cookie, which SQLite changes with every schema change.
pub fn schema_version(conn: &Connection) -> Result<i64, CaptureError> {
    Ok(conn.query_row("PRAGMA schema_version", [], |r| r.get(0))?)
}

/// A value of `column` of the NEW or OLD row as logged: its storage class
/// and its value (blobs as hex; reals as 17-digit text, since SQLite's JSON
/// numbers keep only 15 digits and would not read back as the same double).
fn logged(row: &str, column: &str) -> String {
    let c = format!("{row}.{}", quote(column));
    format!(
        "json_array(typeof({c}), CASE typeof({c}) WHEN 'blob' THEN hex({c}) \
         WHEN 'real' THEN printf('%!.17g', {c}) ELSE {c} END)"
    )
}

fn logged_list<'a>(row: &str, columns: impl Iterator<Item = &'a String>) -> String {
    let items: Vec<String> = columns.map(|c| logged(row, c)).collect();
    format!("json_array({})", items.join(", "))
}

fn trigger_name(table: &str, what: &str) -> String {
    quote(&format!("_cutover_{table}_{what}"))
}

/// The triggers that log `table`'s changes.
fn triggers(t: &Table) -> Vec<String> {
    let name = t.name.replace('\'', "''");
    let new_key = logged_list("NEW", t.primary_key.iter());
    let old_key = logged_list("OLD", t.primary_key.iter());
    let new_row = logged_list("NEW", t.columns.iter().map(|c| &c.name));
    let table = quote(&t.name);
    vec![
        format!(
            "CREATE TRIGGER {} AFTER INSERT ON {table} BEGIN \
             INSERT INTO {LOG_TABLE} (tbl, op, key, row) VALUES ('{name}', 'I', {new_key}, {new_row}); END",
            trigger_name(&t.name, "insert")
        ),
        // A key that changes is the old row gone and a new one written.
        format!(
            "CREATE TRIGGER {} AFTER UPDATE ON {table} BEGIN \
             INSERT INTO {LOG_TABLE} (tbl, op, key, row) SELECT '{name}', 'D', {old_key}, NULL WHERE {old_key} IS NOT {new_key}; \
             INSERT INTO {LOG_TABLE} (tbl, op, key, row) VALUES ('{name}', 'U', {new_key}, {new_row}); END",
            trigger_name(&t.name, "update")
        ),
        format!(
            "CREATE TRIGGER {} AFTER DELETE ON {table} BEGIN \
             INSERT INTO {LOG_TABLE} (tbl, op, key, row) VALUES ('{name}', 'D', {old_key}, NULL); END",
            trigger_name(&t.name, "delete")
        ),
    ]
}

/// Creates the change log and every table's triggers, in one transaction
/// (run again, it replaces the triggers: a no-op for the same schema).
pub fn install(conn: &Connection, map: &SchemaMap) -> Result<(), CaptureError> {
    let mut sql = format!(
        "BEGIN IMMEDIATE; CREATE TABLE IF NOT EXISTS {LOG_TABLE} (seq INTEGER PRIMARY KEY AUTOINCREMENT, \
         tbl TEXT NOT NULL, op TEXT NOT NULL, key TEXT NOT NULL, row TEXT);\n"
    );
    for t in &map.tables {
        for what in ["insert", "update", "delete"] {
            sql.push_str(&format!(
                "DROP TRIGGER IF EXISTS {};\n",
                trigger_name(&t.name, what)
            ));
        }
        for trigger in triggers(t) {
            sql.push_str(&trigger);
            sql.push_str(";\n");
        }
    }
    sql.push_str("COMMIT;");
    if let Err(e) = conn.execute_batch(&sql) {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(e.into());
    }
    Ok(())
}

/// Drops the triggers and the change log (finalize).
pub fn remove(conn: &Connection, map: &SchemaMap) -> Result<(), CaptureError> {
    let mut sql = String::from("BEGIN IMMEDIATE;\n");
    for t in &map.tables {
        for what in ["insert", "update", "delete"] {
            sql.push_str(&format!(
                "DROP TRIGGER IF EXISTS {};\n",
                trigger_name(&t.name, what)
            ));
        }
    }
    sql.push_str(&format!("DROP TABLE IF EXISTS {LOG_TABLE};\nCOMMIT;"));
    if let Err(e) = conn.execute_batch(&sql) {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(e.into());
    }
    Ok(())
}

/// Whether capture is installed in the file.
pub fn installed(conn: &Connection) -> Result<bool, CaptureError> {
    let n: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [LOG_TABLE],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

/// The newest position in the log (0 when empty).
pub fn last_seq(conn: &Connection) -> Result<i64, CaptureError> {
    Ok(conn.query_row(
        &format!("SELECT coalesce(max(seq), 0) FROM {LOG_TABLE}"),
        [],
        |r| r.get(0),
    )?)
}

fn decode_values(seq: i64, json: &str) -> Result<Vec<Value>, CaptureError> {
    let bad = |reason: &str| CaptureError::Log {
        seq,
        reason: reason.to_string(),
    };
    let items: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| bad(&e.to_string()))?;
    items
        .into_iter()
        .map(|item| {
            let pair = item
                .as_array()
                .ok_or_else(|| bad("a value is not [class, value]"))?;
            let class = pair.first().and_then(|c| c.as_str()).unwrap_or("");
            let v = pair.get(1).cloned().unwrap_or(serde_json::Value::Null);
            Ok(match (class, v) {
                ("null", _) => Value::Null,
                ("integer", serde_json::Value::Number(n)) => {
                    Value::Integer(n.as_i64().ok_or_else(|| bad("an integer out of range"))?)
                }
                ("real", serde_json::Value::String(r)) => {
                    Value::Real(r.parse().map_err(|_| bad("a real that is not a number"))?)
                }
                ("text", serde_json::Value::String(s)) => Value::Text(s),
                ("blob", serde_json::Value::String(h)) => Value::Blob(
                    (0..h.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(h.get(i..i + 2).unwrap_or("zz"), 16))
                        .collect::<Result<_, _>>()
                        .map_err(|_| bad("a blob that is not hex"))?,
                ),
                (class, v) => return Err(bad(&format!("unknown storage class {class:?} ({v})"))),
            })
        })
        .collect()
}

/// Up to `limit` changes after `after`, in order, as one read (so a
/// transaction is never read in part).
pub fn read(conn: &Connection, after: i64, limit: usize) -> Result<Vec<Change>, CaptureError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT seq, tbl, op, key, row FROM {LOG_TABLE} WHERE seq > ?1 ORDER BY seq LIMIT ?2"
    ))?;
    let rows = stmt.query_map(rusqlite::params![after, limit as i64], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, Option<String>>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, table, op, key, image) = row?;
        let op = match op.as_str() {
            "I" => Op::Insert,
            "U" => Op::Update,
            "D" => Op::Delete,
            other => {
                return Err(CaptureError::Log {
                    seq,
                    reason: format!("unknown operation {other:?}"),
                })
            }
        };
        out.push(Change {
            seq,
            table,
            op,
            key: decode_values(seq, &key)?,
            row: image.map(|i| decode_values(seq, &i)).transpose()?,
        });
    }
    Ok(out)
}

/// Removes the changes up to `upto`, once PostgreSQL has committed them.
pub fn trim(conn: &Connection, upto: i64) -> Result<usize, CaptureError> {
    Ok(conn.execute(&format!("DELETE FROM {LOG_TABLE} WHERE seq <= ?1"), [upto])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, schema: &str) -> (std::path::PathBuf, Connection, SchemaMap) {
        let dir =
            std::env::temp_dir().join(format!("cutover-capture-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "foreign_keys", "ON").unwrap();
        conn.execute_batch(schema).unwrap();
        let map = SchemaMap::read(&conn, &[]).unwrap();
        (path, conn, map)
    }

    fn ops(changes: &[Change]) -> Vec<(String, Op, Vec<Value>)> {
        changes
            .iter()
            .map(|c| (c.table.clone(), c.op, c.key.clone()))
            .collect()
    }

    #[test]
    fn every_kind_of_write_is_logged_in_commit_order_with_whole_rows() {
        let (path, conn, map) = file(
            "kinds",
            "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT UNIQUE, score REAL, avatar BLOB);
             CREATE TABLE posts (id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users(id) ON DELETE CASCADE, title TEXT);
             CREATE TABLE tags (a TEXT, b INTEGER, PRIMARY KEY (a, b)) WITHOUT ROWID;",
        );
        assert_eq!(preconditions(&conn, &map).unwrap(), Vec::<String>::new());
        install(&conn, &map).unwrap();
        conn.execute_batch(
            "INSERT INTO users VALUES (1, 'a@x', 1.5, x'00ff');
             INSERT INTO posts VALUES (10, 1, 'hello');
             UPDATE users SET score = 2.25 WHERE id = 1;
             INSERT INTO users VALUES (5, 'e@x', NULL, NULL);
             UPDATE users SET id = 6 WHERE id = 5;
             INSERT INTO users VALUES (3, 'c@x', NULL, NULL) ON CONFLICT (id) DO UPDATE SET email = excluded.email;
             INSERT INTO users VALUES (3, 'c2@x', NULL, NULL) ON CONFLICT (id) DO UPDATE SET email = excluded.email;
             REPLACE INTO users VALUES (3, 'c3@x', 0.1, NULL);
             INSERT INTO tags VALUES ('t', 1);
             BEGIN; SAVEPOINT s; INSERT INTO tags VALUES ('gone', 2); ROLLBACK TO s; RELEASE s; COMMIT;",
        )
        .unwrap();
        // Another connection (another process's) writes too.
        let other = Connection::open(&path).unwrap();
        other.pragma_update(None, "foreign_keys", "ON").unwrap();
        other
            .execute_batch("DELETE FROM users WHERE id = 1; DELETE FROM tags")
            .unwrap();
        let changes = read(&conn, 0, 1000).unwrap();
        let int = Value::Integer;
        let text = |s: &str| Value::Text(s.to_string());
        assert_eq!(
            ops(&changes),
            vec![
                ("users".into(), Op::Insert, vec![int(1)]),
                ("posts".into(), Op::Insert, vec![int(10)]),
                ("users".into(), Op::Update, vec![int(1)]),
                ("users".into(), Op::Insert, vec![int(5)]),
                ("users".into(), Op::Delete, vec![int(5)]),
                ("users".into(), Op::Update, vec![int(6)]),
                ("users".into(), Op::Insert, vec![int(3)]),
                ("users".into(), Op::Update, vec![int(3)]),
                ("users".into(), Op::Insert, vec![int(3)]),
                ("tags".into(), Op::Insert, vec![text("t"), int(1)]),
                // The cascade deletes the post before its user.
                ("posts".into(), Op::Delete, vec![int(10)]),
                ("users".into(), Op::Delete, vec![int(1)]),
                ("tags".into(), Op::Delete, vec![text("t"), int(1)]),
            ]
        );
        assert_eq!(
            changes[0].row,
            Some(vec![
                int(1),
                text("a@x"),
                Value::Real(1.5),
                Value::Blob(vec![0, 255])
            ])
        );
        assert_eq!(changes[2].row.as_ref().unwrap()[2], Value::Real(2.25));
        assert_eq!(changes[8].row.as_ref().unwrap()[2], Value::Real(0.1));
        let seqs: Vec<i64> = changes.iter().map(|c| c.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(trim(&conn, seqs[5]).unwrap(), 6);
        assert_eq!(read(&conn, 0, 1000).unwrap().len(), changes.len() - 6);
        assert_eq!(last_seq(&conn).unwrap(), *seqs.last().unwrap());
        remove(&conn, &map).unwrap();
        assert!(!installed(&conn).unwrap());
        conn.execute("INSERT INTO users VALUES (9, 'after', NULL, NULL)", [])
            .unwrap();
    }

    #[test]
    fn preconditions_name_what_to_fix() {
        let (_path, conn, map) = file(
            "pre",
            "CREATE TABLE logs (at TEXT, line TEXT); CREATE TABLE ok (id INTEGER PRIMARY KEY);",
        );
        conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
        let problems = preconditions(&conn, &map).unwrap();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("journal_mode is delete"),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("table \"logs\" has no primary key"),
            "{problems:?}"
        );
    }
}
