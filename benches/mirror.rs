//! Mirroring benchmark: initial copy throughput (rows/s, MB/s), verify
//! throughput (rows/s) on pgbench tables, and change-stream apply
//! throughput under pgbench simple-update load (applied tx/s against the
//! primary's tx/s, lag at steady state, time to drain).
//!
//! Run: `cargo bench --bench mirror`. Tunables: BENCH_SCALES (default "10";
//! e.g. "10,50"), BENCH_SECONDS (apply load duration, default 20),
//! BENCH_CLIENTS (pgbench clients for the apply load, default 8).

use cutover::Server;
use cutover_pgcluster::{Cluster, SUPERUSER, SUPERUSER_PASSWORD};
use std::process::Command;
use std::time::{Duration, Instant};

mod support;

use support::{
    lsn, pair_config, pgbench, pgbench_command, pgbench_pair, start_mirroring, status,
    wait_drained, DB,
};

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11..13)
        .map(|t| t.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    let per_second: f64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);
    ticks / per_second
}

/// The pid of the backend serving `application_name` on `cluster`.
fn backend_pid(cluster: &Cluster, application_name: &str) -> String {
    cluster
        .psql(
            "postgres",
            &format!(
                "SELECT pid FROM pg_stat_activity WHERE application_name = '{application_name}' LIMIT 1"
            ),
        )
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

async fn run_scale(scale: u32, seconds: u64, clients: u32) {
    let (old, new) = pgbench_pair(u64::from(scale), 100);
    let (rows, bytes): (u64, u64) = {
        let r = old
            .psql(
                DB,
                "SELECT sum(n_live_tup)::bigint || ' ' || sum(pg_relation_size(relid))::bigint FROM pg_stat_user_tables",
            )
            .unwrap();
        let mut it = r.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    let config = pair_config(&old, &new);
    let server = Server::start(config.clone()).await.expect("start cutover");

    // Copy.
    let copy_time = start_mirroring(&server, &old).await;

    // Verify.
    let old_client = cutover_stream::control_client(
        &cutover_config::BackendUrl::parse(&old.url(SUPERUSER, SUPERUSER_PASSWORD, DB)).unwrap(),
        "bench",
    )
    .await
    .unwrap();
    let new_client = cutover_stream::control_client(
        &cutover_config::BackendUrl::parse(&new.url(SUPERUSER, SUPERUSER_PASSWORD, DB)).unwrap(),
        "bench",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let report = cutover_stream::verify(
        &old_client,
        &new_client,
        &cutover_stream::VerifyOptions::default(),
    )
    .await
    .expect("verify");
    let verify_time = started.elapsed();
    assert!(report.clean, "{}", report.render());
    let verified: u64 = report.tables.iter().map(|t| t.rows_checked).sum();

    // Apply under load.
    let applied_before = status(&server)["mirror"]["applied_transactions"]
        .as_u64()
        .unwrap_or(0);
    let load = {
        let (seconds, clients) = (seconds.to_string(), clients.to_string());
        let mut command = pgbench_command(
            &old,
            old.port(),
            &["-n", "-N", "-T", &seconds, "-c", &clients, "-j", "2"],
        );
        std::thread::spawn(move || {
            let out = command.output().expect("pgbench load");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let load_started = Instant::now();
    let mut lags = Vec::new();
    while load_started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if load_started.elapsed() > Duration::from_secs(seconds / 4) {
            lags.push(status(&server)["mirror"]["lag_bytes"].as_u64().unwrap_or(0));
        }
    }
    let load_out = tokio::task::block_in_place(|| load.join().expect("load thread"));
    let primary_tps: f64 = load_out
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("tps = ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0.0);
    let drain = wait_drained(&server, &old).await;
    let applied = status(&server)["mirror"]["applied_transactions"]
        .as_u64()
        .unwrap_or(0)
        - applied_before;
    let applied_tps = applied as f64 / (load_started.elapsed().as_secs_f64());
    lags.sort_unstable();
    let median_lag = lags.get(lags.len() / 2).copied().unwrap_or(0);
    // Apply at full speed: build a backlog while cutover is down, then time
    // the catch-up after it restarts (it resumes by itself).
    server.shutdown().await;
    let backlog_seconds = (seconds / 2).max(5).to_string();
    pgbench(
        &old,
        old.port(),
        &[
            "-n",
            "-N",
            "-T",
            &backlog_seconds,
            "-c",
            &clients.to_string(),
            "-j",
            "2",
        ],
    );
    let backlog_bytes =
        lsn(&old.psql(DB, "SELECT pg_current_wal_lsn()").unwrap()).saturating_sub(lsn(&new
            .psql(DB, "SELECT lsn::text FROM cutover.applied")
            .unwrap()));
    let cutover_cpu_before = cpu_seconds("self");
    let server = Server::start(config).await.expect("restart cutover");
    let catch_up_started = Instant::now();
    while status(&server)["mirror"].is_null()
        && catch_up_started.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_drained(&server, &old).await;
    let catch_up = catch_up_started.elapsed();
    // CPU of the three processes of the pipeline over the catch-up: the
    // walsender decoding on old, cutover, the applier's backend on new
    // (both backends were started by the restart, so their lifetime CPU is
    // the catch-up's).
    let cutover_cpu = cpu_seconds("self") - cutover_cpu_before;
    let walsender_cpu = cpu_seconds(&backend_pid(&old, "cutover-stream"));
    let applier_cpu = cpu_seconds(&backend_pid(&new, "cutover-applier"));
    let m = status(&server)["mirror"].clone();
    let backlog_tx = m["applied_transactions"].as_u64().unwrap_or(0);
    let backlog_rows = m["applied_rows"].as_u64().unwrap_or(0);
    println!(
        "scale {scale:>3} | backlog catch-up: {backlog_tx} transactions / {backlog_rows} rows / {:.1} MB of WAL in {:.1}s = {:>6.0} tx/s, {:>7.0} rows/s",
        backlog_bytes as f64 / 1e6,
        catch_up.as_secs_f64(),
        backlog_tx as f64 / catch_up.as_secs_f64(),
        backlog_rows as f64 / catch_up.as_secs_f64()
    );
    println!(
        "scale {scale:>3} | catch-up CPU: walsender {walsender_cpu:.2}s, cutover {cutover_cpu:.2}s, new's applier backend {applier_cpu:.2}s \
         = {:>7.0} rows per cutover CPU-second, {:>7.0} rows per CPU-second of the whole pipeline",
        backlog_rows as f64 / cutover_cpu.max(0.01),
        backlog_rows as f64 / (walsender_cpu + cutover_cpu + applier_cpu).max(0.01)
    );
    let report = cutover_stream::verify(
        &old_client,
        &new_client,
        &cutover_stream::VerifyOptions::default(),
    )
    .await
    .expect("verify after load");
    assert!(report.clean, "{}", report.render());

    println!(
        "scale {scale:>3} | copy {rows:>9} rows in {:>6.1}s = {:>8.0} rows/s {:>6.1} MB/s | verify {verified:>9} rows in {:>5.1}s = {:>8.0} rows/s | apply: primary {:>6.0} tx/s, applied {:>6.0} tx/s over load+drain, median lag {:>8} bytes, drained {:>4.1}s after load",
        copy_time.as_secs_f64(),
        rows as f64 / copy_time.as_secs_f64(),
        bytes as f64 / 1e6 / copy_time.as_secs_f64(),
        verify_time.as_secs_f64(),
        verified as f64 / verify_time.as_secs_f64(),
        primary_tps,
        applied_tps,
        median_lag,
        drain.as_secs_f64()
    );
    server.shutdown().await;
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let scales: Vec<u32> = env_or("BENCH_SCALES", "10")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let seconds: u64 = env_or("BENCH_SECONDS", "20").parse().unwrap_or(20);
    let clients: u32 = env_or("BENCH_CLIENTS", "8").parse().unwrap_or(8);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("mirroring benchmark: copy and verify on pgbench tables, apply under pgbench -N ({clients} clients, {seconds}s); 2-core machine shared by both databases, cutover and pgbench");
    for scale in scales {
        runtime.block_on(run_scale(scale, seconds, clients));
    }
}
