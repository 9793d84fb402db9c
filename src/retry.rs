//! Every retry loop's delays come from here: named backoff profiles on `backon` (the
//! `backoff` crate is unmaintained, RUSTSEC-2025-0012), with the kinds of failure and the one
//! function that logs and counts a failure. What each kind leads to (retry with which profile,
//! or dead-letter) is the runtime's error policy (`runtime::policy`); sources use the profiles
//! for reconnects and report their failures here.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::telemetry::metrics;

/// Named backoff profiles: every retry loop in the daemon uses one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// A remote peer's transient failure: 50 ms doubling to 30 s, with jitter.
    Remote,
    /// A failure that needs a person: 5 s doubling to 5 min, so a fixed config is picked up
    /// soon without hammering the peer meanwhile.
    Fatal,
    /// Connecting at start-up (a database or a sink that is not up yet): 200 ms to 10 s.
    Connect,
    /// Local disk (spool, dead letters): 100 ms to 5 s.
    Local,
}

/// The delays of a profile (endless: callers stop on their own conditions).
pub fn backoff(profile: Profile) -> impl Iterator<Item = Duration> + Send {
    let (min, max) = match profile {
        Profile::Remote => (Duration::from_millis(50), Duration::from_secs(30)),
        Profile::Fatal => (Duration::from_secs(5), Duration::from_secs(300)),
        Profile::Connect => (Duration::from_millis(200), Duration::from_secs(10)),
        Profile::Local => (Duration::from_millis(100), Duration::from_secs(5)),
    };
    backoff_between(min, max)
}

/// Exponential delays from `min` to `max` with jitter, endless (a source's configured
/// reconnect ceiling uses this with its own `max`).
pub fn backoff_between(min: Duration, max: Duration) -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// What went wrong, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Network, timeout, a server busy or restarting: it heals by itself.
    Transient,
    /// The peer refuses on purpose (authentication, permission, a missing database or index):
    /// a person must act. Retried slowly, never dropped; the component is reported failed.
    Fatal,
    /// This item is refused for good (a mapping error, a value the sink cannot store).
    Rejected,
    /// Local storage (the spool or the dead-letter queue) cannot be written: a full or broken
    /// disk. Nothing is confirmed until it can.
    Local,
}

impl Failure {
    /// Label of `polysync_sink_errors_total` and the log field.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Transient => "transient",
            Failure::Fatal => "fatal",
            Failure::Rejected => "rejected",
            Failure::Local => "local",
        }
    }
}

/// Log and count one failure of `component` (`sink search`, `source shop`). `loud` chooses a
/// warning/error line over a debug one, so a long outage logs its first failures and then
/// every power of two, not every retry.
pub fn report(component: &str, failure: Failure, msg: &str, loud: bool) {
    let (kind, name) = component.split_once(' ').unwrap_or(("component", component));
    if kind == "sink" {
        metrics().sink_errors.with_label_values(&[name, failure.label()]).inc();
    }
    if !loud {
        tracing::debug!(component, kind = failure.label(), error = msg, "failure (retrying)");
        return;
    }
    match failure {
        Failure::Transient => tracing::warn!(component, kind = failure.label(), error = msg, "failed; retrying"),
        Failure::Fatal => tracing::error!(
            component,
            kind = failure.label(),
            error = msg,
            "refused: this needs a fix in the config or on the server; retrying slowly (nothing is dropped)"
        ),
        Failure::Rejected => tracing::warn!(component, kind = failure.label(), error = msg, "rejected"),
        Failure::Local => tracing::error!(
            component,
            kind = failure.label(),
            error = msg,
            "local storage cannot be written; nothing more is confirmed until it can"
        ),
    }
}

/// Retry attempts worth a log line: the first three, then every power of two.
pub fn worth_logging(attempt: u32) -> bool {
    attempt <= 3 || attempt.is_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_grow_to_their_ceiling() {
        let d: Vec<Duration> = backoff(Profile::Fatal).take(12).collect();
        assert!(d[0] >= Duration::from_secs(5) && d[0] < Duration::from_secs(11), "{d:?}");
        assert!(d.iter().all(|x| *x <= Duration::from_secs(600)), "{d:?}");
        assert!(d[11] >= Duration::from_secs(300), "{d:?}");
    }
}
