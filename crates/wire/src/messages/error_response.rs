//! ErrorResponse ('E') and NoticeResponse ('N'). Sent by the backend (the
//! proxy reads a few fields for logs and metrics, then forwards the bytes) and
//! by the proxy itself for errors it raises, with the same fields PostgreSQL
//! would use.

use super::{put_cstr, write_message};
use crate::frame::cstr;
use bytes::{BufMut, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    /// `ERROR` or `FATAL`.
    pub severity: &'static str,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// 1-based character position in the statement ('P').
    pub position: Option<usize>,
    /// Schema, table, column and constraint names ('s', 't', 'c', 'n').
    pub schema: Option<String>,
    pub table: Option<String>,
    pub column: Option<String>,
    pub constraint: Option<String>,
}

impl ErrorResponse {
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        ErrorResponse {
            severity: "ERROR",
            code: code.to_string(),
            message: message.into(),
            detail: None,
            hint: None,
            position: None,
            schema: None,
            table: None,
            column: None,
            constraint: None,
        }
    }

    pub fn fatal(code: &str, message: impl Into<String>) -> Self {
        ErrorResponse {
            severity: "FATAL",
            ..Self::error(code, message)
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn at(mut self, position: usize) -> Self {
        self.position = Some(position);
        self
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        let position = self.position.map(|p| p.to_string());
        write_message(buf, b'E', |b| {
            for (field, value) in [
                (b'S', Some(self.severity)),
                (b'V', Some(self.severity)),
                (b'C', Some(self.code.as_str())),
                (b'M', Some(self.message.as_str())),
                (b'D', self.detail.as_deref()),
                (b'H', self.hint.as_deref()),
                (b'P', position.as_deref()),
                (b's', self.schema.as_deref()),
                (b't', self.table.as_deref()),
                (b'c', self.column.as_deref()),
                (b'n', self.constraint.as_deref()),
            ] {
                if let Some(v) = value {
                    b.put_u8(field);
                    put_cstr(b, v.as_bytes());
                }
            }
            b.put_u8(0);
        });
    }

    pub fn to_bytes(&self) -> BytesMut {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b
    }

    /// Decodes the body of an 'E' or 'N' message into its fields
    /// (severity text is kept only as the code and message matter to us).
    pub fn decode(body: &[u8]) -> Option<ErrorFields> {
        let mut fields = ErrorFields::default();
        let mut rest = body;
        loop {
            let (&field, after) = rest.split_first()?;
            if field == 0 {
                return Some(fields);
            }
            let (value, after) = cstr(after)?;
            let value = String::from_utf8_lossy(value).into_owned();
            match field {
                b'V' => fields.severity = value,
                b'S' if fields.severity.is_empty() => fields.severity = value,
                b'C' => fields.code = value,
                b'M' => fields.message = value,
                _ => {}
            }
            rest = after;
        }
    }
}

/// The fields of a decoded ErrorResponse or NoticeResponse that cutover uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let e = ErrorResponse::fatal("28P01", "password authentication failed for user \"x\"");
        let bytes = e.to_bytes();
        assert_eq!(bytes[0], b'E');
        let f = ErrorResponse::decode(&bytes[5..]).unwrap();
        assert_eq!(f.code, "28P01");
        assert_eq!(f.severity, "FATAL");
        assert_eq!(f.message, e.message);
    }

    #[test]
    fn truncated_body_is_none() {
        assert_eq!(ErrorResponse::decode(b"Cabc"), None);
    }
}
