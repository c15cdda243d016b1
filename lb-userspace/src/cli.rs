//! Command line of `lb-agent`.
use std::{
    net::{SocketAddr, ToSocketAddrs},
    path::PathBuf,
};

use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::{
    attach::{ModeChoice, TcChoice},
    dataplane::Sizes,
    maglev,
    model::Protocol,
};

#[derive(Parser, Debug)]
#[command(
    name = "lb-agent",
    version,
    about = "XDP L4 load balancer and per-source rate limiter: the node agent"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load and attach the data path and keep its maps equal to the desired state: the config
    /// file (reloaded when it changes and on SIGHUP) and, with --kubernetes, the cluster's
    /// Services that opt in.
    Run(RunArgs),
    /// Services, backends, weights, state and counters, read from the running agent's maps.
    Status {
        #[command(flatten)]
        paths: Paths,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Only this service, with its backends: its name, or a Kubernetes Service's
        /// namespace/name for all its ports (repeat for several).
        #[arg(long = "service")]
        services: Vec<String>,
        /// List every service's backends (by default they are listed while the node has at
        /// most 2000; above, each service shows how many it has in each state).
        #[arg(long)]
        backends: bool,
    },
    /// Which backend a flow goes to, and why (flow-table entry, session affinity, or ring
    /// slot); or, for a client the data path would drop first (a source that cannot be a
    /// client, the service's source ranges, a rate-limit deny prefix), which rule drops it.
    Flow {
        /// tcp or udp.
        protocol: Protocol,
        /// The client's address and port, e.g. 10.0.0.10:40000 or [fd00::10]:40000.
        #[arg(value_parser = parse_socket_addr)]
        source: SocketAddr,
        /// The service's VIP and port.
        #[arg(value_parser = parse_socket_addr)]
        destination: SocketAddr,
        #[command(flatten)]
        paths: Paths,
        /// Machine-readable output: flow, reason, backend, detail, and the rule that drops the
        /// flow (dropped) or the rate-limit override the client falls under (rate_limit).
        #[arg(long)]
        json: bool,
    },
    /// Check a config file with every rule `lb-agent run` applies to it. Prints the problems
    /// (file:line: field: message for the file's syntax and values; every service the agent
    /// would refuse, with the reason) and exits 1; or prints "ok" with the rules it could not
    /// check without the live node, and exits 0. With --uplink it checks those too, against
    /// this node's addresses and routes.
    Check {
        /// The config file.
        #[arg(required_unless_present = "config_flag")]
        config: Option<PathBuf>,
        /// The config file, given as `run` takes it.
        #[arg(
            long = "config",
            short = 'c',
            value_name = "FILE",
            conflicts_with = "config"
        )]
        config_flag: Option<PathBuf>,
        #[command(flatten)]
        sizes: SizeArgs,
        /// This node's uplink (repeat for several): check the rules that need the live node
        /// (snat source addresses, backends local to preserve-client-ip services) here.
        #[arg(long = "uplink", alias = "iface")]
        uplinks: Vec<String>,
        /// Interfaces facing local backends, as for `run`.
        #[arg(long = "backend-interfaces", alias = "backend-ifaces")]
        backend_interfaces: Vec<String>,
    },
    /// Remove what an agent run with --keep-on-exit left behind: programs, pinned maps, state.
    Cleanup {
        #[command(flatten)]
        paths: Paths,
    },
}

#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("input").required(true).multiple(true).args(["config", "kubernetes"])))]
pub struct RunArgs {
    /// Config file (TOML): services, rate limits and node settings. With --kubernetes it
    /// holds the node settings and named rate limits (services in it are served too).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Serve the Services that opt in (annotation xdplb.io/enabled: "true") and their
    /// EndpointSlices, watched from the Kubernetes API server.
    #[arg(long)]
    pub kubernetes: bool,
    /// This node's name, as EndpointSlices' nodeName has it (externalTrafficPolicy: Local).
    #[arg(long, env = "NODE_NAME", required_if_eq("kubernetes", "true"))]
    pub node_name: Option<String>,
    /// Kubeconfig to reach the API server; default: the in-cluster service account, else
    /// ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Keep new flows of opted-in Services that ask nothing of topology (no
    /// spec.trafficDistribution, no topology-mode annotation) in this node's zone while it has
    /// ready endpoints, as trafficDistribution: PreferSameZone would (also the node config's
    /// prefer-same-zone).
    #[arg(long)]
    pub prefer_same_zone: bool,
    /// An uplink: an interface clients' traffic arrives on (repeat for several). Default: the
    /// interfaces of the node's default routes (main table, IPv4 and IPv6). Old name: --iface.
    #[arg(long = "uplink", alias = "iface")]
    pub uplinks: Vec<String>,
    /// Interfaces facing local backends (pod veths), as shell patterns, e.g. 'eni*' (repeat
    /// for several). Attached as they appear, detached as they go. Old name: --backend-ifaces.
    #[arg(long = "backend-interfaces", alias = "backend-ifaces")]
    pub backend_interfaces: Vec<String>,
    /// XDP attach mode: native (driver), generic (skb), or auto (native, else generic).
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: ModeChoice,
    /// How lb_backend goes on backend interfaces: tcx (a TCX link, Linux 6.6+), classic (a
    /// clsact qdisc filter), or auto (tcx where the kernel has it, else classic).
    #[arg(long, value_enum, default_value = "auto")]
    pub tc_mode: TcChoice,
    #[command(flatten)]
    pub paths: Paths,
    #[command(flatten)]
    pub sizes: SizeArgs,
    /// Where to serve Prometheus metrics, /healthz and /readyz (the probes).
    #[arg(long, default_value = "127.0.0.1:9435")]
    pub metrics_addr: SocketAddr,
    /// Also serve /metrics (alone) here, for Prometheus: e.g. the node's own address, kept
    /// apart from the probes on --metrics-addr. IPv6 with or without brackets (the downward
    /// API's status.hostIP has none).
    #[arg(long, value_parser = parse_listen_addr)]
    pub scrape_addr: Option<SocketAddr>,
    /// Per-backend series on /metrics (5 per backend) while the node lists at most this many
    /// backends; above, they are left out (per-service series stay) and
    /// xdplb_metrics_backends_omitted says how many backends have none. 0: never.
    #[arg(long, default_value_t = 20_000)]
    pub metrics_max_backends: usize,
    /// On exit, leave the programs attached and the maps pinned, so the next agent (an
    /// upgrade, a restart) takes over without a gap and live flows keep their backends.
    #[arg(long)]
    pub keep_on_exit: bool,
    /// Seconds between sweeps of finished flows out of the flow tables.
    #[arg(long, default_value_t = 5)]
    pub sweep_seconds: u64,
    /// /healthz fails (503) once the agent's loop has made no progress for this long: a stuck
    /// agent gets restarted by the liveness probe. Above the longest apply (a full resync of a
    /// large cluster).
    #[arg(long, default_value_t = 120)]
    pub stall_seconds: u64,
}

#[derive(Args, Debug, Clone)]
pub struct Paths {
    /// bpffs directory for pinned maps and links (mounted if bpffs is not).
    #[arg(long, default_value = "/sys/fs/bpf/xdplb", env = "XDPLB_PIN_DIR")]
    pub pin_dir: PathBuf,
    /// Directory for the agent's state file (names for `status`).
    #[arg(long, default_value = "/run/xdplb", env = "XDPLB_STATE_DIR")]
    pub state_dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct SizeArgs {
    /// Services (VIP, port, protocol) the data path can hold (at most 2^24).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_SERVICES, value_parser = id_count)]
    pub max_services: u32,
    /// Backends over all services (at most 2^24).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_BACKENDS, value_parser = id_count)]
    pub max_backends: u32,
    /// The largest Maglev ring a service gets: a prime from 251 to 131071, the same on every
    /// node. Each service's ring is the smallest of 251, 509, 1021, ... (the largest prime below
    /// each power of two) with 100 slots per backend, up to this. `--ring-size` is its old name.
    #[arg(long, alias = "ring-size", default_value_t = lb_common::DEFAULT_MAX_RING_SIZE, value_parser = parse_ring_size)]
    pub max_ring_size: u32,
    /// IPv4 flow-table entries: one per snat flow (its reply entry takes a claim slot, of which
    /// there are as many), two per flow that keeps the client's address.
    #[arg(long, default_value_t = lb_common::DEFAULT_FLOW_ENTRIES)]
    pub flow_entries: u32,
    /// IPv6 flow-table entries (as `--flow-entries`).
    #[arg(long, default_value_t = lb_common::DEFAULT_FLOW_ENTRIES_V6)]
    pub flow_entries_v6: u32,
    /// Rate-limit source table entries.
    #[arg(long, default_value_t = lb_common::DEFAULT_SOURCE_ENTRIES)]
    pub source_entries: u32,
    /// Session-affinity entries.
    #[arg(long, default_value_t = lb_common::DEFAULT_AFFINITY_ENTRIES)]
    pub affinity_entries: u32,
}

impl SizeArgs {
    pub fn sizes(&self) -> Sizes {
        Sizes {
            max_services: self.max_services,
            max_backends: self.max_backends,
            ring_size: self.max_ring_size,
            flow_entries: self.flow_entries,
            flow_entries_v6: self.flow_entries_v6,
            source_entries: self.source_entries,
            affinity_entries: self.affinity_entries,
        }
    }
}

/// A count of service or backend ids: a flow entry keeps an id in 24 bits (lb_common::Flow).
fn id_count(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if (1..=lb_common::MAX_IDS).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is not from 1 to {}", lb_common::MAX_IDS))
    }
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !(maglev::MIN_SIZE..=maglev::MAX_SIZE).contains(&n) || !maglev::is_prime(n) {
        return Err(format!(
            "{n} is not a prime from {} to {} (e.g. 16381, 65521, 131071)",
            maglev::MIN_SIZE,
            maglev::MAX_SIZE
        ));
    }
    Ok(n)
}

/// `IP:PORT`, `[IPv6]:PORT`, or `IPv6:PORT` without brackets (the last colon separates the
/// port).
fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    s.rsplit_once(':')
        .and_then(|(ip, port)| Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?)))
        .ok_or_else(|| format!("`{s}` is not IP:PORT"))
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("`{s}` is not an address:port (IPv6 as [addr]:port)"))
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Protocol, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!("`{s}`: tcp or udp")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_size_must_be_a_prime_in_range() {
        assert_eq!(parse_ring_size("16381"), Ok(16381));
        assert!(
            parse_ring_size("16384")
                .unwrap_err()
                .contains("not a prime")
        );
        assert!(parse_ring_size("13").is_err());
    }

    #[test]
    fn service_and_backend_counts_fit_a_flow_entrys_id() {
        assert_eq!(id_count("16384"), Ok(16384));
        assert_eq!(id_count("16777216"), Ok(1 << 24));
        assert!(
            id_count("16777217")
                .unwrap_err()
                .contains("from 1 to 16777216")
        );
        assert!(id_count("0").is_err());
    }

    #[test]
    fn scrape_addresses_take_ipv6_with_or_without_brackets() {
        assert_eq!(
            parse_listen_addr("10.0.12.34:9435"),
            Ok("10.0.12.34:9435".parse().unwrap())
        );
        assert_eq!(
            parse_listen_addr("fd00:ec2::5:9435"),
            Ok("[fd00:ec2::5]:9435".parse().unwrap())
        );
        assert_eq!(
            parse_listen_addr("[fd00:ec2::5]:9435"),
            Ok("[fd00:ec2::5]:9435".parse().unwrap())
        );
        assert!(parse_listen_addr("node-1:9435").is_err());
        assert!(parse_listen_addr("10.0.12.34").is_err());
    }

    #[test]
    fn command_line_parses() {
        let cli = Cli::try_parse_from([
            "lb-agent",
            "run",
            "--config",
            "lb.toml",
            "--iface",
            "eth0",
            "--backend-ifaces",
            "eni*",
            "--backend-interfaces",
            "veth*",
            "--xdp-mode",
            "native",
            "--ring-size",
            "251",
            "--keep-on-exit",
        ])
        .unwrap();
        let Command::Run(r) = cli.command else {
            panic!()
        };
        assert_eq!(r.uplinks, ["eth0"], "the old flag name still works");
        assert_eq!(r.backend_interfaces, ["eni*", "veth*"]);
        assert_eq!(r.xdp_mode, ModeChoice::Native);
        assert_eq!(
            r.sizes.sizes().ring_size,
            251,
            "--ring-size is the old name of --max-ring-size"
        );
        assert!(r.keep_on_exit);
        let cli =
            Cli::try_parse_from(["lb-agent", "flow", "tcp", "10.0.0.10:40000", "[fd00::1]:80"])
                .unwrap();
        assert!(matches!(
            cli.command,
            Command::Flow {
                protocol: Protocol::Tcp,
                ..
            }
        ));
        let cli = Cli::try_parse_from(["lb-agent", "run", "--config", "x"]).unwrap();
        let Command::Run(r) = cli.command else {
            panic!()
        };
        assert!(
            r.uplinks.is_empty(),
            "without --uplink: the default routes' interfaces"
        );
        assert!(
            Cli::try_parse_from(["lb-agent", "run", "--iface", "eth0"]).is_err(),
            "--config or --kubernetes is required"
        );
        let cli = Cli::try_parse_from([
            "lb-agent",
            "run",
            "--kubernetes",
            "--node-name",
            "node-1",
            "--uplink",
            "eth0",
        ])
        .unwrap();
        let Command::Run(r) = cli.command else {
            panic!()
        };
        assert!(r.kubernetes && r.config.is_none());
        assert_eq!(r.node_name.as_deref(), Some("node-1"));
        assert!(!r.prefer_same_zone, "off unless asked");
        let cli = Cli::try_parse_from([
            "lb-agent",
            "run",
            "--kubernetes",
            "--node-name",
            "node-1",
            "--prefer-same-zone",
        ])
        .unwrap();
        let Command::Run(r) = cli.command else {
            panic!()
        };
        assert!(r.prefer_same_zone);
    }
}
