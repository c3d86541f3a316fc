//! Backend sessions: logging in to a PostgreSQL backend as a given user over
//! the raw protocol, pooling those sessions, forwarding cancel requests, and
//! probing a backend's health. The proxy forwards bytes over these sessions;
//! this crate never looks at query traffic.

pub mod connection;
pub mod pool;
pub mod scram;
pub mod stream;
pub mod tls;

pub use connection::{send_cancel, BackendConnection, ConnectError, LoginTarget};
pub use pool::{Checkout, OnReturn, Pool, PoolKey, PoolSettings, PoolSize, PoolStats};
pub use scram::ScramCache;
pub use stream::{BackendStream, Embedded, EmbeddedBackend};
pub use tls::BackendTls;

use cutover_config::BackendUrl;
use std::time::{Duration, Instant};

/// Logs in with the control-plane credentials from `url` and logs out again;
/// returns how long the login took.
pub async fn probe(
    backend: &str,
    url: &BackendUrl,
    embedded: Option<&EmbeddedBackend>,
    timeout: Duration,
    scram_cache: &ScramCache,
) -> Result<Duration, ConnectError> {
    let started = Instant::now();
    let address = url.address();
    let tls = BackendTls::new(url).map_err(|detail| ConnectError::Tls {
        backend: backend.to_string(),
        address: address.clone(),
        detail,
    })?;
    let target = LoginTarget {
        backend,
        address: &address,
        database: &url.database,
        user: &url.user,
        password: url.password.as_deref(),
        params: &[("application_name".to_string(), "cutover-health".to_string())],
        timeout,
        scram: scram_cache,
        tls: &tls,
        embedded,
    };
    let conn = BackendConnection::connect(&target).await?;
    let elapsed = started.elapsed();
    conn.terminate().await;
    Ok(elapsed)
}
