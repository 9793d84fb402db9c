//! Steady-state latency measured from the sink side: rows inserted at a fixed rate, Redis
//! keyspace notifications timestamp each key's arrival (a `set` of `lat:<id>`, or its `del`
//! for invalidating consumers), latency = arrival − the generator's COMMIT returning for that
//! row. The same measurement serves polysync and the Debezium runner.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fred::prelude::*;

use crate::daemon;
use crate::workload::connect;

/// One rate's figures.
pub struct Outcome {
    /// Changes applied per second.
    pub achieved: f64,
    /// Latency percentiles.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
    /// Daemon CPU over the run, in cores.
    pub cpu_cores: f64,
    /// Daemon resident memory at the end.
    pub rss_mib: f64,
    /// Rows the generator committed.
    pub sent: usize,
}

/// What marks a row's arrival in Redis.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The consumer writes `lat:<id>`.
    Set,
    /// The consumer deletes `lat:<id>`; the generator creates each key before its row commits
    /// (a DEL of a missing key is not announced).
    Del,
    /// Not observed (a consumer that writes nothing): only the load is generated.
    Untracked,
}

/// Insert into `lat` at `rate` rows/s (0: as fast as possible) for `dur`, then wait for every
/// key to arrive (up to 30 s more). `pid` is the consumer process (CPU and memory).
pub async fn run(
    db_url: &str,
    redis_url: &str,
    pid: u32,
    rate: u64,
    dur: Duration,
    next_id: &mut i64,
    arrival: Arrival,
) -> Outcome {
    let cfg = Config::from_url(redis_url).expect("redis url");
    let admin = Builder::from_config(cfg.clone()).build().expect("redis client");
    admin.init().await.expect("redis");
    let _: Value = admin
        .custom(
            fred::types::CustomCommand::new_static("CONFIG", None, false),
            vec!["SET".to_string(), "notify-keyspace-events".into(), "E$g".into()],
        )
        .await
        .expect("enable keyspace notifications");
    drop(cfg);
    let arrivals: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let store = Arc::clone(&arrivals);
    let addr = redis_url.trim_start_matches("redis://").trim_end_matches('/').to_string();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let event = if arrival == Arrival::Set { "set" } else { "del" };
    let listener = (arrival != Arrival::Untracked).then(|| tokio::spawn(subscribe(addr, event, store, ready_tx)));
    if listener.is_some() {
        let _ = ready_rx.await;
    }

    let db = connect(db_url).await;
    let first_id = *next_id;
    let mut commits: Vec<Instant> = Vec::new(); // index: id - first_id
    let cpu0 = daemon::cpu_seconds(pid);
    let start = Instant::now();
    let batch = if rate == 0 { 1000 } else { (rate / 100).max(1) };
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while start.elapsed() < dur {
        if rate != 0 {
            tick.tick().await;
        }
        let from = *next_id;
        let to = from + batch as i64 - 1;
        if arrival == Arrival::Del {
            let keys: Vec<(String, String)> = (from..=to).map(|i| (format!("lat:{i}"), "x".to_string())).collect();
            let _: () = admin.mset(keys).await.expect("create the keys to be deleted");
        }
        db.batch_execute(&format!("INSERT INTO lat (id) SELECT generate_series({from}, {to})")).await.expect("insert");
        let at = Instant::now();
        for _ in from..=to {
            commits.push(at);
        }
        *next_id = to + 1;
    }
    let sent = commits.len();
    let deadline = Instant::now() + Duration::from_secs(if arrival == Arrival::Untracked { 0 } else { 30 });
    while arrivals.lock().unwrap().len() < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = daemon::cpu_seconds(pid) - cpu0;
    let (rss, _) = daemon::memory(pid);
    if let Some(l) = listener {
        l.abort();
    }
    let got = arrivals.lock().unwrap().clone();
    let mut lat: Vec<f64> = got
        .iter()
        .filter_map(|(id, t)| {
            let i = (id - first_id) as usize;
            commits.get(i).map(|c| t.saturating_duration_since(*c).as_secs_f64() * 1000.0)
        })
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| if lat.is_empty() { f64::NAN } else { lat[((lat.len() as f64 - 1.0) * p) as usize] };
    let last_arrival = got.iter().map(|(_, t)| *t).max().unwrap_or(start);
    let span = last_arrival.duration_since(start).as_secs_f64().max(dur.as_secs_f64() * 0.5);
    if got.len() < sent && arrival != Arrival::Untracked {
        eprintln!(
            "bench: {} of {sent} keys had arrived 30 s after the run ended (the rest were still queued)",
            got.len()
        );
    }
    Outcome {
        achieved: got.len() as f64 / span,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        cpu_cores: cpu / wall,
        rss_mib: rss as f64 / 1048576.0,
        sent,
    }
}

/// A plain RESP subscriber (one connection, `SUBSCRIBE`, then `message` pushes): the arrival of
/// every `lat:<id>` key, timestamped when read.
async fn subscribe(
    addr: String,
    event: &'static str,
    store: Arc<Mutex<Vec<(i64, Instant)>>>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut s = tokio::net::TcpStream::connect(&addr).await.expect("redis for notifications");
    s.write_all(format!("SUBSCRIBE __keyevent@0__:{event}\r\n").as_bytes()).await.expect("subscribe");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let mut ready = Some(ready);
    // Every push is an array of three bulk strings; the key is the last line of each push.
    let mut pending: Vec<String> = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let l = line.trim_end();
        if l.starts_with('*') || l.starts_with('$') || l.starts_with(':') {
            if l.starts_with(':')
                && let Some(tx) = ready.take()
            {
                let _ = tx.send(()); // the subscription is confirmed
            }
            continue;
        }
        pending.push(l.to_string());
        if pending.len() == 3 {
            if pending[0] == "message"
                && let Some(id) = pending[2].strip_prefix("lat:").and_then(|x| x.parse::<i64>().ok())
            {
                store.lock().unwrap().push((id, Instant::now()));
            }
            pending.clear();
        } else if pending.len() == 2 && pending[0] == "subscribe" {
            pending.clear();
        }
    }
}
