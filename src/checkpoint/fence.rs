//! How long this instance may still act on what it read from a leased shard.
//!
//! A lease is proof of ownership only while it is renewed. Another instance takes an expired
//! lease once its counter has not moved for `lease_duration` (by that instance's clock), and
//! re-reads the shard from the last checkpoint. Records the old owner read but had not applied
//! by then would race the new owner's writes of the same keys: a stale write could land after a
//! newer one. So every record read under a lease carries the lease's [`Fence`], and a sink
//! writer applies a record only while its fence is valid. A record found past its fence is
//! abandoned without confirmation (its ticket is never acknowledged), which is safe because the
//! checkpoint never passed it: the new owner reads it again.
//!
//! The validity ends before anyone else may take the lease: at the send time of the last
//! successful renewal plus [`VALID_SHARE`] of the lease duration. The rest of the duration is
//! the margin for a write already on the wire when the fence closes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Share of the lease duration, counted from a renewal's send time, during which records read
/// under the lease may be applied.
pub const VALID_SHARE: (u32, u32) = (4, 5);

/// The validity of one lease as held by this instance, shared by the shard's reader, its
/// acknowledgement window and every sink queue holding its records.
#[derive(Debug)]
pub struct Fence {
    /// Milliseconds since [`base`] until which records may be applied.
    until_ms: AtomicU64,
    revoked: AtomicBool,
}

/// A process-wide origin for the monotonic clock, so a deadline fits in an atomic.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn millis(t: Instant) -> u64 {
    t.saturating_duration_since(base()).as_millis() as u64
}

impl Fence {
    /// A fence valid until `until`.
    pub fn new(until: Instant) -> Arc<Fence> {
        base();
        Arc::new(Fence { until_ms: AtomicU64::new(millis(until)), revoked: AtomicBool::new(false) })
    }

    /// The validity a renewal sent at `sent` gives a lease of `duration`.
    pub fn validity(sent: Instant, duration: Duration) -> Instant {
        sent + duration * VALID_SHARE.0 / VALID_SHARE.1
    }

    /// A renewal succeeded: valid until `until` (never shortened).
    pub fn extend(&self, until: Instant) {
        self.until_ms.fetch_max(millis(until), Ordering::SeqCst);
    }

    /// The lease is gone (taken by another instance or handed over): invalid from now on, for
    /// good. A later take of the same shard gets a new fence.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
    }

    /// Whether records read under this lease may still be applied. A lapse is for good too: a
    /// renewal that arrives late does not revive records some writer already abandoned.
    pub fn is_valid(&self) -> bool {
        if self.revoked.load(Ordering::SeqCst) {
            return false;
        }
        if millis(Instant::now()) >= self.until_ms.load(Ordering::SeqCst) {
            self.revoked.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_until_its_deadline_extended_by_renewals_and_revoked_for_good() {
        let now = Instant::now();
        let f = Fence::new(now + Duration::from_millis(80));
        assert!(f.is_valid());
        f.extend(now + Duration::from_secs(60));
        f.extend(now);
        assert!(f.is_valid(), "an extension is never shortened");
        f.revoke();
        assert!(!f.is_valid());
        f.extend(now + Duration::from_secs(120));
        assert!(!f.is_valid(), "revoked for good");
        let g = Fence::new(Instant::now() + Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!g.is_valid(), "past its deadline");
        g.extend(Instant::now() + Duration::from_secs(60));
        assert!(!g.is_valid(), "a lapse is for good");
        assert_eq!(Fence::validity(now, Duration::from_secs(10)), now + Duration::from_secs(8));
    }
}
