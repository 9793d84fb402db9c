//! `[sinks.<name>]` with `kind = "search"`: an OpenSearch Service domain, an OpenSearch
//! Serverless collection, or any OpenSearch cluster.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ByteSize, ConfigError, Secret, duration_opt};
use crate::tls::TlsMode;

/// How requests authenticate.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SearchAuth {
    /// No authentication (local clusters).
    None,
    /// HTTP basic (fine-grained access control internal users).
    Basic,
    /// AWS SigV4 with the default credential chain (IAM roles, ECS task role, env).
    Sigv4,
}

/// An index polysync creates at start if it is missing.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IndexSetup {
    /// Concrete index name.
    pub name: String,
    /// JSON file with the index body (`settings`, `mappings`), relative to the config file.
    #[serde(default)]
    pub body: Option<PathBuf>,
    /// Alias pointing at the index (created if missing).
    #[serde(default)]
    pub alias: Option<String>,
}

/// An index template polysync installs at start if it is missing.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TemplateSetup {
    /// Template name (`PUT _index_template/<name>`).
    pub name: String,
    /// JSON file with the template body, relative to the config file.
    pub body: PathBuf,
}

/// Settings of one search target.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SearchSinkConfig {
    /// Endpoint URL (`https://search-x.eu-west-1.es.amazonaws.com`). Either this or `domain`.
    #[serde(default)]
    pub url: Option<String>,
    /// OpenSearch Service domain name, resolved to its endpoint with DescribeDomain.
    #[serde(default)]
    pub domain: Option<String>,
    /// `none`, `basic` or `sigv4` (default: basic when a username is set, else none).
    #[serde(default)]
    pub auth: Option<SearchAuth>,
    /// Basic-auth user.
    #[serde(default)]
    pub username: Option<String>,
    /// Basic-auth password; use `${ENV}`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// SigV4 service: `es` (OpenSearch Service) or `aoss` (Serverless).
    #[serde(default)]
    pub service: Option<String>,
    /// SigV4 region (default: the AWS config/environment region).
    #[serde(default)]
    pub region: Option<String>,
    /// Certificate checking for https (default `verify-full`).
    #[serde(default)]
    pub tls: Option<TlsMode>,
    /// CA bundle for https verification.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Most documents per `_bulk` request (default 500).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Most bytes per `_bulk` request (default 5 MiB); a larger batch is split.
    #[serde(default)]
    pub batch_bytes: Option<ByteSize>,
    /// Largest single document; larger ones are dead-lettered (default 10 MiB).
    #[serde(default)]
    pub max_document_bytes: Option<ByteSize>,
    /// Wait this long for a batch to fill (default 5 ms).
    #[serde(default, with = "duration_opt")]
    pub linger: Option<Duration>,
    /// Request timeout (default 30 s).
    #[serde(default, with = "duration_opt")]
    pub timeout: Option<Duration>,
    /// Make writes visible to search before acknowledging (`refresh=wait_for`; slower).
    #[serde(default)]
    pub refresh_wait: bool,
    /// Indices to create if missing.
    #[serde(default)]
    pub indices: Vec<IndexSetup>,
    /// Index templates to install if missing.
    #[serde(default)]
    pub templates: Vec<TemplateSetup>,
}

impl SearchSinkConfig {
    /// Pure validation.
    pub fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let bad = |msg: String| ConfigError::Invalid { what: format!("sink {name:?}"), msg };
        match (&self.url, &self.domain) {
            (Some(_), Some(_)) => return Err(bad("set url or domain, not both".into())),
            (None, None) => {
                return Err(bad("set url = \"https://…\" or domain = \"<OpenSearch Service domain>\"".into()));
            }
            (Some(u), None) => {
                let parsed = url::Url::parse(u).map_err(|e| bad(format!("url: {e}")))?;
                if parsed.scheme() != "http" && parsed.scheme() != "https" {
                    return Err(bad(format!("url scheme {}:// is not http:// or https://", parsed.scheme())));
                }
                if parsed.password().is_some() {
                    return Err(bad("put credentials in username/password (${ENV}), not in the url".into()));
                }
            }
            (None, Some(_)) => {}
        }
        if let Some(s) = &self.service
            && s != "es"
            && s != "aoss"
        {
            return Err(bad(format!("service {s:?} is not \"es\" or \"aoss\"")));
        }
        if self.auth() == SearchAuth::Basic && (self.username.is_none() || self.password.is_none()) {
            return Err(bad("auth = \"basic\" needs username and password".into()));
        }
        if self.batch_size == Some(0) {
            return Err(bad("batch_size must be > 0".into()));
        }
        Ok(())
    }

    /// Effective auth mode.
    pub fn auth(&self) -> SearchAuth {
        self.auth.unwrap_or(if self.username.is_some() { SearchAuth::Basic } else { SearchAuth::None })
    }
}
