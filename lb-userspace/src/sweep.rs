//! Garbage collection the data path leaves to the agent: flow entries that are over (the data
//! path already treats them as absent; deleting them frees memory and snat ports) and source
//! buckets that have refilled (a full bucket is the same as no entry, so removing one never
//! changes a limit; this is what keeps the source table from filling up for good).
//!
//! A refilled source stays while it is active (a packet in the last [`SOURCE_KEEP`]): under a
//! flood of spoofed sources that fills the table, the clients in the middle of talking keep
//! their entries, so their new connections draw on their own buckets and not on the shared
//! overflow bucket the flood drains. The spoofed ones, each seen once, go at the next sweep
//! after that.
use lb_common::{
    Addr, Bucket, FLOW_OPENING, FLOW_REPLY, FLOW_RESET, FlowKey, Limit, SourceKey, bucket::tokens,
};

use crate::dataplane::Maps;

/// Sources with this address are the shared overflow buckets of fail-closed policies.
const OVERFLOW: [u8; 16] = [0xff; 16];

/// How long a refilled source's entry stays after its last packet.
pub const SOURCE_KEEP: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SweepReport {
    pub flows: usize,
    pub flows_removed: usize,
    pub sources: usize,
    pub sources_removed: usize,
}

pub fn sweep(maps: &mut Maps, now_ns: u64) -> SweepReport {
    let mut report = SweepReport::default();
    let Some(cfg) = maps.read_config() else {
        return report;
    };
    let mut expired: Vec<FlowKey> = Vec::new();
    for (key, flow) in maps.flows.iter().filter_map(Result::ok) {
        report.flows += 1;
        if flow.is_expired(&cfg, now_ns) {
            expired.push(key);
            // A handshake that never finished: the reply entry goes too (it would otherwise
            // hold its snat port for the idle timeout), the backend's SYN-ACKs refresh it.
            if flow.flags & FLOW_OPENING != 0 {
                expired.push(flow.peer_key());
            }
        }
    }
    for k in &expired {
        if maps.flows.remove(k).is_ok() {
            report.flows_removed += 1;
        }
    }

    let policies: Vec<lb_common::Policy> = maps.policies.iter().filter_map(Result::ok).collect();
    let full =
        |limit: &Limit, b: &Bucket| limit.is_unlimited() || tokens(limit, b, now_ns) >= limit.burst;
    let keep_ns = SOURCE_KEEP.as_nanos() as i64;
    // Signed: the data path's clock may be a little ahead of ours.
    let quiet = |b: &Bucket| now_ns.wrapping_sub(b.last_ns) as i64 >= keep_ns;
    let idle: Vec<SourceKey> = maps
        .sources
        .iter()
        .filter_map(Result::ok)
        .inspect(|_| report.sources += 1)
        .filter(|(k, s)| {
            k.addr.0 != OVERFLOW
                && quiet(&s.packets)
                && quiet(&s.connections)
                && policies.get(k.policy as usize).is_some_and(|p| {
                    full(&p.packets, &s.packets) && full(&p.connections, &s.connections)
                })
        })
        .map(|(k, _)| k)
        .collect();
    for k in &idle {
        if maps.sources.remove(k).is_ok() {
            report.sources_removed += 1;
        }
    }
    report
}

/// Ends the flows of one service that go to one backend (its deregistration delay is over):
/// with `reset`, the client's next packet is answered with a TCP RST; else the flows are
/// forgotten (their next packet is a new flow, to a current backend). Returns how many flows.
pub fn end_flows(maps: &mut Maps, service: u32, backend: Addr, port: u16, reset: bool) -> usize {
    let port = port.to_be();
    let mut ended = 0;
    let matching: Vec<(FlowKey, lb_common::Flow)> = maps
        .flows
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, f)| {
            f.service == service
                && if f.flags & FLOW_REPLY == 0 {
                    // Client to backend: rewritten to the backend.
                    f.dst == backend && f.dport == port
                } else {
                    // Backend to client: keyed by the backend.
                    k.src == backend && k.sport == port
                }
        })
        .collect();
    for (key, mut flow) in matching {
        if flow.flags & FLOW_REPLY == 0 {
            ended += 1;
        }
        let done = if reset && flow.flags & FLOW_REPLY == 0 {
            flow.flags |= FLOW_RESET;
            maps.flows.insert(key, flow, 0)
        } else {
            maps.flows.remove(&key)
        };
        if let Err(e) = done {
            log::debug!("ending a flow: {e}");
        }
    }
    ended
}
