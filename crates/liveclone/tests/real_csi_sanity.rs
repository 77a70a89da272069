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

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    all_dm_devices, mounts_under, pool_loops, require_real_kernel, say, Bench, Pool, INFO_LOG, MIB,
};

/// Size of every volume csi-sanity creates: small, because each one gets a
/// file system made under QEMU's software CPU.
const VOLUME_SIZE: u64 = 64 * MIB;
/// What the expansion specs grow a volume to.
const EXPANDED_SIZE: u64 = 128 * MIB;
/// The xfs image holding the pool in the second run (sparse). The largest
/// number of volumes alive at once is in the ListSnapshots pagination spec:
/// five volumes and five snapshots.
const XFS_IMAGE_BYTES: u64 = 4 << 30;
/// How long the driver may take to create its socket.
const SOCKET_WAIT: Duration = Duration::from_secs(60);
/// Default limit for one csi-sanity run (`LIVECLONE_CSI_SANITY_TIMEOUT`, in
/// seconds, overrides it). csi-sanity stops itself at this limit and reports
/// the spec it was in; the process is killed if it is still there
/// [`KILL_MARGIN`] later.
const DEFAULT_SANITY_LIMIT: Duration = Duration::from_secs(600);
/// Ginkgo's own grace period after its timeout is 30 s; then some slack.
const KILL_MARGIN: Duration = Duration::from_secs(60);

const CSI_SANITY_ENV: &str = "LIVECLONE_CSI_SANITY";
const TOOLS_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/tools/build-go-tools.sh"
);

#[test]
fn real_csi_sanity_with_the_pool_on_ext4() {
    require_real_kernel();
    run_sanity(Pool::Ext4);
}

#[test]
fn real_csi_sanity_with_the_pool_on_xfs() {
    require_real_kernel();
    run_sanity(Pool::Xfs(XFS_IMAGE_BYTES));
}

fn run_sanity(pool: Pool) {
    let sanity = csi_sanity_binary();
    let limit = sanity_limit();

    // The bench stops the driver and removes whatever is left (mounts,
    // devices, loops, the xfs pool, the work folder) when dropped, and on a
    // failure prints the end of the driver's log. csi-sanity makes hundreds
    // of calls: info lines are enough.
    let mut bench = Bench::new(&format!("sanity-{}", pool.name()), pool).with_rust_log(INFO_LOG);
    let dm_before = all_dm_devices();
    bench
        .spawn_driver(&[])
        .unwrap_or_else(|e| panic!("starting the driver: {e:#}"));
    bench
        .wait_for_socket(SOCKET_WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"));

    // csi-sanity makes these two folders itself before every spec (and fails
    // if they exist), and removes them after.
    let mut args = vec![
        format!("--csi.endpoint={}", bench.endpoint),
        format!("--csi.mountdir={}", bench.mnt.join("target").display()),
        format!("--csi.stagingdir={}", bench.mnt.join("staging").display()),
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
    let label = format!("csi-sanity {}", pool.name());
    say(&format!("{label}: {} {}", sanity.display(), args.join(" ")));
    let run = run_streamed(&label, &sanity, &args, &bench.root, limit + KILL_MARGIN);

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
        panic!("{label} {why}: {}", summary.join("; "));
    }

    // Every volume and snapshot csi-sanity made has been deleted by now, so
    // nothing of them may be left in the kernel.
    let leftover_mounts = mounts_under(&bench.mnt);
    assert!(
        leftover_mounts.is_empty(),
        "mounts left under {} after csi-sanity: {leftover_mounts:?}",
        bench.mnt.display()
    );
    let dm_new: Vec<String> = all_dm_devices().difference(&dm_before).cloned().collect();
    assert!(
        dm_new.is_empty(),
        "device-mapper devices left after every volume was deleted: {dm_new:?}"
    );
    let loops = pool_loops(&bench.pool);
    assert!(
        loops.is_empty(),
        "loop devices still backed by files in the pool after every volume was deleted: {loops:?}"
    );

    match bench.stop_driver() {
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

#[cfg(test)]
mod tests {
    use super::*;
    // Tested here rather than in `common`, which every test binary compiles.
    use common::unescape_mount_path;

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
