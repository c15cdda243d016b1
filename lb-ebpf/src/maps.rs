//! Every map of the data path, one line each. Layouts, names and default sizes live in lb-common;
//! the agent resizes the sizable ones at load time and pins them all.
use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use lb_common::*;

#[map]
pub static LB_CONFIG: Array<Config> = Array::with_max_entries(1, 0);
/// Two planes of FILTER_WORDS words: destinations we serve, then local backend addresses.
#[map]
pub static LB_FILTER: Array<u64> = Array::with_max_entries(2 * FILTER_WORDS, 0);
#[map]
pub static LB_ADDRS: HashMap<Addr, AddrInfo> = HashMap::with_max_entries(MAX_ADDRS, 0);
#[map]
pub static LB_SERVICES: HashMap<ServiceKey, Service> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);
#[map]
pub static LB_BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
#[map]
pub static LB_RINGS: Array<u32> =
    Array::with_max_entries((DEFAULT_MAX_SERVICES + SPARE_RINGS) * DEFAULT_RING_SIZE, 0);
#[map]
pub static LB_FLOWS: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);
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
/// The policy of each service by id (mirrors LB_SERVICES), read by established flows.
#[map]
pub static LB_SVC_POLICY: Array<u32> = Array::with_max_entries(DEFAULT_MAX_SERVICES, 0);
/// A plain hash, not an LRU: a source being limited must not be evicted (it would come back with
/// a full bucket). The agent reclaims entries whose buckets have refilled.
#[map]
pub static LB_SOURCES: HashMap<SourceKey, Source> =
    HashMap::with_max_entries(DEFAULT_SOURCE_ENTRIES, 0);
#[map]
pub static LB_PREFIXES: LpmTrie<PrefixKey, PrefixRule> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, Affinity> =
    LruHashMap::with_max_entries(DEFAULT_AFFINITY_ENTRIES, 0);

/// Room for the larger temporaries of one packet: BPF gives a program 512 bytes of stack over
/// its whole call chain. One per CPU, and XDP never runs twice at once on a CPU, so the packet
/// being processed owns it. Each field has one user at a time (noted).
#[repr(C)]
pub struct Scratch {
    /// The new flow's client-side entry (flow::create), then read by forward().
    pub flow: Flow,
    /// The new flow's reply entry (flow::create); the flow entry an ICMP error is about.
    pub reply: Flow,
    /// Reply-entry key (flow::create); the key an ICMP error is looked up by.
    pub key: FlowKey,
    /// bpf_fib_lookup parameters (nexthop::route).
    pub fib: FibParams,
    /// The packet's one clock reading, for the slow path a tail call continues in.
    pub now: u64,
}

/// Slow paths, tail-called: TAIL_NEW_FLOW, TAIL_ICMP.
#[map]
pub static LB_PROGS: ProgramArray = ProgramArray::with_max_entries(2, 0);

#[map]
pub static LB_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch space.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: per-CPU, and no other invocation runs on this CPU while we do.
    LB_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
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

/// Counts a packet for a service that was dropped, both per service and node-wide.
#[inline(always)]
pub fn count_service_drop(service: u32, reason: DropReason) {
    // The compiler knows `reason` is in range and would drop the bounds check; the verifier does
    // not (the value may have come through the stack of another frame). A volatile read keeps
    // the check in.
    let index = unsafe { core::ptr::read_volatile(&(reason as u32)) } as usize;
    if index >= DROP_REASONS {
        return;
    }
    if let Some(s) = LB_SVC_STATS.get_ptr_mut(service) {
        // SAFETY: per-CPU slot, bounds checked above.
        unsafe { (*s).drops[index] += 1 };
    }
}
