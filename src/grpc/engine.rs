//! The `TdeEngine` service: called by a server's engine host, acting with the server's
//! effective identity.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::db_state;
use super::proto::{self, tde_engine_server::TdeEngine};
use super::{caller, to_status};
use crate::broker::Broker;

/// The service implementation.
pub struct EngineService {
    broker: Arc<Broker>,
}

impl EngineService {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        EngineService { broker }
    }
}

#[tonic::async_trait]
impl TdeEngine for EngineService {
    async fn generate_database_key(
        &self,
        request: Request<proto::GenerateDatabaseKeyRequest>,
    ) -> Result<Response<proto::GenerateDatabaseKeyResponse>, Status> {
        let caller = caller(&request)?;
        let (mut dek, wrapped_dek, kid) = self
            .broker
            .generate_database_key(&caller, &request.get_ref().database)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::GenerateDatabaseKeyResponse {
            dek: std::mem::take(&mut *dek),
            wrapped_dek,
            kid,
        }))
    }

    async fn wrap_database_key(
        &self,
        request: Request<proto::WrapDatabaseKeyRequest>,
    ) -> Result<Response<proto::WrapDatabaseKeyResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let (wrapped_dek, kid) =
            self.broker.wrap_database_key(&caller, &r.database, r.dek).await.map_err(to_status)?;
        Ok(Response::new(proto::WrapDatabaseKeyResponse { wrapped_dek, kid }))
    }

    async fn unwrap_database_key(
        &self,
        request: Request<proto::UnwrapDatabaseKeyRequest>,
    ) -> Result<Response<proto::UnwrapDatabaseKeyResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let mut dek = self
            .broker
            .unwrap_database_key(&caller, &r.database, &r.kid, r.wrapped_dek)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::UnwrapDatabaseKeyResponse { dek: std::mem::take(&mut *dek) }))
    }

    async fn rewrap_database_key(
        &self,
        request: Request<proto::RewrapDatabaseKeyRequest>,
    ) -> Result<Response<proto::RewrapDatabaseKeyResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let (wrapped_dek, kid) = self
            .broker
            .rewrap_database_key(&caller, &r.database, &r.kid, r.wrapped_dek)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::RewrapDatabaseKeyResponse { wrapped_dek, kid }))
    }

    async fn get_protector_status(
        &self,
        request: Request<proto::GetProtectorStatusRequest>,
    ) -> Result<Response<proto::GetProtectorStatusResponse>, Status> {
        let caller = caller(&request)?;
        let (reason, effective_identity_id, kid) =
            self.broker.protector_status(&caller, &request.get_ref().database).await.map_err(to_status)?;
        Ok(Response::new(proto::GetProtectorStatusResponse {
            state: db_state(reason) as i32,
            reason: reason.map(|r| r.name().to_string()).unwrap_or_default(),
            effective_identity_id,
            kid,
        }))
    }
}
