//! The gRPC edge: tonic services, proto <-> model conversions, error -> status mapping.
//! The only code that sees prost types. One file per service.

pub mod convert;
pub mod emulation;
pub mod engine;
pub mod identities;
pub mod keyvault;
pub mod observe;
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
        let caller = self.authenticate(header, peer, leaf);
        // The audit record and span of the request (observe::ObserveLayer) learn who called.
        if let Some(ctx) = request.extensions().get::<crate::telemetry::RequestContext>() {
            ctx.note_caller(peer, caller.as_ref().ok().map(|c| &*c.object_id));
        }
        request.extensions_mut().insert(caller.map_err(to_status)?);
        Ok(request)
    }
}

/// The authenticated caller of a request. Every service is wrapped in [`AuthInterceptor`], so
/// a missing caller means a wiring bug: refuse rather than run anonymously.
pub fn caller<T: 'static>(request: &Request<T>) -> Result<Caller, Status> {
    if let Some(ctx) = request.extensions().get::<crate::telemetry::RequestContext>()
        && ctx.recording()
        && let Some(resource) = resource_of(request.get_ref())
    {
        ctx.note_resource(&resource);
    }
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| to_status(crate::model::BrokerError::MissingToken))
}

/// The resource a request names, for its audit record and span: a key id, a vault (and key
/// name), a server, a database, an identity or a scope. Never a value, a key or a token.
fn resource_of(message: &dyn std::any::Any) -> Option<String> {
    use proto::*;
    macro_rules! field {
        ($($ty:ident => |$m:ident| $e:expr),* $(,)?) => {
            $(if let Some($m) = message.downcast_ref::<$ty>() { return Some($e); })*
        };
    }
    let key = |vault: &str, name: &str| format!("{vault}/keys/{name}");
    field!(
        WrapKeyRequest => |m| m.key_id.clone(),
        UnwrapKeyRequest => |m| m.key_id.clone(),
        EncryptRequest => |m| m.key_id.clone(),
        DecryptRequest => |m| m.key_id.clone(),
        SignRequest => |m| m.key_id.clone(),
        VerifyRequest => |m| m.key_id.clone(),
        GetRandomBytesRequest => |m| m.vault_name.clone(),
        GetKeyRequest => |m| m.key_id.clone(),
        UpdateKeyRequest => |m| m.key_id.clone(),
        RotateKeyRequest => |m| m.key_id.clone(),
        DeleteKeyRequest => |m| m.key_id.clone(),
        BackupKeyRequest => |m| m.key_id.clone(),
        ListKeyVersionsRequest => |m| m.key_id.clone(),
        CreateKeyRequest => |m| key(&m.vault_name, &m.name),
        ImportKeyRequest => |m| key(&m.vault_name, &m.name),
        GetDeletedKeyRequest => |m| key(&m.vault_name, &m.name),
        RecoverDeletedKeyRequest => |m| key(&m.vault_name, &m.name),
        PurgeDeletedKeyRequest => |m| key(&m.vault_name, &m.name),
        ListKeysRequest => |m| m.vault_name.clone(),
        ListDeletedKeysRequest => |m| m.vault_name.clone(),
        RestoreKeyRequest => |m| m.vault_name.clone(),
        CreateVaultRequest => |m| m.name.clone(),
        GetVaultRequest => |m| m.name.clone(),
        UpdateVaultRequest => |m| m.name.clone(),
        DeleteVaultRequest => |m| m.name.clone(),
        GetDeletedVaultRequest => |m| m.name.clone(),
        RecoverDeletedVaultRequest => |m| m.name.clone(),
        PurgeDeletedVaultRequest => |m| m.name.clone(),
        SetAccessPolicyRequest => |m| m.vault_name.clone(),
        ListAccessPoliciesRequest => |m| m.vault_name.clone(),
        CreatePrivateEndpointRequest => |m| m.vault_name.clone(),
        CreateRoleAssignmentRequest => |m| m.scope.clone(),
        DeleteRoleAssignmentRequest => |m| m.id.clone(),
        PutSubnetRequest => |m| m.subnet_id.clone(),
        SetFaultsRequest => |m| m.vault_name.clone(),
        ClearFaultsRequest => |m| m.vault_name.clone(),
        CreateServerRequest => |m| m.name.clone(),
        GetServerRequest => |m| m.server_id.clone(),
        DeleteServerRequest => |m| m.server_id.clone(),
        UpdateServerIdentityRequest => |m| m.server_id.clone(),
        SetEncryptionProtectorRequest => |m| m.server_id.clone(),
        GetEncryptionProtectorRequest => |m| m.server_id.clone(),
        RevalidateEncryptionProtectorRequest => |m| m.server_id.clone(),
        CreateDatabaseRequest => |m| m.server_id.clone(),
        GetDatabaseRequest => |m| m.server_id.clone(),
        ListDatabasesRequest => |m| m.server_id.clone(),
        DeleteDatabaseRequest => |m| m.server_id.clone(),
        WatchDatabaseStatesRequest => |m| m.server_id.clone(),
        IssueHostCredentialRequest => |m| m.server_id.clone(),
        SetupVaultKvMountRequest => |m| m.server_id.clone(),
        RotateVaultKvKeyRequest => |m| m.server_id.clone(),
        CreateUserAssignedIdentityRequest => |m| m.name.clone(),
        DeleteUserAssignedIdentityRequest => |m| m.resource_id.clone(),
        GenerateDatabaseKeyRequest => |m| m.database.clone(),
        WrapDatabaseKeyRequest => |m| m.database.clone(),
        UnwrapDatabaseKeyRequest => |m| m.database.clone(),
        RewrapDatabaseKeyRequest => |m| m.database.clone(),
        GetProtectorStatusRequest => |m| m.database.clone(),
    );
    None
}
