//! Connection verdicts: cgroup `connect4`/`connect6` programs on the
//! guarded cgroup look the destination up in the verdict map the agent
//! fills from policy (longest prefix first, the exact port before any
//! port), fall back to the policy's default, and deny (EPERM), allow, or
//! allow and record a would-be denial (dry run). Every denial and dry-run
//! hit, and allowed connections when the policy asks, becomes a decision
//! event in the critical ring.

use agent_common::{
    DecisionEvent, DropReason, EventHeader, EventKind, GuardSettings, Verdict, VerdictAction,
    VerdictKey, DEFAULT_RULE, VERDICTS_CAPACITY, VERDICT_KEY_ADDR_OFFSET_BITS,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns},
    },
    macros::{cgroup_sock_addr, map},
    maps::{lpm_trie::Key, Array, LpmTrie},
    programs::SockAddrContext,
};

use crate::maps::{count_drop, CRITICAL_EVENTS};

/// `cgroup_sock_addr` verdicts.
const REFUSE: i32 = 0;
const PASS: i32 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[map(name = "VERDICTS")]
static VERDICTS: LpmTrie<VerdictKey, Verdict> = LpmTrie::with_max_entries(VERDICTS_CAPACITY, 0);

#[map(name = "GUARD_SETTINGS")]
static GUARD_SETTINGS: Array<GuardSettings> = Array::with_max_entries(1, 0);

#[cgroup_sock_addr(connect4)]
pub fn guard_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context the kernel passed; connect4 may read these fields.
    let (port, ip, protocol) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_port, sa.user_ip4, sa.protocol)
    };
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip.to_ne_bytes());
    decide(port as u16, AF_INET, addr, 32, protocol)
}

#[cgroup_sock_addr(connect6)]
pub fn guard_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above; connect6 may read the IPv6 words.
    let (port, ip, protocol) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            sa.user_port,
            [
                sa.user_ip6[0],
                sa.user_ip6[1],
                sa.user_ip6[2],
                sa.user_ip6[3],
            ],
            sa.protocol,
        )
    };
    let mut addr = [0u8; 16];
    for (i, word) in ip.iter().enumerate() {
        addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    decide(port as u16, AF_INET6, addr, 128, protocol)
}

/// `port_be` in network order, as the kernel hands it over.
#[inline(always)]
fn decide(port_be: u16, family: u16, addr: [u8; 16], addr_bits: u32, protocol: u32) -> i32 {
    let Some(settings) = GUARD_SETTINGS.get(0).copied() else {
        return PASS;
    };
    if settings.default_action == 0 {
        return PASS;
    }
    let exact = Key::new(
        VERDICT_KEY_ADDR_OFFSET_BITS + addr_bits,
        VerdictKey {
            port: port_be,
            family,
            addr,
        },
    );
    let any_port = Key::new(
        VERDICT_KEY_ADDR_OFFSET_BITS + addr_bits,
        VerdictKey {
            port: 0,
            family,
            addr,
        },
    );
    let verdict = VERDICTS
        .get(&exact)
        .or_else(|| VERDICTS.get(&any_port))
        .copied()
        .unwrap_or(Verdict {
            action: settings.default_action,
            rule: DEFAULT_RULE,
        });
    let action = VerdictAction::from_u32(verdict.action).unwrap_or(VerdictAction::Allow);
    if action != VerdictAction::Allow || settings.record_allows != 0 {
        record(&settings, &verdict, port_be, family, addr, protocol);
    }
    match action {
        VerdictAction::Deny => REFUSE,
        VerdictAction::Allow | VerdictAction::Audit => PASS,
    }
}

#[inline(always)]
fn record(
    settings: &GuardSettings,
    verdict: &Verdict,
    port_be: u16,
    family: u16,
    addr: [u8; 16],
    protocol: u32,
) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let event = DecisionEvent {
        header: EventHeader {
            kind: EventKind::Decision as u32,
            flags: 0,
            // SAFETY: helper without arguments.
            boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        },
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        policy_version: settings.policy_version,
        action: verdict.action,
        rule: verdict.rule,
        ip_version: if family == AF_INET { 4 } else { 6 },
        port: u16::from_be(port_be),
        protocol: protocol as u16,
        addr,
    };
    if CRITICAL_EVENTS.output::<DecisionEvent>(&event, 0).is_err() {
        count_drop(DropReason::CriticalRingFull);
    }
}
