//! polysync benchmark harness (`make bench`): every scenario side by side with its baseline in
//! one run, on the local servers, each figure the median of several runs with min–max, written
//! as a Markdown report with the machine and the method.
//!
//! Usage: `polysync-bench [--changes N] [--runs R] [--quick] [--no-debezium] [--only LIST]
//! [--before BIN] [--out FILE]`. `--only` picks scenarios (`drain,big,steady,fanout,outage`);
//! `--before BIN` adds a second polysync binary (e.g. the build before an optimisation) to the
//! backlog drain and the big transaction, run side by side with the current one on identical slots.
//! Environment: `POLYSYNC_TEST_PG` (admin URL), `POLYSYNC_TEST_REDIS`, `POLYSYNC_TEST_OPENSEARCH`,
//! `POLYSYNC_TEST_GREMLIN`, `POLYSYNC_TEST_INFLUX` (as `make peers` writes them).

// The test suite's convergence checker, shared so the fan-out run is checked key by key too.
mod baseline;
#[allow(dead_code)]
#[path = "../../tests/support/converge.rs"]
mod converge;
mod cpu;
mod daemon;
mod latency;
mod outage;
mod workload;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use daemon::Daemon;
use workload::{confirmed, connect, create_slot, current_lsn, wait_confirmed};

struct Args {
    changes: u64,
    runs: usize,
    quick: bool,
    debezium: bool,
    only: Option<Vec<String>>,
    before: Option<PathBuf>,
    out: Option<PathBuf>,
}

impl Args {
    fn runs(&self, scenario: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|s| s == scenario))
    }
}

fn args() -> Args {
    let mut a = Args { changes: 1_000_000, runs: 3, quick: false, debezium: true, only: None, before: None, out: None };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--changes" => a.changes = it.next().and_then(|v| v.parse().ok()).expect("--changes N"),
            "--runs" => a.runs = it.next().and_then(|v| v.parse().ok()).expect("--runs R"),
            "--quick" => a.quick = true,
            "--no-debezium" => a.debezium = false,
            "--out" => a.out = it.next().map(PathBuf::from),
            "--only" => a.only = it.next().map(|v| v.split(',').map(str::to_string).collect()),
            "--before" => a.before = it.next().map(PathBuf::from),
            other => panic!("unknown argument {other}"),
        }
    }
    if a.quick {
        a.changes = a.changes.min(200_000);
        a.runs = a.runs.min(2);
    }
    a
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Median, min and max.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

fn fmt_stats(v: &[f64], unit: &str) -> String {
    let (m, lo, hi) = stats(v);
    if v.len() == 1 { format!("{m:.0} {unit}") } else { format!("{m:.0} {unit} ({lo:.0}–{hi:.0})") }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok()))
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1048576.0))
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let out = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "* CPU: {cores} cores ({cpu}), memory {mem}\n* Kernel: {}\n* PostgreSQL: {}\n* Redis: {}\n* rustc: {}\n* Java: {}\n",
        out("uname", &["-r"]),
        out("pg_recvlogical", &["--version"]),
        out("redis-server", &["--version"]),
        out("rustc", &["--version"]),
        Command::new("java")
            .arg("-version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stderr).lines().next().unwrap_or("").to_string())
            .unwrap_or_default(),
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn source_cfg(db_url: &str, slot: &str, extra: &str) -> String {
    format!(
        "[runtime]\nlanes = 4\nshutdown_timeout = \"30s\"\n[sources.shop]\nkind = \"postgres\"\nurl = \"{db_url}\"\nsslmode = \"disable\"\nslot = \"{slot}\"\npublication = \"bench_pub\"\nsignal_table = \"\"\nstatus_interval = \"100ms\"\n{extra}\n"
    )
}

fn invalidate_pipelines() -> Vec<(&'static str, String)> {
    vec![
        ("products", "source = \"shop\"\n[match]\nrelations = [\"public.products\"]\n[[sink]]\ntarget = \"out\"\naction = \"invalidate\"\nkeys = [\"bench:product:{{ key.id }}\"]\n".into()),
        ("orders", "source = \"shop\"\n[match]\nrelations = [\"public.orders\"]\n[[sink]]\ntarget = \"out\"\naction = \"invalidate\"\nkeys = [\"bench:orders:{{ row.user_id }}\"]\n".into()),
        ("items", "source = \"shop\"\n[match]\nrelations = [\"public.order_items\"]\n[[sink]]\ntarget = \"out\"\naction = \"invalidate\"\nkeys = [\"bench:order:{{ key.order_id }}\"]\n".into()),
        ("big", "source = \"shop\"\n[match]\nrelations = [\"public.big\"]\n[[sink]]\ntarget = \"out\"\naction = \"invalidate\"\nkeys = [\"bench:big:{{ key.id }}\"]\n".into()),
    ]
}

fn noop_pipelines() -> Vec<(&'static str, String)> {
    vec![("all", "source = \"shop\"\n[match]\nrelations = [\"public.*\"]\n[[sink]]\ntarget = \"out\"\n".into())]
}

/// A backlog every tool drains: the database and the position after the last change.
struct Backlog<'a> {
    bin: &'a Path,
    admin: &'a tokio_postgres::Client,
    db_url: &'a str,
    target: u64,
}

/// Drain `slot` with polysync; seconds until the slot confirms the target, peak RSS, CPU seconds.
async fn polysync_drain(
    b: &Backlog<'_>,
    slot: &str,
    sink: &str,
    pipelines: Vec<(&str, String)>,
    profile: Option<&Path>,
) -> Option<(f64, u64, f64)> {
    let (bin, admin, db_url, target) = (b.bin, b.admin, b.db_url, b.target);
    let cfg = format!("{}{sink}", source_cfg(db_url, slot, ""));
    let start = Instant::now();
    let d = Daemon::start(bin, slot, &cfg, &pipelines, free_port());
    let perf = profile.map(|out| {
        Command::new("perf")
            .args(["record", "-F", "499", "-g", "-o"])
            .arg(out)
            .args(["-p", &d.pid().to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()
    });
    let took = wait_confirmed(admin, slot, target, start, Duration::from_secs(1800)).await;
    let (_, peak) = daemon::memory(d.pid());
    let cpu = daemon::cpu_seconds(d.pid());
    if let Some(Some(mut p)) = perf {
        unsafe {
            libc::kill(p.id() as i32, libc::SIGINT);
        }
        let _ = p.wait();
    }
    if took.is_none() {
        eprintln!("polysync did not drain {slot}:\n{}", d.log_tail());
    }
    d.stop();
    took.map(|t| (t.as_secs_f64(), peak, cpu))
}

fn pg_recvlogical(db_url: &str, slot: &str, target: u64) -> Option<f64> {
    let start = Instant::now();
    let st = Command::new("pg_recvlogical")
        .args([
            "-d",
            db_url,
            "--slot",
            slot,
            "--start",
            "--no-loop",
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=bench_pub",
        ])
        .args(["--endpos", &workload::fmt_lsn(target), "-f", "/dev/null"])
        .status()
        .ok()?;
    st.success().then(|| start.elapsed().as_secs_f64())
}

/// The Debezium runner's command line (bench/debezium/run.sh), for database `db` and `slot`.
fn debezium_cmd(db: &str, slot: &str, expected: u64, extra: &[String]) -> Option<Command> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/debezium/run.sh");
    if !script.exists() {
        return None;
    }
    let mut c = Command::new("bash");
    c.arg(&script)
        .args(["127.0.0.1", "55432", db, "postgres", "postgres", slot, "bench_pub", &expected.to_string(), "1800"])
        .args(extra);
    Some(c)
}

/// The runner's JSON report (its last `{…}` line on stdout).
fn debezium_report(stdout: &[u8]) -> Option<(serde_json::Value, String)> {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{'))?;
    Some((serde_json::from_str(line).ok()?, line.to_string()))
}

/// Drain `expected` changes from `slot` with Debezium; seconds and the JSON line.
fn debezium(db: &str, slot: &str, expected: u64, extra: &[String]) -> Option<(f64, String)> {
    let out = debezium_cmd(db, slot, expected, extra)?.output().ok()?;
    if !out.status.success() {
        eprintln!(
            "bench: Debezium runner failed: {}",
            String::from_utf8_lossy(&out.stderr).lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        );
    }
    let (v, line) = debezium_report(&out.stdout)?;
    Some((v["seconds"].as_f64()?, line))
}

/// `--key` arguments making the Debezium Redis consumer delete the keys polysync's invalidate
/// pipelines delete (same tables, same templates).
fn debezium_redis_args(redis_url: &str, keys: &[(&str, &str)]) -> Vec<String> {
    let mut v = vec![
        "--consumer".to_string(),
        "redis".into(),
        "--redis".into(),
        redis_url.trim_start_matches("redis://").trim_end_matches('/').to_string(),
    ];
    for (t, k) in keys {
        v.push("--key".into());
        v.push(format!("{t}={k}"));
    }
    v
}

const DRAIN_KEYS: [(&str, &str); 4] = [
    ("products", "bench:product:{id}"),
    ("orders", "bench:orders:{user_id}"),
    ("order_items", "bench:order:{order_id}"),
    ("big", "bench:big:{id}"),
];

#[tokio::main]
async fn main() {
    let a = args();
    let bin = std::env::current_exe().unwrap().with_file_name("polysync");
    let admin_url = env("POLYSYNC_TEST_PG", "postgres://postgres:postgres@127.0.0.1:55432/postgres");
    let redis_url = env("POLYSYNC_TEST_REDIS", "redis://127.0.0.1:56379");
    let mut r = String::new();
    let date = chrono::Utc::now();
    let _ = writeln!(r, "# polysync benchmark, {}\n", date.format("%Y-%m-%d %H:%M UTC"));
    let _ = writeln!(r, "## Machine\n\n{}", machine());
    let _ = writeln!(
        r,
        "## Method\n\nEverything runs on this machine against the local servers (`make peers`): PostgreSQL with \
         `wal_level=logical`, Redis, OpenSearch, Gremlin Server (TinkerGraph), InfluxDB. polysync is the {} \
         build. Each figure is the median of {} runs with min–max in brackets. Throughput is row changes per second \
         of wall time from process start until the replication slot's `confirmed_flush_lsn` passes the last change \
         (so it includes start-up and the final confirmation). Before the changes are written, one pgoutput slot per \
         tool and run is created at the same position, so every tool drains an identical backlog.\n",
        if std::env::var("BENCH_PROFILE").is_ok_and(|p| p == "dev") {
            "tests' (`dev` profile: the crate at opt-level 1, its dependencies at 2; `--before` builds alike)"
        } else {
            "release"
        },
        a.runs
    );
    eprintln!("bench: machine and method recorded; scenarios follow");

    // ---------------------------------------------------------------- backlog drain
    let admin = connect(&admin_url).await;
    if a.runs("drain") {
        backlog_drain(&a, &bin, &admin_url, &redis_url, &mut r).await;
        workload::drop_db(&admin, "polysync_bench").await;
    }

    // ---------------------------------------------------------------- big transaction
    if a.runs("big") {
        let big_rows: u64 = if a.quick { 200_000 } else { 1_000_000 };
        let (db_url, db) = workload::fresh_db(&admin_url, "polysync_bench_big").await;
        for run in 0..a.runs {
            create_slot(&db, &format!("big_{run}")).await;
            if a.before.is_some() {
                create_slot(&db, &format!("big_before_{run}")).await;
            }
        }
        db.batch_execute(&format!("INSERT INTO big SELECT i, repeat('x', 100) FROM generate_series(1, {big_rows}) i"))
            .await
            .unwrap();
        let target = current_lsn(&db).await;
        let cache_sink = format!("[sinks.out]\nkind = \"cache\"\nurl = \"{redis_url}\"\n");
        // The current build and, with --before, the other one, alternating run by run.
        let mut builds = vec![("", bin.as_path())];
        if let Some(b) = a.before.as_deref() {
            builds.push(("before_", b));
        }
        let mut measured: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); builds.len()];
        for run in 0..a.runs {
            for (i, (tag, b)) in builds.iter().enumerate() {
                let big = Backlog { bin: b, admin: &db, db_url: &db_url, target };
                if let Some((s, peak, _)) =
                    polysync_drain(&big, &format!("big_{tag}{run}"), &cache_sink, invalidate_pipelines(), None).await
                {
                    measured[i].0.push(s);
                    measured[i].1.push(peak as f64 / 1048576.0);
                }
            }
        }
        let _ = writeln!(r, "## One transaction of {big_rows} rows (→ Redis invalidate)\n");
        for ((tag, b), (times, peaks)) in builds.iter().zip(&measured) {
            let who = if tag.is_empty() { String::new() } else { format!("before build (`{}`): ", b.display()) };
            let _ = writeln!(
                r,
                "* {who}time to apply: {} s; peak RSS (VmHWM): **{} MiB** (target ≤ 150 MB)",
                fmt_stats(times, "").trim(),
                fmt_stats(peaks, "").trim()
            );
        }
        let _ = writeln!(r);
        eprintln!("bench: big transaction done");
        workload::drop_db(&admin, "polysync_bench_big").await;
    }

    // ---------------------------------------------------------------- steady state
    if a.runs("steady") {
        let secs = if a.quick { 5 } else { 15 };
        let _ = writeln!(
            r,
            "## Steady state (→ Redis, version-guarded `set`)\n\nA generator inserts rows into `lat` at a fixed rate (batches every 10 ms) for {secs} s. \
             Latency is measured from the sink side: the harness subscribes to Redis keyspace notifications and \
             takes, for every key, the time from the generator's COMMIT returning to Redis announcing the write. \
             CPU is the daemon's user+system time over the run, in cores.\n"
        );
        let _ = writeln!(
            r,
            "| target rate | achieved changes/s | p50 ms | p99 ms | max ms | CPU cores | RSS MiB |\n|---|---|---|---|---|---|---|"
        );
        let (db_url, db) = workload::fresh_db(&admin_url, "polysync_bench_lat").await;
        create_slot(&db, "lat").await;
        let d = Daemon::start(
            &bin,
            "lat",
            &format!(
                "{}[sinks.out]\nkind = \"cache\"\nurl = \"{redis_url}\"\nlinger = \"1ms\"\n",
                source_cfg(&db_url, "lat", "")
            ),
            &[("lat", "source = \"shop\"\n[match]\nrelations = [\"public.lat\"]\n[[sink]]\ntarget = \"out\"\naction = \"set\"\nkey = \"lat:{{ key.id }}\"\nformat = \"json\"\n".into())],
            free_port(),
        );
        d.wait_ready(Duration::from_secs(30)).await;
        let mut next_id = 1i64;
        for rate in [1_000u64, 10_000, 50_000, 0] {
            let res = latency::run(
                &db_url,
                &redis_url,
                d.pid(),
                rate,
                Duration::from_secs(secs),
                &mut next_id,
                latency::Arrival::Set,
            )
            .await;
            let label = if rate == 0 { "as fast as possible".to_string() } else { format!("{rate}/s") };
            let _ = writeln!(
                r,
                "| {label} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} |",
                res.achieved, res.p50_ms, res.p99_ms, res.max_ms, res.cpu_cores, res.rss_mib
            );
            eprintln!("bench: steady state {label}: {:.0}/s p99 {:.1} ms", res.achieved, res.p99_ms);
        }
        d.stop();
        let _ = writeln!(
            r,
            "\nIn the last row the generator writes as fast as PostgreSQL takes rows, faster than polysync applies \
             them: the achieved rate is polysync's maximum for this sink, and the latency is the queue that builds up \
             behind it (rows still arrive; none are lost). The highest fixed rate held with a small, flat latency is \
             the sustained rate.\n"
        );
        steady_vs_debezium(&a, &bin, &db, &db_url, &redis_url, secs, &mut next_id, &mut r).await;
        workload::drop_db(&admin, "polysync_bench_lat").await;
    }

    // ---------------------------------------------------------------- fan-out
    if a.runs("fanout") {
        let fan_n: u64 = if a.quick { 50_000 } else { 200_000 };
        let (db_url, db) = workload::fresh_db(&admin_url, "polysync_bench_fan").await;
        create_slot(&db, "fan").await;
        let solo_sinks = ["cache", "search", "graph", "metrics"];
        for s in solo_sinks {
            create_slot(&db, &format!("fan_{s}")).await;
        }
        let n = workload::backlog(&db, fan_n).await;
        let target = current_lsn(&db).await;
        let idx = format!("bench-fan-{}", std::process::id());
        // Graph ids unique to this run: TinkerGraph keeps earlier runs' edges in memory.
        let gp = format!("bench{}:", std::process::id());
        let sinks = format!(
            "[sinks.cache]\nkind = \"cache\"\nurl = \"{redis_url}\"\n[sinks.search]\nkind = \"search\"\nurl = \"{}\"\n[sinks.graph]\nkind = \"graph\"\nurl = \"{}\"\n[sinks.metrics]\nkind = \"timeseries\"\nengine = \"influxdb\"\nurl = \"{}\"\ndatabase = \"bench\"\ncreate_database = true\n",
            env("POLYSYNC_TEST_OPENSEARCH", "http://127.0.0.1:59200"),
            env("POLYSYNC_TEST_GREMLIN", "ws://127.0.0.1:58182/gremlin"),
            env("POLYSYNC_TEST_INFLUX", "http://127.0.0.1:58086"),
        );
        let pipelines = vec![
            ("cache", "source = \"shop\"\n[match]\nrelations = [\"public.products\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"fan:product:{{ key.id }}\"\nformat = \"json\"\n".to_string()),
            ("search", format!("source = \"shop\"\n[match]\nrelations = [\"public.products\"]\n[[sink]]\ntarget = \"search\"\nindex = \"{idx}\"\nid = \"{{{{ key.id }}}}\"\n")),
            ("graph", format!("source = \"shop\"\n[match]\nrelations = [\"public.order_items\"]\n[[sink]]\ntarget = \"graph\"\n[[sink.edge]]\nlabel = \"bought\"\nid = \"{gp}{{{{ key.order_id }}}}:{{{{ key.product_id }}}}\"\nfrom = {{ label = \"customer\", id = \"{gp}c:{{{{ row.user_id }}}}\" }}\nto = {{ label = \"product\", id = \"{gp}p:{{{{ key.product_id }}}}\" }}\nproperties = {{ qty = \"row.qty\" }}\n")),
            ("metrics", "source = \"shop\"\n[match]\nrelations = [\"public.orders\"]\n[[sink]]\ntarget = \"metrics\"\n[[sink.point]]\nmeasurement = \"order_value\"\nops = [\"insert\"]\ntags = { region = \"{{ after.region }}\" }\nfields = { total = { path = \"after.total\", type = \"double\" } }\n".to_string()),
        ];
        let cfg = format!("{}{sinks}", source_cfg(&db_url, "fan", ""));
        let start = Instant::now();
        let d = Daemon::start(&bin, "fan", &cfg, &pipelines, free_port());
        let cpu_before = cpu::snapshot(d.pid());
        let mut finished: Vec<(String, f64, f64)> = Vec::new();
        let mut last: std::collections::HashMap<String, (f64, Instant)> = Default::default();
        // Until the slot is confirmed past the last change *and* every sink has applied what
        // it holds (a sink that fell behind may still be working through its spool).
        let backlog = |d: &Daemon| {
            let d = d.metrics.clone();
            async move {
                let text = daemon::http_get(&d, "/metrics").await.unwrap_or_default();
                text.lines()
                    .filter(|l| l.starts_with("polysync_sink_backlog_records{"))
                    .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
                    .sum::<f64>()
            }
        };
        while (confirmed(&db, "fan").await < target || backlog(&d).await > 0.0)
            && start.elapsed() < Duration::from_secs(1800)
        {
            for s in ["cache", "search", "graph", "metrics"] {
                let v = d.metric("polysync_sink_records_total", &[("sink", s)]).await;
                let e = last.entry(s.to_string()).or_insert((0.0, Instant::now()));
                if v > e.0 {
                    *e = (v, Instant::now());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let total = start.elapsed().as_secs_f64();
        let cpu_used = cpu::table(&cpu_before, &cpu::snapshot(d.pid()), total);
        for s in ["cache", "search", "graph", "metrics"] {
            let v = d.metric("polysync_sink_records_total", &[("sink", s)]).await;
            let at = last.get(s).map(|(_, t)| t.duration_since(start).as_secs_f64()).unwrap_or(total).max(0.001);
            finished.push((s.to_string(), v, at));
        }
        d.stop();
        let checked = fanout_convergence(&db, &redis_url, &idx, &gp).await;
        let _ = writeln!(
            r,
            "## Fan-out ({n} changes → cache + search + graph + timeseries at once)\n\nAll four sinks are fed by one source; \
             each sink progresses at its own pace (a sink that falls behind spools its records), and the slot is \
             confirmed up to what every sink has applied or spooled.\n"
        );
        let fan_table_at = r.len();
        let bound =
            finished.iter().max_by(|a, b| a.2.partial_cmp(&b.2).unwrap()).map(|x| x.0.clone()).unwrap_or_default();
        // Each sink alone on the same backlog (its own slot): its own ceiling. The index starts
        // empty again so the search figure is for new documents.
        let _ = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-X", "DELETE"])
            .arg(format!("{}/{idx}", env("POLYSYNC_TEST_OPENSEARCH", "http://127.0.0.1:59200")))
            .status();
        let mut solo = Vec::new();
        for (i, s) in solo_sinks.iter().enumerate() {
            let slot = format!("fan_{s}");
            let start = Instant::now();
            let cfg = format!("{}{sinks}", source_cfg(&db_url, &slot, ""));
            let d = Daemon::start(&bin, &slot, &cfg, &pipelines[i..=i], free_port());
            let took = wait_confirmed(&db, &slot, target, start, Duration::from_secs(1800)).await;
            let records = d.metric("polysync_sink_records_total", &[("sink", s)]).await;
            d.stop();
            if let Some(t) = took {
                solo.push((s.to_string(), records, t.as_secs_f64()));
            }
        }
        // Each server's most used client doing the same work on the same records (no polysync).
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let base_prefix = format!("base{}", std::process::id());
        let base_index = format!("{idx}-base");
        let mut base = Vec::new();
        match baseline::python(root) {
            Some(py) => {
                for (sink, loader) in [
                    ("cache", "cache"),
                    ("cache", "cache-plain"),
                    ("search", "search"),
                    ("graph", "graph"),
                    ("metrics", "influx"),
                ] {
                    if let Some(b) = baseline::run(&py, root, loader, fan_n, &base_prefix, &base_index) {
                        base.push((sink, loader, b));
                    }
                }
            }
            None => eprintln!("bench: no .local/bench-venv (bench/run.sh builds it); the baseline table is missing"),
        }
        let _ = writeln!(
            r,
            "\nWhole backlog confirmed after {total:.1} s ({:.0} changes/s); last sink to report progress: {bound}.\n",
            n as f64 / total
        );
        let _ = writeln!(
            r,
            "Each sink alone on the same backlog (its own slot; time includes start-up and reading the changes its pipeline skips):\n\n| sink | records | seconds | records/s |\n|---|---|---|---|"
        );
        for (s, v, t) in &solo {
            let _ = writeln!(r, "| {s} | {v:.0} | {t:.1} | {:.0} |", v / t);
        }
        if !base.is_empty() {
            let _ = writeln!(
                r,
                "\nEach sink alone against a hand-written loader on the same server (`bench/loaders/sinks.py`, the \
                 same records of the same backlog, in the same run; the loader's time is its writes only, polysync's \
                 includes start-up and reading every change of the slot):\n\n\
                 | sink | loader | loader records/s | polysync alone records/s | polysync ÷ loader |\n|---|---|---|---|---|"
            );
            for (sink, loader, b) in &base {
                let alone = solo.iter().find(|x| x.0 == *sink).map(|x| x.1 / x.2).unwrap_or(f64::NAN);
                let what = match *loader {
                    "cache" => "redis-py, pipelined EVALSHA of polysync's guard script, 512 per round trip",
                    "cache-plain" => "redis-py, pipelined plain SET/DEL (upper bound, no version guard)",
                    "search" => "`_bulk`, 500 documents per request, external_gte versions",
                    "graph" => "gremlinpython, mergeV/mergeV/mergeE per change, 100 changes per traversal",
                    _ => "line protocol, 5000 points per POST",
                };
                let rate = b.records / b.seconds.max(0.001);
                let _ = writeln!(r, "| {sink} | {what} | {rate:.0} | {alone:.0} | **{:.2}** |", alone / rate);
            }
            let _ = writeln!(r);
        }
        // The loaders' keys, documents and graph elements.
        let _ = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-X", "DELETE"])
            .arg(format!("{}/{base_index}", env("POLYSYNC_TEST_OPENSEARCH", "http://127.0.0.1:59200")))
            .status();
        converge::gremlin_query("g.V().hasId(startingWith(p)).drop()", serde_json::json!({ "p": base_prefix })).await;
        // The fan-out table, with each sink's rate as a share of its rate alone.
        let mut fan = String::from(
            "| sink | records | finished after s | records/s | alone records/s | fan-out ÷ alone |\n|---|---|---|---|---|---|\n",
        );
        for (s, v, at) in &finished {
            let alone = solo.iter().find(|x| &x.0 == s).map(|x| x.1 / x.2).unwrap_or(f64::NAN);
            let _ =
                writeln!(fan, "| {s} | {v:.0} | {at:.1} | {:.0} | {alone:.0} | **{:.2}** |", v / at, (v / at) / alone);
        }
        let _ = writeln!(
            fan,
            "\nCPU of each process during the fan-out ({total:.1} s; postgres summed over its processes that were \
             running at both readings). On two cores the servers and polysync share the machine, so a sink's \
             fan-out rate is bounded by the CPU its server gets while the others run:\n\n{cpu_used}"
        );
        r.insert_str(fan_table_at, &fan);
        let _ = writeln!(r, "\n{checked}");
        let _ = writeln!(
            r,
            "\nBatch sizes: cache 512 keys per pipeline, search 500 documents per `_bulk`, graph 100 changes per request, InfluxDB 5000 points per write (the defaults).\n"
        );
        let _ = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-X", "DELETE"])
            .arg(format!("{}/{idx}", env("POLYSYNC_TEST_OPENSEARCH", "http://127.0.0.1:59200")))
            .status();
        workload::drop_db(&admin, "polysync_bench_fan").await;
        converge::gremlin_query("g.V().hasId(startingWith(p)).drop()", serde_json::json!({ "p": gp })).await;
        eprintln!("bench: fan-out done");
    }

    // ---------------------------------------------------------------- outage
    if a.runs("outage") {
        let search_url = env("POLYSYNC_TEST_OPENSEARCH", "http://127.0.0.1:59200");
        let setup = outage::Setup {
            bin: &bin,
            admin_url: &admin_url,
            redis_url: &redis_url,
            search_url: &search_url,
            rate: if a.quick { 2_000 } else { 5_000 },
            baseline: Duration::from_secs(if a.quick { 10 } else { 30 }),
            outage: Duration::from_secs(if a.quick { 20 } else { 60 }),
            spool_bytes: 1 << 30,
            port: free_port(),
        };
        outage::run(&setup, &mut r).await;
    }

    let out = a.out.unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results").join(format!("{}.md", date.format("%Y-%m-%d-%H%M")))
    });
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&out, &r).expect("write report");
    println!("{r}");
    eprintln!("bench: report written to {}", out.display());
}

/// Backlog drain: the same backlog, one identical slot per tool and run.
async fn backlog_drain(a: &Args, bin: &Path, admin_url: &str, redis_url: &str, r: &mut String) {
    let (db_url, db) = workload::fresh_db(admin_url, "polysync_bench").await;
    let tools = ["recvlogical", "cache", "noop", "debezium", "debezium_redis", "before_cache", "before_noop"];
    for t in tools {
        for run in 0..a.runs {
            create_slot(&db, &format!("b_{t}_{run}")).await;
        }
    }
    let gen_start = Instant::now();
    let n = workload::backlog(&db, a.changes).await;
    let target = current_lsn(&db).await;
    eprintln!("bench: backlog of {n} changes written in {:.1}s", gen_start.elapsed().as_secs_f64());
    let (mut recv, mut cache, mut noop, mut dbz, mut dbz_redis) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut before_cache, mut before_noop) = (Vec::new(), Vec::new());
    let mut cache_cpu = Vec::new();
    let profile = std::env::temp_dir().join(format!("polysync-bench-{}.perf", std::process::id()));
    let (mut dbz_note, mut dbz_redis_note) = (String::new(), String::new());
    let cache_sink = format!("[sinks.out]\nkind = \"cache\"\nurl = \"{redis_url}\"\n");
    let noop_sink = "[sinks.out]\nkind = \"noop\"\n";
    let backlog = Backlog { bin, admin: &db, db_url: &db_url, target };
    let before = a.before.as_deref().map(|b| Backlog { bin: b, admin: &db, db_url: &db_url, target });
    let redis_args = debezium_redis_args(redis_url, &DRAIN_KEYS);
    for run in 0..a.runs {
        if let Some(s) = pg_recvlogical(&db_url, &format!("b_recvlogical_{run}"), target) {
            recv.push(n as f64 / s);
        }
        if let Some((s, _, cpu)) =
            polysync_drain(&backlog, &format!("b_cache_{run}"), &cache_sink, invalidate_pipelines(), None).await
        {
            cache.push(n as f64 / s);
            cache_cpu.push(cpu / s);
        }
        let prof = (run == 0 && which("perf")).then_some(profile.as_path());
        if let Some((s, _, _)) =
            polysync_drain(&backlog, &format!("b_noop_{run}"), noop_sink, noop_pipelines(), prof).await
        {
            noop.push(n as f64 / s);
        }
        if let Some(b) = &before {
            if let Some((s, _, _)) =
                polysync_drain(b, &format!("b_before_cache_{run}"), &cache_sink, invalidate_pipelines(), None).await
            {
                before_cache.push(n as f64 / s);
            }
            if let Some((s, _, _)) =
                polysync_drain(b, &format!("b_before_noop_{run}"), noop_sink, noop_pipelines(), None).await
            {
                before_noop.push(n as f64 / s);
            }
        }
        if a.debezium {
            match debezium("polysync_bench", &format!("b_debezium_{run}"), n, &[]) {
                Some((s, line)) => {
                    dbz.push(n as f64 / s);
                    dbz_note = line;
                }
                None => dbz_note = "the Debezium runner did not report (see bench/debezium/README.md)".into(),
            }
            match debezium("polysync_bench", &format!("b_debezium_redis_{run}"), n, &redis_args) {
                Some((s, line)) => {
                    dbz_redis.push(n as f64 / s);
                    dbz_redis_note = line;
                }
                None => dbz_redis_note = "the Debezium runner did not report (see bench/debezium/README.md)".into(),
            }
        }
        eprintln!("bench: backlog run {} done", run + 1);
    }
    let ratio = |a: &[f64], b: &[f64]| stats(a).0 / stats(b).0;
    let _ = writeln!(r, "## Backlog drain ({n} row changes)\n");
    let _ = writeln!(
        r,
        "Mix: 40 % product inserts, 10 % order inserts, 10 % order-item inserts, 25 % product updates, 15 % deletes, \
         in transactions of up to 50,000 rows. The Redis consumers delete one key per change (`bench:product:<id>`, \
         `bench:orders:<user_id>`, `bench:order:<order_id>`), in batches, acknowledging a batch only after Redis \
         answered.\n"
    );
    let _ = writeln!(r, "| tool | changes/s | vs pg_recvlogical |\n|---|---|---|");
    let _ = writeln!(r, "| pg_recvlogical (pgoutput to /dev/null) | {} | 1.00 |", fmt_stats(&recv, ""));
    let _ = writeln!(r, "| polysync → Redis (invalidate) | {} | {:.2} |", fmt_stats(&cache, ""), ratio(&cache, &recv));
    let _ = writeln!(r, "| polysync → noop sink | {} | {:.2} |", fmt_stats(&noop, ""), ratio(&noop, &recv));
    if let Some(b) = &a.before {
        let _ = writeln!(
            r,
            "| polysync before (`{}`) → Redis | {} | {:.2} |",
            b.display(),
            fmt_stats(&before_cache, ""),
            ratio(&before_cache, &recv)
        );
        let _ = writeln!(
            r,
            "| polysync before (`{}`) → noop | {} | {:.2} |",
            b.display(),
            fmt_stats(&before_noop, ""),
            ratio(&before_noop, &recv)
        );
    }
    if !dbz.is_empty() {
        let _ =
            writeln!(r, "| Debezium embedded (no-op consumer) | {} | {:.2} |", fmt_stats(&dbz, ""), ratio(&dbz, &recv));
    }
    if !dbz_redis.is_empty() {
        let _ = writeln!(
            r,
            "| Debezium embedded → Redis (DEL consumer) | {} | {:.2} |",
            fmt_stats(&dbz_redis, ""),
            ratio(&dbz_redis, &recv)
        );
    }
    let _ = writeln!(r);
    let _ = writeln!(
        r,
        "* polysync → Redis drains at **{:.2}×** pg_recvlogical (target ≥ 0.8), using {:.2} CPU cores on average.",
        ratio(&cache, &recv),
        stats(&cache_cpu).0
    );
    if a.before.is_some() {
        let _ = writeln!(
            r,
            "* Current build vs the `--before` build: → Redis **{:.2}×**, → noop **{:.2}×**.",
            ratio(&cache, &before_cache),
            ratio(&noop, &before_noop)
        );
    }
    if !dbz.is_empty() {
        let _ = writeln!(
            r,
            "* polysync noop / Debezium no-op: **{:.1}×** (target ≥ 5). Debezium's last report: `{dbz_note}`",
            ratio(&noop, &dbz)
        );
    }
    if !dbz_redis.is_empty() {
        let _ = writeln!(
            r,
            "* polysync → Redis / Debezium → Redis: **{:.1}×** (target ≥ 5). Debezium's last report: `{dbz_redis_note}`",
            ratio(&cache, &dbz_redis)
        );
    } else if a.debezium {
        let _ = writeln!(r, "* Debezium: {dbz_note} {dbz_redis_note}");
    }
    let _ = writeln!(r);
    if profile.exists() {
        let out = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "--percent-limit", "2", "--sort", "dso,symbol", "-i"])
            .arg(&profile)
            .output();
        if let Ok(o) = out {
            let text = String::from_utf8_lossy(&o.stdout);
            let lines: Vec<&str> =
                text.lines().filter(|l| l.contains('%') && !l.trim_start().starts_with('#')).take(20).collect();
            let _ = writeln!(
                r,
                "### Profile (perf, polysync → noop, first run; self time ≥ 2 %)\n\n```\n{}\n```\n",
                lines.join("\n")
            );
        }
        let _ = std::fs::remove_file(&profile);
    }
}

/// The steady workload through invalidating consumers, polysync and Debezium side by side:
/// polysync `invalidate`, Debezium with its Redis DEL consumer (both measured by the `del`
/// notifications), and Debezium with the no-op consumer (its own count of events).
#[allow(clippy::too_many_arguments)]
async fn steady_vs_debezium(
    a: &Args,
    bin: &Path,
    db: &tokio_postgres::Client,
    db_url: &str,
    redis_url: &str,
    secs: u64,
    next_id: &mut i64,
    r: &mut String,
) {
    let dur = Duration::from_secs(secs);
    let rates = [1_000u64, 10_000, 50_000, 0];
    let label = |rate: u64| if rate == 0 { "as fast as possible".to_string() } else { format!("{rate}/s") };
    let _ = writeln!(
        r,
        "### Steady state, invalidating consumers: polysync and Debezium\n\nThe same generator; before each \
         batch commits, the harness creates its rows' keys `lat:<id>` in Redis, and latency runs from the COMMIT \
         to Redis announcing the key's deletion. polysync runs an `invalidate` pipeline; Debezium's embedded \
         engine runs the DEL consumer of `bench/debezium` (one runner per rate, each on a fresh slot at the \
         current position, started before the generator). For Debezium's no-op consumer nothing is observable \
         in Redis: its row gives the events it counted and how long after the generator stopped the last one \
         arrived.\n"
    );
    let _ = writeln!(
        r,
        "| consumer | target rate | achieved changes/s | p50 ms | p99 ms | max ms | CPU cores | RSS MiB |\n|---|---|---|---|---|---|---|---|"
    );
    let row = |r: &mut String, who: &str, rate: u64, o: &latency::Outcome| {
        let _ = writeln!(
            r,
            "| {who} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} |",
            label(rate),
            o.achieved,
            o.p50_ms,
            o.p99_ms,
            o.max_ms,
            o.cpu_cores,
            o.rss_mib
        );
    };
    create_slot(db, "lat_inv").await;
    let d = Daemon::start(
        bin,
        "lat_inv",
        &format!(
            "{}[sinks.out]\nkind = \"cache\"\nurl = \"{redis_url}\"\nlinger = \"1ms\"\n",
            source_cfg(db_url, "lat_inv", "")
        ),
        &[("lat", "source = \"shop\"\n[match]\nrelations = [\"public.lat\"]\n[[sink]]\ntarget = \"out\"\naction = \"invalidate\"\nkeys = [\"lat:{{ key.id }}\"]\n".into())],
        free_port(),
    );
    d.wait_ready(Duration::from_secs(30)).await;
    let mut polysync_max = f64::NAN;
    for rate in rates {
        let o = latency::run(db_url, redis_url, d.pid(), rate, dur, next_id, latency::Arrival::Del).await;
        row(r, "polysync → Redis (invalidate)", rate, &o);
        eprintln!("bench: steady invalidate {}: {:.0}/s p99 {:.1} ms", label(rate), o.achieved, o.p99_ms);
        polysync_max = o.achieved;
    }
    d.stop();
    let _ = db.batch_execute("SELECT pg_drop_replication_slot('lat_inv')").await;
    if !a.debezium {
        let _ = writeln!(r);
        return;
    }
    let mut dbz_max = f64::NAN;
    let redis_args = debezium_redis_args(redis_url, &[("lat", "lat:{id}")]);
    for (who, extra, arrival) in [
        ("Debezium → Redis (DEL consumer)", redis_args, latency::Arrival::Del),
        ("Debezium (no-op consumer)", Vec::new(), latency::Arrival::Untracked),
    ] {
        for rate in rates {
            let slot = format!("lat_dbz_{}_{rate}", if arrival == latency::Arrival::Del { "redis" } else { "noop" });
            create_slot(db, &slot).await;
            match debezium_steady(db, db_url, redis_url, &slot, &extra, rate, dur, next_id, arrival).await {
                Some((o, report)) if arrival == latency::Arrival::Del => {
                    row(r, who, rate, &o);
                    eprintln!("bench: steady Debezium DEL {}: {:.0}/s p99 {:.1} ms", label(rate), o.achieved, o.p99_ms);
                    dbz_max = o.achieved;
                    let _ = report;
                }
                Some((o, report)) => {
                    let events = report["events"].as_f64().unwrap_or(0.0);
                    let _ = writeln!(
                        r,
                        "| {who} | {} | {} events of {} sent; last one {:.1} s after the generator stopped | | | | {:.2} | {:.0} |",
                        label(rate),
                        events,
                        o.sent,
                        report["lag_after_end_s"].as_f64().unwrap_or(f64::NAN),
                        o.cpu_cores,
                        o.rss_mib
                    );
                }
                None => {
                    let _ = writeln!(r, "| {who} | {} | the runner did not report | | | | | |", label(rate));
                }
            }
            let _ = db.batch_execute(&format!("SELECT pg_drop_replication_slot('{slot}')")).await;
        }
    }
    let _ = writeln!(
        r,
        "\nAs fast as possible, invalidating: polysync **{polysync_max:.0}/s**, Debezium **{dbz_max:.0}/s**: **{:.1}×** (target ≥ 5).\n",
        polysync_max / dbz_max
    );
}

/// One Debezium runner over a steady run: started on `slot`, ready, then the generator at
/// `rate` for `dur`, then a row in `lat_done` ends it. The outcome (measured in Redis unless
/// `Untracked`) and the runner's report, with `lag_after_end_s` added.
#[allow(clippy::too_many_arguments)]
async fn debezium_steady(
    db: &tokio_postgres::Client,
    db_url: &str,
    redis_url: &str,
    slot: &str,
    extra: &[String],
    rate: u64,
    dur: Duration,
    next_id: &mut i64,
    arrival: latency::Arrival,
) -> Option<(latency::Outcome, serde_json::Value)> {
    let ready = std::env::temp_dir().join(format!("polysync-bench-{}-{slot}.ready", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let mut args =
        vec!["--until-table".to_string(), "lat_done".into(), "--ready-file".into(), ready.display().to_string()];
    args.extend(extra.iter().cloned());
    let mut child = debezium_cmd("polysync_bench_lat", slot, 0, &args)?
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    let t0 = Instant::now();
    while !ready.exists() {
        if t0.elapsed() > Duration::from_secs(180) || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            let out = child.wait_with_output().ok()?;
            eprintln!("bench: the Debezium runner did not start: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The task has started; give the replication stream a moment to open.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let o = latency::run(db_url, redis_url, child.id(), rate, dur, next_id, arrival).await;
    let gen_end = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as f64;
    let marker = *next_id;
    let _ = db.batch_execute(&format!("INSERT INTO lat_done VALUES ({marker})")).await;
    // The runner ends at the marker; give it up to 5 minutes to get there.
    let t1 = Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if t1.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = child.wait_with_output().ok()?;
    let _ = std::fs::remove_file(&ready);
    let Some((mut v, _)) = debezium_report(&out.stdout) else {
        eprintln!(
            "bench: the Debezium runner did not report: {}",
            String::from_utf8_lossy(&out.stderr).lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        );
        return None;
    };
    if let Some(last) = v["last_event_epoch_ms"].as_f64() {
        v["lag_after_end_s"] = serde_json::json!(((last - gen_end) / 1000.0).max(0.0));
    }
    Some((o, v))
}

fn which(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {cmd}")).output().is_ok_and(|o| o.status.success())
}

/// After the fan-out: the cache, the index and the graph compared with the tables key by key
/// (the same checker as the fault-injection tests). InfluxDB is left out: points of one
/// transaction and region share measurement, tags and time, so they overwrite each other by
/// design and there is no per-row state to compare.
async fn fanout_convergence(db: &tokio_postgres::Client, redis_url: &str, index: &str, graph_prefix: &str) -> String {
    use fred::prelude::*;
    let products = converge::pg_rows(
        db,
        "SELECT id::text, row_to_json(t)::text FROM (SELECT id, sku, name, price, stock FROM products) t",
    )
    .await;
    let items = converge::pg_rows(
        db,
        &format!(
            "SELECT order_id || ':' || product_id, json_build_object('from', '{graph_prefix}c:' || user_id, 'to', '{graph_prefix}p:' || product_id)::text FROM order_items"
        ),
    )
    .await;
    let redis = match Config::from_url(redis_url).and_then(|c| Builder::from_config(c).build()) {
        Ok(client) => client,
        Err(e) => return format!("Convergence not checked: Redis: {e}"),
    };
    if let Err(e) = redis.init().await {
        return format!("Convergence not checked: Redis: {e}");
    }
    let mut diffs = converge::diff("cache", &products, &converge::redis_docs(&redis, "fan:product:").await);
    diffs.extend(converge::diff("search", &products, &converge::search_docs(index).await));
    diffs.extend(converge::diff("graph", &items, &converge::graph_edges(graph_prefix).await));
    let _ = redis.quit().await;
    let counts =
        format!("{} products in the cache and the index, {} order items as graph edges", products.len(), items.len());
    if diffs.is_empty() {
        format!("**Convergence** after the fan-out (`tests/support/converge.rs`, key by key): {counts}; no difference.")
    } else {
        format!(
            "**Convergence FAILED** after the fan-out ({counts}): {} differences, first: {:?}",
            diffs.len(),
            &diffs[..diffs.len().min(5)]
        )
    }
}
