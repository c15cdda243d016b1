//! A real Kubernetes API server for tests: etcd plus `tests/k8s-apiserver` (k8s.io/apiserver's
//! generic server serving namespaces, services, endpointslices, daemonsets, events and a few more
//! built-in kinds; see its README.md). Both run as child processes on free 127.0.0.1 ports, with
//! their data, certificates, logs and kubeconfig in a fresh temporary directory.
//!
//! ```no_run
//! let mut server = lb_tests::apiserver::TestApiServer::start()?;
//! // KUBECONFIG=server.kubeconfig_path() ... talk to server.url() ...
//! server.restart()?; // the API server process only; etcd keeps the data, same URL
//! # anyhow::Ok(())
//! ```
//!
//! The binaries come from `tests/k8s-apiserver/build.sh` (run once per process; it caches its work
//! under `${XDPLB_CACHE:-$HOME/.cache/xdplb}/k8s`, about 5 minutes the first time on a new machine
//! and milliseconds after that). Set `XDPLB_K8S_APISERVER` and `XDPLB_ETCD` to use prebuilt
//! binaries instead, and `XDPLB_K8S_KEEP=1` to keep the temporary directory for a look afterwards.
//!
//! Every child is killed and waited for when the [`TestApiServer`] is dropped (also while
//! panicking). Should the test process itself die, the children notice their standard input
//! closing and exit too.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};

/// How long `build.sh` may take (a first build on a new machine takes about 5 minutes).
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long etcd may take to answer /health.
const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the API server may take to answer /readyz (about 1 s here).
const APISERVER_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped child may take to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of a log shown in an error.
const LOG_TAIL_LINES: usize = 40;

/// Absolute paths of the two programs.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub apiserver: PathBuf,
    pub etcd: PathBuf,
}

/// Builds the API server and etcd with `tests/k8s-apiserver/build.sh` (cached) once per process,
/// or takes them from `XDPLB_K8S_APISERVER` and `XDPLB_ETCD`.
pub fn binaries() -> Result<Binaries> {
    static BINARIES: OnceLock<Result<Binaries, String>> = OnceLock::new();
    BINARIES
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The workspace root (the parent of this crate's directory).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn build() -> Result<Binaries> {
    if let (Some(apiserver), Some(etcd)) = (
        std::env::var_os("XDPLB_K8S_APISERVER"),
        std::env::var_os("XDPLB_ETCD"),
    ) {
        return Ok(Binaries {
            apiserver: apiserver.into(),
            etcd: etcd.into(),
        });
    }
    let root = workspace_root();
    let script = root.join("tests/k8s-apiserver/build.sh");
    let tmp = unique_temp_dir("xdplb-k8s-build")?;
    let (out_path, err_path) = (tmp.join("stdout"), tmp.join("stderr"));
    let result = (|| {
        let mut child = Command::new("bash")
            .arg(&script)
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path)?)
            .stderr(fs::File::create(&err_path)?)
            .spawn()
            .with_context(|| format!("running {}", script.display()))?;
        let Some(status) = wait_timeout(&mut child, BUILD_TIMEOUT)? else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} did not finish within {:?}; its output ends with:\n{}",
                script.display(),
                BUILD_TIMEOUT,
                tail(&err_path, LOG_TAIL_LINES)
            );
        };
        if !status.success() {
            bail!(
                "{} failed ({status}); its output ends with:\n{}",
                script.display(),
                tail(&err_path, LOG_TAIL_LINES)
            );
        }
        let out = fs::read_to_string(&out_path)?;
        let find = |key: &str| {
            out.lines()
                .rev()
                .find_map(|l| l.strip_prefix(key))
                .map(PathBuf::from)
                .ok_or_else(|| {
                    anyhow!(
                        "{} printed no {key} line; stdout:\n{out}\nstderr ends with:\n{}",
                        script.display(),
                        tail(&err_path, LOG_TAIL_LINES)
                    )
                })
        };
        Ok(Binaries {
            apiserver: find("APISERVER=")?,
            etcd: find("ETCD=")?,
        })
    })();
    let _ = fs::remove_dir_all(&tmp);
    result
}

/// etcd and the API server, running; see the module documentation.
pub struct TestApiServer {
    bins: Binaries,
    dir: PathBuf,
    etcd: Option<Supervised>,
    etcd_client_port: u16,
    apiserver: Option<Supervised>,
    apiserver_args: Vec<String>,
    port: u16,
    url: String,
    kubeconfig: PathBuf,
}

/// A child process whose standard input we hold: dropping it tells the child to go.
struct Supervised {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Supervised {
    fn spawn(cmd: &mut Command) -> std::io::Result<Supervised> {
        let mut child = cmd.stdin(Stdio::piped()).spawn()?;
        let stdin = child.stdin.take();
        Ok(Supervised { child, stdin })
    }

    /// Closes stdin (a graceful stop for the etcd supervisor), waits up to `grace`, then kills.
    fn stop(mut self, grace: Duration) {
        self.stdin.take();
        if !grace.is_zero() && matches!(wait_timeout(&mut self.child, grace), Ok(Some(_))) {
            return;
        }
        let _ = self.child.kill();
        let _ = wait_timeout(&mut self.child, STOP_TIMEOUT);
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl TestApiServer {
    /// Builds (via build.sh, cached) and starts etcd and the API server on free 127.0.0.1 ports,
    /// waits until /readyz answers, and writes a kubeconfig.
    pub fn start() -> Result<TestApiServer> {
        Self::start_with_apiserver_args(&[])
    }

    /// Like [`start`](Self::start), passing extra flags to the API server on every (re)start, e.g.
    /// `--watch-cache=false` (lists and watches straight from etcd) or
    /// `--etcd-compaction-interval=10s`; `--help` of the binary lists them.
    pub fn start_with_apiserver_args(args: &[&str]) -> Result<TestApiServer> {
        let bins = binaries()?;
        remove_stale_temp_dirs();
        let dir = unique_temp_dir("xdplb-k8s")?;
        let mut server = TestApiServer {
            bins,
            kubeconfig: dir.join("kubeconfig"),
            dir,
            etcd: None,
            etcd_client_port: 0,
            apiserver: None,
            apiserver_args: args.iter().map(std::string::ToString::to_string).collect(),
            port: 0,
            url: String::new(),
        };
        server.start_etcd()?;
        server.start_apiserver()?;
        Ok(server)
    }

    /// The kubeconfig for this server (cluster CA embedded; credentials are not checked).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The PEM CA certificate that signed the server's certificate.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("certs/ca.crt")
    }

    /// `http://127.0.0.1:PORT` of etcd.
    pub fn etcd_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.etcd_client_port)
    }

    /// The temporary directory holding data, certificates, logs and the kubeconfig.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The end of the API server's log.
    pub fn apiserver_log_tail(&self, lines: usize) -> String {
        tail(&self.dir.join("apiserver.log"), lines)
    }

    /// Stops and starts the API server process only (etcd keeps the data): for "restart the API
    /// server mid-watch" tests. The URL and kubeconfig stay valid (same port, same certificate).
    pub fn restart(&mut self) -> Result<()> {
        self.stop_apiserver();
        self.start_apiserver()
    }

    /// Kills the API server process (abruptly, like a crash: open connections are reset), so the
    /// URL refuses connections until [`start_apiserver`](Self::start_apiserver).
    pub fn stop_apiserver(&mut self) {
        if let Some(p) = self.apiserver.take() {
            p.stop(Duration::ZERO);
        }
        let _ = fs::remove_file(self.dir.join("apiserver.ready"));
    }

    /// Stops the API server process (SIGSTOP) without closing anything: connections stay open
    /// and requests go unanswered, as from a hung server, until [`resume_apiserver`](Self::resume_apiserver).
    pub fn pause_apiserver(&self) {
        self.signal_apiserver(libc::SIGSTOP);
    }

    /// Lets a paused API server run again (SIGCONT).
    pub fn resume_apiserver(&self) {
        self.signal_apiserver(libc::SIGCONT);
    }

    fn signal_apiserver(&self, signal: i32) {
        let pid = self
            .apiserver
            .as_ref()
            .expect("the API server runs")
            .child
            .id();
        // SAFETY: kill(2) on our own child's pid, which we have not waited for (it is running).
        let rc = unsafe { libc::kill(libc::pid_t::try_from(pid).expect("pid"), signal) };
        assert_eq!(
            rc,
            0,
            "signal {signal} to the API server: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Starts the API server (if it is not running) and waits until /readyz answers. The first
    /// start picks a free port; later ones reuse it.
    pub fn start_apiserver(&mut self) -> Result<()> {
        if self.apiserver.is_some() {
            return Ok(());
        }
        let ready = self.dir.join("apiserver.ready");
        let port_file = self.dir.join("apiserver.port");
        let _ = fs::remove_file(&ready);
        let log = self.dir.join("apiserver.log");
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(&self.bins.apiserver);
        cmd.arg(format!("--etcd-servers={}", self.etcd_url()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", self.port))
            .arg(format!("--cert-dir={}", self.dir.join("certs").display()))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--port-file={}", port_file.display()))
            .arg(format!("--ready-file={}", ready.display()))
            .arg("--exit-on-stdin-eof")
            .args(&self.apiserver_args)
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let mut proc = Supervised::spawn(&mut cmd)
            .with_context(|| format!("starting {}", self.bins.apiserver.display()))?;
        let deadline = Instant::now() + APISERVER_START_TIMEOUT;
        loop {
            if ready.exists() {
                break;
            }
            if let Some(status) = proc.exited() {
                bail!(
                    "the API server exited during start-up ({status}); its log ends with:\n{}",
                    tail(&log, LOG_TAIL_LINES)
                );
            }
            if Instant::now() > deadline {
                proc.stop(Duration::ZERO);
                bail!(
                    "the API server did not become ready (/readyz) within {APISERVER_START_TIMEOUT:?}; its log ends with:\n{}",
                    tail(&log, LOG_TAIL_LINES)
                );
            }
            sleep(Duration::from_millis(20));
        }
        let port: u16 = fs::read_to_string(&port_file)?
            .trim()
            .parse()
            .context("reading the API server's port file")?;
        if self.port != 0 && port != self.port {
            proc.stop(Duration::ZERO);
            bail!("the API server came back on port {port}, not {}", self.port);
        }
        self.port = port;
        self.url = format!("https://127.0.0.1:{port}");
        self.apiserver = Some(proc);
        Ok(())
    }

    /// Compacts etcd's history up to its current revision, so that watches and lists from an
    /// older resourceVersion get 410 Gone (once the API server's watch cache no longer has them,
    /// e.g. after a [`restart`](Self::restart)). Returns the revision compacted to.
    pub fn compact_etcd(&self) -> Result<i64> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.etcd_client_port));
        // The key "\0" (base64 "AA==") with range_end "\0" means every key; count_only is cheap.
        let (_, body) = http_request(
            addr,
            "POST",
            "/v3/kv/range",
            Some(r#"{"key":"AA==","range_end":"AA==","count_only":true}"#),
        )?;
        let revision = json_number_after(&body, "\"revision\"")
            .ok_or_else(|| anyhow!("no revision in etcd's answer: {body}"))?;
        let (status, body) = http_request(
            addr,
            "POST",
            "/v3/kv/compaction",
            Some(&format!(r#"{{"revision":"{revision}","physical":true}}"#)),
        )?;
        if status != 200 {
            bail!("etcd compaction failed ({status}): {body}");
        }
        Ok(revision)
    }

    fn start_etcd(&mut self) -> Result<()> {
        let log = self.dir.join("etcd.log");
        let mut last_err = None;
        // A port picked here could be taken by someone else before etcd binds it: try again then.
        for _attempt in 0..3 {
            let (client, peer) = (free_port()?, free_port()?);
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log_file = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?;
            let mut cmd = Command::new(&self.bins.apiserver);
            cmd.arg("supervise")
                .arg("--")
                .arg(&self.bins.etcd)
                .arg("--name=xdplb-test")
                .arg(format!("--data-dir={}", self.dir.join("etcd").display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=xdplb-test={peer_url}"))
                .arg("--unsafe-no-fsync=true")
                .arg("--log-level=warn")
                .stdout(log_file.try_clone()?)
                .stderr(log_file);
            let mut proc = Supervised::spawn(&mut cmd)
                .with_context(|| format!("starting {}", self.bins.etcd.display()))?;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, client));
            let deadline = Instant::now() + ETCD_START_TIMEOUT;
            let outcome = loop {
                if let Ok((200, body)) = http_request(addr, "GET", "/health", None)
                    && body.contains("true")
                {
                    break Ok(());
                }
                if let Some(status) = proc.exited() {
                    break Err(anyhow!(
                        "etcd exited during start-up ({status}); its log ends with:\n{}",
                        tail(&log, LOG_TAIL_LINES)
                    ));
                }
                if Instant::now() > deadline {
                    proc.stop(Duration::ZERO);
                    bail!(
                        "etcd did not become healthy within {ETCD_START_TIMEOUT:?}; its log ends with:\n{}",
                        tail(&log, LOG_TAIL_LINES)
                    );
                }
                sleep(Duration::from_millis(20));
            };
            match outcome {
                Ok(()) => {
                    self.etcd = Some(proc);
                    self.etcd_client_port = client;
                    return Ok(());
                }
                Err(e) => {
                    proc.stop(Duration::ZERO);
                    let _ = fs::remove_dir_all(self.dir.join("etcd"));
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap())
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        if let Some(p) = self.apiserver.take() {
            p.stop(Duration::ZERO);
        }
        if let Some(p) = self.etcd.take() {
            p.stop(Duration::from_secs(5));
        }
        if std::env::var_os("XDPLB_K8S_KEEP").is_some() {
            eprintln!("XDPLB_K8S_KEEP: kept {}", self.dir.display());
            return;
        }
        // A child killed just now may still be finishing a write: retry briefly.
        for _ in 0..20 {
            if fs::remove_dir_all(&self.dir).is_ok() || !self.dir.exists() {
                break;
            }
            sleep(Duration::from_millis(50));
        }
    }
}

/// A fresh, empty directory under the system temporary directory.
fn unique_temp_dir(prefix: &str) -> Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(dir.parent().unwrap())?;
    fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Removes the temporary directories of earlier test processes that died without cleaning up
/// (their children exit by themselves; a SIGKILLed process cannot remove its directory).
fn remove_stale_temp_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("xdplb-k8s-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Waits for the child to exit, at most `timeout`; `None` if it is still running.
fn wait_timeout(
    child: &mut Child,
    timeout: Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        sleep(Duration::from_millis(10));
    }
}

/// The last `n` lines of a file (or a note that it could not be read).
fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// A minimal HTTP/1.1 exchange over plain TCP (etcd's client port): returns status and body.
fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, rest) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response from {addr}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("malformed HTTP status line from {addr}: {head}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    Ok((
        status,
        if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        },
    ))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// The integer after `key` in a JSON text (etcd's gateway writes int64 values as strings).
fn json_number_after(json: &str, key: &str) -> Option<i64> {
    let after = &json[json.find(key)? + key.len()..];
    let digits: String = after
        .trim_start_matches(|c: char| c == ':' || c == '"' || c.is_whitespace())
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A TCP forwarder from a port on a namespace's loopback to an address in the host's namespace
/// (the API server, for an agent in a namespace node). Stops accepting when dropped.
pub struct Forward {
    /// `https://127.0.0.1:PORT`, as seen from inside the namespace.
    pub url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forward {
    pub fn into_netns(ns: &crate::netns::Netns, url: &str) -> anyhow::Result<Forward> {
        let target: SocketAddr = url.trim_start_matches("https://").parse()?;
        // A socket belongs to the namespace it was made in, whichever thread uses it later.
        let listener = ns.run(|| TcpListener::bind("127.0.0.1:0"))??;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inside, _)) => {
                        if let Ok(outside) = TcpStream::connect(target) {
                            let _ = inside.set_nonblocking(false);
                            pipe(inside, outside);
                        }
                    }
                    Err(_) => sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Forward {
            url: format!("https://127.0.0.1:{port}"),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies both ways until either side closes (the threads end with the connection).
fn pipe(a: TcpStream, b: TcpStream) {
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    };
    if let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) {
        copy(a, b2);
        copy(b, a2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts the real thing, restarts the API server, stops and starts it, compacts etcd.
    /// Ignored by default: the first run on a machine builds the server (about 5 minutes).
    #[test]
    #[ignore = "builds the test API server on first use (minutes); run with --ignored"]
    fn start_restart_stop_compact() -> Result<()> {
        let mut server = TestApiServer::start()?;
        let url = server.url().to_string();
        assert!(url.starts_with("https://127.0.0.1:"), "{url}");
        let kubeconfig = fs::read_to_string(server.kubeconfig_path())?;
        assert!(kubeconfig.contains(&url), "{kubeconfig}");
        assert!(server.ca_cert_path().exists());
        let port: u16 = url.rsplit(':').next().unwrap().parse()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));

        server.restart()?;
        assert_eq!(server.url(), url);
        assert_eq!(fs::read_to_string(server.kubeconfig_path())?, kubeconfig);
        TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;

        server.stop_apiserver();
        assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
        server.start_apiserver()?;
        assert_eq!(server.url(), url);
        TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;

        assert!(server.compact_etcd()? > 1);
        let dir = server.dir().to_path_buf();
        drop(server);
        assert!(!dir.exists());
        assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
        Ok(())
    }

    #[test]
    fn json_number_after_reads_strings_and_numbers() {
        assert_eq!(
            json_number_after(
                r#"{"header":{"revision":"42","raft_term":"2"}}"#,
                "\"revision\""
            ),
            Some(42)
        );
        assert_eq!(
            json_number_after(r#"{"revision": 7}"#, "\"revision\""),
            Some(7)
        );
        assert_eq!(json_number_after(r"{}", "\"revision\""), None);
    }

    #[test]
    fn dechunk_joins_chunks() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
