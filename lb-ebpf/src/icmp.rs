//! ICMP and ICMPv6 for what we serve. Echo requests to a VIP are answered here. Destination
//! unreachable (including fragmentation needed) and packet too big about a tracked flow are
//! translated the way the flow's own packets are, quoted packet included, and sent to the flow's
//! other end: a client learns the path MTU towards the VIP, a backend towards the client.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Addr, Counter, FlowKey, IPPROTO_TCP, IPPROTO_UDP, checksum::Delta};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    is_vip,
    maps::{LB_FLOWS, count, scratch},
    nexthop, not_served,
    parse::{
        IPV4_CHECK, IPV4_DST, IPV4_SRC, IPV4_TTL, IPV6_DST, IPV6_SRC, Packet, load, load_addr,
        load_v4, ptr_at, store, store_addr,
    },
    rewrite::{ipv4_header_len, port_pair, set_addrs, set_ports},
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// Offset of the checksum in the ICMP header; the header is 8 bytes.
const ICMP_CHECK: usize = 2;
const ICMP_HEADER_LEN: usize = 8;
/// Hop limit of the replies we originate.
const REPLY_TTL: u8 = 64;
/// IPv6 hop limit: the byte after the next-header byte.
const IPV6_NEXT_HEADER: usize = 6;

#[inline(always)]
pub fn handle(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let Some(hdr) = ptr_at::<[u8; 2]>(ctx, pkt.l4) else {
        return not_served(pkt, Counter::DropMalformed);
    };
    let kind = unsafe { (*hdr)[0] };
    let (echo, error) = if pkt.v6 {
        (
            kind == ICMPV6_ECHO_REQUEST,
            kind == ICMPV6_DEST_UNREACH || kind == ICMPV6_PACKET_TOO_BIG,
        )
    } else {
        (kind == ICMP_ECHO_REQUEST, kind == ICMP_DEST_UNREACH)
    };
    if echo && is_vip(&pkt.dst) {
        return echo_reply(ctx, pkt).unwrap_or_else(|| {
            count(Counter::DropMalformed);
            xdp_action::XDP_DROP
        });
    }
    if error && let Some(verdict) = translate_error(ctx, pkt) {
        return verdict;
    }
    not_served(pkt, Counter::DropIcmp)
}

/// Turns the echo request into its reply in place and sends it back the way it came.
#[inline(never)]
fn echo_reply(ctx: &XdpContext, pkt: &Packet) -> Option<u32> {
    // The whole echo header (type, code, checksum, identifier, sequence).
    let icmp: *mut u8 = ptr_at::<[u8; ICMP_HEADER_LEN]>(ctx, pkt.l4)?.cast();
    // Swapping the addresses leaves every checksum as it is (IPv4 header and ICMPv6's
    // pseudo-header alike); only the type and the hop limit change.
    unsafe {
        let reply = if pkt.v6 {
            ICMPV6_ECHO_REPLY
        } else {
            ICMP_ECHO_REPLY
        };
        let old_type: u16 = load(icmp);
        let new_type = u16::from_ne_bytes([reply, *icmp.add(1)]);
        let check = icmp.add(ICMP_CHECK);
        store(
            check,
            Delta::ZERO.u16(old_type, new_type).apply(load(check)),
        );
        store(icmp, new_type);
    }
    if pkt.v6 {
        let ip: *mut u8 = ptr_at::<Ipv6Hdr>(ctx, pkt.l3)?.cast();
        unsafe {
            let (src, dst) = (load_addr(ip.add(IPV6_SRC)), load_addr(ip.add(IPV6_DST)));
            store_addr(ip.add(IPV6_SRC), &dst);
            store_addr(ip.add(IPV6_DST), &src);
            *ip.add(IPV6_NEXT_HEADER + 1) = REPLY_TTL;
        }
    } else {
        let ip: *mut u8 = ptr_at::<Ipv4Hdr>(ctx, pkt.l3)?.cast();
        unsafe {
            let (src, dst): (u32, u32) = (load(ip.add(IPV4_SRC)), load(ip.add(IPV4_DST)));
            store(ip.add(IPV4_SRC), dst);
            store(ip.add(IPV4_DST), src);
            // TTL shares a 16-bit word with the protocol.
            let old: u16 = load(ip.add(IPV4_TTL));
            let new = u16::from_ne_bytes([REPLY_TTL, *ip.add(IPV4_TTL + 1)]);
            let check = ip.add(IPV4_CHECK);
            store(check, Delta::ZERO.u16(old, new).apply(load(check)));
            store(ip.add(IPV4_TTL), new);
        }
    }
    swap_macs(ctx)?;
    count(Counter::IcmpEchoReplies);
    count(Counter::XdpTx);
    Some(xdp_action::XDP_TX)
}

/// Translates an ICMP error quoting a packet of a tracked flow. `None`: not about a flow we know.
#[inline(never)]
fn translate_error(ctx: &XdpContext, pkt: &Packet) -> Option<u32> {
    let inner_l3 = pkt.l4 + ICMP_HEADER_LEN;
    let (quoted_src, quoted_dst, proto, inner_l4) = if pkt.v6 {
        let ip: *const u8 = ptr_at::<Ipv6Hdr>(ctx, inner_l3)?.cast();
        unsafe {
            (
                load_addr(ip.add(IPV6_SRC)),
                load_addr(ip.add(IPV6_DST)),
                *ip.add(IPV6_NEXT_HEADER),
                inner_l3 + Ipv6Hdr::LEN,
            )
        }
    } else {
        let ip: *const Ipv4Hdr = ptr_at(ctx, inner_l3)?;
        let ihl = ipv4_header_len(unsafe { &*ip });
        if ihl < Ipv4Hdr::LEN {
            return None;
        }
        let ip: *const u8 = ip.cast();
        unsafe {
            (
                load_v4(ip.add(IPV4_SRC)),
                load_v4(ip.add(IPV4_DST)),
                (*ip.cast::<Ipv4Hdr>()).proto,
                inner_l3 + ihl,
            )
        }
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let ports: *const u8 = ptr_at::<u32>(ctx, inner_l4)?.cast();
    let (sport, dport): (u16, u16) = unsafe { (load(ports), load(ports.add(2))) };
    // The quoted packet travelled the other way: the entry that matters is the reverse's.
    let scratch = scratch()?;
    scratch.key = FlowKey::new(quoted_dst, quoted_src, dport, sport, proto);
    let found = LB_FLOWS.get_ptr(&scratch.key)?;
    // A copy (the entry may change under us), made non-overlapping so it is not a memmove call.
    unsafe { core::ptr::copy_nonoverlapping(found, &mut scratch.reply, 1) };
    let entry = &scratch.reply;
    // The quoted packet becomes the reverse of what the entry rewrites its direction to.
    let quoted = [entry.dst, entry.src];

    // The quoted IP header: its addresses, and for IPv4 its checksum; then its ports and, if
    // quoted, its transport checksum. ICMP's checksum covers all of it.
    let inner_check = if pkt.v6 {
        0
    } else {
        let ip: *const u8 = ptr_at::<Ipv4Hdr>(ctx, inner_l3)?.cast();
        unsafe { load::<u16>(ip.add(IPV4_CHECK)) }
    };
    let inner_delta = set_addrs(ctx, inner_l3, pkt.v6, &quoted)?;
    let mut icmp_delta = inner_delta;
    if !pkt.v6 {
        let ip: *const u8 = ptr_at::<Ipv4Hdr>(ctx, inner_l3)?.cast();
        icmp_delta = icmp_delta.u16(inner_check, unsafe { load(ip.add(IPV4_CHECK)) });
    }
    let ports = port_pair(entry.dport, entry.sport);
    let l4_delta = set_ports(ctx, inner_l4, proto, pkt.v6, ports, inner_delta)?;
    icmp_delta = icmp_delta.combine(l4_delta);

    // Outer header: to the quoted packet's (new) sender; from its (new) destination when that is
    // who complained (e.g. port unreachable), else from the router that did, unchanged.
    let outer_src: Addr = if pkt.src == quoted_dst {
        quoted[1]
    } else {
        pkt.src
    };
    let outer = [outer_src, quoted[0]];
    let outer_delta = set_addrs(ctx, pkt.l3, pkt.v6, &outer)?;
    if pkt.v6 {
        // ICMPv6's checksum covers a pseudo-header with the outer addresses.
        icmp_delta = icmp_delta.combine(outer_delta);
    }
    let check: *mut u8 = ptr_at::<u16>(ctx, pkt.l4 + ICMP_CHECK)?.cast();
    unsafe { store(check, icmp_delta.apply(load(check))) };
    count(Counter::IcmpErrorsTranslated);
    Some(nexthop::send(ctx, pkt, &outer))
}

#[inline(always)]
pub fn swap_macs(ctx: &XdpContext) -> Option<()> {
    let eth: *mut u8 = ptr_at::<[u16; 6]>(ctx, 0)?.cast();
    unsafe {
        let dst: [u16; 3] = [load(eth), load(eth.add(2)), load(eth.add(4))];
        let src: [u16; 3] = [load(eth.add(6)), load(eth.add(8)), load(eth.add(10))];
        store(eth, src[0]);
        store(eth.add(2), src[1]);
        store(eth.add(4), src[2]);
        store(eth.add(6), dst[0]);
        store(eth.add(8), dst[1]);
        store(eth.add(10), dst[2]);
    }
    Some(())
}
