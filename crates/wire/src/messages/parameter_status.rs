//! ParameterStatus ('S'), from the backend. The proxy remembers the values a
//! backend session reported so a client given a pooled session is told the
//! same values a fresh login would have told it.

use super::{put_cstr, write_message};
use crate::frame::cstr;
use bytes::BytesMut;

pub fn encode(buf: &mut BytesMut, name: &str, value: &str) {
    write_message(buf, b'S', |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, value.as_bytes());
    });
}

pub fn decode(body: &[u8]) -> Option<(String, String)> {
    let (name, rest) = cstr(body)?;
    let (value, _) = cstr(rest)?;
    Some((
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}
