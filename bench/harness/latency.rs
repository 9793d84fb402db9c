//! Steady-state latency measured from the sink side: rows inserted at a fixed rate, Redis
//! keyspace notifications timestamp each key's arrival, latency = arrival − the generator's
//! COMMIT returning for that row.

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
}

/// Insert into `lat` at `rate` rows/s (0: as fast as possible) for `dur`, then wait for every
/// key to arrive (up to 30 s more).
pub async fn run(db_url: &str, redis_url: &str, pid: u32, rate: u64, dur: Duration, next_id: &mut i64) -> Outcome {
    let cfg = Config::from_url(redis_url).expect("redis url");
    let admin = Builder::from_config(cfg.clone()).build().expect("redis client");
    admin.init().await.expect("redis");
    let _: Value = admin
        .custom(
            fred::types::CustomCommand::new_static("CONFIG", None, false),
            vec!["SET".to_string(), "notify-keyspace-events".into(), "E$".into()],
        )
        .await
        .expect("enable keyspace notifications");
    drop(cfg);
    let arrivals: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let store = Arc::clone(&arrivals);
    let addr = redis_url.trim_start_matches("redis://").trim_end_matches('/').to_string();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let listener = tokio::spawn(subscribe(addr, store, ready_tx));
    let _ = ready_rx.await;

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
        db.batch_execute(&format!("INSERT INTO lat (id) SELECT generate_series({from}, {to})")).await.expect("insert");
        let at = Instant::now();
        for _ in from..=to {
            commits.push(at);
        }
        *next_id = to + 1;
    }
    let sent = commits.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while arrivals.lock().unwrap().len() < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = daemon::cpu_seconds(pid) - cpu0;
    let (rss, _) = daemon::memory(pid);
    listener.abort();
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
    if got.len() < sent {
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
    }
}

/// A plain RESP subscriber (one connection, `SUBSCRIBE`, then `message` pushes): the arrival of
/// every `lat:<id>` key, timestamped when read.
async fn subscribe(addr: String, store: Arc<Mutex<Vec<(i64, Instant)>>>, ready: tokio::sync::oneshot::Sender<()>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut s = tokio::net::TcpStream::connect(&addr).await.expect("redis for notifications");
    s.write_all(b"SUBSCRIBE __keyevent@0__:set\r\n").await.expect("subscribe");
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
