//! Pool safety: a backend session goes to the next client only when nothing
//! of the previous one can leak — never after a client vanished mid-COPY,
//! mid-reply or with an extended-protocol batch left open; never to another
//! user or other startup parameters; with the ParameterStatus values it
//! holds now; and a previous client's cancel key cancels nothing. Backend
//! sessions are told apart by their pid, which the client's BackendKeyData
//! carries.

mod support;

use cutover_pgcluster::{Cluster, HostAuth, SUPERUSER, SUPERUSER_PASSWORD};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::*;

async fn raw(addr: SocketAddr, application_name: &str) -> RawClient {
    RawClient::connect(
        addr,
        APP_USER,
        APP_PASSWORD,
        &[("application_name", application_name)],
    )
    .await
}

/// Leaves politely at a message boundary.
async fn leave(mut client: RawClient) {
    client.send(&fe::terminate()).await;
    let _ = client.next().await;
}

/// Waits until the backend `pid` is gone from the server.
async fn wait_gone(cluster: &Cluster, pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let alive = cluster
            .psql(
                "postgres",
                &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
            )
            .unwrap();
        if alive.trim() == "0" {
            return;
        }
        assert!(Instant::now() < deadline, "backend {pid} is still there");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sqlstate_of(replies: &[Msg]) -> Option<String> {
    replies
        .iter()
        .find(|m| m.tag == 'E')
        .map(|m| error_fields(&m.body).0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_left_mid_work_is_never_handed_to_the_next_client() {
    let c = cluster(HostAuth::ScramSha256);
    c.psql(DB, "CREATE TABLE sink (v text); GRANT ALL ON sink TO app")
        .unwrap();
    let server = start_proxy(&c).await;

    // The control: a clean goodbye pools the session for the next client.
    let first = raw(server.proxy_addr, "t").await;
    let pid = first.key.pid;
    leave(first).await;
    let next = raw(server.proxy_addr, "t").await;
    assert_eq!(next.key.pid, pid, "a cleanly left session is reused");
    leave(next).await;

    let mid_copy = [
        fe::query("COPY sink FROM STDIN"),
        fe::copy_data(b"half a row"),
    ]
    .concat();
    let mid_reply = fe::query("SELECT repeat('x', 1000) FROM generate_series(1, 200000)");
    let unsynced = [
        fe::parse("s1", "SELECT 1", &[]),
        fe::bind("", "s1", &[], &[], &[]),
        fe::execute("", 0),
    ]
    .concat();
    for (what, bytes) in [
        ("mid-COPY", mid_copy),
        ("mid-reply", mid_reply),
        ("after Parse without Sync", unsynced),
    ] {
        let mut client = raw(server.proxy_addr, "t").await;
        let pid = client.key.pid;
        client.send(&bytes).await;
        if what == "mid-COPY" {
            let reply = client.next().await.expect("CopyInResponse");
            assert_eq!(reply.tag, 'G', "{what}");
        }
        drop(client);
        wait_gone(&c, pid).await;
        let next = raw(server.proxy_addr, "t").await;
        assert_ne!(
            next.key.pid, pid,
            "{what}: the session went to the next client"
        );
        let mut next = next;
        let replies = next.exchange(&fe::query("SELECT 42"), 1).await;
        assert_eq!(sqlstate_of(&replies), None, "{what}: {replies:?}");
        leave(next).await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_go_only_to_the_same_user_and_parameters_with_their_current_values() {
    let c = cluster(HostAuth::ScramSha256);
    let server = start_proxy(&c).await;
    let mut a = raw(server.proxy_addr, "a").await;
    let pid = a.key.pid;
    let replies = a.exchange(&fe::query("SET DateStyle = 'German'"), 1).await;
    assert!(
        replies
            .iter()
            .any(|m| m.tag == 'S' && m.body.starts_with(b"DateStyle\0German")),
        "{replies:?}"
    );
    leave(a).await;

    let other_params = raw(server.proxy_addr, "b").await;
    assert_ne!(other_params.key.pid, pid, "other startup parameters");
    let other_user = RawClient::connect(
        server.proxy_addr,
        SUPERUSER,
        SUPERUSER_PASSWORD,
        &[("application_name", "a")],
    )
    .await;
    assert_ne!(other_user.key.pid, pid, "another user");

    let same = raw(server.proxy_addr, "a").await;
    assert_eq!(same.key.pid, pid, "the same user and parameters reuse it");
    // The reset put DateStyle back; the client is told what it is now.
    let datestyle: Vec<&Msg> = same
        .login
        .iter()
        .filter(|m| m.body.starts_with(b"DateStyle\0"))
        .collect();
    assert_eq!(datestyle.len(), 1);
    assert_eq!(datestyle[0].body, b"DateStyle\0ISO, MDY\0");
    for client in [other_params, other_user, same] {
        leave(client).await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cancel_key_cancels_nothing_and_each_client_cancels_its_own() {
    let c = cluster(HostAuth::ScramSha256);
    let server = start_proxy(&c).await;
    let first = raw(server.proxy_addr, "t").await;
    let stale = first.key;
    leave(first).await;

    let mut reused = raw(server.proxy_addr, "t").await;
    assert_eq!(reused.key.pid, stale.pid, "the session was reused");
    assert_ne!(reused.key.secret, stale.secret, "with a secret of its own");
    reused.send(&fe::query("SELECT pg_sleep(1)")).await;
    wait_backend_active(&c, stale.pid).await;
    send_cancel_request(server.proxy_addr, stale.pid, stale.secret).await;
    let replies = reused.until_ready(1).await;
    assert_eq!(
        sqlstate_of(&replies),
        None,
        "the stale key cancelled: {replies:?}"
    );
    leave(reused).await;

    // Two clients on two sessions, both sleeping: each key cancels its own.
    let mut one = raw(server.proxy_addr, "one").await;
    let mut two = raw(server.proxy_addr, "two").await;
    assert_ne!(one.key.pid, two.key.pid);
    one.send(&fe::query("SELECT pg_sleep(60)")).await;
    two.send(&fe::query("SELECT pg_sleep(60)")).await;
    wait_backend_active(&c, one.key.pid).await;
    wait_backend_active(&c, two.key.pid).await;
    send_cancel_request(server.proxy_addr, one.key.pid, one.key.secret).await;
    let replies = one.until_ready(1).await;
    assert_eq!(sqlstate_of(&replies).as_deref(), Some("57014"));
    let state = c
        .psql(
            "postgres",
            &format!(
                "SELECT state FROM pg_stat_activity WHERE pid = {}",
                two.key.pid
            ),
        )
        .unwrap();
    assert_eq!(
        state.trim(),
        "active",
        "the other client's statement runs on"
    );
    send_cancel_request(server.proxy_addr, two.key.pid, two.key.secret).await;
    let replies = two.until_ready(1).await;
    assert_eq!(sqlstate_of(&replies).as_deref(), Some("57014"));
    leave(one).await;
    leave(two).await;
    server.shutdown().await;
}
