//! The benchmark programs of the tools object (lb-ebpf/src/tools.rs) from user space: the frame
//! template and its variation (`BenchFrame`, mirrored here), the wrapper's target slot, the
//! per-CPU sequence, and BPF_PROG_TEST_RUN in both modes (timed runs and live frames).
use std::os::fd::AsFd;

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues, ProgramArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
};
use lb_common::checksum::{checksum, pseudo_header_sum};
use lb_userspace::dataplane;

/// Bytes of the frame the benchmark programs restore on every run.
pub const FRAME_LEN: usize = 64;

/// Add the sequence-derived offset to the IPv4 source address.
pub const VARY_SOURCE: u32 = 1;
/// Add it to the TCP/UDP source port.
pub const VARY_PORT: u32 = 2;

/// How the benchmark programs vary the frame from run to run (see `BenchFrame` in tools.rs):
/// with sequence number `n` and `k = n % cycle` (`n` if `cycle` is 0), `sources` S > 0 gives
/// source address `base + k % S` and port `base + k / S`; S = 0 gives address `base + k`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vary {
    pub bits: u32,
    pub cycle: u32,
    pub sources: u32,
}

impl Vary {
    /// The same frame every run.
    pub const NONE: Vary = Vary {
        bits: 0,
        cycle: 0,
        sources: 0,
    };

    /// A new flow every run, spread over `sources` source addresses.
    pub fn new_flows(sources: u32) -> Vary {
        Vary {
            bits: VARY_SOURCE | VARY_PORT,
            cycle: 0,
            sources,
        }
    }

    /// A new source address every run (the spoofed flood).
    pub const NEW_SOURCES: Vary = Vary {
        bits: VARY_SOURCE,
        cycle: 0,
        sources: 0,
    };

    /// `flows` flows over `sources` addresses, round robin.
    pub fn flow_mix(sources: u32, flows: u32) -> Vary {
        Vary {
            bits: VARY_SOURCE | VARY_PORT,
            cycle: flows,
            sources,
        }
    }

    /// (source address offset, source port offset) of run `n`, as the BPF side computes them.
    #[allow(
        clippy::cast_possible_truncation,
        reason = "the offsets wrap at their field widths, as on the BPF side"
    )]
    pub fn offsets(&self, n: u64) -> (u32, u16) {
        if self.bits == 0 {
            return (0, 0);
        }
        let k = if self.cycle != 0 {
            n % u64::from(self.cycle)
        } else {
            n
        };
        let (a, p) = if self.sources != 0 {
            let s = u64::from(self.sources);
            (k % s, k / s)
        } else {
            (k, 0)
        };
        (
            if self.bits & VARY_SOURCE != 0 {
                a as u32
            } else {
                0
            },
            if self.bits & VARY_PORT != 0 {
                p as u16
            } else {
                0
            },
        )
    }
}

/// Mirror of tools.rs `BenchFrame` (80 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct BenchFrame {
    data: [u8; FRAME_LEN],
    vary: u32,
    cycle: u32,
    sources: u32,
    /// The frame's length: the wrapper moves a start the program under test moved back.
    len: u32,
}
const _: () = assert!(std::mem::size_of::<BenchFrame>() == 80);
// SAFETY: repr(C) plain data, explicit padding.
unsafe impl aya::Pod for BenchFrame {}

/// A loaded tools object with its benchmark maps taken out.
pub struct BenchTools {
    pub ebpf: Ebpf,
    frame: Array<MapData, BenchFrame>,
    seq: PerCpuArray<MapData, u64>,
    /// Keep: the kernel empties a program array when its last user-space handle closes.
    target: ProgramArray<MapData>,
    /// What `bench_lookup` finds.
    lookup: HashMap<MapData, [u8; 40], [u8; 56]>,
    cpus: usize,
}

impl BenchTools {
    pub fn load() -> Result<BenchTools> {
        let mut ebpf = dataplane::load_tools().context("loading the tools object")?;
        let frame = ebpf
            .take_map("BENCH_FRAME")
            .context("BENCH_FRAME not in the tools object")?
            .try_into()?;
        let seq = ebpf
            .take_map("BENCH_SEQ")
            .context("BENCH_SEQ not in the tools object")?
            .try_into()?;
        let target = ebpf
            .take_map("BENCH_TARGET")
            .context("BENCH_TARGET not in the tools object")?
            .try_into()?;
        let lookup = ebpf
            .take_map("BENCH_FLOWS")
            .context("BENCH_FLOWS not in the tools object")?
            .try_into()?;
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        Ok(BenchTools {
            ebpf,
            frame,
            seq,
            target,
            lookup,
            cpus,
        })
    }

    /// Sets the frame (at least FRAME_LEN bytes; the first FRAME_LEN are restored every run).
    pub fn set_frame(&mut self, frame: &[u8], vary: Vary) -> Result<()> {
        ensure!(
            frame.len() >= FRAME_LEN,
            "benchmark frames must be at least {FRAME_LEN} bytes, not {}",
            frame.len()
        );
        if vary.bits != 0 {
            // The BPF side writes at the offsets of an untagged IPv4 frame with a 20-byte header.
            ensure!(
                frame[12..14] == [0x08, 0x00] && frame[14] == 0x45,
                "varied frames must be untagged IPv4 without options"
            );
        }
        let mut data = [0u8; FRAME_LEN];
        data.copy_from_slice(&frame[..FRAME_LEN]);
        let value = BenchFrame {
            data,
            vary: vary.bits,
            cycle: vary.cycle,
            sources: vary.sources,
            len: u32::try_from(frame.len()).context("frame length")?,
        };
        self.frame.set(0, value, 0)?;
        Ok(())
    }

    /// Sets every CPU's sequence number to `n`.
    pub fn set_seq(&mut self, n: u64) -> Result<()> {
        let values = PerCpuValues::try_from(vec![n; self.cpus])?;
        self.seq.set(0, values, 0)?;
        Ok(())
    }

    /// Runs counted on all CPUs since every CPU's sequence was set to `base`.
    pub fn runs_since(&self, base: u64) -> Result<u64> {
        let values = self.seq.get(&0, 0)?;
        Ok(values.iter().map(|v| v.wrapping_sub(base)).sum())
    }

    /// Makes `bench_wrap` tail-call `program` (of any object).
    pub fn set_target(&mut self, program: &Xdp) -> Result<()> {
        let fd = program.fd()?.try_clone()?;
        self.target
            .set(0, &fd, 0)
            .context("BENCH_TARGET: inserting the program under test")?;
        Ok(())
    }

    /// Makes `bench_wrap` tail-call the program of `fd` (one loaded by another loader).
    pub fn set_target_fd(&mut self, fd: &aya::programs::ProgramFd) -> Result<()> {
        self.target
            .set(0, fd, 0)
            .context("BENCH_TARGET: inserting the program under test")?;
        Ok(())
    }

    /// Makes `bench_lookup` find `frame` (its 40 bytes from the IP header on).
    pub fn add_lookup_key(&mut self, frame: &[u8]) -> Result<()> {
        ensure!(frame.len() >= 54, "frame too short for a lookup key");
        let mut key = [0u8; 40];
        key.copy_from_slice(&frame[14..54]);
        self.lookup.insert(key, [0u8; 56], 0)?;
        Ok(())
    }

    /// Empties the map `bench_lookup` / `bench_insert` use.
    pub fn clear_lookup(&mut self) -> Result<()> {
        let keys: Vec<[u8; 40]> = self
            .lookup
            .keys()
            .filter_map(std::result::Result::ok)
            .collect();
        for k in keys {
            let _ = self.lookup.remove(&k);
        }
        Ok(())
    }

    pub fn program(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(dataplane::program_mut(&mut self.ebpf, name)?)
    }

    /// The fd of one of this object's programs, to make it a target.
    pub fn set_target_own(&mut self, name: &str) -> Result<()> {
        let fd = dataplane::program_mut(&mut self.ebpf, name)?
            .fd()?
            .try_clone()?;
        self.target.set(0, &fd, 0)?;
        Ok(())
    }
}

/// struct xdp_md with `ingress_ifindex` set (data, data_end, data_meta, ingress_ifindex,
/// rx_queue_index, egress_ifindex).
pub fn xdp_md(frame_len: usize, ifindex: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&u32::try_from(frame_len).expect("a frame").to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// One timed BPF_PROG_TEST_RUN: (verdict of the last run, kernel-measured ns per run).
pub fn timed_run(prog: &mut Xdp, frame: &[u8], ifindex: u32, repeat: u32) -> Result<(u32, u64)> {
    let ctx = xdp_md(frame.len(), ifindex);
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::new()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok((r.return_value, u64::try_from(r.duration.as_nanos())?))
}

/// Transmits `count` frames from `prog` (`bench_gen`) in live-frames mode out of `ifindex`
/// (which must be in the calling thread's namespace). Returns the kernel's ns per frame.
pub fn live_frames(
    prog: &mut Xdp,
    frame: &[u8],
    ifindex: u32,
    count: u32,
    batch: u32,
) -> Result<u64> {
    let ctx = xdp_md(frame.len(), ifindex);
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat: count,
            attrs: TestRunAttrs::new().xdp_live_frames(batch),
            ..TestRunOptions::new()
        })
        .context("BPF_PROG_TEST_RUN (live frames)")?;
    if r.return_value != 0 {
        bail!("live-frames run returned {}", r.return_value);
    }
    Ok(u64::try_from(r.duration.as_nanos())?)
}

/// Raw fd of a program, for diagnostics.
pub fn prog_fd(prog: &Xdp) -> Option<i32> {
    use std::os::fd::AsRawFd;
    prog.fd().ok().map(|fd| fd.as_fd().as_raw_fd())
}

/// Whether this kernel runs programs in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES). Some
/// refuse it with EPERM (seen on 6.18.44-fc-v1300, root with CAP_BPF and CAP_NET_ADMIN): the
/// throughput generator then writes its frames to a packet socket ([`SocketGen`]).
pub fn live_frames_allowed() -> Result<bool> {
    let mut tools = BenchTools::load()?;
    // An all-zero frame dropped by `xdp_drop` "received" on the namespace's loopback: nothing
    // is sent anywhere.
    match live_frames(tools.program("xdp_drop")?, &[0u8; FRAME_LEN], 1, 1, 1) {
        Ok(_) => Ok(true),
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM))
            }) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The generator where live frames are refused: the frames `bench_gen` would make (the template
/// varied from sequence number `n` as [`Vary`] says, checksums recomputed), made here and written
/// to a packet socket on the interface, `BATCH_FRAMES` per sendmmsg, past the qdisc as a
/// live-frames transmit is. Slower than `bench_gen` (a system call per batch and an skb per
/// frame): the report says which generator ran.
pub struct SocketGen {
    socket: crate::flood::PacketSocket,
    template: Vec<u8>,
    vary: Vary,
    seq: u64,
    /// The frames of a cycling variation, made once (`Vary::cycle` of them); else made per batch.
    cycle: Vec<Vec<u8>>,
}

/// Frames per sendmmsg.
const BATCH_FRAMES: usize = 64;

impl SocketGen {
    /// Writes to `iface` (in the calling thread's namespace), from sequence number `seq`.
    pub fn open(iface: &str, frame: &[u8], vary: Vary, seq: u64) -> Result<SocketGen> {
        if vary.bits != 0 {
            ensure!(
                frame.len() >= 54 && frame[12..14] == [0x08, 0x00] && frame[14] == 0x45,
                "varied frames must be untagged IPv4 without options"
            );
        }
        let socket = crate::flood::PacketSocket::open(iface)?;
        socket.bypass_qdisc()?;
        let mut g = SocketGen {
            socket,
            template: frame.to_vec(),
            vary,
            seq,
            cycle: Vec::new(),
        };
        // A short cycle (the many-flows mix) is made once; a flood's sources are made per batch.
        if vary.bits != 0 && vary.cycle != 0 && vary.cycle <= 65_536 {
            g.cycle = (0..u64::from(vary.cycle)).map(|n| g.frame(n)).collect();
        }
        Ok(g)
    }

    /// Frame `n` of the variation.
    fn frame(&self, n: u64) -> Vec<u8> {
        let mut f = self.template.clone();
        let (a, p) = self.vary.offsets(n);
        if (a, p) == (0, 0) {
            return f;
        }
        let src = u32::from_be_bytes([f[26], f[27], f[28], f[29]]).wrapping_add(a);
        f[26..30].copy_from_slice(&src.to_be_bytes());
        let sport = u16::from_be_bytes([f[34], f[35]]).wrapping_add(p);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[24..26].fill(0);
        let ip = checksum(&f[14..34], 0);
        f[24..26].copy_from_slice(&ip);
        let total = usize::from(u16::from_be_bytes([f[16], f[17]])).min(f.len() - 14);
        let at = match f[23] {
            6 => 34 + 16,
            17 if f[40..42] != [0, 0] => 34 + 6,
            _ => return f,
        };
        f[at..at + 2].fill(0);
        let l4 = &f[34..14 + total];
        let l4_len = u32::try_from(total - 20).unwrap_or(0);
        let pseudo = pseudo_header_sum(&f[26..30], &f[30..34], f[23], l4_len);
        let sum = checksum(l4, pseudo);
        f[at..at + 2].copy_from_slice(&sum);
        f
    }

    /// Writes the next `count` frames; returns how many the kernel took.
    pub fn send(&mut self, count: u32) -> u64 {
        let mut taken = 0u64;
        let mut left = count as usize;
        let mut made: Vec<Vec<u8>> = Vec::with_capacity(BATCH_FRAMES);
        while left > 0 {
            let n = left.min(BATCH_FRAMES);
            let batch: Vec<&[u8]> = if !self.cycle.is_empty() {
                (0..n as u64)
                    .map(|i| {
                        let k = (self.seq + i) % self.cycle.len() as u64;
                        self.cycle[usize::try_from(k).unwrap_or(0)].as_slice()
                    })
                    .collect()
            } else if self.vary.bits != 0 {
                made.clear();
                made.extend((0..n as u64).map(|i| self.frame(self.seq + i)));
                made.iter().map(Vec::as_slice).collect()
            } else {
                vec![self.template.as_slice(); n]
            };
            let sent = self.socket.send_many(&batch);
            self.seq += sent as u64;
            taken += sent as u64;
            left -= n;
        }
        taken
    }
}
