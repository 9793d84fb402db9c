//! Schema changes mid-stream that the conformance matrix cannot show (it asserts no dead letters
//! and one fixed set of tables): a template naming a dropped column, a table added to the
//! publication while running, a published table no pipeline reads, and a dropped table.

use std::time::Duration;

use crate::support::daemon::{InProcess, pg_cache_config, refusal};
use crate::support::pg::TestDb;
use crate::support::redis::TestRedis;
use crate::support::{Workspace, shared, unique, wait_for};

const CATCH_UP: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_column_a_table_added_while_running_an_unread_table_and_a_dropped_table() {
    let _g = shared().await;
    schema_changes(TestDb::create("schema").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_column_a_table_added_while_running_an_unread_table_and_a_dropped_table_on_postgresql_18() {
    let _g = shared().await;
    schema_changes(TestDb::create_on(&crate::support::pg::admin_url_18(), "schema").await).await;
}

async fn schema_changes(db: TestDb) {
    db.exec(
        "CREATE TABLE sc_a (id bigint PRIMARY KEY, name text, gone text); \
         INSERT INTO sc_a VALUES (1, 'one', 'g1'), (2, 'two', 'g2'); \
         CREATE TABLE sc_c (id bigint PRIMARY KEY, v text); CREATE TABLE sc_d (id bigint PRIMARY KEY)",
    )
    .await;
    let p = unique("sc");
    let slot = unique("s");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    let set = |name: &str, relation: &str, key: &str, snapshot: bool| {
        let snap = if snapshot { "snapshot = \"initial\"\n" } else { "" };
        ws.write_pipeline(
            name,
            &format!(
                "source = \"db\"\n{snap}[match]\nrelations = [\"{relation}\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{p}:{key}\"\n"
            ),
        );
    };
    set("a", "public.sc_a", "a:{{ key.id }}", true);
    set("a_gone", "public.sc_a", "g:{{ after.gone }}", false);
    // A prefix: tables it names later are not in the publication until someone adds them.
    set("c", "public.sc_c*", "c:{{ key.id }}", false);
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    let redis = TestRedis::connect().await;
    db.exec("INSERT INTO sc_a VALUES (3, 'three', 'g3')").await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    assert!(redis.exists(&format!("{p}:g:g3")).await, "the template naming the column works before the drop");

    // A table added to the publication while running reaches the pipeline that matches it; one
    // no pipeline reads is counted, not applied silently.
    db.exec(&format!("ALTER PUBLICATION {slot} ADD TABLE sc_c, sc_d")).await;
    db.exec("INSERT INTO sc_c VALUES (1, 'x'); INSERT INTO sc_d VALUES (1)").await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    assert_eq!(redis.get(&format!("{p}:c:1")).await.as_deref(), Some(r#"{"id":1,"v":"x"}"#));
    let unmatched = polysync::telemetry::metrics().unmatched_changes.with_label_values(&["db", "public.sc_d"]).get();
    assert!(unmatched >= 1, "the unread table's change is counted: {unmatched}");

    // DROP COLUMN: the template that names it dead-letters with the reason; nothing stalls, and
    // the other pipeline's copies lose the column (the table is re-read).
    db.exec("ALTER TABLE sc_a DROP COLUMN gone").await;
    db.exec("UPDATE sc_a SET name = 'after' WHERE id = 1").await;
    db.exec("INSERT INTO sc_c VALUES (2, 'y')").await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    assert!(redis.exists(&format!("{p}:c:2")).await, "the stream goes on after the dead letters");
    wait_for("the re-read of sc_a after the drop", CATCH_UP, || async {
        redis.get(&format!("{p}:a:2")).await.as_deref() == Some(r#"{"id":2,"name":"two"}"#)
    })
    .await;
    assert_eq!(redis.get(&format!("{p}:a:1")).await.as_deref(), Some(r#"{"id":1,"name":"after"}"#));
    let dropped =
        polysync::telemetry::metrics().pg_schema_changes.with_label_values(&["db", "public.sc_a", "dropped"]).get();
    assert!(dropped >= 1, "the drop is counted");
    let letters = ws.dead_letters();
    assert!(
        letters.iter().any(|l| l.pipeline == "a_gone"
            && l.reason.contains("after.gone")
            && l.change.key_display().contains("id=1")),
        "a dead letter names the pipeline, the missing column and the key: {:#?}",
        letters.iter().map(|l| (&l.pipeline, &l.reason, l.change.key_display())).collect::<Vec<_>>()
    );
    assert!(letters.iter().all(|l| l.pipeline == "a_gone"), "only the pipeline naming the column fails");
    d.stop().await.unwrap();

    // DROP TABLE: PostgreSQL sends nothing for it; the next start refuses, naming the table.
    db.exec("DROP TABLE sc_a").await;
    let e = refusal(&ws.config_path()).await;
    assert!(e.contains("do not exist") && e.contains("public.sc_a"), "{e}");
    db.cleanup().await;
}

/// A publication the operator made without `publish_via_partition_root` would send a partitioned
/// table's changes under its partitions' names, which no pipeline matching the parent reads:
/// refused with the fix (not with "already member of publication"), then delivered under the
/// parent's name once the fix is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_without_partition_root_is_refused_with_the_fix_and_works_once_fixed() {
    let _g = shared().await;
    let db = TestDb::create("parted").await;
    let slot = unique("s");
    db.exec(&format!(
        "CREATE TABLE orders (id bigint, region text, total int, PRIMARY KEY (id, region)) PARTITION BY LIST (region); \
         CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu'); \
         CREATE TABLE orders_us PARTITION OF orders FOR VALUES IN ('us'); \
         CREATE PUBLICATION {slot} FOR TABLE orders"
    ))
    .await;
    let p = unique("po");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    ws.write_pipeline(
        "orders",
        &format!(
            "source = \"db\"\n[match]\nrelations = [\"public.orders\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{p}:{{{{ key.region }}}}:{{{{ key.id }}}}\"\n"
        ),
    );
    let e = refusal(&ws.config_path()).await;
    assert!(
        e.contains("publish_via_partition_root") && e.contains("public.orders") && !e.contains("already member"),
        "{e}"
    );
    db.exec(&format!("ALTER PUBLICATION {slot} SET (publish_via_partition_root = true)")).await;
    let d = InProcess::start(&ws.config_path());
    db.wait_streaming(&slot).await;
    db.exec("INSERT INTO orders VALUES (1, 'eu', 10), (2, 'us', 20); UPDATE orders SET region = 'us' WHERE id = 1")
        .await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    let redis = TestRedis::connect().await;
    assert_eq!(redis.get(&format!("{p}:us:1")).await.as_deref(), Some(r#"{"id":1,"region":"us","total":10}"#));
    assert_eq!(redis.get(&format!("{p}:us:2")).await.as_deref(), Some(r#"{"id":2,"region":"us","total":20}"#));
    assert!(!redis.exists(&format!("{p}:eu:1")).await, "the row that moved partition is gone from its old key");
    d.stop().await.unwrap();
    db.cleanup().await;
}

/// `on_column_change = "warn"`: an added column is logged and counted, the copies keep their old
/// shape (the table is not re-read) and new changes carry the column; `polysync snapshot` then
/// brings the old rows to the new shape, as docs/schema-changes.md tells the operator to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_column_change_warn_leaves_the_copies_until_the_operator_snapshots() {
    let _g = shared().await;
    let db = TestDb::create("scwarn").await;
    let table = unique("scw");
    db.exec(&format!("CREATE TABLE {table} (id bigint PRIMARY KEY, name text); INSERT INTO {table} VALUES (1, 'one')"))
        .await;
    let (p, slot) = (unique("w"), unique("s"));
    let ws = Workspace::new();
    ws.write_config(
        &pg_cache_config(&db.url, &slot, "")
            .replace("create_if_missing = true", "create_if_missing = true\non_column_change = \"warn\""),
    );
    ws.write_pipeline(
        "w",
        &format!(
            "source = \"db\"\nsnapshot = \"initial\"\n[match]\nrelations = [\"public.{table}\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{p}:{{{{ key.id }}}}\"\n"
        ),
    );
    let d = InProcess::start(&ws.config_path());
    let redis = TestRedis::connect().await;
    wait_for("the initial snapshot", CATCH_UP, || async {
        redis.get(&format!("{p}:1")).await.as_deref() == Some(r#"{"id":1,"name":"one"}"#)
    })
    .await;
    db.exec(&format!("ALTER TABLE {table} ADD COLUMN note text DEFAULT 'n'")).await;
    db.exec(&format!("INSERT INTO {table} (id, name) VALUES (2, 'two')")).await;
    db.wait_caught_up(&slot, CATCH_UP).await;
    assert_eq!(redis.get(&format!("{p}:2")).await.as_deref(), Some(r#"{"id":2,"name":"two","note":"n"}"#));
    let added = polysync::telemetry::metrics()
        .pg_schema_changes
        .with_label_values(&["db", &format!("public.{table}"), "added"])
        .get();
    assert!(added >= 1, "the added column is counted");
    // No re-read: the old copy keeps its shape (given time a re-read would have taken).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(redis.get(&format!("{p}:1")).await.as_deref(), Some(r#"{"id":1,"name":"one"}"#));
    let (config, relation) = (ws.config_path(), format!("public.{table}"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_polysync"))
            .args(["snapshot", "--pipeline", "w", "--table", &relation, "--wait", "--config"])
            .arg(config)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    wait_for("the snapshot to reshape the old copy", CATCH_UP, || async {
        redis.get(&format!("{p}:1")).await.as_deref() == Some(r#"{"id":1,"name":"one","note":"n"}"#)
    })
    .await;
    d.stop().await.unwrap();
    db.cleanup().await;
}
