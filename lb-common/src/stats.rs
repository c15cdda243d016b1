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
    /// Not addressed to anything the balancer serves: passed to the kernel untouched.
    PassNotOurs = "pass_not_ours",
    /// To a VIP, a port or protocol without a service.
    DropNoService = "drop_no_service",
    /// IPv4 fragment or IPv6 fragment header addressed to a VIP (not supported).
    DropFragment = "drop_fragment",
    /// IPv6 extension header other than hop-by-hop / destination options before the L4 header.
    DropIpv6Extension = "drop_ipv6_extension",
    /// Headers cut short (truncated packet addressed to a VIP).
    DropMalformed = "drop_malformed",
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
    FlowInsertFailed = "flow_insert_failed",
    /// Flow entries found expired (idle or closed) and replaced.
    FlowsExpired = "flows_expired",
    /// New snat flows dropped: no free source port for that backend.
    DropSnatPortsExhausted = "drop_snat_ports_exhausted",
    /// New flows to a service with no backend of weight > 0.
    DropNoBackend = "drop_no_backend",
    /// The kernel had no neighbour entry for the next hop yet: passed to the kernel (rewritten).
    PassNoNeighbour = "pass_no_neighbour",
    /// The next hop is a device we cannot redirect to: passed to the kernel (rewritten).
    PassNotRedirectable = "pass_not_redirectable",
    /// No route to the backend or client.
    DropNoRoute = "drop_no_route",
    /// Packet larger than the egress MTU (answered with an ICMP error where possible).
    DropTooBig = "drop_too_big",
    /// Frames sent back out of the interface they came in on.
    XdpTx = "xdp_tx",
    /// Frames redirected to another interface.
    XdpRedirect = "xdp_redirect",
    /// TCP resets sent for flows the agent ended or SYNs the limiter rejected.
    RstSent = "rst_sent",
    /// Packets dropped by a rate-limit policy (any reason; per service in service stats).
    DropRateLimited = "drop_rate_limited",
    /// New sources that found the source table full (handled by the policy's overflow mode).
    SourceTableFull = "source_table_full",
    /// New sources inserted into the source table.
    SourcesCreated = "sources_created",
    /// A tail call to a slow path failed (program array not filled): packet dropped.
    TailCallFailed = "tail_call_failed",
}

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
    /// No free snat source port.
    SnatPorts = "snat_ports",
    /// Over the packet-rate limit.
    Rate = "rate",
    /// Over the new-connection-rate limit.
    ConnectionRate = "connection_rate",
    /// Source in a deny list.
    Denied = "deny_list",
    /// Source table full and the policy fails closed (the shared overflow bucket is empty).
    TableFull = "table_full",
    /// No route or MTU problem on the way to the backend.
    Forwarding = "forwarding",
    /// The flow table had no room.
    FlowTable = "flow_table",
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
