//! Leases in a DynamoDB table, in the manner of the Kinesis Client Library, so several
//! instances (an ECS service with N tasks) share a stream's shards.
//!
//! One item per shard: `lease_key` (`<stream>|<shard>`), `owner`, `counter`, `checkpoint`,
//! `parents`. Every write is conditional, so the table is the only arbiter; there is no
//! consensus code here.
//!
//! * An owner renews by incrementing `counter` on the condition that it is still the owner
//!   with the counter it last saw. A failed renewal means the lease was taken: the reader stops
//!   at once and writes nothing more. An owner that cannot reach the table for two thirds of the
//!   lease duration stops its readers too (it can no longer prove it owns them).
//! * A lease whose counter has not moved for `lease_duration` (by this instance's clock) is
//!   expired and may be taken, again conditionally on the counter. A lease under this
//!   instance's own id that it does not hold (a restart with the same id) is taken back at once.
//! * Balance: each instance aims at ⌈eligible shards / live instances⌉; below it, it takes
//!   unowned and expired leases first, then asks the busiest owner for one lease per round.
//! * A steal is a hand-over, never a snatch: the thief sets `steal_to` on the lease; the owner
//!   sees it at its next renewal, stops that shard's reader, lets what it read be applied and
//!   checkpointed (it still owns the lease meanwhile and keeps renewing it), then writes the
//!   thief as owner. So the new owner never replays records the old one may still be applying
//!   (with one-second versions a stale write landing late could win). An owner that dies
//!   instead stops renewing, and the thief takes the lease once it expires.
//! * A child shard is eligible only once every parent's checkpoint is `SHARD_END`.
//! * Checkpoints are written on the condition `owner = me`, so two owners can never both write
//!   one shard's position.
//! * Each take starts a [`Fence`] that every renewal extends; records read under the lease are
//!   applied only while it holds, so an owner that froze past its lease writes nothing after
//!   the new owner (see [`super::fence`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue, ScalarAttributeType,
    TableStatus,
};
use futures::future::BoxFuture;

use super::fence::Fence;
use super::store::{Assignment, FINISHED, Owned, ShardCheckpoint, ShardInfo, ShardStore, StoreError};
use crate::telemetry::metrics;

/// A lease row as read.
#[derive(Debug, Clone)]
struct Row {
    shard: String,
    owner: Option<String>,
    counter: u64,
    checkpoint: Option<String>,
    parents: Vec<String>,
    /// Another instance asked for this lease.
    steal_to: Option<String>,
}

#[derive(Default)]
struct State {
    /// shard → the instance it is being handed over to: its reader is stopping; the lease is
    /// still ours (renewed) until [`ShardStore::release`] hands it over.
    handing: HashMap<String, String>,
    /// shard → counter after our last successful renew/take.
    owned: HashMap<String, u64>,
    /// shard → last successful renewal.
    renewed: HashMap<String, Instant>,
    /// shard → the validity of our current lease on it (one per take; see [`Fence`]).
    fences: HashMap<String, Arc<Fence>>,
    /// shard → (owner, counter, when this counter was first seen).
    seen: HashMap<String, (Option<String>, u64, Instant)>,
    /// Shards already known to have a row.
    synced: HashSet<String>,
}

/// The DynamoDB lease table.
pub struct LeaseTable {
    client: Client,
    table: String,
    worker: String,
    duration: Duration,
    state: Mutex<State>,
    source: String,
}

fn unavailable<E>(e: &SdkError<E>) -> StoreError
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
{
    let detail = match e {
        SdkError::ServiceError(s) => {
            format!("{}: {}", s.err().code().unwrap_or("error"), s.err().message().unwrap_or(""))
        }
        other => crate::sink::search::aws_error_text(other),
    };
    StoreError::Unavailable(detail)
}

fn conditional_failed<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    matches!(e, SdkError::ServiceError(s) if s.err().code() == Some("ConditionalCheckFailedException"))
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

impl LeaseTable {
    /// Connect, checking (or creating) the table.
    pub async fn open(
        client: Client,
        table: &str,
        create: bool,
        worker: String,
        duration: Duration,
        source: &str,
    ) -> Result<LeaseTable, StoreError> {
        let lt = LeaseTable {
            client,
            table: table.to_string(),
            worker,
            duration,
            state: Mutex::new(State::default()),
            source: source.to_string(),
        };
        lt.ensure_table(create).await?;
        Ok(lt)
    }

    /// This instance's id.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// Whether the lease table exists; a missing one is an error unless `create`.
    async fn table_exists(client: &Client, table: &str, create: bool) -> Result<bool, StoreError> {
        match client.describe_table().table_name(table).send().await {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e)) if e.err().is_resource_not_found_exception() && create => Ok(false),
            Err(SdkError::ServiceError(e)) if e.err().is_resource_not_found_exception() => {
                Err(StoreError::Unavailable(format!(
                    "lease table {table} does not exist; create it (hash key lease_key, type S) or set create_table = true"
                )))
            }
            Err(e) => Err(unavailable(&e)),
        }
    }

    /// `check --online`: the lease table as a start would find it, nothing created. Says how
    /// many leases `stream` has and who holds them, or that the first start creates the table.
    pub async fn inspect(client: &Client, table: &str, create: bool, stream: &str) -> Result<String, StoreError> {
        if !Self::table_exists(client, table, create).await? {
            return Ok(format!("lease table {table} does not exist yet: the first start creates it"));
        }
        let probe = LeaseTable {
            client: client.clone(),
            table: table.to_string(),
            worker: String::new(),
            duration: Duration::ZERO,
            state: Mutex::new(State::default()),
            source: String::new(),
        };
        let rows = probe.scan(stream).await?;
        let owners: HashSet<&str> = rows.iter().filter_map(|r| r.owner.as_deref()).collect();
        let finished = rows.iter().filter(|r| r.checkpoint.as_deref() == Some(FINISHED)).count();
        Ok(format!(
            "lease table {table}: {} leases of this stream ({finished} finished), held by {} instance(s)",
            rows.len(),
            owners.len()
        ))
    }

    async fn ensure_table(&self, create: bool) -> Result<(), StoreError> {
        if Self::table_exists(&self.client, &self.table, create).await? {
            return Ok(());
        }
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("lease_key")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("lease_key")
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?,
            )
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(SdkError::ServiceError(e)) if e.err().is_resource_in_use_exception() => {} // another instance won
            Err(e) => return Err(unavailable(&e)),
        }
        for _ in 0..120 {
            let d = self.client.describe_table().table_name(&self.table).send().await.map_err(|e| unavailable(&e))?;
            if d.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                tracing::info!(table = %self.table, "lease table ready");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(StoreError::Unavailable(format!("lease table {} did not become ACTIVE", self.table)))
    }

    fn key(stream: &str, shard: &str) -> String {
        format!("{stream}|{shard}")
    }

    async fn scan(&self, stream: &str) -> Result<Vec<Row>, StoreError> {
        let mut rows = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .filter_expression("#st = :s")
                .expression_attribute_names("#st", "stream")
                .expression_attribute_values(":s", s(stream))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| unavailable(&e))?;
            for item in out.items() {
                let get = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
                rows.push(Row {
                    shard: get("shard").unwrap_or_default(),
                    owner: get("owner"),
                    counter: item.get("counter").and_then(|v| v.as_n().ok()).and_then(|v| v.parse().ok()).unwrap_or(0),
                    checkpoint: get("checkpoint"),
                    parents: get("parents")
                        .map(|p| p.split(',').filter(|x| !x.is_empty()).map(str::to_string).collect())
                        .unwrap_or_default(),
                    steal_to: get("steal_to"),
                });
            }
            start = out.last_evaluated_key().cloned();
            if start.is_none() {
                return Ok(rows);
            }
        }
    }

    async fn renew(&self, stream: &str) -> Vec<String> {
        let owned: Vec<(String, u64)> =
            self.state.lock().unwrap_or_else(|p| p.into_inner()).owned.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let mut lost = Vec::new();
        for (shard, counter) in owned {
            let sent = Instant::now();
            let r = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("lease_key", s(&Self::key(stream, &shard)))
                .update_expression("SET #c = #c + :one")
                .condition_expression("#o = :me AND #c = :c")
                .expression_attribute_names("#c", "counter")
                .expression_attribute_names("#o", "owner")
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":me", s(&self.worker))
                .expression_attribute_values(":c", n(counter))
                .return_values(ReturnValue::AllNew)
                .send()
                .await;
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match r {
                Ok(out) => {
                    st.owned.insert(shard.clone(), counter + 1);
                    st.renewed.insert(shard.clone(), sent);
                    if let Some(f) = st.fences.get(&shard) {
                        f.extend(Fence::validity(sent, self.duration));
                    }
                    let thief = out
                        .attributes()
                        .and_then(|a| a.get("steal_to"))
                        .and_then(|v| v.as_s().ok())
                        .filter(|t| **t != self.worker)
                        .cloned();
                    if let Some(thief) = thief
                        && !st.handing.contains_key(&shard)
                    {
                        tracing::info!(source = %self.source, shard = %shard, to = %thief, "another instance asked for this lease; handing it over once what was read from the shard is applied");
                        st.handing.insert(shard.clone(), thief);
                        lost.push(shard);
                    }
                }
                Err(e) if conditional_failed(&e) => {
                    tracing::warn!(source = %self.source, shard = %shard, "lease taken by another instance; stopping this shard's reader, and what it read but did not apply is abandoned (the new owner reads it again)");
                    st.owned.remove(&shard);
                    if let Some(f) = st.fences.remove(&shard) {
                        f.revoke();
                    }
                    if st.handing.remove(&shard).is_none() {
                        lost.push(shard);
                    }
                }
                Err(e) => {
                    let since = st.renewed.get(&shard).map(|t| t.elapsed()).unwrap_or_default();
                    if since > self.duration * 2 / 3 {
                        // The fence closes by itself at its deadline: until then what was read
                        // may still be applied.
                        st.owned.remove(&shard);
                        st.fences.remove(&shard);
                        // A lease being handed over has its reader stopping already.
                        if st.handing.remove(&shard).is_none() {
                            tracing::error!(source = %self.source, shard = %shard, error = %unavailable(&e), "cannot renew the lease in time; stopping this shard's reader");
                            lost.push(shard);
                        }
                    }
                }
            }
        }
        lost
    }

    /// Ask the owner of `row` to hand its lease over (see the module docs).
    async fn request(&self, stream: &str, row: &Row) -> Result<(), StoreError> {
        let Some(owner) = &row.owner else { return Ok(()) };
        if row.steal_to.as_deref() == Some(self.worker.as_str()) {
            return Ok(());
        }
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("lease_key", s(&Self::key(stream, &row.shard)))
            .update_expression("SET #t = :me")
            .condition_expression("#o = :old AND attribute_not_exists(#t)")
            .expression_attribute_names("#t", "steal_to")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":me", s(&self.worker))
            .expression_attribute_values(":old", s(owner))
            .send()
            .await;
        match r {
            Ok(_) => {
                tracing::info!(source = %self.source, shard = %row.shard, owner = %owner, "asked the owner to hand this lease over (load balance)");
                Ok(())
            }
            Err(e) if conditional_failed(&e) => Ok(()),
            Err(e) => Err(unavailable(&e)),
        }
    }

    async fn take(&self, stream: &str, row: &Row) -> Result<bool, StoreError> {
        let sent = Instant::now();
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("lease_key", s(&Self::key(stream, &row.shard)))
            .update_expression("SET #o = :me, #c = #c + :one REMOVE #t")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_names("#c", "counter")
            .expression_attribute_names("#t", "steal_to")
            .expression_attribute_values(":me", s(&self.worker))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":c", n(row.counter));
        req = match &row.owner {
            Some(old) => req.condition_expression("#c = :c AND #o = :old").expression_attribute_values(":old", s(old)),
            None => req.condition_expression("#c = :c AND attribute_not_exists(#o)"),
        };
        match req.send().await {
            Ok(_) => {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.owned.insert(row.shard.clone(), row.counter + 1);
                st.renewed.insert(row.shard.clone(), sent);
                if let Some(old) = st.fences.insert(row.shard.clone(), Fence::new(Fence::validity(sent, self.duration)))
                {
                    old.revoke();
                }
                metrics().ddb_lease_takes.with_label_values(&[&self.source]).inc();
                tracing::info!(source = %self.source, shard = %row.shard, previous_owner = ?row.owner, "lease taken");
                Ok(true)
            }
            Err(e) if conditional_failed(&e) => Ok(false),
            Err(e) => Err(unavailable(&e)),
        }
    }
}

impl ShardStore for LeaseTable {
    fn sync_shards<'a>(
        &'a self,
        stream: &'a str,
        shards: &'a [ShardInfo],
        latest_from: Option<i64>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            // A stream the table has never seen: its shards are the ones `latest` applies to.
            let mark = match latest_from {
                Some(ms) if self.state.lock().unwrap_or_else(|p| p.into_inner()).synced.is_empty() => {
                    self.scan(stream).await?.is_empty().then_some(ms)
                }
                _ => None,
            };
            for sh in shards {
                if self.state.lock().unwrap_or_else(|p| p.into_inner()).synced.contains(&sh.id) {
                    continue;
                }
                let mut req = self.client.put_item();
                if let Some(ms) = mark {
                    req = req.item("checkpoint", s(&ShardCheckpoint::LatestFrom(ms).encode()));
                }
                let r = req
                    .table_name(&self.table)
                    .item("lease_key", s(&Self::key(stream, &sh.id)))
                    .item("stream", s(stream))
                    .item("shard", s(&sh.id))
                    .item("counter", n(0))
                    .item("parents", s(&sh.parents.join(",")))
                    .condition_expression("attribute_not_exists(lease_key)")
                    .send()
                    .await;
                match r {
                    Ok(_) => {}
                    Err(e) if conditional_failed(&e) => {}
                    Err(e) => return Err(unavailable(&e)),
                }
                self.state.lock().unwrap_or_else(|p| p.into_inner()).synced.insert(sh.id.clone());
            }
            // Finished shards the stream no longer lists (expired): their rows are deleted.
            let listed: HashSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
            for row in self.scan(stream).await? {
                if listed.contains(row.shard.as_str()) || row.checkpoint.as_deref() != Some(FINISHED) {
                    continue;
                }
                let r = self
                    .client
                    .delete_item()
                    .table_name(&self.table)
                    .key("lease_key", s(&Self::key(stream, &row.shard)))
                    .condition_expression("#k = :done")
                    .expression_attribute_names("#k", "checkpoint")
                    .expression_attribute_values(":done", s(FINISHED))
                    .send()
                    .await;
                match r {
                    Ok(_) => {
                        tracing::debug!(source = %self.source, shard = %row.shard, "expired finished shard pruned from the lease table");
                        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                        st.synced.remove(&row.shard);
                        st.seen.remove(&row.shard);
                    }
                    Err(e) if conditional_failed(&e) => {}
                    Err(e) => return Err(unavailable(&e)),
                }
            }
            Ok(())
        })
    }

    fn balance<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Assignment, StoreError>> {
        Box::pin(async move {
            let lost = self.renew(stream).await;
            let rows = self.scan(stream).await?;
            let now = Instant::now();
            let finished: HashSet<&str> =
                rows.iter().filter(|r| r.checkpoint.as_deref() == Some(FINISHED)).map(|r| r.shard.as_str()).collect();
            let known: HashSet<&str> = rows.iter().map(|r| r.shard.as_str()).collect();
            let eligible: Vec<&Row> = rows
                .iter()
                .filter(|r| !finished.contains(r.shard.as_str()))
                .filter(|r| r.parents.iter().all(|p| !known.contains(p.as_str()) || finished.contains(p.as_str())))
                .collect();
            // Expiry by our own clock: a counter that has not moved for a lease duration.
            let expired: HashSet<String> = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let mut expired = HashSet::new();
                for r in &rows {
                    let entry = st.seen.entry(r.shard.clone()).or_insert((r.owner.clone(), r.counter, now));
                    if entry.0 != r.owner || entry.1 != r.counter {
                        *entry = (r.owner.clone(), r.counter, now);
                    }
                    if r.owner.as_deref().is_some_and(|o| o != self.worker)
                        && now.duration_since(entry.2) > self.duration
                    {
                        expired.insert(r.shard.clone());
                    }
                }
                expired
            };
            // Leases being handed over are still renewed, but no longer ours to read.
            let (mine, handing): (HashSet<String>, HashSet<String>) = {
                let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                (st.owned.keys().cloned().collect(), st.handing.keys().cloned().collect())
            };
            let mut load: HashMap<String, usize> = HashMap::new();
            for r in &eligible {
                if let Some(o) = &r.owner
                    && !expired.contains(&r.shard)
                    && *o != self.worker
                {
                    *load.entry(o.clone()).or_default() += 1;
                }
            }
            let workers = load.len() + 1;
            let target = eligible.len().div_ceil(workers);
            let mut count = eligible.iter().filter(|r| mine.contains(&r.shard) && !handing.contains(&r.shard)).count();
            for r in &eligible {
                if count >= target {
                    break;
                }
                // A lease under this worker's id that this process does not hold is an orphan
                // of an earlier life (an in-place restart keeps host name and PID 1, and an
                // explicit worker_id always repeats) or of a renewal outage: nobody else will
                // take it before it expires, so it is taken back at once.
                let orphan = r.owner.as_deref() == Some(self.worker.as_str());
                let free = r.owner.is_none() || orphan || expired.contains(&r.shard);
                if free && !mine.contains(&r.shard) && self.take(stream, r).await? {
                    count += 1;
                }
            }
            if count < target {
                // Ask the busiest instance above target for one lease; it hands it over.
                if let Some((victim, n)) = load.iter().max_by_key(|(_, n)| **n)
                    && *n > target
                    && let Some(r) = eligible.iter().find(|r| r.owner.as_deref() == Some(victim.as_str()))
                {
                    self.request(stream, r).await?;
                }
            }
            let owned_now: HashSet<String> = {
                let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.owned.keys().filter(|k| !st.handing.contains_key(*k)).cloned().collect()
            };
            metrics().ddb_shards_owned.with_label_values(&[&self.source]).set(owned_now.len() as i64);
            let owned = eligible
                .iter()
                .filter(|r| owned_now.contains(&r.shard))
                .map(|r| Owned {
                    shard: r.shard.clone(),
                    checkpoint: r.checkpoint.as_deref().map(ShardCheckpoint::decode),
                })
                .collect();
            Ok((owned, lost))
        })
    }

    fn checkpoint<'a>(
        &'a self,
        stream: &'a str,
        shard: &'a str,
        ck: ShardCheckpoint,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let value = ck.encode();
            let r = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("lease_key", s(&Self::key(stream, shard)))
                .update_expression("SET #k = :v")
                .condition_expression("#o = :me")
                .expression_attribute_names("#k", "checkpoint")
                .expression_attribute_names("#o", "owner")
                .expression_attribute_values(":v", s(&value))
                .expression_attribute_values(":me", s(&self.worker))
                .send()
                .await;
            match r {
                Ok(_) => Ok(()),
                Err(e) if conditional_failed(&e) => {
                    self.state.lock().unwrap_or_else(|p| p.into_inner()).owned.remove(shard);
                    Err(StoreError::LeaseLost(shard.to_string()))
                }
                Err(e) => Err(unavailable(&e)),
            }
        })
    }

    fn release<'a>(&'a self, stream: &'a str, shard: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let to = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.owned.remove(shard);
                if let Some(f) = st.fences.remove(shard) {
                    f.revoke();
                }
                st.handing.remove(shard)
            };
            let mut req = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("lease_key", s(&Self::key(stream, shard)))
                .condition_expression("#o = :me")
                .expression_attribute_names("#o", "owner")
                .expression_attribute_values(":me", s(&self.worker));
            req = match &to {
                // The reader has stopped and what it read is applied: the asker owns it now.
                Some(thief) => req
                    .update_expression("SET #o = :to, #c = #c + :one REMOVE #t")
                    .expression_attribute_names("#c", "counter")
                    .expression_attribute_names("#t", "steal_to")
                    .expression_attribute_values(":to", s(thief))
                    .expression_attribute_values(":one", n(1)),
                None => req.update_expression("REMOVE #o"),
            };
            let r = req.send().await;
            if let (Ok(_), Some(thief)) = (&r, &to) {
                tracing::info!(source = %self.source, shard = %shard, to = %thief, "lease handed over after the shard's reader stopped and what it read was applied");
            }
            match r {
                Ok(_) => Ok(()),
                Err(e) if conditional_failed(&e) => Ok(()),
                Err(e) => Err(unavailable(&e)),
            }
        })
    }

    fn balance_interval(&self) -> Duration {
        (self.duration / 3).max(Duration::from_millis(500))
    }

    fn fence(&self, _stream: &str, shard: &str) -> Option<Arc<Fence>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let held_until = match (st.owned.contains_key(shard), st.renewed.get(shard)) {
            (true, Some(sent)) => Some(Fence::validity(*sent, self.duration)),
            _ => None,
        };
        match (st.fences.get(shard), held_until) {
            (Some(f), _) if f.is_valid() => Some(Arc::clone(f)),
            // Still ours (renewed in time) but the last reader's fence lapsed: a new reader
            // starts from the checkpoint under a new fence; the old one's records stay fenced off.
            (_, Some(until)) if until > Instant::now() => {
                let f = Fence::new(until);
                st.fences.insert(shard.to_string(), Arc::clone(&f));
                Some(f)
            }
            // Not ours: a closed fence, nothing read for it may be applied.
            _ => {
                let f = Fence::new(Instant::now());
                f.revoke();
                Some(f)
            }
        }
    }
}
