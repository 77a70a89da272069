//! Device classes: the named pools of one node.
//!
//! A StorageClass picks one with `liveclone.io/deviceClass`; without it a
//! volume goes to the node's default class (the file pool, named
//! [`DEFAULT_CLASS`]). Every record keeps the class its storage lives in,
//! so a restarted node finds each volume, image and metadata volume in the
//! pool that holds it, and a clone may read its source from one class and
//! hydrate into another (thick to thin, LVM to file...).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::domain::error::{DomainError, DomainResult};
use crate::domain::pool::Pool;

/// The class of the file pool, and of every record written before classes
/// existed (their records have no class).
pub const DEFAULT_CLASS: &str = "file";

/// A device class name: 1 to 63 of `[a-z0-9-]`, starting and ending with a
/// letter or digit (a DNS label, so it can sit in labels and metric labels).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceClassName(String);

impl DeviceClassName {
    pub fn default_class() -> Self {
        Self(DEFAULT_CLASS.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_default(&self) -> bool {
        self.0 == DEFAULT_CLASS
    }
}

impl fmt::Display for DeviceClassName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DeviceClassName {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        let edge_ok =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let valid = (1..=63).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && edge_ok(name.chars().next())
            && edge_ok(name.chars().last());
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            Err(format!(
                "`{name}` is not a device class name: expected 1 to 63 lowercase letters, digits \
                 and '-', starting and ending with a letter or digit"
            ))
        }
    }
}

impl TryFrom<String> for DeviceClassName {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        name.parse()
    }
}

impl From<DeviceClassName> for String {
    fn from(name: DeviceClassName) -> String {
        name.0
    }
}

/// A record's class: `None` (records from before classes) is the default.
pub fn class_or_default(class: Option<&DeviceClassName>) -> DeviceClassName {
    class
        .cloned()
        .unwrap_or_else(DeviceClassName::default_class)
}

/// The pools of one node, by class name.
#[derive(Clone)]
pub struct DeviceClasses {
    pools: BTreeMap<DeviceClassName, Arc<dyn Pool>>,
}

impl fmt::Debug for DeviceClasses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.pools
                    .iter()
                    .map(|(name, pool)| (name, pool.describe())),
            )
            .finish()
    }
}

impl DeviceClasses {
    /// Only the default class.
    pub fn single(pool: Arc<dyn Pool>) -> Self {
        Self {
            pools: BTreeMap::from([(DeviceClassName::default_class(), pool)]),
        }
    }

    /// Adds a class; a name given twice is a configuration error.
    pub fn with(mut self, name: DeviceClassName, pool: Arc<dyn Pool>) -> DomainResult<Self> {
        if self.pools.contains_key(&name) {
            return Err(DomainError::invalid_argument(format!(
                "device class {name} is configured twice"
            )));
        }
        self.pools.insert(name, pool);
        Ok(self)
    }

    /// The pool of `class` (`None`: the default). A class that is not
    /// configured on this node is the caller's mistake when it comes from
    /// a request, and a configuration change when it comes from a record;
    /// both get a message naming the configured classes.
    pub fn get(&self, class: Option<&DeviceClassName>) -> DomainResult<&Arc<dyn Pool>> {
        let name = class_or_default(class);
        self.pools.get(&name).ok_or_else(|| {
            DomainError::invalid_argument(format!(
                "device class {name} is not configured on this node (it has: {})",
                self.names().join(", ")
            ))
        })
    }

    pub fn contains(&self, class: Option<&DeviceClassName>) -> bool {
        self.pools.contains_key(&class_or_default(class))
    }

    pub fn names(&self) -> Vec<String> {
        self.pools.keys().map(|n| n.to_string()).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&DeviceClassName, &Arc<dyn Pool>)> {
        self.pools.iter()
    }

    /// One line for logs: each class and its pool.
    pub fn describe(&self) -> String {
        self.pools
            .iter()
            .map(|(name, pool)| format!("{name}: {}", pool.describe()))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_are_dns_labels() {
        for good in ["file", "fast", "thin-nvme", "a", "x1"] {
            assert!(good.parse::<DeviceClassName>().is_ok(), "{good}");
        }
        for bad in [
            "",
            "Fast",
            "-a",
            "a-",
            "a_b",
            "a/b",
            "../x",
            &"a".repeat(64),
        ] {
            assert!(bad.parse::<DeviceClassName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn records_without_a_class_are_in_the_default() {
        assert_eq!(class_or_default(None).as_str(), DEFAULT_CLASS);
        let json = serde_json::to_string(&DeviceClassName::default_class()).expect("json");
        assert_eq!(json, "\"file\"");
        assert!(serde_json::from_str::<DeviceClassName>("\"BAD\"").is_err());
    }
}
