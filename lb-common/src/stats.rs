//! Counters: the data path's only observability channel (it never logs per packet). Node-wide
//! counters live in a per-CPU array indexed by [`Counter`]; per service and per backend ones in
//! per-CPU arrays indexed by their ids. Names here are the names in metrics and `lb-agent status`.

macro_rules! counters {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// Node-wide counters (LB_COUNTERS indices).
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter { $($(#[$doc])* $variant,)* }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];
            /// Metric / status name.
            pub const fn name(self) -> &'static str {
                match self { $(Counter::$variant => $name,)* }
            }
        }
    };
}

counters! {
    /// Packets the program ran on.
    Packets = "packets",
    /// Not addressed to anything the balancer serves (or not to this interface's MAC): passed
    /// to the kernel untouched.
    PassNotOurs = "pass_not_ours",
    /// To a VIP, a port or protocol without a service.
    DropNoService = "drop_no_service",
    /// IPv4 fragment or IPv6 fragment header addressed to a VIP (not supported).
    DropFragment = "drop_fragment",
    /// IPv6 extension header other than hop-by-hop / destination options before the L4 header.
    DropIpv6Extension = "drop_ipv6_extension",
    /// Addressed to a VIP but malformed: lengths that disagree, a bad IPv4 header checksum,
    /// headers cut short, an impossible TCP/UDP header, a group source MAC.
    DropMalformed = "drop_malformed",
    /// To a VIP from a source that is no client (multicast, broadcast, loopback, unspecified,
    /// link-local, class E, IPv4-mapped, this node's or a VIP's own address): never answered.
    DropBadSource = "drop_bad_source",
    /// A packet to forward whose TTL / hop limit would reach 0.
    DropTtlExceeded = "drop_ttl_exceeded",
    /// ICMP to a VIP that is neither an echo request nor an error about a tracked flow.
    DropIcmp = "drop_icmp",
    /// Echo requests to a VIP answered.
    IcmpEchoReplies = "icmp_echo_replies",
    /// ICMP errors about a tracked flow, translated and forwarded to the flow's other end.
    IcmpErrorsTranslated = "icmp_errors_translated",
    /// New flows inserted into the flow table.
    FlowsCreated = "flows_created",
    /// Of those, flows whose first packet was not a TCP SYN (state lost or flow moved here).
    FlowsCreatedMidstream = "flows_created_midstream",
    /// Flow-table inserts that failed (table full of flows that cannot be evicted).
    DropFlowTable = "drop_flow_table",
    /// A new flow whose entries would have replaced a live flow's: refused, the live flow
    /// keeps working.
    DropFlowClash = "drop_flow_clash",
    /// Flow entries found expired (idle or closed) and replaced.
    FlowsExpired = "flows_expired",
    /// New snat flows dropped: no free source port for that backend.
    DropSnatPortsExhausted = "drop_snat_ports_exhausted",
    /// Half-open snat flows (a SYN, then nothing back for a second) dropped when a new flow
    /// found no free port: the new flow takes the port (see `Flow::gives_way`).
    HalfOpenDropped = "half_open_dropped",
    /// New flows to a service with no backend of weight > 0.
    DropNoBackend = "drop_no_backend",
    /// The kernel had no neighbour entry for the next hop yet: passed to the kernel (rewritten).
    PassNoNeighbour = "pass_no_neighbour",
    /// The next hop is a device we cannot redirect to: passed to the kernel (rewritten).
    PassNotRedirectable = "pass_not_redirectable",
    /// No route to the backend or client.
    DropNoRoute = "drop_no_route",
    /// Packet larger than the path MTU (answered with an ICMP error where possible).
    DropTooBig = "drop_too_big",
    /// Frames sent back out of the interface they came in on.
    XdpTx = "xdp_tx",
    /// Frames redirected to another interface.
    XdpRedirect = "xdp_redirect",
    /// TCP resets sent for flows the agent ended or SYNs the limiter rejected.
    RstSent = "rst_sent",
    /// Dropped by a rate-limit policy: over the packet rate, over the connection rate, in a
    /// deny list, or sharing the overflow bucket of a full source table that had none left.
    DropRate = "drop_rate",
    DropConnectionRate = "drop_connection_rate",
    DropDenied = "drop_denied",
    DropTableFull = "drop_table_full",
    /// From a source outside the service's allowed source ranges (or inside its denied ones).
    DropSourceRange = "drop_source_range",
    /// New sources that found the source table full (handled by the policy's overflow mode).
    SourceTableFull = "source_table_full",
    /// New sources inserted into the source table.
    SourcesCreated = "sources_created",
    /// A tail call to a slow path failed (program array not filled): packet dropped.
    TailCallFailed = "tail_call_failed",
    /// The next hop is an interface with a policy hook (a pod veth whose TC egress hook inspects
    /// what enters the pod): passed to the kernel (rewritten), marked for `lb_uplink_tc`, which
    /// delivers it through that hook (`redirect_policy_hook`).
    PassPolicyHook = "pass_policy_hook",
    /// A packet `pass_policy_hook` marked ([`crate::HANDOFF_MAC`]) that `lb_uplink_tc` redirected
    /// into its pod veth's egress: through the veth's TC egress hook, past netfilter.
    RedirectPolicyHook = "redirect_policy_hook",
    /// The next hop is an interface whose delivery is `netfilter` (netfilter's forward path
    /// judges what enters its pods): passed to the kernel's forwarding, rewritten to the pod
    /// with the client's address kept, so conntrack and the forward rules see the flow as it is.
    PassNetfilter = "pass_netfilter",
    /// A reply of such a flow that `lb_uplink_out`, at an uplink's TC egress, translated back
    /// (pod -> VIP as source) after the kernel forwarded it.
    ReplyNetfilter = "reply_netfilter",
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "a few dozen counters (a const cannot call try_from)"
)]
pub const COUNTER_COUNT: u32 = Counter::ALL.len() as u32;

macro_rules! drop_reasons {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// Why a packet for a service was dropped (index into [`ServiceStats::drops`]).
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum DropReason { $($(#[$doc])* $variant,)* }

        impl DropReason {
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];
            pub const fn name(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)* }
            }
        }
    };
}

drop_reasons! {
    /// No backend with weight > 0.
    NoBackend = "no_backend",
    /// No free snat source port for the backend.
    SnatPortsExhausted = "snat_ports_exhausted",
    /// Over the packet-rate limit.
    Rate = "rate",
    /// Over the new-connection-rate limit.
    ConnectionRate = "connection_rate",
    /// Source in a deny list.
    Denied = "denied",
    /// Source table full and the policy fails closed (the shared overflow bucket is empty).
    TableFull = "table_full",
    /// The flow table had no room.
    FlowTable = "flow_table",
    /// The new flow would have replaced a live flow's entries.
    FlowClash = "flow_clash",
    /// No route to the backend (or client).
    NoRoute = "no_route",
    /// Larger than the path MTU.
    TooBig = "too_big",
    /// TTL / hop limit would reach 0.
    TtlExceeded = "ttl_exceeded",
    /// Source outside the service's allowed source ranges (or inside its denied ones).
    SourceRange = "source_range",
}

impl DropReason {
    /// The reason as a non-zero code (0 meaning "none"), for functions that must return a plain
    /// integer.
    #[inline(always)]
    pub const fn code(self) -> u32 {
        self as u32 + 1
    }

    /// The reason of a [`DropReason::code`]; `None` for 0 (or an unknown code).
    #[inline(always)]
    pub fn from_code(code: u32) -> Option<DropReason> {
        match code {
            0 => None,
            c => DropReason::ALL.get(c as usize - 1).copied(),
        }
    }

    /// The node-wide counter of this reason: `drop_<reason>`.
    #[inline(always)]
    pub const fn counter(self) -> Counter {
        match self {
            DropReason::NoBackend => Counter::DropNoBackend,
            DropReason::SnatPortsExhausted => Counter::DropSnatPortsExhausted,
            DropReason::Rate => Counter::DropRate,
            DropReason::ConnectionRate => Counter::DropConnectionRate,
            DropReason::Denied => Counter::DropDenied,
            DropReason::TableFull => Counter::DropTableFull,
            DropReason::FlowTable => Counter::DropFlowTable,
            DropReason::FlowClash => Counter::DropFlowClash,
            DropReason::NoRoute => Counter::DropNoRoute,
            DropReason::TooBig => Counter::DropTooBig,
            DropReason::TtlExceeded => Counter::DropTtlExceeded,
            DropReason::SourceRange => Counter::DropSourceRange,
        }
    }
}

pub const DROP_REASONS: usize = DropReason::ALL.len();

/// Per-service counters (per CPU; LB_SVC_STATS index = service id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Client -> backend packets and bytes (L3 length).
    pub packets: u64,
    pub bytes: u64,
    /// Backend -> client packets and bytes.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub new_flows: u64,
    pub drops: [u64; DROP_REASONS],
}

/// Per-backend counters (per CPU; LB_BE_STATS index = backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl ServiceStats {
    /// Sums per-CPU values (host side).
    pub fn accumulate(&mut self, o: &ServiceStats) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.reply_packets += o.reply_packets;
        self.reply_bytes += o.reply_bytes;
        self.new_flows += o.new_flows;
        for (a, b) in self.drops.iter_mut().zip(o.drops.iter()) {
            *a += b;
        }
    }
}

impl BackendStats {
    pub fn accumulate(&mut self, o: &BackendStats) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.new_flows += o.new_flows;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One name per reason: the node-wide counter of a service drop reason is `drop_<reason>`.
    #[test]
    fn each_drop_reason_has_the_counter_of_its_name() {
        for r in DropReason::ALL {
            let c = r.counter().name();
            assert_eq!(c.strip_prefix("drop_"), Some(r.name()), "{r:?}");
        }
    }

    #[test]
    fn names_are_unique() {
        for (i, a) in Counter::ALL.iter().enumerate() {
            for b in &Counter::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
