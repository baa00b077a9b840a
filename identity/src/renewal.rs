//! When to renew a certificate, and what to believe after a renewal fails.
//!
//! Pure logic, no clock and no RNG of its own: callers pass `now` and a
//! uniform sample in `[0, 1]` for jitter, so schedules are deterministic in
//! tests. The rules, chosen so rotation cannot cause an outage by itself:
//!
//! * renew at a jittered fraction of the lifetime (45–55 % by default), so a
//!   fleet enrolled together does not renew together;
//! * a failed renewal never touches the current certificate; it schedules a
//!   retry with capped exponential backoff (1 s doubling to 30 s by default),
//!   so renewal resumes within seconds of the control plane coming back;
//! * a "new" certificate that is not valid now is refused and counted as a
//!   failure, so the current one stays;
//! * an expired certificate is reported as expired, never as healthy.

use std::time::{Duration, SystemTime};

/// A certificate's validity period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl Validity {
    /// Whether `now` lies inside the period.
    pub fn contains(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    /// Reads the validity of a DER certificate.
    pub fn of_certificate(cert_der: &[u8]) -> crate::Result<Self> {
        let info = crate::cert::CertificateInfo::parse(cert_der)?;
        Ok(Self {
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }
}

/// Tunables of the renewal schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RenewalPolicy {
    /// Earliest renewal point, as a fraction of the lifetime.
    pub earliest_fraction: f64,
    /// Latest renewal point, as a fraction of the lifetime.
    pub latest_fraction: f64,
    /// Wait after the first failure.
    pub initial_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        Self {
            earliest_fraction: 0.45,
            latest_fraction: 0.55,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RenewalPolicy {
    /// The instant to renew a certificate valid over `validity`:
    /// `not_before + lifetime * f` with `f` between the two fractions, chosen
    /// by `jitter_sample` (0 gives the earliest point, 1 the latest).
    pub fn renewal_due(&self, validity: Validity, jitter_sample: f64) -> SystemTime {
        let Ok(lifetime) = validity.not_after.duration_since(validity.not_before) else {
            return validity.not_before;
        };
        let lo = self.earliest_fraction.clamp(0.0, 1.0);
        let hi = self.latest_fraction.clamp(lo, 1.0);
        let fraction = lo + (hi - lo) * unit(jitter_sample);
        validity.not_before + lifetime.mul_f64(fraction)
    }

    /// The wait before retrying after `failures` consecutive failures (≥ 1):
    /// `initial * 2^(failures-1)` capped at `max`, then jittered into its
    /// upper half by `jitter_sample`.
    pub fn backoff(&self, failures: u32, jitter_sample: f64) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff);
        base / 2 + (base / 2).mul_f64(unit(jitter_sample))
    }
}

/// [`RenewalPolicy::renewal_due`] with the default policy (45–55 % of the lifetime).
pub fn renewal_due(
    not_before: SystemTime,
    not_after: SystemTime,
    jitter_sample: f64,
) -> SystemTime {
    RenewalPolicy::default().renewal_due(
        Validity {
            not_before,
            not_after,
        },
        jitter_sample,
    )
}

/// How the current certificate stands at some instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateStatus {
    /// Valid, and not yet time to renew.
    Valid,
    /// Valid, and renewal is due (or being retried).
    RenewalDue,
    /// Not valid yet (the local clock is behind the CA's).
    NotYetValid,
    /// Expired: the certificate can no longer authenticate; re-enroll.
    Expired,
}

/// Renewal health, for metrics and the heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenewalHealth {
    /// Status of the current certificate.
    pub status: CertificateStatus,
    /// End of the current certificate's validity.
    pub not_after: SystemTime,
    /// Failed attempts since the last success.
    pub consecutive_failures: u32,
    /// The last failure's message, cleared by a success.
    pub last_error: Option<String>,
    /// When the next attempt is due.
    pub next_attempt: SystemTime,
}

/// A "new" certificate that was refused because it is not valid now; the
/// current certificate was kept and the refusal counted as a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the renewed certificate is not valid now; keeping the current one")]
pub struct NotValidNow;

/// The renewal state machine of one certificate.
#[derive(Clone, Debug)]
pub struct RenewalState {
    policy: RenewalPolicy,
    current: Validity,
    renew_at: SystemTime,
    next_attempt: SystemTime,
    consecutive_failures: u32,
    last_error: Option<String>,
}

impl RenewalState {
    /// Starts tracking a certificate valid over `current`.
    pub fn new(policy: RenewalPolicy, current: Validity, jitter_sample: f64) -> Self {
        let renew_at = policy.renewal_due(current, jitter_sample);
        Self {
            policy,
            current,
            renew_at,
            next_attempt: renew_at,
            consecutive_failures: 0,
            last_error: None,
        }
    }

    /// The certificate currently in use.
    pub fn current(&self) -> Validity {
        self.current
    }

    /// When renewal of the current certificate becomes due.
    pub fn renew_at(&self) -> SystemTime {
        self.renew_at
    }

    /// When the renewal loop should next try (sleep until then).
    pub fn next_attempt(&self) -> SystemTime {
        self.next_attempt
    }

    /// Whether an attempt should be made at `now`.
    pub fn should_attempt(&self, now: SystemTime) -> bool {
        now >= self.next_attempt
    }

    /// Status of the current certificate at `now`.
    pub fn status(&self, now: SystemTime) -> CertificateStatus {
        if now > self.current.not_after {
            CertificateStatus::Expired
        } else if now < self.current.not_before {
            CertificateStatus::NotYetValid
        } else if now >= self.renew_at {
            CertificateStatus::RenewalDue
        } else {
            CertificateStatus::Valid
        }
    }

    /// Records a successful renewal to a certificate valid over `renewed`.
    /// If `renewed` is not valid at `now`, the current certificate is kept,
    /// the attempt counts as a failure, and [`NotValidNow`] is returned:
    /// do not install the new certificate then.
    pub fn record_success(
        &mut self,
        renewed: Validity,
        now: SystemTime,
        jitter_sample: f64,
    ) -> Result<(), NotValidNow> {
        if !renewed.contains(now) {
            self.record_failure(now, &NotValidNow, jitter_sample);
            return Err(NotValidNow);
        }
        *self = Self::new(self.policy, renewed, jitter_sample);
        Ok(())
    }

    /// Records a failed attempt at `now`. The current certificate is kept
    /// (it is never discarded here); returns the time of the next attempt.
    pub fn record_failure(
        &mut self,
        now: SystemTime,
        error: &dyn std::fmt::Display,
        jitter_sample: f64,
    ) -> SystemTime {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.last_error = Some(error.to_string());
        self.next_attempt = now
            + self
                .policy
                .backoff(self.consecutive_failures, jitter_sample);
        self.next_attempt
    }

    /// Health at `now`, for metrics and the heartbeat.
    pub fn health(&self, now: SystemTime) -> RenewalHealth {
        RenewalHealth {
            status: self.status(now),
            not_after: self.current.not_after,
            consecutive_failures: self.consecutive_failures,
            last_error: self.last_error.clone(),
            next_attempt: self.next_attempt,
        }
    }
}

/// Clamps a jitter sample into `[0, 1]` (NaN becomes the midpoint).
fn unit(sample: f64) -> f64 {
    if sample.is_nan() {
        0.5
    } else {
        sample.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn day_cert(start: SystemTime) -> Validity {
        Validity {
            not_before: start,
            not_after: start + 24 * HOUR,
        }
    }

    #[test]
    fn renewal_is_due_at_jittered_half_life() {
        let v = day_cert(t0());
        assert_eq!(
            renewal_due(v.not_before, v.not_after, 0.0),
            t0() + HOUR.mul_f64(24.0 * 0.45)
        );
        assert_eq!(
            renewal_due(v.not_before, v.not_after, 0.5),
            t0() + 12 * HOUR
        );
        assert_eq!(
            renewal_due(v.not_before, v.not_after, 1.0),
            t0() + HOUR.mul_f64(24.0 * 0.55)
        );
        // Out-of-range and NaN samples are clamped, never panicking.
        assert_eq!(
            renewal_due(v.not_before, v.not_after, 7.0),
            t0() + HOUR.mul_f64(24.0 * 0.55)
        );
        assert_eq!(
            renewal_due(v.not_before, v.not_after, f64::NAN),
            t0() + 12 * HOUR
        );
        // An inverted validity renews immediately.
        assert_eq!(renewal_due(v.not_after, v.not_before, 0.5), v.not_after);
    }

    #[test]
    fn jitter_spreads_a_fleet_within_the_window() {
        let v = day_cert(t0());
        let lo = t0() + HOUR.mul_f64(24.0 * 0.45);
        let hi = t0() + HOUR.mul_f64(24.0 * 0.55);
        let times: Vec<_> = (0..=10)
            .map(|i| renewal_due(v.not_before, v.not_after, f64::from(i) / 10.0))
            .collect();
        assert!(times.iter().all(|t| *t >= lo && *t <= hi));
        assert!(times.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RenewalPolicy::default();
        assert_eq!(p.backoff(1, 1.0), Duration::from_secs(1));
        assert_eq!(p.backoff(2, 1.0), Duration::from_secs(2));
        assert_eq!(p.backoff(3, 1.0), Duration::from_secs(4));
        assert_eq!(p.backoff(6, 1.0), Duration::from_secs(30));
        assert_eq!(p.backoff(1000, 1.0), Duration::from_secs(30));
        assert_eq!(p.backoff(1000, 0.0), Duration::from_secs(15));
        assert_eq!(p.backoff(0, 1.0), Duration::from_secs(1));
    }

    #[test]
    fn status_follows_the_clock() {
        let state = RenewalState::new(RenewalPolicy::default(), day_cert(t0()), 0.5);
        assert_eq!(state.status(t0() - HOUR), CertificateStatus::NotYetValid);
        assert_eq!(state.status(t0() + HOUR), CertificateStatus::Valid);
        assert!(!state.should_attempt(t0() + HOUR));
        assert_eq!(
            state.status(t0() + 12 * HOUR),
            CertificateStatus::RenewalDue
        );
        assert!(state.should_attempt(t0() + 12 * HOUR));
        assert_eq!(
            state.status(t0() + 24 * HOUR),
            CertificateStatus::RenewalDue
        );
        assert_eq!(
            state.status(t0() + 24 * HOUR + Duration::from_secs(1)),
            CertificateStatus::Expired
        );
    }

    #[test]
    fn failures_keep_the_certificate_and_back_off_until_it_expires() {
        let original = day_cert(t0());
        let mut state = RenewalState::new(RenewalPolicy::default(), original, 0.5);
        let mut now = state.next_attempt();
        // The control plane is down for the rest of the certificate's life.
        while now <= original.not_after {
            let next = state.record_failure(now, &"connection refused", 1.0);
            assert!(next > now && next.duration_since(now).unwrap() <= Duration::from_secs(30));
            assert_eq!(
                state.current(),
                original,
                "a failure must not discard the certificate"
            );
            now = next;
        }
        let health = state.health(now);
        assert_eq!(health.status, CertificateStatus::Expired);
        assert!(health.consecutive_failures > 100);
        assert_eq!(health.last_error.as_deref(), Some("connection refused"));
    }

    #[test]
    fn success_after_outage_installs_the_new_certificate_and_resets() {
        let mut state = RenewalState::new(RenewalPolicy::default(), day_cert(t0()), 0.5);
        let outage_start = state.next_attempt();
        let retry = state.record_failure(outage_start, &"unavailable", 1.0);
        assert_eq!(retry, outage_start + Duration::from_secs(1));
        let retry = state.record_failure(retry, &"unavailable", 1.0);
        assert_eq!(state.health(retry).consecutive_failures, 2);

        let renewed = day_cert(retry);
        state.record_success(renewed, retry, 0.0).unwrap();
        assert_eq!(state.current(), renewed);
        assert_eq!(state.health(retry).consecutive_failures, 0);
        assert_eq!(state.health(retry).last_error, None);
        assert_eq!(state.status(retry), CertificateStatus::Valid);
        assert_eq!(state.next_attempt(), retry + HOUR.mul_f64(24.0 * 0.45));
    }

    #[test]
    fn a_renewed_certificate_that_is_not_valid_now_is_refused() {
        let original = day_cert(t0());
        let mut state = RenewalState::new(RenewalPolicy::default(), original, 0.5);
        let now = t0() + 12 * HOUR;
        let already_expired = Validity {
            not_before: t0(),
            not_after: t0() + HOUR,
        };
        assert_eq!(
            state.record_success(already_expired, now, 0.5),
            Err(NotValidNow)
        );
        assert_eq!(state.current(), original);
        assert_eq!(state.health(now).consecutive_failures, 1);
        let from_the_future = day_cert(now + HOUR);
        assert_eq!(
            state.record_success(from_the_future, now, 0.5),
            Err(NotValidNow)
        );
        assert_eq!(state.current(), original);
    }
}
