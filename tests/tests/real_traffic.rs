//! End to end with traffic shaped as users' traffic: nginx in the pods with the kernel's default
//! offloads (TSO/GSO on at the pod's eth0, so responses leave the pod as super-packets), curl in
//! the client with default settings, and the agent binary on node1. Large transfers both ways,
//! connection churn where the server closes first, one client tuple reconnecting, the uplink's
//! carrier flapping and its neighbours flushed during traffic, and /metrics in both exposition
//! formats checked by promtool and a strict OpenMetrics parser. Each test builds its own lab and
//! prints what it measured. The programs come from Debian packages (`cargo xtask setup`).
// A test reads top to bottom as the scenario it checks; splitting it would only scatter it.
#![allow(clippy::too_many_lines, reason = "test scenarios, see above")]
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    process::Stdio,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{AgentOptions, AgentProcess, Bpffs},
    lab::{Lab, POD_IFACE},
    netns::{Netns, require_root},
    openmetrics,
    programs::{
        Capture, CurlResult, Nginx, Proc, TempDir, curl, http_base, mib, offloads, read_pcap,
        require_programs, run, run_ok, sha256_file, syn_answers, write_random_file,
    },
};

/// Where nginx listens in every pod (services map port 80 to it).
const POD_PORT: u16 = 8080;
const MIB: u64 = 1 << 20;
/// Size of each large transfer.
const TRANSFER_BYTES: u64 = 64 * MIB;
/// The time bound of one large transfer, generous for a loaded 2-core machine: 64 MiB within
/// 60 s is 1.1 MB/s, about a hundredth of what the lab moves when nothing is wrong.
const TRANSFER_LIMIT: Duration = Duration::from_secs(60);
/// No stall: curl gives up when the rate stays under 1 MiB/s for 5 s.
const STALL_RATE: &str = "1048576";
const STALL_SECONDS: &str = "5";
/// The MTU of every lab link: a frame longer than this plus the Ethernet header is a TSO/GSO
/// super-packet.
const MTU: u32 = 1500;

/// The lab, the agent on node1, and nginx in some pods.
struct Setup {
    // Field order is drop order: agent, servers, lab.
    agent: AgentProcess,
    nginx: BTreeMap<String, Nginx>,
    lab: Lab,
    _bpffs: Bpffs,
}

impl Setup {
    /// The lab, nginx in `pods`, and the agent with the config `config` writes for this lab.
    fn new(
        name: &str,
        pods: &[&str],
        keepalive: bool,
        config: impl FnOnce(&Lab) -> String,
    ) -> Setup {
        require_programs(&["nginx", "curl", "tcpdump", "ethtool", "promtool", "timeout"])
            .expect("programs");
        let started = Instant::now();
        let bpffs = Bpffs::mount(name).expect("bpffs");
        let lab = Lab::build(name).expect("lab");
        eprintln!("{name}: lab built in {:.1?}", lab.build_time());
        let mut nginx = BTreeMap::new();
        for pod in pods {
            let ns = &lab.pod(pod).expect("pod").ns;
            let server = Nginx::start(ns, pod, POD_PORT, keepalive).expect("nginx");
            nginx.insert(pod.to_string(), server);
        }
        let config = config(&lab);
        let agent = AgentProcess::start(&lab.node1().ns, &bpffs, &config, AgentOptions::default())
            .expect("agent");
        eprintln!(
            "{name}: lab, nginx and agent ready in {:.1?}",
            started.elapsed()
        );
        Setup {
            agent,
            nginx,
            lab,
            _bpffs: bpffs,
        }
    }

    fn client(&self) -> &Netns {
        &self.lab.client().ns
    }

    fn pod_ns(&self, pod: &str) -> &Netns {
        &self.lab.pod(pod).expect("pod").ns
    }

    /// The agent's node-wide counters that are not zero, and each service's drops.
    fn counters(&self) -> String {
        let Ok(status) = self.agent.status() else {
            return "(no status)".into();
        };
        let mut s = String::new();
        if let Some(counters) = status["counters"].as_object() {
            let nonzero: Vec<String> = counters
                .iter()
                .filter(|(_, v)| v.as_u64().unwrap_or(0) != 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(s, "node counters: {}", nonzero.join(" "));
        }
        for svc in status["services"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "service {}: new_flows={} drops={}",
                svc["name"], svc["new_flows"], svc["drops"]
            );
        }
        s
    }

    fn service(&self, name: &str) -> serde_json::Value {
        let status = self.agent.status().expect("status");
        status["services"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no service {name} in {status}"))
    }
}

fn service(name: &str, vip: &str, mode: &str, backends: &[&str]) -> String {
    let backends: Vec<String> = backends
        .iter()
        .map(|b| format!("  {{ address = \"{b}\", port = {POD_PORT}, weight = 1 }},"))
        .collect();
    format!(
        "\n[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\n\
         mode = \"{mode}\"\nbackends = [\n{}\n]\n",
        backends.join("\n")
    )
}

fn config(services: &[String]) -> String {
    format!("[node]\nhash-seed = 7\n{}", services.concat())
}

fn url(vip: &str, path: &str) -> String {
    let ip: IpAddr = vip.parse().expect("vip");
    format!("{}{path}", http_base(SocketAddr::new(ip, 80)))
}

// ---------------------------------------------------------------------------------------------
// 1. Large transfers

/// One way through the load balancer to one pod.
struct Route {
    service: &'static str,
    vip: &'static str,
    pod: &'static str,
    mode: &'static str,
    /// "local" (node1's pod) or "remote" (node2's pod).
    place: &'static str,
}

/// Every (mode, place, family) the agent serves: snat to local and remote pods, and
/// preserve-client-ip to local pods (the agent refuses remote ones).
const ROUTES: &[Route] = &[
    Route {
        service: "snat-local",
        vip: "10.96.0.21",
        pod: "pod1",
        mode: "snat",
        place: "local",
    },
    Route {
        service: "snat-remote",
        vip: "10.96.0.22",
        pod: "pod3",
        mode: "snat",
        place: "remote",
    },
    Route {
        service: "keep-local",
        vip: "10.96.0.23",
        pod: "pod2",
        mode: "preserve-client-ip",
        place: "local",
    },
    Route {
        service: "snat-local6",
        vip: "fd00:96::21",
        pod: "pod1",
        mode: "snat",
        place: "local",
    },
    Route {
        service: "snat-remote6",
        vip: "fd00:96::22",
        pod: "pod3",
        mode: "snat",
        place: "remote",
    },
    Route {
        service: "keep-local6",
        vip: "fd00:96::23",
        pod: "pod2",
        mode: "preserve-client-ip",
        place: "local",
    },
];

fn transfer_setup(name: &str) -> Setup {
    Setup::new(name, &["pod1", "pod2", "pod3"], true, |lab| {
        let services: Vec<String> = ROUTES
            .iter()
            .map(|r| {
                let pod = pod_address(lab, r.pod, r.vip.contains(':'));
                service(r.service, r.vip, r.mode, &[&pod])
            })
            .collect();
        config(&services)
    })
}

/// A pod's address of one family, as the config names it.
fn pod_address(lab: &Lab, pod: &str, v6: bool) -> String {
    lab.pod(pod).expect("pod").ip(v6).to_string()
}

/// The row a transfer adds to the test's table, and whether it passed.
fn transfer_row(route: &Route, result: &CurlResult, hash_ok: bool, extra: &str) -> (String, bool) {
    let ok = result.ok() && result.bytes == TRANSFER_BYTES && hash_ok;
    let rate = result.bytes as f64 / result.seconds.max(1e-6) / 1e6;
    let row = format!(
        "{:<13} {:<18} {:<6} {:<4} {:>9} B {:>6.2} s {:>8.1} MB/s  {:<6} {}{}",
        route.service,
        route.mode,
        route.place,
        route.pod,
        result.bytes,
        result.seconds,
        rate,
        if ok { "ok" } else { "FAILED" },
        if result.ok() {
            if hash_ok {
                "sha256 equal".to_string()
            } else {
                "sha256 DIFFERS".to_string()
            }
        } else {
            format!(
                "curl exit {} http {}: {}",
                result.exit_code, result.http_code, result.error
            )
        },
        extra
    );
    (row, ok)
}

/// Client -> pod: curl uploads a 64 MiB file with `PUT` to nginx (WebDAV) through each route;
/// the file nginx stored must hash as the one sent, within the time bound and without a stall.
#[test]
fn large_uploads_to_local_and_remote_pods_arrive_whole_in_every_mode_and_family() {
    if !require_root() {
        return;
    }
    let s = transfer_setup("rt-up");
    let dir = TempDir::new("rt-up").expect("temp dir");
    let blob = dir.join("blob");
    write_random_file(&blob, usize::try_from(TRANSFER_BYTES).unwrap(), 0x5eed_0001).expect("blob");
    let want = sha256_file(&blob).expect("hash");
    let blob_arg = blob.display().to_string();
    let mut rows = Vec::new();
    let mut failed = 0;
    for route in ROUTES {
        let target = url(route.vip, &format!("/upload/{}", route.service));
        let (results, stderr) = curl(
            s.client(),
            TRANSFER_LIMIT + Duration::from_secs(10),
            &[
                "--fail",
                "-o",
                "/dev/null",
                "-T",
                &blob_arg,
                "--max-time",
                &TRANSFER_LIMIT.as_secs().to_string(),
                "--speed-limit",
                STALL_RATE,
                "--speed-time",
                STALL_SECONDS,
                &target,
            ],
            true,
        )
        .expect("curl");
        let result = results.into_iter().next().unwrap_or_else(|| CurlResult {
            exit_code: -1,
            error: stderr,
            ..CurlResult::default()
        });
        let stored = s.nginx[route.pod].uploaded(route.service);
        let hash_ok = result.ok() && sha256_file(&stored).is_ok_and(|h| h == want);
        let (row, ok) = transfer_row(route, &result, hash_ok, "");
        eprintln!("upload   {row}");
        rows.push(row);
        failed += usize::from(!ok);
    }
    assert!(
        failed == 0,
        "{failed} of {} uploads failed:\n{}\n{}",
        ROUTES.len(),
        rows.join("\n"),
        s.counters()
    );
}

/// Pod -> client: curl downloads a 64 MiB file from nginx through each route. nginx sends it
/// with sendfile from a pod whose eth0 has TSO and GSO on (checked), so it leaves the pod as
/// super-packets of up to 64 KiB (captured at the pod: packets longer than the MTU); they must
/// arrive whole, within the time bound and without a stall.
#[test]
fn large_downloads_from_local_and_remote_pods_arrive_whole_in_every_mode_and_family() {
    if !require_root() {
        return;
    }
    let s = transfer_setup("rt-down");
    let dir = TempDir::new("rt-down").expect("temp dir");
    let blob = dir.join("blob");
    write_random_file(&blob, usize::try_from(TRANSFER_BYTES).unwrap(), 0x5eed_0002).expect("blob");
    let want = sha256_file(&blob).expect("hash");
    for server in s.nginx.values() {
        server.add_file(&blob, "blob").expect("serve blob");
    }
    // The pods keep the kernel's defaults: nothing here (nor the lab) turns offloads off there.
    for pod in ["pod1", "pod2", "pod3"] {
        let k = offloads(s.pod_ns(pod), POD_IFACE).expect("ethtool -k");
        let show = |f: &str| format!("{f}={}", k.get(f).map_or("?", String::as_str));
        eprintln!(
            "{pod} eth0: {} {} {} {}",
            show("tcp-segmentation-offload"),
            show("generic-segmentation-offload"),
            show("generic-receive-offload"),
            show("tx-checksumming")
        );
        for f in ["tcp-segmentation-offload", "generic-segmentation-offload"] {
            assert_eq!(
                k.get(f).map(String::as_str),
                Some("on"),
                "{pod}: {f} must be on (the default), or this test does not send super-packets"
            );
        }
    }
    downloads(&s, &dir, &want, &ROUTES.iter().collect::<Vec<_>>());
}

/// Downloads `dir`/blob (hashing `want`) through each of `routes` with curl, from pods that
/// must send it as TSO/GSO super-packets; fails with a table of what went wrong.
fn downloads(s: &Setup, dir: &TempDir, want: &str, routes: &[&Route]) {
    let n = routes.len();
    let mut rows = Vec::new();
    let mut failed = 0;
    for route in routes {
        let target = url(route.vip, "/files/blob");
        let out = dir.join(&format!("got-{}", route.service));
        let out_arg = out.display().to_string();
        // Packets longer than the MTU leaving nginx: the pod's TSO/GSO super-packets.
        let capture = Capture::start(
            s.pod_ns(route.pod),
            POD_IFACE,
            &format!("tcp src port {POD_PORT} and greater {}", MTU + 15),
            dir,
            &format!("tso-{}", route.service),
        )
        .expect("tcpdump");
        let (results, stderr) = curl(
            s.client(),
            TRANSFER_LIMIT + Duration::from_secs(10),
            &[
                "--fail",
                "-o",
                &out_arg,
                "--max-time",
                &TRANSFER_LIMIT.as_secs().to_string(),
                "--speed-limit",
                STALL_RATE,
                "--speed-time",
                STALL_SECONDS,
                &target,
            ],
            false,
        )
        .expect("curl");
        let (stats, pcap) = capture.stop().expect("tcpdump stop");
        let big = read_pcap(&pcap).expect("pcap");
        let largest = big.iter().map(|p| p.wire_len).max().unwrap_or(0);
        let result = results.into_iter().next().unwrap_or_else(|| CurlResult {
            exit_code: -1,
            error: stderr,
            ..CurlResult::default()
        });
        let hash_ok = result.ok() && sha256_file(&out).is_ok_and(|h| h == want);
        let (row, ok) = transfer_row(
            route,
            &result,
            hash_ok,
            &format!(
                "; pod sent {} packets > MTU (largest {largest} B)",
                stats.captured
            ),
        );
        eprintln!("download {row}");
        rows.push(row);
        failed += usize::from(!ok);
        assert!(
            stats.captured > 0,
            "{}: the pod sent no packet longer than the MTU: TSO/GSO did not happen, so this \
             download does not test what users' pods send",
            route.service
        );
        let _ = std::fs::remove_file(&out);
    }
    assert!(
        failed == 0,
        "{failed} of {} downloads failed:\n{}\n{}",
        n,
        rows.join("\n"),
        s.counters()
    );
}

/// Local pods delivered through netfilter (`policy-hooks = "respect"`, with kube-proxy's
/// conntrack rule on node1's forward path, counted): 64 MiB downloads from pods that send
/// TSO/GSO super-packets arrive whole in both modes and families (the replies go through the
/// kernel's forwarding, and `lb_uplink_out` translates them at the uplink's egress, segments and
/// partial checksums included), 500 short connections where the server closes first all
/// succeed, and conntrack takes none of it for INVALID.
#[test]
fn local_pods_delivered_through_netfilter_serve_large_downloads_and_short_connections() {
    if !require_root() {
        return;
    }
    let local: Vec<&Route> = ROUTES.iter().filter(|r| r.place == "local").collect();
    let s = Setup::new("rt-nf", &["pod1", "pod2"], false, |lab| {
        let services: Vec<String> = local
            .iter()
            .map(|r| {
                let pod = pod_address(lab, r.pod, r.vip.contains(':'));
                service(r.service, r.vip, r.mode, &[&pod])
            })
            .collect();
        format!(
            "[node]\nhash-seed = 7\npolicy-hooks = \"respect\"\n{}",
            services.concat()
        )
    });
    let node = &s.lab.node1().ns;
    run_ok(
        node,
        Duration::from_secs(10),
        "nft",
        &["add table inet kp { chain forward { type filter hook forward priority 0; ct state invalid counter drop; }; }"],
    )
    .expect("nft");
    // Both pods' veths `netfilter`, and a little over the data path's next-hop cache's life.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = s.agent.status().expect("status");
        let deliveries: Vec<String> = status["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["delivery"].as_str().map(str::to_string))
            .collect();
        if deliveries.len() >= 2 && deliveries.iter().all(|d| d == "netfilter") {
            break;
        }
        assert!(Instant::now() < deadline, "deliveries {deliveries:?}");
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(Duration::from_millis(1200));

    let dir = TempDir::new("rt-nf").expect("temp dir");
    let blob = dir.join("blob");
    write_random_file(&blob, usize::try_from(TRANSFER_BYTES).unwrap(), 0x5eed_0003).expect("blob");
    let want = sha256_file(&blob).expect("hash");
    for server in s.nginx.values() {
        server.add_file(&blob, "blob").expect("serve blob");
    }
    downloads(&s, &dir, &want, &local);

    let (results, stderr) = curl(
        s.client(),
        Duration::from_secs(120),
        &[
            "--parallel",
            "--parallel-max",
            "8",
            "--connect-timeout",
            "5",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            &url(local[0].vip, "/small?n=[1-500]"),
        ],
        false,
    )
    .expect("curl");
    let ok = results.iter().filter(|r| r.ok()).count();
    let connections: u64 = results.iter().map(|r| u64::from(r.connects)).sum();
    let status = s.agent.status().expect("status");
    let counter = |name: &str| status["counters"][name].as_u64().unwrap_or(0);
    let (passed, replied) = (counter("pass_netfilter"), counter("reply_netfilter"));
    let out = run(
        node,
        Duration::from_secs(10),
        "nft",
        &["list", "chain", "inet", "kp", "forward"],
    )
    .expect("nft list");
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let words: Vec<&str> = listing.split_whitespace().collect();
    let invalid: u64 = words
        .windows(2)
        .filter(|w| w[0] == "packets")
        .filter_map(|w| w[1].parse::<u64>().ok())
        .sum();
    eprintln!(
        "{ok} of {} short connections ok ({connections} connects); pass_netfilter {passed}, \
         reply_netfilter {replied}, conntrack INVALID {invalid}",
        results.len()
    );
    assert!(
        results.len() == 500 && ok == 500,
        "short connections through netfilter: {ok} of {} ok\n{stderr}\n{}",
        results.len(),
        s.counters()
    );
    assert!(
        passed > 2_500 && replied > 2_500,
        "both directions through the kernel: {passed} / {replied}"
    );
    assert!(
        invalid * 1000 <= passed,
        "conntrack saw both directions: {invalid} INVALID of {passed}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Connection churn

const CHURN_VIP: &str = "10.96.0.30";
/// Client addresses the churn comes from, and connections from each.
const CHURN_SOURCES: usize = 5;
const CHURN_PER_SOURCE: usize = 1000;
/// Connections each curl keeps open at once.
const CHURN_PARALLEL: &str = "8";

/// One snat service to one backend (pod3 on node2) where nginx closes every connection after
/// its response (`keepalive_timeout 0`: the server closes first and keeps TIME_WAIT).
fn churn_setup(name: &str) -> Setup {
    Setup::new(name, &["pod3"], false, |lab| {
        config(&[service(
            "churn",
            CHURN_VIP,
            "snat",
            &[&pod_address(lab, "pod3", false)],
        )])
    })
}

/// 5000 short connections (5 client addresses, 1000 each, 8 at a time per address) to one snat
/// backend whose server closes first. Counted:
/// - at the backend (tcpdump on pod3's eth0, no packet lost by the capture): every SYN and the
///   server's first answer to it. A SYN-ACK is a new connection; a bare ACK (no SYN) is what a
///   connection the server still holds on that tuple (TIME_WAIT) sends to a SYN it will not
///   accept: the snat port was handed out again too early. It must never happen.
/// - at the client: curl's result for every request (no error, no timeout) and its connection
///   count; the client's own SYN retransmissions (TcpExt TCPSynRetrans), each a second lost.
/// - at the agent: the service's new flows equal the connections made, and its drops are zero.
#[test]
fn connection_churn_through_snat_never_meets_a_time_wait_and_counts_each_connection_once() {
    if !require_root() {
        return;
    }
    let s = churn_setup("rt-churn");
    let dir = TempDir::new("rt-churn").expect("temp dir");
    let capture = Capture::start(
        s.pod_ns("pod3"),
        POD_IFACE,
        &format!("tcp port {POD_PORT}"),
        &dir,
        "churn",
    )
    .expect("tcpdump");
    let retrans_before = mib(s.client(), "TcpExt", "TCPSynRetrans").expect("mib");
    let started = Instant::now();
    let target = url(CHURN_VIP, &format!("/small?n=[1-{CHURN_PER_SOURCE}]"));
    let mut clients = Vec::new();
    for src in s.lab.client().ipv4.iter().take(CHURN_SOURCES) {
        let out = dir.join(&format!("curl-{src}.txt"));
        let file = std::fs::File::create(&out).expect("output file");
        let src = src.to_string();
        let proc = Proc::spawn(
            s.client(),
            Duration::from_secs(150),
            "curl",
            &[
                "-sS",
                "--parallel",
                "--parallel-immediate",
                "--parallel-max",
                CHURN_PARALLEL,
                "--interface",
                &src,
                "--connect-timeout",
                "5",
                "--max-time",
                "10",
                "-o",
                "/dev/null",
                "-w",
                lb_tests::programs::CURL_WRITE_OUT,
                &target,
            ],
            |c| {
                c.stdout(file).stderr(Stdio::null());
            },
        )
        .expect("curl");
        clients.push((proc, out));
    }
    let mut results = Vec::new();
    for (mut proc, out) in clients {
        proc.wait_for(Duration::from_secs(160)).expect("curl ends");
        let text = std::fs::read_to_string(&out).expect("curl output");
        for line in text.lines().filter(|l| !l.is_empty()) {
            results.push(CurlResult::parse(line, false).expect("curl -w line"));
        }
    }
    let elapsed = started.elapsed();
    let (stats, pcap) = capture.stop().expect("tcpdump stop");
    let retrans = mib(s.client(), "TcpExt", "TCPSynRetrans").expect("mib") - retrans_before;
    let answers = syn_answers(&read_pcap(&pcap).expect("pcap"), POD_PORT);

    let requests = results.len();
    let ok = results.iter().filter(|r| r.ok()).count();
    let timeouts = results.iter().filter(|r| r.exit_code == 28).count();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for r in results.iter().filter(|r| !r.ok()) {
        *errors
            .entry(format!(
                "exit {} http {} {}",
                r.exit_code, r.http_code, r.error
            ))
            .or_default() += 1;
    }
    let connections: u64 = results.iter().map(|r| u64::from(r.connects)).sum();
    let slow = results.iter().filter(|r| r.connect_seconds >= 1.0).count();
    let max_connect = results
        .iter()
        .map(|r| r.connect_seconds)
        .fold(0.0, f64::max);
    let svc = s.service("churn");
    let new_flows = svc["new_flows"].as_u64().unwrap_or(0);
    let drops: u64 = svc["drops"].as_object().map_or(0, |d| {
        d.values().filter_map(serde_json::Value::as_u64).sum()
    });
    let summary = format!(
        "{requests} requests in {elapsed:.1?} ({:.0}/s) from {CHURN_SOURCES} addresses: {ok} ok, \
         {timeouts} timeouts, errors {errors:?}; {connections} connections made; connects >= 1 s: \
         {slow} (slowest {max_connect:.3} s); client SYN retransmissions {retrans}\n\
         at the backend: {answers:?}; capture: {stats:?}\n\
         service churn: new_flows={new_flows} drops={}\n{}",
        requests as f64 / elapsed.as_secs_f64(),
        svc["drops"],
        s.counters()
    );
    eprintln!("{summary}");
    assert!(
        stats.complete(),
        "the capture lost packets: inconclusive\n{summary}"
    );
    assert_eq!(
        requests,
        CHURN_SOURCES * CHURN_PER_SOURCE,
        "curl did not report every request\n{summary}"
    );
    assert_eq!(
        answers.bare_acks, 0,
        "SYNs answered with an ACK of an old connection (TIME_WAIT at the backend)\n{summary}"
    );
    assert_eq!(timeouts, 0, "{summary}");
    assert_eq!(ok, requests, "{summary}");
    assert_eq!(
        connections, requests as u64,
        "one connection per request (the server closes)\n{summary}"
    );
    assert_eq!(drops, 0, "the service dropped packets\n{summary}");
    assert_eq!(
        new_flows, connections,
        "new flows counted != connections made\n{summary}"
    );
}

/// One client tuple (10.0.0.12:40000) connecting, getting its answer, and closing after the
/// server (nginx closes first), 30 times in a row: every connection is served, and none waits
/// for a SYN retransmission (the client's first RTO is 1 s, so a connect of 1 s or more means
/// its SYN was dropped or refused).
#[test]
fn one_client_tuple_reconnecting_after_each_close_keeps_being_served() {
    const CYCLES: usize = 30;
    if !require_root() {
        return;
    }
    let s = churn_setup("rt-tuple");
    let dir = TempDir::new("rt-tuple").expect("temp dir");
    let capture = Capture::start(
        s.pod_ns("pod3"),
        POD_IFACE,
        &format!("tcp port {POD_PORT}"),
        &dir,
        "tuple",
    )
    .expect("tcpdump");
    let src: SocketAddr = SocketAddr::new(s.lab.client().ipv4[2].into(), 40000);
    let dst: SocketAddr = SocketAddr::new(CHURN_VIP.parse().unwrap(), 80);
    let retrans_before = mib(s.client(), "TcpExt", "TCPSynRetrans").expect("mib");
    let outcomes: Vec<Result<Duration, String>> = s
        .client()
        .run(move || (0..CYCLES).map(|_| one_http_exchange(src, dst)).collect())
        .expect("client thread");
    let retrans = mib(s.client(), "TcpExt", "TCPSynRetrans").expect("mib") - retrans_before;
    let (stats, pcap) = capture.stop().expect("tcpdump stop");
    let answers = syn_answers(&read_pcap(&pcap).expect("pcap"), POD_PORT);
    let lines: Vec<String> = outcomes
        .iter()
        .enumerate()
        .map(|(i, o)| match o {
            Ok(t) => format!("#{:<2} connect {:>7.1} ms", i + 1, t.as_secs_f64() * 1e3),
            Err(e) => format!("#{:<2} FAILED: {e}", i + 1),
        })
        .collect();
    let served = outcomes.iter().filter(|o| o.is_ok()).count();
    let slow = outcomes
        .iter()
        .filter(|o| o.as_ref().is_ok_and(|t| *t >= Duration::from_secs(1)))
        .count();
    let summary = format!(
        "{served}/{CYCLES} served from {src}, {slow} after a SYN retransmission; client SYN \
         retransmissions {retrans}\n{}\nat the backend: {answers:?}; capture {stats:?}\n{}",
        lines.join("\n"),
        s.counters()
    );
    eprintln!("{summary}");
    assert_eq!(served, CYCLES, "{summary}");
    assert_eq!(slow, 0, "{summary}");
    assert_eq!(answers.bare_acks, 0, "{summary}");
}

/// From the calling thread's namespace: connect from `src` (SO_REUSEADDR, as a client that
/// pins its port), `GET /small`, read to the end (the server closes first), close. Returns the
/// connect time. Waits (at most 1 s) while the previous connection on the tuple finishes
/// closing on the client's side.
fn one_http_exchange(src: SocketAddr, dst: SocketAddr) -> Result<Duration, String> {
    use socket2::{Domain, Socket, Type};
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let sock =
            Socket::new(Domain::for_address(dst), Type::STREAM, None).map_err(|e| e.to_string())?;
        sock.set_reuse_address(true).map_err(|e| e.to_string())?;
        sock.bind(&src.into())
            .map_err(|e| format!("bind {src}: {e}"))?;
        let started = Instant::now();
        match sock.connect_timeout(&dst.into(), Duration::from_secs(3)) {
            Ok(()) => {
                let connect = started.elapsed();
                let mut stream: TcpStream = sock.into();
                stream
                    .set_read_timeout(Some(Duration::from_secs(3)))
                    .map_err(|e| e.to_string())?;
                stream
                    .write_all(b"GET /small HTTP/1.1\r\nHost: churn\r\n\r\n")
                    .map_err(|e| format!("write: {e}"))?;
                let mut reply = Vec::new();
                stream
                    .read_to_end(&mut reply)
                    .map_err(|e| format!("read: {e}"))?;
                let reply = String::from_utf8_lossy(&reply);
                if !reply.starts_with("HTTP/1.1 200") || !reply.ends_with("pod3\n") {
                    return Err(format!("unexpected reply {reply:?}"));
                }
                return Ok(connect);
            }
            // The previous connection of this tuple is still closing on our side.
            Err(e)
                if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("connect after {:?}: {e}", started.elapsed())),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Neighbour loss on the uplink

const REMOTE_VIP: &str = "10.96.0.40";
const REMOTE_VIP6: &str = "fd00:96::40";
/// How often a new flow starts, and how long one may take.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Allowed outage of new flows after the event.
const RECOVERY_LIMIT: Duration = Duration::from_secs(1);
/// How long probes go on after the event.
const OBSERVE: Duration = Duration::from_secs(6);

/// One probe: when it started (since the probers' start) and whether it got its answer.
#[derive(Clone, Copy, Debug)]
struct Probe {
    at: Duration,
    ok: bool,
}

/// New flows every PROBE_INTERVAL to `dst`, each its own thread in the client namespace, until
/// `stop`.
fn probe_loop(dst: SocketAddr, t0: Instant, stop: &AtomicBool, out: &Mutex<Vec<Probe>>) {
    thread::scope(|scope| {
        while !stop.load(Ordering::Relaxed) {
            let at = t0.elapsed();
            scope.spawn(move || {
                let ok = probe(dst).is_ok();
                out.lock().unwrap().push(Probe { at, ok });
            });
            thread::sleep(PROBE_INTERVAL);
        }
    });
}

fn probe(dst: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&dst, PROBE_TIMEOUT)?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream.write_all(b"GET /small HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    if reply.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other("bad reply"))
    }
}

/// From the probes: how long after `event` new flows worked again for good (the start of the
/// first probe after `event` from which on every probe succeeded), and the failures after it.
fn outage(probes: &[Probe], event: Duration) -> (Option<Duration>, usize) {
    let mut after: Vec<Probe> = probes.iter().copied().filter(|p| p.at >= event).collect();
    after.sort_by_key(|p| p.at);
    let failures = after.iter().filter(|p| !p.ok).count();
    let last_failure = after.iter().rposition(|p| !p.ok);
    let recovered = match last_failure {
        None => after.first().map(|p| p.at),
        Some(i) => after.get(i + 1).map(|p| p.at),
    };
    (recovered.map(|r| r.saturating_sub(event)), failures)
}

/// Probes new flows (IPv4 and IPv6) to a snat service over node2's pods while a rate-limited
/// download runs through it, does `event` to node1's uplink, and checks new flows work again
/// within RECOVERY_LIMIT and the download completes intact.
fn new_flows_recover_after(name: &str, what: &str, event: impl FnOnce(&Setup)) {
    const DOWNLOAD: u64 = 24 * MIB;
    let s = Setup::new(name, &["pod3", "pod4"], true, |lab| {
        let pods = |v6| [pod_address(lab, "pod3", v6), pod_address(lab, "pod4", v6)];
        let [a, b] = pods(false);
        let [a6, b6] = pods(true);
        config(&[
            service("remote", REMOTE_VIP, "snat", &[&a, &b]),
            service("remote6", REMOTE_VIP6, "snat", &[&a6, &b6]),
        ])
    });
    let dir = TempDir::new(name).expect("temp dir");
    let blob = dir.join("blob");
    write_random_file(&blob, usize::try_from(DOWNLOAD).unwrap(), 0x5eed_0003).expect("blob");
    let want = sha256_file(&blob).expect("hash");
    for server in s.nginx.values() {
        server.add_file(&blob, "blob").expect("serve blob");
    }
    let got = dir.join("got");
    let got_arg = got.display().to_string();
    // 24 MiB at 3 MB/s: about 8.4 s, across the event; 20 s at most.
    let download_url = url(REMOTE_VIP, "/files/blob");
    let mut download = Proc::spawn(
        s.client(),
        Duration::from_secs(30),
        "curl",
        &[
            "-sS",
            "--fail",
            "--limit-rate",
            "3M",
            "--max-time",
            "20",
            "-o",
            &got_arg,
            "-w",
            lb_tests::programs::CURL_WRITE_OUT,
            &download_url,
        ],
        |c| {
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
        },
    )
    .expect("download");

    let stop = AtomicBool::new(false);
    let probes4 = Mutex::new(Vec::new());
    let probes6 = Mutex::new(Vec::new());
    let t0 = Instant::now();
    let dst4 = SocketAddr::new(REMOTE_VIP.parse().unwrap(), 80);
    let dst6 = SocketAddr::new(REMOTE_VIP6.parse().unwrap(), 80);
    let (event_at, neigh_after) = thread::scope(|scope| {
        let p4 = s
            .client()
            .spawn_scoped(scope, || probe_loop(dst4, t0, &stop, &probes4));
        let p6 = s
            .client()
            .spawn_scoped(scope, || probe_loop(dst6, t0, &stop, &probes6));
        thread::sleep(Duration::from_millis(1500));
        event(&s);
        let event_at = t0.elapsed();
        thread::sleep(Duration::from_millis(300));
        let neigh_after = s
            .lab
            .node1()
            .ns
            .ip(&["neigh", "show", "dev", "eth0"])
            .unwrap_or_default();
        thread::sleep(OBSERVE.saturating_sub(Duration::from_millis(300)));
        stop.store(true, Ordering::Relaxed);
        p4.join().expect("prober").expect("prober ns");
        p6.join().expect("prober").expect("prober ns");
        (event_at, neigh_after)
    });
    let status = download
        .wait_for(Duration::from_secs(30))
        .expect("download ends");
    let mut line = String::new();
    let _ = download
        .child_mut()
        .stdout
        .take()
        .map(|mut o| o.read_to_string(&mut line));
    let download_ok = status.success() && sha256_file(&got).is_ok_and(|h| h == want);

    let mut report = format!("{what} at {:.3} s\n", event_at.as_secs_f64());
    let mut failures = Vec::new();
    for (family, probes) in [
        ("IPv4", probes4.into_inner().unwrap()),
        ("IPv6", probes6.into_inner().unwrap()),
    ] {
        let before_ok = probes
            .iter()
            .filter(|p| p.at + PROBE_TIMEOUT < event_at)
            .all(|p| p.ok);
        let (recovered, failed) = outage(&probes, event_at);
        let _ = writeln!(
            report,
            "{family}: {} probes; all ok before: {before_ok}; after: {failed} failed; new flows \
             work again {}",
            probes.len(),
            match recovered {
                Some(d) => format!("{:.0} ms after it", d.as_secs_f64() * 1e3),
                None => format!("not within {OBSERVE:?}"),
            }
        );
        if !before_ok {
            failures.push(format!(
                "{family}: probes failed before the event (lab broken?)"
            ));
        }
        match recovered {
            Some(d) if d <= RECOVERY_LIMIT => {}
            _ => failures.push(format!(
                "{family}: new flows not back within {RECOVERY_LIMIT:?}"
            )),
        }
    }
    let _ = writeln!(
        report,
        "download through the event: {} {}",
        if download_ok {
            "complete, sha256 equal"
        } else {
            "FAILED"
        },
        line.trim()
    );
    if !download_ok {
        failures.push("the download across the event did not complete intact".into());
    }
    let _ = write!(
        report,
        "node1 eth0 neighbours 300 ms after: {}\n{}",
        neigh_after.trim().replace('\n', "; "),
        s.counters()
    );
    eprintln!("{report}");
    assert!(failures.is_empty(), "{}\n{report}", failures.join("\n"));
}

/// node1's uplink loses its carrier for 200 ms (its peer on the VPC bridge goes down and up):
/// the kernel deletes its neighbour entries.
#[test]
fn new_flows_to_remote_pods_work_within_1s_after_the_uplink_carrier_flaps() {
    if !require_root() {
        return;
    }
    new_flows_recover_after("rt-flap", "carrier flap of node1's uplink", |s| {
        let peer = s.lab.node1().uplink_peer.clone();
        s.lab
            .vpc()
            .ip(&["link", "set", &peer, "down"])
            .expect("peer down");
        thread::sleep(Duration::from_millis(200));
        s.lab
            .vpc()
            .ip(&["link", "set", &peer, "up"])
            .expect("peer up");
    });
}

/// `ip neigh flush dev eth0` on node1 (both families).
#[test]
fn new_flows_to_remote_pods_work_within_1s_after_the_uplink_neighbours_are_flushed() {
    if !require_root() {
        return;
    }
    new_flows_recover_after("rt-flush", "ip neigh flush dev eth0 on node1", |s| {
        let node1 = &s.lab.node1().ns;
        node1
            .ip(&["-4", "neigh", "flush", "dev", "eth0"])
            .expect("flush");
        node1
            .ip(&["-6", "neigh", "flush", "dev", "eth0"])
            .expect("flush");
    });
}

// ---------------------------------------------------------------------------------------------
// 4. /metrics

/// The Accept header of a Prometheus 2.x scrape.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// `/metrics` as a Prometheus server asks for it (`Accept: text/plain;version=0.0.4`) passes
/// `promtool check metrics`; as an OpenMetrics scraper asks for it, it is strict OpenMetrics.
/// Some traffic first, so that labelled series exist.
#[test]
fn metrics_pass_promtool_as_text_and_a_strict_openmetrics_parse() {
    if !require_root() {
        return;
    }
    let s = Setup::new("rt-metrics", &["pod1", "pod3"], true, |lab| {
        let (a, b) = (
            pod_address(lab, "pod1", false),
            pod_address(lab, "pod3", false),
        );
        config(&[service("web", CHURN_VIP, "snat", &[&a, &b])])
    });
    let (results, _) = curl(
        s.client(),
        Duration::from_secs(60),
        &[
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            &url(CHURN_VIP, "/small?n=[1-20]"),
        ],
        false,
    )
    .expect("curl");
    assert!(
        results.len() == 20 && results.iter().all(CurlResult::ok),
        "{results:?}"
    );
    let dir = TempDir::new("rt-metrics").expect("temp dir");
    let node1 = &s.lab.node1().ns;
    let scrape = |accept: &str, file: &str| -> (String, String) {
        let path = dir.join(file);
        let path_arg = path.display().to_string();
        let out = run(
            node1,
            Duration::from_secs(20),
            "curl",
            &[
                "-sS",
                "--fail",
                "--max-time",
                "10",
                "-H",
                &format!("Accept: {accept}"),
                "-o",
                &path_arg,
                "-w",
                "%{content_type}",
                "http://127.0.0.1:9435/metrics",
            ],
        )
        .expect("curl");
        assert!(
            out.status.success(),
            "scrape: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let body = std::fs::read_to_string(&path).expect("body");
        (String::from_utf8_lossy(&out.stdout).into_owned(), body)
    };

    let (text_type, text) = scrape("text/plain;version=0.0.4", "metrics.txt");
    let promtool = {
        let path = dir.join("metrics.txt").display().to_string();
        // promtool reads the exposition on stdin.
        run(
            node1,
            Duration::from_secs(20),
            "sh",
            &["-c", &format!("promtool check metrics < '{path}'")],
        )
        .expect("promtool")
    };
    let promtool_said = format!(
        "{}{}",
        String::from_utf8_lossy(&promtool.stdout),
        String::from_utf8_lossy(&promtool.stderr)
    );
    let (om_type, om) = scrape("application/openmetrics-text;version=1.0.0", "metrics.om");
    // What a Prometheus 2.x server sends: OpenMetrics preferred, the text format accepted.
    let (prom_type, prom_body) = scrape(PROMETHEUS_ACCEPT, "metrics.prom");
    let prom_check = if prom_type.starts_with("application/openmetrics-text") {
        openmetrics::check(&prom_body).map(drop)
    } else {
        Err(anyhow::anyhow!("answered {prom_type:?}"))
    };
    let om_check = openmetrics::check(&om);
    let families = om_check.as_ref().map_or(0, |e| e.families.len());
    let first = |t: &str| t.lines().take(6).collect::<Vec<_>>().join("\n");
    let report = format!(
        "text: Content-Type {text_type:?}, {} lines; promtool: {} {:?}\n{}\n\
         openmetrics: Content-Type {om_type:?}, {} lines; strict parse: {}\nfirst lines (text):\n{}\n\
         first lines (openmetrics):\n{}",
        text.lines().count(),
        promtool.status,
        promtool_said.lines().take(10).collect::<Vec<_>>(),
        if promtool_said.lines().count() > 10 {
            format!(
                "... ({} lines of complaints)",
                promtool_said.lines().count()
            )
        } else {
            String::new()
        },
        om.lines().count(),
        match &om_check {
            Ok(_) => format!("ok, {families} families"),
            Err(e) => format!("{e:#}"),
        },
        first(&text),
        first(&om),
    );
    eprintln!("{report}");
    assert!(
        text_type.starts_with("text/plain") && text_type.contains("version=0.0.4"),
        "{report}"
    );
    assert!(
        promtool.status.success() && promtool_said.trim().is_empty(),
        "{report}"
    );
    assert!(
        om_type.starts_with("application/openmetrics-text"),
        "{report}"
    );
    assert!(om_check.is_ok(), "{report}");
    assert!(families > 5, "{report}");
    assert!(
        prom_check.is_ok(),
        "Prometheus' own Accept header: {prom_check:?}\n{report}"
    );
}
