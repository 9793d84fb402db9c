//! Where DynamoDB shard positions live, and which instance reads which shard.
//!
//! The [`ShardStore`] trait has two implementations: [`FileStore`], an embedded `redb` file in
//! the state directory for a single instance (it owns every shard), and
//! [`super::lease::LeaseTable`], a DynamoDB table of KCL-style leases for several instances.
//! Checkpoints are written only by the owner of a shard (conditionally, in the lease table), and
//! only for positions the acknowledgement window has confirmed.

use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

/// A shard's saved position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardCheckpoint {
    /// Everything up to and including this sequence number is applied.
    At(String),
    /// Nothing applied yet; `start = "latest"` when the source first started: records created
    /// before this time (Unix milliseconds) are not wanted. Kept until the first checkpoint, so
    /// a crash before it still starts from that moment, not from a later "now".
    LatestFrom(i64),
    /// The shard is closed and fully applied (children may start).
    Finished,
}

impl ShardCheckpoint {
    /// The stored form.
    pub fn encode(&self) -> String {
        match self {
            ShardCheckpoint::At(s) => s.clone(),
            ShardCheckpoint::LatestFrom(ms) => format!("{LATEST_FROM}{ms}"),
            ShardCheckpoint::Finished => FINISHED.to_string(),
        }
    }

    /// Parse the stored form.
    pub fn decode(s: &str) -> ShardCheckpoint {
        if s == FINISHED {
            return ShardCheckpoint::Finished;
        }
        match s.strip_prefix(LATEST_FROM).and_then(|ms| ms.parse().ok()) {
            Some(ms) => ShardCheckpoint::LatestFrom(ms),
            None => ShardCheckpoint::At(s.to_string()),
        }
    }
}

/// Stored prefix of [`ShardCheckpoint::LatestFrom`] (sequence numbers are digits only).
const LATEST_FROM: &str = "LATEST_FROM:";

/// Stored marker of a finished shard (the KCL's word for it).
pub const FINISHED: &str = "SHARD_END";

/// A shard as the store sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// Shard id.
    pub id: String,
    /// Parent shard ids (a child starts only after they are finished).
    pub parents: Vec<String>,
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// This instance no longer owns the shard: stop reading it, write nothing.
    #[error("lease on shard {0} lost")]
    LeaseLost(String),
    /// The store cannot be reached or refused the request.
    #[error("checkpoint store: {0}")]
    Unavailable(String),
}

/// Shards this instance should read, with their checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    /// Shard id.
    pub shard: String,
    /// Saved position, if any.
    pub checkpoint: Option<ShardCheckpoint>,
}

/// What a balancing round decided: the shards to read now, and the ones lost to another owner.
pub type Assignment = (Vec<Owned>, Vec<String>);

/// Checkpoints and ownership of a stream's shards.
pub trait ShardStore: Send + Sync {
    /// Make sure every listed shard has an entry (new shards start unowned, without
    /// checkpoint), and prune finished shards the stream no longer lists (expired after the
    /// 24 h retention), so the map does not grow with every shard ever seen.
    /// `latest_from` (Unix ms) marks the shards of a stream the store has never seen with
    /// [`ShardCheckpoint::LatestFrom`]: `start = "latest"` applies to the shards open at the
    /// first start only; a shard found later (a child) starts at its beginning.
    fn sync_shards<'a>(
        &'a self,
        stream: &'a str,
        shards: &'a [ShardInfo],
        latest_from: Option<i64>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Renew what this instance owns and take what it should own; returns the shards to read
    /// now (children only once their parents are finished) and the ones it lost.
    fn balance<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Assignment, StoreError>>;
    /// Save a position (only while owning the shard).
    fn checkpoint<'a>(
        &'a self,
        stream: &'a str,
        shard: &'a str,
        ck: ShardCheckpoint,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Give a shard up so another instance can take it at once: at a clean shutdown, and once
    /// the reader of a lease another instance asked for has stopped (then it is handed to that
    /// instance).
    fn release<'a>(&'a self, stream: &'a str, shard: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
    /// How often `balance` should run.
    fn balance_interval(&self) -> std::time::Duration;
    /// The validity of this instance's current lease on `shard`, which every record read under
    /// it carries (see [`super::fence`]); `None` where ownership cannot lapse (one instance).
    fn fence(&self, _stream: &str, _shard: &str) -> Option<Arc<super::fence::Fence>> {
        None
    }
}

const CHECKPOINTS: TableDefinition<&str, &str> = TableDefinition::new("shard_checkpoints");
const PARENTS: TableDefinition<&str, &str> = TableDefinition::new("shard_parents");

/// Single-instance store: a redb file; this instance owns every shard.
pub struct FileStore {
    db: Arc<redb::Database>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl FileStore {
    /// Open (creating) the file, mode 0600.
    pub fn open(path: &Path) -> Result<FileStore, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        }
        let db = redb::Database::create(path).map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        let tx = db.begin_write().map_err(unavailable)?;
        tx.open_table(CHECKPOINTS).map_err(unavailable)?;
        tx.open_table(PARENTS).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        Ok(FileStore { db: Arc::new(db) })
    }

    fn key(stream: &str, shard: &str) -> String {
        format!("{stream}|{shard}")
    }

    /// Saved position of a shard.
    pub fn load(&self, stream: &str, shard: &str) -> Result<Option<ShardCheckpoint>, StoreError> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let t = tx.open_table(CHECKPOINTS).map_err(unavailable)?;
        Ok(t.get(Self::key(stream, shard).as_str()).map_err(unavailable)?.map(|v| ShardCheckpoint::decode(v.value())))
    }
}

impl ShardStore for FileStore {
    fn sync_shards<'a>(
        &'a self,
        stream: &'a str,
        shards: &'a [ShardInfo],
        latest_from: Option<i64>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let db = Arc::clone(&self.db);
        let prefix = format!("{stream}|");
        Box::pin(async move {
            let rows: Vec<(String, String)> =
                shards.iter().map(|s| (FileStore::key(stream, &s.id), s.parents.join(","))).collect();
            tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
                let tx = db.begin_write().map_err(unavailable)?;
                {
                    let mut t = tx.open_table(PARENTS).map_err(unavailable)?;
                    let first = t
                        .range(prefix.as_str()..)
                        .map_err(unavailable)?
                        .next()
                        .transpose()
                        .map_err(unavailable)?
                        .is_none_or(|(k, _)| !k.value().starts_with(&prefix));
                    for (k, parents) in &rows {
                        t.insert(k.as_str(), parents.as_str()).map_err(unavailable)?;
                    }
                    // Finished shards the stream no longer lists: forgotten.
                    let listed: std::collections::HashSet<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
                    let mut cks = tx.open_table(CHECKPOINTS).map_err(unavailable)?;
                    let mut gone = Vec::new();
                    for entry in t.range(prefix.as_str()..).map_err(unavailable)? {
                        let (k, _) = entry.map_err(unavailable)?;
                        let k = k.value().to_string();
                        if !k.starts_with(&prefix) {
                            break;
                        }
                        if !listed.contains(k.as_str()) {
                            gone.push(k);
                        }
                    }
                    for k in gone {
                        let finished = cks.get(k.as_str()).map_err(unavailable)?.is_some_and(|v| v.value() == FINISHED);
                        if finished {
                            t.remove(k.as_str()).map_err(unavailable)?;
                            cks.remove(k.as_str()).map_err(unavailable)?;
                        }
                    }
                    if let Some(ms) = latest_from.filter(|_| first) {
                        for (k, _) in &rows {
                            cks.insert(k.as_str(), ShardCheckpoint::LatestFrom(ms).encode().as_str())
                                .map_err(unavailable)?;
                        }
                    }
                }
                tx.commit().map_err(unavailable)
            })
            .await
            .map_err(unavailable)?
        })
    }

    fn balance<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Assignment, StoreError>> {
        let db = Arc::clone(&self.db);
        let prefix = format!("{stream}|");
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let tx = db.begin_read().map_err(unavailable)?;
                let parents = tx.open_table(PARENTS).map_err(unavailable)?;
                let cks = tx.open_table(CHECKPOINTS).map_err(unavailable)?;
                let mut shards = Vec::new();
                for entry in parents.iter().map_err(unavailable)? {
                    let (k, v) = entry.map_err(unavailable)?;
                    if let Some(shard) = k.value().strip_prefix(&prefix) {
                        let ps: Vec<String> =
                            v.value().split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
                        shards.push((shard.to_string(), ps));
                    }
                }
                let ck = |shard: &str| -> Result<Option<ShardCheckpoint>, StoreError> {
                    Ok(cks
                        .get(format!("{prefix}{shard}").as_str())
                        .map_err(unavailable)?
                        .map(|v| ShardCheckpoint::decode(v.value())))
                };
                let known: std::collections::HashSet<&str> = shards.iter().map(|(s, _)| s.as_str()).collect();
                let mut owned = Vec::new();
                for (shard, ps) in &shards {
                    let checkpoint = ck(shard)?;
                    if checkpoint == Some(ShardCheckpoint::Finished) {
                        continue;
                    }
                    // Parents the stream no longer lists were trimmed: treat them as finished.
                    let mut ready = true;
                    for p in ps {
                        if known.contains(p.as_str()) && ck(p)? != Some(ShardCheckpoint::Finished) {
                            ready = false;
                        }
                    }
                    if ready {
                        owned.push(Owned { shard: shard.to_string(), checkpoint });
                    }
                }
                Ok((owned, Vec::new()))
            })
            .await
            .map_err(unavailable)?
        })
    }

    fn checkpoint<'a>(
        &'a self,
        stream: &'a str,
        shard: &'a str,
        ck: ShardCheckpoint,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let db = Arc::clone(&self.db);
        let key = FileStore::key(stream, shard);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let tx = db.begin_write().map_err(unavailable)?;
                {
                    let mut t = tx.open_table(CHECKPOINTS).map_err(unavailable)?;
                    t.insert(key.as_str(), ck.encode().as_str()).map_err(unavailable)?;
                }
                tx.commit().map_err(unavailable)
            })
            .await
            .map_err(unavailable)?
        })
    }

    fn release<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    fn balance_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn children_wait_for_finished_parents_and_checkpoints_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck.redb");
        let s = FileStore::open(&path).unwrap();
        let shards = vec![
            ShardInfo { id: "p".into(), parents: vec![] },
            ShardInfo { id: "c1".into(), parents: vec!["p".into()] },
            ShardInfo { id: "c2".into(), parents: vec!["p".into(), "gone".into()] },
        ];
        s.sync_shards("st", &shards, None).await.unwrap();
        let (owned, _) = s.balance("st").await.unwrap();
        assert_eq!(owned.iter().map(|o| o.shard.as_str()).collect::<Vec<_>>(), vec!["p"]);
        s.checkpoint("st", "p", ShardCheckpoint::At("42".into())).await.unwrap();
        assert_eq!(s.load("st", "p").unwrap(), Some(ShardCheckpoint::At("42".into())));
        s.checkpoint("st", "p", ShardCheckpoint::Finished).await.unwrap();
        drop(s);
        let s = FileStore::open(&path).unwrap();
        let (mut owned, _) = s.balance("st").await.unwrap();
        owned.sort_by(|a, b| a.shard.cmp(&b.shard));
        assert_eq!(
            owned.iter().map(|o| o.shard.as_str()).collect::<Vec<_>>(),
            vec!["c1", "c2"],
            "parent finished, children ready"
        );
    }

    #[tokio::test]
    async fn latest_marks_only_the_shards_of_the_first_start() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(&dir.path().join("ck.redb")).unwrap();
        s.sync_shards("st", &[ShardInfo { id: "a".into(), parents: vec![] }], Some(1000)).await.unwrap();
        s.sync_shards("st", &[ShardInfo { id: "b".into(), parents: vec!["a".into()] }], Some(2000)).await.unwrap();
        assert_eq!(s.load("st", "a").unwrap(), Some(ShardCheckpoint::LatestFrom(1000)));
        assert_eq!(s.load("st", "b").unwrap(), None, "a shard found later starts at its beginning");
        assert_eq!(ShardCheckpoint::decode(&ShardCheckpoint::LatestFrom(7).encode()), ShardCheckpoint::LatestFrom(7));
    }

    #[tokio::test]
    async fn finished_shards_the_stream_no_longer_lists_are_pruned_unfinished_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(&dir.path().join("ck.redb")).unwrap();
        let info = |id: &str| ShardInfo { id: id.into(), parents: vec![] };
        s.sync_shards("st", &[info("done"), info("open"), info("live")], None).await.unwrap();
        s.checkpoint("st", "done", ShardCheckpoint::Finished).await.unwrap();
        s.checkpoint("st", "open", ShardCheckpoint::At("7".into())).await.unwrap();
        s.sync_shards("other", &[info("done")], None).await.unwrap();
        s.checkpoint("other", "done", ShardCheckpoint::Finished).await.unwrap();
        // Retention passed: only "live" is listed any more.
        s.sync_shards("st", &[info("live")], None).await.unwrap();
        assert_eq!(s.load("st", "done").unwrap(), None, "finished and gone: pruned");
        assert_eq!(s.load("st", "open").unwrap(), Some(ShardCheckpoint::At("7".into())), "unfinished: kept until read");
        let (owned, _) = s.balance("st").await.unwrap();
        assert!(owned.iter().any(|o| o.shard == "open") && owned.iter().any(|o| o.shard == "live"));
        assert_eq!(s.load("other", "done").unwrap(), Some(ShardCheckpoint::Finished), "another stream untouched");
    }
}
