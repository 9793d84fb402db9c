//! CPU time of every process a scenario runs on (polysync and the local servers), from /proc:
//! on two cores the servers compete with the daemon, and a sink's rate is only comparable
//! with the CPU its server had.

use std::collections::BTreeMap;

use crate::daemon::cpu_seconds;

/// CPU seconds so far by process: `polysync` (the given pid), each server `make peers` started
/// (from its pid file under `.local`) and every `postgres` process together (backends and
/// walsenders are separate processes).
pub fn snapshot(polysync_pid: u32) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    out.insert("polysync".to_string(), cpu_seconds(polysync_pid));
    for (name, file) in [
        ("opensearch", "opensearch.pid"),
        ("gremlin", "gremlin.pid"),
        ("influxdb", "influxdb.pid"),
        ("redis", "redis.pid"),
    ] {
        if let Some(pid) = std::fs::read_to_string(format!(".local/{file}")).ok().and_then(|s| s.trim().parse().ok()) {
            out.insert(name.to_string(), cpu_seconds(pid));
        }
    }
    let mut pg = 0.0;
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres") {
                pg += cpu_seconds(pid);
            }
        }
    }
    out.insert("postgres (all processes)".to_string(), pg);
    out
}

/// CPU seconds used between two snapshots, as a Markdown table with cores over `wall` seconds.
pub fn table(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, wall: f64) -> String {
    let mut s = String::from("| process | CPU s | cores |\n|---|---|---|\n");
    for (name, a) in after {
        let used = (a - before.get(name).copied().unwrap_or(0.0)).max(0.0);
        s.push_str(&format!("| {name} | {used:.1} | {:.2} |\n", used / wall.max(0.001)));
    }
    s
}
