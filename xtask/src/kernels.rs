//! The `kernels` tier: the kernel tier and a short end-to-end smoke run inside QEMU guests booted
//! on the kernels EKS node groups run (Debian's 6.1 and 6.12 builds), so a verifier that rejects
//! the data path, or an attach that fails, on an older kernel is found here and not on a node.
//!
//! Everything it needs is fetched into `~/.cache/xdplb/kernels/` (idempotent, nothing installed
//! on the host): Debian packages through a private APT configuration (own sources, lists and
//! archive dirs; the host's apt state is untouched) and unpacked with `dpkg -x` — the kernels,
//! QEMU from bookworm-backports with the libraries the host lacks, busybox and kmod for the
//! guest's early userspace — and virtme-ng in a Python venv. The guests share the host's root
//! read-only over 9p, so the test binaries built here run unchanged inside. Software emulation
//! (TCG): KVM does not work on these machines.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// A kernel the tier boots.
pub struct GuestKernel {
    /// What the summary calls it.
    pub name: &'static str,
    /// The Debian package and its exact version.
    pub package: &'static str,
    pub version: &'static str,
    /// How the agent must attach lb_backend there: TCX links from Linux 6.6, a classic clsact
    /// filter below.
    pub tc_mode: &'static str,
}

/// The kernels tested, pinned here and only here. Debian drops superseded builds from its
/// archive; when one is gone, set-up stops and says so: pick the current build of the same
/// line (`apt-cache madison` with the tier's private APT configuration, as the message shows)
/// and update the version here. Generic (not `-cloud-`) builds: their 9p modules let the guest
/// mount the host's root without virtiofsd.
pub const KERNELS: &[GuestKernel] = &[
    GuestKernel {
        name: "6.1",
        package: "linux-image-6.1.0-50-amd64-unsigned",
        version: "6.1.176-1",
        tc_mode: "tc-classic",
    },
    GuestKernel {
        name: "6.12",
        package: "linux-image-6.12.95+deb12-amd64-unsigned",
        version: "6.12.95-1~bpo12+1",
        tc_mode: "tcx",
    },
];

/// virtme-ng, from PyPI.
const VIRTME_NG_VERSION: &str = "1.42";
/// Where QEMU comes from: bookworm's own 7.2 would replace the host's newer qemu-utils were it
/// installed; unpacked, the newer one needs nothing of the host's.
const QEMU_SUITE: &str = "bookworm-backports";
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
";

/// Tests of the kernel tier that measure throughput and cannot meet their own preconditions
/// under emulation, with the reason (they run in the native `kernel` tier).
pub const SKIPPED: &[(&str, &str)] = &[(
    "one_source_on_two_cpus_gets_the_rate_not_twice_it",
    "must offer twice 20 000 packets/s from each of two CPUs for 1.5 s; emulated CPUs on a \
     shared 2-core host do not reliably",
)];

/// Memory and CPUs of a guest: two CPUs (the limiter's cross-CPU tests pin threads to CPU 0
/// and 1), and room for the data path's maps (about 130 MiB at the tests' sizes) and the
/// verifier's working memory.
const GUEST_CPUS: &str = "2";
const GUEST_MEMORY: &str = "2G";
/// One guest's run: boot, the tests, power-off. Well above what it takes (6-10 minutes on a
/// quiet 2-core machine, 15-20 when the machine is busy with other work), so only a hung guest
/// meets it.
const GUEST_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// The agent's start under emulation: the verifier alone takes up to 30 s per program there.
const AGENT_READY_SECONDS: &str = "240";
/// About one boot in 30 crashes QEMU at once (exit 255, no output): such a run is retried once.
const QEMU_CRASH: i32 = 255;

/// What a guest run reports.
pub struct GuestRun {
    pub kernel: &'static str,
    pub took: Duration,
    pub ok: bool,
}

/// The cache directory: `$XDPLB_CACHE/kernels` (default `~/.cache/xdplb/kernels`).
fn cache(base: &Path) -> PathBuf {
    base.join("kernels")
}

/// Runs the tier: set-up, builds, then the guests. `root` is the workspace, `cache_base` the
/// project's cache (`~/.cache/xdplb`).
pub fn run(root: &Path, cache_base: &Path) -> Result<Vec<GuestRun>> {
    let dir = cache(cache_base);
    let started = Instant::now();
    let tools = setup(&dir).context("setting up the kernels tier")?;
    println!(
        "kernels: set-up done in {:.1}s (cache {})",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    let binaries = build(root)?;
    let work = root.join("target/kernels");
    fs::create_dir_all(&work)?;
    // XDPLB_KERNELS=6.1 (a comma-separated list of names) boots only those.
    let chosen: Vec<&GuestKernel> = match std::env::var("XDPLB_KERNELS") {
        Ok(names) => {
            let names: Vec<&str> = names.split(',').map(str::trim).collect();
            for n in &names {
                if !KERNELS.iter().any(|k| k.name == *n) {
                    bail!(
                        "XDPLB_KERNELS: no kernel {n} (known: {})",
                        names_of(KERNELS)
                    );
                }
            }
            KERNELS.iter().filter(|k| names.contains(&k.name)).collect()
        }
        Err(_) => KERNELS.iter().collect(),
    };
    // Both guests at once: the guests spend much of their time off the CPU (boot, 9p reads,
    // the tests' sleeps), so on two cores they finish sooner together than one after the other.
    let runs: Vec<Result<GuestRun>> = std::thread::scope(|s| {
        let handles: Vec<_> = chosen
            .iter()
            .map(|k| {
                let (tools, binaries, work) = (&tools, &binaries, &work);
                s.spawn(move || guest(root, tools, binaries, k, work))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a guest thread panicked"))
            })
            .collect()
    });
    let mut done = Vec::new();
    for (k, r) in chosen.iter().zip(runs) {
        let r = r.with_context(|| format!("running the guest on Linux {}", k.name))?;
        let out = work.join(k.name);
        println!("\n---- Linux {}: guest stdout ----", k.name);
        print!(
            "{}",
            fs::read_to_string(out.join("stdout")).unwrap_or_default()
        );
        println!("---- Linux {}: guest stderr ----", k.name);
        print!(
            "{}",
            fs::read_to_string(out.join("stderr")).unwrap_or_default()
        );
        println!(
            "---- Linux {}: {} in {:.0}s ----",
            k.name,
            if r.ok { "passed" } else { "FAILED" },
            r.took.as_secs_f64()
        );
        done.push(r);
    }
    Ok(done)
}

fn names_of(kernels: &[GuestKernel]) -> String {
    kernels
        .iter()
        .map(|k| k.name)
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// set-up
// ---------------------------------------------------------------------------------------------

/// Paths of what set-up put in place.
struct Tools {
    dir: PathBuf,
}

impl Tools {
    fn bin(&self) -> PathBuf {
        self.dir.join("bin")
    }
    fn venv_bin(&self) -> PathBuf {
        self.dir.join("vng-venv/bin")
    }
    fn guest_bin(&self) -> PathBuf {
        self.dir.join("guest-bin")
    }
    fn busybox(&self) -> PathBuf {
        self.dir.join("root/busybox/bin/busybox")
    }
    fn kernel_root(&self, k: &GuestKernel) -> PathBuf {
        self.dir.join(format!("root/linux-{}", k.name))
    }
}

fn setup(dir: &Path) -> Result<Tools> {
    fs::create_dir_all(dir)?;
    let mut apt = Apt::new(dir)?;
    // The guest's modprobe and depmod first: unpacking a kernel runs depmod.
    unpack(&mut apt, dir, "kmod", &[("kmod", None)])?;
    let bin = dir.join("bin");
    fs::create_dir_all(&bin)?;
    for tool in ["depmod", "modprobe", "insmod", "lsmod", "modinfo"] {
        let link = bin.join(tool);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(dir.join("root/kmod/bin/kmod"), &link)?;
    }
    unpack(&mut apt, dir, "busybox", &[("busybox-static", None)])?;
    for k in KERNELS {
        let component = format!("linux-{}", k.name);
        if unpack(&mut apt, dir, &component, &[(k.package, Some(k.version))])? {
            // Debian's packages leave modules.dep to the postinst, which never runs here.
            let root = dir.join("root").join(&component);
            for kver in fs::read_dir(root.join("lib/modules"))?.flatten() {
                let kver = kver.file_name().to_string_lossy().into_owned();
                run_quiet(
                    Command::new(bin.join("depmod"))
                        .args(["-a", "-b"])
                        .arg(&root)
                        .arg(&kver),
                )?;
            }
        }
    }
    let qemu = qemu_packages(&mut apt, dir)?;
    let specs: Vec<(&str, Option<&str>)> = qemu.iter().map(|p| (p.as_str(), None)).collect();
    unpack(&mut apt, dir, "qemu", &specs)?;
    write_qemu_wrapper(dir)?;
    venv(dir)?;
    udev_stand_in(dir)?;
    Ok(Tools {
        dir: dir.to_path_buf(),
    })
}

/// Debian's apt with a private configuration under `<cache>/apt`: its own sources list, package
/// lists and archive directory. It only downloads (`apt-get download`) and answers questions;
/// nothing is installed.
struct Apt {
    dir: PathBuf,
    updated: bool,
}

impl Apt {
    fn new(cache: &Path) -> Result<Apt> {
        let dir = cache.join("apt");
        for sub in [
            "lists/partial",
            "archives/partial",
            "cache",
            "sources.list.d",
        ] {
            fs::create_dir_all(dir.join(sub))?;
        }
        fs::write(dir.join("sources.list"), SOURCES)?;
        Ok(Apt {
            dir,
            updated: false,
        })
    }

    fn command(&self, tool: &str) -> Command {
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        let mut cmd = Command::new(tool);
        for (key, value) in [
            ("Dir::Etc::sourcelist", d("sources.list")),
            ("Dir::Etc::sourceparts", d("sources.list.d")),
            ("Dir::State::lists", d("lists")),
            ("Dir::Cache", d("cache")),
            ("Dir::Cache::archives", d("archives")),
            // Downloads land in our own directories, which the _apt user cannot write.
            ("APT::Sandbox::User", "root".to_string()),
            ("Debug::NoLocking", "1".to_string()),
        ] {
            cmd.arg("-o").arg(format!("{key}={value}"));
        }
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    /// `apt-get update` of the private lists, once per run and only when something is needed.
    fn update(&mut self) -> Result<()> {
        if !self.updated {
            step("kernels: apt-get update (private lists)");
            run_quiet(self.command("apt-get").args(["-q", "update"]))?;
            self.updated = true;
        }
        Ok(())
    }

    /// Downloads `packages` (name and exact version, or the candidate) into `dest`.
    fn download(&mut self, dest: &Path, packages: &[(&str, Option<&str>)]) -> Result<()> {
        self.update()?;
        for (name, version) in packages {
            if let Some(v) = version {
                let known = output(self.command("apt-cache").args(["madison", name]))?;
                if !known
                    .lines()
                    .any(|l| l.split('|').nth(1).map(str::trim) == Some(v))
                {
                    bail!(
                        "{name} {v} is no longer in Debian's archive (bookworm, -updates, \
                         -backports, -security). Pick the current build of that line, e.g. with\n  \
                         apt-cache -o Dir::Etc::sourcelist={0}/sources.list -o Dir::State::lists={0}/lists search linux-image-\n\
                         and pin it in KERNELS (xtask/src/kernels.rs). What the archive has for {name}:\n{known}",
                        self.dir.display()
                    );
                }
            }
        }
        fs::create_dir_all(dest)?;
        let specs: Vec<String> = packages
            .iter()
            .map(|(n, v)| match v {
                Some(v) => format!("{n}={v}"),
                None => n.to_string(),
            })
            .collect();
        run_quiet(
            self.command("apt-get")
                .args(["-q", "download"])
                .args(&specs)
                .current_dir(dest),
        )
    }
}

/// Downloads and unpacks `packages` into `<cache>/root/<component>` unless the same set is
/// there already. Returns whether it unpacked.
fn unpack(
    apt: &mut Apt,
    cache: &Path,
    component: &str,
    packages: &[(&str, Option<&str>)],
) -> Result<bool> {
    let root = cache.join("root").join(component);
    let stamp = cache.join("root").join(format!("{component}.done"));
    let want = packages.iter().fold(String::new(), |mut want, (n, v)| {
        let _ = writeln!(want, "{n}={}", v.unwrap_or("candidate"));
        want
    });
    if fs::read_to_string(&stamp).is_ok_and(|s| s == want) && root.exists() {
        return Ok(false);
    }
    step(&format!("kernels: fetching {component}"));
    let debs = cache.join("debs").join(component);
    let _ = fs::remove_dir_all(&debs);
    apt.download(&debs, packages)?;
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    for deb in fs::read_dir(&debs)?.flatten() {
        run_quiet(Command::new("dpkg").arg("-x").arg(deb.path()).arg(&root))?;
    }
    // The .debs are not needed once unpacked (the kernels are 70-110 MB each).
    let _ = fs::remove_dir_all(&debs);
    fs::write(&stamp, want)?;
    Ok(true)
}

/// QEMU for x86 and the libraries it needs that this host lacks, as apt would install them
/// from `QEMU_SUITE` (asked with the host's package status, read only).
fn qemu_packages(apt: &mut Apt, cache: &Path) -> Result<Vec<String>> {
    let known = cache.join("root/qemu.packages");
    if let Ok(list) = fs::read_to_string(&known)
        && cache.join("root/qemu.done").exists()
    {
        return Ok(list.lines().map(String::from).collect());
    }
    apt.update()?;
    let simulated = output(apt.command("apt-get").args([
        "-s",
        "install",
        "--no-install-recommends",
        "-t",
        QEMU_SUITE,
        "qemu-system-x86",
    ]))?;
    // "Inst NAME (VERSION SUITE [ARCH])": install each from the suite apt chose.
    let packages: Vec<String> = simulated
        .lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter_map(|l| l.split_whitespace().next())
        .map(ToString::to_string)
        .collect();
    if !packages.iter().any(|p| p == "qemu-system-x86") {
        bail!("apt would not install qemu-system-x86 from {QEMU_SUITE}:\n{simulated}");
    }
    // Pinned to the suite apt chose for each (backports for QEMU itself).
    let packages: Vec<String> = packages
        .into_iter()
        .map(|p| {
            let from_backports = simulated
                .lines()
                .any(|l| l.starts_with(&format!("Inst {p} ")) && l.contains("Backports"));
            if from_backports {
                format!("{p}/{QEMU_SUITE}")
            } else {
                p
            }
        })
        .collect();
    fs::write(&known, packages.join("\n"))?;
    Ok(packages)
}

/// `bin/qemu-system-x86_64`: the unpacked QEMU with its libraries and firmware.
fn write_qemu_wrapper(cache: &Path) -> Result<()> {
    let q = cache.join("root/qemu");
    let script = format!(
        "#!/bin/sh\n# QEMU unpacked from Debian's packages (xtask kernels set-up): its libraries and firmware.\n\
         export LD_LIBRARY_PATH={q}/usr/lib/x86_64-linux-gnu:{q}/lib/x86_64-linux-gnu\n\
         exec {q}/usr/bin/qemu-system-x86_64 -L {q}/usr/share/qemu -L {q}/usr/share/seabios \"$@\"\n",
        q = q.display()
    );
    let path = cache.join("bin/qemu-system-x86_64");
    write_executable(&path, &script)?;
    let version = output(Command::new(&path).arg("--version"))
        .with_context(|| format!("{} does not run", path.display()))?;
    if !version.starts_with("QEMU emulator version") {
        bail!("{}: unexpected --version: {version}", path.display());
    }
    Ok(())
}

/// virtme-ng in its own venv.
fn venv(cache: &Path) -> Result<()> {
    let venv = cache.join("vng-venv");
    let vng = venv.join("bin/vng");
    if output(Command::new(&vng).arg("--version"))
        .is_ok_and(|v| v.trim() == format!("virtme-ng {VIRTME_NG_VERSION}"))
    {
        return Ok(());
    }
    step(&format!(
        "kernels: virtme-ng {VIRTME_NG_VERSION} in {}",
        venv.display()
    ));
    let _ = fs::remove_dir_all(&venv);
    run_quiet(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("python3 -m venv (python3 with its venv module is needed)")?;
    run_quiet(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")),
    )
}

/// virtme-ng's guest init waits for udev to name its virtio serial ports, and these machines
/// have no udev: a stand-in `udevd` links each port by its name, and `udevadm` does nothing.
/// The guest's PATH puts them first.
fn udev_stand_in(cache: &Path) -> Result<()> {
    let dir = cache.join("guest-bin");
    fs::create_dir_all(&dir)?;
    write_executable(
        &dir.join("udevd"),
        "#!/bin/sh\n# Stand-in for udevd in a virtme-ng guest: names the virtio serial ports.\n\
         mkdir -p /dev/virtio-ports\n\
         for n in /sys/class/virtio-ports/*/name; do\n  [ -r \"$n\" ] || continue\n  \
         port=$(basename \"$(dirname \"$n\")\")\n  \
         ln -sf \"/dev/$port\" \"/dev/virtio-ports/$(cat \"$n\")\"\ndone\nexit 0\n",
    )?;
    write_executable(&dir.join("udevadm"), "#!/bin/sh\nexit 0\n")
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// builds and guests
// ---------------------------------------------------------------------------------------------

/// The test executables and the agent the guests run.
struct Binaries {
    kernel: PathBuf,
    ratelimit: PathBuf,
    smoke: PathBuf,
    agent: PathBuf,
}

fn build(root: &Path) -> Result<Binaries> {
    step("kernels: building the test binaries and lb-agent");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let json = output(
        Command::new(&cargo)
            .args([
                "test",
                "-p",
                "lb-tests",
                "--test",
                "kernel",
                "--test",
                "ratelimit",
                "--test",
                "smoke",
                "--no-run",
                "--message-format=json-render-diagnostics",
            ])
            .current_dir(root),
    )?;
    let json = json
        + &output(
            Command::new(&cargo)
                .args([
                    "build",
                    "-p",
                    "lb-userspace",
                    "--bin",
                    "lb-agent",
                    "--message-format=json-render-diagnostics",
                ])
                .current_dir(root),
        )?;
    let find = |name: &str| -> Result<PathBuf> {
        json.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"]["name"] == name)
            .find_map(|v| v["executable"].as_str().map(PathBuf::from))
            .with_context(|| format!("cargo built no executable `{name}`"))
    };
    Ok(Binaries {
        kernel: find("kernel")?,
        ratelimit: find("ratelimit")?,
        smoke: find("smoke")?,
        agent: find("lb-agent")?,
    })
}

/// The script the guest runs: kernel modules the tests need, then the suites; exits non-zero
/// if any failed.
fn guest_script(tools: &Tools, b: &Binaries, k: &GuestKernel) -> String {
    let skips = SKIPPED.iter().fold(String::new(), |mut skips, (name, _)| {
        let _ = write!(skips, " --skip {name}");
        skips
    });
    let ci = std::env::var("CI").unwrap_or_default();
    format!(
        r#"set -u
# Module autoloading (the clsact qdisc, cls_bpf) runs this modprobe: the host has none.
echo {bin}/modprobe > /proc/sys/kernel/modprobe
for m in veth bridge sch_ingress cls_bpf; do {bin}/modprobe $m || echo "modprobe $m failed" >&2; done
export CI='{ci}' XDPLB_AGENT_BINARY='{agent}' XDPLB_AGENT_READY_SECONDS={ready} XDPLB_EXPECT_TC_MODE='{tc_mode}'
export RUST_BACKTRACE=1
echo "guest: $(uname -r), $(nproc) CPUs"
rc=0
suite() {{
  name=$1; shift
  t0=$(date +%s)
  "$@" || rc=1
  echo "guest: $name took $(( $(date +%s) - t0 )) s"
}}
suite kernel '{kernel}' --test-threads=2
suite ratelimit '{ratelimit}' --test-threads=2{skips}
suite smoke '{smoke}' --exact tcp_and_udp_in_both_modes_through_a_restart_with_takeover
exit $rc
"#,
        bin = tools.bin().display(),
        agent = b.agent.display(),
        ready = AGENT_READY_SECONDS,
        tc_mode = k.tc_mode,
        kernel = b.kernel.display(),
        ratelimit = b.ratelimit.display(),
        smoke = b.smoke.display(),
    )
}

/// Boots `k` and runs the suites in it; stdout and stderr go to `<work>/<kernel>/`.
fn guest(
    root: &Path,
    tools: &Tools,
    b: &Binaries,
    k: &GuestKernel,
    work: &Path,
) -> Result<GuestRun> {
    let out = work.join(k.name);
    fs::create_dir_all(&out)?;
    let script = out.join("guest.sh");
    fs::write(&script, guest_script(tools, b, k))?;
    let kernel_root = tools.kernel_root(k);
    let vmlinuz = fs::read_dir(kernel_root.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {}", kernel_root.display()))?;
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let status = boot(root, tools, &vmlinuz, &script, &out)?;
        let stdout = fs::read_to_string(out.join("stdout")).unwrap_or_default();
        if status.code() == Some(QEMU_CRASH) && stdout.trim().is_empty() && attempt == 1 {
            eprintln!("kernels: QEMU for Linux {} died at boot; once more", k.name);
            continue;
        }
        return Ok(GuestRun {
            kernel: k.name,
            took: started.elapsed(),
            ok: status.success(),
        });
    }
}

fn boot(
    root: &Path,
    tools: &Tools,
    vmlinuz: &Path,
    script: &Path,
    out: &Path,
) -> Result<ExitStatus> {
    use std::os::unix::process::CommandExt;
    let path = format!(
        "{}:{}:{}",
        tools.bin().display(),
        tools.venv_bin().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let guest_path = format!(
        "PATH={}:/usr/sbin:/usr/bin:/sbin:/bin",
        tools.guest_bin().display()
    );
    let mut cmd = Command::new(tools.venv_bin().join("vng"));
    cmd.arg("--run")
        .arg(vmlinuz)
        .args(["--disable-kvm", "--force-9p"])
        .args(["--cpus", GUEST_CPUS, "--memory", GUEST_MEMORY])
        .arg("--busybox")
        .arg(tools.busybox())
        .args(["-a", &guest_path])
        .arg("--")
        .arg(format!("sh {}", script.display()))
        .env("PATH", path)
        .current_dir(root)
        .stdin(Stdio::null())
        // Two files, not one: QEMU opens each stream on its own and would overwrite the other.
        .stdout(fs::File::create(out.join("stdout"))?)
        .stderr(fs::File::create(out.join("stderr"))?)
        .process_group(0);
    let mut child = cmd.spawn().context("starting vng")?;
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let group = -libc::pid_t::try_from(child.id())?;
            // SAFETY: signalling the process group we created for vng and its QEMU.
            unsafe { libc::kill(group, libc::SIGKILL) };
            let _ = child.wait();
            bail!("the guest did not finish within {GUEST_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(what: &str) {
    println!("\n==> {what}");
}
