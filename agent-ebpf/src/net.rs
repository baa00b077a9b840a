//! TCP connections: `sock/inet_sock_set_state`. Connect attempts and listens
//! happen in the owner's context and record the owner by socket; results,
//! accepted handshakes and closes happen in softirq context and find their
//! owner in the maps.

use agent_common::{
    DropReason, EventHeader, EventKind, SocketOwner, TcpAction, TcpEvent, FLAG_BYTES_UNKNOWN,
    FLAG_OWNER_UNKNOWN, OPT_TCP_BYTES,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns},
    },
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::maps::{count_drop, kernel_offsets, CRITICAL_EVENTS, TCP_LISTENERS, TCP_SOCKETS};

// Record layout of inet_sock_set_state (stable since 4.16).
const TP_SKADDR: usize = 8;
const TP_OLDSTATE: usize = 16;
const TP_NEWSTATE: usize = 20;
const TP_SPORT: usize = 24;
const TP_DPORT: usize = 26;
const TP_FAMILY: usize = 28;
const TP_PROTOCOL: usize = 30;
const TP_SADDR: usize = 32;
const TP_DADDR: usize = 36;
const TP_SADDR_V6: usize = 40;
const TP_DADDR_V6: usize = 56;

const IPPROTO_TCP: u16 = 6;
/// `sk_shutdown` bit set when the peer's FIN arrived.
const RCV_SHUTDOWN: u8 = 1;
const AF_INET: u16 = 2;

// include/net/tcp_states.h
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    try_inet_sock_set_state(&ctx).unwrap_or(1)
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<u32, i64> {
    // SAFETY (all reads below): in-bounds fields of the tracepoint record.
    let protocol: u16 = unsafe { ctx.read_at(TP_PROTOCOL) }?;
    if protocol != IPPROTO_TCP {
        return Ok(0);
    }
    let old: i32 = unsafe { ctx.read_at(TP_OLDSTATE) }?;
    let new: i32 = unsafe { ctx.read_at(TP_NEWSTATE) }?;
    let skaddr: u64 = unsafe { ctx.read_at(TP_SKADDR) }?;
    let local_port: u16 = unsafe { ctx.read_at(TP_SPORT) }?;
    let now = unsafe { bpf_ktime_get_boot_ns() };

    let (action, owner) = match (old, new) {
        (_, TCP_SYN_SENT) => {
            let owner = current_owner(now);
            TCP_SOCKETS.insert(skaddr, owner, 0).ok();
            (TcpAction::ConnectAttempt, Some(owner))
        }
        (_, TCP_LISTEN) => {
            let owner = current_owner(now);
            TCP_LISTENERS.insert(local_port as u32, owner, 0).ok();
            (TcpAction::Listen, Some(owner))
        }
        (TCP_LISTEN, TCP_CLOSE) => {
            TCP_LISTENERS.remove(local_port as u32).ok();
            return Ok(0);
        }
        (TCP_SYN_SENT, TCP_ESTABLISHED) => {
            let owner = TCP_SOCKETS.get_ptr_mut(skaddr).map(|owner| {
                // SAFETY: a valid map value pointer.
                unsafe {
                    (*owner).since_boot_ns = now;
                    *owner
                }
            });
            (TcpAction::Connected, owner)
        }
        (TCP_SYN_SENT, TCP_CLOSE) => {
            // SAFETY: copied out before removal.
            let owner = unsafe { TCP_SOCKETS.get(skaddr) }.copied();
            TCP_SOCKETS.remove(skaddr).ok();
            (TcpAction::ConnectFailed, owner)
        }
        (TCP_SYN_RECV, TCP_ESTABLISHED) => {
            // SAFETY: copied out of the map.
            let owner = unsafe { TCP_LISTENERS.get(local_port as u32) }
                .copied()
                .map(|mut owner| {
                    owner.since_boot_ns = now;
                    owner
                });
            if let Some(owner) = owner {
                TCP_SOCKETS.insert(skaddr, owner, 0).ok();
            }
            (TcpAction::Accepted, owner)
        }
        (_, TCP_CLOSE) => {
            // SAFETY: copied out before removal.
            let Some(owner) = (unsafe { TCP_SOCKETS.get(skaddr) }).copied() else {
                // Never established (or opened before the agent): no event.
                return Ok(0);
            };
            TCP_SOCKETS.remove(skaddr).ok();
            (TcpAction::Closed, Some(owner))
        }
        _ => return Ok(0),
    };

    let mut event = TcpEvent {
        header: EventHeader {
            kind: EventKind::Tcp as u32,
            flags: 0,
            boot_ns: now,
        },
        action: action as u32,
        local_port,
        remote_port: unsafe { ctx.read_at(TP_DPORT) }?,
        family: unsafe { ctx.read_at(TP_FAMILY) }?,
        ..TcpEvent::default()
    };
    match owner {
        Some(owner) => {
            event.pid = owner.pid;
            event.uid = owner.uid;
            event.gid = owner.gid;
            event.cgroup_id = owner.cgroup_id;
            if action == TcpAction::Closed {
                event.duration_ns = now.saturating_sub(owner.since_boot_ns);
            }
        }
        None => event.header.flags |= FLAG_OWNER_UNKNOWN,
    }
    if event.family == AF_INET {
        let saddr: [u8; 4] = unsafe { ctx.read_at(TP_SADDR) }?;
        let daddr: [u8; 4] = unsafe { ctx.read_at(TP_DADDR) }?;
        event.local_addr[..4].copy_from_slice(&saddr);
        event.remote_addr[..4].copy_from_slice(&daddr);
    } else {
        event.local_addr = unsafe { ctx.read_at(TP_SADDR_V6) }?;
        event.remote_addr = unsafe { ctx.read_at(TP_DADDR_V6) }?;
    }
    if action == TcpAction::Closed {
        let offsets = kernel_offsets();
        let sk = skaddr as *const u8;
        let counters = if offsets.optional & OPT_TCP_BYTES != 0 {
            // SAFETY: probe reads of the socket being closed.
            unsafe {
                (
                    bpf_probe_read_kernel(sk.add(offsets.tcp_bytes_sent as usize) as *const u64),
                    bpf_probe_read_kernel(sk.add(offsets.tcp_bytes_received as usize) as *const u64),
                    bpf_probe_read_kernel(sk.add(offsets.sock_shutdown as usize) as *const u8),
                )
            }
        } else {
            (Err(0), Err(0), Err(0))
        };
        match counters {
            (Ok(sent), Ok(received), Ok(shutdown)) => {
                event.bytes_sent = sent;
                // rcv_nxt advanced by one for the peer's FIN (RCV_SHUTDOWN).
                event.bytes_received = received.saturating_sub(u64::from(shutdown & RCV_SHUTDOWN));
            }
            _ => event.header.flags |= FLAG_BYTES_UNKNOWN,
        }
    }
    if CRITICAL_EVENTS.output::<TcpEvent>(&event, 0).is_err() {
        count_drop(DropReason::CriticalRingFull);
    }
    Ok(0)
}

#[inline(always)]
fn current_owner(now: u64) -> SocketOwner {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    SocketOwner {
        pid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        _reserved: 0,
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        since_boot_ns: now,
    }
}
