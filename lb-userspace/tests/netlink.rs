//! Kernel-tier tests of the rtnetlink client. Each test runs on a thread of its own that moves
//! into a fresh network namespace, builds a small topology there with `ip`, and checks what
//! `Netlink` reports against what it built. Needs root; the namespaces vanish with the threads.

// Until lib.rs exports the module, the tests compile it in directly.

use std::{
    collections::HashSet,
    fmt::Write as _,
    io::Write,
    net::IpAddr,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use lb_userspace::{
    model::{Backend, Desired, Frontend, Mode, Protocol, Service},
    neighbours::Neighbours,
    netlink::{Change, IfAddr, Monitor, Netlink, Route, RouteKind},
};
use serde_json::Value;

/// Managed entries on a veth resolve in milliseconds; this is the patience for a slow CI box.
const RESOLVE_WITHIN: Duration = Duration::from_secs(2);

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "needs root");
    println!("skipped: needs root");
    false
}

/// Runs `test` on a new thread that first unshares its network namespace, so `ip` commands it
/// spawns and sockets it opens see only what the test builds.
fn in_netns(test: impl FnOnce() + Send + 'static) {
    if !privileged() {
        return;
    }
    let handle = thread::spawn(move || {
        unshare_netns();
        ip(&["link", "set", "lo", "up"]);
        test();
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

fn unshare_netns() {
    // SAFETY: affects only the calling thread's namespace membership.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
}

/// A second namespace standing in for a pod or a neighbour host, held by a parked thread:
/// it exists while this guard does.
struct PeerNs {
    path: String,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PeerNs {
    fn new() -> PeerNs {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = thread::spawn(move || {
            unshare_netns();
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            ready_tx.send(tid).unwrap();
            // Returns once the guard drops its sender.
            let _ = stop_rx.recv();
        });
        let tid = ready_rx.recv().unwrap();
        PeerNs {
            path: format!("/proc/{}/task/{tid}/ns/net", std::process::id()),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let netns = format!("--net={}", self.path);
        let mut all = vec![netns.as_str(), program];
        all.extend_from_slice(args);
        run("nsenter", &all)
    }
}

impl Drop for PeerNs {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn ip(args: &[&str]) -> String {
    run("ip", args)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

fn ifindex(name: &str) -> u32 {
    let links = json(&ip(&["-j", "link", "show", "dev", name]));
    u32::try_from(links[0]["ifindex"].as_u64().unwrap()).unwrap()
}

fn addr(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// a0 (10.1.0.1/24, fd00:1::1/64) <-> a1, both here; b0 <-> b1 with no addresses, used for
/// /32 and /128 host routes the way the AWS VPC CNI routes to pods.
fn routed_topology() {
    ip(&["link", "add", "a0", "type", "veth", "peer", "name", "a1"]);
    ip(&["link", "add", "b0", "type", "veth", "peer", "name", "b1"]);
    for dev in ["a0", "a1", "b0", "b1"] {
        ip(&["link", "set", dev, "up"]);
    }
    ip(&["addr", "add", "10.1.0.1/24", "dev", "a0"]);
    ip(&["-6", "addr", "add", "fd00:1::1/64", "dev", "a0", "nodad"]);
    // Even without DAD, an IPv6 address stays tentative (no local route yet) until the kernel's
    // link watch has seen the carrier, which a loaded machine may take a second or more to do.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ip(&["-6", "addr", "show", "dev", "a0", "tentative"])
        .trim()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "fd00:1::1 still tentative after 10 s"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn route_get_ipv4_reports_gateway_host_route_and_local() {
    in_netns(|| {
        routed_topology();
        ip(&[
            "route",
            "add",
            "10.50.0.0/16",
            "via",
            "10.1.0.254",
            "dev",
            "a0",
        ]);
        ip(&["route", "add", "10.2.0.5/32", "dev", "b0", "scope", "link"]);
        let a0 = ifindex("a0");
        let b0 = ifindex("b0");
        let mut nl = Netlink::open().unwrap();

        assert_eq!(
            nl.route_get(addr("10.50.3.4")).unwrap(),
            Some(Route {
                oif: a0,
                gateway: Some(addr("10.1.0.254")),
                prefsrc: Some(addr("10.1.0.1")),
                kind: RouteKind::Unicast,
            })
        );

        let connected = nl.route_get(addr("10.1.0.7")).unwrap().unwrap();
        assert_eq!((connected.oif, connected.gateway), (a0, None));

        let host = nl.route_get(addr("10.2.0.5")).unwrap().unwrap();
        assert_eq!(
            (host.oif, host.gateway, host.kind),
            (b0, None, RouteKind::Unicast)
        );

        let local = nl.route_get(addr("10.1.0.1")).unwrap().unwrap();
        assert_eq!(local.kind, RouteKind::Local);
        assert_eq!(local.oif, ifindex("lo"));

        // No default route in a fresh namespace.
        assert_eq!(nl.route_get(addr("192.0.2.1")).unwrap(), None);
    });
}

#[test]
fn route_get_ipv6_reports_gateway_host_route_and_local() {
    in_netns(|| {
        routed_topology();
        ip(&[
            "-6",
            "route",
            "add",
            "fd00:50::/32",
            "via",
            "fd00:1::fe",
            "dev",
            "a0",
        ]);
        ip(&["-6", "route", "add", "fd00:2::5/128", "dev", "b0"]);
        let a0 = ifindex("a0");
        let mut nl = Netlink::open().unwrap();

        let routed = nl.route_get(addr("fd00:50::9")).unwrap().unwrap();
        assert_eq!(
            (routed.oif, routed.gateway, routed.kind),
            (a0, Some(addr("fd00:1::fe")), RouteKind::Unicast)
        );
        assert_eq!(routed.prefsrc, Some(addr("fd00:1::1")));

        let host = nl.route_get(addr("fd00:2::5")).unwrap().unwrap();
        assert_eq!((host.oif, host.gateway), (ifindex("b0"), None));

        let local = nl.route_get(addr("fd00:1::1")).unwrap().unwrap();
        assert_eq!(local.kind, RouteKind::Local);

        assert_eq!(nl.route_get(addr("2001:db8::1")).unwrap(), None);
    });
}

#[test]
fn route_get_follows_policy_rules() {
    in_netns(|| {
        routed_topology();
        ip(&[
            "route",
            "add",
            "10.60.0.0/16",
            "via",
            "10.1.0.253",
            "table",
            "100",
        ]);
        ip(&["rule", "add", "to", "10.60.0.0/16", "table", "100"]);
        let mut nl = Netlink::open().unwrap();
        let route = nl.route_get(addr("10.60.1.1")).unwrap().unwrap();
        assert_eq!(route.gateway, Some(addr("10.1.0.253")));
        assert_eq!(route.oif, ifindex("a0"));
    });
}

#[test]
fn route_get_reports_unreachable_as_none_and_blackhole_as_einval() {
    in_netns(|| {
        routed_topology();
        ip(&["route", "add", "unreachable", "10.8.0.0/16"]);
        ip(&["route", "add", "blackhole", "10.9.0.0/16"]);
        let mut nl = Netlink::open().unwrap();
        assert_eq!(nl.route_get(addr("10.8.0.1")).unwrap(), None);
        let err = nl.route_get(addr("10.9.0.1")).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");
        assert!(err.to_string().contains("route get 10.9.0.1"), "{err}");
    });
}

#[test]
fn addresses_lists_assigned_prefixes_and_scopes() {
    in_netns(|| {
        routed_topology();
        ip(&["addr", "add", "10.3.0.1/16", "dev", "a0", "scope", "link"]);
        let a0 = ifindex("a0");
        let lo = ifindex("lo");
        let mut nl = Netlink::open().unwrap();
        let addrs = nl.addresses().unwrap();

        let expected = [
            IfAddr {
                ifindex: a0,
                addr: addr("10.1.0.1"),
                prefix_len: 24,
                global: true,
            },
            IfAddr {
                ifindex: a0,
                addr: addr("10.3.0.1"),
                prefix_len: 16,
                global: false,
            },
            IfAddr {
                ifindex: a0,
                addr: addr("fd00:1::1"),
                prefix_len: 64,
                global: true,
            },
            IfAddr {
                ifindex: lo,
                addr: addr("127.0.0.1"),
                prefix_len: 8,
                global: false,
            },
            IfAddr {
                ifindex: lo,
                addr: addr("::1"),
                prefix_len: 128,
                global: false,
            },
        ];
        for want in &expected {
            assert!(addrs.contains(want), "{want:?} missing from {addrs:#?}");
        }
        // The kernel's own IPv6 link-local address on a0: link scope, /64.
        assert!(
            addrs.iter().any(|a| a.ifindex == a0
                && matches!(a.addr, IpAddr::V6(v6) if v6.segments()[0] == 0xfe80)
                && a.prefix_len == 64
                && !a.global),
            "{addrs:#?}"
        );
    });
}

#[test]
fn addresses_dump_spans_many_datagrams() {
    in_netns(|| {
        ip(&["link", "add", "a0", "type", "veth", "peer", "name", "a1"]);
        // Thousands of addresses make the dump far bigger than one datagram.
        let count = 3000u32;
        let mut batch = String::new();
        for i in 0..count {
            let _ = writeln!(
                batch,
                "addr add 10.20.{}.{}/32 dev a0",
                i / 250,
                i % 250 + 1
            );
        }
        let mut child = Command::new("ip")
            .args(["-batch", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(batch.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());

        let a0 = ifindex("a0");
        let mut nl = Netlink::open().unwrap();
        let on_a0: HashSet<IpAddr> = nl
            .addresses()
            .unwrap()
            .into_iter()
            .filter(|a| a.ifindex == a0 && a.addr.is_ipv4())
            .map(|a| a.addr)
            .collect();
        assert_eq!(on_a0.len(), count as usize);
        assert!(on_a0.contains(&addr("10.20.11.250")));
    });
}

#[test]
fn links_report_veth_kind_mtu_mac_and_state() {
    in_netns(|| {
        ip(&["link", "add", "a0", "type", "veth", "peer", "name", "a1"]);
        ip(&[
            "link",
            "set",
            "a0",
            "mtu",
            "1400",
            "address",
            "02:00:00:00:00:a0",
        ]);
        ip(&["link", "set", "a0", "up"]);
        let mut nl = Netlink::open().unwrap();
        let links = nl.links().unwrap();
        let by_name = |name: &str| {
            links
                .iter()
                .find(|l| l.name == name)
                .unwrap_or_else(|| panic!("{name} missing from {links:#?}"))
                .clone()
        };

        let a0 = by_name("a0");
        assert_eq!(a0.ifindex, ifindex("a0"));
        assert_eq!(a0.kind.as_deref(), Some("veth"));
        assert_eq!(a0.mtu, 1400);
        assert_eq!(a0.mac, Some([0x02, 0, 0, 0, 0, 0xa0]));
        assert!(a0.up);
        assert_eq!(a0.vlan, None);
        assert_eq!(a0.xdp, None);

        let a1 = by_name("a1");
        assert_eq!(a1.kind.as_deref(), Some("veth"));
        assert_eq!(a1.mtu, 1500);
        assert!(!a1.up);
        assert!(a1.mac.is_some());

        let lo = by_name("lo");
        assert_eq!((lo.kind, lo.mac, lo.up), (None, None, true));
        assert_eq!(links.len(), 3, "{links:#?}");
    });
}

/// Builds a0 here <-> b0 in a peer namespace, 192.168.77.1/24 and fd00:77::1/64 on a0, .2/::2
/// on b0, and returns the peer with b0's MAC. DAD is off so IPv6 answers at once.
fn neighbour_topology() -> (PeerNs, String) {
    let peer = PeerNs::new();
    ip(&["link", "add", "a0", "type", "veth", "peer", "name", "b0"]);
    ip(&["link", "set", "b0", "netns", &peer.path]);
    run("sysctl", &["-qw", "net.ipv6.conf.a0.accept_dad=0"]);
    ip(&["addr", "add", "192.168.77.1/24", "dev", "a0"]);
    ip(&["-6", "addr", "add", "fd00:77::1/64", "dev", "a0", "nodad"]);
    ip(&["link", "set", "a0", "up"]);
    peer.run("sysctl", &["-qw", "net.ipv6.conf.b0.accept_dad=0"]);
    peer.run("ip", &["addr", "add", "192.168.77.2/24", "dev", "b0"]);
    peer.run(
        "ip",
        &["-6", "addr", "add", "fd00:77::2/64", "dev", "b0", "nodad"],
    );
    peer.run("ip", &["link", "set", "b0", "up"]);
    let b0 = json(&peer.run("ip", &["-j", "link", "show", "dev", "b0"]));
    let mac = b0[0]["address"].as_str().unwrap().to_string();
    (peer, mac)
}

/// The entry as `ip -j -d neigh` shows it, if there is one.
fn neigh_entry(dst: &str) -> Option<Value> {
    let entries = json(&ip(&["-j", "-d", "neigh", "show", "dev", "a0"]));
    entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["dst"] == dst)
        .cloned()
}

fn is_reachable(entry: &Value) -> bool {
    entry["state"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s == "REACHABLE"))
}

fn managed_neighbour_lifecycle(dst: &str) {
    let (_peer, peer_mac) = neighbour_topology();
    let a0 = ifindex("a0");
    let target = addr(dst);
    let mut nl = Netlink::open().unwrap();

    assert!(nl.add_managed_neighbour(a0, target).unwrap(), "made");
    let deadline = Instant::now() + RESOLVE_WITHIN;
    let entry = loop {
        let entry = neigh_entry(dst).expect("the entry exists once created");
        if entry["lladdr"].as_str() == Some(peer_mac.as_str()) && is_reachable(&entry) {
            break entry;
        }
        assert!(
            Instant::now() < deadline,
            "{dst} not resolved within {RESOLVE_WITHIN:?}: {entry}"
        );
        thread::sleep(Duration::from_millis(20));
    };
    assert!(entry.get("managed").is_some(), "not managed: {entry}");

    // Again: it exists, nothing is replaced, and the entry keeps its MAC and state.
    assert!(
        !nl.add_managed_neighbour(a0, target).unwrap(),
        "not made twice"
    );
    let again = neigh_entry(dst).unwrap();
    assert_eq!(again["lladdr"].as_str(), Some(peer_mac.as_str()));
    assert!(is_reachable(&again), "{again}");

    assert!(
        nl.managed_neighbours().unwrap().contains(&(a0, target)),
        "managed entries: {:?}",
        nl.managed_neighbours()
    );

    nl.remove_neighbour(a0, target).unwrap();
    assert_eq!(neigh_entry(dst), None);
    assert!(!nl.managed_neighbours().unwrap().contains(&(a0, target)));
    // Already gone: still fine.
    nl.remove_neighbour(a0, target).unwrap();
}

#[test]
fn managed_neighbour_ipv4_resolves_lists_and_removes() {
    in_netns(|| managed_neighbour_lifecycle("192.168.77.2"));
}

#[test]
fn managed_neighbour_ipv6_resolves_lists_and_removes() {
    in_netns(|| managed_neighbour_lifecycle("fd00:77::2"));
}

#[test]
fn remove_neighbour_leaves_entries_it_did_not_make() {
    in_netns(|| {
        let (_peer, _) = neighbour_topology();
        ip(&[
            "neigh",
            "add",
            "192.168.77.9",
            "dev",
            "a0",
            "lladdr",
            "02:00:00:00:00:09",
            "nud",
            "permanent",
        ]);
        let a0 = ifindex("a0");
        let mut nl = Netlink::open().unwrap();
        assert!(nl.managed_neighbours().unwrap().is_empty());
        nl.remove_neighbour(a0, addr("192.168.77.9")).unwrap();
        let entry = neigh_entry("192.168.77.9").expect("the static entry stays");
        assert_eq!(entry["lladdr"], "02:00:00:00:00:09");
    });
}

#[test]
fn a_managed_entry_never_replaces_one_someone_made() {
    in_netns(|| {
        let (_peer, _) = neighbour_topology();
        // A permanent entry for a gateway nothing answers ARP for.
        ip(&[
            "neigh",
            "add",
            "192.168.77.9",
            "dev",
            "a0",
            "lladdr",
            "02:00:00:00:00:09",
            "nud",
            "permanent",
        ]);
        let a0 = ifindex("a0");
        let mut nl = Netlink::open().unwrap();
        assert!(!nl.add_managed_neighbour(a0, addr("192.168.77.9")).unwrap());
        let entry = neigh_entry("192.168.77.9").expect("still there");
        assert_eq!(entry["lladdr"], "02:00:00:00:00:09");
        assert!(
            entry.get("managed").is_none(),
            "not turned managed: {entry}"
        );
        let all = nl.neighbours().unwrap();
        let n = all
            .iter()
            .find(|n| n.addr == addr("192.168.77.9"))
            .expect("in the dump");
        assert!(!n.managed);
        assert_eq!(n.state & 0x80, 0x80, "NUD_PERMANENT");
    });
}

#[test]
fn the_monitor_hears_a_flush_and_a_link_going_down() {
    in_netns(|| {
        let (_peer, _) = neighbour_topology();
        let a0 = ifindex("a0");
        let mut nl = Netlink::open().unwrap();
        let mut monitor = Monitor::open().unwrap();
        assert!(nl.add_managed_neighbour(a0, addr("192.168.77.2")).unwrap());
        ip(&["neigh", "flush", "dev", "a0"]);
        ip(&["link", "set", "a0", "down"]);
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut heard = Vec::new();
        let (mut gone, mut link) = (false, false);
        while !(gone && link) {
            assert!(Instant::now() < deadline, "heard only {heard:?}");
            heard.extend(monitor.read());
            gone = heard.iter().any(|c| {
                *c == Change::NeighbourGone {
                    ifindex: a0,
                    addr: addr("192.168.77.2"),
                }
            });
            link = heard.contains(&Change::Link { ifindex: a0 });
            thread::sleep(Duration::from_millis(10));
        }
        assert!(
            heard
                .iter()
                .any(|c| *c == Change::Address || *c == Change::Route),
            "its routes go with it: {heard:?}"
        );
    });
}

#[test]
fn kernel_errors_name_the_operation_and_errno() {
    in_netns(|| {
        let mut nl = Netlink::open().unwrap();
        let err = nl
            .add_managed_neighbour(9999, addr("192.168.77.2"))
            .unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENODEV), "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with("neighbour add 192.168.77.2 dev 9999 managed: "),
            "{text}"
        );
        // The kernel explains this one in an extended ACK; the reason reaches the message.
        let err = nl.remove_neighbour(9999, addr("192.168.77.2")).unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENODEV), "{err}");
        assert!(
            err.to_string()
                .ends_with("; the kernel says: Unknown device ifindex"),
            "{err}"
        );
        // The socket is still usable after an error: the next request gets its own answer.
        assert!(!nl.links().unwrap().is_empty());
    });
}

/// The agent's way of keeping next hops' entries (`agent::run`): neighbour notifications at
/// once, other changes after they settle (100 ms). Runs until `done` or `within`; returns how
/// long it took.
fn keep_neighbours(
    nl: &mut Netlink,
    monitor: &mut Monitor,
    neighbours: &mut Neighbours,
    desired: &Desired,
    within: Duration,
    done: impl Fn() -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    let mut node_due: Option<Instant> = None;
    while start.elapsed() < within {
        let changes = monitor.read();
        for c in &changes {
            neighbours.on_change(nl, c);
        }
        if changes
            .iter()
            .any(|c| !matches!(c, Change::NeighbourGone { .. } | Change::Neighbour(_)))
        {
            node_due.get_or_insert_with(|| Instant::now() + Duration::from_millis(100));
        }
        if node_due.is_some_and(|d| Instant::now() >= d) {
            node_due = None;
            neighbours.follow(nl, desired);
        }
        if done() {
            return Some(start.elapsed());
        }
        thread::sleep(Duration::from_millis(5));
    }
    None
}

#[test]
fn a_next_hops_entry_comes_back_within_a_second_after_any_loss() {
    in_netns(|| {
        let (peer, _) = neighbour_topology();
        // A backend behind the peer, as a pod on another node is.
        ip(&["route", "add", "10.99.0.0/24", "via", "192.168.77.2"]);
        let frontend = Frontend {
            vip: addr("10.96.0.1"),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let desired = Desired {
            services: [(
                frontend,
                Service {
                    name: "web".into(),
                    origin: "test".into(),
                    frontend,
                    mode: Mode::Snat,
                    backends: vec![Backend {
                        addr: addr("10.99.0.5"),
                        port: 8080,
                        weight: 1,
                    }],
                    policy: None,
                    affinity: None,
                    source_ranges: lb_userspace::model::SourceRanges::default(),
                }
                .into(),
            )]
            .into(),
            ..Desired::default()
        };
        let mut nl = Netlink::open().unwrap();
        let mut monitor = Monitor::open().unwrap();
        let mut neighbours = Neighbours::default();
        assert!(neighbours.follow(&mut nl, &desired).is_empty());
        let a0 = ifindex("a0");
        let gateway = addr("192.168.77.2");
        // Managed, and resolved: what bpf_fib_lookup needs (NUD_VALID).
        let managed = || {
            Netlink::open()
                .unwrap()
                .neighbours()
                .unwrap()
                .iter()
                .any(|n| (n.ifindex, n.addr) == (a0, gateway) && n.managed && n.state & 0xde != 0)
        };
        let mut keep = |within: Duration| {
            keep_neighbours(
                &mut nl,
                &mut monitor,
                &mut neighbours,
                &desired,
                within,
                managed,
            )
        };
        let second = Duration::from_secs(1);
        keep(RESOLVE_WITHIN).expect("made and resolved");

        ip(&["neigh", "flush", "dev", "a0"]);
        let took = keep(second).expect("back within 1 s of a flush");
        println!("after a flush: {took:?}");

        // Carrier loss: the peer's end goes down, and comes back.
        peer.run("ip", &["link", "set", "b0", "down"]);
        keep(Duration::from_millis(300));
        peer.run("ip", &["link", "set", "b0", "up"]);
        let took = keep(second).expect("back within 1 s of the carrier");
        println!("after a carrier flap: {took:?}");

        // The interface down and up: its routes go with it, and come back as a node's network
        // manager puts them back.
        ip(&["link", "set", "a0", "down"]);
        keep(Duration::from_millis(300));
        ip(&["link", "set", "a0", "up"]);
        ip(&["route", "replace", "10.99.0.0/24", "via", "192.168.77.2"]);
        let took = keep(second).expect("back within 1 s of the interface and its route");
        println!("after the interface went down and up: {took:?}");
    });
}
