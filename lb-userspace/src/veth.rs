//! The pod ends of backend veths. The kernel delivers a frame that XDP redirects into a veth only
//! if the veth's other end, the pod's `eth0`, runs NAPI: it has an XDP program of its own, or GRO
//! turned on. CNIs such as the AWS VPC CNI set up neither, and such frames would be dropped
//! (counted as the veth's transmit errors). So before the data path may redirect to a backend
//! veth, the agent turns GRO on at the pod end, inside the pod's network namespace. Where that
//! cannot be done, the veth stays out of the devmap and the data path hands packets for it to
//! the kernel, which forwards them (slower, but delivered).
use std::{
    collections::BTreeSet,
    fs::File,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::PathBuf,
};

use crate::{
    netlink::{Link, Netlink},
    nic::Ethtool,
    system,
};

/// Where network namespaces can be found: named ones (ip netns, container runtimes), and every
/// process's (the host's processes with hostPID, else this container's).
const NETNS_DIRS: &[&str] = &[system::NAMED_NETNS_DIR, "/var/run/netns"];

/// What was done for one veth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodEnd {
    /// GRO was already on.
    Ready,
    /// GRO turned on now.
    Enabled,
}

/// Makes sure the pod end of `link` (a veth) takes redirected frames. `Err`: why not.
pub fn prepare(nl: &mut Netlink, link: &Link) -> Result<PodEnd, String> {
    let Some((peer_index, nsid)) = link.peer else {
        return Err("not a veth with its other end in another namespace".into());
    };
    let ns = find_netns(nl, nsid).ok_or_else(|| {
        format!(
            "the namespace of its other end (id {nsid}) is not among {} or /proc/*/ns/net (the agent needs hostPID or the runtime's netns directory mounted)",
            NETNS_DIRS.join(", ")
        )
    })?;
    system::in_netns(&ns, move || {
        let name = system::ifname(peer_index)
            .ok_or_else(|| format!("no interface {peer_index} in the pod's namespace"))?;
        let ethtool = Ethtool::open().map_err(|e| e.to_string())?;
        if ethtool.gro(&name) == Some(true) {
            return Ok(PodEnd::Ready);
        }
        ethtool
            .set_gro(&name, true)
            .map_err(|e| format!("turning GRO on for {name} in the pod: {e}"))?;
        Ok(PodEnd::Enabled)
    })
}

/// A descriptor of the network namespace this one calls `nsid`.
fn find_netns(nl: &mut Netlink, nsid: i32) -> Option<File> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    for dir in NETNS_DIRS {
        if let Ok(rd) = std::fs::read_dir(dir) {
            candidates.extend(rd.flatten().map(|e| e.path()));
        }
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        candidates.extend(
            rd.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .map(|e| e.path().join("ns/net")),
        );
    }
    let mut seen = BTreeSet::new();
    for path in candidates {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        if nl.nsid_of(file.as_fd()).ok().flatten() == Some(nsid) {
            return Some(file);
        }
    }
    None
}
