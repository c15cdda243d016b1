//! A host measurement, not a test: what one endpoint change costs in the translation and in
//! composing and applying it, at the bench's 10,000 Services x 10 endpoints (20,000 frontends),
//! applied frontend by frontend and as a whole. Run with
//! `cargo test -p lb-userspace --release --lib -- --ignored one_change_at_cluster_size --nocapture`.
use std::{collections::BTreeSet, net::Ipv4Addr, time::Instant};

use k8s_openapi::{api::core::v1::Service as KubeService, api::discovery::v1::EndpointSlice};
use serde_json::json;

use crate::k8s::{Cluster, NodeInfo, ObjectKey, Translator};
use crate::{
    composed::{self, Inputs, Writer},
    dataplane::Sizes,
    model::Desired,
    node::NodeView,
    reconcile::Reconciler,
    tables::MemoryTables,
};

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;

/// Service `i` as the bench makes it: an external IP shared by ten Services, two TCP ports.
fn service(i: u32) -> KubeService {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(192, 168, 0, 0)) + i / 10);
    let port = 1000 + 2 * (i % 10);
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i:05}"), "namespace": "bench", "uid": format!("u{i}"),
            "resourceVersion": "1", "annotations": {"xdplb.io/enabled": "true"}},
        "spec": {"type": "ClusterIP", "externalIPs": [vip.to_string()],
            "ports": [{"name": "http", "port": port, "targetPort": 8080, "protocol": "TCP"},
                      {"name": "https", "port": port + 1, "targetPort": 8443, "protocol": "TCP"}]},
    }))
    .expect("a Service")
}

/// Service `i`'s slice in its `version`: each version moves the endpoints one address on.
fn slice(i: u32, version: u32) -> EndpointSlice {
    let endpoints: Vec<_> = (0..ENDPOINTS)
        .map(|j| {
            let addr =
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 1)) + i * 16 + j + version);
            json!({"addresses": [addr.to_string()], "nodeName": "other",
                "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i:05}-a"), "namespace": "bench", "uid": format!("s{i}"),
            "resourceVersion": (version + 1).to_string(),
            "labels": {"kubernetes.io/service-name": format!("svc-{i:05}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "https", "port": 8443, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .expect("an EndpointSlice")
}

fn key(i: u32) -> ObjectKey {
    ("bench".into(), format!("svc-{i:05}"))
}

#[test]
#[ignore = "a measurement: run it with --release"]
fn one_change_at_cluster_size() {
    let mut cluster = Cluster::default();
    for i in 0..SERVICES {
        cluster.services.insert(key(i), service(i).into());
        let slices = [(format!("svc-{i:05}-a"), Box::new(slice(i, 0).into()))].into();
        cluster.slices.insert(key(i), slices);
    }
    let node = NodeInfo {
        name: "node".into(),
        addrs: vec!["10.0.0.1".parse().expect("an address")],
        ..Default::default()
    };
    let view = NodeView {
        snat_ipv4: vec!["10.0.0.1".parse().expect("an address")],
        node_addrs: ["10.0.0.1".parse().expect("an address")].into(),
        ..Default::default()
    };
    let (policies, file) = (BTreeSet::new(), Desired::default());
    let sizes = Sizes {
        max_services: 20_480,
        max_backends: 250_880,
        ..Sizes::default()
    };
    let mut version = 0;
    for by_frontend in [false, true] {
        let mut translator = Translator::default();
        let mut reconciler = Reconciler::new(sizes);
        let mut tables = MemoryTables::default();
        let (mut last, mut applied) = (None, Desired::default());
        // The watchers note the Services they change.
        cluster.touched = None;
        for change in 0..8 {
            if change > 0 {
                version += 1;
                let i = change * 17;
                let slices = [(format!("svc-{i:05}-a"), Box::new(slice(i, version).into()))].into();
                cluster.slices.insert(key(i), slices);
                cluster.touch(&key(i));
            }
            let touched = cluster.take_touched();
            let started = Instant::now();
            let mut translation = translator.translate_touched(
                &cluster,
                &node,
                &policies,
                Instant::now(),
                touched.as_ref(),
            );
            if !by_frontend {
                translation.changed = None;
            }
            let translated = Instant::now();
            let inputs = Inputs {
                file: &file,
                kube: Some(&translation),
            };
            let writer = Writer {
                reconciler: &mut reconciler,
                tables: &mut tables,
            };
            let mut node_view = |_: &Desired, _| Ok(view.clone());
            let outcome = composed::apply(&mut last, &mut applied, &inputs, writer, &mut node_view)
                .expect("applied");
            let done = Instant::now();
            eprintln!(
                "{}: translate {:?}, compose and apply {:?} ({} map writes)",
                if outcome.incremental {
                    "by frontend"
                } else {
                    "whole"
                },
                translated - started,
                done - translated,
                outcome.report.writes
            );
        }
    }
}
