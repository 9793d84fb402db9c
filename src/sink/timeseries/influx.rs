//! Timestream for InfluxDB / InfluxDB: line protocol over HTTP, `/write` (1.x) or
//! `/api/v2/write` (2.x).
//!
//! Points are idempotent by (measurement, tags, time): writing one again stores the same values,
//! so retries and replays are safe. A 400 "partial write" (a field type conflict, a parse error)
//! names no line, so the batch is split until the offending change is alone; it is dead-lettered
//! with InfluxDB's message and the rest of the batch is written. 429/5xx retry; 401/403 and a
//! missing database are configuration errors (retried with backoff, reported unready).

use std::time::Duration;

use std::sync::Arc;

use futures::future::BoxFuture;

use super::action::{Measure, Point};
use super::config::{InfluxApi, TimeseriesSinkConfig};
use super::lineproto::{FieldValue, encode_line};
use crate::sink::{BatchLimits, ItemOutcome, Payload, Record, Sink, SinkError, SinkErrorKind};

/// A connected InfluxDB target.
pub struct InfluxSink {
    name: String,
    endpoint: String,
    client: reqwest::Client,
    write_url: String,
    auth: Option<String>,
    limits: BatchLimits,
    batch_bytes: usize,
}

/// The line for a point (nanosecond precision).
pub fn line(point: &Point, out: &mut String) -> Result<(), String> {
    let fields: Vec<(String, FieldValue)> = point
        .fields
        .iter()
        .map(|(k, m)| {
            (
                k.clone(),
                match m {
                    Measure::Double(d) => FieldValue::Float(d.clone()),
                    Measure::Bigint(i) => FieldValue::Integer(*i),
                    Measure::Varchar(s) => FieldValue::Str(s.clone()),
                    Measure::Boolean(b) => FieldValue::Bool(*b),
                    Measure::Timestamp(ms) => FieldValue::Integer(*ms),
                },
            )
        })
        .collect();
    encode_line(out, &point.measurement, &point.tags, &fields, point.time_nanos())
}

impl InfluxSink {
    /// Build the client; check the endpoint answers (and create the 1.x database if asked).
    pub async fn connect(
        name: &str,
        cfg: &TimeseriesSinkConfig,
        base: &std::path::Path,
        dry_run: bool,
    ) -> Result<InfluxSink, SinkError> {
        let url = cfg.url.clone().unwrap_or_default().trim_end_matches('/').to_string();
        let err = |kind, msg: String| SinkError { sink: name.to_string(), endpoint: url.clone(), kind, msg };
        let timeout = cfg.timeout.unwrap_or(Duration::from_secs(30));
        let mut builder = reqwest::Client::builder().timeout(timeout).connect_timeout(Duration::from_secs(10));
        if url.starts_with("https") {
            let ca = cfg.tls_ca_file.as_ref().map(|f| if f.is_absolute() { f.clone() } else { base.join(f) });
            let tls = crate::tls::client_config(cfg.tls.unwrap_or(crate::tls::TlsMode::VerifyFull), ca.as_deref())
                .map_err(|e| err(SinkErrorKind::Fatal, e.to_string()))?
                .ok_or_else(|| err(SinkErrorKind::Fatal, "https with tls = \"disable\"".into()))?;
            builder = builder.tls_backend_preconfigured(tls);
        }
        let client = builder.build().map_err(|e| err(SinkErrorKind::Fatal, e.to_string()))?;
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let (write_url, auth) = match cfg.api() {
            InfluxApi::V1 => {
                let mut w = format!("{url}/write?db={}&precision=n", enc(cfg.database.as_deref().unwrap_or_default()));
                if let Some(rp) = &cfg.retention_policy {
                    w.push_str(&format!("&rp={}", enc(rp)));
                }
                let auth = cfg.username.as_ref().map(|u| {
                    use base64::Engine as _;
                    let pass = cfg.password.as_ref().map(|p| p.expose().to_string()).unwrap_or_default();
                    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{pass}")))
                });
                (w, auth)
            }
            InfluxApi::V2 => (
                format!(
                    "{url}/api/v2/write?org={}&bucket={}&precision=ns",
                    enc(cfg.org.as_deref().unwrap_or_default()),
                    enc(cfg.bucket.as_deref().unwrap_or_default())
                ),
                cfg.token.as_ref().map(|t| format!("Token {}", t.expose())),
            ),
        };
        let sink = InfluxSink {
            name: name.to_string(),
            endpoint: url.clone(),
            client,
            write_url,
            auth,
            limits: BatchLimits {
                max_records: cfg.batch_size.unwrap_or(5000),
                linger: cfg.linger.unwrap_or(Duration::from_millis(20)),
            },
            batch_bytes: cfg.batch_bytes.map(|b| b.0 as usize).unwrap_or(4 << 20),
        };
        sink.ping().await?;
        if cfg.create_database && cfg.api() == InfluxApi::V1 && !dry_run {
            let db = cfg.database.as_deref().unwrap_or_default().replace('"', "\\\"");
            let q = format!("{url}/query?q={}", enc(&format!("CREATE DATABASE \"{db}\"")));
            let mut req = sink.client.post(q);
            if let Some(a) = &sink.auth {
                req = req.header("Authorization", a);
            }
            let resp = req.send().await.map_err(|e| sink.transient(e))?;
            if !resp.status().is_success() {
                let status = resp.status();
                return Err(err(
                    SinkErrorKind::Fatal,
                    format!("CREATE DATABASE: {status} {}", resp.text().await.unwrap_or_default()),
                ));
            }
        }
        if !cfg.create_database && cfg.api() == InfluxApi::V1 {
            sink.require_database(cfg.database.as_deref().unwrap_or_default()).await?;
        }
        Ok(sink)
    }

    /// A 1.x database that does not exist is found at start, not by the first write (which
    /// would then be refused on every retry while the slot waits).
    async fn require_database(&self, db: &str) -> Result<(), SinkError> {
        let q = format!("{}/query?q=SHOW%20DATABASES", self.endpoint);
        let mut req = self.client.get(q);
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let resp = req.send().await.map_err(|e| self.transient(e))?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        if status.as_u16() == 401 || status.as_u16() == 403 {
            return Err(self.fatal(format!("SHOW DATABASES: {status}: check username and password")));
        }
        if !status.is_success() {
            return Err(self.transient(format!("SHOW DATABASES: {status} {body}")));
        }
        let names: Vec<&str> = body["results"][0]["series"][0]["values"]
            .as_array()
            .map(|v| v.iter().filter_map(|r| r[0].as_str()).collect())
            .unwrap_or_default();
        if names.contains(&db) {
            return Ok(());
        }
        Err(self.fatal(format!(
            "database {db:?} does not exist on {} (it has: {}); create it (CREATE DATABASE \"{db}\") or set create_database = true",
            self.endpoint,
            if names.is_empty() { "none".to_string() } else { names.join(", ") }
        )))
    }

    fn transient(&self, e: impl std::fmt::Display) -> SinkError {
        SinkError {
            sink: self.name.clone(),
            endpoint: self.endpoint.clone(),
            kind: SinkErrorKind::Transient,
            msg: e.to_string(),
        }
    }

    fn fatal(&self, e: impl std::fmt::Display) -> SinkError {
        SinkError {
            sink: self.name.clone(),
            endpoint: self.endpoint.clone(),
            kind: SinkErrorKind::Fatal,
            msg: e.to_string(),
        }
    }

    async fn ping(&self) -> Result<(), SinkError> {
        let resp = self.client.get(format!("{}/ping", self.endpoint)).send().await.map_err(|e| self.transient(e))?;
        if resp.status().is_success() { Ok(()) } else { Err(self.transient(format!("ping: {}", resp.status()))) }
    }

    /// POST lines; Ok(None) when written, Ok(Some(message)) for a 400 the lines caused.
    async fn post(&self, body: String) -> Result<Option<String>, SinkError> {
        let mut req = self.client.post(&self.write_url).header("Content-Type", "text/plain; charset=utf-8").body(body);
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let resp = req.send().await.map_err(|e| self.transient(e))?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(None);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").or(v.get("message")).and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_else(|| text.trim().to_string());
        match status {
            400 | 413 | 422 => Ok(Some(format!("{status}: {message}"))),
            401 | 403 | 404 => Err(self.fatal(format!("{status}: {message}"))),
            _ => Err(self.transient(format!("{status}: {message}"))),
        }
    }

    /// Write the records at `idx` (their lines are in `lines`), splitting on a 400 until the
    /// change that causes it stands alone.
    fn write_some<'a>(
        &'a self,
        lines: &'a [String],
        idx: Vec<usize>,
        outcomes: &'a mut [ItemOutcome],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut body = String::new();
            for &i in &idx {
                body.push_str(&lines[i]);
            }
            if body.is_empty() {
                return Ok(());
            }
            let too_big = body.len() > self.batch_bytes && idx.len() > 1;
            let failure = if too_big { Some(String::new()) } else { self.post(body).await? };
            let Some(message) = failure else { return Ok(()) };
            if idx.len() == 1 {
                outcomes[idx[0]] = ItemOutcome::Rejected(format!("influxdb {message}"));
                return Ok(());
            }
            let (a, b) = idx.split_at(idx.len() / 2);
            let (a, b) = (a.to_vec(), b.to_vec());
            self.write_some(lines, a, outcomes).await?;
            self.write_some(lines, b, outcomes).await
        })
    }

    async fn write_batch(&self, batch: &[Arc<Record>]) -> Result<Vec<ItemOutcome>, SinkError> {
        let mut outcomes = vec![ItemOutcome::Applied; batch.len()];
        let mut lines = vec![String::new(); batch.len()];
        let mut idx = Vec::with_capacity(batch.len());
        for (i, rec) in batch.iter().enumerate() {
            let Payload::Points(points) = &rec.payload else {
                outcomes[i] = ItemOutcome::Rejected("payload is not for a timeseries sink".into());
                continue;
            };
            let mut text = String::new();
            let mut bad = None;
            for p in points {
                if let Err(e) = line(p, &mut text) {
                    bad = Some(e);
                    break;
                }
                text.push('\n');
            }
            match bad {
                Some(e) => outcomes[i] = ItemOutcome::Rejected(format!("line protocol: {e}")),
                None => {
                    lines[i] = text;
                    idx.push(i);
                }
            }
        }
        super::action::report_collisions(
            &self.name,
            batch.iter().filter_map(|r| match &r.payload {
                Payload::Points(p) => Some(p.as_slice()),
                _ => None,
            }),
        );
        self.write_some(&lines, idx, &mut outcomes).await?;
        Ok(outcomes)
    }
}

impl Sink for InfluxSink {
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
        Box::pin(self.ping())
    }
}
