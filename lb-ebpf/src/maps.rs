//! Every map of the data path, one line each. Layouts, names and default sizes live in lb-common;
//! the agent resizes the sizable ones at load time and pins them all.
use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams,
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    Addr, AddrInfo, Affinity, AffinityKey, Backend, BackendStats, COUNTER_COUNT, Claim4, Claim6,
    Config, Counter, DEFAULT_AFFINITY_ENTRIES, DEFAULT_FLOW_ENTRIES, DEFAULT_FLOW_ENTRIES_V6,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, DEFAULT_SOURCE_ENTRIES, DROP_REASONS, DropReason,
    Flow, Flow4, Flow6, FlowAddr, FlowKey, FlowKey4, FlowKey6, HOP_SLOTS, Hop, Iface, LinkMac,
    MAC_SLOTS, MAX_ADDRS, MAX_IFACES, MAX_POLICIES, MAX_PREFIXES, PORT_CURSORS, Policy, PrefixKey,
    PrefixRule, SOURCE_WAYS, Service, ServiceInfo, ServiceKey, ServiceStats, Source, SourceTags,
    filter, ring_slots, source_sets,
};

#[map]
pub static LB_CONFIG: Array<Config> = Array::with_max_entries(1, 0);
/// Two planes of FILTER_WORDS words (lb_common::filter).
#[map]
pub static LB_FILTER: Array<u64> = Array::with_max_entries(filter::FILTER_ENTRIES, 0);
#[map]
pub static LB_ADDRS: HashMap<Addr, AddrInfo> = HashMap::with_max_entries(MAX_ADDRS, 0);
#[map]
pub static LB_MACS: Array<LinkMac> = Array::with_max_entries(MAC_SLOTS, 0);
#[map]
pub static LB_SERVICES: HashMap<ServiceKey, Service> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);
#[map]
pub static LB_SVC_INFO: Array<ServiceInfo> = Array::with_max_entries(DEFAULT_MAX_SERVICES, 0);
#[map]
pub static LB_BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
#[map]
pub static LB_RINGS: Array<u32> =
    Array::with_max_entries(ring_slots(DEFAULT_MAX_SERVICES, DEFAULT_MAX_BACKENDS), 0);
#[map]
pub static LB_FLOWS4: LruHashMap<FlowKey4, Flow4> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);
#[map]
pub static LB_FLOWS6: LruHashMap<FlowKey6, Flow6> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES_V6, 0);
/// The reply entries of snat flows, each holding its snat port (see lb_common::Claim).
#[map]
pub static LB_CLAIMS4: Array<Claim4> = Array::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);
#[map]
pub static LB_CLAIMS6: Array<Claim6> = Array::with_max_entries(DEFAULT_FLOW_ENTRIES_V6, 0);
/// Each backend's snat port cursor (see flow.rs, `claim_port`).
#[map]
pub static LB_PORTS: Array<u32> = Array::with_max_entries(PORT_CURSORS, 0);
#[map]
pub static LB_HOPS: PerCpuArray<Hop> = PerCpuArray::with_max_entries(HOP_SLOTS, 0);
#[map]
pub static LB_DEVMAP: DevMapHash = DevMapHash::with_max_entries(MAX_IFACES, 0);
#[map]
pub static LB_IFACES: HashMap<u32, Iface> = HashMap::with_max_entries(MAX_IFACES, 0);
#[map]
pub static LB_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);
#[map]
pub static LB_SVC_STATS: PerCpuArray<ServiceStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);
#[map]
pub static LB_BE_STATS: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
#[map]
pub static LB_POLICIES: Array<Policy> = Array::with_max_entries(MAX_POLICIES, 0);
/// Set-associative (see lb_common::SourceTags): a source being limited is never evicted.
#[map]
pub static LB_SOURCE_TAGS: Array<SourceTags> =
    Array::with_max_entries(source_sets(DEFAULT_SOURCE_ENTRIES), 0);
#[map]
pub static LB_SOURCES: Array<Source> =
    Array::with_max_entries(source_sets(DEFAULT_SOURCE_ENTRIES) * SOURCE_WAYS as u32, 0);
#[map]
pub static LB_OVERFLOW: Array<Source> = Array::with_max_entries(MAX_POLICIES, 0);
#[map]
pub static LB_PREFIXES: LpmTrie<PrefixKey, PrefixRule> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, Affinity> =
    LruHashMap::with_max_entries(DEFAULT_AFFINITY_ENTRIES, 0);

/// Room for the larger temporaries of one packet: BPF gives a program 512 bytes of stack over
/// its whole call chain. One per CPU, and XDP never runs twice at once on a CPU, so the packet
/// being processed owns it (TC programs run with preemption off as well). Each field has one
/// user at a time (noted).
#[repr(C)]
pub struct Scratch {
    /// bpf_fib_lookup parameters (nexthop::route).
    pub fib: FibParams,
    /// The new flow's backend choice (flow::choose, then flow::open).
    pub choice: crate::flow::Choice,
    /// A new flow's target (flow::open), then its send.
    pub target: crate::flow::Target,
    /// The packet's one clock reading, for the slow path a tail call continues in (0: none).
    pub now: u64,
    /// The jiffy count at this CPU's last coarse-clock reading, and the reading (tick_clock);
    /// beside the fields every packet of a flow touches.
    pub jiffies: u64,
    pub tick_ns: u64,
    /// The packet's transport header as `transport` read it, for the new-flow slow path.
    pub ports: crate::parse::Ports,
    /// The source the rate limiter admitted without a slot (ratelimit::check, then commit).
    pub pending: crate::ratelimit::Pending,
    /// Why flow::open failed.
    pub reason: DropReason,
    /// flow::open found the flow live (a retransmitted SYN): its target is `target`.
    pub live: bool,
    /// Ways of a source set found (ratelimit.rs, scan).
    pub ways: [u32; 2],
    /// The way of its set the packet's rate-limit source was found in (ratelimit::check;
    /// u32::MAX: none), for its flow's entry (Flow::source_way).
    pub source_way: u32,
    /// A new flow's entries and its reply entry's key while they are made (flow::create), of
    /// either family: room for the IPv6 ones, the larger (see `entries`).
    pub key: FlowKey6,
    pub reply_key: FlowKey6,
    pub forward: Flow6,
    pub reply: Flow6,
    /// A new flow's next hop and how it was found (nexthop::Route), from before the flow is
    /// made to its send.
    pub next: crate::nexthop::Next,
    pub route: u32,
    /// flow::claim_port: the first snat source number passed whose half-open flow gives way
    /// (u32::MAX: none). Here, not in a register: the verifier would follow each try with and
    /// without one.
    pub fallback: u32,
    /// The half-open flow whose claim slot the new flow took (flow::claim), its reply key and
    /// entry, while `half_open_taken`: its client entry is dropped at a shallower call depth
    /// (flow::open), where the stack has room.
    pub half_open_taken: bool,
    pub half_open_key: FlowKey6,
    pub half_open: Flow6,
}

/// Slow paths, tail-called: TAIL_NEW_FLOW, TAIL_ICMP.
#[map]
pub static LB_PROGS: ProgramArray = ProgramArray::with_max_entries(2, 0);

#[map]
pub static LB_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The packet being processed, as parsed. In map memory, not on the stack, on purpose: the
/// verifier tracks what a program keeps on its stack, value by value, and follows each
/// combination of parse results (family, header lengths, states) through the rest of the
/// program as a path of its own; values read from a map are just numbers to it. Every packet
/// access is bounds-checked at run time anyway (parse::ptr_at).
#[map]
pub static LB_PACKET: PerCpuArray<crate::parse::Packet> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's packet slot.
#[inline(always)]
pub fn packet() -> Option<&'static mut crate::parse::Packet> {
    // SAFETY: per-CPU, and no other invocation runs on this CPU while we do.
    LB_PACKET.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// This CPU's scratch space.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: per-CPU, and no other invocation runs on this CPU while we do.
    LB_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The coarse clock (CLOCK_MONOTONIC_COARSE), read once a tick on each CPU: it moves only when
/// the kernel's timekeeping runs, just after the jiffy count moves, so the reading taken after
/// the count last moved is what reading it again would give. The helper call costs more than
/// the rest of a flow's timekeeping; the count is one load (the verifier inlines
/// `bpf_jiffies64`). A reading equal to the last one came between the count's move and the
/// clock's (or the clock has not moved): it is not kept, the next packet reads again. (A CPU
/// idle through the tick before that reads in the same gap keeps a reading a tick old, until
/// the next tick: fine for flow stamps and the hop cache, and within what a coarse-clock
/// rate-limit policy allows, whose bursts hold two of the clock's steps.)
#[inline(always)]
pub fn tick_clock(s: &mut Scratch) -> u64 {
    // SAFETY: BPF helpers without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    if s.jiffies == jiffies {
        return s.tick_ns;
    }
    // SAFETY: as above.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now != s.tick_ns {
        s.jiffies = jiffies;
        s.tick_ns = now;
    }
    now
}

const _: () = assert!(
    core::mem::size_of::<FlowKey4>() <= core::mem::size_of::<FlowKey6>()
        && core::mem::size_of::<Flow4>() <= core::mem::size_of::<Flow6>()
        && core::mem::align_of::<FlowKey4>() <= core::mem::align_of::<FlowKey6>()
        && core::mem::align_of::<Flow4>() <= core::mem::align_of::<Flow6>()
);

/// A new flow's reply key, forward entry and reply entry in scratch space, as family `A`'s.
/// Kept off the stack: a subprogram chain may use 512 bytes in all.
#[inline(always)]
pub fn entries<A: FlowAddr>(s: &mut Scratch) -> (&mut FlowKey<A>, &mut Flow<A>, &mut Flow<A>) {
    // SAFETY: each field has room and alignment for either family's type (asserted above) and
    // is only used as one type at a time.
    unsafe {
        (
            &mut *(&raw mut s.reply_key).cast::<FlowKey<A>>(),
            &mut *(&raw mut s.forward).cast::<Flow<A>>(),
            &mut *(&raw mut s.reply).cast::<Flow<A>>(),
        )
    }
}

/// The taken half-open flow's reply key and entry in scratch space, as family `A`'s (see
/// `entries`).
#[inline(always)]
pub fn half_open<A: FlowAddr>(s: &mut Scratch) -> (&mut FlowKey<A>, &mut Flow<A>) {
    // SAFETY: as in `entries`.
    unsafe {
        (
            &mut *(&raw mut s.half_open_key).cast::<FlowKey<A>>(),
            &mut *(&raw mut s.half_open).cast::<Flow<A>>(),
        )
    }
}

/// A new flow's own key in scratch space, as family `A`'s (see `entries`).
#[inline(always)]
pub fn new_key<A: FlowAddr>(s: &mut Scratch) -> &mut FlowKey<A> {
    // SAFETY: as in `entries`.
    unsafe { &mut *(&raw mut s.key).cast::<FlowKey<A>>() }
}

#[inline(always)]
pub fn config() -> Option<&'static Config> {
    LB_CONFIG.get(0)
}

/// A map insert with BPF_NOEXIST found the key taken (`-EEXIST`).
pub const EEXIST: i32 = 17;

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(v) = LB_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *v += 1 };
    }
}

/// Counts a packet for a service that was dropped, per service and node-wide (the node-wide
/// counter of each reason is `drop_<reason>`, see `DropReason::counter`).
#[inline(always)]
pub fn count_service_drop(service: u32, reason: DropReason) {
    // The compiler knows `reason` is in range and would drop the bounds check; the verifier does
    // not (the value may have come through the stack of another frame). A volatile read keeps
    // the check in.
    // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
    let index = unsafe { core::ptr::read_volatile(&(reason as u32)) } as usize;
    if index >= DROP_REASONS {
        return;
    }
    if let Some(s) = LB_SVC_STATS.get_ptr_mut(service) {
        // SAFETY: per-CPU slot, bounds checked above.
        unsafe { (*s).drops[index] += 1 };
    }
    count(reason.counter());
}

/// Whether `addr` is in filter plane `plane`.
#[inline(always)]
pub fn in_filter(plane: filter::Plane, addr: &Addr) -> bool {
    let (word, mask) = filter::position(plane, addr);
    LB_FILTER.get(word).is_some_and(|w| w & mask != 0)
}
