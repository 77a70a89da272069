use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::*;
use crate::k8s::volume::{
    AccessMode, LivecloneSnapshotStatus, LivecloneVolumeStatus, VolumeAccess,
};
use crate::k8s::{now, CONDITION_FALSE, CONDITION_TRUE};

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: now(),
        observed_generation: None,
    }
}

fn volume(status: Option<LivecloneVolumeStatus>) -> LivecloneVolume {
    let id = VolumeId::for_name("pvc-1").expect("valid name");
    let mut object = LivecloneVolume::new(
        id.as_str(),
        LivecloneVolumeSpec {
            name: "pvc-1".to_owned(),
            node: "node-a".to_owned(),
            capacity_bytes: 1 << 30,
            access: VolumeAccess {
                mode: AccessMode::Block,
                fs_type: None,
            },
            content_source: None,
            parameters: BTreeMap::new(),
            claim: None,
            pool: DEFAULT_POOL.to_owned(),
        },
    );
    object.status = status;
    object
}

#[test]
fn a_node_failure_is_its_ready_condition_turned_back_into_a_code() {
    let failed = [condition(
        READY_CONDITION,
        CONDITION_FALSE,
        "OutOfRange",
        "the source holds 2 GiB",
    )];
    let error = node_failure(&failed).expect("a failure");
    assert_eq!(error.code, ErrorCode::OutOfRange);
    assert_eq!(error.message, "the source holds 2 GiB");
    // Ready, or a reason that is not a code: no failure to report.
    assert!(node_failure(&[condition(READY_CONDITION, CONDITION_TRUE, "Created", "")]).is_none());
    assert!(node_failure(&[condition(READY_CONDITION, CONDITION_FALSE, "Working", "")]).is_none());
    assert!(node_failure(&[]).is_none());
}

#[test]
fn only_ready_volumes_are_visible_with_their_node_and_condition() {
    assert!(volume_info(&volume(None)).is_none());
    let creating = LivecloneVolumeStatus {
        phase: Some(VolumePhase::Creating),
        ..LivecloneVolumeStatus::default()
    };
    assert!(volume_info(&volume(Some(creating))).is_none());
    let ready = LivecloneVolumeStatus {
        phase: Some(VolumePhase::Ready),
        capacity_bytes: Some(2 << 30),
        conditions: vec![condition(
            ABNORMAL_CONDITION,
            CONDITION_TRUE,
            "Stalled",
            "no progress for 30 s",
        )],
        ..LivecloneVolumeStatus::default()
    };
    let info = volume_info(&volume(Some(ready.clone()))).expect("visible");
    assert_eq!(info.node, "node-a");
    assert_eq!(info.capacity_bytes, 2 << 30, "the node's size wins");
    assert_eq!(info.access, AccessKind::Block);
    assert_eq!(info.abnormal.as_deref(), Some("no progress for 30 s"));
    let mut being_deleted = volume(Some(ready));
    being_deleted.metadata.deletion_timestamp = Some(now());
    assert!(volume_info(&being_deleted).is_none());
}

#[test]
fn snapshots_are_visible_once_cut() {
    let id = SnapshotId::for_name("snap-1").expect("valid name");
    let source = VolumeId::for_name("pvc-1").expect("valid name");
    let mut object = LivecloneSnapshot::new(
        id.as_str(),
        LivecloneSnapshotSpec {
            name: "snap-1".to_owned(),
            source_volume: source.to_string(),
            node: "node-a".to_owned(),
            access: VolumeAccess {
                mode: AccessMode::Block,
                fs_type: None,
            },
            volume_snapshot: None,
        },
    );
    assert!(snapshot_info(&object).is_none());
    object.status = Some(LivecloneSnapshotStatus {
        ready_to_use: Some(false),
        size_bytes: Some(1 << 30),
        creation_time: crate::k8s::time_from_unix_seconds(1_700_000_000),
        ..LivecloneSnapshotStatus::default()
    });
    let info = snapshot_info(&object).expect("cut");
    assert_eq!(info.id, id);
    assert_eq!(info.source_volume, source);
    assert_eq!(info.created_at, 1_700_000_000);
    assert!(!info.ready_to_use, "cut but still copying");
    let _: Option<Time> = None;
}

#[test]
fn api_errors_keep_their_meaning() {
    let api = |code: u16| {
        kube::Error::Api(
            kube::core::Status::failure("refused", "Reason")
                .with_code(code)
                .boxed(),
        )
    };
    assert_eq!(api_error("x", api(422)).code, ErrorCode::InvalidArgument);
    assert_eq!(api_error("x", api(404)).code, ErrorCode::NotFound);
    assert_eq!(api_error("x", api(409)).code, ErrorCode::Aborted);
    let forbidden = api_error("x", api(403));
    assert_eq!(forbidden.code, ErrorCode::Internal);
    assert!(forbidden.message.contains("RBAC"), "{}", forbidden.message);
    assert_eq!(api_error("x", api(503)).code, ErrorCode::Unavailable);
}
