//! `spillctl tenants`: who calls with API keys, which profiles they may
//! call, and where their requests may be served.

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use spillway_proto::pb;

use crate::client::{Client, RevisionArg, all_pages, call};
use crate::output::{Output, Shown, deleted, list, one};

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a tenant.
    Create {
        name: String,
        #[command(flatten)]
        fields: TenantArgs,
    },
    /// Show one tenant.
    Get { name: String },
    /// List every tenant.
    List,
    /// Change a tenant: each list given replaces the old one.
    Update {
        name: String,
        #[command(flatten)]
        fields: TenantArgs,
        #[command(flatten)]
        revision: RevisionArg,
    },
    /// Delete a tenant and its keys.
    Delete {
        name: String,
        #[command(flatten)]
        revision: RevisionArg,
    },
}

#[derive(Args, Debug)]
pub struct TenantArgs {
    /// Profiles it may call, comma-separated: ids or patterns (`us.*`, `*`).
    #[arg(long, value_delimiter = ',')]
    profiles: Option<Vec<String>>,
    /// Regions that may serve its requests (none: every region not denied).
    #[arg(long, value_delimiter = ',')]
    allow_regions: Option<Vec<String>>,
    /// Regions that must never receive its requests.
    #[arg(long, value_delimiter = ',')]
    deny_regions: Option<Vec<String>>,
    /// Geographies that may serve its requests.
    #[arg(long, value_delimiter = ',')]
    allow_geographies: Option<Vec<String>>,
    /// Geographies that must never receive its requests.
    #[arg(long, value_delimiter = ',')]
    deny_geographies: Option<Vec<String>>,
    #[arg(long)]
    description: Option<String>,
}

impl TenantArgs {
    /// Sets what was given: each list replaces the old one (an empty
    /// value, as in `--deny-regions ""`, empties it).
    fn apply(self, t: &mut pb::Tenant) {
        let policy = t.policy.get_or_insert_with(Default::default);
        let lists = [
            (self.allow_regions, &mut policy.allow_regions),
            (self.deny_regions, &mut policy.deny_regions),
            (self.allow_geographies, &mut policy.allow_geographies),
            (self.deny_geographies, &mut policy.deny_geographies),
        ];
        for (given, list) in lists {
            if let Some(v) = given {
                *list = v.into_iter().filter(|x| !x.is_empty()).collect();
            }
        }
        if let Some(p) = self.profiles {
            t.profiles = p;
        }
        if let Some(d) = self.description {
            t.description = d;
        }
    }
}

impl Shown for pb::Tenant {
    const COLUMNS: &'static [(&'static str, &'static str)] = &[
        ("NAME", "name"),
        ("PROFILES", "profiles"),
        ("REGION POLICY", "policy"),
        ("REVISION", "revision"),
    ];

    fn json(&self) -> Value {
        let p = self.policy.clone().unwrap_or_default();
        let mut policy = Vec::new();
        for (name, list) in [
            ("allow", &p.allow_regions),
            ("deny", &p.deny_regions),
            ("allow geo", &p.allow_geographies),
            ("deny geo", &p.deny_geographies),
        ] {
            if !list.is_empty() {
                policy.push(format!("{name} {}", list.join(",")));
            }
        }
        json!({
            "name": self.name, "description": self.description, "profiles": self.profiles.join(","),
            "policy": if policy.is_empty() { "any region".to_string() } else { policy.join("; ") },
            "allow_regions": p.allow_regions, "deny_regions": p.deny_regions,
            "allow_geographies": p.allow_geographies, "deny_geographies": p.deny_geographies,
            "revision": self.revision,
        })
    }
}

pub async fn run(c: &mut Client, cmd: Cmd, out: Output) -> anyhow::Result<String> {
    Ok(match cmd {
        Cmd::Create { name, fields } => {
            let mut t = pb::Tenant {
                name,
                ..Default::default()
            };
            fields.apply(&mut t);
            let req = pb::CreateTenantRequest { tenant: Some(t) };
            one(out, &call(c.create_tenant(req)).await?)
        }
        Cmd::Get { name } => one(
            out,
            &call(c.get_tenant(pb::GetTenantRequest { name })).await?,
        ),
        Cmd::List => list(
            out,
            &all_pages!(c, list_tenants, pb::ListTenantsRequest::default(), tenants),
        ),
        Cmd::Update {
            name,
            fields,
            revision,
        } => {
            let mut t = call(c.get_tenant(pb::GetTenantRequest { name })).await?;
            fields.apply(&mut t);
            t.revision = revision.or(t.revision);
            let req = pb::UpdateTenantRequest { tenant: Some(t) };
            one(out, &call(c.update_tenant(req)).await?)
        }
        Cmd::Delete { name, revision } => {
            let req = pb::DeleteTenantRequest {
                name: name.clone(),
                revision: revision.or(0),
            };
            let rev = call(c.delete_tenant(req)).await?.revision;
            deleted(out, "tenant", &name, rev)
        }
    })
}
