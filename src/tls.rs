//! TLS and mTLS (docs/API.md, Authentication): the server's rustls configuration, the development
//! CA that `--tls auto` keeps in the data directory, client certificates that name a principal, and
//! reading that principal back out of a verified peer certificate.
//!
//! A client certificate authenticates as the principal whose object id follows
//! [`PRINCIPAL_URI_PREFIX`] in a SAN URI. The TLS layer only verifies the chain (client
//! certificates are optional there, so bearer tokens keep working); `auth` decides who the
//! caller is.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use x509_cert::der::{Decode as _, Encode as _};
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use crate::config::{Config, TlsMode};

/// A client certificate authenticates as the principal whose object id follows this prefix in a
/// SAN URI.
pub const PRINCIPAL_URI_PREFIX: &str = "spiffe://tdebroker/principal/";
/// Folder of the development PKI inside the data directory.
pub const TLS_DIR: &str = "tls";
/// The development CA's certificate (PEM), what clients trust.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The development CA's private key (PEM, 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// The server certificate of `--tls auto` (PEM).
pub const SERVER_CERT_FILE: &str = "server.pem";
/// The server certificate's private key (PEM, 0600).
pub const SERVER_KEY_FILE: &str = "server.key";
/// Names every dev server certificate carries, besides the configured ones.
pub const DEFAULT_SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

const DAY: Duration = Duration::from_secs(86_400);
/// The dev CA lives ten years; server and client certificates one.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// A server certificate closer than this to its end is replaced at start.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);
/// A TLS handshake that takes longer is dropped (slow or stuck clients).
const CA_COMMON_NAME: &str = "tde-broker dev CA";

/// TLS set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file does not hold what it should (no PEM certificate, no private key, …).
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the parser's error as the cause where there is one.
        #[source]
        problem: FileProblem,
    },
    /// There is no development CA to sign with.
    #[error("no development CA at {0}: start the broker once with `--tls auto` and this data directory")]
    NoDevCa(PathBuf),
    /// A name or principal id cannot go into a certificate.
    #[error(transparent)]
    BadName(#[from] NameError),
    /// Generating or signing a certificate failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the protocol versions (a provider without TLS 1.2/1.3 suites).
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// The client CA cannot verify client certificates.
    #[error("client certificate verification: {0}")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
}

/// Why a name or principal id cannot go into a certificate; the library's refusal is the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// A principal given for a client certificate that is not a GUID.
    #[error("principal '{object_id}' is not an object id (GUID)")]
    NotAnObjectId {
        /// The principal as given.
        object_id: String,
        /// The GUID parser's refusal.
        source: uuid::Error,
    },
    /// A principal URI that cannot be a SAN URI (IA5 text).
    #[error("'{uri}' is not ASCII")]
    UriNotAscii {
        /// The URI.
        uri: String,
        /// rcgen's refusal.
        source: rcgen::Error,
    },
    /// A `--tls-name` that is neither an IP address nor a DNS name.
    #[error("TLS name '{name}' is not a DNS name or IP address")]
    NotDnsNameOrIp {
        /// The name as given.
        name: String,
        /// The DNS-name parser's refusal.
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// A DNS name that cannot be a SAN DNS name (IA5 text).
    #[error("TLS name '{name}' is not ASCII")]
    NameNotAscii {
        /// The name as given.
        name: String,
        /// rcgen's refusal.
        source: rcgen::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_path_buf(), source }
}

/// What is wrong with a certificate or key file ([`TlsError::Invalid`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileProblem {
    /// The key file holds no PEM private key the TLS stack reads.
    #[error("no private key: {0}")]
    NoPrivateKey(#[source] rustls::pki_types::pem::Error),
    /// A PEM block could not be read.
    #[error("unreadable PEM: {0}")]
    UnreadablePem(#[source] rustls::pki_types::pem::Error),
    /// No `CERTIFICATE` block at all.
    #[error("no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate,
    /// The dev CA's key is there without its certificate.
    #[error("missing beside ca.pem; remove both to make a new dev CA")]
    CaKeyMissing,
    /// The dev CA's certificate is there without its key.
    #[error("missing beside ca.key; remove both to make a new dev CA")]
    CaCertMissing,
    /// The certificate does not decode as X.509.
    #[error("not an X.509 certificate: {0}")]
    NotX509(#[source] x509_cert::der::Error),
    /// The CA's subject name does not encode again.
    #[error("{0}")]
    SubjectName(#[source] x509_cert::der::Error),
    /// The certificate is not one the broker made (its common name is not UTF-8 text).
    #[error("not a tde-broker dev CA (no UTF-8 common name)")]
    NotDevCa,
    /// The key file is not UTF-8 text, so not PEM.
    #[error("not a PEM private key")]
    NotPemText(#[source] std::string::FromUtf8Error),
    /// The key does not parse (rcgen's message names the reason).
    #[error("{0}")]
    BadKey(#[source] rcgen::Error),
    /// The CA key does not match the CA certificate's public key.
    #[error("does not belong to {}", .0.display())]
    KeyMismatch(PathBuf),
    /// What the CA just signed does not decode.
    #[error("a certificate it signed does not parse: {0}")]
    SignedUnparsable(#[source] x509_cert::der::Error),
    /// What the CA signed does not name the CA's subject as its issuer.
    #[error("its subject name could not be reproduced to sign with")]
    IssuerMismatch,
    /// A client CA certificate that cannot be a trust anchor.
    #[error("not usable as a CA certificate: {0}")]
    NotACa(#[source] rustls::Error),
    /// The private key does not fit the certificate (or the TLS stack cannot use it).
    #[error("does not fit the certificate: {0}")]
    KeyDoesNotFit(#[source] rustls::Error),
}

fn invalid(path: &Path, problem: FileProblem) -> TlsError {
    TlsError::Invalid { path: path.to_path_buf(), problem }
}

/// Installs aws-lc-rs as the process's rustls provider. Idempotent: a provider already
/// installed (by an earlier call, or by the embedding program) stays.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Paths of the development PKI of `data_dir`.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// The CA certificate clients trust.
    pub ca_cert: PathBuf,
    /// The CA key (0600).
    pub ca_key: PathBuf,
    /// The server certificate.
    pub server_cert: PathBuf,
    /// The server key (0600).
    pub server_key: PathBuf,
}

impl DevPki {
    /// Where the development PKI of `data_dir` lives (whether or not it exists yet).
    pub fn in_data_dir(data_dir: &Path) -> Self {
        let dir = data_dir.join(TLS_DIR);
        DevPki {
            ca_cert: dir.join(CA_CERT_FILE),
            ca_key: dir.join(CA_KEY_FILE),
            server_cert: dir.join(SERVER_CERT_FILE),
            server_key: dir.join(SERVER_KEY_FILE),
        }
    }
}

/// The server's TLS configuration (rustls, aws-lc-rs, ALPN `h2`), or `None` when TLS is off.
/// Under `--tls auto` this creates (or reuses) the development CA and server certificate. With
/// `--client-ca` — or the dev CA under `--tls auto` — client certificates are verified against it
/// but stay optional. The listener runs the handshakes (`listener::with_tls`).
pub fn server_tls(config: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
    let (cert_path, key_path, dev_ca) = match &config.tls {
        TlsMode::Off => return Ok(None),
        TlsMode::Auto => {
            let pki = ensure_dev_pki(&config.data_dir, &dev_server_names(config))?;
            (pki.server_cert, pki.server_key, Some(pki.ca_cert))
        }
        TlsMode::Files { cert, key } => (cert.clone(), key.clone(), None),
    };
    let (chain, key) = read_cert_and_key(&cert_path, &key_path)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let builder = match config.client_ca.clone().or(dev_ca) {
        Some(ca_path) => {
            let ca_pem = read(&ca_path)?;
            let mut roots = rustls::RootCertStore::empty();
            for ca in certs_from_pem(&ca_path, &ca_pem)? {
                roots.add(ca).map_err(|e| invalid(&ca_path, FileProblem::NotACa(e)))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(TlsError::ClientVerifier)?;
            tracing::debug!(client_ca = %ca_path.display(), "client certificates accepted (optional)");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder
        .with_single_cert(chain, key)
        .map_err(|e| invalid(&key_path, FileProblem::KeyDoesNotFit(e)))?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(Arc::new(tls)))
}

/// A server's certificate chain and private key, read from their PEM files.
fn read_cert_and_key(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let cert_pem = read(cert_path)?;
    let chain = certs_from_pem(cert_path, &cert_pem)?;
    let key_pem = zeroize::Zeroizing::new(read(key_path)?);
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| invalid(key_path, FileProblem::NoPrivateKey(e)))?;
    Ok((chain, key))
}

/// The wildcard name of the REST listener's vault hosts: `https://<vault>.vault.localhost:<port>/`.
pub const REST_VAULT_DOMAIN: &str = "vault.localhost";

/// The names the dev server certificate carries besides [`DEFAULT_SERVER_NAMES`]: the configured
/// `--tls-name`s, and the REST listener's vault hosts, `*.vault.localhost` and
/// `*.<vault-dns-suffix>`. gRPC (`--tls auto`) and the REST listener ask for the same names, so
/// they share one certificate and neither replaces the other's.
pub fn dev_server_names(config: &Config) -> Vec<String> {
    let mut names = config.tls_names.clone();
    names.push(format!("*.{REST_VAULT_DOMAIN}"));
    let suffix = config.vault_dns_suffix.trim_matches('.');
    if !suffix.is_empty() && !suffix.eq_ignore_ascii_case(REST_VAULT_DOMAIN) {
        names.push(format!("*.{suffix}"));
    }
    names
}

/// The REST listener's TLS configuration: always the dev CA's server certificate (created at
/// first start in `<data-dir>/tls`, even when gRPC runs plaintext or with certificate files),
/// ALPN `h2` and `http/1.1`, no client certificates.
pub fn rest_server_tls(config: &Config) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pki = ensure_dev_pki(&config.data_dir, &dev_server_names(config))?;
    let (chain, key) = read_cert_and_key(&pki.server_cert, &pki.server_key)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| invalid(&pki.server_key, FileProblem::KeyDoesNotFit(e)))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// Creates the development CA and server certificate of `data_dir` on first use and reuses
/// them afterwards. The server certificate is replaced when its SANs miss one of `localhost`,
/// `127.0.0.1`, `::1` and `names`, when it nears its end, or when the CA no longer signs it.
pub fn ensure_dev_pki(data_dir: &Path, names: &[String]) -> Result<DevPki, TlsError> {
    let pki = DevPki::in_data_dir(data_dir);
    let dir = data_dir.join(TLS_DIR);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;

    match (pki.ca_cert.exists(), pki.ca_key.exists()) {
        (false, false) => create_dev_ca(&pki)?,
        (true, true) => {}
        // Never replace half a CA silently: certificates it issued would stop working.
        (true, false) => {
            return Err(invalid(&pki.ca_key, FileProblem::CaKeyMissing));
        }
        (false, true) => {
            return Err(invalid(&pki.ca_cert, FileProblem::CaCertMissing));
        }
    }
    let ca = DevCa::load(&pki)?;

    let mut wanted: Vec<String> = DEFAULT_SERVER_NAMES.iter().map(|s| s.to_string()).collect();
    for name in names {
        if !wanted.iter().any(|w| w.eq_ignore_ascii_case(name)) {
            wanted.push(name.clone());
        }
    }
    if server_cert_is_current(&pki, &ca, &wanted) {
        return Ok(pki);
    }
    let mut params = leaf_params();
    for name in &wanted {
        params.subject_alt_names.push(san_for_name(name)?);
    }
    params.distinguished_name.push(DnType::CommonName, "tde-broker");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = ca.sign(&params, &key)?;
    write_file(&pki.server_key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&pki.server_cert, cert.as_bytes(), 0o644)?;
    tracing::info!(path = %pki.server_cert.display(), names = %wanted.join(", "), "wrote the dev TLS server certificate");
    Ok(pki)
}

/// Issues a client certificate for the principal `object_id`, signed by the development CA of
/// `data_dir`: valid one year, EKU clientAuth, SAN URI [`PRINCIPAL_URI_PREFIX`]`object_id`.
/// Returns the certificate and its private key, both PEM.
pub fn issue_client_cert(data_dir: &Path, object_id: &str) -> Result<(String, String), TlsError> {
    let oid = uuid::Uuid::parse_str(object_id.trim())
        .map_err(|source| NameError::NotAnObjectId { object_id: object_id.to_string(), source })?
        .to_string();
    let pki = DevPki::in_data_dir(data_dir);
    if !pki.ca_cert.exists() || !pki.ca_key.exists() {
        return Err(TlsError::NoDevCa(pki.ca_cert));
    }
    let ca = DevCa::load(&pki)?;
    let uri = format!("{PRINCIPAL_URI_PREFIX}{oid}");
    let mut params = leaf_params();
    params.subject_alt_names.push(SanType::URI(
        uri.clone().try_into().map_err(|source| NameError::UriNotAscii { uri: uri.clone(), source })?,
    ));
    params.distinguished_name.push(DnType::CommonName, oid.as_str());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = ca.sign(&params, &key)?;
    Ok((cert, key.serialize_pem()))
}

/// The principal a client certificate (DER) names: the object id after
/// [`PRINCIPAL_URI_PREFIX`] in its first SAN URI that carries the prefix. `None` for anything
/// else, including DER that does not parse.
pub fn principal_from_cert(der: &[u8]) -> Option<String> {
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let (_, san) = cert.tbs_certificate().get_extension::<SubjectAltName>().ok()??;
    san.0.iter().find_map(|name| match name {
        GeneralName::UniformResourceIdentifier(uri) => uri
            .as_str()
            .strip_prefix(PRINCIPAL_URI_PREFIX)
            .filter(|oid| !oid.is_empty() && !oid.contains('/'))
            .map(str::to_string),
        _ => None,
    })
}

/// Every certificate in a PEM text; an error when there is none.
pub fn certs_from_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, FileProblem::UnreadablePem(e)))?;
    if certs.is_empty() {
        return Err(invalid(path, FileProblem::NoCertificate));
    }
    Ok(certs)
}

// ---------------------------------------------------------------------------------------------
// The development CA
// ---------------------------------------------------------------------------------------------

/// The loaded development CA: an rcgen issuer and the DER of its subject name (to check that
/// what it signs names it as issuer).
struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    subject_der: Vec<u8>,
    /// The CA certificate file, for errors.
    path: PathBuf,
}

impl DevCa {
    fn load(pki: &DevPki) -> Result<Self, TlsError> {
        let cert_pem = read(&pki.ca_cert)?;
        let der = certs_from_pem(&pki.ca_cert, &cert_pem)?.swap_remove(0);
        let cert = x509_cert::Certificate::from_der(&der)
            .map_err(|e| invalid(&pki.ca_cert, FileProblem::NotX509(e)))?;
        let subject = cert.tbs_certificate().subject();
        let subject_der = subject.to_der().map_err(|e| invalid(&pki.ca_cert, FileProblem::SubjectName(e)))?;
        let common_name = match subject.common_name() {
            Ok(Some(x509_cert::ext::pkix::name::DirectoryString::Utf8String(cn))) => cn,
            _ => return Err(invalid(&pki.ca_cert, FileProblem::NotDevCa)),
        };
        let key_text = String::from_utf8(read(&pki.ca_key)?)
            .map_err(|e| invalid(&pki.ca_key, FileProblem::NotPemText(e)))?;
        let key = KeyPair::from_pem(&key_text).map_err(|e| invalid(&pki.ca_key, FileProblem::BadKey(e)))?;
        let spki = cert.tbs_certificate().subject_public_key_info();
        if rcgen::PublicKeyData::der_bytes(&key) != spki.subject_public_key.raw_bytes() {
            return Err(invalid(&pki.ca_key, FileProblem::KeyMismatch(pki.ca_cert.clone())));
        }
        let issuer = Issuer::new(ca_params(&common_name), key);
        Ok(DevCa { issuer, subject_der, path: pki.ca_cert.clone() })
    }

    /// Signs `params` for `key`; returns the certificate PEM.
    fn sign(&self, params: &CertificateParams, key: &KeyPair) -> Result<String, TlsError> {
        let cert = params.signed_by(key, &self.issuer)?;
        let issued = x509_cert::Certificate::from_der(cert.der())
            .map_err(|e| invalid(&self.path, FileProblem::SignedUnparsable(e)))?;
        if issued.tbs_certificate().issuer().to_der().ok().as_deref() != Some(self.subject_der.as_slice()) {
            return Err(invalid(&self.path, FileProblem::IssuerMismatch));
        }
        Ok(cert.pem())
    }
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, DnValue::Utf8String(common_name.to_string()));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

fn create_dev_ca(pki: &DevPki) -> Result<(), TlsError> {
    // A name of its own per data directory: two brokers' CAs are told apart in chains and logs.
    let common_name = format!("{CA_COMMON_NAME} {}", hex::encode(crate::crypto::random_bytes(6)));
    let mut params = ca_params(&common_name);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - DAY;
    params.not_after = now + CA_VALIDITY;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_file(&pki.ca_key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&pki.ca_cert, cert.pem().as_bytes(), 0o644)?;
    // A new CA invalidates the old server certificate.
    let _ = std::fs::remove_file(&pki.server_cert);
    tracing::info!(path = %pki.ca_cert.display(), "created the development CA; clients trust this file");
    Ok(())
}

/// Parameters shared by server and client certificates: one year from an hour ago, digital
/// signature, an authority key identifier, no CA.
fn leaf_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3_600);
    params.not_after = now + LEAF_VALIDITY;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params
}

fn san_for_name(name: &str) -> Result<SanType, TlsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    // A wildcard covers one label on the left (`*.vault.localhost`): the rest must be a name.
    let checked = name.strip_prefix("*.").unwrap_or(name);
    if let Err(source) = ServerName::try_from(checked) {
        return Err(NameError::NotDnsNameOrIp { name: name.to_string(), source }.into());
    }
    Ok(SanType::DnsName(
        name.to_ascii_lowercase()
            .try_into()
            .map_err(|source| NameError::NameNotAscii { name: name.to_string(), source })?,
    ))
}

/// Whether the server certificate and key exist, are signed by `ca`, cover `names`, and are not
/// near their end. Anything unreadable counts as not current (it is regenerated).
fn server_cert_is_current(pki: &DevPki, ca: &DevCa, names: &[String]) -> bool {
    let Ok(key_pem) = std::fs::read(&pki.server_key) else { return false };
    if PrivateKeyDer::from_pem_slice(&key_pem).is_err() {
        return false;
    }
    let Ok(pem) = std::fs::read(&pki.server_cert) else { return false };
    let Some(der) = CertificateDer::pem_slice_iter(&pem).next().and_then(Result::ok) else { return false };
    let Ok(cert) = x509_cert::Certificate::from_der(&der) else { return false };
    let tbs = cert.tbs_certificate();
    if tbs.issuer().to_der().ok().as_deref() != Some(ca.subject_der.as_slice()) {
        return false;
    }
    if tbs.validity().not_after.to_system_time() < SystemTime::now() + RENEW_BEFORE {
        return false;
    }
    let Ok(Some((_, san))) = tbs.get_extension::<SubjectAltName>() else { return false };
    names.iter().all(|name| {
        let ip = name.parse::<IpAddr>().ok();
        san.0.iter().any(|general| match (general, ip) {
            (GeneralName::IpAddress(bytes), Some(ip)) => match ip {
                IpAddr::V4(v4) => bytes.as_bytes() == v4.octets().as_slice(),
                IpAddr::V6(v6) => bytes.as_bytes() == v6.octets().as_slice(),
            },
            (GeneralName::DnsName(dns), None) => dns.as_str().eq_ignore_ascii_case(name),
            _ => false,
        })
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(io_err(path))
}

/// Writes a file with `mode`, durably, replacing any previous one.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    crate::store::datadir::write_durably(path, contents, mode)
        .map_err(|(path, source)| TlsError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn a_principal_that_is_not_a_guid_is_refused_with_the_parser_error_as_cause() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let err = issue_client_cert(dir.path(), "admin/../x").expect_err("not a GUID");
        assert_eq!(err.to_string(), "principal 'admin/../x' is not an object id (GUID)");
        assert!(
            matches!(&err, TlsError::BadName(NameError::NotAnObjectId { object_id, .. }) if object_id == "admin/../x")
        );
        assert!(err.source().is_some(), "{err:?}");
    }

    #[test]
    fn a_tls_name_that_is_no_dns_name_or_ip_is_refused_with_the_parser_error_as_cause() {
        let err = san_for_name("not a name!").expect_err("not a name");
        assert_eq!(err.to_string(), "TLS name 'not a name!' is not a DNS name or IP address");
        assert!(
            matches!(&err, TlsError::BadName(NameError::NotDnsNameOrIp { name, .. }) if name == "not a name!")
        );
        let cause = rustls::pki_types::InvalidDnsNameError.to_string();
        assert_eq!(err.source().map(ToString::to_string), Some(cause));
    }

    #[test]
    fn ip_addresses_and_dns_names_become_their_kind_of_san() {
        assert!(
            matches!(san_for_name("::1"), Ok(SanType::IpAddress(ip)) if ip == IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]))
        );
        match san_for_name("Db.Example.internal") {
            Ok(SanType::DnsName(dns)) => assert_eq!(dns.as_str(), "db.example.internal"),
            other => panic!("expected a DNS name, got {other:?}"),
        }
    }
}
