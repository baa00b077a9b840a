//! DNS queries: a `cgroup_skb/egress` program on the guarded cgroup sees
//! every datagram its processes send. UDP datagrams to port 53 have their
//! addresses and the start of the DNS message copied to the bulk ring buffer;
//! user space parses the question. The program never drops a packet.

use agent_common::{DnsEvent, DropReason, EventKind, DNS_PAYLOAD_CAPACITY};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns, bpf_skb_load_bytes},
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};

use crate::maps::{bulk_sampled_out, count_drop, BULK_EVENTS};

/// `cgroup_skb` verdict that lets the packet through.
const PASS: i32 = 1;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const DNS_PORT: u16 = 53;
const UDP_HEADER_LEN: u32 = 8;
const IPV6_HEADER_LEN: u32 = 40;
/// Fragment offset bits of the IPv4 `frag_off` field (host order).
const IPV4_FRAGMENT_OFFSET: u16 = 0x1fff;

#[cgroup_skb(egress)]
pub fn dns_egress(ctx: SkBuffContext) -> i32 {
    let _ = try_dns_egress(&ctx);
    PASS
}

/// Where the network header says the UDP header is, and the addresses.
struct Datagram {
    ip_version: u32,
    udp_offset: u32,
    source: [u8; 16],
    destination: [u8; 16],
}

#[inline(always)]
fn try_dns_egress(ctx: &SkBuffContext) -> Result<(), i64> {
    // SAFETY: reading a field of the context the program was given.
    let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let datagram = match protocol {
        ETH_P_IP => ipv4_datagram(ctx)?,
        ETH_P_IPV6 => ipv6_datagram(ctx)?,
        _ => return Ok(()),
    };
    let Some(datagram) = datagram else {
        return Ok(());
    };
    let ports: [u16; 2] = ctx.load(datagram.udp_offset as usize)?;
    if u16::from_be(ports[1]) != DNS_PORT {
        return Ok(());
    }
    if bulk_sampled_out() {
        return Ok(());
    }
    let payload_offset = datagram.udp_offset + UDP_HEADER_LEN;
    let Some(mut entry) = BULK_EVENTS.reserve::<DnsEvent>(0) else {
        count_drop(DropReason::BulkRingFull);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    // SAFETY: `event` points at the reserved record, exclusively ours until
    // it is submitted or discarded; every field is written before submit.
    unsafe {
        (*event).header.kind = EventKind::Dns as u32;
        (*event).header.flags = 0;
        (*event).header.boot_ns = bpf_ktime_get_boot_ns();
        (*event).pid = (pid_tgid >> 32) as u32;
        (*event).tid = pid_tgid as u32;
        (*event).uid = uid_gid as u32;
        (*event).gid = (uid_gid >> 32) as u32;
        (*event).cgroup_id = bpf_get_current_cgroup_id();
        (*event).ip_version = datagram.ip_version;
        (*event).source_port = u16::from_be(ports[0]);
        (*event).destination_port = DNS_PORT;
        (*event).source = datagram.source;
        (*event).destination = datagram.destination;
        let message_len = ctx.len().saturating_sub(payload_offset);
        (*event).message_len = message_len;
        (*event).payload_len = 0;
        if message_len > 0 {
            let copy = if message_len as usize > DNS_PAYLOAD_CAPACITY {
                DNS_PAYLOAD_CAPACITY as u32
            } else {
                message_len
            };
            // The verifier needs the length provably in 1..=capacity: hide
            // what the compiler knows, then bound it with the mask, which
            // leaves every value of 1..=capacity unchanged.
            let copy = (core::hint::black_box(copy).wrapping_sub(1)
                & (DNS_PAYLOAD_CAPACITY as u32 - 1))
                + 1;
            if bpf_skb_load_bytes(
                ctx.skb.skb.cast(),
                payload_offset,
                (*event).payload.as_mut_ptr().cast(),
                copy,
            ) == 0
            {
                (*event).payload_len = copy;
            }
        }
    }
    entry.submit(0);
    Ok(())
}

#[inline(always)]
fn ipv4_datagram(ctx: &SkBuffContext) -> Result<Option<Datagram>, i64> {
    let version_ihl: u8 = ctx.load(0)?;
    let protocol: u8 = ctx.load(9)?;
    let fragment: u16 = ctx.load(6)?;
    // Later fragments carry no UDP header.
    if version_ihl >> 4 != 4
        || protocol != IPPROTO_UDP
        || u16::from_be(fragment) & IPV4_FRAGMENT_OFFSET != 0
    {
        return Ok(None);
    }
    let mut source = [0u8; 16];
    let mut destination = [0u8; 16];
    let addresses: [u8; 8] = ctx.load(12)?;
    source[..4].copy_from_slice(&addresses[..4]);
    destination[..4].copy_from_slice(&addresses[4..]);
    Ok(Some(Datagram {
        ip_version: 4,
        udp_offset: u32::from(version_ihl & 0x0f) * 4,
        source,
        destination,
    }))
}

#[inline(always)]
fn ipv6_datagram(ctx: &SkBuffContext) -> Result<Option<Datagram>, i64> {
    // Only datagrams whose first header is UDP: DNS over IPv6 does not use
    // extension headers in practice.
    let next_header: u8 = ctx.load(6)?;
    if next_header != IPPROTO_UDP {
        return Ok(None);
    }
    Ok(Some(Datagram {
        ip_version: 6,
        udp_offset: IPV6_HEADER_LEN,
        source: ctx.load(8)?,
        destination: ctx.load(24)?,
    }))
}
