//! `kubectl liveclone status [PVC] [-n NS | -A] [--watch] [-o json]`.

use std::collections::BTreeMap;
use std::io::IsTerminal;

use kube::api::{Api, ListParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use tokio_stream::StreamExt;

use super::render::{nothing_line, render_json, render_table, HydrationView};
use super::{emit, is_not_served, Output, PluginError, PluginResult, StatusArgs, Target};
use crate::domain::hydration::HydrationPhase;
use crate::k8s::VolumeHydration;

struct Scope<'a> {
    /// `None` for every namespace.
    namespace: Option<&'a str>,
    pvc: Option<&'a str>,
    output: Output,
}

impl Scope<'_> {
    fn views(&self, objects: impl IntoIterator<Item = VolumeHydration>) -> Vec<HydrationView> {
        objects
            .into_iter()
            .filter(|vh| self.pvc.is_none_or(|pvc| vh.spec.pvc == pvc))
            .map(|vh| HydrationView::of(&vh))
            .collect()
    }

    /// What one look at `views` prints.
    fn frame(&self, views: &[HydrationView], watching: bool) -> PluginResult<String> {
        match self.output {
            Output::Json => render_json(views, !watching)
                .map_err(|e| PluginError::Refused(format!("encoding JSON: {e}"))),
            Output::Human if views.is_empty() => Ok(nothing_line(self.namespace, self.pvc)),
            Output::Human => Ok(render_table(views, self.namespace.is_none())),
        }
    }
}

pub async fn run(target: &Target, args: &StatusArgs) -> PluginResult<()> {
    let (api, namespace): (Api<VolumeHydration>, Option<&str>) = if args.all_namespaces {
        (Api::all(target.client.clone()), None)
    } else {
        (
            Api::namespaced(target.client.clone(), &target.namespace),
            Some(target.namespace.as_str()),
        )
    };
    let scope = Scope {
        namespace,
        pvc: args.pvc.as_deref(),
        output: args.output,
    };
    // One list first, even for --watch: it tells a cluster without the
    // CRDs (or without access) apart before the watcher's retries would
    // hide it.
    let list = api.list(&ListParams::default()).await.map_err(|e| {
        if is_not_served(&e) {
            PluginError::NotInstalled
        } else {
            PluginError::api("listing VolumeHydrations", e)
        }
    })?;
    if !args.watch {
        let views = scope.views(list.items);
        let frame = scope.frame(&views, false)?;
        if views.is_empty() && scope.pvc.is_some() {
            // Asked about one claim that has no hydration: say so and fail,
            // so that scripts do not mistake it for a finished copy.
            return Err(PluginError::Refused(frame.trim_end().to_owned()));
        }
        emit(&frame);
        return Ok(());
    }
    watch(api, &scope).await
}

/// Redraws on every change the API's watch delivers (no polling) until
/// every hydration in scope has ended, or Ctrl-C. With nothing in scope it
/// keeps waiting for one to appear, as `kubectl get -w` does.
async fn watch(api: Api<VolumeHydration>, scope: &Scope<'_>) -> PluginResult<()> {
    let terminal = std::io::stdout().is_terminal() && scope.output == Output::Human;
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let interrupt = tokio::signal::ctrl_c();
    let mut interrupt = std::pin::pin!(interrupt);
    let mut objects: BTreeMap<(String, String), VolumeHydration> = BTreeMap::new();
    let mut init: BTreeMap<(String, String), VolumeHydration> = BTreeMap::new();
    let mut listed = false;
    let mut last_frame = String::new();
    loop {
        let event = tokio::select! {
            _ = &mut interrupt => return Err(PluginError::Interrupted),
            event = stream.next() => event,
        };
        let Some(event) = event else {
            return Err(PluginError::Refused(
                "the watch of VolumeHydrations ended".to_owned(),
            ));
        };
        let key = |vh: &VolumeHydration| (vh.namespace().unwrap_or_default(), vh.name_any());
        match event {
            Ok(watcher::Event::Init) => init.clear(),
            Ok(watcher::Event::InitApply(vh)) => {
                init.insert(key(&vh), vh);
            }
            Ok(watcher::Event::InitDone) => {
                objects = std::mem::take(&mut init);
                listed = true;
            }
            Ok(watcher::Event::Apply(vh)) => {
                objects.insert(key(&vh), vh);
            }
            Ok(watcher::Event::Delete(vh)) => {
                objects.remove(&key(&vh));
            }
            Err(e) => {
                // The backoff retries; say why the picture may be old.
                eprintln!("kubectl-liveclone: watching VolumeHydrations: {e} (retrying)");
                continue;
            }
        }
        if !listed {
            continue;
        }
        let views = scope.views(objects.values().cloned());
        let frame = scope.frame(&views, true)?;
        if frame != last_frame {
            if terminal && !last_frame.is_empty() {
                // Cursor up over the last frame, then clear to the end.
                emit(&format!("\x1b[{}A\x1b[J", last_frame.lines().count()));
            } else if !last_frame.is_empty() && scope.output == Output::Human {
                emit("\n");
            }
            emit(&frame);
            last_frame = frame;
        }
        if !views.is_empty() && views.iter().all(HydrationView::has_ended) {
            let failed: Vec<&str> = views
                .iter()
                .filter(|view| view.phase == Some(HydrationPhase::Failed))
                .map(|view| view.pvc.as_str())
                .collect();
            if failed.is_empty() {
                return Ok(());
            }
            return Err(PluginError::Refused(format!(
                "every copy has ended, but these failed: {} (see `kubectl liveclone why PVC`)",
                failed.join(", ")
            )));
        }
    }
}
