//! Domain layer: volumes, pools, hydration, sizing rules.

pub mod ids;
pub mod sizing;
pub mod store;
