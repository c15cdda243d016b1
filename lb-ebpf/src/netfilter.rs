//! `lb_uplink_out`: the way back for flows into pods whose delivery is `netfilter`, at the
//! uplinks' TC egress.
//!
//! Netfilter's forward path (kube-proxy's `ctstate INVALID` drop, Calico's iptables policies)
//! can judge balanced traffic only if the kernel forwards both directions of a flow, as it would
//! have without us. So for such a pod `lb_uplink` rewrites the client's packet to the pod, keeps
//! the client's address (no snat: the node is the pod's gateway, its replies come back this way
//! anyway) and passes it to the kernel's forwarding (see `Route::Netfilter`); the pod's reply
//! (pod -> client) goes on untranslated at `lb_backend`, so conntrack pairs it with the client's
//! packet and the forward rules see it too. Only once the kernel sends it out of an uplink does
//! this program put the VIP back as its source: after netfilter, before the wire.
//!
//! Every packet the kernel sends out of an uplink runs this while some interface is
//! `netfilter`; all but our replies stop at one filter test (is the source a local backend?).
use aya_ebpf::{bindings::TC_ACT_SHOT, macros::classifier, programs::TcContext};
use lb_common::{Counter, FLOW_NETFILTER, IPPROTO_TCP, IPPROTO_UDP, filter::Plane};

use crate::{
    family::{Ipv4, Ipv6},
    maps::{count, in_filter, packet, scratch},
    parse::{Packet, State, ipv4_checksum_ok, parse_l3, parse_ports},
    tc::{HEADROOM, TCX_NEXT, count_reply, lookup, rewrite},
};

#[classifier]
pub fn lb_uplink_out(ctx: TcContext) -> i32 {
    out(&ctx)
}

/// A `netfilter` flow's entry.
#[inline(always)]
fn is_netfilter(flags: u8) -> bool {
    flags & FLOW_NETFILTER != 0
}

#[inline(never)]
fn out(ctx: &TcContext) -> i32 {
    let _ = ctx.pull_data(HEADROOM.min(ctx.len()));
    let Some(pkt) = packet() else {
        return TCX_NEXT;
    };
    if !parse_l3(ctx, pkt) {
        return TCX_NEXT;
    }
    let pkt: &Packet = pkt;
    if !in_filter(Plane::PreservedBackends, &pkt.src)
        || pkt.state != State::Present
        || (pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP)
    {
        return TCX_NEXT;
    }
    // Malformed, as lb_backend has it (the kernel writes valid ones: this never costs a reply).
    if !pkt.v6 && !ipv4_checksum_ok(ctx, pkt.l3, pkt.l4) {
        return TCX_NEXT;
    }
    let Some(ports) = parse_ports(ctx, pkt) else {
        return TCX_NEXT;
    };
    let replied = if pkt.v6 {
        lookup::<Ipv6>(pkt, &ports, is_netfilter)
    } else {
        lookup::<Ipv4>(pkt, &ports, is_netfilter)
    };
    if !replied {
        return TCX_NEXT;
    }
    let Some(s) = scratch() else {
        return TCX_NEXT;
    };
    // The kernel's forwarding decremented the TTL already.
    if rewrite(ctx, pkt, &s.target, false).is_none() {
        count(Counter::DropMalformed);
        return TC_ACT_SHOT;
    }
    count_reply(&s.target, pkt.len);
    count(Counter::ReplyNetfilter);
    TCX_NEXT
}
