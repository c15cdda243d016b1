//! Per-packet cost of the data path through BPF_PROG_TEST_RUN.
//!
//! Method. `repeat > 1` reruns the program on the frame the previous run rewrote (a DNATed
//! packet no longer matches its VIP), so the data path never runs directly: the tools object's
//! `bench_wrap` restores the frame from a template every run, varies the source address / port
//! from a per-CPU sequence where the scenario needs a new flow or a new source every packet,
//! and tail-calls `lb_uplink` (loaded by the agent's loader, services installed by the agent's
//! reconciler) through a program array of its own. The floor is the same wrapper, same
//! variation, tail-calling `xdp_tx`, measured in the same configuration; the net cost is the
//! scenario's median minus the floor's. An empty program (`xdp_pass`) and an XDP_TX-only
//! program, run directly, are reported beside them. Every run is checked by counters: the
//! wrapper's sequence advanced by exactly `repeat`, and the data path's counters moved by
//! exactly `repeat` in the scenario's verdict (xdp_tx, flows_created, drop_rate_limited, ...).
//! The measuring thread is pinned to one CPU; kernel.bpf_stats_enabled stays 0.
//!
//! Each configuration (services x backends) runs in a private network namespace (the kernel
//! fixture's topology), first with an empty flow table, then with 1M entries added from user
//! space (the time it took is reported).
//!
//! Katran ([`super::katran`]) runs in the reference setup's limiter-off phase, behind the same
//! wrapper, in the same rounds (which of the two goes first alternates round by round), and net
//! of the same floor; its runs are checked by its own `stats` map and its LRU.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_common::{
    Addr, Counter, FLOW_REPLY, FLOW_SNAT, FLOW_TCP, Flow4, FlowAddr, FlowKey4, IPPROTO_TCP,
    PROG_UPLINK, ServiceKey, SourceKey, V4, filter_bit,
};
use lb_userspace::{
    dataplane::{self, Sizes},
    model::{Backend, Desired, Frontend, Limits, Mode, Policy, Protocol, Rate, Service, TableFull},
};

use super::{
    Scale, coarse_now_ns, katran, median, pin_thread,
    tools::{BenchTools, FRAME_LEN, Vary, timed_run},
};
use crate::{
    kernel::{CLIENT_MAC, Fixture, NODE_V4},
    packets::{Spec, TCP_ACK, TCP_SYN},
};

// XDP verdicts.
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// Service port of every benchmark service's backends.
const BACKEND_PORT: u16 = 8080;
/// Flow-table capacity of every configuration: room for 1M prefilled entries and the runs'
/// new flows without LRU eviction, so "empty" and "1M" differ only in occupancy.
const FLOW_ENTRIES: u32 = 1 << 21;
const SOURCE_ENTRIES: u32 = 1 << 18;
/// The largest ring for up to 100 services (the agent's default) and for 10k services (a
/// smaller prime; each service's ring is sized from its backends, up to this).
const RING_DEFAULT: u32 = lb_common::DEFAULT_MAX_RING_SIZE;
const RING_10K: u32 = 1021;

/// One table-size configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub services: u32,
    pub backends: u32,
    pub ring_size: u32,
}

impl Config {
    fn new(services: u32, backends: u32) -> Config {
        Config {
            services,
            backends,
            ring_size: if services > 1000 {
                RING_10K
            } else {
                RING_DEFAULT
            },
        }
    }

    pub fn label(&self) -> String {
        format!("{} svc x {} be", human(self.services), self.backends)
    }
}

fn human(n: u32) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

/// How much to measure.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Measured first, the setup beside the targets: 1 service x 8 backends, snat, a flow table
    /// holding `reference_fill` flows (as the comparison with Katran in issue 15 was set up).
    pub reference: Config,
    pub reference_fill: u32,
    pub configs: Vec<Config>,
    /// Flow-table fills: 0 (empty) and the prefilled count.
    pub fills: Vec<u32>,
    pub runs: usize,
    /// Runs per BPF_PROG_TEST_RUN for scenarios that keep their state constant.
    pub repeat: u32,
    /// For scenarios that create a flow (and a source) every run: fewer, and the entries are
    /// deleted after every test run, so source ports for snat stay plentiful (4536 per
    /// backend) and the table stays at its configured fill.
    pub new_flow_repeat: u32,
    pub left_out: Vec<String>,
    /// Why Katran is not measured beside the reference setup; None: it is. Off at smoke scale
    /// (the CI smoke test): it needs clang, bpftool, Katran's source from the network or the
    /// cache, and 2 x 4M-entry LRUs.
    pub katran_skipped: Option<String>,
}

impl Plan {
    pub fn for_scale(scale: Scale) -> Plan {
        let all = |s| [Config::new(s, 10), Config::new(s, 1000)];
        let mut left_out = Vec::new();
        let (configs, fills, runs, repeat, new_flow_repeat) = match scale {
            Scale::Smoke => {
                left_out.push(
                    "smoke scale: 1 service x 10 backends only, 10k-entry flow fill instead of 1M"
                        .into(),
                );
                (vec![Config::new(1, 10)], vec![0, 10_000], 2, 1000, 1000)
            }
            Scale::Quick => {
                left_out.push(
                    "quick scale: 10k services and 1000-backend configurations left out (run without --quick)"
                        .into(),
                );
                (
                    vec![Config::new(1, 10), Config::new(100, 10)],
                    vec![0, 1_000_000],
                    5,
                    100_000,
                    4096,
                )
            }
            Scale::Default => {
                left_out.push(
                    "10k services x 1000 backends left out by default (10M backend entries, minutes of map writes): run with --full"
                        .into(),
                );
                let mut c: Vec<Config> = [1, 100].into_iter().flat_map(all).collect();
                c.push(Config::new(10_000, 10));
                (c, vec![0, 1_000_000], 7, 200_000, 8192)
            }
            Scale::Full => {
                let c: Vec<Config> = [1, 100, 10_000].into_iter().flat_map(all).collect();
                (c, vec![0, 1_000_000], 7, 1_000_000, 8192)
            }
        };
        Plan {
            reference: Config::new(1, 8),
            reference_fill: if matches!(scale, Scale::Smoke) {
                10_000
            } else {
                100_000
            },
            configs,
            fills,
            runs,
            repeat,
            new_flow_repeat,
            left_out,
            katran_skipped: matches!(scale, Scale::Smoke).then(|| {
                "smoke scale (Katran needs clang, bpftool, its source and 2 x 4M-entry LRUs): `cargo xtask bench` measures it".to_string()
            }),
        }
    }
}

/// Reference programs and floors of one configuration (medians, ns per run).
#[derive(Clone, Debug, Default)]
pub struct Refs {
    /// `xdp_pass` run directly: the test-run loop itself.
    pub empty: f64,
    /// `xdp_tx` run directly.
    pub tx_only: f64,
    /// The wrapper (frame restore) tail-calling `xdp_tx`.
    pub floor: f64,
    /// The wrapper with the per-run variation, tail-calling `xdp_tx`.
    pub floor_vary: f64,
    /// Single operations of the hot path behind the wrapper, net of the floor: a
    /// bpf_fib_lookup (node address to a backend behind the gateway) ...
    pub fib_lookup: f64,
    /// ... a hash lookup of a 40-byte key in an LRU map (a flow-table hit) ...
    pub hash_lookup: f64,
    /// ... and an insert of a new 40-byte key into that LRU map (net of the varied floor).
    pub hash_insert: f64,
}

/// One configuration and flow-table fill.
#[derive(Clone, Debug)]
pub struct Setup {
    pub config: Config,
    /// Flow-table entries added before measuring.
    pub prefilled: u32,
    /// How long adding them took (user-space map updates).
    pub fill_time: Option<Duration>,
    /// Loading the data path and installing the services (reconciler).
    pub install_time: Duration,
    pub refs: Refs,
    /// User-space share of all CPUs while this setup was measured: nothing of the benchmark
    /// runs in user space then, so this is other work competing for the machine.
    pub other_load: f64,
}

impl Setup {
    pub fn label(&self) -> String {
        let fill = if self.prefilled == 0 {
            "empty".to_string()
        } else if self.prefilled.is_multiple_of(1_000_000) {
            format!("{}M flows", self.prefilled / 1_000_000)
        } else {
            format!("{}k flows", self.prefilled / 1000)
        };
        format!("{}, {fill}", self.config.label())
    }
}

/// One scenario in one setup.
#[derive(Clone, Debug)]
pub struct Row {
    pub setup: usize,
    pub scenario: Scenario,
    pub repeat: u32,
    /// Kernel-measured ns per packet of each timed run.
    pub runs_ns: Vec<f64>,
    pub gross: f64,
    pub floor: f64,
    /// gross - floor.
    pub net: f64,
    /// Wrapper runs the data path's `packets` counter accounted for over the timed runs
    /// (== runs x repeat, or the run is an error).
    pub verified: u64,
    /// Packets of the timed runs whose verdict was not the scenario's (the data path decided
    /// otherwise, e.g. no free snat port), with the counters that say why. Empty: every packet
    /// got the expected verdict.
    pub anomalies: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scenario {
    NonVip,
    Established,
    NewSyn,
    NewMidstream,
    ReplySnat,
    EstablishedLimiter,
    NewSynLimiter,
    LimiterMiss,
    RateLimitedDrop,
    /// Established flows taking turns: 16k flows from 1024 sources (the throughput bench's
    /// mix), then 16k flows from 16k sources; each with the limiter off and on.
    ManyFlows,
    ManyFlowsLimiter,
    ManySources,
    ManySourcesLimiter,
}

impl Scenario {
    pub const ALL: [Scenario; 13] = [
        Scenario::NonVip,
        Scenario::Established,
        Scenario::EstablishedLimiter,
        Scenario::ReplySnat,
        Scenario::NewSyn,
        Scenario::NewMidstream,
        Scenario::NewSynLimiter,
        Scenario::LimiterMiss,
        Scenario::RateLimitedDrop,
        Scenario::ManyFlows,
        Scenario::ManyFlowsLimiter,
        Scenario::ManySources,
        Scenario::ManySourcesLimiter,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::NonVip => "non-VIP packet (pass)",
            Scenario::Established => "established flow, limiter off",
            Scenario::EstablishedLimiter => "established flow, limiter on",
            Scenario::ReplySnat => "reply translation (snat)",
            Scenario::NewSyn => "new flow: TCP SYN",
            Scenario::NewMidstream => "new flow: non-SYN miss",
            Scenario::NewSynLimiter => "new flow: SYN, limiter on (known source)",
            Scenario::LimiterMiss => "limiter miss: SYN from a new source",
            Scenario::RateLimitedDrop => "rate-limited drop",
            Scenario::ManyFlows => "established, 16k flows / 1024 sources, limiter off",
            Scenario::ManyFlowsLimiter => "established, 16k flows / 1024 sources, limiter on",
            Scenario::ManySources => "established, 16k flows / 16k sources, limiter off",
            Scenario::ManySourcesLimiter => "established, 16k flows / 16k sources, limiter on",
        }
    }

    /// Short name for plots.
    pub fn short(self) -> &'static str {
        match self {
            Scenario::NonVip => "non-VIP",
            Scenario::Established => "established",
            Scenario::EstablishedLimiter => "estab.+limiter",
            Scenario::ReplySnat => "reply (snat)",
            Scenario::NewSyn => "new SYN",
            Scenario::NewMidstream => "new non-SYN",
            Scenario::NewSynLimiter => "new SYN+limiter",
            Scenario::LimiterMiss => "limiter miss",
            Scenario::RateLimitedDrop => "rate-limited drop",
            Scenario::ManyFlows => "16k flows",
            Scenario::ManyFlowsLimiter => "16k flows+limiter",
            Scenario::ManySources => "16k sources",
            Scenario::ManySourcesLimiter => "16k sources+limiter",
        }
    }

    /// Issue 15's target: at most this multiple of Katran's cost on the given Katran path
    /// (Katran has no limiter: the limiter scenarios are held against its path without one).
    pub fn katran_target(self) -> Option<(Scenario, f64)> {
        match self {
            Scenario::NonVip => Some((Scenario::NonVip, 1.0)),
            Scenario::Established => Some((Scenario::Established, 1.0)),
            Scenario::EstablishedLimiter => Some((Scenario::Established, 1.15)),
            Scenario::NewSyn => Some((Scenario::NewSyn, 1.25)),
            Scenario::NewMidstream => Some((Scenario::NewMidstream, 1.25)),
            Scenario::LimiterMiss => Some((Scenario::NewSyn, 2.0)),
            _ => None,
        }
    }

    /// The target as printed: "<= 1.25x Katran".
    pub fn target(self) -> Option<String> {
        self.katran_target().map(|(basis, x)| {
            if basis == self {
                format!("<= {x:.2}x Katran")
            } else {
                format!("<= {x:.2}x Katran's {}", basis.short())
            }
        })
    }

    /// Katran's cost of this path as issue 15 measured it side by side on this machine
    /// (2026-12-02, ns net of the floor): quoted when Katran cannot be measured in the run.
    pub fn issue_katran_ns(self) -> Option<f64> {
        match self {
            Scenario::NonVip => Some(69.0),
            Scenario::Established => Some(137.0),
            Scenario::NewSyn => Some(748.0),
            Scenario::NewMidstream => Some(874.0),
            _ => None,
        }
    }

    /// The scenarios Katran has (its paths without a limiter).
    pub const KATRAN: [Scenario; 4] = [
        Scenario::NonVip,
        Scenario::Established,
        Scenario::NewSyn,
        Scenario::NewMidstream,
    ];

    fn creates_state(self) -> bool {
        matches!(
            self,
            Scenario::NewSyn
                | Scenario::NewMidstream
                | Scenario::NewSynLimiter
                | Scenario::LimiterMiss
        )
    }
}

/// Katran in this run.
#[derive(Clone, Debug)]
pub enum KatranOutcome {
    /// Not asked for (smoke scale, or `--no-katran`).
    Skipped(String),
    /// Asked for, but it could not be fetched, built or loaded here: why.
    Unavailable(String),
    /// Measured in the reference setup (rows' `setup` is 0).
    Measured {
        /// Where its source came from.
        source: String,
        /// Entries of each per-CPU LRU.
        lru_entries: u32,
        /// Flows put into the measuring CPU's LRU before measuring.
        prefilled: u32,
        rows: Vec<Row>,
    },
}

/// Everything the per-packet part measured.
#[derive(Clone, Debug)]
pub struct PerPacket {
    pub setups: Vec<Setup>,
    pub rows: Vec<Row>,
    pub runs: usize,
    pub repeat: u32,
    pub new_flow_repeat: u32,
    pub cpu: usize,
    pub left_out: Vec<String>,
    pub katran: KatranOutcome,
}

impl PerPacket {
    pub fn row(&self, setup: usize, s: Scenario) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.setup == setup && r.scenario == s)
    }

    /// Katran's row of scenario `s`, if it was measured.
    pub fn katran_row(&self, s: Scenario) -> Option<&Row> {
        match &self.katran {
            KatranOutcome::Measured { rows, .. } => rows.iter().find(|r| r.scenario == s),
            _ => None,
        }
    }
}

pub fn run(scale: Scale, cpu: usize, katran: bool) -> Result<PerPacket> {
    let mut plan = Plan::for_scale(scale);
    if !katran && plan.katran_skipped.is_none() {
        plan.katran_skipped = Some("not asked for (--no-katran)".into());
    }
    run_plan(&plan, cpu)
}

pub fn run_plan(plan: &Plan, cpu: usize) -> Result<PerPacket> {
    let mut out = PerPacket {
        setups: Vec::new(),
        rows: Vec::new(),
        runs: plan.runs,
        repeat: plan.repeat,
        new_flow_repeat: plan.new_flow_repeat,
        cpu,
        left_out: plan.left_out.clone(),
        katran: KatranOutcome::Skipped(plan.katran_skipped.clone().unwrap_or_default()),
    };
    // Katran is built once, before the reference setup, which measures it.
    let mut katran_built = None;
    if let Some(why) = &plan.katran_skipped {
        println!("per-packet: Katran not measured: {why}");
    } else {
        println!("per-packet: building Katran (the reference issue 15 measures against)");
        match katran::build() {
            Ok(b) => {
                println!("  Katran: {}", b.source);
                katran_built = Some(b);
            }
            Err(e) => {
                println!("  Katran unavailable: {e:#}");
                out.katran = KatranOutcome::Unavailable(format!("{e:#}"));
            }
        }
    }
    let setups = std::iter::once((plan.reference, vec![plan.reference_fill]))
        .chain(plan.configs.iter().map(|c| (*c, plan.fills.clone())));
    for (config, fills) in setups {
        println!(
            "per-packet: {} (ring {}), flow fills {fills:?}",
            config.label(),
            config.ring_size,
        );
        let with_katran = katran_built.take();
        // A thread per configuration: the fixture moves its thread into a private network
        // namespace, which goes away with the thread.
        let (setups, rows, katran) = std::thread::scope(|s| {
            s.spawn(|| measure_config(config, plan, &fills, cpu, with_katran))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
        .with_context(|| config.label())?;
        if let Some(k) = katran {
            out.katran = k;
        }
        let base = out.setups.len();
        out.setups.extend(setups);
        out.rows.extend(rows.into_iter().map(|mut r| {
            r.setup += base;
            r
        }));
    }
    Ok(out)
}

/// Addresses of the benchmark's services and clients.
struct Layout {
    services: u32,
    backends: u32,
    /// The service the packets go to (the middle one).
    target: u32,
}

impl Layout {
    /// Service `i`: VIP 10.96.0.1 + i / 10, port 80 + i % 10 (10 services per VIP: LB_ADDRS
    /// holds 4096 addresses).
    #[allow(
        clippy::unused_self,
        reason = "the layout's addresses are asked of the layout"
    )]
    fn frontend(&self, i: u32) -> Frontend {
        Frontend {
            vip: IpAddr::V4(Ipv4Addr::from(
                u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i / 10,
            )),
            port: 80 + (i % 10) as u16,
            protocol: Protocol::Tcp,
        }
    }

    /// Backend `j` (shared by every service, as pods behind several services are):
    /// 10.1.0.2 + j, routed through the fixture's gateway on the uplink (so snat flows leave
    /// by XDP_TX).
    #[allow(
        clippy::unused_self,
        reason = "the layout's addresses are asked of the layout"
    )]
    fn backend(&self, j: u32) -> Backend {
        Backend {
            addr: IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 2)) + j)),
            port: BACKEND_PORT,
            weight: 1,
        }
    }

    /// Every service, snat; with `limiter`, rate-limited by `policy` (the node default).
    /// The policy stays defined either way: removing it would leave its LB_POLICIES slot as
    /// it was, and flows created under it would keep those limits (see the report).
    fn desired(&self, policy: Policy, limiter: bool) -> Desired {
        let backends: Vec<Backend> = (0..self.backends).map(|j| self.backend(j)).collect();
        let mut d = Desired::default();
        d.node.hash_seed = 42;
        d.policies.insert("bench".into(), policy);
        if limiter {
            d.node.default_policy = Some("bench".into());
        }
        for i in 0..self.services {
            let frontend = self.frontend(i);
            d.services.insert(
                frontend,
                Service {
                    name: format!("svc{i}"),
                    origin: "bench".into(),
                    frontend,
                    mode: Mode::Snat,
                    backends: backends.clone(),
                    policy: None,
                    affinity: None,
                    source_ranges: lb_userspace::model::SourceRanges::default(),
                }
                .into(),
            );
        }
        d
    }

    fn target(&self) -> Frontend {
        self.frontend(self.target)
    }

    fn vip(&self) -> String {
        self.target().vip.to_string()
    }

    fn port(&self) -> u16 {
        self.target().port
    }
}

/// A policy nothing ever exceeds (the limiter runs, admits every packet).
fn generous_policy() -> Policy {
    let rate = Rate {
        per_second: lb_common::bucket::MAX_RATE,
        burst: lb_common::bucket::MAX_BURST,
    };
    policy(rate)
}

/// One packet per second: everything after the first is dropped.
fn strict_policy() -> Policy {
    policy(Rate {
        per_second: 1,
        burst: 1,
    })
}

fn policy(rate: Rate) -> Policy {
    Policy {
        limits: Limits {
            packets: Some(rate),
            connections: Some(rate),
        },
        ipv6_prefix: 64,
        table_full: TableFull::FailClosed,
        reset_rejected_syn: false,
        exempt: Vec::new(),
        deny: Vec::new(),
        overrides: Vec::new(),
    }
}

/// A 64-byte TCP frame (10 bytes of payload).
fn tcp_frame(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Vec<u8> {
    let f = Spec::tcp(src, sport, dst, dport, flags)
        .macs(CLIENT_MAC, [2, 0, 0, 0, 0, 1])
        .payload(&[0x42; 10])
        .build();
    debug_assert_eq!(f.len(), FRAME_LEN);
    f
}

/// The many-flows scenarios: MANY_FLOWS flows over MANY_SOURCES_FEW or MANY_FLOWS sources.
/// Two sets at once (limiter off and on) need 2 x MANY_FLOWS snat ports: 4536 per backend
/// hold them with 8 backends.
const MANY_FLOWS: u32 = 16_384;
const MANY_SOURCES_FEW: u32 = 1024;

const HOLD_SECS: u64 = 8;

/// Whether XDPLB_BENCH_HOLD names this scenario (its short name): it then runs for HOLD_SECS
/// before its first measured round, for a profiler to watch.
fn hold_for(s: Scenario) -> bool {
    std::env::var("XDPLB_BENCH_HOLD").is_ok_and(|v| v == s.short())
}

/// The client whose flow runs under the limiter (generous, then strict).
const LIMITED_CLIENT: &str = "10.0.0.11";
const LIMITED_PORT: u16 = 40001;

/// What a scenario's runs must show.
struct Expect {
    verdict: u32,
    /// Counters that must move by exactly the number of runs.
    exact: Vec<Counter>,
    /// Counters that must move by at least runs - 1 (a strict limiter may admit one packet
    /// when its bucket refills during the measurement).
    almost: Vec<Counter>,
}

/// A scenario's packet and how to vary it.
struct Case {
    scenario: Scenario,
    frame: Vec<u8>,
    vary: Vary,
    /// Base source address and port of varied frames (for the clean-up).
    src: Ipv4Addr,
    sport: u16,
    expect: Expect,
    repeat: u32,
}

struct Bench<'a> {
    fx: Fixture,
    tools: BenchTools,
    layout: &'a Layout,
    plan: &'a Plan,
    /// Next sequence number: every run starts where the previous ended, so varied tuples never
    /// repeat within a configuration.
    seq: u64,
}

fn measure_config(
    config: Config,
    plan: &Plan,
    fills: &[u32],
    cpu: usize,
    katran_built: Option<katran::Built>,
) -> Result<(Vec<Setup>, Vec<Row>, Option<KatranOutcome>)> {
    pin_thread(cpu)?;
    let layout = Layout {
        services: config.services,
        backends: config.backends,
        target: config.services / 2,
    };
    let sizes = Sizes {
        flow_entries_v6: 1024,
        max_services: config.services,
        max_backends: config.services * config.backends + 16,
        ring_size: config.ring_size,
        flow_entries: FLOW_ENTRIES,
        source_entries: SOURCE_ENTRIES,
        affinity_entries: 1024,
    };
    let started = Instant::now();
    let mut fx = Fixture::new(sizes)?;
    fx.apply(&layout.desired(generous_policy(), false))
        .context("installing the services")?;
    let install_time = started.elapsed();
    println!(
        "  loaded and installed {} services x {} backends in {:.1?}",
        config.services, config.backends, install_time
    );
    let tools = BenchTools::load()?;
    let mut b = Bench {
        fx,
        tools,
        layout: &layout,
        plan,
        seq: 1,
    };
    let mut setups = Vec::new();
    let mut rows = Vec::new();
    let mut filled = 0u32;
    let mut katran_outcome = None;
    let mut katran_side = match katran_built {
        Some(built) => match b.katran_side(built, fills.first().copied().unwrap_or(0), cpu) {
            Ok(side) => Some(side),
            Err(e) => {
                println!("  Katran unavailable: {e:#}");
                katran_outcome = Some(KatranOutcome::Unavailable(format!("{e:#}")));
                None
            }
        },
        None => None,
    };
    for &fill in fills {
        let fill_time = if fill > filled {
            let t = b.fill_flows(filled, fill - filled)?;
            println!(
                "  added {} flow-table entries in {:.2?} ({:.0} ns each, user-space map updates)",
                fill - filled,
                t,
                t.as_nanos() as f64 / f64::from(fill - filled)
            );
            filled = fill;
            Some(t)
        } else {
            None
        };
        let setup_index = setups.len();
        let mut setup = Setup {
            config,
            prefilled: fill,
            fill_time,
            install_time,
            refs: Refs::default(),
            other_load: 0.0,
        };
        let load0 = user_ticks()?;
        let (fib_lookup, hash_lookup, hash_insert) = b.components()?;
        let mut floors: Vec<f64> = Vec::new();
        let mut floors_vary: Vec<f64> = Vec::new();
        let mut empty: Vec<f64> = Vec::new();
        let mut tx_only: Vec<f64> = Vec::new();
        b.references(&mut empty, &mut tx_only)?;
        // Three phases (the limiter off, on, and strict); within a phase the scenarios and the
        // floors take turns run by run, so load from elsewhere hits them alike.
        let mut measured = Vec::new();
        b.fx.apply(&layout.desired(generous_policy(), false))?;
        let cases = b.cases_limiter_off()?;
        // Katran, if loaded, takes turns with these (the first fill only).
        let katran_now = if setup_index == 0 {
            katran_side.as_mut()
        } else {
            None
        };
        measured.extend(b.measure_phase(&cases, &mut floors, &mut floors_vary, katran_now)?);
        b.fx.apply(&layout.desired(generous_policy(), true))?;
        let cases = b.cases_limiter_on()?;
        measured.extend(b.measure_phase(&cases, &mut floors, &mut floors_vary, None)?);
        b.fx.apply(&layout.desired(strict_policy(), true))?;
        let cases = [b.case_rate_limited()?];
        measured.extend(b.measure_phase(&cases, &mut floors, &mut floors_vary, None)?);
        // Many established flows taking turns, measured with the limiter off and on in the same
        // rounds (an established flow follows its service's current policy, so the same flows
        // serve both): the limiter's cost once its sources no longer sit in the closest
        // caches, net of the flow table's own.
        for (sources, off, on) in [
            (
                MANY_SOURCES_FEW,
                Scenario::ManyFlows,
                Scenario::ManyFlowsLimiter,
            ),
            (
                MANY_FLOWS,
                Scenario::ManySources,
                Scenario::ManySourcesLimiter,
            ),
        ] {
            let cases = b.cases_many(sources, off, on)?;
            measured.extend(b.measure_toggled(&cases, &mut floors, &mut floors_vary)?);
            b.forget_many(&cases[0].0)?;
        }
        // The next fill starts the limiter scenarios from a full bucket again.
        b.forget_source(LIMITED_CLIENT)?;
        b.fx.apply(&layout.desired(generous_policy(), false))?;
        b.references(&mut empty, &mut tx_only)?;
        setup.refs = Refs {
            empty: median(&empty),
            tx_only: median(&tx_only),
            floor: median(&floors),
            floor_vary: median(&floors_vary),
            fib_lookup: median(&fib_lookup) - median(&floors),
            hash_lookup: median(&hash_lookup) - median(&floors),
            hash_insert: median(&hash_insert) - median(&floors_vary),
        };
        let load1 = user_ticks()?;
        setup.other_load = share(load0, load1);
        for (case_vary, scenario, repeat, runs_ns, verified, anomalies) in measured {
            let floor = if case_vary {
                setup.refs.floor_vary
            } else {
                setup.refs.floor
            };
            let gross = median(&runs_ns);
            rows.push(Row {
                setup: setup_index,
                scenario,
                repeat,
                runs_ns,
                gross,
                floor,
                net: gross - floor,
                verified,
                anomalies,
            });
        }
        println!(
            "  {}: empty {:.0} ns, XDP_TX-only {:.0} ns, floor {:.0} ns (varied {:.0} ns); alone: bpf_fib_lookup {:.0} ns, 40-byte LRU hash hit {:.0} ns, insert {:.0} ns",
            setup.label(),
            setup.refs.empty,
            setup.refs.tx_only,
            setup.refs.floor,
            setup.refs.floor_vary,
            setup.refs.fib_lookup,
            setup.refs.hash_lookup,
            setup.refs.hash_insert
        );
        for r in rows.iter().filter(|r| r.setup == setup_index) {
            println!(
                "    {:<42} {:>7.0} ns net ({:.0} gross, runs {:.0?})",
                r.scenario.name(),
                r.net,
                r.gross,
                r.runs_ns
            );
        }
        if setup_index == 0
            && let Some(side) = katran_side.take()
        {
            let krows = side.rows(&setup.refs);
            for r in &krows {
                println!(
                    "    Katran: {:<34} {:>7.0} ns net ({:.0} gross, runs {:.0?})",
                    r.scenario.name(),
                    r.net,
                    r.gross,
                    r.runs_ns
                );
            }
            katran_outcome = Some(KatranOutcome::Measured {
                source: side.katran.built.source.clone(),
                lru_entries: katran::LRU_ENTRIES,
                prefilled: side.katran.prefilled,
                rows: krows,
            });
        }
        setups.push(setup);
    }
    Ok((setups, rows, katran_outcome))
}

/// Katran's side of the reference setup: the loaded balancer, its cases (the same frames as
/// xdplb's), and what its runs measured.
struct KatranSide {
    katran: katran::Katran,
    vip: [u8; 4],
    port: u16,
    cases: Vec<KatranCase>,
    /// Per case: ns of each recorded run, packets verified, anomalies.
    acc: Vec<(Vec<f64>, u64, Vec<String>)>,
}

struct KatranCase {
    scenario: Scenario,
    frame: Vec<u8>,
    vary: Vary,
    src: Ipv4Addr,
    sport: u16,
    verdict: u32,
    repeat: u32,
}

impl KatranSide {
    /// What Katran's own counters must show after `n` packets of `scenario`: wrong ones.
    fn check(scenario: Scenario, d: &katran::Counters, n: u64) -> Vec<String> {
        let want = match scenario {
            // Not a VIP: no packet reaches Katran's VIP path (it passes them at the lookup).
            Scenario::NonVip => katran::Counters::default(),
            Scenario::Established => katran::Counters {
                vip_packets: n,
                encapsulated: n,
                ..Default::default()
            },
            Scenario::NewSyn => katran::Counters {
                vip_packets: n,
                lru_misses: n,
                syn_misses: n,
                encapsulated: n,
                ..Default::default()
            },
            _ => katran::Counters {
                vip_packets: n,
                lru_misses: n,
                nonsyn_misses: n,
                encapsulated: n,
                ..Default::default()
            },
        };
        if *d == want {
            Vec::new()
        } else {
            vec![format!("Katran's counters moved {d:?}, expected {want:?}")]
        }
    }

    fn rows(&self, refs: &Refs) -> Vec<Row> {
        self.cases
            .iter()
            .zip(&self.acc)
            .map(|(case, (runs_ns, verified, anomalies))| {
                let floor = if case.vary.bits != 0 {
                    refs.floor_vary
                } else {
                    refs.floor
                };
                let gross = median(runs_ns);
                Row {
                    setup: 0,
                    scenario: case.scenario,
                    repeat: case.repeat,
                    runs_ns: runs_ns.clone(),
                    gross,
                    floor,
                    net: gross - floor,
                    verified: *verified,
                    anomalies: anomalies.clone(),
                }
            })
            .collect()
    }
}

type Measured = (bool, Scenario, u32, Vec<f64>, u64, Vec<String>);

impl Bench<'_> {
    /// xdp_pass and xdp_tx run directly (no wrapper).
    fn references(&mut self, empty: &mut Vec<f64>, tx_only: &mut Vec<f64>) -> Result<()> {
        let up0 = self.fx.up0;
        let frame = tcp_frame(
            "10.0.0.10",
            40000,
            &self.layout.vip(),
            self.layout.port(),
            TCP_ACK,
        );
        let repeat = self.plan.repeat;
        for _ in 0..self.plan.runs {
            for (name, verdict, out) in [
                ("xdp_pass", XDP_PASS, &mut *empty),
                ("xdp_tx", XDP_TX, &mut *tx_only),
            ] {
                let (v, ns) = timed_run(self.tools.program(name)?, &frame, up0, repeat)?;
                ensure!(v == verdict, "{name} returned {v}");
                out.push(ns as f64);
            }
        }
        Ok(())
    }

    /// One floor run: the wrapper (with `vary`) tail-calling xdp_tx.
    fn floor_run(&mut self, vary: Vary) -> Result<u64> {
        let up0 = self.fx.up0;
        let frame = tcp_frame(
            "10.0.0.10",
            40000,
            &self.layout.vip(),
            self.layout.port(),
            TCP_ACK,
        );
        let repeat = self.plan.repeat;
        self.tools.set_target_own("xdp_tx")?;
        self.tools.set_frame(&frame, vary)?;
        let n0 = self.seq;
        self.tools.set_seq(n0)?;
        let (v, ns) = timed_run(self.tools.program("bench_wrap")?, &frame, up0, repeat)?;
        ensure!(v == XDP_TX, "floor: wrapper -> xdp_tx returned {v}");
        let runs = self.tools.runs_since(n0)?;
        ensure!(
            runs == u64::from(repeat),
            "floor: the wrapper ran {runs} times for repeat {repeat}"
        );
        self.seq += u64::from(repeat);
        Ok(ns)
    }

    /// Rounds of: both floors, then one run of each case. Round 0 warms up (not recorded).
    fn measure_phase(
        &mut self,
        cases: &[Case],
        floors: &mut Vec<f64>,
        floors_vary: &mut Vec<f64>,
        mut katran: Option<&mut KatranSide>,
    ) -> Result<Vec<Measured>> {
        let up0 = self.fx.up0;
        let mut acc: Vec<(Vec<f64>, u64, Vec<String>)> =
            cases.iter().map(|_| (Vec::new(), 0, Vec::new())).collect();
        for round in 0..=self.plan.runs {
            let f = self.floor_run(Vary::NONE)?;
            let fv = self.floor_run(Vary::new_flows(1024))?;
            if round > 0 {
                floors.push(f as f64);
                floors_vary.push(fv as f64);
            }
            // Katran and xdplb take turns going first, so neither always runs on a cache the
            // other just warmed (or cooled).
            let katran_first = round % 2 == 1;
            if katran_first && let Some(side) = katran.as_deref_mut() {
                self.katran_round(side, round)?;
            }
            let uplink = dataplane::program_mut(&mut self.fx.ebpf, PROG_UPLINK)?;
            self.tools.set_target(uplink)?;
            for (case, (runs_ns, verified, anomalies)) in cases.iter().zip(acc.iter_mut()) {
                self.tools.set_frame(&case.frame, case.vary)?;
                if round == 0 && hold_for(case.scenario) {
                    let until = Instant::now() + Duration::from_secs(HOLD_SECS);
                    println!("    holding {} for {HOLD_SECS} s", case.scenario.short());
                    while Instant::now() < until {
                        self.one_run(case, up0)?;
                    }
                }
                let (ns, anomaly) = self
                    .one_run(case, up0)
                    .with_context(|| format!("{} (round {round})", case.scenario.name()))?;
                if round > 0 {
                    runs_ns.push(ns as f64);
                    *verified += u64::from(case.repeat);
                    if let Some(a) = anomaly {
                        println!("    {}: run {round}: {a}", case.scenario.name());
                        anomalies.push(format!("run {round}: {a}"));
                    }
                }
            }
            if !katran_first && let Some(side) = katran.as_deref_mut() {
                self.katran_round(side, round)?;
            }
        }
        Ok(cases
            .iter()
            .zip(acc)
            .map(|(case, (runs_ns, verified, anomalies))| {
                (
                    case.vary.bits != 0,
                    case.scenario,
                    case.repeat,
                    runs_ns,
                    verified,
                    anomalies,
                )
            })
            .collect())
    }

    /// Loads Katran (built by `katran::build`), configures it as issue 15's setup for this
    /// layout's target service (its VIP and port, the same backends as reals), fills the
    /// measuring CPU's LRU with `fill` flows and the established flow, and makes its cases:
    /// the frames of xdplb's cases.
    fn katran_side(&mut self, built: katran::Built, fill: u32, cpu: usize) -> Result<KatranSide> {
        let started = Instant::now();
        let vip: Ipv4Addr = self.layout.vip().parse()?;
        let port = self.layout.port();
        let setup = katran::Setup {
            vip: vip.octets(),
            port,
            reals: (0..self.layout.backends)
                .map(|j| match self.layout.backend(j).addr {
                    IpAddr::V4(a) => a.octets(),
                    IpAddr::V6(_) => [0; 4],
                })
                .collect(),
            gateway_mac: crate::kernel::GW_MAC,
        };
        let mut k = katran::Katran::load(built, &setup, katran::LRU_ENTRIES, cpu)?;
        k.fill(&setup, fill)?;
        k.add_flow(katran::flow_key([10, 0, 0, 10], setup.vip, 40000, port), 1)?;
        println!(
            "  Katran loaded ({}), {} reals, LRUs of {} entries per CPU, {fill} flows added, in {:.1?}",
            k.built.source,
            setup.reals.len(),
            katran::LRU_ENTRIES,
            started.elapsed()
        );
        let (vip_s, repeat, new_repeat) =
            (vip.to_string(), self.plan.repeat, self.plan.new_flow_repeat);
        let non_vip = self.non_vip_address()?.to_string();
        let cases = vec![
            KatranCase {
                scenario: Scenario::NonVip,
                frame: tcp_frame("10.0.0.10", 40000, &non_vip, port, TCP_ACK),
                vary: Vary::NONE,
                src: Ipv4Addr::UNSPECIFIED,
                sport: 0,
                verdict: XDP_PASS,
                repeat,
            },
            KatranCase {
                scenario: Scenario::Established,
                frame: tcp_frame("10.0.0.10", 40000, &vip_s, port, TCP_ACK),
                vary: Vary::NONE,
                src: Ipv4Addr::UNSPECIFIED,
                sport: 0,
                verdict: XDP_TX,
                repeat,
            },
            KatranCase {
                scenario: Scenario::NewSyn,
                frame: tcp_frame("10.64.0.0", 1024, &vip_s, port, TCP_SYN),
                vary: Vary::new_flows(1024),
                src: Ipv4Addr::new(10, 64, 0, 0),
                sport: 1024,
                verdict: XDP_TX,
                repeat: new_repeat,
            },
            KatranCase {
                scenario: Scenario::NewMidstream,
                frame: tcp_frame("10.66.0.0", 1024, &vip_s, port, TCP_ACK),
                vary: Vary::new_flows(1024),
                src: Ipv4Addr::new(10, 66, 0, 0),
                sport: 1024,
                verdict: XDP_TX,
                repeat: new_repeat,
            },
        ];
        let acc = cases.iter().map(|_| (Vec::new(), 0, Vec::new())).collect();
        Ok(KatranSide {
            katran: k,
            vip: setup.vip,
            port,
            cases,
            acc,
        })
    }

    /// One run of each Katran case behind the wrapper, checked by Katran's counters and (for
    /// new flows) its LRU, whose new entries are then deleted so it keeps its fill. Round 0
    /// warms up and is not recorded.
    fn katran_round(&mut self, side: &mut KatranSide, round: usize) -> Result<()> {
        let up0 = self.fx.up0;
        self.tools.set_target_fd(&side.katran.program)?;
        for (case, (runs_ns, verified, anomalies)) in side.cases.iter().zip(side.acc.iter_mut()) {
            self.tools.set_frame(&case.frame, case.vary)?;
            let creates = case.vary.bits != 0;
            if creates {
                side.katran.reset_rate_guard()?;
            }
            let n0 = self.seq;
            self.tools.set_seq(n0)?;
            let before = side.katran.counters()?;
            let (verdict, ns) = timed_run(
                self.tools.program("bench_wrap")?,
                &case.frame,
                up0,
                case.repeat,
            )
            .with_context(|| format!("Katran: {} (round {round})", case.scenario.name()))?;
            let d = side.katran.counters()?.delta(&before);
            self.seq += u64::from(case.repeat);
            let repeat = u64::from(case.repeat);
            let runs = self.tools.runs_since(n0)?;
            ensure!(
                runs == repeat,
                "Katran: {}: the wrapper ran {runs} times for repeat {repeat}",
                case.scenario.name()
            );
            let mut wrong = KatranSide::check(case.scenario, &d, repeat);
            if verdict != case.verdict {
                wrong.push(format!("last verdict {verdict}, expected {}", case.verdict));
            }
            if creates {
                let keys: Vec<[u8; 40]> = (n0..n0 + repeat)
                    .map(|n| {
                        let (a, p) = case.vary.offsets(n);
                        katran::flow_key(
                            (u32::from(case.src).wrapping_add(a)).to_be_bytes(),
                            side.vip,
                            case.sport.wrapping_add(p),
                            side.port,
                        )
                    })
                    .collect();
                let found = side.katran.forget_flows(&keys);
                if found != repeat {
                    wrong.push(format!("{found} of {repeat} new flows in Katran's LRU"));
                }
            }
            if round > 0 {
                runs_ns.push(ns as f64);
                *verified += repeat;
                if !wrong.is_empty() {
                    let a = format!("run {round}: {}", wrong.join(", "));
                    println!("    Katran: {}: {a}", case.scenario.name());
                    anomalies.push(a);
                }
            }
        }
        Ok(())
    }

    /// bench_fib, bench_lookup and bench_insert behind the wrapper (gross ns per run, `runs`
    /// each; inserts of a new key every run, the map emptied after each run).
    fn components(&mut self) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        let up0 = self.fx.up0;
        let backend = self.layout.backend(0).addr.to_string();
        let fib_frame = tcp_frame(NODE_V4, 61000, &backend, BACKEND_PORT, TCP_ACK);
        let lookup_frame = tcp_frame(
            "10.0.0.10",
            40000,
            &self.layout.vip(),
            self.layout.port(),
            TCP_ACK,
        );
        self.tools.clear_lookup()?;
        self.tools.add_lookup_key(&lookup_frame)?;
        let mut out = (Vec::new(), Vec::new(), Vec::new());
        // bench_insert's map holds 16384 keys: one run of new keys fits without eviction.
        let insert_repeat = self.plan.new_flow_repeat.min(8192);
        for (program, frame, vary, repeat, times) in [
            (
                "bench_fib",
                &fib_frame,
                Vary::NONE,
                self.plan.repeat,
                &mut out.0,
            ),
            (
                "bench_lookup",
                &lookup_frame,
                Vary::NONE,
                self.plan.repeat,
                &mut out.1,
            ),
            (
                "bench_insert",
                &lookup_frame,
                Vary::new_flows(1024),
                insert_repeat,
                &mut out.2,
            ),
        ] {
            self.tools.set_target_own(program)?;
            self.tools.set_frame(frame, vary)?;
            for _ in 0..self.plan.runs {
                self.tools.set_seq(self.seq)?;
                let (v, ns) = timed_run(self.tools.program("bench_wrap")?, frame, up0, repeat)?;
                self.seq += u64::from(repeat);
                ensure!(v == XDP_TX, "{program} returned {v} (expected XDP_TX)");
                times.push(ns as f64);
                if program == "bench_insert" {
                    self.tools.clear_lookup()?;
                }
            }
        }
        Ok(out)
    }

    fn cases_limiter_off(&mut self) -> Result<Vec<Case>> {
        let (vip, port) = (self.layout.vip(), self.layout.port());
        let new_repeat = self.plan.new_flow_repeat;
        let repeat = self.plan.repeat;
        // The established flow, and its reply direction.
        let snat_port = self.open_flow("10.0.0.10", 40000)?;
        let backend = self.flow_backend("10.0.0.10", 40000)?;
        let non_vip = self.non_vip_address()?;
        Ok(vec![
            Case {
                scenario: Scenario::NonVip,
                frame: tcp_frame("10.0.0.10", 40000, &non_vip.to_string(), port, TCP_ACK),
                vary: Vary::NONE,
                src: Ipv4Addr::UNSPECIFIED,
                sport: 0,
                expect: Expect {
                    verdict: XDP_PASS,
                    exact: vec![Counter::PassNotOurs],
                    almost: vec![],
                },
                repeat,
            },
            Case {
                scenario: Scenario::Established,
                frame: tcp_frame("10.0.0.10", 40000, &vip, port, TCP_ACK),
                vary: Vary::NONE,
                src: Ipv4Addr::UNSPECIFIED,
                sport: 0,
                expect: Expect {
                    verdict: XDP_TX,
                    exact: vec![Counter::XdpTx],
                    almost: vec![],
                },
                repeat,
            },
            Case {
                scenario: Scenario::ReplySnat,
                frame: Spec::tcp(
                    &backend.to_string(),
                    BACKEND_PORT,
                    NODE_V4,
                    snat_port,
                    TCP_ACK,
                )
                .macs(crate::kernel::GW_MAC, [2, 0, 0, 0, 0, 1])
                .payload(&[0x42; 10])
                .build(),
                vary: Vary::NONE,
                src: Ipv4Addr::UNSPECIFIED,
                sport: 0,
                expect: Expect {
                    verdict: XDP_TX,
                    exact: vec![Counter::XdpTx],
                    almost: vec![],
                },
                repeat,
            },
            Case {
                scenario: Scenario::NewSyn,
                frame: tcp_frame("10.64.0.0", 1024, &vip, port, TCP_SYN),
                vary: Vary::new_flows(1024),
                src: Ipv4Addr::new(10, 64, 0, 0),
                sport: 1024,
                expect: Expect {
                    verdict: XDP_TX,
                    exact: vec![Counter::FlowsCreated, Counter::XdpTx],
                    almost: vec![],
                },
                repeat: new_repeat,
            },
            Case {
                scenario: Scenario::NewMidstream,
                frame: tcp_frame("10.66.0.0", 1024, &vip, port, TCP_ACK),
                vary: Vary::new_flows(1024),
                src: Ipv4Addr::new(10, 66, 0, 0),
                sport: 1024,
                expect: Expect {
                    verdict: XDP_TX,
                    exact: vec![
                        Counter::FlowsCreated,
                        Counter::FlowsCreatedMidstream,
                        Counter::XdpTx,
                    ],
                    almost: vec![],
                },
                repeat: new_repeat,
            },
        ])
    }

    fn cases_limiter_on(&mut self) -> Result<Vec<Case>> {
        let (vip, port) = (self.layout.vip(), self.layout.port());
        self.open_flow(LIMITED_CLIENT, LIMITED_PORT)?;
        Ok(vec![
            Case {
                scenario: Scenario::EstablishedLimiter,
                frame: tcp_frame(LIMITED_CLIENT, LIMITED_PORT, &vip, port, TCP_ACK),
                vary: Vary::NONE,
                src: Ipv4Addr::UNSPECIFIED,
                sport: 0,
                expect: Expect {
                    verdict: XDP_TX,
                    exact: vec![Counter::XdpTx],
                    almost: vec![],
                },
                repeat: self.plan.repeat,
            },
            Case {
                // 64 sources, each seen in the warm-up run: every packet finds its source.
                scenario: Scenario::NewSynLimiter,
                frame: tcp_frame("10.65.0.0", 1024, &vip, port, TCP_SYN),
                vary: Vary::new_flows(64),
                src: Ipv4Addr::new(10, 65, 0, 0),
                sport: 1024,
                expect: Expect {
                    verdict: XDP_TX,
                    exact: vec![Counter::FlowsCreated, Counter::XdpTx],
                    almost: vec![],
                },
                repeat: self.plan.new_flow_repeat,
            },
            Case {
                scenario: Scenario::LimiterMiss,
                frame: tcp_frame("10.128.0.0", 1024, &vip, port, TCP_SYN),
                vary: Vary::NEW_SOURCES,
                src: Ipv4Addr::new(10, 128, 0, 0),
                sport: 1024,
                expect: Expect {
                    verdict: XDP_TX,
                    exact: vec![
                        Counter::SourcesCreated,
                        Counter::FlowsCreated,
                        Counter::XdpTx,
                    ],
                    almost: vec![],
                },
                repeat: self.plan.new_flow_repeat,
            },
        ])
    }

    /// MANY_FLOWS established flows over `sources` sources, opened by the data path with the
    /// limiter on (a SYN each, through the wrapper; every source tracked), and their cases:
    /// the same packets under scenario `off` with the limiter off, `on` with it on (the bool).
    fn cases_many(
        &mut self,
        sources: u32,
        off: Scenario,
        on: Scenario,
    ) -> Result<Vec<(Case, bool)>> {
        let (vip, port) = (self.layout.vip(), self.layout.port());
        let vary = Vary::flow_mix(sources, MANY_FLOWS);
        let (src, sport) = (Ipv4Addr::new(10, 70, 0, 0), 1024);
        self.layout_apply(true)?;
        let up0 = self.fx.up0;
        let uplink = dataplane::program_mut(&mut self.fx.ebpf, PROG_UPLINK)?;
        self.tools.set_target(uplink)?;
        let syn = tcp_frame(&src.to_string(), sport, &vip, port, TCP_SYN);
        self.tools.set_frame(&syn, vary)?;
        self.tools.set_seq(self.seq)?;
        let before = counters(&self.fx);
        let (v, _) = timed_run(self.tools.program("bench_wrap")?, &syn, up0, MANY_FLOWS)?;
        let after = counters(&self.fx);
        self.seq += u64::from(MANY_FLOWS);
        let delta = |c: Counter| after[&(c as u32)].wrapping_sub(before[&(c as u32)]);
        ensure!(
            v == XDP_TX
                && delta(Counter::FlowsCreated) == u64::from(MANY_FLOWS)
                && delta(Counter::SourcesCreated) == u64::from(sources),
            "opening {MANY_FLOWS} flows from {sources} sources: last verdict {v}; counters moved: {:?}",
            moved(&before, &after)
        );
        let case = |scenario| Case {
            scenario,
            frame: tcp_frame(&src.to_string(), sport, &vip, port, TCP_ACK),
            vary,
            src,
            sport,
            expect: Expect {
                verdict: XDP_TX,
                exact: vec![Counter::XdpTx],
                almost: vec![],
            },
            repeat: self.plan.repeat,
        };
        Ok(vec![(case(off), false), (case(on), true)])
    }

    /// Like [`Bench::measure_phase`], with the limiter turned off or on (the bool) before each
    /// case's run. A run is checked to have gone through the limiter, or not: the bucket of
    /// the source of its first packet moved (every admitted packet moves it), or stayed.
    fn measure_toggled(
        &mut self,
        cases: &[(Case, bool)],
        floors: &mut Vec<f64>,
        floors_vary: &mut Vec<f64>,
    ) -> Result<Vec<Measured>> {
        let up0 = self.fx.up0;
        let mut acc: Vec<(Vec<f64>, u64, Vec<String>)> =
            cases.iter().map(|_| (Vec::new(), 0, Vec::new())).collect();
        // The sources' policy, read while the service has it.
        self.layout_apply(true)?;
        let policy = self.target_policy()?;
        for round in 0..=self.plan.runs {
            let f = self.floor_run(Vary::NONE)?;
            let fv = self.floor_run(Vary::new_flows(1024))?;
            if round > 0 {
                floors.push(f as f64);
                floors_vary.push(fv as f64);
            }
            for ((case, limiter), (runs_ns, verified, anomalies)) in
                cases.iter().zip(acc.iter_mut())
            {
                self.layout_apply(*limiter)?;
                let uplink = dataplane::program_mut(&mut self.fx.ebpf, PROG_UPLINK)?;
                self.tools.set_target(uplink)?;
                self.tools.set_frame(&case.frame, case.vary)?;
                // The source of the run's first packet (`one_run` starts at `self.seq`).
                let (a, _) = case.vary.offsets(self.seq);
                let first = SourceKey {
                    addr: Addr::from(IpAddr::V4(Ipv4Addr::from(
                        u32::from(case.src).wrapping_add(a),
                    ))),
                    policy,
                };
                let bucket = |b: &Self| {
                    b.fx.maps
                        .read_sources()
                        .into_iter()
                        .find(|s| s.key == first)
                        .map(|s| s.packets.tat)
                };
                let tat0 = bucket(self);
                let (ns, mut anomaly) = self
                    .one_run(case, up0)
                    .with_context(|| format!("{} (round {round})", case.scenario.name()))?;
                let tat1 = bucket(self);
                ensure!(
                    tat0.is_some(),
                    "{}: the run's first source is not tracked",
                    case.scenario.name()
                );
                if (tat0 != tat1) != *limiter {
                    let a = format!(
                        "the run's first source's bucket {} with the limiter {}",
                        if tat0 == tat1 { "stayed" } else { "moved" },
                        if *limiter { "on" } else { "off" }
                    );
                    anomaly = Some(anomaly.map_or(a.clone(), |x| format!("{x}; {a}")));
                }
                if round > 0 {
                    runs_ns.push(ns as f64);
                    *verified += u64::from(case.repeat);
                    if let Some(a) = anomaly {
                        println!("    {}: run {round}: {a}", case.scenario.name());
                        anomalies.push(format!("run {round}: {a}"));
                    }
                }
            }
        }
        Ok(cases
            .iter()
            .zip(acc)
            .map(|((case, _), (runs_ns, verified, anomalies))| {
                (
                    case.vary.bits != 0,
                    case.scenario,
                    case.repeat,
                    runs_ns,
                    verified,
                    anomalies,
                )
            })
            .collect())
    }

    fn layout_apply(&mut self, limiter: bool) -> Result<()> {
        self.fx
            .apply(&self.layout.desired(generous_policy(), limiter))
    }

    /// Deletes the flows (both directions) and sources of a [`Bench::cases_many`] case (the
    /// limiter on: the sources are keyed by the service's policy).
    fn forget_many(&mut self, case: &Case) -> Result<()> {
        self.layout_apply(true)?;
        self.forget(case, 0..u64::from(case.vary.cycle), true)
    }

    #[allow(clippy::unnecessary_wraps, reason = "one signature for every case")]
    fn case_rate_limited(&mut self) -> Result<Case> {
        let (vip, port) = (self.layout.vip(), self.layout.port());
        Ok(Case {
            scenario: Scenario::RateLimitedDrop,
            // The flow opened under the generous policy, whose limit is now 1 packet/s.
            frame: tcp_frame(LIMITED_CLIENT, LIMITED_PORT, &vip, port, TCP_ACK),
            vary: Vary::NONE,
            src: Ipv4Addr::UNSPECIFIED,
            sport: 0,
            expect: Expect {
                verdict: XDP_DROP,
                exact: vec![],
                almost: vec![Counter::DropRate],
            },
            repeat: self.plan.repeat,
        })
    }

    /// Sends the SYN of client:sport -> target service directly (repeat 1) and returns the
    /// snat source port of the flow.
    fn open_flow(&mut self, client: &str, sport: u16) -> Result<u16> {
        let (vip, port) = (self.layout.vip(), self.layout.port());
        let before = counters(&self.fx);
        let out = self
            .fx
            .uplink(&tcp_frame(client, sport, &vip, port, TCP_SYN))?;
        let after = counters(&self.fx);
        ensure!(
            out.verdict == XDP_TX,
            "opening {client}:{sport} -> {vip}:{port}: verdict {}; counters moved: {:?}",
            out.verdict,
            moved(&before, &after)
        );
        let flow = self
            .fx
            .flow4(&crate::kernel::flow_key4(
                client,
                sport,
                &vip,
                port,
                IPPROTO_TCP,
            ))
            .context("the flow entry of the opened flow")?;
        Ok(u16::from_be(flow.port))
    }

    fn flow_backend(&self, client: &str, sport: u16) -> Result<IpAddr> {
        let (vip, port) = (self.layout.vip(), self.layout.port());
        let flow = self
            .fx
            .flow4(&crate::kernel::flow_key4(
                client,
                sport,
                &vip,
                port,
                IPPROTO_TCP,
            ))
            .context("flow entry")?;
        let backend = self.fx.maps.backends.get(&flow.id(), 0)?;
        Ok(IpAddr::from(backend.addr))
    }

    /// An address outside every VIP's filter bit (the common case for traffic not ours: one
    /// bitmap read).
    fn non_vip_address(&self) -> Result<Ipv4Addr> {
        let mut bits = std::collections::BTreeSet::new();
        for i in 0..self.layout.services {
            bits.insert(filter_bit(&Addr::from(self.layout.frontend(i).vip)));
        }
        bits.insert(filter_bit(&Addr::from(NODE_V4.parse::<IpAddr>()?)));
        for last in (100..250).rev() {
            let a = Ipv4Addr::new(10, 0, 0, last);
            if !bits.contains(&filter_bit(&Addr::from(IpAddr::V4(a)))) {
                return Ok(a);
            }
        }
        bail!("no address in 10.0.0.100-249 outside the VIP filter")
    }

    /// One timed run. An error if the harness did not do what it should (the wrapper ran other
    /// than `repeat` times, or the data path did); an anomaly if the data path gave some packets
    /// another verdict than the scenario expects.
    fn one_run(&mut self, case: &Case, up0: u32) -> Result<(u64, Option<String>)> {
        let n0 = self.seq;
        self.tools.set_seq(n0)?;
        let before = counters(&self.fx);
        let (verdict, ns) = timed_run(
            self.tools.program("bench_wrap")?,
            &case.frame,
            up0,
            case.repeat,
        )?;
        let after = counters(&self.fx);
        self.seq += u64::from(case.repeat);
        let runs = self.tools.runs_since(n0)?;
        let delta = |c: Counter| after[&(c as u32)].wrapping_sub(before[&(c as u32)]);
        let repeat = u64::from(case.repeat);
        let moved = moved(&before, &after);
        ensure!(
            runs == repeat,
            "the wrapper ran {runs} times for repeat {repeat}"
        );
        ensure!(
            delta(Counter::Packets) == repeat,
            "the data path ran {} times for {repeat} runs of the wrapper",
            delta(Counter::Packets)
        );
        let mut wrong = Vec::new();
        if verdict != case.expect.verdict {
            wrong.push(format!(
                "last verdict {verdict}, expected {}",
                case.expect.verdict
            ));
        }
        for c in &case.expect.exact {
            if delta(*c) != repeat {
                wrong.push(format!("{} {} of {repeat}", c.name(), delta(*c)));
            }
        }
        for c in &case.expect.almost {
            if delta(*c) + 1 < repeat || delta(*c) > repeat {
                wrong.push(format!(
                    "{} {} of {repeat} (or one less)",
                    c.name(),
                    delta(*c)
                ));
            }
        }
        // Every verdict of the runs is accounted for by the counters: a packet of a
        // state-creating scenario that created nothing leaves nothing to delete.
        if case.scenario.creates_state() {
            self.clean_up(case, n0)?;
        }
        let anomaly =
            (!wrong.is_empty()).then(|| format!("{}; counters moved: {moved:?}", wrong.join(", ")));
        Ok((ns, anomaly))
    }

    /// Deletes the flows (both directions) and sources run `n0..n0+repeat` created.
    fn clean_up(&mut self, case: &Case, n0: u64) -> Result<()> {
        let sources = case.scenario == Scenario::LimiterMiss;
        self.forget(case, n0..n0 + u64::from(case.repeat), sources)
    }

    /// Deletes the flows (both directions) of `case`'s packets `ns`, and with `sources` their
    /// sources.
    fn forget(&mut self, case: &Case, ns: std::ops::Range<u64>, sources: bool) -> Result<()> {
        let (vip, port) = (self.layout.vip(), self.layout.port());
        let vip = Addr::from(vip.parse::<IpAddr>()?);
        let policy = self.target_policy()?;
        for n in ns {
            let (a, p) = case.vary.offsets(n);
            let src = Addr::from(IpAddr::V4(Ipv4Addr::from(
                u32::from(case.src).wrapping_add(a),
            )));
            let key = FlowKey4::new(
                V4::from_addr(&src),
                V4::from_addr(&vip),
                case.sport.wrapping_add(p).to_be(),
                port.to_be(),
                IPPROTO_TCP,
            );
            // A packet the data path dropped (an anomaly, reported) created no flow.
            if let Ok(flow) = self.fx.maps.flows4.get(&key, 0) {
                self.fx.maps.flows4.remove(&key)?;
                // The reply entry, in its claim slot: backend -> the flow's rewritten source.
                if let Ok(b) = self.fx.maps.backends.get(&flow.id(), 0) {
                    let reply = FlowKey4::new(
                        V4::from_addr(&b.addr),
                        flow.addr,
                        b.port,
                        flow.port,
                        IPPROTO_TCP,
                    );
                    self.fx.maps.forget_claim4(&reply)?;
                }
            }
            if sources {
                self.fx
                    .maps
                    .forget_source(&SourceKey { addr: src, policy })?;
            }
        }
        Ok(())
    }

    fn forget_source(&mut self, client: &str) -> Result<()> {
        let policy = self.target_policy()?;
        let addr = Addr::from(client.parse::<IpAddr>()?);
        self.fx.maps.forget_source(&SourceKey { addr, policy })?;
        Ok(())
    }

    /// The target service's policy, as its sources are keyed (id and generation).
    fn target_policy(&self) -> Result<u32> {
        let f = self.layout.target();
        let key = ServiceKey::new(Addr::from(f.vip), f.port.to_be(), IPPROTO_TCP);
        let id = self.fx.maps.services.get(&key, 0)?.policy;
        let policy = self.fx.maps.policies.get(&id, 0)?;
        Ok(policy.source_id(id))
    }

    /// Adds `count` snat flows (forward entries of synthetic clients 10.200.0.0/16 to the target
    /// service, and as many held claim slots) with user-space map updates; returns the time.
    fn fill_flows(&mut self, start: u32, count: u32) -> Result<Duration> {
        let f = self.layout.target();
        let vip = V4::from_addr(&Addr::from(f.vip));
        let node = V4::from_addr(&Addr::from(NODE_V4.parse::<IpAddr>()?));
        let now = lb_common::flow_clock(coarse_now_ns());
        let skey = ServiceKey::new(Addr::from(f.vip), f.port.to_be(), IPPROTO_TCP);
        let service = self.fx.maps.services.get(&skey, 0)?.id;
        let started = Instant::now();
        for i in start..start + count {
            let src = V4(Ipv4Addr::new(10, 200, 0, 0)
                .to_bits()
                .wrapping_add(i & 0xffff)
                .to_be());
            let sport = u16::try_from(1024 + (i >> 16)).expect("fewer than 2^32 - 2^26 flows");
            let key = FlowKey4::new(src, vip, sport.to_be(), f.port.to_be(), IPPROTO_TCP);
            // A snat flow to backend 0 (whose generation is 1: its first id).
            let value = Flow4 {
                last: now,
                flags: FLOW_SNAT | FLOW_TCP,
                generation: self.fx.maps.backends.get(&0, 0).map_or(0, |b| b.generation),
                port: (61000 + (i % 4536) as u16).to_be(),
                id_way: 0,
                addr: node,
            };
            self.fx.maps.flows4.insert(key, value, 0)?;
            // And a snat flow's reply entry in a claim slot, so the claim array is as full as
            // such a flow table's would be: one held slot per flow, keyed as from one of many
            // backends (10.201.0.0/16, each with the whole port range), live.
            let ports = 64_512;
            let backend = V4(Ipv4Addr::new(10, 201, 0, 0)
                .to_bits()
                .wrapping_add(i / ports)
                .to_be());
            let port = u16::try_from(1024 + i % ports).expect("below 65536");
            let reply_key =
                FlowKey4::new(backend, node, 8080u16.to_be(), port.to_be(), IPPROTO_TCP);
            let reply = Flow4 {
                last: now,
                flags: FLOW_SNAT | FLOW_TCP | FLOW_REPLY,
                generation: 0,
                port: key.sport,
                id_way: service,
                addr: src,
            };
            // (A slot the measured flows hold already stays theirs.)
            self.fx.maps.set_claim4(&reply_key, &reply)?;
        }
        Ok(started.elapsed())
    }
}

/// Node-wide counters by index.
fn counters(fx: &Fixture) -> BTreeMap<u32, u64> {
    fx.maps
        .read_counters()
        .into_iter()
        .map(|(c, v)| (c as u32, v))
        .collect()
}

/// The counters that moved, by name.
fn moved(before: &BTreeMap<u32, u64>, after: &BTreeMap<u32, u64>) -> BTreeMap<&'static str, u64> {
    Counter::ALL
        .iter()
        .map(|c| {
            (
                c.name(),
                after[&(*c as u32)].wrapping_sub(before[&(*c as u32)]),
            )
        })
        .filter(|(_, d)| *d != 0)
        .collect()
}

/// (user + nice, total) ticks of all CPUs, from /proc/stat.
fn user_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    Ok((v.iter().take(2).sum(), v.iter().take(8).sum()))
}

fn share(a: (u64, u64), b: (u64, u64)) -> f64 {
    let total = b.1.saturating_sub(a.1);
    if total == 0 {
        return 0.0;
    }
    100.0 * b.0.saturating_sub(a.0) as f64 / total as f64
}
