//! The agent as the Kubernetes input's [`Target`]: takes the cluster's translation, applies it
//! with the config file's part, and ends the flows whose deregistration delay ran out.
use std::{collections::BTreeSet, net::IpAddr};

use log::{debug, info, warn};

use super::{Agent, describe};
use crate::{
    health::KubeHealth,
    k8s::{EndFlows, Problem, Translation, input::Target},
    model::Backend,
    reconcile::ApplyError,
    reserved::Reserved,
    sweep::{Ending, end_flows},
};

impl Target for Agent {
    fn named_policies(&self) -> BTreeSet<String> {
        self.inputs.file.policies.keys().cloned().collect()
    }

    fn node_addrs(&mut self) -> Vec<IpAddr> {
        self.uplink_addrs.clone()
    }

    /// The node's own addresses (as the node view has them, and the uplinks'), less those
    /// kube-proxy in IPVS mode binds for Services on its dummy device: those are Services'.
    fn reserved(&mut self) -> Reserved {
        let services = self.kube_ipvs_addrs();
        let own: Vec<IpAddr> = self
            .node
            .own_addrs()
            .chain(self.uplink_addrs.iter().copied())
            .filter(|a| !services.contains(a))
            .collect();
        Reserved::for_node(&self.inputs.file.node, own)
    }

    fn prefer_same_zone(&self) -> bool {
        self.args.prefer_same_zone || self.inputs.file.node.prefer_same_zone
    }

    fn apply_kubernetes(&mut self, translation: Translation) -> Result<Vec<Problem>, ApplyError> {
        let previous = self.inputs.kube.replace(translation);
        let started = std::time::Instant::now();
        match self.apply_inputs() {
            Ok(result) => {
                let (report, mut problems) = result.unwrap_or_default();
                let applied = started.elapsed();
                if !report.is_empty() {
                    info!(
                        "applied the cluster's state in {:.1} ms: {}",
                        applied.as_secs_f64() * 1e3,
                        describe(&report)
                    );
                }
                let translation = self.inputs.kube.as_ref().expect("just set");
                problems.extend(translation.problems.iter().cloned());
                let ends = translation.end_flows.clone();
                self.end_drained_flows(&ends);
                let published = std::time::Instant::now();
                self.publish();
                debug!(
                    "the cluster's state: applied in {:.1} ms, published in {:.1} ms",
                    applied.as_secs_f64() * 1e3,
                    published.elapsed().as_secs_f64() * 1e3
                );
                Ok(problems)
            }
            Err(e) => {
                // The drains the rejected translation began or finished are lost with it; the
                // translator starts them again on the next change.
                self.inputs.kube = previous;
                Err(e)
            }
        }
    }

    fn kube_health(&mut self) -> &mut KubeHealth {
        self.health
            .kubernetes
            .get_or_insert_with(KubeHealth::default)
    }
}

/// The dummy device kube-proxy's IPVS mode binds every Service address to.
const KUBE_IPVS_DEVICE: &str = "kube-ipvs0";

impl Agent {
    /// The addresses on [`KUBE_IPVS_DEVICE`], if there is one: as last read, until the node
    /// changes (a link or address notification).
    fn kube_ipvs_addrs(&mut self) -> BTreeSet<IpAddr> {
        if let Some(addrs) = &self.kube_ipvs {
            return addrs.clone();
        }
        // Not kept when the kernel failed to answer: asked again next time.
        self.read_kube_ipvs_addrs().unwrap_or_default()
    }

    fn read_kube_ipvs_addrs(&mut self) -> Option<BTreeSet<IpAddr>> {
        let links = self
            .netlink
            .links()
            .map_err(|e| warn!("listing the node's interfaces: {e}"))
            .ok()?;
        let addrs = match links.into_iter().find(|l| l.name == KUBE_IPVS_DEVICE) {
            None => BTreeSet::new(),
            Some(device) => self
                .netlink
                .addresses()
                .map_err(|e| warn!("reading the node's addresses: {e}"))
                .ok()?
                .into_iter()
                .filter(|a| a.ifindex == device.ifindex)
                .map(|a| a.addr)
                .collect(),
        };
        self.kube_ipvs = Some(addrs.clone());
        Some(addrs)
    }

    fn end_drained_flows(&mut self, ends: &[EndFlows]) {
        // Those whose frontend is still in the maps (its service id names the flows).
        let (ends, endings): (Vec<&EndFlows>, Vec<Ending>) = ends
            .iter()
            .filter_map(|e| {
                let svc = crate::tables::Tables::service(&self.maps, &e.frontend.key())?;
                Some((
                    e,
                    Ending {
                        service: svc.id,
                        backend: e.backend.0.into(),
                        port: e.backend.1,
                        reset: e.reset,
                    },
                ))
            })
            .unzip();
        let counts = end_flows(&mut self.maps, &endings);
        for (e, n) in ends.iter().zip(counts) {
            info!(
                "{}: deregistration delay of backend {} over: {n} flows {}",
                e.frontend,
                Backend {
                    addr: e.backend.0,
                    port: e.backend.1,
                    weight: 0
                }
                .maglev_key(),
                if e.reset { "reset" } else { "ended" }
            );
            if let Some(k) = &mut self.health.kubernetes {
                k.flows_ended += n as u64;
            }
        }
    }
}
