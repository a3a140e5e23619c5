//! `spillctl regions`: named places with their own agents and model servers.

use clap::Subcommand;
use serde_json::{Value, json};
use spillway_proto::pb;

use crate::client::{Client, RevisionArg, all_pages, call};
use crate::output::{Output, Shown, deleted, list, one};

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a region.
    Create {
        name: String,
        /// The geography it belongs to, e.g. `us`, `eu`.
        #[arg(long, short = 'g')]
        geography: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Show one region.
    Get { name: String },
    /// List every region.
    List,
    /// Change a region's geography or description.
    Update {
        name: String,
        #[arg(long, short = 'g')]
        geography: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        revision: RevisionArg,
    },
    /// Delete a region no profile or route table uses.
    Delete {
        name: String,
        #[command(flatten)]
        revision: RevisionArg,
    },
}

impl Shown for pb::Region {
    const COLUMNS: &'static [(&'static str, &'static str)] = &[
        ("NAME", "name"),
        ("GEOGRAPHY", "geography"),
        ("DESCRIPTION", "description"),
        ("REVISION", "revision"),
    ];

    fn json(&self) -> Value {
        json!({"name": self.name, "geography": self.geography, "description": self.description, "revision": self.revision})
    }
}

pub async fn run(c: &mut Client, cmd: Cmd, out: Output) -> anyhow::Result<String> {
    Ok(match cmd {
        Cmd::Create {
            name,
            geography,
            description,
        } => {
            let region = pb::Region {
                name,
                geography,
                description,
                revision: 0,
            };
            let req = pb::CreateRegionRequest {
                region: Some(region),
            };
            one(out, &call(c.create_region(req)).await?)
        }
        Cmd::Get { name } => one(
            out,
            &call(c.get_region(pb::GetRegionRequest { name })).await?,
        ),
        Cmd::List => list(
            out,
            &all_pages!(c, list_regions, pb::ListRegionsRequest::default(), regions),
        ),
        Cmd::Update {
            name,
            geography,
            description,
            revision,
        } => {
            let mut r = call(c.get_region(pb::GetRegionRequest { name })).await?;
            if let Some(g) = geography {
                r.geography = g;
            }
            if let Some(d) = description {
                r.description = d;
            }
            r.revision = revision.or(r.revision);
            let req = pb::UpdateRegionRequest { region: Some(r) };
            one(out, &call(c.update_region(req)).await?)
        }
        Cmd::Delete { name, revision } => {
            let req = pb::DeleteRegionRequest {
                name: name.clone(),
                revision: revision.or(0),
            };
            let rev = call(c.delete_region(req)).await?.revision;
            deleted(out, "region", &name, rev)
        }
    })
}
