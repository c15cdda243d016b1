//! Hashes both sides must compute identically: the flow hash that indexes a Maglev ring (so
//! every node, and `lb-agent flow`, picks the same slot for a 5-tuple) and the slot hash behind
//! the address filter. MurmurHash3 (x86, 32-bit) over fixed-size input: cheap, unrolled by the
//! compiler, no tables; and for the filter and caches, cheaper still, one multiply.

use crate::addr::{Addr, V4_MAPPED_WORD};

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(h: u32, len: u32) -> u32 {
    let mut h = h ^ len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn mix_addr(h: u32, a: &Addr) -> u32 {
    // Words in memory order, i.e. little-endian reads of the bytes on the little-endian
    // machines we run on: the same values `bytes_hash` reads.
    let w = a.words();
    mix(mix(mix(mix(h, w[0]), w[1]), w[2]), w[3])
}

/// The state after an IPv4-mapped address's three fixed words, from `h`.
const fn v4_prefix(h: u32) -> u32 {
    mix(mix(mix(h, 0), 0), V4_MAPPED_WORD)
}

/// `mix_addr(h, a)`, where `v4_state` is `v4_prefix(h)`: for an IPv4 address, one round of
/// four (the same value: the first three, over fixed words, were done at compile time).
#[inline(always)]
fn mix_addr_from(h: u32, v4_state: u32, a: &Addr) -> u32 {
    if a.is_v4() {
        mix(v4_state, a.v4_word())
    } else {
        mix_addr(h, a)
    }
}

/// Hash of a flow's 5-tuple (source, destination, ports, protocol) under `seed`.
#[inline(always)]
pub fn flow_hash(src: &Addr, dst: &Addr, sport: u16, dport: u16, proto: u8, seed: u32) -> u32 {
    let mut h = mix_addr(seed, src);
    h = mix_addr(h, dst);
    // The two ports as they sit in memory, one word.
    h = mix(h, u32::from(sport) | (u32::from(dport) << 16));
    h = mix(h, u32::from(proto));
    finish(h, 40)
}

/// Hash of a rate-limited source (address and policy word), for its set in LB_SOURCES.
#[inline(always)]
pub fn source_hash(addr: &Addr, policy: u32) -> u32 {
    const SEED: u32 = 0x5eed_5eed;
    const V4: u32 = v4_prefix(SEED);
    finish(mix(mix_addr_from(SEED, V4, addr), policy), 20)
}

/// The `i`-th of a sequence of hashes derived from `h`, each as good as independent (for
/// probing: unlike a fixed stride, two flows that start at the same place part at once).
#[inline(always)]
pub fn rehash(h: u32, i: u32) -> u32 {
    finish(mix(h, i), 8)
}

/// The Maglev ring slot a flow maps to.
#[inline(always)]
pub fn ring_slot(hash: u32, ring_size: u32) -> u32 {
    if ring_size == 0 { 0 } else { hash % ring_size }
}

/// Hash of one address (fixed seed: what it indexes is node-local).
#[inline(always)]
pub fn addr_hash(a: &Addr) -> u32 {
    const SEED: u32 = 0x5eed_f17e;
    const V4: u32 = v4_prefix(SEED);
    finish(mix_addr_from(SEED, V4, a), 16)
}

/// A cheap index of `a` into a table of `2^bits` slots (`bits` in 1..=32), for caches that
/// check the address they find there and for the address filter (a collision costs a miss or
/// a lookup, never a wrong answer): the words folded together, then a Fibonacci multiply whose
/// top bits are the slot. One multiply where `addr_hash` makes ten, on the path every packet
/// takes.
#[inline(always)]
pub fn slot_hash(a: &Addr, bits: u32) -> u32 {
    let w = a.words();
    let x = w[0] ^ w[1] ^ w[2] ^ w[3];
    x.wrapping_mul(0x9e37_79b1) >> (32 - bits)
}

/// Hash of arbitrary bytes (host side: Maglev permutations).
#[allow(
    clippy::cast_possible_truncation,
    reason = "Murmur3 mixes in the length modulo 2^32"
)]
pub fn bytes_hash(data: &[u8], seed: u32) -> u32 {
    let mut h = seed;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        h = mix(h, u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut k = [0u8; 4];
        k[..rest.len()].copy_from_slice(rest);
        let k = u32::from_le_bytes(k)
            .wrapping_mul(C1)
            .rotate_left(15)
            .wrapping_mul(C2);
        h ^= k;
    }
    finish(h, data.len() as u32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn slot_hash_stays_in_the_table_and_spreads_ipv4_neighbours() {
        let mut seen = [false; 256];
        for i in 0..=255u8 {
            let h = super::slot_hash(&crate::Addr::v4([10, 0, 1, i]), 8);
            seen[h as usize] = true;
        }
        // 256 consecutive addresses land on most of the 256 slots.
        let used = seen.iter().filter(|&&s| s).count();
        assert!(used > 200, "{used} slots");
    }

    use super::*;

    #[test]
    fn bytes_hash_matches_murmur3_reference_vectors() {
        // Published MurmurHash3_x86_32 test vectors.
        assert_eq!(bytes_hash(b"", 0), 0);
        assert_eq!(bytes_hash(b"", 1), 0x514e_28b7);
        assert_eq!(bytes_hash(b"hello", 0), 0x248b_fa47);
        assert_eq!(bytes_hash(b"Hello, world!", 1234), 0xfaf6_cdb3);
        assert_eq!(
            bytes_hash(b"The quick brown fox jumps over the lazy dog", 0),
            0x2e4f_f723
        );
    }

    #[test]
    fn source_and_addr_hash_equal_murmur3_of_their_bytes_for_both_families() {
        // The IPv4 shortcut (three rounds done at compile time) must give the same value.
        for addr in [
            Addr::v4([10, 0, 0, 11]),
            Addr::v4([255, 255, 255, 255]),
            Addr([0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            // Not IPv4-mapped: only the last word is an IPv4 address.
            Addr([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 11]),
        ] {
            let policy = 0x0003_0007u32;
            let mut bytes = [0u8; 20];
            bytes[..16].copy_from_slice(&addr.0);
            bytes[16..].copy_from_slice(&policy.to_ne_bytes());
            assert_eq!(
                source_hash(&addr, policy),
                bytes_hash(&bytes, 0x5eed_5eed),
                "{addr:?}"
            );
            assert_eq!(
                addr_hash(&addr),
                bytes_hash(&addr.0, 0x5eed_f17e),
                "{addr:?}"
            );
        }
    }

    #[test]
    fn flow_hash_equals_murmur3_of_the_key_bytes() {
        let src = Addr([1; 16]);
        let dst = Addr([2; 16]);
        let mut bytes = [0u8; 40];
        bytes[..16].copy_from_slice(&src.0);
        bytes[16..32].copy_from_slice(&dst.0);
        bytes[32..36].copy_from_slice(&[0x12, 0x34, 0x00, 0x50]);
        bytes[36] = 6;
        let sport = u16::from_ne_bytes([0x12, 0x34]);
        let dport = u16::from_ne_bytes([0x00, 0x50]);
        assert_eq!(
            flow_hash(&src, &dst, sport, dport, 6, 99),
            bytes_hash(&bytes, 99)
        );
    }
}
