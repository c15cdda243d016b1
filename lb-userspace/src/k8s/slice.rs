//! An EndpointSlice as the cluster keeps it: the fields the translation reads, in the same
//! names and shapes as `k8s_openapi`'s, so the translation reads either alike. The API's
//! endpoint type is about 340 bytes before its strings (a whole object reference, topology and
//! hints inline); at 10,000 Services x 10 endpoints the slices as listed were 55 MiB of the
//! agent's heap after leaving out what is never read, a third of it room for endpoints.
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use k8s_openapi::api::discovery::v1::{
    EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Slice {
    /// Which version it is (its name and namespace are the cluster's keys).
    pub metadata: Meta,
    pub address_type: String,
    pub endpoints: Option<Vec<Endpoint>>,
    pub ports: Option<Vec<EndpointPort>>,
}

/// Of the API's ObjectMeta (about 360 bytes inline), uid and resourceVersion.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Meta {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Endpoint {
    pub addresses: Vec<String>,
    pub conditions: Option<EndpointConditions>,
    /// Boxed: most endpoints have none.
    pub hints: Option<Box<EndpointHints>>,
    /// Node and zone: one string per name however many endpoints say it ([`name`]).
    pub node_name: Option<Arc<str>>,
    pub target_ref: Option<PodName>,
    pub zone: Option<Arc<str>>,
}

/// Of an endpoint's `targetRef`, the pod's name (weights name pods).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodName {
    pub name: Option<String>,
}

impl From<EndpointSlice> for Slice {
    fn from(s: EndpointSlice) -> Slice {
        let m = s.metadata;
        Slice {
            metadata: Meta {
                uid: m.uid,
                resource_version: m.resource_version,
            },
            address_type: s.address_type,
            endpoints: s.endpoints.map(|all| {
                // Not `collect()`: it would reuse the API's vector in place, with room for 16
                // of its endpoints, and the point is to keep less.
                let mut kept = Vec::with_capacity(all.len());
                kept.extend(all.into_iter().map(Endpoint::from));
                kept
            }),
            ports: s.ports.map(|mut p| {
                p.shrink_to_fit();
                p
            }),
        }
    }
}

impl From<k8s_openapi::api::discovery::v1::Endpoint> for Endpoint {
    fn from(e: k8s_openapi::api::discovery::v1::Endpoint) -> Endpoint {
        let mut addresses = e.addresses;
        addresses.shrink_to_fit();
        Endpoint {
            addresses,
            conditions: e.conditions,
            hints: e.hints.map(Box::new),
            node_name: e.node_name.map(name),
            target_ref: e.target_ref.map(|t| PodName { name: t.name }),
            zone: e.zone.map(name),
        }
    }
}

/// The names endpoints give (nodes, zones), each kept once: at 10,000 slices of 10 endpoints,
/// a string per endpoint was 3 MiB for a handful of nodes. Names no endpoint holds any more go
/// each time the set has doubled.
struct Names {
    kept: BTreeSet<Arc<str>>,
    /// The set's size after its last sweep.
    swept_at: usize,
}

static NAMES: Mutex<Names> = Mutex::new(Names {
    kept: BTreeSet::new(),
    swept_at: 0,
});

/// `n` as kept in [`NAMES`].
fn name(n: String) -> Arc<str> {
    let mut names = NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(kept) = names.kept.get(n.as_str()) {
        return kept.clone();
    }
    if names.kept.len() >= 2 * names.swept_at.max(64) {
        names.kept.retain(|k| Arc::strong_count(k) > 1);
        names.swept_at = names.kept.len();
    }
    let kept: Arc<str> = n.into();
    names.kept.insert(kept.clone());
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_naming_one_node_share_its_name_and_unused_names_go() {
        let endpoint = |node: &str| {
            Endpoint::from(k8s_openapi::api::discovery::v1::Endpoint {
                addresses: vec!["10.0.0.1".into()],
                node_name: Some(node.into()),
                zone: Some("zone-a".into()),
                ..Default::default()
            })
        };
        let (a, b) = (endpoint("node-shared"), endpoint("node-shared"));
        let (na, nb) = (a.node_name.unwrap(), b.node_name.unwrap());
        assert_eq!(&*na, "node-shared");
        assert!(Arc::ptr_eq(&na, &nb), "one string for one node");
        assert!(Arc::ptr_eq(&a.zone.unwrap(), &b.zone.unwrap()));
        // Names nobody holds are swept once the set has grown: it stays bounded.
        for i in 0..10_000 {
            drop(endpoint(&format!("gone-{i}")));
        }
        let names = NAMES.lock().unwrap();
        assert!(names.kept.len() < 1000, "{} names kept", names.kept.len());
        assert!(
            names.kept.contains("node-shared"),
            "a name still held stays"
        );
    }
}
