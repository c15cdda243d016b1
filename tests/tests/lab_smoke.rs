//! The lab without any load balancer: the client reaches every pod directly, over TCP and UDP,
//! IPv4 and IPv6, and backends see the client's own addresses. Also exercises the traffic tools
//! (batches, long transfers, adding and removing a pod). Privileged: see `require_root`.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use lb_tests::{
    lab::{Lab, NodeId},
    netns::require_root,
    traffic::{
        BackendServer, Batch, DEFAULT_PORT, LongTransfer, Proto, Reply, TransferOptions, request,
        serve_pods, tcp_request, udp_request,
    },
};

const TIMEOUT: Duration = Duration::from_secs(2);

#[test]
fn client_reaches_every_pod_directly_and_backends_see_its_address() {
    if !require_root() {
        return;
    }
    let lab = Lab::build("smoke").unwrap();
    eprintln!("lab {} built in {:?}", lab.name(), lab.build_time());
    let servers = serve_pods(lab.pods(), DEFAULT_PORT).unwrap();
    let client = lab.client();
    // Two different source addresses of each family.
    let sources: Vec<IpAddr> = vec![
        client.ipv4[0].into(),
        client.ipv4[3].into(),
        client.ipv6[0].into(),
        client.ipv6[3].into(),
    ];
    let started = Instant::now();
    for pod in lab.pods() {
        for &src in &sources {
            let dst = SocketAddr::new(pod.ip(src.is_ipv6()), DEFAULT_PORT);
            for proto in [Proto::Tcp, Proto::Udp] {
                let reply = request(&client.ns, proto, Some(src), dst, TIMEOUT)
                    .unwrap_or_else(|e| panic!("{proto:?} {src} -> {dst}: {e:#}"));
                assert_eq!(reply.backend, pod.name, "{proto:?} {src} -> {dst}");
                assert_eq!(
                    reply.peer.ip(),
                    src,
                    "{proto:?} {src} -> {dst}: backend saw {}",
                    reply.peer
                );
            }
        }
    }
    eprintln!(
        "{} direct exchanges in {:?}",
        lab.pods().len() * sources.len() * 2,
        started.elapsed()
    );
    // The raw helpers agree with the parsed one.
    let pod1 = lab.pod("pod1").unwrap();
    let raw = tcp_request(
        &client.ns,
        None,
        SocketAddr::new(pod1.ipv4.into(), DEFAULT_PORT),
        TIMEOUT,
    )
    .unwrap();
    assert_eq!(
        Reply::parse(&raw).unwrap().peer.ip(),
        IpAddr::from(client.ipv4[0]),
        "{raw}"
    );
    let raw = udp_request(
        &client.ns,
        None,
        SocketAddr::new(pod1.ipv6.into(), DEFAULT_PORT),
        TIMEOUT,
    )
    .unwrap();
    assert!(raw.starts_with("pod1 ["), "{raw}");
    // A process spawned in a namespace runs there and dies with its guard.
    let child = client.ns.spawn("sleep", &["30"]).unwrap();
    let pid = child.id().to_string();
    // `ip netns exec` enters the namespace, then execs: wait for that.
    let deadline = Instant::now() + Duration::from_secs(2);
    let identify = || lb_tests::netns::ip(&["netns", "identify", &pid]).unwrap();
    while identify().trim() != client.ns.name() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(identify().trim(), client.ns.name());
    drop(child);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "sleep {pid} survived its guard"
    );
    for server in &servers {
        let stats = server.stats();
        for src in &sources {
            assert!(
                stats.peer_ips().contains(src),
                "{} never saw {src}: {stats:?}",
                server.name()
            );
        }
        assert!(
            stats.tcp_connections >= 4 && stats.tcp_requests >= 4 && stats.udp_requests >= 4,
            "{stats:?}"
        );
    }
}

#[test]
fn batches_long_transfers_and_new_pods_work_directly() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::build("smoke").unwrap();
    eprintln!("lab {} built in {:?}", lab.name(), lab.build_time());
    let mut servers = serve_pods(lab.pods(), DEFAULT_PORT).unwrap();
    let pod3 = lab.pod("pod3").unwrap();
    let client = lab.client();

    for (proto, dst) in [
        (Proto::Tcp, SocketAddr::new(pod3.ipv4.into(), DEFAULT_PORT)),
        (Proto::Udp, SocketAddr::new(pod3.ipv6.into(), DEFAULT_PORT)),
    ] {
        let report = Batch::new(proto, dst, client.sources_for(dst.ip()), 1000)
            .concurrency(6)
            .deadline(Duration::from_secs(20))
            .run(&client.ns)
            .unwrap();
        eprintln!(
            "{proto:?} batch to {dst}: {} ok in {:?}, errors {:?}",
            report.ok, report.elapsed, report.errors
        );
        assert!(report.all_ok(), "{report:?}");
        assert_eq!(report.per_backend.get("pod3"), Some(&1000));
        assert_eq!(report.per_source.len(), 5, "{:?}", report.per_source);
        assert_eq!(report.peer_mismatches, 0);
    }

    let dst = SocketAddr::new(lab.pod("pod2").unwrap().ipv6.into(), DEFAULT_PORT);
    let opts = TransferOptions {
        interval: Duration::from_millis(1),
        ..TransferOptions::default()
    };
    let transfer =
        LongTransfer::start_with(&client.ns, Some(client.ipv6[2].into()), dst, opts).unwrap();
    assert_eq!(transfer.backend(), "pod2");
    std::thread::sleep(Duration::from_millis(700));
    assert!(transfer.bytes_sent() > 0);
    let report = transfer.finish();
    eprintln!("long transfer: {report:?}");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.peer.ip(), IpAddr::from(client.ipv6[2]));

    // A new backend on node1, reachable at once; removing it frees its name.
    let v4 = Ipv4Addr::new(10, 1, 1, 4);
    let v6: Ipv6Addr = "fd00:1:1::4".parse().unwrap();
    let pod5 = lab.add_pod(NodeId::Node1, "pod5", v4, v6).unwrap();
    servers.push(BackendServer::for_pod(pod5, DEFAULT_PORT).unwrap());
    let client = lab.client();
    for dst in [IpAddr::from(v4), IpAddr::from(v6)] {
        let reply = request(
            &client.ns,
            Proto::Tcp,
            None,
            SocketAddr::new(dst, DEFAULT_PORT),
            TIMEOUT,
        )
        .unwrap();
        assert_eq!(reply.backend, "pod5");
    }
    drop(servers.pop());
    lab.remove_pod("pod5").unwrap();
    assert!(
        request(
            &lab.client().ns,
            Proto::Udp,
            None,
            SocketAddr::new(v4.into(), DEFAULT_PORT),
            Duration::from_millis(300)
        )
        .is_err()
    );
    lab.add_pod(NodeId::Node1, "pod5", v4, v6).unwrap();
}
