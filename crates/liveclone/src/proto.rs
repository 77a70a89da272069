//! Code generated from proto/csi.proto at build time.
//!
//! [`csi::v1`] holds the prost messages and the tonic clients and servers of
//! the vendored CSI spec. Messages with fields that the spec marks
//! `csi_secret` do not derive `Debug`: `build.rs` writes one for each of them
//! that prints those fields as [`Redacted`], so that logging a request can
//! never leak the credentials it carries.

use std::fmt;

/// The CSI v1 protocol.
pub mod csi {
    /// Package `csi.v1`: messages, `*_client` and `*_server` modules.
    // The generated code follows protobuf's shapes and comments, not this
    // crate's lint rules; the comments in particular are the spec's prose,
    // which rustdoc and clippy read as (badly formatted) Markdown.
    #[allow(
        clippy::all,
        clippy::pedantic,
        clippy::unwrap_used,
        rustdoc::bare_urls,
        rustdoc::broken_intra_doc_links,
        rustdoc::invalid_html_tags
    )]
    pub mod v1 {
        tonic::include_proto!("csi.v1");
        include!(concat!(env!("OUT_DIR"), "/csi.v1.redacted_debug.rs"));
    }
}

/// liveclone's node-local admin API (`proto/liveclone_admin.proto`).
pub mod admin {
    #[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
    pub mod v1alpha1 {
        tonic::include_proto!("liveclone.admin.v1alpha1");
    }
}

/// How a `csi_secret` field shows in `Debug` output: the amount of data, so
/// that a log still tells an empty secret map from a filled one, but never a
/// key or a value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Redacted {
    /// A map with this many entries.
    Keys(usize),
    /// A repeated field with this many elements.
    Items(usize),
    /// A singular field.
    Value,
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Redacted::Keys(1) => f.write_str("<redacted: 1 key>"),
            Redacted::Keys(count) => write!(f, "<redacted: {count} keys>"),
            Redacted::Items(1) => f.write_str("<redacted: 1 item>"),
            Redacted::Items(count) => write!(f, "<redacted: {count} items>"),
            Redacted::Value => f.write_str("<redacted>"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::csi::v1;

    fn secrets(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn create_volume_request_debug_hides_secrets_and_shows_the_rest() {
        let request = v1::CreateVolumeRequest {
            name: "pvc-4f1c".to_owned(),
            parameters: secrets(&[("pool", "fast")]),
            secrets: secrets(&[("password", "hunter2")]),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            ..Default::default()
        };

        let printed = format!("{request:?}");

        assert!(
            !printed.contains("hunter2"),
            "secret value leaked: {printed}"
        );
        assert!(
            !printed.contains("password"),
            "secret key leaked: {printed}"
        );
        assert!(printed.contains("pvc-4f1c"), "name missing: {printed}");
        assert!(
            printed.contains("\"pool\": \"fast\""),
            "parameters missing: {printed}"
        );
        assert!(
            printed.contains("1073741824"),
            "capacity missing: {printed}"
        );
        assert!(
            printed.contains("secrets: <redacted: 1 key>"),
            "secret count missing: {printed}"
        );
        assert!(printed.starts_with("CreateVolumeRequest {"), "{printed}");
    }

    #[test]
    fn node_stage_volume_request_debug_hides_secrets_and_shows_the_rest() {
        let request = v1::NodeStageVolumeRequest {
            volume_id: "vol-9b2e".to_owned(),
            staging_target_path: "/var/lib/kubelet/staging/vol-9b2e".to_owned(),
            secrets: secrets(&[("password", "hunter2"), ("user", "admin")]),
            ..Default::default()
        };

        let printed = format!("{request:?}");

        assert!(
            !printed.contains("hunter2"),
            "secret value leaked: {printed}"
        );
        assert!(!printed.contains("admin"), "secret value leaked: {printed}");
        assert!(printed.contains("vol-9b2e"), "volume id missing: {printed}");
        assert!(
            printed.contains("/var/lib/kubelet/staging/vol-9b2e"),
            "staging path missing: {printed}"
        );
        assert!(printed.contains("secrets: <redacted: 2 keys>"), "{printed}");
    }

    #[test]
    fn every_message_with_secrets_redacts_them() {
        let canary = "canary-7d5a0e";
        let printed = v1::debug_with_canary_secrets(canary);

        // The list comes from the proto options; these are a few that the
        // spec has had for long, to catch the list coming out empty or short.
        let names: Vec<&str> = printed.iter().map(|(name, _)| *name).collect();
        for expected in [
            "csi.v1.CreateVolumeRequest",
            "csi.v1.DeleteVolumeRequest",
            "csi.v1.ControllerPublishVolumeRequest",
            "csi.v1.NodeStageVolumeRequest",
            "csi.v1.NodePublishVolumeRequest",
            "csi.v1.NodeExpandVolumeRequest",
        ] {
            assert!(names.contains(&expected), "{expected} not in {names:?}");
        }
        for (name, debug) in &printed {
            assert!(!debug.contains(canary), "{name} leaks its secrets: {debug}");
            assert!(
                debug.contains("<redacted"),
                "{name} hides no field: {debug}"
            );
        }
    }

    #[test]
    fn messages_without_secrets_keep_the_derived_debug() {
        let volume = v1::Volume {
            volume_id: "vol-1".to_owned(),
            volume_context: [("k".to_owned(), "v".to_owned())].into_iter().collect(),
            ..Default::default()
        };

        let printed = format!("{volume:?}");

        assert!(printed.contains("\"k\": \"v\""), "{printed}");
        assert!(!printed.contains("redacted"), "{printed}");
    }

    #[test]
    fn redacted_pluralises_its_count() {
        use super::Redacted;
        assert_eq!(format!("{:?}", Redacted::Keys(0)), "<redacted: 0 keys>");
        assert_eq!(format!("{:?}", Redacted::Keys(1)), "<redacted: 1 key>");
        assert_eq!(format!("{:?}", Redacted::Items(3)), "<redacted: 3 items>");
        assert_eq!(format!("{:?}", Redacted::Value), "<redacted>");
    }
}
