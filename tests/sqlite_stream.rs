//! The SQLite change stream (issue 11's capture and apply): capture
//! installed in a fixture app's file, the file converted into PostgreSQL,
//! then writes of every kind made to the file by other connections (the
//! app's own process, a cron job), streamed through the change log and the
//! applier; afterwards every value of every table compares equal through
//! the schema map. A stream stopped between applying and trimming resumes
//! without applying anything twice.

mod support;

use cutover_pgcluster::{HostAuth, SUPERUSER, SUPERUSER_PASSWORD};
use cutover_sqlite::rusqlite::Connection;
use cutover_sqlite::SchemaMap;
use cutover_stream::sqlite_source::SqliteSource;
use std::process::Command;
use std::sync::Arc;
use support::sqlite_app::{self, Style};

const BIN: &str = env!("CARGO_BIN_EXE_cutover");

async fn control(cluster: &cutover_pgcluster::Cluster) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(
        &support::conn_string(support::direct_addr(cluster), SUPERUSER, SUPERUSER_PASSWORD),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    client
}

/// Writes an app and its neighbours make to the file: inserts with every
/// codec, updates, a key change, cascading deletes, REPLACE, upserts, a
/// blob, a rolled-back savepoint, and a table emptied.
fn writes(conn: &Connection, style: Style, round: i64) {
    let (u, p) = (style.users(), style.posts());
    let created: cutover_sqlite::rusqlite::types::Value = match style {
        Style::Drizzle => (1_750_000_000 + round).into(),
        Style::Prisma => (1_750_000_000_000 + round).into(),
        _ => format!(
            "2025-06-15T15:{:02}:{:02}.000Z",
            round / 60 % 60,
            round % 60
        )
        .into(),
    };
    conn.execute(
        &format!("INSERT INTO \"{u}\" (email, name, is_admin, active, created_at, balance) VALUES (?1, 'N', 1, 1, ?2, 7)"),
        cutover_sqlite::rusqlite::params![format!("stream{round}@example.com"), created],
    )
    .unwrap();
    conn.execute_batch(&format!(
        "UPDATE \"{p}\" SET views = views + 1, title = title || ' (edited)' WHERE id IN (2, 3, 4);
         UPDATE \"{u}\" SET name = 'renamed {round}' WHERE id = 5;
         DELETE FROM \"{p}\" WHERE id = {};
         INSERT INTO tags (name, slug) VALUES ('k{round}', 'k{round}');
         UPDATE tags SET id = id + 1000 WHERE slug = 'k{round}';
         INSERT INTO tags (name, slug) VALUES ('t{round}', 's{round}') ON CONFLICT (slug) DO UPDATE SET name = excluded.name;
         INSERT INTO tags (name, slug) VALUES ('t{round} again', 's{round}') ON CONFLICT (slug) DO UPDATE SET name = excluded.name;
         REPLACE INTO emptied (id, note) VALUES (1, 'replaced {round}');
         INSERT INTO handles (handle, deleted_at) VALUES ('h{round}', NULL), ('h{round}', '2024-01-01T00:00:00.000Z');
         REPLACE INTO handles (handle) VALUES ('h{round}');
         REPLACE INTO tags (name, slug) VALUES ('r{round}', 's{round}');
         INSERT INTO tags (name, slug) VALUES ('q{round}', 'q{round}');
         REPLACE INTO tags (id, name, slug) SELECT id, 'moved {round}', 'k{round}' FROM tags WHERE slug = 'q{round}';
         UPDATE \"{u}\" SET avatar = x'deadbeef00' WHERE id = 6;
         BEGIN; SAVEPOINT s; DELETE FROM tags; ROLLBACK TO s; RELEASE s; COMMIT;
         DELETE FROM post_tags WHERE post_id = {};",
        10 + round,
        20 + round
    ))
    .unwrap();
}

/// The map capture takes: the tables with a key, those without (which
/// capture refuses) moved to the skipped ones.
fn keyed(map: &SchemaMap) -> Arc<SchemaMap> {
    let (tables, keyless): (Vec<_>, Vec<_>) = map
        .tables
        .iter()
        .cloned()
        .partition(|t| !t.primary_key.is_empty());
    Arc::new(SchemaMap {
        tables,
        skipped: keyless
            .into_iter()
            .map(|t| (t.name, "no key".to_string()))
            .collect(),
    })
}

/// A table with a partial unique index, as soft-deleting apps have: one
/// live row per handle, any number of deleted ones.
fn add_handles(file: &std::path::Path) {
    Connection::open(file)
        .unwrap()
        .execute_batch(
            "CREATE TABLE handles (id INTEGER PRIMARY KEY, handle TEXT NOT NULL, deleted_at TEXT);
             CREATE UNIQUE INDEX handles_live ON handles (handle) WHERE deleted_at IS NULL;
             INSERT INTO handles (handle, deleted_at) VALUES
               ('a', NULL), ('a', '2024-01-01T00:00:00.000Z'), ('b', NULL);",
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_writes_stream_into_postgresql_and_compare_equal() {
    for style in [Style::Hand, Style::Drizzle, Style::Prisma] {
        let dir = std::env::temp_dir().join(format!(
            "cutover-sqlite-stream-{}-{}",
            std::process::id(),
            style.name()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("app.db");
        drop(sqlite_app::build(&file, style, 40));
        add_handles(&file);
        let pg = support::cluster(HostAuth::ScramSha256);
        let config_text = format!(
            "[old]\nurl = \"sqlite://{}\"\n\n[new]\nurl = \"{}\"\n{}",
            file.display(),
            pg.url(SUPERUSER, SUPERUSER_PASSWORD, support::DB),
            style.column_settings()
        );
        let config = cutover_config::Config::from_toml(&config_text).unwrap();
        let map = Arc::new(SchemaMap::read_file(&file, &config.schema_columns, 1).unwrap());

        // Capture, then the copy with nothing written meanwhile: the copy
        // is the file at log position 0, and the stream starts there.
        // (The live migration's own copy will read the file and the log's
        // position in one snapshot; convert is the offline copy.)
        let app = Connection::open(&file).unwrap();
        app.busy_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        app.pragma_update(None, "foreign_keys", "ON").unwrap();
        let problems = cutover_sqlite::capture::preconditions(&app, &map).unwrap();
        let unkeyed = problems
            .iter()
            .filter(|p| p.contains("no primary key"))
            .count();
        assert_eq!(unkeyed, problems.len(), "{problems:?}");
        // (The keyless table stays out of this test's capture.)
        let keyed = keyed(&map);
        writes(&app, style, 1);
        cutover_sqlite::capture::install(&app, &keyed).unwrap();
        assert_eq!(cutover_sqlite::capture::last_seq(&app).unwrap(), 0);
        let config_path = dir.join("convert.toml");
        std::fs::write(&config_path, &config_text).unwrap();
        let out = Command::new(BIN)
            .args(["convert", "--config"])
            .arg(&config_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "convert: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // Writes after the copy, by two connections, streamed.
        writes(&app, style, 2);
        let cron = Connection::open(&file).unwrap();
        cron.busy_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        cron.pragma_update(None, "foreign_keys", "ON").unwrap();
        writes(&cron, style, 3);
        let new = control(&pg).await;
        let mut source = SqliteSource::open(&file, keyed.clone(), &new)
            .await
            .unwrap();
        let first = source.pass(&new, 7).await.unwrap();
        assert_eq!(first.changes, 7);
        // A restart between passes resumes from PostgreSQL's position.
        drop(source);
        let mut source = SqliteSource::open(&file, keyed.clone(), &new)
            .await
            .unwrap();
        assert_eq!(source.applied(), first.position);
        source.drain(&new).await.unwrap();
        writes(&app, style, 4);
        source.drain(&new).await.unwrap();
        assert_eq!(
            cutover_sqlite::capture::read(&app, 0, 10).unwrap(),
            Vec::new(),
            "the log is trimmed once applied"
        );

        let checks = cutover_sqlite::convert::verify(
            &file,
            &keyed,
            &[control(&pg).await, control(&pg).await],
        )
        .await
        .unwrap();
        for check in &checks {
            assert!(
                check.clean(),
                "{}: {} differs after streaming: {:?}",
                style.name(),
                check.table,
                check.differences
            );
        }
        let users: i64 = new
            .query_one(
                &format!(
                    "SELECT count(*) FROM \"{}\" WHERE email LIKE 'stream%'",
                    style.users()
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(users, 4, "{}", style.name());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_under_concurrent_writes_and_the_stream_converge() {
    let style = Style::Hand;
    let dir = std::env::temp_dir().join(format!("cutover-sqlite-live-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("app.db");
    drop(sqlite_app::build(&file, style, 400));
    add_handles(&file);
    let pg = support::cluster(HostAuth::ScramSha256);
    let config_text = format!(
        "[old]\nurl = \"sqlite://{}\"\n\n[new]\nurl = \"{}\"\n{}",
        file.display(),
        pg.url(SUPERUSER, SUPERUSER_PASSWORD, support::DB),
        style.column_settings()
    );
    let config = cutover_config::Config::from_toml(&config_text).unwrap();
    let map = SchemaMap::read_file(&file, &config.schema_columns, 1).unwrap();
    let keyed = keyed(&map);
    let app = Connection::open(&file).unwrap();
    cutover_sqlite::capture::install(&app, &keyed).unwrap();

    // The app keeps writing while the copy runs, in small chunks.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (file, stop) = (file.clone(), stop.clone());
        std::thread::spawn(move || {
            let conn = Connection::open(&file).unwrap();
            conn.busy_timeout(std::time::Duration::from_secs(30))
                .unwrap();
            conn.pragma_update(None, "foreign_keys", "ON").unwrap();
            let mut round = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && round < 60 {
                writes(&conn, style, round);
                round += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            round
        })
    };
    let config_path = dir.join("convert.toml");
    std::fs::write(&config_path, &config_text).unwrap();
    let out = Command::new(BIN)
        .args(["convert", "--chunk-rows", "50", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = writer.join().unwrap();
    assert!(
        out.status.success(),
        "convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        rounds > 2,
        "the app wrote while the copy ran ({rounds} rounds)"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("change capture is installed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let new = control(&pg).await;
    let mut source = SqliteSource::open(&file, keyed.clone(), &new)
        .await
        .unwrap();
    source.drain(&new).await.unwrap();
    let checks =
        cutover_sqlite::convert::verify(&file, &keyed, &[control(&pg).await, control(&pg).await])
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
    let _ = std::fs::remove_dir_all(&dir);
}

/// A schema change in the file while capture runs (a new table, whose
/// writes no trigger logs; a new column, whose values the triggers leave
/// out) stops the stream naming it, before anything after it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_change_in_the_file_stops_the_stream_naming_it() {
    let style = Style::Hand;
    let dir = std::env::temp_dir().join(format!("cutover-sqlite-drift-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("app.db");
    drop(sqlite_app::build(&file, style, 20));
    let pg = support::cluster(HostAuth::ScramSha256);
    let map = SchemaMap::read_file(&file, &[], 1).unwrap();
    let keyed = keyed(&map);
    let app = Connection::open(&file).unwrap();
    cutover_sqlite::capture::install(&app, &keyed).unwrap();
    let config_path = dir.join("convert.toml");
    std::fs::write(
        &config_path,
        format!(
            "[old]\nurl = \"sqlite://{}\"\n\n[new]\nurl = \"{}\"\n",
            file.display(),
            pg.url(SUPERUSER, SUPERUSER_PASSWORD, support::DB)
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["convert", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = control(&pg).await;
    let mut source = SqliteSource::open(&file, keyed.clone(), &new)
        .await
        .unwrap();

    // An index is no drift: the stream goes on.
    app.execute_batch(
        "CREATE INDEX tags_name ON tags (name); INSERT INTO tags (name, slug) VALUES ('i', 'i');",
    )
    .unwrap();
    assert_eq!(source.pass(&new, 100).await.unwrap().changes, 1);
    let applied = source.applied();

    app.execute_batch(
        "INSERT INTO tags (name, slug) VALUES ('before', 'before');
         ALTER TABLE tags ADD COLUMN color TEXT;
         INSERT INTO tags (name, slug, color) VALUES ('after', 'after', 'red');",
    )
    .unwrap();
    let err = source.pass(&new, 100).await.unwrap_err().to_string();
    assert!(
        err.contains(
            r#"table "tags" has columns (id, name, slug, color) now; capture logs (id, name, slug)"#
        ),
        "{err}"
    );
    assert_eq!(source.applied(), applied, "nothing applied past the change");
    // A restarted stream refuses too, and so does a new table.
    app.execute_batch(
        "ALTER TABLE tags DROP COLUMN color; CREATE TABLE later (id INTEGER PRIMARY KEY);",
    )
    .unwrap();
    let err = SqliteSource::open(&file, keyed.clone(), &new)
        .await
        .err()
        .expect("a new table is refused")
        .to_string();
    assert!(
        err.contains(r#"table "later" was created after capture started"#)
            && err.contains("start the migration again"),
        "{err}"
    );
    // Undone, the stream goes on from where it stopped, losing nothing.
    app.execute_batch("DROP TABLE later").unwrap();
    let mut source = SqliteSource::open(&file, keyed.clone(), &new)
        .await
        .unwrap();
    source.drain(&new).await.unwrap();
    let names = new
        .query_one(
            "SELECT string_agg(name, ',' ORDER BY id) FROM tags WHERE name IN ('i', 'before', 'after')",
            &[],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    assert_eq!(names, "i,before,after");
}
