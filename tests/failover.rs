//! Failover and lost slots: a gap between what the sinks got and what the slot streams is
//! never skipped silently.

use std::time::Duration;

use crate::support::daemon::{ChildDaemon, pg_cache_config_with, refusal};
use crate::support::pg::TestDb;
use crate::support::pg_pair::PgPair;
use crate::support::redis::TestRedis;
use crate::support::{Workspace, check_online, free_port, http_get, metric_value, shared, unique, wait_for};

const WAIT: Duration = Duration::from_secs(90);

/// `id → cached JSON` equals the table: every row present with its values, nothing else.
async fn cache_equals_table(db: &TestDb, redis: &TestRedis, p: &str) -> Result<(), String> {
    let rows = db
        .client
        .query("SELECT id, row_to_json(t)::text FROM (SELECT id, name, qty FROM items) t ORDER BY id", &[])
        .await
        .unwrap();
    let want: std::collections::BTreeMap<String, serde_json::Value> = rows
        .iter()
        .map(|r| (r.get::<_, i64>(0).to_string(), serde_json::from_str(r.get::<_, &str>(1)).unwrap()))
        .collect();
    let mut have = std::collections::BTreeMap::new();
    for k in redis.keys(&format!("{p}:item:*")).await {
        if let Some(v) = redis.get(&k).await {
            have.insert(
                k.rsplit(':').next().unwrap().to_string(),
                serde_json::from_str::<serde_json::Value>(&v).unwrap(),
            );
        }
    }
    if have == want { Ok(()) } else { Err(format!("cache {have:?}\ntable {want:?}")) }
}

/// The scenario of a failover before PostgreSQL 17 or a blue/green switchover: polysync stops,
/// its slot is dropped, rows change, polysync starts again. By default it refuses to start and
/// says why (and a slot recreated by someone else is caught too); with
/// `on_slot_lost = "resnapshot"` it streams from a new slot and re-reads the tables, so the
/// cache equals the table again, deleted rows included. Counted in the metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_slot_is_refused_by_default_and_resnapshotted_on_request_never_skipped() {
    let _g = shared().await;
    let db = TestDb::create("lostslot").await;
    db.exec("CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, qty int NOT NULL)").await;
    let (p, slot) = (unique("lost"), unique("s"));
    let port = free_port();
    let ws = Workspace::new();
    // Refusals run in this process: they keep metrics off (the port is the child daemons').
    let quiet = |policy: &str| pg_cache_config_with(&db.url, &slot, &slot, policy, "");
    let config = |policy: &str| {
        quiet(policy).replace("[metrics]\nenabled = false", &format!("[metrics]\nlisten = \"127.0.0.1:{port}\""))
    };
    ws.write_config(&config(""));
    ws.write_pipeline(
        "items",
        &format!(
            "source = \"db\"\n[match]\nrelations = [\"public.items\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{p}:item:{{{{ key.id }}}}\"\nformat = \"json\"\ntruncate_pattern = \"{p}:item:*\"\n"
        ),
    );
    let redis = TestRedis::connect().await;
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO items SELECT i, 'n' || i, i FROM generate_series(1, 20) i").await;
    db.wait_caught_up(&slot, WAIT).await;
    wait_for("the first rows", WAIT, || async { cache_equals_table(&db, &redis, &p).await.is_ok() }).await;
    assert!(d.terminate().await.success());

    // The slot is lost while polysync is stopped; rows change in the gap.
    db.exec(&format!("SELECT pg_drop_replication_slot('{slot}')")).await;
    db.exec("UPDATE items SET qty = 100 WHERE id = 1; DELETE FROM items WHERE id = 2; INSERT INTO items VALUES (21, 'n21', 21)")
        .await;

    // Default: refuse, name it, create nothing.
    ws.write_config(&quiet(""));
    let why = refusal(&ws.config_path()).await;
    assert!(why.contains("no longer exists") && why.contains("on_slot_lost"), "{why}");
    let slot_exists = || async {
        db.client
            .query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .unwrap()
            .is_some()
    };
    assert!(!slot_exists().await, "no new slot was created behind the operator's back");
    assert!(cache_equals_table(&db, &redis, &p).await.is_err(), "the gap is real: the cache misses its changes");

    // Someone else recreates the slot: it starts past polysync's position, which is caught too.
    db.exec(&format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")).await;
    let why = refusal(&ws.config_path()).await;
    assert!(why.contains("something else consumed or advanced it"), "{why}");
    db.exec(&format!("SELECT pg_drop_replication_slot('{slot}')")).await;

    // resnapshot: a new slot, every table read again after clearing it in the sinks.
    ws.write_config(&config("on_slot_lost = \"resnapshot\""));
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Err(diff) = cache_equals_table(&db, &redis, &p).await {
        assert!(tokio::time::Instant::now() < deadline, "the re-read did not converge: {diff}\nlog:\n{}", d.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = http_get(&format!("127.0.0.1:{port}"), "/metrics").await.expect("metrics").1;
    assert_eq!(metric_value(&metrics, "polysync_pg_slot_lost_total", &[("reason", "slot_missing")]), 1.0, "{metrics}");
    // And it streams on from the new slot.
    db.exec("UPDATE items SET name = 'after' WHERE id = 3").await;
    db.wait_caught_up(&slot, WAIT).await;
    wait_for("streaming after the re-read", WAIT, || async { cache_equals_table(&db, &redis, &p).await.is_ok() }).await;
    assert!(d.terminate().await.success());
    let first_run = std::fs::read_to_string(&log).unwrap().matches("after the lost slot").count();
    assert_eq!(first_run, 1, "one re-read");

    // A plain restart is not a lost slot.
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    db.wait_streaming(&slot).await;
    db.exec("UPDATE items SET qty = 7 WHERE id = 4").await;
    db.wait_caught_up(&slot, WAIT).await;
    wait_for("the restart streams", WAIT, || async { cache_equals_table(&db, &redis, &p).await.is_ok() }).await;
    assert!(d.terminate().await.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("after the lost slot").count(), 1, "no second re-read on a plain restart");
    assert!(!text.contains('\u{1b}'), "a log written to a file carries no colour codes (log.color = auto)");

    // Dropped while streaming: the source stops with the reason (it is the only one, so the
    // daemon exits non-zero), and the next start applies the policy.
    let mut d = ChildDaemon::spawn(&ws.config_path(), &log);
    db.wait_streaming(&slot).await;
    wait_for("the slot dropped under the running daemon", WAIT, || async {
        let _ = db
            .client
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&slot],
            )
            .await;
        db.client.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.is_ok()
    })
    .await;
    db.exec("DELETE FROM items WHERE id = 5").await;
    let exited = tokio::time::timeout(WAIT, d.child.wait()).await.expect("the source stops").unwrap();
    assert!(!exited.success());
    assert!(std::fs::read_to_string(&log).unwrap().contains("dropped while streaming"));
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Err(diff) = cache_equals_table(&db, &redis, &p).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second re-read did not converge: {diff}\nlog:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(std::fs::read_to_string(&log).unwrap().matches("after the lost slot").count(), 2);
    assert!(d.terminate().await.success());

    // A renamed slot would start from now: refused too (in-process, so metrics off).
    ws.write_config(
        &quiet("on_slot_lost = \"stop\"").replace(&format!("slot = \"{slot}\""), &format!("slot = \"{slot}_x\"")),
    );
    let why = refusal(&ws.config_path()).await;
    assert!(why.contains(&format!("the config names slot \"{slot}_x\"")), "{why}");
    // Another database system (what a restore into a new cluster or a blue/green switchover
    // looks like; simulated by the record naming another system identifier): refused even with
    // resnapshot, because versions of two systems are not comparable.
    let record = ws.path().join("state").join("origin-db.json");
    let mut r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    r["system_identifier"] = serde_json::json!("1");
    std::fs::write(&record, r.to_string()).unwrap();
    ws.write_config(&quiet("on_slot_lost = \"resnapshot\""));
    let why = refusal(&ws.config_path()).await;
    assert!(why.contains("another system") && why.contains("not comparable"), "{why}");
    db.cleanup().await;
}

/// `id → row` of the items table on `client`.
async fn table_rows(client: &tokio_postgres::Client) -> std::collections::BTreeMap<String, serde_json::Value> {
    client
        .query("SELECT id, row_to_json(t)::text FROM (SELECT id, name, qty FROM items) t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i64>(0).to_string(), serde_json::from_str(r.get::<_, &str>(1)).unwrap()))
        .collect()
}

/// Cache and index both equal the table on `client`, key by key.
async fn stores_equal(client: &tokio_postgres::Client, redis: &TestRedis, p: &str, index: &str) -> Result<(), String> {
    let want = table_rows(client).await;
    let mut cached = std::collections::BTreeMap::new();
    for k in redis.keys(&format!("{p}:item:*")).await {
        if let Some(v) = redis.get(&k).await {
            cached.insert(
                k.rsplit(':').next().unwrap().to_string(),
                serde_json::from_str::<serde_json::Value>(&v).unwrap(),
            );
        }
    }
    if cached != want {
        return Err(format!(
            "cache {} rows, table {}: {:?}",
            cached.len(),
            want.len(),
            first_difference(&cached, &want)
        ));
    }
    crate::support::search::refresh(index).await;
    let (_, hits) = crate::support::search::call("GET", &format!("/{index}/_search?size=10000&q=*:*"), None).await;
    let indexed: std::collections::BTreeMap<String, serde_json::Value> = hits["hits"]["hits"]
        .as_array()
        .map(|a| a.iter().map(|h| (h["_id"].as_str().unwrap().to_string(), h["_source"].clone())).collect())
        .unwrap_or_default();
    if indexed != want {
        return Err(format!(
            "index {} docs, table {}: {:?}",
            indexed.len(),
            want.len(),
            first_difference(&indexed, &want)
        ));
    }
    Ok(())
}

fn first_difference(
    have: &std::collections::BTreeMap<String, serde_json::Value>,
    want: &std::collections::BTreeMap<String, serde_json::Value>,
) -> Option<String> {
    want.iter()
        .find(|(k, v)| have.get(*k) != Some(v))
        .map(|(k, v)| format!("key {k}: want {v}, have {:?}", have.get(k)))
        .or_else(|| have.keys().find(|k| !want.contains_key(*k)).map(|k| format!("key {k} should be gone")))
}

/// Writes until `stop`, through a multi-host connection that follows the writer: inserts,
/// updates and deletes over 300 keys. Errors (the primary is gone, the standby not promoted
/// yet) are retried on a new connection; a write whose commit was not acknowledged may or may
/// not have happened, and the new primary decides which.
async fn writer(hosts: String, stop: tokio_util::sync::CancellationToken) -> u64 {
    let mut n: u64 = 0;
    while !stop.is_cancelled() {
        let Ok((client, conn)) = tokio_postgres::connect(&hosts, tokio_postgres::NoTls).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        while !stop.is_cancelled() {
            let id = (n * 7919 % 300) as i64 + 1;
            let sql = match n % 5 {
                4 => "DELETE FROM items WHERE id = $1".to_string(),
                _ => "INSERT INTO items VALUES ($1::bigint, 'n' || ($1::bigint)::text, 1) ON CONFLICT (id) DO UPDATE SET qty = items.qty + 1, name = 'u' || items.qty".to_string(),
            };
            if client.execute(&sql, &[&id]).await.is_err() {
                break;
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    n
}

/// Wait until the standby holds a persistent (sync-ready) copy of the slot: a fresh copy stays
/// temporary until the standby's catalog horizon passes the slot's, which a running-xacts
/// record on the primary (`pg_log_standby_snapshot`) brings about.
async fn wait_slot_synced(primary: &tokio_postgres::Client, standby: &tokio_postgres::Client, slot: &str) {
    wait_for("the slot's copy on the standby to be sync-ready", WAIT, || async {
        let _ = primary.execute("SELECT pg_log_standby_snapshot()", &[]).await;
        standby
            .query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND synced AND NOT temporary", &[&slot])
            .await
            .unwrap()
            .is_some()
    })
    .await;
}

/// `active` of the slot on a server, `None` when it has no such slot.
async fn slot_active(c: &tokio_postgres::Client, slot: &str) -> Option<bool> {
    c.query_opt("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

fn pair_config(pair: &PgPair, slot: &str, port: u16, extra: &str) -> String {
    format!(
        r#"
state_dir = "state"
pipelines = "pipelines"

[metrics]
listen = "127.0.0.1:{port}"

[sources.db]
kind = "postgres"
hosts = ["127.0.0.1:{}", "127.0.0.1:{}"]
user = "postgres"
password = "postgres"
dbname = "polysync"
sslmode = "disable"
slot = "{slot}"
publication = "{slot}"
status_interval = "100ms"
reconnect_max_delay = "1s"
connect_timeout = "2s"
heartbeat_interval = "1s"
{extra}

[sinks.cache]
kind = "cache"
url = "{}"
timeout = "2s"

[sinks.search]
kind = "search"
url = "{}"
linger = "2ms"
"#,
        pair.primary_port,
        pair.standby_port,
        crate::support::redis::url(),
        crate::support::search::url()
    )
}

fn pair_pipeline(p: &str, index: &str) -> String {
    format!(
        "source = \"db\"\n[match]\nrelations = [\"public.items\"]\n\
         [[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{p}:item:{{{{ key.id }}}}\"\nformat = \"json\"\ntruncate_pattern = \"{p}:item:*\"\n\
         [[sink]]\ntarget = \"search\"\nindex = \"{index}\"\nid = \"{{{{ key.id }}}}\"\n"
    )
}

/// The failover a platform team tests first, on a real PostgreSQL 18 primary and streaming
/// standby with failover slots: continuous writes, the primary killed with -9, the standby
/// promoted. polysync, given both hosts, finds the new writer, resumes from the slot's
/// synchronised copy, and the cache and the index equal the new primary key by key. The
/// failover is logged and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_the_primary_is_killed_and_the_standby_promoted_the_stores_equal_the_new_primary() {
    let _g = shared().await;
    let pair = PgPair::create();
    let primary = crate::support::pg::connect(&pair.primary_url()).await;
    let standby = crate::support::pg::connect(&pair.standby_url()).await;
    primary
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, qty int NOT NULL)")
        .await
        .unwrap();
    let (p, slot, index) = (unique("fo"), unique("s"), unique("fo-idx").to_lowercase());
    let port = free_port();
    let ws = Workspace::new();
    ws.write_config(&pair_config(&pair, &slot, port, "create_if_missing = true"));
    ws.write_pipeline("items", &pair_pipeline(&p, &index));
    let redis = TestRedis::connect().await;
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("streaming from the primary", WAIT, || async {
        primary
            .query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active AND failover", &[&slot])
            .await
            .unwrap()
            .is_some()
    })
    .await;
    // The log file is written asynchronously: wait for the line rather than read it once.
    let says = |t: &str| t.contains("failover readiness") && t.contains("not (yet) synchronised");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !says(&d.log_text()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the start says the standby has no copy of the new slot yet:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stop = tokio_util::sync::CancellationToken::new();
    let hosts = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres password=postgres dbname=polysync target_session_attrs=read-write connect_timeout=2",
        pair.primary_port, pair.standby_port
    );
    let writes = tokio::spawn(writer(hosts, stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_slot_synced(&primary, &standby, &slot).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    pair.kill_primary();
    // Until a writer answers, readiness says why each host was passed over.
    wait_for("/readyz to say there is no writer", WAIT, || async {
        http_get(&format!("127.0.0.1:{port}"), "/readyz")
            .await
            .is_some_and(|(status, body)| status == 503 && body.contains("no server is the writer"))
    })
    .await;
    pair.promote();
    // Writes go on against the new primary for a while, then stop.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let written = writes.await.unwrap();
    assert!(written > 100, "the writer wrote {written} changes");

    let new_primary = crate::support::pg::connect(&pair.standby_url()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Err(diff) = stores_equal(&new_primary, &redis, &p, &index).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stores do not equal the new primary: {diff}\nlog:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let metrics = http_get(&format!("127.0.0.1:{port}"), "/metrics").await.expect("metrics").1;
    assert_eq!(metric_value(&metrics, "polysync_pg_timeline_changes_total", &[("source", "db")]), 1.0, "{metrics}");
    assert!(metric_value(&metrics, "polysync_source_reconnects_total", &[("source", "db")]) >= 1.0, "{metrics}");
    let text = d.log_text();
    assert!(text.contains("failover: the writer is a promoted standby"), "{text}");
    // And it streams on from the new primary.
    new_primary
        .batch_execute("UPDATE items SET name = 'after' WHERE id IN (SELECT id FROM items LIMIT 5)")
        .await
        .unwrap();
    wait_for("streaming on the new primary", WAIT, || async {
        stores_equal(&new_primary, &redis, &p, &index).await.is_ok()
    })
    .await;
    assert!(d.terminate().await.success());
    crate::support::search::delete_index(&index).await;
}

/// A failover to a server without a copy of the slot (a slot that is not a failover slot, as
/// before PostgreSQL 17 or in a blue/green switchover) is never a silent gap: the start warns
/// that the slot would not survive, the stream stops naming the lost slot and the policy, and
/// with `on_slot_lost = "resnapshot"` the next start re-reads everything from the new writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_that_leaves_no_slot_stops_the_source_and_the_policy_repairs_it() {
    let _g = shared().await;
    let pair = PgPair::create();
    let primary = crate::support::pg::connect(&pair.primary_url()).await;
    let (p, slot, index) = (unique("nf"), unique("s"), unique("nf-idx").to_lowercase());
    primary
        .batch_execute(&format!(
            "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, qty int NOT NULL); \
             CREATE TABLE polysync_signal (id bigserial PRIMARY KEY, pipeline text NOT NULL, relation text, filter text, requested_at timestamptz NOT NULL DEFAULT now()); \
             CREATE PUBLICATION {slot} FOR TABLE items, polysync_signal WITH (publish_via_partition_root = true); \
             INSERT INTO items SELECT i, 'n' || i, i FROM generate_series(1, 50) i"
        ))
        .await
        .unwrap();
    primary.batch_execute(&format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")).await.unwrap();
    let port = free_port();
    let ws = Workspace::new();
    ws.write_config(&pair_config(&pair, &slot, port, ""));
    ws.write_pipeline(
        "items",
        &pair_pipeline(&p, &index).replace("source = \"db\"\n", "source = \"db\"\nsnapshot = \"initial\"\n"),
    );
    // check --online says it before anything runs: the slot would not survive a failover.
    let (code, out) = check_online(&ws.config_path());
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("writer 127.0.0.1:")
            && out.contains("warning: failover readiness")
            && out.contains("is not a failover slot"),
        "{out}"
    );
    let redis = TestRedis::connect().await;
    let log = ws.path().join("daemon.log");
    let mut d = ChildDaemon::spawn(&ws.config_path(), &log);
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Err(diff) = stores_equal(&primary, &redis, &p, &index).await {
        assert!(tokio::time::Instant::now() < deadline, "the initial snapshot: {diff}\nlog:\n{}", d.log_text());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let start = d.log_text();
    assert!(start.contains("is not a failover slot"), "the start says the slot would not survive a failover:\n{start}");
    let metrics = http_get(&format!("127.0.0.1:{port}"), "/metrics").await.expect("metrics").1;
    assert!(metric_value(&metrics, "polysync_pg_failover_gaps", &[("source", "db")]) >= 1.0, "{metrics}");

    // A switchover: the primary stops, the standby (no copy of the slot) is promoted, and
    // rows change there.
    pair.stop_primary();
    pair.promote();
    let new_primary = crate::support::pg::connect(&pair.standby_url()).await;
    new_primary
        .batch_execute("UPDATE items SET qty = 0 WHERE id <= 10; DELETE FROM items WHERE id > 40")
        .await
        .unwrap();
    let exited = tokio::time::timeout(WAIT, d.child.wait()).await.expect("the source stops").unwrap();
    assert!(!exited.success(), "the daemon exits non-zero");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("does not exist on this server") && text.contains("on_slot_lost = \"stop\""),
        "the stop names the lost slot and the policy:\n{text}"
    );
    assert!(stores_equal(&new_primary, &redis, &p, &index).await.is_err(), "the gap is real");

    // check --online finds the lost slot the start would refuse (exit 2).
    let (code, out) = check_online(&ws.config_path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no longer exists"), "{out}");
    // Default policy: the next start refuses, and says why (in this process: metrics off).
    ws.write_config(
        &pair_config(&pair, &slot, port, "").replace(&format!("listen = \"127.0.0.1:{port}\""), "enabled = false"),
    );
    let why = refusal(&ws.config_path()).await;
    assert!(why.contains("no longer exists") && why.contains("on_slot_lost"), "{why}");
    // resnapshot: a new slot on the new primary, every table read again.
    ws.write_config(&pair_config(&pair, &slot, port, "on_slot_lost = \"resnapshot\""));
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Err(diff) = stores_equal(&new_primary, &redis, &p, &index).await {
        assert!(tokio::time::Instant::now() < deadline, "the re-read: {diff}\nlog:\n{}", d.log_text());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(d.terminate().await.success());
    crate::support::search::delete_index(&index).await;
}

/// Standby decoding (PostgreSQL 16+): with `standby_url` the slot lives on the read replica and
/// the stream decodes there, while set-up, heartbeats and snapshot watermarks are written on
/// the writer and reach the standby through its WAL. An initial snapshot and live writes on the
/// primary arrive; an idle database's slot on the standby still advances (heartbeats).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decoding_on_a_standby_delivers_the_primarys_writes_and_snapshots() {
    let _g = shared().await;
    let pair = PgPair::create();
    let primary = crate::support::pg::connect(&pair.primary_url()).await;
    let standby = crate::support::pg::connect(&pair.standby_url()).await;
    primary
        .batch_execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, qty int NOT NULL); \
             INSERT INTO items SELECT i, 'n' || i, i FROM generate_series(1, 500) i",
        )
        .await
        .unwrap();
    let (p, slot, index) = (unique("sd"), unique("s"), unique("sd-idx").to_lowercase());
    let port = free_port();
    let ws = Workspace::new();
    let config = pair_config(&pair, &slot, port, "create_if_missing = true").replace(
        &format!("hosts = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]", pair.primary_port, pair.standby_port),
        &format!(
            "url = \"postgres://127.0.0.1:{}/polysync\"\nstandby_url = \"postgres://127.0.0.1:{}\"",
            pair.primary_port, pair.standby_port
        ),
    );
    assert!(config.contains("standby_url"));
    ws.write_config(&config);
    ws.write_pipeline(
        "items",
        &pair_pipeline(&p, &index).replace("source = \"db\"\n", "source = \"db\"\nsnapshot = \"initial\"\n"),
    );
    let redis = TestRedis::connect().await;
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Err(diff) = stores_equal(&primary, &redis, &p, &index).await {
        assert!(tokio::time::Instant::now() < deadline, "the initial snapshot: {diff}\nlog:\n{}", d.log_text());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(slot_active(&standby, &slot).await, Some(true), "the slot lives on the standby and is streamed from");
    assert_eq!(slot_active(&primary, &slot).await, None, "no slot on the writer");

    primary
        .batch_execute("UPDATE items SET qty = qty + 1 WHERE id % 3 = 0; DELETE FROM items WHERE id > 450; INSERT INTO items VALUES (1000, 'new', 1)")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Err(diff) = stores_equal(&primary, &redis, &p, &index).await {
        assert!(tokio::time::Instant::now() < deadline, "live writes: {diff}\nlog:\n{}", d.log_text());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Idle: only heartbeats (written on the writer) move the slot on the standby past here.
    let here: String = primary.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    wait_for("the slot on the standby to pass an idle writer's position", WAIT, || async {
        standby
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                &[&here, &slot],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    assert!(d.terminate().await.success());
    crate::support::search::delete_index(&index).await;
}
