//! `spillctl quotas`: requests and tokens per minute (and tokens per day)
//! for a profile in a source region, a tenant on a profile, or a tenant.

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use spillway_proto::pb;

use crate::client::{Client, RevisionArg, all_pages, call};
use crate::output::{Output, Shown, deleted, list, one};

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a quota. Its id comes from its scope, e.g.
    /// `profile/us.llama-3.1-8b@us-east`.
    Create {
        #[command(flatten)]
        scope: ScopeArgs,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Show one quota by id.
    Get { id: String },
    /// List every quota.
    List,
    /// Change a quota's limits.
    Update {
        id: String,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        revision: RevisionArg,
    },
    /// Delete a quota.
    Delete {
        id: String,
        #[command(flatten)]
        revision: RevisionArg,
    },
}

#[derive(Args, Debug)]
pub struct ScopeArgs {
    /// The profile the quota is for.
    #[arg(long)]
    profile: Option<String>,
    /// The source region whose calls of the profile it limits.
    #[arg(long, short = 's')]
    source: Option<String>,
    /// A tenant (with or without --profile).
    #[arg(long)]
    tenant: Option<String>,
}

#[derive(Args, Debug)]
pub struct LimitArgs {
    /// Requests per minute.
    #[arg(long, allow_negative_numbers = true)]
    rpm: Option<i64>,
    /// Tokens per minute (input plus output x burndown).
    #[arg(long, allow_negative_numbers = true)]
    tpm: Option<i64>,
    /// Tokens per day.
    #[arg(long, allow_negative_numbers = true)]
    tpd: Option<i64>,
    /// How many times an output token counts (at least 1; default 1).
    #[arg(long, allow_negative_numbers = true)]
    burndown: Option<f64>,
}

impl LimitArgs {
    /// Sets the limits given; the others stay.
    fn apply(self, q: &mut pb::Quota) {
        if self.rpm.is_some() {
            q.requests_per_minute = self.rpm;
        }
        if self.tpm.is_some() {
            q.tokens_per_minute = self.tpm;
        }
        if self.tpd.is_some() {
            q.tokens_per_day = self.tpd;
        }
        if self.burndown.is_some() {
            q.output_burndown = self.burndown;
        }
    }
}

impl Shown for pb::Quota {
    const COLUMNS: &'static [(&'static str, &'static str)] = &[
        ("ID", "id"),
        ("RPM", "requests_per_minute"),
        ("TPM", "tokens_per_minute"),
        ("TOKENS/DAY", "tokens_per_day"),
        ("BURNDOWN", "output_burndown"),
        ("REVISION", "revision"),
    ];

    fn json(&self) -> Value {
        json!({
            "id": self.id, "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute, "tokens_per_day": self.tokens_per_day,
            "output_burndown": self.output_burndown, "revision": self.revision,
        })
    }
}

pub async fn run(c: &mut Client, cmd: Cmd, out: Output) -> anyhow::Result<String> {
    Ok(match cmd {
        Cmd::Create { scope, limits } => {
            let mut q = pb::Quota {
                scope: Some(pb::QuotaScope {
                    profile: scope.profile.unwrap_or_default(),
                    source_region: scope.source.unwrap_or_default(),
                    tenant: scope.tenant.unwrap_or_default(),
                }),
                ..Default::default()
            };
            limits.apply(&mut q);
            let req = pb::CreateQuotaRequest { quota: Some(q) };
            one(out, &call(c.create_quota(req)).await?)
        }
        Cmd::Get { id } => one(out, &call(c.get_quota(pb::GetQuotaRequest { id })).await?),
        Cmd::List => list(
            out,
            &all_pages!(c, list_quotas, pb::ListQuotasRequest::default(), quotas),
        ),
        Cmd::Update {
            id,
            limits,
            revision,
        } => {
            let mut q = call(c.get_quota(pb::GetQuotaRequest { id })).await?;
            limits.apply(&mut q);
            q.revision = revision.or(q.revision);
            let req = pb::UpdateQuotaRequest { quota: Some(q) };
            one(out, &call(c.update_quota(req)).await?)
        }
        Cmd::Delete { id, revision } => {
            let req = pb::DeleteQuotaRequest {
                id: id.clone(),
                revision: revision.or(0),
            };
            let rev = call(c.delete_quota(req)).await?.revision;
            deleted(out, "quota", &id, rev)
        }
    })
}
