//! Packet parsing: Ethernet with at most one 802.1Q tag, IPv4 with any header length, IPv6 with
//! hop-by-hop and destination-options headers skipped, then the first L4 bytes. Every offset is
//! checked against the IP datagram (the IP header's length), not just the frame: bytes after the
//! datagram (Ethernet padding) are never read as headers, and a datagram whose lengths disagree
//! is [`State::Malformed`].
//!
//! Policy for what the balancer does not handle (applied by the caller, for packets addressed to
//! a VIP; everything else goes to the kernel untouched):
//! - IPv4 fragments and IPv6 Fragment headers: dropped and counted. Services get whole datagrams
//!   only (TCP uses PMTU discovery; see the README on UDP and fragments).
//! - IPv6 Routing, AH, ESP and other extension headers before the L4 header: dropped and counted;
//!   the final destination or the L4 header would not be where we look. Jumbograms (payload
//!   length 0) are malformed.
//! - IPv4 options are carried through untouched.
//! - IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are IPv6 addresses, but the maps store IPv4 that
//!   way: an IPv6 packet to one is not ours, and one from one is no client.
use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{
    Addr, IPPROTO_TCP, IPPROTO_UDP,
    addr::V4_MAPPED_WORD,
    net::{
        ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPV4_DST, IPV4_SRC, IPV4_TTL, IPV6_DST, IPV6_HOP_LIMIT,
        IPV6_SRC, TCP_FLAGS, UDP_CHECK,
    },
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr, vlan::VlanHdr};

/// A frame the data path can read directly: an XDP buffer or (on backend-facing interfaces) a
/// socket buffer's linear part.
pub trait Frame {
    /// The start and end of the bytes that can be read directly.
    fn bounds(&self) -> (usize, usize);
    /// The whole frame's length (a socket buffer may hold more than its linear part).
    fn frame_len(&self) -> usize;
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

    #[inline(always)]
    fn frame_len(&self) -> usize {
        let (start, end) = self.bounds();
        end - start
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

    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }
}

/// The frame's start and end.
#[inline(always)]
pub fn bounds<F: Frame>(f: &F) -> (usize, usize) {
    f.bounds()
}

/// Offsets past this are never header offsets. The verifier wants an offset bounded before it
/// is added to a packet pointer (offsets read back from the packet slot in map memory are
/// unknown numbers to it).
const MAX_OFFSET: usize = 0x3fff;

/// Bounds-checked pointer into the frame: the one place that proves an access is in bounds.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*mut T> {
    let (start, end) = ctx.bounds();
    if offset > MAX_OFFSET || start + offset + core::mem::size_of::<T>() > end {
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
    // SAFETY: the caller passes a pointer `ptr_at` checked for `size_of::<T>()` bytes of packet data, where unaligned access is allowed (see above).
    unsafe { at.cast::<T>().read() }
}

/// Writes a word of packet data; see [`load`].
#[inline(always)]
pub unsafe fn store<T>(at: *mut u8, value: T) {
    // SAFETY: as in `load`.
    unsafe { at.cast::<T>().write(value) }
}

/// Reads an IPv6 address from packet data.
#[inline(always)]
pub unsafe fn load_addr(at: *const u8) -> Addr {
    // SAFETY: the caller passes a pointer to 16 checked bytes of packet data.
    unsafe { Addr::from_words([load(at), load(at.add(4)), load(at.add(8)), load(at.add(12))]) }
}

/// Writes an IPv6 address into packet data.
#[inline(always)]
pub unsafe fn store_addr(at: *mut u8, a: &Addr) {
    let w = a.words();
    // SAFETY: the caller passes a pointer to 16 checked bytes of packet data.
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
    // SAFETY: the caller passes a pointer to 4 checked bytes of packet data.
    Addr::from_words([0, 0, V4_MAPPED_WORD, unsafe { load(at) }])
}

/// What the L3 parse found.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Lengths agree; `l4` points at the transport header.
    Present,
    /// A fragment: no (or not the first) transport header.
    Fragment,
    /// An IPv6 extension header we do not walk.
    UnsupportedExtension,
    /// Lengths that disagree (with each other or with the frame), or a header that is not what
    /// its type says; or a group source MAC.
    Malformed,
}

#[repr(C)]
pub struct Packet {
    /// Offset of the IP header (14, or 18 with a VLAN tag).
    pub l3: usize,
    /// Offset of the transport header.
    pub l4: usize,
    /// Offset of the end of the IP datagram: nothing at or after it is a header.
    pub end: usize,
    pub v6: bool,
    pub vlan: bool,
    pub proto: u8,
    /// TTL or hop limit, as received.
    pub ttl: u8,
    /// IP datagram length (IPv4 total length; IPv6 payload length + 40).
    pub len: u32,
    pub state: State,
    pub src: Addr,
    pub dst: Addr,
}

/// Parses L2 and L3 into `pkt`. False: not IP, cut short before the addresses, or IPv6 to an
/// IPv4-mapped address (the kernel's business). A subprogram of its own: its many temporaries
/// then live in a frame that is not on the deep call chains below the caller (BPF allows 512
/// bytes of stack along any chain).
#[inline(never)]
pub fn parse_l3<F: Frame>(ctx: &F, pkt: &mut Packet) -> bool {
    parse_l3_inline(ctx, pkt)
}

/// `parse_l3` without the subprogram call: for `lb_uplink`'s per-packet path (see main.rs,
/// `entry`).
#[inline(always)]
pub fn parse_l3_inline<F: Frame>(ctx: &F, pkt: &mut Packet) -> bool {
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
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    // A group address is never a sender: nothing from one is balanced or answered.
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
    let group_source = unsafe { (*eth).src_addr[0] } & 1 != 0;
    let mut l3 = EthHdr::LEN;
    let mut vlan = false;
    if ether_type == ETH_P_8021Q {
        let tag: *const VlanHdr = ptr_at(ctx, l3)?;
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        ether_type = u16::from_be(unsafe { (*tag).ether_type });
        l3 += VlanHdr::LEN;
        vlan = true;
    }
    let mut pkt = match ether_type {
        ETH_P_IP => parse_v4(ctx, l3)?,
        ETH_P_IPV6 => parse_v6(ctx, l3)?,
        _ => return None,
    };
    pkt.vlan = vlan;
    if group_source {
        pkt.state = State::Malformed;
    }
    Some(pkt)
}

#[inline(always)]
fn parse_v4<F: Frame>(ctx: &F, l3: usize) -> Option<Packet> {
    let ptr: *const u8 = ptr_at::<Ipv4Hdr>(ctx, l3)?.cast();
    // SAFETY: `ptr_at` checked the header's bytes; Ipv4Hdr is plain bytes (alignment 1), valid for any contents.
    let ip = unsafe { &*ptr.cast::<Ipv4Hdr>() };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    let len = u16::from_be_bytes(ip.tot_len) as usize;
    let frags = u16::from_be_bytes(ip.frags);
    let state =
        if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || len < ihl || l3 + len > ctx.frame_len() {
            State::Malformed
        } else if frags & 0x3fff != 0 {
            // More fragments, or an offset.
            State::Fragment
        } else {
            State::Present
        };
    Some(Packet {
        l3,
        l4: l3 + ihl,
        end: l3 + len,
        v6: false,
        vlan: false,
        proto: ip.proto,
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        ttl: unsafe { *ptr.add(IPV4_TTL) },
        len: len as u32,
        state,
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        src: unsafe { load_v4(ptr.add(IPV4_SRC)) },
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
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
fn parse_v6<F: Frame>(ctx: &F, l3: usize) -> Option<Packet> {
    let ptr: *const u8 = ptr_at::<Ipv6Hdr>(ctx, l3)?.cast();
    // SAFETY: `ptr_at` checked the header's bytes; Ipv6Hdr is plain bytes (alignment 1), valid for any contents.
    let ip = unsafe { &*ptr.cast::<Ipv6Hdr>() };
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
    let dst = unsafe { load_addr(ptr.add(IPV6_DST)) };
    if dst.is_v4() {
        return None;
    }
    // In usize: 40 + 0xffff does not fit the header's 16 bits.
    let payload = u16::from_be_bytes(ip.payload_len) as usize;
    let end = l3 + Ipv6Hdr::LEN + payload;
    let mut state = if ip.vcf[0] >> 4 != 6 || payload == 0 || end > ctx.frame_len() {
        State::Malformed
    } else {
        State::Present
    };
    let mut next = ip.next_hdr;
    let mut l4 = l3 + Ipv6Hdr::LEN;
    for i in 0..IPV6_MAX_EXTENSIONS {
        if state != State::Present {
            break;
        }
        match next {
            IPV6_HOP_BY_HOP | IPV6_DEST_OPTIONS => {
                // Hop-by-hop options may only come first (RFC 8200 4.1).
                if next == IPV6_HOP_BY_HOP && i > 0 {
                    state = State::Malformed;
                    break;
                }
                let ext: *const [u8; 2] = ptr_at(ctx, l4)?;
                // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
                let ext = unsafe { *ext };
                next = ext[0];
                l4 += (ext[1] as usize + 1) * 8;
                if l4 > end {
                    state = State::Malformed;
                }
            }
            IPV6_FRAGMENT => {
                state = State::Fragment;
                break;
            }
            IPV6_ROUTING | IPV6_AH | IPV6_ESP | IPV6_NO_NEXT | IPV6_MOBILITY => {
                state = State::UnsupportedExtension;
                break;
            }
            _ => break,
        }
    }
    if state == State::Present && matches!(next, IPV6_HOP_BY_HOP | IPV6_DEST_OPTIONS) {
        // More extension headers than we walk.
        state = State::UnsupportedExtension;
    }
    Some(Packet {
        l3,
        l4,
        end,
        v6: true,
        vlan: false,
        proto: next,
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        ttl: unsafe { *ptr.add(IPV6_HOP_LIMIT) },
        len: (Ipv6Hdr::LEN + payload) as u32,
        state,
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        src: unsafe { load_addr(ptr.add(IPV6_SRC)) },
        dst,
    })
}

/// Whether an IPv4 header's checksum is right (over its whole length, options included). The
/// kernel checks it before forwarding; so do we, before balancing.
#[inline(never)]
pub fn ipv4_checksum_ok<F: Frame>(ctx: &F, l3: usize, l4: usize) -> bool {
    ipv4_checksum_ok_inline(ctx, l3, l4)
}

/// `ipv4_checksum_ok` without the subprogram call (see `parse_l3_inline`).
#[inline(always)]
pub fn ipv4_checksum_ok_inline<F: Frame>(ctx: &F, l3: usize, l4: usize) -> bool {
    let Some(h) = ptr_at::<[u32; 5]>(ctx, l3) else {
        return false;
    };
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
    let h = unsafe { *h };
    let mut sum: u64 = u64::from(h[0]) + u64::from(h[1]) + u64::from(h[2]) + u64::from(h[3]);
    sum += u64::from(h[4]);
    // Options: up to 40 bytes, in 32-bit words.
    let mut at = l3 + 20;
    for _ in 0..10 {
        if at >= l4 {
            break;
        }
        match ptr_at::<u32>(ctx, at) {
            // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
            Some(w) => sum += u64::from(unsafe { load::<u32>(w.cast()) }),
            None => return false,
        }
        at += 4;
    }
    lb_common::checksum::fold64(sum) == 0xffff
}

/// The first bytes of a TCP or UDP header: ports (wire order), and TCP flags. (Clone, not Copy:
/// by reference into subprograms, where a BPF call has five argument registers.)
#[derive(Clone)]
pub struct Ports {
    pub sport: u16,
    pub dport: u16,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// TCP header length (8 for UDP).
    pub header_len: u8,
}

/// Reads and checks the transport header of a TCP or UDP packet. `None`: malformed (cut short
/// of its fixed header, a TCP data offset that is too small or runs past the datagram, a UDP
/// length under 8 or over the datagram's, an IPv6 UDP packet without a checksum).
#[inline(always)]
pub fn parse_ports<F: Frame>(ctx: &F, pkt: &Packet) -> Option<Ports> {
    let room = pkt.end.checked_sub(pkt.l4)?;
    if pkt.proto == IPPROTO_TCP {
        if room < 20 {
            return None;
        }
        let at: *const u8 = ptr_at::<[u8; 20]>(ctx, pkt.l4)?.cast();
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        let offset = (unsafe { *at.add(12) } >> 4) as usize * 4;
        if offset < 20 || offset > room {
            return None;
        }
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        unsafe {
            Some(Ports {
                sport: load(at),
                dport: load(at.add(2)),
                tcp_flags: *at.add(TCP_FLAGS),
                header_len: offset as u8,
            })
        }
    } else if pkt.proto == IPPROTO_UDP {
        if room < 8 {
            return None;
        }
        let at: *const u8 = ptr_at::<[u8; 8]>(ctx, pkt.l4)?.cast();
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        let (len, check) = unsafe {
            (
                u16::from_be(load::<u16>(at.add(4))) as usize,
                load::<u16>(at.add(UDP_CHECK)),
            )
        };
        // Shorter than the datagram is allowed (the receiver trims), as the kernel allows it.
        if len < 8 || len > room || (pkt.v6 && check == 0) {
            return None;
        }
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        unsafe {
            Some(Ports {
                sport: load(at),
                dport: load(at.add(2)),
                tcp_flags: 0,
                header_len: 8,
            })
        }
    } else {
        None
    }
}
