//! `spillctl keys`: tenants' API keys, created (shown once), listed,
//! revoked.

use clap::Subcommand;
use serde_json::{Value, json};
use spillway_proto::pb;

use crate::client::{Client, all_pages, call};
use crate::output::{Output, Shown, list};

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create an API key for a tenant and print it: the only time it is
    /// shown (only its hash is kept).
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List keys (ids and tenants, never the keys).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key by id: agents refuse it from their next update on.
    Revoke { id: String },
}

impl Shown for pb::ApiKey {
    const COLUMNS: &'static [(&'static str, &'static str)] = &[
        ("ID", "id"),
        ("TENANT", "tenant"),
        ("DESCRIPTION", "description"),
        ("CREATED", "created_at_unix"),
    ];

    fn json(&self) -> Value {
        json!({
            "id": self.id, "tenant": self.tenant, "description": self.description,
            "created_at_unix": self.created_at_unix,
        })
    }
}

pub async fn run(c: &mut Client, cmd: Cmd, out: Output) -> anyhow::Result<String> {
    Ok(match cmd {
        Cmd::Create {
            tenant,
            description,
        } => {
            let req = pb::CreateKeyRequest {
                tenant,
                description,
            };
            let created = call(c.create_key(req)).await?;
            let k = created.key.unwrap_or_default();
            match out {
                Output::Json => serde_json::to_string_pretty(
                    &json!({"id": k.id, "tenant": k.tenant, "key": created.secret}),
                )?,
                Output::Table => format!(
                    "key {} for tenant {}:\n{}\nStore it now: it is not shown again (only its hash is kept).",
                    k.id, k.tenant, created.secret
                ),
            }
        }
        Cmd::List { tenant } => {
            let req = pb::ListKeysRequest {
                tenant: tenant.unwrap_or_default(),
                ..Default::default()
            };
            list(out, &all_pages!(c, list_keys, req, keys))
        }
        Cmd::Revoke { id } => {
            let rev = call(c.revoke_key(pb::RevokeKeyRequest { id: id.clone() }))
                .await?
                .revision;
            match out {
                Output::Json => {
                    serde_json::to_string_pretty(&json!({"revoked": id, "revision": rev}))?
                }
                Output::Table => format!("key {id} revoked (revision {rev})"),
            }
        }
    })
}
