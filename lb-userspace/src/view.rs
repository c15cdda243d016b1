//! What the agent publishes after each change: a read-only copy of its health and of the names
//! and ids it gave things. The metrics server reads it from its own thread and the state file is
//! written from it, so neither ever waits for the agent's work (a long apply, a sweep).
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;

use crate::{
    dataplane::Sizes,
    health::Health,
    model::Backend,
    state::{self, InterfaceLabel, ServiceLabel, State},
    system::monotonic_ns,
};

/// One applied service: its labels and the map ids its counters are under. Made once per
/// change of the service and shared by the views after it: rebuilding 20,000 of them (and
/// their part of the state file) after every apply was a third of an endpoint change's time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    pub label: ServiceLabel,
    /// LB_SVC_STATS index.
    pub id: u32,
    pub backends: Vec<BackendView>,
    /// Its part of the state files: the label, and its backends' zones if it has any.
    state: (Box<str>, Option<Box<str>>),
}

impl ServiceView {
    pub fn new(label: ServiceLabel, id: u32, backends: Vec<BackendView>) -> ServiceView {
        let state = state::parts(&label);
        ServiceView {
            label,
            id,
            backends,
            state,
        }
    }
}

/// A backend of an applied service. Its name is made when asked for (a string per backend was
/// 8 MiB of every view at 200,000 backends, for series written only below
/// `--metrics-max-backends`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendView {
    pub addr: IpAddr,
    pub port: u16,
    /// LB_BE_STATS index.
    pub id: u32,
    pub weight: u32,
}

impl BackendView {
    /// "addr:port" as Maglev hashes it.
    pub fn name(&self) -> String {
        Backend {
            addr: self.addr,
            port: self.port,
            weight: self.weight,
        }
        .maglev_key()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentView {
    pub health: Health,
    /// Where the desired state comes from ("kubernetes + config /etc/xdplb/lb.toml").
    pub inputs: String,
    /// Shared between views that differ only in their health (a sweep's figures), so that
    /// publishing those costs no copy of 20,000 services.
    pub services: Arc<Vec<Arc<ServiceView>>>,
    pub interfaces: Vec<InterfaceLabel>,
    /// Rate-limit policy names by id.
    pub policies: BTreeMap<u32, String>,
    pub sizes: Sizes,
    /// This node's zone (Kubernetes).
    pub zone: Option<String>,
}

impl AgentView {
    /// The state file's contents.
    pub fn state(&self) -> State {
        State {
            services: self.services.iter().map(|s| s.label.clone()).collect(),
            ..self.state_head()
        }
    }

    /// Writes the state files: [`AgentView::state`] as [`State::write`] writes it, from each
    /// service's part made with it (no copy of the labels, nothing serialized again).
    pub fn write_state(&self, state_dir: &std::path::Path) -> std::io::Result<()> {
        let head = self.state_head();
        let parts = self
            .services
            .iter()
            .map(|s| (&*s.state.0, s.state.1.as_deref()));
        state::write_parts(state_dir, &head, parts)
    }

    /// What the state file holds besides the services (none here): writing it again is needed
    /// when this or the services changed.
    pub fn state_head(&self) -> State {
        State {
            pid: std::process::id(),
            inputs: self.inputs.clone(),
            ready: self.health.ready,
            last_error: self.health.last_error.clone(),
            not_served: self.health.not_served.clone(),
            applied: self.health.reloads_applied,
            rejected: self.health.reloads_rejected,
            services: Vec::new(),
            interfaces: self.interfaces.clone(),
            policies: self.policies.clone(),
            zone: self.zone.clone(),
        }
    }
}

/// The agent's end: publishes a new view (readers see either the old one or the new one whole),
/// and beats while its loop makes progress.
pub struct Publisher(watch::Sender<Arc<AgentView>>, Arc<AtomicU64>);

/// A reader's end: cheap to clone, never blocks the publisher for longer than a pointer swap.
#[derive(Clone)]
pub struct Views(watch::Receiver<Arc<AgentView>>, Arc<AtomicU64>);

pub fn channel() -> (Publisher, Views) {
    let (tx, rx) = watch::channel(Arc::new(AgentView::default()));
    let beat = Arc::new(AtomicU64::new(monotonic_ns()));
    (Publisher(tx, beat.clone()), Views(rx, beat))
}

impl Publisher {
    /// Publishes `view` if it differs from the last one; true if it did.
    pub fn publish(&self, view: AgentView) -> bool {
        self.0.send_if_modified(|current| {
            if **current == view {
                return false;
            }
            *current = Arc::new(view);
            true
        })
    }

    /// Publishes the current view with `health` instead of its own, if that differs (after a
    /// sweep: nothing but its figures changed, and building the whole view again took most of
    /// an idle agent's CPU at 10,000 Services); true if it did.
    pub fn publish_health(&self, health: &Health) -> bool {
        self.0.send_if_modified(|current| {
            if current.health == *health {
                return false;
            }
            let mut view = AgentView::clone(&**current);
            view.health = health.clone();
            *current = Arc::new(view);
            true
        })
    }

    pub fn views(&self) -> Views {
        Views(self.0.subscribe(), self.1.clone())
    }

    /// The agent's loop went round (it beats once a second when idle, and after each piece of
    /// work): `/healthz` fails when it stops.
    pub fn beat(&self) {
        self.1.store(monotonic_ns(), Ordering::Relaxed);
    }
}

impl Views {
    /// The latest view.
    pub fn latest(&self) -> Arc<AgentView> {
        self.0.borrow().clone()
    }

    /// How long since the agent's loop last beat.
    pub fn since_beat(&self) -> Duration {
        Duration::from_nanos(monotonic_ns().saturating_sub(self.1.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_how_long_since_the_loop_beat() {
        let (publisher, views) = channel();
        std::thread::sleep(Duration::from_millis(60));
        let quiet = views.since_beat();
        assert!(quiet >= Duration::from_millis(40), "{quiet:?}");
        publisher.beat();
        assert!(views.since_beat() < quiet, "a beat resets it");
        assert!(publisher.views().since_beat() < quiet, "for every reader");
    }

    #[test]
    fn readers_see_the_latest_view_and_equal_views_are_not_republished() {
        let (publisher, views) = channel();
        let mut view = AgentView::default();
        view.health.ready = true;
        assert!(publisher.publish(view.clone()));
        assert!(!publisher.publish(view.clone()), "nothing changed");
        let mut health = view.health.clone();
        assert!(!publisher.publish_health(&health), "nothing changed");
        health.flow_entries = 7;
        assert!(publisher.publish_health(&health));
        assert_eq!(views.latest().health.flow_entries, 7);
        assert!(views.latest().health.ready, "the rest of the view stays");
        assert!(views.latest().health.ready);
        let state = views.latest().state();
        assert!(state.ready);
        assert_eq!(state.pid, std::process::id());
    }
}
