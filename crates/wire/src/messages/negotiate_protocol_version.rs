//! NegotiateProtocolVersion ('v'), from the proxy: a client asking for protocol
//! 3.x with x > 0, or for `_pq_.` options, is told what it gets, as
//! PostgreSQL 15 does.

use super::{put_cstr, write_message};
use bytes::{BufMut, BytesMut};

pub fn encode(buf: &mut BytesMut, newest_minor: i32, unrecognized: &[String]) {
    write_message(buf, b'v', |b| {
        b.put_i32(newest_minor);
        b.put_i32(unrecognized.len() as i32);
        for option in unrecognized {
            put_cstr(b, option.as_bytes());
        }
    });
}
