//! In-place rewrite of addresses and ports, with incremental checksum updates (RFC 1624 via
//! `lb_common::checksum::Delta`). Nothing here changes the packet's length.
use aya_ebpf::programs::XdpContext;
use lb_common::{Addr, IPPROTO_TCP, checksum::Delta};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::parse::{
    IPV4_CHECK, IPV4_DST, IPV4_SRC, IPV6_DST, IPV6_SRC, Packet, TCP_CHECK, UDP_CHECK, load,
    load_addr, ptr_at, store, store_addr,
};

/// Sets the IP source and destination of the header at `l3` (IPv4 header checksum included)
/// and returns the change, which every checksum over a pseudo-header must also take.
#[inline(never)]
pub fn set_addrs(ctx: &XdpContext, l3: usize, v6: bool, addrs: &[Addr; 2]) -> Option<Delta> {
    // One argument for both: a BPF subprogram takes at most five, the result pointer included.
    let [src, dst] = addrs;
    if v6 {
        let ip: *mut u8 = ptr_at::<Ipv6Hdr>(ctx, l3)?.cast();
        unsafe {
            let d = Delta::ZERO
                .addr(&load_addr(ip.add(IPV6_SRC)), src)
                .addr(&load_addr(ip.add(IPV6_DST)), dst);
            store_addr(ip.add(IPV6_SRC), src);
            store_addr(ip.add(IPV6_DST), dst);
            Some(d)
        }
    } else {
        let ip: *mut u8 = ptr_at::<Ipv4Hdr>(ctx, l3)?.cast();
        unsafe {
            let (new_src, new_dst) = (src.v4_word(), dst.v4_word());
            let d = Delta::ZERO
                .u32(load(ip.add(IPV4_SRC)), new_src)
                .u32(load(ip.add(IPV4_DST)), new_dst);
            let check = ip.add(IPV4_CHECK);
            store(check, d.apply(load(check)));
            store(ip.add(IPV4_SRC), new_src);
            store(ip.add(IPV4_DST), new_dst);
            Some(d)
        }
    }
}

/// Sets the TCP or UDP ports at `l4` (wire order) and updates the transport checksum by the port
/// change plus `addr_delta` (the pseudo-header's). Returns everything that changed in this
/// header, which a checksum covering it (ICMP's, around a quoted packet) must take too. A header
/// quoted in an ICMP error may stop after the ports; its checksum is then left alone.
#[inline(always)]
pub fn set_ports(
    ctx: &XdpContext,
    l4: usize,
    proto: u8,
    v6: bool,
    ports: u32,
    addr_delta: Delta,
) -> Option<Delta> {
    let at: *mut u8 = ptr_at::<u32>(ctx, l4)?.cast();
    let port_delta = Delta::ZERO.u32(unsafe { load(at) }, ports);
    unsafe { store(at, ports) };
    // Everything a covering checksum sees change: the ports, and the transport checksum below.
    let mut covered = port_delta;
    let l4_delta = addr_delta.combine(port_delta);
    let check_at = if proto == IPPROTO_TCP {
        TCP_CHECK
    } else {
        UDP_CHECK
    };
    if let Some(check) = ptr_at::<u16>(ctx, l4 + check_at) {
        let check: *mut u8 = check.cast();
        let old = unsafe { load::<u16>(check) };
        // IPv4 UDP may carry no checksum (0); IPv6 UDP always does.
        let new = if proto == IPPROTO_TCP || v6 {
            l4_delta.apply(old)
        } else {
            l4_delta.apply_udp(old)
        };
        covered = covered.u16(old, new);
        unsafe { store(check, new) };
    }
    Some(covered)
}

/// Both ports as the one 32-bit word they make in the header (memory order).
#[inline(always)]
pub fn port_pair(sport: u16, dport: u16) -> u32 {
    u32::from(sport) | (u32::from(dport) << 16)
}

/// Full rewrite of a packet's tuple: addresses, then ports.
#[inline(always)]
pub fn set_tuple(
    ctx: &XdpContext,
    pkt: &Packet,
    addrs: &[Addr; 2],
    sport: u16,
    dport: u16,
) -> Option<()> {
    let d = set_addrs(ctx, pkt.l3, pkt.v6, addrs)?;
    set_ports(ctx, pkt.l4, pkt.proto, pkt.v6, port_pair(sport, dport), d)?;
    Some(())
}

#[inline(always)]
pub fn ipv4_header_len(ip: &Ipv4Hdr) -> usize {
    ((ip.vihl & 0x0f) as usize) * 4
}
