//! Floods for the rate-limit tests, sent from inside a lab namespace: a paced UDP flood from one
//! of the client's addresses, and a flood of frames with a new (spoofed) source address in each,
//! written to a packet socket. Both are bounded in count and time, and the spoofed addresses are
//! the caller's choice of a range that exists only inside the lab.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};

use crate::{netns::Netns, packets::Spec};

/// What a flood did.
#[derive(Clone, Copy, Debug, Default)]
pub struct FloodReport {
    pub sent: u64,
    /// Sends the kernel refused (buffers full): not on the wire.
    pub failed: u64,
    /// From the first send to the last.
    pub elapsed: Duration,
}

impl FloodReport {
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Upper bounds, whatever the caller asks.
const MAX_RATE: u64 = 200_000;
const MAX_DURATION: Duration = Duration::from_secs(10);
/// Pacing slice: `rate / 1000` datagrams every millisecond.
const SLICE: Duration = Duration::from_millis(1);

/// Sends UDP datagrams from `src` to `dst` at `rate` per second for `duration`, from `ns`.
pub fn udp_flood(
    ns: &Netns,
    src: IpAddr,
    dst: SocketAddr,
    rate: u64,
    duration: Duration,
) -> Result<FloodReport> {
    ensure!(
        rate <= MAX_RATE && duration <= MAX_DURATION,
        "flood too big"
    );
    ns.run(move || -> Result<FloodReport> {
        let socket = UdpSocket::bind(SocketAddr::new(src, 0)).context("binding the flood")?;
        socket.connect(dst)?;
        socket.set_nonblocking(true)?;
        paced(rate, duration, |_| socket.send(b"flood\n").is_ok())
    })?
}

/// Writes UDP frames to `dst` from `sources` (one per frame, cycling), addressed from `src_mac`
/// to `dst_mac`, on `iface` in `ns`, at `rate` per second for `duration`.
#[allow(clippy::too_many_arguments)]
pub fn spoofed_udp_flood(
    ns: &Netns,
    iface: &str,
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    sources: &[Ipv4Addr],
    dst: SocketAddr,
    rate: u64,
    duration: Duration,
) -> Result<FloodReport> {
    ensure!(
        rate <= MAX_RATE && duration <= MAX_DURATION,
        "flood too big"
    );
    ensure!(!sources.is_empty(), "no sources");
    let frames: Vec<Vec<u8>> = sources
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Spec::udp(
                &s.to_string(),
                1024 + u16::try_from(i % 60000).expect("under 60000"),
                &dst.ip().to_string(),
                dst.port(),
            )
            .macs(src_mac, dst_mac)
            .payload(b"spoofed\n")
            .build()
        })
        .collect();
    let iface = iface.to_string();
    ns.run(move || -> Result<FloodReport> {
        let socket = PacketSocket::open(&iface)?;
        paced(rate, duration, |i| {
            socket.send(&frames[usize::try_from(i).expect("64-bit") % frames.len()])
        })
    })?
}

/// Calls `send(i)` `rate` times a second for `duration`, in millisecond slices.
fn paced(rate: u64, duration: Duration, mut send: impl FnMut(u64) -> bool) -> Result<FloodReport> {
    let per_slice = (rate / 1000).max(1);
    let total = rate * u64::try_from(duration.as_millis())? / 1000;
    let mut report = FloodReport::default();
    let start = Instant::now();
    let mut next = start;
    let mut i = 0;
    while i < total && start.elapsed() < duration + Duration::from_secs(1) {
        for _ in 0..per_slice.min(total - i) {
            if send(i) {
                report.sent += 1;
            } else {
                report.failed += 1;
            }
            i += 1;
        }
        next += SLICE;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

/// An AF_PACKET socket bound to one interface (in the calling thread's namespace), for writing
/// whole frames.
pub struct PacketSocket(OwnedFd);

impl PacketSocket {
    pub fn open(iface: &str) -> Result<PacketSocket> {
        let name = std::ffi::CString::new(iface)?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        ensure!(ifindex != 0, "no interface {iface}");
        // SAFETY: plain socket creation; checked below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        ensure!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid sockaddr_ll; the fields set are the ones bind reads.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET)?;
        addr.sll_ifindex = i32::try_from(ifindex)?;
        // SAFETY: a valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                u32::try_from(size_of::<libc::sockaddr_ll>())?,
            )
        };
        ensure!(
            rc == 0,
            "binding to {iface}: {}",
            std::io::Error::last_os_error()
        );
        Ok(PacketSocket(fd))
    }

    /// Sends past the qdisc (PACKET_QDISC_BYPASS), as a driver's transmit would.
    pub fn bypass_qdisc(&self) -> Result<()> {
        let on: libc::c_int = 1;
        // SAFETY: a valid int option of the given size.
        let rc = unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&raw const on).cast(),
                u32::try_from(size_of::<libc::c_int>())?,
            )
        };
        ensure!(
            rc == 0,
            "PACKET_QDISC_BYPASS: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// Sends `frames` with one sendmmsg; returns how many the kernel took (0 on an error such
    /// as full buffers).
    pub fn send_many(&self, frames: &[&[u8]]) -> usize {
        let mut iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr().cast_mut().cast(),
                iov_len: f.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: all-zero is a valid msghdr (no name, no control data).
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = std::ptr::from_mut(iov);
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: `msgs` point into `iovs`, which point into `frames`: all outlive the call.
        let rc = unsafe {
            libc::sendmmsg(
                self.0.as_raw_fd(),
                msgs.as_mut_ptr(),
                u32::try_from(msgs.len()).unwrap_or(u32::MAX),
                0,
            )
        };
        usize::try_from(rc).unwrap_or(0)
    }

    pub fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: a valid buffer of the given length.
        unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) > 0 }
    }
}
