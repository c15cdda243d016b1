//! Kubernetes at cluster size: the real `lb-agent run --kubernetes`, with the DaemonSet's own
//! arguments (read from deploy/base/daemonset.yaml), on a namespace node, against the test API
//! server (etcd plus tests/k8s-apiserver) holding N opted-in Services with M endpoints each.
//! Numbers, never pass/fail: each figure is printed beside issue 12's target.
//!
//! Method, per size (a fresh API server and agent each time):
//! - the Services and EndpointSlices are created before the agent starts (many requests in
//!   flight; the time this takes is printed and excluded from every figure);
//! - each Service has one external IP (ten Services share an address, on different ports) and
//!   two TCP ports, so N Services are 2N frontends and 2NM backends; endpoints are on another
//!   node (snat, the default), behind the node's default route;
//! - start: from spawning the agent to the first 200 from /readyz, and to every frontend being
//!   in LB_SERVICES with all its backends active (read from the pinned map);
//! - one endpoint change: a merge patch of one EndpointSlice replacing one endpoint, timed from
//!   just before the request to both of the Service's frontends showing a new ring in
//!   LB_SERVICES (ring or digest changed: the agent swaps a Service's ring in after writing it);
//!   end to end, API server and watch included, unlike the agent's own sync-latency metric,
//!   which starts when its watcher sees the change;
//! - 100 Services at once: 100 such patches sent together, timed to the last of their 200
//!   frontends changing;
//! - /healthz and /readyz are asked every 100 ms and /metrics every second, each by a thread
//!   of its own in the node's namespace, from the start until the 100-Service change settled;
//!   the worst answer time in each phase is printed (a request in flight counts until it ends);
//! - idle CPU: utime + stime from /proc/PID/stat over 10 s with nothing changing and nobody
//!   probing; RSS and its peak from /proc/PID/status; map memory: `memlock:` of every map fd in
//!   /proc/PID/fdinfo (the kernel's own accounting);
//! - `lb-agent status --json`: wall time of the command, median and worst of 5;
//! - one Service's Maglev ring built at the size the agent gives it, per backend count (in this
//!   process, no agent): what a changed Service's ring costs.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use k8s_openapi::api::{core::v1::Service as KubeService, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use lb_common::{Addr, IPPROTO_TCP, MAP_SERVICES, Service, ServiceKey};
use lb_userspace::{maglev, ring_space::ring_size};
use serde_json::{Value, json};

use super::Scale;
use crate::{
    agent::{Bpffs, Cleanup, agent_binary},
    apiserver::{Forward, TestApiServer},
    netns::{ChildGuard, Netns},
};

/// Requests in flight while filling the API server.
const CREATE_CONCURRENCY: usize = 128;
/// Where the agent serves its probes in the node's namespace (the DaemonSet's --metrics-addr).
const PROBE_PORT: u16 = 9435;
/// The node's address (the DaemonSet's $(HOST_IP)) and its gateway.
const NODE_ADDR: &str = "10.0.0.1";
const GATEWAY: &str = "10.0.0.254";
const NODE_NAME: &str = "bench-node";
const NS: &str = "default";
/// How long one HTTP probe may take before it counts as its timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the one-at-a-time changes may go on (at least 5 are timed): at cluster size a
/// change can take seconds, and 100 of them would take the better part of an hour.
const CHANGES_BUDGET: Duration = Duration::from_secs(150);
/// Seconds of idle CPU measurement.
const IDLE: Duration = Duration::from_secs(10);

/// One cluster size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    pub services: usize,
    pub endpoints: usize,
}

impl Size {
    pub fn label(self) -> String {
        format!("{} x {}", self.services, self.endpoints)
    }
    /// Two ports per Service, each a frontend on the Service's external IP.
    pub fn frontends(self) -> usize {
        self.services * 2
    }
    pub fn backends(self) -> usize {
        self.frontends() * self.endpoints
    }
    /// Single endpoint changes timed, and Services changed at once.
    fn changes(self) -> (usize, usize) {
        (
            100.min(self.services / 2).max(1),
            100.min(self.services / 2).max(1),
        )
    }
    /// `--max-services` / `--max-backends` for this size, rounded up to a multiple of 1024 and
    /// never below the DaemonSet's defaults: the frontends (rings are preallocated per
    /// frontend slot, so no more room than that), and the backends with a quarter of room
    /// (removed endpoints keep their backend ids while they drain).
    pub fn capacity(self) -> (u32, u32) {
        let round = |n: usize, default: u32| {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            if n <= default {
                default
            } else {
                n.div_ceil(1024) * 1024
            }
        };
        (
            round(self.frontends(), lb_common::DEFAULT_MAX_SERVICES),
            round(
                self.backends() + self.backends() / 4,
                lb_common::DEFAULT_MAX_BACKENDS,
            ),
        )
    }
    /// "1000x10" -> Size.
    pub fn parse(s: &str) -> Option<Size> {
        let (a, b) = s.split_once('x')?;
        Some(Size {
            services: a.trim().parse().ok().filter(|n| *n > 0)?,
            endpoints: b.trim().parse().ok().filter(|n| (1..=15).contains(n))?,
        })
    }
}

/// The sizes a scale runs.
pub fn sizes(scale: Scale) -> Vec<Size> {
    let s = |services, endpoints| Size {
        services,
        endpoints,
    };
    match scale {
        Scale::Smoke => vec![s(50, 3)],
        Scale::Quick => vec![s(1000, 10)],
        Scale::Default | Scale::Full => vec![s(1000, 10), s(10_000, 10)],
    }
}

/// The worst answer of one endpoint in one phase.
#[derive(Clone, Debug, Default)]
pub struct Worst {
    pub path: &'static str,
    /// Answers (or timeouts) in the phase.
    pub probes: usize,
    pub worst: Option<Duration>,
    /// Status of the worst one (None: no answer within the timeout).
    pub status: Option<u16>,
}

/// Everything measured at one size.
#[derive(Clone, Debug)]
pub struct Run {
    pub size: Size,
    /// The agent's command line (after the binary), paths shortened.
    pub args: Vec<String>,
    pub max_services: u32,
    pub max_backends: u32,
    pub create: Duration,
    pub ready: Option<Duration>,
    pub converged: Option<Duration>,
    /// Agent CPU (user + system) from start to converged, seconds.
    pub start_cpu_s: f64,
    pub changes: Vec<Duration>,
    /// Single changes that did not reach the maps within a minute.
    pub changes_lost: usize,
    /// The agent's own sync-latency metric over the single changes: mean, and how many
    /// syncs it counted (watcher to maps, without the API server's part).
    pub agent_sync: Option<(Duration, u64)>,
    pub batch: usize,
    pub batch_converged: Option<Duration>,
    /// When the last of the batch's requests was answered.
    pub batch_sent: Duration,
    pub worst_start: Vec<Worst>,
    pub worst_batch: Vec<Worst>,
    pub idle_cpu_pct: f64,
    pub rss_kb: u64,
    pub hwm_kb: u64,
    pub map_bytes: u64,
    /// The largest maps: (name, bytes).
    pub top_maps: Vec<(String, u64)>,
    pub status_median: Duration,
    pub status_worst: Duration,
    pub status_bytes: usize,
    /// An idle scrape of /metrics (text format): its size, and the median answer of 3.
    pub metrics_bytes: usize,
    pub metrics_idle: Duration,
    /// /proc/loadavg before and after.
    pub load_before: String,
    pub load_after: String,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Kubernetes {
    pub runs: Vec<Run>,
    /// What building one service's Maglev ring costs at its size (the agent builds a ring
    /// only for a Service whose backends changed, so this bounds a change's ring work).
    pub rings: Vec<RingBuild>,
    pub left_out: Vec<String>,
}

/// One ring build: `backends` of weight 1 into a ring of the size the agent gives them when
/// rings may have up to `largest` slots; the median of a few builds.
#[derive(Clone, Debug)]
pub struct RingBuild {
    pub backends: usize,
    pub largest: u32,
    pub size: u32,
    pub time: Duration,
}

/// Backend counts (and largest ring) the ring build is timed at: the bench's 10 per Service,
/// and the sizes large Services reach.
const RING_BUILDS: [(usize, u32); 6] = [
    (10, maglev::MAX_SIZE),
    (100, maglev::MAX_SIZE),
    (1000, maglev::MAX_SIZE),
    (5000, maglev::MAX_SIZE),
    (5000, 65521),
    (5000, 16381),
];

/// Times [`RING_BUILDS`] (pure CPU, this process).
pub fn ring_builds() -> Vec<RingBuild> {
    RING_BUILDS
        .iter()
        .map(|&(backends, largest)| {
            let size = ring_size(backends, largest);
            let keys: Vec<String> = (0..backends)
                .map(|i| format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256))
                .collect();
            let entries: Vec<maglev::Entry<'_>> = keys
                .iter()
                .map(|k| maglev::Entry {
                    key: k.as_bytes(),
                    weight: 1,
                })
                .collect();
            let mut times: Vec<f64> = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    let ring = maglev::build(&entries, size, 7).expect("a listed size");
                    std::hint::black_box(ring);
                    t.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            RingBuild {
                backends,
                largest,
                size,
                time: Duration::from_secs_f64(times[times.len() / 2]),
            }
        })
        .collect()
}

/// Runs every size of `sizes`; a size that fails is left out (with its error) and the next
/// still runs. Fails only if none ran.
pub fn run(sizes: &[Size]) -> Result<Kubernetes> {
    let mut runs = Vec::new();
    let mut left_out = Vec::new();
    let mut first_error = None;
    let rings = ring_builds();
    for &size in sizes {
        println!("kubernetes: {} ...", size.label());
        match run_size(size) {
            Ok(r) => runs.push(r),
            Err(e) => {
                let line = format!("{}: {e:#}", size.label());
                eprintln!("kubernetes: {line}");
                left_out.push(line);
                first_error.get_or_insert(e);
            }
        }
    }
    if runs.is_empty()
        && let Some(e) = first_error
    {
        return Err(e);
    }
    Ok(Kubernetes {
        runs,
        rings,
        left_out,
    })
}

fn run_size(size: Size) -> Result<Run> {
    let mut notes = Vec::new();
    let load_before = loadavg();
    let server = TestApiServer::start().context("test API server")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = rt.block_on(client(server.kubeconfig_path()))?;

    // The cluster, before the agent.
    let started = Instant::now();
    rt.block_on(create_all(&client, size))?;
    let create = started.elapsed();
    println!(
        "  created {} Services and {} EndpointSlices in {:.1} s ({CREATE_CONCURRENCY} requests in flight)",
        size.services,
        size.services,
        create.as_secs_f64()
    );

    // The node.
    crate::netns::remove_stale("xdplb-bench-k8s");
    let ns = Netns::create_unique("xdplb-bench-k8s")?;
    ns.ip_batch(&[
        "link add eth0 type veth peer name eth0p".to_string(),
        "link set eth0 up".into(),
        "link set eth0p up".into(),
        format!("addr add {NODE_ADDR}/24 dev eth0"),
        format!("route add default via {GATEWAY} dev eth0"),
        format!("neigh replace {GATEWAY} lladdr 02:00:00:00:00:fe dev eth0 nud permanent"),
    ])?;
    let forward = Forward::into_netns(&ns, server.url())?;
    let kubeconfig = server.dir().join("node.kubeconfig");
    let text = std::fs::read_to_string(server.kubeconfig_path())?;
    std::fs::write(&kubeconfig, text.replace(server.url(), &forward.url))?;
    let bpffs = Bpffs::mount("bench-k8s")?;
    let state_dir = PathBuf::from(format!(
        "/run/xdplb-tests/{}-bench-k8s-state",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&state_dir);
    std::fs::create_dir_all(&state_dir)?;
    let config = state_dir.join("node.toml");
    std::fs::copy(deploy_dir().join("base/node.toml"), &config)?;
    let pin_dir = bpffs.path().join("agent");
    let (max_services, max_backends) = size.capacity();
    let mut args = daemonset_args()?;
    for a in &mut args {
        *a = a
            .replace("$(NODE_NAME)", NODE_NAME)
            .replace("$(HOST_IP)", NODE_ADDR)
            .replace("/etc/xdplb/node.toml", &config.display().to_string());
    }
    args.extend(
        [
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--pin-dir",
            &pin_dir.display().to_string(),
            "--state-dir",
            &state_dir.display().to_string(),
            "--max-services",
            &max_services.to_string(),
            "--max-backends",
            &max_backends.to_string(),
        ]
        .map(String::from),
    );
    let binary = agent_binary()?;
    let log_path = state_dir.join("agent.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = ns.command(binary.to_str().context("agent path")?);
    cmd.args(&args)
        .env(
            "RUST_LOG",
            std::env::var("XDPLB_BENCH_AGENT_LOG")
                .unwrap_or_else(|_| "info,netlink_packet_route=error".into()),
        )
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    let cleanup = Cleanup {
        binary: binary.clone(),
        pin_dir: pin_dir.clone(),
        state_dir: state_dir.clone(),
    };
    let probes = Probes::start(&ns)?;
    let t0 = Instant::now();
    let mut child = ChildGuard::spawn(cmd)?;
    // `ip netns exec` execs the agent: same pid.
    let pid = child.id();
    let log_tail = || {
        let t = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };

    // Start: every frontend in the maps with all its backends active.
    let services_pin = pin_dir
        .join(format!("v{}", lb_common::MAP_LAYOUT_VERSION))
        .join(MAP_SERVICES);
    let start_limit = Duration::from_secs(120 + 3 * size.services as u64 / 10);
    let services_map = loop {
        if let Some(status) = child.try_wait()? {
            bail!("lb-agent exited ({status}); log:\n{}", log_tail());
        }
        if services_pin.exists()
            && let Ok(m) = open_services(&services_pin)
        {
            break m;
        }
        if t0.elapsed() > start_limit {
            bail!(
                "no {} within {start_limit:?}; log:\n{}",
                services_pin.display(),
                log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let converged = loop {
        if let Some(status) = child.try_wait()? {
            bail!("lb-agent exited ({status}); log:\n{}", log_tail());
        }
        let full = complete_frontends(&services_map, size.endpoints);
        if full == size.frontends() {
            break Some(t0.elapsed());
        }
        if t0.elapsed() > start_limit {
            notes.push(format!(
                "start: {full} of {} frontends complete after {start_limit:?}",
                size.frontends()
            ));
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let start_cpu_s = cpu_seconds(pid)?;
    let start_end = Instant::now();
    // /readyz may turn 200 a moment after the maps are complete: wait for it (a while).
    let ready_limit = Instant::now() + Duration::from_secs(30);
    let mut ready = probes.first_ok("/readyz");
    while ready.is_none() && Instant::now() < ready_limit {
        std::thread::sleep(Duration::from_millis(50));
        ready = probes.first_ok("/readyz");
    }
    let ready = ready.map(|t| t.duration_since(t0));
    println!(
        "  /readyz 200 after {}, all frontends in the maps after {}",
        secs(ready),
        secs(converged)
    );

    // One endpoint change at a time.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let (single, batch) = size.changes();
    let mut fresh = 0u32;
    let mut next_endpoints = |i: usize| {
        fresh += 1;
        let mut eps = endpoints(size, i);
        eps[0] = endpoint(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(10, 192, 0, 0)) + fresh,
        ));
        eps
    };
    let mut changes = Vec::new();
    let mut changes_lost = 0;
    let agent_before = sync_latency(&ns);
    let changes_start = Instant::now();
    for c in 0..single {
        if c >= 5 && changes_start.elapsed() > CHANGES_BUDGET {
            notes.push(format!(
                "{c} of {single} single changes timed: the rest did not fit in {CHANGES_BUDGET:?}"
            ));
            break;
        }
        let i = (c * 7919 + 13) % size.services;
        let keys = frontend_keys(i);
        let before = ring_of(&services_map, &keys);
        let eps = next_endpoints(i);
        let sent = Instant::now();
        rt.block_on(slices.patch(
            &slice_name(i),
            &PatchParams::default(),
            &Patch::Merge(json!({ "endpoints": eps })),
        ))
        .context("patching an EndpointSlice")?;
        match wait_changed(&services_map, &keys, &before, sent, Duration::from_secs(60)) {
            Some(d) => {
                if std::env::var_os("XDPLB_BENCH_AGENT_LOG").is_some() {
                    let at = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .saturating_sub(d)
                        .as_millis();
                    eprintln!(
                        "change {c} (Service {i}): {:.1} ms, sent at {:02}:{:02}:{:02}.{:03} UTC",
                        d.as_secs_f64() * 1e3,
                        at / 3_600_000 % 24,
                        at / 60_000 % 60,
                        at / 1000 % 60,
                        at % 1000
                    );
                }
                changes.push(d);
            }
            None => changes_lost += 1,
        }
    }
    let agent_sync = agent_before
        .zip(sync_latency(&ns))
        .and_then(|((s0, c0), (s1, c1))| {
            (c1 > c0).then(|| {
                (
                    Duration::from_secs_f64((s1 - s0) / (c1 - c0) as f64),
                    c1 - c0,
                )
            })
        });
    if changes_lost > 0 {
        notes.push(format!(
            "{changes_lost} of {single} single changes did not reach the maps within 60 s"
        ));
    }
    println!(
        "  one endpoint change: p50 {} p99 {} ({} changes)",
        ms(percentile(&changes, 50)),
        ms(percentile(&changes, 99)),
        changes.len()
    );

    // Many Services at once (others than the ones above).
    let picked: Vec<usize> = (0..batch)
        .map(|k| (k * size.services / batch + size.services / (2 * batch)) % size.services)
        .collect();
    let keys: Vec<ServiceKey> = picked.iter().flat_map(|&i| frontend_keys(i)).collect();
    let before = ring_of(&services_map, &keys);
    let bodies: Vec<(String, Value)> = picked
        .iter()
        .map(|&i| (slice_name(i), json!({ "endpoints": next_endpoints(i) })))
        .collect();
    let batch_start = Instant::now();
    let sent = Arc::new(Mutex::new(Duration::ZERO));
    let mut handles = Vec::new();
    for (name, body) in bodies {
        let slices = slices.clone();
        let sent = sent.clone();
        handles.push(rt.spawn(async move {
            let r = slices
                .patch(&name, &PatchParams::default(), &Patch::Merge(body))
                .await;
            let mut s = sent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *s = (*s).max(batch_start.elapsed());
            r.map(|_| ())
        }));
    }
    let batch_limit = Duration::from_secs(60 + size.services as u64 / 10);
    let batch_converged = wait_changed(&services_map, &keys, &before, batch_start, batch_limit);
    for h in handles {
        rt.block_on(h)?.context("patching an EndpointSlice")?;
    }
    let batch_sent = *sent
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if batch_converged.is_none() {
        notes.push(format!(
            "{batch} Services at once: not converged within {batch_limit:?}"
        ));
    }
    // A probe in flight at the end of the phase counts: give it time to end.
    std::thread::sleep(Duration::from_secs(1));
    let batch_end = Instant::now();
    let answers = probes.stop();
    let worst_start = worst(&answers, t0, start_end);
    let worst_batch = worst(&answers, batch_start, batch_end);
    println!(
        "  {batch} Services at once: {} (requests answered after {})",
        secs(batch_converged),
        secs(Some(batch_sent))
    );

    // Idle.
    std::thread::sleep(Duration::from_secs(3));
    let cpu_before = cpu_seconds(pid)?;
    let idle_start = Instant::now();
    std::thread::sleep(IDLE);
    let idle_cpu_pct =
        (cpu_seconds(pid)? - cpu_before) / idle_start.elapsed().as_secs_f64() * 100.0;
    let (rss_kb, hwm_kb) = rss(pid)?;
    let (map_bytes, top_maps) = map_memory(pid)?;
    // What a scrape carries (the probes above only time it).
    let mut scrapes = Vec::new();
    let mut metrics_bytes = 0;
    for _ in 0..3 {
        let start = Instant::now();
        if let Ok(Answer::Got(200, body)) = ns.run(|| http_fetch("/metrics")) {
            scrapes.push(start.elapsed());
            metrics_bytes = body.len();
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    scrapes.sort();
    let metrics_idle = scrapes.get(scrapes.len() / 2).copied().unwrap_or_default();

    // `lb-agent status --json`.
    let mut times = Vec::new();
    let mut status_bytes = 0;
    for _ in 0..5 {
        let start = Instant::now();
        let out = std::process::Command::new(&binary)
            .args(["status", "--json", "--pin-dir"])
            .arg(&pin_dir)
            .arg("--state-dir")
            .arg(&state_dir)
            .output()?;
        times.push(start.elapsed());
        if !out.status.success() {
            bail!(
                "lb-agent status --json: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        status_bytes = out.stdout.len();
    }
    times.sort();
    let load_after = loadavg();

    // A graceful stop (--keep-on-exit leaves the data path: the cleanup guard removes it).
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid.cast_signed(), libc::SIGTERM) };
    let stop = Instant::now();
    while child.try_wait()?.is_none() && stop.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(child);
    if std::env::var_os("XDPLB_BENCH_AGENT_LOG").is_some() {
        let kept = std::env::temp_dir().join(format!(
            "xdplb-bench-agent-{}x{}.log",
            size.services, size.endpoints
        ));
        if std::fs::copy(&log_path, &kept).is_ok() {
            eprintln!("the agent's log: {}", kept.display());
        }
    }
    drop(services_map);
    drop(cleanup);
    drop(bpffs);
    drop(forward);
    drop(ns);
    drop(server);

    let short = |a: &String| {
        if a.starts_with('/') && a != "/etc/xdplb/node.toml" {
            Path::new(a)
                .file_name()
                .map_or_else(|| a.clone(), |f| format!(".../{}", f.to_string_lossy()))
        } else {
            a.clone()
        }
    };
    Ok(Run {
        size,
        args: args.iter().map(short).collect(),
        max_services,
        max_backends,
        create,
        ready,
        converged,
        start_cpu_s,
        changes,
        changes_lost,
        agent_sync,
        batch,
        batch_converged,
        batch_sent,
        worst_start,
        worst_batch,
        idle_cpu_pct,
        rss_kb,
        hwm_kb,
        map_bytes,
        top_maps,
        status_median: times[times.len() / 2],
        status_worst: times[times.len() - 1],
        status_bytes,
        metrics_bytes,
        metrics_idle,
        load_before,
        load_after,
        notes,
    })
}

// ---- the DaemonSet -----------------------------------------------------------------------------

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("deploy")
}

/// The `agent` container's `args` in deploy/base/daemonset.yaml.
pub fn daemonset_args() -> Result<Vec<String>> {
    let path = deploy_dir().join("base/daemonset.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .with_context(|| format!("parsing {}", path.display()))?;
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("no DaemonSet")?;
    let agent = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "agent")
        .context("no agent container")?;
    agent["args"]
        .as_array()
        .context("the agent container has no args")?
        .iter()
        .map(|a| {
            a.as_str()
                .map(String::from)
                .context("an arg that is no string")
        })
        .collect()
}

// ---- objects -----------------------------------------------------------------------------------

fn offset(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + u32::try_from(n).expect("small"))
}

/// Service `i`'s external IP (ten Services per address) and its two ports.
fn frontend_of(i: usize) -> (Ipv4Addr, u16) {
    let port = 1000 + 2 * u16::try_from(i % 10).expect("small");
    (offset(Ipv4Addr::new(10, 96, 0, 1), i / 10), port)
}

fn frontend_keys(i: usize) -> Vec<ServiceKey> {
    let (vip, port) = frontend_of(i);
    [port, port + 1]
        .iter()
        .map(|p| ServiceKey::new(Addr::from(IpAddr::V4(vip)), p.to_be(), IPPROTO_TCP))
        .collect()
}

fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

fn slice_name(i: usize) -> String {
    format!("svc-{i:05}-a")
}

fn service(i: usize) -> Value {
    let (vip, port) = frontend_of(i);
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(i),
            "namespace": NS,
            "annotations": {"xdplb.io/enabled": "true"},
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": offset(Ipv4Addr::new(172, 20, 0, 1), i).to_string(),
            "externalIPs": [vip.to_string()],
            "ports": [
                {"name": "http", "port": port, "targetPort": 8080, "protocol": "TCP"},
                {"name": "https", "port": port + 1, "targetPort": 8443, "protocol": "TCP"},
            ],
        },
    })
}

fn endpoint(addr: Ipv4Addr) -> Value {
    json!({
        "addresses": [addr.to_string()],
        "conditions": {"ready": true, "serving": true, "terminating": false},
        "nodeName": "other-node",
    })
}

/// Service `i`'s endpoints: 16 addresses apart per Service, on another node.
fn endpoints(size: Size, i: usize) -> Vec<Value> {
    (0..size.endpoints)
        .map(|j| endpoint(offset(Ipv4Addr::new(10, 128, 0, 1), i * 16 + j)))
        .collect()
}

fn slice(size: Size, i: usize) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name(i),
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": service_name(i)},
        },
        "addressType": "IPv4",
        "ports": [
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "https", "port": 8443, "protocol": "TCP"},
        ],
        "endpoints": endpoints(size, i),
    })
}

async fn client(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Creates every Service and EndpointSlice, `CREATE_CONCURRENCY` requests in flight.
async fn create_all(client: &Client, size: Size) -> Result<()> {
    let services: Api<KubeService> = Api::namespaced(client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let gate = Arc::new(tokio::sync::Semaphore::new(CREATE_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..size.services {
        let permit = gate.clone().acquire_owned().await?;
        let (services, slices) = (services.clone(), slices.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let svc: KubeService = serde_json::from_value(service(i))?;
            services.create(&PostParams::default(), &svc).await?;
            let sl: EndpointSlice = serde_json::from_value(slice(size, i))?;
            slices.create(&PostParams::default(), &sl).await?;
            anyhow::Ok(())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

// ---- the maps ----------------------------------------------------------------------------------

type Services = BpfHashMap<MapData, ServiceKey, Service>;

fn open_services(pin: &Path) -> Result<Services> {
    let data = MapData::from_pin(pin)?;
    Ok(Services::try_from(Map::HashMap(data))?)
}

/// Frontends whose ring holds all `endpoints` backends.
fn complete_frontends(map: &Services, endpoints: usize) -> usize {
    map.iter()
        .filter_map(std::result::Result::ok)
        .filter(|(_, s)| s.active_backends as usize == endpoints)
        .count()
}

/// (ring, digest) of each key (None: not in the map).
fn ring_of(map: &Services, keys: &[ServiceKey]) -> Vec<Option<(u32, u32)>> {
    keys.iter()
        .map(|k| map.get(k, 0).ok().map(|s| (s.ring, s.ring_digest)))
        .collect()
}

/// Polls until every key's ring differs from `before`; the time since `since`.
fn wait_changed(
    map: &Services,
    keys: &[ServiceKey],
    before: &[Option<(u32, u32)>],
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut pending: Vec<usize> = (0..keys.len()).collect();
    loop {
        pending.retain(|&k| {
            let now = map.get(&keys[k], 0).ok().map(|s| (s.ring, s.ring_digest));
            now.is_none() || now == before[k]
        });
        if pending.is_empty() {
            return Some(since.elapsed());
        }
        if since.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

// ---- the process -------------------------------------------------------------------------------

/// utime + stime of `pid` (all its threads), seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// VmRSS and VmHWM, kB.
fn rss(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |k: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{k} not in /proc/{pid}/status"))
    };
    Ok((kb("VmRSS:")?, kb("VmHWM:")?))
}

/// Total `memlock:` over the maps `pid` holds fds of (each map once), and the five largest.
fn map_memory(pid: u32) -> Result<(u64, Vec<(String, u64)>)> {
    let names: BTreeMap<u32, String> = aya::maps::loaded_maps()
        .filter_map(std::result::Result::ok)
        .map(|m| (m.id(), m.name_as_str().unwrap_or("?").to_string()))
        .collect();
    let mut maps: BTreeMap<u32, u64> = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |k: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            maps.insert(u32::try_from(id)?, memlock);
        }
    }
    let total = maps.values().sum();
    let mut top: Vec<(String, u64)> = maps
        .iter()
        .map(|(id, b)| {
            (
                names
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| format!("map {id}")),
                *b,
            )
        })
        .collect();
    top.sort_by_key(|(_, b)| std::cmp::Reverse(*b));
    top.truncate(5);
    Ok((total, top))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---- probes ------------------------------------------------------------------------------------

/// One answered (or timed-out) request.
#[derive(Clone, Debug)]
struct Probe {
    path: &'static str,
    start: Instant,
    took: Duration,
    status: Option<u16>,
}

/// Threads in the node's namespace asking the agent's probe endpoints, as the kubelet and
/// Prometheus do, but much more often.
struct Probes {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Probe>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Probes {
    fn start(ns: &Netns) -> Result<Probes> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for (path, every) in [
            ("/healthz", Duration::from_millis(100)),
            ("/readyz", Duration::from_millis(100)),
            ("/metrics", Duration::from_secs(1)),
        ] {
            let (stop, seen) = (stop.clone(), seen.clone());
            threads.push(ns.spawn_thread("bench-probe", move || {
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    // Refused: nothing listens yet (not counted).
                    if let Ok(status) = http_get(path) {
                        let p = Probe {
                            path,
                            start,
                            took: start.elapsed(),
                            status,
                        };
                        seen.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(p);
                    }
                    std::thread::sleep(every.saturating_sub(start.elapsed()));
                }
            })?);
        }
        Ok(Probes {
            stop,
            seen,
            threads,
        })
    }

    /// When the first 200 of `path` arrived.
    fn first_ok(&self, path: &str) -> Option<Instant> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|p| p.path == path && p.status == Some(200))
            .map(|p| p.start + p.took)
            .min()
    }

    fn stop(self) -> Vec<Probe> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        std::mem::take(
            &mut self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// The worst answer of each endpoint among the requests that overlapped `from..to`.
fn worst(probes: &[Probe], from: Instant, to: Instant) -> Vec<Worst> {
    ["/healthz", "/readyz", "/metrics"]
        .iter()
        .map(|&path| {
            let mut w = Worst {
                path,
                ..Worst::default()
            };
            for p in probes
                .iter()
                .filter(|p| p.path == path && p.start < to && p.start + p.took > from)
            {
                w.probes += 1;
                if w.worst.is_none_or(|t| p.took > t) {
                    w.worst = Some(p.took);
                    w.status = p.status;
                }
            }
            w
        })
        .collect()
}

/// What a GET of the agent's probe port got.
enum Answer {
    /// Nothing listens yet.
    Refused,
    /// No (complete) answer within the timeout.
    Silent,
    Got(u16, String),
}

/// GET `path` from the agent on 127.0.0.1 (the calling thread's namespace): Err if refused,
/// Ok(None) if no answer came within the timeout.
fn http_get(path: &str) -> Result<Option<u16>, ()> {
    match http_fetch(path) {
        Answer::Refused => Err(()),
        Answer::Silent => Ok(None),
        Answer::Got(status, _) => Ok(Some(status)),
    }
}

fn http_fetch(path: &str) -> Answer {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, PROBE_PORT));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return Answer::Refused;
    };
    let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
    let request = format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).is_err() {
        return Answer::Silent;
    }
    let mut out = Vec::new();
    if s.read_to_end(&mut out).is_err() {
        return Answer::Silent;
    }
    let text = String::from_utf8_lossy(&out);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Answer::Silent;
    };
    match head.split_whitespace().nth(1).and_then(|c| c.parse().ok()) {
        Some(status) => Answer::Got(status, body.to_string()),
        None => Answer::Silent,
    }
}

/// The agent's own sync-latency histogram (from a change seen by its watcher to the maps
/// holding it): (sum of seconds, count).
fn sync_latency(ns: &Netns) -> Option<(f64, u64)> {
    let Ok(Answer::Got(_, body)) = ns.run(|| http_fetch("/metrics")) else {
        return None;
    };
    let value = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map(|v| v.trim().to_string())
    };
    let sum = value("xdplb_kubernetes_sync_latency_seconds_sum")?
        .parse()
        .ok()?;
    let count = value("xdplb_kubernetes_sync_latency_seconds_count")?
        .parse()
        .ok()?;
    Some((sum, count))
}

// ---- figures -----------------------------------------------------------------------------------

/// Nearest-rank percentile (`p` in percent); None for none.
pub fn percentile(v: &[Duration], p: usize) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort();
    let rank = (p * s.len()).div_ceil(100);
    Some(s[rank.clamp(1, s.len()) - 1])
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".into(),
        |d| format!("{:.1} ms", d.as_secs_f64() * 1000.0),
    )
}

/// One row of the table: a figure at every size, against issue 12's target (for 10k x 10).
struct Row {
    what: &'static str,
    target: Option<f64>,
    unit: Unit,
    value: fn(&Run) -> Option<f64>,
}

#[derive(Clone, Copy)]
enum Unit {
    Seconds,
    Millis,
    Percent,
    MiB,
    /// With a decimal.
    MiB1,
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            Unit::Seconds => format!("{v:.2} s"),
            Unit::Millis => format!("{v:.1} ms"),
            Unit::Percent => format!("{v:.1} %"),
            Unit::MiB => format!("{v:.0} MiB"),
            Unit::MiB1 => format!("{v:.1} MiB"),
        }
    }
}

fn worst_of(w: &[Worst], path: &str) -> Option<f64> {
    w.iter()
        .find(|x| x.path == path)
        .and_then(|x| x.worst)
        .map(|d| d.as_secs_f64() * 1000.0)
}

const ROWS: &[Row] = &[
    Row {
        what: "start to /readyz 200",
        target: Some(10.0),
        unit: Unit::Seconds,
        value: |r| r.ready.map(|d| d.as_secs_f64()),
    },
    Row {
        what: "start to every frontend in the maps",
        target: None,
        unit: Unit::Seconds,
        value: |r| r.converged.map(|d| d.as_secs_f64()),
    },
    Row {
        what: "agent CPU until then",
        target: None,
        unit: Unit::Seconds,
        value: |r| Some(r.start_cpu_s),
    },
    Row {
        what: "one endpoint change to the maps, p50",
        target: None,
        unit: Unit::Millis,
        value: |r| percentile(&r.changes, 50).map(|d| d.as_secs_f64() * 1000.0),
    },
    Row {
        what: "one endpoint change to the maps, p99",
        target: Some(100.0),
        unit: Unit::Millis,
        value: |r| percentile(&r.changes, 99).map(|d| d.as_secs_f64() * 1000.0),
    },
    Row {
        what: "100 Services changed at once, to converged",
        target: Some(1.0),
        unit: Unit::Seconds,
        value: |r| r.batch_converged.map(|d| d.as_secs_f64()),
    },
    Row {
        what: "idle CPU (10 s)",
        target: Some(1.0),
        unit: Unit::Percent,
        value: |r| Some(r.idle_cpu_pct),
    },
    Row {
        what: "agent RSS (VmRSS)",
        target: Some(150.0),
        unit: Unit::MiB,
        value: |r| Some(r.rss_kb as f64 / 1024.0),
    },
    Row {
        what: "agent RSS peak (VmHWM)",
        target: None,
        unit: Unit::MiB,
        value: |r| Some(r.hwm_kb as f64 / 1024.0),
    },
    Row {
        what: "BPF map memory (memlock)",
        target: None,
        unit: Unit::MiB,
        value: |r| Some(r.map_bytes as f64 / f64::from(1 << 20)),
    },
    Row {
        what: "worst /healthz during start",
        target: Some(100.0),
        unit: Unit::Millis,
        value: |r| worst_of(&r.worst_start, "/healthz"),
    },
    Row {
        what: "worst /readyz during start",
        target: Some(100.0),
        unit: Unit::Millis,
        value: |r| worst_of(&r.worst_start, "/readyz"),
    },
    Row {
        what: "worst /metrics during start",
        target: Some(100.0),
        unit: Unit::Millis,
        value: |r| worst_of(&r.worst_start, "/metrics"),
    },
    Row {
        what: "worst /healthz during the 100-Service change",
        target: Some(100.0),
        unit: Unit::Millis,
        value: |r| worst_of(&r.worst_batch, "/healthz"),
    },
    Row {
        what: "worst /readyz during the 100-Service change",
        target: Some(100.0),
        unit: Unit::Millis,
        value: |r| worst_of(&r.worst_batch, "/readyz"),
    },
    Row {
        what: "worst /metrics during the 100-Service change",
        target: Some(100.0),
        unit: Unit::Millis,
        value: |r| worst_of(&r.worst_batch, "/metrics"),
    },
    Row {
        what: "/metrics text, idle scrape",
        target: None,
        unit: Unit::MiB1,
        value: |r| Some(r.metrics_bytes as f64 / f64::from(1 << 20)),
    },
    Row {
        what: "/metrics answer, idle (median of 3)",
        target: Some(100.0),
        unit: Unit::Millis,
        value: |r| Some(r.metrics_idle.as_secs_f64() * 1000.0),
    },
    Row {
        what: "`lb-agent status --json` (median of 5)",
        target: Some(100.0),
        unit: Unit::Millis,
        value: |r| Some(r.status_median.as_secs_f64() * 1000.0),
    },
];

/// "met" / "not met (3.2x)".
fn verdict(v: f64, target: f64) -> String {
    if v <= target {
        "met".into()
    } else {
        format!("not met ({:.1}x)", v / target)
    }
}

/// The side-by-side table, notes and method lines (markdown).
pub fn tables(k: &Kubernetes) -> String {
    let mut s = String::new();
    let _ = write!(s, "| figure | target (10k x 10) |");
    for r in &k.runs {
        let _ = write!(
            s,
            " {} ({} frontends, {} backends) |",
            r.size.label(),
            r.size.frontends(),
            r.size.backends()
        );
    }
    let _ = write!(s, "\n|---|---|");
    for _ in &k.runs {
        let _ = write!(s, "---|");
    }
    s.push('\n');
    for row in ROWS {
        let target = row
            .target
            .map_or_else(|| "-".into(), |t| format!("<= {}", row.unit.show(t)));
        let _ = write!(s, "| {} | {target} |", row.what);
        for r in &k.runs {
            match (row.value)(r) {
                Some(v) => {
                    let judged = row
                        .target
                        .map(|t| format!(": {}", verdict(v, t)))
                        .unwrap_or_default();
                    let _ = write!(s, " {}{judged} |", row.unit.show(v));
                }
                None => {
                    let _ = write!(s, " not reached |");
                }
            }
        }
        s.push('\n');
    }
    let _ = writeln!(s, "\nPer size:\n");
    for r in &k.runs {
        let _ = writeln!(
            s,
            "- {}: created in {:.1} s (excluded); --max-services {} --max-backends {} (DaemonSet defaults {} / {}: {}); {} single changes ({} lost, worst {}{}; the agent's own sync-latency metric, watcher to maps, mean {} over {} syncs), {} Services at once (requests answered after {:.2} s); probes answered during start / change: {}; status --json worst {} ({} KiB); largest maps: {}; load average {} before, {} after.",
            r.size.label(),
            r.create.as_secs_f64(),
            r.max_services,
            r.max_backends,
            lb_common::DEFAULT_MAX_SERVICES,
            lb_common::DEFAULT_MAX_BACKENDS,
            if r.size.frontends() <= lb_common::DEFAULT_MAX_SERVICES as usize
                && r.size.backends() <= lb_common::DEFAULT_MAX_BACKENDS as usize
            {
                "the defaults hold this size"
            } else {
                "the defaults do not hold this size: raised"
            },
            r.changes.len(),
            r.changes_lost,
            ms(r.changes.iter().max().copied()),
            // Which one: the first after the start, or one in the middle (a periodic task).
            r.changes
                .iter()
                .enumerate()
                .max_by_key(|(_, d)| **d)
                .map(|(i, _)| format!(" (change {} of {})", i + 1, r.changes.len()))
                .unwrap_or_default(),
            ms(r.agent_sync.map(|(d, _)| d)),
            r.agent_sync.map_or(0, |(_, n)| n),
            r.batch,
            r.batch_sent.as_secs_f64(),
            r.worst_start
                .iter()
                .chain(&r.worst_batch)
                .map(|w| format!("{} {}", w.path, w.probes))
                .collect::<Vec<_>>()
                .join(", "),
            ms(Some(r.status_worst)),
            r.status_bytes / 1024,
            r.top_maps
                .iter()
                .map(|(n, b)| format!("{n} {:.1} MiB", *b as f64 / f64::from(1 << 20)))
                .collect::<Vec<_>>()
                .join(", "),
            r.load_before,
            r.load_after,
        );
        for n in &r.notes {
            let _ = writeln!(s, "  - {n}");
        }
    }
    if !k.rings.is_empty() {
        let _ = writeln!(
            s,
            "\nOne Service's Maglev ring built (this process, median of 5; the agent builds one only for a Service whose backends changed):\n\n| backends | largest ring | ring size | build |\n|---|---|---|---|"
        );
        for b in &k.rings {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2} ms |",
                b.backends,
                b.largest,
                b.size,
                b.time.as_secs_f64() * 1e3
            );
        }
    }
    if let Some(r) = k.runs.first() {
        let _ = writeln!(
            s,
            "\nAgent command line (the DaemonSet's args, then the bench's paths and sizes): `lb-agent {}`",
            r.args.join(" ")
        );
    }
    s
}

pub fn method() -> &'static str {
    "Method: the real `lb-agent`, started with the `agent` container's args from deploy/base/daemonset.yaml ($(NODE_NAME), $(HOST_IP) and the config path filled in; deploy/base/node.toml as the config), plus --kubeconfig, --pin-dir, --state-dir and --max-services / --max-backends sized for the cluster, in a network namespace whose eth0 holds the node's address and default route; the API server is the k8s tier's (etcd plus tests/k8s-apiserver on the host's loopback, forwarded into the namespace). Each Service: one external IP (ten Services per address), two TCP ports, one EndpointSlice with M ready endpoints on another node (snat). Objects are created before the agent starts (time excluded). Start: spawn to the first /readyz 200, and to every frontend in the pinned LB_SERVICES with all backends active. An endpoint change: a merge patch replacing one endpoint of one slice, from before the request to both frontends of that Service showing a new ring in LB_SERVICES (end to end: API server, watch, reconcile, ring written and swapped in), one change at a time, up to 100 of them or as many as fit in 150 s (at least 5). 100 Services at once: 100 such patches sent together, to the last of their 200 frontends. /healthz and /readyz are asked every 100 ms and /metrics every second from the node's namespace, from the start until the change settled; the worst answer time per phase is shown. Idle CPU: utime + stime of the agent over 10 s with no changes and no probes; RSS from /proc/PID/status; map memory: the sum of `memlock:` over the agent's map fds. Targets are issue 12's, for 10,000 Services x 10 endpoints; the other size is shown beside them for scale.\n"
}
