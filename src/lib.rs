//! tde-broker: a gRPC key-access broker for TDE with customer-managed keys — Azure Key Vault and
//! Azure SQL's "TDE with CMK through managed identities", on one machine.
//!
//! # Layout
//! Leaves first; an import only ever points down this list (ARCHITECTURE.md, "Layers").
//! - [`model`]: the pure domain — identifiers, vaults, keys, principals, roles, servers and the
//!   TDE state machine, changes, RFC 3339 times, errors with the cloud's texts.
//! - [`policy`]: pure decisions — data plane (access policies, RBAC), control plane (ARM
//!   actions), network rules.
//! - [`crypto`]: RSA/AES operations, key generation, import, sealing at rest, token signatures.
//! - [`store`]: the durable [`store::Store`] trait, its backends and their conformance suite.
//! - [`telemetry`]: logging, the metrics registry, the request context, OpenTelemetry export;
//!   imports nothing else of the crate.
//! - [`broker`]: in-memory state, the single apply path, the data-plane gate, the caches, the
//!   operations (keys, vaults, roles, identities, servers, TDE), faults, throttling, the clock.
//! - [`audit`]: the audit log (one JSON line per RPC).
//! - [`listener`]: the gRPC listener's accept loop — backoff on accept errors, a bound on open
//!   connections, the HTTP/2 preface deadline; imports nothing else of the crate.
//! - [`config`]: flags, environment and TOML resolved into one validated configuration.
//! - [`tls`]: TLS/mTLS: the dev CA, client certificates naming principals, rustls set-up.
//! - [`auth`]: token issuing and validation, the authenticating interceptor.
//! - [`grpc`]: the gRPC adapter — tonic services, the error → status mapping, the per-RPC
//!   observation layer; the only code that sees prost types.
//! - [`http`]: the admin HTTP listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`rest`]: the HTTPS surfaces — Key Vault's REST API for the Azure SDKs, the token
//!   endpoints their credentials call, the Vault-KV endpoint MariaDB reads its keys from.
//! - [`seed`]: vaults and keys declared in a TOML file, created at start.
//! - [`server`]: start-up (data dir, master key, store, bootstrap admin, seed) and serving.
//! - [`cli`]: the `tde-broker` command line (`serve`, the client commands, `loadtest`).
#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod grpc;
pub mod http;
pub mod listener;
pub mod model;
pub mod policy;
pub mod rest;
pub mod seed;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
