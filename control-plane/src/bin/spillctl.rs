//! spillctl: the command line for Spillway's admin API.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use spillway_proto::pb::{self, admin_service_client::AdminServiceClient};
use tonic::transport::Channel;

/// Every page of a list call: the items in field `$items` of each page,
/// following `next_page_token` until the last one.
macro_rules! all_pages {
    ($client:expr, $method:ident, $req:expr, $items:ident) => {{
        let mut req = $req;
        let mut all = Vec::new();
        loop {
            let page = $client
                .$method(req.clone())
                .await
                .map_err(status_line)?
                .into_inner();
            all.extend(page.$items);
            if page.next_page_token.is_empty() {
                break all;
            }
            req.page_token = page.next_page_token;
        }
    }};
}

/// Manage a Spillway control plane: regions, inference profiles, route
/// tables, and the agents connected to it.
///
/// Every change is validated by the control plane; a refused change prints
/// one line naming the field that is wrong and exits non-zero. Updates are
/// safe against concurrent edits: spillctl sends the revision it read, and
/// the control plane refuses the write if someone changed the object since.
#[derive(Parser, Debug)]
#[command(name = "spillctl", version, about, long_about, after_help = EXAMPLES)]
struct Cli {
    /// Control-plane gRPC address.
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "SPILLWAY_CONTROL_PLANE",
        default_value = "http://127.0.0.1:7070"
    )]
    control_plane: String,
    /// The CA of an https control plane (PEM).
    #[arg(long, global = true, env = "SPILLWAY_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// An admin certificate and key (PEM), from `cargo xtask certs`.
    #[arg(long, global = true, env = "SPILLWAY_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long, global = true, env = "SPILLWAY_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// The admin token, instead of an admin certificate.
    #[arg(
        long,
        global = true,
        env = "SPILLWAY_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "\
Examples:
  spillctl regions create us-east --geography us
  spillctl profiles create us.llama-3.1-8b --destinations us-east,us-west
  spillctl profiles create team-search --base-profile us.llama-3.1-8b --tag cost-center=search
  spillctl routes set us.llama-3.1-8b --source us-east --dest us-east=3 --dest us-west=1
  spillctl routes set us.llama-3.1-8b --source us-east --dest us-east=1 --dest us-west=1:1 --ttft-objective-ms 1500
  spillctl routes explain us.llama-3.1-8b --source us-east
  spillctl quotas create --profile us.llama-3.1-8b --source us-east --rpm 600 --tpm 200000
  spillctl tenants create acme --profiles 'us.*' --deny-regions us-west
  spillctl keys create --tenant acme
  spillctl quotas create --tenant acme --rpm 60
  spillctl agents list -o json";

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Regions: named places with their own agents and model servers.
    #[command(subcommand)]
    Regions(RegionCmd),
    /// Inference profiles: what clients name as their model.
    #[command(subcommand)]
    Profiles(ProfileCmd),
    /// Route tables: per profile and source region, the destination regions
    /// with their weights and priorities.
    #[command(subcommand)]
    Routes(RouteCmd),
    /// Quotas: requests and tokens per minute (and tokens per day) for a
    /// profile in a source region, a tenant on a profile, or a tenant.
    #[command(subcommand)]
    Quotas(QuotaCmd),
    /// Tenants: who calls with API keys, which profiles they may call, and
    /// where their requests may be served.
    #[command(subcommand)]
    Tenants(TenantCmd),
    /// API keys of tenants: created (shown once), listed, revoked.
    #[command(subcommand)]
    Keys(KeyCmd),
    /// Agents connected to the control plane.
    #[command(subcommand)]
    Agents(AgentCmd),
}

#[derive(Subcommand, Debug)]
enum TenantCmd {
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

#[derive(ClapArgs, Debug)]
struct TenantArgs {
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

fn apply_tenant(t: &mut pb::Tenant, a: TenantArgs) {
    let policy = t.policy.get_or_insert_with(Default::default);
    let lists = [
        (a.allow_regions, &mut policy.allow_regions),
        (a.deny_regions, &mut policy.deny_regions),
        (a.allow_geographies, &mut policy.allow_geographies),
        (a.deny_geographies, &mut policy.deny_geographies),
    ];
    for (given, list) in lists {
        if let Some(v) = given {
            *list = v.into_iter().filter(|x| !x.is_empty()).collect();
        }
    }
    if let Some(p) = a.profiles {
        t.profiles = p;
    }
    if let Some(d) = a.description {
        t.description = d;
    }
}

const TENANT_COLS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("PROFILES", "profiles"),
    ("REGION POLICY", "policy"),
    ("REVISION", "revision"),
];

fn tenant_json(t: &pb::Tenant) -> Value {
    let p = t.policy.clone().unwrap_or_default();
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
        "name": t.name, "description": t.description, "profiles": t.profiles.join(","),
        "policy": if policy.is_empty() { "any region".to_string() } else { policy.join("; ") },
        "allow_regions": p.allow_regions, "deny_regions": p.deny_regions,
        "allow_geographies": p.allow_geographies, "deny_geographies": p.deny_geographies,
        "revision": t.revision,
    })
}

async fn tenants(c: &mut Client, cmd: TenantCmd, out: Output) -> anyhow::Result<String> {
    let one = |t: pb::Tenant| render(out, vec![tenant_json(&t)], TENANT_COLS);
    Ok(match cmd {
        TenantCmd::Create { name, fields } => {
            let mut t = pb::Tenant {
                name,
                ..Default::default()
            };
            apply_tenant(&mut t, fields);
            one(c
                .create_tenant(pb::CreateTenantRequest { tenant: Some(t) })
                .await
                .map_err(status_line)?
                .into_inner())
        }
        TenantCmd::Get { name } => one(c
            .get_tenant(pb::GetTenantRequest { name })
            .await
            .map_err(status_line)?
            .into_inner()),
        TenantCmd::List => {
            let tenants = all_pages!(c, list_tenants, pb::ListTenantsRequest::default(), tenants);
            render_list(out, tenants.iter().map(tenant_json).collect(), TENANT_COLS)
        }
        TenantCmd::Update {
            name,
            fields,
            revision,
        } => {
            let mut t = c
                .get_tenant(pb::GetTenantRequest { name })
                .await
                .map_err(status_line)?
                .into_inner();
            apply_tenant(&mut t, fields);
            if let Some(rev) = revision.revision {
                t.revision = rev;
            }
            one(c
                .update_tenant(pb::UpdateTenantRequest { tenant: Some(t) })
                .await
                .map_err(status_line)?
                .into_inner())
        }
        TenantCmd::Delete { name, revision } => {
            let req = pb::DeleteTenantRequest {
                name: name.clone(),
                revision: revision.revision.unwrap_or(0),
            };
            let rev = c
                .delete_tenant(req)
                .await
                .map_err(status_line)?
                .into_inner()
                .revision;
            deleted(out, "tenant", &name, rev)
        }
    })
}

#[derive(Subcommand, Debug)]
enum KeyCmd {
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

const KEY_COLS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("TENANT", "tenant"),
    ("DESCRIPTION", "description"),
    ("CREATED", "created_at_unix"),
];

fn key_json(k: &pb::ApiKey) -> Value {
    json!({"id": k.id, "tenant": k.tenant, "description": k.description, "created_at_unix": k.created_at_unix})
}

async fn api_keys(c: &mut Client, cmd: KeyCmd, out: Output) -> anyhow::Result<String> {
    Ok(match cmd {
        KeyCmd::Create {
            tenant,
            description,
        } => {
            let created = c
                .create_key(pb::CreateKeyRequest {
                    tenant,
                    description,
                })
                .await
                .map_err(status_line)?
                .into_inner();
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
        KeyCmd::List { tenant } => {
            let req = pb::ListKeysRequest {
                tenant: tenant.unwrap_or_default(),
                ..Default::default()
            };
            let keys = all_pages!(c, list_keys, req, keys);
            render_list(out, keys.iter().map(key_json).collect(), KEY_COLS)
        }
        KeyCmd::Revoke { id } => {
            let rev = c
                .revoke_key(pb::RevokeKeyRequest { id: id.clone() })
                .await
                .map_err(status_line)?
                .into_inner()
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

#[derive(Subcommand, Debug)]
enum QuotaCmd {
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

#[derive(ClapArgs, Debug)]
struct ScopeArgs {
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

#[derive(ClapArgs, Debug)]
struct LimitArgs {
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

fn apply_limits(q: &mut pb::Quota, l: LimitArgs) {
    if l.rpm.is_some() {
        q.requests_per_minute = l.rpm;
    }
    if l.tpm.is_some() {
        q.tokens_per_minute = l.tpm;
    }
    if l.tpd.is_some() {
        q.tokens_per_day = l.tpd;
    }
    if l.burndown.is_some() {
        q.output_burndown = l.burndown;
    }
}

const QUOTA_COLS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("RPM", "requests_per_minute"),
    ("TPM", "tokens_per_minute"),
    ("TOKENS/DAY", "tokens_per_day"),
    ("BURNDOWN", "output_burndown"),
    ("REVISION", "revision"),
];

fn quota_json(q: &pb::Quota) -> Value {
    json!({
        "id": q.id, "requests_per_minute": q.requests_per_minute, "tokens_per_minute": q.tokens_per_minute,
        "tokens_per_day": q.tokens_per_day, "output_burndown": q.output_burndown, "revision": q.revision,
    })
}

async fn quotas(c: &mut Client, cmd: QuotaCmd, out: Output) -> anyhow::Result<String> {
    let one = |q: pb::Quota| render(out, vec![quota_json(&q)], QUOTA_COLS);
    Ok(match cmd {
        QuotaCmd::Create { scope, limits } => {
            let mut q = pb::Quota {
                scope: Some(pb::QuotaScope {
                    profile: scope.profile.unwrap_or_default(),
                    source_region: scope.source.unwrap_or_default(),
                    tenant: scope.tenant.unwrap_or_default(),
                }),
                ..Default::default()
            };
            apply_limits(&mut q, limits);
            one(c
                .create_quota(pb::CreateQuotaRequest { quota: Some(q) })
                .await
                .map_err(status_line)?
                .into_inner())
        }
        QuotaCmd::Get { id } => one(c
            .get_quota(pb::GetQuotaRequest { id })
            .await
            .map_err(status_line)?
            .into_inner()),
        QuotaCmd::List => {
            let quotas = all_pages!(c, list_quotas, pb::ListQuotasRequest::default(), quotas);
            render_list(out, quotas.iter().map(quota_json).collect(), QUOTA_COLS)
        }
        QuotaCmd::Update {
            id,
            limits,
            revision,
        } => {
            let mut q = c
                .get_quota(pb::GetQuotaRequest { id })
                .await
                .map_err(status_line)?
                .into_inner();
            apply_limits(&mut q, limits);
            if let Some(rev) = revision.revision {
                q.revision = rev;
            }
            one(c
                .update_quota(pb::UpdateQuotaRequest { quota: Some(q) })
                .await
                .map_err(status_line)?
                .into_inner())
        }
        QuotaCmd::Delete { id, revision } => {
            let req = pb::DeleteQuotaRequest {
                id: id.clone(),
                revision: revision.revision.unwrap_or(0),
            };
            let rev = c
                .delete_quota(req)
                .await
                .map_err(status_line)?
                .into_inner()
                .revision;
            deleted(out, "quota", &id, rev)
        }
    })
}

#[derive(Subcommand, Debug)]
enum RegionCmd {
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

#[derive(ClapArgs, Debug)]
struct RevisionArg {
    /// Write only if the object is still at this revision (default: the
    /// revision spillctl reads just before writing).
    #[arg(long)]
    revision: Option<i64>,
}

#[derive(Subcommand, Debug)]
enum ProfileCmd {
    /// Create a profile. The id says its kind: `<geography>.<model>` is
    /// geographic, `global.<model>` is global, a name without '.' is an
    /// application profile that copies --base-profile, or --model in
    /// --base-region.
    Create {
        id: String,
        #[command(flatten)]
        fields: ProfileFields,
    },
    /// Show one profile.
    Get { id: String },
    /// List every profile.
    List,
    /// Change a profile's destinations, tags or description.
    Update {
        id: String,
        #[command(flatten)]
        fields: ProfileFields,
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

#[derive(ClapArgs, Debug)]
struct ProfileFields {
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

#[derive(Subcommand, Debug)]
enum RouteCmd {
    /// Create or replace the route table of a profile for one source region.
    Set {
        profile: String,
        /// The source region whose calls this table routes.
        #[arg(long, short = 's')]
        source: String,
        /// A destination: region=weight or region=weight:priority (lower
        /// priorities are tried first); repeatable.
        #[arg(long = "dest", required = true, value_parser = parse_dest)]
        destinations: Vec<pb::RouteDestination>,
        /// Time-to-first-token objective, in milliseconds (1 to 600000): a
        /// model server whose engine reports a TTFT p90 above it counts as
        /// saturated for this table's calls, so they spill. 0 removes it;
        /// without this flag, a table being replaced keeps its objective.
        #[arg(long, value_name = "MS")]
        ttft_objective_ms: Option<u32>,
        #[command(flatten)]
        revision: RevisionArg,
    },
    /// Show the route table of a profile for one source region.
    Get {
        profile: String,
        #[arg(long, short = 's')]
        source: String,
    },
    /// List route tables, of one profile or of all.
    List {
        #[arg(long)]
        profile: Option<String>,
    },
    /// Show the effective weights that calls from SOURCE follow now, the
    /// reason for each (headroom, spill, drained, panic, override), and the
    /// load figures they came from.
    Explain {
        profile: String,
        #[arg(long, short = 's')]
        source: String,
    },
    /// Delete a route table; calls then follow the default (source first).
    Delete {
        profile: String,
        #[arg(long, short = 's')]
        source: String,
        #[command(flatten)]
        revision: RevisionArg,
    },
}

#[derive(Subcommand, Debug)]
enum AgentCmd {
    /// List connected agents with the config version each last ACKed and
    /// the last update each refused.
    List {
        #[arg(long)]
        region: Option<String>,
    },
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not key=value"))
}

fn parse_dest(s: &str) -> Result<pb::RouteDestination, String> {
    let (region, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not region=weight[:priority]"))?;
    let (weight, priority) = match rest.split_once(':') {
        Some((w, p)) => (
            w,
            p.parse::<u32>()
                .map_err(|_| format!("priority `{p}` is not a whole number"))?,
        ),
        None => (rest, 0),
    };
    let weight = weight
        .parse::<f64>()
        .map_err(|_| format!("weight `{weight}` is not a number"))?;
    Ok(pb::RouteDestination {
        region: region.to_string(),
        weight,
        priority,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(text) => {
            if !text.is_empty() {
                println!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A gRPC status as one line: the control plane's message says what is wrong.
fn status_line(s: tonic::Status) -> anyhow::Error {
    let code = format!("{:?}", s.code());
    anyhow::anyhow!("{} ({})", s.message(), to_snake(&code))
}

fn to_snake(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Adds the admin token, when one is given, to every call.
#[derive(Clone)]
struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

type Client = AdminServiceClient<tonic::service::interceptor::InterceptedService<Channel, Token>>;

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    let addr = &cli.control_plane;
    let mut endpoint = Channel::from_shared(addr.to_string())
        .map_err(|_| {
            anyhow::anyhow!("--control-plane `{addr}` is not a URL like https://127.0.0.1:7070")
        })?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(30));
    if addr.starts_with("https://") {
        let ca = cli.tls_ca.as_ref().ok_or_else(|| {
            anyhow::anyhow!("an https control plane needs --tls-ca (the CA that signed it)")
        })?;
        let read = |p: &std::path::PathBuf| {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read `{}`: {e}", p.display()))
        };
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        match (&cli.tls_cert, &cli.tls_key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                ));
            }
            (None, None) => {}
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
    }
    if cli.token.is_some() && !addr.starts_with("https://") {
        anyhow::bail!("--token is sent only over TLS: use an https:// --control-plane");
    }
    let token = match &cli.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| anyhow::anyhow!("--token must be printable ASCII"))?,
        ),
        None => None,
    };
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the control plane at {addr}: {}",
            source_chain(&e)
        )
    })?;
    Ok(AdminServiceClient::with_interceptor(channel, Token(token)))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

async fn run(cli: Cli) -> anyhow::Result<String> {
    let mut c = connect(&cli).await?;
    let out = cli.output;
    match cli.command {
        Command::Regions(cmd) => regions(&mut c, cmd, out).await,
        Command::Profiles(cmd) => profiles(&mut c, cmd, out).await,
        Command::Routes(cmd) => routes(&mut c, cmd, out).await,
        Command::Quotas(cmd) => quotas(&mut c, cmd, out).await,
        Command::Tenants(cmd) => tenants(&mut c, cmd, out).await,
        Command::Keys(cmd) => api_keys(&mut c, cmd, out).await,
        Command::Agents(AgentCmd::List { region }) => {
            let req = pb::ListAgentsRequest {
                region: region.unwrap_or_default(),
            };
            let agents = c
                .list_agents(req)
                .await
                .map_err(status_line)?
                .into_inner()
                .agents;
            Ok(render_list(
                out,
                agents.iter().map(agent_json).collect(),
                &[
                    ("REGION", "region"),
                    ("AGENT", "agent_id"),
                    ("RELAY", "relay_address"),
                    ("CONTROL PLANE", "control_plane"),
                    ("SENT", "sent_version"),
                    ("ACKED", "acked_version"),
                    ("NACKED", "nacked_version"),
                    ("NACK REASON", "nack_reason"),
                ],
            ))
        }
    }
}

const REGION_COLS: &[(&str, &str)] = &[
    ("NAME", "name"),
    ("GEOGRAPHY", "geography"),
    ("DESCRIPTION", "description"),
    ("REVISION", "revision"),
];

async fn regions(c: &mut Client, cmd: RegionCmd, out: Output) -> anyhow::Result<String> {
    let one = |r: pb::Region| render(out, vec![region_json(&r)], REGION_COLS);
    Ok(match cmd {
        RegionCmd::Create {
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
            let r = c
                .create_region(pb::CreateRegionRequest {
                    region: Some(region),
                })
                .await
                .map_err(status_line)?;
            one(r.into_inner())
        }
        RegionCmd::Get { name } => one(c
            .get_region(pb::GetRegionRequest { name })
            .await
            .map_err(status_line)?
            .into_inner()),
        RegionCmd::List => {
            let regions = all_pages!(c, list_regions, pb::ListRegionsRequest::default(), regions);
            render_list(out, regions.iter().map(region_json).collect(), REGION_COLS)
        }
        RegionCmd::Update {
            name,
            geography,
            description,
            revision,
        } => {
            let mut r = c
                .get_region(pb::GetRegionRequest { name })
                .await
                .map_err(status_line)?
                .into_inner();
            if let Some(g) = geography {
                r.geography = g;
            }
            if let Some(d) = description {
                r.description = d;
            }
            if let Some(rev) = revision.revision {
                r.revision = rev;
            }
            let r = c
                .update_region(pb::UpdateRegionRequest { region: Some(r) })
                .await
                .map_err(status_line)?;
            one(r.into_inner())
        }
        RegionCmd::Delete { name, revision } => {
            let req = pb::DeleteRegionRequest {
                name: name.clone(),
                revision: revision.revision.unwrap_or(0),
            };
            let rev = c
                .delete_region(req)
                .await
                .map_err(status_line)?
                .into_inner()
                .revision;
            deleted(out, "region", &name, rev)
        }
    })
}

const PROFILE_COLS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("KIND", "kind"),
    ("MODEL", "model"),
    ("DESTINATIONS", "destinations"),
    ("COPIES", "copies"),
    ("TAGS", "tags"),
    ("REVISION", "revision"),
];

fn apply_fields(p: &mut pb::InferenceProfile, f: ProfileFields) {
    if let Some(d) = f.destinations {
        p.destinations = d;
    }
    if let Some(b) = f.base_profile {
        p.base_profile = b;
    }
    if let Some(r) = f.base_region {
        p.base_region = r;
    }
    if let Some(m) = f.model {
        p.model = m;
    }
    for (k, v) in f.tags {
        p.tags.insert(k, v);
    }
    if let Some(d) = f.description {
        p.description = d;
    }
}

async fn profiles(c: &mut Client, cmd: ProfileCmd, out: Output) -> anyhow::Result<String> {
    let one = |p: pb::InferenceProfile| render(out, vec![profile_json(&p)], PROFILE_COLS);
    Ok(match cmd {
        ProfileCmd::Create { id, fields } => {
            let mut p = pb::InferenceProfile {
                id,
                ..Default::default()
            };
            apply_fields(&mut p, fields);
            one(c
                .create_profile(pb::CreateProfileRequest { profile: Some(p) })
                .await
                .map_err(status_line)?
                .into_inner())
        }
        ProfileCmd::Get { id } => one(c
            .get_profile(pb::GetProfileRequest { id })
            .await
            .map_err(status_line)?
            .into_inner()),
        ProfileCmd::List => {
            let profiles = all_pages!(
                c,
                list_profiles,
                pb::ListProfilesRequest::default(),
                profiles
            );
            render_list(
                out,
                profiles.iter().map(profile_json).collect(),
                PROFILE_COLS,
            )
        }
        ProfileCmd::Update {
            id,
            fields,
            revision,
        } => {
            let mut p = c
                .get_profile(pb::GetProfileRequest { id })
                .await
                .map_err(status_line)?
                .into_inner();
            apply_fields(&mut p, fields);
            if let Some(rev) = revision.revision {
                p.revision = rev;
            }
            one(c
                .update_profile(pb::UpdateProfileRequest { profile: Some(p) })
                .await
                .map_err(status_line)?
                .into_inner())
        }
        ProfileCmd::Delete { id, revision } => {
            let req = pb::DeleteProfileRequest {
                id: id.clone(),
                revision: revision.revision.unwrap_or(0),
            };
            let rev = c
                .delete_profile(req)
                .await
                .map_err(status_line)?
                .into_inner()
                .revision;
            deleted(out, "profile", &id, rev)
        }
    })
}

const ROUTE_COLS: &[(&str, &str)] = &[
    ("PROFILE", "profile"),
    ("SOURCE", "source_region"),
    ("DESTINATIONS", "destinations"),
    ("TTFT OBJECTIVE", "ttft_objective"),
    ("REVISION", "revision"),
];

/// The objective a table written by `routes set` gets: the flag's (0: none),
/// else the one of the table it replaces, if any.
fn objective_to_write(flag: Option<u32>, existing: Option<&pb::RouteTable>) -> u32 {
    flag.unwrap_or_else(|| existing.map_or(0, |t| t.ttft_objective_ms))
}

/// The TTFT objective that applies to calls of `profile` from `source`: an
/// application profile follows the route table of the profile it copies,
/// and with no table there is none.
async fn objective_for(c: &mut Client, profile: &str, source: &str) -> anyhow::Result<u32> {
    let p = c
        .get_profile(pb::GetProfileRequest { id: profile.into() })
        .await
        .map_err(status_line)?
        .into_inner();
    let owner = if p.base_profile.is_empty() {
        p.id
    } else {
        p.base_profile
    };
    let get = pb::GetRouteTableRequest {
        profile: owner,
        source_region: source.into(),
    };
    match c.get_route_table(get).await {
        Ok(t) => Ok(t.into_inner().ttft_objective_ms),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(0),
        Err(s) => Err(status_line(s)),
    }
}

/// The engines' part of an explained destination, e.g. `kv 91%, 6 waiting,
/// 12 running, 2/2 servers saturated, ttft p90 180 ms`, with only what is
/// known: no KV usage when no engine reports one, and where no server
/// reports engine figures, the limit learned from time to first token
/// instead. Empty when the region reported no model server.
fn engines_text(d: &pb::ExplainedDestination) -> String {
    if d.servers == 0 {
        return String::new();
    }
    // An idle engine may report all zeros and no KV usage (llama.cpp):
    // it then reads as a server without engine figures, which for an idle
    // server says nothing wrong.
    let engines = d.kv_usage.is_some()
        || d.engine_running > 0.0
        || d.engine_waiting > 0.0
        || d.engine_ttft_p90_ms > 0.0;
    let mut parts = Vec::new();
    if engines {
        if let Some(kv) = d.kv_usage {
            parts.push(format!("kv {:.0}%", kv * 100.0));
        }
        parts.push(format!("{:.0} waiting", d.engine_waiting));
        parts.push(format!("{:.0} running", d.engine_running));
    } else {
        parts.push(format!("learned limit {:.0}", d.learned_limit));
    }
    parts.push(format!(
        "{}/{} servers saturated",
        d.saturated_servers, d.servers
    ));
    if d.engine_ttft_p90_ms > 0.0 {
        parts.push(format!("ttft p90 {:.0} ms", d.engine_ttft_p90_ms));
    }
    parts.join(", ")
}

async fn routes(c: &mut Client, cmd: RouteCmd, out: Output) -> anyhow::Result<String> {
    let one = |t: pb::RouteTable| render(out, vec![route_json(&t)], ROUTE_COLS);
    Ok(match cmd {
        RouteCmd::Set {
            profile,
            source,
            destinations,
            ttft_objective_ms,
            revision,
        } => {
            let get = pb::GetRouteTableRequest {
                profile: profile.clone(),
                source_region: source.clone(),
            };
            let existing = match c.get_route_table(get).await {
                Ok(t) => Some(t.into_inner()),
                Err(s) if s.code() == tonic::Code::NotFound => None,
                Err(s) => return Err(status_line(s)),
            };
            let mut table = pb::RouteTable {
                profile,
                source_region: source,
                destinations,
                ttft_objective_ms: objective_to_write(ttft_objective_ms, existing.as_ref()),
                revision: 0,
            };
            let written = match existing {
                Some(current) => {
                    table.revision = revision.revision.unwrap_or(current.revision);
                    c.update_route_table(pb::UpdateRouteTableRequest {
                        route_table: Some(table),
                    })
                    .await
                }
                None => {
                    c.create_route_table(pb::CreateRouteTableRequest {
                        route_table: Some(table),
                    })
                    .await
                }
            };
            one(written.map_err(status_line)?.into_inner())
        }
        RouteCmd::Get { profile, source } => {
            let req = pb::GetRouteTableRequest {
                profile,
                source_region: source,
            };
            one(c
                .get_route_table(req)
                .await
                .map_err(status_line)?
                .into_inner())
        }
        RouteCmd::List { profile } => {
            let req = pb::ListRouteTablesRequest {
                profile: profile.unwrap_or_default(),
                ..Default::default()
            };
            let route_tables = all_pages!(c, list_route_tables, req, route_tables);
            render_list(
                out,
                route_tables.iter().map(route_json).collect(),
                ROUTE_COLS,
            )
        }
        RouteCmd::Explain { profile, source } => {
            let req = pb::ExplainRouteRequest {
                profile: profile.clone(),
                source_region: source.clone(),
            };
            let e = c
                .explain_route(req)
                .await
                .map_err(status_line)?
                .into_inner();
            let objective = objective_for(c, &profile, &source).await?;
            if out == Output::Json {
                let dests: Vec<Value> = e
                    .destinations
                    .iter()
                    .map(|d| {
                        json!({
                            "region": d.region, "base_weight": d.base_weight, "priority": d.priority,
                            "weight": d.weight, "reason": d.reason, "capacity": d.capacity,
                            "in_flight": d.in_flight, "error_rate": d.error_rate, "reporting": d.reporting,
                            "ttft_ms": d.ttft_ms, "output_tokens_per_second": d.output_tokens_per_second,
                            "engine_running": d.engine_running, "engine_waiting": d.engine_waiting,
                            "kv_usage": d.kv_usage, "learned_limit": d.learned_limit,
                            "engine_ttft_p90_ms": d.engine_ttft_p90_ms, "servers": d.servers,
                            "saturated_servers": d.saturated_servers,
                        })
                    })
                    .collect();
                let v = json!({
                    "profile": e.profile, "source_region": e.source_region, "model": e.model,
                    "ttft_objective_ms": (objective > 0).then_some(objective),
                    "leader": e.leader, "destinations": dests,
                });
                return Ok(serde_json::to_string_pretty(&v)?);
            }
            let rows: Vec<Value> = e
                .destinations
                .iter()
                .map(|d| {
                    let load = if d.reporting {
                        format!(
                            "{:.0}/{:.0} in flight, {:.0}% errors, ttft {:.1} ms, {:.0} tokens/s",
                            d.in_flight,
                            d.capacity,
                            d.error_rate * 100.0,
                            d.ttft_ms,
                            d.output_tokens_per_second
                        )
                    } else {
                        "no reports".to_string()
                    };
                    json!({
                        "region": d.region,
                        "base": format!("{}:{}", d.base_weight, d.priority),
                        "weight": format!("{:.3}", d.weight),
                        "reason": d.reason,
                        "load": load,
                        "servers": if d.reporting { engines_text(d) } else { String::new() },
                    })
                })
                .collect();
            let leader = if e.leader.is_empty() {
                "nobody yet"
            } else {
                e.leader.as_str()
            };
            let objective = if objective > 0 {
                format!(", ttft objective {objective} ms")
            } else {
                String::new()
            };
            let head = format!(
                "{} from {} (model {}{objective}), weights computed by {leader}\n",
                e.profile, e.source_region, e.model
            );
            head + &render(
                Output::Table,
                rows,
                &[
                    ("REGION", "region"),
                    ("BASE WEIGHT:PRIORITY", "base"),
                    ("WEIGHT", "weight"),
                    ("REASON", "reason"),
                    ("LOAD", "load"),
                    ("SERVERS", "servers"),
                ],
            )
        }
        RouteCmd::Delete {
            profile,
            source,
            revision,
        } => {
            let name = format!("{profile}/{source}");
            let req = pb::DeleteRouteTableRequest {
                profile,
                source_region: source,
                revision: revision.revision.unwrap_or(0),
            };
            let rev = c
                .delete_route_table(req)
                .await
                .map_err(status_line)?
                .into_inner()
                .revision;
            deleted(out, "route table", &name, rev)
        }
    })
}

fn deleted(out: Output, kind: &str, name: &str, revision: i64) -> String {
    match out {
        Output::Json => json!({"deleted": kind, "name": name, "revision": revision}).to_string(),
        Output::Table => format!("deleted {kind} {name} (revision {revision})"),
    }
}

fn region_json(r: &pb::Region) -> Value {
    json!({"name": r.name, "geography": r.geography, "description": r.description, "revision": r.revision})
}

fn profile_json(p: &pb::InferenceProfile) -> Value {
    let kind = pb::ProfileKind::try_from(p.kind)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("PROFILE_KIND_")
                .to_lowercase()
        })
        .unwrap_or_default();
    let copies = if !p.base_profile.is_empty() {
        p.base_profile.clone()
    } else if !p.base_region.is_empty() {
        format!("{} in {}", p.model, p.base_region)
    } else {
        String::new()
    };
    let tags: BTreeMap<_, _> = p.tags.iter().collect();
    json!({
        "id": p.id, "kind": kind, "model": p.model, "destinations": p.destinations,
        "copies": copies, "base_profile": p.base_profile, "base_region": p.base_region,
        "tags": tags, "description": p.description, "revision": p.revision,
    })
}

fn route_json(t: &pb::RouteTable) -> Value {
    let dests: Vec<Value> = t
        .destinations
        .iter()
        .map(|d| json!({"region": d.region, "weight": d.weight, "priority": d.priority}))
        .collect();
    let objective = (t.ttft_objective_ms > 0).then_some(t.ttft_objective_ms);
    json!({
        "profile": t.profile, "source_region": t.source_region, "destinations": dests,
        "ttft_objective_ms": objective,
        "ttft_objective": objective.map_or_else(|| "none".to_string(), |ms| format!("{ms} ms")),
        "revision": t.revision,
    })
}

fn agent_json(a: &pb::AgentStatus) -> Value {
    json!({
        "agent_id": a.agent_id, "region": a.region, "relay_address": a.relay_address,
        "control_plane": a.control_plane, "connected_at_unix": a.connected_at_unix,
        "sent_version": a.sent_version, "acked_version": a.acked_version,
        "nacked_version": a.nacked_version, "nack_reason": a.nack_reason,
    })
}

/// Renders rows as JSON (one object, or an array for lists) or as an
/// aligned table of the given columns.
/// A list: in JSON always an array, however many rows.
fn render_list(out: Output, rows: Vec<Value>, cols: &[(&str, &str)]) -> String {
    if out == Output::Json {
        return serde_json::to_string_pretty(&Value::Array(rows)).expect("json values serialize");
    }
    render(out, rows, cols)
}

/// One object, or rows of a table.
fn render(out: Output, rows: Vec<Value>, cols: &[(&str, &str)]) -> String {
    if out == Output::Json {
        let v = if rows.len() == 1 {
            rows[0].clone()
        } else {
            Value::Array(rows)
        };
        return serde_json::to_string_pretty(&v).expect("json values serialize");
    }
    let cell = |v: &Value, key: &str| -> String {
        match &v[key] {
            Value::String(s) => s.clone(),
            Value::Array(items) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => s.clone(),
                    Value::Object(o) if o.contains_key("region") => format!(
                        "{}={}:{}",
                        o["region"].as_str().unwrap_or(""),
                        o["weight"],
                        o["priority"]
                    ),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            Value::Object(o) => o
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(","),
            Value::Null => String::new(),
            other => other.to_string(),
        }
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|(_, k)| cell(r, k)).collect())
        .collect();
    let mut widths: Vec<usize> = cols.iter().map(|(h, _)| h.len()).collect();
    for row in &table {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut lines = vec![line(cols.iter().map(|(h, _)| *h).collect())];
    for row in &table {
        lines.push(line(row.iter().map(String::as_str).collect()));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    fn set(args: &[&str]) -> Option<u32> {
        let mut argv = vec!["spillctl", "routes", "set", "p", "-s", "a", "--dest", "a=1"];
        argv.extend(args);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Routes(RouteCmd::Set {
                ttft_objective_ms, ..
            }) => ttft_objective_ms,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn routes_set_keeps_sets_or_clears_the_ttft_objective() {
        let existing = pb::RouteTable {
            ttft_objective_ms: 800,
            ..Default::default()
        };
        // Without the flag a replaced table keeps its objective; a new
        // one has none.
        assert_eq!(set(&[]), None);
        assert_eq!(objective_to_write(set(&[]), Some(&existing)), 800);
        assert_eq!(objective_to_write(set(&[]), None), 0);
        let given = set(&["--ttft-objective-ms", "1500"]);
        assert_eq!(objective_to_write(given, Some(&existing)), 1500);
        // 0 clears it.
        let cleared = set(&["--ttft-objective-ms", "0"]);
        assert_eq!(objective_to_write(cleared, Some(&existing)), 0);
        // Not a count of milliseconds: refused before anything is sent.
        for bad in ["-5", "fast", "1.5"] {
            let argv = [
                "spillctl",
                "routes",
                "set",
                "p",
                "-s",
                "a",
                "--dest",
                "a=1",
                "--ttft-objective-ms",
                bad,
            ];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn route_tables_show_their_objective() {
        let mut t = pb::RouteTable {
            profile: "p".into(),
            source_region: "a".into(),
            destinations: vec![pb::RouteDestination {
                region: "a".into(),
                weight: 1.0,
                priority: 0,
            }],
            ttft_objective_ms: 1500,
            revision: 7,
        };
        let table = render(Output::Table, vec![route_json(&t)], ROUTE_COLS);
        assert!(
            table.lines().next().unwrap().contains("TTFT OBJECTIVE"),
            "{table}"
        );
        assert!(table.lines().nth(1).unwrap().contains("1500 ms"), "{table}");
        assert_eq!(route_json(&t)["ttft_objective_ms"], 1500);
        t.ttft_objective_ms = 0;
        assert!(render(Output::Table, vec![route_json(&t)], ROUTE_COLS).contains("none"));
        assert_eq!(route_json(&t)["ttft_objective_ms"], Value::Null);
    }

    #[test]
    fn explain_shows_what_the_engines_say() {
        let engines = pb::ExplainedDestination {
            engine_running: 12.0,
            engine_waiting: 6.0,
            kv_usage: Some(0.91),
            learned_limit: 9.0,
            engine_ttft_p90_ms: 180.0,
            servers: 2,
            saturated_servers: 2,
            ..Default::default()
        };
        assert_eq!(
            engines_text(&engines),
            "kv 91%, 6 waiting, 12 running, 2/2 servers saturated, ttft p90 180 ms"
        );
        // No KV usage reported (llama.cpp): none shown.
        let slots = pb::ExplainedDestination {
            kv_usage: None,
            ..engines.clone()
        };
        assert_eq!(
            engines_text(&slots),
            "6 waiting, 12 running, 2/2 servers saturated, ttft p90 180 ms"
        );
        // No engine metrics: the learned limit instead.
        let learned = pb::ExplainedDestination {
            learned_limit: 7.0,
            servers: 3,
            saturated_servers: 0,
            ..Default::default()
        };
        assert_eq!(
            engines_text(&learned),
            "learned limit 7, 0/3 servers saturated"
        );
        assert_eq!(engines_text(&pb::ExplainedDestination::default()), "");
    }
}
