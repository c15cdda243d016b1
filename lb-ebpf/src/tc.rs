//! `lb_backend`: the reply side, on the interfaces facing local backends (TC ingress of the
//! host end of pod veths, i.e. what pods send). It translates the replies of our flows
//! (backend -> VIP -> client) and sends them on; everything else, the pods' own traffic
//! included, goes on to the kernel untouched.
//!
//! TC rather than XDP because of checksum offload: a pod's sockets leave TCP/UDP checksums for
//! the "hardware" to finish (the skb is CHECKSUM_PARTIAL and the checksum field holds only the
//! pseudo-header sum). XDP cannot see that, and a frame it redirects loses it. The skb helpers
//! here know: `bpf_l4_csum_replace` updates a partial checksum for pseudo-header fields
//! (addresses) and leaves it alone for the rest (ports), and a redirected skb keeps its offload
//! state, so the egress device or the kernel completes the checksum correctly.
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, bpf_fib_lookup as FibParams},
    helpers::generated::{
        bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_redirect_neigh,
        bpf_skb_vlan_push,
    },
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    Addr, Counter, FILTER_WORDS, FLOW_REPLY, FlowKey, IPPROTO_TCP, IPPROTO_UDP, checksum::Delta,
    filter_bit,
};

use crate::{
    flow,
    maps::{LB_FILTER, LB_IFACES, LB_SVC_STATS, config, count},
    parse::{
        IPV4_CHECK, IPV4_DST, IPV4_SRC, IPV6_DST, IPV6_SRC, L4State, Packet, TCP_CHECK, UDP_CHECK,
        load, parse_l3, parse_ports, ptr_at,
    },
};

/// Headers we read directly; pulled into the linear part first.
const HEADROOM: u32 = 14 + 4 + 60 + 20;

// bpf_skb_store_bytes / bpf_l4_csum_replace flags.
const BPF_F_RECOMPUTE_CSUM: u64 = 1;
const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;
const FIB_SUCCESS: i64 = 0;
const FIB_NO_NEIGHBOUR: i64 = 7;
const FIB_NOT_FORWARDED: i64 = 4;
const ETH_P_8021Q: u16 = 0x8100;

#[classifier]
pub fn lb_backend(ctx: TcContext) -> i32 {
    backend(&ctx)
}

#[inline(always)]
fn in_filter(plane: u32, addr: &Addr) -> bool {
    let bit = filter_bit(addr);
    match LB_FILTER.get(plane * FILTER_WORDS + bit / 64) {
        Some(w) => w & (1u64 << (bit % 64)) != 0,
        None => false,
    }
}

/// Not ours (or for the kernel to route): on to the next program on the hook. Under TCX,
/// TC_ACT_OK would end the chain there, skipping later programs such as a CNI's network
/// policy enforcement.
const TCX_NEXT: i32 = -1;

#[inline(never)]
fn backend(ctx: &TcContext) -> i32 {
    count(Counter::Packets);
    let _ = ctx.pull_data(HEADROOM.min(ctx.len()));
    let mut pkt = Packet::EMPTY;
    if !parse_l3(ctx, &mut pkt) {
        return TCX_NEXT;
    }
    let pkt = &pkt;
    // Replies go to the node (snat) or come from a local backend (client IP preserved).
    if !in_filter(0, &pkt.dst) && !in_filter(1, &pkt.src) {
        count(Counter::PassNotOurs);
        return TCX_NEXT;
    }
    if pkt.l4_state != L4State::Present || (pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP) {
        return TCX_NEXT;
    }
    let (Some(ports), Some(cfg)) = (parse_ports(ctx, pkt), config()) else {
        return TCX_NEXT;
    };
    let key = FlowKey::new(pkt.src, pkt.dst, ports.sport, ports.dport, pkt.proto);
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let Some(entry) = flow::lookup(&key, ports.tcp_flags, now, cfg) else {
        // The pod's own traffic.
        count(Counter::PassNotOurs);
        return TCX_NEXT;
    };
    let flow = unsafe { *entry };
    if rewrite(ctx, pkt, &flow).is_none() {
        count(Counter::DropMalformed);
        return TC_ACT_SHOT;
    }
    if let Some(s) = LB_SVC_STATS.get_ptr_mut(flow.service) {
        let s = unsafe { &mut *s };
        if flow.flags & FLOW_REPLY != 0 {
            s.reply_packets += 1;
            s.reply_bytes += u64::from(pkt.len);
        } else {
            s.packets += 1;
            s.bytes += u64::from(pkt.len);
        }
    }
    send(ctx, pkt, &[flow.src, flow.dst])
}

/// Rewrites addresses and ports to the flow entry's, updating checksums through the helpers
/// (correct for complete and for partial checksums alike).
#[inline(never)]
fn rewrite(ctx: &TcContext, pkt: &Packet, flow: &lb_common::Flow) -> Option<()> {
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
            unsafe { load::<u32>(p) },
            u32::from(flow.sport) | (u32::from(flow.dport) << 16),
        )
    };
    if pkt.v6 {
        let delta = Delta::ZERO
            .addr(&pkt.src, &flow.src)
            .addr(&pkt.dst, &flow.dst);
        store(ctx, pkt.l3 + IPV6_SRC, &flow.src.0)?;
        store(ctx, pkt.l3 + IPV6_DST, &flow.dst.0)?;
        // A precomputed difference (size 0) over the pseudo-header.
        ctx.l4_csum_replace(
            check,
            0,
            u64::from(delta.wsum()),
            BPF_F_PSEUDO_HDR | mangled,
        )
        .ok()?;
    } else {
        let ip: *const u8 = ptr_at::<[u8; 20]>(ctx, pkt.l3)?.cast();
        let (old_src, old_dst): (u32, u32) =
            unsafe { (load(ip.add(IPV4_SRC)), load(ip.add(IPV4_DST))) };
        let (new_src, new_dst) = (flow.src.v4_word(), flow.dst.v4_word());
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

/// Next hop from the FIB; redirects there (through the kernel's neighbour resolution when the
/// MAC is not known yet).
#[inline(never)]
fn send(ctx: &TcContext, pkt: &Packet, addrs: &[Addr; 2]) -> i32 {
    let [src, dst] = addrs;
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    // SAFETY: the context pointer's ifindex field (the device the skb arrived on).
    p.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    p.__bindgen_anon_1.tot_len = pkt.len;
    if pkt.v6 {
        p.family = 10;
        p.__bindgen_anon_3.ipv6_src = src.words();
        p.__bindgen_anon_4.ipv6_dst = dst.words();
    } else {
        p.family = 2;
        p.__bindgen_anon_3.ipv4_src = src.v4_word();
        p.__bindgen_anon_4.ipv4_dst = dst.v4_word();
    }
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc {
        FIB_SUCCESS => {}
        FIB_NO_NEIGHBOUR => {
            // The kernel resolves the neighbour and sends the packet on.
            count(Counter::XdpRedirect);
            return unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
        }
        FIB_NOT_FORWARDED => return TCX_NEXT,
        _ => {
            count(Counter::DropNoRoute);
            return TC_ACT_SHOT;
        }
    }
    let mut ifindex = p.ifindex;
    if let Some(vlan) = unsafe { LB_IFACES.get(&ifindex) } {
        ifindex = vlan.parent;
        let tci = vlan.vlan_id & 0x0fff;
        if unsafe { bpf_skb_vlan_push(ctx.skb.skb.cast(), ETH_P_8021Q.to_be(), tci) } != 0 {
            return TC_ACT_SHOT;
        }
    }
    let macs: [u8; 12] = {
        let mut m = [0u8; 12];
        let (dmac, smac) = (p.dmac, p.smac);
        m[..6].copy_from_slice(&dmac);
        m[6..].copy_from_slice(&smac);
        m
    };
    if ctx.store(0, &macs, 0).is_err() {
        return TC_ACT_SHOT;
    }
    count(Counter::XdpRedirect);
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
