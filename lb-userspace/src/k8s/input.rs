//! The cluster as an input of desired state for the running agent: a client, the watchers,
//! the translator, Events and health-check servers, stepped by the agent's loop. What it
//! applies to is a [`Target`] (the agent implements it; tests use in-memory maps).
use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use kube::{Client, Config, config::KubeConfigOptions};
use log::{debug, info, warn};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::watch as latest;

use super::{
    NodeInfo, Problem, Translation, Translator, drains, events::Events, health::HealthServers,
    watch::Watch,
};
use crate::{health::KubeHealth, model::NodeSettings, reconcile::ApplyError, reserved::Reserved};

/// What the cluster's state is applied to: the agent (its maps), or a stand-in in tests.
pub trait Target {
    /// Rate-limit policies the node config names (Services may refer to them).
    fn named_policies(&self) -> BTreeSet<String>;
    /// The node's addresses that node ports are served on.
    fn node_addrs(&mut self) -> Vec<IpAddr>;
    /// The addresses a Service may not claim as a frontend (default: those always reserved and
    /// the node ports' addresses).
    fn reserved(&mut self) -> Reserved {
        Reserved::for_node(&NodeSettings::default(), self.node_addrs())
    }
    /// The node option `prefer-same-zone`: same zone first for Services that ask nothing.
    fn prefer_same_zone(&self) -> bool {
        false
    }
    /// Composes and applies; returns the problems to report, or why nothing was applied (the
    /// last good state stays).
    fn apply_kubernetes(&mut self, translation: Translation) -> Result<Vec<Problem>, ApplyError>;
    fn kube_health(&mut self) -> &mut KubeHealth;
}

/// How often the Event reporter looks again at problems that did not change.
const REPORT_TICK: Duration = Duration::from_secs(5);

/// A burst of changes is applied at once when it pauses for this long, or once it went on for
/// [`COALESCE_MAX`]. A lone change waits only the pause (it waited 50 ms, half of the 100 ms a
/// change may take); 100 Services changed together still go in a step or two, not one each.
pub const COALESCE: Duration = Duration::from_millis(10);
pub const COALESCE_MAX: Duration = Duration::from_millis(50);

pub struct KubeInput {
    node_name: String,
    pub watch: Watch,
    translator: Translator,
    /// Where the drains in progress are kept across restarts, and the drains last written there.
    drains: Option<(PathBuf, drains::DrainState)>,
    /// The problems to report; a task posts Events for them (slowly if the API server is).
    problems: latest::Sender<Vec<Problem>>,
    reporter: tokio::task::JoinHandle<()>,
    health_checks: HealthServers,
    /// The last change already applied, for the sync latency.
    applied_change: Option<Instant>,
    last_error: Option<String>,
    /// What the last step translated from, and when; see [`KubeInput::step`].
    last_step: Option<(StepInputs, Instant)>,
    /// Seconds from a change seen by a watcher to the maps holding it.
    pub sync_latency: Histogram,
}

/// What a translation depends on besides the clock: when none of it changed, no drain ran out
/// and nothing was left to retry, a step would produce what is applied already.
#[derive(PartialEq)]
struct StepInputs {
    events: u64,
    errors: u64,
    node: NodeInfo,
    policies: BTreeSet<String>,
}

/// How often a step runs all the same when its inputs stay the same: a safety net (the drains'
/// deadlines are followed; nothing else in a translation reads the clock).
const STEP_AT_LEAST_EVERY: Duration = Duration::from_secs(60);

impl Drop for KubeInput {
    fn drop(&mut self) {
        self.reporter.abort();
    }
}

impl KubeInput {
    /// A client from `kubeconfig`, else the in-cluster service account or ~/.kube/config. Does
    /// not need the API server to be up: the watchers keep trying.
    pub async fn connect(kubeconfig: Option<&Path>, node_name: String) -> Result<KubeInput> {
        let config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
                Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                    .await
                    .with_context(|| format!("the kubeconfig {}", path.display()))?
            }
            None => Config::infer().await.context(
                "no Kubernetes API server: neither in a cluster nor a kubeconfig (--kubeconfig)",
            )?,
        };
        let client = Client::try_from(config).context("Kubernetes client")?;
        let watch = Watch::start(client.clone(), &node_name);
        let (problems, mut rx) = latest::channel(Vec::<Problem>::new());
        let mut events = Events::new(node_name.clone());
        let reporter = tokio::spawn(async move {
            loop {
                // On every change, and now and then for re-posts held back by the rate limit.
                if let Ok(Err(_)) = tokio::time::timeout(REPORT_TICK, rx.changed()).await {
                    break;
                }
                let p = rx.borrow_and_update().clone();
                events.report(&client, &p).await;
            }
        });
        Ok(KubeInput {
            node_name,
            watch,
            translator: Translator::default(),
            drains: None,
            problems,
            reporter,
            health_checks: HealthServers::default(),
            applied_change: None,
            last_error: None,
            last_step: None,
            sync_latency: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
        })
    }

    /// Keeps the drains in progress in `state_dir` (written whenever they change), and takes up
    /// those a previous agent left there: a drain begun before a restart still ends on time.
    pub fn keep_drains_in(&mut self, state_dir: &Path) {
        let saved = drains::read(state_dir);
        if !saved.is_empty() {
            info!(
                "taking up {} drains in progress from {}",
                saved.len(),
                drains::path(state_dir).display()
            );
        }
        self.translator
            .restore(&saved, Instant::now(), SystemTime::now());
        self.drains = Some((state_dir.to_path_buf(), self.translator.drain_state()));
    }

    /// Writes the drains in progress if they changed since last written.
    fn save_drains(&mut self) {
        let Some((dir, written)) = &mut self.drains else {
            return;
        };
        let now = self.translator.drain_state();
        if now == *written {
            return;
        }
        let saved = self
            .translator
            .saved_drains(Instant::now(), SystemTime::now());
        match drains::write(dir, &saved) {
            Ok(()) => *written = now,
            // Tried again at the next step; meanwhile a restart would forget the newest.
            Err(e) => warn!("writing {}: {e}", drains::path(dir).display()),
        }
    }

    /// Brings the target up to date with the cluster (cheap when nothing changed: the composed
    /// state is compared before anything is written). Also runs every tick, for drains that
    /// end with time.
    pub fn step(&mut self, target: &mut impl Target) {
        let status = self.watch.status();
        let h = target.kube_health();
        h.synced = status.synced();
        h.watch_errors = status.errors;
        h.watch_events = status.events;
        h.watch_error.clone_from(&status.last_error);
        if !status.synced() {
            return;
        }
        // The zone and pod ranges come with the snapshot; a change of them is a watch event.
        let mut node = NodeInfo {
            name: self.node_name.clone(),
            addrs: target.node_addrs(),
            reserved: target.reserved(),
            zone: None,
            prefer_same_zone: target.prefer_same_zone(),
        };
        let inputs = StepInputs {
            events: status.events,
            errors: status.errors,
            node: node.clone(),
            policies: target.named_policies(),
        };
        // Idle at 10,000 Services: copying, translating and composing them all every tick cost
        // a tenth of a core for nothing. Drains in progress change nothing until one runs out
        // (then its flows are ended and it leaves the service).
        let now = Instant::now();
        if self.translator.next_drain_end().is_none_or(|end| now < end)
            && self.last_error.is_none()
            && self
                .last_step
                .as_ref()
                .is_some_and(|(last, at)| *last == inputs && at.elapsed() < STEP_AT_LEAST_EVERY)
        {
            return;
        }
        let mut cluster = self.watch.cluster();
        node.zone = cluster.node_zone();
        node.reserved.pod_ranges = cluster.node_pod_ranges();
        let started = Instant::now();
        // The Services the watchers changed: only those are translated again (at 10,000
        // Services, looking at each for what changed was a fifth of an endpoint change).
        let touched = cluster.take_touched();
        let translation = self.translator.translate_touched(
            &cluster,
            &node,
            &inputs.policies,
            Instant::now(),
            touched.as_ref(),
        );
        debug!(
            "translated {} Services in {:.1} ms ({} frontends changed)",
            cluster.services.len(),
            started.elapsed().as_secs_f64() * 1e3,
            translation
                .changed
                .as_ref()
                .map_or_else(|| "all".to_string(), |c| c.len().to_string())
        );
        let h = target.kube_health();
        h.services_seen = cluster.services.len();
        h.slices_seen = cluster.slice_count();
        drop(cluster);
        // A Service's frontends are next to each other in the translation.
        h.services_enabled = translation
            .services
            .chunk_by(|a, b| a.origin == b.origin)
            .count();
        h.frontends = translation.services.len();
        self.save_drains();
        let checks = translation.health_checks.clone();
        match target.apply_kubernetes(translation) {
            Ok(problems) => {
                self.last_error = None;
                // With problems (a Service left out for room among them) every tick tries again.
                self.last_step = problems.is_empty().then(|| (inputs, Instant::now()));
                if let Some(changed) = status.last_change
                    && self.applied_change != Some(changed)
                {
                    self.sync_latency.observe(changed.elapsed().as_secs_f64());
                    self.applied_change = Some(changed);
                }
                let h = target.kube_health();
                h.problems = problems.len();
                h.apply_error = None;
                self.problems.send_if_modified(|p| {
                    let same = *p == problems;
                    *p = problems;
                    !same
                });
            }
            Err(e) => {
                self.last_step = None;
                let e = e.to_string();
                let h = target.kube_health();
                // Counted and logged once per distinct error (this runs every tick).
                if self.last_error.as_ref() != Some(&e) {
                    warn!("the cluster's state cannot be applied; the last good one stays: {e}");
                    self.last_error = Some(e.clone());
                    h.apply_errors += 1;
                }
                h.apply_error = Some(e);
            }
        }
        self.health_checks.update(&checks);
    }

    /// Returns once the changes seen pause for [`COALESCE`], or after [`COALESCE_MAX`].
    pub async fn settle(&self) {
        let until = tokio::time::Instant::now() + COALESCE_MAX;
        loop {
            let pause = COALESCE.min(until.saturating_duration_since(tokio::time::Instant::now()));
            if pause.is_zero()
                || tokio::time::timeout(pause, self.watch.changed.notified())
                    .await
                    .is_err()
            {
                return;
            }
        }
    }

    /// The health-check node ports being served.
    pub fn health_check_ports(&self) -> Vec<u16> {
        self.health_checks.ports()
    }
}
