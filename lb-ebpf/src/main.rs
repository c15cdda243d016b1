//! The XDP data path: per-source rate limiting, Maglev load balancing with a flow table, NAT
//! and forwarding, in one pass.
//!
//! Programs:
//! - `lb_uplink` (XDP), attached to the interfaces clients' traffic arrives on (and, in snat
//!   mode, remote backends' replies). It handles established flows itself: the fast path has no
//!   tail call.
//! - `lb_new_flow` and `lb_icmp` (XDP), the slow paths, tail-called through LB_PROGS. Split off
//!   so the verifier checks each on its own (one program with everything would need most of its
//!   instruction budget).
//! - `lb_backend` (TC, see tc.rs), on the interfaces facing local backends: their replies.
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
// Map keys and values go by reference: by value they would be copied onto the 512-byte stack.
#![allow(clippy::needless_borrows_for_generic_args)]

#[cfg(target_arch = "bpf")]
mod datapath {
    use aya_ebpf::{
        bindings::xdp_action,
        helpers::generated::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
        macros::xdp,
        programs::XdpContext,
    };
    use lb_common::{
        Addr, Counter, FILTER_WORDS, FLOW_REPLY, FLOW_RESET, Flow, FlowKey, HOP_VLAN, IPPROTO_ICMP,
        IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, POLICY_PRECISE_CLOCK, ServiceKey, TAIL_ICMP,
        TAIL_NEW_FLOW, filter_bit, hop_epoch,
    };

    use crate::{
        flow,
        maps::{
            LB_BE_STATS, LB_FILTER, LB_FLOWS, LB_POLICIES, LB_PROGS, LB_SERVICES, LB_SVC_POLICY,
            LB_SVC_STATS, config, count, count_service_drop, scratch,
        },
        nexthop::{self, Hop, Macs},
        not_served,
        parse::{L4State, Packet, Ports, TCP_ACK, TCP_SYN, bounds, parse_l3, parse_ports},
        ratelimit::{self, Verdict},
        rewrite, tcp,
    };

    /// Which filter plane an address is looked up in (plane 1, local backends, is tc.rs's).
    #[derive(Clone, Copy)]
    enum Plane {
        /// VIPs and node addresses: destinations the data path serves.
        Served = 0,
    }

    #[xdp]
    pub fn lb_uplink(ctx: XdpContext) -> u32 {
        entry(&ctx)
    }

    /// Tail-called (TAIL_NEW_FLOW) for a TCP/UDP packet to a served address that matched no
    /// flow, from the uplink side.
    #[xdp]
    pub fn lb_new_flow(ctx: XdpContext) -> u32 {
        new_flow_stage(&ctx)
    }

    /// Tail-called (TAIL_ICMP) for ICMP and ICMPv6 to a served address.
    #[xdp]
    pub fn lb_icmp(ctx: XdpContext) -> u32 {
        let mut pkt = Packet::EMPTY;
        if !parse_l3(&ctx, &mut pkt) {
            return xdp_action::XDP_DROP;
        }
        crate::icmp::handle(&ctx, &pkt)
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
    fn entry(ctx: &XdpContext) -> u32 {
        count(Counter::Packets);
        let mut pkt = Packet::EMPTY;
        if !parse_l3(ctx, &mut pkt) {
            return xdp_action::XDP_PASS;
        }
        let pkt = &pkt;
        if !in_filter(Plane::Served, &pkt.dst) {
            count(Counter::PassNotOurs);
            return xdp_action::XDP_PASS;
        }
        // A frame cut shorter than its IP length says (padding beyond it is fine).
        let (start, end) = bounds(ctx);
        if start + pkt.l3 + pkt.len as usize > end {
            return not_served(pkt, Counter::DropMalformed);
        }
        match pkt.l4_state {
            L4State::Present => {}
            L4State::Fragment => return not_served(pkt, Counter::DropFragment),
            L4State::UnsupportedExtension => {
                return not_served(pkt, Counter::DropIpv6Extension);
            }
        }
        match pkt.proto {
            IPPROTO_TCP | IPPROTO_UDP => transport(ctx, pkt),
            IPPROTO_ICMP if !pkt.v6 => tail_call(ctx, TAIL_ICMP),
            IPPROTO_ICMPV6 if pkt.v6 => tail_call(ctx, TAIL_ICMP),
            _ => not_served(pkt, Counter::DropNoService),
        }
    }

    /// Continues in a slow-path program; returns only if the tail call fails.
    #[inline(always)]
    fn tail_call(ctx: &XdpContext, slot: u32) -> u32 {
        // SAFETY: the program array holds XDP programs of this object (or nothing).
        unsafe { LB_PROGS.tail_call(ctx, slot) };
        count(Counter::TailCallFailed);
        xdp_action::XDP_DROP
    }

    #[inline(always)]
    fn precise_now() -> u64 {
        unsafe { bpf_ktime_get_ns() }
    }

    #[inline(always)]
    fn coarse_now() -> u64 {
        unsafe { bpf_ktime_get_coarse_ns() }
    }

    #[inline(always)]
    fn flow_key(pkt: &Packet, ports: &Ports) -> FlowKey {
        FlowKey::new(pkt.src, pkt.dst, ports.sport, ports.dport, pkt.proto)
    }

    #[inline(never)]
    fn transport(ctx: &XdpContext, pkt: &Packet) -> u32 {
        let Some(ports) = parse_ports(ctx, pkt) else {
            return not_served(pkt, Counter::DropMalformed);
        };
        let Some(cfg) = config() else {
            return xdp_action::XDP_PASS;
        };
        let key = flow_key(pkt, &ports);
        let entry = LB_FLOWS.get_ptr_mut(&key);
        // The one clock read of this packet, shared by the flow's timestamp and the rate
        // limiter; for a new flow the slow path reads it, once it knows the service.
        let mut now = 0;
        if let Some(e) = entry {
            // The client's packets are held to its service's policy.
            let policy = if unsafe { (*e).flags } & FLOW_REPLY == 0 {
                LB_SVC_POLICY
                    .get(unsafe { (*e).service })
                    .copied()
                    .unwrap_or(0)
            } else {
                0
            };
            now = clock_for(policy);
            if flow::refresh(e, ports.tcp_flags, now, cfg) {
                return established(ctx, pkt, e, policy, now);
            }
        }
        match scratch() {
            // 0: not read yet.
            Some(s) => s.now = now,
            None => return xdp_action::XDP_DROP,
        }
        tail_call(ctx, TAIL_NEW_FLOW)
    }

    /// Now, from the clock rate-limit policy `policy` needs (0: none): the precise one if one of
    /// its limits is too fast for the coarse one (POLICY_PRECISE_CLOCK), else the cheaper coarse
    /// one (CLOCK_MONOTONIC both, a tick apart at most). A policy's buckets see one clock only:
    /// mixing them would move time backwards by up to a tick, and cost an exact bucket a token.
    #[inline(always)]
    fn clock_for(policy: u32) -> u64 {
        let precise = policy != 0
            && LB_POLICIES
                .get(policy)
                .is_none_or(|p| p.flags & POLICY_PRECISE_CLOCK != 0);
        if precise { precise_now() } else { coarse_now() }
    }

    /// A packet of a flow in the table; `policy`: the rate-limit policy for the client's packets.
    #[inline(never)]
    fn established(ctx: &XdpContext, pkt: &Packet, entry: *mut Flow, policy: u32, now: u64) -> u32 {
        // Copy out what we need: other CPUs may be updating the entry.
        let flow = unsafe { *entry };
        if flow.flags & FLOW_RESET != 0 && pkt.proto == IPPROTO_TCP {
            return tcp::reset(ctx, pkt);
        }
        if flow.flags & FLOW_REPLY == 0 {
            let how = if pkt.v6 { ratelimit::V6 } else { 0 };
            match ratelimit::check(policy, &pkt.src, how, now) {
                Verdict::Pass => {}
                Verdict::Drop(reason) | Verdict::Reset(reason) => {
                    count_service_drop(flow.service, reason);
                    return xdp_action::XDP_DROP;
                }
            }
        }
        forward(ctx, pkt, &flow, entry, now)
    }

    /// The new-flow slow path: find the service, rate-limit, create the flow, forward.
    #[inline(always)]
    fn new_flow_stage(ctx: &XdpContext) -> u32 {
        // The entry program checked all of this already; parsing again is cheaper than passing
        // the results along.
        let mut pkt = Packet::EMPTY;
        if !parse_l3(ctx, &mut pkt) {
            return xdp_action::XDP_DROP;
        }
        let pkt = &pkt;
        let Some(ports) = parse_ports(ctx, pkt) else {
            return xdp_action::XDP_DROP;
        };
        let (Some(cfg), Some(s)) = (config(), scratch()) else {
            return xdp_action::XDP_DROP;
        };
        let now = s.now;
        let key = flow_key(pkt, &ports);
        let syn = pkt.proto == IPPROTO_TCP && ports.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        new_flow(ctx, pkt, &key, syn, now, cfg)
    }

    #[inline(always)]
    fn new_flow(
        ctx: &XdpContext,
        pkt: &Packet,
        key: &FlowKey,
        syn: bool,
        now: u64,
        cfg: &lb_common::Config,
    ) -> u32 {
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
        // Read in the entry program already if an expired entry was there.
        let now = if now != 0 { now } else { clock_for(svc.policy) };
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
        if let Err(reason) = flow::create(key, &svc, cfg, now, syn) {
            count_service_drop(svc.id, reason);
            return xdp_action::XDP_DROP;
        }
        match scratch() {
            Some(s) => forward(ctx, pkt, &s.flow, core::ptr::null_mut(), now),
            None => xdp_action::XDP_DROP,
        }
    }

    /// Applies a flow entry's rewrite, counts the packet and sends it on: to the next hop the
    /// entry has cached, or (null `entry`, or nothing current cached) the FIB's, which is then
    /// cached in the entry. A FIB lookup is the largest single cost of an established packet.
    #[inline(never)]
    fn forward(ctx: &XdpContext, pkt: &Packet, flow: &Flow, entry: *mut Flow, now: u64) -> u32 {
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
        if flow.hop_valid(now) {
            let vlan = (flow.hop_vlan & HOP_VLAN != 0).then_some(flow.hop_vlan & 0x0fff);
            return nexthop::transmit(ctx, pkt.vlan, flow.hop_ifindex, vlan, Macs(flow.hop_macs));
        }
        match nexthop::route(ctx, pkt.v6, &addrs, pkt.len) {
            Hop::Verdict(v) => v,
            Hop::Device {
                ifindex,
                vlan_id,
                macs,
            } => {
                if !entry.is_null() {
                    // SAFETY: a flow-table value. Another CPU may write the same hop at once;
                    // the epoch goes last so a reader sees a current epoch only after the rest.
                    unsafe {
                        (*entry).hop_macs = macs.0;
                        (*entry).hop_vlan = vlan_id.map_or(0, |v| HOP_VLAN | v);
                        (*entry).hop_ifindex = ifindex;
                        (*entry).hop_epoch = hop_epoch(now);
                    }
                }
                nexthop::transmit(ctx, pkt.vlan, ifindex, vlan_id, macs)
            }
        }
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
mod tc;
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
