//! Agreements about the rate limiter's source table (LB_SOURCES) beyond its types: the shared
//! overflow bucket of a fail-closed policy lives at a reserved address, which the data path
//! uses when the table is full, the agent creates with the policy and the sweep never removes.
use crate::{Addr, SourceKey};

/// The address of a policy's overflow bucket: all ones, which no real IPv4 source (mapped into
/// ::ffff:0:0/96) and no IPv6 source masked to a prefix shorter than 128 can have.
pub const OVERFLOW_SOURCE: Addr = Addr([0xff; 16]);

/// The source-table key of `policy`'s overflow bucket.
#[inline(always)]
pub const fn overflow_key(policy: u32) -> SourceKey {
    SourceKey {
        addr: OVERFLOW_SOURCE,
        policy,
    }
}

/// True for an overflow bucket's key.
#[inline(always)]
pub fn is_overflow(key: &SourceKey) -> bool {
    key.addr == OVERFLOW_SOURCE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_keys_are_told_apart_from_sources() {
        assert!(is_overflow(&overflow_key(7)));
        assert!(!is_overflow(&SourceKey {
            addr: Addr::v4([255, 255, 255, 255]),
            policy: 7
        }));
    }
}
