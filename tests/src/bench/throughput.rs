//! Throughput over veths, side by side, in one run on one topology (rebuilt fresh for each
//! path so no path inherits another's state):
//!
//! ```text
//!  ns gen                    ns lb (the node)                          ns rcv
//!  g0 ───────────────────── up0  10.0.0.1/16   be0 10.2.0.1/24 ────── rcv0 10.2.0.2/24
//!  bench_gen (live frames)   path under test   route 10.1.0.0/16        backends 10.1.0.2-11
//!                                              via 10.2.0.2             xdp_sink counts
//! ```
//! The generator is the tools object's `bench_gen` run with BPF_PROG_RUN in live-frames mode:
//! each frame it returns XDP_TX leaves g0 for up0. It rebuilds every frame from a template and
//! varies it itself (pages are recycled without being re-copied): the "many flows" mix is
//! 16384 TCP flows from 1024 sources, round robin; the "flood" mix is a TCP SYN from a new
//! source address every packet. 64-byte frames. Packets are counted where they arrive, never
//! at the sender: by `xdp_sink` (count, drop) on rcv0 for forwarded traffic, and on the node's
//! uplink for what the node took in ("absorbed": a frame that found the uplink's ring full never
//! reaches its program).
//!
//! Paths: XDP_DROP on up0 (floor), XDP_TX on up0 back to g0 (floor), our data path on up0
//! redirecting to be0 (limiter off and on), our data path with be0 behind a policy hook (the
//! `kernel` delivery: `lb_uplink` rewrites, marks and passes each packet, `lb_uplink_tc` on
//! up0's TC ingress redirects it to be0's egress; limiter on), and the kernel path users run today for the same
//! service: nftables rules as kube-proxy's nftables mode writes them (DNAT to a random
//! endpoint, masquerade for traffic from outside the cluster) with kernel forwarding, behind
//! `xdp_count` (count, pass) on up0.
//!
//! CPU cost: at fixed offered loads, the share of all CPU time spent in softirq, and busy,
//! from /proc/stat deltas (the whole machine: the generator's own time is in `system`).
//! Generator, node and receiver share the machine's CPUs, so compare paths within one run.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{TcAttachType, XdpMode, tc::SchedClassifierLinkId, xdp::XdpLinkId},
};
use lb_common::{Counter, PROG_UPLINK, PROG_UPLINK_TC};
use lb_userspace::{
    dataplane::{self, Maps, Sizes},
    model::{Backend, Desired, Frontend, Limits, Mode, Policy, Protocol, Rate, Service, TableFull},
    node::NodeView,
    reconcile::Reconciler,
    tables::Tables as _,
};

use super::{
    Scale, pin_thread,
    tools::{BenchTools, SocketGen, Vary, live_frames, live_frames_allowed},
};
use crate::{
    netns::{Netns, remove_stale},
    packets::{Spec, TCP_ACK, TCP_SYN},
};

const PREFIX: &str = "xdplb-bench";
const VIP: &str = "10.96.0.10";
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const BACKENDS: u32 = 10;
/// Many-flows mix: 1024 sources x 16 ports from 10.0.4.0:10000.
const MIX_SOURCES: u32 = 1024;
const MIX_FLOWS: u32 = 16384;
/// Frames per live-frames run at full speed, and per kernel batch (the most it takes).
const CHUNK_MIN: u32 = 65_536;
const CHUNK_MAX: u32 = 262_144;
const BATCH: u32 = 256;
/// Generator start flag states.
const WAIT: u8 = 0;
const GO: u8 = 1;
const ABORT: u8 = 2;
/// Sequence numbers between generator threads (a flood's new sources are base + n).
const THREAD_SEQ_STRIDE: u64 = 1 << 21;
/// Flood sources: 10.128.0.0/9, reused only after 8M packets.
const FLOOD_SOURCES: u32 = 1 << 23;
/// The flood runs this many measurement times untimed before it is timed.
pub const FLOOD_LEAD: f64 = 3.0;
/// CPU the generator runs on (the node's softirq work runs wherever the kernel schedules it;
/// with veth that is mostly the sender's CPU).
pub const GEN_CPU: usize = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    XdpDrop,
    XdpTx,
    Lb {
        limiter: bool,
    },
    /// The data path, limiter on, with be0's delivery `kernel` (the handoff).
    Handoff,
    /// The data path, limiter on, with be0's delivery `netfilter` (the kernel's forwarding,
    /// kube-proxy's nftables rules loaded, as on a node where that delivery is chosen).
    Netfilter,
    Nftables,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::XdpDrop => "XDP_DROP on the uplink (floor)",
            Path::XdpTx => "XDP_TX on the uplink (floor)",
            Path::Lb { limiter: false } => "xdplb, limiter off",
            Path::Lb { limiter: true } => "xdplb, limiter on",
            Path::Handoff => "xdplb, limiter on, kernel delivery (handoff to lb_uplink_tc)",
            Path::Netfilter => {
                "xdplb, limiter on, netfilter delivery (kernel forwarding, kube-proxy's rules loaded)"
            }
            Path::Nftables => "nftables (kube-proxy rules) + forwarding",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Path::XdpDrop => "XDP_DROP",
            Path::XdpTx => "XDP_TX",
            Path::Lb { limiter: false } => "xdplb",
            Path::Lb { limiter: true } => "xdplb+limiter",
            Path::Handoff => "xdplb+handoff",
            Path::Netfilter => "xdplb+netfilter",
            Path::Nftables => "nftables",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// 16384 established-style TCP flows (ACKs) from 1024 sources.
    ManyFlows,
    /// A TCP SYN from a new source every packet.
    Flood,
}

impl Mix {
    pub fn name(self) -> &'static str {
        match self {
            Mix::ManyFlows => "16k flows / 1024 sources",
            Mix::Flood => "spoofed SYN flood (new source per packet)",
        }
    }
}

/// CPU time shares over a measurement, in percent (tick-sampled: this kernel has no
/// CONFIG_IRQ_TIME_ACCOUNTING).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// Softirq share of the generator's CPU, where the node's and the receiver's work runs.
    pub softirq: f64,
    /// Busy share of that CPU (generator included).
    pub busy: f64,
    /// Softirq share of all CPUs.
    pub softirq_all: f64,
    /// User-space share of all CPUs: nothing of the benchmark runs there, so this is other
    /// load on the machine (a compiler, say) competing with the measurement.
    pub user_all: f64,
}

/// One measurement: a path, a mix, an offered load.
#[derive(Clone, Debug)]
pub struct Measurement {
    pub path: Path,
    pub mix: Mix,
    /// None: as fast as the generator goes.
    pub target_pps: Option<f64>,
    /// Frames the generator transmitted per second.
    pub offered_pps: f64,
    /// Frames the node's uplink program saw per second (None where it does not count).
    pub absorbed_pps: Option<f64>,
    /// Frames counted at the receiver per second (for XDP_DROP: at the uplink).
    pub forwarded_pps: f64,
    pub seconds: f64,
    pub cpu: Cpu,
    /// The data path's own counters that moved (xdplb only), per second.
    pub lb_counters: Vec<(String, f64)>,
}

#[derive(Clone, Debug)]
pub struct Throughput {
    pub measurements: Vec<Measurement>,
    pub seconds: f64,
    pub fixed_loads: Vec<f64>,
    pub nft_version: Option<String>,
    pub conntrack_max: Option<String>,
    pub left_out: Vec<String>,
    pub notes: Vec<String>,
    /// Whether the generator was `bench_gen` in live-frames mode; else the kernel refused live
    /// frames and it was [`SocketGen`] (a packet socket: slower, so peaks may be the generator's).
    pub live_frames: bool,
    /// The limiter's A/B on one topology (the limiter-on path's): many-flows peaks forwarded
    /// with the limiter off and on, pair by pair, taking turns (see [`Plan::ab_pairs`]).
    pub limiter_ab: Vec<AbPair>,
}

/// Many-flows peak rates (forwarded pps) of one off/on pair.
#[derive(Clone, Copy, Debug)]
pub struct AbPair {
    pub off_pps: f64,
    pub on_pps: f64,
}

impl AbPair {
    /// The limiter's CPU ns per forwarded packet: one CPU does everything at the peak, so
    /// 1 / rate is its time per packet, and the difference is what the limiter added.
    pub fn cost_ns(&self) -> f64 {
        1e9 / self.on_pps - 1e9 / self.off_pps
    }
}

impl Throughput {
    pub fn peak(&self, path: Path, mix: Mix) -> Option<&Measurement> {
        self.measurements
            .iter()
            .find(|m| m.path == path && m.mix == mix && m.target_pps.is_none())
    }
}

struct Plan {
    seconds: f64,
    fixed_loads: Vec<f64>,
    flood: bool,
    limiter_off: bool,
    /// Off/on pairs of the limiter's A/B: the same service, flows and sources, the limiter
    /// turned off and on between peak measurements (which goes first alternates), so the
    /// difference is the limiter's and not two topologies' or two moments' load.
    ab_pairs: usize,
}

pub fn run(scale: Scale) -> Result<Throughput> {
    let plan = match scale {
        Scale::Smoke => Plan {
            seconds: 0.15,
            fixed_loads: vec![],
            flood: true,
            limiter_off: false,
            ab_pairs: 1,
        },
        Scale::Quick => Plan {
            seconds: 1.0,
            fixed_loads: vec![250_000.0, 500_000.0],
            flood: true,
            limiter_off: true,
            ab_pairs: 4,
        },
        Scale::Default | Scale::Full => Plan {
            seconds: 2.0,
            fixed_loads: vec![250_000.0, 500_000.0, 1_000_000.0],
            flood: true,
            limiter_off: true,
            ab_pairs: 6,
        },
    };
    // Namespaces a killed earlier run left (`xdplb-bench-ROLE-PID-N`).
    for role in ["gen", "lb", "rcv"] {
        remove_stale(&format!("{PREFIX}-{role}"));
    }
    let mut out = Throughput {
        live_frames: live_frames_allowed()?,
        measurements: Vec::new(),
        seconds: plan.seconds,
        fixed_loads: plan.fixed_loads.clone(),
        nft_version: None,
        conntrack_max: None,
        left_out: Vec::new(),
        notes: Vec::new(),
        limiter_ab: Vec::new(),
    };
    if plan.fixed_loads.is_empty() {
        out.left_out
            .push("smoke scale: no fixed-load CPU measurements, 0.15 s per measurement".into());
    }
    let nft = ensure_nft();
    match &nft {
        Ok(v) => out.nft_version = Some(v.clone()),
        Err(e) => out.left_out.push(format!(
            "nftables path: nft is not available ({e:#}); the kernel-path comparison is missing"
        )),
    }
    let mut paths = vec![Path::XdpDrop, Path::XdpTx];
    if plan.limiter_off {
        paths.push(Path::Lb { limiter: false });
    } else {
        out.left_out
            .push("xdplb with the limiter off as a path of its own (this scale runs the limiter-on path, and its A/B)".into());
    }
    paths.push(Path::Lb { limiter: true });
    paths.push(Path::Handoff);
    if nft.is_ok() {
        paths.push(Path::Netfilter);
        paths.push(Path::Nftables);
    }
    for path in paths {
        println!("throughput: {}", path.name());
        let ms = run_path(path, &plan, &mut out).with_context(|| path.name())?;
        for m in &ms {
            println!("  {}", m.line());
        }
        out.measurements.extend(ms);
    }
    Ok(out)
}

impl Measurement {
    pub fn line(&self) -> String {
        let load = match self.target_pps {
            Some(t) => format!("at {:.2} Mpps", t / 1e6),
            None => "peak".to_string(),
        };
        format!(
            "{:<44} {:<9} offered {:>5.2} Mpps, absorbed {}, forwarded {:>5.2} Mpps; cpu{GEN_CPU} softirq {:>4.1}%, busy {:>4.1}%; other load {:>4.1}%",
            self.mix.name(),
            load,
            self.offered_pps / 1e6,
            self.absorbed_pps
                .map_or_else(|| "    -     ".into(), |a| format!("{:>5.2} Mpps", a / 1e6)),
            self.forwarded_pps / 1e6,
            self.cpu.softirq,
            self.cpu.busy,
            self.cpu.user_all
        )
    }
}

/// Installs nftables if `nft` is missing (apt-get, idempotent) and returns its version.
fn ensure_nft() -> Result<String> {
    let version = || -> Option<String> {
        Command::new("nft")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if let Some(v) = version() {
        return Ok(v);
    }
    println!("throughput: nft not found: running `apt-get install -y nftables`");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "nftables"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
    };
    let ok = install().is_ok_and(|s| s.success());
    if !ok {
        println!("throughput: install failed: running `apt-get update` and trying once more");
        let _ = Command::new("apt-get")
            .args(["update", "-q"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
        let s = install().context("running apt-get")?;
        ensure!(s.success(), "`apt-get install -y nftables` failed ({s})");
    }
    version().context("nft still not runnable after installing nftables")
}

/// The three namespaces and their veths; deleted on Drop.
struct Topology {
    sender: Netns,
    lb: Netns,
    rcv: Netns,
    g0: u32,
    g0_mac: [u8; 6],
    up0_mac: [u8; 6],
    be0: u32,
    up0: u32,
}

impl Topology {
    fn build() -> Result<Topology> {
        let sender = Netns::create_unique(&format!("{PREFIX}-gen"))?;
        let lb = Netns::create_unique(&format!("{PREFIX}-lb"))?;
        let rcv = Netns::create_unique(&format!("{PREFIX}-rcv"))?;
        // No IPv6 anywhere: no neighbour discovery or MLD in front of the counters.
        let quiet = [
            ("net.ipv6.conf.all.disable_ipv6", "1"),
            ("net.ipv6.conf.default.disable_ipv6", "1"),
        ];
        for ns in [&sender, &lb, &rcv] {
            ns.sysctls(&quiet)?;
        }
        lb.sysctls(&[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.send_redirects", "0"),
        ])?;
        sender.ip_batch(&[
            format!("link add g0 type veth peer name up0 netns {}", lb.name()),
            "link set g0 up".to_string(),
        ])?;
        lb.ip_batch(&[
            format!("link add be0 type veth peer name rcv0 netns {}", rcv.name()),
            "link set up0 up".to_string(),
            "link set be0 up".to_string(),
            "addr add 10.0.0.1/16 dev up0".to_string(),
            "addr add 10.2.0.1/24 dev be0".to_string(),
        ])?;
        let mut rcv_lines = vec![
            "link set rcv0 up".to_string(),
            "addr add 10.2.0.2/24 dev rcv0".to_string(),
        ];
        for j in 0..BACKENDS {
            rcv_lines.push(format!("addr add {} dev rcv0", backend_addr(j)));
        }
        rcv.ip_batch(&rcv_lines)?;
        let (rcv0_mac, _) = link(&rcv, "rcv0")?;
        lb.ip_batch(&[
            format!(
                "neigh replace 10.2.0.2 lladdr {} dev be0 nud permanent",
                crate::lab::fmt_mac(rcv0_mac)
            ),
            "route add 10.1.0.0/16 via 10.2.0.2 dev be0".to_string(),
        ])?;
        let (g0_mac, g0) = link(&sender, "g0")?;
        let (up0_mac, up0) = link(&lb, "up0")?;
        let (_, be0) = link(&lb, "be0")?;
        Ok(Topology {
            sender,
            lb,
            rcv,
            g0,
            g0_mac,
            up0_mac,
            be0,
            up0,
        })
    }

    fn frame(&self, mix: Mix) -> Vec<u8> {
        let spec = match mix {
            Mix::ManyFlows => Spec::tcp("10.0.4.0", 10000, VIP, VIP_PORT, TCP_ACK),
            Mix::Flood => Spec::tcp("10.128.0.0", 10000, VIP, VIP_PORT, TCP_SYN),
        };
        spec.macs(self.g0_mac, self.up0_mac)
            .payload(&[0x42; 10])
            .build()
    }
}

fn backend_addr(j: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 1, 0, 2)) + j)
}

fn link(ns: &Netns, name: &str) -> Result<([u8; 6], u32)> {
    let out = ns.ip(&["-j", "link", "show", "dev", name])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mac = v[0]["address"].as_str().context("no MAC")?;
    let mut m = [0u8; 6];
    for (i, p) in mac.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(p, 16)?;
    }
    let ifindex = u32::try_from(v[0]["ifindex"].as_u64().context("no ifindex")?)?;
    Ok((m, ifindex))
}

/// A tools object whose program is attached to one interface, and its frame counter.
struct Counted {
    ebpf: Ebpf,
    program: &'static str,
    link: Option<XdpLinkId>,
    count: PerCpuArray<MapData, u64>,
}

impl Counted {
    fn attach(ns: &Netns, ifname: &str, program: &'static str) -> Result<Counted> {
        let mut ebpf = dataplane::load_tools()?;
        let count = ebpf
            .take_map("TOOLS_COUNT")
            .context("TOOLS_COUNT")?
            .try_into()?;
        let prog = dataplane::program_mut(&mut ebpf, program)?;
        let link = ns
            .run(|| prog.attach(ifname, XdpMode::Driver))?
            .with_context(|| format!("attaching {program} to {ifname} in {}", ns.name()))?;
        Ok(Counted {
            ebpf,
            program,
            link: Some(link),
            count,
        })
    }

    fn frames(&self) -> Result<u64> {
        Ok(self.count.get(&0, 0)?.iter().sum())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(link) = self.link.take()
            && let Ok(p) = dataplane::program_mut(&mut self.ebpf, self.program)
        {
            let _ = p.detach(link);
        }
    }
}

/// The data path on the node, installed as the agent would.
struct Lb {
    ebpf: Ebpf,
    _progs: aya::maps::Map,
    maps: Maps,
    /// What installed the service, kept to turn the limiter off and on.
    reconciler: Reconciler,
    node: NodeView,
    link: Option<XdpLinkId>,
    handoff: Option<SchedClassifierLinkId>,
}

impl Drop for Lb {
    fn drop(&mut self) {
        if let Some(link) = self.link.take()
            && let Ok(p) = dataplane::program_mut(&mut self.ebpf, PROG_UPLINK)
        {
            let _ = p.detach(link);
        }
        if let Some(link) = self.handoff.take()
            && let Ok(p) = dataplane::classifier_mut(&mut self.ebpf, PROG_UPLINK_TC)
        {
            let _ = p.detach(link);
        }
    }
}

/// The service: VIP:80/tcp over 10 backends, snat; with the limiter, a per-source policy a
/// real deployment might use (100k packets/s and 1000 new connections/s per source, fail
/// closed when the source table is full).
fn desired(limiter: bool) -> Desired {
    let mut d = Desired::default();
    d.node.hash_seed = 42;
    // The policy stays defined with the limiter off (not the node default then): turning the
    // limiter back on finds its sources under the same policy id and generation.
    {
        let limit = |per_second, burst| Some(Rate { per_second, burst });
        d.policies.insert(
            "per-source".into(),
            Policy {
                limits: Limits {
                    packets: limit(100_000, 100_000),
                    connections: limit(1000, 1000),
                },
                ipv6_prefix: 64,
                table_full: TableFull::FailClosed,
                reset_rejected_syn: false,
                exempt: vec![],
                deny: vec![],
                overrides: vec![],
            },
        );
        if limiter {
            d.node.default_policy = Some("per-source".into());
        }
    }
    let frontend = Frontend {
        vip: VIP.parse().expect("VIP"),
        port: VIP_PORT,
        protocol: Protocol::Tcp,
    };
    d.services.insert(
        frontend,
        Service {
            name: "web".into(),
            origin: "bench".into(),
            frontend,
            mode: Mode::Snat,
            backends: (0..BACKENDS)
                .map(|j| Backend {
                    addr: backend_addr(j).into(),
                    port: BACKEND_PORT,
                    weight: 1,
                })
                .collect(),
            policy: None,
            affinity: None,
            source_ranges: lb_userspace::model::SourceRanges::default(),
        }
        .into(),
    );
    d
}

impl Lb {
    /// `delivery`: be0's IFACE_* flags, as the agent writes them for its delivery; for `kernel`
    /// (IFACE_POLICY_HOOK) `lb_uplink_tc` goes on up0's TC ingress. (`netfilter` needs
    /// `lb_uplink_out` only for replies, which this one-way traffic has none of.)
    fn install(topo: &Topology, limiter: bool, delivery: u16) -> Result<Lb> {
        let sizes = Sizes::default();
        let dataplane::Loaded {
            mut ebpf, progs, ..
        } = dataplane::load(&sizes, None)?;
        let mut maps = Maps::take(&mut ebpf)?;
        let node = NodeView {
            snat_ipv4: vec!["10.0.0.1".parse()?],
            snat_ipv6: Vec::new(),
            node_addrs: ["10.0.0.1".parse()?].into(),
            local: BTreeSet::default(),
            broadcast: BTreeSet::default(),
            ephemeral_ports: None,
        };
        let mut reconciler = Reconciler::new(sizes);
        reconciler
            .apply(&desired(limiter), &node, &mut maps)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // Devmap entries resolve ifindexes in the namespace of the thread that writes them.
        let (up0, be0) = (topo.up0, topo.be0);
        topo.lb.run(|| -> Result<()> {
            maps.devmap.insert(up0, up0, None, 0)?;
            maps.devmap.insert(be0, be0, None, 0)?;
            Ok(())
        })??;
        // lb_uplink balances only frames sent to up0's MAC.
        let (mac, _) = crate::lab::link_info(&topo.lb, "up0")?;
        maps.set_link_mac(
            up0 % lb_common::MAC_SLOTS,
            &lb_common::LinkMac::new(up0, mac),
        )?;
        if delivery != 0 {
            maps.set_iface(
                be0,
                &lb_common::Iface {
                    parent: 0,
                    vlan_id: 0,
                    flags: delivery,
                },
            )?;
        }
        let handoff = if delivery & lb_common::IFACE_POLICY_HOOK != 0 {
            let tc = dataplane::classifier_mut(&mut ebpf, PROG_UPLINK_TC)?;
            Some(
                topo.lb
                    .run(|| tc.attach("up0", TcAttachType::Ingress))?
                    .context("attaching lb_uplink_tc to up0")?,
            )
        } else {
            None
        };
        let prog = dataplane::program_mut(&mut ebpf, PROG_UPLINK)?;
        let link = topo
            .lb
            .run(|| prog.attach("up0", XdpMode::Driver))?
            .context("attaching lb_uplink to up0")?;
        Ok(Lb {
            ebpf,
            _progs: progs,
            maps,
            reconciler,
            node,
            link: Some(link),
            handoff,
        })
    }

    fn counters(&self) -> Vec<(Counter, u64)> {
        self.maps.read_counters()
    }

    /// Turns the limiter off or on: the service's policy, which its established flows follow.
    fn set_limiter(&mut self, on: bool) -> Result<()> {
        self.reconciler
            .apply(&desired(on), &self.node, &mut self.maps)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }
}

/// kube-proxy's nftables mode for one ClusterIP-style service with BACKENDS endpoints (the
/// base chains and maps as kube-proxy creates them; the service and endpoint chains as it
/// writes them for a service reached from outside the pod CIDR, which it masquerades).
fn nft_ruleset() -> String {
    let svc = "service-BENCH000-default/web/tcp/http";
    let mut s = String::from(
        r#"add table ip kube-proxy { comment "rules for kube-proxy" ; }
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; }
add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
add chain ip kube-proxy firewall-check
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain
add chain ip kube-proxy services
add chain ip kube-proxy service-endpoints-check
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject
add rule ip kube-proxy cluster-ips-check ip daddr { 10.96.0.0/16 } drop
add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
"#,
    );
    let _ = writeln!(s, "add chain ip kube-proxy {svc}");
    let _ = writeln!(
        s,
        "add rule ip kube-proxy {svc} ip daddr {VIP} ip saddr != 10.1.0.0/16 jump mark-for-masquerade"
    );
    let mut vmap = Vec::new();
    for j in 0..BACKENDS {
        let ep = format!(
            "endpoint-BENCH{j:03}-default/web/tcp/http__{}/{BACKEND_PORT}",
            backend_addr(j)
        );
        let _ = writeln!(s, "add chain ip kube-proxy {ep}");
        let _ = writeln!(
            s,
            "add rule ip kube-proxy {ep} ip saddr {} jump mark-for-masquerade",
            backend_addr(j)
        );
        let _ = writeln!(
            s,
            "add rule ip kube-proxy {ep} meta l4proto tcp dnat to {}:{BACKEND_PORT}",
            backend_addr(j)
        );
        vmap.push(format!("{j} : goto {ep}"));
    }
    let _ = writeln!(
        s,
        "add rule ip kube-proxy {svc} numgen random mod {BACKENDS} vmap {{ {} }}",
        vmap.join(" , ")
    );
    let _ = writeln!(s, "add element ip kube-proxy cluster-ips {{ {VIP} }}");
    let _ = writeln!(
        s,
        "add element ip kube-proxy service-ips {{ {VIP} . tcp . {VIP_PORT} : goto {svc} }}"
    );
    s
}

fn apply_nft(ns: &Netns) -> Result<()> {
    let mut cmd = ns.command("nft");
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running nft")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(nft_ruleset().as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft -f: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// /proc/stat lines `cpu` (all CPUs) and `cpuN` (the generator's CPU): user nice system idle
/// iowait irq softirq steal.
fn cpu_times() -> Result<[Vec<u64>; 2]> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields = |name: &str| -> Result<Vec<u64>> {
        let line = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .with_context(|| format!("no {name} line in /proc/stat"))?;
        Ok(line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().unwrap_or(0))
            .collect())
    };
    Ok([fields("cpu")?, fields(&format!("cpu{GEN_CPU}"))?])
}

fn shares(before: &[u64], after: &[u64]) -> Option<(f64, f64, f64)> {
    let d: Vec<f64> = after
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(*b) as f64)
        .collect();
    let total: f64 = d.iter().sum();
    if total == 0.0 || d.len() < 7 {
        return None;
    }
    let idle = d[3] + d[4];
    // (softirq, busy, user) in percent.
    Some((
        100.0 * d[6] / total,
        100.0 * (total - idle) / total,
        100.0 * (d[0] + d[1]) / total,
    ))
}

fn cpu_share(before: &[Vec<u64>; 2], after: &[Vec<u64>; 2]) -> Cpu {
    let all = shares(&before[0], &after[0]).unwrap_or_default();
    let one = shares(&before[1], &after[1]).unwrap_or_default();
    Cpu {
        softirq: one.0,
        busy: one.1,
        softirq_all: all.0,
        user_all: all.2,
    }
}

/// The generator: `bench_gen` in live-frames mode out of g0, from threads in ns gen pinned to
/// GEN_CPU. Sends for `seconds` (paced to `rate` if given). Returns (frames, seconds).
///
/// Each live-frames run costs ~24 ms of wall time outside its frames on this kernel (set-up and
/// tear-down of its page pool, sleeping, not computing), so a single thread would leave the CPU
/// idle between runs: at full speed two threads take turns, each sending large runs; paced, one
/// thread sends `rate x 50 ms` frames every 50 ms. Either way the node's softirq work runs on
/// the same CPU right after each batch (veth schedules its NAPI where the frames were sent), so
/// the generator cannot outrun the node: the peak is what one CPU does for generator, node and
/// receiver together.
fn generate(
    topo: &Topology,
    frame: &[u8],
    (vary, seq): (Vary, u64),
    seconds: f64,
    rate: Option<f64>,
    live: bool,
) -> Result<(u64, f64)> {
    let g0 = topo.g0;
    let limit = Duration::from_secs_f64(seconds);
    let threads: u64 = if rate.is_some() { 1 } else { 2 };
    // Everyone starts the clock together, once every thread has loaded its program (a thread
    // that never reports, say it could not enter the namespace, aborts the start).
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let go = std::sync::atomic::AtomicU8::new(WAIT);
    let go = &go;
    let mut started = Instant::now();
    let sent: Vec<Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let ready_tx = ready_tx.clone();
                topo.sender.spawn_scoped(s, move || -> Result<u64> {
                    // Disjoint sequence ranges: a flood's sources never repeat across threads.
                    let base = seq + i * THREAD_SEQ_STRIDE;
                    let setup = (|| -> Result<Generator> {
                        pin_thread(GEN_CPU)?;
                        if !live {
                            return Ok(Generator::Socket(SocketGen::open(
                                "g0", frame, vary, base,
                            )?));
                        }
                        let mut tools = BenchTools::load()?;
                        tools.set_frame(frame, vary)?;
                        tools.set_seq(base)?;
                        Ok(Generator::Live(Box::new(tools)))
                    })();
                    let _ = ready_tx.send(());
                    let waiting = Instant::now();
                    loop {
                        match go.load(std::sync::atomic::Ordering::Acquire) {
                            WAIT if waiting.elapsed() < Duration::from_secs(30) => {
                                std::thread::sleep(Duration::from_millis(1));
                            }
                            GO => break,
                            _ => anyhow::bail!("the generator threads did not all start"),
                        }
                    }
                    let mut generator = setup?;
                    let started = Instant::now();
                    let mut sent = 0u64;
                    // Bounded in time and count: `seconds`, and at most 50 Mpps worth.
                    #[allow(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "a positive duration or rate; float casts saturate"
                    )]
                    let max_frames = (seconds * 50e6) as u64;
                    match rate {
                        None => {
                            #[allow(
                                clippy::cast_possible_truncation,
                                clippy::cast_sign_loss,
                                reason = "a positive duration or rate; float casts saturate"
                            )]
                            let chunk = ((seconds * 1e6) as u32).clamp(CHUNK_MIN, CHUNK_MAX);
                            loop {
                                sent += generator.send(frame, g0, chunk)?;
                                if started.elapsed() >= limit || sent >= max_frames {
                                    break;
                                }
                            }
                        }
                        Some(pps) => {
                            let tick = Duration::from_millis(50);
                            #[allow(
                                clippy::cast_possible_truncation,
                                clippy::cast_sign_loss,
                                reason = "a positive duration or rate; float casts saturate"
                            )]
                            let chunk = ((pps * tick.as_secs_f64()).round() as u32).max(1);
                            let mut next = started;
                            loop {
                                sent += generator.send(frame, g0, chunk)?;
                                if started.elapsed() >= limit || sent >= max_frames {
                                    break;
                                }
                                next += tick;
                                let now = Instant::now();
                                if next > now {
                                    std::thread::sleep(next - now);
                                }
                            }
                        }
                    }
                    if let Generator::Live(tools) = &generator {
                        let runs = tools.runs_since(base)?;
                        ensure!(
                            runs == sent,
                            "the generator program ran {runs} times for {sent} frames"
                        );
                    }
                    Ok(sent)
                })
            })
            .collect();
        drop(ready_tx);
        let all_ready =
            (0..threads).all(|_| ready_rx.recv_timeout(Duration::from_secs(30)).is_ok());
        go.store(
            if all_ready { GO } else { ABORT },
            std::sync::atomic::Ordering::Release,
        );
        started = Instant::now();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(r) => r.and_then(|r| r),
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut total = 0;
    for r in sent {
        total += r.context("generator")?;
    }
    Ok((total, elapsed))
}

/// One generator thread's way of sending.
enum Generator {
    /// `bench_gen` in live-frames mode: every frame it returns XDP_TX leaves the interface.
    Live(Box<BenchTools>),
    /// Where the kernel refuses live frames.
    Socket(SocketGen),
}

impl Generator {
    /// Sends `chunk` frames out of `ifindex`; returns how many left.
    fn send(&mut self, frame: &[u8], ifindex: u32, chunk: u32) -> Result<u64> {
        match self {
            Generator::Live(tools) => {
                live_frames(tools.program("bench_gen")?, frame, ifindex, chunk, BATCH)?;
                Ok(u64::from(chunk))
            }
            Generator::Socket(s) => Ok(s.send(chunk)),
        }
    }
}

fn run_path(path: Path, plan: &Plan, out: &mut Throughput) -> Result<Vec<Measurement>> {
    let live = out.live_frames;
    let topo = Topology::build()?;
    // Receivers first: a veth delivers XDP frames only to a peer that runs XDP.
    let rcv = Counted::attach(&topo.rcv, "rcv0", "xdp_sink")?;
    let mut lb = None;
    let mut uplink = None;
    let mut back = None;
    match path {
        Path::XdpDrop => uplink = Some(Counted::attach(&topo.lb, "up0", "xdp_sink")?),
        Path::XdpTx => {
            back = Some(Counted::attach(&topo.sender, "g0", "xdp_sink")?);
            uplink = Some(Counted::attach(&topo.lb, "up0", "xdp_tx")?);
        }
        Path::Lb { limiter } => lb = Some(Lb::install(&topo, limiter, 0)?),
        Path::Handoff => {
            lb = Some(Lb::install(&topo, true, lb_common::IFACE_POLICY_HOOK)?);
        }
        Path::Netfilter => {
            apply_nft(&topo.lb)?;
            lb = Some(Lb::install(&topo, true, lb_common::IFACE_NETFILTER)?);
        }
        Path::Nftables => {
            apply_nft(&topo.lb)?;
            uplink = Some(Counted::attach(&topo.lb, "up0", "xdp_count")?);
            if out.conntrack_max.is_none() {
                out.conntrack_max = topo.lb.sysctl("net.netfilter.nf_conntrack_max").ok();
            }
        }
    }
    // Shared with `measure`, and turned off and on between measurements for the A/B.
    let lb = std::cell::RefCell::new(lb);
    let forwarded = || -> Result<u64> {
        match path {
            Path::XdpDrop => uplink.as_ref().expect("uplink").frames(),
            Path::XdpTx => back.as_ref().expect("g0 counter").frames(),
            _ => rcv.frames(),
        }
    };
    let absorbed = || -> Result<Option<u64>> {
        Ok(match path {
            Path::XdpDrop | Path::Nftables => Some(uplink.as_ref().expect("uplink").frames()?),
            Path::XdpTx => None,
            Path::Lb { .. } | Path::Handoff | Path::Netfilter => lb
                .borrow()
                .as_ref()
                .map(|l| counter(&l.counters(), Counter::Packets)),
        })
    };
    let mut seq = 1u64;
    let mut results = Vec::new();
    let mut measure = |mix: Mix, rate: Option<f64>, seconds: f64| -> Result<Measurement> {
        let frame = topo.frame(mix);
        let vary = match mix {
            Mix::ManyFlows => Vary::flow_mix(MIX_SOURCES, MIX_FLOWS),
            Mix::Flood => Vary {
                cycle: FLOOD_SOURCES,
                ..Vary::NEW_SOURCES
            },
        };
        let (f0, a0) = (forwarded()?, absorbed()?);
        let lb0 = lb.borrow().as_ref().map(Lb::counters);
        let cpu0 = cpu_times()?;
        let (sent, secs) = generate(&topo, &frame, (vary, seq), seconds, rate, live)?;
        seq += 2 * THREAD_SEQ_STRIDE;
        // Frames in flight (rings, NAPI) land within a few ms.
        std::thread::sleep(Duration::from_millis(30));
        let cpu1 = cpu_times()?;
        let (f1, a1) = (forwarded()?, absorbed()?);
        let lb_counters = match (lb.borrow().as_ref(), lb0) {
            (Some(l), Some(before)) => l
                .counters()
                .iter()
                .zip(before.iter())
                .filter(|((_, a), (_, b))| a != b)
                .map(|((c, a), (_, b))| (c.name().to_string(), (a - b) as f64 / secs))
                .collect(),
            _ => Vec::new(),
        };
        let forwarded_frames = f1 - f0;
        ensure!(
            forwarded_frames <= sent,
            "the receiver counted {forwarded_frames} frames for {sent} sent"
        );
        Ok(Measurement {
            path,
            mix,
            target_pps: rate,
            offered_pps: sent as f64 / secs,
            absorbed_pps: match (a0, a1) {
                (Some(a), Some(b)) => Some((b - a) as f64 / secs),
                _ => None,
            },
            forwarded_pps: forwarded_frames as f64 / secs,
            seconds: secs,
            cpu: cpu_share(&cpu0, &cpu1),
            lb_counters,
        })
    };
    // Warm-up: every flow of the mix exists (flow table, conntrack) before timing.
    measure(Mix::ManyFlows, None, 0.1)?;
    results.push(measure(Mix::ManyFlows, None, plan.seconds)?);
    if matches!(path, Path::Lb { .. } | Path::Nftables) {
        for &rate in &plan.fixed_loads {
            results.push(measure(Mix::ManyFlows, Some(rate), plan.seconds)?);
        }
    }
    if path == (Path::Lb { limiter: true }) {
        for pair in 0..plan.ab_pairs {
            let mut rates = [0.0; 2];
            let order = if pair % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for on in order {
                lb.borrow_mut()
                    .as_mut()
                    .context("the data path")?
                    .set_limiter(on)?;
                let m = measure(Mix::ManyFlows, None, plan.seconds)?;
                println!(
                    "  A/B pair {pair}, limiter {}: forwarded {:.3} Mpps",
                    if on { "on" } else { "off" },
                    m.forwarded_pps / 1e6
                );
                rates[usize::from(on)] = m.forwarded_pps;
            }
            out.limiter_ab.push(AbPair {
                off_pps: rates[0],
                on_pps: rates[1],
            });
        }
        lb.borrow_mut()
            .as_mut()
            .context("the data path")?
            .set_limiter(true)?;
    }
    if plan.flood && !matches!(path, Path::XdpDrop | Path::XdpTx) {
        // A sustained flood, as an attack is: the tables it fills (claim slots, conntrack) are
        // full, and what gives way under pressure has had time to, before timing.
        measure(Mix::Flood, None, plan.seconds * FLOOD_LEAD)?;
        results.push(measure(Mix::Flood, None, plan.seconds)?);
    }
    // Programs off the interfaces before the namespaces go.
    drop(lb);
    drop(uplink);
    drop(back);
    drop(rcv);
    drop(topo);
    Ok(results)
}

fn counter(counters: &[(Counter, u64)], c: Counter) -> u64 {
    counters
        .iter()
        .find(|(k, _)| *k == c)
        .map_or(0, |(_, v)| *v)
}

/// Ratio helper for reports: `a / b`, None when either is missing or b is 0.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}
