//! The system calls the agent makes outside the data path and netlink: the state directory's
//! lock, bpffs, entering another network namespace, interface names and indexes, the data
//! path's clock, telling a private `/sys` (as `ip netns exec` makes) from the system's, and
//! handing freed heap back to the system.
//! Each wraps one call with the error a person can act on; none holds policy.
use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{Read, Seek, Write},
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, setns},
    sys::statfs::{BPF_FS_MAGIC, statfs},
    time::{ClockId, clock_gettime},
};

/// Where bpffs is mounted by convention, and where we mount it if it is not.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Where `ip netns add` keeps named network namespaces.
pub const NAMED_NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another lb-agent (pid {holder}) is running with the state directory {}: one agent per node",
        dir.display()
    )]
    Locked { holder: String, dir: PathBuf },
    #[error(
        "{} is not on a bpffs; mount one there (mount -t bpf bpf <dir>) or use a directory under {BPFFS}",
        .0.display()
    )]
    NotBpffs(PathBuf),
    #[error("mounting bpffs at {BPFFS}: {0}")]
    Mount(#[source] nix::Error),
    #[error("{0}")]
    PrivateSys(PrivateSys),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SystemError + '_ {
    move |source| SystemError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Takes `<state_dir>/agent.lock` (held while the returned file is open), or says which agent
/// holds it.
pub fn lock_state_dir(state_dir: &Path) -> Result<File, SystemError> {
    std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let path = state_dir.join("agent.lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(SystemError::Locked {
                holder: holder.trim().to_string(),
                dir: state_dir.to_path_buf(),
            });
        }
        Err(TryLockError::Error(e)) => return Err(io(&path)(e)),
    }
    file.set_len(0).map_err(io(&path))?;
    file.rewind().map_err(io(&path))?;
    write!(file, "{}", std::process::id()).map_err(io(&path))?;
    Ok(file)
}

/// True if `path` is on a bpffs.
pub fn on_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Makes sure `pin_dir` will be on a bpffs: it is already (its nearest existing ancestor is), or
/// it is under /sys/fs/bpf and we mount one there (some distributions do not). Refuses to mount
/// into a private `/sys` (see [`private_sys`]): pins there would vanish with this process.
/// Returns whether it mounted.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<bool, SystemError> {
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if on_bpffs(&probe) {
        return Ok(false);
    }
    if !pin_dir.starts_with(BPFFS) {
        return Err(SystemError::NotBpffs(pin_dir.to_path_buf()));
    }
    if let Some(private) = private_sys() {
        return Err(SystemError::PrivateSys(private));
    }
    let mount_point = Path::new(BPFFS);
    std::fs::create_dir_all(mount_point).map_err(io(mount_point))?;
    mount(
        Some("bpf"),
        mount_point,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(SystemError::Mount)?;
    Ok(true)
}

/// This process sees a `/sys` of its own, not the system's: `ip netns exec` unshares the mount
/// namespace and mounts a fresh sysfs, so bpffs pins made there vanish with the process and an
/// agent's pins are invisible from there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrivateSys {
    /// The named network namespace `ip netns exec` entered, if that is what made it.
    pub netns: Option<String>,
}

impl std::fmt::Display for PrivateSys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.netns.as_deref().unwrap_or("NAME");
        match &self.netns {
            Some(n) => write!(f, "this process runs under `ip netns exec {n}`, ")?,
            None => write!(f, "this process has a private mount namespace, ")?,
        }
        write!(
            f,
            "which mounts a private /sys: bpffs pins made or looked for here are not the system's \
             (an agent's would vanish with it, and `lb-agent status` would not find a running \
             agent's). Enter only the network namespace instead: \
             nsenter --net={NAMED_NETNS_DIR}/{name} lb-agent ..."
        )
    }
}

/// Detects a private `/sys` ([`PrivateSys`]): `/sys` is mounted from a named network namespace
/// (`ip netns exec` names the sysfs mount after it), or our mount namespace differs from init's
/// and init sees a bpffs at /sys/fs/bpf where we do not.
pub fn private_sys() -> Option<PrivateSys> {
    private_sys_from(
        &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        same_file("/proc/self/ns/mnt", "/proc/1/ns/mnt"),
        || on_bpffs(Path::new("/proc/1/root/sys/fs/bpf")) && !on_bpffs(Path::new(BPFFS)),
        |name| Path::new(NAMED_NETNS_DIR).join(name).exists(),
    )
}

/// [`private_sys`] over its inputs: our mountinfo, whether our mount namespace is init's (None:
/// cannot tell), whether init has bpffs where we do not, and whether a netns name exists.
fn private_sys_from(
    mountinfo: &str,
    same_mount_ns: Option<bool>,
    init_has_bpffs_we_lack: impl FnOnce() -> bool,
    named_netns: impl Fn(&str) -> bool,
) -> Option<PrivateSys> {
    // mountinfo: id parent major:minor root mount-point options... - fstype source options
    let sys_source = mountinfo.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        let mount_point = fields.nth(4)?;
        let (_, after) = line.split_once(" - ")?;
        let mut after = after.split(' ');
        let fstype = after.next()?;
        let source = after.next()?;
        (mount_point == "/sys" && fstype == "sysfs").then(|| source.to_string())
    });
    if let Some(source) = sys_source
        && source != "sysfs"
        && named_netns(&source)
    {
        return Some(PrivateSys {
            netns: Some(source),
        });
    }
    (same_mount_ns == Some(false) && init_has_bpffs_we_lack()).then_some(PrivateSys { netns: None })
}

/// Whether two paths are the same file (namespace links compare by device and inode); None if
/// either cannot be read (no permission for /proc/1: we cannot tell).
fn same_file(a: &str, b: &str) -> Option<bool> {
    let a = std::fs::metadata(a).ok()?;
    let b = std::fs::metadata(b).ok()?;
    Some((a.dev(), a.ino()) == (b.dev(), b.ino()))
}

/// Runs `f` on a new thread that has entered the network namespace `ns` (the calling thread
/// stays where it is; the thread ends with `f`, so no other work ever runs in `ns` by mistake).
pub fn in_netns<T: Send>(
    ns: &File,
    f: impl FnOnce() -> Result<T, String> + Send,
) -> Result<T, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("entering the network namespace: {e}"))?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err("panicked".into()))
    })
}

/// The ifindex of an interface in this network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

/// The name of the interface with `index` in this network namespace.
pub fn ifname(index: u32) -> Option<String> {
    nix::net::if_::if_indextoname(index)
        .ok()
        .map(|c| c.to_string_lossy().into_owned())
}

/// The data path's clock in ns: bpf_ktime_get_coarse_ns() is CLOCK_MONOTONIC_COARSE. (The fine
/// clock runs up to a tick ahead of it: a bucket stamped with it would start short.)
pub fn monotonic_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).map_or(0, |ts| {
        u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(ts.tv_nsec()).unwrap_or(0)
    })
}

/// Large allocations (1 MiB and up) get pages of their own, returned when freed. glibc's
/// default moves that threshold up to the largest block freed so far, so after the first
/// `/metrics` text (13 MiB at 10,000 Services) every later one, and every vector of the
/// services, came from the heap and left its pages there: about 40 MiB of a thread's heap
/// held free between renders.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt sets a parameter of the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Hands the heap's free pages back to the system (glibc's `malloc_trim`): glibc keeps what was
/// freed for the next allocation, so a process's RSS stays at its high-water mark, which at
/// 10,000 Services is the moment a full list, its translation and the states made from it all
/// lived at once. A few milliseconds at that size; call it after such work, not in a loop.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST_SYS: &str = "25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw\n\
                            26 25 0:24 / /sys/fs/bpf rw,relatime shared:8 - bpf bpf rw,mode=700\n";
    const NETNS_EXEC_SYS: &str = "25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
                                  99 30 0:55 / /sys rw,relatime - sysfs lab-node1 rw\n";

    #[test]
    fn ip_netns_exec_is_recognised_by_its_sysfs_mount() {
        let found = private_sys_from(NETNS_EXEC_SYS, Some(false), || false, |n| n == "lab-node1");
        assert_eq!(
            found,
            Some(PrivateSys {
                netns: Some("lab-node1".into())
            })
        );
        let message = found.unwrap().to_string();
        assert!(
            message.contains("nsenter --net=/run/netns/lab-node1"),
            "{message}"
        );
    }

    #[test]
    fn without_a_named_sysfs_only_a_missing_bpffs_in_another_mount_namespace_tells() {
        assert_eq!(
            private_sys_from(HOST_SYS, Some(true), || true, |_| true),
            None,
            "init's own mount namespace"
        );
        assert_eq!(
            private_sys_from(HOST_SYS, None, || true, |_| true),
            None,
            "cannot see init's: no claim"
        );
        // /proc/1 hidden (a sandbox, a container without hostPID): the sysfs name still tells.
        assert!(private_sys_from(NETNS_EXEC_SYS, None, || false, |n| n == "lab-node1").is_some());
    }

    #[test]
    fn a_container_with_the_hosts_bpffs_is_not_private() {
        // A DaemonSet pod: its own mount namespace, /sys/fs/bpf mounted from the host.
        assert_eq!(
            private_sys_from(HOST_SYS, Some(false), || false, |_| false),
            None
        );
        // Another private mount namespace that lacks init's bpffs.
        assert_eq!(
            private_sys_from(HOST_SYS, Some(false), || true, |_| false),
            Some(PrivateSys { netns: None })
        );
    }

    #[test]
    fn the_state_directory_is_locked_once() {
        let dir = std::env::temp_dir().join(format!("xdplb-lock-{}", std::process::id()));
        let held = lock_state_dir(&dir).unwrap();
        let e = lock_state_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())),
            "names the holder: {e}"
        );
        drop(held);
        lock_state_dir(&dir).expect("free again once the holder closes it");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_clock_moves_forward() {
        let a = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(monotonic_ns() > a);
    }

    #[test]
    fn loopback_has_an_index_and_a_name() {
        let i = ifindex("lo").expect("lo");
        assert_eq!(ifname(i).as_deref(), Some("lo"));
        assert_eq!(ifindex("no-such-interface0"), None);
    }
}
