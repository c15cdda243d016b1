//! `cargo xtask demo`: the EKS-like lab from nothing, lb-agent on node1, traffic, the
//! distribution and counters as they change, a backend drained mid-stream, clean-up.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use lb_tests::{
    agent::{AgentOptions, AgentProcess, Bpffs},
    lab::Lab,
    traffic::{Batch, LongTransfer, Proto, serve_pods},
};

const PORT: u16 = 8080;

fn config(weights: [u32; 4]) -> String {
    let pods = ["10.1.1.2", "10.1.1.3", "10.1.2.2", "10.1.2.3"];
    let backends: Vec<String> = pods
        .iter()
        .zip(weights)
        .map(|(a, w)| format!("  {{ address = \"{a}\", port = {PORT}, weight = {w} }},"))
        .collect();
    let backends = backends.join("\n");
    format!(
        r#"# The demo's config: one VIP, TCP and UDP, over two pods on this node and two on node2.
[node]
hash-seed = 42

[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
protocol = "tcp"
backends = [
{backends}
]

[[services]]
name = "dns"
vip = "10.96.0.10"
port = 53
protocol = "udp"
backends = [
{backends}
]
"#
    )
}

fn main() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and attaches XDP programs: run it as root");
    }
    let started = Instant::now();
    banner("1. The lab: an EKS-like node pair in network namespaces");
    let bpffs = Bpffs::mount("demo")?;
    let lab = Lab::build("demo")?;
    println!(
        "client  {:?} (several addresses, like many NLB clients)",
        lab.client().ipv4
    );
    println!(
        "node1   {} uplink eth0 — runs lb-agent; pods {}",
        lab.node1().ipv4,
        pod_list(&lab, "node1")
    );
    println!(
        "node2   {} — pods {} (reachable by routing, as with the VPC CNI)",
        lab.node2().ipv4,
        pod_list(&lab, "node2")
    );
    let servers = serve_pods(lab.pods(), PORT)?;
    println!(
        "each pod runs a TCP/UDP server on :{PORT} that answers with its name and the address it saw"
    );
    println!("built in {:.1?}", lab.build_time());

    banner("2. lb-agent on node1, VIP 10.96.0.10 (web: tcp/80, dns: udp/53), weights 1:1:2:1");
    let weights = [1, 1, 2, 1];
    let mut agent = AgentProcess::start(
        &lab.node1().ns,
        &bpffs,
        &config(weights),
        AgentOptions::default(),
    )?;
    print!("{}", agent.status_text()?);

    banner("3. Traffic: rounds of 300 TCP connections and 300 UDP exchanges from the client");
    for round in 1..=3 {
        let tcp = drive(&lab, Proto::Tcp, 80, 300)?;
        let udp = drive(&lab, Proto::Udp, 53, 300)?;
        println!(
            "round {round}: tcp {}/300 ok, udp {}/300 ok; per backend: {:?}",
            tcp.ok,
            udp.ok,
            merged(&tcp, &udp)
        );
    }
    print!("{}", agent.status_text()?);

    banner("4. A long TCP transfer, and pod3 drained (weight 0) while it runs");
    let transfer = LongTransfer::start(&lab.client().ns, None, "10.96.0.10:80".parse()?)?;
    println!("transfer served by {}", transfer.backend());
    std::thread::sleep(Duration::from_millis(500));
    agent.set_config(&config([1, 1, 0, 1]))?;
    println!("pod3 drained: new flows avoid it, live flows keep their backend");
    let tcp = drive(&lab, Proto::Tcp, 80, 300)?;
    println!("300 new connections: {:?}", tcp.per_backend);
    let report = transfer.finish();
    println!(
        "transfer: {} bytes to {}, {}",
        report.bytes_sent,
        report.backend,
        if report.is_clean() {
            "no reset, every byte arrived"
        } else {
            "BROKEN"
        }
    );
    let flow = agent.flow("tcp", "10.0.0.10:40000", "10.96.0.10:80")?;
    println!(
        "lb-agent flow tcp 10.0.0.10:40000 10.96.0.10:80 -> {} ({}: {})",
        flow["backend"], flow["reason"], flow["detail"]
    );
    print!("{}", agent.status_text()?);

    banner("5. Clean-up");
    agent.stop()?;
    drop(agent);
    drop(servers);
    drop(lab);
    drop(bpffs);
    println!("agent stopped (programs detached, pins removed), namespaces deleted");
    println!("demo took {:.0?}", started.elapsed());
    Ok(())
}

fn drive(
    lab: &Lab,
    proto: Proto,
    port: u16,
    count: usize,
) -> Result<lb_tests::traffic::BatchReport> {
    let dst = SocketAddr::new("10.96.0.10".parse()?, port);
    Batch::new(proto, dst, lab.client().sources_for(dst.ip()), count).run(&lab.client().ns)
}

fn merged(
    a: &lb_tests::traffic::BatchReport,
    b: &lb_tests::traffic::BatchReport,
) -> std::collections::BTreeMap<String, usize> {
    let mut m = a.per_backend.clone();
    for (k, v) in &b.per_backend {
        *m.entry(k.clone()).or_default() += v;
    }
    m
}

fn pod_list(lab: &Lab, node: &str) -> String {
    lab.pods()
        .iter()
        .filter(|p| p.node.name() == node)
        .map(|p| format!("{} {}", p.name, p.ipv4))
        .collect::<Vec<_>>()
        .join(", ")
}

fn banner(what: &str) {
    println!("\n=== {what}");
}
