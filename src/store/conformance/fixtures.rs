//! Fixtures of the conformance suite: records whose every field differs from its default and
//! from one fixture number to the next, and helpers that commit and reload them.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::server::{Database, DbState, Protector, Reason, Server, ServerIdentity, ServerKind};
use crate::model::vault::Subnet;
use crate::model::{
    Change, Curve, Deletion, KeyAttributes, KeyOp, KeyPermission, KeyType, KeyVersion, NetworkAcls,
    Principal, PrincipalKind, Role, RoleAssignment, Vault,
};
use crate::store::{Rejection, Snapshot, Store, StoreError, StoredKey};

// ---------------------------------------------------------------------------------------------
// Fixtures: records whose every field differs from its default and between two values of `n`
// ---------------------------------------------------------------------------------------------

pub(super) fn subnet_id(name: &str) -> String {
    format!(
        "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/vnet/subnets/{name}"
    )
}

pub(super) fn server_id(name: &str) -> String {
    format!(
        "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Sql/servers/{name}"
    )
}

pub(super) fn odd(n: i64) -> bool {
    n % 2 == 1
}

pub(super) fn vault(name: &str, n: i64) -> Vault {
    let permissions = if odd(n) {
        BTreeSet::from([KeyPermission::Get, KeyPermission::WrapKey, KeyPermission::UnwrapKey])
    } else {
        BTreeSet::from(KeyPermission::ALL)
    };
    Vault {
        name: name.into(),
        retention_days: 7 + n as i32,
        purge_protection: odd(n),
        rbac: !odd(n),
        network_acls: NetworkAcls {
            default_allow: !odd(n),
            bypass_azure_services: odd(n),
            ip_rules: vec![format!("10.{n}.0.0/16"), format!("192.0.2.{n}/32")],
            virtual_network_rules: vec![subnet_id(&format!("rule{n}"))],
        },
        public_network_access: !odd(n),
        access_policies: BTreeMap::from([(format!("00000000-0000-0000-0000-00000000000{n}"), permissions)]),
        private_endpoints: vec![subnet_id(&format!("pe{n}"))],
        created: 1_700_000_000 + n,
    }
}

pub(super) fn version(id: &str, n: i64) -> KeyVersion {
    let kty = if odd(n) { KeyType::RsaHsm } else { KeyType::Rsa };
    let byte = n as u8;
    KeyVersion {
        version: id.into(),
        kty,
        bits: if odd(n) { 3072 } else { 4096 },
        key_ops: if odd(n) { vec![KeyOp::WrapKey, KeyOp::UnwrapKey] } else { kty.default_ops() },
        attributes: KeyAttributes {
            enabled: odd(n),
            not_before: Some(100 + n),
            expires: Some(10_000 + n),
            created: 10 + n,
            updated: 20 + n,
        },
        tags: BTreeMap::from([(format!("tag{n}"), format!("value {n}")), ("env".into(), format!("e{n}"))]),
        n: vec![0xC0 | byte, 1, 2, byte],
        e: vec![1, 0, byte],
        crv: None,
        x: vec![],
        y: vec![],
    }
}

/// An EC-HSM version: a curve and a public point, no RSA parts.
pub(super) fn ec_version(id: &str) -> KeyVersion {
    KeyVersion {
        version: id.into(),
        kty: KeyType::EcHsm,
        bits: 384,
        key_ops: KeyType::EcHsm.default_ops(),
        attributes: KeyAttributes {
            enabled: true,
            not_before: None,
            expires: Some(50),
            created: 5,
            updated: 6,
        },
        tags: BTreeMap::from([("curve".into(), "p384".into())]),
        n: vec![],
        e: vec![],
        crv: Some(Curve::P384),
        x: (0..48).collect(),
        y: (48..96).collect(),
    }
}

/// An oct-HSM version: no public parts, no optional attributes.
pub(super) fn oct_version(id: &str) -> KeyVersion {
    KeyVersion {
        version: id.into(),
        kty: KeyType::OctHsm,
        bits: 256,
        key_ops: KeyType::OctHsm.default_ops(),
        attributes: KeyAttributes { enabled: true, not_before: None, expires: None, created: 3, updated: 4 },
        tags: BTreeMap::new(),
        n: vec![],
        e: vec![],
        crv: None,
        x: vec![],
        y: vec![],
    }
}

/// Sealed material that tells versions apart and holds every byte value.
pub(super) fn material(seed: u8) -> Vec<u8> {
    (0..=255u8).chain([seed, seed]).map(|b| b ^ seed).collect()
}

pub(super) fn create(vault: &str, name: &str, version: KeyVersion, sealed: Vec<u8>) -> Change {
    Change::PutKeyVersion { vault: vault.into(), name: name.into(), version, sealed: Some(sealed) }
}

pub(super) fn update(vault: &str, name: &str, version: KeyVersion) -> Change {
    Change::PutKeyVersion { vault: vault.into(), name: name.into(), version, sealed: None }
}

pub(super) fn set_deleted(vault: &str, name: &str, deleted: Option<Deletion>) -> Change {
    Change::SetKeyDeletion { vault: vault.into(), name: name.into(), deleted }
}

pub(super) fn set_vault_deleted(vault: &str, deleted: Option<Deletion>) -> Change {
    Change::SetVaultDeletion { vault: vault.into(), deleted }
}

pub(super) fn purge(vault: &str, name: &str) -> Change {
    Change::PurgeKey { vault: vault.into(), name: name.into() }
}

pub(super) fn deletion(n: i64) -> Deletion {
    Deletion { deleted_date: 1_000 + n, scheduled_purge_date: 2_000 + n }
}

pub(super) fn principal(object_id: &str, n: i64) -> Principal {
    Principal {
        object_id: object_id.into(),
        app_id: format!("app-{n}"),
        name: format!("principal {n}"),
        kind: if odd(n) { PrincipalKind::UserAssignedIdentity } else { PrincipalKind::ServerHost },
        resource_id: odd(n).then(|| format!("/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id{n}")),
        created: 50 + n,
        client_secret_hash: (!odd(n)).then(|| format!("{n:064x}")),
    }
}

pub(super) fn role_assignment(id: &str, n: i64) -> RoleAssignment {
    RoleAssignment {
        id: id.into(),
        scope: format!("/subscriptions/s{n}"),
        display_scope: format!("https://v{n}.vault.azure.net/keys/k"),
        principal_id: format!("principal-{n}"),
        role: if odd(n) { Role::KeyVaultCryptoServiceEncryptionUser } else { Role::Owner },
    }
}

pub(super) fn subnet(id: &str, n: i64) -> Subnet {
    Subnet { id: id.into(), prefixes: vec![format!("10.{n}.1.0/24"), format!("10.{n}.2.0/24")] }
}

pub(super) fn server(id: &str, n: i64) -> Server {
    let umi = format!(
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u{n}"
    );
    Server {
        id: id.into(),
        name: format!("server{n}"),
        kind: if odd(n) { ServerKind::ManagedInstance } else { ServerKind::SqlServer },
        identity: ServerIdentity {
            system_principal_id: Some(format!("smi-{n}")),
            user_assigned: vec![umi.clone()],
            primary: Some(umi),
        },
        protector: if odd(n) {
            Protector::AzureKeyVault {
                key_id: format!("https://v{n}.vault.azure.net/keys/k"),
                kid: format!("https://v{n}.vault.azure.net/keys/k/{}", "0".repeat(32)),
                auto_rotation: true,
            }
        } else {
            Protector::ServiceManaged
        },
        subnet_id: Some(subnet_id(&format!("mi{n}"))),
        host_principal_id: format!("host-{n}"),
        created: 70 + n,
        kv_mounts: Vec::new(),
    }
}

pub(super) fn database(server_id: &str, name: &str, n: i64) -> Database {
    Database {
        server_id: server_id.into(),
        name: name.into(),
        state: if odd(n) { DbState::Inaccessible } else { DbState::Online },
        reason: odd(n).then_some(Reason::KeyDisabled),
        state_since: 90 + n,
        lost_at: odd(n).then_some(80 + n),
    }
}

/// One record of every kind, keys with several versions, one key and one vault soft-deleted.
pub(super) fn one_of_everything() -> Vec<Change> {
    vec![
        Change::PutVault(vault("v1", 1)),
        Change::PutVault(vault("v2", 2)),
        create("v1", "Key1", version("b1", 1), material(1)),
        create("v1", "Key1", version("a1", 2), material(2)),
        create("v1", "key2", oct_version("c1"), material(3)),
        set_deleted("v1", "KEY2", Some(deletion(1))),
        create("v2", "key1", version("d1", 3), material(4)),
        set_vault_deleted("v2", Some(deletion(2))),
        Change::PutPrincipal(principal("p1", 1)),
        Change::PutPrincipal(principal("p2", 2)),
        Change::PutRoleAssignment(role_assignment("r1", 1)),
        Change::PutRoleAssignment(role_assignment("r2", 2)),
        Change::PutSubnet(subnet(&subnet_id("s1"), 1)),
        Change::PutServer(server(&server_id("srv1"), 1)),
        Change::PutServer(server(&server_id("srv2"), 2)),
        Change::PutDatabase(database(&server_id("srv1"), "db1", 1)),
        Change::PutDatabase(database(&server_id("srv2"), "db1", 2)),
    ]
}

/// A snapshot with the lists whose order the contract leaves open sorted.
pub(super) fn sorted(mut snap: Snapshot) -> Snapshot {
    snap.principals.sort_by(|a, b| a.object_id.cmp(&b.object_id));
    snap.role_assignments.sort_by(|a, b| a.id.cmp(&b.id));
    snap
}

pub(super) fn load(store: &dyn Store) -> Result<Snapshot, StoreError> {
    store.load().map(sorted)
}

/// Commits [`one_of_everything`] and returns what the store then holds.
pub(super) fn seed(store: &dyn Store) -> Result<Snapshot, StoreError> {
    store.commit(&one_of_everything())?;
    load(store)
}

/// A stored key as the suite expects it back.
pub(super) fn stored(
    vault: &str,
    name: &str,
    deleted: Option<Deletion>,
    versions: Vec<(KeyVersion, Vec<u8>)>,
) -> StoredKey {
    StoredKey { vault: vault.into(), name: name.into(), deleted, versions }
}

/// Vault `v1` and, in order, the versions `(key name, version, material seed)` created in it.
pub(super) fn in_v1<const N: usize>(versions: [(&str, KeyVersion, u8); N]) -> Vec<Change> {
    let mut changes = vec![Change::PutVault(vault("v1", 1))];
    changes.extend(versions.into_iter().map(|(name, v, seed)| create("v1", name, v, material(seed))));
    changes
}

/// A key of vault `v1`, not deleted, as the suite expects it back: `(version, material seed)`.
pub(super) fn v1_key<const N: usize>(name: &str, versions: [(KeyVersion, u8); N]) -> StoredKey {
    stored("v1", name, None, versions.into_iter().map(|(v, seed)| (v, material(seed))).collect())
}

pub(super) fn version_ids(key: &StoredKey) -> Vec<&str> {
    key.versions.iter().map(|(v, _)| v.version.as_str()).collect()
}

/// Commits `changes`, expects the refusal `expected`, and checks that nothing changed.
pub(super) fn assert_refused(
    store: &dyn Store,
    changes: &[Change],
    expected: Rejection,
) -> Result<(), StoreError> {
    let before = load(store)?;
    match store.commit(changes) {
        Err(StoreError::Rejected(r)) => assert_eq!(r, expected),
        other => panic!("expected the refusal {expected:?}, got {other:?}"),
    }
    assert_eq!(load(store)?, before, "a refused commit changed the store");
    Ok(())
}
