//! The `Servers` service: SQL servers, identities, TDE protectors, databases (control plane).

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert::{database, protector, server};
use super::proto::{self, servers_server::Servers};
use super::{caller, to_status};
use crate::auth::{Authenticator, MANAGEMENT_AUDIENCE, VAULT_AUDIENCE};
use crate::broker::Broker;
use crate::broker::servers::ServerSpec;
use crate::model::BrokerError;
use crate::model::server::ServerKind;

/// The service implementation.
pub struct ServersService {
    broker: Arc<Broker>,
    auth: Arc<Authenticator>,
    /// Data directory holding the dev CA (under `--tls auto`): host credentials then include a
    /// client certificate naming the host principal.
    dev_ca_dir: Option<std::path::PathBuf>,
}

impl ServersService {
    /// Serves `broker`, issuing host credentials with `auth`.
    pub fn new(
        broker: Arc<Broker>,
        auth: Arc<Authenticator>,
        dev_ca_dir: Option<std::path::PathBuf>,
    ) -> Self {
        ServersService { broker, auth, dev_ca_dir }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::DatabaseStateEvent, Status>> + Send>>;

/// A watch stream decides its watcher's access again at least this often when the epoch has
/// moved (and before every event it sends).
pub const WATCH_RECHECK: std::time::Duration = std::time::Duration::from_millis(500);

#[tonic::async_trait]
impl Servers for ServersService {
    async fn create_server(
        &self,
        request: Request<proto::CreateServerRequest>,
    ) -> Result<Response<proto::Server>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let kind = match proto::ServerKind::try_from(r.kind) {
            Ok(proto::ServerKind::SqlServer) | Ok(proto::ServerKind::Unspecified) => ServerKind::SqlServer,
            Ok(proto::ServerKind::ManagedInstance) => ServerKind::ManagedInstance,
            Err(_) => return Err(to_status(BrokerError::bad_parameter("Unknown server kind."))),
        };
        let identity = r.identity.unwrap_or_default();
        let spec = ServerSpec {
            subscription: r.subscription_id,
            resource_group: r.resource_group,
            name: r.name,
            kind,
            system_assigned: identity.system_assigned,
            user_assigned: identity.user_assigned_identity_ids,
            primary: identity.primary_user_assigned_identity_id,
            key_id: r.key_id,
            auto_rotation: r.auto_rotation_enabled,
            subnet_id: r.subnet_id,
        };
        let s = self.broker.create_server(&caller, spec).await.map_err(to_status)?;
        Ok(Response::new(server(&s)))
    }

    async fn get_server(
        &self,
        request: Request<proto::GetServerRequest>,
    ) -> Result<Response<proto::Server>, Status> {
        let caller = caller(&request)?;
        let s = self.broker.get_server(&caller, &request.get_ref().server_id).map_err(to_status)?;
        Ok(Response::new(server(&s)))
    }

    async fn list_servers(
        &self,
        request: Request<proto::ListServersRequest>,
    ) -> Result<Response<proto::ListServersResponse>, Status> {
        let caller = caller(&request)?;
        let servers = self.broker.list_servers(&caller).iter().map(server).collect();
        Ok(Response::new(proto::ListServersResponse { servers }))
    }

    async fn delete_server(
        &self,
        request: Request<proto::DeleteServerRequest>,
    ) -> Result<Response<proto::DeleteServerResponse>, Status> {
        let caller = caller(&request)?;
        self.broker.delete_server(&caller, &request.get_ref().server_id).await.map_err(to_status)?;
        Ok(Response::new(proto::DeleteServerResponse {}))
    }

    async fn update_server_identity(
        &self,
        request: Request<proto::UpdateServerIdentityRequest>,
    ) -> Result<Response<proto::Server>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let i = r.identity.unwrap_or_default();
        let s = self
            .broker
            .update_server_identity(
                &caller,
                &r.server_id,
                i.system_assigned,
                &i.user_assigned_identity_ids,
                &i.primary_user_assigned_identity_id,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(server(&s)))
    }

    async fn set_encryption_protector(
        &self,
        request: Request<proto::SetEncryptionProtectorRequest>,
    ) -> Result<Response<proto::EncryptionProtector>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let s = self
            .broker
            .set_encryption_protector(
                &caller,
                &r.server_id,
                &r.server_key_type,
                &r.key_id,
                r.auto_rotation_enabled,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(protector(&s.protector)))
    }

    async fn get_encryption_protector(
        &self,
        request: Request<proto::GetEncryptionProtectorRequest>,
    ) -> Result<Response<proto::EncryptionProtector>, Status> {
        let caller = caller(&request)?;
        let s = self.broker.get_server(&caller, &request.get_ref().server_id).map_err(to_status)?;
        Ok(Response::new(protector(&s.protector)))
    }

    async fn revalidate_encryption_protector(
        &self,
        request: Request<proto::RevalidateEncryptionProtectorRequest>,
    ) -> Result<Response<proto::EncryptionProtector>, Status> {
        let caller = caller(&request)?;
        let s = self.broker.revalidate(&caller, &request.get_ref().server_id).await.map_err(to_status)?;
        Ok(Response::new(protector(&s.protector)))
    }

    async fn create_database(
        &self,
        request: Request<proto::CreateDatabaseRequest>,
    ) -> Result<Response<proto::Database>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let d = self.broker.create_database(&caller, &r.server_id, &r.name).await.map_err(to_status)?;
        Ok(Response::new(database(&d)))
    }

    async fn get_database(
        &self,
        request: Request<proto::GetDatabaseRequest>,
    ) -> Result<Response<proto::Database>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let d = self.broker.get_database(&caller, &r.server_id, &r.name).map_err(to_status)?;
        Ok(Response::new(database(&d)))
    }

    async fn list_databases(
        &self,
        request: Request<proto::ListDatabasesRequest>,
    ) -> Result<Response<proto::ListDatabasesResponse>, Status> {
        let caller = caller(&request)?;
        let dbs = self.broker.list_databases(&caller, &request.get_ref().server_id).map_err(to_status)?;
        Ok(Response::new(proto::ListDatabasesResponse { databases: dbs.iter().map(database).collect() }))
    }

    async fn delete_database(
        &self,
        request: Request<proto::DeleteDatabaseRequest>,
    ) -> Result<Response<proto::DeleteDatabaseResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        self.broker.delete_database(&caller, &r.server_id, &r.name).await.map_err(to_status)?;
        Ok(Response::new(proto::DeleteDatabaseResponse {}))
    }

    type WatchDatabaseStatesStream = EventStream;

    async fn watch_database_states(
        &self,
        request: Request<proto::WatchDatabaseStatesRequest>,
    ) -> Result<Response<Self::WatchDatabaseStatesStream>, Status> {
        let caller = caller(&request)?;
        // Reading the server checks the caller's right to see it.
        let s = self.broker.get_server(&caller, &request.get_ref().server_id).map_err(to_status)?;
        let id = s.id.to_ascii_lowercase();
        let mut decided = self.broker.watch_access(&caller, &id).map_err(to_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut events = self.broker.watch();
        let shutdown = self.broker.shutdown_signal();
        let broker = self.broker.clone();
        // Forwards this server's transitions until the client goes away, the broker stops, the
        // watcher's token expires (UNAUTHENTICATED, as its next call would be), or it loses its
        // access: that is decided again whenever the epoch has moved (every
        // applied change moves it, a transition's too), before an event is sent and at least
        // every `WATCH_RECHECK`; the stream then ends with the status GetServer would answer.
        tokio::spawn(async move {
            tokio::pin!(shutdown);
            let mut recheck = tokio::time::interval(WATCH_RECHECK);
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let item = tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tx.closed() => break,
                    _ = recheck.tick() => None,
                    e = events.recv() => Some(e),
                };
                // The credential's own end (its token's exp) ends the watch too.
                if let Some(end) = caller.valid_until
                    && end.passed(broker.clock.now(), crate::broker::clock::system_now())
                {
                    let expired = crate::model::BrokerError::TokenExpired {
                        expires: end.at - crate::auth::CLOCK_SKEW,
                        now: broker.clock.now(),
                    };
                    let _ = tx.send(Err(to_status(expired))).await;
                    break;
                }
                if broker.epoch() != decided {
                    match broker.watch_access(&caller, &id) {
                        Ok(epoch) => decided = epoch,
                        Err(e) => {
                            let _ = tx.send(Err(to_status(e))).await;
                            break;
                        }
                    }
                }
                let msg = match item {
                    None => continue,
                    Some(Ok(e)) if e.database.server_id.to_ascii_lowercase() == id => {
                        Ok(proto::DatabaseStateEvent {
                            database: Some(database(&e.database)),
                            event: e.event.name().to_string(),
                            time: e.time,
                        })
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(tokio::sync::broadcast::error::RecvError::Lagged(n))) => {
                        Err(Status::data_loss(format!(
                            "the watcher fell {n} events behind; subscribe again and re-read the databases"
                        )))
                    }
                    Some(Err(tokio::sync::broadcast::error::RecvError::Closed)) => break,
                };
                let last = msg.is_err();
                if tx.send(msg).await.is_err() || last {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn issue_host_credential(
        &self,
        request: Request<proto::IssueHostCredentialRequest>,
    ) -> Result<Response<proto::IssueHostCredentialResponse>, Status> {
        let caller = caller(&request)?;
        let host = self.broker.server_host(&caller, &request.get_ref().server_id).map_err(to_status)?;
        let (token, expires_on) = self
            .auth
            .issue_user_token(
                &host,
                &[MANAGEMENT_AUDIENCE, VAULT_AUDIENCE],
                self.broker.settings.tde.host_token_lifetime,
            )
            .map_err(to_status)?;
        let (cert_pem, key_pem) = match self.dev_ca_dir.clone() {
            Some(dir) => {
                let oid = host.object_id.clone();
                tokio::task::spawn_blocking(move || crate::tls::issue_client_cert(&dir, &oid))
                    .await
                    .map_err(|_| to_status(BrokerError::Internal))?
                    .map_err(|e| {
                        tracing::error!(error = %e, "issuing the host client certificate failed");
                        to_status(BrokerError::Internal)
                    })?
            }
            None => (String::new(), String::new()),
        };
        Ok(Response::new(proto::IssueHostCredentialResponse { token, cert_pem, key_pem, expires_on }))
    }

    async fn setup_vault_kv_mount(
        &self,
        request: Request<proto::SetupVaultKvMountRequest>,
    ) -> Result<Response<proto::SetupVaultKvMountResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let s = self
            .broker
            .kv_setup(&caller, &r.server_id, &r.mount, &r.database, &r.key_ids)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::SetupVaultKvMountResponse {
            server_id: s.server_id,
            mount: s.mount,
            database: s.database,
            token: s.token.to_string(),
            created_key_ids: s.created,
            key_ids: s.keys,
        }))
    }

    async fn rotate_vault_kv_key(
        &self,
        request: Request<proto::RotateVaultKvKeyRequest>,
    ) -> Result<Response<proto::RotateVaultKvKeyResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let version =
            self.broker.kv_rotate_key(&caller, &r.server_id, &r.mount, r.key_id).await.map_err(to_status)?;
        Ok(Response::new(proto::RotateVaultKvKeyResponse { version }))
    }
}
