//! The benchmarks at smoke scale, so their code cannot rot: asserts that the harness works
//! (every scenario ran and was verified by counters, the generator's frames arrived, numbers
//! are finite, the agent in Kubernetes mode saw every change, result files were written), never
//! speed. Privileged: see `require_root`.
use lb_tests::{
    bench::{
        Options, Scale,
        perpacket::{KatranOutcome, Scenario},
        run,
        throughput::{Mix, Path},
    },
    netns::require_root,
};

/// What results.md must say: its parts, and (Katran being skipped at smoke scale) that Katran
/// was not measured, with the figures quoted instead labelled as issue 15's.
const REPORT_TEXTS: [&str; 6] = [
    "Per-packet cost",
    "Throughput",
    "Memory",
    "Kubernetes",
    "Katran not measured: smoke scale",
    "(issue 15)",
];

#[test]
fn smoke_run_measures_every_part_and_writes_its_results() {
    if !require_root() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("xdplb-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut options = Options::new(Scale::Smoke);
    options.out_dir = dir.clone();
    let results = run(&options).expect("bench --smoke");

    // Per packet: every scenario in every setup, each run verified by the data path's counters.
    let p = results.perpacket.as_ref().expect("per-packet results");
    assert!(!p.setups.is_empty());
    for (i, setup) in p.setups.iter().enumerate() {
        let r = &setup.refs;
        for v in [r.empty, r.tx_only, r.floor, r.floor_vary] {
            assert!(v.is_finite() && v > 0.0, "{}: reference {v}", setup.label());
        }
        for s in Scenario::ALL {
            let row = p
                .row(i, s)
                .unwrap_or_else(|| panic!("{}: {} missing", setup.label(), s.name()));
            assert_eq!(
                row.verified,
                u64::from(row.repeat) * p.runs as u64,
                "{}: {}: every wrapper run must produce one verdict of the expected kind",
                setup.label(),
                s.name()
            );
            assert!(
                row.anomalies.is_empty(),
                "{}: {}: packets with another verdict: {:?}",
                setup.label(),
                s.name(),
                row.anomalies
            );
            assert_eq!(row.runs_ns.len(), p.runs);
            assert!(
                row.gross.is_finite() && row.gross > 0.0 && row.net.is_finite(),
                "{}: {}: {row:?}",
                setup.label(),
                s.name()
            );
        }
    }

    // Katran is never measured at smoke scale (no network, clang or 8M-entry LRUs needed in CI);
    // results.md says so (REPORT_TEXTS).
    assert!(
        matches!(p.katran, KatranOutcome::Skipped(_)),
        "{:?}",
        p.katran
    );

    check_throughput(&results);

    // Memory: what the kernel charges is at least what the entries hold (an array stores no
    // key: its index is the key).
    let m = results.memory.as_ref().expect("memory results");
    for e in &m.per_entry {
        let held = if e.kind.starts_with("array") {
            e.value_size
        } else {
            e.key_size + e.value_size
        };
        assert!(
            e.bytes >= f64::from(held),
            "{}: {} B per entry",
            e.map,
            e.bytes
        );
    }
    assert!(m.default_total() > 0);
    assert!(m.agent_rss_kb.is_some_and(|kb| kb > 0), "{:?}", m.left_out);

    check_kubernetes(&results);

    // Files a person reads.
    let md = std::fs::read_to_string(results.dir.join("results.md")).expect("results.md");
    for text in REPORT_TEXTS {
        assert!(md.contains(text), "results.md lacks {text}");
    }
    for svg in ["perpacket.svg", "throughput.svg"] {
        let text = std::fs::read_to_string(results.dir.join(svg)).expect(svg);
        assert!(text.starts_with("<svg") && text.contains("<rect"), "{svg}");
    }
    let latest = std::fs::read_to_string(dir.join("latest.md")).expect("latest.md");
    assert!(
        latest.contains("/perpacket.svg)"),
        "latest.md points into the run's directory"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Throughput: the generator's frames were counted where they arrived.
fn check_throughput(results: &lb_tests::bench::Results) {
    let t = results.throughput.as_ref().expect("throughput results");
    for path in [Path::XdpDrop, Path::XdpTx, Path::Lb { limiter: true }] {
        let m = t
            .peak(path, Mix::ManyFlows)
            .unwrap_or_else(|| panic!("{} not measured", path.name()));
        assert!(
            m.offered_pps > 0.0 && m.forwarded_pps > 0.0 && m.forwarded_pps <= m.offered_pps * 1.01,
            "{}: {m:?}",
            path.name()
        );
    }
    // The handoff path handed packets over (lb_uplink_tc redirected them), not the kernel.
    let handoff = t
        .peak(Path::Handoff, Mix::ManyFlows)
        .expect("the handoff path measured");
    let redirected = handoff
        .lb_counters
        .iter()
        .find(|(n, _)| n == "redirect_policy_hook")
        .map_or(0.0, |(_, v)| *v);
    assert!(
        handoff.forwarded_pps > 0.0 && redirected >= handoff.forwarded_pps * 0.9,
        "{handoff:?}"
    );
    // The netfilter path went through the kernel's forwarding (nft is a dependency the
    // project installs, so the path is there).
    let netfilter = t
        .peak(Path::Netfilter, Mix::ManyFlows)
        .expect("the netfilter path measured");
    let passed = netfilter
        .lb_counters
        .iter()
        .find(|(n, _)| n == "pass_netfilter")
        .map_or(0.0, |(_, v)| *v);
    assert!(
        netfilter.forwarded_pps > 0.0 && passed >= netfilter.forwarded_pps * 0.9,
        "{netfilter:?}"
    );
    let flood = t
        .peak(Path::Lb { limiter: true }, Mix::Flood)
        .expect("flood through xdplb");
    assert!(flood.absorbed_pps.is_some_and(|a| a > 0.0), "{flood:?}");
    match t.peak(Path::Nftables, Mix::ManyFlows) {
        Some(m) => assert!(m.forwarded_pps > 0.0, "{m:?}"),
        None => assert!(
            results.left_out.iter().any(|l| l.contains("nftables")),
            "the nftables path is neither measured nor reported as left out"
        ),
    }
}

/// Kubernetes: the agent started, every frontend reached the maps, every change was seen there,
/// the probes were answered, the process was measured.
fn check_kubernetes(results: &lb_tests::bench::Results) {
    let kube = results.kubernetes.as_ref().expect("kubernetes results");
    assert_eq!(kube.runs.len(), 1, "{:?}", kube.left_out);
    let r = &kube.runs[0];
    assert!(r.ready.is_some(), "/readyz never answered 200: {r:?}");
    assert!(
        r.converged.is_some(),
        "not every frontend reached the maps: {r:?}"
    );
    assert!(
        r.changes_lost == 0 && !r.changes.is_empty(),
        "endpoint changes not seen in the maps: {r:?}"
    );
    assert!(r.batch_converged.is_some(), "{r:?}");
    for w in r.worst_start.iter().chain(&r.worst_batch) {
        if w.path != "/metrics" {
            assert!(w.probes > 0 && w.worst.is_some(), "{w:?}");
        }
    }
    assert!(
        r.rss_kb > 0 && r.map_bytes > 0 && r.start_cpu_s > 0.0,
        "{r:?}"
    );
    assert!(r.idle_cpu_pct.is_finite() && r.idle_cpu_pct >= 0.0, "{r:?}");
    assert!(r.status_bytes > 0, "{r:?}");
    assert!(
        r.args.iter().any(|a| a == "--kubernetes") && r.args.iter().any(|a| a == "--keep-on-exit"),
        "the DaemonSet's args: {:?}",
        r.args
    );
}
