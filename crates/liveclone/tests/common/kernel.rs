//! What every real-kernel test needs, also for the test files that do not
//! start the driver (`real_os`, `real_loop` include just this file with
//! `#[path = "common/kernel.rs"]`): the opt-in check and scratch files.
// Each test binary uses part of it.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};

/// Whether this runs inside the test VM (its agent sets the variable).
pub fn in_vm() -> bool {
    std::env::var_os("LIVECLONE_IN_VM").is_some_and(|v| v == "1")
}

/// The same check as the bench's smoke tests: these tests create devices
/// and mounts, so they run in the VM, or on a host only when asked to.
pub fn require_real_kernel() {
    let on_host = std::env::var_os("LIVECLONE_TEST_ON_HOST").is_some_and(|v| v == "1");
    assert!(
        in_vm() || on_host,
        "real-kernel tests and benchmarks run in the test VM (`make test-vm`, `make bench`), \
         or on a host with dm-clone when LIVECLONE_TEST_ON_HOST=1"
    );
}

/// A temporary directory under `TMPDIR`, removed at the end.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("liveclone-test-")
        .tempdir()
        .expect("temporary directory under TMPDIR")
}

/// A sparse file of `bytes` at `path`.
pub fn sparse_file(path: &Path, bytes: u64) -> PathBuf {
    File::create(path)
        .and_then(|file| file.set_len(bytes))
        .unwrap_or_else(|error| panic!("creating {}: {error}", path.display()));
    path.to_path_buf()
}
