//! TLS for every hop, with rustls: loading PEM files, the tonic and rustls
//! configurations each side needs, and who a peer certificate names.
//!
//! Identities are SPIFFE-style URIs in the certificate's subject alternative
//! names (what `cargo xtask certs` writes):
//!
//! - an agent: `spiffe://spillway/region/<region>/agent/<agent-id>`
//! - a control-plane replica: `spiffe://spillway/control-plane/<id>`
//! - an operator or tool using the admin API: `spiffe://spillway/admin/<name>`
//!
//! The certificate chain is checked by rustls against the configured CA
//! before any of this is read.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity as TonicIdentity, ServerTlsConfig};

/// The three PEM files of one party: the CA it trusts, its certificate
/// (chain) and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} `{}`: {e}", path.display()))
}

impl TlsFiles {
    /// All three, or none, from optional flags named `--{prefix}ca`,
    /// `--{prefix}cert`, `--{prefix}key`.
    pub fn from_flags(
        prefix: &str,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, String> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsFiles { ca, cert, key })),
            _ => Err(format!(
                "--{prefix}ca, --{prefix}cert and --{prefix}key go together: give all three"
            )),
        }
    }

    fn identity(&self) -> Result<TonicIdentity, String> {
        Ok(TonicIdentity::from_pem(
            read(&self.cert, "certificate")?,
            read(&self.key, "private key")?,
        ))
    }

    fn ca(&self) -> Result<Certificate, String> {
        Ok(Certificate::from_pem(read(&self.ca, "CA certificate")?))
    }

    /// A gRPC server that presents this identity and verifies client
    /// certificates against the CA; with `optional`, clients without one
    /// are let in (their calls must then authenticate otherwise).
    pub fn grpc_server(&self, optional: bool) -> Result<ServerTlsConfig, String> {
        self.check()?;
        Ok(ServerTlsConfig::new()
            .identity(self.identity()?)
            .client_ca_root(self.ca()?)
            .client_auth_optional(optional))
    }

    /// A gRPC client that verifies the server against the CA and presents
    /// this identity.
    pub fn grpc_client(&self) -> Result<ClientTlsConfig, String> {
        self.check()?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(self.ca()?)
            .identity(self.identity()?))
    }

    /// A plain rustls server (the HTTP door): this identity, no client
    /// certificates (clients authenticate with API keys).
    pub fn rustls_server(&self) -> Result<rustls::ServerConfig, String> {
        let (certs, key) = self.load()?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                format!(
                    "the certificate `{}` does not fit its key: {e}",
                    self.cert.display()
                )
            })
    }

    fn load(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        let certs = CertificateDer::pem_slice_iter(&read(&self.cert, "certificate")?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("`{}` is not a PEM certificate: {e}", self.cert.display()))?;
        if certs.is_empty() {
            return Err(format!("`{}` holds no certificate", self.cert.display()));
        }
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key, "private key")?)
            .map_err(|e| format!("`{}` is not a PEM private key: {e}", self.key.display()))?;
        Ok((certs, key))
    }

    /// Reads and parses the files, so that a wrong path or a broken file
    /// is reported at start with its name.
    pub fn check(&self) -> Result<(), String> {
        self.load()?;
        let ca = read(&self.ca, "CA certificate")?;
        let n = CertificateDer::pem_slice_iter(&ca)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("`{}` is not a PEM certificate: {e}", self.ca.display()))?
            .len();
        if n == 0 {
            return Err(format!("`{}` holds no certificate", self.ca.display()));
        }
        Ok(())
    }
}

/// The one choice every binary makes at start: a TLS identity, or
/// `--insecure-dev`, never both, never neither. Checks the files; returns
/// the warning to log loudly when the choice is plaintext.
pub fn require(tls: Option<&TlsFiles>, insecure_dev: bool) -> Result<Option<&'static str>, String> {
    match (tls, insecure_dev) {
        (Some(_), true) => Err("--insecure-dev and --tls-* exclude each other: pick one".into()),
        (None, false) => Err(
            "no TLS identity: pass --tls-ca, --tls-cert and --tls-key (cargo xtask certs writes development ones), or --insecure-dev to talk plaintext for development"
                .into(),
        ),
        (Some(files), false) => files.check().map(|()| None),
        (None, true) => Ok(Some(
            "--insecure-dev: PLAINTEXT gRPC and HTTP with NO certificate checks: anyone who can connect is trusted; never do this outside development",
        )),
    }
}

/// Who a certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Agent { region: String, agent_id: String },
    ControlPlane { id: String },
    Admin { name: String },
}

pub const SPIFFE_PREFIX: &str = "spiffe://spillway/";

pub fn agent_uri(region: &str, agent_id: &str) -> String {
    format!("{SPIFFE_PREFIX}region/{region}/agent/{agent_id}")
}

pub fn control_plane_uri(id: &str) -> String {
    format!("{SPIFFE_PREFIX}control-plane/{id}")
}

pub fn admin_uri(name: &str) -> String {
    format!("{SPIFFE_PREFIX}admin/{name}")
}

impl Peer {
    pub fn from_uri(uri: &str) -> Option<Peer> {
        let rest = uri.strip_prefix(SPIFFE_PREFIX)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["region", region, "agent", id] if !region.is_empty() && !id.is_empty() => {
                Some(Peer::Agent {
                    region: region.to_string(),
                    agent_id: id.to_string(),
                })
            }
            ["control-plane", id] if !id.is_empty() => {
                Some(Peer::ControlPlane { id: id.to_string() })
            }
            ["admin", name] if !name.is_empty() => Some(Peer::Admin {
                name: name.to_string(),
            }),
            _ => None,
        }
    }

    /// The Spillway identity of a (verified) certificate.
    pub fn of_cert(der: &[u8]) -> Option<Peer> {
        uris(der).iter().find_map(|u| Peer::from_uri(u))
    }
}

/// One DER element at `at`: (tag, content start, content end).
fn element(der: &[u8], at: usize) -> Option<(u8, usize, usize)> {
    let tag = *der.get(at)?;
    let first = *der.get(at + 1)?;
    let (len, start) = if first < 0x80 {
        (usize::from(first), at + 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*der.get(at + 2 + i)?);
        }
        (len, at + 2 + n)
    };
    let end = start.checked_add(len)?;
    (end <= der.len()).then_some((tag, start, end))
}

/// The URIs among a certificate's subject alternative names.
pub fn uris(der: &[u8]) -> Vec<String> {
    // The subjectAltName extension: OID 2.5.29.17, an optional critical
    // flag, then an OCTET STRING holding a SEQUENCE of GeneralNames, where
    // a URI is [6] IA5String.
    const SAN_OID: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x11];
    let mut out = Vec::new();
    let Some(pos) = der.windows(SAN_OID.len()).position(|w| w == SAN_OID) else {
        return out;
    };
    let mut at = pos + SAN_OID.len();
    if der.get(at) == Some(&0x01) {
        match element(der, at) {
            Some((_, _, end)) => at = end,
            None => return out,
        }
    }
    let Some((0x04, octets, _)) = element(der, at) else {
        return out;
    };
    let Some((0x30, mut name, names_end)) = element(der, octets) else {
        return out;
    };
    while name < names_end {
        let Some((tag, start, end)) = element(der, name) else {
            break;
        };
        if tag == 0x86
            && let Ok(uri) = std::str::from_utf8(&der[start..end])
        {
            out.push(uri.to_string());
        }
        name = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_from_uris() {
        assert_eq!(
            Peer::from_uri(&agent_uri("us-east", "a-1")),
            Some(Peer::Agent {
                region: "us-east".into(),
                agent_id: "a-1".into()
            })
        );
        assert_eq!(
            Peer::from_uri(&admin_uri("ops")),
            Some(Peer::Admin { name: "ops".into() })
        );
        assert_eq!(Peer::from_uri("spiffe://other/region/x/agent/y"), None);
        assert_eq!(Peer::from_uri("spiffe://spillway/region//agent/y"), None);
        assert_eq!(
            Peer::from_uri("spiffe://spillway/region/x/agent/y/extra"),
            None
        );
    }

    #[test]
    fn der_lengths_are_read_in_both_forms() {
        assert_eq!(element(&[0x04, 0x02, 1, 2], 0), Some((0x04, 2, 4)));
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend(std::iter::repeat_n(0, 0x80));
        assert_eq!(element(&long, 0), Some((0x04, 3, 0x83)));
        assert_eq!(element(&[0x04, 0x05, 1], 0), None, "runs past the end");
    }
}
