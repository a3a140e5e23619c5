//! The front doors. Each translates its wire format into one
//! [`crate::pipeline::Request`], runs [`crate::pipeline::Pipeline::serve`],
//! and translates the answer (or the error, through [`crate::error`]) back.

pub mod anthropic;
pub mod converse;
pub mod http;
pub mod request;
