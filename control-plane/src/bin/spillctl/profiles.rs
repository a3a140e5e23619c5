//! `spillctl profiles`: inference profiles, what clients name as their
//! model.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use spillway_proto::pb;

use crate::client::{Client, RevisionArg, all_pages, call};
use crate::output::{Output, Shown, deleted, list, one};

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a profile. The id says its kind: `<geography>.<model>` is
    /// geographic, `global.<model>` is global, a name without '.' is an
    /// application profile that copies --base-profile, or --model in
    /// --base-region.
    Create {
        id: String,
        #[command(flatten)]
        fields: Fields,
    },
    /// Show one profile.
    Get { id: String },
    /// List every profile.
    List,
    /// Change a profile's destinations, tags or description.
    Update {
        id: String,
        #[command(flatten)]
        fields: Fields,
        #[command(flatten)]
        revision: RevisionArg,
    },
    /// Delete a profile (and its route tables). Refused while an
    /// application profile copies it.
    Delete {
        id: String,
        #[command(flatten)]
        revision: RevisionArg,
    },
}

#[derive(Args, Debug)]
pub struct Fields {
    /// Destination regions, comma-separated (geographic and global profiles).
    #[arg(long, short = 'd', value_delimiter = ',')]
    destinations: Option<Vec<String>>,
    /// The geographic or global profile an application profile copies.
    #[arg(long)]
    base_profile: Option<String>,
    /// The region whose model an application profile copies (with --model).
    #[arg(long)]
    base_region: Option<String>,
    /// The model, for an application profile with --base-region.
    #[arg(long)]
    model: Option<String>,
    /// A tag for cost attribution, key=value; repeatable.
    #[arg(long = "tag", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    #[arg(long)]
    description: Option<String>,
}

impl Fields {
    /// Sets what was given; tags are added to the profile's.
    fn apply(self, p: &mut pb::InferenceProfile) {
        if let Some(d) = self.destinations {
            p.destinations = d;
        }
        if let Some(b) = self.base_profile {
            p.base_profile = b;
        }
        if let Some(r) = self.base_region {
            p.base_region = r;
        }
        if let Some(m) = self.model {
            p.model = m;
        }
        for (k, v) in self.tags {
            p.tags.insert(k, v);
        }
        if let Some(d) = self.description {
            p.description = d;
        }
    }
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not key=value"))
}

impl Shown for pb::InferenceProfile {
    const COLUMNS: &'static [(&'static str, &'static str)] = &[
        ("ID", "id"),
        ("KIND", "kind"),
        ("MODEL", "model"),
        ("DESTINATIONS", "destinations"),
        ("COPIES", "copies"),
        ("TAGS", "tags"),
        ("REVISION", "revision"),
    ];

    fn json(&self) -> Value {
        let kind = pb::ProfileKind::try_from(self.kind)
            .map(|k| {
                k.as_str_name()
                    .trim_start_matches("PROFILE_KIND_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        let copies = if !self.base_profile.is_empty() {
            self.base_profile.clone()
        } else if !self.base_region.is_empty() {
            format!("{} in {}", self.model, self.base_region)
        } else {
            String::new()
        };
        let tags: BTreeMap<_, _> = self.tags.iter().collect();
        json!({
            "id": self.id, "kind": kind, "model": self.model, "destinations": self.destinations,
            "copies": copies, "base_profile": self.base_profile, "base_region": self.base_region,
            "tags": tags, "description": self.description, "revision": self.revision,
        })
    }
}

pub async fn run(c: &mut Client, cmd: Cmd, out: Output) -> anyhow::Result<String> {
    Ok(match cmd {
        Cmd::Create { id, fields } => {
            let mut p = pb::InferenceProfile {
                id,
                ..Default::default()
            };
            fields.apply(&mut p);
            let req = pb::CreateProfileRequest { profile: Some(p) };
            one(out, &call(c.create_profile(req)).await?)
        }
        Cmd::Get { id } => one(
            out,
            &call(c.get_profile(pb::GetProfileRequest { id })).await?,
        ),
        Cmd::List => list(
            out,
            &all_pages!(
                c,
                list_profiles,
                pb::ListProfilesRequest::default(),
                profiles
            ),
        ),
        Cmd::Update {
            id,
            fields,
            revision,
        } => {
            let mut p = call(c.get_profile(pb::GetProfileRequest { id })).await?;
            fields.apply(&mut p);
            p.revision = revision.or(p.revision);
            let req = pb::UpdateProfileRequest { profile: Some(p) };
            one(out, &call(c.update_profile(req)).await?)
        }
        Cmd::Delete { id, revision } => {
            let req = pb::DeleteProfileRequest {
                id: id.clone(),
                revision: revision.or(0),
            };
            let rev = call(c.delete_profile(req)).await?.revision;
            deleted(out, "profile", &id, rev)
        }
    })
}
