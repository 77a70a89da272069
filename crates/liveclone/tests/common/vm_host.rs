//! The host side of the `vm_*` tests that boot the VM several times on the
//! same virtio disks (`vm_driver_power_cut`, `vm_lvm_power_cut`): a run
//! folder under the VM cache's `runs/` with private copies of the driver
//! and of the test binary, sparse disk files, and the VM. Included by those
//! files only (`#[path = "common/vm_host.rs"]`), not by every test binary.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmtest::{Disk, PreparedKernel, Vm};

/// A run of a multi-boot test: the folder (removed when dropped) and the
/// VM that boots on its disks.
pub struct HostRun {
    dir: tempfile::TempDir,
    /// The private copy of the driver, for the guest.
    pub driver: PathBuf,
    /// The private copy of the running test binary.
    pub me: String,
    pub vm: Vm,
}

impl HostRun {
    /// `prefix` names the run folder, `binary` the copy of this test
    /// binary.
    pub fn new(prefix: &str, binary: &str) -> Self {
        let kernel = PreparedKernel::locate().expect("prepared kernel (make vm-prepare)");
        let agent = vmtest_agent();
        let runs = kernel.runs_dir().expect("runs dir");
        std::fs::create_dir_all(&runs).expect("creating the runs folder");
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&runs)
            .expect("disk folder");
        // Other runners remove folders under runs/ whose owner is gone (or
        // that have no owner and are old): this one outlives 10 minutes.
        std::fs::write(dir.path().join("owner.pid"), std::process::id().to_string())
            .expect("owner.pid");
        // Private copies of both binaries: a build on the host must not
        // replace them under the VM between (or during) the boots.
        let driver = dir.path().join("liveclone");
        std::fs::copy(env!("CARGO_BIN_EXE_liveclone"), &driver).expect("copying the driver");
        let me = dir.path().join(binary);
        std::fs::copy(std::env::current_exe().expect("test binary"), &me)
            .expect("copying the test binary");
        let vm = Vm::new(kernel, agent).expect("vm");
        Self {
            dir,
            driver,
            me: me.to_str().expect("UTF-8 path").to_owned(),
            vm,
        }
    }

    /// A sparse file of `bytes` in the run folder, attached to the VM as
    /// the virtio disk `serial`.
    pub fn add_disk(&mut self, serial: &str, file: &str, bytes: u64) -> PathBuf {
        let path = self.dir.path().join(file);
        File::create(&path)
            .and_then(|f| f.set_len(bytes))
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        self.vm.disks.push(Disk::new(serial, &path).expect("disk"));
        path
    }
}

/// The command that runs the ignored guest test `name` of `binary`.
pub fn phase_command(binary: &str, name: &str) -> Vec<String> {
    vec![
        binary.to_owned(),
        "--ignored".into(),
        "--exact".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
        name.into(),
    ]
}

/// The vmtest binary (the guest agent): cargo builds it for its own
/// package's tests only, so build it here (quick when it is up to date).
pub fn vmtest_agent() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    // target/<profile>/deps/<this test> -> target/<profile>/vmtest
    let agent = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary is in target/<profile>/deps")
        .join("vmtest");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "-p", "vmtest", "--bin", "vmtest"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status();
    match built {
        Ok(status) if status.success() => {}
        other if agent.is_file() => {
            eprintln!(
                "building vmtest failed ({other:?}); using the existing {}",
                agent.display()
            );
        }
        other => panic!("building the vmtest agent failed: {other:?}"),
    }
    assert!(agent.is_file(), "{} was not built", agent.display());
    agent
}
