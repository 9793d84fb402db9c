//! Captures the pgoutput messages the decoder unit tests use, from the real server:
//! `cargo test --test integration capture_pgoutput -- --ignored` rewrites
//! `tests/fixtures/pgoutput/stream.hex` (one message per line: a label, a tab, the hex bytes).

use std::time::Duration;

use polysync::source::postgres::replication::{ReplConnection, ReplMessage};
use polysync::source::postgres::{ConnInfo, PostgresSourceConfig};

use crate::support::pg::TestDb;
use crate::support::{shared, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "rewrites a committed fixture; run by hand when the decoder gains message kinds"]
async fn capture_pgoutput() {
    let _g = shared().await;
    let db = TestDb::create("capture").await;
    let slot = unique("cap");
    db.exec(&format!(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE t (id int PRIMARY KEY, name text, m mood, big text, n numeric, tags text[], at timestamptz);
         CREATE TABLE f (id int PRIMARY KEY, v text);
         ALTER TABLE f REPLICA IDENTITY FULL;
         CREATE PUBLICATION {slot} FOR TABLE t, f;"
    ))
    .await;
    db.exec(&format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")).await;
    for stmt in [
        "INSERT INTO t VALUES (1, 'a''b', 'happy', (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 2000) i), 12345678901234567890.0001, '{x,\"y z\",NULL}', '2024-01-02 03:04:05.123456+00')",
        "UPDATE t SET name = 'renamed' WHERE id = 1",
        "UPDATE t SET id = 2 WHERE id = 1",
        "INSERT INTO f VALUES (10, 'full')",
        "UPDATE f SET v = 'fuller' WHERE id = 10",
        "DELETE FROM f WHERE id = 10",
        "DELETE FROM t WHERE id = 2",
        "INSERT INTO t (id, name) VALUES (3, NULL)",
        "BEGIN; SELECT pg_logical_emit_message(true, 'polysync.test', 'hello'); INSERT INTO t (id) VALUES (4); COMMIT;",
        "SELECT pg_replication_origin_create('upstream')",
    ] {
        db.exec(stmt).await;
    }
    // A transaction replayed from another origin carries an Origin message.
    db.exec("SELECT pg_replication_origin_session_setup('upstream')").await;
    db.exec(
        "BEGIN; SELECT pg_replication_origin_xact_setup('0/ABCDEF', now()); INSERT INTO t (id) VALUES (5); COMMIT;",
    )
    .await;
    db.exec("SELECT pg_replication_origin_session_reset()").await;
    db.exec("TRUNCATE t, f").await;
    let end = db.current_lsn().await;

    let cfg: PostgresSourceConfig = toml::from_str(&format!(
        "url = \"{}\"\nsslmode = \"disable\"\nslot = \"{slot}\"\npublication = \"{slot}\"\n",
        db.url
    ))
    .unwrap();
    let info: ConnInfo = cfg.validate("capture").unwrap();
    let mut stream = ReplConnection::connect(&info)
        .await
        .unwrap()
        .start_logical(&slot, 0, &[("proto_version", "1"), ("publication_names", &slot), ("messages", "true")])
        .await
        .unwrap();
    let mut lines = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.recv()).await.expect("stream stalled").unwrap() {
            ReplMessage::XLogData { wal_start, data, .. } => {
                let label = (data[0] as char).to_string();
                lines.push(format!("{label}\t{}", hex::encode(&data)));
                if data[0] == b'C' && wal_start >= end {
                    break;
                }
                if data[0] == b'T' {
                    // Truncate is the last statement.
                    continue;
                }
            }
            ReplMessage::Keepalive { wal_end, .. }
                if wal_end >= end && lines.last().is_some_and(|l| l.starts_with('C')) =>
            {
                break;
            }
            ReplMessage::Keepalive { .. } => {}
        }
    }
    stream.close().await;
    let path = crate::support::repo().join("tests/fixtures/pgoutput/stream.hex");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    eprintln!("wrote {} messages to {}", lines.len(), path.display());
    db.cleanup().await;
}
