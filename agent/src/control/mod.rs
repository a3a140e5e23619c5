//! The agent's side of the control path: the config stream (`sync`), the
//! configuration it yields and the checks that decide ACK or NACK
//! (`snapshot`), and the last good configuration on disk (`persist`).

pub mod persist;
pub mod snapshot;
pub mod sync;
