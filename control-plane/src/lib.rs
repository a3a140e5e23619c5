//! Spillway's control plane: keeps regions, inference profiles and route
//! tables in a store (etcd, or an embedded in-memory store), serves the admin
//! API, and streams each agent the configuration of its region.

#![forbid(unsafe_code)]

pub mod store;
