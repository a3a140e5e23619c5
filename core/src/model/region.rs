//! Regions: named places with their own agents and model servers, each in one geography.

use serde::{Deserialize, Serialize};

use super::*;

/// A named place with its own agents and model servers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub name: String,
    pub geography: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Store revision of the last write; not stored in the value itself.
    #[serde(skip)]
    pub revision: i64,
}

impl Region {
    /// Checks the region on its own.
    pub fn validate(&self) -> Result<(), ModelError> {
        check_name("region.name", &self.name, 63)?;
        check_name("region.geography", &self.geography, 32)?;
        if self.geography == GLOBAL {
            return Err(invalid(
                "region.geography",
                "`global` is reserved for global profiles",
            ));
        }
        if self.description.len() > 1024 {
            return Err(invalid(
                "region.description",
                "is longer than 1024 characters",
            ));
        }
        Ok(())
    }
}
