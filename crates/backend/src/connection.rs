//! One raw protocol session with a backend PostgreSQL: login as a given user
//! (whatever method the server asks for), the server's ParameterStatus values
//! and cancel key, and the socket the proxy forwards bytes over.

use crate::scram::{ScramCache, ScramClient};
use crate::stream::BackendStream;
use crate::tls::BackendTls;
use crate::tls::TlsFailure;
use bytes::BytesMut;
use cutover_config::SslMode;
use cutover_wire::frame::{self, Frame};
use cutover_wire::messages::backend_key_data::CancelKey;
use cutover_wire::messages::error_response::ErrorFields;
use cutover_wire::messages::{parameter_status, ready_for_query, ErrorResponse};
use cutover_wire::sqlstate;
use postgres_protocol::message::frontend;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// Messages from a backend during login are small; anything bigger is a bug.
const MAX_LOGIN_MESSAGE: usize = 1 << 20;

/// Where and as whom to log in.
#[derive(Debug, Clone)]
pub struct LoginTarget<'a> {
    /// `old` or `new`, for messages.
    pub backend: &'a str,
    pub address: &'a str,
    pub database: &'a str,
    pub user: &'a str,
    pub password: Option<&'a str>,
    /// Startup parameters other than user and database.
    pub params: &'a [(String, String)],
    pub timeout: Duration,
    /// Salted SCRAM passwords from earlier logins.
    pub scram: &'a ScramCache,
    /// The URL's sslmode, ready to use.
    pub tls: &'a BackendTls,
    /// A backend inside cutover: `address` is only its name in messages.
    pub embedded: Option<&'a crate::stream::EmbeddedBackend>,
}

/// Why a backend session could not be had. Each variant renders as the
/// ErrorResponse the client should see.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{backend} backend {address} is unreachable: {source}")]
    Unreachable {
        backend: String,
        address: String,
        source: std::io::Error,
    },
    #[error("{backend} backend {address} did not complete login within {timeout:?}")]
    Timeout {
        backend: String,
        address: String,
        timeout: Duration,
    },
    #[error("{backend} backend refused login: {}", fields.message)]
    Refused {
        backend: String,
        /// The backend's own ErrorResponse, forwarded to the client unchanged.
        raw: BytesMut,
        fields: Box<ErrorFields>,
    },
    #[error("{backend} backend {address} asked for a password for user \"{user}\", but auth.users has none for that user")]
    NoPassword {
        backend: String,
        address: String,
        user: String,
    },
    #[error("{backend} backend {address}: {detail}")]
    Tls {
        backend: String,
        address: String,
        detail: String,
    },
    #[error("{backend} backend {address}: {detail}")]
    Protocol {
        backend: String,
        address: String,
        detail: String,
    },
    #[error("no {backend} backend connection became free within {waited:?} ({size} in use); raise {backend}.pool_size or proxy.pool_timeout_ms")]
    PoolTimeout {
        backend: String,
        waited: Duration,
        size: u32,
    },
}

impl ConnectError {
    /// The ErrorResponse bytes for the client.
    pub fn client_error(&self) -> BytesMut {
        match self {
            ConnectError::Refused { raw, .. } => raw.clone(),
            ConnectError::PoolTimeout { .. } => {
                ErrorResponse::fatal(sqlstate::TOO_MANY_CONNECTIONS, self.to_string()).to_bytes()
            }
            ConnectError::NoPassword { .. } => {
                ErrorResponse::fatal(sqlstate::INVALID_PASSWORD, self.to_string()).to_bytes()
            }
            ConnectError::Unreachable { .. }
            | ConnectError::Timeout { .. }
            | ConnectError::Tls { .. } => {
                ErrorResponse::fatal(sqlstate::CONNECTION_FAILURE, self.to_string()).to_bytes()
            }
            ConnectError::Protocol { .. } => {
                ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string()).to_bytes()
            }
        }
    }

    /// Label for the connect-failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Unreachable { .. } => "unreachable",
            ConnectError::Timeout { .. } => "timeout",
            ConnectError::Refused { .. } => "refused",
            ConnectError::NoPassword { .. } => "no_password",
            ConnectError::Tls { .. } => "tls",
            ConnectError::Protocol { .. } => "protocol",
            ConnectError::PoolTimeout { .. } => "pool_timeout",
        }
    }
}

/// A logged-in backend session.
pub struct BackendConnection {
    pub stream: BackendStream,
    /// The backend's own cancel key; never shown to clients.
    pub key: CancelKey,
    /// The server's current ParameterStatus values, in the order first reported.
    pub params: Vec<(String, String)>,
    /// Notices the server sent during login, forwarded to the first client.
    pub login_notices: BytesMut,
    pub created: Instant,
}

impl BackendConnection {
    /// Logs in; returns once the backend reported ReadyForQuery.
    /// With sslmode=allow, a server that refuses the plain login (pg_hba
    /// `hostssl` only) is asked again over TLS, as libpq does.
    pub async fn connect(target: &LoginTarget<'_>) -> Result<BackendConnection, ConnectError> {
        let attempt = async {
            match Self::connect_inner(target, false).await {
                Err(ConnectError::Refused { fields, .. })
                    if target.tls.mode() == SslMode::Allow
                        && fields.code == sqlstate::INVALID_AUTHORIZATION =>
                {
                    Self::connect_inner(target, true).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(target.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Timeout {
                backend: target.backend.to_string(),
                address: target.address.to_string(),
                timeout: target.timeout,
            }),
        }
    }

    async fn connect_inner(
        target: &LoginTarget<'_>,
        insist_on_tls: bool,
    ) -> Result<BackendConnection, ConnectError> {
        let protocol = |detail: String| ConnectError::Protocol {
            backend: target.backend.to_string(),
            address: target.address.to_string(),
            detail,
        };
        let unreachable = |source: std::io::Error| ConnectError::Unreachable {
            backend: target.backend.to_string(),
            address: target.address.to_string(),
            source,
        };
        let mut stream = match target.embedded {
            Some(engine) => BackendStream::Embedded(engine.0.open()),
            None => {
                let tcp = TcpStream::connect(target.address)
                    .await
                    .map_err(unreachable)?;
                tcp.set_nodelay(true).map_err(unreachable)?;
                target
                    .tls
                    .start(tcp, insist_on_tls)
                    .await
                    .map_err(|e| match e {
                        TlsFailure::Io(e) => unreachable(e),
                        other => ConnectError::Tls {
                            backend: target.backend.to_string(),
                            address: target.address.to_string(),
                            detail: other.to_string(),
                        },
                    })?
            }
        };
        let mut out = BytesMut::new();
        let mut startup: Vec<(&str, &str)> =
            vec![("user", target.user), ("database", target.database)];
        startup.extend(target.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        frontend::startup_message(startup, &mut out)
            .map_err(|e| protocol(format!("cannot encode startup packet: {e}")))?;
        stream.write_all(&out).await.map_err(unreachable)?;

        let mut buf = BytesMut::with_capacity(4096);
        let mut params: Vec<(String, String)> = Vec::new();
        let mut key = None;
        let mut notices = BytesMut::new();
        let mut scram: Option<ScramClient> = None;
        loop {
            let frame = read_frame(&mut stream, &mut buf, MAX_LOGIN_MESSAGE)
                .await
                .map_err(|e| match e {
                    ReadError::Io(e) => unreachable(e),
                    ReadError::Frame(e) => protocol(e.to_string()),
                    ReadError::Closed => protocol("closed the connection during login".to_string()),
                })?;
            let msg = buf.split_to(frame.len);
            let body = &msg[5..];
            match frame.tag {
                b'R' => {
                    let code = body
                        .get(..4)
                        .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                        .ok_or_else(|| protocol("short authentication request".to_string()))?;
                    let data = &body[4..];
                    let password = || {
                        target.password.ok_or_else(|| ConnectError::NoPassword {
                            backend: target.backend.to_string(),
                            address: target.address.to_string(),
                            user: target.user.to_string(),
                        })
                    };
                    out.clear();
                    match code {
                        0 => continue,
                        3 => frontend::password_message(password()?.as_bytes(), &mut out)
                            .map_err(|e| protocol(e.to_string()))?,
                        5 => {
                            let salt: [u8; 4] = data
                                .try_into()
                                .map_err(|_| protocol("bad MD5 salt".to_string()))?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                target.user.as_bytes(),
                                password()?.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut out)
                                .map_err(|e| protocol(e.to_string()))?;
                        }
                        10 => {
                            let offers_scram = data
                                .split(|b| *b == 0)
                                .any(|m| m == SCRAM_SHA_256.as_bytes());
                            if !offers_scram {
                                return Err(protocol(
                                    "server offers no SASL mechanism cutover supports (SCRAM-SHA-256)"
                                        .to_string(),
                                ));
                            }
                            let client = ScramClient::new(target.scram, target.user, password()?);
                            frontend::sasl_initial_response(SCRAM_SHA_256, &client.client_first(), &mut out)
                                .map_err(|e| protocol(e.to_string()))?;
                            scram = Some(client);
                        }
                        11 => {
                            let client = scram
                                .as_mut()
                                .ok_or_else(|| protocol("SASLContinue before SASL".to_string()))?;
                            let last = client
                                .client_final(data)
                                .map_err(|e| protocol(format!("SCRAM: {e}")))?;
                            frontend::sasl_response(&last, &mut out).map_err(|e| protocol(e.to_string()))?;
                        }
                        12 => {
                            scram
                                .as_ref()
                                .ok_or_else(|| protocol("SASLFinal before SASL".to_string()))?
                                .verify_server(data)
                                .map_err(|e| protocol(format!("SCRAM: {e}")))?;
                            continue;
                        }
                        other => {
                            return Err(protocol(format!(
                                "server asked for authentication method {other}, which cutover does not support"
                            )))
                        }
                    }
                    stream.write_all(&out).await.map_err(unreachable)?;
                }
                b'E' => {
                    let fields = Box::new(ErrorResponse::decode(body).unwrap_or_default());
                    return Err(ConnectError::Refused {
                        backend: target.backend.to_string(),
                        raw: msg,
                        fields,
                    });
                }
                b'S' => {
                    let (name, value) = parameter_status::decode(body)
                        .ok_or_else(|| protocol("bad ParameterStatus".to_string()))?;
                    set_param(&mut params, name, value);
                }
                b'K' => {
                    if body.len() != 8 {
                        return Err(protocol("bad BackendKeyData".to_string()));
                    }
                    key = Some(CancelKey {
                        pid: i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                        secret: i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                    });
                }
                b'N' => notices.extend_from_slice(&msg),
                b'v' => {}
                b'Z' => {
                    if ready_for_query::decode(body).is_none() {
                        return Err(protocol("bad ReadyForQuery".to_string()));
                    }
                    if !buf.is_empty() {
                        return Err(protocol(
                            "data after ReadyForQuery during login".to_string(),
                        ));
                    }
                    return Ok(BackendConnection {
                        stream,
                        key: key.unwrap_or(CancelKey { pid: 0, secret: 0 }),
                        params,
                        login_notices: notices,
                        created: Instant::now(),
                    });
                }
                other => {
                    return Err(protocol(format!(
                        "unexpected message type {:?} during login",
                        other as char
                    )))
                }
            }
        }
    }

    /// Records a ParameterStatus the backend reported mid-session.
    pub fn set_param(&mut self, name: String, value: String) {
        set_param(&mut self.params, name, value);
    }

    /// True when the idle socket shows no sign of having been closed by the server.
    pub fn looks_alive(&self) -> bool {
        !self.stream.has_pending_input()
    }

    /// Runs simple-query statements whose results nobody needs (session reset),
    /// waiting for each ReadyForQuery. Fails on any ErrorResponse.
    pub async fn run_quietly(&mut self, statements: &[&str]) -> Result<(), String> {
        self.simple_queries(statements, |_| {}).await
    }

    /// Runs one simple query and returns the first column of its first
    /// row (None for no row or NULL).
    pub async fn query_value(&mut self, sql: &str) -> Result<Option<String>, String> {
        let mut value = None;
        self.simple_queries(&[sql], |row| {
            if value.is_none() {
                value = Some(first_column(row));
            }
        })
        .await?;
        Ok(value.flatten())
    }

    /// Sends `statements` as simple queries and reads every reply up to
    /// their ReadyForQuery, handing each DataRow body to `on_row` and
    /// recording ParameterStatus changes. Fails on any ErrorResponse.
    async fn simple_queries(
        &mut self,
        statements: &[&str],
        mut on_row: impl FnMut(&[u8]),
    ) -> Result<(), String> {
        let mut out = BytesMut::new();
        for sql in statements {
            frontend::query(sql, &mut out).map_err(|e| e.to_string())?;
        }
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = BytesMut::new();
        let mut ready = 0;
        let mut failure = None;
        while ready < statements.len() {
            let frame = read_frame(&mut self.stream, &mut buf, MAX_LOGIN_MESSAGE)
                .await
                .map_err(|e| e.to_string())?;
            let msg = buf.split_to(frame.len);
            match frame.tag {
                b'Z' => ready += 1,
                b'E' => {
                    failure = Some(ErrorResponse::decode(&msg[5..]).unwrap_or_default().message)
                }
                b'S' => {
                    if let Some((name, value)) = parameter_status::decode(&msg[5..]) {
                        self.set_param(name, value);
                    }
                }
                b'D' => on_row(&msg[5..]),
                _ => {}
            }
        }
        match (failure, buf.is_empty()) {
            (Some(message), _) => Err(message),
            (None, false) => Err("unexpected data after the replies".to_string()),
            (None, true) => Ok(()),
        }
    }

    /// Says goodbye politely; errors don't matter, the socket closes anyway.
    pub async fn terminate(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = self.stream.write_all(&out).await;
    }
}

/// The first column of a DataRow body as text; None for NULL or a
/// malformed row.
fn first_column(body: &[u8]) -> Option<String> {
    let count = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    if count < 1 {
        return None;
    }
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    let bytes = body.get(6..6 + len)?;
    String::from_utf8(bytes.to_vec()).ok()
}

/// Records a ParameterStatus value, keeping first-reported order.
pub fn set_param(params: &mut Vec<(String, String)>, name: String, value: String) {
    match params.iter_mut().find(|(n, _)| *n == name) {
        Some(entry) => entry.1 = value,
        None => params.push((name, value)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] frame::FrameError),
    #[error("connection closed")]
    Closed,
}

/// Reads from `stream` into `buf` until a whole message is at its front.
pub async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Frame, ReadError> {
    loop {
        if let Some(frame) = frame::scan(buf, max)? {
            return Ok(frame);
        }
        buf.reserve(4096);
        if stream.read_buf(buf).await? == 0 {
            return Err(ReadError::Closed);
        }
    }
}

/// Forwards a CancelRequest for `key` to the backend at `address`.
pub async fn send_cancel(address: &str, key: CancelKey, timeout: Duration) -> std::io::Result<()> {
    let work = async {
        let mut stream = TcpStream::connect(address).await?;
        let mut out = BytesMut::new();
        frontend::cancel_request(key.pid, key.secret, &mut out);
        stream.write_all(&out).await?;
        // The server closes the socket once it has read the request.
        let mut sink = [0u8; 16];
        while stream.read(&mut sink).await? > 0 {}
        Ok(())
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
