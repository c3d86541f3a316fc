//! The SQLite side of a migration. This crate owns the schema map: for
//! every table and column of a SQLite file, the PostgreSQL type it becomes
//! and the storage codec — how the file really stores its values (epoch
//! seconds or milliseconds, ISO text, 0/1, JSON text, ...) — worked out
//! from the declarations and a profile of the data, and the PostgreSQL DDL
//! that follows from it. The converter, the SQLite engine, the change
//! stream and verify are meant to read values through this one map.

pub mod canonical;
pub mod capture;
pub mod convert;
pub mod schema_map;
pub mod value;

pub use cutover_config::ColumnSetting;
pub use rusqlite;
pub use rusqlite::Connection;
pub use schema_map::{Codec, Column, Profile, SchemaMap, SqliteError, Table, TimeCodec};
pub use value::BadValue;

/// Opens a SQLite file for reading only.
pub fn open_read_only(path: &std::path::Path) -> Result<Connection, rusqlite::Error> {
    Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}
