//! Sending a rewritten packet on: the kernel's FIB picks the egress device and the MACs
//! (bpf_fib_lookup), then XDP_TX when it leaves where it came in, XDP_REDIRECT through LB_DEVMAP
//! otherwise. When the kernel cannot tell us enough (no neighbour entry yet, a local
//! destination, a device we may not redirect to) the rewritten packet goes to the kernel, which
//! forwards it itself; each such case is counted.
use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::generated::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{Addr, Counter};

use crate::{
    maps::{LB_DEVMAP, LB_IFACES, count, scratch},
    parse::{ETH_P_8021Q, Packet, load, ptr_at, store},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const FIB_SUCCESS: i64 = 0;
const FIB_NOT_FORWARDED: i64 = 4;
const FIB_NO_NEIGHBOUR: i64 = 7;
const FIB_FRAG_NEEDED: i64 = 8;

/// Where a packet goes next.
pub enum Hop {
    /// Out of `ifindex` (possibly as a VLAN device on top of it), with these MACs.
    Device {
        ifindex: u32,
        vlan_id: Option<u16>,
        macs: Macs,
    },
    /// The verdict is already decided (pass to the kernel, or drop), and counted.
    Verdict(u32),
}

/// Asks the kernel's FIB how to reach `addrs[1]` from `addrs[0]` for a datagram of `len` bytes.
#[inline(always)]
pub fn route(ctx: &XdpContext, v6: bool, addrs: &[Addr; 2], len: u16) -> Hop {
    let [src, dst] = addrs;
    let Some(scratch) = scratch() else {
        return Hop::Verdict(xdp_action::XDP_DROP);
    };
    let p = &mut scratch.fib;
    *p = unsafe { core::mem::zeroed() };
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_1.tot_len = len;
    if v6 {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = src.words();
        p.__bindgen_anon_4.ipv6_dst = dst.words();
    } else {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = src.v4_word();
        p.__bindgen_anon_4.ipv4_dst = dst.v4_word();
    }
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc {
        FIB_SUCCESS => {}
        FIB_NO_NEIGHBOUR => {
            count(Counter::PassNoNeighbour);
            return Hop::Verdict(xdp_action::XDP_PASS);
        }
        FIB_NOT_FORWARDED => {
            // A local destination (e.g. a host-network backend): the kernel delivers it.
            count(Counter::PassNotRedirectable);
            return Hop::Verdict(xdp_action::XDP_PASS);
        }
        FIB_FRAG_NEEDED => {
            count(Counter::DropTooBig);
            return Hop::Verdict(xdp_action::XDP_DROP);
        }
        _ => {
            count(Counter::DropNoRoute);
            return Hop::Verdict(xdp_action::XDP_DROP);
        }
    }
    let mut ifindex = p.ifindex;
    let mut vlan_id = None;
    // A VLAN device: send tagged out of the device it sits on.
    if let Some(vlan) = unsafe { LB_IFACES.get(&ifindex) } {
        ifindex = vlan.parent;
        vlan_id = Some(vlan.vlan_id);
    }
    Hop::Device {
        ifindex,
        vlan_id,
        macs: Macs::of(p),
    }
}

/// Destination then source MAC, as the Ethernet header holds them, in 16-bit words: the FIB
/// result has them at offsets 52 and 58, where a merged 32-bit stack load would be misaligned
/// (and the verifier rejects misaligned stack access).
#[derive(Clone, Copy)]
pub struct Macs(pub [u16; 6]);

impl Macs {
    #[inline(always)]
    fn of(p: &FibParams) -> Macs {
        let smac: *const u16 = (&raw const p.smac).cast();
        let dmac: *const u16 = (&raw const p.dmac).cast();
        // Volatile: keeps LLVM from merging the 16-bit loads.
        unsafe {
            Macs([
                core::ptr::read_volatile(dmac),
                core::ptr::read_volatile(dmac.add(1)),
                core::ptr::read_volatile(dmac.add(2)),
                core::ptr::read_volatile(smac),
                core::ptr::read_volatile(smac.add(1)),
                core::ptr::read_volatile(smac.add(2)),
            ])
        }
    }
}

/// Routes and sends a packet whose L3/L4 rewrite is done.
#[inline(never)]
pub fn send(ctx: &XdpContext, pkt: &Packet, addrs: &[Addr; 2]) -> u32 {
    match route(ctx, pkt.v6, addrs, pkt.len) {
        Hop::Verdict(v) => v,
        Hop::Device {
            ifindex,
            vlan_id,
            macs,
        } => transmit(ctx, pkt.vlan, ifindex, vlan_id, macs),
    }
}

/// Sets the VLAN tag and MACs, then XDP_TX or XDP_REDIRECT to `ifindex`.
#[inline(always)]
pub fn transmit(
    ctx: &XdpContext,
    tagged: bool,
    ifindex: u32,
    vlan_id: Option<u16>,
    macs: Macs,
) -> u32 {
    if set_vlan(ctx, tagged, vlan_id).is_none() {
        count(Counter::DropMalformed);
        return xdp_action::XDP_DROP;
    }
    let Some(eth) = ptr_at::<[u16; 6]>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    let eth: *mut u8 = eth.cast();
    for (i, word) in macs.0.iter().enumerate() {
        unsafe { store(eth.add(2 * i), *word) };
    }
    if ifindex == ctx.ingress_ifindex() as u32 {
        count(Counter::XdpTx);
        return xdp_action::XDP_TX;
    }
    // A device the agent did not put in the devmap cannot take XDP frames: let the kernel
    // forward the (already rewritten) packet.
    match LB_DEVMAP.redirect(ifindex, u64::from(xdp_action::XDP_PASS)) {
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

/// Makes the frame carry `vlan_id` (or no tag), pushing, retagging or popping the 802.1Q
/// header. The MACs are left as garbage: the caller writes them next.
#[inline(always)]
fn set_vlan(ctx: &XdpContext, tagged: bool, vlan_id: Option<u16>) -> Option<()> {
    let (grow, vid) = match (tagged, vlan_id) {
        (false, None) => return Some(()),
        // Drop the 4 tag bytes from the front: the EtherType then follows the (stale) MACs.
        (true, None) => {
            return (unsafe { bpf_xdp_adjust_head(ctx.ctx.cast(), 4) } == 0).then_some(());
        }
        (true, Some(vid)) => (false, vid),
        (false, Some(vid)) => (true, vid),
    };
    if grow && unsafe { bpf_xdp_adjust_head(ctx.ctx.cast(), -4) } != 0 {
        return None;
    }
    // TPID and TCI sit between the MACs and the EtherType (which a push leaves in place).
    let tag: *mut u8 = ptr_at::<[u16; 8]>(ctx, 0)?.cast();
    unsafe {
        let pcp = if grow {
            0
        } else {
            u16::from_be(load::<u16>(tag.add(14))) & 0xf000
        };
        store(tag.add(12), ETH_P_8021Q.to_be());
        store(tag.add(14), (pcp | (vid & 0x0fff)).to_be());
    }
    Some(())
}
