//! Applies the change stream to the secondary, in commit order.
//!
//! Each primary transaction becomes statements against the secondary:
//! inserts and full-row updates as upserts by primary key, updates carrying
//! unchanged TOAST values as UPDATEs of the columns that were sent, deletes
//! by key, truncates as truncates. Transactions that have already arrived
//! are applied together in one secondary transaction (commit order kept),
//! and that transaction also records the position reached in
//! `cutover.applied`, so after any crash the secondary's own contents say
//! exactly where to resume: nothing skipped, nothing applied twice.
//! Statements run with `session_replication_role = replica`, as PostgreSQL's
//! own logical replication does, so the secondary's triggers and
//! foreign-key checks do not fire again on rows that already carry their
//! effects.

use crate::pgoutput::{Datum, Logical, Lsn, Relation};
use crate::StreamError;
use std::collections::HashMap;
use std::fmt::Write;

/// The table on the secondary that records the applied position.
pub const APPLIED_TABLE: &str = "cutover.applied";

/// SQL that creates the position table (idempotent).
pub const SCHEMA_SQL: &str = "CREATE SCHEMA IF NOT EXISTS cutover; \
     CREATE TABLE IF NOT EXISTS cutover.applied (slot text PRIMARY KEY, lsn pg_lsn NOT NULL, \
     applied_at timestamptz NOT NULL DEFAULT now())";

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A text value (or NULL) as a SQL literal.
pub fn literal_or_null(value: Option<&str>) -> String {
    value
        .map(quote_literal)
        .unwrap_or_else(|| "NULL".to_string())
}

/// `SELECT`-list expressions that read every column of `columns` as text.
pub fn columns_as_text<'a>(columns: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    columns
        .into_iter()
        .map(|n| format!("{}::text", quote_ident(n)))
        .collect()
}

fn datum_sql(d: &Datum) -> String {
    match d {
        Datum::Null => "NULL".to_string(),
        Datum::Text(t) => quote_literal(t),
        Datum::Unchanged => "DEFAULT".to_string(),
    }
}

/// What the applier has built up and not yet committed on the secondary.
#[derive(Default)]
pub struct Batch {
    pub sql: String,
    pub transactions: u64,
    pub rows: u64,
    /// End LSN of the last whole transaction in the batch.
    pub end_lsn: Option<Lsn>,
}

/// Turns decoded messages into SQL, one primary transaction at a time.
pub struct Applier {
    slot: String,
    relations: HashMap<u32, Relation>,
    /// Statements of the transaction being received.
    current: String,
    current_rows: u64,
    in_transaction: bool,
    /// Transactions at or before this position are already on the secondary.
    applied: Lsn,
    pub batch: Batch,
}

impl Applier {
    pub fn new(slot: &str, applied: Lsn) -> Applier {
        Applier {
            slot: slot.to_string(),
            relations: HashMap::new(),
            current: String::new(),
            current_rows: 0,
            in_transaction: false,
            applied,
            batch: Batch::default(),
        }
    }

    pub fn applied(&self) -> Lsn {
        self.applied
    }

    /// Feeds one message. Returns true when a transaction just completed.
    pub fn feed(&mut self, msg: Logical) -> Result<bool, StreamError> {
        match msg {
            Logical::Begin { .. } => {
                self.in_transaction = true;
                self.current.clear();
                self.current_rows = 0;
            }
            Logical::Relation(rel) => {
                self.relations.insert(rel.oid, rel);
            }
            Logical::Insert { rel, new } => {
                let sql = self.upsert(rel, &new)?;
                self.push(&sql);
            }
            Logical::Update { rel, old, new } => {
                let sql = self.update(rel, old.as_deref(), &new)?;
                self.push(&sql);
            }
            Logical::Delete { rel, old } => {
                let r = self.relation(rel)?;
                let sql = format!("DELETE FROM {} WHERE {}", table(r), key_match(r, &old)?);
                self.push(&sql);
            }
            Logical::Truncate {
                rels,
                cascade,
                restart_identity,
            } => {
                let names: Result<Vec<String>, StreamError> = rels
                    .iter()
                    .map(|oid| self.relation(*oid).map(table))
                    .collect();
                let mut sql = format!("TRUNCATE {}", names?.join(", "));
                if restart_identity {
                    sql.push_str(" RESTART IDENTITY");
                }
                if cascade {
                    sql.push_str(" CASCADE");
                }
                self.push(&sql);
            }
            Logical::Commit { end_lsn, .. } => {
                self.in_transaction = false;
                if end_lsn <= self.applied {
                    // Already on the secondary (resent after a restart).
                    self.current.clear();
                    return Ok(false);
                }
                self.batch.sql.push_str(&self.current);
                self.batch.transactions += 1;
                self.batch.rows += self.current_rows;
                self.batch.end_lsn = Some(end_lsn);
                self.current.clear();
                return Ok(true);
            }
            Logical::Other => {}
        }
        Ok(false)
    }

    /// The SQL that applies the batch and records its position atomically,
    /// or None if the batch is empty.
    pub fn batch_sql(&self) -> Option<String> {
        let end = self.batch.end_lsn?;
        Some(format!(
            "BEGIN; SET LOCAL session_replication_role = replica; {}\
             INSERT INTO {APPLIED_TABLE} (slot, lsn, applied_at) VALUES ({}, '{end}', now()) \
             ON CONFLICT (slot) DO UPDATE SET lsn = EXCLUDED.lsn, applied_at = EXCLUDED.applied_at; COMMIT",
            self.batch.sql,
            quote_literal(&self.slot)
        ))
    }

    /// Marks the batch as committed on the secondary.
    pub fn batch_committed(&mut self) -> Batch {
        let batch = std::mem::take(&mut self.batch);
        if let Some(end) = batch.end_lsn {
            self.applied = end;
        }
        batch
    }

    fn push(&mut self, statement: &str) {
        self.current.push_str(statement);
        self.current.push_str("; ");
        self.current_rows += 1;
    }

    fn relation(&self, oid: u32) -> Result<&Relation, StreamError> {
        self.relations
            .get(&oid)
            .ok_or_else(|| StreamError::Protocol(format!("change for unknown relation {oid}")))
    }

    fn upsert(&self, oid: u32, new: &[Datum]) -> Result<String, StreamError> {
        let r = self.relation(oid)?;
        check_width(r, new)?;
        let cols: Vec<String> = r.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let values: Vec<String> = new.iter().map(datum_sql).collect();
        let keys: Vec<String> = r
            .columns
            .iter()
            .filter(|c| c.is_key)
            .map(|c| quote_ident(&c.name))
            .collect();
        if keys.is_empty() {
            return Err(no_key(r));
        }
        let sets: Vec<String> = r
            .columns
            .iter()
            .filter(|c| !c.is_key)
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name)))
            .collect();
        let action = if sets.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", sets.join(", "))
        };
        Ok(format!(
            "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({}) ON CONFLICT ({}) {action}",
            table(r),
            cols.join(", "),
            values.join(", "),
            keys.join(", ")
        ))
    }

    fn update(
        &self,
        oid: u32,
        old: Option<&[Datum]>,
        new: &[Datum],
    ) -> Result<String, StreamError> {
        let r = self.relation(oid)?;
        check_width(r, new)?;
        let unchanged = new.contains(&Datum::Unchanged);
        let mut sql = String::new();
        if let Some(old) = old {
            if !unchanged {
                // The key changed: the row moves.
                let _ = write!(
                    sql,
                    "DELETE FROM {} WHERE {}; ",
                    table(r),
                    key_match(r, old)?
                );
            }
        }
        if !unchanged {
            sql.push_str(&self.upsert(oid, new)?);
            return Ok(sql);
        }
        // Unchanged TOAST values were not sent: set only what was.
        let sets: Vec<String> = r
            .columns
            .iter()
            .zip(new)
            .filter(|(_, d)| **d != Datum::Unchanged)
            .map(|(c, d)| format!("{} = {}", quote_ident(&c.name), datum_sql(d)))
            .collect();
        let key_source = old.unwrap_or(new);
        let _ = write!(
            sql,
            "UPDATE {} SET {} WHERE {}",
            table(r),
            sets.join(", "),
            key_match(r, key_source)?
        );
        Ok(sql)
    }
}

fn table(r: &Relation) -> String {
    format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.name))
}

fn check_width(r: &Relation, tuple: &[Datum]) -> Result<(), StreamError> {
    if tuple.len() == r.columns.len() {
        Ok(())
    } else {
        Err(StreamError::Protocol(format!(
            "tuple for {} has {} columns, relation has {}",
            table(r),
            tuple.len(),
            r.columns.len()
        )))
    }
}

fn no_key(r: &Relation) -> StreamError {
    StreamError::Precondition(format!(
        "table {} has no primary key; add one (cutover applies changes by key)",
        table(r)
    ))
}

/// `"k1" = 'v1' AND "k2" = 'v2'` from a key (or full) tuple.
fn key_match(r: &Relation, tuple: &[Datum]) -> Result<String, StreamError> {
    check_width(r, tuple)?;
    let parts: Vec<String> = r
        .columns
        .iter()
        .zip(tuple)
        .filter(|(c, _)| c.is_key)
        .map(|(c, d)| match d {
            Datum::Text(t) => Ok(format!("{} = {}", quote_ident(&c.name), quote_literal(t))),
            _ => Err(StreamError::Protocol(format!(
                "key column {} of {} arrived without a value",
                c.name,
                table(r)
            ))),
        })
        .collect::<Result<_, _>>()?;
    if parts.is_empty() {
        return Err(no_key(r));
    }
    Ok(parts.join(" AND "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::Column;

    fn rel() -> Relation {
        Relation {
            oid: 1,
            schema: "public".into(),
            name: "it's".into(),
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 23,
                    is_key: true,
                },
                Column {
                    name: "body".into(),
                    type_oid: 25,
                    is_key: false,
                },
                Column {
                    name: "n".into(),
                    type_oid: 23,
                    is_key: false,
                },
            ],
        }
    }

    fn text(s: &str) -> Datum {
        Datum::Text(s.into())
    }

    #[test]
    fn builds_a_batch_with_the_position_in_the_same_transaction() {
        let mut a = Applier::new("slot", Lsn(0));
        a.feed(Logical::Begin {
            final_lsn: Lsn(10),
            xid: 1,
        })
        .unwrap();
        a.feed(Logical::Relation(rel())).unwrap();
        a.feed(Logical::Insert {
            rel: 1,
            new: vec![text("1"), text("o'k"), Datum::Null],
        })
        .unwrap();
        a.feed(Logical::Update {
            rel: 1,
            old: None,
            new: vec![text("1"), Datum::Unchanged, text("5")],
        })
        .unwrap();
        a.feed(Logical::Delete {
            rel: 1,
            old: vec![text("2"), Datum::Null, Datum::Null],
        })
        .unwrap();
        assert!(a
            .feed(Logical::Commit {
                commit_lsn: Lsn(10),
                end_lsn: Lsn(11)
            })
            .unwrap());
        let sql = a.batch_sql().unwrap();
        assert!(sql.starts_with("BEGIN; SET LOCAL session_replication_role = replica; "));
        assert!(sql.contains(
            "INSERT INTO \"public\".\"it's\" (\"id\", \"body\", \"n\") OVERRIDING SYSTEM VALUE VALUES ('1', 'o''k', NULL) ON CONFLICT (\"id\") DO UPDATE SET \"body\" = EXCLUDED.\"body\", \"n\" = EXCLUDED.\"n\""
        ));
        assert!(sql.contains(
            "UPDATE \"public\".\"it's\" SET \"id\" = '1', \"n\" = '5' WHERE \"id\" = '1'"
        ));
        assert!(sql.contains("DELETE FROM \"public\".\"it's\" WHERE \"id\" = '2'"));
        assert!(sql.contains("VALUES ('slot', '0/B', now())"));
        assert!(sql.ends_with("COMMIT"));
        a.batch_committed();
        assert_eq!(a.applied(), Lsn(11));
    }

    #[test]
    fn transactions_already_applied_are_skipped() {
        let mut a = Applier::new("slot", Lsn(100));
        a.feed(Logical::Relation(rel())).unwrap();
        a.feed(Logical::Begin {
            final_lsn: Lsn(50),
            xid: 1,
        })
        .unwrap();
        a.feed(Logical::Insert {
            rel: 1,
            new: vec![text("1"), text("x"), Datum::Null],
        })
        .unwrap();
        assert!(!a
            .feed(Logical::Commit {
                commit_lsn: Lsn(50),
                end_lsn: Lsn(60)
            })
            .unwrap());
        assert_eq!(a.batch_sql(), None);
    }
}
