//! Counters of what the hydration reconciler did, per VolumeHydration: for
//! tests (the rate limit is checked against them) and for the Prometheus
//! metrics the agents will export.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Counts since the agent started. Keys are `namespace/name` of the
/// VolumeHydration.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    inner: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    status_writes: BTreeMap<String, u64>,
    status_write_errors: u64,
    events: BTreeMap<&'static str, u64>,
    engine_changes: u64,
}

impl AgentMetrics {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Counter updates cannot be left half done by a panic.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Successful status writes of one VolumeHydration.
    pub fn status_writes(&self, namespace: &str, name: &str) -> u64 {
        self.counts()
            .status_writes
            .get(&format!("{namespace}/{name}"))
            .copied()
            .unwrap_or(0)
    }

    /// Successful status writes of all VolumeHydrations.
    pub fn total_status_writes(&self) -> u64 {
        self.counts().status_writes.values().sum()
    }

    /// Status writes the API server refused or that did not reach it.
    pub fn status_write_errors(&self) -> u64 {
        self.counts().status_write_errors
    }

    /// Events published with `reason` (each object an Event went to counts).
    pub fn events(&self, reason: &str) -> u64 {
        self.counts().events.get(reason).copied().unwrap_or(0)
    }

    /// Pauses, resumes and tunings made in the engine for a spec.
    pub fn engine_changes(&self) -> u64 {
        self.counts().engine_changes
    }

    pub(super) fn status_written(&self, key: &str) {
        *self
            .counts()
            .status_writes
            .entry(key.to_owned())
            .or_default() += 1;
    }

    pub(super) fn status_write_failed(&self) {
        self.counts().status_write_errors += 1;
    }

    pub(super) fn events_published(&self, reason: &'static str, count: u32) {
        *self.counts().events.entry(reason).or_default() += u64::from(count);
    }

    pub(super) fn engine_changed(&self, count: u32) {
        self.counts().engine_changes += u64::from(count);
    }
}

/// Counts of what the LivecloneVolume or the LivecloneSnapshot reconciler
/// did since the agent started (one per kind): for tests (a restarted agent
/// must redo nothing) and for the Prometheus metrics the agents will export.
#[derive(Debug, Default)]
pub struct StorageMetrics {
    engine_calls: AtomicU64,
    status_writes: AtomicU64,
    status_write_errors: AtomicU64,
    finalizers_removed: AtomicU64,
    warnings: AtomicU64,
}

impl StorageMetrics {
    /// Engine calls that make, grow or delete storage (reads not counted).
    pub fn engine_calls(&self) -> u64 {
        self.engine_calls.load(Ordering::Relaxed)
    }

    /// Successful status writes.
    pub fn status_writes(&self) -> u64 {
        self.status_writes.load(Ordering::Relaxed)
    }

    /// Status writes the API server refused or that did not reach it.
    pub fn status_write_errors(&self) -> u64 {
        self.status_write_errors.load(Ordering::Relaxed)
    }

    /// Storage finalizers removed from deleted objects.
    pub fn finalizers_removed(&self) -> u64 {
        self.finalizers_removed.load(Ordering::Relaxed)
    }

    /// Warning Events published.
    pub fn warnings(&self) -> u64 {
        self.warnings.load(Ordering::Relaxed)
    }

    pub(super) fn engine_called(&self) {
        self.engine_calls.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn status_written(&self, ok: bool) {
        let counter = if ok {
            &self.status_writes
        } else {
            &self.status_write_errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn finalizer_removed(&self) {
        self.finalizers_removed.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn warned(&self) {
        self.warnings.fetch_add(1, Ordering::Relaxed);
    }
}
