//! PostgreSQL → OpenSearch against a real OpenSearch node: versioned bulk writes that replays
//! cannot roll back, per-item errors, outages, and SigV4 signing (checked by a wire-level
//! verifier, since no local peer checks signatures).

use std::time::Duration;

use crate::support::daemon::{ChildDaemon, InProcess, pg_cache_config, pg_cache_config_with};
use crate::support::pg::TestDb;
use crate::support::search::{self, call, count, doc, index_total};
use crate::support::sigv4 as sigv4_verifier;
use crate::support::{Workspace, exclusive, shared, unique, wait_for};

const WAIT: Duration = Duration::from_secs(90);

fn search_sink(extra: &str) -> String {
    format!("\n[sinks.search]\nkind = \"search\"\nurl = \"{}\"\nlinger = \"2ms\"\n{extra}\n", search::url())
}

fn pipeline(index: &str, extra: &str) -> String {
    format!(
        "source = \"db\"\n[match]\nrelations = [\"public.products\"]\n[[sink]]\ntarget = \"search\"\nindex = \"{index}\"\nid = \"{{{{ key.id }}}}\"\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inserts_updates_and_deletes_become_versioned_documents_and_replays_never_roll_back() {
    let _g = shared().await;
    let db = TestDb::create("search").await;
    db.exec("CREATE TABLE products (id bigint PRIMARY KEY, name text NOT NULL, price numeric(12,2) NOT NULL, stock int NOT NULL)")
        .await;
    let p = unique("srch").to_lowercase();
    let index = format!("{p}-catalog");
    let slot = unique("s");
    let replay_slot = format!("{slot}_replay");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, &search_sink("")));
    ws.write_pipeline("catalog", &pipeline(&index, ""));
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    db.exec(&format!("SELECT pg_create_logical_replication_slot('{replay_slot}', 'pgoutput')")).await;
    db.exec("INSERT INTO products SELECT i, 'p' || i, i * 1.25, i FROM generate_series(1, 50) i").await;
    db.exec("UPDATE products SET price = 99.90, name = 'renamed' WHERE id = 7").await;
    db.exec("BEGIN; UPDATE products SET stock = 1 WHERE id = 8; UPDATE products SET stock = 2 WHERE id = 8; COMMIT;")
        .await;
    db.exec("DELETE FROM products WHERE id IN (9, 10)").await;
    db.wait_caught_up(&slot, WAIT).await;

    let check = || async {
        assert_eq!(count(&index).await, 48);
        let (v7, d7) = doc(&index, "7").await.expect("doc 7");
        assert_eq!(d7, serde_json::json!({"id": 7, "name": "renamed", "price": 99.90, "stock": 7}));
        let (v6, _) = doc(&index, "6").await.expect("doc 6");
        assert!(v7 > v6, "the update's commit LSN is newer than the insert's");
        assert_eq!(doc(&index, "8").await.unwrap().1["stock"], 2, "last change of the transaction wins");
        assert!(doc(&index, "9").await.is_none() && doc(&index, "10").await.is_none());
        v7
    };
    let v7 = check().await;
    // The decimal's digits are exact in the stored source.
    let (_, raw) = crate::support::http("GET", &search::addr(), &format!("/{index}/_source/7"), None).await.unwrap();
    assert!(raw.contains("\"price\":99.90"), "{raw}");
    d.stop().await.unwrap();

    // Replay every change from an older slot: the index must not move back, and the deleted
    // documents must not come back (their tombstones are within index.gc_deletes).
    let ws2 = Workspace::new();
    ws2.write_config(&pg_cache_config_with(&db.url, &replay_slot, &slot, "", &search_sink("")));
    ws2.write_pipeline("catalog", &pipeline(&index, ""));
    let d = InProcess::start(&ws2.config_path());
    db.wait_caught_up(&replay_slot, WAIT).await;
    assert_eq!(check().await, v7);
    d.stop().await.unwrap();
    search::delete_index(&index).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_unmappable_document_is_dead_lettered_and_the_rest_are_indexed_once() {
    let _g = shared().await;
    let db = TestDb::create("srchbad").await;
    db.exec(
        "CREATE TABLE products (id bigint PRIMARY KEY, name text NOT NULL, price text NOT NULL, stock int NOT NULL)",
    )
    .await;
    let p = unique("bad").to_lowercase();
    let index = format!("{p}-strict");
    let slot = unique("s");
    let ws = Workspace::new();
    std::fs::write(ws.path().join("mapping.json"), r#"{"mappings": {"properties": {"price": {"type": "float"}}}}"#)
        .unwrap();
    ws.write_config(&pg_cache_config(
        &db.url,
        &slot,
        &search_sink(&format!("indices = [{{ name = \"{index}\", body = \"mapping.json\", alias = \"{p}-alias\" }}]")),
    ));
    ws.write_pipeline("catalog", &pipeline(&format!("{p}-alias"), ""));
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    let (status, mapping) = call("GET", &format!("/{index}/_mapping"), None).await;
    assert_eq!(status, 200, "index created at start with its mapping");
    assert_eq!(mapping[&index]["mappings"]["properties"]["price"]["type"], "float");
    // One transaction, one bulk request: the middle document cannot be mapped.
    db.exec("INSERT INTO products VALUES (1, 'a', '1.5', 1), (2, 'b', 'not a number', 2), (3, 'c', '3.5', 3)").await;
    db.wait_caught_up(&slot, WAIT).await;
    assert_eq!(count(&index).await, 2);
    assert_eq!(index_total(&index).await, 2, "the good documents were indexed exactly once");
    let dl = ws.dead_letters();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].sink, "search");
    assert_eq!(dl[0].change.key_display(), "id=2");
    assert!(dl[0].reason.contains("mapper_parsing_exception") && dl[0].reason.contains("price"), "{}", dl[0].reason);
    d.stop().await.unwrap();
    search::delete_index(&index).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn opensearch_down_mid_stream_spools_frees_the_slot_and_loses_nothing() {
    let _x = exclusive().await;
    let db = TestDb::create("srchdown").await;
    db.exec("CREATE TABLE products (id bigint PRIMARY KEY, name text NOT NULL, price numeric(12,2) NOT NULL, stock int NOT NULL)")
        .await;
    let p = unique("down").to_lowercase();
    let index = format!("{p}-catalog");
    let slot = unique("s");
    let ws = Workspace::new();
    ws.write_config(&crate::support::daemon::quick_spill(pg_cache_config(
        &db.url,
        &slot,
        &search_sink("timeout = \"3s\""),
    )));
    ws.write_pipeline("catalog", &pipeline(&index, ""));
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO products SELECT i, 'p' || i, i, i FROM generate_series(1, 20) i").await;
    db.wait_caught_up(&slot, WAIT).await;

    // OpenSearch down: the index's records wait in its spool; the slot moves on.
    let down = crate::support::Stopped::peer("opensearch");
    db.exec("INSERT INTO products SELECT i, 'p' || i, i, i FROM generate_series(21, 60) i").await;
    db.exec("UPDATE products SET stock = 0 WHERE id <= 10").await;
    db.exec("DELETE FROM products WHERE id = 5").await;
    db.wait_caught_up(&slot, WAIT).await;
    assert!(
        std::fs::read_dir(ws.path().join("state/spool/search"))
            .is_ok_and(|d| d.flatten().any(|e| e.path().extension().is_some_and(|x| x == "log"))),
        "the confirmed records are held in the spool"
    );

    down.restart();
    crate::support::wait_for("every document from the spool", WAIT, || async { count(&index).await == 59 }).await;
    assert_eq!(doc(&index, "3").await.unwrap().1["stock"], 0);
    assert_eq!(doc(&index, "60").await.unwrap().1["name"], "p60");
    assert!(doc(&index, "5").await.is_none());
    d.stop().await.unwrap();
    search::delete_index(&index).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigv4_requests_verify_for_es_and_aoss_on_a_wire_level_verifier() {
    let _g = shared().await;
    let db = TestDb::create("sigv4").await;
    db.exec("CREATE TABLE products (id bigint PRIMARY KEY, name text NOT NULL, price numeric(12,2) NOT NULL, stock int NOT NULL)")
        .await;
    for service in ["es", "aoss"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let server = tokio::spawn(sigv4_verifier::serve(listener, std::sync::Arc::clone(&seen)));
        let slot = unique("s");
        let ws = Workspace::new();
        let sink = format!(
            "\n[sinks.search]\nkind = \"search\"\nurl = \"http://127.0.0.1:{port}\"\nauth = \"sigv4\"\nservice = \"{service}\"\nregion = \"eu-west-1\"\n"
        );
        ws.write_config(&pg_cache_config(&db.url, &slot, &sink));
        ws.write_pipeline("catalog", &pipeline("catalog", ""));
        // A child process, so the credentials come from its environment (the default chain).
        let log = ws.path().join("daemon.log");
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_polysync"));
        cmd.args(["run", "--config"])
            .arg(ws.config_path())
            .env("AWS_ACCESS_KEY_ID", sigv4_verifier::KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", sigv4_verifier::SECRET)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(ws.path().join("daemon.err")).unwrap())
            .kill_on_drop(true);
        let child = cmd.spawn().unwrap();
        let d = ChildDaemon { child, log: log.clone() };
        wait_for("slot", WAIT, || async { db.confirmed(&slot).await > 0 }).await;
        db.exec(&format!("INSERT INTO products VALUES ({0}, 'p', 1.00, 1)", if service == "es" { 1 } else { 2 })).await;
        db.wait_caught_up(&slot, WAIT).await;
        let seen = seen.lock().unwrap().clone();
        let bulk: Vec<_> = seen.iter().filter(|s| s.path == "/_bulk").collect();
        assert!(!bulk.is_empty(), "{service}: no signed bulk request seen: {seen:?}");
        for s in &seen {
            assert!(s.valid, "{service}: signature did not verify: {s:?}");
            assert_eq!((s.service.as_str(), s.region.as_str()), (service, "eu-west-1"));
            assert!(s.signed_headers.contains("host") && s.signed_headers.contains("x-amz-date"), "{s:?}");
        }
        if service == "aoss" {
            assert!(bulk.iter().all(|s| s.content_sha256_header), "aoss requires x-amz-content-sha256");
        }
        assert!(d.terminate().await.success());
        server.abort();
    }
    db.cleanup().await;
}
