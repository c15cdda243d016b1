//! The EKS-like lab: a VPC subnet (a bridge), a client with several addresses, two forwarding
//! nodes and VPC-CNI style pods, dual stack, in namespaces this process creates and deletes on
//! Drop. It touches nothing outside its own namespaces, and attaches only `xdp_pass`.
//!
//! ```text
//!  client:eth0 ─── vpc:veth-client ┐
//!                                  ├─ vpc:br0 (switch only)
//!  node1:eth0  ─── vpc:veth-node1  ┤     node1:vethpod1 ─── pod1:eth0   node1:vethpod2 ─── pod2:eth0
//!  node2:eth0  ─── vpc:veth-node2  ┘     node2:vethpod3 ─── pod3:eth0   node2:vethpod4 ─── pod4:eth0
//!
//!  client eth0  10.0.0.10..=14/24, fd00:a::10..=14/64
//!  node1 eth0   10.0.0.1/24, fd00:a::1/64    pods 10.1.1.2/32 10.1.1.3/32, fd00:1:1::2/128 ::3/128
//!  node2 eth0   10.0.0.2/24, fd00:a::2/64    pods 10.1.2.2/32 10.1.2.3/32, fd00:1:2::2/128 ::3/128
//! ```
//! `xdp_pass` sits on every interface that receives frames a data path on node1 or node2 may
//! XDP_TX or XDP_REDIRECT (veth-node1, veth-node2, each pod's eth0): a veth delivers such frames
//! only when its peer runs an XDP program.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf,
    programs::{XdpMode, xdp::XdpLinkId},
};
use lb_userspace::dataplane;

use crate::netns::{Netns, remove_stale, unique_name};

/// Name of a node's uplink (the ENI) and of a pod's interface.
pub const NODE_UPLINK: &str = "eth0";
pub const POD_IFACE: &str = "eth0";
pub const CLIENT_IFACE: &str = "eth0";
/// The VPC subnet's switch, in ns vpc.
pub const BRIDGE: &str = "br0";
pub const SUBNET_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 0, 0, 0), 24);
pub const SUBNET_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0xa, 0, 0, 0, 0, 0, 0), 64);
/// Service VIPs: the client routes them to node1.
pub const VIP_RANGE_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 16);
pub const VIP_RANGE_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0), 64);
/// The pods' gateways, as the VPC CNI sets them: reached through a permanent neighbour entry
/// that points at the host veth's MAC.
pub const POD_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const POD_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Longest pod name: the host veth is `veth<name>` and interface names have 15 bytes.
pub const MAX_POD_NAME: usize = 11;

/// Sysctls of every lab namespace, written before any interface exists so that new interfaces
/// inherit the `default` values.
const COMMON_SYSCTLS: &[(&str, &str)] = &[
    // Addresses are usable at once: no duplicate address detection anywhere.
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
    // Less background traffic (RS) in front of XDP counters; nobody sends RAs here.
    ("net.ipv6.conf.default.router_solicitations", "0"),
    ("net.ipv6.conf.default.accept_ra", "0"),
    // Reverse-path filtering off everywhere (all, default, and so node1's uplink): NAT experiments
    // deliver packets whose source is not routed back through the receiving interface (SNAT to
    // the node address, replies to VIPs, DSR). The effective value is max(all, interface).
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
];

/// Nodes route between the VPC and their pods, and between each other.
const NODE_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv6.conf.all.forwarding", "1"),
    // A node forwards out of the interface a packet came in on (client -> node1 -> node2's pod):
    // an ICMP redirect would teach the client to skip node1 and so bypass the load balancer.
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.default.send_redirects", "0"),
];

/// The bridge only switches: no IPv6 on its ports means no MLD/RS noise from the VPC itself.
const VPC_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv6.conf.all.disable_ipv6", "1"),
    ("net.ipv6.conf.default.disable_ipv6", "1"),
];

const CLIENT_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.conf.all.accept_redirects", "0"),
    ("net.ipv4.conf.default.accept_redirects", "0"),
    ("net.ipv6.conf.all.accept_redirects", "0"),
    ("net.ipv6.conf.default.accept_redirects", "0"),
];

/// How long `build` waits for addresses to leave the tentative state (never with DAD off).
const READY_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeId {
    Node1,
    Node2,
}

impl NodeId {
    pub const ALL: [NodeId; 2] = [NodeId::Node1, NodeId::Node2];

    pub fn name(self) -> &'static str {
        match self {
            NodeId::Node1 => "node1",
            NodeId::Node2 => "node2",
        }
    }

    fn index(self) -> u8 {
        match self {
            NodeId::Node1 => 1,
            NodeId::Node2 => 2,
        }
    }

    /// 10.0.0.1 / 10.0.0.2.
    pub fn ipv4(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, self.index())
    }

    /// fd00:a::1 / fd00:a::2.
    pub fn ipv6(self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0xa, 0, 0, 0, 0, 0, self.index().into())
    }

    /// 10.1.1.0/24 / 10.1.2.0/24.
    pub fn pod_cidr_v4(self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(10, 1, self.index(), 0), 24)
    }

    /// fd00:1:1::/64 / fd00:1:2::/64.
    pub fn pod_cidr_v6(self) -> (Ipv6Addr, u8) {
        (
            Ipv6Addr::new(0xfd00, 1, self.index().into(), 0, 0, 0, 0, 0),
            64,
        )
    }

    /// The bridge-side peer of the node's uplink, in ns vpc.
    pub fn uplink_peer(self) -> String {
        format!("veth-{}", self.name())
    }

    fn other(self) -> NodeId {
        match self {
            NodeId::Node1 => NodeId::Node2,
            NodeId::Node2 => NodeId::Node1,
        }
    }
}

/// A node: its namespace and its uplink `eth0` on the VPC subnet.
#[derive(Debug)]
pub struct Node {
    pub id: NodeId,
    pub ns: Netns,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// Always `eth0`.
    pub uplink: &'static str,
    pub uplink_mac: [u8; 6],
    pub uplink_ifindex: u32,
    /// Name of the uplink's peer in ns vpc (a bridge port running `xdp_pass`).
    pub uplink_peer: String,
    pub uplink_peer_mac: [u8; 6],
}

/// The client: one interface on the VPC subnet with several addresses of each family.
#[derive(Debug)]
pub struct Client {
    pub ns: Netns,
    /// 10.0.0.10..=10.0.0.14; the first is the primary (default source).
    pub ipv4: Vec<Ipv4Addr>,
    /// fd00:a::10..=fd00:a::14.
    pub ipv6: Vec<Ipv6Addr>,
    pub mac: [u8; 6],
}

impl Client {
    /// The client's addresses of the family of `dst`, to spread requests over.
    pub fn sources_for(&self, dst: IpAddr) -> Vec<IpAddr> {
        match dst {
            IpAddr::V4(_) => self.ipv4.iter().map(|a| IpAddr::V4(*a)).collect(),
            IpAddr::V6(_) => self.ipv6.iter().map(|a| IpAddr::V6(*a)).collect(),
        }
    }
}

/// A VPC-CNI style pod: `eth0` with a /32 and a /128, default routes to the link-local gateways,
/// and a host veth without a routable address on its node.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub node: NodeId,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// `veth<name>`, in the node's namespace.
    pub host_veth: String,
    pub host_veth_mac: [u8; 6],
    pub host_veth_ifindex: u32,
    /// MAC of the pod's `eth0`.
    pub mac: [u8; 6],
    pub ns: Netns,
}

impl Pod {
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.ipv6.into()
        } else {
            self.ipv4.into()
        }
    }
}

/// The lab. Everything is torn down on Drop: XDP links, then pods, nodes, client, VPC.
pub struct Lab {
    base: String,
    build_time: Duration,
    /// The tools object: owns every `xdp_pass` link (dropping it detaches them).
    tools: Option<Ebpf>,
    links: HashMap<(String, String), XdpLinkId>,
    // Dropped in this order after `Drop::drop`.
    pods: Vec<Pod>,
    node1: Node,
    node2: Node,
    client: Client,
    vpc: Netns,
}

impl Lab {
    /// Builds the whole lab from nothing: namespaces `PREFIX-PID-N-{vpc,client,node1,node2,pod1..4}`.
    /// Leftover namespaces of dead processes with the same prefix are removed first.
    pub fn build(prefix: &str) -> Result<Lab> {
        let started = Instant::now();
        remove_stale(prefix);
        let tools = dataplane::load_tools().context("loading the tools object (xdp_pass)")?;
        let base = unique_name(prefix);
        let ns = |role: &str| Netns::create(&format!("{base}-{role}"));
        let vpc = ns("vpc")?;
        let client = ns("client")?;
        let node1 = ns("node1")?;
        let node2 = ns("node2")?;
        let node = |id: NodeId, ns: Netns| Node {
            id,
            ns,
            ipv4: id.ipv4(),
            ipv6: id.ipv6(),
            uplink: NODE_UPLINK,
            uplink_mac: [0; 6],
            uplink_ifindex: 0,
            uplink_peer: id.uplink_peer(),
            uplink_peer_mac: [0; 6],
        };
        // From here on a failure drops `lab`, which deletes whatever exists.
        let mut lab = Lab {
            base,
            build_time: Duration::ZERO,
            tools: Some(tools),
            links: HashMap::new(),
            pods: Vec::new(),
            node1: node(NodeId::Node1, node1),
            node2: node(NodeId::Node2, node2),
            client: Client {
                ns: client,
                ipv4: (10..=14).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect(),
                ipv6: (0x10..=0x14)
                    .map(|i| Ipv6Addr::new(0xfd00, 0xa, 0, 0, 0, 0, 0, i))
                    .collect(),
                mac: [0; 6],
            },
            vpc,
        };
        lab.configure_vpc()?;
        lab.configure_client()?;
        for id in NodeId::ALL {
            lab.configure_node(id)?;
        }
        for (node, name, last) in [
            (NodeId::Node1, "pod1", 2),
            (NodeId::Node1, "pod2", 3),
            (NodeId::Node2, "pod3", 2),
            (NodeId::Node2, "pod4", 3),
        ] {
            let (v4, _) = node.pod_cidr_v4();
            let (v6, _) = node.pod_cidr_v6();
            let v4 = Ipv4Addr::from(u32::from(v4) | last);
            let v6 = Ipv6Addr::from(u128::from(v6) | u128::from(last));
            lab.add_pod(node, name, v4, v6)?;
        }
        lab.wait_ready()?;
        lab.build_time = started.elapsed();
        Ok(lab)
    }

    /// `PREFIX-PID-N`, the common part of this lab's namespace names.
    pub fn name(&self) -> &str {
        &self.base
    }

    /// How long `build` took.
    pub fn build_time(&self) -> Duration {
        self.build_time
    }

    pub fn vpc(&self) -> &Netns {
        &self.vpc
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn node(&self, id: NodeId) -> &Node {
        match id {
            NodeId::Node1 => &self.node1,
            NodeId::Node2 => &self.node2,
        }
    }

    pub fn node1(&self) -> &Node {
        &self.node1
    }

    pub fn node2(&self) -> &Node {
        &self.node2
    }

    /// The interface a load balancer on node1 attaches to: `eth0` in node1's namespace.
    pub fn node1_uplink(&self) -> &str {
        self.node1.uplink
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    pub fn pods_on(&self, node: NodeId) -> impl Iterator<Item = &Pod> {
        self.pods.iter().filter(move |p| p.node == node)
    }

    /// The tools object (xdp_pass, xdp_drop, xdp_tx, xdp_count), for tests that attach more.
    pub fn tools_mut(&mut self) -> &mut Ebpf {
        self.tools.as_mut().expect("tools live as long as the lab")
    }

    /// Adds a pod on `node` (a new backend): its namespace, veth pair, addresses, routes and
    /// `xdp_pass` on its `eth0`. The addresses must lie in the node's pod CIDRs, which is what the
    /// client and the other node route to it.
    pub fn add_pod(
        &mut self,
        node: NodeId,
        name: &str,
        v4: Ipv4Addr,
        v6: Ipv6Addr,
    ) -> Result<&Pod> {
        ensure!(
            !name.is_empty()
                && name.len() <= MAX_POD_NAME
                && name.bytes().all(|b| b.is_ascii_alphanumeric()),
            "pod name {name:?}: 1..={MAX_POD_NAME} ASCII letters and digits"
        );
        ensure!(self.pod(name).is_none(), "pod {name} exists");
        ensure!(
            in_v4(v4, node.pod_cidr_v4()) && in_v6(v6, node.pod_cidr_v6()),
            "pod {name}: {v4} / {v6} outside {}'s pod CIDRs",
            node.name()
        );
        let ns = Netns::create(&format!("{}-{name}", self.base))?;
        ns.sysctls(COMMON_SYSCTLS)?;
        let host_veth = format!("veth{name}");
        let node_ns = &self.node(node).ns;
        // The pair is created inside the namespaces: no name ever appears in the host's. The IPv6
        // gateway is a link-local on the host veth (every host veth may carry the same fe80::1);
        // IPv4 needs no address there, as with the VPC CNI: the pod's neighbour entry for
        // 169.254.1.1 is permanent, so nobody ever asks for it, and the node's own ARP requests
        // for the pod borrow its uplink address.
        node_ns.ip_batch(&[
            format!(
                "link add {host_veth} type veth peer name {POD_IFACE} netns {}",
                ns.name()
            ),
            format!("link set {host_veth} up"),
            format!("addr add {POD_GATEWAY_V6}/64 dev {host_veth} nodad"),
            format!("route add {v4}/32 dev {host_veth}"),
            format!("route add {v6}/128 dev {host_veth}"),
        ])?;
        let (host_veth_mac, host_veth_ifindex) = link_info(node_ns, &host_veth)?;
        let host_mac = fmt_mac(host_veth_mac);
        ns.ip_batch(&[
            format!("link set {POD_IFACE} up"),
            format!("addr add {v4}/32 dev {POD_IFACE}"),
            format!("addr add {v6}/128 dev {POD_IFACE} nodad"),
            format!("neigh add {POD_GATEWAY_V4} lladdr {host_mac} dev {POD_IFACE} nud permanent"),
            format!("route add default via {POD_GATEWAY_V4} dev {POD_IFACE} onlink"),
            format!("neigh add {POD_GATEWAY_V6} lladdr {host_mac} dev {POD_IFACE} nud permanent"),
            format!("route add ::/0 via {POD_GATEWAY_V6} dev {POD_IFACE}"),
        ])?;
        let (mac, _) = link_info(&ns, POD_IFACE)?;
        let pod = Pod {
            name: name.to_string(),
            node,
            ipv4: v4,
            ipv6: v6,
            host_veth,
            host_veth_mac,
            host_veth_ifindex,
            mac,
            ns,
        };
        attach_pass(&mut self.tools, &mut self.links, &pod.ns, POD_IFACE, false)?;
        self.pods.push(pod);
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Takes `xdp_pass` off a pod's `eth0`, making it like a VPC CNI pod: frames XDP redirects
    /// into its veth are then delivered only once GRO is on at its end (which the agent does).
    pub fn detach_pod_xdp(&mut self, name: &str) -> Result<()> {
        let pod = self.pod(name).with_context(|| format!("no pod {name}"))?;
        let key = (pod.ns.name().to_string(), POD_IFACE.to_string());
        let id = self
            .links
            .remove(&key)
            .with_context(|| format!("pod {name} has no xdp_pass"))?;
        let program = dataplane::program_mut(self.tools_mut(), "xdp_pass")?;
        program.detach(id).context("detaching xdp_pass")?;
        Ok(())
    }

    /// Removes a pod: its XDP link, its veth pair (synchronously, so the name can be reused at
    /// once) and its namespace.
    pub fn remove_pod(&mut self, name: &str) -> Result<()> {
        let Some(i) = self.pods.iter().position(|p| p.name == name) else {
            bail!("no pod {name}");
        };
        let pod = self.pods.remove(i);
        if let Some(id) = self
            .links
            .remove(&(pod.ns.name().to_string(), POD_IFACE.to_string()))
        {
            let program = dataplane::program_mut(self.tools_mut(), "xdp_pass")?;
            program.detach(id).context("detaching xdp_pass")?;
        }
        self.node(pod.node)
            .ns
            .ip(&["link", "del", &pod.host_veth])?;
        drop(pod);
        Ok(())
    }

    fn configure_vpc(&mut self) -> Result<()> {
        self.vpc.sysctls(COMMON_SYSCTLS)?;
        self.vpc.sysctls(VPC_SYSCTLS)?;
        // No STP (ports forward at once); no multicast snooping, so neighbour discovery floods.
        self.vpc.ip_batch(&[
            format!("link add {BRIDGE} type bridge stp_state 0 mcast_snooping 0"),
            format!("link set {BRIDGE} up"),
        ])
    }

    /// Creates `eth0` in `ns` and its peer `port` in ns vpc, enslaved to the bridge, both up;
    /// then `more` commands in `ns`.
    fn plug_into_vpc(&self, ns: &Netns, port: &str, more: &[String]) -> Result<()> {
        let vpc = self.vpc.name();
        self.vpc
            .ip_batch(&[
                format!(
                    "link add {port} type veth peer name eth0 netns {}",
                    ns.name()
                ),
                format!("link set {port} master {BRIDGE}"),
                format!("link set {port} up"),
            ])
            .with_context(|| format!("plugging {} into {vpc}", ns.name()))?;
        let mut lines = vec!["link set eth0 up".to_string()];
        lines.extend_from_slice(more);
        ns.ip_batch(&lines)
    }

    fn configure_client(&mut self) -> Result<()> {
        let c = &self.client;
        c.ns.sysctls(COMMON_SYSCTLS)?;
        c.ns.sysctls(CLIENT_SYSCTLS)?;
        let mut lines: Vec<String> = c
            .ipv4
            .iter()
            .map(|a| format!("addr add {a}/24 dev {CLIENT_IFACE}"))
            .collect();
        lines.extend(
            c.ipv6
                .iter()
                .map(|a| format!("addr add {a}/64 dev {CLIENT_IFACE} nodad")),
        );
        // VIPs go to node1 (where the load balancer runs); pod CIDRs to their node, as the VPC
        // routes secondary ENI addresses with the AWS VPC CNI.
        let node1 = NodeId::Node1;
        lines.push(format!(
            "route add {} via {}",
            cidr(VIP_RANGE_V4),
            node1.ipv4()
        ));
        lines.push(format!(
            "route add {} via {}",
            cidr(VIP_RANGE_V6),
            node1.ipv6()
        ));
        for id in NodeId::ALL {
            lines.push(format!(
                "route add {} via {}",
                cidr(id.pod_cidr_v4()),
                id.ipv4()
            ));
            lines.push(format!(
                "route add {} via {}",
                cidr(id.pod_cidr_v6()),
                id.ipv6()
            ));
        }
        self.plug_into_vpc(&c.ns, "veth-client", &lines)?;
        let (mac, _) = link_info(&c.ns, CLIENT_IFACE)?;
        self.client.mac = mac;
        Ok(())
    }

    fn configure_node(&mut self, id: NodeId) -> Result<()> {
        let node = self.node(id);
        node.ns.sysctls(COMMON_SYSCTLS)?;
        node.ns.sysctls(NODE_SYSCTLS)?;
        let other = id.other();
        let lines = [
            format!("addr add {}/24 dev {NODE_UPLINK}", node.ipv4),
            format!("addr add {}/64 dev {NODE_UPLINK} nodad", node.ipv6),
            format!(
                "route add {} via {}",
                cidr(other.pod_cidr_v4()),
                other.ipv4()
            ),
            format!(
                "route add {} via {}",
                cidr(other.pod_cidr_v6()),
                other.ipv6()
            ),
        ];
        self.plug_into_vpc(&node.ns, &node.uplink_peer, &lines)?;
        let (mac, ifindex) = link_info(&node.ns, NODE_UPLINK)?;
        let (peer_mac, _) = link_info(&self.vpc, &node.uplink_peer)?;
        let peer = node.uplink_peer.clone();
        let node = match id {
            NodeId::Node1 => &mut self.node1,
            NodeId::Node2 => &mut self.node2,
        };
        node.uplink_mac = mac;
        node.uplink_ifindex = ifindex;
        node.uplink_peer_mac = peer_mac;
        // The bridge port receives what the node's data path XDP_TXes or redirects out of eth0.
        attach_pass(&mut self.tools, &mut self.links, &self.vpc, &peer, true)
    }

    /// Waits until no address of the lab is tentative (DAD is off, so this is a safety net).
    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut all: Vec<&Netns> = vec![&self.client.ns, &self.node1.ns, &self.node2.ns];
        all.extend(self.pods.iter().map(|p| &p.ns));
        for ns in all {
            loop {
                let tentative = ns.ip(&["-6", "addr", "show", "tentative"])?;
                if tentative.trim().is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{}: addresses still tentative:\n{tentative}", ns.name());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The links are bpf_links: dropping them is a close(), valid whether or not their
        // interfaces still exist. Then the pods (their namespaces take the veth pairs along),
        // and the remaining fields in declaration order: nodes, client, vpc.
        self.links.clear();
        self.tools.take();
        self.pods.clear();
    }
}

/// Prepares a veth end that faces a data path: `xdp_pass` (native mode) so frames redirected
/// or sent back into it are delivered. With `complete_checksums`, also TX checksum offload off,
/// so frames it sends into an XDP program carry complete checksums as frames from a real NIC
/// do (see `netns::tx_checksum_off`); pods keep the offload, as real pods do (their replies
/// meet `lb_backend` at TC, which handles partial checksums). The name resolves, and the link
/// is created, in the namespace of the calling thread: hence the thread inside `ns`.
fn attach_pass(
    tools: &mut Option<Ebpf>,
    links: &mut HashMap<(String, String), XdpLinkId>,
    ns: &Netns,
    ifname: &str,
    complete_checksums: bool,
) -> Result<()> {
    let tools = tools.as_mut().expect("tools live as long as the lab");
    let program = dataplane::program_mut(tools, "xdp_pass")?;
    let id = ns
        .run(|| {
            if complete_checksums {
                crate::netns::tx_checksum_off(ifname)?;
            }
            program
                .attach(ifname, XdpMode::Driver)
                .map_err(anyhow::Error::from)
        })?
        .with_context(|| format!("attaching xdp_pass to {ifname} in {}", ns.name()))?;
    links.insert((ns.name().to_string(), ifname.to_string()), id);
    Ok(())
}

fn cidr<A: std::fmt::Display>((addr, len): (A, u8)) -> String {
    format!("{addr}/{len}")
}

fn in_v4(a: Ipv4Addr, (net, len): (Ipv4Addr, u8)) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(a) & mask == u32::from(net) & mask
}

fn in_v6(a: Ipv6Addr, (net, len): (Ipv6Addr, u8)) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    u128::from(a) & mask == u128::from(net) & mask
}

pub fn fmt_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    ensure!(parts.len() == 6, "bad MAC {s:?}");
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC {s:?}"))?;
    }
    Ok(mac)
}

/// MAC and ifindex of `ifname` in `ns`, from `ip -j link show`.
pub fn link_info(ns: &Netns, ifname: &str) -> Result<([u8; 6], u32)> {
    let out = ns.ip(&["-j", "link", "show", "dev", ifname])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing `ip -j link`")?;
    let link = &v[0];
    let mac = link["address"]
        .as_str()
        .with_context(|| format!("{ifname}: no address in {out}"))?;
    let ifindex = link["ifindex"]
        .as_u64()
        .with_context(|| format!("{ifname}: no ifindex in {out}"))?;
    Ok((parse_mac(mac)?, u32::try_from(ifindex)?))
}
