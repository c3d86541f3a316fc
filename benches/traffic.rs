//! Traffic-control benchmark: pgbench simple-update (-N) and select-only
//! (-S) directly, through cutover in passthrough, in mirroring with sync
//! and async commits, and at read dial 50 and 100, all in one run; then the
//! write pause of promote and rollback under pgbench load (p50/p99).
//!
//! Run: `cargo bench --bench traffic`. Tunables: BENCH_SECONDS (per pgbench
//! run, default 5), BENCH_CLIENTS (default 8), BENCH_SCALE (default 10),
//! BENCH_SWAPS (promote+rollback pairs, default 10).

use cutover::Server;
use cutover_config::Config;
use cutover_pgcluster::{Cluster, SUPERUSER, SUPERUSER_PASSWORD};
use std::time::Duration;

mod support;

use support::{pgbench, pgbench_command, pgbench_pair, wait_drained, DB};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Sample {
    tps: f64,
    latency_ms: f64,
}

fn run(cluster: &Cluster, port: u16, script: &str, clients: u64, seconds: u64) -> Sample {
    let c = clients.to_string();
    let t = seconds.to_string();
    let out = pgbench(
        cluster,
        port,
        &[script, "-n", "-c", &c, "-j", "2", "-T", &t, "-M", "simple"],
    );
    let field = |prefix: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Sample {
        tps: field("tps = "),
        latency_ms: field("latency average = "),
    }
}

fn call(server: &Server, method: &str, path: &str, body: &str) -> serde_json::Value {
    let r = cutover::cli_http::request(
        &format!("http://{}", server.admin_addr),
        method,
        path,
        Some(body),
        None,
    )
    .expect("admin request");
    let doc: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
    assert_eq!(r.status, 200, "{method} {path}: {doc}");
    doc
}

fn config(
    old: &Cluster,
    new: Option<&Cluster>,
    state_file: &std::path::Path,
    sync: bool,
) -> Config {
    let mut text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [auth]\nusers = [{{ name = \"{SUPERUSER}\", password = \"{SUPERUSER_PASSWORD}\" }}]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [old]\nurl = \"{}\"\n",
        old.url(SUPERUSER, SUPERUSER_PASSWORD, DB)
    );
    if let Some(new) = new {
        text.push_str(&format!(
            "[new]\nurl = \"{}\"\n[mirror]\nsync = {sync}\n[cutover]\nstate_file = \"{}\"\n",
            new.url(SUPERUSER, SUPERUSER_PASSWORD, DB),
            state_file.display()
        ));
    }
    Config::from_toml(&text).expect("config")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn bench() {
    let seconds = env_num("BENCH_SECONDS", 5);
    let clients = env_num("BENCH_CLIENTS", 8);
    let scale = env_num("BENCH_SCALE", 10);
    let swaps = env_num("BENCH_SWAPS", 10);
    let (old, new) = pgbench_pair(scale, 200);
    let dir = std::env::temp_dir().join(format!("cutover-bench-traffic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state_file = dir.join("state.json");

    let mut rows: Vec<(String, Sample, Sample)> = Vec::new();
    let measure = |port: u16| {
        (
            run(&old, port, "-N", clients, seconds),
            run(&old, port, "-S", clients, seconds),
        )
    };
    let (n, s) = measure(old.port());
    rows.push(("direct".into(), n, s));
    {
        let server = Server::start(config(&old, None, &state_file, true))
            .await
            .expect("cutover");
        let port = server.proxy_addr.port();
        let (n, s) = tokio::task::block_in_place(|| measure(port));
        rows.push(("cutover passthrough".into(), n, s));
        server.shutdown().await;
    }
    let server = Server::start(config(&old, Some(&new), &state_file, true))
        .await
        .expect("cutover");
    call(&server, "POST", "/v1/mirror/start", "{}");
    wait_drained(&server, &old).await;
    let port = server.proxy_addr.port();
    let (n, s) = tokio::task::block_in_place(|| measure(port));
    rows.push(("mirroring, sync commits".into(), n, s));
    for percent in [50, 100] {
        call(
            &server,
            "PUT",
            "/v1/reads",
            &format!("{{\"percent\": {percent}}}"),
        );
        let (n, s) = tokio::task::block_in_place(|| measure(port));
        rows.push((format!("dial {percent}, sync commits"), n, s));
    }
    call(&server, "PUT", "/v1/reads", "{\"percent\": 0}");
    server.shutdown().await;
    // The same migration resumed from the state file, with async commits.
    let server = Server::start(config(&old, Some(&new), &state_file, false))
        .await
        .expect("cutover");
    wait_drained(&server, &old).await;
    let port = server.proxy_addr.port();
    let (n, s) = tokio::task::block_in_place(|| measure(port));
    rows.push(("mirroring, async commits".into(), n, s));
    call(&server, "PUT", "/v1/reads", "{\"percent\": 100}");
    let (n, s) = tokio::task::block_in_place(|| measure(port));
    rows.push(("dial 100, async commits".into(), n, s));
    server.shutdown().await;

    println!(
        "\npgbench -M simple, {clients} clients, {seconds}s per run, scale {scale}; 2 cores shared by both databases, cutover and pgbench"
    );
    println!("| configuration | -N tps | -N latency ms | -N vs passthrough | -S tps | -S latency ms | -S vs passthrough |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let (base_n, base_s) = (rows[1].1.tps, rows[1].2.tps);
    for (name, n, s) in &rows {
        println!(
            "| {name} | {:.0} | {:.3} | {:.2} | {:.0} | {:.3} | {:.2} |",
            n.tps,
            n.latency_ms,
            n.tps / base_n,
            s.tps,
            s.latency_ms,
            s.tps / base_s
        );
    }

    // Promote and rollback while pgbench -N runs through cutover.
    let server = Server::start(config(&old, Some(&new), &state_file, true))
        .await
        .expect("cutover");
    wait_drained(&server, &old).await;
    let port = server.proxy_addr.port();
    let load_seconds = (swaps * 2 + 4).to_string();
    let c = clients.to_string();
    let load = pgbench_command(
        &old,
        port,
        &[
            "-N",
            "-n",
            "-c",
            &c,
            "-j",
            "2",
            "-T",
            &load_seconds,
            "-M",
            "simple",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("pgbench load");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut pauses = Vec::new();
    let mut aborted = 0;
    for _ in 0..swaps {
        for (path, body) in [("/v1/promote", "{\"force\": true}"), ("/v1/rollback", "{}")] {
            let r = cutover::cli_http::request(
                &format!("http://{}", server.admin_addr),
                "POST",
                path,
                Some(body),
                None,
            )
            .expect("admin request");
            let doc: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
            match doc["pause_ms"].as_f64() {
                Some(ms) if r.status == 200 => pauses.push(ms),
                _ => {
                    aborted += 1;
                    println!("{path}: {} {doc}", r.status);
                }
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    }
    let out = tokio::task::block_in_place(|| load.wait_with_output()).expect("pgbench load");
    let load_ok = out.status.success();
    pauses.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    println!(
        "\npromote/rollback under pgbench -N ({clients} clients): {} pauses, {aborted} aborted, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; pgbench {}",
        pauses.len(),
        percentile(&pauses, 0.5),
        percentile(&pauses, 0.99),
        pauses.last().copied().unwrap_or(0.0),
        if load_ok { "finished without errors".to_string() } else { format!("FAILED: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")) }
    );
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench());
}
