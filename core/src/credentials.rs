//! A party's TLS identity and trust, re-read while it runs: certificates
//! issued for days (cert-manager's) are renewed under a running process,
//! which must present the new one without a restart.
//!
//! [`Credentials`] holds the files' current contents, parsed. The rustls
//! configurations made from it ([`Credentials::rustls_server`],
//! [`Credentials::rustls_client`]) ask it for the certificate and the trust
//! roots at every handshake, so a reload takes effect on the next
//! connection; connections already open keep what they were made with.
//! [`Credentials::watch`] polls the three files and reloads when their
//! bytes change. Files that cannot be used (a certificate not yet matched
//! by its new key, a half-written file) leave the last good identity in
//! place: the change is retried on every poll, and logged once.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::tls::{Expect, TlsFiles};

/// Whether a server asks clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Never (the HTTP door: clients authenticate with API keys).
    None,
    /// Asked for and checked when given; clients without one are let in
    /// (their calls must then authenticate otherwise).
    Optional,
    /// Required.
    Required,
}

/// What the files held when they were last loaded.
struct Loaded {
    key: Arc<CertifiedKey>,
    clients_optional: Arc<dyn ClientCertVerifier>,
    clients_required: Arc<dyn ClientCertVerifier>,
    servers: Arc<rustls::client::WebPkiServerVerifier>,
    /// The certificate's notAfter, in Unix seconds.
    not_after: Option<i64>,
}

/// A party's identity and trust roots, from its files, reloadable.
pub struct Credentials {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Loaded>>,
    /// A digest of the bytes last loaded, and of the bytes last refused
    /// (logged once, until they change again).
    loaded: Mutex<(u64, Option<u64>)>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("files", &self.files)
            .field("not_after", &self.not_after())
            .finish()
    }
}

/// What [`Credentials::watch`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// At start: the files loaded first.
    Loaded,
    /// Changed files are in use.
    Reloaded,
    /// Changed files cannot be used (reported once per content); the
    /// previous certificate stays.
    Refused,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Loaded => "loaded",
            Event::Reloaded => "reloaded",
            Event::Refused => "refused",
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The files did not change.
    Same,
    /// New files are in use.
    Changed,
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} `{}`: {e}", path.display()))
}

fn digest(parts: &[&[u8]]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

impl Credentials {
    /// Reads and checks the files: an error names the file and what is
    /// wrong with it.
    pub fn load(files: TlsFiles) -> Result<Arc<Credentials>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (bytes, loaded) = Self::read_and_parse(&files, &provider)?;
        Ok(Arc::new(Credentials {
            files,
            provider,
            current: RwLock::new(Arc::new(loaded)),
            loaded: Mutex::new((bytes, None)),
        }))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn read_and_parse(
        files: &TlsFiles,
        provider: &Arc<CryptoProvider>,
    ) -> Result<(u64, Loaded), String> {
        let cert = read(&files.cert, "certificate")?;
        let key = read(&files.key, "private key")?;
        let ca = read(&files.ca, "CA certificate")?;
        let d = digest(&[&cert, &key, &ca]);
        Ok((d, Self::parse(files, provider, &cert, &key, &ca)?))
    }

    fn parse(
        files: &TlsFiles,
        provider: &Arc<CryptoProvider>,
        cert: &[u8],
        key: &[u8],
        ca: &[u8],
    ) -> Result<Loaded, String> {
        let certs = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("`{}` is not a PEM certificate: {e}", files.cert.display()))?;
        if certs.is_empty() {
            return Err(format!("`{}` holds no certificate", files.cert.display()));
        }
        let not_after = not_after(&certs[0]);
        let private = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| format!("`{}` is not a PEM private key: {e}", files.key.display()))?;
        let key = CertifiedKey::from_der(certs, private, provider).map_err(|e| {
            format!(
                "the certificate `{}` does not fit the key `{}`: {e}",
                files.cert.display(),
                files.key.display()
            )
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca) {
            roots
                .add(c.map_err(|e| format!("`{}`: {e}", files.ca.display()))?)
                .map_err(|e| format!("`{}`: {e}", files.ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("`{}` holds no certificate", files.ca.display()));
        }
        let roots = Arc::new(roots);
        let clients = |optional: bool| {
            let b = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                provider.clone(),
            );
            let b = if optional {
                b.allow_unauthenticated()
            } else {
                b
            };
            b.build()
                .map_err(|e| format!("`{}`: {e}", files.ca.display()))
        };
        Ok(Loaded {
            key: Arc::new(key),
            clients_optional: clients(true)?,
            clients_required: clients(false)?,
            servers: rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots.clone(),
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("`{}`: {e}", files.ca.display()))?,
            not_after,
        })
    }

    fn now(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The notAfter of the certificate presented now, in Unix seconds.
    pub fn not_after(&self) -> Option<i64> {
        self.now().not_after
    }

    /// Reads the files again and, when they changed and can be used,
    /// presents and trusts what they hold from the next handshake on.
    /// Files that changed but cannot be used are an error, and the
    /// identity in use stays.
    pub fn reload(&self) -> Result<Reload, String> {
        self.try_reload().map_err(|(_, e)| e)
    }

    /// As [`Credentials::reload`]; a failure comes with the digest of the
    /// files that failed (none when they could not be read).
    fn try_reload(&self) -> Result<Reload, (Option<u64>, String)> {
        let cert = read(&self.files.cert, "certificate").map_err(|e| (None, e))?;
        let key = read(&self.files.key, "private key").map_err(|e| (None, e))?;
        let ca = read(&self.files.ca, "CA certificate").map_err(|e| (None, e))?;
        let d = digest(&[&cert, &key, &ca]);
        if self.loaded.lock().unwrap_or_else(|e| e.into_inner()).0 == d {
            return Ok(Reload::Same);
        }
        let loaded =
            Self::parse(&self.files, &self.provider, &cert, &key, &ca).map_err(|e| (Some(d), e))?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = (d, None);
        Ok(Reload::Changed)
    }

    /// Polls the files every `every` until `shutdown`, reloading when they
    /// change; `event` is told of the first load, of each reload and of
    /// each refused content (to publish the certificate's expiry and count
    /// reloads).
    pub fn watch(
        self: &Arc<Self>,
        every: Duration,
        mut shutdown: crate::shutdown::Shutdown,
        event: impl Fn(&Credentials, Event) + Send + 'static,
    ) {
        let me = self.clone();
        event(&me, Event::Loaded);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tick.tick() => {}
                }
                // Reading files may block: off the runtime's threads.
                let it = me.clone();
                let outcome = match tokio::task::spawn_blocking(move || {
                    let r = it.try_reload();
                    (r, it)
                })
                .await
                {
                    Ok((outcome, _)) => outcome,
                    Err(_) => continue,
                };
                match outcome {
                    Ok(Reload::Same) => {}
                    Ok(Reload::Changed) => {
                        tracing::info!(
                            cert = %me.files.cert.display(),
                            not_after = me.not_after().map(unix_to_rfc3339).unwrap_or_default(),
                            "TLS certificate and trust roots reloaded: new connections use them"
                        );
                        event(&me, Event::Reloaded);
                    }
                    Err((d, error)) => {
                        if me.refused(d, &error) {
                            event(&me, Event::Refused);
                        }
                    }
                }
            }
        });
    }

    /// Logs files that cannot be used, once per content (`d`, when they
    /// could be read): whether it did.
    fn refused(&self, d: Option<u64>, error: &str) -> bool {
        let d = d.unwrap_or_else(|| digest(&[error.as_bytes()]));
        let mut seen = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if seen.1 != Some(d) {
            seen.1 = Some(d);
            tracing::warn!(
                error,
                still_presenting_until = self.not_after().map(unix_to_rfc3339).unwrap_or_default(),
                "TLS files changed but cannot be used: the previous certificate stays in use"
            );
            return true;
        }
        false
    }

    /// A rustls server presenting the current certificate, checking
    /// client certificates (when asked for) against the current roots;
    /// HTTP/2 and HTTP/1.1 offered by ALPN as `alpn` says.
    pub fn rustls_server(
        self: &Arc<Self>,
        clients: ClientAuth,
        alpn: &[&[u8]],
    ) -> rustls::ServerConfig {
        let builder = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let builder = match clients {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Optional | ClientAuth::Required => {
                builder.with_client_cert_verifier(Arc::new(Clients {
                    creds: self.clone(),
                    required: clients == ClientAuth::Required,
                }))
            }
        };
        let mut config = builder.with_cert_resolver(Arc::new(Presents(self.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        if clients != ClientAuth::None {
            // A resumed session skips the client's certificate check: after
            // a CA rotation, a peer of the CA no longer trusted could go on
            // resuming. Every handshake is a full one.
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        config
    }

    /// A rustls client presenting the current certificate and accepting
    /// only a server whose certificate, besides being valid for the host
    /// and signed by a current root, names the party `expect` says.
    pub fn rustls_client(self: &Arc<Self>, expect: Expect) -> rustls::ClientConfig {
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Servers {
                creds: self.clone(),
                expect,
            }))
            .with_client_cert_resolver(Arc::new(Presents(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        // Nor does a client resume: the server's certificate is checked
        // against the roots of now at every handshake.
        config.resumption = rustls::client::Resumption::disabled();
        config
    }
}

/// The current certificate, as server and as client.
struct Presents(Arc<Credentials>);

impl std::fmt::Debug for Presents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Presents")
    }
}

impl rustls::server::ResolvesServerCert for Presents {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.now().key.clone())
    }
}

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.now().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Client certificates, checked against the current roots.
struct Clients {
    creds: Arc<Credentials>,
    required: bool,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients")
            .field("required", &self.required)
            .finish()
    }
}

impl Clients {
    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        let now = self.creds.now();
        if self.required {
            now.clients_required.clone()
        } else {
            now.clients_optional.clone()
        }
    }
}

impl ClientCertVerifier for Clients {
    fn client_auth_mandatory(&self) -> bool {
        self.required
    }

    /// No hints: the roots change with a reload, and clients present the
    /// one certificate they have anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner().supported_verify_schemes()
    }
}

/// Server certificates, checked against the current roots, then for the
/// Spillway name expected.
struct Servers {
    creds: Arc<Credentials>,
    expect: Expect,
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Servers")
            .field("expect", &self.expect)
            .finish()
    }
}

impl ServerCertVerifier for Servers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.creds.now().servers.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        crate::tls::check_names(end_entity, &self.expect)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.creds
            .now()
            .servers
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.creds
            .now()
            .servers
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.creds.now().servers.supported_verify_schemes()
    }
}

/// A certificate's notAfter, in Unix seconds: Certificate ->
/// tbsCertificate -> validity (the element after issuer) -> its second
/// time, a UTCTime (YYMMDDHHMMSSZ) or a GeneralizedTime (YYYYMMDDHHMMSSZ).
pub fn not_after(der: &[u8]) -> Option<i64> {
    use crate::tls::{children, element};
    let (tag, start, end) = element(der, 0)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs_start, tbs_end) = *children(der, start, end).first()?;
    if tag != 0x30 {
        return None;
    }
    let mut fields = children(der, tbs_start, tbs_end);
    // version is the optional [0] element before serialNumber.
    if fields.first().is_some_and(|f| f.0 == 0xa0) {
        fields.remove(0);
    }
    // serialNumber, signature, issuer, validity.
    let (tag, v_start, v_end) = *fields.get(3)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, s, e) = *children(der, v_start, v_end).get(1)?;
    let text = std::str::from_utf8(&der[s..e]).ok()?;
    let text = text.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if text.len() == 12 => {
            let yy: i64 = text[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        0x18 if text.len() == 14 => (text[..4].parse().ok()?, &text[4..]),
        _ => return None,
    };
    let n = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
    let (month, day, hour, min, sec) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`, for logs.
pub fn unix_to_rfc3339(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    // The inverse of days_from_civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(unix_to_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(unix_to_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(unix_to_rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

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

    fn cert_valid(not_before: (u8, &str), not_after: (u8, &str), versioned: bool) -> Vec<u8> {
        let validity = [
            tlv(not_before.0, not_before.1.as_bytes()),
            tlv(not_after.0, not_after.1.as_bytes()),
        ]
        .concat();
        let mut tbs = Vec::new();
        if versioned {
            tbs.extend(tlv(0xa0, &tlv(0x02, &[2])));
        }
        tbs.extend(tlv(0x02, &[1, 2, 3]));
        tbs.extend(tlv(0x30, &tlv(0x06, &[0x2a, 0x86])));
        tbs.extend(tlv(0x30, &[]));
        tbs.extend(tlv(0x30, &validity));
        tbs.extend(tlv(0x30, &[]));
        tlv(
            0x30,
            &[tlv(0x30, &tbs), tlv(0x30, &[]), tlv(0x03, &[0])].concat(),
        )
    }

    #[test]
    fn not_after_reads_both_time_forms() {
        let utc = cert_valid((0x17, "250101000000Z"), (0x17, "261231235959Z"), true);
        assert_eq!(
            not_after(&utc).map(unix_to_rfc3339).as_deref(),
            Some("2026-12-31T23:59:59Z")
        );
        let general = cert_valid((0x17, "250101000000Z"), (0x18, "20610102030405Z"), false);
        assert_eq!(
            not_after(&general).map(unix_to_rfc3339).as_deref(),
            Some("2061-01-02T03:04:05Z")
        );
        let broken = cert_valid((0x17, "250101000000Z"), (0x17, "2612"), true);
        assert_eq!(not_after(&broken), None);
        assert_eq!(not_after(b"\x30\x00"), None);
    }
}
