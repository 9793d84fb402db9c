//! Arbitrary text as a config file and as a pipeline file: a precise error, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

const BASE: &str = r#"
state_dir = "s"
pipelines = "p"
[sources.db]
kind = "postgres"
url = "postgres://u@127.0.0.1/db"
slot = "s"
publication = "p"
[sinks.cache]
kind = "cache"
url = "redis://127.0.0.1:6379"
[sinks.search]
kind = "search"
url = "http://127.0.0.1:9200"
[sinks.metrics]
kind = "timeseries"
engine = "influxdb"
url = "http://127.0.0.1:8086"
database = "d"
"#;

fuzz_target!(|text: &str| {
    let path = Path::new("/fuzz/polysync.toml");
    let _ = polysync::app::Config::parse(path, text, |v| (v.len() < 8).then(|| "x".to_string()));
    if let Ok(cfg) = polysync::app::Config::parse(path, BASE, |_| None) {
        let _ = polysync::pipeline::load::compile(Path::new("/fuzz/p/f.toml"), text, &cfg);
    }
});
