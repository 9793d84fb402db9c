//! PostgreSQL → cache, end to end against the real servers.

use std::time::Duration;

use crate::support::daemon::{InProcess, pg_cache_config, pg_cache_config_with};
use crate::support::pg::TestDb;
use crate::support::redis::TestRedis;
use crate::support::{Workspace, exclusive, shared, unique, wait_for};

const CATCH_UP: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalidates_exactly_the_keys_its_templates_name() {
    let _g = shared().await;
    let db = TestDb::create("inval").await;
    db.exec(
        "CREATE TABLE carts (id bigint PRIMARY KEY, user_id bigint NOT NULL);
         ALTER TABLE carts REPLICA IDENTITY FULL;
         CREATE TABLE audit (id bigint PRIMARY KEY, note text);
         INSERT INTO carts VALUES (1, 10), (2, 20), (3, 30);",
    )
    .await;
    let p = unique("inv");
    let slot = unique("s");
    let ws = Workspace::new();
    // `audit` is published but no pipeline matches it.
    ws.write_config(&pg_cache_config_with(&db.url, &slot, &slot, r#"tables = ["public.audit"]"#, ""));
    ws.write_pipeline(
        "carts",
        &format!(
            r#"source = "db"
[match]
relations = ["public.carts"]
ops = ["insert", "update", "delete"]
[[sink]]
target = "cache"
action = "invalidate"
keys = ["{p}:cart:{{{{ key.id }}}}", "{p}:user:{{{{ row.user_id }}}}"]
"#
        ),
    );
    ws.write_pipeline(
        "cart-deletes",
        &format!(
            r#"source = "db"
[match]
relations = ["public.carts"]
ops = ["delete"]
[[sink]]
target = "cache"
action = "invalidate"
keys = ["{p}:deleted:{{{{ key.id }}}}"]
"#
        ),
    );
    let daemon = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    let redis = TestRedis::connect().await;
    let all = [
        "cart:1",
        "cart:2",
        "cart:3",
        "cart:4",
        "user:10",
        "user:11",
        "user:20",
        "user:30",
        "user:40",
        "deleted:1",
        "deleted:2",
        "deleted:4",
        "audit:1",
    ];
    for k in all {
        redis.set(&format!("{p}:{k}"), "cached").await;
    }
    db.exec("INSERT INTO carts VALUES (4, 40)").await;
    db.exec("UPDATE carts SET user_id = 11 WHERE id = 1").await;
    db.exec("DELETE FROM carts WHERE id = 2").await;
    db.exec("INSERT INTO audit VALUES (1, 'not matched')").await;
    db.wait_caught_up(&slot, CATCH_UP).await;

    let gone = ["cart:4", "user:40", "cart:1", "user:11", "cart:2", "user:20", "deleted:2"];
    for k in all {
        let exists = redis.exists(&format!("{p}:{k}")).await;
        if gone.contains(&k) {
            assert!(!exists, "{k} should have been invalidated");
        } else {
            assert!(exists, "{k} must not be touched");
        }
    }
    assert!(
        ws.dead_letters().is_empty(),
        "no dead letters expected: {:?}",
        ws.dead_letters().iter().map(|d| &d.reason).collect::<Vec<_>>()
    );
    daemon.stop().await.expect("clean stop");
    db.cleanup().await;
}

async fn product_rows(db: &TestDb) -> Vec<(i64, String)> {
    db.client
        .query(
            "SELECT id, json_build_object('id', id, 'name', name, 'price', price, 'stock', stock)::text FROM products ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// `{"id" : 1, ...}` (json_build_object spacing) → `{"id":1,...}`.
fn compact(s: &str) -> String {
    s.replace(" : ", ":").replace(", ", ",")
}

async fn assert_products_match(db: &TestDb, redis: &TestRedis, p: &str, max_id: i64) {
    let rows = product_rows(db).await;
    let ids: std::collections::HashSet<i64> = rows.iter().map(|(id, _)| *id).collect();
    for (id, json) in &rows {
        let cached = redis.get(&format!("{p}:product:{id}")).await;
        assert_eq!(cached.as_deref(), Some(compact(json).as_str()), "product {id}");
    }
    for id in 1..=max_id {
        if !ids.contains(&id) {
            assert!(!redis.exists(&format!("{p}:product:{id}")).await, "deleted product {id} must stay deleted");
        }
    }
}

/// Version-guarded writes share one script call per batch, yet each row keeps its own outcome:
/// a key of the wrong type (here a hash where the row's version goes) is a server error for that row
/// alone, which goes to the dead-letter queue with Redis's reason, while the rows before and
/// after it in the same transaction (the same script call) are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_rows_server_error_in_a_batched_guarded_write_is_its_own() {
    let _g = shared().await;
    let db = TestDb::create("guardmany").await;
    db.exec("CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL)").await;
    let p = unique("gm");
    let slot = unique("s");
    let redis = TestRedis::connect().await;
    // Row 3's version key holds a hash, so the guard's GET of it fails with WRONGTYPE.
    let vkey = format!("{{{p}:item:3}}:__version");
    let _: () = fred::interfaces::HashesInterface::hset(&redis.client, &vkey, ("x", "y")).await.unwrap();
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
format = "hash"
"#
        ),
    );
    let daemon = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO items SELECT i, 'n' || i FROM generate_series(1, 6) i").await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    for i in [1, 2, 4, 5, 6] {
        let h = redis.hgetall(&format!("{p}:item:{i}")).await;
        assert_eq!(h.get("name").map(String::as_str), Some(format!("n{i}").as_str()), "row {i}: {h:?}");
    }
    assert!(!redis.exists(&format!("{p}:item:3")).await, "row 3 is not written");
    assert_eq!(redis.hgetall(&vkey).await.get("x").map(String::as_str), Some("y"), "its version key is untouched");
    let dead = ws.dead_letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.contains("WRONGTYPE"), "Redis's reason: {}", dead[0].reason);
    assert_eq!(dead[0].change.key.get("id"), Some(&polysync::change::Value::Int(3)));
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn set_mode_holds_the_newest_value_and_replays_cannot_roll_back() {
    let _g = shared().await;
    let db = TestDb::create("setmode").await;
    db.exec("CREATE TABLE products (id bigint PRIMARY KEY, name text NOT NULL, price numeric(12,2) NOT NULL, stock int NOT NULL)")
        .await;
    let p = unique("set");
    let slot = unique("s");
    let replay_slot = format!("{slot}_replay");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    ws.write_pipeline(
        "products",
        &format!(
            r#"source = "db"
[match]
relations = ["public.products"]
[[sink]]
target = "cache"
action = "set"
key = "{p}:product:{{{{ key.id }}}}"
format = "json"
columns = ["id", "name", "price", "stock"]
"#
        ),
    );
    let daemon = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    // A second slot at (about) the same place: a later run from it replays everything below.
    db.exec(&format!("SELECT pg_create_logical_replication_slot('{replay_slot}', 'pgoutput')")).await;

    db.exec("INSERT INTO products SELECT i, 'p' || i, (i * 1.10)::numeric(12,2), i FROM generate_series(1, 60) i")
        .await;
    for round in 0..20 {
        // Several updates of the same rows in one transaction: the last one must win.
        db.exec(&format!(
            "BEGIN;
             UPDATE products SET price = price + 0.01, stock = stock + 1 WHERE id % 7 = {m};
             UPDATE products SET name = 'r{round}-' || id WHERE id % 5 = {n};
             UPDATE products SET stock = stock * 2 WHERE id % 7 = {m};
             COMMIT;",
            m = round % 7,
            n = round % 5
        ))
        .await;
        if round % 6 == 5 {
            db.exec(&format!("DELETE FROM products WHERE id = {}", round + 1)).await;
        }
    }
    db.exec("UPDATE products SET price = 12345678.90 WHERE id = 60").await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    let redis = TestRedis::connect().await;
    assert_products_match(&db, &redis, &p, 60).await;
    let cached = redis.get(&format!("{p}:product:60")).await.unwrap();
    assert!(cached.contains(r#""price":12345678.90,"#), "decimal digits are exact: {cached}");
    daemon.stop().await.expect("clean stop");

    // Replay every change from the older slot: nothing may go back.
    let ws2 = Workspace::new();
    ws2.write_config(&pg_cache_config_with(&db.url, &replay_slot, &slot, "", ""));
    std::fs::copy(ws.pipelines().join("products.toml"), ws2.pipelines().join("products.toml")).unwrap();
    let replay = InProcess::start(&ws2.config_path());
    db.wait_caught_up(&replay_slot, CATCH_UP).await;
    assert_products_match(&db, &redis, &p, 60).await;
    replay.stop().await.expect("clean stop");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn toast_unchanged_columns_are_never_written_as_null() {
    let _g = shared().await;
    let db = TestDb::create("toast").await;
    db.exec(
        "CREATE TABLE docs (id bigint PRIMARY KEY, title text, body text);
         CREATE TABLE docs_full (id bigint PRIMARY KEY, title text, body text);
         ALTER TABLE docs_full REPLICA IDENTITY FULL;",
    )
    .await;
    let p = unique("toast");
    let slot = unique("s");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    ws.write_pipeline(
        "docs-hash",
        &format!(
            r#"source = "db"
[match]
relations = ["public.docs"]
[[sink]]
target = "cache"
action = "set"
key = "{p}:hash:{{{{ key.id }}}}"
format = "hash"
"#
        ),
    );
    ws.write_pipeline(
        "docs-json",
        &format!(
            r#"source = "db"
[match]
relations = ["public.docs"]
[[sink]]
target = "cache"
action = "set"
key = "{p}:json:{{{{ key.id }}}}"
format = "json"
"#
        ),
    );
    ws.write_pipeline(
        "docs-full",
        &format!(
            r#"source = "db"
[match]
relations = ["public.docs_full"]
[[sink]]
target = "cache"
action = "set"
key = "{p}:full:{{{{ key.id }}}}"
format = "json"
"#
        ),
    );
    let daemon = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    // ~96 KB of incompressible text: stored out of line (TOAST).
    let big = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 3000))";
    db.exec(&format!("INSERT INTO docs VALUES (1, 'first', {big}); INSERT INTO docs_full VALUES (1, 'first', {big});"))
        .await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    let redis = TestRedis::connect().await;
    let body: String = db.client.query_one("SELECT body FROM docs WHERE id = 1", &[]).await.unwrap().get(0);
    assert_eq!(body.len(), 96_000);
    assert_eq!(redis.hgetall(&format!("{p}:hash:1")).await.get("body"), Some(&body));
    assert!(redis.exists(&format!("{p}:json:1")).await);

    db.exec("UPDATE docs SET title = 'second' WHERE id = 1; UPDATE docs_full SET title = 'second' WHERE id = 1;").await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    // Hash: only sent columns are written; the big body is kept, not nulled.
    let h = redis.hgetall(&format!("{p}:hash:1")).await;
    assert_eq!(h.get("title").map(String::as_str), Some("second"));
    assert_eq!(h.get("body"), Some(&body), "TOAST-unchanged body must be kept");
    // JSON with REPLICA IDENTITY FULL: the old image completes the row.
    let full: serde_json::Value = serde_json::from_str(&redis.get(&format!("{p}:full:1")).await.unwrap()).unwrap();
    let full_body: String = db.client.query_one("SELECT body FROM docs_full WHERE id = 1", &[]).await.unwrap().get(0);
    assert_eq!(full["title"], "second");
    assert_eq!(full["body"].as_str(), Some(full_body.as_str()));
    // JSON without the old image cannot be written whole: the key is removed (the next read
    // reloads from the database), never written with a null body.
    assert_eq!(redis.get(&format!("{p}:json:1")).await, None);
    daemon.stop().await.expect("clean stop");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_slot_keeps_advancing_while_unpublished_tables_take_writes() {
    let _g = shared().await;
    let db = TestDb::create("walpin").await;
    db.exec("CREATE TABLE watched (id bigint PRIMARY KEY); CREATE TABLE busy (id bigserial PRIMARY KEY, v text);")
        .await;
    let p = unique("wal");
    let slot = unique("s");
    let ws = Workspace::new();
    // No heartbeat in this test: only confirming keepalive positions can move the slot.
    ws.write_config(&pg_cache_config_with(&db.url, &slot, &slot, r#"heartbeat_interval = "1h""#, ""));
    ws.write_pipeline(
        "watched",
        &format!(
            r#"source = "db"
[match]
relations = ["public.watched"]
[[sink]]
target = "cache"
action = "invalidate"
keys = ["{p}:w:{{{{ key.id }}}}"]
"#
        ),
    );
    let daemon = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    let start = db.confirmed(&slot).await;
    for _ in 0..50 {
        db.exec("INSERT INTO busy (v) SELECT md5(random()::text) FROM generate_series(1, 100)").await;
    }
    let target = db.current_lsn().await;
    assert!(target > start);
    wait_for("the idle slot to confirm past the unpublished writes", CATCH_UP, || async {
        db.confirmed(&slot).await >= target
    })
    .await;
    daemon.stop().await.expect("clean stop");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_spools_frees_the_slot_and_delivers_everything_after() {
    let _x = exclusive().await;
    let db = TestDb::create("outage").await;
    db.exec("CREATE TABLE products (id bigint PRIMARY KEY, name text NOT NULL, price numeric(12,2) NOT NULL, stock int NOT NULL)")
        .await;
    let p = unique("out");
    let slot = unique("s");
    let ws = Workspace::new();
    ws.write_config(&crate::support::daemon::quick_spill(pg_cache_config(&db.url, &slot, "")));
    ws.write_pipeline(
        "products",
        &format!(
            r#"source = "db"
[match]
relations = ["public.products"]
[[sink]]
target = "cache"
action = "set"
key = "{p}:product:{{{{ key.id }}}}"
columns = ["id", "name", "price", "stock"]
"#
        ),
    );
    let daemon = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO products SELECT i, 'p' || i, i, i FROM generate_series(1, 10) i").await;
    db.wait_caught_up(&slot, CATCH_UP).await;

    // Redis down: its records go to the cache sink's spool, and the slot moves on (WAL is not
    // pinned by a broken sink).
    let redis_down = crate::support::Stopped::peer("redis");
    db.exec("INSERT INTO products SELECT i, 'p' || i, i, i FROM generate_series(11, 40) i").await;
    db.exec("UPDATE products SET price = price * 3 WHERE id % 2 = 0").await;
    db.exec("DELETE FROM products WHERE id = 13").await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    let spool = ws.path().join("state/spool/cache");
    let spooled: u64 = std::fs::read_dir(&spool)
        .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0);
    assert!(spooled > 0, "the confirmed records are held in {}", spool.display());

    redis_down.restart();
    let redis = TestRedis::connect().await;
    // Redis restarted empty (no persistence locally); everything written during the outage
    // arrives from the spool.
    let rows = product_rows(&db).await;
    for (id, json) in rows.iter().filter(|(id, _)| *id > 10) {
        let key = format!("{p}:product:{id}");
        let want = Some(compact(json));
        wait_for(&format!("product {id} from the spool"), CATCH_UP, || async { redis.get(&key).await == want }).await;
    }
    assert!(!redis.exists(&format!("{p}:product:13")).await);
    daemon.stop().await.expect("clean stop");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_replication_connection_reconnects_and_loses_nothing() {
    let _g = shared().await;
    let db = TestDb::create("cut").await;
    db.exec("CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL)").await;
    let p = unique("cut");
    let slot = unique("s");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    ws.write_pipeline(
        "items",
        &format!(
            "source = \"db\"\n[match]\nrelations = [\"public.items\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{p}:i:{{{{ key.id }}}}\"\n"
        ),
    );
    let daemon = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    let writer = {
        let url = db.url.clone();
        tokio::spawn(async move {
            let c = crate::support::pg::connect(&url).await;
            for i in 1..=300i64 {
                // Multi-row transactions, so some cuts land mid-transaction.
                c.batch_execute(&format!(
                    "BEGIN; INSERT INTO items VALUES ({a}, 0), ({b}, 0); UPDATE items SET v = v + 1 WHERE id = {a}; COMMIT;",
                    a = 2 * i - 1,
                    b = 2 * i
                ))
                .await
                .unwrap();
            }
        })
    };
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        db.exec(&format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active_pid IS NOT NULL"
        ))
        .await;
    }
    writer.await.unwrap();
    db.wait_caught_up(&slot, CATCH_UP).await;
    let redis = TestRedis::connect().await;
    let rows = db.client.query("SELECT id, v FROM items ORDER BY id", &[]).await.unwrap();
    assert_eq!(rows.len(), 600);
    for r in rows {
        let (id, v): (i64, i32) = (r.get(0), r.get(1));
        assert_eq!(redis.get(&format!("{p}:i:{id}")).await, Some(format!(r#"{{"id":{id},"v":{v}}}"#)));
    }
    daemon.stop().await.expect("clean stop");
    db.cleanup().await;
}
