//! Warnings at start-up about choices the operator should know they made.

use super::Config;

/// One warning per endpoint configured to talk plaintext to another machine: TLS is the
/// default everywhere, so plaintext must have been chosen, and the log says so at start.
pub fn plaintext_warnings(config: &Config) -> Vec<String> {
    use crate::sink::SinkConfig;
    use crate::source::SourceConfig;
    let mut out = Vec::new();
    for (name, s) in &config.sources {
        if let SourceConfig::Postgres(pg) = s
            && let Ok(info) = pg.validate(name)
            && !info.tls.requires_tls()
            && !crate::tls::is_loopback(&info.host)
        {
            out.push(format!(
                "source {name}: sslmode={} allows a plaintext connection to {} (set sslmode = \"verify-full\" with sslrootcert)",
                info.tls.as_str(),
                info.host
            ));
        }
    }
    let mut check = |what: String, url: &str, plain: &str, secure: &str| {
        if url.starts_with(plain)
            && let Some(h) = crate::tls::url_host(url)
            && !crate::tls::is_loopback(&h)
        {
            out.push(format!("{what}: {plain}//{h} is plaintext; use {secure}// for a remote endpoint"));
        }
    };
    for (name, s) in &config.sinks {
        match s {
            SinkConfig::Cache(c) => check(format!("sink {name}"), c.url.expose(), "redis:", "rediss:"),
            SinkConfig::Search(c) => {
                if let Some(u) = &c.url {
                    check(format!("sink {name}"), u, "http:", "https:")
                }
            }
            SinkConfig::Graph(c) => check(format!("sink {name}"), &c.url, "ws:", "wss:"),
            SinkConfig::Timeseries(c) => {
                if let Some(u) = &c.url {
                    check(format!("sink {name}"), u, "http:", "https:")
                }
            }
            SinkConfig::Noop(_) => {}
        }
    }
    if let Some(u) = &config.dlq.redis_url {
        check("dlq.redis_url".into(), u.expose(), "redis:", "rediss:");
    }
    out
}

/// One warning per graph sink whose request timeout exceeds the fencing margin of a DynamoDB
/// source with a lease table (1/5 of `lease_duration`, see [`crate::checkpoint::fence`]): a
/// graph write still on the wire when an instance's lease lapses could land after the new
/// owner's, and graph writes are not version-guarded (cache, search and Timestream writes are).
pub fn lease_margin_warnings(config: &Config) -> Vec<String> {
    use crate::sink::SinkConfig;
    use crate::source::SourceConfig;
    use crate::source::dynamodb::config::CheckpointConfig;
    let mut out = Vec::new();
    for (source, s) in &config.sources {
        let SourceConfig::Dynamodb(d) = s else { continue };
        let CheckpointConfig::Dynamodb { lease_duration, .. } = &d.checkpoint else { continue };
        let lease = lease_duration.unwrap_or(std::time::Duration::from_secs(30));
        let (valid, whole) = crate::checkpoint::fence::VALID_SHARE;
        let margin = lease * (whole - valid) / whole;
        for (sink, c) in &config.sinks {
            let SinkConfig::Graph(g) = c else { continue };
            let timeout = g.timeout.unwrap_or(std::time::Duration::from_secs(30));
            if timeout > margin {
                out.push(format!(
                    "sink {sink}: timeout {} exceeds 1/5 of source {source}'s lease_duration ({}): a graph write still in flight when this instance's lease lapses could land after the new owner's; set the sink's timeout to at most {} or lease_duration to at least {}",
                    humantime::format_duration(timeout),
                    humantime::format_duration(lease),
                    humantime::format_duration(margin),
                    humantime::format_duration(timeout * 5),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::TlsMode;

    #[test]
    fn remote_plaintext_is_named_and_loopback_is_not() {
        let text = r#"
state_dir = "s"
pipelines = "p"
[sources.remote]
kind = "postgres"
url = "postgres://u:${PW}@db.internal:5432/shop?sslmode=disable"
slot = "s"
publication = "p"
[sources.local]
kind = "postgres"
url = "postgres://u@127.0.0.1/shop"
slot = "s"
publication = "p"
[sinks.cache]
kind = "cache"
url = "redis://cache.internal:6379"
[sinks.local]
kind = "cache"
url = "redis://127.0.0.1:6379"
[sinks.graph]
kind = "graph"
url = "wss://neptune.internal:8182/gremlin"
"#;
        let cfg = Config::parse(std::path::Path::new("/x/p.toml"), text, |_| Some("hunter2".into())).unwrap();
        let w = plaintext_warnings(&cfg);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("source remote") && w[0].contains("db.internal"));
        assert!(w[1].contains("sink cache") && w[1].contains("rediss:"));
        assert!(!w.iter().any(|l| l.contains("hunter2")), "warnings never carry secrets");
        // Remote without sslmode: encryption is required by default.
        let remote = match &cfg.sources["remote"] {
            crate::source::SourceConfig::Postgres(p) => p.clone(),
            _ => unreachable!(),
        };
        let mut p = remote.clone();
        p.url = Some(crate::config::Secret::new("postgres://u@db.internal/shop".to_string()));
        assert_eq!(p.validate("r").unwrap().tls, TlsMode::Require);
        p.sslrootcert = Some("/etc/ca.pem".into());
        assert_eq!(p.validate("r").unwrap().tls, TlsMode::VerifyFull);
    }

    #[test]
    fn a_graph_timeout_beyond_the_lease_margin_is_named() {
        let text = |lease: &str, timeout: &str| {
            format!(
                r#"
state_dir = "s"
pipelines = "p"
[sources.ddb]
kind = "dynamodb"
table = "t"
[sources.ddb.checkpoint]
store = "dynamodb"
table = "leases"
{lease}
[sinks.graph]
kind = "graph"
url = "ws://127.0.0.1:8182/gremlin"
{timeout}
[sinks.cache]
kind = "cache"
url = "redis://127.0.0.1:6379"
"#
            )
        };
        let warn = |lease: &str, timeout: &str| {
            let cfg = Config::parse(std::path::Path::new("/x/p.toml"), &text(lease, timeout), |_| None).unwrap();
            lease_margin_warnings(&cfg)
        };
        let w = warn("", "");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("sink graph") && w[0].contains("source ddb") && w[0].contains("at most 6s"), "{w:?}");
        assert!(warn("", "timeout = \"5s\"").is_empty());
        assert!(warn("lease_duration = \"150s\"", "").is_empty());
    }
}
