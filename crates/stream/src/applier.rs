//! Applies the change stream to the secondary, in commit order.
//!
//! Each primary transaction becomes parameterized statements against the
//! secondary (one prepared statement per table and shape, values sent as
//! text parameters, so PostgreSQL parses and plans each shape once):
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
use std::sync::Arc;

/// The schema that holds cutover's own bookkeeping on each database.
pub const SCHEMA: &str = "cutover";
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

/// One statement to run on the secondary: SQL with `$n` parameters, and
/// the parameters as text (None for NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub sql: Arc<str>,
    pub params: Vec<Option<String>>,
    pub kind: OpKind,
}

/// A unique index of a relation, for [`Applier::evict_collisions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unique {
    /// Its columns, unquoted.
    pub columns: Vec<String>,
    pub partial: Option<Partial>,
}

/// A partial index's predicate, in PostgreSQL's syntax over the
/// relation's column names, and every column's type (to read a row image
/// the predicate can be evaluated on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partial {
    pub predicate: String,
    pub types: Vec<String>,
}

/// What an op touches, which decides how a batch may be regrouped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// An upsert of one whole row: may run together with the upserts of
    /// the same table and columns around it (see [`plan`]).
    Upsert(Arc<Upsert>),
    /// Any other change to one row of `table` (delete, partial update).
    Row { table: String },
    /// TRUNCATE: nothing moves across it.
    Barrier,
}

/// The parts of a whole-row upsert a multi-row statement is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upsert {
    /// `"schema"."name"`.
    pub table: String,
    /// Column names, unquoted, in the relation's order.
    pub columns: Vec<String>,
    /// `ON CONFLICT (...) DO ...`.
    pub conflict: String,
    /// Positions of the key columns in `columns`.
    pub key_positions: Vec<usize>,
}

impl Op {
    fn table(&self) -> Option<&str> {
        match &self.kind {
            OpKind::Upsert(u) => Some(&u.table),
            OpKind::Row { table } => Some(table),
            OpKind::Barrier => None,
        }
    }

    fn key(&self) -> Vec<Option<&str>> {
        match &self.kind {
            OpKind::Upsert(u) => u
                .key_positions
                .iter()
                .map(|&i| self.params.get(i).and_then(|p| p.as_deref()))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// How a batch runs: single statements, or runs of upserts merged into one
/// multi-row statement each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Single(usize),
    /// Upserts (indexes into the batch) of one table and shape, distinct keys.
    Upserts(Vec<usize>),
}

/// Regroups a batch for fewer statements without changing its result.
///
/// The batch commits as one transaction with `session_replication_role =
/// replica` (no triggers, no foreign-key checks), so only the order of
/// changes *within a table* is observable in the outcome; the order between
/// tables is not, except across a TRUNCATE, which stays a barrier. Within a
/// table, consecutive whole-row upserts of the same columns become one
/// statement, split where a key repeats (one statement may not update a row
/// twice); they are applied in their original order, so unique checks see
/// the same sequence as row-by-row application.
pub fn plan(ops: &[Op]) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut start = 0;
    while start < ops.len() {
        let end = ops[start..]
            .iter()
            .position(|op| op.kind == OpKind::Barrier)
            .map_or(ops.len(), |i| start + i);
        plan_segment(ops, start, end, &mut steps);
        if end < ops.len() {
            steps.push(Step::Single(end));
        }
        start = end + 1;
    }
    steps
}

fn plan_segment(ops: &[Op], start: usize, end: usize, steps: &mut Vec<Step>) {
    // Tables in order of first appearance, each with its ops in order.
    let mut tables: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, op) in ops.iter().enumerate().take(end).skip(start) {
        let table = op.table().unwrap_or("");
        match tables.iter_mut().find(|(t, _)| *t == table) {
            Some((_, list)) => list.push(i),
            None => tables.push((table, vec![i])),
        }
    }
    for (_, list) in tables {
        let mut run: Vec<usize> = Vec::new();
        let mut keys = std::collections::HashSet::new();
        for i in list {
            let joins = matches!(ops[i].kind, OpKind::Upsert(_))
                && run.last().is_some_and(|&last| ops[last].sql == ops[i].sql)
                && !keys.contains(&ops[i].key());
            if !joins {
                flush_run(&mut run, steps);
                keys.clear();
            }
            if matches!(ops[i].kind, OpKind::Upsert(_)) {
                keys.insert(ops[i].key());
                run.push(i);
            } else {
                steps.push(Step::Single(i));
            }
        }
        flush_run(&mut run, steps);
    }
}

fn flush_run(run: &mut Vec<usize>, steps: &mut Vec<Step>) {
    match run.len() {
        0 => {}
        1 => steps.push(Step::Single(run[0])),
        _ => steps.push(Step::Upserts(run.clone())),
    }
    run.clear();
}

fn text_of(d: &Datum) -> Option<String> {
    match d {
        Datum::Text(t) => Some(t.clone()),
        Datum::Null | Datum::Unchanged => None,
    }
}

/// What the applier has built up and not yet committed on the secondary.
#[derive(Default)]
pub struct Batch {
    /// Statements of whole transactions, in commit order.
    pub ops: Vec<Op>,
    /// Row changes those statements apply (a key change is one change, two statements).
    pub transactions: u64,
    pub rows: u64,
    /// End LSN of the last whole transaction in the batch.
    pub end_lsn: Option<Lsn>,
    /// Commit LSN of the first transaction in the batch.
    pub first_commit: Option<Lsn>,
}

/// Turns decoded messages into SQL, one primary transaction at a time.
pub struct Applier {
    slot: String,
    relations: HashMap<u32, Relation>,
    /// Upsert SQL per relation, built once per Relation message.
    upserts: HashMap<u32, (Arc<str>, Arc<Upsert>)>,
    /// Statements of the transaction being received.
    current: Vec<Op>,
    /// Row changes (inserts, updates, deletes) in the transaction being received.
    current_rows: u64,
    in_transaction: bool,
    /// Commit LSN of the transaction being received.
    current_commit: Lsn,
    /// Transactions at or before this position are already on the secondary.
    applied: Lsn,
    pub batch: Batch,
}

impl Applier {
    pub fn new(slot: &str, applied: Lsn) -> Applier {
        Applier {
            slot: slot.to_string(),
            relations: HashMap::new(),
            upserts: HashMap::new(),
            current: Vec::new(),
            current_rows: 0,
            in_transaction: false,
            current_commit: Lsn(0),
            applied,
            batch: Batch::default(),
        }
    }

    pub fn applied(&self) -> Lsn {
        self.applied
    }

    /// Commit LSN of the earliest transaction received and not yet taken
    /// for applying (the pending batch's first, or the one being received).
    pub fn earliest_pending(&self) -> Option<Lsn> {
        self.batch
            .first_commit
            .or(self.in_transaction.then_some(self.current_commit))
    }

    /// True between a transaction's Begin and its Commit.
    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// Feeds one message. Returns true when a transaction just completed.
    pub fn feed(&mut self, msg: Logical) -> Result<bool, StreamError> {
        match msg {
            Logical::Begin { final_lsn, .. } => {
                self.current_commit = final_lsn;
                self.in_transaction = true;
                self.current.clear();
                self.current_rows = 0;
            }
            Logical::Relation(rel) => {
                self.upserts.remove(&rel.oid);
                self.relations.insert(rel.oid, rel);
            }
            // cutover's own bookkeeping (the position of a stream running the
            // other way) is per database, never mirrored.
            Logical::Insert { rel, .. }
            | Logical::Update { rel, .. }
            | Logical::Delete { rel, .. }
                if self.is_own(rel) => {}
            Logical::Insert { rel, new } => {
                let op = self.upsert(rel, &new)?;
                self.current.push(op);
                self.current_rows += 1;
            }
            Logical::Update { rel, old, new } => {
                let ops = self.update(rel, old.as_deref(), &new)?;
                self.current.extend(ops);
                self.current_rows += 1;
            }
            Logical::Delete { rel, old } => {
                let op = self.delete(rel, &old)?;
                self.current.push(op);
                self.current_rows += 1;
            }
            Logical::Truncate {
                rels,
                cascade,
                restart_identity,
            } => {
                let names: Result<Vec<String>, StreamError> = rels
                    .iter()
                    .filter(|oid| !self.is_own(**oid))
                    .map(|oid| self.relation(*oid).map(table))
                    .collect();
                let names = names?;
                if !names.is_empty() {
                    let mut sql = format!("TRUNCATE {}", names.join(", "));
                    if restart_identity {
                        sql.push_str(" RESTART IDENTITY");
                    }
                    if cascade {
                        sql.push_str(" CASCADE");
                    }
                    self.current.push(Op {
                        sql: sql.into(),
                        params: Vec::new(),
                        kind: OpKind::Barrier,
                    });
                }
            }
            Logical::Commit { end_lsn, .. } => {
                self.in_transaction = false;
                if end_lsn <= self.applied {
                    // Already on the secondary (resent after a restart).
                    self.current.clear();
                    return Ok(false);
                }
                self.batch.ops.append(&mut self.current);
                self.batch.first_commit.get_or_insert(self.current_commit);
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

    /// The statement that records the batch's position, run in the same
    /// secondary transaction as the batch; None if the batch is empty.
    pub fn position_sql(&self) -> Option<String> {
        let end = self.batch.end_lsn?;
        Some(format!(
            "INSERT INTO {APPLIED_TABLE} (slot, lsn, applied_at) VALUES ({}, '{end}', now()) \
             ON CONFLICT (slot) DO UPDATE SET lsn = EXCLUDED.lsn, applied_at = EXCLUDED.applied_at",
            quote_literal(&self.slot)
        ))
    }

    /// Takes the batch to apply. Its transactions count as applied only
    /// once [`Applier::committed`] says the secondary committed them;
    /// until then the next batch builds up behind it.
    pub fn take_batch(&mut self) -> Batch {
        std::mem::take(&mut self.batch)
    }

    /// Marks everything up to `end` as committed on the secondary.
    pub fn committed(&mut self, end: Lsn) {
        self.applied = self.applied.max(end);
    }

    /// Adds to the transaction being received a delete of every row of
    /// `rel` other than `new`'s own (by key) that holds `new`'s values in
    /// `unique`'s columns (and, for a partial index, where both rows meet
    /// its predicate): the rows that unique index would make the upsert of
    /// `new` collide with. For a source whose log misses the rows a write
    /// removed to keep a unique constraint (SQLite's REPLACE deletes
    /// without firing delete triggers). A NULL in `new` matches nothing,
    /// as NULLs never collide.
    pub fn evict_collisions(
        &mut self,
        rel: u32,
        new: &[Datum],
        unique: &Unique,
    ) -> Result<(), StreamError> {
        let r = self.relation(rel)?;
        check_width(r, new)?;
        let mut parts = Vec::new();
        let mut params = Vec::new();
        for name in &unique.columns {
            let i = r
                .columns
                .iter()
                .position(|c| &c.name == name)
                .ok_or_else(|| {
                    StreamError::Protocol(format!("{} has no column {name}", table(r)))
                })?;
            match &new[i] {
                Datum::Text(t) => {
                    params.push(Some(t.clone()));
                    parts.push(format!("{} = ${}", quote_ident(name), params.len()));
                }
                Datum::Null | Datum::Unchanged => return Ok(()),
            }
        }
        let (own, key_params) = key_match(r, new, params.len() + 1)?;
        params.extend(key_params);
        parts.push(format!("NOT ({own})"));
        if let Some(partial) = &unique.partial {
            if partial.types.len() != r.columns.len() {
                return Err(StreamError::Protocol(format!(
                    "the partial index on {} names {} column types for {} columns",
                    table(r),
                    partial.types.len(),
                    r.columns.len()
                )));
            }
            // The predicate on the row evicted, and on `new` (its values
            // as a row of the same column names, which the predicate's
            // names find first).
            let mut values = Vec::new();
            for (d, ty) in new.iter().zip(&partial.types) {
                params.push(text_of(d));
                values.push(format!("${}::{ty}", params.len()));
            }
            let names: Vec<String> = r.columns.iter().map(|c| quote_ident(&c.name)).collect();
            parts.push(format!("({})", partial.predicate));
            parts.push(format!(
                "EXISTS (SELECT FROM (VALUES ({})) AS \"new\" ({}) WHERE {})",
                values.join(", "),
                names.join(", "),
                partial.predicate
            ));
        }
        let op = Op {
            sql: format!("DELETE FROM {} WHERE {}", table(r), parts.join(" AND ")).into(),
            params,
            kind: OpKind::Row { table: table(r) },
        };
        self.current.push(op);
        Ok(())
    }

    fn is_own(&self, oid: u32) -> bool {
        self.relations.get(&oid).is_some_and(|r| r.schema == SCHEMA)
    }

    fn relation(&self, oid: u32) -> Result<&Relation, StreamError> {
        self.relations
            .get(&oid)
            .ok_or_else(|| StreamError::Protocol(format!("change for unknown relation {oid}")))
    }

    fn upsert(&mut self, oid: u32, new: &[Datum]) -> Result<Op, StreamError> {
        let r = self.relation(oid)?;
        check_width(r, new)?;
        let (sql, upsert) = match self.upserts.get(&oid) {
            Some(shape) => shape.clone(),
            None => {
                let shape = upsert_shape(r)?;
                self.upserts.insert(oid, shape.clone());
                shape
            }
        };
        Ok(Op {
            sql,
            params: new.iter().map(text_of).collect(),
            kind: OpKind::Upsert(upsert),
        })
    }

    fn delete(&self, oid: u32, old: &[Datum]) -> Result<Op, StreamError> {
        let r = self.relation(oid)?;
        let (cond, params) = match &r.keyless_types {
            Some(types) => one_row_match(r, types, old, 1)?,
            None => key_match(r, old, 1)?,
        };
        Ok(Op {
            sql: format!("DELETE FROM {} WHERE {cond}", table(r)).into(),
            params,
            kind: OpKind::Row { table: table(r) },
        })
    }

    fn update(
        &mut self,
        oid: u32,
        old: Option<&[Datum]>,
        new: &[Datum],
    ) -> Result<Vec<Op>, StreamError> {
        let r = self.relation(oid)?;
        check_width(r, new)?;
        if r.keyless_types.is_none() && !new.contains(&Datum::Unchanged) {
            let mut ops = Vec::new();
            if let Some(old) = old {
                // The key changed (or identity is full): the row moves.
                ops.push(self.delete(oid, old)?);
            }
            ops.push(self.upsert(oid, new)?);
            return Ok(ops);
        }
        // Unchanged TOAST values were not sent: set only what was. (A table
        // without a key always takes this path: its row is found by its
        // old values and updated in place.)
        let mut params = Vec::new();
        let mut sets = Vec::new();
        for (c, d) in r.columns.iter().zip(new) {
            if *d != Datum::Unchanged {
                params.push(text_of(d));
                sets.push(format!("{} = ${}", quote_ident(&c.name), params.len()));
            }
        }
        let (cond, key_params) = match (&r.keyless_types, old) {
            (Some(types), Some(old)) => one_row_match(r, types, old, params.len() + 1)?,
            (Some(_), None) => {
                return Err(StreamError::Protocol(format!(
                    "update of {} without its old row (the table has no key and needs REPLICA IDENTITY FULL)",
                    table(r)
                )))
            }
            (None, old) => key_match(r, old.unwrap_or(new), params.len() + 1)?,
        };
        params.extend(key_params);
        Ok(vec![Op {
            sql: format!("UPDATE {} SET {} WHERE {cond}", table(r), sets.join(", ")).into(),
            params,
            kind: OpKind::Row { table: table(r) },
        }])
    }
}

/// The single-row upsert statement of a relation, and its parts. A table
/// without a key gets a plain INSERT: every row image is a row of its own
/// (its "key" for [`plan`] is the whole row).
fn upsert_shape(r: &Relation) -> Result<(Arc<str>, Arc<Upsert>), StreamError> {
    let cols: Vec<String> = r.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
    let (conflict, key_positions) = if r.keyless_types.is_some() {
        (String::new(), (0..cols.len()).collect())
    } else {
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
        let positions = r
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
            .collect();
        (
            format!("ON CONFLICT ({}) {action}", keys.join(", ")),
            positions,
        )
    };
    let sql = format!(
        "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({}) {conflict}",
        table(r),
        cols.join(", "),
        placeholders.join(", "),
    );
    let upsert = Upsert {
        table: table(r),
        columns: r.columns.iter().map(|c| c.name.clone()).collect(),
        conflict,
        key_positions,
    };
    Ok((sql.trim_end().into(), Arc::new(upsert)))
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

/// For a table without a key: `ctid = (one row whose every column equals
/// the old row image)`, and its parameters. Values are compared in their
/// text form after a round trip through the column's type (so the
/// comparison is exact for every type, including those without `=`, such
/// as json or point); NULLs match NULLs; unchanged TOAST values are left
/// out of the match. Of identical rows any one will do: they are
/// indistinguishable.
fn one_row_match(
    r: &Relation,
    types: &[String],
    tuple: &[Datum],
    first: usize,
) -> Result<(String, Vec<Option<String>>), StreamError> {
    check_width(r, tuple)?;
    let mut parts = Vec::new();
    let mut params = Vec::new();
    for ((c, ty), d) in r.columns.iter().zip(types).zip(tuple) {
        let column = quote_ident(&c.name);
        match d {
            Datum::Text(t) => {
                params.push(Some(t.clone()));
                parts.push(format!(
                    "{column}::text = ${}::{ty}::text",
                    first + params.len() - 1
                ));
            }
            Datum::Null => parts.push(format!("{column} IS NULL")),
            Datum::Unchanged => {}
        }
    }
    if parts.is_empty() {
        parts.push("true".to_string());
    }
    Ok((
        format!(
            "ctid = (SELECT ctid FROM {} WHERE {} LIMIT 1)",
            table(r),
            parts.join(" AND ")
        ),
        params,
    ))
}

/// `"k1" = $n AND "k2" = $n+1` and its parameters, from a key (or full) tuple.
fn key_match(
    r: &Relation,
    tuple: &[Datum],
    first: usize,
) -> Result<(String, Vec<Option<String>>), StreamError> {
    check_width(r, tuple)?;
    let mut parts = Vec::new();
    let mut params = Vec::new();
    for (c, d) in r.columns.iter().zip(tuple).filter(|(c, _)| c.is_key) {
        match d {
            Datum::Text(t) => {
                params.push(Some(t.clone()));
                parts.push(format!(
                    "{} = ${}",
                    quote_ident(&c.name),
                    first + params.len() - 1
                ));
            }
            _ => {
                return Err(StreamError::Protocol(format!(
                    "key column {} of {} arrived without a value",
                    c.name,
                    table(r)
                )))
            }
        }
    }
    if parts.is_empty() {
        return Err(no_key(r));
    }
    Ok((parts.join(" AND "), params))
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
            identity: b'd',
            keyless_types: None,
        }
    }

    fn text(s: &str) -> Datum {
        Datum::Text(s.into())
    }

    fn other_rel() -> Relation {
        let mut r = rel();
        r.oid = 2;
        r.name = "other".into();
        r
    }

    fn applier_with_relations() -> Applier {
        let mut a = Applier::new("s", Lsn(0));
        a.feed(Logical::Relation(rel())).unwrap();
        a.feed(Logical::Relation(other_rel())).unwrap();
        a
    }

    fn upsert(a: &mut Applier, rel: u32, id: &str) -> Op {
        a.upsert(rel, &[text(id), text("b"), Datum::Null]).unwrap()
    }

    #[test]
    fn collisions_are_evicted_by_unique_values_sparing_the_row_itself() {
        let mut a = applier_with_relations();
        a.feed(Logical::Begin {
            final_lsn: Lsn(1),
            xid: 1,
        })
        .unwrap();
        let row = [text("7"), text("slug"), text("3")];
        let unique = |columns: &[&str]| Unique {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            partial: None,
        };
        a.evict_collisions(1, &row, &unique(&["body", "n"]))
            .unwrap();
        // A NULL never collides: nothing to evict.
        a.evict_collisions(1, &[text("8"), Datum::Null, text("3")], &unique(&["body"]))
            .unwrap();
        assert_eq!(a.current.len(), 1);
        assert_eq!(
            &*a.current[0].sql,
            r#"DELETE FROM "public"."it's" WHERE "body" = $1 AND "n" = $2 AND NOT ("id" = $3)"#
        );
        assert_eq!(
            a.current[0].params,
            vec![Some("slug".into()), Some("3".into()), Some("7".into())]
        );
        assert!(a.evict_collisions(1, &row, &unique(&["nope"])).is_err());
        // A partial index: the predicate holds for the row evicted and for
        // the new row, read from its image.
        let partial = Unique {
            columns: vec!["body".into()],
            partial: Some(Partial {
                predicate: r#""n" > 0"#.into(),
                types: vec!["integer".into(), "text".into(), "integer".into()],
            }),
        };
        a.evict_collisions(1, &row, &partial).unwrap();
        assert_eq!(
            &*a.current[1].sql,
            r#"DELETE FROM "public"."it's" WHERE "body" = $1 AND NOT ("id" = $2) AND ("n" > 0) AND EXISTS (SELECT FROM (VALUES ($3::integer, $4::text, $5::integer)) AS "new" ("id", "body", "n") WHERE "n" > 0)"#
        );
        assert_eq!(a.current[1].params.len(), 5);
    }

    #[test]
    fn plan_merges_upserts_per_table_and_keeps_order_within_each() {
        let mut a = applier_with_relations();
        let ops = vec![
            upsert(&mut a, 1, "1"),
            upsert(&mut a, 2, "1"),
            upsert(&mut a, 1, "2"),
            upsert(&mut a, 2, "2"),
            upsert(&mut a, 1, "3"),
        ];
        assert_eq!(
            plan(&ops),
            vec![Step::Upserts(vec![0, 2, 4]), Step::Upserts(vec![1, 3])]
        );
    }

    #[test]
    fn plan_splits_at_repeated_keys_deletes_and_truncates() {
        let mut a = applier_with_relations();
        let delete = a.delete(1, &[text("9"), Datum::Null, Datum::Null]).unwrap();
        let truncate = Op {
            sql: "TRUNCATE x".into(),
            params: vec![],
            kind: OpKind::Barrier,
        };
        let ops = vec![
            upsert(&mut a, 1, "1"),
            upsert(&mut a, 1, "2"),
            upsert(&mut a, 1, "1"),
            delete,
            upsert(&mut a, 1, "4"),
            upsert(&mut a, 2, "1"),
            truncate,
            upsert(&mut a, 2, "2"),
            upsert(&mut a, 2, "3"),
        ];
        assert_eq!(
            plan(&ops),
            vec![
                Step::Upserts(vec![0, 1]),
                Step::Single(2),
                Step::Single(3),
                Step::Single(4),
                Step::Single(5),
                Step::Single(6),
                Step::Upserts(vec![7, 8]),
            ]
        );
    }

    #[test]
    fn builds_parameterized_statements_in_commit_order() {
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
        a.feed(Logical::Update {
            rel: 1,
            old: Some(vec![text("1"), Datum::Null, Datum::Null]),
            new: vec![text("7"), text("b"), text("6")],
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
        let ops = &a.batch.ops;
        assert_eq!(ops.len(), 5);
        assert_eq!(
            &*ops[0].sql,
            "INSERT INTO \"public\".\"it's\" (\"id\", \"body\", \"n\") OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3) ON CONFLICT (\"id\") DO UPDATE SET \"body\" = EXCLUDED.\"body\", \"n\" = EXCLUDED.\"n\""
        );
        assert_eq!(
            ops[0].params,
            vec![Some("1".into()), Some("o'k".into()), None]
        );
        assert_eq!(
            &*ops[1].sql,
            "UPDATE \"public\".\"it's\" SET \"id\" = $1, \"n\" = $2 WHERE \"id\" = $3"
        );
        assert_eq!(
            ops[1].params,
            vec![Some("1".into()), Some("5".into()), Some("1".into())]
        );
        assert_eq!(
            &*ops[2].sql,
            "DELETE FROM \"public\".\"it's\" WHERE \"id\" = $1"
        );
        assert_eq!(ops[2].params, vec![Some("1".into())]);
        assert!(ops[3].sql.starts_with("INSERT INTO"));
        assert_eq!(ops[4].params, vec![Some("2".into())]);
        assert!(a
            .position_sql()
            .unwrap()
            .contains("VALUES ('slot', '0/B', now())"));
        let batch = a.take_batch();
        assert_eq!(
            a.applied(),
            Lsn(0),
            "not applied before the secondary commits"
        );
        a.committed(batch.end_lsn.unwrap());
        assert_eq!(a.applied(), Lsn(11));
        assert_eq!(a.position_sql(), None);
    }

    #[test]
    fn tables_without_a_key_insert_and_match_whole_rows() {
        let mut keyless = rel();
        for c in &mut keyless.columns {
            c.is_key = true;
        }
        keyless.identity = b'f';
        keyless.keyless_types = Some(vec!["integer".into(), "text".into(), "json".into()]);
        let mut a = Applier::new("slot", Lsn(0));
        a.feed(Logical::Relation(keyless)).unwrap();
        let insert = a.upsert(1, &[text("1"), text("b"), Datum::Null]).unwrap();
        assert_eq!(
            &*insert.sql,
            "INSERT INTO \"public\".\"it's\" (\"id\", \"body\", \"n\") OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3)"
        );
        let twice = vec![insert.clone(), insert.clone()];
        assert_eq!(plan(&twice), vec![Step::Single(0), Step::Single(1)]);
        let delete = a.delete(1, &[text("1"), Datum::Null, text("{}")]).unwrap();
        assert_eq!(
            &*delete.sql,
            "DELETE FROM \"public\".\"it's\" WHERE ctid = (SELECT ctid FROM \"public\".\"it's\" \
             WHERE \"id\"::text = $1::integer::text AND \"body\" IS NULL AND \"n\"::text = $2::json::text LIMIT 1)"
        );
        assert_eq!(delete.params, vec![Some("1".into()), Some("{}".into())]);
        let update = a
            .update(
                1,
                Some(&[text("1"), text("b"), text("[]")]),
                &[text("2"), Datum::Unchanged, text("[]")],
            )
            .unwrap();
        assert_eq!(update.len(), 1);
        assert_eq!(
            &*update[0].sql,
            "UPDATE \"public\".\"it's\" SET \"id\" = $1, \"n\" = $2 WHERE ctid = (SELECT ctid FROM \"public\".\"it's\" \
             WHERE \"id\"::text = $3::integer::text AND \"body\"::text = $4::text::text AND \"n\"::text = $5::json::text LIMIT 1)"
        );
        assert!(a
            .update(1, None, &[text("2"), text("b"), Datum::Null])
            .is_err());
    }

    #[test]
    fn the_earliest_pending_commit_is_known() {
        let mut a = Applier::new("slot", Lsn(0));
        a.feed(Logical::Relation(rel())).unwrap();
        assert_eq!(a.earliest_pending(), None);
        let begin = |lsn| Logical::Begin {
            final_lsn: Lsn(lsn),
            xid: 1,
        };
        let commit = |lsn| Logical::Commit {
            commit_lsn: Lsn(lsn),
            end_lsn: Lsn(lsn + 1),
        };
        a.feed(begin(10)).unwrap();
        assert_eq!(a.earliest_pending(), Some(Lsn(10)));
        a.feed(commit(10)).unwrap();
        a.feed(begin(20)).unwrap();
        assert_eq!(a.earliest_pending(), Some(Lsn(10)), "the batch's first");
        let batch = a.take_batch();
        assert_eq!(batch.first_commit, Some(Lsn(10)));
        assert_eq!(
            a.earliest_pending(),
            Some(Lsn(20)),
            "the one being received"
        );
        a.feed(commit(20)).unwrap();
        assert_eq!(a.take_batch().first_commit, Some(Lsn(20)));
        assert_eq!(a.earliest_pending(), None);
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
        assert_eq!(a.position_sql(), None);
    }
}
