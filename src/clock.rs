//! The fleet's one clock: PostgreSQL's.
//!
//! Deadlines (idle and absolute expiry, touch cut-offs, tombstone lifetimes, purges) must be
//! judged the same way by every instance, or an instance whose clock is behind serves copies for
//! the skew and one whose clock jumps forward extends deadlines for everyone. Statements that
//! decide under a lock (touch, revocation) use PostgreSQL's `clock_timestamp()` directly; the rest
//! use [`Clock::now`]: this host's clock corrected by the offset to PostgreSQL's, measured on
//! every health check (each sample's error is at most half its round trip).
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};

/// Samples whose round trip took longer than this say too little about the offset.
const MAX_SAMPLE_RTT: TimeDelta = TimeDelta::milliseconds(100);

#[derive(Debug)]
pub struct Clock {
    /// PostgreSQL's clock minus this host's, in microseconds.
    offset_us: AtomicI64,
    /// Test-only: pretend this host's clock is off by this much.
    skew: TimeDelta,
}

impl Clock {
    pub fn new(skew: TimeDelta) -> Self {
        Self {
            offset_us: AtomicI64::new(0),
            skew,
        }
    }

    /// This host's clock (as skewed in tests), uncorrected.
    pub fn local(&self) -> DateTime<Utc> {
        Utc::now() + self.skew
    }

    /// PostgreSQL's time now, truncated to its microsecond precision so a cached copy of a row
    /// equals the row.
    pub fn now(&self) -> DateTime<Utc> {
        let offset = TimeDelta::microseconds(self.offset_us.load(Ordering::Relaxed));
        (self.local() + offset).trunc_subsecs(6)
    }

    /// Records one sample: `database` was read between `sent` and `received` (local times).
    pub fn calibrate(&self, sent: DateTime<Utc>, database: DateTime<Utc>, received: DateTime<Utc>) {
        let rtt = received - sent;
        if rtt < TimeDelta::zero() || rtt > MAX_SAMPLE_RTT {
            return;
        }
        let midpoint = sent + rtt / 2;
        let offset = (database - midpoint).num_microseconds().unwrap_or(0);
        self.offset_us.store(offset, Ordering::Relaxed);
    }

    /// The current correction (PostgreSQL minus this host), for the logs and tests.
    pub fn offset(&self) -> TimeDelta {
        TimeDelta::microseconds(self.offset_us.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skewed_host_reads_the_database_clock_once_calibrated() {
        let clock = Clock::new(TimeDelta::seconds(-30));
        let sent = clock.local();
        let database = Utc::now();
        let received = clock.local();
        clock.calibrate(sent, database, received);
        let error = (clock.now() - Utc::now()).abs();
        assert!(error < TimeDelta::milliseconds(50), "{error}");
    }

    #[test]
    fn slow_samples_are_ignored() {
        let clock = Clock::new(TimeDelta::zero());
        let sent = clock.local();
        clock.calibrate(
            sent,
            sent + TimeDelta::hours(1),
            sent + TimeDelta::seconds(1),
        );
        assert_eq!(clock.offset(), TimeDelta::zero());
    }
}
