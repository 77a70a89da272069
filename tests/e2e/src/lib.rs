//! liveclone's end-to-end suite on a kind cluster: the real image, chart
//! and sidecars, and the host's kernel. The scenarios are in
//! `tests/kind_e2e.rs`, behind the cargo feature `kind`; this library holds
//! what they share, and its unit tests run on any machine (docs/E2E.md).

pub mod cluster;
pub mod cmd;
pub mod config;
pub mod manifests;
pub mod preflight;
pub mod scenario;
