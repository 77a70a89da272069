//! `csi`: a small CSI client for trying liveclone without a cluster.
//!
//! It makes the calls a container orchestrator would make, one subcommand
//! per call, over the driver's Unix socket:
//!
//! ```text
//! cargo build -p liveclone --bin liveclone --example csi
//! E=unix:///run/liveclone/csi.sock
//! V=$(target/debug/examples/csi --endpoint $E create-volume data --size 1GiB --fs ext4)
//! target/debug/examples/csi --endpoint $E stage "$V" /srv/lc/data-staging
//! target/debug/examples/csi --endpoint $E publish "$V" /srv/lc/data-staging /srv/lc/data
//! C=$(target/debug/examples/csi --endpoint $E create-volume copy --size 1GiB --from-volume "$V")
//! ```
//!
//! IDs are printed alone on stdout, so scripts can capture them; errors
//! print the gRPC code and the driver's message on stderr and exit with
//! status 1. Progress of clones is shown by `liveclone status`.

use std::collections::HashMap;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use liveclone::grpc::client::connect_unix;
use liveclone::proto::csi::v1 as csi;
use liveclone::proto::csi::v1::controller_client::ControllerClient;
use liveclone::proto::csi::v1::node_client::NodeClient;
use tonic::transport::Channel;

/// Drive a CSI plugin (liveclone standalone) from the command line.
#[derive(Debug, Parser)]
#[command(name = "csi")]
struct Cli {
    /// The driver's socket: `unix:///abs/path` or an absolute path.
    #[arg(long, env = "CSI_ENDPOINT", default_value = liveclone::cli::DEFAULT_ENDPOINT)]
    endpoint: String,
    #[command(subcommand)]
    command: Command,
}

/// How a volume is consumed: a file system (the driver's default when
/// neither flag is given, or the source's for a copy) or a raw block device.
#[derive(Debug, Clone, Args)]
struct AccessArgs {
    /// File system to create or mount: ext4 or xfs.
    #[arg(long, value_name = "TYPE", conflicts_with = "block")]
    fs: Option<String>,
    /// Raw block device instead of a file system.
    #[arg(long)]
    block: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// CreateVolume: a new empty volume, or a copy of a volume or snapshot
    /// (usable at once; it hydrates in the background). Prints its ID.
    CreateVolume {
        /// The CO's name for it (the same name gives the same volume).
        name: String,
        /// Capacity: bytes, or with a suffix (Ki, Mi, Gi, Ti, KiB..TiB are
        /// binary; K, M, G, T, KB..TB are decimal), e.g. 1GiB.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        access: AccessArgs,
        /// Copy this volume (a live clone).
        #[arg(long, value_name = "VOLUME_ID", conflicts_with = "from_snapshot")]
        from_volume: Option<String>,
        /// Restore this snapshot.
        #[arg(long, value_name = "SNAPSHOT_ID")]
        from_snapshot: Option<String>,
        /// A StorageClass parameter, e.g. liveclone.io/hydrationThreshold=64
        /// (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
        params: Vec<(String, String)>,
    },
    /// DeleteVolume. A clone's source can be deleted while it hydrates.
    DeleteVolume { volume_id: String },
    /// CreateSnapshot of a volume. Prints the snapshot ID.
    CreateSnapshot {
        /// The CO's name for it.
        name: String,
        /// The volume to snapshot.
        #[arg(long, value_name = "VOLUME_ID")]
        source: String,
    },
    /// DeleteSnapshot.
    DeleteSnapshot { snapshot_id: String },
    /// NodeStageVolume: make the volume's device and mount its file system
    /// at PATH (an existing folder) for later publishing.
    Stage {
        volume_id: String,
        /// The staging path (under one of the driver's
        /// --allowed-mount-root folders).
        path: String,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// NodeUnstageVolume.
    Unstage { volume_id: String, path: String },
    /// NodePublishVolume: bind-mount the staged volume at TARGET (the
    /// driver creates it).
    Publish {
        volume_id: String,
        /// Where the volume was staged.
        staging: String,
        /// Where to make it visible.
        target: String,
        /// Read-only.
        #[arg(long)]
        ro: bool,
        /// The device itself (for a volume created with --block).
        #[arg(long)]
        block: bool,
    },
    /// NodeUnpublishVolume.
    Unpublish { volume_id: String, target: String },
    /// ControllerExpandVolume, then NodeExpandVolume on --path when the file
    /// system has to grow too. Prints the new capacity in bytes.
    Expand {
        volume_id: String,
        /// The new capacity (same forms as create-volume --size).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Where the volume is staged or published, to grow its file system.
        #[arg(long)]
        path: Option<String>,
    },
}

/// A size in bytes from `1073741824`, `1GiB`, `1Gi`, `512M`, `2TB`...
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 1073741824, 1GiB, 512Mi)"))?;
    let unit: u64 = match suffix.trim() {
        "" | "B" => 1,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        "K" | "k" | "KB" | "kB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size suffix {other:?}: use Ki, Mi, Gi, Ti (or KiB...) for binary \
                 units, K, M, G, T for decimal ones"
            ))
        }
    };
    number
        .checked_mul(unit)
        .filter(|bytes| i64::try_from(*bytes).is_ok())
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn parse_param(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

fn capability(fs: Option<&str>, block: bool) -> csi::VolumeCapability {
    use csi::volume_capability::access_mode::Mode;
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
    let access_type = if block {
        AccessType::Block(BlockVolume {})
    } else {
        AccessType::Mount(MountVolume {
            fs_type: fs.unwrap_or_default().to_owned(),
            ..Default::default()
        })
    };
    csi::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter.into(),
        }),
    }
}

fn access_capability(access: &AccessArgs) -> csi::VolumeCapability {
    capability(access.fs.as_deref(), access.block)
}

fn capacity(bytes: u64) -> Option<csi::CapacityRange> {
    Some(csi::CapacityRange {
        // parse_size keeps sizes within i64.
        required_bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
        limit_bytes: 0,
    })
}

fn content_source(
    from_volume: Option<String>,
    from_snapshot: Option<String>,
) -> Option<csi::VolumeContentSource> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let r#type = match (from_volume, from_snapshot) {
        (Some(volume_id), _) => Type::Volume(VolumeSource { volume_id }),
        (None, Some(snapshot_id)) => Type::Snapshot(SnapshotSource { snapshot_id }),
        (None, None) => return None,
    };
    Some(csi::VolumeContentSource {
        r#type: Some(r#type),
    })
}

/// What went wrong, for the user: a call the driver refused, or no driver.
enum Failure {
    Call(&'static str, tonic::Status),
    Connect(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure::Connect(error)
    }
}

/// `Code::AlreadyExists` as the CSI spec writes it: `ALREADY_EXISTS`.
fn code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (index, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && index > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// Runs one call, naming it in the error.
async fn call<T>(
    rpc: &'static str,
    future: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Failure> {
    future
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| Failure::Call(rpc, status))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let channel: Channel = connect_unix(&cli.endpoint).await?;
    let mut controller = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel);
    match cli.command {
        Command::CreateVolume {
            name,
            size,
            access,
            from_volume,
            from_snapshot,
            params,
        } => {
            let request = csi::CreateVolumeRequest {
                name,
                capacity_range: capacity(size),
                volume_capabilities: vec![access_capability(&access)],
                parameters: params.into_iter().collect::<HashMap<_, _>>(),
                volume_content_source: content_source(from_volume, from_snapshot),
                ..Default::default()
            };
            let response = call("CreateVolume", controller.create_volume(request)).await?;
            let volume = response.volume.unwrap_or_default();
            println!("{}", volume.volume_id);
        }
        Command::DeleteVolume { volume_id } => {
            let request = csi::DeleteVolumeRequest {
                volume_id,
                ..Default::default()
            };
            call("DeleteVolume", controller.delete_volume(request)).await?;
        }
        Command::CreateSnapshot { name, source } => {
            let request = csi::CreateSnapshotRequest {
                name,
                source_volume_id: source,
                ..Default::default()
            };
            let response = call("CreateSnapshot", controller.create_snapshot(request)).await?;
            let snapshot = response.snapshot.unwrap_or_default();
            println!("{}", snapshot.snapshot_id);
        }
        Command::DeleteSnapshot { snapshot_id } => {
            let request = csi::DeleteSnapshotRequest {
                snapshot_id,
                ..Default::default()
            };
            call("DeleteSnapshot", controller.delete_snapshot(request)).await?;
        }
        Command::Stage {
            volume_id,
            path,
            access,
        } => {
            let request = csi::NodeStageVolumeRequest {
                volume_id,
                staging_target_path: path,
                volume_capability: Some(access_capability(&access)),
                ..Default::default()
            };
            call("NodeStageVolume", node.node_stage_volume(request)).await?;
        }
        Command::Unstage { volume_id, path } => {
            let request = csi::NodeUnstageVolumeRequest {
                volume_id,
                staging_target_path: path,
            };
            call("NodeUnstageVolume", node.node_unstage_volume(request)).await?;
        }
        Command::Publish {
            volume_id,
            staging,
            target,
            ro,
            block,
        } => {
            let request = csi::NodePublishVolumeRequest {
                volume_id,
                staging_target_path: staging,
                target_path: target,
                volume_capability: Some(capability(None, block)),
                readonly: ro,
                ..Default::default()
            };
            call("NodePublishVolume", node.node_publish_volume(request)).await?;
        }
        Command::Unpublish { volume_id, target } => {
            let request = csi::NodeUnpublishVolumeRequest {
                volume_id,
                target_path: target,
            };
            call("NodeUnpublishVolume", node.node_unpublish_volume(request)).await?;
        }
        Command::Expand {
            volume_id,
            size,
            path,
        } => {
            let request = csi::ControllerExpandVolumeRequest {
                volume_id: volume_id.clone(),
                capacity_range: capacity(size),
                ..Default::default()
            };
            let response = call(
                "ControllerExpandVolume",
                controller.controller_expand_volume(request),
            )
            .await?;
            let mut bytes = response.capacity_bytes;
            match (response.node_expansion_required, path) {
                (true, Some(volume_path)) => {
                    let request = csi::NodeExpandVolumeRequest {
                        volume_id,
                        volume_path,
                        capacity_range: capacity(size),
                        ..Default::default()
                    };
                    bytes = call("NodeExpandVolume", node.node_expand_volume(request))
                        .await?
                        .capacity_bytes;
                }
                (true, None) => eprintln!(
                    "csi: the file system grows when the volume is next staged, or now with \
                     --path <staging path>"
                ),
                (false, _) => {}
            }
            println!("{bytes}");
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Call(rpc, status)) => {
            eprintln!(
                "csi: {rpc} failed: {}: {}",
                code_name(status.code()),
                status.message()
            );
            ExitCode::FAILURE
        }
        Err(Failure::Connect(error)) => {
            eprintln!("csi: {error:#} (is the driver running and serving this socket?)");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
        assert!(parse_size("1 furlong").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn code_names_follow_the_spec() {
        assert_eq!(code_name(tonic::Code::AlreadyExists), "ALREADY_EXISTS");
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(tonic::Code::Ok), "OK");
    }
}
