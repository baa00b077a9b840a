//! The agent's self-budget: CPU and memory ceilings. Over either, the agent
//! asks the kernel to keep only 1 in N bulk events (file activity), doubling
//! N while the pressure lasts and halving it after calm; critical events
//! (exec, fork, exit, TCP) are never sampled. What sampling drops is counted
//! in the kernel and reported as gap records (`reason = "sampled"`).

use std::{fs, time::Duration};

use aya::maps::{Array, MapData};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Largest N of "keep 1 in N".
pub const MAX_KEEP_ONE_IN: u32 = 1024;
/// Intervals under half the budget before sampling is relaxed one step.
const CALM_INTERVALS: u32 = 5;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// CPU the agent may use, in percent of one core (user + system).
    pub cpu_percent: f64,
    /// Resident memory the agent may use, in MiB.
    pub memory_mib: u64,
    /// How often usage is measured.
    pub interval_ms: u64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            cpu_percent: 5.0,
            memory_mib: 256,
            interval_ms: 1000,
        }
    }
}

/// Decides the bulk sampling from measured usage. Sans-IO.
#[derive(Debug)]
pub struct BudgetController {
    cpu_percent: f64,
    memory_bytes: u64,
    keep_one_in: u32,
    calm: u32,
}

impl BudgetController {
    pub fn new(config: &BudgetConfig) -> Self {
        Self {
            cpu_percent: config.cpu_percent,
            memory_bytes: config.memory_mib.saturating_mul(1024 * 1024),
            keep_one_in: 1,
            calm: 0,
        }
    }

    pub fn keep_one_in(&self) -> u32 {
        self.keep_one_in
    }

    /// Takes one interval's usage; returns the new N when it changes.
    pub fn observe(&mut self, cpu_percent: f64, rss_bytes: u64) -> Option<u32> {
        let before = self.keep_one_in;
        if cpu_percent > self.cpu_percent || rss_bytes > self.memory_bytes {
            self.calm = 0;
            self.keep_one_in = (self.keep_one_in * 2).clamp(2, MAX_KEEP_ONE_IN);
        } else if cpu_percent < self.cpu_percent / 2.0 && self.keep_one_in > 1 {
            self.calm += 1;
            if self.calm >= CALM_INTERVALS {
                self.calm = 0;
                self.keep_one_in /= 2;
            }
        } else {
            self.calm = 0;
        }
        (self.keep_one_in != before).then_some(self.keep_one_in)
    }
}

/// This process's CPU and memory now.
struct Usage {
    /// CPU ticks, user + system.
    ticks: u64,
    /// Resident bytes.
    rss: u64,
    /// Resident anonymous bytes (resident less file-backed and shared).
    anon: u64,
}

fn own_usage() -> Option<Usage> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    let rest: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // rest[0] is field 3; utime and stime are fields 14 and 15.
    let ticks = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    let statm = fs::read_to_string("/proc/self/statm").ok()?;
    let mut fields = statm.split_whitespace().skip(1);
    let resident: u64 = fields.next()?.parse().ok()?;
    let shared: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Some(Usage {
        ticks,
        rss: resident * page,
        anon: resident.saturating_sub(shared) * page,
    })
}

/// Measures the agent every interval and writes the sampling to the kernel.
pub async fn enforce(config: BudgetConfig, mut sampling: Array<MapData, u32>) {
    let mut controller = BudgetController::new(&config);
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let interval = Duration::from_millis(config.interval_ms.max(100));
    let mut tick = tokio::time::interval(interval);
    let mut last_ticks = own_usage().map(|usage| usage.ticks);
    loop {
        tick.tick().await;
        let Some(Usage { ticks, rss, anon }) = own_usage() else {
            continue;
        };
        let Some(last_ticks) = last_ticks.replace(ticks) else {
            continue;
        };
        let cpu_percent =
            (ticks.saturating_sub(last_ticks)) as f64 / ticks_per_second / interval.as_secs_f64()
                * 100.0;
        // A burst's freed queues and caches go back to the kernel once it
        // is over: trimming while busy would only make malloc fault the
        // same pages in again.
        if cpu_percent < config.cpu_percent / 2.0 {
            crate::heap::trim_if_worthwhile(anon);
        }
        if let Some(keep_one_in) = controller.observe(cpu_percent, rss) {
            if keep_one_in > 1 {
                warn!(
                    cpu_percent,
                    rss_mib = rss / (1024 * 1024),
                    budget_cpu_percent = config.cpu_percent,
                    budget_memory_mib = config.memory_mib,
                    keep_one_in,
                    "over self-budget: sampling bulk events"
                );
            } else {
                info!(cpu_percent, "back within self-budget: all bulk events kept");
            }
            if let Err(err) = sampling.set(0, keep_one_in, 0) {
                warn!(error = %err, "cannot set bulk sampling");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> BudgetController {
        BudgetController::new(&BudgetConfig {
            cpu_percent: 10.0,
            memory_mib: 100,
            interval_ms: 1000,
        })
    }

    #[test]
    fn pressure_doubles_sampling_up_to_the_ceiling() {
        let mut c = controller();
        assert_eq!(c.observe(5.0, 0), None, "within budget");
        assert_eq!(c.observe(30.0, 0), Some(2));
        assert_eq!(c.observe(30.0, 0), Some(4));
        for _ in 0..20 {
            c.observe(30.0, 0);
        }
        assert_eq!(c.keep_one_in(), MAX_KEEP_ONE_IN);
    }

    #[test]
    fn memory_over_budget_also_samples() {
        let mut c = controller();
        assert_eq!(c.observe(0.0, 200 * 1024 * 1024), Some(2));
    }

    #[test]
    fn calm_relaxes_one_step_at_a_time() {
        let mut c = controller();
        c.observe(30.0, 0);
        c.observe(30.0, 0);
        assert_eq!(c.keep_one_in(), 4);
        for _ in 0..CALM_INTERVALS - 1 {
            assert_eq!(c.observe(1.0, 0), None);
        }
        assert_eq!(c.observe(1.0, 0), Some(2));
        // Between half and full budget: neither tighter nor looser.
        for _ in 0..10 {
            assert_eq!(c.observe(7.0, 0), None);
        }
        for _ in 0..CALM_INTERVALS - 1 {
            c.observe(1.0, 0);
        }
        assert_eq!(c.observe(1.0, 0), Some(1));
        assert_eq!(c.observe(1.0, 0), None, "all kept: nothing to relax");
    }

    #[test]
    fn reads_own_usage() {
        let usage = own_usage().expect("/proc/self is readable");
        assert!(usage.rss > 0 && usage.anon > 0 && usage.anon <= usage.rss);
    }
}
