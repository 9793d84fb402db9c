//! `[sources.<name>]` with `kind = "postgres"`: where the database is, which slot and
//! publication to use, and how hard to check the server's identity.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, Secret, duration_opt};
use crate::tls::TlsMode;

/// Settings of one PostgreSQL / Aurora PostgreSQL source.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresSourceConfig {
    /// libpq-style URI (`postgres://user:pass@host:port/db?sslmode=verify-full`). Fields below
    /// override its parts.
    #[serde(default)]
    pub url: Option<Secret>,
    /// Host name or address.
    #[serde(default)]
    pub host: Option<String>,
    /// TCP port (default 5432).
    #[serde(default)]
    pub port: Option<u16>,
    /// Login role; needs REPLICATION (or rds_replication) and SELECT on published tables.
    #[serde(default)]
    pub user: Option<String>,
    /// Password; use `${ENV_VAR}` so it never sits in the file.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Database whose changes are streamed.
    #[serde(default)]
    pub dbname: Option<String>,
    /// libpq sslmode (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`).
    #[serde(default)]
    pub sslmode: Option<String>,
    /// CA bundle for `verify-ca`/`verify-full` (for RDS/Aurora: AWS's global-bundle.pem).
    #[serde(default)]
    pub sslrootcert: Option<PathBuf>,
    /// Logical replication slot (the checkpoint: its confirmed_flush_lsn).
    pub slot: String,
    /// Publication naming the streamed tables.
    pub publication: String,
    /// Create the publication/slot (and add missing tables) instead of refusing to start.
    #[serde(default)]
    pub create_if_missing: bool,
    /// Tables the publication must contain; default: every relation this source's pipelines match.
    #[serde(default)]
    pub tables: Vec<String>,
    /// How often to write a heartbeat into the WAL so an idle database's slot still advances.
    #[serde(default, with = "duration_opt")]
    pub heartbeat_interval: Option<Duration>,
    /// How often the confirmed position is reported to the server.
    #[serde(default, with = "duration_opt")]
    pub status_interval: Option<Duration>,
    /// Longest pause between reconnect attempts.
    #[serde(default, with = "duration_opt")]
    pub reconnect_max_delay: Option<Duration>,
    /// Connect timeout per attempt.
    #[serde(default, with = "duration_opt")]
    pub connect_timeout: Option<Duration>,
    /// Table the daemon watches for on-demand snapshot requests (`polysync snapshot` inserts
    /// into it; so can any SQL client). Default `public.polysync_signal`; `""` turns it off.
    #[serde(default)]
    pub signal_table: Option<String>,
    /// Snapshot and backfill settings.
    #[serde(default)]
    pub snapshot: SnapshotSettings,
    /// Ceiling on the slot's lag (server WAL position − confirmed position): past it, an alert
    /// metric and an error line, and `on_slot_lag_limit` decides what else happens.
    #[serde(default)]
    pub slot_lag_limit: Option<crate::config::ByteSize>,
    /// `alert` (default: keep going, say so) or `drop_slot` (free the server's disk: drop the
    /// slot and stop this source; the next start finds the slot lost and `on_slot_lost`
    /// decides).
    #[serde(default)]
    pub on_slot_lag_limit: OnSlotLagLimit,
    /// What a start does when the slot polysync streamed from is gone, was moved by someone
    /// else, or belongs to another database system: `stop` (default; refuse to start, saying
    /// what happened) or `resnapshot` (a new slot, then every table of every pipeline re-read).
    #[serde(default)]
    pub on_slot_lost: OnSlotLost,
    /// What a column added, dropped, renamed or retyped mid-stream makes the source do:
    /// `resnapshot` (default; re-read the table through every pipeline that reads it, so the
    /// copies PostgreSQL sends no change for get the new shape) or `warn` (say so and go on).
    #[serde(default)]
    pub on_column_change: OnColumnChange,
}

/// What a table's column change (ALTER TABLE mid-stream) makes the source do.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnColumnChange {
    /// Re-read the table through its pipelines (watermark snapshots, live changes go on).
    #[default]
    Resnapshot,
    /// Log and count it; existing copies keep their old shape until `polysync snapshot`.
    Warn,
}

/// What a lost slot (changes the sinks never got) makes the source do.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnSlotLost {
    /// Refuse to start until a person decides: the gap is never skipped silently.
    #[default]
    Stop,
    /// Stream from a new slot and re-read every table of every pipeline of the source (the
    /// tables are cleared in the sinks first, so rows deleted in the gap go too).
    Resnapshot,
}

/// What crossing `slot_lag_limit` does besides the alert.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnSlotLagLimit {
    /// Keep streaming; the metric and the log say the slot is pinning WAL.
    #[default]
    Alert,
    /// Drop the slot so the server can free its WAL, and stop this source.
    DropSlot,
}

/// `[sources.<name>.snapshot]`: how hard snapshots may read the database.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSettings {
    /// Rows per chunk (default 2048): the unit of progress and of memory (chunk rows are held
    /// until the high watermark passes).
    #[serde(default)]
    pub chunk_size: Option<usize>,
    /// Tables read at once (default 2).
    #[serde(default)]
    pub parallelism: Option<usize>,
    /// Rows per second across the source's snapshots (default unlimited).
    #[serde(default)]
    pub max_rows_per_second: Option<u64>,
    /// Chunks of one table read ahead while earlier ones are applied (default 2).
    #[serde(default)]
    pub chunks_in_flight: Option<usize>,
}

impl SnapshotSettings {
    /// Effective chunk size.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size.unwrap_or(2048).clamp(1, 1_000_000)
    }
    /// Effective parallelism.
    pub fn parallelism(&self) -> usize {
        self.parallelism.unwrap_or(2).clamp(1, 64)
    }
    /// Effective chunks in flight per table.
    pub fn chunks_in_flight(&self) -> usize {
        self.chunks_in_flight.unwrap_or(2).clamp(1, 64)
    }
}

/// Session settings of every connection, replication and SQL alike, so a value has one text
/// form whether the stream or a snapshot read it (`types.rs` parses exactly these forms).
pub const SESSION_OPTIONS: &str = "-c datestyle=ISO -c timezone=UTC -c extra_float_digits=3 -c bytea_output=hex -c intervalstyle=postgres -c lc_monetary=C";

/// Everything needed to open a connection, resolved from the URL and the explicit fields.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Host name (also the TLS server name).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role.
    pub user: String,
    /// Password, if any.
    pub password: Option<Secret>,
    /// Database.
    pub dbname: String,
    /// TLS mode.
    pub tls: TlsMode,
    /// CA file for verification.
    pub ca_file: Option<PathBuf>,
    /// Connect timeout.
    pub connect_timeout: Duration,
}

impl ConnInfo {
    /// `host:port/db` for messages; never contains the password.
    pub fn endpoint(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.dbname)
    }

    /// A tokio-postgres config for the normal (non-replication) connection.
    pub fn tokio_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("polysync")
            .connect_timeout(self.connect_timeout)
            .ssl_mode(match self.tls {
                TlsMode::Disable => tokio_postgres::config::SslMode::Disable,
                TlsMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            });
        if let Some(p) = &self.password {
            c.password(p.expose());
        }
        c.options(SESSION_OPTIONS);
        c
    }
}

impl PostgresSourceConfig {
    /// The signal table (`schema.table`), unless turned off.
    pub fn signal_table(&self) -> Option<String> {
        match self.signal_table.as_deref() {
            None => Some("public.polysync_signal".into()),
            Some("") => None,
            Some(t) if t.contains('.') => Some(t.to_string()),
            Some(t) => Some(format!("public.{t}")),
        }
    }

    /// Heartbeat interval (default 10 s).
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval.unwrap_or(Duration::from_secs(10))
    }

    /// Status-report interval (default 1 s).
    pub fn status_interval(&self) -> Duration {
        self.status_interval.unwrap_or(Duration::from_secs(1))
    }

    /// Reconnect back-off ceiling (default 30 s).
    pub fn reconnect_max_delay(&self) -> Duration {
        self.reconnect_max_delay.unwrap_or(Duration::from_secs(30))
    }

    /// Pure validation (no network): names, URL, TLS words.
    pub fn validate(&self, source: &str) -> Result<ConnInfo, ConfigError> {
        let bad = |msg: String| ConfigError::Invalid { what: format!("source {source:?}"), msg };
        for (what, name) in [("slot", &self.slot), ("publication", &self.publication)] {
            if name.is_empty()
                || name.len() > 63
                || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(bad(format!(
                    "{what} name {name:?} must be 1-63 characters of a-z, 0-9 and _ (PostgreSQL slot rules)"
                )));
            }
        }
        let mut info = ConnInfo {
            host: "localhost".into(),
            port: 5432,
            user: "postgres".into(),
            password: None,
            dbname: String::new(),
            tls: TlsMode::Prefer,
            ca_file: None,
            connect_timeout: self.connect_timeout.unwrap_or(Duration::from_secs(10)),
        };
        let mut explicit_tls = false;
        if let Some(url) = &self.url {
            let u = url::Url::parse(url.expose()).map_err(|e| bad(format!("url: {e}")))?;
            if u.scheme() != "postgres" && u.scheme() != "postgresql" {
                return Err(bad(format!("url scheme must be postgres://, not {}://", u.scheme())));
            }
            if let Some(h) = u.host_str() {
                info.host = h.trim_start_matches('[').trim_end_matches(']').to_string();
            }
            if let Some(p) = u.port() {
                info.port = p;
            }
            if !u.username().is_empty() {
                info.user = pct_decode(u.username());
            }
            if let Some(p) = u.password() {
                info.password = Some(Secret::new(pct_decode(p)));
            }
            let db = u.path().trim_start_matches('/');
            if !db.is_empty() {
                info.dbname = pct_decode(db);
            }
            for (k, v) in u.query_pairs() {
                match &*k {
                    "sslmode" => {
                        info.tls = TlsMode::parse(&v).ok_or_else(|| bad(format!("url: unknown sslmode {v:?}")))?;
                        explicit_tls = true;
                    }
                    "sslrootcert" => info.ca_file = Some(PathBuf::from(&*v)),
                    "connect_timeout" => {
                        info.connect_timeout = Duration::from_secs(
                            v.parse().map_err(|_| bad(format!("url: connect_timeout {v:?} is not seconds")))?,
                        )
                    }
                    "application_name" => {}
                    other => return Err(bad(format!("url: unsupported parameter {other:?}"))),
                }
            }
        }
        if let Some(h) = &self.host {
            info.host = h.clone();
        }
        if let Some(p) = self.port {
            info.port = p;
        }
        if let Some(u) = &self.user {
            info.user = u.clone();
        }
        if let Some(p) = &self.password {
            info.password = Some(p.clone());
        }
        if let Some(d) = &self.dbname {
            info.dbname = d.clone();
        }
        if let Some(m) = &self.sslmode {
            info.tls = TlsMode::parse(m).ok_or_else(|| {
                bad(format!("sslmode {m:?} is not one of disable, prefer, require, verify-ca, verify-full"))
            })?;
        }
        if let Some(ca) = &self.sslrootcert {
            info.ca_file = Some(ca.clone());
        }
        // Secure by default: a CA means verify-full, otherwise encryption is required, except
        // on loopback (a local server rarely has a certificate). Plaintext is an explicit choice.
        if self.sslmode.is_none() && !explicit_tls {
            info.tls = if info.ca_file.is_some() {
                TlsMode::VerifyFull
            } else if crate::tls::is_loopback(&info.host) {
                TlsMode::Prefer
            } else {
                TlsMode::Require
            };
        }
        if info.dbname.is_empty() {
            info.dbname = info.user.clone();
        }
        for t in &self.tables {
            if !t.contains('.') {
                return Err(bad(format!("table {t:?} must be schema-qualified (e.g. public.{t})")));
            }
        }
        Ok(info)
    }
}

fn pct_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}
