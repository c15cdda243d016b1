//! A service's source ranges (Kubernetes' `loadBalancerSourceRanges`, or a config file's
//! `source-ranges`): only sources inside them may open flows to it, or, as a deny list, none
//! inside them may. Kept as LB_PREFIXES entries under an id of their own, like a policy's
//! prefixes; checked when a flow is opened (as kube-proxy's firewall chain does).
use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{Addr, PrefixKey, SVC_RANGES_DENY, Service};

use crate::maps::LB_PREFIXES;

#[inline(always)]
pub fn allowed(svc: &Service, src: &Addr) -> bool {
    if svc.source_ranges == 0 {
        return true;
    }
    let key = Key::new(
        (32 + 128) as u32,
        PrefixKey {
            policy: svc.source_ranges.to_be_bytes(),
            addr: *src,
        },
    );
    let listed = LB_PREFIXES.get(&key).is_some();
    listed != (svc.flags & SVC_RANGES_DENY != 0)
}
