//! Every map operation the agent makes, behind one trait: reconcile's writes, the interface
//! tables (redirect targets, VLAN devices), and the sweep's reads and removals of flows and
//! sources. `dataplane::Maps` is the real thing; [`MemoryTables`] is an in-memory stand-in that
//! records every write, for tests. No write to a map bypasses this trait.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use lb_common::{
    Addr, AddrInfo, Backend, Config, FILTER_WORDS, Flow, FlowKey, Iface, Policy, PrefixKey,
    PrefixRule, Service, ServiceKey, Source, SourceKey,
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
}

pub trait Tables {
    fn set_config(&mut self, config: &Config) -> Result<()>;
    fn set_filter_word(&mut self, index: u32, word: u64) -> Result<()>;
    fn set_addr(&mut self, addr: &Addr, info: &AddrInfo) -> Result<()>;
    fn remove_addr(&mut self, addr: &Addr) -> Result<()>;
    fn set_service(&mut self, key: &ServiceKey, service: &Service) -> Result<()>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()>;
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()>;
    /// Writes a whole ring (its `ring_size` slots).
    fn write_ring(&mut self, ring: u32, slots: &[u32]) -> Result<()>;
    fn clear_service_stats(&mut self, id: u32) -> Result<()>;
    fn clear_backend_stats(&mut self, id: u32) -> Result<()>;
    fn set_policy(&mut self, id: u32, policy: &Policy) -> Result<()>;
    fn set_prefix(&mut self, key: &PrefixKey, len: u32, rule: &PrefixRule) -> Result<()>;
    fn remove_prefix(&mut self, key: &PrefixKey, len: u32) -> Result<()>;
    /// Inserts a source bucket if there is none (the overflow buckets of fail-closed policies);
    /// true if it did.
    fn ensure_source(&mut self, key: &SourceKey, source: &Source) -> Result<bool>;
    fn remove_source(&mut self, key: &SourceKey) -> Result<()>;
    /// Everything reconcile needs to pick up where a previous agent left off.
    fn snapshot(&self) -> Result<Snapshot>;

    // The interfaces (agent::interfaces).
    /// Interfaces the data path may redirect to (the devmap's keys).
    fn redirects(&self) -> Result<BTreeSet<u32>>;
    fn set_redirect(&mut self, ifindex: u32) -> Result<()>;
    fn remove_redirect(&mut self, ifindex: u32) -> Result<()>;
    /// VLAN devices on uplinks, by ifindex.
    fn vlans(&self) -> Result<BTreeMap<u32, Iface>>;
    fn set_vlan(&mut self, ifindex: u32, vlan: &Iface) -> Result<()>;
    fn remove_vlan(&mut self, ifindex: u32) -> Result<()>;

    // State the data path keeps (sweep).
    /// The node config as the data path sees it (None before the first apply).
    fn config(&self) -> Option<Config>;
    fn service(&self, key: &ServiceKey) -> Option<Service>;
    /// Calls `f` for every flow-table entry (a visitor: the table may hold millions).
    fn for_each_flow(&self, f: &mut dyn FnMut(&FlowKey, &Flow));
    fn set_flow(&mut self, key: &FlowKey, flow: &Flow) -> Result<()>;
    /// Removes a flow entry; false if it was gone already.
    fn remove_flow(&mut self, key: &FlowKey) -> Result<bool>;
    /// Calls `f` for every source-table entry.
    fn for_each_source(&self, f: &mut dyn FnMut(&SourceKey, &Source));
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
    SetBackend(u32),
    Ring(u32),
    ClearServiceStats(u32),
    ClearBackendStats(u32),
    SetPolicy(u32),
    SetPrefix(PrefixKey, u32),
    RemovePrefix(PrefixKey, u32),
    EnsureSource(SourceKey),
    RemoveSource(SourceKey),
    SetRedirect(u32),
    RemoveRedirect(u32),
    SetVlan(u32),
    RemoveVlan(u32),
    SetFlow(FlowKey),
    RemoveFlow(FlowKey),
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
    pub sources: BTreeMap<SourceKey, Source>,
    pub redirects: BTreeSet<u32>,
    pub vlans: BTreeMap<u32, Iface>,
    pub flows: HashMap<FlowKey, Flow>,
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
            sources: BTreeMap::new(),
            redirects: BTreeSet::new(),
            vlans: BTreeMap::new(),
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
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends.insert(id, *backend);
        self.log.push(Write::SetBackend(id));
        Ok(())
    }
    fn write_ring(&mut self, ring: u32, slots: &[u32]) -> Result<()> {
        self.rings.insert(ring, slots.to_vec());
        self.log.push(Write::Ring(ring));
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
    fn ensure_source(&mut self, key: &SourceKey, source: &Source) -> Result<bool> {
        if self.sources.contains_key(key) {
            return Ok(false);
        }
        self.sources.insert(*key, *source);
        self.log.push(Write::EnsureSource(*key));
        Ok(true)
    }
    fn remove_source(&mut self, key: &SourceKey) -> Result<()> {
        self.sources.remove(key);
        self.log.push(Write::RemoveSource(*key));
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
    fn vlans(&self) -> Result<BTreeMap<u32, Iface>> {
        Ok(self.vlans.clone())
    }
    fn set_vlan(&mut self, ifindex: u32, vlan: &Iface) -> Result<()> {
        self.vlans.insert(ifindex, *vlan);
        self.log.push(Write::SetVlan(ifindex));
        Ok(())
    }
    fn remove_vlan(&mut self, ifindex: u32) -> Result<()> {
        self.vlans.remove(&ifindex);
        self.log.push(Write::RemoveVlan(ifindex));
        Ok(())
    }
    fn config(&self) -> Option<Config> {
        self.config
    }
    fn service(&self, key: &ServiceKey) -> Option<Service> {
        self.services.get(key).copied()
    }
    fn for_each_flow(&self, f: &mut dyn FnMut(&FlowKey, &Flow)) {
        for (k, v) in &self.flows {
            f(k, v);
        }
    }
    fn set_flow(&mut self, key: &FlowKey, flow: &Flow) -> Result<()> {
        self.flows.insert(*key, *flow);
        self.log.push(Write::SetFlow(*key));
        Ok(())
    }
    fn remove_flow(&mut self, key: &FlowKey) -> Result<bool> {
        let removed = self.flows.remove(key).is_some();
        self.log.push(Write::RemoveFlow(*key));
        Ok(removed)
    }
    fn for_each_source(&self, f: &mut dyn FnMut(&SourceKey, &Source)) {
        for (k, v) in &self.sources {
            f(k, v);
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
