//! Spooled records that no sink will apply any more (the sink was removed from the config)
//! go to the dead-letter queue, so they stay visible and replayable instead of vanishing.

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::spool::Spool;
use super::writer::dead_letter;
use crate::dlq::DeadLetterQueue;

/// Dead-letter every record left in `spool` and empty it. Returns how many were moved.
pub async fn to_dead_letters(
    spool: &Arc<Spool>,
    dlq: &Arc<DeadLetterQueue>,
    sink: &str,
    reason: &str,
    hard_stop: &CancellationToken,
) -> Result<u64, String> {
    let mut pos = spool.start();
    let mut moved = 0u64;
    loop {
        let (sp, mut p) = (Arc::clone(spool), pos);
        let (frames, p) =
            tokio::task::spawn_blocking(move || (sp.read(&mut p, 512), p)).await.map_err(|e| e.to_string())?;
        pos = p;
        let frames = frames.map_err(|e| e.to_string())?;
        if frames.is_empty() {
            break;
        }
        for (_, bytes) in frames {
            match super::record::decode(&bytes) {
                Ok(super::record::Decoded { rec, .. }) => {
                    if !dead_letter(dlq, &rec.pipeline, sink, reason, &rec.change, hard_stop).await {
                        return Err("stopped".into());
                    }
                    moved += 1;
                }
                Err(e) => tracing::error!(sink, error = %e, "a spooled record cannot be decoded; it is lost"),
            }
        }
    }
    let (sp, end) = (Arc::clone(spool), spool.end());
    tokio::task::spawn_blocking(move || sp.commit(end)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    Ok(moved)
}

/// At start-up: spools under `root` of sinks the config no longer has. Their records are
/// dead-lettered and the directories removed.
pub async fn orphans(
    root: &Path,
    configured: &std::collections::BTreeSet<String>,
    dlq: &Arc<DeadLetterQueue>,
    hard_stop: &CancellationToken,
) -> Result<(), String> {
    let Ok(rd) = std::fs::read_dir(root) else { return Ok(()) };
    for e in rd.flatten() {
        let Some(name) = e.file_name().to_str().map(str::to_string) else { continue };
        if configured.contains(&name) || !e.path().is_dir() {
            continue;
        }
        let spool = Arc::new(Spool::open(&e.path(), u64::MAX).map_err(|e| e.to_string())?);
        if !spool.is_empty() {
            let reason = format!("sink {name} is no longer in the config; its spooled records were never applied");
            let n = to_dead_letters(&spool, dlq, &name, &reason, hard_stop).await?;
            tracing::warn!(sink = %name, records = n, "the spool of a sink that is no longer configured was moved to the dead-letter queue");
        }
        drop(spool);
        let _ = std::fs::remove_dir_all(e.path());
    }
    Ok(())
}
