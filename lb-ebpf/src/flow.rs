//! The flow table: a live flow keeps its backend for its whole life; a new one gets a backend
//! from the service's Maglev ring (or its session-affinity entry), a source port if the service
//! uses source NAT, and two entries, one per direction: the client's in the flow table, the
//! reply direction's there too, or, for a snat flow, in the claim slot that holds its port
//! (lb_common::Claim). No insert ever replaces a live entry, but for a half-open snat flow's
//! that gives way when no port is free (see `claim_port`).
use core::intrinsics::{
    AtomicOrdering::{Relaxed, SeqCst},
    atomic_cxchg, atomic_xadd, atomic_xchg,
};

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use lb_common::{
    Addr, Affinity, AffinityKey, Backend, CLAIM_BLOCK, CLAIM_BUSY, CLAIM_COUNT, CLAIM_FREE,
    CLAIM_HELD, CLAIM_KIND, Config, Counter, DropReason, FLOW_CLOSING, FLOW_OPENING, FLOW_REPLY,
    FLOW_SNAT, FLOW_TCP, FLOW_TIME_WAIT, Flow, FlowAddr, FlowKey, IPPROTO_TCP, MAX_SNAT_ADDRS,
    NO_BACKEND, PEER_REFRESH_SHIFT, PORT_CURSORS, SVC_AFFINITY, Service, claim_slot,
    hash::{addr_hash, ring_slot},
    id_way,
    net::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use crate::{
    family::{Family, key_of},
    maps::{
        EEXIST, LB_AFFINITY, LB_BACKENDS, LB_BE_STATS, LB_PORTS, LB_RINGS, LB_SVC_INFO,
        LB_SVC_STATS, count, entries, half_open, new_key, scratch,
    },
    parse::{Packet, Ports},
};

/// Ports a new snat flow tries, from its backend's cursor on, before it is dropped.
const SNAT_PORT_TRIES: u32 = 16;
/// `Target::backend` of a reply: replies count per service only.
pub const NO_BACKEND_ID: u32 = u32::MAX;

/// Addresses and ports of a packet.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub src: Addr,
    pub dst: Addr,
    /// Wire order.
    pub sport: u16,
    pub dport: u16,
}

/// What the packets of a flow entry are rewritten to, and what they count against.
#[derive(Clone, Copy)]
pub struct Target {
    pub tuple: Tuple,
    pub service: u32,
    /// Backend id ([`NO_BACKEND_ID`] for replies).
    pub backend: u32,
    /// The service's rate-limit policy (0 for replies: only clients are limited).
    pub policy: u32,
    pub reply: bool,
}

/// What an entry rewrites its packets to. `None`: the backend or service the entry names is
/// gone (its id was given to another), so the flow is over.
#[inline(always)]
pub fn resolve<A: FlowAddr>(flow: &Flow<A>) -> Option<Target> {
    if flow.flags & FLOW_REPLY == 0 {
        let b = LB_BACKENDS.get(flow.id())?;
        if b.generation != flow.generation {
            return None;
        }
        let policy = LB_SVC_INFO.get(b.service).map_or(0, |s| s.policy);
        Some(Target {
            tuple: Tuple {
                src: flow.addr.to_addr(),
                // Word by word: LLVM cannot tell map values apart and would copy with memmove.
                dst: Addr::from_words(b.addr.words()),
                sport: flow.port,
                dport: b.port,
            },
            service: b.service,
            backend: flow.id(),
            policy,
            reply: false,
        })
    } else {
        let s = LB_SVC_INFO.get(flow.id())?;
        if s.generation != flow.generation {
            return None;
        }
        Some(Target {
            tuple: Tuple {
                src: Addr::from_words(s.addr.words()),
                dst: flow.addr.to_addr(),
                sport: s.port,
                dport: flow.port,
            },
            service: flow.id(),
            backend: NO_BACKEND_ID,
            policy: 0,
            reply: true,
        })
    }
}

/// The other direction's entry of the flow whose entry resolves to `t`.
#[inline(always)]
fn peer<F: Family>(t: &Target, proto: u8, cfg: &Config) -> Option<*mut Flow<F::A>> {
    find::<F>(&peer_key::<F>(t, proto), cfg)
}

/// The key of the other direction's entry: the reverse of what this entry rewrites to.
#[inline(always)]
fn peer_key<F: Family>(t: &Target, proto: u8) -> FlowKey<F::A> {
    FlowKey::new(
        F::A::from_addr(&t.tuple.dst),
        F::A::from_addr(&t.tuple.src),
        t.tuple.dport,
        t.tuple.sport,
        proto,
    )
}

/// The entry of `key`: a snat flow's reply entry in its claim slot when the key is addressed to
/// one of the node's snat addresses and ports, else (or if no slot holds it) the flow table's.
#[inline(always)]
pub fn find<F: Family>(key: &FlowKey<F::A>, cfg: &Config) -> Option<*mut Flow<F::A>> {
    if to_snat::<F>(key, cfg)
        && let Some(f) = claimed::<F>(key, cfg)
    {
        return Some(f);
    }
    F::flows().get_ptr_mut(key)
}

/// Whether `key` is addressed to a snat address and port (ports first: a client's packet to a
/// service port fails that compare and goes on at once).
#[inline(always)]
fn to_snat<F: Family>(key: &FlowKey<F::A>, cfg: &Config) -> bool {
    let port = u16::from_be(key.dport);
    let [a, b] = &cfg.snat_ports;
    if !(a.min <= port && port <= a.max || b.min <= port && port <= b.max) {
        return false;
    }
    let (addrs, n) = F::snat(cfg);
    let mut hit = false;
    for (i, addr) in addrs.iter().enumerate() {
        hit |= (i as u32) < n && F::A::from_addr(addr) == key.dst;
    }
    hit
}

/// The reply entry in `key`'s claim slot, if the slot holds one of this key.
#[inline(always)]
fn claimed<F: Family>(key: &FlowKey<F::A>, cfg: &Config) -> Option<*mut Flow<F::A>> {
    let slot = F::claims().get_ptr_mut(claim_slot(key, F::claim_slots(cfg)))?;
    // SAFETY: a map value; its state changes only atomically, its key and entry only while the
    // claiming CPU holds it BUSY (a reader finds no entry then).
    let c = unsafe { &mut *slot };
    if !c.holds(key) {
        return None;
    }
    Some(&raw mut c.flow)
}

/// What `claim` found in a slot.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Claimed {
    /// The slot is this flow's now.
    Yes,
    /// Live, being written, or lost to another CPU.
    Busy,
    /// Held by a half-open flow that gives way (Flow::gives_way), not taken.
    GivesWay,
}

/// Claims `key`'s slot for the reply entry `reply`: the slot must be free or hold an entry that
/// is over (expired: see Flow::is_expired, which keeps a TIME_WAIT port), or, with `take`, a
/// half-open flow's that gives way (noted in scratch, for `drop_half_open`). A compare-and-swap
/// makes the slot this CPU's (BUSY) while it writes, then it is published HELD.
#[inline(always)]
fn claim<F: Family>(
    key: &FlowKey<F::A>,
    reply: &Flow<F::A>,
    cfg: &Config,
    now: u32,
    take: bool,
) -> Claimed {
    let Some(slot) = F::claims().get_ptr_mut(claim_slot(key, F::claim_slots(cfg))) else {
        return Claimed::Busy;
    };
    // SAFETY: a map value, see `claimed`.
    let c = unsafe { &mut *slot };
    let at = &raw mut c.state;
    // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
    let state = unsafe { core::ptr::read_volatile(at) };
    let kind = state & CLAIM_KIND;
    // (An expired entry stays expired: `refresh` writes nothing to one.)
    let live = kind == CLAIM_HELD && !c.flow.is_expired(cfg, now);
    if kind == CLAIM_BUSY || live && !c.flow.gives_way(now) {
        return Claimed::Busy;
    }
    if live && !take {
        return Claimed::GivesWay;
    }
    let next = (state & !CLAIM_KIND).wrapping_add(CLAIM_COUNT);
    // SAFETY: an aligned u32 in a map value, changed by other CPUs only atomically.
    if !unsafe { atomic_cxchg::<u32, { Relaxed }, { Relaxed }>(at, state, next | CLAIM_BUSY) }.1 {
        return Claimed::Busy;
    }
    if live {
        // Its handshake may have moved on since it was read: then it keeps the slot.
        if !c.flow.gives_way(now) {
            // SAFETY: as above; the slot is ours (BUSY), so nothing changed its state.
            unsafe { atomic_xchg::<u32, { SeqCst }>(at, state) };
            return Claimed::Busy;
        }
        // Its client entry goes once the new flow is prepared (see `open`).
        if let Some(s) = scratch() {
            let (k, f) = half_open::<F::A>(s);
            crate::mem::copy(k, &c.key);
            crate::mem::copy(f, &c.flow);
            s.half_open_taken = true;
        }
        count(Counter::HalfOpenDropped);
    }
    crate::mem::copy(&mut c.key, key);
    crate::mem::copy(&mut c.flow, reply);
    // An atomic exchange, not a store: BPF's atomics are full barriers, so the key and entry
    // are written before the slot reads as HELD on any CPU.
    // SAFETY: as above.
    unsafe { atomic_xchg::<u32, { SeqCst }>(at, next | CLAIM_HELD) };
    Claimed::Yes
}

/// Drops the client entry of the half-open flow whose claim slot this packet's new flow took
/// (see `claim`): a retransmitted SYN of that client then opens a new flow, where it would go
/// out from the port the slot's new flow has.
#[inline(never)]
fn drop_half_open<F: Family>() {
    let Some(s) = scratch() else {
        return;
    };
    if !s.half_open_taken {
        return;
    }
    s.half_open_taken = false;
    let (reply_key, reply) = half_open::<F::A>(s);
    // The service is gone: so is the flow (its client entry resolves to nothing).
    let Some(svc) = LB_SVC_INFO.get(reply.id()) else {
        return;
    };
    let key = FlowKey::new(
        reply.addr,
        F::A::from_addr(&Addr::from_words(svc.addr.words())),
        reply.port,
        svc.port,
        reply_key.proto,
    );
    let flows = F::flows();
    if let Some(p) = flows.get_ptr(&key) {
        // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
        let f = unsafe { &*p };
        // The flow's own entry, not a newer one of the same client tuple.
        if f.addr == reply_key.dst && f.port == reply_key.dport {
            let _ = flows.remove(&key);
        }
    }
}

/// Gives back the claim slot of `key` that this packet claimed (the flow was not made after all).
#[inline(always)]
fn release<F: Family>(key: &FlowKey<F::A>, cfg: &Config) {
    let Some(slot) = F::claims().get_ptr_mut(claim_slot(key, F::claim_slots(cfg))) else {
        return;
    };
    // SAFETY: a map value, see `claimed`.
    let c = unsafe { &mut *slot };
    let at = &raw mut c.state;
    // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
    let state = unsafe { core::ptr::read_volatile(at) };
    if c.holds(key) {
        // A live entry of ours: no other CPU changes it (it would need it expired).
        // SAFETY: an aligned u32 in a map value, changed by other CPUs only atomically.
        unsafe {
            atomic_cxchg::<u32, { Relaxed }, { Relaxed }>(
                at,
                state,
                state & !CLAIM_KIND | CLAIM_FREE,
            )
        };
    }
}

#[inline(always)]
fn syn_only(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// What `refresh` needs of a packet, in one word (the lookups that call it have few registers to
/// spare).
#[inline(always)]
pub fn seen(proto: u8, tcp_flags: u8) -> u32 {
    u32::from(proto) | (u32::from(tcp_flags) << 8)
}

/// Whether the entry at `entry` (resolving to `t`) is live for this packet (`seen`); if so,
/// notes it (time, FIN/RST, the end of the handshake). Not live: expired, or a client's SYN on
/// the tuple of a closed connection (a new connection reusing it).
#[inline(always)]
pub fn refresh<F: Family>(
    entry: *mut Flow<F::A>,
    t: &Target,
    seen: u32,
    now: u32,
    cfg: &Config,
) -> bool {
    let (proto, tcp_flags) = (seen as u8, (seen >> 8) as u8);
    // SAFETY: a map value; other CPUs may update its time and flags concurrently, which at
    // worst loses one refresh.
    let flow = unsafe { &mut *entry };
    if flow.is_expired(cfg, now) {
        count(Counter::FlowsExpired);
        return false;
    }
    let flags = flow.flags;
    let closing = flags & FLOW_CLOSING != 0;
    if !t.reply && closing && syn_only(tcp_flags) {
        return false;
    }
    // The coarse clock ticks every few ms: most packets need no write at all.
    if flow.last != now {
        // A flow is one, whichever way it flows: a UDP flow that only sends one way (syslog,
        // metrics, a stream) keeps its other entry live too, a snat flow's claim on its port or
        // the entry that translates replies. (TCP always has packets both ways; its half-open
        // reply entries must age by their own, see Flow::gives_way.)
        if proto != IPPROTO_TCP && (flow.last ^ now) >> PEER_REFRESH_SHIFT != 0 {
            keep_peer::<F>(t, proto, now, cfg);
        }
        flow.last = now;
    }
    if !closing && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        let mut new = flags | FLOW_CLOSING;
        // The backend closes first: it keeps the tuple in TIME_WAIT, so the snat port must not
        // go to another connection to it meanwhile.
        if t.reply
            && flags & FLOW_SNAT != 0
            && tcp_flags & TCP_FIN != 0
            && peer_flags::<F>(t, proto, cfg).is_none_or(|f| f & FLOW_CLOSING == 0)
        {
            new |= FLOW_TIME_WAIT;
        }
        flow.flags = new;
    }
    // The client acknowledges: the handshake is done (a spoofed source never gets this far),
    // for both entries.
    if flags & FLOW_OPENING != 0 && !t.reply && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK {
        flow.flags &= !FLOW_OPENING;
        if let Some(p) = peer::<F>(t, proto, cfg) {
            // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
            unsafe { (*p).flags &= !FLOW_OPENING };
        }
    }
    true
}

/// Stamps the live entry of the other direction with `now`.
#[inline(always)]
fn keep_peer<F: Family>(t: &Target, proto: u8, now: u32, cfg: &Config) {
    if let Some(p) = peer::<F>(t, proto, cfg) {
        // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
        let peer = unsafe { &mut *p };
        if !peer.is_expired(cfg, now) {
            peer.last = now;
        }
    }
}

#[inline(always)]
fn peer_flags<F: Family>(t: &Target, proto: u8, cfg: &Config) -> Option<u8> {
    let p = peer::<F>(t, proto, cfg)?;
    // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
    Some(unsafe { (*p).flags })
}

/// What `open` did; the target is in `scratch().target` unless it failed, and then the reason is
/// in `scratch().reason`. (Fieldless: see nexthop::Route.)
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Created,
    /// A SYN retransmitted for a live flow (or another CPU's packet of the same new flow): it
    /// forwards as that flow, and nothing was created.
    Live,
    Failed,
}

/// What is decided for a new flow before anything is created (see main.rs, `new_flow`).
pub struct Choice {
    pub backend_id: u32,
    pub backend: Backend,
    /// The backend came from the ring and the service has affinity: remember it on success.
    pub remember: bool,
    /// A TCP SYN opens the flow.
    pub syn: bool,
    /// FLOW_SNAT (the service uses source NAT and the pod's delivery is not `netfilter`) or
    /// FLOW_NETFILTER (it is: the flow goes through the kernel's forwarding both ways), or 0.
    pub mode: u8,
    pub now_ns: u64,
}

/// The backend for a new flow, into `scratch().choice`: the client's affinity entry if it has a
/// live one, else the ring slot the flow hashes to. Creates nothing. False: no backend.
#[inline(never)]
pub fn choose(src: &Addr, svc: &Service, hash: u32, now_ns: u64) -> bool {
    match pick(src, svc, hash, now_ns) {
        Some((id, remember)) => {
            let (Some(s), Some(b)) = (scratch(), LB_BACKENDS.get(id)) else {
                return false;
            };
            let c = &mut s.choice;
            c.backend_id = id;
            crate::mem::copy(&mut c.backend, b);
            c.remember = remember;
            c.now_ns = now_ns;
            true
        }
        None => false,
    }
}

/// The backend id, and whether to remember it for the client's affinity.
#[inline(always)]
fn pick(src: &Addr, svc: &Service, hash: u32, now_ns: u64) -> Option<(u32, bool)> {
    let affinity = svc.flags & SVC_AFFINITY != 0;
    if affinity {
        let akey = AffinityKey {
            client: *src,
            service: svc.id,
        };
        if let Some(a) = LB_AFFINITY.get_ptr_mut(&akey) {
            // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
            let a = unsafe { &mut *a };
            if let Some(b) = LB_BACKENDS.get(a.backend)
                && lb_common::affinity::sticks(a, b, svc, now_ns)
            {
                a.last_seen_ns = now_ns;
                return Some((a.backend, false));
            }
        }
    }
    let slot = svc.ring + ring_slot(hash, svc.ring_size);
    let id = *LB_RINGS.get(slot)?;
    if id == NO_BACKEND {
        return None;
    }
    Some((id, affinity))
}

/// Creates the flow for a packet `key` to `svc` to the chosen backend: claims a snat port (snat)
/// and inserts both entries, never over a live entry. A SYN for a flow that is live already is
/// that flow's (a retransmission): nothing is created. On error nothing is left behind.
#[inline(never)]
pub fn open<F: Family>(
    pkt: &Packet,
    ports: &Ports,
    svc: &Service,
    choice: &Choice,
    cfg: &Config,
) -> Opened {
    let mut code = prepare::<F>(pkt, ports, svc, choice);
    // Called from here, not from `prepare`: a chain of subprograms may use 512 bytes of stack
    // in all, and claim_port calls one more.
    if code == 0 && choice.mode & FLOW_SNAT != 0 {
        code = claim_port::<F>(cfg, &choice.backend, lb_common::flow_clock(choice.now_ns));
    }
    if code == 0 {
        drop_half_open::<F>();
        code = insert::<F>(svc, choice, cfg);
    }
    match DropReason::from_code(code) {
        None => {
            if scratch().is_some_and(|s| s.live) {
                Opened::Live
            } else {
                Opened::Created
            }
        }
        Some(reason) => {
            if let Some(s) = scratch() {
                s.reason = reason;
            }
            Opened::Failed
        }
    }
}

/// The new flow's key, entries and reply key, in scratch() (for snat, `claim_port` then puts
/// its snat address and port in). 0, or a DropReason's code. (Its own subprogram, like
/// `insert`: a chain of subprograms may use 512 bytes of stack in all.)
#[inline(never)]
fn prepare<F: Family>(pkt: &Packet, ports: &Ports, svc: &Service, choice: &Choice) -> u32 {
    let Some(s) = scratch() else {
        return DropReason::FlowTable.code();
    };
    s.live = false;
    s.half_open_taken = false;
    let key = key_of::<F>(pkt, ports);
    *new_key::<F::A>(s) = key;
    let now = lb_common::flow_clock(choice.now_ns);
    let b = &choice.backend;
    let mut flags = choice.mode;
    if key.proto == IPPROTO_TCP {
        flags |= FLOW_TCP;
    }
    if choice.syn {
        flags |= FLOW_OPENING;
    }
    let info_generation = LB_SVC_INFO.get(svc.id).map_or(0, |s| s.generation);
    // The way the limiter found the client's source in, if it did (see Flow::source_way).
    let way = s.source_way;
    let (reply_key, forward, reply) = entries::<F::A>(s);
    *reply = Flow {
        last: now,
        flags: flags | FLOW_REPLY,
        generation: info_generation,
        port: key.sport,
        id_way: id_way(svc.id, u32::MAX),
        addr: key.src,
    };
    *forward = Flow {
        last: now,
        flags,
        generation: b.generation,
        port: key.sport,
        id_way: id_way(choice.backend_id, way),
        addr: key.src,
    };
    *reply_key = FlowKey::new(
        F::A::from_addr(&b.addr),
        key.src,
        b.port,
        key.sport,
        key.proto,
    );
    0
}

/// Inserts the prepared entries (see `prepare`), never over a live entry; on failure gives back
/// the claimed snat port. 0, or a DropReason's code.
#[inline(never)]
fn insert<F: Family>(svc: &Service, choice: &Choice, cfg: &Config) -> u32 {
    match inserted::<F>(svc, choice, cfg) {
        Ok(()) => 0,
        Err(reason) => reason.code(),
    }
}

#[inline(always)]
fn inserted<F: Family>(svc: &Service, choice: &Choice, cfg: &Config) -> Result<(), DropReason> {
    let now_ns = choice.now_ns;
    let now = lb_common::flow_clock(now_ns);
    let snat = choice.mode & FLOW_SNAT != 0;
    let b = &choice.backend;
    let s = scratch().ok_or(DropReason::FlowTable)?;
    // SAFETY: distinct fields of the scratch space.
    let key: &FlowKey<F::A> = unsafe { &*core::ptr::from_ref::<FlowKey<F::A>>(new_key::<F::A>(s)) };
    let (reply_key, forward, reply) = entries::<F::A>(s);
    let flows = F::flows();
    match flows.insert(key, &*forward, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => {
            if live::<F>(key, cfg, now) {
                // The flow is live: a retransmitted SYN (or another CPU's packet of the same new
                // flow). Forward as that flow (its target is in scratch); give back what we
                // claimed.
                if snat {
                    release::<F>(&*reply_key, cfg);
                }
                if let Some(s) = scratch() {
                    s.live = true;
                }
                return Ok(());
            }
            // A closed or expired flow on this tuple: the new connection takes it over.
            if flows.insert(key, &*forward, u64::from(BPF_ANY)).is_err() {
                if snat {
                    release::<F>(&*reply_key, cfg);
                }
                return Err(DropReason::FlowTable);
            }
        }
        Err(_) => {
            if snat {
                release::<F>(&*reply_key, cfg);
            }
            return Err(DropReason::FlowTable);
        }
    }
    if !snat && let Err(reason) = insert_reply::<F>(reply_key, reply, cfg, now) {
        let _ = flows.remove(key);
        return Err(reason);
    }
    if choice.remember {
        let entry = Affinity {
            backend: choice.backend_id,
            generation: b.generation,
            _pad1: 0,
            _pad2: 0,
            last_seen_ns: now_ns,
        };
        let akey = AffinityKey {
            client: key.src.to_addr(),
            service: svc.id,
        };
        let _ = LB_AFFINITY.insert(&akey, &entry, u64::from(BPF_ANY));
    }
    count(Counter::FlowsCreated);
    if let Some(s) = LB_SVC_STATS.get_ptr_mut(svc.id) {
        // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
        unsafe { (*s).new_flows += 1 };
    }
    if let Some(s) = LB_BE_STATS.get_ptr_mut(choice.backend_id) {
        // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
        unsafe { (*s).new_flows += 1 };
    }
    let (src, sport) = (forward.addr.to_addr(), forward.port);
    let policy = LB_SVC_INFO.get(svc.id).map_or(0, |s| s.policy);
    let s = scratch().ok_or(DropReason::FlowTable)?;
    let t = &mut s.target;
    t.tuple.src = src;
    t.tuple.dst = Addr::from_words(b.addr.words());
    t.tuple.sport = sport;
    t.tuple.dport = b.port;
    t.service = svc.id;
    t.backend = choice.backend_id;
    t.policy = policy;
    t.reply = false;
    Ok(())
}

/// Whether the entry at `key` is live, open (not closing) and still resolves; then its target
/// is in scratch().
#[inline(always)]
fn live<F: Family>(key: &FlowKey<F::A>, cfg: &Config, now: u32) -> bool {
    let Some(p) = F::flows().get_ptr(key) else {
        return false;
    };
    // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
    let f = unsafe { &*p };
    if f.is_expired(cfg, now) || f.flags & FLOW_CLOSING != 0 {
        return false;
    }
    match (resolve(f), scratch()) {
        (Some(t), Some(s)) => {
            s.target = t;
            true
        }
        _ => false,
    }
}

/// Inserts a client-IP-preserving flow's reply entry (keyed backend -> client). A live entry
/// there that is another flow's (the same client address and port, through another VIP to the
/// same backend port) is a clash: the new flow is refused, the live one untouched, closing or
/// not (its last packets are still on their way). Only an entry of this same service and
/// generation (a previous run of this very flow) or an expired one is replaced.
#[inline(always)]
fn insert_reply<F: Family>(
    key: &FlowKey<F::A>,
    value: &Flow<F::A>,
    cfg: &Config,
    now: u32,
) -> Result<(), DropReason> {
    let flows = F::flows();
    match flows.insert(key, value, u64::from(BPF_NOEXIST)) {
        Ok(()) => Ok(()),
        Err(e) if e == -EEXIST => {
            if let Some(p) = flows.get_ptr(key) {
                // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
                let old = unsafe { &*p };
                if !old.is_expired(cfg, now)
                    && (old.id() != value.id() || old.generation != value.generation)
                {
                    return Err(DropReason::FlowClash);
                }
            }
            flows
                .insert(key, value, u64::from(BPF_ANY))
                .map_err(|_| DropReason::FlowTable)
        }
        Err(_) => Err(DropReason::FlowTable),
    }
}

/// Finds a snat source (address, port) for a flow to backend `b` by claiming its reply entry's
/// slot (see `claim`): a port whose slot holds a live entry, of a flow from that backend to
/// that node address and port or of another backend's whose block of ports shares the place
/// (lb_common::claim_slot), is busy, so two flows never share one (0; else a DropReason's
/// code). Ports are tried in order from a cursor per backend, so a port is reused as late as
/// possible (after the whole range); after a busy one, a block and a port further. When none of
/// the tries is free, the first half-open flow passed that gives way (Flow::gives_way) is
/// dropped and its port taken. Reply entries of flows the backend closed first stay
/// `tcp_time_wait` (see FLOW_TIME_WAIT), so a port is never given back to a backend that may
/// hold the old connection in TIME_WAIT.
#[inline(never)]
fn claim_port<F: Family>(cfg: &Config, b: &Backend, now: u32) -> u32 {
    let exhausted = DropReason::SnatPortsExhausted.code();
    let Some(s) = scratch() else {
        return exhausted;
    };
    let (key, forward, reply) = entries::<F::A>(s);
    let code = try_ports::<F>(cfg, b, key, reply, now);
    if code == 0 {
        forward.addr = key.dst;
        forward.port = key.dport;
    }
    code
}

#[inline(always)]
fn try_ports<F: Family>(
    cfg: &Config,
    b: &Backend,
    key: &mut FlowKey<F::A>,
    reply: &Flow<F::A>,
    now: u32,
) -> u32 {
    let exhausted = DropReason::SnatPortsExhausted.code();
    let (addrs, n_addrs) = F::snat(cfg);
    let ports = cfg.snat_port_count();
    // Both checked, so the compiler sees no division by zero (it would link in a panic).
    if ports == 0 || n_addrs == 0 {
        return exhausted;
    }
    let space = n_addrs.min(addrs.len() as u32) * ports;
    // Keyed by the backend's address, not its id: two services' ids for one pod share it.
    let slot = addr_hash(&b.addr) ^ u32::from(b.port);
    let Some(cursor) = LB_PORTS.get_ptr_mut(slot % PORT_CURSORS) else {
        return exhausted;
    };
    // After a busy port the next try is a block and a port on (the ports after it may well be
    // busy too: another backend's, whose block shares this one's place, or this backend's own
    // live flows; and a stride of exactly a block would try one slot of each block only, round
    // after round, while a flood's half-open flows wait elsewhere), unless the range is too
    // small for the tries to spread over blocks.
    let skip = if space >= CLAIM_BLOCK * SNAT_PORT_TRIES {
        CLAIM_BLOCK
    } else {
        0
    };
    let Some(s) = scratch() else {
        return exhausted;
    };
    // The first port passed whose half-open flow gives way: taken if no port is free.
    s.fallback = u32::MAX;
    for _ in 0..SNAT_PORT_TRIES {
        // SAFETY: an aligned u32 in a map value. SeqCst, not Relaxed: for a relaxed 32-bit add
        // LLVM emits BPF's plain atomic add, without the fetch, and the "old value" read back
        // is the operand (seen with the nightly's LLVM 22); a sequentially consistent one is
        // BPF_ATOMIC_FETCH_ADD, which every BPF atomic is anyway.
        // From where the backend's hash puts it, not 0: backends whose blocks of ports share a
        // place in the claim array then use different slots of it.
        let i =
            unsafe { atomic_xadd::<u32, u32, { SeqCst }>(cursor, 1) }.wrapping_add(slot) % space;
        if !snat_source::<F>(cfg, addrs, ports, i, key) {
            break;
        }
        match claim::<F>(key, reply, cfg, now, false) {
            Claimed::Yes => return 0,
            Claimed::GivesWay if s.fallback == u32::MAX => s.fallback = i,
            _ => {}
        }
        // (Also when `skip` is 0: a branch here would have the verifier walk the rest of the
        // loop twice.)
        // SAFETY: as above.
        unsafe { atomic_xadd::<u32, u32, { SeqCst }>(cursor, skip) };
    }
    let i = s.fallback;
    if i != u32::MAX
        && snat_source::<F>(cfg, addrs, ports, i, key)
        && claim::<F>(key, reply, cfg, now, true) == Claimed::Yes
    {
        return 0;
    }
    exhausted
}

/// Puts the snat source of number `i` (an address, then a port, over the whole space) into the
/// reply key `key` (backend -> snat address and port; the caller filled in the rest). `ports`:
/// the snat port count, not 0. False: no such address.
#[inline(always)]
fn snat_source<F: Family>(
    cfg: &Config,
    addrs: &[Addr; MAX_SNAT_ADDRS],
    ports: u32,
    i: u32,
    key: &mut FlowKey<F::A>,
) -> bool {
    let a = i / ports;
    if a as usize >= addrs.len() {
        return false;
    }
    // Masked in 64 bits as well: the verifier must see the index bounded in the register
    // that addresses the array, whatever width the compiler compared it in.
    let a =
        // SAFETY: the pointer comes from a reference; volatile only keeps the access as written.
        (u64::from(unsafe { core::ptr::read_volatile(&raw const a) }) & (MAX_SNAT_ADDRS as u64 - 1)) as usize;
    key.dst = F::A::from_addr(&addrs[a]);
    key.dport = cfg.snat_port(i % ports).to_be();
    true
}
