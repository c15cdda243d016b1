//! `lb_backend`: the reply side, on the interfaces facing local backends (TC ingress of the
//! host end of pod veths, i.e. what pods send). It translates the replies of our flows
//! (backend -> VIP -> client) and sends them on; everything else, the pods' own traffic
//! included, goes on to the kernel untouched. The same checks as `lb_uplink`'s: only frames
//! sent to this host, only datagrams whose lengths agree, TTL decremented.
//!
//! TC rather than XDP because of offloads. A pod's sockets leave TCP/UDP checksums for the
//! "hardware" to finish (the skb is CHECKSUM_PARTIAL and the checksum field holds only the
//! pseudo-header sum), and send TSO/GSO super-packets of up to 64 KB that the device segments
//! later. XDP sees neither, and a frame it redirects loses both. The skb helpers here know:
//! `bpf_l4_csum_replace` updates a partial checksum for pseudo-header fields (addresses) and
//! leaves it alone for the rest (ports), and a redirected skb keeps its offload state, so the
//! egress device (or the kernel) completes checksums and segments. The MTU is checked per
//! segment, as the kernel's forwarding does.
use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::generated::{bpf_redirect, bpf_redirect_neigh, bpf_skb_vlan_push},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    Counter, DropReason, FLOW_NETFILTER, HOP_VLAN, IFACE_NETFILTER, IPPROTO_TCP, IPPROTO_UDP,
    checksum::Delta,
    filter::Plane,
    flow_clock,
    net::{
        ETH_P_8021Q, IPV4_CHECK, IPV4_DST, IPV4_SRC, IPV4_TTL, IPV6_DST, IPV6_HOP_LIMIT, IPV6_SRC,
        TCP_CHECK, UDP_CHECK,
    },
};

use crate::{
    family::{Family, Ipv4, Ipv6, key_of},
    flow::{self, Target},
    maps::{
        LB_IFACES, LB_SVC_STATS, config, count, count_service_drop, in_filter, packet, scratch,
        tick_clock,
    },
    nexthop::{self, Fib, Route},
    parse::{Packet, Ports, State, ipv4_checksum_ok, load, parse_l3, parse_ports, ptr_at},
};

/// Headers we read directly; pulled into the linear part first.
pub(crate) const HEADROOM: u32 = 14 + 4 + 60 + 60;

// bpf_skb_store_bytes / bpf_l4_csum_replace flags.
const BPF_F_RECOMPUTE_CSUM: u64 = 1;
const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;
/// `skb->pkt_type` of a frame addressed to this host.
const PACKET_HOST: u32 = 0;

#[classifier]
pub fn lb_backend(ctx: TcContext) -> i32 {
    backend(&ctx)
}

/// Not ours (or for the kernel to route): on to the next program on the hook. Under TCX,
/// TC_ACT_OK would end the chain there, skipping later programs such as a CNI's network
/// policy enforcement; for a classic filter it is TC_ACT_UNSPEC, the next filter's turn.
pub(crate) const TCX_NEXT: i32 = -1;

#[inline(never)]
fn backend(ctx: &TcContext) -> i32 {
    count(Counter::Packets);
    // SAFETY: the program's context.
    let pkt_type = unsafe { (*ctx.skb.skb).pkt_type };
    if pkt_type != PACKET_HOST {
        count(Counter::PassNotOurs);
        return TCX_NEXT;
    }
    let _ = ctx.pull_data(HEADROOM.min(ctx.len()));
    let Some(pkt) = packet() else {
        return TCX_NEXT;
    };
    if !parse_l3(ctx, pkt) {
        return TCX_NEXT;
    }
    let pkt: &Packet = pkt;
    // Replies go to the node (snat) or come from a local backend (client IP preserved).
    if !in_filter(Plane::Served, &pkt.dst) && !in_filter(Plane::PreservedBackends, &pkt.src) {
        count(Counter::PassNotOurs);
        return TCX_NEXT;
    }
    if pkt.state != State::Present || (pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP) {
        return TCX_NEXT;
    }
    if !pkt.v6 && !ipv4_checksum_ok(ctx, pkt.l3, pkt.l4) {
        return TCX_NEXT;
    }
    let Some(ports) = parse_ports(ctx, pkt) else {
        return TCX_NEXT;
    };
    // Replies of `netfilter` flows go on untranslated while this interface is `netfilter`: the
    // kernel forwards them (conntrack and netfilter see them) and `lb_uplink_out` translates
    // them on the way out. Once it is not, they are ours, as any flow's that keeps the client's
    // address (`lb_uplink_out` may be off the uplinks by then).
    // SAFETY: the program's context: the device the skb arrived on.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let ours = |flags: u8| flags & FLOW_NETFILTER == 0 || !netfilter_iface(ifindex);
    let replied = if pkt.v6 {
        lookup::<Ipv6>(pkt, &ports, ours)
    } else {
        lookup::<Ipv4>(pkt, &ports, ours)
    };
    if !replied {
        // The pod's own traffic (or a `netfilter` flow's reply).
        count(Counter::PassNotOurs);
        return TCX_NEXT;
    }
    reply(ctx, pkt, &ports)
}

/// Whether `ifindex`'s delivery is `netfilter` (read only for the replies of such flows).
#[inline(always)]
fn netfilter_iface(ifindex: u32) -> bool {
    // SAFETY: copied out at once; the agent writes this map only when interfaces change.
    unsafe { LB_IFACES.get(&ifindex) }.is_some_and(|i| i.flags & IFACE_NETFILTER != 0)
}

/// Finds the reply entry of the pod's packet; if it is live for it and `ours` takes its flags:
/// true, its target in scratch(). (Its own subprogram, per family; the rest is the same for
/// both.)
#[inline(never)]
pub(crate) fn lookup<F: Family>(pkt: &Packet, ports: &Ports, ours: impl Fn(u8) -> bool) -> bool {
    let (Some(cfg), Some(s)) = (config(), scratch()) else {
        return false;
    };
    let key = key_of::<F>(pkt, ports);
    let Some(entry) = flow::find::<F>(&key, cfg) else {
        return false;
    };
    // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
    let f = unsafe { &*entry };
    if !ours(f.flags) {
        return false;
    }
    let Some(t) = flow::resolve(f) else {
        return false;
    };
    let now_ns = tick_clock(s);
    s.now = now_ns;
    let seen = flow::seen(pkt.proto, ports.tcp_flags);
    if !t.reply || !flow::refresh::<F>(entry, &t, seen, flow_clock(now_ns), cfg) {
        return false;
    }
    s.target = t;
    true
}

/// The FIB lookup's input for an skb (the device it arrived on), and the length to hold to the
/// route's MTU: a GSO or GRO packet one segment at a time, as the device will pass it on.
#[inline(always)]
pub fn fib_of_skb(ctx: &TcContext, pkt: &Packet, ports: &Ports) -> (Fib, u32) {
    // SAFETY: the program's context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let mtu_len = if gso_size != 0 {
        (pkt.l4 - pkt.l3) as u32 + u32::from(ports.header_len) + gso_size
    } else {
        pkt.len
    };
    let fib = Fib {
        ctx: ctx.skb.skb.cast(),
        // SAFETY: the program's context: the device the skb arrived on.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        v6: pkt.v6,
    };
    (fib, mtu_len)
}

/// Sends a pod's reply on, translated (its target and clock reading in scratch()).
#[inline(never)]
fn reply(ctx: &TcContext, pkt: &Packet, ports: &Ports) -> i32 {
    let Some(s) = scratch() else {
        return TCX_NEXT;
    };
    let (t, now_ns) = (&s.target, s.now);
    if pkt.ttl <= 1 {
        count_service_drop(t.service, DropReason::TtlExceeded);
        return TC_ACT_SHOT;
    }
    let (fib, mtu_len) = fib_of_skb(ctx, pkt, ports);
    let next = &mut s.next;
    match nexthop::route(&fib, &t.tuple.src, &t.tuple.dst, mtu_len, now_ns, next) {
        Route::Found => {
            if rewrite(ctx, pkt, t, true).is_none() {
                count(Counter::DropMalformed);
                return TC_ACT_SHOT;
            }
            count_reply(t, pkt.len);
            if next.vlan & HOP_VLAN != 0 {
                let tci = next.vlan & 0x0fff;
                // SAFETY: `ctx.skb.skb` is the program's context; no packet pointer taken before the call is used after it.
                if unsafe { bpf_skb_vlan_push(ctx.skb.skb.cast(), ETH_P_8021Q.to_be(), tci) } != 0 {
                    return TC_ACT_SHOT;
                }
            }
            let mut macs = [0u8; 12];
            for (i, w) in next.macs.iter().enumerate() {
                let b = w.to_ne_bytes();
                macs[2 * i] = b[0];
                macs[2 * i + 1] = b[1];
            }
            if ctx.store(0, &macs, 0).is_err() {
                return TC_ACT_SHOT;
            }
            count(Counter::XdpRedirect);
            // SAFETY: a helper taking integers only.
            unsafe { bpf_redirect(next.ifindex, 0) as i32 }
        }
        Route::Neighbour => {
            if rewrite(ctx, pkt, t, true).is_none() {
                count(Counter::DropMalformed);
                return TC_ACT_SHOT;
            }
            count_reply(t, pkt.len);
            // The kernel resolves the neighbour and sends the packet on.
            count(Counter::PassNoNeighbour);
            // SAFETY: a null parameter pointer with length 0 is allowed: the kernel resolves the neighbour itself.
            unsafe { bpf_redirect_neigh(next.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
        }
        Route::Local => {
            if rewrite(ctx, pkt, t, false).is_none() {
                count(Counter::DropMalformed);
                return TC_ACT_SHOT;
            }
            count_reply(t, pkt.len);
            count(Counter::PassNotRedirectable);
            TCX_NEXT
        }
        Route::PolicyHook | Route::Netfilter => {
            // Another pod's veth with a policy hook: the kernel routes the packet there, through
            // that veth's TC egress and netfilter.
            if rewrite(ctx, pkt, t, false).is_none() {
                count(Counter::DropMalformed);
                return TC_ACT_SHOT;
            }
            count_reply(t, pkt.len);
            count(Counter::PassPolicyHook);
            TCX_NEXT
        }
        Route::Unreachable => {
            count_service_drop(t.service, DropReason::NoRoute);
            TC_ACT_SHOT
        }
        Route::TooBig => {
            count_service_drop(t.service, DropReason::TooBig);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
pub(crate) fn count_reply(t: &Target, len: u32) {
    if let Some(s) = LB_SVC_STATS.get_ptr_mut(t.service) {
        // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
        let s = unsafe { &mut *s };
        s.reply_packets += 1;
        s.reply_bytes += u64::from(len);
    }
}

/// Rewrites addresses and ports to the target's, updating checksums through the helpers
/// (correct for complete and for partial checksums alike); with `forwarded`, the TTL too.
#[inline(never)]
pub(crate) fn rewrite(ctx: &TcContext, pkt: &Packet, t: &Target, forwarded: bool) -> Option<()> {
    let udp = pkt.proto == IPPROTO_UDP;
    let check = pkt.l4 + if udp { UDP_CHECK } else { TCP_CHECK };
    // IPv4 UDP may carry no checksum: 0 stays 0, a computed 0 becomes 0xffff.
    let mangled = if udp && !pkt.v6 {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    let (old_ports, new_ports) = {
        let p: *const u8 = ptr_at::<u32>(ctx, pkt.l4)?.cast();
        (
            // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
            unsafe { load::<u32>(p) },
            u32::from(t.tuple.sport) | (u32::from(t.tuple.dport) << 16),
        )
    };
    if pkt.v6 {
        let delta = Delta::ZERO
            .addr(&pkt.src, &t.tuple.src)
            .addr(&pkt.dst, &t.tuple.dst);
        store(ctx, pkt.l3 + IPV6_SRC, &t.tuple.src.0)?;
        store(ctx, pkt.l3 + IPV6_DST, &t.tuple.dst.0)?;
        // A precomputed difference (size 0) over the pseudo-header.
        ctx.l4_csum_replace(
            check,
            0,
            u64::from(delta.wsum()),
            BPF_F_PSEUDO_HDR | mangled,
        )
        .ok()?;
        if forwarded {
            store(ctx, pkt.l3 + IPV6_HOP_LIMIT, &(pkt.ttl - 1))?;
        }
    } else {
        let ip: *const u8 = ptr_at::<[u8; 20]>(ctx, pkt.l3)?.cast();
        // Read before the helpers below, which invalidate packet pointers.
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        let (old_src, old_dst, old_ttl): (u32, u32, u16) = unsafe {
            (
                load(ip.add(IPV4_SRC)),
                load(ip.add(IPV4_DST)),
                load(ip.add(IPV4_TTL)),
            )
        };
        let (new_src, new_dst) = (t.tuple.src.v4_word(), t.tuple.dst.v4_word());
        for (old, new) in [(old_src, new_src), (old_dst, new_dst)] {
            ctx.l3_csum_replace(pkt.l3 + IPV4_CHECK, u64::from(old), u64::from(new), 4)
                .ok()?;
            ctx.l4_csum_replace(
                check,
                u64::from(old),
                u64::from(new),
                BPF_F_PSEUDO_HDR | mangled | 4,
            )
            .ok()?;
        }
        store(ctx, pkt.l3 + IPV4_SRC, &new_src)?;
        store(ctx, pkt.l3 + IPV4_DST, &new_dst)?;
        if forwarded {
            // TTL shares a 16-bit word with the protocol.
            let new = u16::from_ne_bytes([pkt.ttl - 1, pkt.proto]);
            ctx.l3_csum_replace(pkt.l3 + IPV4_CHECK, u64::from(old_ttl), u64::from(new), 2)
                .ok()?;
            store(ctx, pkt.l3 + IPV4_TTL, &new)?;
        }
    }
    // Ports are not in the pseudo-header: a partial checksum is left for the device.
    ctx.l4_csum_replace(
        check,
        u64::from(old_ports),
        u64::from(new_ports),
        mangled | 4,
    )
    .ok()?;
    store(ctx, pkt.l4, &new_ports)
}

#[inline(always)]
fn store<T>(ctx: &TcContext, offset: usize, value: &T) -> Option<()> {
    ctx.store(offset, value, BPF_F_RECOMPUTE_CSUM).ok()
}
