//! Benchmarks: numbers, never pass/fail on speed. Three parts, each runnable alone:
//! - [`perpacket`]: the data path's cost per packet through BPF_PROG_TEST_RUN, per scenario and
//!   table size, net of a wrapper floor measured in the same run;
//! - [`throughput`]: Mpps over veths between namespaces this process creates, our data path
//!   against the kernel path users run today (nftables DNAT as kube-proxy programs it), with a
//!   live-frames generator of our own, counted at the receiver; CPU cost at fixed loads;
//! - [`memory`]: bytes per flow entry and per tracked source, map memory at default sizes, and
//!   the agent's RSS;
//! - [`kubernetes`]: the agent in Kubernetes mode at cluster sizes (start, change latency, idle
//!   CPU, memory, probe answer times) against issue 12's targets.
//!
//! [`run`] runs the chosen parts and writes `results.md` and SVG plots ([`report`]). Every
//! traffic loop is bounded in count and time; namespaces, programs and processes are released
//! by Drop guards, failures included.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub mod katran;
pub mod kubernetes;
pub mod memory;
pub mod perpacket;
pub mod report;
pub mod svg;
pub mod throughput;
pub mod tools;

/// How much to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Seconds: one small configuration, tiny repeats, ~1 s of traffic (the CI smoke test).
    Smoke,
    /// About a minute: fewer configurations and runs.
    Quick,
    /// The default: the whole matrix except 10k services x 1000 backends.
    Default,
    /// Everything, including 10k services x 1000 backends (10M backend entries).
    Full,
}

impl Scale {
    pub fn name(self) -> &'static str {
        match self {
            Scale::Smoke => "smoke",
            Scale::Quick => "quick",
            Scale::Default => "default",
            Scale::Full => "full",
        }
    }
}

/// Which parts to run, and where results go.
#[derive(Clone, Debug)]
pub struct Options {
    pub scale: Scale,
    pub perpacket: bool,
    pub throughput: bool,
    pub memory: bool,
    pub kubernetes: bool,
    /// Cluster sizes of the Kubernetes part (by default [`kubernetes::sizes`] of the scale).
    pub kube_sizes: Vec<kubernetes::Size>,
    /// `bench-results/` at the workspace root by default; each run writes a sub-directory
    /// named by its UTC start time and a `latest.md` beside it.
    pub out_dir: PathBuf,
    /// CPU the per-packet measurements run on.
    pub cpu: usize,
    /// Measure Katran beside the per-packet reference setup (never at smoke scale).
    pub katran: bool,
}

impl Options {
    pub fn new(scale: Scale) -> Options {
        Options {
            scale,
            perpacket: true,
            throughput: true,
            memory: true,
            kubernetes: true,
            kube_sizes: kubernetes::sizes(scale),
            out_dir: default_out_dir(),
            cpu: last_cpu(),
            katran: true,
        }
    }
}

/// `bench-results/` at the workspace root.
pub fn default_out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("bench-results")
}

/// Everything one run measured.
#[derive(Debug)]
pub struct Results {
    pub machine: Machine,
    pub scale: Scale,
    pub perpacket: Option<perpacket::PerPacket>,
    pub throughput: Option<throughput::Throughput>,
    pub memory: Option<memory::Memory>,
    pub kubernetes: Option<kubernetes::Kubernetes>,
    /// What was left out, and why (printed and written to the report).
    pub left_out: Vec<String>,
    /// The run's directory (results.md and the plots).
    pub dir: PathBuf,
    pub elapsed: Duration,
}

/// Runs the chosen parts, prints the tables, writes the report. A part that fails is recorded
/// as left out (with its error) and the others still run; the error of the first failed part is
/// returned after the report is written.
pub fn run(options: &Options) -> Result<Results> {
    let started = Instant::now();
    let machine = Machine::probe();
    println!(
        "bench ({}): {} ({} CPUs), kernel {}, commit {}",
        options.scale.name(),
        machine.cpu_model,
        machine.cpus,
        machine.kernel,
        machine.commit
    );
    let _stats = BpfStatsOff::ensure()?;
    let mut left_out = Vec::new();
    let mut first_error: Option<anyhow::Error> = None;
    let mut note_failure = |part: &str, e: anyhow::Error, left_out: &mut Vec<String>| {
        let line = format!("{part}: failed: {e:#}");
        eprintln!("{line}");
        left_out.push(line);
        if first_error.is_none() {
            first_error = Some(e.context(format!("{part} part")));
        }
    };

    let perpacket = if options.perpacket {
        match perpacket::run(options.scale, options.cpu, options.katran) {
            Ok(p) => {
                println!("\n{}", report::perpacket_tables(&p));
                left_out.extend(p.left_out.iter().map(|s| format!("per-packet: {s}")));
                Some(p)
            }
            Err(e) => {
                note_failure("per-packet", e, &mut left_out);
                None
            }
        }
    } else {
        left_out.push("per-packet: not asked for".into());
        None
    };
    let throughput = if options.throughput {
        match throughput::run(options.scale) {
            Ok(t) => {
                println!("\n{}", report::throughput_tables(&t));
                left_out.extend(t.left_out.iter().map(|s| format!("throughput: {s}")));
                Some(t)
            }
            Err(e) => {
                note_failure("throughput", e, &mut left_out);
                None
            }
        }
    } else {
        left_out.push("throughput: not asked for".into());
        None
    };
    let memory = if options.memory {
        match memory::run(options.scale) {
            Ok(m) => {
                println!("\n{}", report::memory_tables(&m));
                left_out.extend(m.left_out.iter().map(|s| format!("memory: {s}")));
                Some(m)
            }
            Err(e) => {
                note_failure("memory", e, &mut left_out);
                None
            }
        }
    } else {
        left_out.push("memory: not asked for".into());
        None
    };

    let kubernetes = if options.kubernetes {
        match kubernetes::run(&options.kube_sizes) {
            Ok(k) => {
                println!("\n{}", kubernetes::tables(&k));
                left_out.extend(k.left_out.iter().map(|s| format!("kubernetes: {s}")));
                Some(k)
            }
            Err(e) => {
                note_failure("kubernetes", e, &mut left_out);
                None
            }
        }
    } else {
        left_out.push("kubernetes: not asked for".into());
        None
    };

    let dir = options.out_dir.join(&machine.stamp);
    let mut results = Results {
        machine,
        scale: options.scale,
        perpacket,
        throughput,
        memory,
        kubernetes,
        left_out,
        dir,
        elapsed: Duration::ZERO,
    };
    results.elapsed = started.elapsed();
    report::write(&results, &options.out_dir)?;
    if !results.left_out.is_empty() {
        println!("\nLeft out:");
        for l in &results.left_out {
            println!("- {l}");
        }
    }
    println!(
        "\nresults: {} (and {}) in {:.0?}",
        results.dir.join("results.md").display(),
        options.out_dir.join("latest.md").display(),
        results.elapsed
    );
    match first_error {
        Some(e) => Err(e),
        None => Ok(results),
    }
}

/// The machine and the code measured.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    pub commit: String,
    /// UTC start time, `2026-01-31T12-34-56Z` (also the run's directory name).
    pub stamp: String,
    /// UTC start time, human form.
    pub date: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".into(), |(_, m)| m.trim().to_string());
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |s| s.trim().to_string());
        let root = default_out_dir();
        let root = root.parent().expect("workspace root");
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .args(args)
                .current_dir(root)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let mut commit =
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
        if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
            commit.push_str(" (with uncommitted changes)");
        }
        let (stamp, date) = utc_now();
        Machine {
            cpu_model,
            cpus,
            kernel,
            commit,
            stamp,
            date,
        }
    }
}

/// (`2026-01-31T12-34-56Z`, `2026-01-31 12:34:56 UTC`) for now.
fn utc_now() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days.cast_signed() + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    (
        format!("{y:04}-{mo:02}-{d:02}T{h:02}-{m:02}-{s:02}Z"),
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02} UTC"),
    )
}

/// Keeps `kernel.bpf_stats_enabled` at 0 while it lives (run-time stats add ~88 ns per run of
/// every program); restores a 1 it found.
pub struct BpfStatsOff {
    restore: bool,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStatsOff {
    pub fn ensure() -> Result<BpfStatsOff> {
        let now = std::fs::read_to_string(BPF_STATS).unwrap_or_default();
        if now.trim() == "1" {
            println!("kernel.bpf_stats_enabled was 1: setting it to 0 while timing");
            std::fs::write(BPF_STATS, "0").context("setting kernel.bpf_stats_enabled=0")?;
            return Ok(BpfStatsOff { restore: true });
        }
        Ok(BpfStatsOff { restore: false })
    }

    /// True if stats are off now (another process may hold them on through BPF_ENABLE_STATS,
    /// which the sysctl does not show).
    pub fn is_off() -> bool {
        std::fs::read_to_string(BPF_STATS).is_ok_and(|s| s.trim() == "0")
    }
}

impl Drop for BpfStatsOff {
    fn drop(&mut self) {
        if self.restore {
            let _ = std::fs::write(BPF_STATS, "1");
        }
    }
}

/// The highest-numbered CPU this process may run on.
pub fn last_cpu() -> usize {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut set) == 0 {
            for cpu in (0..libc::CPU_SETSIZE as usize).rev() {
                if libc::CPU_ISSET(cpu, &set) {
                    return cpu;
                }
            }
        }
    }
    0
}

/// Pins the calling thread (only it) to `cpu`.
pub fn pin_thread(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            bail!(
                "sched_setaffinity(cpu {cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Median of `v` (the mean of the middle two for an even count); NaN for none.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        f64::midpoint(s[n / 2 - 1], s[n / 2])
    }
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock the data path stamps flows with
/// (bpf_ktime_get_coarse_ns).
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    ts.tv_sec.cast_unsigned() * 1_000_000_000 + ts.tv_nsec.cast_unsigned()
}
