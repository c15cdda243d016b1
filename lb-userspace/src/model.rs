//! The desired state of the data path, whatever it comes from (the standalone config file or
//! Kubernetes): services with their backends, rate-limit policies, node settings. Plain data
//! with no knowledge of maps; `reconcile` turns it into map writes.
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use lb_common::{Addr, ServiceKey};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        match n {
            lb_common::IPPROTO_TCP => Some(Protocol::Tcp),
            lb_common::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// How a service forwards, as an NLB with IP targets does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Backends see the node's address (NLB's default for TCP with IP targets); replies come back
    /// through this node. Backends may be anywhere.
    #[default]
    Snat,
    /// Backends see the client's address. Replies must pass this node on their way out, so
    /// backends must be local (remote ones would need direct server return).
    PreserveClientIp,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Snat => "snat",
            Mode::PreserveClientIp => "preserve-client-ip",
        })
    }
}

/// What clients connect to: (VIP, port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Frontend {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl Frontend {
    /// The frontend as the data path's service table keys it.
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            addr: Addr::from(self.vip),
            port: self.port.to_be(),
            proto: self.protocol.number(),
            _pad: 0,
        }
    }

    /// The frontend a service-table key stands for (`None`: a protocol the model lacks).
    pub fn from_key(key: &ServiceKey) -> Option<Frontend> {
        Some(Frontend {
            vip: IpAddr::from(key.addr),
            port: u16::from_be(key.port),
            protocol: Protocol::from_number(key.proto)?,
        })
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.vip {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// Relative share of new flows; 0 drains (no new flows, existing ones continue).
    pub weight: u32,
}

impl Backend {
    /// The identity Maglev hashes: equal on every node for the same backend.
    pub fn maglev_key(&self) -> String {
        match self.addr {
            // What `format!("{a}:{port}")` writes, without the formatting machinery: the key
            // of every backend is made at each apply and view (200,000 at 10,000 Services).
            IpAddr::V4(a) => {
                let mut key = String::with_capacity(21);
                for (i, octet) in a.octets().into_iter().enumerate() {
                    if i > 0 {
                        key.push('.');
                    }
                    push_decimal(&mut key, u32::from(octet));
                }
                key.push(':');
                push_decimal(&mut key, u32::from(self.port));
                key
            }
            IpAddr::V6(a) => format!("[{a}]:{}", self.port),
        }
    }
}

/// `n` in decimal, as `Display` writes it.
fn push_decimal(out: &mut String, n: u32) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    let mut rest = n;
    loop {
        // A digit: below 10.
        digits[len] = b'0' + u8::try_from(rest % 10).unwrap_or(0);
        len += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for d in digits[..len].iter().rev() {
        out.push(char::from(*d));
    }
}

/// A service this node cannot serve as defined, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: service `{name}` ({frontend}): {reason}")]
pub struct Invalid {
    pub origin: Origin,
    pub name: String,
    pub frontend: Frontend,
    pub reason: String,
}

/// Where a service (or a policy) was defined.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Origin {
    /// A config file, at this line: this node's own, so an error in it rejects the file.
    File { path: PathBuf, line: usize },
    /// A Kubernetes Service: shared by every node, so one this node cannot serve is left out
    /// and reported, and the rest is served.
    Kubernetes { namespace: String, name: String },
    /// Given by a program (tests, benchmarks): treated as a file is.
    Other(String),
}

impl Origin {
    /// The Service it came from, if it came from the cluster.
    pub fn kubernetes_object(&self) -> Option<(&str, &str)> {
        match self {
            Origin::Kubernetes { namespace, name } => Some((namespace, name)),
            _ => None,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line } => write!(f, "{}:{line}", path.display()),
            Origin::Kubernetes { namespace, name } => write!(f, "Service {namespace}/{name}"),
            Origin::Other(what) => f.write_str(what),
        }
    }
}

impl From<&str> for Origin {
    fn from(what: &str) -> Origin {
        Origin::Other(what.to_string())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Service {
    /// How people call it ("web", "default/web:http").
    pub name: String,
    /// Where it was defined ("/etc/xdplb/config.toml:12", "Service default/web").
    pub origin: Origin,
    pub frontend: Frontend,
    pub mode: Mode,
    /// Unique by (addr, port).
    pub backends: Vec<Backend>,
    /// Rate-limit policy by name; `None`: the node default (if any).
    pub policy: Option<String>,
    /// Session affinity by client address, with this timeout.
    pub affinity: Option<Duration>,
    /// Which client addresses may open flows (Kubernetes' `loadBalancerSourceRanges`).
    #[serde(default)]
    pub source_ranges: SourceRanges,
}

/// A service's source ranges: with `deny`, the sources in `cidrs` are refused; else only they
/// are admitted. No prefix: every source is admitted, whatever `deny` says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SourceRanges {
    #[serde(deserialize_with = "source_cidrs")]
    pub cidrs: Vec<Cidr>,
    #[serde(default)]
    pub deny: bool,
}

impl SourceRanges {
    /// Every source is admitted.
    pub fn is_open(&self) -> bool {
        self.cidrs.is_empty()
    }

    /// Parses a list of source ranges. IPv6 prefixes that cover the IPv4-mapped range (`::/0`)
    /// are taken, as Kubernetes users write them: they stand for IPv6 sources only.
    pub fn parse<S: AsRef<str>>(list: &[S]) -> Result<Vec<Cidr>, (usize, String)> {
        list.iter()
            .enumerate()
            .map(|(i, s)| Cidr::parse_any(s.as_ref()).map_err(|m| (i, m)))
            .collect()
    }
}

fn source_cidrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Cidr>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    SourceRanges::parse(&list).map_err(|(_, m)| serde::de::Error::custom(m))
}

impl fmt::Display for SourceRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_open() {
            return f.write_str("any");
        }
        f.write_str(if self.deny { "deny " } else { "allow " })?;
        let list: Vec<String> = self.cidrs.iter().map(ToString::to_string).collect();
        f.write_str(&list.join(","))
    }
}

/// Tokens per second and burst of one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub per_second: u64,
    pub burst: u64,
}

/// What happens to new sources when the source table is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TableFull {
    /// They share one bucket per policy: limited together, never unlimited.
    #[default]
    FailClosed,
    /// They are admitted, and counted.
    FailOpen,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub packets: Option<Rate>,
    pub connections: Option<Rate>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub limits: Limits,
    /// IPv6 sources share a bucket per prefix of this length.
    pub ipv6_prefix: u8,
    pub table_full: TableFull,
    pub reset_rejected_syn: bool,
    /// Never limited.
    pub exempt: Vec<Cidr>,
    /// Always dropped.
    pub deny: Vec<Cidr>,
    /// Limited with their own limits instead.
    pub overrides: Vec<(Vec<Cidr>, Limits)>,
}

pub const DEFAULT_IPV6_PREFIX: u8 = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSettings {
    pub hash_seed: u32,
    /// Source addresses for snat services (up to MAX_SNAT_ADDRS each; each adds a full range of
    /// ports per backend); empty: the uplink's first global address.
    pub snat_ipv4: Vec<Ipv4Addr>,
    pub snat_ipv6: Vec<Ipv6Addr>,
    /// Source ports for snat flows (one or two inclusive ranges); `None`: every port from 1024
    /// up that neither the node's own connections (its ephemeral range) nor NodePorts use.
    pub snat_ports: Option<Vec<(u16, u16)>>,
    pub tcp_idle: Duration,
    pub udp_idle: Duration,
    pub tcp_closing: Duration,
    /// How long a TCP flow opened by a SYN waits idle for the client's ACK.
    pub tcp_handshake: Duration,
    /// How long a snat port stays out of use after a connection its backend closed first: the
    /// backend keeps the tuple in TIME_WAIT that long (60 s on Linux).
    pub tcp_time_wait: Duration,
    /// Policy for services without one of their own.
    pub default_policy: Option<String>,
    /// Frontend addresses no service may claim, besides those always reserved (see
    /// [`crate::reserved`]).
    pub reserved_ranges: Vec<Cidr>,
    /// Services that may claim reserved addresses anyway: config-file service names, and
    /// `namespace/name` of Kubernetes Services.
    pub allow_reserved: Vec<String>,
    /// Kubernetes: Services that opt in and ask nothing of topology (no
    /// `spec.trafficDistribution`, no topology-mode annotation) keep new flows in this node's
    /// zone while it has ready endpoints ([`crate::k8s::topology`]).
    #[serde(default)]
    pub prefer_same_zone: bool,
    /// How the agent decides whether packets for local pods may skip the hooks on their way in
    /// (see [`crate::hooks`]).
    pub policy_hooks: crate::hooks::PolicyHooks,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            hash_seed: DEFAULT_HASH_SEED,
            snat_ipv4: Vec::new(),
            snat_ipv6: Vec::new(),
            snat_ports: None,
            tcp_idle: Duration::from_secs(350),
            udp_idle: Duration::from_secs(120),
            tcp_closing: Duration::from_secs(10),
            // Above the longest gap between a client's SYN retransmissions (32 s on Linux).
            tcp_handshake: Duration::from_secs(60),
            // Linux's TCP_TIMEWAIT_LEN.
            tcp_time_wait: Duration::from_secs(60),
            default_policy: None,
            reserved_ranges: Vec::new(),
            allow_reserved: Vec::new(),
            prefer_same_zone: false,
            policy_hooks: crate::hooks::PolicyHooks::Detect,
        }
    }
}

/// Any fixed value works, as long as every node uses the same one.
pub const DEFAULT_HASH_SEED: u32 = 0x5eed_1b0b;
/// Kubernetes' NodePort range: kept out of the default snat ports, so a stale reply to a snat
/// port can never be taken for a new connection to a node port.
pub const NODE_PORTS: (u16, u16) = (30000, 32767);
/// Linux's default ephemeral range, for when the node's cannot be read.
pub const LINUX_EPHEMERAL_PORTS: (u16, u16) = (32768, 60999);

/// The default snat ports: 1024-65535 without the node's ephemeral range (its own connections
/// pick ports there, and a collision would hand their replies to a client) and without the
/// NodePort range; the two largest pieces. With Linux's defaults: 1024-29999 and 61000-65535,
/// 33,512 ports.
pub fn default_snat_ports(ephemeral: (u16, u16)) -> Vec<(u16, u16)> {
    let mut pieces = vec![(1024u32, 65535u32)];
    for (lo, hi) in [ephemeral, NODE_PORTS] {
        let (lo, hi) = (u32::from(lo), u32::from(hi));
        pieces = pieces
            .into_iter()
            .flat_map(|(a, b)| {
                if hi < a || lo > b {
                    vec![(a, b)]
                } else {
                    [(a, lo.saturating_sub(1)), (hi + 1, b)]
                        .into_iter()
                        .filter(|(x, y)| x <= y && *x >= 1024)
                        .collect()
                }
            })
            .collect();
    }
    pieces.sort_by_key(|(a, b)| std::cmp::Reverse(b - a));
    pieces.truncate(2);
    pieces.sort_unstable();
    pieces
        .into_iter()
        .map(|(a, b)| {
            (
                u16::try_from(a).expect("a port"),
                u16::try_from(b).expect("a port"),
            )
        })
        .collect()
}

/// Everything the data path should be doing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub node: NodeSettings,
    pub policies: BTreeMap<String, Policy>,
    /// Shared: the cluster's translation, the composed state and the state admitted to the
    /// maps hold the same services (at 10,000 Services a copy each was 11 MiB).
    pub services: BTreeMap<Frontend, Arc<Service>>,
}

/// A service one input defines that another input already defines: the first keeps the
/// frontend, this one is not served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The service not served.
    pub service: Service,
    /// Where the one that keeps the frontend was defined, and its name.
    pub kept_by: (Origin, String),
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "also defined by {} ({}), which keeps it; not served",
            self.kept_by.0, self.kept_by.1
        )
    }
}

/// The config file's desired state with another input's services and policies added (the
/// cluster's). The file wins a frontend both define; within `services`, the first one wins
/// (the cluster's translation already kept each frontend to its oldest Service). The losers
/// are returned.
pub fn compose(
    file: &Desired,
    services: &[Arc<Service>],
    policies: &BTreeMap<String, Policy>,
) -> (Desired, Vec<Conflict>) {
    let mut desired = file.clone();
    let mut conflicts = Vec::new();
    for (name, policy) in policies {
        desired.policies.insert(name.clone(), policy.clone());
    }
    for s in services {
        match desired.services.get(&s.frontend) {
            Some(other) => conflicts.push(Conflict {
                service: Service::clone(s),
                kept_by: (other.origin.clone(), other.name.clone()),
            }),
            None => {
                desired.services.insert(s.frontend, s.clone());
            }
        }
    }
    (desired, conflicts)
}

/// An address prefix, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn max_len(addr: IpAddr) -> u8 {
        if addr.is_ipv4() { 32 } else { 128 }
    }

    /// The prefix whose [`Cidr::as_v6_bits`] are `bits`, `len` (as LB_PREFIXES holds it):
    /// IPv4 inside the IPv4-mapped range, else IPv6. Host bits are cleared.
    pub fn from_v6_bits(bits: u128, len: u8) -> Cidr {
        let len = len.min(128);
        let bits = if len == 0 {
            0
        } else {
            bits & (u128::MAX << (128 - u32::from(len)))
        };
        let v6 = Ipv6Addr::from(bits);
        match v6.to_ipv4_mapped() {
            Some(v4) if len >= 96 => Cidr {
                addr: IpAddr::V4(v4),
                len: len - 96,
            },
            _ => Cidr {
                addr: IpAddr::V6(v6),
                len,
            },
        }
    }

    /// The prefix as 128 bits (IPv4 mapped) and its length in those bits.
    pub fn as_v6_bits(&self) -> (u128, u8) {
        match self.addr {
            IpAddr::V4(a) => (u128::from(a.to_ipv6_mapped()), self.len + 96),
            IpAddr::V6(a) => (u128::from(a), self.len),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, len) = self.as_v6_bits();
        let ip = match ip {
            IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
            IpAddr::V6(a) => u128::from(a),
        };
        len == 0 || (net ^ ip) >> (128 - u32::from(len)) == 0
    }

    /// True if the two prefixes share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let (a, la) = self.as_v6_bits();
        let (b, lb) = other.as_v6_bits();
        let len = la.min(lb);
        len == 0 || (a ^ b) >> (128 - u32::from(len)) == 0
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let cidr = Cidr::parse_any(s)?;
        if cidr.covers_v4_mapped() {
            // IPv4 sources are matched as ::ffff:a.b.c.d: this prefix would cover all of them.
            return Err(format!(
                "`{s}` covers the IPv4-mapped range ::ffff:0:0/96, so it would match every IPv4 source; write IPv4 prefixes in IPv4 notation"
            ));
        }
        Ok(cidr)
    }
}

impl Cidr {
    /// An IPv6 prefix wider than the IPv4-mapped range and holding it (`::/0`).
    pub fn covers_v4_mapped(&self) -> bool {
        self.addr.is_ipv6() && self.overlaps(&V4_MAPPED) && !V4_MAPPED.contains(self.addr)
    }

    /// The prefixes of the 128-bit space the data path matches in that hold this one's
    /// addresses of its own family: itself, or for a prefix over the IPv4-mapped range, the
    /// pieces of it around that range (at most 96).
    pub fn own_family_pieces(&self) -> Vec<(u128, u8)> {
        let (bits, len) = self.as_v6_bits();
        if !self.covers_v4_mapped() {
            return vec![(bits, len)];
        }
        let (mapped, mapped_len) = V4_MAPPED.as_v6_bits();
        // Along the path from this prefix down to the mapped range, the sibling of each step.
        (len..mapped_len)
            .map(|l| {
                let bit = 1u128 << (127 - u32::from(l));
                let keep = if l == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(l))
                };
                ((mapped & keep) | (!mapped & bit), l + 1)
            })
            .collect()
    }

    /// Parses without refusing prefixes over the IPv4-mapped range.
    fn parse_any(s: &str) -> Result<Cidr, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an address or address/prefix-length"))?;
        let max = Cidr::max_len(addr);
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0..={max}"))?,
            None => max,
        };
        let cidr = Cidr { addr, len };
        let (bits, blen) = cidr.as_v6_bits();
        let host_mask = if blen == 128 { 0 } else { u128::MAX >> blen };
        if bits & host_mask != 0 {
            let net = bits & !host_mask;
            let net = match addr {
                IpAddr::V4(_) => IpAddr::V4(
                    Ipv6Addr::from(net)
                        .to_ipv4_mapped()
                        .unwrap_or(Ipv4Addr::UNSPECIFIED),
                ),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(net)),
            };
            return Err(format!(
                "`{s}` has host bits set; did you mean {net}/{len}?"
            ));
        }
        Ok(cidr)
    }
}

/// Where IPv4 addresses live in the 128-bit space the data path matches in.
const V4_MAPPED: Cidr = Cidr {
    addr: IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)),
    len: 96,
};

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_maglev_key_is_the_address_and_port_as_display_writes_them() {
        // Every node must hash the same bytes: the key is held to the formatter's text.
        let mut x = 0x9e37_79b9u32;
        let mut addrs: Vec<(IpAddr, u16)> = vec![
            ("0.0.0.0".parse().unwrap(), 0),
            ("255.255.255.255".parse().unwrap(), 65535),
            ("10.0.100.9".parse().unwrap(), 8080),
            ("fd00::1".parse().unwrap(), 443),
        ];
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            addrs.push((IpAddr::V4(x.into()), u16::try_from(x >> 16).unwrap()));
        }
        for (addr, port) in addrs {
            let b = Backend {
                addr,
                port,
                weight: 1,
            };
            let expected = match addr {
                IpAddr::V4(a) => format!("{a}:{port}"),
                IpAddr::V6(a) => format!("[{a}]:{port}"),
            };
            assert_eq!(b.maglev_key(), expected);
        }
    }

    fn service(origin: Origin, vip: &str) -> Service {
        Service {
            name: format!("{origin}"),
            origin,
            frontend: Frontend {
                vip: vip.parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            mode: Mode::Snat,
            backends: Vec::new(),
            policy: None,
            affinity: None,
            source_ranges: SourceRanges::default(),
        }
    }

    #[test]
    fn the_file_keeps_a_frontend_the_cluster_also_defines() {
        let file_web = service(
            Origin::File {
                path: "lb.toml".into(),
                line: 3,
            },
            "10.96.0.10",
        );
        let file = Desired {
            services: [(file_web.frontend, Arc::new(file_web.clone()))].into(),
            ..Desired::default()
        };
        let kube = |name: &str, vip: &str| {
            service(
                Origin::Kubernetes {
                    namespace: "default".into(),
                    name: name.into(),
                },
                vip,
            )
        };
        let policies = [("service:default/b".to_string(), test_policy())].into();
        let (desired, conflicts) = compose(
            &file,
            &[
                kube("a", "10.96.0.10").into(),
                kube("b", "10.96.0.11").into(),
                kube("c", "10.96.0.11").into(),
            ],
            &policies,
        );
        assert_eq!(desired.services.len(), 2);
        assert_eq!(*desired.services[&file_web.frontend], file_web);
        assert!(desired.policies.contains_key("service:default/b"));
        let lost: Vec<String> = conflicts
            .iter()
            .map(|c| format!("{}: {c}", c.service.origin))
            .collect();
        assert_eq!(
            lost,
            [
                "Service default/a: also defined by lb.toml:3 (lb.toml:3), which keeps it; not served",
                "Service default/c: also defined by Service default/b (Service default/b), which keeps it; not served",
            ]
        );
    }

    fn test_policy() -> Policy {
        Policy {
            limits: Limits {
                packets: None,
                connections: None,
            },
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
            table_full: TableFull::FailClosed,
            reset_rejected_syn: false,
            exempt: Vec::new(),
            deny: Vec::new(),
            overrides: Vec::new(),
        }
    }

    #[test]
    fn a_frontend_and_its_key_stand_for_each_other() {
        let f = Frontend {
            vip: "fd00::1".parse().unwrap(),
            port: 8080,
            protocol: Protocol::Udp,
        };
        let key = f.key();
        assert_eq!(key.port, 8080u16.to_be(), "network byte order");
        assert_eq!(Frontend::from_key(&key), Some(f));
    }

    #[test]
    fn cidr_parses_and_rejects_host_bits() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap(),
            Cidr {
                addr: "10.0.0.0".parse().unwrap(),
                len: 8
            }
        );
        assert_eq!("10.1.2.3".parse::<Cidr>().unwrap().len, 32);
        let e = "10.0.0.1/24".parse::<Cidr>().unwrap_err();
        assert!(e.contains("did you mean 10.0.0.0/24"), "{e}");
        let e = "2001:db8::1/64".parse::<Cidr>().unwrap_err();
        assert!(e.contains("did you mean 2001:db8::/64"), "{e}");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn cidr_overlap_and_containment() {
        let a: Cidr = "10.0.0.0/8".parse().unwrap();
        let b: Cidr = "10.1.0.0/16".parse().unwrap();
        let c: Cidr = "192.168.0.0/16".parse().unwrap();
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
        assert!(!v6.overlaps(&a));
        // One trie holds both families (IPv4 mapped): an IPv6 prefix over the mapped range
        // would silently cover all IPv4 sources.
        let e = "::/0".parse::<Cidr>().unwrap_err();
        assert!(e.contains("IPv4-mapped"), "{e}");
        assert!(a.contains("10.9.9.9".parse().unwrap()));
        // Source ranges take it, for IPv6 sources alone: the pieces around the mapped range.
        let all6 = SourceRanges::parse(&["::/0"]).unwrap()[0];
        let pieces = all6.own_family_pieces();
        assert_eq!(pieces.len(), 96);
        let in_pieces = |ip: &str| {
            let ip = u128::from(ip.parse::<Ipv6Addr>().unwrap());
            pieces
                .iter()
                .any(|(net, len)| *len == 0 || (net ^ ip) >> (128 - u32::from(*len)) == 0)
        };
        assert!(in_pieces("2001:db8::1") && in_pieces("::1") && in_pieces("fe80::1"));
        assert!(!in_pieces("::ffff:10.1.2.3"), "no IPv4 source");
        assert_eq!(a.own_family_pieces(), vec![a.as_v6_bits()]);
        assert!(!b.contains("10.2.0.1".parse().unwrap()));
        // Back from the map's 128-bit form, each family as written.
        for c in [
            "10.0.0.0/8",
            "0.0.0.0/0",
            "192.0.2.7/32",
            "2001:db8::/32",
            "fd00::/8",
        ] {
            let c: Cidr = c.parse().unwrap();
            let (bits, len) = c.as_v6_bits();
            assert_eq!(Cidr::from_v6_bits(bits, len), c);
        }
        for (bits, len) in pieces {
            assert!(
                Cidr::from_v6_bits(bits, len).addr.is_ipv6(),
                "{bits:x}/{len}"
            );
        }
        let (bits, _) = a.as_v6_bits();
        assert_eq!(
            Cidr::from_v6_bits(bits | 0xff, 96 + 8).to_string(),
            "10.0.0.0/8"
        );
    }
}
