//! The system catalog drivers and ORMs read at connect and for
//! introspection: `pg_catalog` (pg_namespace, pg_type, pg_class with the
//! indexes, pg_attribute, pg_index, pg_am, pg_range, pg_enum,
//! pg_description, pg_statio_all_tables) and `information_schema`
//! (schemata, tables, columns, table_constraints, key_column_usage,
//! constraint_column_usage, referential_constraints),
//! built from the schema map into in-memory databases attached to every
//! session's connection, so their queries run as ordinary SQL. Only
//! built-in type OIDs are used; the file's tables get OIDs from 16384 up
//! (where PostgreSQL's user objects start), in the schema map's order.

use crate::types::PgType;
use cutover_sqlite::rusqlite::{self, params, Connection};
use cutover_sqlite::{Codec, Column, Profile, SchemaMap, Table};

const PG_CATALOG: i64 = 11;
const PUBLIC: i64 = 2200;
const INFORMATION_SCHEMA: i64 = 13_000;

/// The OID of the schema map's `index`-th table.
pub fn table_oid(index: usize) -> u32 {
    16384 + index as u32
}

/// Built-in types and their categories.
const TYPES: &[(PgType, &str)] = &[
    (PgType::Bool, "B"),
    (PgType::Int2, "N"),
    (PgType::Int4, "N"),
    (PgType::Int8, "N"),
    (PgType::Numeric, "N"),
    (PgType::Float8, "N"),
    (PgType::Text, "S"),
    (PgType::Varchar, "S"),
    (PgType::Name, "S"),
    (PgType::Char, "Z"),
    (PgType::Oid, "N"),
    (PgType::Date, "D"),
    (PgType::Timestamp, "D"),
    (PgType::Timestamptz, "D"),
    (PgType::Json, "U"),
    (PgType::Jsonb, "U"),
    (PgType::Bytea, "U"),
    (PgType::Uuid, "U"),
];

/// A catalog table: its schema, name, and columns with their types.
type Shape = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// The catalog's tables and their columns' types, for typing results.
const SHAPES: &[Shape] = &[
    (
        "pg_catalog",
        "pg_namespace",
        &[("oid", "oid"), ("nspname", "name"), ("nspowner", "oid")],
    ),
    (
        "pg_catalog",
        "pg_type",
        &[
            ("oid", "oid"),
            ("typname", "name"),
            ("typnamespace", "oid"),
            ("typowner", "oid"),
            ("typlen", "smallint"),
            ("typbyval", "boolean"),
            ("typtype", "\"char\""),
            ("typcategory", "\"char\""),
            ("typisdefined", "boolean"),
            ("typdelim", "\"char\""),
            ("typrelid", "oid"),
            ("typelem", "oid"),
            ("typarray", "oid"),
            ("typbasetype", "oid"),
            ("typtypmod", "integer"),
            ("typnotnull", "boolean"),
            ("typndims", "integer"),
            ("typcollation", "oid"),
        ],
    ),
    (
        "pg_catalog",
        "pg_class",
        &[
            ("oid", "oid"),
            ("relname", "name"),
            ("relnamespace", "oid"),
            ("reltype", "oid"),
            ("relowner", "oid"),
            ("relkind", "\"char\""),
            ("relpersistence", "\"char\""),
            ("relhasindex", "boolean"),
            ("relispartition", "boolean"),
            ("reltuples", "double precision"),
            ("relnatts", "smallint"),
            ("relam", "oid"),
            ("reltablespace", "oid"),
            ("relchecks", "smallint"),
            ("relhasrules", "boolean"),
            ("relhastriggers", "boolean"),
            ("relrowsecurity", "boolean"),
            ("relforcerowsecurity", "boolean"),
            ("reloftype", "oid"),
            ("relreplident", "\"char\""),
            ("reltoastrelid", "oid"),
        ],
    ),
    // Indexes (the primary key's too), as Sequelize's sync and psql read
    // them; `cutover_indexdef` answers pg_get_indexdef.
    (
        "pg_catalog",
        "pg_index",
        &[
            ("indexrelid", "oid"),
            ("indrelid", "oid"),
            ("indnatts", "smallint"),
            ("indnkeyatts", "smallint"),
            ("indisunique", "boolean"),
            ("indisprimary", "boolean"),
            ("indisexclusion", "boolean"),
            ("indimmediate", "boolean"),
            ("indisclustered", "boolean"),
            ("indisvalid", "boolean"),
            ("indisready", "boolean"),
            ("indislive", "boolean"),
            ("indisreplident", "boolean"),
            ("indkey", "int2vector"),
            ("indexprs", "text"),
            ("indpred", "text"),
        ],
    ),
    (
        "pg_catalog",
        "cutover_indexdef",
        &[("oid", "oid"), ("def", "text")],
    ),
    (
        "pg_catalog",
        "pg_indexes",
        &[
            ("schemaname", "name"),
            ("tablename", "name"),
            ("indexname", "name"),
            ("tablespace", "name"),
            ("indexdef", "text"),
        ],
    ),
    // Comments (none: the file has no COMMENT ON), and the statistics
    // view Sequelize joins them through.
    (
        "pg_catalog",
        "pg_description",
        &[
            ("objoid", "oid"),
            ("classoid", "oid"),
            ("objsubid", "integer"),
            ("description", "text"),
        ],
    ),
    (
        "pg_catalog",
        "pg_statio_all_tables",
        &[
            ("relid", "oid"),
            ("schemaname", "name"),
            ("relname", "name"),
        ],
    ),
    // Access methods, which psql's \dt joins to pg_class.
    (
        "pg_catalog",
        "pg_am",
        &[("oid", "oid"), ("amname", "name"), ("amtype", "\"char\"")],
    ),
    (
        "pg_catalog",
        "pg_attribute",
        &[
            ("attrelid", "oid"),
            ("attname", "name"),
            ("atttypid", "oid"),
            ("attlen", "smallint"),
            ("attnum", "smallint"),
            ("atttypmod", "integer"),
            ("attndims", "smallint"),
            ("attnotnull", "boolean"),
            ("atthasdef", "boolean"),
            ("attidentity", "\"char\""),
            ("attgenerated", "\"char\""),
            ("attisdropped", "boolean"),
        ],
    ),
    // No range or enum types: empty, for the drivers that read them at
    // connect (Sequelize joins pg_range to pg_type).
    (
        "pg_catalog",
        "pg_range",
        &[
            ("rngtypid", "oid"),
            ("rngsubtype", "oid"),
            ("rngmultitypid", "oid"),
            ("rngcollation", "oid"),
            ("rngsubopc", "oid"),
        ],
    ),
    (
        "pg_catalog",
        "pg_enum",
        &[
            ("oid", "oid"),
            ("enumtypid", "oid"),
            ("enumsortorder", "double precision"),
            ("enumlabel", "name"),
        ],
    ),
    (
        "information_schema",
        "schemata",
        &[
            ("catalog_name", "name"),
            ("schema_name", "name"),
            ("schema_owner", "name"),
        ],
    ),
    (
        "information_schema",
        "tables",
        &[
            ("table_catalog", "name"),
            ("table_schema", "name"),
            ("table_name", "name"),
            ("table_type", "varchar"),
            ("is_insertable_into", "varchar"),
        ],
    ),
    (
        "information_schema",
        "columns",
        &[
            ("table_catalog", "name"),
            ("table_schema", "name"),
            ("table_name", "name"),
            ("column_name", "name"),
            ("ordinal_position", "integer"),
            ("column_default", "varchar"),
            ("is_nullable", "varchar"),
            ("data_type", "varchar"),
            ("character_maximum_length", "integer"),
            ("numeric_precision", "integer"),
            ("udt_name", "name"),
            ("is_identity", "varchar"),
        ],
    ),
    // Constraints as the converted schema names them: `t_pkey`,
    // `t_a_b_key`, `t_fkeyN`, `t_checkN`.
    (
        "information_schema",
        "table_constraints",
        &[
            ("constraint_catalog", "name"),
            ("constraint_schema", "name"),
            ("constraint_name", "name"),
            ("table_catalog", "name"),
            ("table_schema", "name"),
            ("table_name", "name"),
            ("constraint_type", "varchar"),
            ("is_deferrable", "varchar"),
            ("initially_deferred", "varchar"),
            ("enforced", "varchar"),
        ],
    ),
    (
        "information_schema",
        "key_column_usage",
        &[
            ("constraint_catalog", "name"),
            ("constraint_schema", "name"),
            ("constraint_name", "name"),
            ("table_catalog", "name"),
            ("table_schema", "name"),
            ("table_name", "name"),
            ("column_name", "name"),
            ("ordinal_position", "integer"),
            ("position_in_unique_constraint", "integer"),
        ],
    ),
    (
        "information_schema",
        "constraint_column_usage",
        &[
            ("table_catalog", "name"),
            ("table_schema", "name"),
            ("table_name", "name"),
            ("column_name", "name"),
            ("constraint_catalog", "name"),
            ("constraint_schema", "name"),
            ("constraint_name", "name"),
        ],
    ),
    (
        "information_schema",
        "referential_constraints",
        &[
            ("constraint_catalog", "name"),
            ("constraint_schema", "name"),
            ("constraint_name", "name"),
            ("unique_constraint_catalog", "name"),
            ("unique_constraint_schema", "name"),
            ("unique_constraint_name", "name"),
            ("match_option", "varchar"),
            ("update_rule", "varchar"),
            ("delete_rule", "varchar"),
        ],
    ),
];

/// The catalog's tables as schema-map tables, so the translator types
/// their columns as it types the file's.
pub fn tables() -> Vec<Table> {
    SHAPES
        .iter()
        .map(|(_, name, columns)| Table {
            name: name.to_string(),
            columns: columns
                .iter()
                .map(|(c, ty)| Column {
                    name: c.to_string(),
                    declared: String::new(),
                    not_null: false,
                    default: None,
                    profile: Profile::default(),
                    pg_type: ty.to_string(),
                    codec: Codec::Native,
                    pg_default: None,
                    notes: Vec::new(),
                })
                .collect(),
            primary_key: Vec::new(),
            rowid_alias: None,
            autoincrement: false,
            without_rowid: false,
            next_id: None,
            bad_values: Vec::new(),
            indexes: Vec::new(),
            foreign_keys: Vec::new(),
            checks: Vec::new(),
            sql: String::new(),
        })
        .collect()
}

fn varchar_len(pg_type: &str) -> Option<i64> {
    pg_type
        .strip_prefix("varchar(")?
        .strip_suffix(')')?
        .parse()
        .ok()
}

/// Attaches and fills the catalog databases on `conn`.
pub fn install(conn: &Connection, map: &SchemaMap, database: &str) -> rusqlite::Result<()> {
    let mut ddl = String::new();
    for schema in ["pg_catalog", "information_schema"] {
        ddl.push_str(&format!("ATTACH DATABASE ':memory:' AS {schema};\n"));
    }
    for (schema, name, columns) in SHAPES {
        // Declared with SQLite's affinity for their type, so `oid =
        // '16384'` compares as PostgreSQL's cast of the literal would.
        let cols: Vec<String> = columns
            .iter()
            .map(|(c, ty)| {
                let affinity = match *ty {
                    "oid" | "smallint" | "integer" | "boolean" => "INTEGER",
                    "double precision" => "REAL",
                    _ => "TEXT",
                };
                format!("\"{c}\" {affinity}")
            })
            .collect();
        ddl.push_str(&format!(
            "CREATE TABLE {schema}.{name} ({});\n",
            cols.join(", ")
        ));
    }
    conn.execute_batch(&ddl)?;
    let tx = conn.unchecked_transaction()?;
    for (oid, name) in [
        (PG_CATALOG, "pg_catalog"),
        (PUBLIC, "public"),
        (INFORMATION_SCHEMA, "information_schema"),
    ] {
        tx.execute(
            "INSERT INTO pg_catalog.pg_namespace VALUES (?1, ?2, 10)",
            params![oid, name],
        )?;
        tx.execute(
            "INSERT INTO information_schema.schemata VALUES (?1, ?2, 'postgres')",
            params![database, name],
        )?;
    }
    tx.execute_batch("INSERT INTO pg_catalog.pg_am VALUES (2, 'heap', 't'), (403, 'btree', 'i');")?;
    for (ty, category) in TYPES {
        let array = ty.array_oid();
        let (byval, len) = (ty.size() > 0 && ty.size() <= 8, ty.size());
        let name = ty.short_name();
        tx.execute(
            "INSERT INTO pg_catalog.pg_type VALUES (?1, ?2, 11, 10, ?3, ?4, 'b', ?5, 1, ',', 0, 0, ?6, 0, -1, 0, 0, 0)",
            params![ty.oid(), name, len, byval, category, array],
        )?;
        tx.execute(
            "INSERT INTO pg_catalog.pg_type VALUES (?1, ?2, 11, 10, -1, 0, 'b', 'A', 1, ',', 0, ?3, 0, 0, -1, 0, 0, 0)",
            params![array, format!("_{name}"), ty.oid()],
        )?;
    }
    fill_tables(&tx, map, database)?;
    tx.commit()
}

/// Fills the catalog's rows for the file's tables, in place of those there
/// (after a schema change; inside the session's transaction when it has
/// one, so they roll back with it).
pub fn refresh(conn: &Connection, map: &SchemaMap, database: &str) -> rusqlite::Result<()> {
    conn.execute_batch(
        "SAVEPOINT cutover_catalog;
         DELETE FROM pg_catalog.pg_class;
         DELETE FROM pg_catalog.pg_attribute;
         DELETE FROM information_schema.tables;
         DELETE FROM information_schema.columns;
         DELETE FROM information_schema.table_constraints;
         DELETE FROM information_schema.key_column_usage;
         DELETE FROM information_schema.constraint_column_usage;
         DELETE FROM information_schema.referential_constraints;
         DELETE FROM pg_catalog.pg_index;
         DELETE FROM pg_catalog.cutover_indexdef;
         DELETE FROM pg_catalog.pg_indexes;
         DELETE FROM pg_catalog.pg_statio_all_tables;",
    )?;
    match fill_tables(conn, map, database) {
        Ok(()) => conn.execute_batch("RELEASE cutover_catalog"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO cutover_catalog; RELEASE cutover_catalog");
            Err(e)
        }
    }
}

fn fill_tables(tx: &Connection, map: &SchemaMap, database: &str) -> rusqlite::Result<()> {
    fill_constraints(tx, map, database)?;
    fill_indexes(tx, map)?;
    for (i, table) in map.tables.iter().enumerate() {
        let oid = table_oid(i);
        tx.execute(
            "INSERT INTO pg_catalog.pg_class VALUES (?1, ?2, 2200, 0, 10, 'r', 'p', ?3, 0, -1, ?4, 2, 0, ?5, 0, 0, 0, 0, 0, 'd', 0)",
            params![
                oid,
                table.name,
                !table.indexes.is_empty() || !table.primary_key.is_empty(),
                table.columns.len() as i64,
                table.checks.len() as i64
            ],
        )?;
        tx.execute(
            "INSERT INTO information_schema.tables VALUES (?1, 'public', ?2, 'BASE TABLE', 'YES')",
            params![database, table.name],
        )?;
        tx.execute(
            "INSERT INTO pg_catalog.pg_statio_all_tables VALUES (?1, 'public', ?2)",
            params![oid, table.name],
        )?;
        for (n, c) in table.columns.iter().enumerate() {
            let ty = PgType::of_column(&c.pg_type);
            let identity = table.rowid_alias.as_deref() == Some(c.name.as_str());
            let not_null = c.not_null || table.primary_key.contains(&c.name);
            let typmod = varchar_len(&c.pg_type).map(|l| l + 4).unwrap_or(-1);
            tx.execute(
                "INSERT INTO pg_catalog.pg_attribute VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, '', 0)",
                params![
                    oid,
                    c.name,
                    ty.oid(),
                    ty.size(),
                    n as i64 + 1,
                    typmod,
                    not_null,
                    c.pg_default.is_some(),
                    if identity { "d" } else { "" },
                ],
            )?;
            tx.execute(
                "INSERT INTO information_schema.columns VALUES (?1, 'public', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    database,
                    table.name,
                    c.name,
                    n as i64 + 1,
                    c.pg_default,
                    if not_null { "NO" } else { "YES" },
                    ty.name(),
                    varchar_len(&c.pg_type),
                    match ty {
                        PgType::Int2 => Some(16),
                        PgType::Int4 => Some(32),
                        PgType::Int8 => Some(64),
                        PgType::Float8 => Some(53),
                        _ => None,
                    },
                    ty.short_name(),
                    if identity { "YES" } else { "NO" },
                ],
            )?;
        }
    }
    Ok(())
}

/// information_schema's constraint views for the file's tables: keys,
/// UNIQUE constraints, foreign keys and checks, with the names the
/// converted schema gives them.
fn fill_constraints(tx: &Connection, map: &SchemaMap, database: &str) -> rusqlite::Result<()> {
    let constraint = |table: &str, name: &str, kind: &str| {
        tx.execute(
            "INSERT INTO information_schema.table_constraints VALUES (?1, 'public', ?2, ?1, 'public', ?3, ?4, 'NO', 'NO', 'YES')",
            params![database, name, table, kind],
        )
    };
    let key_columns = |table: &str, name: &str, columns: &[&str], unique_positions: bool| {
        for (n, c) in columns.iter().enumerate() {
            tx.execute(
                "INSERT INTO information_schema.key_column_usage VALUES (?1, 'public', ?2, ?1, 'public', ?3, ?4, ?5, ?6)",
                params![
                    database,
                    name,
                    table,
                    c,
                    n as i64 + 1,
                    unique_positions.then_some(n as i64 + 1)
                ],
            )?;
        }
        Ok::<(), rusqlite::Error>(())
    };
    for t in &map.tables {
        let pkey = format!("{}_pkey", t.name);
        if !t.primary_key.is_empty() {
            constraint(&t.name, &pkey, "PRIMARY KEY")?;
            let cols: Vec<&str> = t.primary_key.iter().map(String::as_str).collect();
            key_columns(&t.name, &pkey, &cols, false)?;
            for c in &cols {
                tx.execute(
                    "INSERT INTO information_schema.constraint_column_usage VALUES (?1, 'public', ?2, ?3, ?1, 'public', ?4)",
                    params![database, t.name, c, pkey],
                )?;
            }
        }
        for i in t.indexes.iter().filter(|i| i.unique && i.constraint) {
            let cols: Vec<&str> = i.columns.iter().filter_map(|(c, _)| c.as_deref()).collect();
            if cols.len() != i.columns.len() {
                continue;
            }
            let name = format!("{}_{}_key", t.name, cols.join("_"));
            constraint(&t.name, &name, "UNIQUE")?;
            key_columns(&t.name, &name, &cols, false)?;
        }
        for (n, fk) in t.foreign_keys.iter().enumerate() {
            let name = format!("{}_fkey{}", t.name, n + 1);
            constraint(&t.name, &name, "FOREIGN KEY")?;
            let cols: Vec<&str> = fk.columns.iter().map(String::as_str).collect();
            key_columns(&t.name, &name, &cols, true)?;
            let referenced: Vec<String> = if fk.referenced.is_empty() {
                map.tables
                    .iter()
                    .find(|r| r.name == fk.references)
                    .map(|r| r.primary_key.clone())
                    .unwrap_or_default()
            } else {
                fk.referenced.clone()
            };
            for c in &referenced {
                tx.execute(
                    "INSERT INTO information_schema.constraint_column_usage VALUES (?1, 'public', ?2, ?3, ?1, 'public', ?4)",
                    params![database, fk.references, c, name],
                )?;
            }
            tx.execute(
                "INSERT INTO information_schema.referential_constraints VALUES (?1, 'public', ?2, ?1, 'public', ?3, 'NONE', ?4, ?5)",
                params![
                    database,
                    name,
                    format!("{}_pkey", fk.references),
                    fk.on_update,
                    fk.on_delete
                ],
            )?;
        }
        for n in 0..t.checks.len() {
            constraint(&t.name, &format!("{}_check{}", t.name, n + 1), "CHECK")?;
        }
    }
    Ok(())
}

/// An index as the catalog shows it: name, unique, primary, key columns
/// (None for an expression) with DESC, predicate.
type IndexRow = (
    String,
    bool,
    bool,
    Vec<(Option<String>, bool)>,
    Option<String>,
);

/// pg_index, the indexes' pg_class rows and their definitions, named as
/// the converted schema names them; OIDs follow the tables'.
fn fill_indexes(tx: &Connection, map: &SchemaMap) -> rusqlite::Result<()> {
    let mut next = table_oid(map.tables.len());
    for (ti, t) in map.tables.iter().enumerate() {
        let attnum = |c: &str| {
            t.columns
                .iter()
                .position(|x| x.name == c)
                .map_or(0, |n| n as i64 + 1)
        };
        let mut indexes: Vec<IndexRow> = Vec::new();
        if !t.primary_key.is_empty() {
            indexes.push((
                format!("{}_pkey", t.name),
                true,
                true,
                t.primary_key
                    .iter()
                    .map(|c| (Some(c.clone()), false))
                    .collect(),
                None,
            ));
        }
        for i in &t.indexes {
            let name = if i.constraint {
                let cols: Vec<&str> = i.columns.iter().filter_map(|(c, _)| c.as_deref()).collect();
                format!("{}_{}_key", t.name, cols.join("_"))
            } else {
                i.name.clone()
            };
            indexes.push((name, i.unique, false, i.columns.clone(), i.partial.clone()));
        }
        for (name, unique, primary, columns, predicate) in indexes {
            let oid = next;
            next += 1;
            let keys: Vec<String> = columns
                .iter()
                .map(|(c, _)| c.as_deref().map_or(0, attnum).to_string())
                .collect();
            tx.execute(
                "INSERT INTO pg_catalog.pg_class VALUES (?1, ?2, 2200, 0, 10, 'i', 'p', 0, 0, -1, ?3, 403, 0, 0, 0, 0, 0, 0, 0, 'n', 0)",
                params![oid, name, columns.len() as i64],
            )?;
            tx.execute(
                "INSERT INTO pg_catalog.pg_index VALUES (?1, ?2, ?3, ?3, ?4, ?5, 0, 1, 0, 1, 1, 1, 0, ?6, NULL, ?7)",
                params![
                    oid,
                    table_oid(ti),
                    columns.len() as i64,
                    unique,
                    primary,
                    keys.join(" "),
                    predicate
                ],
            )?;
            let list: Vec<String> = columns
                .iter()
                .map(|(c, desc)| {
                    let c = c.as_deref().map_or("?".to_string(), quote_ident);
                    if *desc {
                        format!("{c} DESC")
                    } else {
                        c
                    }
                })
                .collect();
            let def = format!(
                "CREATE {}INDEX {} ON public.{} USING btree ({}){}",
                if unique { "UNIQUE " } else { "" },
                quote_ident(&name),
                quote_ident(&t.name),
                list.join(", "),
                predicate
                    .map(|p| format!(" WHERE ({p})"))
                    .unwrap_or_default()
            );
            tx.execute(
                "INSERT INTO pg_catalog.cutover_indexdef VALUES (?1, ?2)",
                params![oid, def],
            )?;
            tx.execute(
                "INSERT INTO pg_catalog.pg_indexes VALUES ('public', ?1, ?2, NULL, ?3)",
                params![t.name, name, def],
            )?;
        }
    }
    Ok(())
}

/// An identifier as PostgreSQL prints it: bare when it can be.
fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}
