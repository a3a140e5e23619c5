//! Spillway's per-region agent. This crate holds the agent's side of the
//! config stream: a client that keeps the latest good configuration in a
//! `tokio::sync::watch`, NACKs what it cannot apply, persists what it
//! applied and boots from it when no control plane answers.
//!
//! Architecture invariant: the request path reads configuration only from
//! the watch; it never waits on the control plane.

#![forbid(unsafe_code)]

pub mod config;
pub mod persist;
pub mod server;
pub mod snapshot;
pub mod sync;
