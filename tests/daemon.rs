//! The `cutover` binary as operators run it: configuration errors, environment
//! overrides, the admin API, `cutover status`, JSON logs and SIGTERM.

mod support;

use cutover_pgcluster::{free_port, HostAuth};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_cutover");

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("cutover-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn serve_fails(config: &str, env: &[(&str, &str)]) -> (i32, String) {
    let path = write_config("bad.toml", config);
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn bad_configuration_exits_2_naming_the_key_and_reason() {
    let old = "[old]\nurl = \"postgres://u:p@127.0.0.1:5432/app\"\n";
    let cases = [
        (
            format!("{old}pool_sise = 3\n"),
            "unknown field `pool_sise`, expected one of `url`, `pool_size`, `database` for key `old`",
        ),
        (
            format!("[proxy]\nlisten = \"nowhere\"\n{old}"),
            "config key `proxy.listen`: \"nowhere\" is not an address like \"127.0.0.1:6432\"",
        ),
        (
            format!("[auth]\nmethod = \"kerberos\"\n{old}"),
            "config key `auth.method`: unknown method \"kerberos\"; use \"scram-sha-256\", \"md5\" or \"trust\"",
        ),
        (
            "[old]\nurl = \"postgres://x@h/d?sslmode=verify-full\"\n".to_string(),
            "config key `old.url`: sslmode=verify-full needs sslrootcert=/path/to/ca.pem",
        ),
        (
            "[old]\nurl = \"mysql://x@h/d\"\n".to_string(),
            "config key `old.url`: \"mysql://x@h/d\" must start with postgres:// or sqlite:",
        ),
        (
            format!("{old}[new]\nurl = \"postgres://u@h:99999/d\"\n"),
            "config key `new.url`: port \"99999\" is not a number from 1 to 65535",
        ),
        (
            format!("[auth]\nusers = [{{ name = \"app\" }}]\n{old}"),
            "config key `auth.users[0]`: user \"app\" has no password, which auth.method = \"scram-sha-256\" needs",
        ),
        (
            format!(
                "[proxy]\ntls_cert = \"/nonexistent.crt\"\ntls_key = \"/nonexistent.key\"\n{old}"
            ),
            "config key `proxy.tls_cert`: file /nonexistent.crt does not exist",
        ),
        (
            "[proxy]\nlisten = \"127.0.0.1:1\"\n".to_string(),
            "missing configuration field \"old\"",
        ),
        (
            "this is not toml".to_string(),
            "bad.toml: TOML parse error at line 1, column 6",
        ),
    ];
    for (text, expected) in cases {
        let (code, stderr) = serve_fails(&text, &[]);
        assert_eq!(code, 2, "{text}\n{stderr}");
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in: {stderr}"
        );
    }
    // Bad environment overrides are bad configuration too.
    for (var, value, expected) in [
        (
            "CUTOVER_PROXY__MAX_CLIENT_CONNECTIONS",
            "abc",
            "invalid type: string \"abc\", expected an integer for key `proxy.max_client_connections` in the environment",
        ),
        (
            "CUTOVER_PROXY__MAX_CLIENT_CONNECTIONS",
            "0",
            "config key `proxy.max_client_connections`: must be at least 1",
        ),
        ("CUTOVER_NOPE__X", "1", "unknown field `nope`, expected one of"),
    ] {
        let (code, stderr) = serve_fails(old, &[(var, value)]);
        assert_eq!(code, 2, "{var}={value}\n{stderr}");
        assert!(stderr.contains(expected), "expected {expected:?} in: {stderr}");
    }
    let out = Command::new(BIN)
        .args(["serve", "--config", "/does/not/exist.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("config: file /does/not/exist.toml does not exist"));
}

struct Daemon {
    child: Child,
    admin: String,
    port: u16,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_daemon(config: &str, env: &[(&str, String)]) -> Daemon {
    let port = free_port().unwrap();
    let admin_port = free_port().unwrap();
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nshutdown_timeout_ms = 1500\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{config}"
    );
    let path = write_config(&format!("serve-{port}.toml"), &text);
    let child = Command::new(BIN)
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&path)
        .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while cutover::cli_http::request(&admin, "GET", "/healthz", None, None).is_err() {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Daemon { child, admin, port }
}

fn users_section() -> String {
    format!("[auth]\nusers = [{{ name = \"{APP_USER}\", password = \"{APP_PASSWORD}\" }}]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_cli_admin_api_and_sigterm_behave_as_documented() {
    let cluster = cluster(HostAuth::ScramSha256);
    // The file points at a dead port; the environment override wins.
    let config = format!(
        "{}[old]\nurl = \"postgres://postgres:wrong@127.0.0.1:1/{DB}\"\npool_size = 7\n",
        users_section()
    );
    // A wrapper's own CUTOVER_* variable is not a setting.
    let mut daemon = spawn_daemon(
        &config,
        &[
            (
                "CUTOVER_OLD__URL",
                cluster.url(
                    cutover_pgcluster::SUPERUSER,
                    cutover_pgcluster::SUPERUSER_PASSWORD,
                    DB,
                ),
            ),
            ("CUTOVER_BIN", BIN.to_string()),
        ],
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], daemon.port));
    let client = connect(addr).await;
    client.simple_query("SELECT 1").await.unwrap();

    let get =
        |path: &str| cutover::cli_http::request(&daemon.admin, "GET", path, None, None).unwrap();
    assert_eq!(get("/readyz").status, 200);
    let status: serde_json::Value = serde_json::from_str(&get("/v1/status").body).unwrap();
    assert_eq!(status["phase"], "passthrough");
    assert_eq!(status["clients"], 1);
    assert_eq!(status["backends"][0]["name"], "old");
    assert_eq!(status["backends"][0]["role"], "primary");
    assert_eq!(
        status["backends"][0]["address"],
        format!("127.0.0.1:{}", cluster.port())
    );
    assert_eq!(status["backends"][0]["pool"]["size"], 7);
    assert_eq!(status["backends"][0]["pool"]["in_use"], 1);
    // After one client ran one simple query: the exact counts.
    let metrics = get("/metrics");
    for (name, value) in [
        ("cutover_client_connections", 1.0),
        ("cutover_client_connections_total", 1.0),
        (
            "cutover_queries_total{backend=\"old\",kind=\"simple\"}",
            1.0,
        ),
        ("cutover_query_duration_seconds_count{backend=\"old\"}", 1.0),
        (
            "cutover_pool_connections{backend=\"old\",state=\"in_use\"}",
            1.0,
        ),
        (
            "cutover_pool_connections{backend=\"old\",state=\"idle\"}",
            0.0,
        ),
        ("cutover_backend_up{backend=\"old\"}", 1.0),
        ("cutover_protocol_errors_total", 0.0),
    ] {
        let seen = metric(&metrics.body, name);
        assert!(
            seen == Some(value) || (value == 0.0 && seen.is_none()),
            "{name}: {seen:?}, expected {value}\n{}",
            metrics.body
        );
    }
    let received = metric(&metrics.body, "cutover_client_bytes_received_total").unwrap();
    let sent = metric(&metrics.body, "cutover_client_bytes_sent_total").unwrap();
    // "SELECT 1" is a 14-byte Query plus Terminate-free session; the reply
    // is at least RowDescription, DataRow, CommandComplete, ReadyForQuery.
    assert!(received >= 14.0 && sent >= 40.0, "{received} {sent}");
    let missing = get("/v2/nothing");
    assert_eq!(missing.status, 404);
    assert!(missing.body.contains("\"reason\""), "{}", missing.body);

    let human = Command::new(BIN)
        .args(["status", "--admin", &daemon.admin])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(human.status.success(), "{human:?}");
    assert!(text.contains("phase:   passthrough"), "{text}");
    assert!(text.contains("old      primary"), "{text}");
    assert!(text.contains("1/0/0 of 7"), "{text}");
    let json = Command::new(BIN)
        .args(["status", "--json", "--admin", &daemon.admin])
        .output()
        .unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(parsed["phase"], "passthrough");
    let down = Command::new(BIN)
        .args(["status", "--admin", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("is `cutover serve` running?"));

    // SIGTERM: stop accepting, give the idle session the shutdown timeout,
    // then close it with 57P01 and exit 0.
    let raw = RawClient::connect(addr, APP_USER, APP_PASSWORD, &[]).await;
    let sent = Instant::now();
    Command::new("kill")
        .args(["-TERM", &daemon.child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect_as(addr, APP_USER, APP_PASSWORD).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "new clients still accepted after SIGTERM"
        );
    }
    assert!(client
        .simple_query("SELECT 'still served while draining'")
        .await
        .is_ok());
    let exit = tokio::task::block_in_place(|| daemon.child.wait()).unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(
        sent.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        sent.elapsed()
    );
    // The idle session was closed with 57P01, said before the close.
    let mut raw = raw;
    let goodbye = raw.next().await.expect("an ErrorResponse before the close");
    assert_eq!(goodbye.tag, 'E');
    assert_eq!(error_fields(&goodbye.body).0, "57P01");
    assert!(client.simple_query("SELECT 1").await.is_err());

    // Logs are JSON lines.
    let stderr = daemon.child.stderr.take().unwrap();
    let lines: Vec<String> = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("cutover is serving")),
        "{lines:?}"
    );
    for line in &lines {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
}

#[test]
fn demo_starts_two_databases_and_serves_them() {
    let (port, admin_port) = (free_port().unwrap(), free_port().unwrap());
    let mut child = Command::new(BIN)
        .args(["demo", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--admin-listen")
        .arg(format!("127.0.0.1:{admin_port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .take_while(|l| !l.contains("Ctrl-C"))
        .collect();
    let text = lines.join("\n");
    // The walk it prints uses this binary, not a debug build through cargo.
    for step in [
        "status",
        "mirror start",
        "verify",
        "reads 50",
        "promote",
        "rollback",
    ] {
        assert!(
            text.contains(&format!(
                "{BIN} {step} --admin http://127.0.0.1:{admin_port}"
            )),
            "{step} missing from:\n{text}"
        );
    }
    assert!(!text.contains("cargo run"), "{text}");
    let out = Command::new("psql")
        .arg(format!("postgres://app:app@127.0.0.1:{port}/app"))
        .args(["-X", "-A", "-t", "-c", "SELECT count(*) FROM accounts"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1000",
        "{out:?}"
    );
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn demo_without_postgresql_binaries_exits_2_naming_the_fix() {
    let empty = std::env::temp_dir().join(format!("cutover-no-pg-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(BIN)
        .arg("demo")
        .env("CUTOVER_PG_BINDIR", &empty)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "cutover demo: CUTOVER_PG_BINDIR={} holds no initdb and pg_ctl",
            empty.display()
        )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_users_pools_strategy_and_log_level_and_refuses_the_rest() {
    let cluster = cluster(HostAuth::ScramSha256);
    cluster
        .psql(
            "postgres",
            "CREATE ROLE late LOGIN PASSWORD 'late-secret'; GRANT ALL ON DATABASE app TO late",
        )
        .unwrap();
    let (proxy_port, admin_port) = (free_port().unwrap(), free_port().unwrap());
    let base = on_ports(
        &config_text(&cluster, "scram-sha-256", "", "pool_size = 4"),
        proxy_port,
        admin_port,
    );
    let path = write_config("reload.toml", &base);
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let proxy: std::net::SocketAddr = format!("127.0.0.1:{proxy_port}").parse().unwrap();
    let daemon = support::spawn_daemon(&path, admin);
    let metrics = || {
        cutover::cli_http::request(&format!("http://{admin}"), "GET", "/metrics", None, None)
            .unwrap()
            .body
    };
    let hangup = |daemon: &support::Daemon| {
        let ok = Command::new("kill")
            .args(["-HUP", &daemon.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    let reloads = |outcome: &str| {
        metric(
            &metrics(),
            &format!("cutover_config_reloads_total{{outcome=\"{outcome}\"}}"),
        )
    };
    let wait_for = |outcome: &str, n: f64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while reloads(outcome) != Some(n) {
            assert!(
                Instant::now() < deadline,
                "no {outcome} reload: {}",
                metrics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert!(connect_as(proxy, APP_USER, APP_PASSWORD).await.is_ok());
    assert!(
        connect_as(proxy, "late", "late-secret").await.is_err(),
        "not a user yet"
    );

    // The users change (app goes, late comes), the pool shrinks, the dial
    // draws per session, the log level changes, and a listener setting that
    // needs a restart is refused.
    let changed =
        base.replace(
            &format!("{{ name = \"{APP_USER}\", password = \"{APP_PASSWORD}\" }}"),
            "{ name = \"late\", password = \"late-secret\" }",
        )
        .replace("pool_size = 4", "pool_size = 2")
        .replace(
            "shutdown_timeout_ms = 1000",
            "shutdown_timeout_ms = 1000\nmax_client_connections = 50",
        ) + "\n[routing]\nstrategy = \"session\"\n\n[log]\nlevel = \"debug\"\n";
    std::fs::write(&path, &changed).unwrap();
    hangup(&daemon);
    wait_for("partial", 1.0);
    let late = connect_as(proxy, "late", "late-secret")
        .await
        .expect("late logs in after the reload");
    assert_eq!(
        late.query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "late"
    );
    let Err(refused) = connect_as(proxy, APP_USER, APP_PASSWORD).await else {
        panic!("app is gone after the reload, yet logged in");
    };
    assert_eq!(sqlstate(&refused), "28P01", "{refused}");
    let status: serde_json::Value = serde_json::from_str(
        &cutover::cli_http::request(&format!("http://{admin}"), "GET", "/v1/status", None, None)
            .unwrap()
            .body,
    )
    .unwrap();
    assert_eq!(status["backends"][0]["pool"]["size"], 2, "{status}");

    // A file that does not load changes nothing.
    std::fs::write(&path, "this is not toml").unwrap();
    hangup(&daemon);
    wait_for("failed", 1.0);
    assert!(connect_as(proxy, "late", "late-secret").await.is_ok());
    assert_eq!(reloads("partial"), Some(1.0));
    drop(daemon);
}
