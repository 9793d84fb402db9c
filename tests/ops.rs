//! Operations: a real Prometheus scraping the daemon, health and readiness, SIGTERM drains,
//! sd_notify, and the shipped systemd / ECS / Prometheus files.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use crate::support::daemon::{ChildDaemon, pg_cache_config};
use crate::support::pg::{TestDb, connect};
use crate::support::redis::TestRedis;
use crate::support::{Workspace, exclusive, free_port, http_get, metric_value, repo, shared, unique, wait_for};

const WAIT: Duration = Duration::from_secs(60);

fn metrics_config(db: &TestDb, slot: &str, port: u16) -> String {
    pg_cache_config(&db.url, slot, "")
        .replace("[metrics]\nenabled = false", &format!("[metrics]\nlisten = \"127.0.0.1:{port}\""))
        .replace("status_interval = \"100ms\"", "status_interval = \"100ms\"\nheartbeat_interval = \"1s\"")
}

fn items_pipeline(p: &str) -> String {
    format!(
        "source = \"db\"\n[match]\nrelations = [\"public.items\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"{p}:i:{{{{ key.id }}}}\"\n"
    )
}

#[test]
fn shipped_prometheus_and_systemd_files_pass_their_validators() {
    let out =
        Command::new("promtool").arg("check").arg("config").arg(repo().join("deploy/prometheus/scrape.yml")).output();
    let out = out.expect("promtool (make peers installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr));
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(repo().join("deploy/prometheus/alerts.yml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr));

    // systemd-analyze needs ExecStart to exist: point the unit at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/polysync.service"))
        .unwrap()
        .replace("/usr/local/bin/polysync", env!("CARGO_BIN_EXE_polysync"));
    assert!(unit.contains("Type=notify") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    for hardening in
        ["DynamicUser=yes", "ProtectSystem=strict", "StateDirectory=polysync", "NoNewPrivileges=yes", "WatchdogSec="]
    {
        assert!(unit.contains(hardening), "unit lacks {hardening}");
    }
    let path = dir.path().join("polysync.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !text.contains("polysync.service:"), "systemd-analyze verify: {text}");

    // Grafana: valid JSON, every query names metrics the daemon exports.
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/grafana/polysync.json")).unwrap()).unwrap();
    let exported = polysync::telemetry::metrics::names::ALL;
    let mut queries = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            queries += 1;
            for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| w.starts_with("polysync_"))
            {
                let base = word.trim_end_matches("_bucket").trim_end_matches("_count").trim_end_matches("_sum");
                assert!(exported.contains(&base), "dashboard uses unknown metric {word}");
            }
        }
    }
    assert!(queries >= 10);
}

#[test]
fn task_definition_runs_the_healthcheck_and_drains_within_stop_timeout() {
    let td: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/ecs/task-definition.json")).unwrap())
            .unwrap();
    let c = &td["containerDefinitions"][0];
    let hc: Vec<&str> = c["healthCheck"]["command"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(&hc[..3], ["CMD", "/usr/local/bin/polysync", "healthcheck"]);
    let stop_timeout = c["stopTimeout"].as_u64().unwrap();
    // Every `${VAR}` of the container's config is set by the task (environment or secrets).
    let provided: std::collections::BTreeSet<String> = c["environment"]
        .as_array()
        .unwrap()
        .iter()
        .chain(c["secrets"].as_array().unwrap())
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    let cfg = polysync::app::Config::parse(
        &repo().join("config/ecs.toml"),
        &std::fs::read_to_string(repo().join("config/ecs.toml")).unwrap(),
        |var| provided.contains(var).then(|| "example".into()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.runtime.shutdown_timeout.as_secs() < stop_timeout, "drain must finish before ECS sends SIGKILL");
    assert!(cfg.dlq.s3.is_some(), "on ECS the dead letters' record is S3, not the task's disk");
    assert_eq!(cfg.metrics.listen.port(), c["portMappings"][0]["containerPort"].as_u64().unwrap() as u16);
    assert_eq!(c["dockerLabels"]["PROMETHEUS_EXPORTER_PORT"], "9464");
    for s in c["secrets"].as_array().unwrap() {
        let from = s["valueFrom"].as_str().unwrap();
        assert!(from.starts_with("arn:aws:secretsmanager:") || from.starts_with("arn:aws:ssm:"), "{from}");
    }
    assert_eq!(c["logConfiguration"]["logDriver"], "awslogs");
    assert_eq!(c["user"], "10001:10001", "non-root");
}

#[test]
fn iam_policy_grants_exactly_the_actions_the_code_calls() {
    let policy: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/iam/policy.json")).unwrap()).unwrap();
    let mut granted = std::collections::BTreeSet::new();
    for st in policy["Statement"].as_array().unwrap() {
        assert_eq!(st["Effect"], "Allow");
        let actions = match &st["Action"] {
            serde_json::Value::String(a) => vec![a.clone()],
            v => v.as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect(),
        };
        for a in actions {
            assert!(!a.contains('*'), "least privilege: no wildcard action ({a})");
            granted.insert(a);
        }
    }
    let called: std::collections::BTreeSet<String> =
        polysync::aws::IAM_ACTIONS.iter().map(|(_, a)| a.to_string()).collect();
    assert_eq!(granted, called, "deploy/iam/policy.json and aws::IAM_ACTIONS disagree");
}

async fn prom_query(addr: &str, q: &str) -> Option<f64> {
    let path =
        format!("/api/v1/query?query={}", url::form_urlencoded::byte_serialize(q.as_bytes()).collect::<String>());
    let (status, body) = http_get(addr, &path).await?;
    if status != 200 {
        return None;
    }
    let j: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    let r = j["data"]["result"].as_array()?;
    r.iter().filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok()).reduce(f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_scrapes_lag_throughput_and_slot_lag() {
    let _g = shared().await;
    let db = TestDb::create("prom").await;
    db.exec("CREATE TABLE items (id bigint PRIMARY KEY, v int)").await;
    let p = unique("prom");
    let slot = unique("s");
    let port = free_port();
    let ws = Workspace::new();
    ws.write_config(&metrics_config(&db, &slot, port));
    ws.write_pipeline("items", &items_pipeline(&p));
    let d = ChildDaemon::spawn(&ws.config_path(), &ws.path().join("daemon.log"));

    let prom_port = free_port();
    let prom_dir = ws.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    std::fs::write(
        prom_dir.join("prometheus.yml"),
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: polysync\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"),
    )
    .unwrap();
    let mut prom = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", prom_dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", prom_dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(prom_dir.join("log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start prometheus (make peers installs it)");
    let prom_addr = format!("127.0.0.1:{prom_port}");
    wait_for("the daemon's slot", WAIT, || async { db.confirmed(&slot).await > 0 }).await;
    let stop_writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (url, stop) = (db.url.clone(), std::sync::Arc::clone(&stop_writing));
        tokio::spawn(async move {
            let c = connect(&url).await;
            let mut i = 0i64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || i < 200 {
                c.batch_execute(&format!(
                    "INSERT INTO items SELECT g, 1 FROM generate_series({}, {}) g",
                    i * 50 + 1,
                    i * 50 + 50
                ))
                .await
                .unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            i * 50
        })
    };
    wait_for("prometheus to see the daemon up", WAIT, || async {
        prom_query(&prom_addr, "up{job=\"polysync\"}").await == Some(1.0)
    })
    .await;
    wait_for("throughput in prometheus", WAIT, || async {
        prom_query(&prom_addr, "sum(rate(polysync_source_changes_total[10s]))").await.is_some_and(|v| v > 10.0)
    })
    .await;
    stop_writing.store(true, std::sync::atomic::Ordering::SeqCst);
    let rows = writer.await.unwrap();
    db.wait_caught_up(&slot, WAIT).await;
    wait_for("end-to-end lag samples", WAIT, || async {
        prom_query(&prom_addr, "sum(polysync_end_to_end_lag_seconds_count{pipeline=\"items\"})")
            .await
            .is_some_and(|v| v >= rows as f64)
    })
    .await;
    // Plausible values: lag percentiles between 0 and a minute, slot lag reported and small
    // once caught up, nothing dead-lettered.
    let p99 = prom_query(
        &prom_addr,
        "histogram_quantile(0.99, sum by (le) (rate(polysync_end_to_end_lag_seconds_bucket[1m])))",
    )
    .await;
    assert!(p99.is_some_and(|v| v > 0.0 && v < 60.0), "p99 lag {p99:?}");
    wait_for("slot lag series", WAIT, || async {
        prom_query(&prom_addr, "polysync_pg_slot_lag_bytes").await.is_some_and(|v| (0.0..1e9).contains(&v))
    })
    .await;
    assert!(prom_query(&prom_addr, "polysync_build_info").await == Some(1.0));
    let (_, text) = http_get(&format!("127.0.0.1:{port}"), "/metrics").await.unwrap();
    assert_eq!(
        metric_value(&text, "polysync_sink_records_total", &[("sink", "cache"), ("result", "applied")]),
        rows as f64
    );
    assert!(d.terminate().await.success());
    let _ = prom.kill().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_workload_exits_zero_confirms_only_what_was_applied_and_restart_loses_nothing() {
    let _g = shared().await;
    let db = TestDb::create("term").await;
    db.exec("CREATE TABLE items (id bigint PRIMARY KEY, v int)").await;
    let p = unique("term");
    let slot = unique("s");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    ws.write_pipeline("items", &items_pipeline(&p));
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    wait_for("slot", WAIT, || async { db.confirmed(&slot).await > 0 }).await;
    // Each transaction: 25 rows, and an LSN at or after its commit.
    let ledger = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(i64, u64)>::new()));
    let writer = {
        let (url, ledger) = (db.url.clone(), std::sync::Arc::clone(&ledger));
        tokio::spawn(async move {
            let c = connect(&url).await;
            for i in 0..400i64 {
                c.batch_execute(&format!(
                    "INSERT INTO items SELECT g, 1 FROM generate_series({}, {}) g",
                    i * 25 + 1,
                    i * 25 + 25
                ))
                .await
                .unwrap();
                let lsn: String = c.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
                ledger.lock().unwrap().push((i * 25 + 25, lsn.parse::<polysync::change::Lsn>().unwrap().0));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let started = std::time::Instant::now();
    let status = d.terminate().await;
    assert!(status.success(), "exit status {status:?}\n{}", std::fs::read_to_string(&log).unwrap());
    assert!(started.elapsed() < Duration::from_secs(15), "within the shutdown deadline");
    // What the slot confirmed at exit is in Redis: every row committed below it is cached.
    let confirmed = db.confirmed(&slot).await;
    let redis = TestRedis::connect().await;
    let committed: Vec<(i64, u64)> = ledger.lock().unwrap().clone();
    let below: Vec<i64> = committed.iter().filter(|(_, lsn)| *lsn <= confirmed).map(|(last, _)| *last).collect();
    assert!(!below.is_empty(), "some work was confirmed before the stop");
    for last in &below {
        for id in last - 24..=*last {
            assert!(redis.exists(&format!("{p}:i:{id}")).await, "row {id} is below the confirmed LSN but not applied");
        }
    }
    writer.await.unwrap();
    // Restart: everything arrives.
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    db.wait_caught_up(&slot, WAIT).await;
    for id in 1..=10_000i64 {
        assert!(redis.exists(&format!("{p}:i:{id}")).await, "row {id} lost across SIGTERM/restart");
    }
    assert!(d.terminate().await.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("replication stream drained") && text.contains("polysync stopped"), "{text}");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sd_notify_ready_watchdog_and_stopping() {
    let _g = shared().await;
    let db = TestDb::create("notify").await;
    db.exec("CREATE TABLE items (id bigint PRIMARY KEY, v int)").await;
    let p = unique("nt");
    let slot = unique("s");
    let ws = Workspace::new();
    ws.write_config(&pg_cache_config(&db.url, &slot, ""));
    ws.write_pipeline("items", &items_pipeline(&p));
    let sock_path = ws.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let log = std::fs::File::create(ws.path().join("daemon.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_polysync"))
        .args(["run", "--config"])
        .arg(ws.config_path())
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let messages = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        while std::time::Instant::now() < deadline {
            let Ok(n) = sock.recv(&mut buf) else { break };
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let stop = m.contains("STOPPING=1");
            seen.push(m);
            if stop {
                break;
            }
            if seen.iter().any(|m| m.contains("READY=1"))
                && seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2
            {
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            }
        }
        let status = child.wait().unwrap();
        (seen, status)
    })
    .await
    .unwrap();
    let (seen, status) = messages;
    assert!(status.success());
    let ready = seen.iter().position(|m| m.contains("READY=1")).expect("READY=1 sent");
    assert!(seen.iter().any(|m| m == "WATCHDOG=1"), "watchdog pings: {seen:?}");
    let stopping = seen.iter().position(|m| m.contains("STOPPING=1")).expect("STOPPING=1 sent");
    assert!(ready < stopping);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_and_healthcheck_follow_redis_going_away_and_coming_back() {
    let _x = exclusive().await;
    let db = TestDb::create("ready").await;
    db.exec("CREATE TABLE items (id bigint PRIMARY KEY, v int)").await;
    let p = unique("rz");
    let slot = unique("s");
    let port = free_port();
    let ws = Workspace::new();
    ws.write_config(&metrics_config(&db, &slot, port));
    ws.write_pipeline("items", &items_pipeline(&p));
    let d = ChildDaemon::spawn(&ws.config_path(), &ws.path().join("daemon.log"));
    let addr = format!("127.0.0.1:{port}");
    let healthcheck =
        || Command::new(env!("CARGO_BIN_EXE_polysync")).args(["healthcheck", "--addr", &addr]).output().unwrap();
    wait_for("ready", WAIT, || async { http_get(&addr, "/readyz").await.is_some_and(|(s, _)| s == 200) }).await;
    assert!(healthcheck().status.success());
    assert_eq!(http_get(&addr, "/healthz").await.unwrap().0, 200);

    crate::support::peers(&["--stop", "redis"]);
    wait_for("unready while redis is down", WAIT, || async {
        http_get(&addr, "/readyz").await.is_some_and(|(s, body)| s == 503 && body.contains("sink cache"))
    })
    .await;
    let out = healthcheck();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && said.contains("sink cache"), "{said}");
    assert!(!said.contains("Os {"), "an I/O error reads as a sentence, not Rust's debug form: {said}");
    assert_eq!(http_get(&addr, "/healthz").await.unwrap().0, 200, "alive while unready");
    // `polysync status` names the sink that is down, and why.
    let status = |json: bool| {
        let mut args = vec!["status", "--config"];
        let config = ws.config_path();
        let config = config.to_str().unwrap().to_string();
        args.push(&config);
        if json {
            args.push("--json");
        }
        let out = Command::new(env!("CARGO_BIN_EXE_polysync")).args(&args).output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let down = status(false);
    assert!(down.contains("daemon: running") && down.contains("sink cache (cache): DOWN"), "{down}");
    assert!(down.contains("source db (postgres) slot") && down.contains(": connected"), "{down}");

    crate::support::peers(&["redis"]);
    wait_for("ready again", WAIT, || async { http_get(&addr, "/readyz").await.is_some_and(|(s, _)| s == 200) }).await;
    assert!(healthcheck().status.success());
    db.exec("INSERT INTO items VALUES (1, 1)").await;
    db.wait_caught_up(&slot, WAIT).await;
    d.signal(libc::SIGHUP);
    wait_for("the reload in status", WAIT, || async { status(false).contains("last reload: ok") }).await;
    let up = status(false);
    assert!(up.contains("sink cache (cache): up, 0 records behind") && up.contains("(last error:"), "{up}");
    assert!(up.contains("dead letters: none"), "{up}");
    let j: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    assert_eq!(j["sources"]["db"]["connected"], true, "{j}");
    assert_eq!(j["sources"]["db"]["slot"], slot.as_str(), "{j}");
    assert!(j["sources"]["db"]["confirmed_lsn"].as_str().is_some_and(|l| l.contains('/')), "{j}");
    assert_eq!(j["sinks"]["cache"]["up"], true, "{j}");
    assert_eq!(j["last_reload"]["ok"], true, "{j}");
    assert!(d.terminate().await.success());
    // With the daemon gone: what state_dir holds, said as such.
    let after = status(false);
    assert!(after.contains("not answering") && after.contains("last confirmed"), "{after}");
    db.cleanup().await;
}
