//! The agent's state file: what `lb-agent status` and `lb-agent flow` need beyond the maps
//! (names, where services came from, how interfaces are attached). The maps stay the source of
//! truth for everything the data path does; this only labels it.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::model::{Frontend, Mode, SourceRanges};

pub const FILE: &str = "state.json";
/// Each service's backends' zones, beside [`FILE`].
pub const ZONES_FILE: &str = "zones.json";

#[derive(Clone, Debug, Default, PartialEq, Hash, Serialize, Deserialize)]
pub struct State {
    pub pid: u32,
    /// Where the desired state comes from ("config /etc/xdplb/lb.toml", "kubernetes").
    #[serde(alias = "source")]
    pub inputs: String,
    pub ready: bool,
    /// The last reload's error, if it was rejected (the previous state stays in force).
    pub last_error: Option<String>,
    /// Services not served, each with why.
    #[serde(default)]
    pub not_served: Vec<String>,
    /// Desired states applied and rejected since start.
    pub applied: u64,
    pub rejected: u64,
    pub services: Vec<ServiceLabel>,
    pub interfaces: Vec<InterfaceLabel>,
    /// Rate-limit policy names by id.
    pub policies: BTreeMap<u32, String>,
    /// This node's zone (Kubernetes: its Node's `topology.kubernetes.io/zone` label).
    #[serde(default)]
    pub zone: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceLabel {
    pub frontend: Frontend,
    pub name: String,
    pub origin: String,
    pub mode: Mode,
    pub policy: Option<String>,
    /// Backends ("addr:port") at weight 0 until their deregistration delay runs out, as opposed
    /// to weight 0 by configuration ("maintenance").
    #[serde(default)]
    pub draining: Vec<String>,
    /// The sources it admits (or refuses).
    #[serde(default)]
    pub source_ranges: SourceRanges,
    /// Zone-aware routing and its backends' zones.
    #[serde(default)]
    pub zones: ZoneLabel,
}

/// A service's zone-aware routing (Kubernetes, [`crate::k8s::topology`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ZoneLabel {
    /// How its new flows are kept close, and who asked; `None`: nobody did.
    pub routing: Option<String>,
    /// Backends ("addr:port") at weight 0 because closer ones take the new flows: no new
    /// flows, their flows continue.
    pub standby: Vec<String>,
    /// Backend ("addr:port") -> its zone, where its EndpointSlice names one. Kept in a file of
    /// its own ([`ZONES_FILE`]): an entry per backend (200,000 at 10,000 Services), which
    /// `status` reads only to list backends.
    #[serde(skip)]
    pub backends: BTreeMap<String, String>,
}

impl ZoneLabel {
    /// Where a backend is relative to this node's zone: "same-zone", "other-zone" or
    /// "unknown" (either zone unknown).
    pub fn locality(&self, backend: &str, node_zone: Option<&str>) -> &'static str {
        match (self.backends.get(backend), node_zone) {
            (Some(b), Some(n)) if b == n => SAME_ZONE,
            (Some(_), Some(_)) => OTHER_ZONE,
            _ => UNKNOWN_ZONE,
        }
    }
}

pub const SAME_ZONE: &str = "same-zone";
pub const OTHER_ZONE: &str = "other-zone";
pub const UNKNOWN_ZONE: &str = "unknown";

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InterfaceLabel {
    pub name: String,
    pub ifindex: u32,
    pub program: String,
    /// Where the program runs: "xdp-native", "xdp-generic", "tcx" or "tc-classic".
    #[serde(alias = "mode")]
    pub hook: String,
    pub note: Option<String>,
    /// For a backend interface: how packets for its local backends are delivered, "redirect"
    /// (in XDP) or "kernel" (through its policy hooks), and why.
    #[serde(default)]
    pub delivery: Option<String>,
    #[serde(default)]
    pub delivery_reason: Option<String>,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Removes the state files (the agent has stopped).
pub fn remove(state_dir: &Path) {
    let _ = std::fs::remove_file(path(state_dir));
    let _ = std::fs::remove_file(state_dir.join(ZONES_FILE));
}

impl State {
    /// Writes atomically (a reader never sees half a file), compact: `status` reads it whole.
    pub fn write(&self, state_dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(state_dir)?;
        let zones: Vec<(Frontend, &BTreeMap<String, String>)> = self
            .services
            .iter()
            .filter(|s| !s.zones.backends.is_empty())
            .map(|s| (s.frontend, &s.zones.backends))
            .collect();
        write_atomically(state_dir, ZONES_FILE, &zones)?;
        write_atomically(state_dir, FILE, self)
    }

    /// The state without the backends' zones.
    pub fn read(state_dir: &Path) -> Option<State> {
        let data = std::fs::read(path(state_dir)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// The state with the backends' zones.
    pub fn read_with_zones(state_dir: &Path) -> Option<State> {
        let mut state = State::read(state_dir)?;
        let zones: Vec<(Frontend, BTreeMap<String, String>)> =
            std::fs::read(state_dir.join(ZONES_FILE))
                .ok()
                .and_then(|data| serde_json::from_slice(&data).ok())
                .unwrap_or_default();
        let mut zones: std::collections::HashMap<Frontend, BTreeMap<String, String>> =
            zones.into_iter().collect();
        for s in &mut state.services {
            if let Some(z) = zones.remove(&s.frontend) {
                s.zones.backends = z;
            }
        }
        Some(state)
    }
}

fn write_atomically(dir: &Path, file: &str, value: &impl Serialize) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec(value).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(tmp, dir.join(file))
}
