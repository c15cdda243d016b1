//! Kubernetes as an input of desired state: Services that opt in and their EndpointSlices,
//! read the way kube-proxy reads them, become `model::Service`s the reconciler applies like the
//! config file's. This file is the translation (pure: objects in, services out); `watch` keeps
//! the objects current. Each Service's own part of it is kept while the versions of its objects
//! and the node's inputs stay the same ([`Translator`]); claims and drains are decided anew.
//!
//! Opt-in: the annotation `xdplb.io/enabled: "true"` (boolean annotations are read as Go's
//! `strconv.ParseBool` reads them, so `"True"` and `"1"` opt in too; a value it would not
//! understand is reported). kube-proxy keeps handling the Service's
//! ClusterIP (in-cluster clients); the agent serves its external entry points, where XDP sees
//! packets before kube-proxy's rules do: `status.loadBalancer.ingress` IPs, `spec.externalIPs`,
//! and the `nodePort` on this node's addresses (where an NLB with instance targets sends).
//!
//! Endpoints, per service port, as kube-proxy takes them (KEP-1669): the ready ones; if there is
//! none, the terminating ones that still serve. With `externalTrafficPolicy: Local`, only this
//! node's (by `nodeName`), and the client's address is kept. An endpoint that stops being used
//! drains like an NLB target: it keeps its flows but gets no new ones for the deregistration
//! delay, then its flows are ended.
//!
//! Zone-aware routing ([`topology`]), for externalTrafficPolicy Cluster: kube-proxy's rules on
//! the slices' hints, with hints derived from the endpoints' zones where the slices have none
//! and the Service asks (trafficDistribution, or the node option `prefer-same-zone`). This
//! node's zone is its Node's `topology.kubernetes.io/zone` label. Ready endpoints the choice
//! leaves out stay backends at weight 0 ("standby"): no new flows, and their flows go on.
//!
//! Changing the traffic policy (Cluster <-> Local), the mode or the ports never interrupts what
//! stays valid: new flows follow the new settings at once; a flow keeps the backend and the
//! translation (snat or not) it was opened with until it ends or its backend's drain does.
//!
//! Tenant safety: a Service may not claim a reserved address ([`crate::reserved`]) as a
//! load-balancer ingress IP or externalIP; that frontend is left out and reported. Two Services
//! claiming one frontend (VIP, port, protocol): the older one (creationTimestamp, then uid)
//! keeps it, whatever their names, and the newer one is reported; a newer Service never takes
//! over a live VIP.
pub mod drains;
pub mod events;
pub mod health;
pub mod input;
pub mod service;
pub mod slice;
pub mod topology;
pub mod watch;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{api::core::v1::Node, jiff::Timestamp};

// The Service as kept, under the API's names: the translation reads both alike.
use self::service::{Port as ServicePort, Service as KubeService, Spec as ServiceSpec};
use self::topology::{Candidate, Preference, Role};
use crate::{
    config::RawPolicy,
    maglev::MAX_WEIGHT,
    model::{Backend, Cidr, Frontend, Mode, Origin, Policy, Protocol, Service, SourceRanges},
    reserved::Reserved,
};

pub const ENABLED: &str = "xdplb.io/enabled";
pub const MODE: &str = "xdplb.io/mode";
pub const WEIGHTS: &str = "xdplb.io/backend-weights";
pub const DEREGISTRATION_DELAY: &str = "xdplb.io/deregistration-delay-seconds";
pub const DEREGISTRATION_RESET: &str = "xdplb.io/deregistration-reset";
pub const RATE_LIMIT: &str = "xdplb.io/rate-limit";
/// `allow` (default) or `deny`: `spec.loadBalancerSourceRanges` lists the only sources admitted,
/// or the ones refused.
pub const SOURCE_RANGES_MODE: &str = "xdplb.io/source-ranges-mode";
/// Per-service policy fields: `rate-limit.xdplb.io/<field>`, fields as in the config file.
pub const RATE_LIMIT_FIELD: &str = "rate-limit.xdplb.io/";
/// The label EndpointSlices name their Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// NLB's default deregistration delay, and its range.
pub const DEFAULT_DEREGISTRATION_DELAY: Duration = Duration::from_secs(300);
const MAX_DEREGISTRATION_DELAY: u64 = 3600;
/// Kubernetes' default ClientIP affinity timeout.
const DEFAULT_AFFINITY_TIMEOUT: u64 = 10_800;

/// (namespace, name).
pub type ObjectKey = (String, String);

/// A Service's EndpointSlices by name, as kept ([`slice::Slice`]). Boxed: a map node holds room
/// for 11 values, and most Services have one slice (at 10,000 Services, 49 MiB of room for
/// slices never there).
pub type Slices = BTreeMap<String, Box<slice::Slice>>;

/// The objects as the watchers last saw them.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub services: BTreeMap<ObjectKey, service::Service>,
    /// (namespace, service name) -> slice name -> slice.
    pub slices: BTreeMap<ObjectKey, Slices>,
    /// This node's Node object (for its zone), if it exists.
    pub node: Option<Node>,
    /// The Services (namespace, name) whose object or slices the watchers changed since the
    /// translator last took them ([`Cluster::take_touched`]); `None`: any may have (a list).
    pub touched: Option<BTreeSet<ObjectKey>>,
}

impl Cluster {
    /// Notes that the Service `key`'s object or slices changed.
    pub fn touch(&mut self, key: &ObjectKey) {
        if let Some(touched) = &mut self.touched
            && !touched.contains(key)
        {
            touched.insert(key.clone());
        }
    }

    /// The Services touched since the last call (`None`: any may have been), for
    /// [`Translator::translate_touched`].
    pub fn take_touched(&mut self) -> Option<BTreeSet<ObjectKey>> {
        self.touched.replace(BTreeSet::new())
    }

    pub fn slice_count(&self) -> usize {
        self.slices.values().map(BTreeMap::len).sum()
    }

    /// This node's pod ranges: its Node's `spec.podCIDRs` (or the older `spec.podCIDR`), those
    /// that parse. (Clusters whose CNI gives pods addresses of the VPC, as the AWS VPC CNI does,
    /// have none.)
    pub fn node_pod_ranges(&self) -> Vec<Cidr> {
        let Some(spec) = self.node.as_ref().and_then(|n| n.spec.as_ref()) else {
            return Vec::new();
        };
        let listed = spec.pod_cidrs.iter().flatten();
        listed
            .chain(spec.pod_cidr.iter())
            .filter_map(|c| c.parse().ok())
            .fold(Vec::new(), |mut all, c: Cidr| {
                if !all.contains(&c) {
                    all.push(c);
                }
                all
            })
    }

    /// This node's zone: its Node's `topology.kubernetes.io/zone` label.
    pub fn node_zone(&self) -> Option<String> {
        self.node
            .as_ref()?
            .metadata
            .labels
            .as_ref()?
            .get(topology::ZONE_LABEL)
            .filter(|z| !z.is_empty())
            .cloned()
    }
}

/// What the translation needs to know about this node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    /// The Node's name (EndpointSlice `nodeName`).
    pub name: String,
    /// Addresses NodePorts are served on (the uplinks').
    pub addrs: Vec<IpAddr>,
    /// What a Service may not claim as a load-balancer ingress IP or externalIP.
    pub reserved: Reserved,
    /// Its zone (the Node's `topology.kubernetes.io/zone` label).
    pub zone: Option<String>,
    /// Same zone first for Services that ask nothing of topology (node option).
    pub prefer_same_zone: bool,
}

/// The `reason` of a problem's Event: one per kind of problem (CamelCase, as Kubernetes' own).
pub mod reason {
    /// An `xdplb.io/*` annotation's value is not understood.
    pub const INVALID_ANNOTATION: &str = "InvalidAnnotation";
    /// `spec.loadBalancerSourceRanges` (or its mode) cannot be read: the Service is not served.
    pub const INVALID_SOURCE_RANGES: &str = "InvalidSourceRanges";
    /// A load-balancer ingress IP or externalIP that is no IP address.
    pub const INVALID_ADDRESS: &str = "InvalidAddress";
    /// A frontend on an address the node reserves.
    pub const RESERVED_ADDRESS: &str = "ReservedAddress";
    /// A frontend an older Service (or the config file) already has.
    pub const FRONTEND_CLAIMED: &str = "FrontendClaimed";
    /// An endpoint address that is no address of its slice's type.
    pub const BAD_ENDPOINT: &str = "BadEndpoint";
    /// A service port no EndpointSlice port matches.
    pub const UNMATCHED_PORT: &str = "UnmatchedTargetPort";
    /// A frontend the data path has no room for (or cannot serve as asked).
    pub const NOT_SERVED: &str = "FrontendNotServed";
    /// `spec.trafficDistribution` has a value the agent does not know.
    pub const INVALID_TRAFFIC_DISTRIBUTION: &str = "InvalidTrafficDistribution";
}

/// Something wrong with an object: reported (Kubernetes Event and log), never fatal.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub object: ObjectKey,
    /// One of [`reason`].
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

impl Problem {
    /// A problem with the service `origin` names at `frontend`; `None` if it did not come from
    /// the cluster (there is no Service to report it on).
    pub fn for_service(
        origin: &Origin,
        frontend: &Frontend,
        reason: &'static str,
        message: String,
    ) -> Option<Problem> {
        let (namespace, name) = origin.kubernetes_object()?;
        Some(Problem {
            object: (namespace.to_string(), name.to_string()),
            reason,
            field: format!("frontend {frontend}"),
            message,
        })
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Service {}/{}: {}: {}",
            self.object.0, self.object.1, self.field, self.message
        )
    }
}

/// Flows to end: a backend whose deregistration delay ran out.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EndFlows {
    pub frontend: Frontend,
    pub backend: (IpAddr, u16),
    /// Answer their next packets with a TCP RST (else just forget them).
    pub reset: bool,
}

/// A health-check node port (externalTrafficPolicy Local): answered 200 while this node has a
/// ready local endpoint, 503 otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub service: ObjectKey,
    pub local_endpoints: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Translation {
    /// Shared with the translator, which hands out the same service again while nothing it is
    /// made of changed (a copy of every one per change cost more than the rest of it).
    pub services: Vec<Arc<Service>>,
    /// Per-service policies from annotations, named `service:<ns>/<name>`.
    pub policies: BTreeMap<String, Policy>,
    pub problems: Vec<Problem>,
    pub health_checks: Vec<HealthCheck>,
    pub end_flows: Vec<EndFlows>,
    /// Backends kept at weight 0 only until their deregistration delay runs out (they are no
    /// longer endpoints, or terminating): "draining", unlike a weight of 0 by annotation.
    pub draining: BTreeSet<(Frontend, (IpAddr, u16))>,
    /// Ready endpoints kept at weight 0 because closer ones take the new flows (zone-aware
    /// routing): "standby".
    pub standby: BTreeSet<(Frontend, (IpAddr, u16))>,
    /// How each frontend's new flows are kept close, where topology was asked for or hinted.
    pub routing: BTreeMap<Frontend, Routing>,
    /// The zone of each endpoint address whose slice names one.
    pub zones: BTreeMap<IpAddr, String>,
    /// This node's zone.
    pub node_zone: Option<String>,
    /// Which translation of its translator this is (1 for the first).
    pub round: u64,
    /// The frontends whose service (or its absence) may differ from the translation of the
    /// round before, which the rest of `services` equals; `None`: any may.
    pub changed: Option<BTreeSet<Frontend>>,
}

/// How a frontend's new flows are kept close (zone-aware routing), for `lb-agent status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routing {
    /// Who asked: `trafficDistribution PreferClose`, `topology-mode Auto`, the node option;
    /// `None`: nobody, the slices have hints.
    pub asked: Option<String>,
    pub scope: topology::Scope,
    /// This node's zone, or name for [`topology::Scope::SameNode`].
    pub place: Option<String>,
    pub fallback: Option<topology::Fallback>,
    /// Endpoints that take new flows, of those ready.
    pub taking: usize,
    pub ready: usize,
}

impl std::fmt::Display for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = self.place.as_deref().unwrap_or("?");
        match (self.scope, &self.fallback) {
            (topology::Scope::SameZone, _) => write!(f, "same zone ({place})")?,
            (topology::Scope::SameNode, _) => write!(f, "same node ({place})")?,
            (topology::Scope::Everywhere, Some(why)) => write!(f, "all endpoints ({why})")?,
            (topology::Scope::Everywhere, None) => f.write_str("all endpoints")?,
        }
        write!(
            f,
            ": {} of {} ready endpoints take new flows",
            self.taking, self.ready
        )?;
        match &self.asked {
            Some(by) => write!(f, "; asked by {by}"),
            None => f.write_str("; the slices' hints"),
        }
    }
}

/// How a Service's endpoints drain when they go: NLB's deregistration delay, and whether their
/// flows then end with a RST.
#[derive(Clone, Copy, Debug)]
struct Drain {
    delay: Duration,
    reset: bool,
}

/// A Service's settings, from its spec and annotations (bad annotations reported, defaults used).
struct Settings {
    /// externalTrafficPolicy: Local.
    local_only: bool,
    mode: Mode,
    /// By pod name or address.
    weights: BTreeMap<String, u32>,
    drain: Drain,
    policy: Option<String>,
    affinity: Option<Duration>,
    /// What the Service (or the node option) asks of topology, and who asked.
    preference: (Preference, Option<String>),
}

impl Settings {
    fn read(
        key: &ObjectKey,
        svc: &KubeService,
        spec: &ServiceSpec,
        node: &NodeInfo,
        named_policies: &BTreeSet<String>,
        out: &mut Translation,
    ) -> Settings {
        let annotations = svc
            .metadata
            .annotations
            .as_ref()
            .map(service::Annotations::to_map)
            .unwrap_or_default();
        let local_only = spec.external_traffic_policy.as_deref() == Some("Local");
        let problem = |field: &str, message: String| Problem {
            object: key.clone(),
            reason: reason::INVALID_ANNOTATION,
            field: field.to_string(),
            message,
        };
        let weights = parse_weights(annotations.get(WEIGHTS)).unwrap_or_else(|m| {
            out.problems.push(problem(WEIGHTS, m));
            BTreeMap::new()
        });
        let mode = mode(local_only, annotations.get(MODE)).unwrap_or_else(|(mode, m)| {
            out.problems.push(problem(MODE, m));
            mode
        });
        let (drain, drain_problems) = drain(&annotations);
        for (field, m) in drain_problems {
            out.problems.push(problem(field, m));
        }
        Settings {
            local_only,
            mode,
            weights,
            drain,
            policy: Translator::policy(key, &annotations, named_policies, out),
            affinity: affinity(spec),
            preference: preference(key, spec, &annotations, node.prefer_same_zone, out),
        }
    }

    /// The endpoints a frontend sends to, with their weights (0 for those on standby).
    /// Dual-stack Services have a slice per family: a frontend takes its own family's endpoints
    /// (the data path does not translate between IPv4 and IPv6).
    fn weighted(
        &self,
        endpoints: &[(Endpoint, Role)],
        frontend: &Frontend,
    ) -> BTreeMap<(IpAddr, u16), u32> {
        let mut out = BTreeMap::new();
        for (e, role) in endpoints {
            if e.addr.is_ipv4() != frontend.vip.is_ipv4() {
                continue;
            }
            let w = match role {
                Role::Unused => continue,
                Role::Standby => 0,
                Role::Takes => e
                    .target
                    .as_ref()
                    .and_then(|t| self.weights.get(t))
                    .or_else(|| self.weights.get(&e.addr.to_string()))
                    .copied()
                    .unwrap_or(1),
            };
            // An address in two slices: the role that takes new flows wins.
            let slot = out.entry((e.addr, e.port)).or_insert(w);
            *slot = (*slot).max(w);
        }
        out
    }
}

/// What a Service asks of topology: `spec.trafficDistribution`, else the topology-mode
/// annotation (read by the EndpointSlice controller, which then writes hints), else the node
/// option for Services that say nothing. With the name of who asked.
fn preference(
    key: &ObjectKey,
    spec: &ServiceSpec,
    annotations: &BTreeMap<String, String>,
    node_option: bool,
    out: &mut Translation,
) -> (Preference, Option<String>) {
    let asked = |p: Preference, by: String| (p, Some(by));
    if let Some(value) = spec.traffic_distribution.as_deref() {
        match value {
            topology::PREFER_CLOSE | topology::PREFER_SAME_ZONE => {
                return asked(Preference::SameZone, format!("trafficDistribution {value}"));
            }
            topology::PREFER_SAME_NODE => {
                return asked(Preference::SameNode, format!("trafficDistribution {value}"));
            }
            // The API server refuses other values; one that got through is said, and the
            // Service is treated as asking nothing.
            other => out.problems.push(Problem {
                object: key.clone(),
                reason: reason::INVALID_TRAFFIC_DISTRIBUTION,
                field: "spec.trafficDistribution".into(),
                message: format!(
                    "`{other}`: {}, {} or {}; ignored",
                    topology::PREFER_CLOSE,
                    topology::PREFER_SAME_ZONE,
                    topology::PREFER_SAME_NODE
                ),
            }),
        }
    }
    let mode = annotations
        .get(topology::TOPOLOGY_MODE)
        .map(|v| (topology::TOPOLOGY_MODE, v))
        .or_else(|| {
            annotations
                .get(topology::TOPOLOGY_AWARE_HINTS)
                .map(|v| (topology::TOPOLOGY_AWARE_HINTS, v))
        });
    match mode {
        // The controller's spellings.
        Some((_, v)) if v == "Auto" || v == "auto" => {
            asked(Preference::Allotted, "topology-mode Auto".into())
        }
        Some((_, v)) if v.is_empty() || v == "Disabled" || v == "disabled" => {
            (Preference::Unstated, None)
        }
        Some((field, v)) => {
            out.problems.push(Problem {
                object: key.clone(),
                reason: reason::INVALID_ANNOTATION,
                field: field.into(),
                message: format!("`{v}`: Auto or Disabled; read as Disabled, as Kubernetes does"),
            });
            (Preference::Unstated, None)
        }
        None if node_option => asked(
            Preference::SameZone,
            "the node option prefer-same-zone".into(),
        ),
        None => (Preference::Unstated, None),
    }
}

/// The forwarding mode: preserve-client-ip with externalTrafficPolicy Local (which also allows
/// snat: source NAT to the node, local endpoints only), else snat. `Err`: the mode used, and
/// what is wrong with the annotation.
fn mode(local_only: bool, annotation: Option<&String>) -> Result<Mode, (Mode, String)> {
    let default = if local_only {
        Mode::PreserveClientIp
    } else {
        Mode::Snat
    };
    // Our own values, read whatever their case.
    let value = annotation.map(|v| v.trim().to_ascii_lowercase());
    match value.as_deref() {
        None => Ok(default),
        Some("snat") => Ok(Mode::Snat),
        Some("preserve-client-ip") if local_only => Ok(Mode::PreserveClientIp),
        Some("preserve-client-ip") => Err((
            Mode::Snat,
            "preserve-client-ip needs externalTrafficPolicy: Local (remote endpoints would need direct server return); using snat".into(),
        )),
        Some(_) => Err((
            default,
            format!(
                "`{}`: snat or preserve-client-ip; using the default, {default}",
                annotation.map_or("", String::as_str)
            ),
        )),
    }
}

/// The drain settings, and what is wrong with their annotations (field, message): defaults
/// are used for those.
fn drain(annotations: &BTreeMap<String, String>) -> (Drain, Vec<(&'static str, String)>) {
    let mut problems = Vec::new();
    let delay = match annotations
        .get(DEREGISTRATION_DELAY)
        .map(|v| v.parse::<u64>())
    {
        None => DEFAULT_DEREGISTRATION_DELAY,
        Some(Ok(s)) if s <= MAX_DEREGISTRATION_DELAY => Duration::from_secs(s),
        Some(_) => {
            problems.push((
                DEREGISTRATION_DELAY,
                format!(
                    "must be whole seconds 0..={MAX_DEREGISTRATION_DELAY}; using {}",
                    DEFAULT_DEREGISTRATION_DELAY.as_secs()
                ),
            ));
            DEFAULT_DEREGISTRATION_DELAY
        }
    };
    let reset = match annotations.get(DEREGISTRATION_RESET) {
        None => false,
        Some(v) => parse_bool(v).unwrap_or_else(|| {
            problems.push((
                DEREGISTRATION_RESET,
                format!("`{v}`: true or false; using false"),
            ));
            false
        }),
    };
    (Drain { delay, reset }, problems)
}

/// `sessionAffinity: ClientIP` with its timeout (Kubernetes' default if unset).
fn affinity(spec: &ServiceSpec) -> Option<Duration> {
    (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        let t = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
        Duration::from_secs(t.max(1))
    })
}

/// A backend being drained.
#[derive(Clone, Debug)]
struct Draining {
    until: Instant,
    reset: bool,
}

/// Turns the cluster into services, keeping track of backends that are draining.
#[derive(Default)]
pub struct Translator {
    /// What each frontend used last time: (address, port) -> weight.
    previous: BTreeMap<Frontend, Weighted>,
    draining: BTreeMap<(Frontend, (IpAddr, u16)), Draining>,
    /// Each opted-in Service's own part of the last translation, while its objects and the
    /// node's inputs stay the same: at 10,000 Services, translating every one of them for each
    /// endpoint change was a third of the agent's work per change.
    /// Boxed: a map filled in key order keeps its nodes about half full, and a part is some
    /// 400 bytes (4 MiB of room never used at 10,000 Services).
    cache: BTreeMap<ObjectKey, Box<Cached>>,
    /// The node's inputs the cached parts were translated with; any change empties the cache.
    cached_with: Option<(NodeInfo, BTreeSet<String>)>,
    /// Counts translations (which cache entries the last one used).
    round: u64,
    /// The frontends the translation under way found changed (see [`Translation::changed`]).
    changed: BTreeSet<Frontend>,
    /// The service each frontend was last given, made of its owner's part and of `previous`.
    served: HashMap<Frontend, Arc<Service>>,
    /// The opted-in Services (those in `cache`), oldest first: the order claims are decided
    /// in, kept while no Service comes, goes or is made again.
    order: Vec<ObjectKey>,
    /// Services whose `xdplb.io/enabled` cannot be read, and the problem reported for each.
    unreadable: BTreeMap<ObjectKey, Problem>,
}

/// A Service's part as last translated, and what it was translated from.
struct Cached {
    from: Fingerprint,
    part: Part,
    /// The translation that last used it.
    round: u64,
    /// Its place among the Services that claim a frontend: see [`seniority`].
    seniority: Seniority,
}

/// Oldest first: without a creationTimestamp last, then by it, then by uid (then by key).
type Seniority = (bool, Option<Timestamp>, Option<String>);

/// Which objects a part was translated from. The API server gives every version of an object
/// its own resourceVersion (and a re-created one its own uid), so those name the content; an
/// object without them (built by hand, never from an API server) is kept whole and compared.
enum Fingerprint {
    Versions {
        service: (Option<String>, String),
        /// (name, uid, resourceVersion) in name order, as the slices map has them.
        slices: Vec<(String, Option<String>, String)>,
    },
    Objects(Box<(KubeService, Slices)>),
}

fn version(meta: &impl Versioned) -> Option<&str> {
    meta.resource_version().filter(|v| !v.is_empty())
}

/// Metadata with a resourceVersion: a kept Service's and a kept slice's.
trait Versioned {
    fn resource_version(&self) -> Option<&str>;
}

impl Versioned for slice::Meta {
    fn resource_version(&self) -> Option<&str> {
        self.resource_version.as_deref()
    }
}

impl Versioned for service::Meta {
    fn resource_version(&self) -> Option<&str> {
        self.resource_version.as_deref()
    }
}

impl Fingerprint {
    fn of(svc: &KubeService, slices: &Slices) -> Fingerprint {
        let versioned = version(&svc.metadata).is_some()
            && slices.values().all(|s| version(&s.metadata).is_some());
        if !versioned {
            return Fingerprint::Objects(Box::new((svc.clone(), slices.clone())));
        }
        let uid = |m: &slice::Meta| m.uid.clone();
        Fingerprint::Versions {
            service: (
                svc.metadata.uid.clone(),
                version(&svc.metadata).unwrap_or_default().to_string(),
            ),
            slices: slices
                .iter()
                .map(|(name, s)| {
                    let v = version(&s.metadata).unwrap_or_default().to_string();
                    (name.clone(), uid(&s.metadata), v)
                })
                .collect(),
        }
    }

    /// Whether `svc` and `slices` are the objects this was taken of.
    fn matches(&self, svc: &KubeService, slices: &Slices) -> bool {
        match self {
            Fingerprint::Versions {
                service: (uid, v),
                slices: versions,
            } => {
                svc.metadata.uid == *uid
                    && version(&svc.metadata) == Some(v.as_str())
                    && slices.len() == versions.len()
                    && slices.iter().zip(versions).all(|((name, s), (n, uid, v))| {
                        name == n
                            && s.metadata.uid == *uid
                            && version(&s.metadata) == Some(v.as_str())
                    })
            }
            Fingerprint::Objects(objects) => objects.0 == *svc && objects.1 == *slices,
        }
    }
}

/// One Service's translation apart from what depends on other Services (which frontends it
/// keeps) and on the past (drains): a pure function of the Service, its slices and the node's
/// inputs.
#[derive(Default)]
struct Part {
    /// Its problems, policy, zones and health check, as they go into the translation.
    own: Translation,
    /// The frontends it asks for, in order, each with its service (backends not drained yet).
    offers: Vec<Offer>,
    drain: Option<Drain>,
}

/// Backends with their weights. Shared: with nothing draining, a frontend's backends as last
/// given (`Translator::previous`) are its part's, not a copy (200,000 of them at 10,000 x 10).
type Weighted = Arc<BTreeMap<(IpAddr, u16), u32>>;

struct Offer {
    /// Without backends: [`Translator::drain`] gives them.
    service: Service,
    weighted: Weighted,
    standby: Vec<(IpAddr, u16)>,
    routing: Option<Routing>,
}

impl Translator {
    /// `named_policies`: policies the node config defines (services may refer to them).
    pub fn translate(
        &mut self,
        cluster: &Cluster,
        node: &NodeInfo,
        named_policies: &BTreeSet<String>,
        now: Instant,
    ) -> Translation {
        self.translate_touched(cluster, node, named_policies, now, None)
    }

    /// As [`Translator::translate`], where `touched` names the Services whose object or
    /// slices changed since the last translation (`None`: any may have): only those are
    /// looked at again; claims and drains are decided over all of them as always.
    pub fn translate_touched(
        &mut self,
        cluster: &Cluster,
        node: &NodeInfo,
        named_policies: &BTreeSet<String>,
        now: Instant,
        touched: Option<&BTreeSet<ObjectKey>>,
    ) -> Translation {
        let mut out = Translation::default();
        // What changed is known from the parts translated anew, those gone and the drains
        // that moved, unless every part is translated anew.
        let mut whole = self.round == 0;
        if self
            .cached_with
            .as_ref()
            .is_none_or(|(n, p)| n != node || p != named_policies)
        {
            self.cache.clear();
            self.cached_with = Some((node.clone(), named_policies.clone()));
            whole = true;
        }
        self.changed.clear();
        self.round += 1;
        let round = self.round;
        match touched.filter(|_| !whole) {
            Some(keys) => self.look_again(keys, cluster, node, named_policies, round),
            None => self.look_at_all(cluster, node, named_policies, round),
        }
        out.problems.extend(self.unreadable.values().cloned());
        let mut owners: HashMap<Frontend, &ObjectKey> = HashMap::with_capacity(self.previous.len());
        let cache = std::mem::take(&mut self.cache);
        let order = std::mem::take(&mut self.order);
        for key in &order {
            let part = &cache[key].part;
            self.assemble(key, part, &mut owners, now, &mut out);
        }
        drop(owners);
        self.cache = cache;
        self.order = order;
        // Every frontend served was given its backends by `drain`, which keeps them in
        // `previous`: as many there as served, and none went.
        if self.previous.len() > out.services.len() || self.served.len() > out.services.len() {
            self.forget_gone(&out);
        }
        out.problems.sort();
        out.problems.dedup();
        out.node_zone.clone_from(&node.zone);
        out.round = round;
        let changed = std::mem::take(&mut self.changed);
        out.changed = (!whole).then_some(changed);
        out
    }

    /// Every Service looked at: those that opt in translated where their objects changed,
    /// the rest forgotten.
    fn look_at_all(
        &mut self,
        cluster: &Cluster,
        node: &NodeInfo,
        named_policies: &BTreeSet<String>,
        round: u64,
    ) {
        let empty = BTreeMap::new();
        self.unreadable.clear();
        let mut opted_in = Vec::new();
        for (key, svc) in &cluster.services {
            match enabled(svc) {
                Ok(true) => {
                    let slices = cluster.slices.get(key).unwrap_or(&empty);
                    self.refresh(key, svc, slices, node, named_policies, round);
                    opted_in.push(key.clone());
                }
                Ok(false) => {}
                Err(message) => {
                    self.unreadable
                        .insert(key.clone(), unreadable(key, message));
                }
            }
        }
        if self.cache.len() > opted_in.len() {
            let changed = &mut self.changed;
            self.cache.retain(|_, c| {
                let kept = c.round == round;
                if !kept {
                    changed.extend(c.part.offers.iter().map(|o| o.service.frontend));
                }
                kept
            });
        }
        self.order = opted_in;
        self.sort_order();
    }

    /// The Services `keys` looked at again (the rest are as they were).
    fn look_again(
        &mut self,
        keys: &BTreeSet<ObjectKey>,
        cluster: &Cluster,
        node: &NodeInfo,
        named_policies: &BTreeSet<String>,
        round: u64,
    ) {
        let empty = BTreeMap::new();
        let mut reorder = false;
        for key in keys {
            self.unreadable.remove(key);
            let svc = cluster.services.get(key);
            let opted_in = match svc.map(enabled) {
                Some(Ok(true)) => svc,
                Some(Err(message)) => {
                    self.unreadable
                        .insert(key.clone(), unreadable(key, message));
                    None
                }
                _ => None,
            };
            match opted_in {
                Some(svc) => {
                    let slices = cluster.slices.get(key).unwrap_or(&empty);
                    reorder |= self.refresh(key, svc, slices, node, named_policies, round);
                }
                None => {
                    if let Some(gone) = self.cache.remove(key) {
                        let offers = gone.part.offers.iter();
                        self.changed.extend(offers.map(|o| o.service.frontend));
                        reorder = true;
                    }
                }
            }
        }
        if reorder {
            self.order = self.cache.keys().cloned().collect();
            self.sort_order();
        }
    }

    /// Translates the Service `key`'s part again if its objects changed; true if it is new or
    /// its seniority changed (the order of claims needs sorting again).
    fn refresh(
        &mut self,
        key: &ObjectKey,
        svc: &KubeService,
        slices: &Slices,
        node: &NodeInfo,
        named_policies: &BTreeSet<String>,
        round: u64,
    ) -> bool {
        if let Some(c) = self.cache.get_mut(key)
            && c.from.matches(svc, slices)
        {
            c.round = round;
            return false;
        }
        let part = Part::of(key, svc, slices, node, named_policies);
        let from = Fingerprint::of(svc, slices);
        let (older, created, uid, _) = seniority(key, svc);
        let seniority = (older, created, uid.map(str::to_string));
        let new = Box::new(Cached {
            from,
            part,
            round,
            seniority,
        });
        let old = self.cache.insert(key.clone(), new);
        let new = &self.cache[key];
        let offers = old.iter().flat_map(|c| &c.part.offers);
        self.changed
            .extend(offers.chain(&new.part.offers).map(|o| o.service.frontend));
        old.is_none_or(|o| o.seniority != new.seniority)
    }

    /// Oldest first: the first to claim a frontend keeps it.
    fn sort_order(&mut self) {
        let cache = &self.cache;
        self.order
            .sort_by(|a, b| (&cache[a].seniority, a).cmp(&(&cache[b].seniority, b)));
    }

    /// Frontends whose Service went away altogether: their backends drain too.
    fn forget_gone(&mut self, out: &Translation) {
        let current: BTreeSet<Frontend> = out.services.iter().map(|s| s.frontend).collect();
        let gone: Vec<Frontend> = self
            .previous
            .keys()
            .filter(|f| !current.contains(f))
            .copied()
            .collect();
        for f in gone {
            // Without a service entry there is nothing to drain through: the flows keep their
            // entries until idle (the VIP's filter entry goes when no service uses it).
            self.previous.remove(&f);
            self.changed.insert(f);
            self.draining.retain(|(df, _), _| *df != f);
        }
        self.served.retain(|f, _| current.contains(f));
    }

    /// A Service's part into the translation: the frontends no older Service has, with their
    /// backends drained.
    fn assemble<'a>(
        &mut self,
        key: &'a ObjectKey,
        part: &Part,
        owners: &mut HashMap<Frontend, &'a ObjectKey>,
        now: Instant,
        out: &mut Translation,
    ) {
        let own = &part.own;
        out.problems.extend(own.problems.iter().cloned());
        for (name, policy) in &own.policies {
            out.policies.insert(name.clone(), policy.clone());
        }
        for (addr, zone) in &own.zones {
            out.zones.insert(*addr, zone.clone());
        }
        for offer in &part.offers {
            let frontend = offer.service.frontend;
            let owner = *owners.entry(frontend).or_insert(key);
            if owner != key {
                out.problems.push(Problem {
                    object: key.clone(),
                    reason: reason::FRONTEND_CLAIMED,
                    field: format!("frontend {frontend}"),
                    message: format!(
                        "also claimed by Service {}/{}, which is older and keeps it; not served",
                        owner.0, owner.1
                    ),
                });
                continue;
            }
            for backend in &offer.standby {
                out.standby.insert((frontend, *backend));
            }
            if let Some(r) = &offer.routing {
                out.routing.insert(frontend, r.clone());
            }
            // The same part (its Service's objects did not change, nor did the frontend's
            // owner) and the same backends, nothing draining: the service given last time.
            let same_part = !self.changed.contains(&frontend);
            if same_part
                && self.previous.get(&frontend) == Some(&offer.weighted)
                && self.drains_of(frontend).next().is_none()
                && let Some(service) = self.served.get(&frontend)
            {
                out.services.push(service.clone());
                continue;
            }
            // Drains in progress that none ran out of (most steps of a rolling restart): the
            // backends given last time again, and so the service.
            let before = same_part
                .then(|| self.previous.get(&frontend).cloned())
                .flatten();
            let drain = part
                .drain
                .expect("a part with offers has its drain settings");
            let backends = self.drain(frontend, &offer.weighted, drain, now, out);
            if before.as_ref() == Some(&backends)
                && let Some(service) = self.served.get(&frontend)
            {
                out.services.push(service.clone());
                continue;
            }
            self.changed.insert(frontend);
            let mut service = offer.service.clone();
            service.backends = backends
                .iter()
                .map(|(&(addr, port), &weight)| Backend { addr, port, weight })
                .collect();
            let service = Arc::new(service);
            self.served.insert(frontend, service.clone());
            out.services.push(service);
        }
        out.health_checks.extend(own.health_checks.iter().cloned());
    }
}

impl Part {
    fn of(
        key: &ObjectKey,
        svc: &KubeService,
        slices: &Slices,
        node: &NodeInfo,
        named_policies: &BTreeSet<String>,
    ) -> Part {
        let mut part = Part::default();
        let out = &mut part.own;
        let Some(spec) = &svc.spec else { return part };
        // Fail closed: a Service whose ranges cannot be read is not served at all (it would be
        // open to every source).
        let Some(source_ranges) = source_ranges(key, svc, spec, out) else {
            return part;
        };
        let settings = Settings::read(key, svc, spec, node, named_policies, out);
        part.drain = Some(settings.drain);
        let ns_name = format!("{}/{}", key.0, key.1);
        let mut local_ready = 0usize;
        for sp in spec.ports.iter().flatten() {
            let Some(protocol) = protocol(sp) else {
                continue; // SCTP: not ours.
            };
            let local_node = settings.local_only.then_some(node.name.as_str());
            let endpoints = endpoints(key, sp, protocol, slices, local_node, &mut out.problems);
            for e in &endpoints {
                if let Some(zone) = &e.candidate.zone {
                    out.zones.insert(e.addr, zone.clone());
                }
            }
            let (endpoints, routing) = choose(endpoints, &settings, node);
            local_ready = local_ready.max(
                endpoints
                    .iter()
                    .filter(|(e, r)| e.candidate.ready && *r == Role::Takes)
                    .count(),
            );
            let port_name = sp.name.clone().unwrap_or_else(|| sp.port.to_string());
            for (frontend, named) in frontends(key, svc, sp, protocol, node, &mut out.problems) {
                if named && let Some(why) = node.reserved.refuse(&ns_name, frontend.vip) {
                    out.problems.push(Problem {
                        object: key.clone(),
                        reason: reason::RESERVED_ADDRESS,
                        field: format!("frontend {frontend}"),
                        message: format!("{why}; not served"),
                    });
                    continue;
                }
                let weighted = settings.weighted(&endpoints, &frontend);
                let standby = weighted
                    .iter()
                    .filter(|(_, w)| **w == 0)
                    .map(|(backend, _)| *backend)
                    .filter(|backend| {
                        endpoints
                            .iter()
                            .any(|(e, r)| *r == Role::Standby && (e.addr, e.port) == *backend)
                    })
                    .collect();
                part.offers.push(Offer {
                    service: Service {
                        name: format!("{ns_name}:{port_name}"),
                        origin: Origin::Kubernetes {
                            namespace: key.0.clone(),
                            name: key.1.clone(),
                        },
                        frontend,
                        mode: settings.mode,
                        backends: Vec::new(),
                        policy: settings.policy.clone(),
                        affinity: settings.affinity,
                        source_ranges: source_ranges.clone(),
                    },
                    weighted: Arc::new(weighted),
                    standby,
                    routing: routing.get(&frontend.vip.is_ipv4()).cloned(),
                });
            }
        }
        if settings.local_only
            && let Some(port) = spec
                .health_check_node_port
                .and_then(|p| u16::try_from(p).ok())
        {
            out.health_checks.push(HealthCheck {
                port,
                service: key.clone(),
                local_endpoints: local_ready,
            });
        }
        // Kept for as long as the Service is: without the room pushing left (4 offers' worth
        // for a two-port Service's 2, 6 MiB at 10,000 Services).
        part.offers.shrink_to_fit();
        part
    }
}

impl Translator {
    /// The backends a frontend should have, draining included: an endpoint it used before and
    /// no longer does stays, at weight 0, until its delay runs out; then its flows are ended.
    fn drain(
        &mut self,
        frontend: Frontend,
        weighted: &Weighted,
        drain: Drain,
        now: Instant,
        out: &mut Translation,
    ) -> Weighted {
        // Most frontends are as they were, with nothing draining: nothing to do.
        if self.previous.get(&frontend) == Some(weighted)
            && self.drains_of(frontend).next().is_none()
        {
            self.previous.insert(frontend, weighted.clone());
            return weighted.clone();
        }
        let mut backends = (**weighted).clone();
        let previous = self.previous.remove(&frontend).unwrap_or_default();
        for &backend in previous.keys() {
            let key = (frontend, backend);
            if backends.contains_key(&backend) {
                // Still an endpoint (a weight of 0 is maintenance, which keeps its flows): not
                // draining, or no longer.
                self.draining.remove(&key);
                continue;
            }
            let d = self.draining.entry(key).or_insert(Draining {
                until: now + drain.delay,
                reset: drain.reset,
            });
            if now >= d.until {
                // The reset choice made when the drain began.
                let reset = d.reset;
                self.draining.remove(&key);
                backends.remove(&backend);
                out.end_flows.push(EndFlows {
                    frontend,
                    backend,
                    reset,
                });
            } else {
                backends.insert(backend, 0);
                out.draining.insert(key);
            }
        }
        let backends = if backends == **weighted {
            weighted.clone()
        } else {
            Arc::new(backends)
        };
        self.previous.insert(frontend, backends.clone());
        backends
    }

    /// The drains in progress of `frontend`.
    fn drains_of(
        &self,
        frontend: Frontend,
    ) -> impl Iterator<Item = (&(Frontend, (IpAddr, u16)), &Draining)> {
        let lowest = (IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
        let highest = (IpAddr::V6(std::net::Ipv6Addr::from(u128::MAX)), u16::MAX);
        self.draining
            .range((frontend, lowest)..=(frontend, highest))
    }

    /// The policy for a service: its own from `rate-limit.xdplb.io/*` annotations, or a named
    /// one from `xdplb.io/rate-limit`, or none (the node default applies).
    fn policy(
        key: &ObjectKey,
        annotations: &BTreeMap<String, String>,
        named: &BTreeSet<String>,
        out: &mut Translation,
    ) -> Option<String> {
        let fields: BTreeMap<&str, &str> = annotations
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(RATE_LIMIT_FIELD).map(|f| (f, v.as_str())))
            .collect();
        let problem = |field: String, message: String| Problem {
            object: key.clone(),
            reason: reason::INVALID_ANNOTATION,
            field,
            message,
        };
        if !fields.is_empty() {
            match raw_policy(&fields).and_then(|raw| {
                raw.to_policy()
                    .map_err(|(field, msg)| (format!("{RATE_LIMIT_FIELD}{field}"), msg))
            }) {
                Ok(p) => {
                    let name = format!("service:{}/{}", key.0, key.1);
                    out.policies.insert(name.clone(), p);
                    return Some(name);
                }
                Err((field, msg)) => {
                    out.problems.push(problem(
                        field,
                        format!("{msg}; serving without this policy"),
                    ));
                }
            }
        }
        match annotations.get(RATE_LIMIT) {
            Some(name) if named.contains(name) => Some(name.clone()),
            Some(name) => {
                out.problems.push(problem(
                    RATE_LIMIT.into(),
                    format!(
                        "no rate limit named `{name}` in the node config; using the node default"
                    ),
                ));
                None
            }
            None => None,
        }
    }
}

/// `spec.loadBalancerSourceRanges` and its mode annotation, for every frontend of the Service
/// (load-balancer IPs, external IPs and node ports alike). `None`: something is wrong with them
/// (reported); the Service is then not served.
fn source_ranges(
    key: &ObjectKey,
    svc: &KubeService,
    spec: &ServiceSpec,
    out: &mut Translation,
) -> Option<SourceRanges> {
    let mut problem = |field: String, message: String| {
        out.problems.push(Problem {
            object: key.clone(),
            reason: reason::INVALID_SOURCE_RANGES,
            field,
            message: format!("{message}; the Service is not served until this is fixed"),
        });
    };
    let mode = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SOURCE_RANGES_MODE));
    let deny = match mode.map(|m| m.trim().to_ascii_lowercase()).as_deref() {
        None | Some("allow") => false,
        Some("deny") => true,
        Some(_) => {
            problem(
                SOURCE_RANGES_MODE.into(),
                format!("`{}`: allow or deny", mode.map_or("", String::as_str)),
            );
            return None;
        }
    };
    // kube-proxy trims the entries too.
    let list: Vec<&str> = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .map(|r| r.trim())
        .collect();
    match SourceRanges::parse(&list) {
        Ok(cidrs) => Some(SourceRanges { cidrs, deny }),
        Err((i, m)) => {
            problem(format!("spec.loadBalancerSourceRanges[{i}]"), m);
            None
        }
    }
}

/// Whether a Service opts in; `Err`: the annotation's value is not understood (not opted in).
fn enabled(svc: &KubeService) -> Result<bool, String> {
    let Some(value) = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ENABLED))
    else {
        return Ok(false);
    };
    let on = parse_bool(value).ok_or_else(|| {
        format!("`{value}` is not a boolean (true or false); the Service is not served")
    })?;
    Ok(on
        && svc
            .spec
            .as_ref()
            .is_some_and(|s| s.type_.as_deref() != Some("ExternalName")))
}

/// A boolean as Kubernetes reads annotation booleans (Go's `strconv.ParseBool`): 1, t, T,
/// TRUE, true, True, 0, f, F, FALSE, false, False; surrounding blanks ignored.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.trim() {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The order in which Services claim frontends: oldest first (creationTimestamp, then uid, which
/// every node sees alike); a Service without them (no API server sets none) last, by name.
/// The problem of a Service whose `xdplb.io/enabled` cannot be read.
fn unreadable(key: &ObjectKey, message: String) -> Problem {
    Problem {
        object: key.clone(),
        reason: reason::INVALID_ANNOTATION,
        field: ENABLED.into(),
        message,
    }
}

fn seniority<'a>(
    key: &'a ObjectKey,
    svc: &'a KubeService,
) -> (bool, Option<Timestamp>, Option<&'a str>, &'a ObjectKey) {
    let created = svc.metadata.creation_timestamp.as_ref().map(|t| t.0);
    (created.is_none(), created, svc.metadata.uid.as_deref(), key)
}

fn protocol(sp: &ServicePort) -> Option<Protocol> {
    match sp.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

/// Where clients reach a service port: load-balancer ingress IPs and external IPs (`true`: the
/// Service names the address), and the node port on this node's addresses (`false`). An
/// address that is no IP address is reported in `problems`.
fn frontends(
    key: &ObjectKey,
    svc: &KubeService,
    sp: &ServicePort,
    protocol: Protocol,
    node: &NodeInfo,
    problems: &mut Vec<Problem>,
) -> Vec<(Frontend, bool)> {
    let Ok(port) = u16::try_from(sp.port) else {
        return Vec::new();
    };
    let mut vips: BTreeSet<IpAddr> = BTreeSet::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    let ingress_ips = ingress
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref())
        .map(|ip| ("status.loadBalancer.ingress", ip));
    let external_ips = svc
        .spec
        .iter()
        .flat_map(|s| s.external_ips.iter().flatten())
        .map(|ip| ("spec.externalIPs", ip.as_str()));
    for (field, ip) in ingress_ips.chain(external_ips) {
        match ip.parse() {
            Ok(ip) => {
                vips.insert(ip);
            }
            Err(_) => problems.push(Problem {
                object: key.clone(),
                reason: reason::INVALID_ADDRESS,
                field: field.into(),
                message: format!("`{ip}` is not an IP address; not served"),
            }),
        }
    }
    let mut out: Vec<(Frontend, bool)> = vips
        .into_iter()
        .map(|vip| {
            let f = Frontend {
                vip,
                port,
                protocol,
            };
            (f, true)
        })
        .collect();
    if let Some(node_port) = sp.node_port.and_then(|p| u16::try_from(p).ok()) {
        for addr in &node.addrs {
            let f = Frontend {
                vip: *addr,
                port: node_port,
                protocol,
            };
            out.push((f, false));
        }
    }
    out
}

/// An endpoint address of one service port, with what the choice of endpoints needs.
#[derive(Clone, Debug)]
struct Endpoint {
    addr: IpAddr,
    port: u16,
    /// Readiness, node, zone and hints.
    candidate: Candidate,
    /// The pod's name (targetRef), for weight annotations.
    target: Option<String>,
}

/// Which endpoints take new flows (and which stand by), as kube-proxy chooses, for each IP
/// family apart (kube-proxy runs a proxier per family): with externalTrafficPolicy Local, this
/// node's (already the only ones), ready else serving terminating, no topology; with Cluster,
/// zone-aware ([`topology::categorize`]). The routing of a family (true: IPv4) is there where
/// topology was asked for or hinted.
fn choose(
    endpoints: Vec<Endpoint>,
    settings: &Settings,
    node: &NodeInfo,
) -> (Vec<(Endpoint, Role)>, BTreeMap<bool, Routing>) {
    let (v4, v6): (Vec<Endpoint>, Vec<Endpoint>) =
        endpoints.into_iter().partition(|e| e.addr.is_ipv4());
    let mut chosen = Vec::new();
    let mut routing = BTreeMap::new();
    for (ipv4, family) in [(true, v4), (false, v6)] {
        if family.is_empty() {
            continue;
        }
        let (roles, r) = choose_in_family(family, settings, node);
        chosen.extend(roles);
        if let Some(r) = r {
            routing.insert(ipv4, r);
        }
    }
    (chosen, routing)
}

fn choose_in_family(
    endpoints: Vec<Endpoint>,
    settings: &Settings,
    node: &NodeInfo,
) -> (Vec<(Endpoint, Role)>, Option<Routing>) {
    let (preference, asked) = &settings.preference;
    let candidates: Vec<Candidate> = endpoints
        .iter()
        .map(|e| {
            let mut c = e.candidate.clone();
            if settings.local_only {
                // kube-proxy applies topology to Cluster endpoints only.
                c.for_nodes.clear();
                c.for_zones.clear();
            }
            c
        })
        .collect();
    let preference = if settings.local_only {
        Preference::Unstated
    } else {
        *preference
    };
    let c = topology::categorize(&candidates, preference, &node.name, node.zone.as_deref());
    let hinted = candidates
        .iter()
        .any(|c| c.ready && (!c.for_zones.is_empty() || !c.for_nodes.is_empty()));
    let routing = (preference != Preference::Unstated || hinted).then(|| Routing {
        asked: asked.clone(),
        scope: c.scope,
        place: match c.scope {
            topology::Scope::SameNode => Some(node.name.clone()),
            _ => node.zone.clone(),
        },
        fallback: c.fallback.clone(),
        taking: c
            .roles
            .iter()
            .zip(&candidates)
            .filter(|(r, c)| **r == Role::Takes && c.ready)
            .count(),
        ready: candidates.iter().filter(|c| c.ready).count(),
    });
    (endpoints.into_iter().zip(c.roles).collect(), routing)
}

/// The endpoints of a service port that may serve: ready ones and (KEP-1669) terminating ones
/// that still serve; only this node's with `local_node` ([`choose`] picks among them). The port
/// comes from each slice's port of the same name and protocol (named target ports are resolved
/// per slice). Endpoint addresses that are no IP address, and a port that slices with endpoints
/// all lack (a `targetPort` name no pod's container port has), are reported in `problems`.
fn endpoints(
    key: &ObjectKey,
    sp: &ServicePort,
    protocol: Protocol,
    slices: &Slices,
    local_node: Option<&str>,
    problems: &mut Vec<Problem>,
) -> Vec<Endpoint> {
    let want_name = sp.name.as_deref().unwrap_or("");
    let want_proto = match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    };
    let mut out = Vec::new();
    // Whether some slice has endpoints, and whether one has this port.
    let (mut populated, mut matched) = (false, false);
    let problem = |reason: &'static str, field: String, message: String| Problem {
        object: key.clone(),
        reason,
        field,
        message,
    };
    for (slice_name, slice) in slices {
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            continue;
        }
        populated |= slice.endpoints.as_ref().is_some_and(|e| !e.is_empty());
        let Some(port) = slice.ports.iter().flatten().find_map(|p| {
            let name_ok = p.name.as_deref().unwrap_or("") == want_name;
            let proto_ok = p.protocol.as_deref().unwrap_or("TCP") == want_proto;
            (name_ok && proto_ok).then_some(p.port).flatten()
        }) else {
            continue;
        };
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        matched = true;
        for e in slice.endpoints.iter().flatten() {
            if let Some(node) = local_node
                && e.node_name.as_deref() != Some(node)
            {
                continue;
            }
            let c = e.conditions.clone().unwrap_or_default();
            // Unset means ready (and serving); terminating unset means not terminating.
            let is_ready = c.ready.unwrap_or(true);
            let serving = c.serving.unwrap_or(is_ready);
            let terminating = c.terminating.unwrap_or(false);
            if !(is_ready || serving && terminating) {
                continue;
            }
            let target = e.target_ref.as_ref().and_then(|t| t.name.clone());
            let hints = e.hints.as_ref();
            let candidate = Candidate {
                ready: is_ready,
                serving_terminating: !is_ready,
                node: e.node_name.as_deref().map(str::to_owned),
                zone: e
                    .zone
                    .as_deref()
                    .filter(|z| !z.is_empty())
                    .map(str::to_owned),
                for_zones: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
                for_nodes: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| n.name.clone())
                    .collect(),
            };
            for a in &e.addresses {
                let Ok(addr) = a.parse::<IpAddr>() else {
                    problems.push(problem(
                        reason::BAD_ENDPOINT,
                        format!("EndpointSlice {slice_name}"),
                        format!(
                            "endpoint address `{a}` is not an {} address; left out",
                            slice.address_type
                        ),
                    ));
                    continue;
                };
                out.push(Endpoint {
                    addr,
                    port,
                    candidate: candidate.clone(),
                    target: target.clone(),
                });
            }
        }
    }
    if populated && !matched {
        problems.push(problem(
            reason::UNMATCHED_PORT,
            format!("spec.ports[{}]", sp.name.as_deref().unwrap_or("")),
            format!(
                "no EndpointSlice of the Service has a port named `{want_name}`/{want_proto} (does the targetPort name a port no pod has?); no endpoints for it"
            ),
        ));
    }
    out
}

/// `xdplb.io/backend-weights: "pod-a=2, 10.1.2.3=0"`: by pod name or address.
fn parse_weights(value: Option<&String>) -> Result<BTreeMap<String, u32>, String> {
    let mut out = BTreeMap::new();
    let Some(value) = value else {
        return Ok(out);
    };
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (who, w) = item.split_once('=').ok_or_else(|| {
            format!("`{item}`: expected name-or-address=weight; ignoring the annotation")
        })?;
        let w: u32 = w
            .trim()
            .parse()
            .ok()
            .filter(|w| *w <= MAX_WEIGHT)
            .ok_or_else(|| {
                format!("`{item}`: weight must be 0..={MAX_WEIGHT}; ignoring the annotation")
            })?;
        out.insert(who.trim().to_string(), w);
    }
    Ok(out)
}

/// A policy from `rate-limit.xdplb.io/*` annotation fields (same names as the config file).
fn raw_policy(fields: &BTreeMap<&str, &str>) -> Result<RawPolicy, (String, String)> {
    let mut raw = RawPolicy::default();
    let err = |f: &str, m: String| (format!("{RATE_LIMIT_FIELD}{f}"), m);
    let num = |f: &str, v: &str| {
        v.trim()
            .parse::<u64>()
            .map_err(|_| err(f, format!("`{v}` is not a whole number")))
    };
    let list = |v: &str| {
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
    };
    for (field, value) in fields {
        match *field {
            "packets-per-second" => raw.packets_per_second = Some(num(field, value)?),
            "packets-burst" => raw.packets_burst = Some(num(field, value)?),
            "connections-per-second" => raw.connections_per_second = Some(num(field, value)?),
            "connections-burst" => raw.connections_burst = Some(num(field, value)?),
            "ipv6-prefix" => {
                raw.ipv6_prefix = Some(
                    value
                        .trim()
                        .parse()
                        .map_err(|_| err(field, format!("`{value}` is not a prefix length")))?,
                );
            }
            "table-full" => {
                raw.table_full = Some(match value.trim().to_ascii_lowercase().as_str() {
                    "fail-closed" => crate::model::TableFull::FailClosed,
                    "fail-open" => crate::model::TableFull::FailOpen,
                    other => {
                        return Err(err(field, format!("`{other}`: fail-closed or fail-open")));
                    }
                });
            }
            "reject-syn-with-rst" => {
                raw.reject_syn_with_rst = Some(
                    parse_bool(value)
                        .ok_or_else(|| err(field, format!("`{value}`: true or false")))?,
                );
            }
            "exempt" => raw.exempt = list(value),
            "deny" => raw.deny = list(value),
            other => return Err(err(other, "unknown field".into())),
        }
    }
    Ok(raw)
}

#[cfg(test)]
pub(crate) mod tests;
