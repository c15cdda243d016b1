//! Running the real `lb-agent` binary in a lab node's namespace, for the end-to-end tests and
//! the demo: start it with a config, change the config, restart it (keeping its pins), stop it,
//! and read its status.
//!
//! Pins go to a bpffs this harness mounts in the host's mount namespace: `ip netns exec` gives
//! the agent a private mount namespace, and a bpffs mounted inside it would vanish (pins and
//! all) when the agent exits, so a restart could not pick up where it left off.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::netns::{ChildGuard, Netns};

/// A bpffs mounted for one test process, unmounted on drop.
pub struct Bpffs {
    dir: PathBuf,
}

impl Bpffs {
    pub fn mount(name: &str) -> Result<Bpffs> {
        let dir = PathBuf::from(format!("/run/xdplb-tests/{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .context("mount -t bpf")?;
        if !status.success() {
            bail!("mount -t bpf bpf {}: {status}", dir.display());
        }
        Ok(Bpffs { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The `lb-agent` binary of this build (built on demand: cargo builds a crate's binaries for
/// its own tests only, and this crate is not lb-agent's). `XDPLB_AGENT_BINARY` names a binary
/// built beforehand instead (the kernels tier runs tests in a VM whose view of the tree is
/// read-only, where cargo cannot build).
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("XDPLB_AGENT_BINARY") {
        return Ok(PathBuf::from(bin));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let bin = target.join(profile).join("lb-agent");
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build
        .args([
            "build",
            "--quiet",
            "-p",
            "lb-userspace",
            "--bin",
            "lb-agent",
        ])
        .current_dir(root);
    if profile == "release" {
        build.arg("--release");
    }
    // Without the variables cargo set for this test crate: build scripts that track them
    // (ring's tracks CARGO_MANIFEST_DIR and CARGO_PKG_*) would see them change between this
    // build and a build from a shell, and rebuild half the dependency tree (about a minute
    // here) each time one follows the other.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
            || matches!(
                key.as_ref(),
                "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "OUT_DIR"
            )
        {
            build.env_remove(key.as_ref());
        }
    }
    // Cheap when up to date; makes sure the binary matches the library the tests link.
    let status = build.status().context("cargo build lb-agent")?;
    if !status.success() || !bin.exists() {
        bail!("building lb-agent failed ({status})");
    }
    Ok(bin)
}

/// How to run the agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// `--iface`; empty: none (the agent picks the interfaces of the default routes).
    pub uplink: String,
    pub backend_ifaces: Vec<String>,
    /// `--max-ring-size`: the largest ring (each is sized from its backends).
    pub ring_size: u32,
    /// `--max-services` and `--max-backends`.
    pub max_services: u32,
    pub max_backends: u32,
    pub extra: Vec<String>,
    /// A command line the agent runs under (e.g. `setpriv` with a capability set).
    pub wrapper: Vec<String>,
    /// How long to wait for the agent to become ready: 20 s, or `XDPLB_AGENT_READY_SECONDS`
    /// (the verifier runs for much longer under emulation).
    pub ready_timeout: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        let ready = std::env::var("XDPLB_AGENT_READY_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        AgentOptions {
            uplink: "eth0".into(),
            backend_ifaces: vec!["vethpod*".into()],
            ring_size: lb_common::DEFAULT_MAX_RING_SIZE,
            max_services: 64,
            max_backends: 1024,
            extra: Vec::new(),
            wrapper: Vec::new(),
            ready_timeout: Duration::from_secs(ready),
        }
    }
}

pub struct AgentProcess {
    ns: String,
    child: Option<ChildGuard>,
    binary: PathBuf,
    pin_dir: PathBuf,
    state_dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    options: AgentOptions,
    /// Reloads applied when the config was last written (to wait for the next one).
    applied: u64,
}

impl AgentProcess {
    /// Starts the agent in `ns` with `config` (TOML) and waits until it is ready.
    pub fn start(
        ns: &Netns,
        bpffs: &Bpffs,
        config: &str,
        options: AgentOptions,
    ) -> Result<AgentProcess> {
        let state_dir = PathBuf::from(format!(
            "/run/xdplb-tests/{}-{}-state",
            std::process::id(),
            ns.name()
        ));
        std::fs::create_dir_all(&state_dir)?;
        let config_path = state_dir.join("lb.toml");
        std::fs::write(&config_path, config)?;
        let mut agent = AgentProcess {
            ns: ns.name().to_string(),
            child: None,
            binary: agent_binary()?,
            pin_dir: bpffs.path().join(ns.name()),
            log: state_dir.join("agent.log"),
            state_dir,
            config: config_path,
            options,
            applied: 0,
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .args(&self.options.wrapper)
            .arg(&self.binary)
            .args(["run", "--config"])
            .arg(&self.config);
        if !self.options.uplink.is_empty() {
            cmd.args(["--iface", &self.options.uplink]);
        }
        cmd.arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--max-ring-size", &self.options.ring_size.to_string()])
            .args(["--max-services", &self.options.max_services.to_string()])
            .args(["--max-backends", &self.options.max_backends.to_string()])
            .args(["--flow-entries", "65536"])
            .args(["--sweep-seconds", "2"])
            .args(&self.options.extra)
            .env("RUST_LOG", "info,netlink_packet_route=error")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        for p in &self.options.backend_ifaces {
            cmd.args(["--backend-ifaces", p]);
        }
        let _ = std::fs::remove_file(self.state_dir.join(lb_userspace::state::FILE));
        self.child = Some(ChildGuard::spawn(cmd)?);
        self.wait(self.options.ready_timeout, "to become ready", |s| s.ready)?;
        self.applied = self.state().map_or(0, |s| s.applied);
        Ok(())
    }

    pub fn state(&self) -> Option<lb_userspace::state::State> {
        lb_userspace::state::State::read(&self.state_dir)
    }

    fn wait(
        &mut self,
        limit: Duration,
        what: &str,
        done: impl Fn(&lb_userspace::state::State) -> bool,
    ) -> Result<()> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "lb-agent exited ({status}) before {what}; log:\n{}",
                    self.log_tail()
                );
            }
            if self.state().is_some_and(|s| done(&s)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "lb-agent did not manage {what} within {limit:?}; log:\n{}",
            self.log_tail()
        )
    }

    /// Replaces the config and waits until the agent applied it (Ok) or rejected it (Err with
    /// its reason).
    pub fn set_config(&mut self, config: &str) -> Result<()> {
        let before = self
            .state()
            .map(|s| (s.applied, s.rejected))
            .unwrap_or_default();
        std::fs::write(&self.config, config)?;
        self.signal(libc::SIGHUP);
        self.wait(Duration::from_secs(10), "to reload its config", |s| {
            (s.applied, s.rejected) != before
        })?;
        let s = self.state().context("no state file")?;
        if s.rejected != before.1 {
            bail!("config rejected: {}", s.last_error.unwrap_or_default());
        }
        self.applied = s.applied;
        Ok(())
    }

    /// Stops the agent. With `keep` (--keep-on-exit) the data path stays attached.
    pub fn stop(&mut self) -> Result<()> {
        self.signal(libc::SIGTERM);
        let started = Instant::now();
        while let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                if !status.success() {
                    bail!("lb-agent exited with {status}; log:\n{}", self.log_tail());
                }
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(15) {
                bail!(
                    "lb-agent did not stop within 15 s; log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops and starts again with the same pins and config (the options must include
    /// --keep-on-exit for flows to survive).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// The options the next (re)start uses.
    pub fn options_mut(&mut self) -> &mut AgentOptions {
        &mut self.options
    }

    /// `lb-agent cleanup` in the agent's namespace (where its interfaces are), as an operator
    /// runs it after an agent that kept its data path attached; returns its output.
    pub fn cleanup(&self) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(&self.binary)
            .args(["cleanup", "--pin-dir"])
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()?;
        if !out.status.success() {
            bail!("lb-agent cleanup: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn signal(&self, sig: i32) {
        if let Some(child) = &self.child {
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(child.id().cast_signed(), sig) };
        }
    }

    /// `lb-agent status --json`.
    pub fn status(&self) -> Result<serde_json::Value> {
        self.query(&["status", "--json"])
    }

    /// `lb-agent status`, as a person reads it.
    pub fn status_text(&self) -> Result<String> {
        let out = Command::new(&self.binary)
            .arg("status")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()?;
        if !out.status.success() {
            bail!("lb-agent status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The config file the agent runs with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// `lb-agent flow ... --json`.
    pub fn flow(&self, proto: &str, src: &str, dst: &str) -> Result<serde_json::Value> {
        self.query(&["flow", proto, src, dst, "--json"])
    }

    fn query(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = Command::new(&self.binary)
            .args(args)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "lb-agent {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        // Whatever a kept agent left: detach and unpin.
        let _ = self.cleanup();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// Whatever an agent started outside [`AgentProcess`] left (programs, pins, state), removed
/// with `lb-agent cleanup` when dropped (the benches run the agent binary themselves).
pub struct Cleanup {
    pub binary: PathBuf,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.binary)
            .args(["cleanup", "--pin-dir"])
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}
