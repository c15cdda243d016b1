//! End to end, rate limiting: real traffic in the lab through lb-agent on node1. A client
//! flooding one service is held to its policy's rate, counted at the backend, while another
//! client's connections all succeed; and a flood with a new spoofed source in every packet,
//! which fills the source table, does not stop a client that is already talking.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use lb_tests::{
    agent::{AgentOptions, AgentProcess, Bpffs},
    flood::{spoofed_udp_flood, udp_flood},
    lab::Lab,
    netns::require_root,
    traffic::{BackendServer, Batch, Proto, serve_pods},
};

const VIP: &str = "10.96.0.10";
const API_VIP: &str = "10.96.0.30";
const PORT: u16 = 8080;

/// `web` (TCP, VIP:80) and `dns` (UDP, VIP:53) over the four pods under the node default
/// `clients`; `api` (UDP, API_VIP:5300) on pod1 only, under the tight policy `api`.
fn config(table_full: &str) -> String {
    let pods = ["10.1.1.2", "10.1.1.3", "10.1.2.2", "10.1.2.3"];
    let backends = pods
        .iter()
        .map(|a| format!("  {{ address = \"{a}\", port = {PORT} }},"))
        .collect::<Vec<_>>()
        .join("\n");
    format!(
        r#"
[node]
hash-seed = 42
rate-limit = "clients"

[rate-limits.clients]
packets-per-second = 20000
packets-burst = 2000
connections-per-second = 2000
connections-burst = 500
table-full = "{table_full}"

[rate-limits.api]
packets-per-second = 1000
packets-burst = 100

[[services]]
name = "web"
vip = "{VIP}"
port = 80
protocol = "tcp"
backends = [
{backends}
]

[[services]]
name = "dns"
vip = "{VIP}"
port = 53
protocol = "udp"
backends = [
{backends}
]

[[services]]
name = "api"
vip = "{API_VIP}"
port = 5300
protocol = "udp"
rate-limit = "api"
backends = [{{ address = "10.1.1.2", port = {PORT} }}]
"#
    )
}

struct Setup {
    agent: AgentProcess,
    servers: Vec<BackendServer>,
    lab: Lab,
    _bpffs: Bpffs,
}

fn setup(name: &str, config: &str, extra: &[&str]) -> Setup {
    let bpffs = Bpffs::mount(name).expect("bpffs");
    let lab = Lab::build(name).expect("lab");
    let servers = serve_pods(lab.pods(), PORT).expect("servers");
    let options = AgentOptions {
        extra: extra.iter().map(std::string::ToString::to_string).collect(),
        ..AgentOptions::default()
    };
    let agent = AgentProcess::start(&lab.node1().ns, &bpffs, config, options).expect("agent");
    Setup {
        agent,
        servers,
        lab,
        _bpffs: bpffs,
    }
}

fn client_ip(i: usize, s: &Setup) -> IpAddr {
    IpAddr::V4(s.lab.client().ipv4[i])
}

fn counter(status: &serde_json::Value, name: &str) -> u64 {
    status["counters"][name].as_u64().unwrap_or(0)
}

#[test]
fn a_flooding_client_is_held_to_its_rate_while_another_clients_connections_all_succeed() {
    if !require_root() {
        return;
    }
    let s = setup("rl-flood", &config("fail-closed"), &[]);
    let flooder = client_ip(1, &s);
    let polite = client_ip(0, &s);
    let api: SocketAddr = (API_VIP.parse::<IpAddr>().unwrap(), 5300).into();
    let web: SocketAddr = (VIP.parse::<IpAddr>().unwrap(), 80).into();
    let pod1 = &s.servers[0];
    assert_eq!(pod1.name(), "pod1");
    let before = pod1.stats().udp_requests;

    // 10 times the rate for 3 s, while the other client makes 200 connections to `web`.
    let (flood, polite_report) = std::thread::scope(|scope| {
        let client = &s.lab.client().ns;
        let flood = scope.spawn(|| udp_flood(client, flooder, api, 10_000, Duration::from_secs(3)));
        std::thread::sleep(Duration::from_millis(300));
        let polite_report = Batch::new(Proto::Tcp, web, vec![polite], 200)
            .concurrency(2)
            .deadline(Duration::from_secs(30))
            .run(client)
            .expect("polite batch");
        (
            flood.join().expect("flood thread").expect("flood"),
            polite_report,
        )
    });
    assert!(
        polite_report.all_ok(),
        "the polite client's connections: {} of 200 failed, e.g. {:?}",
        polite_report.error_count,
        polite_report.errors
    );
    // The server answers what got through; let the last datagrams arrive.
    std::thread::sleep(Duration::from_millis(300));
    let admitted = pod1.stats().udp_requests - before;
    let expected = 1000.0 * flood.elapsed.as_secs_f64() + 100.0;
    assert!(
        flood.rate() > 5.0 * 1000.0,
        "the flood ({:.0}/s) must be well over the rate to test it",
        flood.rate()
    );
    let error = (admitted as f64 - expected) / expected;
    eprintln!(
        "flood: {} sent in {:?} ({:.0}/s); admitted {admitted}, expected {expected:.0} ({:+.1}%)",
        flood.sent,
        flood.elapsed,
        flood.rate(),
        100.0 * error
    );
    assert!(
        error.abs() <= 0.10,
        "admitted {admitted}, expected {expected:.0} (rate 1000/s over {:?} + burst 100)",
        flood.elapsed
    );

    // Counted per service and reason, and the flooder tops the most-limited sources.
    let status = s.agent.status().expect("status");
    let api_status = status["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|svc| svc["name"] == "api")
        .expect("api in status")
        .clone();
    let dropped = api_status["drops"]["rate"].as_u64().unwrap_or(0);
    assert!(
        dropped + admitted >= flood.sent * 9 / 10,
        "drops by reason `rate` ({dropped}) and admitted ({admitted}) account for the flood ({} sent)",
        flood.sent
    );
    let top = &status["limited_sources"][0];
    assert_eq!(top["source"], flooder.to_string(), "{status:#}");
    assert_eq!(top["policy"], "api");
    let text = s.agent.status_text().expect("status");
    assert!(text.contains("most-limited sources"), "{text}");
}

#[test]
fn a_spoofed_source_flood_that_fills_the_source_table_does_not_stop_a_talking_client() {
    if !require_root() {
        return;
    }
    // Room for 256 sources; fail-closed: sources beyond share one bucket.
    let s = setup(
        "rl-spoof",
        &config("fail-closed"),
        &["--source-entries", "256"],
    );
    let polite = client_ip(0, &s);
    let web: SocketAddr = (VIP.parse::<IpAddr>().unwrap(), 80).into();
    let dns: SocketAddr = (VIP.parse::<IpAddr>().unwrap(), 53).into();
    // 65536 sources in 10.200.0.0/16, a range that exists nowhere but in these frames.
    let spoofed: Vec<Ipv4Addr> = (0..65536u32)
        .map(|i| Ipv4Addr::from(0x0ac8_0000 | i))
        .collect();
    let client = s.lab.client();
    let macs = (client.mac, s.lab.node1().uplink_mac);

    let (flood, rounds) = std::thread::scope(|scope| {
        // The client talks before, during and after the flood: 15 rounds of 10 connections.
        let talker = scope.spawn(|| {
            (0..15)
                .map(|_| {
                    // A dropped SYN is retransmitted after 1 s: a connection held up by
                    // the limiter fails this timeout instead of succeeding late.
                    let r = Batch::new(Proto::Tcp, web, vec![polite], 10)
                        .concurrency(2)
                        .request_timeout(Duration::from_millis(800))
                        .deadline(Duration::from_secs(10))
                        .run(&client.ns)
                        .expect("batch");
                    std::thread::sleep(Duration::from_millis(200));
                    r
                })
                .collect::<Vec<_>>()
        });
        std::thread::sleep(Duration::from_millis(700));
        let flood = spoofed_udp_flood(
            &client.ns,
            "eth0",
            macs,
            &spoofed,
            dns,
            20_000,
            // Longer than a sweep interval (2 s in these tests).
            Duration::from_secs(3),
        )
        .expect("flood");
        (flood, talker.join().expect("talker"))
    });
    let failed: usize = rounds.iter().map(|r| r.error_count + r.not_started).sum();
    let errors: Vec<&String> = rounds.iter().flat_map(|r| &r.errors).collect();
    eprintln!(
        "spoofed flood: {} frames in {:?} ({:.0}/s); talker: {} of 150 failed",
        flood.sent,
        flood.elapsed,
        flood.rate(),
        failed
    );
    // The flood did fill the table, and what came beyond it was limited, not let through.
    let status = s.agent.status().expect("status");
    assert_eq!(
        failed, 0,
        "the talking client was stopped: {errors:?}\ncounters: {}\nservices: {}",
        status["counters"], status["services"]
    );
    let full = counter(&status, "source_table_full");
    assert!(
        full > flood.sent / 2,
        "the flood must overflow the table: {full} of {} packets found it full",
        flood.sent
    );
    let table_full_drops: u64 = status["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|svc| svc["drops"]["table_full"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        table_full_drops > flood.sent / 2,
        "sources beyond capacity share one bucket (fail-closed): {table_full_drops} dropped of {} sent",
        flood.sent
    );
    assert!(
        status["tracked_sources"].as_u64().unwrap_or(0) <= 256,
        "{status:#}"
    );
}
