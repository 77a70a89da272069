//! liveclone's real-kernel test bench.
//!
//! The machines that build liveclone run a kernel without device-mapper, so
//! every data-path test runs in a QEMU VM booted on a Debian kernel with a
//! dm-clone module built from Debian's own source (`tests/vm/prepare.sh`).
//! The VM's root file system is the host's, shared read-only over virtio-9p
//! under a RAM overlay, so host-built test binaries run there unchanged.
//!
//! * [`host`]: boot, stream the console, time limit, power cuts.
//! * [`guest`]: the agent that runs as PID 1 inside the VM.
//! * [`cache`]: where the prepared kernel lives.
//! * [`cargo`]: builds test binaries and finds their paths.

pub mod cache;
pub mod cargo;
pub mod guest;
pub mod host;
pub mod spec;

pub use cache::PreparedKernel;
pub use host::{Disk, Ending, Outcome, Vm};

/// Environment variable that lets real-kernel tests run on the host itself,
/// for users whose kernel has dm-clone. Never the default: those tests create
/// device-mapper and loop devices.
pub const TEST_ON_HOST_ENV: &str = "LIVECLONE_TEST_ON_HOST";
