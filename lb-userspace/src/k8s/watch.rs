//! Keeps a [`Cluster`] current from the API server: watchers on Services and EndpointSlices in
//! all namespaces, and on this node's Node object (its zone label). A list (at start, and again after any error, with backoff) is
//! collected from Init to InitDone and swapped in whole, so nothing downstream ever sees a
//! half-listed cluster (no empty backend set while endpoints exist). While the API server is
//! unreachable the last state stays in force and `synced()` says no.
//!
//! A hung API server (connection open, no answers) sends no error, only silence, which a quiet
//! cluster sends too: a probe asks it a cheap question ([`PROBE_EVERY`], answered within
//! [`PROBE_TIMEOUT`]). Unanswered, `synced()` says no and the watchers start over with a fresh
//! list (their connection may be the dead one); answered again, `synced()` follows the lists.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service as KubeService},
    discovery::v1::EndpointSlice,
};
use kube::{Api, Client, ResourceExt, runtime::watcher};
use log::{info, warn};
use tokio::{
    sync::{Notify, watch as signal},
    task::JoinHandle,
};

use super::{Cluster, ObjectKey, SERVICE_NAME_LABEL, Slices, service::Service, slice::Slice};

/// How the watchers are doing.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WatchStatus {
    pub services_synced: bool,
    pub slices_synced: bool,
    pub node_synced: bool,
    pub errors: u64,
    pub last_error: Option<String>,
    /// When the cluster last changed (for sync-latency metrics).
    #[serde(skip)]
    pub last_change: Option<Instant>,
    /// Watch events received.
    pub events: u64,
    /// The probe's question went unanswered (why); `None` once it is answered.
    pub unanswered: Option<String>,
}

impl WatchStatus {
    pub fn synced(&self) -> bool {
        self.services_synced && self.slices_synced && self.node_synced && self.unanswered.is_none()
    }
}

/// How often the probe asks the API server for its version, and how long an answer may take.
/// A hung server is noticed within the sum (a crashed one at once: its connections fail). The
/// answer is a few milliseconds from a live server; the timeout leaves a loaded one (or a far
/// one) a wide margin, since an unanswered probe also makes the watchers list again.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Watch {
    pub cluster: Arc<Mutex<Cluster>>,
    /// Notified on every change.
    pub changed: Arc<Notify>,
    pub status: Arc<Mutex<WatchStatus>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn object_key<K: ResourceExt>(o: &K) -> ObjectKey {
    (o.namespace().unwrap_or_default(), o.name_any())
}

/// Which list a watcher keeps.
#[derive(Clone, Copy)]
enum Kind {
    Services,
    Slices,
    Node,
}

impl Watch {
    /// Starts the watchers (they run until the Watch is dropped); `node`: this node's name.
    pub fn start(client: Client, node: &str) -> Watch {
        let cluster = Arc::new(Mutex::new(Cluster::default()));
        let changed = Arc::new(Notify::new());
        let status = Arc::new(Mutex::new(WatchStatus::default()));
        let services: Api<KubeService> = Api::all(client.clone());
        let slices: Api<EndpointSlice> = Api::all(client.clone());
        let nodes: Api<Node> = Api::all(client.clone());
        // Bumped by the probe: the watchers start over.
        let (restart, restarts) = signal::channel(0u64);
        let tasks = vec![
            tokio::spawn(run(
                services,
                watcher::Config::default(),
                Kind::Services,
                Shared {
                    cluster: cluster.clone(),
                    changed: changed.clone(),
                    status: status.clone(),
                    restarts: restarts.clone(),
                },
            )),
            tokio::spawn(run(
                slices,
                // Only slices that belong to a Service.
                watcher::Config::default().labels(SERVICE_NAME_LABEL),
                Kind::Slices,
                Shared {
                    cluster: cluster.clone(),
                    changed: changed.clone(),
                    status: status.clone(),
                    restarts: restarts.clone(),
                },
            )),
            tokio::spawn(run(
                nodes,
                // Only this node (a list that finds none is synced too: no zone).
                watcher::Config::default().fields(&format!("metadata.name={node}")),
                Kind::Node,
                Shared {
                    cluster: cluster.clone(),
                    changed: changed.clone(),
                    status: status.clone(),
                    restarts,
                },
            )),
            tokio::spawn(probe(client, status.clone(), changed.clone(), restart)),
        ];
        Watch {
            cluster,
            changed,
            status,
            tasks,
        }
    }

    pub fn synced(&self) -> bool {
        lock(&self.status).synced()
    }

    /// The cluster as the watchers have it, held while the guard lives. The watchers run on
    /// the agent's own thread, so holding it costs them nothing; a copy of every object at each
    /// step cost more than translating them.
    pub fn cluster(&self) -> std::sync::MutexGuard<'_, Cluster> {
        lock(&self.cluster)
    }

    pub fn status(&self) -> WatchStatus {
        lock(&self.status).clone()
    }
}

/// Backoff between watcher restarts: doubling from the first to the last, with jitter so that
/// the nodes of a cluster do not all come back at the same instant after an API server restart.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What a watcher shares with the rest.
struct Shared {
    cluster: Arc<Mutex<Cluster>>,
    changed: Arc<Notify>,
    status: Arc<Mutex<WatchStatus>>,
    /// Changes when the probe found the API server not answering.
    restarts: signal::Receiver<u64>,
}

/// Asks the API server for its version every [`PROBE_EVERY`]: no answer within
/// [`PROBE_TIMEOUT`] marks the watch not synced and restarts the watchers; an answer clears the
/// mark.
async fn probe(
    client: Client,
    status: Arc<Mutex<WatchStatus>>,
    changed: Arc<Notify>,
    restart: signal::Sender<u64>,
) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let problem = match tokio::time::timeout(PROBE_TIMEOUT, client.apiserver_version()).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("the API server's version: {e}")),
            Err(_) => Some(format!(
                "the API server did not answer within {PROBE_TIMEOUT:?}"
            )),
        };
        let mut s = lock(&status);
        if s.unanswered == problem {
            continue;
        }
        match &problem {
            Some(why) => {
                warn!("{why}: not ready; watching again from a fresh list");
                s.errors += 1;
                s.last_error = Some(why.clone());
                restart.send_modify(|n| *n += 1);
            }
            None => info!("the API server answers again"),
        }
        s.unanswered = problem;
        drop(s);
        changed.notify_one();
    }
}

/// One watcher, forever. On any error (or a restart from the probe) the stream is dropped and,
/// after a backoff, started again with a fresh list (served from the API server's watch
/// cache). The new list is swapped in whole at its end, so a restart flaps nothing, and `synced`
/// is exact: false from the error until the new list is in.
async fn run<K>(api: Api<K>, config: watcher::Config, kind: Kind, mut shared: Shared)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static
        + Store,
{
    let Shared {
        cluster,
        changed,
        status,
        restarts,
    } = &mut shared;
    let mut backoff = BACKOFF_FIRST;
    loop {
        let mut stream = watcher(api.clone(), config.clone()).boxed();
        // Objects of a list in progress.
        let mut relist: Vec<K::Kept> = Vec::new();
        restarts.borrow_and_update();
        loop {
            let event = tokio::select! {
                event = stream.next() => event,
                Ok(()) = restarts.changed() => {
                    *kind.synced(&mut lock(status)) = false;
                    None
                }
            };
            let Some(event) = event else {
                break;
            };
            match event {
                Ok(watcher::Event::Init) => relist.clear(),
                Ok(watcher::Event::InitApply(o)) => relist.push(o.keep()),
                Ok(watcher::Event::InitDone) => {
                    let n = relist.len();
                    K::replace_all(&mut lock(cluster), std::mem::take(&mut relist));
                    let mut s = lock(status);
                    *kind.synced(&mut s) = true;
                    backoff = BACKOFF_FIRST;
                    drop(s);
                    info!("{}: listed {n}", K::NAME);
                    note_change(status, changed);
                }
                Ok(watcher::Event::Apply(o)) => {
                    K::apply(&mut lock(cluster), o.keep());
                    note_change(status, changed);
                }
                Ok(watcher::Event::Delete(o)) => {
                    K::delete(&mut lock(cluster), &o);
                    note_change(status, changed);
                }
                Err(e) => {
                    let mut s = lock(status);
                    s.errors += 1;
                    *kind.synced(&mut s) = false;
                    let msg = e.to_string();
                    if s.last_error.as_deref() != Some(&msg) {
                        warn!(
                            "watching {}: {msg} (retrying; the data path serves the last state)",
                            K::NAME
                        );
                    }
                    s.last_error = Some(msg);
                    break;
                }
            }
        }
        tokio::time::sleep(jitter(backoff)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn note_change(status: &Mutex<WatchStatus>, changed: &Notify) {
    let mut s = lock(status);
    s.events += 1;
    s.last_change = Some(Instant::now());
    drop(s);
    changed.notify_one();
}

/// Between half and all of `d`.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    d / 2 + d.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

impl Kind {
    fn synced(self, s: &mut WatchStatus) -> &mut bool {
        match self {
            Kind::Services => &mut s.services_synced,
            Kind::Slices => &mut s.slices_synced,
            Kind::Node => &mut s.node_synced,
        }
    }
}

/// How a watched kind goes into the cluster.
trait Store: Sized {
    const NAME: &'static str;
    /// What the cluster keeps of an object.
    type Kept;
    /// Drops what the translation never reads, as the object comes (a list is held whole until
    /// it ends): at 10,000 Services the objects as listed were 220 MiB of the agent's 500
    /// (managedFields alone 63 MiB, a JSON tree per object). What stays is what `k8s` reads:
    /// a field it starts to read must be kept here.
    fn keep(self) -> Self::Kept;
    fn replace_all(c: &mut Cluster, all: Vec<Self::Kept>);
    fn apply(c: &mut Cluster, o: Self::Kept);
    fn delete(c: &mut Cluster, o: &Self);
}

/// Annotations a Service is read by: the agent's own and the topology ones (not, say,
/// kubectl's last-applied-configuration, a copy of the whole object).
pub(super) fn service_annotation(key: &str) -> bool {
    key.starts_with("xdplb.io/")
        || key.starts_with(super::RATE_LIMIT_FIELD)
        || key == super::topology::TOPOLOGY_MODE
        || key == super::topology::TOPOLOGY_AWARE_HINTS
}

impl Store for KubeService {
    const NAME: &'static str = "services";
    /// Its (namespace, name) and what the translation reads ([`Service`]).
    type Kept = (ObjectKey, Service);
    fn keep(self) -> (ObjectKey, Service) {
        (object_key(&self), Service::from(self))
    }
    fn replace_all(c: &mut Cluster, all: Vec<(ObjectKey, Service)>) {
        c.services = all.into_iter().collect();
        c.touched = None;
    }
    fn apply(c: &mut Cluster, (key, o): (ObjectKey, Service)) {
        c.touch(&key);
        c.services.insert(key, o);
    }
    fn delete(c: &mut Cluster, o: &Self) {
        let key = object_key(o);
        c.touch(&key);
        c.services.remove(&key);
    }
}

/// A slice as kept: its (namespace, name), the Service it belongs to (its label), and its
/// fields the translation reads.
type KeptSlice = (ObjectKey, Option<String>, Slice);

impl Store for EndpointSlice {
    const NAME: &'static str = "endpointslices";
    type Kept = KeptSlice;
    fn keep(self) -> KeptSlice {
        let key = object_key(&self);
        let service = self
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned();
        (key, service, Slice::from(self))
    }
    fn replace_all(c: &mut Cluster, all: Vec<KeptSlice>) {
        let mut slices: BTreeMap<ObjectKey, Slices> = BTreeMap::new();
        for ((ns, name), service, s) in all {
            if let Some(service) = service {
                slices
                    .entry((ns, service))
                    .or_default()
                    .insert(name, Box::new(s));
            }
        }
        c.slices = slices;
        c.touched = None;
    }
    fn apply(c: &mut Cluster, (key, service, s): KeptSlice) {
        // A slice may have been relabelled to another service: drop it everywhere first
        // (where it was, in the common case: the Service it names still).
        remove_slice(c, &key, service.as_deref());
        if let Some(service) = service {
            let (ns, name) = key;
            let key = (ns, service);
            c.touch(&key);
            c.slices.entry(key).or_default().insert(name, Box::new(s));
        }
    }
    fn delete(c: &mut Cluster, o: &Self) {
        let service = o
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        remove_slice(c, &object_key(o), service.map(String::as_str));
    }
}

/// Removes the slice (namespace, name) from whichever Service has it, looking first at
/// `likely`'s (a slice is kept under one Service at most): at 10,000 Services in a namespace,
/// looking at all of them was a walk per slice event.
fn remove_slice(c: &mut Cluster, (ns, name): &ObjectKey, likely: Option<&str>) {
    if let Some(service) = likely {
        let key = (ns.clone(), service.to_string());
        if let Some(per_service) = c.slices.get_mut(&key)
            && per_service.remove(name).is_some()
        {
            if per_service.is_empty() {
                c.slices.remove(&key);
            }
            c.touch(&key);
            return;
        }
    }
    let mut had = None;
    for (key, per_service) in &mut c.slices {
        if key.0 == *ns && per_service.remove(name).is_some() {
            had = Some(key.clone());
        }
    }
    if let Some(key) = had {
        c.touch(&key);
    }
    c.slices.retain(|_, v| !v.is_empty());
}

impl Store for Node {
    const NAME: &'static str = "nodes";
    type Kept = Node;
    fn keep(mut self) -> Node {
        // One object, whose labels (its zone) are read: only the big parts go.
        self.metadata.managed_fields = None;
        if let Some(status) = &mut self.status {
            status.images = None;
        }
        self
    }
    fn replace_all(c: &mut Cluster, all: Vec<Self>) {
        c.node = all.into_iter().next();
    }
    fn apply(c: &mut Cluster, o: Self) {
        c.node = Some(o);
    }
    fn delete(c: &mut Cluster, _: &Self) {
        c.node = None;
    }
}
