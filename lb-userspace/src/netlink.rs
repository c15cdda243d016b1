//! Blocking rtnetlink client: route lookups, addresses, links and managed neighbour entries;
//! and [`Monitor`], a socket subscribed to the kernel's notifications about links, addresses,
//! routes and neighbours. Owns the wire protocol (requests, multi-part dumps, ACKs, kernel
//! errors, notifications); holds no policy — callers decide what to do with what it reports.
//!
//! A netlink socket belongs to the network namespace of the thread that created it, for its
//! whole life: call [`Netlink::open`] on a thread that is in the namespace you mean to query
//! (a thread that later `setns`es elsewhere keeps talking to the namespace the socket was made
//! in).
use std::{collections::HashMap, io, net::IpAddr, time::Duration};

use bytes::BytesMut;
use netlink_packet_core::{
    DefaultNla, NLA_TYPE_MASK, NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, Nla, NlaBuffer, NlasIterator,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage, AddressScope},
    link::{
        InfoData, InfoVlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp, XdpAttached,
    },
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    nsid::{NsidAttribute, NsidMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType, RouteVia},
    tc::{TcAttribute, TcHandle, TcMessage, TcOption},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// A reply that never comes would block the agent's reconcile loop forever; the kernel answers
/// rtnetlink requests synchronously, so a few seconds without a datagram means something is wrong.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// A dump that races with changes is flagged NLM_F_DUMP_INTR and may miss or repeat entries;
/// retrying a few times is what iproute2 users do by hand.
const DUMP_ATTEMPTS: u32 = 3;
/// Room for one datagram before growing: the kernel caps dump datagrams at 32 KiB unless a
/// single message is bigger (links with many VFs), in which case the buffer grows to fit.
const RECV_BUFFER: usize = 32 * 1024;

/// NDA_FLAGS_EXT: neighbour flags beyond the 8 bits of ndm_flags (linux/neighbour.h).
const NDA_FLAGS_EXT: u16 = 15;
/// NTF_EXT_MANAGED: the kernel resolves the entry itself and keeps it resolved (Linux 5.16).
const NTF_EXT_MANAGED: u32 = 1;
/// NLMSGERR_ATTR_MSG: the human-readable reason in an extended ACK.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// Size of struct nlmsghdr, echoed at the start of an error when NLM_F_CAPPED is set.
const NLMSG_HEADER_LEN: usize = 16;
/// TCA_BPF_NAME: a cls_bpf filter's program name, in its TCA_OPTIONS (linux/pkt_cls.h).
const TCA_BPF_NAME: u16 = 7;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a NETLINK_ROUTE socket: {0}")]
    Open(#[source] io::Error),
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("{op}: {}{}", io::Error::from_raw_os_error(*.errno), extack_suffix(.message.as_deref()))]
    Kernel {
        op: String,
        /// Positive errno the kernel answered with.
        errno: i32,
        /// The kernel's extended-ACK message, when it gave one.
        message: Option<String>,
    },
    #[error("{op}: decoding the kernel's reply: {reason}")]
    Decode { op: String, reason: String },
    #[error("{op}: no reply from the kernel within {timeout:?}")]
    Timeout { op: String, timeout: Duration },
    #[error("{op}: the dump kept changing while being read (NLM_F_DUMP_INTR), {attempts} attempts")]
    DumpInterrupted { op: String, attempts: u32 },
}

impl NetlinkError {
    /// The errno behind the failure, if the kernel or a syscall gave one: lets callers tell
    /// cases apart without matching message text.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            NetlinkError::Open(source) | NetlinkError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    fn decode(op: &str, reason: impl std::fmt::Display) -> Self {
        NetlinkError::Decode {
            op: op.to_string(),
            reason: reason.to_string(),
        }
    }
}

fn extack_suffix(message: Option<&str>) -> String {
    match message {
        Some(m) => format!("; the kernel says: {m}"),
        None => String::new(),
    }
}

/// What the kernel would use to reach a destination (`ip route get`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    /// Output interface; the loopback device for local destinations.
    pub oif: u32,
    /// Next hop, if the destination is not directly connected.
    pub gateway: Option<IpAddr>,
    /// Source address the kernel would pick.
    pub prefsrc: Option<IpAddr>,
    pub kind: RouteKind,
}

/// The rtm_type of the answer. Linux answers a route get that hits a blackhole or unreachable
/// route with an error instead (see [`Netlink::route_get`]), so `Blackhole` and `Unreachable`
/// only appear if a kernel ever reports them as routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteKind {
    Unicast,
    Local,
    Blackhole,
    Unreachable,
    /// Broadcast, multicast, prohibit, throw, ...
    Other,
}

/// A default route (destination prefix length 0) of the main routing table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefaultRoute {
    pub v6: bool,
    /// Output interfaces: one, or a multipath route's next hops'.
    pub oifs: Vec<u32>,
    /// RTA_PRIORITY (lower wins); 0 when absent.
    pub metric: u32,
}

/// One address on one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfAddr {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
    /// Scope universe: usable beyond this host and link.
    pub global: bool,
}

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// IFLA_INFO_KIND ("veth", "vlan", "bridge", ...); None for physical devices and loopback.
    pub kind: Option<String>,
    pub mtu: u32,
    /// Administratively up (IFF_UP), whether or not it has carrier.
    pub up: bool,
    /// Ethernet address; None for devices without one (loopback's all-zero address included).
    pub mac: Option<[u8; 6]>,
    /// (parent ifindex from IFLA_LINK, VLAN id) for vlan devices.
    pub vlan: Option<(u32, u16)>,
    /// For a veth whose other end is in another namespace: (that end's ifindex there, the
    /// namespace's id as seen from here; IFLA_LINK and IFLA_LINK_NETNSID).
    pub peer: Option<(u32, i32)>,
    /// The mode an attached XDP program runs in ("native", "generic", "offload", "multi";
    /// IFLA_XDP_ATTACHED), if one is.
    pub xdp: Option<&'static str>,
}

/// A NETLINK_ROUTE socket and the sequence number of its last request.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    /// Received datagrams, and requests being sent: reused, so a request allocates nothing
    /// once they have grown to the largest message seen.
    buf: BytesMut,
    out: BytesMut,
    /// The answers of [`Netlink::route`] since the routes last changed (as far as the agent
    /// was told: [`Netlink::forget_routes`]).
    routes: RouteAnswers,
}

/// Route answers by destination, each distinct answer kept once: backends behind one gateway
/// all get the same answer (at 10,000 Services x 10 endpoints, 100,000 destinations and one
/// answer; 8 MiB with an answer per destination, 3 MiB so).
#[derive(Default)]
struct RouteAnswers {
    by_dst: HashMap<IpAddr, u32>,
    answers: Vec<Option<Route>>,
    ids: HashMap<Option<Route>, u32>,
}

impl RouteAnswers {
    fn get(&self, dst: &IpAddr) -> Option<&Option<Route>> {
        self.by_dst.get(dst).map(|id| &self.answers[*id as usize])
    }

    fn len(&self) -> usize {
        self.by_dst.len()
    }

    fn insert(&mut self, dst: IpAddr, route: Option<Route>) {
        let next = u32::try_from(self.answers.len()).expect("fewer answers than destinations");
        let id = *self.ids.entry(route).or_insert_with_key(|route| {
            self.answers.push(route.clone());
            next
        });
        self.by_dst.insert(dst, id);
    }
}

/// How many route answers are kept at most (then all are forgotten and asked again): a bound
/// for a node whose backends come and go for long.
const ROUTES_KEPT: usize = 1 << 20;

/// One neighbour entry as the kernel has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub addr: IpAddr,
    /// NTF_EXT_MANAGED: the kernel resolves it and keeps it resolved (we make them so).
    pub managed: bool,
    /// The NUD state bits (NUD_PERMANENT, NUD_REACHABLE, ...).
    pub state: u16,
}

/// A classic TC filter on an interface's clsact ingress or egress hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcFilter {
    pub ingress: bool,
    pub priority: u16,
    pub handle: u32,
    /// "bpf", "u32", "flower", ...
    pub kind: String,
    /// For a cls_bpf filter: its program's name (as the loader named it, truncated by the
    /// kernel to 15 bytes).
    pub bpf_name: Option<String>,
}

/// How a request ended, before the dump-retry decision.
struct Replies {
    messages: Vec<RouteNetlinkMessage>,
    interrupted: bool,
}

impl Netlink {
    /// Opens a socket in the network namespace of the calling thread (see the module docs).
    pub fn open() -> Result<Netlink, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Open)?;
        socket.bind_auto().map_err(NetlinkError::Open)?;
        // Both only make errors smaller and more telling (a reason string, no echoed request);
        // kernels without them still answer, so failing to set them is not fatal.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        set_recv_timeout(&socket, RECV_TIMEOUT).map_err(NetlinkError::Open)?;
        Ok(Netlink {
            socket,
            seq: 0,
            buf: BytesMut::with_capacity(RECV_BUFFER),
            out: BytesMut::new(),
            routes: RouteAnswers::default(),
        })
    }

    /// [`Netlink::route_get`], answered from what it said last time until
    /// [`Netlink::forget_routes`]: every apply needs every backend's route (whether it is local,
    /// its next hop), and asking the kernel for each of 20,000 backends twice per apply cost
    /// most of an endpoint change. Errors are not kept.
    pub fn route(&mut self, dst: IpAddr) -> Result<Option<Route>, NetlinkError> {
        if let Some(known) = self.routes.get(&dst) {
            return Ok(known.clone());
        }
        let route = self.route_get(dst)?;
        if self.routes.len() >= ROUTES_KEPT {
            self.routes = RouteAnswers::default();
        }
        self.routes.insert(dst, route.clone());
        Ok(route)
    }

    /// Routes, rules, addresses or links changed (or notifications were lost): the next
    /// [`Netlink::route`] asks the kernel again.
    pub fn forget_routes(&mut self) {
        self.routes = RouteAnswers::default();
    }

    /// Like `ip route get DST`: what the kernel would use to reach `dst`, policy rules included.
    ///
    /// `None` if there is no route (ENETUNREACH) or the route is an `unreachable` one
    /// (EHOSTUNREACH). The kernel never answers a route get with a blackhole or prohibit route:
    /// it fails with EINVAL and EACCES respectively, which come back as
    /// [`NetlinkError::Kernel`] (see [`NetlinkError::errno`]).
    pub fn route_get(&mut self, dst: IpAddr) -> Result<Option<Route>, NetlinkError> {
        let op = format!("route get {dst}");
        let mut request = RouteMessage::default();
        request.header.address_family = family(dst);
        request.header.destination_prefix_length = full_prefix(dst);
        request
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst)));
        let replies = match self.transact(&op, &RouteNetlinkMessage::GetRoute(request), 0) {
            Ok(replies) => replies.messages,
            Err(e) if matches!(e.errno(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        replies
            .iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewRoute(route) => Some(route_from_message(route)),
                _ => None,
            })
            .map(Some)
            .ok_or_else(|| NetlinkError::decode(&op, "the kernel acknowledged without a route"))
    }

    /// All addresses on all interfaces, both families (RTM_GETADDR dump).
    pub fn addresses(&mut self) -> Result<Vec<IfAddr>, NetlinkError> {
        let replies = self.dump(
            "address dump",
            &RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        )?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => address_from_message(a),
                _ => None,
            })
            .collect())
    }

    /// The id this namespace has for the network namespace `ns_fd` refers to (RTM_GETNSID);
    /// `None` if it has none.
    pub fn nsid_of(
        &mut self,
        ns_fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Option<i32>, NetlinkError> {
        use std::os::fd::AsRawFd;
        let mut request = NsidMessage::default();
        request
            .attributes
            .push(NsidAttribute::Fd(ns_fd.as_raw_fd().cast_unsigned()));
        let replies = self.transact("get nsid", &RouteNetlinkMessage::GetNsId(request), 0)?;
        Ok(replies.messages.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewNsId(n) => n.attributes.iter().find_map(|a| match a {
                NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                _ => None,
            }),
            _ => None,
        }))
    }

    /// The unicast default routes of the main table, both families (RTM_GETROUTE dump).
    pub fn default_routes(&mut self) -> Result<Vec<DefaultRoute>, NetlinkError> {
        /// RT_TABLE_MAIN (linux/rtnetlink.h).
        const MAIN: u32 = 254;
        let replies = self.dump(
            "route dump",
            &RouteNetlinkMessage::GetRoute(RouteMessage::default()),
        )?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })
            .filter(|r| {
                // RTA_TABLE holds tables above 255; rtm_table the rest.
                let table = r
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(r.header.table));
                table == MAIN
                    && r.header.destination_prefix_length == 0
                    && r.header.kind == RouteType::Unicast
            })
            .map(|r| {
                let mut route = DefaultRoute {
                    v6: r.header.address_family == AddressFamily::Inet6,
                    oifs: Vec::new(),
                    metric: 0,
                };
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Oif(oif) => route.oifs.push(*oif),
                        RouteAttribute::MultiPath(hops) => {
                            route.oifs.extend(hops.iter().map(|h| h.interface_index));
                        }
                        RouteAttribute::Priority(metric) => route.metric = *metric,
                        _ => {}
                    }
                }
                route
            })
            .collect())
    }

    /// All links (RTM_GETLINK dump).
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let replies = self.dump(
            "link dump",
            &RouteNetlinkMessage::GetLink(LinkMessage::default()),
        )?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from_message(l)),
                _ => None,
            })
            .collect())
    }

    /// Like `ip neigh add ADDR dev IFINDEX managed`: the kernel resolves the entry and keeps it
    /// resolved, so XDP's `bpf_fib_lookup` finds a MAC for it. Never replaces an entry: if one
    /// exists for the address (someone else's static entry, one the kernel learned, or ours),
    /// it is left as it is and this returns false; true if it made one.
    pub fn add_managed_neighbour(
        &mut self,
        ifindex: u32,
        addr: IpAddr,
    ) -> Result<bool, NetlinkError> {
        let op = format!("neighbour add {addr} dev {ifindex} managed");
        let mut request = neighbour_request(ifindex, addr);
        // NUD_NONE, as iproute2 sends: the kernel rejects managed together with
        // NUD_PERMANENT, and for a managed entry it runs the state machine itself.
        request.header.state = NeighbourState::None;
        request
            .attributes
            .push(NeighbourAttribute::Other(DefaultNla::new(
                NDA_FLAGS_EXT,
                NTF_EXT_MANAGED.to_ne_bytes().to_vec(),
            )));
        match self.transact(
            &op,
            &RouteNetlinkMessage::NewNeighbour(request),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes a neighbour entry we made managed. Absent entries are fine; entries that are not
    /// managed are left alone, because we did not make them (a CNI's static entry, or one the
    /// kernel learned and maintains).
    pub fn remove_neighbour(&mut self, ifindex: u32, addr: IpAddr) -> Result<(), NetlinkError> {
        match self.neighbour(ifindex, addr)? {
            Some(entry) if is_managed(&entry) => {}
            Some(_) => {
                log::debug!("neighbour {addr} dev {ifindex} is not managed: left in place");
                return Ok(());
            }
            None => return Ok(()),
        }
        let op = format!("neighbour delete {addr} dev {ifindex}");
        match self.transact(
            &op,
            &RouteNetlinkMessage::DelNeighbour(neighbour_request(ifindex, addr)),
            0,
        ) {
            Ok(_) => Ok(()),
            // Gone between the look-up and the delete: what we wanted.
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The classic TC filters on `ifindex`'s clsact hooks (ingress and egress). None when the
    /// interface has no clsact qdisc.
    pub fn clsact_filters(&mut self, ifindex: u32) -> Result<Vec<TcFilter>, NetlinkError> {
        let mut found = Vec::new();
        for (ingress, minor) in [(true, TcHandle::MIN_INGRESS), (false, TcHandle::MIN_EGRESS)] {
            let mut request = TcMessage::default();
            request.header.index = ifindex.cast_signed();
            request.header.parent = TcHandle {
                major: TcHandle::CLSACT.major,
                minor,
            };
            let op = format!(
                "tc filter dump dev {ifindex} {}",
                if ingress { "ingress" } else { "egress" }
            );
            let replies = match self.dump(&op, &RouteNetlinkMessage::GetTrafficFilter(request)) {
                Ok(replies) => replies,
                // No clsact qdisc (or no such interface): no filters.
                Err(e) if matches!(e.errno(), Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)) => {
                    continue;
                }
                Err(e) => return Err(e),
            };
            found.extend(replies.iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewTrafficFilter(f) => tc_filter(f, ingress),
                _ => None,
            }));
        }
        Ok(found)
    }

    /// Like `tc qdisc del dev IFINDEX clsact`: removes the clsact qdisc and every filter on it.
    /// Absent is fine.
    pub fn delete_clsact(&mut self, ifindex: u32) -> Result<(), NetlinkError> {
        let mut request = TcMessage::default();
        request.header.index = ifindex.cast_signed();
        request.header.parent = TcHandle::CLSACT;
        request.header.handle = TcHandle {
            major: TcHandle::CLSACT.major,
            minor: 0,
        };
        // The kernel refuses the request if the qdisc there is of another kind.
        request
            .attributes
            .push(TcAttribute::Kind("clsact".to_string()));
        match self.transact(
            &format!("tc qdisc del dev {ifindex} clsact"),
            &RouteNetlinkMessage::DelQueueDiscipline(request),
            0,
        ) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Every neighbour entry in this namespace (IPv4 and IPv6; one dump).
    pub fn neighbours(&mut self) -> Result<Vec<Neighbour>, NetlinkError> {
        let replies = self.dump(
            "neighbour dump",
            &RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
        )?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => neighbour_from_message(n),
                _ => None,
            })
            .collect())
    }

    /// Managed entries present in this namespace, as (ifindex, addr).
    pub fn managed_neighbours(&mut self) -> Result<Vec<(u32, IpAddr)>, NetlinkError> {
        Ok(self
            .neighbours()?
            .into_iter()
            .filter(|n| n.managed)
            .map(|n| (n.ifindex, n.addr))
            .collect())
    }

    /// One neighbour entry (RTM_GETNEIGH for a single address), None if there is none.
    fn neighbour(
        &mut self,
        ifindex: u32,
        addr: IpAddr,
    ) -> Result<Option<NeighbourMessage>, NetlinkError> {
        let op = format!("neighbour get {addr} dev {ifindex}");
        let replies = match self.transact(
            &op,
            &RouteNetlinkMessage::GetNeighbour(neighbour_request(ifindex, addr)),
            0,
        ) {
            Ok(replies) => replies.messages,
            Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(replies.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) => Some(n),
            _ => None,
        }))
    }

    /// A dump, retried while the kernel flags it as interrupted by concurrent changes.
    fn dump(
        &mut self,
        op: &str,
        request: &RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        for _ in 0..DUMP_ATTEMPTS {
            let replies = self.transact(op, request, NLM_F_DUMP)?;
            if !replies.interrupted {
                return Ok(replies.messages);
            }
            log::debug!("{op}: interrupted by concurrent changes, retrying");
        }
        Err(NetlinkError::DumpInterrupted {
            op: op.to_string(),
            attempts: DUMP_ATTEMPTS,
        })
    }

    /// Sends one request and collects its replies: up to NLMSG_DONE for a dump, up to the ACK
    /// (NLMSG_ERROR with code 0) otherwise — every non-dump request asks for one, so the end of
    /// the answer is never guessed.
    fn transact(
        &mut self,
        op: &str,
        request: &RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Replies, NetlinkError> {
        self.send(op, request, flags)?;
        let mut replies = Replies {
            messages: Vec::new(),
            interrupted: false,
        };
        // A reply we cannot decode is remembered, not returned at once: the rest of the answer
        // has to be read first, or an abandoned dump keeps the socket busy (the next dump gets
        // EBUSY) and its leftovers are read as answers to the next request.
        let mut undecodable: Option<NetlinkError> = None;
        loop {
            let len = self.recv_datagram(op)?;
            for frame in frames(&self.buf[..len]) {
                let msg = match frame {
                    Frame::Message { seq, .. } if seq != self.seq => {
                        // A late answer to an earlier request that timed out: not ours to read.
                        log::debug!(
                            "{op}: skipping a reply with sequence {seq}, want {}",
                            self.seq
                        );
                        continue;
                    }
                    Frame::Message { message: Ok(m), .. } => m,
                    Frame::Message {
                        message: Err(e), ..
                    }
                    | Frame::Broken(e) => {
                        undecodable.get_or_insert(NetlinkError::decode(op, e));
                        continue;
                    }
                };
                match take_reply(op, msg, &mut replies)? {
                    Step::More => {}
                    Step::Done => {
                        return match undecodable {
                            Some(e) => Err(e),
                            None => Ok(replies),
                        };
                    }
                }
            }
        }
    }

    /// Sends one request with a new sequence number (ACK asked for unless it is a dump).
    fn send(
        &mut self,
        op: &str,
        request: &RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let is_dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if is_dump { 0 } else { NLM_F_ACK };
        header.sequence_number = self.seq;
        let mut message = NetlinkMessage::new(header, NetlinkPayload::from(request.clone()));
        message.finalize();
        self.out.clear();
        self.out.resize(message.buffer_len(), 0);
        message.serialize(&mut self.out);
        let kernel = SocketAddr::new(0, 0);
        loop {
            match self.socket.send_to(&self.out, &kernel, 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(NetlinkError::Io {
                        op: op.to_string(),
                        source,
                    });
                }
            }
        }
    }

    /// Reads one whole datagram into `self.buf`.
    fn recv_datagram(&mut self, op: &str) -> Result<usize, NetlinkError> {
        recv_whole(&self.socket, &mut self.buf).map_err(|source| {
            if source.kind() == io::ErrorKind::WouldBlock {
                NetlinkError::Timeout {
                    op: op.to_string(),
                    timeout: RECV_TIMEOUT,
                }
            } else {
                NetlinkError::Io {
                    op: op.to_string(),
                    source,
                }
            }
        })
    }
}

/// Reads one whole datagram into `buf`, growing it first if the datagram is bigger.
fn recv_whole(socket: &Socket, buf: &mut BytesMut) -> io::Result<usize> {
    let recv = |buf: &mut BytesMut, flags| loop {
        match socket.recv(buf, flags) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    };
    // MSG_PEEK | MSG_TRUNC returns the datagram's full size without consuming it, so a
    // message bigger than the buffer is never cut short.
    buf.clear();
    let size = recv(buf, libc::MSG_PEEK | libc::MSG_TRUNC)?;
    buf.clear();
    buf.reserve(size);
    // This socket has a single reader, so the datagram read is the one just peeked at;
    // without MSG_TRUNC the kernel would cut a longer one silently, hence the comparison.
    let len = recv(buf, 0)?;
    if len < size {
        return Err(io::Error::other(format!(
            "datagram of {size} bytes truncated to {len}"
        )));
    }
    Ok(len)
}

/// rtnetlink multicast groups (linux/rtnetlink.h, `enum rtnetlink_groups`).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV4_RULE: u32 = 8;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const RTNLGRP_IPV6_RULE: u32 = 19;
/// Room for a burst of notifications (a flush of thousands of neighbour entries) before the
/// kernel drops some and says so with ENOBUFS.
const MONITOR_BUFFER: usize = 4 << 20;

/// What a notification tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A link appeared, changed (administrative state, carrier, name, XDP) or went.
    Link { ifindex: u32 },
    /// An address was added or removed.
    Address,
    /// A route or a policy rule was added or removed.
    Route,
    /// A neighbour entry was deleted (a flush, carrier loss, the interface going down).
    NeighbourGone { ifindex: u32, addr: IpAddr },
    /// A neighbour entry was made or changed, as it is now.
    Neighbour(Neighbour),
    /// The kernel dropped notifications (the socket's buffer was full): anything may have
    /// changed.
    Overrun,
}

/// A socket subscribed to the kernel's notifications about links, addresses, routes, policy
/// rules and neighbours (both families), in the network namespace it was opened in.
/// Non-blocking: poll its descriptor for readability, then [`Monitor::read`].
pub struct Monitor {
    socket: Socket,
    buf: BytesMut,
}

impl Monitor {
    pub fn open() -> Result<Monitor, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Open)?;
        socket.bind_auto().map_err(NetlinkError::Open)?;
        for group in [
            RTNLGRP_LINK,
            RTNLGRP_NEIGH,
            RTNLGRP_IPV4_IFADDR,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV6_IFADDR,
            RTNLGRP_IPV6_ROUTE,
            // Policy rules change where a backend is routed as routes do.
            RTNLGRP_IPV4_RULE,
            RTNLGRP_IPV6_RULE,
        ] {
            socket.add_membership(group).map_err(NetlinkError::Open)?;
        }
        // A bigger buffer only makes overruns rarer; the kernel's default still works.
        let _ = nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::RcvBuf,
            &MONITOR_BUFFER,
        );
        socket.set_non_blocking(true).map_err(NetlinkError::Open)?;
        Ok(Monitor {
            socket,
            buf: BytesMut::with_capacity(RECV_BUFFER),
        })
    }

    /// Everything that has arrived (nothing if nothing has: never blocks).
    pub fn read(&mut self) -> Vec<Change> {
        let mut changes = Vec::new();
        loop {
            match recv_whole(&self.socket, &mut self.buf) {
                Ok(len) => {
                    for frame in frames(&self.buf[..len]) {
                        if let Frame::Message {
                            message: Ok(msg), ..
                        } = frame
                            && let NetlinkPayload::InnerMessage(inner) = msg.payload
                            && let Some(change) = change_of(inner)
                        {
                            changes.push(change);
                        }
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => changes.push(Change::Overrun),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return changes,
                Err(e) => {
                    log::debug!("reading netlink notifications: {e}");
                    changes.push(Change::Overrun);
                    return changes;
                }
            }
        }
    }
}

impl std::os::fd::AsRawFd for Monitor {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

/// What a notification says changed; `None` for what nobody here follows.
fn change_of(message: RouteNetlinkMessage) -> Option<Change> {
    Some(match message {
        RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => Change::Link {
            ifindex: l.header.index,
        },
        RouteNetlinkMessage::NewAddress(_) | RouteNetlinkMessage::DelAddress(_) => Change::Address,
        RouteNetlinkMessage::NewRoute(_)
        | RouteNetlinkMessage::DelRoute(_)
        | RouteNetlinkMessage::NewRule(_)
        | RouteNetlinkMessage::DelRule(_) => Change::Route,
        RouteNetlinkMessage::DelNeighbour(n) => Change::NeighbourGone {
            ifindex: n.header.ifindex,
            addr: neighbour_addr(&n)?,
        },
        RouteNetlinkMessage::NewNeighbour(n) => Change::Neighbour(neighbour_from_message(&n)?),
        _ => return None,
    })
}

/// Where reading an answer stands after one reply.
enum Step {
    More,
    Done,
}

/// Takes one reply to a request: a message for the caller, the end of the answer, or the
/// kernel's error.
fn take_reply(
    op: &str,
    msg: NetlinkMessage<RouteNetlinkMessage>,
    replies: &mut Replies,
) -> Result<Step, NetlinkError> {
    if msg.header.flags & NLM_F_DUMP_INTR != 0 {
        replies.interrupted = true;
    }
    match msg.payload {
        NetlinkPayload::InnerMessage(inner) => {
            replies.messages.push(inner);
            Ok(Step::More)
        }
        NetlinkPayload::Done(done) if done.code != 0 => Err(NetlinkError::Kernel {
            op: op.to_string(),
            errno: done.code.saturating_abs(),
            message: extack_message(&done.extended_ack),
        }),
        NetlinkPayload::Error(error) if error.code.is_some() => Err(NetlinkError::Kernel {
            op: op.to_string(),
            errno: error.raw_code().saturating_abs(),
            message: error_extack(msg.header.flags, &error.header),
        }),
        // The end of a dump, or the ACK of anything else.
        NetlinkPayload::Done(_) | NetlinkPayload::Error(_) => Ok(Step::Done),
        NetlinkPayload::Overrun(_) => {
            Err(NetlinkError::decode(op, "the kernel reported an overrun"))
        }
        _ => Ok(Step::More),
    }
}

/// One message of a datagram.
enum Frame {
    Message {
        seq: u32,
        message: Result<NetlinkMessage<RouteNetlinkMessage>, String>,
    },
    /// A header that cannot be read: the rest of the datagram is lost (no length to skip by).
    Broken(String),
}

/// The messages of one datagram, decoded in place.
fn frames(datagram: &[u8]) -> impl Iterator<Item = Frame> + '_ {
    let mut offset = 0;
    std::iter::from_fn(move || {
        if offset >= datagram.len() {
            return None;
        }
        let rest = &datagram[offset..];
        let buffer = match NetlinkBuffer::new_checked(rest) {
            Ok(buffer) => buffer,
            Err(e) => {
                offset = datagram.len();
                return Some(Frame::Broken(e.to_string()));
            }
        };
        let len = buffer.length() as usize;
        let seq = buffer.sequence_number();
        offset += align4(len).max(NLMSG_HEADER_LEN);
        Some(Frame::Message {
            seq,
            message: NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len])
                .map_err(|e| e.to_string()),
        })
    })
}

fn set_recv_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    use nix::sys::{
        socket::{setsockopt, sockopt::ReceiveTimeout},
        time::TimeVal,
    };
    setsockopt(
        socket,
        ReceiveTimeout,
        &TimeVal::from(libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        }),
    )
    .map_err(io::Error::from)
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn family(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn full_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// The reason string of an NLMSG_ERROR: the extended-ACK TLVs follow the echoed request,
/// which is just its header when the kernel capped it.
fn error_extack(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HEADER_LEN
    } else {
        let len = payload.get(..4)?;
        u32::from_ne_bytes(len.try_into().ok()?) as usize
    };
    extack_message(payload.get(align4(echoed)..)?)
}

fn extack_message(tlvs: &[u8]) -> Option<String> {
    NlasIterator::new(tlvs)
        .filter_map(Result::ok)
        .find(|nla: &NlaBuffer<&[u8]>| nla.kind() & NLA_TYPE_MASK == NLMSGERR_ATTR_MSG)
        .map(|nla| {
            String::from_utf8_lossy(nla.value())
                .trim_end_matches('\0')
                .to_string()
        })
}

fn route_from_message(message: &RouteMessage) -> Route {
    let mut route = Route {
        oif: 0,
        gateway: None,
        prefsrc: None,
        kind: match message.header.kind {
            RouteType::Unicast => RouteKind::Unicast,
            RouteType::Local => RouteKind::Local,
            RouteType::BlackHole => RouteKind::Blackhole,
            RouteType::Unreachable => RouteKind::Unreachable,
            _ => RouteKind::Other,
        },
    };
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Oif(oif) => route.oif = *oif,
            RouteAttribute::Gateway(gateway) => route.gateway = route_ip(gateway),
            // RTA_VIA carries an IPv6 next hop for an IPv4 route (RFC 5549).
            RouteAttribute::Via(RouteVia::Inet(v4)) => route.gateway = Some(IpAddr::V4(*v4)),
            RouteAttribute::Via(RouteVia::Inet6(v6)) => route.gateway = Some(IpAddr::V6(*v6)),
            RouteAttribute::PrefSource(source) => route.prefsrc = route_ip(source),
            _ => {}
        }
    }
    route
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn address_from_message(message: &AddressMessage) -> Option<IfAddr> {
    let mut local = None;
    let mut address = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    // IFA_LOCAL is this host's address; IFA_ADDRESS is the peer's on point-to-point links and
    // the only one IPv6 sends otherwise.
    Some(IfAddr {
        ifindex: message.header.index,
        addr: local.or(address)?,
        prefix_len: message.header.prefix_len,
        global: message.header.scope == AddressScope::Universe,
    })
}

fn link_from_message(message: &LinkMessage) -> Link {
    let mut link = Link {
        ifindex: message.header.index,
        name: String::new(),
        kind: None,
        mtu: 0,
        up: message.header.flags.contains(LinkFlags::Up),
        mac: None,
        vlan: None,
        xdp: None,
        peer: None,
    };
    let mut parent = None;
    let mut vlan_id = None;
    let mut netnsid = None;
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name.clone_from(name),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Address(bytes) => {
                link.mac = <[u8; 6]>::try_from(bytes.as_slice())
                    .ok()
                    .filter(|mac| mac.iter().any(|b| *b != 0));
            }
            // For a vlan this is the parent device; for a veth, the peer.
            LinkAttribute::Link(index) => parent = Some(*index),
            LinkAttribute::LinkNetNsId(id) => netnsid = Some(*id),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(kind) => link.kind = Some(kind.to_string()),
                        LinkInfo::Data(InfoData::Vlan(vlan)) => {
                            vlan_id = vlan.iter().find_map(|v| match v {
                                InfoVlan::Id(id) => Some(*id),
                                _ => None,
                            });
                        }
                        _ => {}
                    }
                }
            }
            LinkAttribute::Xdp(xdp) => {
                link.xdp = xdp.iter().find_map(|x| match x {
                    LinkXdp::Attached(XdpAttached::Driver) => Some("native"),
                    LinkXdp::Attached(XdpAttached::SocketBuffer) => Some("generic"),
                    LinkXdp::Attached(XdpAttached::Hardware) => Some("offload"),
                    LinkXdp::Attached(XdpAttached::Multiple) => Some("multi"),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    match link.kind.as_deref() {
        Some("vlan") => link.vlan = parent.zip(vlan_id),
        Some("veth") => link.peer = parent.zip(netnsid),
        _ => {}
    }
    link
}

/// A filter from a filter dump; `None` for the dump's entries that stand for a priority's
/// classifier itself (handle 0) rather than a filter.
fn tc_filter(message: &TcMessage, ingress: bool) -> Option<TcFilter> {
    let handle =
        u32::from(message.header.handle.major) << 16 | u32::from(message.header.handle.minor);
    if handle == 0 {
        return None;
    }
    let mut kind = String::new();
    let mut bpf_name = None;
    for attribute in &message.attributes {
        match attribute {
            TcAttribute::Kind(k) => kind.clone_from(k),
            TcAttribute::Options(options) => {
                // netlink-packet-route does not know cls_bpf: its TCA_OPTIONS come as one
                // opaque attribute, whose value holds the nested TCA_BPF_* attributes.
                for option in options {
                    let TcOption::Other(nla) = option else {
                        continue;
                    };
                    let mut value = vec![0u8; nla.value_len()];
                    nla.emit_value(&mut value);
                    for inner in NlasIterator::new(&value[..]).flatten() {
                        if inner.kind() & NLA_TYPE_MASK == TCA_BPF_NAME {
                            let name = inner.value();
                            let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
                            bpf_name = Some(String::from_utf8_lossy(&name[..end]).into_owned());
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some(TcFilter {
        ingress,
        // tcm_info holds the priority in its upper 16 bits and the protocol in the lower.
        priority: (message.header.info >> 16) as u16,
        handle,
        kind,
        bpf_name,
    })
}

fn neighbour_request(ifindex: u32, addr: IpAddr) -> NeighbourMessage {
    let mut request = NeighbourMessage::default();
    request.header.family = family(addr);
    request.header.ifindex = ifindex;
    request
        .attributes
        .push(NeighbourAttribute::Destination(match addr {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
    request
}

fn neighbour_from_message(message: &NeighbourMessage) -> Option<Neighbour> {
    Some(Neighbour {
        ifindex: message.header.ifindex,
        addr: neighbour_addr(message)?,
        managed: is_managed(message),
        state: u16::from(message.header.state),
    })
}

fn neighbour_addr(message: &NeighbourMessage) -> Option<IpAddr> {
    message.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })
}

/// NTF_EXT_MANAGED travels in NDA_FLAGS_EXT, which netlink-packet-route leaves untyped.
fn is_managed(message: &NeighbourMessage) -> bool {
    message.attributes.iter().any(|a| match a {
        // A u32: read on the stack (this runs for every entry of every dump and notification).
        NeighbourAttribute::Other(nla)
            if nla.kind() & NLA_TYPE_MASK == NDA_FLAGS_EXT && nla.value_len() == 4 =>
        {
            let mut value = [0u8; 4];
            nla.emit_value(&mut value);
            u32::from_ne_bytes(value) & NTF_EXT_MANAGED != 0
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use netlink_packet_route::link::InfoKind;

    use super::*;

    #[test]
    fn vlan_link_reports_parent_and_id() {
        let mut message = LinkMessage::default();
        message.header.index = 7;
        message.header.flags = LinkFlags::Up;
        message.attributes = vec![
            LinkAttribute::IfName("eth0.100".to_string()),
            LinkAttribute::Mtu(1500),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, 1]),
            LinkAttribute::Link(3),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Vlan),
                LinkInfo::Data(InfoData::Vlan(vec![InfoVlan::Id(100)])),
            ]),
            LinkAttribute::Xdp(vec![LinkXdp::Attached(XdpAttached::Driver)]),
        ];
        assert_eq!(
            link_from_message(&message),
            Link {
                ifindex: 7,
                name: "eth0.100".to_string(),
                kind: Some("vlan".to_string()),
                mtu: 1500,
                up: true,
                mac: Some([2, 0, 0, 0, 0, 1]),
                vlan: Some((3, 100)),
                xdp: Some("native"),
                peer: None,
            }
        );
    }

    #[test]
    fn vlan_link_survives_a_wire_round_trip() {
        let mut message = LinkMessage::default();
        message.header.index = 9;
        message.attributes = vec![
            LinkAttribute::IfName("v".to_string()),
            LinkAttribute::Link(4),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Vlan),
                LinkInfo::Data(InfoData::Vlan(vec![InfoVlan::Id(42)])),
            ]),
        ];
        let mut header = NetlinkHeader::default();
        header.sequence_number = 1;
        let mut wire = NetlinkMessage::new(
            header,
            NetlinkPayload::from(RouteNetlinkMessage::NewLink(message)),
        );
        wire.finalize();
        let mut bytes = vec![0u8; wire.buffer_len()];
        wire.serialize(&mut bytes);
        let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes).unwrap();
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) = parsed.payload
        else {
            panic!("not a link: {parsed:?}");
        };
        let link = link_from_message(&link);
        assert_eq!(link.vlan, Some((4, 42)));
        assert!(!link.up);
        assert_eq!(link.xdp, None);
    }

    #[test]
    fn veth_peer_index_is_not_a_vlan_parent() {
        let mut message = LinkMessage::default();
        message.attributes = vec![
            LinkAttribute::Link(5),
            LinkAttribute::LinkNetNsId(3),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
            LinkAttribute::Address(vec![0; 6]),
            LinkAttribute::Xdp(vec![LinkXdp::Attached(XdpAttached::None)]),
        ];
        let link = link_from_message(&message);
        assert_eq!(link.vlan, None);
        assert_eq!(link.peer, Some((5, 3)), "the peer's index in namespace 3");
        assert_eq!(link.mac, None);
        assert_eq!(link.xdp, None);
    }

    #[test]
    fn ipv6_gateway_of_an_ipv4_route_comes_from_via() {
        let gw: Ipv6Addr = "fe80::1".parse().unwrap();
        let mut message = RouteMessage::default();
        message.header.kind = RouteType::Unicast;
        message.attributes = vec![
            RouteAttribute::Oif(2),
            RouteAttribute::Via(RouteVia::Inet6(gw)),
        ];
        assert_eq!(
            route_from_message(&message),
            Route {
                oif: 2,
                gateway: Some(IpAddr::V6(gw)),
                prefsrc: None,
                kind: RouteKind::Unicast,
            }
        );
    }

    #[test]
    fn extack_message_is_read_after_a_capped_echo() {
        let mut payload = vec![0u8; NLMSG_HEADER_LEN];
        let text = b"Invalid NTF_* flag combination\0";
        let nla_len = 4 + text.len();
        payload.extend_from_slice(&u16::try_from(nla_len).unwrap().to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(text);
        payload.resize(align4(payload.len()), 0);
        assert_eq!(
            error_extack(NLM_F_ACK_TLVS | NLM_F_CAPPED, &payload).as_deref(),
            Some("Invalid NTF_* flag combination")
        );
        assert_eq!(error_extack(NLM_F_CAPPED, &payload), None);
    }

    #[test]
    fn managed_flag_is_read_from_nda_flags_ext() {
        let mut message = neighbour_request(3, "10.0.0.2".parse().unwrap());
        assert!(!is_managed(&message));
        message
            .attributes
            .push(NeighbourAttribute::Other(DefaultNla::new(
                NDA_FLAGS_EXT,
                NTF_EXT_MANAGED.to_ne_bytes().to_vec(),
            )));
        assert!(is_managed(&message));
        assert_eq!(neighbour_addr(&message), "10.0.0.2".parse().ok());
    }
}
