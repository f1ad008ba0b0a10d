//! `--seed FILE`: vaults and keys declared in TOML, created at start if missing (idempotent: an
//! existing vault or key is left exactly as it is).
//!
//! ```toml
//! [[vault]]
//! name = "contoso-kv"
//! enable_purge_protection = true   # default false
//! soft_delete_retention_days = 90  # default 90
//! enable_rbac_authorization = false
//! admin_access = true              # grant the admin every key permission (default true)
//!
//! [[vault.key]]
//! name = "tde-protector"
//! kty = "RSA"        # RSA, RSA-HSM, oct-HSM
//! size = 2048
//! key_ops = []       # empty = the type's defaults
//! expires = 1893456000
//! tags = { purpose = "tde" }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::broker::Broker;
use crate::broker::keys::{NewAttributes, NewKey, NewMaterial};
use crate::broker::vaults::VaultSpec;
use crate::model::ids::vault_name;
use crate::model::{Caller, KeyPermission, KeyType};

/// Why the seed file could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SeedError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The seed file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid seed (TOML syntax, unknown fields, wrong types).
    #[error("{path}: {source}")]
    Parse {
        /// The seed file.
        path: std::path::PathBuf,
        /// The parser's message, with the line and column.
        source: toml::de::Error,
    },
    /// Creating a declared vault or key failed (the broker's own error, with the cloud's text).
    #[error("{0}")]
    Broker(#[from] crate::model::BrokerError),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedFile {
    #[serde(default)]
    vault: Vec<SeedVault>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedVault {
    name: String,
    #[serde(default)]
    soft_delete_retention_days: i32,
    #[serde(default)]
    enable_purge_protection: bool,
    #[serde(default)]
    enable_rbac_authorization: bool,
    #[serde(default = "yes")]
    admin_access: bool,
    #[serde(default)]
    key: Vec<SeedKey>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedKey {
    name: String,
    kty: String,
    #[serde(default)]
    size: i32,
    #[serde(default)]
    key_ops: Vec<String>,
    enabled: Option<bool>,
    not_before: Option<i64>,
    expires: Option<i64>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

/// Applies the seed file as `caller` (the bootstrap admin).
pub async fn apply(broker: &Broker, caller: &Caller, path: &Path) -> Result<(), SeedError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| SeedError::Read { path: path.to_path_buf(), source })?;
    let seed: SeedFile =
        toml::from_str(&text).map_err(|source| SeedError::Parse { path: path.to_path_buf(), source })?;
    for v in seed.vault {
        let name = vault_name(&v.name)?;
        if broker.read().deleted_vaults.contains_key(&name) {
            // An operator deleted it: the seed neither recreates it (the name is taken until it
            // is purged) nor refuses to start.
            tracing::warn!(vault = %name, "seed: the vault is soft-deleted; recover or purge it (tde-broker vault deleted); skipped");
            continue;
        }
        let exists = broker.read().vaults.contains_key(&name);
        if !exists {
            broker
                .create_vault(
                    caller,
                    VaultSpec {
                        name: name.clone(),
                        retention_days: v.soft_delete_retention_days,
                        purge_protection: v.enable_purge_protection,
                        rbac: v.enable_rbac_authorization,
                        network_acls: None,
                        public_network_access: true,
                    },
                )
                .await?;
            if v.admin_access {
                let all: Vec<String> = KeyPermission::ALL.iter().map(|p| p.name().to_string()).collect();
                broker.set_access_policy(caller, &name, &caller.object_id, &all).await?;
            }
            tracing::info!(vault = %name, "seed: created vault");
        }
        for k in v.key {
            let present = broker.read().vault(&name)?.key(&k.name).is_some();
            if present {
                continue;
            }
            broker
                .add_key_version(
                    caller,
                    NewKey {
                        vault: name.clone(),
                        name: k.name.clone(),
                        material: NewMaterial::Generate {
                            kty: KeyType::parse(&k.kty)?,
                            size: k.size,
                            curve: None,
                        },
                        key_ops: k.key_ops,
                        attributes: NewAttributes {
                            enabled: k.enabled,
                            not_before: k.not_before,
                            expires: k.expires,
                        },
                        tags: k.tags,
                    },
                )
                .await?;
            tracing::info!(vault = %name, key = %k.name, "seed: created key");
        }
    }
    Ok(())
}
