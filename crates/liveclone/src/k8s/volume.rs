//! `LivecloneVolume` and `LivecloneSnapshot`: cluster-scoped, named by the
//! CSI volume or snapshot ID, the state that the controller agent and the
//! node agent owning the storage share. The controller writes the spec (what
//! should exist, on which node); that node's agent makes it so on its devices
//! and reports in the status.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::schema;
use crate::domain::model::{AccessKind, ContentSource, VolumeState};
use crate::os::fs::FsType;

/// The device class a volume's storage comes from when the StorageClass
/// names none.
pub const DEFAULT_POOL: &str = crate::domain::device_class::DEFAULT_CLASS;

fn default_pool() -> String {
    DEFAULT_POOL.to_owned()
}

/// A volume that should exist on a node.
// A transition rule on an optional field only runs when both the old and
// the new object have it, so adding or removing contentSource is refused
// here, one level up.
// Clippy takes the repeated `type_ = "string"` of the printer columns
// inside `#[kube(...)]` for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "liveclone.io",
    version = "v1alpha1",
    kind = "LivecloneVolume",
    plural = "liveclonevolumes",
    shortname = "lcvol",
    category = "liveclone",
    status = "LivecloneVolumeStatus",
    derive = "PartialEq",
    doc = "A liveclone volume, named by its CSI volume ID. The controller agent writes the \
           spec; the node agent of spec.node makes the volume on its storage and writes the \
           status. Kept until the volume's data is no longer needed, including by clones \
           still copying from it.",
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".spec.node",
        description = "The node whose storage holds the volume"
    ),
    printcolumn(
        name = "Size",
        type_ = "integer",
        json_path = ".spec.capacityBytes",
        description = "Requested size in bytes"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Creating, Ready, Failed or Deleting"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Mode",
        type_ = "string",
        json_path = ".spec.access.mode",
        priority = 1
    ),
    printcolumn(
        name = "Pool",
        type_ = "string",
        json_path = ".spec.pool",
        priority = 1
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.contentSource) == has(oldSelf.contentSource)",
    "message": "contentSource cannot be added or removed"
}]))]
pub struct LivecloneVolumeSpec {
    /// The name the CO gave in CreateVolume; the volume ID (this object's
    /// name) is derived from it, and the node needs it to make the volume
    /// exactly as a standalone CreateVolume would.
    #[schemars(length(min = 1, max = schema::CSI_NAME_MAX), extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "name is immutable"}
    ]))]
    pub name: String,
    /// The node whose storage holds the volume.
    #[schemars(length(min = 1, max = schema::NAME_MAX), extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "node is immutable"}
    ]))]
    pub node: String,
    /// Size in bytes; it only grows (expansion).
    #[schemars(range(min = 1), extend("x-kubernetes-validations" = [
        {"rule": "self >= oldSelf", "message": "capacityBytes cannot shrink"}
    ]))]
    pub capacity_bytes: u64,
    /// How the volume is consumed.
    pub access: VolumeAccess,
    /// The volume or snapshot whose data the volume starts with; unset for
    /// an empty volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "contentSource is immutable"}
    ]))]
    pub content_source: Option<VolumeContentSource>,
    /// The StorageClass parameters the volume was made with.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
    /// The PersistentVolumeClaim the volume was provisioned for (from the
    /// provisioner's `--extra-create-metadata`): where the VolumeHydration of
    /// a clone goes and what it names as its source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<ObjectName>,
    /// The node's device class that holds the volume (the StorageClass's
    /// `liveclone.io/deviceClass`, `file` without it).
    #[serde(default = "default_pool")]
    #[schemars(length(min = 1, max = schema::NAMESPACE_MAX))]
    pub pool: String,
}

/// A namespaced object's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectName {
    #[schemars(length(min = 1, max = schema::NAMESPACE_MAX))]
    pub namespace: String,
    #[schemars(length(min = 1, max = schema::NAME_MAX))]
    pub name: String,
}

/// Filesystem or Block, as a claim's volumeMode says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AccessMode {
    /// Mounted with a file system the driver makes (fsType).
    Filesystem,
    /// A raw block device.
    Block,
}

/// How a volume is consumed: the API form of the driver's `AccessKind`.
/// Immutable.
// The rules are on the type rather than on the `access` field because a
// field's `x-kubernetes-validations` would replace the type's, not add to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.mode == 'Filesystem' ? has(self.fsType) : !has(self.fsType)",
        "message": "fsType is required for mode Filesystem and not allowed for mode Block"
    },
    {"rule": "self == oldSelf", "message": "access is immutable"}
]))]
pub struct VolumeAccess {
    pub mode: AccessMode,
    /// The file system, for mode Filesystem: ext4 or xfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::fs_type")]
    pub fs_type: Option<FsType>,
}

impl From<AccessKind> for VolumeAccess {
    fn from(kind: AccessKind) -> Self {
        match kind {
            AccessKind::Block => VolumeAccess {
                mode: AccessMode::Block,
                fs_type: None,
            },
            AccessKind::Filesystem { fs } => VolumeAccess {
                mode: AccessMode::Filesystem,
                fs_type: Some(fs),
            },
        }
    }
}

/// A `VolumeAccess` that the schema would have refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("access mode {mode:?} with fsType {fs_type:?}: Filesystem needs an fsType, Block has none")]
pub struct InvalidAccess {
    pub mode: AccessMode,
    pub fs_type: Option<FsType>,
}

impl TryFrom<VolumeAccess> for AccessKind {
    type Error = InvalidAccess;

    fn try_from(access: VolumeAccess) -> Result<Self, Self::Error> {
        match (access.mode, access.fs_type) {
            (AccessMode::Block, None) => Ok(AccessKind::Block),
            (AccessMode::Filesystem, Some(fs)) => Ok(AccessKind::Filesystem { fs }),
            (mode, fs_type) => Err(InvalidAccess { mode, fs_type }),
        }
    }
}

/// The kinds of data a volume can start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ContentSourceKind {
    /// Another volume (a clone of it).
    Volume,
    /// A snapshot (a restore of it).
    Snapshot,
}

/// The data a volume starts with: the API form of the driver's
/// `ContentSource`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeContentSource {
    pub kind: ContentSourceKind,
    /// CSI volume or snapshot ID (a LivecloneVolume's or LivecloneSnapshot's
    /// name).
    #[schemars(length(min = 1, max = schema::CSI_ID_MAX))]
    pub id: String,
}

impl From<&ContentSource> for VolumeContentSource {
    fn from(source: &ContentSource) -> Self {
        match source {
            ContentSource::Volume(id) => VolumeContentSource {
                kind: ContentSourceKind::Volume,
                id: id.to_string(),
            },
            ContentSource::Snapshot(id) => VolumeContentSource {
                kind: ContentSourceKind::Snapshot,
                id: id.to_string(),
            },
        }
    }
}

impl TryFrom<&VolumeContentSource> for ContentSource {
    type Error = crate::domain::ids::IdError;

    fn try_from(source: &VolumeContentSource) -> Result<Self, Self::Error> {
        Ok(match source.kind {
            ContentSourceKind::Volume => ContentSource::Volume(source.id.parse()?),
            ContentSourceKind::Snapshot => ContentSource::Snapshot(source.id.parse()?),
        })
    }
}

/// Where a volume is in its life on its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum VolumePhase {
    /// The node is making it (a retry continues from the recorded steps).
    Creating,
    /// It exists and can be staged.
    Ready,
    /// The node could not make it; the message says why.
    Failed,
    /// The node is removing it.
    Deleting,
}

impl From<VolumeState> for VolumePhase {
    fn from(state: VolumeState) -> Self {
        match state {
            VolumeState::Creating => VolumePhase::Creating,
            VolumeState::Ready => VolumePhase::Ready,
            VolumeState::Deleting => VolumePhase::Deleting,
        }
    }
}

/// The owning node's report on a volume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LivecloneVolumeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VolumePhase>,
    /// The size the volume has on the node, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
    /// One sentence for people; for Failed, what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The metadata.generation of the spec this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready: the volume exists on its node as the spec says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["type"]
    ))]
    pub conditions: Vec<Condition>,
}

/// A snapshot that should exist on a node.
// Clippy takes the repeated `type_ = "string"` of the printer columns
// inside `#[kube(...)]` for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "liveclone.io",
    version = "v1alpha1",
    kind = "LivecloneSnapshot",
    plural = "liveclonesnapshots",
    shortname = "lcsnap",
    category = "liveclone",
    status = "LivecloneSnapshotStatus",
    derive = "PartialEq",
    doc = "A liveclone snapshot, named by its CSI snapshot ID. The controller agent writes the \
           spec; the node agent of spec.node cuts the snapshot and writes the status.",
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".spec.sourceVolume",
        description = "CSI volume ID of the snapshotted volume"
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".spec.node",
        description = "The node whose storage holds the snapshot"
    ),
    printcolumn(
        name = "Size",
        type_ = "integer",
        json_path = ".status.sizeBytes",
        description = "Size in bytes"
    ),
    printcolumn(name = "Ready", type_ = "boolean", json_path = ".status.readyToUse"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct LivecloneSnapshotSpec {
    /// The name the CO gave in CreateSnapshot (the snapshot ID is derived
    /// from it).
    #[schemars(length(min = 1, max = schema::CSI_NAME_MAX), extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "name is immutable"}
    ]))]
    pub name: String,
    /// CSI volume ID of the snapshotted volume.
    #[schemars(length(min = 1, max = schema::CSI_ID_MAX), extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "sourceVolume is immutable"}
    ]))]
    pub source_volume: String,
    /// The node whose storage holds the snapshot (the source volume's).
    #[schemars(length(min = 1, max = schema::NAME_MAX), extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "node is immutable"}
    ]))]
    pub node: String,
    /// How the snapshotted volume is consumed; volumes restored from the
    /// snapshot are the same (kept here because the source volume may be
    /// deleted before them).
    pub access: VolumeAccess,
    /// The VolumeSnapshot the snapshot was made for (from the snapshotter's
    /// `--extra-create-metadata`), named as the source of restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot: Option<ObjectName>,
}

/// The owning node's report on a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LivecloneSnapshotStatus {
    /// True once the snapshot can be restored or cloned (CSI ready_to_use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Size in bytes (the source volume's at the cut).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// When the snapshot was cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    /// One sentence for people; when not ready, why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Ready: the snapshot exists on its node and can be used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["type"]
    ))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::{SnapshotId, VolumeId};

    #[test]
    fn access_round_trips_through_the_domain_form() {
        for kind in [
            AccessKind::Block,
            AccessKind::Filesystem { fs: FsType::Ext4 },
            AccessKind::Filesystem { fs: FsType::Xfs },
        ] {
            let access = VolumeAccess::from(kind);
            assert_eq!(AccessKind::try_from(access), Ok(kind));
        }
        let json = serde_json::to_value(VolumeAccess::from(AccessKind::Filesystem {
            fs: FsType::Xfs,
        }))
        .expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({"mode": "Filesystem", "fsType": "xfs"})
        );
        assert!(AccessKind::try_from(VolumeAccess {
            mode: AccessMode::Filesystem,
            fs_type: None
        })
        .is_err());
    }

    #[test]
    fn content_sources_round_trip_and_bad_ids_are_refused() {
        let volume = ContentSource::Volume(VolumeId::for_name("pvc-a").expect("valid"));
        let snapshot = ContentSource::Snapshot(SnapshotId::for_name("snap-a").expect("valid"));
        for source in [volume, snapshot] {
            let api = VolumeContentSource::from(&source);
            assert_eq!(ContentSource::try_from(&api), Ok(source));
        }
        let bad = VolumeContentSource {
            kind: ContentSourceKind::Volume,
            id: "../etc".to_owned(),
        };
        assert!(ContentSource::try_from(&bad).is_err());
    }

    #[test]
    fn the_pool_defaults_to_file_when_absent() {
        let spec: LivecloneVolumeSpec = serde_json::from_value(serde_json::json!({
            "name": "pvc-1",
            "node": "n1",
            "capacityBytes": 1024,
            "access": {"mode": "Block"},
        }))
        .expect("deserializes");
        assert_eq!(spec.pool, DEFAULT_POOL);
        assert!(spec.parameters.is_empty());
        assert_eq!(spec.content_source, None);
    }

    #[test]
    fn every_volume_state_has_a_phase() {
        assert_eq!(
            VolumePhase::from(VolumeState::Creating),
            VolumePhase::Creating
        );
        assert_eq!(VolumePhase::from(VolumeState::Ready), VolumePhase::Ready);
        assert_eq!(
            VolumePhase::from(VolumeState::Deleting),
            VolumePhase::Deleting
        );
    }
}
