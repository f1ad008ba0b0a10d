//! How the client subcommands and `loadtest` reach the broker: the global client options
//! ([`Connection`]), the bearer token (`--token` or `<data-dir>/admin.token`) and the client
//! certificate, TLS, a [`Dial`] that connects as many channels as asked, and the [`Session`] the
//! client subcommands call through.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use tonic::metadata::errors::InvalidMetadataValue;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

use super::error::{CliError, ConnectCause};
use super::render::Output;
use crate::config::{DEFAULT_DATA_DIR, DEFAULT_LISTEN};
use crate::grpc::proto::emulation_client::EmulationClient;
use crate::grpc::proto::identities_client::IdentitiesClient;
use crate::grpc::proto::key_vault_client::KeyVaultClient;
use crate::grpc::proto::servers_client::ServersClient;
use crate::grpc::proto::vaults_client::VaultsClient;
use crate::server::{ADMIN_TOKEN_FILE, MAX_MESSAGE_BYTES};

/// How long to wait for the TCP connection before telling the user the broker is not there.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the broker is, who we are, and how to print. Flattened into the top-level command with
/// every argument global, so `tde-broker key list v --output json` works.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Broker gRPC address: `http://host:port`, `https://host:port` (TLS) or `host:port`.
    #[arg(long, global = true, help_heading = "Client options", env = "TDE_BROKER_SERVER", value_name = "URL", default_value_t = format!("http://{DEFAULT_LISTEN}"))]
    pub server: String,
    /// Data directory of the broker; the admin token is read from `<data-dir>/admin.token`
    /// [default: ./tde-broker-data].
    // No clap default on purpose: `serve --data-dir` shares this id, and a global default would
    // be copied into `serve` and beat its TOML file.
    #[arg(
        long,
        global = true,
        help_heading = "Client options",
        env = "TDE_BROKER_DATA_DIR",
        value_name = "DIR"
    )]
    pub data_dir: Option<PathBuf>,
    /// Bearer token to send instead of the admin token file.
    #[arg(
        long,
        global = true,
        help_heading = "Client options",
        env = "TDE_BROKER_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// CA certificate (PEM) that signs the broker's TLS certificate, for an https:// --server
    /// [default: <data-dir>/tls/ca.pem, the dev CA of `serve --tls auto`, when it exists].
    #[arg(
        long,
        global = true,
        help_heading = "Client options",
        env = "TDE_BROKER_CA_CERT",
        value_name = "PATH"
    )]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS (see `cert issue`); without --token it alone says who
    /// you are.
    #[arg(
        long,
        global = true,
        help_heading = "Client options",
        env = "TDE_BROKER_CLIENT_CERT",
        value_name = "PATH",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(
        long,
        global = true,
        help_heading = "Client options",
        env = "TDE_BROKER_CLIENT_KEY",
        value_name = "PATH",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
    /// Output format of client subcommands.
    #[arg(long, global = true, help_heading = "Client options", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl Connection {
    /// `--data-dir`, or the default data directory.
    fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
    }
}

/// Adds `authorization: Bearer <token>` to every request (nothing when a client certificate
/// alone authenticates).
#[derive(Clone, Default)]
pub(crate) struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// The header for `token`.
    pub(crate) fn of_token(token: &str) -> Result<Bearer, InvalidMetadataValue> {
        Ok(Bearer(Some(format!("Bearer {token}").parse::<MetadataValue<Ascii>>()?)))
    }

    /// Whether requests carry a header at all.
    pub(crate) fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// `message` as a request carrying the header.
    pub(crate) fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        self.stamp(request.metadata_mut());
        request
    }

    /// Adds the header, if any, to `metadata`.
    fn stamp(&self, metadata: &mut tonic::metadata::MetadataMap) {
        if let Some(header) = &self.0 {
            metadata.insert("authorization", header.clone());
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        self.stamp(request.metadata_mut());
        Ok(request)
    }
}

/// A client whose every request carries the session's [`Bearer`].
pub(crate) type Authed = InterceptedService<Channel, Bearer>;

/// Where the broker is and who we are, ready to open connections.
pub(crate) struct Dial {
    /// The broker's address with the connect timeout (and TLS).
    endpoint: Endpoint,
    /// The URL dialled, for messages.
    pub(crate) url: String,
    /// `authorization` of every request (`None` inside: the client certificate alone).
    pub(crate) bearer: Bearer,
    /// The raw token, for the caller's object id; `None` when the client certificate alone
    /// authenticates.
    token: Option<String>,
    /// The principal the client certificate names, if one was given.
    cert_principal: Option<String>,
}

impl Dial {
    /// Reads the token, client certificate and CA that `conn` names; connects nothing yet.
    pub(crate) fn new(conn: &Connection) -> Result<Self, CliError> {
        let identity = load_client_identity(conn)?;
        // A client certificate without --token authenticates by itself: the admin token file
        // is not sent (it would take precedence at the broker).
        let token = match (&identity, &conn.token) {
            (Some(_), None) => None,
            _ => Some(load_token(conn)?),
        };
        let bearer = match &token {
            Some(token) => Bearer::of_token(token).map_err(CliError::TokenNotAHeader)?,
            None => Bearer(None),
        };
        let url = server_url(&conn.server);
        let mut endpoint =
            endpoint(&url).map_err(|source| CliError::BadServer { server: conn.server.clone(), source })?;
        let cert_principal = identity.as_ref().and_then(|(_, principal)| principal.clone());
        if url.starts_with("https://") {
            endpoint =
                endpoint.tls_config(client_tls(conn, identity.map(|(id, _)| id))?).map_err(CliError::Tls)?;
        } else if identity.is_some() {
            return Err(CliError::CertNeedsTls);
        }
        Ok(Dial { endpoint, url, bearer, token, cert_principal })
    }

    /// A plaintext, unauthenticated dial of `url` (the load test's baseline).
    pub(crate) fn anonymous(url: String) -> Result<Self, tonic::transport::Error> {
        let endpoint = endpoint(&url)?;
        Ok(Dial { endpoint, url, bearer: Bearer(None), token: None, cert_principal: None })
    }

    /// One channel: its own HTTP/2 connection.
    pub(crate) async fn connect(&self) -> Result<Channel, CliError> {
        self.endpoint
            .connect()
            .await
            .map_err(|e| CliError::Connect { addr: self.url.clone(), cause: ConnectCause::Transport(e) })
    }

    /// `n` channels, each its own HTTP/2 connection.
    pub(crate) async fn connect_many(&self, n: usize) -> Result<Vec<Channel>, CliError> {
        let mut channels = Vec::with_capacity(n);
        for _ in 0..n {
            channels.push(self.connect().await?);
        }
        Ok(channels)
    }

    /// The caller's object id: the token's `oid`, or the principal the client certificate names.
    pub(crate) fn caller_object_id(&self) -> Result<String, CliError> {
        match (&self.token, &self.cert_principal) {
            (Some(token), _) => token_object_id(token),
            (None, Some(principal)) => Ok(principal.clone()),
            (None, None) => Err(CliError::NoCertPrincipal),
        }
    }
}

/// `url` with the connect timeout.
fn endpoint(url: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_string())?.connect_timeout(CONNECT_TIMEOUT))
}

/// Declares the session's service clients: each on the shared channel with the bearer, and
/// answers as large as the broker sends.
macro_rules! service_clients {
    ($($(#[$doc:meta])* $name:ident: $client:ident;)*) => {$(
        $(#[$doc])*
        pub(crate) fn $name(&self) -> $client<Authed> {
            $client::with_interceptor(self.channel.clone(), self.dial.bearer.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
        }
    )*};
}

/// A connected, authenticated channel to the broker.
pub(crate) struct Session {
    /// Shared by every client; cloning is cheap.
    channel: Channel,
    /// Who we are and where the broker is.
    dial: Dial,
}

impl Session {
    /// Dials the broker `conn` names and connects.
    pub(crate) async fn open(conn: &Connection) -> Result<Self, CliError> {
        let dial = Dial::new(conn)?;
        let channel = dial.connect().await?;
        Ok(Session { channel, dial })
    }

    /// A session over a channel `dial` already connected.
    pub(crate) fn over(dial: Dial, channel: Channel) -> Self {
        Session { channel, dial }
    }

    /// How the session reaches the broker.
    pub(crate) fn dial(&self) -> &Dial {
        &self.dial
    }

    /// The caller's object id: the token's `oid`, or the principal the client certificate names.
    pub(crate) fn caller_object_id(&self) -> Result<String, CliError> {
        self.dial.caller_object_id()
    }

    service_clients! {
        /// KeyVault: keys and their crypto.
        keys: KeyVaultClient;
        /// Vaults: vaults, access policies, role assignments, network.
        vaults: VaultsClient;
        /// Emulation: clock, faults, throttling, stats.
        emulation: EmulationClient;
        /// Identities: managed identities, users, tokens.
        identities: IdentitiesClient;
        /// Servers: SQL servers, protectors, databases.
        servers: ServersClient;
    }

    /// Awaits a call and turns its status into a [`CliError`].
    pub(crate) async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, CliError> {
        match call.await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => {
                // Every status the broker makes carries an ErrorInfo reason; one without it and
                // with a code the transport uses came from the connection. The usual cause is
                // --server naming something that is not a gRPC server (the admin HTTP port).
                let from_transport = crate::grpc::status::reason(&status).is_none()
                    && matches!(status.code(), Code::Unknown | Code::Cancelled | Code::Internal);
                if from_transport && let Some(answer) = http1_answer(&self.dial.url).await {
                    return Err(CliError::NotGrpc { addr: self.dial.url.clone(), answer });
                }
                Err(self.status_error(status))
            }
        }
    }

    /// A failed call's status as a [`CliError`].
    pub(crate) fn status_error(&self, status: Status) -> CliError {
        let reason = crate::grpc::status::reason(&status);
        // The broker's own Unavailable carries a reason; a bare one is the transport failing.
        if status.code() == Code::Unavailable && reason.is_none() {
            return self.disconnected(ConnectCause::Unavailable(Box::new(status)));
        }
        CliError::Rpc { code: status.code(), reason, message: status.message().to_string() }
    }

    /// The connection to the broker failed for `cause`.
    pub(crate) fn disconnected(&self, cause: ConnectCause) -> CliError {
        CliError::Connect { addr: self.dial.url.clone(), cause }
    }
}

/// `--client-cert`/`--client-key` as a tonic identity, with the principal the certificate names.
fn load_client_identity(conn: &Connection) -> Result<Option<(Identity, Option<String>)>, CliError> {
    let (Some(cert_path), Some(key_path)) = (&conn.client_cert, &conn.client_key) else {
        return Ok(None);
    };
    let cert = std::fs::read(cert_path).map_err(CliError::io(cert_path))?;
    let key = std::fs::read(key_path).map_err(CliError::io(key_path))?;
    let leaf = crate::tls::certs_from_pem(cert_path, &cert)?.swap_remove(0);
    let principal = crate::tls::principal_from_cert(&leaf);
    Ok(Some((Identity::from_pem(cert, key), principal)))
}

/// TLS for an https:// server: trust --ca-cert, or the dev CA of the data directory.
fn client_tls(conn: &Connection, identity: Option<Identity>) -> Result<ClientTlsConfig, CliError> {
    crate::tls::install_crypto_provider();
    let ca_path = match &conn.ca_cert {
        Some(path) => path.clone(),
        None => {
            let dev_ca = crate::tls::DevPki::in_data_dir(&conn.data_dir()).ca_cert;
            if !dev_ca.is_file() {
                return Err(CliError::NoCa(dev_ca));
            }
            dev_ca
        }
    };
    let ca = std::fs::read(&ca_path).map_err(CliError::io(&ca_path))?;
    crate::tls::certs_from_pem(&ca_path, &ca)?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    Ok(tls)
}

/// The status line a server at a plaintext `url` answers an HTTP/1.1 request with, if it speaks
/// HTTP/1 (within a second); `None` for anything else — a gRPC server answers HTTP/2 only.
async fn http1_answer(url: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let authority = url.strip_prefix("http://")?.split('/').next()?;
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await.ok()?;
        let request = format!("GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut buf = [0u8; 256];
        let n = stream.read(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf[..n]);
        let line = text.lines().next()?.trim();
        line.starts_with("HTTP/1.").then(|| crate::model::ids::printable(line))
    };
    tokio::time::timeout(Duration::from_secs(1), probe).await.ok().flatten()
}

/// `host:port` becomes `http://host:port`; a URL stays as it is.
fn server_url(server: &str) -> String {
    let server = server.trim();
    if server.contains("://") { server.to_string() } else { format!("http://{server}") }
}

/// `--token`, or the admin token file of the data directory; a `Bearer ` prefix is dropped.
fn load_token(conn: &Connection) -> Result<String, CliError> {
    let (text, origin) = match &conn.token {
        Some(t) => (t.clone(), "--token".to_string()),
        None => {
            let path = conn.data_dir().join(ADMIN_TOKEN_FILE);
            match std::fs::read_to_string(&path) {
                Ok(text) => (text, path.display().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(CliError::NoToken(std::path::absolute(&path).unwrap_or(path)));
                }
                Err(e) => return Err(CliError::Io { path, source: e }),
            }
        }
    };
    let text = text.trim();
    let token = text.strip_prefix("Bearer ").unwrap_or(text).trim();
    if token.is_empty() {
        return Err(CliError::EmptyToken { origin });
    }
    Ok(token.to_string())
}

/// The `oid` claim of a JWT: the caller's object id. The broker checks the signature; the
/// client only reads who it is.
pub(crate) fn token_object_id(token: &str) -> Result<String, CliError> {
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|payload| URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok())
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
    claims
        .as_ref()
        .and_then(|claims| claims.get("oid"))
        .and_then(Value::as_str)
        .filter(|oid| !oid.is_empty())
        .map(str::to_string)
        .ok_or(CliError::NoObjectIdClaim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_without_a_scheme_are_plaintext() {
        assert_eq!(server_url(" 127.0.0.1:50051 "), "http://127.0.0.1:50051");
        assert_eq!(server_url("https://h:1"), "https://h:1");
    }

    #[test]
    fn the_object_id_comes_from_the_oid_claim() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"oid":"abc"}"#);
        assert_eq!(token_object_id(&format!("h.{payload}.s")).ok().as_deref(), Some("abc"));
        let empty = URL_SAFE_NO_PAD.encode(br#"{"oid":""}"#);
        for bad in ["", "a.b", "h.!!.s", &format!("h.{empty}.s")] {
            assert!(matches!(token_object_id(bad), Err(CliError::NoObjectIdClaim)), "{bad}");
        }
    }
}
