//! `lb-agent status` and `lb-agent flow`: read the running agent's pinned maps (labelled with
//! names from its state file) and show them to a person, or as JSON.
use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, net::SocketAddr};

use anyhow::Result;
use lb_common::{
    Addr, AffinityKey, BACKEND_ACTIVE, BACKEND_LISTED, Counter, DropReason, FLOW_CLOSING,
    FLOW_OPENING, FLOW_REPLY, FLOW_SNAT, FlowKey, NO_BACKEND, ServiceKey,
    hash::{flow_hash, ring_slot},
    sources::is_overflow,
};
use serde::Serialize;

use crate::{
    cli::Paths,
    dataplane::Maps,
    model::{Frontend, Protocol},
    state::State,
    system::monotonic_ns,
    tables::Tables,
};

#[derive(Serialize)]
pub struct Status {
    /// Where the desired state comes from.
    pub inputs: Option<String>,
    pub ready: Option<bool>,
    pub last_error: Option<String>,
    pub interfaces: Vec<crate::state::InterfaceLabel>,
    pub services: Vec<ServiceStatus>,
    /// Sources being held back the most (by packets dropped while tracked).
    pub limited_sources: Vec<LimitedSource>,
    /// Entries in the source table (sources with a partly used bucket).
    pub tracked_sources: usize,
    pub counters: BTreeMap<&'static str, u64>,
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
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub new_flows: u64,
    pub drops: BTreeMap<&'static str, u64>,
    pub backends: Vec<BackendStatus>,
}

#[derive(Serialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    /// "active", or "draining" (weight 0: keeps its flows, gets no new ones).
    pub state: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

pub fn status(paths: &Paths) -> Result<Status> {
    let maps = Maps::open_pinned(&paths.pin_dir)?;
    let state = State::read(&paths.state_dir);
    let labels: BTreeMap<ServiceKey, &crate::state::ServiceLabel> = state
        .iter()
        .flat_map(|s| s.services.iter())
        .map(|l| (l.frontend.key(), l))
        .collect();
    let snap = maps.snapshot()?;
    let mut services = Vec::new();
    for (key, svc) in &snap.services {
        let label = labels.get(key);
        let st = maps.read_service_stats(svc.id);
        let mut backends: Vec<BackendStatus> = snap
            .backends
            .iter()
            .filter(|(_, b)| b.service == svc.id && b.flags & BACKEND_LISTED != 0)
            .map(|(id, b)| {
                let s = maps.read_backend_stats(*id);
                BackendStatus {
                    address: show(&b.addr, u16::from_be(b.port)),
                    weight: b.weight,
                    state: if b.flags & BACKEND_ACTIVE != 0 {
                        "active"
                    } else {
                        "draining"
                    },
                    packets: s.packets,
                    bytes: s.bytes,
                    new_flows: s.new_flows,
                }
            })
            .collect();
        backends.sort_by(|a, b| a.address.cmp(&b.address));
        services.push(ServiceStatus {
            name: label
                .map(|l| l.name.clone())
                .unwrap_or_else(|| format!("service {}", svc.id)),
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
            backends,
        });
    }
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

/// The sources that had the most packets dropped, and how many sources are tracked.
fn limited_sources(maps: &Maps, names: &BTreeMap<u32, String>) -> (Vec<LimitedSource>, usize) {
    let now = monotonic_ns();
    let policies: BTreeMap<u32, lb_common::Policy> = maps
        .policies
        .iter()
        .filter_map(Result::ok)
        .enumerate()
        .map(|(i, p)| (i as u32, p))
        .collect();
    let mut tracked = 0;
    let mut all: Vec<(lb_common::SourceKey, lb_common::Source)> = maps
        .sources
        .iter()
        .filter_map(Result::ok)
        .inspect(|_| tracked += 1)
        .filter(|(_, s)| s.dropped > 0)
        .collect();
    all.sort_by_key(|(_, s)| std::cmp::Reverse(s.dropped));
    let list = all
        .into_iter()
        .take(TOP_LIMITED)
        .map(|(k, s)| {
            let policy = policies.get(&k.policy);
            let tokens = |limit: &lb_common::Limit, bucket: &lb_common::Bucket| {
                (!limit.is_unlimited())
                    .then(|| (lb_common::bucket::tokens(limit, bucket, now), limit.burst))
            };
            let source = if is_overflow(&k) {
                "(table full: shared bucket)".to_string()
            } else {
                let ip = IpAddr::from(k.addr);
                match (ip, policy) {
                    (IpAddr::V6(_), Some(p)) if p.v6_prefix_len < 128 => {
                        format!("{ip}/{}", p.v6_prefix_len)
                    }
                    _ => ip.to_string(),
                }
            };
            LimitedSource {
                source,
                policy: names
                    .get(&k.policy)
                    .cloned()
                    .unwrap_or_else(|| format!("policy {}", k.policy)),
                dropped: s.dropped,
                packet_tokens: policy.and_then(|p| tokens(&p.packets, &s.packets)),
                connection_tokens: policy.and_then(|p| tokens(&p.connections, &s.connections)),
            }
        })
        .collect();
    (list, tracked)
}

fn show(addr: &Addr, port: u16) -> String {
    SocketAddr::new(IpAddr::from(*addr), port).to_string()
}

/// A table for people.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
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
    if let Some(e) = &s.last_error {
        let _ = writeln!(out, "last config rejected (previous one in force): {e}");
    }
    for i in &s.interfaces {
        let _ = writeln!(
            out,
            "  {} (ifindex {}): {} at {}{}",
            i.name,
            i.ifindex,
            i.program,
            i.hook,
            i.note
                .as_deref()
                .map(|n| format!(" — {n}"))
                .unwrap_or_default()
        );
    }
    for svc in &s.services {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{}  {}  {}{}{}",
            svc.name,
            svc.frontend.map(|f| f.to_string()).unwrap_or_default(),
            svc.mode,
            svc.policy
                .as_deref()
                .map(|p| format!("  rate-limit={p}"))
                .unwrap_or_default(),
            svc.origin
                .as_deref()
                .map(|o| format!("  ({o})"))
                .unwrap_or_default(),
        );
        let _ = writeln!(
            out,
            "  packets {}  bytes {}  replies {}  new flows {}{}",
            svc.packets,
            svc.bytes,
            svc.reply_packets,
            svc.new_flows,
            if svc.drops.is_empty() {
                String::new()
            } else {
                let d: Vec<String> = svc.drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("  drops {}", d.join(" "))
            }
        );
        let total: u64 = svc.backends.iter().map(|b| b.new_flows).sum();
        let _ = writeln!(
            out,
            "  {:<40} {:>6} {:>9} {:>12} {:>10} {:>6}",
            "backend", "weight", "state", "packets", "new flows", "share"
        );
        for b in &svc.backends {
            let share = if total > 0 {
                format!("{:.1}%", 100.0 * b.new_flows as f64 / total as f64)
            } else {
                "-".into()
            };
            let _ = writeln!(
                out,
                "  {:<40} {:>6} {:>9} {:>12} {:>10} {:>6}",
                b.address, b.weight, b.state, b.packets, b.new_flows, share
            );
        }
    }
    if !s.limited_sources.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "most-limited sources ({} tracked):", s.tracked_sources);
        let _ = writeln!(
            out,
            "  {:<44} {:<20} {:>10} {:>16} {:>16}",
            "source", "policy", "dropped", "packet tokens", "conn tokens"
        );
        let tokens = |t: Option<(u64, u64)>| {
            t.map(|(n, of)| format!("{n}/{of}"))
                .unwrap_or_else(|| "-".into())
        };
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
    if !s.counters.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "data path counters:");
        for (k, v) in &s.counters {
            let _ = writeln!(out, "  {k:<28} {v}");
        }
    }
    out
}

/// Where a flow goes and why.
#[derive(Serialize)]
pub struct FlowAnswer {
    pub flow: String,
    /// "flow-table" (an entry pins it), "affinity", "ring", or "no-service".
    pub reason: &'static str,
    pub backend: Option<String>,
    pub detail: String,
}

pub fn flow(
    paths: &Paths,
    protocol: Protocol,
    src: SocketAddr,
    dst: SocketAddr,
) -> Result<FlowAnswer> {
    let maps = Maps::open_pinned(&paths.pin_dir)?;
    let flow = format!("{protocol} {src} -> {dst}");
    let key = FlowKey::new(
        Addr::from(src.ip()),
        Addr::from(dst.ip()),
        src.port().to_be(),
        dst.port().to_be(),
        protocol.number(),
    );
    let cfg = maps.read_config();
    let now = monotonic_ns();
    if let Ok(entry) = maps.flows.get(&key, 0)
        && entry.flags & FLOW_REPLY == 0
        && cfg.is_none_or(|c| !entry.is_expired(&c, now))
    {
        let age = now.saturating_sub(entry.last_seen_ns) / 1_000_000;
        let state = if entry.flags & FLOW_CLOSING != 0 {
            ", closing"
        } else if entry.flags & FLOW_OPENING != 0 {
            ", handshake not finished"
        } else {
            ""
        };
        let snat = if entry.flags & FLOW_SNAT != 0 {
            format!(
                ", source-NATed to {}",
                show(&entry.src, u16::from_be(entry.sport))
            )
        } else {
            String::new()
        };
        return Ok(FlowAnswer {
            flow,
            reason: "flow-table",
            backend: Some(show(&entry.dst, u16::from_be(entry.dport))),
            detail: format!(
                "a live flow-table entry pins it (last packet {age} ms ago{state}{snat})"
            ),
        });
    }
    let Some(cfg) = cfg else {
        anyhow::bail!("the data path has no configuration yet");
    };
    let skey = ServiceKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        _pad: 0,
    };
    let Ok(svc) = maps.services.get(&skey, 0) else {
        return Ok(FlowAnswer {
            flow,
            reason: "no-service",
            backend: None,
            detail: format!("no service on {dst}/{protocol}"),
        });
    };
    if svc.flags & lb_common::SVC_AFFINITY != 0
        && let Ok(a) = maps.affinity.get(
            &AffinityKey {
                client: key.src,
                service: svc.id,
            },
            0,
        )
        && now.saturating_sub(a.last_seen_ns) <= u64::from(svc.affinity_timeout_s) * 1_000_000_000
        && let Ok(b) = maps.backends.get(&a.backend, 0)
        && b.flags & BACKEND_ACTIVE != 0
    {
        return Ok(FlowAnswer {
            flow,
            reason: "affinity",
            backend: Some(show(&b.addr, u16::from_be(b.port))),
            detail: format!(
                "session affinity: this client was sent there within the last {} s",
                svc.affinity_timeout_s
            ),
        });
    }
    let hash = flow_hash(
        &key.src,
        &key.dst,
        key.sport,
        key.dport,
        key.proto,
        cfg.hash_seed,
    );
    let slot = ring_slot(hash, cfg.ring_size);
    let id = maps.rings.get(&(svc.ring * cfg.ring_size + slot), 0)?;
    if id == NO_BACKEND {
        return Ok(FlowAnswer {
            flow,
            reason: "ring",
            backend: None,
            detail: format!(
                "ring slot {slot} of {} is empty: the service has no backend with weight > 0",
                cfg.ring_size
            ),
        });
    }
    let b = maps.backends.get(&id, 0)?;
    Ok(FlowAnswer {
        flow,
        reason: "ring",
        backend: Some(show(&b.addr, u16::from_be(b.port))),
        detail: format!(
            "no flow-table entry; a new flow would hash (seed {:#x}) to Maglev slot {slot} of {}, which holds this backend",
            cfg.hash_seed, cfg.ring_size
        ),
    })
}
