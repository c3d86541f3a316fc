//! Object identifiers the engine gives the file's tables, so RowDescription
//! names a table and column as PostgreSQL's does. Only built-in type OIDs
//! are used; tables get OIDs from 16384 up (where PostgreSQL's user
//! objects start), in the schema map's order.

/// The OID of the schema map's `index`-th table.
pub fn table_oid(index: usize) -> u32 {
    16384 + index as u32
}
