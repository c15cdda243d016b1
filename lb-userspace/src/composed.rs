//! The desired state composed from the agent's inputs (the config file, the cluster's
//! translation), kept between applies, and its way to the maps: admitted, fitted and applied by
//! the reconciler. A change of the cluster's translation that names the frontends it touched
//! ([`Translation::changed`]) is composed and applied for those frontends only, so that one
//! endpoint change costs the same at 20,000 frontends as at 20; anything else (the first state,
//! a new config file, a node change, services waiting for room, a change the reconciler cannot
//! take service by service) goes the whole-state way. Both ways give the same state, maps and
//! problems: host tests compare them after random changes. Nothing here reads the node: the
//! caller hands in how to get its view.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use crate::{
    k8s::{Problem, Translation, reason},
    model::{self, Conflict, Desired, Frontend, Invalid, Service},
    node::NodeView,
    reconcile::{ApplyError, Reconciler, Report},
    tables::Tables,
};

/// The last composed state applied (before services the node cannot serve were left out) and
/// its problems: composing the same again needs no apply.
pub struct Composed {
    pub desired: Desired,
    /// Services of the cluster on a frontend the config file has.
    conflicts: BTreeMap<Frontend, Conflict>,
    /// Services of `desired` not applied (in frontend order), and why.
    left_out: Vec<Invalid>,
    problems: Vec<Problem>,
    /// Services wait for room in the maps: the same state is applied again (each tick), so
    /// they are served once room appears.
    waiting: bool,
    /// How many of `desired`'s backends are at each address. The node view (which backends are
    /// local) and the neighbour entries depend only on which addresses there are: a change that
    /// keeps them (most endpoint changes move a few) needs neither read again, which at 200,000
    /// backends cost tens of milliseconds per change.
    backend_addrs: BTreeMap<IpAddr, usize>,
    /// The round of the cluster's translation composed in.
    kube_round: Option<u64>,
}

/// The inputs of one composition.
pub struct Inputs<'a> {
    /// The config file's state (empty without one).
    pub file: &'a Desired,
    /// The cluster's translation, once listed.
    pub kube: Option<&'a Translation>,
}

/// What an apply did.
pub struct Outcome {
    pub report: Report,
    /// The problems to report: services not served, and why.
    pub problems: Vec<Problem>,
    /// Services not applied, as said in the log and the health view.
    pub not_served: Vec<String>,
    /// The node's view the state was applied for; `None`: nothing was applied (the same state
    /// again).
    pub node: Option<NodeView>,
    /// Composed and applied for the changed frontends only (not the whole state).
    pub incremental: bool,
}

/// Which backend addresses a composed state has, next to the state last applied.
#[derive(Debug, PartialEq, Eq)]
pub enum Addrs {
    /// The same ones: the view last used still holds.
    Same,
    /// These came and these went (the rest stayed): the view last used holds for the rest.
    Changed {
        came: Vec<IpAddr>,
        went: Vec<IpAddr>,
    },
    /// Not known (the first state, a node change): the view is read for all of them.
    All,
}

/// How to get the node's view for a composed state, given how its backend addresses changed.
pub type NodeViewOf<'a> = dyn FnMut(&Desired, Addrs) -> Result<NodeView, ApplyError> + 'a;

/// The maps and the reconciler that writes them.
pub struct Writer<'a> {
    pub reconciler: &'a mut Reconciler,
    pub tables: &'a mut dyn Tables,
}

/// Composes `inputs` and applies the result: only the frontends the translation says changed
/// when `last` is the composition of the translation before it, else the whole state. On
/// success `last` and `applied` (the state applied, as admitted) hold the new state; on error
/// `applied` is as it was, and `last` as it was or `None` (the next apply looks at everything).
pub fn apply(
    last: &mut Option<Composed>,
    applied: &mut Desired,
    inputs: &Inputs<'_>,
    writer: Writer<'_>,
    node_view: &mut NodeViewOf<'_>,
) -> Result<Outcome, ApplyError> {
    let Writer { reconciler, tables } = writer;
    if let Some(outcome) = apply_changed(last, applied, inputs, reconciler, tables, node_view)? {
        return Ok(outcome);
    }
    apply_whole(last, applied, inputs, reconciler, tables, node_view)
}

/// The policies of the composed state: the config file's, and the cluster's.
fn policies(inputs: &Inputs<'_>) -> BTreeMap<String, model::Policy> {
    let mut all = inputs.file.policies.clone();
    for (name, p) in inputs.kube.iter().flat_map(|t| &t.policies) {
        all.insert(name.clone(), p.clone());
    }
    all
}

/// The change of the translation, frontend by frontend; `Ok(None)`: it needs the whole way.
fn apply_changed(
    last: &mut Option<Composed>,
    applied: &mut Desired,
    inputs: &Inputs<'_>,
    reconciler: &mut Reconciler,
    tables: &mut dyn Tables,
    node_view: &mut NodeViewOf<'_>,
) -> Result<Option<Outcome>, ApplyError> {
    let (Some(c), Some(t)) = (last.as_mut(), inputs.kube) else {
        return Ok(None);
    };
    let Some(changed) = &t.changed else {
        return Ok(None);
    };
    if c.waiting
        || c.kube_round.is_none_or(|r| r + 1 != t.round)
        || c.desired.policies != policies(inputs)
    {
        return Ok(None);
    }
    // The cluster's services at those frontends (a scan, not a copy of the rest).
    let kube: BTreeMap<Frontend, &Arc<Service>> = t
        .services
        .iter()
        .filter(|s| changed.contains(&s.frontend))
        .map(|s| (s.frontend, s))
        .collect();
    // Composed as `model::compose` does: the config file keeps a frontend it has.
    let mut moved = BTreeSet::new();
    let mut delta: BTreeMap<IpAddr, isize> = BTreeMap::new();
    for f in changed {
        let file = inputs.file.services.get(f);
        let cluster = kube.get(f).copied();
        match (file, cluster) {
            (Some(kept), Some(s)) => c.conflicts.insert(
                *f,
                Conflict {
                    service: Service::clone(s),
                    kept_by: (kept.origin.clone(), kept.name.clone()),
                },
            ),
            _ => c.conflicts.remove(f),
        };
        let new = file.or(cluster);
        let old = c.desired.services.get(f);
        if old == new {
            continue;
        }
        for b in old.iter().flat_map(|s| &s.backends) {
            *delta.entry(b.addr).or_default() -= 1;
        }
        for b in new.iter().flat_map(|s| &s.backends) {
            *delta.entry(b.addr).or_default() += 1;
        }
        match new {
            Some(s) => c.desired.services.insert(*f, s.clone()),
            None => c.desired.services.remove(f),
        };
        moved.insert(*f);
    }
    c.kube_round = Some(t.round);
    if moved.is_empty() {
        c.problems = problems(&c.conflicts, &c.left_out);
        return Ok(Some(Outcome {
            report: Report::default(),
            problems: c.problems.clone(),
            not_served: not_served(&c.left_out),
            node: None,
            incremental: true,
        }));
    }
    delta.retain(|_, d| *d != 0);
    let node = match node_view(&c.desired, addrs(&c.backend_addrs, &delta)) {
        Ok(node) => node,
        Err(e) => {
            *last = None;
            return Err(e);
        }
    };
    let change = match reconciler.apply_changed(&c.desired, &moved, &node, tables) {
        Ok(Some(change)) => change,
        // The composition is the new one: the whole way composes again from the inputs.
        Ok(None) => {
            *last = None;
            return Ok(None);
        }
        Err(e) => {
            *last = None;
            return Err(e);
        }
    };
    for f in &moved {
        applied.services.remove(f);
        if change.admitted.contains(f) {
            applied.services.insert(*f, c.desired.services[f].clone());
        }
    }
    c.left_out.retain(|i| !moved.contains(&i.frontend));
    c.left_out.extend(change.left_out);
    c.left_out.sort_by_key(|i| i.frontend);
    c.problems = problems(&c.conflicts, &c.left_out);
    add_backend_addrs(&mut c.backend_addrs, delta);
    Ok(Some(Outcome {
        report: change.report,
        problems: c.problems.clone(),
        not_served: not_served(&c.left_out),
        node: Some(node),
        incremental: true,
    }))
}

/// The whole state composed and applied.
fn apply_whole(
    last: &mut Option<Composed>,
    applied: &mut Desired,
    inputs: &Inputs<'_>,
    reconciler: &mut Reconciler,
    tables: &mut dyn Tables,
    node_view: &mut NodeViewOf<'_>,
) -> Result<Outcome, ApplyError> {
    let (services, kube_policies) = match inputs.kube {
        Some(t) => (t.services.as_slice(), &t.policies),
        None => (&[][..], &BTreeMap::new()),
    };
    let (composed, conflicts) = model::compose(inputs.file, services, kube_policies);
    let conflicts: BTreeMap<Frontend, Conflict> = conflicts
        .into_iter()
        .map(|c| (c.service.frontend, c))
        .collect();
    // What changed since the last state composed, service by service (the node settings
    // changed: everything).
    let kube_round = inputs.kube.map(|t| t.round);
    let delta = last
        .as_ref()
        .filter(|l| l.desired.node == composed.node)
        .map(|l| {
            let changed = changed_services(&l.desired, &composed);
            let delta = backend_addrs_delta(&l.desired, &composed, &changed);
            (changed, delta)
        });
    if let (Some(l), Some((changed, _))) = (last.as_mut(), &delta)
        && changed.is_empty()
        && l.desired.policies == composed.policies
        && !l.waiting
    {
        l.conflicts = conflicts;
        l.problems = problems(&l.conflicts, &l.left_out);
        l.kube_round = kube_round;
        return Ok(Outcome {
            report: Report::default(),
            problems: l.problems.clone(),
            not_served: not_served(&l.left_out),
            node: None,
            incremental: false,
        });
    }
    // The same backend addresses as last time: the node view and the neighbour entries
    // are as they were; where a few came or went, only those are looked up (a change of the
    // node's own links, addresses or routes is followed by `node_changed`, which composes
    // everything again).
    let addrs = match (last.as_ref(), &delta) {
        (Some(l), Some((_, delta))) => addrs(&l.backend_addrs, delta),
        _ => Addrs::All,
    };
    let node = node_view(&composed, addrs)?;
    let result = match reconciler.apply_admitting(&composed, &node, tables) {
        Ok(result) => result,
        Err(e) => {
            // The node's view followed `composed`'s addresses: the next one starts from all.
            *last = None;
            return Err(e);
        }
    };
    let mut left_out = result.left_out;
    left_out.sort_by_key(|i| i.frontend);
    *applied = result.desired;
    let backend_addrs = match (last.take(), delta) {
        (Some(l), Some((_, delta))) => {
            let mut counts = l.backend_addrs;
            add_backend_addrs(&mut counts, delta);
            counts
        }
        _ => count_backend_addrs(&composed),
    };
    let c = last.insert(Composed {
        desired: composed,
        problems: problems(&conflicts, &left_out),
        conflicts,
        left_out,
        waiting: result.waiting,
        backend_addrs,
        kube_round,
    });
    Ok(Outcome {
        report: result.report,
        problems: c.problems.clone(),
        not_served: not_served(&c.left_out),
        node: Some(node),
        incremental: false,
    })
}

/// The addresses `delta` brings to the backend counts per address, and those it takes away.
fn addrs(counts: &BTreeMap<IpAddr, usize>, delta: &BTreeMap<IpAddr, isize>) -> Addrs {
    let (mut came, mut went) = (Vec::new(), Vec::new());
    for (a, d) in delta {
        let before = counts.get(a).copied().unwrap_or(0);
        let after = before.checked_add_signed(*d).unwrap_or(0);
        match (before > 0, after > 0) {
            (false, true) => came.push(*a),
            (true, false) => went.push(*a),
            _ => {}
        }
    }
    if came.is_empty() && went.is_empty() {
        Addrs::Same
    } else {
        Addrs::Changed { came, went }
    }
}

/// The problems of the cluster's services not served: frontends the config file keeps, then
/// services left out, in order.
fn problems(conflicts: &BTreeMap<Frontend, Conflict>, left_out: &[Invalid]) -> Vec<Problem> {
    let mut all: Vec<Problem> = conflicts
        .values()
        .filter_map(|c| {
            Problem::for_service(
                &c.service.origin,
                &c.service.frontend,
                reason::FRONTEND_CLAIMED,
                c.to_string(),
            )
        })
        .chain(left_out.iter().filter_map(|i| {
            Problem::for_service(
                &i.origin,
                &i.frontend,
                reason::NOT_SERVED,
                format!("{}; not served", i.reason),
            )
        }))
        .collect();
    all.sort();
    all
}

fn not_served(left_out: &[Invalid]) -> Vec<String> {
    left_out.iter().map(ToString::to_string).collect()
}

/// The frontends whose service differs between `old` and `new`: added, removed or changed.
fn changed_services(old: &Desired, new: &Desired) -> Vec<Frontend> {
    let mut changed = Vec::new();
    let (mut a, mut b) = (
        old.services.iter().peekable(),
        new.services.iter().peekable(),
    );
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return changed,
            (Some((f, _)), None) => {
                changed.push(**f);
                a.next();
            }
            (None, Some((f, _))) => {
                changed.push(**f);
                b.next();
            }
            (Some((fa, sa)), Some((fb, sb))) => match fa.cmp(fb) {
                std::cmp::Ordering::Less => {
                    changed.push(**fa);
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    changed.push(**fb);
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if sa != sb {
                        changed.push(**fa);
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

/// How many of `desired`'s backends are at each address.
fn count_backend_addrs(desired: &Desired) -> BTreeMap<IpAddr, usize> {
    let mut counts = BTreeMap::new();
    for s in desired.services.values() {
        for b in &s.backends {
            *counts.entry(b.addr).or_default() += 1;
        }
    }
    counts
}

/// Adds `delta` to the backend counts per address (an address whose count drops to 0 goes).
fn add_backend_addrs(counts: &mut BTreeMap<IpAddr, usize>, delta: BTreeMap<IpAddr, isize>) {
    for (addr, d) in delta {
        let n = counts.get(&addr).copied().unwrap_or(0);
        match n.checked_add_signed(d) {
            Some(n) if n > 0 => {
                counts.insert(addr, n);
            }
            _ => {
                counts.remove(&addr);
            }
        }
    }
}

/// How the backend counts per address change from `old` to `new` at the `changed` frontends.
fn backend_addrs_delta(
    old: &Desired,
    new: &Desired,
    changed: &[Frontend],
) -> BTreeMap<IpAddr, isize> {
    let mut delta: BTreeMap<IpAddr, isize> = BTreeMap::new();
    for f in changed {
        for b in old.services.get(f).iter().flat_map(|s| &s.backends) {
            *delta.entry(b.addr).or_default() -= 1;
        }
        for b in new.services.get(f).iter().flat_map(|s| &s.backends) {
            *delta.entry(b.addr).or_default() += 1;
        }
    }
    delta.retain(|_, d| *d != 0);
    delta
}

#[cfg(test)]
mod stages;
#[cfg(test)]
mod tests;
