//! The address filter's layout, which the data path reads and the agent writes: two planes of
//! [`FILTER_WORDS`] words in LB_FILTER, each a bitmap over [`filter_bit`] of an address. A clear
//! bit means "not ours": the packet goes on to the kernel after one array read.
use crate::{Addr, FILTER_WORDS, filter_bit};

/// Which set an address is looked up in.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plane {
    /// VIPs and node addresses: destinations the data path serves (XDP, uplinks).
    Served = 0,
    /// Local backends of preserve-client-ip services: sources whose replies TC translates.
    PreservedBackends = 1,
}

/// LB_FILTER entries: both planes.
pub const FILTER_ENTRIES: u32 = 2 * FILTER_WORDS;

/// Where `addr`'s bit of `plane` is: (LB_FILTER index, mask within that word).
#[inline(always)]
pub fn position(plane: Plane, addr: &Addr) -> (u32, u64) {
    let bit = filter_bit(addr);
    (plane as u32 * FILTER_WORDS + bit / 64, 1u64 << (bit % 64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planes_do_not_overlap_and_stay_in_the_map() {
        for i in 0..=255u8 {
            let a = Addr::v4([10, 0, 0, i]);
            let (served, mask) = position(Plane::Served, &a);
            let (preserved, mask2) = position(Plane::PreservedBackends, &a);
            assert!(
                served < FILTER_WORDS,
                "plane 0 is the first FILTER_WORDS words"
            );
            assert_eq!(preserved, served + FILTER_WORDS);
            assert!(preserved < FILTER_ENTRIES);
            assert_eq!(mask, mask2);
            assert_eq!(mask.count_ones(), 1);
        }
    }

    #[test]
    fn a_range_of_cluster_ips_takes_a_bit_each() {
        // Services' addresses come from one range: each a bit of its own, so an address of
        // the range that is not (yet) a VIP stays out of the filter.
        let mut seen = [0u64; FILTER_WORDS as usize];
        for i in 0..4096u32 {
            let bit = filter_bit(&Addr::v4((0x0a60_0000 + i).to_be_bytes()));
            let (word, mask) = (bit as usize / 64, 1u64 << (bit % 64));
            assert_eq!(seen[word] & mask, 0, "10.96.0.0 + {i} shares a bit");
            seen[word] |= mask;
        }
    }
}
