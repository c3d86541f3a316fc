//! PostgreSQL DDL written into the SQLite file, so an app's own migrations
//! (hand-written SQL, an ORM's `create_all`/`sync`) keep working while the
//! file is served: CREATE/DROP TABLE, CREATE/DROP INDEX and the ALTER
//! TABLE operations SQLite has (ADD, DROP and RENAME COLUMN, RENAME TO).
//!
//! Types are declared so that the schema map, which every session reads
//! again after the change (`Schema` in lib.rs), gives the column the
//! PostgreSQL type it was declared with where the map has it (integers are
//! bigint, timestamps timestamptz, as convert maps them), and defaults are
//! SQLite expressions that write the storage form the map then reads
//! (booleans 0/1, times ISO text), so other processes writing the file
//! get them too. Anything SQLite cannot do is refused with 0A000 naming
//! it, before the file is touched.
//!
//! While the live migration's capture runs, the schema is frozen: the
//! session refuses these (see `session.rs`), as a schema change would stop
//! the stream.

use crate::errors::{from_sqlite, Failure};
use crate::translate::{Command, SqlError};
use cutover_sqlite::rusqlite::{self, Connection};
use cutover_sqlite::schema_map::{quote, DECLARED_TYPES};
use cutover_sqlite::SchemaMap;
use sqlparser::ast::{
    AlterTableOperation, ColumnDef, ColumnOption, CreateIndex, CreateTable, DataType, Expr,
    GeneratedAs, ObjectName, ObjectType, RenameTableNameKind, Statement, TableConstraint, Value,
};

/// The SQLite statements for one PostgreSQL DDL statement, or the
/// refusal; `Noop` for `IF [NOT] EXISTS` with nothing to do.
pub(crate) fn translate(statement: Statement, map: &SchemaMap) -> Result<Command, SqlError> {
    match statement {
        Statement::CreateTable(t) => create_table(t, map),
        Statement::CreateIndex(i) => create_index(i, map),
        Statement::Drop {
            object_type,
            if_exists,
            names,
            ..
        } => drop(object_type, if_exists, &names, map),
        Statement::AlterTable {
            name,
            if_exists,
            operations,
            ..
        } => alter_table(&name, if_exists, operations, map),
        Statement::CreateSchema {
            schema_name,
            if_not_exists: true,
            ..
        } if schema_name.to_string().trim_matches('"') == "public" => {
            Ok(noop("CREATE SCHEMA", "schema \"public\" already exists, skipping".to_string()))
        }
        other => Err(SqlError::unsupported(format!(
            "{} (the SQLite engine runs CREATE/DROP TABLE, CREATE/DROP INDEX and ALTER TABLE ADD/DROP/RENAME)",
            statement_kind(&other)
        ))),
    }
}

fn statement_kind(s: &Statement) -> String {
    let text = s.to_string();
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// CREATE of a relation that exists: PostgreSQL's notice with IF NOT
/// EXISTS, its error without.
fn exists(if_not_exists: bool, tag: &str, name: &str) -> Result<Command, SqlError> {
    if if_not_exists {
        Ok(noop(
            tag,
            format!("relation \"{name}\" already exists, skipping"),
        ))
    } else {
        Err(SqlError::new(
            "42P07",
            format!("relation \"{name}\" already exists"),
        ))
    }
}

fn noop(tag: &str, notice: String) -> Command {
    Command::Noop {
        tag: tag.to_string(),
        notice,
    }
}

fn ddl(tag: &str, statements: Vec<String>) -> Command {
    steps(tag, statements.into_iter().map(Step::Sql).collect())
}

fn steps(tag: &str, steps: Vec<Step>) -> Command {
    Command::Ddl {
        tag: tag.to_string(),
        steps,
        temporary: false,
    }
}

/// One step of a DDL statement in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// SQLite DDL as it is.
    Sql(String),
    /// A change to the declared types' record, made when the file has one.
    Record(String),
    /// DROP TABLE of this name (a session's temporary table first, as
    /// SQLite and PostgreSQL's search path resolve it).
    DropTable(String),
    /// A change to one column SQLite's ALTER TABLE cannot make, written
    /// into its definition in the table's CREATE statement the same way.
    AlterColumn {
        table: String,
        column: String,
        change: ColumnChange,
    },
    /// A table constraint SQLite's ALTER TABLE cannot add, written into
    /// the table's CREATE statement (SQLite's documented procedure for
    /// changes that leave the stored rows as they are), then checked
    /// against the rows there as PostgreSQL checks them.
    AddConstraint {
        table: String,
        constraint: String,
        verify: Verify,
    },
}

/// What ALTER COLUMN changes.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnChange {
    SetNotNull,
    DropNotNull,
    /// The default as a SQLite expression.
    SetDefault(String),
    DropDefault,
    /// The new SQLite declaration, which must keep the column's affinity
    /// and family, and the varchar length the rows there must fit.
    Type {
        declared: String,
        max_length: Option<i64>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verify {
    /// NOT VALID: the rows there are not checked.
    Nothing,
    /// A foreign key: its name.
    ForeignKeys(String),
    /// A CHECK: its name and its expression.
    Check(String, String),
}

/// The table a name means: `t` or `public.t`, nothing else.
fn table_name(name: &ObjectName) -> Result<String, SqlError> {
    let parts: Vec<String> = name
        .0
        .iter()
        .filter_map(|p| p.as_ident())
        .map(|i| i.value.clone())
        .collect();
    match parts.as_slice() {
        [t] => Ok(t.clone()),
        [s, t] if s == "public" => Ok(t.clone()),
        _ => Err(SqlError::unsupported(format!(
            "the schema of {name} (the SQLite file is the public schema)"
        ))),
    }
}

fn create_table(t: CreateTable, map: &SchemaMap) -> Result<Command, SqlError> {
    let name = table_name(&t.name)?;
    if map.tables.iter().any(|x| x.name == name) {
        return exists(t.if_not_exists, "CREATE TABLE", &name);
    }
    if t.on_commit
        .is_some_and(|o| !matches!(o, sqlparser::ast::OnCommit::PreserveRows))
    {
        return Err(SqlError::unsupported(
            "CREATE TEMPORARY TABLE … ON COMMIT DELETE ROWS / DROP",
        ));
    }
    if t.query.is_some() {
        return Err(SqlError::unsupported("CREATE TABLE … AS"));
    }
    if t.like.is_some() || t.inherits.is_some() || t.partition_by.is_some() {
        return Err(SqlError::unsupported(
            "CREATE TABLE with LIKE, INHERITS or PARTITION BY",
        ));
    }
    let mut constraints = t.constraints;
    let mut lines = Vec::new();
    for column in &t.columns {
        // A serial or identity key given as a table constraint becomes the
        // column's own `INTEGER PRIMARY KEY AUTOINCREMENT`, the only form
        // in which SQLite hands out ids.
        let table_key = constraints.iter().position(|c| {
            matches!(c, TableConstraint::PrimaryKey { columns, .. }
                if columns.len() == 1 && columns[0].column.expr.to_string().trim_matches('"') == column.name.value)
        });
        let generated = is_serial(&column.data_type) || has_identity(column);
        let key = generated && table_key.is_some();
        if key {
            if let Some(i) = table_key {
                constraints.remove(i);
            }
        }
        lines.push(column_sql(column, key)?);
    }
    // A named UNIQUE constraint is an index of that name, so a violation
    // names it as PostgreSQL does (SQLite keeps no constraint names).
    let mut named = Vec::new();
    for c in &constraints {
        match c {
            TableConstraint::Unique {
                name: Some(n),
                columns,
                nulls_distinct,
                ..
            } if !matches!(
                nulls_distinct,
                sqlparser::ast::NullsDistinctOption::NotDistinct
            ) =>
            {
                let keys: Vec<String> = columns.iter().map(|c| c.column.expr.to_string()).collect();
                named.push(format!(
                    "CREATE UNIQUE INDEX {} ON {} ({})",
                    quote(&n.value),
                    quote(&name),
                    keys.join(", ")
                ));
            }
            _ => lines.push(constraint_sql(c)?),
        }
    }
    let if_not_exists = if t.if_not_exists {
        "IF NOT EXISTS "
    } else {
        ""
    };
    let temp = if t.temporary { "TEMP " } else { "" };
    let mut statements = vec![Step::Sql(format!(
        "CREATE {temp}TABLE {if_not_exists}{} ({})",
        quote(&name),
        lines.join(", ")
    ))];
    statements.extend(named.into_iter().map(Step::Sql));
    if t.temporary {
        // The session's own: nothing of it goes into the file.
        return Ok(Command::Ddl {
            tag: "CREATE TABLE".to_string(),
            steps: statements,
            temporary: true,
        });
    }
    statements.push(Step::Record(format!(
        "DELETE FROM {DECLARED_TYPES} WHERE tbl = {}",
        literal(&name)
    )));
    for c in &t.columns {
        statements.extend(declare(&name, c));
    }
    Ok(steps("CREATE TABLE", statements))
}

/// Records a column's PostgreSQL type where SQLite's declaration cannot
/// say it (`integer`, `smallint`: SQLite spells every integer INTEGER),
/// so the schema map gives it back (see `DECLARED_TYPES`).
fn declare(table: &str, c: &ColumnDef) -> Vec<Step> {
    let text = c.data_type.to_string().to_ascii_lowercase();
    let ty = match text.as_str() {
        "smallint" | "int2" | "smallserial" | "serial2" => "smallint",
        "integer" | "int" | "int4" | "serial" | "serial4" => "integer",
        _ => return Vec::new(),
    };
    vec![
        Step::Sql(format!(
            "CREATE TABLE IF NOT EXISTS {DECLARED_TYPES} (tbl TEXT NOT NULL, col TEXT NOT NULL, pg_type TEXT NOT NULL, PRIMARY KEY (tbl, col))"
        )),
        Step::Sql(format!(
            "INSERT OR REPLACE INTO {DECLARED_TYPES} VALUES ({}, {}, '{ty}')",
            literal(table),
            literal(&c.name.value)
        )),
    ]
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn is_serial(ty: &DataType) -> bool {
    matches!(
        ty.to_string().to_ascii_lowercase().as_str(),
        "serial" | "bigserial" | "smallserial" | "serial2" | "serial4" | "serial8"
    )
}

fn has_identity(column: &ColumnDef) -> bool {
    column.options.iter().any(|o| {
        matches!(
            &o.option,
            ColumnOption::Generated {
                generated_as: GeneratedAs::Always | GeneratedAs::ByDefault,
                generation_expr: None,
                ..
            } | ColumnOption::Identity(_)
        )
    })
}

/// One column as SQLite declares it; `key` makes it the table's
/// `INTEGER PRIMARY KEY AUTOINCREMENT`.
fn column_sql(column: &ColumnDef, key: bool) -> Result<String, SqlError> {
    let name = &column.name.value;
    let generated = is_serial(&column.data_type) || has_identity(column);
    let declared = if generated {
        "INTEGER".to_string()
    } else {
        declared_type(&column.data_type)?
    };
    let mut parts = vec![quote(name), declared];
    let mut primary = key;
    for o in &column.options {
        let constraint = o
            .name
            .as_ref()
            .map(|n| format!("CONSTRAINT {} ", quote(&n.value)))
            .unwrap_or_default();
        match &o.option {
            ColumnOption::Null | ColumnOption::NotNull => parts.push(o.option.to_string()),
            ColumnOption::Default(e) => {
                parts.push(format!("DEFAULT {}", default_sql(e, &column.data_type)?))
            }
            ColumnOption::Unique {
                is_primary: true, ..
            } => primary = true,
            ColumnOption::Unique { .. } | ColumnOption::Check(_) => {
                parts.push(format!("{constraint}{}", o.option))
            }
            ColumnOption::ForeignKey {
                foreign_table,
                referred_columns,
                on_delete,
                on_update,
                characteristics,
            } => parts.push(format!(
                "{constraint}{}",
                references(
                    foreign_table,
                    referred_columns,
                    on_delete,
                    on_update,
                    characteristics
                )?
            )),
            ColumnOption::Generated {
                generation_expr: None,
                ..
            }
            | ColumnOption::Identity(_)
            | ColumnOption::Comment(_) => {}
            other => {
                return Err(SqlError::unsupported(format!(
                    "the column option {other} (column {name})"
                )))
            }
        }
    }
    if generated && !primary {
        return Err(SqlError::unsupported(format!(
            "a serial or identity column that is not the table's one-column primary key (column {name}); SQLite hands out ids only to its INTEGER PRIMARY KEY"
        )));
    }
    if primary {
        // Right after the type: `INTEGER PRIMARY KEY` is the rowid.
        let key = if generated {
            "PRIMARY KEY AUTOINCREMENT"
        } else {
            "PRIMARY KEY"
        };
        parts.insert(2, key.to_string());
    }
    Ok(parts.join(" "))
}

/// `REFERENCES t (c) ON DELETE … ON UPDATE …`, naming the table without
/// a schema (SQLite's foreign keys name tables of the same file).
fn references(
    table: &ObjectName,
    columns: &[sqlparser::ast::Ident],
    on_delete: &Option<sqlparser::ast::ReferentialAction>,
    on_update: &Option<sqlparser::ast::ReferentialAction>,
    characteristics: &Option<sqlparser::ast::ConstraintCharacteristics>,
) -> Result<String, SqlError> {
    let mut sql = format!("REFERENCES {}", quote(&table_name(table)?));
    if !columns.is_empty() {
        let names: Vec<String> = columns.iter().map(|c| quote(&c.value)).collect();
        sql.push_str(&format!(" ({})", names.join(", ")));
    }
    if let Some(a) = on_delete {
        sql.push_str(&format!(" ON DELETE {a}"));
    }
    if let Some(a) = on_update {
        sql.push_str(&format!(" ON UPDATE {a}"));
    }
    if let Some(c) = characteristics {
        sql.push_str(&format!(" {c}"));
    }
    Ok(sql)
}

fn constraint_sql(c: &TableConstraint) -> Result<String, SqlError> {
    match c {
        TableConstraint::ForeignKey {
            name,
            columns,
            foreign_table,
            referred_columns,
            on_delete,
            on_update,
            characteristics,
            ..
        } => {
            let names: Vec<String> = columns.iter().map(|c| quote(&c.value)).collect();
            Ok(format!(
                "{}FOREIGN KEY ({}) {}",
                name.as_ref()
                    .map(|n| format!("CONSTRAINT {} ", quote(&n.value)))
                    .unwrap_or_default(),
                names.join(", "),
                references(
                    foreign_table,
                    referred_columns,
                    on_delete,
                    on_update,
                    characteristics
                )?
            ))
        }
        TableConstraint::PrimaryKey { .. } | TableConstraint::Check { .. } => Ok(c.to_string()),
        TableConstraint::Unique { nulls_distinct, .. } => {
            if matches!(
                nulls_distinct,
                sqlparser::ast::NullsDistinctOption::NotDistinct
            ) {
                return Err(SqlError::unsupported("UNIQUE NULLS NOT DISTINCT"));
            }
            Ok(c.to_string())
        }
        other => Err(SqlError::unsupported(format!(
            "the table constraint {other}"
        ))),
    }
}

/// The SQLite declaration the schema map reads back as the PostgreSQL
/// type (or its nearest: the map's integers are bigint, its timestamps
/// timestamptz).
fn declared_type(ty: &DataType) -> Result<String, SqlError> {
    let text = ty.to_string().to_ascii_lowercase();
    let base = text.split('(').next().unwrap_or("").trim();
    let args = text
        .find('(')
        .map(|i| text[i..].replace(' ', ""))
        .unwrap_or_default();
    Ok(match base {
        "smallint" | "int2" | "integer" | "int" | "int4" | "bigint" | "int8" => {
            "INTEGER".to_string()
        }
        "boolean" | "bool" => "BOOLEAN".to_string(),
        "timestamp"
        | "timestamptz"
        | "timestamp with time zone"
        | "timestamp without time zone" => "DATETIME".to_string(),
        "date" => "DATE".to_string(),
        "numeric" | "decimal" => format!("NUMERIC{}", args.to_ascii_uppercase()),
        "real" | "float4" | "double precision" | "float8" | "float" | "double" => {
            "DOUBLE PRECISION".to_string()
        }
        "text" | "citext" => "TEXT".to_string(),
        "varchar" | "character varying" => format!("VARCHAR{args}").to_ascii_uppercase(),
        "char" | "character" | "bpchar" => "TEXT".to_string(),
        "json" | "jsonb" => "JSONB".to_string(),
        "uuid" => "UUID".to_string(),
        "bytea" => "BLOB".to_string(),
        _ => {
            return Err(SqlError::unsupported(format!(
                "the column type {ty} in the SQLite engine's DDL"
            )))
        }
    })
}

/// A default as a SQLite expression writing the storage form the schema
/// map reads: booleans 0/1, times ISO text as the engine writes them.
fn default_sql(e: &Expr, ty: &DataType) -> Result<String, SqlError> {
    let refuse = || {
        SqlError::unsupported(format!(
            "the default {e} in the SQLite engine's DDL (literals, now(), CURRENT_DATE and gen_random_uuid() are written)"
        ))
    };
    Ok(match e {
        Expr::Cast { expr, .. } => default_sql(expr, ty)?,
        Expr::Nested(inner) => default_sql(inner, ty)?,
        Expr::Value(v) => match &v.value {
            Value::Boolean(b) => if *b { "1" } else { "0" }.to_string(),
            Value::Null => "NULL".to_string(),
            Value::Number(n, _) => n.clone(),
            Value::SingleQuotedString(s) => {
                let lower = ty.to_string().to_ascii_lowercase();
                if lower.starts_with("bool") {
                    match s.to_ascii_lowercase().as_str() {
                        "t" | "true" | "yes" | "on" | "1" => "1".to_string(),
                        "f" | "false" | "no" | "off" | "0" => "0".to_string(),
                        _ => return Err(refuse()),
                    }
                } else {
                    format!("'{}'", s.replace('\'', "''"))
                }
            }
            _ => return Err(refuse()),
        },
        Expr::UnaryOp { op, expr } if op.to_string() == "-" => {
            format!("-{}", default_sql(expr, ty)?)
        }
        Expr::Function(f) => match f.name.to_string().to_ascii_lowercase().as_str() {
            "now"
            | "transaction_timestamp"
            | "statement_timestamp"
            | "clock_timestamp"
            | "current_timestamp"
            | "localtimestamp" => NOW.to_string(),
            "gen_random_uuid" | "uuid_generate_v4" => RANDOM_UUID.to_string(),
            "current_date" => "CURRENT_DATE".to_string(),
            _ => return Err(refuse()),
        },
        Expr::Identifier(i)
            if matches!(
                i.value.to_ascii_lowercase().as_str(),
                "current_timestamp" | "localtimestamp"
            ) =>
        {
            NOW.to_string()
        }
        Expr::Identifier(i) if i.value.eq_ignore_ascii_case("current_date") => {
            "CURRENT_DATE".to_string()
        }
        _ => return Err(refuse()),
    })
}

/// now() as the engine stores an ISO-text time.
const NOW: &str = "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))";

/// A version-4 UUID in its 36-character text form.
const RANDOM_UUID: &str = "(lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || substr(hex(randomblob(2)), 2) || '-' || substr('89ab', 1 + (abs(random()) % 4), 1) || substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6))))";

fn create_index(i: CreateIndex, map: &SchemaMap) -> Result<Command, SqlError> {
    let table = table_name(&i.table_name)?;
    let columns: Vec<String> = i
        .columns
        .iter()
        .map(|c| c.column.expr.to_string())
        .collect();
    let name = match &i.name {
        Some(n) => table_name(n)?,
        // PostgreSQL's name for an unnamed index.
        None => format!(
            "{table}_{}_{}",
            columns
                .iter()
                .map(|c| c.trim_matches('"'))
                .collect::<Vec<_>>()
                .join("_"),
            if i.unique { "key" } else { "idx" }
        ),
    };
    let exists = map
        .tables
        .iter()
        .any(|t| t.indexes.iter().any(|x| x.name == name));
    if exists {
        return self::exists(i.if_not_exists, "CREATE INDEX", &name);
    }
    if let Some(using) = &i.using {
        if !using.to_string().eq_ignore_ascii_case("btree") {
            return Err(SqlError::unsupported(format!(
                "CREATE INDEX … USING {using} (SQLite has b-tree indexes only)"
            )));
        }
    }
    if !i.include.is_empty() || i.nulls_distinct == Some(false) || !i.with.is_empty() {
        return Err(SqlError::unsupported(
            "CREATE INDEX with INCLUDE, NULLS NOT DISTINCT or WITH",
        ));
    }
    let keys: Vec<String> = i
        .columns
        .iter()
        .map(|c| {
            let mut k = c.column.expr.to_string();
            if c.column.options.asc == Some(false) {
                k.push_str(" DESC");
            }
            k
        })
        .collect();
    let mut sql = format!(
        "CREATE {}INDEX {}{} ON {} ({})",
        if i.unique { "UNIQUE " } else { "" },
        if i.if_not_exists {
            "IF NOT EXISTS "
        } else {
            ""
        },
        quote(&name),
        quote(&table),
        keys.join(", ")
    );
    if let Some(p) = &i.predicate {
        sql.push_str(&format!(" WHERE {p}"));
    }
    Ok(ddl("CREATE INDEX", vec![sql]))
}

fn drop(
    kind: ObjectType,
    if_exists: bool,
    names: &[ObjectName],
    map: &SchemaMap,
) -> Result<Command, SqlError> {
    let (what, tag) = match kind {
        ObjectType::Table => ("TABLE", "DROP TABLE"),
        ObjectType::Index => ("INDEX", "DROP INDEX"),
        other => return Err(SqlError::unsupported(format!("DROP {other}"))),
    };
    let mut statements = Vec::new();
    let mut skipped = Vec::new();
    for n in names {
        let name = table_name(n)?;
        let exists = match kind {
            ObjectType::Table => map.tables.iter().any(|t| t.name == name),
            _ => map
                .tables
                .iter()
                .any(|t| t.indexes.iter().any(|x| x.name == name)),
        };
        if !exists && !if_exists {
            let noun = if what == "TABLE" { "table" } else { "index" };
            return Err(SqlError::new(
                "42P01",
                format!("{noun} \"{name}\" does not exist"),
            ));
        }
        if exists {
            statements.push(if what == "TABLE" {
                Step::DropTable(name.clone())
            } else {
                Step::Sql(format!("DROP INDEX {}", quote(&name)))
            });
            if what == "TABLE" {
                statements.push(Step::Record(format!(
                    "DELETE FROM {DECLARED_TYPES} WHERE tbl = {}",
                    literal(&name)
                )));
            }
        } else {
            skipped.push(format!(
                "{} \"{name}\" does not exist, skipping",
                what.to_ascii_lowercase()
            ));
        }
    }
    if statements.is_empty() {
        return Ok(noop(tag, skipped.join("; ")));
    }
    Ok(steps(tag, statements))
}

fn alter_table(
    name: &ObjectName,
    if_exists: bool,
    operations: Vec<AlterTableOperation>,
    map: &SchemaMap,
) -> Result<Command, SqlError> {
    let table = table_name(name)?;
    let Some(known) = map.tables.iter().find(|t| t.name == table) else {
        if if_exists {
            return Ok(noop(
                "ALTER TABLE",
                format!("relation \"{table}\" does not exist, skipping"),
            ));
        }
        return Err(SqlError::new(
            "42P01",
            format!("relation \"{table}\" does not exist"),
        ));
    };
    let has = |c: &str| known.columns.iter().any(|x| x.name == c);
    let target = quote(&table);
    let mut statements: Vec<Step> = Vec::new();
    let mut skipped = Vec::new();
    for op in operations {
        match op {
            AlterTableOperation::AddColumn {
                if_not_exists,
                column_def,
                ..
            } => {
                if if_not_exists && has(&column_def.name.value) {
                    skipped.push(format!(
                        "column \"{}\" of relation \"{table}\" already exists, skipping",
                        column_def.name.value
                    ));
                    continue;
                }
                if is_serial(&column_def.data_type) || has_identity(&column_def) {
                    return Err(SqlError::unsupported(format!(
                        "ADD COLUMN of a serial or identity column (column {}): SQLite adds no key to a table",
                        column_def.name.value
                    )));
                }
                statements.push(Step::Sql(format!(
                    "ALTER TABLE {target} ADD COLUMN {}",
                    column_sql(&column_def, false)?
                )));
                statements.extend(declare(&table, &column_def));
            }
            AlterTableOperation::DropColumn {
                column_names,
                if_exists,
                ..
            } => {
                for c in column_names {
                    if !has(&c.value) {
                        if if_exists {
                            skipped.push(format!(
                                "column \"{}\" of relation \"{table}\" does not exist, skipping",
                                c.value
                            ));
                            continue;
                        }
                        return Err(SqlError::new(
                            "42703",
                            format!(
                                "column \"{}\" of relation \"{table}\" does not exist",
                                c.value
                            ),
                        ));
                    }
                    let uses = |text: &str| {
                        text.split(|ch: char| !(ch.is_alphanumeric() || ch == '_'))
                            .any(|w| w == c.value)
                    };
                    if known.checks.iter().any(|x| uses(x))
                        || known.foreign_keys.iter().any(|f| f.columns.contains(&c.value))
                    {
                        return Err(SqlError::unsupported(format!(
                            "DROP COLUMN {} while a CHECK constraint or foreign key of {table} uses it (SQLite keeps them in the table's definition and cannot drop them with the column)",
                            c.value
                        )));
                    }
                    // As in PostgreSQL, the indexes on the column go with it.
                    for index in &known.indexes {
                        let on_it = index.columns.iter().any(|(col, _)| col.as_deref() == Some(&c.value))
                            || index.partial.as_deref().is_some_and(uses);
                        if on_it {
                            statements.push(Step::Sql(format!("DROP INDEX {}", quote(&index.name))));
                        }
                    }
                    statements.push(Step::Sql(format!(
                        "ALTER TABLE {target} DROP COLUMN {}",
                        quote(&c.value)
                    )));
                    statements.push(Step::Record(format!(
                        "DELETE FROM {DECLARED_TYPES} WHERE tbl = {} AND col = {}",
                        literal(&table),
                        literal(&c.value)
                    )));
                }
            }
            // A UNIQUE constraint is a unique index of its name.
            AlterTableOperation::AddConstraint {
                constraint:
                    TableConstraint::Unique {
                        name,
                        columns,
                        nulls_distinct,
                        ..
                    },
                ..
            } if !matches!(
                nulls_distinct,
                sqlparser::ast::NullsDistinctOption::NotDistinct
            ) =>
            {
                let keys: Vec<String> = columns.iter().map(|c| c.column.expr.to_string()).collect();
                let index = name.map(|n| n.value).unwrap_or_else(|| {
                    format!(
                        "{table}_{}_key",
                        keys.iter()
                            .map(|k| k.trim_matches('"'))
                            .collect::<Vec<_>>()
                            .join("_")
                    )
                });
                statements.push(Step::Sql(format!(
                    "CREATE UNIQUE INDEX {} ON {target} ({})",
                    quote(&index),
                    keys.join(", ")
                )));
            }
            AlterTableOperation::AddConstraint {
                constraint:
                    c @ (TableConstraint::ForeignKey { .. } | TableConstraint::Check { .. }),
                not_valid,
            } => {
                let verify = match &c {
                    _ if not_valid => Verify::Nothing,
                    TableConstraint::Check { name, expr, .. } => Verify::Check(
                        name.as_ref()
                            .map(|n| n.value.clone())
                            .unwrap_or_else(|| format!("{table}_check")),
                        expr.to_string(),
                    ),
                    TableConstraint::ForeignKey { name, columns, .. } => {
                        Verify::ForeignKeys(name.as_ref().map(|n| n.value.clone()).unwrap_or_else(
                            || {
                                format!(
                                    "{table}_{}_fkey",
                                    columns
                                        .iter()
                                        .map(|c| c.value.as_str())
                                        .collect::<Vec<_>>()
                                        .join("_")
                                )
                            },
                        ))
                    }
                    _ => Verify::Nothing,
                };
                statements.push(Step::AddConstraint {
                    table: table.clone(),
                    constraint: constraint_sql(&c)?,
                    verify,
                });
            }
            AlterTableOperation::RenameColumn {
                old_column_name,
                new_column_name,
            } => {
                statements.push(Step::Sql(format!(
                    "ALTER TABLE {target} RENAME COLUMN {} TO {}",
                    quote(&old_column_name.value),
                    quote(&new_column_name.value)
                )));
                statements.push(Step::Record(format!(
                    "UPDATE {DECLARED_TYPES} SET col = {} WHERE tbl = {} AND col = {}",
                    literal(&new_column_name.value),
                    literal(&table),
                    literal(&old_column_name.value)
                )));
            }
            AlterTableOperation::RenameTable { table_name: to } => {
                let (RenameTableNameKind::As(to) | RenameTableNameKind::To(to)) = to;
                let to = table_name(&to)?;
                statements.push(Step::Sql(format!(
                    "ALTER TABLE {target} RENAME TO {}",
                    quote(&to)
                )));
                statements.push(Step::Record(format!(
                    "UPDATE {DECLARED_TYPES} SET tbl = {} WHERE tbl = {}",
                    literal(&to),
                    literal(&table)
                )));
            }
            AlterTableOperation::AlterColumn { column_name, op } => {
                let column = column_name.value.clone();
                let Some(known_column) = known.columns.iter().find(|c| c.name == column) else {
                    return Err(SqlError::new(
                        "42703",
                        format!("column \"{column}\" of relation \"{table}\" does not exist"),
                    ));
                };
                let change = match op {
                    sqlparser::ast::AlterColumnOperation::SetNotNull => ColumnChange::SetNotNull,
                    sqlparser::ast::AlterColumnOperation::DropNotNull => ColumnChange::DropNotNull,
                    sqlparser::ast::AlterColumnOperation::DropDefault => ColumnChange::DropDefault,
                    sqlparser::ast::AlterColumnOperation::SetDefault { value } => {
                        let ty = DataType::Custom(
                            ObjectName::from(vec![sqlparser::ast::Ident::new(
                                known_column.pg_type.clone(),
                            )]),
                            Vec::new(),
                        );
                        ColumnChange::SetDefault(default_sql(&value, &ty)?)
                    }
                    sqlparser::ast::AlterColumnOperation::SetDataType {
                        data_type,
                        using: None,
                        ..
                    } => {
                        let declared = declared_type(&data_type)?;
                        let max_length = declared
                            .strip_prefix("VARCHAR(")
                            .and_then(|r| r.strip_suffix(')'))
                            .and_then(|n| n.parse().ok());
                        statements.push(Step::Record(format!(
                            "DELETE FROM {DECLARED_TYPES} WHERE tbl = {} AND col = {}",
                            literal(&table),
                            literal(&column)
                        )));
                        statements.extend(declare(
                            &table,
                            &ColumnDef {
                                name: column_name.clone(),
                                data_type: data_type.clone(),
                                options: Vec::new(),
                            },
                        ));
                        ColumnChange::Type {
                            declared,
                            max_length,
                        }
                    }
                    other => {
                        return Err(SqlError::unsupported(format!(
                            "ALTER COLUMN … {other} in the SQLite engine's DDL"
                        )))
                    }
                };
                // The record of declared types follows the column's change
                // (inserted above for a new type); the change goes first.
                let at = statements
                    .iter()
                    .rposition(|s| matches!(s, Step::Record(r) if r.starts_with("DELETE") && r.contains(&literal(&column))))
                    .filter(|_| matches!(change, ColumnChange::Type { .. }))
                    .unwrap_or(statements.len());
                statements.insert(
                    at,
                    Step::AlterColumn {
                        table: table.clone(),
                        column,
                        change,
                    },
                );
            }
            other => {
                return Err(SqlError::unsupported(format!(
                    "ALTER TABLE … {other} (SQLite alters a table only by ADD, DROP and RENAME COLUMN and RENAME TO; a changed column means a new table and a copy, which is a migration of its own)"
                )))
            }
        }
    }
    if statements.is_empty() {
        return Ok(noop("ALTER TABLE", skipped.join("; ")));
    }
    Ok(steps("ALTER TABLE", statements))
}

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
    let sql: String = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get(0),
        )
        .map_err(sqlite)?;
    let close = column_list_end(&sql)
        .ok_or_else(|| refuse("cutover cannot find the end of its column list".to_string()))?;
    let new_sql = format!("{}, {constraint}{}", &sql[..close], &sql[close..]);
    let adds_key = matches!(verify, Verify::ForeignKeys(_))
        || constraint.to_ascii_uppercase().contains("FOREIGN KEY");
    rewrite_create(conn, table, &new_sql, map, adds_key, |before, after| {
        before == after
    })
    .map_err(|why| match why {
        Rewrite::Refused(why) => refuse(why),
        Rewrite::Failed(f) => f,
    })?;
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

/// Where a CREATE TABLE statement's column list closes: the parenthesis
/// matching its first, past strings, quoted names and comments.
fn column_list_end(sql: &str) -> Option<usize> {
    let b = sql.as_bytes();
    let mut depth = 0usize;
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
            b'(' => depth += 1,
            b')' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
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
    let sql: String = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get(0),
        )
        .map_err(sqlite)?;
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
    let expected = |row: &str| -> String {
        // name type notnull default pk, as the shape query below spells it
        let mut parts: Vec<String> = row.split('\u{1f}').map(str::to_string).collect();
        match change {
            ColumnChange::SetNotNull => parts[2] = "1".to_string(),
            ColumnChange::DropNotNull => parts[2] = "0".to_string(),
            ColumnChange::DropDefault => parts[3] = String::new(),
            ColumnChange::SetDefault(_) | ColumnChange::Type { .. } => {}
        }
        parts.join("\u{1f}")
    };
    rewrite_create(conn, table, &new_sql, map, false, |before, after| {
        before.len() == after.len()
            && before.iter().zip(after).all(|(b, a)| {
                if b.starts_with(&format!("{column}\u{1f}")) {
                    let (e, a) = (expected(b), a.clone());
                    match change {
                        // The new default or type is the one asked for;
                        // the rest of the column must be as expected.
                        ColumnChange::SetDefault(_) | ColumnChange::Type { .. } => {
                            let keep = |s: &str, skip: usize| -> Vec<String> {
                                s.split('\u{1f}')
                                    .enumerate()
                                    .filter(|(i, _)| *i != skip)
                                    .map(|(_, x)| x.to_string())
                                    .collect()
                            };
                            let skip = if matches!(change, ColumnChange::Type { .. }) {
                                1
                            } else {
                                3
                            };
                            keep(&e, skip) == keep(&a, skip)
                        }
                        _ => e == a,
                    }
                } else {
                    b == a
                }
            })
    })
    .map_err(|why| match why {
        Rewrite::Refused(why) => refuse(why),
        Rewrite::Failed(f) => f,
    })
}

/// Why a CREATE statement was not rewritten.
enum Rewrite {
    Refused(String),
    Failed(Failure),
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
/// TABLE statement's column list.
fn column_definition(sql: &str, column: &str) -> Option<(usize, usize)> {
    let close = column_list_end(sql)?;
    let open = sql.find('(')?;
    let mut items = Vec::new();
    let b = sql.as_bytes();
    let (mut depth, mut i, mut start) = (0usize, open + 1, open + 1);
    while i < close {
        match b[i] {
            q @ (b'\'' | b'"' | b'`') => {
                i += 1;
                while i < close && b[i] != q {
                    i += 1;
                }
            }
            b'[' => {
                while i < close && b[i] != b']' {
                    i += 1;
                }
            }
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            b',' if depth == 0 => {
                items.push((start, i));
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    items.push((start, close));
    items.into_iter().find_map(|(s, e)| {
        let text = &sql[s..e];
        let lead = text.len() - text.trim_start().len();
        let trimmed = text.trim();
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
