//! Handing freed heap memory back to the kernel.
//!
//! glibc's malloc (the agent's allocator on Debian; elsewhere this module
//! does nothing) keeps the memory the agent frees mapped, and counted in
//! its resident set, for reuse: after start-up, parsing the kernel's BTF
//! leaves about 25 MB of it behind; after a burst of events, the peak of
//! the queues and caches. `malloc_trim` releases the free pages. The agent
//! trims once its sensors are attached, and whenever the self-budget's
//! measurement finds it quiet (under half its CPU budget) with more than
//! [`SLACK_BYTES`] resident that malloc does not have in use.

/// Resident anonymous memory beyond what malloc has in use that is worth a
/// trim (a trim walks the free lists: not something to do every second for
/// a few pages).
pub const SLACK_BYTES: u64 = 8 << 20;

/// Bytes malloc has handed out and not had back (every arena, and the
/// large allocations it maps directly).
#[cfg(target_env = "gnu")]
pub fn in_use_bytes() -> u64 {
    // SAFETY: mallinfo2 only reads malloc's statistics.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

/// Other C libraries: nothing is known, so nothing is ever worth a trim.
#[cfg(not(target_env = "gnu"))]
pub fn in_use_bytes() -> u64 {
    u64::MAX
}

/// Whether `anon_rss` (resident anonymous bytes) holds more than
/// [`SLACK_BYTES`] beyond `in_use`.
pub fn worth_trimming(anon_rss: u64, in_use: u64) -> bool {
    anon_rss > in_use.saturating_add(SLACK_BYTES)
}

/// Returns the free pages of every malloc arena to the kernel.
pub fn trim() {
    // SAFETY: malloc_trim is safe to call at any time from any thread.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident anonymous bytes of this process (`RssAnon`).
pub fn anon_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Trims when [`worth_trimming`] with `anon_rss` measured by the caller;
/// whether it trimmed.
pub fn trim_if_worthwhile(anon_rss: u64) -> bool {
    if !worth_trimming(anon_rss, in_use_bytes()) {
        return false;
    }
    trim();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_real_slack_is_worth_a_trim() {
        assert!(!worth_trimming(10 << 20, 9 << 20));
        assert!(!worth_trimming((9 << 20) + SLACK_BYTES, 9 << 20));
        assert!(worth_trimming((9 << 20) + SLACK_BYTES + 1, 9 << 20));
        assert!(!worth_trimming(1, u64::MAX), "no overflow");
    }

    #[test]
    #[cfg(target_env = "gnu")]
    fn a_trim_gives_freed_memory_back() {
        // 64 MiB in small blocks (malloc's heap, not direct maps), touched
        // so it is resident, then freed but for one block allocated after
        // them, which keeps malloc from shrinking its heap by itself.
        let blocks: Vec<Vec<u8>> = (0..64 * 1024).map(|_| vec![1u8; 1024]).collect();
        let pin = vec![2u8; 1024];
        drop(blocks);
        let before = anon_rss().expect("RssAnon");
        assert!(
            worth_trimming(before, in_use_bytes()),
            "64 MiB freed should be slack: rss {before}, in use {}",
            in_use_bytes()
        );
        trim();
        let after = anon_rss().expect("RssAnon");
        assert!(
            before.saturating_sub(after) >= 32 << 20,
            "the trim gave back only {} bytes",
            before.saturating_sub(after)
        );
        assert_eq!(pin[0], 2);
    }
}
