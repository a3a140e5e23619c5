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
            .client_auth_optional(optional)
            // A client that never finishes its handshake lets go of its
            // place under the connection limit.
            .timeout(std::time::Duration::from_secs(10)))
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

    /// A rustls client that presents this identity and accepts only a
    /// server whose certificate, besides being valid for the host and
    /// signed by the CA, names the party `expect` says.
    pub fn rustls_client(&self, expect: Expect) -> Result<rustls::ClientConfig, String> {
        let (certs, key) = self.load()?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots(&self.ca)?),
            provider.clone(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(PeerVerifier { inner, expect }))
            .with_client_auth_cert(certs, key)
            .map_err(|e| {
                format!(
                    "the certificate `{}` does not fit its key: {e}",
                    self.cert.display()
                )
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
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

/// The certificates of the PEM bundle `ca`, as trust roots; an error
/// names the file when it cannot be read, is not PEM, holds something that
/// is not a certificate, or holds none.
pub fn roots(ca: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read(ca, "CA certificate")?) {
        roots
            .add(c.map_err(|e| format!("`{}`: {e}", ca.display()))?)
            .map_err(|e| format!("`{}`: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("`{}` holds no certificate", ca.display()));
    }
    Ok(roots)
}

/// A rustls client for servers outside Spillway (model servers): their
/// certificate must chain to `ca` and be valid for the host name; no client
/// certificate is presented.
pub fn rustls_client_trusting(ca: &Path) -> Result<rustls::ClientConfig, String> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth())
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

/// Whom a client expects at the other end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// An agent of this region (the relay).
    Agent { region: String },
    /// A control-plane replica.
    ControlPlane,
}

/// The CA's checks (chain, validity, host name), then the Spillway name.
#[derive(Debug)]
struct PeerVerifier {
    inner: std::sync::Arc<rustls::client::WebPkiServerVerifier>,
    expect: Expect,
}

impl rustls::client::danger::ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_names(end_entity, &self.expect)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether a server's certificate (already checked by the CA) names the
/// party expected.
pub(crate) fn check_names(
    end_entity: &CertificateDer<'_>,
    expect: &Expect,
) -> Result<(), rustls::Error> {
    match (Peer::of_cert(end_entity), expect) {
        (Some(Peer::Agent { region, .. }), Expect::Agent { region: want }) if region == *want => {
            Ok(())
        }
        (Some(Peer::ControlPlane { .. }), Expect::ControlPlane) => Ok(()),
        (found, want) => Err(rustls::Error::General(format!(
            "the server's certificate names {found:?}, not {want:?}"
        ))),
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

    /// The Spillway identity of a (verified) certificate: its one
    /// `spiffe://spillway/` URI; none when it has none or several.
    pub fn of_cert(der: &[u8]) -> Option<Peer> {
        let ours: Vec<String> = alt_names(der)
            .uris
            .into_iter()
            .filter(|u| u.starts_with(SPIFFE_PREFIX))
            .collect();
        match ours.as_slice() {
            [one] => Peer::from_uri(one),
            _ => None,
        }
    }
}

/// One DER element at `at`: (tag, content start, content end).
pub(crate) fn element(der: &[u8], at: usize) -> Option<(u8, usize, usize)> {
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

/// The names among a certificate's subject alternative names: URIs,
/// DNS names, and IP addresses (as text).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AltNames {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
}

/// The subjectAltName extension's names, read by walking the structure:
/// Certificate -> tbsCertificate -> [3] extensions -> the Extension whose
/// id is exactly 2.5.29.17 -> its GeneralNames. Nothing outside the
/// extensions (a subject's common name, say) is ever looked at.
pub fn alt_names(der: &[u8]) -> AltNames {
    alt_names_of(der).unwrap_or_default()
}

pub(crate) fn children(der: &[u8], start: usize, end: usize) -> Vec<(u8, usize, usize)> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        match element(&der[..end], at) {
            Some(e) => {
                at = e.2;
                out.push(e);
            }
            None => break,
        }
    }
    out
}

fn alt_names_of(der: &[u8]) -> Option<AltNames> {
    const SAN: [u8; 3] = [0x55, 0x1d, 0x11];
    let (tag, start, end) = element(der, 0)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs_start, tbs_end) = *children(der, start, end).first()?;
    if tag != 0x30 {
        return None;
    }
    // The extensions are the [3] element of tbsCertificate.
    let (_, ext_start, ext_end) = children(der, tbs_start, tbs_end)
        .into_iter()
        .find(|(t, _, _)| *t == 0xa3)?;
    let (tag, list_start, list_end) = element(&der[..ext_end], ext_start)?;
    if tag != 0x30 {
        return None;
    }
    let mut names = AltNames::default();
    for (tag, s, e) in children(der, list_start, list_end) {
        if tag != 0x30 {
            continue;
        }
        let parts = children(der, s, e);
        let Some((0x06, id_s, id_e)) = parts.first().copied() else {
            continue;
        };
        if der[id_s..id_e] != SAN {
            continue;
        }
        // extnValue: the last part, an OCTET STRING holding GeneralNames.
        let (tag, v_s, v_e) = *parts.last()?;
        if tag != 0x04 {
            return None;
        }
        let (tag, g_s, g_e) = element(&der[..v_e], v_s)?;
        if tag != 0x30 {
            return None;
        }
        for (tag, n_s, n_e) in children(der, g_s, g_e) {
            let bytes = &der[n_s..n_e];
            match tag {
                0x86 => names.uris.push(String::from_utf8_lossy(bytes).into_owned()),
                0x82 => names.dns.push(String::from_utf8_lossy(bytes).into_owned()),
                0x87 if bytes.len() == 4 => {
                    let b: [u8; 4] = bytes.try_into().ok()?;
                    names.ips.push(std::net::IpAddr::from(b));
                }
                0x87 if bytes.len() == 16 => {
                    let b: [u8; 16] = bytes.try_into().ok()?;
                    names.ips.push(std::net::IpAddr::from(b));
                }
                _ => {}
            }
        }
        return Some(names);
    }
    Some(names)
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

    /// DER of one element.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if content.len() < 0x80 {
            out.push(content.len() as u8);
        } else {
            out.push(0x82);
            out.extend_from_slice(&(content.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(content);
        out
    }

    /// A certificate-shaped structure: a subject holding `subject`, and a
    /// subjectAltName extension naming `uri`.
    fn cert(subject: &[u8], uri: &str) -> Vec<u8> {
        let san_oid = tlv(0x06, &[0x55, 0x1d, 0x11]);
        let names = tlv(0x30, &tlv(0x86, uri.as_bytes()));
        let ext = tlv(0x30, &[san_oid, tlv(0x04, &names)].concat());
        let extensions = tlv(0xa3, &tlv(0x30, &ext));
        let tbs = tlv(
            0x30,
            &[
                tlv(0xa0, &tlv(0x02, &[2])),
                tlv(0x02, &[1]),
                tlv(0x30, subject),
                extensions,
            ]
            .concat(),
        );
        tlv(0x30, &[tbs, tlv(0x30, &[]), tlv(0x03, &[0])].concat())
    }

    #[test]
    fn identities_come_from_the_extension_not_from_the_subject() {
        let real = agent_uri("us-west", "w1");
        assert_eq!(
            Peer::of_cert(&cert(b"plain", &real)),
            Some(Peer::Agent {
                region: "us-west".into(),
                agent_id: "w1".into()
            })
        );
        // A subject that holds a whole forged subjectAltName extension.
        let forged_ext = {
            let names = tlv(0x30, &tlv(0x86, admin_uri("root").as_bytes()));
            tlv(
                0x30,
                &[tlv(0x06, &[0x55, 0x1d, 0x11]), tlv(0x04, &names)].concat(),
            )
        };
        let c = cert(&forged_ext, &real);
        assert_eq!(alt_names(&c).uris, vec![real.clone()]);
        assert!(matches!(Peer::of_cert(&c), Some(Peer::Agent { .. })));
        // Two Spillway names: no identity at all.
        let names = tlv(
            0x30,
            &[
                tlv(0x86, real.as_bytes()),
                tlv(0x86, admin_uri("x").as_bytes()),
            ]
            .concat(),
        );
        let ext = tlv(
            0x30,
            &[tlv(0x06, &[0x55, 0x1d, 0x11]), tlv(0x04, &names)].concat(),
        );
        let tbs = tlv(
            0x30,
            &[tlv(0x02, &[1]), tlv(0xa3, &tlv(0x30, &ext))].concat(),
        );
        assert_eq!(Peer::of_cert(&tlv(0x30, &tbs)), None);
        assert_eq!(Peer::of_cert(b"not DER"), None);
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
