//! Garbage collection the data path leaves to the agent: flow entries that are over (the data
//! path already treats them as absent and reclaims a snat port's entry on the spot when it
//! needs the port; deleting them frees memory for the LRU). Each entry expires on its own
//! timeout: a snat flow's reply entry holds its port through the backend's TIME_WAIT.
//!
//! Rate-limit sources need no sweep: the data path reuses the slot of a source that has
//! refilled and been quiet (see lb_common::SourceSet).
use lb_common::{
    Addr, Config, FLOW_REPLY, FLOW_RESET, Flow, FlowAddr, FlowKey, Source, flow_clock,
};

use crate::dataplane::Maps;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SweepReport {
    pub flows: usize,
    pub flows_removed: usize,
    /// Tracked rate-limit sources.
    pub sources: usize,
}

pub fn sweep(maps: &mut Maps, now_ns: u64) -> SweepReport {
    let mut report = SweepReport::default();
    let Some(cfg) = maps.read_config() else {
        return report;
    };
    let now = flow_clock(now_ns);
    sweep_table(&mut maps.flows4, &cfg, now, &mut report);
    sweep_table(&mut maps.flows6, &cfg, now, &mut report);
    report.sources = maps.read_sources().len();
    report
}

fn sweep_table<A: FlowAddr>(
    table: &mut aya::maps::HashMap<aya::maps::MapData, FlowKey<A>, Flow<A>>,
    cfg: &Config,
    now: u32,
    report: &mut SweepReport,
) where
    FlowKey<A>: aya::Pod,
    Flow<A>: aya::Pod,
{
    let mut expired = Vec::new();
    for (key, flow) in table.iter().filter_map(Result::ok) {
        report.flows += 1;
        if flow.is_expired(cfg, now) {
            expired.push(key);
        }
    }
    for k in &expired {
        if table.remove(k).is_ok() {
            report.flows_removed += 1;
        }
    }
}

/// Ends the flows of one service that go to one backend (its deregistration delay is over):
/// with `reset`, the client's next packet is answered with a TCP RST; else the flows are
/// forgotten (their next packet is a new flow, to a current backend). Returns how many flows.
pub fn end_flows(maps: &mut Maps, service: u32, backend: Addr, port: u16, reset: bool) -> usize {
    let port = port.to_be();
    // The backend's ids in this service (one, unless it was removed and added again).
    let ids: Vec<u32> = maps
        .backends
        .iter()
        .enumerate()
        .filter_map(|(id, b)| Some((id as u32, b.ok()?)))
        .filter(|(_, b)| b.service == service && b.addr == backend && b.port == port)
        .map(|(id, _)| id)
        .collect();
    let mut ended = end_in(&mut maps.flows4, service, &ids, &backend, port, reset);
    ended += end_in(&mut maps.flows6, service, &ids, &backend, port, reset);
    ended
}

fn end_in<A: FlowAddr>(
    table: &mut aya::maps::HashMap<aya::maps::MapData, FlowKey<A>, Flow<A>>,
    service: u32,
    ids: &[u32],
    backend: &Addr,
    port: u16,
    reset: bool,
) -> usize
where
    FlowKey<A>: aya::Pod,
    Flow<A>: aya::Pod,
{
    let mut ended = 0;
    let matching: Vec<(FlowKey<A>, Flow<A>)> = table
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, f)| {
            if f.flags & FLOW_REPLY == 0 {
                // Client to backend: names the backend's id.
                ids.contains(&f.id)
            } else {
                // Backend to client: keyed by the backend.
                f.id == service && k.src.to_addr() == *backend && k.sport == port
            }
        })
        .collect();
    for (key, mut flow) in matching {
        if flow.flags & FLOW_REPLY == 0 {
            ended += 1;
        }
        let done = if reset && flow.flags & FLOW_REPLY == 0 {
            flow.flags |= FLOW_RESET;
            table.insert(key, flow, 0)
        } else {
            table.remove(&key)
        };
        if let Err(e) = done {
            log::debug!("ending a flow: {e}");
        }
    }
    ended
}

/// Sources the data path tracks (for counts).
pub fn tracked_sources(maps: &Maps) -> Vec<Source> {
    maps.read_sources()
}
