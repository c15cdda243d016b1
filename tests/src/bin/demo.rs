//! `cargo xtask demo`: the EKS-like lab from nothing, lb-agent on node1, traffic, the
//! distribution and counters as they change, a backend drained mid-stream, a flooding client
//! held to its rate while another is served, clean-up.
// A test reads top to bottom as the scenario it checks; splitting it would only scatter it.
#![allow(clippy::too_many_lines, reason = "test scenarios, see above")]
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use lb_tests::{
    agent::{AgentOptions, AgentProcess, Bpffs},
    flood::udp_flood,
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
        r#"# The demo's config: one VIP, TCP and UDP, over two pods on this node and two on node2;
# an `api` service on pod1 with a tight per-source rate limit.
[node]
hash-seed = 42
rate-limit = "clients"           # every service without its own policy

[rate-limits.clients]
packets-per-second = 20000
packets-burst = 2000
connections-per-second = 2000
connections-burst = 500

[rate-limits.api]
packets-per-second = 1000
packets-burst = 100

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

[[services]]
name = "api"
vip = "10.96.0.30"
port = 5300
protocol = "udp"
rate-limit = "api"
backends = [{{ address = "10.1.1.2", port = {PORT} }}]
"#
    )
}

fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and attaches XDP programs: run it as root");
    }
    let started = Instant::now();
    let mut checks = Checks::default();
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
        let spread = merged(&tcp, &udp);
        println!(
            "round {round}: tcp {}/300 ok, udp {}/300 ok; per backend: {spread:?}",
            tcp.ok, udp.ok,
        );
        checks.check(
            &format!("round {round}: every TCP connection and UDP exchange answered"),
            tcp.ok == 300 && udp.ok == 300,
        );
        // Weights 1:1:2:1: pod3 takes about two fifths, each other pod about one fifth.
        let share = |pod: &str| spread.get(pod).copied().unwrap_or(0) as f64 / 600.0;
        checks.check(
            &format!("round {round}: spread by weight (pod3 0.3-0.5, the others 0.1-0.3 each)"),
            (0.3..=0.5).contains(&share("pod3"))
                && ["pod1", "pod2", "pod4"]
                    .iter()
                    .all(|p| (0.1..=0.3).contains(&share(p))),
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
    checks.check(
        "after the drain: every new connection answered, none by pod3",
        tcp.ok == 300 && !tcp.per_backend.contains_key("pod3"),
    );
    let served_by = transfer.backend().to_string();
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
    checks.check(
        "the long transfer kept its backend through the drain and reload, every byte arrived",
        report.is_clean() && report.backend == served_by,
    );
    let flow = agent.flow("tcp", "10.0.0.10:40000", "10.96.0.10:80")?;
    println!(
        "lb-agent flow tcp 10.0.0.10:40000 10.96.0.10:80 -> {} ({}: {})",
        flow["backend"], flow["reason"], flow["detail"]
    );
    checks.check(
        "lb-agent flow names a backend, not the drained pod3 (10.1.2.2)",
        flow["backend"]
            .as_str()
            .is_some_and(|b| !b.is_empty() && !b.starts_with("10.1.2.2:")),
    );
    print!("{}", agent.status_text()?);

    banner(
        "5. Rate limiting: 10.0.0.11 floods api (udp 10.96.0.30:5300, 1000/s per source) at 10000/s for 3 s while 10.0.0.10 opens 200 connections to web",
    );
    let pod1 = &servers[0];
    let before = pod1.stats().udp_requests;
    let client = &lab.client().ns;
    let flooder = lab.client().sources_for("10.0.0.1".parse()?)[1];
    let polite = lab.client().sources_for("10.0.0.1".parse()?)[0];
    let (flood, polite_report) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            udp_flood(
                client,
                flooder,
                "10.96.0.30:5300".parse().expect("address"),
                10_000,
                Duration::from_secs(3),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        let polite_report = Batch::new(
            Proto::Tcp,
            "10.96.0.10:80".parse().expect("address"),
            vec![polite],
            200,
        )
        .concurrency(2)
        .run(client);
        (flood.join(), polite_report)
    });
    let flood = flood.map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
    let polite_report = polite_report?;
    std::thread::sleep(Duration::from_millis(300));
    let admitted = pod1.stats().udp_requests - before;
    println!(
        "flood: {} datagrams sent; pod1 got {admitted} (the rate allows {:.0}: 1000/s for {:.1?} + a burst of 100)",
        flood.sent,
        1000.0 * flood.elapsed.as_secs_f64() + 100.0,
        flood.elapsed
    );
    println!("the other client: {}/200 connections ok", polite_report.ok);
    // What the bucket allows over the flood's time, and what arrives: at most that (a little
    // over for the clock's granularity), and most of it (the limit must not starve the source).
    let allowed = 1000.0 * flood.elapsed.as_secs_f64() + 100.0;
    let admitted = admitted as f64;
    checks.check(
        "the flooding source held to its rate: pod1 got at most 105% and at least 80% of it",
        admitted <= allowed * 1.05 && admitted >= allowed.min(flood.sent as f64) * 0.8,
    );
    checks.check(
        "the other client unaffected: 200/200 connections",
        polite_report.ok == 200,
    );
    print!("{}", agent.status_text()?);

    banner("6. Clean-up");
    agent.stop()?;
    drop(agent);
    drop(servers);
    drop(lab);
    drop(bpffs);
    println!("agent stopped (programs detached, pins removed), namespaces deleted");
    println!("demo took {:.0?}", started.elapsed());
    checks.verdict()
}

/// What the demo shows, judged: each claim it prints is checked, and the demo fails if one
/// does not hold.
#[derive(Default)]
struct Checks {
    failed: Vec<String>,
    passed: usize,
}

impl Checks {
    fn check(&mut self, what: &str, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            println!("FAILED: {what}");
            self.failed.push(what.to_string());
        }
    }

    fn verdict(self) -> Result<()> {
        let total = self.passed + self.failed.len();
        if self.failed.is_empty() {
            println!("\ndemo: all {total} checks passed");
            return Ok(());
        }
        bail!(
            "demo: {} of {total} checks failed:\n- {}",
            self.failed.len(),
            self.failed.join("\n- ")
        )
    }
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
