//! The SQLite side of a migration. This crate owns the schema map: for
//! every table and column of a SQLite file, the PostgreSQL type it becomes
//! and the storage codec — how the file really stores its values (epoch
//! seconds or milliseconds, ISO text, 0/1, JSON text, ...) — worked out
//! from the declarations and a profile of the data, and the PostgreSQL DDL
//! that follows from it. The converter, the SQLite engine, the change
//! stream and verify are meant to read values through this one map.

pub mod schema_map;
pub mod value;

pub use schema_map::{
    Codec, Column, ColumnOverride, Profile, SchemaMap, SqliteError, Table, TimeCodec,
};
pub use value::BadValue;
