//! `liveclone status`: every volume and hydration on the node.

use std::time::Duration;

use clap::Args;

use crate::domain::human::{format_bytes, format_duration};
use crate::grpc::client::connect_unix;
use crate::proto::admin::v1alpha1::admin_client::AdminClient;
use crate::proto::admin::v1alpha1::{Hydration, ListVolumesRequest, VolumeStatus};

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The driver's socket.
    #[arg(long, env = "CSI_ENDPOINT", default_value = super::DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// One JSON document, for scripts.
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// Redraw every interval with progress bars until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between redraws with --watch.
    #[arg(long, default_value_t = 2)]
    pub interval: u64,
}

const BAR_WIDTH: usize = 24;

/// `[#########...............]`, filled in proportion to `percent`.
pub fn progress_bar(percent: f64) -> String {
    let clamped = percent.clamp(0.0, 100.0);
    // Both values are small and non-negative: the casts cannot wrap.
    let filled = ((clamped / 100.0) * BAR_WIDTH as f64).floor() as usize;
    format!(
        "[{}{}]",
        "#".repeat(filled.min(BAR_WIDTH)),
        ".".repeat(BAR_WIDTH - filled.min(BAR_WIDTH))
    )
}

fn source_column(volume: &VolumeStatus) -> String {
    if volume.content_source.is_empty() {
        "-".to_owned()
    } else {
        volume.content_source.clone()
    }
}

fn hydration_columns(hydration: Option<&Hydration>, with_bar: bool) -> [String; 4] {
    let Some(h) = hydration else {
        return ["-".into(), "-".into(), "-".into(), "-".into()];
    };
    let phase = if h.paused {
        format!("{} (paused)", h.phase)
    } else {
        h.phase.clone()
    };
    let progress = if with_bar {
        format!("{} {:5.1}%", progress_bar(h.percent), h.percent)
    } else {
        format!(
            "{:.1}% ({} / {})",
            h.percent,
            format_bytes(h.hydrated_bytes),
            format_bytes(h.total_bytes)
        )
    };
    let rate = if h.bytes_per_second > 0.0 {
        // Rates are far below 2^53 bytes/s: exact enough as u64.
        format!("{}/s", format_bytes(h.bytes_per_second as u64))
    } else {
        "-".into()
    };
    let eta = h
        .eta_seconds
        .map(|s| format_duration(Duration::from_secs(s)))
        .unwrap_or_else(|| "-".into());
    [phase, progress, rate, eta]
}

/// A table with one row per volume (and the hydration message below each
/// clone that has one worth reading).
pub fn render_table(volumes: &[VolumeStatus], with_bar: bool) -> String {
    let header = [
        "VOLUME", "NAME", "SIZE", "ACCESS", "SOURCE", "PHASE", "PROGRESS", "RATE", "ETA",
    ];
    let mut rows: Vec<[String; 9]> = vec![header.map(str::to_owned)];
    for volume in volumes {
        let [phase, progress, rate, eta] = hydration_columns(volume.hydration.as_ref(), with_bar);
        rows.push([
            volume.volume_id.clone(),
            volume.name.clone(),
            format_bytes(volume.capacity_bytes),
            volume.access.clone(),
            source_column(volume),
            phase,
            progress,
            rate,
            eta,
        ]);
    }
    let mut widths = [0usize; 9];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (index, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if index == 0 {
            continue;
        }
        if let Some(h) = volumes.get(index - 1).and_then(|v| v.hydration.as_ref()) {
            if matches!(h.phase.as_str(), "Stalled" | "Failed") {
                out.push_str(&format!("    ! {}\n", h.message));
            }
        }
    }
    if volumes.is_empty() {
        out.push_str("(no volumes)\n");
    }
    out
}

pub fn render_json(volumes: &[VolumeStatus]) -> anyhow::Result<String> {
    let values: Vec<serde_json::Value> = volumes
        .iter()
        .map(|v| {
            serde_json::json!({
                "volumeId": v.volume_id,
                "name": v.name,
                "capacityBytes": v.capacity_bytes,
                "access": v.access,
                "contentSource": v.content_source,
                "state": v.state,
                "device": v.device,
                "devicePresent": v.device_present,
                "openCount": v.open_count,
                "hydration": v.hydration.as_ref().map(|h| serde_json::json!({
                    "phase": h.phase,
                    "hydratedBytes": h.hydrated_bytes,
                    "totalBytes": h.total_bytes,
                    "percent": h.percent,
                    "bytesPerSecond": h.bytes_per_second,
                    "etaSeconds": h.eta_seconds,
                    "paused": h.paused,
                    "threshold": h.threshold,
                    "batchSize": h.batch_size,
                    "regionBytes": h.region_bytes,
                    "message": h.message,
                    "sourceImage": h.source_image,
                    "startedAt": h.started_at,
                    "completedAt": h.completed_at,
                })),
            })
        })
        .collect();
    Ok(serde_json::to_string_pretty(
        &serde_json::json!({ "volumes": values }),
    )?)
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let mut client = AdminClient::new(connect_unix(&args.endpoint).await?);
    loop {
        let volumes = client
            .list_volumes(ListVolumesRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("listing volumes: {}", s.message()))?
            .into_inner()
            .volumes;
        if args.json {
            super::emit(&format!("{}\n", render_json(&volumes)?))?;
            return Ok(());
        }
        if !args.watch {
            super::emit(&render_table(&volumes, false))?;
            return Ok(());
        }
        // Clear the screen and home the cursor, then redraw.
        if !super::emit(&format!("\x1b[2J\x1b[H{}", render_table(&volumes, true)))? {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(args.interval.max(1))) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_fills_in_proportion() {
        assert_eq!(progress_bar(0.0), format!("[{}]", ".".repeat(BAR_WIDTH)));
        assert_eq!(progress_bar(100.0), format!("[{}]", "#".repeat(BAR_WIDTH)));
        assert_eq!(progress_bar(50.0).matches('#').count(), BAR_WIDTH / 2);
        assert_eq!(progress_bar(250.0), progress_bar(100.0));
    }

    #[test]
    fn table_shows_hydration_and_stall_messages() {
        let volumes = vec![VolumeStatus {
            volume_id: "lcv-1".into(),
            name: "pvc-a".into(),
            capacity_bytes: 1 << 30,
            access: "ext4".into(),
            content_source: "volume lcv-0".into(),
            hydration: Some(Hydration {
                phase: "Stalled".into(),
                percent: 42.0,
                hydrated_bytes: 430 << 20,
                total_bytes: 1 << 30,
                message: "no progress for 45s".into(),
                ..Default::default()
            }),
            ..Default::default()
        }];
        let table = render_table(&volumes, false);
        assert!(table.starts_with("VOLUME"), "{table}");
        assert!(table.contains("Stalled"), "{table}");
        assert!(table.contains("42.0%"), "{table}");
        assert!(table.contains("! no progress for 45s"), "{table}");
        let json = render_json(&volumes).expect("json");
        assert!(json.contains("\"phase\": \"Stalled\""), "{json}");
    }
}
