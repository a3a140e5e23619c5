//! Spillway's control plane: keeps regions, inference profiles and route
//! tables in a store (etcd, or an embedded in-memory store), serves the admin
//! API, and streams each agent the configuration of its region.
//!
//! Architecture invariant: only [`store`] knows etcd; only [`error`] turns
//! errors into gRPC statuses; domain rules live in `spillway_core::model`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod catalog_store;
pub mod error;
pub mod keys;
pub mod leader;
pub mod leases;
pub mod quota_alloc;
pub mod server;
pub mod state;
pub mod store;
pub mod sync;
pub mod views;
pub mod weights;
