//! BackendKeyData ('K'). The backend's key stays inside the proxy; the proxy
//! sends the client a key of its own and maps it back when a cancel arrives.

use super::write_message;
use bytes::{BufMut, BytesMut};

/// A (process id, secret) pair that identifies a session to CancelRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
}

pub fn encode(buf: &mut BytesMut, key: CancelKey) {
    write_message(buf, b'K', |b| {
        b.put_i32(key.pid);
        b.put_i32(key.secret);
    });
}
