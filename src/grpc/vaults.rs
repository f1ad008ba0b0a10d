//! The `Vaults` service: vaults and their access policies (control plane).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{role_assignment, vault};
use super::proto::{self, vaults_server::Vaults};
use super::{caller, to_status};
use crate::broker::Broker;
use crate::broker::vaults::{DeletedVault, VaultSpec, VaultUpdate};
use crate::model::{BrokerError, NetworkAcls, Vault};

/// The service implementation.
pub struct VaultsService {
    broker: Arc<Broker>,
}

impl VaultsService {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        VaultsService { broker }
    }

    fn out(&self, v: Vault) -> proto::Vault {
        vault(v, &self.broker.settings.vault_dns_suffix)
    }

    fn deleted(&self, d: DeletedVault) -> proto::DeletedVault {
        proto::DeletedVault {
            vault: Some(self.out(d.vault)),
            deleted_date: d.deletion.deleted_date,
            scheduled_purge_date: d.deletion.scheduled_purge_date,
        }
    }
}

fn acls(a: Option<proto::NetworkAcls>) -> Result<Option<NetworkAcls>, BrokerError> {
    a.map(|a| NetworkAcls::parse(&a.default_action, &a.bypass, &a.ip_rules, &a.virtual_network_rules))
        .transpose()
}

#[tonic::async_trait]
impl Vaults for VaultsService {
    async fn create_vault(
        &self,
        request: Request<proto::CreateVaultRequest>,
    ) -> Result<Response<proto::Vault>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let spec = VaultSpec {
            name: r.name,
            retention_days: r.soft_delete_retention_days,
            purge_protection: r.enable_purge_protection,
            rbac: r.enable_rbac_authorization,
            network_acls: acls(r.network_acls).map_err(to_status)?,
            public_network_access: Vault::parse_public_access(&r.public_network_access).map_err(to_status)?,
        };
        let v = self.broker.create_vault(&caller, spec).await.map_err(to_status)?;
        Ok(Response::new(self.out(v)))
    }

    async fn get_vault(
        &self,
        request: Request<proto::GetVaultRequest>,
    ) -> Result<Response<proto::Vault>, Status> {
        let caller = caller(&request)?;
        let v = self.broker.get_vault(&caller, &request.get_ref().name).map_err(to_status)?;
        Ok(Response::new(self.out(v)))
    }

    async fn list_vaults(
        &self,
        request: Request<proto::ListVaultsRequest>,
    ) -> Result<Response<proto::ListVaultsResponse>, Status> {
        let caller = caller(&request)?;
        let vaults = self.broker.list_vaults(&caller).into_iter().map(|v| self.out(v)).collect();
        Ok(Response::new(proto::ListVaultsResponse { vaults }))
    }

    async fn update_vault(
        &self,
        request: Request<proto::UpdateVaultRequest>,
    ) -> Result<Response<proto::Vault>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let update = VaultUpdate {
            purge_protection: r.enable_purge_protection,
            rbac: r.enable_rbac_authorization,
            network_acls: acls(r.network_acls).map_err(to_status)?,
            public_network_access: r
                .public_network_access
                .as_deref()
                .map(Vault::parse_public_access)
                .transpose()
                .map_err(to_status)?,
        };
        let v = self.broker.update_vault(&caller, &r.name, update).await.map_err(to_status)?;
        Ok(Response::new(self.out(v)))
    }

    async fn delete_vault(
        &self,
        request: Request<proto::DeleteVaultRequest>,
    ) -> Result<Response<proto::DeleteVaultResponse>, Status> {
        let caller = caller(&request)?;
        self.broker.delete_vault(&caller, &request.get_ref().name).await.map_err(to_status)?;
        Ok(Response::new(proto::DeleteVaultResponse {}))
    }

    async fn get_deleted_vault(
        &self,
        request: Request<proto::GetDeletedVaultRequest>,
    ) -> Result<Response<proto::DeletedVault>, Status> {
        let caller = caller(&request)?;
        let d = self.broker.get_deleted_vault(&caller, &request.get_ref().name).map_err(to_status)?;
        Ok(Response::new(self.deleted(d)))
    }

    async fn list_deleted_vaults(
        &self,
        request: Request<proto::ListDeletedVaultsRequest>,
    ) -> Result<Response<proto::ListDeletedVaultsResponse>, Status> {
        let caller = caller(&request)?;
        let vaults = self.broker.list_deleted_vaults(&caller).into_iter().map(|d| self.deleted(d)).collect();
        Ok(Response::new(proto::ListDeletedVaultsResponse { vaults }))
    }

    async fn recover_deleted_vault(
        &self,
        request: Request<proto::RecoverDeletedVaultRequest>,
    ) -> Result<Response<proto::Vault>, Status> {
        let caller = caller(&request)?;
        let v =
            self.broker.recover_deleted_vault(&caller, &request.get_ref().name).await.map_err(to_status)?;
        Ok(Response::new(self.out(v)))
    }

    async fn purge_deleted_vault(
        &self,
        request: Request<proto::PurgeDeletedVaultRequest>,
    ) -> Result<Response<proto::PurgeDeletedVaultResponse>, Status> {
        let caller = caller(&request)?;
        self.broker.purge_deleted_vault(&caller, &request.get_ref().name).await.map_err(to_status)?;
        Ok(Response::new(proto::PurgeDeletedVaultResponse {}))
    }

    async fn set_access_policy(
        &self,
        request: Request<proto::SetAccessPolicyRequest>,
    ) -> Result<Response<proto::SetAccessPolicyResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        self.broker
            .set_access_policy(&caller, &r.vault_name, &r.object_id, &r.key_permissions)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::SetAccessPolicyResponse {}))
    }

    async fn list_access_policies(
        &self,
        request: Request<proto::ListAccessPoliciesRequest>,
    ) -> Result<Response<proto::ListAccessPoliciesResponse>, Status> {
        let caller = caller(&request)?;
        let policies = self
            .broker
            .list_access_policies(&caller, &request.get_ref().vault_name)
            .map_err(to_status)?
            .into_iter()
            .map(|(object_id, perms)| proto::AccessPolicy {
                object_id,
                key_permissions: perms.iter().map(|p| p.name().to_string()).collect(),
            })
            .collect();
        Ok(Response::new(proto::ListAccessPoliciesResponse { policies }))
    }

    async fn create_role_assignment(
        &self,
        request: Request<proto::CreateRoleAssignmentRequest>,
    ) -> Result<Response<proto::RoleAssignment>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let a = self
            .broker
            .create_role_assignment(&caller, &r.scope, &r.principal_id, &r.role_name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(role_assignment(a)))
    }

    async fn delete_role_assignment(
        &self,
        request: Request<proto::DeleteRoleAssignmentRequest>,
    ) -> Result<Response<proto::DeleteRoleAssignmentResponse>, Status> {
        let caller = caller(&request)?;
        self.broker.delete_role_assignment(&caller, &request.get_ref().id).await.map_err(to_status)?;
        Ok(Response::new(proto::DeleteRoleAssignmentResponse {}))
    }

    async fn list_role_assignments(
        &self,
        request: Request<proto::ListRoleAssignmentsRequest>,
    ) -> Result<Response<proto::ListRoleAssignmentsResponse>, Status> {
        let caller = caller(&request)?;
        let assignments = self
            .broker
            .list_role_assignments(&caller, &request.get_ref().scope)
            .map_err(to_status)?
            .into_iter()
            .map(role_assignment)
            .collect();
        Ok(Response::new(proto::ListRoleAssignmentsResponse { assignments }))
    }

    async fn put_subnet(
        &self,
        request: Request<proto::PutSubnetRequest>,
    ) -> Result<Response<proto::Subnet>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let s =
            self.broker.put_subnet(&caller, &r.subnet_id, &r.address_prefixes).await.map_err(to_status)?;
        Ok(Response::new(proto::Subnet { subnet_id: s.id, address_prefixes: s.prefixes }))
    }

    async fn list_subnets(
        &self,
        request: Request<proto::ListSubnetsRequest>,
    ) -> Result<Response<proto::ListSubnetsResponse>, Status> {
        let caller = caller(&request)?;
        let subnets = self
            .broker
            .list_subnets(&caller)
            .into_iter()
            .map(|s| proto::Subnet { subnet_id: s.id, address_prefixes: s.prefixes })
            .collect();
        Ok(Response::new(proto::ListSubnetsResponse { subnets }))
    }

    async fn create_private_endpoint(
        &self,
        request: Request<proto::CreatePrivateEndpointRequest>,
    ) -> Result<Response<proto::CreatePrivateEndpointResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        self.broker.create_private_endpoint(&caller, &r.vault_name, &r.subnet_id).await.map_err(to_status)?;
        Ok(Response::new(proto::CreatePrivateEndpointResponse {}))
    }
}
