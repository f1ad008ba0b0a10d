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

    /// Moves a manual clock by `seconds` (may be negative); refused on the system clock.
    pub fn advance(&self, seconds: i64) -> Result<i64, BrokerError> {
        match self {
            Clock::System => Err(BrokerError::ClockNotManual),
            Clock::Manual(t) => {
                let mut current = t.load(Ordering::SeqCst);
                loop {
                    let next = current.checked_add(seconds).filter(|n| *n >= 0).ok_or_else(|| {
                        BrokerError::bad_parameter("The clock cannot move outside 1970..=year 292277026596.")
                    })?;
                    match t.compare_exchange(current, next, Ordering::SeqCst, Ordering::SeqCst) {
                        Ok(_) => return Ok(next),
                        Err(seen) => current = seen,
                    }
                }
            }
        }
    }

    /// Sets a manual clock; refused on the system clock.
    pub fn set(&self, now: i64) -> Result<i64, BrokerError> {
        match self {
            Clock::System => Err(BrokerError::ClockNotManual),
            Clock::Manual(_) if now < 0 => {
                Err(BrokerError::bad_parameter("The clock cannot be set before 1970."))
            }
            Clock::Manual(t) => {
                t.store(now, Ordering::SeqCst);
                Ok(now)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_cannot_be_moved() {
        let c = Clock::System;
        assert_eq!(c.advance(10), Err(BrokerError::ClockNotManual));
        assert_eq!(c.set(10), Err(BrokerError::ClockNotManual));
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = Clock::manual(1000);
        assert_eq!(c.now(), 1000);
        assert_eq!(c.advance(3600).unwrap(), 4600);
        assert_eq!(c.set(5).unwrap(), 5);
        assert!(c.advance(-10).is_err());
        assert_eq!(c.now(), 5);
    }
}
