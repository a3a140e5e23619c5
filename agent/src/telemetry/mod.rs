//! What the source agent records of a call when it ends: its metrics and
//! audit record (`record`), and its spans (`trace`).

pub mod record;
pub mod trace;
