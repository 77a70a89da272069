//! `liveclone hydration pause|resume|tune`.

use clap::{Args, Subcommand};

use crate::grpc::client::connect_unix;
use crate::proto::admin::v1alpha1::admin_client::AdminClient;
use crate::proto::admin::v1alpha1::set_hydration_request::Action;
use crate::proto::admin::v1alpha1::SetHydrationRequest;

#[derive(Debug, Clone, Args)]
pub struct HydrationArgs {
    /// The driver's socket.
    #[arg(long, env = "CSI_ENDPOINT", default_value = super::DEFAULT_ENDPOINT, global = true)]
    pub endpoint: String,
    #[command(subcommand)]
    pub action: HydrationAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum HydrationAction {
    /// Stop background copying (reads and writes keep working).
    Pause { volume_id: String },
    /// Start background copying again.
    Resume { volume_id: String },
    /// Change how much is copied at once, in regions.
    Tune {
        volume_id: String,
        /// Most regions copied at once.
        #[arg(long)]
        threshold: Option<u32>,
        /// Contiguous regions per copy.
        #[arg(long)]
        batch_size: Option<u32>,
    },
}

pub async fn run(args: HydrationArgs) -> anyhow::Result<()> {
    let mut client = AdminClient::new(connect_unix(&args.endpoint).await?);
    let request = match args.action {
        HydrationAction::Pause { volume_id } => SetHydrationRequest {
            volume_id,
            action: Action::Pause.into(),
            ..Default::default()
        },
        HydrationAction::Resume { volume_id } => SetHydrationRequest {
            volume_id,
            action: Action::Resume.into(),
            ..Default::default()
        },
        HydrationAction::Tune {
            volume_id,
            threshold,
            batch_size,
        } => SetHydrationRequest {
            volume_id,
            action: Action::Tune.into(),
            threshold,
            batch_size,
        },
    };
    let response = client
        .set_hydration(request)
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    if let Some(volume) = response.volume {
        super::emit(&super::status::render_table(&[volume], false))?;
    }
    Ok(())
}
