//! Converts kernel timestamps (`CLOCK_BOOTTIME` nanoseconds, from
//! `bpf_ktime_get_boot_ns`) to wall-clock time.

/// Offset between the wall clock and the boot clock, sampled at one instant.
#[derive(Clone, Copy, Debug)]
pub struct BootClock {
    realtime_minus_boot_ns: i128,
}

impl BootClock {
    /// Samples both clocks now. Re-sample regularly: the wall clock is
    /// stepped by NTP, the boot clock is not.
    pub fn sample() -> Self {
        let boot = clock_ns(libc::CLOCK_BOOTTIME);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Self {
            realtime_minus_boot_ns: real - boot,
        }
    }

    /// Wall-clock nanoseconds since the Unix epoch of a boot-clock instant.
    pub fn to_unix_ns(self, boot_ns: u64) -> u64 {
        let unix = boot_ns as i128 + self.realtime_minus_boot_ns;
        unix.clamp(0, u64::MAX as i128) as u64
    }
}

/// Wall-clock nanoseconds since the Unix epoch, now.
pub fn unix_now_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME).max(0) as u64
}

/// Wall-clock seconds since the Unix epoch, now.
pub fn unix_now_secs() -> u64 {
    unix_now_ns() / 1_000_000_000
}

/// Boot-clock nanoseconds, now (the clock of kernel event timestamps).
pub fn boot_now_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME).max(0) as u64
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out-pointer; cannot fail for these clocks.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    #[test]
    fn boot_time_now_maps_to_wall_time_now() {
        let clock = BootClock::sample();
        let boot_now = clock_ns(libc::CLOCK_BOOTTIME) as u64;
        let wall_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let converted = clock.to_unix_ns(boot_now);
        assert!(
            converted.abs_diff(wall_now) < 50_000_000,
            "{converted} vs {wall_now}"
        );
    }
}
