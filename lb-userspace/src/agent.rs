//! `lb-agent run`: load and attach the data path, keep its maps equal to the desired state,
//! follow the node's interfaces, sweep, report, and shut down: detaching everything, or (with
//! --keep-on-exit) leaving programs, links and maps for the next agent to take over.
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
    model::Desired,
    netlink::Netlink,
    node::{self, Interfaces, Neighbours},
    reconcile::{NodeView, Reconciler, Report, monotonic_ns},
    state::{InterfaceLabel, ServiceLabel, State},
    sweep::{SweepReport, sweep},
    tables::Tables,
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
    pub map_writes: u64,
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
    pub health: Health,
}

impl Agent {
    /// Everything up to serving: refuses to start on an invalid config.
    pub fn start(args: RunArgs) -> Result<Agent> {
        let config_text = std::fs::read_to_string(&args.config)
            .with_context(|| format!("{}: cannot read", args.config.display()))?;
        let desired = config::parse(&args.config, &config_text)?;
        ensure_bpffs(&args.paths.pin_dir)?;
        let sizes = args.sizes.sizes();
        let mut loaded = dataplane::load(&sizes, Some(&args.paths.pin_dir))?;
        for note in &loaded.notes {
            warn!("{note}");
        }
        let maps = Maps::take(&mut loaded.ebpf)?;
        let reconciler = Reconciler::resume(sizes, &maps.snapshot()?);
        let mut netlink = Netlink::open()?;
        let interfaces = Interfaces::scan(&mut netlink, &args.uplinks, &args.backend_ifaces)?;
        let node = node::view(&mut netlink, &desired, &interfaces)?;
        let layout = dataplane::layout_dir(&args.paths.pin_dir);
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
            health: Health::default(),
        };
        // Maps first, interfaces second: a program replaced on an interface finds its maps
        // already filled.
        agent.apply(desired).map_err(anyhow::Error::msg)?;
        agent.sync_interfaces()?;
        agent.remove_stale_prog_arrays();
        agent.health.ready = true;
        agent.write_state();
        Ok(agent)
    }

    /// Applies a desired state; on error the previous one stays in force.
    pub fn apply(&mut self, desired: Desired) -> Result<Report, String> {
        let node =
            node::view(&mut self.netlink, &desired, &self.interfaces).map_err(|e| e.to_string())?;
        for problem in self.neighbours.sync(&mut self.netlink, &desired) {
            warn!("{problem}");
        }
        let report = self
            .reconciler
            .apply(&desired, &node, &mut self.maps)
            .map_err(|e| e.to_string())?;
        self.health.map_writes += report.writes as u64;
        self.desired = desired;
        self.node = node;
        Ok(report)
    }

    /// Re-reads the config file (when it changed, or always with `force`) and applies it. A
    /// config that is invalid, or that this node cannot serve, is rejected with the reason and
    /// the previous state stays in force.
    pub fn reload(&mut self, force: bool) {
        let path = self.args.config.clone();
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
        let result = config::parse(&path, &self.config_text)
            .map_err(|e| e.to_string())
            .and_then(|d| self.apply(d));
        match result {
            Ok(r) => {
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
            Err(e) => self.rejected(e),
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
                let desired = self.desired.clone();
                if let Err(e) = self.apply(desired) {
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
        self.health.last_sweep = sweep(&mut self.maps, monotonic_ns());
    }

    /// Attaches to every uplink and backend interface, detaches from ones that went, and
    /// points the devmap and the VLAN table at the current interfaces.
    fn sync_interfaces(&mut self) -> Result<()> {
        let mode = self.args.xdp_mode;
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
                self.attachments.attach(ebpf, program, &link.name, mode)?
            } else {
                self.attachments.attach_tc(ebpf, program, &link.name)?
            };
            if program == PROG_UPLINK || a.note.is_some() {
                info!(
                    "{} on {} (ifindex {}): {} mode{}",
                    program,
                    a.iface,
                    a.ifindex,
                    a.mode,
                    a.note
                        .as_deref()
                        .map(|n| format!(": {n}"))
                        .unwrap_or_default()
                );
            }
            wanted.push(link.name.clone());
        }
        for iface in self.attachments.pinned_interfaces() {
            if !wanted.contains(&iface) {
                info!("detaching from {iface}: no longer an uplink or backend interface");
                self.attachments.detach(&iface);
            }
        }
        let targets: Vec<u32> = self.interfaces.all().map(|l| l.ifindex).collect();
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
            source: format!("config {}", self.args.config.display()),
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

    /// Stops: with `keep`, everything stays attached and pinned for the next agent; else
    /// everything is detached and unpinned.
    pub fn shutdown(mut self, keep: bool) -> Result<()> {
        let pin_dir = self.args.paths.pin_dir.clone();
        if keep {
            // The attached entry programs tail-call through this array; the kernel empties an
            // array whose last user-space handle closes, so it stays pinned until the next
            // agent has taken over.
            let dir = prog_array_dir(&pin_dir);
            std::fs::create_dir_all(&dir)?;
            let name = format!("LB_PROGS-{}", std::process::id());
            let path = dir.join(name);
            self.loaded
                .progs
                .pin(&path)
                .with_context(|| format!("pinning the tail-call table at {}", path.display()))?;
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
        let sweep_every = Duration::from_secs(args.sweep_seconds.max(1));
        let agent = Agent::start(args)?;
        info!(
            "serving: {} services; metrics on http://{metrics_addr}/metrics",
            agent.desired.services.len()
        );
        let agent = Arc::new(Mutex::new(agent));
        let server = crate::metrics::serve(metrics_addr, agent.clone()).await?;
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
                }
                _ = sweeps.tick() => lock(&agent).sweep(),
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        server.abort();
        let _ = server.await;
        let agent = Arc::try_unwrap(agent)
            .map_err(|_| anyhow::anyhow!("agent still in use at shutdown"))?
            .into_inner()
            .map_err(|_| anyhow::anyhow!("agent state poisoned"))?;
        agent.shutdown(keep)
    })
}

/// The agent behind its lock (a panicking holder does not make it unusable).
pub fn lock(agent: &Mutex<Agent>) -> std::sync::MutexGuard<'_, Agent> {
    agent.lock().unwrap_or_else(|e| e.into_inner())
}
