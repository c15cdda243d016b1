//! Types and pure logic shared by the XDP program (`lb-ebpf`, no_std on the BPF target) and the
//! agent (`lb-userspace`, with the `user` feature). Everything here is plain data or a pure,
//! non-panicking function, so the verifier accepts it and host tests can exercise it.
#![no_std]
#![allow(
    clippy::pub_underscore_fields,
    reason = "the padding of #[repr(C)] map values is public so both sides can build them with struct literals"
)]

pub mod addr;
pub mod affinity;
pub mod bucket;
pub mod checksum;
pub mod filter;
pub mod hash;
pub mod logging;
pub mod maps;
pub mod net;
pub mod stats;

pub use addr::Addr;
pub use maps::*;
pub use stats::*;
