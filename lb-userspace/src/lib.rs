//! lb-agent's library: everything the binary and the tests share.
pub mod dataplane;
pub mod error;
pub mod maglev;
