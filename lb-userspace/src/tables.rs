//! The map operations reconcile needs, behind one trait. `dataplane::MapTables` is the real
//! thing; [`MemoryTables`] is an in-memory stand-in that records every write, for tests.
use std::collections::BTreeMap;

use lb_common::{
    Addr, AddrInfo, Backend, Config, FILTER_WORDS, LinkMac, Policy, PrefixKey, PrefixRule, Service,
    ServiceInfo, ServiceKey, Source,
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
    /// Tells the data path the MAC of an interface lb_uplink runs on (slot: ifindex % MAC_SLOTS).
    fn set_link_mac(&mut self, slot: u32, mac: &LinkMac) -> Result<()>;
    /// Everything reconcile needs to pick up where a previous agent left off.
    fn snapshot(&self) -> Result<Snapshot>;
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
    SetLinkMac(u32),
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
    pub macs: BTreeMap<u32, LinkMac>,
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
            macs: BTreeMap::new(),
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
    fn set_link_mac(&mut self, slot: u32, mac: &LinkMac) -> Result<()> {
        self.macs.insert(slot, *mac);
        self.log.push(Write::SetLinkMac(slot));
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
        })
    }
}
