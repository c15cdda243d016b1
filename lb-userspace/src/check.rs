//! `lb-agent check`: a config file through every rule `lb-agent run` applies to it, by the same
//! code: parsing and validation ([`crate::config`]), then admission and a full apply by the
//! reconciler into in-memory maps ([`Reconciler::apply_admitting`]), against a node view. Without the live node (no --uplink) the
//! rules that need it are taken as met and named in the report, so "ok" never hides them.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use crate::{
    config::{self, ConfigError},
    dataplane::Sizes,
    model::{Desired, Mode},
    node::NodeView,
    reconcile::{ApplyError, Reconciler},
    tables::MemoryTables,
};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// What the running agent would refuse to apply.
    #[error(transparent)]
    Rejected(#[from] ApplyError),
}

/// A config that passed.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    pub services: usize,
    pub policies: usize,
    /// Rules that need the live node and were not checked, each with the services it concerns.
    pub unchecked: Vec<String>,
}

/// Checks the config file at `path` (read from disk) for an agent started with `sizes`;
/// `node`: this node's view (from --uplink), or `None` to take node-dependent rules as met.
pub fn check_file(
    path: &Path,
    sizes: Sizes,
    node: Option<&NodeView>,
) -> Result<Checked, CheckError> {
    let desired = config::load(path)?;
    check(&desired, sizes, node)
}

/// [`check_file`] for an already parsed config.
pub fn check(
    desired: &Desired,
    sizes: Sizes,
    node: Option<&NodeView>,
) -> Result<Checked, CheckError> {
    let (node, unchecked) = match node {
        Some(n) => (n.clone(), Vec::new()),
        None => assume_node(desired),
    };
    // A fresh agent's maps: capacities and ring building are checked as they would be at start.
    Reconciler::new(sizes).apply_admitting(desired, &node, &mut MemoryTables::default())?;
    Ok(Checked {
        services: desired.services.len(),
        policies: desired.policies.len(),
        unchecked,
    })
}

/// A node on which every node-dependent rule holds, and what that assumes.
fn assume_node(desired: &Desired) -> (NodeView, Vec<String>) {
    let mut unchecked = Vec::new();
    let names = |pick: &dyn Fn(&crate::model::Service) -> bool| {
        desired
            .services
            .values()
            .filter(|s| pick(s))
            .map(|s| format!("`{}`", s.name))
            .collect::<Vec<_>>()
    };
    for (v4, configured, field) in [
        (true, !desired.node.snat_ipv4.is_empty(), "snat-ipv4"),
        (false, !desired.node.snat_ipv6.is_empty(), "snat-ipv6"),
    ] {
        let concerned = names(&|s| s.mode == Mode::Snat && s.frontend.vip.is_ipv4() == v4);
        if !configured && !concerned.is_empty() {
            unchecked.push(format!(
                "snat over IPv{} needs a source address, and node.{field} is not set: the agent takes the uplink's first global address (services {})",
                if v4 { 4 } else { 6 },
                concerned.join(", ")
            ));
        }
    }
    let preserving = names(&|s| s.mode == Mode::PreserveClientIp && !s.backends.is_empty());
    if !preserving.is_empty() {
        unchecked.push(format!(
            "preserve-client-ip needs every backend reachable through a backend interface of the node, which its routes decide (services {})",
            preserving.join(", ")
        ));
    }
    if !desired.services.is_empty() {
        unchecked.push(
            "no service may claim an address of the node, which its interfaces decide: services on the node's own addresses are refused when applied".to_string(),
        );
    }
    let local: BTreeSet<IpAddr> = desired
        .services
        .values()
        .flat_map(|s| s.backends.iter().map(|b| b.addr))
        .collect();
    let node = NodeView {
        snat_ipv4: or_placeholder(&desired.node.snat_ipv4, Ipv4Addr::UNSPECIFIED),
        snat_ipv6: or_placeholder(&desired.node.snat_ipv6, Ipv6Addr::UNSPECIFIED),
        node_addrs: BTreeSet::new(),
        local,
        broadcast: BTreeSet::new(),
        // Unknown without the node: the snat ports are not checked against its own.
        ephemeral_ports: None,
    };
    (node, unchecked)
}

/// The configured snat addresses, or a stand-in for the one the agent will find on the uplink.
fn or_placeholder<A: Copy>(configured: &[A], placeholder: A) -> Vec<A> {
    if configured.is_empty() {
        vec![placeholder]
    } else {
        configured.to_vec()
    }
}

#[cfg(test)]
mod tests;
