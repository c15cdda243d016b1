//! The short end-to-end run the `kernels` tier repeats on each kernel it boots (and the e2e tier
//! runs here): real TCP and UDP through the attached programs in snat and preserve-client-ip
//! mode (a local pod, so `lb_backend` translates its replies at TC), an agent restart that takes
//! over what the previous agent left attached, and a clean-up that leaves nothing behind. How
//! `lb_backend` is attached — a TCX link, or a classic clsact filter where the kernel has no
//! TCX — is checked against `XDPLB_EXPECT_TC_MODE` when the caller knows the kernel.
use std::{net::SocketAddr, time::Duration};

use lb_tests::{
    agent::{AgentOptions, AgentProcess, Bpffs},
    lab::Lab,
    netns::require_root,
    traffic::{Batch, BatchReport, LongTransfer, Proto, serve_pods},
};
use lb_userspace::{
    attach::{FILTER_HANDLE, FILTER_PRIORITY, MODE_TC_CLASSIC, MODE_TCX},
    netlink::Netlink,
};

const VIP: &str = "10.96.0.10";
const LOCAL_VIP: &str = "10.96.0.11";
const PORT: u16 = 8080;

/// `web`/`dns` (snat, the four pods) on VIP; `local`/`localdns` (preserve-client-ip, node1's
/// pods) on LOCAL_VIP.
fn config() -> String {
    let backends = |addrs: &[&str]| {
        addrs
            .iter()
            .map(|a| format!("  {{ address = \"{a}\", port = {PORT} }},"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let all = backends(&["10.1.1.2", "10.1.1.3", "10.1.2.2", "10.1.2.3"]);
    let local = backends(&["10.1.1.2", "10.1.1.3"]);
    let service = |name: &str, vip: &str, port: u16, proto: &str, mode: &str, b: &str| {
        format!(
            "[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"{proto}\"\nmode = \"{mode}\"\nbackends = [\n{b}\n]\n\n"
        )
    };
    [
        "[node]\nhash-seed = 42\n\n".to_string(),
        service("web", VIP, 80, "tcp", "snat", &all),
        service("dns", VIP, 53, "udp", "snat", &all),
        service("local", LOCAL_VIP, 80, "tcp", "preserve-client-ip", &local),
        service(
            "localdns",
            LOCAL_VIP,
            53,
            "udp",
            "preserve-client-ip",
            &local,
        ),
    ]
    .concat()
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// A small batch, generous timeouts (this runs under emulation too); every exchange must succeed.
fn batch(lab: &Lab, agent: &AgentProcess, proto: Proto, dst: SocketAddr) -> BatchReport {
    let count = 24;
    let report = Batch::new(proto, dst, lab.client().sources_for(dst.ip()), count)
        .concurrency(4)
        .request_timeout(Duration::from_secs(5))
        .deadline(Duration::from_secs(90))
        .run(&lab.client().ns)
        .expect("batch");
    assert!(
        report.all_ok() && report.ok == count,
        "{proto:?} to {dst}: {} of {count} failed, e.g. {:?}\nagent log:\n{}",
        report.error_count,
        report.errors,
        agent.log_tail()
    );
    report
}

/// Both modes, both protocols: snat backends see the node, preserving ones the client.
fn traffic_in_both_modes(lab: &Lab, agent: &AgentProcess) {
    for proto in [Proto::Tcp, Proto::Udp] {
        let port = if proto == Proto::Tcp { 80 } else { 53 };
        let snat = batch(lab, agent, proto, addr(VIP, port));
        assert_eq!(
            snat.peer_mismatches, snat.ok,
            "{proto:?} snat: backends see the node"
        );
        let preserved = batch(lab, agent, proto, addr(LOCAL_VIP, port));
        assert_eq!(
            preserved.peer_mismatches, 0,
            "{proto:?} preserve-client-ip: backends see the client"
        );
        assert!(
            preserved
                .backends()
                .iter()
                .all(|b| b == "pod1" || b == "pod2"),
            "{:?}",
            preserved.per_backend
        );
    }
}

/// (interface, program, mode, note) from `lb-agent status`.
fn interfaces(agent: &AgentProcess) -> Vec<(String, String, String, String)> {
    let status = agent.status().expect("status");
    status["interfaces"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|i| {
            let s = |k: &str| i[k].as_str().unwrap_or_default().to_string();
            (s("name"), s("program"), s("hook"), s("note"))
        })
        .collect()
}

/// The hook every lb_backend interface is attached to, "tcx" or "tc-classic" (they must agree).
fn backend_mode(agent: &AgentProcess) -> String {
    let modes: Vec<String> = interfaces(agent)
        .into_iter()
        .filter(|i| i.1 == lb_common::PROG_BACKEND)
        .map(|i| i.2)
        .collect();
    assert_eq!(
        modes.len(),
        2,
        "lb_backend on vethpod1 and vethpod2: {modes:?}"
    );
    assert!(modes.iter().all(|m| *m == modes[0]), "{modes:?}");
    modes[0].clone()
}

/// Our classic filters on pod `pod`'s host veth, and whether that veth has a clsact qdisc.
fn classic_state(lab: &Lab, pod: &str) -> (usize, bool) {
    let pod = lab.pod(pod).expect("pod");
    let (ns, iface, ifindex) = (&lab.node1().ns, &pod.host_veth, pod.host_veth_ifindex);
    let filters = ns
        .run(move || Netlink::open().and_then(|mut nl| nl.clsact_filters(ifindex)))
        .expect("netns")
        .expect("filter dump");
    let ours = filters
        .iter()
        .filter(|f| f.ingress && f.priority == FILTER_PRIORITY && f.handle == FILTER_HANDLE)
        .count();
    let qdiscs = ns
        .command("tc")
        .args(["qdisc", "show", "dev", iface])
        .output()
        .expect("tc qdisc show");
    let text = String::from_utf8_lossy(&qdiscs.stdout);
    (ours, text.contains("clsact"))
}

/// Another tool takes our programs off (`tc filter del`, or the pinned TCX link detached by id as
/// `bpftool link detach` does; the uplink's XDP link likewise): the agent, which gets no
/// notification of it, puts them back within its periodic look (2 s) and says so in status.
fn programs_taken_off_from_outside_are_put_back(lab: &Lab, agent: &AgentProcess, classic: bool) {
    let node = &lab.node1().ns;
    let links = lb_userspace::dataplane::layout_dir(agent.pin_dir()).join("links");
    if classic {
        let out = node
            .command("tc")
            .args(["filter", "del", "dev", "vethpod1", "ingress", "pref"])
            .arg(FILTER_PRIORITY.to_string())
            .args(["handle", &FILTER_HANDLE.to_string(), "bpf"])
            .output()
            .expect("tc filter del");
        assert!(out.status.success(), "{out:?}");
    } else {
        detach_link(&links.join("vethpod1"));
    }
    detach_link(&links.join("eth0"));
    // No look here at whether they are off: the agent's periodic look may already have put them
    // back (a slow guest). The removals succeeded, and the agent's log below must say it saw them.
    let xdp_on = || {
        node.ip(&["-d", "link", "show", "dev", "eth0"])
            .expect("ip link")
            .contains("prog/xdp")
    };

    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    let restored = |name: &str, now: &[(String, String, String, String)]| {
        now.iter()
            .any(|i| i.0 == name && i.3.starts_with("attached again"))
    };
    loop {
        let now = interfaces(agent);
        if restored("vethpod1", &now) && restored("eth0", &now) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not put back within 6 s: {now:?}\n{}",
            agent.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(xdp_on(), "lb_uplink is on the uplink again");
    if classic {
        assert_eq!(classic_state(lab, "pod1").0, 1, "our filter is back");
    }
    let log = std::fs::read_to_string(agent.state_dir().join("agent.log")).unwrap_or_default();
    assert!(
        log.contains("vethpod1: lb_backend is no longer attached")
            && log.contains("eth0: lb_uplink is no longer attached"),
        "the log says what was taken off:\n{log}"
    );
}

/// Detaches the BPF link pinned at `pin` from its hook as `bpftool link detach` does
/// (BPF_LINK_DETACH): the link object stays, pinned, with nothing attached.
fn detach_link(pin: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).expect("path");
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `get` is a valid bpf_attr prefix for BPF_OBJ_GET and `path` outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const get,
            std::mem::size_of::<ObjGet>(),
        )
    };
    assert!(
        fd >= 0,
        "{}: {}",
        pin.display(),
        std::io::Error::last_os_error()
    );
    let detach = LinkDetach {
        link_fd: u32::try_from(fd).expect("fd"),
    };
    // SAFETY: `detach` is a valid bpf_attr prefix for BPF_LINK_DETACH.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &raw const detach,
            std::mem::size_of::<LinkDetach>(),
        )
    };
    let error = std::io::Error::last_os_error();
    // SAFETY: `fd` is the descriptor BPF_OBJ_GET returned, closed once.
    unsafe { libc::close(i32::try_from(fd).expect("fd")) };
    assert_eq!(rc, 0, "detaching {}: {error}", pin.display());
}

/// Start (keeping the data path on exit), traffic, a restart that takes over every attachment
/// while a preserved connection keeps going, traffic, and `end` (with the agent still running
/// in its second life): `Cleanup` stops it keeping everything and runs `lb-agent cleanup`;
/// `Exit` stops it without --keep-on-exit. Either way nothing may be left.
#[derive(Clone, Copy)]
enum End {
    Cleanup,
    Exit,
}

fn run(name: &str, tc_mode: Option<&str>, end: End) {
    let bpffs = Bpffs::mount(name).expect("bpffs");
    let lab = Lab::build(name).expect("lab");
    let _servers = serve_pods(lab.pods(), PORT).expect("servers");
    let mut options = AgentOptions::default();
    options.extra.push("--keep-on-exit".into());
    if let Some(m) = tc_mode {
        options
            .extra
            .extend(["--tc-mode".to_string(), m.to_string()]);
    }
    let mut agent =
        AgentProcess::start(&lab.node1().ns, &bpffs, &config(), options).expect("agent");

    let mode = backend_mode(&agent);
    let expected = match tc_mode {
        Some("classic") => Some(MODE_TC_CLASSIC.to_string()),
        Some(_) => Some(MODE_TCX.to_string()),
        None => std::env::var("XDPLB_EXPECT_TC_MODE").ok(),
    };
    if let Some(expected) = expected {
        assert_eq!(
            mode, expected,
            "lb_backend's attachment mode on this kernel"
        );
    }
    assert!(
        mode == MODE_TCX || mode == MODE_TC_CLASSIC,
        "unknown mode {mode}"
    );
    let node = &lab.node1().ns;
    let classic = mode == MODE_TC_CLASSIC;
    for pod in ["pod1", "pod2"] {
        let (filters, _) = classic_state(&lab, pod);
        assert_eq!(filters, usize::from(classic), "{pod}: our classic filters");
    }
    let log = std::fs::read_to_string(agent.state_dir().join("agent.log")).unwrap_or_default();
    assert!(
        log.contains("lb_backend on vethpod1 (ifindex ") && log.contains(&format!(": {mode} mode")),
        "the start-up log names the attachment mode:\n{log}"
    );

    traffic_in_both_modes(&lab, &agent);
    programs_taken_off_from_outside_are_put_back(&lab, &agent, classic);
    traffic_in_both_modes(&lab, &agent);

    // A preserved connection (lb_backend translates its replies) across the restart.
    let transfer =
        LongTransfer::start(&lab.client().ns, None, addr(LOCAL_VIP, 80)).expect("transfer");
    std::thread::sleep(Duration::from_millis(300));
    if matches!(end, End::Exit) {
        agent.options_mut().extra.retain(|a| a != "--keep-on-exit");
    }
    agent.restart().expect("restart");
    let after = interfaces(&agent);
    assert!(
        after.len() == 3
            && after
                .iter()
                .all(|i| i.3.starts_with("took over the previous agent's")),
        "the new agent took over every attachment: {after:?}\n{}",
        agent.log_tail()
    );
    assert_eq!(backend_mode(&agent), mode, "same mode after the restart");
    for pod in ["pod1", "pod2"] {
        let (filters, _) = classic_state(&lab, pod);
        assert_eq!(
            filters,
            usize::from(classic),
            "{pod}: replaced in place, not added"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let report = transfer.finish();
    assert!(
        report.is_clean() && report.bytes_sent > 0,
        "the preserved connection survived the restart: {report:?}\n{}",
        agent.log_tail()
    );
    traffic_in_both_modes(&lab, &agent);

    match end {
        End::Cleanup => {
            agent.stop().expect("stop");
            agent.cleanup().expect("cleanup");
        }
        End::Exit => agent.stop().expect("stop"),
    }
    for pod in ["pod1", "pod2"] {
        assert_eq!(
            classic_state(&lab, pod),
            (0, false),
            "{pod}: no filter of ours, and the clsact qdisc the agent added is gone"
        );
    }
    let uplink = node
        .ip(&["-d", "link", "show", "dev", "eth0"])
        .expect("ip link");
    assert!(!uplink.contains("prog/xdp"), "XDP detached: {uplink}");
    let left: Vec<_> = std::fs::read_dir(agent.pin_dir())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pins left: {left:?}");
}

/// The kernel's own choice (TCX on 6.6+, classic below), through `lb-agent cleanup`.
#[test]
fn tcp_and_udp_in_both_modes_through_a_restart_with_takeover() {
    if !require_root() {
        return;
    }
    run("smoke-auto", None, End::Cleanup);
}

/// Classic filters on any kernel (--tc-mode classic): taken over in place, removed on exit.
#[test]
fn classic_tc_filters_are_replaced_in_place_and_removed_on_exit() {
    if !require_root() {
        return;
    }
    run("smoke-classic", Some("classic"), End::Exit);
}

/// A node whose uplink does not exist: the agent refuses to start and leaves nothing pinned
/// (it looks at the interfaces before it creates a map), and says which interface is missing.
#[test]
fn a_missing_uplink_stops_the_start_before_anything_is_pinned() {
    if !require_root() {
        return;
    }
    let bpffs = Bpffs::mount("smoke-nouplink").expect("bpffs");
    let ns = lb_tests::netns::Netns::create_unique("smoke-nouplink").expect("netns");
    let options = AgentOptions {
        uplink: "ens5".into(),
        ..AgentOptions::default()
    };
    let e = match AgentProcess::start(&ns, &bpffs, &config(), options) {
        Ok(_) => panic!("started without its uplink"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("uplink interface ens5 does not exist"), "{e}");
    let pins = bpffs.path().join(ns.name());
    let left: Vec<_> = std::fs::read_dir(&pins)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left pinned: {left:?}");
}
