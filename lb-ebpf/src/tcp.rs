//! TCP resets we originate: for a SYN the rate limiter rejects (when the policy asks for it) and
//! for packets of a flow the agent ended. The packet at hand is turned, in place, into the RST
//! its receiver would send (RFC 9293 §3.10.7.1) and sent back the way it came. Only a packet
//! without IPv4 options or IPv6 extension headers is answered (a RST carries none); any other is
//! just dropped.
use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_tail, programs::XdpContext,
};
use lb_common::{
    Addr, Counter, IPPROTO_TCP,
    checksum::{Delta, fold64},
    net::{
        IPV4_CHECK, IPV4_DST, IPV4_HLEN, IPV4_SRC, IPV4_TOT_LEN, IPV4_TTL, IPV6_DST, IPV6_HLEN,
        IPV6_HOP_LIMIT, IPV6_PAYLOAD_LEN, IPV6_SRC, TCP_ACK, TCP_FIN, TCP_FLAGS, TCP_RST, TCP_SYN,
    },
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    icmp::swap_macs,
    maps::count,
    parse::{Packet, bounds, load, load_addr, ptr_at, store, store_addr},
};

const TCP_HEADER_LEN: usize = 20;
const RST_TTL: u8 = 64;

#[inline(never)]
pub fn reset(ctx: &XdpContext, pkt: &Packet) -> u32 {
    match build_reset(ctx, pkt) {
        Some(()) => {
            count(Counter::RstSent);
            count(Counter::XdpTx);
            xdp_action::XDP_TX
        }
        None => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn build_reset(ctx: &XdpContext, pkt: &Packet) -> Option<()> {
    let ip_header_len = pkt.l4 - pkt.l3;
    if ip_header_len != if pkt.v6 { IPV6_HLEN } else { IPV4_HLEN } {
        return None;
    }
    let tcp: *mut u8 = ptr_at::<[u8; TCP_HEADER_LEN]>(ctx, pkt.l4)?.cast();
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
    let (ports, seq, ack, offset, flags): (u32, u32, u32, u8, u8) = unsafe {
        (
            load(tcp),
            u32::from_be(load(tcp.add(4))),
            u32::from_be(load(tcp.add(8))),
            *tcp.add(12),
            *tcp.add(TCP_FLAGS),
        )
    };
    let data_offset = (offset >> 4) as usize * 4;
    let payload = (pkt.len as usize)
        .checked_sub(ip_header_len)?
        .checked_sub(data_offset)?;
    let (rst_seq, rst_ack, rst_flags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let len =
            payload as u32 + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        (0, seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    // Ports swapped, sequence numbers, a 20-byte header, window/checksum/urgent pointer zero.
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
    unsafe {
        store(tcp, ports.rotate_left(16));
        store(tcp.add(4), rst_seq.to_be());
        store(tcp.add(8), rst_ack.to_be());
        store(
            tcp.add(12),
            u16::from_ne_bytes([(TCP_HEADER_LEN as u8 / 4) << 4, rst_flags]),
        );
        store(tcp.add(14), 0u16);
        store(tcp.add(16), 0u32);
    }

    // IP header: swap the addresses (no checksum changes for that), new length, fresh hop
    // limit. The pseudo-header sum for the TCP checksum comes out of the same reads.
    let l3_len = (ip_header_len + TCP_HEADER_LEN) as u16;
    let pseudo = if pkt.v6 {
        let ip: *mut u8 = ptr_at::<Ipv6Hdr>(ctx, pkt.l3)?.cast();
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        unsafe {
            let (src, dst) = (load_addr(ip.add(IPV6_SRC)), load_addr(ip.add(IPV6_DST)));
            store_addr(ip.add(IPV6_SRC), &dst);
            store_addr(ip.add(IPV6_DST), &src);
            store(
                ip.add(IPV6_PAYLOAD_LEN),
                (l3_len - Ipv6Hdr::LEN as u16).to_be(),
            );
            *ip.add(IPV6_HOP_LIMIT) = RST_TTL;
            words_sum(&src) + words_sum(&dst)
        }
    } else {
        let ip: *mut u8 = ptr_at::<Ipv4Hdr>(ctx, pkt.l3)?.cast();
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        unsafe {
            let (src, dst): (u32, u32) = (load(ip.add(IPV4_SRC)), load(ip.add(IPV4_DST)));
            store(ip.add(IPV4_SRC), dst);
            store(ip.add(IPV4_DST), src);
            let old_len: u16 = load(ip.add(IPV4_TOT_LEN));
            let old_ttl: u16 = load(ip.add(IPV4_TTL));
            let new_ttl = u16::from_ne_bytes([RST_TTL, *ip.add(IPV4_TTL + 1)]);
            let d = Delta::ZERO
                .u16(old_len, l3_len.to_be())
                .u16(old_ttl, new_ttl);
            store(ip.add(IPV4_CHECK), d.apply(load(ip.add(IPV4_CHECK))));
            store(ip.add(IPV4_TOT_LEN), l3_len.to_be());
            store(ip.add(IPV4_TTL), new_ttl);
            u64::from(src) + u64::from(dst)
        }
    };
    // Protocol and TCP length, as the big-endian 16-bit words they are in the pseudo-header.
    let pseudo = pseudo
        + u64::from((u16::from(IPPROTO_TCP)).to_be())
        + u64::from((TCP_HEADER_LEN as u16).to_be());
    let tcp: *mut u8 = ptr_at::<[u8; TCP_HEADER_LEN]>(ctx, pkt.l4)?.cast();
    let mut sum = pseudo;
    for i in 0..TCP_HEADER_LEN / 4 {
        // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
        sum += u64::from(unsafe { load::<u32>(tcp.add(4 * i)) });
    }
    // SAFETY: `ptr_at` checked that these bytes lie inside the packet.
    unsafe { store(tcp.add(16), !fold64(sum)) };
    swap_macs(ctx)?;

    // Cut everything after the TCP header (options, payload, link padding).
    let (start, end) = bounds(ctx);
    let frame_len = end - start;
    let keep = pkt.l4 + TCP_HEADER_LEN;
    if frame_len > keep {
        let shrink = (frame_len - keep) as i32;
        // SAFETY: `ctx.ctx` is the program's context; no packet pointer taken before the call is used after it.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx.cast(), -shrink) } != 0 {
            return None;
        }
    }
    Some(())
}

#[inline(always)]
fn words_sum(a: &Addr) -> u64 {
    let w = a.words();
    u64::from(w[0]) + u64::from(w[1]) + u64::from(w[2]) + u64::from(w[3])
}
