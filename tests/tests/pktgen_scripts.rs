//! The pktgen scenarios of deploy/bench/pktgen, tested without pktgen: the machines that run
//! this suite lack CONFIG_NET_PKTGEN, so the scripts are syntax-checked, run in dry-run mode
//! (DRY_RUN=1: every /proc/net/pktgen write printed as "<file>: <command>") and their writes
//! compared line for line, their option errors checked, and their results parser fed captured
//! pktgen output (deploy/bench/pktgen/testdata). Unprivileged: nothing here touches the host.
// A test reads top to bottom as the scenario it checks; splitting it would only scatter it.
#![allow(clippy::too_many_lines, reason = "test scenarios, see above")]
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

const SCENARIOS: [&str; 3] = ["single-flow.sh", "many-sources.sh", "spoofed-flood.sh"];
const MAC: &str = "0a:00:00:00:00:01";
const VIP4: &str = "198.51.100.10";
const VIP6: &str = "2001:db8:100::10";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/bench/pktgen")
}

/// Runs `bash SCRIPT ARGS` in the scripts' directory with a clean pktgen-related environment
/// plus `env`.
fn run_env(script: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(dir().join(script))
        .args(args)
        .current_dir(dir())
        .env_remove("DRY_RUN")
        .env_remove("PKTGEN_RESULTS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("running bash {script}: {e}"))
}

/// A dry run of SCRIPT; it must succeed. Returns stdout's lines.
fn dry(script: &str, args: &[&str]) -> Vec<String> {
    let out = run_env(script, args, &[("DRY_RUN", "1")]);
    let (stdout, stderr) = texts(&out);
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({}):\n{stderr}",
        out.status
    );
    stdout.lines().map(str::to_owned).collect()
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `/proc/net/pktgen/FILE: CMD`.
fn w(file: &str, cmd: &str) -> String {
    format!("/proc/net/pktgen/{file}: {cmd}")
}

/// The writes every scenario makes for device DEV before its own (lib.sh's pg_base_config).
fn base(dev: &str, count: u64, pkt_size: u32, delay: u32, dst: &str, port: u16) -> Vec<String> {
    let dst_cmd = if dst.contains(':') {
        format!("dst6 {dst}")
    } else {
        format!("dst {dst}")
    };
    vec![
        w(dev, "flag QUEUE_MAP_CPU"),
        w(dev, "flag NO_TIMESTAMP"),
        w(dev, "flag UDPCSUM"),
        w(dev, &format!("count {count}")),
        w(dev, &format!("pkt_size {pkt_size}")),
        w(dev, "burst 1"),
        w(dev, &format!("delay {delay}")),
        w(dev, &dst_cmd),
        w(dev, &format!("dst_mac {MAC}")),
        w(dev, &format!("udp_dst_min {port}")),
        w(dev, &format!("udp_dst_max {port}")),
    ]
}

/// Asserts two transcripts are equal, showing the first difference.
fn assert_lines(got: &[String], want: &[String]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g, w, "line {} differs\ngot:\n{}", i + 1, got.join("\n"));
    }
    assert_eq!(
        got.len(),
        want.len(),
        "line count differs\ngot:\n{}\nwant:\n{}",
        got.join("\n"),
        want.join("\n")
    );
}

/// Splits "/proc/net/pktgen/FILE: CMD" lines; every line must be one.
fn writes(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(|l| {
            let rest = l
                .strip_prefix("/proc/net/pktgen/")
                .unwrap_or_else(|| panic!("not a pktgen write: {l:?}"));
            let (file, cmd) = rest
                .split_once(": ")
                .unwrap_or_else(|| panic!("not FILE: CMD: {l:?}"));
            (file.to_owned(), cmd.to_owned())
        })
        .collect()
}

/// What any scenario's dry run must look like: reset first, start last; each thread emptied
/// before its devices are added; every device added before it is configured and configured with
/// the destination; clone_skb 0 and IPSRC_RND exactly in the spoofed flood.
fn check_shape(script: &str, lines: &[String], dst: &str, port: u16) {
    let ws = writes(lines);
    assert_eq!(
        ws.first().map(|(f, c)| (f.as_str(), c.as_str())),
        Some(("pgctrl", "reset"))
    );
    assert_eq!(
        ws.last().map(|(f, c)| (f.as_str(), c.as_str())),
        Some(("pgctrl", "start"))
    );
    let ctrl: Vec<_> = ws.iter().filter(|(f, _)| f == "pgctrl").collect();
    assert_eq!(ctrl.len(), 2, "pgctrl writes: {ctrl:?}");

    let mut emptied = Vec::new();
    let mut added: Vec<String> = Vec::new();
    for (file, cmd) in &ws {
        if let Some(cpu) = file.strip_prefix("kpktgend_") {
            if cmd == "rem_device_all" {
                emptied.push(cpu.to_owned());
            } else {
                let dev = cmd.strip_prefix("add_device ").expect("thread command");
                assert!(
                    emptied.iter().any(|c| c == cpu),
                    "{dev} added before rem_device_all"
                );
                let (_, tag) = dev.split_once('@').expect("DEV@TAG");
                assert!(
                    tag == cpu || tag.starts_with(&format!("{cpu}-")),
                    "{dev} on thread {cpu}"
                );
                added.push(dev.to_owned());
            }
        } else if file != "pgctrl" {
            assert!(added.contains(file), "{file} configured before add_device");
        }
    }
    assert!(!added.is_empty());
    let dst_cmd = if dst.contains(':') {
        format!("dst6 {dst}")
    } else {
        format!("dst {dst}")
    };
    let spoofed = script == "spoofed-flood.sh";
    let v6 = dst.contains(':');
    for dev in &added {
        let cmds: Vec<&str> = ws
            .iter()
            .filter(|(f, _)| f == dev)
            .map(|(_, c)| c.as_str())
            .collect();
        for want in [
            dst_cmd.as_str(),
            &format!("dst_mac {MAC}"),
            &format!("udp_dst_min {port}"),
            &format!("udp_dst_max {port}"),
        ] {
            assert!(cmds.contains(&want), "{dev} lacks {want:?}: {cmds:?}");
        }
        let clones: Vec<_> = cmds
            .iter()
            .filter(|c| c.starts_with("clone_skb "))
            .collect();
        assert_eq!(clones.len(), 1, "{dev}: {clones:?}");
        assert_eq!(
            *clones[0] == "clone_skb 0",
            spoofed,
            "{script} {dev}: {}",
            clones[0]
        );
        assert_eq!(
            cmds.contains(&"flag IPSRC_RND"),
            spoofed && !v6,
            "{script} {dev}: IPSRC_RND"
        );
        assert!(cmds.iter().any(|c| c.starts_with("count ")));
        assert!(cmds.iter().any(|c| c.starts_with("pkt_size ")));
    }
}

// --- syntax ----------------------------------------------------------------------------------

#[test]
fn every_script_parses() {
    let mut scripts: Vec<PathBuf> = fs::read_dir(dir())
        .expect("deploy/bench/pktgen")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sh"))
        .collect();
    scripts.sort();
    let names: Vec<_> = scripts
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in SCENARIOS.iter().chain(&["lib.sh", "results.sh"]) {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    for script in &scripts {
        let out = Command::new("bash").arg("-n").arg(script).output().unwrap();
        assert!(
            out.status.success(),
            "bash -n {}:\n{}",
            script.display(),
            texts(&out).1
        );
    }
}

#[test]
fn runnable_scripts_are_executable() {
    for script in SCENARIOS.iter().chain(&["results.sh"]) {
        let mode = fs::metadata(dir().join(script))
            .unwrap()
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "{script} is not executable ({mode:o})");
        let first = fs::read_to_string(dir().join(script)).unwrap();
        assert!(
            first.starts_with("#!/usr/bin/env bash\n"),
            "{script}: shebang"
        );
        assert!(
            first.contains("\nset -euo pipefail\n"),
            "{script}: set -euo pipefail"
        );
    }
}

// --- exact dry-run transcripts ----------------------------------------------------------------

#[test]
fn single_flow_ipv4() {
    let got = dry(
        "single-flow.sh",
        &[
            "-i", "eth0", "-d", VIP4, "-m", MAC, "-p", "8080", "-t", "2", "-c", "1000000",
        ],
    );
    let mut want = vec![w("pgctrl", "reset")];
    for t in 0..2 {
        let dev = format!("eth0@{t}");
        want.push(w(&format!("kpktgend_{t}"), "rem_device_all"));
        want.push(w(&format!("kpktgend_{t}"), &format!("add_device {dev}")));
        // -s defaults to 64-byte frames: pktgen's pkt_size leaves out the 4-byte FCS.
        want.extend(base(&dev, 1_000_000, 60, 0, VIP4, 8080));
        want.push(w(&dev, "clone_skb 100000"));
        // No -S: pktgen sends from the interface's own address (no src_min/src_max).
        want.push(w(&dev, "udp_src_min 9"));
        want.push(w(&dev, "udp_src_max 9"));
    }
    want.push(w("pgctrl", "start"));
    assert_lines(&got, &want);
    check_shape("single-flow.sh", &got, VIP4, 8080);
}

#[test]
fn single_flow_ipv4_fixed_source() {
    let got = dry(
        "single-flow.sh",
        &[
            "-i",
            "eth0",
            "-d",
            VIP4,
            "-m",
            MAC,
            "-p",
            "53",
            "-t",
            "1",
            "-S",
            "10.0.1.17",
        ],
    );
    let mut want = vec![
        w("pgctrl", "reset"),
        w("kpktgend_0", "rem_device_all"),
        w("kpktgend_0", "add_device eth0@0"),
    ];
    // Count defaults to 10 000 000 per thread.
    want.extend(base("eth0@0", 10_000_000, 60, 0, VIP4, 53));
    want.extend([
        w("eth0@0", "clone_skb 100000"),
        w("eth0@0", "src_min 10.0.1.17"),
        w("eth0@0", "src_max 10.0.1.17"),
        w("eth0@0", "udp_src_min 9"),
        w("eth0@0", "udp_src_max 9"),
        w("pgctrl", "start"),
    ]);
    assert_lines(&got, &want);
}

#[test]
fn single_flow_ipv6() {
    let got = dry(
        "single-flow.sh",
        &[
            "-6",
            "-i",
            "ens5",
            "-d",
            VIP6,
            "-m",
            MAC,
            "-p",
            "8080",
            "-t",
            "1",
            "-c",
            "5000",
            "-s",
            "128",
            "-S",
            "2001:db8:1::5",
        ],
    );
    let mut want = vec![
        w("pgctrl", "reset"),
        w("kpktgend_0", "rem_device_all"),
        w("kpktgend_0", "add_device ens5@0"),
    ];
    want.extend(base("ens5@0", 5000, 124, 0, VIP6, 8080));
    want.extend([
        w("ens5@0", "clone_skb 100000"),
        w("ens5@0", "src6 2001:db8:1::5"),
        w("ens5@0", "udp_src_min 9"),
        w("ens5@0", "udp_src_max 9"),
        w("pgctrl", "start"),
    ]);
    assert_lines(&got, &want);
    check_shape("single-flow.sh", &got, VIP6, 8080);
}

#[test]
fn many_sources_ipv4() {
    let got = dry(
        "many-sources.sh",
        &[
            "-i", "eth0", "-d", VIP4, "-m", MAC, "-p", "8080", "-t", "2", "-c", "1000000",
        ],
    );
    // The default range 198.18.0.0-198.18.15.255 (4096 sources), one half per thread.
    let slices = [
        ("198.18.0.0", "198.18.7.255"),
        ("198.18.8.0", "198.18.15.255"),
    ];
    let mut want = vec![w("pgctrl", "reset")];
    for (t, (lo, hi)) in slices.iter().enumerate() {
        let dev = format!("eth0@{t}");
        want.push(w(&format!("kpktgend_{t}"), "rem_device_all"));
        want.push(w(&format!("kpktgend_{t}"), &format!("add_device {dev}")));
        want.extend(base(&dev, 1_000_000, 60, 0, VIP4, 8080));
        want.extend([
            w(&dev, "clone_skb 16"),
            w(&dev, &format!("src_min {lo}")),
            w(&dev, &format!("src_max {hi}")),
            w(&dev, "udp_src_min 1024"),
            w(&dev, "udp_src_max 65535"),
            w(&dev, "flag UDPSRC_RND"),
        ]);
    }
    want.push(w("pgctrl", "start"));
    assert_lines(&got, &want);
    check_shape("many-sources.sh", &got, VIP4, 8080);
}

/// The source lines of each device, in order.
fn src_lines(lines: &[String]) -> Vec<(String, String)> {
    writes(lines)
        .into_iter()
        .filter(|(_, c)| c.starts_with("src"))
        .collect()
}

#[test]
fn many_sources_ipv4_range_split_between_threads() {
    // 4096 sources over 3 threads: 1365 each, the last also takes the remainder.
    let got = dry(
        "many-sources.sh",
        &[
            "-i",
            "eth0",
            "-d",
            VIP4,
            "-m",
            MAC,
            "-p",
            "8080",
            "-t",
            "3",
            "-S",
            "10.200.0.0-10.200.15.255",
        ],
    );
    let want: Vec<(String, String)> = [
        ("eth0@0", "src_min 10.200.0.0"),
        ("eth0@0", "src_max 10.200.5.84"),
        ("eth0@1", "src_min 10.200.5.85"),
        ("eth0@1", "src_max 10.200.10.169"),
        ("eth0@2", "src_min 10.200.10.170"),
        ("eth0@2", "src_max 10.200.15.255"),
    ]
    .iter()
    .map(|(f, c)| (f.to_string(), c.to_string()))
    .collect();
    assert_eq!(src_lines(&got), want);
    check_shape("many-sources.sh", &got, VIP4, 8080);

    // The same range as a prefix.
    let cidr = dry(
        "many-sources.sh",
        &[
            "-i",
            "eth0",
            "-d",
            VIP4,
            "-m",
            MAC,
            "-p",
            "8080",
            "-t",
            "3",
            "-S",
            "10.200.0.0/20",
        ],
    );
    assert_eq!(cidr, got);
}

#[test]
fn many_sources_ipv6() {
    let got = dry(
        "many-sources.sh",
        &[
            "-6", "-i", "eth0", "-d", VIP6, "-m", MAC, "-p", "8080", "-t", "2", "-k", "2", "-c",
            "1000001",
        ],
    );
    // Two pktgen devices per thread, each its own source in its own /64 of 2001:2::/48; the
    // thread's count split between them (rounded up); delay 1 so they take turns.
    let mut want = vec![w("pgctrl", "reset")];
    for t in 0..2u32 {
        let thread = format!("kpktgend_{t}");
        want.push(w(&thread, "rem_device_all"));
        want.push(w(&thread, &format!("add_device eth0@{t}-0")));
        want.push(w(&thread, &format!("add_device eth0@{t}-1")));
        for k in 0..2u32 {
            let dev = format!("eth0@{t}-{k}");
            want.extend(base(&dev, 500_001, 78, 1, VIP6, 8080));
            want.extend([
                w(&dev, "clone_skb 16"),
                w(&dev, &format!("src6 2001:2:0:{:x}::1", t * 2 + k)),
                w(&dev, "udp_src_min 1024"),
                w(&dev, "udp_src_max 65535"),
                w(&dev, "flag UDPSRC_RND"),
            ]);
        }
    }
    want.push(w("pgctrl", "start"));
    assert_lines(&got, &want);
    check_shape("many-sources.sh", &got, VIP6, 8080);
}

#[test]
fn many_sources_ipv6_default_sources_per_thread() {
    let got = dry(
        "many-sources.sh",
        &[
            "-6",
            "-i",
            "eth0",
            "-d",
            VIP6,
            "-m",
            MAC,
            "-p",
            "8080",
            "-t",
            "2",
            "-S",
            "fd00:1:2::/48",
        ],
    );
    let srcs: Vec<String> = src_lines(&got).into_iter().map(|(_, c)| c).collect();
    let want: Vec<String> = (0..32).map(|n| format!("src6 fd00:1:2:{n:x}::1")).collect();
    assert_eq!(srcs, want, "16 sources per thread by default");
    check_shape("many-sources.sh", &got, VIP6, 8080);
}

#[test]
fn spoofed_flood_ipv4() {
    let got = dry(
        "spoofed-flood.sh",
        &[
            "-i", "eth0", "-d", VIP4, "-m", MAC, "-p", "8080", "-t", "2", "-c", "1000000",
        ],
    );
    let mut want = vec![w("pgctrl", "reset")];
    for t in 0..2 {
        let dev = format!("eth0@{t}");
        want.push(w(&format!("kpktgend_{t}"), "rem_device_all"));
        want.push(w(&format!("kpktgend_{t}"), &format!("add_device {dev}")));
        want.extend(base(&dev, 1_000_000, 60, 0, VIP4, 8080));
        // Every packet built afresh, with a random source from the whole of 198.18.0.0/15.
        want.extend([
            w(&dev, "clone_skb 0"),
            w(&dev, "src_min 198.18.0.0"),
            w(&dev, "src_max 198.19.255.255"),
            w(&dev, "flag IPSRC_RND"),
            w(&dev, "udp_src_min 1024"),
            w(&dev, "udp_src_max 65535"),
            w(&dev, "flag UDPSRC_RND"),
        ]);
    }
    want.push(w("pgctrl", "start"));
    assert_lines(&got, &want);
    check_shape("spoofed-flood.sh", &got, VIP4, 8080);
}

#[test]
fn spoofed_flood_ipv6_cycles_fixed_sources_and_says_so() {
    let args = [
        "-6",
        "-i",
        "eth0",
        "-d",
        VIP6,
        "-m",
        MAC,
        "-p",
        "8080",
        "-t",
        "1",
        "-k",
        "3",
        "-S",
        "2001:db8:ff::/48",
        "-c",
        "3000",
    ];
    let got = dry("spoofed-flood.sh", &args);
    let mut want = vec![
        w("pgctrl", "reset"),
        w("kpktgend_0", "rem_device_all"),
        w("kpktgend_0", "add_device eth0@0-0"),
        w("kpktgend_0", "add_device eth0@0-1"),
        w("kpktgend_0", "add_device eth0@0-2"),
    ];
    for k in 0..3 {
        let dev = format!("eth0@0-{k}");
        want.extend(base(&dev, 1000, 78, 1, VIP6, 8080));
        want.extend([
            w(&dev, "clone_skb 0"),
            w(&dev, &format!("src6 2001:db8:ff:{k}::1")),
            w(&dev, "udp_src_min 1024"),
            w(&dev, "udp_src_max 65535"),
            w(&dev, "flag UDPSRC_RND"),
        ]);
    }
    want.push(w("pgctrl", "start"));
    assert_lines(&got, &want);
    check_shape("spoofed-flood.sh", &got, VIP6, 8080);

    let (_, stderr) = texts(&run_env("spoofed-flood.sh", &args, &[("DRY_RUN", "1")]));
    assert!(
        stderr.contains("cannot randomise IPv6 sources"),
        "no IPv6 warning:\n{stderr}"
    );
}

#[test]
fn every_scenario_and_family_has_the_right_shape() {
    for script in SCENARIOS {
        for (dst, extra) in [
            (VIP4, &[][..]),
            (VIP6, &["-6", "-S", "2001:db8:7::/48"][..]),
        ] {
            let mut args = vec!["-i", "eth1", "-d", dst, "-m", MAC, "-p", "4789", "-t", "3"];
            args.extend_from_slice(extra);
            if script == "single-flow.sh" && dst == VIP6 {
                // single-flow takes one source address, not a prefix.
                let n = args.len();
                args[n - 1] = "2001:db8:7::1";
            }
            let got = dry(script, &args);
            check_shape(script, &got, dst, 4789);
        }
    }
}

#[test]
fn duration_runs_until_stopped() {
    for script in SCENARIOS {
        let got = dry(
            script,
            &[
                "-i", "eth0", "-d", VIP4, "-m", MAC, "-p", "8080", "-t", "1", "-D", "30",
            ],
        );
        // Count 0 (no limit): pktgen runs until the script writes "stop" after 30 s.
        assert!(
            got.contains(&w("eth0@0", "count 0")),
            "{script}:\n{}",
            got.join("\n")
        );
        let n = got.len();
        assert_eq!(
            got[n - 2..],
            [w("pgctrl", "start"), w("pgctrl", "stop")],
            "{script}"
        );
    }
}

#[test]
fn first_cpu_moves_threads_and_devices() {
    let got = dry(
        "single-flow.sh",
        &[
            "-i", "eth0", "-d", VIP4, "-m", MAC, "-p", "8080", "-t", "2", "-f", "4",
        ],
    );
    let threads: Vec<String> = writes(&got)
        .into_iter()
        .filter(|(f, _)| f.starts_with("kpktgend_"))
        .map(|(f, c)| format!("{f}: {c}"))
        .collect();
    assert_eq!(
        threads,
        [
            "kpktgend_4: rem_device_all",
            "kpktgend_4: add_device eth0@4",
            "kpktgend_5: rem_device_all",
            "kpktgend_5: add_device eth0@5",
        ]
    );
}

#[test]
fn dash_n_is_the_same_dry_run() {
    let args = ["-i", "eth0", "-d", VIP4, "-m", MAC, "-p", "8080", "-t", "2"];
    let via_env = dry("many-sources.sh", &args);
    let mut with_n = vec!["-n"];
    with_n.extend_from_slice(&args);
    let out = run_env("many-sources.sh", &with_n, &[]);
    assert!(out.status.success(), "{}", texts(&out).1);
    assert_eq!(texts(&out).0.lines().collect::<Vec<_>>(), via_env);
}

// --- bad parameters -----------------------------------------------------------------------------

/// SCRIPT ARGS must fail with exit status 2 before writing anything, naming `param` and saying
/// `says`.
fn rejects(script: &str, args: &[&str], param: &str, says: &str) {
    let out = run_env(script, args, &[("DRY_RUN", "1")]);
    let (stdout, stderr) = texts(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{script} {args:?}: status {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stdout.is_empty(),
        "{script} {args:?} wrote before failing:\n{stdout}"
    );
    assert!(
        stderr.contains(param) && stderr.contains(says),
        "{script} {args:?}: stderr lacks {param:?} / {says:?}:\n{stderr}"
    );
}

#[test]
fn missing_required_parameters() {
    for script in SCENARIOS {
        rejects(
            script,
            &["-d", VIP4, "-m", MAC, "-p", "80"],
            "-i",
            "missing",
        );
        rejects(
            script,
            &["-i", "eth0", "-m", MAC, "-p", "80"],
            "-d",
            "missing",
        );
        rejects(
            script,
            &["-i", "eth0", "-d", VIP4, "-p", "80"],
            "-m",
            "missing",
        );
        rejects(
            script,
            &["-i", "eth0", "-d", VIP4, "-m", MAC],
            "-p",
            "missing",
        );
        rejects(script, &[], "-i", "missing");
    }
}

#[test]
fn bad_values() {
    let ok = ["-i", "eth0", "-d", VIP4, "-m", MAC, "-p", "80"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut a = ok.to_vec();
        a.extend_from_slice(extra);
        a
    };
    for script in SCENARIOS {
        for port in ["0", "65536", "70000", "http", "-1", "8o"] {
            let mut args = ok.to_vec();
            args[7] = port;
            rejects(script, &args, "-p", "UDP port");
        }
        rejects(script, &with(&["-p", ""]), "-p", "missing");
        rejects(
            script,
            &with(&["-d", "198.51.100.300"]),
            "-d",
            "not an IPv4 address",
        );
        rejects(
            script,
            &with(&["-d", "vip.example"]),
            "-d",
            "not an IPv4 address",
        );
        rejects(script, &with(&["-d", VIP6]), "-d", "add -6");
        rejects(
            script,
            &with(&["-6", "-d", "2001:db8::1::2"]),
            "-d",
            "not an IPv6 address",
        );
        rejects(
            script,
            &with(&["-m", "0a:00:00:00:00"]),
            "-m",
            "not a MAC address",
        );
        rejects(
            script,
            &with(&["-i", "eth0@1"]),
            "-i",
            "not an interface name",
        );
        rejects(script, &with(&["-s", "63"]), "-s", "frame size");
        rejects(
            script,
            &with(&["-6", "-d", VIP6, "-s", "64"]),
            "-s",
            "IPv6 frame size",
        );
        rejects(script, &with(&["-t", "0"]), "-t", "thread count");
        rejects(script, &with(&["-c", "many"]), "-c", "packet count");
        rejects(script, &with(&["-D", "1m"]), "-D", "duration");
        rejects(script, &with(&["-x"]), "-x", "unknown option");
        rejects(script, &with(&["-t"]), "-t", "needs a value");
        rejects(script, &with(&["extra"]), "extra", "unexpected argument");
        rejects(script, &with(&["-k", "4"]), "-k", "");
    }
    rejects(
        "single-flow.sh",
        &with(&["-6", "-d", VIP6]),
        "-S",
        "link-local",
    );
    rejects(
        "single-flow.sh",
        &with(&["-S", "10.0.0.0-10.0.0.9"]),
        "-S",
        "not an IPv4 address",
    );
    rejects(
        "many-sources.sh",
        &with(&["-S", "10.0.0.9-10.0.0.1"]),
        "-S",
        "above its last",
    );
    rejects(
        "many-sources.sh",
        &with(&["-S", "10.0.0.0/4"]),
        "-S",
        "prefix length",
    );
    rejects(
        "many-sources.sh",
        &with(&["-S", "10.0.0.0-10.0.0.1", "-t", "4"]),
        "-S",
        "fewer",
    );
    rejects(
        "many-sources.sh",
        &with(&["-6", "-d", VIP6, "-S", "2001:db8::/64"]),
        "-S",
        "/48",
    );
    rejects(
        "spoofed-flood.sh",
        &with(&["-6", "-d", VIP6, "-S", "2001:db8::1/48"]),
        "-S",
        "beyond /48",
    );
    rejects(
        "spoofed-flood.sh",
        &with(&["-b", "8"]),
        "-b",
        "burst must be 1",
    );
    rejects(
        "spoofed-flood.sh",
        &with(&["-S", "198.18.0.1-198.18.0.1"]),
        "-S",
        "range",
    );
}

#[test]
fn without_dry_run_the_host_is_checked_first() {
    // No DRY_RUN: the scripts check the device before root or pktgen, so this fails the same
    // way as root or not, with or without pktgen, and never reaches modprobe or /proc.
    for script in SCENARIOS {
        let out = run_env(
            script,
            &[
                "-i",
                "xdplbnodev0",
                "-d",
                VIP4,
                "-m",
                MAC,
                "-p",
                "80",
                "-t",
                "1",
            ],
            &[],
        );
        let (stdout, stderr) = texts(&out);
        assert_eq!(out.status.code(), Some(1), "{script}: {stderr}");
        assert!(stdout.is_empty(), "{script}: {stdout}");
        assert!(
            stderr.contains("-i: no such network device 'xdplbnodev0'"),
            "{script}: {stderr}"
        );
    }
}

// --- results --------------------------------------------------------------------------------

/// The table row whose first column is `name`, split into columns.
fn row<'a>(stdout: &'a str, name: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row {name:?} in:\n{stdout}"))
}

fn results(args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let out = run_env("results.sh", args, env);
    let (stdout, stderr) = texts(&out);
    assert!(
        out.status.success(),
        "results.sh {args:?}: {}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

#[test]
fn results_single_flow_ipv4() {
    let (stdout, _) = results(&["testdata/single-flow-ipv4.txt"], &[]);
    let header = row(&stdout, "thread");
    assert_eq!(
        header,
        [
            "thread",
            "devices",
            "packets",
            "seconds",
            "pps",
            "Mb/s",
            "wire_Mb/s",
            "errors"
        ]
    );
    // Per thread: pktgen's own pps and Mb/sec; wire Mb/s = pps x (60 + 24) x 8.
    assert_eq!(
        row(&stdout, "ens5@0"),
        [
            "ens5@0", "1", "10000000", "3.398", "2942774", "1412", "1978", "0"
        ]
    );
    assert_eq!(
        row(&stdout, "ens5@2"),
        [
            "ens5@2", "1", "10000000", "3.431", "2914440", "1398", "1959", "1203"
        ]
    );
    assert_eq!(
        row(&stdout, "total"),
        [
            "total", "4", "40000000", "3.431", "11737511", "5631", "7888", "1203"
        ]
    );
    assert!(
        stdout
            .contains("total: 11.74 Mpps, 5.63 Gb/s (7.89 Gb/s on the wire), 1203 transmit errors"),
        "{stdout}"
    );
}

#[test]
fn results_group_a_threads_devices() {
    let (stdout, _) = results(&["testdata/many-sources-ipv6.txt"], &[]);
    assert_eq!(
        row(&stdout, "ens5@0"),
        [
            "ens5@0", "2", "41230029", "30.000", "1374314", "856", "1121", "0"
        ]
    );
    assert_eq!(
        row(&stdout, "ens5@1"),
        [
            "ens5@1", "2", "39740877", "30.000", "1324677", "826", "1081", "0"
        ]
    );
    assert_eq!(
        row(&stdout, "total"),
        [
            "total", "4", "80970906", "30.000", "2698991", "1682", "2202", "0"
        ]
    );
}

#[test]
fn results_from_the_environment_and_unfinished_devices() {
    let path = dir().join("testdata/interrupted-ipv4.txt");
    let (stdout, stderr) = results(&[], &[("PKTGEN_RESULTS", path.to_str().unwrap())]);
    assert_eq!(
        row(&stdout, "total"),
        [
            "total", "1", "7340210", "4.812", "1525545", "732", "1025", "0"
        ]
    );
    assert!(!stdout.contains("eth1@3"), "{stdout}");
    assert!(
        stderr.contains("eth1@3 has no finished run (Result: OK: flags=0x4d2)"),
        "{stderr}"
    );
}

#[test]
fn results_without_a_finished_run_fail() {
    let tmp = std::env::temp_dir().join(format!("pktgen-idle-{}.txt", std::process::id()));
    let idle = fs::read_to_string(dir().join("testdata/interrupted-ipv4.txt"))
        .unwrap()
        .split("Params:")
        .nth(2)
        .map(|dev| format!("Params:{dev}"))
        .expect("a second device");
    fs::write(&tmp, &idle).unwrap();
    let out = run_env("results.sh", &[tmp.to_str().unwrap()], &[]);
    let _ = fs::remove_file(&tmp);
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("no finished run"), "{stderr}");

    let out = run_env("results.sh", &["testdata/no-such-file.txt"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(texts(&out).1.contains("cannot read"), "{}", texts(&out).1);
}
