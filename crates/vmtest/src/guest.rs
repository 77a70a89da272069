//! The guest agent: PID 1 of the test VM once the init script has built the
//! root file system. It loads the modules, prepares the scratch disk, runs the
//! commands as root, writes the result and powers the VM off.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};

use crate::spec::{
    GuestResult, GuestSpec, GUEST_RUN_DIR, GUEST_SCRATCH_DIR, IN_VM_ENV, RESULT_FILE, RUN_TAG,
    SCRATCH_SERIAL, SPEC_FILE,
};

const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs the agent and powers off whatever happens: a guest that stays up only
/// makes the host wait for its time limit.
pub fn run_agent() -> ! {
    if let Err(err) = agent() {
        println!("vmtest: guest agent failed: {err:#}");
    }
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // reboot(2) only returns on error; as PID 1 we must not exit either.
    loop {
        std::thread::park();
    }
}

fn agent() -> Result<()> {
    let run_dir = Path::new(GUEST_RUN_DIR);
    std::fs::create_dir_all(run_dir)?;
    mount(
        Some(RUN_TAG),
        run_dir,
        Some("9p"),
        MsFlags::empty(),
        Some("trans=virtio,version=9p2000.L,msize=524288"),
    )
    .context("mounting the run folder")?;
    let spec: GuestSpec = serde_json::from_slice(&std::fs::read(run_dir.join(SPEC_FILE))?)
        .context("reading the run spec")?;

    mount_tmpfs("/dev/shm")?;
    // As PID 1 nothing else brings the loopback interface up, and tests
    // that serve on 127.0.0.1 (etcd, kube-apiserver) would wait for their
    // time limit instead of failing.
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .env("PATH", GUEST_PATH)
        .status()
        .context("running ip link set lo up")?;
    if !status.success() {
        bail!("ip link set lo up failed ({status})");
    }
    link_modules(&spec)?;

    let kernel_release = nix::sys::utsname::uname()?
        .release()
        .to_string_lossy()
        .into_owned();
    println!("vmtest: guest kernel {kernel_release}");
    // virtio_blk first: the disks must exist before they are linked by serial.
    for module in
        std::iter::once("virtio_blk").chain(spec.preload_modules.iter().map(String::as_str))
    {
        let status = Command::new("modprobe")
            .arg(module)
            .env("PATH", GUEST_PATH)
            .status()
            .with_context(|| format!("running modprobe {module}"))?;
        if !status.success() {
            bail!("modprobe {module} failed ({status})");
        }
    }
    link_disks_by_serial()?;
    let dm_clone_loaded = Path::new("/sys/module/dm_clone").exists();
    let targets = Command::new("dmsetup")
        .arg("targets")
        .env("PATH", GUEST_PATH)
        .output()
        .context("running dmsetup targets")?;
    let targets = String::from_utf8_lossy(&targets.stdout);
    let clone_target = targets
        .lines()
        .find(|line| line.split_whitespace().next() == Some("clone"));
    match (dm_clone_loaded, clone_target) {
        (true, Some(line)) => println!(
            "vmtest: dm-clone loaded; dmsetup targets: {}",
            line.split_whitespace().collect::<Vec<_>>().join(" ")
        ),
        _ => bail!("dm-clone did not load (dmsetup targets: {targets:?})"),
    }

    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), GUEST_PATH.into()),
        ("HOME".into(), "/root".into()),
        ("RUST_BACKTRACE".into(), "1".into()),
        // No udev in the guest: let libdevmapper make its own /dev/mapper nodes.
        ("DM_DISABLE_UDEV".into(), "1".into()),
        (IN_VM_ENV.into(), "1".into()),
    ];
    if spec.scratch {
        let tmp = prepare_scratch()?;
        env.push(("TMPDIR".into(), tmp.display().to_string()));
    }
    env.extend(spec.env.iter().cloned());

    let mut exit_codes = Vec::new();
    for command in &spec.commands {
        let Some((program, args)) = command.argv.split_first() else {
            bail!("empty command in the run spec");
        };
        println!("vmtest: running {}", command.argv.join(" "));
        let status = Command::new(program)
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.cwd)
            .status()
            .with_context(|| format!("starting {program}"))?;
        match status.code() {
            Some(code) => println!("vmtest: exit code {code}"),
            None => println!("vmtest: killed by signal {:?}", status.signal()),
        }
        exit_codes.push(status.code());
    }

    let result = GuestResult {
        exit_codes,
        kernel_release,
        dm_clone_loaded,
    };
    std::fs::write(run_dir.join(RESULT_FILE), serde_json::to_vec(&result)?)?;
    nix::unistd::sync();
    Ok(())
}

fn mount_tmpfs(target: &str) -> Result<()> {
    std::fs::create_dir_all(target)?;
    mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .with_context(|| format!("mounting tmpfs on {target}"))
}

/// Makes the prepared module tree the guest's `/lib/modules/<abi>`, so that
/// plain `modprobe` works, both for us and for the kernel's own on-demand loads.
fn link_modules(spec: &GuestSpec) -> Result<()> {
    let modules = Path::new("/lib/modules");
    std::fs::create_dir_all(modules)?;
    let link = modules.join(&spec.kernel_abi);
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(&link)
            .or_else(|_| std::fs::remove_dir_all(&link))
            .with_context(|| format!("replacing {}", link.display()))?;
    }
    std::os::unix::fs::symlink(&spec.modules_dir, &link)
        .with_context(|| format!("linking {}", link.display()))
}

/// What udev would do for virtio disks: `/dev/disk/by-id/virtio-<serial>`.
fn link_disks_by_serial() -> Result<()> {
    let by_id = Path::new("/dev/disk/by-id");
    std::fs::create_dir_all(by_id)?;
    for entry in std::fs::read_dir("/sys/block")? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") {
            continue;
        }
        let Ok(serial) = std::fs::read_to_string(entry.path().join("serial")) else {
            continue;
        };
        let serial = serial.trim();
        if serial.is_empty() {
            continue;
        }
        let link = by_id.join(format!("virtio-{serial}"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(Path::new("/dev").join(&name), &link)?;
    }
    Ok(())
}

/// The scratch disk gets a fresh ext4 and becomes `TMPDIR`: tests need a real
/// block-backed file system (tmpfs has no O_DIRECT on this kernel, and the
/// overlay root lives in RAM).
fn prepare_scratch() -> Result<PathBuf> {
    let device = Path::new("/dev/disk/by-id").join(format!("virtio-{SCRATCH_SERIAL}"));
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
        .arg(&device)
        .env("PATH", GUEST_PATH)
        .status()
        .context("running mkfs.ext4 on the scratch disk")?;
    if !status.success() {
        bail!("mkfs.ext4 {} failed ({status})", device.display());
    }
    std::fs::create_dir_all(GUEST_SCRATCH_DIR)?;
    mount(
        Some(&device),
        GUEST_SCRATCH_DIR,
        Some("ext4"),
        MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting the scratch disk")?;
    let tmp = Path::new(GUEST_SCRATCH_DIR).join("tmp");
    std::fs::create_dir_all(&tmp)?;
    Ok(tmp)
}
