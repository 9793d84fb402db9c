//! `polysync dlq list`, `replay` and `discard`: look at dead letters, deliver them again
//! through the *current* pipeline definitions (so fixing a pipeline and replaying is the whole
//! recovery), or give them up on purpose. Replay writes straight to the sinks, which are
//! idempotent or version-guarded, so it is safe while the daemon runs; delivered entries are
//! recorded in `replayed.ids`, discarded ones in `discarded.jsonl` (with what they were, when
//! and by whom; marker objects in S3 when `[dlq.s3]` is the record), and neither is shown
//! (without `--all`) or replayed again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::app::Config;
use crate::app::dlq_store::Archive;
use crate::dlq::{Discarded, StoredDeadLetter};
use crate::pipeline::process::{self, Step};
use crate::pipeline::{Pipeline, load};
use crate::sink::{ItemOutcome, Record, Sink};

/// Which entries.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only this pipeline.
    pub pipeline: Option<String>,
    /// Only entries written at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only entries written before this time.
    pub before: Option<DateTime<Utc>>,
    /// Only these entry ids (empty: any).
    pub ids: Vec<String>,
    /// Include entries already replayed or discarded (list only).
    pub include_replayed: bool,
}

/// How an entry stands.
#[derive(Debug, Clone)]
pub enum Standing {
    /// Waiting for a replay or a discard.
    Open,
    /// Delivered by a replay.
    Replayed,
    /// Given up by `dlq discard`.
    Discarded(Discarded),
}

/// Parse `--since`: RFC 3339 (`2026-11-24T10:00:00Z`) or an age (`2h`, `30m`).
pub fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let age = humantime::parse_duration(s).map_err(|_| format!("--since {s:?}: use RFC 3339 or an age like 2h"))?;
    Ok(Utc::now() - chrono::Duration::from_std(age).map_err(|e| e.to_string())?)
}

/// Entries matching the selection, oldest first, with how each stands (from the local files,
/// or from S3 when `[dlq.s3]` is the record).
pub async fn select_with_standing(
    config: &Config,
    sel: &Selection,
) -> Result<Vec<(StoredDeadLetter, Standing)>, String> {
    let archive = Archive::open(config).await;
    let done = archive.replayed_ids().await?;
    let mut gone = archive.discarded().await?;
    let entries = archive.entries().await?;
    Ok(entries
        .into_iter()
        .filter(|e| sel.pipeline.as_ref().is_none_or(|p| *p == e.pipeline))
        .filter(|e| sel.since.is_none_or(|t| e.at >= t))
        .filter(|e| sel.before.is_none_or(|t| e.at < t))
        .filter(|e| sel.ids.is_empty() || sel.ids.contains(&e.id))
        .map(|e| {
            let standing = match gone.remove(&e.id) {
                Some(d) => Standing::Discarded(d),
                None if done.contains(&e.id) => Standing::Replayed,
                None => Standing::Open,
            };
            (e, standing)
        })
        .filter(|(_, s)| sel.include_replayed || matches!(s, Standing::Open))
        .collect())
}

/// Open entries matching the selection (all of them with `include_replayed`), oldest first.
pub async fn select(config: &Config, sel: &Selection) -> Result<Vec<StoredDeadLetter>, String> {
    Ok(select_with_standing(config, sel).await?.into_iter().map(|(e, _)| e).collect())
}

/// `dlq discard`: record the selected open entries as discarded (the record is written before
/// they count as gone) and return them. An id that matches no open entry is an error, so a
/// typo never passes for a discard.
pub async fn discard(config: &Config, sel: &Selection) -> Result<Vec<Discarded>, String> {
    let open = select(config, &Selection { include_replayed: false, ..sel.clone() }).await?;
    for id in &sel.ids {
        if !open.iter().any(|e| e.id == *id) {
            return Err(format!("no open dead letter has id {id} (see polysync dlq list --all)"));
        }
    }
    let now = Utc::now();
    let by = std::env::var("USER").ok().filter(|u| !u.is_empty());
    let records: Vec<Discarded> = open
        .into_iter()
        .map(|e| Discarded {
            id: e.id,
            pipeline: e.pipeline,
            sink: e.sink,
            reason: e.reason,
            discarded_at: now,
            by: by.clone(),
        })
        .collect();
    Archive::open(config).await.mark_discarded(&records).await?;
    Ok(records)
}

/// Result of a replay.
#[derive(Debug, Default)]
pub struct Report {
    /// Entries delivered (or deliberately skipped by the current filter).
    pub delivered: usize,
    /// Entries that failed again, with the reason; they stay in the DLQ.
    pub failed: Vec<(String, String)>,
}

async fn write_one(sink: &dyn Sink, rec: Record) -> Result<(), String> {
    let batch = [Arc::new(rec)];
    let mut result = Err("gave up".to_string());
    for attempt in 0..6u32 {
        match sink.write(&batch).await {
            Ok(o) => match o.into_iter().next() {
                Some(ItemOutcome::Applied) => {
                    result = Ok(());
                    break;
                }
                Some(ItemOutcome::Rejected(r)) => {
                    result = Err(r);
                    break;
                }
                Some(ItemOutcome::Retry(r)) => result = Err(r),
                None => result = Err("no outcome".into()),
            },
            Err(e) => result = Err(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
    }
    result
}

/// Replay the selected entries.
pub async fn replay(config: &Config, sel: &Selection) -> Result<Report, String> {
    let pipelines: Vec<Arc<Pipeline>> = load::load_all(&config.pipeline_env()).map_err(|e| e.to_string())?;
    let by_name: HashMap<&str, &Arc<Pipeline>> = pipelines.iter().map(|p| (&*p.name, p)).collect();
    let entries = select(config, sel).await?;
    let mut sinks: HashMap<String, Arc<dyn Sink>> = HashMap::new();
    let mut report = Report::default();
    let mut delivered_ids = Vec::new();
    for entry in entries {
        let Some(def) = by_name.get(entry.pipeline.as_str()) else {
            report.failed.push((entry.id, format!("pipeline {} no longer exists", entry.pipeline)));
            continue;
        };
        let only = (entry.sink != "-").then_some(entry.sink.as_str());
        if let Some(s) = only
            && !def.actions.iter().any(|a| &*a.target == s)
        {
            report.failed.push((entry.id, format!("pipeline {} no longer writes to sink {s}", def.name)));
            continue;
        }
        let change = Arc::new(entry.change.clone());
        let mut steps = Vec::new();
        process::apply(def, &change, only, &mut steps);
        let mut result = Ok(());
        for step in steps {
            match step {
                Step::DeadLetter { reason, .. } => {
                    result = Err(reason);
                    break;
                }
                Step::Payload { action, payload } => {
                    let target = def.actions[action].target.to_string();
                    if !sinks.contains_key(&target) {
                        let cfg = config.sinks.get(&target).ok_or_else(|| format!("sink {target} is not defined"))?;
                        let ctx = config.sink_context();
                        let s = cfg.build(&target, &ctx).await.map_err(|e| e.to_string())?;
                        sinks.insert(target.clone(), s);
                    }
                    let rec = Record { change: Arc::clone(&change), pipeline: Arc::clone(&def.name), payload };
                    if let Err(e) = write_one(sinks[&target].as_ref(), rec).await {
                        result = Err(format!("sink {target}: {e}"));
                        break;
                    }
                }
            }
        }
        match result {
            Ok(()) => {
                report.delivered += 1;
                delivered_ids.push(entry.id);
            }
            Err(e) => report.failed.push((entry.id, e)),
        }
    }
    Archive::open(config).await.mark_replayed(&delivered_ids).await?;
    Ok(report)
}
