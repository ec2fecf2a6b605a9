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

/// Microseconds on `CLOCK_BOOTTIME`: monotonic, and it counts time spent stopped (SIGSTOP) or
/// suspended, unlike `Instant` (`CLOCK_MONOTONIC`, which skips suspension), which is the
/// fallback off Linux. Every "trusted until" of this process (leases, follower passes) is kept
/// on it, so one reading judges them all.
pub fn boot_us() -> u64 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec, and clock_gettime only writes through
        // the pointer.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        if rc == 0 {
            return ts.tv_sec.unsigned_abs() * 1_000_000 + ts.tv_nsec.unsigned_abs() / 1_000;
        }
    }
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let elapsed = START.get_or_init(std::time::Instant::now).elapsed();
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

/// The clocks involved (each instance's, PostgreSQL's) run at rates within this fraction of each
/// other: a lease is believed `RATE_MARGIN` shorter than granted and waited for that much longer.
pub const RATE_MARGIN: f64 = 0.01;
/// Added to every wait for a lease's end: the time between PostgreSQL's reading of its clock and
/// the revoker's reading of the reply, which only shortens what the revoker believes is left.
pub const FIXED_MARGIN: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a revoker waits for a lease PostgreSQL said has `remaining` left.
pub fn lease_wait(remaining: std::time::Duration) -> std::time::Duration {
    remaining.mul_f64(1.0 + RATE_MARGIN) + FIXED_MARGIN
}

/// What a revoking call needs beyond its wait for a lease (its statements, the answer).
pub const WAIT_SLACK: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest lease a call with this request timeout can wait for ([`lease_wait`] plus
/// [`WAIT_SLACK`] under `timeout`).
pub fn covers(timeout: std::time::Duration) -> std::time::Duration {
    let room = timeout.saturating_sub(FIXED_MARGIN + WAIT_SLACK);
    room.div_f64(1.0 + RATE_MARGIN)
        .saturating_sub(std::time::Duration::from_micros(1))
}

tokio::task_local! {
    /// When the call being served must have answered (the server's request timeout, or the
    /// caller's `grpc-timeout` if sooner).
    static DEADLINE: std::time::Instant;
}

/// Runs `call` with its deadline known to what it awaits ([`deadline`]).
pub async fn with_deadline<F: Future>(deadline: std::time::Instant, call: F) -> F::Output {
    DEADLINE.scope(deadline, call).await
}

/// The deadline of the call being served, if any: a wait that would outlast it answers before.
pub fn deadline() -> Option<std::time::Instant> {
    DEADLINE.try_with(|d| *d).ok()
}

/// What ends before the call's deadline (a revoking call's wait, an admin call's wait for its
/// audit row) leaves it this long to answer.
pub const ANSWER_MARGIN: std::time::Duration = std::time::Duration::from_millis(100);

/// When the call being served must stop waiting to answer in time ([`ANSWER_MARGIN`] before its
/// deadline), if it has one.
pub fn answer_by() -> Option<std::time::Instant> {
    deadline().map(|d| d.checked_sub(ANSWER_MARGIN).unwrap_or(d))
}

/// `work`, to be run on a task of its own, with the deadline of the call that spawns it.
pub fn carry_deadline<F: Future>(work: F) -> impl Future<Output = F::Output> {
    let deadline = deadline();
    async move {
        match deadline {
            Some(at) => with_deadline(at, work).await,
            None => work.await,
        }
    }
}

/// A `grpc-timeout` header's value (`<at most 8 digits><H|M|S|m|u|n>`), if well-formed.
pub fn grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `d` in microseconds, saturating.
pub fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

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

    /// Whether PostgreSQL's clock was read at least once (until then [`Self::now`] is this
    /// host's, however far off).
    pub fn calibrated(&self) -> bool {
        !self
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
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
        assert!(!clock.calibrated());
        let sent = clock.local();
        let database = Utc::now();
        let received = clock.local();
        clock.calibrate(sent, database, received);
        let error = (clock.now() - Utc::now()).abs();
        assert!(error < TimeDelta::milliseconds(50), "{error}");
        assert!(clock.calibrated());
    }

    #[test]
    fn a_revoker_waits_longer_than_a_holder_believes() {
        let lease = std::time::Duration::from_secs(3);
        let believed = lease.mul_f64(1.0 - RATE_MARGIN);
        assert!(lease_wait(lease) > believed + FIXED_MARGIN);
        assert_eq!(lease_wait(lease), std::time::Duration::from_millis(3_130));
    }

    #[tokio::test]
    async fn a_call_knows_its_deadline_and_nothing_else_does() {
        assert_eq!(deadline(), None);
        let at = std::time::Instant::now() + std::time::Duration::from_secs(1);
        assert_eq!(with_deadline(at, async { deadline() }).await, Some(at));
    }

    #[test]
    fn grpc_timeouts_are_read_as_the_protocol_writes_them() {
        use std::time::Duration;
        assert_eq!(grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        for bad in ["", "S", "123456789S", "1s", "-1S", "1.5S", "10"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_boot_clock_moves_forward() {
        let first = boot_us();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let second = boot_us();
        assert!(second >= first + 5_000, "{first} {second}");
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
