//! Zeroing a whole (small) block device: clone metadata LVs are zeroed
//! over their full length when they are created.
//!
//! Plain zero writes rather than BLKZEROOUT: the ioctl may be served by
//! WRITE_ZEROES or by unmapping, and on a thin LV either can leave the
//! blocks unprovisioned; writing them provisions every block at creation,
//! so a clone's metadata writes never need new space from a pool that may
//! be full by then. Metadata LVs are a few MiB, so the writes are cheap.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::os::error::{OsError, OsErrorKind, OsResult};

/// Bytes per write; a multiple of every logical block size.
const CHUNK: usize = 1 << 20;
/// O_DIRECT needs the buffer aligned to the logical block size (at most
/// 4 KiB).
const ALIGN: usize = 4096;

/// Writes zeros over all of the block device at `path` with O_DIRECT
/// (nothing stays in the page cache, where a later reader through another
/// device could miss it), then flushes the device. Returns the bytes
/// zeroed. The device is opened with `O_EXCL`, which for a block device
/// refuses it while something else holds it exclusively (a mount, a
/// device-mapper table): a device in use is never zeroed.
pub fn zero_block_device(path: &Path) -> OsResult<u64> {
    let operation = || format!("zeroing {}", path.display());
    let mut device = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT | nix::libc::O_EXCL | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| OsError::io(operation(), path, &e))?;
    let metadata = device
        .metadata()
        .map_err(|e| OsError::io(operation(), path, &e))?;
    if !metadata.file_type().is_block_device() {
        return Err(OsError::new(
            OsErrorKind::Failed,
            operation(),
            "not a block device; refusing to write to it",
        ));
    }
    let size = device
        .seek(SeekFrom::End(0))
        .map_err(|e| OsError::io(operation(), path, &e))?;
    write_zeros(&device, size).map_err(|e| OsError::io(operation(), path, &e))?;
    device
        .sync_all()
        .map_err(|e| OsError::io(operation(), path, &e))?;
    Ok(size)
}

fn write_zeros(device: &File, size: u64) -> std::io::Result<()> {
    // An aligned window into a slightly larger zeroed buffer: safe code,
    // no custom allocation.
    let buffer = vec![0u8; CHUNK + ALIGN];
    let start = buffer.as_ptr().align_offset(ALIGN);
    let zeros = buffer
        .get(start..start + CHUNK)
        .ok_or_else(|| std::io::Error::other("cannot align the zero buffer for O_DIRECT"))?;
    let chunk = CHUNK as u64;
    let mut offset = 0u64;
    while offset < size {
        let length = usize::try_from(chunk.min(size - offset)).unwrap_or(CHUNK);
        // A block device's size is a multiple of its logical block size,
        // so the last piece stays aligned.
        device.write_all_at(&zeros[..length], offset)?;
        offset += length as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_regular_file() {
        // tmpfs has no O_DIRECT; a regular file is refused either way.
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("not-a-device");
        std::fs::write(&path, [1u8; 8192]).expect("writes");
        let error = zero_block_device(&path).expect_err("refused");
        assert!(
            error.detail.contains("not a block device") || error.kind != OsErrorKind::NotFound,
            "{error}"
        );
        // Nothing was written.
        assert_eq!(std::fs::read(&path).expect("reads"), vec![1u8; 8192]);
    }

    #[test]
    fn a_missing_device_is_not_found() {
        let error =
            zero_block_device(Path::new("/dev/liveclone-no-such-device")).expect_err("absent");
        assert_eq!(error.kind, OsErrorKind::NotFound);
    }
}
