//! The CSI Identity service: who the plugin is, what it offers, and whether
//! it can work right now.
//!
//! Both the controller and the node plugin serve it; the CO calls it first,
//! and calls `Probe` again and again (the liveness probe sidecar does).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::proto::csi::v1::identity_server::{Identity, IdentityServer};
use crate::proto::csi::v1::plugin_capability::{self, service, volume_expansion};
use crate::proto::csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

/// The driver name: what StorageClasses name as `provisioner` and
/// CSIDriver objects as `metadata.name`. It must never change once volumes
/// exist, since Kubernetes records it in every PersistentVolume.
pub const PLUGIN_NAME: &str = "csi.liveclone.io";

/// Reported as `vendor_version`: the version of this crate.
pub const VENDOR_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why the plugin cannot serve Controller or Node calls at the moment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// Still starting up (e.g. recovering state after a restart) and
    /// otherwise healthy: waiting is enough.
    #[error("still initializing: {0}")]
    Initializing(String),
    /// Cannot work until someone fixes something, e.g. "the kernel has no
    /// dm-clone target: modprobe dm-clone failed: ...". The text goes to the
    /// CO as is, so it should say what is wrong and, if known, what to do.
    #[error("{0}")]
    Unhealthy(String),
}

/// Answers `Probe`.
///
/// `check` runs on the async runtime on every probe, which may come every
/// few seconds: it must return promptly, typically a state that startup or
/// a background task keeps up to date, never run `modprobe` itself.
pub trait Readiness: Send + Sync {
    /// `Ok(())` when Controller and Node calls can be served.
    fn check(&self) -> Result<(), NotReady>;
}

/// A [`Readiness`] for plugins with nothing to wait for.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysReady;

impl Readiness for AlwaysReady {
    fn check(&self) -> Result<(), NotReady> {
        Ok(())
    }
}

/// The Identity service implementation.
#[derive(Clone)]
pub struct IdentityService {
    readiness: Arc<dyn Readiness>,
}

impl IdentityService {
    /// An Identity service whose `Probe` reports what `readiness` says.
    pub fn new(readiness: Arc<dyn Readiness>) -> Self {
        Self { readiness }
    }

    /// The tonic service, ready to be added to the routes given to
    /// [`crate::grpc::server::serve_unix`].
    pub fn into_server(self) -> IdentityServer<Self> {
        IdentityServer::new(self)
    }
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService").finish_non_exhaustive()
    }
}

/// What liveclone offers, in the order the CO sees them.
fn plugin_capabilities() -> Vec<PluginCapability> {
    let service = |kind: service::Type| PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service {
                r#type: kind.into(),
            },
        )),
    };
    vec![
        // CreateVolume, DeleteVolume and friends are implemented.
        service(service::Type::ControllerService),
        // Volumes live in a node's local pool: they are reachable only from
        // that node, which the CO must take into account when scheduling.
        service(service::Type::VolumeAccessibilityConstraints),
        // A clone (or any volume) can grow while it is published.
        PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: volume_expansion::Type::Online.into(),
                },
            )),
        },
    ]
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: PLUGIN_NAME.to_owned(),
            vendor_version: VENDOR_VERSION.to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: plugin_capabilities(),
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        // The spec (ProbeResponse, and "Probe Errors" in spec.md) separates
        // two ways of not being ready: a plugin that is only still starting
        // answers successfully with ready = false, while one that is
        // unhealthy or lacks a dependency it needs must fail the call, with
        // FAILED_PRECONDITION for exactly those two conditions, so that the
        // CO may restart it or alert someone.
        match self.readiness.check() {
            Ok(()) => Ok(Response::new(ProbeResponse { ready: Some(true) })),
            Err(NotReady::Initializing(reason)) => {
                tracing::debug!(%reason, "probe: not ready yet");
                Ok(Response::new(ProbeResponse { ready: Some(false) }))
            }
            Err(NotReady::Unhealthy(reason)) => {
                tracing::debug!(%reason, "probe: unhealthy");
                Err(Status::failed_precondition(reason))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A readiness whose answer a test can change between probes.
    struct Scripted(Mutex<Result<(), NotReady>>);

    impl Readiness for Scripted {
        fn check(&self) -> Result<(), NotReady> {
            self.0.lock().map_or_else(
                |_| Err(NotReady::Unhealthy("test readiness poisoned".to_owned())),
                |answer| answer.clone(),
            )
        }
    }

    fn service_answering(answer: Result<(), NotReady>) -> IdentityService {
        IdentityService::new(Arc::new(Scripted(Mutex::new(answer))))
    }

    #[tokio::test]
    async fn probe_reports_ready() {
        let service = service_answering(Ok(()));
        let response = service
            .probe(Request::new(ProbeRequest {}))
            .await
            .expect("a ready plugin answers Probe successfully");
        assert_eq!(response.into_inner().ready, Some(true));
    }

    #[tokio::test]
    async fn probe_while_initializing_succeeds_with_ready_false() {
        let service = service_answering(Err(NotReady::Initializing("loading state".to_owned())));
        let response = service
            .probe(Request::new(ProbeRequest {}))
            .await
            .expect("an initializing plugin answers Probe successfully");
        assert_eq!(response.into_inner().ready, Some(false));
    }

    #[tokio::test]
    async fn probe_when_unhealthy_fails_with_failed_precondition_and_the_reason() {
        let reason = "the kernel has no dm-clone target: modprobe dm-clone failed";
        let service = service_answering(Err(NotReady::Unhealthy(reason.to_owned())));
        let status = service
            .probe(Request::new(ProbeRequest {}))
            .await
            .expect_err("an unhealthy plugin fails Probe");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(status.message(), reason);
    }

    #[test]
    fn capabilities_are_controller_topology_and_online_expansion() {
        let capabilities = plugin_capabilities();
        let services: Vec<service::Type> = capabilities
            .iter()
            .filter_map(|capability| match &capability.r#type {
                Some(plugin_capability::Type::Service(service)) => Some(service.r#type()),
                _ => None,
            })
            .collect();
        assert_eq!(
            services,
            [
                service::Type::ControllerService,
                service::Type::VolumeAccessibilityConstraints
            ]
        );
        let expansion: Vec<volume_expansion::Type> = capabilities
            .iter()
            .filter_map(|capability| match &capability.r#type {
                Some(plugin_capability::Type::VolumeExpansion(expansion)) => {
                    Some(expansion.r#type())
                }
                _ => None,
            })
            .collect();
        assert_eq!(expansion, [volume_expansion::Type::Online]);
    }

    #[test]
    fn plugin_name_is_a_valid_csi_name() {
        // The spec: at most 63 characters, domain-name notation, starting
        // and ending with an alphanumeric character.
        assert!(PLUGIN_NAME.len() <= 63);
        assert!(PLUGIN_NAME
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'));
        assert!(PLUGIN_NAME.starts_with(|c: char| c.is_ascii_alphanumeric()));
        assert!(PLUGIN_NAME.ends_with(|c: char| c.is_ascii_alphanumeric()));
    }
}
