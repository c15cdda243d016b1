//! `lb-agent check` and a reload of the running agent agree: a table of bad configs, each
//! refused by both for the same reason (or, for the rules that need the live node, passed by
//! `check` with that rule named as unchecked, and refused by the reload on a node that breaks
//! it, and by `check` given that node).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use super::*;
use crate::{model, tables::Tables};

const FILE: &str = "lb.toml";

const GOOD: &str = r#"
[node]
snat-ipv4 = "10.0.0.1"

[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
protocol = "tcp"
backends = [{ address = "10.1.1.2", port = 8080 }, { address = "10.1.2.2", port = 8080 }]
"#;

fn sizes() -> Sizes {
    Sizes {
        max_services: 4,
        max_backends: 8,
        ring_size: 251,
        ..Sizes::default()
    }
}

/// The node the reload runs on: 10.1.1.0/24 local, no IPv6 address.
fn node() -> NodeView {
    NodeView {
        snat_ipv4: vec![Ipv4Addr::new(10, 0, 0, 1)],
        snat_ipv6: Vec::new(),
        node_addrs: [IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))].into(),
        local: (2..=9)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 1, 1, i)))
            .collect(),
        broadcast: std::collections::BTreeSet::default(),
        ephemeral_ports: None,
    }
}

/// A running agent's state as far as reloads go: its reconciler and maps, with GOOD applied.
struct Running {
    reconciler: Reconciler,
    tables: MemoryTables,
}

impl Running {
    fn new() -> Running {
        let mut r = Running {
            reconciler: Reconciler::new(sizes()),
            tables: MemoryTables::default(),
        };
        r.reload(GOOD).expect("the good config applies");
        r
    }

    /// What the agent does with a changed config file: parse, compose with the (here empty)
    /// cluster input, take the node's view, admit and apply.
    fn reload(&mut self, text: &str) -> Result<(), String> {
        let file = config::parse(Path::new(FILE), text).map_err(|e| e.to_string())?;
        let (composed, _) = model::compose(&file, &[], &BTreeMap::new());
        self.reconciler
            .apply_admitting(&composed, &node(), &mut self.tables)
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

fn check_text(text: &str, node: Option<&NodeView>) -> Result<Checked, String> {
    let desired = config::parse(Path::new(FILE), text).map_err(|e| e.to_string())?;
    check(&desired, sizes(), node).map_err(|e| e.to_string())
}

fn service(name: &str, vip: &str, mode: &str, backends: &[&str]) -> String {
    let backends: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address = \"{a}\", port = 8080 }}"))
        .collect();
    format!(
        "\n[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\nmode = \"{mode}\"\nbackends = [{}]\n",
        backends.join(", ")
    )
}

fn many_policies(n: usize) -> String {
    let mut text = String::new();
    for i in 0..n {
        let _ = write!(text, "[rate-limits.p{i}]\npackets-per-second = 10\n");
    }
    text
}

#[test]
fn check_and_reload_refuse_the_same_configs() {
    let snat = "[node]\nsnat-ipv4 = \"10.0.0.1\"\n";
    let five_services: String = (1..=5)
        .map(|i| {
            service(
                &format!("s{i}"),
                &format!("10.96.0.{i}"),
                "snat",
                &["10.1.1.2"],
            )
        })
        .collect();
    let nine_backends = service(
        "big",
        "10.96.0.1",
        "snat",
        &[
            "10.1.1.2", "10.1.1.3", "10.1.1.4", "10.1.1.5", "10.1.1.6", "10.1.1.7", "10.1.1.8",
            "10.1.1.9", "10.1.2.2",
        ],
    );
    // (what, config, what both say)
    let table: Vec<(&str, String, &str)> = vec![
        ("syntax", "[node\n".into(), "lb.toml:1:"),
        ("unknown field", "[node]\nhash-sed = 1\n".into(), "hash-sed"),
        (
            "weight",
            format!(
                "{snat}{}",
                service("w", "10.96.0.1", "snat", &[]).replace(
                    "backends = []",
                    "backends = [{ address = \"10.1.1.2\", weight = 70000 }]"
                )
            ),
            "70000 is over the maximum 65535",
        ),
        (
            "a frontend twice",
            format!(
                "{snat}{}{}",
                service("a", "10.96.0.1", "snat", &[]),
                service("b", "10.96.0.1", "snat", &[])
            ),
            "is already served by `a`",
        ),
        (
            "more services than --max-services",
            format!("{snat}{five_services}"),
            "too many services",
        ),
        (
            "more backends than --max-backends",
            format!("{snat}{nine_backends}"),
            "too many backends",
        ),
        (
            "more policy slots than the data path holds",
            format!("{snat}{}", many_policies(lb_common::MAX_POLICIES as usize)),
            "too many rate-limit policies",
        ),
    ];
    for (what, text, says) in &table {
        let checked = check_text(text, None);
        let mut running = Running::new();
        let before = running.tables.clone();
        running.tables.take_log();
        let reloaded = running.reload(text);
        let (Err(c), Err(r)) = (&checked, &reloaded) else {
            panic!("{what}: check {checked:?}, reload {reloaded:?}: both must refuse");
        };
        assert!(c.contains(says), "{what}: check says {c}");
        assert!(r.contains(says), "{what}: reload says {r}");
        assert!(
            running.tables.log.is_empty(),
            "{what}: a refused reload writes nothing"
        );
        assert_eq!(running.tables.services, before.services, "{what}");
    }
}

#[test]
fn rules_that_need_the_node_are_named_without_it_and_checked_with_it() {
    // (what, config, the unchecked rule's words, what a reload on node() says)
    let table = [
        (
            "a service on the node's own address",
            service("ssh", "10.0.0.1", "snat", &["10.1.1.2"]),
            "services on the node's own addresses",
            "service `ssh` (10.0.0.1:80/tcp): 10.0.0.1 is an address of this node: a service may not claim it",
        ),
        (
            "preserve-client-ip with a remote backend",
            format!(
                "[node]\nsnat-ipv4 = \"10.0.0.1\"\n{}",
                service("p", "10.96.0.5", "preserve-client-ip", &["10.1.2.2"])
            ),
            "preserve-client-ip needs every backend reachable",
            "10.1.2.2:8080 is not reachable through a backend interface",
        ),
        (
            "snat over IPv6 on a node without an IPv6 address",
            service("v6", "fd00:96::1", "snat", &["fd00:1::2"]),
            "snat over IPv6 needs a source address, and node.snat-ipv6 is not set",
            "snat needs an IPv6 source address",
        ),
    ];
    for (what, text, unchecked, refused) in &table {
        let checked = check_text(text, None).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            checked.unchecked.iter().any(|u| u.contains(unchecked)),
            "{what}: {:?}",
            checked.unchecked
        );
        let reloaded = Running::new().reload(text).unwrap_err();
        assert!(reloaded.contains(refused), "{what}: reload says {reloaded}");
        // Given the node (--uplink), check refuses as the reload does.
        let with_node = check_text(text, Some(&node())).unwrap_err();
        assert_eq!(with_node, reloaded, "{what}");
    }
}

#[test]
fn every_invalid_service_is_reported_at_once() {
    let text = format!(
        "{}{}{}",
        service("p1", "10.96.0.5", "preserve-client-ip", &["10.1.2.2"]),
        service("p2", "10.96.0.6", "preserve-client-ip", &["10.1.2.3"]),
        service("v6", "fd00:96::1", "snat", &["fd00:1::2"]),
    );
    let e = Running::new().reload(&text).unwrap_err();
    for name in ["`p1`", "`p2`", "`v6`"] {
        assert!(e.contains(name), "{name} missing from: {e}");
    }
    assert_eq!(e.lines().count(), 3, "{e}");
    assert_eq!(check_text(&text, Some(&node())).unwrap_err(), e);
}

#[test]
fn a_good_config_passes_both_and_says_what_was_assumed() {
    let checked = check_text(GOOD, None).unwrap();
    assert_eq!((checked.services, checked.policies), (1, 0));
    // snat-ipv4 is set and nothing preserves: only the node's addresses are unknown.
    assert_eq!(checked.unchecked.len(), 1, "{:?}", checked.unchecked);
    assert!(
        checked.unchecked[0].contains("services on the node's own addresses"),
        "{:?}",
        checked.unchecked
    );
    let mut running = Running::new();
    running.reload(GOOD).unwrap();
    assert!(running.tables.snapshot().unwrap().services.len() == 1);
}
