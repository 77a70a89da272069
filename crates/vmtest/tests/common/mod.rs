//! Helpers for the bench's smoke tests, which talk to the kernel directly
//! through `losetup` and `dmsetup` (the driver's own device-mapper layer is
//! not what these tests prove).
//!
//! Every device they make carries the `lctest-` prefix so a leak is easy to
//! spot, and is removed on drop.
#![allow(dead_code)] // each test binary uses a different subset

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const BLOCK: usize = 4096;
pub const SECTOR: u64 = 512;
pub const DEVICE_PREFIX: &str = "lctest-";

/// Fails loudly when a real-kernel test is started outside the VM without the
/// explicit host opt-in: these tests create devices.
pub fn require_real_kernel() {
    let in_vm = std::env::var_os("LIVECLONE_IN_VM").is_some_and(|v| v == "1");
    let on_host = std::env::var_os("LIVECLONE_TEST_ON_HOST").is_some_and(|v| v == "1");
    assert!(
        in_vm || on_host,
        "real-kernel tests run in the test VM (`make test-vm`), or on a host with dm-clone \
         when LIVECLONE_TEST_ON_HOST=1"
    );
}

pub fn run(program: &str, args: &[&str]) -> String {
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

/// A sparse file attached as a loop device with direct I/O.
pub struct LoopDevice {
    pub path: PathBuf,
    pub file: PathBuf,
}

impl LoopDevice {
    pub fn new(name: &str, bytes: u64) -> Self {
        let dir = std::env::temp_dir();
        let file = dir.join(format!("{DEVICE_PREFIX}{name}-{}.img", std::process::id()));
        File::create(&file)
            .and_then(|f| f.set_len(bytes))
            .unwrap_or_else(|e| panic!("creating {}: {e}", file.display()));
        let path = run(
            "losetup",
            &["--find", "--show", "--direct-io=on", path_str(&file)],
        );
        Self {
            path: PathBuf::from(path.trim()),
            file,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .args(["-d", path_str(&self.path)])
            .status();
        let _ = std::fs::remove_file(&self.file);
    }
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// A device-mapper device, removed on drop.
pub struct DmDevice {
    pub name: String,
}

impl DmDevice {
    pub fn create(name: &str, table: &str) -> Self {
        let name = format!("{DEVICE_PREFIX}{name}");
        run("dmsetup", &["create", &name, "--table", table]);
        Self { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/dev/mapper").join(&self.name)
    }

    pub fn message(&self, message: &str) {
        let args: Vec<&str> = ["message", self.name.as_str(), "0"]
            .into_iter()
            .chain(message.split_whitespace())
            .collect();
        run("dmsetup", &args);
    }

    /// Status without flushing: reading dm-clone's status otherwise commits
    /// its metadata and flushes the destination.
    pub fn clone_status(&self) -> CloneStatus {
        let line = run("dmsetup", &["status", "--noflush", &self.name]);
        CloneStatus::parse(line.lines().next().unwrap_or_default())
    }

    /// Status with a metadata commit: everything hydrated so far is durable.
    pub fn clone_status_committed(&self) -> CloneStatus {
        let line = run("dmsetup", &["status", &self.name]);
        CloneStatus::parse(line.lines().next().unwrap_or_default())
    }

    pub fn table(&self) -> String {
        run("dmsetup", &["table", &self.name])
    }

    /// Suspend, load `table`, resume: the switch the driver does at the end
    /// of hydration.
    pub fn replace_table(&self, table: &str) {
        run("dmsetup", &["suspend", &self.name]);
        run("dmsetup", &["load", &self.name, "--table", table]);
        run("dmsetup", &["resume", &self.name]);
    }

    pub fn wait_hydrated(&self, limit: Duration) -> CloneStatus {
        let start = Instant::now();
        loop {
            let status = self.clone_status();
            assert_eq!(status.mode, "rw", "clone left read-write mode: {status:?}");
            if status.hydrated == status.total_regions && status.hydrating == 0 {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "hydration did not finish within {limit:?}: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for DmDevice {
    fn drop(&mut self) {
        let _ = Command::new("dmsetup")
            .args(["remove", "--retry", &self.name])
            .output();
    }
}

/// The fields of a dm-clone status line that the smoke tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneStatus {
    pub region_sectors: u64,
    pub hydrated: u64,
    pub total_regions: u64,
    pub hydrating: u64,
    pub mode: String,
}

impl CloneStatus {
    /// Parses `dmsetup status` output: `<start> <len> clone <meta block
    /// sectors> <used>/<total> <region sectors> <hydrated>/<total> <hydrating>
    /// <#features> ... <#core args> ... rw|ro`.
    pub fn parse(line: &str) -> Self {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(
            fields.len() >= 9 && fields[2] == "clone",
            "not a clone status: {line:?}"
        );
        let num = |s: &str| -> u64 {
            s.parse()
                .unwrap_or_else(|_| panic!("bad number {s:?} in {line:?}"))
        };
        let (hydrated, total) = fields[6]
            .split_once('/')
            .unwrap_or_else(|| panic!("bad region count in {line:?}"));
        Self {
            region_sectors: num(fields[5]),
            hydrated: num(hydrated),
            total_regions: num(total),
            hydrating: num(fields[7]),
            mode: fields.last().copied().unwrap_or_default().to_owned(),
        }
    }
}

/// Deterministic block contents: block `index` of pattern `seed`. Any two
/// (seed, index) pairs give different blocks, so a block read from the wrong
/// place or the wrong generation is caught.
pub fn pattern_block(seed: u64, index: u64) -> Vec<u8> {
    let mut block = Vec::with_capacity(BLOCK);
    let mut state = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(index.wrapping_mul(0xD1B5_4A32_D192_ED03));
    while block.len() < BLOCK {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        block.extend_from_slice(&z.to_le_bytes());
    }
    block
}

/// A page-aligned buffer, as O_DIRECT requires.
pub struct AlignedBlock {
    storage: Vec<u8>,
    offset: usize,
}

impl AlignedBlock {
    pub fn new() -> Self {
        let storage = vec![0u8; BLOCK * 2];
        let offset = storage.as_ptr().align_offset(BLOCK);
        Self { storage, offset }
    }

    pub fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + BLOCK]
    }

    pub fn as_ref(&self) -> &[u8] {
        &self.storage[self.offset..self.offset + BLOCK]
    }
}

pub fn open_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(path)
        .unwrap_or_else(|e| panic!("opening {} with O_DIRECT: {e}", path.display()))
}

pub fn write_block_direct(file: &File, index: u64, data: &[u8]) {
    let mut buf = AlignedBlock::new();
    buf.as_mut().copy_from_slice(data);
    file.write_all_at(buf.as_ref(), index * BLOCK as u64)
        .unwrap_or_else(|e| panic!("O_DIRECT write of block {index}: {e}"));
}

pub fn read_block_direct(file: &File, index: u64) -> Vec<u8> {
    let mut buf = AlignedBlock::new();
    file.read_exact_at(buf.as_mut(), index * BLOCK as u64)
        .unwrap_or_else(|e| panic!("O_DIRECT read of block {index}: {e}"));
    buf.as_ref().to_vec()
}

/// Fills blocks `[0, blocks)` of a device with a pattern (buffered, then
/// fsync).
pub fn fill_with_pattern(path: &Path, seed: u64, blocks: u64) {
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut chunk = Vec::with_capacity(BLOCK * 256);
    for index in 0..blocks {
        chunk.extend_from_slice(&pattern_block(seed, index));
        if chunk.len() == chunk.capacity() || index + 1 == blocks {
            file.write_all(&chunk).expect("pattern write");
            chunk.clear();
        }
    }
    file.sync_all().expect("fsync after pattern fill");
}

/// Compares every block of `path` (bypassing the page cache) against what
/// `expected(index)` says it must hold, and returns the SHA-256 of the whole.
pub fn verify_blocks(path: &Path, blocks: u64, expected: impl Fn(u64) -> Vec<u8>) -> String {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = AlignedBlock::new();
    for index in 0..blocks {
        file.read_exact_at(buf.as_mut(), index * BLOCK as u64)
            .unwrap_or_else(|e| panic!("reading block {index} of {}: {e}", path.display()));
        let want = expected(index);
        if buf.as_ref() != want.as_slice() {
            panic!(
                "block {index} of {} differs from what was expected \
                 (sha256 got {}, want {})",
                path.display(),
                sha256_hex(buf.as_ref()),
                sha256_hex(&want)
            );
        }
        hasher.update(buf.as_ref());
    }
    hex(&hasher.finalize())
}

/// SHA-256 of what `expected` describes, for printing next to a device's.
pub fn expected_sha256(blocks: u64, expected: impl Fn(u64) -> Vec<u8>) -> String {
    let mut hasher = Sha256::new();
    for index in 0..blocks {
        hasher.update(expected(index));
    }
    hex(&hasher.finalize())
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn device_bytes(path: &Path) -> u64 {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    file.seek(SeekFrom::End(0)).expect("seek to end")
}

pub fn read_all(path: &Path) -> Vec<u8> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    data
}

/// `dm-clone` table line: `clone <meta> <dest> <source> <region sectors> [features]`.
pub fn clone_table(
    sectors: u64,
    meta: &Path,
    dest: &Path,
    source: &Path,
    region_sectors: u64,
    features: &[&str],
) -> String {
    let mut table = format!(
        "0 {sectors} clone {} {} {} {region_sectors}",
        meta.display(),
        dest.display(),
        source.display()
    );
    if !features.is_empty() {
        table.push_str(&format!(" {} {}", features.len(), features.join(" ")));
    }
    table
}
