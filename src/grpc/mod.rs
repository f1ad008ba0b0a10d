//! The gRPC edge: tonic services, proto <-> model conversions, error -> status mapping.
//! The only code that sees prost types. One file per service.

pub mod convert;
pub mod emulation;
pub mod engine;
pub mod identities;
pub mod keyvault;
pub mod servers;
pub mod status;
pub mod vaults;

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::auth::AuthInterceptor;
use crate::model::Caller;
pub use status::to_status;

/// Generated code for package `tdebroker.v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tdebroker.v1");
    /// Encoded file descriptors, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tdebroker_descriptor");
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        // A header that is present but not text still counts as present (it fails as a token).
        let header = request.metadata().get("authorization").map(|v| v.to_str().unwrap_or(""));
        // With TLS on, the certificates the client presented (verified against the client CA).
        let certs = request.peer_certs();
        let leaf = certs.as_deref().and_then(|c| c.first()).map(|c| c.as_ref());
        // The real client address: the connection's peer, or — only when that peer is a
        // configured trusted proxy — the address it forwards.
        let forwarded = request.metadata().get("x-forwarded-for").and_then(|v| v.to_str().ok());
        let peer =
            crate::policy::network::client_address(request.remote_addr(), forwarded, self.trusted_proxies());
        let caller = self.authenticate(header, peer, leaf).map_err(to_status)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The authenticated caller of a request. Every service is wrapped in [`AuthInterceptor`], so
/// a missing caller means a wiring bug: refuse rather than run anonymously.
pub fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| to_status(crate::model::BrokerError::MissingToken))
}
