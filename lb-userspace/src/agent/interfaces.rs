//! Following the node's interfaces: the uplinks and backend interfaces get their program
//! (attached, or taken over from a previous agent), interfaces that went are detached, and the
//! redirect targets (devmap) and VLAN table are made to list exactly the current interfaces.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use lb_common::{Iface, LinkMac, MAC_SLOTS, PROG_BACKEND, PROG_UPLINK};
use log::{info, warn};

use super::Agent;
use crate::{
    netlink::Link,
    nic::Nic,
    tables::Tables,
    veth::{self, PodEnd},
};

impl Agent {
    /// Attaches to every uplink and backend interface, detaches from ones that went, and
    /// points the redirect targets and the VLAN table at the current interfaces.
    pub(super) fn sync_interfaces(&mut self) -> Result<()> {
        let mut wanted = Vec::new();
        for link in self.interfaces.uplinks.clone() {
            wanted.push(self.attach_uplink(&link)?);
        }
        for link in self.interfaces.backends.clone() {
            wanted.push(self.attach_backend(&link)?);
        }
        for iface in self.attachments.pinned_interfaces() {
            if !wanted.contains(&iface) {
                info!("detaching from {iface}: no longer an uplink or backend interface");
                self.attachments.detach(&iface);
            }
        }
        // Redirect targets: the uplinks, and backend interfaces that take redirected frames.
        let mut targets: BTreeSet<u32> =
            self.interfaces.uplinks.iter().map(|l| l.ifindex).collect();
        for link in self.interfaces.backends.clone() {
            if self.redirectable(&link) {
                targets.insert(link.ifindex);
            }
        }
        write_interface_tables(&mut self.maps, &targets, &self.interfaces.vlans)?;
        self.mac_slots =
            write_link_macs(&mut self.maps, &self.interfaces.uplinks, &self.mac_slots)?;
        Ok(())
    }

    /// `lb_uplink` at XDP, after saying what the NIC allows; returns the interface's name.
    fn attach_uplink(&mut self, link: &Link) -> Result<String> {
        let nic = Nic::inspect(&link.name, link.mtu);
        let obstacles = nic.native_xdp_obstacles();
        let a = self.attachments.attach(
            &mut self.loaded.ebpf,
            PROG_UPLINK,
            &link.name,
            self.args.xdp_mode,
            link.xdp,
            &obstacles,
        )?;
        info!(
            "{PROG_UPLINK} on {} (ifindex {}; {}): XDP {} mode{}",
            a.iface,
            a.ifindex,
            nic.describe(),
            a.mode,
            note_suffix(a.note.as_deref())
        );
        Ok(a.iface.clone())
    }

    /// `lb_backend` at TC ingress; returns the interface's name.
    fn attach_backend(&mut self, link: &Link) -> Result<String> {
        let a = self.attachments.attach_tc(
            &mut self.loaded.ebpf,
            PROG_BACKEND,
            &link.name,
            self.args.tc_mode,
        )?;
        info!(
            "{PROG_BACKEND} on {} (ifindex {}): {} mode{}",
            a.iface,
            a.ifindex,
            a.mode,
            note_suffix(a.note.as_deref())
        );
        Ok(a.iface.clone())
    }

    /// Whether the data path may redirect into `link`: yes for most devices; for a veth once its
    /// pod end takes redirected frames (see `veth`). Decided once per interface.
    fn redirectable(&mut self, link: &Link) -> bool {
        if link.kind.as_deref() != Some("veth") {
            return true;
        }
        let key = (link.ifindex, link.name.clone());
        if let Some(ok) = self.pod_ends.get(&key) {
            return *ok;
        }
        let ok = match veth::prepare(&mut self.netlink, link) {
            Ok(PodEnd::Ready) => true,
            Ok(PodEnd::Enabled) => {
                info!(
                    "{}: turned GRO on at its pod end, so frames redirected into it are delivered",
                    link.name
                );
                true
            }
            Err(why) => {
                warn!(
                    "{}: not redirecting into it ({why}); its backends' packets go through the kernel",
                    link.name
                );
                false
            }
        };
        self.pod_ends.insert(key, ok);
        // Forget interfaces that went.
        let live: BTreeSet<u32> = self.interfaces.backends.iter().map(|l| l.ifindex).collect();
        self.pod_ends.retain(|(i, _), _| live.contains(i));
        ok
    }
}

/// Makes the redirect targets exactly `targets` and the VLAN table exactly `vlans` ((ifindex,
/// parent ifindex, VLAN id)), writing only what differs. New entries go in before stale ones go,
/// so a packet never finds neither.
pub(crate) fn write_interface_tables(
    t: &mut dyn Tables,
    targets: &BTreeSet<u32>,
    vlans: &[(u32, u32, u16)],
) -> crate::tables::Result<()> {
    let present = t.redirects()?;
    for i in targets.difference(&present) {
        t.set_redirect(*i)?;
    }
    for i in present.difference(targets) {
        t.remove_redirect(*i)?;
    }
    let known = t.vlans()?;
    for (ifindex, parent, id) in vlans {
        let vlan = Iface {
            parent: *parent,
            vlan_id: *id,
            _pad: 0,
        };
        if known.get(ifindex) != Some(&vlan) {
            t.set_vlan(*ifindex, &vlan)?;
        }
    }
    for i in known.keys() {
        if !vlans.iter().any(|v| v.0 == *i) {
            t.remove_vlan(*i)?;
        }
    }
    Ok(())
}

/// Tells the data path each uplink's MAC (it balances only frames sent to it) and forgets the
/// slots `written` before that no uplink has now; returns the slots now written. An uplink
/// whose ifindex shares a slot with another's is left out (its frames go to the kernel,
/// unbalanced), and said so.
pub(crate) fn write_link_macs(
    t: &mut dyn Tables,
    uplinks: &[Link],
    written: &BTreeSet<u32>,
) -> crate::tables::Result<BTreeSet<u32>> {
    let mut wanted: BTreeMap<u32, LinkMac> = BTreeMap::new();
    for l in uplinks {
        let Some(mac) = l.mac else { continue };
        let slot = l.ifindex % MAC_SLOTS;
        if let Some(other) = wanted.get(&slot) {
            warn!(
                "{}: its ifindex {} shares a MAC slot with ifindex {}: its frames go to the kernel, unbalanced",
                l.name, l.ifindex, other.ifindex
            );
            continue;
        }
        wanted.insert(slot, LinkMac::new(l.ifindex, mac));
    }
    for (slot, mac) in &wanted {
        t.set_link_mac(*slot, mac)?;
    }
    for slot in written {
        if !wanted.contains_key(slot) {
            t.set_link_mac(*slot, &LinkMac::default())?;
        }
    }
    Ok(wanted.into_keys().collect())
}

/// ": why", for an attachment whose mode needs a word of explanation.
fn note_suffix(note: Option<&str>) -> String {
    note.map(|n| format!(": {n}")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::{MemoryTables, Write};

    #[test]
    fn interface_tables_follow_the_interfaces_with_the_fewest_writes() {
        let mut t = MemoryTables::default();
        write_interface_tables(&mut t, &[2, 5].into(), &[(7, 2, 100)]).unwrap();
        assert_eq!(t.redirects, [2, 5].into());
        assert_eq!(t.vlans[&7].vlan_id, 100);
        t.take_log();
        // Interface 5 went, 6 came, the VLAN device went.
        write_interface_tables(&mut t, &[2, 6].into(), &[]).unwrap();
        assert_eq!(
            t.take_log(),
            [
                Write::SetRedirect(6),
                Write::RemoveRedirect(5),
                Write::RemoveVlan(7)
            ]
        );
        assert_eq!(t.redirects, [2, 6].into());
        assert!(t.vlans.is_empty());
    }
}
