//! Per-source rate limiting, before any balancing work: a policy's prefix overrides (exempt,
//! deny, own limit), then the source's packet bucket and, for a packet that would create a
//! flow, its connection bucket. Buckets are lb-common's GCRA words, updated by compare-and-swap,
//! so the limit holds when a source's packets arrive on several CPUs at once.
//!
//! Deciding creates nothing: a source without a slot has full buckets, so its packet passes, and
//! its slot is made by [`commit`] once the packet is really sent on (a packet dropped later, say
//! for want of a snat port, leaves no trace in the table).
//!
//! `now` comes from the clock the policy needs (`clock_for` in main.rs). The coarse one is
//! cheaper but advances in ticks (4 ms at HZ=250, and later when the machine is busy): a tick
//! that refills more than the burst holds loses the difference, so 10 M/s with a burst of 1000
//! could never reach its rate on it. The agent marks such policies POLICY_PRECISE_CLOCK.
use core::intrinsics::{AtomicOrdering::Relaxed, atomic_cxchg, atomic_xadd};

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    Addr, Bucket, Counter, DropReason, Limit, POLICY_FAIL_OPEN, POLICY_HAS_PREFIXES,
    POLICY_RST_SYN, PREFIX_DENY, PREFIX_EXEMPT, PREFIX_LIMIT, Policy, PrefixKey, SOURCE_BUSY,
    SOURCE_FREE, SOURCE_KEEP_NS, SOURCE_WAYS, Source, SourceKey, SourceTags, bucket::admit,
    source_hash, source_set, source_tag,
};

use crate::maps::{
    LB_OVERFLOW, LB_POLICIES, LB_PREFIXES, LB_SOURCE_TAGS, LB_SOURCES, config, count, scratch,
};

pub enum Verdict {
    Pass,
    Drop(DropReason),
    /// Drop, and answer the SYN with a RST.
    Reset(DropReason),
}

/// Compare-and-swap attempts before a contended bucket counts as empty: a second try covers a
/// race with one other CPU; each try costs verifier paths.
const CAS_TRIES: u32 = 2;

/// `check` flags: the source is IPv6.
pub const V6: u32 = 1;
/// The packet would create a flow (a SYN, a UDP flow's first packet, any flow-table miss).
pub const NEW_FLOW: u32 = 2;
/// The packet is a TCP SYN (may be answered with a RST).
pub const SYN: u32 = 4;

/// A source to give a slot to once its packet is sent (see [`commit`]).
#[repr(C)]
pub struct Pending {
    pub key: SourceKey,
    /// Policy id (0: nothing pending).
    pub policy: u32,
    /// The packet was a new flow's: it took a connection token too.
    pub new_flow: u32,
    pub now_ns: u64,
}

/// Decides a packet from `src` under policy `policy_id` (0: none); `how` is a set of the flags
/// above (a BPF subprogram takes at most five arguments). The way its source was found in goes
/// to `scratch().source_way`, for the new flow's entry.
#[inline(never)]
pub fn check(policy_id: u32, src: &Addr, how: u32, now: u64) -> Verdict {
    check_inline(policy_id, src, how, now, u32::MAX)
}

/// `check` without the subprogram call, for an established flow's packet (see main.rs,
/// `entry`: the call and its prologue cost about as much as the bucket's own work); `way`:
/// where its flow last found the source (Flow::source_way), looked at first.
#[inline(always)]
pub fn check_inline(policy_id: u32, src: &Addr, how: u32, now: u64, way: u32) -> Verdict {
    let Some(s) = scratch() else {
        return Verdict::Pass;
    };
    s.pending.policy = 0;
    s.source_way = u32::MAX;
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
                PREFIX_DENY => return Verdict::Drop(DropReason::Denied),
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
        policy: policy.source_id(id),
    };
    if v6 {
        mask(&mut key.addr, policy.v6_prefix_len);
    }
    // The source's bucket; without one, a full one (made on commit) if its set has room, else
    // the policy's overflow mode: admitted (fail open), or one bucket shared by all such sources
    // (fail closed). A flow already admitted keeps flowing: sharing the overflow bucket with a
    // flood of new sources would stop its live connections.
    let bucket = match find(&key, now, way, &mut s.source_way) {
        Found::Source(b) => b,
        Found::Room => {
            let p = &mut s.pending;
            p.key = key;
            p.policy = id;
            p.new_flow = u32::from(new_flow);
            p.now_ns = now;
            return Verdict::Pass;
        }
        Found::Full => {
            count(Counter::SourceTableFull);
            if policy.flags & POLICY_FAIL_OPEN != 0 || !new_flow {
                return Verdict::Pass;
            }
            match LB_OVERFLOW.get_ptr_mut(id) {
                Some(o) => {
                    return match limit(o, policy, new_flow, syn, now) {
                        Verdict::Pass => Verdict::Pass,
                        _ => Verdict::Drop(DropReason::TableFull),
                    };
                }
                None => return Verdict::Drop(DropReason::TableFull),
            }
        }
    };
    limit(bucket, policy, new_flow, syn, now)
}

enum Found {
    Source(*mut Source),
    /// Not tracked; its set has a free or reclaimable slot.
    Room,
    /// Not tracked; its set is full of sources that must stay.
    Full,
}

/// Where a key lives: its set, and its tag.
#[inline(always)]
fn place(key: &SourceKey) -> Option<(u32, u32)> {
    let hash = source_hash(key);
    let sets = config()?.source_sets;
    if sets == 0 {
        return None;
    }
    Some((source_set(hash, sets), source_tag(hash)))
}

/// Looks `key` up in its set: in way `last` first (where its flow found it before), then one
/// pass over the tags and one key comparison; the way found goes to `found`.
///
/// Way `last` is taken on its slot's key alone, without the tag (whose line is what it saves):
/// a slot being given to another source keeps the old key until the new one is written, so a
/// packet may still take a token from it then; that one token is lost with the slot, as it
/// would be a moment later.
#[inline(always)]
fn find(key: &SourceKey, now: u64, last: u32, found: &mut u32) -> Found {
    let Some((set, tag)) = place(key) else {
        return Found::Full;
    };
    if last < WAYS
        && let Some(slot) = LB_SOURCES.get_ptr_mut(set * WAYS + last)
        // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
        && unsafe { (*slot).key } == *key
    {
        *found = last;
        return Found::Source(slot);
    }
    let Some(tags) = LB_SOURCE_TAGS.get_ptr_mut(set) else {
        return Found::Full;
    };
    // SAFETY: a map value; tags change only by compare-and-swap.
    let (hit, free) = scan(unsafe { &*tags }, tag);
    if hit < WAYS
        && let Some(slot) = LB_SOURCES.get_ptr_mut(set * WAYS + hit)
        // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
        && unsafe { (*slot).key } == *key
    {
        *found = hit;
        return Found::Source(slot);
    }
    // SAFETY: a map value; tags change only by compare-and-swap.
    if free < WAYS || reclaimable_way(unsafe { &*tags }, set, now) < WAYS {
        Found::Room
    } else {
        Found::Full
    }
}

const WAYS: u32 = SOURCE_WAYS as u32;

/// The way whose tag is `tag` and a free way (WAYS: none).
///
/// The ways found go through scratch memory, whose contents the verifier does not track: held
/// in registers, each way found would be a path of its own through the rest of the program
/// (2^16 of them), since comparing a known value decides a branch and makes it exact.
#[inline(always)]
fn scan(tags: &SourceTags, tag: u32) -> (u32, u32) {
    let Some(s) = scratch() else {
        return (WAYS, WAYS);
    };
    let ways = &raw mut s.ways;
    // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
    unsafe { core::ptr::write_volatile(ways, [WAYS, WAYS]) };
    for (i, t) in tags.tags.iter().enumerate() {
        // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
        let t = unsafe { core::ptr::read_volatile(t) };
        if t == tag {
            // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
            unsafe { core::ptr::write_volatile(&raw mut (*ways)[0], i as u32) };
        }
        if t == SOURCE_FREE {
            // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
            unsafe { core::ptr::write_volatile(&raw mut (*ways)[1], i as u32) };
        }
    }
    // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
    let [hit, free] = unsafe { core::ptr::read_volatile(ways) };
    (hit, free)
}

/// A way of set `set` whose source may go (WAYS: none). A subprogram of its own: checked only
/// when a set has no free way. (The way goes through scratch memory, as in `scan`.)
#[inline(never)]
fn reclaimable_way(tags: &SourceTags, set: u32, now: u64) -> u32 {
    let Some(s) = scratch() else {
        return WAYS;
    };
    let way = &raw mut s.ways[0];
    // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
    unsafe { core::ptr::write_volatile(way, WAYS) };
    for i in 0..WAYS {
        // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
        let t = unsafe { core::ptr::read_volatile(&raw const tags.tags[i as usize]) };
        if t >= 2
            && let Some(slot) = LB_SOURCES.get(set * WAYS + i)
            && reclaimable(slot, now)
        {
            // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
            unsafe { core::ptr::write_volatile(way, i) };
        }
    }
    // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
    unsafe { core::ptr::read_volatile(way) }
}

/// Nothing pending for this packet: what a new flow no policy applies to skips `check` with
/// (its send commits; an established packet without a policy neither checks nor commits).
#[inline(always)]
pub fn clear() {
    if let Some(s) = scratch() {
        s.pending.policy = 0;
        s.source_way = u32::MAX;
    }
}

/// Gives the pending source (if any) of this packet its slot, with the tokens its packet took.
/// Called once the packet is sent on. A lost race (another CPU filled the set, or made the same
/// source) leaves it untracked for this one packet.
#[inline(always)]
pub fn commit() {
    // Most packets have nothing pending: no subprogram call for them.
    if scratch().is_some_and(|s| s.pending.policy != 0) {
        give_slot();
    }
}

#[inline(never)]
fn give_slot() {
    let Some(s) = scratch() else {
        return;
    };
    let p = &mut s.pending;
    if p.policy == 0 {
        return;
    }
    p.policy = 0;
    let Some(policy) = LB_POLICIES.get(p.key.policy_id()) else {
        return;
    };
    let Some((set, tag)) = place(&p.key) else {
        return;
    };
    let Some(tags) = LB_SOURCE_TAGS.get_ptr_mut(set) else {
        return;
    };
    // SAFETY: a map value; tags change only by compare-and-swap.
    let tags = unsafe { &mut *tags };
    let now = p.now_ns;
    let (hit, free) = scan(tags, tag);
    if hit < WAYS
        && LB_SOURCES
            .get(set * WAYS + hit)
            .is_some_and(|slot| slot.key == p.key)
    {
        // Another CPU made it meanwhile.
        return;
    }
    // A free way, or one whose source may go (looked at again right before taking it: another
    // CPU may have given it to a new source meanwhile).
    let (way, expected) = if free < WAYS {
        (free, SOURCE_FREE)
    } else {
        let way = reclaimable_way(tags, set, now);
        let Some(slot) = LB_SOURCES.get(set * WAYS + way) else {
            return;
        };
        // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
        let seen =
            unsafe { core::ptr::read_volatile(&raw const tags.tags[(way & (WAYS - 1)) as usize]) };
        if seen < 2 || !reclaimable(slot, now) {
            return;
        }
        (way, seen)
    };
    if way >= WAYS || !claim(tags, way, expected) {
        return;
    }
    let Some(slot) = LB_SOURCES.get_ptr_mut(set * WAYS + way) else {
        return;
    };
    // SAFETY: a map value, ours while its tag is BUSY.
    let slot = unsafe { &mut *slot };
    crate::mem::copy(&mut slot.key, &p.key);
    slot.dropped = 0;
    slot.packets = Bucket::first_packet(&policy.packets, now);
    slot.connections = if p.new_flow != 0 {
        Bucket::first_packet(&policy.connections, now)
    } else {
        Bucket::full(&policy.connections, now)
    };
    publish(tags, way, tag);
    count(Counter::SourcesCreated);
}

/// Marks way `way` BUSY if its tag is still `expected` (compare-and-swap).
#[inline(always)]
fn claim(tags: &mut SourceTags, way: u32, expected: u32) -> bool {
    let w = (way & (WAYS - 1)) as usize;
    let at = &raw mut tags.tags[w];
    // SAFETY: `at` comes from a reference to an aligned u32 in a map value, which other CPUs change only atomically.
    unsafe { atomic_cxchg::<u32, { Relaxed }, { Relaxed }>(at, expected, SOURCE_BUSY) }.1
}

#[inline(always)]
fn publish(tags: &mut SourceTags, way: u32, tag: u32) {
    let w = (way & (WAYS - 1)) as usize;
    // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
    unsafe { core::ptr::write_volatile(&raw mut tags.tags[w], tag) };
}

/// A slot whose source may go: both buckets idle long enough to have refilled, and quiet for
/// SOURCE_KEEP_NS.
#[inline(always)]
fn reclaimable(slot: &Source, now: u64) -> bool {
    let Some(policy) = LB_POLICIES.get(slot.key.policy_id()) else {
        return true;
    };
    let idle = |b: &Bucket, l: &Limit| {
        let ns = now.wrapping_sub(b.last_ns).cast_signed();
        ns >= SOURCE_KEEP_NS.cast_signed() && ns >= l.fill_ns.cast_signed()
    };
    idle(&slot.packets, &policy.packets) && idle(&slot.connections, &policy.connections)
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
    // SAFETY: an aligned u32 in a map value.
    unsafe { atomic_xadd::<u32, u32, { Relaxed }>(&raw mut s.dropped, 1) };
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
        // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
        let last = unsafe { core::ptr::read_volatile(&raw const bucket.last_ns) };
        let Some(new) = admit(limit, old, last, now) else {
            return false;
        };
        // SAFETY: `tat` is a naturally aligned u64 in a map value.
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
