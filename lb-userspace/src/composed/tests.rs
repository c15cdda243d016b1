//! Tests of composing and applying: the kept counts and changed frontends against a recount,
//! and the frontend-by-frontend path against the whole-state one after random changes.
use std::time::Instant;

use super::*;
use crate::k8s::{
    Cluster, Translation, Translator,
    tests::{Dice, VIPS, World, node},
};
use crate::model::{Backend, Mode, Policy, Protocol};

fn service(port: u16, backends: &[(u8, u32)]) -> Service {
    Service {
        name: format!("s{port}"),
        origin: "test".into(),
        frontend: Frontend {
            vip: "10.96.0.10".parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        },
        mode: Mode::Snat,
        backends: backends
            .iter()
            .map(|(last, weight)| Backend {
                addr: IpAddr::from([10, 1, 0, *last]),
                port: 8080,
                weight: *weight,
            })
            .collect(),
        policy: None,
        affinity: None,
        source_ranges: crate::model::SourceRanges::default(),
    }
}

#[test]
fn changed_services_and_kept_backend_counts_equal_a_recount_after_any_changes() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut roll = |n: u8| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        u8::try_from(seed % u64::from(n)).expect("below n")
    };
    let mut old = Desired::default();
    let mut counts = count_backend_addrs(&old);
    for _ in 0..2000 {
        let mut new = old.clone();
        for _ in 0..=roll(3) {
            let port = 80 + u16::from(roll(8));
            if roll(4) == 0 {
                new.services.retain(|f, _| f.port != port);
            } else {
                let backends: Vec<(u8, u32)> = (0..roll(4))
                    .map(|_| (roll(6), u32::from(roll(2))))
                    .collect();
                let s = service(port, &backends);
                new.services.insert(s.frontend, Arc::new(s));
            }
        }
        let changed = changed_services(&old, &new);
        let expected: Vec<Frontend> = old
            .services
            .keys()
            .chain(new.services.keys())
            .filter(|f| old.services.get(f) != new.services.get(f))
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(changed, expected);
        add_backend_addrs(&mut counts, backend_addrs_delta(&old, &new, &changed));
        assert_eq!(counts, count_backend_addrs(&new));
        old = new;
    }
}

/// The maps as two pipelines must leave them alike (overflow buckets carry the time they were
/// filled: only which there are).
fn maps(t: &crate::tables::MemoryTables) -> String {
    format!(
        "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        t.config,
        t.filter,
        t.addrs,
        t.services,
        t.backends,
        t.rings,
        t.policies,
        t.prefixes,
        t.overflow.keys().collect::<Vec<_>>(),
        t.service_info
    )
}

/// One way from the cluster to the maps: what `composed::apply` keeps, the reconciler, maps.
struct Pipeline {
    last: Option<crate::composed::Composed>,
    applied: crate::model::Desired,
    reconciler: crate::reconcile::Reconciler,
    tables: crate::tables::MemoryTables,
    /// The backend addresses of the state the node's view was last asked for.
    addrs: Option<BTreeSet<std::net::IpAddr>>,
}

impl Pipeline {
    fn new() -> Pipeline {
        // Room for a few services: overflow, waiting and retries are common.
        let sizes = crate::dataplane::Sizes {
            max_services: 9,
            max_backends: 14,
            ring_size: 251,
            ..Default::default()
        };
        Pipeline {
            last: None,
            applied: crate::model::Desired::default(),
            reconciler: crate::reconcile::Reconciler::new(sizes),
            tables: crate::tables::MemoryTables::default(),
            addrs: None,
        }
    }

    fn apply(
        &mut self,
        file: &crate::model::Desired,
        t: &Translation,
        view: &crate::node::NodeView,
    ) -> (String, (bool, bool)) {
        let inputs = crate::composed::Inputs {
            file,
            kube: Some(t),
        };
        let writer = crate::composed::Writer {
            reconciler: &mut self.reconciler,
            tables: &mut self.tables,
        };
        // The addresses handed with the state are those that came and went since the last
        // state the view was asked for.
        let seen = &mut self.addrs;
        let mut node_view = |d: &crate::model::Desired, addrs: crate::composed::Addrs| {
            let now = crate::node::backend_addrs(d);
            if let Some(before) = seen.as_ref() {
                match addrs {
                    crate::composed::Addrs::Same => assert_eq!(&now, before),
                    crate::composed::Addrs::Changed { came, went } => {
                        let new: Vec<_> = now.difference(before).copied().collect();
                        let old: Vec<_> = before.difference(&now).copied().collect();
                        assert_eq!((came, went), (new, old));
                    }
                    crate::composed::Addrs::All => {}
                }
            } else {
                assert_eq!(
                    addrs,
                    crate::composed::Addrs::All,
                    "the first view is read whole"
                );
            }
            *seen = Some(now);
            Ok(view.clone())
        };
        match crate::composed::apply(
            &mut self.last,
            &mut self.applied,
            &inputs,
            writer,
            &mut node_view,
        ) {
            Ok(o) => (
                format!("{:?}\n{:?}\n{:?}", o.report, o.problems, o.not_served),
                (o.incremental, !o.not_served.is_empty()),
            ),
            Err(e) => (format!("error: {e}"), (false, false)),
        }
    }
}

/// A config-file service on a frontend the cluster's Services may claim too.
fn file_service(vip: &str, port: u16) -> Service {
    Service {
        name: format!("file-{port}"),
        origin: crate::model::Origin::File {
            path: "node.toml".into(),
            line: usize::from(port),
        },
        frontend: Frontend {
            vip: vip.parse().unwrap(),
            port,
            protocol: crate::model::Protocol::Tcp,
        },
        mode: Mode::Snat,
        backends: vec![Backend {
            addr: "10.2.0.1".parse().unwrap(),
            port: 8080,
            weight: 1,
        }],
        policy: None,
        affinity: None,
        source_ranges: crate::model::SourceRanges::default(),
    }
}

/// How the incremental pipeline `a` differs from the whole-state one `b` after the same
/// change, and from the state composed from scratch (`fresh`).
fn difference(
    (a, got_a): (&Pipeline, &str),
    (b, got_b): (&Pipeline, &str),
    fresh: &crate::model::Desired,
) -> Option<String> {
    let composed = |p: &Pipeline| p.last.as_ref().map(|c| format!("{:?}", c.desired));
    if got_a != got_b {
        Some(format!("outcome:\n{got_a}\nvs\n{got_b}"))
    } else if a.applied != b.applied {
        Some(format!("applied:\n{:?}\nvs\n{:?}", a.applied, b.applied))
    } else if composed(a).is_some_and(|c| c != format!("{fresh:?}")) {
        Some("composed state differs from one composed from scratch".into())
    } else if maps(&a.tables) != maps(&b.tables) {
        Some(format!(
            "maps:\n{}\nvs\n{}",
            maps(&a.tables),
            maps(&b.tables)
        ))
    } else {
        None
    }
}

/// Drives random changes (Services and slices written and deleted, claims of one frontend by
/// several Services and by the config file, reserved addresses, node changes, drains that run
/// out, more services than the maps hold) through a pipeline that applies each change of the
/// translation frontend by frontend and one that applies the whole state each time; returns the
/// first difference, or how many changes went frontend by frontend, and how many of those with
/// services not served. With `broken`, the incremental one is told one changed frontend less
/// than there is.
fn compare_pipelines(
    seeds: std::ops::RangeInclusive<u64>,
    broken: bool,
) -> Result<(usize, usize), String> {
    let (mut incremental, mut not_served) = (0, 0);
    for seed in seeds {
        let mut d = Dice(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut world = World {
            cluster: Cluster::default(),
            node: node(),
            policies: ["gold".to_string()].into(),
            now: Instant::now(),
            version: 0,
        };
        let mut file = crate::model::Desired::default();
        file.policies.insert(
            "gold".into(),
            Policy {
                limits: crate::model::Limits {
                    packets: None,
                    connections: None,
                },
                ipv6_prefix: crate::model::DEFAULT_IPV6_PREFIX,
                table_full: crate::model::TableFull::FailOpen,
                reset_rejected_syn: false,
                exempt: Vec::new(),
                deny: Vec::new(),
                overrides: Vec::new(),
            },
        );
        let mut tr = Translator::default();
        let (mut a, mut b) = (Pipeline::new(), Pipeline::new());
        let mut history = Vec::new();
        for step in 0..120 {
            history.push(world.change(&mut d));
            if d.chance(5) {
                // The config file claims a frontend of the cluster's now and then.
                let vip: &&str = d.pick(&VIPS);
                let s = file_service(vip, *d.pick(&[80, 443]));
                if file.services.remove(&s.frontend).is_none() {
                    file.services.insert(s.frontend, Arc::new(s));
                }
                a.last = None;
                b.last = None;
                history.push(format!("config file: {:?}", file.services.keys()));
            }
            let view = crate::node::NodeView {
                snat_ipv4: vec!["10.0.0.1".parse().unwrap()],
                node_addrs: world.node.addrs.iter().copied().collect(),
                local: ["10.1.1.2".parse().unwrap(), "10.1.1.3".parse().unwrap()].into(),
                ..Default::default()
            };
            let t = tr.translate(&world.cluster, &world.node, &world.policies, world.now);
            let mut told = t.clone();
            if broken && let Some(changed) = &mut told.changed {
                changed.pop_first();
            }
            let (got_a, (by_frontend, left_out)) = a.apply(&file, &told, &view);
            incremental += usize::from(by_frontend);
            not_served += usize::from(by_frontend && left_out);
            let mut whole = t.clone();
            whole.changed = None;
            let (got_b, _) = b.apply(&file, &whole, &view);
            let fresh = crate::model::compose(&file, &t.services, &t.policies).0;
            let differ = difference((&a, &got_a), (&b, &got_b), &fresh);
            if let Some(what) = differ {
                return Err(format!(
                    "seed {seed} step {step} ({}): {what}",
                    history.last().unwrap()
                ));
            }
        }
    }
    Ok((incremental, not_served))
}

#[test]
fn changes_applied_frontend_by_frontend_equal_the_whole_state_applied_after_any_changes() {
    let (incremental, not_served) =
        compare_pipelines(1..=40, false).unwrap_or_else(|e| panic!("{e}"));
    // Most changes took the short way (the rest: node changes, waiting for room, the file),
    // many of them with services left out.
    assert!(
        incremental > 40 * 120 / 3 && not_served > incremental / 10,
        "only {incremental} frontend by frontend, {not_served} with services not served"
    );
}

#[test]
fn an_incremental_apply_told_one_changed_frontend_less_is_caught() {
    let caught = compare_pipelines(1..=40, true);
    assert!(caught.is_err(), "not caught: {caught:?}");
}
