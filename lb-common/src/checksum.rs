//! Internet checksum arithmetic (RFC 1071) and incremental update (RFC 1624).
//!
//! The data path never recomputes a checksum over a packet: it accumulates the difference of the
//! words it rewrites into a [`Delta`] and applies it to each checksum that covers them
//! (`HC' = ~(~HC + ~m + m')`, RFC 1624 eqn. 3).
//!
//! Everything here works on words as they sit in memory (native byte order): the one's-complement
//! sum is byte-order independent (RFC 1071 §2B), so summing memory-order words and storing the
//! result in memory order gives the same bytes as the big-endian arithmetic, without a byte swap.
//! 32-bit words count as their two 16-bit halves, because 2^16 = 1 modulo 2^16 - 1.

use crate::addr::Addr;

/// Sum of one's-complement differences, not yet folded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta(u64);

impl Delta {
    pub const ZERO: Delta = Delta(0);

    /// Accounts for the 16-bit word `old` becoming `new` (memory order).
    #[inline(always)]
    pub fn u16(self, old: u16, new: u16) -> Delta {
        Delta(self.0 + u64::from(!old) + u64::from(new))
    }

    /// Accounts for the 32-bit word `old` becoming `new` (memory order, 2-byte aligned in the
    /// checksummed data).
    #[inline(always)]
    pub fn u32(self, old: u32, new: u32) -> Delta {
        Delta(self.0 + u64::from(!old) + u64::from(new))
    }

    /// Accounts for an address changing.
    #[inline(always)]
    pub fn addr(self, old: &Addr, new: &Addr) -> Delta {
        let (o, n) = (old.words(), new.words());
        self.u32(o[0], n[0])
            .u32(o[1], n[1])
            .u32(o[2], n[2])
            .u32(o[3], n[3])
    }

    /// Accounts for the bytes `old` becoming `new` (N even, 2-byte aligned in the data).
    #[inline(always)]
    pub fn bytes<const N: usize>(self, old: &[u8; N], new: &[u8; N]) -> Delta {
        let mut d = self;
        let mut i = 0;
        while i + 1 < N {
            d = d.u16(
                u16::from_ne_bytes([old[i], old[i + 1]]),
                u16::from_ne_bytes([new[i], new[i + 1]]),
            );
            i += 2;
        }
        d
    }

    /// Combines two deltas (e.g. an address change that both IP and TCP checksums cover).
    #[inline(always)]
    pub fn add(self, other: Delta) -> Delta {
        Delta(u64::from(self.folded()) + u64::from(other.folded()))
    }

    /// The checksum (memory order) that results from applying this delta to `check`.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        let sum = u64::from(!check) + u64::from(self.folded());
        !fold64(sum)
    }

    /// Like [`Delta::apply`] for an IPv4 UDP checksum: 0 means "no checksum" and stays 0; a
    /// computed 0 is sent as 0xffff (RFC 768). Both values read the same in either byte order.
    #[inline(always)]
    pub fn apply_udp(self, check: u16) -> u16 {
        if check == 0 {
            return 0;
        }
        match self.apply(check) {
            0 => 0xffff,
            c => c,
        }
    }

    /// The change as a 32-bit one's-complement sum: the kernel's `__wsum`, which
    /// bpf_l4_csum_replace takes as a precomputed difference.
    #[inline(always)]
    pub fn wsum(self) -> u32 {
        let s = (self.0 & 0xffff_ffff) + (self.0 >> 32);
        let s = (s & 0xffff_ffff) + (s >> 32);
        s as u32
    }

    /// The folded 16-bit change.
    #[inline(always)]
    pub fn folded(self) -> u16 {
        fold64(self.0)
    }
}

/// Folds a 64-bit one's-complement accumulator to 16 bits.
#[inline(always)]
pub const fn fold64(sum: u64) -> u16 {
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    let s = (s & 0xffff_ffff) + (s >> 32);
    fold(s as u32)
}

/// Folds carries back into the low 16 bits (twice covers any u32).
#[inline(always)]
pub const fn fold(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// One's-complement sum of `data` as big-endian words, odd length padded with zero (RFC 1071).
/// A full computation: for tests and tools, never the packet path.
pub fn sum(data: &[u8], init: u32) -> u32 {
    let mut acc = u64::from(init);
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    u32::from(fold64(acc))
}

/// The checksum over `data` with `init` already summed in (for the pseudo-header), big-endian.
pub fn checksum(data: &[u8], init: u32) -> [u8; 2] {
    (!fold(sum(data, init))).to_be_bytes()
}

/// Sum of the pseudo-header of a TCP/UDP/ICMPv6 segment (RFC 793/768 for IPv4, RFC 8200 §8.1).
pub fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, l4_len: u32) -> u32 {
    let s = u64::from(sum(src, 0)) + u64::from(sum(dst, 0));
    let s = s + u64::from(proto) + u64::from(l4_len >> 16) + u64::from(l4_len & 0xffff);
    u32::from(fold64(s))
}
