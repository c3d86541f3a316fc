//! `cutover convert` against pgloader on the same SQLite file, machine and
//! PostgreSQL: rows/s and MB/s on an app-shaped file of about a million
//! rows (mixed storage classes, a few blobs), then correctness on the
//! three DDL-style fixtures: each table of each tool's result compared
//! value by value with the file through the schema map, and each identity
//! checked against where SQLite would continue.
//!
//! Run: `cargo bench --bench convert`. Needs pgloader (`apt-get install
//! pgloader`); without it only cutover is measured. Tunables: BENCH_USERS
//! (default 110000, about nine rows each), BENCH_CHUNK_ROWS (default 10000).

#[path = "../tests/support/sqlite_app.rs"]
mod sqlite_app;

use cutover_pgcluster::{Cluster, ClusterOptions, HostAuth, SUPERUSER, SUPERUSER_PASSWORD};
use cutover_sqlite::SchemaMap;
use sqlite_app::Style;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_cutover");

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Builds the fixture, checkpointed and closed (pgloader reads the file
/// without its WAL otherwise).
fn fixture(path: &Path, style: Style, users: u64) {
    let conn = sqlite_app::build(path, style, users);
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    drop(conn);
}

fn rows_in(path: &Path) -> u64 {
    let conn = cutover_sqlite::open_read_only(path).unwrap();
    let map = SchemaMap::read(&conn, &[]).unwrap();
    map.tables
        .iter()
        .map(|t| {
            conn.query_row(&format!("SELECT count(*) FROM \"{}\"", t.name), [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap() as u64
        })
        .sum()
}

fn run_cutover(
    cluster: &Cluster,
    file: &Path,
    db: &str,
    settings: &str,
    chunk_rows: u64,
) -> (f64, bool, String) {
    cluster
        .psql("postgres", &format!("CREATE DATABASE {db}"))
        .unwrap();
    let config = file.with_extension(format!("{db}.toml"));
    std::fs::write(
        &config,
        format!(
            "[old]\nurl = \"sqlite://{}\"\n[new]\nurl = \"{}\"\n{settings}",
            file.display(),
            cluster.url(SUPERUSER, SUPERUSER_PASSWORD, db)
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = Command::new(BIN)
        .args([
            "convert",
            "--chunk-rows",
            &chunk_rows.to_string(),
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    (
        started.elapsed().as_secs_f64(),
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Rows in every user table of `db`, counted.
fn loaded_rows(cluster: &Cluster, db: &str) -> u64 {
    cluster
        .psql(
            db,
            "SELECT coalesce(sum((xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', schemaname, tablename), false, true, '')))[1]::text::bigint), 0) \
             FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'cutover')",
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap_or(0)
}

fn run_pgloader(cluster: &Cluster, file: &Path, db: &str) -> Option<(f64, bool, String)> {
    Command::new("pgloader").arg("--version").output().ok()?;
    cluster
        .psql("postgres", &format!("CREATE DATABASE {db}"))
        .unwrap();
    let started = Instant::now();
    let out = Command::new("pgloader")
        .arg(format!("sqlite://{}", file.display()))
        .arg(cluster.url(SUPERUSER, SUPERUSER_PASSWORD, db))
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((started.elapsed().as_secs_f64(), out.status.success(), log))
}

/// What is wrong with `table` as a tool left it in `db`: None when every
/// value and the identity are right.
async fn judge(
    cluster: &Cluster,
    db: &str,
    file: &Path,
    t: &cutover_sqlite::Table,
) -> Option<String> {
    let url =
        cutover_config::BackendUrl::parse(&cluster.url(SUPERUSER, SUPERUSER_PASSWORD, db)).unwrap();
    let pg = cutover_stream::control_client(&url, "bench").await.unwrap();
    let exists: Option<String> = pg
        .query_one("SELECT to_regclass(quote_ident($1))::text", &[&t.name])
        .await
        .unwrap()
        .get(0);
    if exists.is_none() {
        let lower: Option<String> = pg
            .query_one(
                "SELECT to_regclass(quote_ident(lower($1)))::text",
                &[&t.name],
            )
            .await
            .unwrap()
            .get(0);
        return Some(match lower {
            Some(l) => format!("table renamed to {l}"),
            None => "table missing".to_string(),
        });
    }
    let one = SchemaMap {
        tables: vec![t.clone()],
        skipped: Vec::new(),
    };
    let mut wrong = Vec::new();
    match cutover_sqlite::convert::verify(file, &one, std::slice::from_ref(&pg)).await {
        Ok(checks) if checks[0].clean() => {}
        Ok(checks) => {
            let c = &checks[0];
            let first = c.differences.first().cloned().unwrap_or_default();
            let first: String = first.chars().take(110).collect();
            wrong.push(format!(
                "{} diffs ({} vs {} rows), e.g. {first}",
                c.differences.len(),
                c.sqlite_rows,
                c.postgres_rows
            ));
        }
        Err(e) => wrong.push(format!(
            "unreadable: {}",
            e.to_string().chars().take(100).collect::<String>()
        )),
    }
    if let (Some(id), Some(next)) = (&t.rowid_alias, t.next_id) {
        let sequence: Option<String> = pg
            .query_one(
                "SELECT pg_get_serial_sequence(quote_ident($1), $2)",
                &[&t.name, id],
            )
            .await
            .unwrap()
            .get(0);
        match sequence {
            None => wrong.push("no identity or sequence".to_string()),
            Some(seq) => {
                let row = pg
                    .query_one(&format!("SELECT last_value, is_called FROM {seq}"), &[])
                    .await
                    .unwrap();
                let (last, called): (i64, bool) = (row.get(0), row.get(1));
                let given = if called { last + 1 } else { last };
                if given != next {
                    wrong.push(format!("next id {given}, SQLite's {next}"));
                }
            }
        }
    }
    (!wrong.is_empty()).then(|| wrong.join("; "))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let users = env_or("BENCH_USERS", 110_000);
    let chunk_rows = env_or("BENCH_CHUNK_ROWS", 10_000);
    let dir = std::env::temp_dir().join(format!("cutover-bench-convert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = Cluster::start(ClusterOptions {
        host_auth: HostAuth::ScramSha256,
        settings: vec![],
        ..Default::default()
    })
    .expect("start PostgreSQL");

    for (style, what) in [
        (Style::Hand, "the hand-written app, every trap in it"),
        (
            Style::Plain,
            "the same app stored one way per column (pgloader loads it whole)",
        ),
    ] {
        let big = dir.join(format!("big-{}.db", style.name()));
        let built = Instant::now();
        fixture(&big, style, users);
        let rows = rows_in(&big);
        let mb = std::fs::metadata(&big).unwrap().len() as f64 / 1e6;
        println!(
            "\nfile: {what}: {rows} rows, {mb:.1} MB (built in {:.1}s)",
            built.elapsed().as_secs_f64()
        );
        let ours_db = format!("cutover_big_{}", style.name());
        let (secs, ok, log) = run_cutover(
            &cluster,
            &big,
            &ours_db,
            style.column_settings(),
            chunk_rows,
        );
        assert!(ok, "cutover convert failed: {log}");
        println!("{log}");
        let copied_at = log
            .lines()
            .find(|l| l.starts_with("cutover: ANALYZE at "))
            .and_then(|l| {
                l.trim_start_matches("cutover: ANALYZE at ")
                    .trim_end_matches('s')
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(secs);
        let ours = rows as f64 / secs;
        println!(
            "cutover convert: {secs:.2}s, {ours:.0} rows/s, {:.1} MB/s with ANALYZE and verify; \
             {copied_at:.2}s, {:.0} rows/s to schema, rows, keys, indexes and foreign keys",
            mb / secs,
            rows as f64 / copied_at
        );
        match run_pgloader(&cluster, &big, &format!("pgloader_big_{}", style.name())) {
            None => println!("pgloader: not installed (apt-get install pgloader); no ratio"),
            Some((secs, ok, log)) => {
                let theirs = rows as f64 / secs;
                println!(
                    "pgloader:        {secs:.2}s, {theirs:.0} rows/s, {:.1} MB/s{}",
                    mb / secs,
                    if ok { "" } else { " (exited non-zero)" }
                );
                let loaded = loaded_rows(&cluster, &format!("pgloader_big_{}", style.name()));
                println!(
                    "pgloader loaded {loaded} of the {rows} rows ({:.0} loaded rows/s); its first errors:",
                    loaded as f64 / secs
                );
                for line in log.lines().filter(|l| l.contains("ERROR")).take(3) {
                    println!("  {}", line.chars().take(160).collect::<String>());
                }
                println!(
                    "ratio: cutover {:.2}x pgloader's rows/s with verify, {:.2}x without",
                    ours / theirs,
                    rows as f64 / copied_at / theirs
                );
            }
        }
    }

    println!("\ncorrectness on the three DDL-style fixtures (2000 users each):");
    println!("{:<8} {:<22} {:<10} pgloader", "style", "table", "cutover");
    for style in [Style::Hand, Style::Drizzle, Style::Prisma] {
        let file = dir.join(format!("{}.db", style.name()));
        fixture(&file, style, 2000);
        let ours_db = format!("cutover_{}", style.name());
        let (_, ok, log) = run_cutover(
            &cluster,
            &file,
            &ours_db,
            style.column_settings(),
            chunk_rows,
        );
        assert!(ok, "cutover convert failed on {style:?}: {log}");
        let theirs_db = format!("pgloader_{}", style.name());
        let pgloader = run_pgloader(&cluster, &file, &theirs_db);
        if let Some((_, _, log)) = &pgloader {
            if let Some(line) = log
                .lines()
                .find(|l| l.contains("ERROR") || l.contains("FATAL"))
            {
                println!(
                    "{:<8} pgloader's first error: {}",
                    style.name(),
                    line.chars().take(200).collect::<String>()
                );
            }
        }
        let config = cutover_config::Config::from_toml(&format!(
            "[old]\nurl = \"sqlite://{}\"\n{}",
            file.display(),
            style.column_settings()
        ))
        .unwrap();
        let map = SchemaMap::read(
            &cutover_sqlite::open_read_only(&file).unwrap(),
            &config.schema_columns,
        )
        .unwrap();
        let (mut our_wrong, mut their_wrong) = (0, 0);
        for t in &map.tables {
            let ours = judge(&cluster, &ours_db, &file, t).await;
            let theirs = match &pgloader {
                None => Some("not run".to_string()),
                Some(_) => judge(&cluster, &theirs_db, &file, t).await,
            };
            our_wrong += usize::from(ours.is_some());
            their_wrong += usize::from(theirs.is_some());
            println!(
                "{:<8} {:<22} {:<10} {}",
                style.name(),
                t.name,
                ours.as_deref().unwrap_or("exact"),
                theirs.as_deref().unwrap_or("exact")
            );
        }
        println!(
            "{:<8} wrong tables: cutover {our_wrong}/{n}, pgloader {their_wrong}/{n}",
            style.name(),
            n = map.tables.len()
        );
    }
}
