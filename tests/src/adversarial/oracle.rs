//! The oracle: for each frame, what DATAPATH-SPEC.md allows the data path to do with it
//! (`expect`), and whether the output bytes are what the allowed action makes of the input
//! (`check_output`). It reads frames with `wire` only and keeps its own model of the flows the
//! data path holds, learned from the outputs it judged.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
};

use super::{
    LOCAL_BACKENDS, NODE_ADDRS, Prog, SERVICES, SUBNET_BROADCASTS, snat_addr, snat_port,
    wire::{
        self, ACK, FIN, Ip, RST, SYN, TCP, Tuple, UDP, Upper, View, be16, fold, is_group_mac,
        parse, sum, valid,
    },
};
use crate::kernel::Fixture;

/// A service as the oracle knows it.
pub struct Svc {
    pub name: &'static str,
    pub vip: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub snat: bool,
    pub backends: Vec<(IpAddr, u16)>,
    pub policy: Option<&'static str>,
    /// Its policy answers rejected SYNs with RSTs.
    pub rst: bool,
}

/// What the oracle knows of the configuration and the node.
pub struct Net {
    pub services: Vec<Svc>,
    pub vips: Vec<IpAddr>,
    pub node_addrs: Vec<IpAddr>,
    pub local_backends: Vec<IpAddr>,
    pub broadcasts: Vec<IpAddr>,
    pub up0_mac: [u8; 6],
    pub pod0_mac: [u8; 6],
    /// The local pod's delivery is `netfilter`: its flows go through the kernel's forwarding
    /// both ways, without snat, and `lb_uplink_out` translates its replies leaving the uplink.
    pub netfilter: bool,
}

impl Net {
    pub fn new(fx: &Fixture) -> Net {
        let ip = |s: &str| s.parse::<IpAddr>().expect("address");
        let node_addrs: Vec<IpAddr> = NODE_ADDRS.iter().map(|a| ip(a)).collect();
        let services: Vec<Svc> = SERVICES
            .iter()
            .map(|s| Svc {
                name: s.name,
                vip: ip(s.vip),
                port: s.port,
                proto: s.proto,
                snat: s.snat,
                backends: s.backends.iter().map(|(a, p)| (ip(a), *p)).collect(),
                policy: s.policy,
                rst: s.policy == Some("rst"),
            })
            .collect();
        let mut vips: Vec<IpAddr> = services
            .iter()
            .map(|s| s.vip)
            .filter(|a| !node_addrs.contains(a))
            .collect();
        vips.dedup();
        Net {
            services,
            vips,
            node_addrs,
            local_backends: LOCAL_BACKENDS.iter().map(|a| ip(a)).collect(),
            broadcasts: SUBNET_BROADCASTS.iter().map(|a| ip(a)).collect(),
            up0_mac: fx.up0_mac,
            pod0_mac: fx.pod0_mac,
            netfilter: false,
        }
    }

    /// Whether a flow to backend address `a` is a `netfilter` flow.
    pub fn netfilter_into(&self, a: IpAddr) -> bool {
        self.netfilter && self.local_backends.contains(&a)
    }

    pub fn is_vip(&self, a: IpAddr) -> bool {
        self.vips.contains(&a)
    }

    pub fn is_node(&self, a: IpAddr) -> bool {
        self.node_addrs.contains(&a)
    }

    pub fn service(&self, dst: IpAddr, dport: u16, proto: u8) -> Option<usize> {
        self.services
            .iter()
            .position(|s| s.vip == dst && s.port == dport && s.proto == proto)
    }

    /// §4: an IP source that is not a unicast host address.
    pub fn bad_source(&self, a: IpAddr) -> bool {
        if self.is_vip(a) || self.is_node(a) || self.broadcasts.contains(&a) {
            return true;
        }
        match a {
            IpAddr::V4(a) => {
                let o = a.octets();
                o[0] == 0
                    || o[0] == 127
                    || (o[0] == 169 && o[1] == 254)
                    || o[0] >= 224
                    || a == Ipv4Addr::BROADCAST
            }
            IpAddr::V6(a) => {
                let s = a.segments();
                a == Ipv6Addr::UNSPECIFIED
                    || a == Ipv6Addr::LOCALHOST
                    || s[0] >> 8 == 0xff
                    || s[0] & 0xffc0 == 0xfe80
                    || (s[0..5] == [0; 5] && s[5] == 0xffff)
            }
        }
    }
}

/// A flow the data path created, as the oracle saw it created.
#[derive(Clone, Debug)]
pub struct Flow {
    pub svc: usize,
    /// (client, client port, VIP, VIP port, protocol): the client's packets.
    pub client: Tuple,
    pub backend: (IpAddr, u16),
    /// The node address and port of a snat flow.
    pub snat: Option<(IpAddr, u16)>,
    /// A FIN or RST of its client was seen: a SYN may start a new flow on its tuple.
    pub closing: bool,
}

impl Flow {
    /// A flow the spec allows (a client that is one, the family's node snat address): the
    /// seeds build replies and ICMP errors only for these.
    pub fn clean(&self, net: &Net) -> bool {
        let (c, _, vip, _, _) = self.client;
        !net.bad_source(c)
            && c.is_ipv6() == vip.is_ipv6()
            && self
                .snat
                .is_none_or(|(a, p)| a == snat_addr(vip.is_ipv6()) && snat_port(p))
    }

    /// The backend's packets: (backend, port, node or client, port, protocol).
    pub fn reply_key(&self) -> Tuple {
        let (c, cp, _, _, proto) = self.client;
        let (to, tp) = self.snat.unwrap_or((c, cp));
        (self.backend.0, self.backend.1, to, tp, proto)
    }
}

#[derive(Default)]
pub struct Model {
    pub flows: Vec<Flow>,
    pub by_client: HashMap<Tuple, usize>,
    pub by_reply: HashMap<Tuple, usize>,
    /// Every flow that ever had a reply key: after a clash (flagged when it happens) the model
    /// cannot always tell whose reply entry the data path kept, so any of them is accepted.
    pub reply_flows: HashMap<Tuple, Vec<usize>>,
    /// Flows by service, for seeds.
    pub by_service: HashMap<usize, Vec<usize>>,
}

impl Model {
    /// A client's FIN or RST may mark the client-side entry of its flow closing, whatever
    /// became of the packet: "may", because a flow the packet created is not marked (the data
    /// path creates entries open), and one the data path made without the model seeing it (for
    /// a packet then dropped, §7) is. A flow marked closing accepts a SYN that opens a new flow
    /// as well as one that keeps the old, so the mark errs on the side of allowing. (The
    /// backend's FIN or RST marks only its reply entry, which a client's SYN does not consult.)
    pub fn note_closing(&mut self, frame: &[u8]) {
        let v = parse(frame);
        let Some(ip) = v.ip else { return };
        let Some(t) = ip.tuple() else { return };
        if t.4 != TCP || ip.tcp_flags() & (FIN | RST) == 0 {
            return;
        }
        if let Some(id) = self.by_client.get(&t) {
            self.flows[*id].closing = true;
        }
    }

    /// Follows what the data path did, allowed or not: a client's packet that left for a
    /// backend of its service shows the flow the data path holds for its tuple.
    pub fn learn(&mut self, net: &Net, input: &[u8], output: &[u8]) {
        let (Some(iip), Some(oip)) = (parse(input).ip, parse(output).ip) else {
            return;
        };
        let (Some(it), Some(ot)) = (iip.tuple(), oip.tuple()) else {
            return;
        };
        let Some(si) = net.service(it.2, it.3, it.4) else {
            return;
        };
        let svc = &net.services[si];
        if iip.v6 != oip.v6 || !svc.backends.contains(&(ot.2, ot.3)) {
            return;
        }
        let snat = (svc.snat && !net.netfilter_into(ot.2)).then_some((ot.0, ot.1));
        let syn = it.4 == TCP && iip.tcp_flags() & (SYN | ACK) == SYN;
        // Unchanged, unless a SYN re-created it (its reply entry is then this flow's again).
        if let Some(id) = self.by_client.get(&it)
            && self.flows[*id].backend == (ot.2, ot.3)
            && self.flows[*id].snat == snat
            && !(self.flows[*id].closing && syn)
        {
            return;
        }
        self.insert(Flow {
            svc: si,
            client: it,
            backend: (ot.2, ot.3),
            snat,
            closing: false,
        });
    }

    fn insert(&mut self, flow: Flow) -> usize {
        let id = self.flows.len();
        self.by_client.insert(flow.client, id);
        self.by_reply.insert(flow.reply_key(), id);
        self.reply_flows
            .entry(flow.reply_key())
            .or_default()
            .push(id);
        self.by_service.entry(flow.svc).or_default().push(id);
        self.flows.push(flow);
        id
    }
}

/// Which way an ICMP error's quoted packet went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum About {
    /// A packet we sent to the client (VIP -> client): the error goes to the backend.
    Reply,
    /// A packet we sent to the backend: the error goes to the client.
    Forward,
}

/// What the spec allows for one frame.
#[derive(Clone, Debug, Default)]
pub struct Expect {
    /// The rule that decides the frame (named in violations).
    pub reason: &'static str,
    pub detail: String,
    pub pass: bool,
    pub drop: bool,
    /// On a drop one of these counters must move; empty: any counter (but `packets`).
    pub counters: Vec<&'static str>,
    /// Client packet of this service: forwarded to one of its backends.
    pub forward: Option<usize>,
    /// Answered with a RST (a rejected SYN).
    pub rst: bool,
    /// Reply of this model flow: translated back to its client.
    pub reply: Option<usize>,
    pub echo: bool,
    /// ICMP error about this model flow: translated to its other end.
    pub icmp: Option<(usize, About)>,
    /// No flow and no source bucket, whatever the verdict (§4).
    pub stateless: bool,
}

impl Expect {
    fn new(reason: &'static str, detail: String) -> Expect {
        Expect {
            reason,
            detail,
            ..Expect::default()
        }
    }

    fn pass(reason: &'static str, detail: String) -> Expect {
        Expect {
            pass: true,
            ..Expect::new(reason, detail)
        }
    }

    fn drop(reason: &'static str, detail: String, counters: Vec<&'static str>) -> Expect {
        Expect {
            drop: true,
            counters,
            ..Expect::new(reason, detail)
        }
    }

    pub fn may_send(&self) -> bool {
        self.forward.is_some()
            || self.rst
            || self.reply.is_some()
            || self.echo
            || self.icmp.is_some()
    }
}

pub const R_NOT_IP: &str = "§1 not IP, or IP header cut short";
pub const R_NOT_OURS: &str = "§1 not ours";
pub const R_L2: &str = "§1 not addressed to our MAC, or group source MAC";
pub const R_MALFORMED: &str = "§2 malformed";
pub const R_FRAGMENT: &str = "§2 fragment";
pub const R_EXTENSION: &str = "§2 unsupported IPv6 extension header";
pub const R_BAD_SOURCE: &str = "§4 source is no client";
pub const R_TTL: &str = "§3 TTL/hop limit <= 1";
pub const R_NO_SERVICE: &str = "§1 to a VIP, no service";
pub const R_CLASH: &str = "§6 new flow clashes with a live flow";
pub const R_CLIENT: &str = "client packet to a service";
pub const R_REPLY: &str = "reply of a tracked flow";
pub const R_REPLY_NETFILTER: &str = "reply of a netfilter flow, leaving the node";
pub const R_NOT_NETFILTER_REPLY: &str = "leaving the uplink: no netfilter flow's reply";
pub const R_UNTRACKED: &str = "not a tracked flow's packet";
pub const R_POD_TO_VIP: &str = "pod to a VIP";
pub const R_ECHO: &str = "echo request to a VIP";
pub const R_ICMP_TRACKED: &str = "ICMP error about a tracked flow";
pub const R_ICMP_UNTRACKED: &str = "ICMP error not translatable";
pub const R_ICMP_OTHER: &str = "other ICMP to a VIP";

/// The counters that count the rate limiter's drops (it may act before other checks).
/// Any of the rate limiter's drop counters.
const RATE_LIMITED: [&str; 4] = [
    "drop_rate",
    "drop_connection_rate",
    "drop_denied",
    "drop_table_full",
];

pub fn expect(net: &Net, model: &Model, prog: Prog, f: &[u8]) -> Expect {
    if prog == Prog::Out {
        return leaving(net, model, f);
    }
    let v = parse(f);
    let Some(ip) = &v.ip else {
        return Expect::pass(R_NOT_IP, format!("ethertype {:#06x}", v.ethertype));
    };
    let to_vip = net.is_vip(ip.dst);
    let to_node = net.is_node(ip.dst);
    let from_pod = prog == Prog::Backend && net.local_backends.contains(&ip.src);
    if !(to_vip || to_node || from_pod) {
        return Expect::pass(R_NOT_OURS, format!("{} -> {}", ip.src, ip.dst));
    }
    // Not balanced for a reason of the frame itself: to a VIP dropped (and counted), to a node
    // address passed (the spec does not say whether a node port's address counts as a VIP
    // here, so a drop is accepted too), otherwise passed.
    // lb_backend: a pod's packet to a VIP (hairpin) is not the kind §1's "dropped" has in
    // mind (the kernel routes it out and back in through an uplink); either is accepted.
    let strict_vip = to_vip && prog == Prog::Uplink;
    let unbalanced = |reason: &'static str, detail: String, counters: Vec<&'static str>| {
        if strict_vip {
            Expect::drop(reason, detail, counters)
        } else if to_node || to_vip {
            Expect {
                pass: true,
                ..Expect::drop(reason, detail, vec![])
            }
        } else {
            Expect::pass(reason, detail)
        }
    };
    let our_mac = match prog {
        Prog::Uplink | Prog::Out => net.up0_mac,
        Prog::Backend => net.pod0_mac,
    };
    let detail = || {
        format!(
            "dst MAC {}, src MAC {}",
            wire::hex(&v.dst_mac),
            wire::hex(&v.src_mac)
        )
    };
    // Issue 10's invariant 1: only frames sent to the interface's own MAC are balanced, and
    // anything else is passed untouched (the kernel drops what is not for this host).
    if v.dst_mac != our_mac {
        return Expect::pass(R_L2, detail());
    }
    // A group address is no sender: such a frame is malformed.
    if is_group_mac(&v.src_mac) {
        return unbalanced(R_L2, detail(), vec!["drop_malformed"]);
    }
    let bad_source = prog == Prog::Uplink && net.bad_source(ip.src);
    let service = ip
        .tuple()
        .and_then(|(_, _, d, dp, p)| net.service(d, dp, p));
    let mut reasons: Vec<&'static str> = Vec::new();
    let mut counters: Vec<&'static str> = Vec::new();
    let mut detail: Vec<String> = Vec::new();
    if !ip.malformed.is_empty() {
        reasons.push(R_MALFORMED);
        counters.push("drop_malformed");
        if ip.proto == ip.icmp_proto() {
            counters.push("drop_icmp");
        }
        detail.extend(ip.malformed.iter().map(std::string::ToString::to_string));
    }
    if ip.fragment {
        reasons.push(R_FRAGMENT);
        counters.push("drop_fragment");
    }
    if ip.unsupported_extension {
        reasons.push(R_EXTENSION);
        counters.push("drop_ipv6_extension");
        // "Unknown extension header" and "unknown protocol" cannot be told apart but by
        // IANA's list: for the ones without a parser here, either counter.
        if [139, 140, 253, 254].contains(&ip.proto) {
            counters.push("drop_no_service");
        }
        detail.push(format!("next header {}", ip.proto));
    }
    if bad_source {
        reasons.push(R_BAD_SOURCE);
        counters.push("drop_bad_source");
        detail.push(format!("source {}", ip.src));
    }
    if !reasons.is_empty() {
        // A malformed frame to a VIP port (or protocol) without a service may be counted
        // either way.
        if to_vip && service.is_none() && ip.proto != ip.icmp_proto() {
            counters.push("drop_no_service");
        }
        if service.is_some_and(|s| net.services[s].policy.is_some()) {
            counters.extend(RATE_LIMITED);
        }
        let mut e = unbalanced(reasons[0], detail.join("; "), counters);
        e.stateless = bad_source;
        return e;
    }
    match ip.proto {
        TCP | UDP => transport(net, model, prog, ip, to_vip, to_node, service),
        p if p == ip.icmp_proto() => icmp(model, prog, f, ip, to_vip),
        p if to_vip => {
            let mut c = vec!["drop_no_service"];
            if ip.v6 {
                c.push("drop_ipv6_extension");
            }
            let mut e = Expect::drop(R_NO_SERVICE, format!("protocol {p}"), c);
            e.pass = !strict_vip;
            e
        }
        p => Expect::pass(R_NOT_OURS, format!("protocol {p} to a node address")),
    }
}

/// `lb_uplink_out`: what the kernel sends out of the uplink. Only a `netfilter` flow's reply
/// is ours: translated (the VIP back as its source; the TTL as the kernel's forwarding left it).
/// Anything else goes on untouched, a malformed datagram too (the kernel checked what it
/// forwards on the way in, so one that is malformed is not what a flow's reply is).
fn leaving(net: &Net, model: &Model, f: &[u8]) -> Expect {
    let v = parse(f);
    let Some(ip) = &v.ip else {
        return Expect::pass(R_NOT_IP, format!("ethertype {:#06x}", v.ethertype));
    };
    let Some(t) = ip.tuple() else {
        return Expect::pass(R_NOT_NETFILTER_REPLY, format!("protocol {}", ip.proto));
    };
    let detail = format!("{}:{} -> {}:{}", t.0, t.1, t.2, t.3);
    if !ip.malformed.is_empty() || ip.fragment || ip.unsupported_extension {
        return Expect::pass(R_MALFORMED, detail);
    }
    // The kernel sends no frame from a group MAC; the shared parser passes one untouched.
    if is_group_mac(&v.src_mac) {
        return Expect::pass(R_L2, detail);
    }
    match model.by_reply.get(&t) {
        Some(id) if net.netfilter_into(model.flows[*id].backend.0) => Expect {
            reply: Some(*id),
            ..Expect::new(R_REPLY_NETFILTER, detail)
        },
        _ => Expect::pass(R_NOT_NETFILTER_REPLY, detail),
    }
}

#[allow(clippy::too_many_arguments)]
fn transport(
    net: &Net,
    model: &Model,
    prog: Prog,
    ip: &Ip,
    to_vip: bool,
    to_node: bool,
    service: Option<usize>,
) -> Expect {
    let Some(t) = ip.tuple() else {
        // The oracle's parser found the header complete; unreachable in practice.
        return Expect::pass(R_NOT_OURS, "no transport header".into());
    };
    let ttl_low = ip.ttl <= 1;
    if prog == Prog::Uplink
        && let Some(si) = service
    {
        let svc = &net.services[si];
        let flags = ip.tcp_flags();
        let syn = t.4 == TCP && flags & (SYN | ACK) == SYN;
        let rst = svc.rst && syn && !ip.extended;
        let mut rate = vec![];
        if svc.policy.is_some() {
            rate.extend(RATE_LIMITED);
        }
        let detail = format!("{} {}:{} -> {}", svc.name, t.0, t.1, service_addr(svc));
        if ttl_low {
            let mut c = vec!["drop_ttl_exceeded"];
            c.extend(rate);
            // Over the egress MTU (every device here has 1500) as well: either check may come
            // first.
            if ip.len > 1500 {
                c.push("drop_too_big");
            }
            let mut e = Expect::drop(R_TTL, format!("TTL {}; {detail}", ip.ttl), c);
            e.rst = rst;
            e.pass = to_node;
            return e;
        }
        // Flows that keep the client's address (preserve-client-ip, or into a `netfilter` pod).
        let keeps_client = |b: &(IpAddr, u16)| !svc.snat || net.netfilter_into(b.0);
        if svc.backends.iter().any(keeps_client) {
            let existing = model.by_client.get(&t).map(|id| &model.flows[*id]);
            let renew = existing.is_none_or(|fl| fl.closing && syn);
            let clash = |b: &(IpAddr, u16)| {
                keeps_client(b)
                    && model
                        .by_reply
                        .get(&(b.0, b.1, t.0, t.1, t.4))
                        .is_some_and(|id| model.flows[*id].client != t)
            };
            if renew && svc.backends.iter().all(clash) {
                // Must be refused; a forward is still judged (and learned) as one, so the
                // model follows what the data path did and `check_forward` names the clash.
                let mut c = vec!["drop_flow_clash"];
                c.extend(rate);
                let mut e = Expect::drop(R_CLASH, detail, c);
                e.rst = rst;
                e.pass = to_node;
                e.forward = Some(si);
                return e;
            }
        }
        return Expect {
            forward: Some(si),
            rst,
            drop: true,
            pass: to_node,
            ..Expect::new(R_CLIENT, detail)
        };
    }
    if to_vip && prog == Prog::Uplink {
        return Expect::drop(
            R_NO_SERVICE,
            format!("{}:{} proto {}", t.2, t.3, t.4),
            vec!["drop_no_service"],
        );
    }
    if let Some(id) = model.by_reply.get(&t) {
        let detail = format!("{}:{} -> {}:{}", t.0, t.1, t.2, t.3);
        if prog == Prog::Backend && net.netfilter_into(model.flows[*id].backend.0) {
            // The kernel forwards it (conntrack and the forward rules see it); `lb_uplink_out`
            // translates it on the way out.
            return Expect::pass(R_REPLY_NETFILTER, detail);
        }
        if ttl_low {
            return Expect {
                pass: true,
                ..Expect::drop(
                    R_TTL,
                    format!("TTL {}; {detail}", ip.ttl),
                    vec!["drop_ttl_exceeded"],
                )
            };
        }
        return Expect {
            reply: Some(*id),
            pass: true,
            drop: true,
            ..Expect::new(R_REPLY, detail)
        };
    }
    if to_vip {
        // A pod's packet to a VIP (hairpin): the spec does not cover lb_backend here.
        return Expect {
            pass: true,
            ..Expect::drop(R_POD_TO_VIP, format!("{} -> {}", t.0, t.2), vec![])
        };
    }
    Expect::pass(
        R_UNTRACKED,
        format!("{}:{} -> {}:{} proto {}", t.0, t.1, t.2, t.3, t.4),
    )
}

fn service_addr(s: &Svc) -> String {
    match s.vip {
        IpAddr::V4(a) => format!("{a}:{}", s.port),
        IpAddr::V6(a) => format!("[{a}]:{}", s.port),
    }
}

fn icmp(model: &Model, prog: Prog, f: &[u8], ip: &Ip, to_vip: bool) -> Expect {
    // lb_backend: a pod's ICMP to a VIP may be passed too (see `expect`).
    let loose = prog == Prog::Backend;
    let Some(Upper::Icmp { kind, code }) = ip.upper else {
        return if to_vip {
            Expect::drop(
                R_MALFORMED,
                "ICMP header cut".into(),
                vec!["drop_malformed", "drop_icmp"],
            )
        } else {
            Expect::pass(R_NOT_OURS, "ICMP header cut".into())
        };
    };
    let (echo, error) = if ip.v6 {
        (kind == 128, kind == 1 || kind == 2)
    } else {
        (kind == 8, kind == 3)
    };
    if echo {
        return if to_vip && prog == Prog::Uplink {
            Expect {
                echo: true,
                drop: true,
                ..Expect::new(R_ECHO, format!("{} -> {}", ip.src, ip.dst))
            }
        } else if to_vip {
            Expect {
                pass: true,
                ..Expect::drop(R_POD_TO_VIP, "echo request".into(), vec![])
            }
        } else {
            Expect::pass(R_NOT_OURS, "echo request to a node address".into())
        };
    }
    let untranslatable = |why: String| {
        if to_vip {
            Expect {
                pass: loose,
                ..Expect::drop(R_ICMP_UNTRACKED, why, vec!["drop_icmp", "drop_malformed"])
            }
        } else {
            Expect::pass(R_ICMP_UNTRACKED, why)
        }
    };
    if !error {
        return if to_vip {
            Expect {
                pass: loose,
                ..Expect::drop(
                    R_ICMP_OTHER,
                    format!("type {kind} code {code}"),
                    vec!["drop_icmp"],
                )
            }
        } else {
            Expect::pass(
                R_NOT_OURS,
                format!("ICMP type {kind} to a node address or client"),
            )
        };
    }
    let q = match wire::quote(f, ip) {
        Ok(q) => q,
        Err(why) => return untranslatable(why.into()),
    };
    // §2 asks only that the quoted header and 8 bytes of its transport header lie inside the
    // datagram; a quoted header whose version is wrong may be translated or not.
    let odd_version = !q.version_ok;
    let (qs, qsp, qd, qdp, proto) = q.tuple;
    let reverse = (qd, qdp, qs, qsp, proto);
    let found = model
        .by_client
        .get(&reverse)
        .map(|id| (*id, About::Reply))
        .or_else(|| model.by_reply.get(&reverse).map(|id| (*id, About::Forward)));
    let Some((id, about)) = found else {
        return untranslatable(format!("quotes {qs}:{qsp} -> {qd}:{qdp}, no flow"));
    };
    let detail = format!("type {kind} code {code} about {qs}:{qsp} -> {qd}:{qdp} ({about:?})");
    if ip.ttl <= 1 {
        return Expect {
            pass: !to_vip || loose,
            ..Expect::drop(R_TTL, detail, vec!["drop_ttl_exceeded", "drop_icmp"])
        };
    }
    if odd_version {
        let mut e = untranslatable(format!(
            "quoted IP version wrong, about {qs}:{qsp} -> {qd}:{qdp}"
        ));
        e.icmp = Some((id, about));
        e.drop = true;
        return e;
    }
    Expect {
        icmp: Some((id, about)),
        drop: true,
        pass: !to_vip || loose,
        ..Expect::new(R_ICMP_TRACKED, detail)
    }
}

type Violations = Vec<(String, String)>;

fn push(v: &mut Violations, rule: &str, detail: String) {
    v.push((rule.to_string(), detail));
}

/// Judges a frame the data path sent on (or passed rewritten) against what `e` allows and the
/// model as it was before the frame.
pub fn check_output(
    net: &Net,
    model: &Model,
    prog: Prog,
    e: &Expect,
    input: &[u8],
    output: &[u8],
    passed_rewritten: bool,
) -> Violations {
    let mut v = Violations::new();
    let iv = parse(input);
    let ov = parse(output);
    // Passed marked for `lb_uplink_tc`, which redirects it past the kernel's forwarding: the
    // data path decremented the TTL, as for a frame it sends.
    let passed_rewritten = passed_rewritten && ov.src_mac != lb_common::HANDOFF_MAC;
    let got = if passed_rewritten {
        "passed rewritten"
    } else {
        "sent"
    };
    let (Some(iip), Some(oip)) = (&iv.ip, &ov.ip) else {
        let why = if e.may_send() {
            "§3 output is no IP packet".to_string()
        } else {
            format!("{} -> {got}", e.reason)
        };
        push(&mut v, &why, format!("{} ({})", e.reason, e.detail));
        return v;
    };
    let is_rst =
        oip.proto == TCP && oip.tcp_flags() & RST != 0 && oip.dst == iip.src && oip.src == iip.dst;
    let is_echo = matches!(oip.upper, Some(Upper::Icmp { kind: 0 | 129, .. }))
        && matches!(iip.upper, Some(Upper::Icmp { kind: 8 | 128, .. }));
    if !e.may_send() || (is_rst && !e.rst) || (is_echo && !e.echo) {
        let what = if is_rst && e.forward.is_some() {
            "answered with a RST (a SYN with IPv4 options or IPv6 extension headers, or no SYN)"
        } else if is_rst {
            "answered with a RST"
        } else if is_echo {
            "answered with an echo reply"
        } else {
            got
        };
        push(&mut v, &format!("{} -> {what}", e.reason), e.detail.clone());
        return v;
    }
    // (`lb_uplink_out` writes no MACs: the kernel chose them.)
    if is_group_mac(&ov.src_mac) && prog != Prog::Out {
        push(
            &mut v,
            "§3 group source MAC on an output frame",
            wire::hex(&ov.src_mac),
        );
    }
    if is_rst {
        check_rst(&mut v, &iv, iip, output, &ov, oip);
    } else if e.echo {
        check_echo(&mut v, input, &iv, iip, output, &ov, oip);
    } else if let Some(si) = e.forward {
        check_forward(
            &mut v,
            net,
            model,
            si,
            input,
            &iv,
            iip,
            output,
            &ov,
            oip,
            passed_rewritten,
        );
    } else if let Some(id) = e.reply {
        let fl = &model.flows[id];
        let (c, cp, vip, vp, _) = fl.client;
        check_rewrite(&mut v, input, &iv, iip, output, &ov, oip, passed_rewritten);
        let ends = |f: &Flow| (f.client.2, f.client.3, f.client.0, f.client.1);
        if let Some((os, osp, od, odp, _)) = oip.tuple()
            && !candidates(model, id)
                .iter()
                .any(|f| ends(&model.flows[*f]) == (os, osp, od, odp))
        {
            push(
                &mut v,
                "§3 reply not translated to its flow's client",
                format!("got {os}:{osp} -> {od}:{odp}, want {vip}:{vp} -> {c}:{cp}"),
            );
        }
    } else if let Some((id, about)) = e.icmp {
        // The candidate the output fits best.
        let mut best: Option<Violations> = None;
        for f in candidates(model, id) {
            let mut w = Violations::new();
            let fl = model.flows[f].clone();
            check_icmp(
                &mut w,
                &fl,
                about,
                input,
                &iv,
                iip,
                output,
                &ov,
                oip,
                passed_rewritten,
            );
            if best.as_ref().is_none_or(|b| w.len() < b.len()) {
                best = Some(w);
            }
        }
        v.extend(best.unwrap_or_default());
    }
    v
}

/// The flows that may own flow `id`'s reply entry (itself first).
fn candidates(model: &Model, id: usize) -> Vec<usize> {
    let mut c = vec![id];
    if let Some(all) = model.reply_flows.get(&model.flows[id].reply_key()) {
        c.extend(all.iter().copied().filter(|f| *f != id));
    }
    c
}

/// Offsets (relative to the IP header) a rewrite of addresses, ports and TTL may change.
fn rewrite_mask(ip: &Ip, l3: usize) -> Vec<Range<usize>> {
    let mut m = if ip.v6 {
        vec![7..8, 8..40]
    } else {
        vec![8..9, 10..12, 12..20]
    };
    let l4 = ip.l4 - l3;
    let dgram = ip.end - l3;
    m.push(l4..l4 + 4);
    let c = l4 + if ip.proto == TCP { 16 } else { 6 };
    if c + 2 <= dgram {
        m.push(c..c + 2);
    }
    m
}

/// The first byte (relative to the IP headers) where the datagrams and what follows them
/// differ outside `mask`; `None` if they do not.
fn first_diff(a: &[u8], b: &[u8], mask: &[Range<usize>]) -> Option<usize> {
    (0..a.len().max(b.len()))
        .find(|i| !mask.iter().any(|r| r.contains(i)) && a.get(*i) != b.get(*i))
}

/// Names the part of the datagram a relative offset lies in.
fn region(ip: &Ip, l3: usize, at: usize, l4_header: usize) -> &'static str {
    let l4 = ip.l4 - l3;
    if at >= ip.end - l3 {
        "after the datagram"
    } else if at < l4 {
        "IP header"
    } else if at < l4 + l4_header {
        "transport header"
    } else {
        "payload"
    }
}

fn l4_header_len(ip: &Ip) -> usize {
    match ip.upper {
        Some(Upper::Tcp { header_len, .. }) => header_len,
        _ => 8,
    }
}

fn compare(
    v: &mut Violations,
    i: &[u8],
    iv: &View,
    iip: &Ip,
    o: &[u8],
    ov: &View,
    mask: &[Range<usize>],
) {
    let a = &i[iv.l3..];
    let b = &o[ov.l3..];
    if a.len() != b.len() {
        push(
            v,
            "§3 datagram length (or the bytes after it) changed",
            format!("{} bytes from the IP header in, {} out", a.len(), b.len()),
        );
        return;
    }
    if let Some(at) = first_diff(a, b, mask) {
        let r = region(iip, iv.l3, at, l4_header_len(iip));
        let icmp = iip.proto == iip.icmp_proto();
        let rule = match r {
            "after the datagram" => "§2 bytes after the datagram changed",
            "payload" if icmp => "§2/§3 quoted packet bytes changed that the translation must keep",
            "payload" => "§3 payload changed",
            _ => "§3 header bytes changed that the rewrite must keep",
        };
        push(
            v,
            rule,
            format!(
                "{r}, offset {at} from the IP header: {:#04x} -> {:#04x}",
                a[at], b[at]
            ),
        );
    }
}

fn check_ip_header(v: &mut Violations, o: &[u8], ov: &View, oip: &Ip) {
    if !oip.v6 && !valid(&o[ov.l3..ov.l3 + oip.header_len], 0) {
        push(v, "§3 IPv4 header checksum invalid", String::new());
    }
}

fn check_ttl(v: &mut Violations, iip: &Ip, oip: &Ip, passed_rewritten: bool) {
    let want = if passed_rewritten {
        iip.ttl
    } else {
        iip.ttl.wrapping_sub(1)
    };
    if iip.ttl <= 1 && !passed_rewritten {
        push(
            v,
            "§3 forwarded with TTL/hop limit <= 1",
            format!("TTL {}", iip.ttl),
        );
    } else if oip.ttl != want {
        push(
            v,
            "§3 TTL/hop limit not one less",
            format!("in {}, out {}, want {want}", iip.ttl, oip.ttl),
        );
    }
}

/// Structure, bytes, TTL and checksums of an in-place rewrite (forward or reply).
#[allow(clippy::too_many_arguments)]
fn check_rewrite(
    v: &mut Violations,
    i: &[u8],
    iv: &View,
    iip: &Ip,
    o: &[u8],
    ov: &View,
    oip: &Ip,
    passed_rewritten: bool,
) -> bool {
    if oip.v6 != iip.v6 || oip.proto != iip.proto || oip.l4 - ov.l3 != iip.l4 - iv.l3 {
        push(
            v,
            "§3 output is not the input's datagram rewritten",
            String::new(),
        );
        return false;
    }
    compare(v, i, iv, iip, o, ov, &rewrite_mask(iip, iv.l3));
    check_ttl(v, iip, oip, passed_rewritten);
    check_ip_header(v, o, ov, oip);
    let (a, b) = (
        wire::l4_checksum_valid(i, iip),
        wire::l4_checksum_valid(o, oip),
    );
    if a != b {
        let name = |x: Option<bool>| match x {
            None => "0 (none)",
            Some(true) => "valid",
            Some(false) => "invalid",
        };
        push(
            v,
            "§3 L4 checksum validity changed",
            format!("{} -> {}", name(a), name(b)),
        );
    }
    true
}

#[allow(clippy::too_many_arguments)]
fn check_forward(
    v: &mut Violations,
    net: &Net,
    model: &Model,
    si: usize,
    i: &[u8],
    iv: &View,
    iip: &Ip,
    o: &[u8],
    ov: &View,
    oip: &Ip,
    passed_rewritten: bool,
) {
    if !check_rewrite(v, i, iv, iip, o, ov, oip, passed_rewritten) {
        return;
    }
    let svc = &net.services[si];
    let (Some(it), Some(ot)) = (iip.tuple(), oip.tuple()) else {
        return;
    };
    let (os, osp, od, odp, _) = ot;
    if !svc.backends.contains(&(od, odp)) {
        push(
            v,
            "§3 destination is not a backend of the service",
            format!("{od}:{odp} for {}", svc.name),
        );
        return;
    }
    let netfilter = net.netfilter_into(od);
    if netfilter && !passed_rewritten {
        push(
            v,
            "§3 a netfilter pod's packet not passed to the kernel's forwarding",
            format!("{od}:{odp} for {}", svc.name),
        );
    }
    let snat = if svc.snat && !netfilter {
        if os != snat_addr(iip.v6) || !snat_port(osp) {
            push(
                v,
                "§3 snat source is not a node snat address and port",
                format!("{os}:{osp}"),
            );
            return;
        }
        Some((os, osp))
    } else {
        if (os, osp) != (it.0, it.1) {
            push(
                v,
                "§3 preserve-client-ip changed the source",
                format!("{}:{} -> {os}:{osp}", it.0, it.1),
            );
            return;
        }
        None
    };
    let syn = it.4 == TCP && iip.tcp_flags() & (SYN | ACK) == SYN;
    if let Some(id) = model.by_client.get(&it).copied() {
        let fl = &model.flows[id];
        if fl.backend == (od, odp) && fl.snat == snat {
            return;
        }
        if !(fl.closing && syn) {
            push(
                v,
                "§6 a live flow's packet left by another backend or snat port",
                format!(
                    "flow to {:?} snat {:?}, packet to {od}:{odp} snat {snat:?}",
                    fl.backend, fl.snat
                ),
            );
            return;
        }
    }
    let flow = Flow {
        svc: si,
        client: it,
        backend: (od, odp),
        snat,
        closing: false,
    };
    if let Some(other) = model.by_reply.get(&flow.reply_key())
        && model.flows[*other].client != it
    {
        let o = &model.flows[*other];
        push(
            v,
            "§6 new flow took a live flow's reply entry",
            format!(
                "{:?} and live {:?} both answer as {:?}",
                flow.client,
                o.client,
                flow.reply_key()
            ),
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn check_echo(v: &mut Violations, i: &[u8], iv: &View, iip: &Ip, o: &[u8], ov: &View, oip: &Ip) {
    if oip.v6 != iip.v6 || oip.l4 - ov.l3 != iip.l4 - iv.l3 {
        push(
            v,
            "echo reply is not the request turned around",
            String::new(),
        );
        return;
    }
    if (oip.src, oip.dst) != (iip.dst, iip.src) {
        push(
            v,
            "echo reply addresses are not the request's swapped",
            format!("{} -> {}", oip.src, oip.dst),
        );
    }
    if oip.ttl != 64 {
        push(v, "answer TTL/hop limit is not 64", format!("{}", oip.ttl));
    }
    let l4 = iip.l4 - iv.l3;
    let mut mask = if iip.v6 {
        vec![7..8, 8..40]
    } else {
        vec![8..9, 10..12, 12..20]
    };
    mask.push(l4..l4 + 1);
    mask.push(l4 + 2..l4 + 4);
    compare(v, i, iv, iip, o, ov, &mask);
    check_ip_header(v, o, ov, oip);
    if wire::l4_checksum_valid(i, iip) != wire::l4_checksum_valid(o, oip) {
        push(
            v,
            "echo reply ICMP checksum validity changed",
            String::new(),
        );
    }
    if ov.dst_mac != iv.src_mac {
        push(
            v,
            "answer not addressed to the sender's MAC",
            wire::hex(&ov.dst_mac),
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn check_rst(v: &mut Violations, iv: &View, iip: &Ip, o: &[u8], ov: &View, oip: &Ip) {
    if iip.extended {
        push(
            v,
            "RST answers a SYN with IPv4 options or IPv6 extension headers",
            String::new(),
        );
    }
    let (
        Some(Upper::Tcp {
            sport,
            dport,
            seq,
            ack,
            header_len,
            flags,
        }),
        Some(Upper::Tcp {
            sport: osp,
            dport: odp,
            seq: oseq,
            ack: oack,
            header_len: ohl,
            flags: oflags,
        }),
    ) = (iip.upper, oip.upper)
    else {
        push(v, "RST is not TCP", String::new());
        return;
    };
    if (osp, odp) != (dport, sport) {
        push(
            v,
            "RST ports are not the SYN's swapped",
            format!("{osp} -> {odp}"),
        );
    }
    if ohl != 20 {
        push(
            v,
            "RST carries TCP options",
            format!("data offset {}", ohl / 4),
        );
    }
    if oip.ttl != 64 {
        push(v, "answer TTL/hop limit is not 64", format!("{}", oip.ttl));
    }
    let payload = iip.l4_len().saturating_sub(header_len) as u32;
    let want = if flags & ACK != 0 {
        (RST, ack, None)
    } else {
        let len = payload + u32::from(flags & SYN != 0) + u32::from(flags & FIN != 0);
        (RST | ACK, 0, Some(seq.wrapping_add(len)))
    };
    if oflags != want.0 || oseq != want.1 || (want.2.is_some() && Some(oack) != want.2) {
        push(
            v,
            "RST flags or sequence numbers wrong",
            format!(
                "flags {oflags:#04x} seq {oseq} ack {oack}, want flags {:#04x} seq {} ack {:?}",
                want.0, want.1, want.2
            ),
        );
    }
    if oip.end.saturating_sub(oip.l4) != 20 || !oip.malformed.is_empty() {
        push(
            v,
            "RST datagram malformed or longer than its header",
            format!(
                "{:?}, {} bytes of TCP",
                oip.malformed,
                oip.end.saturating_sub(oip.l4)
            ),
        );
    }
    check_ip_header(v, o, ov, oip);
    if wire::l4_checksum_valid(o, oip) != Some(true) {
        push(v, "RST TCP checksum invalid", String::new());
    }
    if ov.dst_mac != iv.src_mac {
        push(
            v,
            "answer not addressed to the sender's MAC",
            wire::hex(&ov.dst_mac),
        );
    }
}

/// The ones' complement sum a quoted transport checksum keeps through translation: addresses,
/// ports and the checksum field (the rest of its coverage is not rewritten).
fn quoted_sum(f: &[u8], q: &wire::Quote) -> u16 {
    let addrs = if q.v6 {
        q.l3 + 8..q.l3 + 40
    } else {
        q.l3 + 12..q.l3 + 20
    };
    let acc = sum(&f[addrs], 0);
    let acc = sum(&f[q.l4..q.l4 + 4], acc);
    let acc = acc + u64::from(be16(f, q.check_at));
    match fold(acc) {
        0 => 0xffff,
        x => x,
    }
}

#[allow(clippy::too_many_arguments)]
fn check_icmp(
    v: &mut Violations,
    fl: &Flow,
    about: About,
    i: &[u8],
    iv: &View,
    iip: &Ip,
    o: &[u8],
    ov: &View,
    oip: &Ip,
    passed_rewritten: bool,
) {
    if oip.v6 != iip.v6 || oip.proto != iip.proto || oip.l4 - ov.l3 != iip.l4 - iv.l3 {
        push(
            v,
            "§3 output is not the input's ICMP error translated",
            String::new(),
        );
        return;
    }
    let (c, cp, vip, vp, _) = fl.client;
    let (b, bp, to, tp, _) = fl.reply_key();
    // The quoted packet as the other end sent it; the error goes to that end.
    let (want_quote, want_dst, endpoint, endpoint_new) = match about {
        About::Reply => ((b, bp, to, tp), b, c, to),
        About::Forward => ((c, cp, vip, vp), c, b, vip),
    };
    let (Ok(iq), Ok(oq)) = (wire::quote(i, iip), wire::quote(o, oip)) else {
        push(
            v,
            "translated ICMP error lost its quoted packet",
            String::new(),
        );
        return;
    };
    let (qs, qsp, qd, qdp, _) = oq.tuple;
    if (qs, qsp, qd, qdp) != want_quote {
        push(
            v,
            "§3 quoted packet not translated to the other end's view",
            format!("got {qs}:{qsp} -> {qd}:{qdp}, want {want_quote:?}"),
        );
    }
    if oip.dst != want_dst {
        push(
            v,
            "§3 ICMP error not sent to the flow's other end",
            format!("to {}, want {want_dst}", oip.dst),
        );
    }
    let src_ok = oip.src == iip.src || (iip.src == endpoint && oip.src == endpoint_new);
    if !src_ok {
        push(
            v,
            "§3 ICMP error source rewritten wrongly",
            format!("{} -> {}", iip.src, oip.src),
        );
    }
    let l3 = iv.l3;
    let l4 = iip.l4 - l3;
    let q3 = iq.l3 - l3;
    let q4 = iq.l4 - l3;
    let mut mask = if iip.v6 {
        vec![7..8, 8..40]
    } else {
        vec![8..9, 10..12, 12..20]
    };
    mask.push(l4 + 2..l4 + 4);
    if iq.v6 {
        mask.push(q3 + 8..q3 + 40);
    } else {
        mask.push(q3 + 10..q3 + 20);
    }
    mask.push(q4..q4 + 4);
    if iq.check_inside {
        let c = iq.check_at - l3;
        mask.push(c..c + 2);
    }
    compare(v, i, iv, iip, o, ov, &mask);
    check_ttl(v, iip, oip, passed_rewritten);
    check_ip_header(v, o, ov, oip);
    if wire::l4_checksum_valid(i, iip) != wire::l4_checksum_valid(o, oip) {
        push(
            v,
            "§3 ICMP checksum validity changed by the translation",
            format!(
                "in {:?}, out {:?}",
                wire::l4_checksum_valid(i, iip),
                wire::l4_checksum_valid(o, oip)
            ),
        );
    }
    if !iq.v6 {
        let a = valid(&i[iq.l3..iq.l3 + iq.header_len], 0);
        let b = valid(&o[oq.l3..oq.l3 + oq.header_len], 0);
        if a != b {
            push(
                v,
                "quoted IPv4 header checksum validity changed",
                format!("{a} -> {b}"),
            );
        }
    }
    if iq.check_inside {
        let zero_udp = !iq.v6 && iq.proto == UDP && be16(i, iq.check_at) == 0;
        if zero_udp {
            if be16(o, oq.check_at) != 0 {
                push(
                    v,
                    "quoted IPv4 UDP checksum 0 did not stay 0",
                    String::new(),
                );
            }
        } else if quoted_sum(i, &iq) != quoted_sum(o, &oq) {
            push(
                v,
                "quoted transport checksum not updated with the translation",
                format!(
                    "{:#06x} -> {:#06x}",
                    be16(i, iq.check_at),
                    be16(o, oq.check_at)
                ),
            );
        }
    }
}
