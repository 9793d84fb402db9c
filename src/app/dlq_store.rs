//! Where dead letters are kept, as the daemon and the `dlq` commands see it: the local files
//! alone, or S3 (`[dlq.s3]`) as the durable record with the local files as its buffer. The
//! commands read and mark entries here, so `dlq list/replay/discard` work the same from any
//! machine when S3 holds them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::app::Config;
use crate::aws::AwsSettings;
use crate::dlq::config::S3DlqConfig;
use crate::dlq::s3::{S3Error, S3Store};
use crate::dlq::{DeadLetterQueue, Discarded, StoredDeadLetter};

/// Connect to the configured bucket and check it once. A refusal (no such bucket, access
/// denied) stops the start with the fix; no answer is logged and left to the writes, which
/// wait for S3 (nothing is acknowledged meanwhile).
pub async fn connect(cfg: &S3DlqConfig, aws: &AwsSettings) -> Result<S3Store, String> {
    let store = S3Store::connect(cfg, aws).await;
    match store.check().await {
        Ok(()) => Ok(store),
        Err(e @ S3Error::Refused { .. }) => Err(format!(
            "{e} (create the bucket, or grant s3:ListBucket, s3:PutObject and s3:GetObject on the prefix; see deploy/iam/policy.json)"
        )),
        Err(e) => {
            tracing::warn!(error = %e, "S3 does not answer at start; dead letters wait for it (the changes behind them are not acknowledged)");
            Ok(store)
        }
    }
}

/// Move the entries an earlier run left in the local files to S3, retrying while S3 does not
/// take them, until done or `stop`.
pub async fn drain_earlier(dlq: Arc<DeadLetterQueue>, stop: CancellationToken) {
    let mut delays = crate::retry::backoff(crate::retry::Profile::Connect);
    loop {
        match dlq.drain_earlier().await {
            Ok(0) => return,
            Ok(n) => {
                tracing::info!(entries = n, "dead letters left in local files by an earlier run are now in S3");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot move earlier dead letters to S3 yet; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(30))) => {}
        }
    }
}

/// The dead letters of a config, for the `dlq` commands and `status`.
pub enum Archive {
    /// The local files are the record.
    Local(std::path::PathBuf),
    /// S3 is the record; the local files may hold entries not moved there yet.
    S3 {
        /// The bucket.
        store: S3Store,
        /// The local buffer.
        dir: std::path::PathBuf,
    },
}

fn io(dir: &std::path::Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", dir.display())
}

impl Archive {
    /// The archive `config` names.
    pub async fn open(config: &Config) -> Archive {
        match &config.dlq.s3 {
            Some(s3) => Archive::S3 { store: S3Store::connect(s3, &config.aws).await, dir: config.dlq_dir() },
            None => Archive::Local(config.dlq_dir()),
        }
    }

    /// Every entry, oldest first (in S3 mode: those in S3 and those still only in the local
    /// buffer, once each). Unreadable ones are reported on stderr.
    pub async fn entries(&self) -> Result<Vec<StoredDeadLetter>, String> {
        let local = |dir: &std::path::Path| {
            crate::dlq::read_all(dir, |p, line, e| eprintln!("{}:{line}: unreadable entry skipped: {e}", p.display()))
                .map_err(io(dir))
        };
        match self {
            Archive::Local(dir) => local(dir),
            Archive::S3 { store, dir } => {
                let mut all = store
                    .entries(|key, e| eprintln!("{key}: unreadable entry skipped: {e}"))
                    .await
                    .map_err(|e| e.to_string())?;
                let known: HashSet<String> = all.iter().map(|e| e.id.clone()).collect();
                all.extend(local(dir)?.into_iter().filter(|e| !known.contains(&e.id)));
                all.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.id.cmp(&b.id)));
                Ok(all)
            }
        }
    }

    /// Ids delivered by a replay.
    pub async fn replayed_ids(&self) -> Result<HashSet<String>, String> {
        match self {
            Archive::Local(dir) => crate::dlq::replayed_ids(dir).map_err(io(dir)),
            Archive::S3 { store, .. } => store.replayed_ids().await.map_err(|e| e.to_string()),
        }
    }

    /// What discards recorded, by id.
    pub async fn discarded(&self) -> Result<HashMap<String, Discarded>, String> {
        match self {
            Archive::Local(dir) => crate::dlq::discarded(dir).map_err(io(dir)),
            Archive::S3 { store, .. } => store.discarded().await.map_err(|e| e.to_string()),
        }
    }

    /// Record entries as replayed.
    pub async fn mark_replayed(&self, ids: &[String]) -> Result<(), String> {
        match self {
            Archive::Local(dir) => crate::dlq::mark_replayed(dir, ids).map_err(io(dir)),
            Archive::S3 { store, .. } => store.mark_replayed(ids).await.map_err(|e| e.to_string()),
        }
    }

    /// Record entries as discarded.
    pub async fn mark_discarded(&self, entries: &[Discarded]) -> Result<(), String> {
        match self {
            Archive::Local(dir) => crate::dlq::mark_discarded(dir, entries).map_err(io(dir)),
            Archive::S3 { store, .. } => store.mark_discarded(entries).await.map_err(|e| e.to_string()),
        }
    }
}
