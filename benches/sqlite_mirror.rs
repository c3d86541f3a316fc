//! The live SQLite migration's costs, on pgbench's tables in a SQLite file
//! (scale 10: a million accounts) with pgbench's read-write script running
//! through cutover against the file:
//! - copy: `mirror start` until the stream runs, under the write load,
//!   against `cutover convert` of a quiet copy of the file and pgloader;
//! - apply: rows per second the stream applies at steady state, and its
//!   lag (changes behind the file);
//! - sync commits: read-write throughput with the stream and sync commits
//!   against the same with no mirroring (passthrough);
//! - promote and rollback pauses under load, p50 and p99.
//!
//! Run: `cargo bench --bench sqlite_mirror`. Tunables: BENCH_SCALE
//! (default 10), BENCH_SECONDS (per measurement, default 10), BENCH_SWAPS
//! (promote+rollback pairs, default 5).

use cutover_pgcluster::{Cluster, ClusterOptions, HostAuth, SUPERUSER, SUPERUSER_PASSWORD};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod support;

use support::{pgbench_command, sqlite_pgbench, DB};

const BIN: &str = env!("CARGO_BIN_EXE_cutover");
const TOKEN: &str = "bench";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cluster() -> Cluster {
    let c = Cluster::start(ClusterOptions {
        host_auth: HostAuth::ScramSha256,
        settings: vec!["max_connections = 100".to_string()],
        ..Default::default()
    })
    .expect("start PostgreSQL");
    c.psql("postgres", &format!("CREATE DATABASE {DB}"))
        .unwrap();
    c
}

fn config(file: &Path, new: Option<&Cluster>, sync: bool) -> String {
    let new = new
        .map(|n| {
            format!(
                "[new]\nurl = \"{}\"\n\n[mirror]\nsync = {sync}\ncopy_chunk_rows = 20000\n",
                n.url(SUPERUSER, SUPERUSER_PASSWORD, DB)
            )
        })
        .unwrap_or_default();
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [auth]\nusers = [{{ name = \"{SUPERUSER}\", password = \"{SUPERUSER_PASSWORD}\" }}]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\
         [old]\nurl = \"sqlite://{}\"\npool_size = 16\n{new}",
        file.display()
    )
}

fn admin(server: &cutover::Server, method: &str, path: &str, body: &str) -> serde_json::Value {
    let r = cutover::cli_http::request(
        &format!("http://{}", server.admin_addr),
        method,
        path,
        Some(body),
        Some(TOKEN),
    )
    .expect("admin API");
    serde_json::from_str(&r.body).unwrap_or_default()
}

fn status(server: &cutover::Server) -> serde_json::Value {
    let r = cutover::cli_http::request(
        &format!("http://{}", server.admin_addr),
        "GET",
        "/v1/status",
        None,
        None,
    )
    .expect("status");
    serde_json::from_str(&r.body).unwrap_or_default()
}

fn tps(out: &str) -> f64 {
    out.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let scale = env_num("BENCH_SCALE", 10);
    let seconds = env_num("BENCH_SECONDS", 10);
    let swaps = env_num("BENCH_SWAPS", 5);
    let dir = std::env::temp_dir().join(format!(
        "cutover-bench-sqlite-mirror-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{DB}.db"));
    sqlite_pgbench(&file, scale);
    let rows = scale * (100_000 + 11);
    let quiet = dir.join("quiet").join(format!("{DB}.db"));
    std::fs::create_dir_all(quiet.parent().unwrap()).unwrap();
    std::fs::copy(&file, &quiet).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "sqlite_mirror: pgbench tables at scale {scale} ({rows} rows), {seconds} s measurements"
    );

    // Offline convert and pgloader of the quiet copy.
    let offline = cluster();
    let config_path = dir.join("convert.toml");
    std::fs::write(&config_path, config(&quiet, Some(&offline), false)).unwrap();
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["convert", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let convert_secs = started.elapsed().as_secs_f64();
    let pgloader = Command::new("pgloader")
        .arg("--version")
        .output()
        .ok()
        .map(|_| {
            offline.psql("postgres", "CREATE DATABASE loaded").unwrap();
            let started = Instant::now();
            let out = Command::new("pgloader")
                .arg(format!("sqlite://{}", quiet.display()))
                .arg(offline.url(SUPERUSER, SUPERUSER_PASSWORD, "loaded"))
                .output()
                .unwrap();
            (started.elapsed().as_secs_f64(), out.status.success())
        });

    // The live migration under pgbench through cutover.
    let new = cluster();
    let server = runtime.block_on(async {
        cutover::Server::start(
            cutover_config::Config::from_toml(&config(&file, Some(&new), true)).unwrap(),
        )
        .await
        .expect("cutover on the file")
    });
    let port = server.proxy_addr.port();
    let load = |secs: u64| {
        pgbench_command(
            &new,
            port,
            &[
                "-n",
                "-c",
                "4",
                "-j",
                "2",
                "-T",
                &secs.to_string(),
                "-M",
                "extended",
            ],
        )
        .output()
        .expect("pgbench")
    };
    let loader = {
        let (new_bindir, port) = (new.bindir().to_path_buf(), port);
        let stop_after = seconds * 2 + 120;
        std::thread::spawn(move || {
            Command::new(new_bindir.join("pgbench"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
                .args([
                    "-n",
                    "-c",
                    "4",
                    "-j",
                    "2",
                    "-T",
                    &stop_after.to_string(),
                    "-M",
                    "extended",
                ])
                .arg(DB)
                .env("PGPASSWORD", SUPERUSER_PASSWORD)
                .output()
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    admin(&server, "POST", "/v1/mirror/start", "{}");
    while status(&server)["mirror"]["state"] != "streaming" {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "copy did not finish: {}",
            status(&server)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let live_secs = started.elapsed().as_secs_f64();

    // Steady state: applied rows per second and lag, sampled each second.
    let first = status(&server)["mirror"]["applied_rows"]
        .as_u64()
        .unwrap_or(0);
    let begun = Instant::now();
    let mut lags = Vec::new();
    for _ in 0..seconds {
        std::thread::sleep(Duration::from_secs(1));
        lags.push(status(&server)["mirror"]["lag_bytes"].as_u64().unwrap_or(0) as f64);
    }
    let applied = status(&server)["mirror"]["applied_rows"]
        .as_u64()
        .unwrap_or(0)
        - first;
    let apply_rate = applied as f64 / begun.elapsed().as_secs_f64();
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());

    // Promote and rollback under the load.
    let mut pauses = Vec::new();
    for _ in 0..swaps {
        for path in ["/v1/promote", "/v1/rollback"] {
            let body = admin(&server, "POST", path, "{\"force\": true}");
            if let Some(ms) = body["pause_ms"].as_f64() {
                pauses.push(ms);
            } else {
                println!("{path}: {body}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    pauses.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let _ = loader.join();

    // Sync commits against passthrough: read-write tps on the file.
    let mirrored_tps = tps(&String::from_utf8_lossy(&load(seconds).stdout));
    runtime.block_on(async { server.shutdown().await });
    let alone_file = dir.join("alone").join(format!("{DB}.db"));
    std::fs::create_dir_all(alone_file.parent().unwrap()).unwrap();
    std::fs::copy(&quiet, &alone_file).unwrap();
    let alone = runtime.block_on(async {
        cutover::Server::start(
            cutover_config::Config::from_toml(&config(&alone_file, None, false)).unwrap(),
        )
        .await
        .expect("cutover without mirroring")
    });
    let passthrough_tps = tps(&String::from_utf8_lossy(
        &pgbench_command(
            &new,
            alone.proxy_addr.port(),
            &[
                "-n",
                "-c",
                "4",
                "-j",
                "2",
                "-T",
                &seconds.to_string(),
                "-M",
                "extended",
            ],
        )
        .output()
        .unwrap()
        .stdout,
    ));
    runtime.block_on(async { alone.shutdown().await });

    println!("copy: live under load {live_secs:.2} s ({:.0} rows/s); offline convert {convert_secs:.2} s ({:.0} rows/s); live/convert {:.2}x",
        rows as f64 / live_secs, rows as f64 / convert_secs, convert_secs / live_secs);
    match pgloader {
        Some((secs, ok)) => println!(
            "pgloader: {secs:.2} s ({:.0} rows/s){}; convert/pgloader {:.2}x, live/pgloader {:.2}x",
            rows as f64 / secs,
            if ok { "" } else { " (reported errors)" },
            secs / convert_secs,
            secs / live_secs
        ),
        None => println!("pgloader: not installed; no ratio"),
    }
    println!(
        "apply at steady state: {apply_rate:.0} rows/s; lag p50 {:.0} p99 {:.0} changes",
        percentile(&lags, 0.5),
        percentile(&lags, 0.99)
    );
    println!("read-write through cutover on the file: mirrored with the stream {mirrored_tps:.0} tps (after promote/rollback cycles), passthrough {passthrough_tps:.0} tps, ratio {:.2}x", mirrored_tps / passthrough_tps.max(1.0));
    println!(
        "pauses ({} promotes and rollbacks): p50 {:.0} ms, p99 {:.0} ms",
        pauses.len(),
        percentile(&pauses, 0.5),
        percentile(&pauses, 0.99)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
