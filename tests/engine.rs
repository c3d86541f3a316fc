//! The SQLite engine against PostgreSQL itself: each fixture app's file
//! (hand-written, drizzle-kit and Prisma DDL, tests/support/sqlite_app.rs)
//! is converted into a real PostgreSQL by `cutover convert`, then served by
//! the engine, and the same statements run on both. Result types, values
//! (text and binary), parameter types, command tags, transaction status and
//! SQLSTATEs must be identical.

mod support;

use cutover_pgcluster::{Cluster, HostAuth, SUPERUSER, SUPERUSER_PASSWORD};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime};
use support::sqlite_app::{self, Style};
use support::{fe as frontend, Msg, RawClient};
use tokio_postgres::types::{FromSql, ToSql, Type};

const BIN: &str = env!("CARGO_BIN_EXE_cutover");

/// Both sides of a comparison: cutover serving the fixture file through
/// its engine, and PostgreSQL holding the same file converted.
struct Sides {
    engine: SocketAddr,
    pg: Cluster,
    style: Style,
    file: PathBuf,
    _server: cutover::Server,
}

async fn sides(style: Style) -> Sides {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "cutover-engine-{}-{}-{n}",
        std::process::id(),
        style.name()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("app.db");
    drop(sqlite_app::build(&file, style, 40));
    let pg = support::cluster(HostAuth::ScramSha256);
    let config_text = format!(
        "[old]\nurl = \"sqlite://{}\"\n\n[new]\nurl = \"{}\"\n{}",
        file.display(),
        pg.url(SUPERUSER, SUPERUSER_PASSWORD, support::DB),
        style.column_settings()
    );
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
    let server = support::start_proxy_with(&format!(
        "{}\n{}",
        serve_config(&file, "127.0.0.1:0", "127.0.0.1:0"),
        style.column_settings()
    ))
    .await;
    Sides {
        engine: server.proxy_addr,
        pg,
        style,
        file,
        _server: server,
    }
}

impl Sides {
    async fn clients(&self) -> (tokio_postgres::Client, tokio_postgres::Client) {
        let connect = |conn: String| async move {
            let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            client
        };
        let e = connect(support::conn_string(
            self.engine,
            support::APP_USER,
            support::APP_PASSWORD,
        ))
        .await;
        let p = connect(support::conn_string(
            support::direct_addr(&self.pg),
            SUPERUSER,
            SUPERUSER_PASSWORD,
        ))
        .await;
        (e, p)
    }

    async fn raw(&self) -> (RawClient, RawClient) {
        (
            RawClient::connect(self.engine, support::APP_USER, support::APP_PASSWORD, &[]).await,
            RawClient::connect(
                support::direct_addr(&self.pg),
                SUPERUSER,
                SUPERUSER_PASSWORD,
                &[],
            )
            .await,
        )
    }

    /// `sql` with `{u}` and `{p}` naming this style's users and posts tables.
    fn sql(&self, sql: &str) -> String {
        sql.replace("{u}", &format!("\"{}\"", self.style.users()))
            .replace("{p}", &format!("\"{}\"", self.style.posts()))
    }
}

/// A value as its raw bytes, whatever the type.
#[derive(Debug, PartialEq)]
struct Raw(Option<Vec<u8>>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw.to_vec())))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// What a statement gave over the extended protocol with binary results.
#[derive(Debug, PartialEq)]
enum Extended {
    Rows {
        params: Vec<Type>,
        columns: Vec<(String, Type)>,
        rows: Vec<Vec<Raw>>,
    },
    Error(String),
}

async fn extended(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Extended {
    let statement = match client.prepare(sql).await {
        Ok(s) => s,
        Err(e) => return Extended::Error(support::sqlstate(&e)),
    };
    let rows = match client.query(&statement, params).await {
        Ok(r) => r,
        Err(e) => return Extended::Error(support::sqlstate(&e)),
    };
    Extended::Rows {
        params: statement.params().to_vec(),
        columns: statement
            .columns()
            .iter()
            .map(|c| (c.name().to_string(), c.type_().clone()))
            .collect(),
        rows: rows
            .iter()
            .map(|r| (0..r.len()).map(|i| r.get::<_, Raw>(i)).collect())
            .collect(),
    }
}

/// The messages of a simple query, comparable across servers: row
/// descriptions without table OIDs and column numbers, errors by SQLSTATE,
/// notices and parameter reports dropped.
fn comparable(msgs: Vec<Msg>) -> Vec<String> {
    msgs.into_iter()
        .filter(|m| !matches!(m.tag, 'N' | 'S'))
        .map(|m| match m.tag {
            'T' => {
                let mut out = String::from("T");
                let body = &m.body;
                let fields = i16::from_be_bytes([body[0], body[1]]);
                let mut at = 2;
                for _ in 0..fields {
                    let end = at + body[at..].iter().position(|b| *b == 0).unwrap();
                    let name = String::from_utf8_lossy(&body[at..end]).into_owned();
                    at = end + 1;
                    let oid = u32::from_be_bytes(body[at + 6..at + 10].try_into().unwrap());
                    let size = i16::from_be_bytes(body[at + 10..at + 12].try_into().unwrap());
                    out.push_str(&format!(" {name}:{oid}:{size}"));
                    at += 18;
                }
                out
            }
            'E' => format!("E {}", support::error_fields(&m.body).0),
            'D' => format!("D {}", String::from_utf8_lossy(&m.body)),
            'C' => format!("C {}", String::from_utf8_lossy(&m.body)),
            'Z' => format!("Z {}", m.body[0] as char),
            other => format!("{other}"),
        })
        .collect()
}

/// Reads every fixture app runs, in text (simple protocol) and binary
/// (extended protocol).
const READS: &[&str] = &[
    "SELECT id, email, name, is_admin, active, created_at, birthday, prefs, nickname, balance FROM {u} ORDER BY id LIMIT 5",
    "SELECT count(*) FROM {u}",
    "SELECT count(*) AS n, max(id) AS top FROM {p} WHERE views > 3",
    "SELECT id, title, price, views, score FROM {p} WHERE user_id = 3 ORDER BY id",
    "SELECT id, deleted_at FROM {p} ORDER BY deleted_at DESC, id LIMIT 6",
    "SELECT id, deleted_at FROM {p} ORDER BY deleted_at ASC NULLS FIRST, id LIMIT 6",
    "SELECT u.email, count(p.id) AS posts FROM {u} u LEFT JOIN {p} p ON p.user_id = u.id GROUP BY u.email ORDER BY posts DESC, u.email LIMIT 10",
    "SELECT id FROM {u} WHERE email ILIKE '%USER1%' ORDER BY id",
    "SELECT id, email ~ '^user1[0-9]?@', email ~* 'USER2', email !~ 'example', regexp_replace(email, '@.*$', ''), regexp_replace(email, '([a-z]+)([0-9]+)', '\\2-\\1', 'g') FROM {u} ORDER BY id LIMIT 12",
    "SELECT count(*) FROM {u} WHERE email OPERATOR(pg_catalog.~) '^user' COLLATE pg_catalog.default",
    // String, math and JSON functions (builtins.rs).
    "SELECT id, split_part(email, '@', 1), strpos(email, '@'), left(email, 3), right(email, 4), lpad(id::text, 4, '0'), rpad(left(email, 2), 4, '*'), initcap(name), char_length(email), octet_length(name), md5(email), concat_ws('/', email, NULL, id), substring(email from 2 for 3), position('@' in email), reverse(left(email, 4)), translate(left(email, 5), 'user', 'USER'), starts_with(email, 'user1') FROM {u} ORDER BY id LIMIT 6",
    "SELECT ceil(2.5), floor(-2.5), ceil(7), mod(-7, 3), power(2, 10), sqrt(2), ln(2), log(1000), exp(1), sign(-3), trunc(2.345, 1), greatest(1, NULL, 3), least('b', 'a'), pi(), repeat('ab', 2), btrim('xxaxx', 'x'), chr(65), ascii('A')",
    "SELECT jsonb_set('{\"a\":1}'::jsonb, '{a}', '2'), jsonb_set('{\"a\":[1,2]}'::jsonb, '{a,-1}', '9'), jsonb_array_length('[1,2,3]'::jsonb), jsonb_typeof('{}'::jsonb), jsonb_extract_path_text('{\"a\":{\"b\":1}}'::jsonb, 'a', 'b'), jsonb_strip_nulls('{\"a\":null,\"b\":[1]}'::jsonb), to_timestamp(1700000000.5)",
    "SELECT string_agg(email, ',' ORDER BY id DESC) FROM {u} WHERE id < 4",
    "SELECT id, to_char(created_at, 'YYYY-MM-DD HH24:MI:SS'), to_char(created_at, 'FMDay, FMMonth DD YYYY HH12:MI AM'), to_char(created_at, 'IYYY-IW-ID Q DDD'), to_char(birthday, 'DD Mon YYYY') FROM {u} ORDER BY id LIMIT 6",
    // LIKE's default escape is the backslash; E'' strings carry escapes.
    "SELECT 'a_b' LIKE 'a\\_b', 'ab' LIKE 'a\\_b', 'a%' LIKE 'a\\%', 'A_b' ILIKE 'a\\_B', 'a_b' LIKE 'a#_b' ESCAPE '#', E'x\\\\y' = 'x\\y', E'a\\tb'",
    "SELECT count(*) FROM {u} WHERE email LIKE E'user1\\_%' OR email NOT LIKE 'user_%'",
    "SELECT id FROM {u} WHERE name LIKE 'a%' ORDER BY id",
    "SELECT id, is_admin FROM {u} WHERE is_admin ORDER BY id",
    "SELECT id FROM {u} WHERE is_admin = false AND id < 6 ORDER BY id",
    "SELECT id FROM {u} WHERE NOT is_admin AND id < 6 ORDER BY id",
    "SELECT current_database(), current_schema()",
    "SELECT 1 AS one, 'a' AS a, true AS t, 1.5 AS n, 2 + 3 AS five, 7 / 2 AS half",
    "SELECT coalesce(nickname, 'none') AS nick FROM {u} ORDER BY id LIMIT 4",
    "SELECT id, created_at FROM {u} WHERE created_at > '2024-03-01 13:00:00+00' ORDER BY created_at, id LIMIT 3",
    "SELECT id, prefs FROM {u} WHERE prefs IS NOT NULL ORDER BY id LIMIT 3",
    "SELECT sum(views) AS total, avg(views) AS mean FROM {p}",
    "SELECT id, title FROM {p} WHERE id IN (1, 2, 3) ORDER BY id",
    "SELECT id, title FROM {p} WHERE views BETWEEN 2 AND 4 ORDER BY id LIMIT 5",
    "SELECT EXISTS (SELECT 1 FROM {u} WHERE id = 1) AS there",
    "SELECT id FROM {p} ORDER BY id LIMIT 3 OFFSET 2",
    "WITH recent AS (SELECT id, user_id FROM {p} ORDER BY id DESC LIMIT 5) SELECT count(*) FROM recent",
    "SELECT json_build_object('id', id, 'admin', is_admin, 'at', created_at, 'prefs', prefs) AS doc FROM {u} ORDER BY id LIMIT 3",
    "SELECT jsonb_build_object('id', id, 'title', title) AS doc FROM {p} ORDER BY id LIMIT 2",
    "SELECT coalesce(json_agg(json_build_array(id, title) ORDER BY id DESC), '[]'::json) AS posts FROM {p} WHERE user_id = 3",
    "SELECT u.id, x.data FROM {u} u LEFT JOIN LATERAL (SELECT count(*) AS data FROM {p} p WHERE p.user_id = u.id) x ON true ORDER BY u.id LIMIT 4",
    "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relname = 'tags' AND n.nspname = 'public' AND pg_catalog.pg_table_is_visible(c.oid) AND c.relkind = ANY(ARRAY['r', 'p', 'f', 'v', 'm'])",
    "SELECT oid, typname, typlen, typarray FROM pg_catalog.pg_type WHERE oid IN (16, 20, 25, 1184, 3802) ORDER BY oid",
    "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid WHERE c.relname = 'tags' AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
    "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' AND table_name IN ('tags', 'emptied') ORDER BY 1",
    "SELECT column_name::text, data_type::text, is_nullable::text FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'tags' ORDER BY ordinal_position",
    "SELECT current_setting('standard_conforming_strings'), pg_catalog.version() LIKE 'PostgreSQL 15%' AS v",
    "SELECT id, created_at + interval '1 month' AS next, created_at - '36 hours'::interval AS before FROM {u} ORDER BY id LIMIT 3",
    "SELECT date_trunc('day', created_at) AS d, count(*) FROM {u} GROUP BY 1 ORDER BY 1 LIMIT 3",
    "SELECT extract(year FROM created_at) AS y, extract(epoch FROM created_at) AS e, date_part('hour', created_at) AS h FROM {u} ORDER BY id LIMIT 3",
    "SELECT birthday, birthday + 30 AS later, birthday - 1 AS before FROM {u} WHERE birthday IS NOT NULL ORDER BY id LIMIT 3",
    "SELECT id, price * 3 AS triple, price + 0.1 AS more FROM {p} WHERE price IS NOT NULL ORDER BY id LIMIT 4",
    "SELECT count(*) FROM {p} WHERE published_at > '2024-03-01 00:00:00+00'::timestamptz + interval '2 days'",
    "SELECT sum(price) > 100 AS big, avg(views) < 1000000 AS small FROM {p}",
    "SELECT DISTINCT ON (user_id) user_id, id, title FROM {p} ORDER BY user_id, views DESC, id LIMIT 5",
    "SELECT DISTINCT ON (p.user_id) p.user_id AS author, u.email FROM {p} p JOIN {u} u ON u.id = p.user_id WHERE p.views > 1 ORDER BY p.user_id DESC, p.id",
    "SELECT id, prefs || '{\"theme\": \"x\", \"new\": [1]}'::jsonb AS merged, prefs -> 'nested' AS nested, prefs ->> 'theme' AS theme FROM {u} WHERE prefs IS NOT NULL ORDER BY id LIMIT 3",
    "SELECT nope FROM {u}",
    "SELECT * FROM no_such_table",
    "SELECT 1 / 0",
    "SHOW transaction_isolation",
    "SHOW standard_conforming_strings",
    "SHOW TRANSACTION ISOLATION LEVEL",
    // Prisma's relationJoins: nested subqueries in FROM under a one-row LATERAL.
    r#"SELECT "t1"."id", "t1"."email", "User_posts"."__prisma_data__" AS "posts" FROM {u} AS "t1" LEFT JOIN LATERAL (SELECT COALESCE(JSONB_AGG("__prisma_data__"), '[]') AS "__prisma_data__" FROM (SELECT "t4"."__prisma_data__" FROM (SELECT JSONB_BUILD_OBJECT('id', "t3"."id", 'title', "t3"."title") AS "__prisma_data__", "t3"."id" FROM (SELECT "t2".* FROM {p} AS "t2" WHERE "t1"."id" = "t2"."user_id") AS "t3") AS "t4" ORDER BY "t4"."id" ASC) AS "t5") AS "User_posts" ON true WHERE "t1"."id" <= 3 ORDER BY "t1"."id""#,
    "SELECT s.who, s.total, s.total + 1 AS more FROM (SELECT user_id AS who, sum(views) AS total FROM {p} GROUP BY user_id) AS s ORDER BY s.who LIMIT 3",
    "SELECT v.n * 2 AS twice, v.label FROM (VALUES (1, 'a'), (2, 'b')) AS v (n, label) ORDER BY v.n DESC",
    "SELECT s.who, s.total FROM (SELECT user_id, sum(views) FROM {p} GROUP BY user_id) AS s (who, total) ORDER BY s.who LIMIT 3",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_match_postgresql_in_every_fixture_style() {
    for style in [Style::Hand, Style::Drizzle, Style::Prisma] {
        let sides = sides(style).await;
        let (e, p) = sides.clients().await;
        let (mut re, mut rp) = sides.raw().await;
        for sql in READS {
            let sql = sides.sql(sql);
            let (te, tp) = (
                comparable(re.exchange(&frontend::query(&sql), 1).await),
                comparable(rp.exchange(&frontend::query(&sql), 1).await),
            );
            assert_eq!(te, tp, "{} text: {sql}", style.name());
            let (be, bp) = (extended(&e, &sql, &[]).await, extended(&p, &sql, &[]).await);
            assert_eq!(be, bp, "{} binary: {sql}", style.name());
        }
        let _ = &sides.file;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_are_typed_and_bound_as_postgresql_does() {
    let sides = sides(Style::Prisma).await;
    let (e, p) = sides.clients().await;
    let since = SystemTime::UNIX_EPOCH + Duration::from_secs(sqlite_app::EPOCH as u64 + 7200);
    let ids: Vec<i64> = vec![5, 1, 3, 99];
    let emails: Vec<&str> = vec!["user2@example.com", "nobody"];
    let cases: Vec<(&str, Vec<&(dyn ToSql + Sync)>)> = vec![
        (
            "SELECT id, title FROM {p} WHERE user_id = $1 ORDER BY id LIMIT $2",
            vec![&3i32, &5i64],
        ),
        (
            "SELECT id FROM {u} WHERE id > $2 AND id < $1 ORDER BY id",
            vec![&9i32, &4i32],
        ),
        (
            "SELECT id, created_at FROM {u} WHERE created_at >= $1 ORDER BY id LIMIT 3",
            vec![&since],
        ),
        (
            "SELECT id FROM {u} WHERE is_admin = $1 ORDER BY id LIMIT 3",
            vec![&true],
        ),
        (
            "SELECT id FROM {u} WHERE email ILIKE $1 ORDER BY id",
            vec![&"%user2%"],
        ),
        ("SELECT $1::int + 1 AS n", vec![&41i32]),
        (
            "SELECT id FROM {p} ORDER BY id LIMIT $1 OFFSET $2",
            vec![&2i64, &3i64],
        ),
        (
            "SELECT id, email FROM {u} WHERE id = ANY($1) ORDER BY id",
            vec![&ids],
        ),
        (
            "SELECT id FROM {u} WHERE email <> ALL($1) AND id < 5 ORDER BY id",
            vec![&emails],
        ),
    ];
    for (sql, params) in cases {
        let sql = sides.sql(sql);
        let (be, bp) = (
            extended(&e, &sql, &params).await,
            extended(&p, &sql, &params).await,
        );
        assert_eq!(be, bp, "{sql}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prismas_statement_shapes_match_postgresql() {
    let sides = sides(Style::Prisma).await;
    let (e, p) = sides.clients().await;
    let cases: Vec<(&str, Vec<&(dyn ToSql + Sync)>)> = vec![
        (
            r#"SELECT "public"."User"."id", "public"."User"."email", "public"."User"."is_admin" FROM "public"."User" WHERE ("public"."User"."id" >= $1 AND 1=1) ORDER BY "public"."User"."id" ASC LIMIT $2 OFFSET $3"#,
            vec![&2i64, &3i64, &1i64],
        ),
        (
            r#"SELECT COUNT(*) AS "_count._all" FROM (SELECT "public"."Post"."id" FROM "public"."Post" WHERE 1=1 OFFSET $1) AS "sub""#,
            vec![&5i64],
        ),
        (
            r#"SELECT "public"."Post"."user_id", COUNT("public"."Post"."id") AS "_count$id" FROM "public"."Post" WHERE "public"."Post"."views" > $1 GROUP BY "public"."Post"."user_id" ORDER BY "public"."Post"."user_id" ASC LIMIT $2"#,
            vec![&2i64, &4i64],
        ),
        (
            r#"INSERT INTO "public"."tags" ("name","slug") VALUES ($1,$2), ($3,$4) ON CONFLICT DO NOTHING"#,
            vec![&"a", &"p-a", &"b", &"p-b"],
        ),
        (
            r#"INSERT INTO "public"."tags" ("name","slug") VALUES ($1,$2), ($3,$4) ON CONFLICT DO NOTHING"#,
            vec![&"a", &"p-a", &"c", &"p-c"],
        ),
        (
            r#"SELECT "public"."tags"."name" FROM "public"."tags" WHERE "public"."tags"."slug" IN ($1,$2,$3) ORDER BY "public"."tags"."name""#,
            vec![&"p-a", &"p-b", &"p-c"],
        ),
    ];
    for (sql, params) in cases {
        let (be, bp) = (
            extended(&e, sql, &params).await,
            extended(&p, sql, &params).await,
        );
        assert_eq!(be, bp, "{sql}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_keep_ids_constraints_and_the_files_conventions() {
    for style in [Style::Hand, Style::Drizzle, Style::Prisma] {
        let sides = sides(style).await;
        let (e, p) = sides.clients().await;
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
        let (emails, names, admins, times) = (
            vec!["u1@example.com", "u2@example.com"],
            vec!["U1", "U2"],
            vec![true, false],
            vec![at, at],
        );
        let cases: Vec<(&str, Vec<&(dyn ToSql + Sync)>)> = vec![
            ("INSERT INTO tags (name, slug) VALUES ($1, $2) RETURNING id, name, slug", vec![&"Rust", &"rust"]),
            ("INSERT INTO tags (name, slug) VALUES ($1, $2) RETURNING id", vec![&"Dup", &"rust"]),
            ("INSERT INTO tags (name, slug) VALUES ($1, $2) ON CONFLICT (slug) DO UPDATE SET name = excluded.name RETURNING id, name", vec![&"Rust!", &"rust"]),
            ("INSERT INTO tags (slug) VALUES ($1)", vec![&"nameless"]),
            ("INSERT INTO {u} (email, name, is_admin, created_at, balance) VALUES ($1, $2, $3, $4, 0) RETURNING id, is_admin, created_at, active", vec![&"new@example.com", &"New", &true, &at]),
            ("UPDATE {p} SET views = views + 1 WHERE id = $1 RETURNING id, views", vec![&2i32]),
            ("UPDATE {u} SET is_admin = $1, created_at = $2 WHERE email = $3 RETURNING is_admin, created_at", vec![&false, &at, &"new@example.com"]),
            ("DELETE FROM tags WHERE slug = $1", vec![&"rust"]),
            ("DELETE FROM {p} WHERE id = $1 RETURNING id", vec![&1i32]),
            ("SELECT count(*) FROM post_tags", vec![]),
            // INSERT ... SELECT (SQLAlchemy's and Django's multi-row forms).
            ("INSERT INTO {u} (email, name, is_admin, created_at, balance) SELECT e, 'Sel', a, c, 0 FROM (VALUES ($1::text, $2::boolean, $3::timestamptz)) AS v (e, a, c) RETURNING id, is_admin, created_at", vec![&"selected@example.com", &true, &at]),
            ("INSERT INTO {u} (email, name, is_admin, created_at) SELECT * FROM UNNEST($1::text[], $2::text[], $3::boolean[], $4::timestamptz[]) RETURNING id, email, is_admin, created_at", vec![&emails, &names, &admins, &times]),
        ];
        for (sql, params) in cases {
            let sql = sides.sql(sql);
            let (be, bp) = (
                extended(&e, &sql, &params).await,
                extended(&p, &sql, &params).await,
            );
            assert_eq!(be, bp, "{}: {sql}", style.name());
        }
        // ISO text keeps microseconds (epoch columns keep their own
        // precision, README).
        if matches!(style, Style::Hand) {
            let fine = SystemTime::UNIX_EPOCH + Duration::from_micros(1_750_000_000_123_456);
            let sql = sides.sql(
                "UPDATE {u} SET created_at = $1 WHERE email = $2 RETURNING created_at, created_at = '2025-06-15 15:06:40.123456+00'",
            );
            let params: Vec<&(dyn ToSql + Sync)> = vec![&fine, &"u2@example.com"];
            let (be, bp) = (
                extended(&e, &sql, &params).await,
                extended(&p, &sql, &params).await,
            );
            assert_eq!(be, bp, "microseconds: {sql}");
        }
        // The file keeps its own storage forms for what the engine wrote.
        let file = cutover_sqlite::rusqlite::Connection::open(&sides.file).unwrap();
        let (admin, created): (
            cutover_sqlite::rusqlite::types::Value,
            cutover_sqlite::rusqlite::types::Value,
        ) = file
            .query_row(
                &sides.sql("SELECT is_admin, created_at FROM {u} WHERE email = 'new@example.com'"),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        use cutover_sqlite::rusqlite::types::Value;
        assert_eq!(admin, Value::Integer(0), "{}", style.name());
        let expected_created = match style {
            Style::Drizzle => Value::Integer(1_750_000_000),
            Style::Prisma => Value::Integer(1_750_000_000_000),
            _ => Value::Text("2025-06-15T15:06:40.000Z".to_string()),
        };
        assert_eq!(created, expected_created, "{}", style.name());
        for email in ["selected@example.com", "u1@example.com"] {
            let (admin, created): (Value, Value) = file
                .query_row(
                    &sides.sql("SELECT is_admin, created_at FROM {u} WHERE email = ?1"),
                    [email],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!(admin, Value::Integer(1), "{} {email}", style.name());
            assert_eq!(created, expected_created, "{} {email}", style.name());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_behave_as_in_postgresql() {
    let sides = sides(Style::Hand).await;
    let (mut re, mut rp) = sides.raw().await;
    let script = [
        "BEGIN",
        "INSERT INTO tags (name, slug) VALUES ('t1', 't1')",
        "SELECT name FROM tags WHERE slug = 't1'",
        "SAVEPOINT a",
        "INSERT INTO tags (name, slug) VALUES ('t1', 't1')",
        "SELECT 1",
        "ROLLBACK TO SAVEPOINT a",
        "SELECT count(*) FROM tags WHERE slug = 't1'",
        "COMMIT",
        "SELECT count(*) FROM tags WHERE slug = 't1'",
        "BEGIN",
        "SELECT * FROM no_such_table",
        "SELECT 1",
        "COMMIT",
        "ROLLBACK",
        "BEGIN; DELETE FROM tags WHERE slug = 't1'; ROLLBACK",
        "SELECT count(*) FROM tags WHERE slug = 't1'",
        "",
        "SAVEPOINT outside",
        // One query string is one implicit transaction: the failing second
        // insert takes back the first.
        "INSERT INTO tags (name, slug) VALUES ('m1', 'm1'); INSERT INTO tags (name, slug) VALUES ('m1', 'm1')",
        "SELECT count(*) FROM tags WHERE slug = 'm1'",
        "INSERT INTO tags (name, slug) VALUES ('m2', 'm2'); SELECT count(*) FROM tags WHERE slug = 'm2'; SELECT now() = statement_timestamp()",
        "SELECT count(*) FROM tags WHERE slug = 'm2'",
        "BEGIN; INSERT INTO tags (name, slug) VALUES ('m3', 'm3'); COMMIT; INSERT INTO tags (name, slug) VALUES ('m3', 'm3')",
        "SELECT count(*) FROM tags WHERE slug = 'm3'",
        "UPDATE tags SET name = 'm4' WHERE slug = 'm2'; SELECT 1/0",
        "SELECT name FROM tags WHERE slug = 'm2'",
        // Settings end with their transaction: SET LOCAL at its end, any
        // SET at a rollback (reported parameters reported again).
        "BEGIN",
        "SET LOCAL statement_timeout = '5s'",
        "SHOW statement_timeout",
        "COMMIT",
        "SHOW statement_timeout",
        "BEGIN",
        "SET statement_timeout = '7s'",
        "SET application_name = 'rolled back'",
        "ROLLBACK",
        "SHOW statement_timeout",
        "SHOW application_name",
        "BEGIN",
        "SET application_name = 'kept'",
        "COMMIT",
        "SHOW application_name",
        "SET LOCAL statement_timeout = '1s'",
        "SHOW statement_timeout",
        // ROLLBACK TO SAVEPOINT takes back what was SET after it.
        "BEGIN",
        "SET application_name = 'before'",
        "SAVEPOINT a",
        "SET application_name = 'after a'",
        "SAVEPOINT b",
        "SET statement_timeout = '9s'",
        "ROLLBACK TO SAVEPOINT a",
        "SHOW application_name",
        "SHOW statement_timeout",
        "SET application_name = 'again'",
        "RELEASE SAVEPOINT a",
        "COMMIT",
        "SHOW application_name",
    ];
    for sql in script {
        let (te, tp) = (
            comparable(re.exchange(&frontend::query(sql), 1).await),
            comparable(rp.exchange(&frontend::query(sql), 1).await),
        );
        assert_eq!(te, tp, "{sql}");
    }
}

/// A config serving `file` (named app.db, so clients use database `app`)
/// through cutover; `admin` and `proxy` listen where given.
fn serve_config(file: &std::path::Path, proxy: &str, admin: &str) -> String {
    format!(
        "[proxy]\nlisten = \"{proxy}\"\nshutdown_timeout_ms = 1000\n\n\
         [auth]\nmethod = \"scram-sha-256\"\nusers = [{{ name = \"{}\", password = \"{}\" }}]\n\n\
         [admin]\nlisten = \"{admin}\"\n\n[old]\nurl = \"sqlite://{}\"\n",
        support::APP_USER,
        support::APP_PASSWORD,
        file.display()
    )
}

/// A scratch directory holding `app.db` made by `schema`.
fn scratch_file(name: &str, schema: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cutover-engine-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("app.db");
    let conn = cutover_sqlite::rusqlite::Connection::open(&file).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.execute_batch(schema).unwrap();
    file
}

async fn serve(file: &std::path::Path) -> cutover::Server {
    support::start_proxy_with(&serve_config(file, "127.0.0.1:0", "127.0.0.1:0")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_writers_with_for_update_lose_nothing_beside_another_process() {
    let file = scratch_file(
        "rmw",
        "CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL);
         INSERT INTO counters VALUES (1, 0), (2, 0);",
    );
    let server = serve(&file).await;
    // Another process's connection writes the same file meanwhile.
    let other = {
        let file = file.clone();
        std::thread::spawn(move || {
            let conn = cutover_sqlite::rusqlite::Connection::open(&file).unwrap();
            conn.busy_timeout(Duration::from_secs(30)).unwrap();
            for _ in 0..100 {
                conn.execute("UPDATE counters SET n = n + 1 WHERE id = 2", [])
                    .unwrap();
            }
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let client = support::connect(server.proxy_addr).await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                client.batch_execute("BEGIN").await.unwrap();
                let n: i64 = client
                    .query_one("SELECT n FROM counters WHERE id = 1 FOR UPDATE", &[])
                    .await
                    .unwrap()
                    .get(0);
                client
                    .execute("UPDATE counters SET n = $1 WHERE id = 1", &[&(n + 1)])
                    .await
                    .unwrap();
                client.batch_execute("COMMIT").await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await
            .expect("no client saw an error (no SQLITE_BUSY, no lost lease)");
    }
    other.join().unwrap();
    let client = support::connect(server.proxy_addr).await;
    let rows = client
        .query("SELECT id, n FROM counters ORDER BY id", &[])
        .await
        .unwrap();
    let counts: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(counts, vec![(1, 640), (2, 100)]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_skip_locked_queue_hands_each_job_out_once() {
    let file = scratch_file(
        "queue",
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, taken_by INTEGER, done INTEGER NOT NULL DEFAULT 0);
         WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < 200)
         INSERT INTO jobs (id) SELECT i FROM g;",
    );
    let server = serve(&file).await;
    let mut workers = Vec::new();
    for w in 0..8i64 {
        let client = support::connect(server.proxy_addr).await;
        workers.push(tokio::spawn(async move {
            let mut taken = Vec::new();
            loop {
                client.batch_execute("BEGIN").await.unwrap();
                let job = client
                    .query_opt(
                        "SELECT id FROM jobs WHERE taken_by IS NULL ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                        &[],
                    )
                    .await
                    .unwrap();
                let Some(job) = job else {
                    client.batch_execute("COMMIT").await.unwrap();
                    return taken;
                };
                let id: i64 = job.get(0);
                client
                    .execute("UPDATE jobs SET taken_by = $1, done = 1 WHERE id = $2", &[&w, &id])
                    .await
                    .unwrap();
                client.batch_execute("COMMIT").await.unwrap();
                taken.push(id);
            }
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    all.sort();
    assert_eq!(
        all,
        (1..=200).collect::<Vec<i64>>(),
        "each job taken exactly once"
    );
    let client = support::connect(server.proxy_addr).await;
    let open: i64 = client
        .query_one(
            "SELECT count(*) FROM jobs WHERE taken_by IS NULL OR done = 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_idle_transaction_is_ended_by_its_timeout_and_frees_the_writer() {
    let file = scratch_file(
        "idle",
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'a');",
    );
    let server = serve(&file).await;
    let stuck = support::connect(server.proxy_addr).await;
    stuck
        .batch_execute("SET idle_in_transaction_session_timeout = '2s'; BEGIN; UPDATE t SET v = 'stuck' WHERE id = 1")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let other = support::connect(server.proxy_addr).await;
    other
        .execute("UPDATE t SET v = 'other' WHERE id = 1", &[])
        .await
        .expect("the writer lease is freed once the stuck session ends");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "the other writer waited for the lease ({:?})",
        started.elapsed()
    );
    let err = stuck.batch_execute("COMMIT").await.unwrap_err();
    assert!(
        err.is_closed() || support::sqlstate(&err) == "25P03",
        "{err}"
    );
    let v: String = other
        .query_one("SELECT v FROM t WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "other", "the stuck transaction was rolled back");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_commit_leaves_the_file_consistent_with_every_acknowledged_write() {
    let file = scratch_file(
        "kill",
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, note TEXT NOT NULL, total NUMERIC NOT NULL);",
    );
    let (proxy, admin) = (support::free_addr(), support::free_addr());
    let config = file.with_file_name("serve.toml");
    std::fs::write(
        &config,
        serve_config(&file, &proxy.to_string(), &admin.to_string()),
    )
    .unwrap();
    let daemon = support::spawn_daemon(&config, admin);
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..8i64 {
        let client = support::connect(proxy).await;
        let acknowledged = acknowledged.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let id = w * 1_000_000 + i;
                let ok = client
                    .batch_execute(&format!(
                        "BEGIN; INSERT INTO orders VALUES ({id}, 'order {id}', 10.5); INSERT INTO orders VALUES ({}, 'twin', 1); COMMIT",
                        id + 500_000
                    ))
                    .await;
                if ok.is_err() {
                    return;
                }
                acknowledged.lock().unwrap().push(id);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut daemon = daemon;
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    for w in writers {
        let _ = w.await;
    }
    let conn = cutover_sqlite::rusqlite::Connection::open(&file).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 50,
        "the load ran ({} commits)",
        acknowledged.len()
    );
    for id in &acknowledged {
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM orders WHERE id IN (?1, ?2)",
                [id, &(id + 500_000)],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 2, "acknowledged transaction {id} is whole in the file");
    }
    // No transaction is half there.
    let halves: i64 = conn
        .query_row(
            "SELECT count(*) FROM orders a WHERE note != 'twin' AND NOT EXISTS (SELECT 1 FROM orders b WHERE b.id = a.id + 500000)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(halves, 0);
}

/// Where the driver tests keep the drivers they install from PyPI and npm.
fn tools_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ci-tools")
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Python with psycopg 3 and asyncpg, installed once from PyPI.
fn python_with_drivers() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let venv = tools_dir().join("drivers-py");
            let python = venv.join("bin/python");
            if !python.exists() {
                run_ok(
                    Command::new("python3").args(["-m", "venv"]).arg(&venv),
                    "python3 -m venv",
                );
            }
            let ready = Command::new(&python)
                .args(["-c", "import psycopg, asyncpg, sqlalchemy, django"])
                .status()
                .is_ok_and(|s| s.success());
            if !ready {
                run_ok(
                    Command::new(&python).args([
                        "-m",
                        "pip",
                        "install",
                        "-q",
                        "psycopg[binary]==3.3.9",
                        "asyncpg==0.32.0",
                        "sqlalchemy==2.1.9",
                        "django==5.2.19",
                    ]),
                    "pip install psycopg asyncpg sqlalchemy django",
                );
            }
            python
        })
        .clone()
}

/// A directory whose node_modules holds node-postgres, drizzle-orm,
/// Sequelize, TypeORM and Knex, installed once from npm.
fn node_with_drivers() -> PathBuf {
    static NODE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    NODE.get_or_init(|| {
        let dir = tools_dir().join("drivers-node");
        if !dir.join("node_modules/knex/package.json").exists() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("package.json"), "{\"private\": true}\n").unwrap();
            run_ok(
                Command::new("npm")
                    .args([
                        "install",
                        "--no-audit",
                        "--no-fund",
                        "--silent",
                        "pg@8.16.3",
                        "drizzle-orm@0.45.4",
                        "sequelize@6.37.8",
                        "typeorm@1.1.1",
                        "reflect-metadata@0.2.2",
                        "knex@3.3.0",
                    ])
                    .current_dir(&dir),
                "npm install pg drizzle-orm sequelize typeorm reflect-metadata knex",
            );
        }
        dir
    })
    .clone()
}

/// Runs `program` once against each side and compares what it printed,
/// line by line.
fn same_output(what: &str, run: impl Fn(&str) -> String, sides: &Sides) {
    let engine_dsn = format!(
        "postgresql://{}:{}@{}/app",
        support::APP_USER,
        support::APP_PASSWORD,
        sides.engine
    );
    let pg_dsn = format!(
        "postgresql://{SUPERUSER}:{SUPERUSER_PASSWORD}@127.0.0.1:{}/app",
        sides.pg.port()
    );
    let (e, p) = (run(&engine_dsn), run(&pg_dsn));
    let (el, pl): (Vec<&str>, Vec<&str>) = (e.lines().collect(), p.lines().collect());
    for (i, (a, b)) in el.iter().zip(&pl).enumerate() {
        assert_eq!(
            a,
            b,
            "{what}, line {}: engine vs PostgreSQL\n--- engine:\n{e}\n--- PostgreSQL:\n{p}",
            i + 1
        );
    }
    assert_eq!(el.len(), pl.len(), "{what}: line counts\n{e}\n---\n{p}");
    assert!(el.len() > 10, "{what} printed its results:\n{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn psycopg_asyncpg_and_sqlalchemy_see_the_same_as_on_postgresql() {
    let python = tokio::task::spawn_blocking(python_with_drivers)
        .await
        .unwrap();
    let sides = sides(Style::Hand).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/app.py");
    let run = |dsn: &str| {
        run_ok(
            Command::new(&python).arg(&script).arg(dsn),
            "tests/drivers/app.py",
        )
    };
    tokio::task::block_in_place(|| same_output("psycopg, asyncpg and SQLAlchemy", run, &sides));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_django_app_sees_the_same_as_on_postgresql() {
    let python = tokio::task::spawn_blocking(python_with_drivers)
        .await
        .unwrap();
    let sides = sides(Style::Hand).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/django_app.py");
    let run = |dsn: &str| {
        run_ok(
            Command::new(&python).arg(&script).arg(dsn),
            "tests/drivers/django_app.py",
        )
    };
    tokio::task::block_in_place(|| same_output("Django", run, &sides));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_apps_own_migrations_run_as_on_postgresql() {
    let python = tokio::task::spawn_blocking(python_with_drivers)
        .await
        .unwrap();
    let sides = sides(Style::Hand).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/ddl_app.py");
    let run = |dsn: &str| {
        run_ok(
            Command::new(&python).arg(&script).arg(dsn),
            "tests/drivers/ddl_app.py",
        )
    };
    tokio::task::block_in_place(|| same_output("DDL through SQLAlchemy and psycopg", run, &sides));
    // What the file holds: the declarations the schema map reads back,
    // defaults that write its storage forms.
    let file = cutover_sqlite::rusqlite::Connection::open(&sides.file).unwrap();
    let left: i64 = file
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name LIKE 'ddl%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0, "every table and index the app dropped is gone");
    // Constraints were written into CREATE statements in place: the file
    // is sound.
    let check: String = file
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn djangos_own_migrate_runs_as_on_postgresql() {
    let python = tokio::task::spawn_blocking(python_with_drivers)
        .await
        .unwrap();
    let sides = sides(Style::Hand).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/django_migrate.py");
    let run = |dsn: &str| {
        run_ok(
            Command::new(&python).arg(&script).arg(dsn),
            "tests/drivers/django_migrate.py",
        )
    };
    tokio::task::block_in_place(|| same_output("Django migrate", run, &sides));
    let file = cutover_sqlite::rusqlite::Connection::open(&sides.file).unwrap();
    let check: String = file
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn psql_lists_the_files_tables() {
    let file = scratch_file(
        "psql",
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL);
         CREATE TABLE \"Orders\" (id INTEGER PRIMARY KEY, total NUMERIC);",
    );
    let server = serve(&file).await;
    let bindir = cutover_pgcluster::find_bindir().unwrap();
    let dsn = support::conn_string(server.proxy_addr, support::APP_USER, support::APP_PASSWORD);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bindir.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-d",
                &dsn,
                "-c",
                "\\dt",
                "-c",
                "\\dt+ users",
                "-c",
                "\\dn",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.is_empty(), "psql: {err}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "public|Orders|table|postgres",
            "public|users|table|postgres",
            "public|users|table|postgres|permanent|heap||",
            "public|postgres",
        ],
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ddl_is_refused_while_capture_runs_and_names_what_sqlite_cannot_do() {
    let file = scratch_file(
        "frozen",
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL);",
    );
    let server = serve(&file).await;
    let client = support::connect(server.proxy_addr).await;
    client
        .batch_execute(
            "CREATE TABLE events (id bigserial PRIMARY KEY, user_id bigint REFERENCES users (id) ON DELETE CASCADE,
                 at timestamptz NOT NULL DEFAULT now(), seen boolean NOT NULL DEFAULT false, body jsonb)",
        )
        .await
        .unwrap();
    let row = client
        .query_one(
            "INSERT INTO events (body) VALUES ('{\"k\": 1}') RETURNING id, seen, at <= now()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.columns()[1].type_(), &tokio_postgres::types::Type::BOOL);
    assert!(!row.get::<_, bool>(1));
    assert!(row.get::<_, bool>(2));
    let file_conn = cutover_sqlite::rusqlite::Connection::open(&file).unwrap();
    let (seen, at): (i64, String) = file_conn
        .query_row("SELECT seen, at FROM events", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(seen, 0, "false stored as 0");
    assert!(
        at.ends_with('Z') && at.contains('T'),
        "now() stored as ISO text: {at}"
    );
    for (sql, construct) in [
        (
            "ALTER TABLE events ALTER COLUMN body TYPE text",
            "ALTER COLUMN",
        ),
        ("CREATE TABLE tags (names text[])", "TEXT[]"),
        ("CREATE INDEX ON events USING gin (body)", "USING GIN"),
        ("CREATE TABLE t (n serial, m int)", "serial or identity"),
        ("CREATE VIEW v AS SELECT 1", "CREATE VIEW"),
        ("CREATE TABLE other.t (id int)", "schema"),
        ("CREATE EXTENSION IF NOT EXISTS postgis", "CREATE EXTENSION"),
    ] {
        let e = client.batch_execute(sql).await.unwrap_err();
        let db = e.as_db_error().unwrap();
        assert_eq!(db.code().code(), "0A000", "{sql}: {db:?}");
        assert!(
            db.message()
                .to_ascii_uppercase()
                .contains(&construct.to_ascii_uppercase()),
            "{sql}: {}",
            db.message()
        );
    }

    // Extensions whose functions the engine has built in are there.
    client
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\"; CREATE EXTENSION IF NOT EXISTS pgcrypto",
        )
        .await
        .unwrap();
    let row = client
        .query_one("SELECT uuid_generate_v4(), gen_random_uuid()", &[])
        .await
        .unwrap();
    assert_eq!(row.columns()[0].type_(), &tokio_postgres::types::Type::UUID);

    // The migration's capture freezes the schema until finalize.
    let map = cutover_sqlite::SchemaMap::read(&file_conn, &[]).unwrap();
    cutover_sqlite::capture::install(&file_conn, &map).unwrap();
    let e = client
        .batch_execute("ALTER TABLE users ADD COLUMN name text")
        .await
        .unwrap_err();
    let db = e.as_db_error().unwrap();
    assert_eq!(db.code().code(), "0A000");
    assert!(db.message().contains("frozen"), "{}", db.message());
    // A session's temporary tables are not the file's schema.
    client
        .batch_execute(
            "CREATE TEMP TABLE scratch (id int, note text); INSERT INTO scratch VALUES (1, 'x'); DROP TABLE scratch",
        )
        .await
        .unwrap();
    cutover_sqlite::capture::remove(&file_conn, &map).unwrap();
    client
        .batch_execute("ALTER TABLE users ADD COLUMN name text")
        .await
        .unwrap();
    let n: i64 = file_conn
        .query_row(
            "SELECT count(*) FROM pragma_table_info('users') WHERE name = 'name'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_postgres_and_drizzle_see_the_same_as_on_postgresql() {
    let node_dir = tokio::task::spawn_blocking(node_with_drivers)
        .await
        .unwrap();
    let sides = sides(Style::Hand).await;
    // Node resolves imports next to the script: run a copy in the
    // directory that holds node_modules.
    let script = node_dir.join("app.mjs");
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/app.mjs"),
        &script,
    )
    .unwrap();
    let run = |dsn: &str| {
        run_ok(
            Command::new("node").arg(&script).arg(dsn),
            "tests/drivers/app.mjs",
        )
    };
    tokio::task::block_in_place(|| same_output("node-postgres and drizzle-orm", run, &sides));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sequelize_app_sees_the_same_as_on_postgresql() {
    let node_dir = tokio::task::spawn_blocking(node_with_drivers)
        .await
        .unwrap();
    let sides = sides(Style::Hand).await;
    let script = node_dir.join("sequelize_app.js");
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/sequelize_app.js"),
        &script,
    )
    .unwrap();
    let run = |dsn: &str| {
        run_ok(
            Command::new("node").arg(&script).arg(dsn),
            "tests/drivers/sequelize_app.js",
        )
    };
    tokio::task::block_in_place(|| same_output("Sequelize", run, &sides));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drizzles_own_migrator_runs_as_on_postgresql() {
    let node_dir = tokio::task::spawn_blocking(node_with_drivers)
        .await
        .unwrap();
    let sides = sides(Style::Hand).await;
    let script = node_dir.join("drizzle_migrate.mjs");
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/drizzle_migrate.mjs"),
        &script,
    )
    .unwrap();
    let scratch = sides.file.parent().unwrap().join("drizzle");
    std::fs::create_dir_all(&scratch).unwrap();
    let run = |dsn: &str| {
        run_ok(
            Command::new("node").arg(&script).arg(dsn).arg(&scratch),
            "tests/drivers/drizzle_migrate.mjs",
        )
    };
    tokio::task::block_in_place(|| same_output("drizzle migrate", run, &sides));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sequelize_app_syncs_its_tables_as_on_postgresql() {
    let node_dir = tokio::task::spawn_blocking(node_with_drivers)
        .await
        .unwrap();
    let sides = sides(Style::Hand).await;
    let script = node_dir.join("sequelize_sync.js");
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/sequelize_sync.js"),
        &script,
    )
    .unwrap();
    let run = |dsn: &str| {
        run_ok(
            Command::new("node").arg(&script).arg(dsn),
            "tests/drivers/sequelize_sync.js",
        )
    };
    tokio::task::block_in_place(|| same_output("Sequelize sync", run, &sides));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn typeorm_and_knex_apps_see_the_same_as_on_postgresql() {
    let node_dir = tokio::task::spawn_blocking(node_with_drivers)
        .await
        .unwrap();
    let sides = sides(Style::Hand).await;
    let script = node_dir.join("typeorm_knex_app.js");
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/typeorm_knex_app.js"),
        &script,
    )
    .unwrap();
    let run = |dsn: &str| {
        run_ok(
            Command::new("node").arg(&script).arg(dsn),
            "tests/drivers/typeorm_knex_app.js",
        )
    };
    tokio::task::block_in_place(|| same_output("TypeORM and Knex", run, &sides));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_in_and_out_match_postgresql_through_psql() {
    let sides = sides(Style::Hand).await;
    let psql = sides.pg.bindir().join("psql");
    let run = |dsn: &str| {
        let mut out = String::new();
        for (sql, input) in [
            ("COPY (SELECT * FROM users ORDER BY id LIMIT 8) TO STDOUT", ""),
            ("COPY (SELECT id, email, is_admin, created_at, prefs FROM users ORDER BY id LIMIT 6) TO STDOUT WITH (FORMAT csv, HEADER)", ""),
            ("COPY tags (name, slug) FROM STDIN", "tab\\there\tt-1\nnull slug\t\\N\nback\\\\slash\tt-2\n"),
            ("COPY tags (name, slug) FROM STDIN WITH (FORMAT csv)", "\"comma, quoted\",c-1\n\"multi\nline\",c-2\nempty,\"\"\n"),
            ("COPY (SELECT name, slug FROM tags WHERE slug LIKE 't-%' OR slug LIKE 'c-%' OR slug = '' OR slug IS NULL ORDER BY name) TO STDOUT WITH (FORMAT csv)", ""),
            ("COPY tags (name, nope) FROM STDIN", ""),
            ("COPY tags (name, slug) FROM STDIN", "only one field\n"),
        ] {
            let mut child = Command::new(&psql)
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=0", "-d", dsn, "-c", sql])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
            let result = child.wait_with_output().unwrap();
            out.push_str(&format!("== {sql}\n{}", String::from_utf8_lossy(&result.stdout)));
            // Errors by their first line's SQLSTATE-bearing text only.
            let err = String::from_utf8_lossy(&result.stderr);
            if let Some(first) = err.lines().next() {
                out.push_str(&format!("error: {}\n", first.split(':').next().unwrap_or("")));
            }
        }
        out
    };
    tokio::task::block_in_place(|| same_output("COPY through psql", run, &sides));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_notify_time_out_cancel_and_refuse_as_postgresql() {
    let file = scratch_file(
        "session",
        "CREATE TABLE parents (id INTEGER PRIMARY KEY);
         CREATE TABLE kids (id INTEGER PRIMARY KEY, parent_id INTEGER NOT NULL REFERENCES parents(id));
         INSERT INTO parents VALUES (1);",
    );
    let server = serve(&file).await;
    let addr = server.proxy_addr;

    // LISTEN/NOTIFY between sessions, delivered at the sender's commit.
    let (listener, mut connection) = tokio_postgres::connect(
        &support::conn_string(addr, support::APP_USER, support::APP_PASSWORD),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let (tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) = stream.next().await {
            let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
        }
    });
    listener.batch_execute("LISTEN jobs").await.unwrap();
    let sender = support::connect(addr).await;
    sender
        .batch_execute("BEGIN; NOTIFY jobs, 'in a transaction'; SELECT 1")
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), notes.recv())
            .await
            .is_err(),
        "nothing is delivered before COMMIT"
    );
    sender.batch_execute("COMMIT").await.unwrap();
    let note = tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(note, ("jobs".to_string(), "in a transaction".to_string()));

    // statement_timeout and CancelRequest interrupt a running statement.
    let slow = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000000) SELECT count(*) FROM n";
    let client = support::connect(addr).await;
    client
        .batch_execute("SET statement_timeout = '200ms'")
        .await
        .unwrap();
    let err = client.query_one(slow, &[]).await.unwrap_err();
    assert_eq!(support::sqlstate(&err), "57014", "{err}");
    client
        .batch_execute("SET statement_timeout = 0")
        .await
        .unwrap();
    let cancel = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let err = client.query_one(slow, &[]).await.unwrap_err();
    assert_eq!(support::sqlstate(&err), "57014", "{err}");
    canceller.await.unwrap();
    assert_eq!(
        client
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );

    // Constraint, syntax and unsupported-construct errors.
    let err = client
        .execute("INSERT INTO kids VALUES (1, 42)", &[])
        .await
        .unwrap_err();
    assert_eq!(support::sqlstate(&err), "23503");
    let err = client
        .batch_execute("SELECT id FRO parents")
        .await
        .unwrap_err();
    assert_eq!(support::sqlstate(&err), "42601");
    let position = err.as_db_error().and_then(|d| d.position()).cloned();
    assert!(
        matches!(position, Some(tokio_postgres::error::ErrorPosition::Original(p)) if p > 1),
        "{position:?}"
    );
    // Regular expressions match text, with Rust's syntax.
    let err = client
        .batch_execute("SELECT id FROM parents WHERE id ~ '1'")
        .await
        .unwrap_err();
    assert_eq!(support::sqlstate(&err), "42883");
    let err = client
        .batch_execute("SELECT 'ab' ~ 'a(?=b)'")
        .await
        .unwrap_err();
    assert_eq!(support::sqlstate(&err), "2201B", "{err:?}");
    for (sql, construct) in [
        ("PREPARE TRANSACTION 'x'", "two-phase commit"),
        ("CREATE SEQUENCE kid_numbers", "CREATE SEQUENCE"),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE", "isolation level"),
        ("SELECT * FROM unnest('{1,2}'::int[])", "UNNEST in FROM"),
        (
            "SELECT id FROM parents WHERE id #- '{a}' IS NULL",
            "the operator #-",
        ),
    ] {
        let err = client.batch_execute(sql).await.unwrap_err();
        assert_eq!(support::sqlstate(&err), "0A000", "{sql}");
        assert!(
            support::error_text(&err).contains(construct),
            "{sql}: {err}"
        );
    }
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS parents (id INTEGER PRIMARY KEY)")
        .await
        .expect("CREATE ... IF NOT EXISTS of an existing table succeeds");
    client
        .batch_execute("INSERT INTO kids VALUES (1, 1); TRUNCATE kids")
        .await
        .unwrap();
    let kids: i64 = client
        .query_one("SELECT count(*) FROM kids", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kids, 0);

    // NOWAIT when another transaction holds the writer.
    let holder = support::connect(addr).await;
    holder
        .batch_execute("BEGIN; UPDATE parents SET id = 1 WHERE id = 1")
        .await
        .unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    let err = client
        .query("SELECT id FROM parents FOR UPDATE NOWAIT", &[])
        .await
        .unwrap_err();
    assert_eq!(support::sqlstate(&err), "55P03");
    client.batch_execute("ROLLBACK").await.unwrap();
    holder.batch_execute("ROLLBACK").await.unwrap();

    // Advisory locks between sessions.
    let a: bool = client
        .query_one("SELECT pg_try_advisory_lock(7)", &[])
        .await
        .unwrap()
        .get(0);
    let b: bool = holder
        .query_one("SELECT pg_try_advisory_lock(7)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((a, b), (true, false));
    client
        .query_one("SELECT pg_advisory_unlock(7)", &[])
        .await
        .unwrap();
    let b: bool = holder
        .query_one("SELECT pg_try_advisory_lock(7)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(b);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_run_on_the_file_by_another_process_is_served_at_once() {
    let file = scratch_file(
        "follow",
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL);
         INSERT INTO users (email) VALUES ('a@example.com');",
    );
    let server = serve(&file).await;
    let client = support::connect(server.proxy_addr).await;
    // A session that has not run a statement since the change, too.
    let idle = support::connect(server.proxy_addr).await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let _ = idle.query_one("SELECT 1", &[]).await.unwrap();
    // Statements prepared before the change.
    let star = client.prepare("SELECT * FROM users").await.unwrap();
    let _ = client.query(&star, &[]).await.unwrap();
    let email = client
        .prepare("SELECT email FROM users WHERE id = $1")
        .await
        .unwrap();

    // The app's migration tool, writing SQLite's dialect straight into the
    // file while cutover serves it.
    let other = cutover_sqlite::rusqlite::Connection::open(&file).unwrap();
    other
        .execute_batch(
            "CREATE TABLE orders (id INTEGER PRIMARY KEY AUTOINCREMENT,
                 user_id INTEGER NOT NULL REFERENCES users(id),
                 total NUMERIC(10,2), paid BOOLEAN NOT NULL DEFAULT 0,
                 placed_at DATETIME DEFAULT CURRENT_TIMESTAMP);
             ALTER TABLE users ADD COLUMN active BOOLEAN NOT NULL DEFAULT 1;
             INSERT INTO orders (user_id, total) VALUES (1, 9.5);",
        )
        .unwrap();
    // Statement texts a session has not seen look at the schema at once;
    // those it has, within SCHEMA_CHECK (100 ms).
    tokio::time::sleep(Duration::from_millis(150)).await;

    // As in PostgreSQL: a prepared statement whose result columns changed
    // is refused (drivers prepare it again), others are planned again.
    let e = client.query(&star, &[]).await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "0A000", "{e}");
    assert_eq!(
        e.as_db_error().unwrap().message(),
        "cached plan must not change result type"
    );
    let row = client.query_one(&email, &[&1i64]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "a@example.com");

    // The same session: the new column typed from the file, `*` with it.
    let row = client
        .query_one("SELECT * FROM users WHERE id = 1", &[])
        .await
        .unwrap();
    let names: Vec<&str> = row.columns().iter().map(|c| c.name()).collect();
    assert_eq!(names, ["id", "email", "active"]);
    assert_eq!(row.columns()[2].type_(), &tokio_postgres::types::Type::BOOL);
    assert!(row.get::<_, bool>(2));
    // The new table, with parameters typed by its columns and values
    // stored in the file's forms.
    for c in [&client, &idle] {
        let row = c
            .query_one(
                "INSERT INTO orders (user_id, paid) VALUES ($1, $2) RETURNING id, paid",
                &[&1i64, &true],
            )
            .await
            .unwrap();
        assert!(row.get::<_, bool>(1));
    }
    let stored: Vec<i64> = other
        .prepare("SELECT paid FROM orders ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(stored, [0, 1, 1], "booleans stored as the file's 0/1");
    let columns: Vec<String> = client
        .query(
            "SELECT column_name::text FROM information_schema.columns WHERE table_name = 'orders' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(columns, ["id", "user_id", "total", "paid", "placed_at"]);

    // Dropped again: the errors PostgreSQL gives for what is gone.
    other
        .execute_batch("ALTER TABLE users DROP COLUMN active; DROP TABLE orders;")
        .unwrap();
    // At once, before SCHEMA_CHECK: a statement whose result columns
    // changed under it is refused, never answered in the old shape.
    let e = client.query(&star, &[]).await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "0A000", "{e}");
    let e = client
        .query("SELECT active FROM users", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42703", "{e}");
    let e = idle.query("SELECT * FROM orders", &[]).await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42P01", "{e}");
    let row = client.query_one("SELECT * FROM users", &[]).await.unwrap();
    assert_eq!(row.columns().len(), 2);
}
