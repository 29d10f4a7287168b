//! The `wardgate` root package: end-to-end tests (`tests/`), benches (`benches/`) and, later,
//! the all-in-one demo. This library holds the harness those tests share: it runs the real
//! binaries in throwaway directories and cleans up after them.

pub mod harness;
