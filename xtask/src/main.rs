//! Project tasks: `cargo xtask setup | test | demo | bench`. Orchestration only: everything that
//! tests or benchmarks something lives in the crates.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod kernels;

#[derive(Parser)]
#[command(about = "xdplb project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the data path needs (idempotent): rust-src for the nightly
    /// toolchain and bpf-linker built against the nightly's own LLVM.
    Setup,
    /// Run every test tier: host unit tests, kernel tests (BPF_PROG_TEST_RUN), end-to-end
    /// tests in network namespaces, Kubernetes tests against a real API server, and a smoke run
    /// of the benchmarks. Privileged tiers need root (under CI=true they fail without it).
    Test {
        /// Only these tiers (host, kernel, e2e, k8s, bench-smoke, kernels).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// The demo: builds an EKS-like lab of network namespaces, runs the agent, drives traffic,
    /// shows the distribution and counters, cleans up. Needs root.
    Demo,
    /// Benchmarks (numbers, not pass/fail): per-packet cost, throughput against nftables,
    /// memory. Results go to bench-results/.
    Bench {
        /// Extra arguments for the bench binary (see `cargo xtask bench -- --help`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Test { only } => {
            setup()?;
            test(&only)
        }
        Task::Demo => {
            setup()?;
            cargo(&[
                "build",
                "--release",
                "-p",
                "lb-userspace",
                "-p",
                "lb-tests",
                "--bins",
            ])?;
            run(&mut Command::new(root().join("target/release/demo")))
        }
        Task::Bench { args } => {
            setup()?;
            cargo(&[
                "build",
                "--release",
                "-p",
                "lb-userspace",
                "-p",
                "lb-tests",
                "--bins",
            ])?;
            let mut cmd = Command::new(root().join("target/release/bench"));
            cmd.args(args);
            run(&mut cmd)
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

// ---------------------------------------------------------------------------------------------
// setup
// ---------------------------------------------------------------------------------------------

/// The bpf-linker release line that builds against LLVM 22 (the nightly's).
const BPF_LINKER_VERSION: &str = "0.13";

fn setup() -> Result<()> {
    let sysroot = output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
        .context("the nightly toolchain is needed to build the XDP program (rustup toolchain install nightly)")?;
    let sysroot = PathBuf::from(sysroot.trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        step("rustup component add rust-src --toolchain nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
    {
        return Ok(());
    }
    // bpf-linker links against the nightly's own LLVM (same version as the rustc that emits
    // the bitcode): LLVM_PREFIX must hold lib/libLLVM.so, and the binary finds it at run time
    // through an rpath to the nightly's lib directory.
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so"))
            })
        })
        .with_context(|| {
            format!(
                "no libLLVM in {}: the nightly toolchain lacks its LLVM",
                lib.display()
            )
        })?;
    let prefix = cache_dir().join("llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)?;
    step(&format!(
        "cargo install bpf-linker {BPF_LINKER_VERSION} against {}",
        llvm.display()
    ));
    let mut cmd = Command::new("cargo");
    cmd.args(["install", "--force", "bpf-linker", "--version"])
        .arg(format!("~{BPF_LINKER_VERSION}"))
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib.display()),
        );
    run(&mut cmd)
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDPLB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/xdplb")
        })
}

// ---------------------------------------------------------------------------------------------
// test
// ---------------------------------------------------------------------------------------------

/// The tiers, in order: (name, what, cargo test arguments).
const TIERS: &[(&str, &str, &[&str])] = &[
    (
        "host",
        "host unit tests: Maglev, checksums, token buckets, config, reconcile, scripts",
        &[
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--lib",
            "--bins",
            "--test",
            "pktgen_scripts",
            "--test",
            "netlink",
        ],
    ),
    (
        "kernel",
        "kernel tier: the real object through BPF_PROG_TEST_RUN",
        &["-p", "lb-tests", "--test", "kernel", "--test", "ratelimit"],
    ),
    (
        "e2e",
        "end to end: real traffic between network namespaces through the attached program",
        &[
            "-p",
            "lb-tests",
            "--test",
            "lab_smoke",
            "--test",
            "e2e",
            "--test",
            "ratelimit_e2e",
            "--",
            "--test-threads=1",
        ],
    ),
    (
        "k8s",
        "Kubernetes: the agent and the deploy/ manifests against a real API server",
        &[
            "-p",
            "lb-tests",
            "--test",
            "k8s",
            "--test",
            "manifests",
            "--",
            "--test-threads=1",
        ],
    ),
    (
        "bench-smoke",
        "benchmark smoke run (seconds, tiny sizes: keeps the bench code working)",
        &["-p", "lb-tests", "--test", "bench_smoke"],
    ),
    (
        "kernels",
        "the kernel tier and an e2e smoke run in QEMU guests on Linux 6.1 and 6.12 (xtask/src/kernels.rs)",
        &[],
    ),
];

fn test(only: &[String]) -> Result<()> {
    for name in only {
        if !TIERS.iter().any(|(n, ..)| n == name) {
            bail!(
                "no tier `{name}` (tiers: {})",
                TIERS.iter().map(|t| t.0).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let mut summary = Vec::new();
    for (name, what, args) in TIERS {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        step(&format!("tier {name}: {what}"));
        let started = Instant::now();
        let result = if *name == "kernels" {
            kernels_tier()
        } else {
            let mut cmd_args = vec!["test"];
            cmd_args.extend_from_slice(args);
            cargo(&cmd_args)
        };
        summary.push((name, started.elapsed(), result.is_ok()));
        if let Err(e) = result {
            print_summary(&summary);
            return Err(e.context(format!("tier {name} failed")));
        }
    }
    print_summary(&summary);
    Ok(())
}

/// The `kernels` tier: needs root (QEMU runs unprivileged, but the tests inside the guests
/// expect the guest's root, and set-up unpacks packages as root) and an x86-64 host. Without
/// them it is skipped, except under CI=true, where it fails.
fn kernels_tier() -> Result<()> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    // SAFETY: no preconditions.
    let is_root = unsafe { libc::geteuid() } == 0;
    let why_not = if !is_root {
        Some("needs root")
    } else if !cfg!(target_arch = "x86_64") {
        Some("boots x86-64 kernels on an x86-64 host only")
    } else {
        None
    };
    if let Some(why) = why_not {
        if ci {
            bail!("the kernels tier {why}, and CI=true forbids skipping it");
        }
        println!("skipped: the kernels tier {why}");
        return Ok(());
    }
    let runs = kernels::run(&root(), &cache_dir())?;
    let failed: Vec<&str> = runs.iter().filter(|r| !r.ok).map(|r| r.kernel).collect();
    for r in &runs {
        println!(
            "  Linux {:<6} {:>6.1}s  {}",
            r.kernel,
            r.took.as_secs_f64(),
            if r.ok { "ok" } else { "FAILED" }
        );
    }
    if !failed.is_empty() {
        bail!(
            "the suites failed in the guests on Linux {}",
            failed.join(", ")
        );
    }
    Ok(())
}

fn print_summary(summary: &[(&&str, std::time::Duration, bool)]) {
    println!();
    for (name, took, ok) in summary {
        println!(
            "  {:<12} {:>6.1}s  {}",
            name,
            took.as_secs_f64(),
            if *ok { "ok" } else { "FAILED" }
        );
    }
}

// ---------------------------------------------------------------------------------------------

fn cargo(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(root());
    run(&mut cmd)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(what: &str) {
    println!("\n==> {what}");
}
