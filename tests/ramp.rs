//! The guarded ramp under read load through cutover: a healthy new walks
//! every stage; new failing reads mid-stage (a table revoked there) sets
//! the dial to 0 within a check interval, says why, and refuses a new ramp
//! until acknowledged; a ramp survives a restart of the daemon.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

const TOKEN: &str = "ramp-token";

/// Readers through cutover until dropped: reads done and errors seen.
struct Readers {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Readers {
    async fn start(addr: std::net::SocketAddr, n: usize) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..n {
            let client = connect_as(addr, APP_USER, APP_PASSWORD).await.unwrap();
            let (stop, reads, errors) = (stop.clone(), reads.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let mut id = i as i32;
                while !stop.load(Ordering::Relaxed) {
                    id = id % 500 + 1;
                    match client
                        .query_opt("SELECT name FROM items WHERE id = $1", &[&id])
                        .await
                    {
                        Ok(_) => reads.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        Readers {
            stop,
            reads,
            errors,
            tasks,
        }
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.reads.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

fn ramp_doc(status: &serde_json::Value) -> serde_json::Value {
    status["ramp"].clone()
}

/// Waits until the ramp's state is `state`; its document.
async fn ramp_reaches(
    status: impl Fn() -> serde_json::Value,
    state: &str,
    within: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let doc = status();
        if doc["ramp"]["state"] == state {
            return doc;
        }
        assert!(Instant::now() < deadline, "ramp never {state}: {doc}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_ramp_walks_every_stage_under_load() {
    let (old, new) = items_pair(500);
    let server = start_proxy_with(&mirror_config_text(&old, &new, TOKEN, "", "")).await;
    start_mirroring(&server, &old, Some(TOKEN)).await;
    let readers = Readers::start(server.proxy_addr, 4).await;

    let started = admin_ok(
        &server,
        "POST",
        "/v1/ramp",
        r#"{"stages": [10, 50, 100], "hold_seconds": 2, "max_error_rate_percent": 1, "max_p99_ratio": 20}"#,
        Some(TOKEN),
    );
    assert_eq!(started["state"], "running");
    // The ramp owns the dial while it runs.
    let (code, doc) = admin_call(
        &server,
        "PUT",
        "/v1/reads",
        r#"{"percent": 30}"#,
        Some(TOKEN),
    );
    assert_eq!(code, 409, "{doc}");
    assert!(doc["reason"].as_str().unwrap().contains("ramp"), "{doc}");
    let (code, _) = admin_call(
        &server,
        "POST",
        "/v1/ramp",
        r#"{"stages": [10], "hold_seconds": 2, "max_error_rate_percent": 1}"#,
        Some(TOKEN),
    );
    assert_eq!(code, 409, "one ramp at a time");

    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = status_doc(&server);
        let percent = status["read_percent"].as_u64().unwrap();
        if seen.last() != Some(&percent) {
            seen.push(percent);
        }
        if status["ramp"]["state"] == "completed" {
            break;
        }
        assert_eq!(status["ramp"]["state"], "running", "{status}");
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, [10, 50, 100]);
    let status = status_doc(&server);
    assert_eq!(status["read_percent"], 100);
    let figures = &ramp_doc(&status)["figures"];
    assert!(figures["reads"].as_u64().unwrap() > 50, "{figures}");
    assert_eq!(figures["errors"], 0, "{figures}");
    let (_, metrics) = admin_get(&server, "/metrics");
    assert_eq!(metric(&metrics, "cutover_ramp_running"), Some(0.0));
    assert_eq!(metric(&metrics, "cutover_ramp_rollbacks_total"), Some(0.0));
    assert!(metric(&metrics, "cutover_reads_total{backend=\"new\"}").unwrap() > 100.0);
    assert!(metrics.contains("cutover_read_duration_seconds_count{backend=\"new\"}"));
    let (reads, errors) = readers.finish().await;
    assert!(reads > 300, "{reads}");
    assert_eq!(errors, 0, "a healthy ramp costs clients nothing");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ramp_rolls_back_when_new_fails_reads_and_waits_to_be_told() {
    let (old, new) = items_pair(500);
    let server = start_proxy_with(&mirror_config_text(&old, &new, TOKEN, "", "")).await;
    start_mirroring(&server, &old, Some(TOKEN)).await;
    let readers = Readers::start(server.proxy_addr, 4).await;
    admin_ok(
        &server,
        "POST",
        "/v1/ramp",
        r#"{"stages": [50, 100], "hold_seconds": 20, "max_error_rate_percent": 1}"#,
        Some(TOKEN),
    );
    // Reads reach new at the first stage, then new loses the table's grant.
    let deadline = Instant::now() + Duration::from_secs(20);
    while ramp_doc(&status_doc(&server))["figures"]["reads"]
        .as_u64()
        .unwrap_or(0)
        < 50
    {
        assert!(Instant::now() < deadline, "no reads reached new");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    new.psql(DB, "REVOKE SELECT ON items FROM app").unwrap();
    let revoked = Instant::now();
    let status = ramp_reaches(
        || status_doc(&server),
        "rolled_back",
        Duration::from_secs(15),
    )
    .await;
    // Checks run every hold/10 = 2 s.
    assert!(
        revoked.elapsed() < Duration::from_secs(5),
        "{:?}",
        revoked.elapsed()
    );
    assert_eq!(status["read_percent"], 0);
    let reason = status["ramp"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("stage 1 of 2 (50%): error rate ") && reason.contains("over 1% ("),
        "{reason}"
    );
    let (_, metrics) = admin_get(&server, "/metrics");
    assert_eq!(metric(&metrics, "cutover_ramp_rollbacks_total"), Some(1.0));
    assert!(
        metric(
            &metrics,
            "cutover_secondary_read_errors_total{cause=\"secondary\"}"
        )
        .unwrap()
            >= 1.0
    );
    let line = {
        let (_, body) = admin_get(&server, "/v1/status");
        body
    };
    assert!(line.contains("rolled_back"));

    // Not again until told; told, it runs; abort leaves the dial where it is.
    let request = r#"{"stages": [20, 40], "hold_seconds": 60, "max_error_rate_percent": 1}"#;
    let (code, doc) = admin_call(&server, "POST", "/v1/ramp", request, Some(TOKEN));
    assert_eq!(code, 409, "{doc}");
    assert!(
        doc["reason"].as_str().unwrap().contains("acknowledge"),
        "{doc}"
    );
    new.psql(DB, "GRANT SELECT ON items TO app").unwrap();
    admin_ok(
        &server,
        "POST",
        "/v1/ramp",
        &request.replace('}', r#", "acknowledge": true}"#),
        Some(TOKEN),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_doc(&server)["read_percent"] != 20 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let aborted = admin_ok(&server, "POST", "/v1/ramp/abort", "", Some(TOKEN));
    assert_eq!(aborted["state"], "aborted", "{aborted}");
    assert_eq!(status_doc(&server)["read_percent"], 20);
    let (code, _) = admin_call(&server, "POST", "/v1/ramp/abort", "", Some(TOKEN));
    assert_eq!(code, 409, "nothing left to abort");
    admin_ok(
        &server,
        "PUT",
        "/v1/reads",
        r#"{"percent": 0}"#,
        Some(TOKEN),
    );
    let (_, errors) = readers.finish().await;
    assert!(errors > 0, "the revoked table failed reads on new");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ramp_survives_a_restart_of_cutover() {
    let (old, new) = items_pair(500);
    let dir = std::env::temp_dir().join(format!("cutover-ramp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state.json");
    let (proxy_port, admin_port) = (
        cutover_pgcluster::free_port().unwrap(),
        cutover_pgcluster::free_port().unwrap(),
    );
    let config = on_ports(
        &mirror_config_text(
            &old,
            &new,
            TOKEN,
            "",
            &format!("\n[cutover]\nstate_file = \"{}\"\n", state.display()),
        ),
        proxy_port,
        admin_port,
    );
    let path = dir.join("cutover.toml");
    std::fs::write(&path, config).unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let call = |method: &str, path: &str, body: &str| {
        let r = cutover::cli_http::request(
            &format!("http://{admin}"),
            method,
            path,
            Some(body),
            Some(TOKEN),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{method} {path}: {}", r.body);
        serde_json::from_str::<serde_json::Value>(&r.body).unwrap()
    };
    let status = || call("GET", "/v1/status", "");

    let daemon = spawn_daemon(&path, admin);
    call("POST", "/v1/mirror/start", "{}");
    drained_at(admin, &old).await;
    call(
        "POST",
        "/v1/ramp",
        r#"{"stages": [10, 20], "hold_seconds": 300, "max_error_rate_percent": 1}"#,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while status()["read_percent"] != 10 {
        assert!(Instant::now() < deadline, "{}", status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(daemon); // SIGKILL
    let daemon = spawn_daemon(&path, admin);
    let after = ramp_reaches(status, "running", Duration::from_secs(5)).await;
    assert_eq!(after["ramp"]["stage"], 0, "{after}");
    let left = after["ramp"]["remaining_seconds"].as_u64().unwrap();
    assert!(
        (250..300).contains(&left),
        "the stage keeps its start: {left}"
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    while status()["read_percent"] != 10 {
        assert!(Instant::now() < deadline, "{}", status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["status", "--admin"])
        .arg(format!("http://{admin}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ramp: stage 1 of 2 (10%), 4m"), "{text}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["ramp", "--abort", "--token", TOKEN, "--admin"])
        .arg(format!("http://{admin}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .starts_with("ramp: aborted: aborted by the operator at stage 1 of 2 (10%)"));
    drop(daemon);
}
