//! Metrics tests: negotiation, both formats valid (the text format through `promtool check
//! metrics`, OpenMetrics through a strict parser of its grammar), and the figures where they
//! belong.
use std::{collections::BTreeMap, io::Write as _, process::Command};

use prometheus_client::metrics::histogram::exponential_buckets;

use super::*;
use crate::{
    health::Health,
    model::{Frontend, Mode, Protocol},
    state::{InterfaceLabel, ServiceLabel},
    view::{BackendView, ServiceView},
};

#[test]
fn the_scrapers_accept_header_picks_the_format() {
    // Prometheus' default, and with OpenMetrics enabled (2.x).
    assert_eq!(
        negotiate(Some("text/plain;version=0.0.4;q=1,*/*;q=0.1")),
        Format::Text
    );
    assert_eq!(
        negotiate(Some(
            "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
        )),
        Format::OpenMetrics
    );
    assert_eq!(negotiate(Some("text/plain;version=0.0.4")), Format::Text);
    assert_eq!(negotiate(None), Format::Text, "curl without -H");
    assert_eq!(negotiate(Some("*/*")), Format::Text);
    assert_eq!(
        negotiate(Some("application/openmetrics-text; version=1.0.0")),
        Format::OpenMetrics
    );
    assert_eq!(
        negotiate(Some(
            "application/openmetrics-text;q=0.2, text/plain;version=0.0.4;q=0.9"
        )),
        Format::Text,
        "text preferred"
    );
    assert_eq!(
        negotiate(Some("application/openmetrics-text;q=0")),
        Format::Text,
        "q=0: not acceptable"
    );
}

fn view() -> AgentView {
    let label = |name: &str, port| ServiceLabel {
        frontend: Frontend {
            vip: "10.96.0.10".parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        },
        name: name.into(),
        origin: "lb.toml:3".into(),
        mode: Mode::Snat,
        policy: None,
        draining: Vec::new(),
        source_ranges: crate::model::SourceRanges::default(),
        zones: crate::state::ZoneLabel::default(),
    };
    AgentView {
        health: Health {
            ready: true,
            reloads_applied: 3,
            flow_entries: 12,
            kubernetes: Some(KubeHealth {
                synced: true,
                watch_events: 9,
                ..KubeHealth::default()
            }),
            ..Health::default()
        },
        inputs: "config lb.toml".into(),
        services: vec![
            ServiceView::new(
                label("web \"main\"", 80),
                0,
                vec![
                    BackendView {
                        addr: "10.1.1.2".parse().unwrap(),
                        port: 8080,
                        id: 0,
                        weight: 1,
                    },
                    BackendView {
                        addr: "10.1.1.3".parse().unwrap(),
                        port: 8080,
                        id: 1,
                        weight: 0,
                    },
                ],
            ),
            ServiceView::new(label("dns", 53), 1, Vec::new()),
        ]
        .into_iter()
        .map(std::sync::Arc::new)
        .collect::<Vec<_>>()
        .into(),
        interfaces: vec![
            InterfaceLabel {
                name: "eth0".into(),
                ifindex: 2,
                program: "lb_uplink".into(),
                hook: "xdp-native".into(),
                note: None,
                delivery: None,
                delivery_reason: None,
            },
            InterfaceLabel {
                name: "eni1234".into(),
                ifindex: 3,
                program: "lb_backend".into(),
                hook: "tcx".into(),
                note: None,
                delivery: Some("kernel".into()),
                delivery_reason: Some("tc egress filter u32 pref 1".into()),
            },
        ],
        policies: BTreeMap::new(),
        sizes: crate::dataplane::Sizes::default(),
        zone: None,
    }
}

fn figures() -> Figures {
    let mut web = ServiceStats {
        packets: 100,
        bytes: 6400,
        new_flows: 7,
        ..ServiceStats::default()
    };
    web.drops[DropReason::NoBackend as usize] = 2;
    Figures {
        counters: vec![(Counter::Packets, 1000), (Counter::DropNoService, 4)],
        services: vec![
            (
                web,
                vec![
                    BackendStats {
                        packets: 60,
                        bytes: 3000,
                        new_flows: 5,
                    },
                    BackendStats::default(),
                ],
            ),
            (ServiceStats::default(), Vec::new()),
        ],
        backends_omitted: 0,
    }
}

fn latency() -> Histogram {
    let h = Histogram::new(exponential_buckets(0.001, 2.0, 4));
    h.observe(0.003);
    h.observe(5.0);
    h
}

#[test]
fn figures_land_under_their_names_in_both_formats() {
    for format in [Format::OpenMetrics, Format::Text] {
        let out = render(&view(), &figures(), Some(&latency()), format);
        for line in [
            "xdplb_datapath_events_total{event=\"packets\"} 1000",
            "xdplb_service_packets_total{service=\"web \\\"main\\\"\",frontend=\"10.96.0.10:80/tcp\",direction=\"to_backend\"} 100",
            "xdplb_service_drops_total{service=\"web \\\"main\\\"\",frontend=\"10.96.0.10:80/tcp\",reason=\"no_backend\"} 2",
            "xdplb_service_dropped_packets_total{service=\"web \\\"main\\\"\",frontend=\"10.96.0.10:80/tcp\"} 2",
            "xdplb_service_dropped_packets_total{service=\"dns\",frontend=\"10.96.0.10:53/tcp\"} 0",
            "xdplb_backend_new_flows_total{service=\"web \\\"main\\\"\",frontend=\"10.96.0.10:80/tcp\",backend=\"10.1.1.2:8080\"} 5",
            "xdplb_backend_weight{service=\"web \\\"main\\\"\",frontend=\"10.96.0.10:80/tcp\",backend=\"10.1.1.3:8080\"} 0",
            "xdplb_interface_attached{interface=\"eth0\",program=\"lb_uplink\",hook=\"xdp-native\"} 1",
            "xdplb_interface_delivery{interface=\"eni1234\",delivery=\"kernel\"} 1",
            "xdplb_table_entries{table=\"flows\"} 12",
            "xdplb_kubernetes_watch_events_total 9",
            "xdplb_kubernetes_sync_latency_seconds_count 2",
        ] {
            assert!(
                out.lines().any(|l| l == line),
                "{format:?}: no line {line}\n{out}"
            );
        }
    }
}

#[test]
fn drop_reasons_that_dropped_nothing_have_no_series_per_frontend() {
    for format in [Format::OpenMetrics, Format::Text] {
        let out = render(&view(), &figures(), None, format);
        let drops: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("xdplb_service_drops_total{"))
            .collect();
        assert_eq!(
            drops.len(),
            1,
            "{format:?}: only web's no_backend: {drops:?}"
        );
        assert!(drops[0].contains("reason=\"no_backend\""), "{drops:?}");
    }
}

#[test]
fn the_text_format_passes_promtool() {
    let out = render(&view(), &figures(), Some(&latency()), Format::Text);
    assert!(!out.contains("# EOF") && !out.contains("# UNIT"));
    assert!(out.contains("# HELP xdplb_datapath_events_total "));
    assert!(out.contains("# TYPE xdplb_datapath_events_total counter\n"));
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing (Debian package prometheus)"
        );
        eprintln!("promtool not installed (Debian package prometheus): not checked");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(out.as_bytes())
        .unwrap();
    let result = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    // promtool's lint also fails on style (it exits 1 for problems of either kind).
    assert!(
        result.status.success(),
        "promtool check metrics: {said}\n{out}"
    );
    assert!(said.trim().is_empty(), "promtool: {said}");
}

#[test]
fn openmetrics_passes_a_strict_parse() {
    let out = render(&view(), &figures(), Some(&latency()), Format::OpenMetrics);
    if let Err(e) = strict_openmetrics(&out) {
        panic!("{e}\n{out}");
    }
    // And the checker catches what the text format does differently.
    let text = render(&view(), &figures(), None, Format::Text);
    assert!(strict_openmetrics(&text).is_err());
    assert!(
        strict_openmetrics("# TYPE a counter\na 1\n# EOF\n")
            .unwrap_err()
            .contains('a')
    );
    assert!(
        strict_openmetrics("# TYPE a gauge\na 1\n").is_err(),
        "no EOF"
    );
    assert!(
        strict_openmetrics("# TYPE a gauge\na{x=\"1\",x=\"2\"} 1\n# EOF\n").is_err(),
        "label twice"
    );
}

/// Checks OpenMetrics 1.0 text: every sample in a declared family, named as its type requires,
/// families whole and declared once, metadata before samples, labels well formed and unique,
/// values numbers, counters not negative, histograms cumulative with a +Inf bucket equal to
/// their count, and `# EOF` last.
#[expect(clippy::too_many_lines, reason = "one grammar, read top to bottom")]
fn strict_openmetrics(text: &str) -> Result<(), String> {
    let mut lines: Vec<&str> = text.split('\n').collect();
    if lines.pop() != Some("") || lines.pop() != Some("# EOF") {
        return Err("must end with \"# EOF\\n\"".into());
    }
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    let mut seen_samples = false;
    // The histogram being read (one label set per family here): its buckets and count.
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let mut count: Option<f64> = None;
    let histogram_done = |buckets: &mut Vec<(f64, f64)>, count: &mut Option<f64>| {
        let result = match (buckets.last(), *count) {
            (None, None) => Ok(()),
            // Counts are whole numbers, exact in an f64.
            (Some((le, v)), Some(c)) if le.is_infinite() && (*v - c).abs() < 0.5 => Ok(()),
            _ => Err("histogram without a +Inf bucket equal to its count".to_string()),
        };
        buckets.clear();
        *count = None;
        result
    };
    for (n, line) in lines.iter().enumerate() {
        let at = |m: String| format!("line {}: {m}: {line}", n + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let value = parts.next().unwrap_or("");
            if !valid_name(name) {
                return Err(at("bad metric name".into()));
            }
            let same = current.as_ref().is_some_and(|(f, _)| f == name);
            if !same {
                histogram_done(&mut buckets, &mut count).map_err(&at)?;
                if families.contains_key(name) {
                    return Err(at(
                        "family declared twice (families must not interleave)".into()
                    ));
                }
                families.insert(name.to_string(), "unknown".into());
                current = Some((name.to_string(), "unknown".into()));
                seen_samples = false;
            } else if seen_samples {
                return Err(at("metadata after samples".into()));
            }
            match kw {
                "TYPE" => {
                    let kinds = [
                        "counter",
                        "gauge",
                        "histogram",
                        "gaugehistogram",
                        "stateset",
                        "info",
                        "summary",
                        "unknown",
                    ];
                    if !kinds.contains(&value) {
                        return Err(at("unknown type".into()));
                    }
                    families.insert(name.to_string(), value.into());
                    current = Some((name.to_string(), value.into()));
                }
                "HELP" | "UNIT" => {}
                _ => return Err(at("unknown metadata keyword".into())),
            }
            continue;
        }
        let Some((family, kind)) = current.clone() else {
            return Err(at("sample before any family".into()));
        };
        seen_samples = true;
        let (name, labels, value) = parse_sample(line).map_err(&at)?;
        let suffix = name
            .strip_prefix(family.as_str())
            .ok_or_else(|| at(format!("sample not in its family {family}")))?;
        let allowed: &[&str] = match kind.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "gauge" | "unknown" => &[""],
            _ => &[
                "", "_total", "_bucket", "_sum", "_count", "_created", "_info",
            ],
        };
        if !allowed.contains(&suffix) {
            return Err(at(format!("a {kind} sample cannot be named {name}")));
        }
        if kind == "counter" && value < 0.0 {
            return Err(at("negative counter".into()));
        }
        if kind == "histogram" {
            match suffix {
                "_bucket" => {
                    let le = labels
                        .iter()
                        .find(|(k, _)| k == "le")
                        .ok_or_else(|| at("bucket without le".into()))?;
                    let le: f64 = if le.1 == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.1.parse().map_err(|_| at("bad le".into()))?
                    };
                    if let Some((prev_le, prev)) = buckets.last()
                        && (le <= *prev_le || value < *prev)
                    {
                        return Err(at("buckets not increasing and cumulative".into()));
                    }
                    buckets.push((le, value));
                }
                "_count" => count = Some(value),
                _ => {}
            }
        }
    }
    histogram_done(&mut buckets, &mut count)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

type Sample = (String, Vec<(String, String)>, f64);

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| "no value".to_string())?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err("bad metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels: Vec<(String, String)> = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut s = inner;
        loop {
            if let Some(after) = s.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = s.find('=').ok_or("label without =")?;
            let key = &s[..eq];
            if !valid_name(key) || key.contains(':') {
                return Err(format!("bad label name {key}"));
            }
            s = s[eq + 1..]
                .strip_prefix('"')
                .ok_or("unquoted label value")?;
            let mut value = String::new();
            let mut chars = s.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        _ => return Err("bad escape in label value".into()),
                    },
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            };
            if labels.iter().any(|(k, _)| k == key) {
                return Err(format!("label {key} twice"));
            }
            labels.push((key.to_string(), value));
            s = &s[end + 1..];
            if let Some(after) = s.strip_prefix(',') {
                s = after;
            } else if !s.starts_with('}') {
                return Err("labels not separated by commas".into());
            }
        }
    }
    let value = rest
        .strip_prefix(' ')
        .ok_or("no space before the value")?
        .split(' ')
        .next()
        .unwrap_or("");
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("bad value {v}"))?,
    };
    Ok((name.to_string(), labels, value))
}

#[test]
fn label_values_are_escaped_as_both_formats_require() {
    assert_eq!(escaped("plain"), "plain");
    assert_eq!(escaped("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    let mut v = view();
    Arc::make_mut(&mut Arc::make_mut(&mut v.services)[0])
        .label
        .name = "odd \\ name\nwith a break".into();
    let om = render(&v, &figures(), None, Format::OpenMetrics);
    strict_openmetrics(&om).unwrap_or_else(|e| panic!("{e}\n{om}"));
}

/// The per-service families as the registry writes them (what `render` did before it wrote
/// them itself): the reference the direct encoding is held to.
fn registry_service_metrics(r: &mut Registry, view: &AgentView, figures: &Figures) {
    let svc_packets = counter_family(r, "service_packets", "Packets of a service, by direction");
    let svc_bytes = counter_family(r, "service_bytes", "IP bytes of a service, by direction");
    let svc_flows = counter_family(r, "service_new_flows", "New flows of a service");
    let svc_dropped = counter_family(r, "service_dropped_packets", SERVICE_DROPPED_HELP);
    let svc_drops = counter_family(r, "service_drops", SERVICE_DROPS_HELP);
    let be_packets = counter_family(
        r,
        "backend_packets",
        "Client-to-backend packets per backend",
    );
    let be_bytes = counter_family(r, "backend_bytes", "Client-to-backend IP bytes per backend");
    let be_flows = counter_family(r, "backend_new_flows", "New flows per backend");
    let be_weight = gauge_family(
        r,
        "backend_weight",
        "Weight per listed backend (0: takes no new flows; in maintenance, draining, or on standby)",
    );
    let zone_flows = counter_family(
        r,
        "zone_new_flows",
        "New flows per backend whose zone is known, by where the backend is relative to this node's zone (locality: same-zone, other-zone, unknown); sum by locality for the share that stayed in the zone",
    );
    for (s, (st, backends)) in view.services.iter().zip(&figures.services) {
        let base = service_labels(s);
        let with = |k: &'static str, v: &str| {
            let mut l = base.clone();
            l.push((k, v.to_string()));
            l
        };
        for (direction, packets, bytes) in [
            ("to_backend", st.packets, st.bytes),
            ("to_client", st.reply_packets, st.reply_bytes),
        ] {
            svc_packets
                .get_or_create(&with("direction", direction))
                .inc_by(packets);
            svc_bytes
                .get_or_create(&with("direction", direction))
                .inc_by(bytes);
        }
        svc_flows.get_or_create(&base).inc_by(st.new_flows);
        svc_dropped
            .get_or_create(&base)
            .inc_by(st.drops.iter().sum());
        for (reason, v) in DropReason::ALL.iter().zip(st.drops.iter()) {
            if *v == 0 {
                continue;
            }
            svc_drops
                .get_or_create(&with("reason", reason.name()))
                .inc_by(*v);
        }
        for (b, bst) in s.backends.iter().zip(backends) {
            let l = backend_labels(&base, b);
            be_packets.get_or_create(&l).inc_by(bst.packets);
            be_bytes.get_or_create(&l).inc_by(bst.bytes);
            be_flows.get_or_create(&l).inc_by(bst.new_flows);
            be_weight.get_or_create(&l).set(i64::from(b.weight));
            let zones = &s.label.zones;
            if let Some(zone) = zones.backends.get(&b.name()) {
                let mut l = l;
                l.push(("zone", escaped(zone)));
                l.push((
                    "locality",
                    zones.locality(&b.name(), view.zone.as_deref()).to_string(),
                ));
                zone_flows.get_or_create(&l).inc_by(bst.new_flows);
            }
        }
    }
}

fn service_labels(s: &ServiceView) -> Labels {
    vec![
        ("service", escaped(&s.label.name)),
        ("frontend", s.label.frontend.to_string()),
    ]
}

fn backend_labels(base: &Labels, b: &BackendView) -> Labels {
    let mut l = base.clone();
    l.push(("backend", b.name()));
    l
}

#[test]
fn per_service_families_say_what_the_registry_would() {
    let mut v = view();
    // A zone and a name that needs escaping, so every family and label kind is written.
    Arc::make_mut(&mut Arc::make_mut(&mut v.services)[0])
        .label
        .name = "we\"b\\1\n".into();
    v.zone = Some("us-east-1a".into());
    let first = v.services[0].backends[0].name();
    Arc::make_mut(&mut Arc::make_mut(&mut v.services)[0])
        .label
        .zones
        .backends
        .insert(first, "us-east-1a".into());
    let f = figures();
    let mut r = Registry::with_prefix(PREFIX);
    registry_service_metrics(&mut r, &v, &f);
    let mut reference = String::new();
    encode(&mut reference, &r).unwrap();
    let mut direct = String::new();
    service_metrics(&mut direct, &v, &f, Format::OpenMetrics);
    direct.push_str("# EOF\n");
    // The registry writes a family's series in hash order; families and metadata in order.
    let sorted = |s: &str| {
        let mut lines: Vec<String> = s.lines().map(str::to_string).collect();
        lines.sort();
        lines
    };
    assert_eq!(sorted(&direct), sorted(&reference));
    let families = |s: &str| {
        s.lines()
            .filter(|l| l.starts_with("# "))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(families(&direct), families(&reference));
    assert!(direct.contains("zone_new_flows_total"), "{direct}");
    // The text format: what the conversion of the registry's text gives.
    let mut text = String::new();
    service_metrics(&mut text, &v, &f, Format::Text);
    assert_eq!(sorted(&text), sorted(&openmetrics_to_text(&reference)));
}

#[test]
fn without_services_the_per_service_families_are_as_the_registry_leaves_them() {
    let mut v = view();
    Arc::make_mut(&mut v.services).clear();
    let f = Figures {
        services: Vec::new(),
        ..figures()
    };
    let mut r = Registry::with_prefix(PREFIX);
    registry_service_metrics(&mut r, &v, &f);
    let mut reference = String::new();
    encode(&mut reference, &r).unwrap();
    let mut direct = String::new();
    service_metrics(&mut direct, &v, &f, Format::OpenMetrics);
    direct.push_str("# EOF\n");
    assert_eq!(direct, reference);
}

#[test]
fn over_the_backend_limit_the_per_backend_families_are_left_out_and_counted() {
    let v = view();
    let f = Figures {
        services: figures()
            .services
            .into_iter()
            .map(|(st, _)| (st, Vec::new()))
            .collect(),
        backends_omitted: 2,
        ..figures()
    };
    for format in [Format::OpenMetrics, Format::Text] {
        let out = render(&v, &f, None, format);
        assert!(
            out.lines().any(|l| l == "xdplb_metrics_backends_omitted 2"),
            "{out}"
        );
        assert!(
            !out.lines()
                .any(|l| l.contains("xdplb_backend_") || l.contains("xdplb_zone_new_flows")),
            "{out}"
        );
        assert!(
            out.contains("xdplb_service_packets_total{service=\"web \\\"main\\\"\""),
            "per-service series stay: {out}"
        );
    }
    let om = render(&v, &f, None, Format::OpenMetrics);
    strict_openmetrics(&om).unwrap_or_else(|e| panic!("{e}\n{om}"));
    let all = render(&v, &figures(), None, Format::Text);
    assert!(all.lines().any(|l| l == "xdplb_metrics_backends_omitted 0"));
}

/// A renderer whose text is the number of renders so far, each taking `took`.
fn counting_renderer(took: Duration) -> (Renderer, Arc<std::sync::atomic::AtomicU64>) {
    let renders = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = renders.clone();
    let renderer = Renderer::start(Box::new(move |_| {
        std::thread::sleep(took);
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        n.to_string()
    }))
    .unwrap();
    (renderer, renders)
}

fn number(body: &Bytes) -> u64 {
    std::str::from_utf8(body).unwrap().parse().unwrap()
}

#[test]
fn where_renders_are_quick_each_scrape_waits_for_a_fresh_one() {
    let (renderer, renders) = counting_renderer(Duration::ZERO);
    let first = number(&renderer.scrape(Format::Text));
    let second = number(&renderer.scrape(Format::Text));
    assert!(second > first, "{first} then {second}");
    assert_eq!(
        second,
        renders.load(std::sync::atomic::Ordering::SeqCst),
        "the latest render"
    );
}

#[test]
fn where_renders_are_slow_scrapes_get_text_rendered_ahead_of_them_and_idle_renders_stop() {
    let took = Duration::from_millis(250);
    let (renderer, renders) = counting_renderer(took);
    // The very first scrape waits for the first text.
    assert_eq!(number(&renderer.scrape(Format::Text)), 1);
    let every = Duration::from_millis(700);
    let mut got = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(every);
        let start = Instant::now();
        let n = number(&renderer.scrape(Format::Text));
        let answered = start.elapsed();
        assert!(
            answered < took,
            "a scrape does not wait for a slow render: {answered:?}"
        );
        got.push(n);
    }
    // Once the interval is known, each scrape finds a render made for it: one per scrape.
    let last = got[got.len() - 1];
    assert!(
        got.windows(2).skip(2).all(|w| w[1] == w[0] + 1),
        "one new render per scrape: {got:?}"
    );
    // Nobody scrapes: at most one render ahead of a scrape that does not come (and one the
    // last scrape came too early for), then none.
    std::thread::sleep(Duration::from_millis(2500));
    let settled = renders.load(std::sync::atomic::Ordering::SeqCst);
    assert!(settled <= last + 2, "{settled} renders after {last}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(renders.load(std::sync::atomic::Ordering::SeqCst), settled);
    drop(renderer);
}
