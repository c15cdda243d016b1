//! Small XDP programs the tests, the lab and the benchmarks need beside the data path:
//! - `xdp_pass`: attached to the far end of a veth so frames redirected into the veth are
//!   delivered (a veth peer only takes XDP frames when it runs XDP itself);
//! - `xdp_drop`, `xdp_tx`: the floors benchmarks compare the data path against;
//! - `xdp_count`: XDP_PASS, counting frames and bytes per CPU (receiver-side counts for
//!   benchmarks);
//! - `xdp_sink`: the same counts, then XDP_DROP (a receiver that costs as little as possible);
//! - `bench_wrap`: the per-packet benchmark's wrapper. Every iteration of BPF_PROG_TEST_RUN it
//!   restores the frame from BENCH_FRAME (with `repeat > 1` the kernel reruns the program on the
//!   frame the previous iteration rewrote; a program that moved the frame's start, as Katran's
//!   encapsulation does, gets it moved back), varies its source address / port from a per-CPU
//!   sequence if asked, then tail-calls the program under test in BENCH_TARGET slot 0;
//! - `bench_gen`: the traffic generator for BPF_PROG_RUN live-frames mode: the same frame
//!   preparation, then XDP_TX (the kernel transmits the frame out of the ctx's ingress device);
//! - `tc_deny`: a TC classifier (direct action) that drops IPv4 packets from the sources listed
//!   in TOOLS_DENY and lets the rest go on: the tests' stand-in for a CNI's network policy
//!   program on a pod's host veth;
//! - `bench_fib`, `bench_lookup`, `bench_insert`: single operations of the data path, as
//!   targets of `bench_wrap`, to tell what its cost is made of: a bpf_fib_lookup for the frame's
//!   IPv4 addresses; a lookup and an insert of a 40-byte key (the size of a flow key: the
//!   frame's IPv4 and TCP headers) in an LRU hash map.
//!
//! Nothing here is on the data path, and nothing here may change the data path's maps.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Map keys and values go by reference: by value they would be copied onto the 512-byte stack.
#![allow(clippy::needless_borrows_for_generic_args)]
// aya's #[xdp] and #[classifier] macros want the program function to take its context by value.
#![allow(clippy::needless_pass_by_value)]
// Casts between integer widths are the data path's idiom: packet offsets and lengths (under
// 64 KiB, bounded where the verifier needs it) into helper arguments and header fields, map
// indexes (under max_entries) into u32 keys, bytes unpacked from words. A try_from would add a
// branch the verifier follows on every path, for a case that cannot occur.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "bounded packet offsets and map indexes, see above"
)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{TC_ACT_SHOT, bpf_fib_lookup as FibParams, xdp_action},
        helpers::generated::{bpf_fib_lookup, bpf_xdp_adjust_head},
        macros::{classifier, map, xdp},
        maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
        programs::{TcContext, XdpContext},
    };

    /// [frames, bytes] seen by `xdp_count` and `xdp_sink`.
    #[map]
    static TOOLS_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

    /// Bytes of the benchmark frame (restored on every run; longer frames keep their tail).
    const FRAME_WORDS: usize = 8;

    /// `BenchFrame::vary` bits.
    /// Add the sequence-derived offset to the IPv4 source address.
    const VARY_SOURCE: u32 = 1;
    /// Add the sequence-derived offset to the TCP/UDP source port.
    const VARY_PORT: u32 = 2;

    /// The frame the benchmark programs start every run from, and how to vary it. The layout is
    /// mirrored by `tests/src/bench` (`BenchFrame`), which checks the size: 80 bytes.
    ///
    /// The frame must be Ethernet (untagged) + IPv4 with a 20-byte header + TCP or UDP: the
    /// variation writes at fixed offsets. With sequence number `n`, `k = n % cycle` (or `n` when
    /// `cycle` is 0); then with `sources` S > 0 the source address is `base + k % S` and the
    /// source port `base + k / S`, with S = 0 the address is `base + k` (a new source every
    /// run). Checksums (IPv4 header and TCP/UDP) are updated incrementally, so the kernel's
    /// forwarding path, which checks the IPv4 header, takes the frames.
    #[repr(C)]
    pub struct BenchFrame {
        /// The frame's first 64 bytes, as bytes in memory.
        data: [u64; FRAME_WORDS],
        /// VARY_* bits.
        vary: u32,
        cycle: u32,
        sources: u32,
        /// The frame's length as BPF_PROG_TEST_RUN was given it (0: leave the start alone).
        /// The kernel does not reset the frame's start between iterations: a program under test
        /// that pushed a header in front (bpf_xdp_adjust_head) would leave the next iteration
        /// a longer frame, and after a dozen the headroom is gone.
        len: u32,
    }

    #[map]
    static BENCH_FRAME: Array<BenchFrame> = Array::with_max_entries(1, 0);
    /// Runs so far on this CPU: the sequence number the variation is derived from. User space
    /// sets it before a run and reads it after (runs = iterations, checked by the benchmark).
    #[map]
    static BENCH_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
    /// Slot 0: the program under test (the data path's `lb_uplink`, or `xdp_tx` for the floor).
    #[map]
    static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

    /// IPv4 sources `tc_deny` drops (address as on the wire), with a count of drops.
    #[map]
    static TOOLS_DENY: HashMap<u32, u64> = HashMap::with_max_entries(16, 0);

    #[classifier]
    pub fn tc_deny(ctx: TcContext) -> i32 {
        // TCX_NEXT (classic: TC_ACT_UNSPEC): whatever else is on the hook decides.
        const NEXT: i32 = -1;
        // An untagged IPv4 frame's EtherType and source address.
        if ctx.load::<u16>(12).ok() != Some(0x0800u16.to_be()) {
            return NEXT;
        }
        let Ok(src) = ctx.load::<u32>(26) else {
            return NEXT;
        };
        match TOOLS_DENY.get_ptr_mut(&src) {
            Some(n) => {
                // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
                unsafe { *n += 1 };
                TC_ACT_SHOT
            }
            None => NEXT,
        }
    }

    #[xdp]
    pub fn xdp_pass(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    #[xdp]
    pub fn xdp_drop(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_DROP
    }

    #[xdp]
    pub fn xdp_tx(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_TX
    }

    #[xdp]
    pub fn xdp_count(ctx: XdpContext) -> u32 {
        count(&ctx);
        xdp_action::XDP_PASS
    }

    #[xdp]
    pub fn xdp_sink(ctx: XdpContext) -> u32 {
        count(&ctx);
        xdp_action::XDP_DROP
    }

    #[inline(always)]
    fn count(ctx: &XdpContext) {
        let len = (ctx.data_end() - ctx.data()) as u64;
        if let Some(frames) = TOOLS_COUNT.get_ptr_mut(0) {
            // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
            unsafe { *frames += 1 };
        }
        if let Some(bytes) = TOOLS_COUNT.get_ptr_mut(1) {
            // SAFETY: a successful map lookup's pointer is valid and aligned for the value until the program returns.
            unsafe { *bytes += len };
        }
    }

    #[xdp]
    pub fn bench_wrap(ctx: XdpContext) -> u32 {
        if prepare(&ctx).is_none() {
            return xdp_action::XDP_ABORTED;
        }
        // SAFETY: the program array holds XDP programs (or nothing).
        unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
        // An empty slot: the benchmark sees ABORTED instead of the expected verdict.
        xdp_action::XDP_ABORTED
    }

    #[xdp]
    pub fn bench_gen(ctx: XdpContext) -> u32 {
        match prepare(&ctx) {
            Some(()) => xdp_action::XDP_TX,
            None => xdp_action::XDP_ABORTED,
        }
    }

    /// Keys `bench_lookup` finds (user space inserts them) and `bench_insert` adds: 40 bytes
    /// from the IPv4 header on. Room for one measured run of new keys without eviction.
    #[map]
    static BENCH_FLOWS: LruHashMap<[u64; 5], [u64; 7]> = LruHashMap::with_max_entries(16384, 0);
    /// bpf_fib_lookup parameters (64 bytes: kept off the stack like the data path does).
    #[map]
    static BENCH_FIB: PerCpuArray<FibParams> = PerCpuArray::with_max_entries(1, 0);

    /// A FIB lookup from the frame's IPv4 source to its destination, out of the ingress device:
    /// XDP_TX if the kernel knows the next hop, else XDP_DROP.
    #[xdp]
    pub fn bench_fib(ctx: XdpContext) -> u32 {
        let (start, end) = bounds(&ctx);
        if start + 34 > end {
            return xdp_action::XDP_ABORTED;
        }
        let Some(p) = BENCH_FIB.get_ptr_mut(0) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: per-CPU scratch; 34 bytes of packet checked above.
        let rc = unsafe {
            let p = &mut *p;
            *p = core::mem::zeroed();
            let pkt = start as *const u8;
            p.family = 2;
            p.ifindex = ctx.ingress_ifindex() as u32;
            p.__bindgen_anon_1.tot_len = 64;
            p.__bindgen_anon_3.ipv4_src = pkt.add(IP_SRC).cast::<u32>().read_unaligned();
            p.__bindgen_anon_4.ipv4_dst = pkt.add(IP_SRC + 4).cast::<u32>().read_unaligned();
            bpf_fib_lookup(
                ctx.ctx.cast(),
                p,
                core::mem::size_of::<FibParams>() as i32,
                0,
            )
        };
        if rc == 0 {
            xdp_action::XDP_TX
        } else {
            xdp_action::XDP_DROP
        }
    }

    /// A hash lookup of the frame's 40 bytes from the IP header on: XDP_TX on a hit.
    #[xdp]
    pub fn bench_lookup(ctx: XdpContext) -> u32 {
        let Some(key) = key_of(&ctx) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: the value is only tested for presence.
        match unsafe { BENCH_FLOWS.get(&key) } {
            Some(_) => xdp_action::XDP_TX,
            None => xdp_action::XDP_DROP,
        }
    }

    /// An insert (BPF_ANY) of the frame's 40 bytes from the IP header on: XDP_TX if it worked.
    #[xdp]
    pub fn bench_insert(ctx: XdpContext) -> u32 {
        let Some(key) = key_of(&ctx) else {
            return xdp_action::XDP_ABORTED;
        };
        match BENCH_FLOWS.insert(&key, &[0u64; 7], 0) {
            Ok(()) => xdp_action::XDP_TX,
            Err(_) => xdp_action::XDP_DROP,
        }
    }

    #[inline(always)]
    fn key_of(ctx: &XdpContext) -> Option<[u64; 5]> {
        let (start, end) = bounds(ctx);
        if start + 14 + 40 > end {
            return None;
        }
        let pkt = start as *const u8;
        let mut key = [0u64; 5];
        for (i, k) in key.iter_mut().enumerate() {
            // SAFETY: inside the 54 bytes checked above.
            *k = unsafe { pkt.add(14 + 8 * i).cast::<u64>().read_unaligned() };
        }
        Some(key)
    }

    // Offsets in an untagged IPv4 frame with a 20-byte header.
    const IP_PROTO: usize = 23;
    const IP_CHECK: usize = 24;
    const IP_SRC: usize = 26;
    const L4_SPORT: usize = 34;
    const TCP_CHECK: usize = 34 + 16;
    const UDP_CHECK: usize = 34 + 6;
    const IPPROTO_TCP: u8 = 6;
    const IPPROTO_UDP: u8 = 17;

    /// Restores the frame and applies this run's variation.
    #[inline(always)]
    #[allow(
        clippy::cast_ptr_alignment,
        reason = "every access through the cast pointers is read_unaligned/write_unaligned"
    )]
    fn prepare(ctx: &XdpContext) -> Option<()> {
        let tpl = BENCH_FRAME.get(0)?;
        if tpl.len != 0 {
            let (start, end) = bounds(ctx);
            let grown = (end - start) as i64 - i64::from(tpl.len);
            // SAFETY: `ctx.ctx` is the program's context; a positive delta moves the start
            // back over bytes the previous iteration pushed in front.
            if grown != 0 && unsafe { bpf_xdp_adjust_head(ctx.ctx, grown as i32) } != 0 {
                return None;
            }
        }
        let (start, end) = bounds(ctx);
        if start + FRAME_WORDS * 8 > end {
            return None;
        }
        let p = start as *mut u8;
        // SAFETY: 64 bytes of packet checked above; packet data is at least 2-byte aligned
        // and the verifier allows (the JIT handles) unaligned packet access.
        unsafe {
            for (i, w) in tpl.data.iter().enumerate() {
                p.add(i * 8).cast::<u64>().write_unaligned(*w);
            }
        }
        let seq = BENCH_SEQ.get_ptr_mut(0)?;
        // SAFETY: per-CPU slot; XDP runs once at a time per CPU.
        let n = unsafe {
            let n = *seq;
            *seq = n + 1;
            n
        };
        if tpl.vary == 0 {
            return Some(());
        }
        let k = if tpl.cycle != 0 {
            n % u64::from(tpl.cycle)
        } else {
            n
        };
        let (addr_off, port_off) = if tpl.sources != 0 {
            let s = u64::from(tpl.sources);
            (k % s, k / s)
        } else {
            (k, 0)
        };
        // SAFETY: every offset below is inside the 64 bytes checked above.
        unsafe {
            let old_src: u32 = p.add(IP_SRC).cast::<u32>().read_unaligned();
            let old_sport: u16 = p.add(L4_SPORT).cast::<u16>().read_unaligned();
            let new_src = if tpl.vary & VARY_SOURCE != 0 {
                u32::from_be(old_src).wrapping_add(addr_off as u32).to_be()
            } else {
                old_src
            };
            let new_sport = if tpl.vary & VARY_PORT != 0 {
                u16::from_be(old_sport)
                    .wrapping_add(port_off as u16)
                    .to_be()
            } else {
                old_sport
            };
            p.add(IP_SRC).cast::<u32>().write_unaligned(new_src);
            p.add(L4_SPORT).cast::<u16>().write_unaligned(new_sport);
            // RFC 1624: HC' = ~(~HC + ~m + m'), over 16-bit words as they lie in memory.
            let addr_sum = sum32(old_src, new_src);
            let ip_check = p.add(IP_CHECK).cast::<u16>();
            ip_check.write_unaligned(apply(ip_check.read_unaligned(), addr_sum));
            let l4_sum = addr_sum + u32::from(!old_sport) + u32::from(new_sport);
            let proto = *p.add(IP_PROTO);
            if proto == IPPROTO_TCP {
                let c = p.add(TCP_CHECK).cast::<u16>();
                c.write_unaligned(apply(c.read_unaligned(), l4_sum));
            } else if proto == IPPROTO_UDP {
                let c = p.add(UDP_CHECK).cast::<u16>();
                let old = c.read_unaligned();
                // IPv4 UDP without a checksum stays without one.
                if old != 0 {
                    let new = apply(old, l4_sum);
                    c.write_unaligned(if new == 0 { 0xffff } else { new });
                }
            }
        }
        Some(())
    }

    /// ~m + m' for a 32-bit field, as a sum of 16-bit words (not folded).
    #[inline(always)]
    fn sum32(old: u32, new: u32) -> u32 {
        u32::from(!(old as u16))
            + u32::from(!((old >> 16) as u16))
            + u32::from(new as u16)
            + u32::from((new >> 16) as u16)
    }

    #[inline(always)]
    fn apply(check: u16, delta: u32) -> u16 {
        let mut s = u32::from(!check) + delta;
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        !(s as u16)
    }

    /// The frame's start and end. Volatile: keeps the context reads where the verifier expects
    /// packet pointers (see lb-ebpf's parse.rs).
    #[inline(always)]
    fn bounds(ctx: &XdpContext) -> (usize, usize) {
        // SAFETY: `ctx.ctx` is the program's context pointer.
        unsafe {
            (
                core::ptr::read_volatile(&raw const (*ctx.ctx).data) as usize,
                core::ptr::read_volatile(&raw const (*ctx.ctx).data_end) as usize,
            )
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
