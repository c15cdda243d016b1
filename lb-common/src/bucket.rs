//! Token buckets in integer arithmetic, shared by the XDP program and the host tests.
//!
//! The bucket is kept in its "virtual scheduling" form (GCRA): instead of a token count and a
//! timestamp, one word holds the theoretical arrival time `tat` of the next packet. One word means
//! one compare-and-swap, so a source whose packets arrive on several CPUs at once is still limited
//! to its rate, not to its rate times the number of CPUs.
//!
//! Time is measured in *units* where one nanosecond is `rate` units and one token is `TOKEN`
//! (10^9) units, so a token is exactly `1/rate` seconds: refill is exact for every rate, with no
//! rounding carried from packet to packet. Unit timestamps are `now_ns * rate` modulo 2^64 and are
//! only ever compared by their wrapping difference, which is exact as long as the two instants are
//! less than 2^63 units apart; `last_ns` (when the bucket last admitted a packet) tells when they
//! might not be, and by then the bucket is full anyway.

/// The longest coarse-clock step [`Limit::coarse_clock_ok`] allows for.
pub const COARSE_STEP_NS: u64 = 16_000_000;

/// Units per token.
pub const TOKEN: u64 = 1_000_000_000;
/// Highest supported rate, per second.
pub const MAX_RATE: u64 = 10_000_000;
/// Highest supported burst: keeps every unit difference below 2^63.
pub const MAX_BURST: u64 = 1_000_000_000;

/// A configured limit. Built with [`Limit::new`], which precomputes what the packet path needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limit {
    /// Tokens per second; 0 means unlimited.
    pub rate: u64,
    /// Tokens the bucket holds when full.
    pub burst: u64,
    /// `(burst - 1) * TOKEN`: how far ahead of now `tat` may be for a packet to pass.
    pub tolerance: u64,
    /// Nanoseconds an empty bucket takes to fill: `ceil(burst * TOKEN / rate)`.
    pub fill_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Limit>() == 32);

/// Why a limit cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitError {
    ZeroBurst,
    RateTooHigh,
    BurstTooHigh,
}

impl Limit {
    /// No limit.
    pub const UNLIMITED: Limit = Limit {
        rate: 0,
        burst: 0,
        tolerance: 0,
        fill_ns: 0,
    };

    /// `rate` tokens per second (1..=MAX_RATE, or 0 for unlimited), `burst` tokens at most
    /// (1..=MAX_BURST).
    pub const fn new(rate: u64, burst: u64) -> Result<Limit, LimitError> {
        if rate == 0 {
            return Ok(Limit::UNLIMITED);
        }
        if rate > MAX_RATE {
            return Err(LimitError::RateTooHigh);
        }
        if burst == 0 {
            return Err(LimitError::ZeroBurst);
        }
        if burst > MAX_BURST {
            return Err(LimitError::BurstTooHigh);
        }
        // burst * TOKEN <= 10^18 fits in u64.
        let units = burst * TOKEN;
        Ok(Limit {
            rate,
            burst,
            tolerance: units - TOKEN,
            fill_ns: units.div_ceil(rate),
        })
    }

    #[inline(always)]
    pub const fn is_unlimited(&self) -> bool {
        self.rate == 0
    }

    /// Whether the coarse clock (CLOCK_MONOTONIC_COARSE, cheaper to read) keeps this limit
    /// exact. It advances in steps (a tick: 4 ms at HZ=250, longer on a busy or idle CPU); a
    /// step refills `rate * step` at once, which is exact as long as the burst holds it. With
    /// room for steps of [`COARSE_STEP_NS`] twice over, it does.
    pub const fn coarse_clock_ok(&self) -> bool {
        self.rate == 0 || self.burst * TOKEN >= 2 * self.rate * COARSE_STEP_NS
    }
}

/// Per-source state of one limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Theoretical arrival time of the next packet, in units (see the module doc).
    pub tat: u64,
    /// When the bucket last admitted a packet, nanoseconds.
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Bucket>() == 16);

impl Bucket {
    /// A full bucket at `now_ns`.
    #[inline(always)]
    pub const fn full(limit: &Limit, now_ns: u64) -> Bucket {
        Bucket {
            tat: now_ns.wrapping_mul(limit.rate),
            last_ns: now_ns.wrapping_sub(limit.fill_ns),
        }
    }

    /// The state of a bucket created by admitting one packet at `now_ns`.
    #[inline(always)]
    pub const fn first_packet(limit: &Limit, now_ns: u64) -> Bucket {
        Bucket {
            tat: now_ns.wrapping_mul(limit.rate).wrapping_add(TOKEN),
            last_ns: now_ns,
        }
    }
}

/// Decides one packet against a bucket whose state is `(tat, last_ns)`.
///
/// Returns the new `tat` if the packet is admitted (the caller stores it, with compare-and-swap
/// where CPUs race, and sets `last_ns = now_ns`), or `None` if it is over the limit (nothing to
/// store). `now_ns` must not be older than `last_ns` by more than 2^63 ns (it never is: both come
/// from CLOCK_MONOTONIC).
#[inline(always)]
pub fn admit(limit: &Limit, tat: u64, last_ns: u64, now_ns: u64) -> Option<u64> {
    let now = now_ns.wrapping_mul(limit.rate);
    // An idle bucket refills to `burst` and no further: start from now. This also covers the
    // case where `tat` is so old that its unit difference to now could have wrapped. Signed:
    // another CPU may have admitted a packet (and set `last_ns`) after this CPU read its
    // clock, and a `now` slightly before `last_ns` is not a long idle time.
    let idle_ns = now_ns.wrapping_sub(last_ns).cast_signed();
    let ahead = tat.wrapping_sub(now);
    let ahead = if idle_ns >= limit.fill_ns.cast_signed() || ahead.cast_signed() < 0 {
        0
    } else {
        ahead
    };
    if ahead > limit.tolerance {
        return None;
    }
    Some(now.wrapping_add(ahead).wrapping_add(TOKEN))
}

/// Whole tokens left in a bucket at `now_ns` (for status displays and tests).
pub fn tokens(limit: &Limit, bucket: &Bucket, now_ns: u64) -> u64 {
    if limit.is_unlimited() {
        return u64::MAX;
    }
    let now = now_ns.wrapping_mul(limit.rate);
    let idle_ns = now_ns.wrapping_sub(bucket.last_ns).cast_signed();
    let ahead = bucket.tat.wrapping_sub(now);
    if idle_ns >= limit.fill_ns.cast_signed() || ahead.cast_signed() < 0 {
        return limit.burst;
    }
    // `now` may lag the last admission a little (another CPU's clock read): no tokens then.
    (limit.burst * TOKEN).saturating_sub(ahead) / TOKEN
}

#[cfg(test)]
mod tests {
    extern crate std;
    use proptest::prelude::*;
    use std::vec::Vec;

    use super::*;

    #[test]
    fn the_coarse_clock_serves_limits_whose_burst_holds_two_of_its_steps() {
        let ok = |rate, burst| Limit::new(rate, burst).unwrap().coarse_clock_ok();
        // 1000/s refills 16 tokens per 16 ms step.
        assert!(ok(1000, 32));
        assert!(!ok(1000, 31));
        assert!(!ok(10_000_000, 1000));
        assert!(ok(10_000_000, 320_000));
        assert!(Limit::UNLIMITED.coarse_clock_ok());
    }

    /// Runs packets at `times` (ns, non-decreasing) through a bucket and returns which passed.
    fn run(limit: &Limit, times: &[u64]) -> Vec<bool> {
        let mut state: Option<Bucket> = None;
        times
            .iter()
            .map(|&now| match state {
                None => {
                    state = Some(Bucket::first_packet(limit, now));
                    true
                }
                Some(b) => match admit(limit, b.tat, b.last_ns, now) {
                    Some(tat) => {
                        state = Some(Bucket { tat, last_ns: now });
                        true
                    }
                    None => false,
                },
            })
            .collect()
    }

    /// The exact model: tokens as a rational, refilled by rate * elapsed, capped at burst.
    fn model(rate: u64, burst: u64, times: &[u64]) -> Vec<bool> {
        // Tokens scaled by 1e9 (exact: rate * ns).
        let cap = u128::from(burst) * 1_000_000_000;
        let mut tokens = cap;
        let mut last: Option<u64> = None;
        times
            .iter()
            .map(|&now| {
                if let Some(l) = last {
                    tokens = (tokens + u128::from(now - l) * u128::from(rate)).min(cap);
                }
                last = Some(now);
                if tokens >= 1_000_000_000 {
                    tokens -= 1_000_000_000;
                    true
                } else {
                    false
                }
            })
            .collect()
    }

    #[test]
    fn a_burst_passes_then_one_packet_per_interval() {
        let limit = Limit::new(10, 5).unwrap();
        // 8 packets at once: the burst of 5 passes.
        let at_once = run(&limit, &[1_000; 8]);
        assert_eq!(at_once.iter().filter(|p| **p).count(), 5);
        // Then exactly one token per 100 ms.
        let mut times: Vec<u64> = std::vec![1_000; 5];
        times.extend([1_000 + 99_999_999, 1_000 + 100_000_000, 1_000 + 100_000_001]);
        assert_eq!(
            run(&limit, &times),
            [true, true, true, true, true, false, true, false]
        );
    }

    #[test]
    fn idle_refill_stops_at_the_burst() {
        let limit = Limit::new(1000, 3).unwrap();
        // After an hour idle only 3 tokens are there, not 3.6 million.
        let t = 3_600_000_000_000u64;
        let passed = run(&limit, &[0, 0, 0, t, t, t, t, t]);
        assert_eq!(passed, [true, true, true, true, true, true, false, false]);
    }

    #[test]
    fn a_clock_read_just_before_another_cpus_admission_does_not_refill() {
        // CPU A admits the last token at t = 1_000_000 and sets last_ns; CPU B had read its
        // clock a little earlier (999_990) and decides after: it must see an empty bucket, not
        // a "long idle" one (an unsigned difference would wrap to ~2^64 ns).
        let limit = Limit::new(1000, 2).unwrap();
        let t = 1_000_000u64;
        let b0 = Bucket::first_packet(&limit, t);
        let tat = admit(&limit, b0.tat, b0.last_ns, t).unwrap();
        assert_eq!(admit(&limit, tat, t, t - 10), None);
        assert_eq!(tokens(&limit, &Bucket { tat, last_ns: t }, t - 10), 0);
    }

    #[test]
    fn limits_out_of_range_are_refused() {
        assert_eq!(Limit::new(1, 0), Err(LimitError::ZeroBurst));
        assert_eq!(Limit::new(MAX_RATE + 1, 1), Err(LimitError::RateTooHigh));
        assert_eq!(Limit::new(1, MAX_BURST + 1), Err(LimitError::BurstTooHigh));
        assert!(Limit::new(0, 0).unwrap().is_unlimited());
        assert!(Limit::new(MAX_RATE, MAX_BURST).is_ok());
    }

    #[test]
    fn unit_time_wrapping_is_harmless() {
        // now * rate overflows u64 many times over; differences stay exact.
        let limit = Limit::new(MAX_RATE, 2).unwrap();
        let base = u64::MAX / 3;
        let times: Vec<u64> = (0..50).map(|i| base + i * 50).collect();
        assert_eq!(run(&limit, &times), model(MAX_RATE, 2, &times));
        // And long gaps (days at 10 M/s) across the wrap.
        let times = [
            base,
            base + 86_400_000_000_000,
            base + 86_400_000_000_000,
            base + 86_400_000_000_001,
        ];
        assert_eq!(run(&limit, &times), model(MAX_RATE, 2, &times));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// The bucket admits exactly what the exact rational model admits, for any rate from
        /// 1/s to 10 M/s, any burst, any arrival pattern and clock offset.
        #[test]
        fn bucket_equals_the_exact_model(
            rate in prop_oneof![1u64..=100, 100u64..=100_000, 100_000u64..=MAX_RATE],
            burst in 1u64..=50,
            start in any::<u64>().prop_map(|s| s / 2),
            gaps in proptest::collection::vec(
                prop_oneof![Just(0u64), 0u64..1_000, 0u64..10_000_000, 0u64..5_000_000_000],
                1..200,
            ),
        ) {
            let limit = Limit::new(rate, burst).unwrap();
            let mut t = start;
            let times: Vec<u64> = gaps.iter().map(|g| { t += g; t }).collect();
            prop_assert_eq!(run(&limit, &times), model(rate, burst, &times));
        }

        /// Over any window, a source sending without pause gets burst + rate * window, exactly.
        #[test]
        fn a_flood_gets_exactly_burst_plus_rate_times_time(
            rate in 1u64..=MAX_RATE,
            burst in 1u64..=1000,
            step in 1u64..1_000_000,
        ) {
            let limit = Limit::new(rate, burst).unwrap();
            let n = 2000u64;
            let times: Vec<u64> = (0..n).map(|i| 1_000_000 + i * step).collect();
            let admitted = run(&limit, &times).iter().filter(|p| **p).count() as u128;
            let elapsed = u128::from((n - 1) * step);
            let earned = elapsed * u128::from(rate) / 1_000_000_000;
            let expected = (u128::from(burst) + earned).min(u128::from(n));
            prop_assert_eq!(admitted, expected);
        }

        /// `tokens` reports what the bucket would admit.
        #[test]
        fn tokens_counts_what_would_pass(rate in 1u64..=1000, burst in 1u64..=20, used in 0u64..=20, wait in 0u64..2_000_000_000) {
            let limit = Limit::new(rate, burst).unwrap();
            let used = used.min(burst);
            let mut b = Bucket::full(&limit, 1_000);
            for _ in 0..used {
                let tat = admit(&limit, b.tat, b.last_ns, 1_000).unwrap();
                b = Bucket { tat, last_ns: 1_000 };
            }
            let now = 1_000 + wait;
            let left = tokens(&limit, &b, now);
            let mut passed = 0;
            for _ in 0..=burst {
                match admit(&limit, b.tat, b.last_ns, now) {
                    Some(tat) => { b = Bucket { tat, last_ns: now }; passed += 1; }
                    None => break,
                }
            }
            prop_assert_eq!(left, passed);
        }
    }
}
