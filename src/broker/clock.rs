//! The broker's clock: the system clock, or a manual one that tests and rehearsals move by hand.
//! Every time-dependent rule (nbf/exp, token lifetimes, purge dates) reads this clock.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::model::BrokerError;

/// System time or a manually driven time, in Unix seconds.
#[derive(Debug)]
pub enum Clock {
    /// Wall-clock time.
    System,
    /// Time that only moves when told to.
    Manual(AtomicI64),
}

/// The current system time in Unix seconds.
pub fn system_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl Clock {
    /// A manual clock starting at `start`.
    pub fn manual(start: i64) -> Self {
        Clock::Manual(AtomicI64::new(start))
    }

    /// Now, in Unix seconds.
    pub fn now(&self) -> i64 {
        match self {
            Clock::System => system_now(),
            Clock::Manual(t) => t.load(Ordering::SeqCst),
        }
    }

    /// Whether the clock can be moved.
    pub fn is_manual(&self) -> bool {
        matches!(self, Clock::Manual(_))
    }

    /// Where `movement` would take a manual clock, without moving it; refused on the system
    /// clock and outside 1970..=the largest representable second.
    pub fn target(&self, movement: ClockMove) -> Result<i64, BrokerError> {
        let Clock::Manual(t) = self else {
            return Err(BrokerError::ClockNotManual);
        };
        match movement {
            ClockMove::By(seconds) => {
                t.load(Ordering::SeqCst).checked_add(seconds).filter(|n| *n >= 0).ok_or_else(|| {
                    BrokerError::bad_parameter("The clock cannot move outside 1970..=year 292277026596.")
                })
            }
            ClockMove::To(now) if now < 0 => {
                Err(BrokerError::bad_parameter("The clock cannot be set before 1970."))
            }
            ClockMove::To(now) => Ok(now),
        }
    }

    /// Sets a manual clock to a time [`Clock::target`] accepted. The broker serialises moves
    /// (and saves each one before making it), so this only stores.
    pub(crate) fn jump_to(&self, now: i64) {
        if let Clock::Manual(t) = self {
            t.store(now, Ordering::SeqCst);
        }
    }
}

/// A move of the manual clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockMove {
    /// By this many seconds (negative moves back).
    By(i64),
    /// To this Unix time.
    To(i64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_cannot_be_moved() {
        let c = Clock::System;
        assert_eq!(c.target(ClockMove::By(10)), Err(BrokerError::ClockNotManual));
        assert_eq!(c.target(ClockMove::To(10)), Err(BrokerError::ClockNotManual));
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = Clock::manual(1000);
        assert_eq!(c.now(), 1000);
        assert_eq!(c.target(ClockMove::By(3600)), Ok(4600));
        assert_eq!(c.now(), 1000, "target only computes");
        c.jump_to(4600);
        assert_eq!(c.now(), 4600);
        assert_eq!(c.target(ClockMove::To(5)), Ok(5));
        assert!(c.target(ClockMove::By(-4601)).is_err());
        assert!(c.target(ClockMove::To(-1)).is_err());
        assert!(c.target(ClockMove::By(i64::MAX)).is_err());
    }
}
