//! Spillway's per-region agent: the front doors (OpenAI-compatible HTTP,
//! gRPC Converse), the request pipeline (resolve, plan, call or relay, fail
//! over), the relay between agents, the region's model-server clients, and
//! the agent's side of the config stream, which keeps the latest good
//! configuration in a `tokio::sync::watch`, NACKs what it cannot apply, and
//! persists what it applied to boot from when no control plane answers.
//!
//! Architecture invariant: the request path reads configuration only from
//! the watch; it never waits on the control plane.

#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod connect;
pub mod converse;
pub mod error;
pub mod http;
pub mod meter;
pub mod openai;
pub mod outlier;
pub mod persist;
pub mod pipeline;
pub mod quota;
pub mod record;
pub mod relay;
pub mod route;
pub mod server;
pub mod snapshot;
pub mod sync;
pub mod tls_listener;
pub mod trace;
pub mod upstream;
