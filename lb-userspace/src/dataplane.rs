//! Loading the data path: the embedded object, map sizes, pinned maps, program load and attach.
//! The agent and the kernel tests go through this one loader, so the tests exercise exactly what
//! the agent runs.
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, MapInfo},
    programs::{ProgramError, Xdp},
};
use lb_common::*;

use crate::error::DataplaneError;

/// The data-path object, built by build.rs.
pub static LB_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
/// Helper programs: xdp_pass / xdp_drop / xdp_tx / xdp_count.
pub static TOOLS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-tools"));

/// Capacities of the sizable maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub max_services: u32,
    pub max_backends: u32,
    pub ring_size: u32,
    pub flow_entries: u32,
    pub source_entries: u32,
    pub affinity_entries: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes {
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            ring_size: DEFAULT_RING_SIZE,
            flow_entries: DEFAULT_FLOW_ENTRIES,
            source_entries: DEFAULT_SOURCE_ENTRIES,
            affinity_entries: DEFAULT_AFFINITY_ENTRIES,
        }
    }
}

impl Sizes {
    /// Rings in LB_RINGS: one per service plus spares to write new rings into.
    pub fn rings(&self) -> u32 {
        self.max_services + SPARE_RINGS
    }

    /// max_entries of each sizable map.
    fn overrides(&self) -> [(&'static str, u32); 8] {
        [
            (MAP_SERVICES, self.max_services),
            (MAP_SVC_STATS, self.max_services),
            (MAP_BACKENDS, self.max_backends),
            (MAP_BE_STATS, self.max_backends),
            (MAP_RINGS, self.rings() * self.ring_size),
            (MAP_FLOWS, self.flow_entries),
            (MAP_SOURCES, self.source_entries),
            (MAP_AFFINITY, self.affinity_entries),
        ]
    }
}

/// Loads the data path with `sizes`. With `pin_dir`, maps already pinned there are reused (their
/// contents, flows included, survive) and new ones are pinned there.
pub fn load(sizes: &Sizes, pin_dir: Option<&Path>) -> Result<Ebpf, DataplaneError> {
    let mut loader = EbpfLoader::new();
    for (name, entries) in sizes.overrides() {
        loader.map_max_entries(name, entries);
    }
    let pins: Vec<(&str, PathBuf)> = match pin_dir {
        Some(dir) => ALL_MAPS.iter().map(|m| (*m, dir.join(m))).collect(),
        None => Vec::new(),
    };
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(LB_OBJECT).map_err(DataplaneError::Load)?;
    for (name, path) in &pins {
        check_pinned(&ebpf, name, path)?;
    }
    for name in [PROG_UPLINK, PROG_BACKEND] {
        program_mut(&mut ebpf, name)?
            .load()
            .map_err(|e| DataplaneError::program(name, e))?;
    }
    Ok(ebpf)
}

/// Loads the helper programs object (each program loaded, none attached).
pub fn load_tools() -> Result<Ebpf, DataplaneError> {
    let mut ebpf = EbpfLoader::new()
        .load(TOOLS_OBJECT)
        .map_err(DataplaneError::Load)?;
    for name in ["xdp_pass", "xdp_drop", "xdp_tx", "xdp_count"] {
        program_mut(&mut ebpf, name)?
            .load()
            .map_err(|e| DataplaneError::program(name, e))?;
    }
    Ok(ebpf)
}

pub fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or_else(|| DataplaneError::MissingProgram(name.to_string()))?
        .try_into()
        .map_err(|e: ProgramError| DataplaneError::program(name, e))
}

/// A reused pinned map must have the layout this object expects; aya reuses whatever is pinned.
fn check_pinned(ebpf: &Ebpf, name: &str, path: &Path) -> Result<(), DataplaneError> {
    let Some(map) = ebpf.map(name) else {
        return Ok(());
    };
    let pinned = MapInfo::from_pin(path).map_err(|e| DataplaneError::Pin {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let ours = match map {
        aya::maps::Map::Array(m)
        | aya::maps::Map::HashMap(m)
        | aya::maps::Map::LruHashMap(m)
        | aya::maps::Map::PerCpuArray(m)
        | aya::maps::Map::LpmTrie(m)
        | aya::maps::Map::DevMapHash(m) => map_info(m)?,
        _ => return Ok(()),
    };
    let same = pinned.key_size() == ours.key_size()
        && pinned.value_size() == ours.value_size()
        && pinned.map_type().ok() == ours.map_type().ok();
    if !same {
        return Err(DataplaneError::Pin {
            path: path.to_path_buf(),
            reason: format!(
                "pinned map has key/value size {}/{}, this build expects {}/{}; remove the pin directory to start fresh",
                pinned.key_size(),
                pinned.value_size(),
                ours.key_size(),
                ours.value_size()
            ),
        });
    }
    Ok(())
}

fn map_info(m: &MapData) -> Result<MapInfo, DataplaneError> {
    m.info().map_err(|e| DataplaneError::Pin {
        path: PathBuf::new(),
        reason: e.to_string(),
    })
}
