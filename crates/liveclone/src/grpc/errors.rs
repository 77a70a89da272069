//! From domain errors to gRPC statuses, and running engine calls off the
//! async runtime.
//!
//! The domain layer already classifies every failure in CSI's terms
//! ([`ErrorCode`]); this module only translates that class into the
//! matching [`tonic::Code`] and keeps the message, which was written for the
//! person reading the CO's events.

use tonic::{Code, Status};
use tracing::Span;

use crate::domain::error::{DomainError, DomainResult, ErrorCode};

/// The gRPC code the CSI spec uses for each class of domain failure.
pub fn code_of(code: ErrorCode) -> Code {
    match code {
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::OutOfRange => Code::OutOfRange,
        ErrorCode::FailedPrecondition => Code::FailedPrecondition,
        ErrorCode::ResourceExhausted => Code::ResourceExhausted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Aborted => Code::Aborted,
        ErrorCode::Internal => Code::Internal,
    }
}

/// The status a handler returns for a domain error.
///
/// Internal errors are also logged here: they are the ones nobody asked
/// for, and the CO may only show them as an event that scrolls away. The
/// other codes describe the request or the object's state and are logged
/// with the RPC's outcome by the server layer.
pub fn to_status(error: DomainError) -> Status {
    let code = code_of(error.code);
    if code == Code::Internal {
        tracing::error!(message = %error.message, "internal error");
    }
    Status::new(code, error.message)
}

impl From<DomainError> for Status {
    fn from(error: DomainError) -> Self {
        to_status(error)
    }
}

/// Runs `work` (an engine call, which blocks on tools and ioctls) on the
/// blocking thread pool, inside `span`, and maps its error to a status.
///
/// The span is entered on the worker thread explicitly: tracing's current
/// span is per thread, so without this the engine's own log lines would
/// lose the RPC's volume ID.
pub async fn run_blocking<T, F>(span: &Span, work: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce() -> DomainResult<T> + Send + 'static,
{
    let span = span.clone();
    tokio::task::spawn_blocking(move || span.in_scope(work))
        .await
        .map_err(|join_error| {
            // A panic in the engine (or a runtime shutting down) ends up
            // here; the operation's records say how far it got, and a retry
            // continues from there.
            tracing::error!(%join_error, "the engine call did not finish");
            Status::internal(format!("the operation did not finish: {join_error}"))
        })?
        .map_err(to_status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_domain_code_maps_to_the_csi_code_of_the_same_name() {
        let pairs = [
            (ErrorCode::InvalidArgument, Code::InvalidArgument),
            (ErrorCode::NotFound, Code::NotFound),
            (ErrorCode::AlreadyExists, Code::AlreadyExists),
            (ErrorCode::OutOfRange, Code::OutOfRange),
            (ErrorCode::FailedPrecondition, Code::FailedPrecondition),
            (ErrorCode::ResourceExhausted, Code::ResourceExhausted),
            (ErrorCode::Unavailable, Code::Unavailable),
            (ErrorCode::Aborted, Code::Aborted),
            (ErrorCode::Internal, Code::Internal),
        ];
        for (domain, grpc) in pairs {
            let status = to_status(DomainError {
                code: domain,
                message: "what happened".to_owned(),
            });
            assert_eq!(status.code(), grpc, "{domain:?}");
            assert_eq!(status.message(), "what happened");
        }
    }

    #[tokio::test]
    async fn run_blocking_returns_the_value_or_the_mapped_error() {
        let span = Span::none();
        let value = run_blocking(&span, || Ok(7)).await.expect("succeeds");
        assert_eq!(value, 7);
        let status = run_blocking::<(), _>(&span, || Err(DomainError::aborted("busy")))
            .await
            .expect_err("fails");
        assert_eq!(status.code(), Code::Aborted);
        assert_eq!(status.message(), "busy");
    }

    #[tokio::test]
    async fn a_panicking_engine_call_becomes_internal() {
        let span = Span::none();
        let status = run_blocking::<(), _>(&span, || panic!("engine bug"))
            .await
            .expect_err("fails");
        assert_eq!(status.code(), Code::Internal);
    }
}
