//! `lb-agent flow`: which backend a flow goes to, and why, read from the running agent's maps by
//! the data path's own rules: a live flow-table entry pins it; else the client's session
//! affinity ([`lb_common::affinity::sticks`]); else the Maglev ring slot its hash picks.
use std::net::SocketAddr;

use anyhow::Result;
use lb_common::{
    Addr, AffinityKey, Config, FLOW_CLOCK_SHIFT, FLOW_CLOSING, FLOW_OPENING, FLOW_REPLY, FLOW_SNAT,
    Flow, FlowAddr, FlowKey4, FlowKey6, NO_BACKEND, SVC_AFFINITY, Service, ServiceKey, V4,
    affinity, flow_clock,
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
    let (src_addr, dst_addr) = (Addr::from(src.ip()), Addr::from(dst.ip()));
    let (sport, dport) = (src.port().to_be(), dst.port().to_be());
    let cfg = maps.read_config();
    if let Some(entry) = entry(&maps, protocol, &src_addr, &dst_addr, sport, dport)
        && entry.flags & FLOW_REPLY == 0
        && cfg.is_none_or(|c| !entry.is_expired(&c, flow_clock(monotonic_ns())))
        && let Ok(b) = maps.backends.get(&entry.id(), 0)
        && b.generation == entry.generation
    {
        return Ok(pinned(flow, &entry, &b));
    }
    let Some(cfg) = cfg else {
        anyhow::bail!("the data path has no configuration yet");
    };
    let service_key = ServiceKey::new(dst_addr, dport, protocol.number());
    let Ok(svc) = maps.services.get(&service_key, 0) else {
        return Ok(FlowAnswer {
            flow,
            reason: "no-service",
            backend: None,
            detail: format!("no service on {dst}/{protocol}"),
        });
    };
    let now = monotonic_ns();
    if let Some(answer) = by_affinity(&maps, &flow, &src_addr, &svc, now) {
        return Ok(answer);
    }
    let hash = flow_hash(
        &src_addr,
        &dst_addr,
        sport,
        dport,
        protocol.number(),
        cfg.hash_seed,
    );
    by_ring(&maps, flow, hash, &svc, &cfg)
}

/// The client-side flow-table entry of a tuple, of its family's table (addresses widened).
fn entry(
    maps: &Maps,
    protocol: Protocol,
    src: &Addr,
    dst: &Addr,
    sport: u16,
    dport: u16,
) -> Option<Flow<Addr>> {
    if src.is_v4() {
        let key = FlowKey4::new(
            V4::from_addr(src),
            V4::from_addr(dst),
            sport,
            dport,
            protocol.number(),
        );
        let f = maps.flows4.get(&key, 0).ok()?;
        Some(Flow {
            last: f.last,
            flags: f.flags,
            generation: f.generation,
            port: f.port,
            id_way: f.id_way,
            addr: f.addr.to_addr(),
        })
    } else {
        let key = FlowKey6::new(*src, *dst, sport, dport, protocol.number());
        maps.flows6.get(&key, 0).ok()
    }
}

/// A live flow-table entry decides.
fn pinned(flow: String, entry: &Flow<Addr>, backend: &lb_common::Backend) -> FlowAnswer {
    let ticks = flow_clock(monotonic_ns()).wrapping_sub(entry.last);
    let age = (u64::from(ticks) << FLOW_CLOCK_SHIFT) / 1_000_000;
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
            show(&entry.addr, u16::from_be(entry.port))
        )
    };
    FlowAnswer {
        flow,
        reason: "flow-table",
        backend: Some(show(&backend.addr, u16::from_be(backend.port))),
        detail: format!("a live flow-table entry pins it (last packet {age} ms ago{state}{snat})"),
    }
}

/// The client's affinity entry decides, if it sticks.
fn by_affinity(
    maps: &Maps,
    flow: &str,
    client: &Addr,
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
                client: *client,
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
    hash: u32,
    svc: &Service,
    cfg: &Config,
) -> Result<FlowAnswer> {
    let slot = ring_slot(hash, svc.ring_size);
    let id = maps.rings.get(&(svc.ring + slot), 0)?;
    if id == NO_BACKEND {
        return Ok(FlowAnswer {
            flow,
            reason: "ring",
            backend: None,
            detail: format!(
                "ring slot {slot} of {} is empty: the service has no backend with weight > 0",
                svc.ring_size
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
            cfg.hash_seed, svc.ring_size
        ),
    })
}
