//! Outage scenario: a steady rate of changes into a cache and a search index, with OpenSearch
//! frozen (SIGSTOP) for a while in the middle. Per-sink progress means the cache keeps its
//! latency while the index is away, the slot's lag stays within the search sink's spool, and
//! after SIGCONT the index catches up until both equal the table key by key.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::daemon::Daemon;
use crate::latency::{self, Arrival, Outcome};
use crate::{converge, workload};

/// What the scenario needs from the harness.
pub struct Setup<'a> {
    /// polysync binary.
    pub bin: &'a Path,
    /// Administrative database URL (a fresh database is made from it).
    pub admin_url: &'a str,
    /// Redis.
    pub redis_url: &'a str,
    /// OpenSearch base URL.
    pub search_url: &'a str,
    /// Changes per second.
    pub rate: u64,
    /// Seconds without the outage, then with it.
    pub baseline: Duration,
    /// How long OpenSearch is stopped.
    pub outage: Duration,
    /// The search sink's spool quota.
    pub spool_bytes: u64,
    /// Metrics port.
    pub port: u16,
}

/// The OpenSearch process `make peers` started.
fn opensearch_pid() -> Option<i32> {
    std::fs::read_to_string(".local/opensearch.pid").ok()?.trim().parse().ok()
}

fn signal(pid: i32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// Slot lag in bytes (current WAL − confirmed).
async fn slot_lag(db: &tokio_postgres::Client, slot: &str) -> u64 {
    let lsn = workload::current_lsn(db).await;
    lsn.saturating_sub(workload::confirmed(db, slot).await)
}

fn row(r: &mut String, phase: &str, o: &Outcome) {
    let _ = writeln!(
        r,
        "| {phase} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} |",
        o.sent, o.achieved, o.p50_ms, o.p99_ms, o.max_ms, o.cpu_cores, o.rss_mib
    );
}

/// Run the scenario and append its section to the report.
pub async fn run(s: &Setup<'_>, r: &mut String) {
    let Some(os_pid) = opensearch_pid() else {
        let _ = writeln!(r, "## Outage\n\nNot run: no `.local/opensearch.pid` (start the peers with `make peers`).\n");
        return;
    };
    let admin = workload::connect(s.admin_url).await;
    let (db_url, db) = workload::fresh_db(s.admin_url, "polysync_bench_outage").await;
    workload::create_slot(&db, "outage").await;
    // The latency probe watches `lat:<id>` keys: none may be left from another scenario.
    let _ = Command::new("sh")
        .arg("-c")
        .arg("redis-cli -p 56379 --scan --pattern 'lat:*' | xargs -r -n 5000 redis-cli -p 56379 unlink >/dev/null")
        .status();
    let index = format!("bench-outage-{}", std::process::id());
    let config = format!(
        "[runtime]\nlanes = 4\nshutdown_timeout = \"30s\"\nspool_max_bytes = {}\n\
         [sources.shop]\nkind = \"postgres\"\nurl = \"{db_url}\"\nsslmode = \"disable\"\nslot = \"outage\"\npublication = \"bench_pub\"\nsignal_table = \"\"\nstatus_interval = \"100ms\"\n\
         [sinks.cache]\nkind = \"cache\"\nurl = \"{}\"\nlinger = \"1ms\"\n\
         [sinks.search]\nkind = \"search\"\nurl = \"{}\"\ntimeout = \"5s\"\n",
        s.spool_bytes, s.redis_url, s.search_url
    );
    let pipelines = [
        ("cache", "source = \"shop\"\n[match]\nrelations = [\"public.lat\"]\n[[sink]]\ntarget = \"cache\"\naction = \"set\"\nkey = \"lat:{{ key.id }}\"\nformat = \"json\"\n".to_string()),
        ("search", format!("source = \"shop\"\n[match]\nrelations = [\"public.lat\"]\n[[sink]]\ntarget = \"search\"\nindex = \"{index}\"\nid = \"{{{{ key.id }}}}\"\n")),
    ];
    let d = Daemon::start(s.bin, "outage", &config, &pipelines, s.port);
    d.wait_ready(Duration::from_secs(60)).await;
    let mut next_id = 1i64;
    eprintln!("bench: outage: {} s at {}/s without the outage", s.baseline.as_secs(), s.rate);
    let before = latency::run(&db_url, s.redis_url, d.pid(), s.rate, s.baseline, &mut next_id, Arrival::Set).await;
    // Wait until the index has caught up too, so the outage starts from a level state.
    let level = workload::current_lsn(&db).await;
    let _ = workload::wait_confirmed(&db, "outage", level, Instant::now(), Duration::from_secs(300)).await;

    eprintln!("bench: outage: OpenSearch stopped for {} s", s.outage.as_secs());
    signal(os_pid, "STOP");
    let sampling = std::sync::atomic::AtomicBool::new(true);
    let sampler = async {
        let (mut lag, mut spool) = (0u64, 0f64);
        while sampling.load(std::sync::atomic::Ordering::SeqCst) {
            lag = lag.max(slot_lag(&db, "outage").await);
            spool = spool.max(d.metric("polysync_sink_spool_bytes", &[("sink", "search")]).await);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        (lag, spool)
    };
    let load = async {
        let during = latency::run(&db_url, s.redis_url, d.pid(), s.rate, s.outage, &mut next_id, Arrival::Set).await;
        signal(os_pid, "CONT");
        let resumed = Instant::now();
        let end = workload::current_lsn(&db).await;
        let _ = workload::wait_confirmed(&db, "outage", end, resumed, Duration::from_secs(900)).await;
        // Caught up: the index applied everything its spool held.
        let mut caught_up = None;
        while resumed.elapsed() < Duration::from_secs(900) {
            if d.metric("polysync_sink_backlog_records", &[("sink", "search")]).await == 0.0 {
                caught_up = Some(resumed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        sampling.store(false, std::sync::atomic::Ordering::SeqCst);
        (during, caught_up)
    };
    let cpu_before = crate::cpu::snapshot(d.pid());
    let cpu_started = Instant::now();
    let ((max_lag, max_spool), (during, caught_up)) = tokio::join!(sampler, load);
    let cpu_used = crate::cpu::table(&cpu_before, &crate::cpu::snapshot(d.pid()), cpu_started.elapsed().as_secs_f64());
    d.stop();

    // Key by key: every row of the table is in the cache and in the index, nothing else is.
    let rows: BTreeSet<String> =
        db.query("SELECT id::text FROM lat", &[]).await.expect("rows").iter().map(|r| r.get(0)).collect();
    let redis = fred::prelude::Builder::from_config(fred::prelude::Config::from_url(s.redis_url).expect("redis url"))
        .build()
        .expect("redis client");
    use fred::prelude::ClientLike;
    let cache_keys: BTreeSet<String> = match redis.init().await {
        Ok(_) => converge::redis_docs(&redis, "lat:").await.into_keys().collect(),
        Err(_) => BTreeSet::new(),
    };
    let index_keys: BTreeSet<String> = converge::search_docs(&index).await.into_keys().collect();
    let differ = |got: &BTreeSet<String>| rows.symmetric_difference(got).count();
    let (cache_diff, index_diff) = (differ(&cache_keys), differ(&index_keys));

    let _ = writeln!(
        r,
        "## Outage (cache + search at {} changes/s, OpenSearch stopped for {} s)\n\n\
         (The issue asks for 10,000 changes/s. On this machine's two cores OpenSearch indexing at that \
         rate takes most of a core and polysync's cache fell 18 s behind *without* any outage (first \
         run, 2026-12-02), so the rate is set to what both sinks sustain here.)\n\n\
         One source feeds a version-guarded cache `set` and a search index from `lat`. The generator inserts at a fixed \
         rate; cache latency is measured as in the steady-state section (COMMIT returned → Redis announces the key). \
         First {} s with every server up, then {} s with OpenSearch frozen by SIGSTOP (its connections stay open and \
         silent, the hardest kind of outage for a client), then SIGCONT. The search sink's spool quota is {} MiB \
         (`runtime.spool_max_bytes`).\n",
        s.rate,
        s.outage.as_secs(),
        s.baseline.as_secs(),
        s.outage.as_secs(),
        s.spool_bytes / 1048576
    );
    let _ = writeln!(
        r,
        "| phase | rows | cache achieved/s | p50 ms | p99 ms | max ms | daemon CPU cores | RSS MiB |\n|---|---|---|---|---|---|---|---|"
    );
    row(r, "all servers up", &before);
    row(r, "OpenSearch stopped", &during);
    let ratio = during.p99_ms / before.p99_ms;
    let _ = writeln!(
        r,
        "\n* Cache p99 during the outage: **{ratio:.2}×** its p99 without it (target ≤ 2×).\n\
         * Slot lag at most **{:.1} MiB** during the outage; the search spool held at most {:.1} MiB of its {} MiB \
         quota (the slot is confirmed past what the spool holds, so the database keeps only what is not yet spooled).\n\
         * After SIGCONT the index had applied everything its spool held after **{}**.\n\
         * Key by key after catching up: {} rows; cache {}, index {}.\n",
        max_lag as f64 / 1048576.0,
        max_spool / 1048576.0,
        s.spool_bytes / 1048576,
        caught_up
            .map(|t| format!("{:.1} s", t.as_secs_f64()))
            .unwrap_or_else(|| "more than 900 s (not caught up)".into()),
        rows.len(),
        if cache_diff == 0 { "equal".to_string() } else { format!("{cache_diff} keys differ") },
        if index_diff == 0 { "equal".to_string() } else { format!("{index_diff} keys differ") },
    );
    let _ = writeln!(r, "CPU of each process from the outage to the end of the catch-up:\n\n{cpu_used}");
    let _ = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-X", "DELETE"])
        .arg(format!("{}/{index}", s.search_url))
        .status();
    workload::drop_db(&admin, "polysync_bench_outage").await;
    eprintln!("bench: outage done (p99 {:.1} → {:.1} ms)", before.p99_ms, during.p99_ms);
}
