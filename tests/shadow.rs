//! Shadow reads: with `routing.shadow_percent = 100` every read old serves
//! also runs on new and is compared. A correct mirror gives `match` only;
//! a row changed on new behind cutover's back gives `mismatch`; reads in a
//! transaction that wrote are skipped, not compared; a guarded ramp with a
//! shadow-mismatch limit rolls back on them.

mod support;

use std::time::{Duration, Instant};
use support::*;

const TOKEN: &str = "shadow-token";

async fn until_metric(server: &cutover::Server, series: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = admin_get(server, "/metrics");
        let value = metric(&body, series).unwrap_or(0.0);
        if value >= at_least {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {value}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_reads_match_a_correct_mirror_and_catch_a_row_changed_on_new() {
    let (old, new) = items_pair(100);
    let config = mirror_config_text(&old, &new, TOKEN, "", "\n[routing]\nshadow_percent = 100\n");
    let server = start_proxy_with(&config).await;
    start_mirroring(&server, &old, Some(TOKEN)).await;
    let client = connect_as(server.proxy_addr, APP_USER, APP_PASSWORD)
        .await
        .unwrap();

    // Ordered, unordered, extended and simple reads: all match.
    for id in 1..=40 {
        let rows = client
            .query(
                "SELECT id, name FROM items WHERE id <= $1 ORDER BY id",
                &[&id],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), id as usize);
        client
            .simple_query(&format!("SELECT name FROM items WHERE id = {id}"))
            .await
            .unwrap();
    }
    client
        .simple_query("SELECT count(*) FROM items")
        .await
        .unwrap();
    until_metric(
        &server,
        "cutover_shadow_reads_total{result=\"match\"}",
        60.0,
    )
    .await;
    let (_, body) = admin_get(&server, "/metrics");
    assert_eq!(
        metric(&body, "cutover_shadow_reads_total{result=\"mismatch\"}").unwrap_or(0.0),
        0.0,
        "{body}"
    );
    assert_eq!(
        metric(&body, "cutover_shadow_reads_total{result=\"error\"}").unwrap_or(0.0),
        0.0,
        "{body}"
    );

    // A row changed on new behind cutover's back.
    new.psql(DB, "UPDATE items SET name = 'tampered' WHERE id = 7")
        .unwrap();
    for _ in 0..5 {
        let row = client
            .query_one("SELECT name FROM items WHERE id = 7", &[])
            .await
            .unwrap();
        assert_eq!(
            row.get::<_, String>(0),
            "item 7",
            "the client sees old's answer"
        );
    }
    until_metric(
        &server,
        "cutover_shadow_reads_total{result=\"mismatch\"}",
        1.0,
    )
    .await;

    // Reads after a write in an open transaction are not compared.
    let (_, body) = admin_get(&server, "/metrics");
    let skipped = metric(&body, "cutover_shadow_reads_total{result=\"skipped\"}").unwrap_or(0.0);
    client
        .batch_execute("BEGIN; UPDATE items SET name = 'renamed' WHERE id = 50")
        .await
        .unwrap();
    let inside = client
        .query_one("SELECT name FROM items WHERE id = 50", &[])
        .await
        .unwrap();
    assert_eq!(inside.get::<_, String>(0), "renamed");
    client.batch_execute("COMMIT").await.unwrap();
    until_metric(
        &server,
        "cutover_shadow_reads_total{result=\"skipped\"}",
        skipped + 1.0,
    )
    .await;

    // The ramp can use the mismatch rate as its guard.
    admin_ok(
        &server,
        "POST",
        "/v1/ramp",
        r#"{"stages": [10, 20], "hold_seconds": 20, "max_error_rate_percent": 50, "max_shadow_mismatch_percent": 0.5}"#,
        Some(TOKEN),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        client
            .query_one("SELECT name FROM items WHERE id = 7", &[])
            .await
            .unwrap();
        let status = status_doc(&server);
        if status["ramp"]["state"] != "running" {
            break status;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status["ramp"]["state"], "rolled_back", "{status}");
    assert!(
        status["ramp"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("stage 1 of 2 (10%): shadow mismatch rate "),
        "{status}"
    );
    assert_eq!(status["read_percent"], 0);
    server.shutdown().await;
}
