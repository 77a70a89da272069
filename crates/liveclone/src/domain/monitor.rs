//! The hydration monitor: follows every hydrating clone on the node.
//!
//! One loop samples each clone's no-flush status and feeds a
//! [`HydrationTracker`] (rate, ETA, phase, stall detection); it wakes on a
//! timer (the backstop) or when a device-mapper event arrives (hydration
//! complete, metadata mode change), which a small waiter task per clone
//! watches for. When a clone is complete the monitor asks the engine to
//! switch it to a linear table; if the engine is busy with another call for
//! that volume, it tries again on the next round.
//!
//! Each round first starts the copies that wait for it: a new file-system
//! clone is ready before its trim (which walks the whole file system, so
//! CreateVolume leaves it out), and a redirect cut leaves its volume
//! reading from the image; the monitor trims them and enables hydration
//! ([`Engine::start_hydration`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::domain::engine::{dm_name, Engine};
use crate::domain::error::{DomainError, ErrorCode};
use crate::domain::hydration::{
    HydrationPhase, HydrationTracker, PhaseChange, Sample, StallPolicy,
};
use crate::domain::ids::VolumeId;

#[derive(Debug, Clone, Copy)]
pub struct MonitorConfig {
    /// How often every clone is sampled even without events.
    pub poll_interval: Duration,
    /// No progress for this long while work remains is a stall.
    pub stall_after: Duration,
    /// How long one device-mapper event wait lasts before it is renewed.
    pub event_wait: Duration,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(2),
            stall_after: Duration::from_secs(30),
            event_wait: Duration::from_secs(10),
        }
    }
}

struct Followed {
    tracker: HydrationTracker,
    waiter: JoinHandle<()>,
    paused: bool,
}

impl Drop for Followed {
    fn drop(&mut self) {
        self.waiter.abort();
    }
}

/// Runs until `shutdown` turns true.
pub async fn run(engine: Arc<Engine>, config: MonitorConfig, mut shutdown: watch::Receiver<bool>) {
    let origin = Instant::now();
    let events = Arc::new(Notify::new());
    let mut followed: BTreeMap<VolumeId, Followed> = BTreeMap::new();
    let mut awaiting_since: BTreeMap<VolumeId, Instant> = BTreeMap::new();
    loop {
        start_hydrations(&engine, &config, &mut awaiting_since).await;
        let hydrating = {
            let engine = Arc::clone(&engine);
            match tokio::task::spawn_blocking(move || engine.hydrating_volumes()).await {
                Ok(Ok(list)) => list,
                Ok(Err(e)) => {
                    warn!("monitor: listing hydrating volumes: {e}");
                    Vec::new()
                }
                Err(e) => {
                    warn!("monitor: listing task failed: {e}");
                    Vec::new()
                }
            }
        };
        followed.retain(|id, _| {
            let keep = hydrating.iter().any(|(h, _)| h == id);
            if let (false, Some(metrics)) = (keep, engine.metrics()) {
                metrics.forget_hydration(id.as_str());
            }
            keep
        });
        for (id, _) in &hydrating {
            round(&engine, &config, origin, &events, &mut followed, id).await;
        }
        {
            // Retries image releases that failed after the call that
            // freed them had already answered.
            let engine = Arc::clone(&engine);
            let _ = tokio::task::spawn_blocking(move || engine.collect_images()).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(config.poll_interval) => {}
            _ = events.notified() => debug!("monitor: device-mapper event"),
            changed = shutdown.changed() => {
                // A dropped sender can never say "stop" again: stop now
                // rather than go round without a pause.
                if changed.is_err() {
                    return;
                }
            }
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// Trims and starts the copy of volumes that wait for it: new file-system
/// clones and volumes a redirect cut left reading from their image. A
/// volume held by a CO call waits for the next round.
///
/// A volume is started only once it has waited one poll interval since
/// this loop first saw it: a NodeStage usually follows CreateVolume within
/// moments, and a private trim mount taken in between would hold that
/// stage up for the whole trim (the very wait CreateVolume no longer has),
/// while a round later the trim goes through the pod's mount. Without a
/// pod the copy starts a round or two after the clone was created.
async fn start_hydrations(
    engine: &Arc<Engine>,
    config: &MonitorConfig,
    awaiting_since: &mut BTreeMap<VolumeId, Instant>,
) {
    let waiting = {
        let engine = Arc::clone(engine);
        blocking(move || engine.awaiting_hydration_start()).await
    };
    let waiting = match waiting {
        Ok(list) => list,
        Err(e) => {
            warn!("monitor: listing volumes that await their copy: {e}");
            return;
        }
    };
    let now = Instant::now();
    awaiting_since.retain(|id, _| waiting.contains(id));
    for id in waiting {
        let since = *awaiting_since.entry(id.clone()).or_insert(now);
        if now.duration_since(since) < config.poll_interval {
            debug!(volume = %id, "hydration start left to the next round");
            continue;
        }
        let started = {
            let (engine, id) = (Arc::clone(engine), id.clone());
            blocking(move || engine.start_hydration(&id)).await
        };
        match started {
            Ok(()) => {}
            Err(e) if e.code == ErrorCode::Aborted => {
                debug!(volume = %id, "hydration start postponed: {e}")
            }
            Err(e) => warn!(volume = %id, "starting hydration: {e}"),
        }
    }
}

async fn blocking<T: Send + 'static>(
    job: impl FnOnce() -> Result<T, DomainError> + Send + 'static,
) -> Result<T, DomainError> {
    tokio::task::spawn_blocking(job)
        .await
        .unwrap_or_else(|e| Err(DomainError::internal(format!("task failed: {e}"))))
}

async fn round(
    engine: &Arc<Engine>,
    config: &MonitorConfig,
    origin: Instant,
    events: &Arc<Notify>,
    followed: &mut BTreeMap<VolumeId, Followed>,
    id: &VolumeId,
) {
    let sample = {
        let (engine, id) = (Arc::clone(engine), id.clone());
        blocking(move || engine.sample_hydration(&id)).await
    };
    let sample = match sample {
        Ok(Some(sample)) => sample,
        Ok(None) => return,
        Err(e) => {
            warn!(volume = %id, "monitor: reading hydration status: {e}");
            return;
        }
    };
    let now = origin.elapsed();
    let Some(observed) = Sample::from_status(now, &sample.status) else {
        return;
    };
    let entry = followed.entry(id.clone()).or_insert_with(|| {
        let mut tracker = HydrationTracker::new(
            observed.total_bytes,
            StallPolicy {
                stall_after: config.stall_after,
            },
        );
        // The first reading seeds the rate window before the start: what it
        // shows hydrated was discarded by the trim (or copied before a
        // restart), not copied at the rate about to be measured.
        let _ = tracker.observe(observed.clone());
        if let Err(e) = tracker.start(now) {
            warn!(volume = %id, "monitor: {e}");
        }
        info!(volume = %id, "following hydration");
        Followed {
            tracker,
            waiter: spawn_event_waiter(Arc::clone(engine), id.clone(), *config, Arc::clone(events)),
            paused: false,
        }
    });
    if entry.paused != sample.paused {
        entry.paused = sample.paused;
        entry.tracker.set_paused(sample.paused, now);
    }
    log_change(id, entry.tracker.observe(observed));
    engine.publish_progress(id, entry.tracker.progress());
    if !entry.tracker.ready_to_switch() {
        return;
    }
    log_change(id, entry.tracker.begin_switch().ok());
    engine.publish_progress(id, entry.tracker.progress());
    let switched = {
        let (engine, id) = (Arc::clone(engine), id.clone());
        blocking(move || engine.complete_hydration(&id)).await
    };
    match switched {
        Ok(true) => {
            log_change(id, entry.tracker.complete(origin.elapsed()).ok());
            engine.publish_progress(id, entry.tracker.progress());
            followed.remove(id);
            return;
        }
        Ok(false) => debug!(volume = %id, "not ready to switch yet"),
        Err(e) if e.code == ErrorCode::Aborted => debug!(volume = %id, "switch postponed: {e}"),
        Err(e) => warn!(volume = %id, "switching to linear: {e}"),
    }
    let reason = "the clone was not ready or the engine was busy";
    log_change(
        id,
        entry.tracker.abort_switch(origin.elapsed(), reason).ok(),
    );
    engine.publish_progress(id, entry.tracker.progress());
}

/// Phase changes go to the log at a level that matches their weight.
fn log_change(id: &VolumeId, change: Option<PhaseChange>) {
    let Some(change) = change else {
        return;
    };
    match change.to {
        HydrationPhase::Stalled | HydrationPhase::Failed => {
            warn!(volume = %id, from = %change.from, to = %change.to, "hydration {}: {}", change.to, change.reason);
        }
        _ => {
            info!(volume = %id, from = %change.from, to = %change.to, "hydration {}: {}", change.to, change.reason)
        }
    }
}

/// Waits for device-mapper events on one clone and wakes the monitor.
fn spawn_event_waiter(
    engine: Arc<Engine>,
    id: VolumeId,
    config: MonitorConfig,
    events: Arc<Notify>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let name = dm_name(&id);
        loop {
            let waited = {
                let (engine, name) = (Arc::clone(&engine), name.clone());
                tokio::task::spawn_blocking(move || {
                    let dm = &engine.os().dm;
                    let Some(info) = dm.info(&name)? else {
                        return Ok(None);
                    };
                    dm.wait_event(&name, info.event_nr, config.event_wait)
                })
                .await
            };
            match waited {
                Ok(Ok(Some(_))) => events.notify_one(),
                // A wait that timed out already took `event_wait`; a device
                // that is not there (yet, or any more) returns at once, and
                // must not be asked about again without a pause.
                Ok(Ok(None)) => {
                    tokio::time::sleep(config.poll_interval.min(config.event_wait)).await
                }
                Ok(Err(e)) => {
                    debug!(volume = %id, "waiting for device-mapper events: {e}");
                    tokio::time::sleep(config.poll_interval).await;
                }
                Err(_) => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stops_when_nobody_can_tell_it_to_stop_any_more() {
        let node = crate::grpc::testkit::Node::new();
        let (stop, stopped) = watch::channel(false);
        let monitor = tokio::spawn(run(
            Arc::clone(&node.engine),
            MonitorConfig::default(),
            stopped,
        ));
        drop(stop);
        tokio::time::timeout(Duration::from_secs(5), monitor)
            .await
            .expect("the monitor returns instead of going round without a pause")
            .expect("the monitor does not panic");
    }
}
