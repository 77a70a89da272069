//! Schemas for fields whose Rust type lives in the domain or OS layers,
//! which know nothing of JSON Schema: the values are taken from those types
//! themselves, so the CRDs accept exactly what the driver parses.

use schemars::{json_schema, Schema, SchemaGenerator};

use crate::domain::hydration::HydrationPhase;
use crate::os::fs::FsType;

/// Longest Kubernetes object name (a DNS subdomain). Bounding strings also
/// keeps the API server's cost estimate of the CEL rules on them low.
pub(super) const NAME_MAX: u32 = 253;
/// Longest namespace name (a DNS label).
pub(super) const NAMESPACE_MAX: u32 = 63;
/// Longest CSI volume or snapshot name liveclone accepts.
// `as` because `TryFrom` is not const; the value (253) fits.
pub(super) const CSI_NAME_MAX: u32 = crate::domain::ids::MAX_NAME_LEN as u32;
/// Longest CSI volume or snapshot ID (the CSI spec's size limit).
pub(super) const CSI_ID_MAX: u32 = 128;

/// File systems the driver formats, by their names in the API. `FsType` has
/// no list of its variants; the test below checks this one against it both
/// ways.
const FS_TYPES: [FsType; 2] = [FsType::Ext4, FsType::Xfs];

/// A string that is one of [`HydrationPhase::ALL`].
pub(super) fn hydration_phase(_: &mut SchemaGenerator) -> Schema {
    let names: Vec<&str> = HydrationPhase::ALL.iter().map(|p| p.as_str()).collect();
    json_schema!({
        "type": "string",
        "enum": names,
    })
}

/// A string that names a file system the driver formats (`ext4`, `xfs`).
pub(super) fn fs_type(_: &mut SchemaGenerator) -> Schema {
    let names: Vec<String> = FS_TYPES.iter().map(ToString::to_string).collect();
    json_schema!({
        "type": "string",
        "enum": names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enum_values(schema: &Schema) -> Vec<String> {
        schema
            .get("enum")
            .and_then(|v| v.as_array())
            .expect("an enum")
            .iter()
            .map(|v| v.as_str().expect("strings").to_owned())
            .collect()
    }

    #[test]
    fn phase_names_are_the_domain_phases_and_parse_back() {
        let names = enum_values(&hydration_phase(&mut SchemaGenerator::default()));
        assert_eq!(names.len(), HydrationPhase::ALL.len());
        for name in names {
            let phase: HydrationPhase = name.parse().expect("a phase");
            // Serde (the wire format of the status) agrees with the names.
            assert_eq!(
                serde_json::to_value(phase).expect("serializes"),
                serde_json::json!(name)
            );
        }
    }

    #[test]
    fn fs_type_names_cover_every_fs_type_and_parse_back() {
        // Fails to compile when FsType gains a variant, so FS_TYPES is
        // revisited.
        let listed = |fs: FsType| match fs {
            FsType::Ext4 | FsType::Xfs => FS_TYPES.contains(&fs),
        };
        assert!(FS_TYPES.into_iter().all(listed));
        for name in enum_values(&fs_type(&mut SchemaGenerator::default())) {
            let fs: FsType = name.parse().expect("a file system type");
            assert_eq!(
                serde_json::to_value(fs).expect("serializes"),
                serde_json::json!(name)
            );
        }
    }
}
