//! Creating, importing, reading, listing, updating and rotating keys.

use super::{KeyItemView, KeyUpdate, KeyView, Made, NewKey, NewMaterial, blocking, crypto_error, paginate};
use crate::broker::Broker;
use crate::broker::state::material_aad;
use crate::crypto::{ImportedKey, Zbytes};
use crate::model::ids::{key_name, key_uri, vault_name};
use crate::model::key::{validate_tags, validate_window};
use crate::model::{
    BrokerError, Caller, Change, Curve, KeyAttributes, KeyOp, KeyPermission, KeyType, KeyVersion,
};

/// Who makes a new key version.
pub(super) enum Authority<'a> {
    /// A caller, checked at the data-plane gate for this permission.
    Caller(&'a Caller, KeyPermission),
    /// The key's rotation policy, carried out by the service itself (no caller to check): the
    /// newest version must still be `after`.
    Policy {
        /// The version id that was found due.
        after: &'a str,
    },
}

impl Broker {
    /// CreateKey and ImportKey: a new key, or a new version of an existing one.
    pub async fn add_key_version(&self, caller: &Caller, req: NewKey) -> Result<KeyView, BrokerError> {
        let vault = vault_name(&req.vault)?;
        self.fault_delay(&vault).await;
        let name = key_name(&req.name)?.to_string();
        let permission = match req.material {
            NewMaterial::Generate { .. } => KeyPermission::Create,
            NewMaterial::Import { .. } => KeyPermission::Import,
        };
        {
            let st = self.read();
            let ve = st.vault(&vault)?;
            self.gate(&st, ve, caller, permission, Some(&name))?;
            self.admit_create(&vault, req.material.key_type())?;
            if let Some(k) = ve.key(&name)
                && k.key.deleted.is_some()
            {
                return Err(BrokerError::KeyDeletedButRecoverable { name: k.key.name.clone() });
            }
        }
        validate_tags(&req.tags)?;
        validate_window(req.attributes.not_before, req.attributes.expires)?;
        // Material first (RSA generation takes up to seconds), outside every lock.
        let made = match req.material {
            NewMaterial::Generate { kty, size, curve } => {
                let (bits, curve) = if kty.is_ec() {
                    if size != 0 {
                        return Err(BrokerError::bad_parameter(format!(
                            "The key size applies to RSA and oct-HSM keys; a key of type {} takes its size from its curve (crv).",
                            kty.name()
                        )));
                    }
                    let curve = curve.unwrap_or(Curve::P256);
                    (curve.bits(), curve)
                } else if curve.is_some() {
                    return Err(BrokerError::bad_parameter(format!(
                        "The curve (crv) applies to EC and EC-HSM keys only, not to key type {}.",
                        kty.name()
                    )));
                } else {
                    (kty.size(size)?, Curve::P256)
                };
                blocking(move || Made::generate(kty, bits, curve)).await?
            }
            NewMaterial::Import { key: ImportedKey::Rsa(der), hsm } => {
                let kty = if hsm { KeyType::RsaHsm } else { KeyType::Rsa };
                blocking(move || Made::rsa(kty, der)).await?
            }
            NewMaterial::Import { key: ImportedKey::Ec(_, der), hsm } => {
                let kty = if hsm { KeyType::EcHsm } else { KeyType::Ec };
                blocking(move || Made::ec(kty, der)).await?
            }
            NewMaterial::Import { key: ImportedKey::Oct(raw), .. } => {
                let bits = (raw.len() * 8) as u32;
                Made {
                    kty: KeyType::OctHsm,
                    bits,
                    plain: raw,
                    n: vec![],
                    e: vec![],
                    crv: None,
                    x: vec![],
                    y: vec![],
                }
            }
        };
        let key_ops = KeyOp::parse_list(&req.key_ops, made.kty)?;
        let now = self.clock.now();
        let attributes = KeyAttributes {
            enabled: req.attributes.enabled.unwrap_or(true),
            not_before: req.attributes.not_before,
            expires: req.attributes.expires,
            created: now,
            updated: now,
        };
        let (meta, plain) = made.version(key_ops, attributes, req.tags);
        self.commit_new_version(Authority::Caller(caller, permission), &vault, &name, meta, plain).await
    }

    /// Seals and commits a new version, re-checking under the writer lock what may have changed
    /// while the material was being made.
    pub(super) async fn commit_new_version(
        &self,
        authority: Authority<'_>,
        vault: &str,
        name: &str,
        meta: KeyVersion,
        plain: Zbytes,
    ) -> Result<KeyView, BrokerError> {
        let txn = self.begin().await;
        let (stored_name, view) = {
            let st = self.read();
            let ve = st.vault(vault)?;
            match authority {
                Authority::Caller(caller, permission) => {
                    self.gate(&st, ve, caller, permission, Some(name))?
                }
                Authority::Policy { after } => {
                    // The service's own rotation: only if the newest version is still the one
                    // found due (a concurrent rotation, delete or purge wins).
                    let current =
                        ve.key(name).filter(|k| k.key.deleted.is_none()).and_then(|k| k.key.latest());
                    if current.is_none_or(|v| v.version != after) {
                        return Err(BrokerError::KeyNotFound { name_or_id: name.to_string() });
                    }
                }
            }
            let stored_name = match ve.key(name) {
                Some(k) if k.key.deleted.is_some() => {
                    return Err(BrokerError::KeyDeletedButRecoverable { name: k.key.name.clone() });
                }
                Some(k) => k.key.name.clone(),
                None => name.to_string(),
            };
            let view = self.view(ve, &stored_name, &meta);
            (stored_name, view)
        };
        let sealed = self
            .sealer()
            .seal(material_aad(vault, &stored_name, &meta.version).as_bytes(), &plain)
            .map_err(crypto_error)?;
        self.commit(
            txn,
            vec![Change::PutKeyVersion {
                vault: vault.to_string(),
                name: stored_name,
                version: meta,
                sealed: Some(sealed),
            }],
        )
        .await?;
        Ok(view)
    }

    /// GetKey.
    pub fn get_key(&self, caller: &Caller, key_id: &str) -> Result<KeyView, BrokerError> {
        let id = self.parse_key_id(key_id)?;
        let st = self.read();
        let ve = st.vault(&id.vault)?;
        self.gate(&st, ve, caller, KeyPermission::Get, Some(id.name))?;
        let (k, v) = Self::active_version(ve, &id)?;
        Ok(self.view(ve, &k.key.name, v))
    }

    /// ListKeys: active keys, newest version's attributes, unversioned kids, paged by name.
    pub fn list_keys(
        &self,
        caller: &Caller,
        vault: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<KeyItemView>, String), BrokerError> {
        let vault = vault_name(vault)?;
        let st = self.read();
        let ve = st.vault(&vault)?;
        self.gate(&st, ve, caller, KeyPermission::List, None)?;
        let items = ve.keys.iter().filter(|(_, k)| k.key.deleted.is_none()).filter_map(|(idx, k)| {
            k.key.latest().map(|v| {
                (
                    idx.clone(),
                    KeyItemView {
                        kid: key_uri(&vault, &self.settings.vault_dns_suffix, &k.key.name, None),
                        version: v.clone(),
                        recoverable_days: ve.vault.retention_days,
                        recovery_level: ve.vault.recovery_level(),
                    },
                )
            })
        });
        paginate(items, page_size, page_token)
    }

    /// ListKeyVersions: every version of an active key, versioned kids, oldest first.
    pub fn list_key_versions(
        &self,
        caller: &Caller,
        key_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<KeyItemView>, String), BrokerError> {
        let id = self.parse_key_id(key_id)?;
        let st = self.read();
        let ve = st.vault(&id.vault)?;
        self.gate(&st, ve, caller, KeyPermission::List, Some(id.name))?;
        let k = Self::active_key(ve, id.name)?;
        let items = k.key.versions.iter().enumerate().map(|(i, v)| {
            (
                format!("{i:08}"),
                KeyItemView {
                    kid: key_uri(&id.vault, &self.settings.vault_dns_suffix, &k.key.name, Some(&v.version)),
                    version: v.clone(),
                    recoverable_days: ve.vault.retention_days,
                    recovery_level: ve.vault.recovery_level(),
                },
            )
        });
        paginate(items, page_size, page_token)
    }

    /// UpdateKey: attributes, key_ops and tags of one version; never the material.
    pub async fn update_key(
        &self,
        caller: &Caller,
        key_id: &str,
        update: KeyUpdate,
    ) -> Result<KeyView, BrokerError> {
        let id = self.parse_key_id(key_id)?;
        self.fault_delay(&id.vault).await;
        let txn = self.begin().await;
        let (name, view) = {
            let st = self.read();
            let ve = st.vault(&id.vault)?;
            self.gate(&st, ve, caller, KeyPermission::Update, Some(id.name))?;
            let (k, v) = Self::active_version(ve, &id)?;
            let mut v = v.clone();
            if let Some(en) = update.enabled {
                v.attributes.enabled = en;
            }
            if update.clear_not_before {
                v.attributes.not_before = None;
            }
            if let Some(nbf) = update.not_before {
                v.attributes.not_before = Some(nbf);
            }
            if update.clear_expires {
                v.attributes.expires = None;
            }
            if let Some(exp) = update.expires {
                v.attributes.expires = Some(exp);
            }
            validate_window(v.attributes.not_before, v.attributes.expires)?;
            if !update.key_ops.is_empty() {
                v.key_ops = KeyOp::parse_list(&update.key_ops, v.kty)?;
            }
            if let Some(tags) = update.tags {
                validate_tags(&tags)?;
                v.tags = tags;
            }
            v.attributes.updated = self.clock.now();
            (k.key.name.clone(), self.view(ve, &k.key.name, &v))
        };
        self.commit(
            txn,
            vec![Change::PutKeyVersion {
                vault: id.vault.into_owned(),
                name,
                version: view.version.clone(),
                sealed: None,
            }],
        )
        .await?;
        Ok(view)
    }

    /// RotateKey: a new version of the same type and size, with the newest version's key_ops
    /// and tags, enabled, without nbf, and with `exp` = now + the rotation policy's expiry time
    /// when the key's policy has one (else without exp).
    pub async fn rotate_key(&self, caller: &Caller, key_id: &str) -> Result<KeyView, BrokerError> {
        let id = self.parse_key_id(key_id)?;
        if id.version.is_some() {
            return Err(BrokerError::bad_parameter("RotateKey takes a key identifier without a version."));
        }
        self.fault_delay(&id.vault).await;
        let (latest, policy) = {
            let st = self.read();
            let ve = st.vault(&id.vault)?;
            self.gate(&st, ve, caller, KeyPermission::Rotate, Some(id.name))?;
            let (k, v) = Self::active_version(ve, &id)?;
            self.admit_create(&id.vault, v.kty)?;
            (v.clone(), k.rotation_policy.clone())
        };
        let (meta, plain) = self.rotated_version(latest, policy.as_ref()).await?;
        self.commit_new_version(
            Authority::Caller(caller, KeyPermission::Rotate),
            &id.vault,
            id.name,
            meta,
            plain,
        )
        .await
    }

    /// A new version to follow `latest`: same type, size, key_ops and tags, fresh material,
    /// enabled, created now, `exp` from the rotation policy's expiry time.
    pub(super) async fn rotated_version(
        &self,
        latest: KeyVersion,
        policy: Option<&crate::model::KeyRotationPolicy>,
    ) -> Result<(KeyVersion, Zbytes), BrokerError> {
        let (kty, bits, curve) = (latest.kty, latest.bits, latest.crv.unwrap_or(Curve::P256));
        let made = blocking(move || Made::generate(kty, bits, curve)).await?;
        let now = self.clock.now();
        let attributes = KeyAttributes {
            enabled: true,
            not_before: None,
            expires: policy.and_then(|p| p.expiry_from(now)),
            created: now,
            updated: now,
        };
        Ok(made.version(latest.key_ops, attributes, latest.tags))
    }
}
