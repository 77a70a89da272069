//! Kubernetes mode: the custom resources through which the controller agent,
//! the node agents and users share state (see docs/ARCHITECTURE.md,
//! "Kubernetes mode: resources").
//!
//! * [`hydration`]: `VolumeHydration`, one per clone, in the namespace of the
//!   clone's claim: what users watch with `kubectl get vh` and edit to pause,
//!   resume or tune a hydration.
//! * [`volume`]: the cluster-scoped `LivecloneVolume` and `LivecloneSnapshot`,
//!   the per-volume and per-snapshot state that the owning node reconciles.
//! * [`crds`]: the CustomResourceDefinitions of all three, as written by
//!   `liveclone crdgen` into `deploy/crds/` and the chart.
//!
//! The Rust types are the single definition: the CRD schemas, printer
//! columns and validation are derived from them, so the YAML can never say
//! something the agents do not read.

pub mod crds;
pub mod hydration;
mod schema;
pub mod volume;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

pub use hydration::{
    HydrationDestination, HydrationSource, HydrationTunablesSpec, SourceKind, VolumeHydration,
    VolumeHydrationSpec, VolumeHydrationStatus,
};
pub use volume::{
    AccessMode, LivecloneSnapshot, LivecloneSnapshotSpec, LivecloneSnapshotStatus, LivecloneVolume,
    LivecloneVolumeSpec, LivecloneVolumeStatus, VolumeAccess, VolumeContentSource, VolumePhase,
};

/// The API group of every liveclone resource.
pub const GROUP: &str = "liveclone.io";
/// Their only version so far. `v1alpha1` because the shapes may still
/// change before the agents have run in real clusters.
pub const VERSION: &str = "v1alpha1";

/// Field manager of the node agent's server-side applies (status of the
/// volumes, snapshots and hydrations it owns). Distinct managers make
/// `managedFields` say which agent wrote what.
pub const NODE_FIELD_MANAGER: &str = "liveclone-node";
/// Field manager of the controller agent's server-side applies (specs).
pub const CONTROLLER_FIELD_MANAGER: &str = "liveclone-controller";

/// Condition status values (metav1 `ConditionStatus`).
pub const CONDITION_TRUE: &str = "True";
pub const CONDITION_FALSE: &str = "False";

/// A Kubernetes time from Unix seconds, as the domain records keep them;
/// `None` for a value outside the range Kubernetes can represent.
pub fn time_from_unix_seconds(seconds: u64) -> Option<Time> {
    let seconds = i64::try_from(seconds).ok()?;
    Timestamp::from_second(seconds).ok().map(Time)
}

/// The current time, for condition transition times.
pub fn now() -> Time {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        // A clock before 1970 is broken; the epoch is as good a guess as any.
        .unwrap_or(0);
    time_from_unix_seconds(seconds).unwrap_or(Time(Timestamp::UNIX_EPOCH))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    #[test]
    fn the_derives_use_the_group_and_version_constants() {
        // The derive attributes need literals; this keeps them and the
        // constants the agents use in step.
        assert_eq!(VolumeHydration::group(&()), GROUP);
        assert_eq!(VolumeHydration::version(&()), VERSION);
        assert_eq!(LivecloneVolume::group(&()), GROUP);
        assert_eq!(LivecloneVolume::version(&()), VERSION);
        assert_eq!(LivecloneSnapshot::group(&()), GROUP);
        assert_eq!(LivecloneSnapshot::version(&()), VERSION);
    }

    #[test]
    fn unix_seconds_become_rfc3339_times() {
        let time = time_from_unix_seconds(1_700_000_000).expect("in range");
        assert_eq!(
            serde_json::to_value(&time).expect("serializes"),
            serde_json::json!("2023-11-14T22:13:20Z")
        );
        assert_eq!(time_from_unix_seconds(u64::MAX), None);
    }
}
