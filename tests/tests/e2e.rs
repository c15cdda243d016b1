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
    bpffs: Bpffs,
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
        bpffs,
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

/// A UDP stream that flows one way (syslog, metrics) for longer than the UDP timeout stays one
/// flow, each way in turn: real sockets, the client's datagrams to a snat service every 0.3 s for
/// 3 s (the timeout is 1 s here), then the backend's answer must reach the client from the VIP;
/// then the backend sends for 3 s alone, each datagram reaching the client, and the client's
/// next datagram must come to the backend from the same snat address and port (the same flow,
/// not a new one). The agent's sweep runs meanwhile and must leave both entries.
#[test]
fn a_one_way_udp_stream_stays_one_flow_past_the_udp_timeout_each_way() {
    use std::net::UdpSocket;
    if !require_root() {
        return;
    }
    let config = format!(
        r#"
[node]
udp-idle-timeout-seconds = 1

[[services]]
name = "syslog"
vip = "{VIP}"
port = 514
protocol = "udp"
backends = [{{ address = "10.1.1.2", port = 5140 }}]
"#
    );
    let s = setup("e2e-oneway", &config, AgentOptions::default());
    let pod = s.lab.pod("pod1").expect("pod1");
    let bind = |ns: &lb_tests::netns::Netns, at: &str| {
        let addr: SocketAddr = at.parse().unwrap();
        let sock = ns.run(move || UdpSocket::bind(addr)).unwrap().unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        sock
    };
    let server = bind(&pod.ns, "10.1.1.2:5140");
    let client = bind(&s.lab.client().ns, "10.0.0.10:0");
    let vip = addr(VIP, 514);
    let mut buf = [0u8; 64];
    let pause = || std::thread::sleep(Duration::from_millis(300));
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..10 {
        client.send_to(format!("log {i}").as_bytes(), vip).unwrap();
        let (n, from) = server
            .recv_from(&mut buf)
            .expect("the backend gets each datagram");
        assert_eq!(&buf[..n], format!("log {i}").as_bytes());
        seen.insert(from);
        pause();
    }
    assert_eq!(
        seen.len(),
        1,
        "one snat address and port for the stream: {seen:?}"
    );
    let flow = *seen.first().unwrap();
    assert_eq!(flow.ip(), IpAddr::from(s.lab.node1().ipv4));
    server.send_to(b"answer", flow).unwrap();
    let (n, from) = client
        .recv_from(&mut buf)
        .expect("the backend's answer after 3 s of client datagrams only");
    assert_eq!((&buf[..n], from), (&b"answer"[..], vip));
    for i in 0..10 {
        pause();
        server
            .send_to(format!("push {i}").as_bytes(), flow)
            .unwrap();
        let (n, from) = client.recv_from(&mut buf).expect("each backend datagram");
        assert_eq!((&buf[..n], from), (format!("push {i}").as_bytes(), vip));
    }
    client.send_to(b"log again", vip).unwrap();
    let (n, from) = server
        .recv_from(&mut buf)
        .expect("the client's next datagram");
    assert_eq!(&buf[..n], b"log again");
    assert_eq!(
        from, flow,
        "after 3 s of backend datagrams only: the same flow"
    );
    assert_eq!(
        counter(&s.agent, "flows_created"),
        1,
        "{}",
        s.agent.log_tail()
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

/// Services over pod1 alone, for the policy-hook test: one preserving client addresses, one snat.
const HOOK_VIP: &str = "10.96.0.12";
const HOOK_SNAT_VIP: &str = "10.96.0.13";
const HOOK_VIP6: &str = "fd00:96::12";
const HOOK_SNAT_VIP6: &str = "fd00:96::13";

fn hook_config(setting: &str) -> String {
    format!(
        r#"
[node]
hash-seed = 42
policy-hooks = "{setting}"

[[services]]
name = "hooked"
vip = "{HOOK_VIP}"
port = 80
protocol = "tcp"
mode = "preserve-client-ip"
backends = [ {{ address = "10.1.1.2", port = {PORT} }} ]

[[services]]
name = "hooked-snat"
vip = "{HOOK_SNAT_VIP}"
port = 80
protocol = "tcp"
backends = [ {{ address = "10.1.1.2", port = {PORT} }} ]

[[services]]
name = "hooked6"
vip = "{HOOK_VIP6}"
port = 80
protocol = "tcp"
mode = "preserve-client-ip"
backends = [ {{ address = "fd00:1:1::2", port = {PORT} }} ]

[[services]]
name = "hooked-snat6"
vip = "{HOOK_SNAT_VIP6}"
port = 80
protocol = "tcp"
backends = [ {{ address = "fd00:1:1::2", port = {PORT} }} ]
"#
    )
}

/// Waits until `lb-agent status` says `veth`'s delivery is `want` and its reason says `saying`;
/// then a little over a second more, the life of the data path's cached next hops (which carry
/// the choice). Returns the reason the agent gave.
fn wait_delivery_for(agent: &AgentProcess, veth: &str, want: &str, saying: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = agent.status().expect("status");
        let found = status["interfaces"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == veth))
            .cloned()
            .unwrap_or_default();
        if found["delivery"] == want
            && found["delivery_reason"]
                .as_str()
                .is_some_and(|r| r.contains(saying))
        {
            std::thread::sleep(Duration::from_millis(1200));
            return found["delivery_reason"].as_str().unwrap_or("").to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{veth}: delivery {} (want {want}) after 10 s: {found}\n{}",
            found["delivery"],
            agent.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn counter(agent: &AgentProcess, name: &str) -> u64 {
    agent.status().expect("status")["counters"][name]
        .as_u64()
        .unwrap_or(0)
}

/// The policy-hook tests' lab: the agent with `hook_config`, pod1's host veth, and `tc_deny`
/// (the tools' direct-action classifier) pinned and denying `BLOCKED`: the stand-in for a CNI's
/// network policy program.
struct HookLab {
    s: Setup,
    veth: String,
    pin: std::path::PathBuf,
    deny: aya::maps::HashMap<aya::maps::MapData, u32, u64>,
}

const BLOCKED: &str = "10.0.0.11";
const ALLOWED: &str = "10.0.0.10";

impl HookLab {
    fn new(name: &str) -> HookLab {
        let mut s = setup(name, &hook_config("detect"), AgentOptions::default());
        let veth = s.lab.pod("pod1").expect("pod1").host_veth.clone();
        let pin = s.bpffs.path().join("tc_deny");
        let tools = s.lab.tools_mut();
        lb_userspace::dataplane::classifier_mut(tools, "tc_deny")
            .expect("tc_deny")
            .pin(&pin)
            .expect("pin tc_deny");
        let mut deny: aya::maps::HashMap<_, u32, u64> =
            aya::maps::HashMap::try_from(tools.take_map("TOOLS_DENY").expect("TOOLS_DENY"))
                .expect("TOOLS_DENY");
        let blocked: std::net::Ipv4Addr = BLOCKED.parse().unwrap();
        deny.insert(u32::from_ne_bytes(blocked.octets()), 0, 0)
            .expect("deny insert");
        HookLab { s, veth, pin, deny }
    }

    /// One TCP request from `src` to `dst` (2 s per step).
    fn reach(&self, src: &str, dst: SocketAddr) -> anyhow::Result<lb_tests::traffic::Reply> {
        lb_tests::traffic::request(
            &self.s.lab.client().ns,
            Proto::Tcp,
            Some(src.parse().unwrap()),
            dst,
            Duration::from_secs(2),
        )
    }

    /// `reach`, which must be answered by pod1; returns the address pod1 saw.
    fn must_reach(&self, src: &str, dst: SocketAddr) -> IpAddr {
        let reply = self
            .reach(src, dst)
            .unwrap_or_else(|e| panic!("{src} -> {dst}: {e:#}\n{}", self.s.agent.log_tail()));
        assert_eq!(reply.backend, "pod1", "{src} -> {dst}");
        reply.peer.ip()
    }

    /// Packets `tc_deny` dropped.
    fn denied(&self) -> u64 {
        self.deny
            .iter()
            .filter_map(Result::ok)
            .map(|(_, n)| n)
            .sum()
    }

    /// Attaches `tc_deny` at pod1's veth's egress (a classic filter, as the VPC CNI's policy
    /// agent attaches; the clsact qdisc may already be the agent's, if it attached in classic
    /// mode), or takes it off.
    fn policy_program(&self, on: bool) {
        let veth = &self.veth;
        if on {
            let _ = self
                .command("tc")
                .args(["qdisc", "add", "dev", veth, "clsact"])
                .output();
            self.tc(&format!(
                "filter add dev {veth} egress pref 1 bpf da pinned {}",
                self.pin.display()
            ));
        } else {
            self.tc(&format!("filter del dev {veth} egress pref 1"));
        }
    }

    fn command(&self, program: &str) -> std::process::Command {
        self.s.lab.node1().ns.command(program)
    }

    fn tc(&self, args: &str) {
        let out = self
            .command("tc")
            .args(args.split_whitespace())
            .output()
            .expect("tc");
        assert!(
            out.status.success(),
            "tc {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs an nft script in node1's namespace.
    fn nft(&self, script: &str) {
        use std::io::Write;
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("nft script");
        let out = child.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Packets the counters of nft table `table` (inet) chain `chain` counted, summed.
    fn nft_counter(&self, table: &str, chain: &str) -> u64 {
        let out = self
            .command("nft")
            .args(["list", "chain", "inet", table, chain])
            .output()
            .expect("nft list");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "packets")
            .filter_map(|w| w[1].parse::<u64>().ok())
            .sum()
    }

    fn delivery(&self, want: &str, saying: &str) -> String {
        wait_delivery_for(&self.s.agent, &self.veth, want, saying)
    }

    fn counter(&self, name: &str) -> u64 {
        counter(&self.s.agent, name)
    }
}

/// A stand-in for a CNI's network policy agent: a TC egress program of the test's own on pod1's
/// host veth that drops one client source (as the VPC CNI's policy agent enforces ingress
/// policy at that hook). Through the VIP, that source reaches the pod only when the data path
/// delivers through the kernel, which the agent decides by finding the program: it cannot reach
/// pod1 while the program is there, another source can, replies work (preserving and snat, both
/// families), and once the program goes the agent redirects again. `policy-hooks = "ignore"`
/// (the behaviour before policy hooks were respected) lets the dropped source in: the bypass
/// this test catches.
#[test]
fn a_pod_behind_a_cni_policy_program_is_reached_only_as_the_program_allows() {
    if !require_root() {
        return;
    }
    let mut h = HookLab::new("e2e-hook");
    let (vip, snat_vip) = (addr(HOOK_VIP, 80), addr(HOOK_SNAT_VIP, 80));
    let node_ip = IpAddr::from(h.s.lab.node1().ipv4);

    // Nothing else on the veth: redirected in XDP, both sources get in.
    let reason = h.delivery("redirect", "");
    println!("{}: redirect ({reason})", h.veth);
    for src in [BLOCKED, ALLOWED] {
        assert_eq!(
            h.must_reach(src, vip).to_string(),
            src,
            "the pod sees the client"
        );
    }
    assert_eq!(h.counter("pass_policy_hook"), 0, "redirected, not passed");

    // The policy drops BLOCKED on its way into pod1.
    h.policy_program(true);
    let reason = h.delivery("kernel", "");
    println!("{}: kernel ({reason})", h.veth);
    assert!(reason.contains("tc egress filter bpf tc_deny"), "{reason}");
    let (passed, handed) = (
        h.counter("pass_policy_hook"),
        h.counter("redirect_policy_hook"),
    );
    let err = h
        .reach(BLOCKED, vip)
        .expect_err("the denied source must not reach pod1");
    println!("{BLOCKED} -> {vip} with the policy: {err:#}");
    assert!(h.denied() > 0, "the policy program dropped it");
    for _ in 0..20 {
        assert_eq!(h.must_reach(ALLOWED, vip).to_string(), ALLOWED);
    }
    // snat: the pod sees the node, which the policy lets in; the reply comes back through
    // lb_backend as ever. IPv6 (which the IPv4 policy lets through), both modes, too.
    for src in [BLOCKED, ALLOWED] {
        assert_eq!(h.must_reach(src, snat_vip), node_ip, "snat");
    }
    let client6 = "fd00:a::10";
    assert_eq!(
        h.must_reach(client6, addr(HOOK_VIP6, 80)).to_string(),
        client6
    );
    assert_eq!(
        h.must_reach(client6, addr(HOOK_SNAT_VIP6, 80)),
        IpAddr::from(h.s.lab.node1().ipv6)
    );
    let through_kernel = h.counter("pass_policy_hook") - passed;
    assert!(
        through_kernel >= 24 * 3,
        "every packet into pod1 went through the kernel: {through_kernel}"
    );
    assert_eq!(
        h.counter("redirect_policy_hook") - handed,
        through_kernel,
        "each handed over to the veth's egress"
    );
    let text = h.s.agent.status_text().expect("status text");
    assert!(
        text.contains("delivery kernel (tc egress filter bpf"),
        "{text}"
    );

    // As before policy hooks counted (`ignore`): the denied source gets in.
    h.s.agent
        .set_config(&hook_config("ignore"))
        .expect("ignore");
    h.delivery("redirect", "ignore");
    h.must_reach(BLOCKED, vip);
    h.s.agent
        .set_config(&hook_config("detect"))
        .expect("detect");
    h.delivery("kernel", "");
    h.reach(BLOCKED, vip).expect_err("denied again");

    // The program goes: redirected again, everyone gets in.
    h.policy_program(false);
    h.delivery("redirect", "no policy hook found");
    let before = h.counter("pass_policy_hook");
    h.must_reach(BLOCKED, vip);
    h.must_reach(ALLOWED, snat_vip);
    assert_eq!(h.counter("pass_policy_hook"), before, "redirected again");
}

/// Netfilter's forward path as a policy (Calico's iptables mode) and kube-proxy's conntrack
/// rule (`ctstate INVALID -j DROP`, which drops a connection whose replies conntrack never saw):
/// with forward rules on the node, the agent delivers into local pods through the kernel's
/// forwarding both ways (`netfilter`): the client's address is kept (snat services too: the node
/// is the pod's gateway), conntrack sees both directions (its INVALID counter stays near 0),
/// short connections and a large transfer work, a forward rule that drops one source keeps it
/// out through either VIP, and a CNI's TC program on the veth still judges what passes. Without
/// the rules, redirected again and `lb_uplink_out` off the uplinks.
#[test]
fn a_pod_behind_netfilter_forward_rules_is_reached_only_as_they_allow() {
    if !require_root() {
        return;
    }
    let h = HookLab::new("e2e-nf");
    let (vip, snat_vip) = (addr(HOOK_VIP, 80), addr(HOOK_SNAT_VIP, 80));
    h.delivery("redirect", "no policy hook found");
    let opts = lb_tests::traffic::TransferOptions {
        chunk: 64 * 1024,
        interval: Duration::from_millis(1),
        ..Default::default()
    };
    // A connection that lives across each switch of delivery (a snat flow opened while
    // redirected keeps its snat through the kernel's forwarding).
    let across = |vip: SocketAddr| {
        LongTransfer::start_with(
            &h.s.lab.client().ns,
            Some(ALLOWED.parse().unwrap()),
            vip,
            opts,
        )
        .expect("transfer")
    };
    let live = across(snat_vip);
    // kube-proxy's `-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP`, counted.
    h.nft(
        "table inet kp {\n chain forward {\n  type filter hook forward priority 0;\n  ct state invalid counter drop\n }\n}\n",
    );
    let reason = h.delivery("netfilter", "nftables chain inet kp forward");
    let report = live.finish();
    println!("across redirect -> netfilter: {report:?}");
    assert!(report.is_clean(), "{report:?}\n{}", h.s.agent.log_tail());
    println!(
        "{} with netfilter forward rules: netfilter ({reason})",
        h.veth
    );
    let text = h.s.agent.status_text().expect("status text");
    assert!(text.contains("lb_uplink_out at"), "{text}");
    let (passed, replied) = (h.counter("pass_netfilter"), h.counter("reply_netfilter"));
    for _ in 0..10 {
        for src in [BLOCKED, ALLOWED] {
            assert_eq!(h.must_reach(src, vip).to_string(), src);
            // No snat into a `netfilter` pod: it sees the client.
            assert_eq!(h.must_reach(src, snat_vip).to_string(), src, "snat vip");
        }
    }
    let client6 = "fd00:a::10";
    for vip6 in [HOOK_VIP6, HOOK_SNAT_VIP6] {
        assert_eq!(h.must_reach(client6, addr(vip6, 80)).to_string(), client6);
    }
    // A large transfer with the lab's default offloads: conntrack pairs both directions.
    let report = across(snat_vip);
    std::thread::sleep(Duration::from_secs(3));
    conntrack_saw_both_directions(&h, &report.finish(), passed, replied);

    // A forward rule as a netfilter policy has: ALLOWED may not reach the pod, through either
    // VIP; BLOCKED still may.
    h.nft(&format!(
        "table inet netpol {{\n chain forward {{\n  type filter hook forward priority 0;\n  ip saddr {ALLOWED} tcp dport {PORT} counter drop\n }}\n}}\n"
    ));
    h.delivery("netfilter", "nftables chain inet netpol forward");
    for dst in [vip, snat_vip] {
        h.reach(ALLOWED, dst)
            .expect_err("the forward rule must keep ALLOWED out");
        h.must_reach(BLOCKED, dst);
    }
    assert!(
        h.nft_counter("netpol", "forward") > 0,
        "the rule dropped it"
    );
    h.nft("delete table inet netpol");

    // A CNI's TC program on the veth as well: it still judges (the kernel's forwarding goes out
    // through the veth's egress hook).
    h.policy_program(true);
    h.delivery("netfilter", "tc egress filter bpf tc_deny");
    h.reach(BLOCKED, vip)
        .expect_err("the policy program still drops the denied source");
    assert!(h.denied() > 0, "the policy program dropped it");
    h.must_reach(ALLOWED, vip);
    h.policy_program(false);

    let live = across(snat_vip);
    h.nft("delete table inet kp");
    h.delivery("redirect", "no policy hook found");
    let report = live.finish();
    println!("across netfilter -> redirect: {report:?}");
    assert!(report.is_clean(), "{report:?}\n{}", h.s.agent.log_tail());
    let text = h.s.agent.status_text().expect("status text");
    assert!(
        !text.contains("lb_uplink_out at"),
        "off the uplinks with no netfilter pod: {text}"
    );
    // Redirected again: the snat VIP's pod sees the node.
    assert_eq!(
        h.must_reach(ALLOWED, snat_vip),
        IpAddr::from(h.s.lab.node1().ipv4)
    );
}

/// A large transfer's `report` went through whole, both directions of it through the kernel
/// (`pass_netfilter` and `reply_netfilter` grew from `passed` and `replied`), and conntrack
/// (kp's `ct state invalid` counter) took next to none of it for INVALID.
fn conntrack_saw_both_directions(
    h: &HookLab,
    report: &lb_tests::traffic::TransferReport,
    passed: u64,
    replied: u64,
) {
    println!("large transfer to a netfilter pod: {report:?}");
    assert!(
        report.is_clean() && report.bytes_sent > 20_000_000,
        "{report:?}\n{}",
        h.s.agent.log_tail()
    );
    let (passed, replied) = (
        h.counter("pass_netfilter") - passed,
        h.counter("reply_netfilter") - replied,
    );
    let invalid = h.nft_counter("kp", "forward");
    println!("pass_netfilter +{passed}, reply_netfilter +{replied}, ct invalid {invalid}");
    assert!(
        passed > 100 && replied >= 42,
        "through the kernel: {passed} / {replied}"
    );
    assert!(
        invalid * 100 <= passed,
        "conntrack saw both directions: {invalid} invalid of {passed}"
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
