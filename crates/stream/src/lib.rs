//! Keeping the new database in step with the old one: the change stream
//! (logical replication with `pgoutput` from a slot cutover owns), the
//! applier that writes it to the secondary in commit order, and the initial
//! copy, consistent with the stream's start.
//!
//! Why the copy cannot lose or resurrect a row is written down in `copy`.

pub mod applier;
mod control_tls;
pub mod copy;
pub mod keys;
pub mod mirror;
pub mod pgoutput;
pub mod preconditions;
pub mod replication;
pub mod schema;
pub mod sqlite_source;
pub mod sqlite_target;
pub mod verify;

use cutover_config::SslMode;

pub use mirror::{
    carry_sequences, drop_slot, Mirror, MirrorSettings, MirrorStatus, Started, StreamPosition,
    StreamState, TableCopy,
};
pub use pgoutput::Lsn;
pub use verify::{repair, verify, verify_with_progress, StreamPoint, VerifyOptions, VerifyReport};

#[derive(Debug, Clone, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Precondition(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("{context}: {message} (SQLSTATE {code})")]
    Server {
        code: String,
        message: String,
        context: String,
    },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Control(String),
}

impl From<tokio_postgres::Error> for StreamError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => StreamError::Server {
                code: db.code().code().to_string(),
                message: db.message().to_string(),
                context: "control connection".to_string(),
            },
            None => StreamError::Lost(e.to_string()),
        }
    }
}

/// Session settings of every connection cutover reads or writes rows with
/// (the stream's walsender, copy, apply, verify): values then have one text
/// form on both databases whatever each server's defaults, so a date or an
/// interval means the same on both sides and row hashes compare. The same
/// settings PostgreSQL's own logical replication uses, plus UTC and hex.
pub const CANONICAL_OPTIONS: &str = "-c datestyle=ISO -c intervalstyle=postgres \
     -c extra_float_digits=3 -c timezone=UTC -c bytea_output=hex";

/// A tokio-postgres connection for control work (copy, introspection, apply).
pub async fn control_client(
    url: &cutover_config::BackendUrl,
    application_name: &str,
) -> Result<tokio_postgres::Client, StreamError> {
    let cutover_config::Target::Tcp { host, port } = &url.target else {
        return Err(StreamError::Connect(format!(
            "{} is a SQLite file, not a PostgreSQL server",
            url.address()
        )));
    };
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(*port)
        .user(&url.user)
        .dbname(&url.database)
        .application_name(application_name)
        .options(CANONICAL_OPTIONS)
        .connect_timeout(std::time::Duration::from_secs(10));
    if let Some(pw) = &url.password {
        config.password(pw);
    }
    let tls = cutover_backend::BackendTls::new(url).map_err(StreamError::Connect)?;
    config.ssl_mode(match url.tls.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        // tokio-postgres cannot retry over TLS as allow does; asking for TLS
        // first reaches the same servers.
        SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    // tokio-postgres keeps the reason (refused, timed out, which
    // certificate check) in the error's source, not in its text.
    let failed = |e: tokio_postgres::Error| {
        let mut text = format!("{}: {e}", url.address());
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            text.push_str(&format!(": {c}"));
            cause = c.source();
        }
        StreamError::Connect(text)
    };
    let client = match tls.client_config() {
        Some(connector) => {
            let (client, connection) = config
                .connect(control_tls::MakeRustls::new(connector, tls.clone()))
                .await
                .map_err(failed)?;
            tokio::spawn(connection);
            client
        }
        None => {
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(failed)?;
            tokio::spawn(connection);
            client
        }
    };
    Ok(client)
}
