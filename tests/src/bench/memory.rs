//! Memory: what the kernel charges for the data path's maps, per flow-table entry and per
//! tracked source, at default sizes; and the agent's resident set.
//!
//! Method. Map memory is the kernel's own accounting: `memlock:` in /proc/self/fdinfo of each
//! map fd (the map's `map_mem_usage`: hash maps are preallocated, so it is charged at creation
//! whether entries are used or not). The cost of one entry is the slope between two sizes
//! (2^16 and 2^20 entries, powers of two like the kernel's bucket array), which removes the
//! fixed part; the VmallocUsed delta (/proc/meminfo) around creating a 2^22-entry flow table
//! cross-checks it (large maps live in vmalloc space; other processes rarely move it). Maps are created by
//! loading the data-path object without verifying its programs. The agent's RSS is VmRSS of a
//! real `lb-agent run` with default sizes on a veth in a namespace of its own, serving one
//! service with 10 backends.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::{Ebpf, EbpfLoader};
use lb_common::{
    MAP_CLAIMS4, MAP_CLAIMS6, MAP_FLOWS4, MAP_FLOWS6, MAP_SOURCE_TAGS, MAP_SOURCES, SOURCE_WAYS,
};
use lb_userspace::dataplane::{LB_OBJECT, Sizes};

use super::Scale;
use crate::{
    agent::{Bpffs, Cleanup, agent_binary},
    netns::{ChildGuard, Netns},
};

/// One map as fdinfo shows it.
#[derive(Clone, Debug)]
pub struct MapMem {
    pub name: String,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub memlock: u64,
}

/// Bytes per entry of one map type, derived from two sizes.
#[derive(Clone, Debug)]
pub struct PerEntry {
    pub map: &'static str,
    pub kind: &'static str,
    pub key_size: u32,
    pub value_size: u32,
    /// memlock slope between the two sizes.
    pub bytes: f64,
    pub sizes: (u32, u32),
}

#[derive(Clone, Debug)]
pub struct Memory {
    pub per_entry: Vec<PerEntry>,
    /// VmallocUsed growth per flow-table entry, 2^22 against 2^16 entries (cross-check).
    pub meminfo_flow_bytes: Option<f64>,
    pub meminfo_entries: u32,
    /// Every map of a default-size load.
    pub default_maps: Vec<MapMem>,
    pub default_sizes: Sizes,
    /// VmRSS and VmHWM of the agent, kB.
    pub agent_rss_kb: Option<u64>,
    pub agent_hwm_kb: Option<u64>,
    pub agent_note: String,
    pub left_out: Vec<String>,
}

impl Memory {
    pub fn default_total(&self) -> u64 {
        self.default_maps.iter().map(|m| m.memlock).sum()
    }
}

pub fn run(scale: Scale) -> Result<Memory> {
    let small = 1u32 << 16;
    let large = 1u32 << 20;
    let mut left_out = Vec::new();
    // First, before this process frees any map (vmalloc frees are deferred and would show up
    // in the delta): the flow table's growth at 2^22 entries against 2^16.
    let meminfo_entries = 1u32 << 22;
    let meminfo_flow_bytes = if scale == Scale::Smoke {
        left_out.push("smoke scale: no /proc/meminfo cross-check".into());
        None
    } else {
        let vmalloc_growth = |entries: u32| -> Result<u64> {
            let before = meminfo_kb(MEMINFO_KEY)?;
            let loaded = load_maps(&Sizes {
                flow_entries: entries,
                ..sized(small)
            })?;
            std::thread::sleep(Duration::from_millis(300));
            let after = meminfo_kb(MEMINFO_KEY)?;
            drop(loaded);
            std::thread::sleep(Duration::from_millis(300));
            Ok(after.saturating_sub(before) * 1024)
        };
        let big = vmalloc_growth(meminfo_entries)?;
        let base = vmalloc_growth(small)?;
        Some((big as f64 - base as f64) / f64::from(meminfo_entries - small))
    };
    let (a, ea) = load_maps(&sized(small))?;
    let (b, eb) = load_maps(&sized(large))?;
    let mut per_entry = Vec::new();
    // A source is a slot in LB_SOURCES and a tag in LB_SOURCE_TAGS (SOURCE_WAYS per element).
    for (map, kind, per_element) in [
        (MAP_FLOWS4, "LRU hash", 1),
        (MAP_FLOWS6, "LRU hash", 1),
        (MAP_CLAIMS4, "array", 1),
        (MAP_CLAIMS6, "array", 1),
        (MAP_SOURCES, "array", 1),
        (
            MAP_SOURCE_TAGS,
            "array of 8-way tag sets",
            u32::try_from(SOURCE_WAYS).expect("8 ways"),
        ),
    ] {
        let ma = find(&a, map)?;
        let mb = find(&b, map)?;
        let elements = f64::from(mb.max_entries - ma.max_entries);
        per_entry.push(PerEntry {
            map,
            kind,
            key_size: ma.key_size,
            value_size: ma.value_size / per_element,
            bytes: (mb.memlock as f64 - ma.memlock as f64) / elements / f64::from(per_element),
            sizes: (small, large),
        });
    }
    drop(ea);
    drop(eb);

    let default_sizes = Sizes::default();
    let (default_maps, e) = load_maps(&default_sizes)?;
    drop(e);

    let (agent_rss_kb, agent_hwm_kb, agent_note) = match agent_rss() {
        Ok((rss, hwm, note)) => (Some(rss), Some(hwm), note),
        Err(e) => {
            left_out.push(format!("agent RSS: {e:#}"));
            (None, None, String::new())
        }
    };
    Ok(Memory {
        per_entry,
        meminfo_flow_bytes,
        meminfo_entries,
        default_maps,
        default_sizes,
        agent_rss_kb,
        agent_hwm_kb,
        agent_note,
        left_out,
    })
}

/// Default sizes with the flow and source tables at `n` entries.
fn sized(n: u32) -> Sizes {
    Sizes {
        flow_entries: n,
        flow_entries_v6: n,
        source_entries: n,
        ..Sizes::default()
    }
}

fn find<'a>(maps: &'a [MapMem], name: &str) -> Result<&'a MapMem> {
    maps.iter()
        .find(|m| m.name == name)
        .with_context(|| format!("map {name} not found in fdinfo"))
}

/// Creates the data path's maps at `sizes` (programs not loaded) and reads what the kernel
/// charges for each. The maps live as long as the returned object.
fn load_maps(sizes: &Sizes) -> Result<(Vec<MapMem>, Ebpf)> {
    let before: BTreeSet<u32> = map_fdinfo()?.into_keys().collect();
    let mut loader = EbpfLoader::new();
    for (name, entries) in sizes.overrides() {
        loader.map_max_entries(name, entries);
    }
    let ebpf = loader
        .load(LB_OBJECT)
        .context("creating the data path's maps")?;
    let names: BTreeMap<u32, String> = aya::maps::loaded_maps()
        .filter_map(std::result::Result::ok)
        .map(|m| (m.id(), m.name_as_str().unwrap_or("?").to_string()))
        .collect();
    let mut maps: Vec<MapMem> = map_fdinfo()?
        .into_iter()
        .filter(|(id, _)| !before.contains(id))
        .map(|(id, mut m)| {
            m.name = names
                .get(&id)
                .cloned()
                .unwrap_or_else(|| format!("map {id}"));
            m
        })
        .collect();
    maps.sort_by_key(|m| std::cmp::Reverse(m.memlock));
    Ok((maps, ebpf))
}

/// Map fds of this process by map id, from /proc/self/fdinfo.
fn map_fdinfo() -> Result<BTreeMap<u32, MapMem>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fdinfo")?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |k: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse().ok())
        };
        let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) else {
            continue;
        };
        out.insert(
            u32::try_from(id)?,
            MapMem {
                name: String::new(),
                map_type: u32::try_from(field("map_type:").unwrap_or(0))?,
                key_size: u32::try_from(field("key_size:").unwrap_or(0))?,
                value_size: u32::try_from(field("value_size:").unwrap_or(0))?,
                max_entries: u32::try_from(field("max_entries:").unwrap_or(0))?,
                memlock,
            },
        );
    }
    Ok(out)
}

/// Large maps live in vmalloc space, which other processes rarely move (MemFree moves with
/// every compiler running beside the benchmark).
const MEMINFO_KEY: &str = "VmallocUsed:";

fn meminfo_kb(key: &str) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{key} not in /proc/meminfo"))
}

/// Runs the real agent (default sizes) on a veth in a fresh namespace until it is ready,
/// lets it settle, and reads its VmRSS / VmHWM.
fn agent_rss() -> Result<(u64, u64, String)> {
    let binary = agent_binary()?;
    crate::netns::remove_stale("xdplb-bench-agent");
    let ns = Netns::create_unique("xdplb-bench-agent")?;
    ns.ip_batch(&[
        "link add eth0 type veth peer name eth0p",
        "link set eth0 up",
        "link set eth0p up",
        "addr add 10.0.0.1/24 dev eth0",
    ])?;
    let bpffs = Bpffs::mount("bench-agent")?;
    let state_dir = PathBuf::from(format!(
        "/run/xdplb-tests/{}-bench-state",
        std::process::id()
    ));
    std::fs::create_dir_all(&state_dir)?;
    let config = state_dir.join("lb.toml");
    let backends: Vec<String> = (0..10)
        .map(|j| {
            format!(
                "  {{ address = \"10.1.0.{}\", port = 8080, weight = 1 }},",
                j + 2
            )
        })
        .collect();
    std::fs::write(
        &config,
        format!(
            "[node]\nhash-seed = 42\n\n[[services]]\nname = \"web\"\nvip = \"10.96.0.10\"\nport = 80\nprotocol = \"tcp\"\nbackends = [\n{}\n]\n",
            backends.join("\n")
        ),
    )?;
    let pin_dir = bpffs.path().join("agent");
    let log = std::fs::File::create(state_dir.join("agent.log"))?;
    let mut cmd = ns.command(binary.to_str().context("agent path")?);
    cmd.args(["run", "--config"])
        .arg(&config)
        .args(["--iface", "eth0", "--pin-dir"])
        .arg(&pin_dir)
        .arg("--state-dir")
        .arg(&state_dir)
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    let cleanup = Cleanup {
        binary: binary.clone(),
        pin_dir,
        state_dir: state_dir.clone(),
    };
    let mut child = ChildGuard::spawn(cmd)?;
    let started = Instant::now();
    let state = loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "lb-agent exited ({status}); log:\n{}",
                std::fs::read_to_string(state_dir.join("agent.log")).unwrap_or_default()
            );
        }
        if let Some(s) = lb_userspace::state::State::read(&state_dir)
            && s.ready
        {
            break s;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("lb-agent not ready within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Past start-up (map creation, first reconcile, first sweep).
    std::thread::sleep(Duration::from_secs(2));
    let status = std::fs::read_to_string(format!("/proc/{}/status", state.pid))?;
    let kb = |k: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{k} not in /proc/{}/status", state.pid))
    };
    let (rss, hwm) = (kb("VmRSS:")?, kb("VmHWM:")?);
    let s = Sizes::default();
    let note = format!(
        "lb-agent run, default sizes ({} services, {} backends, ring {}, {} flow entries, {} sources), 1 service x 10 backends, 2 s after ready",
        s.max_services, s.max_backends, s.ring_size, s.flow_entries, s.source_entries
    );
    // A graceful stop first (the agent detaches and unpins), then the guards.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id().cast_signed(), libc::SIGTERM) };
    let stop = Instant::now();
    while child.try_wait()?.is_none() && stop.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(child);
    drop(cleanup);
    drop(bpffs);
    drop(ns);
    Ok((rss, hwm, note))
}
