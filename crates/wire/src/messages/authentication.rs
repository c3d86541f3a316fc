//! Authentication requests ('R') the proxy sends to clients.

use super::write_message;
use bytes::{BufMut, BytesMut};

pub fn ok(buf: &mut BytesMut) {
    write_message(buf, b'R', |b| b.put_i32(0));
}

pub fn md5(buf: &mut BytesMut, salt: [u8; 4]) {
    write_message(buf, b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

pub fn sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    write_message(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            super::put_cstr(b, m.as_bytes());
        }
        b.put_u8(0);
    });
}

pub fn sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    write_message(buf, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn sasl_final(buf: &mut BytesMut, data: &[u8]) {
    write_message(buf, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}
