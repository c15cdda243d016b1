//! Garbage collection the data path leaves to the agent: flow-table entries that are over. The
//! data path already treats them as absent; deleting them frees room in the LRU tables. Each
//! entry expires on its own timeout.
//!
//! Snat flows' reply entries need no sweep: they live in claim slots (see lb_common::Claim),
//! which the data path claims again for a new flow once their entry is over (a port the
//! backend may still hold in TIME_WAIT stays claimed that long). Nor do rate-limit sources: the
//! data path gives the slot of a source that has refilled and been quiet to the next new source
//! (see lb_common::SourceTags).
use std::collections::BTreeMap;

use lb_common::{Addr, Backend, FLOW_REPLY, FLOW_RESET, FlowAddr, flow_clock};

use crate::tables::{FlowEntry, Tables};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SweepReport {
    pub flows: usize,
    pub flows_removed: usize,
    /// Tracked rate-limit sources.
    pub sources: usize,
}

pub fn sweep(tables: &mut dyn Tables, now_ns: u64) -> SweepReport {
    let mut report = SweepReport::default();
    let Some(cfg) = tables.config() else {
        return report;
    };
    let now = flow_clock(now_ns);
    let mut expired = Vec::new();
    tables.for_each_flow(&mut |e| {
        report.flows += 1;
        let over = match e {
            FlowEntry::V4(_, f) => f.is_expired(&cfg, now),
            FlowEntry::V6(_, f) => f.is_expired(&cfg, now),
        };
        if over {
            expired.push(e.id());
        }
    });
    for id in &expired {
        if tables.remove_flow(id).unwrap_or(false) {
            report.flows_removed += 1;
        }
    }
    tables.for_each_source(&mut |_| report.sources += 1);
    report
}

/// One service's flows to one backend, to be ended (its deregistration delay is over).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ending {
    pub service: u32,
    pub backend: Addr,
    /// Host order.
    pub port: u16,
    /// Answer the client's next packet with a TCP RST; else the flows are forgotten (their next
    /// packet is a new flow, to a current backend).
    pub reset: bool,
}

/// Ends the flows of each of `endings`, in one pass over the flow tables for all of them (a
/// rolling restart ends thousands of backends in one tick: a pass each made every apply wait
/// behind thousands of passes). Returns how many flows each ended, in order.
pub fn end_flows(tables: &mut dyn Tables, endings: &[Ending]) -> Vec<usize> {
    let mut ended = vec![0; endings.len()];
    if endings.is_empty() {
        return ended;
    }
    // (service, backend, port in network order) -> its index in `endings`.
    let wanted: BTreeMap<(u32, Addr, u16), usize> = endings
        .iter()
        .enumerate()
        .map(|(i, e)| ((e.service, e.backend, e.port.to_be()), i))
        .collect();
    // Client-side entries name their backend by id: each read once.
    let mut backends: BTreeMap<u32, Option<usize>> = BTreeMap::new();
    let mut all = Vec::new();
    tables.for_each_flow(&mut |e| all.push(*e));
    let mut found = Vec::new();
    for e in all {
        let (flags, id, src, sport) = match &e {
            FlowEntry::V4(k, f) => (f.flags, f.id(), k.src.to_addr(), k.sport),
            FlowEntry::V6(k, f) => (f.flags, f.id(), k.src, k.sport),
        };
        let client_side = flags & FLOW_REPLY == 0;
        let which = if client_side {
            *backends.entry(id).or_insert_with(|| {
                tables
                    .backend(id)
                    .and_then(|b: Backend| wanted.get(&(b.service, b.addr, b.port)).copied())
            })
        } else {
            // Backend to client: keyed by the backend, names the service.
            wanted.get(&(id, src, sport)).copied()
        };
        if let Some(i) = which {
            found.push((i, client_side, e));
        }
    }
    for (i, client_side, e) in found {
        if client_side {
            ended[i] += 1;
        }
        let done = if endings[i].reset && client_side {
            let e = match e {
                FlowEntry::V4(k, mut f) => {
                    f.flags |= FLOW_RESET;
                    FlowEntry::V4(k, f)
                }
                FlowEntry::V6(k, mut f) => {
                    f.flags |= FLOW_RESET;
                    FlowEntry::V6(k, f)
                }
            };
            tables.set_flow(&e)
        } else {
            tables.remove_flow(&e.id()).map(drop)
        };
        if let Err(e) = done {
            log::debug!("ending a flow: {e}");
        }
    }
    ended
}

#[cfg(test)]
mod tests {
    use lb_common::{
        BACKEND_LISTED, Config, FLOW_CLOSING, FLOW_OPENING, FLOW_TCP, Flow4, FlowKey4, IPPROTO_TCP,
        V4, flow_ticks,
    };

    use super::*;
    use crate::tables::{MemoryTables, Write};

    const S: u64 = 1_000_000_000;

    fn tables() -> MemoryTables {
        let mut t = MemoryTables {
            config: Some(Config {
                tcp_idle: flow_ticks(350 * S),
                udp_idle: flow_ticks(120 * S),
                tcp_closing: flow_ticks(10 * S),
                tcp_handshake: flow_ticks(60 * S),
                tcp_time_wait: flow_ticks(60 * S),
                source_sets: 1,
                ..Config::default()
            }),
            ..MemoryTables::default()
        };
        for (id, last) in [(2u32, 2u8), (9, 9)] {
            t.backends.insert(
                id,
                Backend {
                    addr: addr(last),
                    port: 8080u16.to_be(),
                    flags: BACKEND_LISTED,
                    service: 1,
                    ..Backend::default()
                },
            );
        }
        t
    }

    fn addr(last: u8) -> Addr {
        Addr::v4([10, 0, 0, last])
    }

    fn v4(last: u8) -> V4 {
        V4::from_addr(&addr(last))
    }

    /// A flow from client `client` to backend id `backend` (10.0.0.<id>:8080) that keeps the
    /// client's address (a snat flow's reply entry is in a claim slot, not the flow table): its
    /// client-side entry (flags `flags`) and its reply entry (flags `reply_flags`), both last
    /// seen at `last_ns`.
    fn flow_pair(
        t: &mut MemoryTables,
        client: u8,
        backend: u8,
        flags: u8,
        reply_flags: u8,
        last_ns: u64,
    ) {
        let last = flow_clock(last_ns);
        let key = FlowKey4::new(
            v4(client),
            v4(100),
            40000u16.to_be(),
            80u16.to_be(),
            IPPROTO_TCP,
        );
        let out = Flow4 {
            last,
            flags: flags | FLOW_TCP,
            generation: 0,
            port: key.sport,
            id_way: u32::from(backend),
            addr: key.src,
        };
        let reply_key = FlowKey4::new(
            v4(backend),
            key.src,
            8080u16.to_be(),
            key.sport,
            IPPROTO_TCP,
        );
        let reply = Flow4 {
            last,
            flags: reply_flags | FLOW_TCP | FLOW_REPLY,
            generation: 0,
            port: key.sport,
            id_way: 1,
            addr: key.src,
        };
        for e in [FlowEntry::V4(key, out), FlowEntry::V4(reply_key, reply)] {
            t.flows.insert(e.id(), e);
        }
    }

    #[test]
    fn each_entry_goes_when_its_own_timeout_runs_out() {
        let mut t = tables();
        let now = 1000 * S;
        flow_pair(&mut t, 1, 2, 0, 0, now - S); // live
        // The client closed first 11 s ago: both entries are over.
        flow_pair(&mut t, 3, 2, FLOW_CLOSING, FLOW_CLOSING, now - 11 * S);
        // The client closed 11 s ago, the backend's last packet (its FIN) came 9 s ago.
        flow_pair(&mut t, 4, 2, FLOW_CLOSING, 0, now - 11 * S);
        let fin = t
            .flows
            .values_mut()
            .find_map(|e| match e {
                FlowEntry::V4(k, f) if f.flags & FLOW_REPLY != 0 && k.dst == v4(4) => Some(f),
                _ => None,
            })
            .unwrap();
        fin.flags |= FLOW_CLOSING;
        fin.last = flow_clock(now - 9 * S);
        // A handshake that never finished: both entries were opening, both go after 60 s.
        flow_pair(&mut t, 5, 2, FLOW_OPENING, FLOW_OPENING, now - 61 * S);
        let report = sweep(&mut t, now);
        assert_eq!(report.flows, 8);
        assert_eq!(report.flows_removed, 5, "{:?}", t.log);
        assert_eq!(t.flows.len(), 3);
        assert!(t.log.iter().all(|w| matches!(w, Write::RemoveFlow(_))));
        let late_fin = t.flows.values().any(|e| match e {
            FlowEntry::V4(k, f) => f.flags & FLOW_REPLY != 0 && k.dst == v4(4),
            FlowEntry::V6(..) => false,
        });
        assert!(late_fin, "the reply entry whose FIN came later stays");
    }

    #[test]
    fn ending_a_backends_flows_resets_or_forgets_them() {
        let mut t = tables();
        flow_pair(&mut t, 1, 2, 0, 0, 0);
        flow_pair(&mut t, 3, 9, 0, 0, 0);
        let ending = |last, reset| Ending {
            service: 1,
            backend: addr(last),
            port: 8080,
            reset,
        };
        assert_eq!(end_flows(&mut t, &[ending(2, true)]), [1]);
        let reset = t.flows.values().any(|e| match e {
            FlowEntry::V4(_, f) => {
                f.flags & FLOW_REPLY == 0 && f.id() == 2 && f.flags & FLOW_RESET != 0
            }
            FlowEntry::V6(..) => false,
        });
        assert!(reset, "answered with a RST");
        assert_eq!(t.flows.len(), 3, "the reply entry of the reset flow went");
        assert_eq!(end_flows(&mut t, &[ending(9, false)]), [1]);
        assert_eq!(t.flows.len(), 1);
    }

    #[test]
    fn ending_many_backends_takes_one_pass_and_counts_each() {
        let mut t = tables();
        flow_pair(&mut t, 1, 2, 0, 0, 0);
        flow_pair(&mut t, 3, 9, 0, 0, 0);
        flow_pair(&mut t, 4, 9, 0, 0, 0);
        let ending = |last, service| Ending {
            service,
            backend: addr(last),
            port: 8080,
            reset: false,
        };
        // Another service's flows to the same backend are not this ending's.
        assert_eq!(
            end_flows(&mut t, &[ending(9, 1), ending(2, 7), ending(2, 1)]),
            [2, 0, 1]
        );
        assert!(t.flows.is_empty());
    }
}
