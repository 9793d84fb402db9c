//! PostgreSQL → graph against a real Gremlin Server (TinkerGraph): vertices and edges from
//! mappings, idempotent under replay, moves on foreign-key updates, exact values, outages.

use std::time::Duration;

use serde_json::json;

use crate::support::daemon::{InProcess, pg_cache_config, pg_cache_config_with};
use crate::support::graph::{count, query};
use crate::support::pg::TestDb;
use crate::support::{Workspace, exclusive, shared, unique, wait_for};

const WAIT: Duration = Duration::from_secs(90);

fn graph_sink() -> String {
    format!(
        "\n[sinks.graph]\nkind = \"graph\"\nurl = \"{}\"\nlinger = \"2ms\"\ntimeout = \"5s\"\n",
        crate::support::graph::url()
    )
}

const SCHEMA: &str = "CREATE TABLE products (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE order_items (order_id bigint, product_id bigint, user_id bigint NOT NULL, qty int NOT NULL,
                          price numeric(12,2) NOT NULL, note text, PRIMARY KEY (order_id, product_id));";

fn pipelines(ws: &Workspace, p: &str) {
    ws.write_pipeline(
        "purchases",
        &format!(
            r#"source = "db"
[match]
relations = ["public.order_items"]
[[sink]]
target = "graph"
[[sink.edge]]
label = "purchased"
id = "{p}:purchased:{{{{ key.order_id }}}}:{{{{ key.product_id }}}}"
from = {{ label = "user", id = "{p}:user:{{{{ row.user_id }}}}" }}
to = {{ label = "product", id = "{p}:product:{{{{ key.product_id }}}}" }}
properties = {{ order_id = "key.order_id", qty = "row.qty", price = "row.price", note = "row.note" }}
"#
        ),
    );
    ws.write_pipeline(
        "products",
        &format!(
            r#"source = "db"
[match]
relations = ["public.products"]
[[sink]]
target = "graph"
[[sink.vertex]]
label = "product"
id = "{p}:product:{{{{ key.id }}}}"
properties = {{ name = "after.name" }}
on_delete = "drop"
"#
        ),
    );
}

async fn edge_props(id: &str) -> serde_json::Value {
    query("g.E(eid).valueMap()", json!({ "eid": id })).await[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_become_vertices_and_edges_that_move_update_drop_and_survive_replay() {
    let _g = shared().await;
    let db = TestDb::create("graph").await;
    db.exec(SCHEMA).await;
    let p = unique("g");
    let slot = unique("s");
    let replay_slot = format!("{slot}_replay");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, &graph_sink()));
    pipelines(&ws, &p);
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    db.exec(&format!("SELECT pg_create_logical_replication_slot('{replay_slot}', 'pgoutput')")).await;
    let long = "x".repeat(100_000);
    let tricky = "it's \"quoted\"'); g.V().drop(); // ünïcødé 😀 \\ end";
    db.client
        .execute(
            "INSERT INTO products VALUES (1, 'Lamp'), (2, 'Desk'), (3, 'Chair'), (4, $1), (5, 'Discontinued')",
            &[&tricky],
        )
        .await
        .unwrap();
    db.client
        .execute(
            "INSERT INTO order_items VALUES (10, 1, 100, 1, 12.50, $1), (10, 2, 100, 2, 99.99, NULL), (11, 1, 101, 1, 12.50, $2), (12, 3, 102, 1, 5.00, 'gone soon')",
            &[&tricky, &long],
        )
        .await
        .unwrap();
    db.exec("UPDATE order_items SET qty = 7 WHERE order_id = 10 AND product_id = 2").await;
    db.exec("UPDATE products SET name = 'Lamp v2' WHERE id = 1").await;
    // Foreign-key change: order 11's line moves from user 101 to user 103.
    db.exec("UPDATE order_items SET user_id = 103 WHERE order_id = 11").await;
    db.exec("DELETE FROM order_items WHERE order_id = 12").await;
    // An unreferenced product goes away with its vertex. (Lanes order changes per row, not
    // across tables: deleting a product that lines still point at would race their edges'
    // endpoint stubs, as a foreign key forbids in the first place.)
    db.exec("DELETE FROM products WHERE id = 5").await;
    db.wait_caught_up(&slot, WAIT).await;

    let check = || async {
        let e = |a: i64, b: i64| format!("{p}:purchased:{a}:{b}");
        // Vertices: products with their (single) names, users as stubs.
        assert_eq!(query("g.V(x).values('name')", json!({ "x": format!("{p}:product:1") })).await, json!(["Lamp v2"]));
        assert_eq!(query("g.V(x).label()", json!({ "x": format!("{p}:user:100") })).await, json!(["user"]));
        assert_eq!(
            count("g.V(x).count()", json!({ "x": format!("{p}:product:5") })).await,
            0,
            "deleted product dropped"
        );
        // Edges with typed properties; the decimal stays exact as text.
        let props = edge_props(&e(10, 2)).await;
        assert_eq!(props["qty"], 7);
        assert_eq!(props["price"], "99.99");
        assert_eq!(props["order_id"], 10);
        assert!(props.get("note").is_none(), "NULL: no property");
        // Exact round trip of quotes, unicode and long strings (no injection).
        assert_eq!(edge_props(&e(10, 1)).await["note"], tricky);
        assert_eq!(query("g.V(x).values('name')", json!({ "x": format!("{p}:product:4") })).await, json!([tricky]));
        assert_eq!(edge_props(&e(11, 1)).await["note"].as_str().map(str::len), Some(100_000));
        // The moved edge: from the new user only.
        assert_eq!(query("g.E(x).outV().id()", json!({ "x": e(11, 1) })).await, json!([format!("{p}:user:103")]));
        assert_eq!(count("g.V(u).outE('purchased').count()", json!({ "u": format!("{p}:user:101") })).await, 0);
        // The deleted line's edge is gone; exactly one edge per remaining row.
        assert_eq!(count("g.E(x).count()", json!({ "x": e(12, 3) })).await, 0);
        for id in [e(10, 1), e(10, 2), e(11, 1)] {
            assert_eq!(count("g.E(x).count()", json!({ "x": id })).await, 1);
        }
        assert_eq!(
            count("g.V().hasId(startingWith(prefix)).outE('purchased').count()", json!({ "prefix": format!("{p}:") }))
                .await,
            3,
            "one edge per row"
        );
    };
    check().await;
    d.stop().await.unwrap();

    // Replay everything from an older slot: still exactly one edge per row, same values.
    let ws2 = Workspace::new();
    ws2.write_config(&pg_cache_config_with(&db.url, &replay_slot, &slot, "", &graph_sink()));
    pipelines(&ws2, &p);
    let d = InProcess::start(&ws2.config_path());
    db.wait_caught_up(&replay_slot, WAIT).await;
    check().await;
    d.stop().await.unwrap();
    assert!(ws.dead_letters().is_empty() && ws2.dead_letters().is_empty());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gremlin_server_down_mid_stream_loses_nothing_and_duplicates_nothing() {
    let _x = exclusive().await;
    let db = TestDb::create("graphdown").await;
    db.exec(SCHEMA).await;
    let p = unique("gd");
    let slot = unique("s");
    let ws = Workspace::new();
    ws.write_config(&crate::support::daemon::quick_spill(pg_cache_config(&db.url, &slot, &graph_sink())));
    pipelines(&ws, &p);
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    // TinkerGraph keeps its graph in memory, so what is written before the stop is lost by
    // the server itself; everything from the stop on must arrive exactly once.
    let down = crate::support::Stopped::peer("gremlin");
    db.exec("INSERT INTO order_items SELECT i, 1, 100 + i % 5, 1, 1.00, NULL FROM generate_series(1, 200) i").await;
    db.exec("UPDATE order_items SET qty = 2 WHERE order_id <= 50").await;
    // The graph's records wait in its spool; the slot moves on.
    db.wait_caught_up(&slot, WAIT).await;
    down.restart();
    let edges = || async {
        count("g.V().hasId(startingWith(prefix)).outE('purchased').count()", json!({ "prefix": format!("{p}:") })).await
    };
    crate::support::wait_for("200 edges from the spool", WAIT, || async { edges().await >= 200 }).await;
    let e = |o: i64| format!("{p}:purchased:{o}:1");
    crate::support::wait_for("the updates from the spool", WAIT, || async { edge_props(&e(7)).await["qty"] == 2 })
        .await;
    assert_eq!(edges().await, 200, "one edge per row, none lost, none duplicated");
    let e = |o: i64| format!("{p}:purchased:{o}:1");
    assert_eq!(edge_props(&e(7)).await["qty"], 2);
    assert_eq!(edge_props(&e(70)).await["qty"], 1);
    d.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coalesce_mode_gives_the_same_graph() {
    let _g = shared().await;
    let db = TestDb::create("graphco").await;
    db.exec(SCHEMA).await;
    let p = unique("gc");
    let slot = unique("s");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, &(graph_sink() + "compat = \"coalesce\"\n")));
    pipelines(&ws, &p);
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO products VALUES (1, 'Lamp')").await;
    db.exec("INSERT INTO order_items VALUES (1, 1, 100, 1, 1.00, 'a'), (2, 1, 101, 1, 1.00, 'b')").await;
    db.exec("UPDATE order_items SET qty = 5, user_id = 102 WHERE order_id = 2").await;
    db.exec("UPDATE products SET name = 'Lamp v2' WHERE id = 1").await;
    db.wait_caught_up(&slot, WAIT).await;
    let e2 = format!("{p}:purchased:2:1");
    assert_eq!(edge_props(&e2).await["qty"], 5);
    assert_eq!(query("g.E(x).outV().id()", json!({ "x": e2 })).await, json!([format!("{p}:user:102")]));
    assert_eq!(query("g.V(x).values('name')", json!({ "x": format!("{p}:product:1") })).await, json!(["Lamp v2"]));
    assert_eq!(
        count("g.V().hasId(startingWith(prefix)).outE('purchased').count()", json!({ "prefix": format!("{p}:") }))
            .await,
        2
    );
    d.stop().await.unwrap();
    db.cleanup().await;
}

/// A wire-level stand-in for Neptune with IAM auth: it verifies the SigV4 signature of the
/// WebSocket handshake, then answers every traversal with 204.
#[allow(clippy::result_large_err)] // the callback type is tungstenite's
async fn fake_neptune(
    listener: tokio::net::TcpListener,
    seen: std::sync::Arc<std::sync::Mutex<Vec<crate::support::sigv4::Seen>>>,
    traversals: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    loop {
        let Ok((sock, _)) = listener.accept().await else { return };
        let (seen, traversals) = (std::sync::Arc::clone(&seen), std::sync::Arc::clone(&traversals));
        tokio::spawn(async move {
            let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                let headers: Vec<(String, String)> = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_lowercase(), v.to_str().unwrap_or_default().to_string()))
                    .collect();
                let v = crate::support::sigv4::verify("GET", req.uri().path(), &headers, b"");
                let ok = v.as_ref().is_some_and(|s| s.valid);
                seen.lock().unwrap().extend(v);
                if ok {
                    Ok(resp)
                } else {
                    let mut r = ErrorResponse::new(Some("signature does not match".into()));
                    *r.status_mut() = http::StatusCode::FORBIDDEN;
                    Err(r)
                }
            };
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(sock, callback).await else { return };
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Binary(frame) = msg else { continue };
                let mime_len = frame[0] as usize;
                let json: serde_json::Value = serde_json::from_slice(&frame[1 + mime_len..]).unwrap();
                traversals.lock().unwrap().push(json["args"]["gremlin"].to_string());
                let id = json["requestId"]["@value"].as_str().unwrap_or_default().to_string();
                let reply = serde_json::json!({"requestId": id, "status": {"code": 204, "message": "", "attributes": {}}, "result": {"data": null, "meta": {}}});
                if ws.send(Message::Text(reply.to_string().into())).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn neptune_iam_handshakes_are_sigv4_signed_on_a_wire_level_verifier() {
    let _g = shared().await;
    let db = TestDb::create("iam").await;
    db.exec(SCHEMA).await;
    let p = unique("iam");
    let slot = unique("s");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let traversals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let server = tokio::spawn(fake_neptune(listener, std::sync::Arc::clone(&seen), std::sync::Arc::clone(&traversals)));
    let ws = Workspace::new();
    let sink = format!(
        "\n[sinks.graph]\nkind = \"graph\"\nurl = \"ws://127.0.0.1:{port}/gremlin\"\nauth = \"iam\"\nregion = \"eu-west-1\"\n"
    );
    ws.write_config(&pg_cache_config(&db.url, &slot, &sink));
    pipelines(&ws, &p);
    let log = ws.path().join("daemon.log");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_polysync"))
        .args(["run", "--config"])
        .arg(ws.config_path())
        .env("AWS_ACCESS_KEY_ID", crate::support::sigv4::KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", crate::support::sigv4::SECRET)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(ws.path().join("daemon.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let d = crate::support::daemon::ChildDaemon { child, log };
    wait_for("slot", WAIT, || async { db.confirmed(&slot).await > 0 }).await;
    db.exec("INSERT INTO order_items VALUES (1, 1, 100, 1, 1.00, 'x')").await;
    db.wait_caught_up(&slot, WAIT).await;
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "no handshake seen");
    for s in &seen {
        assert!(s.valid, "handshake signature did not verify: {s:?}");
        assert_eq!((s.service.as_str(), s.region.as_str(), s.path.as_str()), ("neptune-db", "eu-west-1", "/gremlin"));
        assert!(s.signed_headers.contains("host") && s.signed_headers.contains("x-amz-date"));
    }
    assert!(
        traversals.lock().unwrap().iter().any(|t| t.contains("mergeE")),
        "the edge write went over the signed connection"
    );
    assert!(d.terminate().await.success());
    server.abort();
    db.cleanup().await;
}
