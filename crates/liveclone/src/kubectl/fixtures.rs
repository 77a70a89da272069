//! Objects the plugin's unit tests build: one clone's VolumeHydration as
//! the controller agent writes it, so every test starts from the same shape.

use crate::k8s::{
    HydrationDestination, HydrationSource, SourceKind, VolumeHydration, VolumeHydrationSpec,
};

/// The VolumeHydration of claim `pvc` in namespace `team`, cloned from the
/// claim `data` on `node-a`, without a status.
pub(super) fn clone_hydration(pvc: &str, paused: bool) -> VolumeHydration {
    let mut vh = VolumeHydration::new(
        pvc,
        VolumeHydrationSpec {
            pvc: pvc.to_owned(),
            source: HydrationSource {
                kind: SourceKind::PersistentVolumeClaim,
                name: "data".to_owned(),
                namespace: None,
                volume_handle: Some("vol-src".to_owned()),
                snapshot_handle: None,
            },
            destination: HydrationDestination {
                volume_handle: "vol-clone".to_owned(),
                persistent_volume_name: "pv-clone".to_owned(),
            },
            node: "node-a".to_owned(),
            tunables: None,
            paused,
        },
    );
    vh.metadata.namespace = Some("team".to_owned());
    vh
}
