//! One node for the agents to work on: a real engine over the OS simulator,
//! with its pool, state and kubelet folders in a temporary folder. Each
//! test adds the helpers it needs in its own `impl FakeNode`.

use std::path::PathBuf;
use std::sync::Arc;

use liveclone::domain::device_class::DeviceClasses;
use liveclone::domain::engine::{Engine, EngineConfig};
use liveclone::domain::file_pool::FilePool;
use liveclone::domain::ids::{SnapshotId, VolumeId};
use liveclone::domain::model::{SnapshotRecord, VolumeRecord};
use liveclone::domain::paths::AllowedRoots;
use liveclone::domain::store::JsonDirStore;
use liveclone::os::fake::FakeOs;

pub struct FakeNode {
    pub fake: FakeOs,
    pub engine: Arc<Engine>,
    pub pool: Arc<FilePool>,
    /// The temporary folder that holds the node's folders (`pool`, and
    /// `pool-<class>` for each further class).
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeNode {
    pub fn new(node: &str) -> Self {
        Self::with_classes(node, &[])
    }

    /// A node whose engine has, beside the default class `file`, a file
    /// pool in `pool-<class>` for each of `classes`.
    pub fn with_classes(node: &str, classes: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let root = dir.path().canonicalize().expect("resolvable tempdir");
        let folders = ["pool", "state", "work", "kubelet"].map(|name| root.join(name));
        for folder in &folders {
            std::fs::create_dir_all(folder).expect("the node's folders");
        }
        let [pool_dir, state, work, kubelet] = folders;
        let fake = FakeOs::new();
        let os = fake.os();
        let pool = Arc::new(FilePool::open(&pool_dir, os.clone()).expect("pool"));
        let mut device_classes = DeviceClasses::single(pool.clone());
        for class in classes {
            let dir = root.join(format!("pool-{class}"));
            std::fs::create_dir_all(&dir).expect("the class's pool folder");
            let extra = Arc::new(FilePool::open(&dir, os.clone()).expect("pool"));
            device_classes = device_classes
                .with(class.parse().expect("a class name"), extra)
                .expect("distinct classes");
        }
        let engine = Arc::new(Engine::new(
            os,
            device_classes,
            Arc::new(JsonDirStore::<VolumeRecord>::open(&state).expect("volume store")),
            Arc::new(JsonDirStore::<SnapshotRecord>::open(&state).expect("snapshot store")),
            EngineConfig {
                node_id: node.to_owned(),
                work_dir: work,
                allowed_roots: AllowedRoots::new([kubelet]),
                max_volumes: 16,
            },
        ));
        FakeNode {
            fake,
            engine,
            pool,
            root,
            _dir: dir,
        }
    }

    pub fn volume(&self, id: &VolumeId) -> Option<VolumeRecord> {
        self.engine.volume(id).expect("reading a volume record")
    }

    pub fn snapshot(&self, id: &SnapshotId) -> Option<SnapshotRecord> {
        self.engine.snapshot(id).expect("reading a snapshot record")
    }
}
