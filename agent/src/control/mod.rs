//! The agent's side of the control path: the config stream (`sync`), the
//! resources it holds, the configuration they yield and the checks that
//! decide ACK or NACK (`snapshot`), and the last applied resource set on
//! disk (`persist`).

pub mod persist;
pub mod snapshot;
pub mod sync;
