//! A minimal HTTP/1.0 client for the CLI's calls to the admin API (GET and
//! JSON bodies to a loopback or LAN address). One request per connection;
//! no TLS, no redirects: the admin API is plain HTTP by design.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("admin URL {0:?} must look like http://127.0.0.1:9187")]
    BadUrl(String),
    #[error("cannot reach the admin API at {addr}: {source} (is `cutover serve` running?)")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("admin API at {addr}: {detail}")]
    Protocol { addr: String, detail: String },
}

pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Sends `method path` with an optional JSON body and bearer token.
pub fn request(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Result<Response, HttpError> {
    let addr = base
        .strip_prefix("http://")
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| HttpError::BadUrl(base.to_string()))?
        .to_string();
    let connect = |source| HttpError::Connect {
        addr: addr.clone(),
        source,
    };
    let mut stream = TcpStream::connect(&addr).map_err(connect)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(connect)?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(head.as_bytes()).map_err(connect)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(connect)?;
    let text = String::from_utf8_lossy(&raw);
    let protocol = |detail: &str| HttpError::Protocol {
        addr: addr.clone(),
        detail: detail.to_string(),
    };
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| protocol("response has no header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| protocol("response has no status code"))?;
    Ok(Response {
        status,
        body: body.to_string(),
    })
}
