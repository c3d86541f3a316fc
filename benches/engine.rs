//! The SQLite engine's speed: pgbench's select-only (-S) and TPC-B-like
//! read-write workloads at 1 and 16 clients on the same data three ways,
//! in one run:
//! - SQLite through cutover (the engine behind the proxy),
//! - PostgreSQL through cutover (passthrough),
//! - SQLite in-process (rusqlite, the same statements; the limit),
//!
//! printed as ratios to PostgreSQL through cutover; and the per-statement
//! cost of translation, cold and with the cache warm.
//!
//! Run: `cargo bench --bench engine`. Tunables: BENCH_SECONDS (per run,
//! default 5), BENCH_SCALE (default 1).

use cutover_config::Config;
use cutover_pgcluster::{Cluster, ClusterOptions, HostAuth, SUPERUSER, SUPERUSER_PASSWORD};
use cutover_sqlite::rusqlite::{params, Connection};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;

use support::{pgbench, sqlite_pgbench, DB};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn server_config(old_url: &str) -> Config {
    Config::from_toml(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [auth]\nusers = [{{ name = \"{SUPERUSER}\", password = \"{SUPERUSER_PASSWORD}\" }}]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [old]\nurl = \"{old_url}\"\npool_size = 32\n"
    ))
    .expect("config")
}

fn tps(cluster: &Cluster, port: u16, select_only: bool, clients: u64, seconds: u64) -> f64 {
    let clients = clients.to_string();
    let seconds = seconds.to_string();
    let mut args = vec![
        "-n", "-c", &clients, "-j", "2", "-T", &seconds, "-M", "extended",
    ];
    if select_only {
        args.push("-S");
    }
    let out = pgbench(cluster, port, &args);
    out.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The same workloads on the file in-process: one connection per client,
/// prepared statements, writers behind SQLite's own lock.
fn in_process(path: &Path, scale: u64, select_only: bool, clients: u64, seconds: u64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (path, stop, done) = (path.to_path_buf(), stop.clone(), done.clone());
            std::thread::spawn(move || {
                let conn = Connection::open(&path).unwrap();
                conn.busy_timeout(Duration::from_secs(30)).unwrap();
                conn.execute_batch("PRAGMA synchronous = FULL").unwrap();
                let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ c;
                let mut next = |n: u64| -> i64 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % n + 1) as i64
                };
                while !stop.load(Ordering::Relaxed) {
                    let aid = next(scale * 100_000);
                    if select_only {
                        let mut s = conn
                            .prepare_cached("SELECT abalance FROM pgbench_accounts WHERE aid = ?1")
                            .unwrap();
                        let _: i64 = s.query_row([aid], |r| r.get(0)).unwrap();
                    } else {
                        let (tid, bid, delta) = (next(scale * 10), next(scale), next(10_000) - 5_000);
                        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                        conn.prepare_cached("UPDATE pgbench_accounts SET abalance = abalance + ?1 WHERE aid = ?2")
                            .unwrap()
                            .execute(params![delta, aid])
                            .unwrap();
                        let _: i64 = conn
                            .prepare_cached("SELECT abalance FROM pgbench_accounts WHERE aid = ?1")
                            .unwrap()
                            .query_row([aid], |r| r.get(0))
                            .unwrap();
                        conn.prepare_cached("UPDATE pgbench_tellers SET tbalance = tbalance + ?1 WHERE tid = ?2")
                            .unwrap()
                            .execute(params![delta, tid])
                            .unwrap();
                        conn.prepare_cached("UPDATE pgbench_branches SET bbalance = bbalance + ?1 WHERE bid = ?2")
                            .unwrap()
                            .execute(params![delta, bid])
                            .unwrap();
                        conn.prepare_cached("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (?1, ?2, ?3, ?4, CURRENT_TIMESTAMP)")
                            .unwrap()
                            .execute(params![tid, bid, aid, delta])
                            .unwrap();
                        conn.execute_batch("COMMIT").unwrap();
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let seconds = env_num("BENCH_SECONDS", 5);
    let scale = env_num("BENCH_SCALE", 1);
    let dir = std::env::temp_dir().join(format!("cutover-bench-engine-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file: PathBuf = dir.join(format!("{DB}.db"));
    sqlite_pgbench(&file, scale);
    let pg = Cluster::start(ClusterOptions {
        host_auth: HostAuth::ScramSha256,
        settings: vec!["max_connections = 100".to_string()],
        ..Default::default()
    })
    .expect("start PostgreSQL");
    pg.psql("postgres", &format!("CREATE DATABASE {DB}"))
        .unwrap();
    pgbench(&pg, pg.port(), &["-i", "-q", "-s", &scale.to_string()]);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (on_sqlite, on_pg) = runtime.block_on(async {
        let sqlite = cutover::Server::start(server_config(&format!("sqlite://{}", file.display())))
            .await
            .expect("cutover on SQLite");
        let postgres =
            cutover::Server::start(server_config(&pg.url(SUPERUSER, SUPERUSER_PASSWORD, DB)))
                .await
                .expect("cutover on PostgreSQL");
        (sqlite, postgres)
    });

    println!("engine: pgbench at scale {scale}, {seconds} s per run, -M extended");
    println!(
        "{:<12} {:>7} {:>14} {:>14} {:>14} {:>10} {:>10}",
        "workload", "clients", "sqlite+cutover", "pg+cutover", "sqlite alone", "vs pg", "vs alone"
    );
    for (name, select_only) in [("select-only", true), ("read-write", false)] {
        for clients in [1u64, 16] {
            let engine = tps(
                &pg,
                on_sqlite.proxy_addr.port(),
                select_only,
                clients,
                seconds,
            );
            let proxied = tps(&pg, on_pg.proxy_addr.port(), select_only, clients, seconds);
            let alone = in_process(&file, scale, select_only, clients, seconds);
            println!(
                "{name:<12} {clients:>7} {engine:>14.0} {proxied:>14.0} {alone:>14.0} {:>9.2}x {:>9.2}x",
                engine / proxied,
                engine / alone
            );
        }
    }

    // Translation: each of pgbench's statements, cold and cached.
    let map = cutover_sqlite::SchemaMap::read_file(&file, &[], 1).unwrap();
    let engine = cutover_engine::Engine::open(&file, DB, &[]).unwrap();
    let statements = [
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
        "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
    ];
    let rounds = 2_000u32;
    let started = Instant::now();
    for _ in 0..rounds {
        for s in statements {
            cutover_engine::translate::command(s, &map).unwrap();
        }
    }
    let cold = started.elapsed() / (rounds * statements.len() as u32);
    let rounds = 200_000u32;
    let started = Instant::now();
    for _ in 0..rounds {
        for s in statements {
            engine.translation(s).unwrap();
        }
    }
    let warm = started.elapsed() / (rounds * statements.len() as u32);
    println!("translation per statement: cold {cold:?}, cached {warm:?}");
    runtime.block_on(async {
        on_sqlite.shutdown().await;
        on_pg.shutdown().await;
    });
    let _ = std::fs::remove_dir_all(&dir);
}
