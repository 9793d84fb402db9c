//! Running polysync under the harness: a config per scenario, the process's CPU time and
//! memory from /proc, and its metrics endpoint.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A polysync process started for one scenario.
pub struct Daemon {
    child: Child,
    /// Metrics address.
    pub metrics: String,
    /// Scratch directory (config, pipelines, state, log).
    pub dir: PathBuf,
}

/// CPU seconds (user + system) of a process, from /proc/<pid>/stat.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the full line, i.e. 11 and 12 after ')'.
    let hz = 100.0; // USER_HZ on Linux
    (ticks(11) + ticks(12)) / hz
}

/// `VmRSS` and `VmHWM` (peak) in bytes.
pub fn memory(pid: u32) -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return (0, 0) };
    let get = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (get("VmRSS:"), get("VmHWM:"))
}

impl Daemon {
    /// Write the config and pipelines into a fresh directory and start `polysync run`.
    pub fn start(bin: &Path, name: &str, config: &str, pipelines: &[(&str, String)], port: u16) -> Daemon {
        let dir = std::env::temp_dir().join(format!("polysync-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pipelines")).expect("scratch dir");
        let metrics = format!("127.0.0.1:{port}");
        let full = format!(
            "state_dir = \"state\"\npipelines = \"pipelines\"\n[metrics]\nlisten = \"{metrics}\"\n[log]\nlevel = \"warn\"\n{config}"
        );
        std::fs::write(dir.join("polysync.toml"), full).expect("config");
        for (n, text) in pipelines {
            std::fs::write(dir.join("pipelines").join(format!("{n}.toml")), text).expect("pipeline");
        }
        let log = std::fs::File::create(dir.join("daemon.log")).expect("log");
        let child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(dir.join("polysync.toml"))
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start polysync");
        Daemon { child, metrics, dir }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait (a clean drain); the log's tail if it failed.
    pub fn stop(mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("polysync exited with {status:?}; log:\n{}", self.log_tail());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A metric's value summed over the series matching every label (0 when absent).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let Some(body) = http_get(&self.metrics, "/metrics").await else { return 0.0 };
        let mut sum = 0.0;
        for line in body.lines().filter(|l| l.starts_with(name)) {
            let (series, value) = match line.rsplit_once(' ') {
                Some(x) => x,
                None => continue,
            };
            let bare = series.split('{').next().unwrap_or("");
            if bare != name {
                continue;
            }
            if labels.iter().all(|(k, v)| series.contains(&format!("{k}=\"{v}\""))) {
                sum += value.parse::<f64>().unwrap_or(0.0);
            }
        }
        sum
    }

    /// Wait until /readyz answers 200.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if let Some(b) = http_get(&self.metrics, "/readyz").await
                && !b.is_empty()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

/// Body of a 200 answer.
pub async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    if !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}
