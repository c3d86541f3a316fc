//! Real application schemas on the PostgreSQL path: foreign keys of every
//! shape, identities, enums, domains, composite types, arrays, generated
//! columns, a partitioned table and a second schema, mirrored through the
//! whole migration under an ORM-style workload; the fail-closed dial; verify
//! exact under load; and what drivers check of the session (the backend's
//! pid, NOTIFY, other databases, many clients at once).

mod support;

use cutover_pgcluster::{HostAuth, SUPERUSER, SUPERUSER_PASSWORD};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

const TOKEN: &str = "s3cret";

/// A shop: what ORMs generate, foreign keys everywhere.
const SCHEMA: &str = r#"
CREATE TYPE order_status AS ENUM ('new', 'paid', 'shipped', 'cancelled');
CREATE DOMAIN email AS text CHECK (VALUE LIKE '%@%');
CREATE TYPE money_amount AS (currency char(3), cents bigint);
CREATE TABLE users (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  email email NOT NULL UNIQUE,
  name text NOT NULL,
  manager_id bigint REFERENCES users (id) ON DELETE SET NULL,
  tags text[] NOT NULL DEFAULT '{}',
  profile jsonb NOT NULL DEFAULT '{}',
  created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE products (
  sku text PRIMARY KEY,
  title text NOT NULL,
  price numeric(10, 2) NOT NULL,
  price_with_tax numeric(12, 2) GENERATED ALWAYS AS (price * 1.2) STORED);
CREATE TABLE orders (
  id serial PRIMARY KEY,
  user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  status order_status NOT NULL DEFAULT 'new',
  total money_amount,
  placed_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX orders_open ON orders (user_id) WHERE status IN ('new', 'paid');
CREATE INDEX orders_recent ON orders (placed_at DESC);
CREATE TABLE order_items (
  order_id int REFERENCES orders (id) ON DELETE CASCADE,
  line int,
  sku text NOT NULL REFERENCES products (sku) ON UPDATE CASCADE,
  qty int NOT NULL CHECK (qty > 0),
  PRIMARY KEY (order_id, line));
CREATE SCHEMA billing;
CREATE TABLE billing.accounts (
  id int PRIMARY KEY,
  owner bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  primary_invoice int);
CREATE TABLE billing.invoices (
  id int PRIMARY KEY,
  account_id int NOT NULL REFERENCES billing.accounts (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
  amount money_amount NOT NULL);
ALTER TABLE billing.accounts ADD FOREIGN KEY (primary_invoice)
  REFERENCES billing.invoices (id) ON DELETE SET NULL DEFERRABLE INITIALLY DEFERRED;
CREATE TABLE audit_log (id bigserial, at date NOT NULL DEFAULT current_date, entry jsonb,
  PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE audit_log_old PARTITION OF audit_log FOR VALUES FROM ('2000-01-01') TO ('2026-01-01');
CREATE TABLE audit_log_new PARTITION OF audit_log FOR VALUES FROM ('2026-01-01') TO ('2100-01-01');
CREATE VIEW open_orders AS SELECT * FROM orders WHERE status IN ('new', 'paid');
GRANT ALL ON ALL TABLES IN SCHEMA public, billing TO app;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public, billing TO app;
GRANT USAGE ON SCHEMA billing TO app;
"#;

/// Every table with the key that orders its rows.
const TABLES: &[(&str, &str)] = &[
    ("users", "id"),
    ("products", "sku"),
    ("orders", "id"),
    ("order_items", "order_id, line"),
    ("billing.accounts", "id"),
    ("billing.invoices", "id"),
    ("audit_log", "id, at"),
];

const SEED: &str = r#"
INSERT INTO users (email, name, tags, profile)
  SELECT 'u' || g || '@example.com', 'user ' || g, ARRAY['t' || (g % 3)], jsonb_build_object('n', g)
  FROM generate_series(1, 1500) g;
UPDATE users SET manager_id = id - 1 WHERE id % 10 <> 1;
INSERT INTO products (sku, title, price) SELECT 'sku-' || g, 'product ' || g, g * 1.25 FROM generate_series(1, 50) g;
INSERT INTO orders (user_id, status, total)
  SELECT 1 + g % 1500, (ARRAY['new', 'paid', 'shipped']::order_status[])[1 + g % 3], ROW('EUR', g * 100)::money_amount
  FROM generate_series(1, 2000) g;
INSERT INTO order_items SELECT o, l, 'sku-' || (1 + (o + l) % 50), l FROM generate_series(1, 2000) o, generate_series(1, 2) l;
BEGIN;
INSERT INTO billing.accounts (id, owner, primary_invoice) SELECT g, g, g FROM generate_series(1, 300) g;
INSERT INTO billing.invoices SELECT g, g, ROW('USD', g)::money_amount FROM generate_series(1, 300) g;
COMMIT;
INSERT INTO audit_log (at, entry) SELECT DATE '2025-06-01' + (g % 300), jsonb_build_object('seed', g) FROM generate_series(1, 800) g;
"#;

struct Pair {
    old: cutover_pgcluster::Cluster,
    new: cutover_pgcluster::Cluster,
}

fn shop() -> Pair {
    let old = cluster(HostAuth::ScramSha256);
    let new = cluster(HostAuth::ScramSha256);
    for c in [&old, &new] {
        c.psql(DB, SCHEMA).unwrap();
    }
    old.psql(DB, SEED).unwrap();
    Pair { old, new }
}

fn config(p: &Pair, extra: &str) -> String {
    mirror_config_text(
        &p.old,
        &p.new,
        TOKEN,
        "",
        &format!("\n[cutover]\nmax_pause_ms = 8000\n{extra}"),
    )
}

fn call(
    server: &cutover::Server,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    admin_call(server, method, path, body, Some(TOKEN))
}

fn ok(server: &cutover::Server, method: &str, path: &str, body: &str) -> serde_json::Value {
    admin_ok(server, method, path, body, Some(TOKEN))
}

fn status(server: &cutover::Server) -> serde_json::Value {
    status_doc(server)
}

const CANONICAL: &str = "SET datestyle = ISO; SET timezone = 'UTC'; SET extra_float_digits = 3;";

fn assert_identical(p: &Pair, step: &str) {
    for (table, key) in TABLES {
        let sql = format!("{CANONICAL} SELECT t::text FROM {table} t ORDER BY {key}");
        let (old, new) = (p.old.psql(DB, &sql).unwrap(), p.new.psql(DB, &sql).unwrap());
        assert!(
            old == new,
            "after {step}: {table} differs ({} rows on old, {} on new)",
            old.lines().count(),
            new.lines().count()
        );
    }
}

/// Runs a verify in the daemon and returns its verdict document.
async fn daemon_verify(server: &cutover::Server) -> serde_json::Value {
    ok(server, "POST", "/v1/verify", r#"{"chunk_rows": 500}"#);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = status(server)["verify"].clone();
        if v["state"] != "running" {
            return v;
        }
        assert!(Instant::now() < deadline, "verify did not finish: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the workload had acknowledged: orders placed (and not deleted by
/// the worker itself), stale reads, errors.
#[derive(Default)]
struct Acknowledged {
    orders: Mutex<BTreeSet<i32>>,
    stale: AtomicU64,
    transactions: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// ORM-shaped clients through cutover: a user, an order and its lines in
/// one transaction; conflicting product upserts; `FOR UPDATE` then an
/// update; a billing account and invoice referencing each other (deferred
/// foreign keys); an audit entry; a user deleted with its cascade; and a
/// read of the order just placed, wherever the dial sends it.
fn workload(
    proxy: std::net::SocketAddr,
    round: i32,
    stop: Arc<AtomicBool>,
    acked: Arc<Acknowledged>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..3i32)
        .map(|worker| {
            let (stop, acked) = (stop.clone(), acked.clone());
            tokio::spawn(async move {
                let mut client = connect(proxy).await;
                let mut n = round * 100_000;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let email = format!("w{worker}-{n}@example.com");
                    let result: Result<(), tokio_postgres::Error> = async {
                        let tx = client.transaction().await?;
                        let user: i64 = tx
                            .query_one(
                                "INSERT INTO users (email, name, manager_id, tags, profile) \
                                 VALUES ($1::text, $2, (SELECT id FROM users ORDER BY id LIMIT 1), $3, $4::text::jsonb) RETURNING id",
                                &[&email, &format!("worker {worker}"), &vec![format!("w{worker}")], &format!(r#"{{"n": {n}}}"#)],
                            )
                            .await?
                            .get(0);
                        let order: i32 = tx
                            .query_one(
                                "INSERT INTO orders (user_id, total) VALUES ($1, ROW('EUR', $2::bigint)::money_amount) RETURNING id",
                                &[&user, &i64::from(n)],
                            )
                            .await?
                            .get(0);
                        for line in 1..=2i32 {
                            tx.execute(
                                "INSERT INTO order_items (order_id, line, sku, qty) VALUES ($1, $2, $3, $4)",
                                &[&order, &line, &format!("sku-{}", 1 + (n + line) % 50), &line],
                            )
                            .await?;
                        }
                        tx.commit().await?;
                        // Read-your-writes, wherever the dial sends it.
                        let seen = client
                            .query_opt("SELECT status::text FROM orders WHERE id = $1", &[&order])
                            .await?;
                        if seen.is_none() {
                            acked.stale.fetch_add(1, Ordering::Relaxed);
                        }
                        let sku = format!("sku-{}", 1 + n % 5);
                        client
                            .execute(
                                "INSERT INTO products (sku, title, price) VALUES ($1, 'upserted', $2::text::numeric) \
                                 ON CONFLICT (sku) DO UPDATE SET price = EXCLUDED.price, title = EXCLUDED.title",
                                &[&sku, &price_text(n)],
                            )
                            .await?;
                        let tx = client.transaction().await?;
                        let victim = 1 + (n * 7 + worker) % 2000;
                        tx.query_opt("SELECT id FROM orders WHERE id = $1 FOR UPDATE", &[&victim])
                            .await?;
                        tx.execute(
                            "UPDATE orders SET status = 'shipped' WHERE id = $1 AND status = 'paid'",
                            &[&victim],
                        )
                        .await?;
                        tx.commit().await?;
                        let account = 10_000 + worker * 1_000_000 + n;
                        let tx = client.transaction().await?;
                        tx.execute(
                            "INSERT INTO billing.accounts (id, owner, primary_invoice) VALUES ($1, $2, $1)",
                            &[&account, &user],
                        )
                        .await?;
                        tx.execute(
                            "INSERT INTO billing.invoices (id, account_id, amount) VALUES ($1, $1, ROW('USD', 5)::money_amount)",
                            &[&account],
                        )
                        .await?;
                        tx.commit().await?;
                        client
                            .execute(
                                "INSERT INTO audit_log (entry) VALUES ($1::text::jsonb)",
                                &[&format!(r#"{{"worker": {worker}, "n": {n}}}"#)],
                            )
                            .await?;
                        if n % 4 == 0 {
                            // The user goes, and with it orders, lines, accounts, invoices.
                            client.execute("DELETE FROM users WHERE id = $1", &[&user]).await?;
                        } else {
                            acked.orders.lock().unwrap().insert(order);
                        }
                        acked.transactions.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    .await;
                    if let Err(e) = result {
                        acked.errors.lock().unwrap().push(error_text(&e));
                    }
                }
            })
        })
        .collect()
}

/// A price as numeric text (tokio-postgres has no numeric type without a
/// feature; the cast is in the SQL, as an ORM writes it).
fn price_text(n: i32) -> String {
    format!("{}.{:02}", n % 1000, n % 100)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_schema_with_foreign_keys_mirrors_through_the_whole_migration_under_load() {
    let p = shop();
    // Someone put a row on new: cutover must not delete it silently.
    p.new
        .psql(
            DB,
            "INSERT INTO products (sku, title, price) VALUES ('hand-made', 'x', 1)",
        )
        .unwrap();
    let server = start_proxy_with(&config(
        &p,
        "[mirror]\ncopy_chunk_rows = 200\ncopy_max_rows_per_second = 3000\n",
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Acknowledged::default());
    let workers = workload(server.proxy_addr, 0, stop.clone(), acked.clone());

    let (code, doc) = call(&server, "POST", "/v1/mirror/start", "{}");
    assert_eq!(code, 409, "{doc}");
    let reason = doc["reason"].as_str().unwrap();
    assert!(
        reason.contains("\"public\".\"products\"")
            && reason.contains("did not copy")
            && reason.contains("--clear-new"),
        "{reason}"
    );
    assert_eq!(status(&server)["mirror"]["state"], "failed");
    assert_eq!(
        p.new
            .psql(DB, "SELECT count(*) FROM products")
            .unwrap()
            .trim(),
        "1",
        "nothing was deleted"
    );
    let doc = ok(
        &server,
        "POST",
        "/v1/mirror/start",
        r#"{"clear_new": true}"#,
    );
    assert_eq!(doc["started"], true, "{doc}");

    // The copy is throttled: the dial and promote wait for it.
    assert_eq!(status(&server)["mirror"]["state"], "copying");
    let (code, doc) = call(&server, "PUT", "/v1/reads", r#"{"percent": 100}"#);
    assert_eq!(code, 409, "{doc}");
    assert!(
        doc["reason"].as_str().unwrap().contains("initial copy"),
        "{doc}"
    );
    let (code, doc) = call(&server, "POST", "/v1/promote", r#"{"force": true}"#);
    assert_eq!(code, 409, "{doc}");
    assert!(
        doc["reason"].as_str().unwrap().contains("not ready"),
        "{doc}"
    );
    assert_eq!(status(&server)["read_percent"], 0);

    drained(&server, &p.old).await;
    let verify = daemon_verify(&server).await;
    assert_eq!(verify["state"], "clean", "verify under load: {verify}");

    for percent in [50, 100] {
        ok(
            &server,
            "PUT",
            "/v1/reads",
            &format!(r#"{{"percent": {percent}}}"#),
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let m = admin_get(&server, "/metrics").1;
    assert!(
        metric(&m, "cutover_reads_total{backend=\"new\"}").unwrap_or(0.0) > 0.0,
        "no read reached new:\n{m}"
    );
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    drained(&server, &p.old).await;
    assert_identical(&p, "dial 100");

    // Each swap under load, then old == new once the stream drained.
    for (round, (transition, primary)) in
        [("promote", "new"), ("rollback", "old"), ("promote", "new")]
            .into_iter()
            .enumerate()
    {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = workload(
            server.proxy_addr,
            1 + round as i32,
            stop.clone(),
            acked.clone(),
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        let doc = ok(&server, "POST", &format!("/v1/{transition}"), "{}");
        assert_eq!(doc["primary"], primary, "{doc}");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.await.unwrap();
        }
        let source = if primary == "new" { &p.new } else { &p.old };
        drained(&server, source).await;
        assert_identical(&p, &format!("{transition} to {primary} (round {round})"));
    }

    let errors = acked.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "client errors: {errors:?}");
    assert_eq!(acked.stale.load(Ordering::Relaxed), 0, "stale reads");
    assert!(
        acked.transactions.load(Ordering::Relaxed) > 20,
        "the workload ran"
    );
    // Counted, not only compared: every acknowledged order is on both sides.
    let orders = acked.orders.lock().unwrap().clone();
    let list: Vec<String> = orders.iter().map(i32::to_string).collect();
    let sql = format!(
        "SELECT count(*) FROM orders WHERE id IN ({})",
        list.join(",")
    );
    for c in [&p.old, &p.new] {
        assert_eq!(c.psql(DB, &sql).unwrap().trim(), orders.len().to_string());
    }
    // Sequences moved with the primary: on new, the primary now, every
    // identity and serial sequence is past the largest key it serves.
    for (sequence, table) in [
        ("users_id_seq", "users"),
        ("orders_id_seq", "orders"),
        ("audit_log_id_seq", "audit_log"),
    ] {
        let ahead = p
            .new
            .psql(
                DB,
                &format!("SELECT last_value >= (SELECT max(id) FROM {table}) FROM {sequence}"),
            )
            .unwrap();
        assert_eq!(ahead.trim(), "t", "{sequence} behind {table}'s keys on new");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_under_conflicting_load_reports_nothing_and_finds_a_planted_difference() {
    let p = shop();
    let server = start_proxy_with(&config(&p, "")).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Acknowledged::default());
    let workers = workload(server.proxy_addr, 0, stop.clone(), acked.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    for run in 0..3 {
        let v = daemon_verify(&server).await;
        assert_eq!(v["state"], "clean", "run {run} under load: {v}");
        assert!(v["rows_checked"].as_u64().unwrap() > 7000, "{v}");
    }
    // A change behind cutover's back, on a row the workload does not touch.
    p.new
        .psql(DB, "UPDATE users SET name = 'tampered' WHERE id = 1234")
        .unwrap();
    let v = daemon_verify(&server).await;
    assert_eq!(v["state"], "differences", "{v}");
    let found: Vec<(String, String, String)> = v["report"]["tables"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| {
            t["differences"].as_array().unwrap().iter().map(move |d| {
                (
                    t["table"].as_str().unwrap().to_string(),
                    d["kind"].as_str().unwrap().to_string(),
                    d["key"]["id"].as_str().unwrap_or("").to_string(),
                )
            })
        })
        .collect();
    assert_eq!(
        found,
        vec![(
            "\"public\".\"users\"".to_string(),
            "different".to_string(),
            "1234".to_string()
        )],
        "{v}"
    );
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let errors = acked.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "client errors: {errors:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stops_at_dial_100_sends_reads_to_old_at_once() {
    let p = shop();
    let server = start_proxy_with(&config(&p, "")).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    ok(&server, "PUT", "/v1/reads", r#"{"percent": 100}"#);
    let client = connect(server.proxy_addr).await;
    let read = "SELECT name FROM users WHERE id = 7";
    client.query_one(read, &[]).await.unwrap();
    let served_by_new = || {
        metric(
            &admin_get(&server, "/metrics").1,
            "cutover_reads_total{backend=\"new\"}",
        )
        .unwrap_or(0.0)
    };
    assert!(served_by_new() > 0.0);

    // new refuses the next applied change: the stream stops for good.
    p.new
        .psql(
            DB,
            "ALTER TABLE users ADD CONSTRAINT no_more CHECK (name <> 'renamed') NOT VALID",
        )
        .unwrap();
    client
        .execute("UPDATE users SET name = 'renamed' WHERE id = 7", &[])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&server)["mirror"]["state"] != "failed" {
        assert!(Instant::now() < deadline, "{}", status(&server));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = served_by_new();
    for _ in 0..20 {
        let name: String = client.query_one(read, &[]).await.unwrap().get(0);
        assert_eq!(
            name, "renamed",
            "a read went to the secondary that misses the change"
        );
    }
    assert_eq!(served_by_new(), before, "reads stayed off new");
    let m = admin_get(&server, "/metrics").1;
    assert!(
        metric(&m, "cutover_read_fallbacks_total{reason=\"stream_down\"}").unwrap_or(0.0) >= 20.0,
        "{m}"
    );
    assert_eq!(metric(&m, "cutover_stream_failed"), Some(1.0), "{m}");
    let error = status(&server)["mirror"]["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(error.contains("no_more"), "{error}");

    // Fixed: mirror start again resumes, and reads come back to new.
    p.new
        .psql(DB, "ALTER TABLE users DROP CONSTRAINT no_more")
        .unwrap();
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    client.query_one(read, &[]).await.unwrap();
    assert!(served_by_new() > before, "reads returned to new");
    assert_identical(&p, "the stream restarted");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_drivers_check_of_the_session_holds() {
    let c = cluster(HostAuth::ScramSha256);
    let server = start_proxy(&c).await;

    // 60 clients at once with the default pool (the server accepts 100).
    let clients = (0..60).map(|_| {
        let addr = server.proxy_addr;
        tokio::spawn(async move {
            let client = connect(addr).await;
            client.simple_query("SELECT pg_sleep(0.5)").await.unwrap();
            client
        })
    });
    let clients = futures_util::future::join_all(clients).await;
    assert_eq!(clients.iter().filter(|c| c.is_ok()).count(), 60);
    drop(clients);

    // The pid the driver is given is its backend's.
    let mut raw = RawClient::connect(server.proxy_addr, APP_USER, APP_PASSWORD, &[]).await;
    let replies = raw.exchange(&fe::query("SELECT pg_backend_pid()"), 1).await;
    let row = replies.iter().find(|m| m.tag == 'D').unwrap();
    let pid: i32 = String::from_utf8_lossy(&row.body[6..]).parse().unwrap();
    assert_eq!(raw.key.pid, pid);

    // NOTIFY's sender pid is that pid too.
    let (listener, mut connection) = tokio_postgres::connect(
        &conn_string(server.proxy_addr, APP_USER, APP_PASSWORD),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.process_id());
            }
        }
    });
    listener.batch_execute("LISTEN jobs").await.unwrap();
    raw.exchange(&fe::query("NOTIFY jobs, 'x'"), 1).await;
    let sender = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sender, pid);

    // Terminating one's own backend by that pid: 57P01, not a hang.
    let replies = raw
        .exchange(
            &fe::query(&format!("SELECT pg_terminate_backend({pid})")),
            0,
        )
        .await;
    let mut replies = replies;
    while let Some(m) = raw.next().await {
        replies.push(m);
    }
    let error = replies.iter().find(|m| m.tag == 'E').expect("an error");
    assert_eq!(error_fields(&error.body).0, "57P01");

    // Another database on the same server passes through.
    let (other, connection) = tokio_postgres::connect(
        &conn_string(server.proxy_addr, SUPERUSER, SUPERUSER_PASSWORD)
            .replace("dbname=app", "dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let db: String = other
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, "postgres");
    server.shutdown().await;

    // Unless the allow-list says otherwise.
    let server = start_proxy_with(&config_text(
        &c,
        "scram-sha-256",
        "other_databases = [\"template1\"]",
        "",
    ))
    .await;
    let refused = tokio_postgres::connect(
        &conn_string(server.proxy_addr, SUPERUSER, SUPERUSER_PASSWORD)
            .replace("dbname=app", "dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(sqlstate(&refused), "3D000");
    server.shutdown().await;
}

/// The schema as the catalog says it: columns with types, nullability,
/// defaults, identities and generated expressions; constraints; indexes;
/// replica identities; sequences; grants.
const CATALOG: &str = r#"
SELECT string_agg(x, E'\n' ORDER BY x) FROM (
  SELECT format('column %s.%s %s %s %s %s %s', c.oid::regclass, a.attname, format_type(a.atttypid, a.atttypmod),
                a.attnotnull, a.attidentity, a.attgenerated, pg_get_expr(d.adbin, d.adrelid)) AS x
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
  WHERE n.nspname IN ('public', 'billing') AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT format('constraint %s %s %s %s', conrelid::regclass, contypid::regtype, conname, pg_get_constraintdef(oid))
  FROM pg_constraint WHERE connamespace IN ('public'::regnamespace, 'billing'::regnamespace)
  UNION ALL
  SELECT format('index %s', pg_get_indexdef(i.indexrelid)) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
  WHERE c.relnamespace IN ('public'::regnamespace, 'billing'::regnamespace)
  UNION ALL
  SELECT format('table %s %s %s %s %s', c.oid::regclass, c.relkind, c.relreplident, pg_get_partkeydef(c.oid),
                pg_get_expr(c.relpartbound, c.oid))
  FROM pg_class c WHERE c.relnamespace IN ('public'::regnamespace, 'billing'::regnamespace) AND c.relkind IN ('r', 'p')
  UNION ALL
  SELECT format('sequence %s %s %s %s', s.seqrelid::regclass, format_type(s.seqtypid, NULL), s.seqincrement, s.seqcycle)
  FROM pg_sequence s
  UNION ALL
  SELECT format('type %s %s', t.oid::regtype, t.typtype) FROM pg_type t
  WHERE t.typnamespace = 'public'::regnamespace AND t.typtype IN ('e', 'd', 'c') AND t.typrelid = 0
  UNION ALL
  SELECT format('grant %s %s %s', c.oid::regclass, a.privilege_type, pg_get_userbyid(a.grantee))
  FROM pg_class c, aclexplode(c.relacl) a
  WHERE c.relnamespace IN ('public'::regnamespace, 'billing'::regnamespace) AND c.relkind IN ('r', 'p', 'S')
) s
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_start_creates_what_new_lacks_from_olds_definition() {
    let old = cluster(HostAuth::ScramSha256);
    let new = cluster(HostAuth::ScramSha256);
    old.psql(DB, SCHEMA).unwrap();
    old.psql(DB, SEED).unwrap();
    let p = Pair { old, new };
    let text = config(&p, "");
    let path = std::env::temp_dir().join(format!("cutover-schema-{}.toml", std::process::id()));
    std::fs::write(&path, &text).unwrap();

    // `schema copy --print` shows what would be made, and makes nothing.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["schema", "copy", "--print", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "CREATE TYPE public.order_status AS ENUM ('new', 'paid', 'shipped', 'cancelled');",
        "CREATE DOMAIN public.email AS text",
        "CREATE TABLE public.audit_log_new PARTITION OF public.audit_log FOR VALUES FROM ('2026-01-01') TO ('2100-01-01');",
        "GENERATED ALWAYS AS IDENTITY",
        "GENERATED ALWAYS AS ((price * 1.2)) STORED",
        "CREATE SCHEMA \"billing\";",
    ] {
        assert!(printed.contains(expected), "{expected} not in:\n{printed}");
    }
    assert_eq!(
        p.new
            .psql(DB, "SELECT count(*) FROM pg_class WHERE relname = 'users'")
            .unwrap()
            .trim(),
        "0"
    );

    let server = start_proxy_with(&text).await;
    start_mirroring(&server, &p.old, Some(TOKEN)).await;
    let (old_catalog, new_catalog) = (
        p.old.psql(DB, CATALOG).unwrap(),
        p.new.psql(DB, CATALOG).unwrap(),
    );
    let only_old: Vec<&str> = old_catalog
        .lines()
        .filter(|l| !new_catalog.lines().any(|n| n == *l))
        .collect();
    let only_new: Vec<&str> = new_catalog
        .lines()
        .filter(|l| !old_catalog.lines().any(|o| o == *l))
        .collect();
    assert!(
        only_old.is_empty() && only_new.is_empty(),
        "catalogs differ:\nonly on old:\n{}\nonly on new:\n{}",
        only_old.join("\n"),
        only_new.join("\n")
    );
    assert_identical(&p, "copy into the created schema");
    assert_eq!(daemon_verify(&server).await["state"], "clean");

    // After promote the app's own role writes on new (owner and grants came
    // along) and its identity continues past the copied rows.
    ok(&server, "PUT", "/v1/reads", r#"{"percent": 100}"#);
    ok(&server, "POST", "/v1/promote", "{}");
    let client = connect(server.proxy_addr).await;
    let id: i64 = client
        .query_one(
            "INSERT INTO users (email, name) VALUES ('after@example.com', 'after') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(id > 1500, "identity restarted past the copied rows: {id}");
    drained(&server, &p.new).await;
    assert_identical(&p, "promote onto the created schema");
    server.shutdown().await;
    let _ = std::fs::remove_file(&path);
}
