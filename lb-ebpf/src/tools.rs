//! Small XDP programs the tests, the lab and the benchmarks need beside the data path:
//! - `xdp_pass`: attached to the far end of a veth so frames redirected into the veth are
//!   delivered (a veth peer only takes XDP frames when it runs XDP itself);
//! - `xdp_drop`, `xdp_tx`: the floors benchmarks compare the data path against;
//! - `xdp_count`: XDP_PASS, counting frames and bytes per CPU (receiver-side counts for
//!   benchmarks).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::xdp_action,
        macros::{map, xdp},
        maps::PerCpuArray,
        programs::XdpContext,
    };

    /// [frames, bytes] seen by `xdp_count`.
    #[map]
    static TOOLS_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

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
        let len = (ctx.data_end() - ctx.data()) as u64;
        if let Some(frames) = TOOLS_COUNT.get_ptr_mut(0) {
            unsafe { *frames += 1 };
        }
        if let Some(bytes) = TOOLS_COUNT.get_ptr_mut(1) {
            unsafe { *bytes += len };
        }
        xdp_action::XDP_PASS
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
