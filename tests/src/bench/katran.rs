//! Katran's XDP balancer as the per-packet benchmark's reference, measured in the same run and
//! behind the same wrapper as xdplb (issue 15 states its targets as ratios to Katran).
//!
//! Katran is a benchmark reference, never part of xdplb: its source is fetched at a pinned
//! commit into `~/.cache/xdplb/katran/` at bench time (or a tree already there is used),
//! compiled with clang for the BPF target with its compile-time defaults, and loaded by libbpf
//! through `bpftool prog loadall ... pinmaps` into a bpffs this module mounts (aya's loader
//! does not take Katran's object: it relies on libbpf for the `lru_mapping` array of maps).
//! Its maps are then opened by path and set up as Katran's user space would for the issue's
//! setup: 1 VIP (TCP, port 80), 8 reals, the VIP's consistent-hash ring, the default gateway's
//! MAC in `ctl_array`, one LRU per CPU (created here, 4M entries each, put into `lru_mapping`:
//! without them Katran falls back to a small common `fallback_cache`, not its real path), and
//! the measuring CPU's LRU prefilled with flows.
//!
//! Anything missing (no network to fetch from, no clang, a load error) makes [`Katran::load`]
//! fail with the reason; the benchmark then says so and quotes the constants.
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    maps::{Array, ArrayOfMaps, HashMap, Map, MapData, PerCpuArray, PerCpuValues},
    programs::{ProgramFd, ProgramInfo},
};

use crate::agent::Bpffs;

/// The Katran commit fetched when no tree is in the cache. A tree assembled by hand where there
/// is no network may be another version: its PROVENANCE file beside it says which.
pub const COMMIT: &str = "020aa12f030a9ca81838ee08930cfb68f78f7507";
const TARBALL_URL: &str = "https://codeload.github.com/facebookincubator/katran/tar.gz";
/// Entries of each per-CPU LRU (the setup: Katran's per-CPU 4M-entry LRUs).
pub const LRU_ENTRIES: u32 = 4 << 20;

// balancer_consts.h (the defaults).
const RING_SIZE: u32 = 65_537;
const MAX_VIPS: u32 = 512;
const LRU_CNTRS: u32 = 0;
const LRU_MISS_CNTR: u32 = 1;
const NEW_CONN_RATE_CNTR: u32 = 2;
const FALLBACK_LRU_CNTR: u32 = 3;

const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_CREATE: libc::c_long = 0;

/// `struct flow_key` (40 bytes): IPv4 addresses in the first 4 bytes of their 16-byte unions.
pub fn flow_key(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[0..4].copy_from_slice(&src);
    k[16..20].copy_from_slice(&dst);
    k[32..34].copy_from_slice(&sport.to_be_bytes());
    k[34..36].copy_from_slice(&dport.to_be_bytes());
    k[36] = 6; // TCP
    k
}

/// `struct real_pos_lru` (16 bytes): the real's index, then atime (TCP flows leave it 0).
fn real_pos(index: u32) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[0..4].copy_from_slice(&index.to_ne_bytes());
    v
}

/// Where the Katran object came from, for the report.
#[derive(Clone, Debug)]
pub struct Built {
    pub object: PathBuf,
    pub source: String,
}

/// Makes sure clang, bpftool and libbpf's headers are there (installs them with apt-get if
/// not), finds or fetches Katran's source, and compiles `balancer.bpf.c`.
pub fn build() -> Result<Built> {
    let cache = cache_dir()?;
    ensure_tools()?;
    let (src, source) = source_tree(&cache)?;
    // libc's headers, included by Katran's sources, ask for the 32-bit stubs under a target
    // that defines no x86_64: an empty one stands in.
    let shim = cache.join("shim");
    std::fs::create_dir_all(shim.join("gnu"))?;
    let stubs = shim.join("gnu/stubs-32.h");
    if !stubs.exists() {
        std::fs::write(&stubs, "")?;
    }
    let object = cache.join("balancer.bpf.o");
    let arch_include = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let out = Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", "-w"])
        .arg(format!("-I{}", src.display()))
        .arg(format!("-I{}", shim.display()))
        .arg(format!("-I{arch_include}"))
        .arg("-c")
        .arg(src.join("katran/lib/bpf/balancer.bpf.c"))
        .arg("-o")
        .arg(&object)
        .output()
        .context("running clang")?;
    if !out.status.success() {
        bail!(
            "clang could not compile katran/lib/bpf/balancer.bpf.c: {}",
            tail(&String::from_utf8_lossy(&out.stderr))
        );
    }
    Ok(Built { object, source })
}

fn cache_dir() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let dir = PathBuf::from(home).join(".cache/xdplb/katran");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ensure_tools() -> Result<()> {
    let ready =
        || have("clang") && have("bpftool") && Path::new("/usr/include/bpf/bpf_helpers.h").exists();
    if ready() {
        return Ok(());
    }
    println!("  Katran: installing clang, libbpf-dev, bpftool (apt-get)");
    let out = Command::new("apt-get")
        .args(["install", "-y", "-q", "clang", "libbpf-dev", "bpftool"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .context("running apt-get")?;
    ensure!(
        out.status.success() && ready(),
        "clang, bpftool and libbpf-dev are needed to build Katran and apt-get could not install them: {}",
        tail(&String::from_utf8_lossy(&out.stderr))
    );
    Ok(())
}

/// The tree to build from: `$XDPLB_KATRAN_SRC`, else `<cache>/src` if it holds Katran's
/// balancer, else the pinned commit's tarball fetched into `<cache>/src`.
fn source_tree(cache: &Path) -> Result<(PathBuf, String)> {
    let main = |d: &Path| d.join("katran/lib/bpf/balancer.bpf.c").exists();
    if let Some(dir) = std::env::var_os("XDPLB_KATRAN_SRC").map(PathBuf::from) {
        ensure!(
            main(&dir),
            "XDPLB_KATRAN_SRC={}: no katran/lib/bpf/balancer.bpf.c there",
            dir.display()
        );
        return Ok((dir.clone(), format!("the tree in {}", dir.display())));
    }
    let src = cache.join("src");
    if main(&src) {
        let label = if let Ok(c) = std::fs::read_to_string(src.join(".commit")) {
            format!("facebookincubator/katran at {}", c.trim())
        } else if src.parent().is_some_and(|p| p.join("PROVENANCE").exists()) {
            format!(
                "the tree in {} (assembled by hand, see PROVENANCE beside it)",
                src.display()
            )
        } else {
            format!("the tree in {}", src.display())
        };
        return Ok((src, label));
    }
    let tarball = cache.join(format!("katran-{COMMIT}.tar.gz"));
    let out = Command::new("curl")
        .args(["-fsSL", "--max-time", "120", "-o"])
        .arg(&tarball)
        .arg(format!("{TARBALL_URL}/{COMMIT}"))
        .output()
        .context("running curl")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tarball);
        bail!(
            "fetching Katran's source (commit {COMMIT}) failed: {}",
            tail(&String::from_utf8_lossy(&out.stderr))
        );
    }
    let staging = cache.join("src.tmp");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let status = Command::new("tar")
        .args(["-xzf"])
        .arg(&tarball)
        .args(["--strip-components=1", "-C"])
        .arg(&staging)
        .status()
        .context("running tar")?;
    ensure!(
        status.success() && main(&staging),
        "Katran's tarball has no katran/lib/bpf/balancer.bpf.c"
    );
    std::fs::write(staging.join(".commit"), COMMIT)?;
    std::fs::rename(&staging, &src)?;
    Ok((src, format!("facebookincubator/katran at {COMMIT}")))
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// Sums of Katran's own counters over all CPUs (its `stats` map).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets to a VIP (LRU_CNTRS v1).
    pub vip_packets: u64,
    /// Of them, LRU misses routed by the ring (LRU_CNTRS v2).
    pub lru_misses: u64,
    /// TCP misses of a SYN (LRU_MISS_CNTR v1) ...
    pub syn_misses: u64,
    /// ... and of a non-SYN packet (LRU_MISS_CNTR v2).
    pub nonsyn_misses: u64,
    /// Packets that found no per-CPU LRU and used the fallback cache.
    pub fallback: u64,
    /// Packets of the VIP counted right before encapsulation (the VIP's own stats).
    pub encapsulated: u64,
}

impl Counters {
    pub fn delta(&self, before: &Counters) -> Counters {
        Counters {
            vip_packets: self.vip_packets.wrapping_sub(before.vip_packets),
            lru_misses: self.lru_misses.wrapping_sub(before.lru_misses),
            syn_misses: self.syn_misses.wrapping_sub(before.syn_misses),
            nonsyn_misses: self.nonsyn_misses.wrapping_sub(before.nonsyn_misses),
            fallback: self.fallback.wrapping_sub(before.fallback),
            encapsulated: self.encapsulated.wrapping_sub(before.encapsulated),
        }
    }
}

/// A loaded and configured Katran.
pub struct Katran {
    /// `balancer_ingress` (aya's `Xdp::from_pin` wants an attach type aya does not export;
    /// the wrapper's program array only needs the fd).
    pub program: ProgramFd,
    stats: PerCpuArray<MapData, [u64; 2]>,
    /// The per-CPU LRUs (index = CPU); the measuring CPU's is the one the runs use.
    lrus: Vec<HashMap<MapData, [u8; 40], [u8; 16]>>,
    cpu: usize,
    cpus: usize,
    pub built: Built,
    pub prefilled: u32,
    /// Keep: the maps and program are pinned there; unmounted on drop.
    _bpffs: Bpffs,
}

/// The setup: one TCP VIP and its reals.
pub struct Setup {
    pub vip: [u8; 4],
    pub port: u16,
    pub reals: Vec<[u8; 4]>,
    pub gateway_mac: [u8; 6],
}

impl Katran {
    /// Loads the object `build` made and configures it for `setup`, with per-CPU LRUs of
    /// `lru_entries` each; `cpu` is the CPU the measurements run on.
    pub fn load(built: Built, setup: &Setup, lru_entries: u32, cpu: usize) -> Result<Katran> {
        let bpffs = Bpffs::mount("katran")?;
        let dir = bpffs.path().to_path_buf();
        let out = Command::new("bpftool")
            .args(["prog", "loadall"])
            .arg(&built.object)
            .arg(dir.join("prog"))
            .args(["type", "xdp", "pinmaps"])
            .arg(dir.join("maps"))
            .output()
            .context("running bpftool")?;
        if !out.status.success() {
            bail!(
                "bpftool could not load Katran's balancer: {}",
                tail(&String::from_utf8_lossy(&out.stderr))
            );
        }
        let map = |name: &str| -> Result<Map> {
            let data = MapData::from_pin(dir.join("maps").join(name))
                .with_context(|| format!("Katran's map {name}"))?;
            Ok(Map::from_map_data(data)?)
        };
        let program = ProgramInfo::from_pin(dir.join("prog/balancer_ingress"))
            .and_then(|p| p.fd())
            .context("Katran's balancer_ingress")?;
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;

        // VIP -> vip_num 0, no flags.
        let mut vip_map: HashMap<MapData, [u8; 20], [u8; 8]> = map("vip_map")?.try_into()?;
        let mut vip = [0u8; 20];
        vip[0..4].copy_from_slice(&setup.vip);
        vip[16..18].copy_from_slice(&setup.port.to_be_bytes());
        vip[18] = 6;
        vip_map.insert(vip, [0u8; 8], 0)?;
        // Reals 1..=n (index 0 means "no real" to Katran).
        let mut reals: Array<MapData, [u8; 20]> = map("reals")?.try_into()?;
        for (i, r) in setup.reals.iter().enumerate() {
            let mut def = [0u8; 20];
            def[0..4].copy_from_slice(r);
            reals.set(u32::try_from(i + 1)?, def, 0)?;
        }
        // The VIP's ring (vip_num 0: slots 0..RING_SIZE). Katran's user space fills it with
        // Maglev; the reals are spread round robin here, which costs the data path the same
        // (one array lookup).
        let mut ring: Array<MapData, u32> = map("ch_rings")?.try_into()?;
        let n = u32::try_from(setup.reals.len())?;
        ensure!(n > 0, "Katran needs at least one real");
        for slot in 0..RING_SIZE {
            ring.set(slot, slot % n + 1, 0)?;
        }
        let mut ctl: Array<MapData, [u8; 8]> = map("ctl_array")?.try_into()?;
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&setup.gateway_mac);
        ctl.set(0, mac, 0)?;
        // One LRU per CPU, as Katran's user space creates them, into lru_mapping.
        let mut mapping: ArrayOfMaps<MapData, MapData> = map("lru_mapping")?.try_into()?;
        let mut lrus = Vec::new();
        for c in 0..cpus {
            let fd = create_lru(lru_entries, &format!("katran_lru{c}"))
                .with_context(|| format!("creating the {lru_entries}-entry LRU of CPU {c}"))?;
            let data = MapData::from_fd(fd)?;
            mapping
                .set(u32::try_from(c)?, &data, 0)
                .context("lru_mapping")?;
            lrus.push(HashMap::try_from(Map::LruHashMap(data))?);
        }
        let stats = map("stats")?.try_into()?;
        Ok(Katran {
            program,
            stats,
            lrus,
            cpu,
            cpus,
            built,
            prefilled: 0,
            _bpffs: bpffs,
        })
    }

    fn lru(&mut self) -> &mut HashMap<MapData, [u8; 40], [u8; 16]> {
        &mut self.lrus[self.cpu]
    }

    /// Adds a flow to the measuring CPU's LRU (to real `real`, 1-based).
    pub fn add_flow(&mut self, key: [u8; 40], real: u32) -> Result<()> {
        self.lru().insert(key, real_pos(real), 0)?;
        Ok(())
    }

    /// Fills the measuring CPU's LRU with `count` flows of synthetic clients to the VIP (as
    /// the xdplb reference setup is filled: 10.200.0.0/16, ports from 1024).
    pub fn fill(&mut self, setup: &Setup, count: u32) -> Result<()> {
        let reals = u32::try_from(setup.reals.len())?;
        for i in 0..count {
            let src = (u32::from_be_bytes([10, 200, 0, 0]) + (i & 0xffff)).to_be_bytes();
            let sport = u16::try_from(1024 + (i >> 16))?;
            self.add_flow(flow_key(src, setup.vip, sport, setup.port), i % reals + 1)?;
        }
        self.prefilled += count;
        Ok(())
    }

    /// Deletes the flows of `keys` from the measuring CPU's LRU; returns how many were there.
    pub fn forget_flows(&mut self, keys: &[[u8; 40]]) -> u64 {
        let lru = self.lru();
        let mut found = 0;
        for k in keys {
            if lru.remove(k).is_ok() {
                found += 1;
            }
        }
        found
    }

    pub fn counters(&self) -> Result<Counters> {
        let get = |k: u32| -> Result<(u64, u64)> {
            let v = self.stats.get(&k, 0)?;
            Ok(v.iter().fold((0, 0), |(a, b), x| (a + x[0], b + x[1])))
        };
        let (vip_packets, lru_misses) = get(MAX_VIPS + LRU_CNTRS)?;
        let (syn_misses, nonsyn_misses) = get(MAX_VIPS + LRU_MISS_CNTR)?;
        let (fallback, _) = get(MAX_VIPS + FALLBACK_LRU_CNTR)?;
        let (encapsulated, _) = get(0)?;
        Ok(Counters {
            vip_packets,
            lru_misses,
            syn_misses,
            nonsyn_misses,
            fallback,
            encapsulated,
        })
    }

    /// Starts a new second of Katran's new-connection rate guard on every CPU: past 125k new
    /// flows per second and CPU it stops inserting into the LRU (cheaper, and not its normal
    /// path). A timed run creates far fewer.
    pub fn reset_rate_guard(&mut self) -> Result<()> {
        let zero = PerCpuValues::try_from(vec![[0u64; 2]; self.cpus])?;
        self.stats.set(MAX_VIPS + NEW_CONN_RATE_CNTR, zero, 0)?;
        Ok(())
    }
}

/// BPF_MAP_CREATE of an LRU hash of Katran's flow key and value, flags 0 (the inner map
/// template of `lru_mapping`: map-in-map requires the same type, sizes and flags).
fn create_lru(entries: u32, name: &str) -> Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
        // The rest of union bpf_attr's map-create part, zero.
        rest: [u8; 64],
    }
    let mut map_name = [0u8; 16];
    for (d, s) in map_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let attr = Attr {
        map_type: BPF_MAP_TYPE_LRU_HASH,
        key_size: 40,
        value_size: 16,
        max_entries: entries,
        map_flags: 0,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
        rest: [0; 64],
    };
    // SAFETY: a BPF_MAP_CREATE attribute block of the size passed; the kernel reads it only.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &raw const attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if fd < 0 {
        bail!("BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd)?) };
    debug_assert!(fd.as_raw_fd() >= 0);
    Ok(fd)
}
