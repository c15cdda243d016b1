//! The agent's loop: one thread runs the agent's work (reloads, the node's changes, the cluster's
//! changes, sweeps) one at a time, until SIGTERM or SIGINT; the metrics server answers from a
//! thread of its own meanwhile. The node's changes come as netlink notifications: nothing is
//! polled per backend.
use std::time::Duration;

use anyhow::{Context, Result};
use log::info;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    time::Instant,
};

use super::Agent;
use crate::{
    cli::RunArgs,
    datapath_log,
    k8s::input::KubeInput,
    metrics::{self, Endpoints},
    netlink::{Change, Monitor},
};

/// How long a burst of link, address and route changes (an interface going down takes its
/// addresses and routes with it) may go on before the node is read again, once.
const NODE_SETTLE: Duration = Duration::from_millis(100);
/// How often the backend interfaces' policy hooks are looked at again.
const POLICY_HOOKS_EVERY: Duration = Duration::from_secs(2);

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(args: RunArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

/// The Kubernetes input, with `--kubernetes`.
async fn kube_input(args: &RunArgs) -> Result<Option<KubeInput>> {
    if !args.kubernetes {
        return Ok(None);
    }
    let node = args
        .node_name
        .clone()
        .context("--node-name (or NODE_NAME) is needed with --kubernetes")?;
    Ok(Some(
        KubeInput::connect(args.kubeconfig.as_deref(), node).await?,
    ))
}

async fn serve(args: RunArgs) -> Result<()> {
    let keep = args.keep_on_exit;
    let metrics_addr = args.metrics_addr;
    let scrape_addr = args.scrape_addr;
    let stall = Duration::from_secs(args.stall_seconds.max(1));
    let sweep_every = Duration::from_secs(args.sweep_seconds.max(1));
    let mut kube = kube_input(&args).await?;
    // Subscribed before the first look at the node, so no change falls in between.
    let monitor = Monitor::open()?;
    // SAFETY: the monitor owns its socket for its whole life, and `as_raw_fd` always returns it.
    let mut monitor = unsafe { AsyncFd::register_with_interest(monitor, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching netlink notifications: {e}"))?;
    let mut agent = Agent::start(args)?;
    if let Some(k) = &mut kube {
        // Once the state directory is the agent's (Agent::start locks it).
        k.keep_drains_in(&agent.args.paths.state_dir);
    }
    match &kube {
        None => info!(
            "serving: {} services; metrics on http://{metrics_addr}/metrics",
            agent.desired.services.len()
        ),
        Some(_) => info!(
            "attached; serving the cluster's Services once they are listed; metrics on http://{metrics_addr}/metrics"
        ),
    }
    let latency = kube.as_ref().map(|k| k.sync_latency.clone());
    let max_backends = agent.args.metrics_max_backends;
    let (server, scrape) = metrics_servers(
        &agent,
        (metrics_addr, scrape_addr),
        latency,
        max_backends,
        stall,
    )?;
    let _datapath_log = datapath_log::start(&mut agent.loaded.ebpf);
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sweeps = tokio::time::interval(sweep_every);
    // Policy hooks appear without a notification (a TCX program, a netfilter rule): looked at
    // again this often (a few system calls per backend interface).
    let mut hooks = tokio::time::interval(POLICY_HOOKS_EVERY);
    // When the node is next read, after a burst of changes.
    let mut node_due: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = hup.recv() => agent.reload(true),
            _ = tick.tick() => {
                agent.reload(false);
                if let Some(k) = &mut kube {
                    k.step(&mut agent);
                }
            }
            ready = monitor.readable_mut() => {
                let Ok(mut ready) = ready else { continue };
                let changes = ready.get_inner_mut().read();
                ready.clear_ready();
                agent.neighbours_changed(&changes);
                if changes.iter().any(|c| !matches!(c, Change::NeighbourGone { .. } | Change::Neighbour(_))) {
                    // At once, not after the settle: an apply meanwhile asks the kernel again.
                    agent.netlink.forget_routes();
                    node_due.get_or_insert_with(|| Instant::now() + NODE_SETTLE);
                }
            }
            () = sleep_until(node_due) => {
                node_due = None;
                agent.node_changed();
            }
            () = cluster_changed(kube.as_ref()) => {
                // Let a burst of changes finish, then apply all of it at once.
                if let Some(k) = &mut kube {
                    k.settle().await;
                    k.step(&mut agent);
                }
            }
            _ = hooks.tick() => agent.check_policy_hooks(),
            _ = sweeps.tick() => {
                agent.sweep();
                agent.publish_sweep();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        agent.beat();
    }
    drop(server);
    drop(scrape);
    drop(kube);
    agent.shutdown(keep);
    Ok(())
}

/// The metrics server with the probes on `metrics_addr`, and with `scrape_addr` a second one
/// with /metrics only, for a scraper that must not reach the probes.
fn metrics_servers(
    agent: &Agent,
    (metrics_addr, scrape_addr): (std::net::SocketAddr, Option<std::net::SocketAddr>),
    latency: Option<prometheus_client::metrics::histogram::Histogram>,
    max_backends: usize,
    stall: Duration,
) -> Result<(metrics::MetricsServer, Option<metrics::MetricsServer>)> {
    let sources = |sync_latency| -> Result<metrics::Sources> {
        Ok(metrics::Sources {
            stats: agent.stats()?,
            sync_latency,
            max_backends,
        })
    };
    let server = metrics::serve(
        metrics_addr,
        agent.views(),
        sources(latency.clone())?,
        Endpoints::All,
        stall,
    )
    .with_context(|| format!("serving metrics and probes on {metrics_addr}"))?;
    let scrape = match scrape_addr {
        Some(addr) => {
            let s = metrics::serve(
                addr,
                agent.views(),
                sources(latency)?,
                Endpoints::MetricsOnly,
                stall,
            )
            .with_context(|| format!("serving metrics on {addr}"))?;
            info!("metrics for scraping on http://{addr}/metrics");
            Some(s)
        }
        None => None,
    };
    Ok((server, scrape))
}

/// Resolves at `due` (never without one).
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the watchers saw a change (never without Kubernetes).
async fn cluster_changed(kube: Option<&KubeInput>) {
    match kube {
        Some(k) => k.watch.changed.notified().await,
        None => std::future::pending().await,
    }
}
