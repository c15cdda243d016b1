//! lb-agent's library: everything the binary and the tests share.
pub mod agent;
pub mod attach;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod error;
pub mod k8s;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod node;
pub mod reconcile;
pub mod state;
pub mod status;
pub mod sweep;
pub mod tables;
