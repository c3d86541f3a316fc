//! The read-throughput cost of shadow reads: pgbench select-only (-S)
//! through cutover while it mirrors, with `routing.shadow_percent` at 0,
//! 1, 10 and 100 (changed by a configuration reload between runs, the
//! rounds interleaved), in one run; each as a ratio to 0 %, with the
//! shadow results counted.
//!
//! Run: `cargo bench --bench shadow`. Tunables: BENCH_SECONDS (per run,
//! default 5), BENCH_CLIENTS (default 8), BENCH_SCALE (default 10),
//! BENCH_ROUNDS (default 2).

use cutover::Server;
use cutover_config::Config;
use cutover_pgcluster::{Cluster, SUPERUSER, SUPERUSER_PASSWORD};

mod support;

use support::{pgbench, pgbench_pair, start_mirroring, DB};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(old: &Cluster, new: &Cluster, shadow_percent: u8) -> Config {
    Config::from_toml(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [auth]\nusers = [{{ name = \"{SUPERUSER}\", password = \"{SUPERUSER_PASSWORD}\" }}]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [old]\nurl = \"{}\"\n[new]\nurl = \"{}\"\n\
         [routing]\nshadow_percent = {shadow_percent}\nshadow_concurrency = 8\n",
        old.url(SUPERUSER, SUPERUSER_PASSWORD, DB),
        new.url(SUPERUSER, SUPERUSER_PASSWORD, DB)
    ))
    .expect("config")
}

fn tps(old: &Cluster, port: u16, clients: u64, seconds: u64) -> f64 {
    let out = pgbench(
        old,
        port,
        &[
            "-S",
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "-M",
            "simple",
        ],
    );
    out.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn shadow_counts(server: &Server) -> String {
    let r = cutover::cli_http::request(
        &format!("http://{}", server.admin_addr),
        "GET",
        "/metrics",
        None,
        None,
    )
    .expect("metrics");
    ["match", "mismatch", "error", "skipped"]
        .iter()
        .map(|result| {
            let series = format!("cutover_shadow_reads_total{{result=\"{result}\"}} ");
            let n = r
                .body
                .lines()
                .find_map(|l| l.strip_prefix(&series))
                .unwrap_or("0");
            format!("{result} {n}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let seconds = env_num("BENCH_SECONDS", 5);
    let clients = env_num("BENCH_CLIENTS", 8);
    let scale = env_num("BENCH_SCALE", 10);
    let rounds = env_num("BENCH_ROUNDS", 2);
    let (old, new) = pgbench_pair(scale, 100);
    let server = Server::start(config(&old, &new, 0)).await.expect("cutover");
    start_mirroring(&server, &old).await;
    let port = server.proxy_addr.port();
    let percents = [0u8, 1, 10, 100];
    let mut results = vec![Vec::new(); percents.len()];
    for _ in 0..rounds {
        for (i, p) in percents.iter().enumerate() {
            let restart = server.reload(&config(&old, &new, *p));
            assert!(restart.is_empty(), "{restart:?}");
            results[i].push(tps(&old, port, clients, seconds));
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let base = median(&results[0]);
    println!("select-only through cutover, {clients} clients, {seconds} s x {rounds} rounds, scale {scale}");
    println!("{:>14} {:>10} {:>10}", "shadow_percent", "tps", "vs 0 %");
    for (p, r) in percents.iter().zip(&results) {
        let t = median(r);
        println!("{p:>14} {t:>10.0} {:>10.2}", t / base);
    }
    println!(
        "shadow results over the whole run: {}",
        shadow_counts(&server)
    );
    server.shutdown().await;
}
