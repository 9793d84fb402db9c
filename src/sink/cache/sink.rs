//! The cache sink's writer: one pipelined round trip per batch over `fred`.
//!
//! Invalidations are merged into multi-key UNLINK/DEL commands (grouped by hash slot in
//! cluster mode); version-guarded writes run a Lua script (loaded once, re-loaded after a
//! server restart empties the script cache) that compares versions inside the server, so the
//! check and the write are one atomic step. Consecutive guarded writes share one script call
//! per slot (up to 128 items), each item with its own outcome.

use std::sync::Arc;
use std::time::Duration;

use fred::clients::Pool;
use fred::interfaces::{ClientLike, KeysInterface, LuaInterface};
use fred::prelude::{Builder, Config, Options, ReconnectPolicy};
use fred::types::config::{TlsConfig, TlsConnector, TlsHostMapping};
use fred::types::{ClusterHash, CustomCommand, Key, Value as RValue};
use futures::future::BoxFuture;

use super::action::{CacheOp, SetValue};
use super::config::CacheSinkConfig;
use crate::config::redact_url;
use crate::sink::{BatchLimits, ItemOutcome, Payload, Record, Sink, SinkError, SinkErrorKind};

/// Server-side version guard. KEYS: value key, version key. ARGV: version (40-digit, zero
/// padded so string order is numeric order), op (`j` JSON, `h` hash replace, `m` hash merge,
/// `d` delete), ttl seconds (0 = none), tombstone ttl seconds, then the JSON value or the count
/// of hash field pairs, the pairs, and fields to remove. A merge into a hash that is not there
/// (evicted, expired, never written) writes nothing but the version: a partial row is never
/// created.
pub const GUARDED_WRITE: &str = r#"
local cur = redis.call('GET', KEYS[2])
if cur and cur > ARGV[1] then return 0 end
local op = ARGV[2]
if op == 'm' and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[2], ARGV[1], 'EX', tonumber(ARGV[4]))
  return 1
end
if op == 'd' then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], ARGV[1], 'EX', tonumber(ARGV[4]))
  return 1
end
if op == 'j' then
  redis.call('SET', KEYS[1], ARGV[5])
else
  local n = tonumber(ARGV[5])
  if op == 'h' then redis.call('DEL', KEYS[1]) end
  if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 6, 5 + 2 * n)) end
  if #ARGV > 5 + 2 * n then redis.call('HDEL', KEYS[1], unpack(ARGV, 6 + 2 * n, #ARGV)) end
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl * 1000)
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[2], ARGV[1])
end
return 1
"#;

/// Many guarded writes in one script call: [`GUARDED_WRITE`] as a function, applied to each
/// item in order. KEYS: value key and version key of each item; ARGV: for each item the count
/// of its arguments, then those arguments. Returns one entry per item: its result, or `ERR …`
/// with the server's error for that item alone (the items after it still run). One call per
/// slot and up to [`GUARDS_PER_CALL`] items instead of one `EVALSHA` per key: per-call overhead
/// (parsing, script lookup, the Lua call) was most of the server's work for small rows.
pub fn guarded_many_script() -> String {
    format!(
        "local function one(KEYS, ARGV)\n{GUARDED_WRITE}\nend\n{}",
        r#"local out = {}
local a = 1
for i = 1, #KEYS, 2 do
  local n = tonumber(ARGV[a])
  local args = {}
  for j = 1, n do args[j] = ARGV[a + j] end
  a = a + n + 1
  local ok, r = pcall(one, {KEYS[i], KEYS[i + 1]}, args)
  if ok then
    out[#out + 1] = r
  elseif type(r) == 'table' then
    out[#out + 1] = 'ERR ' .. tostring(r.err)
  else
    out[#out + 1] = 'ERR ' .. tostring(r)
  end
end
return out
"#
    )
}

/// Most guarded writes per script call (bounds how long one call holds the server).
const GUARDS_PER_CALL: usize = 128;

/// One queued command of a batch.
enum Cmd {
    Unlink(Vec<String>),
    /// Keys and arguments of [`guarded_many_script`]; one owner per item, in order.
    Guarded(Vec<Key>, Vec<RValue>),
}

/// A guarded write waiting to be grouped into a script call.
struct Guard {
    item: usize,
    keys: Vec<Key>,
    args: Vec<RValue>,
}

/// Keys per multi-key UNLINK.
const KEYS_PER_COMMAND: usize = 1000;

/// A connected cache target.
pub struct CacheSink {
    name: String,
    endpoint: String,
    pool: Pool,
    cluster: bool,
    unlink: bool,
    script_sha: String,
    tombstone_secs: u64,
    limits: BatchLimits,
}

fn err(name: &str, endpoint: &str, kind: SinkErrorKind, e: impl std::fmt::Display) -> SinkError {
    SinkError { sink: name.to_string(), endpoint: endpoint.to_string(), kind, msg: readable(&e.to_string()) }
}

/// fred prints an I/O error as Rust's debug form (`IO Error: Os { code: 111, kind:
/// ConnectionRefused, message: "Connection refused" }`); say it the way an operator reads it
/// (`connection refused (os error 111)`).
fn readable(text: &str) -> String {
    let Some(rest) = text.split("message: \"").nth(1) else { return text.to_string() };
    let Some(message) = rest.split('"').next() else { return text.to_string() };
    let code = text
        .split("code: ")
        .nth(1)
        .and_then(|c| c.split(|ch: char| !ch.is_ascii_digit()).next())
        .filter(|c| !c.is_empty());
    let message = message.to_lowercase();
    match code {
        Some(c) => format!("{message} (os error {c})"),
        None => message,
    }
}

#[cfg(test)]
mod readable_tests {
    #[test]
    fn io_errors_read_like_sentences() {
        assert_eq!(
            super::readable("IO Error: Os { code: 111, kind: ConnectionRefused, message: \"Connection refused\" }"),
            "connection refused (os error 111)"
        );
        assert_eq!(super::readable("WRONGTYPE Operation"), "WRONGTYPE Operation");
    }
}

impl CacheSink {
    /// Connect (waiting for the first connection) and load the guard script.
    pub async fn connect(name: &str, cfg: &CacheSinkConfig) -> Result<CacheSink, SinkError> {
        let endpoint = redact_url(cfg.url.expose());
        let fatal = |e: &dyn std::fmt::Display| err(name, &endpoint, SinkErrorKind::Fatal, e);
        let mut config = Config::from_url(cfg.url.expose()).map_err(|e| fatal(&e))?;
        if let Some(u) = &cfg.username {
            config.username = Some(u.clone());
        }
        if let Some(p) = &cfg.password {
            config.password = Some(p.expose().to_string());
        }
        if cfg.uses_tls() {
            let mode = cfg.tls.unwrap_or(crate::tls::TlsMode::VerifyFull);
            let tls = crate::tls::client_config(mode, cfg.tls_ca_file.as_deref())
                .map_err(|e| fatal(&e))?
                .ok_or_else(|| fatal(&"rediss:// with tls = \"disable\" is contradictory"))?;
            config.tls = Some(TlsConfig { connector: TlsConnector::from(tls), hostnames: TlsHostMapping::None });
        }
        let timeout = cfg.timeout.unwrap_or(Duration::from_secs(5));
        let pool = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = timeout;
                c.internal_command_timeout = timeout;
                c.max_command_attempts = 1;
            })
            .with_performance_config(|p| {
                p.default_command_timeout = timeout;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .build_pool(cfg.connections.unwrap_or(2))
            .map_err(|e| fatal(&e))?;
        let _connection_task = pool.init().await.map_err(|e| {
            if crate::tls::is_certificate_rejection(&e.to_string()) {
                fatal(&format!(
                    "TLS: the server's certificate is not trusted for this address ({e}); check tls_ca_file and that the URL's host name is on the certificate"
                ))
            } else {
                err(name, &endpoint, SinkErrorKind::Transient, e)
            }
        })?;
        let cluster = cfg.is_cluster();
        let sha: String = if cluster {
            pool.next().script_load_cluster(guarded_many_script()).await
        } else {
            pool.next().script_load(guarded_many_script()).await
        }
        .map_err(|e| err(name, &endpoint, SinkErrorKind::Transient, e))?;
        Ok(CacheSink {
            name: name.to_string(),
            endpoint,
            pool,
            cluster,
            unlink: cfg.unlink.unwrap_or(true),
            script_sha: sha,
            tombstone_secs: cfg.tombstone_ttl().as_secs().max(1),
            limits: BatchLimits {
                max_records: cfg.batch_size.unwrap_or(512),
                linger: cfg.linger.unwrap_or(Duration::ZERO),
            },
        })
    }

    async fn reload_script(&self) -> Result<(), SinkError> {
        let r: Result<String, _> = if self.cluster {
            self.pool.next().script_load_cluster(guarded_many_script()).await
        } else {
            self.pool.next().script_load(guarded_many_script()).await
        };
        r.map(|_| ()).map_err(|e| self.transient(e))
    }

    fn transient(&self, e: impl std::fmt::Display) -> SinkError {
        err(&self.name, &self.endpoint, SinkErrorKind::Transient, e)
    }

    fn guarded_args(&self, op: &CacheOp) -> Option<(Vec<Key>, Vec<RValue>)> {
        let s = |x: &str| RValue::from(x.to_string());
        match op {
            CacheOp::Set { key, version_key, version, value, ttl } => {
                let keys = vec![Key::from(key.as_str()), Key::from(version_key.as_str())];
                let ttl = ttl.map(|t| t.as_secs().max(1)).unwrap_or(0);
                let mut args =
                    vec![s(version), s("j"), RValue::from(ttl as i64), RValue::from(self.tombstone_secs as i64)];
                match value {
                    SetValue::Json(j) => {
                        args.push(s(j));
                    }
                    SetValue::Hash { replace, fields, remove } => {
                        args[1] = s(if *replace { "h" } else { "m" });
                        args.push(RValue::from(fields.len() as i64));
                        for (f, v) in fields {
                            args.push(s(f));
                            args.push(RValue::Bytes(v.clone().into()));
                        }
                        for f in remove {
                            args.push(s(f));
                        }
                    }
                }
                Some((keys, args))
            }
            CacheOp::Delete { key, version_key, version } => Some((
                vec![Key::from(key.as_str()), Key::from(version_key.as_str())],
                vec![s(version), s("d"), RValue::from(0i64), RValue::from(self.tombstone_secs as i64), s("0")],
            )),
            _ => None,
        }
    }

    /// Remove every key matching `pattern` (a truncate). In cluster mode every primary is
    /// scanned and keys are removed slot by slot (a multi-key command must stay in one slot).
    async fn delete_pattern(&self, pattern: &str) -> Result<(), SinkError> {
        let client = self.pool.next();
        if self.cluster {
            use fred::types::scan::Scanner;
            use futures::StreamExt;
            let mut pages = std::pin::pin!(client.scan_cluster(pattern.to_string(), Some(1000), None));
            while let Some(page) = pages.next().await {
                let mut page = page.map_err(|e| self.transient(e))?;
                let keys = page.take_results().unwrap_or_default();
                let mut by_slot: std::collections::BTreeMap<u16, Vec<Key>> = Default::default();
                for k in keys {
                    by_slot.entry(redis_slot(k.as_bytes())).or_default().push(k);
                }
                for (_, keys) in by_slot {
                    let _: i64 = if self.unlink { client.unlink(keys).await } else { client.del(keys).await }
                        .map_err(|e| self.transient(e))?;
                }
                page.next();
            }
            return Ok(());
        }
        let mut cursor = "0".to_string();
        loop {
            let (next, keys): (String, Vec<String>) = client
                .custom(
                    CustomCommand::new_static("SCAN", None, false),
                    vec![cursor.clone(), "MATCH".into(), pattern.to_string(), "COUNT".into(), "1000".into()],
                )
                .await
                .map_err(|e| self.transient(e))?;
            if !keys.is_empty() {
                let _: i64 = if self.unlink { client.unlink(keys).await } else { client.del(keys).await }
                    .map_err(|e| self.transient(e))?;
            }
            if next == "0" {
                return Ok(());
            }
            cursor = next;
        }
    }

    async fn write_batch(&self, batch: &[Arc<Record>]) -> Result<Vec<ItemOutcome>, SinkError> {
        let mut outcomes = vec![ItemOutcome::Applied; batch.len()];
        // Which records each queued command answers for.
        let mut owners: Vec<Vec<usize>> = Vec::new();
        let mut pending_keys: Vec<(String, usize)> = Vec::new();
        let flush_keys =
            |pending: &mut Vec<(String, usize)>, owners: &mut Vec<Vec<usize>>, cmds: &mut Vec<Vec<String>>| {
                if pending.is_empty() {
                    return;
                }
                if self.cluster {
                    let mut by_slot: std::collections::BTreeMap<u16, (Vec<String>, Vec<usize>)> = Default::default();
                    for (k, i) in pending.drain(..) {
                        let e = by_slot.entry(redis_slot(k.as_bytes())).or_default();
                        e.0.push(k);
                        e.1.push(i);
                    }
                    for (_, (keys, idx)) in by_slot {
                        cmds.push(keys);
                        owners.push(idx);
                    }
                } else {
                    for chunk in pending.chunks(KEYS_PER_COMMAND) {
                        cmds.push(chunk.iter().map(|(k, _)| k.clone()).collect());
                        owners.push(chunk.iter().map(|(_, i)| *i).collect());
                    }
                    pending.clear();
                }
            };
        // Guarded writes in a row become script calls of up to GUARDS_PER_CALL items, one slot
        // each; a run ends where an invalidation or a pattern delete comes, which keeps every
        // key's order.
        let flush_guards = |run: &mut Vec<Guard>, owners: &mut Vec<Vec<usize>>, cmds: &mut Vec<Cmd>| {
            if run.is_empty() {
                return;
            }
            let mut by_slot: std::collections::BTreeMap<u16, Vec<Guard>> = Default::default();
            for g in run.drain(..) {
                let slot = if self.cluster { redis_slot(g.keys[0].as_bytes()) } else { 0 };
                by_slot.entry(slot).or_default().push(g);
            }
            for (_, guards) in by_slot {
                let mut guards = guards.into_iter().peekable();
                while guards.peek().is_some() {
                    let (mut keys, mut args, mut idx) = (Vec::new(), Vec::new(), Vec::new());
                    for g in guards.by_ref().take(GUARDS_PER_CALL) {
                        keys.extend(g.keys);
                        args.push(RValue::from(g.args.len() as i64));
                        args.extend(g.args);
                        idx.push(g.item);
                    }
                    cmds.push(Cmd::Guarded(keys, args));
                    owners.push(idx);
                }
            }
        };
        let mut cmds: Vec<Cmd> = Vec::new();
        let mut key_cmds: Vec<Vec<String>> = Vec::new();
        let mut run: Vec<Guard> = Vec::new();
        for (i, rec) in batch.iter().enumerate() {
            let Payload::Cache(op) = &rec.payload else {
                outcomes[i] = ItemOutcome::Rejected("payload is not for a cache sink".into());
                continue;
            };
            match op {
                CacheOp::Invalidate { keys } => {
                    flush_guards(&mut run, &mut owners, &mut cmds);
                    for k in keys {
                        pending_keys.push((k.clone(), i));
                    }
                }
                CacheOp::DeletePattern { pattern } => {
                    // Keep order: everything queued so far goes first.
                    flush_guards(&mut run, &mut owners, &mut cmds);
                    flush_keys(&mut pending_keys, &mut owners, &mut key_cmds);
                    cmds.extend(key_cmds.drain(..).map(Cmd::Unlink));
                    self.send(&mut cmds, &mut owners, &mut outcomes).await?;
                    if let Err(e) = self.delete_pattern(pattern).await {
                        if e.kind == SinkErrorKind::Fatal {
                            outcomes[i] = ItemOutcome::Rejected(e.msg);
                        } else {
                            return Err(e);
                        }
                    }
                }
                guarded => {
                    if let Some((keys, args)) = self.guarded_args(guarded) {
                        flush_keys(&mut pending_keys, &mut owners, &mut key_cmds);
                        cmds.extend(key_cmds.drain(..).map(Cmd::Unlink));
                        run.push(Guard { item: i, keys, args });
                    }
                }
            }
        }
        flush_guards(&mut run, &mut owners, &mut cmds);
        flush_keys(&mut pending_keys, &mut owners, &mut key_cmds);
        cmds.extend(key_cmds.drain(..).map(Cmd::Unlink));
        self.send(&mut cmds, &mut owners, &mut outcomes).await?;
        Ok(outcomes)
    }

    async fn send(
        &self,
        cmds: &mut Vec<Cmd>,
        owners: &mut Vec<Vec<usize>>,
        outcomes: &mut [ItemOutcome],
    ) -> Result<(), SinkError> {
        if cmds.is_empty() {
            return Ok(());
        }
        let client = self.pool.next();
        // Fail fast while the connection is down rather than wait in fred's buffer for the
        // reconnect: a command that timed out for us must not be sent later, after the writer
        // retried, gave it to the spool, or abandoned it under a lapsed lease.
        let pipe = client.pipeline().with_options(&Options { fail_fast: true, ..Default::default() });
        for c in cmds.iter() {
            if let Cmd::Unlink(keys) = c {
                tracing::trace!(?keys, "unlink");
            }
            let queued: Result<(), _> = match c {
                Cmd::Unlink(keys) => {
                    if self.unlink {
                        pipe.unlink::<(), _>(keys.clone()).await
                    } else {
                        pipe.del::<(), _>(keys.clone()).await
                    }
                }
                Cmd::Guarded(keys, args) => {
                    // Pipelines have no Lua interface in fred; EVALSHA as a custom command,
                    // routed by its first key (argument 2) in cluster mode.
                    let mut a: Vec<RValue> = Vec::with_capacity(3 + args.len());
                    a.push(RValue::from(self.script_sha.as_str()));
                    a.push(RValue::from(keys.len() as i64));
                    a.extend(keys.iter().map(|k| RValue::Bytes(k.as_bytes().to_vec().into())));
                    a.extend(args.iter().cloned());
                    pipe.custom::<(), _>(CustomCommand::new_static("EVALSHA", ClusterHash::Offset(2), false), a).await
                }
            };
            queued.map_err(|e| self.transient(e))?;
        }
        let results: Vec<Result<RValue, fred::error::Error>> = pipe.try_all().await;
        if results.len() != cmds.len() {
            return Err(self.transient(format!("pipeline answered {} of {} commands", results.len(), cmds.len())));
        }
        let mut noscript = false;
        for ((r, idx), cmd) in results.into_iter().zip(owners.iter()).zip(cmds.iter()) {
            if let (Ok(answer), Cmd::Guarded(..)) = (&r, cmd) {
                let per_item = match answer {
                    RValue::Array(a) if a.len() == idx.len() => a,
                    other => {
                        return Err(self.transient(format!("guarded write answered {other:?} for {} items", idx.len())));
                    }
                };
                for (v, &i) in per_item.iter().zip(idx) {
                    if let Some(text) = v.as_str().filter(|t| t.starts_with("ERR ")) {
                        let text = text.trim_start_matches("ERR ").to_string();
                        outcomes[i] = if is_transient_text(&text) {
                            ItemOutcome::Retry(format!("redis: {text}"))
                        } else {
                            ItemOutcome::Rejected(format!("redis: {text}"))
                        };
                    }
                }
                continue;
            }
            if let Err(e) = r {
                let text = e.to_string();
                if text.contains("NOSCRIPT") {
                    noscript = true;
                    continue;
                }
                if is_transient_error(&e) {
                    return Err(self.transient(e));
                }
                for &i in idx {
                    outcomes[i] = ItemOutcome::Rejected(format!("redis: {text}"));
                }
            }
        }
        cmds.clear();
        owners.clear();
        if noscript {
            // The server lost its script cache (restart or SCRIPT FLUSH): load it again
            // and let the runner retry the batch; every command in it is idempotent.
            self.reload_script().await?;
            return Err(self.transient("script cache was empty (server restarted?); script reloaded"));
        }
        Ok(())
    }
}

fn is_transient_error(e: &fred::error::Error) -> bool {
    use fred::error::ErrorKind as K;
    match e.kind() {
        K::IO | K::Timeout | K::Canceled | K::Backpressure | K::Cluster | K::Routing | K::Unknown => true,
        K::Auth | K::Config | K::Url | K::Tls | K::Protocol | K::Parse | K::InvalidArgument | K::InvalidCommand => {
            // A server-side error reply for one command (WRONGTYPE, script error) is permanent
            // for that item; connection-level protocol problems are not.
            is_transient_text(e.details())
        }
        _ => false,
    }
}

/// Server error texts that pass (loading, busy, fail-over, out of memory): retried, not
/// dead-lettered.
fn is_transient_text(t: &str) -> bool {
    ["LOADING", "BUSY", "TRYAGAIN", "CLUSTERDOWN", "MOVED", "ASK", "MASTERDOWN", "READONLY", "OOM"]
        .iter()
        .any(|m| t.contains(m))
}

/// CRC16 (XMODEM) hash slot of a key, honouring `{hash tags}`, as Redis Cluster computes it.
pub fn redis_slot(key: &[u8]) -> u16 {
    let k = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    let mut crc: u16 = 0;
    for &b in k {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

impl Sink for CacheSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    fn limits(&self) -> BatchLimits {
        self.limits
    }

    fn write<'a>(&'a self, batch: &'a [Arc<Record>]) -> BoxFuture<'a, Result<Vec<ItemOutcome>, SinkError>> {
        Box::pin(self.write_batch(batch))
    }

    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let r: Result<String, _> = self.pool.next().ping(None).await;
            r.map(|_| ()).map_err(|e| self.transient(e))
        })
    }
}

impl Drop for CacheSink {
    fn drop(&mut self) {
        let pool = self.pool.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = pool.quit().await;
            });
        }
    }
}

#[allow(dead_code)]
fn _assert_send(s: Arc<CacheSink>) -> impl Send {
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification / CLUSTER KEYSLOT.
        assert_eq!(redis_slot(b"123456789"), 12739);
        assert_eq!(redis_slot(b"foo"), 12182);
        assert_eq!(redis_slot(b"{user1000}.following"), redis_slot(b"user1000"));
        assert_eq!(redis_slot(b"foo{}{bar}"), redis_slot(b"foo{}{bar}"));
    }
}
