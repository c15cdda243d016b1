//! Traffic for the lab: backend servers inside pod namespaces, clients inside the client
//! namespace. Sockets are created on a thread that entered the namespace (a socket stays in the
//! namespace it was created in) and every client call names its namespace, so nothing here sends
//! from the host's namespace. Every loop is bounded in count and time; servers stop on Drop.
//!
//! Protocol (TCP and UDP, one port): each request line (or datagram) is answered with
//! `"<pod-name> <peer-ip>:<peer-port>\n"` ([`Reply`]), the address the backend saw. A TCP
//! connection that starts with the line `STREAM` gets that reply at once, then the server counts
//! every byte until the client half-closes and answers `"DONE <pod-name> <bytes>\n"`.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{lab::Pod, netns::Netns};

/// The port the suites serve on unless they need another.
pub const DEFAULT_PORT: u16 = 8080;
/// The request a client sends; its content does not matter to the server.
const REQUEST: &[u8] = b"hello\n";
const STREAM_HEADER: &str = "STREAM";
/// How often server loops look at their stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// A server connection without any byte for this long is closed.
const CONN_IDLE_LIMIT: Duration = Duration::from_secs(30);
/// Connections served at once per server; more are closed at accept.
const MAX_CONNECTIONS: usize = 512;
const SERVER_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Errors a batch keeps verbatim (all are counted).
const MAX_ERRORS_KEPT: usize = 20;
const MAX_BATCH: usize = 1_000_000;
const MAX_CONCURRENCY: usize = 64;

/// A backend's answer: the pod that served, and the client address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub backend: String,
    pub peer: SocketAddr,
}

impl Reply {
    pub fn parse(line: &str) -> Result<Reply> {
        let mut words = line.trim_end().split(' ');
        let (Some(backend), Some(peer), None) = (words.next(), words.next(), words.next()) else {
            bail!("malformed reply {line:?}");
        };
        Ok(Reply {
            backend: backend.to_string(),
            peer: peer
                .parse()
                .with_context(|| format!("malformed peer in reply {line:?}"))?,
        })
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.backend, self.peer)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

// ---------------------------------------------------------------------------------------------
// Servers

/// What a server has seen since start (or the last reset).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    pub tcp_connections: u64,
    /// Request lines answered (streams not included).
    pub tcp_requests: u64,
    pub streams: u64,
    pub stream_bytes: u64,
    pub udp_requests: u64,
    /// Connections closed at accept because MAX_CONNECTIONS were open.
    pub rejected_connections: u64,
    /// Source addresses of TCP connections and UDP datagrams (IPv4-mapped shown as IPv4).
    pub peers: BTreeSet<SocketAddr>,
}

impl ServerStats {
    pub fn peer_ips(&self) -> BTreeSet<IpAddr> {
        self.peers.iter().map(SocketAddr::ip).collect()
    }
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    stats: Mutex<ServerStats>,
    conns: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn stats(&self) -> MutexGuard<'_, ServerStats> {
        self.stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// A backend: TCP and UDP on `[::]:port` (dual stack) inside a pod's namespace, answering with its
/// name. Stops on Drop.
pub struct BackendServer {
    name: String,
    port: u16,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl BackendServer {
    /// Binds in `ns` and serves as `name`.
    pub fn start(ns: &Netns, name: &str, port: u16) -> Result<BackendServer> {
        let (listener, udp) = ns
            .run(move || bind_dual_stack(port))?
            .with_context(|| format!("server {name}: binding port {port} in {}", ns.name()))?;
        let shared = Arc::new(Shared::default());
        let mut server = BackendServer {
            name: name.to_string(),
            port,
            shared,
            threads: Vec::new(),
        };
        let label: Arc<str> = name.into();
        for proto in [Proto::Tcp, Proto::Udp] {
            let (label, shared) = (label.clone(), server.shared.clone());
            let builder = thread::Builder::new().name(format!("srv-{name}-{proto:?}"));
            let handle = match proto {
                Proto::Tcp => {
                    let listener = listener.try_clone()?;
                    builder.spawn(move || accept_loop(listener, label, shared))
                }
                Proto::Udp => {
                    let udp = udp.try_clone()?;
                    builder.spawn(move || udp_loop(udp, label, shared))
                }
            };
            // On error `server` drops here and stops what already runs.
            server
                .threads
                .push(handle.context("spawning a server thread")?);
        }
        Ok(server)
    }

    /// A server for `pod`, named after it.
    pub fn for_pod(pod: &Pod, port: u16) -> Result<BackendServer> {
        BackendServer::start(&pod.ns, &pod.name, port)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn stats(&self) -> ServerStats {
        self.shared.stats().clone()
    }

    pub fn reset_stats(&self) {
        *self.shared.stats() = ServerStats::default();
    }

    /// Stops accepting and closes every connection (within about POLL_INTERVAL). Idempotent.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let conns: Vec<_> = std::mem::take(
            &mut *self
                .shared
                .conns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for c in conns {
            let _ = c.join();
        }
    }
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One server per pod, all on `port`.
pub fn serve_pods(pods: &[Pod], port: u16) -> Result<Vec<BackendServer>> {
    pods.iter()
        .map(|p| BackendServer::for_pod(p, port))
        .collect()
}

/// `[::]:port` for TCP and UDP with IPV6_V6ONLY off, so IPv4 arrives too (as ::ffff:a.b.c.d).
fn bind_dual_stack(port: u16) -> Result<(TcpListener, UdpSocket)> {
    let addr: SocketAddr = (Ipv6Addr::UNSPECIFIED, port).into();
    let tcp = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    tcp.set_only_v6(false)?;
    tcp.set_reuse_address(true)?;
    tcp.bind(&addr.into())?;
    tcp.listen(1024)?;
    tcp.set_nonblocking(true)?;
    let udp = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    udp.set_only_v6(false)?;
    udp.bind(&addr.into())?;
    udp.set_read_timeout(Some(POLL_INTERVAL))?;
    Ok((tcp.into(), udp.into()))
}

/// IPv4-mapped IPv6 addresses as the IPv4 address they carry.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn reply_line(name: &str, peer: SocketAddr) -> String {
    format!("{name} {peer}\n")
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// True when `fd` is readable within `timeout`.
fn poll_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&raw mut pfd, 1, ms) > 0 }
}

#[allow(
    clippy::needless_pass_by_value,
    reason = "a thread's body: it owns what it serves"
)]
fn accept_loop(listener: TcpListener, name: Arc<str>, shared: Arc<Shared>) {
    while !shared.stopped() {
        if !poll_readable(listener.as_raw_fd(), POLL_INTERVAL) {
            continue;
        }
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => {
                eprintln!("server {name}: accept: {e}");
                thread::sleep(POLL_INTERVAL);
                continue;
            }
        };
        let peer = canonical(peer);
        let mut conns = shared
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        conns.retain(|c| !c.is_finished());
        if conns.len() >= MAX_CONNECTIONS {
            shared.stats().rejected_connections += 1;
            continue;
        }
        {
            let mut stats = shared.stats();
            stats.tcp_connections += 1;
            stats.peers.insert(peer);
        }
        let (name2, shared2) = (name.clone(), shared.clone());
        match thread::Builder::new()
            .name(format!("srv-{name}-conn"))
            .spawn(move || {
                // Errors end the connection; clients that hang up are normal.
                let _ = serve_connection(stream, peer, &name2, &shared2);
            }) {
            Ok(handle) => conns.push(handle),
            Err(e) => eprintln!("server {name}: spawning a connection thread: {e}"),
        }
    }
}

fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    name: &str,
    shared: &Shared,
) -> io::Result<()> {
    stream.set_read_timeout(Some(POLL_INTERVAL))?;
    stream.set_write_timeout(Some(SERVER_WRITE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let mut last_data = Instant::now();
    while !shared.stopped() {
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return Ok(()),
            Ok(_) if line.last() != Some(&b'\n') => return Ok(()),
            Ok(_) => {
                last_data = Instant::now();
                let stream_mode = line.trim_ascii() == STREAM_HEADER.as_bytes();
                line.clear();
                writer.write_all(reply_line(name, peer).as_bytes())?;
                if stream_mode {
                    shared.stats().streams += 1;
                    let bytes = count_until_eof(&mut reader, shared)?;
                    writer.write_all(format!("DONE {name} {bytes}\n").as_bytes())?;
                    return Ok(());
                }
                shared.stats().tcp_requests += 1;
            }
            // read_until keeps what it read before the timeout in `line`.
            Err(e) if is_timeout(&e) => {
                if last_data.elapsed() > CONN_IDLE_LIMIT {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Counts bytes until EOF. Errors on stop, on idleness, and on connection errors.
fn count_until_eof(reader: &mut BufReader<TcpStream>, shared: &Shared) -> io::Result<u64> {
    let buffered = reader.buffer().len();
    reader.consume(buffered);
    let mut total = buffered as u64;
    shared.stats().stream_bytes += buffered as u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_data = Instant::now();
    loop {
        if shared.stopped() {
            return Err(io::Error::other("server stopped"));
        }
        match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                total += n as u64;
                shared.stats().stream_bytes += n as u64;
                last_data = Instant::now();
            }
            Err(e) if is_timeout(&e) => {
                if last_data.elapsed() > CONN_IDLE_LIMIT {
                    return Err(io::Error::other("stream idle"));
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[allow(
    clippy::needless_pass_by_value,
    reason = "a thread's body: it owns what it serves"
)]
fn udp_loop(udp: UdpSocket, name: Arc<str>, shared: Arc<Shared>) {
    let mut buf = [0u8; 2048];
    while !shared.stopped() {
        match udp.recv_from(&mut buf) {
            Ok((_, from)) => {
                let peer = canonical(from);
                {
                    let mut stats = shared.stats();
                    stats.udp_requests += 1;
                    stats.peers.insert(peer);
                }
                if let Err(e) = udp.send_to(reply_line(&name, peer).as_bytes(), from) {
                    eprintln!("server {name}: udp reply to {peer}: {e}");
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                eprintln!("server {name}: udp: {e}");
                thread::sleep(POLL_INTERVAL);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// One TCP connection from `src` (None: the kernel's choice) to `dst` in `ns`: one request, one
/// reply line (returned without its newline). Connect, write and read are each bounded by
/// `timeout`.
pub fn tcp_request(
    ns: &Netns,
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<String> {
    ns.run(|| tcp_request_here(src, dst, timeout))?
}

/// One UDP datagram from `src` to `dst` in `ns` and its reply (which must come from `dst`),
/// within `timeout`.
pub fn udp_request(
    ns: &Netns,
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<String> {
    ns.run(|| udp_request_here(src, dst, timeout))?
}

/// `tcp_request` or `udp_request`, parsed.
pub fn request(
    ns: &Netns,
    proto: Proto,
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<Reply> {
    ns.run(|| request_here(proto, src, dst, timeout))?
}

fn request_here(
    proto: Proto,
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<Reply> {
    let line = match proto {
        Proto::Tcp => tcp_request_here(src, dst, timeout)?,
        Proto::Udp => udp_request_here(src, dst, timeout)?,
    };
    Reply::parse(&line)
}

fn socket_for(ty: Type, proto: Protocol, src: Option<IpAddr>, dst: SocketAddr) -> Result<Socket> {
    let sock = Socket::new(Domain::for_address(dst), ty, Some(proto))?;
    let src = match src {
        Some(src) => {
            ensure!(
                src.is_ipv4() == dst.is_ipv4(),
                "source {src} and destination {dst} differ in family"
            );
            src
        }
        None if dst.is_ipv4() => IpAddr::from([0u8; 4]),
        None => IpAddr::from([0u8; 16]),
    };
    sock.bind(&SocketAddr::new(src, 0).into())
        .with_context(|| format!("binding {src}"))?;
    Ok(sock)
}

/// Connects from `src` to `dst` in the calling thread's namespace.
fn tcp_connect_here(src: Option<IpAddr>, dst: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let sock = socket_for(Type::STREAM, Protocol::TCP, src, dst)?;
    sock.connect_timeout(&dst.into(), timeout)
        .with_context(|| format!("tcp connect {} -> {dst}", show_src(src)))?;
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn tcp_request_here(src: Option<IpAddr>, dst: SocketAddr, timeout: Duration) -> Result<String> {
    let stream = tcp_connect_here(src, dst, timeout)?;
    let local = stream.local_addr()?;
    let what = || format!("tcp {local} -> {dst}");
    (&stream).write_all(REQUEST).with_context(what)?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .with_context(what)?;
    ensure!(
        line.ends_with('\n'),
        "{}: connection closed without a reply",
        what()
    );
    Ok(line.trim_end().to_string())
}

fn udp_request_here(src: Option<IpAddr>, dst: SocketAddr, timeout: Duration) -> Result<String> {
    let sock = socket_for(Type::DGRAM, Protocol::UDP, src, dst)?;
    let udp: UdpSocket = sock.into();
    udp.set_read_timeout(Some(timeout))?;
    let local = udp.local_addr()?;
    let what = || format!("udp {local} -> {dst}");
    udp.send_to(REQUEST, dst).with_context(what)?;
    let mut buf = [0u8; 2048];
    let (n, from) = udp.recv_from(&mut buf).with_context(what)?;
    ensure!(
        canonical(from) == canonical(dst),
        "{}: reply came from {from}",
        what()
    );
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_string())
}

fn show_src(src: Option<IpAddr>) -> String {
    src.map_or_else(|| "(any)".to_string(), |s| s.to_string())
}

/// Many requests from one namespace: `count` exchanges to `dst`, source addresses taken in turn
/// from `sources`, `concurrency` at a time, each a new connection (TCP) or a new socket (UDP), all
/// within `deadline`.
#[derive(Clone, Debug)]
pub struct Batch {
    pub proto: Proto,
    pub dst: SocketAddr,
    /// Used round robin; empty: the kernel's choice.
    pub sources: Vec<IpAddr>,
    pub count: usize,
    pub concurrency: usize,
    pub request_timeout: Duration,
    /// Requests not started by then are left out (counted in `BatchReport::not_started`).
    pub deadline: Duration,
}

/// What a batch saw.
#[derive(Clone, Debug, Default)]
pub struct BatchReport {
    pub attempted: usize,
    pub ok: usize,
    pub not_started: usize,
    pub per_backend: BTreeMap<String, usize>,
    /// Backends reached from each source address.
    pub per_source: BTreeMap<IpAddr, BTreeMap<String, usize>>,
    /// Replies whose backend saw a source address other than the client's (SNAT).
    pub peer_mismatches: usize,
    pub error_count: usize,
    /// The first errors, verbatim.
    pub errors: Vec<String>,
    pub elapsed: Duration,
}

impl BatchReport {
    pub fn backends(&self) -> BTreeSet<String> {
        self.per_backend.keys().cloned().collect()
    }

    /// Every request was made and answered.
    pub fn all_ok(&self) -> bool {
        self.not_started == 0 && self.error_count == 0
    }

    fn merge(&mut self, other: BatchReport) {
        self.attempted += other.attempted;
        self.ok += other.ok;
        for (backend, n) in other.per_backend {
            *self.per_backend.entry(backend).or_default() += n;
        }
        for (src, backends) in other.per_source {
            let mine = self.per_source.entry(src).or_default();
            for (backend, n) in backends {
                *mine.entry(backend).or_default() += n;
            }
        }
        self.peer_mismatches += other.peer_mismatches;
        self.error_count += other.error_count;
        let room = MAX_ERRORS_KEPT.saturating_sub(self.errors.len());
        self.errors.extend(other.errors.into_iter().take(room));
    }
}

impl Batch {
    /// Defaults: 6 at a time, 2 s per request, 30 s in all.
    pub fn new(proto: Proto, dst: SocketAddr, sources: Vec<IpAddr>, count: usize) -> Batch {
        Batch {
            proto,
            dst,
            sources,
            count,
            concurrency: 6,
            request_timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(30),
        }
    }

    pub fn concurrency(mut self, n: usize) -> Batch {
        self.concurrency = n;
        self
    }

    pub fn request_timeout(mut self, t: Duration) -> Batch {
        self.request_timeout = t;
        self
    }

    pub fn deadline(mut self, t: Duration) -> Batch {
        self.deadline = t;
        self
    }

    /// Runs the batch from `ns` (workers enter it; the calling thread does not).
    pub fn run(&self, ns: &Netns) -> Result<BatchReport> {
        ensure!(
            self.count <= MAX_BATCH,
            "batch of {} > {MAX_BATCH}",
            self.count
        );
        ensure!(
            (1..=MAX_CONCURRENCY).contains(&self.concurrency),
            "concurrency {} outside 1..={MAX_CONCURRENCY}",
            self.concurrency
        );
        for src in &self.sources {
            ensure!(
                src.is_ipv4() == self.dst.is_ipv4(),
                "source {src} vs destination {}",
                self.dst
            );
        }
        let started = Instant::now();
        let end = started + self.deadline;
        let next = AtomicUsize::new(0);
        let mut report = thread::scope(|s| -> Result<BatchReport> {
            let workers: Vec<_> = (0..self.concurrency)
                .map(|_| ns.spawn_scoped(s, || self.work(&next, end)))
                .collect();
            let mut report = BatchReport::default();
            for w in workers {
                match w.join() {
                    Ok(part) => report.merge(part?),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            Ok(report)
        })?;
        report.not_started = self.count - report.attempted;
        report.elapsed = started.elapsed();
        Ok(report)
    }

    fn work(&self, next: &AtomicUsize, end: Instant) -> BatchReport {
        let mut report = BatchReport::default();
        loop {
            if Instant::now() >= end {
                break;
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= self.count {
                break;
            }
            let src = (!self.sources.is_empty()).then(|| self.sources[i % self.sources.len()]);
            report.attempted += 1;
            match request_here(self.proto, src, self.dst, self.request_timeout) {
                Ok(reply) => {
                    report.ok += 1;
                    if src.is_some_and(|s| s != reply.peer.ip()) {
                        report.peer_mismatches += 1;
                    }
                    *report
                        .per_source
                        .entry(src.unwrap_or(reply.peer.ip()))
                        .or_default()
                        .entry(reply.backend.clone())
                        .or_default() += 1;
                    *report.per_backend.entry(reply.backend).or_default() += 1;
                }
                Err(e) => {
                    report.error_count += 1;
                    if report.errors.len() < MAX_ERRORS_KEPT {
                        report.errors.push(format!("{e:#}"));
                    }
                }
            }
        }
        report
    }
}

// ---------------------------------------------------------------------------------------------
// Long transfers

/// Pacing and bounds of a [`LongTransfer`].
#[derive(Clone, Copy, Debug)]
pub struct TransferOptions {
    /// Bytes per write.
    pub chunk: usize,
    /// Pause after each write (keeps a 2-core machine free for the test itself).
    pub interval: Duration,
    /// The transfer stops by itself after this long.
    pub max_duration: Duration,
    /// Bound of connect, of each write, and of waiting for the final answer.
    pub io_timeout: Duration,
}

impl Default for TransferOptions {
    /// 16 KiB every 2 ms (about 8 MB/s), at most 120 s.
    fn default() -> Self {
        TransferOptions {
            chunk: 16 * 1024,
            interval: Duration::from_millis(2),
            max_duration: Duration::from_secs(120),
            io_timeout: Duration::from_secs(5),
        }
    }
}

/// How a long transfer went.
#[derive(Clone, Debug)]
pub struct TransferReport {
    /// The backend that answered the start of the stream.
    pub backend: String,
    /// The client address that backend saw.
    pub peer: SocketAddr,
    pub bytes_sent: u64,
    /// The byte count the backend reported at the end (None if it never did).
    pub server_bytes: Option<u64>,
    /// The first error: reset, timeout, short count, another backend at the end.
    pub error: Option<String>,
    pub duration: Duration,
}

impl TransferReport {
    /// No error, and the backend received every byte sent.
    pub fn is_clean(&self) -> bool {
        self.error.is_none() && self.server_bytes == Some(self.bytes_sent)
    }
}

type Outcome = (u64, Option<u64>, Option<String>);

/// One TCP connection that keeps sending in a background thread until `finish` (or its
/// `max_duration`), to prove a connection survives changes made meanwhile.
pub struct LongTransfer {
    backend: String,
    peer: SocketAddr,
    started: Instant,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    handle: Option<JoinHandle<Outcome>>,
}

impl LongTransfer {
    /// Starts with the default pacing from `src` (None: the kernel's choice) to `dst`, in `ns`.
    /// Returns once a backend has answered the start of the stream.
    pub fn start(ns: &Netns, src: Option<IpAddr>, dst: SocketAddr) -> Result<LongTransfer> {
        LongTransfer::start_with(ns, src, dst, TransferOptions::default())
    }

    pub fn start_with(
        ns: &Netns,
        src: Option<IpAddr>,
        dst: SocketAddr,
        opts: TransferOptions,
    ) -> Result<LongTransfer> {
        ensure!(opts.chunk > 0, "chunk must not be empty");
        let (stream, reply) = ns
            .run(|| -> Result<(TcpStream, Reply)> {
                let stream = tcp_connect_here(src, dst, opts.io_timeout)?;
                (&stream).write_all(format!("{STREAM_HEADER}\n").as_bytes())?;
                let mut line = String::new();
                // Byte by byte, so that nothing after the first line is left in a buffer here.
                let mut byte = [0u8; 1];
                while !line.ends_with('\n') {
                    ensure!(line.len() < 256, "reply too long: {line:?}");
                    ensure!((&stream).read(&mut byte)? == 1, "closed before replying");
                    line.push(char::from(byte[0]));
                }
                Ok((stream, Reply::parse(&line)?))
            })?
            .with_context(|| format!("starting a long transfer to {dst}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (stop2, sent2, backend) = (stop.clone(), sent.clone(), reply.backend.clone());
        let handle = thread::Builder::new()
            .name("long-transfer".to_string())
            .spawn(move || transfer(stream, &backend, opts, &stop2, &sent2))?;
        Ok(LongTransfer {
            backend: reply.backend,
            peer: reply.peer,
            started: Instant::now(),
            stop,
            sent,
            handle: Some(handle),
        })
    }

    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// Bytes written so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops sending, half-closes, waits for the backend's count, and reports.
    pub fn finish(mut self) -> TransferReport {
        let (bytes_sent, server_bytes, error) = self.join();
        TransferReport {
            backend: self.backend.clone(),
            peer: self.peer,
            bytes_sent,
            server_bytes,
            error,
            duration: self.started.elapsed(),
        }
    }

    fn join(&mut self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(outcome)) => outcome,
            Some(Err(_)) => (
                self.bytes_sent(),
                None,
                Some("sender thread panicked".to_string()),
            ),
            None => (
                self.bytes_sent(),
                None,
                Some("already finished".to_string()),
            ),
        }
    }
}

impl Drop for LongTransfer {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.join();
        }
    }
}

#[allow(
    clippy::needless_pass_by_value,
    reason = "a thread's body: it owns what it serves"
)]
fn transfer(
    stream: TcpStream,
    backend: &str,
    opts: TransferOptions,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> Outcome {
    let started = Instant::now();
    let chunk = vec![0x5au8; opts.chunk];
    let mut total = 0u64;
    let fail = |total: u64, what: String| (total, None, Some(what));
    if let Err(e) = stream.set_write_timeout(Some(opts.io_timeout)) {
        return fail(total, format!("setting the write timeout: {e}"));
    }
    while !stop.load(Ordering::Relaxed) && started.elapsed() < opts.max_duration {
        if let Err(e) = (&stream).write_all(&chunk) {
            return fail(total, format!("write after {total} bytes: {e}"));
        }
        total += chunk.len() as u64;
        sent.store(total, Ordering::Relaxed);
        thread::sleep(opts.interval);
    }
    if let Err(e) = stream.shutdown(Shutdown::Write) {
        return fail(total, format!("half-close after {total} bytes: {e}"));
    }
    if let Err(e) = stream.set_read_timeout(Some(opts.io_timeout)) {
        return fail(total, format!("setting the read timeout: {e}"));
    }
    let mut line = String::new();
    if let Err(e) = BufReader::new(&stream).read_line(&mut line) {
        return fail(total, format!("waiting for the backend's count: {e}"));
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    let server_bytes = match words.as_slice() {
        ["DONE", name, n] if *name == backend => n.parse::<u64>().ok(),
        _ => {
            return fail(
                total,
                format!("unexpected final answer {line:?} (from {backend})"),
            );
        }
    };
    let error = match server_bytes {
        Some(n) if n == total => None,
        Some(n) => Some(format!("backend counted {n} bytes, {total} sent")),
        None => Some(format!("bad count in {line:?}")),
    };
    (total, server_bytes, error)
}

// ---------------------------------------------------------------------------------------------
// Ping

/// One ICMP (or ICMPv6) echo to `dst` from the calling thread's namespace, answered within
/// `timeout`. Uses a datagram ICMP socket (the kernel fills identifier and checksum), allowed
/// for every group in this namespace first, so no raw socket or ping binary is needed.
pub fn ping(dst: IpAddr, timeout: Duration) -> Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")
        .context("allow ICMP datagram sockets (ping_group_range)")?;
    let (domain, proto, request) = match dst {
        IpAddr::V4(_) => (socket2::Domain::IPV4, socket2::Protocol::ICMPV4, 8u8),
        IpAddr::V6(_) => (socket2::Domain::IPV6, socket2::Protocol::ICMPV6, 128u8),
    };
    let sock =
        socket2::Socket::new(domain, socket2::Type::DGRAM, Some(proto)).context("ICMP socket")?;
    sock.set_read_timeout(Some(timeout))?;
    let payload = *b"xdplb-ping";
    let mut msg = vec![request, 0, 0, 0, 0, 0, 0, 1];
    msg.extend_from_slice(&payload);
    sock.send_to(&msg, &SocketAddr::new(dst, 0).into())
        .with_context(|| format!("send echo to {dst}"))?;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 256];
    let (n, from) = sock
        .recv_from(&mut buf)
        .with_context(|| format!("no echo reply from {dst} within {timeout:?}"))?;
    // SAFETY: recv_from initialised the first n bytes.
    let reply: Vec<u8> = buf[..n]
        .iter()
        .map(|b| unsafe { b.assume_init() })
        .collect();
    let from = from.as_socket().map(|s| s.ip());
    if from != Some(dst) || !reply.ends_with(&payload) {
        bail!("unexpected answer from {from:?}: {reply:?}");
    }
    Ok(())
}
