//! What the mirroring and traffic benchmarks share: the status document of
//! an in-process cutover and waiting for its stream to drain.

#![allow(dead_code)]

use cutover::Server;
use cutover_pgcluster::Cluster;
use std::time::{Duration, Instant};

/// The database the benchmarks create on every cluster.
pub const DB: &str = "bench";

pub fn status(server: &Server) -> serde_json::Value {
    let r = cutover::cli_http::request(
        &format!("http://{}", server.admin_addr),
        "GET",
        "/v1/status",
        None,
        None,
    )
    .expect("status");
    serde_json::from_str(&r.body).expect("status JSON")
}

/// An LSN as PostgreSQL prints it; 0 for anything else.
pub fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.trim().split_once('/').unwrap_or(("0", "0"));
    (u64::from_str_radix(hi, 16).unwrap_or(0) << 32) | u64::from_str_radix(lo, 16).unwrap_or(0)
}

/// Waits until the stream holds everything `source` has written now;
/// returns how long that took.
pub async fn wait_drained(server: &Server, source: &Cluster) -> Duration {
    let started = Instant::now();
    let target = lsn(&source.psql(DB, "SELECT pg_current_wal_lsn()").unwrap());
    loop {
        let m = status(server)["mirror"].clone();
        if m["state"] == "streaming" && lsn(m["caught_up_lsn"].as_str().unwrap_or("0/0")) >= target
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "did not drain: {m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
