//! Shared test helpers: real servers from `make peers`, unique names per test, the daemon
//! in-process or as a child process, and polling with a deadline.

#![allow(dead_code)]

pub mod aws;
pub mod converge;
pub mod daemon;
pub mod fake_streams;
pub mod graph;
pub mod pg;
pub mod pg_pair;
pub mod proxy;
pub mod redis;
pub mod search;
pub mod sigv4;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Tests that stop or restart a shared server take this exclusively; every other test holds it
/// shared, so a Redis restart never lands in the middle of an unrelated test.
static SERVERS: RwLock<()> = RwLock::const_new(());

/// Hold while using the shared servers normally.
pub async fn shared() -> RwLockReadGuard<'static, ()> {
    SERVERS.read().await
}

/// Hold while stopping/restarting a shared server.
pub async fn exclusive() -> RwLockWriteGuard<'static, ()> {
    SERVERS.write().await
}

/// A name unique to this test process and call (for databases, slots, key prefixes).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Poll `f` until it returns true or `timeout` passes; panics with `what` on timeout.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Run `deploy/local/peers.sh` with arguments (start/stop a peer).
pub fn peers(args: &[&str]) {
    let status = std::process::Command::new("bash")
        .arg(repo().join("deploy/local/peers.sh"))
        .args(args)
        .status()
        .expect("run peers.sh");
    assert!(status.success(), "peers.sh {args:?} failed");
}

/// A peer stopped for a test: started again when this is dropped, also when the test fails, so
/// one failing outage test never takes a server away from the tests after it.
pub struct Stopped(&'static str);

impl Stopped {
    /// Stop `peer` (`redis`, `opensearch`, `gremlin`, `influxdb`).
    pub fn peer(peer: &'static str) -> Stopped {
        peers(&["--stop", peer]);
        Stopped(peer)
    }

    /// Start it again now.
    pub fn restart(self) {
        drop(self);
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        peers(&[self.0]);
    }
}

/// A temp directory with a config file and a pipelines directory.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Workspace {
        Workspace { dir: tempfile::tempdir().expect("tempdir") }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("polysync.toml")
    }

    pub fn pipelines(&self) -> PathBuf {
        let p = self.dir.path().join("pipelines");
        std::fs::create_dir_all(&p).expect("mkdir pipelines");
        p
    }

    pub fn write_config(&self, text: &str) -> PathBuf {
        let p = self.config_path();
        std::fs::write(&p, text).expect("write config");
        self.pipelines();
        p
    }

    pub fn write_pipeline(&self, name: &str, text: &str) -> PathBuf {
        let p = self.pipelines().join(format!("{name}.toml"));
        std::fs::write(&p, text).expect("write pipeline");
        p
    }

    pub fn remove_pipeline(&self, name: &str) {
        let _ = std::fs::remove_file(self.pipelines().join(format!("{name}.toml")));
    }

    pub fn dlq_dir(&self) -> PathBuf {
        self.dir.path().join("state/dlq")
    }

    /// Every DLQ entry written so far.
    pub fn dead_letters(&self) -> Vec<polysync::dlq::StoredDeadLetter> {
        polysync::dlq::read_all(&self.dlq_dir(), |p, l, e| panic!("bad DLQ line {}:{l}: {e}", p.display()))
            .expect("read dlq")
    }
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Minimal HTTP GET on loopback (metrics, health): (status, body).
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// Sum of a metric's samples whose label set contains every `labels` pair.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Minimal HTTP/1.1 request on loopback with a JSON body: (status, body).
pub async fn http(method: &str, addr: &str, path: &str, body: Option<&str>) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, raw) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // Chunked bodies (OpenSearch uses them): join the chunks.
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = raw;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                break;
            }
            out.push_str(after.get(..n)?);
            rest = after.get(n + 2..)?;
        }
        out
    } else {
        raw.to_string()
    };
    Some((status, body))
}

/// `polysync check --online --config <config>` as a user runs it: exit code and stdout +
/// stderr.
pub fn check_online(config: &Path) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_polysync"))
        .args(["check", "--online", "--config"])
        .arg(config)
        .output()
        .expect("run polysync check --online");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}
