//! Sessions and pools: every client auth method, every backend auth method,
//! wrong passwords, pooled sessions reset between clients, pool exhaustion,
//! many concurrent clients, and backends that die or are down.

mod support;

use cutover_pgcluster::HostAuth;
use std::time::Duration;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_methods_accept_right_and_refuse_wrong_passwords() {
    let cluster = cluster(HostAuth::ScramSha256);
    for (method, request) in [("scram-sha-256", 10), ("md5", 5), ("trust", 0)] {
        let server = start_proxy_with(&config_text(&cluster, method, "", "")).await;
        // The authentication request cutover sends first: SASL, MD5, or
        // straight to AuthenticationOk.
        let mut stream = raw_startup(
            server.proxy_addr,
            196_608,
            &[("user", APP_USER), ("database", DB)],
        )
        .await;
        let mut head = [0u8; 9];
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut head)
            .await
            .unwrap();
        assert_eq!(head[0], b'R', "{method}");
        assert_eq!(
            i32::from_be_bytes([head[5], head[6], head[7], head[8]]),
            request,
            "{method}"
        );
        drop(stream);
        let client = connect_as(server.proxy_addr, APP_USER, APP_PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), APP_USER, "{method}");
        if method != "trust" {
            let err = connect_as(server.proxy_addr, APP_USER, "wrong")
                .await
                .unwrap_err();
            assert_eq!(sqlstate(&err), "28P01", "{method}: {}", error_text(&err));
            let err = connect_as(server.proxy_addr, "nobody", "x")
                .await
                .unwrap_err();
            assert_eq!(sqlstate(&err), "28P01", "{method}: {}", error_text(&err));
            let (_, metrics) = admin_get(&server, "/metrics");
            assert_eq!(
                metric(
                    &metrics,
                    "cutover_auth_failures_total{reason=\"wrong_password\"}"
                ),
                Some(2.0),
                "{method}"
            );
        }
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_login_works_with_each_method_the_server_asks_for() {
    for auth in [
        HostAuth::ScramSha256,
        HostAuth::Md5,
        HostAuth::Password,
        HostAuth::Trust,
    ] {
        let cluster = cluster(auth);
        let server = start_proxy(&cluster).await;
        let client = connect(server.proxy_addr).await;
        let row = client
            .query_one("SELECT current_user::text, 40 + 2", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), APP_USER, "{auth:?}");
        assert_eq!(row.get::<_, i32>(1), 42, "{auth:?}");
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refusing_the_login_reports_its_own_error() {
    let cluster = cluster(HostAuth::ScramSha256);
    cluster
        .psql(
            "postgres",
            "ALTER ROLE app PASSWORD 'changed-behind-our-back'",
        )
        .unwrap();
    let server = start_proxy(&cluster).await;
    let err = connect_as(server.proxy_addr, APP_USER, APP_PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "28P01");
    assert!(
        error_text(&err).contains("password authentication failed"),
        "{}",
        error_text(&err)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_database_gets_3d000() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server = start_proxy(&cluster).await;
    let url = format!(
        "host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname=elsewhere",
        server.proxy_addr.port()
    );
    let err = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(sqlstate(&err), "3D000");
    assert!(
        error_text(&err).contains("database \"elsewhere\" does not exist"),
        "{}",
        error_text(&err)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_session_is_reset_before_the_next_client_gets_it() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server =
        start_proxy_with(&config_text(&cluster, "scram-sha-256", "", "pool_size = 1")).await;
    cluster
        .psql(
            DB,
            "CREATE TABLE ledger (id int); GRANT ALL ON ledger TO app",
        )
        .unwrap();

    let first = connect(server.proxy_addr).await;
    let pid: i32 = first
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    first
        .batch_execute(
            "SET application_name = 'dirty'; CREATE TEMP TABLE scratch (x int); \
             PREPARE leftover AS SELECT 1; LISTEN somewhere; \
             BEGIN; INSERT INTO ledger VALUES (1);",
        )
        .await
        .unwrap();
    drop(first); // leaves inside an open transaction

    // The only pooled session comes back rolled back and reset.
    let mut second = None;
    for _ in 0..50 {
        let c = connect(server.proxy_addr).await;
        let p: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        if p == pid {
            second = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = second.expect("the pooled backend session is reused");
    let row = second
        .query_one(
            "SELECT current_setting('application_name'), \
                    (SELECT count(*) FROM pg_prepared_statements WHERE name = 'leftover'), \
                    to_regclass('pg_temp.scratch') IS NULL, \
                    (SELECT count(*) FROM pg_listening_channels()), \
                    (SELECT count(*) FROM ledger)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "");
    assert_eq!(row.get::<_, i64>(1), 0);
    assert!(row.get::<_, bool>(2));
    assert_eq!(row.get::<_, i64>(3), 0);
    assert_eq!(
        row.get::<_, i64>(4),
        0,
        "the abandoned transaction was rolled back"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_makes_clients_wait_then_fail_with_53300() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server = start_proxy_with(&config_text(
        &cluster,
        "scram-sha-256",
        "pool_timeout_ms = 700",
        "pool_size = 2",
    ))
    .await;
    let a = connect(server.proxy_addr).await;
    let b = connect(server.proxy_addr).await;
    a.simple_query("SELECT 1").await.unwrap();
    b.simple_query("SELECT 1").await.unwrap();

    let started = std::time::Instant::now();
    let err = connect_as(server.proxy_addr, APP_USER, APP_PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "53300");
    assert!(
        error_text(&err).contains("old.pool_size"),
        "{}",
        error_text(&err)
    );
    assert!(started.elapsed() >= Duration::from_millis(600));

    // A waiting client gets the session as soon as one is returned.
    let waiter = tokio::spawn({
        let addr = server.proxy_addr;
        async move { connect_as(addr, APP_USER, APP_PASSWORD).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = admin_get(&server, "/v1/status");
        assert_eq!(status, 200);
        if body.contains("\"waiting\":1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no client waiting: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(a);
    let c = waiter
        .await
        .unwrap()
        .expect("waiter gets the freed session");
    c.simple_query("SELECT 1").await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_clients_run_transactions_without_loss() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server = start_proxy_with(&config_text(
        &cluster,
        "scram-sha-256",
        // 200 SCRAM logins at once on a loaded 2-core machine take a while.
        "connect_timeout_ms = 120000",
        "pool_size = 220",
    ))
    .await;
    cluster
        .psql(
            DB,
            "CREATE TABLE counter (id int PRIMARY KEY, n int); INSERT INTO counter VALUES (1, 0); \
             CREATE TABLE events (client int, seq int, PRIMARY KEY (client, seq)); \
             GRANT ALL ON counter, events TO app",
        )
        .unwrap();
    let mut tasks = Vec::new();
    for client_id in 0..200 {
        let addr = server.proxy_addr;
        tasks.push(tokio::spawn(async move {
            let mut client = connect(addr).await;
            for seq in 0..5 {
                let tx = client.transaction().await.unwrap();
                tx.execute("UPDATE counter SET n = n + 1 WHERE id = 1", &[])
                    .await
                    .unwrap();
                tx.execute("INSERT INTO events VALUES ($1, $2)", &[&client_id, &seq])
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(cluster.psql(DB, "SELECT n FROM counter").unwrap(), "1000");
    assert_eq!(
        cluster
            .psql(DB, "SELECT count(DISTINCT (client, seq)) FROM events")
            .unwrap(),
        "1000"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_query_gives_the_client_an_error_and_cutover_carries_on() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server = start_proxy(&cluster).await;

    // One backend session terminated under a running query.
    let victim = connect(server.proxy_addr).await;
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let running = tokio::spawn(async move { victim.simple_query("SELECT pg_sleep(30)").await });
    wait_backend_active(&cluster, pid).await;
    cluster
        .psql("postgres", &format!("SELECT pg_terminate_backend({pid})"))
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("no hang")
        .unwrap()
        .expect_err("terminated query fails");
    assert!(
        error_text(&err).contains("terminating connection"),
        "{}",
        error_text(&err)
    );
    let bystander = connect(server.proxy_addr).await;
    bystander.simple_query("SELECT 1").await.unwrap();

    // The whole server crashes (immediate stop) mid-query.
    let victim = connect(server.proxy_addr).await;
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let running = tokio::spawn(async move { victim.simple_query("SELECT pg_sleep(30)").await });
    wait_backend_active(&cluster, pid).await;
    tokio::task::block_in_place(|| cluster.kill()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("no hang")
        .unwrap();
    assert!(result.is_err(), "query on a crashed server must fail");
    assert!(bystander.simple_query("SELECT 1").await.is_err());
    let err = connect_as(server.proxy_addr, APP_USER, APP_PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "08006", "{}", error_text(&err));

    tokio::task::block_in_place(|| cluster.restart()).unwrap();
    let fresh = connect(server.proxy_addr).await;
    assert_eq!(
        fresh
            .query_one("SELECT 5", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        5
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_at_start_up_does_not_stop_cutover() {
    let cluster = cluster(HostAuth::ScramSha256);
    tokio::task::block_in_place(|| cluster.stop()).unwrap();
    let server = start_proxy(&cluster).await;
    let (status, body) = admin_get(&server, "/healthz");
    assert_eq!(status, 200, "{body}");
    let (status, body) = admin_get(&server, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!("127.0.0.1:{}", cluster.port())),
        "{body}"
    );
    let err = connect_as(server.proxy_addr, APP_USER, APP_PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "08006", "{}", error_text(&err));
    assert!(
        error_text(&err).contains("unreachable"),
        "{}",
        error_text(&err)
    );

    tokio::task::block_in_place(|| cluster.restart()).unwrap();
    let client = connect(server.proxy_addr).await;
    client.simple_query("SELECT 1").await.unwrap();
    let (status, _) = admin_get(&server, "/readyz");
    assert_eq!(status, 200);
    let (_, metrics) = admin_get(&server, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "cutover_backend_connect_failures_total{backend=\"old\",reason=\"unreachable\"}"
        ),
        Some(1.0)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_limit_refuses_extra_clients_with_53300() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server = start_proxy_with(&config_text(
        &cluster,
        "scram-sha-256",
        "max_client_connections = 2",
        "",
    ))
    .await;
    let _a = connect(server.proxy_addr).await;
    let _b = connect(server.proxy_addr).await;
    let err = connect_as(server.proxy_addr, APP_USER, APP_PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "53300");
    assert!(
        error_text(&err).contains("too many clients"),
        "{}",
        error_text(&err)
    );
    server.shutdown().await;
}
