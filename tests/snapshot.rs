//! Snapshots and backfills (watermark chunks) against real PostgreSQL, Redis and OpenSearch:
//! the derived stores start complete and end exactly equal to the table, whatever the stream
//! did meanwhile, across a kill -9, and while other tables keep streaming.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use polysync::checkpoint::snapshot::{SnapshotProgress, TaskState};

use crate::support::converge::{eventually_converged, pg_rows, redis_docs, search_docs};
use crate::support::daemon::{ChildDaemon, InProcess, pg_cache_config_with};
use crate::support::pg::{TestDb, connect};
use crate::support::redis::TestRedis;
use crate::support::{Workspace, shared, unique, wait_for};

const WAIT: Duration = Duration::from_secs(300);

fn tasks(ws: &Workspace) -> Vec<polysync::checkpoint::snapshot::SnapshotTask> {
    SnapshotProgress::load(&ws.path().join("state/snapshot-db.json")).map(|p| p.tasks).unwrap_or_default()
}

fn all_done(ws: &Workspace, n: usize) -> bool {
    let t = tasks(ws);
    t.len() == n && t.iter().all(|t| t.state == TaskState::Done)
}

fn cache_pipeline(name: &str, table: &str, prefix: &str, snapshot: bool) -> String {
    format!(
        "name = \"{name}\"\nsource = \"db\"\n{}[match]\nrelations = [\"public.{table}\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{prefix}{{{{ key.id }}}}\"\nformat = \"json\"\n",
        if snapshot { "snapshot = \"initial\"\n" } else { "" }
    )
}

/// Random updates, deletes and inserts on `items` until `stop`; returns how many ran.
async fn writer(url: String, stop: Arc<AtomicBool>, max_id: i64) -> u64 {
    let c = connect(&url).await;
    let mut n = 0u64;
    let mut next_id = max_id + 1;
    while !stop.load(Ordering::SeqCst) {
        let a = (rand::random::<u64>() % max_id as u64) as i64 + 1;
        let b = (rand::random::<u64>() % max_id as u64) as i64 + 1;
        c.batch_execute(&format!(
            "BEGIN; UPDATE items SET stock = stock + 1, v = v + 1 WHERE id = {a}; DELETE FROM items WHERE id = {b}; \
             INSERT INTO items VALUES ({next_id}, 'new {next_id}', 1, 0); COMMIT;"
        ))
        .await
        .unwrap();
        next_id += 1;
        n += 1;
    }
    n
}

async fn items_table(db: &TestDb, rows: i64) {
    db.exec(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, stock int NOT NULL, v bigint NOT NULL); \
         INSERT INTO items SELECT i, 'item ' || i, i % 100, 0 FROM generate_series(1, {rows}) i; ANALYZE items;"
    ))
    .await;
}

const ITEMS_JSON: &str = "SELECT id::text, row_to_json(t)::text FROM (SELECT id, name, stock, v FROM items) t";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn initial_snapshot_under_concurrent_writes_ends_exact_in_search_and_cache() {
    let _g = shared().await;
    let db = TestDb::create("snap").await;
    const ROWS: i64 = 200_000;
    items_table(&db, ROWS).await;
    let slot = unique("s");
    let p = format!("{}:", unique("sn"));
    let index = unique("snapidx").to_lowercase();
    let ws = Workspace::new();
    let search = format!("\n[sinks.search]\nkind = \"search\"\nurl = \"{}\"\n", crate::support::search::url());
    ws.write_config(&pg_cache_config_with(
        &db.url,
        &slot,
        &slot,
        "[sources.db.snapshot]\nchunk_size = 4000\nparallelism = 2\n",
        &search,
    ));
    ws.write_pipeline("items-cache", &cache_pipeline("items-cache", "items", &p, true));
    ws.write_pipeline(
        "items-search",
        &format!(
            "name = \"items-search\"\nsource = \"db\"\nsnapshot = \"initial\"\n[match]\nrelations = [\"public.items\"]\n[[sink]]\ntarget = \"search\"\nindex = \"{index}\"\nid = \"{{{{ key.id }}}}\"\n"
        ),
    );
    let started = Instant::now();
    let d = InProcess::start(&ws.config_path());
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(db.url.clone(), Arc::clone(&stop), ROWS));
    wait_for("both initial snapshots to finish", WAIT, || async { all_done(&ws, 2) }).await;
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let writes = w.await.unwrap();
    db.wait_caught_up(&slot, WAIT).await;
    eprintln!(
        "snapshot: {} rows into cache + search in {:.1}s ({:.0} rows/s per pipeline) with {writes} concurrent write transactions",
        ROWS,
        took.as_secs_f64(),
        ROWS as f64 / took.as_secs_f64()
    );
    assert!(writes > 0, "the writer ran during the snapshot");
    let t = tasks(&ws);
    assert!(t.iter().all(|t| t.relation == "public.items" && t.chunks >= 50), "{t:?}");

    let expected = pg_rows(&db.client, ITEMS_JSON).await;
    let redis = TestRedis::connect().await;
    eventually_converged("cache", &expected, WAIT, || redis_docs(&redis.client, &p)).await;
    eventually_converged("search", &expected, WAIT, || search_docs(&index)).await;
    d.stop().await.unwrap();
    crate::support::search::delete_index(&index).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_snapshot_resumes_from_the_last_applied_chunk() {
    let _g = shared().await;
    let db = TestDb::create("snapkill").await;
    const ROWS: i64 = 40_000;
    items_table(&db, ROWS).await;
    let slot = unique("s");
    let p = format!("{}:", unique("sk"));
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config_with(
        &db.url,
        &slot,
        &slot,
        "[sources.db.snapshot]\nchunk_size = 1000\nmax_rows_per_second = 8000\n",
        "",
    ));
    ws.write_pipeline("items-cache", &cache_pipeline("items-cache", "items", &p, true));
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(db.url.clone(), Arc::clone(&stop), ROWS));
    wait_for("a quarter of the snapshot", WAIT, || async { tasks(&ws).first().is_some_and(|t| t.rows >= 10_000) })
        .await;
    d.kill9().await;
    let at_kill = tasks(&ws)[0].clone();
    assert_ne!(at_kill.state, TaskState::Done);
    assert!(at_kill.last_key.is_some());

    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("the resumed snapshot to finish", WAIT, || async { all_done(&ws, 1) }).await;
    stop.store(true, Ordering::SeqCst);
    let inserted = w.await.unwrap();
    db.wait_caught_up(&slot, WAIT).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("resuming snapshot after the last applied chunk"), "{text}");
    // Rows are counted once per applied chunk: a resume from the last applied chunk reads each
    // row exactly once (restarting from the beginning would count more).
    let done = &tasks(&ws)[0];
    let read_rows: i64 =
        db.client.query_one("SELECT count(*) FROM items WHERE id <= $1", &[&ROWS]).await.unwrap().get(0);
    assert!(done.rows as i64 >= read_rows && done.rows <= ROWS as u64 + inserted, "{done:?} ({inserted} inserted)");
    let expected = pg_rows(&db.client, ITEMS_JSON).await;
    let redis = TestRedis::connect().await;
    eventually_converged("cache after kill -9 and resume", &expected, WAIT, || redis_docs(&redis.client, &p)).await;
    assert!(d.terminate().await.success());
    db.cleanup().await;
}

fn polysync(args: &[&str], config: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_polysync"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run polysync")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_demand_backfill_of_one_table_while_others_stream_and_a_keyless_table_is_refused() {
    let _g = shared().await;
    let db = TestDb::create("backfill").await;
    items_table(&db, 8_000).await;
    db.exec(
        "CREATE TABLE orders (id bigint PRIMARY KEY, total int NOT NULL); \
         CREATE TABLE events (at timestamptz NOT NULL, what text); ALTER TABLE events REPLICA IDENTITY FULL; \
         INSERT INTO events VALUES (now(), 'old')",
    )
    .await;
    let slot = unique("s");
    let (pi, po) = (format!("{}:", unique("bi")), format!("{}:", unique("bo")));
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config_with(&db.url, &slot, &slot, "[sources.db.snapshot]\nchunk_size = 500\n", ""));
    ws.write_pipeline("items-cache", &cache_pipeline("items-cache", "items", &pi, false));
    ws.write_pipeline("orders-cache", &cache_pipeline("orders-cache", "orders", &po, false));
    ws.write_pipeline(
        "events-cache",
        "name = \"events-cache\"\nsource = \"db\"\n[match]\nrelations = [\"public.events\"]\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"ev:{{ row.what }}\"]\n",
    );
    let d = InProcess::start(&ws.config_path());
    wait_for("slot active", WAIT, || async { db.confirmed(&slot).await > 0 }).await;
    // Orders keep streaming during the backfill.
    let url = db.url.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = Arc::clone(&stop);
    let orders = tokio::spawn(async move {
        let c = connect(&url).await;
        let mut n = 0i64;
        while !s2.load(Ordering::SeqCst) {
            n += 1;
            c.batch_execute(&format!("INSERT INTO orders VALUES ({n}, {n})")).await.unwrap();
        }
        n
    });
    let config = ws.config_path();
    let out = tokio::task::spawn_blocking(move || {
        polysync(
            &["snapshot", "--pipeline", "items-cache", "--table", "items", "--where", "id % 2 = 0", "--wait"],
            &config,
        )
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    stop.store(true, Ordering::SeqCst);
    let n_orders = orders.await.unwrap();
    db.wait_caught_up(&slot, WAIT).await;
    let redis = TestRedis::connect().await;
    // Exactly the even items (the --where), and only the items pipeline received them.
    let expected = pg_rows(&db.client, &format!("{ITEMS_JSON} WHERE id % 2 = 0")).await;
    assert_eq!(expected.len(), 4_000);
    eventually_converged("backfilled items", &expected, WAIT, || redis_docs(&redis.client, &pi)).await;
    let orders_expected = pg_rows(&db.client, "SELECT id::text, row_to_json(o)::text FROM orders o").await;
    assert_eq!(orders_expected.len() as i64, n_orders);
    eventually_converged("orders streamed during the backfill", &orders_expected, WAIT, || {
        redis_docs(&redis.client, &po)
    })
    .await;
    let status = polysync(&["status"], &ws.config_path());
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("done") && status.contains("public.items") && status.contains("4000 rows"), "{status}");

    // A table without a primary key cannot be chunked: a clear error, the daemon keeps running.
    let out = polysync(&["snapshot", "--pipeline", "events-cache", "--wait"], &ws.config_path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("public.events has no primary key"), "{err}");
    db.exec("INSERT INTO orders VALUES (-1, 7)").await;
    db.wait_caught_up(&slot, WAIT).await;
    assert!(redis.exists(&format!("{po}-1")).await, "the stream still flows");

    // Pipelines a reload adds: one with `snapshot = "initial"` is filled at once, another is
    // filled by `polysync snapshot`, whose answer is the daemon's (the first-hour case).
    let (pn, pc) = (format!("{}:", unique("bn")), format!("{}:", unique("bc")));
    ws.write_pipeline("orders-new", &cache_pipeline("orders-new", "orders", &pn, true));
    ws.write_pipeline("orders-cmd", &cache_pipeline("orders-cmd", "orders", &pc, false));
    d.reload();
    let orders_now = pg_rows(&db.client, "SELECT id::text, row_to_json(o)::text FROM orders o").await;
    eventually_converged("the initial snapshot of a pipeline added by reload", &orders_now, WAIT, || {
        redis_docs(&redis.client, &pn)
    })
    .await;
    let config = ws.config_path();
    let out =
        tokio::task::spawn_blocking(move || polysync(&["snapshot", "--pipeline", "orders-cmd", "--wait"], &config))
            .await
            .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eventually_converged("a snapshot of a pipeline added by reload", &orders_now, WAIT, || {
        redis_docs(&redis.client, &pc)
    })
    .await;
    // A pipeline the daemon does not run: the daemon's refusal, with its reason.
    let out = polysync(&["snapshot", "--pipeline", "no-such-pipeline", "--wait"], &ws.config_path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-pipeline"), "{err}");
    d.stop().await.unwrap();
    db.cleanup().await;
}
