//! Pipelines as a language: VRL filters and transforms on real changes, dead letters and
//! replay, and live reload under load (SIGHUP and file edits).

use std::time::Duration;

use fred::interfaces::ClientLike;

use crate::support::daemon::{ChildDaemon, InProcess, pg_cache_config};
use crate::support::pg::{TestDb, connect};
use crate::support::redis::TestRedis;
use crate::support::{Workspace, free_port, http_get, metric_value, shared, unique, wait_for};

const CATCH_UP: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vrl_filters_drops_fields_and_splits_one_change_into_two_documents() {
    let _g = shared().await;
    let db = TestDb::create("vrl").await;
    db.exec(
        "CREATE TABLE products (id bigint PRIMARY KEY, sku text NOT NULL, name text, price numeric(12,2), secret text, active bool NOT NULL);
         ALTER TABLE products REPLICA IDENTITY FULL;",
    )
    .await;
    let p = unique("vrl");
    let slot = unique("s");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    ws.write_pipeline(
        "catalog",
        &format!(
            r#"source = "db"
# Inactive products are not cached (deletes always pass).
filter = '.op == "delete" || .after.active == true'
# Never cache the secret; index each product by id and by SKU.
transform = '''
del(.after.secret)
row = if .after != null {{ .after }} else {{ .before }}
by_id = merge(., {{"kind": "id", "ref": to_string!(.key.id)}})
by_sku = merge(., {{"kind": "sku", "ref": row.sku}})
. = [by_id, by_sku]
'''
[match]
relations = ["public.products"]
[[sink]]
target = "cache"
action = "set"
key = "{p}:{{{{ event.kind }}}}:{{{{ event.ref }}}}"
columns = ["id", "sku", "name", "price"]
"#
        ),
    );
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    db.exec(
        "INSERT INTO products VALUES (1, 'SKU-1', 'Lamp', 12.30, 'hunter2', true), (2, 'SKU-2', 'Hidden', 9.99, 'x', false), (3, 'SKU-3', 'Desk', 1234567890.05, 'y', true);
         UPDATE products SET price = 13.00 WHERE id = 1;
         DELETE FROM products WHERE id = 3;",
    )
    .await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    let redis = TestRedis::connect().await;
    let expected = r#"{"id":1,"sku":"SKU-1","name":"Lamp","price":13.00}"#;
    assert_eq!(
        redis.get(&format!("{p}:id:1")).await.as_deref(),
        Some(expected),
        "decimal digits exact, secret dropped"
    );
    assert_eq!(redis.get(&format!("{p}:sku:SKU-1")).await.as_deref(), Some(expected));
    assert!(!redis.exists(&format!("{p}:id:2")).await, "filtered out");
    assert!(!redis.exists(&format!("{p}:id:3")).await && !redis.exists(&format!("{p}:sku:SKU-3")).await, "deleted");
    assert!(ws.dead_letters().is_empty());
    d.stop().await.unwrap();
    db.cleanup().await;
}

fn cli(args: &[&str], config: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_polysync"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_transform_is_dead_lettered_and_replay_delivers_it_after_the_fix() {
    let _g = shared().await;
    let db = TestDb::create("replay").await;
    db.exec("CREATE TABLE codes (id bigint PRIMARY KEY, code text NOT NULL)").await;
    let p = unique("rp");
    let slot = unique("s");
    let ws = Workspace::new();
    // Dead letters are also copied to a Redis stream.
    let stream = format!("{p}:dlq");
    ws.write_config(&pg_cache_config(&db.url, &slot, "").replace(
        "[log]",
        &format!("[dlq]\nredis_url = \"{}\"\nredis_stream = \"{stream}\"\n\n[log]", crate::support::redis::url()),
    ));
    let pipeline = |transform: &str| {
        format!(
            "source = \"db\"\ntransform = '{transform}'\n[match]\nrelations = [\"public.codes\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{p}:code:{{{{ key.id }}}}\"\n"
        )
    };
    ws.write_pipeline("codes", &pipeline(".after.n = to_int!(.after.code)"));
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO codes VALUES (1, '41'), (2, 'forty-two'), (3, '43'), (4, 'junk')").await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    let redis = TestRedis::connect().await;
    assert_eq!(redis.get(&format!("{p}:code:1")).await.as_deref(), Some(r#"{"id":1,"code":"41","n":41}"#));
    assert!(!redis.exists(&format!("{p}:code:2")).await);
    assert!(redis.exists(&format!("{p}:code:3")).await, "the stream goes on after a failure");
    let dl = ws.dead_letters();
    assert_eq!(dl.len(), 2);
    assert_eq!((dl[0].pipeline.as_str(), dl[0].sink.as_str()), ("codes", "-"));
    assert!(dl.iter().all(|e| e.reason.contains("transform failed")), "{dl:?}");
    assert!(dl.iter().any(|e| e.reason.contains("forty-two")), "{dl:?}");
    let copies: Vec<(String, Vec<(String, String)>)> = redis
        .client
        .custom(
            fred::types::CustomCommand::new_static("XRANGE", None, false),
            vec![stream.clone(), "-".into(), "+".into()],
        )
        .await
        .unwrap();
    assert_eq!(copies.len(), 2, "each dead letter copied to the stream");
    assert!(copies[0].1[0].1.contains("\"pipeline\":\"codes\""), "{:?}", copies[0]);
    d.stop().await.unwrap();

    let (ok, out) = cli(&["dlq", "list"], &ws.config_path());
    assert!(ok && out.contains("codes") && out.contains("id=2") && out.contains("2 dead letter"), "{out}");
    // The junk row is given up on purpose: a selector is required, a wrong id is refused, and
    // what was discarded is recorded and shown by list --all, never replayed.
    let (ok, out) = cli(&["dlq", "discard"], &ws.config_path());
    assert!(!ok && out.contains("--all for every open entry"), "{out}");
    let (ok, out) = cli(&["dlq", "discard", "--id", "no-such-id"], &ws.config_path());
    assert!(!ok && out.contains("no open dead letter has id no-such-id"), "{out}");
    let junk = dl.iter().find(|e| e.change.key_display().contains("id=4")).expect("the junk row's entry");
    let (ok, out) = cli(&["dlq", "discard", "--id", &junk.id], &ws.config_path());
    assert!(ok && out.contains("discarded 1 dead letter(s)"), "{out}");
    let record = std::fs::read_to_string(ws.dlq_dir().join("discarded.jsonl")).unwrap();
    assert!(record.contains(&junk.id) && record.contains("junk") && record.contains("discarded_at"), "{record}");
    let (ok, out) = cli(&["dlq", "list"], &ws.config_path());
    assert!(ok && out.contains("1 dead letter") && !out.contains("id=4"), "{out}");
    let (ok, out) = cli(&["dlq", "list", "--all"], &ws.config_path());
    assert!(ok && out.lines().any(|l| l.contains("id=4") && l.contains("\tdiscarded ")), "{out}");
    // Fix the pipeline, replay: delivered through the current definition, then gone from the list.
    ws.write_pipeline("codes", &pipeline(".after.n = to_int(.after.code) ?? -1"));
    let (ok, out) = cli(&["dlq", "replay", "--pipeline", "codes"], &ws.config_path());
    assert!(ok, "{out}");
    assert!(out.contains("replayed 1 dead letter(s), 0 failed"), "{out}");
    assert_eq!(redis.get(&format!("{p}:code:2")).await.as_deref(), Some(r#"{"id":2,"code":"forty-two","n":-1}"#));
    assert!(!redis.exists(&format!("{p}:code:4")).await, "a discarded entry is not replayed");
    let (ok, out) = cli(&["dlq", "list"], &ws.config_path());
    assert!(ok && out.contains("0 dead letter"), "{out}");
    let (_, out) = cli(&["dlq", "replay"], &ws.config_path());
    assert!(out.contains("replayed 0 dead letter(s)"), "nothing replays twice: {out}");
    db.cleanup().await;
}

fn with_metrics(cfg: String, port: u16, watch: bool) -> String {
    cfg.replace(
        "[metrics]\nenabled = false",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[reload]\nwatch = {watch}"),
    )
}

fn invalidate(p: &str, prefix: &str) -> String {
    format!(
        "source = \"db\"\n[match]\nrelations = [\"public.items\"]\nops = [\"insert\"]\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"{p}:{prefix}:{{{{ key.id }}}}\"]\n"
    )
}

async fn reloads(port: u16, result: &str) -> f64 {
    match http_get(&format!("127.0.0.1:{port}"), "/metrics").await {
        Some((200, body)) => metric_value(&body, "polysync_config_reloads_total", &[("result", result)]),
        _ => -1.0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vrl_compile_error_is_located_and_the_running_pipelines_keep_delivering() {
    let _g = shared().await;
    let db = TestDb::create("vrlerr").await;
    db.exec("CREATE TABLE items (id bigint PRIMARY KEY)").await;
    let p = unique("ve");
    let slot = unique("s");
    let port = free_port();
    let ws = Workspace::new();
    ws.write_config(&with_metrics(pg_cache_config(&db.url, &slot, ""), port, true));
    ws.write_pipeline("good", &invalidate(&p, "g"));
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    db.wait_streaming(&slot).await;
    // Two mistakes: line 3 of the file calls `to_int` with no argument, line 4 calls a
    // fallible function without handling its error (VRL's hint says how).
    let bad = "source = \"db\"\ntransform = \'\'\'\n.after.x = to_int()\n.after.y = parse_json(.after.z)\n\'\'\'\n[match]\nrelations = [\"public.items\"]\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"k:{{ key.id }}\"]\n";
    ws.write_pipeline("bad", bad);
    let (ok, out) = cli(&["check"], &ws.config_path());
    assert!(!ok);
    assert!(out.contains("bad.toml:3:") && out.contains("bad.toml:4:") && out.contains("transform: error[E"), "{out}");
    assert!(out.contains("infallible assignment"), "VRL's advice is shown whole: {out}");
    wait_for("the failed reload to be counted", CATCH_UP, || async { reloads(port, "error").await >= 1.0 }).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("bad.toml:3:") && text.contains("bad.toml:4:"),
        "the reload error names every mistake with file and line: {text}"
    );
    let redis = TestRedis::connect().await;
    redis.set(&format!("{p}:g:1"), "x").await;
    db.exec("INSERT INTO items VALUES (1)").await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    assert!(!redis.exists(&format!("{p}:g:1")).await, "the old pipelines keep delivering");
    assert_eq!(reloads(port, "ok").await, 0.0);
    assert!(d.terminate().await.success());
    db.cleanup().await;
}

/// Reload under a running workload: change a key template, remove a pipeline, add one.
async fn reload_under_load(watch: bool) {
    let _g = shared().await;
    let db = TestDb::create(if watch { "rlwatch" } else { "rlhup" }).await;
    db.exec("CREATE TABLE items (id bigint PRIMARY KEY)").await;
    let p = unique("rl");
    let slot = unique("s");
    let port = free_port();
    let ws = Workspace::new();
    ws.write_config(&with_metrics(pg_cache_config(&db.url, &slot, ""), port, watch));
    ws.write_pipeline("a", &invalidate(&p, "a"));
    ws.write_pipeline("b", &invalidate(&p, "b"));
    const N: i64 = 3000;
    let redis = TestRedis::connect().await;
    for id in 1..=N {
        for k in ["a", "a2", "b", "c"] {
            redis.set(&format!("{p}:{k}:{id}"), "x").await;
        }
    }
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    db.wait_streaming(&slot).await;
    let inserted = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let writer = {
        let (url, inserted) = (db.url.clone(), std::sync::Arc::clone(&inserted));
        tokio::spawn(async move {
            let c = connect(&url).await;
            for id in 1..=N {
                c.batch_execute(&format!("INSERT INTO items VALUES ({id})")).await.unwrap();
                inserted.store(id, std::sync::atomic::Ordering::SeqCst);
                if id % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        })
    };
    wait_for("some inserts", CATCH_UP, || async { inserted.load(std::sync::atomic::Ordering::SeqCst) > N / 4 }).await;
    let before = inserted.load(std::sync::atomic::Ordering::SeqCst);
    // Change A's template, remove B, add C.
    ws.write_pipeline("a", &invalidate(&p, "a2"));
    ws.remove_pipeline("b");
    ws.write_pipeline("c", &invalidate(&p, "c"));
    if !watch {
        d.signal(libc::SIGHUP);
    }
    wait_for("the reload", CATCH_UP, || async { reloads(port, "ok").await >= 1.0 }).await;
    let after = inserted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(after < N, "the reload must land while the workload runs (raise N)");
    writer.await.unwrap();
    db.wait_caught_up(&slot, CATCH_UP).await;

    for id in 1..=N {
        let has = |k: &'static str| {
            let key = format!("{p}:{k}:{id}");
            let redis = &redis;
            async move { redis.exists(&key).await }
        };
        // Present before and after: every insert reached A, under the old or the new template.
        assert!(!has("a").await || !has("a2").await, "insert {id} lost for pipeline a");
        if id <= before {
            assert!(!has("a").await && !has("b").await, "insert {id} (before the reload) must reach a and b");
            assert!(has("c").await, "c did not exist yet for {id}");
        }
        if id > after {
            assert!(!has("a2").await && !has("c").await, "insert {id} (after the reload) must reach a2 and c");
            assert!(has("a").await && has("b").await, "old template / removed pipeline must not get {id}");
        }
    }
    let ok = reloads(port, "ok").await;
    assert!(ok >= 1.0, "reloads counted: {ok}");
    assert_eq!(reloads(port, "error").await, 0.0);
    assert!(d.terminate().await.success(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_by_sighup_under_load_loses_nothing() {
    reload_under_load(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_by_file_edit_under_load_loses_nothing() {
    reload_under_load(true).await;
}

/// A reload that changes a sink's URL hands what the sink holds to the new target: first from
/// an endpoint that is down (the usual reason for the edit), then from one that is alive (a
/// cluster migration), after which the old endpoint receives nothing more. The old endpoints
/// are loopback proxies in front of the real OpenSearch (`support::proxy`), so "down" and
/// "bytes received" can be shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_that_repoints_a_sink_hands_its_queue_to_the_new_target() {
    use crate::support::daemon::quick_spill;
    use crate::support::proxy::Proxy;
    use crate::support::search;
    let _g = shared().await;
    let db = TestDb::create("rlsink").await;
    db.exec("CREATE TABLE items (id bigint PRIMARY KEY, v text)").await;
    let slot = unique("s");
    let index = unique("rlsink").to_lowercase();
    let port = free_port();
    let old = Proxy::start(&search::addr()).await;
    let ws = Workspace::new();
    let config = |url: &str| {
        let sink = format!(
            "\n[sinks.search]\nkind = \"search\"\nurl = \"{url}\"\ntimeout = \"3s\"\nlinger = \"2ms\"\nbatch_size = 10\n"
        );
        with_metrics(quick_spill(pg_cache_config(&db.url, &slot, &sink)), port, false)
    };
    ws.write_config(&config(&format!("http://{}", old.addr)));
    ws.write_pipeline(
        "items",
        &format!(
            "source = \"db\"\n[match]\nrelations = [\"public.items\"]\n[[sink]]\ntarget = \"search\"\nindex = \"{index}\"\nid = \"{{{{ key.id }}}}\"\n"
        ),
    );
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    db.wait_streaming(&slot).await;
    let count = || {
        let index = index.clone();
        async move {
            search::refresh(&index).await;
            search::count(&index).await
        }
    };
    let insert =
        |from: i64, to: i64| format!("INSERT INTO items SELECT g, 'v' || g FROM generate_series({from}, {to}) g");
    db.exec(&insert(1, 50)).await;
    wait_for("the first rows through the old endpoint", CATCH_UP, || async { count().await == 50 }).await;

    // 1. The old endpoint goes down; the sink's records wait (in memory, then its spool).
    old.set_down(true);
    db.exec(&insert(51, 300)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count().await, 50, "nothing can arrive while the endpoint is down");
    ws.write_config(&config(&search::url()));
    d.signal(libc::SIGHUP);
    wait_for("the reload", CATCH_UP, || async { reloads(port, "ok").await >= 1.0 }).await;
    wait_for("the held rows at the new endpoint", CATCH_UP, || async { count().await == 300 }).await;
    db.exec(&insert(301, 400)).await;
    wait_for("new rows at the new endpoint", CATCH_UP, || async { count().await == 400 }).await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    let ready = http_get(&format!("127.0.0.1:{port}"), "/readyz").await;
    assert!(ready.as_ref().is_some_and(|(s, _)| *s == 200), "ready after the hand-over: {ready:?}");

    // 2. A migration: the sink moves to a slow but living endpoint, rows queue up behind it,
    //    and it moves on again before they are all written.
    old.set_down(false);
    old.set_delay(Duration::from_millis(1000));
    ws.write_config(&config(&format!("http://{}", old.addr)));
    d.signal(libc::SIGHUP);
    wait_for("the second reload", CATCH_UP, || async { reloads(port, "ok").await >= 2.0 }).await;
    db.exec(&insert(401, 900)).await;
    wait_for("the slow endpoint to receive writes", CATCH_UP, || async { old.received() > 0 }).await;
    ws.write_config(&config(&search::url()));
    d.signal(libc::SIGHUP);
    wait_for("the third reload", CATCH_UP, || async { reloads(port, "ok").await >= 3.0 }).await;
    assert!(count().await < 900, "rows were still queued for the slow endpoint when the sink moved on");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at_swap = old.received();
    db.exec(&insert(901, 1000)).await;
    wait_for("every row at the new endpoint", CATCH_UP, || async { count().await == 1000 }).await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(old.received(), at_swap, "the old endpoint received writes after the swap");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("sink config changed: its queued records go to the new target"), "{text}");
    let started = std::time::Instant::now();
    assert!(d.terminate().await.success(), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10), "shutdown ran into its deadline: {:?}", started.elapsed());
    search::delete_index(&index).await;
    db.cleanup().await;
}

/// Keys of the objects under `prefix` in moto's S3.
async fn s3_keys(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Vec<String> {
    let out = s3.list_objects_v2().bucket(bucket).prefix(prefix).send().await.unwrap();
    out.contents().iter().filter_map(|o| o.key().map(str::to_string)).collect()
}

/// `[dlq.s3]`: dead letters are kept in S3 (moto's), so they outlive the machine. Entries an
/// earlier run left in the local files are moved there at start; while S3 is unreachable (a
/// loopback proxy cut, named as such) a new dead letter waits and nothing past its change is
/// confirmed, and it arrives once S3 answers; `dlq list`, `discard` and `replay` work from S3
/// with the local directory gone (a new Fargate task).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_kept_in_s3_wait_for_s3_and_outlive_the_local_disk() {
    let _g = shared().await;
    crate::support::aws::require_env();
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&crate::support::aws::sdk().await).force_path_style(true).build(),
    );
    let bucket = unique("dlq").replace('_', "-");
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    let db = TestDb::create("s3dlq").await;
    db.exec("CREATE TABLE codes (id bigint PRIMARY KEY, code text NOT NULL)").await;
    let (p, slot) = (unique("sd"), unique("s"));
    let pipeline = |transform: &str| {
        format!(
            "source = \"db\"\ntransform = '{transform}'\n[match]\nrelations = [\"public.codes\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{p}:code:{{{{ key.id }}}}\"\n"
        )
    };
    let ws = Workspace::new();
    ws.write_pipeline("codes", &pipeline(".after.n = to_int!(.after.code)"));

    // A run without S3 leaves one dead letter in the local file.
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO codes VALUES (1, '41'), (2, 'two')").await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    d.stop().await.unwrap();
    assert_eq!(ws.dead_letters().len(), 1);
    // An older file holding a line that is not an entry (hand-edited, damaged).
    let damaged = ws.dlq_dir().join("dlq-000000.jsonl");
    std::fs::write(&damaged, "not an entry\n").unwrap();

    // With S3 as the record, the start moves the entry there and removes its local file; the
    // damaged file is kept for a person to read.
    let moto = crate::support::aws::endpoint();
    let proxy = crate::support::proxy::Proxy::start(moto.trim_start_matches("http://")).await;
    ws.write_config(&pg_cache_config(&db.url, &slot, "").replace(
        "[log]",
        &format!(
            "[dlq.s3]\nbucket = \"{bucket}\"\nprefix = \"app\"\nendpoint_url = \"http://{}\"\n\n[log]",
            proxy.addr
        ),
    ));
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    wait_for("the earlier dead letter to be moved to S3", CATCH_UP, || {
        let (s3, bucket) = (s3.clone(), bucket.clone());
        async move { s3_keys(&s3, &bucket, "app/codes/-/").await.len() == 1 }
    })
    .await;
    wait_for("the drained local file to be removed", CATCH_UP, || async {
        polysync::dlq::files(&ws.dlq_dir()).unwrap() == vec![(0, damaged.clone())]
    })
    .await;

    // S3 unreachable: the new dead letter waits, and its change is not confirmed.
    proxy.set_down(true);
    db.exec("INSERT INTO codes VALUES (3, 'three')").await;
    let after = db.current_lsn().await;
    db.exec("INSERT INTO codes VALUES (4, '44')").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(db.confirmed(&slot).await < after, "nothing past the waiting dead letter is confirmed");
    assert_eq!(s3_keys(&s3, &bucket, "app/codes/").await.len(), 1);
    proxy.set_down(false);
    db.wait_caught_up(&slot, CATCH_UP).await;
    let keys = s3_keys(&s3, &bucket, "app/codes/-/").await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert!(keys.iter().all(|k| k.contains(&format!("/{today}/")) && k.ends_with(".json")), "{keys:?}");
    let head = s3.head_object().bucket(&bucket).key(&keys[1]).send().await.unwrap();
    assert_eq!(head.server_side_encryption(), Some(&aws_sdk_s3::types::ServerSideEncryption::Aes256));
    let redis = TestRedis::connect().await;
    assert!(redis.exists(&format!("{p}:code:4")).await, "the stream went on once S3 took the entry");
    d.stop().await.unwrap();

    // A new machine: the local directory is gone; the commands read and mark S3.
    std::fs::remove_dir_all(ws.dlq_dir()).unwrap();
    let (ok, out) = cli(&["dlq", "list"], &ws.config_path());
    assert!(ok && out.contains("id=2") && out.contains("id=3") && out.contains("2 dead letter"), "{out}");
    let three = out.lines().find(|l| l.contains("id=3")).and_then(|l| l.split('\t').next()).unwrap().to_string();
    let (ok, out) = cli(&["dlq", "discard", "--id", &three], &ws.config_path());
    assert!(ok && out.contains("discarded 1 dead letter(s)"), "{out}");
    assert_eq!(s3_keys(&s3, &bucket, &format!("app/_polysync/discarded/{three}")).await.len(), 1);
    ws.write_pipeline("codes", &pipeline(".after.n = to_int(.after.code) ?? -1"));
    let (ok, out) = cli(&["dlq", "replay"], &ws.config_path());
    assert!(ok && out.contains("replayed 1 dead letter(s), 0 failed"), "{out}");
    assert_eq!(redis.get(&format!("{p}:code:2")).await.as_deref(), Some(r#"{"id":2,"code":"two","n":-1}"#));
    assert!(!redis.exists(&format!("{p}:code:3")).await, "a discarded entry is not replayed");
    let (ok, out) = cli(&["dlq", "list"], &ws.config_path());
    assert!(ok && out.contains("0 dead letter"), "{out}");
    let (ok, out) = cli(&["dlq", "list", "--all"], &ws.config_path());
    assert!(ok && out.lines().any(|l| l.contains("id=3") && l.contains("\tdiscarded ")), "{out}");
    assert!(out.lines().any(|l| l.contains("id=2") && l.contains("\treplayed")), "{out}");
    db.cleanup().await;
}

/// `[dlq.s3]` naming a bucket S3 does not have: the start refuses with the fix (and S3's own
/// error), rather than accepting changes whose dead letters could never be kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_bucket_that_does_not_exist_refuses_the_start_with_the_fix() {
    let _g = shared().await;
    crate::support::aws::require_env();
    let db = TestDb::create("s3nobucket").await;
    db.exec("CREATE TABLE codes (id bigint PRIMARY KEY, code text NOT NULL)").await;
    let slot = unique("s");
    let bucket = unique("nobucket").replace('_', "-");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, "").replace(
        "[log]",
        &format!("[dlq.s3]\nbucket = \"{bucket}\"\nendpoint_url = \"{}\"\n\n[log]", crate::support::aws::endpoint()),
    ));
    ws.write_pipeline(
        "codes",
        "source = \"db\"\n[match]\nrelations = [\"public.codes\"]\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"c:{{ key.id }}\"]\n",
    );
    let err = crate::support::daemon::refusal(&ws.config_path()).await;
    assert!(err.contains(&format!("s3://{bucket}/polysync/")) && err.contains("NoSuchBucket"), "{err}");
    assert!(err.contains("create the bucket"), "{err}");
    db.cleanup().await;
}
