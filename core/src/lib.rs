//! Spillway's core: the domain model that the control plane and the agent
//! both validate with (regions, profiles, route tables, quotas, tenants and
//! API keys), and the runtime pieces both binaries share: TLS identities
//! and peer names (`tls`), the metrics registry, backoff and shutdown.
//!
//! Architecture invariant: [`model`] and [`tenant`] know nothing of gRPC or
//! of the store; only `tls` speaks tonic (its server and client TLS
//! configurations). Protobuf conversions live in `spillway-proto`.

#![forbid(unsafe_code)]

pub mod api;
pub mod backoff;
pub mod credentials;
pub mod metrics;
pub mod model;
pub mod net;
pub mod shutdown;
pub mod tenant;
pub mod tls;
