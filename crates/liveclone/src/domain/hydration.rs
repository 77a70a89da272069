//! The hydration of one clone as a state machine, fed with status samples.
//!
//! dm-clone tells little by itself: a device-mapper event when hydration
//! completes or the metadata mode changes, and counters in its status line.
//! In particular nothing at all is reported when copies fail on a source or
//! destination I/O error, which the kernel logs and retries forever (field
//! notes, section 2). So the driver must infer a stall from the counters
//! standing still, and this module is where that inference lives, free of
//! I/O and of the real clock so that every rule can be tested exactly: the
//! caller reads the status (no-flush), turns it into a [`Sample`] with a
//! monotonic timestamp, and acts on the [`PhaseChange`]s it gets back.
//!
//! ```text
//! Pending --start--> Hydrating --ready_to_switch + begin_switch--> Switching --complete--> Complete
//!                     |     ^                                          |
//!             no progress   progress resumes / paused          abort_switch (back to Hydrating)
//!                     v     |
//!                    Stalled
//! any phase but Complete --metadata ro/Fail or fail()--> Failed
//! ```
//!
//! `Complete` and `Failed` are terminal: a clone whose metadata went bad
//! needs a new table (or a new clone), and with it a new tracker.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::human::{format_bytes, format_duration, format_rate};
use crate::os::dm::{CloneStatus, CloneStatusLine, MetadataMode};

/// Where a clone is in its life. Serialized as the variant name
/// (`"Hydrating"`), which is also what [`fmt::Display`] prints and
/// [`FromStr`] reads, so records, logs and API fields agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum HydrationPhase {
    /// The clone table is loaded with hydration disabled (the file system
    /// may be trimmed first, so that free space is never copied).
    Pending,
    /// Background copying is enabled (or paused by the driver on purpose).
    Hydrating,
    /// Everything is on the destination; the device is being switched to a
    /// linear table.
    Switching,
    /// The device is linear; source and metadata are no longer needed.
    Complete,
    /// Work remains but nothing has moved for the stall policy's time.
    /// Not terminal: it returns to `Hydrating` as soon as progress resumes.
    Stalled,
    /// The metadata is read-only or failed, or the caller gave up.
    Failed,
}

impl HydrationPhase {
    /// Every phase, in the order of a normal life.
    pub const ALL: [HydrationPhase; 6] = [
        HydrationPhase::Pending,
        HydrationPhase::Hydrating,
        HydrationPhase::Stalled,
        HydrationPhase::Switching,
        HydrationPhase::Complete,
        HydrationPhase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HydrationPhase::Pending => "Pending",
            HydrationPhase::Hydrating => "Hydrating",
            HydrationPhase::Switching => "Switching",
            HydrationPhase::Complete => "Complete",
            HydrationPhase::Stalled => "Stalled",
            HydrationPhase::Failed => "Failed",
        }
    }

    /// `Complete` and `Failed`: nothing moves the tracker out of them.
    pub fn is_terminal(self) -> bool {
        matches!(self, HydrationPhase::Complete | HydrationPhase::Failed)
    }
}

impl fmt::Display for HydrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A phase name that is none of [`HydrationPhase::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown hydration phase {0:?} (known: Pending, Hydrating, Switching, Complete, Stalled, Failed)"
)]
pub struct UnknownPhase(pub String);

impl FromStr for HydrationPhase {
    type Err = UnknownPhase;

    /// Exact, case-sensitive names: the same spelling serde uses, so a
    /// value that parses here also deserializes.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HydrationPhase::ALL
            .into_iter()
            .find(|phase| phase.as_str() == s)
            .ok_or_else(|| UnknownPhase(s.to_owned()))
    }
}

/// The metadata's state in one sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SampleHealth {
    /// `rw`.
    Ok,
    /// `ro`: a metadata operation failed; hydration has stopped.
    ReadOnly,
    /// `Fail`, or another failure the caller detected; the text says which.
    Failed(String),
}

/// One reading of a clone's status, at a time from the caller's monotonic
/// clock (any origin; only differences matter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub at: Duration,
    pub hydrated_bytes: u64,
    pub total_bytes: u64,
    /// Regions being copied at the moment of the reading.
    pub hydrating_regions: u64,
    pub metadata: SampleHealth,
}

impl Sample {
    /// The sample for a status line read at `at`. `None` for an `Error`
    /// status, which says nothing about the clone (the kernel could not
    /// read a counter for this one report); skip it and read again.
    ///
    /// A `Fail` status carries no counters: the sample has zero hydrated
    /// bytes, which the tracker ignores since it fails on the health first.
    pub fn from_status(at: Duration, line: &CloneStatusLine) -> Option<Sample> {
        let total_bytes = line.total_bytes()?;
        match &line.status {
            CloneStatus::Active(report) => Some(Sample {
                at,
                hydrated_bytes: line.hydrated_bytes()?,
                total_bytes,
                hydrating_regions: report.hydrating_regions,
                metadata: match report.metadata_mode {
                    MetadataMode::ReadWrite => SampleHealth::Ok,
                    MetadataMode::ReadOnly => SampleHealth::ReadOnly,
                },
            }),
            CloneStatus::Fail => Some(Sample {
                at,
                hydrated_bytes: 0,
                total_bytes,
                hydrating_regions: 0,
                metadata: SampleHealth::Failed(
                    "dm-clone reports its metadata in fail mode".to_owned(),
                ),
            }),
            CloneStatus::Error => None,
        }
    }
}

/// When to call a hydration stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallPolicy {
    /// How long the hydrated count may stand still, with work remaining and
    /// hydration not paused, before the clone is `Stalled`. Long enough to
    /// ride out a burst of application I/O (dm-clone only copies while no
    /// user I/O is in flight), short enough that a failing disk is reported
    /// within a minute.
    pub stall_after: Duration,
}

impl StallPolicy {
    pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(30);
}

impl Default for StallPolicy {
    fn default() -> Self {
        StallPolicy {
            stall_after: Self::DEFAULT_STALL_AFTER,
        }
    }
}

/// A phase transition, for the caller to log, record and publish as an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseChange {
    pub from: HydrationPhase,
    pub to: HydrationPhase,
    /// Why, in a sentence for people.
    pub reason: String,
}

/// A transition the current phase does not allow: a caller bug, or a race
/// the caller must resolve (e.g. a switch begun before the last sample).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a hydration in phase {phase}: {why}")]
pub struct TransitionError {
    pub phase: HydrationPhase,
    pub action: &'static str,
    pub why: String,
}

/// A snapshot of a clone's hydration, for status APIs, records and people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub phase: HydrationPhase,
    pub hydrated_bytes: u64,
    pub total_bytes: u64,
    /// 0 to 100; exactly 100 only when everything is hydrated, so that a
    /// rounded display never claims completion early.
    pub percent: f64,
    /// Averaged over the last [`RATE_WINDOW`]; 0 while paused or not yet
    /// measured. Never negative, never NaN.
    pub bytes_per_second: f64,
    /// Time left at the current rate (rounded up to a second); `None` when
    /// unknown: no rate yet, paused, stalled, not started, or failed.
    pub eta: Option<Duration>,
    pub paused: bool,
    /// When the hydrated count last grew, on the caller's clock.
    pub last_progress_at: Option<Duration>,
    /// One sentence for people.
    pub message: String,
}

/// The span over which the rate is averaged.
///
/// A sliding window rather than an exponential moving average: samples come
/// at irregular times (on device-mapper events and on a slow poll), and a
/// window average of `(newest - oldest bytes) / (newest - oldest time)`
/// weights by time, not by how many samples happened to arrive; it forgets
/// a pause or a throttle change completely after the window, and its value
/// is easy to state and to check. Twenty seconds smooths the stop-and-go
/// of hydration under application I/O while still following a real change
/// of speed within one status refresh or two.
pub const RATE_WINDOW: Duration = Duration::from_secs(20);

/// Bound on the samples kept for the rate, whatever the sampling frequency.
const MAX_WINDOW_SAMPLES: usize = 512;

/// The largest percentage shown while anything is left.
const PARTIAL_PERCENT_CAP: f64 = 99.99;

/// The hydration state machine of one clone. See the module documentation.
#[derive(Debug, Clone)]
pub struct HydrationTracker {
    policy: StallPolicy,
    phase: HydrationPhase,
    total_bytes: u64,
    hydrated_bytes: u64,
    hydrating_regions: u64,
    metadata: SampleHealth,
    /// Whether any sample was observed: completion is only believed from
    /// a status read (an already complete clone fires no event on reload).
    observed: bool,
    paused: bool,
    started_at: Option<Duration>,
    last_progress_at: Option<Duration>,
    /// Start of the current span in which progress is expected: the last
    /// progress, the start, or the end of a pause, whichever is latest.
    stall_clock: Option<Duration>,
    /// `(at, hydrated bytes)`, oldest first, spanning about [`RATE_WINDOW`].
    window: VecDeque<(Duration, u64)>,
    /// The stall or failure explanation while in those phases.
    reason: Option<String>,
    took: Option<Duration>,
}

impl HydrationTracker {
    /// A `Pending` tracker for a clone of `total_bytes` (the clone target's
    /// length). Samples may correct the total; the status is authoritative.
    pub fn new(total_bytes: u64, policy: StallPolicy) -> Self {
        HydrationTracker {
            policy,
            phase: HydrationPhase::Pending,
            total_bytes,
            hydrated_bytes: 0,
            hydrating_regions: 0,
            metadata: SampleHealth::Ok,
            observed: false,
            paused: false,
            started_at: None,
            last_progress_at: None,
            stall_clock: None,
            window: VecDeque::new(),
            reason: None,
            took: None,
        }
    }

    pub fn phase(&self) -> HydrationPhase {
        self.phase
    }

    pub fn policy(&self) -> StallPolicy {
        self.policy
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Hydration was enabled at `at`: `Pending` becomes `Hydrating` and the
    /// stall clock starts. Idempotent while hydrating or stalled.
    pub fn start(&mut self, at: Duration) -> Result<Option<PhaseChange>, TransitionError> {
        match self.phase {
            HydrationPhase::Pending => {
                self.started_at = Some(at);
                self.stall_clock = Some(at);
                self.restart_window(at);
                Ok(Some(self.transition(
                    HydrationPhase::Hydrating,
                    "background hydration enabled".to_owned(),
                )))
            }
            HydrationPhase::Hydrating | HydrationPhase::Stalled => Ok(None),
            phase => Err(TransitionError {
                phase,
                action: "start",
                why: "hydration has already ended or is being switched".to_owned(),
            }),
        }
    }

    /// The driver paused (`disable_hydration`) or resumed hydration at `at`.
    ///
    /// A paused hydration is expected to stand still, so it is never
    /// `Stalled` (a stalled one returns to `Hydrating` when paused), and the
    /// stall clock restarts when it resumes. The rate window restarts on
    /// both edges, so the rate reflects only unpaused copying. Ignored once
    /// switching or ended.
    pub fn set_paused(&mut self, paused: bool, at: Duration) -> Option<PhaseChange> {
        if self.paused == paused
            || self.phase.is_terminal()
            || self.phase == HydrationPhase::Switching
        {
            return None;
        }
        self.paused = paused;
        self.window.clear();
        if !paused {
            self.stall_clock = Some(at);
            self.restart_window(at);
            return None;
        }
        (self.phase == HydrationPhase::Stalled).then(|| {
            self.transition(
                HydrationPhase::Hydrating,
                "hydration paused; a paused hydration is not reported as stalled".to_owned(),
            )
        })
    }

    /// Takes in one status reading and returns the phase change it causes,
    /// if any. Samples are ignored once switching or ended: the switch
    /// suspends the device, and afterwards the table is no longer a clone.
    ///
    /// Rules, in order: bad metadata fails the clone; growth of the
    /// hydrated count is progress (ending a stall); no growth for the stall
    /// policy's time, with work left and not paused, is a stall. A count
    /// that goes down (a reload that lost writes after the last metadata
    /// commit) is taken as the new truth and restarts the rate window.
    pub fn observe(&mut self, sample: Sample) -> Option<PhaseChange> {
        if self.phase.is_terminal() || self.phase == HydrationPhase::Switching {
            return None;
        }
        self.observed = true;
        self.metadata = sample.metadata.clone();
        match &sample.metadata {
            SampleHealth::Ok => {}
            SampleHealth::ReadOnly => {
                return Some(
                    self.enter_failed(
                        "The clone's dm-clone metadata went read-only, so hydration has stopped \
                     and writes to unhydrated regions fail: check the kernel log for errors \
                     on the metadata device (or a full pool), then delete the clone and \
                     create it again from its source, which is intact."
                            .to_owned(),
                    ),
                );
            }
            SampleHealth::Failed(detail) => {
                return Some(self.enter_failed(format!(
                    "The clone's dm-clone metadata failed ({detail}), so all I/O to the clone \
                     fails: check the kernel log for errors on the metadata device (or a full \
                     pool), then delete the clone and create it again from its source, which \
                     is intact."
                )));
            }
        }

        let at = sample.at;
        let previous = self.hydrated_bytes;
        self.total_bytes = sample.total_bytes;
        self.hydrated_bytes = sample.hydrated_bytes.min(sample.total_bytes);
        self.hydrating_regions = sample.hydrating_regions;
        let progressed = self.hydrated_bytes > previous;
        if progressed {
            self.last_progress_at = Some(at);
        }
        if self.phase == HydrationPhase::Pending {
            // Growth before the start comes from discards (trim), not from
            // copying: it says nothing about the copy rate.
            return None;
        }

        if !self.paused {
            if self.hydrated_bytes < previous {
                self.window.clear();
            }
            self.push_window(at);
        }
        let remaining = self.remaining_bytes();
        if progressed || remaining == 0 {
            let idle_since = self.stall_clock.replace(at).unwrap_or(at);
            if self.phase == HydrationPhase::Stalled {
                return Some(self.transition(
                    HydrationPhase::Hydrating,
                    format!(
                        "hydration resumed after {} without progress: {} of {} on the destination",
                        format_duration(at.saturating_sub(idle_since)),
                        format_bytes(self.hydrated_bytes),
                        format_bytes(self.total_bytes)
                    ),
                ));
            }
            return None;
        }
        if self.paused || self.phase != HydrationPhase::Hydrating {
            return None;
        }
        let since = *self.stall_clock.get_or_insert(at);
        let idle = at.saturating_sub(since);
        if idle < self.policy.stall_after {
            return None;
        }
        let reason = format!(
            "Hydration stalled at {} of {} ({}): no progress for {}; dm-clone retries failed \
             copies forever without reporting them, so the usual cause is an I/O error on the \
             source or destination device: check the kernel log (dmesg) for them \
             (sustained application I/O can also hold hydration back).",
            format_bytes(self.hydrated_bytes),
            format_bytes(self.total_bytes),
            format_percent(self.percent()),
            format_duration(idle),
        );
        self.reason = Some(reason.clone());
        Some(self.transition(HydrationPhase::Stalled, reason))
    }

    /// Whether the device may be switched to linear now: a status was read,
    /// everything is hydrated, no copy is in flight, the metadata is `rw`,
    /// and the hydration has not ended or failed. (The field notes' switch
    /// condition, which the kernel does not check for us.)
    pub fn ready_to_switch(&self) -> bool {
        self.switch_blocker().is_none()
    }

    /// `Switching`: the caller is about to flush, suspend and load the
    /// linear table. Fails, saying why, unless [`Self::ready_to_switch`].
    pub fn begin_switch(&mut self) -> Result<PhaseChange, TransitionError> {
        if let Some(why) = self.switch_blocker() {
            return Err(TransitionError {
                phase: self.phase,
                action: "begin the switch to linear of",
                why,
            });
        }
        Ok(self.transition(
            HydrationPhase::Switching,
            "hydration complete; switching the device to a linear table".to_owned(),
        ))
    }

    /// The switch failed before the linear table went live (the clone table
    /// is still loaded): back to `Hydrating`, stall clock restarted at `at`,
    /// so the caller can read the status again and retry.
    pub fn abort_switch(
        &mut self,
        at: Duration,
        reason: &str,
    ) -> Result<PhaseChange, TransitionError> {
        if self.phase != HydrationPhase::Switching {
            return Err(TransitionError {
                phase: self.phase,
                action: "abort the switch of",
                why: "no switch is in progress".to_owned(),
            });
        }
        self.stall_clock = Some(at);
        self.restart_window(at);
        Ok(self.transition(
            HydrationPhase::Hydrating,
            format!("the switch to linear failed and will be retried: {reason}"),
        ))
    }

    /// The linear table is live at `at`.
    pub fn complete(&mut self, at: Duration) -> Result<PhaseChange, TransitionError> {
        if self.phase != HydrationPhase::Switching {
            return Err(TransitionError {
                phase: self.phase,
                action: "complete",
                why: "only a hydration being switched to linear can complete".to_owned(),
            });
        }
        self.hydrated_bytes = self.total_bytes;
        self.hydrating_regions = 0;
        self.window.clear();
        self.took = self.started_at.map(|started| at.saturating_sub(started));
        Ok(self.transition(
            HydrationPhase::Complete,
            "the device is linear on its destination".to_owned(),
        ))
    }

    /// The caller gave up on this hydration (e.g. the table could not be
    /// reloaded). `None` if it had already ended or failed.
    pub fn fail(&mut self, reason: &str) -> Option<PhaseChange> {
        if self.phase.is_terminal() {
            return None;
        }
        Some(self.enter_failed(reason.to_owned()))
    }

    pub fn progress(&self) -> Progress {
        let bytes_per_second = if self.paused { 0.0 } else { self.rate() };
        Progress {
            phase: self.phase,
            hydrated_bytes: self.hydrated_bytes,
            total_bytes: self.total_bytes,
            percent: self.percent(),
            bytes_per_second,
            eta: self.eta(bytes_per_second),
            paused: self.paused,
            last_progress_at: self.last_progress_at,
            message: self.message(bytes_per_second),
        }
    }

    fn transition(&mut self, to: HydrationPhase, reason: String) -> PhaseChange {
        let from = self.phase;
        self.phase = to;
        if !matches!(to, HydrationPhase::Stalled | HydrationPhase::Failed) {
            self.reason = None;
        }
        PhaseChange { from, to, reason }
    }

    fn enter_failed(&mut self, reason: String) -> PhaseChange {
        self.reason = Some(reason.clone());
        self.window.clear();
        self.transition(HydrationPhase::Failed, reason)
    }

    /// Why a switch may not begin now, if it may not.
    fn switch_blocker(&self) -> Option<String> {
        let why = if !matches!(
            self.phase,
            HydrationPhase::Pending | HydrationPhase::Hydrating | HydrationPhase::Stalled
        ) {
            format!("the hydration is {}", self.phase)
        } else if !self.observed {
            "no status has been read since the tracker was created".to_owned()
        } else if self.metadata != SampleHealth::Ok {
            "the metadata is not read-write".to_owned()
        } else if self.hydrated_bytes < self.total_bytes {
            format!(
                "{} of {} are still to be copied",
                format_bytes(self.remaining_bytes()),
                format_bytes(self.total_bytes)
            )
        } else if self.hydrating_regions > 0 {
            format!("{} regions are still being copied", self.hydrating_regions)
        } else {
            return None;
        };
        Some(why)
    }

    fn remaining_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.hydrated_bytes)
    }

    /// Starts the rate window at `at` from the last known count, so that
    /// the first sample after a start or a resume already gives a rate.
    fn restart_window(&mut self, at: Duration) {
        self.window.clear();
        self.window.push_back((at, self.hydrated_bytes));
    }

    fn push_window(&mut self, at: Duration) {
        if let Some(&(newest, _)) = self.window.back() {
            if at < newest {
                // The caller's clock went backwards: the window would give
                // a nonsense rate, so start it again.
                self.window.clear();
            }
        }
        self.window.push_back((at, self.hydrated_bytes));
        // Keep one sample at or before the window's start, so the average
        // spans the whole window once there is enough history.
        let window_start = at.saturating_sub(RATE_WINDOW);
        while self.window.len() > 2 && self.window.get(1).is_some_and(|s| s.0 <= window_start) {
            self.window.pop_front();
        }
        while self.window.len() > MAX_WINDOW_SAMPLES {
            self.window.pop_front();
        }
    }

    /// Bytes per second over the window.
    fn rate(&self) -> f64 {
        let (Some(&(first_at, first_bytes)), Some(&(last_at, last_bytes))) =
            (self.window.front(), self.window.back())
        else {
            return 0.0;
        };
        let elapsed = last_at.saturating_sub(first_at).as_secs_f64();
        if elapsed <= 0.0 {
            return 0.0;
        }
        last_bytes.saturating_sub(first_bytes) as f64 / elapsed
    }

    fn eta(&self, rate: f64) -> Option<Duration> {
        let running = match self.phase {
            HydrationPhase::Hydrating | HydrationPhase::Switching | HydrationPhase::Complete => {
                !self.paused
            }
            HydrationPhase::Pending | HydrationPhase::Stalled | HydrationPhase::Failed => false,
        };
        let remaining = self.remaining_bytes();
        if !running {
            None
        } else if remaining == 0 {
            Some(Duration::ZERO)
        } else if rate > 0.0 {
            // Whole seconds, rounded up: "about 0s left" would be wrong
            // while anything is left. `try_` because a tiny rate can give
            // more seconds than a Duration holds.
            Duration::try_from_secs_f64((remaining as f64 / rate).ceil()).ok()
        } else {
            None
        }
    }

    fn percent(&self) -> f64 {
        if self.hydrated_bytes >= self.total_bytes {
            return 100.0;
        }
        let percent = self.hydrated_bytes as f64 * 100.0 / self.total_bytes as f64;
        percent.min(PARTIAL_PERCENT_CAP)
    }

    fn message(&self, rate: f64) -> String {
        let amount = format!(
            "{} of {} ({})",
            format_bytes(self.hydrated_bytes),
            format_bytes(self.total_bytes),
            format_percent(self.percent())
        );
        match self.phase {
            HydrationPhase::Pending => {
                format!("Waiting for hydration to start; {amount} already on the destination.")
            }
            HydrationPhase::Hydrating if self.paused => {
                format!("Hydration is paused at {amount}.")
            }
            HydrationPhase::Hydrating => match self.eta(rate) {
                Some(eta) if rate > 0.0 => format!(
                    "Hydrating: {amount} copied at {}, about {} left.",
                    // Saturating float-to-integer cast; the rate is shown
                    // to a tenth of a unit anyway.
                    format_rate(rate as u64),
                    format_duration(eta)
                ),
                _ => format!("Hydrating: {amount} copied; measuring the rate."),
            },
            HydrationPhase::Switching => format!(
                "All {} are on the destination; switching the device to a linear table.",
                format_bytes(self.total_bytes)
            ),
            HydrationPhase::Complete => match self.took {
                Some(took) => format!(
                    "Hydration complete: all {} are on the destination, after {}.",
                    format_bytes(self.total_bytes),
                    format_duration(took)
                ),
                None => format!(
                    "Hydration complete: all {} are on the destination.",
                    format_bytes(self.total_bytes)
                ),
            },
            HydrationPhase::Stalled | HydrationPhase::Failed => self
                .reason
                .clone()
                .unwrap_or_else(|| format!("Hydration {} at {amount}.", self.phase)),
        }
    }
}

/// A percentage with one decimal, rounded down so that 99.99 never shows
/// as 100.0.
fn format_percent(percent: f64) -> String {
    format!("{:.1}%", (percent * 10.0).floor() / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const TOTAL: u64 = 1000 * MIB;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn sample(at: Duration, hydrated_bytes: u64) -> Sample {
        Sample {
            at,
            hydrated_bytes,
            total_bytes: TOTAL,
            hydrating_regions: u64::from(hydrated_bytes < TOTAL),
            metadata: SampleHealth::Ok,
        }
    }

    /// A tracker started at t=0 with one sample of `hydrated` at t=0.
    fn started(hydrated: u64) -> HydrationTracker {
        let mut tracker = HydrationTracker::new(TOTAL, StallPolicy::default());
        let change = tracker.start(secs(0)).expect("pending starts");
        assert_eq!(
            change.map(|c| (c.from, c.to)),
            Some((HydrationPhase::Pending, HydrationPhase::Hydrating))
        );
        assert_eq!(tracker.observe(sample(secs(0), hydrated)), None);
        tracker
    }

    #[test]
    fn phase_names_round_trip_through_display_fromstr_and_serde() {
        let names = [
            "Pending",
            "Hydrating",
            "Stalled",
            "Switching",
            "Complete",
            "Failed",
        ];
        for (phase, name) in HydrationPhase::ALL.into_iter().zip(names) {
            assert_eq!(phase.to_string(), name);
            assert_eq!(name.parse::<HydrationPhase>(), Ok(phase));
            let json = serde_json::to_string(&phase).expect("serializes");
            assert_eq!(json, format!("\"{name}\""));
            let back: HydrationPhase = serde_json::from_str(&json).expect("deserializes");
            assert_eq!(back, phase);
        }
        let error = "hydrating"
            .parse::<HydrationPhase>()
            .expect_err("case matters");
        assert!(error.to_string().contains("Hydrating"), "{error}");
        assert!(serde_json::from_str::<HydrationPhase>("\"Done\"").is_err());
    }

    #[test]
    fn stalls_after_exactly_the_policy_time_without_progress() {
        let mut tracker = started(10 * MIB);
        assert_eq!(tracker.observe(sample(secs(10), 20 * MIB)), None);
        // No progress from t=10: 29.999 s later is not yet a stall.
        let just_before = secs(40) - Duration::from_millis(1);
        assert_eq!(tracker.observe(sample(just_before, 20 * MIB)), None);
        assert_eq!(tracker.phase(), HydrationPhase::Hydrating);

        let change = tracker
            .observe(sample(secs(40), 20 * MIB))
            .expect("stalled at 30 s");
        assert_eq!(
            (change.from, change.to),
            (HydrationPhase::Hydrating, HydrationPhase::Stalled)
        );
        assert!(
            change.reason.contains("no progress for 30s"),
            "{}",
            change.reason
        );
        assert!(
            change.reason.contains("source or destination"),
            "{}",
            change.reason
        );
        assert!(change.reason.contains("kernel log"), "{}", change.reason);
        let progress = tracker.progress();
        assert_eq!(progress.phase, HydrationPhase::Stalled);
        assert_eq!(progress.message, change.reason);
        assert_eq!(progress.eta, None);
        assert_eq!(progress.last_progress_at, Some(secs(10)));
        // Still stalled, reported once.
        assert_eq!(tracker.observe(sample(secs(50), 20 * MIB)), None);
        assert_eq!(tracker.phase(), HydrationPhase::Stalled);
    }

    #[test]
    fn a_custom_policy_is_used() {
        let policy = StallPolicy {
            stall_after: secs(5),
        };
        let mut tracker = HydrationTracker::new(TOTAL, policy);
        tracker.start(secs(100)).expect("starts");
        assert_eq!(tracker.observe(sample(secs(104), 0)), None);
        let change = tracker.observe(sample(secs(105), 0)).expect("stalled");
        assert_eq!(change.to, HydrationPhase::Stalled);
        assert!(
            change.reason.contains("no progress for 5s"),
            "{}",
            change.reason
        );
    }

    #[test]
    fn progress_after_a_stall_resumes_hydrating() {
        let mut tracker = started(0);
        tracker.observe(sample(secs(30), 0)).expect("stalled");
        let change = tracker.observe(sample(secs(31), MIB)).expect("resumed");
        assert_eq!(
            (change.from, change.to),
            (HydrationPhase::Stalled, HydrationPhase::Hydrating)
        );
        assert!(
            change.reason.contains("resumed after 31s"),
            "{}",
            change.reason
        );
        assert_eq!(tracker.progress().last_progress_at, Some(secs(31)));
        assert!(tracker.progress().message.starts_with("Hydrating"));
        // The stall clock restarted at the progress.
        assert_eq!(tracker.observe(sample(secs(60), MIB)), None);
        assert_eq!(
            tracker.observe(sample(secs(61), MIB)).map(|c| c.to),
            Some(HydrationPhase::Stalled)
        );
    }

    #[test]
    fn pending_never_stalls_and_discards_do_not_count_as_rate() {
        let mut tracker = HydrationTracker::new(TOTAL, StallPolicy::default());
        assert_eq!(tracker.observe(sample(secs(0), 0)), None);
        // A trim hydrated 600 MiB before the start.
        assert_eq!(tracker.observe(sample(secs(1), 600 * MIB)), None);
        assert_eq!(tracker.observe(sample(secs(1000), 600 * MIB)), None);
        let progress = tracker.progress();
        assert_eq!(progress.phase, HydrationPhase::Pending);
        assert_eq!(progress.bytes_per_second, 0.0);
        assert_eq!(progress.eta, None);
        assert!(progress.message.contains("Waiting"), "{}", progress.message);
        tracker.start(secs(1000)).expect("starts");
        tracker.observe(sample(secs(1010), 700 * MIB));
        assert_eq!(tracker.progress().bytes_per_second, (10 * MIB) as f64);
    }

    #[test]
    fn paused_hydration_never_stalls_and_resuming_restarts_the_clock() {
        let mut tracker = started(0);
        assert_eq!(tracker.set_paused(true, secs(1)), None);
        assert_eq!(tracker.observe(sample(secs(1000), 0)), None);
        assert_eq!(tracker.phase(), HydrationPhase::Hydrating);
        let paused = tracker.progress();
        assert!(paused.paused);
        assert_eq!(paused.eta, None);
        assert_eq!(paused.bytes_per_second, 0.0);
        assert!(paused.message.contains("paused"), "{}", paused.message);

        assert_eq!(tracker.set_paused(false, secs(2000)), None);
        assert_eq!(tracker.observe(sample(secs(2029), 0)), None);
        assert_eq!(
            tracker.observe(sample(secs(2030), 0)).map(|c| c.to),
            Some(HydrationPhase::Stalled)
        );
    }

    #[test]
    fn pausing_a_stalled_hydration_clears_the_stall() {
        let mut tracker = started(0);
        tracker.observe(sample(secs(30), 0)).expect("stalled");
        let change = tracker.set_paused(true, secs(31)).expect("unstalled");
        assert_eq!(
            (change.from, change.to),
            (HydrationPhase::Stalled, HydrationPhase::Hydrating)
        );
        // Pausing twice changes nothing.
        assert_eq!(tracker.set_paused(true, secs(32)), None);
    }

    #[test]
    fn read_only_or_failed_metadata_fails_the_hydration_for_good() {
        let mut tracker = started(0);
        let change = tracker
            .observe(Sample {
                metadata: SampleHealth::ReadOnly,
                ..sample(secs(5), MIB)
            })
            .expect("failed");
        assert_eq!(
            (change.from, change.to),
            (HydrationPhase::Hydrating, HydrationPhase::Failed)
        );
        assert!(change.reason.contains("read-only"), "{}", change.reason);
        assert!(change.reason.contains("kernel log"), "{}", change.reason);
        assert!(
            change.reason.contains("create it again"),
            "{}",
            change.reason
        );
        // Terminal: further samples and failures change nothing.
        assert_eq!(tracker.observe(sample(secs(6), TOTAL)), None);
        assert_eq!(tracker.fail("again"), None);
        assert!(!tracker.ready_to_switch());
        let progress = tracker.progress();
        assert_eq!(progress.phase, HydrationPhase::Failed);
        assert_eq!(progress.message, change.reason);
        assert_eq!(progress.eta, None);
        assert!(tracker.start(secs(7)).is_err());

        let mut tracker = started(0);
        let change = tracker
            .observe(Sample {
                metadata: SampleHealth::Failed("Fail".to_owned()),
                ..sample(secs(5), 0)
            })
            .expect("failed");
        assert_eq!(change.to, HydrationPhase::Failed);
        assert!(change.reason.contains("(Fail)"), "{}", change.reason);
    }

    #[test]
    fn the_caller_can_fail_a_hydration_in_any_live_phase() {
        let mut tracker = HydrationTracker::new(TOTAL, StallPolicy::default());
        let change = tracker
            .fail("the table could not be loaded")
            .expect("fails");
        assert_eq!(
            (change.from, change.to),
            (HydrationPhase::Pending, HydrationPhase::Failed)
        );
        assert_eq!(tracker.progress().message, "the table could not be loaded");
    }

    #[test]
    fn a_first_reading_before_the_start_is_not_counted_as_copied() {
        // The monitor's order: the first reading (90% marked by the trim),
        // then the start, then 1 MiB/s of copying.
        let mut tracker = HydrationTracker::new(TOTAL, StallPolicy::default());
        assert_eq!(tracker.observe(sample(secs(0), 900 * MIB)), None);
        tracker.start(secs(0)).expect("start");
        tracker.observe(sample(secs(0), 900 * MIB));
        tracker.observe(sample(secs(4), 904 * MIB));
        let progress = tracker.progress();
        assert_eq!(progress.bytes_per_second, MIB as f64, "{progress:?}");
    }

    #[test]
    fn rate_is_averaged_over_the_window_and_gives_the_eta() {
        let mut tracker = started(0);
        // 10 MiB/s for 30 s, sampled every second.
        for t in 1..=30 {
            assert_eq!(tracker.observe(sample(secs(t), t * 10 * MIB)), None);
        }
        let progress = tracker.progress();
        assert_eq!(progress.bytes_per_second, (10 * MIB) as f64);
        // 700 MiB left at 10 MiB/s.
        assert_eq!(progress.eta, Some(secs(70)));
        assert_eq!(progress.hydrated_bytes, 300 * MIB);
        assert_eq!(progress.last_progress_at, Some(secs(30)));
        assert!(
            progress.message.contains("10.0 MiB/s"),
            "{}",
            progress.message
        );
        assert!(progress.message.contains("1m10s"), "{}", progress.message);
        assert!(progress.message.contains("30.0%"), "{}", progress.message);

        // Then 2 MiB/s: after a full window the old speed is forgotten.
        for t in 31..=50 {
            tracker.observe(sample(secs(t), 300 * MIB + (t - 30) * 2 * MIB));
        }
        assert_eq!(tracker.progress().bytes_per_second, (2 * MIB) as f64);
        // 660 MiB left at 2 MiB/s.
        assert_eq!(tracker.progress().eta, Some(secs(330)));
    }

    #[test]
    fn rate_mixes_speeds_inside_the_window_and_rounds_eta_up() {
        let mut tracker = started(0);
        tracker.observe(sample(secs(10), 100 * MIB));
        tracker.observe(sample(secs(20), 130 * MIB));
        // 130 MiB over 20 s.
        assert_eq!(tracker.progress().bytes_per_second, (13 * MIB / 2) as f64);
        // 870 MiB / 6.5 MiB/s = 133.8 s, rounded up.
        assert_eq!(tracker.progress().eta, Some(secs(134)));
    }

    #[test]
    fn no_rate_before_two_samples() {
        let mut tracker = HydrationTracker::new(TOTAL, StallPolicy::default());
        tracker.start(secs(0)).expect("starts");
        let progress = tracker.progress();
        assert_eq!(progress.bytes_per_second, 0.0);
        assert_eq!(progress.eta, None);
        assert!(
            progress.message.contains("measuring"),
            "{}",
            progress.message
        );
    }

    #[test]
    fn a_count_going_down_is_believed_and_restarts_the_rate() {
        let mut tracker = started(0);
        tracker.observe(sample(secs(10), 100 * MIB));
        // A reload lost the copies after the last metadata commit.
        assert_eq!(tracker.observe(sample(secs(11), 90 * MIB)), None);
        assert_eq!(tracker.progress().hydrated_bytes, 90 * MIB);
        assert_eq!(tracker.progress().bytes_per_second, 0.0);
        tracker.observe(sample(secs(12), 95 * MIB));
        assert_eq!(tracker.progress().bytes_per_second, (5 * MIB) as f64);
    }

    #[test]
    fn percent_edge_cases() {
        // Nothing to hydrate is 100 % (and ready once a status was read).
        let mut empty = HydrationTracker::new(0, StallPolicy::default());
        assert_eq!(empty.progress().percent, 100.0);
        assert!(!empty.ready_to_switch());
        empty.observe(Sample {
            at: secs(0),
            hydrated_bytes: 0,
            total_bytes: 0,
            hydrating_regions: 0,
            metadata: SampleHealth::Ok,
        });
        assert!(empty.ready_to_switch());

        let mut tracker = started(0);
        assert_eq!(tracker.progress().percent, 0.0);
        tracker.observe(sample(secs(1), TOTAL / 3));
        let third = tracker.progress().percent;
        assert!((third - 100.0 / 3.0).abs() < 1e-6, "{third}");
        assert!(third < 100.0 / 3.0, "{third}");

        // One byte short of a huge total must not read 100.
        let huge = u64::MAX - 1;
        let mut tracker = HydrationTracker::new(huge, StallPolicy::default());
        tracker.observe(Sample {
            at: secs(0),
            hydrated_bytes: huge - 1,
            total_bytes: huge,
            hydrating_regions: 0,
            metadata: SampleHealth::Ok,
        });
        let progress = tracker.progress();
        assert_eq!(progress.percent, PARTIAL_PERCENT_CAP);
        assert!(progress.message.contains("99.9%"), "{}", progress.message);
        assert!(!tracker.ready_to_switch());
    }

    #[test]
    fn switching_needs_everything_hydrated_nothing_in_flight_and_rw_metadata() {
        let mut tracker = started(0);
        let error = tracker.begin_switch().expect_err("not hydrated");
        assert!(error.why.contains("still to be copied"), "{error}");

        tracker.observe(Sample {
            hydrating_regions: 2,
            ..sample(secs(1), TOTAL)
        });
        assert!(!tracker.ready_to_switch());
        let error = tracker.begin_switch().expect_err("copies in flight");
        assert!(error.why.contains("being copied"), "{error}");

        tracker.observe(sample(secs(2), TOTAL));
        assert!(tracker.ready_to_switch());
        assert_eq!(tracker.progress().percent, 100.0);
        assert_eq!(tracker.progress().eta, Some(Duration::ZERO));
        let change = tracker.begin_switch().expect("ready");
        assert_eq!(
            (change.from, change.to),
            (HydrationPhase::Hydrating, HydrationPhase::Switching)
        );
        // Samples are ignored while switching.
        assert_eq!(tracker.observe(sample(secs(3), 0)), None);

        let change = tracker
            .abort_switch(secs(4), "suspend timed out")
            .expect("aborts");
        assert_eq!(change.to, HydrationPhase::Hydrating);
        assert!(
            change.reason.contains("suspend timed out"),
            "{}",
            change.reason
        );
        tracker.begin_switch().expect("still ready");
        let change = tracker.complete(secs(192)).expect("completes");
        assert_eq!(
            (change.from, change.to),
            (HydrationPhase::Switching, HydrationPhase::Complete)
        );
        let progress = tracker.progress();
        assert_eq!(progress.phase, HydrationPhase::Complete);
        assert_eq!(progress.percent, 100.0);
        assert!(
            progress.message.contains("after 3m12s"),
            "{}",
            progress.message
        );
        assert!(tracker.complete(secs(193)).is_err());
        assert!(tracker.begin_switch().is_err());
        assert_eq!(tracker.fail("late"), None);
    }

    #[test]
    fn completing_without_a_switch_is_refused() {
        let mut tracker = started(TOTAL);
        let error = tracker.complete(secs(1)).expect_err("not switching");
        assert_eq!(error.phase, HydrationPhase::Hydrating);
        assert!(tracker.abort_switch(secs(1), "x").is_err());
    }

    #[test]
    fn read_only_metadata_blocks_the_switch_even_when_hydrated() {
        let mut tracker = HydrationTracker::new(TOTAL, StallPolicy::default());
        tracker.observe(Sample {
            metadata: SampleHealth::ReadOnly,
            ..sample(secs(0), TOTAL)
        });
        assert!(!tracker.ready_to_switch());
        assert!(tracker.begin_switch().is_err());
    }

    #[test]
    fn samples_come_from_status_lines() {
        let line: CloneStatusLine =
            "0 131068 clone 8 72/1024 16 4096/8192 3 0 4 hydration_threshold 1 hydration_batch_size 1 rw"
                .parse()
                .expect("a status line from the VM's shape");
        let sample = Sample::from_status(secs(7), &line).expect("active");
        assert_eq!(sample.at, secs(7));
        assert_eq!(sample.total_bytes, 131_068 * 512);
        assert_eq!(sample.hydrated_bytes, 4096 * 16 * 512);
        assert_eq!(sample.hydrating_regions, 3);
        assert_eq!(sample.metadata, SampleHealth::Ok);

        let ro: CloneStatusLine =
            "0 131068 clone 8 72/1024 16 4096/8192 0 0 4 hydration_threshold 1 hydration_batch_size 1 ro"
                .parse()
                .expect("parses");
        assert_eq!(
            Sample::from_status(secs(0), &ro).map(|s| s.metadata),
            Some(SampleHealth::ReadOnly)
        );
        let fail: CloneStatusLine = "0 131068 clone Fail".parse().expect("parses");
        assert!(matches!(
            Sample::from_status(secs(0), &fail).map(|s| s.metadata),
            Some(SampleHealth::Failed(_))
        ));
        let error: CloneStatusLine = "0 131068 clone Error".parse().expect("parses");
        assert_eq!(Sample::from_status(secs(0), &error), None);
    }

    #[test]
    fn progress_serializes_and_deserializes() {
        let mut tracker = started(0);
        tracker.observe(sample(secs(10), 100 * MIB));
        let progress = tracker.progress();
        let json = serde_json::to_value(&progress).expect("serializes");
        assert_eq!(json["phase"], "Hydrating");
        assert_eq!(json["hydrated_bytes"], 100 * MIB);
        let back: Progress = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, progress);
    }

    #[test]
    fn start_is_idempotent_while_hydrating() {
        let mut tracker = started(0);
        assert_eq!(tracker.start(secs(5)), Ok(None));
        // The stall clock was not moved by the second start.
        assert_eq!(
            tracker.observe(sample(secs(30), 0)).map(|c| c.to),
            Some(HydrationPhase::Stalled)
        );
    }
}
