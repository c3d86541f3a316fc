//! TLS to the databases. The old cluster serves TLS with a certificate from
//! a test CA and accepts TCP logins only over TLS (pg_hba `hostssl`), so
//! every connection cutover makes to it (client sessions, the replication
//! stream, the control plane's copy and verify) either speaks TLS or is
//! refused. verify-full checks the CA and the host name, verify-ca only the
//! CA; a wrong CA, a wrong name and a server without TLS are refused with
//! the reason.

mod support;

use cutover_config::BackendUrl;
use cutover_pgcluster::{ClusterOptions, ServerCert, SUPERUSER, SUPERUSER_PASSWORD};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::*;

const TOKEN: &str = "tls-token";

/// Test certificates: a CA, a server certificate it signed for 127.0.0.1
/// only, and an unrelated CA.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn make() -> Certs {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("cutover-tls-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let certs = Certs { dir };
        for ca in ["ca", "other-ca"] {
            certs.openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=cutover test {ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ]);
        }
        certs.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            certs.path("server.ext"),
            "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n\
             keyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n",
        )
        .unwrap();
        certs.openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ]);
        certs
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("openssl is installed (.ci/run installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn server(&self) -> ServerCert {
        ServerCert {
            cert: self.path("server.crt"),
            key: self.path("server.key"),
        }
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_cluster(certs: &Certs) -> cutover_pgcluster::Cluster {
    cluster_with(ClusterOptions {
        tls: Some(certs.server()),
        ..Default::default()
    })
}

/// The superuser URL of `cluster` on `host` with `query` appended.
fn url(cluster: &cutover_pgcluster::Cluster, host: &str, query: &str) -> String {
    cluster
        .url(SUPERUSER, SUPERUSER_PASSWORD, DB)
        .replace("127.0.0.1", host)
        + query
}

fn ca_query(mode: &str, ca: &Path) -> String {
    format!("?sslmode={mode}&sslrootcert={}", ca.display())
}

/// Logs in with the URL's settings and says why not.
async fn login(url: &str) -> Result<(), String> {
    let url = BackendUrl::parse(url)?;
    cutover_backend::probe(
        "old",
        &url,
        None,
        Duration::from_secs(10),
        &cutover_backend::ScramCache::default(),
    )
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_connection_to_old_uses_verified_tls() {
    let certs = Certs::make();
    let old = tls_cluster(&certs);
    let new = cluster(cutover_pgcluster::HostAuth::ScramSha256);
    for c in [&old, &new] {
        c.psql(
            DB,
            "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL); GRANT ALL ON items TO app",
        )
        .unwrap();
    }
    old.psql(
        DB,
        "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 500) g",
    )
    .unwrap();

    // Without TLS the old cluster refuses every login: the checks below
    // cannot pass by accident over plain TCP.
    let refused = login(&url(&old, "127.0.0.1", "?sslmode=disable"))
        .await
        .unwrap_err();
    assert!(refused.contains("no encryption"), "{refused}");

    let plain_url = old.url(SUPERUSER, SUPERUSER_PASSWORD, DB);
    let verified = url(
        &old,
        "127.0.0.1",
        &ca_query("verify-full", &certs.path("ca.pem")),
    );
    let config = mirror_config_text(&old, &new, TOKEN, "", "").replacen(&plain_url, &verified, 1);
    let server = start_proxy_with(&config).await;
    let client = connect(server.proxy_addr).await;
    let row = client
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the client's session on old is TLS");
    assert!(row.get::<_, String>(1).starts_with("TLSv1."));

    // The stream, the copy and verify connect to old too.
    start_mirroring(&server, &old, Some(TOKEN)).await;
    client
        .execute("INSERT INTO items VALUES (501, 'over tls')", &[])
        .await
        .unwrap();
    drained(&server, &old).await;
    assert_eq!(
        new.psql(DB, "SELECT name FROM items WHERE id = 501")
            .unwrap(),
        "over tls"
    );
    assert_eq!(new.psql(DB, "SELECT count(*) FROM items").unwrap(), "501");
    let (code, body) = admin_call(&server, "POST", "/v1/verify", "{}", Some(TOKEN));
    assert_eq!(code, 200, "{body}");
    let sessions = old
        .psql(
            "postgres",
            "SELECT string_agg(DISTINCT a.application_name || ':' || s.ssl, ',' ORDER BY a.application_name || ':' || s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE 'cutover%'",
        )
        .unwrap();
    assert!(sessions.contains("cutover-stream:true"), "{sessions}");
    assert!(!sessions.contains(":false"), "{sessions}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_checks_refuse_precisely() {
    let certs = Certs::make();
    let tls = tls_cluster(&certs);
    let plain = cluster(cutover_pgcluster::HostAuth::ScramSha256);
    let ca = certs.path("ca.pem");
    let other_ca = certs.path("other-ca.pem");

    // The right CA and the right name; the default (prefer) and allow
    // reach a TLS-only server too; require checks nothing without a CA.
    for query in [
        ca_query("verify-full", &ca),
        ca_query("verify-ca", &ca),
        ca_query("require", &ca),
        "?sslmode=require".to_string(),
        "?sslmode=prefer".to_string(),
        "?sslmode=allow".to_string(),
        String::new(),
    ] {
        let result = login(&url(&tls, "127.0.0.1", &query)).await;
        assert_eq!(result, Ok(()), "{query}");
    }

    // A CA that did not sign the server's certificate.
    for mode in ["verify-full", "verify-ca", "require"] {
        let err = login(&url(&tls, "127.0.0.1", &ca_query(mode, &other_ca)))
            .await
            .unwrap_err();
        assert!(
            err.contains(&format!(
                "TLS: the server's certificate is not signed by a CA in sslrootcert={} (sslmode={mode})",
                other_ca.display()
            )),
            "{err}"
        );
    }

    // The certificate names 127.0.0.1, not localhost: verify-full refuses,
    // verify-ca does not look at names.
    let err = login(&url(&tls, "localhost", &ca_query("verify-full", &ca)))
        .await
        .unwrap_err();
    assert!(
        err.contains("certificate is not valid for host localhost"),
        "{err}"
    );
    login(&url(&tls, "localhost", &ca_query("verify-ca", &ca)))
        .await
        .unwrap();

    // A server without TLS: require refuses, prefer goes on in plain text.
    let err = login(&url(&plain, "127.0.0.1", "?sslmode=require"))
        .await
        .unwrap_err();
    assert!(err.contains("the server does not accept TLS"), "{err}");
    login(&url(&plain, "127.0.0.1", "")).await.unwrap();

    // The control plane (tokio-postgres) applies the same checks.
    let bad =
        BackendUrl::parse(&url(&tls, "127.0.0.1", &ca_query("verify-full", &other_ca))).unwrap();
    let Err(err) = cutover_stream::control_client(&bad, "cutover-test").await else {
        panic!("the wrong CA is refused");
    };
    let err = err.to_string();
    assert!(err.contains("not signed by a CA in sslrootcert="), "{err}");
    let good = BackendUrl::parse(&url(&tls, "127.0.0.1", &ca_query("verify-full", &ca))).unwrap();
    let control = cutover_stream::control_client(&good, "cutover-test")
        .await
        .unwrap();
    let ssl: bool = control
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);

    // Through cutover, a client sees why old cannot be reached.
    let config = config_text(&tls, "scram-sha-256", "", "").replacen(
        &tls.url(SUPERUSER, SUPERUSER_PASSWORD, DB),
        &url(&tls, "127.0.0.1", &ca_query("verify-full", &other_ca)),
        1,
    );
    let server = start_proxy_with(&config).await;
    let Err(err) = connect_as(server.proxy_addr, APP_USER, APP_PASSWORD).await else {
        panic!("old cannot be reached");
    };
    assert!(
        error_text(&err).contains("certificate is not signed by a CA"),
        "{}",
        error_text(&err)
    );
    server.shutdown().await;

    // A CA file that cannot be read stops cutover at start-up.
    let config = config_text(&tls, "scram-sha-256", "", "").replacen(
        &tls.url(SUPERUSER, SUPERUSER_PASSWORD, DB),
        &url(
            &tls,
            "127.0.0.1",
            "?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        ),
        1,
    );
    let err = cutover::Server::start(cutover_config::Config::from_toml(&config).unwrap())
        .await
        .err()
        .expect("start-up refuses an unreadable CA file")
        .to_string();
    assert!(
        err.contains("old.url: sslrootcert=/nonexistent/ca.pem:"),
        "{err}"
    );
}
