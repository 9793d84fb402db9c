//! One error policy for the whole daemon: what kind of failure happened decides whether to
//! retry (with which backoff profile), dead-letter or stop, and one function both logs and
//! counts it, so the log line and the metric label cannot drift apart.

pub use crate::retry::{Profile, backoff, backoff_between};
use crate::telemetry::metrics;

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

    /// The decision for this kind of failure.
    pub fn decision(self) -> Decision {
        match self {
            Failure::Transient => Decision::Retry(Profile::Remote),
            Failure::Fatal => Decision::Retry(Profile::Fatal),
            Failure::Local => Decision::Retry(Profile::Local),
            Failure::Rejected => Decision::DeadLetter,
        }
    }
}

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again after the profile's delays.
    Retry(Profile),
    /// Record the item in the dead-letter queue and go on.
    DeadLetter,
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
    fn every_failure_has_one_decision() {
        assert_eq!(Failure::Transient.decision(), Decision::Retry(Profile::Remote));
        assert_eq!(Failure::Fatal.decision(), Decision::Retry(Profile::Fatal));
        assert_eq!(Failure::Rejected.decision(), Decision::DeadLetter);
        assert_eq!(Failure::Local.decision(), Decision::Retry(Profile::Local));
    }
}
