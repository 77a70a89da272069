//! liveclone: a CSI driver for live volume clones with dm-clone.
//!
//! Layers, top to bottom (see docs/ARCHITECTURE.md):
//! * [`grpc`]: thin CSI handlers — validate, call the domain, map errors to
//!   `tonic::Status`.
//! * [`domain`]: volumes, pools, the hydration state machine, sizing rules.
//! * [`os`]: device-mapper, loop devices, mounts, behind traits with real
//!   Linux implementations.
//! * [`proto`]: code generated from the vendored CSI spec.
//! * [`k8s`]: Kubernetes mode's custom resources.

pub mod cli;
pub mod domain;
pub mod grpc;
pub mod k8s;
pub mod kubectl;
pub mod metrics;
pub mod os;
pub mod proto;
