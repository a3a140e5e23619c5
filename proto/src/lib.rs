//! Spillway's protocol (`spillway.v1`, generated from `proto/spillway/v1`)
//! and the conversions between it and the domain model of `spillway-core`.
//!
//! Architecture invariant: protobuf types stop at the gRPC edge; domain and
//! protobuf types meet in [`convert`] alone.

#![forbid(unsafe_code)]

pub mod convert;

/// Generated protobuf and gRPC code for `spillway.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("spillway.v1");

    /// The encoded file descriptor set, for the gRPC reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/spillway_descriptor.bin"));
}

/// The gRPC reflection services a binary serves: v1, and v1alpha for the
/// clients that speak only that (grpcio-reflection, older grpcurl). They
/// list `services` (fully qualified names), health and reflection, not
/// every service of the descriptor set: a client must not be shown a
/// service this binary does not serve.
#[allow(clippy::type_complexity)]
pub fn reflection(
    services: &[&str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        services
            .iter()
            .copied()
            .chain([
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ])
            .fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(
                        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                    ),
                |b, name| b.with_service_name(name),
            )
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}
