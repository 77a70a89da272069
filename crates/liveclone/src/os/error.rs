//! Errors from the OS layer.

use std::path::PathBuf;

/// What went wrong, coarse enough for the domain layer to decide on a gRPC
/// code or a retry without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OsErrorKind {
    /// The device, file or mount does not exist.
    NotFound,
    /// The object exists but is in use (open device, busy mount).
    Busy,
    /// The kernel or a tool lacks a feature (no dm-clone, no reflink).
    Unsupported,
    /// The pool or a device has no space left.
    NoSpace,
    /// Anything else: a tool failed, an ioctl returned an error.
    Failed,
}

/// An OS-layer failure, with the command or call and what the OS said.
#[derive(Debug, thiserror::Error)]
#[error("{operation}: {detail}")]
pub struct OsError {
    pub kind: OsErrorKind,
    /// What was attempted, e.g. `dmsetup create liveclone-lcv-...` or
    /// `FICLONE /pool/a -> /pool/b`; never contains secrets.
    pub operation: String,
    /// What the OS or the tool said (stderr, errno text).
    pub detail: String,
}

impl OsError {
    pub fn new(kind: OsErrorKind, operation: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            kind,
            operation: operation.into(),
            detail: detail.into(),
        }
    }

    /// From an I/O error on `path`, mapping the errno to a kind.
    pub fn io(
        operation: impl Into<String>,
        path: impl Into<PathBuf>,
        error: &std::io::Error,
    ) -> Self {
        let kind = match error.raw_os_error() {
            Some(code)
                if code == nix::libc::ENOENT
                    || code == nix::libc::ENXIO
                    || code == nix::libc::ENODEV =>
            {
                OsErrorKind::NotFound
            }
            Some(code) if code == nix::libc::EBUSY => OsErrorKind::Busy,
            Some(code) if code == nix::libc::ENOSPC || code == nix::libc::EDQUOT => {
                OsErrorKind::NoSpace
            }
            Some(code)
                if code == nix::libc::EOPNOTSUPP
                    || code == nix::libc::ENOTTY
                    || code == nix::libc::EXDEV =>
            {
                OsErrorKind::Unsupported
            }
            _ => OsErrorKind::Failed,
        };
        Self::new(
            kind,
            operation,
            format!("{}: {error}", path.into().display()),
        )
    }

    pub fn is_not_found(&self) -> bool {
        self.kind == OsErrorKind::NotFound
    }
}

pub type OsResult<T> = Result<T, OsError>;
