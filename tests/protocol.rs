//! Protocol fidelity: through cutover, a client sees exactly what it sees
//! connected directly. Most tests run one scripted session twice, once
//! against PostgreSQL and once through cutover, and compare every message.

mod support;

use cutover_pgcluster::HostAuth;
use std::time::{Duration, Instant};
use support::fe::{self, batch};
use support::script::run_script;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_session_matches_direct_connection_message_for_message() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server = start_proxy(&cluster).await;
    let params = [
        ("application_name", "fidelity"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "Europe/Paris"),
        (
            "options",
            "-c search_path=pg_catalog,public -c statement_timeout=12345",
        ),
    ];
    let mut direct =
        RawClient::connect(direct_addr(&cluster), APP_USER, APP_PASSWORD, &params).await;
    let mut proxied = RawClient::connect(server.proxy_addr, APP_USER, APP_PASSWORD, &params).await;
    assert_eq!(proxied.login, direct.login, "ParameterStatus at login");
    assert!(proxied
        .login
        .iter()
        .any(|m| m.body == b"TimeZone\0Europe/Paris\0"));

    let want = run_script(&mut direct).await;
    let got = run_script(&mut proxied).await;
    assert_eq!(want.len(), got.len());
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(g, w, "step {i} differs");
    }
    // The startup options reached the backend session.
    let check = proxied
        .exchange(&fe::query("SHOW statement_timeout"), 1)
        .await;
    assert!(
        check
            .iter()
            .any(|m| m.tag == 'D' && m.body.ends_with(b"12345ms")),
        "{check:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_delivers_replies_without_sync() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server = start_proxy(&cluster).await;
    let mut c = RawClient::connect(server.proxy_addr, APP_USER, APP_PASSWORD, &[]).await;
    c.send(&batch(&[
        fe::parse("q", "SELECT $1::int8 AS v", &[]),
        fe::describe(b'S', "q"),
        fe::flush(),
    ]))
    .await;
    let tags: Vec<char> = [c.next().await, c.next().await, c.next().await]
        .into_iter()
        .map(|m| m.expect("reply before Sync").tag)
        .collect();
    assert_eq!(tags, vec!['1', 't', 'T']);
    let rest = c.exchange(&fe::sync(), 1).await;
    assert_eq!(rest.last().map(|m| m.body.clone()), Some(b"I".to_vec()));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_reaches_an_idle_listening_client_promptly() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server = start_proxy(&cluster).await;
    let mut listener = RawClient::connect(server.proxy_addr, APP_USER, APP_PASSWORD, &[]).await;
    listener.exchange(&fe::query("LISTEN jobs"), 1).await;
    let notifier = connect(direct_addr(&cluster)).await;
    let sent = Instant::now();
    notifier
        .batch_execute("NOTIFY jobs, 'first'; NOTIFY jobs, 'second'")
        .await
        .unwrap();
    let first = listener.next().await.expect("notification");
    let second = listener.next().await.expect("notification");
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "took {:?}",
        sent.elapsed()
    );
    assert_eq!(first.tag, 'A');
    assert_eq!(&first.body[4..], b"jobs\0first\0");
    assert_eq!(&second.body[4..], b"jobs\0second\0");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_stops_the_running_query_and_unknown_keys_do_nothing() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server = start_proxy(&cluster).await;
    let client = connect(server.proxy_addr).await;
    let token = client.cancel_token();
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    // Keys cutover never issued — one made up, one with the right pid and
    // a wrong secret — arrive while a statement runs and cancel nothing.
    let sleeping = tokio::spawn(async move {
        let row = client.query_one("SELECT pg_sleep(1)::text, 7", &[]).await;
        (client, row)
    });
    wait_backend_active(&cluster, pid).await;
    send_cancel_request(server.proxy_addr, 12345, 678).await;
    send_cancel_request(server.proxy_addr, pid, 678).await;
    let (client, row) = sleeping.await.unwrap();
    assert_eq!(row.expect("not cancelled").get::<_, i32>(1), 7);

    let started = Instant::now();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    wait_backend_active(&cluster, pid).await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send cancel");
    let err = sleeper.await.unwrap().expect_err("cancelled query fails");
    assert_eq!(sqlstate(&err), "57014");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        wait_for_metric(
            &server,
            "cutover_cancel_requests_total{result=\"forwarded\"}",
            1.0
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        wait_for_metric(
            &server,
            "cutover_cancel_requests_total{result=\"unknown_key\"}",
            2.0
        )
        .await,
        Some(2.0)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepared_statements_binary_types_and_transactions() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server = start_proxy(&cluster).await;
    let mut client = connect(server.proxy_addr).await;
    client
        .batch_execute("CREATE TABLE items (id int8 PRIMARY KEY, name text, price float8, tags text[], data bytea, ok bool)")
        .await
        .unwrap();
    let insert = client
        .prepare("INSERT INTO items VALUES ($1, $2, $3, $4, $5, $6)")
        .await
        .unwrap();
    for i in 0..50i64 {
        let tags = vec![format!("t{i}"), "all".to_string()];
        let data = vec![i as u8; (i as usize) * 10];
        client
            .execute(
                &insert,
                &[
                    &i,
                    &format!("item {i}"),
                    &(i as f64 * 1.25),
                    &tags,
                    &data,
                    &(i % 2 == 0),
                ],
            )
            .await
            .unwrap();
    }
    let tx = client.transaction().await.unwrap();
    tx.execute("DELETE FROM items WHERE id < 10", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute("UPDATE items SET price = price * 2 WHERE ok", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let rows = client
        .query(
            "SELECT id, name, price, tags, data, ok FROM items ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 50);
    for (i, row) in rows.iter().enumerate() {
        let i = i as i64;
        assert_eq!(row.get::<_, i64>(0), i);
        assert_eq!(row.get::<_, String>(1), format!("item {i}"));
        let expected = if i % 2 == 0 {
            i as f64 * 2.5
        } else {
            i as f64 * 1.25
        };
        assert_eq!(row.get::<_, f64>(2), expected);
        assert_eq!(
            row.get::<_, Vec<String>>(3),
            vec![format!("t{i}"), "all".to_string()]
        );
        assert_eq!(row.get::<_, Vec<u8>>(4).len(), i as usize * 10);
    }
    let err = client.query_one("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "22012");
    assert_eq!(
        client
            .query_one("SELECT 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
    server.shutdown().await;
}

/// psql's own output (results, errors with LINE/caret, notices, \copy) is
/// the same through cutover as direct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_script_output_is_identical_through_cutover() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server = start_proxy(&cluster).await;
    let dir = std::env::temp_dir().join(format!("cutover-psql-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("in.tsv");
    std::fs::write(&data, "1\talpha\n2\tbeta\n3\tgamma\n").unwrap();
    let script = dir.join("script.sql");
    std::fs::write(
        &script,
        format!(
            r#"
CREATE TABLE words (id int primary key, word text);
\copy words from '{data}'
SELECT * FROM words ORDER BY id;
SELECT wrod FROM words;
DO $$ BEGIN RAISE NOTICE 'notice from plpgsql'; END $$;
BEGIN;
UPDATE words SET word = upper(word) WHERE id = 2 RETURNING *;
SAVEPOINT a;
SELECT 1/0;
ROLLBACK TO a;
COMMIT;
\copy (SELECT * FROM words ORDER BY id) to stdout
SELECT current_user, current_database(), current_setting('application_name');
\d words
DROP TABLE words;
"#,
            data = data.display()
        ),
    )
    .unwrap();
    let run = |port: u16| {
        let out = std::process::Command::new(cluster.bindir().join("psql"))
            .args([
                "-X",
                "-a",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                APP_USER,
                "-d",
                DB,
            ])
            .arg("-f")
            .arg(&script)
            .env("PGPASSWORD", APP_PASSWORD)
            .env("PGAPPNAME", "psql-test")
            .output()
            .unwrap();
        format!(
            "{}\n--stderr--\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let direct = tokio::task::block_in_place(|| run(cluster.port()));
    let proxied = tokio::task::block_in_place(|| run(server.proxy_addr.port()));
    assert!(
        direct.contains("LINE 1: SELECT wrod FROM words;"),
        "{direct}"
    );
    assert!(
        direct.contains("GAMMA") || direct.contains("BETA"),
        "{direct}"
    );
    assert_eq!(proxied, direct);
    server.shutdown().await;
}
