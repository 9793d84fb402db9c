//! systemd integration for `Type=notify` units: `READY=1` once sources stream and sinks
//! answer, `STOPPING=1` when shutdown begins, `RELOADING=1`/`READY=1` around reloads, and
//! `WATCHDOG=1` pings while the event loop runs (when the unit sets `WatchdogSec=`).
//!
//! The protocol is one datagram per message to the socket named by `$NOTIFY_SOCKET`
//! (a path, or `@name` for the abstract namespace); a dozen lines, so no crate.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go, if the service manager asked for them.
#[derive(Clone, Debug)]
pub struct Notifier {
    socket: Option<String>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` (absent: every call is a no-op).
    pub fn from_env() -> Notifier {
        Notifier { socket: std::env::var("NOTIFY_SOCKET").ok().filter(|s| !s.is_empty()) }
    }

    /// Send a raw state string (`READY=1`, `STATUS=…`). Errors are logged, never fatal.
    pub fn notify(&self, state: &str) {
        let Some(path) = &self.socket else { return };
        let result = (|| -> std::io::Result<()> {
            let sock = UnixDatagram::unbound()?;
            if let Some(name) = path.strip_prefix('@') {
                #[cfg(target_os = "linux")]
                {
                    use std::os::linux::net::SocketAddrExt;
                    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                    sock.send_to_addr(state.as_bytes(), &addr)?;
                    return Ok(());
                }
                #[cfg(not(target_os = "linux"))]
                {
                    let _ = name;
                    return Err(std::io::Error::other("abstract sockets need Linux"));
                }
            }
            sock.send_to(state.as_bytes(), path)?;
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!(socket = %path, error = %e, state, "sd_notify failed");
        }
    }

    /// The watchdog interval systemd expects pings within (`$WATCHDOG_USEC`), if any.
    pub fn watchdog_interval() -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID")
            && pid.parse::<u32>().ok() != Some(std::process::id())
        {
            return None;
        }
        Some(Duration::from_micros(usec))
    }
}
