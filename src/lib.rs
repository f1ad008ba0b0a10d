//! tde-broker: a gRPC key-access broker for TDE with customer-managed keys — Azure Key Vault and
//! Azure SQL's "TDE with CMK through managed identities", on one machine.
//!
//! # Layout
//! - [`model`]: the pure domain — identifiers, vaults, keys, principals, changes, errors.
//! - [`policy`]: pure authorization decisions (data plane, control plane).
//! - [`crypto`]: RSA/AES operations, key generation, import, sealing at rest, token signatures.
//! - [`store`]: the durable [`store::Store`] trait and its SQLite implementation.
//! - [`broker`]: in-memory state, the single apply path, the operations, the clock.
//! - [`auth`]: token issuing and validation, the authenticating interceptor.
//! - [`grpc`]: tonic services and the error → status mapping; the only code that sees prost types.
//! - [`server`]: start-up (data dir, master key, bootstrap admin, seed) and serving.
//! - [`tls`]: TLS/mTLS: the dev CA, client certificates naming principals, rustls set-up.
//! - [`telemetry`], [`audit`], [`http`]: metrics, per-RPC observation and OpenTelemetry; the
//!   audit log; the admin HTTP listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`cli`]: the `tde-broker` command line.
#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod grpc;
pub mod http;
pub mod model;
pub mod policy;
pub mod seed;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
