//! In-place rewrite of addresses and ports, with incremental checksum updates (RFC 1624 via
//! `lb_common::checksum::Delta`), and the TTL / hop limit decrement of forwarding. Nothing here
//! changes the packet's length, and nothing writes past the IP datagram.
use aya_ebpf::programs::XdpContext;
use lb_common::{
    Addr, IPPROTO_TCP,
    checksum::Delta,
    net::{
        IPV4_CHECK, IPV4_DST, IPV4_SRC, IPV4_TTL, IPV6_DST, IPV6_HOP_LIMIT, IPV6_SRC, TCP_CHECK,
        UDP_CHECK,
    },
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    flow::Tuple,
    parse::{Packet, load, load_addr, ptr_at, store, store_addr},
};

/// `set_addrs` flags.
pub const V6: u32 = 1;
/// The packet is forwarded: one less TTL / hop limit (a subprogram takes at most five
/// arguments, so the two flags share one).
pub const FORWARDED: u32 = 2;

/// Sets the IP source and destination of the header at `l3` (IPv4 header checksum included),
/// decrements the TTL if `how & FORWARDED`, and returns the address change, which every checksum
/// over a pseudo-header must also take.
#[inline(never)]
pub fn set_addrs(ctx: &XdpContext, l3: usize, how: u32, addrs: &[Addr; 2]) -> Option<Delta> {
    set_addrs_inline(ctx, l3, how, addrs)
}

/// `set_addrs` without the subprogram call, for a flow's rewrite (`set_tuple`).
#[inline(always)]
fn set_addrs_inline(ctx: &XdpContext, l3: usize, how: u32, addrs: &[Addr; 2]) -> Option<Delta> {
    let [src, dst] = addrs;
    let forwarded = how & FORWARDED != 0;
    if how & V6 != 0 {
        let ip: *mut u8 = ptr_at::<Ipv6Hdr>(ctx, l3)?.cast();
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        unsafe {
            let d = Delta::ZERO
                .addr(&load_addr(ip.add(IPV6_SRC)), src)
                .addr(&load_addr(ip.add(IPV6_DST)), dst);
            store_addr(ip.add(IPV6_SRC), src);
            store_addr(ip.add(IPV6_DST), dst);
            if forwarded {
                *ip.add(IPV6_HOP_LIMIT) -= 1;
            }
            Some(d)
        }
    } else {
        let ip: *mut u8 = ptr_at::<Ipv4Hdr>(ctx, l3)?.cast();
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        unsafe {
            let (new_src, new_dst) = (src.v4_word(), dst.v4_word());
            let d = Delta::ZERO
                .u32(load(ip.add(IPV4_SRC)), new_src)
                .u32(load(ip.add(IPV4_DST)), new_dst);
            let mut header = d;
            if forwarded {
                // TTL shares a 16-bit word with the protocol.
                let old: u16 = load(ip.add(IPV4_TTL));
                let new = u16::from_ne_bytes([
                    (*ip.add(IPV4_TTL)).wrapping_sub(1),
                    *ip.add(IPV4_TTL + 1),
                ]);
                header = header.u16(old, new);
                store(ip.add(IPV4_TTL), new);
            }
            let check = ip.add(IPV4_CHECK);
            store(check, header.apply(load(check)));
            store(ip.add(IPV4_SRC), new_src);
            store(ip.add(IPV4_DST), new_dst);
            Some(d)
        }
    }
}

/// Sets the TCP or UDP ports at `l4` (wire order) and updates the transport checksum by the port
/// change plus `addr_delta` (the pseudo-header's). Returns everything that changed in this
/// header, which a checksum covering it (ICMP's, around a quoted packet) must take too. A header
/// quoted in an ICMP error may stop after the ports (`end`: where the quote ends); its checksum
/// is then left alone.
#[inline(always)]
pub fn set_ports(
    ctx: &XdpContext,
    l4: usize,
    end: usize,
    proto: u8,
    v6: bool,
    ports: u32,
    addr_delta: Delta,
) -> Option<Delta> {
    if l4 + 4 > end {
        return None;
    }
    let at: *mut u8 = ptr_at::<u32>(ctx, l4)?.cast();
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
    let port_delta = Delta::ZERO.u32(unsafe { load(at) }, ports);
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
    unsafe { store(at, ports) };
    // Everything a covering checksum sees change: the ports, and the transport checksum below.
    let mut covered = port_delta;
    let l4_delta = addr_delta.combine(port_delta);
    let check_at = l4
        + if proto == IPPROTO_TCP {
            TCP_CHECK
        } else {
            UDP_CHECK
        };
    if check_at + 2 <= end
        && let Some(check) = ptr_at::<u16>(ctx, check_at)
    {
        let check: *mut u8 = check.cast();
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        let old = unsafe { load::<u16>(check) };
        // IPv4 UDP may carry no checksum (0); IPv6 UDP always does.
        let new = if proto == IPPROTO_TCP || v6 {
            l4_delta.apply(old)
        } else {
            l4_delta.apply_udp(old)
        };
        covered = covered.u16(old, new);
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        unsafe { store(check, new) };
    }
    Some(covered)
}

/// Both ports as the one 32-bit word they make in the header (memory order).
#[inline(always)]
pub fn port_pair(sport: u16, dport: u16) -> u32 {
    u32::from(sport) | (u32::from(dport) << 16)
}

/// Full rewrite of a packet's tuple: addresses, then ports; with `forwarded`, the TTL too.
#[inline(always)]
pub fn set_tuple(ctx: &XdpContext, pkt: &Packet, t: &Tuple, forwarded: bool) -> Option<()> {
    let mut how = if pkt.v6 { V6 } else { 0 };
    if forwarded {
        how |= FORWARDED;
    }
    let d = set_addrs_inline(ctx, pkt.l3, how, &[t.src, t.dst])?;
    set_ports(
        ctx,
        pkt.l4,
        pkt.end,
        pkt.proto,
        pkt.v6,
        port_pair(t.sport, t.dport),
        d,
    )?;
    Some(())
}
