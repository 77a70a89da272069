//! How `kubectl liveclone status` shows hydrations: a table with progress
//! bars for people, a JSON document for scripts. Pure functions of the
//! objects, so that every rule here is unit-tested.

use std::time::Duration;

use kube::ResourceExt;
use serde::Serialize;

use crate::cli::status::progress_bar;
use crate::domain::human::{format_bytes, format_duration, format_rate};
use crate::domain::hydration::HydrationPhase;
use crate::k8s::VolumeHydration;

/// One hydration as the plugin reports it (also its JSON form).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HydrationView {
    pub namespace: String,
    pub name: String,
    pub pvc: String,
    pub node: String,
    /// `None` until the node agent has reported.
    pub phase: Option<HydrationPhase>,
    pub paused: bool,
    pub hydrated_bytes: u64,
    pub total_bytes: u64,
    /// 0 to 100.
    pub percent: f64,
    /// 0 when paused or not measured.
    pub bytes_per_second: u64,
    /// `None` when unknown (no rate yet, paused, ended).
    pub eta_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl HydrationView {
    pub fn of(vh: &VolumeHydration) -> Self {
        let status = vh.status.clone().unwrap_or_default();
        let hydrated_bytes = status.hydrated_bytes.unwrap_or(0);
        let total_bytes = status.total_bytes.unwrap_or(0);
        let percent = status
            .percent
            .unwrap_or_else(|| percent_of(hydrated_bytes, total_bytes));
        let bytes_per_second = if vh.spec.paused {
            0
        } else {
            status.bytes_per_second.unwrap_or(0)
        };
        let eta_seconds = eta_seconds(
            status.phase,
            vh.spec.paused,
            status.eta_seconds,
            hydrated_bytes,
            total_bytes,
            bytes_per_second,
        );
        HydrationView {
            namespace: vh.namespace().unwrap_or_default(),
            name: vh.name_any(),
            pvc: vh.spec.pvc.clone(),
            node: vh.spec.node.clone(),
            phase: status.phase,
            paused: vh.spec.paused,
            hydrated_bytes,
            total_bytes,
            percent: if percent.is_finite() {
                percent.clamp(0.0, 100.0)
            } else {
                0.0
            },
            bytes_per_second,
            eta_seconds,
            message: status.message,
        }
    }

    /// Whether nothing more will happen to this copy by itself.
    pub fn has_ended(&self) -> bool {
        self.phase.is_some_and(HydrationPhase::is_terminal)
    }
}

/// `hydrated` of `total` in percent; 0 for an empty total (nothing known).
pub fn percent_of(hydrated: u64, total: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    // Both far below 2^53 in practice; the ratio is what matters.
    (hydrated.min(total) as f64 / total as f64) * 100.0
}

/// The time left: the node's figure when it has one, else what remains at
/// the current rate; nothing for a paused, ended or unmeasured copy.
pub fn eta_seconds(
    phase: Option<HydrationPhase>,
    paused: bool,
    reported: Option<u64>,
    hydrated: u64,
    total: u64,
    bytes_per_second: u64,
) -> Option<u64> {
    match phase {
        Some(HydrationPhase::Hydrating | HydrationPhase::Switching) if !paused => {}
        _ => return None,
    }
    reported.or_else(|| {
        (bytes_per_second > 0).then(|| total.saturating_sub(hydrated).div_ceil(bytes_per_second))
    })
}

/// A percentage with one decimal, rounded down like the VolumeHydration's
/// own `progress`, so that a copy one byte short never reads 100.0%.
pub fn format_percent(percent: f64) -> String {
    format!("{:.1}%", (percent.clamp(0.0, 100.0) * 10.0).floor() / 10.0)
}

fn phase_cell(view: &HydrationView) -> String {
    match view.phase {
        Some(phase) => phase.as_str().to_owned(),
        None => "Unknown".to_owned(),
    }
}

fn rate_cell(view: &HydrationView) -> String {
    if view.paused && !view.has_ended() {
        "paused".to_owned()
    } else if view.bytes_per_second > 0 && !view.has_ended() {
        format_rate(view.bytes_per_second)
    } else {
        "-".to_owned()
    }
}

fn eta_cell(view: &HydrationView) -> String {
    match (view.phase, view.eta_seconds) {
        (Some(HydrationPhase::Complete), _) => "done".to_owned(),
        (_, Some(seconds)) => format_duration(Duration::from_secs(seconds)),
        _ => "-".to_owned(),
    }
}

/// The table: one row per hydration, sorted by namespace and claim, with
/// the node's explanation under any that is stalled or failed. With
/// `namespaces`, a NAMESPACE column first (for `-A`).
pub fn render_table(views: &[HydrationView], namespaces: bool) -> String {
    let mut sorted: Vec<&HydrationView> = views.iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.pvc).cmp(&(&b.namespace, &b.pvc)));
    let mut header = vec![
        "PVC", "PHASE", "PROGRESS", "COPIED", "RATE", "ETA", "NODE", "PAUSED",
    ];
    if namespaces {
        header.insert(0, "NAMESPACE");
    }
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| (*s).to_owned()).collect()];
    for view in &sorted {
        let mut row = vec![
            view.pvc.clone(),
            phase_cell(view),
            format!(
                "{} {:>6}",
                progress_bar(view.percent),
                format_percent(view.percent)
            ),
            format!(
                "{} of {}",
                format_bytes(view.hydrated_bytes),
                format_bytes(view.total_bytes)
            ),
            rate_cell(view),
            eta_cell(view),
            view.node.clone(),
            if view.paused { "yes" } else { "no" }.to_owned(),
        ];
        if namespaces {
            row.insert(0, view.namespace.clone());
        }
        rows.push(row);
    }
    let mut widths = vec![0usize; rows.first().map_or(0, Vec::len)];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (index, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        let Some(view) = index.checked_sub(1).and_then(|i| sorted.get(i)) else {
            continue;
        };
        if matches!(
            view.phase,
            Some(HydrationPhase::Stalled | HydrationPhase::Failed)
        ) {
            if let Some(message) = &view.message {
                out.push_str(&format!("    ! {message}\n"));
            }
        }
    }
    out
}

/// The line shown instead of a table when there is nothing to show.
pub fn nothing_line(namespace: Option<&str>, pvc: Option<&str>) -> String {
    match (namespace, pvc) {
        (Some(ns), Some(pvc)) => format!(
            "No hydration for PVC {pvc} in namespace {ns}: it is not a liveclone clone, or its \
             VolumeHydration has not been made yet (see `kubectl liveclone why {pvc} -n {ns}`).\n"
        ),
        (Some(ns), None) => format!(
            "No hydrations in namespace {ns}: no liveclone clone is copying or has copied here \
             (-A shows every namespace).\n"
        ),
        (None, _) => "No hydrations in any namespace: no liveclone clone exists.\n".to_owned(),
    }
}

/// The JSON document: `{"hydrations": [...]}`, sorted as the table is;
/// `pretty` for a person reading it, else one line (for `--watch`).
pub fn render_json(views: &[HydrationView], pretty: bool) -> serde_json::Result<String> {
    let mut sorted: Vec<&HydrationView> = views.iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.pvc).cmp(&(&b.namespace, &b.pvc)));
    let document = serde_json::json!({ "hydrations": sorted });
    let mut text = if pretty {
        serde_json::to_string_pretty(&document)?
    } else {
        serde_json::to_string(&document)?
    };
    text.push('\n');
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::VolumeHydrationStatus;

    const MIB: u64 = 1 << 20;

    fn hydration(
        pvc: &str,
        status: Option<VolumeHydrationStatus>,
        paused: bool,
    ) -> VolumeHydration {
        let mut vh = super::super::fixtures::clone_hydration(pvc, paused);
        vh.status = status;
        vh
    }

    fn hydrating(hydrated: u64, total: u64, rate: u64, eta: Option<u64>) -> VolumeHydrationStatus {
        VolumeHydrationStatus {
            phase: Some(HydrationPhase::Hydrating),
            hydrated_bytes: Some(hydrated),
            total_bytes: Some(total),
            percent: Some(percent_of(hydrated, total)),
            bytes_per_second: Some(rate),
            eta_seconds: eta,
            ..VolumeHydrationStatus::default()
        }
    }

    #[test]
    fn the_bar_fills_in_proportion_and_percent_rounds_down() {
        assert_eq!(format_percent(42.0), "42.0%");
        assert_eq!(format_percent(99.99), "99.9%");
        assert_eq!(format_percent(100.0), "100.0%");
        assert_eq!(format_percent(-3.0), "0.0%");
        let view = HydrationView::of(&hydration(
            "clone",
            Some(hydrating(512 * MIB, 1024 * MIB, 0, None)),
            false,
        ));
        let table = render_table(&[view], false);
        let row = table.lines().nth(1).expect("a row");
        let bar = &row[row.find('[').expect("a bar")..=row.find(']').expect("a bar")];
        let filled = bar.matches('#').count();
        let empty = bar.matches('.').count();
        assert_eq!(filled, empty, "half full: {bar}");
        assert!(row.contains(" 50.0%"), "{row}");
        assert!(row.contains("512.0 MiB of 1.0 GiB"), "{row}");
    }

    #[test]
    fn eta_uses_the_nodes_figure_else_the_rate() {
        let phase = Some(HydrationPhase::Hydrating);
        assert_eq!(eta_seconds(phase, false, Some(192), 0, 100, 1), Some(192));
        // 300 MiB left at 100 MiB/s.
        assert_eq!(
            eta_seconds(phase, false, None, 700 * MIB, 1000 * MIB, 100 * MIB),
            Some(3)
        );
        // A partial second counts as one.
        assert_eq!(eta_seconds(phase, false, None, 0, 101, 100), Some(2));
        assert_eq!(eta_seconds(phase, false, None, 0, 100, 0), None, "no rate");
        assert_eq!(eta_seconds(phase, true, Some(9), 0, 100, 1), None, "paused");
        for ended in [HydrationPhase::Complete, HydrationPhase::Failed] {
            assert_eq!(eta_seconds(Some(ended), false, Some(9), 0, 100, 1), None);
        }
        assert_eq!(eta_seconds(None, false, Some(9), 0, 100, 1), None);
    }

    #[test]
    fn rate_and_eta_cells_read_for_people() {
        let view = HydrationView::of(&hydration(
            "clone",
            Some(hydrating(420 * MIB, 1000 * MIB, 120 * MIB, Some(192))),
            false,
        ));
        assert_eq!(rate_cell(&view), "120.0 MiB/s");
        assert_eq!(eta_cell(&view), "3m12s");

        let paused = HydrationView::of(&hydration(
            "clone",
            Some(hydrating(420 * MIB, 1000 * MIB, 120 * MIB, Some(192))),
            true,
        ));
        assert_eq!(rate_cell(&paused), "paused");
        assert_eq!(eta_cell(&paused), "-");
        assert_eq!(paused.bytes_per_second, 0);

        let mut done = hydrating(1000 * MIB, 1000 * MIB, 0, None);
        done.phase = Some(HydrationPhase::Complete);
        let done = HydrationView::of(&hydration("clone", Some(done), false));
        assert_eq!(eta_cell(&done), "done");
        assert_eq!(rate_cell(&done), "-");
        assert!(done.has_ended());

        let unknown = HydrationView::of(&hydration("clone", None, false));
        assert_eq!(phase_cell(&unknown), "Unknown");
        assert_eq!(rate_cell(&unknown), "-");
        assert_eq!(eta_cell(&unknown), "-");
        assert_eq!(unknown.percent, 0.0);
        assert!(!unknown.has_ended());
    }

    #[test]
    fn the_table_lines_up_and_explains_stalls() {
        let mut stalled = hydrating(10 * MIB, 1000 * MIB, 0, None);
        stalled.phase = Some(HydrationPhase::Stalled);
        stalled.message = Some("Hydration stalled: check dmesg.".to_owned());
        let views = [
            HydrationView::of(&hydration(
                "b-clone",
                Some(hydrating(1, 2, 1, Some(1))),
                false,
            )),
            HydrationView::of(&hydration("a-clone", Some(stalled), false)),
        ];
        let table = render_table(&views, true);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE  PVC"), "{table}");
        assert!(lines[1].starts_with("team       a-clone"), "{table}");
        assert_eq!(lines[2], "    ! Hydration stalled: check dmesg.");
        assert!(lines[3].starts_with("team       b-clone"), "{table}");
        // Columns line up: PHASE starts at the same place on every row.
        let at = lines[0].find("PHASE").expect("PHASE");
        assert_eq!(&lines[1][at..at + 7], "Stalled");
        assert_eq!(&lines[3][at..at + 9], "Hydrating");
    }

    #[test]
    fn json_carries_exact_numbers() {
        let view = HydrationView::of(&hydration(
            "clone",
            Some(hydrating(420 * MIB, 1000 * MIB, 120 * MIB, Some(192))),
            false,
        ));
        let text = render_json(&[view], false).expect("serializes");
        assert_eq!(text.lines().count(), 1);
        let json: serde_json::Value = serde_json::from_str(&text).expect("parses");
        let first = &json["hydrations"][0];
        assert_eq!(first["pvc"], "clone");
        assert_eq!(first["namespace"], "team");
        assert_eq!(first["phase"], "Hydrating");
        assert_eq!(first["hydratedBytes"], 420 * MIB);
        assert_eq!(first["bytesPerSecond"], 120 * MIB);
        assert_eq!(first["etaSeconds"], 192);
        assert_eq!(first["paused"], false);
    }

    #[test]
    fn nothing_lines_say_where_nothing_was_found() {
        assert!(nothing_line(Some("ns"), Some("c")).contains("PVC c in namespace ns"));
        assert!(nothing_line(Some("ns"), None).contains("namespace ns"));
        assert!(nothing_line(None, None).contains("any namespace"));
    }
}
