//! The flow table: a live flow keeps its backend for its whole life; a new one gets a backend
//! from the service's Maglev ring (or its session-affinity entry), a source port if the service
//! uses source NAT, and two entries, one per direction.
use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use lb_common::{
    Addr, Affinity, AffinityKey, BACKEND_ACTIVE, Config, Counter, DropReason, FLOW_CLOSING,
    FLOW_OPENING, FLOW_REPLY, FLOW_SNAT, Flow, FlowKey, NO_BACKEND, SVC_AFFINITY, SVC_SNAT,
    Service,
    hash::{flow_hash, rehash, ring_slot},
};

use crate::{
    maps::{
        EEXIST, LB_AFFINITY, LB_BACKENDS, LB_BE_STATS, LB_FLOWS, LB_RINGS, LB_SVC_STATS, Scratch,
        count, scratch,
    },
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Tries per new snat flow to find a free source port.
const SNAT_PORT_TRIES: u32 = 8;

/// The live entry for `key`, refreshed with this packet; `None` if there is none, it expired, or
/// this is a new connection reusing the tuple of a closed one.
#[inline(always)]
pub fn lookup(key: &FlowKey, tcp_flags: u8, now: u64, cfg: &Config) -> Option<*mut Flow> {
    let ptr = LB_FLOWS.get_ptr_mut(key)?;
    refresh(ptr, tcp_flags, now, cfg).then_some(ptr)
}

/// Whether the entry at `ptr` is live for this packet (see `lookup`); if so, notes the packet
/// (time, and FIN/RST).
#[inline(always)]
pub fn refresh(ptr: *mut Flow, tcp_flags: u8, now: u64, cfg: &Config) -> bool {
    // SAFETY: a map value; other CPUs may update its timestamp and flags concurrently, which
    // at worst loses one refresh.
    let flow = unsafe { &mut *ptr };
    let closing = flow.flags & FLOW_CLOSING != 0;
    if flow.is_expired(cfg, now) {
        count(Counter::FlowsExpired);
        return false;
    }
    if closing && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        // The client reuses the tuple of a finished connection: a new flow.
        return false;
    }
    // The coarse clock ticks every few ms: most packets need no write at all.
    if flow.last_seen_ns != now {
        flow.last_seen_ns = now;
    }
    if !closing && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        flow.flags |= FLOW_CLOSING;
    }
    // The client acknowledges: the handshake is done (a spoofed source never gets this far).
    if flow.flags & FLOW_OPENING != 0 && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK {
        flow.flags &= !FLOW_OPENING;
    }
    true
}

/// Creates the flow for a packet `key` to `svc`, `syn` if a TCP SYN opens it. On success its
/// client-side entry is in `scratch().flow`.
#[inline(never)]
pub fn create(
    key: &FlowKey,
    svc: &Service,
    cfg: &Config,
    now: u64,
    syn: bool,
) -> Result<(), DropReason> {
    if svc.active_backends == 0 {
        count(Counter::DropNoBackend);
        return Err(DropReason::NoBackend);
    }
    let scratch = scratch().ok_or(DropReason::FlowTable)?;
    let hash = flow_hash(
        &key.src,
        &key.dst,
        key.sport,
        key.dport,
        key.proto,
        cfg.hash_seed,
    );
    let Some(backend_id) = pick_backend(key, svc, cfg, hash, now) else {
        count(Counter::DropNoBackend);
        return Err(DropReason::NoBackend);
    };
    let backend = LB_BACKENDS.get(backend_id).ok_or(DropReason::NoBackend)?;
    // Word by word: LLVM cannot tell the two map values apart and would copy with memmove.
    let backend_addr = Addr::from_words(backend.addr.words());

    let snat = svc.flags & SVC_SNAT != 0;
    let flags = if snat { FLOW_SNAT } else { 0 };
    let forward = &mut scratch.flow;
    forward.src = key.src;
    forward.dst = backend_addr;
    forward.sport = key.sport;
    forward.dport = backend.port;
    forward.service = svc.id;
    forward.backend = backend_id;
    forward.flags = if syn { flags | FLOW_OPENING } else { flags };
    forward.proto = key.proto;
    forward.last_seen_ns = now;
    // No next hop cached yet (the scratch space holds the previous flow's).
    forward.hop_ifindex = 0;
    // The reply entry translates backend -> (node or client) back to VIP -> client.
    let reply = &mut scratch.reply;
    reply.src = key.dst;
    reply.dst = key.src;
    reply.sport = key.dport;
    reply.dport = key.sport;
    reply.service = svc.id;
    reply.backend = backend_id;
    reply.flags = flags | FLOW_REPLY;
    reply.proto = key.proto;
    reply.last_seen_ns = now;
    reply.hop_ifindex = 0;
    if snat {
        forward.src = if key.src.is_v4() {
            cfg.snat_v4
        } else {
            cfg.snat_v6
        };
        scratch.flow.sport = claim_snat_port(scratch, cfg, hash)?;
    } else {
        scratch.key = scratch.flow.peer_key();
        if LB_FLOWS
            .insert(&scratch.key, &scratch.reply, u64::from(BPF_ANY))
            .is_err()
        {
            count(Counter::FlowInsertFailed);
            return Err(DropReason::FlowTable);
        }
    }
    if LB_FLOWS
        .insert(key, &scratch.flow, u64::from(BPF_ANY))
        .is_err()
    {
        // Give back the reply entry (and with it the snat port) claimed above.
        let _ = LB_FLOWS.remove(&scratch.key);
        count(Counter::FlowInsertFailed);
        return Err(DropReason::FlowTable);
    }
    count(Counter::FlowsCreated);
    if let Some(s) = LB_SVC_STATS.get_ptr_mut(svc.id) {
        unsafe { (*s).new_flows += 1 };
    }
    if let Some(s) = LB_BE_STATS.get_ptr_mut(backend_id) {
        unsafe { (*s).new_flows += 1 };
    }
    Ok(())
}

/// The backend for a new flow: the client's affinity entry if it has a live one, else the
/// ring slot the flow hashes to.
#[inline(always)]
fn pick_backend(key: &FlowKey, svc: &Service, cfg: &Config, hash: u32, now: u64) -> Option<u32> {
    let affinity = svc.flags & SVC_AFFINITY != 0;
    let akey = AffinityKey {
        client: key.src,
        service: svc.id,
    };
    if affinity && let Some(a) = LB_AFFINITY.get_ptr_mut(&akey) {
        let a = unsafe { &mut *a };
        let timeout_ns = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
        // Signed: `now` may be a clock tick before the entry's stamp.
        if now.wrapping_sub(a.last_seen_ns) as i64 <= timeout_ns as i64
            && let Some(b) = LB_BACKENDS.get(a.backend)
            && b.service == svc.id
            && b.flags & BACKEND_ACTIVE != 0
        {
            a.last_seen_ns = now;
            return Some(a.backend);
        }
    }
    let slot = svc.ring * cfg.ring_size + ring_slot(hash, cfg.ring_size);
    let id = *LB_RINGS.get(slot)?;
    if id == NO_BACKEND {
        return None;
    }
    if affinity {
        let entry = Affinity {
            backend: id,
            _pad: 0,
            last_seen_ns: now,
        };
        let _ = LB_AFFINITY.insert(&akey, &entry, u64::from(BPF_ANY));
    }
    Some(id)
}

/// Finds a source port for a snat flow (`scratch.flow`, source port not yet set) by claiming
/// its reply entry (`scratch.reply`): the insert only succeeds if no flow from that backend to
/// that node port exists, so two CPUs cannot claim the same port. Each try is a port from its
/// own hash of the flow (independent tries: no clusters of taken ports to probe through).
/// Entries of flows that are over are deleted by the agent's sweep, which frees their ports.
#[inline(always)]
fn claim_snat_port(scratch: &mut Scratch, cfg: &Config, hash: u32) -> Result<u16, DropReason> {
    let min = u32::from(cfg.snat_port_min);
    // At least 1 (max is a u16): no division by zero for the verifier to find.
    let range = u32::from(cfg.snat_port_max)
        .checked_sub(min)
        .ok_or(DropReason::SnatPorts)?
        + 1;
    scratch.key = scratch.flow.peer_key();
    for i in 0..SNAT_PORT_TRIES {
        let port = ((min + rehash(hash, i) % range) as u16).to_be();
        scratch.key.dport = port;
        match LB_FLOWS.insert(&scratch.key, &scratch.reply, u64::from(BPF_NOEXIST)) {
            Ok(()) => return Ok(port),
            // Taken: try another.
            Err(e) if e == -EEXIST => {}
            Err(_) => {
                count(Counter::FlowInsertFailed);
                return Err(DropReason::FlowTable);
            }
        }
    }
    count(Counter::DropSnatPortsExhausted);
    Err(DropReason::SnatPorts)
}
