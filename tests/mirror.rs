//! Mirroring: every committed write on the old database reaches the new one
//! as row images in commit order, and after the stream drains both hold
//! exactly the same rows (full contents compared, table by table).

mod support;

use cutover_pgcluster::{Cluster, HostAuth, SUPERUSER, SUPERUSER_PASSWORD};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

const SCHEMA: &str = r#"
CREATE TABLE accounts (id serial PRIMARY KEY, balance int NOT NULL, note text, touched timestamptz);
CREATE TABLE events (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), account int, amount float8, at timestamptz DEFAULT now());
CREATE TABLE audit (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, account int, old_balance int, new_balance int);
CREATE FUNCTION audit_fn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO audit (account, old_balance, new_balance) VALUES (NEW.id, OLD.balance, NEW.balance);
  RETURN NEW;
END $$;
CREATE TRIGGER accounts_audit AFTER UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION audit_fn();
CREATE TABLE docs (id int PRIMARY KEY, body text, counter int NOT NULL DEFAULT 0);
ALTER TABLE docs REPLICA IDENTITY FULL;
CREATE TABLE scratch (id int PRIMARY KEY, v text);
CREATE TABLE "Odd ""Name""" (k text PRIMARY KEY, "Value" jsonb, tags text[], raw bytea);
GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app;
"#;

const TABLES: &[(&str, &str)] = &[
    ("accounts", "id"),
    ("events", "id"),
    ("audit", "id"),
    ("docs", "id"),
    ("scratch", "id"),
    ("\"Odd \"\"Name\"\"\"", "k"),
];

struct Pair {
    old: Cluster,
    new: Cluster,
}

fn pair() -> Pair {
    let old = cluster(HostAuth::ScramSha256);
    let new = cluster(HostAuth::ScramSha256);
    old.psql(DB, SCHEMA).unwrap();
    new.psql(DB, SCHEMA).unwrap();
    Pair { old, new }
}

fn mirror_config(p: &Pair, token: &str) -> String {
    mirror_config_text(&p.old, &p.new, token, "pool_size = 60", "")
}

fn seed(old: &Cluster) {
    old.psql(
        DB,
        "INSERT INTO accounts (balance, note) SELECT g, 'seed ' || g FROM generate_series(1, 500) g; \
         INSERT INTO docs (id, body) SELECT g, (SELECT string_agg(md5(random()::text || i || g), '') FROM generate_series(1, 2500) i) \
           FROM generate_series(1, 40) g; \
         INSERT INTO \"Odd \"\"Name\"\"\" VALUES ('a''b', '{\"x\": [1, 2]}', '{one,\"two words\"}', '\\xdeadbeef'), ('ü', 'null', '{}', NULL);",
    )
    .unwrap();
}

fn post(server: &cutover::Server, path: &str, token: Option<&str>) -> (u16, String) {
    let r = cutover::cli_http::request(
        &format!("http://{}", server.admin_addr),
        "POST",
        path,
        Some("{}"),
        token,
    )
    .expect("admin request");
    (r.status, r.body)
}

fn mirror_status(server: &cutover::Server) -> serde_json::Value {
    mirror_status_at(server.admin_addr)
}

/// Every row of every table, as text, in key order.
fn contents(c: &Cluster, table: &str, key: &str) -> String {
    c.psql(
        DB,
        &format!("{CANONICAL} SELECT t::text FROM {table} t ORDER BY {key}"),
    )
    .unwrap()
}

/// One text form for values whatever the server's defaults.
const CANONICAL: &str = "SET timezone = UTC; SET datestyle = ISO; SET intervalstyle = postgres; \
     SET extra_float_digits = 3; SET bytea_output = hex;";

fn assert_identical(p: &Pair) {
    for (table, key) in TABLES {
        let old = contents(&p.old, table, key);
        let new = contents(&p.new, table, key);
        if old != new {
            let diff: Vec<_> = old
                .lines()
                .zip(new.lines())
                .filter(|(a, b)| a != b)
                .take(3)
                .map(|(a, b)| format!("old: {:.200}\nnew: {:.200}", a, b))
                .collect();
            panic!(
                "{table} differs ({} rows on old, {} on new):\n{}",
                old.lines().count(),
                new.lines().count(),
                diff.join("\n")
            );
        }
    }
}

/// Sequences and identities on new reach old's values (synced once the
/// stream is quiet), so the first insert after a cutover cannot collide.
async fn sequences_match(p: &Pair) {
    let sql = "SELECT string_agg(sequencename || '=' || coalesce(last_value::text, 'null'), ',' ORDER BY 1) FROM pg_sequences";
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (old, new) = (p.old.psql(DB, sql).unwrap(), p.new.psql(DB, sql).unwrap());
        if old == new {
            assert!(old.contains("accounts_id_seq="), "{old}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sequences differ: old {old}, new {new}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Concurrent, conflicting, non-deterministic writes, through cutover and
/// directly, until `stop` is set.
fn workload(
    proxy: std::net::SocketAddr,
    old_direct: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    let mut tasks = Vec::new();
    for worker in 0..4i32 {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = connect(proxy).await;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let a = 1 + (n as i32 * 7 + worker * 13) % 50;
                let b = 1 + (n as i32 * 11 + worker * 5) % 50;
                // Conflicting updates in different orders deadlock now and
                // then; like any application, retry those.
                let result: Result<(), tokio_postgres::Error> = async {
                    let tx = client.transaction().await?;
                    tx.execute(
                        "UPDATE accounts SET balance = balance + 1, touched = now() WHERE id = $1",
                        &[&a],
                    )
                    .await?;
                    tx.execute(
                        "UPDATE accounts SET balance = $2 WHERE id = $1",
                        &[&b, &(worker * 1000)],
                    )
                    .await?;
                    tx.execute(
                        "INSERT INTO events (account, amount) VALUES ($1, random())",
                        &[&a],
                    )
                    .await?;
                    tx.commit().await
                }
                .await;
                match result {
                    Ok(()) => n += 1,
                    Err(e) if sqlstate(&e) == "40P01" => {}
                    Err(e) => panic!("{}", error_text(&e)),
                }
            }
            n
        }));
    }
    // Serial inserts, deletes and re-inserts of the same key.
    let s = stop.clone();
    tasks.push(tokio::spawn(async move {
        let client = connect(proxy).await;
        let mut n = 0u64;
        while !s.load(Ordering::Relaxed) {
            client
                .execute("INSERT INTO accounts (balance, note) VALUES (0, md5(random()::text))", &[])
                .await
                .unwrap();
            let id = 100 + (n as i32 % 300);
            client
                .batch_execute(&format!(
                    "BEGIN; DELETE FROM accounts WHERE id = {id}; \
                     INSERT INTO accounts (id, balance, note) VALUES ({id}, -1, 'reborn {n}'); COMMIT"
                ))
                .await
                .unwrap();
            n += 1;
        }
        n
    }));
    // TOASTed rows updated on other columns, through cutover.
    let s = stop.clone();
    tasks.push(tokio::spawn(async move {
        let client = connect(proxy).await;
        let mut n = 0u64;
        while !s.load(Ordering::Relaxed) {
            let id = 1 + (n as i32 % 40);
            client
                .execute(
                    "UPDATE docs SET counter = counter + 1 WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            n += 1;
        }
        n
    }));
    // Directly on the old database, not through cutover: big values, a
    // scratch table that gets truncated, odd names.
    let s = stop;
    tasks.push(tokio::spawn(async move {
        let client = connect_as(old_direct, APP_USER, APP_PASSWORD).await.unwrap();
        let mut n = 0u64;
        while !s.load(Ordering::Relaxed) {
            let id = n as i32;
            client
                .execute("INSERT INTO scratch VALUES ($1, repeat(md5($2), 100))", &[&id, &id.to_string()])
                .await
                .unwrap();
            if n % 25 == 24 {
                client.batch_execute("TRUNCATE scratch").await.unwrap();
            }
            if n.is_multiple_of(10) {
                client
                    .execute("UPDATE docs SET body = body || md5(random()::text) WHERE id = $1", &[&(1 + id % 40)])
                    .await
                    .unwrap();
                client
                    .execute(
                        "INSERT INTO \"Odd \"\"Name\"\"\" VALUES ($1, jsonb_build_object('n', $2::int), ARRAY['x', $1], decode(md5($1), 'hex')) \
                         ON CONFLICT (k) DO UPDATE SET \"Value\" = EXCLUDED.\"Value\"",
                        &[&format!("k{}", n % 7), &id],
                    )
                    .await
                    .unwrap();
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    }));
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_during_copy_and_stream_leave_old_and_new_identical() {
    let p = pair();
    seed(&p.old);
    let server = start_proxy_with(&mirror_config(&p, "s3cret")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = workload(server.proxy_addr, direct_addr(&p.old), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(post(&server, "/v1/mirror/start", None).0, 401);
    assert_eq!(post(&server, "/v1/mirror/start", Some("wrong")).0, 401);
    let (code, body) = post(&server, "/v1/mirror/start", Some("s3cret"));
    assert_eq!(code, 200, "{body}");
    let (code, body) = post(&server, "/v1/mirror/start", Some("s3cret"));
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("already running"), "{body}");

    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let mut writes = 0;
    for t in tasks {
        writes += t.await.unwrap();
    }
    assert!(writes > 100, "the workload ran ({writes} iterations)");
    drained(&server, &p.old).await;
    assert_identical(&p);
    sequences_match(&p).await;

    let (_, status) = admin_get(&server, "/v1/status");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["phase"], "mirroring");
    assert_eq!(status["mirror"]["state"], "streaming");
    assert!(status["mirror"]["applied_transactions"].as_u64().unwrap() > 0);
    assert!(status["mirror"]["copy"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["done"] == true));
    // The new side's trigger did not fire again on applied rows.
    assert_eq!(
        p.old.psql(DB, "SELECT count(*) FROM audit").unwrap(),
        p.new.psql(DB, "SELECT count(*) FROM audit").unwrap()
    );
    // Verify run by the daemon: progress in status, metrics, a clean verdict.
    assert_eq!(post(&server, "/v1/verify", None).0, 401);
    let (code, body) = post(&server, "/v1/verify", Some("s3cret"));
    assert_eq!(code, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let verify = loop {
        let (_, body) = admin_get(&server, "/v1/status");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["verify"]["state"] != "running" {
            break v["verify"].clone();
        }
        assert!(Instant::now() < deadline, "verify did not finish: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(verify["state"], "clean", "{verify}");
    assert!(verify["rows_checked"].as_u64().unwrap() > 500, "{verify}");
    let (_, metrics) = admin_get(&server, "/metrics");
    assert!(metric(&metrics, "cutover_verify_rows_checked_total").unwrap() > 500.0);
    assert_eq!(metric(&metrics, "cutover_verify_rows_different"), Some(0.0));
    assert!(metric(&metrics, "cutover_stream_applied_transactions_total").unwrap() > 0.0);
    assert!(metric(&metrics, "cutover_stream_applied_rows_total").unwrap() > 0.0);
    assert_eq!(
        metric(
            &metrics,
            "cutover_copy_rows_total{table=\"\\\"public\\\".\\\"docs\\\"\"}"
        ),
        Some(40.0),
        "{metrics}"
    );
    assert!(metrics.contains("cutover_stream_apply_batch_seconds_count"));
    assert!(metric(&metrics, "cutover_stream_lag_bytes").is_some());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_the_stream_and_a_down_secondary_catches_up() {
    let p = pair();
    seed(&p.old);
    let config = mirror_config(&p, "");
    let server = start_proxy_with(&config).await;
    assert_eq!(post(&server, "/v1/mirror/start", None).0, 200);
    drained(&server, &p.old).await;
    assert_identical(&p);
    sequences_match(&p).await;
    let copied_at = p
        .new
        .psql(DB, "SELECT applied_at FROM cutover.applied")
        .unwrap();
    server.shutdown().await;

    // Writes while cutover is down arrive after it restarts, without a new copy.
    p.old
        .psql(DB, "UPDATE accounts SET balance = balance * 2 WHERE id % 3 = 0; DELETE FROM docs WHERE id > 30; INSERT INTO scratch VALUES (-1, 'while down'); \
             INSERT INTO \"Odd \"\"Name\"\"\" SELECT 'm' || g, jsonb_build_object('g', g, 's', 'q\"uote'), ARRAY['a b', g::text, NULL], decode(md5(g::text), 'hex') FROM generate_series(1, 50) g")
        .unwrap();
    let server = start_proxy_with(&config).await;
    drained(&server, &p.old).await;
    assert_identical(&p);
    sequences_match(&p).await;
    let copy = mirror_status(&server)["copy"].clone();
    assert!(
        copy.as_array().unwrap().iter().all(|t| t["done"] == true),
        "{copy}"
    );
    let (_, metrics) = admin_get(&server, "/metrics");
    assert!(
        !metrics.contains("cutover_copy_rows_total{"),
        "resumed without copying again"
    );
    assert_ne!(
        p.new
            .psql(DB, "SELECT applied_at FROM cutover.applied")
            .unwrap(),
        copied_at
    );

    // The secondary goes away under load; writes keep succeeding; it catches up.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = workload(server.proxy_addr, direct_addr(&p.old), stop.clone());
    tokio::time::sleep(Duration::from_millis(700)).await;
    tokio::task::block_in_place(|| p.new.stop()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while mirror_status(&server)["state"] != "reconnecting" {
        assert!(
            Instant::now() < deadline,
            "the stream did not notice: {}",
            mirror_status(&server)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::task::block_in_place(|| p.new.restart()).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await
            .expect("writes kept succeeding while the secondary was down");
    }
    drained(&server, &p.old).await;
    assert_identical(&p);
    sequences_match(&p).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preconditions_fail_with_the_fix() {
    let p = pair();
    let config = mirror_config(&p, "");

    p.old
        .psql(
            DB,
            "CREATE TABLE nokey (x int); CREATE TABLE nokey2 (y int)",
        )
        .unwrap();
    let server = start_proxy_with(&config).await;
    let (code, body) = post(&server, "/v1/mirror/start", None);
    assert_eq!(
        code, 409,
        "mirror start answers with the setup's error: {body}"
    );
    assert!(body.contains("public.nokey, public.nokey2"), "{body}");
    let error = wait_for_failure(&server).await;
    assert!(
        error.contains("\"public\".\"nokey\", \"public\".\"nokey2\"")
            || error.contains("public.nokey, public.nokey2"),
        "{error}"
    );
    assert!(error.contains("primary key"), "{error}");
    server.shutdown().await;

    p.old
        .psql(
            DB,
            "DROP TABLE nokey, nokey2; CREATE TABLE only_old (id int PRIMARY KEY)",
        )
        .unwrap();
    p.new
        .psql(DB, "CREATE TABLE only_old (id bigint PRIMARY KEY)")
        .unwrap();
    let server = start_proxy_with(&config).await;
    post(&server, "/v1/mirror/start", None);
    let error = wait_for_failure(&server).await;
    assert!(
        error.contains("`id integer` on old but `id bigint` on new"),
        "{error}"
    );
    server.shutdown().await;

    // A table new lacks is created from old's definition.
    p.new.psql(DB, "DROP TABLE only_old").unwrap();
    let server = start_proxy_with(&config).await;
    let (code, body) = post(&server, "/v1/mirror/start", None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        p.new
            .psql(
                DB,
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = 'only_old'::regclass AND attname = 'id'"
            )
            .unwrap()
            .trim(),
        "integer"
    );
    server.shutdown().await;

    let replica = Cluster::start(cutover_pgcluster::ClusterOptions {
        host_auth: HostAuth::ScramSha256,
        settings: vec!["wal_level = replica".to_string()],
        ..Default::default()
    })
    .unwrap();
    replica
        .psql("postgres", &format!("CREATE DATABASE {DB}"))
        .unwrap();
    let config = config.replace(
        &format!("127.0.0.1:{}/", p.old.port()),
        &format!("127.0.0.1:{}/", replica.port()),
    );
    let server = start_proxy_with(&config).await;
    post(&server, "/v1/mirror/start", None);
    let error = wait_for_failure(&server).await;
    assert!(
        error.contains("wal_level is 'replica'; set wal_level = logical and restart"),
        "{error}"
    );
    server.shutdown().await;
}

async fn wait_for_failure(server: &cutover::Server) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = mirror_status(server);
        if m["state"] == "failed" {
            return m["error"].as_str().unwrap_or_default().to_string();
        }
        assert!(Instant::now() < deadline, "no failure reported: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const BIN: &str = env!("CARGO_BIN_EXE_cutover");

fn run_cli(args: &[&str], config: &std::path::Path) -> (i32, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_rows_changed_on_new_and_repair_fixes_them() {
    let p = pair();
    seed(&p.old);
    let config = mirror_config(&p, "");
    let path = std::env::temp_dir().join(format!("cutover-verify-{}.toml", std::process::id()));
    std::fs::write(&path, &config).unwrap();
    let server = start_proxy_with(&config).await;
    assert_eq!(post(&server, "/v1/mirror/start", None).0, 200);
    drained(&server, &p.old).await;

    // In the daemon: its verdict is what promote looks at.
    let admin = format!("http://{}", server.admin_addr);
    let (code, out) = tokio::task::block_in_place(|| {
        run_cli(&["verify", "--chunk-rows", "7", "--admin", &admin], &path)
    });
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("old and new hold the same rows"), "{out}");
    assert_eq!(status_doc(&server)["verify"]["state"], "clean");

    // A bounded window, then a resumed run that checks only the rest.
    let chunks_of = |out: &str, field: &str| -> (bool, u64) {
        let report: serde_json::Value =
            serde_json::from_str(&out[..=out.rfind('}').unwrap()]).unwrap();
        let sum = report["tables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t[field].as_u64().unwrap())
            .sum();
        (report["complete"].as_bool().unwrap(), sum)
    };
    let (code, out) = tokio::task::block_in_place(|| {
        run_cli(
            &[
                "verify",
                "--standalone",
                "--json",
                "--chunk-rows",
                "50",
                "--max-chunks",
                "4",
            ],
            &path,
        )
    });
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("continue with --resume"), "{out}");
    assert_eq!(chunks_of(&out, "chunks_this_run"), (false, 4));
    let (code, out) = tokio::task::block_in_place(|| {
        run_cli(
            &[
                "verify",
                "--standalone",
                "--json",
                "--chunk-rows",
                "50",
                "--resume",
            ],
            &path,
        )
    });
    assert_eq!(code, 0, "{out}");
    let (complete, this_run) = chunks_of(&out, "chunks_this_run");
    let (_, total) = chunks_of(&out, "chunks");
    assert!(complete && total > 4, "{out}");
    assert_eq!(
        this_run,
        total - 4,
        "the resumed run skipped what was already checked"
    );

    // Damage the new side behind the stream's back.
    p.new
        .psql(
            DB,
            "UPDATE accounts SET balance = 999999 WHERE id = 42; DELETE FROM accounts WHERE id = 43; \
             INSERT INTO accounts (id, balance) VALUES (100000, 1); \
             UPDATE \"Odd \"\"Name\"\"\" SET tags = '{tampered}' WHERE k = 'a''b'; \
             UPDATE docs SET body = body || 'x' WHERE id = 40",
        )
        .unwrap();
    let (code, out) = tokio::task::block_in_place(|| {
        run_cli(
            &["verify", "--json", "--chunk-rows", "7", "--admin", &admin],
            &path,
        )
    });
    assert_eq!(code, 1, "{out}");
    assert_eq!(status_doc(&server)["verify"]["state"], "differences");
    let json_end = out.rfind('}').unwrap();
    let report: serde_json::Value = serde_json::from_str(&out[..=json_end]).unwrap();
    assert_eq!(report["clean"], false);
    let found: Vec<(String, String, String)> = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| {
            t["differences"].as_array().unwrap().iter().map(move |d| {
                let key: Vec<String> = d["key"]
                    .as_object()
                    .unwrap()
                    .values()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect();
                (
                    t["table"].as_str().unwrap().to_string(),
                    d["kind"].as_str().unwrap().to_string(),
                    key.join(","),
                )
            })
        })
        .collect();
    let expected = [
        ("\"public\".\"Odd \"\"Name\"\"\"", "different", "a'b"),
        ("\"public\".\"accounts\"", "different", "42"),
        ("\"public\".\"accounts\"", "missing_on_new", "43"),
        ("\"public\".\"accounts\"", "missing_on_old", "100000"),
        // The UPDATE made directly on new fired new's own audit trigger.
        ("\"public\".\"audit\"", "missing_on_old", "1"),
        ("\"public\".\"docs\"", "different", "40"),
    ];
    let expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    let mut found_sorted = found.clone();
    found_sorted.sort();
    assert_eq!(found_sorted, expected, "{out}");

    let (code, out) = tokio::task::block_in_place(|| {
        run_cli(
            &[
                "verify",
                "--standalone",
                "--table",
                "docs",
                "--rechecks",
                "1",
            ],
            &path,
        )
    });
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("different") && out.contains("id=40") && !out.contains("accounts"),
        "{out}"
    );

    let (code, out) = tokio::task::block_in_place(|| {
        run_cli(&["repair", "--chunk-rows", "7", "--rechecks", "1"], &path)
    });
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("repaired 6 rows"), "{out}");
    assert_identical(&p);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_copy_and_mid_apply_loses_and_duplicates_nothing() {
    let p = pair();
    seed(&p.old);
    // Enough rows that the copy takes a while and can be interrupted.
    p.old
        .psql(DB, "INSERT INTO events (account, amount) SELECT g % 500, g FROM generate_series(1, 300000) g")
        .unwrap();
    let proxy_port = cutover_pgcluster::free_port().unwrap();
    let admin_port = cutover_pgcluster::free_port().unwrap();
    let config = on_ports(&mirror_config(&p, ""), proxy_port, admin_port);
    let path = std::env::temp_dir().join(format!("cutover-kill-{}.toml", std::process::id()));
    std::fs::write(&path, &config).unwrap();
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let proxy: std::net::SocketAddr = ([127, 0, 0, 1], proxy_port).into();

    // A table without a key, where a replayed insert would show up as a
    // duplicate row: every acknowledged insert carries its own number.
    for c in [&p.old, &p.new] {
        c.psql(
            DB,
            "CREATE TABLE tally (n bigint, note text); ALTER TABLE tally REPLICA IDENTITY FULL; \
             GRANT ALL ON tally TO app",
        )
        .unwrap();
    }
    let daemon = tokio::task::block_in_place(|| spawn_daemon(&path, admin));
    let (code, out) = tokio::task::block_in_place(|| run_cli(&["mirror", "start"], &path));
    assert_eq!(code, 0, "{out}");
    // Writes go straight to old so they continue while cutover is dead.
    // They start once the slot exists: TRUNCATEs racing its creation can
    // leave a slot PostgreSQL cannot decode, which cutover survives by
    // making a new slot and copying again (not what this test is about).
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = workload(direct_addr(&p.old), direct_addr(&p.old), stop.clone());
    let tally = {
        let (stop, old) = (stop.clone(), direct_addr(&p.old));
        tokio::spawn(async move {
            let client = connect(old).await;
            let mut acknowledged = 0i64;
            while !stop.load(Ordering::Relaxed) {
                client
                    .execute(
                        "INSERT INTO tally VALUES ($1, 'acknowledged')",
                        &[&(acknowledged + 1)],
                    )
                    .await
                    .unwrap();
                acknowledged += 1;
            }
            acknowledged
        })
    };

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = mirror_status_at(admin);
        let copied: u64 = m["copy"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| t["rows"].as_u64().unwrap_or(0))
            .sum();
        if m["state"] == "copying" && copied > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "never copying: {m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(daemon); // SIGKILL mid-copy

    let daemon = tokio::task::block_in_place(|| spawn_daemon(&path, admin));
    // It resumes by itself (the slot and the recorded position exist); an
    // explicit start racing that is either accepted or told it runs.
    let (code, out) = tokio::task::block_in_place(|| run_cli(&["mirror", "start"], &path));
    assert!(code == 0 || out.contains("already running"), "{out}");
    // The copy resumes where it stopped: this daemon copies fewer rows than
    // the plan records in all.
    let deadline = Instant::now() + Duration::from_secs(90);
    while mirror_status_at(admin)["state"] != "streaming" {
        assert!(
            Instant::now() < deadline,
            "copy did not finish: {}",
            mirror_status_at(admin)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics =
        cutover::cli_http::request(&format!("http://{admin}"), "GET", "/metrics", None, None)
            .unwrap()
            .body;
    let copied_here: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("cutover_copy_rows_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let copied_in_all: f64 = p
        .new
        .psql(DB, "SELECT sum(rows) FROM cutover.copy_progress")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        copied_here < copied_in_all,
        "copy restarted: {copied_here} of {copied_in_all}"
    );
    // Let it stream under load for a while, then SIGKILL mid-apply.
    let applied_before = mirror_status_at(admin)["applied_transactions"]
        .as_u64()
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while mirror_status_at(admin)["applied_transactions"]
        .as_u64()
        .unwrap_or(0)
        < applied_before + 50
    {
        assert!(
            Instant::now() < deadline,
            "no progress: {}",
            mirror_status_at(admin)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(daemon);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let _daemon = tokio::task::block_in_place(|| spawn_daemon(&path, admin));
    // Clients go through the restarted proxy too.
    let client = connect(proxy).await;
    client
        .execute("INSERT INTO scratch VALUES (-5, 'after the kills')", &[])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acknowledged = tally.await.unwrap();
    drained_at(admin, &p.old).await;
    assert_identical(&p);
    sequences_match(&p).await;
    assert!(acknowledged > 100, "{acknowledged}");
    let counts = "SELECT count(*) || ' ' || count(DISTINCT n) || ' ' || max(n) FROM tally";
    for c in [&p.old, &p.new] {
        assert_eq!(
            c.psql(DB, counts).unwrap().trim(),
            format!("{acknowledged} {acknowledged} {acknowledged}"),
            "every acknowledged insert once, none twice"
        );
    }
}

const KEYLESS_SCHEMA: &str = r#"
CREATE TABLE log (at timestamptz, d date, span interval, f float8, note text, j json, p point);
ALTER TABLE log REPLICA IDENTITY FULL;
CREATE TABLE blobs (n int, body text);
ALTER TABLE blobs REPLICA IDENTITY FULL;
GRANT ALL ON log, blobs TO app;
"#;

/// Both tables without a key, every row as text in one canonical form,
/// sorted: equal strings mean equal multisets of rows.
fn keyless_contents(c: &Cluster) -> String {
    c.psql(
        DB,
        &format!(
            "{CANONICAL} SELECT 'log ' || t::text FROM log t \
             UNION ALL SELECT 'blobs ' || n || ' ' || md5(body) FROM blobs ORDER BY 1"
        ),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_without_a_key_are_copied_streamed_verified_and_repaired() {
    let p = pair();
    p.old.psql(DB, KEYLESS_SCHEMA).unwrap();
    p.new.psql(DB, KEYLESS_SCHEMA).unwrap();
    // The two servers write dates, times, intervals and floats differently
    // by default; rows must still mean the same on both sides.
    p.old
        .psql(
            DB,
            &format!(
                "ALTER DATABASE {DB} SET datestyle = 'SQL, DMY'; ALTER DATABASE {DB} SET timezone = 'America/Los_Angeles'; \
                 ALTER DATABASE {DB} SET intervalstyle = 'sql_standard'; ALTER DATABASE {DB} SET extra_float_digits = 0"
            ),
        )
        .unwrap();
    p.new
        .psql(
            DB,
            &format!(
                "ALTER DATABASE {DB} SET datestyle = 'SQL, MDY'; ALTER DATABASE {DB} SET timezone = 'Asia/Kolkata'; \
                 ALTER DATABASE {DB} SET bytea_output = 'escape'"
            ),
        )
        .unwrap();
    seed(&p.old);
    p.old
        .psql(
            DB,
            "INSERT INTO log SELECT now() - g * interval '1 hour', date '2026-01-01' + g, g * interval '1 day 3 minutes', \
               1.0 / g, CASE WHEN g % 10 = 0 THEN NULL ELSE 'n' || (g % 7) END, json_build_object('g', g % 5), point(g, g) \
             FROM generate_series(1, 300) g; \
             INSERT INTO log (note) SELECT 'dup' FROM generate_series(1, 3); \
             INSERT INTO blobs SELECT g, (SELECT string_agg(md5(random()::text || i || g), '') FROM generate_series(1, 2500) i) \
             FROM generate_series(1, 10) g",
        )
        .unwrap();
    let config = mirror_config(&p, "");
    let path = std::env::temp_dir().join(format!("cutover-keyless-{}.toml", std::process::id()));
    std::fs::write(&path, &config).unwrap();
    let server = start_proxy_with(&config).await;

    // Writers on old (one through cutover, one direct) while the copy runs.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for addr in [server.proxy_addr, direct_addr(&p.old)] {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let client = connect(addr).await;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let g = (n % 300) as i32 + 1;
                let result = client
                    .batch_execute(&format!(
                        "BEGIN; \
                         INSERT INTO log (note, f, at) VALUES ('dup', 0.1, now()), ('dup', 0.1, now()); \
                         UPDATE log SET note = 'changed ' || {g}, f = random() \
                           WHERE ctid = (SELECT ctid FROM log WHERE note LIKE 'n%' LIMIT 1); \
                         DELETE FROM log WHERE ctid = (SELECT ctid FROM log WHERE note = 'dup' LIMIT 1); \
                         UPDATE blobs SET n = n + 1 WHERE n % 10 = {} ; \
                         COMMIT",
                        g % 10
                    ))
                    .await;
                match result {
                    Ok(()) => n += 1,
                    Err(e) if sqlstate(&e) == "40P01" => client.batch_execute("ROLLBACK").await.unwrap(),
                    Err(e) => panic!("{}", error_text(&e)),
                }
            }
            n
        }));
    }
    assert_eq!(post(&server, "/v1/mirror/start", None).0, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut writes = 0;
    for t in tasks {
        writes += t.await.unwrap();
    }
    assert!(writes > 20, "the workload ran ({writes} iterations)");
    // A TRUNCATE and whole-table changes after the copy, too.
    p.old
        .psql(
            DB,
            "UPDATE log SET span = span * 2 WHERE note IS NULL; DELETE FROM log WHERE note = 'n3'; \
             TRUNCATE blobs; INSERT INTO blobs SELECT g, repeat(md5(g::text), 3000) FROM generate_series(1, 5) g; \
             UPDATE blobs SET n = -n",
        )
        .unwrap();
    drained(&server, &p.old).await;
    let old_rows = keyless_contents(&p.old);
    let lines: Vec<&str> = old_rows.lines().collect();
    assert!(
        lines
            .windows(2)
            .any(|w| w[0] == w[1] && w[0].contains("dup")),
        "identical rows exist"
    );
    assert_eq!(old_rows, keyless_contents(&p.new));
    assert_identical(&p);
    let status = mirror_status(&server);
    let log = status["copy"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "\"public\".\"log\"")
        .cloned()
        .unwrap();
    assert_eq!(log["done"], true, "{status}");
    assert!(log["rows"].as_u64().unwrap() >= 303, "{status}");
    let (_, metrics) = admin_get(&server, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "cutover_copy_rows_total{table=\"\\\"public\\\".\\\"log\\\"\"}"
        ),
        log["rows"].as_f64(),
        "{metrics}"
    );

    let (code, out) = tokio::task::block_in_place(|| run_cli(&["verify", "--standalone"], &path));
    assert_eq!(code, 0, "{out}");

    // Damage new behind the stream's back: one copy of a duplicate gone, a
    // row changed, a row added.
    p.new
        .psql(
            DB,
            "DELETE FROM log WHERE ctid = (SELECT ctid FROM log WHERE note = 'dup' LIMIT 1); \
             UPDATE log SET f = 42 WHERE ctid = (SELECT ctid FROM log WHERE note IS NULL AND d IS NOT NULL LIMIT 1); \
             INSERT INTO log (note) VALUES ('only on new')",
        )
        .unwrap();
    let (code, out) = tokio::task::block_in_place(|| {
        run_cli(
            &[
                "verify",
                "--standalone",
                "--json",
                "--table",
                "log",
                "--rechecks",
                "1",
            ],
            &path,
        )
    });
    assert_eq!(code, 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out[..=out.rfind('}').unwrap()]).unwrap();
    let mut found: Vec<(String, String)> = report["tables"][0]["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_string(),
                d["key"]["row"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    found.sort();
    let kinds: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "missing_on_new",
            "missing_on_new",
            "missing_on_old",
            "missing_on_old"
        ],
        "{out}"
    );
    assert!(
        found[0].1.contains("dup") || found[1].1.contains("dup"),
        "{out}"
    );
    assert!(
        found
            .iter()
            .any(|(k, r)| k == "missing_on_old" && r.contains(",42,")),
        "{out}"
    );
    assert!(
        found
            .iter()
            .any(|(k, r)| k == "missing_on_old" && r.contains("only on new")),
        "{out}"
    );

    let (code, out) =
        tokio::task::block_in_place(|| run_cli(&["repair", "--rechecks", "1"], &path));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("repaired 4 rows"), "{out}");
    assert_eq!(keyless_contents(&p.old), keyless_contents(&p.new));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_without_a_key_need_replica_identity_full_on_both_sides() {
    let p = pair();
    p.old.psql(DB, "CREATE TABLE loose (x int)").unwrap();
    p.new.psql(DB, "CREATE TABLE loose (x int)").unwrap();
    let config = mirror_config(&p, "");
    let server = start_proxy_with(&config).await;
    post(&server, "/v1/mirror/start", None);
    let error = wait_for_failure(&server).await;
    assert!(
        error.contains("old backend")
            && error.contains("public.loose")
            && error.contains("REPLICA IDENTITY FULL"),
        "{error}"
    );
    server.shutdown().await;

    // Full on old only: after promote, new is the one published.
    p.old
        .psql(DB, "ALTER TABLE loose REPLICA IDENTITY FULL")
        .unwrap();
    let server = start_proxy_with(&config).await;
    post(&server, "/v1/mirror/start", None);
    let error = wait_for_failure(&server).await;
    assert!(
        error.starts_with("new backend") && error.contains("public.loose"),
        "{error}"
    );
    server.shutdown().await;

    p.new
        .psql(DB, "ALTER TABLE loose REPLICA IDENTITY NOTHING")
        .unwrap();
    let server = start_proxy_with(&config).await;
    post(&server, "/v1/mirror/start", None);
    let error = wait_for_failure(&server).await;
    assert!(error.contains("USING INDEX or NOTHING"), "{error}");
    server.shutdown().await;
}

/// `mirror start`'s answer for a configuration that cannot work.
async fn start_refused(config: &str) -> String {
    let server = start_proxy_with(config).await;
    let (code, body) = post(&server, "/v1/mirror/start", None);
    server.shutdown().await;
    assert_eq!(code, 409, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    doc["reason"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_precondition_names_its_fix() {
    let p = pair();
    let config = mirror_config(&p, "");
    let as_role = |cluster: &Cluster, role: &str| {
        config.replace(
            &cluster.url(SUPERUSER, SUPERUSER_PASSWORD, DB),
            &cluster.url(role, "pw", DB),
        )
    };
    for c in [&p.old, &p.new] {
        c.psql(
            DB,
            "CREATE ROLE plain LOGIN PASSWORD 'pw'; \
             CREATE ROLE replicator LOGIN REPLICATION PASSWORD 'pw'",
        )
        .unwrap();
    }

    let reason = start_refused(&as_role(&p.old, "plain")).await;
    assert!(
        reason.contains("role \"plain\" may not replicate; run ALTER ROLE \"plain\" REPLICATION"),
        "{reason}"
    );
    let reason = start_refused(&as_role(&p.old, "replicator")).await;
    assert!(
        reason.contains(&format!("old backend 127.0.0.1:{}", p.old.port()))
            && reason.contains("role \"replicator\" may not set session_replication_role")
            && reason.contains("GRANT SET ON PARAMETER session_replication_role TO \"replicator\""),
        "{reason}"
    );
    let reason = start_refused(&as_role(&p.new, "plain")).await;
    assert!(
        reason.contains(&format!("new backend 127.0.0.1:{}", p.new.port()))
            && reason.contains("role \"plain\" may not set session_replication_role"),
        "{reason}"
    );

    p.old
        .psql(DB, "CREATE TABLE shaped (id int PRIMARY KEY, a int, b int)")
        .unwrap();
    p.new
        .psql(DB, "CREATE TABLE shaped (id int PRIMARY KEY, a int)")
        .unwrap();
    let reason = start_refused(&config).await;
    assert!(
        reason.contains("table \"public\".\"shaped\" differs on the new database: column `b integer` is missing"),
        "{reason}"
    );
    p.new
        .psql(DB, "ALTER TABLE shaped ADD COLUMN b int, ADD COLUMN c int")
        .unwrap();
    let reason = start_refused(&config).await;
    assert!(
        reason.contains(
            "table \"public\".\"shaped\" differs on the new database: it has extra column `c`"
        ),
        "{reason}"
    );
    p.new.psql(DB, "ALTER TABLE shaped DROP COLUMN c").unwrap();

    // A slot of cutover's name that something else is consuming.
    p.old
        .psql(
            DB,
            "SELECT pg_create_logical_replication_slot('cutover', 'test_decoding')",
        )
        .unwrap();
    let mut consumer = std::process::Command::new(p.old.bindir().join("pg_recvlogical"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &p.old.port().to_string(),
            "-U",
            SUPERUSER,
        ])
        .args(["-d", DB, "--slot", "cutover", "--start", "-f", "/dev/null"])
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while p
        .old
        .psql(DB, "SELECT count(*) FROM pg_replication_slots WHERE active")
        .unwrap()
        .trim()
        != "1"
    {
        assert!(Instant::now() < deadline, "pg_recvlogical did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reason = start_refused(&config).await;
    let _ = consumer.kill();
    let _ = consumer.wait();
    assert!(
        reason.contains("replication slot \"cutover\" is in use by another connection (pid ")
            && reason.contains("stop whatever consumes it"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_settings_bound_what_they_say_and_progress_is_exact() {
    let p = pair();
    p.old
        .psql(
            DB,
            "INSERT INTO accounts (balance) SELECT g FROM generate_series(1, 1500) g; \
             INSERT INTO scratch SELECT g, 'v' || g FROM generate_series(1, 1000) g; \
             INSERT INTO events (account, amount) SELECT g, g FROM generate_series(1, 500) g",
        )
        .unwrap();
    let (chunk, rate, total) = (250u64, 1000u64, 3000u64);
    let config = mirror_config(&p, "").replace(
        "\n[new]",
        &format!(
            "\n[mirror]\ncopy_chunk_rows = {chunk}\ncopy_parallel_tables = 1\ncopy_max_rows_per_second = {rate}\n[new]"
        ),
    );
    let server = start_proxy_with(&config).await;
    let started = Instant::now();
    assert_eq!(post(&server, "/v1/mirror/start", None).0, 200);
    let mut samples = 0;
    loop {
        let m = mirror_status(&server);
        let copy = m["copy"].as_array().cloned().unwrap_or_default();
        let in_progress: Vec<&serde_json::Value> = copy
            .iter()
            .filter(|t| t["rows"].as_u64().unwrap() > 0 && t["done"] == false)
            .collect();
        assert!(in_progress.len() <= 1, "more than one table at a time: {m}");
        for t in &in_progress {
            assert_eq!(
                t["rows"].as_u64().unwrap() % chunk,
                0,
                "progress moves by whole chunks: {m}"
            );
        }
        samples += 1;
        if m["state"] == "streaming" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    // 3,000 rows at 1,000 rows/s: the throttle holds the copy to ~3 s
    // (the last chunk's rows are not waited for).
    let floor = Duration::from_millis((total - chunk) * 1000 / rate);
    assert!(
        elapsed >= floor,
        "copy took {elapsed:?}, throttle floor {floor:?}"
    );
    assert!(samples > 10, "the copy was watched while it ran");
    let m = mirror_status(&server);
    let metrics = admin_get(&server, "/metrics").1;
    for (table, rows) in [("accounts", 1500u64), ("scratch", 1000), ("events", 500)] {
        let name = format!("\"public\".\"{table}\"");
        let t = m["copy"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == name.as_str())
            .cloned()
            .unwrap();
        assert_eq!(
            (t["rows"].as_u64(), t["done"].as_bool()),
            (Some(rows), Some(true)),
            "{t}"
        );
        assert_eq!(
            metric(
                &metrics,
                &format!("cutover_copy_rows_total{{table=\"\\\"public\\\".\\\"{table}\\\"\"}}")
            ),
            Some(rows as f64),
            "{metrics}"
        );
    }
    drained(&server, &p.old).await;
    assert_identical(&p);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_is_on_both_sides_when_writes_race_a_throttled_copy() {
    let p = pair();
    p.old
        .psql(
            DB,
            "INSERT INTO accounts (id, balance) SELECT g, g FROM generate_series(1, 3000) g; \
             SELECT setval('accounts_id_seq', 3000)",
        )
        .unwrap();
    let config = mirror_config(&p, "").replace(
        "\n[new]",
        "\n[mirror]\ncopy_chunk_rows = 50\ncopy_max_rows_per_second = 2000\n[new]",
    );
    let server = start_proxy_with(&config).await;
    let stop = Arc::new(AtomicBool::new(false));
    // Each worker owns the ids equal to it mod 3 and records what it was
    // acknowledged: the balance it set, or that it deleted the row.
    let workers: Vec<_> = (0..3i32)
        .map(|worker| {
            let (stop, proxy) = (stop.clone(), server.proxy_addr);
            tokio::spawn(async move {
                let client = connect(proxy).await;
                let mut state: std::collections::BTreeMap<i32, Option<i32>> = (1..=3000)
                    .filter(|id| id % 3 == worker)
                    .map(|id| (id, Some(id)))
                    .collect();
                let mut n = 0i32;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = 3 * ((n * 37) % 1000) + worker;
                    let id = if id == 0 { 3 } else { id };
                    let value = 1_000_000 * (worker + 1) + n;
                    let next = match state.get(&id).copied().flatten() {
                        Some(_) if n % 5 == 0 => {
                            client
                                .execute("DELETE FROM accounts WHERE id = $1", &[&id])
                                .await
                                .unwrap();
                            None
                        }
                        Some(_) => {
                            client
                                .execute(
                                    "UPDATE accounts SET balance = $2 WHERE id = $1",
                                    &[&id, &value],
                                )
                                .await
                                .unwrap();
                            Some(value)
                        }
                        None => {
                            client
                                .execute(
                                    "INSERT INTO accounts (id, balance) VALUES ($1, $2)",
                                    &[&id, &value],
                                )
                                .await
                                .unwrap();
                            Some(value)
                        }
                    };
                    state.insert(id, next);
                }
                state
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(post(&server, "/v1/mirror/start", None).0, 200);
    assert_eq!(mirror_status(&server)["state"], "copying");
    let deadline = Instant::now() + Duration::from_secs(60);
    while mirror_status(&server)["state"] != "streaming" {
        assert!(Instant::now() < deadline, "{}", mirror_status(&server));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = std::collections::BTreeMap::new();
    for w in workers {
        acknowledged.extend(w.await.unwrap());
    }
    drained(&server, &p.old).await;
    assert_identical(&p);
    for c in [&p.old, &p.new] {
        let rows: std::collections::BTreeMap<i32, i32> = c
            .psql(
                DB,
                "SELECT id || ' ' || balance FROM accounts WHERE id <= 3000",
            )
            .unwrap()
            .lines()
            .filter_map(|l| {
                let (id, balance) = l.split_once(' ')?;
                Some((id.parse().ok()?, balance.parse().ok()?))
            })
            .collect();
        for (id, expected) in &acknowledged {
            assert_eq!(
                rows.get(id),
                expected.as_ref(),
                "id {id} on port {}",
                c.port()
            );
        }
    }
    let changed = acknowledged
        .iter()
        .filter(|(id, v)| **v != Some(**id))
        .count();
    assert!(changed > 100, "the workload changed {changed} rows");
    server.shutdown().await;
}
