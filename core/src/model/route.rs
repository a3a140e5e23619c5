//! Route tables: for one profile and one source region, the destinations with weights and priorities.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteDestination {
    pub region: String,
    pub weight: f64,
    #[serde(default)]
    pub priority: u32,
}

/// For one profile and one source region: the destinations and their weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteTable {
    pub profile: String,
    pub source_region: String,
    pub destinations: Vec<RouteDestination>,
    /// Time-to-first-token objective in milliseconds: a model server whose
    /// engine's TTFT p90 is above it counts as saturated for this table's
    /// calls, which spill. `None`: no objective.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_objective_ms: Option<u32>,
    #[serde(skip)]
    pub revision: i64,
}

/// What a quota limits.
impl RouteTable {
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.profile.is_empty() {
            return Err(invalid("route_table.profile", "must not be empty"));
        }
        check_name("route_table.source_region", &self.source_region, 63)?;
        if self.destinations.is_empty() {
            return Err(invalid(
                "route_table.destinations",
                "must name at least one region",
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, d) in self.destinations.iter().enumerate() {
            check_name(
                &format!("route_table.destinations[{i}].region"),
                &d.region,
                63,
            )?;
            if !seen.insert(&d.region) {
                return Err(invalid(
                    format!("route_table.destinations[{i}].region"),
                    format!("region `{}` is listed twice", d.region),
                ));
            }
            if !d.weight.is_finite() || d.weight < 0.0 {
                return Err(invalid(
                    format!("route_table.destinations[{i}].weight"),
                    format!("{} is not a finite, non-negative number", d.weight),
                ));
            }
        }
        if let Some(ms) = self.ttft_objective_ms
            && !(1..=600_000).contains(&ms)
        {
            return Err(invalid(
                "route_table.ttft_objective_ms",
                format!("{ms} is not between 1 and 600000 milliseconds"),
            ));
        }
        if self.destinations.iter().all(|d| d.weight == 0.0) {
            return Err(invalid(
                "route_table.destinations",
                "every weight is zero; at least one destination needs a positive weight",
            ));
        }
        Ok(())
    }

    /// The store key suffix of a route table: `<profile>/<source-region>`.
    pub fn key(&self) -> (String, String) {
        (self.profile.clone(), self.source_region.clone())
    }

    /// The route table used where the operator set none: every destination
    /// with weight 1, the source region (when it is a destination) at
    /// priority 0 and the others at priority 1, so that calls stay in the
    /// source region first.
    pub fn default_for(profile: &str, source_region: &str, destinations: &[String]) -> RouteTable {
        let has_source = destinations.iter().any(|d| d == source_region);
        RouteTable {
            profile: profile.to_string(),
            source_region: source_region.to_string(),
            destinations: destinations
                .iter()
                .map(|d| RouteDestination {
                    region: d.clone(),
                    weight: 1.0,
                    priority: u32::from(has_source && d != source_region),
                })
                .collect(),
            ttft_objective_ms: None,
            revision: 0,
        }
    }
}
