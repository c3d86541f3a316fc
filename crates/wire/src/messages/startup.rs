//! The untyped first packet a client sends: StartupMessage, SSLRequest,
//! GSSENCRequest or CancelRequest, told apart by the code after the length.

use super::backend_key_data::CancelKey;
use crate::frame::cstr;

pub const SSL_REQUEST: i32 = 80877103;
pub const GSSENC_REQUEST: i32 = 80877104;
pub const CANCEL_REQUEST: i32 = 80877102;
/// PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
pub const MAX_STARTUP_LEN: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel(CancelKey),
    Startup {
        major: u16,
        minor: u16,
        params: Vec<(String, String)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("invalid startup packet layout: expected terminator as last byte")]
    Layout,
    #[error("invalid length of startup packet")]
    Length,
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    Version { major: u16, minor: u16 },
    #[error("invalid startup packet: parameter names and values must be UTF-8")]
    Encoding,
}

/// Decodes the packet body (everything after the 4-byte length).
pub fn decode(body: &[u8]) -> Result<StartupPacket, StartupError> {
    if body.len() < 4 {
        return Err(StartupError::Length);
    }
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST if rest.is_empty() => Ok(StartupPacket::Ssl),
        GSSENC_REQUEST if rest.is_empty() => Ok(StartupPacket::GssEnc),
        CANCEL_REQUEST if rest.len() == 8 => Ok(StartupPacket::Cancel(CancelKey {
            pid: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
            secret: i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
        })),
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => Err(StartupError::Length),
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(StartupError::Version { major, minor });
            }
            let mut params = Vec::new();
            let mut rest = rest;
            loop {
                match rest {
                    [0] => break,
                    [] => return Err(StartupError::Layout),
                    _ => {}
                }
                let (name, after) = cstr(rest).ok_or(StartupError::Layout)?;
                let (value, after) = cstr(after).ok_or(StartupError::Layout)?;
                let name = std::str::from_utf8(name).map_err(|_| StartupError::Encoding)?;
                let value = std::str::from_utf8(value).map_err(|_| StartupError::Encoding)?;
                params.push((name.to_string(), value.to_string()));
                rest = after;
            }
            Ok(StartupPacket::Startup {
                major,
                minor,
                params,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_startup_params() {
        let mut body = 196608i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app\0database\0db\0\0");
        match decode(&body).unwrap() {
            StartupPacket::Startup {
                major: 3,
                minor: 0,
                params,
            } => {
                assert_eq!(params[0], ("user".into(), "app".into()));
                assert_eq!(params[1], ("database".into(), "db".into()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_bad_packets() {
        assert_eq!(
            decode(&[0, 2, 0, 0, 0]),
            Err(StartupError::Version { major: 2, minor: 0 })
        );
        let mut body = 196608i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app");
        assert_eq!(decode(&body), Err(StartupError::Layout));
    }
}
