//! Crash safety: the daemon as a child process, `kill -9` at random (seeded) moments while a
//! workload runs, restarted each time.
//!
//! After every kill, before restarting, the slot's confirmed_flush_lsn is compared with the
//! cache: every transaction that committed at or below it must already be in Redis (the slot
//! never confirms an unapplied change). At the end every change has arrived (at least once) and
//! the set-mode cache equals the table.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::support::daemon::{ChildDaemon, pg_cache_config};
use crate::support::pg::{TestDb, connect};
use crate::support::redis::TestRedis;
use crate::support::{Workspace, shared, unique, wait_for};

/// Committed transactions: (inserted ids, an LSN at or after the commit's end).
type Ledger = Arc<Mutex<Vec<(Vec<i64>, u64)>>>;

async fn assert_applied_up_to(db: &TestDb, redis: &TestRedis, p: &str, slot: &str, ledger: &Ledger) -> usize {
    let confirmed = db.confirmed(slot).await;
    let committed: Vec<(Vec<i64>, u64)> = ledger.lock().unwrap().clone();
    let mut checked = 0;
    for (ids, lsn) in committed.iter().filter(|(_, lsn)| *lsn <= confirmed) {
        for id in ids {
            assert!(
                !redis.exists(&format!("{p}:m:{id}")).await,
                "slot confirmed {} but the insert of id {id} (committed by {}) was never applied",
                polysync::change::Lsn(confirmed),
                polysync::change::Lsn(*lsn)
            );
            assert!(redis.exists(&format!("{p}:item:{id}")).await, "item {id} missing below the confirmed position");
            checked += 1;
        }
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_random_moments_loses_nothing_and_never_confirms_unapplied_changes() {
    let _g = shared().await;
    let seed: u64 = std::env::var("POLYSYNC_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261124);
    eprintln!("crash test seed {seed} (set POLYSYNC_TEST_SEED to reproduce)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let db = TestDb::create("crash").await;
    db.exec("CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL)").await;
    let p = unique("crash");
    let slot = unique("s");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    ws.write_pipeline(
        "items",
        &format!(
            r#"source = "db"
[match]
relations = ["public.items"]
[[sink]]
target = "cache"
action = "set"
key = "{p}:item:{{{{ key.id }}}}"
"#
        ),
    );
    ws.write_pipeline(
        "markers",
        &format!(
            r#"source = "db"
[match]
relations = ["public.items"]
ops = ["insert"]
[[sink]]
target = "cache"
action = "invalidate"
keys = ["{p}:m:{{{{ key.id }}}}"]
"#
        ),
    );
    const N: i64 = 4000;
    let redis = TestRedis::connect().await;
    for id in 1..=N {
        redis.set(&format!("{p}:m:{id}"), "pending").await;
    }
    let log = ws.path().join("daemon.log");
    let mut daemon = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("slot creation", Duration::from_secs(60), || async { db.confirmed(&slot).await > 0 }).await;

    // Workload: small transactions of inserts plus updates of earlier rows.
    let ledger: Ledger = Arc::default();
    let workload = {
        let ledger = Arc::clone(&ledger);
        let url = db.url.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
        tokio::spawn(async move {
            let c = connect(&url).await;
            let mut next = 1i64;
            while next <= N {
                let k = rng.random_range(1..=5).min(N - next + 1);
                let ids: Vec<i64> = (next..next + k).collect();
                next += k;
                let mut sql = String::from("BEGIN;");
                for id in &ids {
                    sql.push_str(&format!("INSERT INTO items VALUES ({id}, 0);"));
                }
                if next > 10 {
                    let earlier = rng.random_range(1..next - 1);
                    sql.push_str(&format!("UPDATE items SET v = v + 1 WHERE id = {earlier};"));
                }
                sql.push_str("COMMIT;");
                c.batch_execute(&sql).await.expect("workload tx");
                let lsn: String = c.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
                ledger.lock().unwrap().push((ids, lsn.parse::<polysync::change::Lsn>().unwrap().0));
                if rng.random_bool(0.3) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
    };

    let mut kills = 0;
    let mut checked = 0;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        daemon.kill9().await;
        kills += 1;
        checked += assert_applied_up_to(&db, &redis, &p, &slot, &ledger).await;
        daemon = ChildDaemon::spawn(&ws.config_path(), &log);
    }
    workload.await.expect("workload");
    db.wait_caught_up(&slot, Duration::from_secs(120)).await;
    assert_applied_up_to(&db, &redis, &p, &slot, &ledger).await;

    // Every insert arrived at least once, and the set-mode cache equals the table.
    for id in 1..=N {
        assert!(!redis.exists(&format!("{p}:m:{id}")).await, "insert of {id} never invalidated its marker");
    }
    let rows = db.client.query("SELECT id, v FROM items ORDER BY id", &[]).await.unwrap();
    assert_eq!(rows.len() as i64, N);
    for r in rows {
        let (id, v): (i64, i32) = (r.get(0), r.get(1));
        assert_eq!(redis.get(&format!("{p}:item:{id}")).await, Some(format!(r#"{{"id":{id},"v":{v}}}"#)), "item {id}");
    }
    let status = daemon.terminate().await;
    assert!(
        status.success(),
        "daemon exit after SIGTERM: {status:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    eprintln!("crash test: {N} inserts, {kills} kill -9, {checked} applied-before-confirm checks");
    db.cleanup().await;
}
