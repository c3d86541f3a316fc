//! The reverse stream after a SQLite migration's promotion: PostgreSQL's
//! changes (pgoutput, from a slot on the new primary) written back into the
//! SQLite file, each value in its column's storage convention, so the old
//! app version and tools that read the file stay current and a rollback
//! loses nothing. Each PostgreSQL transaction is one SQLite write
//! transaction that also records the position reached (in the file, in
//! `_cutover_applied`). The capture triggers log these writes too; the same
//! transaction removes what they logged, so only writes made to the file by
//! someone else remain in the change log — which, after promotion, is a
//! write nobody should make: it is reported, kept, and applied to
//! PostgreSQL if the migration rolls back.

use crate::pgoutput::{Datum, Logical, Lsn, Relation};
use crate::StreamError;
use cutover_sqlite::capture;
use cutover_sqlite::rusqlite::types::Value;
use cutover_sqlite::rusqlite::{self, Connection};
use cutover_sqlite::schema_map::quote;
use cutover_sqlite::{SchemaMap, Table};
use std::collections::HashMap;

/// Where the reverse stream's position is kept, inside the file.
pub const APPLIED_TABLE: &str = "_cutover_applied";

fn sqlite(e: impl std::fmt::Display) -> StreamError {
    StreamError::Precondition(format!("SQLite file: {e}"))
}

/// Writes PostgreSQL's transactions into the file.
pub struct SqliteTarget {
    conn: Connection,
    /// Read after the stream has started (profiling a large file takes a
    /// while, and a promotion's pause should not wait for it).
    map: Option<SchemaMap>,
    relations: HashMap<u32, Relation>,
    /// The transaction being received.
    pending: Vec<Logical>,
}

impl SqliteTarget {
    pub fn open(path: &std::path::Path) -> Result<SqliteTarget, StreamError> {
        let conn = Connection::open(path).map_err(sqlite)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(sqlite)?;
        // Rows arrive carrying their effects (cascades were applied on
        // PostgreSQL and arrive as changes of their own).
        conn.execute_batch(&format!(
            "PRAGMA foreign_keys = OFF; PRAGMA recursive_triggers = OFF;
             CREATE TABLE IF NOT EXISTS {APPLIED_TABLE} (slot TEXT PRIMARY KEY, lsn INTEGER NOT NULL);"
        ))
        .map_err(sqlite)?;
        Ok(SqliteTarget {
            conn,
            map: None,
            relations: HashMap::new(),
            pending: Vec::new(),
        })
    }

    pub fn set_map(&mut self, map: SchemaMap) {
        self.map = Some(map);
    }

    /// The position recorded for `slot`, if any.
    pub fn applied(&self, slot: &str) -> Result<Option<Lsn>, StreamError> {
        let lsn: Option<i64> = self
            .conn
            .query_row(
                &format!("SELECT lsn FROM {APPLIED_TABLE} WHERE slot = ?1"),
                [slot],
                |r| r.get(0),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
            .map_err(sqlite)?;
        Ok(lsn.map(|l| Lsn(l as u64)))
    }

    pub fn record(&self, slot: &str, lsn: Lsn) -> Result<(), StreamError> {
        self.conn
            .execute(
                &format!(
                    "INSERT INTO {APPLIED_TABLE} (slot, lsn) VALUES (?1, ?2) \
                     ON CONFLICT (slot) DO UPDATE SET lsn = excluded.lsn"
                ),
                rusqlite::params![slot, lsn.0 as i64],
            )
            .map_err(sqlite)?;
        Ok(())
    }

    /// Removes the log rows the forward stream applied to PostgreSQL but had
    /// not trimmed yet when it stopped, so what remains is only what
    /// PostgreSQL does not have.
    pub fn trim_applied(&self, upto: i64) -> Result<(), StreamError> {
        capture::trim(&self.conn, upto).map_err(sqlite)?;
        Ok(())
    }

    /// Changes in the file's change log not made by this stream: writes
    /// to the file by someone else since promotion.
    pub fn foreign_writes(&self) -> Result<(i64, Option<(i64, i64)>), StreamError> {
        self.conn
            .query_row(
                &format!(
                    "SELECT count(*), min(seq), max(seq) FROM {}",
                    capture::LOG_TABLE
                ),
                [],
                |r| {
                    let n: i64 = r.get(0)?;
                    let range = match (r.get::<_, Option<i64>>(1)?, r.get::<_, Option<i64>>(2)?) {
                        (Some(a), Some(b)) => Some((a, b)),
                        _ => None,
                    };
                    Ok((n, range))
                },
            )
            .map_err(sqlite)
    }

    /// Takes one decoded message; on Commit the transaction is written.
    /// Returns the commit's end position when one was written.
    pub fn feed(&mut self, slot: &str, msg: Logical) -> Result<Option<Lsn>, StreamError> {
        match msg {
            Logical::Relation(rel) => {
                self.relations.insert(rel.oid, rel);
            }
            Logical::Begin { .. } => self.pending.clear(),
            Logical::Commit { end_lsn, .. } => {
                let changes = std::mem::take(&mut self.pending);
                self.write(slot, &changes, end_lsn)?;
                return Ok(Some(end_lsn));
            }
            Logical::Other => {}
            change => self.pending.push(change),
        }
        Ok(None)
    }

    fn table(&self, oid: u32) -> Result<(&Relation, &Table), StreamError> {
        let rel = self
            .relations
            .get(&oid)
            .ok_or_else(|| StreamError::Protocol(format!("change for unknown relation {oid}")))?;
        let map = self
            .map
            .as_ref()
            .ok_or_else(|| StreamError::Protocol("the schema map is not read yet".to_string()))?;
        let table = map
            .tables
            .iter()
            .find(|t| t.name == rel.name)
            .ok_or_else(|| {
                StreamError::Precondition(format!(
                    "PostgreSQL changed table {}, which the SQLite file does not have",
                    rel.name
                ))
            })?;
        Ok((rel, table))
    }

    /// A tuple's values by column name, in storage form; unchanged TOAST
    /// values left out.
    fn values(
        &self,
        rel: &Relation,
        table: &Table,
        tuple: &[Datum],
    ) -> Result<Vec<(String, Value)>, StreamError> {
        let mut out = Vec::new();
        for (c, d) in rel.columns.iter().zip(tuple) {
            let Some(column) = table.columns.iter().find(|x| x.name == c.name) else {
                continue;
            };
            let value = match d {
                Datum::Unchanged => continue,
                Datum::Null => Value::Null,
                Datum::Text(t) => column.from_pg_text(t).map_err(|e| {
                    StreamError::Precondition(format!(
                        "writing {} into the SQLite file: {e}",
                        table.name
                    ))
                })?,
            };
            out.push((c.name.clone(), value));
        }
        Ok(out)
    }

    fn upsert(&self, table: &Table, values: &[(String, Value)]) -> Result<(), StreamError> {
        let columns: Vec<String> = values.iter().map(|(n, _)| quote(n)).collect();
        let params: Vec<String> = (1..=values.len()).map(|i| format!("?{i}")).collect();
        let keys: Vec<String> = table.primary_key.iter().map(|k| quote(k)).collect();
        let sets: Vec<String> = values
            .iter()
            .filter(|(n, _)| !table.primary_key.contains(n))
            .map(|(n, _)| format!("{0} = excluded.{0}", quote(n)))
            .collect();
        let action = if sets.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", sets.join(", "))
        };
        let sql = format!(
            "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) {action}",
            quote(&table.name),
            columns.join(", "),
            params.join(", "),
            keys.join(", ")
        );
        self.conn
            .prepare_cached(&sql)
            .and_then(|mut s| s.execute(rusqlite::params_from_iter(values.iter().map(|(_, v)| v))))
            .map_err(sqlite)?;
        Ok(())
    }

    fn delete(&self, table: &Table, key: &[(String, Value)]) -> Result<(), StreamError> {
        let wanted: Vec<&(String, Value)> = table
            .primary_key
            .iter()
            .filter_map(|k| key.iter().find(|(n, _)| n == k))
            .collect();
        if wanted.len() != table.primary_key.len() {
            return Err(StreamError::Protocol(format!(
                "a delete from {} arrived without its key",
                table.name
            )));
        }
        let cond: Vec<String> = wanted
            .iter()
            .enumerate()
            .map(|(i, (n, _))| format!("{} = ?{}", quote(n), i + 1))
            .collect();
        let sql = format!(
            "DELETE FROM {} WHERE {}",
            quote(&table.name),
            cond.join(" AND ")
        );
        self.conn
            .prepare_cached(&sql)
            .and_then(|mut s| s.execute(rusqlite::params_from_iter(wanted.iter().map(|(_, v)| v))))
            .map_err(sqlite)?;
        Ok(())
    }

    /// One PostgreSQL transaction as one SQLite write transaction, with the
    /// position, and without the capture's echo of it.
    fn write(&self, slot: &str, changes: &[Logical], end: Lsn) -> Result<(), StreamError> {
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(sqlite)?;
        let result = (|| {
            let before: i64 = self
                .conn
                .query_row(
                    &format!("SELECT coalesce(max(seq), 0) FROM {}", capture::LOG_TABLE),
                    [],
                    |r| r.get(0),
                )
                .map_err(sqlite)?;
            for change in changes {
                match change {
                    Logical::Insert { rel, new } => {
                        let (r, t) = self.table(*rel)?;
                        let values = self.values(r, t, new)?;
                        self.upsert(t, &values)?;
                    }
                    Logical::Update { rel, old, new } => {
                        let (r, t) = self.table(*rel)?;
                        if let Some(old) = old {
                            let key = self.values(r, t, old)?;
                            self.delete(t, &key)?;
                        }
                        let values = self.values(r, t, new)?;
                        self.upsert(t, &values)?;
                    }
                    Logical::Delete { rel, old } => {
                        let (r, t) = self.table(*rel)?;
                        let key = self.values(r, t, old)?;
                        self.delete(t, &key)?;
                    }
                    Logical::Truncate { rels, .. } => {
                        for rel in rels {
                            let (_, t) = self.table(*rel)?;
                            self.conn
                                .execute_batch(&format!("DELETE FROM {}", quote(&t.name)))
                                .map_err(sqlite)?;
                        }
                    }
                    _ => {}
                }
            }
            self.conn
                .execute(
                    &format!("DELETE FROM {} WHERE seq > ?1", capture::LOG_TABLE),
                    [before],
                )
                .map_err(sqlite)?;
            self.record(slot, end)
        })();
        match result {
            Ok(()) => self.conn.execute_batch("COMMIT").map_err(sqlite),
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }
}
