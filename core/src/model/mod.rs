//! The domain model: regions, inference profiles and route tables, with the
//! validation that the admin API applies to every write and that an agent
//! applies to every snapshot it receives.
//!
//! A [`Catalog`] is the whole configuration at one store revision. Every
//! change is checked against what it can break, and a refused change is
//! undone, so an object can never be written that leaves another one
//! dangling (a route table naming a deleted region, an application profile
//! copying a deleted profile). A catalog can keep a journal of the objects
//! its operations touch, so that a writer learns what to store without
//! comparing catalogs.

mod catalog;
mod profile;
mod quota;
mod region;
mod route;
#[cfg(test)]
mod tests;

pub use crate::tenant::{ApiKey, RegionPolicy, Tenant};
pub use catalog::{Catalog, Touched};
pub use profile::{Profile, ProfileKind, ResolvedProfile};
pub use quota::{Quota, QuotaScope};
pub use region::Region;
pub use route::{RouteDestination, RouteTable};

/// The id prefix of global profiles; no region may use it as its geography.
pub const GLOBAL: &str = "global";

/// Why a write or a snapshot was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// A field has a value that is wrong on its own or that names something
    /// that does not exist. `field` is a path such as `profile.destinations[1]`.
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{kind} `{name}` not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} `{name}` already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// The object changed since the revision the writer read.
    #[error(
        "{kind} `{name}` changed since revision {expected} (now at revision {actual}); read it again and retry"
    )]
    Conflict {
        kind: &'static str,
        name: String,
        expected: i64,
        actual: i64,
    },
    /// Another object still depends on this one.
    #[error("{0}")]
    InUse(String),
}

pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}
pub(crate) fn check_name(field: &str, value: &str, max: usize) -> Result<(), ModelError> {
    // Lower-case DNS-label style: used for regions and geographies, which
    // appear in store keys, certificate names and metric labels.
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(invalid(
            field,
            format!("`{value}` is longer than {max} characters"),
        ));
    }
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = value.as_bytes()[0].is_ascii_lowercase() && !value.ends_with('-');
    if !ok_chars || !ok_ends {
        return Err(invalid(
            field,
            format!(
                "`{value}` must be lower-case letters, digits and '-', start with a letter and not end with '-'"
            ),
        ));
    }
    Ok(())
}

/// A model name as model servers know it, e.g. `llama-3.1-8b` or
/// `meta-llama/Llama-3.1-8B-Instruct`.
pub(crate) fn check_model(field: &str, value: &str) -> Result<(), ModelError> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > 128 {
        return Err(invalid(
            field,
            format!("`{value}` is longer than 128 characters"),
        ));
    }
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b));
    if !ok || !value.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid(
            field,
            format!(
                "`{value}` must start with a letter or digit and use only letters, digits and -_.:/"
            ),
        ));
    }
    Ok(())
}

pub(crate) fn check_application_id(field: &str, value: &str) -> Result<(), ModelError> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > 64 {
        return Err(invalid(
            field,
            format!("`{value}` is longer than 64 characters"),
        ));
    }
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok || !value.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid(
            field,
            format!(
                "`{value}` must start with a letter or digit and use only letters, digits, '-' and '_' (no '.', which marks geographic and global profiles)"
            ),
        ));
    }
    Ok(())
}
