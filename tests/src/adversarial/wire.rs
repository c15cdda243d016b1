//! The oracle's own reading of frames: a strict parser written from the RFCs and the length
//! rules of DATAPATH-SPEC §2 (it shares no code with the data path's parser), internet
//! checksums, a frame builder for seeds, and the checksum fix-up that mutations use to keep a
//! frame consistent everywhere except where they break it on purpose.
use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;
pub const ETH_VLAN: u16 = 0x8100;
pub const ETH_QINQ: u16 = 0x88a8;
pub const ETH_ARP: u16 = 0x0806;

pub const ICMP: u8 = 1;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMPV6: u8 = 58;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// IPv6 next-header values of extension headers.
pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const ESP: u8 = 50;
pub const AH: u8 = 51;
pub const NO_NEXT: u8 = 59;
pub const DEST_OPTIONS: u8 = 60;
pub const MOBILITY: u8 = 135;
/// Extension headers §2 says to drop (to a VIP): routing, AH, ESP, mobility, no-next, and the
/// ones without a parser here (HIP, shim6, experimental).
pub const UNSUPPORTED_EXTENSIONS: [u8; 9] =
    [ROUTING, ESP, AH, NO_NEXT, MOBILITY, 139, 140, 253, 254];

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// One's complement sum of `data` as big-endian 16-bit words (an odd last byte padded with
/// zero), added to `acc` without folding.
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The pseudo-header sum of TCP, UDP and ICMPv6 (RFC 793, RFC 8200 §8.1).
pub fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
    let acc = sum(&octets(src), 0);
    let acc = sum(&octets(dst), acc);
    acc + u64::from(proto) + (len as u64 >> 16) + (len as u64 & 0xffff)
}

pub fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Is the checksum over `data` (checksum field included) plus `acc` valid?
pub fn valid(data: &[u8], acc: u64) -> bool {
    fold(sum(data, acc)) == 0xffff
}

pub fn is_group_mac(mac: &[u8; 6]) -> bool {
    mac[0] & 1 != 0
}

pub fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(2 * b.len()), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

pub fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

/// A frame as the oracle reads it.
#[derive(Clone, Debug)]
pub struct View {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// TCI of the one 802.1Q tag read (a second tag leaves the frame "not IP").
    pub vlan: Option<u16>,
    /// EtherType after the tag.
    pub ethertype: u16,
    /// Offset of the IP header.
    pub l3: usize,
    /// `None`: not IPv4/IPv6, or the fixed IP header (with the addresses) is not all there.
    pub ip: Option<Ip>,
}

#[derive(Clone, Debug)]
pub struct Ip {
    pub v6: bool,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    /// IPv4 header length (20..60) or 40.
    pub header_len: usize,
    /// Where the datagram ends by its length field (absolute; may lie past the frame).
    pub end: usize,
    /// The datagram's length by its length field.
    pub len: usize,
    /// The upper-layer header (after IPv6 extension headers) and its protocol. Located even
    /// in a malformed datagram where possible, for the model's lenient reads.
    pub l4: usize,
    pub proto: u8,
    /// IPv4 options or IPv6 extension headers present.
    pub extended: bool,
    pub fragment: bool,
    pub unsupported_extension: bool,
    /// Why the datagram is malformed by §2; empty: it is not.
    pub malformed: Vec<&'static str>,
    /// The upper-layer header as far as the frame holds it.
    pub upper: Option<Upper>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upper {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        /// Data offset in bytes.
        header_len: usize,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
        len: u16,
        check: u16,
    },
    Icmp {
        kind: u8,
        code: u8,
    },
}

impl Ip {
    /// (src, sport, dst, dport, proto) of a TCP/UDP header the frame holds, malformed or not.
    pub fn tuple(&self) -> Option<Tuple> {
        match self.upper? {
            Upper::Tcp { sport, dport, .. } => Some((self.src, sport, self.dst, dport, TCP)),
            Upper::Udp { sport, dport, .. } => Some((self.src, sport, self.dst, dport, UDP)),
            Upper::Icmp { .. } => None,
        }
    }

    pub fn tcp_flags(&self) -> u8 {
        match self.upper {
            Some(Upper::Tcp { flags, .. }) => flags,
            _ => 0,
        }
    }

    /// The upper-layer length the datagram gives (0 if its length is shorter than the headers).
    pub fn l4_len(&self) -> usize {
        self.end.saturating_sub(self.l4)
    }

    pub fn icmp_proto(&self) -> u8 {
        if self.v6 { ICMPV6 } else { ICMP }
    }
}

/// (source, source port, destination, destination port, protocol).
pub type Tuple = (IpAddr, u16, IpAddr, u16, u8);

pub fn parse(f: &[u8]) -> View {
    let mut v = View {
        dst_mac: [0; 6],
        src_mac: [0; 6],
        vlan: None,
        ethertype: 0,
        l3: 14,
        ip: None,
    };
    if f.len() < 14 {
        return v;
    }
    v.dst_mac.copy_from_slice(&f[0..6]);
    v.src_mac.copy_from_slice(&f[6..12]);
    v.ethertype = be16(f, 12);
    if v.ethertype == ETH_VLAN {
        if f.len() < 18 {
            v.ethertype = 0;
            return v;
        }
        v.vlan = Some(be16(f, 14));
        v.ethertype = be16(f, 16);
        v.l3 = 18;
    }
    v.ip = match v.ethertype {
        ETH_IPV4 => parse_v4(f, v.l3),
        ETH_IPV6 => parse_v6(f, v.l3),
        _ => None,
    };
    v
}

fn parse_v4(f: &[u8], l3: usize) -> Option<Ip> {
    if f.len() < l3 + 20 {
        return None;
    }
    let h = &f[l3..];
    let header_len = usize::from(h[0] & 0x0f) * 4;
    let total = usize::from(be16(h, 2));
    let mut ip = Ip {
        v6: false,
        src: IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
        dst: IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
        ttl: h[8],
        header_len,
        end: l3 + total,
        len: total,
        l4: l3 + header_len.max(20),
        proto: h[9],
        extended: header_len > 20,
        fragment: be16(h, 6) & 0x3fff != 0,
        unsupported_extension: false,
        malformed: Vec::new(),
        upper: None,
    };
    if h[0] >> 4 != 4 {
        ip.malformed.push("IPv4 version is not 4");
    }
    if header_len < 20 {
        ip.malformed.push("IPv4 IHL < 5");
    }
    if total < header_len.max(20) {
        ip.malformed
            .push("IPv4 total length shorter than the header");
    }
    if h.len() < total {
        ip.malformed
            .push("frame shorter than the IPv4 total length");
    }
    if header_len >= 20 && h.len() >= header_len && !valid(&h[..header_len], 0) {
        ip.malformed.push("IPv4 header checksum invalid");
    }
    if !ip.fragment {
        upper(f, &mut ip);
    }
    Some(ip)
}

fn parse_v6(f: &[u8], l3: usize) -> Option<Ip> {
    if f.len() < l3 + 40 {
        return None;
    }
    let h = &f[l3..];
    let addr = |at: usize| {
        let mut a = [0u8; 16];
        a.copy_from_slice(&h[at..at + 16]);
        IpAddr::V6(Ipv6Addr::from(a))
    };
    let payload = usize::from(be16(h, 4));
    let mut ip = Ip {
        v6: true,
        src: addr(8),
        dst: addr(24),
        ttl: h[7],
        header_len: 40,
        end: l3 + 40 + payload,
        len: 40 + payload,
        l4: l3 + 40,
        proto: h[6],
        extended: false,
        fragment: false,
        unsupported_extension: false,
        malformed: Vec::new(),
        upper: None,
    };
    if h[0] >> 4 != 6 {
        ip.malformed.push("IPv6 version is not 6");
    }
    if payload == 0 {
        ip.malformed.push("IPv6 payload length 0");
    }
    if h.len() < 40 + payload {
        ip.malformed
            .push("frame shorter than the IPv6 payload length");
    }
    // The extension chain: it must lie within the datagram (and the frame, to be read at all).
    let mut first = true;
    loop {
        match ip.proto {
            HOP_BY_HOP | DEST_OPTIONS => {
                ip.extended = true;
                if ip.proto == HOP_BY_HOP && !first {
                    ip.malformed.push("IPv6 hop-by-hop header not first");
                }
                if ip.l4 + 2 > ip.end {
                    ip.malformed.push("IPv6 extension header past the datagram");
                }
                if ip.l4 + 2 > f.len() {
                    return Some(ip);
                }
                let len = (usize::from(f[ip.l4 + 1]) + 1) * 8;
                if ip.l4 + len > ip.end {
                    ip.malformed.push("IPv6 extension header past the datagram");
                }
                // Walked on within the frame for the lenient reads (a data path may read on).
                if ip.l4 + len > f.len() {
                    return Some(ip);
                }
                ip.proto = f[ip.l4];
                ip.l4 += len;
                first = false;
            }
            FRAGMENT => {
                ip.extended = true;
                ip.fragment = true;
                if ip.l4 + 8 > ip.end {
                    ip.malformed.push("IPv6 extension header past the datagram");
                }
                return Some(ip);
            }
            p if UNSUPPORTED_EXTENSIONS.contains(&p) => {
                ip.extended = true;
                ip.unsupported_extension = true;
                return Some(ip);
            }
            _ => break,
        }
    }
    upper(f, &mut ip);
    Some(ip)
}

/// Reads the upper-layer header as far as the frame holds it and applies §2's rules against
/// the datagram's length.
fn upper(f: &[u8], ip: &mut Ip) {
    let at = ip.l4;
    let have = f.len().saturating_sub(at);
    let len = ip.l4_len();
    match ip.proto {
        TCP => {
            if have >= 14 {
                ip.upper = Some(Upper::Tcp {
                    sport: be16(f, at),
                    dport: be16(f, at + 2),
                    seq: be32(f, at + 4),
                    ack: be32(f, at + 8),
                    header_len: usize::from(f[at + 12] >> 4) * 4,
                    flags: f[at + 13],
                });
            }
            if len < 20 {
                ip.malformed.push("TCP header past the datagram");
            } else if have >= 13 {
                let offset = usize::from(f[at + 12] >> 4);
                if offset < 5 {
                    ip.malformed.push("TCP data offset < 5");
                } else if offset * 4 > len {
                    ip.malformed.push("TCP data offset past the datagram");
                }
            }
        }
        UDP => {
            if have >= 8 {
                ip.upper = Some(Upper::Udp {
                    sport: be16(f, at),
                    dport: be16(f, at + 2),
                    len: be16(f, at + 4),
                    check: be16(f, at + 6),
                });
            }
            if len < 8 {
                ip.malformed.push("UDP header past the datagram");
            } else if have >= 8 {
                let ulen = usize::from(be16(f, at + 4));
                if ulen < 8 {
                    ip.malformed.push("UDP length < 8");
                } else if ulen > len {
                    ip.malformed.push("UDP length past the datagram");
                }
                if ip.v6 && be16(f, at + 6) == 0 {
                    ip.malformed.push("IPv6 UDP checksum 0");
                }
            }
        }
        p if p == ip.icmp_proto() => {
            if have >= 2 {
                ip.upper = Some(Upper::Icmp {
                    kind: f[at],
                    code: f[at + 1],
                });
            }
            // Every ICMP message has its 8-byte header.
            if len < 8 {
                ip.malformed
                    .push("ICMP message shorter than its 8-byte header");
            }
        }
        _ => {}
    }
}

/// The packet quoted by an ICMP error, read as §2 says it must lie: the quoted IP header plus 8
/// bytes of its TCP/UDP header inside the datagram.
#[derive(Clone, Debug)]
pub struct Quote {
    pub l3: usize,
    pub l4: usize,
    pub v6: bool,
    pub proto: u8,
    pub tuple: Tuple,
    /// Offset of the quoted transport checksum, and whether it lies inside the datagram.
    pub check_at: usize,
    pub check_inside: bool,
    /// The quoted IP header's length (IPv4 header checksum coverage).
    pub header_len: usize,
    /// The transport length the quoted IP header claims (its pseudo-header's length).
    pub l4_len: usize,
    /// The quoted header's version is the outer one's.
    pub version_ok: bool,
}

pub fn quote(f: &[u8], ip: &Ip) -> Result<Quote, &'static str> {
    let q = ip.l4 + 8;
    let end = ip.end.min(f.len());
    let (header_len, proto, src, dst, l4_len) = if ip.v6 {
        if q + 40 > end {
            return Err("quoted IPv6 header past the datagram");
        }
        let addr = |at: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&f[at..at + 16]);
            IpAddr::V6(Ipv6Addr::from(a))
        };
        (
            40,
            f[q + 6],
            addr(q + 8),
            addr(q + 24),
            usize::from(be16(f, q + 4)),
        )
    } else {
        if q + 20 > end {
            return Err("quoted IPv4 header past the datagram");
        }
        let header_len = usize::from(f[q] & 0x0f) * 4;
        if header_len < 20 {
            return Err("quoted IPv4 IHL < 5");
        }
        let v4 = |at: usize| IpAddr::V4(Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]));
        let total = usize::from(be16(f, q + 2));
        (
            header_len,
            f[q + 9],
            v4(q + 12),
            v4(q + 16),
            total.saturating_sub(header_len),
        )
    };
    if proto != TCP && proto != UDP {
        return Err("quoted protocol is not TCP/UDP");
    }
    let l4 = q + header_len;
    if l4 + 8 > end {
        return Err("quoted transport header shorter than 8 bytes in the datagram");
    }
    let check_at = l4 + if proto == TCP { 16 } else { 6 };
    Ok(Quote {
        l3: q,
        l4,
        v6: ip.v6,
        proto,
        tuple: (src, be16(f, l4), dst, be16(f, l4 + 2), proto),
        check_at,
        check_inside: check_at + 2 <= ip.end,
        header_len,
        l4_len,
        version_ok: f[q] >> 4 == if ip.v6 { 6 } else { 4 },
    })
}

/// Validity of the transport checksum of a well-formed datagram: `None` for IPv4 UDP without
/// a checksum (0).
pub fn l4_checksum_valid(f: &[u8], ip: &Ip) -> Option<bool> {
    let end = ip.end.min(f.len());
    if ip.l4 > end {
        return Some(false);
    }
    let data = &f[ip.l4..end];
    match ip.proto {
        UDP if !ip.v6 && data.len() >= 8 && be16(data, 6) == 0 => None,
        TCP | UDP => Some(valid(data, pseudo(ip.src, ip.dst, ip.proto, data.len()))),
        ICMPV6 if ip.v6 => Some(valid(data, pseudo(ip.src, ip.dst, ICMPV6, data.len()))),
        ICMP if !ip.v6 => Some(valid(data, 0)),
        _ => Some(true),
    }
}

/// Recomputes the IPv4 header checksum (`ip_header`) and the transport checksum (`l4`) of
/// whatever the frame says, as far as the frame holds the bytes. IPv4 UDP without a checksum
/// keeps none. Works on malformed frames too (mutations break one thing, not everything).
pub fn fixup(f: &mut [u8], ip_header: bool, l4: bool) {
    let v = parse(f);
    let Some(ip) = v.ip else { return };
    if !ip.v6 && ip_header && ip.header_len >= 20 && f.len() >= v.l3 + ip.header_len {
        let l3 = v.l3;
        put16(f, l3 + 10, 0);
        let c = !fold(sum(&f[l3..l3 + ip.header_len], 0));
        put16(f, l3 + 10, c);
    }
    if !l4 || ip.fragment {
        return;
    }
    let end = ip.end.min(f.len());
    if ip.l4 > end {
        return;
    }
    let (at, acc) = match ip.proto {
        TCP => (16, pseudo(ip.src, ip.dst, TCP, end - ip.l4)),
        UDP => (6, pseudo(ip.src, ip.dst, UDP, end - ip.l4)),
        ICMPV6 if ip.v6 => (2, pseudo(ip.src, ip.dst, ICMPV6, end - ip.l4)),
        ICMP if !ip.v6 => (2, 0),
        _ => return,
    };
    if ip.l4 + at + 2 > end {
        return;
    }
    if ip.proto == UDP && !ip.v6 && be16(f, ip.l4 + 6) == 0 {
        return;
    }
    put16(f, ip.l4 + at, 0);
    let mut c = !fold(sum(&f[ip.l4..end], acc));
    if ip.proto == UDP && c == 0 {
        c = 0xffff;
    }
    put16(f, ip.l4 + at, c);
}

/// Recomputes the checksums of the packet an ICMP error quotes (its IPv4 header, and its
/// transport checksum over what is quoted), then the ICMP checksum: a consistent error about
/// a (possibly changed) quoted packet.
pub fn fixup_quote(f: &mut [u8]) {
    let v = parse(f);
    let Some(ip) = v.ip else { return };
    let q = ip.l4 + 8;
    let end = ip.end.min(f.len());
    if !ip.v6 && q + 20 <= end {
        let hl = usize::from(f[q] & 0x0f) * 4;
        if hl >= 20 && q + hl <= end {
            put16(f, q + 10, 0);
            let c = !fold(sum(&f[q..q + hl], 0));
            put16(f, q + 10, c);
        }
    }
    fixup(f, true, true);
}

/// A packet to build (the seeds' valid frames).
#[derive(Clone, Debug)]
pub struct Build {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// 802.1Q TCI.
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    pub l4: L4,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP or ICMPv6 (by the address family): type, code, the 4 bytes after the checksum.
    Icmp {
        kind: u8,
        code: u8,
        rest: [u8; 4],
    },
}

impl Build {
    pub fn frame(&self) -> Vec<u8> {
        let mut l4 = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                flags,
            } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..8].copy_from_slice(&seq.to_be_bytes());
                h[8..12].copy_from_slice(&ack.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = *flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h
            }
            L4::Udp { sport, dport } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                // Not 0 ("no checksum"): the fix-up below computes it.
                h[6..8].copy_from_slice(&[0xff, 0xff]);
                h
            }
            L4::Icmp { kind, code, rest } => {
                let mut h = vec![*kind, *code, 0, 0];
                h.extend_from_slice(rest);
                h
            }
        };
        l4.extend_from_slice(&self.payload);
        let proto = match (&self.l4, self.src) {
            (L4::Tcp { .. }, _) => TCP,
            (L4::Udp { .. }, _) => UDP,
            (L4::Icmp { .. }, IpAddr::V4(_)) => ICMP,
            (L4::Icmp { .. }, IpAddr::V6(_)) => ICMPV6,
        };
        let mut f = Vec::with_capacity(80 + l4.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some(tci) = self.vlan {
            f.extend_from_slice(&ETH_VLAN.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&ETH_IPV4.to_be_bytes());
                let mut h = [0u8; 20];
                h[0] = 0x45;
                h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
                h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
                h[6] = 0x40; // DF
                h[8] = self.ttl;
                h[9] = proto;
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                f.extend_from_slice(&h);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&ETH_IPV6.to_be_bytes());
                let mut h = [0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
                h[6] = proto;
                h[7] = self.ttl;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
                f.extend_from_slice(&h);
            }
            _ => panic!("mixed address families"),
        }
        f.extend_from_slice(&l4);
        fixup(&mut f, true, true);
        f
    }
}

/// The IP datagram of a frame (its IP header to the end of the frame), for quoting.
pub fn ip_part(frame: &[u8]) -> &[u8] {
    let v = parse(frame);
    &frame[v.l3..]
}
