//! Bad input gets a precise 08P01 error, that connection closes, the
//! protocol-error counter moves, and every other session carries on.
//! Also: encryption negotiation (SSLRequest, GSSENCRequest) and TLS.

mod support;

use cutover_pgcluster::HostAuth;
use support::fe;
use support::*;
use tokio::io::AsyncWriteExt;

/// Logs in raw through the proxy, sends `bytes`, and returns what came back
/// until the proxy closed the connection.
async fn after_login(server: &cutover::Server, bytes: &[u8]) -> Vec<Msg> {
    let mut c = RawClient::connect(server.proxy_addr, APP_USER, APP_PASSWORD, &[]).await;
    c.send(bytes).await;
    let mut out = Vec::new();
    while let Some(m) = c.next().await {
        out.push(m);
    }
    out
}

fn single_fatal(msgs: &[Msg]) -> (String, String) {
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0].tag, 'E');
    let text = String::from_utf8_lossy(&msgs[0].body).to_string();
    assert!(text.contains("FATAL"), "{text}");
    error_fields(&msgs[0].body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_after_login_close_only_that_connection() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server = start_proxy_with(&config_text(
        &cluster,
        "scram-sha-256",
        "max_message_bytes = 1048576",
        "",
    ))
    .await;
    let bystander = connect(server.proxy_addr).await;
    bystander
        .batch_execute("CREATE TEMP TABLE survivor (x int)")
        .await
        .unwrap();

    let (code, message) = single_fatal(&after_login(&server, &fe::message(b'z', b"??")).await);
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("08P01", "invalid frontend message type 122")
    );

    let (code, message) = single_fatal(&after_login(&server, &fe::message(b'p', b"pw\0")).await);
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("08P01", "invalid frontend message type 112")
    );

    let (code, message) = single_fatal(&after_login(&server, &[b'Q', 0, 0, 0, 2]).await);
    assert_eq!(code, "08P01");
    assert_eq!(message, "invalid message length 2 for message type 'Q'");

    let mut oversize = vec![b'Q'];
    oversize.extend_from_slice(&(2 * 1024 * 1024i32).to_be_bytes());
    oversize.extend_from_slice(b"SELECT ");
    let (code, message) = single_fatal(&after_login(&server, &oversize).await);
    assert_eq!(code, "08P01");
    assert!(
        message.contains("over the limit of 1048576 bytes (proxy.max_message_bytes)"),
        "{message}"
    );

    // Truncated message, then the client vanishes.
    let mut c = RawClient::connect(server.proxy_addr, APP_USER, APP_PASSWORD, &[]).await;
    c.send(&[b'Q', 0, 0, 0, 100, b'S', b'E']).await;
    drop(c);

    // Valid messages pipelined in front of garbage are still answered first.
    let msgs = after_login(
        &server,
        &[fe::query("SELECT 1"), fe::message(b'!', b"")].concat(),
    )
    .await;
    let tags: String = msgs.iter().map(|m| m.tag).collect();
    assert_eq!(tags, "TDCZE");

    bystander
        .batch_execute("INSERT INTO survivor VALUES (1)")
        .await
        .unwrap();
    let (_, metrics) = admin_get(&server, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "cutover_protocol_errors_total{reason=\"unknown_message_type\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "cutover_protocol_errors_total{reason=\"bad_length\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "cutover_protocol_errors_total{reason=\"too_large\"}"
        ),
        Some(1.0)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_startup_packets_get_08p01() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server = start_proxy(&cluster).await;

    let mut s = raw_startup(server.proxy_addr, 2 << 16, &[("user", APP_USER)]).await;
    let msgs = parse_messages(&read_to_close(&mut s).await);
    let (code, message) = single_fatal(&msgs);
    assert_eq!(code, "08P01");
    assert_eq!(
        message,
        "unsupported frontend protocol 2.0: server supports 3.0 to 3.0"
    );

    let mut s = tokio::net::TcpStream::connect(server.proxy_addr)
        .await
        .unwrap();
    s.write_all(&[0, 0, 0, 5, 1]).await.unwrap();
    let (code, message) = single_fatal(&parse_messages(&read_to_close(&mut s).await));
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("08P01", "invalid length of startup packet")
    );

    let mut s = tokio::net::TcpStream::connect(server.proxy_addr)
        .await
        .unwrap();
    let mut packet = vec![0, 0, 0, 16];
    packet.extend_from_slice(&196608i32.to_be_bytes());
    packet.extend_from_slice(b"user\0app");
    s.write_all(&packet).await.unwrap();
    let (code, message) = single_fatal(&parse_messages(&read_to_close(&mut s).await));
    assert_eq!(code, "08P01");
    assert!(
        message.contains("invalid startup packet layout"),
        "{message}"
    );

    let mut s = raw_startup(server.proxy_addr, 196608, &[("database", DB)]).await;
    let (code, _) = single_fatal(&parse_messages(&read_to_close(&mut s).await));
    assert_eq!(code, "28000");

    // A SASL mechanism we never offered.
    let mut s = raw_startup(
        server.proxy_addr,
        196608,
        &[("user", APP_USER), ("database", DB)],
    )
    .await;
    let mut body = b"SCRAM-SHA-1\0".to_vec();
    body.extend_from_slice(&4i32.to_be_bytes());
    body.extend_from_slice(b"n,,x");
    s.write_all(&fe::message(b'p', &body)).await.unwrap();
    let msgs = parse_messages(&read_to_close(&mut s).await);
    assert_eq!(msgs[0].tag, 'R');
    let (code, message) = single_fatal(&msgs[1..]);
    assert_eq!(code, "08P01");
    assert!(message.contains("SCRAM-SHA-1"), "{message}");

    let (_, metrics) = admin_get(&server, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "cutover_protocol_errors_total{reason=\"startup_packet\"}"
        ),
        Some(3.0)
    );
    let still_fine = connect(server.proxy_addr).await;
    still_fine.simple_query("SELECT 1").await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_protocol_minor_version_is_negotiated_down() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server = start_proxy_with(&config_text(&cluster, "trust", "", "")).await;
    let mut s = raw_startup(
        server.proxy_addr,
        (3 << 16) | 2,
        &[
            ("user", APP_USER),
            ("database", DB),
            ("_pq_.compression", "on"),
        ],
    )
    .await;
    s.write_all(&fe::terminate()).await.unwrap();
    let msgs = parse_messages(&read_to_close(&mut s).await);
    assert_eq!(msgs[0].tag, 'v');
    let mut expected = 0i32.to_be_bytes().to_vec();
    expected.extend_from_slice(&1i32.to_be_bytes());
    expected.extend_from_slice(b"_pq_.compression\0");
    assert_eq!(msgs[0].body, expected);
    assert_eq!(msgs[1].tag, 'R');
    assert_eq!(msgs.last().map(|m| m.tag), Some('Z'));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_and_gss_requests_are_declined_without_tls_configured() {
    let cluster = cluster(HostAuth::ScramSha256);
    let server = start_proxy(&cluster).await;
    for code in [80877104i32, 80877103] {
        let mut s = tokio::net::TcpStream::connect(server.proxy_addr)
            .await
            .unwrap();
        let mut packet = 8i32.to_be_bytes().to_vec();
        packet.extend_from_slice(&code.to_be_bytes());
        s.write_all(&packet).await.unwrap();
        let mut answer = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut answer)
            .await
            .unwrap();
        assert_eq!(&answer, b"N");
    }
    // psql with sslmode=prefer falls back to plain and works.
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(cluster.bindir().join("psql"))
            .arg(format!(
                "postgres://{APP_USER}@127.0.0.1:{}/{DB}?sslmode=prefer&gssencmode=prefer",
                server.proxy_addr.port()
            ))
            .args(["-X", "-A", "-t", "-c", "SELECT 'plain ok'"])
            .env("PGPASSWORD", APP_PASSWORD)
            .output()
            .unwrap()
    });
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "plain ok",
        "{out:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_are_served_over_tls() {
    let cluster = cluster(HostAuth::ScramSha256);
    let dir = std::env::temp_dir().join(format!("cutover-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed");
    assert!(status.status.success(), "{status:?}");
    let server = start_proxy_with(&config_text(
        &cluster,
        "scram-sha-256",
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            cert.display(),
            key.display()
        ),
        "",
    ))
    .await;
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(cluster.bindir().join("psql"))
            .arg(format!(
                "postgres://{APP_USER}@127.0.0.1:{}/{DB}?sslmode=require",
                server.proxy_addr.port()
            ))
            .args([
                "-X",
                "-A",
                "-t",
                "-c",
                "\\conninfo",
                "-c",
                "SELECT 'over tls'",
            ])
            .env("PGPASSWORD", APP_PASSWORD)
            .output()
            .unwrap()
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("SSL connection (protocol: TLSv1.3"),
        "{out:?}"
    );
    assert!(stdout.contains("over tls"), "{out:?}");
    // An SSLRequest with a plaintext startup packet right behind it, before
    // our answer: refused, as PostgreSQL refuses it (the bytes were not
    // encrypted and may have been injected), never served.
    let mut s = tokio::net::TcpStream::connect(server.proxy_addr)
        .await
        .unwrap();
    let mut packet = 8i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&80877103i32.to_be_bytes());
    let mut startup = Vec::new();
    startup.extend_from_slice(&196_608i32.to_be_bytes());
    for part in ["user", APP_USER, "database", DB, ""] {
        startup.extend_from_slice(part.as_bytes());
        startup.push(0);
    }
    packet.extend_from_slice(&(startup.len() as i32 + 4).to_be_bytes());
    packet.extend_from_slice(&startup);
    s.write_all(&packet).await.unwrap();
    let answer = read_to_close(&mut s).await;
    let (code, message) = single_fatal(&parse_messages(&answer));
    assert_eq!(code, "08P01");
    assert_eq!(message, "received unencrypted data after SSL request");
    // A client that requires channel binding logs in with
    // SCRAM-SHA-256-PLUS, bound to cutover's certificate.
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(cluster.bindir().join("psql"))
            .arg(format!(
                "postgres://{APP_USER}@127.0.0.1:{}/{DB}?sslmode=require&channel_binding=require",
                server.proxy_addr.port()
            ))
            .args(["-X", "-A", "-t", "-c", "SELECT 'bound'"])
            .env("PGPASSWORD", APP_PASSWORD)
            .output()
            .unwrap()
    });
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "bound");
    // Plain clients are still served.
    connect(server.proxy_addr)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    server.shutdown().await;
}
