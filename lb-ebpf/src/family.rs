//! IPv4 and IPv6 flows live in tables of their own (an IPv4 flow key is 16 bytes, an IPv6 one
//! 40), and so do their snat reply entries (claims). The flow code is written once, generic
//! over [`Family`], and compiled for each.
use aya_ebpf::maps::{Array, LruHashMap};
use lb_common::{Addr, Claim, Config, Flow, FlowAddr, FlowKey, MAX_SNAT_ADDRS, V4};

use crate::{
    maps::{LB_CLAIMS4, LB_CLAIMS6, LB_FLOWS4, LB_FLOWS6},
    parse::{Packet, Ports},
};

pub trait Family {
    /// How this family's flow table holds an address.
    type A: FlowAddr + 'static;

    fn flows() -> &'static LruHashMap<FlowKey<Self::A>, Flow<Self::A>>;

    /// The reply entries of snat flows, and how many slots the agent gave them.
    fn claims() -> &'static Array<Claim<Self::A>>;
    fn claim_slots(cfg: &Config) -> u32;

    /// The node's snat source addresses for this family: the list and how many are set.
    fn snat(cfg: &Config) -> (&[Addr; MAX_SNAT_ADDRS], u32);
}

pub struct Ipv4;
pub struct Ipv6;

impl Family for Ipv4 {
    type A = V4;

    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKey<V4>, Flow<V4>> {
        &LB_FLOWS4
    }

    #[inline(always)]
    fn claims() -> &'static Array<Claim<V4>> {
        &LB_CLAIMS4
    }

    #[inline(always)]
    fn claim_slots(cfg: &Config) -> u32 {
        cfg.claims_v4
    }

    #[inline(always)]
    fn snat(cfg: &Config) -> (&[Addr; MAX_SNAT_ADDRS], u32) {
        (&cfg.snat_v4, cfg.snat_v4_count)
    }
}

impl Family for Ipv6 {
    type A = Addr;

    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKey<Addr>, Flow<Addr>> {
        &LB_FLOWS6
    }

    #[inline(always)]
    fn claims() -> &'static Array<Claim<Addr>> {
        &LB_CLAIMS6
    }

    #[inline(always)]
    fn claim_slots(cfg: &Config) -> u32 {
        cfg.claims_v6
    }

    #[inline(always)]
    fn snat(cfg: &Config) -> (&[Addr; MAX_SNAT_ADDRS], u32) {
        (&cfg.snat_v6, cfg.snat_v6_count)
    }
}

/// The flow key of a packet, as the sender sends it.
#[inline(always)]
pub fn key_of<F: Family>(pkt: &Packet, ports: &Ports) -> FlowKey<F::A> {
    FlowKey::new(
        F::A::from_addr(&pkt.src),
        F::A::from_addr(&pkt.dst),
        ports.sport,
        ports.dport,
        pkt.proto,
    )
}
