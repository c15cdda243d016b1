//! End to end: real TCP and UDP between network namespaces through the attached data path, in
//! the EKS-like lab (client -> VPC bridge -> node1 running lb-agent on its uplink, two local
//! pods; node2 with two pods reachable by routing). Each test builds its own lab.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb_tests::{
    agent::{AgentOptions, AgentProcess, Bpffs},
    lab::Lab,
    netns::{gro_enabled, require_root},
    traffic::{BackendServer, Batch, LongTransfer, Proto, serve_pods, tcp_request},
};

const VIP: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";
const LOCAL_VIP: &str = "10.96.0.11";
const PORT: u16 = 8080;

/// The lab, its backend servers, and the agent on node1.
struct Setup {
    // Field order is drop order: agent first, then servers, then the lab.
    agent: AgentProcess,
    servers: Vec<BackendServer>,
    lab: Lab,
    _bpffs: Bpffs,
}

fn setup(name: &str, config: &str, options: AgentOptions) -> Setup {
    let bpffs = Bpffs::mount(name).expect("bpffs");
    let lab = Lab::build(name).expect("lab");
    let servers = serve_pods(lab.pods(), PORT).expect("servers");
    let agent = AgentProcess::start(&lab.node1().ns, &bpffs, config, options).expect("agent");
    Setup {
        agent,
        servers,
        lab,
        _bpffs: bpffs,
    }
}

/// A config with `web` (TCP) and `dns` (UDP) on VIP over the four pods with the given weights
/// (pod1..pod4), snat; `local` on LOCAL_VIP over the two node1 pods, preserving client IPs;
/// and `web6` on VIP6 over the four pods' IPv6 addresses.
fn config(weights: [u32; 4]) -> String {
    let pods4 = ["10.1.1.2", "10.1.1.3", "10.1.2.2", "10.1.2.3"];
    let pods6 = ["fd00:1:1::2", "fd00:1:1::3", "fd00:1:2::2", "fd00:1:2::3"];
    let backends = |addrs: &[&str], weights: &[u32]| {
        addrs
            .iter()
            .zip(weights)
            .map(|(a, w)| format!("  {{ address = \"{a}\", port = {PORT}, weight = {w} }},"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    format!(
        r#"
[node]
hash-seed = 42

[[services]]
name = "web"
vip = "{VIP}"
port = 80
protocol = "tcp"
backends = [
{b4}
]

[[services]]
name = "dns"
vip = "{VIP}"
port = 53
protocol = "udp"
backends = [
{b4}
]

[[services]]
name = "local"
vip = "{LOCAL_VIP}"
port = 80
protocol = "tcp"
mode = "preserve-client-ip"
backends = [
{blocal}
]

[[services]]
name = "web6"
vip = "{VIP6}"
port = 80
protocol = "tcp"
backends = [
{b6}
]
"#,
        b4 = backends(&pods4, &weights),
        b6 = backends(&pods6, &weights),
        blocal = backends(&pods4[..2], &[1, 1]),
    )
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn batch(s: &Setup, proto: Proto, dst: SocketAddr, count: usize) -> lb_tests::traffic::BatchReport {
    let sources = s.lab.client().sources_for(dst.ip());
    let report = Batch::new(proto, dst, sources, count)
        .deadline(Duration::from_secs(60))
        .run(&s.lab.client().ns)
        .expect("batch");
    assert!(
        report.all_ok(),
        "{proto:?} to {dst}: {} of {} failed, e.g. {:?}\nagent log:\n{}",
        report.error_count,
        count,
        report.errors,
        s.agent.log_tail()
    );
    report
}

/// Checks each backend's share of `counts` is within ±15% (relative) of its weight's share.
fn assert_shares(counts: &BTreeMap<String, usize>, weights: &[(&str, u32)]) {
    let total: usize = counts.values().sum();
    let weight_total: u32 = weights.iter().map(|(_, w)| w).sum();
    for (pod, w) in weights {
        let got = *counts.get(*pod).unwrap_or(&0) as f64 / total as f64;
        let want = f64::from(*w) / f64::from(weight_total);
        assert!(
            (got - want).abs() <= 0.15 * want,
            "{pod}: share {got:.3}, weight share {want:.3} (counts {counts:?})"
        );
    }
}

#[test]
fn thousand_tcp_and_udp_exchanges_succeed_and_follow_the_weights() {
    if !require_root() {
        return;
    }
    let s = setup("e2e-dist", &config([1, 1, 2, 1]), AgentOptions::default());
    let tcp = batch(&s, Proto::Tcp, addr(VIP, 80), 1000);
    let udp = batch(&s, Proto::Udp, addr(VIP, 53), 1000);
    assert_eq!(tcp.ok, 1000);
    assert_eq!(udp.ok, 1000);
    // Over both (2000 flows): the four backends by weight 1:1:2:1.
    let mut all = tcp.per_backend.clone();
    for (b, n) in &udp.per_backend {
        *all.entry(b.clone()).or_default() += n;
    }
    assert_shares(&all, &[("pod1", 1), ("pod2", 1), ("pod3", 2), ("pod4", 1)]);
    // The agent's counters saw the same flows.
    let status = s.agent.status().unwrap();
    let web = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "web")
        .unwrap();
    assert_eq!(web["new_flows"].as_u64(), Some(1000), "{web}");
}

#[test]
fn snat_backends_see_the_node_and_preserving_backends_see_the_client() {
    if !require_root() {
        return;
    }
    let s = setup("e2e-src", &config([1, 1, 1, 1]), AgentOptions::default());
    let snat = batch(&s, Proto::Tcp, addr(VIP, 80), 100);
    assert_eq!(
        snat.peer_mismatches, 100,
        "every snat backend saw another source than the client"
    );
    for server in &s.servers {
        let peers = server.stats().peer_ips();
        assert!(
            peers.iter().all(|p| *p == IpAddr::from(s.lab.node1().ipv4)),
            "{}: saw {peers:?}, expected only node1's {}",
            server.name(),
            s.lab.node1().ipv4
        );
    }
    let preserve = batch(&s, Proto::Tcp, addr(LOCAL_VIP, 80), 100);
    assert_eq!(
        preserve.peer_mismatches, 0,
        "preserving backends saw the client"
    );
    assert!(
        preserve
            .backends()
            .iter()
            .all(|b| b == "pod1" || b == "pod2")
    );
}

#[test]
fn ipv6_is_balanced_too() {
    if !require_root() {
        return;
    }
    let s = setup("e2e-v6", &config([1, 1, 1, 1]), AgentOptions::default());
    let r = batch(&s, Proto::Tcp, addr(VIP6, 80), 200);
    assert_eq!(r.ok, 200);
    assert_eq!(r.backends().len(), 4, "{:?}", r.per_backend);
    assert_eq!(r.peer_mismatches, 200, "snat to the node's IPv6 address");
}

#[test]
fn a_long_transfer_survives_backend_changes_an_agent_restart_and_a_reload() {
    if !require_root() {
        return;
    }
    let mut options = AgentOptions::default();
    options.extra.push("--keep-on-exit".into());
    let mut s = setup("e2e-long", &config([1, 1, 1, 1]), options);
    let client = &s.lab.client().ns;
    let transfer = LongTransfer::start(client, None, addr(VIP, 80)).expect("transfer");
    let served_by = transfer.backend().to_string();
    let pods = ["pod1", "pod2", "pod3", "pod4"];
    let index = pods.iter().position(|p| *p == served_by).expect("a pod");
    std::thread::sleep(Duration::from_millis(500));

    // Drain the transfer's own backend: it keeps its flow.
    let mut w = [1, 1, 1, 1];
    w[index] = 0;
    s.agent.set_config(&config(w)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Add a backend (pod5 on node1) with a big weight.
    let mut with_new = config(w);
    s.lab
        .add_pod(
            lb_tests::lab::NodeId::Node1,
            "pod5",
            "10.1.1.9".parse().unwrap(),
            "fd00:1:1::9".parse().unwrap(),
        )
        .unwrap();
    let added = BackendServer::for_pod(s.lab.pod("pod5").unwrap(), PORT).unwrap();
    with_new = with_new.replacen(
        "backends = [\n",
        &format!("backends = [\n  {{ address = \"10.1.1.9\", port = {PORT}, weight = 5 }},\n"),
        1,
    );
    s.agent.set_config(&with_new).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Restart the agent (it leaves the data path attached; the new one takes over).
    s.agent.restart().unwrap();
    let status = s.agent.status().unwrap();
    let interfaces = status["interfaces"].as_array().cloned().unwrap_or_default();
    assert!(
        !interfaces.is_empty()
            && interfaces.iter().all(|i| i["note"]
                .as_str()
                .is_some_and(|n| n.starts_with("took over the previous agent's link"))),
        "the new agent attaches anew instead of taking over the pinned links: {interfaces:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    // Reload the same config again (a no-op) and a real change (weights back).
    s.agent.set_config(&with_new).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let report = transfer.finish();
    assert!(
        report.is_clean(),
        "transfer broke: {report:?}\nagent log:\n{}",
        s.agent.log_tail()
    );
    assert_eq!(report.backend, served_by);
    assert!(
        report.bytes_sent > 1_000_000,
        "too little data went through: {report:?}"
    );
    // New connections meanwhile avoid the drained backend and reach the new one.
    let r = batch(&s, Proto::Tcp, addr(VIP, 80), 200);
    assert!(
        !r.per_backend.contains_key(&served_by),
        "drained backend got new connections: {:?}",
        r.per_backend
    );
    assert!(
        r.per_backend.get("pod5").copied().unwrap_or(0) > 50,
        "{:?}",
        r.per_backend
    );
    drop(added);
}

#[test]
fn a_removed_backend_gets_no_new_connections() {
    if !require_root() {
        return;
    }
    let mut s = setup("e2e-rm", &config([1, 1, 1, 1]), AgentOptions::default());
    let before = batch(&s, Proto::Tcp, addr(VIP, 80), 200);
    assert!(before.per_backend.contains_key("pod4"));
    // pod4 (10.1.2.3) leaves the configuration.
    let without = config([1, 1, 1, 1]).replace(
        &format!("  {{ address = \"10.1.2.3\", port = {PORT}, weight = 1 }},\n"),
        "",
    );
    s.agent.set_config(&without).unwrap();
    let pod4 = s.servers.iter().find(|x| x.name() == "pod4").unwrap();
    pod4.reset_stats();
    let after = batch(&s, Proto::Tcp, addr(VIP, 80), 300);
    assert!(
        !after.per_backend.contains_key("pod4"),
        "{:?}",
        after.per_backend
    );
    assert_eq!(pod4.stats().tcp_connections, 0);
}

#[test]
fn a_bad_config_is_rejected_and_the_last_good_one_keeps_serving() {
    if !require_root() {
        return;
    }
    let mut s = setup("e2e-bad", &config([1, 1, 1, 1]), AgentOptions::default());
    let bad = config([1, 1, 1, 1]).replace("port = 53", "port = \"fifty-three\"");
    let e = s.agent.set_config(&bad).unwrap_err().to_string();
    assert!(
        e.contains("lb.toml:") && e.contains("services[1].port"),
        "{e}"
    );
    // A preserve-client-ip service with a remote backend: refused, naming the reason.
    let remote = config([1, 1, 1, 1]).replace(
        &format!("  {{ address = \"10.1.1.3\", port = {PORT}, weight = 1 }},\n]\n\n[[services]]\nname = \"web6\""),
        &format!("  {{ address = \"10.1.2.2\", port = {PORT}, weight = 1 }},\n]\n\n[[services]]\nname = \"web6\""),
    );
    let e = s.agent.set_config(&remote).unwrap_err().to_string();
    assert!(
        e.contains("preserve-client-ip") && e.contains("10.1.2.2"),
        "{e}"
    );
    let r = batch(&s, Proto::Tcp, addr(VIP, 80), 100);
    assert_eq!(r.ok, 100, "still serving the last good config");
}

#[test]
fn vips_answer_ping_and_other_traffic_is_untouched() {
    if !require_root() {
        return;
    }
    let s = setup("e2e-ping", &config([1, 1, 1, 1]), AgentOptions::default());
    let client = &s.lab.client().ns;
    for target in [VIP, VIP6] {
        let ok = client
            .run(move || lb_tests::traffic::ping(target.parse().unwrap(), Duration::from_secs(2)))
            .unwrap();
        assert!(ok.is_ok(), "ping {target}: {ok:?}");
    }
    // A VIP port without a service: dropped (no answer at all).
    let e = tcp_request(client, None, addr(VIP, 81), Duration::from_millis(500));
    assert!(e.is_err());
    // Direct traffic to a pod, and to node1 itself, is not ours and still works.
    let direct = tcp_request(
        client,
        None,
        SocketAddr::new(s.lab.pods()[0].ipv4.into(), PORT),
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(direct.starts_with("pod1 10.0.0.10"), "{direct}");
    let ok = client
        .run({
            let node1 = IpAddr::from(s.lab.node1().ipv4);
            move || lb_tests::traffic::ping(node1, Duration::from_secs(2))
        })
        .unwrap();
    assert!(ok.is_ok(), "ping node1: {ok:?}");
    let status = s.agent.status().unwrap();
    assert!(
        status["counters"]["icmp_echo_replies"]
            .as_u64()
            .unwrap_or(0)
            >= 2,
        "{status}"
    );
}

/// A pod without an XDP program on its eth0 (as the VPC CNI sets pods up) receives frames the
/// data path redirects into its veth only with GRO on at its end: the agent turns it on.
#[test]
fn pods_without_xdp_get_redirected_frames_once_the_agent_turns_gro_on() {
    if !require_root() {
        return;
    }
    let bpffs = Bpffs::mount("e2e-gro").expect("bpffs");
    let mut lab = Lab::build("e2e-gro").expect("lab");
    let gro = |lab: &Lab, pod: &str| {
        let ns = &lab.pod(pod).expect("pod").ns;
        ns.run(|| gro_enabled("eth0"))
            .and_then(|r| r)
            .expect("reading GRO")
    };
    for pod in ["pod1", "pod2"] {
        lab.detach_pod_xdp(pod).expect("detach");
        assert!(
            !gro(&lab, pod),
            "{pod}: GRO starts off, as on a VPC CNI pod"
        );
    }
    let _servers = serve_pods(lab.pods(), PORT).expect("servers");
    let agent = AgentProcess::start(
        &lab.node1().ns,
        &bpffs,
        &config([1, 1, 1, 1]),
        AgentOptions::default(),
    )
    .expect("agent");
    for pod in ["pod1", "pod2"] {
        assert!(
            gro(&lab, pod),
            "{pod}: the agent turned GRO on at the pod end\n{}",
            agent.log_tail()
        );
    }
    let dst = addr(LOCAL_VIP, 80);
    let report = Batch::new(Proto::Tcp, dst, lab.client().sources_for(dst.ip()), 100)
        .deadline(Duration::from_secs(30))
        .run(&lab.client().ns)
        .expect("batch");
    assert!(
        report.all_ok(),
        "{} of 100 failed, e.g. {:?}\n{}",
        report.error_count,
        report.errors,
        agent.log_tail()
    );
    let status = agent.status().expect("status");
    assert!(
        status["counters"]["xdp_redirect"].as_u64().unwrap_or(0) >= 100,
        "redirected, not handed to the kernel: {status:#}"
    );
}

/// A restart with more room (`--max-backends` raised: LB_RINGS is recreated at its new size
/// under the pinned services, as on an upgrade that changes its size): the new agent writes the
/// services' rings from the pinned backends before it attaches, a live connection keeps going,
/// and new connections are served. (With a config file the first apply also comes before the
/// attach; with --kubernetes it waits for the first list, and the refilled rings are what new
/// flows read meanwhile.)
#[test]
fn a_restart_that_resizes_the_ring_array_refills_it_and_keeps_serving() {
    if !require_root() {
        return;
    }
    let mut options = AgentOptions::default();
    options.extra.push("--keep-on-exit".into());
    let mut s = setup("e2e-rings", &config([1, 1, 1, 1]), options);
    let transfer = LongTransfer::start(&s.lab.client().ns, None, addr(VIP, 80)).expect("transfer");
    std::thread::sleep(Duration::from_millis(300));
    s.agent.options_mut().max_backends *= 2;
    s.agent.restart().unwrap();
    let log = std::fs::read_to_string(s.agent.state_dir().join("agent.log")).unwrap_or_default();
    assert!(
        log.contains("LB_RINGS: resized from")
            && log.contains("LB_RINGS was recreated: wrote the rings of"),
        "{log}"
    );
    assert!(!log.contains("wrote the rings of 0 "), "{log}");
    let r = batch(&s, Proto::Tcp, addr(VIP, 80), 100);
    assert_eq!(r.ok, 100, "{:?}\n{log}", r.per_backend);
    std::thread::sleep(Duration::from_millis(300));
    let report = transfer.finish();
    assert!(report.is_clean(), "transfer broke: {report:?}\n{log}");
}
