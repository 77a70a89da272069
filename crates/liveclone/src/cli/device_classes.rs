//! `--device-classes FILE`: the node's LVM device classes, next to the file
//! pool (class `file`, from `--pool-dir`).
//!
//! ```yaml
//! deviceClasses:
//!   - name: thick            # a StorageClass selects it with
//!     lvm:                   #   liveclone.io/deviceClass: thick
//!       volumeGroup: liveclone
//!   - name: thin
//!     lvm:
//!       volumeGroup: liveclone
//!       thinPool: pool0
//!       overprovisionRatio: 2.0
//! ```
//!
//! Unknown keys are errors (a typo must not silently give another pool),
//! and so is a class that cannot be opened: a node that starts without a
//! class its StorageClasses name would fail every volume of it later, with
//! a less direct message.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;

use crate::domain::device_class::{DeviceClassName, DeviceClasses};
use crate::domain::lvm_pool::{LvmClassConfig, LvmPool};
use crate::os::lvm::cache::CachingLvm;
use crate::os::lvm::{LinuxLvm, Lvm};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DeviceClassesFile {
    /// Required, even if empty: an empty or truncated file (a node's
    /// config lost in a crash) must stop the driver, not start it without
    /// the classes its volumes are in.
    device_classes: Vec<DeviceClassEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DeviceClassEntry {
    name: DeviceClassName,
    lvm: LvmClassConfig,
}

/// What the file says, checked but not opened.
fn parse(text: &str) -> anyhow::Result<Vec<DeviceClassEntry>> {
    let file: DeviceClassesFile =
        yaml_serde::from_str(text).context("reading the device classes")?;
    for entry in &file.device_classes {
        if entry.name.is_default() {
            anyhow::bail!(
                "device class {} is the file pool's (--pool-dir); give the LVM class another name",
                entry.name
            );
        }
    }
    Ok(file.device_classes)
}

/// Adds the classes of `path` to `classes`, opening each LVM pool (which
/// checks that its volume group and thin pool exist).
pub fn add_from_file(classes: DeviceClasses, path: &Path) -> anyhow::Result<DeviceClasses> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --device-classes {}", path.display()))?;
    let entries = parse(&text).with_context(|| format!("in {}", path.display()))?;
    // One handle for every class, so that classes sharing a volume group
    // share its report too.
    let lvm: Arc<dyn Lvm> = Arc::new(CachingLvm::new(Arc::new(LinuxLvm::new())));
    let mut classes = classes;
    for entry in entries {
        let pool = LvmPool::open(entry.name.as_str(), &entry.lvm, Arc::clone(&lvm))
            .map_err(|e| anyhow::anyhow!("device class {}: {e}", entry.name))?;
        classes = classes
            .with(entry.name, Arc::new(pool))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(classes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_thick_and_thin_classes() {
        let entries = parse(
            "deviceClasses:\n  - name: thick\n    lvm:\n      volumeGroup: vg0\n  - name: thin\n    lvm:\n      volumeGroup: vg0\n      thinPool: pool0\n      overprovisionRatio: 2.5\n",
        )
        .expect("valid file");
        let names: Vec<_> = entries.iter().map(|e| e.name.to_string()).collect();
        assert_eq!(names, ["thick", "thin"]);
    }

    #[test]
    fn refuses_typos_bad_names_and_the_file_class() {
        for (text, why) in [
            (
                "deviceClasses:\n  - name: a\n    lvm:\n      volumeGrup: vg0\n",
                "unknown key",
            ),
            ("deviceClass:\n  - name: a\n", "unknown top-level key"),
            (
                "deviceClasses:\n  - name: Fast\n    lvm:\n      volumeGroup: vg0\n",
                "bad name",
            ),
            (
                "deviceClasses:\n  - name: file\n    lvm:\n      volumeGroup: vg0\n",
                "the file class",
            ),
            ("deviceClasses:\n  - name: a\n", "no pool"),
        ] {
            assert!(parse(text).is_err(), "{why}: {text}");
        }
        assert!(parse("deviceClasses: []\n").expect("empty").is_empty());
        assert!(parse("").is_err(), "an empty file");
        assert!(parse("\n# nothing\n").is_err(), "a file without the key");
    }
}
