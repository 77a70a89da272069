//! Per-object operation guards.
//!
//! The CSI spec asks a plugin to answer ABORTED when a call for a volume
//! arrives while another call for the same volume is still in flight, rather
//! than queueing it: the CO retries with backoff. Keys are IDs (`lcv-…`,
//! `lcs-…`); an operation that touches several objects takes all their keys
//! at once, or none.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::domain::error::{DomainError, DomainResult};

#[derive(Debug, Default, Clone)]
pub struct OpLocks {
    held: Arc<Mutex<HashSet<String>>>,
}

/// Releases its keys when dropped.
#[derive(Debug)]
pub struct OpGuard {
    held: Arc<Mutex<HashSet<String>>>,
    keys: Vec<String>,
}

fn lock(set: &Mutex<HashSet<String>>) -> MutexGuard<'_, HashSet<String>> {
    // A panic while holding this lock cannot leave the set inconsistent
    // (single insert/remove calls), so a poisoned lock is still usable.
    set.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl OpLocks {
    /// Takes every key or none; ABORTED naming the busy key otherwise.
    pub fn try_acquire<I, K>(&self, keys: I) -> DomainResult<OpGuard>
    where
        I: IntoIterator<Item = K>,
        K: std::fmt::Display,
    {
        let mut wanted: Vec<String> = keys.into_iter().map(|k| k.to_string()).collect();
        wanted.sort();
        wanted.dedup();
        let mut held = lock(&self.held);
        if let Some(busy) = wanted.iter().find(|key| held.contains(*key)) {
            return Err(DomainError::aborted(format!(
                "an operation on {busy} is already in progress; retry later"
            )));
        }
        held.extend(wanted.iter().cloned());
        Ok(OpGuard {
            held: Arc::clone(&self.held),
            keys: wanted,
        })
    }

    pub fn is_held(&self, key: &str) -> bool {
        lock(&self.held).contains(key)
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        for key in &self.keys {
            held.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_caller_is_aborted_until_the_first_finishes() {
        let locks = OpLocks::default();
        let first = locks.try_acquire(["lcv-a"]).expect("free");
        let err = locks.try_acquire(["lcv-a"]).expect_err("held");
        assert_eq!(err.code, crate::domain::error::ErrorCode::Aborted);
        assert!(err.message.contains("lcv-a"));
        drop(first);
        locks.try_acquire(["lcv-a"]).expect("free again");
    }

    #[test]
    fn all_or_nothing() {
        let locks = OpLocks::default();
        let _b = locks.try_acquire(["b"]).expect("free");
        assert!(locks.try_acquire(["a", "b"]).is_err());
        assert!(!locks.is_held("a"), "a must not stay held after a failed multi-acquire");
        let _a = locks.try_acquire(["a", "c", "a"]).expect("duplicates are fine");
    }
}
