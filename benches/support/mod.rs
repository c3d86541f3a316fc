//! What the mirroring and traffic benchmarks share: an old and a new
//! cluster with pgbench tables, running pgbench, the status document of an
//! in-process cutover and waiting for its stream to drain.

#![allow(dead_code)]

use cutover::Server;
use cutover_pgcluster::{Cluster, ClusterOptions, HostAuth, SUPERUSER, SUPERUSER_PASSWORD};
use std::process::Command;
use std::time::{Duration, Instant};

/// The database the benchmarks create on every cluster.
pub const DB: &str = "bench";

/// pgbench against `DB` on `port` (the cluster itself, or cutover in front of it).
pub fn pgbench_command(cluster: &Cluster, port: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new(cluster.bindir().join("pgbench"));
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
        .args(args)
        .arg(DB)
        .env("PGPASSWORD", SUPERUSER_PASSWORD);
    cmd
}

/// Runs pgbench to the end; its standard output.
pub fn pgbench(cluster: &Cluster, port: u16, args: &[&str]) -> String {
    let out = pgbench_command(cluster, port, args)
        .output()
        .expect("run pgbench");
    assert!(
        out.status.success(),
        "pgbench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An old cluster with pgbench tables at `scale` and a new one with the
/// same, empty tables. pgbench_history gets a key on both: keyed tables are
/// copied in resumable chunks and applied by key (without one it would be
/// copied whole and matched by whole rows).
pub fn pgbench_pair(scale: u64, max_connections: u32) -> (Cluster, Cluster) {
    let start = || {
        Cluster::start(ClusterOptions {
            host_auth: HostAuth::ScramSha256,
            settings: vec![format!("max_connections = {max_connections}")],
            ..Default::default()
        })
        .expect("start PostgreSQL")
    };
    let (old, new) = (start(), start());
    for c in [&old, &new] {
        c.psql("postgres", &format!("CREATE DATABASE {DB}"))
            .unwrap();
    }
    pgbench(&old, old.port(), &["-i", "-q", "-s", &scale.to_string()]);
    pgbench(&new, new.port(), &["-i", "-q", "-s", "1", "-I", "dtp"]);
    for c in [&old, &new] {
        c.psql(
            DB,
            "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY",
        )
        .unwrap();
    }
    (old, new)
}

/// cutover on ephemeral ports in front of `old`, mirroring to `new`.
pub fn pair_config(old: &Cluster, new: &Cluster) -> cutover_config::Config {
    cutover_config::Config::from_toml(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [old]\nurl = \"{}\"\n[new]\nurl = \"{}\"\n",
        old.url(SUPERUSER, SUPERUSER_PASSWORD, DB),
        new.url(SUPERUSER, SUPERUSER_PASSWORD, DB)
    ))
    .expect("config")
}

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

/// Starts mirroring through the admin API and waits until the copy is
/// done and the stream holds everything `old` has written; how long that took.
pub async fn start_mirroring(server: &Server, old: &Cluster) -> Duration {
    let started = Instant::now();
    let r = cutover::cli_http::request(
        &format!("http://{}", server.admin_addr),
        "POST",
        "/v1/mirror/start",
        Some("{}"),
        None,
    )
    .expect("mirror start");
    assert_eq!(r.status, 200, "{}", r.body);
    wait_drained(server, old).await;
    started.elapsed()
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

/// pgbench's tables at `scale` in a SQLite file (WAL), as `pgbench -i`
/// fills them.
pub fn sqlite_pgbench(path: &std::path::Path, scale: u64) {
    let scale = scale as i64;
    let _ = std::fs::remove_file(path);
    let mut conn =
        cutover_sqlite::rusqlite::Connection::open(path).expect("create the SQLite file");
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.execute_batch(
        "CREATE TABLE pgbench_branches (bid INTEGER PRIMARY KEY, bbalance INTEGER NOT NULL, filler TEXT);
         CREATE TABLE pgbench_tellers (tid INTEGER PRIMARY KEY, bid INTEGER, tbalance INTEGER NOT NULL, filler TEXT);
         CREATE TABLE pgbench_accounts (aid INTEGER PRIMARY KEY, bid INTEGER, abalance INTEGER NOT NULL, filler TEXT);
         CREATE TABLE pgbench_history (id INTEGER PRIMARY KEY, tid INTEGER, bid INTEGER, aid INTEGER, delta INTEGER, mtime TIMESTAMP, filler TEXT);",
    )
    .unwrap();
    let tx = conn.transaction().unwrap();
    for b in 1..=scale {
        tx.execute(
            "INSERT INTO pgbench_branches VALUES (?1, 0, NULL)",
            cutover_sqlite::rusqlite::params![b],
        )
        .unwrap();
    }
    for t in 1..=scale * 10 {
        tx.execute(
            "INSERT INTO pgbench_tellers VALUES (?1, ?2, 0, NULL)",
            cutover_sqlite::rusqlite::params![t, (t - 1) / 10 + 1],
        )
        .unwrap();
    }
    {
        let filler = " ".repeat(84);
        let mut insert = tx
            .prepare("INSERT INTO pgbench_accounts VALUES (?1, ?2, 0, ?3)")
            .unwrap();
        for a in 1..=scale * 100_000 {
            insert
                .execute(cutover_sqlite::rusqlite::params![
                    a,
                    (a - 1) / 100_000 + 1,
                    filler
                ])
                .unwrap();
        }
    }
    tx.commit().unwrap();
}
