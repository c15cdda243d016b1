//! `cargo xtask bench [-- ARGS]`: the benchmarks (numbers, never pass/fail on speed). Needs
//! root. See `lb_tests::bench` for what is measured and how.
use std::path::PathBuf;

use anyhow::{Result, bail};
use lb_tests::bench::{Options, Scale, kubernetes, run};

const USAGE: &str = "\
usage: bench [--quick | --smoke | --full] [--only PARTS] [--k8s-sizes SIZES] [--out DIR] [--cpu N]
             [--no-katran]

  (default)     the whole matrix except 10k services x 1000 backends; Kubernetes at
                1000 x 10 and 10000 x 10 Services x endpoints (the 10k start alone takes
                many minutes with fixed 16381-slot rings)
  --quick       fewer setups and runs; Kubernetes at 1000 x 10 only
  --smoke       seconds: tiny sizes (what the CI smoke test runs); Kubernetes at 50 x 3
  --full        also 10k services x 1000 backends (10M backend entries: slow to install)
  --only PARTS  comma-separated: perpacket, throughput, memory, kubernetes
  --k8s-sizes SIZES  comma-separated Services x endpoints for the Kubernetes part, e.g.
                1000x10,10000x10 (endpoints 1 to 15)
  --out DIR     results directory (default: bench-results/ at the workspace root)
  --cpu N       CPU for the per-packet measurements (default: the last one)
  --no-katran   do not measure Katran beside the per-packet reference setup (it is
                fetched into ~/.cache/xdplb/katran and built with clang; never at --smoke)

Writes DIR/<UTC time>/results.md with SVG plots, and DIR/latest.md.

XDPLB_BENCH_AGENT_LOG=FILTER runs the Kubernetes part's agent with RUST_LOG=FILTER, keeps its
log (/tmp/xdplb-bench-agent-SIZE.log) and prints each single change's time, to line them up
with what the agent did meanwhile.

XDPLB_BENCH_HOLD=SCENARIO runs that per-packet scenario (its short name, e.g. established) for
8 s before its first measured run in each setup, for a profiler to watch (perf record -C CPU).";

fn main() -> Result<()> {
    let mut scale = Scale::Default;
    let mut only: Option<Vec<String>> = None;
    let mut out: Option<PathBuf> = None;
    let mut cpu: Option<usize> = None;
    let mut katran = true;
    let mut kube_sizes: Option<Vec<kubernetes::Size>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => scale = Scale::Quick,
            "--smoke" => scale = Scale::Smoke,
            "--full" => scale = Scale::Full,
            "--only" => {
                let v = args.next().unwrap_or_default();
                only = Some(v.split(',').map(|s| s.trim().to_string()).collect());
            }
            "--out" => out = args.next().map(PathBuf::from),
            "--cpu" => cpu = args.next().and_then(|v| v.parse().ok()),
            "--no-katran" => katran = false,
            "--k8s-sizes" => {
                let v = args.next().unwrap_or_default();
                let sizes: Option<Vec<kubernetes::Size>> =
                    v.split(',').map(kubernetes::Size::parse).collect();
                match sizes {
                    Some(s) if !s.is_empty() => kube_sizes = Some(s),
                    _ => bail!("bad --k8s-sizes {v:?}\n\n{USAGE}"),
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks need root (BPF programs, network namespaces, XDP)");
    }
    let mut options = Options::new(scale);
    if let Some(parts) = only {
        for p in &parts {
            if !["perpacket", "throughput", "memory", "kubernetes"].contains(&p.as_str()) {
                bail!("unknown part {p:?}\n\n{USAGE}");
            }
        }
        options.perpacket = parts.iter().any(|p| p == "perpacket");
        options.throughput = parts.iter().any(|p| p == "throughput");
        options.memory = parts.iter().any(|p| p == "memory");
        options.kubernetes = parts.iter().any(|p| p == "kubernetes");
    }
    if let Some(dir) = out {
        options.out_dir = dir;
    }
    if let Some(s) = kube_sizes {
        options.kube_sizes = s;
    }
    if let Some(c) = cpu {
        options.cpu = c;
    }
    options.katran = katran;
    run(&options)?;
    Ok(())
}
