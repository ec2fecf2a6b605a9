//! The clock leases are measured on: one that counts time the process was stopped or the
//! machine slept (a paused subscriber's lease runs out): `CLOCK_BOOTTIME` on Linux and Android,
//! `CLOCK_MONOTONIC` on Apple's systems. Elsewhere there is none this crate trusts: the memory
//! is never trusted there, and every validation goes to authd.

/// Whether [`boot_us`] counts time the machine slept.
pub const COUNTS_STOPPED_TIME: bool = cfg!(any(
    target_os = "linux",
    target_os = "android",
    target_vendor = "apple"
));

/// Microseconds of the boot clock.
pub fn boot_us() -> u64 {
    #[cfg(any(target_os = "linux", target_os = "android", target_vendor = "apple"))]
    {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let clock = libc::CLOCK_BOOTTIME;
        #[cfg(target_vendor = "apple")]
        let clock = libc::CLOCK_MONOTONIC;
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec, and clock_gettime only writes through
        // the pointer.
        let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
        if rc == 0 {
            return ts.tv_sec.unsigned_abs() * 1_000_000 + ts.tv_nsec.unsigned_abs() / 1_000;
        }
    }
    // Not used for trust (see `COUNTS_STOPPED_TIME`); `clock_gettime` does not fail for these
    // clocks.
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let elapsed = START.get_or_init(std::time::Instant::now).elapsed();
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

/// A duration in microseconds.
pub fn us(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Clocks run at rates within this of each other (authd's assumption): a lease is believed this
/// much shorter than granted.
pub const RATE_MARGIN: f64 = 0.01;
