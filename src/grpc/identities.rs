//! The `Identities` service: managed identities, users, tokens (control plane).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::identity;
use super::proto::{self, identities_server::Identities};
use super::{caller, to_status};
use crate::auth::{Authenticator, MANAGEMENT_AUDIENCE, VAULT_AUDIENCE, canonical_audience};
use crate::broker::Broker;
use crate::broker::identities::IdentitySelector;

/// The service implementation.
pub struct IdentitiesService {
    broker: Arc<Broker>,
    auth: Arc<Authenticator>,
    /// Lifetime of the user and identity tokens it hands out, seconds.
    token_lifetime: i64,
}

impl IdentitiesService {
    /// Serves `broker`, issuing tokens with `auth`.
    pub fn new(broker: Arc<Broker>, auth: Arc<Authenticator>, token_lifetime: i64) -> Self {
        IdentitiesService { broker, auth, token_lifetime }
    }
}

#[tonic::async_trait]
impl Identities for IdentitiesService {
    async fn create_user_assigned_identity(
        &self,
        request: Request<proto::CreateUserAssignedIdentityRequest>,
    ) -> Result<Response<proto::Identity>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let p = self
            .broker
            .create_user_assigned_identity(&caller, &r.subscription_id, &r.resource_group, &r.name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(identity(&p, &self.broker.settings.tenant_id)))
    }

    async fn get_identity(
        &self,
        request: Request<proto::GetIdentityRequest>,
    ) -> Result<Response<proto::Identity>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let sel = IdentitySelector {
            resource_id: r.resource_id,
            principal_id: r.principal_id,
            client_id: r.client_id,
        };
        let p = self.broker.get_identity(&caller, &sel).map_err(to_status)?;
        Ok(Response::new(identity(&p, &self.broker.settings.tenant_id)))
    }

    async fn list_identities(
        &self,
        request: Request<proto::ListIdentitiesRequest>,
    ) -> Result<Response<proto::ListIdentitiesResponse>, Status> {
        let caller = caller(&request)?;
        let tenant = &self.broker.settings.tenant_id;
        let identities = self.broker.list_identities(&caller).iter().map(|p| identity(p, tenant)).collect();
        Ok(Response::new(proto::ListIdentitiesResponse { identities }))
    }

    async fn delete_user_assigned_identity(
        &self,
        request: Request<proto::DeleteUserAssignedIdentityRequest>,
    ) -> Result<Response<proto::DeleteUserAssignedIdentityResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        self.broker
            .delete_user_assigned_identity(&caller, &r.resource_id, r.force)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::DeleteUserAssignedIdentityResponse {}))
    }

    async fn create_user(
        &self,
        request: Request<proto::CreateUserRequest>,
    ) -> Result<Response<proto::CreateUserResponse>, Status> {
        let caller = caller(&request)?;
        // The secret is answered once; only its hash is stored.
        let (client_secret, hash) = crate::auth::secret::new_client_secret();
        let user =
            self.broker.create_user(&caller, &request.get_ref().name, Some(hash)).await.map_err(to_status)?;
        let (token, expires_on) = self
            .auth
            .issue_user_token(&user, &[MANAGEMENT_AUDIENCE, VAULT_AUDIENCE], self.token_lifetime)
            .map_err(to_status)?;
        Ok(Response::new(proto::CreateUserResponse {
            principal_id: user.object_id,
            name: user.name,
            token,
            expires_on,
            client_id: user.app_id,
            client_secret: client_secret.to_string(),
        }))
    }

    async fn get_token(
        &self,
        request: Request<proto::GetTokenRequest>,
    ) -> Result<Response<proto::GetTokenResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let audience = canonical_audience(&r.audience).map_err(to_status)?;
        let sel = IdentitySelector {
            resource_id: r.resource_id,
            principal_id: r.principal_id,
            client_id: r.client_id,
        };
        let p = self.broker.identity_for_token(&caller, &sel).map_err(to_status)?;
        let (access_token, expires_on) =
            self.auth.issue_identity_token(&p, audience, self.token_lifetime).map_err(to_status)?;
        Ok(Response::new(proto::GetTokenResponse { access_token, expires_on }))
    }
}
