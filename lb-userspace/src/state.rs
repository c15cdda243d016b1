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
    /// (in XDP), "kernel" (through its policy hooks) or "netfilter" (forwarded by the kernel,
    /// no snat), and why.
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
        state.add_zones(state_dir);
        Some(state)
    }

    /// Adds the backends' zones, from their file of their own beside the state file.
    pub fn add_zones(&mut self, state_dir: &Path) {
        let zones: Vec<(Frontend, BTreeMap<String, String>)> =
            std::fs::read(state_dir.join(ZONES_FILE))
                .ok()
                .and_then(|data| serde_json::from_slice(&data).ok())
                .unwrap_or_default();
        let mut zones: std::collections::HashMap<Frontend, BTreeMap<String, String>> =
            zones.into_iter().collect();
        for s in &mut self.services {
            if let Some(z) = zones.remove(&s.frontend) {
                s.zones.backends = z;
            }
        }
    }
}

/// A service's part of the state files: its label as [`FILE`] lists it, and its entry in
/// [`ZONES_FILE`] if its backends have zones.
pub fn parts(label: &ServiceLabel) -> (Box<str>, Option<Box<str>>) {
    let zones =
        (!label.zones.backends.is_empty()).then(|| json(&(label.frontend, &label.zones.backends)));
    (json(label), zones)
}

fn json(value: &impl Serialize) -> Box<str> {
    serde_json::to_string(value)
        .expect("serializing to memory")
        .into_boxed_str()
}

/// Writes the state files as [`State::write`] writes `head` with the services whose
/// [`parts`] are given (`head`'s own services are left out).
pub fn write_parts<'a>(
    state_dir: &Path,
    head: &State,
    parts: impl Iterator<Item = (&'a str, Option<&'a str>)> + Clone,
) -> std::io::Result<()> {
    // Inside a JSON string every quote follows a backslash: `,"` is only ever a key's start.
    const EMPTY: &str = ",\"services\":[]";
    std::fs::create_dir_all(state_dir)?;
    let list = |items: &mut dyn Iterator<Item = &'a str>| {
        let mut out = String::from("[");
        for (i, item) in items.enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(item);
        }
        out.push(']');
        out
    };
    let zones = list(&mut parts.clone().filter_map(|(_, z)| z));
    write_bytes_atomically(state_dir, ZONES_FILE, zones.as_bytes())?;
    let head = if head.services.is_empty() {
        serde_json::to_string(head)
    } else {
        serde_json::to_string(&State {
            services: Vec::new(),
            ..head.clone()
        })
    }
    .map_err(std::io::Error::other)?;
    let at = head
        .find(EMPTY)
        .ok_or_else(|| std::io::Error::other("no services in the state"))?
        + EMPTY.len()
        - 2;
    let services = list(&mut parts.map(|(label, _)| label));
    let file = [&head[..at], &services, &head[at + 2..]].concat();
    write_bytes_atomically(state_dir, FILE, file.as_bytes())
}

fn write_atomically(dir: &Path, file: &str, value: &impl Serialize) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    write_bytes_atomically(dir, file, &bytes)
}

fn write_bytes_atomically(dir: &Path, file: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, dir.join(file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Frontend, Protocol};

    fn label(name: &str, port: u16, zones: &[(&str, &str)]) -> ServiceLabel {
        ServiceLabel {
            frontend: Frontend {
                vip: "10.96.0.1".parse().unwrap(),
                port,
                protocol: Protocol::Tcp,
            },
            name: name.into(),
            origin: "Service default/web".into(),
            mode: Mode::Snat,
            policy: Some("p".into()),
            draining: vec!["10.1.1.9:80".into()],
            source_ranges: SourceRanges::default(),
            zones: ZoneLabel {
                routing: Some("same zone (a)".into()),
                standby: Vec::new(),
                backends: zones
                    .iter()
                    .map(|(b, z)| (b.to_string(), z.to_string()))
                    .collect(),
            },
        }
    }

    #[test]
    fn the_files_written_from_parts_are_those_written_whole() {
        let dir = std::env::temp_dir().join(format!("xdplb-state-{}", std::process::id()));
        for services in [
            vec![],
            vec![label("a,\"services\":[]", 80, &[])],
            vec![
                label("web", 80, &[("10.1.1.2:80", "a")]),
                label("dns", 53, &[]),
                label(
                    "db",
                    5432,
                    &[("10.1.1.3:5432", "b"), ("10.1.1.4:5432", "a")],
                ),
            ],
        ] {
            let state = State {
                pid: 7,
                inputs: "kubernetes".into(),
                ready: true,
                last_error: Some("x,\"services\":[],\"interfaces\":".into()),
                not_served: vec!["s".into()],
                applied: 3,
                rejected: 1,
                services,
                interfaces: Vec::new(),
                policies: [(1, "p".into())].into(),
                zone: Some("a".into()),
            };
            state.write(&dir).unwrap();
            let whole = (
                std::fs::read(path(&dir)).unwrap(),
                std::fs::read(dir.join(ZONES_FILE)).unwrap(),
            );
            let parts: Vec<_> = state.services.iter().map(parts).collect();
            let parts = parts.iter().map(|(l, z)| (&**l, z.as_deref()));
            write_parts(&dir, &state, parts).unwrap();
            let written = (
                std::fs::read(path(&dir)).unwrap(),
                std::fs::read(dir.join(ZONES_FILE)).unwrap(),
            );
            assert_eq!(whole, written);
            assert_eq!(State::read_with_zones(&dir), Some(state));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
