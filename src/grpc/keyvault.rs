//! The `KeyVault` service: the Key Vault keys data plane.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{bundle, deleted_bundle, item, rotation_policy};
use super::proto::{self, key_vault_server::KeyVault};
use super::{caller, to_status};
use crate::broker::Broker;
use crate::broker::keys::{CryptoRequest, KeyUpdate, NewAttributes, NewKey, NewMaterial, SignRequest};
use crate::crypto;
use crate::model::rotation::LifetimeActionSpec;
use crate::model::{BrokerError, CryptoOp, Curve, KeyType, SignOp};

/// The service implementation.
pub struct KeyVaultService {
    broker: Arc<Broker>,
}

impl KeyVaultService {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        KeyVaultService { broker }
    }

    /// CreateKey or ImportKey: a new key, or a new version of an existing one.
    async fn add_key_version(
        &self,
        caller: &crate::model::Caller,
        key: NewKey,
    ) -> Result<Response<proto::KeyBundle>, Status> {
        let v = self.broker.add_key_version(caller, key).await.map_err(to_status)?;
        Ok(Response::new(bundle(v)))
    }

    /// Any of the four crypto RPCs: the caller, then the broker's hot path.
    async fn crypto<M: Into<CryptoRequest> + Send + 'static>(
        &self,
        request: Request<M>,
    ) -> Result<Response<proto::KeyOperationResult>, Status> {
        let caller = caller(&request)?;
        let mut r = self.broker.crypto(&caller, request.into_inner().into()).await.map_err(to_status)?;
        Ok(Response::new(proto::KeyOperationResult {
            kid: r.kid,
            // Moved, not copied: one plaintext copy fewer in memory (the message itself, like
            // the encoder's buffer, is tonic's and is not wiped).
            value: std::mem::take(&mut *r.value),
            iv: r.iv,
            tag: r.tag,
        }))
    }
}

fn new_attributes(a: Option<proto::KeyAttributes>) -> NewAttributes {
    a.map(|a| NewAttributes { enabled: a.enabled, not_before: a.not_before, expires: a.expires })
        .unwrap_or_default()
}

fn tags(t: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    t.into_iter().collect()
}

fn import_material(r: &proto::ImportKeyRequest) -> Result<crypto::ImportedKey, BrokerError> {
    let given = [!r.pkcs8_der.is_empty(), !r.pem.is_empty(), !r.jwk_json.is_empty()];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(BrokerError::bad_parameter("ImportKey needs exactly one of pkcs8_der, pem or jwk_json."));
    }
    let imported = if !r.pkcs8_der.is_empty() {
        crypto::import_pkcs8_der(&r.pkcs8_der)
    } else if !r.pem.is_empty() {
        crypto::import_pem(&r.pem)
    } else {
        crypto::import_jwk(&r.jwk_json)
    };
    imported.map_err(|e| BrokerError::bad_parameter(format!("The key to import is invalid: {e}.")))
}

/// CreateKey and ImportKey requests carry the same fields beside their material.
macro_rules! new_key {
    ($r:ident, $material:expr) => {
        NewKey {
            vault: $r.vault_name,
            name: $r.name,
            material: $material,
            key_ops: $r.key_ops,
            attributes: new_attributes($r.attributes),
            tags: tags($r.tags),
        }
    };
}

/// The four crypto requests (WrapKey, UnwrapKey, Encrypt, Decrypt) carry the same fields.
macro_rules! crypto_request_from {
    ($($message:ty => $op:expr),+ $(,)?) => {$(
        impl From<$message> for CryptoRequest {
            fn from(r: $message) -> Self {
                CryptoRequest {
                    op: $op,
                    key_id: r.key_id,
                    algorithm: r.algorithm,
                    value: r.value,
                    iv: r.iv,
                    aad: r.aad,
                    tag: r.tag,
                }
            }
        }
    )+};
}

crypto_request_from! {
    proto::WrapKeyRequest => CryptoOp::WrapKey,
    proto::UnwrapKeyRequest => CryptoOp::UnwrapKey,
    proto::EncryptRequest => CryptoOp::Encrypt,
    proto::DecryptRequest => CryptoOp::Decrypt,
}

#[tonic::async_trait]
impl KeyVault for KeyVaultService {
    async fn create_key(
        &self,
        request: Request<proto::CreateKeyRequest>,
    ) -> Result<Response<proto::KeyBundle>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let kty = KeyType::parse(&r.kty).map_err(to_status)?;
        let curve = if r.crv.is_empty() { None } else { Some(Curve::parse(&r.crv).map_err(to_status)?) };
        self.add_key_version(&caller, new_key!(r, NewMaterial::Generate { kty, size: r.key_size, curve }))
            .await
    }

    async fn import_key(
        &self,
        request: Request<proto::ImportKeyRequest>,
    ) -> Result<Response<proto::KeyBundle>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let key = import_material(&r).map_err(to_status)?;
        self.add_key_version(&caller, new_key!(r, NewMaterial::Import { key, hsm: r.hsm })).await
    }

    async fn get_key(
        &self,
        request: Request<proto::GetKeyRequest>,
    ) -> Result<Response<proto::KeyBundle>, Status> {
        let caller = caller(&request)?;
        let v = self.broker.get_key(&caller, &request.get_ref().key_id).map_err(to_status)?;
        Ok(Response::new(bundle(v)))
    }

    async fn list_keys(
        &self,
        request: Request<proto::ListKeysRequest>,
    ) -> Result<Response<proto::ListKeysResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let (items, next) =
            self.broker.list_keys(&caller, &r.vault_name, r.page_size, &r.page_token).map_err(to_status)?;
        Ok(Response::new(proto::ListKeysResponse {
            keys: items.into_iter().map(item).collect(),
            next_page_token: next,
        }))
    }

    async fn list_key_versions(
        &self,
        request: Request<proto::ListKeyVersionsRequest>,
    ) -> Result<Response<proto::ListKeyVersionsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let (items, next) = self
            .broker
            .list_key_versions(&caller, &r.key_id, r.page_size, &r.page_token)
            .map_err(to_status)?;
        Ok(Response::new(proto::ListKeyVersionsResponse {
            keys: items.into_iter().map(item).collect(),
            next_page_token: next,
        }))
    }

    async fn update_key(
        &self,
        request: Request<proto::UpdateKeyRequest>,
    ) -> Result<Response<proto::KeyBundle>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let update = KeyUpdate {
            enabled: r.enabled,
            not_before: r.not_before,
            expires: r.expires,
            clear_not_before: r.clear_not_before,
            clear_expires: r.clear_expires,
            key_ops: r.key_ops,
            tags: (!r.tags.is_empty()).then(|| tags(r.tags)),
        };
        let v = self.broker.update_key(&caller, &r.key_id, update).await.map_err(to_status)?;
        Ok(Response::new(bundle(v)))
    }

    async fn rotate_key(
        &self,
        request: Request<proto::RotateKeyRequest>,
    ) -> Result<Response<proto::KeyBundle>, Status> {
        let caller = caller(&request)?;
        let v = self.broker.rotate_key(&caller, &request.get_ref().key_id).await.map_err(to_status)?;
        Ok(Response::new(bundle(v)))
    }

    async fn get_key_rotation_policy(
        &self,
        request: Request<proto::GetKeyRotationPolicyRequest>,
    ) -> Result<Response<proto::KeyRotationPolicy>, Status> {
        let caller = caller(&request)?;
        let v = self.broker.get_key_rotation_policy(&caller, &request.get_ref().key_id).map_err(to_status)?;
        Ok(Response::new(rotation_policy(v)))
    }

    async fn update_key_rotation_policy(
        &self,
        request: Request<proto::UpdateKeyRotationPolicyRequest>,
    ) -> Result<Response<proto::KeyRotationPolicy>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let policy = r.policy.clone().unwrap_or_default();
        let actions: Vec<LifetimeActionSpec> = policy
            .lifetime_actions
            .into_iter()
            .map(|a| LifetimeActionSpec {
                action: a.action,
                time_after_create: a.time_after_create,
                time_before_expiry: a.time_before_expiry,
            })
            .collect();
        let v = self
            .broker
            .update_key_rotation_policy(&caller, &r.key_id, &policy.expiry_time, &actions)
            .await
            .map_err(to_status)?;
        Ok(Response::new(rotation_policy(v)))
    }

    async fn delete_key(
        &self,
        request: Request<proto::DeleteKeyRequest>,
    ) -> Result<Response<proto::DeletedKeyBundle>, Status> {
        let caller = caller(&request)?;
        let v = self.broker.delete_key(&caller, &request.get_ref().key_id).await.map_err(to_status)?;
        Ok(Response::new(deleted_bundle(v)))
    }

    async fn get_deleted_key(
        &self,
        request: Request<proto::GetDeletedKeyRequest>,
    ) -> Result<Response<proto::DeletedKeyBundle>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let v = self.broker.get_deleted_key(&caller, &r.vault_name, &r.name).map_err(to_status)?;
        Ok(Response::new(deleted_bundle(v)))
    }

    async fn list_deleted_keys(
        &self,
        request: Request<proto::ListDeletedKeysRequest>,
    ) -> Result<Response<proto::ListDeletedKeysResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let (items, next) = self
            .broker
            .list_deleted_keys(&caller, &r.vault_name, r.page_size, &r.page_token)
            .map_err(to_status)?;
        Ok(Response::new(proto::ListDeletedKeysResponse {
            keys: items.into_iter().map(deleted_bundle).collect(),
            next_page_token: next,
        }))
    }

    async fn recover_deleted_key(
        &self,
        request: Request<proto::RecoverDeletedKeyRequest>,
    ) -> Result<Response<proto::KeyBundle>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let v = self.broker.recover_deleted_key(&caller, &r.vault_name, &r.name).await.map_err(to_status)?;
        Ok(Response::new(bundle(v)))
    }

    async fn purge_deleted_key(
        &self,
        request: Request<proto::PurgeDeletedKeyRequest>,
    ) -> Result<Response<proto::PurgeDeletedKeyResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        self.broker.purge_deleted_key(&caller, &r.vault_name, &r.name).await.map_err(to_status)?;
        Ok(Response::new(proto::PurgeDeletedKeyResponse {}))
    }

    async fn backup_key(
        &self,
        request: Request<proto::BackupKeyRequest>,
    ) -> Result<Response<proto::BackupKeyResponse>, Status> {
        let caller = caller(&request)?;
        let blob = self.broker.backup_key(&caller, &request.get_ref().key_id).await.map_err(to_status)?;
        Ok(Response::new(proto::BackupKeyResponse { blob }))
    }

    async fn restore_key(
        &self,
        request: Request<proto::RestoreKeyRequest>,
    ) -> Result<Response<proto::KeyBundle>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let v = self.broker.restore_key(&caller, &r.vault_name, &r.blob).await.map_err(to_status)?;
        Ok(Response::new(bundle(v)))
    }

    async fn wrap_key(
        &self,
        request: Request<proto::WrapKeyRequest>,
    ) -> Result<Response<proto::KeyOperationResult>, Status> {
        self.crypto(request).await
    }

    async fn unwrap_key(
        &self,
        request: Request<proto::UnwrapKeyRequest>,
    ) -> Result<Response<proto::KeyOperationResult>, Status> {
        self.crypto(request).await
    }

    async fn encrypt(
        &self,
        request: Request<proto::EncryptRequest>,
    ) -> Result<Response<proto::KeyOperationResult>, Status> {
        self.crypto(request).await
    }

    async fn decrypt(
        &self,
        request: Request<proto::DecryptRequest>,
    ) -> Result<Response<proto::KeyOperationResult>, Status> {
        self.crypto(request).await
    }

    async fn sign(
        &self,
        request: Request<proto::SignRequest>,
    ) -> Result<Response<proto::KeyOperationResult>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let req = SignRequest {
            op: SignOp::Sign,
            key_id: r.key_id,
            algorithm: r.algorithm,
            digest: r.digest,
            signature: Vec::new(),
        };
        let result = self.broker.sign_or_verify(&caller, req).await.map_err(to_status)?;
        Ok(Response::new(proto::KeyOperationResult {
            kid: result.kid,
            value: result.signature,
            iv: Vec::new(),
            tag: Vec::new(),
        }))
    }

    async fn verify(
        &self,
        request: Request<proto::VerifyRequest>,
    ) -> Result<Response<proto::VerifyResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let req = SignRequest {
            op: SignOp::Verify,
            key_id: r.key_id,
            algorithm: r.algorithm,
            digest: r.digest,
            signature: r.signature,
        };
        let result = self.broker.sign_or_verify(&caller, req).await.map_err(to_status)?;
        Ok(Response::new(proto::VerifyResponse { valid: result.valid }))
    }

    async fn get_random_bytes(
        &self,
        request: Request<proto::GetRandomBytesRequest>,
    ) -> Result<Response<proto::GetRandomBytesResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let value = self.broker.random_bytes(&caller, &r.vault_name, r.count).await.map_err(to_status)?;
        Ok(Response::new(proto::GetRandomBytesResponse { value }))
    }
}
