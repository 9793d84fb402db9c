//! Sink baselines: `bench/loaders/sinks.py` puts the fan-out scenario's records into each
//! sink's server with that server's most used Python client (redis-py, a plain `_bulk` loader,
//! gremlinpython, line-protocol POSTs), so each sink's rate alone can be set against what a
//! straightforward loader gets from the same server on the same machine in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One loader run.
pub struct Baseline {
    /// Records written.
    pub records: f64,
    /// Wall time of the writes.
    pub seconds: f64,
}

/// The bench's Python (`.local/bench-venv`, which `bench/run.sh` builds from
/// `bench/loaders/requirements.txt`).
pub fn python(root: &Path) -> Option<PathBuf> {
    let p = root.join(".local/bench-venv/bin/python");
    p.exists().then_some(p)
}

/// Run the `sink` loader on the records of an `n`-change backlog; keys, index and graph ids are
/// `prefix`-ed so they never meet polysync's.
pub fn run(python: &Path, root: &Path, sink: &str, n: u64, prefix: &str, index: &str) -> Option<Baseline> {
    let out = Command::new(python)
        .arg(root.join("bench/loaders/sinks.py"))
        .args(["--sink", sink, "--n", &n.to_string(), "--prefix", prefix, "--index", index])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("bench: baseline {sink} failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim().lines().last()?).ok()?;
    Some(Baseline { records: v["records"].as_f64()?, seconds: v["seconds"].as_f64()? })
}
