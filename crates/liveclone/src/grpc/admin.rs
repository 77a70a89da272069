//! The node-local admin API: status and hydration control.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::domain::engine::{Engine, VolumeView};
use crate::domain::ids::VolumeId;
use crate::domain::model::{AccessKind, ContentSource, HydrationStage};
use crate::grpc::errors::run_blocking;
use crate::proto::admin::v1alpha1 as admin;
use crate::proto::admin::v1alpha1::admin_server::{Admin, AdminServer};
use crate::proto::admin::v1alpha1::set_hydration_request::Action;

#[derive(Clone)]
pub struct AdminService {
    engine: Arc<Engine>,
}

impl std::fmt::Debug for AdminService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminService")
    }
}

impl AdminService {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    pub fn into_server(self) -> AdminServer<Self> {
        AdminServer::new(self)
    }
}

/// The wire form of one volume's status.
pub fn volume_status(view: &VolumeView) -> admin::VolumeStatus {
    let record = &view.record;
    let access = match record.access {
        AccessKind::Block => "block".to_owned(),
        AccessKind::Filesystem { fs } => fs.to_string(),
    };
    let content_source = match &record.content_source {
        None => String::new(),
        Some(ContentSource::Volume(id)) => format!("volume {id}"),
        Some(ContentSource::Snapshot(id)) => format!("snapshot {id}"),
    };
    let hydration = match (&record.hydration, &record.last_hydration, &view.progress) {
        (Some(h), _, progress) => Some(admin::Hydration {
            phase: progress
                .as_ref()
                .map(|p| p.phase.to_string())
                .unwrap_or_else(|| "Pending".to_owned()),
            hydrated_bytes: progress.as_ref().map_or(0, |p| p.hydrated_bytes),
            total_bytes: progress.as_ref().map_or(h.source_bytes, |p| p.total_bytes),
            percent: progress.as_ref().map_or(0.0, |p| p.percent),
            bytes_per_second: progress.as_ref().map_or(0.0, |p| p.bytes_per_second),
            eta_seconds: progress.as_ref().and_then(|p| p.eta).map(|d| d.as_secs()),
            paused: h.paused,
            threshold: h.threshold,
            batch_size: h.batch_size,
            region_bytes: h.region_sectors.saturating_mul(crate::os::dm::SECTOR_BYTES),
            message: progress
                .as_ref()
                .map(|p| p.message.clone())
                .unwrap_or_else(|| {
                    if h.stage < HydrationStage::Enabled {
                        // File-system clones are trimmed by the monitor
                        // before their copy is enabled.
                        "the copy starts once the clone's free space is trimmed; the volume \
                         is usable meanwhile"
                            .to_owned()
                    } else {
                        "waiting for the first status reading".to_owned()
                    }
                }),
            source_image: h.source.to_string(),
            started_at: h.started_at,
            completed_at: 0,
        }),
        (None, Some(done), _) => Some(admin::Hydration {
            phase: "Complete".to_owned(),
            hydrated_bytes: done.bytes,
            total_bytes: done.bytes,
            percent: 100.0,
            message: "hydration complete; the volume is independent of its source".to_owned(),
            source_image: done.source.to_string(),
            started_at: done.started_at,
            completed_at: done.completed_at,
            ..Default::default()
        }),
        (None, None, _) => None,
    };
    admin::VolumeStatus {
        volume_id: record.id.to_string(),
        name: record.name.clone(),
        capacity_bytes: record.capacity_bytes,
        access,
        content_source,
        state: format!("{:?}", record.state),
        device: crate::domain::engine::dm_name(&record.id)
            .mapper_path()
            .display()
            .to_string(),
        device_present: view.device.is_some(),
        open_count: view.device.as_ref().map_or(0, |d| d.open_count),
        hydration,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_volumes(
        &self,
        _request: Request<admin::ListVolumesRequest>,
    ) -> Result<Response<admin::ListVolumesResponse>, Status> {
        let engine = Arc::clone(&self.engine);
        let span = tracing::info_span!("admin", rpc = "ListVolumes");
        let views = run_blocking(&span, move || engine.volume_views()).await?;
        Ok(Response::new(admin::ListVolumesResponse {
            volumes: views.iter().map(volume_status).collect(),
        }))
    }

    async fn set_hydration(
        &self,
        request: Request<admin::SetHydrationRequest>,
    ) -> Result<Response<admin::SetHydrationResponse>, Status> {
        let request = request.into_inner();
        let id: VolumeId = request
            .volume_id
            .parse()
            .map_err(|e| Status::invalid_argument(format!("volume_id: {e}")))?;
        let action = Action::try_from(request.action)
            .map_err(|_| Status::invalid_argument("unknown action"))?;
        let engine = Arc::clone(&self.engine);
        let span = tracing::info_span!("admin", rpc = "SetHydration", volume = %id);
        let view = run_blocking(&span, move || {
            match action {
                Action::Pause => engine.pause_hydration(&id)?,
                Action::Resume => engine.resume_hydration(&id)?,
                Action::Tune => {
                    if request.threshold.is_none() && request.batch_size.is_none() {
                        return Err(crate::domain::error::DomainError::invalid_argument(
                            "tune needs a threshold, a batch size or both",
                        ));
                    }
                    engine.tune_hydration(&id, request.threshold, request.batch_size)?;
                }
                Action::Unspecified => {
                    return Err(crate::domain::error::DomainError::invalid_argument(
                        "action is missing (PAUSE, RESUME or TUNE)",
                    ))
                }
            }
            engine
                .volume_views()?
                .into_iter()
                .find(|v| v.record.id == id)
                .ok_or_else(|| crate::domain::error::DomainError::not_found("volume vanished"))
        })
        .await?;
        Ok(Response::new(admin::SetHydrationResponse {
            volume: Some(volume_status(&view)),
        }))
    }
}
