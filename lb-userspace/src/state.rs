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

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

impl State {
    /// Writes atomically (a reader never sees half a file).
    pub fn write(&self, state_dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(state_dir)?;
        let tmp = state_dir.join(format!(".{FILE}.tmp"));
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path(state_dir))
    }

    pub fn read(state_dir: &Path) -> Option<State> {
        let data = std::fs::read(path(state_dir)).ok()?;
        serde_json::from_slice(&data).ok()
    }
}
