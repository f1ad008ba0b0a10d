//! The HTTPS surfaces beside gRPC, on one listener (`--rest-listen`): Azure Key Vault's own REST
//! API for the unmodified Azure SDKs, the managed-identity and OpenID token endpoints those SDKs'
//! credentials call ([`identity`]), and the HashiCorp Vault KV v2 subset MariaDB's
//! `hashicorp_key_management` plugin reads its keys from ([`vault_kv`]).
//!
//! An adapter like `grpc`: every handler calls the same broker operation as its gRPC twin, so the
//! gate, the caches and the apply path come with it.

pub mod error;
pub mod identity;
pub mod keyvault;
pub mod serve;
pub mod vault_kv;

/// What a handler answers: a response, or nothing at all — the connection is dropped without a
/// reply, which a client sees as an unreachable server (the Vault-KV surface answers the broker's
/// own transient faults this way, see [`vault_kv`]).
#[derive(Debug)]
pub enum Reply {
    /// An HTTP response.
    Http(http::Response<bytes::Bytes>),
    /// Close the connection without answering.
    Drop,
}

/// A request as a surface sees it: the head, the whole body (read up to the listener's bound) and
/// the connection's peer address (the real one: network rules are decided on it).
#[derive(Debug)]
pub struct RestRequest {
    /// Method, URI, headers.
    pub parts: http::request::Parts,
    /// The body.
    pub body: bytes::Bytes,
    /// The TCP peer.
    pub peer: std::net::SocketAddr,
}

/// A handled request: the reply, and what the listener observes of it (metrics, the audit record,
/// the span), so that every surface is observed the same way.
#[derive(Debug)]
pub struct Handled {
    /// The answer.
    pub reply: Reply,
    /// The operation, `<surface>/<operation>`: `KeyVault/UnwrapKey`, `Identity/AppServiceToken`,
    /// `VaultKv/ReadKey`, …
    pub operation: &'static str,
    /// `OK`, or the reason of the refusal: the `ErrorInfo` reason the gRPC twin would carry (for
    /// the Vault-KV surface, the TDE reason).
    pub outcome: String,
    /// The principal the request was made as, once known.
    pub principal: Option<String>,
    /// The key id, vault, server or mount the request names, once known.
    pub resource: Option<String>,
}

/// A boxed future, as [`Surface::handle`] returns.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// One of the surfaces that share the HTTPS listener. The listener offers each request to the
/// surfaces in turn; the first that recognises its path answers.
pub trait Surface: Send + Sync + 'static {
    /// Handles the request, or `None` when its path is not this surface's.
    fn handle<'a>(&'a self, request: &'a RestRequest) -> BoxFuture<'a, Option<Handled>>;
}
