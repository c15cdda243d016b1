//! The handoff: how a packet for a local pod behind a policy hook (its host veth's delivery is
//! `kernel`) reaches that veth's TC egress hook without passing netfilter.
//!
//! XDP cannot reach a TC egress hook: a frame it redirects into the veth skips it. Handed to the
//! kernel's forwarding (XDP_PASS) the packet meets conntrack and netfilter's FORWARD, which see
//! only the client's direction of a balanced flow (the replies are translated by `lb_backend`
//! at the veth's ingress) and take the client's ACK after the SYN for INVALID: kube-proxy's
//! `ctstate INVALID -j DROP` then kills every TCP connection. So `lb_uplink` rewrites the packet
//! as for a redirect (TTL too), puts [`HANDOFF_MAC`] in its source MAC and passes it (the
//! destination MAC stays the uplink's, so without `lb_uplink_tc` the kernel forwards it as
//! before). `lb_uplink_tc`, at the uplink's TC ingress (which runs as the kernel takes the skb in,
//! before IP receive, conntrack and routing), checks that the packet belongs to a live balanced
//! flow (its backend's reply entry exists), finds the pod veth and MACs as `lb_uplink` did, and
//! redirects it to the veth's egress (bpf_redirect without BPF_F_INGRESS: dev_queue_xmit, whose
//! sch_handle_egress runs the veth's TCX programs and clsact egress filters, where a CNI's
//! network policy judges it). Netfilter never sees it.
//!
//! A marker in the packet rather than XDP metadata: drivers that give XDP no metadata room
//! (ENA, the NIC of the EC2 nodes we target, among them) keep packet bytes, and so does the
//! kernel when it strips a VLAN tag. Anyone can send a frame with that source MAC; the flow check
//! is what makes it safe: a frame is redirected only as a packet of a live balanced flow,
//! rewritten, to where that flow's packets go anyway (through the veth's policy hook). Everything
//! else, marked or not, goes on to the kernel untouched.
use aya_ebpf::{
    helpers::generated::{bpf_redirect, bpf_skb_vlan_pop},
    macros::classifier,
    programs::{TcContext, XdpContext},
};
use lb_common::{Counter, FlowAddr, FlowKey, HANDOFF_MAC, HOP_VLAN, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    family::{Family, Ipv4, Ipv6},
    flow,
    maps::{config, count, packet, scratch, tick_clock},
    nexthop::{self, Route},
    parse::{Packet, Ports, State, load, parse_l3, parse_ports, ptr_at, store},
    tc::{HEADROOM, TCX_NEXT, fib_of_skb},
};

/// [`HANDOFF_MAC`] as the three 16-bit words the frame holds.
#[inline(always)]
fn marker() -> [u16; 3] {
    let m = HANDOFF_MAC;
    [
        u16::from_ne_bytes([m[0], m[1]]),
        u16::from_ne_bytes([m[2], m[3]]),
        u16::from_ne_bytes([m[4], m[5]]),
    ]
}

/// Marks the frame handed over: [`HANDOFF_MAC`] as its source MAC. False if it cannot (the
/// caller then passes it unmarked, to the kernel's forwarding).
#[inline(always)]
pub fn mark(ctx: &XdpContext) -> bool {
    let Some(eth) = ptr_at::<[u16; 6]>(ctx, 0) else {
        return false;
    };
    let eth: *mut u8 = eth.cast();
    for (i, word) in marker().iter().enumerate() {
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        unsafe { store(eth.add(6 + 2 * i), *word) };
    }
    true
}

/// At the uplinks' TC ingress: a handed-over packet goes to its pod veth's egress; everything
/// else on to the kernel untouched.
#[classifier]
pub fn lb_uplink_tc(ctx: TcContext) -> i32 {
    if !marked(&ctx) {
        return TCX_NEXT;
    }
    deliver(&ctx)
}

/// Whether the frame's source MAC is [`HANDOFF_MAC`]: the one test every packet the kernel takes
/// in on the uplink pays.
#[inline(always)]
fn marked(ctx: &TcContext) -> bool {
    let Some(src) = ptr_at::<[u16; 3]>(ctx, 6) else {
        return false;
    };
    let src: *const u8 = src.cast();
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
    let words: [u16; 3] = unsafe { [load(src), load(src.add(2)), load(src.add(4))] };
    words == marker()
}

#[inline(never)]
fn deliver(ctx: &TcContext) -> i32 {
    let _ = ctx.pull_data(HEADROOM.min(ctx.len()));
    let Some(pkt) = packet() else {
        return TCX_NEXT;
    };
    if !parse_l3(ctx, pkt) {
        return TCX_NEXT;
    }
    let pkt: &Packet = pkt;
    if pkt.state != State::Present || (pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP) {
        return TCX_NEXT;
    }
    let Some(ports) = parse_ports(ctx, pkt) else {
        return TCX_NEXT;
    };
    let ours = if pkt.v6 {
        balanced::<Ipv6>(pkt, &ports)
    } else {
        balanced::<Ipv4>(pkt, &ports)
    };
    if !ours {
        return TCX_NEXT;
    }
    send(ctx, pkt, &ports)
}

/// Whether the (rewritten) packet belongs to a live balanced flow: its backend's reply entry,
/// keyed as the backend sends, resolves. Read only: `lb_uplink` refreshed the flow already.
#[inline(never)]
fn balanced<F: Family>(pkt: &Packet, ports: &Ports) -> bool {
    let key = FlowKey::new(
        F::A::from_addr(&pkt.dst),
        F::A::from_addr(&pkt.src),
        ports.dport,
        ports.sport,
        pkt.proto,
    );
    let Some(entry) = config().and_then(|cfg| flow::find::<F>(&key, cfg)) else {
        return false;
    };
    // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
    flow::resolve(unsafe { &*entry }).is_some_and(|t| t.reply)
}

/// Sends a handed-over packet to its pod veth's egress, as `lb_uplink` routed it; a packet whose
/// next hop is no longer behind a policy hook goes on to the kernel.
#[inline(never)]
fn send(ctx: &TcContext, pkt: &Packet, ports: &Ports) -> i32 {
    let Some(s) = scratch() else {
        return TCX_NEXT;
    };
    let (fib, mtu_len) = fib_of_skb(ctx, pkt, ports);
    let now_ns = tick_clock(s);
    let next = &mut s.next;
    let route = nexthop::route(&fib, &pkt.src, &pkt.dst, mtu_len, now_ns, next);
    if route != Route::PolicyHook || next.vlan & HOP_VLAN != 0 {
        return TCX_NEXT;
    }
    // The kernel took a VLAN tag off into the skb; the pod gets the packet untagged.
    // SAFETY: the program's context.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0
        // SAFETY: `ctx.skb.skb` is the program's context; no packet pointer taken before the call is used after it.
        && unsafe { bpf_skb_vlan_pop(ctx.skb.skb.cast()) } != 0
    {
        return TCX_NEXT;
    }
    let mut macs = [0u8; 12];
    for (i, w) in next.macs.iter().enumerate() {
        let b = w.to_ne_bytes();
        macs[2 * i] = b[0];
        macs[2 * i + 1] = b[1];
    }
    if ctx.store(0, &macs, 0).is_err() {
        return TCX_NEXT;
    }
    count(Counter::RedirectPolicyHook);
    // SAFETY: a helper taking integers only.
    unsafe { bpf_redirect(next.ifindex, 0) as i32 }
}
