//! Shared test harness: real PostgreSQL clusters, cutover started in-process
//! in front of them, and a raw protocol client that records every message so
//! a session through cutover can be compared byte for byte with the same
//! session run directly against the database.

#![allow(dead_code)]

pub mod script;
pub mod sqlite_app;

use bytes::{BufMut, BytesMut};
use cutover::Server;
use cutover_backend::connection::read_frame;
use cutover_backend::{BackendConnection, LoginTarget};
use cutover_config::Config;
use cutover_pgcluster::{Cluster, ClusterOptions, HostAuth, SUPERUSER, SUPERUSER_PASSWORD};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-secret";
pub const DB: &str = "app";

/// A cluster with an `app` role (password APP_PASSWORD) owning database `app`.
pub fn cluster(host_auth: HostAuth) -> Cluster {
    cluster_with(ClusterOptions {
        host_auth,
        ..Default::default()
    })
}

/// [`cluster`] with any options.
pub fn cluster_with(options: ClusterOptions) -> Cluster {
    let cluster = Cluster::start(options).expect("start PostgreSQL cluster");
    cluster
        .psql(
            "postgres",
            &format!("CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'"),
        )
        .unwrap();
    cluster
        .psql(
            "postgres",
            &format!("CREATE DATABASE {DB} OWNER {APP_USER}"),
        )
        .unwrap();
    cluster
}

/// Two clusters (old and new) with an `items` table the `app` role may use;
/// `rows` of it on old.
pub fn items_pair(rows: i32) -> (Cluster, Cluster) {
    let (old, new) = (
        cluster(HostAuth::ScramSha256),
        cluster(HostAuth::ScramSha256),
    );
    for c in [&old, &new] {
        c.psql(
            DB,
            "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL); GRANT ALL ON items TO app",
        )
        .unwrap();
    }
    old.psql(
        DB,
        &format!("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, {rows}) g"),
    )
    .unwrap();
    (old, new)
}

/// The config text for a proxy in front of `cluster` on ephemeral ports.
/// `extra` is merged in as more TOML (sections may be repeated keys-free).
pub fn config_text(cluster: &Cluster, method: &str, proxy_extra: &str, old_extra: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
shutdown_timeout_ms = 1000
{proxy_extra}

[auth]
method = "{method}"
users = [{{ name = "{APP_USER}", password = "{APP_PASSWORD}" }}, {{ name = "{SUPERUSER}", password = "{SUPERUSER_PASSWORD}" }}]

[admin]
listen = "127.0.0.1:0"

[old]
url = "{}"
{old_extra}
"#,
        cluster.url(SUPERUSER, SUPERUSER_PASSWORD, DB)
    )
}

/// [`config_text`] for a proxy in front of `old` mirroring to `new`, with
/// admin token `token`; `old_extra` goes into `[old]`, `new_tail` after
/// `[new]`'s url (more keys, then further sections).
pub fn mirror_config_text(
    old: &Cluster,
    new: &Cluster,
    token: &str,
    old_extra: &str,
    new_tail: &str,
) -> String {
    let text = config_text(old, "scram-sha-256", "", old_extra).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\""),
    );
    format!(
        "{text}\n[new]\nurl = \"{}\"\n{new_tail}",
        new.url(SUPERUSER, SUPERUSER_PASSWORD, DB)
    )
}

/// The configuration with the proxy and the admin API on fixed ports (for
/// a daemon run as a child process).
pub fn on_ports(config: &str, proxy_port: u16, admin_port: u16) -> String {
    config
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{proxy_port}\""),
            1,
        )
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{admin_port}\""),
            1,
        )
}

pub async fn start_proxy(cluster: &Cluster) -> Server {
    start_proxy_with(&config_text(cluster, "scram-sha-256", "", "")).await
}

pub async fn start_proxy_with(config: &str) -> Server {
    let config = Config::from_toml(config).expect("valid test config");
    Server::start(config).await.expect("start cutover")
}

/// A tokio-postgres connection string for `addr`.
pub fn conn_string(addr: SocketAddr, user: &str, password: &str) -> String {
    format!(
        "host={} port={} user={user} password={password} dbname={DB} connect_timeout=10",
        addr.ip(),
        addr.port()
    )
}

pub async fn connect(addr: SocketAddr) -> tokio_postgres::Client {
    connect_as(addr, APP_USER, APP_PASSWORD)
        .await
        .expect("connect through cutover")
}

pub async fn connect_as(
    addr: SocketAddr,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) =
        tokio_postgres::connect(&conn_string(addr, user, password), tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

pub fn direct_addr(cluster: &Cluster) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], cluster.port()))
}

/// The SQLSTATE of a tokio-postgres error, or a description when it has none.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

/// The server's message for a tokio-postgres error (its Display says only "db error").
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// One protocol message as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub tag: char,
    pub body: Vec<u8>,
}

impl Msg {
    /// The message with values that legitimately differ per session masked:
    /// BackendKeyData, process ids in NOTIFY, and table OIDs in
    /// RowDescription (each session's temp table is its own relation).
    pub fn normalized(&self) -> Msg {
        match self.tag {
            'T' => {
                let mut body = self.body.clone();
                let fields = i16::from_be_bytes([body[0], body[1]]);
                let mut at = 2;
                for _ in 0..fields {
                    at += body[at..].iter().position(|b| *b == 0).unwrap() + 1;
                    body[at..at + 4].fill(0);
                    at += 18;
                }
                Msg { tag: 'T', body }
            }
            'K' => Msg {
                tag: 'K',
                body: vec![],
            },
            'A' => Msg {
                tag: 'A',
                body: self.body[4..].to_vec(),
            },
            _ => self.clone(),
        }
    }
}

/// A raw protocol client: logs in, then sends arbitrary bytes and records
/// every message it gets back.
pub struct RawClient {
    pub stream: cutover_backend::BackendStream,
    pub login: Vec<Msg>,
    /// The BackendKeyData the server gave.
    pub key: cutover_wire::messages::backend_key_data::CancelKey,
    buf: BytesMut,
}

impl RawClient {
    /// Logs in over TCP with the given startup parameters and password.
    pub async fn connect(
        addr: SocketAddr,
        user: &str,
        password: &str,
        params: &[(&str, &str)],
    ) -> RawClient {
        let address = addr.to_string();
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let conn = BackendConnection::connect(&LoginTarget {
            backend: "test",
            address: &address,
            database: DB,
            user,
            password: Some(password),
            params: &params,
            timeout: Duration::from_secs(10),
            scram: &cutover_backend::ScramCache::default(),
            tls: &cutover_backend::BackendTls::disabled(),
            embedded: None,
        })
        .await
        .expect("raw login");
        let mut login: Vec<Msg> = conn
            .params
            .iter()
            .map(|(k, v)| {
                let mut body = k.as_bytes().to_vec();
                body.push(0);
                body.extend_from_slice(v.as_bytes());
                body.push(0);
                Msg { tag: 'S', body }
            })
            .collect();
        login.sort_by(|a, b| a.body.cmp(&b.body));
        RawClient {
            key: conn.key,
            stream: conn.stream,
            login,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Reads messages until `count` ReadyForQuery have arrived.
    pub async fn until_ready(&mut self, count: usize) -> Vec<Msg> {
        let mut out = Vec::new();
        let mut seen = 0;
        while seen < count {
            let msg = self.next().await.expect("message before ReadyForQuery");
            if msg.tag == 'Z' {
                seen += 1;
            }
            out.push(msg);
        }
        out
    }

    /// The next message, or None if the connection closed.
    pub async fn next(&mut self) -> Option<Msg> {
        let frame = tokio::time::timeout(
            Duration::from_secs(30),
            read_frame(&mut self.stream, &mut self.buf, usize::MAX),
        )
        .await
        .expect("message within 30s")
        .ok()?;
        let msg = self.buf.split_to(frame.len);
        Some(Msg {
            tag: msg[0] as char,
            body: msg[5..].to_vec(),
        })
    }

    /// Sends `bytes` and collects everything up to `ready` ReadyForQuery messages.
    pub async fn exchange(&mut self, bytes: &[u8], ready: usize) -> Vec<Msg> {
        self.send(bytes).await;
        self.until_ready(ready).await
    }
}

/// Decodes the SQLSTATE and message of an ErrorResponse body.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let f = cutover_wire::messages::ErrorResponse::decode(body).expect("error fields");
    (f.code, f.message)
}

/// Opens a bare TCP connection and sends a startup packet with the given
/// protocol version code and parameters.
pub async fn raw_startup(addr: SocketAddr, code: i32, params: &[(&str, &str)]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut body = BytesMut::new();
    body.put_i32(code);
    for (k, v) in params {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut packet = BytesMut::new();
    packet.put_i32(body.len() as i32 + 4);
    packet.put_slice(&body);
    stream.write_all(&packet).await.expect("send startup");
    stream
}

/// Reads whatever the server sends until it closes the connection (or 10 s pass).
pub async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    out
}

/// The messages in a byte string.
pub fn parse_messages(mut bytes: &[u8]) -> Vec<Msg> {
    let mut out = Vec::new();
    while bytes.len() >= 5 {
        let len = i32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize + 1;
        if bytes.len() < len {
            break;
        }
        out.push(Msg {
            tag: bytes[0] as char,
            body: bytes[5..len].to_vec(),
        });
        bytes = &bytes[len..];
    }
    out
}

/// HTTP GET against the admin API: (status, body).
/// A call to the admin API: status and the JSON answer (Null if none).
pub fn admin_call(
    server: &Server,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let r = cutover::cli_http::request(
        &format!("http://{}", server.admin_addr),
        method,
        path,
        Some(body),
        token,
    )
    .expect("admin request");
    (
        r.status,
        serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null),
    )
}

/// An admin call that must answer 200.
pub fn admin_ok(
    server: &Server,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> serde_json::Value {
    let (status, doc) = admin_call(server, method, path, body, token);
    assert_eq!(status, 200, "{method} {path}: {doc}");
    doc
}

/// Starts mirroring (answer 200 required) and waits until the stream has
/// passed everything `source` has written.
pub async fn start_mirroring(server: &Server, source: &Cluster, token: Option<&str>) {
    admin_ok(server, "POST", "/v1/mirror/start", "{}", token);
    drained(server, source).await;
}

/// `/v1/status` as JSON.
pub fn status_doc(server: &Server) -> serde_json::Value {
    let (code, body) = admin_get(server, "/v1/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status JSON")
}

pub fn admin_get(server: &Server, path: &str) -> (u16, String) {
    let r = cutover::cli_http::request(
        &format!("http://{}", server.admin_addr),
        "GET",
        path,
        None,
        None,
    )
    .expect("admin request");
    (r.status, r.body)
}

/// Polls /metrics until `name_and_labels` has `value` (for counters updated
/// by background work), returning the last value seen after 5 s.
pub async fn wait_for_metric(server: &Server, name_and_labels: &str, value: f64) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = tokio::task::block_in_place(|| admin_get(server, "/metrics"));
        let seen = metric(&body, name_and_labels);
        if seen == Some(value) || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of a metric line (exact name with labels) in a /metrics body.
pub fn metric(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// Frontend message builders for raw-protocol tests.
pub mod fe {
    use bytes::{BufMut, BytesMut};

    pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(tag);
        b.put_i32(body.len() as i32 + 4);
        b.put_slice(body);
        b.to_vec()
    }

    fn cstr(b: &mut BytesMut, s: &str) {
        b.put_slice(s.as_bytes());
        b.put_u8(0);
    }

    pub fn query(sql: &str) -> Vec<u8> {
        let mut b = BytesMut::new();
        cstr(&mut b, sql);
        message(b'Q', &b)
    }

    pub fn parse(name: &str, sql: &str, param_types: &[u32]) -> Vec<u8> {
        let mut b = BytesMut::new();
        cstr(&mut b, name);
        cstr(&mut b, sql);
        b.put_i16(param_types.len() as i16);
        for t in param_types {
            b.put_u32(*t);
        }
        message(b'P', &b)
    }

    pub fn bind(
        portal: &str,
        statement: &str,
        param_formats: &[i16],
        params: &[Option<&[u8]>],
        result_formats: &[i16],
    ) -> Vec<u8> {
        let mut b = BytesMut::new();
        cstr(&mut b, portal);
        cstr(&mut b, statement);
        b.put_i16(param_formats.len() as i16);
        for f in param_formats {
            b.put_i16(*f);
        }
        b.put_i16(params.len() as i16);
        for p in params {
            match p {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
                None => b.put_i32(-1),
            }
        }
        b.put_i16(result_formats.len() as i16);
        for f in result_formats {
            b.put_i16(*f);
        }
        message(b'B', &b)
    }

    pub fn describe(kind: u8, name: &str) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(kind);
        cstr(&mut b, name);
        message(b'D', &b)
    }

    pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
        let mut b = BytesMut::new();
        cstr(&mut b, portal);
        b.put_i32(max_rows);
        message(b'E', &b)
    }

    pub fn close(kind: u8, name: &str) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(kind);
        cstr(&mut b, name);
        message(b'C', &b)
    }

    pub fn sync() -> Vec<u8> {
        message(b'S', &[])
    }

    pub fn flush() -> Vec<u8> {
        message(b'H', &[])
    }

    pub fn terminate() -> Vec<u8> {
        message(b'X', &[])
    }

    pub fn copy_data(data: &[u8]) -> Vec<u8> {
        message(b'd', data)
    }

    pub fn copy_done() -> Vec<u8> {
        message(b'c', &[])
    }

    pub fn copy_fail(reason: &str) -> Vec<u8> {
        let mut b = BytesMut::new();
        cstr(&mut b, reason);
        message(b'f', &b)
    }

    /// Concatenates messages into one write (a pipeline).
    pub fn batch(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }
}

/// The `mirror` part of `/v1/status` of the cutover at `admin` (Null when
/// it does not answer).
pub fn mirror_status_at(admin: SocketAddr) -> serde_json::Value {
    match cutover::cli_http::request(&format!("http://{admin}"), "GET", "/v1/status", None, None) {
        Ok(r) => serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["mirror"].clone(),
        Err(_) => serde_json::Value::Null,
    }
}

/// An LSN as PostgreSQL prints it (`16/B374D848`).
pub fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.trim().split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Waits until the stream run by the cutover at `admin` holds everything
/// `source` (the stream's primary) has written now.
pub async fn drained_at(admin: SocketAddr, source: &Cluster) {
    let target = lsn(&source.psql(DB, "SELECT pg_current_wal_lsn()").unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = mirror_status_at(admin);
        if let (Some(c), "streaming") = (
            m["caught_up_lsn"].as_str(),
            m["state"].as_str().unwrap_or(""),
        ) {
            if lsn(c) >= target {
                return;
            }
        }
        assert!(Instant::now() < deadline, "stream did not drain: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`drained_at`] for an in-process cutover.
pub async fn drained(server: &Server, source: &Cluster) {
    drained_at(server.admin_addr, source).await
}

/// The daemon as a child process, so it can be killed with SIGKILL.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn_daemon(config: &std::path::Path, admin: std::net::SocketAddr) -> Daemon {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while cutover::cli_http::request(&format!("http://{admin}"), "GET", "/healthz", None, None)
        .is_err()
    {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Daemon(child)
}

/// Waits until the backend `pid` runs a statement.
pub async fn wait_backend_active(cluster: &Cluster, pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = cluster
            .psql(
                "postgres",
                &format!("SELECT state FROM pg_stat_activity WHERE pid = {pid}"),
            )
            .unwrap();
        if state.trim() == "active" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} never started its statement"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A CancelRequest with `pid` and `secret`, as a driver sends it.
pub async fn send_cancel_request(addr: SocketAddr, pid: i32, secret: i32) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut packet = Vec::new();
    packet.extend_from_slice(&16i32.to_be_bytes());
    packet.extend_from_slice(&80_877_102i32.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&secret.to_be_bytes());
    stream.write_all(&packet).await.unwrap();
    let _ = read_to_close(&mut stream).await;
}

/// A loopback address with a free port.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((
        [127, 0, 0, 1],
        cutover_pgcluster::free_port().expect("a free port"),
    ))
}
