//! Checks and conversions shared by the Controller and Node handlers:
//! required fields, IDs, volume capabilities, sizes, topology, timestamps
//! and list pagination.
//!
//! Everything here is pure: it turns CSI messages into domain values (or a
//! status saying which field is wrong) and domain records back into CSI
//! messages, so the handlers only have to sequence these and the engine.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use tonic::Status;

use crate::domain::engine::CapacityRange;
use crate::domain::ids::{SnapshotId, VolumeId};
use crate::domain::model::{AccessKind, ContentSource};
use crate::domain::provisioner::{CoMetadata, CoObject, SnapshotInfo};
use crate::grpc::TOPOLOGY_NODE_KEY;
use crate::os::fs::FsType;
use crate::proto::csi::v1::volume_capability::access_mode::Mode;
use crate::proto::csi::v1::volume_capability::AccessType;
use crate::proto::csi::v1::volume_content_source::{self, SnapshotSource, VolumeSource};
use crate::proto::csi::v1::{self as csi, Topology, VolumeCapability, VolumeContentSource};

/// The StorageClass parameter the Kubernetes external-provisioner uses for
/// the file system type when a CO passes it as a parameter rather than in
/// the capability.
pub const FS_TYPE_PARAMETER: &str = "csi.storage.k8s.io/fstype";

/// How much of a malformed, CO-supplied string goes into messages and logs.
const QUOTED_PREFIX_CHARS: usize = 80;

/// A span for an RPC about one volume; the ID is quoted since it may come
/// straight from the CO.
pub fn volume_span(rpc: &'static str, volume_id: &str) -> tracing::Span {
    tracing::info_span!("csi", rpc, volume = %quoted(volume_id))
}

/// `value` shortened and escaped for a message or a log field: IDs and
/// names come from the CO and may be long or hold control characters.
pub fn quoted(value: &str) -> String {
    let mut shown: String = value.chars().take(QUOTED_PREFIX_CHARS).collect();
    if shown.len() < value.len() {
        shown.push('…');
    }
    format!("{shown:?}")
}

/// INVALID_ARGUMENT unless `value` is non-empty; the message names the
/// field as the spec spells it.
pub fn require<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(value)
}

/// A volume ID from the CO that must name an existing volume.
///
/// Missing is INVALID_ARGUMENT. A string that is not a liveclone volume ID
/// cannot name any volume this driver made, so it is NOT_FOUND, as for a
/// well-formed ID with nothing behind it (csi-sanity sends both kinds).
pub fn volume_id(field: &str, value: &str) -> Result<VolumeId, Status> {
    require(field, value)?
        .parse()
        .map_err(|_| Status::not_found(format!("volume {} does not exist", quoted(value))))
}

/// A snapshot ID from the CO; see [`volume_id`] for the codes.
pub fn snapshot_id(field: &str, value: &str) -> Result<SnapshotId, Status> {
    require(field, value)?
        .parse()
        .map_err(|_| Status::not_found(format!("snapshot {} does not exist", quoted(value))))
}

/// How a capability asks to consume the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Block,
    Mount {
        /// `None` when the capability leaves the file system to the plugin.
        fs: Option<FsType>,
        flags: Vec<String>,
    },
}

/// A capability this driver can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: Access,
    pub mode: Mode,
}

impl Capability {
    /// Whether the mode itself forbids writes (the CO may also say so with
    /// `readonly` on NodePublishVolume).
    pub fn is_read_only(&self) -> bool {
        self.mode == Mode::SingleNodeReaderOnly
    }

    /// Whether a volume created for `kind` can be consumed this way.
    ///
    /// A block volume has no file system to mount, and a file-system volume
    /// is only offered as one: handing its raw device to a pod would let
    /// the pod corrupt what the node mounts elsewhere.
    pub fn fits(&self, kind: AccessKind) -> Result<(), String> {
        match (&self.access, kind) {
            (Access::Block, AccessKind::Block) => Ok(()),
            (Access::Mount { fs: None, .. }, AccessKind::Filesystem { .. }) => Ok(()),
            (
                Access::Mount {
                    fs: Some(wanted), ..
                },
                AccessKind::Filesystem { fs },
            ) if *wanted == fs => Ok(()),
            (
                Access::Mount {
                    fs: Some(wanted), ..
                },
                AccessKind::Filesystem { fs },
            ) => Err(format!("the volume holds a {fs} file system, not {wanted}")),
            (Access::Mount { .. }, AccessKind::Block) => {
                Err("the volume was created for raw block access, not a mount".to_owned())
            }
            (Access::Block, AccessKind::Filesystem { fs }) => Err(format!(
                "the volume was created with a {fs} file system, not for raw block access"
            )),
        }
    }
}

/// Access modes liveclone serves: a volume lives on one node, so only the
/// single-node modes (any number of pods on that node for the multi-writer
/// one, which the plugin advertises).
fn supported_mode(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter
    )
}

/// Reads a capability; the error says, for a person, what is unsupported
/// (ValidateVolumeCapabilities returns it as its message, the other calls
/// as INVALID_ARGUMENT).
pub fn capability(capability: &VolumeCapability) -> Result<Capability, String> {
    let raw_mode = capability
        .access_mode
        .ok_or_else(|| "access_mode is required".to_owned())?
        .mode;
    let mode = Mode::try_from(raw_mode)
        .map_err(|_| format!("access mode {raw_mode} is not a CSI access mode"))?;
    if !supported_mode(mode) {
        return Err(format!(
            "access mode {} is not supported: liveclone volumes live on one node; use \
             SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY, SINGLE_NODE_SINGLE_WRITER or \
             SINGLE_NODE_MULTI_WRITER",
            mode.as_str_name()
        ));
    }
    let access = match &capability.access_type {
        None => return Err("access_type is required (block or mount)".to_owned()),
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(mount)) => {
            if !mount.volume_mount_group.is_empty() {
                return Err("volume_mount_group is not supported".to_owned());
            }
            let fs = match mount.fs_type.as_str() {
                "" => None,
                other => Some(FsType::from_str(other).map_err(|e| e.to_string())?),
            };
            Access::Mount {
                fs,
                flags: mount.mount_flags.clone(),
            }
        }
    };
    Ok(Capability { access, mode })
}

/// A capability that must be present and supported (NodeStageVolume,
/// NodePublishVolume).
pub fn required_capability(
    field: &str,
    value: Option<&VolumeCapability>,
) -> Result<Capability, Status> {
    let value = value.ok_or_else(|| Status::invalid_argument(format!("{field} is required")))?;
    capability(value).map_err(|why| Status::invalid_argument(format!("{field}: {why}")))
}

/// Every capability of a CreateVolume request, at least one, all supported.
pub fn capabilities(field: &str, values: &[VolumeCapability]) -> Result<Vec<Capability>, Status> {
    if values.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    values
        .iter()
        .enumerate()
        .map(|(index, value)| {
            capability(value)
                .map_err(|why| Status::invalid_argument(format!("{field}[{index}]: {why}")))
        })
        .collect()
}

/// The kind of volume to create for these capabilities.
///
/// Block if any capability is block: a raw device is what that consumer
/// needs. Otherwise a file system: the one the capabilities name, else the
/// StorageClass's [`FS_TYPE_PARAMETER`], else the one the source holds
/// (`source`, for a clone or a restore), else the default. A clone holds
/// its source's data, so naming another file system than the source's is
/// refused: the volume could never be mounted as what its record says.
pub fn access_kind(
    capabilities: &[Capability],
    parameters: &HashMap<String, String>,
    source: Option<AccessKind>,
) -> Result<AccessKind, Status> {
    if capabilities
        .iter()
        .any(|capability| capability.access == Access::Block)
    {
        return Ok(AccessKind::Block);
    }
    let mut named: Option<FsType> = None;
    for capability in capabilities {
        if let Access::Mount { fs: Some(fs), .. } = capability.access {
            match named {
                Some(earlier) if earlier != fs => {
                    return Err(Status::invalid_argument(format!(
                        "volume_capabilities ask for both {earlier} and {fs}; a volume holds \
                         one file system"
                    )))
                }
                _ => named = Some(fs),
            }
        }
    }
    if named.is_none() {
        if let Some(value) = parameters.get(FS_TYPE_PARAMETER).filter(|v| !v.is_empty()) {
            named = Some(FsType::from_str(value).map_err(|e| {
                Status::invalid_argument(format!("parameter {FS_TYPE_PARAMETER}: {e}"))
            })?);
        }
    }
    let inherited = source.and_then(|kind| kind.fs());
    let fs = match (named, inherited) {
        (Some(wanted), Some(held)) if wanted != held => {
            return Err(Status::invalid_argument(format!(
                "the source of this volume holds a {held} file system; its copy cannot be \
                 used as {wanted} (ask for {held}, or leave the file system type empty)"
            )))
        }
        (Some(fs), _) | (None, Some(fs)) => fs,
        (None, None) => FsType::DEFAULT,
    };
    Ok(AccessKind::Filesystem { fs })
}

/// A CSI capacity range as the engine takes it; absent means "not given".
pub fn capacity_range(range: Option<&csi::CapacityRange>) -> Result<CapacityRange, Status> {
    let Some(range) = range else {
        return Ok(CapacityRange::default());
    };
    let non_negative = |field: &str, value: i64| {
        u64::try_from(value).map_err(|_| {
            Status::invalid_argument(format!(
                "capacity_range.{field} is {value}; sizes cannot be negative"
            ))
        })
    };
    Ok(CapacityRange {
        required_bytes: non_negative("required_bytes", range.required_bytes)?,
        limit_bytes: non_negative("limit_bytes", range.limit_bytes)?,
    })
}

/// A size for a CSI `int64` field. Sizes come from files and devices and
/// never reach 2^63 bytes; if one did, claiming the largest value is closer
/// to the truth than failing a call that otherwise worked.
pub fn bytes_i64(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// The content source of a CreateVolume request. A source ID that is not
/// one of ours cannot exist: NOT_FOUND, the code the spec gives for a
/// missing source.
pub fn content_source(
    source: Option<&VolumeContentSource>,
) -> Result<Option<ContentSource>, Status> {
    let Some(source) = source else {
        return Ok(None);
    };
    match &source.r#type {
        None => Err(Status::invalid_argument(
            "volume_content_source is set but names neither a snapshot nor a volume",
        )),
        Some(volume_content_source::Type::Volume(volume)) => Ok(Some(ContentSource::Volume(
            volume_id("volume_content_source.volume.volume_id", &volume.volume_id)?,
        ))),
        Some(volume_content_source::Type::Snapshot(snapshot)) => {
            Ok(Some(ContentSource::Snapshot(snapshot_id(
                "volume_content_source.snapshot.snapshot_id",
                &snapshot.snapshot_id,
            )?)))
        }
    }
}

/// A recorded content source as CSI shows it.
pub fn content_source_message(source: &ContentSource) -> VolumeContentSource {
    let r#type = match source {
        ContentSource::Volume(id) => volume_content_source::Type::Volume(VolumeSource {
            volume_id: id.to_string(),
        }),
        ContentSource::Snapshot(id) => volume_content_source::Type::Snapshot(SnapshotSource {
            snapshot_id: id.to_string(),
        }),
    };
    VolumeContentSource {
        r#type: Some(r#type),
    }
}

/// The one topology segment of a node: volumes live in its pool and are
/// reachable from nowhere else.
pub fn node_topology(node_id: &str) -> Topology {
    Topology {
        segments: [(TOPOLOGY_NODE_KEY.to_owned(), node_id.to_owned())]
            .into_iter()
            .collect(),
    }
}

/// Whether `topology` names `node_id` under our key.
pub fn is_node(topology: &Topology, node_id: &str) -> bool {
    topology
        .segments
        .get(TOPOLOGY_NODE_KEY)
        .is_some_and(|value| value == node_id)
}

/// A Unix time in seconds as a protobuf timestamp.
pub fn timestamp(unix_seconds: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(unix_seconds).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

/// A snapshot record as CSI shows it.
pub fn snapshot_message(snapshot: &SnapshotInfo) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: bytes_i64(snapshot.size_bytes),
        snapshot_id: snapshot.id.to_string(),
        source_volume_id: snapshot.source_volume.to_string(),
        creation_time: Some(timestamp(snapshot.created_at)),
        ready_to_use: snapshot.ready_to_use,
        group_snapshot_id: String::new(),
    }
}

/// What a volume's condition says: abnormal, with the engine's reason,
/// while its hydration is stalled or failed; otherwise healthy, with the
/// hydration progress if it is a clone still copying, since that is what
/// someone looking at a new clone wants to know.
pub fn volume_condition(
    abnormal: Option<String>,
    progress: Option<String>,
) -> csi::VolumeCondition {
    match abnormal {
        Some(message) => csi::VolumeCondition {
            abnormal: true,
            message,
        },
        None => csi::VolumeCondition {
            abnormal: false,
            // The spec requires a message even for a healthy volume.
            message: progress.unwrap_or_else(|| "healthy".to_owned()),
        },
    }
}

/// StorageClass parameters in the order the engine keeps them.
pub fn parameters(parameters: &HashMap<String, String>) -> BTreeMap<String, String> {
    parameters
        .iter()
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// Prefix of the parameters that Kubernetes' sidecars add with
/// `--extra-create-metadata` (names of the claim, PV, VolumeSnapshot).
pub const CO_METADATA_PREFIX: &str = "csi.storage.k8s.io/";

/// Splits a request's parameters into the StorageClass's own and what the
/// CO says about the objects the call is for. The CO's keys are not
/// parameters of the volume: two claims with the same class make alike
/// volumes.
pub fn co_metadata(parameters: &HashMap<String, String>) -> (BTreeMap<String, String>, CoMetadata) {
    let get = |key: &str| {
        parameters
            .get(&format!("{CO_METADATA_PREFIX}{key}"))
            .filter(|value| !value.is_empty())
            .cloned()
    };
    let object = |namespace: &str, name: &str| {
        Some(CoObject {
            namespace: get(namespace)?,
            name: get(name)?,
        })
    };
    let metadata = CoMetadata {
        claim: object("pvc/namespace", "pvc/name"),
        persistent_volume: get("pv/name"),
        volume_snapshot: object("volumesnapshot/namespace", "volumesnapshot/name"),
    };
    let own = parameters
        .iter()
        .filter(|(key, _)| !key.starts_with(CO_METADATA_PREFIX))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    (own, metadata)
}

/// One page of a list call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub entries: Vec<T>,
    /// Empty on the last page.
    pub next_token: String,
}

/// Cuts one page out of `items` (any order; sorted here by ID).
///
/// The token is the ID of the last entry of the previous page, and a page
/// holds the IDs after it. Unlike an index, such a token stays meaningful
/// when entries are created or deleted between pages, including the very
/// entry it names: nothing is returned twice and nothing that existed
/// throughout is skipped. A token that is not an ID of the listed kind was
/// not made by this plugin: ABORTED, as the spec asks.
pub fn paginate<T>(
    mut items: Vec<T>,
    id_of: impl Fn(&T) -> &str,
    is_valid_token: impl Fn(&str) -> bool,
    max_entries: i32,
    starting_token: &str,
) -> Result<Page<T>, Status> {
    let max_entries = usize::try_from(max_entries).map_err(|_| {
        Status::invalid_argument(format!(
            "max_entries is {max_entries}; it cannot be negative"
        ))
    })?;
    if !starting_token.is_empty() && !is_valid_token(starting_token) {
        return Err(Status::aborted(format!(
            "starting_token {} was not returned by this plugin; list again from the start",
            quoted(starting_token)
        )));
    }
    items.sort_by(|a, b| id_of(a).cmp(id_of(b)));
    let mut rest: Vec<T> = if starting_token.is_empty() {
        items
    } else {
        items
            .into_iter()
            .filter(|item| id_of(item) > starting_token)
            .collect()
    };
    let next_token = if max_entries > 0 && rest.len() > max_entries {
        rest.truncate(max_entries);
        rest.last()
            .map(|item| id_of(item).to_owned())
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok(Page {
        entries: rest,
        next_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::csi::v1::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn mount(fs_type: &str, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode.into() }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs_type.to_owned(),
                ..Default::default()
            })),
        }
    }

    fn block(mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode.into() }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        }
    }

    #[test]
    fn single_node_modes_are_supported_and_multi_node_ones_are_not() {
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            assert!(capability(&mount("", mode)).is_ok(), "{mode:?}");
            assert!(capability(&block(mode)).is_ok(), "{mode:?}");
        }
        for mode in [
            Mode::Unknown,
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter,
        ] {
            let why = capability(&mount("", mode)).expect_err("unsupported");
            assert!(why.contains(mode.as_str_name()), "{why}");
        }
        let why = capability(&VolumeCapability {
            access_mode: Some(AccessMode { mode: 99 }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        })
        .expect_err("not a mode");
        assert!(why.contains("99"), "{why}");
    }

    #[test]
    fn file_systems_and_missing_parts_of_a_capability() {
        assert_eq!(
            capability(&mount("xfs", Mode::SingleNodeWriter))
                .expect("xfs")
                .access,
            Access::Mount {
                fs: Some(FsType::Xfs),
                flags: Vec::new()
            }
        );
        let why = capability(&mount("btrfs", Mode::SingleNodeWriter)).expect_err("btrfs");
        assert!(why.contains("btrfs"), "{why}");
        let why = capability(&VolumeCapability {
            access_mode: None,
            access_type: Some(AccessType::Block(BlockVolume {})),
        })
        .expect_err("no mode");
        assert!(why.contains("access_mode"), "{why}");
        let why = capability(&VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter.into(),
            }),
            access_type: None,
        })
        .expect_err("no type");
        assert!(why.contains("access_type"), "{why}");
        let mut grouped = mount("ext4", Mode::SingleNodeWriter);
        if let Some(AccessType::Mount(m)) = grouped.access_type.as_mut() {
            m.volume_mount_group = "1000".to_owned();
        }
        assert!(capability(&grouped).is_err());
    }

    #[test]
    fn access_kind_prefers_block_then_the_request_then_the_source() {
        let none = HashMap::new();
        let xfs_parameter: HashMap<String, String> =
            [(FS_TYPE_PARAMETER.to_owned(), "xfs".to_owned())].into();
        let ext4 = AccessKind::Filesystem { fs: FsType::Ext4 };
        let xfs = AccessKind::Filesystem { fs: FsType::Xfs };
        let kind = |caps: &[VolumeCapability],
                    parameters: &HashMap<String, String>,
                    source: Option<AccessKind>| {
            let parsed = capabilities("volume_capabilities", caps).expect("supported");
            access_kind(&parsed, parameters, source)
        };
        let any = || mount("", Mode::SingleNodeWriter);
        let both = [any(), block(Mode::SingleNodeWriter)];
        assert_eq!(
            kind(&both, &none, Some(xfs)).expect("valid"),
            AccessKind::Block
        );
        assert_eq!(kind(&[any()], &none, None).expect("valid"), ext4);
        assert_eq!(kind(&[any()], &xfs_parameter, None).expect("valid"), xfs);
        let named_ext4 = [mount("ext4", Mode::SingleNodeWriter)];
        assert_eq!(
            kind(&named_ext4, &xfs_parameter, None).expect("valid"),
            ext4
        );
        // A copy keeps its source's file system unless told otherwise...
        assert_eq!(kind(&[any()], &none, Some(xfs)).expect("valid"), xfs);
        assert_eq!(
            kind(&[any()], &none, Some(AccessKind::Block)).expect("valid"),
            ext4
        );
        assert_eq!(
            kind(&[any()], &xfs_parameter, Some(xfs)).expect("valid"),
            xfs
        );
        // ...and cannot be told another one.
        let status = kind(&named_ext4, &none, Some(xfs)).expect_err("xfs data as ext4");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("xfs"), "{status:?}");

        let two = [
            mount("ext4", Mode::SingleNodeWriter),
            mount("xfs", Mode::SingleNodeWriter),
        ];
        let status = kind(&two, &none, None).expect_err("two file systems");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let bad_parameter: HashMap<String, String> =
            [(FS_TYPE_PARAMETER.to_owned(), "zfs".to_owned())].into();
        let status = kind(&[any()], &bad_parameter, None).expect_err("zfs");
        assert!(status.message().contains(FS_TYPE_PARAMETER), "{status:?}");
    }

    #[test]
    fn capability_fits_only_the_kind_of_volume_it_was_made_for() {
        let ext4 = AccessKind::Filesystem { fs: FsType::Ext4 };
        let cap = |c: VolumeCapability| capability(&c).expect("supported");
        assert!(cap(mount("", Mode::SingleNodeWriter)).fits(ext4).is_ok());
        assert!(cap(mount("ext4", Mode::SingleNodeWriter))
            .fits(ext4)
            .is_ok());
        assert!(cap(mount("xfs", Mode::SingleNodeWriter))
            .fits(ext4)
            .is_err());
        assert!(cap(block(Mode::SingleNodeWriter)).fits(ext4).is_err());
        assert!(cap(block(Mode::SingleNodeWriter))
            .fits(AccessKind::Block)
            .is_ok());
        assert!(cap(mount("", Mode::SingleNodeWriter))
            .fits(AccessKind::Block)
            .is_err());
    }

    #[test]
    fn ids_missing_are_invalid_and_malformed_are_not_found() {
        assert_eq!(
            volume_id("volume_id", "").expect_err("empty").code(),
            tonic::Code::InvalidArgument
        );
        let status = volume_id("volume_id", "some-vol-id").expect_err("malformed");
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(status.message().contains("some-vol-id"), "{status:?}");
        assert_eq!(
            snapshot_id("snapshot_id", "lcv-0123456789abcdef0123456789abcdef")
                .expect_err("a volume ID is no snapshot ID")
                .code(),
            tonic::Code::NotFound
        );
        assert!(volume_id("volume_id", "lcv-0123456789abcdef0123456789abcdef").is_ok());
    }

    #[test]
    fn negative_sizes_are_invalid() {
        let status = capacity_range(Some(&csi::CapacityRange {
            required_bytes: -1,
            limit_bytes: 0,
        }))
        .expect_err("negative");
        assert!(status.message().contains("required_bytes"), "{status:?}");
        assert_eq!(
            capacity_range(None).expect("absent"),
            CapacityRange::default()
        );
    }

    #[test]
    fn pages_follow_the_last_id_and_survive_its_deletion() {
        let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let valid = |t: &str| t.starts_with('k');
        let first =
            paginate(ids(&["k3", "k1", "k2", "k4"]), String::as_str, valid, 2, "").expect("page");
        assert_eq!(first.entries, ids(&["k1", "k2"]));
        assert_eq!(first.next_token, "k2");
        // k2 deleted and k0 created between the pages.
        let second = paginate(
            ids(&["k0", "k1", "k3", "k4"]),
            String::as_str,
            valid,
            2,
            &first.next_token,
        )
        .expect("page");
        assert_eq!(second.entries, ids(&["k3", "k4"]));
        assert_eq!(second.next_token, "");
        let all = paginate(ids(&["k2", "k1"]), String::as_str, valid, 0, "").expect("page");
        assert_eq!(all.entries, ids(&["k1", "k2"]));
        assert_eq!(all.next_token, "");
        let exact = paginate(ids(&["k1", "k2"]), String::as_str, valid, 2, "").expect("page");
        assert_eq!(exact.next_token, "", "no token when nothing is left");
        assert_eq!(
            paginate(ids(&["k1"]), String::as_str, valid, 0, "invalid-token")
                .expect_err("foreign token")
                .code(),
            tonic::Code::Aborted
        );
        assert_eq!(
            paginate(ids(&["k1"]), String::as_str, valid, -1, "")
                .expect_err("negative")
                .code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn quoting_shortens_and_escapes() {
        assert_eq!(quoted("a\nb"), "\"a\\nb\"");
        let long = "x".repeat(500);
        assert!(quoted(&long).chars().count() < 90);
    }
}
