//! What the agent learns about this node from the kernel: its interfaces (uplinks, backend
//! interfaces, VLAN devices on uplinks), its addresses, and which backends are local. (The
//! neighbour entries it keeps for backends' next hops are `neighbours`'.)
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    model::Desired,
    netlink::{Link, Netlink, NetlinkError, RouteKind},
};

/// What reconcile needs to know about the node itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    /// Source addresses for snat services, per family (empty: that family cannot be served).
    pub snat_ipv4: Vec<Ipv4Addr>,
    pub snat_ipv6: Vec<Ipv6Addr>,
    /// The node's own addresses. A VIP among them is served on its services' ports only; its
    /// other traffic stays the node's.
    pub node_addrs: BTreeSet<IpAddr>,
    /// Backends reachable through a backend-facing interface of this node.
    pub local: BTreeSet<IpAddr>,
    /// Other addresses that are no client: the broadcast addresses of the node's subnets.
    pub broadcast: BTreeSet<IpAddr>,
    /// The node's ephemeral port range (`net.ipv4.ip_local_port_range`): snat must not use it.
    pub ephemeral_ports: Option<(u16, u16)>,
}

impl NodeView {
    /// The node's own addresses: its global ones and its snat source addresses.
    pub fn own_addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.node_addrs
            .iter()
            .copied()
            .chain(self.snat_ipv4.iter().copied().map(IpAddr::V4))
            .chain(self.snat_ipv6.iter().copied().map(IpAddr::V6))
    }

    /// The snat source ports: the configured ones, or the default for this node.
    pub fn snat_ports(&self, settings: &crate::model::NodeSettings) -> Vec<(u16, u16)> {
        settings.snat_ports.clone().unwrap_or_else(|| {
            crate::model::default_snat_ports(
                self.ephemeral_ports
                    .unwrap_or(crate::model::LINUX_EPHEMERAL_PORTS),
            )
        })
    }
}

/// The configured snat addresses that are none of the node's: replies to them reach this node
/// only if the network routes them here (a secondary private IP of its ENI does; an address
/// from nowhere does not, and every snat flow then goes unanswered). A warning each, not an
/// error: the network's routing is not the node's to see.
pub fn snat_elsewhere(node: &NodeView, desired: &Desired) -> Vec<String> {
    let configured = desired
        .node
        .snat_ipv4
        .iter()
        .map(|a| ("snat-ipv4", IpAddr::V4(*a)))
        .chain(
            desired
                .node
                .snat_ipv6
                .iter()
                .map(|a| ("snat-ipv6", IpAddr::V6(*a))),
        );
    configured
        .filter(|(_, a)| !node.node_addrs.contains(a))
        .map(|(field, a)| {
            format!(
                "node.{field} {a} is not an address of this node: snat flows' replies come back to it only if the network routes it to this node (e.g. a secondary private IP of its ENI); else they go unanswered"
            )
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("uplink interface {0} does not exist")]
    NoUplink(String),
    #[error("reading the node's network state: {0}")]
    Netlink(#[from] NetlinkError),
}

/// Uplinks and backend interfaces by (name, ifindex), and VLANs: see [`Interfaces::identity`].
pub type Identity<'a> = (
    Vec<(&'a str, u32)>,
    Vec<(&'a str, u32)>,
    &'a [(u32, u32, u16)],
);

/// The interfaces the data path is attached to, by role.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interfaces {
    pub uplinks: Vec<Link>,
    /// Interfaces facing local backends (matching --backend-ifaces, not uplinks).
    pub backends: Vec<Link>,
    /// VLAN devices on uplinks: (ifindex, parent ifindex, VLAN id).
    pub vlans: Vec<(u32, u32, u16)>,
}

impl Interfaces {
    pub fn scan(
        nl: &mut Netlink,
        uplinks: &[String],
        patterns: &[String],
    ) -> Result<Interfaces, NodeError> {
        let links = nl.links()?;
        let mut found = Interfaces::default();
        for name in uplinks {
            let link = links
                .iter()
                .find(|l| &l.name == name)
                .ok_or_else(|| NodeError::NoUplink(name.clone()))?;
            found.uplinks.push(link.clone());
        }
        let uplink_index: BTreeSet<u32> = found.uplinks.iter().map(|l| l.ifindex).collect();
        for l in &links {
            if uplink_index.contains(&l.ifindex) || l.name == "lo" {
                continue;
            }
            if patterns.iter().any(|p| glob_match(p, &l.name)) {
                found.backends.push(l.clone());
            }
            if let Some((parent, id)) = l.vlan
                && uplink_index.contains(&parent)
            {
                found.vlans.push((l.ifindex, parent, id));
            }
        }
        Ok(found)
    }

    /// What makes the set different for attaching: names and indexes by role (not state such
    /// as whether XDP is attached, which attaching itself changes).
    pub fn identity(&self) -> Identity<'_> {
        fn ids(v: &[Link]) -> Vec<(&str, u32)> {
            v.iter().map(|l| (l.name.as_str(), l.ifindex)).collect()
        }
        (ids(&self.uplinks), ids(&self.backends), &self.vlans)
    }

    /// Every interface a redirect may target.
    pub fn all(&self) -> impl Iterator<Item = &Link> {
        self.uplinks.iter().chain(self.backends.iter())
    }
}

/// Computes the node view for `desired`: snat addresses (configured, or the first uplink's
/// first global address), the node's own addresses, and which backends are local.
pub fn view(
    nl: &mut Netlink,
    desired: &Desired,
    ifaces: &Interfaces,
) -> Result<NodeView, NodeError> {
    let addrs = nl.addresses()?;
    let uplink = ifaces.uplinks.first().map(|l| l.ifindex);
    let first_global = |v4: bool| {
        addrs
            .iter()
            .find(|a| Some(a.ifindex) == uplink && a.global && a.addr.is_ipv4() == v4)
            .map(|a| a.addr)
    };
    let mut snat_ipv4 = desired.node.snat_ipv4.clone();
    if snat_ipv4.is_empty()
        && let Some(IpAddr::V4(a)) = first_global(true)
    {
        snat_ipv4.push(a);
    }
    let mut snat_ipv6 = desired.node.snat_ipv6.clone();
    if snat_ipv6.is_empty()
        && let Some(IpAddr::V6(a)) = first_global(false)
    {
        snat_ipv6.push(a);
    }
    let node_addrs = addrs.iter().filter(|a| a.global).map(|a| a.addr).collect();
    let backend_ifaces: BTreeSet<u32> = ifaces.backends.iter().map(|l| l.ifindex).collect();
    let mut local = BTreeSet::new();
    for addr in backend_addrs(desired) {
        if let Some(route) = nl.route(addr)?
            && route.kind == RouteKind::Unicast
            && backend_ifaces.contains(&route.oif)
        {
            local.insert(addr);
        }
    }
    // The directed broadcast address of each IPv4 subnet the node is on: no client.
    let broadcast = addrs
        .iter()
        .filter_map(|a| match a.addr {
            IpAddr::V4(v4) if a.prefix_len < 31 => {
                let host_bits = 32 - u32::from(a.prefix_len);
                Some(IpAddr::V4(
                    (u32::from(v4) | ((1u32 << host_bits) - 1)).into(),
                ))
            }
            _ => None,
        })
        .collect();
    Ok(NodeView {
        snat_ipv4,
        snat_ipv6,
        node_addrs,
        local,
        broadcast,
        ephemeral_ports: ephemeral_ports(),
    })
}

/// The node view `current` was for, after backends at `came` appeared and the last ones at
/// `went` went: only those addresses are looked up (the node's own addresses and routes did
/// not change, else the whole view is read again).
pub fn with_addrs(
    nl: &mut Netlink,
    current: &NodeView,
    ifaces: &Interfaces,
    came: &[IpAddr],
    went: &[IpAddr],
) -> Result<NodeView, NodeError> {
    let mut node = current.clone();
    for addr in went {
        node.local.remove(addr);
    }
    for addr in came {
        if let Some(route) = nl.route(*addr)?
            && route.kind == RouteKind::Unicast
            && ifaces.backends.iter().any(|l| l.ifindex == route.oif)
        {
            node.local.insert(*addr);
        }
    }
    Ok(node)
}

/// The node's ephemeral port range (`net.ipv4.ip_local_port_range`, which also applies to IPv6),
/// read in the network namespace the agent runs in.
pub fn ephemeral_ports() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

/// The uplinks' global addresses: where clients (and an NLB with instance targets) reach the
/// node, so where node ports are served.
pub fn uplink_addrs(nl: &mut Netlink, ifaces: &Interfaces) -> Result<Vec<IpAddr>, NodeError> {
    let uplinks: BTreeSet<u32> = ifaces.uplinks.iter().map(|l| l.ifindex).collect();
    Ok(nl
        .addresses()?
        .into_iter()
        .filter(|a| a.global && uplinks.contains(&a.ifindex))
        .map(|a| a.addr)
        .collect())
}

/// Shell-style match with `*` (any run) and `?` (any one character), for --backend-interfaces.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

pub(crate) fn backend_addrs(desired: &Desired) -> BTreeSet<IpAddr> {
    desired
        .services
        .values()
        .flat_map(|s| s.backends.iter().map(|b| b.addr))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{NodeView, glob_match, snat_elsewhere};

    #[test]
    fn a_configured_snat_address_off_the_node_is_named() {
        let mut desired = crate::model::Desired::default();
        desired.node.snat_ipv4 = vec!["10.0.0.1".parse().unwrap(), "10.0.0.9".parse().unwrap()];
        let node = NodeView {
            node_addrs: ["10.0.0.1".parse().unwrap()].into(),
            ..NodeView::default()
        };
        let w = snat_elsewhere(&node, &desired);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("node.snat-ipv4 10.0.0.9 is not an address of this node"),
            "{w:?}"
        );
        // Unset: the agent takes the uplink's own address, nothing to say.
        assert!(snat_elsewhere(&node, &crate::model::Desired::default()).is_empty());
    }

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob_match("eni*", "eni1a2b3c4d5e6"));
        assert!(glob_match("veth*", "veth"));
        assert!(glob_match("vethpod?", "vethpod1"));
        assert!(!glob_match("vethpod?", "vethpod12"));
        assert!(!glob_match("eni*", "eth0"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("lxc*c", "lxc12c"));
        assert!(!glob_match("lxc*c", "lxc12d"));
    }
}
