//! The body of Describe ('D'), Close ('C') and Execute ('E'), from the
//! client: which prepared statement or portal they act on. The SQLite
//! engine decodes them; the proxy forwards them as bytes.

use crate::frame::cstr;

/// `S` (statement) or `P` (portal) and its name.
pub fn decode_named(body: &[u8]) -> Option<(u8, String)> {
    let kind = *body.first()?;
    let (name, _) = cstr(&body[1..])?;
    Some((kind, String::from_utf8(name.to_vec()).ok()?))
}

/// Execute: the portal and the row limit (0 = all).
pub fn decode_execute(body: &[u8]) -> Option<(String, i32)> {
    let (name, rest) = cstr(body)?;
    let limit = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    Some((String::from_utf8(name.to_vec()).ok()?, limit))
}
