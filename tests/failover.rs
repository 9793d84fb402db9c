//! Failover and lost slots: a gap between what the sinks got and what the slot streams is
//! never skipped silently.

use std::time::Duration;

use crate::support::daemon::{ChildDaemon, pg_cache_config_with, refusal};
use crate::support::pg::TestDb;
use crate::support::redis::TestRedis;
use crate::support::{Workspace, free_port, http_get, metric_value, shared, unique, wait_for};

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
    assert!(std::fs::read_to_string(&log).unwrap().contains("the slot was dropped while streaming"));
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
