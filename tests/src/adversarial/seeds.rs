//! Valid frames of every kind the data path meets: clients' TCP and UDP to each service type,
//! backends' replies in both modes (remote ones on the uplink, the local pod's on its veth),
//! ICMP errors about tracked and untracked flows in both directions, echo requests, VLAN-tagged
//! frames and traffic that is not ours. Stateful seeds build on the oracle's model: a reply or
//! an ICMP error is made from a flow whose creation the oracle saw (its client's first packet
//! was run and its output read), so backend and snat port are the real ones.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    Lab, ONLINK_CLIENTS, Prog, Rng, client_mac,
    oracle::Flow,
    wire::{ACK, Build, FIN, L4, PSH, RST, SYN, TCP, UDP, ip_part},
};
use crate::kernel::{GW_MAC, POD_MAC};

pub struct Seed {
    pub kind: &'static str,
    pub prog: Prog,
    pub bytes: Vec<u8>,
    /// Valid as it is: the spec lets it through (see `Frame::must_send`).
    pub must_send: bool,
}

#[derive(Clone, Copy)]
enum Kind {
    ClientTcp4,
    ClientTcp6,
    ClientUdp4,
    ClientUdp6,
    Limited,
    Clash,
    ReplyUplink,
    ReplyPod,
    IcmpAboutReply,
    IcmpAboutForward,
    IcmpUntracked,
    IcmpFromPod,
    Echo,
    Vlan,
    NotOurs,
    PodOwn,
}

const KINDS: &[(Kind, u32)] = &[
    (Kind::ClientTcp4, 14),
    (Kind::ClientTcp6, 10),
    (Kind::ClientUdp4, 6),
    (Kind::ClientUdp6, 5),
    (Kind::Limited, 6),
    (Kind::Clash, 3),
    (Kind::ReplyUplink, 10),
    (Kind::ReplyPod, 9),
    (Kind::IcmpAboutReply, 6),
    (Kind::IcmpAboutForward, 4),
    (Kind::IcmpUntracked, 3),
    (Kind::IcmpFromPod, 3),
    (Kind::Echo, 5),
    (Kind::Vlan, 4),
    (Kind::NotOurs, 4),
    (Kind::PodOwn, 2),
];

pub fn generate(lab: &Lab, rng: &mut Rng) -> Seed {
    // While the pod is `netfilter`, also what the kernel sends out of the uplink.
    if lab.net.netfilter
        && rng.percent(20)
        && let Some(s) = leaving(lab, rng)
    {
        return s;
    }
    let kind = rng.weighted(KINDS);
    let seed = match kind {
        Kind::ClientTcp4 => Some(client(lab, rng, "client tcp v4", |s| {
            s.proto == TCP && !s.vip.is_ipv6() && s.policy.is_none()
        })),
        Kind::ClientTcp6 => Some(client(lab, rng, "client tcp v6", |s| {
            s.proto == TCP && s.vip.is_ipv6() && s.policy.is_none()
        })),
        Kind::ClientUdp4 => Some(client(lab, rng, "client udp v4", |s| {
            s.proto == UDP && !s.vip.is_ipv6()
        })),
        Kind::ClientUdp6 => Some(client(lab, rng, "client udp v6", |s| {
            s.proto == UDP && s.vip.is_ipv6()
        })),
        Kind::Limited => Some(client(lab, rng, "client to a rate-limited service", |s| {
            s.policy.is_some()
        })),
        Kind::Clash => clash(lab, rng),
        Kind::ReplyUplink => reply_uplink(lab, rng),
        Kind::ReplyPod => reply_pod(lab, rng),
        Kind::IcmpAboutReply => icmp_about_reply(lab, rng),
        Kind::IcmpAboutForward => icmp_about_forward(lab, rng),
        Kind::IcmpUntracked => Some(icmp_untracked(lab, rng)),
        Kind::IcmpFromPod => icmp_from_pod(lab, rng),
        Kind::Echo => Some(echo(lab, rng)),
        Kind::Vlan => {
            let mut s = client(lab, rng, "vlan-tagged client", |s| s.policy.is_none());
            let vid = *rng.pick(&[7u16, 100]);
            let tci = (rng.range(0, 7) as u16) << 13 | vid;
            s.bytes
                .splice(12..12, [0x81, 0x00, (tci >> 8) as u8, tci as u8]);
            Some(s)
        }
        Kind::NotOurs => Some(not_ours(lab, rng)),
        Kind::PodOwn => Some(pod_own(lab, rng)),
    };
    // Stateful seeds need a flow first: a client's packet makes one.
    seed.unwrap_or_else(|| {
        client(lab, rng, "client tcp v4", |s| {
            s.proto == TCP && s.policy.is_none()
        })
    })
}

/// A client address of the family: on the uplink's subnet (with a neighbour entry) or beyond
/// the gateway; `policy`: also from the "limits" policy's exempt, deny and override prefixes.
pub fn client_addr(rng: &mut Rng, v6: bool, policy: bool) -> IpAddr {
    let choice = rng.below(if policy { 6 } else { 3 });
    let n = ONLINK_CLIENTS.start()
        + rng.below((ONLINK_CLIENTS.end() - ONLINK_CLIENTS.start() + 1) as usize) as u8;
    let r = rng.u64();
    if v6 {
        let host = (r & 0xffff) as u16 | 1;
        IpAddr::V6(match choice {
            0 => Ipv6Addr::new(0xfd00, 0xa, 0, 0, 0, 0, 0, u16::from(n)),
            1 | 2 => Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, (r >> 16) as u16, host),
            3 => Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, host),
            4 => Ipv6Addr::new(0x2001, 0xdb8, 0xd, 0, 0, 0, 0, host),
            _ => Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, host),
        })
    } else {
        IpAddr::V4(match choice {
            0 => Ipv4Addr::new(10, 0, 0, n),
            1 => Ipv4Addr::new(203, 0, 113, rng.range(1, 254) as u8),
            2 => Ipv4Addr::new(198, 51, 100, rng.range(100, 199) as u8),
            3 => Ipv4Addr::new(198, 51, 100, rng.range(0, 15) as u8),
            4 => Ipv4Addr::new(198, 51, 100, rng.range(16, 31) as u8),
            _ => Ipv4Addr::new(198, 51, 100, rng.range(32, 47) as u8),
        })
    }
}

/// The MAC a client's frames come from: its own on the subnet, else the gateway's.
fn mac_of(a: IpAddr) -> [u8; 6] {
    match a {
        IpAddr::V4(a) if a.octets()[..3] == [10, 0, 0] => client_mac(a.octets()[3]),
        IpAddr::V6(a) if a.segments()[..7] == [0xfd00, 0xa, 0, 0, 0, 0, 0] => {
            client_mac(a.segments()[7] as u8)
        }
        _ => GW_MAC,
    }
}

fn ttl(rng: &mut Rng) -> u8 {
    if rng.percent(80) {
        64
    } else {
        rng.range(2, 255) as u8
    }
}

fn tcp_flags(rng: &mut Rng) -> (u8, bool) {
    // (flags, carries data)
    rng.weighted(&[
        ((SYN, false), 35),
        ((ACK | PSH, true), 25),
        ((ACK, false), 15),
        ((FIN | ACK, false), 10),
        ((RST, false), 5),
        ((RST | ACK, false), 3),
        ((SYN | ACK, false), 2),
    ])
}

fn transport(rng: &mut Rng, proto: u8, sport: u16, dport: u16) -> (L4, Vec<u8>) {
    if proto == TCP {
        let (flags, data) = tcp_flags(rng);
        let len = if data { rng.range(1, 200) as usize } else { 0 };
        (
            L4::Tcp {
                sport,
                dport,
                seq: rng.u64() as u32,
                ack: if flags & ACK != 0 {
                    rng.u64() as u32
                } else {
                    0
                },
                flags,
            },
            rng.bytes(len),
        )
    } else {
        // Now and then more than the uplink's MTU (1500) takes: the FIB says so after the
        // flow was made (§7).
        let len = if rng.percent(3) {
            rng.range(1440, 1700) as usize
        } else {
            rng.range(0, 200) as usize
        };
        (L4::Udp { sport, dport }, rng.bytes(len))
    }
}

fn client(
    lab: &Lab,
    rng: &mut Rng,
    kind: &'static str,
    filter: impl Fn(&super::oracle::Svc) -> bool,
) -> Seed {
    let candidates: Vec<usize> = (0..lab.net.services.len())
        .filter(|i| filter(&lab.net.services[*i]))
        .collect();
    let si = *rng.pick(&candidates);
    let svc = &lab.net.services[si];
    let v6 = svc.vip.is_ipv6();
    // Mostly the tuple of a flow the data path has (established path), else a new one.
    let known = lab.model.by_service.get(&si).filter(|l| !l.is_empty());
    let (c, cp) = match known {
        Some(list) if rng.percent(60) => {
            let f = &lab.model.flows[*rng.pick(list)];
            if f.clean(&lab.net) {
                (f.client.0, f.client.1)
            } else {
                let c = client_addr(rng, v6, svc.policy.is_some());
                (c, rng.range(1024, 65535) as u16)
            }
        }
        _ => (
            client_addr(rng, v6, svc.policy.is_some()),
            rng.range(1024, 65535) as u16,
        ),
    };
    let (l4, payload) = transport(rng, svc.proto, cp, svc.port);
    let b = Build {
        dst_mac: lab.net.up0_mac,
        src_mac: mac_of(c),
        vlan: None,
        src: c,
        dst: svc.vip,
        ttl: ttl(rng),
        l4,
        payload,
    };
    let bytes = b.frame();
    Seed {
        kind,
        prog: Prog::Uplink,
        // Within the MTU: a larger datagram may not be forwarded (nor fragmented).
        must_send: svc.policy.is_none() && bytes.len() <= 14 + 1500,
        bytes,
    }
}

/// A SYN from the client address and port of a flow to one preserve-client-ip VIP, to the
/// other VIP on the same pod port (issue 10 E).
fn clash(lab: &Lab, rng: &mut Rng) -> Option<Seed> {
    let pairs = [("pres-a", "pres-b"), ("pres-a6", "pres-b6")];
    let (a, b) = *rng.pick(&pairs);
    let (a, b) = if rng.percent(50) { (a, b) } else { (b, a) };
    let ia = lab.net.services.iter().position(|s| s.name == a)?;
    let ib = lab.net.services.iter().position(|s| s.name == b)?;
    let list = lab.model.by_service.get(&ia)?;
    let f = &lab.model.flows[*rng.pick(list)];
    if !f.clean(&lab.net) {
        return None;
    }
    let svc = &lab.net.services[ib];
    let bytes = Build {
        dst_mac: lab.net.up0_mac,
        src_mac: mac_of(f.client.0),
        vlan: None,
        src: f.client.0,
        dst: svc.vip,
        ttl: 64,
        l4: L4::Tcp {
            sport: f.client.1,
            dport: svc.port,
            seq: rng.u64() as u32,
            ack: 0,
            flags: SYN,
        },
        payload: vec![],
    }
    .frame();
    Some(Seed {
        kind: "SYN clashing with a live flow",
        prog: Prog::Uplink,
        bytes,
        must_send: false,
    })
}

fn pick_flow<'a>(lab: &'a Lab, rng: &mut Rng, want: impl Fn(&Flow) -> bool) -> Option<&'a Flow> {
    let n = lab.model.flows.len();
    if n == 0 {
        return None;
    }
    // Sample rather than scan: the model holds tens of thousands of flows.
    (0..32)
        .map(|_| &lab.model.flows[rng.below(n)])
        .find(|f| f.clean(&lab.net) && want(f))
}

fn is_local(lab: &Lab, a: IpAddr) -> bool {
    lab.net.local_backends.contains(&a)
}

fn reply_transport(rng: &mut Rng, proto: u8, sport: u16, dport: u16) -> (L4, Vec<u8>) {
    if proto == TCP {
        let (flags, data) = rng.weighted(&[
            ((ACK | PSH, true), 45),
            ((ACK, false), 25),
            ((SYN | ACK, false), 15),
            ((FIN | ACK, false), 10),
            ((RST | ACK, false), 5),
        ]);
        let len = if data { rng.range(1, 300) as usize } else { 0 };
        (
            L4::Tcp {
                sport,
                dport,
                seq: rng.u64() as u32,
                ack: rng.u64() as u32,
                flags,
            },
            rng.bytes(len),
        )
    } else {
        let len = rng.range(0, 300) as usize;
        (L4::Udp { sport, dport }, rng.bytes(len))
    }
}

/// A remote backend's reply to a snat flow: backend -> node:port, on the uplink.
fn reply_uplink(lab: &Lab, rng: &mut Rng) -> Option<Seed> {
    let f = pick_flow(lab, rng, |f| {
        f.snat.is_some() && !is_local(lab, f.backend.0)
    })?;
    let (b, bp, to, tp, proto) = f.reply_key();
    let (l4, payload) = reply_transport(rng, proto, bp, tp);
    let bytes = Build {
        dst_mac: lab.net.up0_mac,
        src_mac: GW_MAC,
        vlan: None,
        src: b,
        dst: to,
        ttl: ttl(rng),
        l4,
        payload,
    }
    .frame();
    Some(Seed {
        kind: "snat reply on the uplink",
        prog: Prog::Uplink,
        bytes,
        must_send: true,
    })
}

/// The local pod's reply, either mode: pod -> client (preserve) or pod -> node:port (snat).
fn reply_pod(lab: &Lab, rng: &mut Rng) -> Option<Seed> {
    let f = pick_flow(lab, rng, |f| is_local(lab, f.backend.0))?;
    let (b, bp, to, tp, proto) = f.reply_key();
    let (l4, payload) = reply_transport(rng, proto, bp, tp);
    let bytes = Build {
        dst_mac: lab.net.pod0_mac,
        src_mac: POD_MAC,
        vlan: None,
        src: b,
        dst: to,
        ttl: ttl(rng),
        l4,
        payload,
    }
    .frame();
    Some(Seed {
        kind: if f.snat.is_some() {
            "pod reply, snat"
        } else {
            "pod reply, preserve-client-ip"
        },
        prog: Prog::Backend,
        bytes,
        must_send: true,
    })
}

/// The packet an ICMP error quotes: `src:sport -> dst:dport`, cut after 8 bytes of its
/// transport header or whole.
fn quoted(rng: &mut Rng, t: (IpAddr, u16, IpAddr, u16, u8)) -> Vec<u8> {
    let (l4, _) = if t.4 == TCP {
        transport(rng, TCP, t.1, t.3)
    } else {
        (
            L4::Udp {
                sport: t.1,
                dport: t.3,
            },
            vec![],
        )
    };
    let n = rng.range(0, 16) as usize;
    let payload = rng.bytes(n);
    let frame = Build {
        dst_mac: [0; 6],
        src_mac: [0; 6],
        vlan: None,
        src: t.0,
        dst: t.2,
        ttl: 63,
        l4,
        payload,
    }
    .frame();
    let ip = ip_part(&frame).to_vec();
    let header = if t.0.is_ipv6() { 40 } else { 20 };
    if rng.percent(50) {
        ip[..header + 8].to_vec()
    } else {
        ip
    }
}

/// An ICMP error quoting `quoted`: "fragmentation needed"/"packet too big", or port/host
/// unreachable. Returns the ICMP header and its payload (the quote).
fn icmp_error(rng: &mut Rng, v6: bool, quoted: Vec<u8>) -> (L4, Vec<u8>) {
    let mtu = rng.range(1280, 1480) as u16;
    let l4 = if v6 {
        if rng.percent(60) {
            L4::Icmp {
                kind: 2,
                code: 0,
                rest: u32::from(mtu).to_be_bytes(),
            }
        } else {
            L4::Icmp {
                kind: 1,
                code: *rng.pick(&[0u8, 3, 4]),
                rest: [0; 4],
            }
        }
    } else if rng.percent(60) {
        L4::Icmp {
            kind: 3,
            code: 4,
            rest: [0, 0, (mtu >> 8) as u8, mtu as u8],
        }
    } else {
        L4::Icmp {
            kind: 3,
            code: *rng.pick(&[0u8, 1, 3]),
            rest: [0; 4],
        }
    };
    (l4, quoted)
}

fn router(rng: &mut Rng, v6: bool, backend_side: bool) -> IpAddr {
    let s = match (v6, backend_side) {
        (false, false) => *rng.pick(&["10.0.0.254", "192.0.2.1", "203.0.113.254"]),
        (true, false) => *rng.pick(&["fd00:a::fe", "2001:db8:ffff::1"]),
        (false, true) => *rng.pick(&["10.1.0.1", "10.0.0.2"]),
        (true, true) => *rng.pick(&["fd00:1::1", "fd00:a::2"]),
    };
    s.parse().expect("router")
}

/// An error about a packet we sent to a client (VIP -> client), from a router on the way or
/// from the client itself, to the VIP: it belongs to the flow's backend.
fn icmp_about_reply(lab: &Lab, rng: &mut Rng) -> Option<Seed> {
    let f = pick_flow(lab, rng, |_| true)?;
    let (c, cp, vip, vp, proto) = f.client;
    let v6 = c.is_ipv6();
    let q = quoted(rng, (vip, vp, c, cp, proto));
    let from = if rng.percent(30) {
        c
    } else {
        router(rng, v6, false)
    };
    let (l4, payload) = icmp_error(rng, v6, q);
    let bytes = Build {
        dst_mac: lab.net.up0_mac,
        src_mac: GW_MAC,
        vlan: None,
        src: from,
        dst: vip,
        ttl: ttl(rng),
        l4,
        payload,
    }
    .frame();
    Some(Seed {
        kind: "ICMP error about a reply",
        prog: Prog::Uplink,
        bytes,
        must_send: true,
    })
}

/// An error about a packet we sent to a remote backend (node:port -> backend), to the node.
fn icmp_about_forward(lab: &Lab, rng: &mut Rng) -> Option<Seed> {
    let f = pick_flow(lab, rng, |f| {
        f.snat.is_some() && !is_local(lab, f.backend.0)
    })?;
    let (b, bp, to, tp, proto) = f.reply_key();
    let v6 = b.is_ipv6();
    let q = quoted(rng, (to, tp, b, bp, proto));
    let from = if rng.percent(30) {
        b
    } else {
        router(rng, v6, true)
    };
    let (l4, payload) = icmp_error(rng, v6, q);
    let bytes = Build {
        dst_mac: lab.net.up0_mac,
        src_mac: GW_MAC,
        vlan: None,
        src: from,
        dst: to,
        ttl: ttl(rng),
        l4,
        payload,
    }
    .frame();
    Some(Seed {
        kind: "ICMP error about a forwarded packet",
        prog: Prog::Uplink,
        bytes,
        must_send: true,
    })
}

/// An error quoting a packet of no flow, to a VIP or a node address.
fn icmp_untracked(lab: &Lab, rng: &mut Rng) -> Seed {
    let v6 = rng.percent(40);
    let svc = loop {
        let s = rng.pick(&lab.net.services);
        if s.vip.is_ipv6() == v6 {
            break s;
        }
    };
    let c = client_addr(rng, v6, false);
    let cp = rng.range(1024, 65535) as u16;
    let q = quoted(rng, (svc.vip, svc.port, c, cp, svc.proto));
    let (l4, payload) = icmp_error(rng, v6, q);
    let bytes = Build {
        dst_mac: lab.net.up0_mac,
        src_mac: GW_MAC,
        vlan: None,
        src: router(rng, v6, false),
        dst: svc.vip,
        ttl: 64,
        l4,
        payload,
    }
    .frame();
    Seed {
        kind: "ICMP error about no flow",
        prog: Prog::Uplink,
        bytes,
        must_send: false,
    }
}

/// The pod's own error about a packet it got: port unreachable to the client (preserve) or to
/// the node (snat).
fn icmp_from_pod(lab: &Lab, rng: &mut Rng) -> Option<Seed> {
    let f = pick_flow(lab, rng, |f| is_local(lab, f.backend.0))?;
    let (b, bp, to, tp, proto) = f.reply_key();
    let v6 = b.is_ipv6();
    let q = quoted(rng, (to, tp, b, bp, proto));
    let (l4, payload) = icmp_error(rng, v6, q);
    let bytes = Build {
        dst_mac: lab.net.pod0_mac,
        src_mac: POD_MAC,
        vlan: None,
        src: b,
        dst: to,
        ttl: 64,
        l4,
        payload,
    }
    .frame();
    Some(Seed {
        kind: "ICMP error from the pod",
        prog: Prog::Backend,
        bytes,
        must_send: false,
    })
}

fn echo(lab: &Lab, rng: &mut Rng) -> Seed {
    let v6 = rng.percent(40);
    let (dst, to_vip) = match rng.below(4) {
        0 => (
            if v6 { "fd00:a::1" } else { "10.0.0.1" }
                .parse()
                .expect("addr"),
            false,
        ),
        1 => (
            if v6 { "fd00:a::99" } else { "10.0.0.99" }
                .parse()
                .expect("addr"),
            false,
        ),
        _ => (
            *rng.pick(
                &lab.net
                    .vips
                    .iter()
                    .copied()
                    .filter(|a| a.is_ipv6() == v6)
                    .collect::<Vec<_>>(),
            ),
            true,
        ),
    };
    let src = client_addr(rng, v6, false);
    let id = rng.u64() as u16;
    let seq = rng.u64() as u16;
    let n = rng.range(0, 64) as usize;
    let payload = rng.bytes(n);
    let bytes = Build {
        dst_mac: lab.net.up0_mac,
        src_mac: mac_of(src),
        vlan: None,
        src,
        dst,
        ttl: ttl(rng),
        l4: L4::Icmp {
            kind: if v6 { 128 } else { 8 },
            code: 0,
            rest: [(id >> 8) as u8, id as u8, (seq >> 8) as u8, seq as u8],
        },
        payload,
    }
    .frame();
    Seed {
        kind: if to_vip {
            "echo request to a VIP"
        } else {
            "echo request, not to a VIP"
        },
        prog: Prog::Uplink,
        bytes,
        must_send: to_vip,
    }
}

/// Traffic on the uplink that is not ours: other hosts, the node's own ports, ARP, IPv6
/// neighbour discovery, LLDP, a VIP's port without a service.
fn not_ours(lab: &Lab, rng: &mut Rng) -> Seed {
    let up0 = lab.net.up0_mac;
    let bytes = match rng.below(7) {
        0 => {
            // ARP request for the node's address.
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&client_mac(11));
            f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
            f.extend_from_slice(&client_mac(11));
            f.extend_from_slice(&[10, 0, 0, 11, 0, 0, 0, 0, 0, 0, 10, 0, 0, 1]);
            f.resize(60, 0);
            f
        }
        1 => {
            // Neighbour solicitation for the node's address.
            let mut f = Build {
                dst_mac: [0x33, 0x33, 0xff, 0, 0, 1],
                src_mac: client_mac(12),
                vlan: None,
                src: "fd00:a::12".parse().expect("addr"),
                dst: "ff02::1:ff00:1".parse().expect("addr"),
                ttl: 255,
                l4: L4::Icmp {
                    kind: 135,
                    code: 0,
                    rest: [0; 4],
                },
                payload: "fd00:a::1"
                    .parse::<Ipv6Addr>()
                    .expect("addr")
                    .octets()
                    .to_vec(),
            }
            .frame();
            super::wire::fixup(&mut f, true, true);
            f
        }
        2 => {
            let mut f = vec![0x01, 0x80, 0xc2, 0, 0, 0x0e];
            f.extend_from_slice(&GW_MAC);
            f.extend_from_slice(&[0x88, 0xcc]);
            f.extend(rng.bytes(46));
            f
        }
        k => {
            let v6 = rng.percent(40);
            let (dst, dport, proto) = match (k, v6) {
                (3, false) => ("10.0.0.99", 80, TCP),
                (3, true) => ("fd00:a::99", 80, TCP),
                (4, false) => ("10.0.0.1", 22, TCP),
                (4, true) => ("fd00:a::1", 22, TCP),
                (5, false) => ("8.8.8.8", 53, UDP),
                (5, true) => ("2001:4860::8888", 53, UDP),
                (_, false) => ("10.96.0.10", 81, TCP),
                (_, true) => ("fd00:96::53", 54, UDP),
            };
            let src = client_addr(rng, v6, false);
            let sport = rng.range(1024, 65535) as u16;
            let (l4, payload) = transport(rng, proto, sport, dport);
            Build {
                dst_mac: up0,
                src_mac: mac_of(src),
                vlan: None,
                src,
                dst: dst.parse().expect("addr"),
                ttl: 64,
                l4,
                payload,
            }
            .frame()
        }
    };
    Seed {
        kind: "not ours (uplink)",
        prog: Prog::Uplink,
        bytes,
        must_send: false,
    }
}

/// The pod's own traffic (no flow of ours): to the internet, to the node, to another pod.
fn pod_own(lab: &Lab, rng: &mut Rng) -> Seed {
    let v6 = rng.percent(40);
    let src: IpAddr = if v6 { "fd00:1:9::2" } else { "10.1.9.2" }
        .parse()
        .expect("addr");
    let dst: IpAddr = match (rng.below(3), v6) {
        (0, false) => "93.184.216.34",
        (0, true) => "2001:db8:1::1234",
        (1, false) => "10.0.0.1",
        (1, true) => "fd00:a::1",
        (_, false) => "10.1.2.2",
        (_, true) => "fd00:1:2::2",
    }
    .parse()
    .expect("addr");
    let proto = if rng.percent(60) { TCP } else { UDP };
    let sport = rng.range(1024, 65535) as u16;
    let dport = *rng.pick(&[443u16, 10250, 53]);
    let (l4, payload) = transport(rng, proto, sport, dport);
    let bytes = Build {
        dst_mac: lab.net.pod0_mac,
        src_mac: POD_MAC,
        vlan: None,
        src,
        dst,
        ttl: 64,
        l4,
        payload,
    }
    .frame();
    Seed {
        kind: "pod's own traffic",
        prog: Prog::Backend,
        bytes,
        must_send: false,
    }
}

/// What the kernel sends out of the uplink while the pod is `netfilter`: mostly a `netfilter`
/// flow's reply as the kernel forwarded it (the node's MAC to the next hop's, TTL one less),
/// sometimes the pod's own traffic.
fn leaving(lab: &Lab, rng: &mut Rng) -> Option<Seed> {
    let (kind, mut bytes) = if rng.percent(20) {
        (
            "pod's own traffic leaving the uplink",
            pod_own(lab, rng).bytes,
        )
    } else {
        let f = pick_flow(lab, rng, |f| lab.net.netfilter_into(f.backend.0))?;
        let (b, bp, to, tp, proto) = f.reply_key();
        let (l4, payload) = reply_transport(rng, proto, bp, tp);
        let frame = Build {
            dst_mac: [0; 6],
            src_mac: [0; 6],
            vlan: None,
            src: b,
            dst: to,
            ttl: ttl(rng) - 1,
            l4,
            payload,
        }
        .frame();
        ("netfilter reply leaving the uplink", frame)
    };
    let to = super::wire::parse(&bytes).ip.map(|ip| ip.dst)?;
    bytes[0..6].copy_from_slice(&mac_of(to));
    bytes[6..12].copy_from_slice(&lab.net.up0_mac);
    Some(Seed {
        kind,
        prog: Prog::Out,
        bytes,
        must_send: kind == "netfilter reply leaving the uplink",
    })
}
