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
//! - `lb_uplink_tc` (TC, see handoff.rs), at the uplinks' TC ingress while a backend interface
//!   is `kernel`: delivers the packets `lb_uplink` hands over to pod veths' egress.
//! - `lb_uplink_out` (TC, see netfilter.rs), at the uplinks' TC egress while a backend interface
//!   is `netfilter`: translates the replies the kernel forwarded from its pods.
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
// aya's #[xdp] and #[classifier] macros want the program function to take its context by value.
#![allow(clippy::needless_pass_by_value)]
// Casts between integer widths are the data path's idiom: packet offsets and lengths (under
// 64 KiB, bounded where the verifier needs it) into helper arguments and header fields, map
// indexes (under max_entries) into u32 keys, bytes unpacked from words. A try_from would add a
// branch the verifier follows on every path, for a case that cannot occur.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "bounded packet offsets and map indexes, see above"
)]

#[cfg(target_arch = "bpf")]
mod datapath {
    use aya_ebpf::{
        bindings::xdp_action, helpers::generated::bpf_ktime_get_ns, macros::xdp,
        programs::XdpContext,
    };
    use lb_common::{
        Counter, DropReason, FLOW_NETFILTER, FLOW_RESET, FLOW_SNAT, HOP_VLAN, IPPROTO_ICMP,
        IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, MAC_SLOTS, POLICY_PRECISE_CLOCK, SVC_SNAT,
        ServiceKey, TAIL_ICMP, TAIL_NEW_FLOW,
        filter::Plane,
        flow_clock,
        hash::flow_hash,
        net::{TCP_ACK, TCP_SYN},
    };

    use crate::{
        drop_for,
        family::{Family, Ipv4, Ipv6, key_of},
        flow::{self, Opened, Target},
        is_client,
        maps::{
            LB_BE_STATS, LB_MACS, LB_POLICIES, LB_PROGS, LB_SERVICES, LB_SVC_STATS, Scratch,
            config, count, in_filter, packet, scratch, tick_clock,
        },
        nexthop::{self, Fib, Next, Route},
        not_served,
        parse::{
            Packet, Ports, State, ipv4_checksum_ok_inline, load, parse_l3, parse_l3_inline,
            parse_ports, ptr_at,
        },
        ratelimit::{self, Verdict},
        rewrite, sources, tcp,
    };

    #[xdp]
    pub fn lb_uplink(ctx: XdpContext) -> u32 {
        entry(&ctx)
    }

    /// Tail-called (TAIL_NEW_FLOW) for a TCP/UDP packet to a served address that matched no
    /// flow (or a TCP SYN, which is not looked up first), from the uplink side.
    #[xdp]
    pub fn lb_new_flow(ctx: XdpContext) -> u32 {
        new_flow_stage(&ctx)
    }

    /// Tail-called (TAIL_ICMP) for ICMP and ICMPv6 to a served address.
    #[xdp]
    pub fn lb_icmp(ctx: XdpContext) -> u32 {
        let Some(pkt) = packet() else {
            return xdp_action::XDP_DROP;
        };
        if !parse_l3(&ctx, pkt) {
            return xdp_action::XDP_DROP;
        }
        crate::icmp::handle(&ctx, pkt)
    }

    /// The per-packet path, from here to the rewritten packet's send, is one BPF function: each
    /// subprogram call costs a call, a prologue saving every callee-saved register and (in a
    /// program with tail calls) the tail-call counter's hand-over; about as much as the rest of
    /// an established flow's work together. Only the rare branches (resets, the slow paths' tail
    /// calls) call out; the rate limiter's check is inline too.
    #[inline(always)]
    fn entry(ctx: &XdpContext) -> u32 {
        count(Counter::Packets);
        let Some(pkt) = packet() else {
            return xdp_action::XDP_PASS;
        };
        if !parse_l3_inline(ctx, pkt) {
            return xdp_action::XDP_PASS;
        }
        let pkt: &Packet = pkt;
        // Read once: the context's field is three dependent loads (rxq, its device, its index).
        let ifindex = ctx.ingress_ifindex() as u32;
        if !in_filter(Plane::Served, &pkt.dst) || !addressed_to_us(ctx, ifindex) {
            count(Counter::PassNotOurs);
            return xdp_action::XDP_PASS;
        }
        match pkt.state {
            State::Present => {}
            State::Malformed => return not_served(pkt, Counter::DropMalformed),
            State::Fragment => return not_served(pkt, Counter::DropFragment),
            State::UnsupportedExtension => {
                return not_served(pkt, Counter::DropIpv6Extension);
            }
        }
        if !pkt.v6 && !ipv4_checksum_ok_inline(ctx, pkt.l3, pkt.l4) {
            return not_served(pkt, Counter::DropMalformed);
        }
        match pkt.proto {
            IPPROTO_TCP | IPPROTO_UDP => transport(ctx, pkt, ifindex),
            IPPROTO_ICMP if !pkt.v6 => tail_call(ctx, TAIL_ICMP),
            IPPROTO_ICMPV6 if pkt.v6 => tail_call(ctx, TAIL_ICMP),
            _ => not_served(pkt, Counter::DropNoService),
        }
    }

    /// Whether the frame was sent to the MAC of the interface it arrived on (the kernel forwards
    /// only what was; a bridge or a promiscuous NIC may hand us other hosts' frames).
    #[inline(always)]
    fn addressed_to_us(ctx: &XdpContext, ifindex: u32) -> bool {
        let Some(link) = LB_MACS.get(ifindex % MAC_SLOTS) else {
            return false;
        };
        let Some(eth) = ptr_at::<[u16; 3]>(ctx, 0) else {
            return false;
        };
        let eth: *const u8 = eth.cast();
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        let dst: [u16; 3] = unsafe { [load(eth), load(eth.add(2)), load(eth.add(4))] };
        link.ifindex == ifindex && dst == link.mac
    }

    /// Continues in a slow-path program; returns only if the tail call fails.
    #[inline(always)]
    fn tail_call(ctx: &XdpContext, slot: u32) -> u32 {
        // SAFETY: the program array holds XDP programs of this object (or nothing).
        unsafe { LB_PROGS.tail_call(ctx, slot) };
        count(Counter::TailCallFailed);
        // A rare event: the agent's log shows it when its level lets the data path log (else
        // the verifier removes this, the level being a constant of the loaded object).
        aya_log_ebpf::error!(
            ctx,
            target: lb_common::logging::LOG_TARGET,
            "tail call to slow path {} failed: is LB_PROGS filled?",
            slot
        );
        xdp_action::XDP_DROP
    }

    #[inline(always)]
    fn syn_only(tcp_flags: u8) -> bool {
        tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// A TCP or UDP packet to a served address: its flow's, or a new flow's (tail call).
    #[inline(always)]
    fn transport(ctx: &XdpContext, pkt: &Packet, ifindex: u32) -> u32 {
        let Some(ports) = parse_ports(ctx, pkt) else {
            return not_served(pkt, Counter::DropMalformed);
        };
        let Some(s) = scratch() else {
            return xdp_action::XDP_DROP;
        };
        // A SYN opens a flow: the slow path inserts without looking up first, and finds a live
        // flow (a retransmission) through the insert's failure.
        let syn = pkt.proto == IPPROTO_TCP && syn_only(ports.tcp_flags);
        // The clock reading of a packet whose entry had expired (0: none yet, as for a SYN,
        // which skips the lookup).
        let mut read_ns = 0;
        // One call of the family-neutral rest: the verifier walks it once, not once per family.
        let hit = if syn {
            None
        } else if pkt.v6 {
            lookup::<Ipv6>(pkt, &ports, s, &mut read_ns)
        } else {
            lookup::<Ipv4>(pkt, &ports, s, &mut read_ns)
        };
        if let Some(hit) = hit {
            return established(ctx, pkt, &hit, ifindex, s);
        }
        // For the slow path, which takes the packet as parsed here (LB_PACKET) and these.
        // (Scratch memory outlives packets: each is written here, for every packet that goes
        // on; a stale `now` would empty a rate-limit bucket and back-date the new flow.)
        s.ports = ports;
        s.now = read_ns;
        tail_call(ctx, TAIL_NEW_FLOW)
    }

    /// A packet's live flow, as `lookup` found it.
    struct Hit {
        target: Target,
        /// The entry's flags.
        flags: u8,
        /// The packet's clock reading.
        now_ns: u64,
        /// The entry's rate-limit source way (Flow::source_way), and its id word.
        source_way: u32,
        id_way: u32,
        id_way_at: *mut u32,
    }

    /// Finds the packet's flow, if it is live for this packet. Else, if the packet's clock was
    /// read (an expired entry), the reading is in `read_ns`, for the new-flow slow path. (The
    /// hit stays in registers and the stack: the established path is one function.)
    #[inline(always)]
    fn lookup<F: Family>(
        pkt: &Packet,
        ports: &Ports,
        s: &mut Scratch,
        read_ns: &mut u64,
    ) -> Option<Hit> {
        let cfg = config()?;
        let key = key_of::<F>(pkt, ports);
        let entry = flow::find::<F>(&key, cfg)?;
        // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
        let f = unsafe { *entry };
        let t = flow::resolve(&f)?;
        // The one clock read of this packet, shared by the flow's timestamp and the rate
        // limiter; for a new flow the slow path reads it, once it knows the service.
        let now_ns = clock_for(t.policy, s);
        if !flow::refresh::<F>(
            entry,
            &t,
            flow::seen(pkt.proto, ports.tcp_flags),
            flow_clock(now_ns),
            cfg,
        ) {
            *read_ns = now_ns;
            return None;
        }
        Some(Hit {
            target: t,
            flags: f.flags,
            now_ns,
            source_way: f.source_way(),
            id_way: f.id_way,
            // SAFETY: a place in the map value `entry` points at.
            id_way_at: unsafe { &raw mut (*entry).id_way },
        })
    }

    #[inline(always)]
    fn precise_now() -> u64 {
        // SAFETY: a BPF helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    }

    /// Now, from the clock rate-limit policy `policy` needs (0: none): the precise one if one of
    /// its limits is too fast for the coarse one (POLICY_PRECISE_CLOCK), else the cheaper coarse
    /// one (CLOCK_MONOTONIC both, a tick apart at most), as this CPU read it this tick
    /// (maps::tick_clock). A policy's buckets see one clock only: mixing them would move time
    /// backwards by up to a tick, and cost an exact bucket a token.
    #[inline(always)]
    fn clock_for(policy: u32, s: &mut Scratch) -> u64 {
        let precise = policy != 0
            && LB_POLICIES
                .get(policy)
                .is_none_or(|p| p.flags & POLICY_PRECISE_CLOCK != 0);
        if precise {
            precise_now()
        } else {
            tick_clock(s)
        }
    }

    /// A packet of a flow in the table.
    #[inline(always)]
    fn established(
        ctx: &XdpContext,
        pkt: &Packet,
        hit: &Hit,
        ifindex: u32,
        s: &mut Scratch,
    ) -> u32 {
        let (t, flags, now_ns) = (&hit.target, hit.flags, hit.now_ns);
        // The next hop goes to scratch memory too: a struct on the stack would be zeroed
        // first (see mem.rs), and `route` writes what `send` reads.
        if flags & FLOW_RESET != 0 && pkt.proto == IPPROTO_TCP {
            return tcp::reset(ctx, pkt);
        }
        if pkt.ttl <= 1 {
            return drop_for(t.service, DropReason::TtlExceeded);
        }
        // Only clients are limited; without a policy there is nothing to decide (and nothing
        // to commit at the send).
        let limited = !t.reply && t.policy != 0;
        if limited {
            let how = if pkt.v6 { ratelimit::V6 } else { 0 };
            let verdict = ratelimit::check_inline(t.policy, &pkt.src, how, now_ns, hit.source_way);
            // The source moved (or was first found): the flow's next packets look there.
            if s.source_way != hit.source_way {
                // SAFETY: a u32 in the flow's map value, whose id never changes; a race with
                // another CPU loses a hint.
                unsafe { *hit.id_way_at = lb_common::id_way(hit.id_way, s.source_way) };
            }
            match verdict {
                Verdict::Pass => {}
                Verdict::Drop(reason) | Verdict::Reset(reason) => {
                    return drop_for(t.service, reason);
                }
            }
        }
        let fib = Fib {
            ctx: ctx.ctx.cast(),
            ifindex,
            v6: pkt.v6,
        };
        let route = nexthop::route(
            &fib,
            &t.tuple.src,
            &t.tuple.dst,
            pkt.len,
            now_ns,
            &mut s.next,
        );
        send_inline(ctx, pkt, t, route, &s.next, limited, ifindex)
    }

    #[inline(always)]
    fn fib_of(ctx: &XdpContext, pkt: &Packet) -> Fib {
        Fib {
            ctx: ctx.ctx.cast(),
            ifindex: ctx.ingress_ifindex() as u32,
            v6: pkt.v6,
        }
    }

    /// The new-flow slow path, on the packet as `transport` parsed and checked it: LB_PACKET and
    /// scratch().ports are this CPU's, and the tail call runs before anything else can run on
    /// it. (Offsets only: every packet access is bounds-checked again where it is made.)
    #[inline(always)]
    fn new_flow_stage(ctx: &XdpContext) -> u32 {
        let (Some(pkt), Some(s)) = (packet(), scratch()) else {
            return xdp_action::XDP_DROP;
        };
        let pkt: &Packet = pkt;
        let ports = s.ports.clone();
        new_flow(ctx, pkt, &ports)
    }

    /// Finds the service, checks the source, picks a backend and a route to it, rate-limits,
    /// creates the flow and forwards. Nothing is created for a packet that is dropped. Only the
    /// flow table's part depends on the family: the verifier walks the rest once.
    #[inline(never)]
    fn new_flow(ctx: &XdpContext, pkt: &Packet, ports: &Ports) -> u32 {
        let (Some(cfg), Some(s)) = (config(), scratch()) else {
            return xdp_action::XDP_DROP;
        };
        let read_ns = s.now;
        let skey = ServiceKey::new(pkt.dst, ports.dport, pkt.proto);
        // Read in place, not copied: a map value's fields are plain numbers to the verifier, where
        // copies on the stack would be followed value by value (the kernel swaps in a whole new
        // element on update, so the fields read are of one version).
        let Some(svc) = LB_SERVICES.get_ptr(&skey) else {
            return not_served(pkt, Counter::DropNoService);
        };
        // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
        let svc = unsafe { &*svc };
        if !is_client(pkt) {
            count(Counter::DropBadSource);
            return xdp_action::XDP_DROP;
        }
        if pkt.ttl <= 1 {
            return drop_for(svc.id, DropReason::TtlExceeded);
        }
        if !sources::allowed(svc, &pkt.src) {
            return drop_for(svc.id, DropReason::SourceRange);
        }
        // Read in the entry program already if an expired entry was there.
        let now_ns = if read_ns != 0 {
            read_ns
        } else {
            clock_for(svc.policy, s)
        };
        let syn = pkt.proto == IPPROTO_TCP && syn_only(ports.tcp_flags);
        let hash = flow_hash(
            &pkt.src,
            &pkt.dst,
            ports.sport,
            ports.dport,
            pkt.proto,
            cfg.hash_seed,
        );
        if svc.active_backends == 0 {
            return drop_for(svc.id, DropReason::NoBackend);
        }
        if !flow::choose(&pkt.src, svc, hash, now_ns) {
            return drop_for(svc.id, DropReason::NoBackend);
        }
        let Some(s) = scratch() else {
            return xdp_action::XDP_DROP;
        };
        let choice = &mut s.choice;
        choice.syn = syn;
        // The route before anything is created: a packet that cannot go on leaves nothing.
        let src = match (svc.flags & SVC_SNAT != 0, pkt.v6) {
            (true, false) => cfg.snat_v4[0],
            (true, true) => cfg.snat_v6[0],
            (false, _) => pkt.src,
        };
        let fib = fib_of(ctx, pkt);
        let (to, next) = (&choice.backend.addr, &mut s.next);
        let route = nexthop::route(&fib, &src, to, pkt.len, now_ns, next);
        match route {
            Route::Unreachable => return drop_for(svc.id, DropReason::NoRoute),
            Route::TooBig => return drop_for(svc.id, DropReason::TooBig),
            _ => {}
        }
        // Into a pod whose delivery is `netfilter`: no snat. The node is the pod's gateway, so
        // its replies come back through the kernel's forwarding, where conntrack pairs them with
        // the client's packets and netfilter's rules judge the real client.
        choice.mode = if route == Route::Netfilter {
            FLOW_NETFILTER
        } else if svc.flags & SVC_SNAT != 0 {
            FLOW_SNAT
        } else {
            0
        };
        // Kept in scratch memory until the send, not on the stack: see maps.rs, LB_PACKET.
        // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
        unsafe { core::ptr::write_volatile(&raw mut s.route, route as u32) };
        match limit_new_flow(svc.policy, pkt, syn, now_ns) {
            Verdict::Pass => {}
            Verdict::Drop(reason) => return drop_for(svc.id, reason),
            Verdict::Reset(reason) => {
                count_drop(svc.id, reason);
                return tcp::reset(ctx, pkt);
            }
        }
        let Some(s) = scratch() else {
            return xdp_action::XDP_DROP;
        };
        let opened = if pkt.v6 {
            flow::open::<Ipv6>(pkt, ports, svc, &s.choice, cfg)
        } else {
            flow::open::<Ipv4>(pkt, ports, svc, &s.choice, cfg)
        };
        match opened {
            Opened::Created => {}
            Opened::Live => {
                // A retransmitted SYN of a live flow, which may go elsewhere than `choice`.
                let (src, dst) = (&s.target.tuple.src, &s.target.tuple.dst);
                let route = nexthop::route(&fib, src, dst, pkt.len, now_ns, &mut s.next);
                return send(ctx, pkt, &s.target, route, &s.next);
            }
            Opened::Failed => return not_opened(ctx, svc.id, s.reason),
        }
        if pkt.proto == IPPROTO_TCP && !s.choice.syn {
            count(Counter::FlowsCreatedMidstream);
        }
        // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
        let route = Route::of(unsafe { core::ptr::read_volatile(&raw const s.route) });
        send(ctx, pkt, &s.target, route, &s.next)
    }

    /// The rate limiter's verdict on a new flow's packet under `policy` (0: none). Every new
    /// flow counts as a connection: a SYN, a UDP flow's first packet, and a TCP packet without
    /// state (it would create state too). Without a policy, no subprogram call (as for
    /// established packets).
    #[inline(always)]
    fn limit_new_flow(policy: u32, pkt: &Packet, syn: bool, now_ns: u64) -> Verdict {
        if policy == 0 {
            ratelimit::clear();
            return Verdict::Pass;
        }
        let mut how = ratelimit::NEW_FLOW;
        if pkt.v6 {
            how |= ratelimit::V6;
        }
        if syn {
            how |= ratelimit::SYN;
        }
        ratelimit::check(policy, &pkt.src, how, now_ns)
    }

    /// A new flow that could not be made: dropped and counted. A flow-table insert the kernel
    /// refused (not a clash, not the LRU's eviction) is rare: logged when the agent asks.
    #[inline(always)]
    fn not_opened(ctx: &XdpContext, service: u32, reason: DropReason) -> u32 {
        if reason == DropReason::FlowTable {
            aya_log_ebpf::warn!(
                ctx,
                target: lb_common::logging::LOG_TARGET,
                "flow table insert failed for service {}",
                service
            );
        }
        drop_for(service, reason)
    }

    #[inline(always)]
    fn count_drop(service: u32, reason: DropReason) {
        crate::maps::count_service_drop(service, reason);
    }

    /// Applies a flow's rewrite, counts the packet and sends it on to `hop`; without one (no
    /// neighbour entry, a local destination), the rewritten packet goes to the kernel, which
    /// forwards it (and decrements the TTL) itself; when its device has a policy hook, it goes to
    /// the kernel marked for `lb_uplink_tc` (see handoff.rs); when its delivery is `netfilter`, to
    /// the kernel's forwarding unmarked (see netfilter.rs). The frame keeps its destination MAC
    /// (this interface's) and VLAN tag, so the kernel takes it in as any other.
    #[inline(never)]
    fn send(ctx: &XdpContext, pkt: &Packet, t: &Target, route: Route, next: &Next) -> u32 {
        let ifindex = ctx.ingress_ifindex() as u32;
        send_inline(ctx, pkt, t, route, next, true, ifindex)
    }

    /// `send` without the subprogram call, for the established path (see `entry`). `limited`:
    /// the rate limiter decided this packet (its pending source, if any, is committed);
    /// `ifindex`: the device the packet arrived on.
    #[inline(always)]
    fn send_inline(
        ctx: &XdpContext,
        pkt: &Packet,
        t: &Target,
        route: Route,
        next: &Next,
        limited: bool,
        ifindex: u32,
    ) -> u32 {
        match route {
            Route::Found => {}
            Route::Neighbour => count(Counter::PassNoNeighbour),
            Route::Local => count(Counter::PassNotRedirectable),
            Route::PolicyHook => count(Counter::PassPolicyHook),
            Route::Netfilter => count(Counter::PassNetfilter),
            Route::Unreachable => return drop_for(t.service, DropReason::NoRoute),
            Route::TooBig => return drop_for(t.service, DropReason::TooBig),
        }
        // To a pod behind a policy hook: marked for `lb_uplink_tc`, which redirects it to the
        // pod veth's egress (so we decrement the TTL, as the kernel's forwarding would have).
        let handed =
            route == Route::PolicyHook && next.vlan & HOP_VLAN == 0 && crate::handoff::mark(ctx);
        let forwarded = route == Route::Found || handed;
        if rewrite::set_tuple(ctx, pkt, &t.tuple, forwarded).is_none() {
            count(Counter::DropMalformed);
            return xdp_action::XDP_DROP;
        }
        count_packet(t, pkt.len);
        if limited {
            ratelimit::commit();
        }
        if route == Route::Found {
            nexthop::transmit(ctx, pkt.vlan, next, ifindex)
        } else {
            xdp_action::XDP_PASS
        }
    }

    #[inline(always)]
    fn count_packet(t: &Target, len: u32) {
        let bytes = u64::from(len);
        if let Some(s) = LB_SVC_STATS.get_ptr_mut(t.service) {
            // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
            let s = unsafe { &mut *s };
            if t.reply {
                s.reply_packets += 1;
                s.reply_bytes += bytes;
            } else {
                s.packets += 1;
                s.bytes += bytes;
            }
        }
        if !t.reply
            && let Some(b) = LB_BE_STATS.get_ptr_mut(t.backend)
        {
            // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
            let b = unsafe { &mut *b };
            b.packets += 1;
            b.bytes += bytes;
        }
    }
}

#[cfg(target_arch = "bpf")]
mod family;
#[cfg(target_arch = "bpf")]
mod flow;
#[cfg(target_arch = "bpf")]
mod handoff;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod mem;
#[cfg(target_arch = "bpf")]
mod netfilter;
#[cfg(target_arch = "bpf")]
mod nexthop;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod ratelimit;
#[cfg(target_arch = "bpf")]
mod rewrite;
#[cfg(target_arch = "bpf")]
mod sources;
#[cfg(target_arch = "bpf")]
mod tc;
#[cfg(target_arch = "bpf")]
mod tcp;

/// Is `addr` a VIP (as opposed to a node address, which shares the filter)?
#[cfg(target_arch = "bpf")]
#[inline(always)]
fn is_vip(addr: &lb_common::Addr) -> bool {
    match maps::LB_ADDRS.get_ptr(addr) {
        // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
        Some(a) => (unsafe { (*a).flags } & lb_common::ADDR_VIP) != 0,
        None => false,
    }
}

/// Whether the packet's source may be a client: a unicast host address that is not one of the
/// node's, a VIP or a subnet broadcast (LB_ADDRS), nor IPv4-mapped in an IPv6 packet. No flow,
/// no answer, no bucket for anything else (it would make us a reflector).
#[cfg(target_arch = "bpf")]
#[inline(always)]
fn is_client(pkt: &parse::Packet) -> bool {
    !(pkt.v6 && pkt.src.is_v4())
        && pkt.src.may_be_client()
        && maps::LB_ADDRS.get_ptr(&pkt.src).is_none()
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

/// Drops a packet for a service, counted per service and node-wide.
#[cfg(target_arch = "bpf")]
#[inline(always)]
fn drop_for(service: u32, reason: lb_common::DropReason) -> u32 {
    maps::count_service_drop(service, reason);
    aya_ebpf::bindings::xdp_action::XDP_DROP
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
