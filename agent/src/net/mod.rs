//! TLS plumbing: the HTTP door's listener, and outgoing gRPC connections
//! that check who answers.

pub mod connect;
pub mod dns;
pub mod serve;
pub mod tls_listener;
