//! Passthrough benchmark: pgbench against PostgreSQL directly, through
//! PgBouncer (transaction pooling) and through cutover, interleaved round by
//! round in one run so all three see the same machine. Prints median TPS and
//! latency per configuration and the ratios.
//!
//! Run: `cargo bench --bench passthrough`. Tunables (environment):
//! BENCH_SECONDS (per pgbench run, default 5), BENCH_ROUNDS (default 3),
//! BENCH_SCALE (pgbench scale, default 10), BENCH_QUICK=1 (select-only and
//! simple-update at 16 and 1 clients with the simple protocol only).
//! PgBouncer is taken from PATH or /usr/sbin; install it with
//! `apt-get install -y pgbouncer` if it is missing.

use cutover_pgcluster::{
    free_port, Cluster, ClusterOptions, HostAuth, SUPERUSER, SUPERUSER_PASSWORD,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const USER: &str = "app";
const PASSWORD: &str = "app-bench";
const DB: &str = "app";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Target {
    name: &'static str,
    port: u16,
    /// Database name to ask for (PgBouncer uses an alias in session mode for -M prepared).
    db_for_prepared: &'static str,
}

struct Sample {
    tps: f64,
    latency_ms: f64,
}

fn pgbench(
    bindir: &Path,
    target: &Target,
    script: &str,
    protocol: &str,
    clients: u32,
    seconds: u64,
) -> Sample {
    let db = if protocol == "prepared" {
        target.db_for_prepared
    } else {
        DB
    };
    let mut cmd = Command::new(bindir.join("pgbench"));
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &target.port.to_string(),
        "-U",
        USER,
    ])
    .args(["-n", "-T", &seconds.to_string(), "-M", protocol])
    .args([
        "-c",
        &clients.to_string(),
        "-j",
        &clients.min(2).to_string(),
    ]);
    match script {
        "select-only" => cmd.arg("-S"),
        _ => cmd.arg("-N"),
    };
    let out = cmd
        .arg(db)
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let find = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "pgbench against {} gave no {prefix:?}:\n{text}\n{}",
                    target.name,
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    };
    Sample {
        tps: find("tps = "),
        latency_ms: find("latency average = "),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn find_pgbouncer() -> Option<PathBuf> {
    let candidates = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join("pgbouncer"))
        .collect::<Vec<_>>();
    candidates.into_iter().find(|p| p.is_file())
}

/// A child process, killed on drop; `pidfile` names the real server when the
/// child is only a `runuser` wrapper.
struct Guard(Child, Option<PathBuf>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(pid) = self
            .1
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
        {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn start_pgbouncer(dir: &Path, pg_port: u16, pool: u32) -> (Guard, u16) {
    let binary =
        find_pgbouncer().expect("pgbouncer not found; install it: apt-get install -y pgbouncer");
    let port = free_port().unwrap();
    std::fs::write(
        dir.join("userlist.txt"),
        format!("\"{USER}\" \"{PASSWORD}\"\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\n{DB} = host=127.0.0.1 port={pg_port} dbname={DB}\n\
             {DB}_session = host=127.0.0.1 port={pg_port} dbname={DB} pool_mode=session\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {}\npool_mode = transaction\n\
             max_client_conn = 500\ndefault_pool_size = {pool}\nlogfile = {}\npidfile = {}\n",
            dir.join("userlist.txt").display(),
            dir.join("pgbouncer.log").display(),
            dir.join("pgbouncer.pid").display()
        ),
    )
    .unwrap();
    let mut cmd = if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(binary);
        c
    } else {
        Command::new(binary)
    };
    let child = cmd
        .arg(dir.join("pgbouncer.ini"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgbouncer");
    wait_for_port(port);
    (Guard(child, Some(dir.join("pgbouncer.pid"))), port)
}

fn start_cutover(dir: &Path, cluster: &Cluster, pool: u32) -> (Guard, u16) {
    let port = free_port().unwrap();
    let admin = free_port().unwrap();
    let config = dir.join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [auth]\nmethod = \"scram-sha-256\"\nusers = [{{ name = \"{USER}\", password = \"{PASSWORD}\" }}]\n\
             [old]\nurl = \"{}\"\npool_size = {pool}\n",
            cluster.url(SUPERUSER, SUPERUSER_PASSWORD, DB)
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .envs(
            std::env::var("BENCH_CUTOVER_THREADS")
                .ok()
                .map(|n| ("CUTOVER_PROXY__WORKER_THREADS", n)),
        )
        .stdout(Stdio::null())
        .spawn()
        .expect("start cutover");
    wait_for_port(port);
    (Guard(child, None), port)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds = env_num("BENCH_SECONDS", 5);
    let rounds = env_num("BENCH_ROUNDS", 3) as usize;
    let scale = env_num("BENCH_SCALE", 10);
    let quick = std::env::var("BENCH_QUICK").is_ok();
    let pool = 20;

    let cluster = Cluster::start(ClusterOptions {
        host_auth: HostAuth::ScramSha256,
        settings: vec!["max_connections = 200".to_string()],
        ..Default::default()
    })
    .expect("start PostgreSQL");
    cluster
        .psql(
            "postgres",
            &format!("CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'"),
        )
        .unwrap();
    cluster
        .psql("postgres", &format!("CREATE DATABASE {DB} OWNER {USER}"))
        .unwrap();
    let init = Command::new(cluster.bindir().join("pgbench"))
        .args([
            "-i",
            "-q",
            "-s",
            &scale.to_string(),
            "-h",
            "127.0.0.1",
            "-p",
            &cluster.port().to_string(),
            "-U",
            USER,
            DB,
        ])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

    let dir = std::env::temp_dir().join(format!("cutover-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    if running_as_root() {
        let _ = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(&dir)
            .status();
    }
    let (bouncer, bouncer_port) = start_pgbouncer(&dir, cluster.port(), pool);
    let (cutover, cutover_port) = start_cutover(&dir, &cluster, pool);
    let targets = [
        Target {
            name: "direct",
            port: cluster.port(),
            db_for_prepared: DB,
        },
        Target {
            name: "pgbouncer",
            port: bouncer_port,
            db_for_prepared: "app_session",
        },
        Target {
            name: "cutover",
            port: cutover_port,
            db_for_prepared: DB,
        },
    ];

    let protocols: &[&str] = if quick {
        &["simple"]
    } else {
        &["simple", "extended", "prepared"]
    };
    println!(
        "pgbench scale {scale}, {seconds}s per run, median of {rounds} interleaved rounds; PgBouncer pool_mode=transaction (session for -M prepared), pool {pool}"
    );
    println!(
        "{:<14} {:<9} {:>3} | {:>10} {:>10} {:>10} | {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>9} {:>9}",
        "script",
        "protocol",
        "c",
        "direct",
        "pgbouncer",
        "cutover",
        "cut/dir",
        "cut/pgb",
        "lat dir",
        "lat pgb",
        "lat cut",
        "+lat pgb",
        "+lat cut"
    );
    for script in ["select-only", "simple-update"] {
        for protocol in protocols {
            for clients in [16u32, 1] {
                let mut tps = vec![Vec::new(), Vec::new(), Vec::new()];
                let mut lat = vec![Vec::new(), Vec::new(), Vec::new()];
                for _ in 0..rounds {
                    for (i, t) in targets.iter().enumerate() {
                        let s = pgbench(cluster.bindir(), t, script, protocol, clients, seconds);
                        tps[i].push(s.tps);
                        lat[i].push(s.latency_ms);
                    }
                }
                let t: Vec<f64> = tps.into_iter().map(median).collect();
                let l: Vec<f64> = lat.into_iter().map(median).collect();
                println!(
                    "{:<14} {:<9} {:>3} | {:>10.0} {:>10.0} {:>10.0} | {:>8.2} {:>8.2} | {:>8.3} {:>8.3} {:>8.3} | {:>9.3} {:>9.3}",
                    script, protocol, clients, t[0], t[1], t[2], t[2] / t[0], t[2] / t[1], l[0], l[1], l[2], l[1] - l[0], l[2] - l[0]
                );
            }
        }
    }
    println!("latencies in ms (pgbench 'latency average'); +lat = added over direct");
    // The servers go first: PgBouncer is found through its pidfile in `dir`.
    drop((bouncer, cutover));
    let _ = std::fs::remove_dir_all(&dir);
}
