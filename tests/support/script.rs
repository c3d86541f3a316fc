//! A scripted protocol session (simple and extended queries, errors,
//! notices, transactions, COPY both ways, large rows, session settings) that
//! tests run directly and through cutover and compare message for message.

use super::fe::{self, batch};
use super::*;

/// One step of a scripted session: bytes to send, then how many
/// ReadyForQuery messages end the reply.
pub struct Step {
    send: Vec<u8>,
    ready: usize,
}

pub fn step(send: Vec<u8>, ready: usize) -> Step {
    Step { send, ready }
}

pub fn script() -> Vec<Step> {
    vec![
        // Simple query, several result shapes.
        step(fe::query("SELECT 1 AS one, 'x'::text AS t, NULL::int AS n, 1.5::numeric AS num"), 1),
        // Multi-statement query: several results, one ReadyForQuery.
        step(
            fe::query("SELECT 1; SELECT 2; CREATE TEMP TABLE tt(a int, b text); INSERT INTO tt VALUES (1, 'one'), (2, 'two'); SELECT * FROM tt ORDER BY a"),
            1,
        ),
        // Errors keep every field (SQLSTATE, message, position) and the session stays usable.
        step(fe::query("SELECT * FROM no_such_table"), 1),
        step(fe::query("SELECT 1 +"), 1),
        step(fe::query("SELECT 'still usable'"), 1),
        // Notices.
        step(fe::query("DO $$ BEGIN RAISE NOTICE 'hello %', 42 USING DETAIL = 'd', HINT = 'h'; END $$"), 1),
        // Transaction status in ReadyForQuery: T, then E after an error, then I.
        step(fe::query("BEGIN"), 1),
        step(fe::query("INSERT INTO tt VALUES (3, 'three')"), 1),
        step(fe::query("SELECT 1/0"), 1),
        step(fe::query("SELECT 1"), 1),
        step(fe::query("ROLLBACK"), 1),
        // Extended protocol, pipelined: named and unnamed statements, binary
        // parameters and results, Describe of statement and portal, one Sync.
        step(
            batch(&[
                fe::parse("s1", "SELECT $1::int4 + 1 AS next, $2::text AS label", &[23, 25]),
                fe::describe(b'S', "s1"),
                fe::bind("", "s1", &[1, 0], &[Some(&41i32.to_be_bytes()), Some(b"answer")], &[1, 0]),
                fe::describe(b'P', ""),
                fe::execute("", 0),
                fe::bind("", "s1", &[0], &[Some(b"9"), None], &[0]),
                fe::execute("", 0),
                fe::parse("", "SELECT a, b FROM tt WHERE a >= $1 ORDER BY a", &[]),
                fe::bind("", "", &[], &[Some(b"1")], &[]),
                fe::execute("", 0),
                fe::sync(),
            ]),
            1,
        ),
        // Prepared statement reused in a second batch, then closed.
        step(
            batch(&[
                fe::bind("", "s1", &[], &[Some(b"1"), Some(b"x")], &[]),
                fe::execute("", 0),
                fe::close(b'S', "s1"),
                fe::sync(),
            ]),
            1,
        ),
        step(batch(&[fe::bind("", "s1", &[], &[], &[]), fe::sync()]), 1),
        // Partial execution: row limits and PortalSuspended, named portal.
        step(
            batch(&[
                fe::query("BEGIN"),
                fe::parse("", "SELECT g FROM generate_series(1, 10) g", &[]),
                fe::bind("p1", "", &[], &[], &[]),
                fe::execute("p1", 3),
                fe::execute("p1", 3),
                fe::execute("p1", 0),
                fe::close(b'P', "p1"),
                fe::sync(),
                fe::query("COMMIT"),
            ]),
            3,
        ),
        // An error mid-pipeline: later messages are skipped until Sync.
        step(
            batch(&[
                fe::parse("", "SELEC broken", &[]),
                fe::bind("", "", &[], &[], &[]),
                fe::execute("", 0),
                fe::sync(),
                fe::parse("", "SELECT 'after'", &[]),
                fe::bind("", "", &[], &[], &[]),
                fe::execute("", 0),
                fe::sync(),
            ]),
            2,
        ),
        // COPY TO STDOUT.
        step(fe::query("COPY (SELECT g, md5(g::text) FROM generate_series(1, 2000) g) TO STDOUT"), 1),
        // COPY FROM STDIN, data pipelined behind the query; then CopyFail.
        step(
            batch(&[
                fe::query("COPY tt FROM STDIN"),
                fe::copy_data(b"10\tten\n11\televen\n"),
                fe::copy_data(b"12\ttwelve\n"),
                fe::copy_done(),
            ]),
            1,
        ),
        step(
            batch(&[
                fe::query("COPY tt FROM STDIN"),
                fe::copy_data(b"13\tthirteen\n"),
                fe::copy_fail("client gave up"),
            ]),
            1,
        ),
        step(fe::query("SELECT count(*), sum(a) FROM tt"), 1),
        // A row far larger than any read buffer.
        step(fe::query("SELECT repeat('x', 3000000) AS big, 'tail' AS t"), 1),
        // Session state set by the client is reported back.
        step(fe::query("SET application_name = 'renamed'; SET DateStyle = 'German'"), 1),
        step(fe::query("SELECT now()::date = current_date, current_setting('DateStyle')"), 1),
    ]
}

pub async fn run_script(client: &mut RawClient) -> Vec<Vec<Msg>> {
    let mut replies = Vec::new();
    for s in script() {
        let reply = client.exchange(&s.send, s.ready).await;
        replies.push(reply.iter().map(Msg::normalized).collect());
    }
    replies
}
