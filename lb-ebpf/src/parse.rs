//! Packet parsing: Ethernet with at most one 802.1Q tag, IPv4 with any header length, IPv6 with
//! hop-by-hop and destination-options headers skipped, then the first L4 bytes.
//!
//! Policy for what the balancer does not handle (applied by the caller, for packets addressed to
//! a VIP; everything else goes to the kernel untouched):
//! - IPv4 fragments and IPv6 Fragment headers: dropped and counted. Services get whole datagrams
//!   only (TCP uses PMTU discovery; see the README on UDP and fragments).
//! - IPv6 Routing, AH, ESP and other extension headers before the L4 header: dropped and counted;
//!   the final destination or the L4 header would not be where we look.
//! - IPv4 options are carried through untouched.
use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{Addr, addr::V4_MAPPED_WORD};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr, vlan::VlanHdr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;

/// A frame the data path can read directly: an XDP buffer or (on backend-facing interfaces) a
/// socket buffer's linear part.
pub trait Frame {
    /// The frame's start and end.
    fn bounds(&self) -> (usize, usize);
}

// Volatile loads keep the context reads inside each BPF subprogram: LLVM would otherwise hoist
// them into the caller and pass them as 32-bit integers, which the verifier no longer knows as
// packet pointers.
impl Frame for XdpContext {
    #[inline(always)]
    fn bounds(&self) -> (usize, usize) {
        // SAFETY: `self.ctx` is the program's context pointer.
        unsafe {
            (
                core::ptr::read_volatile(&raw const (*self.ctx).data) as usize,
                core::ptr::read_volatile(&raw const (*self.ctx).data_end) as usize,
            )
        }
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn bounds(&self) -> (usize, usize) {
        // SAFETY: `self.skb.skb` is the program's context pointer.
        unsafe {
            (
                core::ptr::read_volatile(&raw const (*self.skb.skb).data) as usize,
                core::ptr::read_volatile(&raw const (*self.skb.skb).data_end) as usize,
            )
        }
    }
}

/// The frame's start and end.
#[inline(always)]
pub fn bounds<F: Frame>(f: &F) -> (usize, usize) {
    f.bounds()
}

/// Bounds-checked pointer into the frame: the one place that proves an access is in bounds.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*mut T> {
    let (start, end) = ctx.bounds();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Reads a word of packet data at a pointer [`ptr_at`] checked.
///
/// Packet data is only 2-byte aligned (behind a 14-byte Ethernet header). The verifier allows
/// unaligned packet access unless a program asks for strict alignment, and the JITs handle it,
/// so we read whole words where network-types' byte-array fields would make LLVM emit a byte
/// loop (BPF cannot merge unaligned bytes). Only for packet memory: stack access must be aligned.
#[inline(always)]
pub unsafe fn load<T: Copy>(at: *const u8) -> T {
    unsafe { at.cast::<T>().read() }
}

/// Writes a word of packet data; see [`load`].
#[inline(always)]
pub unsafe fn store<T>(at: *mut u8, value: T) {
    unsafe { at.cast::<T>().write(value) }
}

/// Reads an IPv6 address from packet data.
#[inline(always)]
pub unsafe fn load_addr(at: *const u8) -> Addr {
    unsafe { Addr::from_words([load(at), load(at.add(4)), load(at.add(8)), load(at.add(12))]) }
}

/// Writes an IPv6 address into packet data.
#[inline(always)]
pub unsafe fn store_addr(at: *mut u8, a: &Addr) {
    let w = a.words();
    unsafe {
        store(at, w[0]);
        store(at.add(4), w[1]);
        store(at.add(8), w[2]);
        store(at.add(12), w[3]);
    }
}

/// Reads an IPv4 address from packet data as an IPv4-mapped [`Addr`].
#[inline(always)]
pub unsafe fn load_v4(at: *const u8) -> Addr {
    Addr::from_words([0, 0, V4_MAPPED_WORD, unsafe { load(at) }])
}

/// Byte offsets within the IP headers.
pub const IPV4_TTL: usize = 8;
pub const IPV4_CHECK: usize = 10;
pub const IPV4_SRC: usize = 12;
pub const IPV4_DST: usize = 16;
pub const IPV6_SRC: usize = 8;
pub const IPV6_DST: usize = 24;

/// What the L3 parse found about where the transport header is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4State {
    /// `l4` points at the transport header.
    Present,
    /// A fragment: no (or not the first) transport header.
    Fragment,
    /// An IPv6 extension header we do not walk.
    UnsupportedExtension,
}

pub struct Packet {
    /// Offset of the IP header (14, or 18 with a VLAN tag).
    pub l3: usize,
    /// Offset of the transport header.
    pub l4: usize,
    pub v6: bool,
    pub vlan: bool,
    pub proto: u8,
    /// IP datagram length (IPv4 total length; IPv6 payload length + 40).
    pub len: u16,
    pub l4_state: L4State,
    pub src: Addr,
    pub dst: Addr,
}

impl Packet {
    pub const EMPTY: Packet = Packet {
        l3: 0,
        l4: 0,
        v6: false,
        vlan: false,
        proto: 0,
        len: 0,
        l4_state: L4State::Present,
        src: Addr::ZERO,
        dst: Addr::ZERO,
    };
}

/// Parses L2 and L3 into `pkt`. False: not IP, or cut short before the addresses (the kernel's
/// business). A subprogram of its own: its many temporaries then live in a frame that is not on
/// the deep call chains below the caller (BPF allows 512 bytes of stack along any chain).
#[inline(never)]
pub fn parse_l3<F: Frame>(ctx: &F, pkt: &mut Packet) -> bool {
    match parse_headers(ctx) {
        Some(p) => {
            *pkt = p;
            true
        }
        None => false,
    }
}

#[inline(always)]
fn parse_headers<F: Frame>(ctx: &F) -> Option<Packet> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3 = EthHdr::LEN;
    let mut vlan = false;
    if ether_type == ETH_P_8021Q {
        let tag: *const VlanHdr = ptr_at(ctx, l3)?;
        ether_type = u16::from_be(unsafe { (*tag).ether_type });
        l3 += VlanHdr::LEN;
        vlan = true;
    }
    match ether_type {
        ETH_P_IP => parse_v4(ctx, l3, vlan),
        ETH_P_IPV6 => parse_v6(ctx, l3, vlan),
        _ => None,
    }
}

#[inline(always)]
fn parse_v4<F: Frame>(ctx: &F, l3: usize, vlan: bool) -> Option<Packet> {
    let ptr: *const u8 = ptr_at::<Ipv4Hdr>(ctx, l3)?.cast();
    let ip = unsafe { &*ptr.cast::<Ipv4Hdr>() };
    if ip.vihl >> 4 != 4 {
        return None;
    }
    // Any header length from 20 to 60 bytes; options are left as they are.
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ihl < Ipv4Hdr::LEN {
        return None;
    }
    let frags = u16::from_be_bytes(ip.frags);
    let more_fragments = frags & 0x2000 != 0;
    let offset = frags & 0x1fff;
    Some(Packet {
        l3,
        l4: l3 + ihl,
        v6: false,
        vlan,
        proto: ip.proto,
        len: u16::from_be_bytes(ip.tot_len),
        l4_state: if more_fragments || offset != 0 {
            L4State::Fragment
        } else {
            L4State::Present
        },
        src: unsafe { load_v4(ptr.add(IPV4_SRC)) },
        dst: unsafe { load_v4(ptr.add(IPV4_DST)) },
    })
}

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_DEST_OPTIONS: u8 = 60;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_ROUTING: u8 = 43;
const IPV6_AH: u8 = 51;
const IPV6_ESP: u8 = 50;
const IPV6_NO_NEXT: u8 = 59;
const IPV6_MOBILITY: u8 = 135;
/// Extension headers walked before giving up (each is at least 8 bytes).
const IPV6_MAX_EXTENSIONS: usize = 4;

#[inline(always)]
fn parse_v6<F: Frame>(ctx: &F, l3: usize, vlan: bool) -> Option<Packet> {
    let ptr: *const u8 = ptr_at::<Ipv6Hdr>(ctx, l3)?.cast();
    let ip = unsafe { &*ptr.cast::<Ipv6Hdr>() };
    if ip.vcf[0] >> 4 != 6 {
        return None;
    }
    let mut next = ip.next_hdr;
    let mut l4 = l3 + Ipv6Hdr::LEN;
    let mut l4_state = L4State::Present;
    for _ in 0..IPV6_MAX_EXTENSIONS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_DEST_OPTIONS => {
                let ext: *const [u8; 2] = ptr_at(ctx, l4)?;
                let ext = unsafe { *ext };
                next = ext[0];
                l4 += (ext[1] as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                l4_state = L4State::Fragment;
                break;
            }
            IPV6_ROUTING | IPV6_AH | IPV6_ESP | IPV6_NO_NEXT | IPV6_MOBILITY => {
                l4_state = L4State::UnsupportedExtension;
                break;
            }
            _ => break,
        }
    }
    if matches!(next, IPV6_HOP_BY_HOP | IPV6_DEST_OPTIONS) {
        l4_state = L4State::UnsupportedExtension;
    }
    Some(Packet {
        l3,
        l4,
        v6: true,
        vlan,
        proto: next,
        len: u16::from_be_bytes(ip.payload_len).wrapping_add(Ipv6Hdr::LEN as u16),
        l4_state,
        src: unsafe { load_addr(ptr.add(IPV6_SRC)) },
        dst: unsafe { load_addr(ptr.add(IPV6_DST)) },
    })
}

/// TCP flag bits (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Offset of the TCP flags byte, and of the checksums, in their headers.
pub const TCP_FLAGS: usize = 13;
pub const TCP_CHECK: usize = 16;
pub const UDP_CHECK: usize = 6;

/// The first bytes of a TCP or UDP header: ports (wire order), and TCP flags.
pub struct Ports {
    pub sport: u16,
    pub dport: u16,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
}

/// Reads the ports (and TCP flags). `None`: transport header cut short.
#[inline(always)]
pub fn parse_ports<F: Frame>(ctx: &F, pkt: &Packet) -> Option<Ports> {
    // The whole fixed header: the rewrite touches the checksum.
    let at: *const u8 = if pkt.proto == lb_common::IPPROTO_TCP {
        ptr_at::<[u8; 20]>(ctx, pkt.l4)?.cast()
    } else {
        ptr_at::<[u8; 8]>(ctx, pkt.l4)?.cast()
    };
    unsafe {
        Some(Ports {
            sport: load(at),
            dport: load(at.add(2)),
            tcp_flags: if pkt.proto == lb_common::IPPROTO_TCP {
                *at.add(TCP_FLAGS)
            } else {
                0
            },
        })
    }
}
