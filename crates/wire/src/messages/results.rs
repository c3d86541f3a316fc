//! The replies the SQLite engine writes as a backend: RowDescription,
//! DataRow, CommandComplete, ParameterDescription and the one-byte
//! acknowledgements. The proxy forwards the same messages from PostgreSQL
//! as bytes.

use super::{put_cstr, write_message};
use bytes::{BufMut, BytesMut};

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// The table's OID and the column's number when the column is a plain
    /// table column, else 0.
    pub table_oid: u32,
    pub column: i16,
    pub type_oid: u32,
    pub type_size: i16,
    pub type_modifier: i32,
    pub format: i16,
}

pub fn row_description(buf: &mut BytesMut, fields: &[Field]) {
    write_message(buf, b'T', |b| {
        b.put_i16(fields.len() as i16);
        for f in fields {
            put_cstr(b, f.name.as_bytes());
            b.put_u32(f.table_oid);
            b.put_i16(f.column);
            b.put_u32(f.type_oid);
            b.put_i16(f.type_size);
            b.put_i32(f.type_modifier);
            b.put_i16(f.format);
        }
    });
}

pub fn data_row<'a>(buf: &mut BytesMut, values: impl ExactSizeIterator<Item = Option<&'a [u8]>>) {
    write_message(buf, b'D', |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                None => b.put_i32(-1),
                Some(bytes) => {
                    b.put_i32(bytes.len() as i32);
                    b.put_slice(bytes);
                }
            }
        }
    });
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    write_message(buf, b'C', |b| put_cstr(b, tag.as_bytes()));
}

pub fn parameter_description(buf: &mut BytesMut, types: &[u32]) {
    write_message(buf, b't', |b| {
        b.put_i16(types.len() as i16);
        for t in types {
            b.put_u32(*t);
        }
    });
}

/// ParseComplete '1', BindComplete '2', CloseComplete '3', NoData 'n',
/// EmptyQueryResponse 'I', PortalSuspended 's'.
pub fn empty(buf: &mut BytesMut, tag: u8) {
    write_message(buf, tag, |_| {});
}

/// NotificationResponse ('A').
pub fn notification(buf: &mut BytesMut, pid: i32, channel: &str, payload: &str) {
    write_message(buf, b'A', |b| {
        b.put_i32(pid);
        put_cstr(b, channel.as_bytes());
        put_cstr(b, payload.as_bytes());
    });
}

/// CopyInResponse ('G') or CopyOutResponse ('H') for `columns` text
/// columns.
pub fn copy_response(buf: &mut BytesMut, tag: u8, columns: usize) {
    write_message(buf, tag, |b| {
        b.put_i8(0);
        b.put_i16(columns as i16);
        for _ in 0..columns {
            b.put_i16(0);
        }
    });
}

/// CopyData ('d').
pub fn copy_data(buf: &mut BytesMut, data: &[u8]) {
    write_message(buf, b'd', |b| b.put_slice(data));
}
