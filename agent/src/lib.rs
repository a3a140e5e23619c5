//! Spillway's per-region agent. The code map follows the request:
//!
//! - [`doors`]: the front doors (OpenAI-compatible HTTP, gRPC Converse);
//!   each only translates its wire format into a [`pipeline::Request`] and
//!   the answer back;
//! - [`pipeline`]: the one request stack every door runs, top to bottom:
//!   authenticate, resolve, authorize, admit, attempts across regions,
//!   finish;
//! - [`upstream`]: what an attempt calls: the region's model servers, or
//!   another region's agent through the relay; and the one reader of
//!   model-server answers;
//! - [`quota`]: the quotas this agent enforces;
//! - [`telemetry`]: what is recorded when a call ends (metrics, audit,
//!   traces);
//! - [`control`]: the agent's side of the config stream, which keeps the
//!   latest good configuration in a `tokio::sync::watch`, NACKs what it
//!   cannot apply, and persists what it applied to boot from;
//! - [`net`]: TLS plumbing for the doors and outgoing gRPC;
//! - [`error`]: why a call failed, and the one mapping to HTTP and gRPC.
//!
//! Architecture invariant: the request path reads configuration only from
//! the watch; it never waits on the control plane. Modules depend in one
//! direction (doors → pipeline → upstream, quota, telemetry → control,
//! error); `tests::no_import_loops` keeps it so.

#![forbid(unsafe_code)]

pub mod config;
pub mod control;
pub mod doors;
pub mod error;
pub mod net;
pub mod pipeline;
pub mod quota;
pub mod server;
pub mod telemetry;
pub mod upstream;

#[cfg(test)]
mod tests;
