//! Per-object operation guards.
//!
//! The CSI spec asks a plugin to answer ABORTED when a call for a volume
//! arrives while another call for the same volume is still in flight, rather
//! than queueing it: the CO retries with backoff. Keys are IDs (`lcv-…`,
//! `lcs-…`); an operation that touches several objects takes all their keys
//! at once, or none.
//!
//! Background work (the monitor's switch to linear, releasing images) also
//! takes keys, but a CO call that finds one of those held waits for it
//! (bounded) instead of failing: the CO did nothing wrong, and the work is
//! short. Background work itself never waits: it tries again later.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::domain::error::{DomainError, DomainResult};

/// How long a CO call waits for background work on the same object.
pub const BACKGROUND_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    Call,
    Background,
}

#[derive(Debug, Default)]
struct Table {
    held: Mutex<HashMap<String, Holder>>,
    released: Condvar,
}

#[derive(Debug, Default, Clone)]
pub struct OpLocks {
    table: Arc<Table>,
}

/// Releases its keys when dropped.
#[derive(Debug)]
pub struct OpGuard {
    table: Arc<Table>,
    keys: Vec<String>,
}

fn lock(table: &Table) -> MutexGuard<'_, HashMap<String, Holder>> {
    // A panic while holding this lock cannot leave the map inconsistent
    // (single insert/remove calls), so a poisoned lock is still usable.
    table
        .held
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn normalise<I, K>(keys: I) -> Vec<String>
where
    I: IntoIterator<Item = K>,
    K: std::fmt::Display,
{
    let mut wanted: Vec<String> = keys.into_iter().map(|k| k.to_string()).collect();
    wanted.sort();
    wanted.dedup();
    wanted
}

fn busy(key: &str) -> DomainError {
    DomainError::aborted(format!(
        "an operation on {key} is already in progress; retry later"
    ))
}

impl OpLocks {
    /// For a CO call: takes every key or none. ABORTED if another call
    /// holds one; waits up to [`BACKGROUND_WAIT`] for background work.
    pub fn try_acquire<I, K>(&self, keys: I) -> DomainResult<OpGuard>
    where
        I: IntoIterator<Item = K>,
        K: std::fmt::Display,
    {
        let wanted = normalise(keys);
        let deadline = Instant::now() + BACKGROUND_WAIT;
        let mut held = lock(&self.table);
        loop {
            let blocking = wanted
                .iter()
                .find_map(|key| held.get(key).map(|h| (key, *h)));
            match blocking {
                None => break,
                Some((key, Holder::Call)) => return Err(busy(key)),
                Some((key, Holder::Background)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(busy(key));
                    }
                    held = self
                        .table
                        .released
                        .wait_timeout(held, deadline - now)
                        .map(|(guard, _)| guard)
                        .unwrap_or_else(|poisoned| poisoned.into_inner().0);
                }
            }
        }
        Ok(self.insert(held, wanted, Holder::Call))
    }

    /// For background work: takes every key or none, never waits.
    pub fn try_acquire_background<I, K>(&self, keys: I) -> DomainResult<OpGuard>
    where
        I: IntoIterator<Item = K>,
        K: std::fmt::Display,
    {
        let wanted = normalise(keys);
        let held = lock(&self.table);
        if let Some(key) = wanted.iter().find(|key| held.contains_key(*key)) {
            return Err(busy(key));
        }
        Ok(self.insert(held, wanted, Holder::Background))
    }

    fn insert(
        &self,
        mut held: MutexGuard<'_, HashMap<String, Holder>>,
        keys: Vec<String>,
        holder: Holder,
    ) -> OpGuard {
        for key in &keys {
            held.insert(key.clone(), holder);
        }
        OpGuard {
            table: Arc::clone(&self.table),
            keys,
        }
    }

    pub fn is_held(&self, key: &str) -> bool {
        lock(&self.table).contains_key(key)
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut held = lock(&self.table);
        for key in &self.keys {
            held.remove(key);
        }
        drop(held);
        self.table.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::error::ErrorCode;

    #[test]
    fn second_caller_is_aborted_until_the_first_finishes() {
        let locks = OpLocks::default();
        let first = locks.try_acquire(["lcv-a"]).expect("free");
        let err = locks.try_acquire(["lcv-a"]).expect_err("held");
        assert_eq!(err.code, ErrorCode::Aborted);
        assert!(err.message.contains("lcv-a"));
        drop(first);
        locks.try_acquire(["lcv-a"]).expect("free again");
    }

    #[test]
    fn all_or_nothing() {
        let locks = OpLocks::default();
        let _b = locks.try_acquire(["b"]).expect("free");
        assert!(locks.try_acquire(["a", "b"]).is_err());
        assert!(
            !locks.is_held("a"),
            "a must not stay held after a failed multi-acquire"
        );
        let _a = locks
            .try_acquire(["a", "c", "a"])
            .expect("duplicates are fine");
    }

    #[test]
    fn a_call_waits_for_background_work_and_background_never_waits() {
        let locks = OpLocks::default();
        let background = locks.try_acquire_background(["v"]).expect("free");
        assert_eq!(
            locks.try_acquire_background(["v"]).expect_err("held").code,
            ErrorCode::Aborted
        );
        let waiter = {
            let locks = locks.clone();
            std::thread::spawn(move || locks.try_acquire(["v"]).map(|_| ()))
        };
        std::thread::sleep(Duration::from_millis(50));
        drop(background);
        waiter
            .join()
            .expect("thread")
            .expect("the call gets the key once background work ends");
        let call = locks.try_acquire(["v"]).expect("free");
        assert!(locks.try_acquire_background(["v"]).is_err());
        drop(call);
    }
}
