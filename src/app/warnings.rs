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
}
