//! `LivecloneNode`: cluster-scoped, named by the node, the node's device
//! classes and how much room each has, as the node agent of that node last
//! measured them. The node publishes it every
//! [`DEFAULT_PUBLISH_INTERVAL`] (`--capacity-interval-seconds`); the
//! controller agent reads it to answer GetCapacity, which csi-provisioner
//! (with `--enable-capacity`) turns into CSIStorageCapacity objects that the
//! scheduler consults. Only the node can measure its pools (they are its
//! files, volume groups and kernel), and the controller, which runs
//! anywhere, has no other way to learn their size.
//!
//! Everything is in the status, written by the node (field manager
//! [`NODE_FIELD_MANAGER`](super::NODE_FIELD_MANAGER)); the spec is empty.
//! Figures older than [`STALE_AFTER_INTERVALS`] publish intervals count for
//! nothing (see [`available_bytes`]).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::schema;
use crate::domain::device_class::{DeviceClassName, DEFAULT_CLASS};
use crate::domain::error::DomainResult;
use crate::domain::human::format_bytes;
use crate::domain::pool::PoolCapacity;

/// How often a node agent publishes its LivecloneNode unless told
/// otherwise. Capacity changes as volumes are made and deleted, and the
/// scheduler only needs a recent estimate (csi-provisioner itself polls
/// GetCapacity once a minute by default), so a write per node every 30 s
/// is cheap and fresh enough.
pub const DEFAULT_PUBLISH_INTERVAL: Duration = Duration::from_secs(30);

/// A LivecloneNode whose `observedTime` is older than this many of its own
/// publish intervals is stale: its node agent missed two writes in a row
/// and is most likely down (or the node gone). One missed write is
/// tolerated, so an API server hiccup does not zero a healthy node.
pub const STALE_AFTER_INTERVALS: u32 = 3;

/// Nothing: a LivecloneNode is its node's report, all of it in the status.
// Clippy takes the repeated `type_ = "string"` of the printer columns
// inside `#[kube(...)]` for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "liveclone.io",
    version = "v1alpha1",
    kind = "LivecloneNode",
    plural = "liveclonenodes",
    shortname = "lcnode",
    category = "liveclone",
    status = "LivecloneNodeStatus",
    derive = "PartialEq",
    doc = "A node that runs the liveclone node agent, named by the node: its device classes \
           (named pools) and the room in each, published by that node agent in the status \
           (every 30 s by default). The controller agent answers GetCapacity (storage capacity \
           tracking) from it; figures older than three publish intervals count as nothing.",
    printcolumn(
        name = "Classes",
        type_ = "string",
        json_path = ".status.classes",
        description = "The node's device classes"
    ),
    printcolumn(
        name = "Available",
        type_ = "string",
        json_path = ".status.available",
        description = "Room for new volumes in each class"
    ),
    printcolumn(
        name = "Updated",
        type_ = "date",
        json_path = ".status.observedTime",
        description = "When the node last measured its pools"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct LivecloneNodeSpec {}

/// The node agent's report on its pools.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LivecloneNodeStatus {
    /// Every device class of the node, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"]
    ))]
    pub device_classes: Vec<DeviceClassStatus>,
    /// The class names, comma-separated, for `kubectl get lcnode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<String>,
    /// Room in each class for people, e.g. `file=9.1 GiB, thin=80.0 GiB`
    /// (`?` for a class the node could not measure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<String>,
    /// When the node measured these figures (by its clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_time: Option<Time>,
    /// How often the node publishes, in seconds. Readers take figures older
    /// than three of these intervals for stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub publish_interval_seconds: Option<u64>,
}

/// One device class of the node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceClassStatus {
    /// The class, as StorageClasses name it in `liveclone.io/deviceClass`.
    #[schemars(length(min = 1, max = schema::NAMESPACE_MAX))]
    pub name: String,
    /// The pool behind it, as the node describes it (e.g. `file pool
    /// /var/lib/liveclone/pool`, `LVM thin pool vg0/tp0`).
    #[serde(default)]
    pub pool: String,
    /// The pool's size in bytes.
    #[serde(default)]
    pub total_bytes: u64,
    /// Bytes a new volume of the class may take (what GetCapacity answers);
    /// 0 when the pool could not be measured.
    #[serde(default)]
    pub available_bytes: u64,
    /// Thin pools: how full the data space is, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub data_used_percent: Option<f64>,
    /// Thin pools: how full the metadata space is, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub metadata_used_percent: Option<f64>,
    /// Thin pools: bytes promised to thin volumes and snapshots (their
    /// virtual sizes), which may exceed the pool's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioned_bytes: Option<u64>,
    /// Why the pool could not be measured, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A fraction from 0 to 1 as a percentage with two decimals: finer digits
/// would only make every publish a change, and out-of-range values (a tool
/// reporting nonsense) are clamped rather than published.
fn percent(fraction: f64) -> f64 {
    if !fraction.is_finite() {
        return 0.0;
    }
    (fraction.clamp(0.0, 1.0) * 10_000.0).round() / 100.0
}

/// The status entry of class `name`, whose pool `pool` measured `capacity`.
/// A failed measurement is published with its message and nothing
/// available, rather than left out: the class exists, the CO should not
/// place volumes in it now, and people should see why.
pub fn class_status(
    name: &DeviceClassName,
    pool: String,
    capacity: DomainResult<PoolCapacity>,
) -> DeviceClassStatus {
    match capacity {
        Ok(capacity) => DeviceClassStatus {
            name: name.to_string(),
            pool,
            total_bytes: capacity.total_bytes,
            available_bytes: capacity.available_bytes,
            data_used_percent: capacity.thin.map(|thin| percent(thin.data_used)),
            metadata_used_percent: capacity.thin.map(|thin| percent(thin.metadata_used)),
            provisioned_bytes: capacity.thin.map(|thin| thin.provisioned_bytes),
            error: None,
        },
        Err(error) => DeviceClassStatus {
            name: name.to_string(),
            pool,
            error: Some(error.to_string()),
            ..DeviceClassStatus::default()
        },
    }
}

/// The whole status from the classes' entries, measured at `observed`,
/// published every `interval` (whole seconds, rounded up, at least 1).
pub fn node_status(
    mut classes: Vec<DeviceClassStatus>,
    observed: Time,
    interval: Duration,
) -> LivecloneNodeStatus {
    classes.sort_by(|a, b| a.name.cmp(&b.name));
    let names: Vec<&str> = classes.iter().map(|class| class.name.as_str()).collect();
    let available: Vec<String> = classes
        .iter()
        .map(|class| match class.error {
            Some(_) => format!("{}=?", class.name),
            None => format!("{}={}", class.name, format_bytes(class.available_bytes)),
        })
        .collect();
    let seconds = interval
        .as_secs()
        .saturating_add(u64::from(interval.subsec_nanos() > 0))
        .max(1);
    LivecloneNodeStatus {
        classes: Some(names.join(",")),
        available: Some(available.join(", ")),
        device_classes: classes,
        observed_time: Some(observed),
        publish_interval_seconds: Some(seconds),
    }
}

/// How old a status may be before its figures count for nothing.
pub fn stale_after(status: &LivecloneNodeStatus) -> Duration {
    let interval = status
        .publish_interval_seconds
        .map_or(DEFAULT_PUBLISH_INTERVAL, |seconds| {
            Duration::from_secs(seconds.max(1))
        });
    interval.saturating_mul(STALE_AFTER_INTERVALS)
}

/// Whether the figures of `status` are too old to trust at `now`. A status
/// without a time is stale. A time ahead of `now` (the node's clock runs
/// ahead of the reader's) counts as fresh: the bound is minutes while
/// clocks in a cluster differ by far less, so a skew never decides.
pub fn is_stale(status: &LivecloneNodeStatus, now: Timestamp) -> bool {
    let Some(observed) = &status.observed_time else {
        return true;
    };
    let bound = SignedDuration::try_from(stale_after(status)).unwrap_or(SignedDuration::MAX);
    now.duration_since(observed.0) > bound
}

/// Bytes available for a new volume of `class` (`None`: the default class)
/// on the node of `object`, as of `now`.
///
/// 0 for a class the node does not have or could not measure, and for a
/// node whose figures are stale: its agent stopped publishing, so the
/// node is probably down or gone, and the free space it last saw is no
/// promise. Answering that old number would keep the scheduler sending
/// pods to a node where CreateVolume cannot succeed; 0 steers them to
/// nodes that answer, and the node's next publish restores its figures.
pub fn available_bytes(
    object: &LivecloneNode,
    class: Option<&DeviceClassName>,
    now: Timestamp,
) -> u64 {
    let Some(status) = &object.status else {
        return 0;
    };
    if is_stale(status, now) {
        return 0;
    }
    let class = class.map_or(DEFAULT_CLASS, DeviceClassName::as_str);
    status
        .device_classes
        .iter()
        .find(|entry| entry.name == class && entry.error.is_none())
        .map_or(0, |entry| entry.available_bytes)
}

/// Whether `name` could be the name of a LivecloneNode (a DNS subdomain,
/// as node names are). A topology value that is not cannot name one, and
/// must not be put into a request path.
pub fn is_object_name(name: &str) -> bool {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    name.len() <= schema::NAME_MAX as usize && name.split('.').all(label_ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::error::DomainError;
    use crate::domain::pool::ThinUsage;
    use crate::k8s::time_from_unix_seconds;

    const GIB: u64 = 1 << 30;
    const T0: u64 = 1_700_000_000;

    fn class(name: &str) -> DeviceClassName {
        name.parse().expect("a class name")
    }

    fn at(seconds: u64) -> Time {
        time_from_unix_seconds(seconds).expect("in range")
    }

    fn node(status: Option<LivecloneNodeStatus>) -> LivecloneNode {
        let mut object = LivecloneNode::new("node-a", LivecloneNodeSpec {});
        object.status = status;
        object
    }

    fn measured() -> LivecloneNodeStatus {
        node_status(
            vec![
                class_status(
                    &class("thin"),
                    "LVM thin pool vg0/tp0".to_owned(),
                    Ok(PoolCapacity {
                        total_bytes: 100 * GIB,
                        available_bytes: 80 * GIB,
                        thin: Some(ThinUsage {
                            data_used: 0.2,
                            metadata_used: 0.051_234,
                            provisioned_bytes: 300 * GIB,
                        }),
                    }),
                ),
                class_status(
                    &class("file"),
                    "file pool /var/lib/liveclone/pool".to_owned(),
                    Ok(PoolCapacity {
                        total_bytes: 10 * GIB,
                        available_bytes: 9 * GIB,
                        thin: None,
                    }),
                ),
                class_status(
                    &class("broken"),
                    "LVM thin pool vg1/tp1".to_owned(),
                    Err(DomainError::unavailable("lvs: volume group vg1 not found")),
                ),
            ],
            at(T0),
            Duration::from_secs(30),
        )
    }

    #[test]
    fn the_status_lists_every_class_with_its_figures() {
        let status = measured();
        assert_eq!(status.classes.as_deref(), Some("broken,file,thin"));
        assert_eq!(
            status.available.as_deref(),
            Some("broken=?, file=9.0 GiB, thin=80.0 GiB")
        );
        assert_eq!(status.publish_interval_seconds, Some(30));
        let thin = &status.device_classes[2];
        assert_eq!(thin.data_used_percent, Some(20.0));
        assert_eq!(thin.metadata_used_percent, Some(5.12));
        assert_eq!(thin.provisioned_bytes, Some(300 * GIB));
        let file = &status.device_classes[1];
        assert_eq!(
            (file.total_bytes, file.available_bytes),
            (10 * GIB, 9 * GIB)
        );
        assert_eq!(file.data_used_percent, None);
        // A class that could not be measured is kept, with why and nothing
        // available.
        let broken = &status.device_classes[0];
        assert_eq!(broken.available_bytes, 0);
        assert!(
            broken.error.as_deref().is_some_and(|e| e.contains("vg1")),
            "{broken:?}"
        );
        let json = serde_json::to_value(&status).expect("serializes");
        assert_eq!(json["deviceClasses"][1]["availableBytes"], 9 * GIB);
        assert_eq!(json["observedTime"], "2023-11-14T22:13:20Z");
        assert!(json["deviceClasses"][1].get("dataUsedPercent").is_none());
    }

    #[test]
    fn percentages_are_rounded_and_clamped() {
        assert_eq!(percent(0.123_456), 12.35);
        assert_eq!(percent(1.5), 100.0);
        assert_eq!(percent(-0.1), 0.0);
        assert_eq!(percent(f64::NAN), 0.0);
    }

    #[test]
    fn intervals_are_published_in_whole_seconds() {
        let interval = |d: Duration| node_status(vec![], at(T0), d).publish_interval_seconds;
        assert_eq!(interval(Duration::from_millis(1500)), Some(2));
        assert_eq!(interval(Duration::from_millis(10)), Some(1));
        assert_eq!(interval(Duration::from_secs(30)), Some(30));
    }

    #[test]
    fn a_fresh_status_answers_per_class() {
        let object = node(Some(measured()));
        let now = at(T0 + 10).0;
        assert_eq!(
            available_bytes(&object, Some(&class("thin")), now),
            80 * GIB
        );
        assert_eq!(available_bytes(&object, None, now), 9 * GIB, "file");
        assert_eq!(available_bytes(&object, Some(&class("fast")), now), 0);
        assert_eq!(available_bytes(&object, Some(&class("broken")), now), 0);
        assert_eq!(available_bytes(&node(None), None, now), 0);
    }

    #[test]
    fn stale_figures_answer_nothing() {
        let object = node(Some(measured()));
        // Three intervals of 30 s: still trusted at 90 s, not after.
        assert_eq!(available_bytes(&object, None, at(T0 + 90).0), 9 * GIB);
        assert_eq!(available_bytes(&object, None, at(T0 + 91).0), 0);
        // A node clock ahead of the reader's does not make it stale.
        assert_eq!(available_bytes(&object, None, at(T0 - 60).0), 9 * GIB);
        // No time, or no interval (the default's bound then).
        let mut untimed = measured();
        untimed.observed_time = None;
        assert!(is_stale(&untimed, at(T0).0));
        let mut no_interval = measured();
        no_interval.publish_interval_seconds = None;
        assert_eq!(stale_after(&no_interval), Duration::from_secs(90));
        no_interval.publish_interval_seconds = Some(1);
        assert_eq!(stale_after(&no_interval), Duration::from_secs(3));
    }

    #[test]
    fn only_dns_subdomains_can_name_a_node_object() {
        for good in ["node-a", "ip-10-0-0-1.ec2.internal", "n"] {
            assert!(is_object_name(good), "{good}");
        }
        let long = "a".repeat(254);
        for bad in ["", "Node", "a/b", "..", ".", "a..b", "-a", "a_b", &long] {
            assert!(!is_object_name(bad), "{bad}");
        }
    }
}
