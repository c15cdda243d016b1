//! lb-agent: the node agent of the XDP load balancer. Parses the command line and hands each
//! command to the module that owns it.
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use lb_userspace::{
    agent, check, cleanup,
    cli::{Cli, Command},
    flow,
    netlink::Netlink,
    node::{self, Interfaces},
    status,
};

fn main() -> ExitCode {
    // netlink-packet-route warns about every attribute newer kernels added (several lines every
    // 2 s): quiet unless RUST_LOG names it. Milliseconds: an apply, a watch event and a probe
    // often fall in the same second.
    let mut log =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if !std::env::var("RUST_LOG").is_ok_and(|f| f.contains("netlink_packet_route")) {
        log.filter_module("netlink_packet_route", log::LevelFilter::Error);
    }
    log.format_timestamp_millis().init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => agent::run(args),
        Command::Status {
            paths,
            json,
            services,
            backends,
        } => status::status(&paths, &status::Filter { services, backends }).map(|s| {
            if json {
                // Compact: 20,000 services at 10,000 Services (`jq .` pretty-prints it).
                println!("{}", serde_json::to_string(&s).unwrap_or_default());
            } else {
                print!("{}", status::render(&s));
            }
        }),
        Command::Flow {
            protocol,
            source,
            destination,
            paths,
            json,
        } => flow::flow(&paths, protocol, source, destination).map(|a| {
            if json {
                println!("{}", serde_json::to_string_pretty(&a).unwrap_or_default());
            } else {
                println!("{}", flow::render(&a));
            }
        }),
        Command::Check {
            config,
            config_flag,
            sizes,
            uplinks,
            backend_interfaces,
        } => match config.or(config_flag) {
            Some(config) => run_check(&config, sizes.sizes(), &uplinks, &backend_interfaces),
            None => Err(anyhow::anyhow!("check: no config file given")),
        },
        Command::Cleanup { paths } => cleanup::cleanup(&paths),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `lb-agent check`: "ok" and what was not checked, or the problems.
fn run_check(
    path: &std::path::Path,
    sizes: lb_userspace::dataplane::Sizes,
    uplinks: &[String],
    backend_interfaces: &[String],
) -> Result<()> {
    let mut warnings = Vec::new();
    let node = if uplinks.is_empty() {
        None
    } else {
        let desired = lb_userspace::config::load(path)?;
        let mut nl = Netlink::open()?;
        let interfaces = Interfaces::scan(&mut nl, uplinks, backend_interfaces)?;
        let node = node::view(&mut nl, &desired, &interfaces)?;
        warnings = node::snat_elsewhere(&node, &desired);
        Some(node)
    };
    let checked = check::check_file(path, sizes, node.as_ref())?;
    println!(
        "{}: ok ({} services, {} rate limits)",
        path.display(),
        checked.services,
        checked.policies
    );
    for w in &warnings {
        println!("warning: {w}");
    }
    if !checked.unchecked.is_empty() {
        println!("not checked without the live node (give --uplink to check them here):");
        for u in &checked.unchecked {
            println!("  - {u}");
        }
    }
    Ok(())
}
