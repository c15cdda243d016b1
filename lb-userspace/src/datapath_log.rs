//! The data path's log records (aya-log) in the agent's log. The data path logs rare events
//! only; which levels it emits is fixed at load time from what the agent's logger shows for
//! [`LOG_TARGET`] (nothing by default: `RUST_LOG=info,xdplb_datapath=debug` shows them), so with
//! logging off its log statements cost a branch on a constant.
use aya::Ebpf;
use aya_log::EbpfLogger;
use lb_common::logging::LOG_TARGET;
use log::{Level, Metadata, debug};
use tokio::{io::unix::AsyncFd, task::JoinHandle};

/// The most verbose level the agent's logger shows for the data path's target, as aya-log
/// numbers levels (1 error ... 5 trace; 0: none).
pub fn level() -> u8 {
    [
        Level::Trace,
        Level::Debug,
        Level::Info,
        Level::Warn,
        Level::Error,
    ]
    .into_iter()
    .find(|l| log::logger().enabled(&Metadata::builder().level(*l).target(LOG_TARGET).build()))
    .map_or(0, |l| l as u8)
}

/// Reads the data path's records while alive.
pub struct DatapathLog(JoinHandle<()>);

impl Drop for DatapathLog {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts forwarding the data path's records to the agent's log, if the object has a log map.
/// Must run inside the tokio runtime.
pub fn start(ebpf: &mut Ebpf) -> Option<DatapathLog> {
    let logger = match EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            debug!("the data path logs nothing: {e}");
            return None;
        }
    };
    // SAFETY: the logger owns its ring buffer's descriptor for its whole life, and `as_raw_fd`
    // always returns that one.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logger = match registered {
        Ok(l) => l,
        Err(e) => {
            debug!("the data path's log cannot be read: {e}");
            return None;
        }
    };
    debug!("reading the data path's log at level {}", level());
    Some(DatapathLog(tokio::spawn(async move {
        while let Ok(mut ready) = logger.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    })))
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_a_logger_the_data_path_logs_nothing() {
        // The test binary installs no logger: nothing is shown, so nothing is emitted.
        assert_eq!(super::level(), 0);
    }
}
