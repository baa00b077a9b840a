//! Harness for end-to-end tests: real ClickHouse servers, the workspace's
//! binaries as real processes, and cgroups made for a test.

pub mod bench;
pub mod browser;
pub mod cgroup;
pub mod clickhouse;
pub mod fleet_sim;
pub mod netns;
pub mod pki;
pub mod process;
pub mod stack;
pub mod systemd_unit;
pub mod telemetry_sim;
pub mod throwaway_root;
pub mod tunnel_site;
pub mod ztctl;

use std::time::{Duration, Instant};

/// Polls `check` until it returns `Some` or `limit` passes.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
