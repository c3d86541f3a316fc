//! `cutover schema` and `cutover convert` on SQLite files the way the three
//! DDL styles leave them (tests/support/sqlite_app.rs), into real
//! PostgreSQL: every value compared through the schema map, each trap of
//! the conversion rules checked against PostgreSQL's own answer, ids where
//! SQLite would continue, app queries on the result, a convert killed
//! mid-copy resumed, and bad values named with nothing converted.

mod support;

use cutover_pgcluster::{Cluster, ClusterOptions, HostAuth, SUPERUSER, SUPERUSER_PASSWORD};
use cutover_sqlite::rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use support::sqlite_app::{self, format_utc, Style, EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_cutover");

fn start_cluster() -> Cluster {
    Cluster::start(ClusterOptions {
        host_auth: HostAuth::ScramSha256,
        settings: vec![],
    })
    .expect("start PostgreSQL cluster")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cutover-convert-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A config converting `file` into database `db` of `cluster`.
fn write_config(dir: &Path, file: &Path, cluster: &Cluster, db: &str, settings: &str) -> PathBuf {
    let path = dir.join(format!("{db}.toml"));
    std::fs::write(
        &path,
        format!(
            "[old]\nurl = \"sqlite://{}\"\n\n[new]\nurl = \"{}\"\n{settings}",
            file.display(),
            cluster.url(SUPERUSER, SUPERUSER_PASSWORD, db)
        ),
    )
    .unwrap();
    path
}

fn cutover(args: &[&str], config: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The schema map the CLI uses, read the same way.
fn schema_map(
    file: &Path,
    style: Style,
    cluster: &Cluster,
    dir: &Path,
) -> cutover_sqlite::SchemaMap {
    let config = cutover_config::Config::load(&write_config(
        dir,
        file,
        cluster,
        "map",
        style.column_settings(),
    ))
    .unwrap();
    let settings: Vec<cutover_sqlite::ColumnOverride> = config
        .schema_columns
        .iter()
        .map(|c| cutover_sqlite::ColumnOverride {
            table: c.table.clone(),
            column: c.column.clone(),
            pg_type: c.pg_type.clone(),
            storage: c.storage.clone(),
        })
        .collect();
    cutover_sqlite::SchemaMap::read(&cutover_sqlite::open_read_only(file).unwrap(), &settings)
        .unwrap()
}

async fn control(cluster: &Cluster, db: &str) -> tokio_postgres::Client {
    let url =
        cutover_config::BackendUrl::parse(&cluster.url(SUPERUSER, SUPERUSER_PASSWORD, db)).unwrap();
    cutover_stream::control_client(&url, "convert-test")
        .await
        .unwrap()
}

fn one(cluster: &Cluster, db: &str, sql: &str) -> String {
    cluster.psql(db, sql).unwrap().trim().to_string()
}

/// `YYYY-MM-DD HH:MM:SS.ffffff` in UTC of a timestamptz column's value.
fn utc(cluster: &Cluster, db: &str, table: &str, column: &str, id: i64) -> String {
    one(
        cluster,
        db,
        &format!("SELECT to_char(\"{column}\" AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') FROM \"{table}\" WHERE id = {id}"),
    )
}

fn sqlite_next_id(conn: &Connection, table: &str, insert: &str) -> i64 {
    conn.query_row(
        &format!("INSERT INTO \"{table}\" {insert} RETURNING id"),
        [],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_ddl_styles_convert_every_value_exactly() {
    let cluster = start_cluster();
    let dir = scratch("styles");
    for style in [Style::Hand, Style::Drizzle, Style::Prisma, Style::Plain] {
        let db = style.name();
        cluster
            .psql("postgres", &format!("CREATE DATABASE {db}"))
            .unwrap();
        let file = dir.join(format!("{db}.db"));
        // The writer stays open with every row still in the WAL.
        let writer = sqlite_app::build(&file, style, 2000);
        assert!(
            std::fs::metadata(file.with_extension("db-wal"))
                .unwrap()
                .len()
                > 100_000
        );
        let config = write_config(&dir, &file, &cluster, db, style.column_settings());
        let (users, posts) = (style.users(), style.posts());

        // The DDL says what the file holds and what was decided.
        let out = cutover(&["schema"], &config);
        assert!(out.status.success(), "{}", text(&out));
        let ddl = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(ddl.contains(&format!("CREATE TABLE \"{users}\"")), "{ddl}");
        assert!(
            ddl.contains("\"id\" bigint GENERATED BY DEFAULT AS IDENTITY"),
            "{ddl}"
        );
        assert!(ddl.contains("\"prefs\" jsonb"), "{ddl}");
        assert!(ddl.contains("\"order\" bigint"), "{ddl}");
        assert!(ddl.contains("\"timestamp\" timestamptz"), "{ddl}");
        assert!(
            ddl.contains(
                "\"at\" text DEFAULT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')"
            ),
            "a text column keeps SQLite's text form: {ddl}"
        );
        if style == Style::Hand {
            assert!(
                ddl.contains("mixed storage: 499 epoch ms, 0 epoch s, 1497 text; all are read"),
                "{ddl}"
            );
            assert!(
                ddl.contains("sqlite: BOOLEAN; stored: text 1330, null 666; codec: bool_text"),
                "{ddl}"
            );
        }

        let started = Instant::now();
        let out = cutover(&["convert"], &config);
        assert!(out.status.success(), "{style:?}: {}", text(&out));
        let report = String::from_utf8_lossy(&out.stdout).to_string();
        let user_rows = if style == Style::Hand { 1996 } else { 1997 };
        assert!(
            report.contains(&format!("{users}: {user_rows} rows, content hash")),
            "{report}"
        );
        let warnings = String::from_utf8_lossy(&out.stderr);
        let orphaned = warnings.contains(
            "cutover: warning: foreign key \"posts_fkey1\" (\"posts\".\"user_id\" -> \"users\".\"id\"): ",
        );
        assert_eq!(orphaned, style == Style::Hand, "{warnings}");
        eprintln!("{style:?}: converted in {:?}", started.elapsed());

        // Every value of every table, through the schema map, both sides.
        let map = schema_map(&file, style, &cluster, &dir);
        let checks = cutover_sqlite::convert::verify(&file, &map, &[control(&cluster, db).await])
            .await
            .unwrap();
        assert_eq!(checks.len(), map.tables.len());
        for c in &checks {
            assert!(c.clean(), "{style:?} {}: {:?}", c.table, c.differences);
            let sqlite: i64 = writer
                .query_row(&format!("SELECT count(*) FROM \"{}\"", c.table), [], |r| {
                    r.get(0)
                })
                .unwrap();
            assert_eq!(c.postgres_rows, sqlite as u64, "{}", c.table);
        }
        assert_eq!(
            one(&cluster, db, "SELECT count(*) FROM \"AuditLog\""),
            "1000"
        );

        // The traps, as PostgreSQL itself answers.
        let column_type = |table: &str, column: &str| {
            one(
                &cluster,
                db,
                &format!("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = '\"{table}\"'::regclass AND attname = '{column}'"),
            )
        };
        assert_eq!(column_type(users, "created_at"), "timestamp with time zone");
        assert_eq!(column_type(users, "is_admin"), "boolean");
        assert_eq!(column_type(users, "balance"), "numeric");
        assert_eq!(
            column_type(users, "nickname"),
            "text",
            "longer values than varchar(8)"
        );
        assert_eq!(column_type(users, "avatar"), "bytea");
        assert_eq!(
            column_type("events", "timestamp"),
            "timestamp with time zone"
        );
        assert_eq!(column_type("post_tags", "post_id"), "bigint");
        if style == Style::Prisma {
            assert_eq!(
                column_type(posts, "views"),
                "integer",
                "Prisma Int by override"
            );
        }
        assert_eq!(
            one(
                &cluster,
                db,
                &format!("SELECT balance FROM \"{users}\" WHERE id = 3")
            ),
            "149.99"
        );
        assert_eq!(
            one(
                &cluster,
                db,
                &format!("SELECT is_admin FROM \"{users}\" WHERE id = 17")
            ),
            "t"
        );
        assert_eq!(
            one(
                &cluster,
                db,
                &format!("SELECT length(avatar) FROM \"{users}\" WHERE id = 1")
            ),
            "1048576"
        );
        assert_eq!(
            one(
                &cluster,
                db,
                &format!("SELECT name FROM \"{users}\" WHERE id = 2")
            ),
            "李雷 2"
        );
        assert_eq!(
            one(
                &cluster,
                db,
                &format!("SELECT prefs->'nested'->>'y' FROM \"{users}\" WHERE id = 2")
            ),
            "1.5"
        );
        let at = |i: i64| format_utc(EPOCH + i * 3_607, " ");
        match style {
            Style::Plain => {
                assert_eq!(
                    utc(&cluster, db, users, "created_at", 5),
                    format!("{}.000000", at(5)),
                    "SQLite text is UTC"
                );
                assert_eq!(column_type(users, "active"), "boolean");
            }
            Style::Hand => {
                assert_eq!(
                    utc(&cluster, db, users, "created_at", 4),
                    format!("{}.000000", at(4)),
                    "epoch ms"
                );
                assert_eq!(
                    utc(&cluster, db, users, "created_at", 5),
                    format!("{}.000000", at(5)),
                    "ISO with Z"
                );
                assert_eq!(
                    utc(&cluster, db, users, "created_at", 6),
                    format!("{}.250000", format_utc(EPOCH + 6 * 3_607 - 7_200, " ")),
                    "ISO with an offset"
                );
                assert_eq!(
                    utc(&cluster, db, users, "created_at", 7),
                    format!("{}.000000", at(7)),
                    "SQLite text is UTC"
                );
                assert_eq!(
                    one(&cluster, db, "SELECT active FROM users WHERE id = 3"),
                    "t",
                    "'true'"
                );
                assert_eq!(
                    one(&cluster, db, "SELECT active FROM users WHERE id = 4"),
                    "f",
                    "'false'"
                );
                assert_eq!(column_type(users, "birthday"), "date");
            }
            Style::Drizzle => {
                assert_eq!(
                    utc(&cluster, db, users, "created_at", 9),
                    format!("{}.000000", at(9)),
                    "epoch s"
                );
                assert_eq!(
                    column_type(users, "active"),
                    "bigint",
                    "no override: stays integer"
                );
            }
            Style::Prisma => {
                assert_eq!(
                    utc(&cluster, db, users, "created_at", 1),
                    format!("{}.001000", at(1)),
                    "epoch ms"
                );
                assert_eq!(
                    utc(&cluster, db, users, "created_at", 4),
                    format!("{}.000000", at(4)),
                    "CURRENT_TIMESTAMP text"
                );
                assert_eq!(
                    one(&cluster, db, "SELECT count(*) FROM _prisma_migrations"),
                    "1"
                );
            }
        }
        let ledger = match style {
            Style::Hand | Style::Plain => "d1_migrations",
            Style::Drizzle => "__drizzle_migrations",
            Style::Prisma => "_prisma_migrations",
        };
        let ledger_rows: i64 = writer
            .query_row(&format!("SELECT count(*) FROM {ledger}"), [], |r| r.get(0))
            .unwrap();
        assert!(ledger_rows > 0);
        assert_eq!(
            one(&cluster, db, &format!("SELECT count(*) FROM {ledger}")),
            ledger_rows.to_string()
        );

        // Structure: the partial and DESC indexes, UNIQUE with NULLs, FKs.
        let live = one(
            &cluster,
            db,
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'posts_live'",
        );
        assert!(live.contains("WHERE (deleted_at IS NULL)"), "{live}");
        let recent = one(
            &cluster,
            db,
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'posts_recent'",
        );
        assert!(recent.contains("published_at DESC"), "{recent}");
        let fks = one(
            &cluster,
            db,
            "SELECT string_agg(conrelid::regclass::text || ' ' || confdeltype::text, ',' ORDER BY 1) FROM pg_constraint WHERE contype = 'f'",
        );
        assert_eq!(fks.matches(" c").count(), 3, "{fks}");
        let not_valid = one(&cluster, db, "SELECT coalesce(string_agg(conname, ','), '') FROM pg_constraint WHERE contype = 'f' AND NOT convalidated");
        if style == Style::Hand {
            assert_eq!(
                not_valid, "posts_fkey1",
                "orphaned posts keep their rows; the key holds for new ones"
            );
            let err = cluster
                .psql(
                    db,
                    "INSERT INTO posts (id, user_id, title) VALUES (999999, 10, 'orphan')",
                )
                .unwrap_err()
                .to_string();
            assert!(err.contains("posts_fkey1"), "{err}");
        } else {
            assert_eq!(not_valid, "");
        }

        // Ids continue where SQLite would, and app writes work.
        for (table, insert) in [
            (users, "(email) VALUES ('next@example.com')".to_string()),
            (posts, "(user_id, title) VALUES (1, 'next')".to_string()),
            ("emptied", "(note) VALUES ('after')".to_string()),
            ("tags", "(name) VALUES ('next')".to_string()),
        ] {
            let expected = sqlite_next_id(&writer, table, &insert);
            let got = one(
                &cluster,
                db,
                &format!("INSERT INTO \"{table}\" {insert} RETURNING id"),
            );
            assert_eq!(got, expected.to_string(), "{style:?} {table}");
        }
        assert_eq!(one(&cluster, db, "SELECT max(id) FROM emptied"), "501");
        let upsert = one(
            &cluster,
            db,
            &format!(
                "INSERT INTO \"{users}\" (email, name) VALUES ('user5@example.com', 'Renamed') \
                 ON CONFLICT (email) DO UPDATE SET name = excluded.name RETURNING id, name, created_at IS NOT NULL"
            ),
        );
        assert_eq!(upsert, "5|Renamed|t");
        let defaults = one(
            &cluster,
            db,
            &format!("INSERT INTO \"{users}\" (email) VALUES ('fresh@example.com') RETURNING is_admin, created_at > now() - interval '1 minute', balance"),
        );
        assert_eq!(defaults, "f|t|0");
        one(&cluster, db, "INSERT INTO tags (name) VALUES ('a'), ('b')");
        let cascaded = one(
            &cluster,
            db,
            &format!("DELETE FROM \"{users}\" WHERE id = 1; SELECT count(*) FROM \"{posts}\" WHERE user_id = 1"),
        );
        assert_eq!(cascaded, "0");
        if style == Style::Hand {
            let err = cluster
                .psql(db, "UPDATE posts SET views = -1 WHERE id = 2")
                .unwrap_err()
                .to_string();
            assert!(err.contains("posts_check1"), "{err}");
        }
        drop(writer);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_convert_resumes_without_losing_or_doubling_rows() {
    let cluster = start_cluster();
    let dir = scratch("resume");
    cluster.psql("postgres", "CREATE DATABASE resume").unwrap();
    let file = dir.join("app.db");
    drop(sqlite_app::build(&file, Style::Hand, 4000));
    let config = write_config(
        &dir,
        &file,
        &cluster,
        "resume",
        Style::Hand.column_settings(),
    );
    let mut child = Command::new(BIN)
        .args(["convert", "--chunk-rows", "50", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let copied = cluster
            .psql(
                "resume",
                "SELECT coalesce(sum(rows), 0) FROM cutover.convert_progress",
            )
            .map(|s| s.trim().parse::<i64>().unwrap_or(0))
            .unwrap_or(0);
        if copied >= 500 {
            break;
        }
        assert!(Instant::now() < deadline, "convert never copied 500 rows");
        assert!(
            child.try_wait().unwrap().is_none(),
            "convert ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let unfinished = one(
        &cluster,
        "resume",
        "SELECT count(*) FROM cutover.convert_progress WHERE NOT done",
    );
    assert_ne!(unfinished, "0", "the kill landed after the copy");
    let partial = one(&cluster, "resume", "SELECT string_agg(table_name || '=' || rows, ',' ORDER BY 1) FROM cutover.convert_progress WHERE rows > 0");

    let out = cutover(&["convert"], &config);
    assert!(out.status.success(), "after {partial}: {}", text(&out));
    let map = schema_map(&file, Style::Hand, &cluster, &dir);
    let checks = cutover_sqlite::convert::verify(&file, &map, &[control(&cluster, "resume").await])
        .await
        .unwrap();
    for c in &checks {
        assert!(c.clean(), "{}: {:?}", c.table, c.differences);
    }
    // The keyless table (where a doubled chunk would go unnoticed by a key).
    assert_eq!(
        one(&cluster, "resume", "SELECT count(*) FROM \"AuditLog\""),
        "2000"
    );
    // A third run finds everything done and converts nothing again.
    let out = cutover(&["convert"], &config);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        one(&cluster, "resume", "SELECT count(*) FROM \"AuditLog\""),
        "2000"
    );

    // Verify sees a changed value, a lost row, an extra row, and a changed
    // row of a table without a key, and names what it can.
    cluster
        .psql(
            "resume",
            "UPDATE users SET balance = 149.98 WHERE id = 3; \
             DELETE FROM post_tags WHERE post_id = 5; \
             INSERT INTO tags (id, name) VALUES (9999, 'extra'); \
             UPDATE \"AuditLog\" SET message = 'changed' WHERE ctid = (SELECT min(ctid) FROM \"AuditLog\")",
        )
        .unwrap();
    let checks = cutover_sqlite::convert::verify(&file, &map, &[control(&cluster, "resume").await])
        .await
        .unwrap();
    let found = |table: &str| {
        let c = checks.iter().find(|c| c.table == table).unwrap();
        assert!(!c.clean(), "{table}");
        c.differences.join("\n")
    };
    assert!(
        found("users").contains(
            "key (3), column \"balance\": SQLite Some(\"149.99\"), PostgreSQL Some(\"149.98\")"
        ),
        "{}",
        found("users")
    );
    assert!(
        found("post_tags").contains("key (5, "),
        "{}",
        found("post_tags")
    );
    assert!(
        found("post_tags").contains("only in SQLite"),
        "{}",
        found("post_tags")
    );
    assert!(
        found("tags").contains("key (9999): only in PostgreSQL"),
        "{}",
        found("tags")
    );
    assert!(found("AuditLog")
        .contains("the table has no key; 2000 rows in SQLite and 2000 in PostgreSQL"));
    assert_eq!(checks.iter().filter(|c| !c.clean()).count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_are_named_and_nothing_is_converted() {
    let cluster = start_cluster();
    let dir = scratch("bad");
    cluster.psql("postgres", "CREATE DATABASE bad").unwrap();
    let file = dir.join("bad.db");
    let conn = Connection::open(&file).unwrap();
    conn.execute_batch(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, qty INTEGER, paid BOOLEAN, at DATETIME, note TEXT);
         INSERT INTO orders VALUES (1, 2, 1, '2024-01-01 10:00:00', 'fine');
         INSERT INTO orders VALUES (2, 'abc', 0, '2024-01-01 10:00:00', 'text in an integer column');
         INSERT INTO orders VALUES (3, 4, 'maybe', 'soon', 'neither boolean nor time');",
    )
    .unwrap();
    drop(conn);
    let config = write_config(&dir, &file, &cluster, "bad", "");
    let out = cutover(&["convert"], &config);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "\"orders\": key 2, column \"qty\": \"abc\"",
        "\"orders\": key 3, column \"paid\": \"maybe\"",
        "\"orders\": key 3, column \"at\": \"soon\"",
    ] {
        assert!(err.contains(expected), "{expected} in {err}");
    }
    assert_eq!(
        one(
            &cluster,
            "bad",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        "0",
        "nothing is created"
    );
    // The schema command reports the same values and still prints the DDL.
    let out = cutover(&["schema"], &config);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("key 2, column qty: \"abc\" does not fit bigint"));

    // An override settles it (the column is text on new) and convert runs;
    // a database that already holds the tables is then refused.
    let as_text = "[[schema.columns]]\ntable = \"orders\"\ncolumn = \"qty\"\ntype = \"text\"\n[[schema.columns]]\ntable = \"orders\"\ncolumn = \"paid\"\ntype = \"text\"\n[[schema.columns]]\ntable = \"orders\"\ncolumn = \"at\"\ntype = \"text\"\n";
    let settled = write_config(&dir, &file, &cluster, "bad", as_text);
    let out = cutover(&["convert"], &settled);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        one(&cluster, "bad", "SELECT qty FROM orders WHERE id = 2"),
        "abc"
    );
    cluster.psql("postgres", "CREATE DATABASE taken").unwrap();
    cluster
        .psql("taken", "CREATE TABLE orders (id int)")
        .unwrap();
    let taken = write_config(&dir, &file, &cluster, "taken", as_text);
    let out = cutover(&["convert"], &taken);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("the new database is not empty: \"orders\" already exist"),
        "{}",
        text(&out)
    );
}

#[test]
fn serve_refuses_a_sqlite_file_by_name() {
    let dir = scratch("serve");
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        "[old]\nurl = \"sqlite:///srv/app.db\"\n[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let out = cutover(&["serve"], &config);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "old.url is the SQLite file /srv/app.db: `cutover serve` cannot serve a SQLite file yet"
        ),
        "{}",
        text(&out)
    );
}
