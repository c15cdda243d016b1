//! `lb-agent flow`: which backend a flow goes to, and why, read from the running agent's maps by
//! the data path's own rules: a live flow-table entry pins it; else the client's session
//! affinity ([`lb_common::affinity::sticks`]); else the Maglev ring slot its hash picks.
use std::net::SocketAddr;

use anyhow::Result;
use lb_common::{
    Addr, AffinityKey, Config, FLOW_CLOSING, FLOW_OPENING, FLOW_REPLY, FLOW_SNAT, Flow, FlowKey,
    NO_BACKEND, SVC_AFFINITY, Service, ServiceKey, affinity,
    hash::{flow_hash, ring_slot},
};
use serde::Serialize;

use crate::{
    cli::Paths,
    dataplane::Maps,
    model::Protocol,
    status::{open_maps, show},
    system::monotonic_ns,
};

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
    let maps = open_maps(paths)?;
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
        return Ok(pinned(flow, &entry, now));
    }
    let Some(cfg) = cfg else {
        anyhow::bail!("the data path has no configuration yet");
    };
    let service_key = ServiceKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        _pad: 0,
    };
    let Ok(svc) = maps.services.get(&service_key, 0) else {
        return Ok(FlowAnswer {
            flow,
            reason: "no-service",
            backend: None,
            detail: format!("no service on {dst}/{protocol}"),
        });
    };
    if let Some(answer) = by_affinity(&maps, &flow, &key, &svc, now) {
        return Ok(answer);
    }
    by_ring(&maps, flow, &key, &svc, &cfg)
}

/// A live flow-table entry decides.
fn pinned(flow: String, entry: &Flow, now: u64) -> FlowAnswer {
    let age = now.saturating_sub(entry.last_seen_ns) / 1_000_000;
    let state = if entry.flags & FLOW_CLOSING != 0 {
        ", closing"
    } else if entry.flags & FLOW_OPENING != 0 {
        ", handshake not finished"
    } else {
        ""
    };
    let snat = if entry.flags & FLOW_SNAT == 0 {
        String::new()
    } else {
        format!(
            ", source-NATed to {}",
            show(&entry.src, u16::from_be(entry.sport))
        )
    };
    FlowAnswer {
        flow,
        reason: "flow-table",
        backend: Some(show(&entry.dst, u16::from_be(entry.dport))),
        detail: format!("a live flow-table entry pins it (last packet {age} ms ago{state}{snat})"),
    }
}

/// The client's affinity entry decides, if it sticks.
fn by_affinity(
    maps: &Maps,
    flow: &str,
    key: &FlowKey,
    svc: &Service,
    now: u64,
) -> Option<FlowAnswer> {
    if svc.flags & SVC_AFFINITY == 0 {
        return None;
    }
    let entry = maps
        .affinity
        .get(
            &AffinityKey {
                client: key.src,
                service: svc.id,
            },
            0,
        )
        .ok()?;
    let b = maps.backends.get(&entry.backend, 0).ok()?;
    affinity::sticks(&entry, &b, svc, now).then(|| FlowAnswer {
        flow: flow.to_string(),
        reason: "affinity",
        backend: Some(show(&b.addr, u16::from_be(b.port))),
        detail: format!(
            "session affinity: this client was sent there within the last {} s",
            svc.affinity_timeout_s
        ),
    })
}

/// The ring slot the flow hashes to decides.
fn by_ring(
    maps: &Maps,
    flow: String,
    key: &FlowKey,
    svc: &Service,
    cfg: &Config,
) -> Result<FlowAnswer> {
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
