//! A whole engine over the OS simulator, for testing the CSI handlers end to
//! end without root: real files for the pool and the state, simulated
//! devices and mounts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tempfile::TempDir;
use tonic::Request;

use crate::domain::engine::{Engine, EngineConfig};
use crate::domain::file_pool::FilePool;
use crate::domain::model::{SnapshotRecord, VolumeRecord};
use crate::domain::paths::AllowedRoots;
use crate::domain::store::JsonDirStore;
use crate::grpc::controller::ControllerService;
use crate::grpc::node::NodeService;
use crate::os::fake::FakeOs;
use crate::proto::csi::v1::controller_server::Controller as _;
use crate::proto::csi::v1::volume_capability::access_mode::Mode;
use crate::proto::csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use crate::proto::csi::v1::{
    CapacityRange, CreateSnapshotRequest, CreateVolumeRequest, Snapshot, Volume, VolumeCapability,
};

pub const NODE_ID: &str = "node-a";
pub const MAX_VOLUMES: u64 = 64;
pub const MIB: i64 = 1 << 20;

/// One node: engine, both services, and the folders they work in.
pub struct Node {
    pub fake: FakeOs,
    pub engine: Arc<Engine>,
    pub controller: ControllerService,
    pub node: NodeService,
    /// The allowed root for staging and target paths (kubelet's folder).
    pub kubelet: PathBuf,
    _dir: TempDir,
}

impl Node {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let root = dir.path().canonicalize().expect("resolvable tempdir");
        let pool_dir = root.join("pool");
        let kubelet = root.join("kubelet");
        for folder in [&pool_dir, &kubelet, &root.join("work")] {
            std::fs::create_dir_all(folder).expect("test folders");
        }
        let fake = FakeOs::new();
        let os = fake.os();
        let pool = FilePool::open(&pool_dir, os.clone()).expect("pool");
        let state = root.join("state");
        let volumes = JsonDirStore::<VolumeRecord>::open(&state).expect("volume store");
        let snapshots = JsonDirStore::<SnapshotRecord>::open(&state).expect("snapshot store");
        let config = EngineConfig {
            node_id: NODE_ID.to_owned(),
            work_dir: root.join("work"),
            allowed_roots: AllowedRoots::new([kubelet.clone()]),
            max_volumes: MAX_VOLUMES,
        };
        let engine = Arc::new(Engine::new(
            os,
            crate::domain::device_class::DeviceClasses::single(Arc::new(pool)),
            Arc::new(volumes),
            Arc::new(snapshots),
            config,
        ));
        Self {
            fake,
            controller: ControllerService::new(Arc::clone(&engine)),
            node: NodeService::new(Arc::clone(&engine)),
            engine,
            kubelet,
            _dir: dir,
        }
    }

    /// A path under the allowed root, its parent folder created (as
    /// kubelet does for staging and pod folders).
    pub fn path(&self, relative: &str) -> String {
        let path = self.kubelet.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("parent folder");
        }
        path_string(&path)
    }

    /// Creates a volume, failing the test if CreateVolume fails.
    pub async fn volume(&self, request: CreateVolumeRequest) -> Volume {
        self.controller
            .create_volume(Request::new(request))
            .await
            .expect("CreateVolume succeeds")
            .into_inner()
            .volume
            .expect("the response has a volume")
    }

    /// Cuts a snapshot, failing the test if CreateSnapshot fails.
    pub async fn snapshot(&self, name: &str, source: &str) -> Snapshot {
        self.controller
            .create_snapshot(Request::new(CreateSnapshotRequest {
                name: name.to_owned(),
                source_volume_id: source.to_owned(),
                ..Default::default()
            }))
            .await
            .expect("CreateSnapshot succeeds")
            .into_inner()
            .snapshot
            .expect("the response has a snapshot")
    }
}

pub fn path_string(path: &Path) -> String {
    path.to_str().expect("test paths are UTF-8").to_owned()
}

pub fn mount_capability(fs_type: &str, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode.into() }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.to_owned(),
            ..Default::default()
        })),
    }
}

pub fn block_capability(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode.into() }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// A CreateVolume request for an ext4 single-node-writer volume.
pub fn create_request(name: &str, required_bytes: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(CapacityRange {
            required_bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_capability("", Mode::SingleNodeWriter)],
        parameters: HashMap::new(),
        ..Default::default()
    }
}
