//! `[sinks.<name>]` with `kind = "timeseries"`: Timestream for LiveAnalytics, or Timestream for
//! InfluxDB (any InfluxDB 1.x `/write` or 2.x `/api/v2/write` endpoint).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ByteSize, ConfigError, Secret, duration_opt};
use crate::tls::TlsMode;

/// Which service.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Timestream for LiveAnalytics (`WriteRecords`).
    Timestream,
    /// InfluxDB line protocol over HTTP (Timestream for InfluxDB).
    Influxdb,
}

/// InfluxDB write API.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum InfluxApi {
    /// `/write?db=&rp=&precision=` (1.x; basic or no auth).
    #[serde(rename = "v1")]
    V1,
    /// `/api/v2/write?org=&bucket=&precision=` with `Authorization: Token …`.
    #[serde(rename = "v2")]
    V2,
}

/// Settings of one time-series target.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TimeseriesSinkConfig {
    /// `timestream` or `influxdb`.
    pub engine: Engine,
    /// Timestream database, or InfluxDB 1.x database.
    #[serde(default)]
    pub database: Option<String>,
    /// Timestream table used when a point names none.
    #[serde(default)]
    pub table: Option<String>,
    /// InfluxDB URL (`http://host:8086`, `https://….timestream-influxdb.amazonaws.com:8086`).
    #[serde(default)]
    pub url: Option<String>,
    /// `v1` or `v2` (default v1 when `database` is set, v2 when `bucket` is).
    #[serde(default)]
    pub api: Option<InfluxApi>,
    /// InfluxDB 1.x retention policy.
    #[serde(default)]
    pub retention_policy: Option<String>,
    /// InfluxDB 2.x organisation.
    #[serde(default)]
    pub org: Option<String>,
    /// InfluxDB 2.x bucket.
    #[serde(default)]
    pub bucket: Option<String>,
    /// InfluxDB 2.x API token; use `${ENV}`.
    #[serde(default)]
    pub token: Option<Secret>,
    /// InfluxDB 1.x basic-auth user.
    #[serde(default)]
    pub username: Option<String>,
    /// InfluxDB 1.x basic-auth password.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Create the database (InfluxDB 1.x, or Timestream) at start if missing.
    #[serde(default)]
    pub create_database: bool,
    /// Timestream: create the sink's `table` at start if missing (default retention).
    #[serde(default)]
    pub create_table: bool,
    /// Certificate checking for https (default verify-full).
    #[serde(default)]
    pub tls: Option<TlsMode>,
    /// CA bundle for https.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Points per request (default 5000 for InfluxDB; Timestream calls carry at most 100).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Most bytes per InfluxDB request (default 4 MiB).
    #[serde(default)]
    pub batch_bytes: Option<ByteSize>,
    /// Wait this long for a batch to fill (default 20 ms).
    #[serde(default, with = "duration_opt")]
    pub linger: Option<Duration>,
    /// Request timeout (default 30 s).
    #[serde(default, with = "duration_opt")]
    pub timeout: Option<Duration>,
}

impl TimeseriesSinkConfig {
    /// Pure validation.
    pub fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let bad = |msg: String| ConfigError::Invalid { what: format!("sink {name:?}"), msg };
        match self.engine {
            Engine::Timestream => {
                if self.database.is_none() {
                    return Err(bad("engine = \"timestream\" needs database".into()));
                }
                if self.url.is_some() || self.bucket.is_some() || self.token.is_some() {
                    return Err(bad("url, bucket and token are InfluxDB settings".into()));
                }
                if self.create_table && self.table.is_none() {
                    return Err(bad("create_table = true needs table (the table to create)".into()));
                }
            }
            Engine::Influxdb => {
                if self.create_table {
                    return Err(bad("create_table is a Timestream setting (InfluxDB has no tables)".into()));
                }
                let url = self.url.as_deref().ok_or_else(|| bad("engine = \"influxdb\" needs url".into()))?;
                let u = url::Url::parse(url).map_err(|e| bad(format!("url: {e}")))?;
                if u.scheme() != "http" && u.scheme() != "https" {
                    return Err(bad(format!("url scheme {}:// is not http:// or https://", u.scheme())));
                }
                match self.api() {
                    InfluxApi::V1 if self.database.is_none() => {
                        return Err(bad("api = \"v1\" needs database".into()));
                    }
                    InfluxApi::V2 if self.bucket.is_none() || self.org.is_none() => {
                        return Err(bad("api = \"v2\" needs org and bucket (and usually token)".into()));
                    }
                    _ => {}
                }
            }
        }
        if self.batch_size == Some(0) {
            return Err(bad("batch_size must be > 0".into()));
        }
        Ok(())
    }

    /// Effective InfluxDB API.
    pub fn api(&self) -> InfluxApi {
        self.api.unwrap_or(if self.bucket.is_some() { InfluxApi::V2 } else { InfluxApi::V1 })
    }
}
