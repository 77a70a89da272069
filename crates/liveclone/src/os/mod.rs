//! OS layer: device-mapper, loop devices, file systems and mounts, kernel
//! checks. Each is a trait with a real Linux implementation; the domain
//! layer only sees the traits (bundled in [`Os`]).

pub mod command;
pub mod dm;
pub mod error;
pub mod fake;
pub mod fs;
pub mod kernel;
pub mod loopdev;
pub mod lvm;

use std::sync::Arc;

pub use error::{OsError, OsErrorKind, OsResult};

/// The OS services the domain layer uses, as one handle.
#[derive(Clone)]
pub struct Os {
    pub dm: Arc<dyn dm::DeviceMapper>,
    pub loops: Arc<dyn loopdev::LoopDevices>,
    pub fs: Arc<dyn fs::Filesystems>,
    pub kernel: Arc<dyn kernel::Kernel>,
}

impl std::fmt::Debug for Os {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Os")
    }
}
