//! Every map operation the agent makes, behind one trait: reconcile's writes, the interface
//! tables (redirect targets, VLAN devices), and the sweep's reads and removals of flows and
//! sources. `dataplane::Maps` is the real thing; [`MemoryTables`] is an in-memory stand-in that
//! records every write, for tests. No write to a map bypasses this trait.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use lb_common::{
    Addr, AddrInfo, Backend, Config, FILTER_WORDS, Flow4, Flow6, FlowKey4, FlowKey6, Iface,
    LinkMac, Policy, PrefixKey, PrefixRule, Service, ServiceInfo, ServiceKey, Source,
};

use crate::error::DataplaneError;

pub type Result<T> = std::result::Result<T, DataplaneError>;

/// What a restarted agent finds in the pinned maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub config: Option<Config>,
    pub services: Vec<(ServiceKey, Service)>,
    /// Non-empty backend slots.
    pub backends: Vec<(u32, Backend)>,
    pub addrs: Vec<(Addr, AddrInfo)>,
    pub filter: Vec<u64>,
    pub policies: Vec<(u32, Policy)>,
    pub prefixes: Vec<(PrefixKey, u32, PrefixRule)>,
    /// Non-empty LB_SVC_INFO slots (their generations).
    pub service_info: Vec<(u32, ServiceInfo)>,
    /// LB_RINGS was created anew (resized): the services' rings are not in it.
    pub rings_lost: bool,
}

/// A flow-table entry of either family (they have tables of their own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEntry {
    V4(FlowKey4, Flow4),
    V6(FlowKey6, Flow6),
}

/// A flow-table key of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowId {
    V4(FlowKey4),
    V6(FlowKey6),
}

impl FlowEntry {
    pub fn id(&self) -> FlowId {
        match self {
            FlowEntry::V4(k, _) => FlowId::V4(*k),
            FlowEntry::V6(k, _) => FlowId::V6(*k),
        }
    }
}

pub trait Tables {
    fn set_config(&mut self, config: &Config) -> Result<()>;
    fn set_filter_word(&mut self, index: u32, word: u64) -> Result<()>;
    fn set_addr(&mut self, addr: &Addr, info: &AddrInfo) -> Result<()>;
    fn remove_addr(&mut self, addr: &Addr) -> Result<()>;
    fn set_service(&mut self, key: &ServiceKey, service: &Service) -> Result<()>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()>;
    /// A service's frontend, policy and generation, by id (what flows read).
    fn set_service_info(&mut self, id: u32, info: &ServiceInfo) -> Result<()>;
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()>;
    /// Writes a whole ring into LB_RINGS from slot `base` on.
    fn write_ring(&mut self, base: u32, slots: &[u32]) -> Result<()>;
    fn clear_service_stats(&mut self, id: u32) -> Result<()>;
    fn clear_backend_stats(&mut self, id: u32) -> Result<()>;
    fn set_policy(&mut self, id: u32, policy: &Policy) -> Result<()>;
    fn set_prefix(&mut self, key: &PrefixKey, len: u32, rule: &PrefixRule) -> Result<()>;
    fn remove_prefix(&mut self, key: &PrefixKey, len: u32) -> Result<()>;
    /// Sets the bucket that new sources of fail-closed policy `policy` share while the source
    /// table has no room.
    fn set_overflow(&mut self, policy: u32, source: &Source) -> Result<()>;
    /// Everything reconcile needs to pick up where a previous agent left off.
    fn snapshot(&self) -> Result<Snapshot>;

    // The interfaces (agent::interfaces).
    /// Interfaces the data path may redirect to (the devmap's keys).
    fn redirects(&self) -> Result<BTreeSet<u32>>;
    fn set_redirect(&mut self, ifindex: u32) -> Result<()>;
    fn remove_redirect(&mut self, ifindex: u32) -> Result<()>;
    /// What the data path knows of egress devices, by ifindex (LB_IFACES): VLAN devices on
    /// uplinks, interfaces with a policy hook.
    fn ifaces(&self) -> Result<BTreeMap<u32, Iface>>;
    fn set_iface(&mut self, ifindex: u32, iface: &Iface) -> Result<()>;
    fn remove_iface(&mut self, ifindex: u32) -> Result<()>;
    /// Tells the data path the MAC of an interface lb_uplink runs on (slot: ifindex % MAC_SLOTS).
    fn set_link_mac(&mut self, slot: u32, mac: &LinkMac) -> Result<()>;

    // State the data path keeps (sweep).
    /// The node config as the data path sees it (None before the first apply).
    fn config(&self) -> Option<Config>;
    fn service(&self, key: &ServiceKey) -> Option<Service>;
    fn backend(&self, id: u32) -> Option<Backend>;
    /// Calls `f` for every flow-table entry of both families (a visitor: the tables may hold
    /// millions).
    fn for_each_flow(&self, f: &mut dyn FnMut(&FlowEntry));
    fn set_flow(&mut self, entry: &FlowEntry) -> Result<()>;
    /// Removes a flow entry; false if it was gone already.
    fn remove_flow(&mut self, id: &FlowId) -> Result<bool>;
    /// Calls `f` for every tracked rate-limit source.
    fn for_each_source(&self, f: &mut dyn FnMut(&Source));
    /// Every policy slot, by id (empty ones included: ids index them).
    fn policies(&self) -> Vec<Policy>;
}

/// One recorded write, for tests that check what was written and in which order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Config,
    FilterWord(u32),
    SetAddr(Addr),
    RemoveAddr(Addr),
    SetService(ServiceKey),
    RemoveService(ServiceKey),
    SetServiceInfo(u32),
    SetBackend(u32),
    Ring(u32),
    ClearServiceStats(u32),
    ClearBackendStats(u32),
    SetPolicy(u32),
    SetPrefix(PrefixKey, u32),
    RemovePrefix(PrefixKey, u32),
    SetOverflow(u32),
    SetRedirect(u32),
    RemoveRedirect(u32),
    SetIface(u32),
    RemoveIface(u32),
    SetLinkMac(u32),
    SetFlow(FlowId),
    RemoveFlow(FlowId),
}

/// The maps as plain collections, with a log of writes.
#[derive(Clone, Debug)]
pub struct MemoryTables {
    pub config: Option<Config>,
    pub filter: Vec<u64>,
    pub addrs: BTreeMap<Addr, AddrInfo>,
    pub services: BTreeMap<ServiceKey, Service>,
    pub backends: BTreeMap<u32, Backend>,
    pub rings: BTreeMap<u32, Vec<u32>>,
    pub policies: BTreeMap<u32, Policy>,
    pub prefixes: BTreeMap<(PrefixKey, u32), PrefixRule>,
    pub overflow: BTreeMap<u32, Source>,
    pub service_info: BTreeMap<u32, ServiceInfo>,
    /// Tracked rate-limit sources (the data path makes them; tests put some here).
    pub sources: Vec<Source>,
    pub redirects: BTreeSet<u32>,
    pub ifaces: BTreeMap<u32, Iface>,
    pub macs: BTreeMap<u32, LinkMac>,
    pub flows: HashMap<FlowId, FlowEntry>,
    pub log: Vec<Write>,
}

impl Default for MemoryTables {
    fn default() -> Self {
        MemoryTables {
            config: None,
            filter: vec![0; 2 * FILTER_WORDS as usize],
            addrs: BTreeMap::new(),
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            rings: BTreeMap::new(),
            policies: BTreeMap::new(),
            prefixes: BTreeMap::new(),
            overflow: BTreeMap::new(),
            service_info: BTreeMap::new(),
            sources: Vec::new(),
            redirects: BTreeSet::new(),
            ifaces: BTreeMap::new(),
            macs: BTreeMap::new(),
            flows: HashMap::new(),
            log: Vec::new(),
        }
    }
}

impl MemoryTables {
    /// The backend ids a service's live ring sends new flows to, slot by slot.
    pub fn ring_of(&self, key: &ServiceKey) -> Option<&[u32]> {
        let svc = self.services.get(key)?;
        self.rings.get(&svc.ring).map(Vec::as_slice)
    }

    pub fn take_log(&mut self) -> Vec<Write> {
        std::mem::take(&mut self.log)
    }
}

impl Tables for MemoryTables {
    fn set_config(&mut self, config: &Config) -> Result<()> {
        self.config = Some(*config);
        self.log.push(Write::Config);
        Ok(())
    }
    fn set_filter_word(&mut self, index: u32, word: u64) -> Result<()> {
        self.filter[index as usize] = word;
        self.log.push(Write::FilterWord(index));
        Ok(())
    }
    fn set_addr(&mut self, addr: &Addr, info: &AddrInfo) -> Result<()> {
        self.addrs.insert(*addr, *info);
        self.log.push(Write::SetAddr(*addr));
        Ok(())
    }
    fn remove_addr(&mut self, addr: &Addr) -> Result<()> {
        self.addrs.remove(addr);
        self.log.push(Write::RemoveAddr(*addr));
        Ok(())
    }
    fn set_service(&mut self, key: &ServiceKey, service: &Service) -> Result<()> {
        self.services.insert(*key, *service);
        self.log.push(Write::SetService(*key));
        Ok(())
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.services.remove(key);
        self.log.push(Write::RemoveService(*key));
        Ok(())
    }
    fn set_service_info(&mut self, id: u32, info: &ServiceInfo) -> Result<()> {
        self.service_info.insert(id, *info);
        self.log.push(Write::SetServiceInfo(id));
        Ok(())
    }
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends.insert(id, *backend);
        self.log.push(Write::SetBackend(id));
        Ok(())
    }
    fn write_ring(&mut self, base: u32, slots: &[u32]) -> Result<()> {
        self.rings.insert(base, slots.to_vec());
        self.log.push(Write::Ring(base));
        Ok(())
    }
    fn clear_service_stats(&mut self, id: u32) -> Result<()> {
        self.log.push(Write::ClearServiceStats(id));
        Ok(())
    }
    fn clear_backend_stats(&mut self, id: u32) -> Result<()> {
        self.log.push(Write::ClearBackendStats(id));
        Ok(())
    }
    fn set_policy(&mut self, id: u32, policy: &Policy) -> Result<()> {
        self.policies.insert(id, *policy);
        self.log.push(Write::SetPolicy(id));
        Ok(())
    }
    fn set_prefix(&mut self, key: &PrefixKey, len: u32, rule: &PrefixRule) -> Result<()> {
        self.prefixes.insert((*key, len), *rule);
        self.log.push(Write::SetPrefix(*key, len));
        Ok(())
    }
    fn remove_prefix(&mut self, key: &PrefixKey, len: u32) -> Result<()> {
        self.prefixes.remove(&(*key, len));
        self.log.push(Write::RemovePrefix(*key, len));
        Ok(())
    }
    fn set_overflow(&mut self, policy: u32, source: &Source) -> Result<()> {
        self.overflow.insert(policy, *source);
        self.log.push(Write::SetOverflow(policy));
        Ok(())
    }
    fn snapshot(&self) -> Result<Snapshot> {
        Ok(Snapshot {
            config: self.config,
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            addrs: self.addrs.iter().map(|(k, v)| (*k, *v)).collect(),
            filter: self.filter.clone(),
            policies: self.policies.iter().map(|(k, v)| (*k, *v)).collect(),
            prefixes: self
                .prefixes
                .iter()
                .map(|((k, len), r)| (*k, *len, *r))
                .collect(),
            service_info: self.service_info.iter().map(|(k, v)| (*k, *v)).collect(),
            rings_lost: false,
        })
    }

    fn redirects(&self) -> Result<BTreeSet<u32>> {
        Ok(self.redirects.clone())
    }
    fn set_redirect(&mut self, ifindex: u32) -> Result<()> {
        self.redirects.insert(ifindex);
        self.log.push(Write::SetRedirect(ifindex));
        Ok(())
    }
    fn remove_redirect(&mut self, ifindex: u32) -> Result<()> {
        self.redirects.remove(&ifindex);
        self.log.push(Write::RemoveRedirect(ifindex));
        Ok(())
    }
    fn ifaces(&self) -> Result<BTreeMap<u32, Iface>> {
        Ok(self.ifaces.clone())
    }
    fn set_iface(&mut self, ifindex: u32, iface: &Iface) -> Result<()> {
        self.ifaces.insert(ifindex, *iface);
        self.log.push(Write::SetIface(ifindex));
        Ok(())
    }
    fn remove_iface(&mut self, ifindex: u32) -> Result<()> {
        self.ifaces.remove(&ifindex);
        self.log.push(Write::RemoveIface(ifindex));
        Ok(())
    }
    fn set_link_mac(&mut self, slot: u32, mac: &LinkMac) -> Result<()> {
        self.macs.insert(slot, *mac);
        self.log.push(Write::SetLinkMac(slot));
        Ok(())
    }
    fn config(&self) -> Option<Config> {
        self.config
    }
    fn service(&self, key: &ServiceKey) -> Option<Service> {
        self.services.get(key).copied()
    }
    fn backend(&self, id: u32) -> Option<Backend> {
        self.backends.get(&id).copied()
    }
    fn for_each_flow(&self, f: &mut dyn FnMut(&FlowEntry)) {
        for e in self.flows.values() {
            f(e);
        }
    }
    fn set_flow(&mut self, entry: &FlowEntry) -> Result<()> {
        self.flows.insert(entry.id(), *entry);
        self.log.push(Write::SetFlow(entry.id()));
        Ok(())
    }
    fn remove_flow(&mut self, id: &FlowId) -> Result<bool> {
        let removed = self.flows.remove(id).is_some();
        self.log.push(Write::RemoveFlow(*id));
        Ok(removed)
    }
    fn for_each_source(&self, f: &mut dyn FnMut(&Source)) {
        for s in &self.sources {
            f(s);
        }
    }
    fn policies(&self) -> Vec<Policy> {
        let len = self.policies.keys().max().map_or(0, |m| *m as usize + 1);
        let mut all = vec![Policy::default(); len];
        for (id, p) in &self.policies {
            all[*id as usize] = *p;
        }
        all
    }
}
