//! Bad input gets one clear line naming the file/line or the object, and a refusal
//! (`check` exits non-zero, `run` does not start) or a dead-letter entry; never a panic or a
//! silent drop.

use std::process::Command;
use std::time::Duration;

use crate::support::daemon::{InProcess, pg_cache_config, pg_cache_config_with};
use crate::support::pg::TestDb;
use crate::support::redis::TestRedis;
use crate::support::{Workspace, check_online, shared, unique, wait_for};

fn check(ws: &Workspace) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_polysync"))
        .args(["check", "--config"])
        .arg(ws.config_path())
        .output()
        .expect("run polysync check");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout))
}

const GOOD_SINK: &str = r#"
[[sink]]
target = "cache"
action = "invalidate"
keys = ["t:{{ key.id }}"]
"#;

#[test]
fn check_names_file_line_and_column_for_each_mistake() {
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config("postgres://u:p@127.0.0.1:1/db", "s", ""));

    // TOML syntax error on line 3.
    ws.write_pipeline("broken", "source = \"db\"\n[match]\nrelations = [\"public.t\"\n");
    let (ok, err) = check(&ws);
    assert!(!ok);
    assert!(err.contains("broken.toml:4:") || err.contains("broken.toml:3:"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    ws.remove_pipeline("broken");

    // Unknown sink target, on line 6.
    ws.write_pipeline(
        "nosink",
        "source = \"db\"\n[match]\nrelations = [\"public.t\"]\n[[sink]]\naction = \"invalidate\"\ntarget = \"nope\"\nkeys = [\"k\"]\n",
    );
    let (ok, err) = check(&ws);
    assert!(!ok);
    assert!(err.contains("nosink.toml:6:") && err.contains("unknown sink target \"nope\""), "{err}");
    ws.remove_pipeline("nosink");

    // Unknown source.
    ws.write_pipeline("nosource", &format!("source = \"elsewhere\"\n[match]\nrelations = [\"public.t\"]\n{GOOD_SINK}"));
    let (ok, err) = check(&ws);
    assert!(!ok);
    assert!(err.contains("nosource.toml:1:") && err.contains("unknown source \"elsewhere\""), "{err}");
    ws.remove_pipeline("nosource");

    // A template naming something that is not a field root, on line 8.
    ws.write_pipeline(
        "badtemplate",
        "source = \"db\"\n[match]\nrelations = [\"public.t\"]\n\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"cart:{{ aftr.user_id }}\"]\n",
    );
    let (ok, err) = check(&ws);
    assert!(!ok);
    assert!(err.contains("badtemplate.toml:8:") && err.contains("unknown template root \"aftr\""), "{err}");
    ws.remove_pipeline("badtemplate");

    // Unknown op and unknown field.
    ws.write_pipeline(
        "badop",
        &format!("source = \"db\"\n[match]\nrelations = [\"public.t\"]\nops = [\"upsert\"]\n{GOOD_SINK}"),
    );
    let (ok, err) = check(&ws);
    assert!(!ok && err.contains("badop.toml:4:") && err.contains("unknown op \"upsert\""), "{err}");
    ws.remove_pipeline("badop");
    ws.write_pipeline(
        "extra",
        &format!("source = \"db\"\nsorce = 1\n[match]\nrelations = [\"public.t\"]\n{GOOD_SINK}"),
    );
    let (ok, err) = check(&ws);
    assert!(!ok && err.contains("extra.toml:2:") && err.contains("sorce"), "{err}");
    ws.remove_pipeline("extra");

    // Messages that say what was expected: a list where one key goes, a time-series type.
    ws.write_pipeline(
        "keylist",
        "source = \"db\"\n[match]\nrelations = [\"public.t\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = [\"a:{{ key.id }}\", \"b\"]\n",
    );
    let (ok, err) = check(&ws);
    assert!(!ok && err.contains("keylist.toml:7:") && err.contains("keys = [...]"), "{err}");
    ws.remove_pipeline("keylist");
    ws.write_config(&pg_cache_config(
        "postgres://u:p@127.0.0.1:1/db",
        "s",
        "[sinks.metrics]\nkind = \"timeseries\"\nengine = \"influxdb\"\nurl = \"http://127.0.0.1:1\"\ndatabase = \"x\"\n",
    ));
    ws.write_pipeline(
        "floattype",
        "source = \"db\"\n[match]\nrelations = [\"public.t\"]\n[[sink]]\ntarget = \"metrics\"\n[[sink.point]]\nmeasurement = \"m\"\nfields = { v = { path = \"after.v\", type = \"float\" } }\n",
    );
    let (ok, err) = check(&ws);
    assert!(!ok && err.contains("type \"float\" is not one of double") && err.contains("a float is `double`"), "{err}");
    ws.remove_pipeline("floattype");

    // A filter that can never be a boolean is found offline.
    ws.write_pipeline(
        "nonbool",
        &format!("source = \"db\"\nfilter = 'upcase(\"keep\")'\n[match]\nrelations = [\"public.t\"]\n{GOOD_SINK}"),
    );
    let (ok, err) = check(&ws);
    assert!(!ok && err.contains("nonbool.toml:2:") && err.contains("a filter must return a boolean"), "{err}");
    ws.remove_pipeline("nonbool");

    // A good pipeline passes and prints the plan.
    ws.write_pipeline("good", &format!("source = \"db\"\n[match]\nrelations = [\"public.t\"]\n{GOOD_SINK}"));
    let (ok, out) = check(&ws);
    assert!(ok, "{out}");
    assert!(out.contains("pipeline good") && out.contains("invalidate t:{{ key.id }}"), "{out}");

    // Config: unknown field and a missing environment variable, with lines.
    std::fs::write(ws.config_path(), "state_dir = \"s\"\n[runtime]\nlanse = 3\n").unwrap();
    let (ok, err) = check(&ws);
    assert!(!ok && err.contains("polysync.toml:3:") && err.contains("lanse"), "{err}");
    // A misspelt key of a source table is named at its own line, not the table's header.
    std::fs::write(
        ws.config_path(),
        "state_dir = \"s\"\n\n[sources.app]\nkind = \"postgres\"\nurl = \"postgres://u:p@127.0.0.1:1/db\"\nslot = \"s\"\npublication = \"p\"\ncreate_if_mising = true\n",
    )
    .unwrap();
    let (ok, err) = check(&ws);
    assert!(!ok && err.contains("polysync.toml:8:1") && err.contains("create_if_mising"), "{err}");
    std::fs::write(ws.config_path(), "[sinks.c]\nkind = \"cache\"\nurl = \"redis://${POLYSYNC_SURELY_UNSET_VAR}@h\"\n")
        .unwrap();
    let (ok, err) = check(&ws);
    assert!(!ok && err.contains("polysync.toml:3:") && err.contains("POLYSYNC_SURELY_UNSET_VAR is not set"), "{err}");
}

async fn refused(ws: &Workspace) -> String {
    let d = InProcess::start(&ws.config_path());
    match tokio::time::timeout(Duration::from_secs(30), d.result()).await {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(())) => panic!("daemon started although it should refuse"),
        Err(_) => panic!("daemon neither started nor refused within 30s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_missing_objects_with_a_precise_message() {
    let _g = shared().await;
    let db = TestDb::create("refuse").await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, user_id bigint); CREATE TABLE nokey (a int, b int);").await;
    let slot = unique("s");

    // Missing publication, not allowed to create it.
    let ws = Workspace::new();
    ws.write_config(
        &pg_cache_config_with(&db.url, &slot, "nopub", "create_if_missing = false", "")
            .replace("create_if_missing = true\n", ""),
    );
    ws.write_pipeline("p", &format!("source = \"db\"\n[match]\nrelations = [\"public.t\"]\n{GOOD_SINK}"));
    let err = refused(&ws).await;
    assert!(err.contains("publication \"nopub\" does not exist") && err.contains("CREATE PUBLICATION"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // A template naming a column the table does not have.
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    ws.write_pipeline(
        "typo",
        "source = \"db\"\n[match]\nrelations = [\"public.t\"]\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"u:{{ row.usr_id }}\"]\n",
    );
    let err = refused(&ws).await;
    assert!(err.contains("pipeline typo (") && err.contains("public.t has no column \"usr_id\""), "{err}");
    // The error points at the line and column of the pipeline file that names the column.
    assert!(err.contains("typo.toml:7:19): table public.t"), "{err}");

    // A `columns = [...]` list naming a column the table does not have: refused, not a JSON
    // value silently lacking the field.
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    ws.write_pipeline(
        "coltypo",
        "source = \"db\"\n[match]\nrelations = [\"public.t\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"u:{{ key.id }}\"\ncolumns = [\"id\", \"is_active\"]\n",
    );
    let err = refused(&ws).await;
    assert!(err.contains("coltypo.toml:8:19): table public.t has no column \"is_active\""), "{err}");

    // A declared text column the table does not have (checked with a transform too).
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    ws.write_pipeline(
        "texttypo",
        &format!("source = \"db\"\ntext_columns = [\"nte\"]\ntransform = '.x = 1'\n[match]\nrelations = [\"public.t\"]\n{GOOD_SINK}"),
    );
    let err = refused(&ws).await;
    assert!(err.contains("texttypo.toml:2:18): table public.t has no column \"nte\""), "{err}");

    // A published table without a primary key or REPLICA IDENTITY FULL.
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &format!("{slot}_k"), ""));
    ws.write_pipeline(
        "nokey",
        "source = \"db\"\n[match]\nrelations = [\"public.nokey\"]\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"n:{{ row.a }}\"]\n",
    );
    let err = refused(&ws).await;
    assert!(err.contains("without a primary key") && err.contains("public.nokey (named by pipeline nokey ("), "{err}");
    assert!(err.contains("nokey.toml:3:15))"), "{err}");

    // A table that does not exist.
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &format!("{slot}_m"), ""));
    ws.write_pipeline("missing", &format!("source = \"db\"\n[match]\nrelations = [\"public.nope\"]\n{GOOD_SINK}"));
    let err = refused(&ws).await;
    assert!(err.contains("do not exist") && err.contains("public.nope (named by pipeline missing ("), "{err}");
    assert!(err.contains("missing.toml:3:15))"), "the pipeline file's line and column: {err}");

    // An InfluxDB database that does not exist, without create_database: refused at start
    // with the fix, not found by the first write and retried while the slot waits.
    let ws = Workspace::new();
    let missing_db = unique("nodb");
    ws.write_config(&pg_cache_config(
        &db.url,
        &format!("{slot}_i"),
        &format!(
            "\n[sinks.metrics]\nkind = \"timeseries\"\nengine = \"influxdb\"\nurl = \"{}\"\ndatabase = \"{missing_db}\"\n",
            crate::support::converge::influx_url()
        ),
    ));
    ws.write_pipeline(
        "points",
        "source = \"db\"\n[match]\nrelations = [\"public.t\"]\n[[sink]]\ntarget = \"metrics\"\n[[sink.point]]\nmeasurement = \"m\"\nfields = { n = \"after.user_id\" }\n",
    );
    let err = refused(&ws).await;
    assert!(
        err.contains(&format!("database \"{missing_db}\" does not exist")) && err.contains("create_database = true"),
        "{err}"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_missing_its_field_dead_letters_and_the_stream_goes_on() {
    let _g = shared().await;
    let db = TestDb::create("dlqfield").await;
    // Default replica identity: a delete carries only the key, so row.user_id is missing.
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, user_id bigint)").await;
    let p = unique("dl");
    let slot = unique("s");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    ws.write_pipeline(
        "users",
        &format!(
            "source = \"db\"\n[match]\nrelations = [\"public.t\"]\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"{p}:u:{{{{ row.user_id }}}}\"]\n"
        ),
    );
    let d = InProcess::start(&ws.config_path());
    wait_for("slot", Duration::from_secs(60), || async { db.confirmed(&slot).await > 0 }).await;
    let redis = TestRedis::connect().await;
    redis.set(&format!("{p}:u:7"), "x").await;
    redis.set(&format!("{p}:u:8"), "x").await;
    db.exec("INSERT INTO t VALUES (1, 7); DELETE FROM t WHERE id = 1; INSERT INTO t VALUES (2, 8);").await;
    db.wait_caught_up(&slot, Duration::from_secs(60)).await;
    assert!(!redis.exists(&format!("{p}:u:7")).await);
    assert!(!redis.exists(&format!("{p}:u:8")).await, "the change after the dead letter still arrives");
    let dl = ws.dead_letters();
    assert_eq!(dl.len(), 1, "{:?}", dl.iter().map(|d| &d.reason).collect::<Vec<_>>());
    assert_eq!(dl[0].pipeline, "users");
    assert_eq!(dl[0].sink, "cache");
    assert_eq!(dl[0].change.op, polysync::change::Op::Delete);
    assert_eq!(dl[0].change.relation.as_ref(), "public.t");
    assert!(dl[0].reason.contains("template field row.user_id is missing"), "{}", dl[0].reason);
    d.stop().await.unwrap();
    db.cleanup().await;
}

/// A second config on the same slot that runs fewer pipelines is refused (it would confirm
/// changes the other config's pipelines never saw); `take_over_slot = true` moves the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_config_with_fewer_pipelines_cannot_consume_the_slot() {
    let _g = shared().await;
    let db = TestDb::create("slotowner").await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, user_id bigint)").await;
    let slot = unique("s");
    let pipeline =
        |name: &str| format!("name = \"{name}\"\nsource = \"db\"\n[match]\nrelations = [\"public.t\"]\n{GOOD_SINK}");
    let first = Workspace::new();
    first.write_config(&pg_cache_config(&db.url, &slot, ""));
    first.write_pipeline("a", &pipeline("a"));
    first.write_pipeline("b", &pipeline("b"));
    let d = InProcess::start(&first.config_path());
    db.wait_streaming(&slot).await;
    d.stop().await.unwrap();

    let second = Workspace::new();
    second.write_config(&pg_cache_config(&db.url, &slot, ""));
    second.write_pipeline("a", &pipeline("a"));
    let err = refused(&second).await;
    assert!(err.contains(&format!("slot \"{slot}\" is consumed by another polysync")), "{err}");
    assert!(err.contains("does not run [b]") && err.contains("take_over_slot = true"), "{err}");

    // The first config itself starts again (same installation), even with a pipeline fewer.
    first.remove_pipeline("b");
    let d = InProcess::start(&first.config_path());
    db.exec("INSERT INTO t VALUES (1, 1)").await;
    db.wait_caught_up(&slot, Duration::from_secs(60)).await;
    d.stop().await.unwrap();
    // Now the slot is recorded for [a] only: the second config runs [a] and may take it.
    let d = InProcess::start(&second.config_path());
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO t VALUES (2, 2)").await;
    db.wait_caught_up(&slot, Duration::from_secs(60)).await;
    d.stop().await.unwrap();
    // The first one cannot come back silently: the slot moved past what it confirmed.
    let err = refused(&first).await;
    assert!(err.contains("something else consumed or advanced it"), "{err}");
    // A deliberate move to a config with fewer pipelines.
    let third = Workspace::new();
    third.write_config(
        &pg_cache_config(&db.url, &slot, "")
            .replace("create_if_missing = true", "create_if_missing = true\ntake_over_slot = true"),
    );
    third.write_pipeline("c", &pipeline("c"));
    let d = InProcess::start(&third.config_path());
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO t VALUES (3, 3)").await;
    db.wait_caught_up(&slot, Duration::from_secs(60)).await;
    d.stop().await.unwrap();
    db.cleanup().await;
}

/// `polysync check --online` runs the start-up checks against the real servers and exits:
/// nothing is created (the publication and slot a first start would create are listed), a
/// column typo and a missing InfluxDB database are refused with exit status 2, and so is a
/// sink that does not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_online_runs_every_start_up_check_without_creating_anything() {
    let _g = shared().await;
    let db = TestDb::create("online").await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY, user_id bigint)").await;
    let slot = unique("s");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    ws.write_pipeline("p", &format!("source = \"db\"\n[match]\nrelations = [\"public.t\"]\n{GOOD_SINK}"));
    let (code, out) = check_online(&ws.config_path());
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("source db: publication") && out.contains("the first start would create publication"),
        "{out}"
    );
    assert!(out.contains("sink cache: ") && out.contains("answers"), "{out}");
    let publications: i64 = db.client.query_one("SELECT count(*) FROM pg_publication", &[]).await.unwrap().get(0);
    let slots: i64 = db
        .client
        .query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .unwrap()
        .get(0);
    assert_eq!((publications, slots), (0, 0), "check --online created nothing");

    // A column list naming a column the table lacks.
    ws.write_pipeline(
        "p",
        "source = \"db\"\n[match]\nrelations = [\"public.t\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"u:{{ key.id }}\"\ncolumns = [\"id\", \"usr_id\"]\n",
    );
    let (code, out) = check_online(&ws.config_path());
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("source db:") && out.contains("p.toml:8:19): table public.t has no column \"usr_id\""),
        "{out}"
    );

    // A missing InfluxDB database, and a cache that does not answer.
    let missing_db = unique("nodb");
    ws.write_config(
        &pg_cache_config(
            &db.url,
            &slot,
            &format!(
                "\n[sinks.metrics]\nkind = \"timeseries\"\nengine = \"influxdb\"\nurl = \"{}\"\ndatabase = \"{missing_db}\"\n",
                crate::support::converge::influx_url()
            ),
        )
        .replace(&crate::support::redis::url(), "redis://127.0.0.1:1"),
    );
    ws.write_pipeline("p", &format!("source = \"db\"\n[match]\nrelations = [\"public.t\"]\n{GOOD_SINK}"));
    ws.write_pipeline(
        "points",
        "source = \"db\"\n[match]\nrelations = [\"public.t\"]\n[[sink]]\ntarget = \"metrics\"\n[[sink.point]]\nmeasurement = \"m\"\nfields = { n = \"after.user_id\" }\n",
    );
    let (code, out) = check_online(&ws.config_path());
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("sink metrics:") && out.contains(&format!("database \"{missing_db}\" does not exist")),
        "{out}"
    );
    assert!(out.contains("sink cache:"), "{out}");
    db.cleanup().await;
}
