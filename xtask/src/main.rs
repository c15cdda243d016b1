//! Project tasks: `cargo xtask setup | test | demo | bench`. Orchestration only: everything that
//! tests or benchmarks something lives in the crates.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod lint;

#[derive(Parser)]
#[command(about = "xdplb project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the data path and running the tests need (idempotent): the
    /// Debian packages the e2e tests run, rust-src for the nightly toolchain and bpf-linker
    /// built against the nightly's own LLVM.
    Setup,
    /// rustfmt check, clippy on the host crates and on lb-ebpf for the BPF target (warnings are
    /// errors), and no import cycle between modules. Also the first tier of `test`.
    Lint,
    /// Run every test tier: lint, host unit tests, kernel tests (BPF_PROG_TEST_RUN), end-to-end
    /// tests in network namespaces, Kubernetes tests against a real API server, and a smoke run
    /// of the benchmarks. Privileged tiers need root (under CI=true they fail without it).
    Test {
        /// Only these tiers (lint, host, kernel, e2e, k8s, bench-smoke).
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
        Task::Lint => {
            setup()?;
            lint::lint()
        }
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
    install_debian_packages()?;
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

/// The Debian packages the e2e tests run, each with a program it installs (present = nothing to
/// do) and why the tests need it.
const DEBIAN_PACKAGES: &[(&str, &str, &str)] = &[
    // tests/tests/real_traffic.rs: the web server in the pods (downloads with sendfile and the
    // pod's TSO, uploads by PUT, short connections the server closes first).
    ("nginx", "nginx", "web server in the pods"),
    // The client of those tests, and the scraper of the agent's /metrics.
    ("curl", "curl", "HTTP client"),
    // Captures at the pods: TSO super-packets leaving them, SYNs answered by a bare ACK.
    ("tcpdump", "tcpdump", "packet captures"),
    // `ethtool -k`: the pods' offloads are the kernel's defaults (TSO/GSO on).
    ("ethtool", "ethtool", "offload settings"),
    // `promtool check metrics` on the agent's /metrics in the Prometheus text format.
    ("prometheus", "promtool", "promtool"),
];

/// Installs the missing DEBIAN_PACKAGES with apt-get (root only; once installed, nothing runs).
/// Package scripts may not start services: the prometheus and nginx packages would otherwise
/// leave a Prometheus server and a web server on port 80 running on the host.
fn install_debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(_, program, _)| !on_path(program))
        .map(|(package, ..)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let msg = format!(
            "the e2e tests need Debian packages that are missing: {} (run `cargo xtask setup` as \
             root, or apt-get install them)",
            missing.join(" ")
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!("{msg}");
        }
        eprintln!("warning: {msg}");
        return Ok(());
    }
    step(&format!("apt-get install {}", missing.join(" ")));
    let _no_services = DenyServiceStarts::install()?;
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null());
        run(&mut cmd)
    };
    // A fresh machine has no package lists yet.
    apt(&["update", "-q"])?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)?;
    for (package, program, _) in DEBIAN_PACKAGES {
        if !on_path(program) {
            bail!("apt-get installed {package} but `{program}` is still not on PATH");
        }
    }
    Ok(())
}

/// On PATH, or in the sbin directories (where nginx, tcpdump and ethtool go) that a non-login
/// PATH may lack.
fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|dir| dir.join(program).is_file())
}

/// Debian's policy-rc.d hook saying "no service starts" (exit 101) for the time of an install,
/// unless the machine has its own (container images usually do); removed on drop.
struct DenyServiceStarts {
    created: Option<PathBuf>,
}

impl DenyServiceStarts {
    const PATH: &str = "/usr/sbin/policy-rc.d";

    fn install() -> Result<DenyServiceStarts> {
        let path = PathBuf::from(Self::PATH);
        if path.exists() {
            return Ok(DenyServiceStarts { created: None });
        }
        std::fs::write(&path, "#!/bin/sh\n# cargo xtask setup: no service starts while it installs packages.\nexit 101\n")
            .with_context(|| format!("writing {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(DenyServiceStarts {
            created: Some(path),
        })
    }
}

impl Drop for DenyServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = &self.created {
            let _ = std::fs::remove_file(path);
        }
    }
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

/// The tier that is not a cargo test run: `lint::lint`.
const LINT: &str = "lint";

/// The tiers, in order: (name, what, cargo test arguments).
const TIERS: &[(&str, &str, &[&str])] = &[
    (
        LINT,
        "lint: rustfmt check, clippy on the host crates and the BPF data path, import cycles",
        &[],
    ),
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
            "--test",
            "real_traffic",
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
        let result = if *name == LINT {
            lint::lint()
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
