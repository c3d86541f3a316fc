//! The messages cutover decodes or produces itself, one per file, each with
//! its encoder and (where the proxy reads it) decoder. Each file says who
//! sends the message: the client, the backend, or the proxy itself.

pub mod authentication;
pub mod backend_key_data;
pub mod bind;
pub mod error_response;
pub mod negotiate_protocol_version;
pub mod parameter_status;
pub mod parse;
pub mod password;
pub mod ready_for_query;
pub mod results;
pub mod startup;
pub mod target;

pub use error_response::ErrorResponse;

use bytes::{BufMut, BytesMut};

/// Writes a message: type byte, length placeholder, body from `f`, then the length.
pub(crate) fn write_message(buf: &mut BytesMut, tag: u8, f: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    f(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub(crate) fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}
