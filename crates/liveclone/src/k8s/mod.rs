//! Kubernetes mode: the custom resources through which the controller agent,
//! the node agents and users share state (see docs/ARCHITECTURE.md,
//! "Kubernetes mode: resources").
//!
//! * [`hydration`]: `VolumeHydration`, one per clone, in the namespace of the
//!   clone's claim: what users watch with `kubectl get vh` and edit to pause,
//!   resume or tune a hydration.
//! * [`volume`]: the cluster-scoped `LivecloneVolume` and `LivecloneSnapshot`,
//!   the per-volume and per-snapshot state that the owning node reconciles.
//! * [`capacity`]: the cluster-scoped `LivecloneNode`, each node's device
//!   classes and their free space, published by the node agent and read by
//!   the controller agent for GetCapacity.
//! * [`crds`]: the CustomResourceDefinitions of all four, as written by
//!   `liveclone crdgen` into `deploy/crds/` and the chart.
//! * [`node`]: the node agent's hydration reconciler, which makes the
//!   VolumeHydrations of its node reflect and control its hydrations.
//!
//! The Rust types are the single definition: the CRD schemas, printer
//! columns and validation are derived from them, so the YAML can never say
//! something the agents do not read.

pub mod capacity;
pub mod controller;
pub mod crds;
pub mod hydration;
pub mod node;
mod schema;
pub mod volume;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

pub use capacity::{DeviceClassStatus, LivecloneNode, LivecloneNodeSpec, LivecloneNodeStatus};
pub use hydration::{
    HydrationDestination, HydrationSource, HydrationTunablesSpec, SourceKind, VolumeHydration,
    VolumeHydrationSpec, VolumeHydrationStatus,
};
pub use volume::{
    AccessMode, LivecloneSnapshot, LivecloneSnapshotSpec, LivecloneSnapshotStatus, LivecloneVolume,
    LivecloneVolumeSpec, LivecloneVolumeStatus, ObjectName, VolumeAccess, VolumeContentSource,
    VolumePhase,
};

/// The API group of every liveclone resource.
pub const GROUP: &str = "liveclone.io";
/// Their only version so far. `v1alpha1` because the shapes may still
/// change before the agents have run in real clusters.
pub const VERSION: &str = "v1alpha1";

/// Field manager of the node agent's server-side applies (status of the
/// volumes, snapshots and hydrations it owns, and its LivecloneNode). Distinct managers make
/// `managedFields` say which agent wrote what.
pub const NODE_FIELD_MANAGER: &str = "liveclone-node";
/// Field manager of the controller agent's server-side applies (specs).
pub const CONTROLLER_FIELD_MANAGER: &str = "liveclone-controller";

/// Label that names the node of a VolumeHydration (value:
/// [`node_label_value`] of `spec.node`), set by whoever creates one (the
/// controller agent). Custom resources cannot be field-selected on
/// `spec.node`, so without a label every node agent would have to watch
/// every VolumeHydration of the cluster, status writes of all the other
/// nodes included; with it each node's watch carries its own objects only.
/// `spec.node` stays the authority: agents check it on what they receive.
pub const NODE_LABEL: &str = "liveclone.io/node";

/// Finalizer on every LivecloneVolume and LivecloneSnapshot, set by the
/// controller agent when it creates the object and removed by the node
/// agent of `spec.node` once the node's storage for it is gone (or handed
/// to the node's own records, as a deleted source's image is while clones
/// still copy from it). So deleting the object (DeleteVolume,
/// DeleteSnapshot) never leaves storage behind on the node, whichever agent
/// was down at the time.
pub const STORAGE_FINALIZER: &str = "liveclone.io/storage";

/// Condition type on LivecloneVolume and LivecloneSnapshot status: True
/// when the object exists on its node as the spec says. When the node
/// cannot make it, False with the reason the engine's error code
/// ([`crate::domain::error::ErrorCode::as_str`], e.g. `OutOfRange`), which
/// the controller agent returns to the CO as that gRPC code, and the
/// engine's message.
pub const READY_CONDITION: &str = "Ready";

/// Longest label value Kubernetes accepts.
const LABEL_VALUE_MAX: usize = 63;

/// The [`NODE_LABEL`] value for `node`: the node name itself when it fits
/// a label value (63 characters; node names may have up to 253), else its
/// first characters and a hash of the whole name, so that long names that
/// share a prefix still get different values.
pub fn node_label_value(node: &str) -> String {
    bounded_name(node, LABEL_VALUE_MAX)
}

/// `name` if it has at most `max` bytes, else a prefix of it, `-`, and 16
/// hex digits of its SHA-256 (at most `max` bytes in all, `max` >= 17). The
/// prefix is cut back to end on an ASCII letter or digit, as label values
/// and most Kubernetes name fields require.
pub(crate) fn bounded_name(name: &str, max: usize) -> String {
    use sha2::{Digest, Sha256};
    if name.len() <= max {
        return name.to_owned();
    }
    let digest = Sha256::digest(name.as_bytes());
    let hash: String = digest
        .iter()
        .take(8)
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let mut end = max.saturating_sub(hash.len() + 1).min(name.len());
    while end > 0 && !name.is_char_boundary(end) {
        end -= 1;
    }
    let prefix = name[..end].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if prefix.is_empty() {
        hash
    } else {
        format!("{prefix}-{hash}")
    }
}

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
        assert_eq!(LivecloneNode::group(&()), GROUP);
        assert_eq!(LivecloneNode::version(&()), VERSION);
    }

    #[test]
    fn node_label_values_fit_a_label() {
        assert_eq!(node_label_value("node-1"), "node-1");
        let exact = "n".repeat(63);
        assert_eq!(node_label_value(&exact), exact);
        let long = format!("{}.compute.internal", "ip-10-0-0-1.".repeat(20));
        let value = node_label_value(&long);
        assert!(value.len() <= 63, "{value}");
        assert!(value.starts_with("ip-10-0-0-1.ip-10"), "{value}");
        assert!(value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')));
        assert!(value.ends_with(|c: char| c.is_ascii_alphanumeric()));
        // Same prefix, different names: different values.
        let other = format!("{long}x");
        assert_ne!(node_label_value(&other), value);
        assert_eq!(node_label_value(&long), value, "stable");
        // A prefix that would end on a dot or dash is cut back.
        let cut = bounded_name(&format!("ab.{}", "c".repeat(40)), 20);
        assert!(cut.starts_with("ab-") && cut.len() == 19, "{cut}");
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
