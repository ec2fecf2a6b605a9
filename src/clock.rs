//! The fleet's one clock: PostgreSQL's.
//!
//! Deadlines (idle and absolute expiry, touch cut-offs, tombstone lifetimes, purges) must be
//! judged the same way by every instance, or an instance whose clock is behind serves copies for
//! the skew and one whose clock jumps forward extends deadlines for everyone. Statements that
//! decide under a lock (touch, revocation) use PostgreSQL's `clock_timestamp()` directly; the rest
//! use [`Clock::now`]: this host's clock corrected by the offset to PostgreSQL's, measured on
//! every health check. Each sample's error is at most half its round trip, so the offset in use
//! is that of the quickest of the recent samples.
use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicI64, Ordering},
    },
};

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};

/// Samples kept; the quickest decides.
const SAMPLES: usize = 8;

#[derive(Debug)]
pub struct Clock {
    /// PostgreSQL's clock minus this host's, in microseconds.
    offset_us: AtomicI64,
    /// Test-only: pretend this host's clock is off by this much.
    skew: TimeDelta,
    /// Recent samples: (round trip, offset), newest last.
    samples: Mutex<VecDeque<(TimeDelta, i64)>>,
}

impl Clock {
    pub fn new(skew: TimeDelta) -> Self {
        Self {
            offset_us: AtomicI64::new(0),
            skew,
            samples: Mutex::new(VecDeque::with_capacity(SAMPLES)),
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
        if rtt < TimeDelta::zero() {
            return;
        }
        let midpoint = sent + rtt / 2;
        let offset = (database - midpoint).num_microseconds().unwrap_or(0);
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back((rtt, offset));
        if let Some((_, best)) = samples.iter().min_by_key(|(rtt, _)| *rtt) {
            self.offset_us.store(*best, Ordering::Relaxed);
        }
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
    fn the_quickest_recent_sample_decides() {
        let clock = Clock::new(TimeDelta::zero());
        let sent = clock.local();
        // A slow sample is used while it is all there is...
        let database = sent + TimeDelta::seconds(10);
        clock.calibrate(sent, database, sent + TimeDelta::seconds(2));
        assert_eq!(clock.offset(), TimeDelta::seconds(9));
        // ...and gives way to a quicker one, which a slower one does not displace.
        let offset = TimeDelta::milliseconds(5);
        clock.calibrate(sent, sent + offset, sent);
        assert_eq!(clock.offset(), offset);
        let database = sent + TimeDelta::hours(1);
        clock.calibrate(sent, database, sent + TimeDelta::seconds(1));
        assert_eq!(clock.offset(), offset);
    }
}
