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
    Addr, Bucket, FLOW_OPENING, FLOW_REPLY, FLOW_RESET, Flow, FlowKey, Limit, SourceKey,
    bucket::tokens, sources::is_overflow,
};

use crate::tables::Tables;

/// How long a refilled source's entry stays after its last packet.
pub const SOURCE_KEEP: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SweepReport {
    pub flows: usize,
    pub flows_removed: usize,
    pub sources: usize,
    pub sources_removed: usize,
}

pub fn sweep(tables: &mut dyn Tables, now_ns: u64) -> SweepReport {
    let mut report = SweepReport::default();
    let Some(cfg) = tables.config() else {
        return report;
    };
    let mut expired: Vec<FlowKey> = Vec::new();
    tables.for_each_flow(&mut |key, flow| {
        report.flows += 1;
        if flow.is_expired(&cfg, now_ns) {
            expired.push(*key);
            // A handshake that never finished: the reply entry goes too (it would otherwise
            // hold its snat port for the idle timeout), the backend's SYN-ACKs refresh it.
            if flow.flags & FLOW_OPENING != 0 {
                expired.push(flow.peer_key());
            }
        }
    });
    for k in &expired {
        if tables.remove_flow(k).unwrap_or(false) {
            report.flows_removed += 1;
        }
    }

    let policies = tables.policies();
    let full =
        |limit: &Limit, b: &Bucket| limit.is_unlimited() || tokens(limit, b, now_ns) >= limit.burst;
    let keep_ns = i64::try_from(SOURCE_KEEP.as_nanos()).unwrap_or(i64::MAX);
    // Signed: the data path's clock may be a little ahead of ours.
    let quiet = |b: &Bucket| now_ns.wrapping_sub(b.last_ns).cast_signed() >= keep_ns;
    let mut idle: Vec<SourceKey> = Vec::new();
    tables.for_each_source(&mut |k, s| {
        report.sources += 1;
        let refilled = policies
            .get(k.policy as usize)
            .is_some_and(|p| full(&p.packets, &s.packets) && full(&p.connections, &s.connections));
        if !is_overflow(k) && quiet(&s.packets) && quiet(&s.connections) && refilled {
            idle.push(*k);
        }
    });
    for k in &idle {
        if tables.remove_source(k).is_ok() {
            report.sources_removed += 1;
        }
    }
    report
}

/// Ends the flows of one service that go to one backend (its deregistration delay is over):
/// with `reset`, the client's next packet is answered with a TCP RST; else the flows are
/// forgotten (their next packet is a new flow, to a current backend). Returns how many flows.
pub fn end_flows(
    tables: &mut dyn Tables,
    service: u32,
    backend: Addr,
    port: u16,
    reset: bool,
) -> usize {
    let port = port.to_be();
    let mut matching: Vec<(FlowKey, Flow)> = Vec::new();
    tables.for_each_flow(&mut |k, f| {
        let to_backend = if f.flags & FLOW_REPLY == 0 {
            // Client to backend: rewritten to the backend.
            f.dst == backend && f.dport == port
        } else {
            // Backend to client: keyed by the backend.
            k.src == backend && k.sport == port
        };
        if f.service == service && to_backend {
            matching.push((*k, *f));
        }
    });
    let mut ended = 0;
    for (key, mut flow) in matching {
        let client_side = flow.flags & FLOW_REPLY == 0;
        if client_side {
            ended += 1;
        }
        let done = if reset && client_side {
            flow.flags |= FLOW_RESET;
            tables.set_flow(&key, &flow)
        } else {
            tables.remove_flow(&key).map(drop)
        };
        if let Err(e) = done {
            log::debug!("ending a flow: {e}");
        }
    }
    ended
}

#[cfg(test)]
mod tests {
    use lb_common::{Config, FLOW_CLOSING, IPPROTO_TCP, Policy, Source, sources::overflow_key};

    use super::*;
    use crate::tables::{MemoryTables, Write};

    const S: u64 = 1_000_000_000;

    fn tables() -> MemoryTables {
        MemoryTables {
            config: Some(Config {
                ring_size: 251,
                tcp_idle_ns: 350 * S,
                udp_idle_ns: 120 * S,
                tcp_closing_ns: 10 * S,
                tcp_handshake_ns: 60 * S,
                ..Config::default()
            }),
            ..MemoryTables::default()
        }
    }

    fn addr(last: u8) -> Addr {
        Addr::v4([10, 0, 0, last])
    }

    /// A client->backend entry and its reply entry.
    fn flow_pair(t: &mut MemoryTables, client: u8, backend: u8, flags: u8, last_seen_ns: u64) {
        let key = FlowKey::new(addr(client), addr(100), 40000, 80, IPPROTO_TCP);
        let out = Flow {
            src: addr(client),
            dst: addr(backend),
            sport: 40000,
            dport: 8080u16.to_be(),
            service: 1,
            flags,
            proto: IPPROTO_TCP,
            last_seen_ns,
            ..Flow::default()
        };
        let reply = Flow {
            flags: flags | FLOW_REPLY,
            ..out
        };
        t.flows.insert(key, out);
        t.flows.insert(out.peer_key(), reply);
    }

    #[test]
    fn finished_flows_go_and_a_half_open_ones_reply_goes_with_it() {
        let mut t = tables();
        let now = 1000 * S;
        flow_pair(&mut t, 1, 2, 0, now - S); // live
        flow_pair(&mut t, 3, 2, FLOW_CLOSING, now - 11 * S); // closed 11 s ago
        // Only the client side of a half-open flow is marked opening.
        let opening_key = FlowKey::new(addr(5), addr(100), 40000, 80, IPPROTO_TCP);
        flow_pair(&mut t, 5, 2, 0, now - 61 * S);
        t.flows.get_mut(&opening_key).unwrap().flags |= FLOW_OPENING;
        let report = sweep(&mut t, now);
        assert_eq!(report.flows, 6);
        // Closed: its two entries each expire on their own; opening: the reply goes with it
        // (its own timeout, the idle one, has not run out).
        assert_eq!(report.flows_removed, 4, "{:?}", t.log);
        assert_eq!(t.flows.len(), 2);
        assert!(t.log.iter().all(|w| matches!(w, Write::RemoveFlow(_))));
    }

    #[test]
    fn refilled_quiet_sources_go_and_overflow_buckets_stay() {
        let mut t = tables();
        let limit = Limit::new(10, 10).unwrap();
        t.policies.insert(
            1,
            Policy {
                packets: limit,
                connections: Limit::UNLIMITED,
                ..Policy::default()
            },
        );
        let now = 1000 * S;
        let source = |last_ns| Source {
            packets: Bucket::full(&limit, last_ns),
            connections: Bucket::default(),
            dropped: 0,
        };
        let quiet = SourceKey {
            addr: addr(1),
            policy: 1,
        };
        let active = SourceKey {
            addr: addr(2),
            policy: 1,
        };
        t.sources.insert(quiet, source(now - 20 * S));
        t.sources.insert(active, source(now - S));
        t.sources.insert(overflow_key(1), source(now - 20 * S));
        let report = sweep(&mut t, now);
        assert_eq!((report.sources, report.sources_removed), (3, 1));
        assert!(!t.sources.contains_key(&quiet));
        assert!(t.sources.contains_key(&active), "active in the last 10 s");
        assert!(t.sources.contains_key(&overflow_key(1)));
    }

    #[test]
    fn ending_a_backends_flows_resets_or_forgets_them() {
        let mut t = tables();
        flow_pair(&mut t, 1, 2, 0, 0);
        flow_pair(&mut t, 3, 9, 0, 0);
        assert_eq!(end_flows(&mut t, 1, addr(2), 8080, true), 1);
        let client_side = t
            .flows
            .values()
            .find(|f| f.flags & FLOW_REPLY == 0 && f.dst == addr(2))
            .unwrap();
        assert_ne!(client_side.flags & FLOW_RESET, 0, "answered with a RST");
        assert_eq!(t.flows.len(), 3, "the reply entry of the reset flow went");
        assert_eq!(end_flows(&mut t, 1, addr(9), 8080, false), 1);
        assert_eq!(t.flows.len(), 1);
    }
}
