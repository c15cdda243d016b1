//! lb-agent's library: everything the binary and the tests share.
pub mod config;
pub mod dataplane;
pub mod error;
pub mod maglev;
pub mod model;
pub mod reconcile;
pub mod tables;
