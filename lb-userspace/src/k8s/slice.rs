//! An EndpointSlice as the cluster keeps it: the fields the translation reads, in the same
//! names and shapes as `k8s_openapi`'s, so the translation reads either alike. The API's
//! endpoint type is about 340 bytes before its strings (a whole object reference, topology and
//! hints inline); at 10,000 Services x 10 endpoints the slices as listed were 55 MiB of the
//! agent's heap after leaving out what is never read, a third of it room for endpoints.
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
    pub node_name: Option<String>,
    pub target_ref: Option<PodName>,
    pub zone: Option<String>,
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
            node_name: e.node_name,
            target_ref: e.target_ref.map(|t| PodName { name: t.name }),
            zone: e.zone,
        }
    }
}
