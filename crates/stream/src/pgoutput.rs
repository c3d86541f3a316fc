//! Decoding of the replication stream: the CopyBoth envelope (XLogData,
//! primary keepalive) and the `pgoutput` logical messages inside it
//! (protocol version 1, text-format tuples).

use std::fmt;

/// A position in the write-ahead log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl std::str::FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Lsn, String> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| format!("bad LSN {s:?}"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|_| format!("bad LSN {s:?}"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| format!("bad LSN {s:?}"))?;
        Ok(Lsn((hi << 32) | lo))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed replication message: {0}")]
pub struct DecodeError(pub &'static str);

/// A CopyData payload from the server on a replication connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage<'a> {
    XLogData {
        start: Lsn,
        end: Lsn,
        data: &'a [u8],
    },
    Keepalive {
        end: Lsn,
        reply_requested: bool,
    },
}

/// One column of a replicated tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// An unchanged TOASTed value: not sent, leave it as it is.
    Unchanged,
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub is_key: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// The table's replica identity: `d`efault (primary key), `f`ull,
    /// `i`ndex or `n`othing.
    pub identity: u8,
    pub columns: Vec<Column>,
    /// Set (by the stream, from the primary's catalog) for a table without
    /// a key: REPLICA IDENTITY FULL and no primary key. Each column's type,
    /// by which the applier matches whole rows.
    pub keyless_types: Option<Vec<String>>,
}

/// A pgoutput logical message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logical {
    Begin {
        final_lsn: Lsn,
        xid: u32,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
    },
    Relation(Relation),
    Insert {
        rel: u32,
        new: Vec<Datum>,
    },
    /// `old` is the key (or whole old row with REPLICA IDENTITY FULL) when
    /// the key changed or identity is full; otherwise the key is in `new`.
    Update {
        rel: u32,
        old: Option<Vec<Datum>>,
        new: Vec<Datum>,
    },
    Delete {
        rel: u32,
        old: Vec<Datum>,
    },
    Truncate {
        rels: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// Origin, Type and Message: nothing to apply.
    Other,
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(
            b.try_into().map_err(|_| DecodeError("truncated"))?,
        ))
    }
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError("unterminated string"))?;
        let s = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Datum>, DecodeError> {
        let n = self.i16()?;
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    Datum::Text(String::from_utf8_lossy(self.take(len)?).into_owned())
                }
                _ => return Err(DecodeError("unknown tuple column kind")),
            });
        }
        Ok(out)
    }
}

/// Decodes a CopyData payload on a replication connection.
pub fn decode_replication(payload: &[u8]) -> Result<ReplicationMessage<'_>, DecodeError> {
    let mut r = Reader { buf: payload };
    match r.u8()? {
        b'w' => {
            let start = Lsn(r.u64()?);
            let end = Lsn(r.u64()?);
            let _send_time = r.u64()?;
            Ok(ReplicationMessage::XLogData {
                start,
                end,
                data: r.buf,
            })
        }
        b'k' => {
            let end = Lsn(r.u64()?);
            let _send_time = r.u64()?;
            let reply_requested = r.u8()? == 1;
            Ok(ReplicationMessage::Keepalive {
                end,
                reply_requested,
            })
        }
        _ => Err(DecodeError("unknown replication message")),
    }
}

/// Decodes one pgoutput message.
pub fn decode_logical(data: &[u8]) -> Result<Logical, DecodeError> {
    let mut r = Reader { buf: data };
    Ok(match r.u8()? {
        b'B' => {
            let final_lsn = Lsn(r.u64()?);
            let _commit_time = r.u64()?;
            Logical::Begin {
                final_lsn,
                xid: r.u32()?,
            }
        }
        b'C' => {
            let _flags = r.u8()?;
            let commit_lsn = Lsn(r.u64()?);
            let end_lsn = Lsn(r.u64()?);
            Logical::Commit {
                commit_lsn,
                end_lsn,
            }
        }
        b'R' => {
            let oid = r.u32()?;
            let schema = r.cstr()?;
            let name = r.cstr()?;
            let identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                let _typmod = r.u32()?;
                columns.push(Column {
                    name,
                    type_oid,
                    is_key: flags & 1 == 1,
                });
            }
            Logical::Relation(Relation {
                oid,
                schema,
                name,
                identity,
                columns,
                keyless_types: None,
            })
        }
        b'I' => {
            let rel = r.u32()?;
            if r.u8()? != b'N' {
                return Err(DecodeError("insert without new tuple"));
            }
            Logical::Insert {
                rel,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let rel = r.u32()?;
            let mut old = None;
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(DecodeError("update without new tuple"));
            }
            Logical::Update {
                rel,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let rel = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => Logical::Delete {
                    rel,
                    old: r.tuple()?,
                },
                _ => return Err(DecodeError("delete without old tuple")),
            }
        }
        b'T' => {
            let n = r.u32()?;
            let options = r.u8()?;
            let mut rels = Vec::with_capacity(n as usize);
            for _ in 0..n {
                rels.push(r.u32()?);
            }
            Logical::Truncate {
                rels,
                cascade: options & 1 == 1,
                restart_identity: options & 2 == 2,
            }
        }
        b'O' | b'Y' | b'M' => Logical::Other,
        _ => return Err(DecodeError("unknown pgoutput message")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
    }

    #[test]
    fn decodes_relation_and_update_with_old_key_and_toast() {
        let mut rel = vec![b'R'];
        rel.extend_from_slice(&16384u32.to_be_bytes());
        rel.extend_from_slice(b"public\0items\0d");
        rel.extend_from_slice(&2i16.to_be_bytes());
        rel.extend_from_slice(b"\x01id\0");
        rel.extend_from_slice(&23u32.to_be_bytes());
        rel.extend_from_slice(&(-1i32).to_be_bytes());
        rel.extend_from_slice(b"\x00body\0");
        rel.extend_from_slice(&25u32.to_be_bytes());
        rel.extend_from_slice(&(-1i32).to_be_bytes());
        let Logical::Relation(r) = decode_logical(&rel).unwrap() else {
            panic!("relation")
        };
        assert_eq!(r.name, "items");
        assert!(r.columns[0].is_key && !r.columns[1].is_key);

        let mut upd = vec![b'U'];
        upd.extend_from_slice(&16384u32.to_be_bytes());
        upd.extend_from_slice(b"K");
        upd.extend_from_slice(&2i16.to_be_bytes());
        upd.extend_from_slice(b"t\0\0\0\x011n");
        upd.extend_from_slice(b"N");
        upd.extend_from_slice(&2i16.to_be_bytes());
        upd.extend_from_slice(b"t\0\0\0\x012u");
        assert_eq!(
            decode_logical(&upd).unwrap(),
            Logical::Update {
                rel: 16384,
                old: Some(vec![Datum::Text("1".into()), Datum::Null]),
                new: vec![Datum::Text("2".into()), Datum::Unchanged],
            }
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"I",
            b"U\0\0\0\x01N\0\x05",
            b"Cx",
            b"wabc",
            b"R\0\0\0\x01pub",
        ] {
            assert!(decode_logical(bad).is_err() || decode_replication(bad).is_err());
        }
    }
}
