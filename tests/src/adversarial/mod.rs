//! The adversarial-input test of issue 10: valid seed frames of every kind (`seeds`), mutated
//! structurally (`mutate`), run through the real `lb_uplink` and `lb_backend` with
//! BPF_PROG_TEST_RUN on a configuration that makes every path live (`Lab`), each outcome judged
//! by an oracle written from DATAPATH-SPEC.md (`oracle`) on a strict parser of its own (`wire`).
//! Nothing here reads the data path's code: only its verdicts, output bytes and counters.
// Frames are built and mutated field by field: a value is cut to its field's wire width on
// purpose (a length or checksum written as 16 bits, a draw taken modulo its bound, a verdict
// read as the signed number it is), and out-of-range values are what a mutation is for.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "fields written at their wire width, see above"
)]
pub mod mutate;
pub mod oracle;
pub mod seeds;
pub mod wire;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use lb_common::Counter;
use lb_userspace::{
    dataplane::Sizes,
    model::{
        Backend, Cidr, Desired, Frontend, Limits, Mode, NodeSettings, Policy, Protocol, Rate,
        Service, TableFull,
    },
};

use crate::kernel::{Fixture, Outcome};
use oracle::{Expect, Model, Net};
use wire::{TCP, UDP, hex};

/// splitmix64: small, fast, and the same sequence on every machine for a given seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }

    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.u64() % (hi - lo + 1)
    }

    pub fn percent(&mut self, p: u64) -> bool {
        self.u64() % 100 < p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u64() as u8).collect()
    }

    /// One of `items` with probability proportional to its weight.
    pub fn weighted<T: Copy>(&mut self, items: &[(T, u32)]) -> T {
        let total: u32 = items.iter().map(|(_, w)| w).sum();
        let mut x = self.below(total as usize) as u32;
        for (item, w) in items {
            if x < *w {
                return *item;
            }
            x -= w;
        }
        items[0].0
    }
}

/// Which program a frame goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Prog {
    /// `lb_uplink` (XDP) on up0.
    Uplink,
    /// `lb_backend` (TC ingress) on pod0: what the local pod sends.
    Backend,
    /// `lb_uplink_out` (TC egress) on up0: what the kernel sends out of the uplink.
    Out,
}

// XDP verdicts.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
// TC verdicts of lb_backend.
pub const TC_SHOT: u32 = 2;
pub const TC_REDIRECT: u32 = 7;
/// TCX_NEXT (-1): on to the next program and the kernel.
pub const TC_NEXT: u32 = u32::MAX;

/// What a verdict and the output bytes amount to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Got {
    Passed,
    /// Passed to the kernel, rewritten (it finishes the forwarding).
    PassedRewritten,
    Dropped,
    /// XDP_TX / XDP_REDIRECT / TC redirect.
    Sent,
    Aborted,
    Other(u32),
}

impl Got {
    pub fn of(prog: Prog, verdict: u32, untouched: bool) -> Got {
        match (prog, verdict) {
            (Prog::Uplink, XDP_ABORTED) => Got::Aborted,
            (Prog::Uplink, XDP_DROP) | (Prog::Backend | Prog::Out, TC_SHOT) => Got::Dropped,
            (Prog::Uplink, XDP_PASS) | (Prog::Backend | Prog::Out, TC_NEXT) if untouched => {
                Got::Passed
            }
            // lb_uplink_out's translated reply: on to the wire, as the kernel sends it.
            (Prog::Uplink, XDP_PASS) | (Prog::Backend | Prog::Out, TC_NEXT) => Got::PassedRewritten,
            (Prog::Uplink, XDP_TX | XDP_REDIRECT) | (Prog::Backend | Prog::Out, TC_REDIRECT) => {
                Got::Sent
            }
            (_, v) => Got::Other(v),
        }
    }

    pub fn name(self) -> String {
        match self {
            Got::Passed => "passed".into(),
            Got::PassedRewritten => "passed rewritten".into(),
            Got::Dropped => "dropped".into(),
            Got::Sent => "sent".into(),
            Got::Aborted => "XDP_ABORTED".into(),
            Got::Other(v) => format!("verdict {}", v as i32),
        }
    }
}

pub fn verdict_name(prog: Prog, verdict: u32) -> String {
    match (prog, verdict) {
        (Prog::Uplink, XDP_ABORTED) => "lb_uplink XDP_ABORTED".into(),
        (Prog::Uplink, XDP_DROP) => "lb_uplink XDP_DROP".into(),
        (Prog::Uplink, XDP_PASS) => "lb_uplink XDP_PASS".into(),
        (Prog::Uplink, XDP_TX) => "lb_uplink XDP_TX".into(),
        (Prog::Uplink, XDP_REDIRECT) => "lb_uplink XDP_REDIRECT".into(),
        (Prog::Backend, TC_SHOT) => "lb_backend TC_ACT_SHOT".into(),
        (Prog::Backend, TC_NEXT) => "lb_backend TCX_NEXT".into(),
        (Prog::Backend, TC_REDIRECT) => "lb_backend TC_ACT_REDIRECT".into(),
        (Prog::Out, TC_SHOT) => "lb_uplink_out TC_ACT_SHOT".into(),
        (Prog::Out, TC_NEXT) => "lb_uplink_out TCX_NEXT".into(),
        (Prog::Out, TC_REDIRECT) => "lb_uplink_out TC_ACT_REDIRECT".into(),
        (p, v) => format!("{p:?} verdict {}", v as i32),
    }
}

/// A service of the lab's configuration.
pub struct ServiceDef {
    pub name: &'static str,
    pub vip: &'static str,
    pub port: u16,
    pub proto: u8,
    pub snat: bool,
    pub backends: &'static [(&'static str, u16)],
    pub policy: Option<&'static str>,
    pub affinity: bool,
}

const fn def(
    name: &'static str,
    vip: &'static str,
    port: u16,
    proto: u8,
    snat: bool,
    backends: &'static [(&'static str, u16)],
) -> ServiceDef {
    ServiceDef {
        name,
        vip,
        port,
        proto,
        snat,
        backends,
        policy: None,
        affinity: false,
    }
}

const fn with_policy(mut d: ServiceDef, policy: &'static str) -> ServiceDef {
    d.policy = Some(policy);
    d
}

const fn with_affinity(mut d: ServiceDef) -> ServiceDef {
    d.affinity = true;
    d
}

/// Every path live: both families, TCP and UDP, snat to remote and to local backends,
/// preserve-client-ip to the local pod (two VIPs on one pod port: the clash of issue 10 E),
/// affinity, node ports, a policy with prefixes and one that answers rejected SYNs with RSTs.
pub const SERVICES: &[ServiceDef] = &[
    with_policy(
        def(
            "web",
            "10.96.0.10",
            80,
            TCP,
            true,
            &[("10.1.2.2", 8080), ("10.1.2.3", 8080)],
        ),
        "limits",
    ),
    def(
        "pres-a",
        "10.96.0.11",
        443,
        TCP,
        false,
        &[("10.1.9.2", 8443)],
    ),
    def(
        "pres-b",
        "10.96.0.12",
        443,
        TCP,
        false,
        &[("10.1.9.2", 8443)],
    ),
    with_affinity(def(
        "sticky",
        "10.96.0.13",
        80,
        TCP,
        true,
        &[("10.1.2.5", 8080), ("10.1.2.6", 8080)],
    )),
    with_policy(
        def("rst", "10.96.0.14", 80, TCP, true, &[("10.1.2.2", 8080)]),
        "rst",
    ),
    def(
        "local-snat",
        "10.96.0.15",
        80,
        TCP,
        true,
        &[("10.1.9.2", 8080)],
    ),
    def("dns", "10.96.0.53", 53, UDP, true, &[("10.1.2.2", 5353)]),
    def(
        "dns-local",
        "10.96.0.54",
        53,
        UDP,
        false,
        &[("10.1.9.2", 5353)],
    ),
    def(
        "dns-local-snat",
        "10.96.0.55",
        53,
        UDP,
        true,
        &[("10.1.9.2", 5353)],
    ),
    def(
        "node-port",
        "10.0.0.1",
        30080,
        TCP,
        true,
        &[("10.1.2.4", 8080)],
    ),
    with_policy(
        def(
            "web6",
            "fd00:96::10",
            80,
            TCP,
            true,
            &[("fd00:1:2::2", 8080), ("fd00:1:2::3", 8080)],
        ),
        "limits",
    ),
    def(
        "pres-a6",
        "fd00:96::11",
        443,
        TCP,
        false,
        &[("fd00:1:9::2", 8443)],
    ),
    def(
        "pres-b6",
        "fd00:96::12",
        443,
        TCP,
        false,
        &[("fd00:1:9::2", 8443)],
    ),
    with_affinity(def(
        "sticky6",
        "fd00:96::13",
        80,
        TCP,
        true,
        &[("fd00:1:2::5", 8080), ("fd00:1:2::6", 8080)],
    )),
    with_policy(
        def(
            "rst6",
            "fd00:96::14",
            80,
            TCP,
            true,
            &[("fd00:1:2::2", 8080)],
        ),
        "rst",
    ),
    def(
        "local-snat6",
        "fd00:96::15",
        80,
        TCP,
        true,
        &[("fd00:1:9::2", 8080)],
    ),
    def(
        "dns6",
        "fd00:96::53",
        53,
        UDP,
        true,
        &[("fd00:1:2::2", 5353)],
    ),
    def(
        "dns-local6",
        "fd00:96::54",
        53,
        UDP,
        false,
        &[("fd00:1:9::2", 5353)],
    ),
    def(
        "node-port6",
        "fd00:a::1",
        30080,
        TCP,
        true,
        &[("fd00:1:2::4", 8080)],
    ),
];

/// The node's own addresses (NodeView.node_addrs): the uplink's, and vlan100's.
pub const NODE_ADDRS: &[&str] = &["10.0.0.1", "fd00:a::1", "10.2.0.1"];
/// Broadcast addresses of the node's subnets (10.0.0.0/24 on up0, 10.2.0.0/24 on vlan100).
pub const SUBNET_BROADCASTS: &[&str] = &["10.0.0.255", "10.2.0.255"];
pub const LOCAL_BACKENDS: &[&str] = &["10.1.9.2", "fd00:1:9::2"];
/// Whether `port` is one of the default snat ports the fixture's node gets (its ephemeral range
/// is Linux's default).
pub fn snat_port(port: u16) -> bool {
    lb_userspace::model::default_snat_ports(lb_userspace::model::LINUX_EPHEMERAL_PORTS)
        .iter()
        .any(|(lo, hi)| (*lo..=*hi).contains(&port))
}

/// Clients on the uplink's subnet with neighbour entries (the fixture adds 10.0.0.10 itself).
pub const ONLINK_CLIENTS: std::ops::RangeInclusive<u8> = 10..=40;
pub const CLIENT_MAC_PREFIX: [u8; 5] = [0x02, 0, 0, 0, 0x0c];

#[allow(
    clippy::unnecessary_wraps,
    reason = "fills the Option<Rate> fields of a policy"
)]
fn rate(per_second: u64, burst: u64) -> Option<Rate> {
    Some(Rate { per_second, burst })
}

fn cidrs(list: &[&str]) -> Vec<Cidr> {
    list.iter().map(|c| c.parse().expect("cidr")).collect()
}

/// Prefixes of the "limits" policy.
pub const EXEMPT: &[&str] = &["198.51.100.0/28", "2001:db8:e::/48"];
pub const DENY: &[&str] = &["198.51.100.16/28", "2001:db8:d::/48"];
pub const OVERRIDE: &[&str] = &["198.51.100.32/28", "2001:db8::/48"];

pub fn desired() -> Desired {
    let mut d = Desired {
        node: NodeSettings {
            // Nothing expires while the test runs: the model does not follow timeouts.
            tcp_idle: Duration::from_secs(3600),
            udp_idle: Duration::from_secs(3600),
            tcp_closing: Duration::from_secs(3600),
            tcp_handshake: Duration::from_secs(3600),
            // A reply entry the backend closed first lives this long: 60 s by default, shorter
            // than a run on a loaded machine (it took 90 s at load 15, and replies of such flows
            // then met expired entries).
            tcp_time_wait: Duration::from_secs(3600),
            ..NodeSettings::default()
        },
        ..Desired::default()
    };
    let base = |packets, connections| Policy {
        limits: Limits {
            packets,
            connections,
        },
        ipv6_prefix: 64,
        table_full: TableFull::FailClosed,
        reset_rejected_syn: false,
        exempt: vec![],
        deny: vec![],
        overrides: vec![],
    };
    let mut limits = base(rate(1_000_000, 1_000_000), None);
    limits.exempt = cidrs(EXEMPT);
    limits.deny = cidrs(DENY);
    limits.overrides = vec![(
        cidrs(OVERRIDE),
        Limits {
            packets: rate(5, 5),
            connections: None,
        },
    )];
    let mut rst = base(None, rate(1, 3));
    rst.reset_rejected_syn = true;
    d.policies.insert("limits".into(), limits);
    d.policies.insert("rst".into(), rst);
    for s in SERVICES {
        let frontend = Frontend {
            vip: s.vip.parse().expect("vip"),
            port: s.port,
            protocol: if s.proto == TCP {
                Protocol::Tcp
            } else {
                Protocol::Udp
            },
        };
        d.services.insert(
            frontend,
            Service {
                name: s.name.into(),
                origin: "adversarial".into(),
                frontend,
                mode: if s.snat {
                    Mode::Snat
                } else {
                    Mode::PreserveClientIp
                },
                backends: s
                    .backends
                    .iter()
                    .map(|(a, p)| Backend {
                        addr: a.parse().expect("backend"),
                        port: *p,
                        weight: 1,
                    })
                    .collect(),
                policy: s.policy.map(Into::into),
                affinity: s.affinity.then(|| Duration::from_secs(600)),
                source_ranges: lb_userspace::model::SourceRanges::default(),
            }
            .into(),
        );
    }
    d
}

pub fn sizes() -> Sizes {
    Sizes {
        max_services: 32,
        max_backends: 64,
        ring_size: 251,
        flow_entries: 131_072,
        flow_entries_v6: 65_536,
        source_entries: 65_536,
        affinity_entries: 4096,
    }
}

/// The kernel fixture with the configuration above, the oracle's knowledge of it, and the
/// oracle's model of the flows the data path holds.
pub struct Lab {
    pub fx: Fixture,
    pub net: Net,
    pub model: Model,
    /// Counters (by `Counter::ALL` position) after the last run.
    counters: Vec<u64>,
    /// ADVERSARIAL_TRACE=addr:port prints every frame in or out with that endpoint (to follow
    /// one flow through a run).
    trace: Option<(IpAddr, u16)>,
    /// ADVERSARIAL_HISTORY=1 keeps, per address:port, what happened to the frames that carried
    /// it, and adds the client's to the details of §6 violations (how a flow got where it is).
    history: Option<std::collections::HashMap<(IpAddr, u16), Vec<String>>>,
}

fn touches(frame: &[u8], (addr, port): &(IpAddr, u16)) -> bool {
    wire::parse(frame)
        .ip
        .and_then(|ip| ip.tuple())
        .is_some_and(|(s, sp, d, dp, _)| (s, sp) == (*addr, *port) || (d, dp) == (*addr, *port))
}

/// Counter changes of one run, by name.
pub struct Deltas(pub Vec<(&'static str, u64)>);

impl Deltas {
    /// `None`: no counter of that name exists (yet).
    pub fn get(&self, name: &str) -> Option<u64> {
        Counter::ALL.iter().any(|c| c.name() == name).then(|| {
            self.0
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, d)| *d)
        })
    }

    /// Names of the counters that moved, `packets` aside.
    pub fn moved(&self) -> Vec<&'static str> {
        self.0
            .iter()
            .filter(|(n, d)| *d > 0 && *n != "packets")
            .map(|(n, _)| *n)
            .collect()
    }
}

pub fn counter_exists(name: &str) -> bool {
    Counter::ALL.iter().any(|c| c.name() == name)
}

impl Lab {
    /// Must run on the test's own thread (the fixture moves it into a new namespace).
    pub fn new() -> Result<Lab> {
        let mut fx = Fixture::new(sizes())?;
        for a in NODE_ADDRS {
            fx.node.node_addrs.insert(a.parse()?);
        }
        // Clients beyond the uplink's subnet come through the gateway.
        fx.ip("route add default via 10.0.0.2 dev up0")?;
        fx.ip("-6 route add default via fd00:a::2 dev up0")?;
        for n in ONLINK_CLIENTS {
            let mac = client_mac(n);
            let mac = mac.map(|b| format!("{b:02x}")).join(":");
            // 10.0.0.10 keeps the fixture's own entry (CLIENT_MAC).
            if n != 10 {
                fx.ip(&format!(
                    "neigh replace 10.0.0.{n} lladdr {mac} dev up0 nud permanent"
                ))?;
            }
            fx.ip(&format!(
                "neigh replace fd00:a::{n:x} lladdr {mac} dev up0 nud permanent"
            ))?;
        }
        fx.apply(&desired())?;
        let net = Net::new(&fx);
        let counters = read_counters(&fx);
        let trace = std::env::var("ADVERSARIAL_TRACE").ok().and_then(|t| {
            let (a, p) = t.rsplit_once(':')?;
            Some((a.trim_matches(['[', ']']).parse().ok()?, p.parse().ok()?))
        });
        Ok(Lab {
            fx,
            net,
            model: Model::default(),
            counters,
            trace,
            history: std::env::var("ADVERSARIAL_HISTORY")
                .is_ok()
                .then(std::collections::HashMap::new),
        })
    }

    /// Runs `frame` through `prog` and returns the outcome and the counters it moved.
    pub fn send(&mut self, prog: Prog, frame: &[u8]) -> Result<(Outcome, Deltas)> {
        let out = match prog {
            Prog::Uplink => self.fx.uplink(frame)?,
            Prog::Backend => self.fx.from_pod(frame)?,
            Prog::Out => self.fx.out_of_uplink(frame)?,
        };
        let now = read_counters(&self.fx);
        let deltas = Counter::ALL
            .iter()
            .zip(now.iter().zip(self.counters.iter()))
            .map(|(c, (n, b))| (c.name(), n.saturating_sub(*b)))
            .collect();
        self.counters = now;
        Ok((out, Deltas(deltas)))
    }

    /// Runs one frame, judges it, and records the verdict and any violation in `report`.
    pub fn check(&mut self, frame: &Frame, report: &mut Report) {
        let expect = oracle::expect(&self.net, &self.model, frame.prog, &frame.bytes);
        let (out, deltas) = match self.send(frame.prog, &frame.bytes) {
            Ok(r) => r,
            Err(_) if frame.prog != Prog::Uplink && !tc_runnable(&frame.bytes) => {
                report.count(frame, "TC: not runnable (IP header cut short)".into());
                return;
            }
            Err(e) => {
                report.violation(frame, None, 0, "test run failed", &format!("{e:#}"));
                return;
            }
        };
        let got = Got::of(frame.prog, out.verdict, out.packet == frame.bytes);
        report.count(frame, verdict_name(frame.prog, out.verdict));
        if let Some(t) = &self.trace
            && (touches(&frame.bytes, t) || touches(&out.packet, t))
        {
            println!(
                "trace #{} {} / {} / {}\n  in:  {}\n  out: {}",
                report.frames,
                frame.kind,
                frame.mutation,
                verdict_name(frame.prog, out.verdict),
                hex(&frame.bytes),
                hex(&out.packet)
            );
        }
        let input = wire::parse(&frame.bytes)
            .ip
            .and_then(|ip| Some((ip.tuple()?, ip.tcp_flags())));
        let output = wire::parse(&out.packet).ip.and_then(|ip| ip.tuple());
        for (rule, mut detail) in self.judge(frame, &expect, got, &out.packet, &deltas) {
            if let (Some(h), Some(((s, sp, d, dp, _), _))) = (&self.history, input)
                && (rule.starts_with("§6") || rule.starts_with("§3 reply"))
            {
                // The client's endpoint: the source of its packets, the destination of replies.
                let (c, cp) = if rule.starts_with("§6") {
                    (s, sp)
                } else {
                    (d, dp)
                };
                let lines = h.get(&(c, cp)).map_or(&[][..], |l| &l[..]);
                let _ = write!(
                    detail,
                    "\n      history of {c}:{cp}:\n        {}",
                    lines.join("\n        ")
                );
            }
            report.violation(frame, Some(&out.packet), out.verdict, &rule, &detail);
        }
        // A FIN or RST marks the flow after the packet went its way (the SYN it may carry was
        // judged against the flow as it was).
        self.model.note_closing(&frame.bytes);
        if let Some(h) = &mut self.history
            && let Some((t, flags)) = input
        {
            let line = format!(
                "#{} {} / {} / {} flags {flags:#04x}: {}:{} -> {}:{} => {}",
                report.frames,
                frame.kind,
                frame.mutation,
                verdict_name(frame.prog, out.verdict),
                t.0,
                t.1,
                t.2,
                t.3,
                output.map_or("-".into(), |o| format!(
                    "{}:{} -> {}:{}",
                    o.0, o.1, o.2, o.3
                )),
            );
            for key in [(t.0, t.1), (t.2, t.3)] {
                h.entry(key).or_default().push(line.clone());
            }
        }
    }

    fn judge(
        &mut self,
        frame: &Frame,
        e: &Expect,
        got: Got,
        output: &[u8],
        deltas: &Deltas,
    ) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = Vec::new();
        let why = |e: &Expect| format!("{} ({})", e.reason, e.detail);
        match got {
            Got::Aborted | Got::Other(_) => {
                v.push((format!("{} (never allowed)", got.name()), why(e)));
            }
            Got::Passed if !e.pass => v.push((format!("{} -> passed", e.reason), why(e))),
            Got::Dropped if !e.drop => v.push((format!("{} -> dropped", e.reason), why(e))),
            Got::Dropped => {
                let moved = deltas.moved();
                let missing: Vec<&str> = e
                    .counters
                    .iter()
                    .copied()
                    .filter(|c| !counter_exists(c))
                    .collect();
                for m in &missing {
                    v.push((format!("counter missing: {m}"), why(e)));
                }
                if !e.counters.is_empty() && !e.counters.iter().any(|c| moved.contains(c)) {
                    v.push((
                        format!("{} -> dropped without its counter", e.reason),
                        format!(
                            "expected one of {:?}, moved {moved:?}; {}",
                            e.counters,
                            why(e)
                        ),
                    ));
                } else if e.counters.is_empty() && moved.is_empty() {
                    v.push(("drop not counted".into(), why(e)));
                }
            }
            Got::Sent | Got::PassedRewritten => {
                v.extend(oracle::check_output(
                    &self.net,
                    &self.model,
                    frame.prog,
                    e,
                    &frame.bytes,
                    output,
                    got == Got::PassedRewritten,
                ));
                self.model.learn(&self.net, &frame.bytes, output);
            }
            Got::Passed => {}
        }
        let created =
            deltas.get("flows_created").unwrap_or(0) + deltas.get("sources_created").unwrap_or(0);
        if got == Got::Dropped && created > 0 {
            v.push((
                "§7 state created for a dropped packet".into(),
                format!("moved {:?}; {}", deltas.moved(), why(e)),
            ));
        }
        if e.stateless && created > 0 {
            v.push((
                "§4 flow or source bucket for a source that is no client".into(),
                format!("moved {:?}; {}", deltas.moved(), why(e)),
            ));
        }
        if frame.must_send
            && e.may_send()
            && e.reason != oracle::R_CLASH
            && !matches!(got, Got::Sent | Got::PassedRewritten)
        {
            v.push((
                "valid frame not sent on".into(),
                format!("{}; counters moved {:?}", why(e), deltas.moved()),
            ));
        }
        v
    }
}

/// BPF_PROG_TEST_RUN for TC refuses an IPv4 or IPv6 frame shorter than its fixed IP header.
fn tc_runnable(frame: &[u8]) -> bool {
    let v = wire::parse(frame);
    match v.ethertype {
        wire::ETH_IPV4 => frame.len() >= v.l3 + 20,
        wire::ETH_IPV6 => frame.len() >= v.l3 + 40,
        _ => true,
    }
}

fn read_counters(fx: &Fixture) -> Vec<u64> {
    fx.maps
        .read_counters()
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

pub fn client_mac(n: u8) -> [u8; 6] {
    let p = CLIENT_MAC_PREFIX;
    [p[0], p[1], p[2], p[3], p[4], n]
}

/// A frame to run, and where it came from.
pub struct Frame {
    pub kind: &'static str,
    pub mutation: String,
    pub prog: Prog,
    pub bytes: Vec<u8>,
    /// Unmutated and valid: the spec lets it through, so it must be sent on (forwarded,
    /// answered or translated) if the oracle allows that at all.
    pub must_send: bool,
}

/// A frame in hex for a report, its first 512 bytes at most.
fn hex_cut(b: &[u8]) -> String {
    if b.len() > 512 {
        format!("{}...(+{} bytes)", hex(&b[..512]), b.len() - 512)
    } else {
        hex(b)
    }
}

/// A mutation's name as the report counts it: fields and kinds kept, values and chains not.
fn mutation_key(name: &str) -> String {
    let mut parts = name.splitn(3, ':');
    let family = parts.next().unwrap_or("");
    match family {
        "field" | "trunc" | "bitflip" | "mac" | "quote" | "ipv4-options" | "ipv6-mapped" => {
            format!("{family}:{}", parts.next().unwrap_or(""))
        }
        _ => family.to_string(),
    }
}

/// Examples kept per rule.
const EXAMPLES: usize = 3;

#[derive(Default)]
pub struct Report {
    pub frames: usize,
    pub by_kind: BTreeMap<&'static str, usize>,
    pub by_mutation: BTreeMap<String, usize>,
    pub by_verdict: BTreeMap<String, usize>,
    pub rules: BTreeMap<String, Rule>,
    pub violating_frames_by_kind: BTreeMap<&'static str, usize>,
    last_violating_frame: usize,
}

#[derive(Default)]
pub struct Rule {
    pub count: usize,
    pub by_kind: BTreeMap<&'static str, usize>,
    pub examples: Vec<String>,
}

impl Report {
    fn count(&mut self, f: &Frame, verdict: String) {
        self.frames += 1;
        *self.by_kind.entry(f.kind).or_default() += 1;
        *self
            .by_mutation
            .entry(mutation_key(&f.mutation))
            .or_default() += 1;
        *self.by_verdict.entry(verdict).or_default() += 1;
    }

    fn violation(&mut self, f: &Frame, out: Option<&[u8]>, verdict: u32, rule: &str, detail: &str) {
        if self.last_violating_frame != self.frames {
            self.last_violating_frame = self.frames;
            *self.violating_frames_by_kind.entry(f.kind).or_default() += 1;
        }
        let r = self.rules.entry(rule.to_string()).or_default();
        r.count += 1;
        *r.by_kind.entry(f.kind).or_default() += 1;
        if r.examples.len() < EXAMPLES {
            r.examples.push(format!(
                "seed {} / mutation {} / {}\n      why: {detail}\n      in:  {}\n      out: {}",
                f.kind,
                f.mutation,
                verdict_name(f.prog, verdict),
                hex_cut(&f.bytes),
                out.map_or("-".into(), hex_cut),
            ));
        }
    }

    pub fn violations(&self) -> usize {
        self.rules.values().map(|r| r.count).sum()
    }

    pub fn print(&self, elapsed: Duration) {
        println!(
            "\n== adversarial: {} frames in {:.1} s ({:.0} frames/s)",
            self.frames,
            elapsed.as_secs_f64(),
            self.frames as f64 / elapsed.as_secs_f64()
        );
        let table = |title: &str, rows: Vec<(String, usize)>| {
            println!("-- {title}");
            for (k, n) in rows {
                println!("  {n:>8}  {k}");
            }
        };
        table(
            "frames per seed kind (frames with a violation)",
            self.by_kind
                .iter()
                .map(|(k, n)| {
                    let bad = self.violating_frames_by_kind.get(k).copied().unwrap_or(0);
                    (format!("{k:<28} ({bad} violating)"), *n)
                })
                .collect(),
        );
        table(
            "frames per mutation",
            self.by_mutation
                .iter()
                .map(|(k, n)| (k.clone(), *n))
                .collect(),
        );
        table(
            "verdicts",
            self.by_verdict
                .iter()
                .map(|(k, n)| (k.clone(), *n))
                .collect(),
        );
        println!("-- violations per rule: {} in all", self.violations());
        for (rule, r) in &self.rules {
            let kinds: Vec<String> = r.by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
            println!(
                "  {:>8}  {rule}\n            by seed kind: {}",
                r.count,
                kinds.join(", ")
            );
        }
        if !self.rules.is_empty() {
            println!("-- first {EXAMPLES} examples per rule");
            for (rule, r) in &self.rules {
                println!("  [{rule}]");
                for e in &r.examples {
                    println!("    {e}");
                }
            }
        }
    }
}

/// Runs `frames` generated frames from `seed` through the lab and returns the report.
pub fn fuzz(lab: &mut Lab, frames: usize, seed: u64) -> (Report, Duration) {
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    let started = Instant::now();
    while report.frames < frames {
        let s = seeds::generate(lab, &mut rng);
        let frame = if rng.percent(10) {
            Frame {
                kind: s.kind,
                mutation: "none".into(),
                prog: s.prog,
                must_send: s.must_send,
                bytes: s.bytes,
            }
        } else {
            let (bytes, mutation) = mutate::mutate(&s.bytes, &lab.net, &mut rng);
            Frame {
                kind: s.kind,
                mutation,
                prog: s.prog,
                must_send: false,
                bytes,
            }
        };
        lab.check(&frame, &mut report);
    }
    (report, started.elapsed())
}

/// The address family's node snat address.
pub fn snat_addr(v6: bool) -> IpAddr {
    if v6 {
        "fd00:a::1".parse().expect("addr")
    } else {
        "10.0.0.1".parse().expect("addr")
    }
}
