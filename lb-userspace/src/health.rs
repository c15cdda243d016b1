//! What the agent reports about itself: readiness, reloads, sweeps, and the Kubernetes input's
//! progress. Plain data (no imports from the rest of the agent): the agent fills it, and the
//! metrics server, `/readyz` and the state file read copies of it.

/// The agent's own figures, as of its last change.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    /// The desired state has been applied at least once and the data path is attached.
    pub ready: bool,
    pub reloads_applied: u64,
    pub reloads_rejected: u64,
    pub last_error: Option<String>,
    /// Services of the desired state that are not served, each with why (the node cannot serve
    /// it, or the maps have no room for it yet: retried on each apply).
    pub not_served: Vec<String>,
    /// Entries in the flow and source tables at the last sweep.
    pub flow_entries: usize,
    pub source_entries: usize,
    /// LB_RINGS slots held by rings after the last apply.
    pub ring_slots: u64,
    /// Flow entries all sweeps removed (flows that are over).
    pub swept_flows: u64,
    pub map_writes: u64,
    /// With --kubernetes.
    pub kubernetes: Option<KubeHealth>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KubeHealth {
    /// Services and EndpointSlices are fully listed and being watched.
    pub synced: bool,
    /// Objects the watchers hold.
    pub services_seen: usize,
    pub slices_seen: usize,
    /// Services that opted in, and the frontends they make.
    pub services_enabled: usize,
    pub frontends: usize,
    pub watch_errors: u64,
    pub watch_events: u64,
    /// Desired states from the cluster that could not be applied in whole (the last good one
    /// stays), and Services left out because the node cannot serve them.
    pub apply_errors: u64,
    pub problems: usize,
    /// Flows ended after a deregistration delay.
    pub flows_ended: u64,
    /// The watchers' last error (they list again after each).
    pub watch_error: Option<String>,
    /// Why the cluster's current state is not applied, if it is not.
    pub apply_error: Option<String>,
}

impl Health {
    /// Ready to serve: applied, attached, and (with Kubernetes) synced with the API server.
    /// `Err`: why not, for `/readyz`.
    pub fn readiness(&self) -> Result<(), String> {
        if let Some(k) = &self.kubernetes
            && !k.synced
        {
            let why = k.watch_error.as_deref().unwrap_or("listing");
            return Err(format!("not synced with the Kubernetes API server: {why}"));
        }
        if !self.ready {
            return Err(self
                .last_error
                .clone()
                .unwrap_or_else(|| "the desired state is not applied yet".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_an_applied_state_and_a_synced_cluster() {
        let mut h = Health::default();
        assert_eq!(
            h.readiness().unwrap_err(),
            "the desired state is not applied yet"
        );
        h.last_error = Some("lb.toml:3: services[0].port: must be 1..=65535".into());
        assert!(h.readiness().unwrap_err().contains("lb.toml:3"));
        h.ready = true;
        assert_eq!(h.readiness(), Ok(()));
        h.kubernetes = Some(KubeHealth {
            watch_error: Some("connection refused".into()),
            ..KubeHealth::default()
        });
        assert_eq!(
            h.readiness().unwrap_err(),
            "not synced with the Kubernetes API server: connection refused"
        );
        h.kubernetes.as_mut().unwrap().synced = true;
        assert_eq!(h.readiness(), Ok(()));
    }
}
