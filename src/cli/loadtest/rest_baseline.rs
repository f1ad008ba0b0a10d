//! The REST load test's baseline: a bare hyper server on tokio-rustls (aws-lc-rs, an ECDSA P-256
//! certificate from a CA of its own, ALPN `h2` and `http/1.1`, HTTP/1.1 and h2 on one port) that
//! answers Key Vault's JSON for unwrapkey, wrapkey and a key get with fixed values — no broker,
//! no auth, no logic beyond parsing the request's JSON as any handler must. It runs in a child
//! process of this executable (`loadtest --serve-rest-baseline`), as the gRPC baseline does, and
//! says on its first line where it listens and the CA to trust (base64 of the PEM).

use std::convert::Infallible;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use serde_json::json;

use super::baseline::{BaselineError, wait_for_stdin_end};
use super::{BASELINE_DEK, LoadtestError, WRAPPED_BYTES};
use crate::cli::error::CliError;

/// The largest request body read.
const MAX_BODY: usize = 1 << 20;

/// The TLS server configuration and the PEM of the CA that signed its certificate.
fn tls_config() -> Result<(Arc<rustls::ServerConfig>, String), BaselineError> {
    let ca_key = KeyPair::generate().map_err(BaselineError::Certificate)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "tde-broker loadtest baseline CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_pem = ca.self_signed(&ca_key).map_err(BaselineError::Certificate)?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().map_err(BaselineError::Certificate)?;
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name.push(DnType::CommonName, "tde-broker loadtest baseline");
    leaf.use_authority_key_identifier_extension = true;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    for name in ["localhost", "*.vault.localhost"] {
        let name = name.to_string().try_into().map_err(BaselineError::Certificate)?;
        leaf.subject_alt_names.push(SanType::DnsName(name));
    }
    leaf.subject_alt_names.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let cert = leaf.signed_by(&key, &issuer).map_err(BaselineError::Certificate)?;
    let key_der = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
        .map_err(|e| BaselineError::Tls(rustls::Error::General(e.to_string())))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(BaselineError::Tls)?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(cert.der().to_vec())], key_der)
        .map_err(BaselineError::Tls)?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(tls), ca_pem))
}

/// `{"alg","value"}`: what a wrapkey or unwrapkey request carries.
#[derive(Deserialize)]
struct KeyOperationParameters {
    #[serde(default)]
    alg: String,
    #[serde(default)]
    value: String,
}

/// The fixed parts of the answers.
struct Answers {
    /// base64url of [`BASELINE_DEK`].
    dek: String,
    /// base64url of a 256-byte ciphertext (and of the modulus of the key get).
    wrapped: String,
    /// Request ids handed out.
    requests: AtomicU64,
}

/// A JSON answer with Key Vault's content type and a request id.
fn answer(status: StatusCode, body: Vec<u8>, request_id: u64) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    // A request id of a UUID's length, as Key Vault (and the broker) send.
    let id = format!("00000000-0000-4000-8000-{request_id:012x}");
    if let Ok(id) = HeaderValue::from_str(&id) {
        headers.insert("x-ms-request-id", id);
    }
    response
}

/// Answers one request: unwrapkey, wrapkey or a key get; anything else 404.
async fn handle(
    answers: Arc<Answers>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let request_id = answers.requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = request.into_parts();
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| parts.headers.get(HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
        .unwrap_or_default();
    let path = parts.uri.path().to_ascii_lowercase();
    let fail = |status: StatusCode, message: &str| {
        let body = json!({ "error": { "code": "BadParameter", "message": message } });
        Ok(answer(status, body.to_string().into_bytes(), request_id))
    };
    let operation = [("/unwrapkey", true), ("/wrapkey", false)]
        .into_iter()
        .find_map(|(suffix, unwrap)| path.strip_suffix(suffix).map(|key| (key.to_string(), unwrap)));
    let reply = match (&parts.method, operation) {
        (&Method::POST, Some((key_path, unwrap))) => {
            let Ok(body) = Limited::new(body, MAX_BODY).collect().await else {
                return fail(StatusCode::BAD_REQUEST, "the body could not be read");
            };
            let Ok(params) = serde_json::from_slice::<KeyOperationParameters>(&body.to_bytes()) else {
                return fail(StatusCode::BAD_REQUEST, "the body is not a key operation's JSON");
            };
            if params.alg.is_empty() || URL_SAFE_NO_PAD.decode(params.value.trim_end_matches('=')).is_err() {
                return fail(StatusCode::BAD_REQUEST, "alg or value is missing or not base64url");
            }
            let value = if unwrap { &answers.dek } else { &answers.wrapped };
            json!({ "kid": format!("https://{host}{key_path}"), "value": value })
        }
        (&Method::GET, None) if path.starts_with("/keys/") => json!({
            "key": {
                "kid": format!("https://{host}{path}"),
                "kty": "RSA",
                "key_ops": ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"],
                "n": answers.wrapped,
                "e": "AQAB",
            },
            "attributes": {
                "enabled": true,
                "created": 1_800_000_000,
                "updated": 1_800_000_000,
                "recoverableDays": 90,
                "recoveryLevel": "Recoverable+Purgeable",
            },
        }),
        _ => {
            return fail(
                StatusCode::NOT_FOUND,
                "the load-test baseline answers unwrapkey, wrapkey and key gets only",
            );
        }
    };
    Ok(answer(StatusCode::OK, reply.to_string().into_bytes(), request_id))
}

/// `loadtest --serve-rest-baseline`: serves on 127.0.0.1, prints `listening ADDR CA_BASE64`,
/// stops when stdin ends.
pub(super) async fn serve_until_stdin_ends() -> Result<(), LoadtestError> {
    crate::tls::install_crypto_provider();
    let (tls, ca_pem) = tls_config()?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(BaselineError::Listen)?;
    let addr = listener.local_addr().map_err(BaselineError::LocalAddr)?;
    let stop = start(listener, tls)?;
    println!("listening {addr} {}", STANDARD.encode(ca_pem));
    std::io::stdout().flush().map_err(CliError::io(std::path::Path::new("stdout")))?;
    wait_for_stdin_end().await;
    let _ = stop.send(());
    Ok(())
}

/// Serves `listener` on a runtime and thread of its own until the sender is used or dropped.
fn start(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
) -> Result<tokio::sync::oneshot::Sender<()>, BaselineError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("loadtest-rest-baseline")
        .enable_all()
        .build()
        .map_err(BaselineError::Runtime)?;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let answers = Arc::new(Answers {
        dek: URL_SAFE_NO_PAD.encode(BASELINE_DEK),
        wrapped: URL_SAFE_NO_PAD.encode([0xa5; WRAPPED_BYTES]),
        requests: AtomicU64::new(0),
    });
    std::thread::Builder::new()
        .name("loadtest-rest-baseline".to_string())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return eprintln!("loadtest: REST baseline: {e}"),
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                loop {
                    let (tcp, _) = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted {
                            Ok(a) => a,
                            Err(e) => {
                                eprintln!("loadtest: REST baseline: accept: {e}");
                                continue;
                            }
                        },
                    };
                    let (acceptor, answers) = (acceptor.clone(), answers.clone());
                    tokio::spawn(async move {
                        // As any HTTP server should: answers are not held back for the peer's ACK.
                        let _ = tcp.set_nodelay(true);
                        let Ok(tls) = acceptor.accept(tcp).await else { return };
                        let service = hyper::service::service_fn(move |r| handle(answers.clone(), r));
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    });
                }
            });
        })
        .map_err(BaselineError::Thread)?;
    Ok(stop)
}
