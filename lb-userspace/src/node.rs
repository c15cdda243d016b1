//! What the agent learns about this node from the kernel: its interfaces (uplinks, backend
//! interfaces, VLAN devices on uplinks), its addresses, which backends are local, and the
//! neighbour entries XDP needs: bpf_fib_lookup only finds a next hop's MAC if the kernel has
//! resolved it, so the agent keeps one "managed" entry per backend next hop (the kernel then
//! resolves and refreshes it on its own).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    model::Desired,
    netlink::{Link, Netlink, NetlinkError, RouteKind},
};

/// What reconcile needs to know about the node itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    /// Source addresses for snat services, per family (`None`: that family cannot be served).
    pub snat_ipv4: Option<Ipv4Addr>,
    pub snat_ipv6: Option<Ipv6Addr>,
    /// The node's own addresses. A VIP among them is served on its services' ports only; its
    /// other traffic stays the node's.
    pub node_addrs: BTreeSet<IpAddr>,
    /// Backends reachable through a backend-facing interface of this node.
    pub local: BTreeSet<IpAddr>,
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
    let snat_ipv4 = desired.node.snat_ipv4.or(match first_global(true) {
        Some(IpAddr::V4(a)) => Some(a),
        _ => None,
    });
    let snat_ipv6 = desired.node.snat_ipv6.or(match first_global(false) {
        Some(IpAddr::V6(a)) => Some(a),
        _ => None,
    });
    let node_addrs = addrs.iter().filter(|a| a.global).map(|a| a.addr).collect();
    let backend_ifaces: BTreeSet<u32> = ifaces.backends.iter().map(|l| l.ifindex).collect();
    let mut local = BTreeSet::new();
    for addr in backend_addrs(desired) {
        if let Some(route) = nl.route_get(addr)?
            && route.kind == RouteKind::Unicast
            && backend_ifaces.contains(&route.oif)
        {
            local.insert(addr);
        }
    }
    Ok(NodeView {
        snat_ipv4,
        snat_ipv6,
        node_addrs,
        local,
    })
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

fn backend_addrs(desired: &Desired) -> BTreeSet<IpAddr> {
    desired
        .services
        .values()
        .flat_map(|s| s.backends.iter().map(|b| b.addr))
        .collect()
}

/// The managed neighbour entries this agent made, so it can remove the ones no longer needed.
#[derive(Default)]
pub struct Neighbours {
    managed: BTreeSet<(u32, IpAddr)>,
}

impl Neighbours {
    /// Gives up the entries made so far (for removal at shutdown).
    pub fn drain(&mut self) -> Vec<(u32, IpAddr)> {
        std::mem::take(&mut self.managed).into_iter().collect()
    }

    /// Makes sure every backend's next hop has a managed entry. Returns problems (a backend
    /// without a route) for the log; they do not stop anything else.
    pub fn sync(&mut self, nl: &mut Netlink, desired: &Desired) -> Vec<String> {
        let mut problems = Vec::new();
        let mut wanted: BTreeMap<(u32, IpAddr), ()> = BTreeMap::new();
        for addr in backend_addrs(desired) {
            match nl.route_get(addr) {
                Ok(Some(r)) if r.kind == RouteKind::Unicast => {
                    wanted.insert((r.oif, r.gateway.unwrap_or(addr)), ());
                }
                Ok(Some(_)) => {} // Local (host network): no neighbour needed.
                Ok(None) => problems.push(format!("backend {addr}: no route")),
                Err(e) => problems.push(format!("backend {addr}: {e}")),
            }
        }
        for key in wanted.keys() {
            if !self.managed.contains(key) {
                match nl.ensure_managed_neighbour(key.0, key.1) {
                    Ok(()) => {
                        self.managed.insert(*key);
                    }
                    Err(e) => {
                        problems.push(format!("neighbour {} on ifindex {}: {e}", key.1, key.0))
                    }
                }
            }
        }
        let stale: Vec<(u32, IpAddr)> = self
            .managed
            .iter()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            let _ = nl.remove_neighbour(key.0, key.1);
            self.managed.remove(&key);
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

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
