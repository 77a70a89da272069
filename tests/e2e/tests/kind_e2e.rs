//! The scenarios on a kind cluster (`make e2e`; docs/E2E.md). Each runs in
//! its own namespace, deleted afterwards; the cluster is set up once per
//! run. Run them one at a time (`--test-threads=1`): the node-plugin
//! restart would otherwise land in the middle of the others.

use std::time::Duration;

use anyhow::{bail, Result};
use liveclone_e2e::config::STORAGE_CLASS;
use liveclone_e2e::manifests::{claim, Mode, Source};
use liveclone_e2e::scenario::{run, Scenario, SLOW_CLASS};
use serde_json::json;

/// Data written on the sources: enough that a rate-capped copy takes long
/// enough to act on, small enough for a laptop.
const DATA_MIB: u32 = 256;
/// The rate cap the scenarios that act during a copy set first: 256 MiB
/// then take over a minute.
const SLOW_RATE: u64 = 4 * 1024 * 1024;

/// Source claim with data, then a clone of it (in `class`) with a pod on it
/// that checks the data at once and stays up; returns the sum.
async fn source_and_clone(s: &Scenario, class: &str, throttle: bool) -> Result<String> {
    s.create_claim(&claim(
        "source",
        class,
        "1Gi",
        Mode::Filesystem,
        &Source::Empty,
    ))
    .await?;
    let sum = s.fill("source", Mode::Filesystem, DATA_MIB).await?;
    s.create_claim(&claim(
        "clone",
        class,
        "1Gi",
        Mode::Filesystem,
        &Source::Claim("source".into()),
    ))
    .await?;
    s.start_verifier("clone-reader", "clone", Mode::Filesystem, &sum, true)
        .await?;
    if throttle {
        // The VolumeHydration exists as soon as the clone does (before
        // the pod's volume is staged); the slow class holds the copy back
        // until the cap applies.
        s.wait_hydration("clone", "to exist", s.config.wait(300), |_| true)
            .await?;
        s.set_rate_limit("clone", Some(SLOW_RATE)).await?;
    }
    // Reads through the clone while it hydrates.
    s.wait_pod_printed("clone-reader", "verified", s.config.wait(600))
        .await?;
    Ok(sum)
}

/// Waits until some data is copied but not all (a throttled clone).
async fn wait_partly_copied(s: &Scenario, claim: &str) -> Result<u64> {
    let view = s
        .wait_hydration(claim, "some bytes copied", s.config.wait(300), |v| {
            v.hydrated_bytes > 0 && !v.is_complete()
        })
        .await?;
    Ok(view.hydrated_bytes)
}

#[tokio::test]
async fn clone_of_a_claim_holds_every_byte() -> Result<()> {
    run("clone", |s| async move {
        let sum = source_and_clone(&s, STORAGE_CLASS, false).await?;
        s.wait_complete("clone").await?;
        s.delete_pod("clone-reader").await?;
        // Again after the switch to a linear table.
        s.verify("clone-after", "clone", Mode::Filesystem, &sum)
            .await
    })
    .await
}

#[tokio::test]
async fn restore_of_a_snapshot_holds_every_byte() -> Result<()> {
    run("restore", |s| async move {
        s.create_claim(&claim(
            "source",
            STORAGE_CLASS,
            "1Gi",
            Mode::Filesystem,
            &Source::Empty,
        ))
        .await?;
        let sum = s.fill("source", Mode::Filesystem, DATA_MIB).await?;
        s.create_snapshot("snap", "source").await?;
        s.create_claim(&claim(
            "restored",
            STORAGE_CLASS,
            "1Gi",
            Mode::Filesystem,
            &Source::Snapshot("snap".into()),
        ))
        .await?;
        // The restore waits for the snapshot to be ready; the pod for both.
        s.verify("restored-reader", "restored", Mode::Filesystem, &sum)
            .await?;
        s.wait_complete("restored").await?;
        s.verify("restored-after", "restored", Mode::Filesystem, &sum)
            .await
    })
    .await
}

#[tokio::test]
async fn raw_block_clone_holds_every_byte() -> Result<()> {
    run("block", |s| async move {
        s.create_claim(&claim(
            "source",
            STORAGE_CLASS,
            "1Gi",
            Mode::Block,
            &Source::Empty,
        ))
        .await?;
        // The sum is of the whole device, written part and zeroes alike.
        let sum = s.fill("source", Mode::Block, DATA_MIB).await?;
        s.create_claim(&claim(
            "clone",
            STORAGE_CLASS,
            "1Gi",
            Mode::Block,
            &Source::Claim("source".into()),
        ))
        .await?;
        s.verify("clone-reader", "clone", Mode::Block, &sum).await?;
        s.wait_complete("clone").await?;
        s.verify("clone-after", "clone", Mode::Block, &sum).await
    })
    .await
}

#[tokio::test]
async fn a_clone_grows_while_it_hydrates() -> Result<()> {
    run("expand", |s| async move {
        let sum = source_and_clone(&s, SLOW_CLASS, true).await?;
        wait_partly_copied(&s, "clone").await?;
        let patch = json!({"spec": {"resources": {"requests": {"storage": "2Gi"}}}});
        s.kubectl_merge_patch("pvc", "clone", &patch)?;
        // Controller expansion, then the node grows the mounted file system
        // (kubelet clears the capacity only after NodeExpandVolume).
        s.wait_for("clone's capacity 2Gi", s.config.wait(300), || async {
            let capacity = s
                .claim("clone")
                .await?
                .and_then(|c| c.status)
                .and_then(|st| st.capacity)
                .and_then(|c| c.get("storage").cloned())
                .map(|q| q.0)
                .unwrap_or_default();
            Ok(((capacity == "2Gi").then_some(()), capacity))
        })
        .await?;
        s.wait_for("the mounted file system to grow", s.config.wait(300), || async {
            let df = s.exec("clone-reader", &["df", "-k", "/data"])?;
            let kib = df_size_kib(&df)?;
            // ext4 keeps a few percent for itself: well over 1 GiB is grown.
            Ok(((kib > 1_600_000).then_some(()), format!("{kib} KiB")))
        })
        .await?;
        let view = s.hydration("clone").await?;
        if view.as_ref().is_some_and(|v| v.is_complete()) {
            bail!("the clone completed before the check; the expansion was not tested during hydration");
        }
        s.set_rate_limit("clone", None).await?;
        s.wait_complete("clone").await?;
        s.delete_pod("clone-reader").await?;
        s.verify("clone-after", "clone", Mode::Filesystem, &sum).await
    })
    .await
}

#[tokio::test]
async fn a_clone_outlives_its_deleted_source() -> Result<()> {
    run("delete-source", |s| async move {
        let sum = source_and_clone(&s, SLOW_CLASS, true).await?;
        wait_partly_copied(&s, "clone").await?;
        s.delete_claim("source").await?;
        s.wait_for("the source claim to go", s.config.wait(300), || async {
            Ok((
                s.claim("source").await?.is_none().then_some(()),
                "still there".into(),
            ))
        })
        .await?;
        let view = s.hydration("clone").await?;
        if view.as_ref().is_some_and(|v| v.is_complete()) {
            bail!("the clone completed before its source went; nothing was tested");
        }
        s.set_rate_limit("clone", None).await?;
        s.wait_complete("clone").await?;
        s.delete_pod("clone-reader").await?;
        s.verify("clone-after", "clone", Mode::Filesystem, &sum)
            .await
    })
    .await
}

#[tokio::test]
async fn hydration_resumes_after_a_node_plugin_restart() -> Result<()> {
    run("restart", |s| async move {
        let sum = source_and_clone(&s, SLOW_CLASS, true).await?;
        let before = wait_partly_copied(&s, "clone").await?;
        s.restart_node_plugin().await?;
        // The kernel kept copying; the new plugin reports from there. For a
        // while, every report must be at or past what was seen before.
        let mut lowest = u64::MAX;
        for _ in 0..20 {
            if let Some(view) = s.hydration("clone").await? {
                lowest = lowest.min(view.hydrated_bytes);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if lowest < before {
            bail!("progress went back after the restart: {before} bytes before, {lowest} after");
        }
        s.set_rate_limit("clone", None).await?;
        s.wait_complete("clone").await?;
        s.delete_pod("clone-reader").await?;
        s.verify("clone-after", "clone", Mode::Filesystem, &sum)
            .await
    })
    .await
}

#[tokio::test]
async fn pause_holds_the_copy_and_resume_finishes_it() -> Result<()> {
    run("pause", |s| async move {
        let sum = source_and_clone(&s, SLOW_CLASS, true).await?;
        wait_partly_copied(&s, "clone").await?;
        s.kubectl_merge_patch("vh", "clone", &json!({"spec": {"paused": true}}))?;
        s.wait_hydration("clone", "rate \"paused\"", s.config.wait(120), |v| {
            v.rate.as_deref() == Some("paused")
        })
        .await?;
        // Copies in flight when the pause landed may still finish.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let held = s.hydration("clone").await?.map(|v| v.hydrated_bytes);
        tokio::time::sleep(Duration::from_secs(20)).await;
        let later = s.hydration("clone").await?;
        if later.as_ref().map(|v| v.hydrated_bytes) != held {
            bail!("the copy moved while paused: {held:?} then {later:?}");
        }
        if later.as_ref().is_some_and(|v| v.is_complete()) {
            bail!("the clone completed while paused");
        }
        s.set_rate_limit("clone", None).await?;
        s.kubectl_merge_patch("vh", "clone", &json!({"spec": {"paused": false}}))?;
        s.wait_complete("clone").await?;
        s.delete_pod("clone-reader").await?;
        s.verify("clone-after", "clone", Mode::Filesystem, &sum)
            .await
    })
    .await
}

/// The size column of `df -k`'s one data line.
fn df_size_kib(df: &str) -> Result<u64> {
    let Some(line) = df.lines().nth(1) else {
        bail!("unexpected df output: {df:?}");
    };
    match line.split_whitespace().nth(1).map(str::parse::<u64>) {
        Some(Ok(kib)) => Ok(kib),
        _ => bail!("unexpected df output: {df:?}"),
    }
}
