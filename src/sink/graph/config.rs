//! `[sinks.<name>]` with `kind = "graph"`: Amazon Neptune or any Gremlin Server.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, Secret, duration_opt};
use crate::tls::TlsMode;

/// How upserts are written.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compat {
    /// `mergeV` / `mergeE` (TinkerPop 3.6+, Neptune engine 1.2.1+).
    #[default]
    Merge,
    /// `fold().coalesce(unfold(), addV/addE)` for older engines.
    Coalesce,
}

/// How the connection authenticates.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GraphAuth {
    /// None.
    None,
    /// Gremlin Server SASL PLAIN.
    Basic,
    /// Neptune IAM: SigV4-signed WebSocket handshake (`neptune-db`).
    Iam,
}

/// Settings of one graph target.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GraphSinkConfig {
    /// `ws://host:8182/gremlin` or `wss://…neptune.amazonaws.com:8182/gremlin`.
    pub url: String,
    /// Upsert style.
    #[serde(default)]
    pub compat: Compat,
    /// `none`, `basic` or `iam` (default: basic when a username is set).
    #[serde(default)]
    pub auth: Option<GraphAuth>,
    /// SASL user.
    #[serde(default)]
    pub username: Option<String>,
    /// SASL password; use `${ENV}`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Region for IAM signing (default: AWS config).
    #[serde(default)]
    pub region: Option<String>,
    /// Certificate checking for wss (default verify-full).
    #[serde(default)]
    pub tls: Option<TlsMode>,
    /// CA bundle for wss.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Changes per request (default 100; Neptune suggests tens to a few hundred).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Wait this long for a batch to fill (default 5 ms).
    #[serde(default, with = "duration_opt")]
    pub linger: Option<Duration>,
    /// Per-request timeout (default 30 s).
    #[serde(default, with = "duration_opt")]
    pub timeout: Option<Duration>,
}

impl GraphSinkConfig {
    /// Pure validation.
    pub fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let bad = |msg: String| ConfigError::Invalid { what: format!("sink {name:?}"), msg };
        let u = url::Url::parse(&self.url).map_err(|e| bad(format!("url: {e}")))?;
        if u.scheme() != "ws" && u.scheme() != "wss" {
            return Err(bad(format!("url scheme {}:// is not ws:// or wss://", u.scheme())));
        }
        if self.auth() == GraphAuth::Basic && (self.username.is_none() || self.password.is_none()) {
            return Err(bad("auth = \"basic\" needs username and password".into()));
        }
        if self.batch_size == Some(0) {
            return Err(bad("batch_size must be > 0".into()));
        }
        Ok(())
    }

    /// Effective auth.
    pub fn auth(&self) -> GraphAuth {
        self.auth.unwrap_or(if self.username.is_some() { GraphAuth::Basic } else { GraphAuth::None })
    }
}
