//! Quotas: requests and tokens per minute (and per day) for a profile in a region or a tenant.

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum QuotaScope {
    /// A profile's calls from one source region.
    ProfileInRegion {
        profile: String,
        source_region: String,
    },
    /// One tenant's calls of one profile.
    TenantOnProfile { tenant: String, profile: String },
    /// Everything one tenant calls.
    Tenant { tenant: String },
}

impl QuotaScope {
    /// The quota's id, also its store key suffix.
    pub fn id(&self) -> String {
        match self {
            QuotaScope::ProfileInRegion {
                profile,
                source_region,
            } => format!("profile/{profile}@{source_region}"),
            QuotaScope::TenantOnProfile { tenant, profile } => format!("tenant/{tenant}/{profile}"),
            QuotaScope::Tenant { tenant } => format!("tenant/{tenant}"),
        }
    }
}

/// Requests and tokens per minute (and tokens per day) for one scope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quota {
    pub scope: QuotaScope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<i64>,
    /// Output tokens count this many times (at least 1).
    pub output_burndown: f64,
    #[serde(skip)]
    pub revision: i64,
}

impl Quota {
    pub fn validate(&self) -> Result<(), ModelError> {
        let limits = [
            ("quota.requests_per_minute", self.requests_per_minute),
            ("quota.tokens_per_minute", self.tokens_per_minute),
            ("quota.tokens_per_day", self.tokens_per_day),
        ];
        for (field, limit) in limits {
            if let Some(n) = limit
                && n <= 0
            {
                return Err(invalid(
                    field,
                    format!("{n} is not a positive whole number"),
                ));
            }
        }
        if limits.iter().all(|(_, l)| l.is_none()) {
            return Err(invalid(
                "quota",
                "set at least one of requests_per_minute, tokens_per_minute, tokens_per_day",
            ));
        }
        if !self.output_burndown.is_finite() || self.output_burndown < 1.0 {
            return Err(invalid(
                "quota.output_burndown",
                format!(
                    "{} is under 1: output tokens count at least once",
                    self.output_burndown
                ),
            ));
        }
        Ok(())
    }
}
