//! Following the node's interfaces: the uplinks and backend interfaces get their program
//! (attached, or taken over from a previous agent), interfaces that went are detached, and the
//! redirect targets (devmap) and interface table (VLAN devices, policy hooks) are made to list
//! exactly the current interfaces. Each backend interface's delivery (redirect in XDP, or the
//! kernel through its policy hooks, or netfilter: see [`crate::hooks`]) is decided here, and again
//! periodically, as hooks come and go without notifications.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use lb_common::{
    IFACE_NETFILTER, IFACE_POLICY_HOOK, Iface, LinkMac, MAC_SLOTS, PROG_BACKEND, PROG_UPLINK,
    PROG_UPLINK_OUT, PROG_UPLINK_TC,
};
use log::{info, warn};

use super::Agent;
use crate::{
    hooks::{self, Delivery, Via},
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
        let deliveries = self.decide_deliveries();
        self.set_deliveries(deliveries);
        self.write_interfaces()?;
        self.mac_slots =
            write_link_macs(&mut self.maps, &self.interfaces.uplinks, &self.mac_slots)?;
        Ok(())
    }

    /// Looks at the backend interfaces' policy hooks again (the periodic check: TCX programs
    /// and netfilter rules come and go without a notification) and rewrites the interface
    /// table where a delivery changed.
    pub(super) fn check_policy_hooks(&mut self) {
        self.restore_lost_attachments();
        let deliveries = self.decide_deliveries();
        if deliveries == self.deliveries {
            return;
        }
        self.set_deliveries(deliveries);
        if let Err(e) = self.write_interfaces() {
            warn!("interfaces: {e:#}");
        }
        self.publish();
    }

    /// Puts back our programs that someone else took off an interface (no notification says
    /// so: looked at with the policy hooks). Until then that interface's packets go on without
    /// them: an uplink's to the kernel unbalanced, a pod's replies untranslated.
    fn restore_lost_attachments(&mut self) {
        let xdp_on = match self.netlink.links() {
            Ok(links) => links
                .iter()
                .filter(|l| l.xdp.is_some())
                .map(|l| l.ifindex)
                .collect(),
            Err(e) => {
                log::debug!("links: {e}");
                return;
            }
        };
        let lost = self.attachments.take_lost(&mut self.netlink, &xdp_on).len()
            + self.uplink_tc.take_lost(&mut self.netlink, &xdp_on).len()
            + self.uplink_out.take_lost(&mut self.netlink, &xdp_on).len();
        if lost > 0 {
            if let Err(e) = self.sync_interfaces() {
                warn!("interfaces: {e:#}");
            }
            self.publish();
        }
    }

    /// Takes `deliveries` as decided, saying each one that changed.
    fn set_deliveries(&mut self, deliveries: BTreeMap<u32, (String, Delivery)>) {
        for (ifindex, (name, d)) in &deliveries {
            if self.deliveries.get(ifindex) != Some(&(name.clone(), d.clone())) {
                info!("{name}: delivery {} ({})", d.word(), d.reason);
            }
        }
        self.deliveries = deliveries;
    }

    /// Each backend interface's delivery, by ifindex (with its name).
    fn decide_deliveries(&mut self) -> BTreeMap<u32, (String, Delivery)> {
        // Reading netfilter dumps every chain, and every rule of tables with a forward chain
        // (kube-proxy's nftables table is large): not for nothing.
        if self.interfaces.backends.is_empty() {
            return BTreeMap::new();
        }
        let setting = self.inputs.file.node.policy_hooks;
        // Under `respect` too: the reason says what netfilter has that balanced traffic skips.
        let netfilter = if setting == hooks::PolicyHooks::Detect {
            hooks::netfilter_forward()
        } else {
            hooks::Netfilter::new()
        };
        let mut out = BTreeMap::new();
        for link in self.interfaces.backends.clone() {
            let mut d = hooks::decide(setting, &mut self.netlink, &link, &netfilter);
            if d.via == Via::Redirect && !self.redirectable(&link) {
                d = Delivery {
                    via: Via::Kernel,
                    reason: "its pod end takes no redirected frames".into(),
                };
            }
            out.insert(link.ifindex, (link.name.clone(), d));
        }
        out
    }

    /// Redirect targets (the uplinks, and backend interfaces that take redirected frames) and
    /// the interface table (VLAN devices; backend interfaces with a policy hook), as decided.
    fn write_interfaces(&mut self) -> Result<()> {
        let mut targets: BTreeSet<u32> =
            self.interfaces.uplinks.iter().map(|l| l.ifindex).collect();
        let (mut hooked, mut netfiltered) = (BTreeSet::new(), BTreeSet::new());
        for link in self.interfaces.backends.clone() {
            let via = self.deliveries.get(&link.ifindex).map(|(_, d)| d.via);
            // A `netfilter` pod is reached through the kernel's forwarding, whether or not its
            // veth takes redirected frames.
            if via == Some(Via::Netfilter) {
                netfiltered.insert(link.ifindex);
            }
            if self.redirectable(&link) {
                targets.insert(link.ifindex);
                if via == Some(Via::Kernel) {
                    hooked.insert(link.ifindex);
                }
            }
        }
        // The receivers go on before the data path starts handing over, and come off only after
        // it stopped (a `netfilter` pod's reply the kernel forwarded untranslated would reach
        // the client, whose RST would end the connection).
        if !hooked.is_empty() {
            self.sync_uplink_tc(true);
        }
        if !netfiltered.is_empty() {
            self.sync_uplink_out(true);
        }
        write_interface_tables(
            &mut self.maps,
            &targets,
            &self.interfaces.vlans,
            &hooked,
            &netfiltered,
        )?;
        if hooked.is_empty() {
            self.sync_uplink_tc(false);
        }
        if netfiltered.is_empty() {
            self.sync_uplink_out(false);
        }
        if self
            .deliveries
            .values()
            .any(|(_, d)| d.via != Via::Redirect)
        {
            for uplink in &self.interfaces.uplinks {
                match hooks::accept_local(&uplink.name) {
                    Ok(true) => info!(
                        "{}: accept_local turned on: snat packets the data path hands to the kernel for local pods carry the node's own address as source",
                        uplink.name
                    ),
                    Ok(false) => {}
                    Err(e) => warn!(
                        "{}: cannot turn accept_local on ({e}): snat flows to local pods delivered through the kernel will be dropped as martians",
                        uplink.name
                    ),
                }
            }
        }
        Ok(())
    }

    /// `lb_uplink_tc` at every uplink's TC ingress when `wanted` (some backend interface takes
    /// handed-over packets), else on none: it costs every packet the kernel takes in on an uplink
    /// a program run. An uplink it cannot go on keeps working: the packets handed over there go
    /// through the kernel's forwarding instead (see `handoff.rs` in lb-ebpf).
    fn sync_uplink_tc(&mut self, wanted: bool) {
        self.sync_receiver(Receiver::Handoff, wanted);
    }

    /// `lb_uplink_out` at every uplink's TC egress when `wanted` (some backend interface is
    /// `netfilter`), else on none: it costs every packet the kernel sends out of an uplink a
    /// program run. An uplink it cannot go on is logged: replies of `netfilter` flows leaving
    /// there go out untranslated (the client drops them), so new flows to those pods fail.
    fn sync_uplink_out(&mut self, wanted: bool) {
        self.sync_receiver(Receiver::Netfilter, wanted);
    }

    /// One of the uplinks' TC receivers on every uplink when `wanted`, else on none.
    fn sync_receiver(&mut self, which: Receiver, wanted: bool) {
        let (program, does, without, off) = match which {
            Receiver::Handoff => (
                PROG_UPLINK_TC,
                "packets for pods behind a policy hook go to their veth's egress from here",
                "packets for pods behind a policy hook arriving there go through the kernel's forwarding (and netfilter)",
                "no backend interface takes handed-over packets",
            ),
            Receiver::Netfilter => (
                PROG_UPLINK_OUT,
                "replies from pods delivered through netfilter are translated here",
                "replies from pods delivered through netfilter cannot be translated there",
                "no backend interface is netfilter",
            ),
        };
        let attachments = match which {
            Receiver::Handoff => &mut self.uplink_tc,
            Receiver::Netfilter => &mut self.uplink_out,
        };
        let mut on = Vec::new();
        if wanted {
            for link in &self.interfaces.uplinks {
                let new = attachments.get(&link.name).is_none();
                match attachments.attach_tc(
                    &mut self.loaded.ebpf,
                    program,
                    &link.name,
                    self.args.tc_mode,
                ) {
                    Ok(a) => {
                        if new {
                            info!(
                                "{program} on {} (ifindex {}): {} mode{}: {does}",
                                a.iface,
                                a.ifindex,
                                a.mode,
                                note_suffix(a.note.as_deref())
                            );
                        }
                        on.push(link.name.clone());
                    }
                    Err(e) => warn!("{}: {e:#}; {without}", link.name),
                }
            }
        }
        for iface in attachments.pinned_interfaces() {
            if !on.contains(&iface) {
                info!("{program} off {iface}: {off}");
                attachments.detach(&iface);
            }
        }
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

/// The uplinks' TC receivers: `lb_uplink_tc` (ingress, the handoff) and `lb_uplink_out`
/// (egress, replies of `netfilter` flows).
#[derive(Clone, Copy)]
enum Receiver {
    Handoff,
    Netfilter,
}

/// Makes the redirect targets exactly `targets` and the interface table exactly `vlans`
/// ((ifindex, parent ifindex, VLAN id)), `hooked` (interfaces with a policy hook) and
/// `netfiltered` (interfaces whose delivery is `netfilter`), writing
/// only what differs. New entries go in before stale ones go, so a packet never finds neither.
pub(crate) fn write_interface_tables(
    t: &mut dyn Tables,
    targets: &BTreeSet<u32>,
    vlans: &[(u32, u32, u16)],
    hooked: &BTreeSet<u32>,
    netfiltered: &BTreeSet<u32>,
) -> crate::tables::Result<()> {
    let present = t.redirects()?;
    for i in targets.difference(&present) {
        t.set_redirect(*i)?;
    }
    for i in present.difference(targets) {
        t.remove_redirect(*i)?;
    }
    let mut wanted: BTreeMap<u32, Iface> = BTreeMap::new();
    for (ifindex, parent, id) in vlans {
        wanted.insert(
            *ifindex,
            Iface {
                parent: *parent,
                vlan_id: *id,
                flags: 0,
            },
        );
    }
    for i in hooked {
        wanted.entry(*i).or_default().flags |= IFACE_POLICY_HOOK;
    }
    for i in netfiltered {
        wanted.entry(*i).or_default().flags |= IFACE_NETFILTER;
    }
    let known = t.ifaces()?;
    for (ifindex, iface) in &wanted {
        if known.get(ifindex) != Some(iface) {
            t.set_iface(*ifindex, iface)?;
        }
    }
    for i in known.keys() {
        if !wanted.contains_key(i) {
            t.remove_iface(*i)?;
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
        let (vlans, hooked, netfiltered) = (&[(7, 2, 100)], &[5].into(), &[9].into());
        write_interface_tables(&mut t, &[2, 5].into(), vlans, hooked, netfiltered).unwrap();
        assert_eq!(t.redirects, [2, 5].into());
        assert_eq!(t.ifaces[&7].vlan_id, 100);
        assert_eq!(t.ifaces[&7].flags, 0);
        assert_eq!(
            (t.ifaces[&5].parent, t.ifaces[&5].flags),
            (0, IFACE_POLICY_HOOK)
        );
        assert_eq!(t.ifaces[&9].flags, IFACE_NETFILTER);
        t.take_log();
        // The same again: nothing to write.
        write_interface_tables(&mut t, &[2, 5].into(), vlans, hooked, netfiltered).unwrap();
        assert!(t.take_log().is_empty());
        // Interface 5 went, 6 came (without a hook), the VLAN device and 9 went.
        let none = BTreeSet::new();
        write_interface_tables(&mut t, &[2, 6].into(), &[], &none, &none).unwrap();
        assert_eq!(
            t.take_log(),
            [
                Write::SetRedirect(6),
                Write::RemoveRedirect(5),
                Write::RemoveIface(5),
                Write::RemoveIface(7),
                Write::RemoveIface(9)
            ]
        );
        assert_eq!(t.redirects, [2, 6].into());
        assert!(t.ifaces.is_empty());
    }
}
