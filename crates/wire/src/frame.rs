//! Framing of regular protocol messages: one type byte, then a big-endian
//! i32 length that counts itself. The proxy scans frames in place and
//! forwards the original bytes; nothing is copied to look at a message.

/// A complete message at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    /// Total bytes of the message, type byte and length included.
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength { tag: char, len: i32 },
    #[error("message of type {tag:?} is {len} bytes, over the limit of {max} bytes (proxy.max_message_bytes)")]
    TooLarge { tag: char, len: usize, max: usize },
}

impl FrameError {
    /// Short label for the protocol-error metric.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::BadLength { .. } => "bad_length",
            FrameError::TooLarge { .. } => "too_large",
        }
    }
}

/// Validates a 5-byte message header and returns the whole message's size.
pub fn header(buf: [u8; 5], max: usize) -> Result<Frame, FrameError> {
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength {
            tag: tag as char,
            len,
        });
    }
    let total = len as usize + 1;
    if total > max {
        return Err(FrameError::TooLarge {
            tag: tag as char,
            len: total,
            max,
        });
    }
    Ok(Frame { tag, len: total })
}

/// Looks at the front of `buf`: `Ok(Some(frame))` when a whole message is
/// there, `Ok(None)` when more bytes are needed.
pub fn scan(buf: &[u8], max: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let frame = header([buf[0], buf[1], buf[2], buf[3], buf[4]], max)?;
    if buf.len() < frame.len {
        return Ok(None);
    }
    Ok(Some(frame))
}

/// Reads a NUL-terminated string at the front of `buf`, returning it and the rest.
pub fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = buf.iter().position(|&b| b == 0)?;
    Some((&buf[..end], &buf[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_whole_message() {
        let msg = [b'Q', 0, 0, 0, 8, b's', b'e', b'l', 0];
        assert_eq!(scan(&msg[..4], 100), Ok(None));
        assert_eq!(scan(&msg[..8], 100), Ok(None));
        assert_eq!(scan(&msg, 100), Ok(Some(Frame { tag: b'Q', len: 9 })));
    }

    #[test]
    fn rejects_bad_and_oversize_lengths() {
        assert!(matches!(
            scan(&[b'Q', 0, 0, 0, 3], 100),
            Err(FrameError::BadLength { .. })
        ));
        assert!(matches!(
            scan(&[b'Q', 0x7f, 0, 0, 0], 100),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            scan(&[b'Q', 0xff, 0xff, 0xff, 0xff], 100),
            Err(FrameError::BadLength { .. })
        ));
    }
}
