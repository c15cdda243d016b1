//! Real servers and clients from Debian packages (nginx, curl, tcpdump, ethtool, promtool),
//! run inside the lab's namespaces as users run them: default settings, default offloads. Every
//! process is time-bounded twice: by `timeout -s KILL` around it (which holds even if the test
//! process dies) and by a guard that kills its whole process group on drop (panics included).
//! nginx runs from a private prefix in a temporary directory: never the host's /etc/nginx or
//! /var/log. `cargo xtask setup` installs the packages.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::Netns;

/// A directory under /tmp removed with its content on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl TempDir {
    /// `/tmp/xdplb-<label>-<pid>-<n>`, created empty.
    pub fn new(label: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!(
            "xdplb-{label}-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A program running inside a namespace as `ip netns exec NS timeout -s KILL LIMIT PROGRAM ARGS`,
/// leader of its own process group (so `timeout` and the program go together). Killed with its
/// group on drop. The group is signalled only while its leader is not reaped: until then its
/// PID (the group's ID) cannot name anything else.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    what: String,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `program args` in `ns`, killed after `limit` at the latest. `cmd_setup` sets the
    /// standard streams (stdin is null unless it says otherwise).
    pub fn spawn(
        ns: &Netns,
        limit: Duration,
        program: &str,
        args: &[&str],
        cmd_setup: impl FnOnce(&mut Command),
    ) -> Result<Proc> {
        let mut cmd = bounded(ns, limit, program, args);
        cmd_setup(&mut cmd);
        let what = format!("{program} {} (in {})", args.join(" "), ns.name());
        let child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
        Ok(Proc {
            child,
            what,
            status: None,
        })
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends `sig` to the whole group, unless the leader has been reaped.
    pub fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: kill(2) on the group of our own unreaped child; no memory involved.
            unsafe { libc::kill(-self.child.id().cast_signed(), sig) };
        }
    }

    /// Some(status) once it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.what))?;
        }
        Ok(self.status)
    }

    /// Waits at most `limit` for the exit; on expiry kills the group and fails.
    pub fn wait_for(&mut self, limit: Duration) -> Result<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if started.elapsed() > limit {
                self.kill();
                bail!("{} did not exit within {limit:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM to the group, then SIGKILL if it is still there after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(libc::SIGTERM);
        self.wait_for(grace)
    }

    fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if self.status.is_none()
            && let Ok(status) = self.child.wait()
        {
            self.status = Some(status);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The command line shared by `Proc::spawn` and `run`.
fn bounded(ns: &Netns, limit: Duration, program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    let program = find_program(program).unwrap_or_else(|| PathBuf::from(program));
    cmd.args(["netns", "exec", ns.name(), "timeout", "-s", "KILL"])
        .arg(format!("{}", limit.as_secs().max(1)))
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .process_group(0);
    cmd
}

/// Runs `program args` in `ns` to completion (at most `limit`) and returns its output, whatever
/// its exit status.
pub fn run(ns: &Netns, limit: Duration, program: &str, args: &[&str]) -> Result<Output> {
    let mut proc = Proc::spawn(ns, limit, program, args, |c| {
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
    })?;
    // Read both pipes on threads so neither fills up; `timeout` bounds the process, and the
    // pipes close when it ends (the programs run here start no others).
    let mut stdout = proc.child.stdout.take().expect("piped");
    let mut stderr = proc.child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let status = proc.wait_for(limit + Duration::from_secs(5))?;
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// `run`, failing unless the exit status is 0; returns stdout.
pub fn run_ok(ns: &Netns, limit: Duration, program: &str, args: &[&str]) -> Result<String> {
    let out = run(ns, limit, program, args)?;
    ensure!(
        out.status.success(),
        "`{program} {}` in {} failed ({}): {}{}",
        args.join(" "),
        ns.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where `program` is: on PATH, or in the sbin directories (nginx, tcpdump and ethtool live
/// there) that a non-login PATH may lack.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Fails with a hint when a program `cargo xtask setup` installs is missing.
pub fn require_programs(programs: &[&str]) -> Result<()> {
    for p in programs {
        ensure!(
            find_program(p).is_some(),
            "`{p}` is not installed: run `cargo xtask setup` (it installs the Debian packages the \
             e2e tests use)"
        );
    }
    Ok(())
}

/// `sha256sum FILE`, as hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("running sha256sum")?;
    ensure!(
        out.status.success(),
        "sha256sum {}: {}",
        path.display(),
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .context("empty sha256sum output")?
        .to_string())
}

/// Writes `len` bytes of pseudo-random data (xorshift, seeded): incompressible, and different
/// at every offset, so a misplaced or repeated segment changes the hash.
pub fn write_random_file(path: &Path, len: usize, seed: u64) -> Result<()> {
    let mut state = seed | 1;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(len);
    fs::write(path, data).with_context(|| format!("writing {}", path.display()))
}

/// The offload settings of `iface` in `ns` as `ethtool -k` prints them ("tcp-segmentation-offload"
/// -> "on", ...).
pub fn offloads(ns: &Netns, iface: &str) -> Result<BTreeMap<String, String>> {
    let text = run_ok(ns, Duration::from_secs(10), "ethtool", &["-k", iface])?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| {
            let v = v.trim();
            // "on [fixed]" -> "on".
            let v = v.split_whitespace().next().unwrap_or("");
            (k.trim().to_string(), v.to_string())
        })
        .collect())
}

/// One TCP MIB value of the namespace `ns` (`Tcp` row of /proc/net/snmp or `TcpExt` row of
/// /proc/net/netstat, e.g. ("TcpExt", "TCPSynRetrans")), read by a thread inside it.
pub fn mib(ns: &Netns, row: &str, field: &str) -> Result<u64> {
    let file = if row == "TcpExt" { "netstat" } else { "snmp" };
    let text = ns.run(move || fs::read_to_string(format!("/proc/thread-self/net/{file}")))??;
    let prefix = format!("{row}:");
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
    ensure!(rows.len() >= 2, "no {row} rows in /proc/net/{file}");
    let names = rows[0].split_whitespace().skip(1);
    let values = rows[1].split_whitespace().skip(1);
    for (n, v) in names.zip(values) {
        if n == field {
            return v.parse().with_context(|| format!("{row} {field} = {v:?}"));
        }
    }
    bail!("no {row} {field} in /proc/net/{file}")
}

// ---------------------------------------------------------------------------------------------
// nginx

/// nginx serving from a private prefix in a pod's namespace, dual stack on one port.
///
/// Paths: `GET /small` answers `"<name>\n"`; `GET /files/<f>` serves files put there with
/// [`Nginx::add_file`]; `PUT /upload/<f>` stores the body (WebDAV) in `upload/<f>`. Debian's
/// defaults for transfers: `sendfile on; tcp_nopush on;`.
#[derive(Debug)]
pub struct Nginx {
    name: String,
    port: u16,
    dir: TempDir,
    proc: Proc,
}

/// How long an nginx lives at most.
const NGINX_LIFETIME: Duration = Duration::from_secs(600);

impl Nginx {
    /// Starts nginx in `ns`, named `name` (what /small answers). `keepalive: false` closes each
    /// connection after its response (the server closes first, as nginx with
    /// `keepalive_timeout 0`). Returns once it accepts connections.
    pub fn start(ns: &Netns, name: &str, port: u16, keepalive: bool) -> Result<Nginx> {
        let dir = TempDir::new(&format!("nginx-{name}"))?;
        let d = dir.path().display().to_string();
        for sub in ["files", "upload", "tmp"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let keepalive_timeout = if keepalive { "75s" } else { "0" };
        let mut conf = String::new();
        // master_process off: one process, no user switch (the prefix is root's only), and
        // nothing left behind when the group is killed.
        writeln!(
            conf,
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             worker_rlimit_nofile 16384;\nevents {{ worker_connections 8192; }}\nhttp {{\n\
             access_log off;\n\
             client_body_temp_path {d}/tmp/body;\nproxy_temp_path {d}/tmp/proxy;\n\
             fastcgi_temp_path {d}/tmp/fastcgi;\nuwsgi_temp_path {d}/tmp/uwsgi;\n\
             scgi_temp_path {d}/tmp/scgi;\n\
             default_type application/octet-stream;\nsendfile on;\ntcp_nopush on;\n\
             keepalive_timeout {keepalive_timeout};\nclient_max_body_size 0;\n\
             server {{\n  listen {port};\n  listen [::]:{port};\n  root {d};\n\
             location = /small {{ return 200 \"{name}\\n\"; }}\n\
             location /files/ {{ }}\n\
             location /upload/ {{ dav_methods PUT; create_full_put_path on; }}\n}}\n}}"
        )?;
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let stderr = fs::File::create(dir.join("stderr.log"))?;
        let conf_arg = conf_path.display().to_string();
        let proc = Proc::spawn(
            ns,
            NGINX_LIFETIME,
            "nginx",
            // -e: the log nginx opens before reading its config (else the compiled-in one).
            &["-p", &d, "-c", &conf_arg, "-e", &format!("{d}/error.log")],
            |c| {
                c.stdout(Stdio::null()).stderr(stderr);
            },
        )?;
        let mut nginx = Nginx {
            name: name.to_string(),
            port,
            dir,
            proc,
        };
        nginx.wait_listening(ns)?;
        Ok(nginx)
    }

    fn wait_listening(&mut self, ns: &Netns) -> Result<()> {
        let port = self.port;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.proc.try_wait()? {
                bail!(
                    "nginx {} exited ({status}): {}",
                    self.name,
                    self.error_log()
                );
            }
            let up = ns.run(move || {
                [
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                ]
                .iter()
                .all(|ip| {
                    TcpStream::connect_timeout(
                        &SocketAddr::new(*ip, port),
                        Duration::from_millis(200),
                    )
                    .is_ok()
                })
            })?;
            if up {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx {} not listening within 10 s: {}",
                    self.name,
                    self.error_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hard-links (or copies) `src` to `files/<name>`, served at `/files/<name>`.
    pub fn add_file(&self, src: &Path, name: &str) -> Result<()> {
        let dst = self.dir.join("files").join(name);
        if fs::hard_link(src, &dst).is_err() {
            fs::copy(src, &dst).with_context(|| format!("copying to {}", dst.display()))?;
        }
        Ok(())
    }

    /// Where `PUT /upload/<name>` stored its body.
    pub fn uploaded(&self, name: &str) -> PathBuf {
        self.dir.join("upload").join(name)
    }

    /// nginx's error log and stderr, for failure messages.
    pub fn error_log(&self) -> String {
        let mut s = fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
        s.push_str(&fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default());
        s
    }

    /// Whether the server is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.proc.try_wait(), Ok(None))
    }
}

/// `http://ADDR:PORT` with IPv6 in brackets.
pub fn http_base(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

// ---------------------------------------------------------------------------------------------
// tcpdump and what a capture shows

/// tcpdump writing a pcap file in a namespace, until `stop`.
pub struct Capture {
    proc: Proc,
    file: PathBuf,
    stderr: PathBuf,
}

/// What tcpdump said when it stopped.
#[derive(Clone, Debug, Default)]
pub struct CaptureStats {
    pub captured: u64,
    /// Packets the kernel's filter passed: more than `captured` means tcpdump missed some.
    pub received: u64,
    pub dropped_by_kernel: u64,
}

impl CaptureStats {
    /// Every packet the filter matched is in the file.
    pub fn complete(&self) -> bool {
        self.dropped_by_kernel == 0 && self.captured == self.received
    }
}

impl Capture {
    /// Starts `tcpdump -i IFACE -w FILE FILTER` in `ns` (headers only: 128 bytes per packet;
    /// a 32 MiB buffer) and returns once it listens.
    pub fn start(
        ns: &Netns,
        iface: &str,
        filter: &str,
        dir: &TempDir,
        label: &str,
    ) -> Result<Capture> {
        let file = dir.join(&format!("{label}.pcap"));
        let stderr = dir.join(&format!("{label}.tcpdump.log"));
        let file_arg = file.display().to_string();
        let err = fs::File::create(&stderr)?;
        // -Z root: Debian's tcpdump otherwise drops to user tcpdump, who cannot write here.
        // --immediate-mode: each packet reaches tcpdump at once (else the kernel hands them
        // over in blocks, up to a second late, and a capture stopped early misses the last).
        let mut args = vec![
            "-i",
            iface,
            "-nn",
            "-s",
            "128",
            "-B",
            "32768",
            "--immediate-mode",
            "-U",
            "-Z",
            "root",
            "-w",
            &file_arg,
        ];
        args.extend(filter.split_whitespace());
        let proc = Proc::spawn(ns, Duration::from_secs(300), "tcpdump", &args, |c| {
            c.stdout(Stdio::null()).stderr(err);
        })?;
        let mut capture = Capture { proc, file, stderr };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = fs::read_to_string(&capture.stderr).unwrap_or_default();
            if log.contains("listening on") {
                return Ok(capture);
            }
            if let Some(status) = capture.proc.try_wait()? {
                bail!("tcpdump exited ({status}): {log}");
            }
            if Instant::now() > deadline {
                bail!("tcpdump did not start listening within 10 s: {log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops tcpdump (it writes out what it has) and returns its counts and the file.
    pub fn stop(mut self) -> Result<(CaptureStats, PathBuf)> {
        // Let the last packets reach the buffer first.
        std::thread::sleep(Duration::from_millis(200));
        self.proc.terminate(Duration::from_secs(10))?;
        let log = fs::read_to_string(&self.stderr).unwrap_or_default();
        let number = |what: &str| {
            log.lines()
                .find(|l| l.ends_with(what))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
        };
        let stats = CaptureStats {
            captured: number("packets captured").with_context(|| format!("tcpdump said: {log}"))?,
            received: number("packets received by filter")
                .with_context(|| format!("tcpdump said: {log}"))?,
            dropped_by_kernel: number("packets dropped by kernel")
                .with_context(|| format!("tcpdump said: {log}"))?,
        };
        Ok((stats, self.file.clone()))
    }
}

/// One TCP segment of a capture: addresses, flags, sequence numbers, payload length (from the
/// IP header, so truncated captures still tell it), and the length on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub syn: bool,
    pub ack_flag: bool,
    pub fin: bool,
    pub rst: bool,
    pub payload: u32,
    pub wire_len: u32,
}

/// The TCP segments of a pcap file (Ethernet; IPv4 or IPv6 without extension headers; anything
/// else is skipped).
pub fn read_pcap(path: &Path) -> Result<Vec<Segment>> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(data.len() >= 24, "{}: no pcap header", path.display());
    let magic = u32::from_le_bytes(data[0..4].try_into()?);
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        _ => bail!("{}: not a pcap file (magic {magic:#x})", path.display()),
    };
    let u32_at = |b: &[u8], at: usize| -> u32 {
        let bytes: [u8; 4] = b[at..at + 4].try_into().expect("4 bytes");
        if le {
            u32::from_le_bytes(bytes)
        } else {
            u32::from_be_bytes(bytes)
        }
    };
    let linktype = u32_at(&data, 20);
    ensure!(
        linktype == 1,
        "{}: link type {linktype}, not Ethernet",
        path.display()
    );
    let mut segments = Vec::new();
    let mut at = 24;
    while at + 16 <= data.len() {
        let incl = u32_at(&data, at + 8) as usize;
        let orig = u32_at(&data, at + 12);
        let start = at + 16;
        let end = start + incl;
        ensure!(end <= data.len(), "{}: truncated record", path.display());
        if let Some(seg) = parse_frame(&data[start..end], orig) {
            segments.push(seg);
        }
        at = end;
    }
    Ok(segments)
}

fn parse_frame(f: &[u8], wire_len: u32) -> Option<Segment> {
    let be16 = |at: usize| -> Option<u16> {
        Some(u16::from_be_bytes(f.get(at..at + 2)?.try_into().ok()?))
    };
    let be32 = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(f.get(at..at + 4)?.try_into().ok()?))
    };
    let ethertype = be16(12)?;
    let (src, dst, l4, l4_len) = match ethertype {
        0x0800 => {
            let ihl = usize::from(f.get(14)? & 0x0f) * 4;
            if *f.get(23)? != 6 {
                return None;
            }
            let total = usize::from(be16(16)?);
            let s: [u8; 4] = f.get(26..30)?.try_into().ok()?;
            let d: [u8; 4] = f.get(30..34)?.try_into().ok()?;
            (
                IpAddr::from(s),
                IpAddr::from(d),
                14 + ihl,
                total.checked_sub(ihl)?,
            )
        }
        0x86dd => {
            if *f.get(20)? != 6 {
                return None;
            }
            let payload = usize::from(be16(18)?);
            let s: [u8; 16] = f.get(22..38)?.try_into().ok()?;
            let d: [u8; 16] = f.get(38..54)?.try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), 54, payload)
        }
        _ => return None,
    };
    let sport = be16(l4)?;
    let dport = be16(l4 + 2)?;
    let seq = be32(l4 + 4)?;
    let ack = be32(l4 + 8)?;
    let doff = usize::from(f.get(l4 + 12)? >> 4) * 4;
    let flags = *f.get(l4 + 13)?;
    Some(Segment {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
        seq,
        ack,
        syn: flags & 0x02 != 0,
        ack_flag: flags & 0x10 != 0,
        fin: flags & 0x01 != 0,
        rst: flags & 0x04 != 0,
        payload: u32::try_from(l4_len.checked_sub(doff)?).ok()?,
        wire_len,
    })
}

/// How a server answered the SYNs it received, from a capture at the server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SynAnswers {
    /// SYNs received (retransmissions included).
    pub syns: u64,
    /// SYNs with the same tuple and sequence number as an earlier one (client retransmissions).
    pub retransmitted_syns: u64,
    /// Answered with a SYN-ACK acknowledging the SYN.
    pub syn_acks: u64,
    /// Answered with a bare ACK (no SYN): a connection the server still holds for that tuple
    /// (TIME_WAIT) acknowledging an older sequence number: the new connection is refused.
    pub bare_acks: u64,
    pub resets: u64,
    /// SYNs the capture shows no answer to (by the next SYN of the tuple or the end).
    pub unanswered: u64,
    /// A few examples of bare ACKs: (client, server, SYN seq, ACK's ack number).
    pub bare_ack_examples: Vec<(SocketAddr, SocketAddr, u32, u32)>,
}

/// Classifies the server's first answer to each SYN sent to `server_port`.
pub fn syn_answers(segments: &[Segment], server_port: u16) -> SynAnswers {
    let mut out = SynAnswers::default();
    // (client, server) -> the SYN's sequence number, while unanswered.
    let mut pending: BTreeMap<(SocketAddr, SocketAddr), u32> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::<(SocketAddr, SocketAddr, u32)>::new();
    for s in segments {
        if s.dst.port() == server_port && s.syn && !s.ack_flag {
            out.syns += 1;
            if !seen.insert((s.src, s.dst, s.seq)) {
                out.retransmitted_syns += 1;
            }
            if pending.insert((s.src, s.dst), s.seq).is_some() {
                out.unanswered += 1;
            }
        } else if s.src.port() == server_port
            && let Some(seq) = pending.remove(&(s.dst, s.src))
        {
            if s.rst {
                out.resets += 1;
            } else if s.syn && s.ack_flag && s.ack == seq.wrapping_add(1) {
                out.syn_acks += 1;
            } else if s.ack_flag && !s.syn {
                out.bare_acks += 1;
                if out.bare_ack_examples.len() < 5 {
                    out.bare_ack_examples.push((s.dst, s.src, seq, s.ack));
                }
            } else {
                // Some other answer (a SYN-ACK for another sequence): keep waiting for this one.
                pending.insert((s.dst, s.src), seq);
            }
        }
    }
    out.unanswered += pending.len() as u64;
    out
}

// ---------------------------------------------------------------------------------------------
// curl

/// One transfer as curl reported it (`--write-out`).
#[derive(Clone, Debug, Default)]
pub struct CurlResult {
    pub exit_code: i32,
    pub http_code: u32,
    /// Bytes of the body received (download) or sent (upload).
    pub bytes: u64,
    pub seconds: f64,
    pub connect_seconds: f64,
    pub connects: u32,
    pub error: String,
}

/// What `-w` asks curl for, one line per transfer, tab-separated; parsed by `CurlResult::parse`.
pub const CURL_WRITE_OUT: &str = "%{exitcode}\t%{http_code}\t%{size_download}\t%{size_upload}\t%{time_total}\t%{time_connect}\t%{num_connects}\t%{errormsg}\n";

impl CurlResult {
    pub fn parse(line: &str, upload: bool) -> Result<CurlResult> {
        let f: Vec<&str> = line.split('\t').collect();
        ensure!(f.len() >= 8, "curl -w line {line:?}");
        let bytes = if upload { f[3] } else { f[2] };
        Ok(CurlResult {
            exit_code: f[0].parse()?,
            http_code: f[1].parse()?,
            bytes: bytes.parse()?,
            seconds: f[4].parse()?,
            connect_seconds: f[5].parse()?,
            connects: f[6].parse()?,
            error: f[7..].join("\t"),
        })
    }

    pub fn ok(&self) -> bool {
        self.exit_code == 0 && (200..300).contains(&self.http_code)
    }
}

/// Runs curl in `ns` with `args` plus `-sS -w CURL_WRITE_OUT`, and parses one result per
/// transfer from its stdout. `limit` bounds the process.
pub fn curl(
    ns: &Netns,
    limit: Duration,
    args: &[&str],
    upload: bool,
) -> Result<(Vec<CurlResult>, String)> {
    let mut all = vec!["-sS", "-w", CURL_WRITE_OUT];
    all.extend_from_slice(args);
    let out = run(ns, limit, "curl", &all)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let results = stdout
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| CurlResult::parse(l, upload))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("curl output: {stdout}"))?;
    Ok((results, String::from_utf8_lossy(&out.stderr).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(src: &str, dst: &str, seq: u32, ack: u32, flags: &str) -> Segment {
        Segment {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            seq,
            ack,
            syn: flags.contains('S'),
            ack_flag: flags.contains('A'),
            fin: flags.contains('F'),
            rst: flags.contains('R'),
            payload: 0,
            wire_len: 54,
        }
    }

    #[test]
    fn a_syn_answered_by_a_bare_ack_is_told_from_a_handshake() {
        let c = "10.0.0.1:61000";
        let s = "10.1.2.2:8080";
        let segments = [
            seg(c, s, 100, 0, "S"),
            seg(s, c, 5000, 101, "SA"),
            seg(c, s, 101, 5001, "A"),
            // A new SYN on the same tuple meets the old connection in TIME_WAIT.
            seg(c, s, 50, 0, "S"),
            seg(s, c, 5002, 102, "A"),
            seg(c, s, 102, 0, "R"),
            // The client retries the same SYN after its RTO and gets through.
            seg(c, s, 50, 0, "S"),
            seg(s, c, 9000, 51, "SA"),
            // A SYN nobody answered.
            seg("10.0.0.1:61001", s, 7, 0, "S"),
        ];
        let a = syn_answers(&segments, 8080);
        assert_eq!(a.syns, 4);
        assert_eq!(a.retransmitted_syns, 1);
        assert_eq!(a.syn_acks, 2);
        assert_eq!(a.bare_acks, 1);
        assert_eq!(a.unanswered, 1);
        assert_eq!(a.resets, 0);
        assert_eq!(
            a.bare_ack_examples,
            vec![(c.parse().unwrap(), s.parse().unwrap(), 50, 102)]
        );
    }

    #[test]
    fn curl_write_out_lines_parse() {
        let r = CurlResult::parse("0\t200\t67108864\t0\t1.5\t0.001\t1\t", false).unwrap();
        assert!(r.ok());
        assert_eq!(r.bytes, 67_108_864);
        let r =
            CurlResult::parse("28\t000\t2048\t0\t5.0\t0\t1\tOperation too slow", false).unwrap();
        assert!(!r.ok());
        assert_eq!(r.error, "Operation too slow");
    }
}
