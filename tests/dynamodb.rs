//! DynamoDB Streams → cache: exact values through the moto emulator, restarts from
//! checkpoints, several daemons sharing a stream through a lease table, and (on a wire-level
//! fake of the streams endpoint) shard lineage, balancing and the error paths.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    StreamSpecification, StreamViewType,
};

use crate::support::daemon::{ChildDaemon, InProcess};
use crate::support::fake_streams::{self, FakeShard, Faults};
use crate::support::redis::TestRedis;
use crate::support::{Workspace, check_online, free_port, http_get, metric_value, shared, unique, wait_for};

const WAIT: Duration = Duration::from_secs(60);

async fn ddb() -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&crate::support::aws::sdk().await)
}

async fn create_table(client: &aws_sdk_dynamodb::Client, name: &str, stream: bool) {
    create_table_with_view(client, name, stream.then_some(StreamViewType::NewAndOldImages)).await
}

async fn create_table_with_view(client: &aws_sdk_dynamodb::Client, name: &str, view: Option<StreamViewType>) {
    let mut req = client
        .create_table()
        .table_name(name)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("user_id")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(KeySchemaElement::builder().attribute_name("user_id").key_type(KeyType::Hash).build().unwrap())
        .billing_mode(BillingMode::PayPerRequest);
    if let Some(view) = view {
        req = req.stream_specification(
            StreamSpecification::builder().stream_enabled(true).stream_view_type(view).build().unwrap(),
        );
    }
    req.send().await.unwrap();
}

async fn put(client: &aws_sdk_dynamodb::Client, table: &str, item: HashMap<String, AttributeValue>) {
    client.put_item().table_name(table).set_item(Some(item)).send().await.unwrap();
}

fn item(user: &str, extra: &[(&str, AttributeValue)]) -> HashMap<String, AttributeValue> {
    let mut m = HashMap::new();
    m.insert("user_id".to_string(), AttributeValue::S(user.into()));
    for (k, v) in extra {
        m.insert(k.to_string(), v.clone());
    }
    m
}

fn config(table_or_arn: &str, extra_source: &str, metrics_port: Option<u16>) -> String {
    let source_key = if table_or_arn.starts_with("arn:") { "stream_arn" } else { "table" };
    let metrics = match metrics_port {
        Some(p) => format!("listen = \"127.0.0.1:{p}\""),
        None => "enabled = false".into(),
    };
    format!(
        r#"state_dir = "state"
pipelines = "pipelines"
[runtime]
lanes = 4
shutdown_timeout = "15s"
[metrics]
{metrics}
[aws]
endpoint_url = "{aws}"
region = "us-east-1"
[sources.ddb]
kind = "dynamodb"
{source_key} = "{table_or_arn}"
poll_interval = "100ms"
discovery_interval = "2s"
checkpoint_interval = "100ms"
{extra_source}
[sinks.cache]
kind = "cache"
url = "{redis}"
"#,
        aws = crate::support::aws::endpoint(),
        redis = crate::support::redis::url()
    )
}

fn markers_pipeline(p: &str) -> String {
    format!(
        "source = \"ddb\"\n[match]\nrelations = [\"*\"]\nops = [\"insert\"]\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"{p}:m:{{{{ key.user_id }}}}\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn items_arrive_as_exact_changes_and_reach_the_cache() {
    let _g = shared().await;
    let client = ddb().await;
    let table = unique("profiles");
    create_table(&client, &table, true).await;
    let p = unique("dp");
    let ws = Workspace::new();
    ws.write_config(&config(&table, "", None));
    ws.write_pipeline(
        "profiles",
        &format!(
            "source = \"ddb\"\n[match]\nrelations = [\"{table}\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{p}:profile:{{{{ key.user_id }}}}\"\n"
        ),
    );
    let d = InProcess::start(&ws.config_path());
    let redis = TestRedis::connect().await;
    let thirty_eight = "12345678901234567890123456789012345678";
    let mut nested = HashMap::new();
    nested.insert("city".to_string(), AttributeValue::S("Zürich \"Z\"".into()));
    nested.insert(
        "tags".to_string(),
        AttributeValue::L(vec![
            AttributeValue::N("1.50".into()),
            AttributeValue::Bool(true),
            AttributeValue::Null(true),
        ]),
    );
    put(
        &client,
        &table,
        item(
            "u1",
            &[
                ("balance", AttributeValue::N(thirty_eight.into())),
                ("avatar", AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(vec![0u8, 1, 255]))),
                ("roles", AttributeValue::Ss(vec!["admin".into()])),
                ("scores", AttributeValue::Ns(vec!["-0.5".into()])),
                ("address", AttributeValue::M(nested)),
            ],
        ),
    )
    .await;
    put(&client, &table, item("u2", &[("name", AttributeValue::S("two".into()))])).await;
    let key1 = format!("{p}:profile:u1");
    wait_for("u1 cached", WAIT, || async { redis.exists(&key1).await }).await;
    let mut v: serde_json::Value = serde_json::from_str(&redis.get(&key1).await.unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("balance"); // checked textually below: 38 digits
    assert_eq!(
        v,
        serde_json::json!({
            "address": {"city": "Zürich \"Z\"", "tags": [1.50, true, null]},
            "avatar": "AAH/",
            "roles": ["admin"],
            "scores": [-0.5],
            "user_id": "u1"
        })
    );
    let raw = redis.get(&key1).await.unwrap();
    assert!(raw.contains(&format!("\"balance\":{thirty_eight}")), "38 digits exact: {raw}");
    // Update and delete.
    client
        .update_item()
        .table_name(&table)
        .key("user_id", AttributeValue::S("u2".into()))
        .update_expression("SET #n = :n")
        .expression_attribute_names("#n", "name")
        .expression_attribute_values(":n", AttributeValue::S("deux".into()))
        .send()
        .await
        .unwrap();
    client.delete_item().table_name(&table).key("user_id", AttributeValue::S("u1".into())).send().await.unwrap();
    let key2 = format!("{p}:profile:u2");
    wait_for("update applied", WAIT, || async { redis.get(&key2).await.is_some_and(|v| v.contains("deux")) }).await;
    wait_for("delete applied", WAIT, || async { !redis.exists(&key1).await }).await;
    assert!(ws.dead_letters().is_empty());
    d.stop().await.unwrap();
}

async fn applied(port: u16) -> f64 {
    match http_get(&format!("127.0.0.1:{port}"), "/metrics").await {
        Some((200, body)) => metric_value(&body, "polysync_sink_records_total", &[("result", "applied")]),
        _ => -1.0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarts_resume_after_the_last_checkpoint() {
    let _g = shared().await;
    let client = ddb().await;
    let table = unique("restart");
    create_table(&client, &table, true).await;
    let p = unique("dr");
    let ws = Workspace::new();
    let port = free_port();
    ws.write_config(&config(&table, "", Some(port)));
    ws.write_pipeline("markers", &markers_pipeline(&p));
    let redis = TestRedis::connect().await;
    for i in 0..60 {
        redis.set(&format!("{p}:m:u{i}"), "x").await;
    }
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    for i in 0..20 {
        put(&client, &table, item(&format!("u{i}"), &[])).await;
    }
    wait_for("first 20", WAIT, || async { !redis.exists(&format!("{p}:m:u19")).await && applied(port).await == 20.0 })
        .await;
    assert!(d.terminate().await.success());
    // Graceful stop: everything was confirmed, so a restart replays nothing.
    for i in 20..30 {
        put(&client, &table, item(&format!("u{i}"), &[])).await;
    }
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("next 10", WAIT, || async { (20..30).all(|_| true) && applied(port).await == 10.0 }).await;
    for i in 0..30 {
        assert!(!redis.exists(&format!("{p}:m:u{i}")).await, "u{i} skipped");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(applied(port).await, 10.0, "a clean restart resumes exactly after the checkpoint");
    // kill -9 mid-stream: nothing is lost; replays are limited to what was not yet confirmed.
    let writer = {
        let (client, table) = (client.clone(), table.clone());
        tokio::spawn(async move {
            for i in 30..60 {
                put(&client, &table, item(&format!("u{i}"), &[])).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.kill9().await;
    writer.await.unwrap();
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("all 60 after kill -9", WAIT, || async {
        let mut all = true;
        for i in 30..60 {
            all &= !redis.exists(&format!("{p}:m:u{i}")).await;
        }
        all
    })
    .await;
    assert!(d.terminate().await.success());
}

async fn lease_owner(client: &aws_sdk_dynamodb::Client, lease_table: &str) -> HashMap<String, Option<String>> {
    let Ok(out) = client.scan().table_name(lease_table).consistent_read(true).send().await else {
        return HashMap::new(); // not created yet
    };
    out.items()
        .iter()
        .map(|i| {
            (
                i.get("shard").and_then(|v| v.as_s().ok()).cloned().unwrap_or_default(),
                i.get("owner").and_then(|v| v.as_s().ok()).cloned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_daemons_share_a_stream_and_a_killed_owners_shard_is_taken_over() {
    let _g = shared().await;
    let client = ddb().await;
    let table = unique("shared");
    create_table(&client, &table, true).await;
    let leases = unique("leases");
    let p = unique("dl");
    let redis = TestRedis::connect().await;
    for i in 0..80 {
        redis.set(&format!("{p}:m:u{i}"), "x").await;
    }
    let mut daemons = HashMap::new();
    let mut spaces = Vec::new();
    for w in ["w1", "w2", "w3"] {
        let ws = Workspace::new();
        let lease = format!(
            "[sources.ddb.checkpoint]\nstore = \"dynamodb\"\ntable = \"{leases}\"\ncreate_table = true\nworker_id = \"{w}\"\nlease_duration = \"3s\"\n"
        );
        ws.write_config(&config(&table, &lease, None));
        ws.write_pipeline("markers", &markers_pipeline(&p));
        daemons.insert(w.to_string(), ChildDaemon::spawn(&ws.config_path(), &ws.path().join("daemon.log")));
        spaces.push(ws);
    }
    let writer = {
        let (client, table) = (client.clone(), table.clone());
        tokio::spawn(async move {
            for i in 0..80 {
                put(&client, &table, item(&format!("u{i}"), &[])).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // moto has one shard: exactly one daemon owns it.
    wait_for("a lease owner", WAIT, || async {
        lease_owner(&client, &leases).await.into_values().flatten().next().is_some()
    })
    .await;
    let owner = lease_owner(&client, &leases).await.into_values().flatten().next().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    daemons.remove(&owner).unwrap().kill9().await;
    wait_for("the lease taken over after it expired", WAIT, || async {
        lease_owner(&client, &leases).await.into_values().flatten().any(|o| o != owner)
    })
    .await;
    writer.await.unwrap();
    wait_for("every record delivered", WAIT, || async {
        let mut all = true;
        for i in 0..80 {
            all &= !redis.exists(&format!("{p}:m:u{i}")).await;
        }
        all
    })
    .await;
    for (_, d) in daemons {
        assert!(d.terminate().await.success());
    }
}

/// Fencing by lease validity. Instance a owns the shard and has read 20 records that its cache
/// cannot take (its Redis, behind a TCP proxy named as such, refuses connections). Then a freezes (SIGSTOP:
/// what a long GC pause, a frozen VM or a throttled container look like from outside) for
/// longer than the lease. Instance b takes the expired lease and applies the records from the
/// last checkpoint. When a thaws and its Redis is back, it applies none of what it read under
/// the lease it lost: the records are abandoned, unconfirmed, and counted. Each instance writes
/// its own key prefix, so any late write of a's would show.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_frozen_past_its_lease_applies_nothing_it_read_under_it() {
    let _g = shared().await;
    let client = ddb().await;
    let table = unique("fenced");
    create_table(&client, &table, true).await;
    let leases = unique("leases");
    let (pa, pb) = (unique("fa"), unique("fb"));
    let redis = TestRedis::connect().await;
    for i in 0..20 {
        redis.set(&format!("{pa}:m:u{i}"), "x").await;
        redis.set(&format!("{pb}:m:u{i}"), "x").await;
    }
    let lease = |w: &str| {
        format!(
            "[sources.ddb.checkpoint]\nstore = \"dynamodb\"\ntable = \"{leases}\"\ncreate_table = true\nworker_id = \"{w}\"\nlease_duration = \"4s\"\n"
        )
    };
    let redis_url = crate::support::redis::url();
    let proxy =
        crate::support::proxy::Proxy::start(redis_url.trim_start_matches("redis://").trim_end_matches('/')).await;
    let port_a = free_port();
    let wa = Workspace::new();
    wa.write_config(&config(&table, &lease("a"), Some(port_a)).replace(&redis_url, &format!("redis://{}", proxy.addr)));
    wa.write_pipeline("markers", &markers_pipeline(&pa));
    let a = ChildDaemon::spawn(&wa.config_path(), &wa.path().join("daemon.log"));
    wait_for("a to own the shard", WAIT, || async {
        lease_owner(&client, &leases).await.values().any(|o| o.as_deref() == Some("a"))
    })
    .await;
    let scrape = |name: &'static str| async move {
        match http_get(&format!("127.0.0.1:{port_a}"), "/metrics").await {
            Some((200, body)) => metric_value(&body, name, &[]),
            _ => -1.0,
        }
    };
    // Refused, not accepted and dropped: a's commands fail at once and none is left in flight
    // or buffered for a reconnect, so any write of a's after this point was issued after it.
    proxy.set_refusing(true);
    for i in 0..20 {
        put(&client, &table, item(&format!("u{i}"), &[])).await;
    }
    wait_for("a to read the 20 records", WAIT, || async { scrape("polysync_source_changes_total").await >= 20.0 })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.signal(libc::SIGSTOP);

    let wb = Workspace::new();
    wb.write_config(&config(&table, &lease("b"), None));
    wb.write_pipeline("markers", &markers_pipeline(&pb));
    let b = ChildDaemon::spawn(&wb.config_path(), &wb.path().join("daemon.log"));
    wait_for("b to take the expired lease and apply every record", WAIT, || async {
        let mut all = lease_owner(&client, &leases).await.values().any(|o| o.as_deref() == Some("b"));
        for i in 0..20 {
            all &= !redis.exists(&format!("{pb}:m:u{i}")).await;
        }
        all
    })
    .await;

    a.signal(libc::SIGCONT);
    wait_for("a to abandon what it read under the lease it lost", WAIT, || async {
        scrape("polysync_sink_fenced_records_total").await >= 20.0
    })
    .await;
    proxy.set_refusing(false);
    tokio::time::sleep(Duration::from_secs(4)).await;
    for i in 0..20 {
        assert!(
            redis.exists(&format!("{pa}:m:u{i}")).await,
            "a applied u{i}, read under a lease it no longer held, after b took over; a's log:\n{}",
            a.log_text()
        );
    }
    assert!(a.log_text().contains("lease is no longer valid"), "a says why: {}", a.log_text());
    assert!(a.terminate().await.success());
    assert!(b.terminate().await.success());
}

/// A restart under the same worker id (an explicit `worker_id`, or a container restarted in
/// place with the same host name and PID 1) takes its own orphaned lease back at once: with a
/// lease duration far longer than the wait, only that makes the put after the restart arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_under_the_same_worker_id_takes_its_own_lease_back() {
    let _g = shared().await;
    let client = ddb().await;
    let table = unique("selflease");
    create_table(&client, &table, true).await;
    let leases = unique("sleases");
    let p = unique("sl");
    let redis = TestRedis::connect().await;
    let ws = Workspace::new();
    let lease = format!(
        "[sources.ddb.checkpoint]\nstore = \"dynamodb\"\ntable = \"{leases}\"\ncreate_table = true\nworker_id = \"w1\"\nlease_duration = \"1h\"\n"
    );
    ws.write_config(&config(&table, &lease, None));
    ws.write_pipeline("markers", &markers_pipeline(&p));
    let log = ws.path().join("daemon.log");
    redis.set(&format!("{p}:m:before"), "x").await;
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("w1 owns the shard", WAIT, || async {
        lease_owner(&client, &leases).await.into_values().flatten().any(|o| o == "w1")
    })
    .await;
    put(&client, &table, item("before", &[])).await;
    wait_for("the first put", WAIT, || async { !redis.exists(&format!("{p}:m:before")).await }).await;
    d.kill9().await;
    redis.set(&format!("{p}:m:after"), "x").await;
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    put(&client, &table, item("after", &[])).await;
    wait_for("the put after the restart (the orphaned lease taken back)", WAIT, || async {
        !redis.exists(&format!("{p}:m:after")).await
    })
    .await;
    assert!(d.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_shard_stream_parents_first_and_leases_spread_across_instances() {
    let _g = shared().await;
    let seq = |s: u32| format!("{:021}", s);
    let shard = |id: &str, parent: Option<&str>, from: u32, n: u32, closed: bool| FakeShard {
        id: id.into(),
        parent: parent.map(str::to_string),
        records: (from..from + n).map(|i| (seq(i), format!("{id}-u{i}"))).collect(),
        closed,
    };
    let shards = vec![
        shard("shard-parent", None, 100, 5, true),
        shard("shard-child-a", Some("shard-parent"), 200, 4, false),
        shard("shard-child-b", Some("shard-parent"), 300, 4, false),
        shard("shard-other", None, 400, 4, false),
    ];
    let all_users: Vec<String> = shards.iter().flat_map(|s| s.records.iter().map(|r| r.1.clone())).collect();
    let (endpoint, fake) = fake_streams::serve(shards, Faults::default()).await;
    let leases = unique("fleases");
    let p = unique("fm");
    let redis = TestRedis::connect().await;
    for u in &all_users {
        redis.set(&format!("{p}:m:{u}"), "x").await;
    }
    let mut daemons = Vec::new();
    let mut spaces = Vec::new();
    for w in ["a", "b", "c"] {
        let ws = Workspace::new();
        let extra = format!(
            "endpoint_url = \"{endpoint}\"\ndiscovery_interval = \"60s\"\n[sources.ddb.checkpoint]\nstore = \"dynamodb\"\ntable = \"{leases}\"\ncreate_table = true\nworker_id = \"{w}\"\nlease_duration = \"3s\"\nendpoint_url = \"{}\"\n",
            crate::support::aws::endpoint()
        );
        ws.write_config(&config(&fake.arn, &extra, None).replace("discovery_interval = \"2s\"\n", ""));
        ws.write_pipeline("markers", &markers_pipeline(&p));
        daemons.push(ChildDaemon::spawn(&ws.config_path(), &ws.path().join("daemon.log")));
        spaces.push(ws);
    }
    let client = ddb().await;
    wait_for("every record of every shard", WAIT, || async {
        let mut all = true;
        for u in &all_users {
            all &= !redis.exists(&format!("{p}:m:{u}")).await;
        }
        all
    })
    .await;
    // Lineage: no child was read before its parent had been read to its end.
    let calls = fake.calls.lock().unwrap().clone();
    let parent_end =
        calls.iter().filter(|c| c.op == "GetRecords" && c.shard == "shard-parent").map(|c| c.at).max().unwrap();
    for child in ["shard-child-a", "shard-child-b"] {
        let first =
            calls.iter().filter(|c| c.op == "GetShardIterator" && c.shard == child).map(|c| c.at).min().unwrap();
        assert!(first > parent_end, "{child} started before its parent finished");
        // Handed over without waiting for the 60 s discovery interval.
        assert!(
            first.duration_since(parent_end) < Duration::from_secs(15),
            "{child} waited {:?}",
            first.duration_since(parent_end)
        );
    }
    // Balance: the three open shards end up with three different owners.
    wait_for("leases spread across the instances", WAIT, || async {
        let owners = lease_owner(&client, &leases).await;
        let open: std::collections::HashSet<Option<String>> = ["shard-child-a", "shard-child-b", "shard-other"]
            .iter()
            .map(|s| owners.get(*s).cloned().flatten())
            .collect();
        open.len() == 3 && !open.contains(&None)
    })
    .await;
    for d in daemons {
        assert!(d.terminate().await.success());
    }
}

/// `start = "latest"` means "from the first start on", not "from whenever a reader happens to
/// position itself": a record written while a crash kept polysync away before its first
/// checkpoint still arrives after the restart, and one written before the first start does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn latest_starts_at_the_first_start_and_a_crash_before_the_first_checkpoint_loses_nothing() {
    let _g = shared().await;
    let client = ddb().await;
    let table = unique("latest");
    create_table(&client, &table, true).await;
    let p = unique("lt");
    let redis = TestRedis::connect().await;
    for u in ["old", "during", "new"] {
        redis.set(&format!("{p}:m:{u}"), "x").await;
    }
    put(&client, &table, item("old", &[])).await;
    // Creation times have one-second resolution: "old" is well before the first start.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let port = free_port();
    let ws = Workspace::new();
    ws.write_config(&config(&table, "start = \"latest\"", Some(port)));
    ws.write_pipeline("markers", &markers_pipeline(&p));
    let log = ws.path().join("daemon.log");
    let ready = || async { http_get(&format!("127.0.0.1:{port}"), "/readyz").await.is_some_and(|(s, _)| s == 200) };
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("the first start to read the stream", WAIT, ready).await;
    d.kill9().await;
    put(&client, &table, item("during", &[])).await;
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("the record written while polysync was down", WAIT, || async {
        !redis.exists(&format!("{p}:m:during")).await
    })
    .await;
    put(&client, &table, item("new", &[])).await;
    wait_for("a record after the restart", WAIT, || async { !redis.exists(&format!("{p}:m:new")).await }).await;
    assert!(redis.exists(&format!("{p}:m:old")).await, "a record from before the first start is not read");
    assert!(d.terminate().await.success());
}

/// A record that cannot be a change (here: no keys, scripted on the wire-level fake) is kept in
/// the dead-letter queue with the raw record and the reason, the records around it are
/// delivered, and a restart does not read it again (the checkpoint passed it once it was kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undecodable_record_is_dead_lettered_raw_and_the_shard_goes_on() {
    let _g = shared().await;
    let records: Vec<(String, String)> =
        ["u1", "!nokey-2", "u3"].iter().enumerate().map(|(i, u)| (format!("{:021}", i + 1), u.to_string())).collect();
    let shard = FakeShard { id: "shard-1".into(), parent: None, records, closed: false };
    let (endpoint, fake) = fake_streams::serve(vec![shard], Faults::default()).await;
    let p = unique("ud");
    let redis = TestRedis::connect().await;
    for u in ["u1", "u3"] {
        redis.set(&format!("{p}:m:{u}"), "x").await;
    }
    let ws = Workspace::new();
    ws.write_config(&config(&fake.arn, &format!("endpoint_url = \"{endpoint}\""), None));
    ws.write_pipeline("markers", &markers_pipeline(&p));
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("the records around the bad one", WAIT, || async {
        !redis.exists(&format!("{p}:m:u1")).await && !redis.exists(&format!("{p}:m:u3")).await
    })
    .await;
    let letters = ws.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    let l = &letters[0];
    assert_eq!((l.pipeline.as_str(), l.sink.as_str()), ("-", "-"));
    assert!(l.reason.contains("undecodable") && l.reason.contains("carries no key"), "{}", l.reason);
    let raw = l.change.after.as_ref().and_then(|a| a.get("raw_record")).map(|v| format!("{v:?}")).unwrap_or_default();
    assert!(raw.contains("!nokey-2") && raw.contains("000000000000000000002"), "the raw record is kept: {raw}");
    assert!(d.terminate().await.success());
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("the restart to read the shard", WAIT, || async {
        fake.calls.lock().unwrap().iter().filter(|c| c.op == "GetShardIterator").count() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(d.terminate().await.success());
    assert_eq!(ws.dead_letters().len(), 1, "kept once, not again after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_iterators_trimmed_data_and_throttling_on_a_wire_level_fake() {
    let _g = shared().await;
    let seqs: Vec<(String, String)> = (1..=8).map(|i| (format!("{:021}", i), format!("u{i}"))).collect();
    let shard = FakeShard { id: "shard-1".into(), parent: None, records: seqs.clone(), closed: false };
    let mut faults = Faults::default();
    faults.expire.insert("shard-1".into(), 1);
    faults.throttle.insert("shard-1".into(), 2);
    faults.trimmed.insert("shard-1".into(), 1);
    let (endpoint, fake) = fake_streams::serve(vec![shard], faults).await;
    let p = unique("fx");
    let redis = TestRedis::connect().await;
    for (_, u) in &seqs {
        redis.set(&format!("{p}:m:{u}"), "x").await;
    }
    let port = free_port();
    let ws = Workspace::new();
    ws.write_config(&config(&fake.arn, &format!("endpoint_url = \"{endpoint}\""), Some(port)));
    ws.write_pipeline("markers", &markers_pipeline(&p));
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    let all_gone = || async {
        let mut all = true;
        for (_, u) in &seqs {
            all &= !redis.exists(&format!("{p}:m:{u}")).await;
        }
        all
    };
    wait_for("all records despite an expired iterator and throttling", WAIT, all_gone).await;
    let iterators = |calls: &[fake_streams::Call]| calls.iter().filter(|c| c.op == "GetShardIterator").count();
    // One initial iterator and exactly one re-acquisition after the expiry.
    assert_eq!(iterators(&fake.calls.lock().unwrap()), 2);
    let (_, metrics) = http_get(&format!("127.0.0.1:{port}"), "/metrics").await.unwrap();
    assert_eq!(metric_value(&metrics, "polysync_ddb_iterators_expired_total", &[]), 1.0);
    assert_eq!(metric_value(&metrics, "polysync_ddb_throttles_total", &[]), 2.0);
    assert!(d.terminate().await.success());
    // Restart from the checkpoint: the fake says the data after it was trimmed; the reader
    // says so loudly, counts it and continues from the oldest record.
    for (_, u) in &seqs {
        redis.set(&format!("{p}:m:{u}"), "x").await;
    }
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("re-read from the oldest record after trimmed data", WAIT, all_gone).await;
    let (_, metrics) = http_get(&format!("127.0.0.1:{port}"), "/metrics").await.unwrap();
    assert_eq!(metric_value(&metrics, "polysync_ddb_trimmed_data_total", &[]), 1.0);
    assert!(std::fs::read_to_string(&log).unwrap().contains("DATA LOST UPSTREAM"));
    assert!(d.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_one_clear_line() {
    let _g = shared().await;
    let client = ddb().await;
    let table = unique("nostream");
    create_table(&client, &table, false).await;
    let refuse = |cfg: String| async move {
        let ws = Workspace::new();
        ws.write_config(&cfg);
        ws.write_pipeline("markers", &markers_pipeline("x"));
        let d = InProcess::start(&ws.config_path());
        match tokio::time::timeout(WAIT, d.result()).await {
            Ok(Err(e)) => e.to_string(),
            other => panic!("expected a refusal, got {:?}", other.map(|r| r.is_ok())),
        }
    };
    let e = refuse(config(&table, "", None)).await;
    assert!(e.contains("has no stream") && e.contains(&table), "{e}");
    assert_eq!(e.lines().count(), 1);
    let e =
        refuse(config("arn:aws:dynamodb:us-east-1:123456789012:table/nope/stream/2026-01-01T00:00:00.000", "", None))
            .await;
    assert!(e.contains("does not exist"), "{e}");
    let e = refuse(config("no-such-table-xyz", "", None)).await;
    assert!(e.contains("does not exist") && e.contains("no-such-table-xyz"), "{e}");
    // A pipeline that reads the new image from a KEYS_ONLY stream is refused at start.
    let keys_only = unique("keysonly");
    create_table_with_view(&client, &keys_only, Some(StreamViewType::KeysOnly)).await;
    let ws = Workspace::new();
    ws.write_config(&config(&keys_only, "", None));
    ws.write_pipeline(
        "names",
        "source = \"ddb\"\n[match]\nrelations = [\"*\"]\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"n:{{ after.name }}\"]\n",
    );
    let d = InProcess::start(&ws.config_path());
    let e = match tokio::time::timeout(WAIT, d.result()).await {
        Ok(Err(e)) => e.to_string(),
        other => panic!("expected a refusal, got {:?}", other.map(|r| r.is_ok())),
    };
    assert!(e.contains("NewImage") && e.contains("KEYS_ONLY") && e.contains("NEW_AND_OLD_IMAGES"), "{e}");

    // Missing credentials: a child process without any.
    let ws = Workspace::new();
    ws.write_config(&config(&table, "", None));
    ws.write_pipeline("markers", &markers_pipeline("x"));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_polysync"))
        .args(["run", "--config"])
        .arg(ws.config_path())
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // The binary's edge prints exactly one `polysync: ...` line naming the source and the cause.
    let edge: Vec<&str> = err.lines().filter(|l| l.starts_with("polysync: ")).collect();
    assert_eq!(edge.len(), 1, "{err}");
    assert!(edge[0].contains("source ddb") && edge[0].contains("no AWS credentials"), "{err}");
}

/// The table as the cache should hold it: `user_id` → `{"n": …, "name": …, "user_id": …}`.
async fn table_docs(client: &aws_sdk_dynamodb::Client, table: &str) -> crate::support::converge::Docs {
    let mut out = crate::support::converge::Docs::new();
    let mut start = None;
    loop {
        let page = client.scan().table_name(table).set_exclusive_start_key(start).send().await.unwrap();
        for it in page.items() {
            let u = it["user_id"].as_s().unwrap().clone();
            let n: serde_json::Value = serde_json::from_str(it["n"].as_n().unwrap()).unwrap();
            out.insert(u.clone(), serde_json::json!({"n": n, "name": it["name"].as_s().unwrap(), "user_id": u}));
        }
        start = page.last_evaluated_key().cloned();
        if start.is_none() {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_of_a_20000_item_table_with_writes_during_the_scan_ends_exact() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let _g = shared().await;
    let client = ddb().await;
    let table = unique("backfill");
    create_table(&client, &table, true).await;
    const ITEMS: usize = 20_000;
    let mut batches = Vec::new();
    for chunk in (0..ITEMS).collect::<Vec<_>>().chunks(25) {
        let reqs = chunk
            .iter()
            .map(|i| {
                let it = item(
                    &format!("u{i}"),
                    &[("n", AttributeValue::N(i.to_string())), ("name", AttributeValue::S(format!("user {i}")))],
                );
                aws_sdk_dynamodb::types::WriteRequest::builder()
                    .put_request(aws_sdk_dynamodb::types::PutRequest::builder().set_item(Some(it)).build().unwrap())
                    .build()
            })
            .collect::<Vec<_>>();
        batches.push(client.batch_write_item().request_items(&table, reqs).send());
    }
    for b in batches {
        b.await.unwrap();
    }
    let p = format!("{}:", unique("bf"));
    let ws = Workspace::new();
    // Start at LATEST: the 20,000 puts are not in what the stream delivers; only the scan has them.
    ws.write_config(&config(&table, "start = \"latest\"\nbackfill_segments = 4", None));
    ws.write_pipeline(
        "profiles",
        &format!(
            "source = \"ddb\"\nsnapshot = \"initial\"\n[match]\nrelations = [\"*\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{p}{{{{ key.user_id }}}}\"\nformat = \"json\"\n"
        ),
    );
    let d = InProcess::start(&ws.config_path());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, table, stop) = (client.clone(), table.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let a = rand::random::<u64>() as usize % ITEMS;
                let b = rand::random::<u64>() as usize % ITEMS;
                client
                    .update_item()
                    .table_name(&table)
                    .key("user_id", AttributeValue::S(format!("u{a}")))
                    .update_expression("SET n = :n, #nm = :nm")
                    .expression_attribute_names("#nm", "name")
                    .expression_attribute_values(":n", AttributeValue::N(format!("{}", 1_000_000 + n)))
                    .expression_attribute_values(":nm", AttributeValue::S(format!("updated {n}")))
                    .send()
                    .await
                    .unwrap();
                client
                    .delete_item()
                    .table_name(&table)
                    .key("user_id", AttributeValue::S(format!("u{b}")))
                    .send()
                    .await
                    .unwrap();
                put(
                    &client,
                    &table,
                    item(
                        &format!("new{n}"),
                        &[("n", AttributeValue::N("7".into())), ("name", AttributeValue::S("new".into()))],
                    ),
                )
                .await;
                n += 1;
            }
            n
        })
    };
    let progress = ws.path().join("state/snapshot-ddb.json");
    wait_for("the backfill to finish", Duration::from_secs(300), || async {
        polysync::checkpoint::snapshot::SnapshotProgress::load(&progress)
            .is_ok_and(|p| p.tasks.len() == 1 && p.tasks[0].state == polysync::checkpoint::snapshot::TaskState::Done)
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let writes = writer.await.unwrap();
    assert!(writes > 0, "writes happened during the scan");
    let expected = table_docs(&client, &table).await;
    let redis = TestRedis::connect().await;
    let mut last = Vec::new();
    let converged = async {
        for _ in 0..300 {
            last = crate::support::converge::diff(
                "cache",
                &expected,
                &crate::support::converge::redis_docs(&redis.client, &p).await,
            );
            if last.is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }
    .await;
    assert!(converged, "{} differences, first: {:#?}", last.len(), &last[..last.len().min(10)]);
    eprintln!("ddb backfill: {ITEMS} items with {writes} concurrent write rounds converged");
    d.stop().await.unwrap();
}

/// Seeded random puts, updates and deletes on a streamed table while the daemon is killed with
/// SIGKILL at seeded moments and restarted from its checkpoints: the cache (version-guarded
/// `set`) and the search index (per-key monotonic versions) end exactly equal to the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_seeded_moments_converges_in_cache_and_search() {
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let _g = shared().await;
    let kills: u64 = std::env::var("POLYSYNC_FAULT_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(20) / 2;
    let seed: u64 = std::env::var("POLYSYNC_TEST_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(20261201);
    eprintln!("fault seed {seed} (set POLYSYNC_TEST_SEED to reproduce)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let client = ddb().await;
    let table = unique("ddbkill");
    create_table(&client, &table, true).await;
    let p = format!("{}:", unique("dk"));
    let index = unique("ddbkill").to_lowercase();
    let ws = Workspace::new();
    ws.write_config(&format!(
        "{}\n[sinks.search]\nkind = \"search\"\nurl = \"{}\"\n",
        config(&table, "", None),
        crate::support::search::url()
    ));
    ws.write_pipeline(
        "profiles",
        &format!(
            "source = \"ddb\"\n[match]\nrelations = [\"*\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{p}{{{{ key.user_id }}}}\"\nformat = \"json\"\n[[sink]]\ntarget = \"search\"\nindex = \"{index}\"\nid = \"{{{{ key.user_id }}}}\"\n"
        ),
    );
    let (stop, writes) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (client, table, stop, writes) = (client.clone(), table.clone(), Arc::clone(&stop), Arc::clone(&writes));
        let mut rng = rand::rngs::StdRng::seed_from_u64(rng.random());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let u = format!("u{}", rng.random_range(0..300));
                match rng.random_range(0..10) {
                    0..=4 => {
                        put(
                            &client,
                            &table,
                            item(
                                &u,
                                &[
                                    ("n", AttributeValue::N(n.to_string())),
                                    ("name", AttributeValue::S(format!("put {n}"))),
                                ],
                            ),
                        )
                        .await
                    }
                    5..=7 => {
                        // Only existing items are updated (an update would otherwise create a
                        // partial item).
                        let _ = client
                            .update_item()
                            .table_name(&table)
                            .key("user_id", AttributeValue::S(u))
                            .update_expression("SET n = :n, #nm = :nm")
                            .condition_expression("attribute_exists(user_id)")
                            .expression_attribute_names("#nm", "name")
                            .expression_attribute_values(":n", AttributeValue::N(n.to_string()))
                            .expression_attribute_values(":nm", AttributeValue::S(format!("updated {n}")))
                            .send()
                            .await;
                    }
                    _ => {
                        client
                            .delete_item()
                            .table_name(&table)
                            .key("user_id", AttributeValue::S(u))
                            .send()
                            .await
                            .unwrap();
                    }
                }
                n += 1;
                writes.store(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..4))).await;
            }
        })
    };
    let log = ws.path().join("daemon.log");
    for _ in 0..kills {
        let d = ChildDaemon::spawn(&ws.config_path(), &log);
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..2000))).await;
        d.kill9().await;
    }
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    let expected = table_docs(&client, &table).await;
    let redis = TestRedis::connect().await;
    let mut last = Vec::new();
    for _ in 0..600 {
        last = crate::support::converge::diff(
            "cache",
            &expected,
            &crate::support::converge::redis_docs(&redis.client, &p).await,
        );
        last.extend(crate::support::converge::diff(
            "search",
            &expected,
            &crate::support::converge::search_docs(&index).await,
        ));
        if last.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        last.is_empty(),
        "{} differences, first: {:#?}\nlog tail: {}",
        last.len(),
        &last[..last.len().min(10)],
        std::fs::read_to_string(&log).unwrap_or_default().lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    eprintln!(
        "ddb kill -9 scenario: {} writes, {kills} kills, {} items, converged in cache and search",
        writes.load(Ordering::SeqCst),
        expected.len()
    );
    assert!(d.terminate().await.success());
    crate::support::search::delete_index(&index).await;
}

/// A 400 KB item (DynamoDB's item limit; with both images its stream record is twice that)
/// goes whole to the cache, is dead-lettered by the search sink whose `max_document_bytes` it
/// exceeds (with the sizes in the reason), and the items after it still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_400_kb_item_is_delivered_where_it_fits_and_dead_lettered_where_it_does_not() {
    let _g = shared().await;
    let client = ddb().await;
    let table = unique("big");
    create_table(&client, &table, true).await;
    let p = format!("{}:", unique("db4"));
    let index = unique("ddbbig").to_lowercase();
    let ws = Workspace::new();
    ws.write_config(&format!(
        "{}\n[sinks.search]\nkind = \"search\"\nurl = \"{}\"\nmax_document_bytes = \"256KiB\"\n",
        config(&table, "", None),
        crate::support::search::url()
    ));
    ws.write_pipeline(
        "profiles",
        &format!(
            "source = \"ddb\"\n[match]\nrelations = [\"*\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{p}{{{{ key.user_id }}}}\"\nformat = \"json\"\n[[sink]]\ntarget = \"search\"\nindex = \"{index}\"\nid = \"{{{{ key.user_id }}}}\"\n"
        ),
    );
    let d = InProcess::start(&ws.config_path());
    // 399,000 bytes of attribute value: with the key and names the item is just under 400 KB.
    let blob = "b".repeat(399_000);
    put(&client, &table, item("big", &[("blob", AttributeValue::S(blob.clone()))])).await;
    client
        .update_item()
        .table_name(&table)
        .key("user_id", AttributeValue::S("big".into()))
        .update_expression("SET tag = :t")
        .expression_attribute_values(":t", AttributeValue::S("second".into()))
        .send()
        .await
        .unwrap();
    put(&client, &table, item("after", &[("n", AttributeValue::N("1".into()))])).await;
    let redis = TestRedis::connect().await;
    wait_for("the item after the big one, and the big one's update", WAIT, || async {
        redis.exists(&format!("{p}after")).await
            && redis.get(&format!("{p}big")).await.is_some_and(|v| v.contains("\"second\""))
    })
    .await;
    let cached: serde_json::Value = serde_json::from_str(&redis.get(&format!("{p}big")).await.unwrap()).unwrap();
    assert_eq!(cached["blob"].as_str().map(str::len), Some(399_000), "the cache holds the whole item");
    assert_eq!(cached["tag"], "second");
    wait_for("both changes of the big item dead-lettered by search", WAIT, || async {
        ws.dead_letters().iter().filter(|l| l.sink == "search").count() == 2
    })
    .await;
    for l in ws.dead_letters() {
        assert_eq!(l.sink, "search", "{l:?}");
        assert!(l.reason.contains("over max_document_bytes"), "{}", l.reason);
        assert_eq!(l.change.key_display(), "user_id=big");
    }
    wait_for("the item after the big one in the index", WAIT, || async {
        crate::support::search::doc(&index, "after").await.is_some()
    })
    .await;
    assert!(crate::support::search::doc(&index, "big").await.is_none());
    d.stop().await.unwrap();
    crate::support::search::delete_index(&index).await;
}

/// `polysync snapshot --pipeline P --wait` for a DynamoDB pipeline, as a user runs it: the
/// running daemon backfills the table through the pipeline, the command shows the outcome, and
/// `polysync status` shows the finished backfill. Options that do not apply are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_command_backfills_a_dynamodb_pipeline_and_waits_for_it() {
    let _g = shared().await;
    let client = ddb().await;
    let table = unique("cliback");
    create_table(&client, &table, true).await;
    for i in 0..300 {
        put(&client, &table, item(&format!("u{i}"), &[("n", AttributeValue::N(i.to_string()))])).await;
    }
    let p = format!("{}:", unique("cb"));
    let ws = Workspace::new();
    // LATEST: the puts above are not in what the stream delivers; only the backfill has them.
    ws.write_config(&config(&table, "start = \"latest\"\nbackfill_segments = 2", None));
    ws.write_pipeline(
        "profiles",
        &format!(
            "source = \"ddb\"\n[match]\nrelations = [\"*\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{p}{{{{ key.user_id }}}}\"\nformat = \"json\"\n"
        ),
    );
    let d = InProcess::start(&ws.config_path());
    let config_path = ws.config_path();
    let cli = move |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_polysync"));
        cmd.args(args).arg("--config").arg(&config_path);
        cmd
    };
    let refused = cli(&["snapshot", "--pipeline", "profiles", "--where", "n > 3"]).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--table and --where do not apply"));
    let wait = cli.clone();
    let out =
        tokio::task::spawn_blocking(move || wait(&["snapshot", "--pipeline", "profiles", "--wait"]).output().unwrap())
            .await
            .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("done") && stdout.contains("300 rows"), "{stdout}");
    let redis = TestRedis::connect().await;
    for i in [0, 150, 299] {
        assert!(redis.get(&format!("{p}u{i}")).await.is_some(), "item u{i} backfilled into the cache");
    }
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_polysync"))
        .args(["status", "--config"])
        .arg(ws.config_path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&status.stdout).contains("done"), "{}", String::from_utf8_lossy(&status.stdout));
    d.stop().await.unwrap();
}

/// A backfill row delayed by backpressure never brings back an item deleted while it waited.
/// The search index forgets tombstones at once here (`index.gc_deletes = 0s`, what 60 s of the
/// default look like to a slow sink), the sink is slowed down (a delaying TCP proxy, named as
/// such), and items are deleted while the scan's rows are being handed over. Every item the
/// table lacks is absent from the index, and every other one equals the table. (With the scan
/// fence turned off, 85 of the 200 deleted items came back in this test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backfill_delayed_by_a_slow_sink_never_resurrects_an_item_deleted_during_the_scan() {
    let _g = shared().await;
    let client = ddb().await;
    let table = unique("fence");
    create_table(&client, &table, true).await;
    const ITEMS: usize = 400;
    for chunk in (0..ITEMS).collect::<Vec<_>>().chunks(25) {
        let reqs = chunk
            .iter()
            .map(|i| {
                let it = item(
                    &format!("u{i:03}"),
                    &[("n", AttributeValue::N(i.to_string())), ("name", AttributeValue::S(format!("user {i}")))],
                );
                aws_sdk_dynamodb::types::WriteRequest::builder()
                    .put_request(aws_sdk_dynamodb::types::PutRequest::builder().set_item(Some(it)).build().unwrap())
                    .build()
            })
            .collect::<Vec<_>>();
        client.batch_write_item().request_items(&table, reqs).send().await.unwrap();
    }
    let index = unique("fence-idx").to_lowercase();
    let (status, body) = crate::support::search::call(
        "PUT",
        &format!("/{index}"),
        Some(r#"{"settings": {"index": {"gc_deletes": "0s", "number_of_replicas": 0}}}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The puts are before the first start (second-resolution creation times): only the scan
    // has them, and the stream carries nothing but the deletes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let slow = crate::support::proxy::Proxy::start(&crate::support::search::addr()).await;
    slow.set_delay(Duration::from_millis(800));
    let ws = Workspace::new();
    let extra = format!(
        "start = \"latest\"\nbackfill_segments = 2\n[sinks.search]\nkind = \"search\"\nurl = \"http://{}\"\nlinger = \"2ms\"\n",
        slow.addr
    );
    // Backpressure holds rows in the source's window (no spilling to the spool, which would
    // free it), 16 changes at a time.
    ws.write_config(&config(&table, &extra, None).replace(
        "shutdown_timeout = \"15s\"",
        "shutdown_timeout = \"15s\"\nmax_in_flight = 16\nspill_after = \"10m\"",
    ));
    ws.write_pipeline(
        "profiles",
        &format!(
            "source = \"ddb\"\nsnapshot = \"initial\"\n[match]\nrelations = [\"*\"]\n[[sink]]\ntarget = \"search\"\nindex = \"{index}\"\nid = \"{{{{ key.user_id }}}}\"\n"
        ),
    );
    let d = InProcess::start(&ws.config_path());
    let progress = ws.path().join("state/snapshot-ddb.json");
    let running = || {
        polysync::checkpoint::snapshot::SnapshotProgress::load(&progress)
            .is_ok_and(|p| p.tasks.iter().any(|t| t.state == polysync::checkpoint::snapshot::TaskState::Running))
    };
    wait_for("the backfill to start", WAIT, || async { running() }).await;
    // While its rows are handed over at the slow sink's pace: delete half the items, the ones
    // the scan reaches last first (moto scans in key order), so their deletes overtake them.
    let mut deleted = 0;
    for i in (0..ITEMS).rev().step_by(2) {
        client
            .delete_item()
            .table_name(&table)
            .key("user_id", AttributeValue::S(format!("u{i:03}")))
            .send()
            .await
            .unwrap();
        deleted += 1;
    }
    assert!(running(), "the deletes ran during the scan (make the sink slower if this fails)");
    wait_for("the backfill to finish", Duration::from_secs(180), || async {
        polysync::checkpoint::snapshot::SnapshotProgress::load(&progress)
            .is_ok_and(|p| p.tasks.len() == 1 && p.tasks[0].state == polysync::checkpoint::snapshot::TaskState::Done)
    })
    .await;
    slow.set_delay(Duration::ZERO);
    let expected: std::collections::BTreeMap<String, String> = table_docs(&client, &table)
        .await
        .into_iter()
        .map(|(k, v)| (k, v["n"].to_string().trim_matches('"').to_string()))
        .collect();
    assert_eq!(expected.len(), ITEMS - deleted);
    let mut last = String::new();
    let converged = async {
        for _ in 0..150 {
            crate::support::search::refresh(&index).await;
            let (_, hits) =
                crate::support::search::call("GET", &format!("/{index}/_search?size=1000&q=*:*"), None).await;
            let have: std::collections::BTreeMap<String, String> = hits["hits"]["hits"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|h| {
                            let n = h["_source"]["n"].to_string().trim_matches('"').to_string();
                            (h["_id"].as_str().unwrap().to_string(), n)
                        })
                        .collect()
                })
                .unwrap_or_default();
            if have == expected {
                return true;
            }
            let back: Vec<&String> = have.keys().filter(|k| !expected.contains_key(*k)).collect();
            last = format!(
                "{} docs, {} expected; resurrected: {:?}",
                have.len(),
                expected.len(),
                &back[..back.len().min(10)]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }
    .await;
    assert!(converged, "{last}");
    d.stop().await.unwrap();
    crate::support::search::delete_index(&index).await;
}

/// A lease moved for balance is handed over, never snatched: on the wire-level fake streams
/// endpoint (two open shards; moto has one), instance a reads both; instance b starts and asks
/// for one. a stops that shard's reader, lets what it read be applied and checkpointed, and only
/// then names b the owner; b resumes after a's checkpoint (AFTER_SEQUENCE_NUMBER), never
/// replaying what a may still have been applying. Leases stay renewed throughout (nothing
/// expires), and every record arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_balanced_lease_is_handed_over_after_the_old_owner_applied_what_it_read() {
    let _g = shared().await;
    let seq = |s: u32| format!("{:021}", s);
    let shard = |id: &str, from: u32| FakeShard {
        id: id.into(),
        parent: None,
        records: (from..from + 6).map(|i| (seq(i), format!("{id}-u{i}"))).collect(),
        closed: false,
    };
    let shards = vec![shard("shard-one", 100), shard("shard-two", 200)];
    let users: Vec<String> = shards.iter().flat_map(|s| s.records.iter().map(|r| r.1.clone())).collect();
    let (endpoint, fake) = fake_streams::serve(shards, Faults::default()).await;
    let (leases, p) = (unique("hleases"), unique("ho"));
    let redis = TestRedis::connect().await;
    for u in &users {
        redis.set(&format!("{p}:m:{u}"), "x").await;
    }
    let client = ddb().await;
    let spawn = |w: &str| {
        let ws = Workspace::new();
        let extra = format!(
            "endpoint_url = \"{endpoint}\"\n[sources.ddb.checkpoint]\nstore = \"dynamodb\"\ntable = \"{leases}\"\ncreate_table = true\nworker_id = \"{w}\"\nlease_duration = \"6s\"\nendpoint_url = \"{}\"\n",
            crate::support::aws::endpoint()
        );
        ws.write_config(&config(&fake.arn, &extra, None));
        ws.write_pipeline("markers", &markers_pipeline(&p));
        let d = ChildDaemon::spawn(&ws.config_path(), &ws.path().join("daemon.log"));
        (ws, d)
    };
    let (_wa, a) = spawn("a");
    wait_for("a reads both shards to their end", WAIT, || async {
        let mut all = true;
        for u in &users {
            all &= !redis.exists(&format!("{p}:m:{u}")).await;
        }
        let owners = lease_owner(&client, &leases).await;
        all && owners.len() == 2 && owners.values().all(|o| o.as_deref() == Some("a"))
    })
    .await;
    // Let a checkpoint what it applied.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b_started = std::time::Instant::now();
    let (_wb, b) = spawn("b");
    wait_for("one lease handed to b", WAIT, || async {
        let owners = lease_owner(&client, &leases).await;
        owners.values().filter(|o| o.as_deref() == Some("b")).count() == 1
            && owners.values().filter(|o| o.as_deref() == Some("a")).count() == 1
    })
    .await;
    let moved = lease_owner(&client, &leases).await.into_iter().find(|(_, o)| o.as_deref() == Some("b")).unwrap().0;
    let a_log = a.log_text();
    assert!(a_log.contains("another instance asked for this lease"), "{a_log}");
    assert!(a_log.contains("lease handed over after the shard's reader stopped"), "{a_log}");
    assert!(!a_log.contains("lease taken by another instance"), "never snatched:\n{a_log}");
    // b resumed from a's checkpoint of what a had applied, not from the shard's start.
    let after_b = || -> Vec<String> {
        fake.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.op == "GetShardIterator" && c.shard == moved && c.at > b_started)
            .map(|c| c.detail.clone())
            .collect()
    };
    wait_for("b to read the shard handed to it", WAIT, || async { !after_b().is_empty() }).await;
    let after_b = after_b();
    assert!(!after_b.is_empty() && after_b.iter().all(|k| k == "AFTER_SEQUENCE_NUMBER"), "{after_b:?}");
    assert!(a.terminate().await.success());
    assert!(b.terminate().await.success());
}

/// A restart after a downtime longer than the stream's 24 h retention, on the wire-level fake
/// streams endpoint (moto cannot age a stream): the shard polysync was reading has expired (the
/// stream no longer lists it and answers ResourceNotFound for it), and its child and a new
/// shard are there. The source does not stop: the expired shard is named as data lost
/// upstream, counted, marked finished and pruned from the shard map; its child and the new
/// shard are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_after_the_retention_names_the_expired_shard_prunes_it_and_reads_the_rest() {
    let _g = shared().await;
    let seq = |s: u32| format!("{:021}", s);
    let shard = |id: &str, parent: Option<&str>, from: u32, n: u32| FakeShard {
        id: id.into(),
        parent: parent.map(str::to_string),
        records: (from..from + n).map(|i| (seq(i), format!("{id}-u{i}"))).collect(),
        closed: false,
    };
    let before = vec![shard("shard-old", None, 100, 4)];
    let after = vec![shard("shard-child", Some("shard-old"), 200, 4), shard("shard-new", None, 300, 3)];
    let users =
        |s: &[FakeShard]| -> Vec<String> { s.iter().flat_map(|s| s.records.iter().map(|r| r.1.clone())).collect() };
    let (first_users, later_users) = (users(&before), users(&after));
    let (endpoint, fake) = fake_streams::serve(before, Faults::default()).await;
    let p = unique("ret");
    let redis = TestRedis::connect().await;
    for u in first_users.iter().chain(&later_users) {
        redis.set(&format!("{p}:m:{u}"), "x").await;
    }
    let port = free_port();
    let ws = Workspace::new();
    let write =
        |endpoint: &str| ws.write_config(&config(&fake.arn, &format!("endpoint_url = \"{endpoint}\""), Some(port)));
    write(&endpoint);
    ws.write_pipeline("markers", &markers_pipeline(&p));
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("the first run reads the old shard", WAIT, || async {
        let mut all = true;
        for u in &first_users {
            all &= !redis.exists(&format!("{p}:m:{u}")).await;
        }
        all
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(d.terminate().await.success());

    // A day later: the same stream, the old shard expired, its child and a new shard listed.
    let (endpoint2, _fake2) = fake_streams::serve(after, Faults::default()).await;
    write(&endpoint2);
    let mut d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("the child and the new shard read", WAIT, || async {
        let mut all = true;
        for u in &later_users {
            all &= !redis.exists(&format!("{p}:m:{u}")).await;
        }
        all
    })
    .await;
    assert!(d.child.try_wait().unwrap().is_none(), "the source keeps running:\n{}", d.log_text());
    let text = d.log_text();
    assert!(text.contains("DATA LOST UPSTREAM: shard expired") && text.contains("shard-old"), "{text}");
    let metrics = http_get(&format!("127.0.0.1:{port}"), "/metrics").await.expect("metrics").1;
    assert_eq!(metric_value(&metrics, "polysync_ddb_trimmed_data_total", &[("source", "ddb")]), 1.0, "{metrics}");
    // Discovery runs every 2 s here: the pruning follows the next one.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(d.terminate().await.success());
    let store =
        polysync::checkpoint::store::FileStore::open(&ws.path().join("state/checkpoints-ddb.redb")).expect("store");
    assert_eq!(store.load(&fake.arn, "shard-old").unwrap(), None, "the expired shard is pruned from the shard map");
    assert!(store.load(&fake.arn, "shard-child").unwrap().is_some(), "the child is kept");
}

/// Global tables: every replica's stream carries every region's writes. With
/// `only_writes_from`, records whose item names another origin are passed over (and counted);
/// records without the attribute are kept. Records shaped like a legacy global table's, which
/// carry `aws:rep:updateregion`, on the wire-level fake streams endpoint (moto has no global
/// tables).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_writes_from_keeps_this_regions_writes_of_a_global_table() {
    let _g = shared().await;
    let users = ["a@us-east-1", "b@eu-west-1", "c", "d@eu-west-1", "z@us-east-1"];
    let shards = vec![FakeShard {
        id: "shard-g".into(),
        parent: None,
        records: users.iter().enumerate().map(|(i, u)| (format!("{:021}", 500 + i), u.to_string())).collect(),
        closed: false,
    }];
    let (endpoint, fake) = fake_streams::serve(shards, Faults::default()).await;
    let p = unique("gt");
    let redis = TestRedis::connect().await;
    for u in users {
        redis.set(&format!("{p}:m:{u}"), "x").await;
    }
    let port = free_port();
    let ws = Workspace::new();
    ws.write_config(&config(
        &fake.arn,
        &format!(
            "endpoint_url = \"{endpoint}\"\nonly_writes_from = {{ attribute = \"aws:rep:updateregion\", value = \"us-east-1\" }}"
        ),
        Some(port),
    ));
    ws.write_pipeline("markers", &markers_pipeline(&p));
    let d = ChildDaemon::spawn(&ws.config_path(), &ws.path().join("daemon.log"));
    wait_for("the last local write", WAIT, || async { !redis.exists(&format!("{p}:m:z@us-east-1")).await }).await;
    assert!(!redis.exists(&format!("{p}:m:a@us-east-1")).await, "a local write is applied");
    assert!(!redis.exists(&format!("{p}:m:c")).await, "a write without the attribute is kept");
    for foreign in ["b@eu-west-1", "d@eu-west-1"] {
        assert!(redis.exists(&format!("{p}:m:{foreign}")).await, "{foreign} is another region's write");
    }
    let metrics = http_get(&format!("127.0.0.1:{port}"), "/metrics").await.expect("metrics").1;
    assert_eq!(metric_value(&metrics, "polysync_ddb_foreign_writes_skipped_total", &[("source", "ddb")]), 2.0);
    assert!(d.terminate().await.success());
}

/// With a lease table the instance asked to backfill may read no shard: the deletes made
/// during its scan are applied by the other instance, so the scan fence never sees them. Rows
/// that waited (a slow sink, here a delaying TCP proxy) longer than `backfill_recheck_after`
/// are read again before hand-over, so none brings back an item deleted meanwhile, even though
/// the index forgets tombstones after `index.gc_deletes` (8 s here, 60 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backfill_on_an_instance_that_reads_no_shard_never_resurrects_an_item_deleted_during_the_scan() {
    let _g = shared().await;
    let client = ddb().await;
    let table = unique("fence2");
    create_table(&client, &table, true).await;
    const ITEMS: usize = 300;
    for i in 0..ITEMS {
        let attrs = [("n", AttributeValue::N(i.to_string())), ("name", AttributeValue::S(format!("user {i}")))];
        put(&client, &table, item(&format!("u{i:03}"), &attrs)).await;
    }
    let index = unique("fence2-idx").to_lowercase();
    let (status, body) = crate::support::search::call(
        "PUT",
        &format!("/{index}"),
        Some(r#"{"settings": {"index": {"gc_deletes": "8s", "number_of_replicas": 0}}}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let leases = unique("fleases");
    let pipeline = format!(
        "name = \"profiles\"\nsource = \"ddb\"\n[match]\nrelations = [\"*\"]\n[[sink]]\ntarget = \"search\"\nindex = \"{index}\"\nid = \"{{{{ key.user_id }}}}\"\n"
    );
    let instance = |w: &str, search: &str| {
        let ws = Workspace::new();
        let extra = format!(
            "start = \"latest\"\nbackfill_segments = 1\nbackfill_recheck_after = \"2s\"\n[sources.ddb.checkpoint]\nstore = \"dynamodb\"\ntable = \"{leases}\"\ncreate_table = true\nworker_id = \"{w}\"\nlease_duration = \"3s\"\n[sinks.search]\nkind = \"search\"\nurl = \"{search}\"\nlinger = \"2ms\"\nbatch_size = 5\n"
        );
        ws.write_config(&config(&table, &extra, None).replace(
            "shutdown_timeout = \"15s\"",
            "shutdown_timeout = \"15s\"\nmax_in_flight = 16\nspill_after = \"10m\"",
        ));
        ws.write_pipeline("profiles", &pipeline);
        ws
    };
    // The owner of the (only) shard writes to the index directly …
    let owner_ws = instance("owner", &crate::support::search::url());
    let owner = ChildDaemon::spawn(&owner_ws.config_path(), &owner_ws.path().join("daemon.log"));
    let owner_log = owner_ws.path().join("daemon.log");
    let owned = tokio::time::timeout(WAIT, async {
        while !lease_owner(&client, &leases).await.into_values().flatten().any(|o| o == "owner") {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(owned.is_ok(), "the owner's lease: {}", std::fs::read_to_string(&owner_log).unwrap_or_default());
    // … the backfilling instance through a slow proxy.
    let slow = crate::support::proxy::Proxy::start(&crate::support::search::addr()).await;
    slow.set_delay(Duration::from_millis(300));
    let other_ws = instance("other", &format!("http://{}", slow.addr));
    let other = ChildDaemon::spawn(&other_ws.config_path(), &other_ws.path().join("daemon.log"));
    let config_path = other_ws.config_path();
    let request = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_polysync"))
            .args(["snapshot", "--pipeline", "profiles", "--wait", "--config"])
            .arg(&config_path)
            .output()
            .unwrap()
    });
    let progress = other_ws.path().join("state/snapshot-ddb.json");
    wait_for("the backfill to start", WAIT, || async {
        polysync::checkpoint::snapshot::SnapshotProgress::load(&progress)
            .is_ok_and(|p| p.tasks.iter().any(|t| t.state == polysync::checkpoint::snapshot::TaskState::Running))
    })
    .await;
    // Delete, last items first (the scan hands them over last), while the rows wait.
    let mut deleted = 0;
    for i in (0..ITEMS).rev().step_by(2) {
        client
            .delete_item()
            .table_name(&table)
            .key("user_id", AttributeValue::S(format!("u{i:03}")))
            .send()
            .await
            .unwrap();
        deleted += 1;
    }
    let out = request.await.unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        lease_owner(&client, &leases).await.into_values().flatten().all(|o| o == "owner"),
        "the backfilling instance read no shard"
    );
    slow.set_delay(Duration::ZERO);
    let expected: std::collections::BTreeSet<String> = table_docs(&client, &table).await.into_keys().collect();
    assert_eq!(expected.len(), ITEMS - deleted);
    let mut last = String::new();
    let mut converged = false;
    for _ in 0..150 {
        crate::support::search::refresh(&index).await;
        let (_, hits) = crate::support::search::call("GET", &format!("/{index}/_search?size=1000&q=*:*"), None).await;
        let have: std::collections::BTreeSet<String> = hits["hits"]["hits"]
            .as_array()
            .map(|a| a.iter().map(|h| h["_id"].as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        if have == expected {
            converged = true;
            break;
        }
        let back: Vec<&String> = have.difference(&expected).collect();
        last =
            format!("{} docs, {} expected; resurrected: {:?}", have.len(), expected.len(), &back[..back.len().min(10)]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(converged, "{last}");
    assert!(other.terminate().await.success());
    assert!(owner.terminate().await.success());
    crate::support::search::delete_index(&index).await;
}

/// `polysync check --online` on a DynamoDB source runs the start-up checks and creates nothing:
/// the stream and its view type, the shards, the lease table a first start would create (and,
/// once a daemon ran, its leases); a table without a stream and a stream whose view type lacks
/// the image a pipeline reads exit 2 with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_online_reads_the_stream_and_the_lease_table_and_creates_nothing() {
    let _g = shared().await;
    let client = ddb().await;
    let table = unique("online");
    create_table(&client, &table, true).await;
    let leases = unique("onleases");
    let lease = format!(
        "[sources.ddb.checkpoint]\nstore = \"dynamodb\"\ntable = \"{leases}\"\ncreate_table = true\nworker_id = \"w1\"\n"
    );
    let ws = Workspace::new();
    ws.write_config(&config(&table, &lease, None));
    ws.write_pipeline("markers", &markers_pipeline("on"));
    let (code, out) = check_online(&ws.config_path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("source ddb: stream arn:") && out.contains("is enabled (NEW_AND_OLD_IMAGES"), "{out}");
    assert!(out.contains("1 shards, 1 open"), "{out}");
    assert!(out.contains(&format!("lease table {leases} does not exist yet: the first start creates it")), "{out}");
    assert!(out.contains("sink cache: ") && out.contains("answers"), "{out}");
    assert!(
        client.describe_table().table_name(&leases).send().await.is_err(),
        "check --online created the lease table"
    );

    // After a run, the leases are reported.
    let d = InProcess::start(&ws.config_path());
    wait_for("the daemon to take the shard's lease", WAIT, || {
        let (client, leases) = (client.clone(), leases.clone());
        async move { !lease_owner(&client, &leases).await.is_empty() }
    })
    .await;
    d.stop().await.unwrap();
    let (code, out) = check_online(&ws.config_path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("lease table {leases}: 1 leases of this stream (0 finished)")), "{out}");

    // Without create_table, a missing lease table is what a start refuses.
    let ws = Workspace::new();
    ws.write_config(&config(&table, &lease.replace("create_table = true\n", "").replace(&leases, "nolease"), None));
    ws.write_pipeline("markers", &markers_pipeline("on"));
    let (code, out) = check_online(&ws.config_path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("lease table nolease does not exist") && out.contains("create_table = true"), "{out}");

    // A table without a stream, and a KEYS_ONLY stream for a pipeline reading the new image.
    let bare = unique("onbare");
    create_table(&client, &bare, false).await;
    let ws = Workspace::new();
    ws.write_config(&config(&bare, "", None));
    ws.write_pipeline("markers", &markers_pipeline("on"));
    let (code, out) = check_online(&ws.config_path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("has no stream") && out.contains(&bare), "{out}");
    let keys_only = unique("onkeys");
    create_table_with_view(&client, &keys_only, Some(StreamViewType::KeysOnly)).await;
    let ws = Workspace::new();
    ws.write_config(&config(&keys_only, "", None));
    ws.write_pipeline(
        "names",
        "source = \"ddb\"\n[match]\nrelations = [\"*\"]\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"n:{{ after.name }}\"]\n",
    );
    let (code, out) = check_online(&ws.config_path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("KEYS_ONLY") && out.contains("NEW_AND_OLD_IMAGES"), "{out}");
}
