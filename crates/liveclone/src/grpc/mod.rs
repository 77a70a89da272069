//! CSI gRPC services: thin handlers over the domain layer.

pub mod identity;
pub mod server;
