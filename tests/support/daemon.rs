//! Running the daemon: in-process (fast, for most tests) or as a child process (for kill -9).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use polysync::app::Config;
use polysync::app::{AppError, ControlHandles, Controls, Stopped};
use tokio::task::JoinHandle;

/// Config text for a PostgreSQL source `db` and a cache sink `cache`, plus `extra` TOML.
pub fn pg_cache_config(db_url: &str, slot: &str, extra: &str) -> String {
    pg_cache_config_with(db_url, slot, slot, "", extra)
}

/// Like [`pg_cache_config`] with a separate publication name and extra source settings.
pub fn pg_cache_config_with(db_url: &str, slot: &str, publication: &str, source_extra: &str, extra: &str) -> String {
    format!(
        r#"
state_dir = "state"
pipelines = "pipelines"

[runtime]
lanes = 4
shutdown_timeout = "15s"
# A sink that hiccups retries in memory first, so "the slot caught up" still means "applied"
# in the tests that read the stores right after; the outage tests shorten it to see spooling.
spill_after = "20s"

[metrics]
enabled = false

[log]
level = "info"

[sources.db]
kind = "postgres"
url = "{db_url}"
sslmode = "disable"
slot = "{slot}"
publication = "{publication}"
create_if_missing = true
status_interval = "100ms"
reconnect_max_delay = "2s"
{source_extra}

[sinks.cache]
kind = "cache"
url = "{redis}"
timeout = "2s"
{extra}
"#,
        redis = super::redis::url()
    )
}

/// The daemon running inside the test process.
pub struct InProcess {
    controls: ControlHandles,
    handle: JoinHandle<Result<Stopped, AppError>>,
}

impl InProcess {
    pub fn start(config: &Path) -> InProcess {
        init_test_logging();
        let cfg = Config::load(config).unwrap_or_else(|e| panic!("config: {e}"));
        let (controls, handles) = Controls::new();
        let handle = tokio::spawn(polysync::app::run(cfg, controls));
        InProcess { controls: handles, handle }
    }

    /// Ask for a reload (like SIGHUP).
    pub fn reload(&self) {
        let _ = self.controls.reload.try_send(());
    }

    /// Graceful stop (like SIGTERM); returns the daemon's result.
    pub async fn stop(self) -> Result<(), AppError> {
        self.stop_status().await.map(|_| ())
    }

    /// Graceful stop; how it ended.
    pub async fn stop_status(self) -> Result<Stopped, AppError> {
        self.controls.stop.cancel();
        self.handle.await.expect("daemon task panicked")
    }

    /// True once the daemon has exited by itself (e.g. refused to start).
    pub fn finished(&self) -> bool {
        self.handle.is_finished()
    }

    pub async fn result(self) -> Result<(), AppError> {
        self.handle.await.expect("daemon task panicked").map(|_| ())
    }
}

/// The daemon as a separate process.
pub struct ChildDaemon {
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl ChildDaemon {
    pub fn spawn(config: &Path, log: &Path) -> ChildDaemon {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_polysync"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn polysync");
        ChildDaemon { child, log: log.to_owned() }
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("running") as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// kill -9 and reap.
    pub async fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait().await;
    }

    /// SIGTERM and wait for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.child.wait().await.expect("wait")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A config that spills after one second: for tests of a sink that is down.
pub fn quick_spill(config: String) -> String {
    config.replace("spill_after = \"20s\"", "spill_after = \"1s\"")
}

/// Daemon logs go to the test's captured output (shown when a test fails).
pub fn init_test_logging() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,notify=error".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Start the daemon in-process and expect it to refuse to start within 30 s; the error text.
pub async fn refusal(config: &Path) -> String {
    let d = InProcess::start(config);
    match tokio::time::timeout(std::time::Duration::from_secs(30), d.result()).await {
        Ok(Err(e)) => e.to_string(),
        other => panic!("expected a refusal, got {:?}", other.map(|r| r.is_ok())),
    }
}
