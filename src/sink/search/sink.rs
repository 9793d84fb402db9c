//! The search sink's writer: `_bulk` requests on the `opensearch` crate's transport, with every
//! item of the response examined on its own.
//!
//! * 2xx: applied. 409 (version conflict): the index already holds this or a newer version of
//!   the document, which is success. 404 on delete: already gone, success.
//! * 429 and 5xx items: retried alone, with backoff, by the runner; the rest of the batch is
//!   not repeated.
//! * Other 4xx items (mapping and parse errors): dead-lettered with the server's reason.
//! * A request-level failure (network, 5xx, 429) retries the batch; 413 splits it.

use std::time::Duration;

use std::sync::Arc;

use futures::future::BoxFuture;
use opensearch::OpenSearch;
use opensearch::auth::Credentials;
use opensearch::cert::{Certificate, CertificateValidation};
use opensearch::http::headers::{CONTENT_TYPE, HeaderMap, HeaderValue};
use opensearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use opensearch::http::{Method, StatusCode};

use super::action::{Keep, SearchOp};
use super::config::{SearchAuth, SearchSinkConfig};
use crate::aws::AwsSettings;
use crate::sink::{BatchLimits, ItemOutcome, Payload, Record, Sink, SinkError, SinkErrorKind};
use crate::telemetry::metrics;
use crate::tls::TlsMode;

/// A connected search target.
pub struct SearchSink {
    name: String,
    endpoint: String,
    client: OpenSearch,
    limits: BatchLimits,
    batch_bytes: usize,
    timeout: Duration,
    refresh_wait: bool,
    serverless: bool,
}

fn err(name: &str, endpoint: &str, kind: SinkErrorKind, msg: impl std::fmt::Display) -> SinkError {
    SinkError { sink: name.to_string(), endpoint: endpoint.to_string(), kind, msg: msg.to_string() }
}

/// One bulk line pair for an op; `document` replaces the op's own (a merged partial one).
fn encode(op: &SearchOp, document: Option<&str>, out: &mut String) {
    let action = if op.document.is_some() { "index" } else { "delete" };
    let mut meta = serde_json::json!({
        "_index": op.index,
        "_id": op.id,
        "version": op.version,
        "version_type": "external_gte",
    });
    if let Some(r) = &op.routing {
        meta["routing"] = serde_json::Value::String(r.clone());
    }
    out.push_str(&serde_json::json!({ action: meta }).to_string());
    out.push('\n');
    if let Some(doc) = document.or(op.document.as_deref()) {
        out.push_str(doc);
        out.push('\n');
    }
}

/// A partial document completed from the stored one: fields `keep` names (or every field the
/// new document lacks) are copied from `stored`, each value's JSON text unchanged.
pub fn merge_document(new: &str, stored: &str, keep: &Keep) -> Result<String, String> {
    use serde_json::value::RawValue;
    let mut doc: std::collections::BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(new).map_err(|e| format!("document is not a JSON object: {e}"))?;
    let old: std::collections::BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(stored).map_err(|e| format!("stored document is not a JSON object: {e}"))?;
    for (k, v) in old {
        let wanted = match keep {
            Keep::Absent => true,
            Keep::Fields(f) => f.contains(&k),
        };
        if wanted && !doc.contains_key(&k) {
            doc.insert(k, v);
        }
    }
    serde_json::to_string(&doc).map_err(|e| e.to_string())
}

/// Outcome of one bulk response item.
pub fn item_outcome(item: &serde_json::Value) -> ItemOutcome {
    let Some((action, body)) = item.as_object().and_then(|o| o.iter().next()) else {
        return ItemOutcome::Retry("bulk response item without an action".into());
    };
    let status = body.get("status").and_then(|s| s.as_u64()).unwrap_or(0);
    let reason = || {
        let e = &body["error"];
        match (e.get("type").and_then(|t| t.as_str()), e.get("reason").and_then(|t| t.as_str())) {
            (Some(t), Some(r)) => format!("{status} {t}: {r}"),
            _ => format!("{status} {e}"),
        }
    };
    match status {
        200..=299 => ItemOutcome::Applied,
        409 => ItemOutcome::Applied,
        404 if action == "delete" => ItemOutcome::Applied,
        429 | 500..=599 => ItemOutcome::Retry(reason()),
        _ => ItemOutcome::Rejected(reason()),
    }
}

impl SearchSink {
    /// Resolve the endpoint, build the client, create missing indices, templates and aliases
    /// (not in a `dry_run`: `check --online` only connects).
    pub async fn connect(
        name: &str,
        cfg: &SearchSinkConfig,
        aws: &AwsSettings,
        base: &std::path::Path,
        dry_run: bool,
    ) -> Result<SearchSink, SinkError> {
        let fatal = |endpoint: &str, e: &dyn std::fmt::Display| err(name, endpoint, SinkErrorKind::Fatal, e);
        let needs_aws = cfg.auth() == SearchAuth::Sigv4 || cfg.domain.is_some();
        let sdk = if needs_aws { Some(crate::aws::sdk_config(aws).await) } else { None };
        let url = match (&cfg.url, &cfg.domain) {
            (Some(u), _) => u.clone(),
            (None, Some(domain)) => {
                let client = aws_sdk_opensearch::Client::new(sdk.as_ref().expect("loaded above"));
                let out = client.describe_domain().domain_name(domain).send().await.map_err(|e| {
                    err(
                        name,
                        domain,
                        SinkErrorKind::Transient,
                        format!("DescribeDomain {domain}: {}", aws_error_text(&e)),
                    )
                })?;
                let status = out.domain_status();
                let endpoint = status
                    .and_then(|s| s.endpoint().map(str::to_string).or_else(|| s.endpoints()?.get("vpc").cloned()))
                    .ok_or_else(|| fatal(domain, &format!("domain {domain} has no endpoint yet (still creating?)")))?;
                format!("https://{endpoint}")
            }
            (None, None) => unreachable!("validate() requires url or domain"),
        };
        let endpoint = url.clone();
        let parsed = url::Url::parse(&url).map_err(|e| fatal(&endpoint, &e))?;
        let timeout = cfg.timeout.unwrap_or(Duration::from_secs(30));
        let mut builder = TransportBuilder::new(SingleNodeConnectionPool::new(parsed)).timeout(timeout).disable_proxy();
        if url.starts_with("https") {
            let ca = match &cfg.tls_ca_file {
                Some(f) => {
                    let f = if f.is_absolute() { f.clone() } else { base.join(f) };
                    let pem = std::fs::read(&f).map_err(|e| fatal(&endpoint, &format!("{}: {e}", f.display())))?;
                    Some(Certificate::from_pem(&pem).map_err(|e| fatal(&endpoint, &format!("{}: {e}", f.display())))?)
                }
                None => None,
            };
            builder = builder.cert_validation(match (cfg.tls.unwrap_or(TlsMode::VerifyFull), ca) {
                (TlsMode::VerifyFull, Some(ca)) => CertificateValidation::Full(ca),
                (TlsMode::VerifyFull, None) => CertificateValidation::Default,
                (TlsMode::VerifyCa, _) => {
                    return Err(fatal(
                        &endpoint,
                        &"tls = \"verify-ca\" is not available for search sinks; use verify-full with tls_ca_file",
                    ));
                }
                _ => CertificateValidation::None,
            });
        }
        match cfg.auth() {
            SearchAuth::None => {}
            SearchAuth::Basic => {
                builder = builder.auth(Credentials::Basic(
                    cfg.username.clone().unwrap_or_default(),
                    cfg.password.as_ref().map(|p| p.expose().to_string()).unwrap_or_default(),
                ));
            }
            SearchAuth::Sigv4 => {
                let sdk = sdk.as_ref().expect("loaded above");
                let creds = sdk.credentials_provider().ok_or_else(|| {
                    fatal(
                        &endpoint,
                        &"SigV4: no AWS credentials found (environment, profile, task role or instance profile)",
                    )
                })?;
                let region = cfg
                    .region
                    .clone()
                    .map(aws_types::region::Region::new)
                    .or_else(|| sdk.region().cloned())
                    .ok_or_else(|| fatal(&endpoint, &"SigV4: no region (set region or AWS_REGION)"))?;
                builder = builder
                    .auth(Credentials::AwsSigV4(creds, region))
                    .service_name(cfg.service.as_deref().unwrap_or("es"));
            }
        }
        let client = OpenSearch::new(builder.build().map_err(|e| fatal(&endpoint, &e))?);
        let sink = SearchSink {
            name: name.to_string(),
            endpoint,
            client,
            limits: BatchLimits {
                max_records: cfg.batch_size.unwrap_or(500),
                linger: cfg.linger.unwrap_or(Duration::from_millis(5)),
            },
            batch_bytes: cfg.batch_bytes.map(|b| b.0 as usize).unwrap_or(5 << 20),
            timeout,
            refresh_wait: cfg.refresh_wait,
            serverless: cfg.service.as_deref() == Some("aoss"),
        };
        if !dry_run {
            sink.setup(cfg, base).await?;
        }
        Ok(sink)
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        ndjson: bool,
    ) -> Result<(StatusCode, String), SinkError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(if ndjson { "application/x-ndjson" } else { "application/json" }),
        );
        let resp = self
            .client
            .transport()
            .send(method, path, headers, None::<&()>, body, Some(self.timeout))
            .await
            .map_err(|e| self.transient(e))?;
        let status = resp.status_code();
        let text = resp.text().await.map_err(|e| self.transient(e))?;
        Ok((status, text))
    }

    fn transient(&self, e: impl std::fmt::Display) -> SinkError {
        err(&self.name, &self.endpoint, SinkErrorKind::Transient, e)
    }

    fn fatal(&self, e: impl std::fmt::Display) -> SinkError {
        err(&self.name, &self.endpoint, SinkErrorKind::Fatal, e)
    }

    /// Create what is missing: templates, indices (with their body), aliases.
    async fn setup(&self, cfg: &SearchSinkConfig, base: &std::path::Path) -> Result<(), SinkError> {
        let read = |p: &std::path::Path| -> Result<Vec<u8>, SinkError> {
            let p = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
            let bytes = std::fs::read(&p).map_err(|e| self.fatal(format!("{}: {e}", p.display())))?;
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .map_err(|e| self.fatal(format!("{}: not JSON: {e}", p.display())))?;
            Ok(bytes)
        };
        for t in &cfg.templates {
            let path = format!("/_index_template/{}", t.name);
            let (status, _) = self.request(Method::Head, &path, None, false).await?;
            if status == StatusCode::NOT_FOUND {
                let (status, body) = self.request(Method::Put, &path, Some(read(&t.body)?), false).await?;
                if !status.is_success() {
                    return Err(self.fatal(format!("creating index template {}: {status} {body}", t.name)));
                }
                tracing::info!(sink = %self.name, template = %t.name, "created index template");
            }
        }
        for ix in &cfg.indices {
            let (status, _) = self.request(Method::Head, &format!("/{}", ix.name), None, false).await?;
            if status == StatusCode::NOT_FOUND {
                let body = ix.body.as_deref().map(&read).transpose()?.unwrap_or_else(|| b"{}".to_vec());
                let (status, text) = self.request(Method::Put, &format!("/{}", ix.name), Some(body), false).await?;
                if !status.is_success() && !text.contains("resource_already_exists_exception") {
                    return Err(self.fatal(format!("creating index {}: {status} {text}", ix.name)));
                }
                tracing::info!(sink = %self.name, index = %ix.name, "created index");
            } else if status.is_server_error() {
                return Err(self.transient(format!("checking index {}: {status}", ix.name)));
            }
            if let Some(alias) = &ix.alias {
                let (status, _) =
                    self.request(Method::Head, &format!("/{}/_alias/{alias}", ix.name), None, false).await?;
                if status == StatusCode::NOT_FOUND {
                    let (status, text) =
                        self.request(Method::Put, &format!("/{}/_alias/{alias}", ix.name), None, false).await?;
                    if !status.is_success() {
                        return Err(self.fatal(format!("creating alias {alias}: {status} {text}")));
                    }
                    tracing::info!(sink = %self.name, index = %ix.name, alias = %alias, "created alias");
                }
            }
        }
        Ok(())
    }

    /// Send `items` (indexes into `ops`) as one `_bulk` request, splitting on 413.
    fn send<'a>(
        &'a self,
        ops: &'a [&'a SearchOp],
        merged: &'a std::collections::HashMap<usize, String>,
        items: Vec<usize>,
        outcomes: &'a mut [ItemOutcome],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut body = String::new();
            for &i in &items {
                encode(ops[i], merged.get(&i).map(String::as_str), &mut body);
            }
            let path = if self.refresh_wait { "/_bulk?refresh=wait_for" } else { "/_bulk" };
            let (status, text) = self.request(Method::Post, path, Some(body.into_bytes()), true).await?;
            match status.as_u16() {
                200 => {}
                413 if items.len() > 1 => {
                    let (a, b) = items.split_at(items.len() / 2);
                    self.send(ops, merged, a.to_vec(), outcomes).await?;
                    return self.send(ops, merged, b.to_vec(), outcomes).await;
                }
                413 => {
                    outcomes[items[0]] = ItemOutcome::Rejected("413: document larger than the cluster accepts".into());
                    return Ok(());
                }
                401 | 403 => return Err(self.fatal(format!("{status}: {}", truncate(&text)))),
                s if s == 429 || s >= 500 => return Err(self.transient(format!("{status}: {}", truncate(&text)))),
                _ => {
                    // A request-level 4xx (bad request line) fails every item alike.
                    for &i in &items {
                        outcomes[i] = ItemOutcome::Rejected(format!("{status}: {}", truncate(&text)));
                    }
                    return Ok(());
                }
            }
            let parsed: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| self.transient(format!("bulk response is not JSON: {e}")))?;
            let answered = parsed["items"].as_array().ok_or_else(|| self.transient("bulk response without items"))?;
            if answered.len() != items.len() {
                return Err(self.transient(format!("bulk answered {} of {} items", answered.len(), items.len())));
            }
            for (&i, item) in items.iter().zip(answered) {
                outcomes[i] = item_outcome(item);
            }
            Ok(())
        })
    }

    /// Documents of partial rows (columns the source did not send), completed from the stored
    /// copies. Per key the lane orders writes, so the stored copy is the previous change's
    /// document, whose value for an unsent column is this change's too: an earlier write of the
    /// same document in this batch, or else the index's copy (one `_mget` for all of those). A
    /// document with no copy anywhere is written as it is, and counted.
    async fn complete_partial<'a>(
        &self,
        batch: &[Arc<Record>],
        ops: &[&'a SearchOp],
        index_of: &[usize],
    ) -> Result<std::collections::HashMap<usize, String>, SinkError> {
        use std::collections::HashMap;
        let mut merged = HashMap::new();
        if !ops.iter().any(|o| o.keep.is_some() && o.document.is_some()) {
            return Ok(merged);
        }
        type DocKey<'k> = (&'k str, &'k str, Option<&'k str>);
        let key = |o: &'a SearchOp| -> DocKey<'a> { (o.index.as_str(), o.id.as_str(), o.routing.as_deref()) };
        // Which partial documents have no earlier write in this batch: those need the index.
        let mut seen: std::collections::HashSet<DocKey<'a>> = Default::default();
        let mut fetch: Vec<usize> = Vec::new();
        for (i, o) in ops.iter().enumerate() {
            if o.keep.is_some() && o.document.is_some() && !seen.contains(&key(o)) {
                fetch.push(i);
            }
            seen.insert(key(o));
        }
        let mut stored: HashMap<usize, Option<String>> = HashMap::new();
        if !fetch.is_empty() {
            let docs: Vec<serde_json::Value> = fetch
                .iter()
                .map(|&i| {
                    let mut d = serde_json::json!({ "_index": ops[i].index, "_id": ops[i].id });
                    if let Some(r) = &ops[i].routing {
                        d["routing"] = serde_json::Value::String(r.clone());
                    }
                    d
                })
                .collect();
            let body = serde_json::to_vec(&serde_json::json!({ "docs": docs })).map_err(|e| self.transient(e))?;
            let (status, text) = self.request(Method::Post, "/_mget", Some(body), false).await?;
            if !status.is_success() {
                return Err(self.transient(format!("_mget for partial documents: {status}: {}", truncate(&text))));
            }
            #[derive(serde::Deserialize)]
            struct Found<'a> {
                #[serde(default)]
                found: bool,
                #[serde(borrow, rename = "_source")]
                source: Option<&'a serde_json::value::RawValue>,
            }
            #[derive(serde::Deserialize)]
            struct Answer<'a> {
                #[serde(borrow)]
                docs: Vec<Found<'a>>,
            }
            let answer: Answer<'_> =
                serde_json::from_str(&text).map_err(|e| self.transient(format!("_mget answer is not JSON: {e}")))?;
            if answer.docs.len() != fetch.len() {
                return Err(self.transient(format!(
                    "_mget answered {} of {} documents",
                    answer.docs.len(),
                    fetch.len()
                )));
            }
            for (&i, f) in fetch.iter().zip(answer.docs) {
                stored.insert(i, f.source.filter(|_| f.found).map(|r| r.get().to_string()));
            }
        }
        // In order: each write leaves the document the next partial one completes from.
        let mut current: HashMap<DocKey<'a>, Option<String>> = HashMap::new();
        for (i, o) in ops.iter().enumerate() {
            let k = key(o);
            let Some(doc) = &o.document else {
                current.insert(k, None); // deleted
                continue;
            };
            let Some(keep) = &o.keep else {
                current.insert(k, Some(doc.clone()));
                continue;
            };
            let base = match current.get(&k) {
                Some(b) => b.clone(),
                None => stored.get(&i).cloned().flatten(),
            };
            let result = match base {
                Some(b) => match merge_document(doc, &b, keep) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(sink = %self.name, index = %o.index, id = %o.id, error = %e, "cannot complete a partial document; writing it as it is");
                        doc.clone()
                    }
                },
                None => {
                    metrics().incomplete_rows.with_label_values(&[&self.name]).inc();
                    let rec = &batch[index_of[i]];
                    tracing::warn!(
                        sink = %self.name, index = %o.index, id = %o.id, relation = %rec.change.relation,
                        key = %rec.change.key_display(), missing = ?rec.change.unchanged,
                        "the source did not send some columns (unchanged TOAST values) and the index holds no copy to keep them from; the document is written without them (set REPLICA IDENTITY FULL on the table, or re-read it with polysync snapshot)"
                    );
                    doc.clone()
                }
            };
            current.insert(k, Some(result.clone()));
            merged.insert(i, result);
        }
        Ok(merged)
    }

    /// Empty an index (a truncate): make every write so far visible, then delete every document,
    /// repeating while a concurrent write conflicts.
    async fn clear(&self, index: &str) -> Result<ItemOutcome, SinkError> {
        for _ in 0..10 {
            let (status, text) = self.request(Method::Post, &format!("/{index}/_refresh"), None, false).await?;
            if status == StatusCode::NOT_FOUND {
                return Ok(ItemOutcome::Applied); // no index, no documents
            }
            if !status.is_success() {
                return Err(self.transient(format!("refresh {index}: {status}: {}", truncate(&text))));
            }
            let body = br#"{"query":{"match_all":{}}}"#.to_vec();
            let path = format!("/{index}/_delete_by_query?conflicts=proceed&refresh=true");
            let (status, text) = self.request(Method::Post, &path, Some(body), false).await?;
            if status == StatusCode::NOT_FOUND {
                return Ok(ItemOutcome::Applied);
            }
            if status.as_u16() == 429 || status.is_server_error() {
                return Err(self.transient(format!("delete_by_query {index}: {status}: {}", truncate(&text))));
            }
            if !status.is_success() {
                return Ok(ItemOutcome::Rejected(format!("delete_by_query {index}: {status}: {}", truncate(&text))));
            }
            let answer: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| self.transient(format!("delete_by_query answer: {e}")))?;
            let failures = answer["failures"].as_array().map_or(0, Vec::len);
            let conflicts = answer["version_conflicts"].as_u64().unwrap_or(0);
            if failures == 0 && conflicts == 0 {
                tracing::info!(sink = %self.name, index, deleted = answer["deleted"].as_u64().unwrap_or(0), "index emptied (truncate)");
                return Ok(ItemOutcome::Applied);
            }
        }
        Err(self.transient(format!("delete_by_query {index}: documents kept conflicting or failing")))
    }

    async fn write_batch(&self, batch: &[Arc<Record>]) -> Result<Vec<ItemOutcome>, SinkError> {
        // A truncate comes alone (the queue makes it a barrier); in any case it splits the batch.
        if let Some(pos) = batch.iter().position(|r| matches!(r.payload, Payload::SearchClear { .. })) {
            let mut outcomes = Box::pin(self.write_batch(&batch[..pos])).await?;
            let Payload::SearchClear { index } = &batch[pos].payload else { unreachable!("matched above") };
            outcomes.push(self.clear(index).await?);
            outcomes.extend(Box::pin(self.write_batch(&batch[pos + 1..])).await?);
            return Ok(outcomes);
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut outcomes = vec![ItemOutcome::Applied; batch.len()];
        let mut ops: Vec<&SearchOp> = Vec::with_capacity(batch.len());
        let mut index_of = Vec::with_capacity(batch.len());
        for (i, rec) in batch.iter().enumerate() {
            match &rec.payload {
                Payload::Search(op) => {
                    ops.push(op);
                    index_of.push(i);
                }
                _ => outcomes[i] = ItemOutcome::Rejected("payload is not for a search sink".into()),
            }
        }
        let merged = self.complete_partial(batch, &ops, &index_of).await?;
        // Chunk by bytes.
        let mut op_outcomes = vec![ItemOutcome::Applied; ops.len()];
        let mut chunk = Vec::new();
        let mut size = 0usize;
        for (i, op) in ops.iter().enumerate() {
            let len = op.document.as_ref().map_or(0, |d| d.len()) + op.index.len() + op.id.len() + 120;
            if !chunk.is_empty() && size + len > self.batch_bytes {
                self.send(&ops, &merged, std::mem::take(&mut chunk), &mut op_outcomes).await?;
                size = 0;
            }
            chunk.push(i);
            size += len;
        }
        if !chunk.is_empty() {
            self.send(&ops, &merged, chunk, &mut op_outcomes).await?;
        }
        for (k, o) in op_outcomes.into_iter().enumerate() {
            outcomes[index_of[k]] = o;
        }
        Ok(outcomes)
    }
}

fn truncate(s: &str) -> &str {
    &s[..s.floor_char_boundary(s.len().min(500))]
}

/// The message inside an AWS SDK error (service code and message), not just "service error".
pub fn aws_error_text<E: std::error::Error + ?Sized>(e: &E) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    // One line: the SDK's credential-chain report spans several.
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Sink for SearchSink {
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
            if self.serverless {
                return Ok(()); // collections answer no cluster-level GET; writes report health
            }
            let (status, body) = self.request(Method::Get, "/", None, false).await?;
            if status.is_success() { Ok(()) } else { Err(self.transient(format!("{status}: {}", truncate(&body)))) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_bulk_item_status_has_an_outcome() {
        assert_eq!(item_outcome(&json!({"index": {"status": 201}})), ItemOutcome::Applied);
        assert_eq!(
            item_outcome(
                &json!({"index": {"status": 409, "error": {"type": "version_conflict_engine_exception", "reason": "x"}}})
            ),
            ItemOutcome::Applied,
            "already newer"
        );
        assert_eq!(item_outcome(&json!({"delete": {"status": 404}})), ItemOutcome::Applied);
        assert!(matches!(
            item_outcome(
                &json!({"index": {"status": 429, "error": {"type": "es_rejected_execution_exception", "reason": "queue"}}})
            ),
            ItemOutcome::Retry(_)
        ));
        assert!(matches!(item_outcome(&json!({"index": {"status": 503}})), ItemOutcome::Retry(_)));
        assert_eq!(
            item_outcome(
                &json!({"index": {"status": 400, "error": {"type": "mapper_parsing_exception", "reason": "failed to parse field [price]"}}})
            ),
            ItemOutcome::Rejected("400 mapper_parsing_exception: failed to parse field [price]".into())
        );
    }

    #[test]
    fn bulk_lines() {
        let mut s = String::new();
        encode(
            &SearchOp {
                index: "i".into(),
                id: "1".into(),
                version: 7,
                document: Some("{\"a\":1}".into()),
                routing: None,
                keep: None,
            },
            None,
            &mut s,
        );
        encode(
            &SearchOp {
                index: "i".into(),
                id: "2".into(),
                version: 8,
                document: None,
                routing: Some("r".into()),
                keep: None,
            },
            None,
            &mut s,
        );
        let lines: Vec<serde_json::Value> = s.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0]["index"]["version_type"], "external_gte");
        assert_eq!(lines[0]["index"]["version"], 7);
        assert_eq!(lines[1]["a"], 1);
        assert_eq!(lines[2]["delete"]["_id"], "2");
        assert_eq!(lines[2]["delete"]["routing"], "r");
        assert_eq!(lines.len(), 3);
    }

    #[test]
    fn partial_documents_keep_exactly_the_unsent_fields() {
        let stored = r#"{"id":5,"big":"long text","price":12.3400000000000000001,"gone":1}"#;
        let merged = merge_document(r#"{"id":5,"price":1.10}"#, stored, &Keep::Fields(vec!["big".into()])).unwrap();
        assert_eq!(merged, r#"{"big":"long text","id":5,"price":1.10}"#);
        let all = merge_document(r#"{"id":5}"#, stored, &Keep::Absent).unwrap();
        assert!(all.contains(r#""price":12.3400000000000000001"#), "exact digits kept: {all}");
    }
}
