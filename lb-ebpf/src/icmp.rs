//! ICMP and ICMPv6 for what we serve. Echo requests to a VIP from a client are answered here.
//! Destination unreachable (including fragmentation needed) and packet too big about a tracked
//! flow are translated the way the flow's own packets are, quoted packet included, and sent to
//! the flow's other end: a client learns the path MTU towards the VIP, a backend towards the
//! client. Every read and write stays inside the ICMP message's datagram.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    Addr, Counter, DropReason, FlowAddr, FlowKey, IPPROTO_TCP, IPPROTO_UDP,
    checksum::Delta,
    net::{
        ICMP_CHECK, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_HLEN,
        ICMPV6_DEST_UNREACH, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMPV6_PACKET_TOO_BIG,
        IPV4_CHECK, IPV4_DST, IPV4_SRC, IPV4_TTL, IPV6_DST, IPV6_HOP_LIMIT, IPV6_NEXT_HEADER,
        IPV6_SRC,
    },
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    drop_for,
    family::{Family, Ipv4, Ipv6},
    flow, is_client, is_vip,
    maps::{config, count},
    nexthop::{self, Fib, Next, Route},
    not_served,
    parse::{Packet, load, load_addr, load_v4, ptr_at, store, store_addr},
    rewrite::{FORWARDED, V6, port_pair, set_addrs, set_ports},
};

/// Hop limit of the replies we originate.
const REPLY_TTL: u8 = 64;

#[inline(always)]
pub fn handle(ctx: &XdpContext, pkt: &Packet) -> u32 {
    if pkt.l4 + ICMP_HLEN > pkt.end {
        return not_served(pkt, Counter::DropMalformed);
    }
    let Some(hdr) = ptr_at::<[u8; 2]>(ctx, pkt.l4) else {
        return not_served(pkt, Counter::DropMalformed);
    };
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
    let kind = unsafe { (*hdr)[0] };
    // From a martian source (multicast, broadcast, loopback, ...): never answered, and not
    // translated either, as the kernel would not forward it.
    if !is_client(pkt) {
        return not_served(pkt, Counter::DropBadSource);
    }
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
    if error {
        let verdict = if pkt.v6 {
            translate_error::<Ipv6>(ctx, pkt)
        } else {
            translate_error::<Ipv4>(ctx, pkt)
        };
        if let Some(v) = verdict {
            return v;
        }
    }
    not_served(pkt, Counter::DropIcmp)
}

/// Turns the echo request into its reply in place and sends it back the way it came.
#[inline(never)]
fn echo_reply(ctx: &XdpContext, pkt: &Packet) -> Option<u32> {
    // The whole echo header (type, code, checksum, identifier, sequence).
    let icmp: *mut u8 = ptr_at::<[u8; ICMP_HLEN]>(ctx, pkt.l4)?.cast();
    // Swapping the addresses leaves every checksum as it is (IPv4 header and ICMPv6's
    // pseudo-header alike); only the type and the hop limit change.
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
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
            Delta::ZERO
                .u16(old_type, new_type)
                .apply_nonzero(load(check)),
        );
        store(icmp, new_type);
    }
    if pkt.v6 {
        let ip: *mut u8 = ptr_at::<Ipv6Hdr>(ctx, pkt.l3)?.cast();
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        unsafe {
            let (src, dst) = (load_addr(ip.add(IPV6_SRC)), load_addr(ip.add(IPV6_DST)));
            store_addr(ip.add(IPV6_SRC), &dst);
            store_addr(ip.add(IPV6_DST), &src);
            *ip.add(IPV6_HOP_LIMIT) = REPLY_TTL;
        }
    } else {
        let ip: *mut u8 = ptr_at::<Ipv4Hdr>(ctx, pkt.l3)?.cast();
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
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

/// The quoted packet of an ICMP error: its addresses, protocol and where its header and ports
/// are. `None`: not a TCP/UDP packet of this family, or not all of it (IP header and the first
/// 8 bytes of the transport header) inside the message.
#[inline(always)]
fn quoted(ctx: &XdpContext, pkt: &Packet) -> Option<(Addr, Addr, u8, usize)> {
    let inner_l3 = pkt.l4 + ICMP_HLEN;
    let (src, dst, proto, inner_l4) = if pkt.v6 {
        if inner_l3 + Ipv6Hdr::LEN > pkt.end {
            return None;
        }
        let ip: *const u8 = ptr_at::<Ipv6Hdr>(ctx, inner_l3)?.cast();
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        unsafe {
            if *ip >> 4 != 6 {
                return None;
            }
            (
                load_addr(ip.add(IPV6_SRC)),
                load_addr(ip.add(IPV6_DST)),
                *ip.add(IPV6_NEXT_HEADER),
                inner_l3 + Ipv6Hdr::LEN,
            )
        }
    } else {
        if inner_l3 + Ipv4Hdr::LEN > pkt.end {
            return None;
        }
        let ip: *const u8 = ptr_at::<Ipv4Hdr>(ctx, inner_l3)?.cast();
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        let vihl = unsafe { *ip };
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
            return None;
        }
        // SAFETY: `ip` is a checked IPv4 header (`ptr_at` above); the fields read lie in its fixed 20 bytes.
        unsafe {
            (
                load_v4(ip.add(IPV4_SRC)),
                load_v4(ip.add(IPV4_DST)),
                (*ip.cast::<Ipv4Hdr>()).proto,
                inner_l3 + ihl,
            )
        }
    };
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) || inner_l4 + 8 > pkt.end {
        return None;
    }
    Some((src, dst, proto, inner_l4))
}

/// Translates an ICMP error quoting a packet of a tracked flow. `None`: not about a flow we know.
#[inline(never)]
fn translate_error<F: Family>(ctx: &XdpContext, pkt: &Packet) -> Option<u32> {
    let inner_l3 = pkt.l4 + ICMP_HLEN;
    let (quoted_src, quoted_dst, proto, inner_l4) = quoted(ctx, pkt)?;
    // An error about a packet we sent goes to its sender: a VIP or this node.
    if pkt.dst != quoted_src {
        return None;
    }
    let ports: *const u8 = ptr_at::<u32>(ctx, inner_l4)?.cast();
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
    let (sport, dport): (u16, u16) = unsafe { (load(ports), load(ports.add(2))) };
    // The quoted packet travelled the other way: the entry that matters is the reverse's.
    let key = FlowKey::new(
        F::A::from_addr(&quoted_dst),
        F::A::from_addr(&quoted_src),
        dport,
        sport,
        proto,
    );
    let found = flow::find::<F>(&key, config()?)?;
    // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
    let entry = unsafe { *found };
    let t = flow::resolve(&entry)?;
    if pkt.ttl <= 1 {
        return Some(drop_for(t.service, DropReason::TtlExceeded));
    }
    // The quoted packet becomes the reverse of what the entry rewrites its direction to.
    let quoted = [t.tuple.dst, t.tuple.src];
    // Outer header: to the quoted packet's (new) sender; from its (new) destination when that is
    // who complained (e.g. port unreachable), else from the router that did, unchanged.
    let outer_src = if pkt.src == quoted_dst {
        quoted[1]
    } else {
        pkt.src
    };
    let outer = [outer_src, quoted[0]];
    let fib = Fib {
        ctx: ctx.ctx.cast(),
        ifindex: ctx.ingress_ifindex() as u32,
        v6: pkt.v6,
    };
    // SAFETY: a BPF helper without arguments.
    let now_ns = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() };
    let mut next = Next::NONE;
    let forwarded = match nexthop::route(&fib, &outer[0], &outer[1], pkt.len, now_ns, &mut next) {
        Route::Found => true,
        Route::Neighbour | Route::Local | Route::PolicyHook | Route::Netfilter => false,
        Route::Unreachable => return Some(drop_for(t.service, DropReason::NoRoute)),
        Route::TooBig => return Some(drop_for(t.service, DropReason::TooBig)),
    };

    // The quoted IP header: its addresses, and for IPv4 its checksum; then its ports and, if
    // quoted, its transport checksum. ICMP's checksum covers all of it.
    let v6 = if pkt.v6 { V6 } else { 0 };
    let inner_check = if pkt.v6 {
        0
    } else {
        let ip: *const u8 = ptr_at::<Ipv4Hdr>(ctx, inner_l3)?.cast();
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        unsafe { load::<u16>(ip.add(IPV4_CHECK)) }
    };
    let inner_delta = set_addrs(ctx, inner_l3, v6, &quoted)?;
    let mut icmp_delta = inner_delta;
    if !pkt.v6 {
        let ip: *const u8 = ptr_at::<Ipv4Hdr>(ctx, inner_l3)?.cast();
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        icmp_delta = icmp_delta.u16(inner_check, unsafe { load(ip.add(IPV4_CHECK)) });
    }
    let ports = port_pair(t.tuple.dport, t.tuple.sport);
    let l4_delta = set_ports(ctx, inner_l4, pkt.end, proto, pkt.v6, ports, inner_delta)?;
    icmp_delta = icmp_delta.combine(l4_delta);

    let how = if forwarded { v6 | FORWARDED } else { v6 };
    let outer_delta = set_addrs(ctx, pkt.l3, how, &outer)?;
    if pkt.v6 {
        // ICMPv6's checksum covers a pseudo-header with the outer addresses.
        icmp_delta = icmp_delta.combine(outer_delta);
    }
    let check: *mut u8 = ptr_at::<u16>(ctx, pkt.l4 + ICMP_CHECK)?.cast();
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
    unsafe { store(check, icmp_delta.apply(load(check))) };
    count(Counter::IcmpErrorsTranslated);
    Some(if forwarded {
        nexthop::transmit(ctx, pkt.vlan, &next, fib.ifindex)
    } else {
        xdp_action::XDP_PASS
    })
}

#[inline(always)]
pub fn swap_macs(ctx: &XdpContext) -> Option<()> {
    let eth: *mut u8 = ptr_at::<[u16; 6]>(ctx, 0)?.cast();
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
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
