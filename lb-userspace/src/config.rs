//! The standalone config file (TOML) -> [`Desired`]. Every error names the file, the line and
//! the field. Field names are the ones Kubernetes annotations use for the same settings.
//!
//! ```toml
//! [node]
//! hash-seed = 1234                 # equal on every node
//! snat-ipv4 = "10.0.0.1"           # default: the uplink's address
//! snat-ports = "61000-65535"
//! tcp-idle-timeout-seconds = 350
//! rate-limit = "default"           # policy for services without their own
//! reserved-ranges = ["10.244.0.0/16"]  # no service may claim these (besides the node's
//!                                  # addresses, loopback, link-local: always reserved)
//! allow-reserved = ["kube-system/ingress"]  # services allowed them anyway
//! prefer-same-zone = false         # Kubernetes: same zone first for Services that ask nothing
//! policy-hooks = "detect"          # "respect": local pods always through the kernel's forwarding;
//!                                  # "ignore": always redirected in XDP (README, Policy hooks)
//!
//! [rate-limits.default]
//! packets-per-second = 1000
//! packets-burst = 2000
//! connections-per-second = 100
//! connections-burst = 200
//! exempt = ["10.0.0.0/8"]
//!
//! [[services]]
//! name = "web"
//! vip = "10.96.0.10"
//! port = 80
//! protocol = "tcp"
//! mode = "snat"                    # or "preserve-client-ip"
//! source-ranges = ["192.0.2.0/24", "2001:db8::/32"]   # default: every source
//! source-ranges-mode = "allow"      # or "deny": the ranges are refused
//! backends = [
//!   { address = "10.1.1.2", port = 8080, weight = 1 },
//!   { address = "10.1.1.3", port = 8080, weight = 0 },   # drained
//! ]
//! ```
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
use toml::{Spanned, de::DeValue};

use crate::{
    hooks::PolicyHooks,
    maglev::MAX_WEIGHT,
    model::{
        Backend, Cidr, DEFAULT_IPV6_PREFIX, Desired, Frontend, Limits, Mode, NodeSettings, Origin,
        Policy, Protocol, Rate, Service, SourceRanges, TableFull,
    },
    reserved::Reserved,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The reason is in the message, not a source: `{:#}` would print it twice.
    #[error("{}: cannot read: {reason}", file.display())]
    Read {
        file: PathBuf,
        reason: std::io::Error,
    },
    #[error("{}:{line}: {field}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
}

/// Reads and validates a config file.
pub fn load(file: &Path) -> Result<Desired, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|reason| ConfigError::Read {
        file: file.to_path_buf(),
        reason,
    })?;
    parse(file, &text)
}

/// Parses and validates config text; `file` is only used in messages.
pub fn parse(file: &Path, text: &str) -> Result<Desired, ConfigError> {
    let doc = Document { file, text };
    let de = toml::Deserializer::parse(text).map_err(|e| doc.toml_error(&e, String::new()))?;
    let raw: RawFile = serde_path_to_error::deserialize(de).map_err(|e| {
        // `Spanned` shows up in serde's path as a private segment.
        let field = e
            .path()
            .to_string()
            .replace(".$__serde_spanned_private_value", "");
        doc.toml_error(e.inner(), field)
    })?;
    raw.validate(&doc)
}

// ---------------------------------------------------------------------------------------------
// The file as written.
// ---------------------------------------------------------------------------------------------
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawFile {
    #[serde(default)]
    node: RawNode,
    #[serde(default)]
    rate_limits: BTreeMap<String, RawPolicy>,
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNode {
    hash_seed: Option<u32>,
    #[serde(default)]
    snat_ipv4: OneOrMany<Ipv4Addr>,
    #[serde(default)]
    snat_ipv6: OneOrMany<Ipv6Addr>,
    snat_ports: Option<String>,
    tcp_idle_timeout_seconds: Option<u64>,
    udp_idle_timeout_seconds: Option<u64>,
    tcp_closing_timeout_seconds: Option<u64>,
    tcp_handshake_timeout_seconds: Option<u64>,
    tcp_time_wait_seconds: Option<u64>,
    rate_limit: Option<String>,
    #[serde(default)]
    reserved_ranges: Vec<String>,
    #[serde(default)]
    allow_reserved: Vec<String>,
    prefer_same_zone: Option<bool>,
    #[serde(default)]
    policy_hooks: PolicyHooks,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawService {
    name: String,
    vip: IpAddr,
    port: u16,
    protocol: Protocol,
    #[serde(default)]
    mode: Mode,
    rate_limit: Option<String>,
    session_affinity_timeout_seconds: Option<u64>,
    /// Kubernetes' `loadBalancerSourceRanges`: the sources admitted (or refused).
    #[serde(default)]
    source_ranges: Vec<String>,
    #[serde(default)]
    source_ranges_mode: RangesMode,
    #[serde(default)]
    backends: Vec<RawBackend>,
}

/// Whether a service's source ranges are the only sources admitted or the ones refused.
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RangesMode {
    #[default]
    Allow,
    Deny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawBackend {
    address: IpAddr,
    /// Default: the service's port.
    port: Option<u16>,
    /// Default 1.
    weight: Option<u32>,
}

/// A rate-limit policy, in the form Kubernetes annotations carry too.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawPolicy {
    pub packets_per_second: Option<u64>,
    pub packets_burst: Option<u64>,
    pub connections_per_second: Option<u64>,
    pub connections_burst: Option<u64>,
    pub ipv6_prefix: Option<u8>,
    pub table_full: Option<TableFull>,
    pub reject_syn_with_rst: Option<bool>,
    #[serde(default)]
    pub exempt: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    #[serde(default, rename = "override")]
    pub overrides: Vec<RawOverride>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawOverride {
    pub cidrs: Vec<String>,
    pub packets_per_second: Option<u64>,
    pub packets_burst: Option<u64>,
    pub connections_per_second: Option<u64>,
    pub connections_burst: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// Validation: RawFile -> Desired.
// ---------------------------------------------------------------------------------------------
pub const MAX_TIMEOUT_SECONDS: u64 = 86_400;
/// NLB allows 60..6000 s of TCP idle timeout; we accept a wider range.
const MIN_TIMEOUT_SECONDS: u64 = 1;

impl RawFile {
    fn validate(self, doc: &Document<'_>) -> Result<Desired, ConfigError> {
        let mut policies = BTreeMap::new();
        for (name, raw) in &self.rate_limits {
            let path = Path_::new().key("rate-limits").key(name);
            let policy = raw
                .to_policy()
                .map_err(|(field, msg)| doc.error(&path.key_path(&field), msg))?;
            policies.insert(name.clone(), policy);
        }
        let node = self.node.validate(doc, &policies)?;
        // What is reserved whatever the node's addresses (those are checked when applied).
        let reserved = Reserved {
            ranges: node.reserved_ranges.clone(),
            allowed: node.allow_reserved.iter().cloned().collect(),
            ..Reserved::default()
        };

        let mut services: BTreeMap<Frontend, Arc<Service>> = BTreeMap::new();
        for (i, raw) in self.services.iter().enumerate() {
            let path = Path_::new().key("services").index(i);
            let line = doc.line_at(raw.span().start);
            let service = raw.get_ref().validate(doc, &path, line, &policies)?;
            if let Some(why) = reserved.refuse(&service.name, service.frontend.vip) {
                return Err(doc.error(
                    &path.key("vip"),
                    format!("service `{}`: {why}", service.name),
                ));
            }
            if let Some(other) = services.get(&service.frontend) {
                let other: &Service = other;
                return Err(doc.error(
                    &path.key("port"),
                    format!(
                        "{} is already served by `{}` ({})",
                        service.frontend, other.name, other.origin
                    ),
                ));
            }
            services.insert(service.frontend, Arc::new(service));
        }
        Ok(Desired {
            node,
            policies,
            services,
        })
    }
}

impl RawNode {
    fn validate(
        &self,
        doc: &Document<'_>,
        policies: &BTreeMap<String, Policy>,
    ) -> Result<NodeSettings, ConfigError> {
        let path = Path_::new().key("node");
        let d = NodeSettings::default();
        let timeout = |field: &str, v: Option<u64>, default: Duration| match v {
            None => Ok(default),
            Some(s) if (MIN_TIMEOUT_SECONDS..=MAX_TIMEOUT_SECONDS).contains(&s) => {
                Ok(Duration::from_secs(s))
            }
            Some(s) => Err(doc.error(
                &path.key(field),
                format!("{s} is out of range {MIN_TIMEOUT_SECONDS}..={MAX_TIMEOUT_SECONDS}"),
            )),
        };
        let snat_ports = match &self.snat_ports {
            None => None,
            Some(s) => {
                Some(parse_port_ranges(s).map_err(|m| doc.error(&path.key("snat-ports"), m))?)
            }
        };
        if let Some(name) = &self.rate_limit
            && !policies.contains_key(name)
        {
            return Err(doc.error(&path.key("rate-limit"), unknown_policy(name, policies)));
        }
        let mut reserved_ranges = Vec::with_capacity(self.reserved_ranges.len());
        for (i, r) in self.reserved_ranges.iter().enumerate() {
            reserved_ranges.push(
                r.parse::<Cidr>()
                    .map_err(|m| doc.error(&path.key("reserved-ranges").index(i), m))?,
            );
        }
        for (i, who) in self.allow_reserved.iter().enumerate() {
            if who.trim().is_empty() || who.trim() != who {
                return Err(doc.error(
                    &path.key("allow-reserved").index(i),
                    format!("`{who}`: a config-file service's name or a Service's namespace/name"),
                ));
            }
        }
        Ok(NodeSettings {
            hash_seed: self.hash_seed.unwrap_or(d.hash_seed),
            snat_ipv4: snat_addrs(doc, &path.key("snat-ipv4"), &self.snat_ipv4)?,
            snat_ipv6: snat_addrs(doc, &path.key("snat-ipv6"), &self.snat_ipv6)?,
            snat_ports,
            tcp_idle: timeout(
                "tcp-idle-timeout-seconds",
                self.tcp_idle_timeout_seconds,
                d.tcp_idle,
            )?,
            udp_idle: timeout(
                "udp-idle-timeout-seconds",
                self.udp_idle_timeout_seconds,
                d.udp_idle,
            )?,
            tcp_closing: timeout(
                "tcp-closing-timeout-seconds",
                self.tcp_closing_timeout_seconds,
                d.tcp_closing,
            )?,
            tcp_handshake: timeout(
                "tcp-handshake-timeout-seconds",
                self.tcp_handshake_timeout_seconds,
                d.tcp_handshake,
            )?,
            tcp_time_wait: timeout(
                "tcp-time-wait-seconds",
                self.tcp_time_wait_seconds,
                d.tcp_time_wait,
            )?,
            default_policy: self.rate_limit.clone(),
            reserved_ranges,
            allow_reserved: self.allow_reserved.clone(),
            prefer_same_zone: self.prefer_same_zone.unwrap_or(d.prefer_same_zone),
            policy_hooks: self.policy_hooks,
        })
    }
}

impl RawService {
    fn validate(
        &self,
        doc: &Document<'_>,
        path: &Path_,
        line: usize,
        policies: &BTreeMap<String, Policy>,
    ) -> Result<Service, ConfigError> {
        if self.name.trim().is_empty() {
            return Err(doc.error(&path.key("name"), "must not be empty".into()));
        }
        if self.port == 0 {
            return Err(doc.error(&path.key("port"), "must be 1..=65535".into()));
        }
        if let Some(name) = &self.rate_limit
            && !policies.contains_key(name)
        {
            return Err(doc.error(&path.key("rate-limit"), unknown_policy(name, policies)));
        }
        let affinity = match self.session_affinity_timeout_seconds {
            None => None,
            Some(s) if (1..=MAX_TIMEOUT_SECONDS).contains(&s) => Some(Duration::from_secs(s)),
            Some(s) => {
                return Err(doc.error(
                    &path.key("session-affinity-timeout-seconds"),
                    format!("{s} is out of range 1..={MAX_TIMEOUT_SECONDS}"),
                ));
            }
        };
        let cidrs = SourceRanges::parse(&self.source_ranges)
            .map_err(|(i, m)| doc.error(&path.key("source-ranges").index(i), m))?;
        let source_ranges = SourceRanges {
            cidrs,
            deny: self.source_ranges_mode == RangesMode::Deny,
        };
        let mut backends = Vec::with_capacity(self.backends.len());
        let mut seen = BTreeSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let bpath = path.key("backends").index(i);
            if b.address.is_ipv4() != self.vip.is_ipv4() {
                return Err(doc.error(
                    &bpath.key("address"),
                    format!(
                        "{} is not of the VIP's family ({}): the balancer does not translate between IPv4 and IPv6",
                        b.address, self.vip
                    ),
                ));
            }
            let port = b.port.unwrap_or(self.port);
            if port == 0 {
                return Err(doc.error(&bpath.key("port"), "must be 1..=65535".into()));
            }
            let weight = b.weight.unwrap_or(1);
            if weight > MAX_WEIGHT {
                return Err(doc.error(
                    &bpath.key("weight"),
                    format!("{weight} is over the maximum {MAX_WEIGHT}"),
                ));
            }
            if !seen.insert((b.address, port)) {
                return Err(doc.error(
                    &bpath.key("address"),
                    format!("{}:{port} is listed twice", b.address),
                ));
            }
            backends.push(Backend {
                addr: b.address,
                port,
                weight,
            });
        }
        Ok(Service {
            name: self.name.clone(),
            origin: Origin::File {
                path: doc.file.to_path_buf(),
                line,
            },
            frontend: Frontend {
                vip: self.vip,
                port: self.port,
                protocol: self.protocol,
            },
            mode: self.mode,
            backends,
            policy: self.rate_limit.clone(),
            affinity,
            source_ranges,
        })
    }
}

/// A policy field that is wrong: (field name, message).
pub type PolicyError = (String, String);

impl RawPolicy {
    /// Checks and converts; errors name the field relative to the policy.
    pub fn to_policy(&self) -> Result<Policy, PolicyError> {
        let own = limits(
            "",
            self.packets_per_second,
            self.packets_burst,
            self.connections_per_second,
            self.connections_burst,
        )?;
        let ipv6_prefix = self.ipv6_prefix.unwrap_or(DEFAULT_IPV6_PREFIX);
        if !(1..=128).contains(&ipv6_prefix) {
            return Err((
                "ipv6-prefix".into(),
                format!("{ipv6_prefix} is out of range 1..=128"),
            ));
        }
        // Every prefix of the policy, with where it came from, to reject overlaps.
        let mut all: Vec<(Cidr, String)> = Vec::new();
        let mut cidrs = |list: &[String], field: &str| -> Result<Vec<Cidr>, PolicyError> {
            let mut out = Vec::new();
            for (i, s) in list.iter().enumerate() {
                let here = format!("{field}[{i}]");
                let c: Cidr = s.parse().map_err(|m| (here.clone(), m))?;
                if let Some((other, at)) = all.iter().find(|(o, _)| o.overlaps(&c)) {
                    return Err((here, format!("{c} overlaps {other} ({at})")));
                }
                all.push((c, here));
                out.push(c);
            }
            Ok(out)
        };
        let exempt = cidrs(&self.exempt, "exempt")?;
        let deny = cidrs(&self.deny, "deny")?;
        let mut overrides = Vec::new();
        for (i, o) in self.overrides.iter().enumerate() {
            let field = format!("override[{i}]");
            if o.cidrs.is_empty() {
                return Err((
                    format!("{field}.cidrs"),
                    "must list at least one prefix".into(),
                ));
            }
            let list = cidrs(&o.cidrs, &format!("{field}.cidrs"))?;
            let l = limits(
                &format!("{field}."),
                o.packets_per_second,
                o.packets_burst,
                o.connections_per_second,
                o.connections_burst,
            )?;
            overrides.push((list, l));
        }
        Ok(Policy {
            limits: own,
            ipv6_prefix,
            table_full: self.table_full.unwrap_or_default(),
            reset_rejected_syn: self.reject_syn_with_rst.unwrap_or(false),
            exempt,
            deny,
            overrides,
        })
    }
}

fn limits(
    prefix: &str,
    pps: Option<u64>,
    pburst: Option<u64>,
    cps: Option<u64>,
    cburst: Option<u64>,
) -> Result<Limits, PolicyError> {
    let rate =
        |kind: &str, rate: Option<u64>, burst: Option<u64>| -> Result<Option<Rate>, PolicyError> {
            let rate_field = format!("{prefix}{kind}-per-second");
            let burst_field = format!("{prefix}{kind}-burst");
            match (rate, burst) {
                (None, None) => Ok(None),
                (None, Some(_)) => Err((burst_field, format!("set without {rate_field}"))),
                (Some(r), b) => {
                    // One second's worth unless said otherwise.
                    let b = b.unwrap_or(r);
                    lb_common::Limit::new(r, b).map_err(|e| {
                        use lb_common::bucket::LimitError::{BurstTooHigh, RateTooHigh, ZeroBurst};
                        match e {
                            ZeroBurst => (burst_field.clone(), "must be at least 1".to_string()),
                            RateTooHigh => (
                                rate_field.clone(),
                                format!("{r} is over the maximum {}", lb_common::bucket::MAX_RATE),
                            ),
                            BurstTooHigh => (
                                burst_field.clone(),
                                format!("{b} is over the maximum {}", lb_common::bucket::MAX_BURST),
                            ),
                        }
                    })?;
                    if r == 0 {
                        return Err((
                            rate_field,
                            "must be at least 1 (leave it out for no limit)".into(),
                        ));
                    }
                    Ok(Some(Rate {
                        per_second: r,
                        burst: b,
                    }))
                }
            }
        };
    Ok(Limits {
        packets: rate("packets", pps, pburst)?,
        connections: rate("connections", cps, cburst)?,
    })
}

fn unknown_policy(name: &str, policies: &BTreeMap<String, Policy>) -> String {
    let known: Vec<&str> = policies.keys().map(String::as_str).collect();
    if known.is_empty() {
        format!("no rate limit named `{name}` (none is defined under [rate-limits])")
    } else {
        format!(
            "no rate limit named `{name}` (defined: {})",
            known.join(", ")
        )
    }
}

/// A setting that takes one value or a list: `"10.0.0.1"` or `["10.0.0.1", "10.0.0.2"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> Default for OneOrMany<T> {
    fn default() -> Self {
        OneOrMany::Many(Vec::new())
    }
}

/// snat source addresses: at most MAX_SNAT_ADDRS, each once.
fn snat_addrs<T: Copy + Ord + std::fmt::Display>(
    doc: &Document<'_>,
    path: &Path_,
    v: &OneOrMany<T>,
) -> Result<Vec<T>, ConfigError> {
    let addrs = match v {
        OneOrMany::One(a) => vec![*a],
        OneOrMany::Many(v) => v.clone(),
    };
    if addrs.len() > lb_common::MAX_SNAT_ADDRS {
        return Err(doc.error(
            path,
            format!(
                "{} addresses; at most {} per family",
                addrs.len(),
                lb_common::MAX_SNAT_ADDRS
            ),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(a) = addrs.iter().find(|a| !seen.insert(**a)) {
        return Err(doc.error(path, format!("{a} is listed twice")));
    }
    Ok(addrs)
}

/// One or two port ranges: "61000-65535" or "1024-29999,61000-65535".
fn parse_port_ranges(s: &str) -> Result<Vec<(u16, u16)>, String> {
    let bad = || format!("`{s}` is not one or two port ranges like \"1024-29999,61000-65535\"");
    let mut ranges = Vec::new();
    for part in s.split(',') {
        let (lo, hi) = part.split_once('-').ok_or_else(bad)?;
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| match p.trim().parse::<u64>() {
                    Ok(n) => format!("`{part}`: {n} is not a port (at most 65535)"),
                    Err(_) => bad(),
                })
        };
        let (lo, hi) = (port(lo)?, port(hi)?);
        if lo < 1024 || lo > hi {
            return Err(format!("`{part}`: need 1024 <= first <= last"));
        }
        ranges.push((lo, hi));
    }
    if ranges.len() > 2 {
        return Err(bad());
    }
    ranges.sort_unstable();
    if let [a, b] = ranges[..]
        && b.0 <= a.1
    {
        return Err(format!("`{s}`: the ranges overlap"));
    }
    Ok(ranges)
}

// ---------------------------------------------------------------------------------------------
// Locating fields in the text, for messages.
// ---------------------------------------------------------------------------------------------
struct Document<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Document<'_> {
    fn line_at(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|b| *b == b'\n')
            .count()
            + 1
    }

    /// An error about the field at `path`, located in the text (as deep as the path exists).
    fn error(&self, path: &Path_, message: String) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line: self.locate(path),
            field: path.to_string(),
            message,
        }
    }

    /// A parse or type error from toml, which knows its span; `field` from serde's path.
    fn toml_error(&self, e: &toml::de::Error, field: String) -> ConfigError {
        let line = e.span().map_or(1, |s| self.line_at(s.start));
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line,
            field: if field.is_empty() || field == "." {
                "(document)".into()
            } else {
                field
            },
            message: e.message().to_string(),
        }
    }

    fn locate(&self, path: &Path_) -> usize {
        let Ok(doc) = toml::de::DeTable::parse(self.text) else {
            return 1;
        };
        let mut span = doc.span();
        let mut here: Option<&DeValue<'_>> = None;
        let root = doc.get_ref();
        for seg in &path.0 {
            let next = match (seg, here) {
                (Seg::Key(k), None) => root.get(k.as_str()),
                (Seg::Key(k), Some(DeValue::Table(t))) => t.get(k.as_str()),
                (Seg::Index(i), Some(DeValue::Array(a))) => a.get(*i),
                _ => None,
            };
            let Some(v) = next else { break };
            span = v.span();
            here = Some(v.get_ref());
        }
        self.line_at(span.start)
    }
}

/// A field path like `services[2].backends[0].weight`.
#[derive(Clone, Default)]
struct Path_(Vec<Seg>);

#[derive(Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Path_ {
    fn new() -> Self {
        Path_(Vec::new())
    }
    fn key(&self, k: &str) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_string()));
        p
    }
    fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
    /// Appends a relative path written like `override[0].cidrs[1]`.
    fn key_path(&self, rel: &str) -> Self {
        let mut p = self.clone();
        for part in rel.split('.') {
            let (name, rest) = part.split_once('[').unwrap_or((part, ""));
            if !name.is_empty() {
                p = p.key(name);
            }
            for idx in rest.split('[') {
                if let Ok(i) = idx.trim_end_matches(']').parse() {
                    p = p.index(i);
                }
            }
        }
        p
    }
}

impl fmt::Display for Path_ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(Path::new("lb.toml"), text).unwrap_err().to_string()
    }

    const GOOD: &str = r#"
[node]
hash-seed = 7
snat-ports = "62000-62999"

[rate-limits.polite]
packets-per-second = 100
connections-per-second = 10
connections-burst = 20
exempt = ["10.9.0.0/16"]

[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
protocol = "tcp"
rate-limit = "polite"
backends = [
  { address = "10.1.1.2", port = 8080 },
  { address = "10.1.1.3", port = 8080, weight = 0 },
]

[[services]]
name = "dns"
vip = "fd00:96::10"
port = 53
protocol = "udp"
mode = "preserve-client-ip"
backends = [{ address = "fd00:1:1::2" }]
"#;

    #[test]
    fn policy_hooks_default_to_detect_and_take_three_words() {
        let d = parse(Path::new("lb.toml"), GOOD).unwrap();
        assert_eq!(d.node.policy_hooks, PolicyHooks::Detect);
        for (word, want) in [
            ("detect", PolicyHooks::Detect),
            ("respect", PolicyHooks::Respect),
            ("ignore", PolicyHooks::Ignore),
        ] {
            let text = format!("[node]\npolicy-hooks = \"{word}\"\n");
            let d = parse(Path::new("lb.toml"), &text).unwrap();
            assert_eq!(d.node.policy_hooks, want);
        }
        let e = err("[node]\npolicy-hooks = \"sometimes\"\n");
        assert!(
            e.starts_with("lb.toml:2: node.policy-hooks") && e.contains("sometimes"),
            "{e}"
        );
    }

    #[test]
    fn good_config_becomes_the_desired_state() {
        let d = parse(Path::new("lb.toml"), GOOD).unwrap();
        assert_eq!(d.node.hash_seed, 7);
        assert_eq!(d.node.snat_ports, Some(vec![(62000, 62999)]));
        assert_eq!(d.services.len(), 2);
        let web = d.services.values().find(|s| s.name == "web").unwrap();
        assert_eq!(web.origin.to_string(), "lb.toml:12");
        assert_eq!(web.mode, Mode::Snat);
        assert_eq!(web.backends[0].port, 8080);
        assert_eq!(web.backends[0].weight, 1);
        assert_eq!(web.backends[1].weight, 0);
        let dns = d.services.values().find(|s| s.name == "dns").unwrap();
        assert_eq!(dns.mode, Mode::PreserveClientIp);
        // The backend port defaults to the service's.
        assert_eq!(dns.backends[0].port, 53);
        let polite = &d.policies["polite"];
        assert_eq!(
            polite.limits.packets.unwrap().burst,
            100,
            "burst defaults to one second"
        );
        assert_eq!(polite.limits.connections.unwrap().burst, 20);
    }

    #[test]
    fn type_errors_name_file_line_and_field() {
        let e = err(
            "[[services]]\nname = \"a\"\nvip = \"10.0.0.1\"\nport = \"eighty\"\nprotocol = \"tcp\"\n",
        );
        assert!(e.starts_with("lb.toml:4: services[0].port: "), "{e}");
        let e = err("[node]\nhash-seed = -1\n");
        assert!(e.starts_with("lb.toml:2: node.hash-seed: "), "{e}");
        let e =
            err("[[services]]\nname = \"a\"\nvip = \"not-an-ip\"\nport = 1\nprotocol = \"tcp\"\n");
        assert!(e.starts_with("lb.toml:3: services[0].vip: "), "{e}");
        let e =
            err("[[services]]\nname = \"a\"\nvip = \"10.0.0.1\"\nport = 1\nprotocol = \"sctp\"\n");
        assert!(e.starts_with("lb.toml:5: services[0].protocol: "), "{e}");
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let e = err("[node]\nhash-sed = 1\n");
        assert!(e.starts_with("lb.toml:2: node"), "{e}");
        assert!(e.contains("hash-sed"), "{e}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = err("[node]\nhash-seed = \n");
        assert!(e.starts_with("lb.toml:2: "), "{e}");
    }

    #[test]
    fn a_service_on_a_reserved_address_is_rejected_naming_it_unless_allowed() {
        let svc = |name: &str, vip: &str| {
            format!(
                "\n[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 22\nprotocol = \"tcp\"\n"
            )
        };
        let e = err(&svc("ssh", "127.0.0.1"));
        assert!(
            e.starts_with(
                "lb.toml:4: services[0].vip: service `ssh`: 127.0.0.1 is a loopback address"
            ),
            "{e}"
        );
        let e = err(&svc("meta", "fe80::1"));
        assert!(
            e.contains("service `meta`: fe80::1 is a link-local address"),
            "{e}"
        );
        let node = "[node]\nreserved-ranges = [\"10.244.0.0/16\"]\n";
        let e = err(&format!("{node}{}", svc("pods", "10.244.1.1")));
        assert!(
            e.starts_with("lb.toml:6: services[0].vip: service `pods`: 10.244.1.1 is in 10.244.0.0/16, which node.reserved-ranges reserves"),
            "{e}"
        );
        let allowed = format!(
            "[node]\nreserved-ranges = [\"10.244.0.0/16\"]\nallow-reserved = [\"pods\"]\n{}",
            svc("pods", "10.244.1.1")
        );
        let d = parse(Path::new("lb.toml"), &allowed).unwrap();
        assert_eq!(d.node.allow_reserved, ["pods"]);
        assert!(!d.node.prefer_same_zone, "off by default");
        let zoned = parse(Path::new("lb.toml"), "[node]\nprefer-same-zone = true\n").unwrap();
        assert!(zoned.node.prefer_same_zone);
        let e = err("[node]\nreserved-ranges = [\"10.0.0.0/8\", \"10.1.1.1/24\"]\n");
        assert!(
            e.starts_with("lb.toml:2: node.reserved-ranges[1]: `10.1.1.1/24` has host bits set"),
            "{e}"
        );
    }

    #[test]
    fn snat_addresses_one_or_a_list() {
        let parse = |t: &str| super::parse(Path::new("lb.toml"), t);
        let one = parse("[node]\nsnat-ipv4 = \"10.0.0.1\"\n").unwrap();
        assert_eq!(one.node.snat_ipv4, [Ipv4Addr::new(10, 0, 0, 1)]);
        let two =
            parse("[node]\nsnat-ipv4 = [\"10.0.0.1\", \"10.0.0.2\"]\nsnat-ipv6 = [\"fd00::1\"]\n")
                .unwrap();
        assert_eq!(two.node.snat_ipv4.len(), 2);
        assert_eq!(two.node.snat_ipv6.len(), 1);
        assert!(parse("").unwrap().node.snat_ipv4.is_empty());
        let e = err(
            "[node]\nsnat-ipv4 = [\"10.0.0.1\", \"10.0.0.2\", \"10.0.0.3\", \"10.0.0.4\", \"10.0.0.5\"]\n",
        );
        assert!(
            e.starts_with("lb.toml:2: node.snat-ipv4: 5 addresses"),
            "{e}"
        );
        let e = err("[node]\nsnat-ipv4 = [\"10.0.0.1\", \"10.0.0.1\"]\n");
        assert!(e.contains("10.0.0.1 is listed twice"), "{e}");
    }

    #[test]
    fn semantic_errors_name_file_line_and_field() {
        let svc = |backends: &str| {
            format!(
                "\n[[services]]\nname = \"a\"\nvip = \"10.96.0.1\"\nport = 80\nprotocol = \"tcp\"\nbackends = [\n{backends}\n]\n"
            )
        };
        let e = err(&svc("{ address = \"10.1.1.2\", weight = 70000 }"));
        assert_eq!(
            e,
            "lb.toml:8: services[0].backends[0].weight: 70000 is over the maximum 65535"
        );
        let e = err(&svc("{ address = \"fd00::2\" }"));
        assert!(
            e.starts_with(
                "lb.toml:8: services[0].backends[0].address: fd00::2 is not of the VIP's family"
            ),
            "{e}"
        );
        let e = err(&svc(
            "{ address = \"10.1.1.2\" },\n{ address = \"10.1.1.2\", port = 80 }",
        ));
        assert!(
            e.starts_with(
                "lb.toml:9: services[0].backends[1].address: 10.1.1.2:80 is listed twice"
            ),
            "{e}"
        );
        let two = format!(
            "{}{}",
            svc(""),
            svc("").replace("name = \"a\"", "name = \"b\"")
        );
        let e = err(&two);
        assert!(e.starts_with("lb.toml:14: services[1].port: 10.96.0.1:80/tcp is already served by `a` (lb.toml:2)"), "{e}");
        let e = err("[node]\nsnat-ports = \"70-60\"\n");
        assert!(e.starts_with("lb.toml:2: node.snat-ports: "), "{e}");
        let e = err("[node]\nsnat-ports = \"1024-80000\"\n");
        assert!(
            e.ends_with("node.snat-ports: `1024-80000`: 80000 is not a port (at most 65535)"),
            "{e}"
        );
        // The reason once, also in anyhow's `{:#}` (which follows sources).
        let e = load(Path::new("/nonexistent/lb.toml")).unwrap_err();
        let e = format!("{:#}", anyhow::Error::new(e));
        assert_eq!(e.matches("No such file").count(), 1, "{e}");
        let e = err("[node]\ntcp-idle-timeout-seconds = 0\n");
        assert!(
            e.starts_with("lb.toml:2: node.tcp-idle-timeout-seconds: 0 is out of range"),
            "{e}"
        );
        let e = err("[node]\ntcp-handshake-timeout-seconds = 0\n");
        assert!(
            e.starts_with("lb.toml:2: node.tcp-handshake-timeout-seconds: 0 is out of range"),
            "{e}"
        );
        let d = parse(
            Path::new("lb.toml"),
            "[node]\ntcp-handshake-timeout-seconds = 30\n",
        );
        assert_eq!(d.unwrap().node.tcp_handshake, Duration::from_secs(30));
        let e = err("[node]\nrate-limit = \"nope\"\n");
        assert!(
            e.starts_with("lb.toml:2: node.rate-limit: no rate limit named `nope`"),
            "{e}"
        );
    }

    #[test]
    fn source_ranges_are_read_and_bad_ones_name_file_line_and_field() {
        let svc = |extra: &str| {
            format!(
                "[[services]]\nname = \"a\"\nvip = \"10.96.0.1\"\nport = 80\nprotocol = \"tcp\"\n{extra}"
            )
        };
        let d = parse(
            Path::new("lb.toml"),
            &svc("source-ranges = [\"10.0.0.0/8\", \"2001:db8::/32\", \"::/0\"]\nsource-ranges-mode = \"deny\"\n"),
        )
        .unwrap();
        let a = d.services.values().next().unwrap();
        assert!(a.source_ranges.deny);
        assert_eq!(
            a.source_ranges.to_string(),
            "deny 10.0.0.0/8,2001:db8::/32,::/0"
        );
        let d = parse(Path::new("lb.toml"), &svc("")).unwrap();
        let a = d.services.values().next().unwrap();
        assert!(a.source_ranges.is_open() && !a.source_ranges.deny);
        let e = err(&svc(
            "source-ranges = [\n  \"10.0.0.0/8\",\n  \"10.0.0.1/8\",\n]\n",
        ));
        assert!(
            e.starts_with(
                "lb.toml:8: services[0].source-ranges[1]: `10.0.0.1/8` has host bits set"
            ),
            "{e}"
        );
        let e = err(&svc("source-ranges-mode = \"block\"\n"));
        assert!(
            e.starts_with("lb.toml:6: services[0].source-ranges-mode: "),
            "{e}"
        );
    }

    #[test]
    fn policy_errors_name_the_field() {
        let e = err("[rate-limits.p]\npackets-per-second = 10\npackets-burst = 0\n");
        assert_eq!(
            e,
            "lb.toml:3: rate-limits.p.packets-burst: must be at least 1"
        );
        let e = err("[rate-limits.p]\npackets-per-second = 20000000\n");
        assert!(
            e.starts_with(
                "lb.toml:2: rate-limits.p.packets-per-second: 20000000 is over the maximum 10000000"
            ),
            "{e}"
        );
        let e = err("[rate-limits.p]\nconnections-burst = 5\n");
        assert!(
            e.starts_with(
                "lb.toml:2: rate-limits.p.connections-burst: set without connections-per-second"
            ),
            "{e}"
        );
        let e = err("[rate-limits.p]\nexempt = [\"10.0.0.0/8\"]\ndeny = [\"10.1.0.0/16\"]\n");
        assert!(
            e.starts_with(
                "lb.toml:3: rate-limits.p.deny[0]: 10.1.0.0/16 overlaps 10.0.0.0/8 (exempt[0])"
            ),
            "{e}"
        );
        let e = err("[rate-limits.p]\ndeny = [\"10.0.0.1/8\"]\n");
        assert!(
            e.starts_with("lb.toml:2: rate-limits.p.deny[0]: `10.0.0.1/8` has host bits set"),
            "{e}"
        );
        let e = err("[rate-limits.p]\nipv6-prefix = 0\n");
        assert!(
            e.starts_with("lb.toml:2: rate-limits.p.ipv6-prefix: 0 is out of range"),
            "{e}"
        );
        let e = err(
            "[rate-limits.p]\n[[rate-limits.p.override]]\ncidrs = [\"192.0.2.0/24\"]\npackets-per-second = 5\npackets-burst = 0\n",
        );
        assert!(
            e.starts_with("lb.toml:5: rate-limits.p.override[0].packets-burst: must be at least 1"),
            "{e}"
        );
    }
}
