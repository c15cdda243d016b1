//! The data path as the agent holds it: the embedded objects, loading them with the configured
//! map sizes and pinned maps (and the tail-call table's pin), and the typed maps (`Maps`, which
//! implements [`Tables`]; `Stats`, the counters). Attaching is `attach`'s. The agent and the
//! kernel tests go through this one loader, so the tests exercise exactly what the agent runs.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, DevMapHash, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray,
        PerCpuValues, ProgramArray, lpm_trie::Key,
    },
    programs::{ProgramError, SchedClassifier, Xdp},
};
use lb_common::{
    ALL_MAPS, Addr, AddrInfo, Affinity, AffinityKey, Backend, BackendStats, CLAIM_HELD, CLAIM_KIND,
    Claim4, Claim6, Config, Counter, DEFAULT_AFFINITY_ENTRIES, DEFAULT_FLOW_ENTRIES,
    DEFAULT_FLOW_ENTRIES_V6, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_RING_SIZE, DEFAULT_MAX_SERVICES,
    DEFAULT_SOURCE_ENTRIES, Flow4, Flow6, FlowKey4, FlowKey6, Iface, LinkMac, MAP_ADDRS,
    MAP_AFFINITY, MAP_BACKENDS, MAP_BE_STATS, MAP_CLAIMS4, MAP_CLAIMS6, MAP_CONFIG, MAP_COUNTERS,
    MAP_DEVMAP, MAP_FILTER, MAP_FLOWS4, MAP_FLOWS6, MAP_IFACES, MAP_LAYOUT_VERSION, MAP_MACS,
    MAP_OVERFLOW, MAP_POLICIES, MAP_PORTS, MAP_PREFIXES, MAP_PROGS, MAP_RINGS, MAP_SERVICES,
    MAP_SOURCE_TAGS, MAP_SOURCES, MAP_SVC_INFO, MAP_SVC_STATS, PROG_BACKEND, PROG_ICMP,
    PROG_NEW_FLOW, PROG_UPLINK, PROG_UPLINK_OUT, PROG_UPLINK_TC, Policy, PrefixKey, PrefixRule,
    SOURCE_FREE, SOURCE_WAYS, Service, ServiceInfo, ServiceKey, ServiceStats, Source, SourceKey,
    SourceTags, TAIL_ICMP, TAIL_NEW_FLOW, source_hash, source_set, source_sets,
};

use crate::{
    error::DataplaneError,
    tables::{FlowEntry, FlowId, Result, Snapshot, Tables},
};

/// [`SOURCE_WAYS`] as a map index.
#[allow(clippy::cast_possible_truncation, reason = "a small constant")]
const WAYS: u32 = SOURCE_WAYS as u32;

/// The data-path object, built by build.rs.
pub static LB_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
/// Helper programs: xdp_pass / xdp_drop / xdp_tx / xdp_count.
pub static TOOLS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-tools"));

/// Capacities of the sizable maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub max_services: u32,
    pub max_backends: u32,
    /// The largest ring a service gets (`--max-ring-size`); each service's ring is sized from
    /// its backends (ring_space::ring_size).
    pub ring_size: u32,
    /// IPv4 flow entries, and IPv6 ones (a table of their own): one per snat flow (its reply
    /// entry is in a claim slot; each family has as many slots as flow entries), two per flow
    /// that keeps the client's address.
    pub flow_entries: u32,
    pub flow_entries_v6: u32,
    pub source_entries: u32,
    pub affinity_entries: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes {
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            ring_size: DEFAULT_MAX_RING_SIZE,
            flow_entries: DEFAULT_FLOW_ENTRIES,
            flow_entries_v6: DEFAULT_FLOW_ENTRIES_V6,
            source_entries: DEFAULT_SOURCE_ENTRIES,
            affinity_entries: DEFAULT_AFFINITY_ENTRIES,
        }
    }
}

impl Sizes {
    /// Slots of LB_RINGS: room for every service's ring, sized from the capacities (see
    /// lb_common::ring_slots), not from the largest ring.
    pub fn ring_slots(&self) -> u32 {
        lb_common::ring_slots(self.max_services, self.max_backends)
    }

    /// Sets of LB_SOURCES (SOURCE_WAYS sources each).
    pub fn source_sets(&self) -> u32 {
        source_sets(self.source_entries)
    }

    /// max_entries of each sizable map.
    pub fn overrides(&self) -> [(&'static str, u32); 13] {
        [
            (MAP_SERVICES, self.max_services),
            (MAP_SVC_STATS, self.max_services),
            (MAP_SVC_INFO, self.max_services),
            (MAP_BACKENDS, self.max_backends),
            (MAP_BE_STATS, self.max_backends),
            (MAP_RINGS, self.ring_slots()),
            (MAP_FLOWS4, self.flow_entries),
            (MAP_FLOWS6, self.flow_entries_v6),
            (MAP_CLAIMS4, self.flow_entries),
            (MAP_CLAIMS6, self.flow_entries_v6),
            (MAP_SOURCES, self.source_sets() * WAYS),
            (MAP_SOURCE_TAGS, self.source_sets()),
            (MAP_AFFINITY, self.affinity_entries),
        ]
    }
}

/// Maps whose contents live only in the kernel: flows, snat port cursors, rate-limit buckets,
/// affinity. Everything else the agent can rebuild from its desired state.
const STATE_MAPS: [&str; 9] = [
    MAP_FLOWS4,
    MAP_FLOWS6,
    MAP_CLAIMS4,
    MAP_CLAIMS6,
    MAP_PORTS,
    MAP_SOURCES,
    MAP_SOURCE_TAGS,
    MAP_OVERFLOW,
    MAP_AFFINITY,
];

/// Where pinned maps and links of this map layout live under a pin directory.
pub fn layout_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{MAP_LAYOUT_VERSION}"))
}

/// A loaded data path.
pub struct Loaded {
    pub ebpf: Ebpf,
    /// The tail-call table (a program array). Keep it: the kernel empties a program array when
    /// its last user-space handle closes (pin it to outlive the agent).
    pub progs: Map,
    /// For the log: pinned maps kept at another size, or recreated.
    pub notes: Vec<String>,
    /// Pinned maps created anew at another size (their contents are gone).
    pub recreated: Vec<&'static str>,
}

impl Loaded {
    /// Pins the tail-call table our entry programs use. The kernel empties a program array when
    /// its last user-space handle closes, so without the pin an agent that is killed (OOM,
    /// SIGKILL, a crash) would leave attached programs whose new flows all fail their tail call
    /// until the next agent takes over.
    pub fn pin_progs(&self, pin_dir: &Path) -> std::result::Result<(), DataplaneError> {
        let dir = prog_pin_dir(pin_dir);
        std::fs::create_dir_all(&dir).map_err(|e| DataplaneError::Pin {
            path: dir.clone(),
            reason: e.to_string(),
        })?;
        let path = dir.join(format!("{MAP_PROGS}-{}", std::process::id()));
        self.progs.pin(&path).map_err(|e| DataplaneError::Pin {
            reason: format!("pinning the tail-call table: {e}"),
            path,
        })
    }
}

/// Where tail-call tables are pinned, one per agent (by pid).
fn prog_pin_dir(pin_dir: &Path) -> PathBuf {
    layout_dir(pin_dir).join("progs")
}

/// Removes the tail-call tables previous agents pinned (for their programs' tail calls while
/// they were still attached): call once ours are attached.
pub fn remove_stale_prog_pins(pin_dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(prog_pin_dir(pin_dir)) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Loads the data path with `sizes`. With `pin_dir`, maps already pinned there are reused (their
/// contents, flows included, survive) and new ones are pinned there.
pub fn load(sizes: &Sizes, pin_dir: Option<&Path>) -> std::result::Result<Loaded, DataplaneError> {
    let mut loader = EbpfLoader::new();
    // Log levels nobody reads are compiled out at verification (absent from older objects).
    let log_level = crate::datapath_log::level();
    loader.override_global(aya_log::LEVEL, &log_level, false);
    for (name, entries) in sizes.overrides() {
        loader.map_max_entries(name, entries);
    }
    let mut notes = Vec::new();
    let mut recreated = Vec::new();
    let mut pins: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(dir) = pin_dir {
        let dir = layout_dir(dir);
        std::fs::create_dir_all(&dir).map_err(|e| DataplaneError::Pin {
            path: dir.clone(),
            reason: format!("cannot create the pin directory: {e} (is bpffs mounted there?)"),
        })?;
        let expected = expected_maps(sizes)?;
        for name in ALL_MAPS {
            let path = dir.join(name);
            if path.exists()
                && let Some((note, gone)) = check_pinned(name, &path, &expected)?
            {
                notes.push(note);
                if gone {
                    recreated.push(name);
                }
            }
            pins.push((name, path));
        }
    }
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(LB_OBJECT).map_err(DataplaneError::Load)?;
    for name in [PROG_UPLINK, PROG_NEW_FLOW, PROG_ICMP] {
        let prog = program_mut(&mut ebpf, name)?;
        load_program(name, || prog.load())?;
    }
    for name in [PROG_BACKEND, PROG_UPLINK_TC, PROG_UPLINK_OUT] {
        let tc = classifier_mut(&mut ebpf, name)?;
        load_program(name, || tc.load())?;
    }
    // The slow paths the entry programs tail-call.
    let mut map = ebpf
        .take_map(MAP_PROGS)
        .ok_or_else(|| map_err(MAP_PROGS, "not in the object"))?;
    let mut progs: ProgramArray<&mut MapData> = (&mut map)
        .try_into()
        .map_err(|e: MapError| map_err(MAP_PROGS, e))?;
    for (slot, name) in [(TAIL_NEW_FLOW, PROG_NEW_FLOW), (TAIL_ICMP, PROG_ICMP)] {
        let fd = program_mut(&mut ebpf, name)?
            .fd()
            .map_err(|e| DataplaneError::program(name, e))?
            .try_clone()
            .map_err(|e| map_err(MAP_PROGS, e))?;
        progs.set(slot, &fd, 0).map_err(|e| map_err(MAP_PROGS, e))?;
    }
    Ok(Loaded {
        ebpf,
        progs: map,
        notes,
        recreated,
    })
}

/// Loads (verifies) one program. The verifier gives up with EAGAIN when a signal arrives while
/// it works (ours take a second or so); libbpf retries then, and so do we.
pub fn load_program(
    name: &str,
    mut load: impl FnMut() -> std::result::Result<(), ProgramError>,
) -> std::result::Result<(), DataplaneError> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        // The verifier gives up with EAGAIN when a signal is pending for the loading thread
        // (in tests, SIGCHLD from other threads' child processes arrives often enough to fail
        // every retry of a large program): hold signals off this thread while it verifies.
        let result = without_signals(&mut load);
        match result {
            Ok(()) => return Ok(()),
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            Err(e) => return Err(DataplaneError::program(name, e)),
        }
    }
}

/// Runs `f` with every signal blocked for the calling thread (delivered after, or to another
/// thread meanwhile).
fn without_signals<T>(f: &mut impl FnMut() -> T) -> T {
    use nix::sys::signal::{SigSet, SigmaskHow};
    // Blocking signals on our own thread cannot fail with valid arguments; if it did, loading
    // goes ahead unprotected (and retries on EAGAIN as before).
    let old = SigSet::all().thread_swap_mask(SigmaskHow::SIG_BLOCK).ok();
    let result = f();
    if let Some(old) = old {
        let _ = old.thread_set_mask();
    }
    result
}

/// Loads the helper programs object (each program loaded, none attached): the lab's and the
/// benchmarks' (see lb-ebpf/src/tools.rs).
pub fn load_tools() -> std::result::Result<Ebpf, DataplaneError> {
    let mut ebpf = EbpfLoader::new()
        .load(TOOLS_OBJECT)
        .map_err(DataplaneError::Load)?;
    for name in [
        "xdp_pass",
        "xdp_drop",
        "xdp_tx",
        "xdp_count",
        "xdp_sink",
        "bench_wrap",
        "bench_gen",
        "bench_fib",
        "bench_lookup",
        "bench_insert",
    ] {
        let prog = program_mut(&mut ebpf, name)?;
        load_program(name, || prog.load())?;
    }
    let prog = classifier_mut(&mut ebpf, "tc_deny")?;
    load_program("tc_deny", || prog.load())?;
    Ok(ebpf)
}

pub fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> std::result::Result<&'a mut Xdp, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or_else(|| DataplaneError::MissingProgram(name.to_string()))?
        .try_into()
        .map_err(|e: ProgramError| DataplaneError::program(name, e))
}

pub fn classifier_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> std::result::Result<&'a mut SchedClassifier, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or_else(|| DataplaneError::MissingProgram(name.to_string()))?
        .try_into()
        .map_err(|e: ProgramError| DataplaneError::program(name, e))
}

/// (map type, key size, value size, max entries) of each map, as this build creates them.
type MapSpec = (u32, u32, u32, u32);

fn expected_maps(sizes: &Sizes) -> std::result::Result<BTreeMap<String, MapSpec>, DataplaneError> {
    let obj = aya_obj::Object::parse(LB_OBJECT).map_err(|e| {
        DataplaneError::map("(object)", format!("cannot parse the embedded object: {e}"))
    })?;
    let overrides: BTreeMap<&str, u32> = sizes.overrides().into_iter().collect();
    Ok(obj
        .maps
        .iter()
        .map(|(name, m)| {
            let entries = overrides
                .get(name.as_str())
                .copied()
                .unwrap_or(m.max_entries());
            (
                name.clone(),
                (m.map_type(), m.key_size(), m.value_size(), entries),
            )
        })
        .collect())
}

/// Checks a pinned map against this build. A different layout is an error (the pin directory
/// is per layout version, so this means someone else's map); a different size is handled: maps
/// the agent rebuilds are recreated, state maps are kept at their size (a note says so, and
/// whether the map was recreated).
fn check_pinned(
    name: &str,
    path: &Path,
    expected: &BTreeMap<String, MapSpec>,
) -> std::result::Result<Option<(String, bool)>, DataplaneError> {
    let Some(&(kind, key, value, entries)) = expected.get(name) else {
        return Ok(None);
    };
    let info = aya::maps::MapInfo::from_pin(path).map_err(|e| DataplaneError::Pin {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let pinned_kind = info.map_type().map_or(u32::MAX, |t| t as u32);
    if (pinned_kind, info.key_size(), info.value_size()) != (kind, key, value) {
        return Err(DataplaneError::Pin {
            path: path.to_path_buf(),
            reason: format!(
                "pinned map is type {pinned_kind} with key/value size {}/{}, this build expects type {kind} with {key}/{value}; remove it (or the pin directory) to start fresh",
                info.key_size(),
                info.value_size()
            ),
        });
    }
    if info.max_entries() == entries {
        return Ok(None);
    }
    if STATE_MAPS.contains(&name) {
        return Ok(Some((
            format!(
                "{name}: keeping the pinned map with {} entries (asked for {entries}) so live state survives; remove {} to resize",
                info.max_entries(),
                path.display()
            ),
            false,
        )));
    }
    std::fs::remove_file(path).map_err(|e| DataplaneError::Pin {
        path: path.to_path_buf(),
        reason: format!("cannot remove to resize: {e}"),
    })?;
    Ok(Some((
        format!(
            "{name}: resized from {} to {entries} entries (recreated; the agent rewrites its contents)",
            info.max_entries()
        ),
        true,
    )))
}

/// Every map, typed.
pub struct Maps {
    pub config: Array<MapData, Config>,
    pub filter: Array<MapData, u64>,
    pub addrs: HashMap<MapData, Addr, AddrInfo>,
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub backends: Array<MapData, Backend>,
    pub rings: Array<MapData, u32>,
    pub flows4: HashMap<MapData, FlowKey4, Flow4>,
    pub flows6: HashMap<MapData, FlowKey6, Flow6>,
    pub claims4: Array<MapData, Claim4>,
    pub claims6: Array<MapData, Claim6>,
    pub devmap: DevMapHash<MapData>,
    pub ifaces: HashMap<MapData, u32, Iface>,
    /// The counters (also opened on their own for the metrics server: [`Stats::reopen`]).
    pub stats: Stats,
    pub policies: Array<MapData, Policy>,
    pub sources: Array<MapData, Source>,
    pub source_tags: Array<MapData, SourceTags>,
    pub overflow: Array<MapData, Source>,
    pub prefixes: LpmTrie<MapData, PrefixKey, PrefixRule>,
    pub affinity: HashMap<MapData, AffinityKey, Affinity>,
    pub svc_info: Array<MapData, ServiceInfo>,
    pub macs: Array<MapData, LinkMac>,
}

/// The per-CPU counters: node-wide, per service and per backend.
pub struct Stats {
    counters: PerCpuArray<MapData, u64>,
    services: PerCpuArray<MapData, ServiceStats>,
    backends: PerCpuArray<MapData, BackendStats>,
    cpus: usize,
}

/// A map of our own on the same kernel map (a new descriptor).
/// Writes `values` into array map `fd` from index `first` on, with BPF_MAP_UPDATE_BATCH: one
/// system call per batch the kernel takes, where writing a ring slot by slot cost one per slot
/// (16381 for a ring at the default size, about 50 ms).
fn update_batch(fd: BorrowedFd<'_>, first: u32, values: &[u32]) -> std::io::Result<()> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    let keys: Vec<u32> = (first..).take(values.len()).collect();
    let mut done = 0;
    while done < values.len() {
        let count = u32::try_from(values.len() - done).unwrap_or(u32::MAX);
        // union bpf_attr's batch: in_batch, out_batch, keys, values (u64 each), count, map_fd
        // (u32 each), elem_flags, flags (u64 each).
        let mut attr = [0u64; 7];
        attr[2] = keys[done..].as_ptr() as u64;
        attr[3] = values[done..].as_ptr() as u64;
        attr[4] = u64::from(count) | (u64::from(fd.as_raw_fd().cast_unsigned()) << 32);
        // SAFETY: a bpf_attr of the size passed; keys and values hold `count` u32s each and
        // outlive the call, which reads them only.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        // The kernel says in `count` how many it wrote, also when it stopped early.
        let written = usize::try_from(attr[4] & u64::from(u32::MAX)).unwrap_or(0);
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) || written == 0 {
                return Err(e);
            }
        }
        if written == 0 {
            return Err(std::io::Error::other("the kernel wrote no element"));
        }
        done += written;
    }
    Ok(())
}

/// Entries per BPF_MAP_LOOKUP_BATCH call: more than any hash bucket holds (the kernel needs a
/// whole bucket in one call).
const BATCH_CHUNK: usize = 4096;

/// Walks map `fd` with BPF_MAP_LOOKUP_BATCH, `keys.len()` entries per system call: each call
/// fills `keys` and, `value_bytes` per entry, `values`, and `f` takes the entries it read (the
/// keys, and the values' elements that hold them). Entries added or removed meanwhile may be seen or not. Returns how many
/// entries `f` was given; on an error, also how many it had been given before.
fn lookup_batches<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    keys: &mut [K],
    values: &mut [V],
    value_bytes: usize,
    f: &mut dyn FnMut(&[K], &[V]),
) -> std::result::Result<usize, (std::io::Error, usize)> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let chunk = keys.len();
    assert!(std::mem::size_of_val(values) >= chunk * value_bytes);
    // Where the next call starts: a bucket index for hash maps, an index for arrays (room for
    // any key, as arrays of keys use).
    let (mut from, mut next) = ([0u64; 8], [0u64; 8]);
    let mut seen = 0;
    for call in 0usize.. {
        let mut attr = [0u64; 7];
        attr[0] = if call == 0 { 0 } else { from.as_ptr() as u64 };
        attr[1] = next.as_mut_ptr() as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        attr[4] = chunk as u64 | (u64::from(fd.as_raw_fd().cast_unsigned()) << 32);
        // SAFETY: a bpf_attr of the size passed (see update_batch); keys and values have room
        // for `chunk` entries (asserted above), the batch tokens for any key size, and all
        // outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        let got = usize::try_from(attr[4] & u64::from(u32::MAX))
            .unwrap_or(0)
            .min(chunk);
        let held = (got * value_bytes).div_ceil(std::mem::size_of::<V>().max(1));
        // ENOENT: the last entries (`got` of them, maybe none) and the end.
        match (rc != 0).then(std::io::Error::last_os_error) {
            // Nothing read without the end: stop rather than ask again from the same place.
            None if got == 0 => return Ok(seen),
            None => {
                f(&keys[..got], &values[..held]);
                seen += got;
                from = next;
            }
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                f(&keys[..got], &values[..held]);
                return Ok(seen + got);
            }
            Some(e) => return Err((e, seen)),
        }
    }
    Ok(seen)
}

/// Calls `f` for every entry of hash map `fd`, read in batches: one system call per few
/// thousand entries, where aya's iterator makes two per entry (sweeps and drain ends walk the
/// flow tables on the loop that applies changes). Returns how many entries `f` saw; an error
/// only if the kernel failed before any.
fn lookup_batch<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    f: &mut dyn FnMut(&K, &V),
) -> std::io::Result<usize> {
    // SAFETY: Pod types are valid for any bytes, zeros included.
    let (mut keys, mut values): (Vec<K>, Vec<V>) = unsafe {
        (
            vec![std::mem::zeroed(); BATCH_CHUNK],
            vec![std::mem::zeroed(); BATCH_CHUNK],
        )
    };
    let each = &mut |keys: &[K], values: &[V]| {
        for (k, v) in keys.iter().zip(values) {
            f(k, v);
        }
    };
    match lookup_batches(fd, &mut keys, &mut values, std::mem::size_of::<V>(), each) {
        Ok(seen) => Ok(seen),
        Err((e, 0)) => Err(e),
        Err((e, seen)) => {
            log::debug!("reading a map in batches stopped after {seen} entries: {e}");
            Ok(seen)
        }
    }
}

/// Every entry of per-CPU array `fd`, each summed over its `cpus` values with `add`, read in
/// batches: a scrape reads the counters of every backend and service, and one system call per
/// entry (200,000 backends) took most of a second.
fn per_cpu_sums<T: aya::Pod + Default>(
    fd: BorrowedFd<'_>,
    cpus: usize,
    add: fn(&mut T, &T),
) -> std::io::Result<Vec<T>> {
    // The kernel copies each CPU's value rounded up to 8 bytes, all of an entry's CPUs together.
    let per_cpu = std::mem::size_of::<T>().next_multiple_of(8);
    let stride = per_cpu * cpus;
    let mut keys = vec![0u32; BATCH_CHUNK];
    // u64s: aligned for any counter struct.
    let mut values = vec![0u64; BATCH_CHUNK * stride / 8];
    let mut out: Vec<T> = Vec::new();
    let each = &mut |keys: &[u32], values: &[u64]| {
        let bytes = values.as_ptr().cast::<u8>();
        for (i, key) in keys.iter().enumerate() {
            let mut total = T::default();
            for cpu in 0..cpus {
                // SAFETY: within `values` (it holds `stride` bytes for each of `keys`, CPU <
                // cpus); any bytes are a valid Pod.
                let v = unsafe {
                    std::ptr::read_unaligned(bytes.add(i * stride + cpu * per_cpu).cast::<T>())
                };
                add(&mut total, &v);
            }
            let key = *key as usize;
            if out.len() <= key {
                out.resize(key + 1, T::default());
            }
            out[key] = total;
        }
    };
    lookup_batches(fd, &mut keys, &mut values, stride, each).map_err(|(e, _)| e)?;
    Ok(out)
}

fn reopen<K: aya::Pod, V, M: IterableMap<K, V>, T>(name: &str, map: &M) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let fd = map
        .map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| map_err(name, e))?;
    let data = MapData::from_fd(fd).map_err(|e| map_err(name, e))?;
    Map::from_map_data(data)
        .and_then(T::try_from)
        .map_err(|e| map_err(name, e))
}

/// The services map's entries, and the backends in use by id.
pub type ServicesAndBackends = (Vec<(ServiceKey, Service)>, Vec<(u32, Backend)>);

impl Stats {
    /// The same counters through descriptors of their own, for a reader on another thread.
    pub fn reopen(&self) -> Result<Stats> {
        Ok(Stats {
            counters: reopen(MAP_COUNTERS, &self.counters)?,
            services: reopen(MAP_SVC_STATS, &self.services)?,
            backends: reopen(MAP_BE_STATS, &self.backends)?,
            cpus: self.cpus,
        })
    }

    /// Node-wide counters, summed over CPUs.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL
            .iter()
            .map(|c| {
                let v = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map_or(0, |per_cpu| per_cpu.iter().sum());
                (*c, v)
            })
            .collect()
    }

    pub fn service(&self, id: u32) -> ServiceStats {
        let mut total = ServiceStats::default();
        if let Ok(per_cpu) = self.services.get(&id, 0) {
            for s in per_cpu.iter() {
                total.accumulate(s);
            }
        }
        total
    }

    pub fn backend(&self, id: u32) -> BackendStats {
        let mut total = BackendStats::default();
        if let Ok(per_cpu) = self.backends.get(&id, 0) {
            for s in per_cpu.iter() {
                total.accumulate(s);
            }
        }
        total
    }

    /// Every service's counters by id (LB_SVC_STATS index), summed over CPUs, in a few system
    /// calls; an error where the kernel has no batch lookup for arrays (before 5.6).
    pub fn all_services(&self) -> std::io::Result<Vec<ServiceStats>> {
        let fd = IterableMap::map(&self.services).fd().as_fd();
        per_cpu_sums(fd, self.cpus, ServiceStats::accumulate)
    }

    /// Every backend's counters by id (LB_BE_STATS index), as [`Stats::all_services`].
    pub fn all_backends(&self) -> std::io::Result<Vec<BackendStats>> {
        let fd = IterableMap::map(&self.backends).fd().as_fd();
        per_cpu_sums(fd, self.cpus, BackendStats::accumulate)
    }

    fn zeros<T: aya::Pod + Default + Clone>(&self) -> PerCpuValues<T> {
        // A Vec of the CPU count always converts.
        PerCpuValues::try_from(vec![T::default(); self.cpus]).expect("one value per CPU")
    }
}

fn map_err(name: &str, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::map(name, e)
}

impl Maps {
    /// Takes the maps out of a loaded object (the programs keep their references).
    pub fn take(ebpf: &mut Ebpf) -> Result<Maps> {
        Maps::build(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| map_err(name, "not in the object"))
        })
    }

    /// Opens the maps a running agent pinned under `pin_dir` (for status and flow queries).
    pub fn open_pinned(pin_dir: &Path) -> Result<Maps> {
        let dir = layout_dir(pin_dir);
        Maps::build(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|e| DataplaneError::Pin {
                reason: format!("{e} (is lb-agent running with this --pin-dir?)"),
                path,
            })?;
            Map::from_map_data(data).map_err(|e| map_err(name, e))
        })
    }

    fn build(mut get: impl FnMut(&str) -> Result<Map>) -> Result<Maps> {
        macro_rules! typed {
            ($name:expr) => {
                get($name)?
                    .try_into()
                    .map_err(|e: MapError| map_err($name, e))?
            };
        }
        Ok(Maps {
            config: typed!(MAP_CONFIG),
            filter: typed!(MAP_FILTER),
            addrs: typed!(MAP_ADDRS),
            services: typed!(MAP_SERVICES),
            backends: typed!(MAP_BACKENDS),
            rings: typed!(MAP_RINGS),
            flows4: typed!(MAP_FLOWS4),
            flows6: typed!(MAP_FLOWS6),
            claims4: typed!(MAP_CLAIMS4),
            claims6: typed!(MAP_CLAIMS6),
            devmap: typed!(MAP_DEVMAP),
            ifaces: typed!(MAP_IFACES),
            stats: Stats {
                counters: typed!(MAP_COUNTERS),
                services: typed!(MAP_SVC_STATS),
                backends: typed!(MAP_BE_STATS),
                cpus: aya::util::nr_cpus()
                    .map_err(|(what, e)| map_err("(cpus)", format!("{what}: {e}")))?,
            },
            policies: typed!(MAP_POLICIES),
            sources: typed!(MAP_SOURCES),
            source_tags: typed!(MAP_SOURCE_TAGS),
            overflow: typed!(MAP_OVERFLOW),
            prefixes: typed!(MAP_PREFIXES),
            affinity: typed!(MAP_AFFINITY),
            svc_info: typed!(MAP_SVC_INFO),
            macs: typed!(MAP_MACS),
        })
    }

    pub fn cpus(&self) -> usize {
        self.stats.cpus
    }

    /// The node config as the data path sees it (`None` before the agent wrote one).
    pub fn read_config(&self) -> Option<Config> {
        self.config.get(&0, 0).ok().filter(|c| c.source_sets != 0)
    }

    /// The snat reply entry of `key` (backend -> snat address and port), if its claim slot
    /// holds one, live or expired (see lb_common::Claim).
    pub fn claimed4(&self, key: &FlowKey4) -> Option<Flow4> {
        let slots = self.read_config()?.claims_v4;
        let c = self
            .claims4
            .get(&lb_common::claim_slot(key, slots), 0)
            .ok()?;
        c.holds(key).then_some(c.flow)
    }

    pub fn claimed6(&self, key: &FlowKey6) -> Option<Flow6> {
        let slots = self.read_config()?.claims_v6;
        let c = self
            .claims6
            .get(&lb_common::claim_slot(key, slots), 0)
            .ok()?;
        c.holds(key).then_some(c.flow)
    }

    /// Writes a snat reply entry into its claim slot unless the slot holds one already (live or
    /// not; benchmarks and tests: the data path claims slots itself). False: it did. Not atomic
    /// with the data path.
    pub fn set_claim4(&mut self, key: &FlowKey4, flow: &Flow4) -> Result<bool> {
        let slots = self.read_config().map_or(0, |c| c.claims_v4);
        let slot = lb_common::claim_slot(key, slots);
        let state = self.claims4.get(&slot, 0).map_or(0, |c| c.state);
        if state & CLAIM_KIND != lb_common::CLAIM_FREE {
            return Ok(false);
        }
        let claim = Claim4 {
            state: state.wrapping_add(lb_common::CLAIM_COUNT) | CLAIM_HELD,
            key: *key,
            flow: *flow,
        };
        self.claims4
            .set(slot, claim, 0)
            .map_err(|e| map_err(MAP_CLAIMS4, e))?;
        Ok(true)
    }

    /// Frees the claim slot of `key` if it holds it (benchmarks and tests). Not atomic with the
    /// data path: only for a flow nothing is sending on.
    pub fn forget_claim4(&mut self, key: &FlowKey4) -> Result<()> {
        let slots = self.read_config().map_or(0, |c| c.claims_v4);
        let slot = lb_common::claim_slot(key, slots);
        match self.claims4.get(&slot, 0) {
            Ok(c) if c.holds(key) => {
                let free = Claim4 {
                    state: c.state & !CLAIM_KIND,
                    ..c
                };
                self.claims4
                    .set(slot, free, 0)
                    .map_err(|e| map_err(MAP_CLAIMS4, e))
            }
            _ => Ok(()),
        }
    }

    /// Claim slots that hold a snat reply entry, live or expired, of both families.
    pub fn held_claims(&self) -> usize {
        let mut held = 0;
        let mut count = |state: u32| held += usize::from(state & CLAIM_KIND == CLAIM_HELD);
        let fd = IterableMap::map(&self.claims4).fd().as_fd();
        let _ = lookup_batch(fd, &mut |_: &u32, c: &Claim4| count(c.state));
        let fd = IterableMap::map(&self.claims6).fd().as_fd();
        let _ = lookup_batch(fd, &mut |_: &u32, c: &Claim6| count(c.state));
        held
    }

    /// Frees a tracked source's slot (benchmarks and tests; the data path reclaims slots on its
    /// own). Not atomic with the data path: only for a source nothing is sending from. The
    /// slot's key goes too: flows find their source by it (Flow::source_way).
    pub fn forget_source(&mut self, key: &SourceKey) -> Result<()> {
        let sets = self.source_tags.len().max(1);
        let set = source_set(source_hash(key), sets);
        let mut tags = self
            .source_tags
            .get(&set, 0)
            .map_err(|e| map_err(MAP_SOURCE_TAGS, e))?;
        for (way, tag) in (0u32..).zip(tags.tags.iter_mut()) {
            let slot = set * WAYS + way;
            if *tag >= 2 && self.sources.get(&slot, 0).is_ok_and(|s| s.key == *key) {
                *tag = SOURCE_FREE;
                self.sources
                    .set(slot, Source::default(), 0)
                    .map_err(|e| map_err(MAP_SOURCES, e))?;
            }
        }
        self.source_tags
            .set(set, tags, 0)
            .map_err(|e| map_err(MAP_SOURCE_TAGS, e))
    }

    /// Every tracked rate-limit source.
    pub fn read_sources(&self) -> Vec<Source> {
        // The tags in batches (each sweep reads them all: one system call per set was most of
        // an idle agent's work), then the slots in use one by one.
        let mut used = Vec::new();
        let mut take = |set: u32, tags: &SourceTags| {
            for (way, tag) in (0u32..).zip(tags.tags.iter()) {
                if *tag >= 2 {
                    used.push(set * WAYS + way);
                }
            }
        };
        let fd = IterableMap::map(&self.source_tags).fd().as_fd();
        if lookup_batch(fd, &mut |set: &u32, tags: &SourceTags| take(*set, tags)).is_err() {
            for (set, tags) in (0u32..).zip(self.source_tags.iter()) {
                if let Ok(tags) = tags {
                    take(set, &tags);
                }
            }
        }
        used.into_iter()
            .filter_map(|slot| self.sources.get(&slot, 0).ok())
            .collect()
    }

    /// Node-wide counters, summed over CPUs.
    pub fn read_counters(&self) -> Vec<(Counter, u64)> {
        self.stats.counters()
    }

    /// The services and the backends in use (by id), for `status`: in batches of thousands
    /// (aya's iterators make a system call or two per entry: a second at 250,000 backend ids),
    /// one by one where the kernel has no batch lookup.
    pub fn read_services_and_backends(&self) -> Result<ServicesAndBackends> {
        let mut services = Vec::new();
        let fd = IterableMap::map(&self.services).fd().as_fd();
        if lookup_batch(fd, &mut |k: &ServiceKey, v: &Service| {
            services.push((*k, *v));
        })
        .is_err()
        {
            services = self
                .services
                .iter()
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| map_err(MAP_SERVICES, e))?;
        }
        // Sized once: at 250,000 backends, growing by doubling copied the entries over and over.
        let mut backends = Vec::with_capacity(self.backends.len() as usize);
        let fd = IterableMap::map(&self.backends).fd().as_fd();
        let batch = lookup_batch(fd, &mut |id: &u32, b: &Backend| {
            if *b != Backend::default() {
                backends.push((*id, *b));
            }
        });
        if batch.is_err() {
            backends.clear();
            for (id, b) in (0u32..).zip(self.backends.iter()) {
                let b = b.map_err(|e| map_err(MAP_BACKENDS, e))?;
                if b != Backend::default() {
                    backends.push((id, b));
                }
            }
        }
        Ok((services, backends))
    }

    pub fn read_service_stats(&self, id: u32) -> ServiceStats {
        self.stats.service(id)
    }

    pub fn read_backend_stats(&self, id: u32) -> BackendStats {
        self.stats.backend(id)
    }
}

impl Tables for Maps {
    fn set_config(&mut self, config: &Config) -> Result<()> {
        self.config
            .set(0, config, 0)
            .map_err(|e| map_err(MAP_CONFIG, e))
    }
    fn set_filter_word(&mut self, index: u32, word: u64) -> Result<()> {
        self.filter
            .set(index, word, 0)
            .map_err(|e| map_err(MAP_FILTER, e))
    }
    fn set_addr(&mut self, addr: &Addr, info: &AddrInfo) -> Result<()> {
        self.addrs
            .insert(addr, info, 0)
            .map_err(|e| map_err(MAP_ADDRS, e))
    }
    fn remove_addr(&mut self, addr: &Addr) -> Result<()> {
        ignore_missing(self.addrs.remove(addr)).map_err(|e| map_err(MAP_ADDRS, e))
    }
    fn set_service(&mut self, key: &ServiceKey, service: &Service) -> Result<()> {
        self.services
            .insert(key, service, 0)
            .map_err(|e| map_err(MAP_SERVICES, e))
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        ignore_missing(self.services.remove(key)).map_err(|e| map_err(MAP_SERVICES, e))
    }
    fn set_service_info(&mut self, id: u32, info: &ServiceInfo) -> Result<()> {
        self.svc_info
            .set(id, info, 0)
            .map_err(|e| map_err(MAP_SVC_INFO, e))
    }
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends
            .set(id, backend, 0)
            .map_err(|e| map_err(MAP_BACKENDS, e))
    }
    fn write_ring(&mut self, base: u32, slots: &[u32]) -> Result<()> {
        let fd = IterableMap::map(&self.rings).fd().as_fd();
        update_batch(fd, base, slots).map_err(|e| {
            map_err(
                MAP_RINGS,
                format!("writing {} ring slots from {base}: {e}", slots.len()),
            )
        })
    }
    fn clear_service_stats(&mut self, id: u32) -> Result<()> {
        let zeros = self.stats.zeros();
        self.stats
            .services
            .set(id, zeros, 0)
            .map_err(|e| map_err(MAP_SVC_STATS, e))
    }
    fn clear_backend_stats(&mut self, id: u32) -> Result<()> {
        let zeros = self.stats.zeros();
        self.stats
            .backends
            .set(id, zeros, 0)
            .map_err(|e| map_err(MAP_BE_STATS, e))
    }
    fn set_policy(&mut self, id: u32, policy: &Policy) -> Result<()> {
        self.policies
            .set(id, policy, 0)
            .map_err(|e| map_err(MAP_POLICIES, e))
    }
    fn set_prefix(&mut self, key: &PrefixKey, len: u32, rule: &PrefixRule) -> Result<()> {
        self.prefixes
            .insert(&Key::new(len, *key), rule, 0)
            .map_err(|e| map_err(MAP_PREFIXES, e))
    }
    fn remove_prefix(&mut self, key: &PrefixKey, len: u32) -> Result<()> {
        ignore_missing(self.prefixes.remove(&Key::new(len, *key)))
            .map_err(|e| map_err(MAP_PREFIXES, e))
    }
    fn set_overflow(&mut self, policy: u32, source: &Source) -> Result<()> {
        self.overflow
            .set(policy, source, 0)
            .map_err(|e| map_err(MAP_OVERFLOW, e))
    }
    fn set_link_mac(&mut self, slot: u32, mac: &LinkMac) -> Result<()> {
        self.macs
            .set(slot, mac, 0)
            .map_err(|e| map_err(MAP_MACS, e))
    }
    fn snapshot(&self) -> Result<Snapshot> {
        let services = self
            .services
            .iter()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| map_err(MAP_SERVICES, e))?;
        let mut backends = Vec::new();
        for (id, b) in (0u32..).zip(self.backends.iter()) {
            let b = b.map_err(|e| map_err(MAP_BACKENDS, e))?;
            if b != Backend::default() {
                backends.push((id, b));
            }
        }
        let addrs = self
            .addrs
            .iter()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| map_err(MAP_ADDRS, e))?;
        let filter = self
            .filter
            .iter()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| map_err(MAP_FILTER, e))?;
        let mut policies = Vec::new();
        for (id, p) in (0u32..).zip(self.policies.iter()) {
            let p = p.map_err(|e| map_err(MAP_POLICIES, e))?;
            if p != Policy::default() {
                policies.push((id, p));
            }
        }
        let mut service_info = Vec::new();
        for (id, s) in (0u32..).zip(self.svc_info.iter()) {
            let s = s.map_err(|e| map_err(MAP_SVC_INFO, e))?;
            if s != ServiceInfo::default() {
                service_info.push((id, s));
            }
        }
        let mut prefixes = Vec::new();
        for kv in &self.prefixes {
            let (k, rule) = kv.map_err(|e| map_err(MAP_PREFIXES, e))?;
            prefixes.push((k.data(), k.prefix_len(), rule));
        }
        Ok(Snapshot {
            config: self.read_config(),
            services,
            backends,
            addrs,
            filter,
            policies,
            prefixes,
            service_info,
            rings_lost: false,
        })
    }

    fn redirects(&self) -> Result<BTreeSet<u32>> {
        self.devmap
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| map_err(MAP_DEVMAP, e))
    }
    fn set_redirect(&mut self, ifindex: u32) -> Result<()> {
        self.devmap
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| map_err(MAP_DEVMAP, e))
    }
    fn remove_redirect(&mut self, ifindex: u32) -> Result<()> {
        ignore_missing(self.devmap.remove(ifindex)).map_err(|e| map_err(MAP_DEVMAP, e))
    }
    fn ifaces(&self) -> Result<BTreeMap<u32, Iface>> {
        self.ifaces
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| map_err(MAP_IFACES, e))
    }
    fn set_iface(&mut self, ifindex: u32, iface: &Iface) -> Result<()> {
        self.ifaces
            .insert(ifindex, iface, 0)
            .map_err(|e| map_err(MAP_IFACES, e))
    }
    fn remove_iface(&mut self, ifindex: u32) -> Result<()> {
        ignore_missing(self.ifaces.remove(&ifindex)).map_err(|e| map_err(MAP_IFACES, e))
    }
    fn config(&self) -> Option<Config> {
        self.read_config()
    }
    fn service(&self, key: &ServiceKey) -> Option<Service> {
        self.services.get(key, 0).ok()
    }
    fn backend(&self, id: u32) -> Option<Backend> {
        self.backends.get(&id, 0).ok()
    }
    fn for_each_flow(&self, f: &mut dyn FnMut(&FlowEntry)) {
        // In batches; where the kernel has no batch reads for these maps, one by one. With the
        // iterator, an entry deleted while we walk ends the walk early at worst (the next sweep
        // continues); entries that fail to read are skipped.
        let fd = IterableMap::map(&self.flows4).fd().as_fd();
        if lookup_batch(fd, &mut |k, v| f(&FlowEntry::V4(*k, *v))).is_err() {
            for (k, v) in self.flows4.iter().filter_map(std::result::Result::ok) {
                f(&FlowEntry::V4(k, v));
            }
        }
        let fd = IterableMap::map(&self.flows6).fd().as_fd();
        if lookup_batch(fd, &mut |k, v| f(&FlowEntry::V6(*k, *v))).is_err() {
            for (k, v) in self.flows6.iter().filter_map(std::result::Result::ok) {
                f(&FlowEntry::V6(k, v));
            }
        }
    }
    fn set_flow(&mut self, entry: &FlowEntry) -> Result<()> {
        match entry {
            FlowEntry::V4(k, v) => self.flows4.insert(k, v, 0),
            FlowEntry::V6(k, v) => self.flows6.insert(k, v, 0),
        }
        .map_err(|e| map_err(MAP_FLOWS4, e))
    }
    fn remove_flow(&mut self, id: &FlowId) -> Result<bool> {
        let removed = match id {
            FlowId::V4(k) => self.flows4.remove(k),
            FlowId::V6(k) => self.flows6.remove(k),
        };
        match removed {
            Ok(()) => Ok(true),
            Err(e) => ignore_missing(Err(e))
                .map(|()| false)
                .map_err(|e| map_err(MAP_FLOWS4, e)),
        }
    }
    fn for_each_source(&self, f: &mut dyn FnMut(&Source)) {
        for s in self.read_sources() {
            f(&s);
        }
    }
    fn policies(&self) -> Vec<Policy> {
        self.policies
            .iter()
            .map(std::result::Result::unwrap_or_default)
            .collect()
    }
}

/// Removing what is already gone is fine.
fn ignore_missing(r: std::result::Result<(), MapError>) -> std::result::Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
