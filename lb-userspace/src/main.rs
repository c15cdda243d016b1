//! lb-agent: the node agent of the XDP load balancer.
use std::process::ExitCode;

use clap::Parser;
use lb_userspace::{
    agent,
    cli::{Cli, Command},
    config, status,
};

fn main() -> ExitCode {
    // netlink-packet-route warns about every attribute newer kernels added; that is noise here.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,netlink_packet_route=error"),
    )
    .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => agent::run(args),
        Command::Status { paths, json } => status::status(&paths).map(|s| {
            if json {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
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
        } => status::flow(&paths, protocol, source, destination).map(|a| {
            if json {
                println!("{}", serde_json::to_string_pretty(&a).unwrap_or_default());
            } else {
                println!(
                    "{}: {} ({}): {}",
                    a.flow,
                    a.backend.as_deref().unwrap_or("no backend"),
                    a.reason,
                    a.detail
                );
            }
        }),
        Command::Check { config: path } => config::load(&path)
            .map(|d| {
                println!(
                    "{}: ok ({} services, {} rate limits)",
                    path.display(),
                    d.services.len(),
                    d.policies.len()
                );
            })
            .map_err(Into::into),
        Command::Cleanup { paths } => agent::cleanup(&paths),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
