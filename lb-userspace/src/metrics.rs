//! Prometheus metrics, /healthz and /readyz over HTTP, served from a thread of their own: they
//! read the agent's published view ([`crate::view`]) and the data path's counters through
//! descriptors of their own, so they answer while the agent is busy (a long apply, a sweep).
//!
//! `/metrics` speaks what the scraper asks for: OpenMetrics 1.0 when its Accept header prefers
//! it, else the Prometheus text format 0.0.4 (what Prometheus asks for by default, and what
//! `promtool check metrics` reads). Counters are read from the maps, summed over CPUs, so there
//! is nothing to keep in sync.
//!
//! The text is rendered on a thread of its own ([`Renderer`]), never on the scrape's: where a
//! render is quick (under [`QUICK`]: small nodes) a scrape waits for one made after it came, so
//! it sees every counter as of then; where it is not (10,000 Services: a few hundred ms), a
//! scrape gets the text rendered last, and the renderer renders just before the next scrape is
//! due (it learns the scrape interval), so that text is a fraction of a second old. Nothing is
//! rendered while nobody scrapes.
use std::{
    convert::Infallible,
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, header, service::service_fn};
use hyper_util::rt::TokioIo;
use lb_common::{BackendStats, Counter, DropReason, ServiceStats};
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter as PromCounter, family::Family, gauge::Gauge, histogram::Histogram,
    },
    registry::Registry,
};
use tokio::sync::oneshot;

use crate::{
    dataplane::Stats,
    health::KubeHealth,
    view::{AgentView, Views},
};

type Labels = Vec<(&'static str, String)>;

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The exposition formats `/metrics` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    /// The Prometheus text format, version 0.0.4.
    Text,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS,
            Format::Text => TEXT_004,
        }
    }
}

/// The format for an Accept header: OpenMetrics if the scraper lists it with a quality at least
/// that of text/plain, else the text format (also without an Accept header, or with `*/*`).
pub fn negotiate(accept: Option<&str>) -> Format {
    let mut openmetrics: Option<f32> = None;
    let mut text: Option<f32> = None;
    for range in accept.unwrap_or("").split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        let slot = match media.as_str() {
            "application/openmetrics-text" => &mut openmetrics,
            "text/plain" => &mut text,
            _ => continue,
        };
        *slot = Some(slot.map_or(q, |old| old.max(q)));
    }
    match (openmetrics, text) {
        (Some(om), t) if om > 0.0 && om >= t.unwrap_or(0.0) => Format::OpenMetrics,
        _ => Format::Text,
    }
}

/// The metrics server's thread. Dropping it stops the server.
pub struct MetricsServer {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a listener answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    /// /metrics, /healthz and /readyz (--metrics-addr: the probes, on localhost by default).
    All,
    /// /metrics alone (--scrape-addr: an address Prometheus reaches, where nobody else needs
    /// the probes).
    MetricsOnly,
}

/// What a request is answered from.
struct Endpoint {
    views: Views,
    renderer: Renderer,
    endpoints: Endpoints,
    /// /healthz fails once the agent's loop has not gone round for this long.
    stall: Duration,
}

/// What a scrape is made of, besides the published view.
pub struct Sources {
    pub stats: Stats,
    pub sync_latency: Option<Histogram>,
    /// Per-backend series are written while the node lists at most this many backends
    /// (`--metrics-max-backends`); above, they are left out and
    /// `xdplb_metrics_backends_omitted` says how many backends have none.
    pub max_backends: usize,
}

/// Binds `addr` (an error here is the caller's to report) and serves on a thread of its own
/// until the returned server is dropped.
pub fn serve(
    addr: SocketAddr,
    views: Views,
    sources: Sources,
    endpoints: Endpoints,
    stall: Duration,
) -> std::io::Result<MetricsServer> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let endpoint = Arc::new(Endpoint {
        renderer: {
            let views = views.clone();
            Renderer::start(Box::new(move |format| {
                let view = views.latest();
                let figures = Figures::read(&view, &sources.stats, sources.max_backends);
                render(&view, &figures, sources.sync_latency.as_ref(), format)
            }))?
        },
        views,
        endpoints,
        stall,
    });
    let (stop, stopped) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                tokio::select! {
                    () = accept_loop(listener, endpoint) => {}
                    _ = stopped => {}
                }
            });
        })?;
    Ok(MetricsServer {
        stop: Some(stop),
        thread: Some(thread),
    })
}

async fn accept_loop(listener: tokio::net::TcpListener, endpoint: Arc<Endpoint>) {
    // Connections live in this set: returning drops them.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let endpoint = endpoint.clone();
        connections.spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let endpoint = endpoint.clone();
                async move {
                    // A scrape may wait for the renderer (briefly, or for the very first
                    // text): on a blocking thread, so that the probes on this listener answer
                    // meanwhile.
                    let response = if req.uri().path() == "/metrics" {
                        let (parts, _) = req.into_parts();
                        let req = Request::from_parts(parts, ());
                        tokio::task::spawn_blocking(move || endpoint.respond(&req))
                            .await
                            .unwrap_or_else(|_| {
                                let mut r = Response::new(Full::new(Bytes::from_static(
                                    b"rendering the metrics failed\n",
                                )));
                                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                                r
                            })
                    } else {
                        endpoint.respond(&req)
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

impl Endpoint {
    fn respond<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let reply = |code: StatusCode, body: Bytes, kind: &'static str| {
            Response::builder()
                .status(code)
                .header(header::CONTENT_TYPE, kind)
                .body(Full::new(body))
                .unwrap_or_default()
        };
        let text = "text/plain; charset=utf-8";
        let path = match (self.endpoints, req.uri().path()) {
            (Endpoints::MetricsOnly, p) if p != "/metrics" => "",
            (_, p) => p,
        };
        match path {
            "/metrics" => {
                let accept = req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let format = negotiate(accept);
                let body = self.renderer.scrape(format);
                reply(StatusCode::OK, body, format.content_type())
            }
            "/healthz" => match self.views.since_beat() {
                quiet if quiet <= self.stall => {
                    reply(StatusCode::OK, Bytes::from_static(b"ok\n"), text)
                }
                quiet => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Bytes::from(format!(
                        "stalled: the agent's loop has made no progress for {}s (--stall-seconds {})\n",
                        quiet.as_secs(),
                        self.stall.as_secs()
                    )),
                    text,
                ),
            },
            "/readyz" => match self.views.latest().health.readiness() {
                Ok(()) => reply(StatusCode::OK, Bytes::from_static(b"ready\n"), text),
                Err(why) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Bytes::from(format!("not ready: {why}\n")),
                    text,
                ),
            },
            _ => reply(
                StatusCode::NOT_FOUND,
                Bytes::from_static(b"not found\n"),
                text,
            ),
        }
    }
}

/// A render of each format at most this long makes a scrape wait for a fresh one (it then sees
/// every counter as of its request, and still answers well within 100 ms); a longer one makes
/// scrapes take the text rendered last, ahead of them.
pub const QUICK: Duration = Duration::from_millis(50);
/// Text is rendered this long (plus the last render's time) before the next scrape is due.
const LEAD: Duration = Duration::from_millis(200);
/// A scrape that got text older than this has the next one rendered at once (the scrape
/// interval was not known yet, or scrapes came irregularly).
const MAX_AGE: Duration = Duration::from_secs(1);

/// Renders `/metrics` on a thread of its own, as [the module](self) says. Dropping it stops
/// the thread.
struct Renderer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    slots: Mutex<Slots>,
    /// Told when a scrape comes and when a render is done.
    changed: Condvar,
}

#[derive(Default)]
struct Slots {
    /// By format: [OpenMetrics, Text].
    formats: [Slot; 2],
    /// The last render's time.
    took: Duration,
    /// No slow render starts before this (they take at most half of a core).
    rest_until: Option<Instant>,
    stop: bool,
}

/// One format's text and its scrapes.
#[derive(Default)]
struct Slot {
    text: Option<(Instant, Bytes)>,
    last_scrape: Option<Instant>,
    /// Between the last two scrapes.
    interval: Option<Duration>,
    /// A scrape waits for text rendered after this.
    wanted_after: Option<Instant>,
}

impl Slot {
    /// When this format should next be rendered, if at all before another scrape comes.
    fn due(&self, took: Duration) -> Option<Instant> {
        let last = self.last_scrape?;
        let Some((at, _)) = &self.text else {
            return Some(last);
        };
        if self.wanted_after.is_some_and(|w| *at < w) {
            return self.wanted_after;
        }
        if *at + MAX_AGE < last {
            return Some(last);
        }
        // Just ahead of the next scrape, once.
        let next = last + self.interval?;
        let due = next.checked_sub(took + LEAD)?.max(last);
        (*at < due).then_some(due)
    }
}

fn slot(format: Format) -> usize {
    match format {
        Format::OpenMetrics => 0,
        Format::Text => 1,
    }
}

/// Renders the whole text in a format.
type RenderFn = Box<dyn Fn(Format) -> String + Send>;

impl Renderer {
    fn start(render: RenderFn) -> std::io::Result<Renderer> {
        let shared = Arc::new(Shared {
            slots: Mutex::new(Slots::default()),
            changed: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("metrics-render".into())
                .spawn(move || shared.render_loop(&render))?
        };
        Ok(Renderer {
            shared,
            thread: Some(thread),
        })
    }

    /// The text for a scrape in `format` now: see [the module](self). Blocks for at most
    /// about [`QUICK`], except for a format's very first scrape.
    fn scrape(&self, format: Format) -> Bytes {
        let now = Instant::now();
        let mut slots = self.shared.lock();
        let quick = slots.took <= QUICK;
        let s = &mut slots.formats[slot(format)];
        if let Some(last) = s.last_scrape {
            s.interval = Some(now.saturating_duration_since(last));
        }
        s.last_scrape = Some(now);
        let cached = s.text.as_ref().map(|(_, body)| body.clone());
        if let (Some(body), false) = (&cached, quick) {
            self.shared.changed.notify_all();
            return body.clone();
        }
        s.wanted_after = Some(now);
        self.shared.changed.notify_all();
        // A render that turns out slow: the text there is, if any.
        let give_up = now + QUICK + QUICK / 2;
        loop {
            let s = &slots.formats[slot(format)];
            match &s.text {
                Some((at, body)) if *at >= now => return body.clone(),
                _ if slots.stop => return cached.unwrap_or_default(),
                _ => {}
            }
            let wait = match cached {
                Some(_) => give_up.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(1),
            };
            if cached.is_some() && wait.is_zero() {
                return cached.unwrap_or_default();
            }
            slots = self
                .shared
                .changed
                .wait_timeout(slots, wait)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Renderer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn render_loop(&self, render: &RenderFn) {
        let mut slots = self.lock();
        loop {
            if slots.stop {
                return;
            }
            let now = Instant::now();
            let due = [Format::OpenMetrics, Format::Text]
                .into_iter()
                .filter_map(|f| Some((f, slots.formats[slot(f)].due(slots.took)?)))
                .min_by_key(|(_, at)| *at)
                .map(|(f, at)| (f, slots.rest_until.map_or(at, |r| r.max(at))));
            let format = match due {
                Some((f, at)) if at <= now => f,
                Some((_, at)) => {
                    slots = self.wait(slots, Some(at - now));
                    continue;
                }
                None => {
                    slots = self.wait(slots, None);
                    continue;
                }
            };
            drop(slots);
            let start = Instant::now();
            let body = render(format);
            let end = Instant::now();
            slots = self.lock();
            slots.formats[slot(format)].text = Some((start, Bytes::from(body)));
            slots.took = end - start;
            // Slow renders rest as long as they took; quick ones are made for waiting scrapes.
            slots.rest_until = (slots.took > QUICK).then(|| end + slots.took);
            self.changed.notify_all();
        }
    }

    fn wait<'a>(
        &self,
        slots: MutexGuard<'a, Slots>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, Slots> {
        match timeout {
            Some(t) => {
                self.changed
                    .wait_timeout(slots, t)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0
            }
            None => self
                .changed
                .wait(slots)
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        }
    }
}

/// The data path's counters for one scrape.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub counters: Vec<(Counter, u64)>,
    /// Per service of the view, in its order: the service's and each backend's counters (none
    /// when the per-backend series are left out).
    pub services: Vec<(ServiceStats, Vec<BackendStats>)>,
    /// Backends listed but without series of their own (over `--metrics-max-backends`): the
    /// per-backend families are left out whole.
    pub backends_omitted: usize,
}

impl Figures {
    /// Reads every service's (and, up to `max_backends` listed backends, every backend's)
    /// counters: in batches of thousands where the kernel can, else one by one.
    pub fn read(view: &AgentView, stats: &Stats, max_backends: usize) -> Figures {
        let listed: usize = view.services.iter().map(|s| s.backends.len()).sum();
        let with_backends = listed <= max_backends;
        let all_services = stats.all_services().ok();
        let all_backends = if with_backends {
            stats.all_backends().ok()
        } else {
            None
        };
        let service = |id: u32| match &all_services {
            Some(all) => all.get(id as usize).copied().unwrap_or_default(),
            None => stats.service(id),
        };
        let backend = |id: u32| match &all_backends {
            Some(all) => all.get(id as usize).copied().unwrap_or_default(),
            None => stats.backend(id),
        };
        Figures {
            counters: stats.counters(),
            services: view
                .services
                .iter()
                .map(|s| {
                    let backends = if with_backends {
                        s.backends.iter().map(|b| backend(b.id)).collect()
                    } else {
                        Vec::new()
                    };
                    (service(s.id), backends)
                })
                .collect(),
            backends_omitted: if with_backends { 0 } else { listed },
        }
    }
}

/// The metrics in `format`.
pub fn render(
    view: &AgentView,
    figures: &Figures,
    sync_latency: Option<&Histogram>,
    format: Format,
) -> String {
    let mut r = Registry::with_prefix(PREFIX);
    datapath_metrics(&mut r, figures);
    agent_metrics(&mut r, view);
    if let Some(k) = &view.health.kubernetes {
        kubernetes_metrics(&mut r, k, sync_latency);
    }
    let mut om = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut om, &r);
    // The registry's families end with `# EOF`; the per-service ones come after them, in the
    // format asked for (not converted: they are most of the text).
    om.truncate(om.rfind("# EOF").unwrap_or(om.len()));
    let mut out = match format {
        Format::OpenMetrics => om,
        Format::Text => openmetrics_to_text(&om),
    };
    let backends: usize = if figures.backends_omitted == 0 {
        view.services.iter().map(|s| s.backends.len()).sum()
    } else {
        0
    };
    out.reserve(view.services.len() * 6 * 120 + backends * 5 * 150);
    service_metrics(&mut out, view, figures, format);
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out
}

fn counter_family(r: &mut Registry, name: &str, help: &str) -> Family<Labels, PromCounter> {
    let f = Family::<Labels, PromCounter>::default();
    r.register(name, help, f.clone());
    f
}

fn gauge_family(r: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    r.register(name, help, f.clone());
    f
}

fn datapath_metrics(r: &mut Registry, figures: &Figures) {
    let events = counter_family(
        r,
        "datapath_events",
        "Node-wide data path events by kind (passes, drops by reason, flows created, XDP verdicts...)",
    );
    for (c, v) in &figures.counters {
        events
            .get_or_create(&vec![("event", c.name().to_string())])
            .inc_by(*v);
    }
    let omitted = Gauge::<i64>::default();
    omitted.set(i64::try_from(figures.backends_omitted).unwrap_or(i64::MAX));
    r.register(
        "metrics_backends_omitted",
        "Listed backends without per-backend series: the node lists more than --metrics-max-backends, so the backend_* and zone_new_flows families are left out (per-service series stay; lb-agent status --service NAME shows a service's backends)",
        omitted,
    );
}

/// Help of the per-frontend drop total: always there, so `increase()` sees a frontend's first drop.
const SERVICE_DROPPED_HELP: &str =
    "Packets of a service dropped, all reasons (service_drops has the reasons)";
/// Help of the per-frontend drops by reason: a series only once its reason dropped something.
const SERVICE_DROPS_HELP: &str = "Packets of a service dropped, by reason; only reasons that dropped a packet of the service since its frontend was applied have a series (datapath_events has every reason node-wide, service_dropped_packets the service's total)";

/// The per-service and per-backend families (6 series per frontend, plus one per drop reason that
/// dropped something, and 5 per backend: most of a scrape), written straight into OpenMetrics
/// text. Through the registry each series cost a
/// label vector, a hash map entry and an atomic: 370-530 ms per scrape at 2000 frontends and
/// 20,000 backends, a third of a core at one scrape a second. Families are written whole, one
/// after the other, as the format requires; the labels and their order are the registry's.
fn service_metrics(out: &mut String, view: &AgentView, figures: &Figures, format: Format) {
    // `service="...",frontend="..."`, per service, and `,backend="..."` per backend.
    let bases: Vec<String> = view
        .services
        .iter()
        .map(|s| {
            format!(
                "service=\"{}\",frontend=\"{}\"",
                escaped(&s.label.name),
                s.label.frontend
            )
        })
        .collect();
    let services = || view.services.iter().zip(&figures.services).zip(&bases);
    // (name, help, the counters to the backends and to the clients)
    let directed: [Figure<ServiceStats, (u64, u64)>; 2] = [
        (
            "service_packets",
            "Packets of a service, by direction",
            |st| (st.packets, st.reply_packets),
        ),
        (
            "service_bytes",
            "IP bytes of a service, by direction",
            |st| (st.bytes, st.reply_bytes),
        ),
    ];
    for (name, help, counters) in directed {
        family(out, format, name, Kind::Counter, help, |out| {
            for ((_, (st, _)), base) in services() {
                let (to_backend, to_client) = counters(st);
                let kind = Kind::Counter;
                sample(
                    out,
                    name,
                    kind,
                    base,
                    Some(("direction", "to_backend")),
                    to_backend,
                );
                sample(
                    out,
                    name,
                    kind,
                    base,
                    Some(("direction", "to_client")),
                    to_client,
                );
            }
        });
    }
    family(
        out,
        format,
        "service_new_flows",
        Kind::Counter,
        "New flows of a service",
        |out| {
            for ((_, (st, _)), base) in services() {
                sample(
                    out,
                    "service_new_flows",
                    Kind::Counter,
                    base,
                    None,
                    st.new_flows,
                );
            }
        },
    );
    service_drop_metrics(out, figures, format, &bases);
    if figures.backends_omitted == 0 {
        backend_metrics(out, view, figures, format, &bases);
    }
}

/// The per-service drop families of [`service_metrics`]; `bases`: each service's labels.
fn service_drop_metrics(out: &mut String, figures: &Figures, format: Format, bases: &[String]) {
    family(
        out,
        format,
        "service_dropped_packets",
        Kind::Counter,
        SERVICE_DROPPED_HELP,
        |out| {
            for ((st, _), base) in figures.services.iter().zip(bases) {
                sample(
                    out,
                    "service_dropped_packets",
                    Kind::Counter,
                    base,
                    None,
                    st.drops.iter().sum(),
                );
            }
        },
    );
    family(
        out,
        format,
        "service_drops",
        Kind::Counter,
        SERVICE_DROPS_HELP,
        |out| {
            for ((st, _), base) in figures.services.iter().zip(bases) {
                // Only the reasons that dropped something: 12 reasons at 0 for each of
                // 20,000 frontends were 240,000 of a scrape's 340,000 lines (38 MB).
                let dropped = DropReason::ALL.iter().zip(st.drops.iter());
                for (reason, v) in dropped.filter(|(_, v)| **v > 0) {
                    sample(
                        out,
                        "service_drops",
                        Kind::Counter,
                        base,
                        Some(("reason", reason.name())),
                        *v,
                    );
                }
            }
        },
    );
}

/// The per-backend part of [`service_metrics`]; `bases`: each service's labels.
fn backend_metrics(
    out: &mut String,
    view: &AgentView,
    figures: &Figures,
    format: Format,
    bases: &[String],
) {
    // `base,backend="..."` per backend, in the services' order.
    let backend_labels: Vec<Vec<String>> = view
        .services
        .iter()
        .zip(bases)
        .map(|(s, base)| {
            s.backends
                .iter()
                .map(|b| format!("{base},backend=\"{}\"", b.name()))
                .collect()
        })
        .collect();
    let backends = || {
        view.services
            .iter()
            .zip(&figures.services)
            .zip(&backend_labels)
            .flat_map(|((s, (_, stats)), labels)| {
                s.backends
                    .iter()
                    .zip(stats)
                    .zip(labels)
                    .map(move |((b, st), l)| (s, b, st, l))
            })
    };
    let counters: [Figure<BackendStats, u64>; 3] = [
        (
            "backend_packets",
            "Client-to-backend packets per backend",
            |st| st.packets,
        ),
        (
            "backend_bytes",
            "Client-to-backend IP bytes per backend",
            |st| st.bytes,
        ),
        ("backend_new_flows", "New flows per backend", |st| {
            st.new_flows
        }),
    ];
    for (name, help, counter) in counters {
        family(out, format, name, Kind::Counter, help, |out| {
            for (_, _, st, l) in backends() {
                sample(out, name, Kind::Counter, l, None, counter(st));
            }
        });
    }
    family(
        out,
        format,
        "backend_weight",
        Kind::Gauge,
        "Weight per listed backend (0: takes no new flows; in maintenance, draining, or on standby)",
        |out| {
            for (_, b, _, l) in backends() {
                sample(
                    out,
                    "backend_weight",
                    Kind::Gauge,
                    l,
                    None,
                    u64::from(b.weight),
                );
            }
        },
    );
    family(
        out,
        format,
        "zone_new_flows",
        Kind::Counter,
        "New flows per backend whose zone is known, by where the backend is relative to this node's zone (locality: same-zone, other-zone, unknown); sum by locality for the share that stayed in the zone",
        |out| {
            for (s, b, st, l) in backends() {
                let zones = &s.label.zones;
                if zones.backends.is_empty() {
                    continue;
                }
                let name = b.name();
                if let Some(zone) = zones.backends.get(&name) {
                    let l = format!(
                        "{l},zone=\"{}\",locality=\"{}\"",
                        escaped(zone),
                        zones.locality(&name, view.zone.as_deref())
                    );
                    sample(out, "zone_new_flows", Kind::Counter, &l, None, st.new_flows);
                }
            }
        },
    );
}

/// A family read from one kind of stats: (name, help, its value in the stats).
type Figure<S, V> = (&'static str, &'static str, fn(&S) -> V);

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// A family's metadata as the registry writes it (prefix, help with a full stop; in the text
/// format a counter's metadata names it with `_total`, as [`openmetrics_to_text`] does), then
/// its samples; nothing for a family without samples, as the registry does.
fn family(
    out: &mut String,
    format: Format,
    name: &str,
    kind: Kind,
    help: &str,
    samples: impl FnOnce(&mut String),
) {
    let start = out.len();
    let (kind_name, suffix) = match (kind, format) {
        (Kind::Counter, Format::OpenMetrics) => ("counter", ""),
        (Kind::Counter, Format::Text) => ("counter", "_total"),
        (Kind::Gauge, _) => ("gauge", ""),
    };
    let _ = writeln!(out, "# HELP {PREFIX}_{name}{suffix} {help}.");
    let _ = writeln!(out, "# TYPE {PREFIX}_{name}{suffix} {kind_name}");
    let metadata = out.len();
    samples(out);
    if out.len() == metadata {
        out.truncate(start);
    }
}

/// One sample: `labels` (already escaped) and one more label if given.
fn sample(
    out: &mut String,
    name: &str,
    kind: Kind,
    labels: &str,
    extra: Option<(&str, &str)>,
    value: u64,
) {
    let suffix = match kind {
        Kind::Counter => "_total",
        Kind::Gauge => "",
    };
    let _ = match extra {
        Some((k, v)) => writeln!(
            out,
            "{PREFIX}_{name}{suffix}{{{labels},{k}=\"{v}\"}} {value}"
        ),
        None => writeln!(out, "{PREFIX}_{name}{suffix}{{{labels}}} {value}"),
    };
}

/// Every metric's name starts with it.
const PREFIX: &str = "xdplb";

/// A label value as both formats write it: prometheus_client writes values as given, and a
/// service may be named anything (`"`, `\`, a line break).
fn escaped(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn agent_metrics(r: &mut Registry, view: &AgentView) {
    let h = &view.health;
    let tables = gauge_family(
        r,
        "table_entries",
        "Entries in a data path table: flows and sources at the last sweep, ring slots held by rings after the last apply",
    );
    let capacity = gauge_family(r, "table_capacity", "Capacity of a data path table");
    for (table, n, cap) in [
        (
            "flows",
            h.flow_entries as u64,
            view.sizes.flow_entries + view.sizes.flow_entries_v6,
        ),
        (
            "sources",
            h.source_entries as u64,
            view.sizes.source_entries,
        ),
        ("ring_slots", h.ring_slots, view.sizes.ring_slots()),
    ] {
        let l = vec![("table", table.to_string())];
        tables
            .get_or_create(&l)
            .set(i64::try_from(n).unwrap_or(i64::MAX));
        capacity.get_or_create(&l).set(i64::from(cap));
    }
    let swept = counter_family(
        r,
        "swept_entries",
        "Flow entries the agent's sweeps removed (flows that are over; the data path reuses the slots of refilled, quiet rate-limit sources itself)",
    );
    swept
        .get_or_create(&vec![("table", "flows".to_string())])
        .inc_by(h.swept_flows);
    let reloads = counter_family(r, "config_reloads", "Config reloads by result");
    for (result, n) in [
        ("applied", h.reloads_applied),
        ("rejected", h.reloads_rejected),
    ] {
        reloads
            .get_or_create(&vec![("result", result.to_string())])
            .inc_by(n);
    }
    let ready = gauge_family(
        r,
        "ready",
        "1 when the desired state is applied and the data path attached",
    );
    ready.get_or_create(&vec![]).set(i64::from(h.ready));
    let not_served = gauge_family(
        r,
        "services_not_served",
        "Services of the desired state not served: the node cannot serve them, or the maps have no room for them yet (lb-agent status says which and why)",
    );
    not_served
        .get_or_create(&vec![])
        .set(i64::try_from(h.not_served.len()).unwrap_or(i64::MAX));
    let attached = gauge_family(
        r,
        "interface_attached",
        "Interfaces the data path is attached to, with its program and hook (xdp-native, xdp-generic, tcx, tc-classic)",
    );
    for i in &view.interfaces {
        attached
            .get_or_create(&vec![
                ("interface", escaped(&i.name)),
                ("program", i.program.clone()),
                ("hook", i.hook.clone()),
            ])
            .set(1);
    }
    let delivery = gauge_family(
        r,
        "interface_delivery",
        "Backend interfaces by how packets for their local backends are delivered: redirect (in XDP, straight into the interface), kernel (handed to lb_uplink_tc, which sends them out of the interface through its TC egress hook) or netfilter (through the kernel's forwarding both ways, netfilter's forward path included)",
    );
    for i in &view.interfaces {
        if let Some(d) = &i.delivery {
            delivery
                .get_or_create(&vec![
                    ("interface", escaped(&i.name)),
                    ("delivery", d.clone()),
                ])
                .set(1);
        }
    }
}

fn kubernetes_metrics(r: &mut Registry, k: &KubeHealth, sync_latency: Option<&Histogram>) {
    let synced = Gauge::<i64>::default();
    synced.set(i64::from(k.synced));
    r.register(
        "kubernetes_synced",
        "1 while Services and EndpointSlices are listed and watched",
        synced,
    );
    let objects = gauge_family(
        r,
        "kubernetes_objects",
        "Kubernetes objects seen, by kind (services_enabled: those that opted in)",
    );
    for (kind, n) in [
        ("services", k.services_seen),
        ("endpointslices", k.slices_seen),
        ("services_enabled", k.services_enabled),
        ("frontends", k.frontends),
    ] {
        objects
            .get_or_create(&vec![("kind", kind.into())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    for (name, help, v) in [
        (
            "kubernetes_watch_events",
            "Watch events received",
            k.watch_events,
        ),
        (
            "kubernetes_watch_errors",
            "Watch errors (each followed by a fresh list)",
            k.watch_errors,
        ),
        (
            "kubernetes_apply_errors",
            "States from the cluster that could not be applied (the last good one stayed)",
            k.apply_errors,
        ),
        (
            "kubernetes_flows_ended",
            "Flows ended when a backend's deregistration delay ran out",
            k.flows_ended,
        ),
    ] {
        let c = PromCounter::<u64>::default();
        c.inc_by(v);
        r.register(name, help, c);
    }
    let problems = Gauge::<i64>::default();
    problems.set(i64::try_from(k.problems).unwrap_or(i64::MAX));
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

/// OpenMetrics text as the Prometheus text format 0.0.4: a counter family's HELP and TYPE name
/// its samples (`foo_total`, where OpenMetrics names the family `foo`), `unknown` is `untyped`,
/// and UNIT and EOF lines go.
fn openmetrics_to_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    // The families' metadata comes first (HELP, then TYPE), then their samples: hold the HELP
    // line until the TYPE line says whether the name needs `_total`.
    let mut help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "unknown" => (name.to_string(), "untyped"),
                other => (name.to_string(), other),
            };
            if let Some((_, text)) = help.take() {
                let _ = writeln!(out, "# HELP {name} {text}");
            }
            let _ = writeln!(out, "# TYPE {name} {kind}");
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
