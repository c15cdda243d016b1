//! `lb-agent run`'s agent: it owns the loaded data path and orchestrates the rest. The desired
//! state has up to two inputs, the config file (services, rate limits, node settings) and, with
//! --kubernetes, the Services that opt in; they are composed, checked against the node and
//! applied by the reconciler ([`crate::composed`]: a change of the cluster's translation only
//! for the frontends it touched). After
//! each change the agent publishes a read-only view for the metrics server and the state file.
//!
//! The parts, each in its own file: the run loop with its signals (`run`), following the
//! node's interfaces (`interfaces`), the Kubernetes input's [`Target`](crate::k8s::input::Target)
//! (`kube`). System calls are in [`crate::system`].
mod interfaces;
mod kube;
mod run;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    hash::{Hash as _, Hasher as _},
    net::IpAddr,
    sync::Arc,
};

use anyhow::{Context, Result};
use log::{info, warn};

pub use self::run::run;
use crate::{
    attach::{self, Attachments},
    cli::RunArgs,
    composed::{self, Composed},
    config,
    dataplane::{self, Loaded, Maps, Stats},
    health::{Health, KubeHealth},
    k8s::{Problem, Translation},
    model::{self, Backend, Desired},
    neighbours::Neighbours,
    netlink::Change,
    netlink::Netlink,
    node::{self, Interfaces, NodeView},
    reconcile::{ApplyError, Reconciler, Report},
    state::{InterfaceLabel, ServiceLabel, ZoneLabel},
    sweep::sweep,
    system::{self, monotonic_ns},
    tables::Tables,
    view::{AgentView, BackendView, Publisher, ServiceView, Views},
};

/// The desired state's inputs as last read.
#[derive(Default)]
struct Inputs {
    /// The config file's text, to notice changes.
    config_text: String,
    /// The config file's desired state, last good (empty without a file).
    file: Desired,
    /// The cluster's part of the desired state, once synced (with --kubernetes).
    kube: Option<Translation>,
}

pub struct Agent {
    args: RunArgs,
    loaded: Loaded,
    maps: Maps,
    reconciler: Reconciler,
    /// The last desired state applied (the last good one, as admitted).
    desired: Desired,
    node: NodeView,
    attachments: Attachments,
    /// `lb_uplink_tc` on the uplinks, while some backend interface is `kernel` (see
    /// `crate::hooks`).
    uplink_tc: Attachments,
    /// `lb_uplink_out` at the uplinks' TC egress, while some backend interface is `netfilter`.
    uplink_out: Attachments,
    netlink: Netlink,
    neighbours: Neighbours,
    interfaces: Interfaces,
    /// The uplinks' global addresses (where node ports are served), kept current by netlink
    /// notifications.
    uplink_addrs: Vec<IpAddr>,
    inputs: Inputs,
    composed: Option<Composed>,
    /// Held while running: one agent per state directory (two would fight over the pins).
    _lock: File,
    /// Backend veths (ifindex, name) and whether their pod end takes redirected frames.
    pod_ends: BTreeMap<(u32, String), bool>,
    /// Each backend interface's delivery (by ifindex, with its name), as last decided.
    deliveries: BTreeMap<u32, (String, crate::hooks::Delivery)>,
    /// LB_MACS slots written (the uplinks' MACs).
    mac_slots: std::collections::BTreeSet<u32>,
    health: Health,
    publisher: Publisher,
    /// The state file as last written: a hash of all but its services, and those (kept, so
    /// that an equal pointer means the same services).
    written: Option<(u64, Arc<Vec<Arc<ServiceView>>>)>,
    /// Each applied service's view, by frontend, made when it last changed.
    service_views: BTreeMap<model::Frontend, Arc<ServiceView>>,
    /// The frontends whose view may have changed since it was made (`None`: any).
    views_stale: Option<std::collections::BTreeSet<model::Frontend>>,
    /// The services of the last view, while none of them changed.
    services_view: Option<Arc<Vec<Arc<ServiceView>>>>,
    /// Work that freed much of the heap was done since the last [`Agent::release_memory`].
    release_due: bool,
    /// The addresses on kube-proxy's IPVS device, until the node next changes (the cluster's
    /// input asks every second: a dump of every link each time).
    kube_ipvs: Option<std::collections::BTreeSet<IpAddr>>,
}

impl Agent {
    /// Everything up to serving: refuses to start on an invalid config. A start that fails
    /// leaves nothing behind unless a previous agent's data path was there (which it keeps).
    pub fn start(mut args: RunArgs) -> Result<Agent> {
        let mut inputs = Inputs::default();
        if let Some(path) = &args.config {
            inputs.config_text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            inputs.file = config::parse(path, &inputs.config_text)?;
        }
        let lock = system::lock_state_dir(&args.paths.state_dir)?;
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
        let interfaces = Interfaces::scan(&mut netlink, &args.uplinks, &args.backend_interfaces)?;
        if system::ensure_bpffs(&args.paths.pin_dir)? {
            info!("mounted bpffs at {}", system::BPFFS);
        }
        let layout = dataplane::layout_dir(&args.paths.pin_dir);
        let mut fresh = FreshPins::new(&layout);
        let sizes = args.sizes.sizes();
        let mut loaded = dataplane::load(&sizes, Some(&args.paths.pin_dir))?;
        for note in &loaded.notes {
            warn!("{note}");
        }
        let mut maps = Maps::take(&mut loaded.ebpf)?;
        let mut found = maps.snapshot()?;
        found.rings_lost = loaded.recreated.contains(&lb_common::MAP_RINGS);
        let mut reconciler = Reconciler::resume(sizes, &found);
        if found.rings_lost {
            // Before anything is attached: the programs already attached still use the old
            // array, the ones about to replace them this one.
            let restored = reconciler.restore_rings(&mut maps)?;
            info!("LB_RINGS was recreated: wrote the rings of {restored} pinned services anew");
        }
        let node = node::view(&mut netlink, &inputs.file, &interfaces)?;
        for w in node::snat_elsewhere(&node, &inputs.file) {
            warn!("{w}");
        }
        let uplink_addrs = node::uplink_addrs(&mut netlink, &interfaces)?;
        let attachments =
            Attachments::new(&layout).with_context(|| format!("creating {}", layout.display()))?;
        let uplink_tc = Attachments::new_in(&layout, crate::attach::UPLINK_TC_LINKS)
            .with_context(|| format!("creating {}", layout.display()))?;
        let uplink_out = Attachments::new_egress(&layout, crate::attach::UPLINK_OUT_LINKS)
            .with_context(|| format!("creating {}", layout.display()))?;
        let (publisher, _) = crate::view::channel();
        let mut agent = Agent {
            args,
            loaded,
            maps,
            reconciler,
            desired: Desired::default(),
            node,
            attachments,
            uplink_tc,
            uplink_out,
            netlink,
            neighbours: Neighbours::default(),
            interfaces,
            uplink_addrs,
            inputs,
            composed: None,
            _lock: lock,
            pod_ends: BTreeMap::new(),
            deliveries: BTreeMap::new(),
            mac_slots: std::collections::BTreeSet::new(),
            health: Health::default(),
            publisher,
            written: None,
            service_views: BTreeMap::new(),
            views_stale: None,
            services_view: None,
            release_due: false,
            kube_ipvs: None,
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
                let () = agent.shutdown(false);
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
            self.apply_inputs()?;
        }
        self.sync_interfaces()?;
        dataplane::remove_stale_prog_pins(&self.args.paths.pin_dir);
        self.loaded.pin_progs(&self.args.paths.pin_dir)?;
        self.health.ready = !self.args.kubernetes;
        self.publish();
        Ok(())
    }

    /// Composes the inputs and applies the result. A service from the cluster that this node
    /// cannot serve is left out and reported (the rest is applied); anything else wrong rejects
    /// the whole state and the previous one stays in force. `None`: still waiting for the
    /// cluster's first list.
    fn apply_inputs(&mut self) -> Result<Option<(Report, Vec<Problem>)>, ApplyError> {
        if self.args.kubernetes && self.inputs.kube.is_none() {
            return Ok(None);
        }
        let inputs = composed::Inputs {
            file: &self.inputs.file,
            kube: self.inputs.kube.as_ref(),
        };
        let writer = composed::Writer {
            reconciler: &mut self.reconciler,
            tables: &mut self.maps,
        };
        let (netlink, interfaces, neighbours, current) = (
            &mut self.netlink,
            &self.interfaces,
            &mut self.neighbours,
            &self.node,
        );
        let mut node_view = |desired: &Desired, addrs: composed::Addrs| match addrs {
            composed::Addrs::Same => Ok(current.clone()),
            // At 200,000 backends, reading every backend's route and next hop again for the
            // one address a replaced endpoint brings was a quarter of a change's time.
            composed::Addrs::Changed { came, went } => {
                let node = node::with_addrs(netlink, current, interfaces, &came, &went)?;
                for problem in neighbours.follow_changed(netlink, &came, &went) {
                    warn!("{problem}");
                }
                Ok(node)
            }
            composed::Addrs::All => {
                let node = node::view(netlink, desired, interfaces)?;
                for problem in neighbours.follow(netlink, desired) {
                    warn!("{problem}");
                }
                for w in node::snat_elsewhere(&node, desired) {
                    warn!("{w}");
                }
                Ok(node)
            }
        };
        let outcome = composed::apply(
            &mut self.composed,
            &mut self.desired,
            &inputs,
            writer,
            &mut node_view,
        )?;
        self.views_changed(outcome.incremental);
        let Some(node) = outcome.node else {
            return Ok(Some((outcome.report, outcome.problems)));
        };
        self.health.ring_slots = self.reconciler.ring_slots_held();
        for n in outcome
            .not_served
            .iter()
            .filter(|n| !self.health.not_served.contains(n))
        {
            warn!("not served: {n}");
        }
        self.health.not_served = outcome.not_served;
        self.health.map_writes += outcome.report.writes as u64;
        self.health.ready = true;
        self.node = node;
        Ok(Some((outcome.report, outcome.problems)))
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
        if !force && text == self.inputs.config_text {
            return;
        }
        self.inputs.config_text = text;
        let file = match config::parse(&path, &self.inputs.config_text) {
            Ok(d) => d,
            Err(e) => {
                self.rejected(e.to_string());
                self.publish();
                return;
            }
        };
        let previous = std::mem::replace(&mut self.inputs.file, file);
        // Another file: composed again as a whole.
        self.composed = None;
        match self.apply_inputs() {
            Ok(None) => info!(
                "{}: valid; applied once the cluster is listed",
                path.display()
            ),
            Ok(Some((r, _))) => {
                self.health.reloads_applied += 1;
                self.health.last_error = None;
                info!("applied {}: {}", path.display(), describe(&r));
                // `policy-hooks` may have changed.
                self.check_policy_hooks();
            }
            Err(e) => {
                self.inputs.file = previous;
                self.rejected(e.to_string());
            }
        }
        self.publish();
    }

    fn rejected(&mut self, reason: String) {
        self.health.reloads_rejected += 1;
        warn!("config rejected, the previous one stays in force: {reason}");
        self.health.last_error = Some(reason);
    }

    /// Follows a neighbour notification at once: an entry the data path needs that went is made
    /// again (a flush, carrier loss).
    pub fn neighbours_changed(&mut self, changes: &[Change]) {
        for change in changes {
            for problem in self.neighbours.on_change(&mut self.netlink, change) {
                // An interface that is down refuses; its coming up brings a full sync.
                log::debug!("restoring a neighbour entry: {problem}");
            }
        }
    }

    /// Follows the node after links, addresses or routes changed (netlink told us): interfaces
    /// that appeared or went, the uplinks' addresses, which backends are local, and the
    /// backends' next hops.
    pub fn node_changed(&mut self) {
        self.netlink.forget_routes();
        self.kube_ipvs = None;
        match Interfaces::scan(
            &mut self.netlink,
            &self.args.uplinks,
            &self.args.backend_interfaces,
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
        match node::uplink_addrs(&mut self.netlink, &self.interfaces) {
            Ok(addrs) => self.uplink_addrs = addrs,
            Err(e) => warn!("reading the uplinks' addresses: {e}"),
        }
        let composed = self.composed.as_ref().map_or(&self.desired, |c| &c.desired);
        match node::view(&mut self.netlink, composed, &self.interfaces) {
            Ok(node) if node != self.node => {
                // Compose again: a service left out may fit the node now.
                self.composed = None;
                if let Err(e) = self.apply_inputs() {
                    warn!("the node changed and the current state no longer fits it: {e}");
                    self.health.last_error = Some(e.to_string());
                }
            }
            Ok(_) => {
                let composed = self.composed.as_ref().map_or(&self.desired, |c| &c.desired);
                for problem in self.neighbours.follow(&mut self.netlink, composed) {
                    warn!("{problem}");
                }
            }
            Err(e) => warn!("reading the node's addresses and routes: {e}"),
        }
        self.publish();
    }

    pub fn sweep(&mut self) {
        let report = sweep(&mut self.maps, monotonic_ns());
        self.health.swept_flows += report.flows_removed as u64;
        self.health.flow_entries = report.flows;
        self.health.source_entries = report.sources;
    }

    /// Hands the heap freed since the last publish back to the system (see
    /// [`crate::system::release_freed_memory`]); nothing if nothing was published since.
    pub fn release_memory(&mut self) {
        if std::mem::take(&mut self.release_due) {
            crate::system::release_freed_memory();
        }
    }

    /// Publishes a sweep's figures: the rest of the view (and the state file) did not change.
    pub fn publish_sweep(&self) {
        self.publisher.publish_health(&self.health);
    }

    /// The loop went round: see [`crate::view::Publisher::beat`].
    pub fn beat(&self) {
        self.publisher.beat();
    }

    /// Readers of the published view (the metrics server).
    pub fn views(&self) -> Views {
        self.publisher.views()
    }

    /// The data path's counters through descriptors of their own (for the metrics server).
    pub fn stats(&self) -> Result<Stats> {
        Ok(self.maps.stats.reopen()?)
    }

    /// Publishes the current view; writes the state file when it changed. The view changes with
    /// every counter in it (at each sweep); the file (5 MiB at 20,000 frontends) only with
    /// what it holds.
    pub fn publish(&mut self) {
        let view = self.view();
        let head = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            view.state_head().hash(&mut h);
            h.finish()
        };
        let same = self
            .written
            .as_ref()
            .is_some_and(|(h, services)| *h == head && Arc::ptr_eq(services, &view.services));
        if !same {
            match view.write_state(&self.args.paths.state_dir) {
                Ok(()) => self.written = Some((head, view.services.clone())),
                Err(e) => warn!(
                    "writing the state file in {}: {e}",
                    self.args.paths.state_dir.display()
                ),
            }
        }
        self.publisher.publish(view);
        // Whatever led here (an apply, a reload) made and dropped copies of the state.
        self.release_due = true;
    }

    /// The frontends whose view may differ after the last apply: those the cluster's
    /// translation says changed when the apply went frontend by frontend, else any.
    fn views_changed(&mut self, incremental: bool) {
        let changed = self
            .inputs
            .kube
            .as_ref()
            .and_then(|t| t.changed.as_ref())
            .filter(|_| incremental);
        match (&mut self.views_stale, changed) {
            (Some(stale), Some(changed)) => stale.extend(changed.iter().copied()),
            (stale, _) => *stale = None,
        }
        self.services_view = None;
    }

    /// The applied services' views: those of the frontends that changed made again.
    fn service_views(&mut self) -> Arc<Vec<Arc<ServiceView>>> {
        if let Some(views) = &self.services_view {
            return views.clone();
        }
        match self.views_stale.replace(BTreeSet::new()) {
            None => {
                self.service_views = self
                    .desired
                    .services
                    .values()
                    .filter_map(|s| Some((s.frontend, Arc::new(self.service_view(s)?))))
                    .collect();
            }
            Some(stale) => {
                for f in stale {
                    match self
                        .desired
                        .services
                        .get(&f)
                        .and_then(|s| self.service_view(s))
                    {
                        Some(v) => self.service_views.insert(f, Arc::new(v)),
                        None => self.service_views.remove(&f),
                    };
                }
            }
        }
        let views = Arc::new(self.service_views.values().cloned().collect());
        self.services_view = Some(Arc::clone(&views));
        views
    }

    fn service_view(&self, s: &model::Service) -> Option<ServiceView> {
        let default_policy = self.desired.node.default_policy.as_ref();
        let (id, mut backends) = self.reconciler.ids(&s.frontend.key())?;
        backends.sort_unstable();
        let label = ServiceLabel {
            frontend: s.frontend,
            name: s.name.clone(),
            origin: s.origin.to_string(),
            mode: s.mode,
            policy: s.policy.clone().or_else(|| default_policy.cloned()),
            draining: self.draining(&s.frontend),
            source_ranges: s.source_ranges.clone(),
            zones: self.zones(s),
        };
        let backends = backends
            .into_iter()
            .map(|b| BackendView {
                addr: b.addr,
                port: b.port,
                id: b.id,
                weight: b.weight,
            })
            .collect();
        Some(ServiceView::new(label, id, backends))
    }

    fn view(&mut self) -> AgentView {
        let services = self.service_views();
        AgentView {
            health: self.health.clone(),
            inputs: self.inputs_label(),
            services,
            interfaces: self
                .attachments
                .iter()
                .chain(self.uplink_tc.iter())
                .chain(self.uplink_out.iter())
                .map(|a| {
                    let delivery = self.deliveries.get(&a.ifindex).map(|(_, d)| d);
                    InterfaceLabel {
                        name: a.iface.clone(),
                        ifindex: a.ifindex,
                        program: a.program.to_string(),
                        hook: hook(a.mode),
                        note: a.note.clone(),
                        delivery: delivery.map(|d| d.word().to_string()),
                        delivery_reason: delivery.map(|d| d.reason.clone()),
                    }
                })
                .collect(),
            policies: self.reconciler.policy_names(),
            sizes: self.args.sizes.sizes(),
            zone: self.inputs.kube.as_ref().and_then(|t| t.node_zone.clone()),
        }
    }

    /// A service's zone-aware routing and its backends' zones, as the cluster's translation
    /// gave them.
    fn zones(&self, s: &model::Service) -> ZoneLabel {
        let Some(t) = &self.inputs.kube else {
            return ZoneLabel::default();
        };
        let name = |(addr, port): &(IpAddr, u16)| {
            Backend {
                addr: *addr,
                port: *port,
                weight: 0,
            }
            .maglev_key()
        };
        ZoneLabel {
            routing: t.routing.get(&s.frontend).map(ToString::to_string),
            standby: of_frontend(&t.standby, s.frontend)
                .map(|(_, b)| name(b))
                .collect(),
            backends: s
                .backends
                .iter()
                .filter_map(|b| {
                    let zone = t.zones.get(&b.addr)?;
                    Some((name(&(b.addr, b.port)), zone.clone()))
                })
                .collect(),
        }
    }

    /// The backends of `frontend` the cluster is draining, by name.
    fn draining(&self, frontend: &model::Frontend) -> Vec<String> {
        let Some(t) = &self.inputs.kube else {
            return Vec::new();
        };
        of_frontend(&t.draining, *frontend)
            .map(|(_, (addr, port))| {
                Backend {
                    addr: *addr,
                    port: *port,
                    weight: 0,
                }
                .maglev_key()
            })
            .collect()
    }

    fn inputs_label(&self) -> String {
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
    pub fn shutdown(mut self, keep: bool) {
        let pin_dir = self.args.paths.pin_dir.clone();
        if keep {
            // The tail-call table is pinned already (since start).
            self.attachments.keep_all();
            self.uplink_tc.keep_all();
            self.uplink_out.keep_all();
            info!(
                "left the data path attached and pinned in {} for the next agent",
                pin_dir.display()
            );
            return;
        }
        self.attachments.detach_all();
        self.uplink_tc.detach_all();
        self.uplink_out.detach_all();
        for (ifindex, addr) in self.neighbours.drain() {
            let _ = self.netlink.remove_neighbour(ifindex, addr);
        }
        let layout = dataplane::layout_dir(&pin_dir);
        drop(self.maps);
        drop(self.loaded);
        if let Err(e) = std::fs::remove_dir_all(&layout) {
            warn!("removing {}: {e}", layout.display());
        }
        crate::state::remove(&self.args.paths.state_dir);
        // With the maps gone there are no flows left to end.
        let _ = std::fs::remove_file(crate::k8s::drains::path(&self.args.paths.state_dir));
        info!("detached and unpinned");
    }
}

/// The map layout directory of a start that found none: removed on Drop (a start that failed
/// before the agent existed leaves no pinned maps), unless [`FreshPins::keep`] was called.
struct FreshPins(Option<std::path::PathBuf>);

impl FreshPins {
    fn new(layout: &std::path::Path) -> FreshPins {
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

/// What an apply changed, for the log.
/// The entries of `frontend` in a set ordered by frontend first: a range, not a scan (the
/// view asks for each frontend's, and 20,000 draining backends scanned per frontend cost
/// seconds).
fn of_frontend(
    set: &BTreeSet<(model::Frontend, (IpAddr, u16))>,
    frontend: model::Frontend,
) -> impl Iterator<Item = &(model::Frontend, (IpAddr, u16))> {
    let lowest = (IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
    let highest = (IpAddr::V6(std::net::Ipv6Addr::from(u128::MAX)), u16::MAX);
    set.range((frontend, lowest)..=(frontend, highest))
}

fn describe(r: &Report) -> String {
    format!(
        "{} map writes ({} services added, {} changed, {} removed, {} rings rewritten)",
        r.writes, r.services_added, r.services_changed, r.services_removed, r.rings_written
    )
}

/// Where an attachment's program runs, in the words metrics and `status` use.
fn hook(mode: &str) -> String {
    match mode {
        attach::MODE_TCX | attach::MODE_TC_CLASSIC => mode.to_string(),
        xdp => format!("xdp-{xdp}"),
    }
}
