//! Attaching the data path to interfaces: `lb_uplink` at XDP on uplinks, `lb_backend` at TC
//! ingress on backend-facing interfaces. Every XDP attachment is a BPF link pinned under the pin
//! directory (`links/<interface>`), so the programs stay attached when the agent exits with
//! --keep-on-exit, and the next agent swaps its own programs in with one bpf_link_update: no
//! packet sees the interface without a program.
//!
//! `lb_backend` goes on as a TCX link (pinned the same way) where the kernel has TCX (Linux
//! 6.6+), and as a classic direct-action `cls_bpf` filter on the clsact qdisc's ingress where it
//! does not. A filter has no BPF object to pin: it sits at fixed coordinates
//! ([`FILTER_PRIORITY`], [`FILTER_HANDLE`]), the next agent replaces its program there in place
//! (one netlink change, which the kernel swaps under RCU: no gap), and `links/<interface>` is a
//! directory that records it (and whether the agent added the clsact qdisc, which cleanup then
//! removes).
use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        Link, LinkOrder, TcAttachType, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
        xdp::XdpLink,
    },
};

use crate::{dataplane, netlink::Netlink};

/// Priority of our classic TC filter on a clsact ingress: late (filters with lower numbers run
/// first), like a TCX link appended last, so what other agents do to a pod's packets (a
/// network policy agent's verdicts) happens before our reply translation. The same on every
/// node and in every version, so an agent finds a filter a previous one left even without its
/// record.
pub const FILTER_PRIORITY: u16 = 0xff00;
/// Handle of that filter (unique within its priority).
pub const FILTER_HANDLE: u32 = 1;
/// The attachment modes of `lb_backend`, as status and metrics show them.
pub const MODE_TCX: &str = "tcx";
pub const MODE_TC_CLASSIC: &str = "tc-classic";
/// Where `lb_uplink_tc`'s links (or classic filters' records) pin, under the layout directory:
/// the uplinks' `links/<interface>` hold `lb_uplink`'s XDP links.
pub const UPLINK_TC_LINKS: &str = "uplink-tc";
/// Where `lb_uplink_out`'s links (or classic filters' records) pin, under the layout directory.
pub const UPLINK_OUT_LINKS: &str = "uplink-out";
/// In a classic filter's record directory: the agent added the clsact qdisc (cleanup removes it
/// when no other filter is left on it).
const RECORD_ADDED_CLSACT: &str = "added-clsact";

/// How to attach: the driver's own XDP hook, the generic one, or the first that works.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeChoice {
    Native,
    Generic,
    Auto,
}

/// How to attach `lb_backend`: a TCX link, a classic clsact filter, or TCX where the kernel has
/// it (probed) and classic where it does not. Switching a running node between the two is not
/// gapless (the old kind comes off before the new one goes on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TcChoice {
    Auto,
    Tcx,
    Classic,
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
    /// Where the program runs. XDP: "native", "generic", "offload", or "as before" (a previous
    /// agent's link was taken over and the kernel did not say). TC: "tcx" or "tc-classic".
    pub mode: &'static str,
    /// Why the mode is what it is (e.g. native failed, and how).
    pub note: Option<String>,
    hold: Hold,
}

/// What keeps a program on an interface.
#[derive(Debug)]
enum Hold {
    /// A BPF link pinned at `links/<iface>` (XDP, TCX).
    Link(PinnedLink),
    /// A classic TC filter at our coordinates, recorded by the directory `links/<iface>`.
    Filter,
}

pub struct Attachments {
    dir: PathBuf,
    by_iface: BTreeMap<String, Attached>,
    /// Whether the kernel has TCX links (probed once, on the first TC attach).
    tcx: Option<bool>,
    /// Interfaces whose program someone else took off, until it is attached again.
    restored: BTreeSet<String>,
    /// The TC hook the programs go on: ingress, but egress for `lb_uplink_out`.
    direction: TcAttachType,
}

impl Attachments {
    /// Links pin under `<layout dir>/links`.
    pub fn new(layout_dir: &Path) -> std::io::Result<Attachments> {
        Attachments::new_in(layout_dir, "links")
    }

    /// Links pin under `<layout dir>/<subdir>`: for a second program on the same interfaces
    /// (`lb_uplink_tc` on the uplinks, in [`UPLINK_TC_LINKS`]).
    pub fn new_in(layout_dir: &Path, subdir: &str) -> std::io::Result<Attachments> {
        let dir = layout_dir.join(subdir);
        std::fs::create_dir_all(&dir)?;
        Ok(Attachments {
            dir,
            by_iface: BTreeMap::new(),
            tcx: None,
            restored: BTreeSet::new(),
            direction: TcAttachType::Ingress,
        })
    }

    /// As [`Attachments::new_in`], for TC programs at egress (`lb_uplink_out` on the uplinks,
    /// in [`UPLINK_OUT_LINKS`]).
    pub fn new_egress(layout_dir: &Path, subdir: &str) -> std::io::Result<Attachments> {
        let mut a = Attachments::new_in(layout_dir, subdir)?;
        a.direction = TcAttachType::Egress;
        Ok(a)
    }

    pub fn get(&self, iface: &str) -> Option<&Attached> {
        self.by_iface.get(iface)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Attached> {
        self.by_iface.values()
    }

    /// Records `a` as attached (its note says so if it replaces one someone else took off).
    fn keep(&mut self, mut a: Attached) -> &Attached {
        if self.restored.remove(&a.iface) {
            let again = "attached again: someone else had taken it off";
            a.note = Some(match a.note {
                Some(n) => format!("{again}; {n}"),
                None => again.to_string(),
            });
        }
        let iface = a.iface.clone();
        self.by_iface.entry(iface).insert_entry(a).into_mut()
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

    /// Puts the TC program `program` on `iface`'s ingress: takes over what a previous agent left
    /// there (its pinned TCX link, or its classic filter), or attaches anew, as a TCX link where
    /// the kernel has them and as a classic filter where it does not.
    pub fn attach_tc(
        &mut self,
        ebpf: &mut Ebpf,
        program: &'static str,
        iface: &str,
        choice: TcChoice,
    ) -> Result<&Attached, AttachError> {
        let ifindex = crate::system::ifindex(iface)
            .ok_or_else(|| AttachError::NoInterface(iface.to_string()))?;
        if self.holds(iface, program, ifindex) {
            return Ok(&self.by_iface[iface]);
        }
        self.by_iface.remove(iface);
        let path = self.dir.join(iface);
        let prog = dataplane::classifier_mut(ebpf, program)?;
        let tcx = match (choice, self.tcx) {
            (TcChoice::Tcx, _) => true,
            (TcChoice::Classic, _) => false,
            (TcChoice::Auto, Some(known)) => known,
            (TcChoice::Auto, None) => {
                let fd = prog
                    .fd()
                    .map_err(|e| attach_error(program, iface, "tc", e))?;
                let known = kernel_has_tcx(fd.as_fd())
                    .map_err(|e| attach_error(program, iface, "tc", e))?;
                self.tcx = Some(known);
                known
            }
        };
        let err = |mode: &'static str| move |e: String| attach_error(program, iface, mode, e);

        if !tcx {
            if path.is_file() {
                // A pinned link of another kind (the interface changed role): let it go.
                drop(previous_link(&path));
            }
            let (added_clsact, note) = attach_filter(
                prog,
                program,
                iface,
                ifindex,
                read_record(&path),
                self.direction,
            )
            .map_err(err(MODE_TC_CLASSIC))?;
            write_record(&path, added_clsact).map_err(|e| AttachError::Pin {
                iface: iface.to_string(),
                path: path.clone(),
                reason: format!("recording the classic TC filter: {e}"),
            })?;
            return Ok(self.keep(Attached {
                iface: iface.to_string(),
                ifindex,
                program,
                mode: MODE_TC_CLASSIC,
                note,
                hold: Hold::Filter,
            }));
        }
        // A classic filter of ours on a kernel with TCX (only if bpffs outlived a kernel
        // change): the TCX link goes on first, then the filter comes off, so the interface is
        // never without the program.
        let stale_filter = path.is_dir().then(|| {
            let moved = path.with_extension("tc-classic");
            let _ = std::fs::rename(&path, &moved);
            moved
        });
        let taken_over = previous_link(&path)
            .and_then(|fd| SchedClassifierLink::try_from(fd).ok())
            .and_then(|link| prog.attach_to_link(link).ok());
        let (id, note) = match taken_over {
            Some(id) => (id, Some("took over the previous agent's link".to_string())),
            None => (
                prog.attach_with_options(
                    iface,
                    self.direction,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| err(MODE_TCX)(format!("{e} (TCX links need Linux 6.6+)")))?,
                None,
            ),
        };
        let link = prog
            .take_link(id)
            .map_err(|e| err(MODE_TCX)(e.to_string()))?;
        let fd = FdLink::try_from(link).map_err(|e| err(MODE_TCX)(e.to_string()))?;
        let link = fd.pin(&path).map_err(|e| AttachError::Pin {
            iface: iface.to_string(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if let Some(record) = stale_filter {
            remove_filter(iface, &record, self.direction);
        }
        Ok(self.keep(Attached {
            iface: iface.to_string(),
            ifindex,
            program,
            mode: MODE_TCX,
            note,
            hold: Hold::Link(link),
        }))
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
        if path.is_dir() {
            // A classic TC filter of ours (the interface was a backend interface).
            remove_filter(iface, &path, self.direction);
        }
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
        Ok(self.keep(Attached {
            iface: iface.to_string(),
            ifindex,
            program,
            mode: used,
            note,
            hold: Hold::Link(link),
        }))
    }

    /// Takes the program off `iface` (if the interface is gone, just forgets it).
    pub fn detach(&mut self, iface: &str) {
        let path = self.dir.join(iface);
        match self.by_iface.remove(iface).map(|a| a.hold) {
            // Unpinning leaves the link to the fd, which closes here: detached.
            Some(Hold::Link(link)) => drop(link.unpin()),
            Some(Hold::Filter) => remove_filter(iface, &path, self.direction),
            None if path.is_dir() => remove_filter(iface, &path, self.direction),
            None => {}
        }
        let _ = std::fs::remove_file(&path);
    }

    /// The interfaces whose program someone else took off (`tc filter del`, `tc qdisc del ...
    /// clsact`, a TCX or XDP link detached by id), forgotten so the next attach puts it back.
    /// `xdp_on`: the interfaces that have an XDP program now (netlink). A hook the kernel does
    /// not answer about counts as still holding ours: the interface may be going away, which
    /// the interface sync handles.
    pub fn take_lost(&mut self, nl: &mut Netlink, xdp_on: &BTreeSet<u32>) -> Vec<String> {
        let mut lost = Vec::new();
        let ifaces: Vec<String> = self.by_iface.keys().cloned().collect();
        for iface in ifaces {
            let a = &self.by_iface[&iface];
            let present = match a.mode {
                MODE_TCX => tc::SchedClassifier::query_tcx(&iface, self.direction).map_or(
                    true,
                    |(_, progs)| {
                        progs.iter().any(|p| {
                            p.name_as_str()
                                .is_some_and(|n| !n.is_empty() && a.program.starts_with(n))
                        })
                    },
                ),
                MODE_TC_CLASSIC => nl.clsact_filters(a.ifindex).map_or(true, |filters| {
                    filters.iter().any(|f| {
                        f.ingress == (self.direction == TcAttachType::Ingress)
                            && f.priority == FILTER_PRIORITY
                            && f.handle == FILTER_HANDLE
                            && f.bpf_name.as_deref() == Some(a.program)
                    })
                }),
                _ => xdp_on.contains(&a.ifindex),
            };
            if !present {
                lost.push(iface.clone());
                log::warn!(
                    "{iface}: {} is no longer attached ({} mode): someone else took it off; attaching it again",
                    a.program,
                    a.mode
                );
                // A link detached from outside stays pinned: let it go, so a new one pins there.
                if let Some(Hold::Link(link)) = self.by_iface.remove(&iface).map(|a| a.hold) {
                    drop(link.unpin());
                }
                self.restored.insert(iface);
            }
        }
        lost
    }

    /// Detaches everything, including what a previous agent left on interfaces we no longer
    /// manage.
    pub fn detach_all(&mut self) {
        let ifaces: Vec<String> = self.by_iface.keys().cloned().collect();
        for iface in ifaces {
            self.detach(&iface);
        }
        for stale in self.pinned_interfaces() {
            let path = self.dir.join(&stale);
            if path.is_dir() {
                remove_filter(&stale, &path, self.direction);
            } else if let Ok(p) = PinnedLink::from_pin(&path) {
                drop(p.unpin());
            }
            let _ = std::fs::remove_file(path);
        }
    }

    /// Leaves every link and filter attached and pinned or recorded (for the next agent to take
    /// over).
    pub fn keep_all(self) {
        // Dropping a pinned link's handle does not detach it; a filter needs no handle.
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

fn attach_error(
    program: &'static str,
    iface: &str,
    mode: &'static str,
    reason: impl std::fmt::Display,
) -> AttachError {
    AttachError::Attach {
        program,
        iface: iface.to_string(),
        mode,
        reason: reason.to_string(),
    }
}

/// Whether the kernel has TCX links (Linux 6.6, commit e420bed02507 "bpf: Add fd-based tcx
/// multi-prog infra with link support"). Probed, not read from the version (distributions
/// backport): BPF_LINK_CREATE with attach type BPF_TCX_INGRESS on interface index 0. A kernel
/// with TCX looks the interface up and answers ENODEV; one without does not know the attach
/// type and answers EINVAL. Nothing is attached either way. `prog` must be a loaded
/// BPF_PROG_TYPE_SCHED_CLS program.
pub fn kernel_has_tcx(prog: BorrowedFd<'_>) -> Result<bool, String> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_TCX_INGRESS: u32 = 46;
    // union bpf_attr's link_create: prog_fd, target_ifindex, attach_type, flags, then unions
    // this probe leaves zeroed.
    let mut attr = [0u32; 12];
    attr[0] = prog.as_raw_fd().cast_unsigned();
    attr[1] = 0;
    attr[2] = BPF_TCX_INGRESS;
    // SAFETY: a valid, zeroed-beyond-the-fields bpf_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc >= 0 {
        // Cannot happen (there is no interface 0); close what we were given.
        if let Ok(fd) = i32::try_from(rc) {
            // SAFETY: a file descriptor the kernel just returned to us.
            unsafe { libc::close(fd) };
        }
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENODEV) => Ok(true),
        Some(libc::EINVAL) => Ok(false),
        _ => Err(format!("probing for TCX links (BPF_LINK_CREATE): {e}")),
    }
}

/// Attaches `prog` as a direct-action cls_bpf filter on `iface`'s clsact ingress at our
/// coordinates, adding the clsact qdisc if the interface has none. A filter of ours already
/// there (a previous agent's) gets the new program in place, atomically. Returns whether the
/// clsact qdisc is ours (added now, or by the agent whose filter this was) and a note for the
/// log and status.
///
/// lb_backend returns TCX_NEXT (-1) for packets it leaves alone: for a direct-action filter
/// that is TC_ACT_UNSPEC, which makes cls_bpf go on to the next filter and, after the last,
/// the packet continue up the stack as if no filter were there (net/sched/cls_bpf.c,
/// cls_bpf_classify: `if (ret == TC_ACT_UNSPEC) continue;`).
fn attach_filter(
    prog: &mut tc::SchedClassifier,
    program: &str,
    iface: &str,
    ifindex: u32,
    previous: Record,
    direction: TcAttachType,
) -> Result<(bool, Option<String>), String> {
    let ingress = direction == TcAttachType::Ingress;
    let added_clsact = match tc::qdisc_add_clsact(iface) {
        Ok(()) => true,
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
            previous.added_clsact
        }
        Err(e) => return Err(format!("adding the clsact qdisc: {e}")),
    };
    let mut netlink = Netlink::open().map_err(|e| e.to_string())?;
    let ours = netlink
        .clsact_filters(ifindex)
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|f| {
            f.ingress == ingress && f.priority == FILTER_PRIORITY && f.handle == FILTER_HANDLE
        });
    let coordinates = format!(
        "{} pref {FILTER_PRIORITY} handle {FILTER_HANDLE:#x}",
        if ingress { "ingress" } else { "egress" }
    );
    let note = match ours {
        // cls_bpf reports the name the loader gave with the filter (aya: the program's).
        Some(f) if f.kind == "bpf" && f.bpf_name.as_deref() == Some(program) => {
            let link = SchedClassifierLink::attached(
                iface,
                direction,
                FILTER_PRIORITY,
                TcHandle::from(FILTER_HANDLE),
                None,
            )
            .map_err(|e| e.to_string())?;
            let id = prog.attach_to_link(link).map_err(|e| {
                format!("replacing the program of the filter at {coordinates}: {e}")
            })?;
            forget_link(prog, id)?;
            Some(if previous.present {
                "took over the previous agent's filter".to_string()
            } else {
                "took over a filter of a previous agent (its record was gone)".to_string()
            })
        }
        Some(f) => {
            return Err(format!(
                "the filter at {coordinates} is not ours ({} {}); remove it (tc filter del dev {iface} {coordinates})",
                f.kind,
                f.bpf_name.unwrap_or_default()
            ));
        }
        None => {
            let id = prog
                .attach_with_options(
                    iface,
                    direction,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: FILTER_PRIORITY,
                        handle: TcHandle::from(FILTER_HANDLE),
                        classid: None,
                    }),
                )
                .map_err(|e| format!("adding a filter at {coordinates}: {e}"))?;
            forget_link(prog, id)?;
            Some("a classic TC filter: this kernel has no TCX links (Linux 6.6+)".to_string())
        }
    };
    Ok((added_clsact, note))
}

/// Leaves the filter `id` attached whatever happens to this process: aya detaches a
/// netlink-attached program when its link handle is dropped, but ours must outlive the agent
/// (--keep-on-exit, and an agent that dies) as pinned links do.
fn forget_link(
    prog: &mut tc::SchedClassifier,
    id: tc::SchedClassifierLinkId,
) -> Result<(), String> {
    let link = prog.take_link(id).map_err(|e| e.to_string())?;
    std::mem::forget(link);
    Ok(())
}

/// Takes our classic filter off `iface`, removes the clsact qdisc if the record says we added
/// it and no other filter is left on it, and removes the record. An interface that is gone took
/// both with it.
fn remove_filter(iface: &str, record_dir: &Path, direction: TcAttachType) {
    let record = read_record(record_dir);
    if let Some(ifindex) = crate::system::ifindex(iface) {
        if let Ok(link) = SchedClassifierLink::attached(
            iface,
            direction,
            FILTER_PRIORITY,
            TcHandle::from(FILTER_HANDLE),
            None,
        ) && let Err(e) = link.detach()
        {
            log::debug!("{iface}: removing our TC filter: {e}");
        }
        if record.added_clsact {
            match Netlink::open().and_then(|mut nl| {
                let others = nl.clsact_filters(ifindex)?;
                if others.is_empty() {
                    nl.delete_clsact(ifindex)?;
                }
                Ok(others.len())
            }) {
                Ok(0) => {}
                Ok(n) => log::info!(
                    "{iface}: left the clsact qdisc we added in place: {n} other filters use it"
                ),
                Err(e) => log::warn!("{iface}: removing the clsact qdisc we added: {e}"),
            }
        }
    }
    let _ = std::fs::remove_dir_all(record_dir);
}

/// What the directory `links/<iface>` says about a classic filter of ours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Record {
    present: bool,
    added_clsact: bool,
}

/// bpffs holds BPF objects and directories only (no regular files), so the record is a
/// directory with an empty subdirectory per fact.
fn read_record(dir: &Path) -> Record {
    Record {
        present: dir.is_dir(),
        added_clsact: dir.join(RECORD_ADDED_CLSACT).is_dir(),
    }
}

fn write_record(dir: &Path, added_clsact: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let fact = dir.join(RECORD_ADDED_CLSACT);
    if added_clsact {
        std::fs::create_dir_all(fact)
    } else {
        match std::fs::remove_dir(fact) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Record, read_record, write_record};

    #[test]
    fn a_filter_record_says_whether_the_agent_added_the_qdisc() {
        let dir = std::env::temp_dir().join(format!("xdplb-record-{}", std::process::id()));
        let record = dir.join("vethpod1");
        assert_eq!(read_record(&record), Record::default());
        write_record(&record, true).unwrap();
        assert_eq!(
            read_record(&record),
            Record {
                present: true,
                added_clsact: true
            }
        );
        // A takeover that found the qdisc there and no record of adding it: not ours.
        write_record(&record, false).unwrap();
        assert_eq!(
            read_record(&record),
            Record {
                present: true,
                added_clsact: false
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
