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
    /// Several servers (`"host"` or `"host:port"`), tried in order at every connect: polysync
    /// uses the first that is the writer (not in recovery), as libpq's
    /// `target_session_attrs=read-write` does, so after a failover it finds the promoted
    /// standby. Instead of `host`/`port` (and the URL's host).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Decode from this read replica instead of the writer (PostgreSQL 16+): the slot lives on
    /// the standby, so decoding's CPU and I/O stay off the writer. Set-up, heartbeats and
    /// snapshot watermarks still go to the writer (they must be written, and they reach the
    /// standby through its WAL). User, password and database default to the source's.
    #[serde(default)]
    pub standby_url: Option<Secret>,
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
    /// Take the slot over from another polysync config whose pipelines this one does not all
    /// run (refused by default: this config would confirm changes those pipelines never saw).
    #[serde(default)]
    pub take_over_slot: bool,
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

/// Which server a connection may end up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The writer only: a server in recovery (a standby, or the old writer an Aurora cluster
    /// endpoint still points at) is passed over, as with `target_session_attrs=read-write`.
    Writer,
    /// Whatever answers (standby decoding connects to a standby on purpose).
    Any,
}

/// Everything needed to open a connection, resolved from the URL and the explicit fields.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Host name (also the TLS server name): the first of `hosts`.
    pub host: String,
    /// TCP port of `host`.
    pub port: u16,
    /// Every candidate server in the order tried (at least `host:port`).
    pub hosts: Vec<(String, u16)>,
    /// Which of them a connection accepts.
    pub target: Target,
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
    /// `host:port/db` for messages (every candidate, comma-separated); never contains the
    /// password.
    pub fn endpoint(&self) -> String {
        let hosts: Vec<String> = self.hosts.iter().map(|(h, p)| format!("{h}:{p}")).collect();
        format!("{}/{}", hosts.join(","), self.dbname)
    }

    /// One connection description per candidate server, in order.
    pub fn candidates(&self) -> Vec<ConnInfo> {
        self.hosts
            .iter()
            .map(|(h, p)| ConnInfo { host: h.clone(), port: *p, hosts: vec![(h.clone(), *p)], ..self.clone() })
            .collect()
    }

    /// A tokio-postgres config for the normal (non-replication) connection.
    pub fn tokio_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        for (h, p) in &self.hosts {
            c.host(h).port(*p);
        }
        c.target_session_attrs(match self.target {
            Target::Writer => tokio_postgres::config::TargetSessionAttrs::ReadWrite,
            Target::Any => tokio_postgres::config::TargetSessionAttrs::Any,
        });
        c.user(&self.user)
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

    /// Where the slot lives and the stream decodes: the standby of `standby_url`, with the
    /// writer's user, password and database where the URL names none; `None` without one.
    pub fn standby_info(&self, source: &str, writer: &ConnInfo) -> Result<Option<ConnInfo>, ConfigError> {
        let Some(url) = &self.standby_url else { return Ok(None) };
        let bad = |msg: String| ConfigError::Invalid { what: format!("source {source:?}"), msg };
        let parsed = url::Url::parse(url.expose()).map_err(|e| bad(format!("standby_url: {e}")))?;
        let alone = PostgresSourceConfig {
            url: Some(url.clone()),
            host: None,
            port: None,
            hosts: Vec::new(),
            user: None,
            password: None,
            dbname: None,
            standby_url: None,
            ..self.clone()
        };
        let mut info = alone.validate(source).map_err(|e| bad(format!("standby_url: {e}")))?;
        if parsed.username().is_empty() {
            info.user = writer.user.clone();
        }
        if parsed.password().is_none() {
            info.password = writer.password.clone();
        }
        if parsed.path().trim_start_matches('/').is_empty() {
            info.dbname = writer.dbname.clone();
        }
        if info.dbname != writer.dbname {
            return Err(bad(format!(
                "standby_url names database {:?} but the source streams {:?}: a standby has the writer's databases",
                info.dbname, writer.dbname
            )));
        }
        info.target = Target::Any;
        Ok(Some(info))
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
            hosts: Vec::new(),
            target: Target::Writer,
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
        info.hosts = vec![(info.host.clone(), info.port)];
        if !self.hosts.is_empty() {
            if self.host.is_some() || self.port.is_some() {
                return Err(bad("hosts replaces host and port: set one or the other".into()));
            }
            info.hosts =
                self.hosts.iter().map(|h| parse_host_port(h, info.port)).collect::<Result<_, _>>().map_err(bad)?;
            (info.host, info.port) = info.hosts[0].clone();
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
            } else if info.hosts.iter().all(|(h, _)| crate::tls::is_loopback(h)) {
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
        self.standby_info(source, &info)?;
        Ok(info)
    }
}

/// `"host"`, `"host:port"` or `"[v6]:port"` of a `hosts` entry.
fn parse_host_port(entry: &str, default_port: u16) -> Result<(String, u16), String> {
    let bad = || format!("hosts entry {entry:?} is not host or host:port");
    let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(bad()),
        }
    } else {
        match entry.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            _ => (entry, None),
        }
    };
    if host.is_empty() {
        return Err(bad());
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| bad())?,
        None => default_port,
    };
    Ok((host.to_string(), port))
}

fn pct_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> PostgresSourceConfig {
        toml::from_str(&format!("slot = \"s\"\npublication = \"p\"\n{extra}")).unwrap()
    }

    #[test]
    fn hosts_are_tried_in_order_with_default_ports_and_replace_host() {
        let info = cfg("hosts = [\"a\", \"b:6432\", \"[::1]:7000\"]\nuser = \"u\"").validate("db").unwrap();
        assert_eq!(info.hosts, vec![("a".into(), 5432), ("b".into(), 6432), ("::1".into(), 7000)]);
        assert_eq!((info.host.as_str(), info.port), ("a", 5432));
        assert_eq!(info.endpoint(), "a:5432,b:6432,::1:7000/u");
        assert_eq!(info.candidates().len(), 3);
        assert_eq!(info.candidates()[1].endpoint(), "b:6432/u");
        assert_eq!(info.target, Target::Writer);
        assert!(info.tls.requires_tls(), "remote hosts: TLS required by default");
        let both = cfg("hosts = [\"a\"]\nhost = \"b\"").validate("db").unwrap_err().to_string();
        assert!(both.contains("hosts replaces host and port"), "{both}");
        let bad = cfg("hosts = [\"a:x\"]").validate("db").unwrap_err().to_string();
        assert!(bad.contains("\"a:x\" is not host or host:port"), "{bad}");
    }

    #[test]
    fn a_standby_url_inherits_the_login_and_database_and_may_be_any_server() {
        let c = cfg("url = \"postgres://u:pw@writer/app\"\nstandby_url = \"postgres://replica:5433\"");
        let writer = c.validate("db").unwrap();
        let standby = c.standby_info("db", &writer).unwrap().unwrap();
        assert_eq!((standby.host.as_str(), standby.port, standby.user.as_str()), ("replica", 5433, "u"));
        assert_eq!(standby.password.as_ref().map(|p| p.expose().to_string()), Some("pw".into()));
        assert_eq!((standby.dbname.as_str(), standby.target), ("app", Target::Any));
        let other = cfg("url = \"postgres://u@writer/app\"\nstandby_url = \"postgres://replica/other\"");
        let e = other.validate("db").unwrap_err().to_string();
        assert!(e.contains("a standby has the writer's databases"), "{e}");
        assert!(cfg("").standby_info("db", &cfg("").validate("db").unwrap()).unwrap().is_none());
    }
}
