//! `[sinks.<name>]` with `kind = "cache"`: a Redis OSS / Valkey / ElastiCache endpoint.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, Secret, duration_opt};
use crate::tls::TlsMode;

/// Settings of one cache target.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheSinkConfig {
    /// `redis://host:port[/db]`, `rediss://` for TLS, `redis-cluster://host:port?node=…` (or
    /// `rediss-cluster://`) for cluster mode (ElastiCache cluster mode enabled).
    pub url: Secret,
    /// ACL user (ElastiCache RBAC); overrides the URL's.
    #[serde(default)]
    pub username: Option<String>,
    /// Password / AUTH token; overrides the URL's. Use `${ENV}`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Certificate checking for `rediss://` (default `verify-full`).
    #[serde(default)]
    pub tls: Option<TlsMode>,
    /// CA bundle for TLS verification (default: Mozilla roots).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Connections in the client pool (default 2).
    #[serde(default)]
    pub connections: Option<usize>,
    /// Most records per pipelined request (default 512).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Wait this long for a batch to fill (default 0: send what is queued).
    #[serde(default, with = "duration_opt")]
    pub linger: Option<Duration>,
    /// Per-request timeout (default 5 s).
    #[serde(default, with = "duration_opt")]
    pub timeout: Option<Duration>,
    /// Delete keys with UNLINK (non-blocking on the server) rather than DEL (default true).
    #[serde(default)]
    pub unlink: Option<bool>,
    /// How long a deleted key's version is remembered so an older replay cannot resurrect it
    /// (`set` action; default 24h).
    #[serde(default, with = "duration_opt")]
    pub tombstone_ttl: Option<Duration>,
}

impl CacheSinkConfig {
    /// Pure validation.
    pub fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let bad = |msg: String| ConfigError::Invalid { what: format!("sink {name:?}"), msg };
        let u = url::Url::parse(self.url.expose()).map_err(|e| bad(format!("url: {e}")))?;
        match u.scheme() {
            "redis" | "rediss" | "redis-cluster" | "rediss-cluster" | "valkey" | "valkeys" | "valkey-cluster"
            | "valkeys-cluster" => {}
            s => {
                return Err(bad(format!(
                    "url scheme {s}:// is not redis://, rediss://, redis-cluster:// or rediss-cluster://"
                )));
            }
        }
        if self.batch_size == Some(0) || self.connections == Some(0) {
            return Err(bad("batch_size and connections must be > 0".into()));
        }
        Ok(())
    }

    /// True when the URL asks for TLS.
    pub fn uses_tls(&self) -> bool {
        self.url.expose().starts_with("rediss") || self.url.expose().starts_with("valkeys")
    }

    /// True for cluster mode.
    pub fn is_cluster(&self) -> bool {
        self.url.expose().contains("-cluster://")
    }

    /// Tombstone lifetime.
    pub fn tombstone_ttl(&self) -> Duration {
        self.tombstone_ttl.unwrap_or(Duration::from_secs(24 * 3600))
    }
}
