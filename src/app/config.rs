//! `polysync.toml`: sources, sink targets, state directory, runtime limits, telemetry.
//!
//! Loading is pure (no network, no spawn) so `polysync check` and `run` share it. Unknown
//! fields are refused, `${ENV}` is interpolated before parsing, and every error names the
//! file, line and column. This is the app's view: it knows every component's config; the
//! components know only their own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::units::{self, ByteSize};
use crate::config::{ConfigError, interpolate};
use crate::dlq::DlqConfig;
use crate::sink::{SinkConfig, SinkContext};
use crate::source::SourceConfig;
use crate::telemetry::LogConfig;

/// The daemon's configuration file, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the file was read from (relative paths inside it are relative to its directory).
    pub path: PathBuf,
    /// Directory for the DLQ, checkpoints and other local state.
    pub state_dir: PathBuf,
    /// Directory of pipeline files (`*.toml`).
    pub pipelines_dir: PathBuf,
    /// Lanes, in-flight limit, shutdown deadline.
    pub runtime: RuntimeConfig,
    /// Prometheus and health endpoints.
    pub metrics: MetricsConfig,
    /// Log format and level.
    pub log: LogConfig,
    /// Dead-letter queue.
    pub dlq: DlqConfig,
    /// Live reload.
    pub reload: ReloadConfig,
    /// AWS region, endpoint override, profile.
    pub aws: crate::aws::AwsSettings,
    /// Sources by name.
    pub sources: BTreeMap<String, SourceConfig>,
    /// Sink targets by name.
    pub sinks: BTreeMap<String, SinkConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    pipelines: Option<PathBuf>,
    #[serde(default)]
    runtime: RuntimeConfig,
    #[serde(default)]
    metrics: MetricsConfig,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    dlq: DlqConfig,
    #[serde(default)]
    reload: ReloadConfig,
    #[serde(default)]
    aws: crate::aws::AwsSettings,
    #[serde(default)]
    sources: BTreeMap<String, toml::Spanned<SourceConfig>>,
    #[serde(default)]
    sinks: BTreeMap<String, toml::Spanned<SinkConfig>>,
}

/// Concurrency and flow-control limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Ordered lanes changes are hashed onto by (relation, key).
    pub lanes: usize,
    /// Most changes of one source between read and acknowledgement; bounds memory.
    pub max_in_flight: usize,
    /// Capacity of each lane's queue.
    pub lane_capacity: usize,
    /// How long SIGTERM waits for in-flight changes before giving up on them (they replay).
    #[serde(with = "units::duration")]
    pub shutdown_timeout: Duration,
    /// A sink record that waited this long in memory (the sink is slow or down) moves to the
    /// sink's spool, so the source can go on and confirm.
    #[serde(with = "units::duration")]
    pub spill_after: Duration,
    /// Disk quota of each sink's spool under `state_dir/spool/<sink>` (0: no spool; a slow
    /// sink then slows every sink, as a full lane is backpressure).
    pub spool_max_bytes: ByteSize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            lanes: 4,
            max_in_flight: 65_536,
            lane_capacity: 4_096,
            shutdown_timeout: Duration::from_secs(30),
            spill_after: Duration::from_secs(1),
            spool_max_bytes: ByteSize(1 << 30),
        }
    }
}

/// The HTTP listener for `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve the endpoints at all (default true).
    pub enabled: bool,
    /// Listen address; loopback unless you choose otherwise.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: true, listen: SocketAddr::from(([127, 0, 0, 1], 9464)) }
    }
}

/// Live reload (SIGHUP always works).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Also reload when the config file or a pipeline file changes.
    pub watch: bool,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig { watch: true }
    }
}

impl Config {
    /// Read, interpolate, parse and validate a config file (no network access).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(path, &text, |k| std::env::var(k).ok())
    }

    /// Parse config text as if it were read from `path`.
    pub fn parse(path: &Path, text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let text = interpolate(path, text, env)?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::from_toml(path, &text, &e))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let state_dir = resolve(raw.state_dir.unwrap_or_else(|| PathBuf::from("state")));
        let pipelines_dir = resolve(raw.pipelines.unwrap_or_else(|| PathBuf::from("pipelines")));
        let mut errors = Vec::new();
        if raw.runtime.lanes == 0 || raw.runtime.lanes > 1024 {
            errors.push(ConfigError::Invalid { what: "runtime.lanes".into(), msg: "must be 1..=1024".into() });
        }
        if raw.runtime.max_in_flight < 16 || raw.runtime.max_in_flight > (1 << 24) {
            errors.push(ConfigError::Invalid {
                what: "runtime.max_in_flight".into(),
                msg: "must be 16..=16777216".into(),
            });
        }
        if raw.runtime.lane_capacity == 0 {
            errors.push(ConfigError::Invalid { what: "runtime.lane_capacity".into(), msg: "must be > 0".into() });
        }
        let mut sources = BTreeMap::new();
        for (name, s) in raw.sources {
            let span = s.span();
            let s = s.into_inner();
            check_name(&name, "source")
                .map_err(|m| ConfigError::at(path, &text, span.start, m))
                .unwrap_or_else(|e| errors.push(e));
            if let Err(e) = s.validate(&name) {
                errors.push(ConfigError::at(path, &text, span.start, e.to_string()));
            }
            sources.insert(name, s);
        }
        let mut sinks = BTreeMap::new();
        for (name, s) in raw.sinks {
            let span = s.span();
            let s = s.into_inner();
            check_name(&name, "sink")
                .map_err(|m| ConfigError::at(path, &text, span.start, m))
                .unwrap_or_else(|e| errors.push(e));
            if let Err(e) = s.validate(&name) {
                errors.push(ConfigError::at(path, &text, span.start, e.to_string()));
            }
            sinks.insert(name, s);
        }
        ConfigError::collect(errors)?;
        Ok(Config {
            path: path.to_owned(),
            state_dir,
            pipelines_dir,
            runtime: raw.runtime,
            metrics: raw.metrics,
            log: raw.log,
            dlq: raw.dlq,
            reload: raw.reload,
            aws: raw.aws,
            sources,
            sinks,
        })
    }

    /// Absolute DLQ directory.
    pub fn dlq_dir(&self) -> PathBuf {
        if self.dlq.dir.is_absolute() { self.dlq.dir.clone() } else { self.state_dir.join(&self.dlq.dir) }
    }

    /// What preparing a source needs besides its own config.
    pub fn source_env(&self) -> crate::source::SourceEnv {
        crate::source::SourceEnv {
            aws: self.aws.clone(),
            state_dir: self.state_dir.clone(),
            max_in_flight: self.runtime.max_in_flight,
        }
    }

    /// What building a sink needs besides its own config.
    pub fn sink_context(&self) -> SinkContext {
        SinkContext {
            aws: self.aws.clone(),
            base_dir: self.path.parent().map(Path::to_path_buf).unwrap_or_default(),
            dry_run: false,
        }
    }

    /// What loading the pipelines needs: their directory, the sources and sink targets.
    pub fn pipeline_env(&self) -> crate::pipeline::load::PipelineEnv<'_> {
        crate::pipeline::load::PipelineEnv {
            dir: &self.pipelines_dir,
            sources: self.sources.keys().cloned().collect(),
            sinks: &self.sinks,
        }
    }
}

fn check_name(name: &str, what: &str) -> Result<(), String> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(format!("{what} name {name:?} must be letters, digits, '_' or '-'"));
    }
    Ok(())
}
