//! OS layer: device-mapper, loop devices, mounts.

pub mod dm;
