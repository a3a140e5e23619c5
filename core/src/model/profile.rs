//! Inference profiles (geographic, global, application) and how one resolves to a model and regions.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileKind {
    Geographic,
    Global,
    Application,
}

impl ProfileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileKind::Geographic => "geographic",
            ProfileKind::Global => "global",
            ProfileKind::Application => "application",
        }
    }

    /// The kind an id has by its shape: `global.<model>`, `<geo>.<model>`, or
    /// a plain name for an application profile.
    pub fn from_id(id: &str) -> ProfileKind {
        match id.split_once('.') {
            Some((GLOBAL, _)) => ProfileKind::Global,
            Some(_) => ProfileKind::Geographic,
            None => ProfileKind::Application,
        }
    }
}

/// What a client names as its model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub id: String,
    pub kind: ProfileKind,
    /// The model the destinations serve. Derived from the id for geographic
    /// and global profiles; set for an application profile that copies a
    /// single-region model.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_region: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(skip)]
    pub revision: i64,
}

/// A profile as an agent sees it: kind and tags kept, model and destination
/// regions filled in from what it copies.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedProfile {
    pub profile: Profile,
    pub model: String,
    pub destinations: Vec<String>,
}

impl Profile {
    /// Checks the profile on its own (the shape of its fields); references
    /// to regions and base profiles are checked by [`Catalog::validate`].
    pub fn validate(&self) -> Result<(), ModelError> {
        let id = &self.id;
        if id.is_empty() {
            return Err(invalid("profile.id", "must not be empty"));
        }
        let shape = ProfileKind::from_id(id);
        if shape != self.kind {
            let expected = match self.kind {
                ProfileKind::Geographic => "`<geography>.<model>`, e.g. `us.llama-3.1-8b`",
                ProfileKind::Global => "`global.<model>`, e.g. `global.llama-3.1-8b`",
                ProfileKind::Application => "a name without '.', e.g. `team-search-prod`",
            };
            return Err(invalid(
                "profile.id",
                format!(
                    "`{id}` does not fit a {} profile, whose id is {expected}",
                    self.kind.as_str()
                ),
            ));
        }
        if self.tags.len() > 50 {
            return Err(invalid("profile.tags", "has more than 50 tags"));
        }
        for (k, v) in &self.tags {
            let ok = !k.is_empty()
                && k.len() <= 128
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b));
            if !ok {
                return Err(invalid(
                    format!("profile.tags[{k:?}]"),
                    "a tag key is 1 to 128 letters, digits or -_.:/",
                ));
            }
            if v.len() > 256 {
                return Err(invalid(
                    format!("profile.tags[{k:?}]"),
                    "a tag value is at most 256 bytes",
                ));
            }
        }
        if self.description.len() > 1024 {
            return Err(invalid(
                "profile.description",
                "is longer than 1024 characters",
            ));
        }
        match self.kind {
            ProfileKind::Geographic | ProfileKind::Global => {
                let (prefix, model) = id.split_once('.').expect("shape checked above");
                if self.kind == ProfileKind::Geographic {
                    check_name("profile.id", prefix, 32).map_err(|_| {
                        invalid(
                            "profile.id",
                            format!("`{prefix}` before the '.' must be a geography (lower-case letters, digits, '-')"),
                        )
                    })?;
                }
                check_model("profile.id", model)?;
                if !self.model.is_empty() && self.model != model {
                    return Err(invalid(
                        "profile.model",
                        format!(
                            "`{}` differs from `{model}` in the id; leave it empty or equal",
                            self.model
                        ),
                    ));
                }
                if self.destinations.is_empty() {
                    return Err(invalid(
                        "profile.destinations",
                        "must name at least one region",
                    ));
                }
                let mut seen = BTreeSet::new();
                for (i, d) in self.destinations.iter().enumerate() {
                    let field = format!("profile.destinations[{i}]");
                    check_name(&field, d, 63)?;
                    if !seen.insert(d) {
                        return Err(invalid(field, format!("region `{d}` is listed twice")));
                    }
                }
                if self.base_profile.is_some() || self.base_region.is_some() {
                    return Err(invalid(
                        "profile.base_profile",
                        "only application profiles copy another profile or region",
                    ));
                }
            }
            ProfileKind::Application => {
                check_application_id("profile.id", id)?;
                if !self.destinations.is_empty() {
                    return Err(invalid(
                        "profile.destinations",
                        "an application profile takes its destinations from what it copies; leave it empty",
                    ));
                }
                match (&self.base_profile, &self.base_region) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(
                            "profile.base_region",
                            "set either base_profile, or base_region with model, not both",
                        ));
                    }
                    (None, None) => {
                        return Err(invalid(
                            "profile.base_profile",
                            "an application profile copies a geographic or global profile (base_profile) or one region's model (base_region and model)",
                        ));
                    }
                    (Some(base), None) => {
                        if base.is_empty() {
                            return Err(invalid("profile.base_profile", "must not be empty"));
                        }
                        if !self.model.is_empty() {
                            return Err(invalid(
                                "profile.model",
                                "comes from the base profile; leave it empty",
                            ));
                        }
                    }
                    (None, Some(region)) => {
                        check_name("profile.base_region", region, 63)?;
                        check_model("profile.model", &self.model)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The model named by the id of a geographic or global profile.
    pub fn id_model(&self) -> Option<&str> {
        match self.kind {
            ProfileKind::Application => None,
            _ => self.id.split_once('.').map(|(_, m)| m),
        }
    }

    /// The geography of a geographic profile.
    pub fn geography(&self) -> Option<&str> {
        match self.kind {
            ProfileKind::Geographic => self.id.split_once('.').map(|(g, _)| g),
            _ => None,
        }
    }

    /// Fills in derived fields so that stored objects are complete.
    pub fn normalize(&mut self) {
        if let Some(m) = self.id_model()
            && self.model.is_empty()
        {
            self.model = m.to_string();
        }
    }
}
