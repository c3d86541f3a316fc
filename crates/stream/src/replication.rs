//! A replication connection to the primary over the raw protocol: simple
//! replication commands (CREATE_REPLICATION_SLOT, START_REPLICATION), the
//! CopyBoth stream, and standby status updates that confirm what the
//! secondary has durably applied.

use crate::pgoutput::Lsn;
use crate::StreamError;
use bytes::{BufMut, BytesMut};
use cutover_backend::connection::read_frame;
use cutover_backend::{BackendConnection, BackendTls, LoginTarget, ScramCache};
use cutover_config::BackendUrl;
use cutover_wire::messages::ErrorResponse;
use postgres_protocol::message::frontend;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;

/// Replication messages can carry whole rows; PostgreSQL's limit is 1 GB.
const MAX_MESSAGE: usize = 1 << 30;

pub struct ReplicationConnection {
    conn: BackendConnection,
    buf: BytesMut,
    address: String,
}

impl ReplicationConnection {
    /// Logs in with the URL's credentials as a logical replication connection.
    pub async fn connect(url: &BackendUrl, scram: &ScramCache) -> Result<Self, StreamError> {
        let address = url.address();
        let tls = BackendTls::new(url).map_err(StreamError::Connect)?;
        let conn = BackendConnection::connect(&LoginTarget {
            backend: "old",
            address: &address,
            database: &url.database,
            user: &url.user,
            password: url.password.as_deref(),
            params: &[
                ("replication".to_string(), "database".to_string()),
                ("application_name".to_string(), "cutover-stream".to_string()),
                ("options".to_string(), crate::CANONICAL_OPTIONS.to_string()),
            ],
            timeout: Duration::from_secs(10),
            scram,
            tls: &tls,
            embedded: None,
        })
        .await
        .map_err(|e| StreamError::Connect(e.to_string()))?;
        Ok(ReplicationConnection {
            conn,
            buf: BytesMut::new(),
            address,
        })
    }

    /// Runs a replication command and returns its rows as text.
    pub async fn command(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, StreamError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|e| StreamError::Protocol(e.to_string()))?;
        self.write(&out).await?;
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            let (tag, body) = self.next_message().await?;
            match tag {
                b'D' => rows.push(data_row(&body)?),
                b'E' => failure = Some(ErrorResponse::decode(&body).unwrap_or_default()),
                b'Z' => break,
                _ => {}
            }
        }
        match failure {
            Some(f) => Err(StreamError::Server {
                code: f.code,
                message: f.message,
                context: sql.to_string(),
            }),
            None => Ok(rows),
        }
    }

    /// Starts streaming `slot` from `from` for `publication`; returns once
    /// the server switched to CopyBoth.
    pub async fn start(
        &mut self,
        slot: &str,
        publication: &str,
        from: Lsn,
    ) -> Result<(), StreamError> {
        let sql = format!(
            "START_REPLICATION SLOT \"{slot}\" LOGICAL {from} (proto_version '1', publication_names '\"{publication}\"')"
        );
        let mut out = BytesMut::new();
        frontend::query(&sql, &mut out).map_err(|e| StreamError::Protocol(e.to_string()))?;
        self.write(&out).await?;
        loop {
            let (tag, body) = self.next_message().await?;
            match tag {
                b'W' => return Ok(()),
                b'E' => {
                    let f = ErrorResponse::decode(&body).unwrap_or_default();
                    return Err(StreamError::Server {
                        code: f.code,
                        message: f.message,
                        context: sql,
                    });
                }
                _ => {}
            }
        }
    }

    /// The next CopyData payload of the stream; None when the server ended it.
    pub async fn next_copy_data(&mut self) -> Result<Option<BytesMut>, StreamError> {
        loop {
            let (tag, body) = self.next_message().await?;
            match tag {
                b'd' => return Ok(Some(body)),
                b'c' => return Ok(None),
                b'E' => {
                    let f = ErrorResponse::decode(&body).unwrap_or_default();
                    return Err(StreamError::Server {
                        code: f.code,
                        message: f.message,
                        context: "replication stream".to_string(),
                    });
                }
                _ => {}
            }
        }
    }

    /// True when a whole message is already buffered (more of the stream
    /// has arrived), which the applier uses to batch transactions.
    pub fn has_buffered_message(&self) -> bool {
        matches!(
            cutover_wire::frame::scan(&self.buf, MAX_MESSAGE),
            Ok(Some(_))
        )
    }

    /// Tells the server everything up to `flushed` is durably applied, so
    /// the slot may release that WAL; `want_reply` asks for a keepalive with
    /// the server's current WAL end.
    pub async fn send_status(&mut self, flushed: Lsn, want_reply: bool) -> Result<(), StreamError> {
        let micros_since_2000 = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64 - 946_684_800_000_000)
            .unwrap_or(0);
        let mut payload = BytesMut::with_capacity(34);
        payload.put_u8(b'r');
        payload.put_u64(flushed.0);
        payload.put_u64(flushed.0);
        payload.put_u64(flushed.0);
        payload.put_i64(micros_since_2000);
        payload.put_u8(u8::from(want_reply));
        let mut out = BytesMut::with_capacity(40);
        out.put_u8(b'd');
        out.put_i32(payload.len() as i32 + 4);
        out.put_slice(&payload);
        self.write(&out).await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        self.conn
            .stream
            .write_all(bytes)
            .await
            .map_err(|e| StreamError::Lost(format!("old backend {}: {e}", self.address)))
    }

    async fn next_message(&mut self) -> Result<(u8, BytesMut), StreamError> {
        let frame = read_frame(&mut self.conn.stream, &mut self.buf, MAX_MESSAGE)
            .await
            .map_err(|e| StreamError::Lost(format!("old backend {}: {e}", self.address)))?;
        let mut msg = self.buf.split_to(frame.len);
        let body = msg.split_off(5);
        Ok((frame.tag, body))
    }
}

fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, StreamError> {
    let bad = || StreamError::Protocol("malformed DataRow".to_string());
    let n = i16::from_be_bytes(
        body.get(..2)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    let mut at = 2;
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = i32::from_be_bytes(
            body.get(at..at + 4)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        );
        at += 4;
        if len < 0 {
            row.push(None);
        } else {
            let v = body.get(at..at + len as usize).ok_or_else(bad)?;
            row.push(Some(String::from_utf8_lossy(v).into_owned()));
            at += len as usize;
        }
    }
    Ok(row)
}
