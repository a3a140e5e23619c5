//! Spillway's protocol (`spillway.v1`, generated from `proto/spillway/v1`),
//! the domain model that both the control plane and the agent validate with,
//! and the two small runtime helpers both binaries share (backoff, shutdown).
//!
//! Architecture invariant: the domain types in [`model`] know nothing of
//! gRPC or of the store; conversions live in [`convert`] alone.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod convert;
pub mod metrics;
pub mod model;
pub mod shutdown;
pub mod tenant;
pub mod tls;

/// Generated protobuf and gRPC code for `spillway.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("spillway.v1");

    /// The encoded file descriptor set, for the gRPC reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/spillway_descriptor.bin"));
}
