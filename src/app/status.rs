//! `polysync status`: one view of a daemon, per source and per sink, without `curl /metrics |
//! grep`. It asks the running daemon (its `/status` and `/metrics` on `metrics.listen`) and,
//! when no daemon answers, reads what `state_dir` holds (the last confirmed position, snapshot
//! progress, dead letters, spools), saying which of the two it shows.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::Config;
use crate::checkpoint::origin::{OriginRecord, origin_path};
use crate::checkpoint::snapshot::{SnapshotProgress, progress_path};
use crate::source::SourceConfig;
use crate::telemetry::http::probe;

/// One metric sample: its labels and value.
type Samples = Vec<(BTreeMap<String, String>, f64)>;

/// Prometheus text → name → samples.
fn parse_metrics(text: &str) -> BTreeMap<String, Samples> {
    let mut out: BTreeMap<String, Samples> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        // Label values never contain `",` in what polysync exports (names of sources, sinks,
        // pipelines and fixed words), so a plain split is exact here.
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            if let Some((k, v)) = pair.split_once("=\"") {
                map.insert(k.to_string(), v.trim_end_matches('"').to_string());
            }
        }
        out.entry(name.to_string()).or_default().push((map, value));
    }
    out
}

fn sample(m: &BTreeMap<String, Samples>, name: &str, label: (&str, &str)) -> Option<f64> {
    let samples = m.get(name)?;
    let hits: Vec<f64> =
        samples.iter().filter(|(l, _)| l.get(label.0).map(String::as_str) == Some(label.1)).map(|(_, v)| *v).collect();
    (!hits.is_empty()).then(|| hits.iter().sum())
}

fn fmt_lsn(l: u64) -> String {
    format!("{:X}/{:X}", l >> 32, l & 0xffff_ffff)
}

/// Open dead letters per pipeline (not replayed, not discarded), from the files.
async fn dead_letters(config: &Config) -> Value {
    let sel = super::dlq_replay::Selection::default();
    match super::dlq_replay::select_with_standing(config, &sel).await {
        Ok(entries) => {
            let mut per: BTreeMap<String, u64> = BTreeMap::new();
            for (e, _) in entries {
                *per.entry(e.pipeline).or_default() += 1;
            }
            json!(per)
        }
        Err(e) => json!({ "error": e }),
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

fn snapshots(config: &Config, source: &str) -> Value {
    match SnapshotProgress::load(&progress_path(&config.state_dir, source)) {
        Ok(p) => json!(p.tasks.iter().map(|t| t.describe()).collect::<Vec<_>>()),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

/// Gather the status: from the running daemon if it answers within two seconds, otherwise
/// from `state_dir`.
pub async fn gather(config: &Config) -> Value {
    let addr = config.metrics.listen.to_string();
    let wait = Duration::from_secs(2);
    let asked = if config.metrics.enabled {
        (probe(&addr, "/status", wait).await, probe(&addr, "/metrics", wait).await)
    } else {
        (Err("metrics disabled".into()), Err("metrics disabled".into()))
    };
    let live = match asked {
        (Ok((200, status)), Ok((200, metrics))) => {
            Some((serde_json::from_str::<Value>(&status).unwrap_or(Value::Null), parse_metrics(&metrics)))
        }
        _ => None,
    };
    let mut sources = serde_json::Map::new();
    for (name, cfg) in &config.sources {
        let origin = match cfg {
            SourceConfig::Postgres(_) => OriginRecord::load(&origin_path(&config.state_dir, name)).ok().flatten(),
            SourceConfig::Dynamodb(_) => None,
        };
        let mut s = json!({ "kind": cfg.kind(), "snapshots": snapshots(config, name) });
        if let SourceConfig::Postgres(pg) = cfg {
            s["slot"] = json!(pg.slot);
        }
        if let Some(o) = &origin {
            s["recorded_confirmed_lsn"] = json!(fmt_lsn(o.confirmed_lsn));
            s["recorded_at"] = json!(o.updated.to_rfc3339());
        }
        if let Some((status, m)) = &live {
            let label = ("source", name.as_str());
            s["connected"] = json!(sample(m, "polysync_source_connected", label).map(|v| v >= 1.0));
            s["lag_bytes"] = json!(sample(m, "polysync_pg_slot_lag_bytes", label));
            s["lag_seconds"] = json!(sample(m, "polysync_source_lag_seconds", label));
            s["confirmed_lsn"] = json!(sample(m, "polysync_pg_confirmed_flush_lsn", label).map(|v| fmt_lsn(v as u64)));
            s["in_flight_changes"] = json!(sample(m, "polysync_in_flight_changes", label));
            if matches!(cfg, SourceConfig::Dynamodb(_)) {
                s["shards_owned"] = json!(sample(m, "polysync_ddb_shards_owned", label));
            }
            s["health"] = status["components"][format!("source {name}")].clone();
        }
        sources.insert(name.clone(), s);
    }
    let mut sinks = serde_json::Map::new();
    for (name, cfg) in &config.sinks {
        let spool_dir = config.state_dir.join("spool").join(name);
        let mut s = json!({ "kind": cfg.kind(), "spool_bytes_on_disk": dir_bytes(&spool_dir) });
        if let Some((status, m)) = &live {
            let label = ("sink", name.as_str());
            s["up"] = json!(sample(m, "polysync_sink_up", label).map(|v| v >= 1.0));
            s["records_behind"] = json!(sample(m, "polysync_sink_backlog_records", label));
            s["lag_seconds"] = json!(sample(m, "polysync_sink_lag_seconds", label));
            s["spool_bytes"] = json!(sample(m, "polysync_sink_spool_bytes", label));
            let health = &status["components"][format!("sink {name}")];
            s["error"] = health["error"].clone();
            s["last_error"] = health["last_error"].clone();
        }
        sinks.insert(name.clone(), s);
    }
    let mut out = json!({
        "daemon": if live.is_some() { json!({ "running": true, "address": addr }) }
                  else if config.metrics.enabled { json!({ "running": false, "address": addr, "shown": "state_dir only" }) }
                  else { json!({ "running": null, "address": null, "shown": "state_dir only (metrics.enabled = false: the daemon is not asked)" }) },
        "sources": sources,
        "sinks": sinks,
        "dead_letters": dead_letters(config).await,
    });
    if let Some((status, m)) = &live {
        out["last_reload"] = status["last_reload"].clone();
        let count = |r: &str| sample(m, "polysync_config_reloads_total", ("result", r)).unwrap_or(0.0);
        out["reloads"] = json!({ "ok": count("ok"), "error": count("error") });
    }
    out
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 => format!("{f:.0}"),
            Some(f) => format!("{f:.2}"),
            None => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// The status as lines for a person.
pub fn render(s: &Value) -> String {
    let mut out = String::new();
    let d = &s["daemon"];
    if d["running"] == json!(true) {
        out.push_str(&format!("daemon: running ({})\n", show(&d["address"])));
    } else if d["running"].is_null() {
        out.push_str("daemon: not asked (metrics.enabled = false) — showing what state_dir holds\n");
    } else {
        out.push_str(&format!("daemon: not answering on {} — showing what state_dir holds\n", show(&d["address"])));
    }
    if let Some(sources) = s["sources"].as_object() {
        for (name, v) in sources {
            out.push_str(&format!("source {name} ({})", show(&v["kind"])));
            if !v["slot"].is_null() {
                out.push_str(&format!(" slot {}", show(&v["slot"])));
            }
            if d["running"] == json!(true) {
                let connected = if v["connected"] == json!(true) { "connected" } else { "NOT connected" };
                out.push_str(&format!(
                    ": {connected}, lag {} bytes / {} s, confirmed {}, in flight {}",
                    show(&v["lag_bytes"]),
                    show(&v["lag_seconds"]),
                    show(&v["confirmed_lsn"]),
                    show(&v["in_flight_changes"])
                ));
                if !v["shards_owned"].is_null() {
                    out.push_str(&format!(", shards owned {}", show(&v["shards_owned"])));
                }
                if let Some(e) = v["health"]["error"].as_str() {
                    out.push_str(&format!(" — {e}"));
                }
            } else if !v["recorded_confirmed_lsn"].is_null() {
                out.push_str(&format!(
                    ": last confirmed {} (recorded {})",
                    show(&v["recorded_confirmed_lsn"]),
                    show(&v["recorded_at"])
                ));
            }
            out.push('\n');
            for t in v["snapshots"].as_array().into_iter().flatten() {
                out.push_str(&format!("  snapshot {}\n", show(t)));
            }
        }
    }
    if let Some(sinks) = s["sinks"].as_object() {
        for (name, v) in sinks {
            out.push_str(&format!("sink {name} ({})", show(&v["kind"])));
            if d["running"] == json!(true) {
                let up = if v["up"] == json!(true) { "up" } else { "DOWN" };
                out.push_str(&format!(
                    ": {up}, {} records behind, lag {} s, spool {} bytes",
                    show(&v["records_behind"]),
                    show(&v["lag_seconds"]),
                    show(&v["spool_bytes"])
                ));
                if let Some(e) = v["error"].as_str() {
                    out.push_str(&format!(" — {e}"));
                } else if let Some(e) = v["last_error"]["error"].as_str() {
                    out.push_str(&format!(" (last error: {e})"));
                }
            } else {
                out.push_str(&format!(": spool {} bytes on disk", show(&v["spool_bytes_on_disk"])));
            }
            out.push('\n');
        }
    }
    if d["running"] == json!(true) {
        match s["last_reload"].as_object() {
            Some(r) => {
                let at = r.get("at_ms").and_then(Value::as_i64).and_then(chrono::DateTime::from_timestamp_millis);
                out.push_str(&format!(
                    "last reload: {} at {} — {}\n",
                    if r.get("ok") == Some(&json!(true)) { "ok" } else { "FAILED" },
                    at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                    r.get("detail").map(show).unwrap_or_default()
                ));
            }
            None => out.push_str("last reload: none since start\n"),
        }
    }
    match s["dead_letters"].as_object() {
        Some(m) if m.contains_key("error") => out.push_str(&format!("dead letters: {}\n", show(&m["error"]))),
        Some(m) if m.is_empty() => out.push_str("dead letters: none\n"),
        Some(m) => {
            let parts: Vec<String> = m.iter().map(|(p, n)| format!("{p} {}", show(n))).collect();
            out.push_str(&format!("dead letters (open): {}\n", parts.join(", ")));
        }
        None => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_is_read_by_name_and_label() {
        let m = parse_metrics(
            "# HELP x\npolysync_sink_up{sink=\"cache\"} 1\npolysync_sink_up{sink=\"search\"} 0\npolysync_in_flight_changes{source=\"db\"} 12\n",
        );
        assert_eq!(sample(&m, "polysync_sink_up", ("sink", "search")), Some(0.0));
        assert_eq!(sample(&m, "polysync_in_flight_changes", ("source", "db")), Some(12.0));
        assert_eq!(sample(&m, "polysync_sink_up", ("sink", "graph")), None);
    }
}
