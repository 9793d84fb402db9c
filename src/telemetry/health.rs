//! Liveness and readiness, as load balancers and orchestrators understand them.
//!
//! Liveness (`/healthz`): the runtime is still scheduling tasks (a ticker updates a heartbeat;
//! a wedged event loop stops it). Readiness (`/readyz`): every source is connected and every
//! sink answered its last request or check; the body names what is not.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Shared readiness state, and what `polysync status` shows beyond the metrics: each
/// component's last error (kept after it recovered) and the last reload.
#[derive(Default)]
pub struct Health {
    components: Mutex<BTreeMap<String, Result<(), String>>>,
    last_errors: Mutex<BTreeMap<String, (String, i64)>>,
    last_reload: Mutex<Option<ReloadOutcome>>,
    heartbeat_ms: AtomicI64,
}

/// How the last reload ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadOutcome {
    /// Milliseconds since the epoch.
    pub at_ms: i64,
    /// It was swapped in.
    pub ok: bool,
    /// The summary (what changed) or the error.
    pub detail: String,
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
        if let Err(e) = &state {
            self.last_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(component.to_string(), (e.clone(), now_ms()));
        }
        self.components.lock().unwrap_or_else(|p| p.into_inner()).insert(component.to_string(), state);
    }

    /// Record how a reload ended.
    pub fn reloaded(&self, ok: bool, detail: String) {
        *self.last_reload.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(ReloadOutcome { at_ms: now_ms(), ok, detail });
    }

    /// Everything `polysync status` reads from the running daemon (besides the metrics): each
    /// component's state and last error, and the last reload.
    pub fn status(&self) -> serde_json::Value {
        let components = self.components.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let errors = self.last_errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let comps: serde_json::Map<String, serde_json::Value> = components
            .iter()
            .map(|(k, v)| {
                let last = errors.get(k).map(|(e, at)| serde_json::json!({ "error": e, "at_ms": at }));
                (k.clone(), serde_json::json!({ "ok": v.is_ok(), "error": v.as_ref().err(), "last_error": last }))
            })
            .collect();
        serde_json::json!({
            "components": comps,
            "last_reload": *self.last_reload.lock().unwrap_or_else(|p| p.into_inner()),
        })
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
