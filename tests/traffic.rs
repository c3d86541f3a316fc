//! Traffic control: the read dial, commit waits, promote, rollback and
//! finalize, driven through the admin API under continuous load, with old
//! and new compared row by row after every step.

mod support;

use cutover_pgcluster::{Cluster, HostAuth, SUPERUSER, SUPERUSER_PASSWORD};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

const SCHEMA: &str = r#"
CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL, note text);
CREATE TABLE events (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), account int, amount float8, at timestamptz DEFAULT now());
CREATE TABLE log (id bigserial PRIMARY KEY, v text);
CREATE FUNCTION sneaky_insert(v text) RETURNS int LANGUAGE sql AS $$ INSERT INTO log (v) VALUES (v) RETURNING 1 $$;
CREATE SEQUENCE counter;
GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app;
"#;

const TABLES: &[&str] = &[
    "accounts",
    "events",
    "log",
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
];
const TOKEN: &str = "s3cret";

struct Pair {
    old: Cluster,
    new: Cluster,
    state_file: std::path::PathBuf,
    _dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn pair() -> Pair {
    let old = cluster(HostAuth::ScramSha256);
    let new = cluster(HostAuth::ScramSha256);
    old.psql(DB, SCHEMA).unwrap();
    new.psql(DB, SCHEMA).unwrap();
    for (c, steps) in [(&old, "dtgp"), (&new, "dtp")] {
        let out = std::process::Command::new(c.bindir().join("pgbench"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &c.port().to_string(),
                "-U",
                SUPERUSER,
            ])
            .args(["-i", "-q", "-s", "1", "-I", steps, DB])
            .env("PGPASSWORD", SUPERUSER_PASSWORD)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // As pgbench makes it: no primary key. Mirrored by whole rows.
        c.psql(DB, "ALTER TABLE pgbench_history REPLICA IDENTITY FULL")
            .unwrap();
    }
    old.psql(
        DB,
        "INSERT INTO accounts SELECT g, 0, 'seed' FROM generate_series(1, 200) g",
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!(
        "cutover-traffic-{}-{}",
        std::process::id(),
        old.port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    Pair {
        state_file: dir.join("state.json"),
        _dir: tempdir::Dir(dir),
        old,
        new,
    }
}

fn config(p: &Pair, extra: &str) -> String {
    mirror_config_text(
        &p.old,
        &p.new,
        TOKEN,
        "pool_size = 40",
        &format!(
            "pool_size = 40\n\n[cutover]\nstate_file = \"{}\"\nmax_pause_ms = 8000\n{extra}",
            p.state_file.display()
        ),
    )
}

fn call(
    server: &cutover::Server,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    admin_call(server, method, path, body, token)
}

fn ok(server: &cutover::Server, method: &str, path: &str, body: &str) -> serde_json::Value {
    admin_ok(server, method, path, body, Some(TOKEN))
}

fn status(server: &cutover::Server) -> serde_json::Value {
    status_doc(server)
}

fn assert_identical(p: &Pair, step: &str) {
    for table in TABLES {
        let key = match *table {
            "pgbench_accounts" => "aid",
            "pgbench_branches" => "bid",
            "pgbench_tellers" => "tid",
            "pgbench_history" => "t::text",
            _ => "id",
        };
        let sql = format!("SELECT t::text FROM {table} t ORDER BY {key}");
        let (old, new) = (p.old.psql(DB, &sql).unwrap(), p.new.psql(DB, &sql).unwrap());
        assert!(
            old == new,
            "after {step}: {table} differs ({} rows on old, {} on new)",
            old.lines().count(),
            new.lines().count()
        );
    }
}

/// Clients writing and immediately reading their own writes through cutover
/// until stopped; returns (transactions, errors seen).
fn load(
    proxy: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    stale: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<(u64, Vec<String>)>> {
    (0..4i32)
        .map(|worker| {
            let stop = stop.clone();
            let stale = stale.clone();
            tokio::spawn(async move {
                let client = connect(proxy).await;
                let (mut n, mut errors) = (0u64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let id = 1 + worker * 50 + (n as i32 % 50);
                    let note = format!("w{worker}-{n}");
                    let shared_row = 1 + (n as i32 % 5);
                    let result: Result<(), tokio_postgres::Error> = async {
                        // Rows every worker updates at once.
                        client
                            .execute(
                                "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                                &[&shared_row],
                            )
                            .await?;
                        client
                            .execute(
                                "UPDATE accounts SET balance = balance + 1, note = $2 WHERE id = $1",
                                &[&id, &note],
                            )
                            .await?;
                        client
                            .execute("INSERT INTO events (account, amount) VALUES ($1, random())", &[&id])
                            .await?;
                        // A serial key: breaks after a swap unless sequences moved too.
                        client
                            .execute("INSERT INTO log (v) VALUES ($1)", &[&note])
                            .await?;
                        // Read-your-writes: wherever the dial sends it.
                        let seen: String = client
                            .query_one("SELECT note FROM accounts WHERE id = $1", &[&id])
                            .await?
                            .get(0);
                        if seen != note {
                            stale.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(())
                    }
                    .await;
                    match result {
                        Ok(()) => n += 1,
                        Err(e) => errors.push(error_text(&e)),
                    }
                }
                (n, errors)
            })
        })
        .collect()
}

/// pgbench's simple-update script through cutover for `seconds`, as the
/// superuser; panics if any pgbench client failed.
fn pgbench(p: &Pair, proxy: std::net::SocketAddr, seconds: u32) -> tokio::task::JoinHandle<()> {
    let bin = p.old.bindir().join("pgbench");
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(bin)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &proxy.port().to_string(),
                "-U",
                SUPERUSER,
            ])
            .args(["-N", "-n", "-c", "4", "-T", &seconds.to_string(), DB])
            .env("PGPASSWORD", SUPERUSER_PASSWORD)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pgbench through cutover failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
}

async fn wait_verify_clean(server: &cutover::Server) {
    ok(server, "POST", "/v1/verify", "{}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = status(server)["verify"].clone();
        match v["state"].as_str() {
            Some("clean") => return,
            Some("running") => {}
            _ => panic!("verify not clean: {v}"),
        }
        assert!(Instant::now() < deadline, "verify did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_migration_under_load_keeps_both_sides_identical_and_loses_nothing() {
    let p = pair();
    let text = config(&p, "");
    let mut server = start_proxy_with(&text).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    assert_identical(&p, "mirror start");

    let stop = Arc::new(AtomicBool::new(false));
    let stale = Arc::new(AtomicU64::new(0));
    let mut workers = load(server.proxy_addr, stop.clone(), stale.clone());
    let bench = pgbench(&p, server.proxy_addr, 3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_verify_clean(&server).await;

    for percent in [10, 50, 100] {
        let doc = ok(
            &server,
            "PUT",
            "/v1/reads",
            &format!(r#"{{"percent": {percent}}}"#),
        );
        assert_eq!(doc["phase"], "shifting");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let m = server_metrics(&server);
    assert!(
        metric(&m, "cutover_reads_total{backend=\"new\"}").unwrap_or(0.0) > 0.0,
        "no read reached new:\n{m}"
    );

    // Restart in `shifting`: same phase and dial.
    bench.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut total = finish(&mut workers).await;
    server.shutdown().await;
    server = start_proxy_with(&text).await;
    let s = status(&server);
    assert_eq!(
        (s["phase"].as_str(), s["read_percent"].as_u64()),
        (Some("shifting"), Some(100))
    );
    drained(&server, &p.old).await;
    assert_identical(&p, "restart while shifting");
    wait_verify_clean(&server).await;

    stop.store(false, Ordering::Relaxed);
    workers = load(server.proxy_addr, stop.clone(), stale.clone());
    let bench = pgbench(&p, server.proxy_addr, 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let promoted = ok(&server, "POST", "/v1/promote", "{}");
    assert_eq!(
        (promoted["phase"].as_str(), promoted["primary"].as_str()),
        (Some("promoted"), Some("new"))
    );
    // The target is a pause under a second; max_pause_ms (8 s) is only
    // the abort threshold, so this bound can be crossed.
    assert!(
        promoted["pause_ms"].as_f64().unwrap() < 1000.0,
        "{promoted}"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Writes now land on new first and reach old through the reverse stream.
    bench.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    total += finish(&mut workers).await;
    drained(&server, &p.new).await;
    assert_identical(&p, "promote");
    assert_eq!(status(&server)["mirror"]["from"], "new");

    // Restart in `promoted`.
    server.shutdown().await;
    server = start_proxy_with(&text).await;
    let s = status(&server);
    assert_eq!(
        (s["phase"].as_str(), s["primary"].as_str()),
        (Some("promoted"), Some("new"))
    );

    stop.store(false, Ordering::Relaxed);
    workers = load(server.proxy_addr, stop.clone(), stale.clone());
    let bench = pgbench(&p, server.proxy_addr, 3);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let rolled = ok(&server, "POST", "/v1/rollback", "{}");
    assert_eq!(
        (rolled["phase"].as_str(), rolled["primary"].as_str()),
        (Some("mirroring"), Some("old"))
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let again = ok(&server, "POST", "/v1/promote", r#"{"force": true}"#);
    assert_eq!(again["primary"], "new");
    for pause in [&rolled, &again] {
        assert!(pause["pause_ms"].as_f64().unwrap() < 1000.0, "{pause}");
    }
    // The pauses happened under load: sessions were inside units of work
    // when the gate closed, and the pause waited for them.
    let in_flight: u64 = [&promoted, &rolled, &again]
        .iter()
        .map(|p| p["sessions_in_flight"].as_u64().unwrap())
        .sum();
    assert!(in_flight > 0, "no session was in flight at any pause");
    tokio::time::sleep(Duration::from_millis(700)).await;
    bench.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    total += finish(&mut workers).await;
    drained(&server, &p.new).await;
    assert_identical(&p, "rollback and promote again");

    let fin = ok(&server, "POST", "/v1/finalize", "{}");
    assert_eq!(fin["phase"], "finalized");
    let slots = |c: &Cluster| {
        c.psql(DB, "SELECT count(*) FROM pg_replication_slots")
            .unwrap()
    };
    assert_eq!((slots(&p.old).trim(), slots(&p.new).trim()), ("0", "0"));
    assert!(total > 50, "too little load ran: {total}");
    // pgbench's history (no key, matched by whole rows) went both ways.
    let history: u64 = p
        .new
        .psql(DB, "SELECT count(*) FROM pgbench_history")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(history > 100, "pgbench wrote {history} history rows");
    assert_eq!(
        stale.load(Ordering::Relaxed),
        0,
        "a session read data older than its own write"
    );
    // Counted since the last restart: one rollback, one promote, one
    // finalize, nothing refused or aborted.
    let m = server_metrics(&server);
    for (transition, outcome, count) in [
        ("promote", "ok", Some(1.0)),
        ("rollback", "ok", Some(1.0)),
        ("finalize", "ok", Some(1.0)),
        ("promote", "aborted", None),
        ("rollback", "aborted", None),
        ("promote", "refused", None),
    ] {
        assert_eq!(
            metric(
                &m,
                &format!("cutover_transitions_total{{outcome=\"{outcome}\",transition=\"{transition}\"}}")
            ),
            count,
            "{transition} {outcome}:\n{m}"
        );
    }
    // Restart in `finalized`: still finalized, new still primary, no stream.
    server.shutdown().await;
    let server = start_proxy_with(&text).await;
    let s = status(&server);
    assert_eq!(
        (s["phase"].as_str(), s["primary"].as_str()),
        (Some("finalized"), Some("new"))
    );
    assert!(s["mirror"].is_null(), "{s}");
    let client = connect(server.proxy_addr).await;
    client
        .execute("INSERT INTO log (v) VALUES ('after finalize')", &[])
        .await
        .unwrap();
    assert_eq!(
        p.new
            .psql(DB, "SELECT count(*) FROM log WHERE v = 'after finalize'")
            .unwrap()
            .trim(),
        "1"
    );
    server.shutdown().await;
}

fn server_metrics(server: &cutover::Server) -> String {
    admin_get(server, "/metrics").1
}

async fn finish(workers: &mut Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>) -> u64 {
    let mut total = 0;
    for w in workers.drain(..) {
        let (n, errors) = w.await.unwrap();
        assert!(errors.is_empty(), "clients saw errors: {errors:?}");
        total += n;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_that_could_write_never_reach_the_secondary() {
    let p = pair();
    let server = start_proxy_with(&config(&p, "")).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    ok(&server, "PUT", "/v1/reads", r#"{"percent": 100}"#);
    let client = connect(server.proxy_addr).await;
    // A plain read does go to new.
    client
        .simple_query("SELECT count(*) FROM accounts")
        .await
        .unwrap();
    client
        .query("SELECT balance FROM accounts WHERE id = $1", &[&1i32])
        .await
        .unwrap();
    let reads_new = |m: &str| metric(m, "cutover_reads_total{backend=\"new\"}").unwrap_or(0.0);
    let before = reads_new(&server_metrics(&server));
    assert!(before >= 2.0, "plain reads did not reach new");
    for sql in [
        "WITH d AS (DELETE FROM accounts WHERE id = 7 RETURNING *) SELECT count(*) FROM d",
        "SELECT nextval('counter')",
        "SELECT * FROM accounts WHERE id = 8 FOR UPDATE",
        "SELECT sneaky_insert('via a function')",
        "SELECT set_config('application_name', 'x', false)",
    ] {
        client
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", error_text(&e)));
    }
    client
        .query("SELECT sneaky_insert($1)", &[&"prepared"])
        .await
        .unwrap();
    let e = client.simple_query("SELEKT everything").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42601");
    let m = server_metrics(&server);
    assert_eq!(
        reads_new(&m),
        before,
        "a statement that could write was served by new:\n{m}"
    );
    assert_eq!(
        metric(&m, "cutover_read_fallbacks_total{reason=\"read_only\"}"),
        None
    );
    // Their effects are on old, the primary (and mirrored to new).
    assert_eq!(
        p.old
            .psql(DB, "SELECT count(*) FROM accounts WHERE id = 7")
            .unwrap()
            .trim(),
        "0"
    );
    assert_eq!(
        p.old.psql(DB, "SELECT count(*) FROM log").unwrap().trim(),
        "2"
    );
    assert_eq!(
        p.old
            .psql(DB, "SELECT last_value FROM counter")
            .unwrap()
            .trim(),
        "1"
    );
    drained(&server, &p.old).await;
    assert_identical(&p, "tricky statements");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fall_back_when_the_secondary_dies_and_return_when_it_is_back() {
    let p = pair();
    let server = start_proxy_with(&config(&p, "[mirror]\nsync_timeout_ms = 300\n")).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    ok(&server, "PUT", "/v1/reads", r#"{"percent": 100}"#);
    let client = connect(server.proxy_addr).await;
    let read = || client.query_one("SELECT balance FROM accounts WHERE id = 3", &[]);
    read().await.unwrap();
    p.new.stop().unwrap();
    for i in 0..20 {
        client
            .execute("UPDATE accounts SET balance = $1 WHERE id = 3", &[&i])
            .await
            .unwrap();
        let row = read()
            .await
            .unwrap_or_else(|e| panic!("read {i}: {}", error_text(&e)));
        assert_eq!(row.get::<_, i32>(0), i);
    }
    // The reads above came from old: the stream stopped (reads leave at
    // once) or a commit timed out waiting for it (lagging).
    let m = server_metrics(&server);
    let fallbacks: f64 = ["stream_down", "lagging", "unavailable", "error"]
        .iter()
        .filter_map(|r| {
            metric(
                &m,
                &format!("cutover_read_fallbacks_total{{reason=\"{r}\"}}"),
            )
        })
        .sum();
    assert!(fallbacks >= 1.0, "{m}");
    p.new.restart().unwrap();
    drained(&server, &p.old).await;
    assert_identical(&p, "secondary back");
    let before = metric(
        &server_metrics(&server),
        "cutover_reads_total{backend=\"new\"}",
    )
    .unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        read().await.unwrap();
        let now = metric(
            &server_metrics(&server),
            "cutover_reads_total{backend=\"new\"}",
        )
        .unwrap_or(0.0);
        if now > before {
            break;
        }
        assert!(Instant::now() < deadline, "reads never returned to new");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_api_refuses_bad_requests_with_the_reason() {
    let p = pair();
    let server = start_proxy_with(&config(&p, "")).await;
    let (code, doc) = call(&server, "PUT", "/v1/reads", r#"{"percent": 10}"#, None);
    assert_eq!(code, 401, "{doc}");
    let (code, _) = call(&server, "POST", "/v1/promote", "{}", Some("wrong"));
    assert_eq!(code, 401);
    let (code, doc) = call(
        &server,
        "PUT",
        "/v1/reads",
        r#"{"percent": 10}"#,
        Some(TOKEN),
    );
    assert_eq!(code, 409);
    assert!(
        doc["reason"]
            .as_str()
            .unwrap()
            .contains("start mirroring first"),
        "{doc}"
    );
    let (code, doc) = call(&server, "PUT", "/v1/reads", "{not json", Some(TOKEN));
    assert_eq!(code, 400);
    assert!(
        doc["reason"].as_str().unwrap().contains("not valid JSON"),
        "{doc}"
    );
    let (code, doc) = call(
        &server,
        "PUT",
        "/v1/reads",
        r#"{"percent": 101}"#,
        Some(TOKEN),
    );
    assert_eq!(code, 400, "{doc}");
    let (code, doc) = call(&server, "POST", "/v1/finalize", "{}", Some(TOKEN));
    assert_eq!(code, 409);
    assert!(
        doc["reason"].as_str().unwrap().contains("after promote"),
        "{doc}"
    );
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    let (code, doc) = call(&server, "POST", "/v1/promote", "{}", Some(TOKEN));
    assert_eq!(code, 409);
    assert!(doc["reason"].as_str().unwrap().contains("verify"), "{doc}");
    let m = server_metrics(&server);
    assert!(
        metric(
            &m,
            "cutover_transitions_total{outcome=\"refused\",transition=\"promote\"}"
        )
        .is_some(),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_commits_still_read_their_own_writes_at_dial_100() {
    let p = pair();
    let server = start_proxy_with(&config(&p, "[mirror]\nsync = false\n")).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    ok(&server, "PUT", "/v1/reads", r#"{"percent": 100}"#);
    let client = connect(server.proxy_addr).await;
    for i in 0..200i32 {
        client
            .execute("UPDATE accounts SET balance = $1 WHERE id = 5", &[&i])
            .await
            .unwrap();
        let seen: i32 = client
            .query_one("SELECT balance FROM accounts WHERE id = 5", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(seen, i, "read {i} saw an older value");
        if i % 20 == 0 {
            // Once the stream passed the write, the read is new's to serve.
            drained(&server, &p.old).await;
            let served = || {
                metric(
                    &server_metrics(&server),
                    "cutover_reads_total{backend=\"new\"}",
                )
                .unwrap_or(0.0)
            };
            let before = served();
            let seen: i32 = client
                .query_one("SELECT balance FROM accounts WHERE id = 5", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(seen, i);
            // (tokio-postgres prepares, then executes: two units.)
            assert!(
                served() > before,
                "read {i} after catch-up was not served by new"
            );
        }
    }
    let m = server_metrics(&server);
    assert_eq!(
        metric(&m, "cutover_commit_wait_seconds_count"),
        Some(0.0),
        "async commits waited:\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_prints_the_state_and_exits_non_zero_with_the_reason_when_refused() {
    let p = pair();
    let server = start_proxy_with(&config(&p, "")).await;
    let admin = format!("http://{}", server.admin_addr);
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
            .args(args)
            .args(["--admin", &admin, "--token", TOKEN])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = tokio::task::block_in_place(|| cli(&["reads", "25"]));
    assert_eq!(code, 1);
    assert!(
        err.contains("refused (409)") && err.contains("start mirroring first"),
        "{err}"
    );
    let (code, _, err) = tokio::task::block_in_place(|| cli(&["promote"]));
    assert_eq!(code, 1, "{err}");
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    let (code, out, err) = tokio::task::block_in_place(|| cli(&["reads", "25"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "phase shifting, primary old, reads on new 25%");
    let (code, out, _) = tokio::task::block_in_place(|| cli(&["rollback", "--json"]));
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (doc["phase"].as_str(), doc["read_percent"].as_u64()),
        (Some("mirroring"), Some(0))
    );
    let (code, out, _) = tokio::task::block_in_place(|| cli(&["status"]));
    assert_eq!(code, 0);
    assert!(
        out.contains("phase:   mirroring") && out.contains("primary: old"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_transactions_go_as_a_unit_and_missing_objects_fall_back() {
    let p = pair();
    let server = start_proxy_with(&config(&p, "[routing]\nstrategy = \"session\"\n")).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    ok(&server, "PUT", "/v1/reads", r#"{"percent": 100}"#);
    let client = connect(server.proxy_addr).await;
    let reads_new = || {
        metric(
            &server_metrics(&server),
            "cutover_reads_total{backend=\"new\"}",
        )
        .unwrap_or(0.0)
    };
    let before = reads_new();
    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200);
    // A write inside it fails as it would on the primary: read-only transaction.
    let e = client
        .execute("UPDATE accounts SET balance = 1 WHERE id = 1", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "25006");
    client.batch_execute("ROLLBACK").await.unwrap();
    assert!(
        reads_new() >= before + 3.0,
        "the read-only transaction did not run on new"
    );

    // A temporary table exists only in the primary session: the read of it
    // fails on new with 42P01 and runs on the primary instead.
    client
        .batch_execute("CREATE TEMP TABLE mine AS SELECT 41 + 1 AS x")
        .await
        .unwrap();
    let x: i32 = client
        .query_one("SELECT x FROM mine", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(x, 42);
    let m = server_metrics(&server);
    assert!(
        metric(
            &m,
            "cutover_read_fallbacks_total{reason=\"undefined_object\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    // Session settings follow the session to new.
    client
        .batch_execute("SET TIME ZONE 'Asia/Kolkata'")
        .await
        .unwrap();
    let before = reads_new();
    let tz: String = client
        .query_one("SELECT current_setting('TimeZone')", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or_default();
    let offset: String = client
        .query_one("SELECT to_char(now(), 'TZH:TZM')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(offset, "+05:30", "TimeZone on the serving backend: {tz}");
    assert!(reads_new() > before, "the read did not run on new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_work_whichever_backend_runs_them() {
    let p = pair();
    let server = start_proxy_with(&config(&p, "")).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    ok(&server, "PUT", "/v1/reads", r#"{"percent": 100}"#);
    let mut client = connect(server.proxy_addr).await;
    // Prepared while idle: on new, the secondary.
    let read = client
        .prepare("SELECT balance FROM accounts WHERE id = $1")
        .await
        .unwrap();
    let write = client
        .prepare("UPDATE accounts SET balance = balance + $2 WHERE id = $1")
        .await
        .unwrap();
    let balance = |rows: Vec<tokio_postgres::Row>| rows[0].get::<_, i32>(0);
    assert_eq!(balance(client.query(&read, &[&9i32]).await.unwrap()), 0);
    // Inside a transaction the same statement runs on the primary, which
    // has not seen it yet: cutover prepares it there first.
    let tx = client.transaction().await.unwrap();
    tx.execute(&write, &[&9i32, &5i32]).await.unwrap();
    assert_eq!(balance(tx.query(&read, &[&9i32]).await.unwrap()), 5);
    tx.commit().await.unwrap();
    // And on new again after the commit, seeing it.
    assert_eq!(balance(client.query(&read, &[&9i32]).await.unwrap()), 5);
    let described = client
        .prepare("SELECT note FROM accounts WHERE id = $1")
        .await
        .unwrap();
    drop(read);
    drop(write);
    for _ in 0..3 {
        let rows = client.query(&described, &[&9i32]).await.unwrap();
        assert_eq!(rows[0].get::<_, String>(0), "seed");
    }
    let m = server_metrics(&server);
    assert!(
        metric(&m, "cutover_reads_total{backend=\"new\"}").unwrap_or(0.0) >= 4.0,
        "{m}"
    );
    assert!(
        metric(&m, "cutover_reads_total{backend=\"old\"}").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_session_at_dial_100_matches_the_direct_connection_message_for_message() {
    let p = pair();
    let server = start_proxy_with(&config(&p, "")).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    ok(&server, "PUT", "/v1/reads", r#"{"percent": 100}"#);
    let params = [
        ("application_name", "fidelity"),
        ("TimeZone", "Europe/Paris"),
    ];
    let mut direct = RawClient::connect(direct_addr(&p.old), APP_USER, APP_PASSWORD, &params).await;
    let mut proxied = RawClient::connect(server.proxy_addr, APP_USER, APP_PASSWORD, &params).await;
    let want = support::script::run_script(&mut direct).await;
    let got = support::script::run_script(&mut proxied).await;
    assert_eq!(want.len(), got.len());
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(g, w, "step {i} differs");
    }
    let m = server_metrics(&server);
    assert!(
        metric(&m, "cutover_reads_total{backend=\"new\"}").unwrap_or(0.0) >= 3.0,
        "the script's reads did not reach new:\n{m}"
    );
}

/// Drivers such as asyncpg prepare with Parse/Describe/Flush, read the
/// descriptions, then Bind/Execute/Sync, and later run the statement by
/// name: those statements must survive the session moving to another
/// primary, and the open batch must stay on the backend that holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_prepared_with_flush_survive_promote_and_rollback() {
    let p = pair();
    let server = start_proxy_with(&config(&p, "")).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    ok(&server, "PUT", "/v1/reads", r#"{"percent": 100}"#);
    let mut c = RawClient::connect(server.proxy_addr, APP_USER, APP_PASSWORD, &[]).await;
    let tags = |msgs: &[Msg]| msgs.iter().map(|m| m.tag).collect::<String>();
    let prepare = |name: &str, sql: &str| {
        fe::batch(&[
            fe::parse(name, sql, &[]),
            fe::describe(b'S', name),
            fe::flush(),
        ])
    };
    let run = |name: &str, params: &[&str]| {
        let params: Vec<Option<&[u8]>> = params.iter().map(|p| Some(p.as_bytes())).collect();
        fe::batch(&[
            fe::bind("", name, &[], &params, &[]),
            fe::execute("", 0),
            fe::sync(),
        ])
    };
    async fn after_flush(c: &mut RawClient, count: usize) -> String {
        let mut tags = String::new();
        for _ in 0..count {
            tags.push(c.next().await.expect("reply to a flushed batch").tag);
        }
        tags
    }
    c.send(&prepare(
        "read",
        "SELECT balance FROM accounts WHERE id = $1",
    ))
    .await;
    assert_eq!(after_flush(&mut c, 3).await, "1tT");
    assert_eq!(tags(&c.exchange(&run("read", &["7"]), 1).await), "2DCZ");
    c.send(&prepare(
        "write",
        "UPDATE accounts SET balance = balance + $2 WHERE id = $1",
    ))
    .await;
    assert_eq!(after_flush(&mut c, 3).await, "1tn");
    assert_eq!(
        tags(&c.exchange(&run("write", &["7", "1"]), 1).await),
        "2CZ"
    );
    // An error in a flushed batch: the server skips to the Sync, which must
    // reach the same backend.
    c.send(&fe::batch(&[fe::parse("bad", "SELEC 1", &[]), fe::flush()]))
        .await;
    assert_eq!(after_flush(&mut c, 1).await, "E");
    assert_eq!(tags(&c.exchange(&fe::sync(), 1).await), "Z");

    let balance = |msgs: &[Msg]| -> String {
        let row = msgs.iter().find(|m| m.tag == 'D').expect("a row");
        String::from_utf8(row.body[6..].to_vec()).unwrap()
    };
    // Inside BEGIN READ ONLY (served by new) a statement prepared with
    // Flush runs on new too, and the transaction stays open.
    let reply = c.exchange(&fe::query("BEGIN READ ONLY"), 1).await;
    assert_eq!(reply.last().unwrap().body, b"T");
    c.send(&prepare("port", "SELECT inet_server_port()::text"))
        .await;
    assert_eq!(after_flush(&mut c, 3).await, "1tT");
    let reply = c.exchange(&run("port", &[]), 1).await;
    assert_eq!(tags(&reply), "2DCZ", "{reply:?}");
    assert_eq!(balance(&reply), p.new.port().to_string());
    assert_eq!(reply.last().unwrap().body, b"T");
    let reply = c.exchange(&fe::query("COMMIT"), 1).await;
    assert_eq!(reply.last().unwrap().body, b"I");
    let mut expected = 1;
    for transition in ["/v1/promote", "/v1/rollback", "/v1/promote"] {
        ok(&server, "POST", transition, r#"{"force": true}"#);
        let reply = c.exchange(&run("write", &["7", "1"]), 1).await;
        assert_eq!(tags(&reply), "2CZ", "{transition}: {reply:?}");
        expected += 1;
        let reply = c.exchange(&run("read", &["7"]), 1).await;
        assert_eq!(tags(&reply), "2DCZ", "{transition}: {reply:?}");
        assert_eq!(balance(&reply), expected.to_string(), "{transition}");
    }
    assert_eq!(
        p.new
            .psql(DB, "SELECT balance FROM accounts WHERE id = 7")
            .unwrap()
            .trim(),
        expected.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_past_max_pause_aborts_and_traffic_resumes_unchanged() {
    let p = pair();
    let text = config(&p, "").replace("max_pause_ms = 8000", "max_pause_ms = 500");
    let server = start_proxy_with(&text).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    ok(&server, "PUT", "/v1/reads", r#"{"percent": 50}"#);
    let before = status(&server);

    // A transaction that outlasts the pause.
    let mut long = connect(server.proxy_addr).await;
    let tx = long.transaction().await.unwrap();
    tx.execute("UPDATE accounts SET note = 'long' WHERE id = 1", &[])
        .await
        .unwrap();
    // A client that starts a statement while the gate is closed waits.
    let waiter = {
        let addr = server.proxy_addr;
        let client = connect(addr).await;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let started = Instant::now();
            client
                .execute("UPDATE accounts SET note = 'waited' WHERE id = 2", &[])
                .await
                .map(|_| started.elapsed())
        })
    };
    let (code, doc) = call(
        &server,
        "POST",
        "/v1/promote",
        r#"{"force": true}"#,
        Some(TOKEN),
    );
    assert_eq!(code, 503, "{doc}");
    let reason = doc["reason"].as_str().unwrap();
    assert!(
        reason.contains("still inside transactions after cutover.max_pause (500 ms)")
            && reason.contains("traffic resumed unchanged"),
        "{reason}"
    );
    // The waiting client got through once the gate opened, without error.
    let waited = waiter
        .await
        .unwrap()
        .expect("the waiting statement succeeds");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // The long transaction commits where it started.
    tx.execute("UPDATE accounts SET note = 'long done' WHERE id = 1", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let after = status(&server);
    for field in ["phase", "primary", "read_percent"] {
        assert_eq!(after[field], before[field], "{field}");
    }
    assert_eq!(after["mirror"]["from"], "old");
    assert_eq!(after["last_pause"]["completed"], false, "{after}");
    let m = server_metrics(&server);
    assert_eq!(
        metric(
            &m,
            "cutover_transitions_total{outcome=\"aborted\",transition=\"promote\"}"
        ),
        Some(1.0),
        "{m}"
    );
    drained(&server, &p.old).await;
    assert_eq!(
        p.new
            .psql(
                DB,
                "SELECT note FROM accounts WHERE id IN (1, 2) ORDER BY id"
            )
            .unwrap(),
        "long done\nwaited",
        "the stream kept running from old"
    );
    drop(long);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_promotes_pause_comes_back_before_the_swap_and_loses_nothing() {
    let p = pair();
    let (proxy_port, admin_port) = (
        cutover_pgcluster::free_port().unwrap(),
        cutover_pgcluster::free_port().unwrap(),
    );
    let text = on_ports(
        &config(&p, "").replace("max_pause_ms = 8000", "max_pause_ms = 60000"),
        proxy_port,
        admin_port,
    );
    let path = p.state_file.with_file_name("cutover.toml");
    std::fs::write(&path, &text).unwrap();
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    let proxy = std::net::SocketAddr::from(([127, 0, 0, 1], proxy_port));
    let base = format!("http://{admin}");
    let post = |path: &str, body: &str| {
        cutover::cli_http::request(&base, "POST", path, Some(body), Some(TOKEN))
    };
    let status_doc = || -> serde_json::Value {
        let r = cutover::cli_http::request(&base, "GET", "/v1/status", None, None).unwrap();
        serde_json::from_str(&r.body).unwrap()
    };

    let mut daemon = spawn_daemon(&path, admin);
    assert_eq!(post("/v1/mirror/start", "{}").unwrap().status, 200);
    drained_at(admin, &p.old).await;

    // Acknowledged writes, then a transaction left open so the pause waits.
    let client = connect(proxy).await;
    for id in 10_001..=10_050i32 {
        client
            .execute(
                "INSERT INTO accounts (id, balance, note) VALUES ($1, $1, 'acknowledged')",
                &[&id],
            )
            .await
            .unwrap();
    }
    let mut holder = connect(proxy).await;
    let open = holder.transaction().await.unwrap();
    open.execute(
        "UPDATE accounts SET note = 'never committed' WHERE id = 1",
        &[],
    )
    .await
    .unwrap();
    let promote = std::thread::spawn({
        let base = base.clone();
        move || {
            cutover::cli_http::request(
                &base,
                "POST",
                "/v1/promote",
                Some(r#"{"force": true}"#),
                Some(TOKEN),
            )
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_doc()["write_paused"] != true {
        assert!(Instant::now() < deadline, "the pause never began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    // The operator's promote got no answer: cutover died mid-pause.
    assert!(promote.join().unwrap().is_err());
    drop(open);
    drop(holder);

    // Back before the swap: old primary, the stream from old, nothing lost.
    let _daemon = spawn_daemon(&path, admin);
    let s = status_doc();
    assert_eq!(
        (s["phase"].as_str(), s["primary"].as_str()),
        (Some("mirroring"), Some("old")),
        "{s}"
    );
    drained_at(admin, &p.old).await;
    assert_eq!(status_doc()["mirror"]["from"], "old");
    let count =
        "SELECT count(*) FROM accounts WHERE id BETWEEN 10001 AND 10050 AND note = 'acknowledged'";
    for c in [&p.old, &p.new] {
        assert_eq!(c.psql(DB, count).unwrap().trim(), "50");
        assert_eq!(
            c.psql(DB, "SELECT note FROM accounts WHERE id = 1")
                .unwrap()
                .trim(),
            "seed",
            "the open transaction was not committed"
        );
    }
    assert_identical(&p, "SIGKILL during the pause");

    // And the promote can be made after the restart.
    let r = post("/v1/promote", r#"{"force": true}"#).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let client = connect(proxy).await;
    client
        .execute(
            "INSERT INTO accounts (id, balance, note) VALUES (10051, 1, 'on new')",
            &[],
        )
        .await
        .unwrap();
    drained_at(admin, &p.new).await;
    assert_identical(&p, "promote after the restart");
}

fn new_reads(server: &cutover::Server) -> f64 {
    metric(
        &server_metrics(server),
        "cutover_reads_total{backend=\"new\"}",
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_cutover_cannot_replay_keep_reads_on_the_primary_until_discard_all() {
    let p = pair();
    let server = start_proxy_with(&config(&p, "")).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    ok(&server, "PUT", "/v1/reads", r#"{"percent": 100}"#);
    let read = "SELECT balance FROM accounts WHERE id = 9";
    for (how, change) in [
        ("set_config", "SELECT set_config('work_mem', '8MB', false)"),
        (
            "a SET among other statements",
            "SET work_mem = '8MB'; SELECT 1",
        ),
        ("SET over the extended protocol", ""),
    ] {
        let client = connect(server.proxy_addr).await;
        client.query_one(read, &[]).await.unwrap();
        let before = new_reads(&server);
        assert!(before > 0.0, "{how}: reads reach new first");
        if change.is_empty() {
            client.execute("SET work_mem = '8MB'", &[]).await.unwrap();
        } else {
            client.batch_execute(change).await.unwrap();
        }
        let after_change = new_reads(&server);
        for _ in 0..5 {
            client.query_one(read, &[]).await.unwrap();
        }
        assert_eq!(
            new_reads(&server),
            after_change,
            "{how}: reads stayed on old"
        );
        let work_mem: String = client.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
        assert_eq!(work_mem, "8MB", "{how}");
        client.batch_execute("DISCARD ALL").await.unwrap();
        client.query_one(read, &[]).await.unwrap();
        assert!(
            new_reads(&server) > after_change,
            "{how}: DISCARD ALL released the session"
        );
    }
    let m = server_metrics(&server);
    assert!(
        metric(&m, "cutover_read_fallbacks_total{reason=\"session_state\"}").unwrap_or(0.0) >= 15.0,
        "{m}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_secondary_stops_commit_waits_and_reads_until_it_caught_up() {
    let p = pair();
    let server = start_proxy_with(&config(&p, "[mirror]\nsync_timeout_ms = 300\n")).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    ok(&server, "PUT", "/v1/reads", r#"{"percent": 100}"#);
    // The applier blocks on a lock held on new.
    let (blocker, connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname={DB}",
            p.new.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    blocker
        .batch_execute("BEGIN; LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let client = connect(server.proxy_addr).await;
    let timeouts = || {
        metric(
            &server_metrics(&server),
            "cutover_commit_wait_timeouts_total",
        )
        .unwrap_or(0.0)
    };
    client
        .execute("UPDATE accounts SET balance = 1 WHERE id = 11", &[])
        .await
        .unwrap();
    assert_eq!(timeouts(), 1.0, "the first commit waited and timed out");
    let before = new_reads(&server);
    for i in 2..12i32 {
        client
            .execute("UPDATE accounts SET balance = $1 WHERE id = 11", &[&i])
            .await
            .unwrap();
        let seen: i32 = client
            .query_one("SELECT balance FROM accounts WHERE id = 11", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(seen, i, "reads left the lagging secondary");
    }
    assert_eq!(timeouts(), 1.0, "later commits did not wait");
    assert_eq!(
        new_reads(&server),
        before,
        "no read went to new while it lagged"
    );
    let m = server_metrics(&server);
    assert_eq!(metric(&m, "cutover_secondary_lagging"), Some(1.0), "{m}");
    assert!(
        metric(&m, "cutover_read_fallbacks_total{reason=\"lagging\"}").unwrap_or(0.0) >= 10.0,
        "{m}"
    );
    blocker.batch_execute("ROLLBACK").await.unwrap();
    drained(&server, &p.old).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while new_reads(&server) == before {
        let seen: i32 = client
            .query_one("SELECT balance FROM accounts WHERE id = 11", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(seen, 11);
        assert!(Instant::now() < deadline, "reads never returned to new");
    }
    assert_eq!(
        metric(&server_metrics(&server), "cutover_secondary_lagging"),
        Some(0.0)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_strategy_keeps_each_session_on_one_backend() {
    let p = pair();
    let server = start_proxy_with(&config(&p, "[routing]\nstrategy = \"session\"\n")).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    ok(&server, "PUT", "/v1/reads", r#"{"percent": 50}"#);
    let mut seen = std::collections::BTreeSet::new();
    for session in 0..20 {
        let client = connect(server.proxy_addr).await;
        let ports: std::collections::BTreeSet<String> = {
            let mut ports = std::collections::BTreeSet::new();
            for _ in 0..10 {
                let port: String = client
                    .query_one("SELECT setting FROM pg_settings WHERE name = 'port'", &[])
                    .await
                    .unwrap()
                    .get(0);
                ports.insert(port);
            }
            ports
        };
        assert_eq!(
            ports.len(),
            1,
            "session {session} moved between backends: {ports:?}"
        );
        seen.extend(ports);
    }
    assert_eq!(seen.len(), 2, "at dial 50 sessions land on both: {seen:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jdbc_batch_and_a_skip_locked_job_queue_work_at_dial_100() {
    let p = pair();
    for c in [&p.old, &p.new] {
        c.psql(
            DB,
            "CREATE TABLE jobs (id int PRIMARY KEY, done bool NOT NULL DEFAULT false, worker int); \
             GRANT ALL ON jobs TO app",
        )
        .unwrap();
    }
    p.old
        .psql(
            DB,
            "INSERT INTO jobs (id) SELECT g FROM generate_series(1, 60) g",
        )
        .unwrap();
    let server = start_proxy_with(&config(&p, "")).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    ok(&server, "PUT", "/v1/reads", r#"{"percent": 100}"#);

    // pgJDBC sends BEGIN in the same Sync batch as the first statement.
    let mut jdbc = RawClient::connect(server.proxy_addr, APP_USER, APP_PASSWORD, &[]).await;
    let batch = [
        fe::parse("", "BEGIN", &[]),
        fe::bind("", "", &[], &[], &[]),
        fe::execute("", 0),
        fe::parse("", "SELECT count(*) FROM jobs WHERE id <= 5", &[]),
        fe::bind("", "", &[], &[], &[]),
        fe::execute("", 0),
        fe::parse("", "UPDATE jobs SET worker = 0 WHERE id = 1", &[]),
        fe::bind("", "", &[], &[], &[]),
        fe::execute("", 0),
        fe::sync(),
    ]
    .concat();
    let replies = jdbc.exchange(&batch, 1).await;
    assert!(replies.iter().all(|m| m.tag != 'E'), "{replies:?}");
    assert_eq!(replies.last().unwrap().body, b"T", "inside the transaction");
    let replies = jdbc.exchange(&fe::query("COMMIT"), 1).await;
    assert!(replies.iter().all(|m| m.tag != 'E'), "{replies:?}");

    // Three workers drain a queue with FOR UPDATE SKIP LOCKED.
    let workers = (1..=3i32).map(|worker| {
        let addr = server.proxy_addr;
        tokio::spawn(async move {
            let mut client = connect(addr).await;
            let mut claimed = Vec::new();
            loop {
                let tx = client.transaction().await.unwrap();
                let Some(row) = tx
                    .query_opt(
                        "SELECT id FROM jobs WHERE NOT done ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1",
                        &[],
                    )
                    .await
                    .unwrap()
                else {
                    tx.commit().await.unwrap();
                    return claimed;
                };
                let id: i32 = row.get(0);
                tx.execute(
                    "UPDATE jobs SET done = true, worker = $1 WHERE id = $2",
                    &[&worker, &id],
                )
                .await
                .unwrap();
                tx.commit().await.unwrap();
                claimed.push(id);
            }
        })
    });
    let mut all: Vec<i32> = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    all.sort();
    assert_eq!(all, (1..=60).collect::<Vec<i32>>(), "each job exactly once");
    drained(&server, &p.old).await;
    for c in [&p.old, &p.new] {
        assert_eq!(
            c.psql(DB, "SELECT count(*) FROM jobs WHERE done")
                .unwrap()
                .trim(),
            "60"
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_start_without_a_new_backend_is_refused_with_the_fix() {
    let c = cluster(HostAuth::ScramSha256);
    let server = start_proxy(&c).await;
    let (code, doc) = call(&server, "POST", "/v1/mirror/start", "{}", None);
    assert_eq!(code, 409, "{doc}");
    assert_eq!(
        doc["reason"],
        "no [new] backend is configured; add [new] url = ... and restart cutover"
    );
    assert_eq!(status(&server)["phase"], "passthrough");
    server.shutdown().await;
}
