//! The data path's log records (aya-log, for rare events only: never per packet) carry this
//! target, so the agent's log filter can switch them on alone (`RUST_LOG=info,xdplb_datapath=debug`)
//! and the agent can tell the data path, at load, which levels anyone will read.
pub const LOG_TARGET: &str = "xdplb_datapath";
