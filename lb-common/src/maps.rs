//! Every BPF map: its name, default capacity and the `#[repr(C)]` key and value it holds.
//!
//! Conventions, the same in every type:
//! - addresses are [`Addr`]: 16 bytes in network byte order, IPv4 stored IPv4-mapped;
//! - ports are `u16` holding the bytes as on the wire (network byte order: `port.to_be()`);
//! - padding is explicit (`_pad`) and zeroed, and each type's size is checked at compile time:
//!   implicit padding would make hash lookups silently miss.

pub use crate::addr::Addr;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

// ---------------------------------------------------------------------------------------------
// Map names. One constant per map; the kernel program, the agent and the tests use these.
// Kernel map names are truncated to 15 bytes, so every name fits.
// ---------------------------------------------------------------------------------------------
pub const MAP_CONFIG: &str = "LB_CONFIG";
pub const MAP_FILTER: &str = "LB_FILTER";
pub const MAP_ADDRS: &str = "LB_ADDRS";
pub const MAP_SERVICES: &str = "LB_SERVICES";
pub const MAP_BACKENDS: &str = "LB_BACKENDS";
pub const MAP_RINGS: &str = "LB_RINGS";
pub const MAP_FLOWS4: &str = "LB_FLOWS4";
pub const MAP_FLOWS6: &str = "LB_FLOWS6";
pub const MAP_DEVMAP: &str = "LB_DEVMAP";
pub const MAP_IFACES: &str = "LB_IFACES";
pub const MAP_COUNTERS: &str = "LB_COUNTERS";
pub const MAP_SVC_STATS: &str = "LB_SVC_STATS";
pub const MAP_BE_STATS: &str = "LB_BE_STATS";
pub const MAP_POLICIES: &str = "LB_POLICIES";
pub const MAP_SOURCES: &str = "LB_SOURCES";
pub const MAP_SOURCE_TAGS: &str = "LB_SOURCE_TAGS";
/// Per policy id, the bucket all new sources of a fail-closed policy share while the source
/// table has no room for them.
pub const MAP_OVERFLOW: &str = "LB_OVERFLOW";
pub const MAP_PREFIXES: &str = "LB_PREFIXES";
pub const MAP_AFFINITY: &str = "LB_AFFINITY";
/// Each service by id ([`ServiceInfo`]): its frontend, for replies, and its rate-limit policy,
/// which established flows are held to, so a policy change or removal reaches live connections.
pub const MAP_SVC_INFO: &str = "LB_SVC_INFO";
/// Each attached interface's MAC, by ifindex slot ([`LinkMac`]).
pub const MAP_MACS: &str = "LB_MACS";
/// Each backend's snat port cursor, by backend id.
pub const MAP_PORTS: &str = "LB_PORTS";
/// Per-CPU next-hop cache ([`Hop`]).
pub const MAP_HOPS: &str = "LB_HOPS";
/// The reply entries of snat flows, per family ([`Claim`]): each holds its snat port.
pub const MAP_CLAIMS4: &str = "LB_CLAIMS4";
pub const MAP_CLAIMS6: &str = "LB_CLAIMS6";

/// Every map the program defines, in the order the agent checks and pins them.
pub const ALL_MAPS: [&str; 25] = [
    MAP_CONFIG,
    MAP_FILTER,
    MAP_ADDRS,
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_RINGS,
    MAP_FLOWS4,
    MAP_FLOWS6,
    MAP_DEVMAP,
    MAP_IFACES,
    MAP_COUNTERS,
    MAP_SVC_STATS,
    MAP_BE_STATS,
    MAP_POLICIES,
    MAP_SOURCES,
    MAP_SOURCE_TAGS,
    MAP_OVERFLOW,
    MAP_PREFIXES,
    MAP_AFFINITY,
    MAP_SVC_INFO,
    MAP_MACS,
    MAP_PORTS,
    MAP_HOPS,
    MAP_CLAIMS4,
    MAP_CLAIMS6,
];

/// Program names (ELF symbols) in the data-path object: the two attached to interfaces, and
/// the slow paths they tail-call (each verified on its own, which keeps the verifier's work per
/// program well under its limit).
pub const PROG_UPLINK: &str = "lb_uplink";
pub const PROG_BACKEND: &str = "lb_backend";
pub const PROG_NEW_FLOW: &str = "lb_new_flow";
pub const PROG_ICMP: &str = "lb_icmp";
/// At TC ingress of the uplinks, while some backend interface's delivery is `kernel`: takes
/// the packets `lb_uplink` marks ([`HANDOFF_MAC`]) to their pod veth's egress.
pub const PROG_UPLINK_TC: &str = "lb_uplink_tc";
/// At TC egress of the uplinks, while some backend interface's delivery is `netfilter`:
/// translates the replies of flows into such pods, which the kernel forwarded untranslated.
pub const PROG_UPLINK_OUT: &str = "lb_uplink_out";
/// LB_PROGS slots of the tail-called programs.
pub const TAIL_NEW_FLOW: u32 = 0;
pub const TAIL_ICMP: u32 = 1;
/// The per-load program array: each loaded entry program tail-calls the slow paths loaded with
/// it. The agent pins it under a name of its own (`LB_PROGS-<pid>`), so an agent that dies
/// leaves working programs behind.
pub const MAP_PROGS: &str = "LB_PROGS";

/// Bumped whenever a map's key or value layout changes: the agent pins under a directory
/// named after it, so a new layout never reads maps pinned by an incompatible older one.
pub const MAP_LAYOUT_VERSION: u32 = 4;

// ---------------------------------------------------------------------------------------------
// Capacities compiled into the object. The agent overrides the sizable ones at load time.
// ---------------------------------------------------------------------------------------------
/// The largest ring a service gets (`--max-ring-size`): each service's ring is sized from its
/// backend count, up to this. The fixed size of every ring before rings were sized from
/// backends: a larger ring gives a Service of more than 163 backends finer shares, but takes
/// far longer to build on every change (release build, 5000 backends: 13 ms at 16381, 77 ms at
/// 65521, 341 ms at 131071).
pub const DEFAULT_MAX_RING_SIZE: u32 = 16381;
pub const DEFAULT_MAX_SERVICES: u32 = 512;
pub const DEFAULT_MAX_BACKENDS: u32 = 16384;
pub const DEFAULT_FLOW_ENTRIES: u32 = 262_144;
/// IPv6 flows have a table of their own (40-byte keys instead of 16).
pub const DEFAULT_FLOW_ENTRIES_V6: u32 = 65_536;
pub const DEFAULT_SOURCE_ENTRIES: u32 = 65_536;
pub const MAX_ADDRS: u32 = 4096;
pub const MAX_IFACES: u32 = 256;
pub const MAX_POLICIES: u32 = 1024;
pub const MAX_PREFIXES: u32 = 16384;
pub const DEFAULT_AFFINITY_ENTRIES: u32 = 65_536;
/// Slots of LB_PORTS, the snat port cursors (by a hash of the backend's address and port).
pub const PORT_CURSORS: u32 = 16384;
/// LB_RINGS slots per backend and per service of the configured capacity. A service's ring is
/// the smallest listed prime >= 100 x its backends (at least 251), held in a power-of-two block:
/// 256 slots for a service of 0-2 backends, and 102-200 slots per backend above that (about 150
/// on average over backend counts). A service's new ring is written into free space before the
/// old one is let go, so the space also holds rings in flight.
pub const RING_SLOTS_PER_BACKEND: u32 = 192;
pub const RING_SLOTS_PER_SERVICE: u32 = 256;

/// LB_RINGS entries for a capacity of `max_services` and `max_backends` (a multiple of 256).
pub const fn ring_slots(max_services: u32, max_backends: u32) -> u32 {
    let slots = max_services
        .saturating_mul(RING_SLOTS_PER_SERVICE)
        .saturating_add(max_backends.saturating_mul(RING_SLOTS_PER_BACKEND));
    // Whole 256-slot blocks; u32::MAX rounds down.
    if slots > u32::MAX - 255 {
        !255
    } else {
        (slots + 255) & !255
    }
}
/// Ring slots that hold no backend.
pub const NO_BACKEND: u32 = u32::MAX;

/// Words in the address filter (a bitmap over a hash of the address): 2^16 bits.
pub const FILTER_WORDS: u32 = 1024;
pub const FILTER_BITS: u32 = FILTER_WORDS * 64;

// ---------------------------------------------------------------------------------------------
// LB_CONFIG: one entry, node-wide settings the agent may change at any time.
// ---------------------------------------------------------------------------------------------
/// Addresses per family a node may use as snat sources.
pub const MAX_SNAT_ADDRS: usize = 4;

/// An inclusive range of ports, host byte order; empty when `min > max`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    pub const EMPTY: PortRange = PortRange { min: 1, max: 0 };

    #[inline(always)]
    pub const fn len(&self) -> u32 {
        if self.min > self.max {
            0
        } else {
            self.max as u32 - self.min as u32 + 1
        }
    }

    #[inline(always)]
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Seed of the flow hash that indexes the Maglev rings; equal on every node.
    pub hash_seed: u32,
    /// Timeouts in flow-clock ticks ([`flow_clock`]): idle TCP and UDP flows; a TCP flow after
    /// its first FIN or RST; one a SYN opened, until the client's ACK; and a snat flow's reply
    /// entry (which holds its port) after the backend closed first, as long as the backend's
    /// TIME_WAIT may hold the same tuple.
    pub tcp_idle: u32,
    pub udp_idle: u32,
    pub tcp_closing: u32,
    pub tcp_handshake: u32,
    pub tcp_time_wait: u32,
    /// snat source addresses per family: the first `snat_v4_count` / `snat_v6_count` of
    /// `snat_v4` / `snat_v6` (0: family not served).
    pub snat_v4_count: u32,
    pub snat_v6_count: u32,
    pub snat_v4: [Addr; MAX_SNAT_ADDRS],
    pub snat_v6: [Addr; MAX_SNAT_ADDRS],
    /// Source ports for snat flows: the first range's, then the second's.
    pub snat_ports: [PortRange; 2],
    /// Sets of the source table ([`source_sets`] of its capacity): the data path cannot read a
    /// map's size, and the agent sizes this one at load time.
    pub source_sets: u32,
    /// Slots of LB_CLAIMS4 and LB_CLAIMS6 (sized by the agent as well).
    pub claims_v4: u32,
    pub claims_v6: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 180);

impl Config {
    /// Ports of both ranges together.
    #[inline(always)]
    pub const fn snat_port_count(&self) -> u32 {
        self.snat_ports[0].len() + self.snat_ports[1].len()
    }

    /// The `i`-th snat port (host order), `i < snat_port_count()`.
    #[inline(always)]
    #[allow(
        clippy::cast_possible_truncation,
        reason = "i < the range's length, so min + i <= max, a u16"
    )]
    pub const fn snat_port(&self, i: u32) -> u16 {
        let first = self.snat_ports[0].len();
        if i < first {
            (self.snat_ports[0].min as u32 + i) as u16
        } else {
            (self.snat_ports[1].min as u32 + (i - first)) as u16
        }
    }
}

/// The flow table's clock: CLOCK_MONOTONIC in ticks of 2^20 ns (about 1.05 ms), as 32 bits.
/// Compared by wrapping difference, which is right for spans under 2^31 ticks (26 days).
pub const FLOW_CLOCK_SHIFT: u32 = 20;

#[inline(always)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "the clock wraps at 32 bits by design (compared by wrapping difference)"
)]
pub const fn flow_clock(now_ns: u64) -> u32 {
    (now_ns >> FLOW_CLOCK_SHIFT) as u32
}

/// Ticks of the flow clock in `ns` nanoseconds (rounded up, so a timeout is never shorter).
#[inline(always)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "t is at most i32::MAX there"
)]
pub const fn flow_ticks(ns: u64) -> u32 {
    let t = ns.div_ceil(1 << FLOW_CLOCK_SHIFT);
    if t > i32::MAX as u64 {
        i32::MAX as u32
    } else {
        t as u32
    }
}

// ---------------------------------------------------------------------------------------------
// LB_FILTER: bitmap of addresses the data path cares about, in two planes (see `filter`).
// ---------------------------------------------------------------------------------------------
/// An address's bit: one multiply (`slot_hash`), on the path of every packet that arrives. A
/// collision lets a packet that is not ours past the filter to the lookups behind it, which
/// pass it all the same: it costs time, never a wrong verdict.
#[inline(always)]
pub fn filter_bit(addr: &Addr) -> u32 {
    const { assert!(FILTER_BITS.is_power_of_two()) };
    crate::hash::slot_hash(addr, FILTER_BITS.trailing_zeros())
}

// ---------------------------------------------------------------------------------------------
// LB_ADDRS: address -> what it is. Every address here is no client (never answered, never a
// flow's source).
// ---------------------------------------------------------------------------------------------
/// A VIP: packets to it that match no service are dropped, and it answers ping.
pub const ADDR_VIP: u32 = 1;
/// An address of this node used as a `snat` source: replies to it are translated back.
pub const ADDR_NODE: u32 = 2;
/// Another address that is no client: a broadcast address of one of the node's subnets, or a
/// node address that is neither of the above.
pub const ADDR_NO_CLIENT: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrInfo {
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<AddrInfo>() == 4);

// ---------------------------------------------------------------------------------------------
// LB_MACS: the MAC of each interface lb_uplink is attached to, so only frames sent to it are
// balanced. Direct-mapped by ifindex: slot `ifindex % MAC_SLOTS` (an array read, not a hash
// lookup, on every packet for a VIP).
// ---------------------------------------------------------------------------------------------
pub const MAC_SLOTS: u32 = 1024;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkMac {
    pub ifindex: u32,
    /// As in the Ethernet header, in 16-bit words.
    pub mac: [u16; 3],
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<LinkMac>() == 12);

impl LinkMac {
    pub fn new(ifindex: u32, mac: [u8; 6]) -> LinkMac {
        LinkMac {
            ifindex,
            mac: [
                u16::from_ne_bytes([mac[0], mac[1]]),
                u16::from_ne_bytes([mac[2], mac[3]]),
                u16::from_ne_bytes([mac[4], mac[5]]),
            ],
            _pad: 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// LB_SERVICES: (VIP, port, protocol) -> service. LB_SVC_INFO: service id -> frontend, policy.
// ---------------------------------------------------------------------------------------------
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

impl ServiceKey {
    /// The service a packet to `addr:port` (wire order) over `proto` is for.
    #[inline(always)]
    pub fn new(addr: Addr, port: u16, proto: u8) -> ServiceKey {
        ServiceKey {
            addr,
            port,
            proto,
            _pad: 0,
        }
    }
}

/// Source NAT to the node's address (NLB's default for TCP IP targets). Without it the backend
/// sees the client's address and must be local to this node.
pub const SVC_SNAT: u32 = 1;
/// Session affinity by client address (`affinity_timeout_s`).
pub const SVC_AFFINITY: u32 = 2;
/// `source_ranges` lists the sources that are refused (else: the only ones admitted).
pub const SVC_RANGES_DENY: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index into LB_SVC_INFO, LB_SVC_STATS.
    pub id: u32,
    /// The live Maglev ring: LB_RINGS slots `ring .. ring + ring_size` (prime size).
    pub ring: u32,
    pub ring_size: u32,
    /// `SVC_*` bits.
    pub flags: u32,
    /// Rate-limit policy (index into LB_POLICIES; 0: none).
    pub policy: u32,
    /// Session affinity timeout, seconds.
    pub affinity_timeout_s: u32,
    /// Backends with weight > 0; 0 means every new flow is dropped.
    pub active_backends: u32,
    /// Digest of the ring's contents (agent-side: tells a restarted agent the ring is current).
    pub ring_digest: u32,
    /// Allowed (or, with SVC_RANGES_DENY, refused) source ranges: the LB_PREFIXES entries of
    /// this id (one of its own, above every policy id; 0: every source allowed).
    pub source_ranges: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Service>() == 40);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// The frontend: what replies come from.
    pub addr: Addr,
    /// Wire order.
    pub port: u16,
    pub proto: u8,
    /// Bumped each time the id is given to another service: flow entries that name the id
    /// carry the generation they were made under, and are over when it no longer matches.
    pub generation: u8,
    /// Rate-limit policy (as in [`Service`]).
    pub policy: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceInfo>() == 24);

// ---------------------------------------------------------------------------------------------
// LB_BACKENDS: backend id -> where to send. One id per (service, endpoint) pair.
// ---------------------------------------------------------------------------------------------
/// The backend is part of its service's configuration (else: removed, its id not yet reused).
pub const BACKEND_LISTED: u16 = 1;
/// The backend takes new flows (listed, weight > 0). Session affinity only sticks to these.
pub const BACKEND_ACTIVE: u16 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    pub port: u16,
    /// `BACKEND_*` bits.
    pub flags: u16,
    /// Service id this backend belongs to; with `weight`, lets a restarted agent rebuild its
    /// state from the maps.
    pub service: u32,
    pub weight: u32,
    /// Generation of the id (see [`ServiceInfo::generation`]).
    pub generation: u8,
    pub _pad1: u8,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 32);

// ---------------------------------------------------------------------------------------------
// LB_FLOWS4 / LB_FLOWS6: the flow tables, one per family (an IPv4 key is 16 bytes, not 40). One
// entry per direction: the client's packets (key: as the client sends them) and the backend's
// replies (key: as the backend sends them; a snat flow's is in a claim slot instead, see
// LB_CLAIMS4 below). Each entry holds what its packets are rewritten to:
// - client -> backend: source `addr:port` (the node's snat address and port, or the client's
//   own), destination backend `id`;
// - backend -> client (FLOW_REPLY): source the frontend of service `id`, destination `addr:port`
//   (the client).
// ---------------------------------------------------------------------------------------------
/// An address as a flow table of one family holds it.
pub trait FlowAddr: Copy + Default + PartialEq + Eq + core::fmt::Debug {
    fn to_addr(&self) -> Addr;
    fn from_addr(a: &Addr) -> Self;
}

/// An IPv4 address as the 32-bit word it is in memory (network byte order bytes).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct V4(pub u32);

impl FlowAddr for V4 {
    #[inline(always)]
    fn to_addr(&self) -> Addr {
        Addr::from_words([0, 0, crate::addr::V4_MAPPED_WORD, self.0])
    }
    #[inline(always)]
    fn from_addr(a: &Addr) -> V4 {
        V4(a.v4_word())
    }
}

impl FlowAddr for Addr {
    #[inline(always)]
    fn to_addr(&self) -> Addr {
        Addr::from_words(self.words())
    }
    #[inline(always)]
    fn from_addr(a: &Addr) -> Addr {
        Addr::from_words(a.words())
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey<A> {
    pub src: A,
    pub dst: A,
    /// Wire order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    // Word-shaped padding: a 3-byte array would be zeroed with a memset call, which BPF lacks.
    pub _pad1: u8,
    pub _pad2: u16,
}
pub type FlowKey4 = FlowKey<V4>;
pub type FlowKey6 = FlowKey<Addr>;
const _: () = assert!(core::mem::size_of::<FlowKey4>() == 16);
const _: () = assert!(core::mem::size_of::<FlowKey6>() == 40);

impl<A: FlowAddr> FlowKey<A> {
    #[inline(always)]
    pub fn new(src: A, dst: A, sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            proto,
            _pad1: 0,
            _pad2: 0,
        }
    }
}

/// This entry rewrites backend -> client replies (else client -> backend).
pub const FLOW_REPLY: u8 = 1;
/// The flow uses source NAT (its reply entry holds a snat port).
pub const FLOW_SNAT: u8 = 2;
/// A FIN or RST was seen: the entry lives `tcp_closing` after its last packet.
pub const FLOW_CLOSING: u8 = 4;
/// The agent ended this flow: packets get a TCP RST instead of being forwarded.
pub const FLOW_RESET: u8 = 8;
/// A SYN opened this flow and the client has not acknowledged yet: the entry lives
/// `tcp_handshake` after its last packet (a spoofed SYN's entries, and its snat port, go soon).
pub const FLOW_OPENING: u8 = 16;
/// Reply entries of snat flows whose backend closed first: the backend holds the tuple in
/// TIME_WAIT, so the entry (and with it the port) lives `tcp_time_wait` after its last packet.
pub const FLOW_TIME_WAIT: u8 = 32;
/// A TCP flow (else UDP): which idle timeout applies.
pub const FLOW_TCP: u8 = 64;
/// The flow goes through the kernel's forwarding both ways (its pod's delivery was `netfilter`
/// when it opened; never snat): `lb_backend` lets its replies go on untranslated, and
/// `lb_uplink_out` translates them once netfilter has seen them.
pub const FLOW_NETFILTER: u8 = 128;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow<A> {
    /// Last packet, flow-clock ticks ([`flow_clock`]).
    pub last: u32,
    /// `FLOW_*` bits.
    pub flags: u8,
    /// Generation of `id` when the flow was made.
    pub generation: u8,
    /// Wire order: the source port after the rewrite (client -> backend) or the client's port
    /// (backend -> client).
    pub port: u16,
    /// The low [`FLOW_ID_BITS`]: the backend id (client -> backend) or service id (backend ->
    /// client), see [`Flow::id`]. The top byte, in a client's entry: where its rate-limit
    /// source was last found, see [`Flow::source_way`].
    pub id_way: u32,
    /// The source address after the rewrite (client -> backend) or the client (backend -> client).
    pub addr: A,
}
pub type Flow4 = Flow<V4>;
pub type Flow6 = Flow<Addr>;
const _: () = assert!(core::mem::size_of::<Flow4>() == 16);
const _: () = assert!(core::mem::size_of::<Flow6>() == 28);

/// Bits of a flow entry's backend or service id: ids are below 2^24 (the agent refuses larger
/// tables), which leaves the word's top byte to the source's way.
pub const FLOW_ID_BITS: u32 = 24;
pub const MAX_IDS: u32 = 1 << FLOW_ID_BITS;

/// A flow entry's `id_way` word: `id` and the way (< SOURCE_WAYS; any other value: not known)
/// its client's rate-limit source was found in.
#[inline(always)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "SOURCE_WAYS is 8 (a const fn cannot call try_from)"
)]
pub const fn id_way(id: u32, way: u32) -> u32 {
    let tag = if way < SOURCE_WAYS as u32 { way + 1 } else { 0 };
    (id & (MAX_IDS - 1)) | tag << FLOW_ID_BITS
}

impl<A> Flow<A> {
    /// The backend id (client -> backend) or service id (backend -> client).
    #[inline(always)]
    pub const fn id(&self) -> u32 {
        self.id_way & (MAX_IDS - 1)
    }

    /// The way of its set the client's rate-limit source was last found in (SOURCE_WAYS or more:
    /// not known): a hint, taken only if that slot still holds the source's key; it spares each
    /// limited packet the set's tags (a cache line, cold when many sources talk). Any value is
    /// safe.
    #[inline(always)]
    pub const fn source_way(&self) -> u32 {
        (self.id_way >> FLOW_ID_BITS).wrapping_sub(1)
    }

    /// How long the entry lives idle, in flow-clock ticks.
    #[inline(always)]
    pub fn timeout(&self, cfg: &Config) -> u32 {
        if self.flags & FLOW_TIME_WAIT != 0 {
            cfg.tcp_time_wait
        } else if self.flags & FLOW_CLOSING != 0 {
            cfg.tcp_closing
        } else if self.flags & FLOW_OPENING != 0 {
            cfg.tcp_handshake
        } else if self.flags & FLOW_TCP != 0 {
            cfg.tcp_idle
        } else {
            // Its peer entry may have been stamped up to a window before this one was.
            cfg.udp_idle.saturating_add(PEER_REFRESH_WINDOW)
        }
    }

    /// Whether this live reply entry of a snat flow gives way to a new flow that found no free
    /// port: its handshake is half-open (FLOW_OPENING) and has seen nothing in the reply
    /// direction for [`HALF_OPEN_GIVES_WAY`]. (Conntrack drops such flows early under pressure
    /// too; without it a spoofed SYN flood holds every port for the handshake timeout.)
    #[inline(always)]
    pub fn gives_way(&self, now: u32) -> bool {
        self.flags & FLOW_OPENING != 0
            && now.wrapping_sub(self.last).cast_signed() >= HALF_OPEN_GIVES_WAY.cast_signed()
    }

    /// A flow is over when idle longer than its timeout. (The data path treats an expired entry
    /// as absent; the agent's sweep deletes it.) `now`: flow-clock ticks.
    #[inline(always)]
    pub fn is_expired(&self, cfg: &Config, now: u32) -> bool {
        // Signed: packets read the precise or the coarse clock (a tick apart), so `now` may be
        // a little before `last`; that is not a long idle time.
        now.wrapping_sub(self.last).cast_signed() > self.timeout(cfg).cast_signed()
    }
}

// ---------------------------------------------------------------------------------------------
// LB_CLAIMS4 / LB_CLAIMS6: the reply entries of snat flows. A snat flow's reply entry is what
// holds its snat port (no other flow to the same backend may use it while it lives), and it
// is made for every new flow: as a second flow-table insert it cost as much as the first (a
// cold bucket and element of a large table). Here it is a slot of an array, found from its key
// (backend -> snat address and port; see [`claim_slot`]): a new flow claims the slot of a port
// by compare-and-swap, and a port whose slot holds a live entry (of this tuple or of another
// placed there) is busy, so another port is tried. Readers find a reply entry by its key
// in its slot; the entry itself is the same [`Flow`] as in the flow table, with the same
// flags and timeouts (FLOW_TIME_WAIT included).
// ---------------------------------------------------------------------------------------------
/// A claim slot's `state`: the low two bits say what it holds, the rest count its claims (so a
/// compare-and-swap on a slot that was freed and claimed again in between fails).
pub const CLAIM_FREE: u32 = 0;
/// Being written by the CPU that claimed it: busy for everyone else.
pub const CLAIM_BUSY: u32 = 1;
/// Holds a reply entry (live or expired: see [`Flow::is_expired`]).
pub const CLAIM_HELD: u32 = 2;
pub const CLAIM_KIND: u32 = 3;
/// One claim more in a slot's `state`.
pub const CLAIM_COUNT: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Claim<A> {
    pub state: u32,
    /// The reply entry's key: backend -> snat address and port.
    pub key: FlowKey<A>,
    pub flow: Flow<A>,
}
impl<A: PartialEq> Claim<A> {
    /// Whether the slot holds the reply entry of `key` (live or expired).
    #[inline(always)]
    pub fn holds(&self, key: &FlowKey<A>) -> bool {
        self.state & CLAIM_KIND == CLAIM_HELD && self.key == *key
    }
}

pub type Claim4 = Claim<V4>;
pub type Claim6 = Claim<Addr>;
const _: () = assert!(core::mem::size_of::<Claim4>() == 36);
const _: () = assert!(core::mem::size_of::<Claim6>() == 72);

/// A UDP entry stamps its peer (the flow's entry for the other direction) when its own stamp
/// moves into another window of 2^8 flow-clock ticks (a quarter second), not on every packet: a
/// flow that sends only one way keeps both entries for a lookup per window. So a peer may be
/// stamped up to a window before its live entry was, and a UDP entry lives a window past the
/// UDP timeout (both entries do, and the agent's sweep judges them the same way).
pub const PEER_REFRESH_SHIFT: u32 = 8;
pub const PEER_REFRESH_WINDOW: u32 = 1 << PEER_REFRESH_SHIFT;

/// How long a half-open snat flow's reply entry is idle before it gives way (see
/// [`Flow::gives_way`]): TCP's first SYN retransmission timeout (RFC 6298), so a real client
/// whose handshake stalled that long sends its SYN again, which opens a new flow.
pub const HALF_OPEN_GIVES_WAY: u32 = flow_ticks(1_000_000_000);

/// Claim slots come in blocks of this many, one block per (backend, snat address, 64 snat
/// ports): the consecutive ports a backend's cursor hands out sit in consecutive slots, so the
/// next new flow to a backend finds its slot in a line and page the last one warmed (a slot at
/// a hash of the whole key is a cold line and, in an array of tens of MB, a TLB miss).
pub const CLAIM_BLOCK: u32 = 64;

/// The slot (`< slots`, a multiple of [`CLAIM_BLOCK`]) of a reply key: its block at a hash of
/// the key without the snat port's low bits, scaled to the array (a multiply and a shift; see
/// [`source_set`]), and in it the slot of those bits.
#[inline(always)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "(hash * blocks) >> 32 < blocks, a u32"
)]
pub fn claim_slot<A: FlowAddr>(key: &FlowKey<A>, slots: u32) -> u32 {
    let block = ((u64::from(claim_hash(key)) * u64::from(slots / CLAIM_BLOCK)) >> 32) as u32;
    block * CLAIM_BLOCK + u32::from(u16::from_be(key.dport)) % CLAIM_BLOCK
}

/// A multiply-xorshift over the key's 32-bit words (4 for IPv4, 10 for IPv6), the snat port's
/// low bits left out (see [`claim_slot`]): the port blocks of one backend, and one block over
/// many backends, spread over the array.
#[inline(always)]
pub fn claim_hash<A: FlowAddr>(key: &FlowKey<A>) -> u32 {
    const WORDS: usize = core::mem::size_of::<FlowKey6>() / 4;
    // The word holding the ports (after the two addresses), and in it the destination port's
    // low byte (the port is in network order: its second byte).
    let ports = 2 * core::mem::size_of::<A>() / 4;
    let low_bits = if cfg!(target_endian = "little") {
        (CLAIM_BLOCK - 1) << 24
    } else {
        CLAIM_BLOCK - 1
    };
    let n = core::mem::size_of::<FlowKey<A>>() / 4;
    let words = core::ptr::from_ref(key).cast::<u32>();
    let mut h: u32 = 0x2545_f491;
    let mut i = 0;
    while i < WORDS && i < n {
        // SAFETY: i < size_of::<FlowKey<A>>() / 4, and FlowKey is repr(C) of 4-byte-aligned
        // fields without holes (its padding is explicit fields).
        let mut w = unsafe { words.add(i).read() };
        if i == ports {
            w &= !low_bits;
        }
        h = (h ^ w).wrapping_mul(0x9e37_79b1);
        h ^= h >> 15;
        i += 1;
    }
    h.wrapping_mul(0x85eb_ca6b) ^ (h >> 13)
}

// ---------------------------------------------------------------------------------------------
// LB_HOPS: a per-CPU next-hop cache, direct-mapped by a hash of the destination. A FIB lookup is
// the largest single cost of forwarding a packet; this makes it once a second per destination
// and CPU. A route or neighbour change reaches a destination within that second.
// ---------------------------------------------------------------------------------------------
pub const HOP_SLOTS: u32 = 1 << HOP_SLOT_BITS;
/// log2 of [`HOP_SLOTS`] (the slot is [`crate::hash::slot_hash`]'s top bits).
pub const HOP_SLOT_BITS: u32 = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hop {
    pub dst: Addr,
    /// Egress device (0: slot empty), and when it was looked up ([`hop_epoch`]).
    pub ifindex: u32,
    pub epoch: u32,
    /// Destination then source MAC as 16-bit words.
    pub macs: [u16; 6],
    /// `HOP_VLAN | id` to push a VLAN tag, or 0.
    pub vlan: u16,
    /// The longest datagram the FIB accepted for this route (its MTU is at least that).
    pub len_ok: u16,
}
const _: () = assert!(core::mem::size_of::<Hop>() == 40);

/// `Hop::vlan`: a VLAN tag is to be pushed.
pub const HOP_VLAN: u16 = 0x8000;
/// `Hop::vlan`: the egress device has a policy hook ([`IFACE_POLICY_HOOK`]): the packet is
/// handed over to `lb_uplink_tc`, which sends it through that hook.
pub const HOP_POLICY_HOOK: u16 = 0x4000;
/// `Hop::vlan`: the egress device's delivery is `netfilter` ([`IFACE_NETFILTER`]): the packet
/// goes to the kernel's forwarding.
pub const HOP_NETFILTER: u16 = 0x2000;

/// The period a cached next hop is used for: about a second (2^30 ns).
#[inline(always)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "the epoch wraps at 32 bits; a slot is fresh only when equal to now's"
)]
pub const fn hop_epoch(now_ns: u64) -> u32 {
    (now_ns >> 30) as u32
}

// ---------------------------------------------------------------------------------------------
// LB_IFACES: what the data path must know of an egress device the FIB names: VLAN devices on
// top of attached interfaces (so a frame can leave tagged), and devices with a policy hook.
// ---------------------------------------------------------------------------------------------
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Iface {
    /// Ifindex of the device the VLAN device sits on; 0: not a VLAN device.
    pub parent: u32,
    /// VLAN id, host byte order.
    pub vlan_id: u16,
    /// IFACE_* bits.
    pub flags: u16,
}

/// `Iface::flags`: something else inspects what the kernel sends out of this device (a TC
/// egress program or filter of another owner, such as a CNI's network policy): packets to it are
/// handed over to `lb_uplink_tc`, which sends them out through that hook, never redirected past
/// it.
pub const IFACE_POLICY_HOOK: u16 = 1;
/// `Iface::flags`: netfilter's forward path judges what the kernel forwards out of this device
/// (or the node config says so): packets of new flows to it go to the kernel's forwarding, with
/// the client's address kept, both directions through conntrack and the forward rules.
pub const IFACE_NETFILTER: u16 = 2;
const _: () = assert!(core::mem::size_of::<Iface>() == 8);

/// The source MAC `lb_uplink` gives a rewritten packet it passes for a local pod behind a policy
/// hook: `lb_uplink_tc` at the uplink's TC ingress redirects such a packet, if it belongs to a
/// live balanced flow, to the pod veth's egress, past netfilter (see handoff.rs in lb-ebpf). A
/// locally administered unicast address ("\x06xdplb").
pub const HANDOFF_MAC: [u8; 6] = [0x06, b'x', b'd', b'p', b'l', b'b'];

// ---------------------------------------------------------------------------------------------
// Rate limiting (LB_POLICIES, LB_SOURCES, LB_OVERFLOW, LB_PREFIXES).
// ---------------------------------------------------------------------------------------------
pub use crate::bucket::{Bucket, Limit};

/// New sources beyond the source table's capacity are admitted and counted (else they share
/// one bucket per policy).
pub const POLICY_FAIL_OPEN: u32 = 1;
/// A TCP SYN rejected by the connection-rate limit is answered with a RST.
pub const POLICY_RST_SYN: u32 = 2;
/// The policy has per-prefix overrides in LB_PREFIXES.
pub const POLICY_HAS_PREFIXES: u32 = 4;
/// A limit of the policy (or of one of its overrides) is too fast for the coarse clock (see
/// [`crate::bucket::Limit::coarse_clock_ok`]): established flows read the precise one.
pub const POLICY_PRECISE_CLOCK: u32 = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Packets per second and burst (rate 0: not limited).
    pub packets: Limit,
    /// New connections per second and burst (rate 0: not limited).
    pub connections: Limit,
    /// IPv6 sources share a bucket per prefix of this length.
    pub v6_prefix_len: u8,
    /// Bumped each time the id is given to another policy: sources tracked under the old one
    /// no longer match (see [`SourceKey::policy`]).
    pub generation: u8,
    pub _pad: u16,
    /// `POLICY_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Policy>() == 72);

impl Policy {
    /// The [`SourceKey::policy`] of this policy's sources under id `id`.
    #[inline(always)]
    pub const fn source_id(&self, id: u32) -> u32 {
        id | (self.generation as u32) << 24
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    /// Source address, IPv6 masked to the policy's prefix length.
    pub addr: Addr,
    /// Policy id in the low 24 bits, its generation in the high 8 ([`Policy::source_id`]).
    pub policy: u32,
}
const _: () = assert!(core::mem::size_of::<SourceKey>() == 20);

impl SourceKey {
    /// The policy id alone.
    #[inline(always)]
    pub const fn policy_id(&self) -> u32 {
        self.policy & 0x00ff_ffff
    }
}

/// One tracked source: its key, its buckets and what it had dropped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub key: SourceKey,
    /// Packets this source had dropped (any reason, saturating), for `lb-agent status`.
    pub dropped: u32,
    pub packets: Bucket,
    pub connections: Bucket,
}
const _: () = assert!(core::mem::size_of::<Source>() == 56);

/// The source table is set-associative, in two arrays: LB_SOURCE_TAGS holds each set's
/// SOURCE_WAYS tags, LB_SOURCES the sources, slot `set * SOURCE_WAYS + way`. A source lives in
/// one of the ways of the set its hash picks. Not a BPF hash map: that costs 48 bytes of element
/// header per entry and an allocation per new source (the spoofed flood's path); here a source
/// costs 60 bytes and a new one a compare-and-swap. A way is claimed by compare-and-swap of its
/// tag (FREE, or a reclaimable source's tag, -> BUSY), filled, then published with the source's
/// tag. A source is reclaimable when both its buckets have refilled and it has been quiet for
/// [`SOURCE_KEEP_NS`]: a source being limited is never evicted (it would come back with a full
/// bucket). (Two arrays, not one of sets: the way found is then only a map key, which keeps
/// the verifier from following each way as a path of its own.)
pub const SOURCE_WAYS: usize = 8;
/// A slot's tag: free, being filled, or (>= 2) its source's [`source_tag`].
pub const SOURCE_FREE: u32 = 0;
pub const SOURCE_BUSY: u32 = 1;
/// How long a refilled source keeps its slot after its last packet: the clients in the middle
/// of talking keep theirs under a flood of spoofed sources that fills the table.
pub const SOURCE_KEEP_NS: u64 = 10_000_000_000;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceTags {
    pub tags: [u32; SOURCE_WAYS],
}
const _: () = assert!(core::mem::size_of::<SourceTags>() == 32);

/// The hash of a source key: its set is [`source_set`], its tag [`source_tag`].
#[inline(always)]
pub fn source_hash(key: &SourceKey) -> u32 {
    crate::hash::source_hash(&key.addr, key.policy)
}

/// The set (`< sets`) of a source whose hash is `hash`: the hash scaled to the number of sets,
/// a multiply and a shift. Not `hash % sets`: a division by a run-time value is tens of cycles,
/// on every packet the limiter checks. (Its top bits pick the set; the tag keeps all 32.)
#[inline(always)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "(hash * sets) >> 32 < sets, a u32"
)]
pub const fn source_set(hash: u32, sets: u32) -> u32 {
    ((hash as u64 * sets as u64) >> 32) as u32
}

/// A source's tag: from other bits of the hash than the set's, never FREE or BUSY.
#[inline(always)]
pub const fn source_tag(hash: u32) -> u32 {
    hash.rotate_left(16) | 2
}

/// Sets for `entries` sources.
#[inline(always)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "SOURCE_WAYS is 8 (a const fn cannot call try_from)"
)]
pub const fn source_sets(entries: u32) -> u32 {
    let sets = entries.div_ceil(SOURCE_WAYS as u32);
    if sets == 0 { 1 } else { sets }
}

/// LPM trie key: the policy id is matched in full, then the address by prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefixKey {
    /// Network byte order, so the trie matches it bit by bit before the address.
    pub policy: [u8; 4],
    pub addr: Addr,
}
const _: () = assert!(core::mem::size_of::<PrefixKey>() == 20);

pub const PREFIX_EXEMPT: u32 = 1;
pub const PREFIX_DENY: u32 = 2;
/// Limit with the policy in `policy` instead of the service's.
pub const PREFIX_LIMIT: u32 = 3;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixRule {
    /// `PREFIX_*`.
    pub action: u32,
    pub policy: u32,
}
const _: () = assert!(core::mem::size_of::<PrefixRule>() == 8);

// ---------------------------------------------------------------------------------------------
// LB_AFFINITY: (service, client address) -> backend, for session affinity.
// ---------------------------------------------------------------------------------------------
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: Addr,
    pub service: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 20);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    pub backend: u32,
    /// The backend id's generation (see [`ServiceInfo::generation`]).
    pub generation: u8,
    pub _pad1: u8,
    pub _pad2: u16,
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Affinity>() == 16);

#[cfg(feature = "user")]
mod pod {
    use super::{
        Addr, AddrInfo, Affinity, AffinityKey, Backend, Claim4, Claim6, Config, Flow4, Flow6,
        FlowKey4, FlowKey6, Hop, Iface, LinkMac, Policy, PortRange, PrefixKey, PrefixRule, Service,
        ServiceInfo, ServiceKey, Source, SourceKey, SourceTags,
    };
    use crate::stats::{BackendStats, ServiceStats};

    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: every type listed is #[repr(C)] plain data with explicit padding and no
            // invalid bit patterns.
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        Addr,
        Config,
        AddrInfo,
        ServiceKey,
        Service,
        Backend,
        FlowKey4,
        FlowKey6,
        Flow4,
        Flow6,
        Claim4,
        Claim6,
        ServiceInfo,
        LinkMac,
        Hop,
        PortRange,
        Iface,
        Policy,
        SourceKey,
        Source,
        SourceTags,
        PrefixKey,
        PrefixRule,
        AffinityKey,
        Affinity,
        ServiceStats,
        BackendStats,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct blocks among the slots of `n` keys `key(0..n)` in 65536 slots (1024 blocks).
    fn distinct_blocks<A: FlowAddr>(n: u32, key: impl Fn(u32) -> FlowKey<A>) -> u32 {
        const SLOTS: u32 = 1 << 16;
        let mut seen = [false; (SLOTS / CLAIM_BLOCK) as usize];
        for i in 0..n {
            let s = claim_slot(&key(i), SLOTS);
            assert!(s < SLOTS);
            seen[(s / CLAIM_BLOCK) as usize] = true;
        }
        seen.iter().map(|&b| u32::from(b)).sum()
    }

    #[test]
    fn a_backends_ports_fill_blocks_in_order_and_blocks_spread_over_the_array() {
        let snat = V4::from_addr(&Addr::v4([192, 168, 0, 1]));
        let backend = |i: u32| {
            let [_, _, hi, lo] = i.to_be_bytes();
            V4::from_addr(&Addr::v4([10, 1, hi, lo]))
        };
        let port = |p: u32| u16::try_from(32768 + p).unwrap().to_be();
        let ports = |p| FlowKey4::new(backend(7), snat, 8080u16.to_be(), port(p), 6);
        let backends = |b| FlowKey4::new(backend(b), snat, 8080u16.to_be(), 40000u16.to_be(), 6);
        let mut a6 = [0u8; 16];
        a6[0] = 0xfd;
        let (mut b6, mut s6) = (a6, a6);
        b6[15] = 7;
        s6[15] = 1;
        let v6 = |p| FlowKey6::new(Addr(b6), Addr(s6), 8080u16.to_be(), port(p), 6);
        // 64 blocks of a backend's 4096 ports, 1024 places: a random function puts ~2 pairs in
        // one place.
        assert!(distinct_blocks(4096, ports) >= 58);
        assert!(distinct_blocks(4096, v6) >= 58);
        // One port of 4096 backends: a random function leaves ~2% of the 1024 places empty.
        assert!(distinct_blocks(4096, backends) >= 980);
        // A block of ports is a block of slots, in order.
        let first = claim_slot(&ports(0), 1 << 16);
        assert_eq!(first % CLAIM_BLOCK, 0, "port 32768 starts a block");
        for p in 1..CLAIM_BLOCK {
            assert_eq!(claim_slot(&ports(p), 1 << 16), first + p);
        }
        // The protocol is part of the key.
        let udp = FlowKey4 {
            proto: 17,
            ..ports(0)
        };
        assert_ne!(claim_hash(&ports(0)), claim_hash(&udp));
    }

    #[test]
    fn a_source_set_is_in_range_and_sources_spread_over_the_sets() {
        for sets in [1, 7, 1000, 131_072] {
            for h in [0, 1, 0x8000_0000, 0xdead_beef, u32::MAX] {
                assert!(source_set(h, sets) < sets, "{h} of {sets}");
            }
        }
        let sets = 64;
        let mut count = [0u32; 64];
        for i in 0..6400u32 {
            let [_, _, hi, lo] = i.to_be_bytes();
            let key = SourceKey {
                addr: Addr::v4([10, 0, hi, lo]),
                policy: 1,
            };
            count[source_set(source_hash(&key), sets) as usize] += 1;
        }
        // 100 per set on average.
        assert!(count.iter().all(|&c| (50..150).contains(&c)), "{count:?}");
    }

    const S: u64 = 1_000_000_000;

    fn cfg() -> Config {
        Config {
            tcp_idle: flow_ticks(350 * S),
            udp_idle: flow_ticks(120 * S),
            tcp_closing: flow_ticks(10 * S),
            tcp_handshake: flow_ticks(60 * S),
            tcp_time_wait: flow_ticks(60 * S),
            ..Config::default()
        }
    }

    fn flow(flags: u8) -> Flow4 {
        Flow4 {
            flags,
            last: flow_clock(1000 * S),
            ..Flow4::default()
        }
    }

    /// The last tick each kind of entry is live, idle since 1000 s.
    #[test]
    fn each_state_has_its_timeout() {
        let cases = [
            (flow(FLOW_TCP), 350),
            (flow(0), 120),
            (flow(FLOW_TCP | FLOW_OPENING), 60),
            (flow(FLOW_TCP | FLOW_CLOSING), 10),
            // A RST during the handshake: the shorter linger.
            (flow(FLOW_TCP | FLOW_OPENING | FLOW_CLOSING), 10),
            (flow(FLOW_TCP | FLOW_REPLY | FLOW_SNAT), 350),
            // The backend closed first: the port waits out its TIME_WAIT.
            (
                flow(FLOW_TCP | FLOW_REPLY | FLOW_CLOSING | FLOW_TIME_WAIT),
                60,
            ),
        ];
        for (f, live_s) in cases {
            let last = f.last;
            let ticks = f.timeout(&cfg());
            assert!(!f.is_expired(&cfg(), last + ticks), "{f:?}");
            assert!(f.is_expired(&cfg(), last + ticks + 1), "{f:?}");
            // UDP entries live a peer-refresh window longer (see PEER_REFRESH_SHIFT).
            let window = if f.flags & FLOW_TCP == 0 {
                u64::from(PEER_REFRESH_WINDOW) << FLOW_CLOCK_SHIFT
            } else {
                0
            };
            // Ticks are a little longer than a millisecond: never shorter than asked.
            let ns = u64::from(ticks) << FLOW_CLOCK_SHIFT;
            assert!(ns >= live_s * S + window, "{f:?}");
            assert!(ns < live_s * S + window + (1 << FLOW_CLOCK_SHIFT), "{f:?}");
        }
        // A clock read a tick before the entry's stamp is not a long idle time.
        let f = flow(FLOW_TCP | FLOW_OPENING);
        assert!(!f.is_expired(&cfg(), f.last - 1));
        // Across the clock's wrap.
        let mut f = flow(FLOW_TCP);
        f.last = u32::MAX - 5;
        assert!(!f.is_expired(&cfg(), 10));
    }

    /// An entry's id word keeps the id whole beside the source's way, known or not.
    #[test]
    fn the_id_and_the_source_way_share_a_word_without_touching() {
        let ways = u32::try_from(SOURCE_WAYS).unwrap();
        for id in [0, 1, 16_383, MAX_IDS - 1] {
            for way in 0..ways {
                let f = Flow4 {
                    id_way: id_way(id, way),
                    ..Flow4::default()
                };
                assert_eq!((f.id(), f.source_way()), (id, way));
            }
            for unknown in [ways, u32::MAX] {
                let f = Flow4 {
                    id_way: id_way(id, unknown),
                    ..Flow4::default()
                };
                assert_eq!(f.id(), id);
                assert!(f.source_way() >= ways, "not known");
            }
        }
        assert!(Flow4::default().source_way() >= ways);
    }

    /// Only a half-open entry gives way, and only once it has been idle a second.
    #[test]
    fn a_half_open_entry_gives_way_after_a_second_idle() {
        let second = |f: &Flow4| f.last + HALF_OPEN_GIVES_WAY;
        let half_open = flow(FLOW_TCP | FLOW_REPLY | FLOW_SNAT | FLOW_OPENING);
        assert!(!half_open.gives_way(half_open.last));
        assert!(!half_open.gives_way(second(&half_open) - 1));
        assert!(half_open.gives_way(second(&half_open)));
        assert!(u64::from(HALF_OPEN_GIVES_WAY) << FLOW_CLOCK_SHIFT >= S);
        // A clock read a tick before the stamp is not a second idle.
        assert!(!half_open.gives_way(half_open.last - 1));
        for f in [
            flow(FLOW_TCP | FLOW_REPLY | FLOW_SNAT),
            flow(FLOW_REPLY | FLOW_SNAT),
            flow(FLOW_TCP | FLOW_REPLY | FLOW_SNAT | FLOW_CLOSING | FLOW_TIME_WAIT),
        ] {
            assert!(!f.gives_way(second(&f) + 1000), "{f:?}");
        }
    }

    #[test]
    fn snat_ports_run_through_both_ranges() {
        let c = Config {
            snat_ports: [
                PortRange {
                    min: 1024,
                    max: 1026,
                },
                PortRange {
                    min: 61000,
                    max: 61001,
                },
            ],
            ..Config::default()
        };
        assert_eq!(c.snat_port_count(), 5);
        let ports: [u16; 5] = core::array::from_fn(|i| c.snat_port(u32::try_from(i).unwrap()));
        assert_eq!(ports, [1024, 1025, 1026, 61000, 61001]);
        let one = Config {
            snat_ports: [PortRange { min: 7, max: 7 }, PortRange::EMPTY],
            ..Config::default()
        };
        assert_eq!(one.snat_port_count(), 1);
        assert_eq!(one.snat_port(0), 7);
    }
}
