//! The `wardgate` root package: end-to-end tests (`tests/`), benches (`benches/`), the
//! data-plane bench tool and, later, the all-in-one demo. This library holds what those share:
//! the harness that runs the real binaries, throwaway network namespaces, and the test-network
//! endpoints (`wardgate-bench node …`).

pub mod access_bench;
pub mod attack;
pub mod bench;
pub mod build;
pub mod demo;
pub mod dpnet;
pub mod harness;
pub mod idp;
pub mod netns;
pub mod netsite;
pub mod node;
pub mod policy_fixture;
