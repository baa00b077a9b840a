//! The `main` of the end-to-end bench programs (`tests/benches/*`, harness
//! off): run only under `cargo bench`, keep the stack's files out of the
//! agents' watched `/tmp/`, bound the whole run, and turn the outcome into an
//! exit status with the error named.

use std::{future::Future, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{anyhow, Context as _, Result};

/// Runs `run` for bench `name`, giving up after `limit`.
pub fn main<F, Fut>(name: &str, limit: Duration, run: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    if !std::env::args().skip(1).any(|a| a == "--bench") {
        println!("{name}: skipped (not run by `cargo test`; run `cargo build --release --bins && cargo bench -p zt-e2e --bench {name}`)");
        return ExitCode::SUCCESS;
    }
    // Before any thread exists: the stack's files (ClickHouse's parts, the
    // logs, copies of programs) stay out of /tmp/, which every agent
    // watches for writes.
    let scratch = match scratch_dir(name) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    std::env::set_var("TMPDIR", &scratch);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        tokio::time::timeout(limit, run())
            .await
            .unwrap_or_else(|_| Err(anyhow!("gave up after {limit:?}")))
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    let _ = std::fs::remove_dir(&scratch);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `target/<name>-tmp`, next to the profile directories.
fn scratch_dir(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<bench>
    let target = exe
        .ancestors()
        .nth(3)
        .context("bench executable is not under target/<profile>/deps")?;
    let dir = target.join(format!("{}-tmp", name.replace('_', "-")));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
