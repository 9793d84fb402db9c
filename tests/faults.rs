//! Fault injection: a mixed workload on two tables feeds a cache (version-guarded `set`) and a
//! search index, and in the kill and outage scenarios also a graph (an edge per order, moved
//! when the order's item changes) and InfluxDB (a point per order change); faults are injected
//! while it runs; every scenario ends in an exact convergence check of every store against
//! PostgreSQL (duplicates allowed, loss and regression never).
//!
//! Counts and pauses are reduced in `make test` (and CI); `make test-faults` runs the full
//! scenario (20 kills, 30 s outages) by setting `POLYSYNC_FAULT_KILLS` and `POLYSYNC_FAULT_PAUSE`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::support::converge::{Docs, diff, graph_edges, influx_last, pg_rows, redis_docs, search_docs};
use crate::support::daemon::{ChildDaemon, pg_cache_config_with};
use crate::support::pg::{TestDb, connect};
use crate::support::proxy::Proxy;
use crate::support::redis::TestRedis;
use crate::support::{Workspace, exclusive, peers, shared, unique, wait_for};

const WAIT: Duration = Duration::from_secs(240);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn seed() -> u64 {
    let s = env_u64("POLYSYNC_TEST_SEED", 20261124);
    eprintln!("fault seed {s} (set POLYSYNC_TEST_SEED to reproduce)");
    s
}

/// The scenario's stores: key prefixes, the index, and (when `all`) the graph's id prefix and
/// the InfluxDB database.
struct Stores {
    items: String,
    orders: String,
    index: String,
    all: bool,
    graph: String,
    influx_db: String,
}

impl Stores {
    /// Cache and search only.
    fn new() -> Stores {
        Stores {
            items: format!("{}:", unique("fi")),
            orders: format!("{}:", unique("fo")),
            index: unique("faults").to_lowercase(),
            all: false,
            graph: format!("{}:", unique("fg")),
            influx_db: unique("faults"),
        }
    }

    /// Every sink kind: cache, search, graph and time series.
    fn all() -> Stores {
        Stores { all: true, ..Stores::new() }
    }

    fn pipelines(&self, ws: &Workspace) {
        let set = |name: &str, table: &str, prefix: &str| {
            format!(
                "name = \"{name}\"\nsource = \"db\"\n[match]\nrelations = [\"public.{table}\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{prefix}{{{{ key.id }}}}\"\nformat = \"json\"\n"
            )
        };
        ws.write_pipeline("items-cache", &set("items-cache", "items", &self.items));
        ws.write_pipeline("orders-cache", &set("orders-cache", "orders", &self.orders));
        ws.write_pipeline(
            "items-search",
            &format!(
                "name = \"items-search\"\nsource = \"db\"\n[match]\nrelations = [\"public.items\"]\n[[sink]]\ntarget = \"search\"\nindex = \"{}\"\nid = \"{{{{ key.id }}}}\"\n",
                self.index
            ),
        );
        if !self.all {
            return;
        }
        // An order is an edge from the order to its item; changing `total` moves the edge.
        let g = &self.graph;
        ws.write_pipeline(
            "orders-graph",
            &format!(
                "name = \"orders-graph\"\nsource = \"db\"\n[match]\nrelations = [\"public.orders\"]\n[[sink]]\ntarget = \"graph\"\n[[sink.edge]]\nlabel = \"ordered\"\nid = \"{g}o:{{{{ key.id }}}}\"\nfrom = {{ label = \"order\", id = \"{g}order:{{{{ key.id }}}}\" }}\nto = {{ label = \"item\", id = \"{g}item:{{{{ row.total }}}}\" }}\n"
            ),
        );
        // Every insert and update of an order is a point at its commit time; the last point per
        // order holds the current total.
        ws.write_pipeline(
            "orders-metrics",
            "name = \"orders-metrics\"\nsource = \"db\"\n[match]\nrelations = [\"public.orders\"]\nops = [\"insert\", \"update\"]\n[[sink]]\ntarget = \"metrics\"\n[[sink.point]]\nmeasurement = \"order_total\"\ntags = { order = \"{{ key.id }}\" }\nfields = { total = { path = \"after.total\", type = \"bigint\" } }\n",
        );
    }

    /// Wait until every store equals the tables (a bounded wait: what is in flight lands, from
    /// memory or from a sink's spool, which may still be draining after the slot caught up).
    async fn assert_converged(&self, db: &TestDb, slot: &str) {
        db.wait_caught_up(slot, WAIT).await;
        let items =
            pg_rows(&db.client, "SELECT id::text, row_to_json(t)::text FROM (SELECT id, name, stock, v FROM items) t")
                .await;
        let orders =
            pg_rows(&db.client, "SELECT id::text, row_to_json(t)::text FROM (SELECT id, total FROM orders) t").await;
        let g = &self.graph;
        let edges = pg_rows(
            &db.client,
            &format!(
                "SELECT 'o:' || id, json_build_object('from', '{g}order:' || id, 'to', '{g}item:' || total)::text FROM orders"
            ),
        )
        .await;
        let totals = pg_rows(&db.client, "SELECT id::text, json_build_object('total', total)::text FROM orders").await;
        let redis = TestRedis::connect().await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut d = diff("cache items", &items, &redis_docs(&redis.client, &self.items).await);
            d.extend(diff("cache orders", &orders, &redis_docs(&redis.client, &self.orders).await));
            d.extend(diff("search items", &items, &search_docs(&self.index).await));
            if self.all {
                d.extend(diff("graph edges", &edges, &graph_edges(g).await));
                d.extend(diff(
                    "influxdb last point per order",
                    &totals,
                    &influx_last(&self.influx_db, "order_total", "order", "total").await,
                ));
            }
            if d.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} differences after {WAIT:?}, first: {:#?}",
                d.len(),
                &d[..d.len().min(10)]
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!(
            "converged: {} items, {} orders in cache and search{}",
            items.len(),
            orders.len(),
            if self.all { ", graph and InfluxDB" } else { "" }
        );
    }

    /// Drop what the scenario created outside PostgreSQL.
    async fn cleanup(&self) {
        crate::support::search::delete_index(&self.index).await;
        if self.all {
            crate::support::graph::query(
                "g.V().hasId(startingWith(p)).drop().iterate(); 0",
                serde_json::json!({ "p": self.graph }),
            )
            .await;
            crate::support::converge::influx_drop(&self.influx_db).await;
        }
    }
}

/// SIGHUP the daemon and wait until its log says the reload finished (not merely that the
/// signal was sent), so a reload is known to have run inside the fault window.
async fn reload(d: &ChildDaemon, log: &std::path::Path) {
    let count = || std::fs::read_to_string(log).unwrap_or_default().matches("reloaded").count();
    let before = count();
    d.signal(libc::SIGHUP);
    wait_for("the reload to finish", WAIT, || async { count() > before }).await;
}

async fn schema(db: &TestDb) {
    db.exec(
        "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, stock int NOT NULL, v bigint NOT NULL); \
         CREATE TABLE orders (id bigint PRIMARY KEY, total int NOT NULL);",
    )
    .await;
}

/// The starting rows, written once the slot exists (so the stream carries them).
async fn seed_rows(db: &TestDb) {
    db.exec("INSERT INTO items SELECT i, 'item ' || i, 10, 0 FROM generate_series(1, 2000) i").await;
}

/// Random transactions over both tables until `stop`; survives the database going away
/// (reconnects). Returns the transactions committed.
fn workload(url: String, seed: u64, stop: Arc<AtomicBool>, committed: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut next_order = 1i64;
        let mut client: Option<tokio_postgres::Client> = None;
        while !stop.load(Ordering::SeqCst) {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(conn);
                        Some(c)
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
            }
            let c = client.as_ref().unwrap();
            let mut sql = String::from("BEGIN;");
            for _ in 0..rng.random_range(1..6) {
                let id: i64 = rng.random_range(1..2500);
                sql.push_str(&match rng.random_range(0..10) {
                    0..=3 => format!("UPDATE items SET stock = stock + 1, v = v + 1 WHERE id = {id};"),
                    4 => format!("DELETE FROM items WHERE id = {id};"),
                    5..=6 => format!(
                        "INSERT INTO items VALUES ({id}, 'again {id}', 1, 0) ON CONFLICT (id) DO UPDATE SET name = 'upserted', v = items.v + 1;"
                    ),
                    7..=8 => {
                        next_order += 1;
                        format!("INSERT INTO orders VALUES ({next_order}, {id});")
                    }
                    _ => format!("UPDATE orders SET total = total + 1 WHERE id = {};", rng.random_range(1..next_order.max(2))),
                });
            }
            sql.push_str("COMMIT;");
            match c.batch_execute(&sql).await {
                Ok(()) => {
                    committed.fetch_add(1, Ordering::SeqCst);
                }
                Err(_) => {
                    let _ = c.batch_execute("ROLLBACK").await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..5))).await;
        }
    })
}

/// Where the daemon reaches each sink (a proxy in front of some in some scenarios).
struct Urls {
    cache: String,
    search: String,
    graph: String,
}

impl Urls {
    fn direct() -> Urls {
        Urls {
            cache: crate::support::redis::url(),
            search: crate::support::search::url(),
            graph: crate::support::graph::url(),
        }
    }
}

fn config(db: &TestDb, slot: &str, urls: &Urls, stores: &Stores, extra_source: &str) -> String {
    let more = format!(
        "\n[sinks.graph]\nkind = \"graph\"\nurl = \"{}\"\ntimeout = \"5s\"\n\n[sinks.metrics]\nkind = \"timeseries\"\nengine = \"influxdb\"\nurl = \"{}\"\ndatabase = \"{}\"\ncreate_database = true\ntimeout = \"5s\"\n",
        urls.graph,
        crate::support::converge::influx_url(),
        stores.influx_db
    );
    let sinks = format!(
        "\n[sinks.search]\nkind = \"search\"\nurl = \"{}\"\ntimeout = \"5s\"\n{}\n[reload]\nwatch = false\n",
        urls.search,
        if stores.all { more.as_str() } else { "" }
    );
    // Spooling is part of what the faults exercise: a sink that is down spills after a second.
    crate::support::daemon::quick_spill(pg_cache_config_with(&db.url, slot, slot, extra_source, &sinks)).replace(
        &format!("url = \"{}\"\ntimeout", crate::support::redis::url()),
        &format!("url = \"{}\"\ntimeout", urls.cache),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_seeded_moments_with_reloads_converges_in_every_sink() {
    let _g = shared().await;
    let kills = env_u64("POLYSYNC_FAULT_KILLS", 20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let db = TestDb::create("faultkill").await;
    schema(&db).await;
    let slot = unique("s");
    let stores = Stores::all();
    let ws = Workspace::new();
    ws.write_config(&config(&db, &slot, &Urls::direct(), &stores, ""));
    stores.pipelines(&ws);
    let log = ws.path().join("daemon.log");
    // The slot exists before the workload starts, so every change is streamed.
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("slot created", WAIT, || async { db.confirmed(&slot).await > 0 }).await;
    seed_rows(&db).await;
    d.kill9().await;
    let (stop, committed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let w = workload(db.url.clone(), rng.random(), Arc::clone(&stop), Arc::clone(&committed));
    let mut reloads = 0;
    for _ in 0..kills {
        let d = ChildDaemon::spawn(&ws.config_path(), &log);
        let life = Duration::from_millis(rng.random_range(150..1500));
        if rng.random_bool(0.3) {
            tokio::time::sleep(life / 2).await;
            d.signal(libc::SIGHUP);
            reloads += 1;
            tokio::time::sleep(life / 2).await;
        } else {
            tokio::time::sleep(life).await;
        }
        d.kill9().await;
    }
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    w.await.unwrap();
    stores.assert_converged(&db, &slot).await;
    eprintln!(
        "kill -9 scenario: {} transactions committed, {kills} kills, {reloads} reloads, converged",
        committed.load(Ordering::SeqCst)
    );
    assert!(d.terminate().await.success());
    stores.cleanup().await;
    db.cleanup().await;
}

/// Stopping the real Redis or Gremlin Server would lose their data (the local Redis has no
/// persistence, TinkerGraph lives in memory), so those outages are cuts at a loopback proxy (a
/// mock at the TCP level, named as such); OpenSearch, InfluxDB and PostgreSQL are really
/// stopped and restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sink_outages_a_killed_walsender_and_a_postgres_restart_converge() {
    let _g = exclusive().await;
    let pause = Duration::from_secs(env_u64("POLYSYNC_FAULT_PAUSE", 5));
    let db = TestDb::create("faultout").await;
    schema(&db).await;
    let slot = unique("s");
    let stores = Stores::all();
    let redis_addr = crate::support::redis::url().trim_start_matches("redis://").trim_end_matches('/').to_string();
    let cache_proxy = Proxy::start(&redis_addr).await;
    let graph_url = url::Url::parse(&crate::support::graph::url()).unwrap();
    let graph_proxy =
        Proxy::start(&format!("{}:{}", graph_url.host_str().unwrap(), graph_url.port_or_known_default().unwrap()))
            .await;
    let urls = Urls {
        cache: format!("redis://{}", cache_proxy.addr),
        search: crate::support::search::url(),
        graph: format!("ws://{}{}", graph_proxy.addr, graph_url.path()),
    };
    let ws = Workspace::new();
    ws.write_config(&config(&db, &slot, &urls, &stores, ""));
    stores.pipelines(&ws);
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("slot created", WAIT, || async { db.confirmed(&slot).await > 0 }).await;
    seed_rows(&db).await;
    let (stop, committed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let w = workload(db.url.clone(), 7, Arc::clone(&stop), Arc::clone(&committed));
    let mut faults = 0;

    // 1. The cache unreachable (connections cut, new ones refused), a reload in the middle.
    cache_proxy.set_down(true);
    tokio::time::sleep(pause / 2).await;
    reload(&d, &log).await;
    tokio::time::sleep(pause / 2).await;
    cache_proxy.set_down(false);
    faults += 1;
    // 2. OpenSearch stopped and started again, a reload in the middle.
    peers(&["--stop", "opensearch"]);
    tokio::time::sleep(pause / 2).await;
    reload(&d, &log).await;
    tokio::time::sleep(pause / 2).await;
    peers(&["opensearch"]);
    faults += 1;
    // 3. The graph unreachable, a reload in the middle.
    graph_proxy.set_down(true);
    tokio::time::sleep(pause / 2).await;
    reload(&d, &log).await;
    tokio::time::sleep(pause / 2).await;
    graph_proxy.set_down(false);
    faults += 1;
    // 4. InfluxDB stopped and started again, a reload in the middle.
    peers(&["--stop", "influxdb"]);
    tokio::time::sleep(pause / 2).await;
    reload(&d, &log).await;
    tokio::time::sleep(pause / 2).await;
    peers(&["influxdb"]);
    faults += 1;
    // 5. All four at once, a reload in the middle.
    cache_proxy.set_down(true);
    graph_proxy.set_down(true);
    peers(&["--stop", "opensearch", "influxdb"]);
    tokio::time::sleep(pause / 2).await;
    reload(&d, &log).await;
    tokio::time::sleep(pause / 2).await;
    cache_proxy.set_down(false);
    graph_proxy.set_down(false);
    peers(&["opensearch", "influxdb"]);
    faults += 1;
    // 6. The walsender terminated in the middle of streaming a large transaction.
    db.exec("BEGIN; UPDATE items SET v = v + 1000; INSERT INTO orders SELECT 1000000 + i, i FROM generate_series(1, 10000) i; COMMIT;")
        .await;
    for i in 0..3 {
        let _ = db
            .client
            .execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL", &[&slot])
            .await;
        if i == 1 {
            reload(&d, &log).await; // while the source reconnects
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        faults += 1;
    }
    // 7. PostgreSQL restarted mid-stream (the daemon reconnects; the workload too), then a
    // reload while the source catches up.
    peers(&["--restart", "postgres"]);
    faults += 1;
    reload(&d, &log).await;
    tokio::time::sleep(pause).await;
    stop.store(true, Ordering::SeqCst);
    w.await.unwrap();
    // The test's own connection did not survive the restart.
    let db = TestDb { client: connect(&db.url).await, ..db };
    stores.assert_converged(&db, &slot).await;
    eprintln!(
        "outage scenario: {} transactions committed, {faults} faults (cache cut, search stop, graph cut, InfluxDB stop, all four, 3 walsender kills, postgres restart), 7 reloads inside them, converged",
        committed.load(Ordering::SeqCst)
    );
    assert!(d.terminate().await.success());
    stores.cleanup().await;
    db.cleanup().await;
}

/// The search sink made slow by a loopback proxy (a mock at the TCP level) while the cache is
/// fast: memory stays bounded by the in-flight window, and the cache is not held to the
/// search sink's pace beyond it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_sink_keeps_memory_bounded_and_the_fast_sink_moving() {
    let _g = shared().await;
    let db = TestDb::create("faultslow").await;
    schema(&db).await;
    let slot = unique("s");
    let stores = Stores::new();
    let search_addr = crate::support::search::addr();
    let proxy = Proxy::start(&search_addr).await;
    let ws = Workspace::new();
    let port = crate::support::free_port();
    let urls = Urls { search: format!("http://{}", proxy.addr), ..Urls::direct() };
    let cfg = config(&db, &slot, &urls, &stores, "")
        .replace("[metrics]\nenabled = false", &format!("[metrics]\nlisten = \"127.0.0.1:{port}\""))
        .replace("[runtime]\n", "[runtime]\nmax_in_flight = 20000\n");
    ws.write_config(&cfg);
    stores.pipelines(&ws);
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("slot created", WAIT, || async { db.confirmed(&slot).await > 0 }).await;
    seed_rows(&db).await;
    proxy.set_delay(Duration::from_millis(300));
    db.exec("INSERT INTO orders SELECT i, i FROM generate_series(1, 100000) i").await;
    db.exec("UPDATE items SET v = v + 1").await;
    let applied = |sink: &'static str| async move {
        match crate::support::http_get(&format!("127.0.0.1:{port}"), "/metrics").await {
            Some((200, m)) => crate::support::metric_value(
                &m,
                "polysync_sink_records_total",
                &[("sink", sink), ("result", "applied")],
            ),
            _ => 0.0,
        }
    };
    // Orders only go to the cache; they are not held back by the slow index beyond the window.
    wait_for("the cache to move ahead of the slow index", WAIT, || async { applied("cache").await >= 15_000.0 }).await;
    let (cache, search) = (applied("cache").await, applied("search").await);
    let rss = std::fs::read_to_string(format!("/proc/{}/status", d.pid()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .unwrap();
    eprintln!("slow sink: cache applied {cache}, search applied {search}, peak RSS {rss} kB");
    assert!(cache > search, "the fast sink is ahead ({cache} vs {search})");
    assert!(rss < 300 * 1024, "peak RSS {rss} kB with a 20,000-change window");
    // A reload while the index is still slow: it finishes, and the cache goes on to apply
    // every one of its 104,000 changes (2,000 item inserts, 100,000 orders, 2,000 item updates)
    // before the index is made fast again.
    reload(&d, &log).await;
    wait_for("the cache to apply everything after the reload", WAIT, || async { applied("cache").await >= 104_000.0 })
        .await;
    proxy.set_delay(Duration::ZERO);
    stores.assert_converged(&db, &slot).await;
    assert!(d.terminate().await.success());
    stores.cleanup().await;
    db.cleanup().await;
}

/// The state directory on a 64 KiB tmpfs: once dead letters fill it, the daemon stops
/// consuming, says why, and the slot never confirms a change it could not record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_state_disk_stops_consumption_and_confirms_nothing_unrecorded() {
    let _g = shared().await;
    let db = TestDb::create("faultdisk").await;
    db.exec("CREATE TABLE items (id bigint PRIMARY KEY, tag text)").await;
    let slot = unique("s");
    let ws = Workspace::new();
    let state = ws.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&state)
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "this test mounts a tmpfs (needs root)");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(state.clone());
    ws.write_config(&pg_cache_config_with(&db.url, &slot, &slot, "", "[dlq]\nmax_file_bytes = \"64KiB\"\n"));
    // Every change needs `tag`, which is NULL: each one is a dead letter.
    ws.write_pipeline(
        "tags",
        "source = \"db\"\n[match]\nrelations = [\"public.items\"]\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"t:{{ after.tag }}\"]\n",
    );
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("slot created", WAIT, || async { db.confirmed(&slot).await > 0 }).await;
    // Several hundred bytes per dead letter: 400 of them cannot fit in 64 KiB.
    for i in 0..400 {
        db.exec(&format!("INSERT INTO items VALUES ({i}, NULL)")).await;
    }
    let end = db.current_lsn().await;
    wait_for("the daemon to say the disk is full", WAIT, || async {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        t.contains("cannot record a dead letter") && t.contains("No space left on device")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        db.confirmed(&slot).await < end,
        "the slot must not confirm changes whose dead letters were not written; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // A stuck lane does not keep SIGTERM from ending the daemon.
    assert!(d.terminate().await.code().is_some());
    // Restarted on the still-full disk: stuck again; a reload runs and changes nothing of that.
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    let failures = || std::fs::read_to_string(&log).unwrap_or_default().matches("cannot record a dead letter").count();
    let before = failures();
    wait_for("the restarted daemon to hit the full disk", WAIT, || async { failures() > before }).await;
    reload(&d, &log).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(db.confirmed(&slot).await < end, "nothing unrecorded is confirmed after the reload either");
    // More room: the same daemon (no restart) records every dead letter and the slot moves past them.
    let _ = std::process::Command::new("mount").args(["-o", "remount,size=16m"]).arg(&state).status();
    db.wait_caught_up(&slot, WAIT).await;
    let ids: std::collections::BTreeSet<i64> = ws
        .dead_letters()
        .iter()
        .filter_map(|l| {
            l.change.key.get("id").and_then(|v| match v {
                polysync::change::Value::Int(i) => Some(*i),
                _ => None,
            })
        })
        .collect();
    assert_eq!(ids.len(), 400, "every change is in the dead-letter queue once space is back");
    assert!(d.terminate().await.success());
    db.cleanup().await;
}

/// Values that cannot be delivered each end in the DLQ with a reason; the rest arrive. NaN and
/// -Infinity are dead-lettered where the pipeline says `non_finite = "reject"` and indexed as
/// null where it says `"null"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_values_are_dead_lettered_with_their_reason_and_the_stream_goes_on() {
    let _g = shared().await;
    let db = TestDb::create("poison").await;
    db.exec("CREATE TABLE things (id bigint PRIMARY KEY, n numeric, name text NOT NULL, blob text, note bytea)").await;
    let slot = unique("s");
    let stores = Stores::new();
    let ws = Workspace::new();
    ws.write_config(&config(&db, &slot, &Urls::direct(), &stores, ""));
    ws.write_pipeline(
        "things-cache",
        &format!(
            // NaN and ±Infinity have no JSON literal: this pipeline asks for a dead letter.
            "source = \"db\"\nnon_finite = \"reject\"\n[match]\nrelations = [\"public.things\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{}{{{{ after.name }}}}\"\nformat = \"json\"\n",
            stores.items
        ),
    );
    ws.write_pipeline(
        "things-search",
        &format!(
            // `note` is a legacy bytea column holding UTF-8 text: declared, it is indexed as text.
            // `n` is mapped as a double: NaN and ±Infinity are indexed as null.
            "source = \"db\"\ntext_columns = [\"note\"]\nnon_finite = \"null\"\n[match]\nrelations = [\"public.things\"]\n[[sink]]\ntarget = \"search\"\nindex = \"{}\"\nid = \"{{{{ key.id }}}}\"\n",
            stores.index
        ),
    );
    // `blob` is a keyword: a term over Lucene's 32766-byte limit is refused by OpenSearch.
    crate::support::search::call(
        "PUT",
        &format!("/{}", stores.index),
        Some(r#"{"mappings":{"properties":{"blob":{"type":"keyword"},"n":{"type":"double"}}}}"#),
    )
    .await;
    let d = ChildDaemon::spawn(&ws.config_path(), &ws.path().join("daemon.log"));
    wait_for("slot created", WAIT, || async { db.confirmed(&slot).await > 0 }).await;
    db.exec("INSERT INTO things VALUES (1, 'NaN', 'nan', NULL)").await; // no JSON form: both sinks
    db.exec(&format!("INSERT INTO things VALUES (2, 1, '{}', NULL)", "k".repeat(70_000))).await; // key over the limit
    db.exec(&format!("INSERT INTO things VALUES (3, 1, 'big-term', '{}')", "x".repeat(40_000))).await; // immense term
    db.exec("INSERT INTO things VALUES (4, 2.5, 'fine', 'ok')").await;
    // Invalid UTF-8 in the declared text column (0xc3 opens a 2-byte sequence, 0x28 is not a
    // continuation byte); then valid UTF-8 in it.
    db.exec("INSERT INTO things VALUES (5, 3, 'bad-text', NULL, '\\x6f6bc328')").await;
    db.exec("INSERT INTO things VALUES (6, 4, 'good-text', NULL, convert_to('héllo ✓', 'UTF8'))").await;
    db.exec("INSERT INTO things VALUES (7, '-Infinity', 'minus-inf', NULL)").await; // numeric infinities (PG 14+)
    db.wait_caught_up(&slot, WAIT).await;
    let letters = ws.dead_letters();
    let reason = |id: i64, sink: &str| {
        letters
            .iter()
            .find(|l| l.sink == sink && l.change.key.get("id") == Some(&polysync::change::Value::Int(id)))
            .map(|l| l.reason.clone())
            .unwrap_or_else(|| panic!("no dead letter for id {id} in {sink}: {letters:#?}"))
    };
    assert!(reason(1, "cache").contains("NaN"), "{}", reason(1, "cache"));
    assert!(reason(7, "cache").contains("Infinity"), "{}", reason(7, "cache"));
    assert!(reason(2, "cache").contains("limit"), "{}", reason(2, "cache"));
    assert!(
        reason(3, "search").contains("immense") || reason(3, "search").contains("32766"),
        "{}",
        reason(3, "search")
    );
    let bad_text = reason(5, "-");
    assert!(
        bad_text.contains("things-search")
            && bad_text.contains("after.note of public.things (id=5)")
            && bad_text.contains("not valid UTF-8: invalid byte 0xc3 at offset 2 of 4 bytes"),
        "{bad_text}"
    );
    let redis = TestRedis::connect().await;
    assert!(redis.get(&format!("{}fine", stores.items)).await.is_some(), "the stream went on");
    assert!(redis.get(&format!("{}bad-text", stores.items)).await.is_some(), "the cache pipeline keeps bytes");
    let docs: Docs = search_docs(&stores.index).await;
    assert_eq!(docs.get("6").map(|d| d["note"].clone()), Some(serde_json::json!("héllo ✓")), "decoded as text");
    assert!(
        docs.contains_key("4")
            && docs.contains_key("2")
            && !docs.contains_key("3")
            && docs.get("1").is_some_and(|d| d["n"].is_null())
            && !docs.contains_key("5")
            && docs.get("7").is_some_and(|d| d["n"].is_null()),
        "{:?} {:?}",
        docs.keys().collect::<Vec<_>>(),
        letters
            .iter()
            .map(|l| (l.sink.clone(), l.change.key_display(), l.reason.chars().take(300).collect::<String>()))
            .collect::<Vec<_>>()
    );
    assert!(d.terminate().await.success());
    stores.cleanup().await;
    db.cleanup().await;
}

/// `slot_lag_limit`: crossing it raises the alert metric and says so; with
/// `on_slot_lag_limit = "drop_slot"` the slot is dropped (the server frees its WAL) and the
/// source stops with the reason. The cache outage is a cut at a loopback proxy (TCP-level mock).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slot_lag_limit_alerts_and_can_drop_the_slot() {
    let _g = shared().await;
    let db = TestDb::create("slotlag").await;
    db.exec("CREATE TABLE blobs (id bigint PRIMARY KEY, body text NOT NULL)").await;
    let redis_addr = crate::support::redis::url().trim_start_matches("redis://").trim_end_matches('/').to_string();
    for mode in ["alert", "drop_slot"] {
        let proxy = Proxy::start(&redis_addr).await;
        let slot = unique("s");
        let port = crate::support::free_port();
        let ws = Workspace::new();
        let cfg = pg_cache_config_with(
            &db.url,
            &slot,
            &slot,
            &format!("slot_lag_limit = \"1MiB\"\non_slot_lag_limit = \"{mode}\""),
            "",
        )
        .replace(&crate::support::redis::url(), &format!("redis://{}", proxy.addr))
        .replace("[metrics]\nenabled = false", &format!("[metrics]\nlisten = \"127.0.0.1:{port}\""));
        ws.write_config(&cfg);
        ws.write_pipeline(
            "blobs",
            "source = \"db\"\n[match]\nrelations = [\"public.blobs\"]\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"blob:{{ key.id }}\"]\n",
        );
        let log = ws.path().join("daemon.log");
        let mut d = ChildDaemon::spawn(&ws.config_path(), &log);
        wait_for("slot created", WAIT, || async { db.confirmed(&slot).await > 0 }).await;
        proxy.set_down(true);
        // ~5 MB of WAL (small rows: large repetitive ones would be compressed away).
        db.exec("INSERT INTO blobs SELECT i, md5(i::text) FROM generate_series(1, 50000) i").await;
        db.exec("DELETE FROM blobs").await;
        let exceeded = || async {
            match crate::support::http_get(&format!("127.0.0.1:{port}"), "/metrics").await {
                Some((200, m)) => crate::support::metric_value(&m, "polysync_pg_slot_lag_limit_exceeded", &[]),
                _ => -1.0,
            }
        };
        if mode == "alert" {
            wait_for("the lag alert", WAIT, || async { exceeded().await == 1.0 }).await;
            assert!(std::fs::read_to_string(&log).unwrap().contains("crossed slot_lag_limit"));
            proxy.set_down(false);
            db.wait_caught_up(&slot, WAIT).await;
            wait_for("the alert to clear", WAIT, || async { exceeded().await == 0.0 }).await;
            assert!(d.terminate().await.success());
        } else {
            let exited = tokio::time::timeout(WAIT, d.child.wait()).await.expect("the source stops").unwrap();
            assert!(!exited.success());
            let text = std::fs::read_to_string(&log).unwrap();
            assert!(text.contains(&format!("replication slot {slot} was dropped")), "{text}");
            let gone = db
                .client
                .query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
                .await
                .unwrap()
                .is_none();
            assert!(gone, "the slot no longer pins WAL");
            // The next start knows polysync dropped it: not a first start, a lost slot.
            proxy.set_down(false);
            let why = crate::support::daemon::refusal(&ws.config_path()).await;
            assert!(why.contains("was dropped by polysync"), "{why}");
        }
    }
    db.cleanup().await;
}

/// A planted secret never appears in what `check`, `run` (at debug level, failing to log in),
/// `status` or `dlq list` print.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planted_secret_never_appears_in_output_or_logs() {
    let _g = shared().await;
    const SECRET: &str = "pl4nted-S3CRET-b9e1";
    let ws = Workspace::new();
    let cfg = format!(
        r#"state_dir = "state"
pipelines = "pipelines"
[log]
level = "debug"
[metrics]
enabled = false
[sources.db]
kind = "postgres"
url = "postgres://leak_probe:${{PLANTED}}@127.0.0.1:55432/postgres"
sslmode = "disable"
slot = "leak_probe"
publication = "leak_probe"
[sinks.cache]
kind = "cache"
url = "redis://:${{PLANTED}}@127.0.0.1:56379"
[sinks.search]
kind = "search"
url = "{}"
username = "admin"
password = "${{PLANTED}}"
[sinks.metrics]
kind = "timeseries"
engine = "influxdb"
url = "http://127.0.0.1:58086"
org = "o"
bucket = "b"
token = "${{PLANTED}}"
"#,
        crate::support::search::url()
    );
    ws.write_config(&cfg);
    ws.write_pipeline(
        "p",
        "source = \"db\"\n[match]\nrelations = [\"public.t\"]\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"k:{{ key.id }}\"]\n",
    );
    let mut seen = String::new();
    for args in [vec!["check"], vec!["status"], vec!["dlq", "list"], vec!["run"]] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_polysync"))
            .args(&args)
            .arg("--config")
            .arg(ws.config_path())
            .env("PLANTED", SECRET)
            .kill_on_drop(true)
            .output();
        let out = match tokio::time::timeout(Duration::from_secs(20), out).await {
            Ok(o) => o.unwrap(),
            Err(_) => panic!("polysync {args:?} did not finish (it should refuse the wrong password)"),
        };
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!text.contains(SECRET), "polysync {args:?} printed the secret:\n{text}");
        seen.push_str(&text);
    }
    assert!(seen.contains("leak_probe"), "the run failed for the expected reason (authentication):\n{seen}");
}
