#![cfg(feature = "real-kernel")]
//! csi-sanity, the CSI community's conformance suite, against `liveclone
//! standalone` on the VM's real kernel: once with the file pool on ext4 and
//! once on xfs. Built only with `--features real-kernel`; run by `make
//! test-vm` inside the VM, as root.
//!
//! csi-sanity comes from `tests/tools/build-go-tools.sh` (`make tools`).
//! The VM sees the host's root read-only at the same paths, so the test looks
//! for the binary where that script put it on the host (see
//! [`csi_sanity_binary`]), unless `LIVECLONE_CSI_SANITY` names it.
//!
//! No csi-sanity spec is skipped or focused: what the driver does not
//! advertise, csi-sanity skips by itself (snapshots without
//! CREATE_DELETE_SNAPSHOT, ControllerPublish without PUBLISH_UNPUBLISH_VOLUME,
//! and so on), and the attach-limit spec stays off because it needs
//! `--csi.testnodevolumeattachlimit`.
//!
//! While the driver is being written, `LIVECLONE_CSI_SANITY_ARGS` adds
//! arguments to both runs (split at whitespace), e.g.
//! `--ginkgo.focus=Identity` or `--ginkgo.fail-fast`; pass it to the VM with
//! `vmtest test --env`. `LIVECLONE_CSI_SANITY_TIMEOUT` (seconds) changes the
//! time limit of each run.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::statfs::{statfs, FsType, EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC};
use nix::unistd::Pid;

const MIB: u64 = 1 << 20;
/// Size of every volume csi-sanity creates: small, because each one gets a
/// file system made under QEMU's software CPU.
const VOLUME_SIZE: u64 = 64 * MIB;
/// What the expansion specs grow a volume to.
const EXPANDED_SIZE: u64 = 128 * MIB;
/// The xfs image holding the pool in the second run (sparse). The largest
/// number of volumes alive at once is in the ListSnapshots pagination spec:
/// five volumes and five snapshots.
const XFS_IMAGE_BYTES: u64 = 4 << 30;
const NODE_ID: &str = "csi-sanity-node";
/// How long the driver may take to create its socket.
const SOCKET_WAIT: Duration = Duration::from_secs(60);
/// Default limit for one csi-sanity run (`LIVECLONE_CSI_SANITY_TIMEOUT`, in
/// seconds, overrides it). csi-sanity stops itself at this limit and reports
/// the spec it was in; the process is killed if it is still there
/// [`KILL_MARGIN`] later.
const DEFAULT_SANITY_LIMIT: Duration = Duration::from_secs(600);
/// Ginkgo's own grace period after its timeout is 30 s; then some slack.
const KILL_MARGIN: Duration = Duration::from_secs(60);
/// How long the driver may take to exit after SIGTERM before it is killed.
const DRIVER_STOP_WAIT: Duration = Duration::from_secs(20);
/// Lines of the driver's log printed when a run fails.
const DRIVER_LOG_TAIL: usize = 200;

const CSI_SANITY_ENV: &str = "LIVECLONE_CSI_SANITY";
const TOOLS_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/tools/build-go-tools.sh"
);

#[test]
fn real_csi_sanity_with_the_pool_on_ext4() {
    require_real_kernel();
    run_sanity(PoolFs::Ext4);
}

#[test]
fn real_csi_sanity_with_the_pool_on_xfs() {
    require_real_kernel();
    run_sanity(PoolFs::Xfs);
}

/// The same check as the bench's smoke tests: these tests create devices and
/// mounts, so they run in the VM, or on a host only when asked to.
fn require_real_kernel() {
    let in_vm = std::env::var_os("LIVECLONE_IN_VM").is_some_and(|v| v == "1");
    let on_host = std::env::var_os("LIVECLONE_TEST_ON_HOST").is_some_and(|v| v == "1");
    assert!(
        in_vm || on_host,
        "real-kernel tests run in the test VM (`make test-vm`), or on a host with dm-clone \
         when LIVECLONE_TEST_ON_HOST=1"
    );
}

#[derive(Clone, Copy, Debug)]
enum PoolFs {
    /// The pool in the scratch disk's own ext4 (the VM's TMPDIR).
    Ext4,
    /// The pool on a fresh xfs in a loop-mounted image file.
    Xfs,
}

impl PoolFs {
    fn name(self) -> &'static str {
        match self {
            PoolFs::Ext4 => "ext4",
            PoolFs::Xfs => "xfs",
        }
    }

    fn magic(self) -> FsType {
        match self {
            PoolFs::Ext4 => EXT4_SUPER_MAGIC,
            PoolFs::Xfs => XFS_SUPER_MAGIC,
        }
    }
}

fn run_sanity(fs: PoolFs) {
    let sanity = csi_sanity_binary();
    let limit = sanity_limit();

    // Declared in this order so that they drop in the reverse one: the driver
    // stops first, then whatever is left mounted below the mount root goes,
    // then the xfs pool, then the work folder.
    let work = WorkDir::new(fs);
    let root = work.path().to_owned();
    let mount_root = root.join("mounts");
    std::fs::create_dir(&mount_root).expect("creating the mount root");
    let state_dir = root.join("state");
    std::fs::create_dir(&state_dir).expect("creating the state folder");
    let xfs = match fs {
        PoolFs::Ext4 => None,
        PoolFs::Xfs => Some(XfsMount::new(&root.join("pool.xfs"), &root.join("xfs"))),
    };
    let pool_dir = match &xfs {
        None => root.join("pool"),
        Some(xfs) => xfs.mount_point.join("pool"),
    };
    std::fs::create_dir(&pool_dir).expect("creating the pool folder");
    let pool_fs = statfs(&pool_dir)
        .expect("statfs of the pool folder")
        .filesystem_type();
    assert!(
        pool_fs == fs.magic(),
        "the pool folder {} is not on {} ({pool_fs:?})",
        pool_dir.display(),
        fs.name()
    );
    let _mounts = UnmountOnDrop(mount_root.clone());

    let dm_before = dm_device_names();
    let socket = root.join("csi.sock");
    let endpoint = format!("unix://{}", socket.display());
    let mut driver = Driver::start(
        &[
            "standalone".as_ref(),
            "--endpoint".as_ref(),
            endpoint.as_ref(),
            "--state-dir".as_ref(),
            state_dir.as_os_str(),
            "--pool-dir".as_ref(),
            pool_dir.as_os_str(),
            "--node-id".as_ref(),
            NODE_ID.as_ref(),
            "--allowed-mount-root".as_ref(),
            mount_root.as_os_str(),
        ],
        &root.join("driver.log"),
    );
    driver.wait_for_socket(&socket, SOCKET_WAIT);

    // csi-sanity makes these two folders itself before every spec (and fails
    // if they exist), and removes them after.
    let mut args = vec![
        format!("--csi.endpoint={endpoint}"),
        format!("--csi.mountdir={}", mount_root.join("target").display()),
        format!("--csi.stagingdir={}", mount_root.join("staging").display()),
        format!("--csi.testvolumesize={VOLUME_SIZE}"),
        format!("--csi.testvolumeexpandsize={EXPANDED_SIZE}"),
        format!("--ginkgo.timeout={}s", limit.as_secs()),
        // A spec still running after this gets a progress report (its
        // current step and goroutines) every 10 s: what a TCG hang needs.
        "--ginkgo.poll-progress-after=120s".to_owned(),
        "--ginkgo.v".to_owned(),
        "--ginkgo.no-color".to_owned(),
    ];
    if let Ok(extra) = std::env::var("LIVECLONE_CSI_SANITY_ARGS") {
        args.extend(extra.split_whitespace().map(str::to_owned));
    }
    let label = format!("csi-sanity {}", fs.name());
    say(&format!("{label}: {} {}", sanity.display(), args.join(" ")));
    let run = run_streamed(&label, &sanity, &args, &root, limit + KILL_MARGIN);

    let summary = summary_of(&run.lines);
    say(&format!(
        "{label}: {} ({:.0} s wall)",
        if summary.is_empty() {
            "no summary line from csi-sanity".to_owned()
        } else {
            summary.join("; ")
        },
        run.elapsed.as_secs_f64()
    ));
    if run.timed_out || !run.status.is_some_and(|status| status.success()) {
        let why = match (run.timed_out, run.status) {
            (true, _) => format!("was killed after {:?}", limit + KILL_MARGIN),
            (false, Some(status)) => format!("failed ({status})"),
            (false, None) => "ended with no exit status".to_owned(),
        };
        let log = driver.log_tail(DRIVER_LOG_TAIL);
        panic!(
            "{label} {why}: {}\n--- last {DRIVER_LOG_TAIL} lines of the driver's log ---\n{log}",
            summary.join("; ")
        );
    }

    // Every volume and snapshot csi-sanity made has been deleted by now, so
    // nothing of them may be left in the kernel.
    let leftover_mounts = mounts_under(&mount_root);
    assert!(
        leftover_mounts.is_empty(),
        "mounts left under {} after csi-sanity: {leftover_mounts:?}",
        mount_root.display()
    );
    let dm_new: Vec<String> = dm_device_names().difference(&dm_before).cloned().collect();
    assert!(
        dm_new.is_empty(),
        "device-mapper devices left after every volume was deleted: {dm_new:?}"
    );
    let loops = loop_devices_backed_under(&pool_dir);
    assert!(
        loops.is_empty(),
        "loop devices still backed by files in the pool after every volume was deleted: {loops:?}"
    );

    match driver.stop() {
        Some(status) => say(&format!("{label}: driver stopped ({status})")),
        None => say(&format!("{label}: driver stopped (no exit status)")),
    }
}

/// `LIVECLONE_CSI_SANITY` if set; else where `tests/tools/build-go-tools.sh`
/// caches the pinned version. The VM's environment is not the host's (its
/// HOME is /root), so the cache roots are tried as this process sees them
/// and as the environment of the build that compiled this test saw them: that
/// build ran on the host, next to the script.
fn csi_sanity_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(CSI_SANITY_ENV) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{CSI_SANITY_ENV}={} is not a file",
            path.display()
        );
        return path;
    }
    let version = pinned_version("csi-sanity");
    let runtime = |name: &str| std::env::var(name).ok();
    let roots = [
        tools_cache_root(
            runtime("LIVECLONE_TOOLS_CACHE"),
            runtime("XDG_CACHE_HOME"),
            runtime("HOME"),
        ),
        tools_cache_root(
            option_env!("LIVECLONE_TOOLS_CACHE").map(str::to_owned),
            option_env!("XDG_CACHE_HOME").map(str::to_owned),
            option_env!("HOME").map(str::to_owned),
        ),
    ];
    let candidates: Vec<PathBuf> = roots
        .iter()
        .map(|root| root.join(format!("csi-sanity-{version}/csi-sanity")))
        .collect();
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "csi-sanity {version} not found at {candidates:?}: run `make tools` \
                 (tests/tools/build-go-tools.sh) on the host, or set {CSI_SANITY_ENV}"
            )
        })
}

/// The script's cache root, resolved the same way it does.
fn tools_cache_root(
    explicit: Option<String>,
    xdg_cache: Option<String>,
    home: Option<String>,
) -> PathBuf {
    let non_empty = |value: Option<String>| value.filter(|v| !v.is_empty());
    if let Some(root) = non_empty(explicit) {
        return PathBuf::from(root);
    }
    let cache = non_empty(xdg_cache)
        .map(PathBuf::from)
        .or_else(|| non_empty(home).map(|home| Path::new(&home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    cache.join("liveclone/tools")
}

/// The version the script pins for `tool`, read from its TOOLS table so that
/// the pin lives in one place.
fn pinned_version(tool: &str) -> String {
    let script = std::fs::read_to_string(TOOLS_SCRIPT)
        .unwrap_or_else(|e| panic!("reading {TOOLS_SCRIPT}: {e}"));
    script
        .lines()
        .filter_map(|line| line.trim().strip_prefix('"'))
        .find_map(|entry| {
            let mut fields = entry.split_whitespace();
            (fields.next() == Some(tool))
                .then(|| fields.next().map(str::to_owned))
                .flatten()
        })
        .unwrap_or_else(|| panic!("no TOOLS line for {tool} in {TOOLS_SCRIPT}"))
}

fn sanity_limit() -> Duration {
    match std::env::var("LIVECLONE_CSI_SANITY_TIMEOUT") {
        Ok(secs) => Duration::from_secs(
            secs.parse()
                .unwrap_or_else(|_| panic!("LIVECLONE_CSI_SANITY_TIMEOUT={secs:?} is not seconds")),
        ),
        Err(_) => DEFAULT_SANITY_LIMIT,
    }
}

/// Writes a line straight to the process's stdout, past the test harness's
/// capture, so that it shows in the VM console whether the test passes or not.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Ginkgo's closing lines: `Ran N of M Specs in S seconds` and
/// `SUCCESS! -- ...` or `FAIL! -- ...`.
fn summary_of(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|line| line.trim())
        .filter(|line| {
            (line.starts_with("Ran ") && line.contains(" Specs in "))
                || line.starts_with("SUCCESS!")
                || line.starts_with("FAIL!")
        })
        .map(str::to_owned)
        .collect()
}

/// The folder for one run, below TMPDIR (the VM's ext4 scratch disk).
struct WorkDir {
    root: PathBuf,
    /// Taken in `drop`, which decides whether to delete it.
    dir: Option<tempfile::TempDir>,
}

impl WorkDir {
    fn new(fs: PoolFs) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("lcsanity-{}-", fs.name()))
            .tempdir()
            .expect("creating the work folder under TMPDIR");
        Self {
            root: dir.path().to_owned(),
            dir: Some(dir),
        }
    }

    fn path(&self) -> &Path {
        &self.root
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        // Never delete recursively through something still mounted.
        unmount_all_under(dir.path());
        if mounts_under(dir.path()).is_empty() {
            drop(dir);
        } else {
            let kept = dir.keep();
            say(&format!(
                "left {} in place: something below it is still mounted",
                kept.display()
            ));
        }
    }
}

/// Unmounts everything below a folder when dropped: what a failed run left
/// staged or published.
struct UnmountOnDrop(PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        unmount_all_under(&self.0);
    }
}

/// An xfs file system in an image file, attached to a loop device and
/// mounted; unmounted and detached when dropped.
struct XfsMount {
    loop_device: PathBuf,
    mount_point: PathBuf,
}

impl XfsMount {
    fn new(image: &Path, mount_point: &Path) -> Self {
        File::create(image)
            .and_then(|file| file.set_len(XFS_IMAGE_BYTES))
            .unwrap_or_else(|e| panic!("creating {}: {e}", image.display()));
        let device = run(
            "losetup",
            &["--find".as_ref(), "--show".as_ref(), image.as_os_str()],
        );
        let loop_device = PathBuf::from(device.trim());
        // From here on, Drop undoes whatever was done.
        let xfs = Self {
            loop_device,
            mount_point: mount_point.to_owned(),
        };
        run(
            "mkfs.xfs",
            &["-q".as_ref(), "-f".as_ref(), xfs.loop_device.as_os_str()],
        );
        std::fs::create_dir(mount_point)
            .unwrap_or_else(|e| panic!("creating {}: {e}", mount_point.display()));
        run(
            "mount",
            &[
                "-t".as_ref(),
                "xfs".as_ref(),
                xfs.loop_device.as_os_str(),
                mount_point.as_os_str(),
            ],
        );
        xfs
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        unmount_all_under(&self.mount_point);
        let detached = Command::new("losetup")
            .arg("-d")
            .arg(&self.loop_device)
            .output();
        if !detached.is_ok_and(|output| output.status.success()) {
            say(&format!("could not detach {}", self.loop_device.display()));
        }
    }
}

/// The driver process; stopped (SIGTERM, then SIGKILL) when dropped.
struct Driver {
    child: Option<Child>,
    log: PathBuf,
}

impl Driver {
    fn start(args: &[&std::ffi::OsStr], log: &Path) -> Self {
        let out = File::create(log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = out.try_clone().expect("duplicating the log file handle");
        let mut command = Command::new(env!("CARGO_BIN_EXE_liveclone"));
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", env!("CARGO_BIN_EXE_liveclone")));
        Self {
            child: Some(child),
            log: log.to_owned(),
        }
    }

    /// Waits until the socket accepts a connection, failing early if the
    /// driver exits.
    fn wait_for_socket(&mut self, socket: &Path, limit: Duration) {
        let start = Instant::now();
        loop {
            let is_socket =
                std::fs::symlink_metadata(socket).is_ok_and(|meta| meta.file_type().is_socket());
            if is_socket && UnixStream::connect(socket).is_ok() {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "the driver exited ({status}) before creating {}:\n{}",
                        socket.display(),
                        self.log_tail(DRIVER_LOG_TAIL)
                    );
                }
            }
            assert!(
                start.elapsed() < limit,
                "the driver did not listen on {} within {limit:?}:\n{}",
                socket.display(),
                self.log_tail(DRIVER_LOG_TAIL)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, a bounded wait, then SIGKILL. Returns how it ended.
    fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < DRIVER_STOP_WAIT {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        say(&format!(
            "the driver did not exit within {DRIVER_STOP_WAIT:?} of SIGTERM; killing it"
        ));
        let _ = child.kill();
        child.wait().ok()
    }

    fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Err(e) = File::open(&self.log).and_then(|mut f| f.read_to_string(&mut text)) {
            return format!("(cannot read {}: {e})", self.log.display());
        }
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop();
    }
}

struct StreamedRun {
    status: Option<ExitStatus>,
    timed_out: bool,
    elapsed: Duration,
    lines: Vec<String>,
}

/// Runs a program with its output copied line by line to the console (with
/// a label, as it comes, so a long run shows progress) and kept for the
/// summary; kills it at `limit`.
fn run_streamed(
    label: &str,
    program: &Path,
    args: &[String],
    cwd: &Path,
    limit: Duration,
) -> StreamedRun {
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut readers: Vec<JoinHandle<()>> = Vec::new();
    let stdout = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn Read + Send>);
    let stderr = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn Read + Send>);
    for stream in [stdout, stderr].into_iter().flatten() {
        let lines = Arc::clone(&lines);
        let label = label.to_owned();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                say(&format!("[{label}] {line}"));
                if let Ok(mut lines) = lines.lock() {
                    lines.push(line);
                }
            }
        }));
    }

    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() >= limit => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("waiting for {}: {e}", program.display()),
        }
    };
    for reader in readers {
        let _ = reader.join();
    }
    let lines = std::mem::take(&mut *lines.lock().expect("output lines lock poisoned"));
    StreamedRun {
        status,
        timed_out,
        elapsed: start.elapsed(),
        lines,
    }
}

fn run(program: &str, args: &[&std::ffi::OsStr]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Mount points at or below `root`, deepest first, from this process's
/// mount table.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
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
fn unescape_mount_path(field: &str) -> String {
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

/// Best effort, for cleanup: unmount every mount point below `root`, deepest
/// first; a busy one is detached lazily.
fn unmount_all_under(root: &Path) {
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

/// Names of the device-mapper devices that exist now.
fn dm_device_names() -> BTreeSet<String> {
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

/// Loop devices whose backing file is below `dir`, as `losetup` lists them.
fn loop_devices_backed_under(dir: &Path) -> Vec<String> {
    let listing = run(
        "losetup",
        &[
            "--list".as_ref(),
            "--noheadings".as_ref(),
            "--output".as_ref(),
            "NAME,BACK-FILE".as_ref(),
        ],
    );
    listing
        .lines()
        .filter(|line| {
            line.split_whitespace()
                .nth(1)
                .is_some_and(|file| Path::new(file).starts_with(dir))
        })
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_cache_root_follows_the_scripts_order() {
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(
            tools_cache_root(s("/x"), s("/xdg"), s("/home/u")),
            PathBuf::from("/x")
        );
        assert_eq!(
            tools_cache_root(None, s("/xdg"), s("/home/u")),
            PathBuf::from("/xdg/liveclone/tools")
        );
        assert_eq!(
            tools_cache_root(None, s(""), s("/home/u")),
            PathBuf::from("/home/u/.cache/liveclone/tools")
        );
        assert_eq!(
            tools_cache_root(None, None, None),
            PathBuf::from("/var/cache/liveclone/tools")
        );
    }

    #[test]
    fn the_script_pins_a_csi_sanity_version() {
        assert!(pinned_version("csi-sanity").starts_with("v5."));
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mount_path(r"/plain\04"), r"/plain\04");
    }

    #[test]
    fn summary_keeps_ginkgos_closing_lines() {
        let lines: Vec<String> = [
            "Ran 70 of 103 Specs in 95.314 seconds",
            "other",
            "SUCCESS! -- 70 Passed | 0 Failed | 1 Pending | 32 Skipped",
        ]
        .map(str::to_owned)
        .to_vec();
        assert_eq!(summary_of(&lines).len(), 2);
    }
}
