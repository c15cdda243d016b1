//! Frontend addresses a service may not claim (CVE-2020-8554 and its kind): whoever defines a
//! service must not be able to take the node's own traffic. Reserved are the node's own
//! addresses, loopback, link-local, unspecified and multicast addresses, the node's pod ranges
//! when its Node says them (`spec.podCIDRs`: a Service there would take the traffic of pods), and
//! the ranges the node config lists (`node.reserved-ranges`); the node config may name services allowed anyway
//! (`node.allow-reserved`). Node ports are on the node's addresses by design and are not
//! checked here: only addresses a service names (a config file's `vip`, a Service's
//! load-balancer ingress IPs and externalIPs).
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use crate::model::{Cidr, Desired, Invalid, NodeSettings, Origin};

/// Ranges reserved on every node, with what they are.
const ALWAYS: &[(&str, &str)] = &[
    ("0.0.0.0/8", "an unspecified (\"this network\") address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("224.0.0.0/4", "a multicast address"),
    ("255.255.255.255/32", "the broadcast address"),
    ("::/128", "the unspecified address"),
    ("::1/128", "the loopback address"),
    ("fe80::/10", "a link-local address"),
    ("ff00::/8", "a multicast address"),
];

/// What a service may not claim on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reserved {
    /// The node's own addresses.
    pub node_addrs: BTreeSet<IpAddr>,
    /// The node's pod ranges (its Node's `spec.podCIDRs`), when it has any.
    pub pod_ranges: Vec<Cidr>,
    /// `node.reserved-ranges`.
    pub ranges: Vec<Cidr>,
    /// `node.allow-reserved`: config-file service names and `namespace/name` of Services.
    pub allowed: BTreeSet<String>,
}

impl Reserved {
    /// What the node settings reserve on a node with these addresses.
    pub fn for_node(settings: &NodeSettings, node_addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        Reserved {
            node_addrs: node_addrs.into_iter().collect(),
            pod_ranges: Vec::new(),
            ranges: settings.reserved_ranges.clone(),
            allowed: settings.allow_reserved.iter().cloned().collect(),
        }
    }

    /// Why a service may not claim `vip`, if it may not.
    pub fn reason(&self, vip: IpAddr) -> Option<String> {
        let vip = canonical(vip);
        if self.node_addrs.iter().any(|a| canonical(*a) == vip) {
            return Some(format!("{vip} is an address of this node"));
        }
        for (range, what) in ALWAYS {
            let range: Cidr = range.parse().expect("a valid range");
            if range.contains(vip) {
                return Some(format!("{vip} is {what}"));
            }
        }
        if let Some(r) = self.pod_ranges.iter().find(|r| r.contains(vip)) {
            return Some(format!(
                "{vip} is in {r}, this node's pod range (its Node's spec.podCIDRs)"
            ));
        }
        self.ranges
            .iter()
            .find(|r| r.contains(vip))
            .map(|r| format!("{vip} is in {r}, which node.reserved-ranges reserves"))
    }

    /// Whether the node config allows the service `who` (a config-file service's name, or a
    /// Service's `namespace/name`) reserved addresses.
    pub fn allows(&self, who: &str) -> bool {
        self.allowed.contains(who)
    }

    /// Why the service `who` may not claim `vip`, if it may not; the message says how to allow
    /// it.
    pub fn refuse(&self, who: &str, vip: IpAddr) -> Option<String> {
        if self.allows(who) {
            return None;
        }
        self.reason(vip).map(|r| {
            format!(
                "{r}: a service may not claim it (the node config's node.allow-reserved can name `{who}` as an exception)"
            )
        })
    }

    /// The config file's services (and other non-cluster ones) that claim a reserved address.
    /// Those from the cluster were left out already, where their node ports are told apart.
    pub fn check_file(&self, desired: &Desired) -> Vec<Invalid> {
        desired
            .services
            .values()
            .filter(|s| s.origin.kubernetes_object().is_none())
            .filter_map(|s| {
                Some(Invalid {
                    origin: s.origin.clone(),
                    name: s.name.clone(),
                    frontend: s.frontend,
                    reason: self.refuse(&s.name, s.frontend.vip)?,
                })
            })
            .collect()
    }
}

/// The name `allow-reserved` knows a service by.
pub fn service_key(origin: &Origin, name: &str) -> String {
    match origin.kubernetes_object() {
        Some((namespace, name)) => format!("{namespace}/{name}"),
        None => name.to_string(),
    }
}

/// An IPv4-mapped IPv6 address is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(IpAddr::V6(v6), |v4: Ipv4Addr| IpAddr::V4(v4)),
        v4 @ IpAddr::V4(_) => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Frontend, Mode, Protocol, Service};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn reserved() -> Reserved {
        Reserved {
            node_addrs: [ip("10.0.0.1"), ip("fd00:a::1")].into(),
            pod_ranges: Vec::new(),
            ranges: vec!["10.244.0.0/16".parse().unwrap()],
            allowed: ["kube-system/ingress".to_string(), "local-dns".to_string()].into(),
        }
    }

    #[test]
    fn the_nodes_addresses_loopback_link_local_and_listed_ranges_are_reserved() {
        let r = reserved();
        for (vip, why) in [
            ("10.0.0.1", "an address of this node"),
            ("::ffff:10.0.0.1", "an address of this node"),
            ("fd00:a::1", "an address of this node"),
            ("127.0.0.53", "loopback"),
            ("::1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("239.1.1.1", "multicast"),
            ("ff02::1", "multicast"),
            ("10.244.3.7", "node.reserved-ranges"),
        ] {
            let reason = r.reason(ip(vip)).unwrap_or_else(|| panic!("{vip}"));
            assert!(reason.contains(why), "{vip}: {reason}");
        }
        for vip in ["10.96.0.10", "10.0.0.2", "fd00:96::10", "198.51.100.1"] {
            assert_eq!(r.reason(ip(vip)), None, "{vip}");
        }
    }

    #[test]
    fn named_exceptions_may_claim_reserved_addresses() {
        let r = reserved();
        assert_eq!(r.refuse("kube-system/ingress", ip("10.0.0.1")), None);
        let e = r.refuse("default/web", ip("10.0.0.1")).unwrap();
        assert!(
            e.contains("allow-reserved") && e.contains("default/web"),
            "{e}"
        );
        assert_eq!(r.refuse("default/web", ip("10.96.0.10")), None);
    }

    #[test]
    fn file_services_on_reserved_addresses_are_invalid_cluster_ones_are_not_checked_here() {
        let svc = |name: &str, origin: Origin, vip: &str| Service {
            name: name.into(),
            origin,
            frontend: Frontend {
                vip: ip(vip),
                port: 22,
                protocol: Protocol::Tcp,
            },
            mode: Mode::Snat,
            backends: Vec::new(),
            policy: None,
            affinity: None,
            source_ranges: crate::model::SourceRanges::default(),
        };
        let file = |line| Origin::File {
            path: "lb.toml".into(),
            line,
        };
        let mut d = Desired::default();
        for s in [
            svc("ssh", file(3), "10.0.0.1"),
            svc("local-dns", file(9), "127.0.0.53"),
            svc("web", file(15), "10.96.0.10"),
            // A node port: on the node's address by design.
            svc(
                "default/web:http",
                Origin::Kubernetes {
                    namespace: "default".into(),
                    name: "web".into(),
                },
                "fd00:a::1",
            ),
        ] {
            d.services.insert(s.frontend, s.into());
        }
        let invalid: Vec<String> = reserved()
            .check_file(&d)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(invalid.len(), 1, "{invalid:?}");
        assert!(
            invalid[0].starts_with(
                "lb.toml:3: service `ssh` (10.0.0.1:22/tcp): 10.0.0.1 is an address of this node"
            ),
            "{}",
            invalid[0]
        );
    }
}
