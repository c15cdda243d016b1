//! LB_RINGS as room for rings of many sizes, and the size each service's ring gets. Pure: it
//! hands out slot offsets and never touches a map.
//!
//! A ring's size is the smallest listed prime >= 100 x its active backends (at least
//! [`crate::maglev::MIN_SIZE`], at most the configured largest), so each backend holds about 100 slots
//! or more and its share of new flows is within about 1% of its weight's (Maglev apportions
//! slots to within a slot of each quota). The listed primes are the largest below each power of
//! two, so a ring fits a power-of-two block with little waste, and the space is a buddy
//! allocator over such blocks: a block is split in halves to serve a smaller one and merged with
//! its free other half when given back. Blocks never overlap (each is in exactly one free list,
//! or held), and everything given back is whole again once its neighbours are free.
//!
//! The node must pick the same size as every other node for the same service (flows hash to the
//! same slot on each): the size depends only on the backend count and the configured largest.
use std::collections::BTreeSet;

/// Ring sizes a service may get: the largest prime below each power of two from 2^8 to 2^17.
pub const LISTED_SIZES: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131_071,
];
/// Slots per active backend that a ring holds at least (up to the largest ring).
pub const SLOTS_PER_BACKEND: u32 = 100;

/// Blocks from 2^8 slots (the smallest ring, 251) to 2^17 (the largest, 131071).
const MIN_ORDER: u32 = 8;
const MAX_ORDER: u32 = 17;
const ORDERS: usize = (MAX_ORDER - MIN_ORDER + 1) as usize;

/// The ring size of a service with `active` backends of weight > 0, when rings may have up to
/// `largest` slots (a prime in `maglev::MIN_SIZE..=maglev::MAX_SIZE`; it is the top size even if
/// it is not listed).
pub fn ring_size(active: usize, largest: u32) -> u32 {
    let want = u32::try_from(active)
        .unwrap_or(u32::MAX)
        .saturating_mul(SLOTS_PER_BACKEND);
    LISTED_SIZES
        .iter()
        .copied()
        .find(|s| *s >= want && *s < largest)
        .unwrap_or(largest)
}

/// The order of the block a ring of `size` slots takes.
fn order_of(size: u32) -> u32 {
    size.max(1)
        .next_power_of_two()
        .trailing_zeros()
        .clamp(MIN_ORDER, MAX_ORDER)
}

/// Slots of the block a ring of `size` slots takes.
pub fn block_slots(size: u32) -> u32 {
    1 << order_of(size)
}

/// Free blocks of LB_RINGS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingSpace {
    len: u32,
    /// Slots in blocks (`len` down to whole 256-slot blocks).
    blocks: u64,
    /// Offsets of the free blocks of each order (index 0: MIN_ORDER), each aligned to its size.
    free: [BTreeSet<u32>; ORDERS],
}

impl RingSpace {
    /// All of `len` slots free. Slots past the last whole 256-slot block are never used.
    pub fn new(len: u32) -> RingSpace {
        let mut space = RingSpace {
            len,
            blocks: 0,
            free: Default::default(),
        };
        // The largest aligned blocks that fit, from the start: a block's buddy past the end
        // is never free, so such a block never merges beyond `len`.
        let mut at = 0u32;
        'carve: while let Some(left) = len.checked_sub(at) {
            for order in (MIN_ORDER..=MAX_ORDER).rev() {
                let size = 1u32 << order;
                if at.is_multiple_of(size) && size <= left {
                    space.free[(order - MIN_ORDER) as usize].insert(at);
                    at += size;
                    continue 'carve;
                }
            }
            break;
        }
        space.blocks = u64::from(at);
        space
    }

    /// Slots of the space (as LB_RINGS has them).
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots in blocks that rings hold.
    pub fn held_slots(&self) -> u64 {
        self.blocks - self.free_slots()
    }

    /// Slots in free blocks.
    pub fn free_slots(&self) -> u64 {
        (MIN_ORDER..=MAX_ORDER)
            .zip(&self.free)
            .map(|(order, set)| (set.len() as u64) << order)
            .sum()
    }

    /// The offset of a free block for a ring of `size` slots, now held; `None` if no free
    /// block is large enough. The lowest such block, so rings pack towards the start.
    pub fn alloc(&mut self, size: u32) -> Option<u32> {
        let want = order_of(size);
        let from = (want..=MAX_ORDER).find(|o| !self.free[(o - MIN_ORDER) as usize].is_empty())?;
        let at = self.free[(from - MIN_ORDER) as usize].pop_first()?;
        // Split down: the upper halves stay free.
        for order in (want..from).rev() {
            self.free[(order - MIN_ORDER) as usize].insert(at + (1 << order));
        }
        Some(at)
    }

    /// Takes the block of a ring of `size` slots at `at` (a ring a previous agent left), if it
    /// is a block this space hands out and is free; false otherwise (nothing changes).
    pub fn reserve(&mut self, at: u32, size: u32) -> bool {
        let want = order_of(size);
        if !at.is_multiple_of(1 << want) || u64::from(at) + (1u64 << want) > u64::from(self.len) {
            return false;
        }
        let Some(from) = (want..=MAX_ORDER)
            .find(|o| self.free[(o - MIN_ORDER) as usize].contains(&(at & !((1u32 << o) - 1))))
        else {
            return false;
        };
        let mut block = at & !((1u32 << from) - 1);
        self.free[(from - MIN_ORDER) as usize].remove(&block);
        // Split down towards `at`: the halves that do not hold it stay free.
        for order in (want..from).rev() {
            let half = 1u32 << order;
            if at >= block + half {
                self.free[(order - MIN_ORDER) as usize].insert(block);
                block += half;
            } else {
                self.free[(order - MIN_ORDER) as usize].insert(block + half);
            }
        }
        true
    }

    /// Gives back the block of a ring of `size` slots at `at` (from `alloc` or `reserve`),
    /// merged with its free buddies.
    pub fn free(&mut self, at: u32, size: u32) {
        let mut order = order_of(size);
        let mut block = at;
        debug_assert!(
            !self.is_free(block, order),
            "ring block {block} (order {order}) given back twice"
        );
        while order < MAX_ORDER {
            let buddy = block ^ (1 << order);
            if !self.free[(order - MIN_ORDER) as usize].remove(&buddy) {
                break;
            }
            block = block.min(buddy);
            order += 1;
        }
        self.free[(order - MIN_ORDER) as usize].insert(block);
    }

    /// Whether a block of `order` at `at` lies inside a free block.
    fn is_free(&self, at: u32, order: u32) -> bool {
        (order..=MAX_ORDER)
            .any(|o| self.free[(o - MIN_ORDER) as usize].contains(&(at & !((1u32 << o) - 1))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maglev;

    #[test]
    fn listed_sizes_are_the_largest_primes_below_powers_of_two() {
        for (i, s) in LISTED_SIZES.iter().enumerate() {
            let power = 1u32 << (MIN_ORDER + u32::try_from(i).unwrap());
            assert!(maglev::is_prime(*s), "{s}");
            assert!(
                (*s + 1..power).all(|n| !maglev::is_prime(n)),
                "{s} below {power}"
            );
            assert_eq!(block_slots(*s), power);
        }
        assert_eq!(LISTED_SIZES[0], maglev::MIN_SIZE);
        assert_eq!(LISTED_SIZES[LISTED_SIZES.len() - 1], maglev::MAX_SIZE);
    }

    #[test]
    fn a_ring_has_100_slots_per_backend_within_the_bounds() {
        assert_eq!(ring_size(0, 131_071), 251);
        assert_eq!(ring_size(1, 131_071), 251);
        assert_eq!(ring_size(2, 131_071), 251);
        assert_eq!(ring_size(3, 131_071), 509);
        assert_eq!(ring_size(10, 131_071), 1021);
        assert_eq!(ring_size(11, 131_071), 2039);
        assert_eq!(ring_size(163, 131_071), 16381);
        assert_eq!(ring_size(1310, 131_071), 131_071);
        assert_eq!(ring_size(5000, 131_071), 131_071, "the largest bounds it");
        assert_eq!(ring_size(200, 16381), 16381);
        // A largest size that is not listed is the top size.
        assert_eq!(ring_size(100, 10007), 10007);
        assert_eq!(ring_size(40, 10007), 4093);
        for n in 0..2000 {
            let s = ring_size(n, 131_071);
            assert!(s >= 251 && (s >= 100 * u32::try_from(n).unwrap() || s == 131_071));
        }
    }

    /// Shares of new flows at each backend count's ring size: with equal weights each backend
    /// is within 1% of its share (it has >= 100 slots and Maglev's apportionment is within one
    /// slot); with weights 1..=5 within 1% or the apportionment's bound of (1 + n * share) / 2
    /// slots, whichever is larger (a light backend's share is below 100 slots).
    #[test]
    fn shares_stay_within_1_percent_of_weights_for_every_ring_size() {
        let mut worst = (0f64, 0usize);
        for n in [
            1usize, 2, 3, 4, 5, 6, 10, 11, 20, 21, 40, 41, 81, 100, 163, 164, 400, 1310,
        ] {
            for mixed in [false, true] {
                let size = ring_size(n, maglev::MAX_SIZE);
                let keys: Vec<String> = (0..n)
                    .map(|i| format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256))
                    .collect();
                let weights: Vec<u32> = (0..n)
                    .map(|i| {
                        if mixed {
                            1 + u32::try_from(i % 5).unwrap()
                        } else {
                            1
                        }
                    })
                    .collect();
                let entries: Vec<maglev::Entry<'_>> = keys
                    .iter()
                    .zip(&weights)
                    .map(|(k, w)| maglev::Entry {
                        key: k.as_bytes(),
                        weight: *w,
                    })
                    .collect();
                let ring = maglev::build(&entries, size, 7).unwrap();
                let mut counts = vec![0u32; n];
                for slot in &ring {
                    counts[*slot as usize] += 1;
                }
                let total: u32 = weights.iter().sum();
                for (i, c) in counts.iter().enumerate() {
                    let share = f64::from(weights[i]) / f64::from(total);
                    let expected = share * f64::from(size);
                    let err = (f64::from(*c) - expected).abs();
                    let ctx = format!(
                        "n={n} mixed={mixed} ring {size}: backend {i} has {c} slots, {expected:.1} expected"
                    );
                    if mixed {
                        let bound = (0.01 * expected).max(f64::midpoint(1.0, n as f64 * share));
                        assert!(err <= bound + 1e-9, "{ctx}");
                    } else {
                        assert!(err <= 0.01 * expected + 1e-9, "{ctx}");
                        if err / expected > worst.0 {
                            worst = (err / expected, n);
                        }
                    }
                }
            }
        }
        eprintln!(
            "equal weights: largest error {:.3}% of a share (n = {})",
            worst.0 * 100.0,
            worst.1
        );
    }

    /// Held blocks as (start, end) slot ranges must never overlap, nor overlap a free block.
    fn assert_disjoint(space: &RingSpace, held: &[(u32, u32)]) {
        let mut ranges: Vec<(u32, u32)> = held
            .iter()
            .map(|(at, size)| (*at, at + block_slots(*size)))
            .collect();
        for (order, set) in (MIN_ORDER..=MAX_ORDER).zip(&space.free) {
            ranges.extend(set.iter().map(|at| (*at, at + (1 << order))));
        }
        ranges.sort_unstable();
        for pair in ranges.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{pair:?} overlap");
        }
        assert!(ranges.last().is_none_or(|r| r.1 <= space.len()));
        let held_slots: u64 = held.iter().map(|(_, s)| u64::from(block_slots(*s))).sum();
        assert_eq!(
            held_slots + space.free_slots(),
            u64::from(space.len() & !255)
        );
        assert_eq!(held_slots, space.held_slots());
    }

    #[test]
    fn blocks_never_overlap_and_everything_given_back_is_whole_again() {
        // A length that is not a power of two: blocks of several orders at the start.
        let len = 3 * 131_072 + 5 * 256 + 100;
        let fresh = RingSpace::new(len);
        let mut space = fresh.clone();
        let mut held: Vec<(u32, u32)> = Vec::new();
        // A fixed pseudo-random walk of allocations and frees of every size.
        let mut x = 0x1234_5678u32;
        for step in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let size = LISTED_SIZES[(x % 10) as usize];
            if !x.is_multiple_of(3) {
                if let Some(at) = space.alloc(size) {
                    assert!(at.is_multiple_of(block_slots(size)), "aligned");
                    held.push((at, size));
                } else {
                    assert!(
                        space.free_slots() < u64::from(block_slots(size))
                            || !(order_of(size)..=MAX_ORDER)
                                .any(|o| !space.free[(o - MIN_ORDER) as usize].is_empty()),
                        "a free block large enough was not used"
                    );
                }
            } else if !held.is_empty() {
                let (at, size) = held.swap_remove((x as usize / 3) % held.len());
                space.free(at, size);
            }
            if step % 97 == 0 {
                assert_disjoint(&space, &held);
            }
        }
        assert_disjoint(&space, &held);
        for (at, size) in held.drain(..) {
            space.free(at, size);
        }
        assert_eq!(space, fresh, "every block merged back");
    }

    #[test]
    fn a_previous_agents_rings_are_reserved_where_they_are() {
        let mut space = RingSpace::new(4 * 131_072);
        assert!(space.reserve(131_072 + 1024, 1021));
        assert!(!space.reserve(131_072 + 1024, 251), "already held");
        assert!(
            !space.reserve(131_072 + 1024 + 256, 251),
            "inside a held block"
        );
        assert!(!space.reserve(300, 251), "not aligned");
        assert!(!space.reserve(4 * 131_072, 251), "past the end");
        assert!(space.reserve(0, 251));
        assert!(space.reserve(256, 251));
        assert_disjoint(&space, &[(131_072 + 1024, 1021), (0, 251), (256, 251)]);
        // The allocator goes around what is reserved.
        let at = space.alloc(509).unwrap();
        assert_eq!(at, 512);
        space.free(131_072 + 1024, 1021);
        space.free(0, 251);
        space.free(256, 251);
        space.free(512, 509);
        assert_eq!(space, RingSpace::new(4 * 131_072));
    }

    #[test]
    fn a_full_space_says_so_and_room_comes_back() {
        let mut space = RingSpace::new(1024);
        assert_eq!(space.alloc(1021), Some(0));
        assert_eq!(space.alloc(251), None);
        space.free(0, 1021);
        let quarter: Vec<u32> = (0..4).map(|_| space.alloc(251).unwrap()).collect();
        assert_eq!(quarter, [0, 256, 512, 768]);
        assert_eq!(space.alloc(509), None, "no block of 512 is free");
        space.free(256, 251);
        space.free(0, 251);
        assert_eq!(space.alloc(509), Some(0), "two quarters merged");
    }
}
