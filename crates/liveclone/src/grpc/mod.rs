//! CSI gRPC services: thin handlers over the domain layer.

pub mod admin;
pub mod client;
pub mod controller;
pub mod convert;
pub mod errors;
pub mod identity;
pub mod node;
pub mod server;
#[cfg(test)]
pub(crate) mod testkit;

/// The topology key of liveclone volumes. A volume lives in one node's pool
/// and is reachable from that node only, so NodeGetInfo reports
/// `{TOPOLOGY_NODE_KEY: node_id}` and every volume carries the same segment
/// as its accessible topology. Kubernetes stores the key in CSINode and
/// PersistentVolume objects: it must never change once volumes exist.
pub const TOPOLOGY_NODE_KEY: &str = "topology.liveclone.io/node";
