//! The neighbour entries XDP needs: `bpf_fib_lookup` only finds a next hop's MAC if the kernel
//! has resolved it, so the agent keeps a "managed" entry (NTF_EXT_MANAGED: the kernel resolves
//! it and keeps it resolved) for each next hop of a backend.
//!
//! Kept from the kernel's view, not the agent's memory: every sync starts from a dump of the
//! kernel's table, and a notification that an entry went (a flush, carrier loss, an interface
//! going down) makes it again at once. An entry the agent did not make (a static one for a
//! gateway, one the kernel learned, a CNI's) is never replaced: if it goes, a managed one takes
//! its place.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use crate::{
    model::Desired,
    netlink::{Change, Neighbour, Netlink, NetlinkError, Route, RouteKind},
    node::backend_addrs,
};

/// What [`Neighbours`] needs from the kernel: netlink, or a stand-in in tests.
pub trait Kernel {
    fn route(&mut self, dst: IpAddr) -> Result<Option<Route>, NetlinkError>;
    fn neighbours(&mut self) -> Result<Vec<Neighbour>, NetlinkError>;
    /// Makes a managed entry where none exists; false if one existed (left as it is).
    fn add_managed(&mut self, ifindex: u32, addr: IpAddr) -> Result<bool, NetlinkError>;
    /// Removes an entry if it is managed.
    fn remove_managed(&mut self, ifindex: u32, addr: IpAddr) -> Result<(), NetlinkError>;
}

impl Kernel for Netlink {
    fn route(&mut self, dst: IpAddr) -> Result<Option<Route>, NetlinkError> {
        Netlink::route(self, dst)
    }
    fn neighbours(&mut self) -> Result<Vec<Neighbour>, NetlinkError> {
        Netlink::neighbours(self)
    }
    fn add_managed(&mut self, ifindex: u32, addr: IpAddr) -> Result<bool, NetlinkError> {
        self.add_managed_neighbour(ifindex, addr)
    }
    fn remove_managed(&mut self, ifindex: u32, addr: IpAddr) -> Result<(), NetlinkError> {
        self.remove_neighbour(ifindex, addr)
    }
}

/// A next hop: (ifindex, address).
type Hop = (u32, IpAddr);

/// NUD_VALID (linux/neighbour.h): the states `bpf_fib_lookup` takes a MAC from (REACHABLE,
/// STALE, DELAY, PROBE, NOARP, PERMANENT).
pub const NUD_VALID: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;

#[derive(Default)]
pub struct Neighbours {
    /// The backends' next hops, as last looked up.
    wanted: BTreeSet<Hop>,
    /// How many backend addresses each wanted next hop serves: an address that comes or goes
    /// changes only its own hop's count.
    uses: HashMap<Hop, usize>,
    /// Entries this agent made, or adopted (managed entries for its next hops, left by a
    /// previous agent): the ones it removes when no longer wanted.
    ours: BTreeSet<Hop>,
}

impl Neighbours {
    /// Looks up the next hop of every backend of `desired` (a route lookup each) and syncs.
    /// Returns problems (a backend without a route, an entry that could not be made) for the
    /// log; they do not stop anything else.
    pub fn follow(&mut self, k: &mut dyn Kernel, desired: &Desired) -> Vec<String> {
        let mut problems = Vec::new();
        let mut uses = HashMap::new();
        for addr in backend_addrs(desired) {
            if let Some(hop) = hop(k, addr, &mut problems) {
                *uses.entry(hop).or_insert(0) += 1;
            }
        }
        self.wanted = uses.keys().copied().collect();
        self.uses = uses;
        problems.extend(self.sync(k));
        problems
    }

    /// Follows backend addresses that came (the first backend at them) and went (the last
    /// one): a route lookup each, and an entry made or removed only where a next hop comes
    /// or goes. Without a dump of the table: an entry of someone else's at a new next hop is
    /// left as it is (the kernel refuses to make ours there), and ours that lost its
    /// resolution is made again at the next full [`Neighbours::follow`] or when it goes.
    pub fn follow_changed(
        &mut self,
        k: &mut dyn Kernel,
        came: &[IpAddr],
        went: &[IpAddr],
    ) -> Vec<String> {
        let mut problems = Vec::new();
        for addr in went {
            // Its route as now (a route that changed meanwhile brings a full follow, which
            // counts again).
            let Some(hop) = hop(k, *addr, &mut problems) else {
                continue;
            };
            let Some(n) = self.uses.get_mut(&hop) else {
                continue;
            };
            *n -= 1;
            if *n > 0 {
                continue;
            }
            self.uses.remove(&hop);
            self.wanted.remove(&hop);
            if self.ours.remove(&hop)
                && let Err(e) = k.remove_managed(hop.0, hop.1)
            {
                problems.push(format!("neighbour {} on ifindex {}: {e}", hop.1, hop.0));
            }
        }
        for addr in came {
            let Some(hop) = hop(k, *addr, &mut problems) else {
                continue;
            };
            let n = self.uses.entry(hop).or_insert(0);
            *n += 1;
            if *n == 1 && self.wanted.insert(hop) {
                problems.extend(self.add(k, hop));
            }
        }
        problems
    }

    /// Makes the kernel's table hold an entry for every wanted next hop, from a dump of it: a
    /// missing one is made (managed), a managed one is (or becomes) ours, anyone else's is left
    /// as it is. One of ours that is not resolved is made again, which has the kernel ask at
    /// once rather than at its next retransmission (up to a second later: after a carrier
    /// came back, say). Ours that are no longer wanted are removed.
    pub fn sync(&mut self, k: &mut dyn Kernel) -> Vec<String> {
        let present = match k.neighbours() {
            Ok(all) => all,
            Err(e) => return vec![format!("reading the neighbour table: {e}")],
        };
        let mut problems = Vec::new();
        for hop in self.wanted.clone() {
            match present.iter().find(|n| (n.ifindex, n.addr) == hop) {
                Some(n) if n.managed && n.state & NUD_VALID == 0 => {
                    if let Err(e) = k.remove_managed(hop.0, hop.1) {
                        problems.push(format!("neighbour {} on ifindex {}: {e}", hop.1, hop.0));
                    }
                    problems.extend(self.add(k, hop));
                }
                Some(n) if n.managed => {
                    self.ours.insert(hop);
                }
                Some(_) => {
                    self.ours.remove(&hop);
                }
                None => problems.extend(self.add(k, hop)),
            }
        }
        let stale: Vec<Hop> = self.ours.difference(&self.wanted).copied().collect();
        for hop in stale {
            if let Err(e) = k.remove_managed(hop.0, hop.1) {
                problems.push(format!("neighbour {} on ifindex {}: {e}", hop.1, hop.0));
            }
            self.ours.remove(&hop);
        }
        problems
    }

    /// Follows a notification: an entry for a wanted next hop that went is made again at once;
    /// an entry of ours that someone replaced with one of their own is theirs from now on.
    pub fn on_change(&mut self, k: &mut dyn Kernel, change: &Change) -> Vec<String> {
        match change {
            Change::NeighbourGone { ifindex, addr } => {
                let hop = (*ifindex, *addr);
                self.ours.remove(&hop);
                if self.wanted.contains(&hop) {
                    return self.add(k, hop);
                }
            }
            Change::Neighbour(n) if !n.managed => {
                self.ours.remove(&(n.ifindex, n.addr));
            }
            Change::Overrun => return self.sync(k),
            _ => {}
        }
        Vec::new()
    }

    fn add(&mut self, k: &mut dyn Kernel, hop: Hop) -> Vec<String> {
        match k.add_managed(hop.0, hop.1) {
            Ok(true) => {
                self.ours.insert(hop);
                Vec::new()
            }
            // Someone made one in between: theirs.
            Ok(false) => Vec::new(),
            Err(e) => vec![format!("neighbour {} on ifindex {}: {e}", hop.1, hop.0)],
        }
    }

    /// Gives up the entries of ours (for removal at shutdown).
    pub fn drain(&mut self) -> Vec<Hop> {
        self.wanted.clear();
        self.uses.clear();
        std::mem::take(&mut self.ours).into_iter().collect()
    }
}

/// The next hop of a backend address that needs a neighbour entry (none for a local route, as
/// for the host network); a missing route or a failed lookup is a problem.
fn hop(k: &mut dyn Kernel, addr: IpAddr, problems: &mut Vec<String>) -> Option<Hop> {
    match k.route(addr) {
        Ok(Some(r)) if r.kind == RouteKind::Unicast => Some((r.oif, r.gateway.unwrap_or(addr))),
        Ok(Some(_)) => None,
        Ok(None) => {
            problems.push(format!("backend {addr}: no route"));
            None
        }
        Err(e) => {
            problems.push(format!("backend {addr}: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{Backend, Frontend, Mode, Protocol, Service};

    /// NUD_PERMANENT, NUD_REACHABLE, NUD_FAILED.
    const PERMANENT: u16 = 0x80;
    const REACHABLE: u16 = 0x02;
    const FAILED: u16 = 0x20;

    /// Routes and a neighbour table.
    #[derive(Default)]
    struct FakeKernel {
        routes: BTreeMap<IpAddr, Route>,
        table: Vec<Neighbour>,
        added: Vec<Hop>,
    }

    impl Kernel for FakeKernel {
        fn route(&mut self, dst: IpAddr) -> Result<Option<Route>, NetlinkError> {
            Ok(self.routes.get(&dst).cloned())
        }
        fn neighbours(&mut self) -> Result<Vec<Neighbour>, NetlinkError> {
            Ok(self.table.clone())
        }
        fn add_managed(&mut self, ifindex: u32, addr: IpAddr) -> Result<bool, NetlinkError> {
            if self
                .table
                .iter()
                .any(|n| (n.ifindex, n.addr) == (ifindex, addr))
            {
                return Ok(false);
            }
            // Resolved at once, as on a link where the neighbour answers.
            self.table.push(Neighbour {
                ifindex,
                addr,
                managed: true,
                state: REACHABLE,
            });
            self.added.push((ifindex, addr));
            Ok(true)
        }
        fn remove_managed(&mut self, ifindex: u32, addr: IpAddr) -> Result<(), NetlinkError> {
            self.table
                .retain(|n| !(n.managed && (n.ifindex, n.addr) == (ifindex, addr)));
            Ok(())
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn via(gateway: Option<&str>) -> Route {
        Route {
            oif: 2,
            gateway: gateway.map(ip),
            prefsrc: None,
            kind: RouteKind::Unicast,
        }
    }

    /// Backends 10.1.2.2 (behind gateway 10.0.0.254) and 10.0.0.7 (on link).
    fn setup() -> (FakeKernel, Desired) {
        let mut k = FakeKernel::default();
        k.routes.insert(ip("10.1.2.2"), via(Some("10.0.0.254")));
        k.routes.insert(ip("10.0.0.7"), via(None));
        let backends = ["10.1.2.2", "10.0.0.7"]
            .map(|a| Backend {
                addr: ip(a),
                port: 80,
                weight: 1,
            })
            .to_vec();
        let frontend = Frontend {
            vip: ip("10.96.0.1"),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let service = Service {
            name: "web".into(),
            origin: "test".into(),
            frontend,
            mode: Mode::Snat,
            backends,
            policy: None,
            affinity: None,
            source_ranges: crate::model::SourceRanges::default(),
        };
        let desired = Desired {
            services: [(frontend, service.into())].into(),
            ..Desired::default()
        };
        (k, desired)
    }

    fn managed_hops(k: &FakeKernel) -> BTreeSet<Hop> {
        k.table
            .iter()
            .filter(|n| n.managed)
            .map(|n| (n.ifindex, n.addr))
            .collect()
    }

    #[test]
    fn every_next_hop_gets_a_managed_entry() {
        let (mut k, desired) = setup();
        let mut n = Neighbours::default();
        assert!(n.follow(&mut k, &desired).is_empty());
        assert_eq!(
            managed_hops(&k),
            [(2, ip("10.0.0.254")), (2, ip("10.0.0.7"))].into()
        );
        // Nothing to do the second time.
        k.added.clear();
        assert!(n.follow(&mut k, &desired).is_empty());
        assert!(k.added.is_empty());
    }

    #[test]
    fn addresses_that_come_and_go_change_only_their_next_hops() {
        let (mut k, mut desired) = setup();
        k.routes.insert(ip("10.1.2.3"), via(Some("10.0.0.254")));
        k.routes.insert(ip("10.0.0.8"), via(None));
        let mut n = Neighbours::default();
        n.follow(&mut k, &desired);
        let service = std::sync::Arc::make_mut(desired.services.values_mut().next().unwrap());
        // A second backend behind the gateway, one more on the link.
        for a in ["10.1.2.3", "10.0.0.8"] {
            service.backends.push(Backend {
                addr: ip(a),
                port: 80,
                weight: 1,
            });
        }
        k.added.clear();
        let came = [ip("10.1.2.3"), ip("10.0.0.8")];
        assert!(n.follow_changed(&mut k, &came, &[]).is_empty());
        assert_eq!(
            k.added,
            [(2, ip("10.0.0.8"))],
            "only the new next hop is made"
        );
        // The first gateway backend and the first on-link one go: the gateway still serves one.
        service
            .backends
            .retain(|b| ![ip("10.1.2.2"), ip("10.0.0.7")].contains(&b.addr));
        let went = [ip("10.1.2.2"), ip("10.0.0.7")];
        assert!(n.follow_changed(&mut k, &[], &went).is_empty());
        assert_eq!(
            managed_hops(&k),
            [(2, ip("10.0.0.254")), (2, ip("10.0.0.8"))].into()
        );
        // As a full follow has it.
        let mut fresh = FakeKernel {
            routes: k.routes.clone(),
            ..FakeKernel::default()
        };
        Neighbours::default().follow(&mut fresh, &desired);
        assert_eq!(managed_hops(&fresh), managed_hops(&k));
        // The last ones go: nothing of ours is left.
        let went = [ip("10.1.2.3"), ip("10.0.0.8")];
        assert!(n.follow_changed(&mut k, &[], &went).is_empty());
        assert!(managed_hops(&k).is_empty());
        assert!(n.drain().is_empty());
    }

    #[test]
    fn an_entry_that_goes_is_made_again_from_the_notification() {
        let (mut k, desired) = setup();
        let mut n = Neighbours::default();
        n.follow(&mut k, &desired);
        // `ip neigh flush`, carrier loss: the kernel deletes them and says so.
        k.table.clear();
        for hop in [(2, ip("10.0.0.254")), (2, ip("10.0.0.7"))] {
            let gone = Change::NeighbourGone {
                ifindex: hop.0,
                addr: hop.1,
            };
            assert!(n.on_change(&mut k, &gone).is_empty());
        }
        assert_eq!(managed_hops(&k).len(), 2, "both back: {:?}", k.table);
        // Overrun (notifications lost): a sync from the kernel's table puts back what is missing.
        k.table.clear();
        n.on_change(&mut k, &Change::Overrun);
        assert_eq!(managed_hops(&k).len(), 2);
    }

    #[test]
    fn an_entry_someone_else_made_is_never_replaced_nor_removed() {
        let (mut k, desired) = setup();
        // A permanent entry for the gateway, made by the administrator.
        k.table.push(Neighbour {
            ifindex: 2,
            addr: ip("10.0.0.254"),
            managed: false,
            state: PERMANENT,
        });
        let mut n = Neighbours::default();
        n.follow(&mut k, &desired);
        let gw = k.table.iter().find(|e| e.addr == ip("10.0.0.254")).unwrap();
        assert_eq!((gw.managed, gw.state), (false, PERMANENT), "left as it was");
        // The backends go: ours is removed, theirs stays.
        let mut none = desired.clone();
        none.services.clear();
        n.follow(&mut k, &none);
        assert_eq!(k.table.len(), 1);
        assert_eq!(k.table[0].addr, ip("10.0.0.254"));
        // Ours replaced by someone's static entry: theirs from then on, kept at shutdown.
        let (mut k, desired) = setup();
        let mut n = Neighbours::default();
        n.follow(&mut k, &desired);
        let theirs = Neighbour {
            ifindex: 2,
            addr: ip("10.0.0.7"),
            managed: false,
            state: PERMANENT,
        };
        n.on_change(&mut k, &Change::Neighbour(theirs));
        assert_eq!(n.drain(), [(2, ip("10.0.0.254"))]);
    }

    #[test]
    fn a_managed_entry_left_by_a_previous_agent_is_adopted() {
        let (mut k, desired) = setup();
        k.table.push(Neighbour {
            ifindex: 2,
            addr: ip("10.0.0.7"),
            managed: true,
            state: REACHABLE,
        });
        let mut n = Neighbours::default();
        n.follow(&mut k, &desired);
        assert_eq!(k.added, [(2, ip("10.0.0.254"))]);
        assert_eq!(n.drain().len(), 2, "both are ours to remove at shutdown");
    }

    #[test]
    fn an_unresolved_entry_of_ours_is_made_again_so_the_kernel_asks_at_once() {
        let (mut k, desired) = setup();
        let mut n = Neighbours::default();
        n.follow(&mut k, &desired);
        // The carrier was gone: the kernel's probes failed.
        for e in &mut k.table {
            e.state = FAILED;
        }
        k.added.clear();
        n.follow(&mut k, &desired);
        assert_eq!(k.added.len(), 2, "both asked again");
        assert!(k.table.iter().all(|e| e.state == REACHABLE));
    }
}
