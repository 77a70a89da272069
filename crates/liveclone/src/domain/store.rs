//! Where per-volume state lives.
//!
//! The domain layer only sees [`RecordStore`]; standalone mode keeps records as
//! JSON files in its state directory ([`JsonDirStore`]), Kubernetes mode (a
//! later issue) keeps them in custom resources. A record is written whole and
//! atomically (temporary file, fsync, rename, fsync of the directory), so a
//! process killed or a machine losing power at any point leaves either the
//! old record or the new one, never a torn one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A record kept by a store, keyed by an ID that is safe as a file name.
pub trait Record: Serialize + DeserializeOwned + Send + Sync {
    /// The ID type; its `Display` form is the key. It must only ever produce
    /// file-name-safe strings (validated IDs such as [`super::ids::VolumeId`]).
    type Id: std::fmt::Display + FromStr + Send + Sync;
    /// Folder name for this kind of record, e.g. `volumes`.
    const KIND: &'static str;
    fn id(&self) -> &Self::Id;
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state record {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state record key {key:?} is not a valid ID")]
    BadKey { key: String },
}

/// Persistent records of one kind.
pub trait RecordStore<R: Record>: Send + Sync {
    fn get(&self, id: &R::Id) -> Result<Option<R>, StoreError>;
    /// Creates or replaces the record, durably, before returning.
    fn put(&self, record: &R) -> Result<(), StoreError>;
    /// Removes the record; removing an absent record is not an error.
    fn remove(&self, id: &R::Id) -> Result<(), StoreError>;
    /// Every record, sorted by ID.
    fn list(&self) -> Result<Vec<R>, StoreError>;
}

/// One JSON file per record under `<root>/<KIND>/`.
pub struct JsonDirStore<R> {
    dir: PathBuf,
    _records: PhantomData<fn() -> R>,
}

const SUFFIX: &str = ".json";
const TEMP_SUFFIX: &str = ".json.tmp";

impl<R: Record> JsonDirStore<R> {
    /// Opens (creating if needed) the store under `root`, and removes
    /// temporary files left by a write that was interrupted.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let dir = root.join(R::KIND);
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let store = Self {
            dir,
            _records: PhantomData,
        };
        for entry in store.read_dir()? {
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(TEMP_SUFFIX) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|source| StoreError::Io { path, source })?;
            }
        }
        Ok(store)
    }

    fn path_of(&self, id: &R::Id) -> PathBuf {
        self.dir.join(format!("{id}{SUFFIX}"))
    }

    fn read_dir(&self) -> Result<Vec<std::fs::DirEntry>, StoreError> {
        let io = |source| StoreError::Io {
            path: self.dir.clone(),
            source,
        };
        std::fs::read_dir(&self.dir)
            .map_err(io)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(io)
    }

    fn read(&self, path: &Path) -> Result<Option<R>, StoreError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                path: path.to_path_buf(),
                source,
            })
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| StoreError::Io {
                path: self.dir.clone(),
                source,
            })
    }
}

impl<R: Record> RecordStore<R> for JsonDirStore<R> {
    fn get(&self, id: &R::Id) -> Result<Option<R>, StoreError> {
        self.read(&self.path_of(id))
    }

    fn put(&self, record: &R) -> Result<(), StoreError> {
        let path = self.path_of(record.id());
        let temp = self.dir.join(format!("{}{TEMP_SUFFIX}", record.id()));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let json = serde_json::to_vec_pretty(record).map_err(|source| StoreError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)
            .map_err(io(&temp))?;
        file.write_all(&json).map_err(io(&temp))?;
        file.sync_all().map_err(io(&temp))?;
        drop(file);
        std::fs::rename(&temp, &path).map_err(io(&path))?;
        self.sync_dir()
    }

    fn remove(&self, id: &R::Id) -> Result<(), StoreError> {
        let path = self.path_of(id);
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    fn list(&self) -> Result<Vec<R>, StoreError> {
        let mut keys = Vec::new();
        for entry in self.read_dir()? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(SUFFIX) else {
                continue;
            };
            // A file whose name is not a valid ID was not written by us.
            let id: R::Id = key.parse().map_err(|_| StoreError::BadKey {
                key: key.to_owned(),
            })?;
            keys.push(id.to_string());
        }
        keys.sort();
        let mut records = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(record) = self.read(&self.dir.join(format!("{key}{SUFFIX}")))? {
                records.push(record);
            }
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::VolumeId;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Thing {
        id: VolumeId,
        size: u64,
    }

    impl Record for Thing {
        type Id = VolumeId;
        const KIND: &'static str = "things";
        fn id(&self) -> &VolumeId {
            &self.id
        }
    }

    fn thing(name: &str, size: u64) -> Thing {
        Thing {
            id: VolumeId::for_name(name).expect("valid"),
            size,
        }
    }

    #[test]
    fn put_get_list_remove() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = JsonDirStore::<Thing>::open(root.path()).expect("open");
        let a = thing("a", 1);
        let b = thing("b", 2);
        assert_eq!(store.get(&a.id).expect("get"), None);
        store.put(&a).expect("put");
        store.put(&b).expect("put");
        store.put(&thing("a", 3)).expect("replace");
        assert_eq!(store.get(&a.id).expect("get"), Some(thing("a", 3)));
        let mut ids: Vec<_> = store
            .list()
            .expect("list")
            .into_iter()
            .map(|t| t.id)
            .collect();
        let mut want = vec![a.id.clone(), b.id.clone()];
        want.sort();
        ids.sort();
        assert_eq!(ids, want);
        store.remove(&a.id).expect("remove");
        store.remove(&a.id).expect("removing twice is fine");
        assert_eq!(store.get(&a.id).expect("get"), None);
        // Reopening sees the same state: it is on disk, not in memory.
        let again = JsonDirStore::<Thing>::open(root.path()).expect("reopen");
        assert_eq!(again.list().expect("list"), vec![thing("b", 2)]);
    }

    #[test]
    fn interrupted_write_leaves_the_old_record_and_is_cleaned_up() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = JsonDirStore::<Thing>::open(root.path()).expect("open");
        let a = thing("a", 1);
        store.put(&a).expect("put");
        // A crash between writing the temporary file and the rename.
        let temp = root
            .path()
            .join("things")
            .join(format!("{}{TEMP_SUFFIX}", a.id));
        std::fs::write(&temp, b"{\"id\":").expect("torn temp");
        let reopened = JsonDirStore::<Thing>::open(root.path()).expect("reopen");
        assert!(!temp.exists(), "leftover temp file removed on open");
        assert_eq!(reopened.get(&a.id).expect("get"), Some(a));
    }

    #[test]
    fn corrupt_and_foreign_files_are_reported_not_ignored() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = JsonDirStore::<Thing>::open(root.path()).expect("open");
        let a = thing("a", 1);
        std::fs::write(store.path_of(&a.id), b"not json").expect("write");
        assert!(matches!(store.get(&a.id), Err(StoreError::Corrupt { .. })));
        std::fs::remove_file(store.path_of(&a.id)).expect("rm");
        std::fs::write(root.path().join("things/evil.json"), b"{}").expect("write");
        assert!(matches!(store.list(), Err(StoreError::BadKey { .. })));
    }
}
