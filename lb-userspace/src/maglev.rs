//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016): turns a service's backends
//! into the ring the XDP program indexes. Pure and deterministic; it never touches a map.
//!
//! Every node must build the same ring from the same configuration, so the result depends only
//! on the backends' keys and weights (not their order), the ring size and the seed. The
//! permutation, the clock, the apportionment and the tie-breaks below are therefore a cross-node
//! contract: changing any of them moves flows during a rolling upgrade.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, binary_heap::PeekMut};

use lb_common::{NO_BACKEND, hash::bytes_hash};

/// Smallest ring size accepted (as Cilium): below it a backend's share is too coarse to mean much.
pub const MIN_SIZE: u32 = 251;
/// Largest ring size accepted (as Cilium; 2^17 - 1, prime).
pub const MAX_SIZE: u32 = 131_071;
/// Largest weight (u16). The ring runs out of resolution first: a backend with less than
/// 1/(2 * size) of the total weight gets no slot, 1/32762 in the default ring. The bound also
/// keeps the clock comparisons exact in u64 (see `Due`).
pub const MAX_WEIGHT: u32 = 65_535;

/// Rounds of the Feistel permutation behind each preference list: four (as Luby-Rackoff) so
/// that two backends' lists look independent.
const ROUNDS: usize = 4;
/// Salt that derives one seed per round from the caller's seed.
const ROUND_SALT: u32 = 0x6d61_676c; // "magl"

/// One backend as Maglev sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Stable identity, equal on every node for the same backend (e.g. `10.1.1.2:8080`).
    pub key: &'a [u8],
    /// Relative share of the ring; 0 = drained, gets no slot.
    pub weight: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("ring size {size} is out of range {MIN_SIZE}..={MAX_SIZE}")]
    SizeOutOfRange { size: u32 },
    #[error("ring size {size} is not prime")]
    SizeNotPrime { size: u32 },
    #[error("backend {index} has weight {weight}, over the maximum {MAX_WEIGHT}")]
    WeightTooLarge { index: usize, weight: u32 },
    #[error("backends {first} and {second} have the same key")]
    DuplicateKey { first: usize, second: usize },
    #[error("{count} backends do not fit in u32 ring entries")]
    TooManyEntries { count: usize },
}

/// Whether `n` is prime. Trial division: sizes are checked once per rebuild, and the worst case
/// (a prime near u32::MAX) is about 22k divisions.
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// Builds a ring of `size` slots, each holding an index into `entries`, or [`NO_BACKEND`] in
/// every slot when no entry has weight > 0.
///
/// As in the paper, each backend walks a preference list (a permutation of the slots keyed by
/// its key) and slots go to the backends that reach them first. Three changes, all for churn:
/// at 16381 slots and N = 3..1000, removing a backend made the paper's loop move up to 2.6% of
/// the ring beyond the backend's own slots (3.7% with weights 1..=5); this moves at most about
/// 1% (1.1% with weights; see the tests).
/// - Quotas first: the slots are apportioned by weight (Sainte-Laguë), so each backend ends
///   within about half a slot of its exact share, and stops at its quota.
/// - Visits, not turns, are scheduled: a backend's k-th visit is due at a fixed time,
///   `-ln(1 - (k + 1/2) / (size + 1)) / weight`, whether or not its earlier visits found a free
///   slot. In the paper's loop, a backend that takes a slot freed by a removed backend reaches
///   each later preference a turn early, and the shift cascades; here a change can only spread
///   through quotas. The exponential clock is the weighted rendezvous race (a backend reaches
///   a slot first with odds proportional to its weight), so quotas rarely have to bend the
///   ring. With equal weights it is plain rounds: round k is each backend's k-th preference.
/// - A keyed Feistel permutation instead of `offset + k * skip`: two arithmetic progressions
///   meet each other's slots in a fixed linear pattern, and the occasional pair of skips in a
///   small ratio made single removals move up to 2.4% extra at N = 7.
///
/// Scaling every weight by the same factor gives the same ring.
pub fn build(entries: &[Entry<'_>], size: u32, seed: u32) -> Result<Vec<u32>, MaglevError> {
    if !(MIN_SIZE..=MAX_SIZE).contains(&size) {
        return Err(MaglevError::SizeOutOfRange { size });
    }
    if !is_prime(size) {
        return Err(MaglevError::SizeNotPrime { size });
    }
    if entries.len() >= NO_BACKEND as usize {
        return Err(MaglevError::TooManyEntries {
            count: entries.len(),
        });
    }
    if let Some((index, e)) = entries
        .iter()
        .enumerate()
        .find(|(_, e)| e.weight > MAX_WEIGHT)
    {
        return Err(MaglevError::WeightTooLarge {
            index,
            weight: e.weight,
        });
    }

    // Key order makes the ring independent of the caller's order, and puts duplicates side by
    // side. Drained entries take part in the duplicate check but not in the ring.
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_unstable_by(|&a, &b| entries[a].key.cmp(entries[b].key).then(a.cmp(&b)));
    if let Some(pair) = order
        .windows(2)
        .find(|pair| entries[pair[0]].key == entries[pair[1]].key)
    {
        return Err(MaglevError::DuplicateKey {
            first: pair[0],
            second: pair[1],
        });
    }

    let mut round_seeds = [0u32; ROUNDS];
    for (salt, s) in (ROUND_SALT..).zip(round_seeds.iter_mut()) {
        *s = bytes_hash(&seed.to_le_bytes(), salt);
    }
    // Backends of equal weight share one clock, so they move in rounds: round k is the k-th
    // visit of each, in key order. Rounds due at exactly the same time go in weight order.
    let mut by_weight: BTreeMap<u32, Vec<Backend>> = BTreeMap::new();
    for i in order.into_iter().filter(|&i| entries[i].weight > 0) {
        by_weight
            .entry(entries[i].weight)
            .or_default()
            .push(Backend {
                // Fits: entries.len() < NO_BACKEND, checked above.
                index: u32::try_from(i).unwrap_or(NO_BACKEND),
                prefs: Preferences::new(entries[i].key, &round_seeds, size),
                quota: 0,
            });
    }
    let mut classes: Vec<Class> = by_weight
        .into_iter()
        .map(|(weight, members)| Class {
            weight,
            members,
            round: 0,
        })
        .collect();
    apportion(&mut classes, size);

    let times = visit_times(size);
    let first = times.first().copied().unwrap_or(0);
    let mut rounds: BinaryHeap<Reverse<Due>> = BinaryHeap::new();
    for (tie, class) in classes.iter_mut().enumerate() {
        class.members.retain(|b| b.quota > 0);
        if !class.members.is_empty() {
            rounds.push(Reverse(Due::new(first, class.weight, tie)));
        }
    }
    let mut ring = vec![NO_BACKEND; size as usize];
    // Ends with every slot taken: the quotas sum to `size`, so while a slot is free some
    // backend is under quota, and it still has unvisited preferences (had it visited them all,
    // every slot would be taken).
    while let Some(mut next) = rounds.peek_mut() {
        let class = &mut classes[next.0.tie as usize];
        let k = class.round;
        class.members.retain_mut(|b| {
            let slot = &mut ring[b.prefs.nth(k) as usize];
            if *slot == NO_BACKEND {
                *slot = b.index;
                b.quota -= 1;
            }
            b.quota > 0
        });
        class.round += 1;
        match times.get(class.round as usize) {
            Some(&t) if !class.members.is_empty() => next.0.num = t,
            _ => {
                PeekMut::pop(next);
            }
        }
    }
    Ok(ring)
}

/// Backends of one weight, in key order, still under quota once the ring is being filled.
struct Class {
    weight: u32,
    members: Vec<Backend>,
    /// Visits each member has made.
    round: u32,
}

struct Backend {
    /// Index into the caller's `entries`.
    index: u32,
    prefs: Preferences,
    /// Slots still to take.
    quota: u32,
}

/// A backend's preference list: a Feistel permutation keyed by hashes of its key, over the
/// smallest power of four that holds `size` slots (balanced halves), cycle-walked back into
/// `0..size`. Computed per visit, so a list costs no memory.
struct Preferences {
    round_keys: [u32; ROUNDS],
    half_bits: u32,
    size: u32,
}

impl Preferences {
    fn new(key: &[u8], round_seeds: &[u32; ROUNDS], size: u32) -> Self {
        let bits = u32::BITS - (size - 1).leading_zeros();
        Preferences {
            round_keys: round_seeds.map(|s| bytes_hash(key, s)),
            half_bits: bits.div_ceil(2),
            size,
        }
    }

    /// The k-th preferred slot, for k < size. Cycle-walking stays in k's cycle of the
    /// permutation, which holds k itself, so it ends; the domain is under 4 * size, so it
    /// takes under four steps on average.
    fn nth(&self, k: u32) -> u32 {
        let mut x = k;
        loop {
            x = self.permute(x);
            if x < self.size {
                return x;
            }
        }
    }

    fn permute(&self, x: u32) -> u32 {
        let mask = (1 << self.half_bits) - 1;
        let (mut hi, mut lo) = (x >> self.half_bits, x & mask);
        for key in self.round_keys {
            (hi, lo) = (lo, hi ^ (round(lo, key) & mask));
        }
        (hi << self.half_bits) | lo
    }
}

/// Feistel round function: MurmurHash3's finaliser over the half and the round key. Cheap,
/// and every input bit reaches every output bit.
#[inline]
fn round(half: u32, key: u32) -> u32 {
    let mut h = half ^ key;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// A moment `num / weight` on a class's clock, ordered exactly (products stay below 2^53:
/// `num` < 2^37, weight < 2^16); equal moments go in weight order.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Due {
    num: u64,
    weight: u64,
    /// Position of the class in weight order.
    tie: u32,
}

impl Due {
    fn new(num: u64, weight: u32, tie: usize) -> Self {
        // tie < number of classes <= entries.len() < u32::MAX, checked in `build`.
        Due {
            num,
            weight: u64::from(weight),
            tie: u32::try_from(tie).unwrap_or(u32::MAX),
        }
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.num * other.weight)
            .cmp(&(other.num * self.weight))
            .then(self.tie.cmp(&other.tie))
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Sainte-Laguë apportionment of `size` slots: a backend's seat k (from 0) falls due at
/// `(2k + 1) / weight`, and seats are handed out in that order (a class's round in key order)
/// until all are given. Every count is within about half a slot of `size * weight / total`.
fn apportion(classes: &mut [Class], size: u32) {
    let mut rounds: BinaryHeap<Reverse<Due>> = classes
        .iter()
        .enumerate()
        .map(|(tie, c)| Reverse(Due::new(1, c.weight, tie)))
        .collect();
    let mut left = size as usize;
    while left > 0 {
        let Some(mut next) = rounds.peek_mut() else {
            return;
        };
        let members = &mut classes[next.0.tie as usize].members;
        for b in members.iter_mut().take(left) {
            b.quota += 1;
        }
        left = left.saturating_sub(members.len());
        next.0.num += 2;
    }
}

/// Visit k's time on a weight-1 clock, `log2((2 * size + 2) / (2 * size + 1 - 2 * k))` in 32.32
/// fixed point: a scaled `-ln(1 - (k + 1/2) / (size + 1))`. Integer arithmetic only, so every
/// node computes the same bits; float `ln` is not guaranteed to round alike across libms.
fn visit_times(size: u32) -> Vec<u64> {
    let top = 2 * u64::from(size) + 2;
    let top_log = log2_fixed(top);
    (0..u64::from(size))
        .map(|k| top_log.saturating_sub(log2_fixed(top - 1 - 2 * k)))
        .collect()
}

/// `log2(x)` in 32.32 fixed point, for x >= 1, by repeated squaring of the mantissa.
fn log2_fixed(x: u64) -> u64 {
    let x = x.max(1);
    let int = x.ilog2();
    // The mantissa in [1, 2) with 63 fraction bits; its square fits in u128.
    let mut m = u128::from(x) << (63 - int);
    let mut frac = 0u64;
    for bit in (0..32).rev() {
        m = (m * m) >> 63;
        if m >> 64 != 0 {
            m >>= 1;
            frac |= 1 << bit;
        }
    }
    (u64::from(int) << 32) | frac
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const M: u32 = 16381;
    /// Backend counts the fixed tests sample, 3 to 1000.
    const NS: [usize; 9] = [3, 7, 10, 50, 100, 200, 300, 500, 1000];
    const SEED: u32 = 0x1b_5eed;

    fn keys(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256).into_bytes())
            .collect()
    }

    /// 1..=5, spread over the key order.
    fn mixed_weight(i: usize) -> u32 {
        u32::try_from(i * 7 % 5).unwrap() + 1
    }

    fn weights(n: usize, mixed: bool) -> Vec<u32> {
        (0..n)
            .map(|i| if mixed { mixed_weight(i) } else { 1 })
            .collect()
    }

    fn entries<'a>(keys: &'a [Vec<u8>], weights: &[u32]) -> Vec<Entry<'a>> {
        keys.iter()
            .zip(weights)
            .map(|(k, &weight)| Entry { key: k, weight })
            .collect()
    }

    /// What the data path actually sees: the backend behind each slot.
    fn key_per_slot<'a>(ring: &[u32], entries: &[Entry<'a>]) -> Vec<Option<&'a [u8]>> {
        ring.iter()
            .map(|&i| (i != NO_BACKEND).then(|| entries[i as usize].key))
            .collect()
    }

    fn moved(a: &[Option<&[u8]>], b: &[Option<&[u8]>]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
    }

    fn counts(ring: &[u32], n: usize) -> Vec<u32> {
        let mut c = vec![0; n];
        for &i in ring.iter().filter(|&&i| i != NO_BACKEND) {
            c[i as usize] += 1;
        }
        c
    }

    /// Backends to remove from N: the ends, the middle and one in between.
    fn removals(n: usize) -> Vec<usize> {
        let mut r = vec![0, n / 2, n * 7 / 11, n - 1];
        r.dedup();
        r
    }

    /// Fraction of slots that move when backend `r` leaves, and r's own fraction (which must
    /// all move).
    fn removal_moves(
        es: &[Entry<'_>],
        before: &[u32],
        size: u32,
        seed: u32,
        r: usize,
    ) -> (f64, f64) {
        let mut without: Vec<Entry<'_>> = es.to_vec();
        without.remove(r);
        let after = build(&without, size, seed).unwrap();
        let d = moved(&key_per_slot(before, es), &key_per_slot(&after, &without));
        let own = f64::from(counts(before, es.len())[r]) / f64::from(size);
        assert!(
            d >= own,
            "the removed backend's {own} must all move, moved {d}"
        );
        (d, own)
    }

    #[test]
    fn is_prime_matches_a_sieve() {
        let n = 20_000;
        let mut sieve = vec![true; n];
        sieve[0] = false;
        sieve[1] = false;
        for i in 2..n {
            if sieve[i] {
                for j in (i * i..n).step_by(i) {
                    sieve[j] = false;
                }
            }
        }
        for (i, &p) in sieve.iter().enumerate() {
            assert_eq!(is_prime(u32::try_from(i).unwrap()), p, "{i}");
        }
        assert!(is_prime(MAX_SIZE));
        assert!(is_prime(2_147_483_647));
        assert!(is_prime(4_294_967_291)); // Largest u32 prime.
        assert!(!is_prime(u32::MAX)); // 3 * 5 * 17 * 257 * 65537.
        assert!(!is_prime(65_537 * 65_521)); // Product of two primes near 2^16.
    }

    #[test]
    fn sizes_must_be_prime_and_in_range() {
        let ks = keys(3);
        let es = entries(&ks, &[1, 1, 1]);
        for size in [0, 1, 2, 3, 241, MAX_SIZE + 2, 131_101, u32::MAX] {
            assert_eq!(
                build(&es, size, 0),
                Err(MaglevError::SizeOutOfRange { size })
            );
        }
        for size in [253, 16_383, 65_536, MAX_SIZE - 2] {
            assert_eq!(build(&es, size, 0), Err(MaglevError::SizeNotPrime { size }));
        }
        for size in [MIN_SIZE, 1021, 4093, M, MAX_SIZE] {
            assert_eq!(build(&es, size, 0).unwrap().len(), size as usize);
        }
    }

    #[test]
    fn weights_over_the_maximum_are_rejected() {
        let ks = keys(3);
        assert!(build(&entries(&ks, &[1, MAX_WEIGHT, 0]), M, 0).is_ok());
        assert_eq!(
            build(&entries(&ks, &[1, MAX_WEIGHT + 1, 0]), M, 0),
            Err(MaglevError::WeightTooLarge {
                index: 1,
                weight: MAX_WEIGHT + 1
            })
        );
        assert_eq!(
            build(&entries(&ks, &[0, 0, u32::MAX]), M, 0),
            Err(MaglevError::WeightTooLarge {
                index: 2,
                weight: u32::MAX
            })
        );
    }

    #[test]
    fn duplicate_keys_are_rejected_with_their_indices() {
        let es = [
            Entry {
                key: b"b",
                weight: 1,
            },
            Entry {
                key: b"a",
                weight: 1,
            },
            Entry {
                key: b"c",
                weight: 1,
            },
            Entry {
                key: b"a",
                weight: 0,
            },
        ];
        assert_eq!(
            build(&es, M, 0),
            Err(MaglevError::DuplicateKey {
                first: 1,
                second: 3
            })
        );
        // A drained duplicate is still a caller bug.
        assert!(build(&es[..3], M, 0).is_ok());
    }

    #[test]
    fn without_weight_every_slot_is_no_backend() {
        assert_eq!(build(&[], M, 0).unwrap(), vec![NO_BACKEND; M as usize]);
        let ks = keys(5);
        assert_eq!(
            build(&entries(&ks, &[0; 5]), M, 0).unwrap(),
            vec![NO_BACKEND; M as usize]
        );
    }

    #[test]
    fn every_slot_is_filled_and_drained_backends_get_none() {
        let ks = keys(10);
        let ws = [0, 3, 0, 1, 1, 0, 5, 2, 0, 1];
        let ring = build(&entries(&ks, &ws), M, SEED).unwrap();
        assert!(ring.iter().all(|&i| (i as usize) < ks.len()));
        let c = counts(&ring, ks.len());
        for (i, &w) in ws.iter().enumerate() {
            assert_eq!(
                c[i] == 0,
                w == 0,
                "backend {i} weight {w} has {} slots",
                c[i]
            );
        }
        // A single backend takes the whole ring.
        let ring = build(&entries(&ks[..1], &[7]), M, SEED).unwrap();
        assert!(ring.iter().all(|&i| i == 0));
    }

    /// Target: each share within 1 percentage point of weight / total, and within 5% relative
    /// where the expected count is >= 200. The apportionment does far better: every count is
    /// within `(1 + n * w / total) / 2` slots of its quota (at most one slot with equal
    /// weights). Measured over NS: largest error 0.0055 percentage points, and 0.27% relative
    /// where the expected count is >= 200 (one slot in 365), so the relative bound is 0.5%.
    #[test]
    fn shares_follow_weights_within_about_half_a_slot() {
        for mixed in [false, true] {
            for n in NS {
                let ks = keys(n);
                let ws = weights(n, mixed);
                let ring = build(&entries(&ks, &ws), M, SEED).unwrap();
                let total: u32 = ws.iter().sum();
                for (i, &c) in counts(&ring, n).iter().enumerate() {
                    let share = f64::from(ws[i]) / f64::from(total);
                    let expected = share * f64::from(M);
                    let err = (f64::from(c) - expected).abs();
                    let ctx = format!(
                        "mixed={mixed} n={n} backend {i}: {c} slots, {expected:.1} expected"
                    );
                    assert!(err <= f64::midpoint(1.0, n as f64 * share) + 1e-9, "{ctx}");
                    assert!(err / f64::from(M) <= 0.01, "{ctx}");
                    if expected >= 200.0 {
                        assert!(err / expected <= 0.005, "{ctx}");
                    }
                }
            }
        }
    }

    /// Target: removing one of N backends moves at most 1/N + 1% of the slots: its own, plus
    /// at most 1% that the others trade among themselves. Met with equal weights: worst 0.96%
    /// over 24 seeds x 12 removed backends per N (`maglev_churn_report`), at N = 200..300,
    /// where quotas chain furthest: 16381 = 81.9 * 200 becomes 82.3 * 199, and a freed slot
    /// taken by a backend already at quota pushes that backend's last slot on, until the chain
    /// reaches a backend whose quota grew. The paper's loop: up to 2.6% (N = 7), 2.1% (N = 200).
    #[test]
    fn removing_one_of_n_equal_backends_moves_at_most_1_percent_beyond_its_share() {
        check_removals(false, 0.01);
    }

    /// With weights, the removed backend's share replaces 1/N, and the 1% is not quite met: a
    /// heavy backend frees more slots and so starts more chains. Worst measured with weights
    /// 1..=5: 1.10% beyond its share (N = 300), means 0.1..0.7% per N; so each removal is held
    /// to 1.25% and the mean over the sample to 1%. The paper's loop: up to 3.7%.
    #[test]
    fn removing_one_of_n_weighted_backends_moves_at_most_1_25_percent_beyond_its_share() {
        check_removals(true, 0.0125);
    }

    fn check_removals(mixed: bool, bound: f64) {
        for n in NS {
            let ks = keys(n);
            let es = entries(&ks, &weights(n, mixed));
            let before = build(&es, M, SEED).unwrap();
            let total: u32 = es.iter().map(|e| e.weight).sum();
            // Moved beyond the removed backend's share of the weight (1/N when equal).
            let excess: Vec<f64> = removals(n)
                .into_iter()
                .map(|r| {
                    let (d, _) = removal_moves(&es, &before, M, SEED, r);
                    d - f64::from(es[r].weight) / f64::from(total)
                })
                .collect();
            let mean = excess.iter().sum::<f64>() / excess.len() as f64;
            assert!(excess.iter().all(|&e| e <= bound), "n={n}: {excess:?}");
            assert!(mean <= 0.01, "n={n}: {excess:?}");
        }
    }

    /// Target: adding a backend to N moves 1/(N+1) +- 1% of the slots (its weight's share with
    /// mixed weights). Worst over 24 seeds: 0.85% beyond its share (the paper's loop: 1.9%).
    #[test]
    fn adding_a_backend_moves_about_its_share() {
        for mixed in [false, true] {
            for n in NS {
                let ks = keys(n + 1);
                let ws = weights(n + 1, mixed);
                let before_es = entries(&ks[..n], &ws[..n]);
                let after_es = entries(&ks, &ws);
                let before = build(&before_es, M, SEED).unwrap();
                let after = build(&after_es, M, SEED).unwrap();
                let d = moved(
                    &key_per_slot(&before, &before_es),
                    &key_per_slot(&after, &after_es),
                );
                let share = f64::from(ws[n]) / f64::from(ws.iter().sum::<u32>());
                assert!(
                    (share - 0.01..=share + 0.01).contains(&d),
                    "mixed={mixed} n={n}: moved {d}, new backend's share {share}"
                );
            }
        }
    }

    #[test]
    fn draining_a_backend_gives_the_same_ring_as_removing_it() {
        for mixed in [false, true] {
            for n in [3, 10, 100, 1000] {
                let ks = keys(n);
                let ws = weights(n, mixed);
                let es = entries(&ks, &ws);
                for r in removals(n) {
                    let mut drained = es.clone();
                    drained[r].weight = 0;
                    let mut removed = es.clone();
                    removed.remove(r);
                    let d = build(&drained, M, SEED).unwrap();
                    assert!(!d.contains(&u32::try_from(r).unwrap()));
                    let r_ring = build(&removed, M, SEED).unwrap();
                    assert_eq!(
                        key_per_slot(&d, &drained),
                        key_per_slot(&r_ring, &removed),
                        "mixed={mixed} n={n} r={r}"
                    );
                }
            }
        }
    }

    #[test]
    fn order_of_entries_does_not_change_the_ring() {
        for mixed in [false, true] {
            for n in [3, 50, 1000] {
                let ks = keys(n);
                let ws = weights(n, mixed);
                let es = entries(&ks, &ws);
                let mut reversed = es.clone();
                reversed.reverse();
                let mut rotated = es.clone();
                rotated.rotate_left(n / 3);
                let ring = build(&es, M, SEED).unwrap();
                for other in [reversed, rotated] {
                    let ring2 = build(&other, M, SEED).unwrap();
                    // Same backends behind the slots, indices into the caller's own order.
                    assert_eq!(key_per_slot(&ring, &es), key_per_slot(&ring2, &other));
                }
            }
        }
    }

    #[test]
    fn another_seed_gives_another_ring() {
        let ks = keys(100);
        let es = entries(&ks, &weights(100, false));
        let a = build(&es, M, 1).unwrap();
        let b = build(&es, M, 2).unwrap();
        assert_eq!(build(&es, M, 1).unwrap(), a);
        let d = moved(&key_per_slot(&a, &es), &key_per_slot(&b, &es));
        // Independent rings agree on about 1/N of the slots.
        assert!(d > 0.95, "only {d} of the slots differ");
    }

    #[test]
    fn scaling_all_weights_gives_the_same_ring() {
        let ks = keys(50);
        let ws = weights(50, true);
        let ring = build(&entries(&ks, &ws), M, SEED).unwrap();
        for factor in [2, 7, MAX_WEIGHT / 5] {
            let scaled: Vec<u32> = ws.iter().map(|w| w * factor).collect();
            assert_eq!(build(&entries(&ks, &scaled), M, SEED).unwrap(), ring);
        }
    }

    #[test]
    fn more_backends_than_slots_gives_each_at_most_one() {
        let ks = keys(1000);
        let es = entries(&ks, &weights(1000, false));
        let ring = build(&es, MIN_SIZE, SEED).unwrap();
        let c = counts(&ring, 1000);
        assert_eq!(c.iter().filter(|&&c| c == 1).count(), MIN_SIZE as usize);
        assert!(c.iter().all(|&c| c <= 1));
    }

    #[test]
    fn extreme_weights_still_fill_the_ring() {
        let ks = keys(101);
        let mut ws = vec![1; 101];
        ws[40] = MAX_WEIGHT;
        let ring = build(&entries(&ks, &ws), M, SEED).unwrap();
        let c = counts(&ring, 101);
        assert_eq!(c.iter().sum::<u32>(), M);
        // 65535 / 65635 of the ring, within the apportionment's (1 + n * share) / 2 = 51 slots.
        let expected = f64::from(M) * 65535.0 / 65635.0;
        assert!((f64::from(c[40]) - expected).abs() <= 51.0, "{}", c[40]);
    }

    #[test]
    fn the_largest_ring_builds() {
        let ks = keys(20);
        let ring = build(&entries(&ks, &weights(20, true)), MAX_SIZE, SEED).unwrap();
        assert!(!ring.contains(&NO_BACKEND));
    }

    #[test]
    fn visit_times_increase() {
        for size in [MIN_SIZE, M] {
            let t = visit_times(size);
            assert!(t.windows(2).all(|w| w[0] < w[1]));
            // log2((2M + 2) / 3) at the last visit.
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a positive figure far below 2^64"
            )]
            let last = ((f64::from(2 * size + 2) / 3.0).log2() * 2f64.powi(32)) as u64;
            assert!(t[t.len() - 1].abs_diff(last) <= 4);
        }
        assert_eq!(log2_fixed(1), 0);
        assert_eq!(log2_fixed(1 << 40), 40 << 32);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a positive figure far below 2^64"
        )]
        let log2_3 = (3f64.log2() * 2f64.powi(32)) as u64;
        assert_eq!(log2_fixed(3), log2_3);
    }

    #[test]
    fn preference_lists_are_permutations_of_the_slots() {
        for size in [MIN_SIZE, 257, 1021, M, MAX_SIZE] {
            let prefs = Preferences::new(b"10.0.0.1:80", &[1, 2, 3, 4], size);
            let mut seen = vec![false; size as usize];
            for k in 0..size {
                let slot = prefs.nth(k) as usize;
                assert!(!seen[slot], "size {size}: slot {slot} twice");
                seen[slot] = true;
            }
        }
    }

    /// The numbers quoted above: `cargo test --release -p lb-userspace maglev_churn_report --
    /// --ignored --nocapture`.
    #[test]
    #[ignore = "report; takes a while"]
    fn maglev_churn_report() {
        for mixed in [false, true] {
            for n in NS {
                let ks = keys(n + 1);
                let ws = weights(n + 1, mixed);
                let es = entries(&ks[..n], &ws[..n]);
                let plus = entries(&ks, &ws);
                let (mut max, mut sum, mut count, mut add) = (0f64, 0f64, 0, 0f64);
                for seed in 0..24 {
                    let before = build(&es, M, seed).unwrap();
                    for j in 0..12 {
                        let (d, own) = removal_moves(&es, &before, M, seed, j * (n - 1) / 11);
                        let e = d - own;
                        max = max.max(e);
                        sum += e;
                        count += 1;
                    }
                    let b = build(&plus, M, seed).unwrap();
                    let share = f64::from(ws[n]) / f64::from(ws.iter().sum::<u32>());
                    let d = moved(&key_per_slot(&before, &es), &key_per_slot(&b, &plus));
                    add = add.max((d - share).abs());
                }
                eprintln!(
                    "mixed={mixed} n={n}: removal excess max {max:.4} mean {:.4}; add |excess| max {add:.4}",
                    sum / f64::from(count)
                );
            }
        }
    }

    fn backend_set() -> impl Strategy<Value = (Vec<(u32, u32)>, u32, u32)> {
        (
            // Distinct ids become distinct keys; weights mostly small, sometimes 0 or huge.
            prop::collection::btree_map(
                any::<u32>(),
                prop_oneof![4 => 0u32..=5, 1 => Just(0u32), 1 => 0..=MAX_WEIGHT],
                1..40,
            ),
            prop::sample::select(vec![MIN_SIZE, 1021, 4093]),
            any::<u32>(),
        )
            .prop_map(|(m, size, seed)| (m.into_iter().collect(), size, seed))
    }

    fn prop_keys(set: &[(u32, u32)]) -> Vec<Vec<u8>> {
        set.iter()
            .map(|(id, _)| format!("backend-{id}").into_bytes())
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn any_set_fills_by_apportionment((set, size, seed) in backend_set()) {
            let ks = prop_keys(&set);
            let ws: Vec<u32> = set.iter().map(|&(_, w)| w).collect();
            let ring = build(&entries(&ks, &ws), size, seed).unwrap();
            let total: u64 = ws.iter().map(|&w| u64::from(w)).sum();
            if total == 0 {
                prop_assert!(ring.iter().all(|&i| i == NO_BACKEND));
                return Ok(());
            }
            prop_assert!(ring.iter().all(|&i| (i as usize) < ks.len()));
            let active = ws.iter().filter(|&&w| w > 0).count() as f64;
            for (i, &c) in counts(&ring, ks.len()).iter().enumerate() {
                let share = f64::from(ws[i]) / total as f64;
                let err = (f64::from(c) - share * f64::from(size)).abs();
                prop_assert!(ws[i] > 0 || c == 0);
                prop_assert!(err <= f64::midpoint(1.0, active * share) + 1e-9, "backend {i}: {c} slots");
            }
        }

        #[test]
        fn any_order_and_any_scale_give_the_same_ring(
            (set, size, seed) in backend_set(),
            rotate in any::<prop::sample::Index>(),
            factor in 1u32..=3,
        ) {
            let ks = prop_keys(&set);
            let ws: Vec<u32> = set.iter().map(|&(_, w)| w.min(MAX_WEIGHT / 3)).collect();
            let es = entries(&ks, &ws);
            let mut other: Vec<Entry<'_>> = es.iter().map(|e| Entry { key: e.key, weight: e.weight * factor }).collect();
            other.reverse();
            let by = rotate.index(other.len());
            other.rotate_left(by);
            let a = build(&es, size, seed).unwrap();
            let b = build(&other, size, seed).unwrap();
            prop_assert_eq!(key_per_slot(&a, &es), key_per_slot(&b, &other));
        }

        #[test]
        fn draining_any_backend_is_removing_it_and_moves_little(
            (set, size, seed) in backend_set(),
            victim in any::<prop::sample::Index>(),
        ) {
            let ks = prop_keys(&set);
            let ws: Vec<u32> = set.iter().map(|&(_, w)| w).collect();
            let es = entries(&ks, &ws);
            let r = victim.index(es.len());
            let mut drained = es.clone();
            drained[r].weight = 0;
            let mut removed = es.clone();
            removed.remove(r);
            let before = key_per_slot(&build(&es, size, seed).unwrap(), &es);
            let d = key_per_slot(&build(&drained, size, seed).unwrap(), &drained);
            prop_assert_eq!(&d, &key_per_slot(&build(&removed, size, seed).unwrap(), &removed));
            // Churn beyond the removed backend's own slots grows as quotas get coarser, i.e. as
            // the ring shrinks. Worst over 6000 random sets per size (1..40 backends): 7.6% at
            // 251 slots, 3.3% at 1021, 1.6% at 4093, about 1.2 / sqrt(size); 2 / sqrt here.
            let own = before.iter().filter(|k| **k == Some(ks[r].as_slice())).count() as f64
                / f64::from(size);
            let m = moved(&before, &d);
            prop_assert!(m >= own);
            prop_assert!(m - own <= 2.0 / f64::from(size).sqrt(), "moved {m}, own {own}");
        }
    }
}
