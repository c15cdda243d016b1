//! Structural mutations of seed frames: truncation at every header boundary and at random
//! lengths, bit flips and chosen or random values in every header field, IPv4 options, IPv6
//! extension chains, fragments, sources that are no client, foreign and group MACs, padding,
//! the IPv6 payload length near 0xffff (issue 10 A), IPv4-mapped addresses, low TTLs, broken
//! ICMP quotes, VLAN tags. Most mutations then recompute the checksums they did not mean to
//! break, so the frame is wrong in one way only.
use std::net::{IpAddr, Ipv6Addr};

use super::{
    Rng,
    oracle::Net,
    wire::{
        self, DEST_OPTIONS, ETH_QINQ, ETH_VLAN, FRAGMENT, HOP_BY_HOP, Ip, MOBILITY, NO_NEXT,
        ROUTING, TCP, UDP, View, be16, fixup, fixup_quote, parse, put16,
    },
};

#[derive(Clone, Copy)]
enum Family {
    TruncBoundary,
    TruncRandom,
    BitFlip,
    Field,
    Ipv4Options,
    Ipv6Extensions,
    Fragment,
    BadSource,
    Mac,
    Padding,
    PayloadLenWrap,
    Mapped,
    TtlLow,
    UdpChecksumZero,
    IpLength,
    Quote,
    Vlan,
    TcpOptions,
    Combo,
}

const FAMILIES: &[(Family, u32)] = &[
    (Family::TruncBoundary, 8),
    (Family::TruncRandom, 4),
    (Family::BitFlip, 10),
    (Family::Field, 30),
    (Family::Ipv4Options, 4),
    (Family::Ipv6Extensions, 5),
    (Family::Fragment, 3),
    (Family::BadSource, 5),
    (Family::Mac, 4),
    (Family::Padding, 4),
    (Family::PayloadLenWrap, 2),
    (Family::Mapped, 2),
    (Family::TtlLow, 4),
    (Family::UdpChecksumZero, 2),
    (Family::IpLength, 4),
    (Family::Quote, 5),
    (Family::Vlan, 3),
    (Family::TcpOptions, 2),
    (Family::Combo, 6),
];

/// A mutated copy of `seed` and the mutation's name ("family:detail").
pub fn mutate(seed: &[u8], net: &Net, rng: &mut Rng) -> (Vec<u8>, String) {
    let mut f = seed.to_vec();
    let family = rng.weighted(FAMILIES);
    let name = if let Family::Combo = family {
        let first = rng.weighted(&FAMILIES[..FAMILIES.len() - 1]);
        let a = one(&mut f, net, rng, first);
        let second = rng.weighted(&FAMILIES[..FAMILIES.len() - 1]);
        let b = one(&mut f, net, rng, second);
        format!("combo:{a}+{b}")
    } else {
        one(&mut f, net, rng, family)
    };
    // BPF_PROG_TEST_RUN takes nothing shorter than an Ethernet header.
    if f.len() < 14 {
        f.resize(14, 0);
    }
    (f, name)
}

/// Applies one mutation of `family` (or, where it does not apply, a field mutation).
fn one(f: &mut Vec<u8>, net: &Net, rng: &mut Rng, family: Family) -> String {
    let v = parse(f);
    let ip = v.ip.clone();
    let applied = match (family, &ip) {
        (Family::TruncBoundary, _) => Some(trunc_boundary(f, &v, rng)),
        (Family::TruncRandom, _) if f.len() > 14 => {
            let len = rng.range(14, f.len() as u64 - 1) as usize;
            f.truncate(len);
            Some("trunc:random".into())
        }
        (Family::BitFlip, _) => Some(bit_flip(f, &v, rng)),
        (Family::Ipv4Options, Some(ip)) if !ip.v6 && ip.header_len == 20 => {
            Some(ipv4_options(f, &v, rng))
        }
        (Family::Ipv6Extensions, Some(ip)) if ip.v6 => Some(ipv6_extensions(f, &v, rng)),
        (Family::Fragment, Some(ip)) => Some(fragment(f, &v, ip, rng)),
        (Family::BadSource, Some(ip)) => Some(bad_source(f, &v, ip, net, rng)),
        (Family::Mac, _) => Some(mac(f, rng)),
        (Family::Padding, _) => {
            let n = rng.range(1, 64) as usize;
            f.extend(rng.bytes(n));
            Some("padding".into())
        }
        (Family::PayloadLenWrap, Some(ip)) if ip.v6 => {
            let len = 0xffff - rng.range(0, 48) as u16;
            put16(f, v.l3 + 4, len);
            Some("ipv6-payload-length-near-0xffff".into())
        }
        (Family::Mapped, Some(ip)) if ip.v6 => Some(mapped(f, &v, net, rng)),
        (Family::TtlLow, Some(ip)) => {
            let at = v.l3 + if ip.v6 { 7 } else { 8 };
            f[at] = rng.range(0, 2) as u8;
            fixup(f, true, false);
            Some(format!("ttl:{}", f[at]))
        }
        (Family::UdpChecksumZero, Some(ip)) if ip.proto == UDP && f.len() >= ip.l4 + 8 => {
            put16(f, ip.l4 + 6, 0);
            Some("udp-checksum-0".into())
        }
        (Family::IpLength, Some(ip)) => Some(ip_length(f, &v, ip, rng)),
        (Family::Quote, Some(ip)) if is_error(ip) => quote(f, &v, ip, rng),
        (Family::Vlan, _) => Some(vlan(f, &v, rng)),
        (Family::TcpOptions, Some(ip))
            if ip.proto == TCP && ip.malformed.is_empty() && !ip.fragment =>
        {
            Some(tcp_options(f, ip, rng))
        }
        _ => None,
    };
    applied.unwrap_or_else(|| field(f, &v, rng))
}

fn is_error(ip: &Ip) -> bool {
    matches!(
        ip.upper,
        Some(wire::Upper::Icmp { kind, .. })
            if (!ip.v6 && kind == 3) || (ip.v6 && (kind == 1 || kind == 2))
    )
}

/// Cuts the frame at (or one byte around) a header boundary.
fn trunc_boundary(f: &mut Vec<u8>, v: &View, rng: &mut Rng) -> String {
    let mut cuts = vec![
        14,
        v.l3,
        v.l3 + 1,
        v.l3 + 4,
        v.l3 + 9,
        v.l3 + 12,
        v.l3 + 16,
        v.l3 + 20,
    ];
    if let Some(ip) = &v.ip {
        if ip.v6 {
            cuts.extend([v.l3 + 24, v.l3 + 39, v.l3 + 40]);
        }
        let l4 = ip.l4;
        cuts.extend([
            l4,
            l4 + 1,
            l4 + 2,
            l4 + 4,
            l4 + 7,
            l4 + 8,
            l4 + 13,
            l4 + 16,
            l4 + 18,
            l4 + 20,
        ]);
        cuts.extend([ip.end, ip.end.saturating_sub(1)]);
        if is_error(ip) {
            let q = l4 + 8;
            cuts.extend([
                q,
                q + 1,
                q + 19,
                q + 20,
                q + 24,
                q + 27,
                q + 28,
                q + 39,
                q + 40,
                q + 44,
                q + 47,
                q + 48,
            ]);
        }
    }
    let at = *rng.pick(&cuts);
    let at = match rng.below(3) {
        0 => at.saturating_sub(1),
        1 => at,
        _ => at + 1,
    };
    let at = at.max(14);
    if at < f.len() {
        f.truncate(at);
    }
    "trunc:boundary".to_string()
}

fn bit_flip(f: &mut [u8], v: &View, rng: &mut Rng) -> String {
    // Mostly in the headers.
    let limit =
        v.ip.as_ref()
            .map_or(f.len(), |ip| (ip.l4 + 48).min(f.len()));
    let n = rng.range(1, 3);
    for _ in 0..n {
        let at = rng.below(limit);
        f[at] ^= 1 << rng.below(8);
    }
    let how = rng.below(3);
    fixup(f, how >= 1, how == 2);
    format!("bitflip:{}", ["raw", "ip-fixed", "all-fixed"][how])
}

/// A field: (name, absolute offset, length in bytes).
fn fields(f: &[u8], v: &View) -> Vec<(&'static str, usize, usize)> {
    let mut out = vec![
        ("eth.dst", 0, 6),
        ("eth.src", 6, 6),
        ("eth.type", v.l3 - 2, 2),
    ];
    if v.vlan.is_some() {
        out.push(("vlan.tci", 14, 2));
    }
    let Some(ip) = &v.ip else { return out };
    let l3 = v.l3;
    if ip.v6 {
        out.extend([
            ("ip6.version", l3, 1),
            ("ip6.flow", l3 + 1, 3),
            ("ip6.payload_len", l3 + 4, 2),
            ("ip6.next_header", l3 + 6, 1),
            ("ip6.hop_limit", l3 + 7, 1),
            ("ip6.src", l3 + 8, 16),
            ("ip6.dst", l3 + 24, 16),
        ]);
    } else {
        out.extend([
            ("ip.version_ihl", l3, 1),
            ("ip.tos", l3 + 1, 1),
            ("ip.total_len", l3 + 2, 2),
            ("ip.id", l3 + 4, 2),
            ("ip.flags_offset", l3 + 6, 2),
            ("ip.ttl", l3 + 8, 1),
            ("ip.proto", l3 + 9, 1),
            ("ip.checksum", l3 + 10, 2),
            ("ip.src", l3 + 12, 4),
            ("ip.dst", l3 + 16, 4),
        ]);
        if ip.header_len > 20 {
            out.push(("ip.options", l3 + 20, ip.header_len - 20));
        }
    }
    let l4 = ip.l4;
    match ip.upper {
        Some(wire::Upper::Tcp { .. }) => out.extend([
            ("tcp.sport", l4, 2),
            ("tcp.dport", l4 + 2, 2),
            ("tcp.seq", l4 + 4, 4),
            ("tcp.ack", l4 + 8, 4),
            ("tcp.offset", l4 + 12, 1),
            ("tcp.flags", l4 + 13, 1),
            ("tcp.window", l4 + 14, 2),
            ("tcp.checksum", l4 + 16, 2),
            ("tcp.urgent", l4 + 18, 2),
        ]),
        Some(wire::Upper::Udp { .. }) => out.extend([
            ("udp.sport", l4, 2),
            ("udp.dport", l4 + 2, 2),
            ("udp.len", l4 + 4, 2),
            ("udp.checksum", l4 + 6, 2),
        ]),
        Some(wire::Upper::Icmp { .. }) => {
            out.extend([
                ("icmp.type", l4, 1),
                ("icmp.code", l4 + 1, 1),
                ("icmp.checksum", l4 + 2, 2),
                ("icmp.rest", l4 + 4, 4),
            ]);
            if is_error(ip) {
                let q = l4 + 8;
                if ip.v6 {
                    out.extend([
                        ("quote.version", q, 1),
                        ("quote.payload_len", q + 4, 2),
                        ("quote.next_header", q + 6, 1),
                        ("quote.src", q + 8, 16),
                        ("quote.dst", q + 24, 16),
                        ("quote.ports", q + 40, 4),
                        ("quote.l4check", q + 46, 2),
                    ]);
                } else {
                    let hl = f.get(q).map_or(20, |b| usize::from(b & 15) * 4).max(20);
                    out.extend([
                        ("quote.version_ihl", q, 1),
                        ("quote.total_len", q + 2, 2),
                        ("quote.proto", q + 9, 1),
                        ("quote.checksum", q + 10, 2),
                        ("quote.src", q + 12, 4),
                        ("quote.dst", q + 16, 4),
                        ("quote.ports", q + hl, 4),
                        ("quote.l4check", q + hl + 6, 2),
                        ("quote.tcp_check", q + hl + 16, 2),
                    ]);
                }
            }
        }
        None => {}
    }
    out.retain(|(_, at, len)| at + len <= f.len());
    out
}

/// A field set to a boundary or random value; then the checksums fixed, partly, or not.
fn field(f: &mut [u8], v: &View, rng: &mut Rng) -> String {
    let list = fields(f, v);
    let (name, at, len) = *rng.pick(&list);
    let old = f[at..at + len].to_vec();
    let new: Vec<u8> = match rng.below(7) {
        0 => vec![0; len],
        1 => vec![0xff; len],
        2 | 3 => rng.bytes(len),
        4 => {
            // One more, one less (as a big-endian number).
            let mut x = old.clone();
            let up = rng.percent(50);
            for b in x.iter_mut().rev() {
                let (n, carry) = if up {
                    b.overflowing_add(1)
                } else {
                    b.overflowing_sub(1)
                };
                *b = n;
                if !carry {
                    break;
                }
            }
            x
        }
        5 => {
            // One nibble (version, IHL, data offset live in nibbles).
            let mut x = old.clone();
            let n = rng.below(16) as u8;
            if rng.percent(50) {
                x[0] = (x[0] & 0x0f) | n << 4;
            } else {
                x[0] = (x[0] & 0xf0) | n;
            }
            x
        }
        _ => {
            let mut x = old.clone();
            let i = rng.below(len);
            x[i] ^= 1 << rng.below(8);
            x
        }
    };
    f[at..at + len].copy_from_slice(&new);
    let fix = if name.ends_with("checksum") || name.ends_with("check") {
        0
    } else {
        rng.below(3)
    };
    if name.starts_with("quote.") && fix == 2 && !name.ends_with("checksum") {
        fixup_quote(f);
    } else {
        fixup(f, fix >= 1, fix == 2);
    }
    format!("field:{name}")
}

fn ipv4_options(f: &mut Vec<u8>, v: &View, rng: &mut Rng) -> String {
    let words = rng.range(1, 10) as usize;
    let n = words * 4;
    let (kind, opts): (&str, Vec<u8>) = match rng.below(5) {
        0 => ("nop", {
            let mut o = vec![1; n - 1];
            o.push(0);
            o
        }),
        1 => ("router-alert", {
            let mut o = vec![0x94, 4, 0, 0];
            o.resize(n, 0);
            o
        }),
        2 => ("record-route", {
            let mut o = vec![7, n as u8 - 1, 4];
            o.resize(n, 0);
            o
        }),
        3 => ("bad-length", {
            let mut o = vec![7, *rng.pick(&[0u8, 1, 255, n as u8 + 4]), 4];
            o.resize(n, 0);
            o
        }),
        _ => ("random", rng.bytes(n)),
    };
    let l3 = v.l3;
    f.splice(l3 + 20..l3 + 20, opts);
    f[l3] = (f[l3] & 0xf0) | (5 + words) as u8;
    let total = be16(f, l3 + 2) as usize + n;
    put16(f, l3 + 2, total as u16);
    fixup(f, true, false);
    format!("ipv4-options:{kind}")
}

fn ipv6_extensions(f: &mut Vec<u8>, v: &View, rng: &mut Rng) -> String {
    let kinds = [
        HOP_BY_HOP,
        DEST_OPTIONS,
        ROUTING,
        FRAGMENT,
        51,
        NO_NEXT,
        MOBILITY,
        253,
    ];
    let count = rng.range(1, 3) as usize;
    let chain: Vec<u8> = (0..count).map(|_| *rng.pick(&kinds)).collect();
    let l3 = v.l3;
    // The chain goes right after the fixed header, in front of whatever was there.
    let first_next = f[l3 + 6];
    let mut bytes = Vec::new();
    let mut last = 0;
    for (i, kind) in chain.iter().enumerate() {
        let next = chain.get(i + 1).copied().unwrap_or(first_next);
        last = bytes.len();
        let h = match *kind {
            FRAGMENT => {
                let offset: u16 = if rng.percent(50) {
                    0
                } else {
                    rng.range(1, 8191) as u16
                };
                let m = u16::from(rng.percent(70));
                let mut h = vec![next, 0];
                h.extend_from_slice(&(offset << 3 | m).to_be_bytes());
                h.extend(rng.bytes(4));
                h
            }
            51 => {
                // AH: length in 4-byte units minus 2.
                let mut h = vec![next, 2];
                h.resize(16, 0);
                h
            }
            _ => {
                let units = rng.range(0, 2) as usize;
                let mut h = vec![next, units as u8];
                if *kind == ROUTING {
                    h.extend([*rng.pick(&[0u8, 2, 4]), rng.range(0, 1) as u8]);
                } else {
                    // PadN over the rest.
                    h.extend([1, (units * 8 + 4) as u8]);
                }
                h.resize((units + 1) * 8, 0);
                h
            }
        };
        bytes.extend(h);
    }
    // Sometimes the last header claims more than the datagram holds.
    let past = chain[count - 1] != FRAGMENT && rng.percent(15);
    if past {
        bytes[last + 1] = 0xff;
    }
    let n = bytes.len();
    f.splice(l3 + 40..l3 + 40, bytes);
    f[l3 + 6] = chain[0];
    let plen = be16(f, l3 + 4) as usize + n;
    put16(f, l3 + 4, plen as u16);
    fixup(f, false, true);
    let names: Vec<String> = chain.iter().map(std::string::ToString::to_string).collect();
    format!(
        "ipv6-extensions:{}{}",
        names.join(","),
        if past { ":past" } else { "" }
    )
}

fn fragment(f: &mut Vec<u8>, v: &View, ip: &Ip, rng: &mut Rng) -> String {
    let offset: u16 = if rng.percent(50) {
        0
    } else {
        rng.range(1, 8191) as u16
    };
    let more = offset == 0 || rng.percent(50);
    if ip.v6 {
        let l3 = v.l3;
        let mut h = vec![f[l3 + 6], 0];
        h.extend_from_slice(&(offset << 3 | u16::from(more)).to_be_bytes());
        h.extend(rng.bytes(4));
        f.splice(l3 + 40..l3 + 40, h);
        f[l3 + 6] = FRAGMENT;
        let plen = be16(f, l3 + 4).wrapping_add(8);
        put16(f, l3 + 4, plen);
    } else {
        let word = (u16::from(more) << 13) | offset;
        put16(f, v.l3 + 6, word);
        fixup(f, true, false);
    }
    "fragment".to_string()
}

/// Sources §4 says are no client.
fn bad_sources(v6: bool, net: &Net) -> Vec<IpAddr> {
    let list: &[&str] = if v6 {
        &[
            "::",
            "::1",
            "ff02::1",
            "ff05::1:3",
            "fe80::1",
            "febf::2",
            "::ffff:10.0.0.10",
            "::ffff:0.0.0.0",
            "fd00:a::1",
        ]
    } else {
        &[
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.0.9",
            "169.254.1.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "10.0.0.255",
            "10.2.0.255",
            "10.0.0.1",
            "10.2.0.1",
        ]
    };
    let mut out: Vec<IpAddr> = list.iter().map(|a| a.parse().expect("addr")).collect();
    out.extend(net.vips.iter().filter(|a| a.is_ipv6() == v6));
    out
}

fn set_addr(f: &mut [u8], v: &View, ip: &Ip, src: bool, a: IpAddr) {
    let at = v.l3
        + match (ip.v6, src) {
            (true, true) => 8,
            (true, false) => 24,
            (false, true) => 12,
            (false, false) => 16,
        };
    let o = wire::octets(a);
    f[at..at + o.len()].copy_from_slice(&o);
}

fn bad_source(f: &mut [u8], v: &View, ip: &Ip, net: &Net, rng: &mut Rng) -> String {
    let a = *rng.pick(&bad_sources(ip.v6, net));
    set_addr(f, v, ip, true, a);
    fixup(f, true, true);
    format!("bad-source:{a}")
}

fn mac(f: &mut [u8], rng: &mut Rng) -> String {
    let (name, at, m): (&str, usize, [u8; 6]) = match rng.below(5) {
        0 => ("dst-other-host", 0, [0x02, 0, 0, 0, 0x77, 0x77]),
        1 => ("dst-broadcast", 0, [0xff; 6]),
        2 => ("dst-multicast-v4", 0, [0x01, 0, 0x5e, 0, 0, 1]),
        3 => ("dst-multicast-v6", 0, [0x33, 0x33, 0, 0, 0, 1]),
        _ => (
            "src-group",
            6,
            *rng.pick(&[
                [0xff; 6],
                [0x01, 0, 0x5e, 0x7f, 0xff, 0xfa],
                [0x03, 0, 0, 0, 0, 1],
            ]),
        ),
    };
    f[at..at + 6].copy_from_slice(&m);
    format!("mac:{name}")
}

fn mapped(f: &mut [u8], v: &View, net: &Net, rng: &mut Rng) -> String {
    let Some(ip) = &v.ip else {
        return "mapped:none".into();
    };
    let v4: Vec<IpAddr> = net
        .vips
        .iter()
        .chain(net.node_addrs.iter())
        .copied()
        .filter(std::net::IpAddr::is_ipv4)
        .collect();
    let (src, a) = if rng.percent(60) {
        (false, *rng.pick(&v4))
    } else {
        (true, "10.0.0.10".parse().expect("addr"))
    };
    let IpAddr::V4(a4) = a else { unreachable!() };
    let m: Ipv6Addr = a4.to_ipv6_mapped();
    set_addr(f, v, ip, src, IpAddr::V6(m));
    fixup(f, true, true);
    format!("ipv6-mapped:{}", if src { "src" } else { "dst" })
}

fn ip_length(f: &mut [u8], v: &View, ip: &Ip, rng: &mut Rng) -> String {
    let l3 = v.l3;
    let cur = (ip.end - l3) as i64;
    if ip.v6 {
        let plen = cur - 40;
        let new = *rng.pick(&[0, 1, 7, 8, 19, 20, plen - 1, plen + 1, plen + 8, plen + 100]);
        put16(f, l3 + 4, new.clamp(0, 0xffff) as u16);
    } else {
        let h = ip.header_len as i64;
        let new = *rng.pick(&[
            0,
            1,
            19,
            h - 1,
            h,
            h + 1,
            h + 7,
            h + 8,
            h + 19,
            h + 20,
            cur - 1,
            cur + 1,
            cur + 100,
            0xffff,
        ]);
        put16(f, l3 + 2, new.clamp(0, 0xffff) as u16);
        fixup(f, true, false);
    }
    "ip-length".into()
}

/// Breaks the packet an ICMP error quotes, or how much of it the error holds.
fn quote(f: &mut Vec<u8>, v: &View, ip: &Ip, rng: &mut Rng) -> Option<String> {
    let q = ip.l4 + 8;
    let l3 = v.l3;
    let name = match rng.below(4) {
        0 => {
            // Cut inside the quote, and (mostly) say so in the outer lengths.
            let cut = q + *rng.pick(&[0usize, 4, 8, 19, 20, 24, 27, 28, 36, 39, 40, 44, 47, 48]);
            if cut >= f.len() {
                return None;
            }
            f.truncate(cut);
            if rng.percent(70) {
                let len = cut - l3;
                if ip.v6 {
                    put16(f, l3 + 4, (len - 40) as u16);
                } else {
                    put16(f, l3 + 2, len as u16);
                }
                fixup(f, true, true);
            }
            "quote:truncated"
        }
        1 => {
            // The quoted IP length says something else.
            let at = q + if ip.v6 { 4 } else { 2 };
            if at + 2 > f.len() {
                return None;
            }
            let new = *rng.pick(&[0u16, 1, 20, 28, 40, 48, 0xffff]);
            put16(f, at, new);
            fixup_quote(f);
            "quote:length"
        }
        2 => {
            // The outer datagram ends 8 bytes into the quoted transport header: the quoted
            // checksum lies in the bytes after it (issue 10 D).
            let ql4 = q + if ip.v6 {
                40
            } else {
                usize::from(f.get(q)? & 15) * 4
            };
            let end = ql4 + 8;
            if end >= f.len() {
                f.resize(ql4 + 20, 0xa5);
            }
            let len = end - l3;
            if ip.v6 {
                put16(f, l3 + 4, (len - 40) as u16);
            } else {
                put16(f, l3 + 2, len as u16);
            }
            fixup(f, true, true);
            "quote:checksum-past-the-datagram"
        }
        _ => {
            let n = rng.range(1, 40) as usize;
            f.extend(rng.bytes(n));
            "quote:trailing-bytes"
        }
    };
    Some(name.into())
}

fn vlan(f: &mut Vec<u8>, v: &View, rng: &mut Rng) -> String {
    match (v.vlan.is_some(), rng.below(3)) {
        (true, 0) => {
            f.drain(12..16);
            "vlan:removed".into()
        }
        (_, 1) => {
            let tpid = if rng.percent(50) { ETH_QINQ } else { ETH_VLAN };
            let vid = rng.range(0, 4095) as u16;
            f.splice(
                12..12,
                [(tpid >> 8) as u8, tpid as u8, (vid >> 8) as u8, vid as u8],
            );
            "vlan:qinq-or-double".into()
        }
        _ => {
            let vid = *rng.pick(&[0u16, 1, 7, 100, 4095]);
            if v.vlan.is_some() {
                put16(f, 14, vid);
            } else {
                f.splice(12..12, [0x81, 0x00, (vid >> 8) as u8, vid as u8]);
            }
            format!("vlan:{vid}")
        }
    }
}

fn tcp_options(f: &mut Vec<u8>, ip: &Ip, rng: &mut Rng) -> String {
    let Some(wire::Upper::Tcp { header_len, .. }) = ip.upper else {
        return "tcp-options:none".into();
    };
    let room = (60 - header_len) / 4;
    if room == 0 || f.len() < ip.l4 + header_len {
        return "tcp-options:none".into();
    }
    let words = rng.range(1, room as u64) as usize;
    let mut opts = vec![2, 4, 0x05, 0xb4]; // MSS 1460
    opts.resize(words * 4, 1);
    let at = ip.l4 + header_len;
    f.splice(at..at, opts);
    f[ip.l4 + 12] = (((header_len / 4 + words) as u8) << 4) | (f[ip.l4 + 12] & 0x0f);
    let v = parse(f);
    let l3 = v.l3;
    if ip.v6 {
        let plen = be16(f, l3 + 4).wrapping_add((words * 4) as u16);
        put16(f, l3 + 4, plen);
    } else {
        let total = be16(f, l3 + 2).wrapping_add((words * 4) as u16);
        put16(f, l3 + 2, total);
    }
    fixup(f, true, true);
    "tcp-options".into()
}
