//! Zone-aware routing as kube-proxy does it (`CategorizeEndpoints` in pkg/proxy/topology.go):
//! which of a service port's endpoints take new flows on this node. Pure: the endpoints with
//! their hints, this node's name and zone in; the choice out.
//!
//! kube-proxy follows the hints of EndpointSlices (`hints.forNodes`, `hints.forZones`), which
//! the EndpointSlice controller writes only when a Service asks: `spec.trafficDistribution`
//! (`PreferClose` and `PreferSameZone`: each endpoint hinted for its own zone; `PreferSameNode`:
//! for its own node and zone) or the annotation `service.kubernetes.io/topology-mode: Auto`
//! (zones allotted endpoints in proportion to their CPUs). Its rules, per service port:
//! - only ready endpoints count; node hints are used if every ready endpoint has one and one
//!   is hinted for this node; else zone hints, if every ready endpoint has one and one is
//!   hinted for this node's zone; else no topology: every ready endpoint;
//! - with none ready, the serving terminating endpoints, whatever their hints.
//!
//! Where a slice has no hints (no controller writes them: an older one, slices a controller of
//! one's own manages), the agent derives them as the controller would from the endpoint's
//! `zone` and `nodeName`, when the Service asks by trafficDistribution, or when the node option
//! `prefer-same-zone` is on and the Service asks for nothing (no trafficDistribution, no
//! topology-mode annotation): then same zone first. Topology-mode Auto's allotment cannot be
//! derived: without the controller's hints it is no topology.
//!
//! A ready endpoint the choice leaves out stays a backend at weight 0 ("standby"): it takes no
//! new flows and keeps the ones it has, as behind kube-proxy, where conntrack keeps them.
use std::fmt;

/// `spec.trafficDistribution` values.
pub const PREFER_CLOSE: &str = "PreferClose";
pub const PREFER_SAME_ZONE: &str = "PreferSameZone";
pub const PREFER_SAME_NODE: &str = "PreferSameNode";
/// The Service annotation the EndpointSlice controller reads (`Auto` or `Disabled`).
pub const TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
/// Its older name, still read by the controller when the new one is not set.
pub const TOPOLOGY_AWARE_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
/// The Node label that names its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What a Service asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preference {
    /// Nothing: the slices' hints are followed if they have them (kube-proxy's rule); none are
    /// derived.
    #[default]
    Unstated,
    /// Hints the controller allots (topology-mode Auto): followed; none derived.
    Allotted,
    /// Same zone first: endpoints without hints are hinted for their own zone.
    SameZone,
    /// Same node first, then same zone: endpoints without hints are hinted for their own node
    /// and zone.
    SameNode,
}

/// An endpoint as the choice sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    pub ready: bool,
    /// Not ready, but serving and terminating (KEP-1669): used only when none is ready.
    pub serving_terminating: bool,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// `hints.forZones` names.
    pub for_zones: Vec<String>,
    /// `hints.forNodes` names.
    pub for_nodes: Vec<String>,
}

/// How far new flows are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every usable endpoint.
    Everywhere,
    /// The endpoints hinted for this node's zone.
    SameZone,
    /// The endpoints hinted for this node.
    SameNode,
}

/// What the choice made of a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Takes new flows.
    Takes,
    /// Ready, but outside the scope: no new flows; its flows continue.
    Standby,
    /// Not used (not ready, or terminating while others are ready).
    Unused,
}

/// Why the choice is [`Scope::Everywhere`] although topology was asked for (or hinted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Some ready endpoint has no zone hint (and no zone to derive one from).
    MissingHints,
    /// This node has no zone label.
    NodeWithoutZone,
    /// No ready endpoint is hinted for this zone.
    NoneInZone(String),
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fallback::MissingHints => f.write_str("not every ready endpoint has a zone"),
            Fallback::NodeWithoutZone => write!(f, "this node has no {ZONE_LABEL} label"),
            Fallback::NoneInZone(zone) => write!(f, "no ready endpoint in zone {zone}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Categorized {
    pub scope: Scope,
    /// Set when topology was asked for or hinted and not applied.
    pub fallback: Option<Fallback>,
    /// One per candidate, in order.
    pub roles: Vec<Role>,
}

/// The hints of `c` the choice uses: its own, else derived as the controller would for
/// `preference`. (node hints, zone hints)
fn hints(c: &Candidate, preference: Preference) -> (Vec<&str>, Vec<&str>) {
    fn own(names: &[String]) -> Vec<&str> {
        names.iter().map(String::as_str).collect()
    }
    let mut zones = own(&c.for_zones);
    if zones.is_empty() && matches!(preference, Preference::SameZone | Preference::SameNode) {
        zones.extend(c.zone.as_deref());
    }
    let mut nodes = own(&c.for_nodes);
    if nodes.is_empty() && preference == Preference::SameNode {
        nodes.extend(c.node.as_deref());
    }
    (nodes, zones)
}

/// Which candidates take new flows on node `node` in zone `zone`.
pub fn categorize(
    candidates: &[Candidate],
    preference: Preference,
    node: &str,
    zone: Option<&str>,
) -> Categorized {
    let hinted: Vec<(Vec<&str>, Vec<&str>)> =
        candidates.iter().map(|c| hints(c, preference)).collect();
    let ready = || {
        candidates
            .iter()
            .zip(&hinted)
            .filter(|(c, _)| c.ready)
            .map(|(_, h)| h)
    };
    let any_ready = ready().next().is_some();
    let all_node_hints = ready().all(|(n, _)| !n.is_empty());
    let for_node = ready().any(|(n, _)| n.contains(&node));
    let all_zone_hints = ready().all(|(_, z)| !z.is_empty());
    let for_zone = zone.is_some_and(|zone| ready().any(|(_, z)| z.contains(&zone)));
    let (scope, fallback) = if !any_ready {
        (Scope::Everywhere, None)
    } else if all_node_hints && for_node {
        (Scope::SameNode, None)
    } else if all_zone_hints && for_zone {
        (Scope::SameZone, None)
    } else {
        let asked = preference != Preference::Unstated
            || ready().any(|(n, z)| !n.is_empty() || !z.is_empty());
        let why = if all_zone_hints {
            match zone {
                None => Fallback::NodeWithoutZone,
                Some(zone) => Fallback::NoneInZone(zone.to_string()),
            }
        } else {
            Fallback::MissingHints
        };
        (Scope::Everywhere, asked.then_some(why))
    };
    let in_scope = |(nodes, zones): &(Vec<&str>, Vec<&str>)| match scope {
        Scope::Everywhere => true,
        Scope::SameNode => nodes.contains(&node),
        Scope::SameZone => zone.is_some_and(|zone| zones.contains(&zone)),
    };
    let roles = candidates
        .iter()
        .zip(&hinted)
        .map(|(c, h)| match (c.ready, in_scope(h)) {
            (true, true) => Role::Takes,
            (true, false) => Role::Standby,
            // Serving terminating endpoints only when none is ready, whatever their hints
            // (the scope has fallen back already if none is ready in it).
            (false, _) if !any_ready && c.serving_terminating => Role::Takes,
            (false, _) => Role::Unused,
        })
        .collect();
    Categorized {
        scope,
        fallback,
        roles,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ready endpoint on `node` in `zone`, with the hints given ("" for none).
    fn ep(node: &str, zone: &str, for_zones: &[&str], for_nodes: &[&str]) -> Candidate {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Candidate {
            ready: true,
            serving_terminating: false,
            node: some(node),
            zone: some(zone),
            for_zones: for_zones.iter().map(ToString::to_string).collect(),
            for_nodes: for_nodes.iter().map(ToString::to_string).collect(),
        }
    }

    fn not_ready(mut c: Candidate, serving_terminating: bool) -> Candidate {
        c.ready = false;
        c.serving_terminating = serving_terminating;
        c
    }

    use Role::{Standby, Takes, Unused};

    fn run(eps: &[Candidate], p: Preference, zone: Option<&str>) -> (Scope, Vec<Role>) {
        let c = categorize(eps, p, "node-1", zone);
        (c.scope, c.roles)
    }

    // kube-proxy's cases (TestCategorizeEndpoints), in words.

    #[test]
    fn without_hints_every_ready_endpoint_takes_new_flows() {
        let eps = [
            ep("node-1", "zone-a", &[], &[]),
            ep("node-2", "zone-b", &[], &[]),
            not_ready(ep("node-3", "zone-c", &[], &[]), false),
        ];
        let c = categorize(&eps, Preference::Unstated, "node-1", Some("zone-a"));
        assert_eq!(c.scope, Scope::Everywhere);
        assert_eq!(c.roles, [Takes, Takes, Unused]);
        assert_eq!(c.fallback, None, "nothing was asked");
    }

    #[test]
    fn zone_hints_keep_new_flows_in_the_zone() {
        let eps = [
            ep("node-1", "zone-a", &["zone-a"], &[]),
            ep("node-2", "zone-b", &["zone-b"], &[]),
            ep("node-3", "zone-c", &["zone-c"], &[]),
            ep("node-4", "zone-a", &["zone-a"], &[]),
        ];
        assert_eq!(
            run(&eps, Preference::Unstated, Some("zone-a")),
            (Scope::SameZone, vec![Takes, Standby, Standby, Takes])
        );
    }

    #[test]
    fn an_endpoint_may_be_hinted_for_another_zone_than_its_own() {
        // Topology-mode Auto allots endpoints by CPU share: zone-b's node serves zone-a too.
        let eps = [
            ep("node-1", "zone-a", &["zone-a"], &[]),
            ep("node-2", "zone-b", &["zone-a", "zone-b"], &[]),
            ep("node-3", "zone-b", &["zone-b"], &[]),
        ];
        assert_eq!(
            run(&eps, Preference::Allotted, Some("zone-a")),
            (Scope::SameZone, vec![Takes, Takes, Standby])
        );
    }

    #[test]
    fn hints_are_ignored_unless_every_ready_endpoint_has_one() {
        let eps = [
            ep("node-1", "zone-a", &["zone-a"], &[]),
            ep("node-2", "zone-b", &[], &[]),
            // Not ready: does not count.
            not_ready(ep("node-3", "zone-c", &[], &[]), false),
        ];
        let c = categorize(&eps, Preference::Allotted, "node-1", Some("zone-a"));
        assert_eq!(c.scope, Scope::Everywhere);
        assert_eq!(c.roles, [Takes, Takes, Unused]);
        assert_eq!(c.fallback, Some(Fallback::MissingHints));
        let ready_hinted = [
            ep("node-1", "zone-a", &["zone-a"], &[]),
            not_ready(ep("node-3", "zone-c", &[], &[]), true),
        ];
        assert_eq!(
            run(&ready_hinted, Preference::Unstated, Some("zone-a")).0,
            Scope::SameZone,
            "an endpoint that is not ready needs no hint"
        );
    }

    #[test]
    fn no_ready_endpoint_for_the_zone_falls_back_to_all() {
        let eps = [
            ep("node-2", "zone-b", &["zone-b"], &[]),
            ep("node-3", "zone-c", &["zone-c"], &[]),
            not_ready(ep("node-1", "zone-a", &["zone-a"], &[]), false),
        ];
        let c = categorize(&eps, Preference::SameZone, "node-1", Some("zone-a"));
        assert_eq!(c.scope, Scope::Everywhere);
        assert_eq!(c.roles, [Takes, Takes, Unused]);
        assert_eq!(c.fallback, Some(Fallback::NoneInZone("zone-a".into())));
    }

    #[test]
    fn a_node_without_a_zone_uses_every_endpoint() {
        let eps = [
            ep("node-1", "zone-a", &["zone-a"], &[]),
            ep("node-2", "zone-b", &["zone-b"], &[]),
        ];
        let c = categorize(&eps, Preference::SameZone, "node-1", None);
        assert_eq!((c.scope, c.roles), (Scope::Everywhere, vec![Takes, Takes]));
        assert_eq!(c.fallback, Some(Fallback::NodeWithoutZone));
    }

    #[test]
    fn node_hints_come_first_then_zone_hints() {
        let eps = [
            ep("node-1", "zone-a", &["zone-a"], &["node-1"]),
            ep("node-4", "zone-a", &["zone-a"], &["node-4"]),
            ep("node-2", "zone-b", &["zone-b"], &["node-2"]),
        ];
        assert_eq!(
            run(&eps, Preference::Unstated, Some("zone-a")),
            (Scope::SameNode, vec![Takes, Standby, Standby])
        );
        // No endpoint for this node: the zone.
        assert_eq!(
            run(&eps[1..], Preference::Unstated, Some("zone-a")),
            (Scope::SameZone, vec![Takes, Standby])
        );
        // One ready endpoint without a node hint: the zone.
        let mut partial = eps.to_vec();
        partial[2].for_nodes.clear();
        assert_eq!(
            run(&partial, Preference::Unstated, Some("zone-a")),
            (Scope::SameZone, vec![Takes, Takes, Standby])
        );
    }

    #[test]
    fn serving_terminating_endpoints_serve_only_when_none_is_ready_whatever_their_hints() {
        let eps = [
            not_ready(ep("node-1", "zone-a", &["zone-a"], &[]), true),
            not_ready(ep("node-2", "zone-b", &["zone-b"], &[]), true),
            not_ready(ep("node-3", "zone-b", &["zone-b"], &[]), false),
        ];
        let c = categorize(&eps, Preference::SameZone, "node-1", Some("zone-a"));
        assert_eq!(c.scope, Scope::Everywhere);
        assert_eq!(c.roles, [Takes, Takes, Unused]);
        assert_eq!(c.fallback, None, "nothing is ready to choose from");
        // One ready: the terminating ones take nothing.
        let mut one_ready = eps.to_vec();
        one_ready[2] = ep("node-3", "zone-b", &["zone-b"], &[]);
        assert_eq!(
            run(&one_ready, Preference::SameZone, Some("zone-a")),
            (Scope::Everywhere, vec![Unused, Unused, Takes])
        );
    }

    // Hints derived where the slices have none.

    #[test]
    fn same_zone_is_derived_from_the_endpoints_zones_when_asked() {
        let eps = [
            ep("node-1", "zone-a", &[], &[]),
            ep("node-4", "zone-a", &[], &[]),
            ep("node-2", "zone-b", &[], &[]),
        ];
        assert_eq!(
            run(&eps, Preference::SameZone, Some("zone-a")),
            (Scope::SameZone, vec![Takes, Takes, Standby])
        );
        assert_eq!(
            run(&eps, Preference::SameNode, Some("zone-a")),
            (Scope::SameNode, vec![Takes, Standby, Standby])
        );
        assert_eq!(
            run(&eps, Preference::Unstated, Some("zone-a")).0,
            Scope::Everywhere,
            "nothing asked: nothing derived"
        );
        assert_eq!(
            run(&eps, Preference::Allotted, Some("zone-a")).0,
            Scope::Everywhere,
            "the controller's allotment cannot be derived"
        );
        // An endpoint without a zone: no hint for it, so none are used.
        let mut unzoned = eps.to_vec();
        unzoned[2].zone = None;
        let c = categorize(&unzoned, Preference::SameZone, "node-1", Some("zone-a"));
        assert_eq!(c.scope, Scope::Everywhere);
        assert_eq!(c.fallback, Some(Fallback::MissingHints));
    }

    #[test]
    fn same_node_falls_back_to_the_zone_then_to_all() {
        let eps = [
            ep("node-4", "zone-a", &[], &[]),
            ep("node-2", "zone-b", &[], &[]),
        ];
        assert_eq!(
            run(&eps, Preference::SameNode, Some("zone-a")),
            (Scope::SameZone, vec![Takes, Standby])
        );
        assert_eq!(
            run(&eps, Preference::SameNode, Some("zone-c")),
            (Scope::Everywhere, vec![Takes, Takes])
        );
    }

    #[test]
    fn the_slices_own_hints_win_over_derived_ones() {
        // The controller allotted node-2 (zone-b) to zone-a as well.
        let eps = [
            ep("node-1", "zone-a", &[], &[]),
            ep("node-2", "zone-b", &["zone-a"], &[]),
        ];
        assert_eq!(
            run(&eps, Preference::SameZone, Some("zone-a")),
            (Scope::SameZone, vec![Takes, Takes])
        );
    }
}
