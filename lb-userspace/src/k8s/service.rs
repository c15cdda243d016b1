//! A Service as the cluster keeps it: the fields the translation reads, in the same names and
//! shapes as `k8s_openapi`'s (as [`super::slice`] does for EndpointSlices), so the translation
//! reads either alike. The API's type is about 1 KiB before its strings (every field of
//! ObjectMeta and ServiceSpec inline, a map node with room for 11 annotations): at 10,000
//! Services the Services as watched were 20 MiB of the agent's heap after leaving out what is
//! never read.
use std::borrow::Cow;

use k8s_openapi::{
    api::core::v1::{Service as KubeService, ServicePort, ServiceSpec, SessionAffinityConfig},
    apimachinery::pkg::apis::meta::v1::Time,
};

use super::watch::service_annotation;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Service {
    pub metadata: Meta,
    pub spec: Option<Spec>,
    pub status: Option<Status>,
}

/// Which version of the object it is, its age, and the annotations the agent reads (its name
/// and namespace are the cluster's key).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Meta {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub creation_timestamp: Option<Time>,
    pub annotations: Option<Annotations>,
}

/// Annotations by key, sorted: the few a Service has for the agent, without a map node's room.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Annotations(Box<[(String, String)]>);

impl Annotations {
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn to_map(&self) -> std::collections::BTreeMap<String, String> {
        self.0.iter().cloned().collect()
    }
}

impl FromIterator<(String, String)> for Annotations {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(all: I) -> Annotations {
        let mut all: Vec<(String, String)> = all.into_iter().collect();
        all.sort();
        // Keys come from the API's map, unique: `get` finds the one there is.
        all.dedup_by(|later, earlier| later.0 == earlier.0);
        Annotations(all.into_boxed_slice())
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Spec {
    pub type_: Option<Cow<'static, str>>,
    pub ports: Option<Vec<Port>>,
    pub external_ips: Option<Vec<String>>,
    pub external_traffic_policy: Option<Cow<'static, str>>,
    pub health_check_node_port: Option<i32>,
    pub load_balancer_source_ranges: Option<Vec<String>>,
    pub session_affinity: Option<Cow<'static, str>>,
    pub session_affinity_config: Option<SessionAffinityConfig>,
    pub traffic_distribution: Option<Cow<'static, str>>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Port {
    pub name: Option<String>,
    pub port: i32,
    pub protocol: Option<Cow<'static, str>>,
    pub node_port: Option<i32>,
}

/// Of `status`, the load balancer's ingress addresses.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Status {
    pub load_balancer: Option<LoadBalancer>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadBalancer {
    pub ingress: Option<Vec<Ingress>>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ingress {
    pub ip: Option<String>,
}

/// A value out of a known few kept without a string of its own (most Services say "TCP",
/// "Cluster", "None"); any other kept as it is.
fn known(value: Option<String>, few: &[&'static str]) -> Option<Cow<'static, str>> {
    value.map(|v| match few.iter().find(|k| **k == v) {
        Some(k) => Cow::Borrowed(*k),
        None => Cow::Owned(v),
    })
}

/// Vectors kept exactly as long as they are (the API's grew by doubling as they were read).
fn exact<T>(v: Option<Vec<T>>) -> Option<Vec<T>> {
    v.map(|mut v| {
        v.shrink_to_fit();
        v
    })
}

impl From<KubeService> for Service {
    fn from(s: KubeService) -> Service {
        let m = s.metadata;
        Service {
            metadata: Meta {
                uid: m.uid,
                resource_version: m.resource_version,
                creation_timestamp: m.creation_timestamp,
                annotations: m.annotations.and_then(|a| {
                    let kept: Annotations = a
                        .into_iter()
                        .filter(|(k, _)| service_annotation(k))
                        .collect();
                    (!kept.0.is_empty()).then_some(kept)
                }),
            },
            spec: s.spec.map(Spec::from),
            status: s.status.map(|st| Status {
                load_balancer: st.load_balancer.map(|lb| LoadBalancer {
                    ingress: lb.ingress.map(|all| {
                        let mut kept = Vec::with_capacity(all.len());
                        kept.extend(all.into_iter().map(|i| Ingress { ip: i.ip }));
                        kept
                    }),
                }),
            }),
        }
    }
}

impl From<ServiceSpec> for Spec {
    fn from(s: ServiceSpec) -> Spec {
        Spec {
            type_: known(
                s.type_,
                &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
            ),
            ports: s.ports.map(|all| {
                let mut kept = Vec::with_capacity(all.len());
                kept.extend(all.into_iter().map(Port::from));
                kept
            }),
            external_ips: exact(s.external_ips),
            external_traffic_policy: known(s.external_traffic_policy, &["Cluster", "Local"]),
            health_check_node_port: s.health_check_node_port,
            load_balancer_source_ranges: exact(s.load_balancer_source_ranges),
            session_affinity: known(s.session_affinity, &["None", "ClientIP"]),
            session_affinity_config: s.session_affinity_config,
            traffic_distribution: known(
                s.traffic_distribution,
                &["PreferClose", "PreferSameZone", "PreferSameNode"],
            ),
        }
    }
}

impl From<ServicePort> for Port {
    fn from(p: ServicePort) -> Port {
        Port {
            name: p.name,
            port: p.port,
            protocol: known(p.protocol, &["TCP", "UDP", "SCTP"]),
            node_port: p.node_port,
        }
    }
}
