//! Attaching the data path to interfaces: `lb_uplink` at XDP on uplinks, `lb_backend` at TC
//! ingress (a TCX link) on backend-facing interfaces. Every attachment is a BPF link pinned under
//! the pin directory (`links/<interface>`), so the programs stay attached when the agent exits
//! with --keep-on-exit, and the next agent swaps its own programs in with one bpf_link_update: no
//! packet sees the interface without a program.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, TcAttachType, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};

use crate::dataplane;

/// How to attach: the driver's own XDP hook, the generic one, or the first that works.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeChoice {
    Native,
    Generic,
    Auto,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("interface {0} does not exist")]
    NoInterface(String),
    #[error("attaching {program} to {iface} in {mode} mode: {reason}")]
    Attach {
        program: &'static str,
        iface: String,
        mode: &'static str,
        reason: String,
    },
    #[error("pinning the link of {iface} at {}: {reason}", path.display())]
    Pin {
        iface: String,
        path: PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Dataplane(#[from] crate::error::DataplaneError),
}

/// One interface with a program on it.
#[derive(Debug)]
pub struct Attached {
    pub iface: String,
    pub ifindex: u32,
    pub program: &'static str,
    /// Where the program runs: for XDP its mode ("native", "generic", "offload", or "as before"
    /// when a previous agent's link was taken over and the kernel did not say), else "tc".
    pub mode: &'static str,
    /// Why the mode is what it is (e.g. native failed, and how).
    pub note: Option<String>,
    link: PinnedLink,
}

pub struct Attachments {
    dir: PathBuf,
    by_iface: BTreeMap<String, Attached>,
}

impl Attachments {
    /// Links pin under `<layout dir>/links`.
    pub fn new(layout_dir: &Path) -> std::io::Result<Attachments> {
        let dir = layout_dir.join("links");
        std::fs::create_dir_all(&dir)?;
        Ok(Attachments {
            dir,
            by_iface: BTreeMap::new(),
        })
    }

    pub fn get(&self, iface: &str) -> Option<&Attached> {
        self.by_iface.get(iface)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Attached> {
        self.by_iface.values()
    }

    /// Interfaces a previous agent left a link on.
    pub fn pinned_interfaces(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(std::result::Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `program` is attached to `iface` already, and the interface is the same one (not one
    /// that went away and came back under its name).
    fn holds(&self, iface: &str, program: &str, ifindex: u32) -> bool {
        self.by_iface
            .get(iface)
            .is_some_and(|a| a.program == program && a.ifindex == ifindex)
    }

    /// Puts the TC program `program` on `iface`'s ingress (a TCX link, Linux 6.6+): takes over
    /// a link a previous agent pinned there, or attaches anew.
    pub fn attach_tc(
        &mut self,
        ebpf: &mut Ebpf,
        program: &'static str,
        iface: &str,
    ) -> Result<&Attached, AttachError> {
        let ifindex = crate::system::ifindex(iface)
            .ok_or_else(|| AttachError::NoInterface(iface.to_string()))?;
        if self.holds(iface, program, ifindex) {
            return Ok(&self.by_iface[iface]);
        }
        self.by_iface.remove(iface);
        let path = self.dir.join(iface);
        let prog = dataplane::classifier_mut(ebpf, program)?;
        let err = |reason: String| AttachError::Attach {
            program,
            iface: iface.to_string(),
            mode: "tc",
            reason,
        };
        let taken_over = previous_link(&path)
            .and_then(|fd| SchedClassifierLink::try_from(fd).ok())
            .and_then(|link| prog.attach_to_link(link).ok());
        let (id, note) = match taken_over {
            Some(id) => (id, Some("took over the previous agent's link".to_string())),
            None => (
                prog.attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| err(format!("{e} (TCX links need Linux 6.6+)")))?,
                None,
            ),
        };
        let link = prog.take_link(id).map_err(|e| err(e.to_string()))?;
        let fd = FdLink::try_from(link).map_err(|e| err(e.to_string()))?;
        let link = fd.pin(&path).map_err(|e| AttachError::Pin {
            iface: iface.to_string(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
        self.by_iface.insert(
            iface.to_string(),
            Attached {
                iface: iface.to_string(),
                ifindex,
                program,
                mode: "tc",
                note,
                link,
            },
        );
        Ok(&self.by_iface[iface])
    }

    /// Puts the XDP program `program` on `iface`: takes over a link a previous agent pinned
    /// there (atomic replacement, keeping the mode it runs in: `current`, from netlink), or
    /// attaches anew in `mode`. `obstacles`: what is known to stand in native XDP's way on this
    /// device, for the messages when native fails.
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        program: &'static str,
        iface: &str,
        mode: ModeChoice,
        current: Option<&'static str>,
        obstacles: &[String],
    ) -> Result<&Attached, AttachError> {
        let ifindex = crate::system::ifindex(iface)
            .ok_or_else(|| AttachError::NoInterface(iface.to_string()))?;
        if self.holds(iface, program, ifindex) {
            return Ok(&self.by_iface[iface]);
        }
        // Another program of ours on this interface (role changed): let go of it first.
        self.by_iface.remove(iface);
        let path = self.dir.join(iface);
        let prog = dataplane::program_mut(ebpf, program)?;
        let err = |mode: &'static str, reason: String| AttachError::Attach {
            program,
            iface: iface.to_string(),
            mode,
            reason,
        };

        // A previous agent's link: swap our program in without detaching.
        let taken_over = previous_link(&path)
            .and_then(|fd| XdpLink::try_from(fd).ok())
            .and_then(|link| prog.attach_to_link(link).ok());
        let hints: String = obstacles.iter().fold(String::new(), |mut s, o| {
            s.push_str("; ");
            s.push_str(o);
            s
        });
        let (id, used, note) = match taken_over {
            Some(id) => (
                id,
                current.unwrap_or("as before"),
                Some(format!(
                    "took over the previous agent's link{}",
                    if current == Some("generic") {
                        &hints
                    } else {
                        ""
                    }
                )),
            ),
            None => attach_xdp(prog, iface, mode, &hints).map_err(|(m, why)| err(m, why))?,
        };
        let link = prog.take_link(id).map_err(|e| err(used, e.to_string()))?;
        let fd = FdLink::try_from(link).map_err(|e| AttachError::Pin {
            iface: iface.to_string(),
            path: path.clone(),
            reason: format!("{e} (the kernel attached without a BPF link: needs Linux 5.9+)"),
        })?;
        let link = fd.pin(&path).map_err(|e| AttachError::Pin {
            iface: iface.to_string(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
        self.by_iface.insert(
            iface.to_string(),
            Attached {
                iface: iface.to_string(),
                ifindex,
                program,
                mode: used,
                note,
                link,
            },
        );
        Ok(&self.by_iface[iface])
    }

    /// Takes the program off `iface` (if the interface is gone, just forgets it).
    pub fn detach(&mut self, iface: &str) {
        if let Some(a) = self.by_iface.remove(iface) {
            // Unpinning leaves the link to the fd, which closes here: detached.
            drop(a.link.unpin());
        }
        let _ = std::fs::remove_file(self.dir.join(iface));
    }

    /// Detaches everything, including links a previous agent left for interfaces we no
    /// longer manage.
    pub fn detach_all(&mut self) {
        let ifaces: Vec<String> = self.by_iface.keys().cloned().collect();
        for iface in ifaces {
            self.detach(&iface);
        }
        for stale in self.pinned_interfaces() {
            if let Ok(p) = PinnedLink::from_pin(self.dir.join(&stale)) {
                drop(p.unpin());
            }
            let _ = std::fs::remove_file(self.dir.join(stale));
        }
    }

    /// Leaves every link attached and pinned (for the next agent to take over).
    pub fn keep_all(self) {
        // Dropping a pinned link's handle does not detach it.
        drop(self.by_iface);
    }
}

/// Attaches `prog` to `iface` anew in `mode`: (link, the XDP mode used, why that one when it is
/// not the one asked for). `Err`: (the mode that failed, why, with `hints` about the device).
fn attach_xdp(
    prog: &mut aya::programs::Xdp,
    iface: &str,
    mode: ModeChoice,
    hints: &str,
) -> Result<(aya::programs::xdp::XdpLinkId, &'static str, Option<String>), (&'static str, String)> {
    match mode {
        ModeChoice::Native => prog
            .attach(iface, XdpMode::Driver)
            .map(|id| (id, "native", None))
            .map_err(|e| ("native", format!("{e}{hints}"))),
        ModeChoice::Generic => prog
            .attach(iface, XdpMode::Skb)
            .map(|id| (id, "generic", None))
            .map_err(|e| ("generic", e.to_string())),
        ModeChoice::Auto => match prog.attach(iface, XdpMode::Driver) {
            Ok(id) => Ok((id, "native", None)),
            Err(native) => {
                let id = prog
                    .attach(iface, XdpMode::Skb)
                    .map_err(|e| ("generic", format!("{e} (native failed too: {native})")))?;
                let why = format!(
                    "native XDP failed ({native}{hints}); using generic XDP, which runs after the kernel has built an skb: correct, but much slower"
                );
                Ok((id, "generic", Some(why)))
            }
        },
    }
}

/// The link a previous agent pinned at `path`, unpinned for us to take over. `None` if there
/// is none, or it is unusable (the interface went away and came back): the pin is then removed
/// and the caller attaches anew.
fn previous_link(path: &Path) -> Option<FdLink> {
    if !path.exists() {
        return None;
    }
    let link = PinnedLink::from_pin(path).ok().and_then(|p| p.unpin().ok());
    if link.is_none() {
        let _ = std::fs::remove_file(path);
    }
    link
}
