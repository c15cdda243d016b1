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
    // case where `tat` is so old that its unit difference to now could have wrapped.
    let idle_ns = now_ns.wrapping_sub(last_ns);
    let ahead = tat.wrapping_sub(now);
    let ahead = if idle_ns >= limit.fill_ns || (ahead as i64) < 0 {
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
    let idle_ns = now_ns.wrapping_sub(bucket.last_ns);
    let ahead = bucket.tat.wrapping_sub(now);
    if idle_ns >= limit.fill_ns || (ahead as i64) < 0 {
        return limit.burst;
    }
    (limit.burst * TOKEN - ahead) / TOKEN
}
