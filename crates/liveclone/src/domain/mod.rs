//! Domain layer: volumes, snapshots, pools, hydration, sizing rules.

pub mod device_class;
pub mod engine;
pub mod error;
pub mod file_pool;
pub mod human;
pub mod hydration;
pub mod ids;
pub mod locks;
pub mod lvm_pool;
pub mod model;
pub mod monitor;
pub mod paths;
pub mod pool;
pub mod provisioner;
pub mod sizing;
pub mod store;
