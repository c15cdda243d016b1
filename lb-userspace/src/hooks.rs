//! Policy hooks: what else inspects the packets the kernel sends into a local pod, and so how
//! the data path must deliver packets for that pod's backends. A frame XDP redirects into a pod's
//! host veth skips that veth's TC egress hook, where CNIs such as the AWS VPC CNI's network
//! policy agent enforce ingress NetworkPolicy, and netfilter's forward path, where iptables-mode
//! policies (Calico's) and kube-proxy's conntrack rules judge it. So per backend interface:
//! - `netfilter` when netfilter has rules on the forward path: XDP passes the rewritten packet
//!   to the kernel's forwarding (no snat: the client's address stays), the pod's replies go
//!   back through the kernel too, and `lb_uplink_out` translates them at the uplink's TC egress
//!   (see `netfilter.rs` in lb-ebpf). Conntrack sees both directions; every hook on the way in
//!   (the forward rules, then the veth's TC egress) sees each packet.
//! - `kernel` when only a TCX program or classic TC filter of another owner is on the veth's
//!   egress hook (we attach at ingress only): XDP hands the rewritten packet over to
//!   `lb_uplink_tc` at the uplink's TC ingress, which redirects it to the veth's egress, through
//!   that hook, around netfilter (see `handoff.rs`; where `lb_uplink_tc` is missing, the kernel
//!   forwards it). Cheaper than `netfilter`.
//! - `redirect` when nothing is there.
//!
//! `respect` makes every interface `netfilter` (hooks the agent cannot see, too); `ignore` every
//! one `redirect`.
//! Queried through system calls only (no `tc`/`nft`/`iptables` binaries needed), and without
//! loading kernel modules: the legacy tables are read only when already loaded.
use std::{
    collections::BTreeMap,
    fmt, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use aya::{
    programs::{
        ProgramError, SchedClassifier,
        tc::{TcAttachType, TcError},
    },
    sys::SyscallError,
};
use lb_common::{PROG_BACKEND, PROG_UPLINK, PROG_UPLINK_OUT, PROG_UPLINK_TC};
use netlink_sys::{Socket, SocketAddr};
use serde::{Deserialize, Serialize};

use crate::netlink::{Link, Netlink};

/// The node setting `policy-hooks`: how the agent decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyHooks {
    /// Per interface: `netfilter` where netfilter has forward rules, `kernel` where only a TC
    /// policy hook is found, else `redirect`.
    #[default]
    Detect,
    /// Every backend interface is `netfilter`: through every hook the kernel has (those the
    /// agent cannot see, such as a root qdisc's filters or an eBPF program attached elsewhere,
    /// too).
    Respect,
    /// Every backend interface is `redirect`, whatever is there: the operator says nothing on
    /// the way into pods enforces anything.
    Ignore,
}

impl fmt::Display for PolicyHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyHooks::Detect => "detect",
            PolicyHooks::Respect => "respect",
            PolicyHooks::Ignore => "ignore",
        })
    }
}

/// How the data path delivers packets for the local backends behind one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// XDP_REDIRECT straight into the interface.
    Redirect,
    /// Handed over to `lb_uplink_tc`, which sends them out of the interface through its TC
    /// egress hook (around netfilter).
    Kernel,
    /// Through the kernel's forwarding, both directions: netfilter's forward path and the TC
    /// egress hook see them.
    Netfilter,
}

/// A backend interface's delivery and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub via: Via,
    /// The hooks found, or the setting, or that nothing was found.
    pub reason: String,
}

impl Delivery {
    /// "redirect", "kernel" or "netfilter": the word status and metrics use.
    pub fn word(&self) -> &'static str {
        match self.via {
            Via::Redirect => "redirect",
            Via::Kernel => "kernel",
            Via::Netfilter => "netfilter",
        }
    }
}

/// What netfilter has on the forward path, node-wide, described (rules, or what we could not
/// read, which counts as rules: never bypass what may be there).
pub type Netfilter = Vec<String>;

/// Decides `link`'s delivery under `setting`, given netfilter's forward rules.
pub fn decide(
    setting: PolicyHooks,
    nl: &mut Netlink,
    link: &Link,
    netfilter: &Netfilter,
) -> Delivery {
    match setting {
        PolicyHooks::Respect => Delivery {
            via: Via::Netfilter,
            reason: "policy-hooks = \"respect\"".to_string(),
        },
        PolicyHooks::Ignore => Delivery {
            via: Via::Redirect,
            reason: "policy-hooks = \"ignore\"".to_string(),
        },
        PolicyHooks::Detect => {
            let mut found = match tc_egress(nl, link) {
                Ok(found) => found,
                // Not knowing is treated as finding something.
                Err(e) => vec![format!("cannot read its TC egress hook ({e})")],
            };
            let via = if !netfilter.is_empty() {
                Via::Netfilter
            } else if !found.is_empty() {
                Via::Kernel
            } else {
                Via::Redirect
            };
            found.extend(netfilter.iter().cloned());
            let reason = if found.is_empty() {
                "no policy hook found".to_string()
            } else {
                found.join("; ")
            };
            Delivery { via, reason }
        }
    }
}

/// Programs and filters of other owners on `link`'s TC egress hook, described.
pub fn tc_egress(nl: &mut Netlink, link: &Link) -> Result<Vec<String>, String> {
    let mut found = Vec::new();
    match SchedClassifier::query_tcx(&link.name, TcAttachType::Egress) {
        Ok((_, programs)) => {
            for p in programs {
                let name = p.name_as_str().unwrap_or("").to_string();
                if ours(&name) {
                    continue;
                }
                found.push(format!("tcx egress program {name} (id {})", p.id()));
            }
        }
        // Kernels before 6.6 have no TCX (EINVAL); an interface that just went (ENODEV).
        Err(e) if tcx_absent(&e) => {}
        Err(e) => return Err(format!("tcx query: {e}")),
    }
    let filters = nl.clsact_filters(link.ifindex).map_err(|e| e.to_string())?;
    for f in filters.iter().filter(|f| !f.ingress) {
        if f.bpf_name.as_deref().is_some_and(ours) {
            continue;
        }
        found.push(format!(
            "tc egress filter {}{} pref {}",
            f.kind,
            f.bpf_name
                .as_deref()
                .map(|n| format!(" {n}"))
                .unwrap_or_default(),
            f.priority
        ));
    }
    Ok(found)
}

/// Whether a program name is one of ours (the kernel keeps 15 bytes of it).
fn ours(name: &str) -> bool {
    !name.is_empty()
        && [PROG_BACKEND, PROG_UPLINK, PROG_UPLINK_TC, PROG_UPLINK_OUT]
            .iter()
            .any(|p| p.starts_with(name))
}

/// The query failed because there is no TCX here: a kernel before 6.6 (EINVAL), or an
/// interface that just went (ENODEV; its name no longer resolves).
fn tcx_absent(e: &ProgramError) -> bool {
    let errno = match e {
        ProgramError::SyscallError(SyscallError { io_error, .. })
        | ProgramError::TcError(TcError::IoError(io_error)) => io_error.raw_os_error(),
        _ => None,
    };
    matches!(errno, Some(libc::EINVAL | libc::ENODEV | libc::EOPNOTSUPP))
}

/// Netfilter's rules on the forward path, described (node-wide: they see what is forwarded
/// into every pod). A source we cannot read counts as rules.
pub fn netfilter_forward() -> Netfilter {
    let mut found = match nft_forward_chains() {
        Ok(found) => found,
        Err(e) => vec![format!("cannot read nftables ({e})")],
    };
    for v6 in [false, true] {
        let tool = if v6 { "ip6tables" } else { "iptables" };
        match legacy_forward_rules(v6) {
            Ok(Some(n)) if n > 0 => found.push(format!(
                "{tool} (legacy) FORWARD chain with rules ({n} bytes)"
            )),
            Ok(_) => {}
            Err(e) => found.push(format!("cannot read {tool} ({e})")),
        }
    }
    found
}

/// Makes the kernel accept packets with one of the node's own addresses as source on `uplink`
/// (`net.ipv4.conf.<uplink>.accept_local = 1`); true if it was off. A snat packet handed to
/// the kernel carries the node's snat address as source, and the kernel drops such a packet
/// arriving from outside as a martian unless this is on. (IPv6 has no such check.)
pub fn accept_local(uplink: &str) -> io::Result<bool> {
    let path = format!("/proc/sys/net/ipv4/conf/{uplink}/accept_local");
    if std::fs::read_to_string(&path)?.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(&path, "1")?;
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// nftables, through NETLINK_NETFILTER (linux/netfilter/nf_tables.h).
// ---------------------------------------------------------------------------------------------
const NETLINK_NETFILTER: isize = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_MATCH_NAME: u16 = 1;
/// NF_INET_FORWARD.
const HOOK_FORWARD: u32 = 2;
/// NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6: the families whose forward hook IP traffic passes.
const FAMILIES: [(u8, &str); 3] = [(1, "inet"), (2, "ip"), (10, "ip6")];
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Each forward base chain with rules, described as "nftables chain inet filter forward
/// (forward hook) with 3 rules" (", its table tracks connections" where it does).
fn nft_forward_chains() -> io::Result<Netfilter> {
    let socket = Socket::new(NETLINK_NETFILTER)?;
    let chains = nft_dump(&socket, NFT_MSG_GETCHAIN, 0, &[])?;
    // (family, table) -> its forward base chains.
    let mut forward: BTreeMap<(u8, String), Vec<String>> = BTreeMap::new();
    for (family, attrs) in chains {
        if !FAMILIES.iter().any(|(f, _)| *f == family) {
            continue;
        }
        let (mut table, mut name, mut hook) = (None, None, None);
        for (kind, value) in attributes(&attrs) {
            match kind {
                NFTA_CHAIN_TABLE => table = Some(c_string(value)),
                NFTA_CHAIN_NAME => name = Some(c_string(value)),
                NFTA_CHAIN_HOOK => {
                    for (k, v) in attributes(value) {
                        if k == NFTA_HOOK_HOOKNUM && v.len() >= 4 {
                            hook = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
                        }
                    }
                }
                _ => {}
            }
        }
        if let (Some(table), Some(name), Some(HOOK_FORWARD)) = (table, name, hook) {
            forward.entry((family, table)).or_default().push(name);
        }
    }
    let mut found = Netfilter::default();
    for ((family, table), base_chains) in forward {
        let family_name = FAMILIES
            .iter()
            .find(|(f, _)| *f == family)
            .map_or("?", |(_, n)| n);
        // Every rule of the table: the forward chains jump to others (kube-proxy's FORWARD to
        // KUBE-FORWARD, where its conntrack rule is).
        let rules = nft_dump(
            &socket,
            NFT_MSG_GETRULE,
            family,
            &attribute(NFTA_RULE_TABLE, &table),
        )?;
        let mut tracks = false;
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for (_, attrs) in &rules {
            for (kind, value) in attributes(attrs) {
                match kind {
                    NFTA_RULE_CHAIN => *counts.entry(c_string(value)).or_default() += 1,
                    NFTA_RULE_EXPRESSIONS => tracks |= tracks_connections(value),
                    _ => {}
                }
            }
        }
        for chain in base_chains {
            let n = counts.get(&chain).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let what = format!(
                "nftables chain {family_name} {table} {chain} (forward hook) with {n} rule{}",
                if n == 1 { "" } else { "s" }
            );
            if tracks {
                found.push(format!("{what}, its table tracks connections"));
            } else {
                found.push(what);
            }
        }
    }
    Ok(found)
}

/// Whether a rule's expressions (NFTA_RULE_EXPRESSIONS) use conntrack: nft's `ct` expression,
/// or iptables-nft's `conntrack` / `state` match.
fn tracks_connections(expressions: &[u8]) -> bool {
    attributes(expressions).into_iter().any(|(_, element)| {
        let mut name = String::new();
        let mut data: &[u8] = &[];
        for (k, v) in attributes(element) {
            match k {
                NFTA_EXPR_NAME => name = c_string(v),
                NFTA_EXPR_DATA => data = v,
                _ => {}
            }
        }
        name == "ct"
            || (name == "match"
                && attributes(data).into_iter().any(|(k, v)| {
                    k == NFTA_MATCH_NAME && matches!(c_string(v).as_str(), "conntrack" | "state")
                }))
    })
}

/// One nftables dump: the (family, attributes) of each reply message.
fn nft_dump(socket: &Socket, msg: u16, family: u8, attrs: &[u8]) -> io::Result<Vec<(u8, Vec<u8>)>> {
    let kind = NFNL_SUBSYS_NFTABLES << 8 | msg;
    let len = 16 + 4 + attrs.len();
    let mut request = Vec::with_capacity(len);
    request.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    request.extend_from_slice(&kind.to_ne_bytes());
    // NLM_F_REQUEST | NLM_F_DUMP.
    request.extend_from_slice(&(0x1u16 | 0x300).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    // struct nfgenmsg: family, version, res_id.
    request.extend_from_slice(&[family, 0, 0, 0]);
    request.extend_from_slice(attrs);
    socket.send_to(&request, &SocketAddr::new(0, 0), 0)?;
    let reply = kind & 0xff00
        | if msg == NFT_MSG_GETCHAIN {
            NFT_MSG_NEWCHAIN
        } else {
            NFT_MSG_NEWRULE
        };
    let mut out = Vec::new();
    loop {
        let (buf, _) = socket.recv_from_full()?;
        if buf.is_empty() {
            return Err(io::Error::other("empty netlink datagram"));
        }
        let mut at = 0;
        while at + 16 <= buf.len() {
            let n = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            let t = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if n < 16 || at + n > buf.len() {
                return Err(io::Error::other("truncated netlink message"));
            }
            match t {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes(buf[at + 16..at + 20].try_into().expect("4"));
                    if code == 0 {
                        return Ok(out);
                    }
                    // No nf_tables in this kernel or namespace: no chains.
                    if -code == libc::ENOENT || -code == libc::EPROTONOSUPPORT {
                        return Ok(out);
                    }
                    return Err(io::Error::from_raw_os_error(-code));
                }
                t if t == reply && n >= 20 => {
                    out.push((buf[at + 16], buf[at + 20..at + n].to_vec()));
                }
                _ => {}
            }
            at += (n + 3) & !3;
        }
    }
}

/// A netlink attribute holding a NUL-terminated string.
fn attribute(kind: u16, value: &str) -> Vec<u8> {
    let len = 4 + value.len() + 1;
    let mut a = Vec::with_capacity((len + 3) & !3);
    a.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(value.as_bytes());
    a.resize((len + 3) & !3, 0);
    a
}

/// The (type, value) of each attribute in `buf`.
fn attributes(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= buf.len() {
        let len = usize::from(u16::from_ne_bytes([buf[at], buf[at + 1]]));
        let kind = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]) & NLA_TYPE_MASK;
        if len < 4 || at + len > buf.len() {
            break;
        }
        out.push((kind, &buf[at + 4..at + len]));
        at += (len + 3) & !3;
    }
    out
}

fn c_string(value: &[u8]) -> String {
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

// ---------------------------------------------------------------------------------------------
// iptables-legacy (linux/netfilter_ipv4/ip_tables.h): IPT_SO_GET_INFO on the filter table.
// ---------------------------------------------------------------------------------------------

/// struct ipt_getinfo (ip6t_getinfo has the same layout).
#[repr(C)]
struct GetInfo {
    name: [u8; 32],
    valid_hooks: u32,
    hook_entry: [u32; 5],
    underflow: [u32; 5],
    num_entries: u32,
    size: u32,
}

/// IPT_SO_GET_INFO / IP6T_SO_GET_INFO.
const SO_GET_INFO: libc::c_int = 64;

/// How many bytes of rule entries the legacy filter table's FORWARD chain has before its policy
/// (0: none); `None` when the legacy filter table is not loaded in this namespace.
fn legacy_forward_rules(v6: bool) -> io::Result<Option<u32>> {
    let names = if v6 {
        "/proc/net/ip6_tables_names"
    } else {
        "/proc/net/ip_tables_names"
    };
    // Read only what is there: asking for a table that is not loaded would load its module.
    match std::fs::read_to_string(names) {
        Ok(text) if text.lines().any(|l| l == "filter") => {}
        _ => return Ok(None),
    }
    let (domain, level) = if v6 {
        (libc::AF_INET6, libc::SOL_IPV6)
    } else {
        (libc::AF_INET, libc::SOL_IP)
    };
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor socket(2) just returned, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = GetInfo {
        name: [0; 32],
        valid_hooks: 0,
        hook_entry: [0; 5],
        underflow: [0; 5],
        num_entries: 0,
        size: 0,
    };
    info.name[..6].copy_from_slice(b"filter");
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<GetInfo>()).unwrap_or(0);
    // SAFETY: `info` is a GetInfo of `len` bytes, as the kernel expects for SO_GET_INFO.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            SO_GET_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // The table went between the two reads.
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(None);
        }
        return Err(e);
    }
    // The chain's rules lie between its entry and its policy (the underflow).
    let forward = HOOK_FORWARD as usize;
    if info.valid_hooks & (1 << forward) == 0 {
        return Ok(Some(0));
    }
    Ok(Some(
        info.underflow[forward].saturating_sub(info.hook_entry[forward]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_programs_are_known_by_their_kernel_names() {
        assert!(ours("lb_backend"));
        assert!(ours("lb_uplink"));
        assert!(!ours("handle_egress"));
        assert!(!ours(""));
    }

    #[test]
    fn attributes_round_trip() {
        let a = [attribute(1, "filter"), attribute(2, "forward")].concat();
        let parsed = attributes(&a);
        assert_eq!(parsed.len(), 2);
        assert_eq!((parsed[0].0, c_string(parsed[0].1)), (1, "filter".into()));
        assert_eq!((parsed[1].0, c_string(parsed[1].1)), (2, "forward".into()));
    }

    /// A nested attribute.
    fn nest(kind: u16, inner: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&u16::try_from(4 + inner.len()).unwrap().to_ne_bytes());
        a.extend_from_slice(&(kind | 0x8000).to_ne_bytes());
        a.extend_from_slice(inner);
        a.resize((a.len() + 3) & !3, 0);
        a
    }

    #[test]
    fn rules_that_use_conntrack_are_told_apart() {
        let expression = |name: &str, data: &[u8]| {
            nest(
                1,
                &[attribute(NFTA_EXPR_NAME, name), nest(NFTA_EXPR_DATA, data)].concat(),
            )
        };
        // `ip saddr 10.0.0.11 drop`: payload, cmp, immediate.
        let stateless = [
            expression("payload", &[]),
            expression("cmp", &[]),
            expression("immediate", &[]),
        ]
        .concat();
        assert!(!tracks_connections(&stateless));
        // `ct state invalid drop`.
        let ct = [expression("ct", &[]), expression("cmp", &[])].concat();
        assert!(tracks_connections(&ct));
        // iptables-nft's `-m conntrack --ctstate INVALID -j DROP`, and a match that is not.
        let matched = |m: &str| expression("match", &attribute(NFTA_MATCH_NAME, m));
        assert!(tracks_connections(&matched("conntrack")));
        assert!(tracks_connections(&matched("state")));
        assert!(!tracks_connections(&matched("comment")));
    }

    #[test]
    fn settings_decide_without_looking() {
        let mut nl = Netlink::open().expect("netlink");
        let link = Link {
            ifindex: 1,
            name: "lo".into(),
            kind: None,
            mtu: 65536,
            up: true,
            mac: None,
            vlan: None,
            peer: None,
            xdp: None,
        };
        let respect = decide(PolicyHooks::Respect, &mut nl, &link, &Netfilter::new());
        assert_eq!(respect.via, Via::Netfilter);
        assert_eq!(respect.word(), "netfilter");
        let nft: Netfilter = vec!["nft".into()];
        let ignore = decide(PolicyHooks::Ignore, &mut nl, &link, &nft);
        assert_eq!(ignore.via, Via::Redirect);
        assert_eq!(ignore.word(), "redirect");
        // Detect: forward rules make it `netfilter`, and the reason names them.
        let detect = decide(PolicyHooks::Detect, &mut nl, &link, &nft);
        assert_eq!(detect.via, Via::Netfilter);
        assert!(detect.reason.contains("nft"), "{}", detect.reason);
    }
}
