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

impl ErrorCode {
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::InvalidArgument,
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::OutOfRange,
        ErrorCode::FailedPrecondition,
        ErrorCode::ResourceExhausted,
        ErrorCode::Unavailable,
        ErrorCode::Aborted,
        ErrorCode::Internal,
    ];

    /// The name used where a code crosses a process boundary as text (the
    /// reason of a Kubernetes condition that a node agent writes and the
    /// controller agent turns back into a gRPC code).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "InvalidArgument",
            ErrorCode::NotFound => "NotFound",
            ErrorCode::AlreadyExists => "AlreadyExists",
            ErrorCode::OutOfRange => "OutOfRange",
            ErrorCode::FailedPrecondition => "FailedPrecondition",
            ErrorCode::ResourceExhausted => "ResourceExhausted",
            ErrorCode::Unavailable => "Unavailable",
            ErrorCode::Aborted => "Aborted",
            ErrorCode::Internal => "Internal",
        }
    }

    /// Whether a retry of the same request may succeed without anything
    /// else changing (the object is busy, the node is still working on it,
    /// or something broke that may heal). The others describe the request
    /// itself or the state it is made against.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorCode::Unavailable | ErrorCode::Aborted | ErrorCode::Internal
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ErrorCode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ErrorCode::ALL
            .into_iter()
            .find(|code| code.as_str() == text)
            .ok_or_else(|| format!("{text:?} is not an error code"))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_their_names() {
        for code in ErrorCode::ALL {
            assert_eq!(code.to_string().parse::<ErrorCode>(), Ok(code));
        }
        assert!("Bogus".parse::<ErrorCode>().is_err());
    }
}
