//! Connection verdicts: cgroup `connect4`/`connect6` programs on the
//! guarded cgroup look the destination up in the verdict map the agent
//! fills from policy (longest prefix first, the exact port before any
//! port), fall back to the policy's default, and deny (EPERM), allow, allow
//! and record a would-be denial (dry run), or redirect a TCP connection to
//! the agent's tunnel listener. Every denial and dry-run hit, and allowed
//! connections when the policy asks, becomes a decision event in the
//! critical ring; tunnelled connections are recorded by the tunnel, which
//! knows how they ended.
//!
//! A redirected socket's original destination is filed under its cookie at
//! `connect()`, when the kernel has not picked its local port yet; the
//! `sock_ops` program moves it under the socket's local address when the
//! kernel sends the SYN, which is the peer address the tunnel listener sees
//! when it accepts the connection.
//!
//! On the gateway side, `guard_ingress` keeps the network away from
//! protected services: TCP to a protected port is dropped unless it arrives
//! over loopback, i.e. from this host's agent.

use agent_common::{
    DecisionEvent, DropReason, EventHeader, EventKind, GuardChain, GuardSettings, TunnelOrigin,
    TunnelPeerKey, Verdict, VerdictAction, VerdictKey, CANDIDATE_DRY_RUN, DECISION_FLAG_INBOUND,
    DEFAULT_RULE, GUARD_CHAINS_CAPACITY, GUARD_CHAIN_LENGTH, PROTECTED_PORTS_CAPACITY,
    TUNNEL_ORIGINS_CAPACITY, USER_GROUPS_CAPACITY, VERDICTS_CAPACITY, VERDICT_KEY_ADDR_OFFSET_BITS,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_boot_ns,
            bpf_skb_cgroup_id,
        },
    },
    macros::{cgroup_skb, cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext},
};

use crate::maps::{count_drop, CRITICAL_EVENTS, PROCESS_BINARIES};

/// `cgroup_sock_addr` and `cgroup_skb` verdicts.
const REFUSE: i32 = 0;
const PASS: i32 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u32 = 6;
/// `BPF_SOCK_OPS_TCP_CONNECT_CB`: the kernel is about to send the SYN; the
/// socket's local port is set.
const SOCK_OPS_TCP_CONNECT: u32 = 3;
/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HEADER_LEN: usize = 40;
const IPV4_FRAGMENT_OFFSET: u16 = 0x1fff;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[map(name = "VERDICTS")]
static VERDICTS: LpmTrie<VerdictKey, Verdict> = LpmTrie::with_max_entries(VERDICTS_CAPACITY, 0);

#[map(name = "GUARD_SETTINGS")]
static GUARD_SETTINGS: Array<GuardSettings> = Array::with_max_entries(1, 0);

#[map(name = "TUNNEL_PENDING")]
static TUNNEL_PENDING: LruHashMap<u64, TunnelOrigin> =
    LruHashMap::with_max_entries(TUNNEL_ORIGINS_CAPACITY, 0);

#[map(name = "TUNNEL_ORIGINS")]
static TUNNEL_ORIGINS: LruHashMap<TunnelPeerKey, TunnelOrigin> =
    LruHashMap::with_max_entries(TUNNEL_ORIGINS_CAPACITY, 0);

#[map(name = "GUARD_CHAINS")]
static GUARD_CHAINS: Array<GuardChain> = Array::with_max_entries(GUARD_CHAINS_CAPACITY, 0);

#[map(name = "USER_GROUPS")]
static USER_GROUPS: HashMap<u32, u64> = HashMap::with_max_entries(USER_GROUPS_CAPACITY, 0);

#[map(name = "PROTECTED_PORTS")]
static PROTECTED_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(PROTECTED_PORTS_CAPACITY, 0);

/// How a connection reached the guard.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    /// `connect()`: once per connection (TCP, or a connected UDP socket).
    Connect,
    /// `sendmsg()` with an address: once per UDP datagram, so allowed ones
    /// are never recorded (they would be every datagram).
    Datagram,
}

#[cgroup_sock_addr(connect4)]
pub fn guard_connect4(ctx: SockAddrContext) -> i32 {
    decide_v4(&ctx, Call::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn guard_connect6(ctx: SockAddrContext) -> i32 {
    decide_v6(&ctx, Call::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn guard_sendmsg4(ctx: SockAddrContext) -> i32 {
    decide_v4(&ctx, Call::Datagram)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn guard_sendmsg6(ctx: SockAddrContext) -> i32 {
    decide_v6(&ctx, Call::Datagram)
}

#[inline(always)]
fn decide_v4(ctx: &SockAddrContext, call: Call) -> i32 {
    // SAFETY: the context the kernel passed; connect4 and sendmsg4 may read
    // these fields.
    let (port, ip, protocol) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_port, sa.user_ip4, sa.protocol)
    };
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip.to_ne_bytes());
    decide(ctx, call, port as u16, AF_INET, addr, 32, protocol)
}

#[inline(always)]
fn decide_v6(ctx: &SockAddrContext, call: Call) -> i32 {
    // SAFETY: as above; the v6 hooks may read the IPv6 words.
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
    decide(ctx, call, port as u16, AF_INET6, addr, 128, protocol)
}

/// `port_be` in network order, as the kernel hands it over.
#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    call: Call,
    port_be: u16,
    family: u16,
    addr: [u8; 16],
    addr_bits: u32,
    protocol: u32,
) -> i32 {
    let Some(settings) = GUARD_SETTINGS.get(0).copied() else {
        return PASS;
    };
    if settings.default_action == 0 {
        return PASS;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == settings.agent_tgid {
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
    let default = Verdict {
        action: settings.default_action,
        rule: DEFAULT_RULE,
    };
    let mut verdict = VERDICTS
        .get(&exact)
        .or_else(|| VERDICTS.get(&any_port))
        .copied()
        .unwrap_or(default);
    if verdict.action == VerdictAction::Chain as u32 {
        verdict = walk_chain(verdict.rule, (pid_tgid >> 32) as u32, default);
    }
    let action = VerdictAction::from_u32(verdict.action).unwrap_or(VerdictAction::Allow);
    if action == VerdictAction::Tunnel {
        if call == Call::Connect
            && protocol == IPPROTO_TCP
            && redirect(ctx, &settings, &verdict, port_be, family, addr)
        {
            return PASS;
        }
        // Not TCP, no listener, or no room to remember the destination:
        // a connection the policy wants tunnelled never goes out directly.
        // (Recorded as a tunnel verdict: only refusals are.)
        record(&settings, &verdict, port_be, family, addr, protocol);
        return REFUSE;
    }
    if action != VerdictAction::Allow || (settings.record_allows != 0 && call == Call::Connect) {
        record(&settings, &verdict, port_be, family, addr, protocol);
    }
    match action {
        VerdictAction::Deny => REFUSE,
        // A chain always resolves to one of the others; a corrupt one passes
        // as the default would not be known either.
        VerdictAction::Allow
        | VerdictAction::Audit
        | VerdictAction::Tunnel
        | VerdictAction::Chain => PASS,
    }
}

/// Walks chain `index` with the caller's user-group bits (by uid) and
/// binary-group bits (by tgid, set at exec): the first enforced candidate
/// that matches decides; an allow that a dry-run candidate before it would
/// deny passes as audit, naming the dry-run rule; with no enforced match,
/// the default (audited the same way).
#[inline(always)]
fn walk_chain(index: u32, tgid: u32, default: Verdict) -> Verdict {
    let Some(chain) = GUARD_CHAINS.get(index) else {
        return default;
    };
    let uid = bpf_get_current_uid_gid() as u32;
    // SAFETY: the values are copied out at once; a concurrent update from
    // user space can only make them stale, never invalid.
    let users = unsafe { USER_GROUPS.get(&uid) }.copied().unwrap_or(0);
    // SAFETY: as above.
    let binaries = unsafe { PROCESS_BINARIES.get(&tgid) }.copied().unwrap_or(0);
    let mut would: Option<Verdict> = None;
    let mut decided = default;
    let len = chain.len as usize;
    for i in 0..GUARD_CHAIN_LENGTH {
        if i >= len {
            break;
        }
        let Some(c) = chain.candidates.get(i) else {
            break;
        };
        let matches = (c.users == 0 || c.users & users != 0)
            && (c.binaries == 0 || c.binaries & binaries != 0)
            && c.except_users & users == 0
            && c.except_binaries & binaries == 0;
        if !matches {
            continue;
        }
        let candidate = Verdict {
            action: c.action,
            rule: c.rule,
        };
        if c.flags & CANDIDATE_DRY_RUN != 0 {
            if would.is_none() {
                would = Some(candidate);
            }
            continue;
        }
        decided = candidate;
        if would.is_none() {
            would = Some(candidate);
        }
        break;
    }
    match would {
        Some(w)
            if decided.action == VerdictAction::Allow as u32
                && w.action == VerdictAction::Deny as u32 =>
        {
            Verdict {
                action: VerdictAction::Audit as u32,
                rule: w.rule,
            }
        }
        _ => decided,
    }
}

/// Points the connection at the agent's tunnel listener on loopback and
/// files where it was going under the socket's cookie.
#[inline(always)]
fn redirect(
    ctx: &SockAddrContext,
    settings: &GuardSettings,
    verdict: &Verdict,
    port_be: u16,
    family: u16,
    addr: [u8; 16],
) -> bool {
    if settings.tunnel_port == 0 {
        return false;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let origin = TunnelOrigin {
        addr,
        port: u16::from_be(port_be),
        ip_version: if family == AF_INET { 4 } else { 6 },
        rule: verdict.rule,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        // SAFETY: helpers without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        policy_version: settings.policy_version,
        // SAFETY: as above.
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
    };
    // SAFETY: the context the kernel passed, a socket address context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if TUNNEL_PENDING.insert(&cookie, &origin, 0).is_err() {
        return false;
    }
    // SAFETY: connect4/connect6 may write the destination.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        if family == AF_INET {
            sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        } else {
            sa.user_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        }
        sa.user_port = u32::from(settings.tunnel_port);
    }
    true
}

/// Moves a redirected socket's original destination from its cookie to its
/// local address once the kernel has picked the port.
#[sock_ops]
pub fn tunnel_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != SOCK_OPS_TCP_CONNECT {
        return 1;
    }
    // SAFETY: the context the kernel passed.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some(origin) = (unsafe { TUNNEL_PENDING.get(&cookie) }).copied() else {
        return 1;
    };
    let mut key = TunnelPeerKey {
        addr: [0; 16],
        port: ctx.local_port() as u16,
        ip_version: origin.ip_version,
    };
    if ctx.family() == u32::from(AF_INET) {
        key.addr[..4].copy_from_slice(&ctx.local_ip4().to_ne_bytes());
        key.ip_version = 4;
    } else {
        for (i, word) in ctx.local_ip6().iter().enumerate() {
            key.addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        key.ip_version = 6;
    }
    // A full map evicts its oldest entry: a connection that was never
    // accepted, not this one.
    let _ = TUNNEL_ORIGINS.insert(&key, &origin, 0);
    let _ = TUNNEL_PENDING.remove(&cookie);
    1
}

/// Drops TCP to protected ports unless it arrives over loopback; a refused
/// connection attempt (SYN) becomes an inbound decision event.
#[cgroup_skb(ingress)]
pub fn guard_ingress(ctx: SkBuffContext) -> i32 {
    match protected_port_hit(&ctx) {
        Ok(Some(hit)) => {
            if hit.syn {
                record_inbound(&ctx, &hit);
            }
            REFUSE
        }
        _ => PASS,
    }
}

struct InboundHit {
    rule: u32,
    port: u16,
    ip_version: u32,
    source: [u8; 16],
    syn: bool,
}

#[inline(always)]
fn protected_port_hit(ctx: &SkBuffContext) -> Result<Option<InboundHit>, i64> {
    // SAFETY: reading fields of the context the program was given.
    let (ifindex, protocol) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).protocol) };
    if ifindex == LOOPBACK_IFINDEX {
        return Ok(None);
    }
    let mut source = [0u8; 16];
    let (ip_version, tcp_offset) = match u16::from_be(protocol as u16) {
        ETH_P_IP => {
            let version_ihl: u8 = ctx.load(0)?;
            let next: u8 = ctx.load(9)?;
            let fragment: u16 = ctx.load(6)?;
            if next as u32 != IPPROTO_TCP || u16::from_be(fragment) & IPV4_FRAGMENT_OFFSET != 0 {
                return Ok(None);
            }
            let from: [u8; 4] = ctx.load(12)?;
            source[..4].copy_from_slice(&from);
            (4, usize::from(version_ihl & 0x0f) * 4)
        }
        ETH_P_IPV6 => {
            let next: u8 = ctx.load(6)?;
            if next as u32 != IPPROTO_TCP {
                return Ok(None);
            }
            source = ctx.load(8)?;
            (6, IPV6_HEADER_LEN)
        }
        _ => return Ok(None),
    };
    let port = u16::from_be(ctx.load::<u16>(tcp_offset + 2)?);
    // SAFETY: a plain hash lookup; the value is copied out.
    let Some(rule) = (unsafe { PROTECTED_PORTS.get(&port) }).copied() else {
        return Ok(None);
    };
    let flags: u8 = ctx.load(tcp_offset + 13)?;
    Ok(Some(InboundHit {
        rule,
        port,
        ip_version,
        source,
        syn: flags & TCP_SYN != 0 && flags & TCP_ACK == 0,
    }))
}

#[inline(always)]
fn record_inbound(ctx: &SkBuffContext, hit: &InboundHit) {
    let settings = GUARD_SETTINGS.get(0).copied().unwrap_or_default();
    let event = DecisionEvent {
        header: EventHeader {
            kind: EventKind::Decision as u32,
            flags: DECISION_FLAG_INBOUND,
            // SAFETY: helper without arguments.
            boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        },
        pid: 0,
        tid: 0,
        uid: 0,
        gid: 0,
        // SAFETY: the socket buffer the kernel passed.
        cgroup_id: unsafe { bpf_skb_cgroup_id(ctx.skb.skb) },
        policy_version: settings.policy_version,
        action: VerdictAction::Deny as u32,
        rule: hit.rule,
        ip_version: hit.ip_version,
        port: hit.port,
        protocol: IPPROTO_TCP as u16,
        addr: hit.source,
    };
    if CRITICAL_EVENTS.output::<DecisionEvent>(&event, 0).is_err() {
        count_drop(DropReason::CriticalRingFull);
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
