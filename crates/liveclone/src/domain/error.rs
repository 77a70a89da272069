//! Domain errors: a code that says what the caller can do about it, and a
//! message a human can act on. The gRPC layer maps the code to a status.

use crate::domain::store::StoreError;
use crate::os::{OsError, OsErrorKind};

/// What kind of failure, in CSI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    OutOfRange,
    FailedPrecondition,
    ResourceExhausted,
    /// Try again later (for example: the source is still hydrating).
    Unavailable,
    /// Another operation on the same object is in flight.
    Aborted,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DomainError {
    pub code: ErrorCode,
    pub message: String,
}

pub type DomainResult<T> = Result<T, DomainError>;

macro_rules! constructor {
    ($fn:ident, $code:ident) => {
        pub fn $fn(message: impl Into<String>) -> Self {
            Self {
                code: ErrorCode::$code,
                message: message.into(),
            }
        }
    };
}

impl DomainError {
    constructor!(invalid_argument, InvalidArgument);
    constructor!(not_found, NotFound);
    constructor!(already_exists, AlreadyExists);
    constructor!(out_of_range, OutOfRange);
    constructor!(failed_precondition, FailedPrecondition);
    constructor!(resource_exhausted, ResourceExhausted);
    constructor!(unavailable, Unavailable);
    constructor!(aborted, Aborted);
    constructor!(internal, Internal);

    /// Prefixes the message with what was being done.
    pub fn context(mut self, what: impl std::fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl From<OsError> for DomainError {
    fn from(error: OsError) -> Self {
        let code = match error.kind {
            OsErrorKind::NoSpace => ErrorCode::ResourceExhausted,
            OsErrorKind::Busy => ErrorCode::FailedPrecondition,
            OsErrorKind::Unsupported => ErrorCode::FailedPrecondition,
            OsErrorKind::NotFound | OsErrorKind::Failed => ErrorCode::Internal,
        };
        Self {
            code,
            message: error.to_string(),
        }
    }
}

impl From<StoreError> for DomainError {
    fn from(error: StoreError) -> Self {
        Self::internal(error.to_string())
    }
}
