//! Waiting for a node agent's report, within the controller's bound.

use std::future::Future;

use tokio::time::Instant;

use super::ControllerAgentConfig;
use crate::domain::error::{DomainError, DomainResult};

/// One look at the object: finished, or still waiting and why.
pub(super) enum Poll<T> {
    Done(T),
    Waiting(String),
}

/// Looks with `check` every `poll_interval` until it is done or fails,
/// for at most `wait_timeout`; then UNAVAILABLE with the last reason, so
/// that the CO retries (and nothing is undone: the node keeps working).
pub(super) async fn until<T, F, Fut>(
    config: &ControllerAgentConfig,
    mut check: F,
) -> DomainResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = DomainResult<Poll<T>>>,
{
    let deadline = Instant::now() + config.wait_timeout;
    loop {
        let reason = match check().await {
            Ok(Poll::Done(value)) => return Ok(value),
            Ok(Poll::Waiting(reason)) => reason,
            // The API server was unreachable for a moment: keep looking
            // until the deadline, as for any other wait.
            Err(error) if error.code == crate::domain::error::ErrorCode::Unavailable => {
                error.message
            }
            Err(error) => return Err(error),
        };
        if Instant::now() + config.poll_interval > deadline {
            return Err(DomainError::unavailable(format!(
                "not done after {:.0?}: {reason}",
                config.wait_timeout
            )));
        }
        tokio::time::sleep(config.poll_interval).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::error::ErrorCode;

    fn config() -> ControllerAgentConfig {
        ControllerAgentConfig {
            wait_timeout: Duration::from_millis(200),
            poll_interval: Duration::from_millis(10),
        }
    }

    #[tokio::test]
    async fn returns_once_done_and_gives_up_with_the_last_reason() {
        let mut looks = 0;
        let value = until(&config(), || {
            looks += 1;
            let look = looks;
            async move {
                Ok(if look < 3 {
                    Poll::Waiting(format!("look {look}"))
                } else {
                    Poll::Done(look)
                })
            }
        })
        .await
        .expect("done on the third look");
        assert_eq!(value, 3);

        let error = until::<(), _, _>(&config(), || async {
            Ok(Poll::Waiting("the node is busy".to_owned()))
        })
        .await
        .expect_err("times out");
        assert_eq!(error.code, ErrorCode::Unavailable);
        assert!(
            error.message.contains("the node is busy"),
            "{}",
            error.message
        );
    }

    #[tokio::test]
    async fn a_final_error_ends_the_wait_and_a_transient_one_does_not() {
        let error = until::<(), _, _>(&config(), || async {
            Err(DomainError::out_of_range("too small"))
        })
        .await
        .expect_err("fails at once");
        assert_eq!(error.code, ErrorCode::OutOfRange);

        let mut looks = 0;
        let value = until(&config(), || {
            looks += 1;
            let look = looks;
            async move {
                if look == 1 {
                    Err(DomainError::unavailable("connection refused"))
                } else {
                    Ok(Poll::Done(look))
                }
            }
        })
        .await
        .expect("recovers");
        assert_eq!(value, 2);
    }
}
