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
pub const MAP_FLOWS: &str = "LB_FLOWS";
pub const MAP_DEVMAP: &str = "LB_DEVMAP";
pub const MAP_IFACES: &str = "LB_IFACES";
pub const MAP_COUNTERS: &str = "LB_COUNTERS";
pub const MAP_SVC_STATS: &str = "LB_SVC_STATS";
pub const MAP_BE_STATS: &str = "LB_BE_STATS";
pub const MAP_POLICIES: &str = "LB_POLICIES";
pub const MAP_SOURCES: &str = "LB_SOURCES";
pub const MAP_PREFIXES: &str = "LB_PREFIXES";
pub const MAP_AFFINITY: &str = "LB_AFFINITY";
/// The rate-limit policy of each service, by service id: what established flows are held to,
/// so a policy change or removal reaches live connections.
pub const MAP_SVC_POLICY: &str = "LB_SVC_POLICY";

/// Every map the program defines, in the order the agent checks and pins them.
pub const ALL_MAPS: [&str; 17] = [
    MAP_CONFIG,
    MAP_FILTER,
    MAP_ADDRS,
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_RINGS,
    MAP_FLOWS,
    MAP_DEVMAP,
    MAP_IFACES,
    MAP_COUNTERS,
    MAP_SVC_STATS,
    MAP_BE_STATS,
    MAP_POLICIES,
    MAP_SOURCES,
    MAP_PREFIXES,
    MAP_AFFINITY,
    MAP_SVC_POLICY,
];

/// Program names (ELF symbols) in the data-path object: the two attached to interfaces, and
/// the slow paths they tail-call (each verified on its own, which keeps the verifier's work per
/// program well under its limit).
pub const PROG_UPLINK: &str = "lb_uplink";
pub const PROG_BACKEND: &str = "lb_backend";
pub const PROG_NEW_FLOW: &str = "lb_new_flow";
pub const PROG_ICMP: &str = "lb_icmp";
/// LB_PROGS slots of the tail-called programs.
pub const TAIL_NEW_FLOW: u32 = 0;
pub const TAIL_ICMP: u32 = 1;
/// The per-load program array (never pinned: each loaded entry program must tail-call the
/// slow paths loaded with it).
pub const MAP_PROGS: &str = "LB_PROGS";

/// Bumped whenever a map's key or value layout changes: the agent pins under a directory
/// named after it, so a new layout never reads maps pinned by an incompatible older one.
pub const MAP_LAYOUT_VERSION: u32 = 1;

// ---------------------------------------------------------------------------------------------
// Capacities compiled into the object. The agent overrides the sizable ones at load time.
// ---------------------------------------------------------------------------------------------
pub const DEFAULT_RING_SIZE: u32 = 16381;
pub const DEFAULT_MAX_SERVICES: u32 = 512;
pub const DEFAULT_MAX_BACKENDS: u32 = 16384;
pub const DEFAULT_FLOW_ENTRIES: u32 = 262_144;
pub const DEFAULT_SOURCE_ENTRIES: u32 = 65_536;
pub const MAX_ADDRS: u32 = 4096;
pub const MAX_IFACES: u32 = 256;
pub const MAX_POLICIES: u32 = 1024;
pub const MAX_PREFIXES: u32 = 16384;
pub const DEFAULT_AFFINITY_ENTRIES: u32 = 65_536;
/// Spare rings beyond one per service: a service's new ring is written into a free one and then
/// swapped in with one map update, so packets never see a half-written ring.
pub const SPARE_RINGS: u32 = 16;
/// Ring slots that hold no backend.
pub const NO_BACKEND: u32 = u32::MAX;

/// Words in the address filter (a bitmap over a hash of the address): 2^16 bits.
pub const FILTER_WORDS: u32 = 1024;
pub const FILTER_BITS: u32 = FILTER_WORDS * 64;

// ---------------------------------------------------------------------------------------------
// LB_CONFIG: one entry, node-wide settings the agent may change at any time.
// ---------------------------------------------------------------------------------------------
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Seed of the flow hash that indexes the Maglev rings; equal on every node.
    pub hash_seed: u32,
    /// Slots per Maglev ring (prime).
    pub ring_size: u32,
    /// Idle timeouts, nanoseconds.
    pub tcp_idle_ns: u64,
    pub udp_idle_ns: u64,
    /// How long a TCP flow lives after its first FIN or RST, nanoseconds.
    pub tcp_closing_ns: u64,
    /// How long a TCP flow opened by a SYN lives idle before the client's first ACK,
    /// nanoseconds: a spoofed SYN's entries go long before the idle timeout.
    pub tcp_handshake_ns: u64,
    /// Source address for `snat` services, per family (all zero: family not served).
    pub snat_v4: Addr,
    pub snat_v6: Addr,
    /// Source ports the data path allocates for `snat` flows, host byte order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// Rate-limit policy for services without one of their own (0: none).
    pub default_policy: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 88);

// ---------------------------------------------------------------------------------------------
// LB_FILTER: bitmap of addresses the data path cares about (VIPs, node SNAT addresses, local
// backends of client-IP-preserving services). A clear bit means "not ours": the packet goes to
// the kernel after one array read instead of a hash lookup.
// ---------------------------------------------------------------------------------------------
#[inline(always)]
pub fn filter_bit(addr: &Addr) -> u32 {
    crate::hash::addr_hash(addr) % FILTER_BITS
}

// ---------------------------------------------------------------------------------------------
// LB_ADDRS: address -> what it is.
// ---------------------------------------------------------------------------------------------
/// A VIP: packets to it that match no service are dropped, and it answers ping.
pub const ADDR_VIP: u32 = 1;
/// An address of this node used as a `snat` source: replies to it are translated back.
pub const ADDR_NODE: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrInfo {
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<AddrInfo>() == 4);

// ---------------------------------------------------------------------------------------------
// LB_SERVICES: (VIP, port, protocol) -> service.
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

/// Source NAT to the node's address (NLB's default for TCP IP targets). Without it the backend
/// sees the client's address and must be local to this node.
pub const SVC_SNAT: u32 = 1;
/// Session affinity by client address (`affinity_timeout_s`).
pub const SVC_AFFINITY: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index into LB_SVC_STATS.
    pub id: u32,
    /// Which ring of LB_RINGS is live: slots `ring * ring_size ..`.
    pub ring: u32,
    /// `SVC_*` bits.
    pub flags: u32,
    /// Rate-limit policy (index into LB_POLICIES; 0: the node default).
    pub policy: u32,
    /// Session affinity timeout, seconds.
    pub affinity_timeout_s: u32,
    /// Backends with weight > 0; 0 means every new flow is dropped.
    pub active_backends: u32,
    /// Digest of the ring's contents (agent-side: tells a restarted agent the ring is current).
    pub ring_digest: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Service>() == 32);

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
}
const _: () = assert!(core::mem::size_of::<Backend>() == 28);

// ---------------------------------------------------------------------------------------------
// LB_FLOWS: the flow table. One entry per direction: the client's packets (key: as the client
// sends them) and the backend's replies (key: as the backend sends them). Each entry holds the
// rewrite for the packets it matches, so both directions cost one lookup.
// ---------------------------------------------------------------------------------------------
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    // Word-shaped padding: a 3-byte array would be zeroed with a memset call, which BPF lacks.
    pub _pad1: u8,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    #[inline(always)]
    pub fn new(src: Addr, dst: Addr, sport: u16, dport: u16, proto: u8) -> Self {
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

    /// The same flow seen from the other end.
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        Self::new(self.dst, self.src, self.dport, self.sport, self.proto)
    }
}

/// This entry rewrites backend -> client replies (else client -> backend).
pub const FLOW_REPLY: u8 = 1;
/// The flow uses source NAT.
pub const FLOW_SNAT: u8 = 2;
/// A FIN or RST was seen: the entry lives `tcp_closing_ns` after its last packet.
pub const FLOW_CLOSING: u8 = 4;
/// The agent ended this flow: packets get a TCP RST instead of being forwarded.
pub const FLOW_RESET: u8 = 8;
/// A SYN opened this flow and the client has not acknowledged yet (client-side entries only):
/// the entry lives `tcp_handshake_ns` after its last packet, and the sweep removes the reply
/// entry with it.
pub const FLOW_OPENING: u8 = 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// The packet's addresses and ports after the rewrite.
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    /// For counters: LB_SVC_STATS and LB_BE_STATS indices.
    pub service: u32,
    pub backend: u32,
    /// The cached next hop (see [`Flow::hop_valid`]): the VLAN to tag with, `HOP_VLAN | id`,
    /// or 0 for none.
    pub hop_vlan: u16,
    /// `FLOW_*` bits.
    pub flags: u8,
    pub proto: u8,
    /// Last packet, CLOCK_MONOTONIC nanoseconds (coarse clock).
    pub last_seen_ns: u64,
    /// The cached next hop: egress device (0: none cached), when it was looked up
    /// ([`hop_epoch`]), and the destination then source MACs as 16-bit words.
    pub hop_ifindex: u32,
    pub hop_epoch: u32,
    pub hop_macs: [u16; 6],
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Flow>() == 80);

/// `Flow::hop_vlan`: a VLAN tag is to be pushed.
pub const HOP_VLAN: u16 = 0x8000;

/// The period a cached next hop is used for: about a second (2^30 ns). A route or neighbour
/// change reaches a flow within that, without the agent having to tell the data path.
#[inline(always)]
pub const fn hop_epoch(now_ns: u64) -> u32 {
    (now_ns >> 30) as u32
}

impl Flow {
    /// The cached next hop may be used at `now_ns`.
    #[inline(always)]
    pub fn hop_valid(&self, now_ns: u64) -> bool {
        self.hop_ifindex != 0 && self.hop_epoch == hop_epoch(now_ns)
    }

    /// A flow is over when idle longer than its protocol's timeout, than the closing linger
    /// once a FIN or RST was seen, or than the handshake timeout while still opening. (The data
    /// path treats an expired entry as absent; the agent's sweep deletes it.)
    #[inline(always)]
    pub fn is_expired(&self, cfg: &Config, now_ns: u64) -> bool {
        let timeout = if self.flags & FLOW_CLOSING != 0 {
            cfg.tcp_closing_ns
        } else if self.flags & FLOW_OPENING != 0 {
            cfg.tcp_handshake_ns
        } else if self.proto == IPPROTO_TCP {
            cfg.tcp_idle_ns
        } else {
            cfg.udp_idle_ns
        };
        // Signed: packets read the precise or the coarse clock (a tick apart), so `now` may be
        // a little before `last_seen_ns`; that is not a long idle time.
        now_ns.wrapping_sub(self.last_seen_ns) as i64 > timeout as i64
    }

    /// The key of this flow's other direction: the reverse of the rewritten tuple.
    #[inline(always)]
    pub fn peer_key(&self) -> FlowKey {
        FlowKey::new(self.dst, self.src, self.dport, self.sport, self.proto)
    }
}

// ---------------------------------------------------------------------------------------------
// LB_IFACES: VLAN devices on top of attached interfaces, so a frame can leave tagged.
// ---------------------------------------------------------------------------------------------
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Iface {
    /// Ifindex of the device the VLAN device sits on.
    pub parent: u32,
    /// VLAN id, host byte order.
    pub vlan_id: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Iface>() == 8);

// ---------------------------------------------------------------------------------------------
// Rate limiting (LB_POLICIES, LB_SOURCES, LB_PREFIXES).
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
    pub _pad1: u8,
    pub _pad2: u16,
    /// `POLICY_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Policy>() == 72);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    /// Source address, IPv6 masked to the policy's prefix length.
    pub addr: Addr,
    pub policy: u32,
}
const _: () = assert!(core::mem::size_of::<SourceKey>() == 20);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub packets: Bucket,
    pub connections: Bucket,
    /// Packets this source had dropped (any reason), for `lb-agent status`.
    pub dropped: u64,
}
const _: () = assert!(core::mem::size_of::<Source>() == 40);

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
    pub _pad: u32,
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Affinity>() == 16);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is #[repr(C)] plain data with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for crate::addr::Addr {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for AddrInfo {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for Iface {}
    unsafe impl aya::Pod for Policy {}
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for Source {}
    unsafe impl aya::Pod for PrefixKey {}
    unsafe impl aya::Pod for PrefixRule {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for Affinity {}
    unsafe impl aya::Pod for crate::stats::ServiceStats {}
    unsafe impl aya::Pod for crate::stats::BackendStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn cfg() -> Config {
        Config {
            tcp_idle_ns: 350 * S,
            udp_idle_ns: 120 * S,
            tcp_closing_ns: 10 * S,
            tcp_handshake_ns: 60 * S,
            ..Config::default()
        }
    }

    fn flow(proto: u8, flags: u8) -> Flow {
        Flow {
            proto,
            flags,
            last_seen_ns: 1000 * S,
            ..Flow::default()
        }
    }

    /// The last second each kind of entry is live, idle since 1000 s.
    #[test]
    fn each_state_has_its_timeout() {
        let cases = [
            (flow(IPPROTO_TCP, 0), 350),
            (flow(IPPROTO_UDP, 0), 120),
            (flow(IPPROTO_TCP, FLOW_OPENING), 60),
            (flow(IPPROTO_TCP, FLOW_CLOSING), 10),
            // A RST during the handshake: the shorter linger.
            (flow(IPPROTO_TCP, FLOW_OPENING | FLOW_CLOSING), 10),
            (flow(IPPROTO_TCP, FLOW_REPLY | FLOW_SNAT), 350),
        ];
        for (f, live_s) in cases {
            assert!(!f.is_expired(&cfg(), (1000 + live_s) * S), "{f:?}");
            assert!(f.is_expired(&cfg(), (1000 + live_s) * S + 1), "{f:?}");
        }
        // A clock read a tick before the entry's stamp is not a long idle time.
        assert!(!flow(IPPROTO_TCP, FLOW_OPENING).is_expired(&cfg(), 1000 * S - 1));
    }
}
