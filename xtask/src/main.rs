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
        /// Only these tiers (lint, host, kernel, e2e, k8s, bench-smoke, kernels).
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
            run(Command::new(target_dir().join("release/demo")).env(AGENT_BINARY, release_agent()))
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
            let mut cmd = Command::new(target_dir().join("release/bench"));
            cmd.args(args).env(AGENT_BINARY, release_agent());
            run(&mut cmd)
        }
    }
}

/// The agent the demo and bench run (lb_tests::agent::agent_binary): the one just built with
/// them. Left to itself, that function builds lb-agent alone, whose dependencies' features
/// differ from this build's, so each build would undo the other's (minutes per demo).
const AGENT_BINARY: &str = "XDPLB_AGENT_BINARY";

fn release_agent() -> PathBuf {
    target_dir().join("release/lb-agent")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Where cargo puts what it builds: `CARGO_TARGET_DIR` if set (relative to the workspace), else
/// `target/`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), |d| root().join(d))
}

// ---------------------------------------------------------------------------------------------
// setup
// ---------------------------------------------------------------------------------------------

/// What `rust-toolchain-bpf.toml` (the workspace root) pins: the nightly that builds the data
/// path, and the bpf-linker built against its LLVM.
struct BpfToolchain {
    channel: String,
    linker_version: String,
    linker_features: Vec<String>,
}

/// Where the pins live (read by this, by lb-userspace/build.rs, and through `cargo xtask setup`
/// by deploy/Dockerfile).
const TOOLCHAIN_FILE: &str = "rust-toolchain-bpf.toml";

fn bpf_toolchain() -> Result<BpfToolchain> {
    let path = root().join(TOOLCHAIN_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let doc: toml::Table = text
        .parse()
        .with_context(|| format!("{}", path.display()))?;
    let get = |table: &str, key: &str| doc.get(table).and_then(|t| t.get(key));
    let string = |table: &str, key: &str| {
        get(table, key)
            .and_then(|v| v.as_str())
            .map(String::from)
            .with_context(|| format!("{}: no [{table}] {key}", path.display()))
    };
    Ok(BpfToolchain {
        channel: string("toolchain", "channel")?,
        linker_version: string("bpf-linker", "version")?,
        linker_features: get("bpf-linker", "features")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// The installed rustup toolchain that is `channel`: itself, or a plain `nightly` of the same
/// build date (rustup cannot give one toolchain both names). None: not installed.
fn installed_toolchain(channel: &str) -> Option<String> {
    let list = output(Command::new("rustup").args(["toolchain", "list"])).ok()?;
    if list.lines().any(|l| l.starts_with(&format!("{channel}-"))) {
        return Some(channel.to_string());
    }
    let date = channel.strip_prefix("nightly-")?;
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
            .ok()?;
    let manifest = std::fs::read_to_string(
        Path::new(sysroot.trim()).join("lib/rustlib/multirust-channel-manifest.toml"),
    )
    .ok()?;
    manifest
        .lines()
        .any(|l| l.trim() == format!("date = \"{date}\""))
        .then(|| "nightly".to_string())
}

/// Installs what building the data path needs, as `rust-toolchain-bpf.toml` pins it (each step
/// skipped when already done): the nightly with rust-src, and bpf-linker built against the
/// nightly's own LLVM; and what checking the arm64 image build needs: the aarch64 target of the
/// host toolchain and Debian's cross linker.
fn setup() -> Result<()> {
    install_debian_packages()?;
    let pins = bpf_toolchain()?;
    let toolchain = if let Some(t) = installed_toolchain(&pins.channel) {
        t
    } else {
        step(&format!(
            "rustup toolchain install {} (rust-src)",
            pins.channel
        ));
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            &pins.channel,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        pins.channel.clone()
    };
    let sysroot =
        output(Command::new("rustup").args(["run", &toolchain, "rustc", "--print", "sysroot"]))
            .with_context(|| format!("the {toolchain} toolchain"))?;
    let sysroot = PathBuf::from(sysroot.trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        step(&format!(
            "rustup component add rust-src --toolchain {toolchain}"
        ));
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            &toolchain,
        ]))?;
    }
    cross_tools()?;
    let wanted = format!("bpf-linker {}", pins.linker_version);
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == wanted)
    {
        return Ok(());
    }
    // bpf-linker links against the nightly's own LLVM (same version as the rustc that emits
    // the bitcode): LLVM_PREFIX must hold lib/libLLVM.so, and the binary finds it at run time
    // through an rpath to the nightly's lib directory.
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libLLVM.so.")
                    || (n.starts_with("libLLVM-")
                        && Path::new(n).extension().is_some_and(|e| e == "so"))
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
        "{} against {}",
        bpf_linker_install(&pins).join(" "),
        llvm.display()
    ));
    let mut cmd = Command::new("cargo");
    cmd.args(bpf_linker_install(&pins))
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

/// `cargo install ...` for the pinned bpf-linker: its exact version and its own lock file.
fn bpf_linker_install(pins: &BpfToolchain) -> Vec<String> {
    let mut args: Vec<String> = ["install", "--locked", "--force", "bpf-linker", "--version"]
        .map(String::from)
        .into();
    args.push(format!("={}", pins.linker_version));
    args.push("--no-default-features".into());
    if !pins.linker_features.is_empty() {
        args.push("--features".into());
        args.push(pins.linker_features.join(","));
    }
    args
}

/// How the agent is built: deploy/Dockerfile runs this with `--release --target <arch>` (its
/// manifests test checks), the k8s tier with `--target aarch64-unknown-linux-gnu`.
const AGENT_BUILD: &[&str] = &[
    "build",
    "--locked",
    "-p",
    "lb-userspace",
    "--bin",
    "lb-agent",
];

/// The image is built for linux/arm64 too (deploy/Dockerfile); the k8s tier cross-builds the
/// agent for it. Needs the target's standard library and a cross linker (Debian's).
const ARM64_TARGET: &str = "aarch64-unknown-linux-gnu";
const ARM64_LINKER: &str = "aarch64-linux-gnu-gcc";
const ARM64_PACKAGES: &[&str] = &["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"];

fn cross_tools() -> Result<()> {
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !targets.lines().any(|t| t.trim() == ARM64_TARGET) {
        step(&format!("rustup target add {ARM64_TARGET}"));
        run(Command::new("rustup").args(["target", "add", ARM64_TARGET]))?;
    }
    if Command::new(ARM64_LINKER)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    step(&format!("apt-get install {}", ARM64_PACKAGES.join(" ")));
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "-q", "--no-install-recommends"])
            .args(ARM64_PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut cmd)
    };
    if install().is_err() {
        // Package lists missing or stale on a fresh machine.
        run(Command::new("apt-get").args(["update", "-q"]))?;
        install()?;
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
        use std::os::unix::fs::PermissionsExt;
        let path = PathBuf::from(Self::PATH);
        if path.exists() {
            return Ok(DenyServiceStarts { created: None });
        }
        std::fs::write(&path, "#!/bin/sh\n# cargo xtask setup: no service starts while it installs packages.\nexit 101\n")
            .with_context(|| format!("writing {}", path.display()))?;
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

/// The agent's image build without a container engine: the arm64 agent cross-builds (the
/// same build command as deploy/Dockerfile's, for the other architecture) into an aarch64 ELF.
fn arm64_cross_build() -> Result<()> {
    step(&format!(
        "cross-building lb-agent for {ARM64_TARGET} (the arm64 image)"
    ));
    let started = Instant::now();
    let mut args = AGENT_BUILD.to_vec();
    args.extend(["--target", ARM64_TARGET]);
    cargo(&args)?;
    let bin = target_dir().join(format!("{ARM64_TARGET}/debug/lb-agent"));
    let head = std::fs::read(&bin).with_context(|| format!("{}", bin.display()))?;
    // ELF, 64-bit, little-endian, e_machine EM_AARCH64 (183) at offset 18.
    if head.get(..4) != Some(b"\x7fELF") || head.get(18..20) != Some(&183u16.to_le_bytes()[..]) {
        bail!("{} is not an aarch64 ELF executable", bin.display());
    }
    println!(
        "lb-agent for {ARM64_TARGET}: {} ({:.0}s)",
        bin.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDPLB_CACHE").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/xdplb")
        },
        PathBuf::from,
    )
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
        "kernel tier: the real object through BPF_PROG_TEST_RUN, and adversarial input",
        &[
            "-p",
            "lb-tests",
            "--test",
            "kernel",
            "--test",
            "ratelimit",
            "--test",
            "adversarial",
            "--test",
            "datapath_log",
        ],
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
            "--test",
            "smoke",
            "--test",
            "capabilities",
            "--",
            "--test-threads=1",
        ],
    ),
    (
        "k8s",
        "Kubernetes: the agent and the deploy/ manifests against a real API server; the arm64 agent cross-builds",
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
        let result = if *name == LINT {
            lint::lint()
        } else if *name == "kernels" {
            kernels_tier()
        } else {
            let mut cmd_args = vec!["test"];
            cmd_args.extend_from_slice(args);
            let tested = cargo(&cmd_args);
            // The image's other architecture, beside the manifests' and Dockerfile's tests.
            if *name == "k8s" {
                tested.and_then(|()| arm64_cross_build())
            } else {
                tested
            }
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
