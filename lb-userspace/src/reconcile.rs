//! Desired state -> map writes.
//!
//! The reconciler keeps a mirror of what the maps hold (what it wrote, or what a restarted agent
//! found in the pinned maps) and writes only the difference, in an order that never shows a
//! packet a half-made state:
//! 1. node config and rate-limit policies, before anything refers to them;
//! 2. per service: its backends, then its new Maglev ring into free ring space, then the service
//!    entry, which switches to the new ring in one map update;
//! 3. addresses and the address filter: traffic to a new VIP is taken only from here on;
//! 4. removals: services, addresses and filter bits, policies, source-range sets; freed ids
//!    are reused last, and ring space let go in an apply is reused from the next one on (a
//!    packet that read a service entry just before its switch may still read the old ring).
//!
//! A service's source ranges are a set of LB_PREFIXES entries under an id of their own (ids
//! from [`RANGES_FIRST_ID`] up, above every policy id), shared by the services with the same
//! prefixes. A set is never rewritten in place: a changed list is a new set, written in full
//! before the service entry points to it; the old set goes after. A service is never open to
//! every source, nor to the union of its old and new lists, on its way between two lists.
//!
//! Everything that can be wrong with a desired state is checked before the first write, so a
//! rejected state leaves the previous one fully in force.
//!
//! [`Reconciler::apply_changed`] does the same for a state that differs from the last only at
//! some frontends, looking at those services alone (and at counts of the addresses in use, kept
//! with every apply); it declines, writing nothing, whatever it cannot do exactly as the
//! whole-state path would.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{
    ADDR_NO_CLIENT, ADDR_NODE, ADDR_VIP, Addr, AddrInfo, BACKEND_ACTIVE, BACKEND_LISTED, Bucket,
    Config, Limit, MAX_POLICIES, MAX_PREFIXES, MAX_SNAT_ADDRS, NO_BACKEND, POLICY_FAIL_OPEN,
    POLICY_HAS_PREFIXES, POLICY_PRECISE_CLOCK, POLICY_RST_SYN, PREFIX_DENY, PREFIX_EXEMPT,
    PREFIX_LIMIT, PortRange, PrefixKey, PrefixRule, SVC_AFFINITY, SVC_RANGES_DENY, SVC_SNAT,
    ServiceInfo, ServiceKey, Source,
    filter::{self, FILTER_ENTRIES, Plane},
    flow_ticks,
    hash::bytes_hash,
};

use crate::{
    dataplane::Sizes,
    error::DataplaneError,
    maglev,
    model::{Cidr, Desired, Frontend, Limits, Mode, Policy, Service, TableFull},
    node::{NodeError, NodeView},
    reserved::Reserved,
    ring_space::{self, RingSpace},
    system::monotonic_ns,
    tables::{Snapshot, Tables},
};

pub use crate::model::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Every service that is wrong, not only the first.
    #[error("{}", join_lines(.0))]
    Invalid(Vec<Invalid>),
    /// A node setting this node cannot have.
    #[error("node.{field}: {reason}")]
    Setting { field: &'static str, reason: String },
    #[error("too many {what}: this agent was started with room for {max} (see {flag})")]
    Capacity {
        what: &'static str,
        max: u32,
        flag: &'static str,
    },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// What the node view needs could not be read.
    #[error(transparent)]
    Node(#[from] NodeError),
}

fn join_lines(all: &[Invalid]) -> String {
    all.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Everything wrong with the services of `desired` on a node as `node` describes it, one entry
/// per service (its first problem). Pure: `lb-agent check` runs it with what it knows of the
/// node.
pub fn invalid_services(desired: &Desired, node: &NodeView) -> Vec<Invalid> {
    desired
        .services
        .values()
        .filter_map(|s| {
            let reason = service_problem(s, node)?;
            Some(Invalid {
                origin: s.origin.clone(),
                name: s.name.clone(),
                frontend: s.frontend,
                reason,
            })
        })
        .collect()
}

/// What the node cannot do for `s`, if anything.
fn service_problem(s: &Service, node: &NodeView) -> Option<String> {
    match s.mode {
        Mode::Snat => {
            let (missing, family) = match s.frontend.vip {
                IpAddr::V4(_) => (node.snat_ipv4.is_empty(), 4),
                IpAddr::V6(_) => (node.snat_ipv6.is_empty(), 6),
            };
            if missing {
                return Some(format!(
                    "snat needs an IPv{family} source address for this node: set node.snat-ipv{family} or give the uplink one"
                ));
            }
        }
        Mode::PreserveClientIp => {
            // Only backends that take new flows: one at weight 0 opens none, and its flows
            // keep the translation they were opened with (e.g. snat flows to a remote backend
            // draining after a switch to externalTrafficPolicy Local keep working).
            if let Some(b) = s
                .backends
                .iter()
                .find(|b| b.weight > 0 && !node.local.contains(&b.addr))
            {
                return Some(format!(
                    "preserve-client-ip needs every backend on this node, but {} is not reachable through a backend interface; remote backends need direct server return, which is not supported yet: use mode = \"snat\"",
                    b.maglev_key()
                ));
            }
        }
    }
    s.backends
        .iter()
        .find(|b| b.weight > maglev::MAX_WEIGHT)
        .map(|b| {
            format!(
                "weight {} of {} is over {}",
                b.weight,
                b.maglev_key(),
                maglev::MAX_WEIGHT
            )
        })
}

/// What of `desired` this node takes: services from the cluster that it cannot serve are left
/// out (returned, to be reported; the cluster is every node's, and the rest must still be
/// served), while any other invalid service rejects the whole state (a config file is this
/// node's own: its operator fixes it, and the last good state stays meanwhile). A config-file
/// service on a reserved address ([`crate::reserved`]) is one (the cluster's were left out
/// when translated, where their node ports are told apart).
pub fn admit(desired: &Desired, node: &NodeView) -> Result<(Desired, Vec<Invalid>), ApplyError> {
    let (left_out, mut rejected): (Vec<Invalid>, Vec<Invalid>) = invalid_services(desired, node)
        .into_iter()
        .partition(|i| i.origin.kubernetes_object().is_some());
    for refused in Reserved::for_node(&desired.node, node.own_addrs()).check_file(desired) {
        // One entry per service, its first problem.
        if !rejected.iter().any(|r| r.frontend == refused.frontend) {
            rejected.push(refused);
        }
    }
    if !rejected.is_empty() {
        return Err(ApplyError::Invalid(rejected));
    }
    let mut admitted = desired.clone();
    for i in &left_out {
        admitted.services.remove(&i.frontend);
    }
    Ok((admitted, left_out))
}

/// What [`Reconciler::apply_admitting`] did.
#[derive(Debug)]
pub struct Applied {
    pub report: Report,
    /// The state applied: the one given, less what was left out.
    pub desired: Desired,
    /// Services from the cluster this node cannot serve, not applied.
    pub left_out: Vec<Invalid>,
    /// Some of them only wait for room in the maps: the same state applied again may serve
    /// them.
    pub waiting: bool,
}

/// What one `apply` changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub writes: usize,
    pub services_added: usize,
    pub services_changed: usize,
    pub services_removed: usize,
    pub rings_written: usize,
}

impl Report {
    pub fn is_empty(&self) -> bool {
        self.writes == 0
    }
}

/// A listed backend of an applied service: where it is, its id in LB_BACKENDS, its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendIds {
    pub addr: IpAddr,
    pub port: u16,
    pub id: u32,
    pub weight: u32,
}

/// A service's listed backends as the maps hold them: (address, port) -> (backend id, weight).
type AppliedBackends = BTreeMap<(IpAddr, u16), (u32, u32)>;

/// Whether `backends` are exactly the `listed` ones, with their weights, in the same order: the
/// case of almost every service at each apply, told without a lookup per backend (at 200,000
/// backends, each pass of lookups cost about 10 ms, and an apply made four).
fn lists_exactly(listed: &AppliedBackends, backends: &[crate::model::Backend]) -> bool {
    listed.len() == backends.len()
        && listed
            .iter()
            .zip(backends)
            .all(|((key, (_, weight)), b)| *key == (b.addr, b.port) && *weight == b.weight)
}

/// A service as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AppliedService {
    value: lb_common::Service,
    info: ServiceInfo,
    backends: AppliedBackends,
    /// What it was last applied from ([`applied_from`]); 0: not known (resumed from the maps,
    /// new, or changed by other means). The same again needs no look at it.
    from: u64,
}

/// The generation of each id of a kind (see lb_common::ServiceInfo::generation): bumped when the
/// id is given to something new, so flows made under the old one see it is gone.
struct Generations(Vec<u8>);

impl Generations {
    fn new(len: u32, known: impl Iterator<Item = (u32, u8)>) -> Generations {
        let mut g = vec![0u8; len as usize];
        for (id, generation) in known {
            if let Some(slot) = g.get_mut(id as usize) {
                *slot = generation;
            }
        }
        Generations(g)
    }

    fn get(&self, id: u32) -> u8 {
        self.0.get(id as usize).copied().unwrap_or(0)
    }

    /// The id goes to something new: its next generation.
    fn renew(&mut self, id: u32) -> u8 {
        match self.0.get_mut(id as usize) {
            Some(g) => {
                *g = g.wrapping_add(1);
                *g
            }
            None => 0,
        }
    }
}

/// A rate-limit policy slot: a named policy, or one of its overrides.
type PolicySlot = (String, Option<usize>);

/// The first LB_PREFIXES id of a source-range set: policy ids are below (LB_POLICIES indexes),
/// so the two never collide and a restarted agent tells them apart.
pub const RANGES_FIRST_ID: u32 = MAX_POLICIES;

/// A source-range set's entries: (address bits, length in bits after the id), as written.
type RangeSet = BTreeSet<(Addr, u32)>;

pub struct Reconciler {
    sizes: Sizes,
    config: Option<Config>,
    services: BTreeMap<ServiceKey, AppliedService>,
    addrs: BTreeMap<Addr, AddrInfo>,
    filter: Vec<u64>,
    policy_ids: BTreeMap<PolicySlot, u32>,
    policies: BTreeMap<u32, lb_common::Policy>,
    /// Policies' prefixes (ids below RANGES_FIRST_ID).
    prefixes: BTreeMap<(PrefixKey, u32), PrefixRule>,
    /// Source-range sets by id, as the maps hold them.
    range_sets: BTreeMap<u32, RangeSet>,
    range_pool: IdPool,
    /// Policy ids whose overflow bucket is set.
    overflow: BTreeSet<u32>,
    service_gens: Generations,
    backend_gens: Generations,
    policy_gens: Generations,
    service_ids: IdPool,
    backend_ids: IdPool,
    /// LB_RINGS: the rings of applied services are held, the rest is free.
    ring_space: RingSpace,
    /// Rings let go in this apply, (first slot, size): free again once it ends.
    freed_rings: Vec<(u32, u32)>,
    policy_pool: IdPool,
    /// How many applied services use each address the addresses and the filter are made of.
    addr_use: AddrUse,
    /// What the last apply that left nothing out for room was for: a state that keeps it may
    /// be applied service by service ([`Reconciler::apply_changed`]).
    base: Option<Base>,
}

/// How many applied services use each address [`Reconciler::write_addrs`] makes entries and
/// filter bits of: kept with every apply, so that a change recounts only its own services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct AddrUse {
    /// Frontends per VIP.
    vips: BTreeMap<IpAddr, usize>,
    /// Backends whose replies lb_backend looks at, per address.
    preserved: BTreeMap<IpAddr, usize>,
}

impl AddrUse {
    /// Counts an applied service's addresses in (`add`) or out.
    fn count(&mut self, key: &ServiceKey, a: &AppliedService, node: &NodeView, add: bool) {
        let step = |m: &mut BTreeMap<IpAddr, usize>, k: IpAddr| {
            let n = m.entry(k).or_default();
            if add {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&k);
                }
            }
        };
        step(&mut self.vips, IpAddr::from(key.addr));
        // Replies that keep the client's address: the backends of preserve-client-ip services,
        // and every local backend of any service, since a service that changed mode keeps its
        // flows' translation (a flow opened in preserve-client-ip mode goes on after a switch
        // to snat, and its replies still need lb_backend).
        let preserve = a.value.flags & SVC_SNAT == 0;
        for (addr, _) in a.backends.keys() {
            if preserve || node.local.contains(addr) {
                step(&mut self.preserved, *addr);
            }
        }
    }
}

/// What a whole-state apply that left nothing waiting was made for.
#[derive(Clone, Debug, PartialEq)]
struct Base {
    node: NodeView,
    settings: crate::model::NodeSettings,
    policies: BTreeMap<String, Policy>,
}

/// What [`Reconciler::apply_changed`] did.
#[derive(Debug, Default)]
pub struct AppliedChange {
    pub report: Report,
    /// The changed frontends now applied (the rest of them are not: gone or left out).
    pub admitted: BTreeSet<Frontend>,
    /// Changed services from the cluster this node cannot serve, not applied.
    pub left_out: Vec<Invalid>,
}

impl Reconciler {
    /// For empty maps.
    pub fn new(sizes: Sizes) -> Reconciler {
        Reconciler::resume(sizes, &Snapshot::default())
    }

    /// Picks up the state a previous agent left in the (pinned) maps.
    pub fn resume(sizes: Sizes, snap: &Snapshot) -> Reconciler {
        let infos: BTreeMap<u32, ServiceInfo> = snap.service_info.iter().copied().collect();
        let mut services = BTreeMap::new();
        let mut ring_space = RingSpace::new(sizes.ring_slots());
        for (key, value) in &snap.services {
            let mut value = *value;
            // A ring this space cannot hold where it is (LB_RINGS was recreated, or laid out by
            // another size) is written anew by the first apply.
            if snap.rings_lost
                || value.ring == u32::MAX
                || !ring_space.reserve(value.ring, value.ring_size)
            {
                value.ring = u32::MAX;
                value.ring_digest = 0;
            }
            let backends = snap
                .backends
                .iter()
                .filter(|(_, b)| b.service == value.id && b.flags & BACKEND_LISTED != 0)
                .map(|(id, b)| {
                    (
                        (IpAddr::from(b.addr), u16::from_be(b.port)),
                        (*id, b.weight),
                    )
                })
                .collect();
            services.insert(
                *key,
                AppliedService {
                    value,
                    info: infos.get(&value.id).copied().unwrap_or_default(),
                    backends,
                    from: 0,
                },
            );
        }
        let used_services: BTreeSet<u32> = services.values().map(|s| s.value.id).collect();
        let listed: BTreeSet<u32> = services
            .values()
            .flat_map(|s| s.backends.values().map(|(id, _)| *id))
            .collect();
        // Ids of backends removed before the restart are reused last.
        let recently_removed: Vec<u32> = snap
            .backends
            .iter()
            .filter(|(id, _)| !listed.contains(id))
            .map(|(id, _)| *id)
            .collect();
        let mut filter = snap.filter.clone();
        filter.resize(FILTER_ENTRIES as usize, 0);
        let range_sets = range_sets_of(snap);
        let used_ranges: BTreeSet<u32> = range_sets.keys().copied().collect();
        Reconciler {
            sizes,
            config: snap.config,
            services,
            addrs: snap.addrs.iter().copied().collect(),
            filter,
            // Names are not in the maps: `apply` matches policies by content (claim_policy).
            policy_ids: BTreeMap::new(),
            policies: snap.policies.iter().copied().collect(),
            prefixes: snap
                .prefixes
                .iter()
                .filter(|(k, _, _)| u32::from_be_bytes(k.policy) < RANGES_FIRST_ID)
                .map(|(k, len, rule)| ((*k, *len), *rule))
                .collect(),
            range_sets,
            range_pool: IdPool::new(
                RANGES_FIRST_ID..RANGES_FIRST_ID + MAX_PREFIXES,
                &used_ranges,
                &[],
            ),
            overflow: BTreeSet::new(),
            service_gens: Generations::new(
                sizes.max_services,
                infos.iter().map(|(id, i)| (*id, i.generation)),
            ),
            backend_gens: Generations::new(
                sizes.max_backends,
                snap.backends.iter().map(|(id, b)| (*id, b.generation)),
            ),
            policy_gens: Generations::new(
                MAX_POLICIES,
                snap.policies.iter().map(|(id, p)| (*id, p.generation)),
            ),
            service_ids: IdPool::new(0..sizes.max_services, &used_services, &[]),
            backend_ids: IdPool::new(0..sizes.max_backends, &listed, &recently_removed),
            ring_space,
            freed_rings: Vec::new(),
            policy_pool: IdPool::new(
                1..MAX_POLICIES,
                &snap.policies.iter().map(|(id, _)| *id).collect(),
                &[],
            ),
            addr_use: AddrUse::default(),
            base: None,
        }
    }

    /// Writes a ring for every service a previous agent left without one this agent can use
    /// (LB_RINGS was recreated at another size, so the service entries point into an empty
    /// array): from the backends and weights the maps hold, before any packet reaches the new
    /// maps, so new flows never read an empty ring while the first apply is awaited. Returns
    /// how many were written.
    pub fn restore_rings(&mut self, tables: &mut dyn Tables) -> Result<usize, ApplyError> {
        let seed = self.config.unwrap_or_default().hash_seed;
        let lost: Vec<ServiceKey> = self
            .services
            .iter()
            .filter(|(_, a)| a.value.ring == u32::MAX)
            .map(|(k, _)| *k)
            .collect();
        for key in &lost {
            let applied = &self.services[key];
            let backends: Vec<crate::model::Backend> = applied
                .backends
                .keys()
                .map(|(addr, port)| crate::model::Backend {
                    addr: *addr,
                    port: *port,
                    weight: applied.backends[&(*addr, *port)].1,
                })
                .collect();
            let entries: Vec<(String, u32, u32)> = backends
                .iter()
                .map(|b| {
                    (
                        b.maglev_key(),
                        b.weight,
                        applied.backends[&(b.addr, b.port)].0,
                    )
                })
                .collect();
            let active = backends.iter().filter(|b| b.weight > 0).count();
            let size = ring_space::ring_size(active, self.sizes.ring_size);
            let table = ring_table(&entries, size, seed)?;
            let base = self.ring_space.alloc(size).ok_or(ApplyError::Capacity {
                what: "ring slots",
                max: self.sizes.ring_slots(),
                flag: "--max-backends and --max-services",
            })?;
            tables.write_ring(base, &table)?;
            let applied = self.services.get_mut(key).expect("listed above");
            applied.value.ring = base;
            applied.value.ring_size = size;
            applied.value.ring_digest = ring_digest(&entries, size, seed);
            applied.from = 0;
            tables.set_service(key, &applied.value)?;
        }
        Ok(lost.len())
    }

    /// LB_RINGS slots the applied services' rings hold (whole blocks).
    pub fn ring_slots_held(&self) -> u64 {
        self.ring_space.held_slots()
    }

    /// The ids the maps hold a service's entries under: its service id and its listed backends.
    /// `None` if the service is not applied.
    pub fn ids(&self, key: &ServiceKey) -> Option<(u32, Vec<BackendIds>)> {
        let a = self.services.get(key)?;
        Some((
            a.value.id,
            a.backends
                .iter()
                .map(|((addr, port), (id, weight))| BackendIds {
                    addr: *addr,
                    port: *port,
                    id: *id,
                    weight: *weight,
                })
                .collect(),
        ))
    }

    /// Named policies by id (for labels).
    pub fn policy_names(&self) -> BTreeMap<u32, String> {
        self.policy_ids
            .iter()
            .filter(|((_, over), _)| over.is_none())
            .map(|((name, _), id)| (*id, name.clone()))
            .collect()
    }

    /// Makes the maps hold `desired`. On error nothing was written, unless the error is a map
    /// write failing midway (then the maps hold a consistent mix: every service entry points to
    /// a complete ring).
    pub fn apply(
        &mut self,
        desired: &Desired,
        node: &NodeView,
        tables: &mut dyn Tables,
    ) -> Result<Report, ApplyError> {
        // What the maps hold is no longer what `base` describes.
        self.base = None;
        self.release_rings();
        self.check(desired, node)?;
        let mut report = Report::default();
        let mut t = Counting {
            inner: tables,
            writes: 0,
        };

        let config = self.config_for(desired, node);
        if self.config != Some(config) {
            t.set_config(&config)?;
            self.config = Some(config);
        }
        let default_policy = self.apply_policies(desired, &mut t)?;
        let range_ids = self.write_range_sets(desired, &mut t)?;

        let wanted: BTreeSet<ServiceKey> = desired.services.keys().map(Frontend::key).collect();
        let stale = self.stale(&wanted);
        let services: Vec<&Service> = desired.services.values().map(|s| &**s).collect();
        self.apply_services(
            desired,
            &stale,
            &services,
            (default_policy, &range_ids),
            &mut t,
            &mut report,
        )?;

        self.count_addrs(node);
        self.write_addrs(node, &mut t)?;
        // Only now: no service entry points to them any more.
        self.remove_range_sets(&range_ids.values().copied().collect(), &mut t)?;
        self.remove_stale_policies(desired);
        self.release_rings();
        report.writes = t.writes;
        Ok(report)
    }

    /// [`admit`], then [`Reconciler::apply`] what was admitted: what the agent does with each
    /// composed state, and what `lb-agent check` does with a config file.
    pub fn apply_admitting(
        &mut self,
        desired: &Desired,
        node: &NodeView,
        tables: &mut dyn Tables,
    ) -> Result<Applied, ApplyError> {
        self.base = None;
        let (admitted, mut left_out) = admit(desired, node)?;
        let (admitted, no_room) = self.fit(admitted);
        let waiting = !no_room.is_empty();
        left_out.extend(no_room);
        let report = self.apply(&admitted, node, tables)?;
        if !waiting {
            self.base = Some(Base {
                node: node.clone(),
                settings: desired.node.clone(),
                policies: desired.policies.clone(),
            });
        }
        Ok(Applied {
            report,
            desired: admitted,
            left_out,
            waiting,
        })
    }

    /// [`Reconciler::apply_admitting`] for a state that differs from the last one applied only
    /// at the `changed` frontends: looks at those services only, so that one endpoint change
    /// costs the same at 20,000 frontends as at 20. The result is the one the whole-state path
    /// gives (host tests hold the two equal after random changes). `None`, having written
    /// nothing: this change needs the whole-state path (the last apply left something out for
    /// room, or was for other node settings, policies or node view; a changed service is the
    /// config file's, does not fit, or needs a source-range set not written yet).
    pub fn apply_changed(
        &mut self,
        desired: &Desired,
        changed: &BTreeSet<Frontend>,
        node: &NodeView,
        tables: &mut dyn Tables,
    ) -> Result<Option<AppliedChange>, ApplyError> {
        let Some(base) = &self.base else {
            return Ok(None);
        };
        if base.settings != desired.node || base.policies != desired.policies || base.node != *node
        {
            return Ok(None);
        }
        self.release_rings();
        // admit: only the cluster's services are left out; anything about the file's goes the
        // whole way (it may reject the state).
        let mut out = AppliedChange::default();
        let mut admitted: Vec<&Service> = Vec::new();
        for f in changed {
            let Some(s) = desired.services.get(f) else {
                continue;
            };
            if s.origin.kubernetes_object().is_none() {
                return Ok(None);
            }
            match service_problem(s, node) {
                Some(reason) => out.left_out.push(Invalid {
                    origin: s.origin.clone(),
                    name: s.name.clone(),
                    frontend: s.frontend,
                    reason,
                }),
                None => admitted.push(s),
            }
        }
        // fit and check: the room the whole-state path would find, for these services only
        // (every other service is applied as it is wanted, so it needs none).
        let mut stale: Vec<ServiceKey> = changed
            .iter()
            .map(Frontend::key)
            .filter(|k| self.services.contains_key(k))
            .filter(|k| !admitted.iter().any(|s| s.frontend.key() == *k))
            .collect();
        stale.sort_unstable();
        let room_services = self.service_ids.free() + stale.len();
        let room_backends = self.backend_ids.free()
            + stale
                .iter()
                .map(|k| self.services[k].backends.len())
                .sum::<usize>();
        let new_services = admitted
            .iter()
            .filter(|s| !self.services.contains_key(&s.frontend.key()))
            .count();
        let new_backends: usize = admitted
            .iter()
            .map(|s| {
                let applied = self.services.get(&s.frontend.key());
                if applied.is_some_and(|a| lists_exactly(&a.backends, &s.backends)) {
                    return 0;
                }
                s.backends
                    .iter()
                    .filter(|b| applied.is_none_or(|a| !a.backends.contains_key(&(b.addr, b.port))))
                    .count()
            })
            .sum();
        if new_services > room_services || new_backends > room_backends {
            return Ok(None);
        }
        let mut space = self.ring_space.clone();
        if admitted.iter().any(|s| {
            self.new_ring(s, desired.node.hash_seed)
                .is_some_and(|size| space.alloc(size).is_none())
        }) {
            return Ok(None);
        }
        let mut range_ids = BTreeMap::new();
        for s in &admitted {
            let Some(set) = range_set(s) else { continue };
            match self.range_sets.iter().find(|(_, held)| **held == set) {
                Some((id, _)) => range_ids.insert(set, *id),
                None => return Ok(None),
            };
        }
        // From here on as `apply` does it, in its order, for these services only.
        let writes = (&stale[..], &admitted[..], &range_ids);
        match self.write_change(desired, changed, node, writes, tables) {
            Ok(report) => {
                out.report = report;
                out.admitted = admitted.iter().map(|s| s.frontend).collect();
                Ok(Some(out))
            }
            Err(e) => {
                // The mirror follows what was written; the next apply looks at everything.
                self.base = None;
                Err(e)
            }
        }
    }

    /// The writes of [`Reconciler::apply_changed`].
    fn write_change(
        &mut self,
        desired: &Desired,
        changed: &BTreeSet<Frontend>,
        node: &NodeView,
        (stale, admitted, range_ids): (&[ServiceKey], &[&Service], &BTreeMap<RangeSet, u32>),
        tables: &mut dyn Tables,
    ) -> Result<Report, ApplyError> {
        let mut report = Report::default();
        let mut t = Counting {
            inner: tables,
            writes: 0,
        };
        let default_policy = desired
            .node
            .default_policy
            .as_ref()
            .and_then(|n| self.policy_ids.get(&(n.clone(), None)).copied())
            .unwrap_or(0);
        // The source-range sets the changed services used: they go if nothing uses them now.
        let mut unused: BTreeSet<u32> = BTreeSet::new();
        for key in changed.iter().map(Frontend::key) {
            if let Some(a) = self.services.get(&key) {
                self.addr_use.count(&key, a, node, false);
                if a.value.source_ranges != 0 {
                    unused.insert(a.value.source_ranges);
                }
            }
        }
        let result = self.apply_services(
            desired,
            stale,
            admitted,
            (default_policy, range_ids),
            &mut t,
            &mut report,
        );
        for key in changed.iter().map(Frontend::key) {
            if let Some(a) = self.services.get(&key) {
                self.addr_use.count(&key, a, node, true);
            }
        }
        result?;
        self.write_addrs(node, &mut t)?;
        if !unused.is_empty() {
            for a in self.services.values() {
                unused.remove(&a.value.source_ranges);
            }
        }
        // Only now: no service entry points to them any more.
        let live: BTreeSet<u32> = self
            .range_sets
            .keys()
            .filter(|id| !unused.contains(id))
            .copied()
            .collect();
        self.remove_range_sets(&live, &mut t)?;
        self.release_rings();
        report.writes = t.writes;
        Ok(report)
    }

    /// `apply`'s middle: the `stale` services removed, then each of `services` (in frontend
    /// order) written where it differs from what it was last applied from.
    fn apply_services(
        &mut self,
        desired: &Desired,
        stale: &[ServiceKey],
        services: &[&Service],
        (default_policy, range_ids): (u32, &BTreeMap<RangeSet, u32>),
        t: &mut Counting<'_>,
        report: &mut Report,
    ) -> Result<(), ApplyError> {
        // Removals first: the ids they free make room for what is added.
        for key in stale {
            self.remove_service(key, t)?;
            report.services_removed += 1;
        }
        for service in services {
            let key = service.frontend.key();
            let policy = service
                .policy
                .as_ref()
                .or(desired.node.default_policy.as_ref())
                .and_then(|name| self.policy_ids.get(&(name.clone(), None)).copied())
                .unwrap_or(default_policy);
            let ranges = match range_set(service) {
                Some(set) => range_ids[&set],
                None => 0,
            };
            // Most services are as they were: comparing each with the maps' state (its backends,
            // its ring's digest) cost a fifth of an apply at 20,000 frontends.
            let from = applied_from(service, policy, ranges, self.config);
            if self.services.get(&key).is_some_and(|a| a.from == from) {
                continue;
            }
            self.apply_service(key, service, policy, ranges, t, report)?;
            if let Some(a) = self.services.get_mut(&key) {
                a.from = from;
            }
        }
        Ok(())
    }

    /// Applied services that `wanted` no longer lists.
    fn stale(&self, wanted: &BTreeSet<ServiceKey>) -> Vec<ServiceKey> {
        self.services
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect()
    }

    /// Free ids once `wanted`'s removals are done: (services, backends).
    fn room(&self, wanted: &BTreeSet<ServiceKey>) -> (usize, usize) {
        let stale = self.stale(wanted);
        let backends: usize = stale.iter().map(|k| self.services[k].backends.len()).sum();
        (
            self.service_ids.free() + stale.len(),
            self.backend_ids.free() + backends,
        )
    }

    /// Rings let go in the last apply are free again.
    fn release_rings(&mut self) {
        for (at, size) in self.freed_rings.drain(..) {
            self.ring_space.free(at, size);
        }
    }

    /// The ring size of `service`: from its backends of weight > 0, up to the largest.
    fn ring_size_of(&self, service: &Service) -> u32 {
        let active = service.backends.iter().filter(|b| b.weight > 0).count();
        ring_space::ring_size(active, self.sizes.ring_size)
    }

    /// The size of the new ring `service` needs, or `None` if the ring it has stays. May say a
    /// ring is needed when `apply` finds the same one (room is then kept for nothing), never the
    /// other way: the ring depends only on the backends, their weights, the size and the seed.
    fn new_ring(&self, service: &Service, seed: u32) -> Option<u32> {
        let size = self.ring_size_of(service);
        let Some(a) = self.services.get(&service.frontend.key()) else {
            return Some(size);
        };
        let same = a.value.ring != u32::MAX
            && a.value.ring_digest != 0
            && a.value.ring_size == size
            && self.config.map(|c| c.hash_seed) == Some(seed)
            && a.backends.len() == service.backends.len()
            && (lists_exactly(&a.backends, &service.backends)
                || service.backends.iter().all(|b| {
                    a.backends
                        .get(&(b.addr, b.port))
                        .is_some_and(|(_, w)| *w == b.weight)
                }));
        (!same).then_some(size)
    }

    /// Whether a new ring of `desired` finds no room: `apply`'s placement, in its order, in a
    /// copy of the space (the rings it lets go are free only once it ends).
    fn rings_without_room(&self, desired: &Desired) -> bool {
        let mut space = self.ring_space.clone();
        desired.services.values().any(|s| {
            self.new_ring(s, desired.node.hash_seed)
                .is_some_and(|size| space.alloc(size).is_none())
        })
    }

    /// What of `desired` fits the maps, so that running out of room never stops the rest:
    /// services already applied keep their place and take their new backends first, then new
    /// services are added in order while their ids and backends fit. Only the cluster's services
    /// are left out (an applied one keeps its listed backends and gets as many new ones as fit);
    /// the config file's come first and, if they do not fit, `apply` rejects the file, as any
    /// other mistake in it. What is left out is returned, to be reported and tried again. Room
    /// freed by a kept service's removed backends counts from the next apply on.
    fn fit(&self, mut desired: Desired) -> (Desired, Vec<Invalid>) {
        let wanted: BTreeSet<ServiceKey> = desired.services.keys().map(Frontend::key).collect();
        let (mut services, mut backends) = self.room(&wanted);
        let mut no_room = Vec::new();
        let too_many = no_room_for;
        let from_cluster = |s: &Service| s.origin.kubernetes_object().is_some();
        // Applied services first, the config file's before the cluster's.
        let mut applied: Vec<(bool, Frontend)> = desired
            .services
            .values()
            .filter(|s| self.services.contains_key(&s.frontend.key()))
            .map(|s| (from_cluster(s), s.frontend))
            .collect();
        applied.sort_by_key(|(cluster, _)| *cluster);
        for (_, f) in applied {
            let s = &desired.services[&f];
            let listed = &self.services[&f.key()].backends;
            let new = if lists_exactly(listed, &s.backends) {
                0
            } else {
                s.backends
                    .iter()
                    .filter(|b| !listed.contains_key(&(b.addr, b.port)))
                    .count()
            };
            if new <= backends || !from_cluster(s) {
                backends = backends.saturating_sub(new);
                continue;
            }
            let mut admitted = 0;
            let waiting = new - backends;
            // A copy of its own: the service is shared with the composed state.
            let s = Arc::make_mut(desired.services.get_mut(&f).expect("listed above"));
            s.backends.retain(|b| {
                listed.contains_key(&(b.addr, b.port)) || {
                    admitted += 1;
                    admitted <= backends
                }
            });
            backends = 0;
            no_room.push(too_many(
                s,
                &format!("{waiting} of its new backends"),
                "--max-backends",
                self.sizes.max_backends,
            ));
        }
        let mut new: Vec<(bool, Frontend)> = desired
            .services
            .values()
            .filter(|s| !self.services.contains_key(&s.frontend.key()))
            .map(|s| (from_cluster(s), s.frontend))
            .collect();
        new.sort();
        for (cluster, f) in new {
            let s = &desired.services[&f];
            let short = if services == 0 {
                Some(("another service", "--max-services", self.sizes.max_services))
            } else if s.backends.len() > backends {
                Some(("its backends", "--max-backends", self.sizes.max_backends))
            } else {
                None
            };
            match short {
                Some((what, flag, max)) if cluster => {
                    no_room.push(too_many(s, what, flag, max));
                    desired.services.remove(&f);
                }
                _ => {
                    services = services.saturating_sub(1);
                    backends = backends.saturating_sub(s.backends.len());
                }
            }
        }
        self.fit_rings(&mut desired, &mut no_room);
        (desired, no_room)
    }

    /// The ring part of [`Reconciler::fit`].
    fn fit_rings(&self, desired: &mut Desired, no_room: &mut Vec<Invalid>) {
        // Ring space, by the rings' real sizes, in apply's order (the rings it lets go are free
        // only once it ends): a new service whose ring finds no room waits; an applied one
        // keeps the backends it has, and so its ring.
        let from_cluster = |s: &Service| s.origin.kubernetes_object().is_some();
        let seed = desired.node.hash_seed;
        let mut space = self.ring_space.clone();
        let frontends: Vec<Frontend> = desired.services.keys().copied().collect();
        for f in frontends {
            let s = &desired.services[&f];
            let Some(size) = self.new_ring(s, seed) else {
                continue;
            };
            // The config file's services take their room whatever it costs: `apply` rejects
            // the file if it does not fit.
            if space.alloc(size).is_some() || !from_cluster(s) {
                continue;
            }
            no_room.push(no_room_for(
                s,
                &format!("a ring of {size} slots"),
                "--max-backends and --max-services: ring space",
                self.sizes.ring_slots(),
            ));
            match self.services.get(&f.key()) {
                None => {
                    desired.services.remove(&f);
                }
                Some(a) => {
                    let s = Arc::make_mut(desired.services.get_mut(&f).expect("listed above"));
                    s.backends = a
                        .backends
                        .iter()
                        .map(|((addr, port), (_, weight))| crate::model::Backend {
                            addr: *addr,
                            port: *port,
                            weight: *weight,
                        })
                        .collect();
                    // Still a new ring with the same backends (a new seed): `apply` fails
                    // and says why.
                }
            }
        }
    }

    /// Everything `apply` would refuse, checked before any write.
    fn check(&self, desired: &Desired, node: &NodeView) -> Result<(), ApplyError> {
        if let (Some(ranges), Some((lo, hi))) = (&desired.node.snat_ports, node.ephemeral_ports)
            && let Some((a, b)) = ranges.iter().find(|(a, b)| *a <= hi && *b >= lo)
        {
            return Err(ApplyError::Setting {
                field: "snat-ports",
                reason: format!(
                    "{a}-{b} overlaps this node's ephemeral ports {lo}-{hi} (net.ipv4.ip_local_port_range): the node's own connections would collide with snat flows; leave snat-ports unset for a range that avoids them"
                ),
            });
        }
        let invalid = invalid_services(desired, node);
        if !invalid.is_empty() {
            return Err(ApplyError::Invalid(invalid));
        }
        // Room for what is new, once the removals are done.
        let wanted: BTreeSet<ServiceKey> = desired.services.keys().map(Frontend::key).collect();
        let (room_services, room_backends) = self.room(&wanted);
        let new_services = desired
            .services
            .keys()
            .filter(|f| !self.services.contains_key(&f.key()))
            .count();
        if new_services > room_services {
            return Err(ApplyError::Capacity {
                what: "services",
                max: self.sizes.max_services,
                flag: "--max-services",
            });
        }
        let new_backends: usize = desired
            .services
            .values()
            .map(|s| {
                let applied = self.services.get(&s.frontend.key());
                if applied.is_some_and(|a| lists_exactly(&a.backends, &s.backends)) {
                    return 0;
                }
                s.backends
                    .iter()
                    .filter(|b| applied.is_none_or(|a| !a.backends.contains_key(&(b.addr, b.port))))
                    .count()
            })
            .sum();
        if new_backends > room_backends {
            return Err(ApplyError::Capacity {
                what: "backends",
                max: self.sizes.max_backends,
                flag: "--max-backends",
            });
        }
        if self.rings_without_room(desired) {
            return Err(ApplyError::Capacity {
                what: "ring slots",
                max: self.sizes.ring_slots(),
                flag: "--max-backends and --max-services",
            });
        }
        let slots: usize = desired
            .policies
            .values()
            .map(|p| 1 + p.overrides.len())
            .sum();
        if slots >= MAX_POLICIES as usize {
            return Err(ApplyError::Capacity {
                what: "rate-limit policies and overrides",
                max: MAX_POLICIES - 1,
                flag: "lb_common::MAX_POLICIES",
            });
        }
        // Prefixes: the policies', the range sets kept, and new sets, which are written before
        // the sets they replace are removed.
        let policy_prefixes: usize = desired
            .policies
            .values()
            .map(|p| {
                p.exempt.len()
                    + p.deny.len()
                    + p.overrides.iter().map(|(c, _)| c.len()).sum::<usize>()
            })
            .sum::<usize>()
            .max(self.prefixes.len());
        let wanted: BTreeSet<RangeSet> = desired
            .services
            .values()
            .filter_map(|s| range_set(s))
            .collect();
        let kept: usize = self.range_sets.values().map(BTreeSet::len).sum();
        let new: usize = wanted
            .iter()
            .filter(|w| !self.range_sets.values().any(|s| s == *w))
            .map(BTreeSet::len)
            .sum();
        if policy_prefixes + kept + new > MAX_PREFIXES as usize {
            return Err(ApplyError::Capacity {
                what: "rate-limit and source-range prefixes",
                max: MAX_PREFIXES,
                flag: "lb_common::MAX_PREFIXES",
            });
        }
        Ok(())
    }

    fn config_for(&self, desired: &Desired, node: &NodeView) -> Config {
        let n = &desired.node;
        let ticks =
            |d: std::time::Duration| flow_ticks(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let mut snat_v4 = [Addr::ZERO; MAX_SNAT_ADDRS];
        let mut snat_v6 = [Addr::ZERO; MAX_SNAT_ADDRS];
        for (slot, a) in snat_v4.iter_mut().zip(&node.snat_ipv4) {
            *slot = Addr::v4(a.octets());
        }
        for (slot, a) in snat_v6.iter_mut().zip(&node.snat_ipv6) {
            *slot = Addr(a.octets());
        }
        let mut snat_ports = [PortRange::EMPTY; 2];
        for (slot, (min, max)) in snat_ports.iter_mut().zip(node.snat_ports(n)) {
            *slot = PortRange { min, max };
        }
        Config {
            hash_seed: n.hash_seed,
            tcp_idle: ticks(n.tcp_idle),
            udp_idle: ticks(n.udp_idle),
            tcp_closing: ticks(n.tcp_closing),
            tcp_handshake: ticks(n.tcp_handshake),
            tcp_time_wait: ticks(n.tcp_time_wait),
            snat_v4_count: snat_count(node.snat_ipv4.len()),
            snat_v6_count: snat_count(node.snat_ipv6.len()),
            snat_v4,
            snat_v6,
            snat_ports,
            source_sets: self.sizes.source_sets(),
            claims_v4: self.sizes.flow_entries,
            claims_v6: self.sizes.flow_entries_v6,
        }
    }

    /// Writes policies and their prefixes; returns the node default's id (0: none).
    fn apply_policies(
        &mut self,
        desired: &Desired,
        t: &mut Counting<'_>,
    ) -> Result<u32, ApplyError> {
        // Ids first: overrides and prefixes refer to them.
        let mut slots: Vec<(PolicySlot, lb_common::Policy)> = Vec::new();
        for (name, p) in &desired.policies {
            slots.push(((name.clone(), None), to_bpf_policy(p, &p.limits)));
            for (i, (_, limits)) in p.overrides.iter().enumerate() {
                slots.push(((name.clone(), Some(i)), to_bpf_policy(p, limits)));
            }
        }
        for (slot, value) in &slots {
            if !self.policy_ids.contains_key(slot) {
                let id = self.claim_policy(value);
                self.policy_ids.insert(slot.clone(), id);
            }
        }
        // Each id's value carries its generation.
        for (slot, value) in &mut slots {
            value.generation = self.policy_gens.get(self.policy_ids[slot]);
        }
        let mut prefixes = BTreeMap::new();
        for (name, p) in &desired.policies {
            let id = self.policy_ids[&(name.clone(), None)];
            let rule = |action, policy| PrefixRule { action, policy };
            for c in &p.exempt {
                prefixes.insert(prefix_key(id, c), rule(PREFIX_EXEMPT, 0));
            }
            for c in &p.deny {
                prefixes.insert(prefix_key(id, c), rule(PREFIX_DENY, 0));
            }
            for (i, (cidrs, _)) in p.overrides.iter().enumerate() {
                let own = self.policy_ids[&(name.clone(), Some(i))];
                for c in cidrs {
                    prefixes.insert(prefix_key(id, c), rule(PREFIX_LIMIT, own));
                }
            }
        }
        let now = monotonic_ns();
        for (slot, value) in &slots {
            let id = self.policy_ids[slot];
            if self.policies.get(&id) != Some(value) {
                t.set_policy(id, value)?;
                self.policies.insert(id, *value);
            }
            // Fail-closed policies need the bucket sources beyond the table's capacity share.
            if value.flags & POLICY_FAIL_OPEN == 0 && !self.overflow.contains(&id) {
                let full = Source {
                    packets: Bucket::full(&value.packets, now),
                    connections: Bucket::full(&value.connections, now),
                    ..Source::default()
                };
                t.set_overflow(id, &full)?;
                self.overflow.insert(id);
            }
        }
        for (k, rule) in &prefixes {
            if self.prefixes.get(k) != Some(rule) {
                t.set_prefix(&k.0, k.1, rule)?;
                self.prefixes.insert(*k, *rule);
            }
        }
        let stale: Vec<_> = self
            .prefixes
            .keys()
            .filter(|k| !prefixes.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            t.remove_prefix(&k.0, k.1)?;
            self.prefixes.remove(&k);
        }
        Ok(desired
            .node
            .default_policy
            .as_ref()
            .and_then(|n| self.policy_ids.get(&(n.clone(), None)).copied())
            .unwrap_or(0))
    }

    /// Writes every source-range set `desired` needs that the maps do not hold yet (each under
    /// a fresh id, in full); returns the id of every set needed.
    fn write_range_sets(
        &mut self,
        desired: &Desired,
        t: &mut Counting<'_>,
    ) -> Result<BTreeMap<RangeSet, u32>, ApplyError> {
        let mut ids = BTreeMap::new();
        for set in desired.services.values().filter_map(|s| range_set(s)) {
            if ids.contains_key(&set) {
                continue;
            }
            let id = if let Some((id, _)) = self.range_sets.iter().find(|(_, s)| **s == set) {
                *id
            } else {
                let id = self.range_pool.take().ok_or(ApplyError::Capacity {
                    what: "source-range sets",
                    max: MAX_PREFIXES,
                    flag: "lb_common::MAX_PREFIXES",
                })?;
                // The mirror follows each write: a set left half-written by a failed write
                // matches no list, and is removed by a later apply.
                let written = self.range_sets.entry(id).or_default();
                for (addr, len) in &set {
                    let key = PrefixKey {
                        policy: id.to_be_bytes(),
                        addr: *addr,
                    };
                    t.set_prefix(&key, 32 + len, &PrefixRule::default())?;
                    written.insert((*addr, *len));
                }
                id
            };
            ids.insert(set, id);
        }
        Ok(ids)
    }

    /// Removes the source-range sets whose ids are not `live`: the caller has pointed every
    /// service elsewhere first.
    fn remove_range_sets(
        &mut self,
        live: &BTreeSet<u32>,
        t: &mut Counting<'_>,
    ) -> Result<(), ApplyError> {
        let stale: Vec<u32> = self
            .range_sets
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in stale {
            let set = self.range_sets[&id].clone();
            for (addr, len) in &set {
                let key = PrefixKey {
                    policy: id.to_be_bytes(),
                    addr: *addr,
                };
                t.remove_prefix(&key, 32 + len)?;
                // As for writes: a half-removed set matches no list any more.
                if let Some(s) = self.range_sets.get_mut(&id) {
                    s.remove(&(*addr, *len));
                }
            }
            self.range_sets.remove(&id);
            self.range_pool.give_back(id);
        }
        Ok(())
    }

    /// An id for a new policy slot: one whose map entry already holds this exact policy (left
    /// by a previous agent: its sources keep their buckets) or a fresh one, in a new generation
    /// (sources tracked under its previous owner no longer match).
    fn claim_policy(&mut self, value: &lb_common::Policy) -> u32 {
        let claimed: BTreeSet<u32> = self.policy_ids.values().copied().collect();
        if let Some(id) = self
            .policies
            .iter()
            .find(|(id, p)| {
                lb_common::Policy {
                    generation: 0,
                    ..**p
                } == *value
                    && !claimed.contains(id)
            })
            .map(|(id, _)| *id)
        {
            return id;
        }
        let id = self.policy_pool.take().unwrap_or(0);
        self.policy_gens.renew(id);
        self.overflow.remove(&id);
        id
    }

    fn remove_stale_policies(&mut self, desired: &Desired) {
        let stale: Vec<PolicySlot> = self
            .policy_ids
            .keys()
            .filter(|(name, over)| match desired.policies.get(name) {
                None => true,
                Some(p) => over.is_some_and(|i| i >= p.overrides.len()),
            })
            .cloned()
            .collect();
        for slot in stale {
            if let Some(id) = self.policy_ids.remove(&slot) {
                self.overflow.remove(&id);
                self.policies.remove(&id);
                self.policy_pool.give_back(id);
            }
        }
        // Policies a previous agent left that nothing claimed.
        let claimed: BTreeSet<u32> = self.policy_ids.values().copied().collect();
        let orphans: Vec<u32> = self
            .policies
            .keys()
            .filter(|id| !claimed.contains(id))
            .copied()
            .collect();
        for id in orphans {
            self.policies.remove(&id);
            self.policy_pool.give_back(id);
        }
    }

    fn apply_service(
        &mut self,
        key: ServiceKey,
        service: &Service,
        policy: u32,
        ranges: u32,
        t: &mut Counting<'_>,
        report: &mut Report,
    ) -> Result<(), ApplyError> {
        let is_new = !self.services.contains_key(&key);
        let mut applied = match self.services.get(&key) {
            Some(a) => a.clone(),
            None => self.claim_service(key, t)?,
        };
        let id = applied.value.id;
        let backends = self.apply_backends(id, service, &applied.backends, t)?;
        let mut value = applied.value;
        let old_ring = value.ring;
        self.apply_ring(service, &backends, &mut value, t, report)?;
        value.flags = match service.mode {
            Mode::Snat => SVC_SNAT,
            Mode::PreserveClientIp => 0,
        } | if service.affinity.is_some() {
            SVC_AFFINITY
        } else {
            0
        } | if ranges != 0 && service.source_ranges.deny {
            SVC_RANGES_DENY
        } else {
            0
        };
        value.source_ranges = ranges;
        value.policy = policy;
        value.affinity_timeout_s = service
            .affinity
            .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
        // At most max_backends, a u32.
        value.active_backends =
            u32::try_from(service.backends.iter().filter(|b| b.weight > 0).count())
                .unwrap_or(u32::MAX);

        // What established flows read (the policy) and replies are rewritten from, before the
        // service entry: its flows may be live already.
        let info = ServiceInfo {
            policy,
            ..applied.info
        };
        if is_new || info != applied.info {
            t.set_service_info(id, &info)?;
            applied.info = info;
        }
        if is_new || value != applied.value {
            // The switch: from here new flows use the new ring and settings.
            t.set_service(&key, &value)?;
            if is_new {
                report.services_added += 1;
            } else {
                report.services_changed += 1;
            }
        }
        if old_ring != u32::MAX && old_ring != value.ring {
            self.freed_rings.push((old_ring, applied.value.ring_size));
        }
        // Backends no longer listed: no ring slot refers to them any more. Existing flows keep
        // going (they hold the address and the id's generation); the id is reused last.
        for (addr_port, (bid, _)) in &applied.backends {
            if !backends.contains_key(addr_port) {
                let generation = self.backend_gens.get(*bid);
                t.set_backend(
                    *bid,
                    &unlisted(backend_entry(addr_port.0, addr_port.1, id, 0, generation)),
                )?;
                self.backend_ids.give_back(*bid);
            }
        }
        applied.value = value;
        applied.backends = backends;
        self.services.insert(key, applied);
        Ok(())
    }

    /// A service id for a new service, its counters zeroed; no ring yet.
    /// A service id for a new service (in a new generation), its counters zeroed; no ring yet.
    fn claim_service(
        &mut self,
        key: ServiceKey,
        t: &mut Counting<'_>,
    ) -> Result<AppliedService, ApplyError> {
        let id = self.service_ids.take().ok_or(ApplyError::Capacity {
            what: "services",
            max: self.sizes.max_services,
            flag: "--max-services",
        })?;
        t.clear_service_stats(id)?;
        Ok(AppliedService {
            value: lb_common::Service {
                id,
                ring: u32::MAX,
                ..Default::default()
            },
            info: ServiceInfo {
                addr: key.addr,
                port: key.port,
                proto: key.proto,
                generation: self.service_gens.renew(id),
                policy: 0,
            },
            backends: BTreeMap::new(),
            from: 0,
        })
    }

    /// Writes the backend entries of service `id` that are new or changed weight: backends that
    /// stay keep their ids, new ones get fresh ids (counters zeroed). Returns (address, port) ->
    /// (backend id, weight) of every backend listed now.
    fn apply_backends(
        &mut self,
        id: u32,
        service: &Service,
        applied: &AppliedBackends,
        t: &mut Counting<'_>,
    ) -> Result<AppliedBackends, ApplyError> {
        let mut backends = BTreeMap::new();
        for b in &service.backends {
            let (bid, old_weight) = if let Some(&(bid, w)) = applied.get(&(b.addr, b.port)) {
                (bid, Some(w))
            } else {
                let bid = self.backend_ids.take().ok_or(ApplyError::Capacity {
                    what: "backends",
                    max: self.sizes.max_backends,
                    flag: "--max-backends",
                })?;
                t.clear_backend_stats(bid)?;
                self.backend_gens.renew(bid);
                (bid, None)
            };
            if old_weight != Some(b.weight) {
                let generation = self.backend_gens.get(bid);
                t.set_backend(
                    bid,
                    &backend_entry(b.addr, b.port, id, b.weight, generation),
                )?;
            }
            backends.insert((b.addr, b.port), (bid, b.weight));
        }
        Ok(backends)
    }

    /// Only if what the service's ring is built from changed: builds the ring, writes it into a
    /// spare ring and points `value` at it (the caller switches the service entry, then frees
    /// the old ring).
    fn apply_ring(
        &mut self,
        service: &Service,
        backends: &AppliedBackends,
        value: &mut lb_common::Service,
        t: &mut Counting<'_>,
        report: &mut Report,
    ) -> Result<(), ApplyError> {
        let cfg = self.config.unwrap_or_default();
        let entries: Vec<(String, u32, u32)> = service
            .backends
            .iter()
            .map(|b| (b.maglev_key(), b.weight, backends[&(b.addr, b.port)].0))
            .collect();
        let ring_size = self.ring_size_of(service);
        let digest = ring_digest(&entries, ring_size, cfg.hash_seed);
        if value.ring == u32::MAX || value.ring_digest != digest || value.ring_size != ring_size {
            let table = ring_table(&entries, ring_size, cfg.hash_seed)?;
            let base = self
                .ring_space
                .alloc(ring_size)
                .ok_or(ApplyError::Capacity {
                    what: "ring slots",
                    max: self.sizes.ring_slots(),
                    flag: "--max-backends and --max-services",
                })?;
            // The service entry holds its ring's first slot and its size.
            if let Err(e) = t.write_ring(base, &table) {
                self.ring_space.free(base, ring_size);
                return Err(e.into());
            }
            report.rings_written += 1;
            value.ring = base;
            value.ring_size = ring_size;
            value.ring_digest = digest;
        }
        Ok(())
    }

    fn remove_service(&mut self, key: &ServiceKey, t: &mut Counting<'_>) -> Result<(), ApplyError> {
        let Some(applied) = self.services.remove(key) else {
            return Ok(());
        };
        t.remove_service(key)?;
        // Its flows live on until they end (replies still need the frontend), no longer held
        // to a policy whose id may be reused.
        t.set_service_info(
            applied.value.id,
            &ServiceInfo {
                policy: 0,
                ..applied.info
            },
        )?;
        for ((addr, port), (bid, _)) in &applied.backends {
            let generation = self.backend_gens.get(*bid);
            t.set_backend(
                *bid,
                &unlisted(backend_entry(*addr, *port, applied.value.id, 0, generation)),
            )?;
            self.backend_ids.give_back(*bid);
        }
        if applied.value.ring != u32::MAX {
            self.freed_rings
                .push((applied.value.ring, applied.value.ring_size));
        }
        self.service_ids.give_back(applied.value.id);
        Ok(())
    }

    /// Counts the addresses of every applied service anew.
    fn count_addrs(&mut self, node: &NodeView) {
        let mut counts = AddrUse::default();
        for (key, a) in &self.services {
            counts.count(key, a, node, true);
        }
        self.addr_use = counts;
    }

    /// Writes the addresses and the filter the counted addresses make, where the maps differ.
    fn write_addrs(&mut self, node: &NodeView, t: &mut Counting<'_>) -> Result<(), ApplyError> {
        let mut addrs: BTreeMap<Addr, AddrInfo> = BTreeMap::new();
        for vip in self.addr_use.vips.keys() {
            let flags = if node.node_addrs.contains(vip) {
                ADDR_NODE
            } else {
                ADDR_VIP
            };
            addrs.entry(Addr::from(*vip)).or_default().flags |= flags;
        }
        let snat = node
            .snat_ipv4
            .iter()
            .map(|a| IpAddr::V4(*a))
            .chain(node.snat_ipv6.iter().map(|a| IpAddr::V6(*a)));
        for a in snat {
            addrs.entry(Addr::from(a)).or_default().flags |= ADDR_NODE;
        }
        // A node address is never also a VIP: its other traffic is the node's own.
        for info in addrs.values_mut() {
            if info.flags & ADDR_NODE != 0 {
                info.flags = ADDR_NODE;
            }
        }
        let mut filter = vec![0u64; FILTER_ENTRIES as usize];
        let mut set = |plane: Plane, a: &Addr| {
            let (word, mask) = filter::position(plane, a);
            filter[word as usize] |= mask;
        };
        for a in addrs.keys() {
            set(Plane::Served, a);
        }
        // Where lb_backend looks for replies that keep the client's address (AddrUse::count).
        for a in self.addr_use.preserved.keys() {
            set(Plane::PreservedBackends, &Addr::from(*a));
        }
        // No client either (never answered, never a flow's source), but nothing to serve.
        for a in node.node_addrs.iter().chain(&node.broadcast) {
            addrs.entry(Addr::from(*a)).or_insert(AddrInfo {
                flags: ADDR_NO_CLIENT,
            });
        }
        for (a, info) in &addrs {
            if self.addrs.get(a) != Some(info) {
                t.set_addr(a, info)?;
            }
        }
        for (i, (new, old)) in (0u32..).zip(filter.iter().zip(self.filter.iter())) {
            if new != old {
                t.set_filter_word(i, *new)?;
            }
        }
        let stale: Vec<Addr> = self
            .addrs
            .keys()
            .filter(|a| !addrs.contains_key(a))
            .copied()
            .collect();
        for a in stale {
            t.remove_addr(&a)?;
        }
        self.addrs = addrs;
        self.filter = filter;
        Ok(())
    }
}

/// The source-range sets in a snapshot's prefixes, by id.
fn range_sets_of(snap: &Snapshot) -> BTreeMap<u32, RangeSet> {
    let mut range_sets: BTreeMap<u32, RangeSet> = BTreeMap::new();
    for (k, len, _) in &snap.prefixes {
        let id = u32::from_be_bytes(k.policy);
        if id >= RANGES_FIRST_ID {
            range_sets
                .entry(id)
                .or_default()
                .insert((k.addr, len.saturating_sub(32)));
        }
    }
    range_sets
}

fn backend_entry(
    addr: IpAddr,
    port: u16,
    service: u32,
    weight: u32,
    generation: u8,
) -> lb_common::Backend {
    lb_common::Backend {
        addr: Addr::from(addr),
        port: port.to_be(),
        flags: BACKEND_LISTED | if weight > 0 { BACKEND_ACTIVE } else { 0 },
        service,
        weight,
        generation,
        _pad1: 0,
        _pad2: 0,
    }
}

fn unlisted(mut b: lb_common::Backend) -> lb_common::Backend {
    b.flags = 0;
    b
}

/// The ring: Maglev over the service's backends, slots holding backend ids.
pub fn ring_table(
    entries: &[(String, u32, u32)],
    size: u32,
    seed: u32,
) -> Result<Vec<u32>, ApplyError> {
    let m: Vec<maglev::Entry<'_>> = entries
        .iter()
        .map(|(k, w, _)| maglev::Entry {
            key: k.as_bytes(),
            weight: *w,
        })
        .collect();
    let slots = maglev::build(&m, size, seed)
        .map_err(|e| ApplyError::Dataplane(DataplaneError::map(lb_common::MAP_RINGS, e)))?;
    Ok(slots
        .into_iter()
        .map(|i| {
            if i == NO_BACKEND {
                NO_BACKEND
            } else {
                entries[i as usize].2
            }
        })
        .collect())
}

/// What a ring is built from (its entries in order, size and seed), hashed: the same digest,
/// the same ring, so an apply builds only the rings whose inputs changed (building one is the
/// dear part of an apply: at 16381 slots, milliseconds). Never 0: a service entry with digest 0
/// has no ring yet.
fn ring_digest(entries: &[(String, u32, u32)], size: u32, seed: u32) -> u32 {
    let mut bytes = Vec::with_capacity(entries.len() * 48 + 8);
    bytes.extend_from_slice(&size.to_le_bytes());
    bytes.extend_from_slice(&seed.to_le_bytes());
    for (key, weight, id) in entries {
        bytes.extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_le_bytes());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(&weight.to_le_bytes());
        bytes.extend_from_slice(&id.to_le_bytes());
    }
    bytes_hash(&bytes, 0x0d16_e575).max(1)
}

/// A hash of everything [`Reconciler::apply_service`] writes a service from (never 0): the
/// same, and the maps already hold it.
fn applied_from(service: &Service, policy: u32, ranges: u32, config: Option<Config>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    service.hash(&mut h);
    policy.hash(&mut h);
    ranges.hash(&mut h);
    config.map(|c| c.hash_seed).hash(&mut h);
    h.finish().max(1)
}

fn to_bpf_policy(p: &Policy, limits: &Limits) -> lb_common::Policy {
    let limit = |r: Option<crate::model::Rate>| {
        r.and_then(|r| Limit::new(r.per_second, r.burst).ok())
            .unwrap_or(Limit::UNLIMITED)
    };
    let mut flags = 0;
    if p.table_full == TableFull::FailOpen {
        flags |= POLICY_FAIL_OPEN;
    }
    if p.reset_rejected_syn {
        flags |= POLICY_RST_SYN;
    }
    if !(p.exempt.is_empty() && p.deny.is_empty() && p.overrides.is_empty()) {
        flags |= POLICY_HAS_PREFIXES;
    }
    // The clock is read before the packet's override (if any) is known: every limit counts.
    let coarse_ok = std::iter::once(&p.limits)
        .chain(p.overrides.iter().map(|(_, l)| l))
        .flat_map(|l| [limit(l.packets), limit(l.connections)])
        .all(|l| l.coarse_clock_ok());
    if !coarse_ok {
        flags |= POLICY_PRECISE_CLOCK;
    }
    lb_common::Policy {
        packets: limit(limits.packets),
        connections: limit(limits.connections),
        v6_prefix_len: p.ipv6_prefix,
        generation: 0,
        _pad: 0,
        flags,
    }
}

/// A service's source-range set, as its LB_PREFIXES entries hold it; `None`: every source is
/// admitted.
fn range_set(s: &Service) -> Option<RangeSet> {
    if s.source_ranges.is_open() {
        return None;
    }
    Some(
        s.source_ranges
            .cidrs
            .iter()
            .flat_map(Cidr::own_family_pieces)
            .map(|(bits, len)| (Addr(bits.to_be_bytes()), u32::from(len)))
            .collect(),
    )
}

/// The LPM key of a policy's prefix, and its length in bits (policy id, then the address).
fn prefix_key(policy: u32, c: &Cidr) -> (PrefixKey, u32) {
    let (bits, len) = c.as_v6_bits();
    (
        PrefixKey {
            policy: policy.to_be_bytes(),
            addr: Addr(bits.to_be_bytes()),
        },
        32 + u32::from(len),
    )
}

/// What a service that does not fit is told.
fn no_room_for(s: &Service, what: &str, flag: &str, max: u32) -> Invalid {
    Invalid {
        origin: s.origin.clone(),
        name: s.name.clone(),
        frontend: s.frontend,
        reason: format!("no room for {what} (at most {max}, {flag}); tried again on every apply"),
    }
}

/// Free ids, handed out oldest-freed first, so a freed id is reused as late as possible.
struct IdPool(VecDeque<u32>);

impl IdPool {
    fn new(all: std::ops::Range<u32>, used: &BTreeSet<u32>, last: &[u32]) -> IdPool {
        let mut q: VecDeque<u32> = all
            .filter(|i| !used.contains(i) && !last.contains(i))
            .collect();
        q.extend(last.iter().copied().filter(|i| !used.contains(i)));
        IdPool(q)
    }
    fn take(&mut self) -> Option<u32> {
        self.0.pop_front()
    }
    fn give_back(&mut self, id: u32) {
        self.0.push_back(id);
    }
    fn free(&self) -> usize {
        self.0.len()
    }
}

/// Counts writes on their way to the tables.
struct Counting<'a> {
    inner: &'a mut dyn Tables,
    writes: usize,
}

macro_rules! counted {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {
        impl Counting<'_> {
            $(fn $name(&mut self, $($arg: $ty),*) -> Result<(), DataplaneError> {
                self.writes += 1;
                self.inner.$name($($arg),*)
            })*
        }
    };
}

counted! {
    set_config(c: &Config);
    set_filter_word(i: u32, w: u64);
    set_addr(a: &Addr, info: &AddrInfo);
    remove_addr(a: &Addr);
    set_service(k: &ServiceKey, s: &lb_common::Service);
    remove_service(k: &ServiceKey);
    set_service_info(id: u32, i: &ServiceInfo);
    set_backend(id: u32, b: &lb_common::Backend);
    write_ring(base: u32, slots: &[u32]);
    clear_service_stats(id: u32);
    clear_backend_stats(id: u32);
    set_policy(id: u32, p: &lb_common::Policy);
    set_prefix(k: &PrefixKey, len: u32, r: &PrefixRule);
    remove_prefix(k: &PrefixKey, len: u32);
    set_overflow(policy: u32, s: &Source);
}

/// The data path's count of snat addresses (the config's validation keeps it at most
/// MAX_SNAT_ADDRS).
fn snat_count(n: usize) -> u32 {
    u32::try_from(n.min(MAX_SNAT_ADDRS)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lb_common::{FILTER_WORDS, filter_bit};

    use super::*;
    use crate::model::Origin;
    use crate::ring_space::RingSpace;
    use crate::{
        model::{Backend, Protocol, Rate},
        tables::{MemoryTables, Write},
    };

    fn sizes() -> Sizes {
        Sizes {
            max_services: 8,
            max_backends: 32,
            ring_size: 251,
            ..Sizes::default()
        }
    }

    fn node() -> NodeView {
        NodeView {
            snat_ipv4: vec!["10.0.0.1".parse().unwrap()],
            snat_ipv6: Vec::new(),
            node_addrs: ["10.0.0.1".parse().unwrap()].into(),
            local: ["10.1.1.2".parse().unwrap(), "10.1.1.3".parse().unwrap()].into(),
            broadcast: std::collections::BTreeSet::default(),
            ephemeral_ports: None,
        }
    }

    fn backend(a: &str, weight: u32) -> Backend {
        Backend {
            addr: a.parse().unwrap(),
            port: 8080,
            weight,
        }
    }

    fn service(vip: &str, port: u16, mode: Mode, backends: Vec<Backend>) -> Service {
        Service {
            name: format!("svc-{port}"),
            origin: "test".into(),
            frontend: Frontend {
                vip: vip.parse().unwrap(),
                port,
                protocol: Protocol::Tcp,
            },
            mode,
            backends,
            policy: None,
            affinity: None,
            source_ranges: crate::model::SourceRanges::default(),
        }
    }

    fn desired(services: Vec<Service>) -> Desired {
        Desired {
            services: services
                .into_iter()
                .map(|s| (s.frontend, Arc::new(s)))
                .collect(),
            ..Desired::default()
        }
    }

    fn web() -> Service {
        service(
            "10.96.0.10",
            80,
            Mode::Snat,
            vec![backend("10.1.1.2", 1), backend("10.1.2.2", 1)],
        )
    }

    fn key(s: &Service) -> ServiceKey {
        s.frontend.key()
    }

    /// Backend addresses each ring slot sends to.
    fn ring_addrs(t: &MemoryTables, s: &Service) -> Vec<Addr> {
        t.ring_of(&key(s))
            .unwrap()
            .iter()
            .map(|id| t.backends[id].addr)
            .collect()
    }

    #[test]
    fn applying_the_same_state_twice_writes_nothing_the_second_time() {
        let mut t = MemoryTables::default();
        let mut r = Reconciler::new(sizes());
        let d = desired(vec![web()]);
        let first = r.apply(&d, &node(), &mut t).unwrap();
        assert_eq!(first.services_added, 1);
        assert_eq!(first.rings_written, 1);
        assert!(first.writes > 0);
        t.take_log();
        let second = r.apply(&d, &node(), &mut t).unwrap();
        assert!(second.is_empty(), "{second:?}");
        assert!(t.log.is_empty(), "{:?}", t.log);
    }

    #[test]
    fn a_restarted_agent_resumes_from_the_maps_without_writing() {
        let mut t = MemoryTables::default();
        let d = desired(vec![
            web(),
            service(
                "10.96.0.11",
                53,
                Mode::PreserveClientIp,
                vec![backend("10.1.1.3", 2)],
            ),
        ]);
        Reconciler::new(sizes()).apply(&d, &node(), &mut t).unwrap();
        t.take_log();
        let mut resumed = Reconciler::resume(sizes(), &t.snapshot().unwrap());
        let report = resumed.apply(&d, &node(), &mut t).unwrap();
        assert!(report.is_empty(), "{report:?} {:?}", t.log);
    }

    #[test]
    fn the_service_entry_switches_to_a_fully_written_spare_ring() {
        let mut t = MemoryTables::default();
        let mut r = Reconciler::new(sizes());
        let mut s = web();
        r.apply(&desired(vec![s.clone()]), &node(), &mut t).unwrap();
        let old_ring = t.services[&key(&s)].ring;
        t.take_log();
        s.backends.push(backend("10.1.2.3", 1));
        let report = r.apply(&desired(vec![s.clone()]), &node(), &mut t).unwrap();
        assert_eq!(report.rings_written, 1);
        let new_ring = t.services[&key(&s)].ring;
        assert_ne!(
            old_ring, new_ring,
            "the live ring is never written in place"
        );
        let ring_at = t
            .log
            .iter()
            .position(|w| *w == Write::Ring(new_ring))
            .unwrap();
        let switch_at = t
            .log
            .iter()
            .position(|w| *w == Write::SetService(key(&s)))
            .unwrap();
        let backend_at = t
            .log
            .iter()
            .position(|w| matches!(w, Write::SetBackend(_)))
            .unwrap();
        assert!(backend_at < ring_at && ring_at < switch_at, "{:?}", t.log);
        assert!(ring_addrs(&t, &s).contains(&Addr::from("10.1.2.3".parse::<IpAddr>().unwrap())));
    }

    /// A packet that read a service entry just before its switch may still read the old ring:
    /// no other service's new ring goes there in the same apply.
    #[test]
    fn a_ring_let_go_is_not_reused_in_the_same_apply() {
        let mut t = MemoryTables::default();
        let mut r = Reconciler::new(sizes());
        let mut a = web();
        let mut b = service("10.96.0.20", 80, Mode::Snat, vec![backend("10.1.2.9", 1)]);
        r.apply(&desired(vec![a.clone(), b.clone()]), &node(), &mut t)
            .unwrap();
        let old: Vec<u32> = [&a, &b].iter().map(|s| t.services[&key(s)].ring).collect();
        a.backends.push(backend("10.1.2.3", 1));
        b.backends.push(backend("10.1.2.4", 1));
        let report = r
            .apply(&desired(vec![a.clone(), b.clone()]), &node(), &mut t)
            .unwrap();
        assert_eq!(report.rings_written, 2);
        for s in [&a, &b] {
            let ring = t.services[&key(s)].ring;
            assert!(!old.contains(&ring), "{ring} was let go in this apply");
        }
        // The next apply may use them again: the space is back to two rings' worth.
        let free = r.ring_space.free_slots();
        assert_eq!(
            free,
            u64::from(sizes().ring_slots()) - 2 * 256,
            "the old rings are free again"
        );
    }

    /// LB_RINGS recreated at another size under pinned services (an upgrade): the restarted
    /// agent writes their rings from the pinned backends before anything else, the same rings
    /// the first apply then keeps.
    #[test]
    fn rings_lost_with_a_recreated_map_are_restored_from_the_pinned_backends() {
        let mut t = MemoryTables::default();
        let mut r = Reconciler::new(sizes());
        let s = web();
        r.apply(&desired(vec![s.clone()]), &node(), &mut t).unwrap();
        let ring = t.ring_of(&key(&s)).unwrap().to_vec();
        let mut snap = t.snapshot().unwrap();
        snap.rings_lost = true;
        t.rings.clear();
        let mut resumed = Reconciler::resume(sizes(), &snap);
        assert_eq!(resumed.restore_rings(&mut t).unwrap(), 1);
        assert_eq!(t.ring_of(&key(&s)).unwrap(), ring.as_slice());
        t.take_log();
        let report = resumed
            .apply(&desired(vec![s.clone()]), &node(), &mut t)
            .unwrap();
        assert_eq!(report.rings_written, 0, "{:?}", t.log);
    }

    #[test]
    fn rings_are_sized_from_their_backends_and_a_resize_switches_to_a_whole_new_ring() {
        let mut t = MemoryTables::default();
        let sizes = Sizes {
            max_services: 8,
            max_backends: 64,
            ..Sizes::default()
        };
        let mut r = Reconciler::new(sizes);
        let mut s = web();
        let backends = |n: u8| -> Vec<crate::model::Backend> {
            (1..=n)
                .map(|i| backend(&format!("10.1.3.{i}"), 1))
                .collect()
        };
        s.backends = backends(3);
        r.apply(&desired(vec![s.clone()]), &node(), &mut t).unwrap();
        let small = t.services[&key(&s)];
        assert_eq!(
            small.ring_size, 509,
            "3 backends: the smallest listed prime >= 300"
        );
        t.take_log();
        // 3 -> 30 backends: a ring of 4093 slots, written in full before the switch.
        s.backends = backends(30);
        r.apply(&desired(vec![s.clone()]), &node(), &mut t).unwrap();
        let big = t.services[&key(&s)];
        assert_eq!(big.ring_size, 4093);
        let ring_at = t.log.iter().position(|w| *w == Write::Ring(big.ring));
        let switch_at = t.log.iter().position(|w| *w == Write::SetService(key(&s)));
        assert!(ring_at.unwrap() < switch_at.unwrap(), "{:?}", t.log);
        assert_eq!(t.ring_of(&key(&s)).unwrap().len(), 4093);
        let (_, ids) = r.ids(&key(&s)).unwrap();
        let mut per_backend = BTreeMap::new();
        for id in t.ring_of(&key(&s)).unwrap() {
            *per_backend.entry(*id).or_insert(0u32) += 1;
        }
        assert_eq!(per_backend.len(), 30);
        assert!(ids.iter().all(|b| per_backend.contains_key(&b.id)));
        // The old ring's room is free again once the apply ends; back down gives it all back.
        s.backends = backends(3);
        r.apply(&desired(vec![s.clone()]), &node(), &mut t).unwrap();
        r.apply(&desired(vec![]), &node(), &mut t).unwrap();
        assert_eq!(r.ring_space, RingSpace::new(sizes.ring_slots()));
    }

    #[test]
    fn a_ring_that_finds_no_room_waits_and_an_applied_service_keeps_its_ring() {
        // Ring space of 2 x 256 + 8 x 192 = 2048 slots.
        let sizes = Sizes {
            max_services: 2,
            max_backends: 8,
            ..Sizes::default()
        };
        assert_eq!(sizes.ring_slots(), 2048);
        let mut rec = Reconciler::new(sizes);
        let mut tables = MemoryTables::default();
        let from_cluster = |net: &str, n: u8, weight: u32| {
            let vip = format!("10.96.0.{}", net.len());
            let mut s = service(
                &vip,
                80,
                Mode::Snat,
                (1..=n)
                    .map(|i| backend(&format!("{net}{i}"), weight))
                    .collect(),
            );
            s.origin = Origin::Kubernetes {
                namespace: "default".into(),
                name: vip,
            };
            s
        };
        let mut apply = |rec: &mut Reconciler, services: Vec<Service>| {
            rec.apply_admitting(&desired(services), &node(), &mut tables)
                .unwrap()
        };
        // Six backends: a ring of 1021 in a 1024 block; one: 251 in 256.
        let a6 = from_cluster("10.1.1.", 6, 1);
        let b = from_cluster("10.11.2.", 1, 1);
        let applied = apply(&mut rec, vec![a6.clone(), b.clone()]);
        assert!(applied.left_out.is_empty(), "{:?}", applied.left_out);
        let a_ring = rec.services[&key(&a6)].value;
        assert_eq!(a_ring.ring_size, 1021);
        // `a` takes a seventh backend: its new ring needs a second 1024 block while the first
        // is held, and 768 slots are free: it waits with the ring and backends it has, while
        // `b`'s change (a new weight, a new 256 ring) goes through.
        let a7 = from_cluster("10.1.1.", 7, 1);
        let b2 = from_cluster("10.11.2.", 1, 2);
        let applied = apply(&mut rec, vec![a7.clone(), b2.clone()]);
        assert!(applied.waiting);
        assert_eq!(applied.left_out.len(), 1, "{:?}", applied.left_out);
        assert_eq!(applied.left_out[0].frontend, a7.frontend);
        assert!(
            applied.left_out[0].reason.contains("a ring of 1021 slots"),
            "{}",
            applied.left_out[0].reason
        );
        assert_eq!(rec.services[&key(&a6)].value, a_ring, "a keeps its ring");
        assert_eq!(rec.ids(&key(&a6)).unwrap().1.len(), 6);
        assert_eq!(rec.ids(&key(&b2)).unwrap().1[0].weight, 2, "b changed");
        // `b` goes: its ring is let go in that apply, and `a`'s new ring fits the next one.
        let applied = apply(&mut rec, vec![a7.clone()]);
        assert!(applied.waiting);
        let applied = apply(&mut rec, vec![a7.clone()]);
        assert!(!applied.waiting, "{:?}", applied.left_out);
        assert_eq!(rec.ids(&key(&a7)).unwrap().1.len(), 7);
    }

    #[test]
    fn removed_and_drained_backends_leave_the_ring_but_keep_their_entry_marked() {
        let mut t = MemoryTables::default();
        let mut r = Reconciler::new(sizes());
        let mut s = web();
        s.backends.push(backend("10.1.2.3", 1));
        r.apply(&desired(vec![s.clone()]), &node(), &mut t).unwrap();
        let id_of = |t: &MemoryTables, a: &str| {
            let a = Addr::from(a.parse::<IpAddr>().unwrap());
            *t.backends.iter().find(|(_, b)| b.addr == a).unwrap().0
        };
        let drained = id_of(&t, "10.1.2.2");
        let removed = id_of(&t, "10.1.2.3");
        s.backends[1].weight = 0;
        s.backends.pop();
        r.apply(&desired(vec![s.clone()]), &node(), &mut t).unwrap();
        let ring = t.ring_of(&key(&s)).unwrap();
        assert!(!ring.contains(&drained) && !ring.contains(&removed));
        assert_eq!(
            t.backends[&drained].flags, BACKEND_LISTED,
            "drained: listed, not active"
        );
        assert_eq!(t.backends[&removed].flags, 0, "removed: not listed");
        assert_eq!(t.services[&key(&s)].active_backends, 1);
        // Every slot goes to the one backend left.
        let only = id_of(&t, "10.1.1.2");
        assert!(ring.iter().all(|id| *id == only));
    }

    #[test]
    fn a_rejected_state_writes_nothing_and_keeps_the_previous_one() {
        let mut t = MemoryTables::default();
        let mut r = Reconciler::new(sizes());
        r.apply(&desired(vec![web()]), &node(), &mut t).unwrap();
        let before = t.clone();
        t.take_log();
        // Preserve-client-ip with a backend on another node: refused.
        let bad = service(
            "10.96.0.12",
            80,
            Mode::PreserveClientIp,
            vec![backend("10.1.2.2", 1)],
        );
        let e = r
            .apply(&desired(vec![web(), bad]), &node(), &mut t)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("10.1.2.2:8080 is not reachable through a backend interface"),
            "{e}"
        );
        assert!(t.log.is_empty());
        assert_eq!(t.services, before.services);
        // And the reconciler still knows the good state: re-applying it writes nothing.
        assert!(
            r.apply(&desired(vec![web()]), &node(), &mut t)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn snat_without_a_node_address_for_the_family_is_refused() {
        let mut r = Reconciler::new(sizes());
        let v6 = service(
            "fd00:96::1",
            80,
            Mode::Snat,
            vec![Backend {
                addr: "fd00:1::2".parse().unwrap(),
                port: 80,
                weight: 1,
            }],
        );
        let e = r
            .apply(&desired(vec![v6]), &node(), &mut MemoryTables::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("snat needs an IPv6 source address"), "{e}");
    }

    #[test]
    fn what_does_not_fit_is_left_out_and_the_rest_keeps_updating() {
        let mut rec = Reconciler::new(Sizes {
            max_services: 2,
            max_backends: 4,
            ..sizes()
        });
        let mut tables = MemoryTables::default();
        let from_cluster = |vip: &str, backends: &[&str]| {
            let mut s = service(
                vip,
                80,
                Mode::Snat,
                backends.iter().map(|b| backend(b, 1)).collect(),
            );
            s.origin = Origin::Kubernetes {
                namespace: "default".into(),
                name: vip.into(),
            };
            s
        };
        let a = from_cluster("10.96.0.1", &["10.1.2.1"]);
        let b = from_cluster("10.96.0.2", &["10.1.2.2"]);
        let c = from_cluster("10.96.0.3", &["10.1.2.3"]);
        let mut apply = |rec: &mut Reconciler, services: Vec<Service>| {
            rec.apply_admitting(&desired(services), &node(), &mut tables)
                .unwrap()
        };
        // Three services, room for two: the first two in order are served.
        let applied = apply(&mut rec, vec![a.clone(), b.clone(), c.clone()]);
        assert_eq!(applied.desired.services.len(), 2);
        assert!(applied.waiting);
        assert_eq!(applied.left_out.len(), 1);
        assert_eq!(applied.left_out[0].frontend, c.frontend);
        assert!(
            applied.left_out[0].reason.contains("--max-services"),
            "{}",
            applied.left_out[0].reason
        );
        // A served service still takes changes: two backend ids are free, so `a` gets two of
        // its three new backends and says the third waits.
        let a4 = from_cluster(
            "10.96.0.1",
            &["10.1.2.1", "10.1.3.1", "10.1.3.2", "10.1.3.3"],
        );
        let applied = apply(&mut rec, vec![a4.clone(), b.clone(), c.clone()]);
        assert_eq!(rec.ids(&key(&a)).unwrap().1.len(), 3);
        assert!(
            applied
                .left_out
                .iter()
                .any(|i| i.frontend == a.frontend && i.reason.contains("1 of its new backends")),
            "{:?}",
            applied.left_out
        );
        // `b` goes: its ids make room in the same apply, for `a`'s last backend first.
        let applied = apply(&mut rec, vec![a4.clone(), c.clone()]);
        assert!(rec.ids(&key(&b)).is_none());
        assert_eq!(rec.ids(&key(&a)).unwrap().1.len(), 4);
        assert!(rec.ids(&key(&c)).is_none(), "no backend id left for c");
        assert_eq!(applied.left_out.len(), 1);
        // `a` shrinks: the ids it frees serve `c` on the next apply of the same state.
        let applied = apply(&mut rec, vec![a.clone(), c.clone()]);
        assert!(applied.waiting);
        let applied = apply(&mut rec, vec![a.clone(), c.clone()]);
        assert!(rec.ids(&key(&c)).is_some(), "{:?}", applied.left_out);
        assert!(!applied.waiting && applied.left_out.is_empty());
    }

    #[test]
    fn a_config_file_that_does_not_fit_is_rejected_whole() {
        let mut rec = Reconciler::new(Sizes {
            max_services: 1,
            ..sizes()
        });
        let e = rec
            .apply_admitting(
                &desired(vec![web(), service("10.96.0.20", 80, Mode::Snat, vec![])]),
                &node(),
                &mut MemoryTables::default(),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max-services"), "{e}");
    }

    #[test]
    fn capacity_is_checked_before_writing() {
        let mut r = Reconciler::new(Sizes {
            max_services: 1,
            ..sizes()
        });
        let mut t = MemoryTables::default();
        let e = r
            .apply(
                &desired(vec![web(), service("10.96.0.20", 80, Mode::Snat, vec![])]),
                &node(),
                &mut t,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("too many services") && e.contains("--max-services"),
            "{e}"
        );
        assert!(t.log.is_empty());
    }

    #[test]
    fn addresses_and_filter_follow_the_services() {
        let mut t = MemoryTables::default();
        let mut r = Reconciler::new(sizes());
        let preserve = service(
            "10.96.0.11",
            53,
            Mode::PreserveClientIp,
            vec![backend("10.1.1.3", 1)],
        );
        // A service on the node's own address (NodePort-like).
        let nodeport = service("10.0.0.1", 30080, Mode::Snat, vec![backend("10.1.1.2", 1)]);
        r.apply(
            &desired(vec![web(), preserve.clone(), nodeport]),
            &node(),
            &mut t,
        )
        .unwrap();
        let vip = Addr::from("10.96.0.10".parse::<IpAddr>().unwrap());
        let node_addr = Addr::from("10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(t.addrs[&vip].flags, ADDR_VIP);
        assert_eq!(
            t.addrs[&node_addr].flags, ADDR_NODE,
            "a node address is never a VIP"
        );
        let bit = |plane: usize, a: &Addr| {
            let b = filter_bit(a) as usize;
            t.filter[plane * FILTER_WORDS as usize + b / 64] & (1 << (b % 64)) != 0
        };
        assert!(bit(0, &vip) && bit(0, &node_addr));
        assert!(
            bit(1, &Addr::from("10.1.1.3".parse::<IpAddr>().unwrap())),
            "preserve backends"
        );
        // Removing the services removes the VIPs and their filter bits; the node address stays.
        r.apply(&desired(vec![]), &node(), &mut t).unwrap();
        assert!(t.services.is_empty());
        assert!(!t.addrs.contains_key(&vip));
        assert!(t.addrs.contains_key(&node_addr));
        assert!(t.filter[FILTER_WORDS as usize..].iter().all(|w| *w == 0));
    }

    /// externalTrafficPolicy Cluster -> Local -> Cluster as the translation gives it: the mode
    /// changes, remote backends drain at weight 0. Every step applies, in place (the service
    /// keeps its id, so its flows keep their entries), and the local backend stays where
    /// lb_backend looks for the replies of flows opened in preserve-client-ip mode.
    #[test]
    fn a_traffic_policy_switch_applies_in_place_with_remote_backends_draining() {
        let mut t = MemoryTables::default();
        let mut r = Reconciler::new(sizes());
        let local = Addr::from("10.1.1.2".parse::<IpAddr>().unwrap());
        let bit = |t: &MemoryTables, a: &Addr| {
            let b = filter_bit(a) as usize;
            t.filter[FILTER_WORDS as usize + b / 64] & (1 << (b % 64)) != 0
        };
        r.apply(&desired(vec![web()]), &node(), &mut t).unwrap();
        let key = web().frontend.key();
        let id = t.services[&key].id;
        assert!(bit(&t, &local), "a local backend, in case the mode changes");
        // Local: preserve-client-ip, the remote backend draining (weight 0).
        let local_only = service(
            "10.96.0.10",
            80,
            Mode::PreserveClientIp,
            vec![backend("10.1.1.2", 1), backend("10.1.2.2", 0)],
        );
        r.apply(&desired(vec![local_only]), &node(), &mut t)
            .expect("a draining remote backend does not count against preserve-client-ip");
        assert_eq!(t.services[&key].id, id, "changed in place");
        assert_eq!(t.services[&key].flags & SVC_SNAT, 0);
        let listed: Vec<u32> = t
            .backends
            .values()
            .filter(|b| b.service == id && b.flags & BACKEND_LISTED != 0)
            .map(|b| b.weight)
            .collect();
        assert_eq!(
            listed.len(),
            2,
            "the draining backend stays listed: {listed:?}"
        );
        let ring: BTreeSet<u32> = t.ring_of(&key).unwrap().iter().copied().collect();
        assert_eq!(ring.len(), 1, "new flows to the local backend only");
        // A remote backend that would take new flows is still refused.
        let bad = service(
            "10.96.0.10",
            80,
            Mode::PreserveClientIp,
            vec![backend("10.1.1.2", 1), backend("10.1.2.2", 1)],
        );
        assert!(r.apply(&desired(vec![bad]), &node(), &mut t).is_err());
        // Back to Cluster: snat, both take new flows; the local backend stays in the plane.
        r.apply(&desired(vec![web()]), &node(), &mut t).unwrap();
        assert_eq!(t.services[&key].id, id);
        assert_ne!(t.services[&key].flags & SVC_SNAT, 0);
        assert!(bit(&t, &local));
        assert!(
            !bit(&t, &Addr::from("10.1.2.2".parse::<IpAddr>().unwrap())),
            "a remote backend of a snat service is not looked for at lb_backend"
        );
    }

    #[test]
    #[expect(
        clippy::many_single_char_names,
        reason = "t, r, p, s, d: the tables, reconciler, policy, service and state of every test here"
    )]
    fn policies_get_ids_prefixes_and_an_overflow_bucket() {
        let mut t = MemoryTables::default();
        let mut r = Reconciler::new(sizes());
        let policy = Policy {
            limits: Limits {
                packets: Some(Rate {
                    per_second: 100,
                    burst: 10,
                }),
                connections: None,
            },
            ipv6_prefix: 64,
            table_full: TableFull::FailClosed,
            reset_rejected_syn: true,
            exempt: vec!["10.9.0.0/16".parse().unwrap()],
            deny: vec!["192.0.2.0/24".parse().unwrap()],
            overrides: vec![(
                vec!["198.51.100.0/24".parse().unwrap()],
                Limits {
                    packets: Some(Rate {
                        per_second: 5,
                        burst: 5,
                    }),
                    connections: None,
                },
            )],
        };
        let mut s = web();
        s.policy = Some("p".into());
        s.affinity = Some(Duration::from_secs(600));
        let mut d = desired(vec![s.clone()]);
        d.policies.insert("p".into(), policy);
        r.apply(&d, &node(), &mut t).unwrap();
        let svc = t.services[&key(&s)];
        assert_ne!(svc.policy, 0);
        assert_eq!(svc.flags, SVC_SNAT | SVC_AFFINITY);
        assert_eq!(svc.affinity_timeout_s, 600);
        let p = t.policies[&svc.policy];
        assert_eq!(p.packets.rate, 100);
        assert_eq!(p.flags, POLICY_RST_SYN | POLICY_HAS_PREFIXES);
        assert_eq!(t.policies.len(), 2, "the policy and its override");
        // 100/s with a burst of 10 holds two 16 ms coarse-clock steps (3.2 tokens): coarse.
        // An override fast enough to need the precise clock makes the whole policy precise.
        let mut fast = d.clone();
        fast.policies.get_mut("p").unwrap().overrides[0].1.packets = Some(Rate {
            per_second: 10_000_000,
            burst: 1000,
        });
        r.apply(&fast, &node(), &mut t).unwrap();
        let svc = t.services[&key(&s)];
        assert_ne!(t.policies[&svc.policy].flags & POLICY_PRECISE_CLOCK, 0);
        r.apply(&d, &node(), &mut t).unwrap();
        let svc = t.services[&key(&s)];
        assert_eq!(
            t.policies[&svc.policy].flags & POLICY_PRECISE_CLOCK,
            0,
            "back to the coarse clock"
        );
        let rules: Vec<u32> = t.prefixes.values().map(|r| r.action).collect();
        assert_eq!(rules.len(), 3);
        assert!(
            rules.contains(&PREFIX_EXEMPT)
                && rules.contains(&PREFIX_DENY)
                && rules.contains(&PREFIX_LIMIT)
        );
        // IPv4 /16 -> 32 policy bits + 96 mapped prefix bits + 16.
        assert!(t.prefixes.keys().any(|(_, len)| *len == 32 + 96 + 16));
        assert_eq!(
            t.overflow.len(),
            2,
            "an overflow bucket per fail-closed policy slot"
        );
        // Dropping the policy removes all of it.
        let mut d2 = desired(vec![web()]);
        d2.policies.clear();
        r.apply(&d2, &node(), &mut t).unwrap();
        assert!(t.prefixes.is_empty());
        assert!(r.policy_ids.is_empty(), "every policy id is given back");
        assert_eq!(t.services[&key(&s)].policy, 0);
    }

    fn ranged(vip: &str, port: u16, cidrs: &[&str], deny: bool) -> Service {
        let mut s = service(vip, port, Mode::Snat, vec![backend("10.1.1.2", 1)]);
        s.source_ranges = crate::model::SourceRanges {
            cidrs: crate::model::SourceRanges::parse(cidrs).unwrap(),
            deny,
        };
        s
    }

    /// The prefixes (as "addr/len in 128 bits") the maps hold under `id`.
    fn range_entries(t: &MemoryTables, id: u32) -> Vec<String> {
        t.prefixes
            .keys()
            .filter(|(k, _)| u32::from_be_bytes(k.policy) == id)
            .map(|(k, len)| format!("{}/{}", IpAddr::from(k.addr), len - 32))
            .collect()
    }

    fn position(t: &MemoryTables, f: impl Fn(&Write) -> bool) -> usize {
        t.log.iter().position(f).unwrap()
    }

    #[test]
    fn source_ranges_are_written_before_the_service_points_to_them_and_removed_after() {
        let mut t = MemoryTables::default();
        let mut r = Reconciler::new(sizes());
        let s = ranged("10.96.0.10", 80, &["192.0.2.0/24", "2001:db8::/32"], false);
        r.apply(&desired(vec![s.clone()]), &node(), &mut t).unwrap();
        let first = t.services[&key(&s)];
        assert!(first.source_ranges >= RANGES_FIRST_ID);
        assert_eq!(first.flags & SVC_RANGES_DENY, 0);
        // IPv4 mapped: 96 + 24 bits.
        let want = vec!["192.0.2.0/120".to_string(), "2001:db8::/32".to_string()];
        let mut got = range_entries(&t, first.source_ranges);
        got.sort();
        assert_eq!(got, want);
        let set_service = position(&t, |w| *w == Write::SetService(key(&s)));
        assert!(
            t.log[..set_service]
                .iter()
                .filter(|w| matches!(w, Write::SetPrefix(..)))
                .count()
                == 2,
            "{:?}",
            t.log
        );
        // Another list: a new set, written in full before the switch; the old one after.
        t.take_log();
        let changed = ranged("10.96.0.10", 80, &["192.0.2.0/25"], false);
        r.apply(&desired(vec![changed.clone()]), &node(), &mut t)
            .unwrap();
        let second = t.services[&key(&s)];
        assert_ne!(
            second.source_ranges, first.source_ranges,
            "never rewritten in place"
        );
        let new_at = position(
            &t,
            |w| matches!(w, Write::SetPrefix(k, _) if u32::from_be_bytes(k.policy) == second.source_ranges),
        );
        let switch_at = position(&t, |w| *w == Write::SetService(key(&s)));
        let old_at = position(&t, |w| matches!(w, Write::RemovePrefix(..)));
        assert!(new_at < switch_at && switch_at < old_at, "{:?}", t.log);
        assert!(range_entries(&t, first.source_ranges).is_empty());
        // The same list as a deny list: the same set, only the flag changes.
        t.take_log();
        let deny = ranged("10.96.0.10", 80, &["192.0.2.0/25"], true);
        r.apply(&desired(vec![deny.clone()]), &node(), &mut t)
            .unwrap();
        assert_eq!(t.log, vec![Write::SetService(key(&s))]);
        let third = t.services[&key(&s)];
        assert_eq!(third.source_ranges, second.source_ranges);
        assert_ne!(third.flags & SVC_RANGES_DENY, 0);
        // No list: the service lets every source in first, then the set goes.
        t.take_log();
        r.apply(&desired(vec![web()]), &node(), &mut t).unwrap();
        let open = t.services[&key(&s)];
        assert_eq!((open.source_ranges, open.flags & SVC_RANGES_DENY), (0, 0));
        let switch_at = position(&t, |w| *w == Write::SetService(key(&s)));
        let removed_at = position(&t, |w| matches!(w, Write::RemovePrefix(..)));
        assert!(switch_at < removed_at, "{:?}", t.log);
        assert!(t.prefixes.is_empty());
    }

    #[test]
    #[expect(
        clippy::many_single_char_names,
        reason = "t, r, d: as in every test here; a, b, c: the three services"
    )]
    fn services_with_the_same_ranges_share_a_set_which_goes_with_the_last_of_them() {
        let mut t = MemoryTables::default();
        let mut r = Reconciler::new(sizes());
        let a = ranged("10.96.0.10", 80, &["192.0.2.0/24", "::/0"], false);
        let b = ranged("10.96.0.11", 80, &["::/0", "192.0.2.0/24"], true);
        let c = ranged("10.96.0.12", 80, &["198.51.100.0/24"], false);
        // A policy with prefixes of its own: in the same trie, under its own id.
        let mut d = desired(vec![a.clone(), b.clone(), c.clone()]);
        d.policies.insert(
            "p".into(),
            Policy {
                limits: Limits {
                    packets: None,
                    connections: None,
                },
                ipv6_prefix: 64,
                table_full: TableFull::FailOpen,
                reset_rejected_syn: false,
                exempt: vec!["192.0.2.0/24".parse().unwrap()],
                deny: Vec::new(),
                overrides: Vec::new(),
            },
        );
        r.apply(&d, &node(), &mut t).unwrap();
        let (sa, sb, sc) = (
            t.services[&key(&a)],
            t.services[&key(&b)],
            t.services[&key(&c)],
        );
        assert_eq!(sa.source_ranges, sb.source_ranges, "one set for one list");
        assert_ne!(sa.source_ranges, sc.source_ranges);
        assert_eq!(sa.flags & SVC_RANGES_DENY, 0);
        assert_ne!(sb.flags & SVC_RANGES_DENY, 0);
        // 192.0.2.0/24 and ::/0 less the IPv4-mapped range (96 pieces).
        assert_eq!(range_entries(&t, sa.source_ranges).len(), 97);
        let policy_prefixes = |t: &MemoryTables| {
            t.prefixes
                .keys()
                .filter(|(k, _)| u32::from_be_bytes(k.policy) < RANGES_FIRST_ID)
                .count()
        };
        assert_eq!(policy_prefixes(&t), 1);
        // A restarted agent finds the sets and writes nothing.
        t.take_log();
        let mut resumed = Reconciler::resume(sizes(), &t.snapshot().unwrap());
        assert!(
            resumed.apply(&d, &node(), &mut t).unwrap().is_empty(),
            "{:?}",
            t.log
        );
        // One of the two sharing services goes: the set stays for the other.
        d.services.remove(&a.frontend);
        resumed.apply(&d, &node(), &mut t).unwrap();
        assert_eq!(range_entries(&t, sb.source_ranges).len(), 97);
        // Then the other: its set goes, and its id is free again; the policy's prefix stays.
        d.services.remove(&b.frontend);
        d.services.remove(&c.frontend);
        resumed.apply(&d, &node(), &mut t).unwrap();
        assert_eq!(policy_prefixes(&t), 1);
        assert_eq!(t.prefixes.len(), 1);
        assert!(resumed.range_sets.is_empty());
        assert_eq!(resumed.range_pool.free(), MAX_PREFIXES as usize);
    }
}
