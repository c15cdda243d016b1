//! `lb-agent flow`: which backend a flow goes to, and why, read from the running agent's maps by
//! the data path's own rules: a live flow-table entry pins it; else the client's session
//! affinity ([`lb_common::affinity::sticks`]); else the Maglev ring slot its hash picks.
//!
//! Before the backend choice, the checks the data path makes of a new flow's client, in its
//! order (`new_flow` in lb-ebpf): whether the source may be a client at all (`is_client`), the
//! service's source ranges (`sources::allowed`) and its rate-limit policy's prefix overrides
//! (`ratelimit::check`: a deny prefix drops, an exempt one is never limited; the longest prefix
//! decides). Verdicts come from the data path's maps (LB_ADDRS, LB_SERVICES, LB_POLICIES and the
//! LPM trie LB_PREFIXES, looked up as the data path looks them up); the state file only names
//! the rule as it was written (the CIDR, the field).
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use anyhow::Result;
use aya::maps::lpm_trie::Key;
use lb_common::{
    ADDR_NODE, ADDR_VIP, Addr, AffinityKey, Config, Counter, DropReason, FLOW_CLOCK_SHIFT,
    FLOW_CLOSING, FLOW_OPENING, FLOW_REPLY, FLOW_SNAT, Flow, FlowAddr, FlowKey4, FlowKey6,
    NO_BACKEND, POLICY_HAS_PREFIXES, PREFIX_DENY, PREFIX_EXEMPT, PREFIX_LIMIT, Policy, PrefixKey,
    PrefixRule, SVC_AFFINITY, SVC_RANGES_DENY, Service, ServiceKey, V4, affinity, flow_clock,
    hash::{flow_hash, ring_slot},
};
use serde::Serialize;

use crate::{
    cli::Paths,
    dataplane::Maps,
    model::{Cidr, Protocol, SourceRanges},
    state::State,
    status::{open_maps, show},
    system::monotonic_ns,
};

/// Where a flow goes and why.
#[derive(Serialize)]
pub struct FlowAnswer {
    pub flow: String,
    /// "flow-table" (an entry pins it), "affinity", "ring", or "no-service"; or, for a flow the
    /// data path drops before it reaches a backend, the check that drops it: "not-a-client",
    /// "source-range" or "denied" (a rate-limit deny prefix); `dropped` says which rule.
    pub reason: &'static str,
    /// None for a dropped flow.
    pub backend: Option<String>,
    pub detail: String,
    /// The rule that drops the flow's packets, if one does.
    pub dropped: Option<Rule>,
    /// The rate-limit prefix override the client falls under, if any and the flow is not dropped:
    /// exempt (never limited; the backend is the same), or limited at an override's own rates.
    pub rate_limit: Option<Rule>,
}

/// A rule of the checks the data path makes of a client: what it does and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// "drop", "exempt" (never rate-limited) or "limit" (a prefix override's own rates).
    pub action: &'static str,
    /// Where a drop is counted: the per-service drop reason (`lb-agent status` "drops",
    /// `xdplb_service_drops_total{reason}`), or node-wide `drop_bad_source` for a source that
    /// cannot be a client. None for an exemption or a limit.
    pub counter: Option<&'static str>,
    /// The field the rule comes from, as the config file or the Kubernetes Service spells it
    /// (`source-ranges`, `spec.loadBalancerSourceRanges`, `[rate-limits.NAME] deny`,
    /// `rate-limit.xdplb.io/exempt`...); for a source that cannot be a client, what it is.
    pub field: String,
    /// The prefix that matched the client, as written; None where none did (a client outside
    /// an allow list) or none applies (a source that cannot be a client).
    pub cidr: Option<String>,
    /// The rate-limit policy's name (its id if the state file has none), for a policy's rule.
    pub policy: Option<String>,
}

impl FlowAnswer {
    fn new(flow: String, reason: &'static str, backend: Option<String>, detail: String) -> Self {
        FlowAnswer {
            flow,
            reason,
            backend,
            detail,
            dropped: None,
            rate_limit: None,
        }
    }
}

/// The answer for people: `FLOW: BACKEND (REASON): DETAIL`, BACKEND "dropped" for a flow the
/// data path drops, "no backend" for one that has none.
pub fn render(a: &FlowAnswer) -> String {
    let backend = match (&a.backend, &a.dropped) {
        (Some(b), _) => b.as_str(),
        (None, Some(_)) => "dropped",
        (None, None) => "no backend",
    };
    format!("{}: {backend} ({}): {}", a.flow, a.reason, a.detail)
}

pub fn flow(
    paths: &Paths,
    protocol: Protocol,
    src: SocketAddr,
    dst: SocketAddr,
) -> Result<FlowAnswer> {
    let maps = open_maps(paths)?;
    let flow = format!("{protocol} {src} -> {dst}");
    let (src_addr, dst_addr) = (Addr::from(src.ip()), Addr::from(dst.ip()));
    let (sport, dport) = (src.port().to_be(), dst.port().to_be());
    let cfg = maps.read_config();
    let lookup = |id: u32, addr: &Addr| prefix_hit(&maps, id, addr);
    if let Some(entry) = entry(&maps, protocol, &src_addr, &dst_addr, sport, dport)
        && entry.flags & FLOW_REPLY == 0
        && cfg.is_none_or(|c| !entry.is_expired(&c, flow_clock(monotonic_ns())))
        && let Ok(b) = maps.backends.get(&entry.id(), 0)
        && b.generation == entry.generation
    {
        // An established flow's packets meet the rate limiter only (with the policy of the
        // backend's service: lb-ebpf's flow::resolve); source ranges are checked at its start.
        let policy = maps.svc_info.get(&b.service, 0).map_or(0, |s| s.policy);
        let hit = policy_hit(
            policy,
            read_policy(&maps, policy).as_ref(),
            &src_addr,
            &lookup,
        );
        let answer = pinned(flow, &entry, &b);
        return Ok(if hit.is_some() {
            let key = maps
                .svc_info
                .get(&b.service, 0)
                .ok()
                .map(|s| ServiceKey::new(s.addr, s.port, s.proto));
            let names = Names::read(paths, key.as_ref());
            checked(answer, Gate::of_policy(hit), &src_addr, &names)
        } else {
            answer
        });
    }
    let Some(cfg) = cfg else {
        anyhow::bail!("the data path has no configuration yet");
    };
    let service_key = ServiceKey::new(dst_addr, dport, protocol.number());
    let Ok(svc) = maps.services.get(&service_key, 0) else {
        return Ok(FlowAnswer::new(
            flow,
            "no-service",
            None,
            format!("no service on {dst}/{protocol}"),
        ));
    };
    let client = Client {
        addr: src_addr,
        v6_packet: !dst_addr.is_v4(),
        node_flags: maps.addrs.get(&src_addr, 0).ok().map(|a| a.flags),
    };
    let gate = gate(
        &client,
        &svc,
        read_policy(&maps, svc.policy).as_ref(),
        &lookup,
    );
    let names = if gate.is_empty() {
        Names::default()
    } else {
        Names::read(paths, Some(&service_key))
    };
    let now = monotonic_ns();
    let hash = flow_hash(
        &src_addr,
        &dst_addr,
        sport,
        dport,
        protocol.number(),
        cfg.hash_seed,
    );
    let answer = if gate.drop.is_some() {
        FlowAnswer::new(flow, "", None, String::new())
    } else if let Some(answer) = by_affinity(&maps, &flow, &src_addr, &svc, now) {
        answer
    } else {
        by_ring(&maps, flow, hash, &svc, &cfg)?
    };
    Ok(checked(answer, gate, &src_addr, &names))
}

/// A policy's map entry (None for no policy, or one the map does not hold).
fn read_policy(maps: &Maps, id: u32) -> Option<Policy> {
    if id == 0 {
        return None;
    }
    maps.policies.get(&id, 0).ok()
}

/// The data path's LPM lookup of `addr` under `id` in LB_PREFIXES (the rule is the kernel's
/// answer); the prefix it matched is found among the id's entries (read only on a hit).
fn prefix_hit(maps: &Maps, id: u32, addr: &Addr) -> Option<Hit> {
    let key = PrefixKey {
        policy: id.to_be_bytes(),
        addr: *addr,
    };
    let rule = maps.prefixes.get(&Key::new(32 + 128, key), 0).ok()?;
    let entries = maps.prefixes.iter().filter_map(|kv| {
        let (k, rule) = kv.ok()?;
        Some((k.data(), k.prefix_len(), rule))
    });
    let prefix = longest_match(entries, id, addr).map(|(prefix, _)| prefix);
    Some(Hit { prefix, rule })
}

/// The client-side flow-table entry of a tuple, of its family's table (addresses widened).
fn entry(
    maps: &Maps,
    protocol: Protocol,
    src: &Addr,
    dst: &Addr,
    sport: u16,
    dport: u16,
) -> Option<Flow<Addr>> {
    if src.is_v4() {
        let key = FlowKey4::new(
            V4::from_addr(src),
            V4::from_addr(dst),
            sport,
            dport,
            protocol.number(),
        );
        let f = maps.flows4.get(&key, 0).ok()?;
        Some(Flow {
            last: f.last,
            flags: f.flags,
            generation: f.generation,
            port: f.port,
            id_way: f.id_way,
            addr: f.addr.to_addr(),
        })
    } else {
        let key = FlowKey6::new(*src, *dst, sport, dport, protocol.number());
        maps.flows6.get(&key, 0).ok()
    }
}

/// A live flow-table entry decides.
fn pinned(flow: String, entry: &Flow<Addr>, backend: &lb_common::Backend) -> FlowAnswer {
    let ticks = flow_clock(monotonic_ns()).wrapping_sub(entry.last);
    let age = (u64::from(ticks) << FLOW_CLOCK_SHIFT) / 1_000_000;
    let state = if entry.flags & FLOW_CLOSING != 0 {
        ", closing"
    } else if entry.flags & FLOW_OPENING != 0 {
        ", handshake not finished"
    } else {
        ""
    };
    let snat = if entry.flags & FLOW_SNAT == 0 {
        String::new()
    } else {
        format!(
            ", source-NATed to {}",
            show(&entry.addr, u16::from_be(entry.port))
        )
    };
    FlowAnswer::new(
        flow,
        "flow-table",
        Some(show(&backend.addr, u16::from_be(backend.port))),
        format!("a live flow-table entry pins it (last packet {age} ms ago{state}{snat})"),
    )
}

/// The client's affinity entry decides, if it sticks.
fn by_affinity(
    maps: &Maps,
    flow: &str,
    client: &Addr,
    svc: &Service,
    now: u64,
) -> Option<FlowAnswer> {
    if svc.flags & SVC_AFFINITY == 0 {
        return None;
    }
    let entry = maps
        .affinity
        .get(
            &AffinityKey {
                client: *client,
                service: svc.id,
            },
            0,
        )
        .ok()?;
    let b = maps.backends.get(&entry.backend, 0).ok()?;
    affinity::sticks(&entry, &b, svc, now).then(|| {
        FlowAnswer::new(
            flow.to_string(),
            "affinity",
            Some(show(&b.addr, u16::from_be(b.port))),
            format!(
                "session affinity: this client was sent there within the last {} s",
                svc.affinity_timeout_s
            ),
        )
    })
}

/// The ring slot the flow hashes to decides.
fn by_ring(
    maps: &Maps,
    flow: String,
    hash: u32,
    svc: &Service,
    cfg: &Config,
) -> Result<FlowAnswer> {
    let slot = ring_slot(hash, svc.ring_size);
    let id = maps.rings.get(&(svc.ring + slot), 0)?;
    if id == NO_BACKEND {
        return Ok(FlowAnswer::new(
            flow,
            "ring",
            None,
            format!(
                "ring slot {slot} of {} is empty: the service has no backend with weight > 0",
                svc.ring_size
            ),
        ));
    }
    let b = maps.backends.get(&id, 0)?;
    Ok(FlowAnswer::new(
        flow,
        "ring",
        Some(show(&b.addr, u16::from_be(b.port))),
        format!(
            "no flow-table entry; a new flow would hash (seed {:#x}) to Maglev slot {slot} of {}, which holds this backend",
            cfg.hash_seed, svc.ring_size
        ),
    ))
}

// ---------------------------------------------------------------------------------------------
// The checks before the backend choice (lb-ebpf's `new_flow`, in its order).
// ---------------------------------------------------------------------------------------------

/// A flow's source as the data path sees it.
struct Client {
    addr: Addr,
    /// The flow is IPv6 (its VIP is).
    v6_packet: bool,
    /// Its LB_ADDRS entry's flags, if it has one (an address of the node, a VIP, a broadcast).
    node_flags: Option<u32>,
}

/// An LB_PREFIXES lookup's hit: the rule, and the prefix (address, length in the 128-bit space)
/// that matched, if found.
struct Hit {
    prefix: Option<Cidr>,
    rule: PrefixRule,
}

/// LB_PREFIXES' LPM lookup of an address under an id (a policy's, or a source-range set's).
type Lookup<'a> = dyn Fn(u32, &Addr) -> Option<Hit> + 'a;

/// A rate-limit policy's prefix override that matches the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PolicyHit {
    policy: u32,
    /// `PREFIX_*`.
    action: u32,
    prefix: Option<Cidr>,
}

/// Why the data path drops a new flow's packets before (or instead of) its backend.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// The source cannot be a client: what it is.
    NotAClient(&'static str),
    /// The service's source ranges refuse it: in a deny list (the prefix), or in no prefix of
    /// an allow list.
    SourceRange { deny: bool, prefix: Option<Cidr> },
    /// A deny prefix of the service's rate-limit policy.
    Policy(PolicyHit),
}

/// What the checks find of a client.
#[derive(Debug, Default, PartialEq, Eq)]
struct Gate {
    drop: Option<Refused>,
    /// An exempt or limit override (never with a drop).
    rate_limit: Option<PolicyHit>,
}

impl Gate {
    fn is_empty(&self) -> bool {
        self.drop.is_none() && self.rate_limit.is_none()
    }

    fn of_policy(hit: Option<PolicyHit>) -> Gate {
        match hit {
            Some(h) if h.action == PREFIX_DENY => Gate {
                drop: Some(Refused::Policy(h)),
                rate_limit: None,
            },
            rate_limit => Gate {
                drop: None,
                rate_limit,
            },
        }
    }
}

/// The data path's checks of a new flow's client to service `svc`, whose policy entry is
/// `policy`: `is_client`, `sources::allowed`, then (a service without a backend drops first,
/// as no_backend) the rate limiter's prefix overrides.
fn gate(client: &Client, svc: &Service, policy: Option<&Policy>, lookup: &Lookup<'_>) -> Gate {
    if let Some(what) = not_a_client(client) {
        return Gate {
            drop: Some(Refused::NotAClient(what)),
            rate_limit: None,
        };
    }
    if svc.source_ranges != 0 {
        let hit = lookup(svc.source_ranges, &client.addr);
        let deny = svc.flags & SVC_RANGES_DENY != 0;
        // Admitted if listed != deny (sources::allowed).
        if hit.is_some() == deny {
            return Gate {
                drop: Some(Refused::SourceRange {
                    deny,
                    prefix: hit.and_then(|h| h.prefix),
                }),
                rate_limit: None,
            };
        }
    }
    if svc.active_backends == 0 {
        return Gate::default();
    }
    Gate::of_policy(policy_hit(svc.policy, policy, &client.addr, lookup))
}

/// lb-ebpf's `is_client`: what the source is if it cannot be a client.
fn not_a_client(c: &Client) -> Option<&'static str> {
    if c.v6_packet && c.addr.is_v4() {
        return Some(
            "IPv4 in an IPv6 flow: an IPv4-mapped source, which no IPv6 packet's client may have",
        );
    }
    if !c.addr.may_be_client() {
        return Some(
            "no unicast host address (unspecified, loopback, link-local, multicast or broadcast)",
        );
    }
    let flags = c.node_flags?;
    Some(if flags & ADDR_VIP != 0 {
        "a VIP of this node"
    } else if flags & ADDR_NODE != 0 {
        "an address of this node (a snat source)"
    } else {
        "an address of this node or a broadcast address of one of its subnets"
    })
}

/// lb-ebpf's `ratelimit::check` before the buckets: the prefix override of policy `id` (entry
/// `policy`) that holds `addr`, if the policy has overrides.
fn policy_hit(
    id: u32,
    policy: Option<&Policy>,
    addr: &Addr,
    lookup: &Lookup<'_>,
) -> Option<PolicyHit> {
    if id == 0 || policy?.flags & POLICY_HAS_PREFIXES == 0 {
        return None;
    }
    let hit = lookup(id, addr)?;
    matches!(hit.rule.action, PREFIX_EXEMPT | PREFIX_DENY | PREFIX_LIMIT).then_some(PolicyHit {
        policy: id,
        action: hit.rule.action,
        prefix: hit.prefix,
    })
}

/// The longest of the LB_PREFIXES `entries` (key, length in bits: 32 of the id, then the
/// address's, rule) under `id` that holds `addr`, as a prefix, with its rule: what the trie's
/// lookup finds.
fn longest_match(
    entries: impl IntoIterator<Item = (PrefixKey, u32, PrefixRule)>,
    id: u32,
    addr: &Addr,
) -> Option<(Cidr, PrefixRule)> {
    let ip = IpAddr::from(*addr);
    entries
        .into_iter()
        .filter(|(k, len, _)| k.policy == id.to_be_bytes() && (32..=160).contains(len))
        .map(|(k, len, rule)| {
            let bits = u8::try_from(len - 32).unwrap_or(128);
            (
                Cidr::from_v6_bits(u128::from_be_bytes(k.addr.0), bits),
                rule,
            )
        })
        .filter(|(prefix, _)| prefix.contains(ip))
        .max_by_key(|(prefix, _)| prefix.as_v6_bits().1)
}

/// What the state file says of a service and the policies, to name rules as they were written.
#[derive(Default)]
struct Names {
    service: Option<String>,
    /// The service is a Kubernetes Service's.
    kubernetes: bool,
    ranges: Option<SourceRanges>,
    /// Policy names by id.
    policies: BTreeMap<u32, String>,
}

impl Names {
    fn read(paths: &Paths, service: Option<&ServiceKey>) -> Names {
        let Some(state) = State::read(&paths.state_dir) else {
            return Names::default();
        };
        let label =
            service.and_then(|k| state.services.into_iter().find(|l| l.frontend.key() == *k));
        Names {
            kubernetes: label
                .as_ref()
                .is_some_and(|l| l.origin.starts_with("Service ")),
            service: label.as_ref().map(|l| l.name.clone()),
            ranges: label.map(|l| l.source_ranges),
            policies: state.policies,
        }
    }

    fn service(&self) -> String {
        self.service
            .as_ref()
            .map_or_else(|| "the service".to_string(), |n| format!("service {n}"))
    }

    fn ranges_field(&self, deny: bool) -> &'static str {
        match (self.kubernetes, deny) {
            (true, false) => "spec.loadBalancerSourceRanges",
            (true, true) => "spec.loadBalancerSourceRanges (xdplb.io/source-ranges-mode: deny)",
            (false, false) => "source-ranges",
            (false, true) => "source-ranges (source-ranges-mode = \"deny\")",
        }
    }

    /// A source-range prefix as written: the range of the service's list it is (a piece of,
    /// for an IPv6 range over the IPv4-mapped one, `::/0`).
    fn range(&self, prefix: Cidr) -> String {
        let piece = prefix.as_v6_bits();
        self.ranges
            .iter()
            .flat_map(|r| &r.cidrs)
            .find(|c| c.own_family_pieces().contains(&piece))
            .map_or_else(|| prefix.to_string(), ToString::to_string)
    }

    /// A policy's name and the field of its `field` (`deny`, `exempt`, `override`).
    fn policy(&self, id: u32, field: &str) -> (String, String) {
        match self.policies.get(&id) {
            Some(n) if n.starts_with("service:") => {
                (n.clone(), format!("rate-limit.xdplb.io/{field}"))
            }
            Some(n) => (n.clone(), format!("[rate-limits.{n}] {field}")),
            None => (format!("#{id}"), field.to_string()),
        }
    }
}

/// `answer` with what the checks found: a dropped flow's reason, rule and detail (no backend);
/// or an exemption or limit override added to the detail.
fn checked(mut answer: FlowAnswer, gate: Gate, client: &Addr, names: &Names) -> FlowAnswer {
    if let Some(drop) = gate.drop {
        let (reason, rule, mut detail) = describe_drop(&drop, client, names);
        if let ("flow-table", Some(b)) = (answer.reason, &answer.backend) {
            detail = format!(
                "{detail} (a live flow-table entry pins the flow to {b}; its packets meet the rate limiter too)"
            );
        }
        answer.reason = reason;
        answer.backend = None;
        answer.detail = detail;
        answer.dropped = Some(rule);
    } else if let Some(hit) = gate.rate_limit {
        let (field, verb) = if hit.action == PREFIX_EXEMPT {
            ("exempt", "not rate-limited: exempt")
        } else {
            ("override", "rate-limited at an override's own rates")
        };
        let (policy, field) = names.policy(hit.policy, field);
        let cidr = hit.prefix.map(|p| p.to_string());
        answer.detail = format!(
            "{}; {verb} by {} of rate-limit policy {policy} ({field})",
            answer.detail,
            cidr.as_deref().unwrap_or("a prefix"),
        );
        answer.rate_limit = Some(Rule {
            action: if hit.action == PREFIX_EXEMPT {
                "exempt"
            } else {
                "limit"
            },
            counter: None,
            field,
            cidr,
            policy: Some(policy),
        });
    }
    answer
}

/// A drop's reason, rule and detail.
fn describe_drop(drop: &Refused, client: &Addr, names: &Names) -> (&'static str, Rule, String) {
    match drop {
        Refused::NotAClient(what) => {
            let counter = Counter::DropBadSource.name();
            let detail = format!(
                "{client} is {what}, never a client (no flow, no answer); counted node-wide as {counter}"
            );
            let rule = Rule {
                action: "drop",
                counter: Some(counter),
                field: (*what).to_string(),
                cidr: None,
                policy: None,
            };
            ("not-a-client", rule, detail)
        }
        Refused::SourceRange { deny, prefix } => {
            let counter = DropReason::SourceRange.name();
            let field = names.ranges_field(*deny);
            let cidr = prefix.map(|p| names.range(p));
            let service = names.service();
            let detail = if *deny {
                format!(
                    "refused before the backend choice: {client} is in {} of {service}'s {field}, a deny list; counted per service as {counter}",
                    cidr.as_deref().unwrap_or("a prefix"),
                )
            } else {
                let list = names.ranges.as_ref().map_or_else(String::new, |r| {
                    let cidrs: Vec<String> = r.cidrs.iter().map(ToString::to_string).collect();
                    format!(" ({})", cidrs.join(", "))
                });
                format!(
                    "refused before the backend choice: {service} admits only the clients in its {field}{list}, and {client} is in none of them; counted per service as {counter}"
                )
            };
            let rule = Rule {
                action: "drop",
                counter: Some(counter),
                field: field.to_string(),
                cidr,
                policy: None,
            };
            ("source-range", rule, detail)
        }
        Refused::Policy(hit) => {
            let counter = DropReason::Denied.name();
            let (policy, field) = names.policy(hit.policy, "deny");
            let cidr = hit.prefix.map(|p| p.to_string());
            let detail = format!(
                "refused by the rate limiter: {client} is in {}, denied by rate-limit policy {policy} ({field}); counted per service as {counter}",
                cidr.as_deref().unwrap_or("a deny prefix"),
            );
            let rule = Rule {
                action: "drop",
                counter: Some(counter),
                field,
                cidr,
                policy: Some(policy),
            };
            ("denied", rule, detail)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use lb_common::ADDR_NO_CLIENT;

    use super::*;
    use crate::model::Cidr;

    /// A source-range set's id (above every policy id, as the agent gives them).
    const RANGES: u32 = lb_common::MAX_POLICIES + 7;
    const POLICY: u32 = 3;

    fn addr(s: &str) -> Addr {
        Addr::from(s.parse::<IpAddr>().unwrap())
    }

    fn client(s: &str) -> Client {
        let addr = addr(s);
        Client {
            addr,
            v6_packet: !addr.is_v4(),
            node_flags: None,
        }
    }

    /// LB_PREFIXES as the agent writes them (reconcile.rs: `range_set`, `prefix_key`).
    #[derive(Default)]
    struct Prefixes(Vec<(PrefixKey, u32, PrefixRule)>);

    impl Prefixes {
        fn ranges(mut self, list: &[&str]) -> Self {
            for c in SourceRanges::parse(list).unwrap() {
                for (bits, len) in c.own_family_pieces() {
                    let key = PrefixKey {
                        policy: RANGES.to_be_bytes(),
                        addr: Addr(bits.to_be_bytes()),
                    };
                    self.0
                        .push((key, 32 + u32::from(len), PrefixRule::default()));
                }
            }
            self
        }

        fn rule(mut self, action: u32, cidr: &str) -> Self {
            let (bits, len) = cidr.parse::<Cidr>().unwrap().as_v6_bits();
            let key = PrefixKey {
                policy: POLICY.to_be_bytes(),
                addr: Addr(bits.to_be_bytes()),
            };
            let rule = PrefixRule {
                action,
                policy: if action == PREFIX_LIMIT {
                    POLICY + 1
                } else {
                    0
                },
            };
            self.0.push((key, 32 + u32::from(len), rule));
            self
        }

        /// The trie's lookup.
        fn lookup(&self, id: u32, a: &Addr) -> Option<Hit> {
            longest_match(self.0.iter().copied(), id, a).map(|(prefix, rule)| Hit {
                prefix: Some(prefix),
                rule,
            })
        }

        fn gate(&self, c: &Client, svc: &Service) -> Gate {
            let policy = Policy {
                flags: POLICY_HAS_PREFIXES,
                ..Policy::default()
            };
            gate(c, svc, Some(&policy), &|id, a| self.lookup(id, a))
        }
    }

    fn service(ranges: bool, deny: bool, policy: u32) -> Service {
        Service {
            source_ranges: if ranges { RANGES } else { 0 },
            flags: if deny { SVC_RANGES_DENY } else { 0 },
            policy,
            active_backends: 2,
            ..Service::default()
        }
    }

    fn names(ranges: &[&str], deny: bool, kubernetes: bool) -> Names {
        Names {
            service: Some("web".into()),
            kubernetes,
            ranges: Some(SourceRanges {
                cidrs: SourceRanges::parse(ranges).unwrap(),
                deny,
            }),
            policies: BTreeMap::from([(POLICY, "default".to_string())]),
        }
    }

    /// What `by_ring` answers for a client that passes.
    fn ring_answer() -> FlowAnswer {
        FlowAnswer::new(
            "tcp 10.99.0.10:40000 -> 10.96.0.10:80".into(),
            "ring",
            Some("10.1.1.2:8080".into()),
            "no flow-table entry; a new flow would hash (seed 0x4d2) to Maglev slot 9 of 251, which holds this backend".into(),
        )
    }

    fn answer(gate: Gate, c: &str, names: &Names) -> FlowAnswer {
        checked(ring_answer(), gate, &addr(c), names)
    }

    #[test]
    fn a_client_outside_an_allow_list_is_dropped_with_the_rule() {
        let p = Prefixes::default().ranges(&["192.0.2.0/24", "2001:db8::/32"]);
        let svc = service(true, false, 0);
        let g = p.gate(&client("10.99.0.10"), &svc);
        assert_eq!(
            g.drop,
            Some(Refused::SourceRange {
                deny: false,
                prefix: None
            })
        );
        let a = answer(
            g,
            "10.99.0.10",
            &names(&["192.0.2.0/24", "2001:db8::/32"], false, false),
        );
        assert_eq!((a.reason, a.backend.as_deref()), ("source-range", None));
        let rule = a.dropped.as_ref().unwrap();
        assert_eq!(
            (
                rule.action,
                rule.counter,
                rule.field.as_str(),
                rule.cidr.as_deref()
            ),
            ("drop", Some("source_range"), "source-ranges", None)
        );
        assert_eq!(
            render(&a),
            "tcp 10.99.0.10:40000 -> 10.96.0.10:80: dropped (source-range): refused before the \
             backend choice: service web admits only the clients in its source-ranges \
             (192.0.2.0/24, 2001:db8::/32), and 10.99.0.10 is in none of them; counted per \
             service as source_range"
        );
        // Inside the list (either family): the backend choice as before.
        for inside in ["192.0.2.7", "2001:db8::7"] {
            assert!(p.gate(&client(inside), &svc).is_empty(), "{inside}");
        }
        // IPv4-mapped: an IPv4 client is never in an IPv6 range, and a v4-mapped address
        // written for an IPv4 flow is its IPv4 address.
        assert!(p.gate(&client("2001:db9::1"), &svc).drop.is_some());
        let mapped = Client {
            addr: addr("::ffff:192.0.2.7"),
            v6_packet: false,
            node_flags: None,
        };
        assert!(p.gate(&mapped, &svc).is_empty());
    }

    #[test]
    fn a_client_in_a_deny_list_is_dropped_with_the_prefix() {
        let p = Prefixes::default().ranges(&["192.0.2.0/24", "192.0.2.128/25"]);
        let svc = service(true, true, 0);
        let g = p.gate(&client("192.0.2.200"), &svc);
        let a = answer(
            g,
            "192.0.2.200",
            &names(&["192.0.2.0/24", "192.0.2.128/25"], true, true),
        );
        assert_eq!((a.reason, a.backend.as_deref()), ("source-range", None));
        let rule = a.dropped.unwrap();
        assert_eq!(
            rule.field,
            "spec.loadBalancerSourceRanges (xdplb.io/source-ranges-mode: deny)"
        );
        assert_eq!(
            rule.cidr.as_deref(),
            Some("192.0.2.128/25"),
            "the longest match"
        );
        assert!(
            a.detail
                .contains("192.0.2.200 is in 192.0.2.128/25 of service web's")
        );
        assert!(
            p.gate(&client("10.99.0.10"), &svc).is_empty(),
            "outside a deny list: admitted"
        );
        // Without the state file: the prefix as the map holds it.
        let g = p.gate(&client("192.0.2.7"), &svc);
        let a = answer(g, "192.0.2.7", &Names::default());
        assert_eq!(a.dropped.unwrap().cidr.as_deref(), Some("192.0.2.0/24"));
        assert!(
            a.detail.contains("of the service's source-ranges"),
            "{}",
            a.detail
        );
    }

    #[test]
    fn ipv6_ranges_over_the_mapped_range_are_named_as_written() {
        // `::/0`: every IPv6 source, no IPv4 one (written as pieces around ::ffff:0:0/96).
        let p = Prefixes::default().ranges(&["::/0"]);
        let deny = service(true, true, 0);
        let g = p.gate(&client("2001:db8::1"), &deny);
        let a = answer(g, "2001:db8::1", &names(&["::/0"], true, false));
        assert_eq!(a.dropped.unwrap().cidr.as_deref(), Some("::/0"));
        assert!(p.gate(&client("10.99.0.10"), &deny).is_empty());
        let allow = service(true, false, 0);
        assert!(p.gate(&client("2001:db8::1"), &allow).is_empty());
        assert!(p.gate(&client("10.99.0.10"), &allow).drop.is_some());
    }

    #[test]
    fn a_policy_deny_prefix_drops_unless_a_longer_exempt_or_limit_prefix_holds_the_client() {
        let p = Prefixes::default()
            .rule(PREFIX_DENY, "192.0.2.0/24")
            .rule(PREFIX_EXEMPT, "192.0.2.0/28")
            .rule(PREFIX_LIMIT, "192.0.2.64/26");
        let svc = service(false, false, POLICY);
        let n = names(&[], false, false);
        let g = p.gate(&client("192.0.2.200"), &svc);
        let a = answer(g, "192.0.2.200", &n);
        assert_eq!((a.reason, a.backend.as_deref()), ("denied", None));
        assert_eq!(
            a.dropped.as_ref().unwrap(),
            &Rule {
                action: "drop",
                counter: Some("denied"),
                field: "[rate-limits.default] deny".into(),
                cidr: Some("192.0.2.0/24".into()),
                policy: Some("default".into()),
            }
        );
        assert!(a.rate_limit.is_none());
        // An exempt prefix inside the deny one wins: the backend, and the exemption.
        let g = p.gate(&client("192.0.2.7"), &svc);
        assert!(g.drop.is_none());
        let a = answer(g, "192.0.2.7", &n);
        assert_eq!(
            (a.reason, a.backend.as_deref()),
            ("ring", Some("10.1.1.2:8080"))
        );
        assert!(a.dropped.is_none());
        let exempt = a.rate_limit.unwrap();
        assert_eq!(
            (exempt.action, exempt.cidr.as_deref(), exempt.field.as_str()),
            (
                "exempt",
                Some("192.0.2.0/28"),
                "[rate-limits.default] exempt"
            )
        );
        // So does a limit override's.
        let g = p.gate(&client("192.0.2.70"), &svc);
        assert_eq!(g.rate_limit.map(|h| h.action), Some(PREFIX_LIMIT));
        // A policy without prefixes (or none) decides nothing here.
        let plain = Policy::default();
        assert!(
            gate(&client("192.0.2.200"), &svc, Some(&plain), &|id, a| p
                .lookup(id, a))
            .is_empty()
        );
        assert!(
            p.gate(&client("192.0.2.200"), &service(false, false, 0))
                .is_empty()
        );
        // A service without a backend drops as no_backend first (the ring answers that).
        let none = Service {
            active_backends: 0,
            ..svc
        };
        assert!(p.gate(&client("192.0.2.200"), &none).is_empty());
        // Source ranges come first.
        let p = p.ranges(&["192.0.2.0/24"]);
        let g = p.gate(&client("192.0.2.200"), &service(true, true, POLICY));
        assert!(matches!(
            g.drop,
            Some(Refused::SourceRange { deny: true, .. })
        ));
    }

    #[test]
    fn an_exempt_client_keeps_its_backend_and_is_told_so() {
        let p = Prefixes::default().rule(PREFIX_EXEMPT, "10.0.0.0/8");
        let svc = service(false, false, POLICY);
        let mut n = names(&[], false, true);
        n.policies.insert(POLICY, "service:default/web".into());
        let a = answer(p.gate(&client("10.99.0.10"), &svc), "10.99.0.10", &n);
        let before = ring_answer();
        assert_eq!((a.reason, &a.backend), (before.reason, &before.backend));
        assert_eq!(
            a.detail,
            format!(
                "{}; not rate-limited: exempt by 10.0.0.0/8 of rate-limit policy \
                 service:default/web (rate-limit.xdplb.io/exempt)",
                before.detail
            )
        );
        assert_eq!(
            a.rate_limit.unwrap().policy.as_deref(),
            Some("service:default/web")
        );
    }

    #[test]
    fn without_ranges_or_prefixes_the_answer_is_unchanged() {
        let p = Prefixes::default();
        let g = p.gate(&client("10.99.0.10"), &service(false, false, 0));
        assert!(g.is_empty());
        let a = answer(g, "10.99.0.10", &Names::default());
        let before = ring_answer();
        assert_eq!(
            (a.reason, &a.backend, &a.detail),
            (before.reason, &before.backend, &before.detail)
        );
        assert_eq!(
            render(&a),
            "tcp 10.99.0.10:40000 -> 10.96.0.10:80: 10.1.1.2:8080 (ring): no flow-table entry; \
             a new flow would hash (seed 0x4d2) to Maglev slot 9 of 251, which holds this backend"
        );
        // JSON: the fields it had, and the new ones, null.
        let json = serde_json::to_value(&a).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "backend",
                "detail",
                "dropped",
                "flow",
                "rate_limit",
                "reason"
            ]
        );
        assert!(json["dropped"].is_null() && json["rate_limit"].is_null());
    }

    #[test]
    fn sources_that_cannot_be_clients_are_dropped() {
        let p = Prefixes::default();
        let svc = service(false, false, 0);
        for (c, what) in [
            ("127.0.0.1", "no unicast host address"),
            ("224.0.0.1", "no unicast host address"),
            ("ff02::1", "no unicast host address"),
        ] {
            let g = p.gate(&client(c), &svc);
            let a = answer(g, c, &Names::default());
            assert_eq!(a.reason, "not-a-client", "{c}");
            assert!(a.dropped.unwrap().field.starts_with(what), "{c}");
        }
        for (flags, what) in [
            (lb_common::ADDR_VIP, "a VIP of this node"),
            (ADDR_NODE, "an address of this node (a snat source)"),
            (
                ADDR_NO_CLIENT,
                "an address of this node or a broadcast address of one of its subnets",
            ),
        ] {
            let c = Client {
                node_flags: Some(flags),
                ..client("10.0.0.1")
            };
            assert_eq!(p.gate(&c, &svc).drop, Some(Refused::NotAClient(what)));
        }
        let mapped = Client {
            addr: addr("::ffff:10.99.0.10"),
            v6_packet: true,
            node_flags: None,
        };
        let a = answer(p.gate(&mapped, &svc), "10.99.0.10", &Names::default());
        assert_eq!(a.dropped.unwrap().counter, Some("drop_bad_source"));
    }

    #[test]
    fn a_dropped_flow_in_json() {
        let p = Prefixes::default().ranges(&["192.0.2.0/24"]);
        let g = p.gate(&client("10.99.0.10"), &service(true, false, 0));
        let a = answer(g, "10.99.0.10", &names(&["192.0.2.0/24"], false, false));
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["backend"], serde_json::Value::Null);
        assert_eq!(json["reason"], "source-range");
        assert_eq!(
            json["dropped"],
            serde_json::json!({
                "action": "drop",
                "counter": "source_range",
                "field": "source-ranges",
                "cidr": null,
                "policy": null,
            })
        );
        println!("{}", serde_json::to_string_pretty(&a).unwrap());
    }
}
