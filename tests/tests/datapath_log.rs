//! Kernel tier: the data path's log records (aya-log, rare events only) reach the agent's log
//! when its logger shows the data path's target, as `lb-agent run` reads them.
use std::sync::Mutex;

use lb_common::{Counter, TAIL_NEW_FLOW, logging::LOG_TARGET};
use lb_tests::{
    kernel::{CLIENT_MAC, Fixture},
    netns::require_root,
    packets::{Spec, TCP_SYN},
};
use lb_userspace::{
    dataplane::Sizes,
    model::{Backend, Desired, Frontend, Mode, Protocol, Service, SourceRanges},
};

/// Keeps the data path's records (this binary's logger, so the loader sees its target shown).
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.target() == LOG_TARGET
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(format!("{} {}", record.level(), record.args()));
        }
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

#[test]
fn a_failed_tail_call_is_counted_and_logged_when_the_agent_shows_the_data_paths_target() {
    if !require_root() {
        return;
    }
    log::set_logger(&CAPTURE).expect("the only logger");
    log::set_max_level(log::LevelFilter::Trace);
    let mut fx = Fixture::new(Sizes {
        flow_entries: 1024,
        flow_entries_v6: 1024,
        max_services: 4,
        max_backends: 4,
        ring_size: 251,
        source_entries: 256,
        affinity_entries: 256,
    })
    .expect("fixture");
    let web = Service {
        name: "web".into(),
        origin: "test".into(),
        frontend: Frontend {
            vip: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        },
        mode: Mode::Snat,
        backends: vec![Backend {
            addr: "10.1.2.2".parse().unwrap(),
            port: 8080,
            weight: 1,
        }],
        policy: None,
        affinity: None,
        source_ranges: SourceRanges::default(),
    };
    fx.apply(&Desired {
        services: [(web.frontend, web.into())].into(),
        ..Desired::default()
    })
    .expect("apply");
    let mut logger = aya_log::EbpfLogger::init(&mut fx.ebpf).expect("the object has a log map");
    fx.clear_slow_path(TAIL_NEW_FLOW).expect("clear");
    let syn = Spec::tcp("10.0.0.10", 40000, "10.96.0.10", 80, TCP_SYN).macs(CLIENT_MAC, fx.up0_mac);
    let out = fx.uplink(&syn.build()).expect("run");
    assert_eq!(out.verdict, 1, "XDP_DROP without its slow path");
    let failed = fx
        .maps
        .read_counters()
        .into_iter()
        .find(|(c, _)| *c == Counter::TailCallFailed)
        .map(|(_, n)| n);
    assert_eq!(failed, Some(1));
    logger.flush();
    let records = CAPTURE.0.lock().unwrap().clone();
    assert!(
        records
            .iter()
            .any(|r| r.starts_with("ERROR")
                && r.contains(&format!("slow path {TAIL_NEW_FLOW} failed"))),
        "the record in the agent's log: {records:?}"
    );
}
