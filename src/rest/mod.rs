//! The HTTPS surfaces beside gRPC, on one listener (`--rest-listen`): Azure Key Vault's own REST
//! API for the unmodified Azure SDKs, the managed-identity and OpenID token endpoints those SDKs'
//! credentials call ([`identity`]), and the HashiCorp Vault KV v2 subset MariaDB's
//! `hashicorp_key_management` plugin reads its keys from ([`vault_kv`]).
//!
//! An adapter like `grpc`: every handler calls the same broker operation as its gRPC twin, so the
//! gate, the caches and the apply path come with it.

pub mod identity;
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
