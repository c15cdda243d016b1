//! Per-source rate limiting, before any balancing work: a policy's prefix overrides (exempt,
//! deny, own limit), then the source's packet bucket and, for a packet that would create a
//! flow, its connection bucket. Buckets are lb-common's GCRA words, updated by compare-and-swap,
//! so the limit holds when a source's packets arrive on several CPUs at once.
//!
//! `now` comes from the clock the policy needs (`clock_for` in main.rs). The coarse one is
//! cheaper but advances in ticks (4 ms at HZ=250, and later when the machine is busy): a tick
//! that refills more than the burst holds loses the difference, so 10 M/s with a burst of 1000
//! could never reach its rate on it. The agent marks such policies POLICY_PRECISE_CLOCK.
use core::intrinsics::{AtomicOrdering::Relaxed, atomic_cxchg, atomic_xadd};

use aya_ebpf::{bindings::BPF_NOEXIST, maps::lpm_trie::Key};
use lb_common::{
    Addr, Bucket, Counter, DropReason, Limit, POLICY_FAIL_OPEN, POLICY_HAS_PREFIXES,
    POLICY_RST_SYN, PREFIX_DENY, PREFIX_EXEMPT, PREFIX_LIMIT, Policy, PrefixKey, Source, SourceKey,
    bucket::admit,
};

use crate::maps::{EEXIST, LB_POLICIES, LB_PREFIXES, LB_SOURCES, count};

pub enum Verdict {
    Pass,
    Drop(DropReason),
    /// Drop, and answer the SYN with a RST.
    Reset(DropReason),
}

/// The bucket key beyond the table's capacity: all sources of a fail-closed policy share it.
/// ff..ff is a multicast address, never a source.
pub const OVERFLOW_SOURCE: [u32; 4] = [u32::MAX; 4];

/// Compare-and-swap attempts before a contended bucket counts as empty: a second try covers a
/// race with one other CPU; each try costs verifier paths.
const CAS_TRIES: u32 = 2;

/// `check` flags: the source is IPv6.
pub const V6: u32 = 1;
/// The packet would create a flow (a SYN, a UDP flow's first packet, any flow-table miss).
pub const NEW_FLOW: u32 = 2;
/// The packet is a TCP SYN (may be answered with a RST).
pub const SYN: u32 = 4;

/// Decides a packet from `src` under policy `policy_id` (0: none); `how` is a set of the flags
/// above (a BPF subprogram takes at most five arguments).
#[inline(never)]
pub fn check(policy_id: u32, src: &Addr, how: u32, now: u64) -> Verdict {
    if policy_id == 0 {
        return Verdict::Pass;
    }
    let (v6, new_flow, syn) = (how & V6 != 0, how & NEW_FLOW != 0, how & SYN != 0);
    let Some(mut policy) = LB_POLICIES.get(policy_id) else {
        return Verdict::Pass;
    };
    let mut id = policy_id;
    if policy.flags & POLICY_HAS_PREFIXES != 0 {
        let key = Key::new(
            (32 + 128) as u32,
            PrefixKey {
                policy: policy_id.to_be_bytes(),
                addr: *src,
            },
        );
        if let Some(rule) = LB_PREFIXES.get(&key) {
            match rule.action {
                PREFIX_EXEMPT => return Verdict::Pass,
                PREFIX_DENY => {
                    count(Counter::DropRateLimited);
                    return Verdict::Drop(DropReason::Denied);
                }
                PREFIX_LIMIT => {
                    if let Some(p) = LB_POLICIES.get(rule.policy) {
                        policy = p;
                        id = rule.policy;
                    }
                }
                _ => {}
            }
        }
    }
    let mut key = SourceKey {
        addr: *src,
        policy: id,
    };
    if v6 {
        mask(&mut key.addr, policy.v6_prefix_len);
    }
    // The source's bucket, or beyond the table's capacity the policy's overflow mode: admitted
    // (fail open), or one bucket shared by all such sources (fail closed). One decision below
    // either way (keeps the verifier's path count down). A flow already admitted keeps flowing:
    // a source without an entry has a full bucket (entries go only once refilled), and sharing
    // the overflow bucket with a flood of new sources would stop its live connections.
    let mut overflow = false;
    let bucket = match source(&key, policy, now) {
        Some(s) => s,
        None if policy.flags & POLICY_FAIL_OPEN != 0 || !new_flow => return Verdict::Pass,
        None => {
            key.addr.set_words(OVERFLOW_SOURCE);
            overflow = true;
            match LB_SOURCES.get_ptr_mut(&key) {
                Some(s) => s,
                None => {
                    count(Counter::DropRateLimited);
                    return Verdict::Drop(DropReason::TableFull);
                }
            }
        }
    };
    let verdict = limit(bucket, policy, new_flow, syn, now);
    match verdict {
        Verdict::Pass => Verdict::Pass,
        Verdict::Drop(_) if overflow => {
            count(Counter::DropRateLimited);
            Verdict::Drop(DropReason::TableFull)
        }
        other => {
            count(Counter::DropRateLimited);
            other
        }
    }
}

/// The source's entry, created with full buckets if new. `None`: the table is full.
#[inline(always)]
fn source(key: &SourceKey, policy: &Policy, now: u64) -> Option<*mut Source> {
    if let Some(s) = LB_SOURCES.get_ptr_mut(key) {
        return Some(s);
    }
    let fresh = Source {
        packets: Bucket::full(&policy.packets, now),
        connections: Bucket::full(&policy.connections, now),
        dropped: 0,
    };
    match LB_SOURCES.insert(key, &fresh, u64::from(BPF_NOEXIST)) {
        Ok(()) => count(Counter::SourcesCreated),
        // EEXIST: another CPU created it first. Anything else: no room.
        Err(e) if e != -EEXIST => {
            count(Counter::SourceTableFull);
            return None;
        }
        Err(_) => {}
    }
    LB_SOURCES.get_ptr_mut(key)
}

#[inline(always)]
fn limit(s: *mut Source, policy: &Policy, new_flow: bool, syn: bool, now: u64) -> Verdict {
    // SAFETY: a map value; its buckets are only changed by compare-and-swap.
    let s = unsafe { &mut *s };
    let verdict = if !take(&mut s.packets, &policy.packets, now) {
        Verdict::Drop(DropReason::Rate)
    } else if new_flow && !take(&mut s.connections, &policy.connections, now) {
        if syn && policy.flags & POLICY_RST_SYN != 0 {
            Verdict::Reset(DropReason::ConnectionRate)
        } else {
            Verdict::Drop(DropReason::ConnectionRate)
        }
    } else {
        return Verdict::Pass;
    };
    // SAFETY: an aligned u64 in a map value.
    unsafe { atomic_xadd::<u64, u64, { Relaxed }>(&raw mut s.dropped, 1) };
    verdict
}

/// Takes one token from `bucket`; false if it has none.
#[inline(always)]
fn take(bucket: &mut Bucket, limit: &Limit, now: u64) -> bool {
    if limit.is_unlimited() {
        return true;
    }
    let tat = &raw mut bucket.tat;
    for _ in 0..CAS_TRIES {
        // SAFETY: `tat` is a naturally aligned u64 in a map value; aligned 64-bit loads are
        // single-copy atomic. The BPF target has no AtomicU64::compare_exchange (its spec
        // predates v3's BPF_CMPXCHG), hence the intrinsic below.
        let old = unsafe { core::ptr::read_volatile(tat) };
        let last = unsafe { core::ptr::read_volatile(&bucket.last_ns) };
        let Some(new) = admit(limit, old, last, now) else {
            return false;
        };
        if unsafe { atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(tat, old, new) }.1 {
            bucket.last_ns = now;
            return true;
        }
    }
    false
}

/// Keeps the first `prefix_len` bits of an IPv6 address.
#[inline(always)]
fn mask(addr: &mut Addr, prefix_len: u8) {
    let mut w = addr.words();
    for (i, word) in w.iter_mut().enumerate() {
        // Bits of this word inside the prefix, 0..=32; the mask is their top bits, in network
        // order. Shifting a u64 keeps `32 - 0` well defined.
        let bits = (u32::from(prefix_len))
            .saturating_sub(32 * i as u32)
            .min(32);
        let keep = (0xffff_ffffu64 << (32 - bits)) as u32;
        *word &= keep.to_be();
    }
    *addr = Addr::from_words(w);
}
