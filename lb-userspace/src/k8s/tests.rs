//! Translation tests: Kubernetes objects in, services out (no API server needed).
use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, ObjectReference,
            Service as KubeService, ServicePort, ServiceSpec, ServiceStatus, SessionAffinityConfig,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::*;

pub(crate) fn svc(
    name: &str,
    annotations: &[(&str, &str)],
    ports: &[(&str, i32, Option<i32>)],
) -> KubeService {
    KubeService {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p, np)| ServicePort {
                        name: (!n.is_empty()).then(|| n.to_string()),
                        port: *p,
                        node_port: *np,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some("10.96.0.10".into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        }),
    }
}

/// An endpoint: (address, ready, serving, terminating, node, pod).
pub(crate) type Ep<'a> = (&'a str, bool, bool, bool, &'a str, &'a str);

pub(crate) fn slice(name: &str, port_name: &str, port: i32, endpoints: &[Ep<'_>]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        address_type: if endpoints.first().is_some_and(|e| e.0.contains(':')) {
            "IPv6"
        } else {
            "IPv4"
        }
        .into(),
        ports: Some(vec![EndpointPort {
            name: Some(port_name.into()),
            port: Some(port),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        endpoints: Some(
            endpoints
                .iter()
                .map(|(a, r, s, t, n, pod)| Endpoint {
                    addresses: vec![a.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(*r),
                        serving: Some(*s),
                        terminating: Some(*t),
                    }),
                    node_name: Some(n.to_string()),
                    target_ref: Some(ObjectReference {
                        name: Some(pod.to_string()),
                        kind: Some("Pod".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

fn cluster(service: KubeService, slices: Vec<EndpointSlice>) -> Cluster {
    let key: ObjectKey = ("default".into(), service.metadata.name.clone().unwrap());
    let mut c = Cluster::default();
    c.slices.insert(
        key.clone(),
        slices
            .into_iter()
            .map(|s| (s.metadata.name.clone().unwrap(), Box::new(s.into())))
            .collect(),
    );
    c.services.insert(key, service.into());
    c
}

pub(crate) fn node() -> NodeInfo {
    NodeInfo {
        name: "node1".into(),
        addrs: vec!["10.0.0.1".parse().unwrap()],
        reserved: crate::reserved::Reserved {
            node_addrs: ["10.0.0.1".parse().unwrap()].into(),
            ..Default::default()
        },
        zone: None,
        prefer_same_zone: false,
    }
}

pub(crate) const ON: (&str, &str) = (ENABLED, "true");

fn ready(addr: &'static str, node: &'static str) -> Ep<'static> {
    (addr, true, true, false, node, addr)
}

/// (frontend, sorted backends as "addr:port=weight").
fn summary(t: &Translation) -> BTreeMap<String, Vec<String>> {
    t.services
        .iter()
        .map(|s| {
            let mut b: Vec<String> = s
                .backends
                .iter()
                .map(|b| format!("{}:{}={}", b.addr, b.port, b.weight))
                .collect();
            b.sort();
            (s.frontend.to_string(), b)
        })
        .collect()
}

fn run(c: &Cluster) -> Translation {
    Translator::default().translate(c, &node(), &BTreeSet::new(), Instant::now())
}

#[test]
fn only_services_that_opt_in_are_served() {
    let c = cluster(
        svc("web", &[], &[("http", 80, None)]),
        vec![slice("web-1", "http", 8080, &[ready("10.1.1.2", "node1")])],
    );
    assert!(run(&c).services.is_empty());
    let c = cluster(
        svc("web", &[(ENABLED, "false")], &[("http", 80, None)]),
        vec![],
    );
    assert!(run(&c).services.is_empty());
}

#[test]
fn load_balancer_ips_external_ips_and_node_ports_become_frontends() {
    let mut s = svc(
        "web",
        &[ON],
        &[("http", 80, Some(30080)), ("dns", 53, None)],
    );
    s.spec.as_mut().unwrap().external_ips = Some(vec!["192.0.2.7".into()]);
    let c = cluster(
        s,
        vec![slice("web-1", "http", 8080, &[ready("10.1.1.2", "node1")])],
    );
    let t = run(&c);
    let fronts: Vec<String> = summary(&t).into_keys().collect();
    assert_eq!(
        fronts,
        [
            "10.0.0.1:30080/tcp",
            "10.96.0.10:53/tcp",
            "10.96.0.10:80/tcp",
            "192.0.2.7:53/tcp",
            "192.0.2.7:80/tcp"
        ]
    );
    let web = t
        .services
        .iter()
        .find(|s| s.frontend.port == 80 && s.frontend.vip.to_string() == "10.96.0.10")
        .unwrap();
    assert_eq!(web.name, "default/web:http");
    assert_eq!(web.origin.to_string(), "Service default/web");
    assert_eq!(web.mode, Mode::Snat);
    assert_eq!(web.backends.len(), 1);
    // The "dns" port has no slice port of that name: no endpoints.
    let dns = t.services.iter().find(|s| s.frontend.port == 53).unwrap();
    assert!(dns.backends.is_empty());
}

#[test]
fn named_target_ports_are_resolved_per_slice_and_many_slices_add_up() {
    let c = cluster(
        svc("web", &[ON], &[("http", 80, None)]),
        vec![
            slice(
                "web-1",
                "http",
                8080,
                &[ready("10.1.1.2", "node1"), ready("10.1.1.3", "node1")],
            ),
            // Pods from another revision serve the same named port on another number.
            slice("web-2", "http", 9090, &[ready("10.1.2.2", "node2")]),
            slice("web-3", "metrics", 9100, &[ready("10.1.2.9", "node2")]),
        ],
    );
    assert_eq!(
        summary(&run(&c))["10.96.0.10:80/tcp"],
        ["10.1.1.2:8080=1", "10.1.1.3:8080=1", "10.1.2.2:9090=1"]
    );
}

#[test]
fn terminating_endpoints_serve_only_when_nothing_is_ready() {
    let term = |a: &'static str| (a, false, true, true, "node1", a);
    let gone = |a: &'static str| (a, false, false, true, "node1", a);
    let c = cluster(
        svc("web", &[ON], &[("http", 80, None)]),
        vec![slice(
            "web-1",
            "http",
            8080,
            &[
                ready("10.1.1.2", "node1"),
                term("10.1.1.3"),
                gone("10.1.1.4"),
            ],
        )],
    );
    assert_eq!(summary(&run(&c))["10.96.0.10:80/tcp"], ["10.1.1.2:8080=1"]);
    // No ready endpoint: the terminating ones that still serve take over (KEP-1669).
    let c = cluster(
        svc("web", &[ON], &[("http", 80, None)]),
        vec![slice(
            "web-1",
            "http",
            8080,
            &[term("10.1.1.3"), gone("10.1.1.4")],
        )],
    );
    assert_eq!(summary(&run(&c))["10.96.0.10:80/tcp"], ["10.1.1.3:8080=1"]);
}

#[test]
fn external_traffic_policy_local_uses_this_nodes_endpoints_keeps_the_client_and_has_a_health_check()
{
    let mut s = svc("web", &[ON], &[("http", 80, Some(30080))]);
    let spec = s.spec.as_mut().unwrap();
    spec.external_traffic_policy = Some("Local".into());
    spec.health_check_node_port = Some(32000);
    let c = cluster(
        s.clone(),
        vec![slice(
            "web-1",
            "http",
            8080,
            &[ready("10.1.1.2", "node1"), ready("10.1.2.2", "node2")],
        )],
    );
    let t = run(&c);
    assert_eq!(summary(&t)["10.96.0.10:80/tcp"], ["10.1.1.2:8080=1"]);
    assert!(t.services.iter().all(|s| s.mode == Mode::PreserveClientIp));
    assert_eq!(
        t.health_checks,
        [HealthCheck {
            port: 32000,
            service: ("default".into(), "web".into()),
            local_endpoints: 1
        }]
    );
    // No local endpoint: the health check says so (an NLB then stops sending here).
    let c = cluster(
        s,
        vec![slice("web-1", "http", 8080, &[ready("10.1.2.2", "node2")])],
    );
    assert_eq!(run(&c).health_checks[0].local_endpoints, 0);
}

#[test]
fn client_ip_affinity_and_weights_come_from_the_service() {
    let mut s = svc(
        "web",
        &[ON, (WEIGHTS, "10.1.1.2=3, pod-b=0")],
        &[("http", 80, None)],
    );
    let spec = s.spec.as_mut().unwrap();
    spec.session_affinity = Some("ClientIP".into());
    spec.session_affinity_config = Some(SessionAffinityConfig {
        client_ip: Some(ClientIPConfig {
            timeout_seconds: Some(600),
        }),
    });
    let c = cluster(
        s,
        vec![slice(
            "web-1",
            "http",
            8080,
            &[
                ready("10.1.1.2", "node1"),
                ("10.1.1.3", true, true, false, "node1", "pod-b"),
                ready("10.1.1.4", "node1"),
            ],
        )],
    );
    let t = run(&c);
    assert_eq!(
        summary(&t)["10.96.0.10:80/tcp"],
        ["10.1.1.2:8080=3", "10.1.1.3:8080=0", "10.1.1.4:8080=1"]
    );
    assert_eq!(t.services[0].affinity, Some(Duration::from_secs(600)));
}

#[test]
fn source_ranges_apply_to_every_frontend_and_bad_ones_leave_the_service_unserved() {
    let mut s = svc(
        "web",
        &[ON, (SOURCE_RANGES_MODE, "Deny")],
        &[("http", 80, Some(30080))],
    );
    let spec = s.spec.as_mut().unwrap();
    spec.external_ips = Some(vec!["192.0.2.7".into()]);
    spec.load_balancer_source_ranges = Some(vec![" 198.51.100.0/24".into(), "::/0".into()]);
    let slices = vec![slice("web-1", "http", 8080, &[ready("10.1.1.2", "node1")])];
    let t = run(&cluster(s.clone(), slices.clone()));
    assert_eq!(t.services.len(), 3, "{:?}", t.problems);
    for f in &t.services {
        assert_eq!(
            f.source_ranges.to_string(),
            "deny 198.51.100.0/24,::/0",
            "{}",
            f.frontend
        );
    }
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    // A bad prefix: reported, and nothing of the Service served (not served open).
    s.spec.as_mut().unwrap().load_balancer_source_ranges =
        Some(vec!["198.51.100.0/24".into(), "198.51.100.1/24".into()]);
    let t = run(&cluster(s.clone(), slices.clone()));
    assert!(t.services.is_empty());
    assert_eq!(t.problems.len(), 1);
    assert_eq!(t.problems[0].field, "spec.loadBalancerSourceRanges[1]");
    assert!(
        t.problems[0].message.contains("host bits"),
        "{:?}",
        t.problems
    );
    // A mode that is neither: the same.
    s.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["198.51.100.0/24".into()]);
    s.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(SOURCE_RANGES_MODE.into(), "block".into());
    let t = run(&cluster(s, slices));
    assert!(t.services.is_empty());
    assert_eq!(t.problems[0].field, SOURCE_RANGES_MODE);
}

#[test]
fn bad_annotations_are_reported_and_the_service_is_served_with_defaults() {
    let c = cluster(
        svc(
            "web",
            &[
                ON,
                (WEIGHTS, "a=b"),
                (DEREGISTRATION_DELAY, "9999"),
                (MODE, "dsr"),
                ("rate-limit.xdplb.io/packets-per-second", "lots"),
                (RATE_LIMIT, "nope"),
            ],
            &[("http", 80, None)],
        ),
        vec![slice("web-1", "http", 8080, &[ready("10.1.1.2", "node1")])],
    );
    let t = run(&c);
    assert_eq!(t.services.len(), 1, "still served");
    assert_eq!(t.services[0].policy, None);
    let fields: Vec<&str> = t.problems.iter().map(|p| p.field.as_str()).collect();
    for f in [
        WEIGHTS,
        DEREGISTRATION_DELAY,
        MODE,
        "rate-limit.xdplb.io/packets-per-second",
        RATE_LIMIT,
    ] {
        assert!(fields.contains(&f), "{f} not reported: {:?}", t.problems);
    }
    assert!(
        t.problems[0]
            .to_string()
            .starts_with("Service default/web: ")
    );
}

#[test]
fn rate_limit_annotations_make_a_policy_of_the_service() {
    let c = cluster(
        svc(
            "web",
            &[
                ON,
                ("rate-limit.xdplb.io/packets-per-second", "1000"),
                ("rate-limit.xdplb.io/connections-per-second", "50"),
                ("rate-limit.xdplb.io/connections-burst", "100"),
                ("rate-limit.xdplb.io/exempt", "10.0.0.0/8, 192.168.0.0/16"),
                ("rate-limit.xdplb.io/table-full", "fail-open"),
            ],
            &[("http", 80, None)],
        ),
        vec![],
    );
    let t = run(&c);
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    assert_eq!(t.services[0].policy.as_deref(), Some("service:default/web"));
    let p = &t.policies["service:default/web"];
    assert_eq!(p.limits.packets.unwrap().per_second, 1000);
    assert_eq!(p.limits.connections.unwrap().burst, 100);
    assert_eq!(p.exempt.len(), 2);
    assert_eq!(p.table_full, crate::model::TableFull::FailOpen);
}

#[test]
fn a_vanished_endpoint_drains_for_the_deregistration_delay_then_its_flows_end() {
    let mut tr = Translator::default();
    let t0 = Instant::now();
    let s = svc(
        "web",
        &[
            ON,
            (DEREGISTRATION_DELAY, "60"),
            (DEREGISTRATION_RESET, "true"),
        ],
        &[("http", 80, None)],
    );
    let both = cluster(
        s.clone(),
        vec![slice(
            "web-1",
            "http",
            8080,
            &[ready("10.1.1.2", "node1"), ready("10.1.1.3", "node1")],
        )],
    );
    let one = cluster(
        s.clone(),
        vec![slice("web-1", "http", 8080, &[ready("10.1.1.2", "node1")])],
    );
    let n = node();
    let none = BTreeSet::new();
    let t = tr.translate(&both, &n, &none, t0);
    assert_eq!(
        summary(&t)["10.96.0.10:80/tcp"],
        ["10.1.1.2:8080=1", "10.1.1.3:8080=1"]
    );
    // 10.1.1.3 disappears: weight 0 (no new flows, existing ones continue).
    let t = tr.translate(&one, &n, &none, t0 + Duration::from_secs(1));
    assert_eq!(
        summary(&t)["10.96.0.10:80/tcp"],
        ["10.1.1.2:8080=1", "10.1.1.3:8080=0"]
    );
    assert!(t.end_flows.is_empty());
    let t = tr.translate(&one, &n, &none, t0 + Duration::from_secs(60));
    assert_eq!(
        summary(&t)["10.96.0.10:80/tcp"],
        ["10.1.1.2:8080=1", "10.1.1.3:8080=0"],
        "still within the delay"
    );
    // The delay ends: removed, and its flows are ended (with RST, as asked).
    let t = tr.translate(&one, &n, &none, t0 + Duration::from_secs(62));
    assert_eq!(summary(&t)["10.96.0.10:80/tcp"], ["10.1.1.2:8080=1"]);
    assert_eq!(t.end_flows.len(), 1);
    assert_eq!(t.end_flows[0].backend, ("10.1.1.3".parse().unwrap(), 8080));
    assert!(t.end_flows[0].reset);
    let t = tr.translate(&one, &n, &none, t0 + Duration::from_secs(63));
    assert!(t.end_flows.is_empty(), "ended once");
    // Coming back during a drain cancels it.
    let t = tr.translate(&both, &n, &none, t0 + Duration::from_secs(64));
    assert_eq!(
        summary(&t)["10.96.0.10:80/tcp"],
        ["10.1.1.2:8080=1", "10.1.1.3:8080=1"]
    );
    let t = tr.translate(&one, &n, &none, t0 + Duration::from_secs(65));
    assert_eq!(
        summary(&t)["10.96.0.10:80/tcp"],
        ["10.1.1.2:8080=1", "10.1.1.3:8080=0"]
    );
    let t = tr.translate(&both, &n, &none, t0 + Duration::from_secs(66));
    assert_eq!(
        summary(&t)["10.96.0.10:80/tcp"],
        ["10.1.1.2:8080=1", "10.1.1.3:8080=1"]
    );
    let t = tr.translate(&both, &n, &none, t0 + Duration::from_secs(300));
    assert!(t.end_flows.is_empty());
}

#[test]
fn a_drain_saved_by_one_translator_is_taken_up_by_the_next_and_ends_on_time() {
    let s = svc(
        "web",
        &[
            ON,
            (DEREGISTRATION_DELAY, "60"),
            (DEREGISTRATION_RESET, "true"),
        ],
        &[("http", 80, None)],
    );
    let both = cluster(
        s.clone(),
        vec![slice(
            "web-1",
            "http",
            8080,
            &[ready("10.1.1.2", "node1"), ready("10.1.1.3", "node1")],
        )],
    );
    let one = cluster(
        s.clone(),
        vec![slice("web-1", "http", 8080, &[ready("10.1.1.2", "node1")])],
    );
    let (n, none) = (node(), BTreeSet::new());
    let sec = Duration::from_secs;
    // The first agent: 10.1.1.3 vanishes at t0 + 1 s and drains until t0 + 61 s.
    let mut first = Translator::default();
    let (t0, wall0) = (Instant::now(), std::time::SystemTime::now());
    first.translate(&both, &n, &none, t0);
    first.translate(&one, &n, &none, t0 + sec(1));
    let saved = first.saved_drains(t0 + sec(1), wall0 + sec(1));
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_eq!(
        (saved[0].addr, saved[0].port, saved[0].reset),
        ("10.1.1.3".parse().unwrap(), 8080, true)
    );
    // Through the file, as a restarted agent reads it.
    let dir = std::env::temp_dir().join(format!("xdplb-drains-{}", std::process::id()));
    drains::write(&dir, &saved).unwrap();
    let saved = drains::read(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(saved.len(), 1);
    // A second agent starts 20 s later, its own clock elsewhere: the backend is still draining.
    let mut second = Translator::default();
    let (t1, wall1) = (t0 + sec(500), wall0 + sec(21));
    second.restore(&saved, t1, wall1);
    let t = second.translate(&one, &n, &none, t1);
    assert_eq!(
        summary(&t)["10.96.0.10:80/tcp"],
        ["10.1.1.2:8080=1", "10.1.1.3:8080=0"]
    );
    assert!(t.end_flows.is_empty());
    let t = second.translate(&one, &n, &none, t1 + sec(39));
    assert!(t.end_flows.is_empty(), "still within the delay");
    // The original deadline (40 s after the restart): removed, its flows ended with a RST.
    let t = second.translate(&one, &n, &none, t1 + sec(40));
    assert_eq!(summary(&t)["10.96.0.10:80/tcp"], ["10.1.1.2:8080=1"]);
    assert_eq!(t.end_flows.len(), 1);
    assert_eq!(t.end_flows[0].backend, ("10.1.1.3".parse().unwrap(), 8080));
    assert!(t.end_flows[0].reset);
    assert!(
        second
            .saved_drains(t1 + sec(40), wall1 + sec(40))
            .is_empty()
    );

    // A drain whose deadline passed while no agent ran ends at the first translation; one whose
    // backend is an endpoint again is over.
    let mut late = Translator::default();
    late.restore(&saved, t1, wall0 + sec(3600));
    let t = late.translate(&one, &n, &none, t1);
    assert_eq!(summary(&t)["10.96.0.10:80/tcp"], ["10.1.1.2:8080=1"]);
    assert_eq!(t.end_flows.len(), 1);
    let mut back = Translator::default();
    back.restore(&saved, t1, wall1);
    let t = back.translate(&both, &n, &none, t1);
    assert_eq!(
        summary(&t)["10.96.0.10:80/tcp"],
        ["10.1.1.2:8080=1", "10.1.1.3:8080=1"]
    );
    assert!(t.end_flows.is_empty());
    assert!(back.saved_drains(t1, wall1).is_empty());
    // A drain of a frontend no Service has any more is dropped (nothing to drain through).
    let mut gone = Translator::default();
    gone.restore(&saved, t1, wall1);
    let t = gone.translate(&Cluster::default(), &n, &none, t1);
    assert!(t.services.is_empty() && t.end_flows.is_empty());
    assert!(gone.saved_drains(t1, wall1).is_empty());
}

#[test]
fn ipv6_slices_serve_ipv6_frontends() {
    let mut s = svc("web", &[ON], &[("http", 80, None)]);
    s.status
        .as_mut()
        .unwrap()
        .load_balancer
        .as_mut()
        .unwrap()
        .ingress = Some(vec![
        LoadBalancerIngress {
            ip: Some("10.96.0.10".into()),
            ..Default::default()
        },
        LoadBalancerIngress {
            ip: Some("fd00:96::10".into()),
            ..Default::default()
        },
    ]);
    let c = cluster(
        s,
        vec![
            slice("web-v4", "http", 8080, &[ready("10.1.1.2", "node1")]),
            slice("web-v6", "http", 8080, &[ready("fd00:1:1::2", "node1")]),
        ],
    );
    let t = summary(&run(&c));
    // Each family's frontend gets its family's endpoints.
    assert_eq!(t["10.96.0.10:80/tcp"], ["10.1.1.2:8080=1"]);
    assert_eq!(t["[fd00:96::10]:80/tcp"], ["fd00:1:1::2:8080=1"]);
}

/// A Service created at `created` (seconds) with uid `uid`, claiming 10.96.0.10:80 (its
/// load-balancer IP) and a node port.
fn aged(name: &str, created: i64, uid: &str, node_port: i32) -> KubeService {
    let mut s = svc(name, &[ON], &[("http", 80, Some(node_port))]);
    s.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Timestamp::from_second(1_700_000_000 + created).unwrap(),
    ));
    s.metadata.uid = Some(uid.into());
    s
}

fn two(a: KubeService, b: KubeService) -> Cluster {
    let mut c = Cluster::default();
    for s in [a, b] {
        let key: ObjectKey = ("default".into(), s.metadata.name.clone().unwrap());
        let sl = slice(
            &format!("{}-1", key.1),
            "http",
            8080,
            &[ready(
                if key.1.as_str() < "m" {
                    "10.1.1.2"
                } else {
                    "10.1.1.3"
                },
                "node1",
            )],
        );
        c.slices.insert(
            key.clone(),
            [(sl.metadata.name.clone().unwrap(), Box::new(sl.into()))].into(),
        );
        c.services.insert(key, s.into());
    }
    c
}

/// Who serves 10.96.0.10:80 ("a" has backend .2, "z" has .3), and who was refused it.
fn owner_and_refused(t: &Translation) -> (Vec<String>, Vec<String>) {
    let served = summary(t)
        .get("10.96.0.10:80/tcp")
        .cloned()
        .unwrap_or_default();
    let refused = t
        .problems
        .iter()
        .filter(|p| p.field == "frontend 10.96.0.10:80/tcp")
        .map(ToString::to_string)
        .collect();
    (served, refused)
}

#[test]
fn the_older_service_keeps_a_frontend_whatever_the_names() {
    // "a" sorts first by name; the older one must win in both orders.
    for (a_created, a_uid, z_created, z_uid, winner, loser) in [
        (10, "u1", 20, "u2", "10.1.1.2:8080=1", "z"),
        (20, "u1", 10, "u2", "10.1.1.3:8080=1", "a"),
        // The same second: the uid decides (every node sees the same).
        (10, "u9", 10, "u2", "10.1.1.3:8080=1", "a"),
        (10, "u1", 10, "u2", "10.1.1.2:8080=1", "z"),
    ] {
        let c = two(
            aged("a", a_created, a_uid, 30080),
            aged("z", z_created, z_uid, 30081),
        );
        let t = run(&c);
        let (served, refused) = owner_and_refused(&t);
        assert_eq!(
            served,
            [winner],
            "{a_created}/{a_uid} vs {z_created}/{z_uid}"
        );
        let other = if loser == "a" { "z" } else { "a" };
        assert_eq!(
            refused,
            [format!(
                "Service default/{loser}: frontend 10.96.0.10:80/tcp: also claimed by Service default/{other}, which is older and keeps it; not served"
            )]
        );
        // Only the shared frontend is refused: the loser's node port is still served.
        assert_eq!(t.services.len(), 3, "{:?}", summary(&t));
    }
}

#[test]
fn a_newer_service_never_takes_a_live_frontend_and_its_drains_stay_its_own() {
    let mut tr = Translator::default();
    let now = Instant::now();
    let old = aged("z", 10, "u1", 30080);
    let c = cluster(
        old.clone(),
        vec![slice("z-1", "http", 8080, &[ready("10.1.1.3", "node1")])],
    );
    let t = tr.translate(&c, &node(), &BTreeSet::new(), now);
    assert_eq!(owner_and_refused(&t).0, ["10.1.1.3:8080=1"]);
    // A newer Service whose name sorts first claims the same VIP: nothing changes for it, and
    // the older one's backends are not drained by the claim.
    let c = two(aged("a", 20, "u2", 30081), old);
    for later in [0, 1, 400] {
        let t = tr.translate(
            &c,
            &node(),
            &BTreeSet::new(),
            now + Duration::from_secs(later),
        );
        let (served, refused) = owner_and_refused(&t);
        assert_eq!(served, ["10.1.1.3:8080=1"], "after {later} s");
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(t.end_flows.is_empty(), "{:?}", t.end_flows);
    }
}

#[test]
fn reserved_addresses_are_refused_as_ingress_ips_and_external_ips_but_not_as_node_ports() {
    let mut s = svc("web", &[ON], &[("ssh", 22, Some(30022))]);
    let spec = s.spec.as_mut().unwrap();
    spec.external_ips = Some(vec![
        "10.0.0.1".into(),
        "127.0.0.1".into(),
        "169.254.169.254".into(),
        "10.244.1.9".into(),
        "192.0.2.7".into(),
    ]);
    let c = cluster(
        s,
        vec![slice("web-1", "ssh", 2222, &[ready("10.1.1.2", "node1")])],
    );
    let mut n = node();
    n.reserved.ranges = vec!["10.244.0.0/16".parse().unwrap()];
    let t = Translator::default().translate(&c, &n, &BTreeSet::new(), Instant::now());
    let fronts: Vec<String> = summary(&t).into_keys().collect();
    // The node port is on the node's address by design.
    assert_eq!(
        fronts,
        [
            "10.0.0.1:30022/tcp",
            "10.96.0.10:22/tcp",
            "192.0.2.7:22/tcp"
        ]
    );
    let refused: Vec<String> = t.problems.iter().map(ToString::to_string).collect();
    for (vip, why) in [
        ("10.0.0.1", "an address of this node"),
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("10.244.1.9", "node.reserved-ranges"),
    ] {
        assert!(
            refused.iter().any(|p| p.starts_with(&format!(
                "Service default/web: frontend {vip}:22/tcp: {vip} is "
            )) && p.contains(why)
                && p.ends_with("; not served")),
            "{vip}: {refused:#?}"
        );
    }
    assert_eq!(refused.len(), 4, "{refused:#?}");
    // The node's pod range, as its Node says it, is the pods' (the older single field too).
    let mut c = c;
    c.node = Some(k8s_openapi::api::core::v1::Node {
        spec: Some(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidr: Some("10.244.1.0/24".into()),
            pod_cidrs: Some(vec!["10.244.1.0/24".into(), "fd00:244:1::/64".into()]),
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(
        c.node_pod_ranges(),
        [
            "10.244.1.0/24".parse().unwrap(),
            "fd00:244:1::/64".parse().unwrap()
        ]
    );
    n.reserved.ranges.clear();
    n.reserved.pod_ranges = c.node_pod_ranges();
    let t = Translator::default().translate(&c, &n, &BTreeSet::new(), Instant::now());
    let refused: Vec<String> = t.problems.iter().map(ToString::to_string).collect();
    assert!(
        refused.iter().any(|p| p.contains(
            "frontend 10.244.1.9:22/tcp: 10.244.1.9 is in 10.244.1.0/24, this node's pod range"
        )),
        "{refused:#?}"
    );
    assert_eq!(refused.len(), 4, "{refused:#?}");
    // A named exception may.
    n.reserved.allowed = ["default/web".to_string()].into();
    let t = Translator::default().translate(&c, &n, &BTreeSet::new(), Instant::now());
    assert_eq!(t.services.len(), 7, "{:?}", summary(&t));
    assert!(t.problems.is_empty(), "{:?}", t.problems);
}

#[test]
fn boolean_annotations_are_read_as_kubernetes_reads_them_and_others_reported() {
    for on in ["true", "True", "TRUE", "1", "t", " true "] {
        let c = cluster(svc("web", &[(ENABLED, on)], &[("http", 80, None)]), vec![]);
        let t = run(&c);
        assert_eq!(t.services.len(), 1, "{on:?} opts in");
        assert!(t.problems.is_empty(), "{on:?}: {:?}", t.problems);
    }
    for off in ["false", "False", "0", "f"] {
        let c = cluster(svc("web", &[(ENABLED, off)], &[("http", 80, None)]), vec![]);
        let t = run(&c);
        assert!(t.services.is_empty() && t.problems.is_empty(), "{off:?}");
    }
    let c = cluster(
        svc("web", &[(ENABLED, "yes")], &[("http", 80, None)]),
        vec![],
    );
    let t = run(&c);
    assert!(t.services.is_empty());
    assert_eq!(
        t.problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        [
            "Service default/web: xdplb.io/enabled: `yes` is not a boolean (true or false); the Service is not served"
        ]
    );
    // Our own enumerations, whatever their case; booleans as above.
    let c = cluster(
        svc(
            "web",
            &[ON, (MODE, "SNAT"), (DEREGISTRATION_RESET, "True")],
            &[("http", 80, None)],
        ),
        vec![],
    );
    let t = run(&c);
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    assert_eq!(t.services[0].mode, Mode::Snat);
    let c = cluster(
        svc(
            "web",
            &[ON, (DEREGISTRATION_RESET, "sometimes")],
            &[("http", 80, None)],
        ),
        vec![],
    );
    let fields: Vec<String> = run(&c).problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        fields,
        [
            "Service default/web: xdplb.io/deregistration-reset: `sometimes`: true or false; using false"
        ]
    );
}

#[test]
fn bad_endpoint_addresses_and_unmatched_port_names_are_reported() {
    let mut bad = slice(
        "web-1",
        "http",
        8080,
        &[ready("10.1.1.2", "node1"), ready("10.1.1.3", "node1")],
    );
    bad.endpoints.as_mut().unwrap()[1].addresses = vec!["10.1.1.999".into()];
    let c = cluster(
        svc("web", &[ON], &[("http", 80, None), ("metrics", 9090, None)]),
        vec![bad],
    );
    let t = run(&c);
    let s = summary(&t);
    assert_eq!(s["10.96.0.10:80/tcp"], ["10.1.1.2:8080=1"]);
    assert!(s["10.96.0.10:9090/tcp"].is_empty());
    assert_eq!(
        t.problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        [
            "Service default/web: EndpointSlice web-1: endpoint address `10.1.1.999` is not an IPv4 address; left out",
            "Service default/web: spec.ports[metrics]: no EndpointSlice of the Service has a port named `metrics`/TCP (does the targetPort name a port no pod has?); no endpoints for it",
        ]
    );
    // An externalIP no IP parser takes (Kubernetes' sloppy one takes leading zeros).
    let mut s = svc("web", &[ON], &[("http", 80, None)]);
    s.spec.as_mut().unwrap().external_ips = Some(vec!["192.0.2.07".into()]);
    let t = run(&cluster(s, vec![]));
    assert_eq!(
        t.problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["Service default/web: spec.externalIPs: `192.0.2.07` is not an IP address; not served"]
    );
    // No endpoints at all: nothing to say about ports.
    let c = cluster(
        svc("web", &[ON], &[("metrics", 9090, None)]),
        vec![slice("web-1", "http", 8080, &[])],
    );
    assert!(run(&c).problems.is_empty());
}

// ---- zone-aware routing ------------------------------------------------------------------------

/// A slice whose endpoints are in zones: (address, node, zone, ready).
fn zoned_slice(endpoints: &[(&str, &str, &str, bool)]) -> EndpointSlice {
    let eps: Vec<Ep<'_>> = endpoints
        .iter()
        .map(|(a, n, _, r)| (*a, *r, *r, false, *n, *a))
        .collect();
    let mut s = slice("web-1", "http", 8080, &eps);
    for (e, (_, _, zone, _)) in s.endpoints.as_mut().unwrap().iter_mut().zip(endpoints) {
        e.zone = Some(zone.to_string());
    }
    s
}

/// Node1 (zone-a) and node2 (zone-b), with node1x, another node in zone-a.
const TWO_ZONES: [(&str, &str, &str, bool); 4] = [
    ("10.1.1.2", "node1", "zone-a", true),
    ("10.1.3.2", "node1x", "zone-a", true),
    ("10.1.2.2", "node2", "zone-b", true),
    ("10.1.2.3", "node2", "zone-b", true),
];

fn in_zone_a() -> NodeInfo {
    NodeInfo {
        zone: Some("zone-a".into()),
        ..node()
    }
}

fn with_distribution(value: Option<&str>, annotations: &[(&str, &str)]) -> KubeService {
    let mut a = vec![ON];
    a.extend_from_slice(annotations);
    let mut s = svc("web", &a, &[("http", 80, None)]);
    s.spec.as_mut().unwrap().traffic_distribution = value.map(Into::into);
    s
}

fn zoned(t: &Translation) -> Vec<String> {
    summary(t)["10.96.0.10:80/tcp"].clone()
}

#[test]
fn traffic_distribution_keeps_new_flows_in_the_zone_or_on_the_node_and_the_rest_stands_by() {
    let c = cluster(
        with_distribution(Some("PreferClose"), &[]),
        vec![zoned_slice(&TWO_ZONES)],
    );
    let mut tr = Translator::default();
    let t = tr.translate(&c, &in_zone_a(), &BTreeSet::new(), Instant::now());
    assert_eq!(
        zoned(&t),
        [
            "10.1.1.2:8080=1",
            "10.1.2.2:8080=0",
            "10.1.2.3:8080=0",
            "10.1.3.2:8080=1"
        ],
        "zone-b's endpoints stay listed (their flows go on) but take no new flows"
    );
    let f = t.services[0].frontend;
    let standby: Vec<String> = t.standby.iter().map(|(_, (a, _))| a.to_string()).collect();
    assert_eq!(standby, ["10.1.2.2", "10.1.2.3"]);
    assert!(t.draining.is_empty());
    let r = &t.routing[&f];
    assert_eq!(
        (r.scope, r.taking, r.ready),
        (topology::Scope::SameZone, 2, 4)
    );
    assert_eq!(
        r.to_string(),
        "same zone (zone-a): 2 of 4 ready endpoints take new flows; asked by trafficDistribution PreferClose"
    );
    assert_eq!(t.zones[&"10.1.2.2".parse::<IpAddr>().unwrap()], "zone-b");
    assert_eq!(t.node_zone.as_deref(), Some("zone-a"));

    let c = cluster(
        with_distribution(Some("PreferSameNode"), &[]),
        vec![zoned_slice(&TWO_ZONES)],
    );
    assert_eq!(
        zoned(&tr.translate(&c, &in_zone_a(), &BTreeSet::new(), Instant::now())),
        [
            "10.1.1.2:8080=1",
            "10.1.2.2:8080=0",
            "10.1.2.3:8080=0",
            "10.1.3.2:8080=0"
        ]
    );
    // Standing by is not draining: nothing ends, whatever the time.
    let later = Instant::now() + Duration::from_secs(3600);
    let t = tr.translate(&c, &in_zone_a(), &BTreeSet::new(), later);
    assert!(t.end_flows.is_empty() && t.draining.is_empty());
}

#[test]
fn with_no_ready_endpoint_in_the_zone_every_ready_endpoint_takes_new_flows() {
    let mut eps = TWO_ZONES;
    eps[0].3 = false;
    eps[1].3 = false;
    let c = cluster(
        with_distribution(Some("PreferSameZone"), &[]),
        vec![zoned_slice(&eps)],
    );
    let t = Translator::default().translate(&c, &in_zone_a(), &BTreeSet::new(), Instant::now());
    assert_eq!(zoned(&t), ["10.1.2.2:8080=1", "10.1.2.3:8080=1"]);
    let r = &t.routing[&t.services[0].frontend];
    assert_eq!(
        r.to_string(),
        "all endpoints (no ready endpoint in zone zone-a): 2 of 2 ready endpoints take new flows; asked by trafficDistribution PreferSameZone"
    );
    // A node without a zone label: every endpoint.
    let c = cluster(
        with_distribution(Some("PreferSameZone"), &[]),
        vec![zoned_slice(&TWO_ZONES)],
    );
    assert_eq!(
        run(&c).services[0]
            .backends
            .iter()
            .filter(|b| b.weight == 1)
            .count(),
        4
    );
}

#[test]
fn a_service_that_asks_nothing_uses_every_endpoint_unless_the_node_option_says_same_zone() {
    let c = cluster(with_distribution(None, &[]), vec![zoned_slice(&TWO_ZONES)]);
    let t = Translator::default().translate(&c, &in_zone_a(), &BTreeSet::new(), Instant::now());
    assert!(t.services[0].backends.iter().all(|b| b.weight == 1));
    assert!(t.routing.is_empty() && t.standby.is_empty());

    let node = NodeInfo {
        prefer_same_zone: true,
        ..in_zone_a()
    };
    let t = Translator::default().translate(&c, &node, &BTreeSet::new(), Instant::now());
    assert_eq!(
        zoned(&t),
        [
            "10.1.1.2:8080=1",
            "10.1.2.2:8080=0",
            "10.1.2.3:8080=0",
            "10.1.3.2:8080=1"
        ]
    );
    assert!(
        t.routing[&t.services[0].frontend]
            .to_string()
            .ends_with("asked by the node option prefer-same-zone")
    );
    // A Service that says otherwise keeps its say: topology-mode Disabled, or a
    // trafficDistribution of its own.
    let c = cluster(
        with_distribution(None, &[(topology::TOPOLOGY_MODE, "Disabled")]),
        vec![zoned_slice(&TWO_ZONES)],
    );
    let t = Translator::default().translate(&c, &node, &BTreeSet::new(), Instant::now());
    assert!(t.services[0].backends.iter().all(|b| b.weight == 1));
    let c = cluster(
        with_distribution(Some("PreferSameNode"), &[]),
        vec![zoned_slice(&TWO_ZONES)],
    );
    let t = Translator::default().translate(&c, &node, &BTreeSet::new(), Instant::now());
    assert_eq!(
        t.services[0]
            .backends
            .iter()
            .filter(|b| b.weight == 1)
            .count(),
        1
    );
}

#[test]
fn the_slices_hints_are_followed_and_topology_mode_auto_needs_them() {
    use k8s_openapi::api::discovery::v1::{EndpointHints, ForZone};
    let auto = with_distribution(None, &[(topology::TOPOLOGY_MODE, "Auto")]);
    let c = cluster(auto.clone(), vec![zoned_slice(&TWO_ZONES)]);
    let t = Translator::default().translate(&c, &in_zone_a(), &BTreeSet::new(), Instant::now());
    assert!(
        t.services[0].backends.iter().all(|b| b.weight == 1),
        "no hints written yet: every endpoint"
    );
    let r = &t.routing[&t.services[0].frontend];
    assert_eq!(r.fallback, Some(topology::Fallback::MissingHints));
    // The controller allotted node2's first endpoint to zone-a too.
    let mut s = zoned_slice(&TWO_ZONES);
    for (e, zones) in s.endpoints.as_mut().unwrap().iter_mut().zip([
        &["zone-a"][..],
        &["zone-a"],
        &["zone-a", "zone-b"],
        &["zone-b"],
    ]) {
        e.hints = Some(EndpointHints {
            for_zones: Some(
                zones
                    .iter()
                    .map(|z| ForZone {
                        name: z.to_string(),
                    })
                    .collect(),
            ),
            for_nodes: None,
        });
    }
    for service in [auto, with_distribution(None, &[])] {
        let c = cluster(service, vec![s.clone()]);
        let t = Translator::default().translate(&c, &in_zone_a(), &BTreeSet::new(), Instant::now());
        assert_eq!(
            zoned(&t),
            [
                "10.1.1.2:8080=1",
                "10.1.2.2:8080=1",
                "10.1.2.3:8080=0",
                "10.1.3.2:8080=1"
            ],
            "hints are followed whoever asked for them (kube-proxy's rule)"
        );
    }
}

#[test]
fn external_traffic_policy_local_ignores_topology_and_bad_values_are_reported() {
    let mut s = with_distribution(Some("PreferSameZone"), &[]);
    s.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    let mut eps = TWO_ZONES;
    eps[2].1 = "node1"; // a zone-b endpoint on this node (as the slice says)
    let c = cluster(s, vec![zoned_slice(&eps)]);
    let t = Translator::default().translate(&c, &in_zone_a(), &BTreeSet::new(), Instant::now());
    assert_eq!(zoned(&t), ["10.1.1.2:8080=1", "10.1.2.2:8080=1"]);
    assert!(t.routing.is_empty());

    let c = cluster(
        with_distribution(Some("Nearby"), &[(topology::TOPOLOGY_MODE, "Sometimes")]),
        vec![zoned_slice(&TWO_ZONES)],
    );
    let t = Translator::default().translate(&c, &in_zone_a(), &BTreeSet::new(), Instant::now());
    let reasons: Vec<&str> = t.problems.iter().map(|p| p.reason).collect();
    assert_eq!(
        reasons,
        [
            reason::INVALID_ANNOTATION,
            reason::INVALID_TRAFFIC_DISTRIBUTION
        ]
    );
    assert!(t.services[0].backends.iter().all(|b| b.weight == 1));
}

#[test]
fn each_ip_family_is_chosen_apart_as_kube_proxy_runs_a_proxier_per_family() {
    let mut s = with_distribution(Some("PreferClose"), &[]);
    s.status
        .as_mut()
        .unwrap()
        .load_balancer
        .as_mut()
        .unwrap()
        .ingress = Some(vec![
        LoadBalancerIngress {
            ip: Some("10.96.0.10".into()),
            ..Default::default()
        },
        LoadBalancerIngress {
            ip: Some("fd00:96::10".into()),
            ..Default::default()
        },
    ]);
    // The IPv6 slice names no zones: IPv6 falls back to every endpoint, IPv4 stays in zone.
    let v6 = slice(
        "web-v6",
        "http",
        8080,
        &[ready("fd00:1:1::2", "node1"), ready("fd00:1:2::2", "node2")],
    );
    let c = cluster(s, vec![zoned_slice(&TWO_ZONES), v6]);
    let t = Translator::default().translate(&c, &in_zone_a(), &BTreeSet::new(), Instant::now());
    let sum = summary(&t);
    assert_eq!(
        sum["10.96.0.10:80/tcp"],
        [
            "10.1.1.2:8080=1",
            "10.1.2.2:8080=0",
            "10.1.2.3:8080=0",
            "10.1.3.2:8080=1"
        ]
    );
    assert_eq!(
        sum["[fd00:96::10]:80/tcp"],
        ["fd00:1:1::2:8080=1", "fd00:1:2::2:8080=1"]
    );
    let routing: Vec<String> = t.routing.values().map(ToString::to_string).collect();
    assert!(routing[0].starts_with("same zone (zone-a)"), "{routing:?}");
    assert!(
        routing[1].starts_with("all endpoints (not every ready endpoint has a zone)"),
        "{routing:?}"
    );
}

/// A small deterministic generator (xorshift), for sequences of changes.
pub(crate) struct Dice(pub(crate) u64);

impl Dice {
    pub(crate) fn below(&mut self, n: u16) -> u16 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        u16::try_from(self.0 % u64::from(n)).expect("below n")
    }

    pub(crate) fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[usize::from(self.below(u16::try_from(from.len()).expect("short")))]
    }

    pub(crate) fn chance(&mut self, percent: u16) -> bool {
        self.below(100) < percent
    }
}

/// A cluster changed as an API server changes it: every write of an object that has a
/// resourceVersion gives it a new one (some objects have none, as built by hand).
pub(crate) struct World {
    pub(crate) cluster: Cluster,
    pub(crate) node: NodeInfo,
    pub(crate) policies: BTreeSet<String>,
    pub(crate) now: Instant,
    pub(crate) version: u64,
}

pub(crate) const VIPS: [&str; 3] = ["10.96.0.10", "10.96.0.11", "10.96.0.12"];
const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

impl World {
    fn stamp(&mut self, meta: &mut ObjectMeta, versioned: bool) {
        self.version += 1;
        meta.resource_version = versioned.then(|| self.version.to_string());
    }

    fn random_service(&mut self, d: &mut Dice, name: &str) -> KubeService {
        let mut annotations = vec![ON];
        let weights = format!("10.1.1.{}=3", d.below(4) + 2);
        if d.chance(20) {
            annotations.push((WEIGHTS, weights.as_str()));
        }
        if d.chance(20) {
            annotations.push((RATE_LIMIT, "gold"));
        }
        if d.chance(30) {
            annotations.push((DEREGISTRATION_DELAY, *d.pick(&["0", "5", "30"])));
        }
        if d.chance(20) {
            annotations.push((topology::TOPOLOGY_MODE, "Auto"));
        }
        let node_port = 30080 + i32::from(d.below(3));
        let mut ports = vec![("http", 80, Some(node_port))];
        if d.chance(40) {
            ports.push(("https", 443, None));
        }
        let mut s = svc(name, &annotations, &ports);
        let spec = s.spec.as_mut().unwrap();
        if d.chance(25) {
            spec.external_traffic_policy = Some("Local".into());
            spec.health_check_node_port = Some(32000 + i32::from(d.below(3)));
        }
        if d.chance(20) {
            spec.traffic_distribution = Some("PreferClose".into());
        }
        if d.chance(15) {
            spec.external_ips = Some(vec![d.pick(&VIPS).to_string()]);
        }
        let ingress = s.status.as_mut().unwrap().load_balancer.as_mut().unwrap();
        ingress.ingress.as_mut().unwrap()[0].ip = Some(d.pick(&VIPS).to_string());
        s.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::from_second(1_700_000_000 + i64::from(d.below(4))).unwrap(),
        ));
        s.metadata.uid = Some(format!("uid-{name}-{}", d.below(1000)));
        let versioned = d.chance(70);
        self.stamp(&mut s.metadata, versioned);
        s
    }

    fn random_slice(&mut self, d: &mut Dice, name: &str) -> EndpointSlice {
        let endpoints: Vec<Ep<'_>> = (0..d.below(4))
            .map(|_| {
                let ready = d.chance(75);
                let addr = *d.pick(&["10.1.1.2", "10.1.1.3", "10.1.1.4", "10.1.1.5"]);
                (
                    addr,
                    ready,
                    ready || d.chance(50),
                    !ready,
                    *d.pick(&["node1", "node2"]),
                    addr,
                )
            })
            .collect();
        let mut s = slice(name, "http", 8080 + i32::from(d.below(2)), &endpoints);
        for e in s.endpoints.iter_mut().flatten() {
            e.zone = d
                .chance(70)
                .then(|| d.pick(&["zone-a", "zone-b"]).to_string());
        }
        let versioned = d.chance(70);
        self.stamp(&mut s.metadata, versioned);
        s
    }

    pub(crate) fn change(&mut self, d: &mut Dice) -> String {
        let name = *d.pick(&NAMES);
        let key: ObjectKey = ("default".into(), name.into());
        match d.below(10) {
            0..=2 => {
                let s = self.random_service(d, name);
                self.cluster.touch(&key);
                self.cluster.services.insert(key, s.into());
                format!("service {name} written")
            }
            3 => {
                self.cluster.touch(&key);
                self.cluster.services.remove(&key);
                format!("service {name} deleted")
            }
            4..=6 => {
                let slice_name = format!("{name}-{}", d.below(2));
                let s = self.random_slice(d, &slice_name);
                self.cluster.touch(&key);
                self.cluster
                    .slices
                    .entry(key)
                    .or_default()
                    .insert(slice_name.clone(), Box::new(s.into()));
                format!("slice {slice_name} written")
            }
            7 => {
                self.cluster.touch(&key);
                if let Some(slices) = self.cluster.slices.get_mut(&key) {
                    slices.pop_first();
                }
                self.cluster.slices.retain(|_, v| !v.is_empty());
                format!("a slice of {name} deleted")
            }
            8 => match d.below(5) {
                0 => {
                    self.node.zone = d
                        .pick(&[None, Some("zone-a"), Some("zone-b")])
                        .map(Into::into);
                    format!("node zone {:?}", self.node.zone)
                }
                1 => {
                    let two = d.chance(50);
                    self.node.addrs = ["10.0.0.1", "10.0.0.2"][..if two { 2 } else { 1 }]
                        .iter()
                        .map(|a| a.parse().unwrap())
                        .collect();
                    format!("node addresses {:?}", self.node.addrs)
                }
                2 => {
                    let vip: IpAddr = d.pick(&VIPS).parse().unwrap();
                    if !self.node.reserved.node_addrs.remove(&vip) {
                        self.node.reserved.node_addrs.insert(vip);
                    }
                    format!("reserved {:?}", self.node.reserved.node_addrs)
                }
                3 => {
                    self.node.prefer_same_zone = !self.node.prefer_same_zone;
                    format!("prefer same zone {}", self.node.prefer_same_zone)
                }
                _ => {
                    if !self.policies.remove("gold") {
                        self.policies.insert("gold".into());
                    }
                    format!("named policies {:?}", self.policies)
                }
            },
            _ => {
                let secs = d.below(20);
                self.now += Duration::from_secs(u64::from(secs));
                format!("{secs} s later")
            }
        }
    }
}

/// Everything a translator keeps besides its cache, for comparing two.
fn kept(t: &Translator) -> String {
    format!("{:?}\n{:?}", t.previous, t.drain_state())
}

#[test]
fn a_translation_from_cached_parts_equals_one_from_scratch_after_any_changes() {
    for seed in 1..=40u64 {
        let mut d = Dice(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut world = World {
            cluster: Cluster::default(),
            node: node(),
            policies: BTreeSet::new(),
            now: Instant::now(),
            version: 0,
        };
        // The Services changed, as the watchers note them (now and then a fresh list: any).
        world.cluster.touched = Some(BTreeSet::new());
        let (mut cached, mut scratch) = (Translator::default(), Translator::default());
        let mut keyed = Translator::default();
        let mut history = Vec::new();
        let mut before: Option<Translation> = None;
        for _ in 0..80 {
            history.push(world.change(&mut d));
            if d.chance(5) {
                world.cluster.touched = None;
                history.push("listed again".into());
            }
            let touched = world.cluster.take_touched();
            let by_key = keyed.translate_touched(
                &world.cluster,
                &world.node,
                &world.policies,
                world.now,
                touched.as_ref(),
            );
            let a = cached.translate(&world.cluster, &world.node, &world.policies, world.now);
            scratch.cache.clear();
            scratch.served.clear();
            let mut b = scratch.translate(&world.cluster, &world.node, &world.policies, world.now);
            // The changed frontends: those the cached translator says, at least.
            let mut a = a;
            if let (Some(changed), Some(before)) = (&a.changed, &before) {
                let served = |t: &Translation| -> BTreeMap<Frontend, Service> {
                    t.services
                        .iter()
                        .map(|s| (s.frontend, Service::clone(s)))
                        .collect()
                };
                let (now, was) = (served(&b), served(before));
                for f in now.keys().chain(was.keys()) {
                    assert!(
                        now.get(f) == was.get(f) || changed.contains(f),
                        "seed {seed}: {f} changed, not said, after {history:#?}"
                    );
                }
            }
            // The Services touched, looked at alone, give what looking at all of them gives.
            let mut by_key = by_key;
            assert_eq!(by_key.changed, a.changed, "seed {seed} after {history:#?}");
            (a.changed, b.changed, by_key.changed) = (None, None, None);
            assert_eq!(
                format!("{by_key:#?}"),
                format!("{a:#?}"),
                "seed {seed} after {history:#?}"
            );
            assert_eq!(
                kept(&keyed),
                kept(&cached),
                "seed {seed} after {history:#?}"
            );
            before = Some(b.clone());
            assert_eq!(
                format!("{a:#?}"),
                format!("{b:#?}"),
                "seed {seed} after {history:#?}"
            );
            assert_eq!(
                kept(&cached),
                kept(&scratch),
                "seed {seed} after {history:#?}"
            );
        }
    }
}

#[test]
fn a_cached_part_is_used_while_its_objects_keep_their_versions_and_not_after() {
    let mut s = svc("web", &[ON], &[("http", 80, None)]);
    s.metadata.resource_version = Some("1".into());
    let mut sl = slice("web-1", "http", 8080, &[ready("10.1.1.2", "node1")]);
    sl.metadata.resource_version = Some("2".into());
    let mut c = cluster(s, vec![sl]);
    let (mut tr, none, now) = (Translator::default(), BTreeSet::new(), Instant::now());
    let key: ObjectKey = ("default".into(), "web".into());
    tr.translate(&c, &node(), &none, now);
    // Mark the cached part: a translation that used it keeps the mark (once the service last
    // given is forgotten).
    tr.cache.get_mut(&key).unwrap().part.offers[0].service.name = "marked".into();
    let t = tr.translate(&c, &node(), &none, now);
    assert_eq!(
        t.services[0].name, "default/web:http",
        "the service given last time"
    );
    tr.served.clear();
    let t = tr.translate(&c, &node(), &none, now);
    assert_eq!(t.services[0].name, "marked");
    // A new version of the slice: translated again.
    let sl = c.slices.get_mut(&key).unwrap().get_mut("web-1").unwrap();
    sl.endpoints.as_mut().unwrap()[0].addresses = vec!["10.1.1.3".into()];
    sl.metadata.resource_version = Some("3".into());
    let t = tr.translate(&c, &node(), &none, now);
    assert_eq!(t.services[0].name, "default/web:http");
    assert_eq!(
        summary(&t)["10.96.0.10:80/tcp"],
        ["10.1.1.2:8080=0", "10.1.1.3:8080=1"]
    );
    // Another node input: every part translated again.
    tr.cache.get_mut(&key).unwrap().part.offers[0].service.name = "marked".into();
    let t = tr.translate(&c, &in_zone_a(), &none, now);
    assert_eq!(t.services[0].name, "default/web:http");
    // Named policies too.
    tr.cache.get_mut(&key).unwrap().part.offers[0].service.name = "marked".into();
    let t = tr.translate(&c, &in_zone_a(), &["gold".to_string()].into(), now);
    assert_eq!(t.services[0].name, "default/web:http");
    // A re-created Service (same name and version, a new uid): translated again.
    tr.cache.get_mut(&key).unwrap().part.offers[0].service.name = "marked".into();
    c.services.get_mut(&key).unwrap().metadata.uid = Some("new".into());
    let t = tr.translate(&c, &in_zone_a(), &["gold".to_string()].into(), now);
    assert_eq!(t.services[0].name, "default/web:http");
}

#[test]
fn when_the_older_of_two_claimants_goes_the_newer_takes_the_frontend_from_its_cached_part() {
    let mut older = aged("z", 10, "u1", 30080);
    let mut newer = aged("a", 20, "u2", 30081);
    older.metadata.resource_version = Some("1".into());
    newer.metadata.resource_version = Some("2".into());
    let mut c = two(newer, older);
    for slices in c.slices.values_mut() {
        for s in slices.values_mut() {
            s.metadata.resource_version = Some("3".into());
        }
    }
    let (mut tr, none, now) = (Translator::default(), BTreeSet::new(), Instant::now());
    let mut scratch = Translator::default();
    let t = tr.translate(&c, &node(), &none, now);
    scratch.translate(&c, &node(), &none, now);
    assert_eq!(owner_and_refused(&t).0, ["10.1.1.3:8080=1"]);
    assert_eq!(owner_and_refused(&t).1.len(), 1);
    c.services.remove(&("default".to_string(), "z".to_string()));
    let t = tr.translate(&c, &node(), &none, now + Duration::from_secs(1));
    // The frontend is the newer one's now; the older one's backend drains through it.
    let (served, refused) = owner_and_refused(&t);
    assert_eq!(served, ["10.1.1.2:8080=1", "10.1.1.3:8080=0"]);
    assert!(refused.is_empty(), "{refused:?}");
    scratch.cache.clear();
    scratch.served.clear();
    let mut fresh = scratch.translate(&c, &node(), &none, now + Duration::from_secs(1));
    let mut t = t;
    assert!(
        t.changed
            .as_ref()
            .unwrap()
            .contains(&t.services[0].frontend)
    );
    (t.changed, fresh.changed) = (None, None);
    assert_eq!(format!("{t:?}"), format!("{fresh:?}"));
    assert_eq!(kept(&tr), kept(&scratch));
}
