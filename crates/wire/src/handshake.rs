//! The client side of a connection up to a verified identity: encryption
//! negotiation, the startup packet, and authentication. What comes after
//! (backend login, AuthenticationOk, ParameterStatus) belongs to the proxy,
//! which needs the backend's answers to send them.

use crate::auth::{AuthFailure, Authenticator, Binding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS};
use crate::frame::{self, Frame};
use crate::messages::backend_key_data::CancelKey;
use crate::messages::startup::{self, StartupError, StartupPacket, MAX_STARTUP_LEN};
use crate::messages::{authentication, negotiate_protocol_version, password, ErrorResponse};
use crate::sqlstate;
use crate::stream::ClientStream;
use bytes::BytesMut;
use cutover_config::AuthMethod;
use rand::RngExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

/// Authentication messages are short; PostgreSQL caps them at 64 kB too.
const MAX_AUTH_MESSAGE: usize = 65_536;

/// What the handshake needs to know.
pub struct HandshakeSettings<'a> {
    pub tls: Option<&'a TlsAcceptor>,
    pub authenticator: &'a Authenticator,
    /// The database being migrated.
    pub database: &'a str,
    /// Whether another database may be reached (passed through).
    pub other_database: &'a (dyn Fn(&str) -> bool + Sync),
    /// The `tls-server-end-point` hash of the TLS certificate, with which
    /// SCRAM-SHA-256-PLUS is offered over TLS.
    pub channel_binding: Option<&'a [u8]>,
}

/// A client that has proven who it is.
pub struct StartupRequest {
    pub stream: ClientStream,
    pub user: String,
    pub database: String,
    /// Startup parameters other than `user` and `database`, in the client's order.
    pub params: Vec<(String, String)>,
}

pub enum Accepted {
    Startup(StartupRequest),
    Cancel(CancelKey),
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("client disconnected during startup")]
    Disconnected,
    #[error("i/o error during startup: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Auth(#[from] AuthFailure),
    #[error("database \"{0}\" does not exist")]
    UnknownDatabase(String),
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
}

impl HandshakeError {
    /// Label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Disconnected | HandshakeError::Io(_) => "disconnected",
            HandshakeError::Tls(_) => "tls",
            HandshakeError::Protocol(_) => "startup_packet",
            HandshakeError::Auth(AuthFailure::WrongPassword(_)) => "wrong_password",
            HandshakeError::Auth(_) => "bad_auth_message",
            HandshakeError::UnknownDatabase(_) => "unknown_database",
            HandshakeError::NoUser => "no_user",
        }
    }

    /// Refused logins: bad credentials or SASL messages, no user, unknown database.
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            HandshakeError::Auth(_) | HandshakeError::NoUser | HandshakeError::UnknownDatabase(_)
        )
    }

    pub fn is_protocol_violation(&self) -> bool {
        matches!(self, HandshakeError::Protocol(_))
    }

    fn response(&self) -> Option<ErrorResponse> {
        Some(match self {
            HandshakeError::Disconnected | HandshakeError::Io(_) | HandshakeError::Tls(_) => {
                return None
            }
            HandshakeError::Protocol(m) => ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, m),
            HandshakeError::Auth(AuthFailure::WrongPassword(_)) => {
                ErrorResponse::fatal(sqlstate::INVALID_PASSWORD, self.to_string())
            }
            HandshakeError::Auth(_) => {
                ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string())
            }
            HandshakeError::UnknownDatabase(_) => {
                ErrorResponse::fatal(sqlstate::INVALID_CATALOG_NAME, self.to_string())
            }
            HandshakeError::NoUser => {
                ErrorResponse::fatal(sqlstate::INVALID_AUTHORIZATION, self.to_string())
            }
        })
    }
}

/// Runs the handshake on a fresh connection. On failure the client has been
/// sent the ErrorResponse PostgreSQL would send, and the error says why.
pub async fn accept(
    tcp: TcpStream,
    settings: &HandshakeSettings<'_>,
) -> Result<Accepted, HandshakeError> {
    let mut stream = ClientStream::Plain(tcp);
    // A client may ask for GSS encryption, then TLS, then start: at most one of each.
    let mut asked_ssl = false;
    let mut asked_gss = false;
    let packet = loop {
        let body = match read_startup_packet(&mut stream).await {
            Ok(Some(body)) => body,
            Ok(None) => return Err(HandshakeError::Disconnected),
            Err(e) => return Err(fail(stream, e).await),
        };
        let packet = match startup::decode(&body) {
            Ok(packet) => packet,
            Err(e) => return Err(fail(stream, startup_error(e)).await),
        };
        match packet {
            StartupPacket::Ssl if !asked_ssl && !stream.is_tls() => {
                asked_ssl = true;
                // Bytes sent before our answer were not encrypted, and may
                // have been injected on the way: refuse, as PostgreSQL does.
                if stream.has_unread_plaintext() {
                    let e = HandshakeError::Protocol(
                        "received unencrypted data after SSL request".to_string(),
                    );
                    return Err(fail(stream, e).await);
                }
                match settings.tls {
                    Some(acceptor) => {
                        stream.write_all(b"S").await?;
                        stream = match stream {
                            ClientStream::Plain(tcp) => ClientStream::Tls(Box::new(
                                acceptor.accept(tcp).await.map_err(HandshakeError::Tls)?,
                            )),
                            tls => tls,
                        };
                    }
                    None => stream.write_all(b"N").await?,
                }
            }
            StartupPacket::GssEnc if !asked_gss && !stream.is_tls() => {
                asked_gss = true;
                stream.write_all(b"N").await?;
            }
            StartupPacket::Ssl | StartupPacket::GssEnc => {
                let e = HandshakeError::Protocol(
                    "unexpected encryption request after negotiation".to_string(),
                );
                return Err(fail(stream, e).await);
            }
            other => break other,
        }
    };
    match packet {
        StartupPacket::Cancel(key) => Ok(Accepted::Cancel(key)),
        StartupPacket::Startup {
            major: _,
            minor,
            params,
        } => match login(&mut stream, settings, minor, params).await {
            Ok((user, database, params)) => Ok(Accepted::Startup(StartupRequest {
                stream,
                user,
                database,
                params,
            })),
            Err(e) => Err(fail(stream, e).await),
        },
        StartupPacket::Ssl | StartupPacket::GssEnc => unreachable!("handled in the loop"),
    }
}

/// Sends the client the error PostgreSQL would send for `e`, if any, and returns `e`.
async fn fail(mut stream: ClientStream, e: HandshakeError) -> HandshakeError {
    if let Some(response) = e.response() {
        let _ = stream.write_all(&response.to_bytes()).await;
        let _ = stream.flush().await;
    }
    e
}

type Params = Vec<(String, String)>;

/// Reads the identity from the startup parameters and authenticates it.
async fn login(
    stream: &mut ClientStream,
    settings: &HandshakeSettings<'_>,
    minor: u16,
    raw_params: Params,
) -> Result<(String, String, Params), HandshakeError> {
    let mut user = None;
    let mut database = None;
    let mut params = Vec::new();
    let mut unrecognized = Vec::new();
    for (name, value) in raw_params {
        match name.as_str() {
            "user" => user = Some(value),
            "database" => database = Some(value),
            _ if name.starts_with("_pq_.") => unrecognized.push(name),
            _ => params.push((name, value)),
        }
    }
    let mut out = BytesMut::new();
    if minor > 0 || !unrecognized.is_empty() {
        negotiate_protocol_version::encode(&mut out, 0, &unrecognized);
    }
    let user = user
        .filter(|u| !u.is_empty())
        .ok_or(HandshakeError::NoUser)?;
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    let binding = settings.channel_binding.filter(|_| stream.is_tls());
    authenticate(stream, settings.authenticator, binding, &user, &mut out).await?;
    if database != settings.database && !(settings.other_database)(&database) {
        return Err(HandshakeError::UnknownDatabase(database));
    }
    if !out.is_empty() {
        stream.write_all(&out).await?;
    }
    Ok((user, database, params))
}

fn startup_error(e: StartupError) -> HandshakeError {
    HandshakeError::Protocol(e.to_string())
}

async fn read_startup_packet(stream: &mut ClientStream) -> Result<Option<Vec<u8>>, HandshakeError> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = i32::from_be_bytes(len);
    if len < 8 || len as usize > MAX_STARTUP_LEN {
        return Err(startup_error(StartupError::Length));
    }
    let mut body = vec![0u8; len as usize - 4];
    stream
        .read_exact(&mut body)
        .await
        .map_err(eof_is_disconnect)?;
    Ok(Some(body))
}

fn eof_is_disconnect(e: std::io::Error) -> HandshakeError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        HandshakeError::Disconnected
    } else {
        HandshakeError::Io(e)
    }
}

/// Reads the client's next authentication message ('p') and returns its body.
async fn read_password_message(stream: &mut ClientStream) -> Result<Vec<u8>, HandshakeError> {
    let mut header = [0u8; 5];
    stream
        .read_exact(&mut header)
        .await
        .map_err(eof_is_disconnect)?;
    let Frame { tag, len } = frame::header(header, MAX_AUTH_MESSAGE)
        .map_err(|e| HandshakeError::Protocol(e.to_string()))?;
    if tag == b'X' {
        return Err(HandshakeError::Disconnected);
    }
    if tag != b'p' {
        return Err(HandshakeError::Protocol(format!(
            "expected password response, got message type {:?}",
            tag as char
        )));
    }
    let mut body = vec![0u8; len - 5];
    stream
        .read_exact(&mut body)
        .await
        .map_err(eof_is_disconnect)?;
    Ok(body)
}

async fn authenticate(
    stream: &mut ClientStream,
    authenticator: &Authenticator,
    binding: Option<&[u8]>,
    user: &str,
    out: &mut BytesMut,
) -> Result<(), HandshakeError> {
    let malformed = |what: &'static str| HandshakeError::Auth(AuthFailure::Malformed(what));
    match authenticator.method() {
        AuthMethod::Trust => Ok(()),
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::rng().random();
            authentication::md5(out, salt);
            flush(stream, out).await?;
            let body = read_password_message(stream).await?;
            let response =
                password::decode_password(&body).ok_or(malformed("bad password packet"))?;
            authenticator.check_md5(user, salt, response)?;
            Ok(())
        }
        AuthMethod::ScramSha256 => {
            match binding {
                Some(_) => authentication::sasl(out, &[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]),
                None => authentication::sasl(out, &[SCRAM_SHA_256]),
            }
            flush(stream, out).await?;
            let body = read_password_message(stream).await?;
            let (mechanism, data) =
                password::decode_sasl_initial(&body).ok_or(malformed("bad SASLInitialResponse"))?;
            let binding = match (mechanism, binding) {
                (m, Some(hash)) if m == SCRAM_SHA_256_PLUS.as_bytes() => {
                    Binding::Required(hash.to_vec())
                }
                (m, Some(_)) if m == SCRAM_SHA_256.as_bytes() => Binding::Declined,
                (m, None) if m == SCRAM_SHA_256.as_bytes() => Binding::NotOffered,
                (m, _) => {
                    return Err(AuthFailure::UnknownMechanism(
                        String::from_utf8_lossy(m).into_owned(),
                    )
                    .into())
                }
            };
            let mut exchange = authenticator.scram(user, binding);
            let server_first = exchange.client_first(data)?;
            authentication::sasl_continue(out, &server_first);
            flush(stream, out).await?;
            let body = read_password_message(stream).await?;
            let server_final = exchange.client_final(&body)?;
            authentication::sasl_final(out, &server_final);
            Ok(())
        }
    }
}

async fn flush(stream: &mut ClientStream, out: &mut BytesMut) -> Result<(), HandshakeError> {
    stream.write_all(out).await?;
    out.clear();
    Ok(())
}
