//! Connecting to the control plane (its address, TLS and the admin token),
//! and what every call shares: an error as one line, lists followed page
//! by page, and the revision a write sends.

use std::path::PathBuf;

use clap::Args;
use spillway_proto::pb::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;

/// Where the control plane is and how spillctl proves it is an admin. The
/// flags are global: they may follow the subcommand.
#[derive(Args, Debug)]
pub struct Connection {
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
    tls_ca: Option<PathBuf>,
    /// An admin certificate and key (PEM), from `cargo xtask certs`.
    #[arg(long, global = true, env = "SPILLWAY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    #[arg(long, global = true, env = "SPILLWAY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The admin token, instead of an admin certificate.
    #[arg(
        long,
        global = true,
        env = "SPILLWAY_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

pub type Client =
    AdminServiceClient<tonic::service::interceptor::InterceptedService<Channel, Token>>;

impl Connection {
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let addr = &self.control_plane;
        let mut endpoint = Channel::from_shared(addr.to_string())
            .map_err(|_| {
                anyhow::anyhow!("--control-plane `{addr}` is not a URL like https://127.0.0.1:7070")
            })?
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(30));
        if addr.starts_with("https://") {
            let ca = self.tls_ca.as_ref().ok_or_else(|| {
                anyhow::anyhow!("an https control plane needs --tls-ca (the CA that signed it)")
            })?;
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read `{}`: {e}", p.display()))
            };
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
            match (&self.tls_cert, &self.tls_key) {
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
        if self.token.is_some() && !addr.starts_with("https://") {
            anyhow::bail!("--token is sent only over TLS: use an https:// --control-plane");
        }
        let token = match &self.token {
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
}

/// Adds the admin token, when one is given, to every call.
#[derive(Clone)]
pub struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
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

/// A call's answer, or its status as one line (see [`status_line`]).
pub async fn call<T>(
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    Ok(call.await.map_err(status_line)?.into_inner())
}

/// A gRPC status as one line: the control plane's message says what is wrong.
pub fn status_line(s: tonic::Status) -> anyhow::Error {
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

/// Every page of a list call: the items in field `$items` of each page,
/// following `next_page_token` until the last one.
macro_rules! all_pages {
    ($client:expr, $method:ident, $req:expr, $items:ident) => {{
        let mut req = $req;
        let mut all = Vec::new();
        loop {
            let page = $crate::client::call($client.$method(req.clone())).await?;
            all.extend(page.$items);
            if page.next_page_token.is_empty() {
                break all;
            }
            req.page_token = page.next_page_token;
        }
    }};
}
pub(crate) use all_pages;

#[derive(clap::Args, Debug)]
pub struct RevisionArg {
    /// Write only if the object is still at this revision (default: the
    /// revision spillctl reads just before writing).
    #[arg(long)]
    revision: Option<i64>,
}

impl RevisionArg {
    /// The revision a write sends: the one given, else `read` (for an
    /// update, the revision just read; for a delete, 0: whatever is there).
    pub fn or(&self, read: i64) -> i64 {
        self.revision.unwrap_or(read)
    }
}
