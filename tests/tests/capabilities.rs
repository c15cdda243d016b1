//! The agent under exactly the capabilities the DaemonSet grants it (read from
//! deploy/base/daemonset.yaml, so the list there cannot rot): `setpriv` drops every other one
//! from the bounding, inheritable and ambient sets before the agent starts (as root, as in the
//! container). Start without --iface (the uplink comes from the default route), apply, real
//! TCP and UDP in both modes with a pod whose veth needs GRO turned on in its namespace, the
//! separate scrape address, a restart that takes over, and the uninstall helper's `lb-agent
//! cleanup` under its own, smaller set. And each capability is needed: without it the agent
//! fails to start or to do part of its job.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use lb_tests::{
    agent::{AgentOptions, AgentProcess, Bpffs},
    lab::Lab,
    netns::{gro_enabled, require_root},
    traffic::{Batch, Proto, serve_pods},
};
use serde_json::Value;

const VIP: &str = "10.96.0.10";
const LOCAL_VIP: &str = "10.96.0.11";
const PORT: u16 = 8080;
/// Where the agent serves /metrics alone (--scrape-addr), on node1's uplink address.
const SCRAPE: &str = "10.0.0.1:9436";

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy")
        .join(file)
}

/// The capabilities `container` of the DaemonSet in `file` adds (it drops ALL).
fn capabilities(file: &str, container: &str) -> Vec<String> {
    let text = std::fs::read_to_string(deploy(file)).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let spec = &ds["spec"]["template"]["spec"];
    let c = spec["containers"]
        .as_array()
        .into_iter()
        .chain(spec["initContainers"].as_array())
        .flatten()
        .find(|c| c["name"] == container)
        .unwrap_or_else(|| panic!("{file}: no container {container}"));
    let caps = &c["securityContext"]["capabilities"];
    assert_eq!(
        caps["drop"],
        serde_json::json!(["ALL"]),
        "{file}: {container}"
    );
    caps["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

/// `setpriv` keeping exactly `caps` (Kubernetes names: BPF, NET_ADMIN, ...) for a root process
/// and what it executes.
fn setpriv(caps: &[String]) -> Vec<String> {
    let set: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        "setpriv".into(),
        format!("--inh-caps={set}"),
        format!("--ambient-caps={set}"),
        format!("--bounding-set={set}"),
        // allowPrivilegeEscalation: false.
        "--no-new-privs".into(),
        "--".into(),
    ]
}

fn config() -> String {
    let b = |addrs: &[&str]| {
        addrs
            .iter()
            .map(|a| format!("  {{ address = \"{a}\", port = {PORT} }},"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    format!(
        "[node]\nhash-seed = 7\n\n\
         [[services]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\nbackends = [\n{all}\n]\n\n\
         [[services]]\nname = \"dns\"\nvip = \"{VIP}\"\nport = 53\nprotocol = \"udp\"\nbackends = [\n{all}\n]\n\n\
         [[services]]\nname = \"local\"\nvip = \"{LOCAL_VIP}\"\nport = 80\nprotocol = \"tcp\"\nmode = \"preserve-client-ip\"\nbackends = [\n{local}\n]\n",
        all = b(&["10.1.1.2", "10.1.1.3", "10.1.2.2", "10.1.2.3"]),
        local = b(&["10.1.1.2"]),
    )
}

/// A lab whose node1 has a default route (the agent finds its uplink by it) and whose pod1 has
/// no XDP program of its own (the agent must turn GRO on in pod1's namespace to redirect to it).
fn lab(name: &str) -> Lab {
    let mut lab = Lab::build(name).expect("lab");
    lab.node1()
        .ns
        .ip(&["route", "add", "default", "via", "10.0.0.2", "dev", "eth0"])
        .expect("default route");
    lab.detach_pod_xdp("pod1").expect("detach pod1's XDP");
    lab
}

fn options(caps: &[String]) -> AgentOptions {
    let mut o = AgentOptions {
        uplink: String::new(),
        wrapper: setpriv(caps),
        ..AgentOptions::default()
    };
    o.extra.extend([
        "--keep-on-exit".to_string(),
        "--scrape-addr".to_string(),
        SCRAPE.to_string(),
    ]);
    o
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn traffic(lab: &Lab, agent: &AgentProcess) {
    for (proto, dst) in [
        (Proto::Tcp, addr(VIP, 80)),
        (Proto::Udp, addr(VIP, 53)),
        (Proto::Tcp, addr(LOCAL_VIP, 80)),
    ] {
        let r = Batch::new(proto, dst, lab.client().sources_for(dst.ip()), 40)
            .deadline(Duration::from_secs(30))
            .run(&lab.client().ns)
            .expect("batch");
        assert!(
            r.all_ok() && r.ok == 40,
            "{proto:?} to {dst}: {:?}\n{}",
            r.errors,
            agent.log_tail()
        );
    }
}

/// An HTTP GET from the client's namespace: (status line, body).
fn http_get(lab: &Lab, target: &'static str, path: &'static str) -> (String, String) {
    use std::io::{Read, Write};
    lab.client()
        .ns
        .run(move || {
            let mut s = std::net::TcpStream::connect_timeout(
                &target.parse().unwrap(),
                Duration::from_secs(2),
            )
            .expect("connect to the scrape address");
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            (
                head.lines().next().unwrap_or("").to_string(),
                body.to_string(),
            )
        })
        .unwrap()
}

#[test]
fn the_daemonsets_capabilities_carry_the_agent_through_start_traffic_takeover_and_cleanup() {
    if !require_root() {
        return;
    }
    let caps = capabilities("base/daemonset.yaml", "agent");
    let bpffs = Bpffs::mount("caps").expect("bpffs");
    let lab = lab("caps");
    let _servers = serve_pods(lab.pods(), PORT).expect("servers");
    let mut agent =
        AgentProcess::start(&lab.node1().ns, &bpffs, &config(), options(&caps)).expect("agent");
    let log = std::fs::read_to_string(agent.state_dir().join("agent.log")).unwrap();
    assert!(
        log.contains("uplinks (the interfaces of the default routes): eth0"),
        "{log}"
    );
    let gro = lab
        .pod("pod1")
        .unwrap()
        .ns
        .run(|| gro_enabled("eth0"))
        .unwrap()
        .unwrap();
    assert!(gro, "the agent turned GRO on in pod1's namespace\n{log}");
    traffic(&lab, &agent);
    let status = agent.status().unwrap();
    assert!(
        status["counters"]["xdp_redirect"].as_u64().unwrap_or(0) >= 40,
        "redirected to the local pod: {status}"
    );
    // The scrape address serves the metrics and nothing else; the probes stay on localhost.
    let (code, body) = http_get(&lab, SCRAPE, "/metrics");
    assert!(code.contains(" 200"), "{code}");
    assert!(body.contains("xdplb_interface_attached"), "{body}");
    let (code, _) = http_get(&lab, SCRAPE, "/healthz");
    assert!(
        code.contains(" 404"),
        "probes are not on the scrape address: {code}"
    );

    agent
        .restart()
        .expect("restart under the same capabilities");
    let interfaces = agent.status().unwrap()["interfaces"].clone();
    assert!(
        interfaces.as_array().is_some_and(|a| a.len() == 3
            && a.iter().all(|i| i["note"]
                .as_str()
                .is_some_and(|n| n.starts_with("took over")))),
        "{interfaces}"
    );
    traffic(&lab, &agent);
    agent.stop().expect("stop");

    // The uninstall helper's container, with its own capabilities.
    let cleanup_caps = capabilities("uninstall/cleanup-daemonset.yaml", "cleanup");
    let mut cmd = lab.node1().ns.command("setpriv");
    cmd.args(&setpriv(&cleanup_caps)[1..])
        .arg(lb_tests::agent::agent_binary().unwrap())
        .arg("cleanup")
        .arg("--pin-dir")
        .arg(agent.pin_dir())
        .arg("--state-dir")
        .arg(agent.state_dir());
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "cleanup with {cleanup_caps:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uplink = lab
        .node1()
        .ns
        .ip(&["-d", "link", "show", "dev", "eth0"])
        .unwrap();
    assert!(!uplink.contains("prog/xdp"), "detached: {uplink}");
    let left: Vec<_> = std::fs::read_dir(agent.pin_dir())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pins left: {left:?}");
}

/// What the agent does without `missing`: Err(why it did not start), or Ok(whether it turned
/// GRO on at pod1's end).
fn without(missing: &[&str]) -> Result<bool, String> {
    let caps: Vec<String> = capabilities("base/daemonset.yaml", "agent")
        .into_iter()
        .filter(|c| !missing.contains(&c.as_str()))
        .collect();
    let name = format!("no{}", missing.join("").to_lowercase().replace('_', ""));
    let bpffs = Bpffs::mount(&name).expect("bpffs");
    let lab = lab(&name);
    let agent = AgentProcess::start(&lab.node1().ns, &bpffs, &config(), options(&caps))
        .map_err(|e| e.to_string())?;
    let gro = lab
        .pod("pod1")
        .unwrap()
        .ns
        .run(|| gro_enabled("eth0"))
        .unwrap()
        .unwrap();
    if !gro {
        let log = std::fs::read_to_string(agent.state_dir().join("agent.log")).unwrap();
        assert!(
            log.contains("vethpod1: not redirecting into it"),
            "said so: {log}"
        );
    }
    Ok(gro)
}

/// Each capability is needed. SYS_ADMIN also grants what BPF, PERFMON and NET_ADMIN grant to
/// bpf() (the kernel's bpf_capable(), perfmon_capable() and bpf_net_capable() accept it), so
/// for bpf() those are shown needed without SYS_ADMIN; they are listed for what the agent does
/// with them, so that SYS_ADMIN (for entering pod namespaces) can go where that is not needed.
#[test]
fn without_any_one_of_them_the_agent_cannot_do_its_job() {
    if !require_root() {
        return;
    }
    assert_eq!(
        capabilities("base/daemonset.yaml", "agent"),
        ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"]
    );
    // Netlink and ethtool changes (GRO at pod ends, neighbours, qdiscs) need NET_ADMIN itself.
    assert_eq!(
        without(&["NET_ADMIN"]),
        Ok(false),
        "without NET_ADMIN the agent runs but cannot turn GRO on"
    );
    assert_eq!(
        without(&["SYS_ADMIN"]),
        Ok(false),
        "without SYS_ADMIN the agent runs but cannot enter pod namespaces"
    );
    for also in ["BPF", "PERFMON", "NET_ADMIN"] {
        let e = without(&["SYS_ADMIN", also]).expect_err(also);
        eprintln!(
            "without SYS_ADMIN and {also}: {}",
            e.lines().next().unwrap_or("")
        );
    }
}
