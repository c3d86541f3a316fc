//! PasswordMessage / SASLInitialResponse / SASLResponse ('p'), from the
//! client during authentication. Which one it is depends on what the proxy
//! asked for, so each has its own decoder.

use crate::frame::cstr;

/// A cleartext or MD5 password: the string without its terminator.
pub fn decode_password(body: &[u8]) -> Option<&[u8]> {
    let (pw, rest) = cstr(body)?;
    rest.is_empty().then_some(pw)
}

/// SASLInitialResponse: mechanism name and the initial client response.
pub fn decode_sasl_initial(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (mechanism, rest) = cstr(body)?;
    let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let data = &rest[4..];
    if len < 0 || len as usize != data.len() {
        return None;
    }
    Some((mechanism, data))
}
