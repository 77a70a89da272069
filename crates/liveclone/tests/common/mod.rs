//! What the tests that run the real `liveclone standalone` binary share
//! (`real_driver`, `real_csi_sanity`, `vm_driver_power_cut`,
//! `bench_driver`): a work folder with a pool ([`Bench`]), the driver
//! process ([`Driver`]), the CSI and admin clients with the calls the tests
//! make ([`Csi`]), and what the kernel holds (device-mapper and loop devices,
//! mounts) for checks and failure reports. Tools run with argument vectors,
//! never through a shell.
//!
//! Helpers that fail the test panic; a `try_` twin returns the error instead
//! for the benchmarks, which record a figure they cannot measure and go on
//! with the next one.

// Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use liveclone::grpc::client::connect_unix;
use liveclone::proto::admin::v1alpha1 as admin;
use liveclone::proto::admin::v1alpha1::admin_client::AdminClient;
use liveclone::proto::admin::v1alpha1::set_hydration_request::Action;
use liveclone::proto::csi::v1 as csi;
use liveclone::proto::csi::v1::controller_client::ControllerClient;
use liveclone::proto::csi::v1::identity_client::IdentityClient;
use liveclone::proto::csi::v1::node_client::NodeClient;
use nix::sys::signal::{kill, Signal};
use nix::sys::statfs::{statfs, FsType, EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::Code;

mod kernel;
/// The LVM device classes' tests (`real_lvm_driver`, `vm_lvm_power_cut`).
pub mod lvm;
// Each test binary uses part of it, as with the rest of this module.
#[allow(unused_imports)]
pub use kernel::{in_vm, require_real_kernel};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// The unit of the data checks, and the alignment O_DIRECT needs.
pub const BLOCK: usize = 4096;
pub const SECTOR: u64 = 512;
pub const BIN: &str = env!("CARGO_BIN_EXE_liveclone");
/// The driver's device-mapper devices are named so; at start it removes
/// those it has no record of.
pub const DM_PREFIX: &str = "liveclone-";
pub const NODE_ID: &str = "test-node";
/// How long the driver may take to answer Probe with ready = true
/// (recovery included).
pub const START_LIMIT: Duration = Duration::from_secs(90);
/// How long the driver may take to exit after SIGTERM.
pub const STOP_LIMIT: Duration = Duration::from_secs(20);
/// Lines of the driver's log printed when a test fails.
pub const LOG_TAIL: usize = 400;
/// RUST_LOG for a driver whose log must explain a failure.
pub const DEBUG_LOG: &str = "debug,h2=info,hyper=info,hyper_util=info,tower=info,tonic=info";
/// RUST_LOG where debug lines would weigh on what is measured, or bury a
/// long run's failure.
pub const INFO_LOG: &str = "info";
/// StorageClass parameters that make hydration slow enough to act during
/// it (one 4 KiB region at a time: the region size is given, since the
/// automatic one is at least 64 KiB), and tunables that finish it fast.
pub const SLOW: [(&str, &str); 3] = [
    ("liveclone.io/regionSize", "4KiB"),
    ("liveclone.io/hydrationThreshold", "1"),
    ("liveclone.io/hydrationBatchSize", "1"),
];
pub const FAST_THRESHOLD: u32 = 4096;
pub const FAST_BATCH: u32 = 1024;
/// Set to 1 to print the driver's whole log after a test that passed too
/// (`vmtest test --env LIVECLONE_TEST_SHOW_LOG=1 ...`).
pub const SHOW_LOG_ENV: &str = "LIVECLONE_TEST_SHOW_LOG";

// ---------------------------------------------------------------------------
// Where the tests run, and what they print.

/// Writes a line straight to stdout, past the test harness's capture, so it
/// shows on the VM console (which the power-cut test's host reads too)
/// whether the test passes or not.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

// ---------------------------------------------------------------------------
// Tools.

/// Runs a tool; its stdout, or an error with its stderr.
pub fn try_run(program: &str, args: &[&OsStr]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    ensure!(
        output.status.success(),
        "{program} {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// [`try_run`], where a failure fails the test.
pub fn run(program: &str, args: &[&OsStr]) -> String {
    try_run(program, args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// For reports: the trimmed output, or what went wrong in parentheses.
pub fn output_or_error(program: &str, args: &[&str]) -> String {
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    match try_run(program, &args) {
        Ok(output) => output.trim().to_owned(),
        Err(e) => format!("({e:#})"),
    }
}

/// The binary to run. In the VM, a private copy on the scratch disk, made
/// once per test process: the VM reads the host's `target` folder over 9p,
/// and a build on the host that replaced `target/debug/liveclone` while a
/// test started it made the driver die at once with SIGSEGV.
pub fn driver_binary() -> &'static Path {
    static COPY: OnceLock<PathBuf> = OnceLock::new();
    COPY.get_or_init(|| {
        if !in_vm() {
            return PathBuf::from(BIN);
        }
        let copy =
            std::env::temp_dir().join(format!("liveclone-under-test-{}", std::process::id()));
        std::fs::copy(BIN, &copy)
            .unwrap_or_else(|e| panic!("copying {BIN} to {}: {e}", copy.display()));
        let version = Command::new(&copy)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("running {} --version: {e}", copy.display()));
        assert!(
            version.status.success(),
            "the copy of {BIN} does not run ({}); was it being rebuilt?",
            version.status
        );
        say(&format!(
            "driver under test: {} ({})",
            copy.display(),
            String::from_utf8_lossy(&version.stdout).trim()
        ));
        copy
    })
}

/// `liveclone <args>` as a user would run it; its stdout.
pub fn liveclone_cli(args: &[&str]) -> String {
    let output = Command::new(driver_binary())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running liveclone {args:?}: {e}"));
    assert!(
        output.status.success(),
        "liveclone {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

// ---------------------------------------------------------------------------
// Device-mapper.

/// Every device-mapper device that exists now.
pub fn all_dm_devices() -> BTreeSet<String> {
    let listing = run("dmsetup", &["ls".as_ref()]);
    if listing.trim() == "No devices found" {
        return BTreeSet::new();
    }
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The driver's device-mapper devices.
pub fn dm_devices() -> BTreeSet<String> {
    all_dm_devices()
        .into_iter()
        .filter(|name| name.starts_with(DM_PREFIX))
        .collect()
}

pub fn try_dm_table(name: &str) -> anyhow::Result<String> {
    try_run("dmsetup", &["table".as_ref(), name.as_ref()])
}

pub fn dm_table(name: &str) -> String {
    try_dm_table(name).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Total length of a table, in sectors.
pub fn table_sectors(table: &str) -> u64 {
    table
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(|length| {
            length
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("odd table:\n{table}"))
        })
        .sum()
}

/// The table is one `linear` line over the whole size: the clone is
/// independent of its source and metadata.
pub fn assert_single_linear(name: &str, bytes: u64) {
    let table = dm_table(name);
    let lines: Vec<&str> = table.lines().collect();
    let fields: Vec<&str> = lines
        .first()
        .map(|line| line.split_whitespace().collect())
        .unwrap_or_default();
    let length = (bytes / SECTOR).to_string();
    assert!(
        lines.len() == 1
            && fields.len() == 5
            && fields[0] == "0"
            && fields[1] == length
            && fields[2] == "linear",
        "{name} is not one linear target of {length} sectors:\n{table}"
    );
}

/// The counts of a clone target's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneLine {
    pub region_sectors: u64,
    pub hydrated: u64,
    pub total: u64,
}

impl CloneLine {
    /// One line of `dmsetup status`: `<start> <length> clone <metadata
    /// block> <used>/<total> <region sectors> <hydrated>/<total> ...`;
    /// `None` for another target or an odd line.
    pub fn parse(line: &str) -> Option<Self> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(2) != Some(&"clone") {
            return None;
        }
        let (hydrated, total) = fields.get(6)?.split_once('/')?;
        Some(Self {
            region_sectors: fields.get(5)?.parse().ok()?,
            hydrated: hydrated.parse().ok()?,
            total: total.parse().ok()?,
        })
    }
}

/// A clone's counts, read without a flush; `None` once its table has no
/// clone target (switched to linear).
pub fn try_clone_status(name: &str) -> anyhow::Result<Option<CloneLine>> {
    let status = try_run(
        "dmsetup",
        &["status".as_ref(), "--noflush".as_ref(), name.as_ref()],
    )?;
    let Some(line) = status
        .lines()
        .find(|line| line.split_whitespace().nth(2) == Some("clone"))
    else {
        return Ok(None);
    };
    CloneLine::parse(line)
        .map(Some)
        .with_context(|| format!("odd clone status of {name}: {line}"))
}

/// `(hydrated, total)` regions of a clone, read without a flush.
pub fn clone_regions(name: &str) -> (u64, u64) {
    match try_clone_status(name) {
        Ok(Some(line)) => (line.hydrated, line.total),
        Ok(None) => panic!(
            "{name} has no clone target: {}",
            output_or_error("dmsetup", &["table", name])
        ),
        Err(e) => panic!("{e:#}"),
    }
}

/// Swaps a device's table the way device-mapper allows under I/O: suspend,
/// load, resume. The device is resumed even when the load fails, so that a
/// failure never leaves it holding I/O.
pub fn replace_table(name: &str, table: &str) -> anyhow::Result<()> {
    try_run("dmsetup", &["suspend".as_ref(), name.as_ref()])?;
    let loaded = try_run(
        "dmsetup",
        &[
            "load".as_ref(),
            name.as_ref(),
            "--table".as_ref(),
            table.as_ref(),
        ],
    );
    let resumed = try_run("dmsetup", &["resume".as_ref(), name.as_ref()]);
    loaded.with_context(|| format!("loading a new table into {name}"))?;
    resumed.map(drop)
}

/// A device-mapper device of a test's own, never named with [`DM_PREFIX`]
/// so that the driver leaves it alone; removed when dropped.
pub struct OwnDevice {
    name: String,
    path: PathBuf,
    removed: bool,
}

impl OwnDevice {
    pub fn create(name: &str, table: &str) -> anyhow::Result<Self> {
        ensure!(
            !name.starts_with(DM_PREFIX),
            "{name}: the driver removes the {DM_PREFIX}... devices it has no record of"
        );
        try_run(
            "dmsetup",
            &[
                "create".as_ref(),
                name.as_ref(),
                "--table".as_ref(),
                table.as_ref(),
            ],
        )?;
        Ok(Self {
            name: name.to_owned(),
            path: Path::new("/dev/mapper").join(name),
            removed: false,
        })
    }

    /// A `linear` device over the first `bytes` of `device`.
    pub fn linear(name: &str, device: &Path, bytes: u64) -> anyhow::Result<Self> {
        Self::create(
            name,
            &format!("0 {} linear {} 0", bytes / SECTOR, device.display()),
        )
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `major:minor`, the way tables name devices.
    pub fn device_number(&self) -> anyhow::Result<String> {
        let numbers = try_run(
            "dmsetup",
            &[
                "info".as_ref(),
                "--columns".as_ref(),
                "--noheadings".as_ref(),
                "--options".as_ref(),
                "major,minor".as_ref(),
                "--separator".as_ref(),
                ":".as_ref(),
                self.name.as_ref(),
            ],
        )?;
        Ok(numbers.trim().to_owned())
    }

    pub fn replace_table(&self, table: &str) -> anyhow::Result<()> {
        replace_table(&self.name, table)
    }

    /// Removes the device now; on an error, the drop tries once more.
    pub fn remove(mut self) -> anyhow::Result<()> {
        try_run(
            "dmsetup",
            &["remove".as_ref(), "--retry".as_ref(), self.name.as_ref()],
        )?;
        self.removed = true;
        Ok(())
    }
}

impl Drop for OwnDevice {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let removed = Command::new("dmsetup")
            .args(["remove", "--retry", &self.name])
            .output();
        if !removed.is_ok_and(|o| o.status.success()) {
            say(&format!("cleanup: could not remove {}", self.name));
        }
    }
}

// ---------------------------------------------------------------------------
// Loop devices.

/// Loop devices backed by files under `pool`: device -> backing file.
pub fn pool_loops(pool: &Path) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = backing.trim().to_owned();
        if Path::new(&backing).starts_with(pool) {
            found.insert(format!("/dev/{name}"), backing);
        }
    }
    found
}

/// A loop device over a file; detached when dropped.
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    /// Read-write, through the page cache.
    pub fn attach(file: &Path) -> anyhow::Result<Self> {
        Self::attach_with(file, &[])
    }

    /// With direct I/O, as the pool attaches its files.
    pub fn attach_direct(file: &Path, read_only: bool) -> anyhow::Result<Self> {
        let mut options = vec!["--direct-io=on"];
        if read_only {
            options.push("--read-only");
        }
        Self::attach_with(file, &options)
    }

    fn attach_with(file: &Path, options: &[&str]) -> anyhow::Result<Self> {
        let mut args: Vec<&OsStr> = options.iter().map(OsStr::new).collect();
        args.extend([OsStr::new("--find"), OsStr::new("--show"), file.as_os_str()]);
        let device = try_run("losetup", &args)?;
        Ok(Self {
            path: PathBuf::from(device.trim()),
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let detached = Command::new("losetup").arg("-d").arg(&self.path).output();
        if !detached.is_ok_and(|o| o.status.success()) {
            say(&format!(
                "cleanup: could not detach {}",
                self.path.display()
            ));
        }
    }
}

// ---------------------------------------------------------------------------
// Files and mounts.

/// Every file (not folder) below `root`, recursively.
pub fn files_under(root: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(path),
                Ok(_) => {
                    found.insert(path);
                }
                Err(_) => {}
            }
        }
    }
    found
}

/// Mount points at or below `root`, deepest first, from this process's
/// mount table.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_path(field)))
        .filter(|point| point.starts_with(root))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    points.dedup();
    points
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal.
pub fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Best effort, for clean-up: unmount everything below `root`, deepest
/// first; a busy one is detached lazily.
pub fn unmount_all_under(root: &Path) {
    for point in mounts_under(root) {
        let plain = Command::new("umount").arg(&point).output();
        if plain.is_ok_and(|output| output.status.success()) {
            continue;
        }
        let lazy = Command::new("umount").arg("-l").arg(&point).output();
        let how = if lazy.is_ok_and(|output| output.status.success()) {
            "detached lazily (busy)"
        } else {
            "could not be unmounted"
        };
        say(&format!("cleanup: {} {how}", point.display()));
    }
}

/// Writes dirty data back and empties the page cache, so the next reads
/// come from the devices.
pub fn drop_caches() {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("dropping the page cache");
}

/// (size, used) of the file system mounted at `path`, in bytes.
pub fn fs_usage(path: &Path) -> anyhow::Result<(u64, u64)> {
    let stat =
        nix::sys::statvfs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
    let block: u64 = stat.fragment_size();
    let blocks: u64 = stat.blocks();
    let free: u64 = stat.blocks_free();
    Ok((blocks * block, (blocks - free) * block))
}

/// Size of a block device (or file), in bytes.
pub fn device_bytes(path: &Path) -> u64 {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    file.seek(SeekFrom::End(0)).expect("seek to end")
}

/// The last `lines` lines of a log.
pub fn tail_of(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Err(e) = File::open(path).and_then(|mut f| f.read_to_string(&mut text)) {
        return format!("(cannot read {}: {e})", path.display());
    }
    // A power cut can leave the end of a log as zeros (its size was
    // written, its data not): drop them.
    let all: Vec<&str> = text
        .lines()
        .map(|line| line.trim_matches('\0'))
        .filter(|line| !line.is_empty())
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------
// Data.

/// A page-aligned buffer, as O_DIRECT needs.
pub struct Aligned {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize) -> Self {
        let storage = vec![0u8; len + BLOCK];
        let offset = storage.as_ptr().align_offset(BLOCK);
        Self {
            storage,
            offset,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.offset..self.offset + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

pub fn try_open_direct(path: &Path, write: bool) -> anyhow::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("opening {} with O_DIRECT", path.display()))
}

pub fn open_direct(path: &Path, write: bool) -> File {
    try_open_direct(path, write).unwrap_or_else(|e| panic!("{e:#}"))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn to_i64(bytes: u64) -> i64 {
    i64::try_from(bytes).expect("test sizes fit in i64")
}

pub fn path_string(path: &Path) -> String {
    path.to_str().expect("test paths are UTF-8").to_owned()
}

// ---------------------------------------------------------------------------
// The driver process.

/// The arguments of `liveclone standalone` on these folders.
pub fn standalone_args<'a>(
    endpoint: &'a str,
    state: &'a Path,
    pool: &'a Path,
    node_id: &'a str,
    mount_root: &'a Path,
) -> Vec<&'a OsStr> {
    vec![
        OsStr::new("standalone"),
        OsStr::new("--endpoint"),
        OsStr::new(endpoint),
        OsStr::new("--state-dir"),
        state.as_os_str(),
        OsStr::new("--pool-dir"),
        pool.as_os_str(),
        OsStr::new("--node-id"),
        OsStr::new(node_id),
        OsStr::new("--allowed-mount-root"),
        mount_root.as_os_str(),
    ]
}

/// A `liveclone` process whose stdout and stderr go to a log file; stopped
/// (SIGTERM, then SIGKILL) when dropped.
pub struct Driver {
    child: Option<Child>,
    log: PathBuf,
}

impl Driver {
    /// Starts `binary args` with its output appended to `log` after a line
    /// naming `what` (one log may hold several runs). RUST_LOG is
    /// `rust_log` unless the environment sets it.
    pub fn start(
        binary: &Path,
        args: &[&OsStr],
        log: &Path,
        rust_log: &str,
        what: &str,
    ) -> anyhow::Result<Self> {
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let _ = writeln!(out, "===== test: {what} =====");
        let err = out.try_clone().context("duplicating the log handle")?;
        let mut command = Command::new(binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", rust_log);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            child: Some(child),
            log: log.to_owned(),
        })
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// How the process ended, once it has (it is reaped then).
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Waits until Probe says ready (start-up recovery done); fails early
    /// when the driver exits or calls itself unhealthy.
    pub async fn wait_ready(&mut self, endpoint: &str, limit: Duration) -> anyhow::Result<Channel> {
        let started = Instant::now();
        let mut last_problem = String::from("no socket yet");
        loop {
            if let Some(status) = self.exited() {
                bail!("the driver exited ({status}) while starting: {last_problem}");
            }
            match connect_unix(endpoint).await {
                Ok(channel) => {
                    let mut identity = IdentityClient::new(channel.clone());
                    match identity.probe(csi::ProbeRequest {}).await {
                        Ok(response) if response.get_ref().ready == Some(true) => {
                            return Ok(channel)
                        }
                        Ok(response) => last_problem = format!("Probe: {:?}", response.get_ref()),
                        Err(status) if status.code() == Code::FailedPrecondition => {
                            bail!("the driver is unhealthy: {}", status.message())
                        }
                        Err(status) => last_problem = format!("Probe: {status}"),
                    }
                }
                Err(e) => last_problem = format!("{e:#}"),
            }
            ensure!(
                started.elapsed() < limit,
                "the driver was not ready within {limit:?}: {last_problem}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the socket accepts a connection, without an async
    /// runtime; fails early when the driver exits.
    pub fn wait_for_socket(&mut self, socket: &Path, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let is_socket =
                std::fs::symlink_metadata(socket).is_ok_and(|meta| meta.file_type().is_socket());
            if is_socket && UnixStream::connect(socket).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                bail!(
                    "the driver exited ({status}) before creating {}",
                    socket.display()
                );
            }
            ensure!(
                start.elapsed() < limit,
                "the driver did not listen on {} within {limit:?}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: no shutdown code runs, as when the process crashes.
    pub fn kill(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the driver is not running");
        child.kill().expect("SIGKILL to the driver");
        let status = child.wait().expect("reaping the driver");
        if let Ok(mut log) = OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(log, "===== test: driver killed ({status}) =====");
        }
        status
    }

    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.stop_within(STOP_LIMIT)
    }

    /// SIGTERM, a bounded wait, then SIGKILL; how it ended.
    pub fn stop_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        say(&format!(
            "the driver did not exit within {limit:?} of SIGTERM; killing it"
        ));
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// The driver's APIs.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Block,
    Ext4,
}

pub fn capability(access: Access) -> csi::VolumeCapability {
    use csi::volume_capability::access_mode::Mode;
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
    csi::VolumeCapability {
        access_type: Some(match access {
            Access::Block => AccessType::Block(BlockVolume {}),
            Access::Ext4 => AccessType::Mount(MountVolume {
                fs_type: "ext4".to_owned(),
                ..Default::default()
            }),
        }),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter.into(),
        }),
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    Volume(&'a str),
    Snapshot(&'a str),
}

pub fn volume_source(id: &str) -> csi::VolumeContentSource {
    content_source(Source::Volume(id))
}

pub fn content_source(source: Source<'_>) -> csi::VolumeContentSource {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    csi::VolumeContentSource {
        r#type: Some(match source {
            Source::Volume(id) => Type::Volume(VolumeSource {
                volume_id: id.to_owned(),
            }),
            Source::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.to_owned(),
            }),
        }),
    }
}

pub fn create_request(
    name: &str,
    bytes: u64,
    access: Access,
    source: Option<Source<'_>>,
    parameters: &[(&str, &str)],
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: to_i64(bytes),
            limit_bytes: 0,
        }),
        volume_capabilities: vec![capability(access)],
        parameters: parameters
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        volume_content_source: source.map(content_source),
        ..Default::default()
    }
}

/// A call's status as an error that names the call.
pub fn rpc<T>(what: &str, result: Result<T, tonic::Status>) -> anyhow::Result<T> {
    result.map_err(|status| {
        anyhow::anyhow!("{what} failed: {:?}: {}", status.code(), status.message())
    })
}

/// [`rpc`] as a method, for a call in a chain that ends with `?`.
pub trait RpcResult<T> {
    fn rpc(self, what: &str) -> anyhow::Result<T>;
}

impl<T> RpcResult<T> for Result<T, tonic::Status> {
    fn rpc(self, what: &str) -> anyhow::Result<T> {
        rpc(what, self)
    }
}

/// The value of a call that must succeed.
pub fn must<T>(what: &str, result: Result<T, tonic::Status>) -> T {
    rpc(what, result).unwrap_or_else(|e| panic!("{e:#}"))
}

pub fn describe(h: &admin::Hydration) -> String {
    format!(
        "{}{} {:.1}% ({} of {} bytes), threshold {} batch {}: {}",
        h.phase,
        if h.paused { " (paused)" } else { "" },
        h.percent,
        h.hydrated_bytes,
        h.total_bytes,
        h.threshold,
        h.batch_size,
        h.message
    )
}

/// A staged and published volume.
pub struct Mounted {
    pub volume_id: String,
    pub staging: PathBuf,
    pub target: PathBuf,
}

/// The CSI Controller and Node clients and the admin client, on the
/// driver's one socket.
pub struct Csi {
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    pub admin: AdminClient<Channel>,
    /// How often the waits read the admin API.
    pub poll: Duration,
}

impl Csi {
    pub fn new(channel: Channel) -> Self {
        Self {
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel.clone()),
            admin: AdminClient::new(channel),
            poll: Duration::from_millis(500),
        }
    }

    pub async fn create_volume(
        &mut self,
        name: &str,
        bytes: u64,
        access: Access,
        source: Option<Source<'_>>,
        parameters: &[(&str, &str)],
    ) -> Result<csi::Volume, tonic::Status> {
        let request = create_request(name, bytes, access, source, parameters);
        let response = self.controller.create_volume(request).await?.into_inner();
        Ok(response.volume.expect("CreateVolume returned no volume"))
    }

    pub async fn delete_volume(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.to_owned(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn create_snapshot(
        &mut self,
        name: &str,
        source: &str,
    ) -> Result<csi::Snapshot, tonic::Status> {
        let response = self
            .controller
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: source.to_owned(),
                name: name.to_owned(),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(response
            .snapshot
            .expect("CreateSnapshot returned no snapshot"))
    }

    pub async fn delete_snapshot(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.to_owned(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn set_hydration(
        &mut self,
        id: &str,
        action: Action,
        threshold: Option<u32>,
        batch_size: Option<u32>,
    ) -> Result<admin::VolumeStatus, tonic::Status> {
        let response = self
            .admin
            .set_hydration(admin::SetHydrationRequest {
                volume_id: id.to_owned(),
                action: action.into(),
                threshold,
                batch_size,
            })
            .await?
            .into_inner();
        Ok(response.volume.expect("SetHydration returned no volume"))
    }

    /// TUNE to [`FAST_THRESHOLD`] and [`FAST_BATCH`], checking that the
    /// answer carries them: a slow clone is made to finish.
    pub async fn tune_fast(&mut self, id: &str) {
        let tuned = must(
            "SetHydration TUNE",
            self.set_hydration(id, Action::Tune, Some(FAST_THRESHOLD), Some(FAST_BATCH))
                .await,
        );
        let tuned = tuned.hydration.expect("TUNE answered without hydration");
        assert_eq!(
            (tuned.threshold, tuned.batch_size),
            (FAST_THRESHOLD, FAST_BATCH),
            "TUNE answered other tunables"
        );
    }

    pub async fn try_admin_list(&mut self) -> anyhow::Result<Vec<admin::VolumeStatus>> {
        let response = rpc(
            "Admin ListVolumes",
            self.admin.list_volumes(admin::ListVolumesRequest {}).await,
        )?;
        Ok(response.into_inner().volumes)
    }

    pub async fn admin_list(&mut self) -> Vec<admin::VolumeStatus> {
        self.try_admin_list()
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub async fn try_status_of(&mut self, id: &str) -> anyhow::Result<admin::VolumeStatus> {
        let volumes = self.try_admin_list().await?;
        let ids: Vec<String> = volumes.iter().map(|v| v.volume_id.clone()).collect();
        volumes
            .into_iter()
            .find(|v| v.volume_id == id)
            .with_context(|| format!("the admin API does not list {id} (it lists {ids:?})"))
    }

    pub async fn status_of(&mut self, id: &str) -> admin::VolumeStatus {
        self.try_status_of(id)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub async fn try_hydration_of(&mut self, id: &str) -> anyhow::Result<admin::Hydration> {
        let status = self.try_status_of(id).await?;
        match status.hydration {
            Some(hydration) => Ok(hydration),
            None => bail!("volume {id} has no hydration status: {status:?}"),
        }
    }

    pub async fn hydration_of(&mut self, id: &str) -> admin::Hydration {
        self.try_hydration_of(id)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The device-mapper name the admin API gives for a volume.
    pub async fn dm_name_of(&mut self, id: &str) -> String {
        let status = self.status_of(id).await;
        assert!(
            status.device_present,
            "volume {id} has no device: {status:?}"
        );
        let name = Path::new(&status.device)
            .file_name()
            .and_then(OsStr::to_str)
            .unwrap_or_else(|| panic!("odd device path {:?}", status.device))
            .to_owned();
        assert!(name.starts_with(DM_PREFIX), "odd device name {name}");
        name
    }

    /// Polls the admin API until `done` holds; an error on `Failed` or at
    /// `limit`.
    pub async fn try_wait_hydration(
        &mut self,
        id: &str,
        limit: Duration,
        done: impl Fn(&admin::Hydration) -> bool,
    ) -> anyhow::Result<admin::Hydration> {
        let start = Instant::now();
        let mut last_print = Instant::now();
        loop {
            let hydration = self.try_hydration_of(id).await?;
            if done(&hydration) {
                return Ok(hydration);
            }
            ensure!(
                hydration.phase != "Failed",
                "hydration of {id} failed: {}",
                describe(&hydration)
            );
            ensure!(
                start.elapsed() < limit,
                "hydration of {id} did not get there within {limit:?}: {}",
                describe(&hydration)
            );
            if last_print.elapsed() >= Duration::from_secs(10) {
                say(&format!("  waiting for {id}: {}", describe(&hydration)));
                last_print = Instant::now();
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    pub async fn wait_hydration(
        &mut self,
        id: &str,
        limit: Duration,
        done: impl Fn(&admin::Hydration) -> bool,
    ) -> admin::Hydration {
        self.try_wait_hydration(id, limit, done)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Waits until the monitor has started the clone's copy: a new
    /// file-system clone is `Pending` (hydration off) until the monitor has
    /// trimmed it and enabled hydration, a round or two after CreateVolume.
    pub async fn try_wait_started(
        &mut self,
        id: &str,
        limit: Duration,
    ) -> anyhow::Result<admin::Hydration> {
        self.try_wait_hydration(id, limit, |h| h.phase != "Pending")
            .await
    }

    pub async fn wait_started(&mut self, id: &str, limit: Duration) -> admin::Hydration {
        self.try_wait_started(id, limit)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Waits for `Complete` (switched to linear and recorded).
    pub async fn try_wait_complete(
        &mut self,
        id: &str,
        limit: Duration,
    ) -> anyhow::Result<admin::Hydration> {
        let start = Instant::now();
        let done = self
            .try_wait_hydration(id, limit, |h| h.phase == "Complete")
            .await?;
        say(&format!(
            "  {id} complete after {:.1} s of waiting",
            start.elapsed().as_secs_f64()
        ));
        ensure!(
            done.hydrated_bytes == done.total_bytes && done.completed_at > 0,
            "{id} is Complete with odd figures: {done:?}"
        );
        Ok(done)
    }

    pub async fn wait_complete(&mut self, id: &str, limit: Duration) -> admin::Hydration {
        self.try_wait_complete(id, limit)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// NodeStageVolume then NodePublishVolume at `<mnt>/<tag>-staging` and
    /// `<mnt>/<tag>-target`, as kubelet calls them (the CO makes the
    /// staging folder, the driver the target); how long each took.
    pub async fn try_stage_publish_timed(
        &mut self,
        mnt: &Path,
        volume_id: &str,
        access: Access,
        tag: &str,
    ) -> anyhow::Result<(Mounted, Duration, Duration)> {
        let staging = mnt.join(format!("{tag}-staging"));
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("creating {}", staging.display()))?;
        let target = mnt.join(format!("{tag}-target"));
        let started = Instant::now();
        rpc(
            &format!("NodeStageVolume ({tag})"),
            self.node
                .node_stage_volume(csi::NodeStageVolumeRequest {
                    volume_id: volume_id.to_owned(),
                    staging_target_path: path_string(&staging),
                    volume_capability: Some(capability(access)),
                    ..Default::default()
                })
                .await,
        )?;
        let stage = started.elapsed();
        let started = Instant::now();
        rpc(
            &format!("NodePublishVolume ({tag})"),
            self.node
                .node_publish_volume(csi::NodePublishVolumeRequest {
                    volume_id: volume_id.to_owned(),
                    staging_target_path: path_string(&staging),
                    target_path: path_string(&target),
                    volume_capability: Some(capability(access)),
                    readonly: false,
                    ..Default::default()
                })
                .await,
        )?;
        let publish = started.elapsed();
        let kind = std::fs::metadata(&target)
            .with_context(|| format!("the published {} is missing", target.display()))?;
        match access {
            Access::Ext4 => ensure!(
                mounts_under(mnt).contains(&target) && kind.is_dir(),
                "{} is not a mounted folder after NodePublishVolume",
                target.display()
            ),
            Access::Block => ensure!(
                kind.file_type().is_block_device(),
                "{} is not a block device after NodePublishVolume",
                target.display()
            ),
        }
        let mounted = Mounted {
            volume_id: volume_id.to_owned(),
            staging,
            target,
        };
        Ok((mounted, stage, publish))
    }

    pub async fn try_stage_publish(
        &mut self,
        mnt: &Path,
        volume_id: &str,
        access: Access,
        tag: &str,
    ) -> anyhow::Result<Mounted> {
        Ok(self
            .try_stage_publish_timed(mnt, volume_id, access, tag)
            .await?
            .0)
    }

    pub async fn stage_publish(
        &mut self,
        mnt: &Path,
        volume_id: &str,
        access: Access,
        tag: &str,
    ) -> Mounted {
        self.try_stage_publish(mnt, volume_id, access, tag)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// NodeUnpublishVolume then NodeUnstageVolume; then, as the CO does,
    /// removes the staging folder.
    pub async fn try_unpublish_unstage(&mut self, mounted: &Mounted) -> anyhow::Result<()> {
        rpc(
            "NodeUnpublishVolume",
            self.node
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: mounted.volume_id.clone(),
                    target_path: path_string(&mounted.target),
                })
                .await,
        )?;
        rpc(
            "NodeUnstageVolume",
            self.node
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: mounted.volume_id.clone(),
                    staging_target_path: path_string(&mounted.staging),
                })
                .await,
        )?;
        ensure!(
            !mounted.target.exists(),
            "NodeUnpublishVolume left {}",
            mounted.target.display()
        );
        let left = mounts_under(&mounted.staging);
        ensure!(
            left.is_empty(),
            "still mounted after NodeUnstageVolume: {left:?}"
        );
        let _ = std::fs::remove_dir(&mounted.staging);
        Ok(())
    }

    pub async fn unpublish_unstage(&mut self, mounted: &Mounted) {
        self.try_unpublish_unstage(mounted)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }
}

// ---------------------------------------------------------------------------
// What is left in the kernel.

/// For failure reports: every device of the driver's with its table and
/// status, the pool's loops and files, and the mounts below `root`.
pub fn kernel_state(pool: &Path, root: &Path) -> String {
    let mut out = String::new();
    for name in dm_devices() {
        let table = output_or_error("dmsetup", &["table", &name]);
        let status = output_or_error("dmsetup", &["status", "--noflush", &name]);
        out.push_str(&format!("{name}:\n  table  {table}\n  status {status}\n"));
    }
    out.push_str(&format!("pool loops: {:?}\n", pool_loops(pool)));
    out.push_str(&format!("pool files: {:?}\n", files_under(pool)));
    out.push_str(&format!("mounts: {:?}\n", mounts_under(root)));
    out
}

/// After every volume and snapshot was deleted: no device of the driver's
/// beyond `dm_before`, no loop device on the pool, no pool file, no mount
/// below `mnt`.
pub fn assert_nothing_left(dm_before: &BTreeSet<String>, pool: &Path, mnt: &Path) {
    let devices: Vec<String> = dm_devices().difference(dm_before).cloned().collect();
    let loops = pool_loops(pool);
    let pool_files = files_under(pool);
    let mounts = mounts_under(mnt);
    assert!(
        devices.is_empty() && loops.is_empty() && pool_files.is_empty() && mounts.is_empty(),
        "left after everything was deleted:\n  devices {devices:?}\n  loops {loops:?}\n  \
         pool files {pool_files:?}\n  mounts {mounts:?}"
    );
}

// ---------------------------------------------------------------------------
// The bench: a work folder, a pool, the driver process, and clean-up.

/// Where the driver's file pool lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// A folder in the scratch disk's own ext4 (the VM's TMPDIR): no
    /// reflink, so snapshots are cut by redirect.
    Ext4,
    /// A fresh xfs in a sparse image of this many bytes on a loop device:
    /// snapshots are cut by reflink.
    Xfs(u64),
    /// A fresh ext4 in a sparse image of this many bytes on a loop device
    /// with direct I/O, mounted with `discard` so that deleted files free
    /// the scratch disk: for volumes larger than the driver would put in
    /// the scratch disk.
    LargeExt4(u64),
}

impl Pool {
    pub fn name(self) -> &'static str {
        match self {
            Pool::Ext4 => "ext4",
            Pool::Xfs(_) => "xfs",
            Pool::LargeExt4(_) => "ext4 image",
        }
    }

    fn magic(self) -> FsType {
        match self {
            Pool::Ext4 | Pool::LargeExt4(_) => EXT4_SUPER_MAGIC,
            Pool::Xfs(_) => XFS_SUPER_MAGIC,
        }
    }
}

/// A file system in a sparse image on a loop device, mounted; unmounted
/// and detached when dropped.
struct ImagePool {
    /// Detaches when the pool drops, after the unmount.
    loop_device: LoopDevice,
    mount_point: PathBuf,
}

impl ImagePool {
    /// `None` for a pool on the scratch disk itself.
    fn new(pool: Pool, image: &Path, mount_point: &Path) -> anyhow::Result<Option<Self>> {
        let bytes = match pool {
            Pool::Ext4 => return Ok(None),
            Pool::Xfs(bytes) | Pool::LargeExt4(bytes) => bytes,
        };
        File::create(image)
            .and_then(|file| file.set_len(bytes))
            .with_context(|| format!("creating {}", image.display()))?;
        let xfs = matches!(pool, Pool::Xfs(_));
        let loop_device = if xfs {
            LoopDevice::attach(image)?
        } else {
            LoopDevice::attach_direct(image, false)?
        };
        let device = loop_device.path.as_os_str();
        if xfs {
            try_run("mkfs.xfs", &["-q".as_ref(), "-f".as_ref(), device])?;
        } else {
            try_run(
                "mkfs.ext4",
                &[
                    "-q".as_ref(),
                    "-E".as_ref(),
                    "lazy_itable_init=1,lazy_journal_init=1".as_ref(),
                    device,
                ],
            )?;
        }
        std::fs::create_dir(mount_point)
            .with_context(|| format!("creating {}", mount_point.display()))?;
        let mut args: Vec<&OsStr> = vec!["-t".as_ref()];
        if xfs {
            args.push("xfs".as_ref());
        } else {
            args.extend([
                OsStr::new("ext4"),
                OsStr::new("-o"),
                OsStr::new("noinit_itable,discard"),
            ]);
        }
        args.extend([device, mount_point.as_os_str()]);
        try_run("mount", &args)?;
        Ok(Some(Self {
            loop_device,
            mount_point: mount_point.to_owned(),
        }))
    }
}

impl Drop for ImagePool {
    fn drop(&mut self) {
        // The loop device detaches when its field drops, after this.
        unmount_all_under(&self.mount_point);
    }
}

/// A work folder below TMPDIR (the VM's ext4 scratch disk) with the
/// driver's state, pool and mount root, and the driver running on them.
/// When dropped it stops the driver and removes whatever the test left:
/// mounts, the driver's devices, loop devices on the pool, the folder
/// (unless something below it could not be unmounted). When a test fails,
/// it prints the kernel's state and the end of the driver's log first.
pub struct Bench {
    pub label: String,
    dir: Option<tempfile::TempDir>,
    pub root: PathBuf,
    pub pool: PathBuf,
    pub state: PathBuf,
    pub mnt: PathBuf,
    pub socket: PathBuf,
    pub endpoint: String,
    pub log: PathBuf,
    image: Option<ImagePool>,
    driver: Option<Driver>,
    starts: u32,
    dm_before: BTreeSet<String>,
    started: Instant,
    rust_log: &'static str,
    show_log_env: &'static str,
}

impl Bench {
    pub fn new(label: &str, pool: Pool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("lc-{label}-"))
            .tempdir()
            .expect("creating the work folder under TMPDIR");
        let root = dir
            .path()
            .canonicalize()
            .expect("resolving the work folder");
        let mnt = root.join("mnt");
        let state = root.join("state");
        for folder in [&mnt, &state] {
            std::fs::create_dir(folder)
                .unwrap_or_else(|e| panic!("creating {}: {e}", folder.display()));
        }
        let image = ImagePool::new(pool, &root.join("pool.img"), &root.join("image"))
            .unwrap_or_else(|e| panic!("making the {} pool: {e:#}", pool.name()));
        let pool_dir = match &image {
            Some(image) => image.mount_point.join("pool"),
            None => root.join("pool"),
        };
        let socket = root.join("csi.sock");
        let bench = Self {
            label: label.to_owned(),
            dir: Some(dir),
            pool: pool_dir,
            state,
            mnt,
            endpoint: format!("unix://{}", socket.display()),
            socket,
            log: root.join("driver.log"),
            image,
            driver: None,
            starts: 0,
            dm_before: dm_devices(),
            started: Instant::now(),
            root,
            rust_log: DEBUG_LOG,
            show_log_env: SHOW_LOG_ENV,
        };
        std::fs::create_dir(&bench.pool)
            .unwrap_or_else(|e| panic!("creating {}: {e}", bench.pool.display()));
        let magic = statfs(&bench.pool)
            .expect("statfs of the pool")
            .filesystem_type();
        assert!(
            magic == pool.magic(),
            "the pool {} is not on {} ({magic:?})",
            bench.pool.display(),
            pool.name()
        );
        bench.step(&format!(
            "pool on {} at {}",
            pool.name(),
            bench.pool.display()
        ));
        bench
    }

    /// RUST_LOG for the driver when the environment sets none (default
    /// [`DEBUG_LOG`]).
    pub fn with_rust_log(mut self, rust_log: &'static str) -> Self {
        self.rust_log = rust_log;
        self
    }

    /// The variable that asks for the driver's whole log after a run that
    /// passed (default [`SHOW_LOG_ENV`]).
    pub fn with_show_log_env(mut self, name: &'static str) -> Self {
        self.show_log_env = name;
        self
    }

    /// A CO name unique to this bench and process.
    pub fn name(&self, what: &str) -> String {
        format!("{}-{what}-{}", self.label, std::process::id())
    }

    pub fn step(&self, message: &str) {
        say(&format!(
            "[{} +{:.1}s] {message}",
            self.label,
            self.started.elapsed().as_secs_f64()
        ));
    }

    /// Starts `liveclone standalone` on the bench's folders, with
    /// `extra_args` after the usual ones; does not wait for it.
    pub fn spawn_driver(&mut self, extra_args: &[&str]) -> anyhow::Result<()> {
        ensure!(self.driver.is_none(), "the driver is already running");
        self.starts += 1;
        let mut args = standalone_args(&self.endpoint, &self.state, &self.pool, NODE_ID, &self.mnt);
        args.extend(extra_args.iter().map(OsStr::new));
        let driver = Driver::start(
            driver_binary(),
            &args,
            &self.log,
            self.rust_log,
            &format!("driver start #{}", self.starts),
        )?;
        self.driver = Some(driver);
        Ok(())
    }

    /// Starts the driver and waits until Probe says ready.
    pub async fn try_start_driver(&mut self, extra_args: &[&str]) -> anyhow::Result<Csi> {
        self.spawn_driver(extra_args)?;
        let started = Instant::now();
        let driver = self.driver.as_mut().context("the driver is not running")?;
        let channel = driver.wait_ready(&self.endpoint, START_LIMIT).await?;
        self.step(&format!(
            "driver #{} ready in {:.1} s",
            self.starts,
            started.elapsed().as_secs_f64()
        ));
        Ok(Csi::new(channel))
    }

    pub async fn start_driver(&mut self, extra_args: &[&str]) -> Csi {
        self.try_start_driver(extra_args)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Waits until the driver started by [`Self::spawn_driver`] listens.
    pub fn wait_for_socket(&mut self, limit: Duration) -> anyhow::Result<()> {
        let driver = self.driver.as_mut().context("the driver is not running")?;
        driver.wait_for_socket(&self.socket, limit)
    }

    /// SIGKILL: no shutdown code runs, as in a crash of the process.
    pub fn kill_driver(&mut self) {
        let mut driver = self.driver.take().expect("the driver is not running");
        driver.kill();
    }

    /// SIGTERM, a bounded wait, then SIGKILL; how it ended.
    pub fn stop_driver(&mut self) -> Option<ExitStatus> {
        self.driver.take()?.stop()
    }

    pub async fn stage_publish(
        &self,
        csi: &mut Csi,
        volume_id: &str,
        access: Access,
        tag: &str,
    ) -> Mounted {
        csi.stage_publish(&self.mnt, volume_id, access, tag).await
    }

    pub async fn unpublish_unstage(&self, csi: &mut Csi, mounted: &Mounted) {
        csi.unpublish_unstage(mounted).await;
    }

    /// After every volume and snapshot was deleted: no device, loop, pool
    /// file or mount of ours.
    pub fn assert_nothing_left(&self) {
        assert_nothing_left(&self.dm_before, &self.pool, &self.mnt);
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail_of(&self.log, lines)
    }

    /// What a failure report needs besides the log.
    pub fn kernel_state(&self) -> String {
        kernel_state(&self.pool, &self.root)
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if !failed && std::env::var_os(self.show_log_env).is_some_and(|v| v == "1") {
            say(&format!(
                "[{}] --- the driver's log ({}=1) ---\n{}\n--- end of the driver's log ---",
                self.label,
                self.show_log_env,
                self.log_tail(usize::MAX)
            ));
        }
        if failed {
            say(&format!(
                "[{}] FAILED after {:.1} s; kernel state:\n{}\n--- last {LOG_TAIL} lines of the \
                 driver's log ({}) ---\n{}\n--- end of the driver's log ---",
                self.label,
                self.started.elapsed().as_secs_f64(),
                self.kernel_state(),
                self.log.display(),
                self.log_tail(LOG_TAIL)
            ));
        }
        self.stop_driver();
        unmount_all_under(&self.mnt);
        unmount_all_under(&self.state);
        for name in dm_devices().difference(&self.dm_before) {
            let removed = Command::new("dmsetup")
                .args(["remove", "--retry", name])
                .output();
            if !removed.is_ok_and(|o| o.status.success()) {
                let forced = Command::new("dmsetup")
                    .args(["remove", "--force", "--retry", name])
                    .output();
                if !forced.is_ok_and(|o| o.status.success()) {
                    say(&format!("cleanup: could not remove device {name}"));
                }
            }
        }
        for device in pool_loops(&self.pool).keys() {
            let detached = Command::new("losetup").args(["-d", device]).output();
            if !detached.is_ok_and(|o| o.status.success()) {
                say(&format!("cleanup: could not detach {device}"));
            }
        }
        drop(self.image.take());
        if let Some(dir) = self.dir.take() {
            // Never delete recursively through something still mounted.
            if mounts_under(&self.root).is_empty() {
                drop(dir);
            } else {
                let kept = dir.keep();
                say(&format!(
                    "cleanup: left {} in place: something below it is still mounted",
                    kept.display()
                ));
            }
        }
    }
}
