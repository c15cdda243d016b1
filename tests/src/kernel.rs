//! Kernel-tier fixture: the real data-path object, loaded through the agent's loader into a
//! private network namespace with a known topology, driven with crafted packets through
//! BPF_PROG_TEST_RUN (`Xdp::test_run`).
//!
//! The namespace belongs to the test's thread (`unshare(CLONE_NEWNET)`): `ip` commands the
//! thread runs configure it, the FIB lookups of test runs resolve in it, and it disappears with
//! the thread. Topology:
//! - `up0` (the uplink; peer `up1`): 10.0.0.1/24, fd00:a::1/64. Gateway 10.0.0.2 / fd00:a::2
//!   (MAC [`GW_MAC`]) routes the remote pod networks 10.1.0.0/16 and fd00:1::/32; the client
//!   10.0.0.10 / fd00:a::10 (MAC [`CLIENT_MAC`]) sits on the same link.
//! - `pod0` (a backend-facing veth; peer `pod1`): local backend 10.1.9.2 / fd00:1:9::2 (MAC
//!   [`POD_MAC`]) routed on it. It is in the devmap, so frames to it are redirected.
//! - `vlan100`: stands for VLAN 100 on `up0` (LB_IFACES says so): 10.2.0.1/24, and host
//!   10.2.0.5 (MAC [`VLAN_HOST_MAC`]). It is a veth, not a VLAN device: this kernel has no 8021q
//!   module, and the data path only needs the FIB to name the egress device.
use std::{net::IpAddr, process::Command};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{PerCpuArray, PerCpuValues},
    programs::{TestRun, TestRunOptions},
};
use lb_common::{
    Addr, Counter, Flow4, Flow6, FlowAddr, FlowKey4, FlowKey6, Hop, IFACE_POLICY_HOOK, Iface,
    LinkMac, MAC_SLOTS, V4,
};
use lb_userspace::{
    dataplane::{self, Maps, Sizes},
    model::Desired,
    node::NodeView,
    reconcile::Reconciler,
    tables::Tables,
};

pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x09, 0x02];
pub const VLAN_HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x10, 0x05];
pub const NODE_V4: &str = "10.0.0.1";
pub const NODE_V6: &str = "fd00:a::1";

pub struct Fixture {
    pub ebpf: Ebpf,
    /// The tail-call table (kept, so it stays filled).
    progs: aya::maps::Map,
    pub maps: Maps,
    pub reconciler: Reconciler,
    pub node: NodeView,
    /// MACs and ifindexes of the fixture's interfaces.
    pub up0_mac: [u8; 6],
    pub pod0_mac: [u8; 6],
    pub up0: u32,
    pub pod0: u32,
    pub vlan100: u32,
}

/// The verdict and the packet as the program left it.
pub struct Outcome {
    pub verdict: u32,
    pub packet: Vec<u8>,
}

impl Fixture {
    /// Must be called on the test's own thread: it moves that thread into a new namespace.
    pub fn new(sizes: Sizes) -> Result<Fixture> {
        // SAFETY: affects only the calling thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!(
                "unshare(CLONE_NEWNET): {} (kernel tests need root)",
                std::io::Error::last_os_error()
            );
        }
        for cmd in TOPOLOGY {
            ip(cmd)?;
        }
        for (path, value) in [
            ("/proc/sys/net/ipv4/ip_forward", "1"),
            ("/proc/sys/net/ipv6/conf/all/forwarding", "1"),
        ] {
            std::fs::write(path, value).with_context(|| format!("write {path}"))?;
        }
        let dataplane::Loaded {
            mut ebpf, progs, ..
        } = dataplane::load(&sizes, None)?;
        let mut maps = Maps::take(&mut ebpf)?;
        let up0 = ifindex("up0")?;
        let pod0 = ifindex("pod0")?;
        let vlan100 = ifindex("vlan100")?;
        maps.devmap
            .insert(pod0, pod0, None, 0)
            .context("devmap insert")?;
        maps.devmap
            .insert(up0, up0, None, 0)
            .context("devmap insert")?;
        maps.ifaces
            .insert(
                vlan100,
                Iface {
                    parent: up0,
                    vlan_id: 100,
                    flags: 0,
                },
                0,
            )
            .context("ifaces insert")?;
        // lb_uplink balances only frames sent to up0's MAC.
        maps.set_link_mac(up0 % MAC_SLOTS, &LinkMac::new(up0, mac("up0")?))?;
        let node = NodeView {
            snat_ipv4: vec![NODE_V4.parse()?],
            snat_ipv6: vec![NODE_V6.parse()?],
            node_addrs: [NODE_V4.parse()?, NODE_V6.parse()?].into(),
            local: ["10.1.9.2".parse()?, "fd00:1:9::2".parse()?].into(),
            broadcast: ["10.0.0.255".parse()?, "10.2.0.255".parse()?].into(),
            ephemeral_ports: Some((32768, 60999)),
        };
        Ok(Fixture {
            up0_mac: mac("up0")?,
            pod0_mac: mac("pod0")?,
            ebpf,
            progs,
            maps,
            reconciler: Reconciler::new(sizes),
            node,
            up0,
            pod0,
            vlan100,
        })
    }

    /// Empties slot `slot` of the tail-call table: the slow path there is gone.
    pub fn clear_slow_path(&mut self, slot: u32) -> Result<()> {
        let mut progs = aya::maps::ProgramArray::try_from(&mut self.progs)?;
        progs.clear_index(&slot)?;
        Ok(())
    }

    /// Makes the maps hold `desired` (through the agent's reconciler).
    pub fn apply(&mut self, desired: &Desired) -> Result<()> {
        self.reconciler
            .apply(desired, &self.node, &mut self.maps)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }

    /// Runs `packet` through `program` as if received on `ifindex`.
    pub fn run_on(&mut self, program: &str, ifindex: u32, packet: &[u8]) -> Result<Outcome> {
        let prog = dataplane::program_mut(&mut self.ebpf, program)?;
        let mut out = vec![0u8; packet.len() + 256];
        let ctx = xdp_md(packet, ifindex);
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::new()
            })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok(Outcome {
            verdict: result.return_value,
            packet: out,
        })
    }

    /// Writes `frame` into up1, so that up0 receives it as from a driver: up0's TC ingress, then
    /// the stack. (Frames written into a veth are taken in before the write returns.)
    pub fn arrive_on_up0(&self, frame: &[u8]) -> Result<()> {
        let socket = crate::flood::PacketSocket::open("up1")?;
        ensure!(
            socket.send(frame),
            "writing a frame into up1: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// Attaches `lb_uplink_tc` at up0's TC ingress (a classic clsact filter: every kernel has
    /// them), as the agent does while a backend interface is `kernel`.
    pub fn attach_uplink_tc(&mut self) -> Result<()> {
        let _ = aya::programs::tc::qdisc_add_clsact("up0");
        let prog = dataplane::classifier_mut(&mut self.ebpf, lb_common::PROG_UPLINK_TC)?;
        let id = prog.attach_with_options(
            "up0",
            aya::programs::TcAttachType::Ingress,
            aya::programs::tc::TcAttachOptions::Netlink(aya::programs::tc::NlOptions::default()),
        )?;
        // Detached with the namespace.
        std::mem::forget(prog.take_link(id)?);
        Ok(())
    }

    /// Packets `dev` (in the fixture's namespace) received.
    pub fn rx_packets(&self, dev: &str) -> Result<u64> {
        let out = Command::new("ip")
            .args(["-j", "-s", "link", "show", "dev", dev])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        v[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .with_context(|| format!("no rx packets in {v}"))
    }

    /// Runs `packet` through `lb_uplink` `n` times (one run each: the original packet every
    /// time) and returns the verdicts. Takes `&self` so several threads can share a fixture.
    pub fn run_many(&self, packet: &[u8], n: usize) -> Result<Vec<u32>> {
        let prog: &aya::programs::Xdp = self
            .ebpf
            .program(lb_common::PROG_UPLINK)
            .context("no lb_uplink")?
            .try_into()?;
        let ctx = xdp_md(packet, self.up0);
        let mut out = vec![0u8; packet.len() + 256];
        let mut verdicts = Vec::with_capacity(n);
        for _ in 0..n {
            let r = prog.test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::new()
            })?;
            verdicts.push(r.return_value);
        }
        Ok(verdicts)
    }

    /// A packet arriving on the uplink.
    pub fn uplink(&mut self, packet: &[u8]) -> Result<Outcome> {
        let up0 = self.up0;
        self.run_on(lb_common::PROG_UPLINK, up0, packet)
    }

    /// A packet the kernel sends out of the uplink: `lb_uplink_out` at TC egress.
    pub fn out_of_uplink(&mut self, packet: &[u8]) -> Result<Outcome> {
        let up0 = self.up0;
        self.run_tc(lb_common::PROG_UPLINK_OUT, up0, packet)
    }

    /// A packet from a local backend, arriving on its veth: `lb_backend` at TC ingress.
    /// Verdicts are TC actions (TC_ACT_OK 0, TC_ACT_SHOT 2, TC_ACT_REDIRECT 7).
    pub fn from_pod(&mut self, packet: &[u8]) -> Result<Outcome> {
        let pod0 = self.pod0;
        self.run_tc(lb_common::PROG_BACKEND, pod0, packet)
    }

    /// Runs `packet` through the TC program `program` as an skb of device `ifindex`.
    fn run_tc(&mut self, program: &str, ifindex: u32, packet: &[u8]) -> Result<Outcome> {
        let prog = dataplane::classifier_mut(&mut self.ebpf, program)?;
        let mut out = vec![0u8; packet.len() + 256];
        // struct __sk_buff (192 bytes); ifindex at offset 40.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::new()
            })
            .context("BPF_PROG_TEST_RUN (tc)")?;
        out.truncate(result.data_size_out as usize);
        Ok(Outcome {
            verdict: result.return_value,
            packet: out,
        })
    }

    /// A node-wide counter by its metric name (`Counter::name`); `None` if the data path has
    /// no counter of that name (tests can name counters before they exist).
    pub fn counter_named(&self, name: &str) -> Option<u64> {
        Counter::ALL
            .iter()
            .find(|c| c.name() == name)
            .map(|c| self.counter(*c))
    }

    pub fn counter(&self, c: Counter) -> u64 {
        self.maps
            .read_counters()
            .into_iter()
            .find(|(k, _)| *k == c)
            .map_or(0, |(_, v)| v)
    }

    /// The entry of `key`, where the data path keeps it: the flow table, or for a snat flow's
    /// reply entry its claim slot (held, live or expired).
    pub fn flow4(&self, key: &FlowKey4) -> Option<Flow4> {
        self.maps
            .flows4
            .get(key, 0)
            .ok()
            .or_else(|| self.maps.claimed4(key))
    }

    pub fn flow6(&self, key: &FlowKey6) -> Option<Flow6> {
        self.maps
            .flows6
            .get(key, 0)
            .ok()
            .or_else(|| self.maps.claimed6(key))
    }

    /// The key of the reply entry that goes with an IPv4 client -> backend entry: from the
    /// backend to the rewritten source.
    pub fn reply_key4(&self, forward: &Flow4, proto: u8) -> FlowKey4 {
        let b = self
            .maps
            .backends
            .get(&forward.id(), 0)
            .expect("the flow's backend");
        FlowKey4::new(
            V4::from_addr(&b.addr),
            forward.addr,
            b.port,
            forward.port,
            proto,
        )
    }

    /// The address an IPv4 client -> backend entry sends to.
    pub fn backend_of(&self, forward: &Flow4) -> IpAddr {
        let b = self
            .maps
            .backends
            .get(&forward.id(), 0)
            .expect("the flow's backend");
        IpAddr::from(b.addr)
    }

    /// Runs `ip ARGS` in the fixture's namespace (the calling thread's).
    pub fn ip(&self, args: &str) -> Result<()> {
        ip(args)
    }

    /// Entries of both families: the flow tables' and the held claim slots (snat flows' reply
    /// entries).
    pub fn flow_count(&self) -> usize {
        self.maps.flows4.keys().count() + self.maps.flows6.keys().count() + self.maps.held_claims()
    }

    /// Marks pod0 as having a policy hook (as the agent does for a veth with another owner's
    /// TC egress program), or not; and forgets the cached next hops, which carry the mark.
    pub fn set_policy_hook(&mut self, on: bool) -> Result<()> {
        self.set_pod0_flags(if on { IFACE_POLICY_HOOK } else { 0 })
    }

    /// pod0's IFACE_* flags in the interface table (0: no entry), as the agent writes them for
    /// its delivery, and the next-hop cache emptied so the next packet reads them.
    pub fn set_pod0_flags(&mut self, flags: u16) -> Result<()> {
        let pod0 = self.pod0;
        if flags != 0 {
            let iface = Iface {
                parent: 0,
                vlan_id: 0,
                flags,
            };
            self.maps.set_iface(pod0, &iface)?;
        } else {
            self.maps.remove_iface(pod0)?;
        }
        let mut hops: PerCpuArray<_, Hop> = PerCpuArray::try_from(
            self.ebpf
                .map_mut(lb_common::MAP_HOPS)
                .context("no hop cache map")?,
        )?;
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        for slot in 0..lb_common::HOP_SLOTS {
            hops.set(slot, PerCpuValues::try_from(vec![Hop::default(); cpus])?, 0)?;
        }
        Ok(())
    }

    pub fn tables(&mut self) -> &mut dyn Tables {
        &mut self.maps
    }
}

/// The context of an XDP test run: `packet` received on `ifindex`. struct xdp_md: data,
/// data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
fn xdp_md(packet: &[u8], ifindex: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&u32::try_from(packet.len()).expect("a frame").to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// An IPv4 flow key as the data path builds it (ports in host order here).
pub fn flow_key4(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> FlowKey4 {
    let a = |s: &str| V4::from_addr(&Addr::from(s.parse::<IpAddr>().expect("address")));
    FlowKey4::new(a(src), a(dst), sport.to_be(), dport.to_be(), proto)
}

/// An IPv6 flow key as the data path builds it (ports in host order here).
pub fn flow_key6(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> FlowKey6 {
    let a = |s: &str| Addr::from(s.parse::<IpAddr>().expect("address"));
    FlowKey6::new(a(src), a(dst), sport.to_be(), dport.to_be(), proto)
}

const TOPOLOGY: &[&str] = &[
    "link set lo up",
    "link add up0 address 02:00:00:00:00:01 type veth peer name up1",
    "link add pod0 address 02:00:00:00:00:01 type veth peer name pod1",
    "link add vlan100 type veth peer name vlan100p",
    "link set up0 up",
    "link set up1 up",
    "link set pod0 up",
    "link set pod1 up",
    "link set vlan100 up",
    "link set vlan100p up",
    "addr add 10.0.0.1/24 dev up0",
    "addr add fd00:a::1/64 dev up0 nodad",
    "addr add 10.2.0.1/24 dev vlan100",
    "route add 10.1.0.0/16 via 10.0.0.2 dev up0",
    "route add fd00:1::/32 via fd00:a::2 dev up0",
    "route add 10.1.9.2/32 dev pod0",
    "route add fd00:1:9::2/128 dev pod0",
    "neigh replace 10.0.0.2 lladdr 02:00:00:00:00:02 dev up0 nud permanent",
    "neigh replace fd00:a::2 lladdr 02:00:00:00:00:02 dev up0 nud permanent",
    "neigh replace 10.0.0.10 lladdr 02:00:00:00:00:10 dev up0 nud permanent",
    "neigh replace fd00:a::10 lladdr 02:00:00:00:00:10 dev up0 nud permanent",
    "neigh replace 10.1.9.2 lladdr 02:00:00:00:09:02 dev pod0 nud permanent",
    "neigh replace fd00:1:9::2 lladdr 02:00:00:00:09:02 dev pod0 nud permanent",
    "neigh replace 10.2.0.5 lladdr 02:00:00:00:10:05 dev vlan100 nud permanent",
];

fn ip(args: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .with_context(|| format!("run ip {args}"))?;
    if !out.status.success() {
        bail!("ip {args}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid C string; resolves in the calling thread's namespace (sysfs would not:
    // it shows the namespace it was mounted in).
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("no interface {name}"),
        i => Ok(i),
    }
}

fn mac(name: &str) -> Result<[u8; 6]> {
    let out = Command::new("ip")
        .args(["-j", "link", "show", "dev", name])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let s = v[0]["address"].as_str().context("no MAC")?;
    let mut m = [0u8; 6];
    for (i, part) in s.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(m)
}
