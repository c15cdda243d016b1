//! Test support shared by the kernel-tier and end-to-end suites and the demo: the network
//! namespace lab, traffic tools, packet builders, and the Kubernetes test API server.
pub mod adversarial;
pub mod agent;
pub mod apiserver;
pub mod bench;
pub mod flood;
pub mod kernel;
pub mod lab;
pub mod netns;
pub mod packets;
pub mod traffic;
