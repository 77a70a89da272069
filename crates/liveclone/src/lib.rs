//! liveclone: a CSI driver for live volume clones with dm-clone.
//!
//! Layers, top to bottom (see docs/ARCHITECTURE.md):
//! * [`grpc`]: thin CSI handlers — validate, call the domain, map errors to
//!   `tonic::Status`.
//! * [`domain`]: volumes, pools, the hydration state machine, sizing rules.
//! * [`os`]: device-mapper, loop devices, mounts, behind traits with real
//!   Linux implementations.
//! * [`proto`]: code generated from the vendored CSI spec.

pub mod cli;
pub mod domain;
pub mod grpc;
pub mod os;
pub mod proto;
