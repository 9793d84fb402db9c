//! Every retry loop's delays come from here: named backoff profiles on `backon` (the
//! `backoff` crate is unmaintained, RUSTSEC-2025-0012). What to retry at all is the runtime's
//! error policy (`runtime::policy`); sources use the profiles for reconnects.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

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
