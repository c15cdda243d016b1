//! Network namespaces as RAII handles: create and delete with `ip netns`, run code on a thread that
//! entered one, spawn processes inside one, and the root policy of the privileged suites.
//! Nothing here changes the namespace of the calling thread, and every handle cleans up on Drop,
//! panics included.
use std::{
    fs::{self, File},
    io::Write,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    thread::{self, JoinHandle, Scope, ScopedJoinHandle},
};

use anyhow::{Context, Result, bail, ensure};

/// Where `ip netns` keeps its bind mounts.
pub const NETNS_DIR: &str = "/run/netns";

/// Policy of every privileged test: true to go on. Without root it returns false after printing
/// "skipped: needs root", except under `CI=true`, where a skipped privileged suite would pass
/// silently: there it panics.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        !std::env::var("CI").is_ok_and(|v| v == "true"),
        "this test needs root (netns, veth, XDP) and CI=true forbids skipping it"
    );
    eprintln!("skipped: needs root");
    false
}

/// For a test that runs the data path on two CPUs at once: the machine must have them (a test
/// that found one would prove nothing, so it fails rather than skips).
pub fn require_two_cpus() {
    assert!(
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get) >= 2,
        "this test needs two CPUs"
    );
}

/// Runs `ip ARGS` and returns its stdout. On failure the error names the command and carries
/// ip's stderr.
pub fn ip<S: AsRef<str>>(args: &[S]) -> Result<String> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let shown = || format!("`ip {}`", args.join(" "));
    let out = Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} (is iproute2 installed?)", shown()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            shown(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// `PREFIX-PID-N`: unique within this process (N counts up) and across processes (PID), so
/// parallel tests never share a namespace, and `remove_stale` can tell leftovers of dead
/// processes.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Deletes namespaces named `PREFIX-PID-...` whose process is gone: leftovers of a run that was
/// killed before its Drop ran. Namespaces of live processes are left alone.
pub fn remove_stale(prefix: &str) {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    let lead = format!("{prefix}-");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&lead) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let dead = pid != std::process::id() && !PathBuf::from(format!("/proc/{pid}")).exists();
        if dead && let Err(e) = ip(&["netns", "del", &name]) {
            eprintln!("removing stale namespace {name}: {e:#}");
        }
    }
}

/// A named network namespace, deleted on Drop. Deleting it destroys the veths inside it (and so
/// their peers elsewhere) once nothing (socket, thread) holds it any more.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` (replacing a stale one of that name) with `lo` up.
    pub fn create(name: &str) -> Result<Netns> {
        ensure!(
            !name.is_empty() && name.len() <= 200 && !name.contains('/'),
            "bad namespace name {name:?}"
        );
        let path = PathBuf::from(NETNS_DIR).join(name);
        if path.exists() {
            ip(&["netns", "del", name])
                .with_context(|| format!("removing stale namespace {name}"))?;
        }
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Creates a namespace named by `unique_name(prefix)`.
    pub fn create_unique(prefix: &str) -> Result<Netns> {
        Netns::create(&unique_name(prefix))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount `ip netns` made: open it to setns into the namespace.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip<S: AsRef<str>>(&self, args: &[S]) -> Result<String> {
        let mut all: Vec<&str> = vec!["-n", &self.name];
        all.extend(args.iter().map(AsRef::as_ref));
        ip(&all)
    }

    /// `ip -n NAME -batch -`: one process for many commands, one command per line (no `-6` and
    /// such options in lines: ip infers the family from the addresses). Stops at the first
    /// failing command; the error names it.
    pub fn ip_batch<S: AsRef<str>>(&self, lines: &[S]) -> Result<()> {
        let lines: Vec<&str> = lines.iter().map(AsRef::as_ref).collect();
        if lines.is_empty() {
            return Ok(());
        }
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running `ip -batch` (is iproute2 installed?)")?;
        let mut stdin = child.stdin.take().expect("piped");
        let script = lines.join("\n") + "\n";
        let written = stdin.write_all(script.as_bytes());
        drop(stdin);
        let out = child
            .wait_with_output()
            .context("waiting for `ip -batch`")?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            // ip says "Command failed -:N" with N counted from 1.
            let failed = stderr
                .rsplit("Command failed -:")
                .next()
                .and_then(|n| n.trim().parse::<usize>().ok())
                .and_then(|n| lines.get(n.wrapping_sub(1)));
            match failed {
                Some(line) => bail!(
                    "`ip -n {} {line}` failed: {}",
                    self.name,
                    stderr.trim().replace('\n', "; ")
                ),
                None => bail!(
                    "`ip -n {} -batch` of [{}] failed ({}): {}",
                    self.name,
                    lines.join("; "),
                    out.status,
                    stderr.trim()
                ),
            }
        }
        written.context("writing to `ip -batch`")?;
        Ok(())
    }

    /// Runs `f` on a fresh thread that entered this namespace, and returns its result. Sockets
    /// created by `f` stay in this namespace after the thread ends. A panic in `f` is resumed here.
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        thread::scope(|s| match self.spawn_scoped(s, f).join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }

    /// Spawns `f` on a scoped thread that enters this namespace first; the handle yields an error
    /// instead if entering failed.
    pub fn spawn_scoped<'scope, 'env, T, F>(
        &self,
        scope: &'scope Scope<'scope, 'env>,
        f: F,
    ) -> ScopedJoinHandle<'scope, Result<T>>
    where
        F: FnOnce() -> T + Send + 'scope,
        T: Send + 'scope,
    {
        let file = self.open();
        scope.spawn(move || {
            enter(&file?)?;
            Ok(f())
        })
    }

    /// Spawns a named detached thread that enters this namespace and runs `f`. Fails here if the
    /// thread could not enter it.
    pub fn spawn_thread<T, F>(&self, thread_name: &str, f: F) -> Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let file = self.open()?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
        let handle = thread::Builder::new()
            .name(thread_name.to_string())
            .spawn(move || {
                let entered = enter(&file);
                let ok = entered.is_ok();
                let _ = tx.send(entered);
                // Never run `f` in the wrong namespace; the spawner reports the error.
                assert!(ok, "thread did not enter its namespace");
                f()
            })
            .context("spawning a namespace thread")?;
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => bail!("namespace thread ended before entering {}", self.name),
        }
    }

    /// `ip netns exec NAME PROGRAM` as a Command to adjust (stdin is null) and pass to
    /// [`ChildGuard::spawn`].
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program])
            .stdin(Stdio::null());
        cmd
    }

    /// Spawns `PROGRAM ARGS` inside this namespace (stdout discarded, stderr inherited); killed on
    /// Drop of the guard.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Result<ChildGuard> {
        let mut cmd = self.command(program);
        cmd.args(args).stdout(Stdio::null());
        ChildGuard::spawn(cmd)
    }

    /// Writes sysctls (`net.ipv4.ip_forward` style keys) of this namespace: /proc/sys/net shows
    /// the namespace of the thread that opens it.
    pub fn sysctls(&self, settings: &[(&str, &str)]) -> Result<()> {
        let settings: Vec<(String, String)> = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.run(move || -> Result<()> {
            for (key, value) in &settings {
                let path = format!("/proc/sys/{}", key.replace('.', "/"));
                fs::write(&path, value).with_context(|| format!("sysctl {key}={value}"))?;
            }
            Ok(())
        })?
        .with_context(|| format!("in namespace {}", self.name))
    }

    /// Reads one sysctl of this namespace, trimmed.
    pub fn sysctl(&self, key: &str) -> Result<String> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = self.run(move || fs::read_to_string(&path))??;
        Ok(value.trim().to_string())
    }

    fn open(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("opening namespace {}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("deleting namespace {}: {e:#}", self.name);
        }
    }
}

/// Moves the calling thread (only it) into the namespace behind `file`.
fn enter(file: &File) -> Result<()> {
    // SAFETY: setns on a valid fd; CLONE_NEWNET changes only this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A child process killed (SIGKILL) and reaped on Drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    program: String,
}

impl ChildGuard {
    pub fn spawn(mut cmd: Command) -> Result<ChildGuard> {
        let program = format!("{cmd:?}");
        let child = cmd.spawn().with_context(|| format!("spawning {program}"))?;
        Ok(ChildGuard { child, program })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Some(status) once the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("waiting for {}", self.program))
    }

    /// Kills and reaps the process now.
    pub fn kill(mut self) -> Result<ExitStatus> {
        self.stop()
    }

    fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let _ = self.child.kill();
        Ok(self.child.wait()?)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping {}: {e:#}", self.program);
        }
    }
}

/// Turns TX checksum offload off on `ifname` (in the calling thread's namespace), like
/// `ethtool -K ifname tx off`, through the ethtool ioctl (ethtool is not installed here).
///
/// Needed on every veth that sends frames into an XDP program: with the offload on, a local
/// sender leaves only the pseudo-header sum in the TCP/UDP checksum field and marks the skb
/// CHECKSUM_PARTIAL for the "hardware" to finish. XDP cannot see that mark, and a frame it sends
/// on (XDP_TX, XDP_REDIRECT) no longer carries it, so the receiver would get a wrong checksum.
/// Frames from a real NIC carry complete checksums, so this is about the lab, not production.
pub fn tx_checksum_off(ifname: &str) -> Result<()> {
    const ETHTOOL_STXCSUM: u32 = 0x17;
    ethtool_value(ifname, ETHTOOL_STXCSUM, 0).map(drop)
}

/// Whether GRO is on for `ifname` (in the calling thread's namespace), like `ethtool -k`.
pub fn gro_enabled(ifname: &str) -> Result<bool> {
    const ETHTOOL_GGRO: u32 = 0x2b;
    Ok(ethtool_value(ifname, ETHTOOL_GGRO, 0)? != 0)
}

/// One ethtool ioctl of the `struct ethtool_value` kind; returns the value the kernel left.
fn ethtool_value(ifname: &str, cmd: u32, data: u32) -> Result<u32> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    /// `struct ifreq`: the name, then a 24-byte union of which ethtool uses the pointer.
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &raw mut value,
        _pad: [0; 16],
    };
    let bytes = ifname.as_bytes();
    anyhow::ensure!(
        bytes.len() < libc::IFNAMSIZ,
        "interface name {ifname} too long"
    );
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: a datagram socket for the ioctl, closed below; `req` outlives the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        anyhow::ensure!(rc == 0, "ethtool command {cmd:#x} on {ifname}: {err}");
    }
    Ok(value.data)
}
