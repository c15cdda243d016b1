//! `lb-agent status`: reads the running agent's pinned maps (labelled with names from its state
//! file) and shows them to a person, or as JSON.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    net::IpAddr,
    net::SocketAddr,
};

use anyhow::Result;
use lb_common::{Addr, BACKEND_ACTIVE, BACKEND_LISTED, Counter, DropReason, ServiceKey};
use serde::Serialize;

use crate::{
    cli::Paths,
    dataplane::Maps,
    model::Frontend,
    state::{ServiceLabel, State},
    system::{self, monotonic_ns},
};

#[derive(Serialize)]
pub struct Status {
    /// Where the desired state comes from.
    pub inputs: Option<String>,
    pub ready: Option<bool>,
    pub last_error: Option<String>,
    /// Services of the desired state not served, each with why.
    pub not_served: Vec<String>,
    pub interfaces: Vec<crate::state::InterfaceLabel>,
    /// Whether each service's `backends` are listed (else only `backend_states`): see
    /// [`LISTED_BACKENDS`].
    pub backends_listed: bool,
    pub services: Vec<ServiceStatus>,
    /// Sources being held back the most (by packets dropped while tracked).
    pub limited_sources: Vec<LimitedSource>,
    /// Entries in the source table (sources with a partly used bucket).
    pub tracked_sources: usize,
    pub counters: BTreeMap<&'static str, u64>,
    /// This node's zone (Kubernetes).
    pub zone: Option<String>,
}

/// How many sources `status` lists.
pub const TOP_LIMITED: usize = 10;

#[derive(Serialize)]
pub struct LimitedSource {
    /// The address, or for IPv6 the prefix the policy aggregates by; "(table full)" for the
    /// shared bucket of sources that found the table full.
    pub source: String,
    pub policy: String,
    pub dropped: u64,
    /// Tokens left now, of the burst.
    pub packet_tokens: Option<(u64, u64)>,
    pub connection_tokens: Option<(u64, u64)>,
}

#[derive(Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub frontend: Option<Frontend>,
    pub origin: Option<String>,
    pub mode: &'static str,
    pub policy: Option<String>,
    /// "allow <prefixes>" or "deny <prefixes>"; `None`: every source is admitted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ranges: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub new_flows: u64,
    // Empty fields are left out of the JSON: 20,000 services at 10,000 Services.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub drops: BTreeMap<&'static str, u64>,
    /// How many listed backends are in each state ([`ACTIVE`], [`DRAINING`], ...).
    pub backend_states: BTreeMap<&'static str, usize>,
    /// Each backend, when listed (`backends_listed`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendStatus>,
    /// Zone-aware routing: how new flows are kept close, and who asked; `None`: nobody did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone_routing: Option<String>,
    /// New flows by where their backend is relative to this node's zone ("same-zone",
    /// "other-zone", "unknown"), summed over the listed backends; empty when no backend's zone
    /// is known.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub new_flows_by_zone: BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    /// [`ACTIVE`], [`MAINTENANCE`], [`DRAINING`] or [`STANDBY`].
    pub state: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Its zone, where its EndpointSlice names one.
    pub zone: Option<String>,
}

/// A listed backend that takes new flows (weight > 0).
pub const ACTIVE: &str = "active";
/// A listed backend at weight 0 by configuration (the config file, or the
/// `xdplb.io/backend-weights` annotation): no new flows; its flows continue.
pub const MAINTENANCE: &str = "maintenance";
/// A backend that is no longer an endpoint (removed, or terminating), kept at weight 0 while
/// its deregistration delay runs: no new flows; its flows continue until the delay is over,
/// then end.
pub const DRAINING: &str = "draining";
/// A ready endpoint kept at weight 0 because closer ones take the new flows (zone-aware
/// routing): no new flows; its flows continue.
pub const STANDBY: &str = "standby";

/// The running agent's maps, or why they cannot be opened (saying so when this process sees a
/// private /sys, as under `ip netns exec`).
pub fn open_maps(paths: &Paths) -> Result<Maps> {
    Maps::open_pinned(&paths.pin_dir).map_err(|e| match system::private_sys() {
        Some(private) if paths.pin_dir.starts_with(system::BPFFS) => {
            anyhow::anyhow!("{e}\n{private}")
        }
        _ => e.into(),
    })
}

/// Which services `status` shows, and whether with their backends.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only these services (a name, or a Kubernetes Service's `namespace/name` for all its
    /// ports), each with its backends; empty: every service.
    pub services: Vec<String>,
    /// List every service's backends, however many the node has.
    pub backends: bool,
}

/// Without `--service` or `--backends`, each service's backends are listed while the node
/// lists at most this many; above, each service shows how many it has in each state (at
/// 200,000 backends the listing was 50 MB and took seconds).
pub const LISTED_BACKENDS: usize = 2000;

impl Filter {
    fn selects(&self, name: &str) -> bool {
        self.services.is_empty()
            || self.services.iter().any(|s| {
                name == s
                    || name
                        .strip_prefix(s.as_str())
                        .is_some_and(|port| port.starts_with(':'))
            })
    }
}

pub fn status(paths: &Paths, filter: &Filter) -> Result<Status> {
    let maps = open_maps(paths)?;
    // The state file (5 MiB of JSON at 20,000 frontends) is parsed and the services' counters
    // read on a thread of their own while the services and backends are read (as long again):
    // `status --json` at that size took over 100 ms.
    let (maps_read, (mut state, service_stats)) = std::thread::scope(|s| {
        let other = s.spawn(|| {
            (
                State::read(&paths.state_dir),
                maps.stats.all_services().ok(),
            )
        });
        let maps_read = maps.read_services_and_backends();
        // A panic there is this command's own: not a status with half of it missing.
        let other = other
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (maps_read, other)
    });
    let (in_maps, backends) = maps_read?;
    let listed = backends
        .iter()
        .filter(|(_, b)| b.flags & BACKEND_LISTED != 0)
        .count();
    let list_backends = filter.backends || !filter.services.is_empty() || listed <= LISTED_BACKENDS;
    // Backends' zones are in a file of their own, read only to list backends.
    if list_backends && let Some(state) = &mut state {
        state.add_zones(&paths.state_dir);
    }
    let labels: HashMap<ServiceKey, &ServiceLabel> = state
        .iter()
        .flat_map(|s| s.services.iter())
        .map(|l| (l.frontend.key(), l))
        .collect();
    let mut by_service: HashMap<u32, Vec<(u32, &lb_common::Backend)>> = HashMap::new();
    for (id, b) in &backends {
        if b.flags & BACKEND_LISTED != 0 {
            by_service.entry(b.service).or_default().push((*id, b));
        }
    }
    let backend_stats = if list_backends {
        maps.stats.all_backends().ok()
    } else {
        None
    };
    let read = Reader {
        maps: &maps,
        services: service_stats.as_deref(),
        backends: backend_stats.as_deref(),
        list_backends,
        node_zone: state.as_ref().and_then(|s| s.zone.as_deref()),
    };
    let statuses = |part: &[(ServiceKey, lb_common::Service)]| -> Vec<ServiceStatus> {
        part.iter()
            .filter_map(|(key, svc)| {
                let label = labels.get(key).copied();
                let name = service_name(svc, label);
                if !filter.selects(&name) {
                    return None;
                }
                let backends = by_service.get(&svc.id).map_or(&[][..], Vec::as_slice);
                Some(read.service_status(name, key, svc, label, backends))
            })
            .collect()
    };
    // Half of the services on a second thread (20,000 of them take ~15 ms).
    let (first, second) = in_maps.split_at(in_maps.len() / 2);
    let mut services = std::thread::scope(|s| {
        let second = s.spawn(|| statuses(second));
        let mut all = statuses(first);
        all.extend(
            second
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p)),
        );
        all
    });
    services.sort_by(|a, b| a.name.cmp(&b.name));
    let policy_names = state
        .as_ref()
        .map(|s| s.policies.clone())
        .unwrap_or_default();
    let (limited_sources, tracked_sources) = limited_sources(&maps, &policy_names);
    Ok(Status {
        inputs: state.as_ref().map(|s| s.inputs.clone()),
        ready: state.as_ref().map(|s| s.ready),
        last_error: state.as_ref().and_then(|s| s.last_error.clone()),
        not_served: state
            .as_ref()
            .map(|s| s.not_served.clone())
            .unwrap_or_default(),
        zone: state.as_ref().and_then(|s| s.zone.clone()),
        backends_listed: list_backends,
        interfaces: state.map(|s| s.interfaces).unwrap_or_default(),
        services,
        limited_sources,
        tracked_sources,
        counters: maps
            .read_counters()
            .into_iter()
            .filter(|(_, v)| *v > 0)
            .map(|(c, v)| (Counter::name(c), v))
            .collect(),
    })
}

fn service_name(svc: &lb_common::Service, label: Option<&ServiceLabel>) -> String {
    label.map_or_else(|| format!("service {}", svc.id), |l| l.name.clone())
}

/// The counters `status` read, and what it shows of backends.
struct Reader<'a> {
    maps: &'a Maps,
    /// Every service's and backend's counters by id, where read in batches.
    services: Option<&'a [lb_common::ServiceStats]>,
    backends: Option<&'a [lb_common::BackendStats]>,
    list_backends: bool,
    node_zone: Option<&'a str>,
}

impl Reader<'_> {
    fn service_status(
        &self,
        name: String,
        key: &ServiceKey,
        svc: &lb_common::Service,
        label: Option<&ServiceLabel>,
        listed: &[(u32, &lb_common::Backend)],
    ) -> ServiceStatus {
        let st = match self.services {
            Some(all) => all.get(svc.id as usize).copied().unwrap_or_default(),
            None => self.maps.read_service_stats(svc.id),
        };
        let states = States::for_label(label);
        let mut backend_states: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut backends = Vec::new();
        for (id, b) in listed {
            let address = (b.flags & BACKEND_ACTIVE == 0 || self.list_backends)
                .then(|| show(&b.addr, u16::from_be(b.port)));
            let state = states.of(b, address.as_deref());
            *backend_states.entry(state).or_default() += 1;
            let Some(address) = address.filter(|_| self.list_backends) else {
                continue;
            };
            let s = match self.backends {
                Some(all) => all.get(*id as usize).copied().unwrap_or_default(),
                None => self.maps.read_backend_stats(*id),
            };
            backends.push(BackendStatus {
                state,
                zone: label.and_then(|l| l.zones.backends.get(&address).cloned()),
                address,
                weight: b.weight,
                packets: s.packets,
                bytes: s.bytes,
                new_flows: s.new_flows,
            });
        }
        backends.sort_by(|a, b| a.address.cmp(&b.address));
        let mut new_flows_by_zone = BTreeMap::new();
        if let Some(l) = label.filter(|l| !l.zones.backends.is_empty()) {
            for b in &backends {
                *new_flows_by_zone
                    .entry(l.zones.locality(&b.address, self.node_zone))
                    .or_default() += b.new_flows;
            }
        }
        ServiceStatus {
            name,
            frontend: label
                .map(|l| l.frontend)
                .or_else(|| Frontend::from_key(key)),
            origin: label.map(|l| l.origin.clone()),
            mode: if svc.flags & lb_common::SVC_SNAT != 0 {
                "snat"
            } else {
                "preserve-client-ip"
            },
            policy: label.and_then(|l| l.policy.clone()),
            source_ranges: label
                .filter(|l| !l.source_ranges.is_open())
                .map(|l| l.source_ranges.to_string()),
            packets: st.packets,
            bytes: st.bytes,
            reply_packets: st.reply_packets,
            new_flows: st.new_flows,
            drops: DropReason::ALL
                .iter()
                .zip(st.drops.iter())
                .filter(|(_, v)| **v > 0)
                .map(|(r, v)| (r.name(), *v))
                .collect(),
            backend_states,
            backends,
            zone_routing: label.and_then(|l| l.zones.routing.clone()),
            new_flows_by_zone,
        }
    }
}

/// A service's backends at weight 0 that the agent drains or keeps on standby, as addresses
/// written as [`show`] writes them.
struct States {
    draining: HashSet<String>,
    standby: HashSet<String>,
}

impl States {
    fn for_label(label: Option<&ServiceLabel>) -> States {
        let normal = |list: &[String]| -> HashSet<String> {
            list.iter()
                .filter_map(|d| d.parse::<SocketAddr>().ok())
                .map(|d| d.to_string())
                .collect()
        };
        States {
            draining: label.map(|l| normal(&l.draining)).unwrap_or_default(),
            standby: label.map(|l| normal(&l.zones.standby)).unwrap_or_default(),
        }
    }

    /// [`ACTIVE`], [`DRAINING`] (the agent says it drains it), [`STANDBY`] (closer endpoints
    /// take the new flows) or [`MAINTENANCE`]; `address` is needed for all but an active one.
    fn of(&self, b: &lb_common::Backend, address: Option<&str>) -> &'static str {
        if b.flags & BACKEND_ACTIVE != 0 {
            ACTIVE
        } else if address.is_some_and(|a| self.draining.contains(a)) {
            DRAINING
        } else if address.is_some_and(|a| self.standby.contains(a)) {
            STANDBY
        } else {
            MAINTENANCE
        }
    }
}

/// The sources that had the most packets dropped, and how many sources are tracked.
fn limited_sources(maps: &Maps, names: &BTreeMap<u32, String>) -> (Vec<LimitedSource>, usize) {
    let now = monotonic_ns();
    let policies: BTreeMap<u32, lb_common::Policy> = maps
        .policies
        .iter()
        .filter_map(Result::ok)
        .zip(0u32..)
        .map(|(p, i)| (i, p))
        .collect();
    let sources = maps.read_sources();
    let tracked = sources.len();
    let mut all: Vec<lb_common::Source> = sources.into_iter().filter(|s| s.dropped > 0).collect();
    all.sort_by_key(|s| std::cmp::Reverse(s.dropped));
    let list = all
        .into_iter()
        .take(TOP_LIMITED)
        .map(|s| {
            let k = s.key;
            let policy = policies.get(&k.policy_id());
            let tokens = |limit: &lb_common::Limit, bucket: &lb_common::Bucket| {
                (!limit.is_unlimited())
                    .then(|| (lb_common::bucket::tokens(limit, bucket, now), limit.burst))
            };
            let ip = IpAddr::from(k.addr);
            let source = match (ip, policy) {
                (IpAddr::V6(_), Some(p)) if p.v6_prefix_len < 128 => {
                    format!("{ip}/{}", p.v6_prefix_len)
                }
                _ => ip.to_string(),
            };
            LimitedSource {
                source,
                policy: names
                    .get(&k.policy_id())
                    .cloned()
                    .unwrap_or_else(|| format!("policy {}", k.policy_id())),
                dropped: u64::from(s.dropped),
                packet_tokens: policy.and_then(|p| tokens(&p.packets, &s.packets)),
                connection_tokens: policy.and_then(|p| tokens(&p.connections, &s.connections)),
            }
        })
        .collect();
    (list, tracked)
}

pub(crate) fn show(addr: &Addr, port: u16) -> String {
    SocketAddr::new(IpAddr::from(*addr), port).to_string()
}

/// A table for people.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    render_agent(&mut out, s);
    if !s.backends_listed {
        let all: usize = s
            .services
            .iter()
            .flat_map(|svc| svc.backend_states.values())
            .sum();
        let _ = writeln!(
            out,
            "backends not listed ({all}, over {LISTED_BACKENDS}): `--service NAME` lists a service's, `--backends` all"
        );
    }
    for svc in &s.services {
        render_service(&mut out, svc);
    }
    render_limited(&mut out, s);
    if !s.counters.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "data path counters:");
        for (k, v) in &s.counters {
            let _ = writeln!(out, "  {k:<28} {v}");
        }
    }
    out
}

fn render_agent(out: &mut String, s: &Status) {
    let _ = writeln!(
        out,
        "agent: {}{}",
        s.inputs
            .as_deref()
            .unwrap_or("(no state file: names unknown)"),
        match s.ready {
            Some(true) => ", ready",
            Some(false) => ", NOT READY",
            None => "",
        }
    );
    if let Some(zone) = &s.zone {
        let _ = writeln!(out, "zone: {zone}");
    }
    if let Some(e) = &s.last_error {
        let _ = writeln!(out, "last config rejected (previous one in force): {e}");
    }
    for n in &s.not_served {
        let _ = writeln!(out, "NOT SERVED: {n}");
    }
    for i in &s.interfaces {
        let _ = writeln!(
            out,
            "  {} (ifindex {}): {} at {}{}{}",
            i.name,
            i.ifindex,
            i.program,
            i.hook,
            i.note
                .as_deref()
                .map(|n| format!(" — {n}"))
                .unwrap_or_default(),
            i.delivery
                .as_deref()
                .map(|d| format!(
                    "; delivery {d} ({})",
                    i.delivery_reason.as_deref().unwrap_or("")
                ))
                .unwrap_or_default()
        );
    }
}

fn render_service(out: &mut String, svc: &ServiceStatus) {
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{}  {}  {}{}{}{}",
        svc.name,
        svc.frontend.map(|f| f.to_string()).unwrap_or_default(),
        svc.mode,
        svc.policy
            .as_deref()
            .map(|p| format!("  rate-limit={p}"))
            .unwrap_or_default(),
        svc.source_ranges
            .as_deref()
            .map(|r| format!("  sources={r}"))
            .unwrap_or_default(),
        svc.origin
            .as_deref()
            .map(|o| format!("  ({o})"))
            .unwrap_or_default(),
    );
    let drops: Vec<String> = svc.drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(
        out,
        "  packets {}  bytes {}  replies {}  new flows {}{}",
        svc.packets,
        svc.bytes,
        svc.reply_packets,
        svc.new_flows,
        if drops.is_empty() {
            String::new()
        } else {
            format!("  drops {}", drops.join(" "))
        }
    );
    if let Some(r) = &svc.zone_routing {
        let _ = writeln!(out, "  zone routing: {r}");
    }
    if !svc.new_flows_by_zone.is_empty() {
        let all: u64 = svc.new_flows_by_zone.values().sum();
        let same = svc
            .new_flows_by_zone
            .get(crate::state::SAME_ZONE)
            .copied()
            .unwrap_or(0);
        let share = if all > 0 {
            format!(" ({:.1}%)", 100.0 * same as f64 / all as f64)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  new flows to backends in this node's zone: {same} of {all}{share}"
        );
    }
    if svc.backends.is_empty() {
        render_backend_states(out, svc);
        return;
    }
    let total: u64 = svc.backends.iter().map(|b| b.new_flows).sum();
    // The zone column only where some backend's zone is known.
    let zoned = svc.backends.iter().any(|b| b.zone.is_some());
    let zone = |z: &str| {
        if zoned {
            format!("  {z}")
        } else {
            String::new()
        }
    };
    let _ = writeln!(
        out,
        "  {:<40} {:>6} {:>11} {:>12} {:>10} {:>6}{}",
        "backend",
        "weight",
        "state",
        "packets",
        "new flows",
        "share",
        zone("zone")
    );
    for b in &svc.backends {
        let share = if total > 0 {
            format!("{:.1}%", 100.0 * b.new_flows as f64 / total as f64)
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "  {:<40} {:>6} {:>11} {:>12} {:>10} {:>6}{}",
            b.address,
            b.weight,
            b.state,
            b.packets,
            b.new_flows,
            share,
            zone(b.zone.as_deref().unwrap_or("-"))
        );
    }
}

/// A service's backends counted by state, where they are not listed.
fn render_backend_states(out: &mut String, svc: &ServiceStatus) {
    let states: Vec<String> = svc
        .backend_states
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect();
    let _ = writeln!(
        out,
        "  backends: {}",
        if states.is_empty() {
            "none".to_string()
        } else {
            states.join(", ")
        }
    );
}

fn render_limited(out: &mut String, s: &Status) {
    if s.limited_sources.is_empty() {
        return;
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "most-limited sources ({} tracked):", s.tracked_sources);
    let _ = writeln!(
        out,
        "  {:<44} {:<20} {:>10} {:>16} {:>16}",
        "source", "policy", "dropped", "packet tokens", "conn tokens"
    );
    let tokens =
        |t: Option<(u64, u64)>| t.map_or_else(|| "-".into(), |(n, of)| format!("{n}/{of}"));
    for l in &s.limited_sources {
        let _ = writeln!(
            out,
            "  {:<44} {:<20} {:>10} {:>16} {:>16}",
            l.source,
            l.policy,
            l.dropped,
            tokens(l.packet_tokens),
            tokens(l.connection_tokens)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(active: bool) -> lb_common::Backend {
        lb_common::Backend {
            flags: BACKEND_LISTED | if active { BACKEND_ACTIVE } else { 0 },
            ..lb_common::Backend::default()
        }
    }

    #[test]
    fn weight_zero_is_maintenance_unless_the_agent_drains_it_or_keeps_it_on_standby() {
        let label = ServiceLabel {
            frontend: Frontend {
                vip: "10.96.0.10".parse().unwrap(),
                port: 80,
                protocol: crate::model::Protocol::Tcp,
            },
            name: "web".into(),
            origin: "Service default/web".into(),
            mode: crate::model::Mode::Snat,
            policy: None,
            draining: vec!["10.1.1.3:8080".into()],
            source_ranges: crate::model::SourceRanges::default(),
            zones: crate::state::ZoneLabel {
                standby: vec!["10.1.2.2:8080".into()],
                ..Default::default()
            },
        };
        assert_eq!(
            States::for_label(Some(&label)).of(&backend(true), Some("10.1.1.2:8080")),
            ACTIVE
        );
        assert_eq!(
            States::for_label(Some(&label)).of(&backend(false), Some("10.1.1.2:8080")),
            MAINTENANCE,
            "weight 0 by configuration, never served or not"
        );
        assert_eq!(
            States::for_label(Some(&label)).of(&backend(false), Some("10.1.1.3:8080")),
            DRAINING
        );
        assert_eq!(
            States::for_label(None).of(&backend(false), Some("10.1.1.3:8080")),
            MAINTENANCE
        );
        assert_eq!(
            States::for_label(Some(&label)).of(&backend(false), Some("10.1.2.2:8080")),
            STANDBY,
            "weight 0 because closer endpoints take the new flows"
        );
    }
}
