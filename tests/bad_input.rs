//! Bad input gets one clear line naming the file/line or the object, and a refusal
//! (`check` exits non-zero, `run` does not start) or a dead-letter entry; never a panic or a
//! silent drop.

use std::process::Command;
use std::time::Duration;

use crate::support::daemon::{InProcess, pg_cache_config, pg_cache_config_with};
use crate::support::pg::TestDb;
use crate::support::redis::TestRedis;
use crate::support::{Workspace, shared, unique, wait_for};

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

    // A good pipeline passes and prints the plan.
    ws.write_pipeline("good", &format!("source = \"db\"\n[match]\nrelations = [\"public.t\"]\n{GOOD_SINK}"));
    let (ok, out) = check(&ws);
    assert!(ok, "{out}");
    assert!(out.contains("pipeline good") && out.contains("invalidate t:{{ key.id }}"), "{out}");

    // Config: unknown field and a missing environment variable, with lines.
    std::fs::write(ws.config_path(), "state_dir = \"s\"\n[runtime]\nlanse = 3\n").unwrap();
    let (ok, err) = check(&ws);
    assert!(!ok && err.contains("polysync.toml:3:") && err.contains("lanse"), "{err}");
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
    assert!(err.contains("pipeline typo") && err.contains("public.t has no column \"usr_id\""), "{err}");

    // A `columns = [...]` list naming a column the table does not have: refused, not a JSON
    // value silently lacking the field.
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    ws.write_pipeline(
        "coltypo",
        "source = \"db\"\n[match]\nrelations = [\"public.t\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"u:{{ key.id }}\"\ncolumns = [\"id\", \"is_active\"]\n",
    );
    let err = refused(&ws).await;
    assert!(err.contains("pipeline coltypo") && err.contains("public.t has no column \"is_active\""), "{err}");

    // A declared text column the table does not have (checked with a transform too).
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    ws.write_pipeline(
        "texttypo",
        &format!("source = \"db\"\ntext_columns = [\"nte\"]\ntransform = '.x = 1'\n[match]\nrelations = [\"public.t\"]\n{GOOD_SINK}"),
    );
    let err = refused(&ws).await;
    assert!(err.contains("pipeline texttypo") && err.contains("public.t has no column \"nte\""), "{err}");

    // A published table without a primary key or REPLICA IDENTITY FULL.
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &format!("{slot}_k"), ""));
    ws.write_pipeline(
        "nokey",
        "source = \"db\"\n[match]\nrelations = [\"public.nokey\"]\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"n:{{ row.a }}\"]\n",
    );
    let err = refused(&ws).await;
    assert!(err.contains("without a primary key") && err.contains("public.nokey"), "{err}");

    // A table that does not exist.
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &format!("{slot}_m"), ""));
    ws.write_pipeline("missing", &format!("source = \"db\"\n[match]\nrelations = [\"public.nope\"]\n{GOOD_SINK}"));
    let err = refused(&ws).await;
    assert!(err.contains("do not exist") && err.contains("public.nope"), "{err}");
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
