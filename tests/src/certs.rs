//! Development certificates: a CA, and certificates for agents, control
//! planes and operators that name them the way Spillway reads them
//! (SPIFFE-style URIs), each also valid for `localhost` and `127.0.0.1`.
//! `spillway-certs` (run by `cargo xtask certs`) and the TLS tests use it.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use spillway_core::tls::TlsFiles;

/// A CA whose files live in `dir` (`ca.pem`, `ca-key.pem`).
pub struct DevCa {
    dir: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

fn write(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)?;
    #[cfg(unix)]
    if path.to_string_lossy().ends_with("-key.pem") {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

impl DevCa {
    /// A new CA named `name`, written to `dir`.
    pub fn new(dir: &Path, name: &str) -> std::io::Result<DevCa> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(other)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(other)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(other)?;
        write(&dir.join("ca.pem"), &issuer.pem())?;
        write(&dir.join("ca-key.pem"), &issuer.key().serialize_pem())?;
        Ok(DevCa {
            dir: dir.to_path_buf(),
            issuer,
        })
    }

    /// Where its certificates are written.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `uri` (and localhost), as `<stem>.pem` and
    /// `<stem>-key.pem`, usable as a server and as a client.
    pub fn issue(&self, stem: &str, uri: &str) -> std::io::Result<TlsFiles> {
        self.issue_until(stem, uri, None)
    }

    /// As [`DevCa::issue`], valid until `not_after` (a date; rcgen's
    /// default when `None`). Writes over the files, the certificate first:
    /// as a renewal that is not atomic would.
    pub fn issue_until(
        &self,
        stem: &str,
        uri: &str,
        not_after: Option<(i32, u8, u8)>,
    ) -> std::io::Result<TlsFiles> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).map_err(other)?;
        params.distinguished_name.push(DnType::CommonName, stem);
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .subject_alt_names
            .push(SanType::URI(uri.try_into().map_err(other)?));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if let Some((y, m, d)) = not_after {
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        self.sign(stem, params)
    }

    /// A server certificate for the DNS `names` only (no address, no
    /// Spillway name), as `<stem>.pem` and `<stem>-key.pem`.
    pub fn issue_for_names(&self, stem: &str, names: &[&str]) -> std::io::Result<TlsFiles> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).map_err(other)?;
        params.distinguished_name.push(DnType::CommonName, stem);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(stem, params)
    }

    /// Signs `params` with a new key; writes `<stem>.pem` and
    /// `<stem>-key.pem`.
    fn sign(&self, stem: &str, mut params: CertificateParams) -> std::io::Result<TlsFiles> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(other)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(other)?;
        let files = TlsFiles {
            ca: self.ca_path(),
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}-key.pem")),
        };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}
