//! Test packets: built with etherparse, parsed back for assertions, and checked with checksums
//! recomputed from scratch (never with the data path's incremental arithmetic).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    Icmpv4Type, Icmpv6Type, IpHeaders, Ipv4Header, Ipv4Options, PacketBuilder, SlicedPacket,
    TransportSlice, icmpv4::DestUnreachableHeader,
};
use lb_common::checksum::{fold, pseudo_header_sum, sum};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// What a test packet carries above IP.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    EchoRequest {
        id: u16,
        seq: u16,
    },
}

/// A packet to build: Ethernet (optional VLAN tag), IPv4 or IPv6 by address family, L4.
#[derive(Clone, Debug)]
pub struct Spec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    /// IPv4 options (a multiple of 4 bytes).
    pub ipv4_options: Vec<u8>,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Spec {
    pub fn new(src: &str, dst: &str, l4: L4) -> Spec {
        Spec {
            src_mac: [0x02, 0, 0, 0, 0, 0x10],
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            vlan: None,
            src: src.parse().expect("address"),
            dst: dst.parse().expect("address"),
            ttl: 64,
            ipv4_options: Vec::new(),
            l4,
            payload: b"hello".to_vec(),
        }
    }

    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Spec {
        Spec::new(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags,
                seq: 1000,
                ack: if flags & TCP_ACK != 0 { 5000 } else { 0 },
            },
        )
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Spec {
        Spec::new(src, dst, L4::Udp { sport, dport })
    }

    pub fn echo(src: &str, dst: &str) -> Spec {
        Spec::new(src, dst, L4::EchoRequest { id: 7, seq: 1 })
    }

    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Spec {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    pub fn vlan(mut self, id: u16) -> Spec {
        self.vlan = Some(id);
        self
    }

    pub fn options(mut self, options: &[u8]) -> Spec {
        self.ipv4_options = options.to_vec();
        self
    }

    pub fn payload(mut self, payload: &[u8]) -> Spec {
        self.payload = payload.to_vec();
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h = Ipv4Header::new(
                    0,
                    self.ttl,
                    etherparse::IpNumber::TCP,
                    s.octets(),
                    d.octets(),
                )
                .expect("ipv4 header");
                h.dont_fragment = true;
                h.options = Ipv4Options::try_from(self.ipv4_options.as_slice()).expect("options");
                IpHeaders::Ipv4(h, etherparse::Ipv4Extensions::default())
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => IpHeaders::Ipv6(
                etherparse::Ipv6Header {
                    traffic_class: 0,
                    flow_label: etherparse::Ipv6FlowLabel::default(),
                    payload_length: 0,
                    next_header: etherparse::IpNumber::TCP,
                    hop_limit: self.ttl,
                    source: s.octets(),
                    destination: d.octets(),
                },
                etherparse::Ipv6Extensions::default(),
            ),
            _ => panic!("mixed address families"),
        };
        let step = match self.vlan {
            Some(id) => eth
                .single_vlan(etherparse::VlanId::try_new(id).expect("vlan id"))
                .ip(ip),
            None => eth.ip(ip),
        };
        let mut out = Vec::new();
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
                ack,
            } => {
                let mut b = step.tcp(*sport, *dport, *seq, 64240);
                if flags & TCP_SYN != 0 {
                    b = b.syn();
                }
                if flags & TCP_ACK != 0 {
                    b = b.ack(*ack);
                }
                if flags & TCP_FIN != 0 {
                    b = b.fin();
                }
                if flags & TCP_RST != 0 {
                    b = b.rst();
                }
                if flags & TCP_PSH != 0 {
                    b = b.psh();
                }
                b.write(&mut out, &self.payload).expect("write");
            }
            L4::Udp { sport, dport } => {
                step.udp(*sport, *dport)
                    .write(&mut out, &self.payload)
                    .expect("write");
            }
            L4::EchoRequest { id, seq } => {
                if self.src.is_ipv4() {
                    step.icmpv4_echo_request(*id, *seq)
                        .write(&mut out, &self.payload)
                        .expect("write");
                } else {
                    step.icmpv6_echo_request(*id, *seq)
                        .write(&mut out, &self.payload)
                        .expect("write");
                }
            }
        }
        out
    }
}

/// An ICMP error from `from` to `to` quoting `quoted` (a whole frame; its IP packet is quoted,
/// cut to `quote_len` bytes): IPv4 "fragmentation needed" or IPv6 "packet too big".
pub fn icmp_too_big(from: &str, to: &str, mtu: u16, quoted: &[u8], quote_len: usize) -> Vec<u8> {
    let inner = &quoted[14..];
    let inner = &inner[..quote_len.min(inner.len())];
    let eth = PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 0x02], [0x02, 0, 0, 0, 0, 0x01]);
    let mut out = Vec::new();
    match (
        from.parse::<IpAddr>().expect("addr"),
        to.parse::<IpAddr>().expect("addr"),
    ) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth
            .ipv4(s.octets(), d.octets(), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
            ))
            .write(&mut out, inner)
            .expect("write"),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth
            .ipv6(s.octets(), d.octets(), 64)
            .icmpv6(Icmpv6Type::PacketTooBig {
                mtu: u32::from(mtu),
            })
            .write(&mut out, inner)
            .expect("write"),
        _ => panic!("mixed families"),
    }
    out
}

/// The fields tests look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub icmp_type: u8,
    pub payload: Vec<u8>,
    /// For ICMP errors: the quoted packet's (src, dst, sport, dport).
    pub quoted: Option<(IpAddr, IpAddr, u16, u16)>,
}

pub fn parse(frame: &[u8]) -> Parsed {
    let p = SlicedPacket::from_ethernet(frame).expect("parse frame");
    let eth = match &p.link {
        Some(etherparse::LinkSlice::Ethernet2(e)) => e.to_header(),
        other => panic!("no ethernet: {other:?}"),
    };
    let ids = p.vlan_ids();
    assert!(ids.len() <= 1, "more than one VLAN tag");
    let vlan = ids.first().map(|v| v.value());
    let (src, dst, ttl, proto) = match &p.net {
        Some(etherparse::NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            (
                IpAddr::V4(h.source_addr()),
                IpAddr::V4(h.destination_addr()),
                h.ttl(),
                h.protocol().0,
            )
        }
        Some(etherparse::NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            (
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
                h.hop_limit(),
                h.next_header().0,
            )
        }
        other => panic!("no ip: {other:?}"),
    };
    let mut out = Parsed {
        src_mac: eth.source,
        dst_mac: eth.destination,
        vlan,
        src,
        dst,
        ttl,
        proto,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        seq: 0,
        ack: 0,
        icmp_type: 0,
        payload: Vec::new(),
        quoted: None,
    };
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            out.sport = t.source_port();
            out.dport = t.destination_port();
            out.tcp_flags = t.slice()[13];
            out.seq = t.sequence_number();
            out.ack = t.acknowledgment_number();
            out.payload = t.payload().to_vec();
        }
        Some(TransportSlice::Udp(u)) => {
            out.sport = u.source_port();
            out.dport = u.destination_port();
            out.payload = u.payload().to_vec();
        }
        Some(TransportSlice::Icmpv4(i)) => {
            out.icmp_type = i.type_u8();
            out.payload = i.payload().to_vec();
            if out.icmp_type == 3 {
                out.quoted = quoted(i.payload(), false);
            }
        }
        Some(TransportSlice::Icmpv6(i)) => {
            out.icmp_type = i.type_u8();
            out.payload = i.payload().to_vec();
            if out.icmp_type == 1 || out.icmp_type == 2 {
                out.quoted = quoted(i.payload(), true);
            }
        }
        None => {}
    }
    out
}

fn quoted(data: &[u8], v6: bool) -> Option<(IpAddr, IpAddr, u16, u16)> {
    let (src, dst, l4) = if v6 {
        if data.len() < 44 {
            return None;
        }
        let s: [u8; 16] = data[8..24].try_into().ok()?;
        let d: [u8; 16] = data[24..40].try_into().ok()?;
        (
            IpAddr::V6(Ipv6Addr::from(s)),
            IpAddr::V6(Ipv6Addr::from(d)),
            &data[40..],
        )
    } else {
        let ihl = usize::from(*data.first()? & 0x0f) * 4;
        if data.len() < ihl + 4 {
            return None;
        }
        let s: [u8; 4] = data[12..16].try_into().ok()?;
        let d: [u8; 4] = data[16..20].try_into().ok()?;
        (
            IpAddr::V4(Ipv4Addr::from(s)),
            IpAddr::V4(Ipv4Addr::from(d)),
            &data[ihl..],
        )
    };
    Some((
        src,
        dst,
        u16::from_be_bytes([l4[0], l4[1]]),
        u16::from_be_bytes([l4[2], l4[3]]),
    ))
}

/// Checks every checksum of a frame by recomputing it over the bytes: IPv4 header, TCP/UDP
/// (pseudo-header included; IPv4 UDP may be 0 = none), ICMP, ICMPv6 (pseudo-header), and for an
/// ICMP error the quoted IPv4 header and, when quoted whole, the quoted TCP/UDP checksum.
pub fn assert_checksums(frame: &[u8]) {
    let mut l3 = 14;
    if u16::from_be_bytes([frame[12], frame[13]]) == 0x8100 {
        l3 += 4;
    }
    let ip = &frame[l3..];
    let (proto, l4, src, dst, v6) = if ip[0] >> 4 == 4 {
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        assert_eq!(fold(sum(&ip[..ihl], 0)), 0xffff, "IPv4 header checksum");
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        (ip[9], &ip[ihl..total], &ip[12..16], &ip[16..20], false)
    } else {
        let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        (ip[6], &ip[40..40 + plen], &ip[8..24], &ip[24..40], true)
    };
    check_l4(proto, l4, src, dst, v6, "");
    // ICMP errors: the quoted packet's checksums too.
    let is_error = match (proto, v6) {
        (1, false) => l4[0] == 3,
        (58, true) => l4[0] == 1 || l4[0] == 2,
        _ => false,
    };
    if is_error {
        let q = &l4[8..];
        if v6 {
            let plen = usize::from(u16::from_be_bytes([q[4], q[5]]));
            if q.len() >= 40 + plen {
                check_l4(
                    q[6],
                    &q[40..40 + plen],
                    &q[8..24],
                    &q[24..40],
                    true,
                    "quoted ",
                );
            }
        } else {
            let ihl = usize::from(q[0] & 0x0f) * 4;
            assert_eq!(
                fold(sum(&q[..ihl], 0)),
                0xffff,
                "quoted IPv4 header checksum"
            );
            let total = usize::from(u16::from_be_bytes([q[2], q[3]]));
            if q.len() >= total {
                check_l4(
                    q[9],
                    &q[ihl..total],
                    &q[12..16],
                    &q[16..20],
                    false,
                    "quoted ",
                );
            }
        }
    }
}

fn check_l4(proto: u8, l4: &[u8], src: &[u8], dst: &[u8], v6: bool, what: &str) {
    match proto {
        6 | 17 | 58 => {
            if proto == 17 && !v6 && l4[6..8] == [0, 0] {
                return;
            }
            let pseudo = pseudo_header_sum(
                src,
                dst,
                proto,
                u32::try_from(l4.len()).expect("a datagram"),
            );
            assert_eq!(
                fold(sum(l4, pseudo)),
                0xffff,
                "{what}L4 checksum (protocol {proto})"
            );
        }
        1 => assert_eq!(fold(sum(l4, 0)), 0xffff, "{what}ICMP checksum"),
        _ => {}
    }
}
