//! Volume and snapshot IDs.
//!
//! IDs are derived from the name the CO gives in CreateVolume/CreateSnapshot
//! (its idempotency key), so a retry after a crash that happened before any
//! state was written still lands on the same ID, and the same files. They are
//! also the only part of a request that ever becomes part of a path, so their
//! alphabet is fixed: a prefix and 32 lowercase hex digits, nothing else.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// Longest name accepted from a CO (Kubernetes names are at most 253).
pub const MAX_NAME_LEN: usize = 253;
const HEX_DIGITS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("the name is empty")]
    EmptyName,
    #[error("the name is {len} bytes long; at most {MAX_NAME_LEN} are allowed")]
    NameTooLong { len: usize },
    #[error("the name contains a control character")]
    ControlCharacterInName,
    #[error("{id:?} is not a liveclone {kind} ID (expected {prefix}- and {HEX_DIGITS} lowercase hex digits)")]
    Malformed {
        id: String,
        kind: &'static str,
        prefix: &'static str,
    },
}

/// Checks a CO-supplied name. Names are not used in paths (IDs are), but they
/// are stored and logged, so control characters are refused.
pub fn validate_name(name: &str) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(IdError::NameTooLong { len: name.len() });
    }
    if name.chars().any(char::is_control) {
        return Err(IdError::ControlCharacterInName);
    }
    Ok(())
}

fn digest_hex(domain: &str, name: &str) -> String {
    let mut hasher = Sha256::new();
    // The domain keeps a volume and a snapshot with the same name apart.
    hasher.update(domain.as_bytes());
    hasher.update([0u8]);
    hasher.update(name.as_bytes());
    hasher.finalize()[..HEX_DIGITS / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_hex_id(s: &str, prefix: &'static str, kind: &'static str) -> Result<String, IdError> {
    let malformed = || IdError::Malformed {
        id: s.chars().take(80).collect(),
        kind,
        prefix,
    };
    let hex = s
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .ok_or_else(malformed)?;
    if hex.len() != HEX_DIGITS || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(malformed());
    }
    Ok(s.to_owned())
}

macro_rules! hex_id {
    ($name:ident, $prefix:literal, $kind:literal) => {
        #[doc = concat!("A ", $kind, " ID: `", $prefix, "-` and 32 lowercase hex digits.")]
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// The ID for a CO-supplied name (validated first).
            pub fn for_name(name: &str) -> Result<Self, IdError> {
                validate_name(name)?;
                Ok(Self(format!("{}-{}", $prefix, digest_hex($kind, name))))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                parse_hex_id(s, $prefix, $kind).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_id!(VolumeId, "lcv", "volume");
hex_id!(SnapshotId, "lcs", "snapshot");

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn same_name_same_id_and_kinds_differ() {
        let a = VolumeId::for_name("pvc-1234").expect("valid");
        let b = VolumeId::for_name("pvc-1234").expect("valid");
        assert_eq!(a, b);
        let s = SnapshotId::for_name("pvc-1234").expect("valid");
        assert_ne!(&a.as_str()[4..], &s.as_str()[4..]);
        assert!(a.as_str().starts_with("lcv-"));
        assert!(s.as_str().starts_with("lcs-"));
    }

    #[test]
    fn bad_names_are_refused() {
        assert_eq!(VolumeId::for_name(""), Err(IdError::EmptyName));
        assert!(matches!(
            VolumeId::for_name(&"x".repeat(254)),
            Err(IdError::NameTooLong { len: 254 })
        ));
        assert_eq!(
            VolumeId::for_name("a\nb"),
            Err(IdError::ControlCharacterInName)
        );
    }

    #[test]
    fn ids_that_could_escape_a_directory_are_refused() {
        for bad in [
            "",
            "lcv-",
            "../etc/passwd",
            "lcv-../../../../../../etc/passwd0000",
            "lcv-0123456789abcdef0123456789ABCDEF",
            "lcv-0123456789abcdef0123456789abcde",
            "lcv-0123456789abcdef0123456789abcdef0",
            "lcs-0123456789abcdef0123456789abcdef",
            "lcv_0123456789abcdef0123456789abcdef",
        ] {
            assert!(bad.parse::<VolumeId>().is_err(), "{bad:?} accepted");
        }
        assert!("lcv-0123456789abcdef0123456789abcdef"
            .parse::<VolumeId>()
            .is_ok());
    }

    proptest! {
        #[test]
        fn generated_ids_parse_back(name in "[a-zA-Z0-9._/ -]{1,253}") {
            let id = VolumeId::for_name(&name).expect("valid name");
            prop_assert_eq!(id.as_str().parse::<VolumeId>().expect("parses"), id.clone());
            let json = serde_json::to_string(&id).expect("serialise");
            prop_assert_eq!(serde_json::from_str::<VolumeId>(&json).expect("parse"), id);
        }

        #[test]
        fn parsing_never_accepts_a_path_separator(s in "\\PC{0,60}") {
            if let Ok(id) = s.parse::<VolumeId>() {
                prop_assert!(!id.as_str().contains('/') && !id.as_str().contains(".."));
            }
        }
    }
}
