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
//! it, before the file is touched. What SQLite's ALTER TABLE lacks
//! (constraints added to a table, ALTER COLUMN) becomes steps that
//! `rewrite.rs` carries out.
//!
//! While the live migration's capture runs, the schema is frozen: the
//! session refuses these (see `session.rs`), as a schema change would stop
//! the stream.

use crate::translate::{Command, SqlError};
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
        // The extensions whose functions the engine has built in (uuid
        // generation, text types) are there already.
        Statement::CreateExtension {
            name,
            if_not_exists,
            ..
        } if matches!(
            name.value.as_str(),
            "pgcrypto" | "uuid-ossp" | "citext" | "plpgsql"
        ) =>
        {
            if if_not_exists {
                Ok(noop(
                    "CREATE EXTENSION",
                    format!("extension \"{}\" already exists, skipping", name.value),
                ))
            } else {
                Err(SqlError::new(
                    "42710",
                    format!("extension \"{}\" already exists", name.value),
                ))
            }
        }
        other => Err(SqlError::unsupported(format!(
            "{} (the SQLite engine runs CREATE/DROP TABLE, CREATE/DROP INDEX, ALTER TABLE and CREATE EXTENSION of pgcrypto, uuid-ossp, citext)",
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
