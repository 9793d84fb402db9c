//! One error policy for the whole daemon: what kind of failure happened decides whether to
//! retry (with which backoff profile), dead-letter or stop. The failure kinds and the one
//! function that both logs and counts a failure live beside the backoff profiles in
//! [`crate::retry`], so sources (below the runtime) report through the same path.

pub use crate::retry::{Failure, Profile, backoff, backoff_between, report, worth_logging};

impl Failure {
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
