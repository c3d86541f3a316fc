//! A live SQLite migration through the daemon, as far as it goes today:
//! cutover serves the file through its engine, `mirror start` installs
//! capture, copies the file into an empty PostgreSQL while the app keeps
//! writing (through cutover and straight into the file), and streams the
//! change log; the dial moves reads to PostgreSQL with read-your-writes
//! (sync commits); after the writers stop and the stream drains, every
//! value of every table compares equal through the schema map. A daemon
//! killed mid-copy and mid-apply resumes losing nothing; promote, rollback,
//! promote and finalize under load keep every acknowledged write, write
//! PostgreSQL's changes back into the file in its conventions, report a
//! direct write to the file after promotion and deliver it at rollback.

mod support;

use cutover_pgcluster::{HostAuth, SUPERUSER, SUPERUSER_PASSWORD};
use cutover_sqlite::rusqlite::Connection;
use cutover_sqlite::SchemaMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::sqlite_app::{self, Style};
use support::*;

const TOKEN: &str = "sqlite-token";

/// Every row of the file, read through the schema map `config` gives,
/// equals PostgreSQL's value for value (convert's verify: content hashes
/// per table, key by key where one differs); fails naming what differs.
async fn assert_file_equals_postgresql(
    file: &std::path::Path,
    config: &str,
    pg: &cutover_pgcluster::Cluster,
) {
    let columns = cutover_config::Config::from_toml(config)
        .unwrap()
        .schema_columns;
    let map = SchemaMap::read_file(file, &columns, 1).unwrap();
    let control = || async {
        let (client, connection) = tokio_postgres::connect(
            &conn_string(direct_addr(pg), SUPERUSER, SUPERUSER_PASSWORD),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        client
    };
    let checks = cutover_sqlite::convert::verify(file, &map, &[control().await, control().await])
        .await
        .unwrap();
    for check in &checks {
        assert!(
            check.clean(),
            "{} differs: {:?}",
            check.table,
            check.differences
        );
    }
}

async fn wait_streaming_and_drained(server: &cutover::Server, file: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let target = {
            let conn = cutover_sqlite::open_read_only(file).unwrap();
            cutover_stream::sqlite_source::log_position(&conn).unwrap_or(0)
        };
        let m = mirror_status_at(server.admin_addr);
        if let (Some(applied), "streaming") =
            (m["applied_lsn"].as_str(), m["state"].as_str().unwrap_or(""))
        {
            if lsn(applied) >= target as u64 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the SQLite stream did not drain: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_sqlite_file_is_copied_streamed_and_read_from_postgresql() {
    let style = Style::Hand;
    let dir = std::env::temp_dir().join(format!("cutover-sqlite-migration-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("app.db");
    drop(sqlite_app::build(&file, style, 200));
    // The fixture's keyless log table cannot be captured; this app gives it
    // a key first, as the precondition says.
    {
        let conn = Connection::open(&file).unwrap();
        conn.execute_batch(
            "CREATE TABLE audit2 (id INTEGER PRIMARY KEY, \"Level\" TEXT, message TEXT, at TEXT);
             INSERT INTO audit2 (\"Level\", message, at) SELECT \"Level\", message, at FROM \"AuditLog\";
             DROP TABLE \"AuditLog\"; ALTER TABLE audit2 RENAME TO \"AuditLog\";",
        )
        .unwrap();
    }
    let pg = cluster(HostAuth::ScramSha256);
    let config = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout_ms = 1000\n\n\
         [auth]\nmethod = \"scram-sha-256\"\nusers = [{{ name = \"{APP_USER}\", password = \"{APP_PASSWORD}\" }}]\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
         [old]\nurl = \"sqlite://{}\"\n\n[new]\nurl = \"{}\"\n\n[mirror]\ncopy_chunk_rows = 100\n{}",
        file.display(),
        pg.url(SUPERUSER, SUPERUSER_PASSWORD, DB),
        style.column_settings()
    );
    let server = start_proxy_with(&config).await;

    // Writers through cutover and a neighbour writing the file directly.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..4i64 {
        let client = connect(server.proxy_addr).await;
        let (stop, written) = (stop.clone(), written.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                client
                    .execute(
                        "INSERT INTO tags (name, slug) VALUES ($1, $2)",
                        &[&format!("w{w} {i}"), &format!("w{w}-{i}")],
                    )
                    .await
                    .expect("a write through cutover");
                client
                    .execute(
                        "UPDATE posts SET views = views + 1 WHERE id = $1",
                        &[&((w * 7 + i) % 150 + 1)],
                    )
                    .await
                    .expect("an update through cutover");
                written.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let neighbour = {
        let (file, stop) = (file.clone(), stop.clone());
        std::thread::spawn(move || {
            let conn = Connection::open(&file).unwrap();
            conn.busy_timeout(Duration::from_secs(30)).unwrap();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                conn.execute(
                    "UPDATE users SET name = ?1 WHERE id = ?2",
                    cutover_sqlite::rusqlite::params![format!("cron {i}"), i % 100 + 1],
                )
                .unwrap();
                // A REPLACE that removes another row holding the slug: no
                // delete trigger fires for that row.
                conn.execute(
                    "REPLACE INTO tags (name, slug) VALUES (?1, ?2)",
                    cutover_sqlite::rusqlite::params![
                        format!("cron {i}"),
                        format!("cron-{}", i % 3)
                    ],
                )
                .unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    admin_ok(&server, "POST", "/v1/mirror/start", "{}", Some(TOKEN));
    wait_streaming_and_drained(&server, &file).await;
    let before = written.load(Ordering::Relaxed);
    assert!(before > 0, "writes went on during the copy");

    // Reads move to PostgreSQL (where the app's role is granted the
    // tables the copy created); each session reads its own writes there.
    pg.psql(
        DB,
        &format!("GRANT ALL ON ALL TABLES IN SCHEMA public TO {APP_USER}"),
    )
    .unwrap();
    admin_ok(
        &server,
        "PUT",
        "/v1/reads",
        "{\"percent\": 100}",
        Some(TOKEN),
    );
    let reader = connect(server.proxy_addr).await;
    for i in 0..20 {
        let slug = format!("ryw-{i}");
        reader
            .execute("INSERT INTO tags (name, slug) VALUES ('ryw', $1)", &[&slug])
            .await
            .unwrap();
        let n: i64 = reader
            .query_one("SELECT count(*) FROM tags WHERE slug = $1", &[&slug])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "read-your-writes at dial 100");
    }
    let (_, metrics) = admin_get(&server, "/metrics");
    let on_new = metric(&metrics, "cutover_reads_total{backend=\"new\"}").unwrap_or(0.0);
    assert!(on_new >= 20.0, "reads went to PostgreSQL ({on_new})\n");

    // Verify under the load, in ranges of 50 keys (each at its own held
    // stream position): exact, so clean; then rows changed, removed and
    // added on PostgreSQL behind cutover's back are found by key.
    let run = |path: &'static str| {
        let server = &server;
        async move {
            admin_ok(server, "POST", path, r#"{"chunk_rows": 50}"#, Some(TOKEN));
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let v = status_doc(server)["verify"].clone();
                if v["state"] != "running" {
                    return v;
                }
                assert!(Instant::now() < deadline, "{path} did not finish: {v}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let verdict = run("/v1/verify").await;
    assert_eq!(verdict["state"], "clean", "{verdict}");
    pg.psql(
        DB,
        "UPDATE tags SET name = 'tampered' WHERE id = (SELECT min(id) FROM tags);
         DELETE FROM post_tags WHERE (post_id, tag_id) = (SELECT post_id, tag_id FROM post_tags ORDER BY 1, 2 LIMIT 1);
         SET session_replication_role = replica;
         DELETE FROM users WHERE id = 150;
         INSERT INTO users (id, email, name) VALUES (987654, 'ghost@example.com', 'ghost');",
    )
    .unwrap();
    let verdict = run("/v1/verify").await;
    assert_eq!(verdict["state"], "differences", "{verdict}");
    let said = verdict.to_string();
    for expected in [
        "tampered",
        "key (150): only in SQLite",
        "key (987654): only in PostgreSQL",
    ] {
        assert!(said.contains(expected), "{expected}: {verdict}");
    }
    // Repair writes the differing keys again from the snapshot each range
    // was read at, under the load, and verify is clean after it.
    let repaired = run("/v1/repair").await;
    assert_eq!(repaired["state"], "clean", "{repaired}");
    let mut fixed: Vec<(String, u64)> = repaired["report"]["tables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["repaired_rows"].as_u64() > Some(0))
        .map(|t| {
            (
                t["table"].as_str().unwrap().to_string(),
                t["repaired_rows"].as_u64().unwrap(),
            )
        })
        .collect();
    fixed.sort();
    let expected = [("post_tags", 1), ("tags", 1), ("users", 2)].map(|(t, n)| (t.to_string(), n));
    assert_eq!(
        fixed, expected,
        "only the differing keys are written: {repaired}"
    );
    let verdict = run("/v1/verify").await;
    assert_eq!(verdict["state"], "clean", "{verdict}");
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    neighbour.join().unwrap();
    wait_streaming_and_drained(&server, &file).await;
    assert_file_equals_postgresql(&file, &config, &pg).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_copy_and_mid_apply_loses_nothing() {
    let style = Style::Hand;
    let dir = std::env::temp_dir().join(format!("cutover-sqlite-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("app.db");
    drop(sqlite_app::build(&file, style, 1500));
    {
        let conn = Connection::open(&file).unwrap();
        conn.execute_batch(
            "CREATE TABLE audit2 (id INTEGER PRIMARY KEY, \"Level\" TEXT, message TEXT, at TEXT);
             INSERT INTO audit2 (\"Level\", message, at) SELECT \"Level\", message, at FROM \"AuditLog\";
             DROP TABLE \"AuditLog\"; ALTER TABLE audit2 RENAME TO \"AuditLog\";",
        )
        .unwrap();
    }
    let pg = cluster(HostAuth::ScramSha256);
    let (proxy, admin) = (free_addr(), free_addr());
    let config = format!(
        "[proxy]\nlisten = \"{proxy}\"\nshutdown_timeout_ms = 1000\n\n\
         [auth]\nmethod = \"scram-sha-256\"\nusers = [{{ name = \"{APP_USER}\", password = \"{APP_PASSWORD}\" }}]\n\n\
         [admin]\nlisten = \"{admin}\"\ntoken = \"{TOKEN}\"\n\n\
         [cutover]\nstate_file = \"{}\"\n\n\
         [old]\nurl = \"sqlite://{}\"\n\n[new]\nurl = \"{}\"\n\n\
         [mirror]\ncopy_chunk_rows = 20\nsync = false\n{}",
        dir.join("state.json").display(),
        file.display(),
        pg.url(SUPERUSER, SUPERUSER_PASSWORD, DB),
        style.column_settings()
    );
    let config_path = dir.join("cutover.toml");
    std::fs::write(&config_path, &config).unwrap();

    // Writers that reconnect when cutover goes away, counting what was
    // acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..3 {
        let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let Ok(client) = connect_as(proxy, APP_USER, APP_PASSWORD).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let slug = format!("k{w}-{i}");
                    match client
                        .execute(
                            "INSERT INTO tags (name, slug) VALUES ('kill', $1)",
                            &[&slug],
                        )
                        .await
                    {
                        Ok(_) => acknowledged.lock().unwrap().push(slug),
                        Err(_) => break,
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            }
        }));
    }

    let daemon = spawn_daemon(&config_path, admin);
    let status = |path: &str| {
        cutover::cli_http::request(&format!("http://{admin}"), "GET", path, None, None)
            .map(|r| serde_json::from_str::<serde_json::Value>(&r.body).unwrap_or_default())
            .unwrap_or_default()
    };
    let start = cutover::cli_http::request(
        &format!("http://{admin}"),
        "POST",
        "/v1/mirror/start",
        Some("{}"),
        Some(TOKEN),
    )
    .unwrap();
    assert_eq!(start.status, 200, "{}", start.body);
    // Killed while the copy has done some tables and not others.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status("/v1/status");
        let copy = &s["mirror"]["copy"];
        let done = copy
            .as_array()
            .map(|c| c.iter().filter(|t| t["done"] == true).count())
            .unwrap_or(0);
        if done >= 1 || s["mirror"]["state"] == "streaming" {
            break;
        }
        assert!(Instant::now() < deadline, "the copy never progressed: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(daemon);
    let daemon = spawn_daemon(&config_path, admin);
    // Killed again while streaming.
    let deadline = Instant::now() + Duration::from_secs(120);
    while status("/v1/status")["mirror"]["state"] != "streaming" {
        assert!(
            Instant::now() < deadline,
            "no stream after the restart: {}",
            status("/v1/status")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(daemon);
    let _daemon = spawn_daemon(&config_path, admin);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let target = {
            let conn = cutover_sqlite::open_read_only(&file).unwrap();
            cutover_stream::sqlite_source::log_position(&conn).unwrap_or(0)
        };
        let m = status("/v1/status")["mirror"].clone();
        let applied = m["applied_lsn"].as_str().map(lsn).unwrap_or(0);
        if m["state"] == "streaming" && applied >= target as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stream did not drain after the restarts: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 20,
        "writes went on ({})",
        acknowledged.len()
    );
    let on_new: i64 = pg
        .psql(DB, "SELECT count(*) FROM tags WHERE name = 'kill'")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        on_new as usize >= acknowledged.len(),
        "every acknowledged write reached PostgreSQL"
    );
    assert_file_equals_postgresql(&file, &config, &pg).await;

    // With async commits (`sync = false`) the dial still gives each
    // session its own writes: a read right after the session's commit,
    // before the stream passed it, is served by the file (a
    // `behind_session` fallback); once the stream passed it, reads go to
    // PostgreSQL.
    pg.psql(
        DB,
        &format!("GRANT ALL ON ALL TABLES IN SCHEMA public TO {APP_USER}"),
    )
    .unwrap();
    let dial = cutover::cli_http::request(
        &format!("http://{admin}"),
        "PUT",
        "/v1/reads",
        Some("{\"percent\": 100}"),
        Some(TOKEN),
    )
    .unwrap();
    assert_eq!(dial.status, 200, "{}", dial.body);
    let reads_on_new = || {
        let metrics =
            cutover::cli_http::request(&format!("http://{admin}"), "GET", "/metrics", None, None)
                .unwrap()
                .body;
        metric(&metrics, "cutover_reads_total{backend=\"new\"}").unwrap_or(0.0)
    };
    let client = connect_as(proxy, APP_USER, APP_PASSWORD).await.unwrap();
    for i in 0..30 {
        let slug = format!("async-ryw-{i}");
        client
            .execute("INSERT INTO tags (name, slug) VALUES ('ryw', $1)", &[&slug])
            .await
            .unwrap();
        let name: String = client
            .query_one("SELECT name FROM tags WHERE slug = $1", &[&slug])
            .await
            .expect("the session reads its own write")
            .get(0);
        assert_eq!(name, "ryw");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = reads_on_new();
    for i in 0..10 {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM tags WHERE slug = $1",
                &[&format!("async-ryw-{i}")],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
    }
    let on_new = reads_on_new() - before;
    assert!(
        on_new >= 10.0,
        "reads after the stream passed the session's writes go to PostgreSQL ({on_new})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promote_rollback_promote_finalize_under_load_lose_nothing() {
    for style in [Style::Hand, Style::Drizzle, Style::Prisma] {
        walk(style).await;
    }
}

/// The tables each fixture style leaves without a usable key, given one as
/// capture's precondition asks.
fn give_keys(file: &std::path::Path, style: Style) {
    let conn = Connection::open(file).unwrap();
    conn.execute_batch(
        "CREATE TABLE audit2 (id INTEGER PRIMARY KEY, \"Level\" TEXT, message TEXT, at TEXT);
         INSERT INTO audit2 (\"Level\", message, at) SELECT \"Level\", message, at FROM \"AuditLog\";
         DROP TABLE \"AuditLog\"; ALTER TABLE audit2 RENAME TO \"AuditLog\";",
    )
    .unwrap();
    if style == Style::Drizzle {
        conn.execute_batch("UPDATE __drizzle_migrations SET id = rowid")
            .unwrap();
    }
}

async fn walk(style: Style) {
    let dir = std::env::temp_dir().join(format!(
        "cutover-sqlite-promote-{}-{}",
        std::process::id(),
        style.name()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("app.db");
    drop(sqlite_app::build(&file, style, 100));
    give_keys(&file, style);
    let pg = cluster(HostAuth::ScramSha256);
    let config = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout_ms = 1000\n\n\
         [auth]\nmethod = \"scram-sha-256\"\nusers = [{{ name = \"{APP_USER}\", password = \"{APP_PASSWORD}\" }}]\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
         [old]\nurl = \"sqlite://{}\"\n\n[new]\nurl = \"{}\"\n{}",
        file.display(),
        pg.url(SUPERUSER, SUPERUSER_PASSWORD, DB),
        style.column_settings()
    );
    let server = start_proxy_with(&config).await;
    admin_ok(&server, "POST", "/v1/mirror/start", "{}", Some(TOKEN));
    wait_streaming_and_drained(&server, &file).await;
    pg.psql(DB, &format!("GRANT ALL ON ALL TABLES IN SCHEMA public TO {APP_USER}; GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {APP_USER}"))
        .unwrap();

    // Writers through cutover all along, each write acknowledged counted.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..3 {
        let client = connect(server.proxy_addr).await;
        let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let slug = format!("p{w}-{i}");
                client
                    .execute("INSERT INTO tags (name, slug) VALUES ('swap', $1)", &[&slug])
                    .await
                    .expect("no write fails across promote and rollback");
                client
                    .execute(
                        &format!(
                            "UPDATE \"{}\" SET is_admin = NOT is_admin, created_at = now() WHERE id = $1",
                            style.users()
                        ),
                        &[&((i % 50 + 1) as i64)],
                    )
                    .await
                    .expect("no update fails across promote and rollback");
                acknowledged.lock().unwrap().push(slug);
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Verify under the load (clean), then promote (--force: under
    // continuous writes the stream is rarely at lag 0 at the instant
    // promote checks): PostgreSQL is the primary, the file follows it.
    admin_ok(&server, "POST", "/v1/verify", "{}", Some(TOKEN));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = status_doc(&server)["verify"].clone();
        if v["state"] != "running" {
            assert_eq!(v["state"], "clean", "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "verify did not finish: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promoted = admin_ok(
        &server,
        "POST",
        "/v1/promote",
        "{\"force\": true}",
        Some(TOKEN),
    );
    assert_eq!(promoted["primary"], "new", "{promoted}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    drained(&server, &pg).await;
    let latest = acknowledged.lock().unwrap().last().cloned().unwrap();
    let in_file: i64 = Connection::open(&file)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM tags WHERE slug = ?1",
            [&latest],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(in_file, 1, "a write made on PostgreSQL reached the file");

    // Someone writes the file directly after promotion: reported, kept.
    // (With a key PostgreSQL has not given out: one that collides with a
    // row written on PostgreSQL would overwrite it at rollback — README
    // names this.)
    Connection::open(&file)
        .unwrap()
        .execute(
            "INSERT INTO tags (id, name, slug) VALUES (900000, 'direct', 'written-directly')",
            [],
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = mirror_status_at(server.admin_addr);
        if m["error"]
            .as_str()
            .is_some_and(|e| e.contains("written directly"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the direct write was not reported: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Rollback: the file is the primary again, and PostgreSQL gets the
    // direct write too.
    let rolled = admin_ok(&server, "POST", "/v1/rollback", "{}", Some(TOKEN));
    assert_eq!(rolled["primary"], "old", "{rolled}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    wait_streaming_and_drained(&server, &file).await;
    assert_eq!(
        pg.psql(
            DB,
            "SELECT count(*) FROM tags WHERE slug = 'written-directly'"
        )
        .unwrap(),
        "1",
        "the direct write reached PostgreSQL at rollback"
    );

    // Promote again, stop the writers, let the file catch up, finalize.
    admin_ok(
        &server,
        "POST",
        "/v1/promote",
        "{\"force\": true}",
        Some(TOKEN),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    drained(&server, &pg).await;
    let acknowledged = acknowledged.lock().unwrap().clone();
    let on_new: i64 = pg
        .psql(DB, "SELECT count(*) FROM tags WHERE name = 'swap'")
        .unwrap()
        .parse()
        .unwrap();
    if on_new as usize != acknowledged.len() {
        let present = pg
            .psql(
                DB,
                "SELECT string_agg(slug, ',') FROM tags WHERE name = 'swap'",
            )
            .unwrap();
        let present: std::collections::HashSet<&str> = present.split(',').collect();
        let missing: Vec<&String> = acknowledged
            .iter()
            .filter(|s| !present.contains(s.as_str()))
            .collect();
        let conn = Connection::open(&file).unwrap();
        let in_file: Vec<String> = missing
            .iter()
            .map(|m| {
                conn.query_row(
                    "SELECT id || ' ' || name FROM tags WHERE slug = ?1",
                    [m],
                    |r| r.get::<_, String>(0),
                )
                .unwrap_or_else(|_| "absent".to_string())
            })
            .collect();
        panic!(
            "acknowledged inserts missing on PostgreSQL: {missing:?} ({on_new} of {}); in the file: {in_file:?}",
            acknowledged.len()
        );
    }
    assert_file_equals_postgresql(&file, &config, &pg).await;
    let finalized = admin_ok(&server, "POST", "/v1/finalize", "{}", Some(TOKEN));
    assert!(
        finalized["dropped"].to_string().contains("old:capture"),
        "{finalized}"
    );
    let leftovers: i64 = Connection::open(&file)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name LIKE '\\_cutover\\_%' ESCAPE '\\'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(leftovers, 0, "capture is gone from the file");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgresql_stopped_and_restarted_under_load_catches_up() {
    let style = Style::Hand;
    let dir = std::env::temp_dir().join(format!("cutover-sqlite-pgdown-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("app.db");
    drop(sqlite_app::build(&file, style, 100));
    {
        let conn = Connection::open(&file).unwrap();
        conn.execute_batch(
            "CREATE TABLE audit2 (id INTEGER PRIMARY KEY, \"Level\" TEXT, message TEXT, at TEXT);
             INSERT INTO audit2 (\"Level\", message, at) SELECT \"Level\", message, at FROM \"AuditLog\";
             DROP TABLE \"AuditLog\"; ALTER TABLE audit2 RENAME TO \"AuditLog\";",
        )
        .unwrap();
    }
    let pg = cluster(HostAuth::ScramSha256);
    let config = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout_ms = 1000\n\n\
         [auth]\nmethod = \"scram-sha-256\"\nusers = [{{ name = \"{APP_USER}\", password = \"{APP_PASSWORD}\" }}]\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
         [old]\nurl = \"sqlite://{}\"\n\n[new]\nurl = \"{}\"\n\n[mirror]\nsync_timeout_ms = 200\n{}",
        file.display(),
        pg.url(SUPERUSER, SUPERUSER_PASSWORD, DB),
        style.column_settings()
    );
    let server = start_proxy_with(&config).await;
    admin_ok(&server, "POST", "/v1/mirror/start", "{}", Some(TOKEN));
    wait_streaming_and_drained(&server, &file).await;

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let client = connect(server.proxy_addr).await;
        let (stop, written) = (stop.clone(), written.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                client
                    .execute(
                        "INSERT INTO tags (name, slug) VALUES ('down', $1)",
                        &[&format!("d-{i}")],
                    )
                    .await
                    .expect("writes to the SQLite primary go on while new is down");
                written.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Stopped cleanly, then crashed (`-m immediate`: passes committed
    // but not yet flushed there are taken back, and applied again).
    for crash in [false, true] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if crash {
            pg.kill().unwrap();
        } else {
            pg.stop().unwrap();
        }
        let before = written.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            written.load(Ordering::Relaxed) > before,
            "writes went on with new down"
        );
        pg.restart().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    wait_streaming_and_drained(&server, &file).await;
    let on_new: u64 = pg
        .psql(DB, "SELECT count(*) FROM tags WHERE name = 'down'")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        on_new,
        written.load(Ordering::Relaxed),
        "every write reached new after its restart"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_in_each_phase_after_promote_loses_nothing() {
    let style = Style::Prisma;
    let dir = std::env::temp_dir().join(format!(
        "cutover-sqlite-kill-promoted-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("app.db");
    drop(sqlite_app::build(&file, style, 100));
    give_keys(&file, style);
    let pg = cluster(HostAuth::ScramSha256);
    let (proxy, admin) = (free_addr(), free_addr());
    let config = format!(
        "[proxy]\nlisten = \"{proxy}\"\nshutdown_timeout_ms = 1000\n\n\
         [auth]\nmethod = \"scram-sha-256\"\nusers = [{{ name = \"{APP_USER}\", password = \"{APP_PASSWORD}\" }}]\n\n\
         [admin]\nlisten = \"{admin}\"\ntoken = \"{TOKEN}\"\n\n\
         [cutover]\nstate_file = \"{}\"\n\n\
         [old]\nurl = \"sqlite://{}\"\n\n[new]\nurl = \"{}\"\n{}",
        dir.join("state.json").display(),
        file.display(),
        pg.url(SUPERUSER, SUPERUSER_PASSWORD, DB),
        style.column_settings()
    );
    let config_path = dir.join("cutover.toml");
    std::fs::write(&config_path, &config).unwrap();
    let call = |method: &str, path: &str, body: Option<&str>| {
        cutover::cli_http::request(&format!("http://{admin}"), method, path, body, Some(TOKEN))
            .map(|r| {
                (
                    r.status,
                    serde_json::from_str::<serde_json::Value>(&r.body).unwrap_or_default(),
                )
            })
            .unwrap_or((0, serde_json::Value::Null))
    };
    let daemon = spawn_daemon(&config_path, admin);
    assert_eq!(call("POST", "/v1/mirror/start", Some("{}")).0, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    while call("GET", "/v1/status", None).1["mirror"]["state"] != "streaming" {
        assert!(Instant::now() < deadline, "no stream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pg.psql(DB, &format!("GRANT ALL ON ALL TABLES IN SCHEMA public TO {APP_USER}; GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {APP_USER}"))
        .unwrap();
    let (code, body) = call("POST", "/v1/promote", Some("{\"force\": true}"));
    assert_eq!(code, 200, "{body}");

    // Writers on PostgreSQL now; the file follows through the reverse stream.
    let (stop, acknowledged, writers) = tag_writers(proxy, "r");
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(daemon);
    let daemon = spawn_daemon(&config_path, admin);
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let status = call("GET", "/v1/status", None).1;
    assert_eq!(status["phase"], "promoted", "{status}");
    // The file catches up with everything PostgreSQL has.
    let target = lsn(&pg.psql(DB, "SELECT pg_current_wal_lsn()").unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = call("GET", "/v1/status", None).1["mirror"].clone();
        if m["caught_up_lsn"].as_str().map(lsn).unwrap_or(0) >= target && m["state"] == "streaming"
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reverse stream did not catch up after the restart: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 20,
        "writes went on ({})",
        acknowledged.len()
    );
    let conn = Connection::open(&file).unwrap();
    for slug in &acknowledged {
        let n: i64 = conn
            .query_row("SELECT count(*) FROM tags WHERE slug = ?1", [slug], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 1, "acknowledged write {slug} is in the file once");
    }
    assert_file_equals_postgresql(&file, &config, &pg).await;

    // Rolled back: the file is the primary again; SIGKILL under the writes
    // and the forward stream resumes; PostgreSQL gets every acknowledged
    // write once.
    let (stop, acknowledged, writers) = tag_writers(proxy, "b");
    let (code, body) = call("POST", "/v1/rollback", Some("{}"));
    assert_eq!(code, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(daemon);
    let daemon = spawn_daemon(&config_path, admin);
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let status = call("GET", "/v1/status", None).1;
    assert_eq!(status["primary"], "old", "{status}");
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 20,
        "writes went on ({})",
        acknowledged.len()
    );
    // (A write the SIGKILL cut off after its commit is in the file without
    // its acknowledgement: it must reach PostgreSQL too.)
    let conn = Connection::open(&file).unwrap();
    let in_file: std::collections::BTreeSet<String> = conn
        .prepare("SELECT slug FROM tags WHERE slug LIKE 'b%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for slug in &acknowledged {
        assert!(
            in_file.contains(slug),
            "acknowledged write {slug} is in the file"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let on_new: std::collections::BTreeSet<String> = pg
            .psql(
                DB,
                "SELECT string_agg(slug, ',') FROM tags WHERE slug LIKE 'b%'",
            )
            .unwrap()
            .split(',')
            .map(str::to_string)
            .collect();
        if on_new == in_file {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "PostgreSQL holds {} of the file's {} writes after the restart",
            on_new.len(),
            in_file.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_file_equals_postgresql(&file, &config, &pg).await;

    // Promoted again and finalized; a restart keeps the finalized phase,
    // writes go to PostgreSQL and the file holds no capture.
    let (code, body) = call("POST", "/v1/promote", Some("{\"force\": true}"));
    assert_eq!(code, 200, "{body}");
    let (code, body) = call("POST", "/v1/finalize", Some("{}"));
    assert_eq!(code, 200, "{body}");
    drop(daemon);
    let _daemon = spawn_daemon(&config_path, admin);
    let status = call("GET", "/v1/status", None).1;
    assert_eq!(status["phase"], "finalized", "{status}");
    let client = connect_as(proxy, APP_USER, APP_PASSWORD).await.unwrap();
    client
        .execute(
            "INSERT INTO tags (name, slug) VALUES ('after', 'after-finalize')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        pg.psql(
            DB,
            "SELECT count(*) FROM tags WHERE slug = 'after-finalize'"
        )
        .unwrap(),
        "1"
    );
    let capture: i64 = Connection::open(&file)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name LIKE '\\_cutover\\_%' ESCAPE '\\'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(capture, 0, "capture removed from the file");
}

/// Two writers inserting tags with slugs `{prefix}{w}-{i}` through cutover
/// (reconnecting across restarts): their stop flag, the acknowledged
/// slugs, and the tasks.
#[allow(clippy::type_complexity)]
fn tag_writers(
    proxy: std::net::SocketAddr,
    prefix: &'static str,
) -> (
    Arc<AtomicBool>,
    Arc<std::sync::Mutex<Vec<String>>>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..2 {
        let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let Ok(client) = connect_as(proxy, APP_USER, APP_PASSWORD).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let slug = format!("{prefix}{w}-{i}");
                    match client
                        .execute("INSERT INTO tags (name, slug) VALUES ('rev', $1)", &[&slug])
                        .await
                    {
                        Ok(_) => acknowledged.lock().unwrap().push(slug),
                        Err(_) => break,
                    }
                    tokio::time::sleep(Duration::from_millis(4)).await;
                }
            }
        }));
    }
    (stop, acknowledged, writers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_keeps_to_its_rate_and_shows_progress() {
    let style = Style::Hand;
    let dir = std::env::temp_dir().join(format!("cutover-sqlite-throttle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("app.db");
    drop(sqlite_app::build(&file, style, 40));
    give_keys(&file, style);
    let rows: u64 = {
        let map = SchemaMap::read_file(&file, &[], 1).unwrap();
        map.tables.iter().map(|t| t.rows()).sum()
    };
    let pg = cluster(HostAuth::ScramSha256);
    let rate = 400;
    let config = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\n\
         [auth]\nmethod = \"scram-sha-256\"\nusers = [{{ name = \"{APP_USER}\", password = \"{APP_PASSWORD}\" }}]\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
         [old]\nurl = \"sqlite://{}\"\n\n[new]\nurl = \"{}\"\n\n\
         [mirror]\ncopy_chunk_rows = 20\ncopy_max_rows_per_second = {rate}\n",
        file.display(),
        pg.url(SUPERUSER, SUPERUSER_PASSWORD, DB),
    );
    let server = start_proxy_with(&config).await;
    let started = Instant::now();
    // The CLI follows the copy to the stream with its progress bar.
    let cli = {
        let admin = format!("http://{}", server.admin_addr);
        std::thread::spawn(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
                .args([
                    "mirror", "start", "--wait", "--admin", &admin, "--token", TOKEN,
                ])
                .output()
                .unwrap()
        })
    };
    let mut saw_partial = false;
    loop {
        let m = mirror_status_at(server.admin_addr);
        if m["state"] == "streaming" {
            break;
        }
        let copied: u64 = m["copy"]
            .as_array()
            .map(|c| c.iter().map(|t| t["rows"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0);
        saw_partial |= copied > 0 && copied < rows;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "copy never finished: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed().as_secs_f64();
    let least = rows as f64 / rate as f64 * 0.8;
    assert!(
        took >= least,
        "{rows} rows at {rate}/s took {took:.2} s (at least {least:.2} s)"
    );
    assert!(saw_partial, "status showed the copy's progress");
    let out = cli.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("the change stream runs"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    server.shutdown().await;
}
