//! `lb-agent run`: load and attach the data path, keep its maps equal to the desired state,
//! follow the node's interfaces, sweep, report, and shut down: detaching everything, or (with
//! --keep-on-exit) leaving programs, links and maps for the next agent to take over.
//!
//! The desired state has up to two sources: the config file (services, rate limits, node
//! settings) and, with --kubernetes, the Services that opt in. They are composed into one
//! [`Desired`] and applied through the same reconciler.
use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use lb_common::{Iface, PROG_BACKEND, PROG_UPLINK};
use log::{info, warn};

use crate::{
    attach::Attachments,
    cli::RunArgs,
    config,
    dataplane::{self, Loaded, Maps},
    k8s::{self, Problem, Translation, source::KubeSource},
    metrics::Endpoints,
    model::Desired,
    netlink::Netlink,
    nic::Nic,
    node::{self, Interfaces, Neighbours, NodeError},
    reconcile::{ApplyError, NodeView, Reconciler, Report, monotonic_ns, service_key},
    state::{InterfaceLabel, ServiceLabel, State},
    sweep::{SweepReport, end_flows, sweep},
    tables::Tables,
    veth::{self, PodEnd},
};

/// What /readyz, metrics and the state file report about the agent itself.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Health {
    /// The desired state has been applied at least once and the data path is attached.
    pub ready: bool,
    pub reloads_applied: u64,
    pub reloads_rejected: u64,
    pub last_error: Option<String>,
    pub last_sweep: SweepReport,
    /// Entries all sweeps removed: finished flows, and refilled sources (the source table's
    /// evictions).
    pub swept_flows: u64,
    pub swept_sources: u64,
    pub map_writes: u64,
    /// With --kubernetes.
    pub kubernetes: Option<KubeHealth>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
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

/// Why a desired state was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyFailed {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

pub struct Agent {
    args: RunArgs,
    loaded: Loaded,
    pub maps: Maps,
    reconciler: Reconciler,
    /// The last desired state applied (the last good one).
    pub desired: Desired,
    pub node: NodeView,
    attachments: Attachments,
    netlink: Netlink,
    neighbours: Neighbours,
    pub interfaces: Interfaces,
    /// The config file's text as last read, to notice changes.
    config_text: String,
    /// The config file's desired state, last good (empty without a file).
    file: Desired,
    /// The cluster's part of the desired state, once synced (with --kubernetes).
    kube: Option<Translation>,
    /// The last composed state applied (before Services the node cannot serve were left out)
    /// and its problems: composing the same again needs no apply.
    composed: Option<(Desired, Vec<Problem>)>,
    /// Held while running: one agent per state directory (two would fight over the pins).
    _lock: std::fs::File,
    /// Backend veths (ifindex, name) and whether their pod end takes redirected frames.
    pod_ends: std::collections::BTreeMap<(u32, String), bool>,
    pub health: Health,
}

impl Agent {
    /// Everything up to serving: refuses to start on an invalid config. A start that fails
    /// leaves nothing behind unless a previous agent's data path was there (which it keeps).
    pub fn start(mut args: RunArgs) -> Result<Agent> {
        let (config_text, file) = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("{}: cannot read", path.display()))?;
                let desired = config::parse(path, &text)?;
                (text, desired)
            }
            None => (String::new(), Desired::default()),
        };
        let lock = lock_state_dir(&args.paths.state_dir)?;
        // The node's interfaces before anything is pinned: a node without its uplink leaves
        // nothing behind.
        let mut netlink = Netlink::open()?;
        if args.uplinks.is_empty() {
            args.uplinks = crate::uplink::detect(&mut netlink)?;
            info!(
                "uplinks (the interfaces of the default routes): {}",
                args.uplinks.join(", ")
            );
        }
        let interfaces = Interfaces::scan(&mut netlink, &args.uplinks, &args.backend_ifaces)?;
        ensure_bpffs(&args.paths.pin_dir)?;
        let layout = dataplane::layout_dir(&args.paths.pin_dir);
        let mut fresh = FreshPins::new(&layout);
        let sizes = args.sizes.sizes();
        let mut loaded = dataplane::load(&sizes, Some(&args.paths.pin_dir))?;
        for note in &loaded.notes {
            warn!("{note}");
        }
        let mut maps = Maps::take(&mut loaded.ebpf)?;
        maps.mirror_service_policies()?;
        let reconciler = Reconciler::resume(sizes, &maps.snapshot()?);
        let node = node::view(&mut netlink, &file, &interfaces)?;
        let attachments =
            Attachments::new(&layout).with_context(|| format!("creating {}", layout.display()))?;
        let mut agent = Agent {
            args,
            loaded,
            maps,
            reconciler,
            desired: Desired::default(),
            node,
            attachments,
            netlink,
            neighbours: Neighbours::default(),
            interfaces,
            config_text,
            file,
            kube: None,
            composed: None,
            _lock: lock,
            pod_ends: Default::default(),
            health: Health::default(),
        };
        match agent.serve_first() {
            Ok(()) => {
                fresh.keep();
                Ok(agent)
            }
            Err(e) if fresh.armed() => {
                // Nothing of a previous agent's to keep: take off what this start attached
                // and pinned.
                fresh.keep();
                let _ = agent.shutdown(false);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// The first apply and attach.
    fn serve_first(&mut self) -> Result<()> {
        if self.args.kubernetes {
            // The first apply waits for the cluster to be listed: until then the maps keep
            // what a previous agent left (its last state), or stay empty.
            self.health.kubernetes = Some(KubeHealth::default());
        } else {
            // Maps first, interfaces second: a program replaced on an interface finds its
            // maps already filled.
            self.apply_sources().map_err(anyhow::Error::msg)?;
        }
        self.sync_interfaces()?;
        self.remove_stale_prog_arrays();
        self.pin_prog_array()?;
        self.health.ready = !self.args.kubernetes;
        self.write_state();
        Ok(())
    }

    /// Applies a desired state; on error the previous one stays in force.
    pub fn apply(&mut self, desired: Desired) -> Result<Report, ApplyFailed> {
        let node = node::view(&mut self.netlink, &desired, &self.interfaces)?;
        for problem in self.neighbours.sync(&mut self.netlink, &desired) {
            warn!("{problem}");
        }
        let report = self.reconciler.apply(&desired, &node, &mut self.maps)?;
        self.health.map_writes += report.writes as u64;
        self.desired = desired;
        self.node = node;
        Ok(report)
    }

    /// Composes the sources and applies the result. A Service from the cluster that this node
    /// cannot serve is left out and reported (the rest is applied); anything else wrong rejects
    /// the whole state and the previous one stays in force. `None`: still waiting for the
    /// cluster's first list.
    fn apply_sources(&mut self) -> Result<Option<(Report, Vec<Problem>)>, String> {
        if self.args.kubernetes && self.kube.is_none() {
            return Ok(None);
        }
        let (mut desired, mut problems) = compose(&self.file, self.kube.as_ref());
        if let Some((last, last_problems)) = &self.composed
            && *last == desired
        {
            return Ok(Some((Report::default(), last_problems.clone())));
        }
        let composed = desired.clone();
        loop {
            match self.apply(desired.clone()) {
                Ok(report) => {
                    self.health.ready = true;
                    self.composed = Some((composed, problems.clone()));
                    return Ok(Some((report, problems)));
                }
                Err(ApplyFailed::Apply(ApplyError::Invalid {
                    origin,
                    frontend,
                    reason,
                    ..
                })) if k8s::object_of(&origin).is_some()
                    && desired.services.remove(&frontend).is_some() =>
                {
                    problems.push(Problem {
                        object: k8s::object_of(&origin).unwrap_or_default(),
                        field: format!("frontend {frontend}"),
                        message: format!("{reason}; not served"),
                    });
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Takes the cluster's part of the desired state and applies it; then ends the flows whose
    /// deregistration delay is over. Returns the problems to report.
    pub fn apply_kubernetes(&mut self, translation: Translation) -> Result<Vec<Problem>, String> {
        let previous = self.kube.replace(translation);
        match self.apply_sources() {
            Ok(result) => {
                let (report, mut problems) = result.unwrap_or_default();
                if !report.is_empty() {
                    info!(
                        "applied the cluster's state: {} map writes ({} services added, {} changed, {} removed, {} rings rewritten)",
                        report.writes,
                        report.services_added,
                        report.services_changed,
                        report.services_removed,
                        report.rings_written
                    );
                }
                let translation = self.kube.as_ref().expect("just set");
                problems.extend(translation.problems.iter().cloned());
                let ends = translation.end_flows.clone();
                self.end_drained_flows(&ends);
                self.write_state();
                Ok(problems)
            }
            Err(e) => {
                // The drains the rejected translation began or finished are lost with it; the
                // translator starts them again on the next change.
                self.kube = previous;
                Err(e)
            }
        }
    }

    fn end_drained_flows(&mut self, ends: &[k8s::EndFlows]) {
        for e in ends {
            let Ok(svc) = self.maps.services.get(&service_key(&e.frontend), 0) else {
                continue;
            };
            let n = end_flows(
                &mut self.maps,
                svc.id,
                e.backend.0.into(),
                e.backend.1,
                e.reset,
            );
            info!(
                "{}: deregistration delay of backend {} over: {n} flows {}",
                e.frontend,
                crate::model::Backend {
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

    /// The node's addresses that node ports are served on.
    pub fn uplink_addrs(&mut self) -> Vec<std::net::IpAddr> {
        node::uplink_addrs(&mut self.netlink, &self.interfaces).unwrap_or_else(|e| {
            warn!("reading the uplinks' addresses: {e}");
            self.node.node_addrs.iter().copied().collect()
        })
    }

    /// Rate-limit policies the config file names (Services may refer to them).
    pub fn named_policies(&self) -> std::collections::BTreeSet<String> {
        self.file.policies.keys().cloned().collect()
    }

    /// Re-reads the config file (when it changed, or always with `force`) and applies it. A
    /// config that is invalid, or that this node cannot serve, is rejected with the reason and
    /// the previous state stays in force.
    pub fn reload(&mut self, force: bool) {
        let Some(path) = self.args.config.clone() else {
            return;
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                self.rejected(format!("{}: cannot read: {e}", path.display()));
                return;
            }
        };
        if !force && text == self.config_text {
            return;
        }
        self.config_text = text;
        let file = match config::parse(&path, &self.config_text) {
            Ok(d) => d,
            Err(e) => {
                self.rejected(e.to_string());
                self.write_state();
                return;
            }
        };
        let previous = std::mem::replace(&mut self.file, file);
        match self.apply_sources() {
            Ok(None) => info!(
                "{}: valid; applied once the cluster is listed",
                path.display()
            ),
            Ok(Some((r, _))) => {
                self.health.reloads_applied += 1;
                self.health.last_error = None;
                info!(
                    "applied {}: {} map writes ({} services added, {} changed, {} removed, {} rings rewritten)",
                    path.display(),
                    r.writes,
                    r.services_added,
                    r.services_changed,
                    r.services_removed,
                    r.rings_written
                );
            }
            Err(e) => {
                self.file = previous;
                self.rejected(e);
            }
        }
        self.write_state();
    }

    fn rejected(&mut self, reason: String) {
        self.health.reloads_rejected += 1;
        warn!("config rejected, the previous one stays in force: {reason}");
        self.health.last_error = Some(reason);
    }

    /// Follows the node: interfaces that appeared or went, routes that changed which backends
    /// are local. Cheap when nothing changed.
    pub fn refresh(&mut self) {
        match Interfaces::scan(
            &mut self.netlink,
            &self.args.uplinks,
            &self.args.backend_ifaces,
        ) {
            Ok(ifaces) if ifaces.identity() != self.interfaces.identity() => {
                self.interfaces = ifaces;
                if let Err(e) = self.sync_interfaces() {
                    warn!("interfaces: {e:#}");
                }
            }
            Ok(_) => {}
            Err(e) => warn!("scanning interfaces: {e}"),
        }
        match node::view(&mut self.netlink, &self.desired, &self.interfaces) {
            Ok(node) if node != self.node => {
                // Compose again: a Service left out may fit the node now.
                self.composed = None;
                if let Err(e) = self.apply_sources() {
                    warn!("the node changed and the current state no longer fits it: {e}");
                    self.health.last_error = Some(e);
                }
                self.write_state();
            }
            Ok(_) => {}
            Err(e) => warn!("reading the node's addresses and routes: {e}"),
        }
    }

    pub fn sweep(&mut self) {
        let report = sweep(&mut self.maps, monotonic_ns());
        self.health.swept_flows += report.flows_removed as u64;
        self.health.swept_sources += report.sources_removed as u64;
        self.health.last_sweep = report;
    }

    /// Attaches to every uplink and backend interface, detaches from ones that went, and
    /// points the devmap and the VLAN table at the current interfaces.
    fn sync_interfaces(&mut self) -> Result<()> {
        let mode = self.args.xdp_mode;
        let tc_mode = self.args.tc_mode;
        let ebpf = &mut self.loaded.ebpf;
        let roles = self
            .interfaces
            .uplinks
            .iter()
            .map(|l| (l, PROG_UPLINK))
            .chain(self.interfaces.backends.iter().map(|l| (l, PROG_BACKEND)));
        let mut wanted = Vec::new();
        for (link, program) in roles {
            let a = if program == PROG_UPLINK {
                let nic = Nic::inspect(&link.name, link.mtu);
                let obstacles = nic.native_xdp_obstacles();
                let a = self
                    .attachments
                    .attach(ebpf, program, &link.name, mode, link.xdp, &obstacles)?;
                info!(
                    "{program} on {} (ifindex {}; {}): {} mode{}",
                    a.iface,
                    a.ifindex,
                    nic.describe(),
                    a.mode,
                    a.note
                        .as_deref()
                        .map(|n| format!(": {n}"))
                        .unwrap_or_default()
                );
                a
            } else {
                let a = self
                    .attachments
                    .attach_tc(ebpf, program, &link.name, tc_mode)?;
                info!(
                    "{program} on {} (ifindex {}): {} mode{}",
                    a.iface,
                    a.ifindex,
                    a.mode,
                    a.note
                        .as_deref()
                        .map(|n| format!(": {n}"))
                        .unwrap_or_default()
                );
                a
            };
            wanted.push(a.iface.clone());
        }
        for iface in self.attachments.pinned_interfaces() {
            if !wanted.contains(&iface) {
                info!("detaching from {iface}: no longer an uplink or backend interface");
                self.attachments.detach(&iface);
            }
        }
        // Redirect targets: the uplinks, and backend interfaces that take redirected frames.
        let mut targets: Vec<u32> = self.interfaces.uplinks.iter().map(|l| l.ifindex).collect();
        for link in self.interfaces.backends.clone() {
            if self.redirectable(&link) {
                targets.push(link.ifindex);
            }
        }
        let present: Vec<u32> = self.maps.devmap.keys().filter_map(|k| k.ok()).collect();
        for i in &targets {
            if !present.contains(i) {
                self.maps.devmap.insert(*i, *i, None, 0).context("devmap")?;
            }
        }
        for i in present.iter().filter(|i| !targets.contains(i)) {
            let _ = self.maps.devmap.remove(*i);
        }
        let vlans: Vec<u32> = self.interfaces.vlans.iter().map(|v| v.0).collect();
        for (ifindex, parent, id) in &self.interfaces.vlans {
            let iface = Iface {
                parent: *parent,
                vlan_id: *id,
                _pad: 0,
            };
            self.maps
                .ifaces
                .insert(ifindex, iface, 0)
                .context("iface map")?;
        }
        let known: Vec<u32> = self.maps.ifaces.keys().filter_map(|k| k.ok()).collect();
        for i in known.iter().filter(|i| !vlans.contains(i)) {
            let _ = self.maps.ifaces.remove(i);
        }
        Ok(())
    }

    /// Pins the tail-call table our entry programs use. The kernel empties a program array when
    /// its last user-space handle closes, so without the pin an agent that is killed (OOM,
    /// SIGKILL, a crash) would leave attached programs whose new flows all fail their tail call
    /// until the next agent takes over.
    fn pin_prog_array(&mut self) -> Result<()> {
        let dir = prog_array_dir(&self.args.paths.pin_dir);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("LB_PROGS-{}", std::process::id()));
        self.loaded
            .progs
            .pin(&path)
            .with_context(|| format!("pinning the tail-call table at {}", path.display()))
    }

    /// Whether the data path may redirect into `link`: yes for most devices; for a veth once its
    /// pod end takes redirected frames (see `veth`). Decided once per interface.
    fn redirectable(&mut self, link: &crate::netlink::Link) -> bool {
        if link.kind.as_deref() != Some("veth") {
            return true;
        }
        let key = (link.ifindex, link.name.clone());
        if let Some(ok) = self.pod_ends.get(&key) {
            return *ok;
        }
        let ok = match veth::prepare(&mut self.netlink, link) {
            Ok(PodEnd::Ready) => true,
            Ok(PodEnd::Enabled) => {
                info!(
                    "{}: turned GRO on at its pod end, so frames redirected into it are delivered",
                    link.name
                );
                true
            }
            Err(why) => {
                warn!(
                    "{}: not redirecting into it ({why}); its backends' packets go through the kernel",
                    link.name
                );
                false
            }
        };
        self.pod_ends.insert(key, ok);
        // Forget interfaces that went.
        let live: std::collections::BTreeSet<u32> =
            self.interfaces.backends.iter().map(|l| l.ifindex).collect();
        self.pod_ends.retain(|(i, _), _| live.contains(i));
        ok
    }

    /// Program arrays pinned by previous agents (for their programs' tail calls while they
    /// were still attached): ours are attached now, so they can go.
    fn remove_stale_prog_arrays(&self) {
        let dir = prog_array_dir(&self.args.paths.pin_dir);
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    pub fn write_state(&self) {
        let state = State {
            pid: std::process::id(),
            source: self.source_label(),
            ready: self.health.ready,
            last_error: self.health.last_error.clone(),
            applied: self.health.reloads_applied,
            rejected: self.health.reloads_rejected,
            services: self
                .desired
                .services
                .values()
                .map(|s| ServiceLabel {
                    frontend: s.frontend,
                    name: s.name.clone(),
                    origin: s.source.clone(),
                    mode: s.mode,
                    policy: s
                        .policy
                        .clone()
                        .or_else(|| self.desired.node.default_policy.clone()),
                })
                .collect(),
            interfaces: self
                .attachments
                .iter()
                .map(|a| InterfaceLabel {
                    name: a.iface.clone(),
                    ifindex: a.ifindex,
                    program: a.program.to_string(),
                    mode: a.mode.to_string(),
                    note: a.note.clone(),
                })
                .collect(),
            policies: self.reconciler.policy_names(),
        };
        if let Err(e) = state.write(&self.args.paths.state_dir) {
            warn!(
                "writing the state file in {}: {e}",
                self.args.paths.state_dir.display()
            );
        }
    }

    fn source_label(&self) -> String {
        let file = self
            .args
            .config
            .as_ref()
            .map(|p| format!("config {}", p.display()));
        let kube = self.args.kubernetes.then(|| "kubernetes".to_string());
        [kube, file]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" + ")
    }

    /// Stops: with `keep`, everything stays attached and pinned for the next agent; else
    /// everything is detached and unpinned.
    pub fn shutdown(mut self, keep: bool) -> Result<()> {
        let pin_dir = self.args.paths.pin_dir.clone();
        if keep {
            // The tail-call table is pinned already (since start).
            self.attachments.keep_all();
            info!(
                "left the data path attached and pinned in {} for the next agent",
                pin_dir.display()
            );
        } else {
            self.attachments.detach_all();
            for (ifindex, addr) in self.neighbours.drain() {
                let _ = self.netlink.remove_neighbour(ifindex, addr);
            }
            let layout = dataplane::layout_dir(&pin_dir);
            drop(self.maps);
            drop(self.loaded);
            if let Err(e) = std::fs::remove_dir_all(&layout) {
                warn!("removing {}: {e}", layout.display());
            }
            let _ = std::fs::remove_file(crate::state::path(&self.args.paths.state_dir));
            info!("detached and unpinned");
        }
        Ok(())
    }
}

impl Agent {
    pub fn sizes(&self) -> dataplane::Sizes {
        self.args.sizes.sizes()
    }

    /// (interface, program, mode) of each attachment.
    pub fn attachment_labels(&self) -> Vec<(String, String, String)> {
        self.attachments
            .iter()
            .map(|a| (a.iface.clone(), a.program.to_string(), a.mode.to_string()))
            .collect()
    }
}

/// The file's desired state with the cluster's services and policies added. The file wins a
/// frontend both define; of two Services with the same frontend, the first (by namespace and
/// name) wins. The losers are reported.
pub fn compose(file: &Desired, kube: Option<&Translation>) -> (Desired, Vec<Problem>) {
    let mut desired = file.clone();
    let mut problems = Vec::new();
    let Some(t) = kube else {
        return (desired, problems);
    };
    for (name, policy) in &t.policies {
        desired.policies.insert(name.clone(), policy.clone());
    }
    for s in &t.services {
        let object = k8s::object_of(&s.source).unwrap_or_default();
        match desired.services.get(&s.frontend) {
            Some(other) => problems.push(Problem {
                object,
                field: format!("frontend {}", s.frontend),
                message: format!(
                    "also defined by {} ({}), which keeps it; not served",
                    other.source, other.name
                ),
            }),
            None => {
                desired.services.insert(s.frontend, s.clone());
            }
        }
    }
    (desired, problems)
}

/// The map layout directory of a start that found none: removed on Drop (a start that failed
/// before the agent existed leaves no pinned maps), unless [`FreshPins::keep`] was called.
struct FreshPins(Option<std::path::PathBuf>);

impl FreshPins {
    fn new(layout: &Path) -> FreshPins {
        FreshPins((!layout.exists()).then(|| layout.to_path_buf()))
    }

    fn armed(&self) -> bool {
        self.0.is_some()
    }

    fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for FreshPins {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            // Unpinning leaves each map to its open descriptors, which close with the loader.
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `lb-agent cleanup`: removes what an agent that exited with --keep-on-exit left behind.
pub fn cleanup(paths: &crate::cli::Paths) -> Result<()> {
    let layout = dataplane::layout_dir(&paths.pin_dir);
    if let Ok(mut a) = Attachments::new(&layout) {
        a.detach_all();
    }
    if layout.exists() {
        std::fs::remove_dir_all(&layout)
            .with_context(|| format!("removing {}", layout.display()))?;
    }
    let _ = std::fs::remove_file(crate::state::path(&paths.state_dir));
    println!("removed {}", layout.display());
    Ok(())
}

fn prog_array_dir(pin_dir: &Path) -> std::path::PathBuf {
    dataplane::layout_dir(pin_dir).join("progs")
}

/// Takes `<state_dir>/agent.lock`, or says which agent holds it.
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let path = state_dir.join("agent.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: a valid open descriptor.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        anyhow::bail!(
            "another lb-agent (pid {}) is running with the state directory {}: one agent per node",
            holder.trim(),
            state_dir.display()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Mounts bpffs at /sys/fs/bpf if the pin directory is not on one (it is not by default on
/// some distributions).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let on_bpffs = |p: &Path| {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid path and buffer.
        unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
    };
    // The nearest existing ancestor tells which filesystem the directory will be on.
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if on_bpffs(&probe) {
        return Ok(());
    }
    let mount_point = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(mount_point) {
        anyhow::bail!(
            "{} is not on a bpffs; mount one there (mount -t bpf bpf <dir>) or use a directory under /sys/fs/bpf",
            pin_dir.display()
        );
    }
    std::fs::create_dir_all(mount_point)?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    // SAFETY: valid C strings.
    let rc = unsafe {
        libc::mount(
            c("bpf").as_ptr(),
            c("/sys/fs/bpf").as_ptr(),
            c("bpf").as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        anyhow::bail!(
            "mounting bpffs at /sys/fs/bpf: {}",
            std::io::Error::last_os_error()
        );
    }
    info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(args: RunArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let keep = args.keep_on_exit;
        let metrics_addr = args.metrics_addr;
        let scrape_addr = args.scrape_addr;
        let sweep_every = Duration::from_secs(args.sweep_seconds.max(1));
        let mut kube = match args.kubernetes {
            true => {
                let node = args.node_name.clone().context("--node-name (or NODE_NAME) is needed with --kubernetes")?;
                Some(KubeSource::connect(args.kubeconfig.as_deref(), node).await?)
            }
            false => None,
        };
        let agent = Agent::start(args)?;
        match &kube {
            None => info!(
                "serving: {} services; metrics on http://{metrics_addr}/metrics",
                agent.desired.services.len()
            ),
            Some(_) => info!(
                "attached; serving the cluster's Services once they are listed; metrics on http://{metrics_addr}/metrics"
            ),
        }
        let agent = Arc::new(Mutex::new(agent));
        let latency = kube.as_ref().map(|k| k.sync_latency.clone());
        let server = crate::metrics::serve(metrics_addr, agent.clone(), latency.clone(), Endpoints::All)
            .await
            .with_context(|| format!("serving metrics and probes on {metrics_addr}"))?;
        let scrape = match scrape_addr {
            Some(addr) => {
                let s = crate::metrics::serve(addr, agent.clone(), latency, Endpoints::MetricsOnly)
                    .await
                    .with_context(|| format!("serving metrics on {addr}"))?;
                info!("metrics for scraping on http://{addr}/metrics");
                Some(s)
            }
            None => None,
        };
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut sweeps = tokio::time::interval(sweep_every);
        loop {
            tokio::select! {
                _ = hup.recv() => lock(&agent).reload(true),
                _ = tick.tick() => {
                    let mut a = lock(&agent);
                    a.reload(false);
                    a.refresh();
                    if let Some(k) = &mut kube {
                        k.step(&mut *a);
                    }
                }
                _ = cluster_changed(&kube) => {
                    // Let a burst of changes finish, then apply all of it at once.
                    tokio::time::sleep(crate::k8s::source::COALESCE).await;
                    if let Some(k) = &mut kube {
                        k.step(&mut *lock(&agent));
                    }
                }
                _ = sweeps.tick() => lock(&agent).sweep(),
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        server.abort();
        let _ = server.await;
        if let Some(s) = scrape {
            s.abort();
            let _ = s.await;
        }
        drop(kube);
        let agent = Arc::try_unwrap(agent)
            .map_err(|_| anyhow::anyhow!("agent still in use at shutdown"))?
            .into_inner()
            .map_err(|_| anyhow::anyhow!("agent state poisoned"))?;
        agent.shutdown(keep)
    })
}

/// Resolves when the watchers saw a change (never without Kubernetes).
async fn cluster_changed(kube: &Option<KubeSource>) {
    match kube {
        Some(k) => k.watch.changed.notified().await,
        None => std::future::pending().await,
    }
}

/// The agent behind its lock (a panicking holder does not make it unusable).
pub fn lock(agent: &Mutex<Agent>) -> std::sync::MutexGuard<'_, Agent> {
    agent.lock().unwrap_or_else(|e| e.into_inner())
}
