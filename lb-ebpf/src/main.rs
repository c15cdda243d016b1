//! The XDP data path: per-source rate limiting, Maglev load balancing with a flow table, NAT
//! and forwarding, in one pass.
//!
//! Two entry points share everything:
//! - `lb_uplink`, on the interfaces clients' traffic arrives on (and, in snat mode, remote
//!   backends' replies);
//! - `lb_backend`, on the interfaces facing local backends (pod veths), where it translates
//!   their replies. It never starts a flow: pods' own traffic goes to the kernel.
//!
//! Verdicts:
//! - XDP_PASS, untouched: anything not addressed to what we serve (one bitmap read decides);
//!   packets to this node's own address that are not replies of our flows.
//! - XDP_TX / XDP_REDIRECT, rewritten: packets of flows, new and established, and ICMP we
//!   translate or answer. XDP_PASS, rewritten, when the kernel must finish the job (see nexthop).
//! - XDP_DROP, counted: to a VIP without a service on that port/protocol, fragments and
//!   unsupported IPv6 extension headers to a VIP, malformed packets to a VIP, other ICMP to a VIP,
//!   and what the rate limiter rejects.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// BPF_CMPXCHG / BPF_XADD for the rate limiter's buckets (see ratelimit.rs).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod datapath {
    use aya_ebpf::{
        bindings::xdp_action, helpers::generated::bpf_ktime_get_coarse_ns, macros::xdp,
        programs::XdpContext,
    };
    use lb_common::{
        Addr, Counter, FILTER_WORDS, FLOW_REPLY, FLOW_RESET, Flow, FlowKey, IPPROTO_ICMP,
        IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, ServiceKey, filter_bit,
    };

    use crate::{
        flow,
        maps::{
            LB_BE_STATS, LB_FILTER, LB_SERVICES, LB_SVC_STATS, config, count, count_service_drop,
            scratch,
        },
        nexthop, not_served,
        parse::{L4State, Packet, TCP_ACK, TCP_SYN, parse_l3, parse_ports},
        ratelimit::{self, Verdict},
        rewrite, tcp,
    };

    /// Which filter plane an address is looked up in.
    #[derive(Clone, Copy)]
    enum Plane {
        /// VIPs and node addresses: destinations the data path serves.
        Served = 0,
        /// Addresses of backends on this node.
        LocalBackend = 1,
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Side {
        Uplink,
        Backend,
    }

    #[xdp]
    pub fn lb_uplink(ctx: XdpContext) -> u32 {
        handle(&ctx, Side::Uplink)
    }

    #[xdp]
    pub fn lb_backend(ctx: XdpContext) -> u32 {
        handle(&ctx, Side::Backend)
    }

    #[inline(always)]
    fn in_filter(plane: Plane, addr: &Addr) -> bool {
        let bit = filter_bit(addr);
        let word = plane as u32 * FILTER_WORDS + bit / 64;
        match LB_FILTER.get(word) {
            Some(w) => w & (1u64 << (bit % 64)) != 0,
            None => false,
        }
    }

    #[inline(never)]
    fn handle(ctx: &XdpContext, side: Side) -> u32 {
        count(Counter::Packets);
        let mut pkt = Packet::EMPTY;
        if !parse_l3(ctx, &mut pkt) {
            return xdp_action::XDP_PASS;
        }
        let pkt = &pkt;
        let ours = match side {
            Side::Uplink => in_filter(Plane::Served, &pkt.dst),
            Side::Backend => {
                in_filter(Plane::Served, &pkt.dst) || in_filter(Plane::LocalBackend, &pkt.src)
            }
        };
        if !ours {
            count(Counter::PassNotOurs);
            return xdp_action::XDP_PASS;
        }
        match pkt.l4_state {
            L4State::Present => {}
            L4State::Fragment => return not_served(pkt, Counter::DropFragment),
            L4State::UnsupportedExtension => {
                return not_served(pkt, Counter::DropIpv6Extension);
            }
        }
        match pkt.proto {
            IPPROTO_TCP | IPPROTO_UDP => transport(ctx, pkt, side),
            IPPROTO_ICMP if !pkt.v6 => crate::icmp::handle(ctx, pkt),
            IPPROTO_ICMPV6 if pkt.v6 => crate::icmp::handle(ctx, pkt),
            _ => not_served(pkt, Counter::DropNoService),
        }
    }

    #[inline(never)]
    fn transport(ctx: &XdpContext, pkt: &Packet, side: Side) -> u32 {
        let Some(ports) = parse_ports(ctx, pkt) else {
            return not_served(pkt, Counter::DropMalformed);
        };
        let Some(cfg) = config() else {
            return xdp_action::XDP_PASS;
        };
        let key = FlowKey::new(pkt.src, pkt.dst, ports.sport, ports.dport, pkt.proto);
        // The one clock read of this packet: flow timestamps and rate limiting share it.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        if let Some(entry) = flow::lookup(&key, ports.tcp_flags, now, cfg) {
            return established(ctx, pkt, entry, now);
        }
        if side == Side::Backend {
            // A local backend's own connection, not a reply of ours.
            count(Counter::PassNotOurs);
            return xdp_action::XDP_PASS;
        }
        let syn = pkt.proto == IPPROTO_TCP && ports.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        new_flow(ctx, pkt, &key, syn, now)
    }

    /// A packet of a flow in the table. (A BPF subprogram, like `new_flow`: each keeps its own
    /// stack frame, so the two paths' locals do not add up against the 512-byte limit.)
    #[inline(never)]
    fn established(ctx: &XdpContext, pkt: &Packet, entry: *mut Flow, now: u64) -> u32 {
        // Copy out what we need: other CPUs may be updating the entry.
        let flow = unsafe { *entry };
        if flow.flags & FLOW_RESET != 0 && pkt.proto == IPPROTO_TCP {
            return tcp::reset(ctx, pkt);
        }
        if flow.flags & FLOW_REPLY == 0 {
            let how = if pkt.v6 { ratelimit::V6 } else { 0 };
            match ratelimit::check(u32::from(flow.policy), &pkt.src, how, now) {
                Verdict::Pass => {}
                Verdict::Drop(reason) | Verdict::Reset(reason) => {
                    count_service_drop(flow.service, reason);
                    return xdp_action::XDP_DROP;
                }
            }
        }
        forward(ctx, pkt, &flow)
    }

    /// A packet that matches no flow: find its service, rate-limit, create the flow.
    #[inline(never)]
    fn new_flow(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, syn: bool, now: u64) -> u32 {
        let Some(cfg) = config() else {
            return xdp_action::XDP_PASS;
        };
        let skey = ServiceKey {
            addr: key.dst,
            port: key.dport,
            proto: key.proto,
            _pad: 0,
        };
        let Some(svc) = LB_SERVICES.get_ptr(&skey) else {
            return not_served(pkt, Counter::DropNoService);
        };
        let svc = unsafe { *svc };
        // Every new flow counts as a connection: a SYN, a UDP flow's first packet, and a TCP
        // packet without state (it would create state too).
        let mut how = ratelimit::NEW_FLOW;
        if pkt.v6 {
            how |= ratelimit::V6;
        }
        if syn {
            how |= ratelimit::SYN;
        }
        match ratelimit::check(svc.policy, &key.src, how, now) {
            Verdict::Pass => {}
            Verdict::Drop(reason) => {
                count_service_drop(svc.id, reason);
                return xdp_action::XDP_DROP;
            }
            Verdict::Reset(reason) => {
                count_service_drop(svc.id, reason);
                return tcp::reset(ctx, pkt);
            }
        }
        if !syn && pkt.proto == IPPROTO_TCP {
            count(Counter::FlowsCreatedMidstream);
        }
        if let Err(reason) = flow::create(key, &svc, cfg, now) {
            count_service_drop(svc.id, reason);
            return xdp_action::XDP_DROP;
        }
        match scratch() {
            Some(s) => forward(ctx, pkt, &s.flow),
            None => xdp_action::XDP_DROP,
        }
    }

    /// Applies a flow entry's rewrite, counts the packet and sends it on.
    #[inline(never)]
    fn forward(ctx: &XdpContext, pkt: &Packet, flow: &Flow) -> u32 {
        let addrs = [flow.src, flow.dst];
        if rewrite::set_tuple(ctx, pkt, &addrs, flow.sport, flow.dport).is_none() {
            count(Counter::DropMalformed);
            return xdp_action::XDP_DROP;
        }
        let bytes = u64::from(pkt.len);
        if let Some(s) = LB_SVC_STATS.get_ptr_mut(flow.service) {
            let s = unsafe { &mut *s };
            if flow.flags & FLOW_REPLY == 0 {
                s.packets += 1;
                s.bytes += bytes;
            } else {
                s.reply_packets += 1;
                s.reply_bytes += bytes;
            }
        }
        if flow.flags & FLOW_REPLY == 0
            && let Some(b) = LB_BE_STATS.get_ptr_mut(flow.backend)
        {
            let b = unsafe { &mut *b };
            b.packets += 1;
            b.bytes += bytes;
        }
        nexthop::send(ctx, pkt, &addrs)
    }
}

#[cfg(target_arch = "bpf")]
mod flow;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nexthop;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod ratelimit;
#[cfg(target_arch = "bpf")]
mod rewrite;
#[cfg(target_arch = "bpf")]
mod tcp;

/// Is `addr` a VIP (as opposed to a node address, which shares the filter)?
#[cfg(target_arch = "bpf")]
#[inline(always)]
fn is_vip(addr: &lb_common::Addr) -> bool {
    match maps::LB_ADDRS.get_ptr(addr) {
        Some(a) => (unsafe { (*a).flags } & lb_common::ADDR_VIP) != 0,
        None => false,
    }
}

/// A packet we do not balance: dropped and counted if addressed to a VIP, else the kernel's.
#[cfg(target_arch = "bpf")]
#[inline(always)]
fn not_served(pkt: &parse::Packet, counter: lb_common::Counter) -> u32 {
    if is_vip(&pkt.dst) {
        maps::count(counter);
        aya_ebpf::bindings::xdp_action::XDP_DROP
    } else {
        maps::count(lb_common::Counter::PassNotOurs);
        aya_ebpf::bindings::xdp_action::XDP_PASS
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program with a reachable panic; this is never linked in.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// On the host this crate builds to nothing: lb-userspace's build script compiles it for BPF.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
