//! Which interfaces are the node's uplinks when `--iface` names none: those of its default
//! routes (main table, IPv4 and IPv6), as Cilium's device detection and kube-proxy's node-IP
//! choice find the node's network. On EKS that is the primary ENI whatever the AMI names it
//! (`eth0` on Bottlerocket, `ens5` on AL2023); the VPC CNI's per-ENI default routes live in
//! tables of their own and are not uplinks. Detected once, at start.
use crate::netlink::{DefaultRoute, Link, Netlink, NetlinkError};

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error(
        "no --iface given and the node has no default route to find its uplink by; name the interfaces clients' traffic arrives on with --iface"
    )]
    NoDefaultRoute,
    #[error("finding the uplinks from the default routes: {0}")]
    Netlink(#[from] NetlinkError),
}

/// The interfaces of the node's default routes, read from the kernel.
pub fn detect(nl: &mut Netlink) -> Result<Vec<String>, UplinkError> {
    let routes = nl.default_routes()?;
    let links = nl.links()?;
    from_default_routes(&routes, &links)
}

/// The names of the interfaces `routes` go out of: IPv4 routes first, each family by metric
/// (the kernel's preferred route first), every interface once, the loopback never (a default
/// route "dev lo" is a blackhole in disguise).
pub fn from_default_routes(
    routes: &[DefaultRoute],
    links: &[Link],
) -> Result<Vec<String>, UplinkError> {
    let mut ordered: Vec<&DefaultRoute> = routes.iter().collect();
    ordered.sort_by_key(|r| (r.v6, r.metric));
    let mut names: Vec<String> = Vec::new();
    for oif in ordered.iter().flat_map(|r| r.oifs.iter()) {
        let Some(link) = links.iter().find(|l| l.ifindex == *oif) else {
            continue;
        };
        if link.name != "lo" && !names.contains(&link.name) {
            names.push(link.name.clone());
        }
    }
    if names.is_empty() {
        return Err(UplinkError::NoDefaultRoute);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(ifindex: u32, name: &str) -> Link {
        Link {
            ifindex,
            name: name.to_string(),
            kind: None,
            mtu: 9001,
            up: true,
            mac: None,
            vlan: None,
            peer: None,
            xdp: None,
        }
    }

    fn route(v6: bool, oifs: &[u32], metric: u32) -> DefaultRoute {
        DefaultRoute {
            v6,
            oifs: oifs.to_vec(),
            metric,
        }
    }

    #[test]
    fn the_interface_of_the_default_route_is_the_uplink() {
        let links = [link(1, "lo"), link(2, "ens5"), link(7, "eni1a2b3c4d5e6")];
        assert_eq!(
            from_default_routes(&[route(false, &[2], 0)], &links).unwrap(),
            ["ens5"]
        );
        // The same interface for both families: once.
        assert_eq!(
            from_default_routes(&[route(true, &[2], 1024), route(false, &[2], 0)], &links).unwrap(),
            ["ens5"]
        );
    }

    #[test]
    fn several_default_routes_give_several_uplinks_in_preference_order() {
        let links = [link(2, "ens5"), link(3, "ens6"), link(4, "wg0")];
        let routes = [
            route(true, &[4], 100),
            route(false, &[3], 200),
            route(false, &[2], 100),
        ];
        assert_eq!(
            from_default_routes(&routes, &links).unwrap(),
            ["ens5", "ens6", "wg0"]
        );
        // A multipath route's next hops.
        assert_eq!(
            from_default_routes(&[route(false, &[3, 2], 0)], &links).unwrap(),
            ["ens6", "ens5"]
        );
    }

    #[test]
    fn no_usable_default_route_is_an_error_that_names_the_flag() {
        let links = [link(1, "lo"), link(2, "ens5")];
        for routes in [
            vec![],
            vec![route(false, &[1], 0)],
            vec![route(false, &[9], 0)],
        ] {
            let e = from_default_routes(&routes, &links).unwrap_err();
            assert!(e.to_string().contains("--iface"), "{e}");
        }
    }
}
