//! Where a rewritten packet goes next: the kernel's FIB picks the egress device and the MACs
//! (bpf_fib_lookup), cached per CPU and destination for about a second (LB_HOPS); then XDP_TX
//! when it leaves where it came in, XDP_REDIRECT through LB_DEVMAP otherwise. When the kernel
//! cannot tell us enough (no neighbour entry yet, a local destination, a device we may not
//! redirect to), the rewritten packet goes to the kernel, which forwards it itself; when the
//! egress device has a policy hook that a redirect would skip (the agent marks such devices in
//! LB_IFACES), it goes to the kernel marked for `lb_uplink_tc` (see handoff.rs); when netfilter's
//! forward path must see it, to the kernel's forwarding unmarked (see netfilter.rs). Each such
//! case is counted.
use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::generated::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    Addr, Counter, HOP_NETFILTER, HOP_POLICY_HOOK, HOP_SLOT_BITS, HOP_VLAN, Hop, IFACE_NETFILTER,
    IFACE_POLICY_HOOK,
    hash::slot_hash,
    hop_epoch,
    net::{
        AF_INET, AF_INET6, ETH_P_8021Q, FIB_FRAG_NEEDED, FIB_NO_NEIGHBOUR, FIB_NOT_FORWARDED,
        FIB_SUCCESS,
    },
};

use crate::{
    maps::{LB_DEVMAP, LB_HOPS, LB_IFACES, count, scratch},
    parse::{load, ptr_at, store},
};

/// A next hop: out of `ifindex` (with a VLAN tag if `vlan & HOP_VLAN`), with these MACs.
#[derive(Clone, Copy)]
pub struct Next {
    pub ifindex: u32,
    pub vlan: u16,
    /// The route's MTU, when the datagram was too big for it.
    pub mtu: u16,
    /// Destination then source MAC, as the Ethernet header holds them, in 16-bit words.
    pub macs: [u16; 6],
}

impl Next {
    pub const NONE: Next = Next {
        ifindex: 0,
        vlan: 0,
        mtu: 0,
        macs: [0; 6],
    };
}

/// What `route` found. Fieldless: enums with data in a subprogram's signature make BTF the
/// kernel rejects (and without BTF, no tail calls from subprograms).
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The next hop is in `Next`.
    Found,
    /// The kernel has no neighbour entry yet for the next hop out of `Next::ifindex`: it must
    /// send the packet (and resolve it).
    Neighbour,
    /// A local destination (e.g. a host-network backend): the kernel delivers it.
    Local,
    /// No route (unreachable, blackhole, prohibited, forwarding off).
    Unreachable,
    /// Larger than the route's MTU (`Next::mtu`).
    TooBig,
    /// The next hop is out of a device whose TC egress hook (a CNI's network policy) must see
    /// the packet: handed over to `lb_uplink_tc`, which sends it out of the device through that
    /// hook (see handoff.rs). `Next` is filled as for `Found`.
    PolicyHook,
    /// The next hop is out of a device whose delivery is `netfilter`: the packet goes to the
    /// kernel's forwarding, through conntrack and netfilter's forward rules (a new flow keeps
    /// the client's address). `Next` is filled as for `Found`.
    Netfilter,
}

impl Route {
    /// The route a `Route as u32` stood for.
    #[inline(always)]
    pub fn of(n: u32) -> Route {
        match n {
            0 => Route::Found,
            1 => Route::Neighbour,
            2 => Route::Local,
            4 => Route::TooBig,
            5 => Route::PolicyHook,
            6 => Route::Netfilter,
            _ => Route::Unreachable,
        }
    }
}

/// The program's context and the device the packet arrived on, as bpf_fib_lookup wants them,
/// and the packet's family.
pub struct Fib {
    pub ctx: *mut core::ffi::c_void,
    pub ifindex: u32,
    pub v6: bool,
}

/// How to reach `dst` from `src` with a datagram of `len` bytes (`len`: the size the MTU is
/// checked against, one segment's for a GSO packet), into `next`.
/// The cache's answer is inline (the per-packet path makes no call for it); a miss calls
/// `route_miss`.
#[inline(always)]
pub fn route(fib: &Fib, src: &Addr, dst: &Addr, len: u32, now_ns: u64, next: &mut Next) -> Route {
    let slot = slot_hash(dst, HOP_SLOT_BITS);
    let Some(hop) = LB_HOPS.get_ptr(slot) else {
        return Route::Unreachable;
    };
    // SAFETY: this CPU's slot; nothing else runs on this CPU while we do.
    let hop = unsafe { &*hop };
    if hop.ifindex != 0
        && hop.epoch == hop_epoch(now_ns)
        && hop.dst == *dst
        && len <= u32::from(hop.len_ok)
    {
        next.ifindex = hop.ifindex;
        next.vlan = hop.vlan;
        copy_macs(&mut next.macs, &hop.macs);
        return found(hop.vlan);
    }
    // The pair is copied only here: a cache hit needs no copy of either address.
    route_miss(fib, &[*src, *dst], len, now_ns, next)
}

/// `route` past the cache: asks the FIB and fills the cache's slot.
#[inline(never)]
fn route_miss(fib: &Fib, addrs: &[Addr; 2], len: u32, now_ns: u64, next: &mut Next) -> Route {
    let [src, dst] = addrs;
    let slot = slot_hash(dst, HOP_SLOT_BITS);
    let Some(hop) = LB_HOPS.get_ptr_mut(slot) else {
        return Route::Unreachable;
    };
    // SAFETY: this CPU's slot; nothing else runs on this CPU while we do.
    let hop = unsafe { &mut *hop };
    let epoch = hop_epoch(now_ns);
    let same = hop.ifindex != 0 && hop.epoch == epoch && hop.dst == *dst;
    let Some(scratch) = scratch() else {
        return Route::Unreachable;
    };
    let p = &mut scratch.fib;
    // FibParams is a C struct of integers and unions of integers: all zeroes is a value.
    crate::mem::zero(p);
    p.ifindex = fib.ifindex;
    p.__bindgen_anon_1.tot_len = len.min(0xffff) as u16;
    if fib.v6 {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = src.words();
        p.__bindgen_anon_4.ipv6_dst = dst.words();
    } else {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = src.v4_word();
        p.__bindgen_anon_4.ipv4_dst = dst.v4_word();
    }
    // SAFETY: `fib.ctx` is the program's context and `p` a FibParams of the size passed.
    let rc = unsafe { bpf_fib_lookup(fib.ctx, p, core::mem::size_of::<FibParams>() as i32, 0) };
    match rc {
        FIB_SUCCESS => {}
        FIB_NO_NEIGHBOUR => {
            next.ifindex = p.ifindex;
            return Route::Neighbour;
        }
        FIB_NOT_FORWARDED => return Route::Local,
        FIB_FRAG_NEEDED => {
            // The MTU comes back in place of the length.
            // SAFETY: the union holds integers only; on FRAG_NEEDED the kernel wrote the MTU in it.
            next.mtu = unsafe { p.__bindgen_anon_1.mtu_result };
            return Route::TooBig;
        }
        _ => return Route::Unreachable,
    }
    let mut ifindex = p.ifindex;
    let mut vlan = 0;
    // SAFETY: the entry is copied out at once; the agent writes this map only when interfaces
    // or their hooks change.
    if let Some(v) = unsafe { LB_IFACES.get(&ifindex) } {
        if v.flags & IFACE_NETFILTER != 0 {
            vlan = HOP_NETFILTER;
        } else if v.flags & IFACE_POLICY_HOOK != 0 {
            vlan = HOP_POLICY_HOOK;
        }
        // A VLAN device: send tagged out of the device it sits on.
        if v.parent != 0 {
            ifindex = v.parent;
            vlan |= HOP_VLAN | (v.vlan_id & 0x0fff);
        }
    }
    next.ifindex = ifindex;
    next.vlan = vlan;
    next.macs = macs_of(p);
    let len_ok = if same {
        hop.len_ok.max(len as u16)
    } else {
        len as u16
    };
    *hop = Hop {
        dst: Addr::from_words(dst.words()),
        ifindex,
        epoch,
        macs: next.macs,
        vlan,
        len_ok,
    };
    found(vlan)
}

/// `*dst = *src` for MACs in map memory, word by word: LLVM cannot tell two map values apart
/// and would call `memmove`, a byte loop (see mem.rs), on every forwarded packet.
#[inline(always)]
fn copy_macs(dst: &mut [u16; 6], src: &[u16; 6]) {
    for i in 0..6 {
        // SAFETY: both arrays have six u16 words; volatile keeps LLVM from merging the copies
        // back into a `memmove` call.
        unsafe {
            core::ptr::write_volatile(&raw mut dst[i], core::ptr::read_volatile(&raw const src[i]));
        }
    }
}

/// A next hop that was found: `Found`, or how its device's delivery says otherwise.
#[inline(always)]
fn found(vlan: u16) -> Route {
    if vlan & HOP_NETFILTER != 0 {
        Route::Netfilter
    } else if vlan & HOP_POLICY_HOOK != 0 {
        Route::PolicyHook
    } else {
        Route::Found
    }
}

/// The FIB result's MACs as 16-bit words: they sit at offsets 52 and 58, where a merged 32-bit
/// stack load would be misaligned (and the verifier rejects misaligned stack access).
#[inline(always)]
fn macs_of(p: &FibParams) -> [u16; 6] {
    let smac: *const u16 = (&raw const p.smac).cast();
    let dmac: *const u16 = (&raw const p.dmac).cast();
    // Volatile: keeps LLVM from merging the 16-bit loads.
    // SAFETY: `smac` and `dmac` are 6 bytes each at even offsets of FibParams (52 and 58): three aligned u16 words each.
    unsafe {
        [
            core::ptr::read_volatile(dmac),
            core::ptr::read_volatile(dmac.add(1)),
            core::ptr::read_volatile(dmac.add(2)),
            core::ptr::read_volatile(smac),
            core::ptr::read_volatile(smac.add(1)),
            core::ptr::read_volatile(smac.add(2)),
        ]
    }
}

/// Sets the VLAN tag and MACs, then XDP_TX (when the next hop's device is `ingress`, the one
/// the packet arrived on) or XDP_REDIRECT to it. Inline: on the per-packet path (see main.rs,
/// `entry`).
#[inline(always)]
pub fn transmit(ctx: &XdpContext, tagged: bool, next: &Next, ingress: u32) -> u32 {
    if set_vlan(ctx, tagged, next.vlan).is_none() {
        count(Counter::DropMalformed);
        return xdp_action::XDP_DROP;
    }
    let Some(eth) = ptr_at::<[u16; 6]>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    let eth: *mut u8 = eth.cast();
    for (i, word) in next.macs.iter().enumerate() {
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        unsafe { store(eth.add(2 * i), *word) };
    }
    if next.ifindex == ingress {
        count(Counter::XdpTx);
        return xdp_action::XDP_TX;
    }
    // A device the agent did not put in the devmap cannot take XDP frames: let the kernel
    // forward the (already rewritten) packet.
    match LB_DEVMAP.redirect(next.ifindex, u64::from(xdp_action::XDP_PASS)) {
        Ok(action) => {
            count(Counter::XdpRedirect);
            action
        }
        Err(action) => {
            count(Counter::PassNotRedirectable);
            action
        }
    }
}

/// Makes the frame carry `vlan`'s tag (or no tag), pushing, retagging or popping the 802.1Q
/// header. The MACs are left as garbage: the caller writes them next.
#[inline(always)]
fn set_vlan(ctx: &XdpContext, tagged: bool, vlan: u16) -> Option<()> {
    let wanted = vlan & HOP_VLAN != 0;
    let vid = vlan & 0x0fff;
    let grow = match (tagged, wanted) {
        (false, false) => return Some(()),
        // Drop the 4 tag bytes from the front: the EtherType then follows the (stale) MACs.
        (true, false) => {
            // SAFETY: `ctx.ctx` is the program's context; no packet pointer taken before the call is used after it.
            return (unsafe { bpf_xdp_adjust_head(ctx.ctx.cast(), 4) } == 0).then_some(());
        }
        (true, true) => false,
        (false, true) => true,
    };
    // SAFETY: `ctx.ctx` is the program's context; no packet pointer taken before the call is used after it.
    if grow && unsafe { bpf_xdp_adjust_head(ctx.ctx.cast(), -4) } != 0 {
        return None;
    }
    // TPID and TCI sit between the MACs and the EtherType (which a push leaves in place).
    let tag: *mut u8 = ptr_at::<[u16; 8]>(ctx, 0)?.cast();
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
    unsafe {
        let pcp = if grow {
            0
        } else {
            u16::from_be(load::<u16>(tag.add(14))) & 0xf000
        };
        store(tag.add(12), ETH_P_8021Q.to_be());
        store(tag.add(14), (pcp | vid).to_be());
    }
    Some(())
}
