//! Verify under load: the daemon's verify (each chunk compared at a point
//! of the stream, differing keys re-checked under row locks) idle and
//! while pgbench simple-update writes to the primary, and what it costs the
//! writers: their tx/s and p50/p99 latency with and without verify running,
//! measured in the same run; then the standalone verify (no stream, no
//! locks, re-checks after a delay) under the same load, with the rows it
//! reported different that were only in flight.
//!
//! Run: `cargo bench --bench verify`. Tunables: BENCH_SCALE (default 10),
//! BENCH_SECONDS (each load window, default 15), BENCH_CLIENTS (default 8),
//! BENCH_CHUNK_ROWS (verify chunk, default 10000).

use cutover::Server;
use cutover_pgcluster::{Cluster, SUPERUSER, SUPERUSER_PASSWORD};
use std::time::{Duration, Instant};

mod support;

use support::{pair_config, pgbench_command, pgbench_pair, start_mirroring, status, DB};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// One daemon verify: (rows checked, seconds, verdict).
async fn daemon_verify(server: &Server, chunk_rows: u32) -> (u64, f64, String) {
    let started = Instant::now();
    let r = cutover::cli_http::request(
        &format!("http://{}", server.admin_addr),
        "POST",
        "/v1/verify",
        Some(&format!(r#"{{"chunk_rows": {chunk_rows}}}"#)),
        None,
    )
    .expect("verify");
    assert_eq!(r.status, 200, "{}", r.body);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let v = status(server)["verify"].clone();
        if v["state"] != "running" {
            return (
                v["rows_checked"].as_u64().unwrap_or(0),
                started.elapsed().as_secs_f64(),
                v["state"].as_str().unwrap_or("?").to_string(),
            );
        }
    }
}

/// pgbench -N with per-transaction logging for `seconds`; returns
/// (tx/s, p50 ms, p99 ms).
fn writers(old: &Cluster, seconds: u64, clients: u32) -> (f64, f64, f64) {
    let dir = std::env::temp_dir().join(format!("cutover-bench-verify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let prefix = dir.join("tx");
    let out = pgbench_command(
        old,
        old.port(),
        &[
            "-n",
            "-N",
            "-T",
            &seconds.to_string(),
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-l",
            "--log-prefix",
            prefix.to_str().unwrap(),
        ],
    )
    .current_dir(&dir)
    .output()
    .expect("pgbench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut latencies: Vec<f64> = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        // client_id transaction_no time script_no time_epoch time_us
        latencies.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok())
                .map(|us| us / 1000.0),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    latencies.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize];
    (latencies.len() as f64 / seconds as f64, at(0.5), at(0.99))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let scale: u64 = env_or("BENCH_SCALE", "10").parse().unwrap();
    let seconds: u64 = env_or("BENCH_SECONDS", "15").parse().unwrap();
    let clients: u32 = env_or("BENCH_CLIENTS", "8").parse().unwrap();
    let chunk_rows: u32 = env_or("BENCH_CHUNK_ROWS", "10000").parse().unwrap();
    let (old, new) = pgbench_pair(scale, 100);
    let config = pair_config(&old, &new);
    let server = Server::start(config).await.expect("start cutover");
    start_mirroring(&server, &old).await;

    let (idle_rows, idle_secs, verdict) = daemon_verify(&server, chunk_rows).await;
    assert_eq!(verdict, "clean");
    let (base_tps, base_p50, base_p99) = {
        let old = &old;
        tokio::task::block_in_place(|| writers(old, seconds, clients))
    };

    // Writers again, with verify running over and over meanwhile.
    let ((load_tps, load_p50, load_p99), rows, secs, runs) = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let load = scope.spawn(|| writers(&old, seconds, clients));
            let runtime = tokio::runtime::Handle::current();
            let (rows, secs, runs) = runtime.block_on(async {
                let window = Instant::now();
                let (mut rows, mut secs, mut runs) = (0u64, 0.0f64, 0u32);
                while window.elapsed() < Duration::from_secs(seconds.saturating_sub(1)) {
                    let (r, s, verdict) = daemon_verify(&server, chunk_rows).await;
                    assert_eq!(verdict, "clean", "verify under load reported differences");
                    rows += r;
                    secs += s;
                    runs += 1;
                }
                (rows, secs, runs)
            });
            (load.join().expect("writers"), rows, secs, runs)
        })
    });

    // The same with the standalone verify (no locks, no stream position:
    // differing chunks re-checked after a delay) for comparison.
    let urls = (
        cutover_config::BackendUrl::parse(&old.url(SUPERUSER, SUPERUSER_PASSWORD, DB)).unwrap(),
        cutover_config::BackendUrl::parse(&new.url(SUPERUSER, SUPERUSER_PASSWORD, DB)).unwrap(),
    );
    let old_client = cutover_stream::control_client(&urls.0, "bench")
        .await
        .unwrap();
    let new_client = cutover_stream::control_client(&urls.1, "bench")
        .await
        .unwrap();
    let options = cutover_stream::VerifyOptions {
        chunk_rows: i64::from(chunk_rows),
        ..Default::default()
    };
    let ((alone_tps, alone_p50, alone_p99), alone_rows, alone_secs, alone_runs, false_differences) =
        tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                let load = scope.spawn(|| writers(&old, seconds, clients));
                let runtime = tokio::runtime::Handle::current();
                let measured = runtime.block_on(async {
                    let window = Instant::now();
                    let (mut rows, mut secs, mut runs, mut differences) =
                        (0u64, 0.0f64, 0u32, 0usize);
                    while window.elapsed() < Duration::from_secs(seconds.saturating_sub(1)) {
                        let started = Instant::now();
                        let report = cutover_stream::verify(&old_client, &new_client, &options)
                            .await
                            .expect("standalone verify");
                        secs += started.elapsed().as_secs_f64();
                        rows += report.tables.iter().map(|t| t.rows_checked).sum::<u64>();
                        differences += report
                            .tables
                            .iter()
                            .map(|t| t.differences.len())
                            .sum::<usize>();
                        runs += 1;
                    }
                    (rows, secs, runs, differences)
                });
                (
                    load.join().expect("writers"),
                    measured.0,
                    measured.1,
                    measured.2,
                    measured.3,
                )
            })
        });

    println!("verify under load (scale {scale}, {clients} pgbench -N clients, chunk {chunk_rows} rows, 2 cores shared)");
    println!("| measure | idle | under load | ratio |");
    println!("|---|---:|---:|---:|");
    let idle_rate = idle_rows as f64 / idle_secs;
    let load_rate = rows as f64 / secs.max(f64::EPSILON);
    println!(
        "| verify rows/s | {idle_rate:.0} | {load_rate:.0} ({runs} clean runs) | {:.2} |",
        load_rate / idle_rate
    );
    println!(
        "| writers tx/s | {base_tps:.0} | {load_tps:.0} | {:.2} |",
        load_tps / base_tps
    );
    println!(
        "| writers p50 ms | {base_p50:.2} | {load_p50:.2} | {:.2} |",
        load_p50 / base_p50
    );
    println!(
        "| writers p99 ms | {base_p99:.2} | {load_p99:.2} | {:.2} |",
        load_p99 / base_p99
    );
    println!();
    println!("standalone verify (no locks, re-checks after a delay) under the same load:");
    println!(
        "| verify rows/s {:.0} ({alone_runs} runs, {false_differences} rows reported different that were only in flight) | writers tx/s {alone_tps:.0} ({:.2}) | p50 {alone_p50:.2} ms ({:.2}) | p99 {alone_p99:.2} ms ({:.2}) |",
        alone_rows as f64 / alone_secs.max(f64::EPSILON),
        alone_tps / base_tps,
        alone_p50 / base_p50,
        alone_p99 / base_p99
    );
    server.shutdown().await;
}
