//! The schema on new: the tables mirroring needs that new lacks, created
//! from old's catalog (what `pg_dump --schema-only` would write for them):
//! extensions, schemas, enums, domains and composite types, sequences,
//! tables with their column types, defaults, identities, generated
//! columns and partitioning, partitions, keys, uniques, checks, indexes,
//! foreign keys, replica identity, owner and grants. Tables that already
//! exist on new are left as they are (the preconditions check them).
//!
//! Everything runs in one transaction on new, so a failure leaves nothing
//! half-made. Functions, triggers, views, policies and publications are
//! not created.

use crate::applier::{quote_ident, quote_literal};
use crate::StreamError;
use tokio_postgres::Client;

/// User schemas: not PostgreSQL's own, not cutover's.
const USER_SCHEMA: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'cutover') \
     AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'";

/// The statements that create on new what old has and new lacks, in an
/// order PostgreSQL accepts; empty when new has every table.
pub async fn missing_ddl(old: &Client, new: &Client) -> Result<Vec<String>, StreamError> {
    let tables = missing_tables(old, new).await?;
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let mut ddl = Vec::new();
    ddl.extend(extensions(old, new).await?);
    ddl.extend(schemas(old, new, &tables).await?);
    ddl.extend(types(old, new).await?);
    ddl.extend(sequences(old, new).await?);
    let mut after = Vec::new();
    for t in &tables {
        ddl.push(create_table(old, t).await?);
        ddl.extend(constraints(old, t, "p', 'u', 'c', 'x").await?);
        ddl.extend(indexes(old, t).await?);
        after.extend(constraints(old, t, "f").await?);
        after.extend(table_extras(old, new, t).await?);
    }
    ddl.extend(after);
    ddl.extend(owned_sequences(old, &tables).await?);
    Ok(ddl)
}

/// Creates on new what [`missing_ddl`] lists, in one transaction; returns
/// the statements run.
pub async fn create_missing(old: &Client, new: &Client) -> Result<Vec<String>, StreamError> {
    let ddl = missing_ddl(old, new).await?;
    if ddl.is_empty() {
        return Ok(ddl);
    }
    let script = format!("BEGIN; {}; COMMIT", ddl.join(";\n"));
    if let Err(e) = new.batch_execute(&script).await {
        let _ = new.batch_execute("ROLLBACK").await;
        let e = StreamError::from(e);
        return Err(StreamError::Precondition(format!(
            "new database: creating the missing tables from old's definition failed: {e}; \
             create them by hand (pg_dump --schema-only) and start again"
        )));
    }
    tracing::info!(
        statements = ddl.len(),
        "created the missing schema on the new database"
    );
    Ok(ddl)
}

/// A table on old that new lacks.
#[derive(Debug, Clone)]
struct Missing {
    oid: u32,
    schema: String,
    qualified: String,
    partition: bool,
}

async fn missing_tables(old: &Client, new: &Client) -> Result<Vec<Missing>, StreamError> {
    let sql = format!(
        "SELECT c.oid, n.nspname::text, format('%I.%I', n.nspname, c.relname), c.relispartition \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p') AND {USER_SCHEMA} \
         ORDER BY (SELECT count(*) FROM pg_partition_ancestors(c.oid)), 3"
    );
    let on_old = old.query(&sql, &[]).await?;
    let on_new: Vec<String> = new
        .query(&sql, &[])
        .await?
        .iter()
        .map(|r| r.try_get(2))
        .collect::<Result<_, _>>()?;
    let mut missing = Vec::new();
    for r in on_old {
        let qualified: String = r.try_get(2)?;
        if !on_new.contains(&qualified) {
            missing.push(Missing {
                oid: r.try_get(0)?,
                schema: r.try_get(1)?,
                qualified,
                partition: r.try_get(3)?,
            });
        }
    }
    Ok(missing)
}

/// Names (one text column) old has and new lacks, by the same query.
async fn only_on_old(old: &Client, new: &Client, sql: &str) -> Result<Vec<String>, StreamError> {
    let names = |rows: Vec<tokio_postgres::Row>| -> Result<Vec<String>, StreamError> {
        Ok(rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?)
    };
    let on_new = names(new.query(sql, &[]).await?)?;
    Ok(names(old.query(sql, &[]).await?)?
        .into_iter()
        .filter(|n| !on_new.contains(n))
        .collect())
}

async fn extensions(old: &Client, new: &Client) -> Result<Vec<String>, StreamError> {
    let missing = only_on_old(
        old,
        new,
        "SELECT extname::text FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1",
    )
    .await?;
    Ok(missing
        .iter()
        .map(|e| format!("CREATE EXTENSION IF NOT EXISTS {}", quote_ident(e)))
        .collect())
}

async fn schemas(
    old: &Client,
    new: &Client,
    tables: &[Missing],
) -> Result<Vec<String>, StreamError> {
    let missing = only_on_old(
        old,
        new,
        &format!("SELECT n.nspname::text FROM pg_namespace n WHERE {USER_SCHEMA} ORDER BY 1"),
    )
    .await?;
    let mut ddl = Vec::new();
    for schema in missing
        .iter()
        .filter(|s| tables.iter().any(|t| &t.schema == *s))
    {
        ddl.push(format!("CREATE SCHEMA {}", quote_ident(schema)));
        ddl.extend(owner_and_grants(old, new, Object::Schema(schema)).await?);
    }
    Ok(ddl)
}

/// Enums, then domains, then composite types: the user's own types (not
/// an extension's, not a table's row type) that new lacks.
async fn types(old: &Client, new: &Client) -> Result<Vec<String>, StreamError> {
    let list = |kind: &str| {
        format!(
            "SELECT format('%I.%I', n.nspname, t.typname) FROM pg_type t \
             JOIN pg_namespace n ON n.oid = t.typnamespace \
             WHERE t.typtype = '{kind}' AND {USER_SCHEMA} \
               AND (t.typrelid = 0 OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c') \
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = t.oid AND d.deptype = 'e') \
             ORDER BY t.oid"
        )
    };
    let mut ddl = Vec::new();
    for name in only_on_old(old, new, &list("e")).await? {
        let labels: Vec<String> = old
            .query(
                "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1::text::regtype ORDER BY enumsortorder",
                &[&name],
            )
            .await?
            .iter()
            .map(|r| r.try_get::<_, String>(0).map(|l| quote_literal(&l)))
            .collect::<Result<_, _>>()?;
        ddl.push(format!(
            "CREATE TYPE {name} AS ENUM ({})",
            labels.join(", ")
        ));
    }
    for name in only_on_old(old, new, &list("d")).await? {
        let row = old
            .query_one(
                "SELECT format_type(t.typbasetype, t.typtypmod), t.typdefault, t.typnotnull, \
                        coalesce((SELECT string_agg(format('CONSTRAINT %I %s', conname, pg_get_constraintdef(oid)), ' ' ORDER BY conname) \
                                  FROM pg_constraint WHERE contypid = t.oid), '') \
                 FROM pg_type t WHERE t.oid = $1::text::regtype",
                &[&name],
            )
            .await?;
        let (base, default, not_null, checks): (String, Option<String>, bool, String) = (
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
        );
        let mut sql = format!("CREATE DOMAIN {name} AS {base}");
        if let Some(d) = default {
            sql.push_str(&format!(" DEFAULT {d}"));
        }
        if not_null {
            sql.push_str(" NOT NULL");
        }
        if !checks.is_empty() {
            sql.push(' ');
            sql.push_str(&checks);
        }
        ddl.push(sql);
    }
    for name in only_on_old(old, new, &list("c")).await? {
        let attrs: Vec<String> = old
            .query(
                "SELECT format('%I %s', a.attname, format_type(a.atttypid, a.atttypmod)) \
                 FROM pg_attribute a JOIN pg_type t ON t.typrelid = a.attrelid \
                 WHERE t.oid = $1::text::regtype AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&name],
            )
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        ddl.push(format!("CREATE TYPE {name} AS ({})", attrs.join(", ")));
    }
    Ok(ddl)
}

/// Sequences new lacks that no identity column owns (identities bring
/// their own), with their options; values are set after the copy.
async fn sequences(old: &Client, new: &Client) -> Result<Vec<String>, StreamError> {
    let missing = only_on_old(
        old,
        new,
        &format!(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'S' AND {USER_SCHEMA} \
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'i') \
             ORDER BY 1"
        ),
    )
    .await?;
    let mut ddl = Vec::new();
    for name in missing {
        let (ty, options) = sequence_definition(old, &name).await?;
        ddl.push(format!("CREATE SEQUENCE {name} AS {ty} {options}"));
        ddl.extend(owner_and_grants(old, new, Object::Relation("SEQUENCE", &name)).await?);
    }
    Ok(ddl)
}

/// A sequence's type and its options (`START WITH ... [NO] CYCLE`), as
/// old has them.
async fn sequence_definition(old: &Client, name: &str) -> Result<(String, String), StreamError> {
    let row = old
        .query_one(
            "SELECT format_type(seqtypid, NULL), seqstart, seqincrement, seqmin, seqmax, seqcache, seqcycle \
             FROM pg_sequence WHERE seqrelid = $1::text::regclass",
            &[&name],
        )
        .await?;
    let (start, increment, min, max, cache, cycle): (i64, i64, i64, i64, i64, bool) = (
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
        row.try_get(5)?,
        row.try_get(6)?,
    );
    Ok((
        row.try_get(0)?,
        format!(
            "START WITH {start} INCREMENT BY {increment} MINVALUE {min} MAXVALUE {max} CACHE {cache} {}CYCLE",
            if cycle { "" } else { "NO " }
        ),
    ))
}

async fn create_table(old: &Client, t: &Missing) -> Result<String, StreamError> {
    let row = old
        .query_one(
            "SELECT pg_get_partkeydef(c.oid), pg_get_expr(c.relpartbound, c.oid), \
                    (SELECT format('%I.%I', pn.nspname, p.relname) FROM pg_inherits i \
                     JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace \
                     WHERE i.inhrelid = c.oid LIMIT 1) \
             FROM pg_class c WHERE c.oid = $1",
            &[&t.oid],
        )
        .await?;
    let (partition_key, bound, parent): (Option<String>, Option<String>, Option<String>) =
        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    let partitioned = partition_key
        .map(|k| format!(" PARTITION BY {k}"))
        .unwrap_or_default();
    if t.partition {
        let (Some(parent), Some(bound)) = (parent, bound) else {
            return Err(StreamError::Precondition(format!(
                "old database: partition {} has no parent or bound in the catalog",
                t.qualified
            )));
        };
        return Ok(format!(
            "CREATE TABLE {} PARTITION OF {parent} {bound}{partitioned}",
            t.qualified
        ));
    }
    let columns = old
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                    pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, a.attgenerated::text, \
                    CASE WHEN a.attcollation <> t.typcollation AND a.attcollation <> 0 \
                         THEN (SELECT format('%I.%I', cn.nspname, co.collname) FROM pg_collation co \
                               JOIN pg_namespace cn ON cn.oid = co.collnamespace WHERE co.oid = a.attcollation) END, \
                    pg_get_serial_sequence(format('%I.%I', n.nspname, c.relname), a.attname) \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&t.oid],
        )
        .await?;
    let mut defs = Vec::new();
    for c in columns {
        let name: String = c.try_get(0)?;
        let ty: String = c.try_get(1)?;
        let not_null: bool = c.try_get(2)?;
        let default: Option<String> = c.try_get(3)?;
        let identity: String = c.try_get(4)?;
        let generated: String = c.try_get(5)?;
        let collation: Option<String> = c.try_get(6)?;
        let sequence: Option<String> = c.try_get(7)?;
        let mut def = format!("{} {ty}", quote_ident(&name));
        if let Some(collation) = collation {
            def.push_str(&format!(" COLLATE {collation}"));
        }
        match (identity.as_str(), generated.as_str(), default) {
            ("a" | "d", _, _) => {
                let options = match &sequence {
                    Some(seq) => {
                        let (_, options) = sequence_definition(old, seq).await?;
                        format!(" (SEQUENCE NAME {seq} {options})")
                    }
                    None => String::new(),
                };
                let kind = if identity == "a" {
                    "ALWAYS"
                } else {
                    "BY DEFAULT"
                };
                def.push_str(&format!(" GENERATED {kind} AS IDENTITY{options}"));
            }
            (_, "s", Some(expr)) => def.push_str(&format!(" GENERATED ALWAYS AS ({expr}) STORED")),
            (_, _, Some(expr)) => def.push_str(&format!(" DEFAULT {expr}")),
            _ => {}
        }
        if not_null {
            def.push_str(" NOT NULL");
        }
        defs.push(def);
    }
    Ok(format!(
        "CREATE TABLE {} ({}){partitioned}",
        t.qualified,
        defs.join(", ")
    ))
}

/// The table's own constraints of the given kinds (`p', 'u` style list),
/// not those a partition inherits.
async fn constraints(old: &Client, t: &Missing, kinds: &str) -> Result<Vec<String>, StreamError> {
    let rows = old
        .query(
            &format!(
                "SELECT format('ALTER TABLE %s ADD CONSTRAINT %I %s', $2::text, conname, pg_get_constraintdef(oid)) \
                 FROM pg_constraint WHERE conrelid = $1 AND contype IN ('{kinds}') \
                   AND conparentid = 0 AND coninhcount = 0 \
                 ORDER BY contype DESC, conname"
            ),
            &[&t.oid, &t.qualified],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?)
}

/// Indexes that back no constraint and are not a partition's share of a
/// partitioned index (that one creates them).
async fn indexes(old: &Client, t: &Missing) -> Result<Vec<String>, StreamError> {
    let rows = old
        .query(
            "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i \
             WHERE i.indrelid = $1 \
               AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid AND c.contype IN ('p', 'u', 'x')) \
               AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid) \
             ORDER BY i.indexrelid",
            &[&t.oid],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?)
}

/// Replica identity, owner and grants of a created table.
async fn table_extras(old: &Client, new: &Client, t: &Missing) -> Result<Vec<String>, StreamError> {
    let mut ddl = Vec::new();
    let identity: String = old
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = $1",
            &[&t.oid],
        )
        .await?
        .try_get(0)?;
    if identity == "f" {
        ddl.push(format!("ALTER TABLE {} REPLICA IDENTITY FULL", t.qualified));
    }
    ddl.extend(owner_and_grants(old, new, Object::Relation("TABLE", &t.qualified)).await?);
    let identities = old
        .query(
            "SELECT pg_get_serial_sequence($2, a.attname) FROM pg_attribute a \
             WHERE a.attrelid = $1 AND a.attidentity <> '' AND NOT a.attisdropped",
            &[&t.oid, &t.qualified],
        )
        .await?;
    for row in identities {
        if let Some(sequence) = row.try_get::<_, Option<String>>(0)? {
            ddl.extend(owner_and_grants(old, new, Object::IdentitySequence(&sequence)).await?);
        }
    }
    Ok(ddl)
}

/// `ALTER SEQUENCE ... OWNED BY` for serial columns of created tables.
async fn owned_sequences(old: &Client, tables: &[Missing]) -> Result<Vec<String>, StreamError> {
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let rows = old
        .query(
            "SELECT format('ALTER SEQUENCE %s OWNED BY %s.%I', d.objid::regclass, d.refobjid::regclass, a.attname) \
             FROM pg_depend d JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
             WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass \
               AND d.deptype = 'a' AND d.refobjid = ANY($1) \
               AND (SELECT relkind FROM pg_class WHERE oid = d.objid) = 'S'",
            &[&oids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?)
}

/// What owner and grants are copied for.
enum Object<'a> {
    Schema(&'a str),
    /// `TABLE` or `SEQUENCE`, and its qualified name.
    Relation(&'a str, &'a str),
    /// An identity column's sequence: grants only (its owner is the table's).
    IdentitySequence(&'a str),
}

/// The object's owner (when that role exists on new) and its grants to
/// roles that exist on new, as old has them.
async fn owner_and_grants(
    old: &Client,
    new: &Client,
    object: Object<'_>,
) -> Result<Vec<String>, StreamError> {
    let with_owner = !matches!(object, Object::IdentitySequence(_));
    let (kind, name, sql_name, from) = match object {
        Object::Schema(schema) => (
            "SCHEMA",
            schema.to_string(),
            quote_ident(schema),
            "nspowner, nspacl FROM pg_namespace WHERE nspname = $1",
        ),
        Object::Relation(kind, relation) => (
            kind,
            relation.to_string(),
            relation.to_string(),
            "relowner, relacl FROM pg_class WHERE oid = $1::text::regclass",
        ),
        Object::IdentitySequence(sequence) => (
            "SEQUENCE",
            sequence.to_string(),
            sequence.to_string(),
            "0::oid, relacl FROM pg_class WHERE oid = $1::text::regclass",
        ),
    };
    let rows = old
        .query(
            &format!(
                "SELECT pg_get_userbyid(o.owner)::text, \
                        coalesce((SELECT array_agg(format('%s|%s', a.privilege_type, \
                                   CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END)) \
                                  FROM aclexplode(o.acl) a), '{{}}') \
                 FROM (SELECT {from}) o (owner, acl)"
            ),
            &[&name],
        )
        .await?;
    let Some(row) = rows.first() else {
        return Ok(Vec::new());
    };
    let (owner, grants): (String, Vec<String>) = (row.try_get(0)?, row.try_get(1)?);
    let roles: Vec<String> = new
        .query("SELECT rolname::text FROM pg_roles", &[])
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let mut ddl = Vec::new();
    if with_owner && roles.contains(&owner) {
        ddl.push(format!(
            "ALTER {kind} {sql_name} OWNER TO {}",
            quote_ident(&owner)
        ));
    }
    for grant in grants {
        let Some((privilege, grantee)) = grant.split_once('|') else {
            continue;
        };
        let grantee = if grantee == "PUBLIC" {
            "PUBLIC".to_string()
        } else if roles.iter().any(|r| r == grantee) {
            quote_ident(grantee)
        } else {
            continue;
        };
        ddl.push(format!(
            "GRANT {privilege} ON {kind} {sql_name} TO {grantee}"
        ));
    }
    Ok(ddl)
}
