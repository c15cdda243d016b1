//! Prometheus metrics, /healthz and /readyz over HTTP. Metrics are read from the maps at scrape
//! time (the data path's per-CPU counters summed), so there is nothing to keep in sync.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use lb_common::{Counter as DpCounter, DropReason};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    agent::{Agent, KubeHealth, lock},
    reconcile::service_key,
    tables::Tables,
};

type Labels = Vec<(&'static str, String)>;

/// What a listener answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    /// /metrics, /healthz and /readyz (--metrics-addr: the probes, on localhost by default).
    All,
    /// /metrics alone (--scrape-addr: an address Prometheus reaches, where nobody else needs
    /// the probes).
    MetricsOnly,
}

/// Serves until the returned task is aborted.
pub async fn serve(
    addr: SocketAddr,
    agent: Arc<Mutex<Agent>>,
    sync_latency: Option<Histogram>,
    endpoints: Endpoints,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        // Connections live in this set: aborting the server drops them, and with them every
        // handle on the agent.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            while connections.try_join_next().is_some() {}
            let agent = agent.clone();
            let latency = sync_latency.clone();
            connections.spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let agent = agent.clone();
                    let latency = latency.clone();
                    async move {
                        let path = req.uri().path();
                        let path = match endpoints {
                            Endpoints::MetricsOnly if path != "/metrics" => "",
                            _ => path,
                        };
                        Ok::<_, Infallible>(respond(path, &agent, latency.as_ref()))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }))
}

fn respond(
    path: &str,
    agent: &Mutex<Agent>,
    sync_latency: Option<&Histogram>,
) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, body: String, kind: &'static str| {
        Response::builder()
            .status(code)
            .header("content-type", kind)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match path {
        "/metrics" => reply(
            StatusCode::OK,
            render(&lock(agent), sync_latency),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/healthz" => reply(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => match lock(agent).health.readiness() {
            Ok(()) => reply(StatusCode::OK, "ready\n".into(), "text/plain"),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
                "text/plain",
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

/// The registry, filled from the maps now.
pub fn render(agent: &Agent, sync_latency: Option<&Histogram>) -> String {
    let mut r = Registry::with_prefix("xdplb");
    let counter = |r: &mut Registry, name: &str, help: &str| {
        let f = Family::<Labels, Counter>::default();
        r.register(name, help, f.clone());
        f
    };
    let gauge = |r: &mut Registry, name: &str, help: &str| {
        let f = Family::<Labels, Gauge>::default();
        r.register(name, help, f.clone());
        f
    };

    let events = counter(
        &mut r,
        "datapath_events",
        "Node-wide data path events by kind (passes, drops by reason, flows created, XDP verdicts...)",
    );
    for (c, v) in agent.maps.read_counters() {
        events
            .get_or_create(&vec![("event", c.name().to_string())])
            .inc_by(v);
    }
    let _ = DpCounter::Packets;

    let names: std::collections::BTreeMap<_, _> = agent
        .desired
        .services
        .values()
        .map(|s| (service_key(&s.frontend), s))
        .collect();
    let svc_packets = counter(
        &mut r,
        "service_packets",
        "Packets of a service, by direction",
    );
    let svc_bytes = counter(
        &mut r,
        "service_bytes",
        "IP bytes of a service, by direction",
    );
    let svc_flows = counter(&mut r, "service_new_flows", "New flows of a service");
    let svc_drops = counter(
        &mut r,
        "service_drops",
        "Packets of a service dropped, by reason",
    );
    let be_packets = counter(
        &mut r,
        "backend_packets",
        "Client-to-backend packets per backend",
    );
    let be_bytes = counter(
        &mut r,
        "backend_bytes",
        "Client-to-backend IP bytes per backend",
    );
    let be_flows = counter(&mut r, "backend_new_flows", "New flows per backend");
    let be_weight = gauge(
        &mut r,
        "backend_weight",
        "Configured weight per backend (0: draining)",
    );
    if let Ok(snap) = agent.maps.snapshot() {
        for (key, svc) in &snap.services {
            let Some(s) = names.get(key) else { continue };
            let base = vec![
                ("service", s.name.clone()),
                ("frontend", s.frontend.to_string()),
            ];
            let st = agent.maps.read_service_stats(svc.id);
            let with = |k: &'static str, v: &str| {
                let mut l = base.clone();
                l.push((k, v.to_string()));
                l
            };
            svc_packets
                .get_or_create(&with("direction", "to_backend"))
                .inc_by(st.packets);
            svc_packets
                .get_or_create(&with("direction", "to_client"))
                .inc_by(st.reply_packets);
            svc_bytes
                .get_or_create(&with("direction", "to_backend"))
                .inc_by(st.bytes);
            svc_bytes
                .get_or_create(&with("direction", "to_client"))
                .inc_by(st.reply_bytes);
            svc_flows.get_or_create(&base).inc_by(st.new_flows);
            for (reason, v) in DropReason::ALL.iter().zip(st.drops.iter()) {
                svc_drops
                    .get_or_create(&with("reason", reason.name()))
                    .inc_by(*v);
            }
            for (id, b) in snap
                .backends
                .iter()
                .filter(|(_, b)| b.service == svc.id && b.flags & lb_common::BACKEND_LISTED != 0)
            {
                let addr = std::net::IpAddr::from(b.addr);
                let port = u16::from_be(b.port);
                let mut l = base.clone();
                l.push((
                    "backend",
                    crate::model::Backend {
                        addr,
                        port,
                        weight: 0,
                    }
                    .maglev_key(),
                ));
                let st = agent.maps.read_backend_stats(*id);
                be_packets.get_or_create(&l).inc_by(st.packets);
                be_bytes.get_or_create(&l).inc_by(st.bytes);
                be_flows.get_or_create(&l).inc_by(st.new_flows);
                be_weight.get_or_create(&l).set(i64::from(b.weight));
            }
        }
    }

    let tables = gauge(
        &mut r,
        "table_entries",
        "Entries in a data path table at the last sweep",
    );
    let capacity = gauge(&mut r, "table_capacity", "Capacity of a data path table");
    let sizes = agent.sizes();
    let sweep = &agent.health.last_sweep;
    for (table, n, cap) in [
        ("flows", sweep.flows, sizes.flow_entries),
        ("sources", sweep.sources, sizes.source_entries),
    ] {
        tables
            .get_or_create(&vec![("table", table.to_string())])
            .set(n as i64);
        capacity
            .get_or_create(&vec![("table", table.to_string())])
            .set(i64::from(cap));
    }
    let swept = counter(
        &mut r,
        "swept_entries",
        "Entries the agent's sweeps removed: finished flows, and refilled rate-limit sources (the source table's evictions; its insertions are datapath_events{event=\"sources_created\"})",
    );
    swept
        .get_or_create(&vec![("table", "flows".into())])
        .inc_by(agent.health.swept_flows);
    swept
        .get_or_create(&vec![("table", "sources".into())])
        .inc_by(agent.health.swept_sources);

    let reloads = counter(&mut r, "config_reloads", "Config reloads by result");
    reloads
        .get_or_create(&vec![("result", "applied".into())])
        .inc_by(agent.health.reloads_applied);
    reloads
        .get_or_create(&vec![("result", "rejected".into())])
        .inc_by(agent.health.reloads_rejected);
    let ready = gauge(
        &mut r,
        "ready",
        "1 when the desired state is applied and the data path attached",
    );
    ready
        .get_or_create(&vec![])
        .set(i64::from(agent.health.ready));
    let mode = gauge(
        &mut r,
        "interface_attached",
        "Interfaces the data path is attached to, with program and XDP mode",
    );
    for a in agent.attachment_labels() {
        mode.get_or_create(&vec![("interface", a.0), ("program", a.1), ("mode", a.2)])
            .set(1);
    }
    if let Some(k) = &agent.health.kubernetes {
        kubernetes_metrics(&mut r, k, sync_latency);
    }
    let mut out = String::new();
    let _ = encode(&mut out, &r);
    out
}

fn kubernetes_metrics(r: &mut Registry, k: &KubeHealth, sync_latency: Option<&Histogram>) {
    let synced = Gauge::<i64>::default();
    synced.set(i64::from(k.synced));
    r.register(
        "kubernetes_synced",
        "1 while Services and EndpointSlices are listed and watched",
        synced,
    );
    let objects = Family::<Labels, Gauge>::default();
    r.register(
        "kubernetes_objects",
        "Kubernetes objects seen, by kind (services_enabled: those that opted in)",
        objects.clone(),
    );
    for (kind, n) in [
        ("services", k.services_seen),
        ("endpointslices", k.slices_seen),
        ("services_enabled", k.services_enabled),
        ("frontends", k.frontends),
    ] {
        objects
            .get_or_create(&vec![("kind", kind.into())])
            .set(n as i64);
    }
    let counter = |r: &mut Registry, name: &str, help: &str, v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        r.register(name, help, c);
    };
    counter(
        r,
        "kubernetes_watch_events",
        "Watch events received",
        k.watch_events,
    );
    counter(
        r,
        "kubernetes_watch_errors",
        "Watch errors (each followed by a fresh list)",
        k.watch_errors,
    );
    counter(
        r,
        "kubernetes_apply_errors",
        "States from the cluster that could not be applied (the last good one stayed)",
        k.apply_errors,
    );
    counter(
        r,
        "kubernetes_flows_ended",
        "Flows ended when a backend's deregistration delay ran out",
        k.flows_ended,
    );
    let problems = Gauge::<i64>::default();
    problems.set(k.problems as i64);
    r.register(
        "kubernetes_problems",
        "Current problems with Services (bad annotations, frontends not served), also posted as Events",
        problems,
    );
    if let Some(h) = sync_latency {
        r.register(
            "kubernetes_sync_latency_seconds",
            "From a change seen by a watcher to the maps holding it",
            h.clone(),
        );
    }
}
