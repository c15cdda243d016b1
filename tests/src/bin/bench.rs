//! `cargo xtask bench [-- ARGS]`: the benchmarks (numbers, never pass/fail on speed). Needs
//! root. See `lb_tests::bench` for what is measured and how.
use std::path::PathBuf;

use anyhow::{Result, bail};
use lb_tests::bench::{Options, Scale, run};

const USAGE: &str = "\
usage: bench [--quick | --smoke | --full] [--only PARTS] [--out DIR] [--cpu N] [--no-katran]

  (default)     the whole matrix except 10k services x 1000 backends (a few minutes)
  --quick       fewer setups and runs (about a minute)
  --smoke       seconds: tiny sizes (what the CI smoke test runs)
  --full        also 10k services x 1000 backends (10M backend entries: slow to install)
  --only PARTS  comma-separated: perpacket, throughput, memory
  --out DIR     results directory (default: bench-results/ at the workspace root)
  --cpu N       CPU for the per-packet measurements (default: the last one)
  --no-katran   do not measure Katran beside the per-packet reference setup (it is
                fetched into ~/.cache/xdplb/katran and built with clang; never at --smoke)

Writes DIR/<UTC time>/results.md with SVG plots, and DIR/latest.md.";

fn main() -> Result<()> {
    let mut scale = Scale::Default;
    let mut only: Option<Vec<String>> = None;
    let mut out: Option<PathBuf> = None;
    let mut cpu: Option<usize> = None;
    let mut katran = true;
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
            if !["perpacket", "throughput", "memory"].contains(&p.as_str()) {
                bail!("unknown part {p:?}\n\n{USAGE}");
            }
        }
        options.perpacket = parts.iter().any(|p| p == "perpacket");
        options.throughput = parts.iter().any(|p| p == "throughput");
        options.memory = parts.iter().any(|p| p == "memory");
    }
    if let Some(dir) = out {
        options.out_dir = dir;
    }
    if let Some(c) = cpu {
        options.cpu = c;
    }
    options.katran = katran;
    run(&options)?;
    Ok(())
}
