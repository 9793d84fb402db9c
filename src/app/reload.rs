//! What triggers a reload: SIGHUP, and edits to the config file or the pipelines directory
//! (debounced, so an editor's save-rename-chmod dance is one reload).

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Quiet period after the last file event before reloading.
const DEBOUNCE: Duration = Duration::from_millis(400);

/// Why a reload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP (systemd `ExecReload`, `kill -HUP`).
    Signal,
    /// A watched file changed.
    FileChange,
}

/// Forward SIGHUP as a trigger. The handler is installed before this returns, so a SIGHUP
/// during start-up is not the default "terminate".
pub fn sighup(tx: mpsc::Sender<Trigger>, cancel: CancellationToken) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = hup.recv() => {
                    if r.is_none() { return; }
                    let _ = tx.try_send(Trigger::Signal);
                }
            }
        }
    }))
}

fn relevant(path: &Path, config: &Path, pipelines: &Path) -> bool {
    path == config || (path.parent() == Some(pipelines) && path.extension().is_some_and(|e| e == "toml"))
}

/// Watch the config file and the pipelines directory; send a trigger after each burst of
/// changes. Returns the watcher, which must be kept alive.
pub fn watch(
    config: &Path,
    pipelines: &Path,
    tx: mpsc::Sender<Trigger>,
    cancel: CancellationToken,
) -> notify::Result<notify::RecommendedWatcher> {
    let config = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_owned());
    let pipelines = std::fs::canonicalize(pipelines).unwrap_or_else(|_| pipelines.to_owned());
    let (raw_tx, mut raw_rx) = mpsc::channel::<()>(1);
    let (cfg_path, dir) = (config.clone(), pipelines.clone());
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if ev.kind.is_access() {
                return;
            }
            if ev.paths.iter().any(|p| relevant(p, &cfg_path, &dir)) {
                let _ = raw_tx.try_send(());
            }
        }
    })?;
    let config_dir: PathBuf = config.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    watcher.watch(&config_dir, RecursiveMode::NonRecursive)?;
    if pipelines != config_dir {
        watcher.watch(&pipelines, RecursiveMode::NonRecursive)?;
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = raw_rx.recv() => if r.is_none() { return },
            }
            // Debounce: wait until the files are quiet.
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(DEBOUNCE) => break,
                    r = raw_rx.recv() => if r.is_none() { return },
                }
            }
            let _ = tx.try_send(Trigger::FileChange);
        }
    });
    Ok(watcher)
}
