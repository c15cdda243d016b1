//! Test support shared by the kernel-tier and end-to-end suites and the demo: the network
//! namespace lab, traffic tools, real programs (nginx, curl, tcpdump) run in the lab, packet
//! builders, the adversarial frame generator and its oracle, the OpenMetrics checker, and the
//! Kubernetes test API server.
// Test scenarios and report renderers read top to bottom, one step after another, and packet
// arithmetic names its operands as the RFCs do (a, b, c, d); expectation structs are sets of
// independent flags. The OpenMetrics checker and the tests compare floats the spec or the test
// fixes exactly (an info metric is 1, a histogram's count equals its +Inf bucket).
#![allow(
    clippy::too_many_lines,
    clippy::many_single_char_names,
    clippy::struct_excessive_bools,
    clippy::float_cmp,
    reason = "test code style, see above"
)]
pub mod adversarial;
pub mod agent;
pub mod apiserver;
pub mod bench;
pub mod flood;
pub mod kernel;
pub mod lab;
pub mod netns;
pub mod openmetrics;
pub mod packets;
pub mod programs;
pub mod traffic;
