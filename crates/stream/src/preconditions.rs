//! Checks made before mirroring starts, each failing with the fix.

use crate::StreamError;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_postgres::Client;

/// How long a slot held by a walsender is watched for release.
const SLOT_RELEASE_CHECKS: u32 = 10;
const SLOT_RELEASE_DELAY: Duration = Duration::from_millis(500);

/// A user table to mirror: schema, name, and its columns in order with types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    pub schema: String,
    pub name: String,
    pub columns: Vec<(String, String)>,
    /// No primary key: REPLICA IDENTITY FULL (the preconditions refuse
    /// anything else), rows matched by their whole contents.
    pub keyless: bool,
}

impl TableShape {
    pub fn qualified(&self) -> String {
        format!(
            "{}.{}",
            crate::applier::quote_ident(&self.schema),
            crate::applier::quote_ident(&self.name)
        )
    }
}

const USER_TABLES: &str = "SELECT n.nspname, c.relname, \
       coalesce(array_agg(a.attname::text || ' ' || format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) \
                FILTER (WHERE a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''), '{}'), \
       NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     LEFT JOIN pg_attribute a ON a.attrelid = c.oid \
     WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
       AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'cutover') AND n.nspname NOT LIKE 'pg_toast%' \
       AND n.nspname NOT LIKE 'pg_temp%' \
     GROUP BY n.nspname, c.relname, c.oid ORDER BY 1, 2";

/// Tables (partitions included: their rows are what UPDATE and DELETE
/// touch) whose changes cannot be mirrored: no primary key and not
/// REPLICA IDENTITY FULL, or an identity cutover does not apply by.
/// Publishing such a table would also make UPDATE and DELETE on it fail.
const IDENTITY_PROBLEMS: &str =
    "SELECT format('%I.%I', n.nspname, c.relname), c.relreplident::text \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' \
       AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'cutover') \
       AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' \
       AND (c.relreplident IN ('i', 'n') OR (c.relreplident = 'd' AND NOT EXISTS \
            (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))) \
     ORDER BY 1";

/// The identity check of one database: the error naming every table
/// whose changes could not be applied by key or by whole row, and the fix.
async fn check_identities(client: &Client, database: &str) -> Result<(), StreamError> {
    let rows = client.query(IDENTITY_PROBLEMS, &[]).await?;
    let named = |identity: &str| -> Vec<String> {
        rows.iter()
            .filter(|r| r.get::<_, String>(1) == identity)
            .map(|r| r.get(0))
            .collect()
    };
    let (no_key, index, nothing) = (named("d"), named("i"), named("n"));
    let mut problems = Vec::new();
    if !no_key.is_empty() {
        problems.push(format!(
            "tables without a primary key cannot be mirrored as they are: {}; add a primary key to each, \
             or run ALTER TABLE <table> REPLICA IDENTITY FULL (cutover then matches their rows by whole \
             contents, which makes each update and delete scan the table on the new database)",
            no_key.join(", ")
        ));
    }
    if !index.is_empty() || !nothing.is_empty() {
        let both: Vec<String> = index.into_iter().chain(nothing).collect();
        problems.push(format!(
            "tables with REPLICA IDENTITY USING INDEX or NOTHING are not supported: {}; \
             run ALTER TABLE <table> REPLICA IDENTITY DEFAULT (with a primary key) or FULL",
            both.join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(StreamError::Precondition(format!(
            "{database}: {}",
            problems.join("; ")
        )))
    }
}

/// The user tables of a database with their columns.
pub async fn user_tables(client: &Client) -> Result<Vec<TableShape>, StreamError> {
    Ok(client
        .query(USER_TABLES, &[])
        .await?
        .into_iter()
        .map(|row| {
            let cols: Vec<String> = row.get(2);
            TableShape {
                schema: row.get(0),
                name: row.get(1),
                columns: cols
                    .into_iter()
                    .map(|c| match c.split_once(' ') {
                        Some((n, t)) => (n.to_string(), t.to_string()),
                        None => (c, String::new()),
                    })
                    .collect(),
                keyless: row.get(3),
            }
        })
        .collect())
}

/// Verifies the old database can be the stream's source: logical WAL, a
/// role that may replicate, a free slot, tables whose changes can be
/// applied by key or by whole row.
pub async fn check_source(
    old: &Client,
    old_url: &cutover_config::BackendUrl,
    slot: &str,
) -> Result<(), StreamError> {
    let (old_address, user) = (old_url.address(), &old_url.user);
    let wal_level: String = old.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(StreamError::Precondition(format!(
            "old backend {old_address}: wal_level is '{wal_level}'; set wal_level = logical and restart it"
        )));
    }
    let privileged: bool = old
        .query_one(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?
        .get(0);
    if !privileged {
        return Err(StreamError::Precondition(format!(
            "old backend {old_address}: role \"{user}\" may not replicate; run ALTER ROLE \"{user}\" REPLICATION"
        )));
    }
    // A slot of this name held by another connection: something else
    // consumes it (or another cutover runs against this database). Our
    // own previous walsender may take a moment to go away, so look again
    // for a few seconds before calling it someone else's.
    let mut holder = None;
    for attempt in 0..SLOT_RELEASE_CHECKS {
        if attempt > 0 {
            tokio::time::sleep(SLOT_RELEASE_DELAY).await;
        }
        holder = old
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&slot],
            )
            .await?;
        if holder.is_none() {
            break;
        }
    }
    if let Some(row) = holder {
        let pid: Option<i32> = row.try_get(0)?;
        return Err(StreamError::Precondition(format!(
            "old backend {old_address}: replication slot \"{slot}\" is in use by another connection (pid {}); \
             stop whatever consumes it (another cutover?), or drop it with SELECT pg_drop_replication_slot('{slot}') once it is free",
            pid.map_or("unknown".to_string(), |p| p.to_string())
        )));
    }
    let slots = old
        .query_one(
            "SELECT current_setting('max_replication_slots')::int, \
                    (SELECT count(*)::int FROM pg_replication_slots WHERE slot_name <> $1)",
            &[&slot],
        )
        .await?;
    let (max, used): (i32, i32) = (slots.get(0), slots.get(1));
    if used >= max {
        return Err(StreamError::Precondition(format!(
            "old backend {old_address}: all {max} replication slots are in use; raise max_replication_slots and restart, or drop an unused slot"
        )));
    }
    check_identities(old, &format!("old backend {old_address}")).await?;
    // After promote old receives the reverse stream, applied as a replica.
    check_replica_role(old, &format!("old backend {old_address}"), user).await
}

/// Verifies the stream's target lets cutover do its work there: set
/// `session_replication_role` and keep its bookkeeping in schema `cutover`.
pub async fn check_target(
    new: &Client,
    new_url: &cutover_config::BackendUrl,
) -> Result<(), StreamError> {
    let (database, user) = (format!("new backend {}", new_url.address()), &new_url.user);
    check_replica_role(new, &database, user).await?;
    let can_create: bool = new
        .query_one(
            "SELECT has_database_privilege(current_user, current_database(), 'CREATE') \
                 OR has_schema_privilege(current_user, (SELECT oid FROM pg_namespace WHERE nspname = 'cutover'), 'CREATE')",
            &[],
        )
        .await?
        .try_get::<_, Option<bool>>(0)?
        .unwrap_or(false);
    if !can_create {
        return Err(StreamError::Precondition(format!(
            "{database}: role \"{user}\" may not create schema cutover, where cutover records its position; \
             run GRANT CREATE ON DATABASE \"{}\" TO \"{user}\" (or use the database owner)",
            new_url.database
        )));
    }
    Ok(())
}

/// The applier writes with `session_replication_role = replica` (so the
/// target's triggers and foreign-key checks do not fire again): the role
/// must be allowed to set it.
async fn check_replica_role(
    client: &Client,
    database: &str,
    user: &str,
) -> Result<(), StreamError> {
    let allowed = client
        .batch_execute("BEGIN; SET LOCAL session_replication_role = replica; ROLLBACK")
        .await;
    match allowed {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(StreamError::Precondition(format!(
                "{database}: role \"{user}\" may not set session_replication_role, which cutover applies \
                 changes with; run GRANT SET ON PARAMETER session_replication_role TO \"{user}\" (or use a superuser)"
            )))
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e.into())
        }
    }
}

/// Verifies the new database can receive old's tables (after
/// [`check_source`] and [`check_target`]); returns the tables.
pub async fn check(
    old: &Client,
    new: &Client,
    new_url: &cutover_config::BackendUrl,
) -> Result<Vec<TableShape>, StreamError> {
    // After promote the new database is published for the stream back to
    // old, so its tables must qualify too.
    check_identities(new, &format!("new backend {}", new_url.address())).await?;
    let old_tables = user_tables(old).await?;
    let new_tables: BTreeMap<(String, String), TableShape> = user_tables(new)
        .await?
        .into_iter()
        .map(|t| ((t.schema.clone(), t.name.clone()), t))
        .collect();
    for t in &old_tables {
        let Some(n) = new_tables.get(&(t.schema.clone(), t.name.clone())) else {
            return Err(StreamError::Precondition(format!(
                "table {} is missing on the new database; create it with the same columns",
                t.qualified()
            )));
        };
        for (i, (name, ty)) in t.columns.iter().enumerate() {
            match n.columns.get(i) {
                Some((n_name, n_ty)) if n_name == name && n_ty == ty => {}
                Some((n_name, n_ty)) => {
                    return Err(StreamError::Precondition(format!(
                        "table {} differs on the new database: column {} is `{name} {ty}` on old but `{n_name} {n_ty}` on new",
                        t.qualified(),
                        i + 1
                    )))
                }
                None => {
                    return Err(StreamError::Precondition(format!(
                        "table {} differs on the new database: column `{name} {ty}` is missing",
                        t.qualified()
                    )))
                }
            }
        }
        if n.columns.len() > t.columns.len() {
            return Err(StreamError::Precondition(format!(
                "table {} differs on the new database: it has extra column `{}`",
                t.qualified(),
                n.columns[t.columns.len()].0
            )));
        }
    }
    Ok(old_tables)
}
