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
    pub fn combine(self, other: Delta) -> Delta {
        Delta(u64::from(self.folded()) + u64::from(other.folded()))
    }

    /// The checksum (memory order) that results from applying this delta to `check`.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        let sum = u64::from(!check) + u64::from(self.folded());
        !fold64(sum)
    }

    /// Like [`Delta::apply`], but a computed 0 is written as 0xffff, the other zero of one's
    /// complement: it verifies wherever 0 does, and also when every other covered word is 0
    /// (an ICMP echo reply of zeros, where the update formula yields 0, which does not verify).
    /// Both values read the same in either byte order.
    #[inline(always)]
    pub fn apply_nonzero(self, check: u16) -> u16 {
        match self.apply(check) {
            0 => 0xffff,
            c => c,
        }
    }

    /// Like [`Delta::apply`] for an IPv4 UDP checksum: 0 means "no checksum" and stays 0; a
    /// computed 0 is sent as 0xffff (RFC 768).
    #[inline(always)]
    pub fn apply_udp(self, check: u16) -> u16 {
        if check == 0 {
            return 0;
        }
        self.apply_nonzero(check)
    }

    /// The change as a 32-bit one's-complement sum: the kernel's `__wsum`, which
    /// bpf_l4_csum_replace takes as a precomputed difference.
    #[inline(always)]
    #[allow(
        clippy::cast_possible_truncation,
        reason = "two folds leave at most 32 bits"
    )]
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
#[allow(
    clippy::cast_possible_truncation,
    reason = "two folds leave at most 32 bits"
)]
pub const fn fold64(sum: u64) -> u16 {
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    let s = (s & 0xffff_ffff) + (s >> 32);
    fold(s as u32)
}

/// Folds carries back into the low 16 bits (twice covers any u32).
#[inline(always)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "two folds leave at most 16 bits"
)]
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

#[cfg(test)]
mod tests {
    extern crate std;
    use proptest::prelude::*;
    use std::vec::Vec;

    use super::*;

    /// A checksum over `data` as it sits in memory (the field at `at` zeroed first).
    fn full(data: &[u8], at: usize, init: u32) -> u16 {
        let mut d = data.to_vec();
        d[at] = 0;
        d[at + 1] = 0;
        u16::from_ne_bytes(checksum(&d, init))
    }

    fn word(d: &[u8], i: usize) -> u16 {
        u16::from_ne_bytes([d[i], d[i + 1]])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Rewriting 16-bit words and updating the checksum incrementally gives the checksum a
        /// full recomputation gives (RFC 1624), in memory byte order.
        #[test]
        fn incremental_update_equals_full_recomputation(
            mut data in proptest::collection::vec(any::<u8>(), 8..200).prop_map(|mut v| { if v.len() % 2 == 1 { v.push(0) } v }),
            changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u16>()), 1..8),
        ) {
            let at = 0usize; // the checksum field
            let check = full(&data, at, 0);
            data[at..at + 2].copy_from_slice(&check.to_ne_bytes());
            let mut delta = Delta::ZERO;
            for (idx, new) in &changes {
                let i = 2 + 2 * idx.index((data.len() - 2) / 2);
                let old = word(&data, i);
                delta = delta.u16(old, *new);
                data[i..i + 2].copy_from_slice(&new.to_ne_bytes());
            }
            let updated = delta.apply(word(&data, at));
            // Both are valid encodings of the same sum; compare as the verifier would.
            let mut checked = data.clone();
            checked[at..at + 2].copy_from_slice(&updated.to_ne_bytes());
            prop_assert_eq!(fold(sum(&checked, 0)), 0xffff);
            prop_assert!(updated == full(&data, at, 0) || (updated == 0xffff && full(&data, at, 0) == 0) || (updated == 0 && full(&data, at, 0) == 0xffff));
        }

        /// Address and port rewrites of a TCP segment over IPv4 and IPv6: the incremental
        /// pseudo-header + port delta equals recomputing the checksum over the new segment.
        #[test]
        fn address_and_port_rewrite_keeps_the_tcp_checksum_valid(
            v6 in any::<bool>(),
            old_src in any::<[u8; 16]>(), old_dst in any::<[u8; 16]>(),
            new_src in any::<[u8; 16]>(), new_dst in any::<[u8; 16]>(),
            ports in any::<[u16; 4]>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let addr = |a: [u8; 16]| if v6 { Addr(a) } else { Addr::v4([a[0], a[1], a[2], a[3]]) };
            let (os, od, ns, nd) = (addr(old_src), addr(old_dst), addr(new_src), addr(new_dst));
            let bytes = |a: &Addr| if v6 { a.0.to_vec() } else { a.v4_bytes().to_vec() };
            let mut seg = Vec::new();
            seg.extend_from_slice(&ports[0].to_be_bytes());
            seg.extend_from_slice(&ports[1].to_be_bytes());
            seg.extend_from_slice(&[0; 12]);
            seg.extend_from_slice(&[0, 0]); // checksum at 16
            seg.extend_from_slice(&[0, 0]);
            seg.extend_from_slice(&payload);
            let pseudo = |s: &Addr, d: &Addr, seg: &[u8]| pseudo_header_sum(&bytes(s), &bytes(d), 6, u32::try_from(seg.len()).unwrap());
            let c = checksum(&seg, pseudo(&os, &od, &seg));
            seg[16..18].copy_from_slice(&c);
            // Rewrite: addresses (pseudo-header) and ports, incrementally, in memory order.
            let addr_delta = if v6 { Delta::ZERO.addr(&os, &ns).addr(&od, &nd) } else {
                Delta::ZERO.u32(os.v4_word(), ns.v4_word()).u32(od.v4_word(), nd.v4_word())
            };
            let old_ports = u32::from_ne_bytes([seg[0], seg[1], seg[2], seg[3]]);
            let new_ports = u32::from_ne_bytes([ports[2].to_be_bytes()[0], ports[2].to_be_bytes()[1], ports[3].to_be_bytes()[0], ports[3].to_be_bytes()[1]]);
            let d = addr_delta.combine(Delta::ZERO.u32(old_ports, new_ports));
            seg[0..4].copy_from_slice(&new_ports.to_ne_bytes());
            let updated = d.apply(u16::from_ne_bytes([seg[16], seg[17]]));
            seg[16..18].copy_from_slice(&updated.to_ne_bytes());
            prop_assert_eq!(fold(sum(&seg, pseudo(&ns, &nd, &seg))), 0xffff);
        }
    }

    #[test]
    fn ipv4_udp_zero_means_none_and_a_computed_zero_is_sent_as_ones() {
        assert_eq!(Delta::ZERO.u16(1, 2).apply_udp(0), 0);
        // A delta that makes the checksum come out 0 (adding `check`: ~check + check = 0xffff)
        // yields 0xffff instead.
        let check = 0x1234u16;
        let d = Delta::ZERO.u16(0, check);
        assert_eq!(d.apply(check), 0);
        assert_eq!(d.apply_udp(check), 0xffff);
    }

    /// An ICMP echo request of zeros (type 8, everything else 0) turned into a reply: every
    /// word of the reply is 0, so only 0xffff verifies, and the update formula gives 0.
    #[test]
    fn an_echo_reply_of_zeros_gets_the_checksum_that_verifies() {
        let request = [8u8, 0, 0, 0, 0, 0, 0, 0];
        let check = full(&request, 2, 0);
        let mut reply = request;
        reply[0] = 0;
        let d = Delta::ZERO.u16(word(&request, 0), word(&reply, 0));
        assert_eq!(
            d.apply(check),
            0,
            "the formula's zero: the case this is about"
        );
        let c = d.apply_nonzero(check).to_ne_bytes();
        reply[2..4].copy_from_slice(&c);
        assert_eq!(
            checksum(&reply, 0),
            [0, 0],
            "a packet that verifies sums to all ones"
        );
    }
}
