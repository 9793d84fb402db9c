//! PostgreSQL → time series: InfluxDB (real server) with exact escaping, partial-write errors
//! dead-lettered; Timestream through the moto emulator (seen by a wire-level recorder) and a
//! wire-level stand-in for the rejections moto never produces.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::support::aws::{recording_proxy, require_env};
use crate::support::daemon::{InProcess, pg_cache_config, pg_cache_config_with};
use crate::support::pg::TestDb;
use crate::support::{Workspace, shared, unique};

const WAIT: Duration = Duration::from_secs(90);

fn influx_url() -> String {
    std::env::var("POLYSYNC_TEST_INFLUX").unwrap_or_else(|_| "http://127.0.0.1:58086".into())
}

async fn influx_query(db: &str, q: &str) -> serde_json::Value {
    let url = format!(
        "{}/query?db={}&epoch=u&q={}",
        influx_url(),
        db,
        url::form_urlencoded::byte_serialize(q.as_bytes()).collect::<String>()
    );
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

async fn influx_write(db: &str, body: String) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{}/write?db={db}&precision=u", influx_url()))
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn create_db(db: &str) {
    let q = format!("CREATE DATABASE \"{db}\"");
    reqwest::Client::new()
        .post(format!(
            "{}/query?q={}",
            influx_url(),
            url::form_urlencoded::byte_serialize(q.as_bytes()).collect::<String>()
        ))
        .send()
        .await
        .unwrap();
}

fn influx_sink(db: &str) -> String {
    format!(
        "\n[sinks.metrics]\nkind = \"timeseries\"\nengine = \"influxdb\"\nurl = \"{}\"\ndatabase = \"{db}\"\ncreate_database = true\nlinger = \"2ms\"\n",
        influx_url()
    )
}

const ORDERS: &str = "CREATE TABLE orders (id bigint PRIMARY KEY, region text NOT NULL, total numeric(12,2) NOT NULL,
    status text NOT NULL, paid bool NOT NULL DEFAULT false, created_at timestamptz NOT NULL)";

fn order_metrics(measure_prefix: &str) -> String {
    format!(
        r#"source = "db"
[match]
relations = ["public.orders"]
[[sink]]
target = "metrics"
[[sink.point]]
measurement = "{measure_prefix}order value"
ops = ["insert"]
time = "after.created_at"
tags = {{ region = "{{{{ after.region }}}}" }}
fields = {{ total = {{ path = "after.total", type = "double" }}, status = "after.status", paid = "after.paid", id = "after.id" }}
[[sink.point]]
measurement = "{measure_prefix}orders_total"
ops = ["insert"]
time = "after.created_at"
tags = {{ region = "{{{{ after.region }}}}" }}
fields = {{ count = {{ value = "1", type = "bigint" }} }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn influxdb_points_hold_exact_values_and_escaped_names_round_trip() {
    let _g = crate::support::shared().await;
    let db = TestDb::create("influx").await;
    db.exec(ORDERS).await;
    let influx_db = unique("ts");
    let slot = unique("s");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, &influx_sink(&influx_db)));
    ws.write_pipeline("orders", &order_metrics("m,="));
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    let tricky_region = r#"eu west,1=x "q" ünï😀"#;
    db.client
        .execute(
            "INSERT INTO orders VALUES (1, $1, 12345678.91, 'placed \"now\", ok', true, '2026-01-02 03:04:05.123456+00'),
                                       (2, 'us', 0.10, 'placed', false, '2026-01-02 03:04:06+00')",
            &[&tricky_region],
        )
        .await
        .unwrap();
    db.exec("UPDATE orders SET status = 'paid' WHERE id = 2").await; // no point for updates
    db.wait_caught_up(&slot, WAIT).await;

    let r = influx_query(&influx_db, r#"SELECT * FROM "m,=order value" GROUP BY * ORDER BY time"#).await;
    let series = r["results"][0]["series"].as_array().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(series.len(), 2);
    let s1 = series.iter().find(|s| s["tags"]["region"] == tricky_region).unwrap_or_else(|| panic!("{r}"));
    assert_eq!(s1["name"], "m,=order value");
    let cols: Vec<&str> = s1["columns"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let row = &s1["values"][0];
    let col = |n: &str| &row[cols.iter().position(|c| *c == n).unwrap()];
    assert_eq!(col("time"), &json!(1_767_323_045_123_456i64), "microsecond time from created_at");
    assert_eq!(col("total"), &json!(12345678.91));
    assert_eq!(col("status"), "placed \"now\", ok");
    assert_eq!(col("paid"), &json!(true));
    assert_eq!(col("id"), &json!(1));
    let counts = influx_query(&influx_db, r#"SELECT sum("count") FROM "m,=orders_total""#).await;
    assert_eq!(counts["results"][0]["series"][0]["values"][0][1], 2, "two orders counted: {counts}");
    assert!(ws.dead_letters().is_empty());
    d.stop().await.unwrap();
    db.cleanup().await;
}

/// Many orders in one transaction share `created_at = now()` and their tags: each is its own
/// point (the change's index in the transaction is the time's sub-microsecond part), so the
/// shipped `pipelines/order-metrics.toml` counts every order, and a replay of the same
/// changes lands on the same points instead of counting them twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orders_written_in_one_transaction_are_each_counted_by_the_shipped_pipeline() {
    let _g = crate::support::shared().await;
    let db = TestDb::create("influxtx").await;
    db.exec(ORDERS).await;
    let influx_db = unique("tstx");
    let (slot, replay_slot) = (unique("s"), unique("r"));
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, &influx_sink(&influx_db)));
    let shipped = std::fs::read_to_string(crate::support::repo().join("pipelines/order-metrics.toml")).unwrap();
    ws.write_pipeline("order-metrics", &shipped.replace("source = \"shop\"", "source = \"db\""));
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    db.exec(&format!("SELECT pg_create_logical_replication_slot('{replay_slot}', 'pgoutput')")).await;
    db.exec("INSERT INTO orders SELECT i, 'eu', 10, 'placed', false, now() FROM generate_series(1, 300) i").await;
    db.exec("INSERT INTO orders SELECT i, 'eu', 10, 'placed', false, now() FROM generate_series(301, 310) i").await;
    db.wait_caught_up(&slot, WAIT).await;
    let sum = |q: &'static str| {
        let influx_db = influx_db.clone();
        async move { influx_query(&influx_db, q).await["results"][0]["series"][0]["values"][0][1].clone() }
    };
    assert_eq!(sum(r#"SELECT sum("count") FROM "orders_total""#).await, json!(310), "every order counted");
    assert_eq!(sum(r#"SELECT count("total") FROM "order_value""#).await, json!(310), "a value point per order");
    d.stop().await.unwrap();
    // The same changes again from an older slot: the same points, not new ones.
    let ws2 = Workspace::new();
    ws2.write_config(&pg_cache_config_with(&db.url, &replay_slot, &slot, "", &influx_sink(&influx_db)));
    ws2.write_pipeline("order-metrics", &shipped.replace("source = \"shop\"", "source = \"db\""));
    let d = InProcess::start(&ws2.config_path());
    db.wait_caught_up(&replay_slot, WAIT).await;
    d.stop().await.unwrap();
    assert_eq!(sum(r#"SELECT sum("count") FROM "orders_total""#).await, json!(310), "a replay counts nothing twice");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_field_type_conflict_is_dead_lettered_with_influxdbs_message_and_the_rest_is_written() {
    // The outcome does not depend on batching: split or not, "thirty" meets an integer field.
    let _g = crate::support::shared().await;
    let db = TestDb::create("influxc").await;
    db.exec("CREATE TABLE readings (id bigint PRIMARY KEY, v text NOT NULL)").await;
    let influx_db = unique("tc");
    let slot = unique("s");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, &influx_sink(&influx_db)).replace("lanes = 4", "lanes = 1"));
    ws.write_pipeline(
        "readings",
        r#"source = "db"
# Numeric text becomes an integer field; anything else stays text: a type conflict.
transform = '.after.v = to_int(.after.v) ?? .after.v'
[match]
relations = ["public.readings"]
[[sink]]
target = "metrics"
[[sink.point]]
measurement = "conflict"
tags = { id = "{{ key.id }}" }
fields = { v = "after.v" }
"#,
    );
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO readings VALUES (1, '10')").await;
    db.wait_caught_up(&slot, WAIT).await;
    db.exec("INSERT INTO readings VALUES (2, '20'), (3, 'thirty'), (4, '40')").await;
    db.wait_caught_up(&slot, WAIT).await;
    let r = influx_query(&influx_db, "SELECT v FROM conflict GROUP BY id").await;
    let ids: Vec<&str> =
        r["results"][0]["series"].as_array().unwrap().iter().map(|s| s["tags"]["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["1", "2", "4"], "the rest of the batch is written: {r}");
    let dl = ws.dead_letters();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].change.key_display(), "id=3");
    assert!(
        dl[0].reason.contains("field type conflict") && dl[0].reason.contains("already exists as type integer"),
        "{}",
        dl[0].reason
    );
    d.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anything_the_encoder_writes_influxdb_parses_back_exactly() {
    let _g = crate::support::shared().await;
    use polysync::sink::timeseries::lineproto::{FieldValue, encode_line};
    let influx_db = unique("tp");
    create_db(&influx_db).await;
    let alphabet: Vec<char> = "ab ,=\"\\'ü€😀\t{}[]#:x1-_.".chars().collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let gen_name = |rng: &mut rand::rngs::StdRng| -> String {
        let n = rng.random_range(1..12);
        (0..n).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect()
    };
    let mut expected = Vec::new();
    let mut body = String::new();
    let mut refused = 0;
    for i in 0..300i64 {
        let (m, tk, tv, fk, sv) =
            (gen_name(&mut rng), gen_name(&mut rng), gen_name(&mut rng), gen_name(&mut rng), gen_name(&mut rng));
        let tags = vec![("k".to_string(), format!("{i}")), (format!("t{tk}"), tv.clone())];
        let fields = vec![(format!("f{fk}"), FieldValue::Str(sv.clone())), ("n".to_string(), FieldValue::Integer(i))];
        let mut line = String::new();
        match encode_line(&mut line, &format!("m{m}"), &tags, &fields, 1_000_000 + i) {
            Ok(()) => {
                body.push_str(&line);
                body.push('\n');
                expected.push((format!("m{m}"), i, format!("t{tk}"), tv, format!("f{fk}"), sv));
            }
            Err(_) => refused += 1, // e.g. a tag value ending in a backslash
        }
    }
    let (status, text) = influx_write(&influx_db, body).await;
    assert_eq!(status, 204, "{text}");
    // Read everything back in one query (no InfluxQL quoting of the odd names involved).
    let r = influx_query(&influx_db, "SELECT * FROM /.*/ GROUP BY *").await;
    let series = r["results"][0]["series"].as_array().unwrap_or_else(|| panic!("{r}"));
    for (m, i, tk, tv, fk, sv) in &expected {
        let s = series
            .iter()
            .find(|s| s["tags"]["k"] == json!(i.to_string()))
            .unwrap_or_else(|| panic!("point {i} ({m:?}) not found"));
        assert_eq!(s["name"], json!(m), "measurement {m:?}");
        assert_eq!(s["tags"][tk.as_str()], json!(tv), "tag {tk:?}");
        let cols: Vec<&str> = s["columns"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        let at = cols.iter().position(|c| c == fk).unwrap_or_else(|| panic!("field {fk:?} not among {cols:?}"));
        let row = s["values"].as_array().unwrap().iter().find(|row| !row[at].is_null()).unwrap();
        assert_eq!(row[at], json!(sv), "field {fk:?}");
    }
    // Refusals are the unrepresentable names (tabs, a backslash before an escaped character).
    assert!(expected.len() >= 60 && refused > 0, "accepted {}, refused {refused}", expected.len());
}

async fn timestream_setup(db: &str, table: &str) -> aws_sdk_timestreamwrite::Client {
    let client = aws_sdk_timestreamwrite::Client::new(&crate::support::aws::sdk().await);
    let _ = client.create_database().database_name(db).send().await;
    let _ = client.create_table().database_name(db).table_name(table).send().await;
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timestream_records_carry_dimensions_measures_types_times_and_versions_100_per_call() {
    let _g = shared().await;
    require_env();
    let db = TestDb::create("tstream").await;
    db.exec(ORDERS).await;
    let tsdb = unique("tsdb");
    timestream_setup(&tsdb, "orders").await;
    let (proxy, seen) = recording_proxy(crate::support::aws::endpoint()).await;
    let slot = unique("s");
    let replay_slot = format!("{slot}_replay");
    let ws = Workspace::new();
    let sink = format!(
        "\n[aws]\nendpoint_url = \"{proxy}\"\n\n[sinks.metrics]\nkind = \"timeseries\"\nengine = \"timestream\"\ndatabase = \"{tsdb}\"\ntable = \"orders\"\nlinger = \"200ms\"\n"
    );
    ws.write_config(&pg_cache_config(&db.url, &slot, &sink).replace("lanes = 4", "lanes = 1"));
    ws.write_pipeline("orders", &order_metrics(""));
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    db.exec(&format!("SELECT pg_create_logical_replication_slot('{replay_slot}', 'pgoutput')")).await;
    // 75 orders → 150 points (value + count) in one transaction → 2 WriteRecords calls.
    db.exec("INSERT INTO orders SELECT i, 'eu', i + 0.25, 'placed', i % 2 = 0, '2026-01-02 03:04:05+00'::timestamptz + i * interval '1 ms' FROM generate_series(1, 75) i").await;
    db.wait_caught_up(&slot, WAIT).await;
    let calls: Vec<_> = seen.lock().unwrap().iter().filter(|s| s.target.ends_with("WriteRecords")).cloned().collect();
    assert_eq!(calls.len(), 2, "150 records go out as 2 calls");
    let sizes: Vec<usize> = calls.iter().map(|c| c.body["Records"].as_array().unwrap().len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 150);
    assert!(sizes.iter().all(|n| *n <= 100));
    assert!(calls.iter().all(|c| c.status == 200), "the emulator accepted every call");
    let first = &calls[0].body;
    assert_eq!(first["DatabaseName"], json!(tsdb));
    assert_eq!(
        first["CommonAttributes"]["Dimensions"],
        json!([{"Name": "region", "Value": "eu", "DimensionValueType": "VARCHAR"}])
    );
    let value_rec = first["Records"].as_array().unwrap().iter().find(|r| r["MeasureName"] == "order value").unwrap();
    assert_eq!(value_rec["MeasureValueType"], "MULTI");
    assert_eq!(value_rec["TimeUnit"], "NANOSECONDS");
    let measures = value_rec["MeasureValues"].as_array().unwrap();
    let m = |n: &str| measures.iter().find(|v| v["Name"] == n).unwrap();
    assert_eq!(m("total")["Type"], "DOUBLE");
    assert_eq!(m("paid")["Type"], "BOOLEAN");
    assert_eq!(m("status")["Type"], "VARCHAR");
    assert_eq!(m("id")["Type"], "BIGINT");
    let total: f64 = m("total")["Value"].as_str().unwrap().parse().unwrap();
    let id: i64 = m("id")["Value"].as_str().unwrap().parse().unwrap();
    assert_eq!(total, id as f64 + 0.25, "exact digits");
    // created_at in nanoseconds, plus the change's index in its transaction (id − 1 here).
    assert_eq!(
        value_rec["Time"].as_str().unwrap().parse::<i64>().unwrap(),
        (1_767_323_045_000_000 + id * 1000) * 1000 + (id - 1)
    );
    let version = value_rec["Version"].as_i64().unwrap();
    assert!(version > 0);
    d.stop().await.unwrap();

    // Replay from the older slot: same versions, and not an error.
    let ws2 = Workspace::new();
    ws2.write_config(&pg_cache_config_with(&db.url, &replay_slot, &slot, "", &sink).replace("lanes = 4", "lanes = 1"));
    ws2.write_pipeline("orders", &order_metrics(""));
    let before = seen.lock().unwrap().len();
    let d = InProcess::start(&ws2.config_path());
    db.wait_caught_up(&replay_slot, WAIT).await;
    let replayed: Vec<_> =
        seen.lock().unwrap()[before..].iter().filter(|s| s.target.ends_with("WriteRecords")).cloned().collect();
    assert!(!replayed.is_empty());
    assert!(replayed.iter().all(|c| c.status == 200));
    assert!(
        replayed.iter().any(|c| c.body["Records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["Version"].as_i64() == Some(version)))
    );
    assert!(ws2.dead_letters().is_empty(), "a replay with the same version is not an error");
    d.stop().await.unwrap();
    db.cleanup().await;
}

/// A wire-level stand-in for Timestream's RejectedRecordsException (moto never rejects): the
/// first record of every call "already exists with a newer version", the second is "outside
/// the retention window".
async fn rejecting_timestream() -> String {
    let app = axum::Router::new().fallback(|headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
        let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if target.ends_with("WriteRecords") {
            let n = req["Records"].as_array().map(|a| a.len()).unwrap_or(0);
            let mut rejected = vec![json!({"RecordIndex": 0, "Reason": "The record version is lower than the existing version", "ExistingVersion": i64::MAX})];
            if n > 1 {
                rejected.push(json!({"RecordIndex": 1, "Reason": "The record timestamp is outside the time range [2026-01-01, 2026-01-02) of the memory store."}));
            }
            let body = json!({"__type": "com.amazonaws.timestream.v20181101#RejectedRecordsException", "message": "One or more records have been rejected.", "RejectedRecords": rejected});
            (axum::http::StatusCode::BAD_REQUEST, [("content-type", "application/x-amz-json-1.0"), ("x-amzn-errortype", "RejectedRecordsException")], body.to_string())
        } else {
            (axum::http::StatusCode::OK, [("content-type", "application/x-amz-json-1.0"), ("x-amzn-errortype", "")], "{}".to_string())
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timestream_rejections_newer_version_is_success_others_are_dead_lettered() {
    // Alone: the expected outcome depends on the three changes sharing one batch (linger),
    // which CPU contention from parallel tests can split.
    let _g = crate::support::exclusive().await;
    require_env();
    let db = TestDb::create("tsrej").await;
    db.exec(ORDERS).await;
    let fake = rejecting_timestream().await;
    let slot = unique("s");
    let ws = Workspace::new();
    let sink = format!(
        "\n[aws]\nendpoint_url = \"{fake}\"\n\n[sinks.metrics]\nkind = \"timeseries\"\nengine = \"timestream\"\ndatabase = \"db\"\ntable = \"orders\"\nlinger = \"200ms\"\n"
    );
    ws.write_config(&pg_cache_config(&db.url, &slot, &sink).replace("lanes = 4", "lanes = 1"));
    ws.write_pipeline(
        "orders",
        r#"source = "db"
[match]
relations = ["public.orders"]
[[sink]]
target = "metrics"
[[sink.point]]
measurement = "order_value"
time = "after.created_at"
fields = { value = "after.total" }
"#,
    );
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO orders VALUES (1, 'eu', 1.00, 'placed', false, now()), (2, 'eu', 2.00, 'placed', false, now()), (3, 'eu', 3.00, 'placed', false, now())").await;
    db.wait_caught_up(&slot, WAIT).await;
    let dl = ws.dead_letters();
    assert_eq!(dl.len(), 1, "{:?}", dl.iter().map(|d| &d.reason).collect::<Vec<_>>());
    assert_eq!(dl[0].change.key_display(), "id=2");
    assert!(dl[0].reason.contains("outside the time range"), "{}", dl[0].reason);
    d.stop().await.unwrap();
    db.cleanup().await;
}

/// A Timestream database or table that does not exist is found at start (and by `polysync
/// check --online`), refused with the fix; with `create_database` and `create_table` a start
/// creates both (a dry run creates nothing) and the points are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_timestream_database_or_table_is_refused_with_the_fix_or_created_where_configured() {
    let _g = shared().await;
    require_env();
    let db = TestDb::create("tstarget").await;
    db.exec(ORDERS).await;
    let client = aws_sdk_timestreamwrite::Client::new(&crate::support::aws::sdk().await);
    let tsdb = unique("tsnew");
    let slot = unique("s");
    let ws = Workspace::new();
    let sink = |extra: &str| {
        format!(
            "\n[aws]\nendpoint_url = \"{}\"\n\n[sinks.metrics]\nkind = \"timeseries\"\nengine = \"timestream\"\ndatabase = \"{tsdb}\"\ntable = \"orders\"\nlinger = \"100ms\"\n{extra}",
            crate::support::aws::endpoint()
        )
    };
    ws.write_pipeline("orders", &order_metrics(""));
    ws.write_config(&pg_cache_config(&db.url, &slot, &sink("")));
    let (code, out) = crate::support::check_online(&ws.config_path());
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("Timestream database \"{tsdb}\" does not exist"))
            && out.contains("create_database = true"),
        "{out}"
    );
    // The start refuses the same way (no write is tried and retried).
    let d = InProcess::start(&ws.config_path());
    let err = tokio::time::timeout(WAIT, d.result()).await.expect("a refusal").expect_err("a refusal").to_string();
    assert!(err.contains("sink metrics") && err.contains("does not exist"), "{err}");

    client.create_database().database_name(&tsdb).send().await.unwrap();
    let (code, out) = crate::support::check_online(&ws.config_path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("Timestream table \"orders\" does not exist") && out.contains("create_table = true"), "{out}");

    // Created where configured: not by the dry run, by the start.
    let other = unique("tsmade");
    ws.write_config(&pg_cache_config(
        &db.url,
        &slot,
        &sink("create_database = true\ncreate_table = true\n").replace(&tsdb, &other),
    ));
    let (code, out) = crate::support::check_online(&ws.config_path());
    assert_eq!(code, 0, "{out}");
    assert!(client.describe_database().database_name(&other).send().await.is_err(), "the dry run created nothing");
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    client
        .describe_table()
        .database_name(&other)
        .table_name("orders")
        .send()
        .await
        .expect("the start created the table");
    db.exec("INSERT INTO orders VALUES (1, 'eu', 2.5, 'placed', true, now())").await;
    db.wait_caught_up(&slot, WAIT).await;
    assert!(ws.dead_letters().is_empty(), "{:?}", ws.dead_letters());
    d.stop().await.unwrap();
    db.cleanup().await;
}
