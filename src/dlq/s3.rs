//! Dead letters in S3 (`[dlq.s3]`): the durable record when the machine's disk is not (a
//! Fargate task's is gone with the task). One object per entry, keyed
//! `<prefix><pipeline>/<sink>/<yyyy-mm-dd>/<id>.json`, holding the same JSON line as the local
//! file, written with server-side encryption. An entry is put under its own id, so writing it
//! twice (a drain after a crash) leaves one object.
//!
//! What `dlq replay` delivered and what `dlq discard` gave up are small marker objects under
//! `<prefix>_polysync/`, so every task and every operator's machine sees the same standing.
//! Only `s3:PutObject`, `s3:GetObject` and `s3:ListBucket` on the prefix are needed.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ServerSideEncryption;
use futures::{StreamExt, TryStreamExt};

use super::config::{S3DlqConfig, Sse};
use super::{Discarded, StoredDeadLetter, parse_entry};
use crate::aws::AwsSettings;

/// Where polysync's own markers live under the prefix (no pipeline has this name).
const MARKERS: &str = "_polysync/";

/// An S3 call that failed.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// S3 answered with a refusal that waiting does not fix (no such bucket, access denied).
    #[error("dead letters in {location}: {call}: {code}: {message}")]
    Refused {
        /// `s3://bucket/prefix`.
        location: String,
        /// The S3 operation.
        call: &'static str,
        /// S3's error code.
        code: String,
        /// S3's message.
        message: String,
    },
    /// No answer, a timeout, a server error or throttling: retried.
    #[error("dead letters in {location}: {call}: S3 unreachable: {detail}")]
    Unreachable {
        /// `s3://bucket/prefix`.
        location: String,
        /// The S3 operation.
        call: &'static str,
        /// What failed.
        detail: String,
    },
    /// An object that is not a dead-letter entry.
    #[error("dead letters in {location}: {key}: {detail}")]
    Unreadable {
        /// `s3://bucket/prefix`.
        location: String,
        /// Object key.
        key: String,
        /// Why.
        detail: String,
    },
}

/// The bucket and prefix dead letters go to.
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    sse: Sse,
    kms_key_id: Option<String>,
}

impl S3Store {
    /// A client for the configured bucket (path-style addressing when an endpoint is set, as
    /// emulators and VPC endpoints by IP need). Nothing is called yet; see [`S3Store::check`].
    pub async fn connect(cfg: &S3DlqConfig, aws: &AwsSettings) -> S3Store {
        let mut settings = aws.clone();
        if let Some(e) = &cfg.endpoint_url {
            settings.endpoint_url = Some(e.clone());
        }
        let sdk = crate::aws::sdk_config(&settings).await;
        let client = Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk).force_path_style(settings.endpoint_url.is_some()).build(),
        );
        let mut prefix = cfg.prefix.trim_start_matches('/').to_string();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        S3Store { client, bucket: cfg.bucket.clone(), prefix, sse: cfg.sse, kms_key_id: cfg.kms_key_id.clone() }
    }

    /// `s3://bucket/prefix`, for messages.
    pub fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn error<E>(&self, call: &'static str, e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        match e {
            SdkError::ServiceError(s) => {
                let code = s.err().code().unwrap_or("error").to_string();
                let message = s.err().message().unwrap_or("").to_string();
                let status = s.raw().status().as_u16();
                if status >= 500 || code == "SlowDown" || code == "RequestTimeout" {
                    S3Error::Unreachable { location: self.location(), call, detail: format!("{code}: {message}") }
                } else {
                    S3Error::Refused { location: self.location(), call, code, message }
                }
            }
            other => S3Error::Unreachable {
                location: self.location(),
                call,
                detail: crate::sink::search::aws_error_text(other),
            },
        }
    }

    /// At start: the bucket answers and the prefix may be listed (a missing bucket or a denied
    /// listing refuses the start; no answer is [`S3Error::Unreachable`]).
    pub async fn check(&self) -> Result<(), S3Error> {
        self.client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .max_keys(1)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.error("ListObjectsV2", &e))
    }

    /// The object key of an entry line.
    fn entry_key(&self, line: &str) -> Result<String, S3Error> {
        let e = parse_entry(line, PathBuf::new()).map_err(|detail| S3Error::Unreadable {
            location: self.location(),
            key: "(entry to write)".into(),
            detail,
        })?;
        let segment = |s: &str| s.replace('/', "%2F");
        Ok(format!(
            "{}{}/{}/{}/{}.json",
            self.prefix,
            segment(&e.pipeline),
            segment(&e.sink),
            e.at.format("%Y-%m-%d"),
            e.id
        ))
    }

    async fn put(&self, key: &str, body: Vec<u8>, content_type: &str) -> Result<(), S3Error> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body));
        req = match self.sse {
            Sse::Aes256 => req.server_side_encryption(ServerSideEncryption::Aes256),
            Sse::Kms => {
                req.server_side_encryption(ServerSideEncryption::AwsKms).set_ssekms_key_id(self.kms_key_id.clone())
            }
        };
        req.send().await.map(|_| ()).map_err(|e| self.error("PutObject", &e))
    }

    /// Put one entry (a line as the local file holds it). Only after `Ok` is it durable.
    pub async fn put_entry(&self, line: &str) -> Result<(), S3Error> {
        let key = self.entry_key(line)?;
        self.put(&key, line.trim_end().as_bytes().to_vec(), "application/json").await
    }

    /// Every key under `prefix` (ListObjectsV2, paginated).
    async fn keys(&self, prefix: &str) -> Result<Vec<String>, S3Error> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.error("ListObjectsV2", &e))?;
            out.extend(page.contents().iter().filter_map(|o| o.key().map(str::to_string)));
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, S3Error> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.error("GetObject", &e))?;
        let bytes = out.body.collect().await.map_err(|e| S3Error::Unreachable {
            location: self.location(),
            call: "GetObject",
            detail: e.to_string(),
        })?;
        Ok(bytes.into_bytes().to_vec())
    }

    /// Every entry, oldest first; objects that do not parse are reported through `bad`.
    pub async fn entries(&self, mut bad: impl FnMut(&str, String)) -> Result<Vec<StoredDeadLetter>, S3Error> {
        let markers = format!("{}{MARKERS}", self.prefix);
        let keys: Vec<String> = self
            .keys(&self.prefix)
            .await?
            .into_iter()
            .filter(|k| !k.starts_with(&markers) && k.ends_with(".json"))
            .collect();
        let bodies: Vec<(String, Vec<u8>)> = futures::stream::iter(keys)
            .map(|k| async move { self.get(&k).await.map(|b| (k, b)) })
            .buffered(16)
            .try_collect()
            .await?;
        let mut out = Vec::with_capacity(bodies.len());
        for (key, body) in bodies {
            let file = PathBuf::from(format!("s3://{}/{key}", self.bucket));
            match parse_entry(&String::from_utf8_lossy(&body), file) {
                Ok(e) => out.push(e),
                Err(e) => bad(&key, e),
            }
        }
        out.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Ids `dlq replay` delivered.
    pub async fn replayed_ids(&self) -> Result<HashSet<String>, S3Error> {
        let p = format!("{}{MARKERS}replayed/", self.prefix);
        Ok(self.keys(&p).await?.into_iter().filter_map(|k| k.strip_prefix(&p).map(str::to_string)).collect())
    }

    /// Record entries as replayed (one marker object each).
    pub async fn mark_replayed(&self, ids: &[String]) -> Result<(), S3Error> {
        for id in ids {
            self.put(&format!("{}{MARKERS}replayed/{id}", self.prefix), Vec::new(), "text/plain").await?;
        }
        Ok(())
    }

    /// What `dlq discard` recorded, by id.
    pub async fn discarded(&self) -> Result<HashMap<String, Discarded>, S3Error> {
        let p = format!("{}{MARKERS}discarded/", self.prefix);
        let mut out = HashMap::new();
        for key in self.keys(&p).await? {
            let body = self.get(&key).await?;
            let d: Discarded = serde_json::from_slice(&body).map_err(|e| S3Error::Unreadable {
                location: self.location(),
                key: key.clone(),
                detail: e.to_string(),
            })?;
            out.insert(d.id.clone(), d);
        }
        Ok(out)
    }

    /// Record entries as discarded (one marker object each, holding what the entry was).
    pub async fn mark_discarded(&self, entries: &[Discarded]) -> Result<(), S3Error> {
        for d in entries {
            let body = serde_json::to_vec(d).map_err(|e| S3Error::Unreadable {
                location: self.location(),
                key: d.id.clone(),
                detail: e.to_string(),
            })?;
            self.put(&format!("{}{MARKERS}discarded/{}.json", self.prefix, d.id), body, "application/json").await?;
        }
        Ok(())
    }
}
