//! What a person reads: Markdown tables (also printed) and SVG plots, written to
//! `<out>/<UTC start time>/` with a copy of the Markdown as `<out>/latest.md`.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};

use super::{
    Results,
    memory::Memory,
    perpacket::{KatranOutcome, PerPacket, Scenario},
    svg::{Series, hbars},
    throughput::{AbPair, GEN_CPU, Mix, Path as TPath, Throughput, ratio},
};

fn f0(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "-".into()
    }
}

fn mpps(v: f64) -> String {
    format!("{:.2}", v / 1e6)
}

/// The setup whose numbers stand beside the targets: the first, the plan's reference (1 service
/// x 8 backends, snat, 100k flows in the table).
const REFERENCE_SETUP: usize = 0;

pub fn perpacket_tables(p: &PerPacket) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "### Per-packet cost against the targets\n");
    let measured = matches!(p.katran, KatranOutcome::Measured { .. });
    let _ = writeln!(
        s,
        "ns per packet net of the wrapper floor (median of {} runs). Issue 15's targets are ratios to Katran's cost on the same path; {} \"xdplb\": {}, the ratio and \"met?\" are taken there; \"median / worst\": xdplb over every setup.\n",
        p.runs,
        if measured {
            "\"Katran\" is measured in this run, in the same setup, behind the same wrapper, in the same rounds, net of the same floor."
        } else {
            "Katran could not be measured in this run (see below): \"Katran\" quotes issue 15's side-by-side measurement of 2026-12-02, which is not comparable run to run on this VM (absolute numbers move by up to 2x)."
        },
        p.setups
            .get(REFERENCE_SETUP)
            .map(super::perpacket::Setup::label)
            .unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "| scenario | target | Katran | xdplb | xdplb / Katran | met? | xdplb median / worst (setup) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for sc in Scenario::ALL {
        let Some(r) = p.row(REFERENCE_SETUP, sc) else {
            continue;
        };
        let all: Vec<f64> = p
            .rows
            .iter()
            .filter(|r| r.scenario == sc)
            .map(|r| r.net)
            .collect();
        let worst = p
            .rows
            .iter()
            .filter(|r| r.scenario == sc)
            .max_by(|a, b| a.net.total_cmp(&b.net));
        let spread = format!(
            "{} / {}",
            f0(super::median(&all)),
            worst
                .map(|w| format!("{} ({})", f0(w.net), p.setups[w.setup].label()))
                .unwrap_or_default()
        );
        let (katran, ratio, met) = match sc.katran_target() {
            Some((basis, x)) => {
                let k = katran_ns(p, basis);
                let paren = |v: String| if basis == sc { v } else { format!("({v})") };
                let k_s = k.map_or_else(
                    || "-".into(),
                    |(v, from_run)| {
                        paren(if from_run {
                            f0(v)
                        } else {
                            format!("{} (issue 15)", f0(v))
                        })
                    },
                );
                match k {
                    Some((v, from_run)) if v > 0.0 && r.net.is_finite() => {
                        let q = r.net / v;
                        // A figure from another sitting judges nothing: absolute numbers move
                        // by up to 2x between sittings on this VM.
                        let met = if !from_run {
                            "not judged (Katran not measured in this run)".to_string()
                        } else if q <= x {
                            "yes".to_string()
                        } else {
                            format!("no: {:.2}x the target", q / x)
                        };
                        (k_s, format!("{q:.2}"), met)
                    }
                    _ => (k_s, "-".into(), "-".into()),
                }
            }
            None => (String::new(), String::new(), String::new()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {katran} | {} | {ratio} | {met} | {spread} |",
            sc.name(),
            sc.target().unwrap_or_default(),
            f0(r.net),
        );
    }
    match &p.katran {
        KatranOutcome::Measured {
            source,
            lru_entries,
            prefilled,
            rows,
        } => {
            let _ = writeln!(
                s,
                "\nKatran: its XDP balancer ({source}), compiled with clang for the BPF target with its compile-time defaults (IPIP encapsulation), loaded by libbpf (bpftool); 1 VIP (TCP, port 80) with the reference service's address, the same 8 backends as reals, the VIP's consistent-hash ring (filled round robin), the gateway's MAC in ctl_array, one LRU of {lru_entries} entries per CPU in lru_mapping, {prefilled} flows in the measuring CPU's. Its runs are checked by its own stats map (N packets: N to the VIP path, N LRU misses of the expected kind, N counted for encapsulation, none through the fallback cache; for new flows, N new entries found in the LRU, then deleted so it keeps its fill; \"not for a VIP\": nothing reached its VIP path), and the last verdict. In parentheses: Katran has no limiter, its path without one is the basis.\n"
            );
            let _ = writeln!(s, "| Katran path | gross | floor | net | runs (ns) |");
            let _ = writeln!(s, "|---|---|---|---|---|");
            for r in rows {
                let mark = if r.anomalies.is_empty() { "" } else { " (!)" };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {}{mark} | {:.0?} |",
                    r.scenario.name(),
                    f0(r.gross),
                    f0(r.floor),
                    f0(r.net),
                    r.runs_ns
                );
            }
            for r in rows {
                for a in &r.anomalies {
                    let _ = writeln!(s, "\n(!) Katran, {}: {a}", r.scenario.name());
                }
            }
        }
        KatranOutcome::Unavailable(why) => {
            let _ = writeln!(s, "\nKatran could not be measured here: {why}");
        }
        KatranOutcome::Skipped(why) => {
            let _ = writeln!(s, "\nKatran not measured: {why}.");
        }
    }
    let _ = writeln!(
        s,
        "\n### Per-packet cost, every setup (ns, net of the floor)\n"
    );
    let mut header = String::from("| scenario |");
    let mut rule = String::from("|---|");
    for st in &p.setups {
        let _ = write!(header, " {} |", st.label());
        rule.push_str("---|");
    }
    let _ = writeln!(s, "{header}\n{rule}");
    for sc in Scenario::ALL {
        let mut line = format!("| {} |", sc.name());
        for i in 0..p.setups.len() {
            let v = p.row(i, sc).map_or_else(
                || "-".into(),
                |r| {
                    let mark = if r.anomalies.is_empty() { "" } else { " (!)" };
                    format!("{}{mark}", f0(r.net))
                },
            );
            let _ = write!(line, " {v} |");
        }
        let _ = writeln!(s, "{line}");
    }
    let mut miss = String::from("| limiter miss / its hit path |");
    for i in 0..p.setups.len() {
        let v = miss_ratio(p, i).map_or_else(|| "-".into(), |x| format!("{x:.2}x"));
        let _ = write!(miss, " {v} |");
    }
    let _ = writeln!(s, "{miss}");
    // The limiter's share: the same packets with it on less with it off.
    for (name, off, on) in [
        (
            "limiter's share, one flow (on - off)",
            Scenario::Established,
            Scenario::EstablishedLimiter,
        ),
        (
            "limiter's share, 16k flows / 1024 sources (on - off)",
            Scenario::ManyFlows,
            Scenario::ManyFlowsLimiter,
        ),
        (
            "limiter's share, 16k flows / 16k sources (on - off)",
            Scenario::ManySources,
            Scenario::ManySourcesLimiter,
        ),
    ] {
        let mut line = format!("| *{name}* |");
        for i in 0..p.setups.len() {
            let v = p
                .row(i, off)
                .zip(p.row(i, on))
                .map_or_else(|| "-".into(), |(a, b)| f0(b.net - a.net));
            let _ = write!(line, " {v} |");
        }
        let _ = writeln!(s, "{line}");
    }
    for (name, get) in [
        ("empty program (xdp_pass), absolute", 0usize),
        ("XDP_TX-only program, absolute", 1),
        ("floor: wrapper -> xdp_tx, absolute", 2),
        ("floor, varied frames, absolute", 3),
        ("bpf_fib_lookup alone, net", 4),
        ("40-byte LRU hash hit alone, net", 5),
        ("40-byte LRU hash insert (new key) alone, net", 6),
    ] {
        let mut line = format!("| *{name}* |");
        for st in &p.setups {
            let r = &st.refs;
            let v = [
                r.empty,
                r.tx_only,
                r.floor,
                r.floor_vary,
                r.fib_lookup,
                r.hash_lookup,
                r.hash_insert,
            ][get];
            let _ = write!(line, " {} |", f0(v));
        }
        let _ = writeln!(s, "{line}");
    }
    let anomalies: Vec<String> = p
        .rows
        .iter()
        .flat_map(|r| {
            r.anomalies.iter().map(move |a| {
                format!(
                    "- {}, {}: {a}",
                    p.setups[r.setup].label(),
                    r.scenario.name()
                )
            })
        })
        .collect();
    if anomalies.is_empty() {
        let _ = writeln!(
            s,
            "\nEvery packet of every timed run got the scenario's verdict (checked by counters)."
        );
    } else {
        let _ = writeln!(
            s,
            "\n(!) Runs where the data path gave some packets another verdict than the scenario's (the wrapper still ran exactly `repeat` times; the time is kept):\n"
        );
        for a in anomalies {
            let _ = writeln!(s, "{a}");
        }
    }
    let _ = writeln!(s, "\n### Setups\n");
    let _ = writeln!(
        s,
        "| setup | ring size | load + install services | flow-table entries added | time to add them | other load while measuring |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for st in &p.setups {
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} s | {} | {} | {:.0}% |",
            st.label(),
            st.config.ring_size,
            st.install_time.as_secs_f64(),
            st.prefilled,
            st.fill_time.map_or_else(
                || "-".into(),
                |t| format!(
                    "{:.2} s ({:.0} ns/entry)",
                    t.as_secs_f64(),
                    t.as_nanos() as f64 / f64::from(st.prefilled.max(1))
                )
            ),
            st.other_load
        );
    }
    s
}

/// Katran's net ns on `basis`: (value, measured in this run); else issue 15's constant.
fn katran_ns(p: &PerPacket, basis: Scenario) -> Option<(f64, bool)> {
    if matches!(p.katran, KatranOutcome::Measured { .. }) {
        return p.katran_row(basis).map(|r| (r.net, true));
    }
    basis.issue_katran_ns().map(|v| (v, false))
}

/// Limiter miss (new source) over its hit path (same SYN, known source).
pub fn miss_ratio(p: &PerPacket, setup: usize) -> Option<f64> {
    let miss = p.row(setup, Scenario::LimiterMiss)?.net;
    let hit = p.row(setup, Scenario::NewSynLimiter)?.net;
    (hit > 0.0).then(|| miss / hit)
}

pub fn throughput_tables(t: &Throughput) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Throughput (64-byte frames, counted at the receiver)\n"
    );
    let _ = writeln!(
        s,
        "| path | traffic | offered Mpps | absorbed Mpps | forwarded Mpps | cpu{GEN_CPU} softirq | cpu{GEN_CPU} busy | other load |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for m in t.measurements.iter().filter(|m| m.target_pps.is_none()) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.1}% | {:.1}% | {:.1}% |",
            m.path.name(),
            m.mix.name(),
            mpps(m.offered_pps),
            m.absorbed_pps.map_or_else(|| "-".into(), mpps),
            mpps(m.forwarded_pps),
            m.cpu.softirq,
            m.cpu.busy,
            m.cpu.user_all
        );
    }
    let lb = TPath::Lb { limiter: true };
    let lb_off = TPath::Lb { limiter: false };
    let fwd = |p, mix| t.peak(p, mix).map(|m| m.forwarded_pps);
    let abs = |p, mix| t.peak(p, mix).and_then(|m| m.absorbed_pps);
    let _ = writeln!(
        s,
        "\n### xdplb against nftables (same run, same topology)\n"
    );
    let _ = writeln!(s, "| comparison | ratio | target |");
    let _ = writeln!(s, "|---|---|---|");
    let r = |x: Option<f64>| x.map_or_else(|| "-".into(), |x| format!("{x:.2}x"));
    let _ = writeln!(
        s,
        "| forwarded, many flows: xdplb (limiter on) / nftables | {} | >= 4x |",
        r(ratio(
            fwd(lb, Mix::ManyFlows),
            fwd(TPath::Nftables, Mix::ManyFlows)
        ))
    );
    if t.peak(lb_off, Mix::ManyFlows).is_some() {
        let _ = writeln!(
            s,
            "| forwarded, many flows: xdplb (limiter off) / nftables | {} | >= 3x |",
            r(ratio(
                fwd(lb_off, Mix::ManyFlows),
                fwd(TPath::Nftables, Mix::ManyFlows)
            ))
        );
    }
    let _ = writeln!(
        s,
        "| absorbed, SYN flood: xdplb (limiter on) / nftables | {} | |",
        r(ratio(abs(lb, Mix::Flood), abs(TPath::Nftables, Mix::Flood)))
    );
    let _ = writeln!(
        s,
        "| forwarded, many flows: xdplb (limiter on) / XDP_TX floor | {} | |",
        r(ratio(
            fwd(lb, Mix::ManyFlows),
            fwd(TPath::XdpTx, Mix::ManyFlows)
        ))
    );
    // One CPU does everything at the peak: 1 / rate is its time per packet. Less the XDP_DROP
    // floor's (generator, veth, an uplink program), what remains is the path's own work plus
    // the receiver's (the same receiver for both).
    let floor = fwd(TPath::XdpDrop, Mix::ManyFlows).map(|r| 1e9 / r);
    let own = |p| fwd(p, Mix::ManyFlows).zip(floor).map(|(r, f)| 1e9 / r - f);
    if let (Some(a), Some(b)) = (own(lb), own(TPath::Nftables)) {
        let _ = writeln!(
            s,
            "| CPU ns per forwarded packet at the peak (1 / rate) less the XDP_DROP floor's: nftables {b:.0} ns / xdplb (limiter on) {a:.0} ns | {} | >= 4x |",
            r(Some(b / a))
        );
    }
    if let (Some(a), Some(b)) = (own(lb_off), own(TPath::Nftables)) {
        let _ = writeln!(
            s,
            "| same, nftables {b:.0} ns / xdplb (limiter off) {a:.0} ns | {} | >= 3x |",
            r(Some(b / a))
        );
    }
    if let (Some(a), Some(b)) = (own(lb), own(TPath::Handoff)) {
        let _ = writeln!(
            s,
            "| kernel delivery (handoff), limiter on: forwarded / redirect's; CPU ns per packet as above: handoff {b:.0} ns, redirect {a:.0} ns | {} | |",
            r(ratio(
                fwd(TPath::Handoff, Mix::ManyFlows),
                fwd(lb, Mix::ManyFlows)
            ))
        );
    }
    if let (Some(a), Some(b)) = (own(lb), own(TPath::Netfilter)) {
        let _ = writeln!(
            s,
            "| netfilter delivery (kernel forwarding, kube-proxy's rules loaded), limiter on: forwarded / redirect's; CPU ns per packet as above: netfilter {b:.0} ns, redirect {a:.0} ns | {} | |",
            r(ratio(
                fwd(TPath::Netfilter, Mix::ManyFlows),
                fwd(lb, Mix::ManyFlows)
            ))
        );
    }
    if let (Some(a), Some(b)) = (own(lb), own(lb_off)) {
        let _ = writeln!(
            s,
            "| the limiter's cost across paths (two topologies, minutes apart): CPU ns per packet as above, limiter on {a:.0} ns less off {b:.0} ns | {:.0} ns | |",
            a - b
        );
    }
    if !t.limiter_ab.is_empty() {
        let costs: Vec<f64> = t.limiter_ab.iter().map(AbPair::cost_ns).collect();
        let pairs: Vec<String> = t
            .limiter_ab
            .iter()
            .map(|p| format!("{:.2} / {:.2}", p.off_pps / 1e6, p.on_pps / 1e6))
            .collect();
        let each: Vec<String> = costs.iter().map(|c| format!("{c:.0}")).collect();
        let _ = writeln!(
            s,
            "| the limiter's cost, A/B on the limiter-on path's topology (the same flows and sources, the limiter turned off and on between peak measurements, which goes first alternating): 1 / rate(on) - 1 / rate(off), median of {} pairs (Mpps off / on: {}; ns each: {}) | {:.0} ns | near the per-packet bench's |",
            costs.len(),
            pairs.join(", "),
            each.join(", "),
            super::median(&costs)
        );
    }
    if !t.fixed_loads.is_empty() {
        let _ = writeln!(
            s,
            "\n### CPU at fixed offered loads (many flows; softirq share of cpu{GEN_CPU}, where the node's work runs)\n"
        );
        let _ = writeln!(
            s,
            "| offered | xdplb: achieved Mpps | xdplb softirq | nftables: achieved Mpps | nftables softirq | other load (xdplb / nft) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for &load in &t.fixed_loads {
            let at = |p: TPath| {
                t.measurements
                    .iter()
                    .find(|m| m.path == p && m.target_pps == Some(load))
            };
            let (a, b) = (at(lb), at(TPath::Nftables));
            let cell = |m: Option<&super::throughput::Measurement>| {
                m.map_or(("-".into(), "-".into()), |m| {
                    (mpps(m.forwarded_pps), format!("{:.1}%", m.cpu.softirq))
                })
            };
            let (af, asi) = cell(a);
            let (bf, bsi) = cell(b);
            let other = format!(
                "{} / {}",
                a.map_or_else(|| "-".into(), |m| format!("{:.0}%", m.cpu.user_all)),
                b.map_or_else(|| "-".into(), |m| format!("{:.0}%", m.cpu.user_all))
            );
            let _ = writeln!(
                s,
                "| {:.2} Mpps | {af} | {asi} | {bf} | {bsi} | {other} |",
                load / 1e6
            );
        }
    }
    let counters = |m: &super::throughput::Measurement| {
        m.lb_counters
            .iter()
            .map(|(n, v)| format!("{n} {}", mpps_or_k(*v)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(m) = t.peak(lb, Mix::Flood) {
        let _ = writeln!(s, "\nxdplb under the flood (per second): {}", counters(m));
    }
    if let Some(m) = t.peak(lb_off, Mix::Flood) {
        let _ = writeln!(
            s,
            "\nxdplb under the flood, limiter off (per second): {}",
            counters(m)
        );
    }
    if let Some(m) = t.peak(TPath::Handoff, Mix::ManyFlows) {
        let _ = writeln!(
            s,
            "\nxdplb with the handoff, many flows (per second; every packet handed over is counted by pass_policy_hook in lb_uplink and redirect_policy_hook in lb_uplink_tc): {}",
            counters(m)
        );
    }
    if let Some(m) = t.peak(TPath::Netfilter, Mix::ManyFlows) {
        let _ = writeln!(
            s,
            "\nxdplb with netfilter delivery, many flows (per second; every packet passed to the kernel's forwarding is counted by pass_netfilter): {}",
            counters(m)
        );
    }
    s
}

fn mpps_or_k(v: f64) -> String {
    if v >= 1e5 {
        format!("{:.2}M", v / 1e6)
    } else {
        format!("{:.1}k", v / 1e3)
    }
}

pub fn memory_tables(m: &Memory) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "### Memory per entry\n");
    let _ = writeln!(
        s,
        "| map | type | key + value | kernel charge per entry (memlock slope {}..{} entries) |",
        m.per_entry.first().map_or(0, |p| p.sizes.0),
        m.per_entry.first().map_or(0, |p| p.sizes.1)
    );
    let _ = writeln!(s, "|---|---|---|---|");
    for p in &m.per_entry {
        let what = match p.map {
            lb_common::MAP_FLOWS4 => {
                "IPv4 flow-table entry (one per snat flow, two per flow keeping the client's address)"
            }
            lb_common::MAP_FLOWS6 => "IPv6 flow-table entry (as IPv4)",
            lb_common::MAP_CLAIMS4 => {
                "IPv4 claim slot (a snat flow's reply entry; as many slots as flow-table entries)"
            }
            lb_common::MAP_CLAIMS6 => "IPv6 claim slot (as IPv4)",
            lb_common::MAP_SOURCES => "tracked source (rate limiter)",
            lb_common::MAP_SOURCE_TAGS => "a tracked source's tag",
            _ => "",
        };
        let _ = writeln!(
            s,
            "| {} ({what}) | {} | {} + {} B | {:.0} B |",
            p.map, p.kind, p.key_size, p.value_size, p.bytes
        );
    }
    let charge = |map: &str| m.per_entry.iter().find(|p| p.map == map).map(|p| p.bytes);
    if let (Some(b), Some(c)) = (
        charge(lb_common::MAP_FLOWS4),
        charge(lb_common::MAP_CLAIMS4),
    ) {
        let _ = writeln!(
            s,
            "\n**Per flow** (IPv4, both directions): a snat flow {:.0} B (its flow-table entry and a claim slot), a flow keeping the client's address {:.0} B (two entries) (target <= 200 B).",
            b + c,
            2.0 * b
        );
    }
    if let Some(b) = charge(lb_common::MAP_SOURCES) {
        let _ = writeln!(
            s,
            "**Per tracked source**: {:.0} B, and its 4-byte tag in {} (target <= 64 B).",
            b,
            lb_common::MAP_SOURCE_TAGS
        );
    }
    if let Some(b) = m.meminfo_flow_bytes {
        let _ = writeln!(
            s,
            "\nCross-check: VmallocUsed grew by {b:.0} B per flow-table entry creating a {}-entry table (against 65536).",
            m.meminfo_entries
        );
    }
    let _ = writeln!(
        s,
        "\n### Map memory at default sizes ({} services, {} backends, ring {}, {} flow entries, {} sources, {} affinity entries)\n",
        m.default_sizes.max_services,
        m.default_sizes.max_backends,
        m.default_sizes.ring_size,
        m.default_sizes.flow_entries,
        m.default_sizes.source_entries,
        m.default_sizes.affinity_entries
    );
    let _ = writeln!(s, "| map | max entries | key / value B | memlock |");
    let _ = writeln!(s, "|---|---|---|---|");
    for mm in &m.default_maps {
        let _ = writeln!(
            s,
            "| {} | {} | {} / {} | {} |",
            mm.name,
            mm.max_entries,
            mm.key_size,
            mm.value_size,
            human_bytes(mm.memlock)
        );
    }
    let _ = writeln!(
        s,
        "| **total** | | | **{}** |",
        human_bytes(m.default_total())
    );
    let _ = writeln!(
        s,
        "\nLB_PREFIXES is an LPM trie: not preallocated, it is charged per prefix inserted (none here). LB_RINGS holds 256 slots per --max-services and 192 per --max-backends (each ring is sized from its backends), 8 B each (the kernel stores a 4 B array value in 8 B)."
    );
    match (m.agent_rss_kb, m.agent_hwm_kb) {
        (Some(rss), Some(hwm)) => {
            let _ = writeln!(
                s,
                "\nAgent: VmRSS {:.1} MiB (peak VmHWM {:.1} MiB); {}.",
                rss as f64 / 1024.0,
                hwm as f64 / 1024.0,
                m.agent_note
            );
        }
        _ => {
            let _ = writeln!(s, "\nAgent RSS: not measured (see left out).");
        }
    }
    s
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
    } else if b >= 1 << 10 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// Writes `results.md` and the plots into `results.dir`, and `latest.md` into `out`.
pub fn write(results: &Results, out: &Path) -> Result<()> {
    let dir = &results.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut md = String::new();
    let m = &results.machine;
    let _ = writeln!(md, "# xdplb benchmarks, {}\n", m.date);
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| machine | {} ({} CPUs) |", m.cpu_model, m.cpus);
    let _ = writeln!(md, "| kernel | {} |", m.kernel);
    let _ = writeln!(md, "| commit | {} |", m.commit);
    let _ = writeln!(md, "| date | {} |", m.date);
    let _ = writeln!(
        md,
        "| scale | {} (`bench{}`) |",
        results.scale.name(),
        match results.scale {
            super::Scale::Default => String::new(),
            s => format!(" --{}", s.name()),
        }
    );
    let _ = writeln!(md, "| run time | {:.0} s |", results.elapsed.as_secs_f64());
    let _ = writeln!(
        md,
        "| kernel.bpf_stats_enabled | {} |",
        if super::BpfStatsOff::is_off() {
            "0"
        } else {
            "1 (timing inflated)"
        }
    );
    let mut plots: Vec<(&str, String)> = Vec::new();

    if let Some(p) = &results.perpacket {
        let _ = writeln!(md, "\n## 1. Per-packet cost (BPF_PROG_TEST_RUN)\n");
        let _ = writeln!(md, "{}", perpacket_method(p));
        let _ = writeln!(md, "{}", perpacket_tables(p));
        let _ = writeln!(md, "![ns per packet](perpacket.svg)\n");
        plots.push(("perpacket.svg", perpacket_svg(p)));
    }
    if let Some(t) = &results.throughput {
        let _ = writeln!(md, "\n## 2. Throughput over veth, side by side\n");
        let _ = writeln!(md, "{}", throughput_method(t));
        let _ = writeln!(md, "{}", throughput_tables(t));
        let _ = writeln!(md, "![Mpps per path](throughput.svg)\n");
        plots.push(("throughput.svg", throughput_svg(t)));
        if !t.fixed_loads.is_empty() {
            let _ = writeln!(md, "![softirq at fixed loads](cpu.svg)\n");
            plots.push(("cpu.svg", cpu_svg(t)));
        }
    }
    if let Some(mem) = &results.memory {
        let _ = writeln!(md, "\n## 3. Memory\n");
        let _ = writeln!(
            md,
            "Kernel charge per map from `memlock:` in /proc/self/fdinfo (the map's own memory accounting; hash maps are preallocated, so a table costs its full size from creation). Per-entry cost is the slope between two table sizes; VmallocUsed around a large table cross-checks it. The agent's RSS is VmRSS of a real `lb-agent run` in a namespace of its own.\n"
        );
        let _ = writeln!(md, "{}", memory_tables(mem));
    }
    if let Some(k) = &results.kubernetes {
        let _ = writeln!(md, "\n## 4. Kubernetes at cluster size\n");
        let _ = writeln!(md, "{}", super::kubernetes::method());
        let _ = writeln!(md, "{}", super::kubernetes::tables(k));
    }
    if !results.left_out.is_empty() {
        let _ = writeln!(md, "\n## Left out\n");
        for l in &results.left_out {
            let _ = writeln!(md, "- {l}");
        }
    }
    for (name, svg) in &plots {
        std::fs::write(dir.join(name), svg)?;
    }
    std::fs::write(dir.join("results.md"), &md)?;
    // latest.md sits one level up: point its images into the run's directory.
    let rel = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut latest = md.clone();
    for (name, _) in &plots {
        latest = latest.replace(&format!("]({name})"), &format!("]({rel}/{name})"));
    }
    std::fs::write(out.join("latest.md"), latest)?;
    Ok(())
}

fn perpacket_method(p: &PerPacket) -> String {
    format!(
        "Method: the data path (`lb_uplink`, loaded by the agent's loader, services installed by the agent's reconciler, snat mode, backends behind a gateway so forwarded packets leave by XDP_TX) runs under a wrapper XDP program (`bench_wrap` in lb-tools) that restores the 64-byte frame from a template map on every iteration (BPF_PROG_TEST_RUN with `repeat > 1` would otherwise rerun the program on the frame it already rewrote), varies the source address / port from a per-CPU sequence where a scenario needs a new flow or a new source every packet, and tail-calls the data path through a program array of its own. The floor is the same wrapper, with the same variation, tail-calling an XDP_TX-only program; it is measured before and after the scenarios of each setup and subtracted. Every run is checked: the wrapper's sequence advanced by exactly `repeat`, the data path's `packets` counter too, and the scenario's verdict counter (xdp_tx, flows_created, flows_created_midstream, sources_created, pass_not_ours) by exactly `repeat` (drop_rate: `repeat` or one less, a 1 packet/s bucket may refill once). Values are the kernel's own ns per run; median of {runs} runs of repeat = {repeat} ({new_repeat} for scenarios that create a flow every packet: their flows and sources are deleted after each run, so the table keeps its fill and snat source ports stay free); the measuring thread is pinned to CPU {cpu}; kernel.bpf_stats_enabled = 0. Services: 10 per VIP (LB_ADDRS holds 4096 addresses), 10 or 1000 backends each, packets to the middle service; rings of up to 16381 slots up to 100 services, 1021 for 10k services (each sized from its backends, in one array). Flow table: 2^21 entries in every setup, empty or with 1M entries added from user space. Limiter scenarios use a policy no packet exceeds (10M/s, burst 1e9) so the limiter runs and admits; the rate-limited drop uses 1 packet/s. Frames are IPv4, 64 bytes; the wrapper updates the IPv4 and TCP checksums of varied frames incrementally. Caches are warm: the same service and, for established flows, the same flow every packet; except in the many-flows scenarios: 16384 established flows (opened by the data path, a SYN each, with the limiter on) taking turns packet by packet, from 1024 sources (the throughput part's mix) or from 16384, measured with the limiter off and on in the same rounds (the service's policy turned off and on between runs; an established flow follows it), so on less off is the limiter's share with its sources out of the closest caches; each run is checked to have moved the bucket of its first packet's source with the limiter on and left it with it off. A program under test that moves the frame's start (Katran's IPIP encapsulation pushes 20 bytes in front) gets it moved back by the wrapper before the next iteration; the floor runs the same code. Katran runs in the reference setup's limiter-off phase, in the same rounds as xdplb (which of the two goes first alternates round by round), with the same frames and repeats, net of the same floors.\n",
        runs = p.runs,
        repeat = p.repeat,
        new_repeat = p.new_flow_repeat,
        cpu = p.cpu,
    )
}

fn throughput_method(t: &Throughput) -> String {
    format!(
        "Method: three namespaces made for the run: the generator's `g0` - `up0` on the node (10.0.0.1/16) - the node's `be0` - `rcv0` in the receiver's namespace (which holds the 10 backend addresses; `xdp_sink` there counts and drops). {generator}, 64-byte TCP frames, \"many flows\" = 16384 flows from 1024 sources round robin (ACKs: established after a warm-up), \"flood\" = a SYN from a new source address every packet, timed after {lead} s of it (a sustained flood: the tables it fills are full). Counted where the frames arrive: \"absorbed\" at the node's uplink program (the data path's `packets` counter, or `xdp_count` in front of the kernel path), \"forwarded\" by `xdp_sink` on rcv0 (for the XDP_DROP floor: at up0; for XDP_TX: back on g0). Paths, each on a fresh topology: XDP_DROP and XDP_TX floors; xdplb (`lb_uplink` on up0, snat, 10 backends, redirect to be0); the kernel path users run today: kube-proxy's nftables-mode rules for the same service and backends (table `ip kube-proxy`, service-ips vmap, `numgen random mod 10` over endpoint chains with `dnat to`, masquerade for sources outside the pod CIDR, the filter chains as kube-proxy adds them) with kernel forwarding ({nft}, nf_conntrack_max {ct}). The limiter policy for xdplb: 100k packets/s and 1000 connections/s per source, fail-closed overflow bucket. The limiter's A/B: on the limiter-on path's topology, after its other many-flows measurements, peaks alternately with the service's policy off and on (the same flows and tracked sources; which goes first alternates pair by pair); the cost is 1 / rate(on) - 1 / rate(off) per pair, since one CPU does all the work at the peak. {secs} s per measurement. The generator runs on CPU {cpu} (two threads taking turns); veth runs the node's and the receiver's softirq work on the sending CPU, so the generator, the node and the receiver share CPU {cpu} and the peak is what one CPU does for all three: the ratio between paths understates the node's own difference (the generator's share is the same for every path). CPU shares come from /proc/stat (tick-sampled). \"Other load\" is the user-space share of the whole machine during the measurement: nothing of the benchmark runs in user space, so it is someone else's work competing for the CPUs; compare paths within one run.\n",
        generator = if t.live_frames {
            "The generator is `bench_gen` (lb-tools) run with BPF_PROG_RUN in live-frames mode: every frame it returns XDP_TX leaves g0 for up0; it restores and varies each frame itself (IPv4 and TCP checksums updated; each live-frames run spends ~24 ms of wall time setting up and tearing down its page pool, hence two threads)"
        } else {
            "**This kernel refuses BPF_PROG_RUN's live-frames mode (EPERM)**, so the generator is a packet socket on g0 (`SocketGen` in tests/src/bench/tools.rs: the frames `bench_gen` would make, made in user space, 64 per sendmmsg, past the qdisc): it costs more CPU per frame than `bench_gen`, on the CPU the node and the receiver share, so peaks are lower and closer together than with live frames, and may be the generator's own limit"
        },
        nft = t.nft_version.as_deref().unwrap_or("nft unavailable"),
        ct = t.conntrack_max.as_deref().unwrap_or("?"),
        secs = t.seconds,
        lead = t.seconds * super::throughput::FLOOD_LEAD,
        cpu = GEN_CPU,
    )
}

fn perpacket_svg(p: &PerPacket) -> String {
    // Three setups at most: the reference, and the largest with and without a full table.
    let mut picks = vec![REFERENCE_SETUP];
    let last = p.setups.len().saturating_sub(1);
    if last > 0 {
        if last >= 1 && !picks.contains(&(last - 1)) && p.setups.len() > 2 {
            picks.push(last - 1);
        }
        picks.push(last);
    }
    let categories: Vec<String> = Scenario::ALL
        .iter()
        .map(|s| match s.target() {
            Some(t) => format!("{} (target {t})", s.short()),
            None => s.short().to_string(),
        })
        .collect();
    let series: Vec<Series> = picks
        .iter()
        .map(|&i| Series {
            name: p.setups[i].label(),
            values: Scenario::ALL
                .iter()
                .map(|sc| p.row(i, *sc).map(|r| r.net))
                .collect(),
        })
        .collect();
    hbars(
        "xdplb: ns per packet, net of the wrapper floor",
        "ns per packet (BPF_PROG_TEST_RUN, median)",
        &categories,
        &series,
        &[format!(
            "floor (wrapper -> XDP_TX) subtracted: {:.0} ns; empty program {:.0} ns",
            p.setups
                .get(REFERENCE_SETUP)
                .map_or(f64::NAN, |s| s.refs.floor),
            p.setups
                .get(REFERENCE_SETUP)
                .map_or(f64::NAN, |s| s.refs.empty)
        )],
    )
}

fn throughput_svg(t: &Throughput) -> String {
    let paths = [
        TPath::XdpDrop,
        TPath::XdpTx,
        TPath::Lb { limiter: false },
        TPath::Lb { limiter: true },
        TPath::Handoff,
        TPath::Netfilter,
        TPath::Nftables,
    ];
    let present: Vec<TPath> = paths
        .into_iter()
        .filter(|p| t.peak(*p, Mix::ManyFlows).is_some())
        .collect();
    let categories: Vec<String> = present.iter().map(|p| p.short().to_string()).collect();
    let series = vec![
        Series {
            name: "many flows: forwarded".into(),
            values: present
                .iter()
                .map(|p| t.peak(*p, Mix::ManyFlows).map(|m| m.forwarded_pps / 1e6))
                .collect(),
        },
        Series {
            name: "SYN flood: absorbed".into(),
            values: present
                .iter()
                .map(|p| {
                    t.peak(*p, Mix::Flood)
                        .and_then(|m| m.absorbed_pps.map(|a| a / 1e6))
                })
                .collect(),
        },
        Series {
            name: "SYN flood: forwarded".into(),
            values: present
                .iter()
                .map(|p| t.peak(*p, Mix::Flood).map(|m| m.forwarded_pps / 1e6))
                .collect(),
        },
    ];
    hbars(
        "Peak Mpps over veth (generator, node and receiver share one CPU)",
        "Mpps (64-byte frames, counted at the receiver)",
        &categories,
        &series,
        &["The flood's forwarded share is what the limiter admits (xdplb) or conntrack takes (nftables).".into()],
    )
}

fn cpu_svg(t: &Throughput) -> String {
    let categories: Vec<String> = t
        .fixed_loads
        .iter()
        .map(|l| format!("{:.2} Mpps offered", l / 1e6))
        .collect();
    let series = [TPath::Lb { limiter: true }, TPath::Nftables]
        .iter()
        .map(|p| Series {
            name: format!("{} softirq %", p.short()),
            values: t
                .fixed_loads
                .iter()
                .map(|l| {
                    t.measurements
                        .iter()
                        .find(|m| m.path == *p && m.target_pps == Some(*l))
                        .map(|m| m.cpu.softirq)
                })
                .collect(),
        })
        .collect::<Vec<_>>();
    hbars(
        &format!("Softirq share of cpu{GEN_CPU} at fixed loads (many flows)"),
        "percent of the CPU",
        &categories,
        &series,
        &[
            "Where a path cannot reach the offered load, it runs at its peak (see the table)."
                .into(),
        ],
    )
}
