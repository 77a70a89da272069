//! The objects the scenarios create, built as typed values (no YAML
//! templating); the pods' scripts are constants and take their parameters
//! from environment variables, so nothing is ever spliced into a shell
//! line.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSpec, TypedLocalObjectReference,
    TypedObjectReference, Volume, VolumeDevice, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use serde_json::{json, Value};

use crate::config::{SNAPSHOT_CLASS, WORKLOAD_IMAGE};

/// Where the pods see a file-system volume, and a block one.
pub const MOUNT_PATH: &str = "/data";
pub const DEVICE_PATH: &str = "/dev/xvda";

/// Writes `$MIB` MiB of random data (no holes, nothing compressible, so
/// every region must really be copied) to `$TARGET` and prints the sha256
/// of `$TARGET` (for a block device: all of it, written or not).
pub const WRITE_SCRIPT: &str = r#"set -eu
dd if=/dev/urandom of="$TARGET" bs=1048576 count="$MIB" conv=fsync 2>/dev/null
sync
sum=$(sha256sum "$TARGET" | cut -d' ' -f1)
echo "sha256=$sum"
"#;

/// Prints the sha256 of `$TARGET`, fails unless it is `$EXPECTED`; with
/// `HOLD=1` then stays up (for `kubectl exec` checks and for holding the
/// volume staged during the scenario).
pub const VERIFY_SCRIPT: &str = r#"set -eu
sum=$(sha256sum "$TARGET" | cut -d' ' -f1)
echo "sha256=$sum"
if [ "$sum" != "$EXPECTED" ]; then
  echo "MISMATCH: expected sha256=$EXPECTED" >&2
  exit 1
fi
echo verified
if [ "${HOLD:-0}" = 1 ]; then exec sleep 86400; fi
"#;

/// Whether a claim is a file system or a raw block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Filesystem,
    Block,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Filesystem => "Filesystem",
            Mode::Block => "Block",
        }
    }

    /// The path the scripts read and write.
    pub fn target(self) -> &'static str {
        match self {
            Mode::Filesystem => "/data/blob",
            Mode::Block => DEVICE_PATH,
        }
    }
}

/// What a claim starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Empty,
    /// A clone of a claim in the same namespace.
    Claim(String),
    /// A restore of a VolumeSnapshot in the same namespace.
    Snapshot(String),
}

/// A ReadWriteOnce claim of `size` (e.g. "1Gi") in `class`.
pub fn claim(
    name: &str,
    class: &str,
    size: &str,
    mode: Mode,
    source: &Source,
) -> PersistentVolumeClaim {
    let (data_source, data_source_ref) = match source {
        Source::Empty => (None, None),
        Source::Claim(source) => (
            Some(TypedLocalObjectReference {
                api_group: None,
                kind: "PersistentVolumeClaim".to_owned(),
                name: source.clone(),
            }),
            None,
        ),
        Source::Snapshot(snapshot) => (
            Some(TypedLocalObjectReference {
                api_group: Some("snapshot.storage.k8s.io".to_owned()),
                kind: "VolumeSnapshot".to_owned(),
                name: snapshot.clone(),
            }),
            None::<TypedObjectReference>,
        ),
    };
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            storage_class_name: Some(class.to_owned()),
            volume_mode: Some(mode.as_str().to_owned()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(size.to_owned()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            data_source,
            data_source_ref,
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

/// A pod that runs `script` once (restartPolicy Never) with `claim` at
/// [`MOUNT_PATH`] or [`DEVICE_PATH`] and `env` in its environment.
pub fn script_pod(name: &str, claim: &str, mode: Mode, script: &str, env: &[(&str, &str)]) -> Pod {
    let mut env: Vec<EnvVar> = env
        .iter()
        .map(|(name, value)| EnvVar {
            name: (*name).to_owned(),
            value: Some((*value).to_owned()),
            value_from: None,
        })
        .collect();
    env.push(EnvVar {
        name: "TARGET".to_owned(),
        value: Some(mode.target().to_owned()),
        value_from: None,
    });
    let (volume_mounts, volume_devices) = match mode {
        Mode::Filesystem => (
            Some(vec![VolumeMount {
                name: "volume".to_owned(),
                mount_path: MOUNT_PATH.to_owned(),
                ..VolumeMount::default()
            }]),
            None,
        ),
        Mode::Block => (
            None,
            Some(vec![VolumeDevice {
                name: "volume".to_owned(),
                device_path: DEVICE_PATH.to_owned(),
            }]),
        ),
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_owned(),
                "liveclone-e2e".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".to_owned()),
            // The scenarios delete pods often; sleep and sha256sum need no
            // grace.
            termination_grace_period_seconds: Some(1),
            containers: vec![Container {
                name: "work".to_owned(),
                image: Some(WORKLOAD_IMAGE.to_owned()),
                image_pull_policy: Some("IfNotPresent".to_owned()),
                command: Some(vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()]),
                env: Some(env),
                volume_mounts,
                volume_devices,
                ..Container::default()
            }],
            volumes: Some(vec![Volume {
                name: "volume".to_owned(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.to_owned(),
                    read_only: None,
                }),
                ..Volume::default()
            }]),
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// A VolumeSnapshot of `claim` in the chart's VolumeSnapshotClass (an
/// untyped object: k8s-openapi has no snapshot types).
pub fn volume_snapshot(name: &str, claim: &str) -> Value {
    json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": name},
        "spec": {
            "volumeSnapshotClassName": SNAPSHOT_CLASS,
            "source": {"persistentVolumeClaimName": claim},
        },
    })
}

/// The StorageClass parameters that make hydration slow enough to act on
/// while it runs: 4 KiB regions, one region in flight at a time. (The
/// scenarios also cap the rate through the VolumeHydration's tunables,
/// which only exist once the clone does; these hold from its first
/// moment.)
pub const SLOW_PARAMETERS: [(&str, &str); 3] = [
    ("liveclone.io/regionSize", "4KiB"),
    ("liveclone.io/hydrationThreshold", "1"),
    ("liveclone.io/hydrationBatchSize", "1"),
];

/// `base` (the chart's StorageClass, as the cluster has it) renamed `name`
/// with [`SLOW_PARAMETERS`] on top of its own: same driver, file system,
/// binding mode and expansion, so the scenarios test the chart's class
/// except for the copy speed.
pub fn slow_storage_class(base: &StorageClass, name: &str) -> Result<StorageClass> {
    if base.provisioner != "csi.liveclone.io" {
        bail!(
            "StorageClass {:?} is provisioned by {:?}, not csi.liveclone.io",
            base.metadata.name,
            base.provisioner
        );
    }
    let mut parameters = base.parameters.clone().unwrap_or_default();
    for (key, value) in SLOW_PARAMETERS {
        parameters.insert(key.to_owned(), value.to_owned());
    }
    Ok(StorageClass {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_owned(),
                "liveclone-e2e".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        provisioner: base.provisioner.clone(),
        parameters: Some(parameters),
        reclaim_policy: Some("Delete".to_owned()),
        volume_binding_mode: base.volume_binding_mode.clone(),
        allow_volume_expansion: Some(true),
        allowed_topologies: base.allowed_topologies.clone(),
        mount_options: base.mount_options.clone(),
    })
}

/// The sha256 a script pod printed (its last `sha256=` line).
pub fn printed_sha256(log: &str) -> Result<String> {
    let Some(sum) = log
        .lines()
        .rev()
        .find_map(|line| line.trim().strip_prefix("sha256="))
    else {
        bail!("the pod printed no sha256= line; its log:\n{log}");
    };
    if sum.len() != 64 || !sum.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("the pod printed a malformed sha256 {sum:?}");
    }
    Ok(sum.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_claim_names_its_source() -> Result<()> {
        let pvc = claim(
            "copy",
            "liveclone",
            "1Gi",
            Mode::Filesystem,
            &Source::Claim("data".into()),
        );
        let spec = pvc.spec.unwrap_or_default();
        let source = spec.data_source.unwrap_or_default();
        assert_eq!(
            (source.kind.as_str(), source.name.as_str()),
            ("PersistentVolumeClaim", "data")
        );
        assert_eq!(source.api_group, None);
        assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_owned()]));
        let size = spec
            .resources
            .and_then(|r| r.requests)
            .and_then(|r| r.get("storage").cloned());
        assert_eq!(size, Some(Quantity("1Gi".into())));
        Ok(())
    }

    #[test]
    fn a_restore_names_the_snapshot_api_group() {
        let pvc = claim(
            "r",
            "liveclone",
            "1Gi",
            Mode::Block,
            &Source::Snapshot("s".into()),
        );
        let spec = pvc.spec.unwrap_or_default();
        let source = spec.data_source.unwrap_or_default();
        assert_eq!(source.api_group.as_deref(), Some("snapshot.storage.k8s.io"));
        assert_eq!(source.kind, "VolumeSnapshot");
        assert_eq!(spec.volume_mode.as_deref(), Some("Block"));
    }

    #[test]
    fn block_pods_get_a_device_and_file_pods_a_mount() {
        let block = script_pod("p", "c", Mode::Block, WRITE_SCRIPT, &[("MIB", "8")]);
        let container = block.spec.unwrap_or_default().containers.remove(0);
        assert_eq!(container.volume_mounts, None);
        let devices = container.volume_devices.unwrap_or_default();
        assert_eq!(devices[0].device_path, DEVICE_PATH);
        let env = container.env.unwrap_or_default();
        let value = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(value("MIB").as_deref(), Some("8"));
        assert_eq!(value("TARGET").as_deref(), Some(DEVICE_PATH));
        // The script is an argument of `sh -c`, never built from values.
        assert_eq!(container.command.unwrap_or_default()[2], WRITE_SCRIPT);

        let file = script_pod("p", "c", Mode::Filesystem, VERIFY_SCRIPT, &[]);
        let spec = file.spec.unwrap_or_default();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let mounts = spec.containers[0].volume_mounts.clone().unwrap_or_default();
        assert_eq!(mounts[0].mount_path, MOUNT_PATH);
    }

    #[test]
    fn the_slow_class_keeps_the_charts_settings() -> Result<()> {
        let base = StorageClass {
            metadata: ObjectMeta {
                name: Some("liveclone".into()),
                ..ObjectMeta::default()
            },
            provisioner: "csi.liveclone.io".into(),
            parameters: Some(BTreeMap::from([
                ("csi.storage.k8s.io/fstype".to_owned(), "ext4".to_owned()),
                ("liveclone.io/regionSize".to_owned(), "64KiB".to_owned()),
            ])),
            volume_binding_mode: Some("WaitForFirstConsumer".into()),
            reclaim_policy: Some("Retain".into()),
            ..StorageClass::default()
        };
        let slow = slow_storage_class(&base, "slow")?;
        let parameters = slow.parameters.unwrap_or_default();
        assert_eq!(parameters["csi.storage.k8s.io/fstype"], "ext4");
        assert_eq!(parameters["liveclone.io/regionSize"], "4KiB");
        assert_eq!(parameters["liveclone.io/hydrationThreshold"], "1");
        assert_eq!(
            slow.volume_binding_mode.as_deref(),
            Some("WaitForFirstConsumer")
        );
        // Test volumes must not outlive the test.
        assert_eq!(slow.reclaim_policy.as_deref(), Some("Delete"));
        assert_eq!(slow.allow_volume_expansion, Some(true));

        let other = StorageClass {
            provisioner: "rancher.io/local-path".into(),
            ..base
        };
        assert!(slow_storage_class(&other, "slow").is_err());
        Ok(())
    }

    #[test]
    fn snapshots_use_the_charts_class() {
        let snapshot = volume_snapshot("s", "data");
        assert_eq!(snapshot["spec"]["volumeSnapshotClassName"], "liveclone");
        assert_eq!(
            snapshot["spec"]["source"]["persistentVolumeClaimName"],
            "data"
        );
    }

    #[test]
    fn sums_are_read_from_the_log() -> Result<()> {
        let sum = "a".repeat(64);
        assert_eq!(
            printed_sha256(&format!("x\nsha256={sum}\nverified\n"))?,
            sum
        );
        assert!(printed_sha256("nothing").is_err());
        assert!(printed_sha256("sha256=abc").is_err());
        Ok(())
    }
}
