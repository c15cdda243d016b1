//! Test support shared by the kernel-tier and end-to-end suites and the demo: the network
//! namespace lab, traffic tools, real programs (nginx, curl, tcpdump) run in the lab, packet
//! builders, the adversarial frame generator and its oracle, the OpenMetrics checker, and the
//! Kubernetes test API server.
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
