//! Liveness and readiness, as load balancers and orchestrators understand them.
//!
//! Liveness (`/healthz`): the runtime is still scheduling tasks (a ticker updates a heartbeat;
//! a wedged event loop stops it). Readiness (`/readyz`): every source is connected and every
//! sink answered its last request or check; the body names what is not.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Shared readiness state.
#[derive(Default)]
pub struct Health {
    components: Mutex<BTreeMap<String, Result<(), String>>>,
    heartbeat_ms: AtomicI64,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64
}

impl Health {
    /// New state; nothing registered yet, so not ready until components report.
    pub fn new() -> Health {
        let h = Health::default();
        h.beat();
        h
    }

    /// Record that the event loop ran.
    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn since_beat(&self) -> Duration {
        Duration::from_millis((now_ms() - self.heartbeat_ms.load(Ordering::Relaxed)).max(0) as u64)
    }

    /// Set a component's state (`source shop`, `sink cache`).
    pub fn set(&self, component: &str, state: Result<(), String>) {
        self.components.lock().unwrap_or_else(|p| p.into_inner()).insert(component.to_string(), state);
    }

    /// Forget a component (a sink removed by reload).
    pub fn remove(&self, component: &str) {
        self.components.lock().unwrap_or_else(|p| p.into_inner()).remove(component);
    }

    /// Ready if at least one component is registered and all are OK; otherwise the reasons.
    pub fn readiness(&self) -> Result<String, String> {
        let c = self.components.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_empty() {
            return Err("starting: no component has reported yet".into());
        }
        let bad: Vec<String> = c.iter().filter_map(|(k, v)| v.as_ref().err().map(|e| format!("{k}: {e}"))).collect();
        if bad.is_empty() {
            Ok(c.keys().map(|k| format!("{k}: ok")).collect::<Vec<_>>().join("\n"))
        } else {
            Err(bad.join("\n"))
        }
    }
}
