//! docs/RULES.md R6.1: the reference-model property test. Random interleavings of access-policy,
//! role, identity, key-state, permission-model and network changes, and of the vault's soft
//! delete, recovery and purge, with wrap/unwrap/get calls from several principals and source
//! addresses; every answer of the running broker (over real gRPC, caches on) must equal what a
//! small, independent model of the rules says. No stale allow.
//!
//! A bounded run is part of the test suite; `TDE_BROKER_PROPTEST_CASES=2000 cargo test --release
//! --test model_based` runs a long one.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::*;
use proptest::prelude::*;
use tde_broker::grpc::proto;
use tonic::Code;

const VAULT: &str = "model-kv";
const DEK: [u8; 32] = [42u8; 32];
const SOURCES: [&str; 3] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
/// Principals 0..3 are users; 3 is a user-assigned identity that can be deleted.
const PRINCIPALS: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Perm {
    Get,
    Wrap,
    Unwrap,
}

impl Perm {
    fn name(self) -> &'static str {
        match self {
            Perm::Get => "get",
            Perm::Wrap => "wrapKey",
            Perm::Unwrap => "unwrapKey",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    ServiceEncryptionUser,
    CryptoUser,
    Reader,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::ServiceEncryptionUser => "Key Vault Crypto Service Encryption User",
            Role::CryptoUser => "Key Vault Crypto User",
            Role::Reader => "Key Vault Reader",
        }
    }

    /// What the role grants on the key, per Azure's built-in definitions.
    fn grants(self, p: Perm) -> bool {
        match self {
            Role::ServiceEncryptionUser | Role::CryptoUser => true,
            Role::Reader => p == Perm::Get,
        }
    }
}

#[derive(Clone, Debug)]
enum Step {
    SetPolicy(usize, Vec<Perm>),
    AddRole(usize, Role, bool),
    RemoveRoles(usize),
    SetRbac(bool),
    SetEnabled(bool),
    SetExpired(bool),
    SetFirewall(bool, Vec<usize>),
    DeleteIdentity,
    DeleteVault,
    RecoverVault,
    /// Purges the deleted vault, then creates it again (empty, with a new key) as the world needs.
    PurgeVault,
    Call(usize, usize, Perm),
    /// Key rotation: see [`rotation_step`].
    Rotation(RotationStep),
}

/// Key rotation steps (docs/RULES.md R1.12), driven by the admin. Calls keep using the first
/// version's kid, so rotation must not change their answers; `Check` compares the key's
/// versions with the model.
#[derive(Clone, Debug)]
enum RotationStep {
    /// RotateKey.
    Rotate,
    /// A policy that rotates this many days after the newest version's creation.
    SetPolicy(i64),
    /// Moves the clock this many days forward (rotating what the policy makes due), then back,
    /// so tokens and key dates of the other steps keep their meaning.
    AdvanceAndBack(i64),
    /// ListKeyVersions and GetKey (unversioned) against the model.
    Check,
}

fn rotation_step() -> impl Strategy<Value = RotationStep> {
    prop_oneof![
        1 => Just(RotationStep::Rotate),
        1 => (7i64..40).prop_map(RotationStep::SetPolicy),
        2 => (1i64..60).prop_map(RotationStep::AdvanceAndBack),
        2 => Just(RotationStep::Check),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let who = 0..PRINCIPALS;
    let perms = proptest::sample::subsequence(vec![Perm::Get, Perm::Wrap, Perm::Unwrap], 0..=3);
    let role = prop_oneof![Just(Role::ServiceEncryptionUser), Just(Role::CryptoUser), Just(Role::Reader)];
    let call =
        (0..PRINCIPALS, 0..SOURCES.len(), prop_oneof![Just(Perm::Get), Just(Perm::Wrap), Just(Perm::Unwrap)]);
    prop_oneof![
        2 => (who.clone(), perms).prop_map(|(w, p)| Step::SetPolicy(w, p)),
        1 => (who.clone(), role, any::<bool>()).prop_map(|(w, r, k)| Step::AddRole(w, r, k)),
        1 => who.prop_map(Step::RemoveRoles),
        1 => any::<bool>().prop_map(Step::SetRbac),
        1 => any::<bool>().prop_map(Step::SetEnabled),
        1 => any::<bool>().prop_map(Step::SetExpired),
        1 => (any::<bool>(), proptest::sample::subsequence(vec![1usize, 2], 0..=2)).prop_map(|(a, r)| Step::SetFirewall(a, r)),
        1 => Just(Step::DeleteIdentity),
        1 => Just(Step::DeleteVault),
        1 => Just(Step::RecoverVault),
        1 => Just(Step::PurgeVault),
        8 => call.prop_map(|(w, s, p)| Step::Call(w, s, p)),
        2 => rotation_step().prop_map(Step::Rotation),
    ]
}

/// The reference model: the rules of docs/RULES.md R1–R3 for one key, written independently.
#[derive(Default)]
struct Model {
    policies: HashMap<usize, BTreeSet<Perm>>,
    roles: HashMap<usize, Vec<Role>>,
    rbac: bool,
    disabled: bool,
    expired: bool,
    deny_by_default: bool,
    ip_rules: Vec<usize>,
    identity_deleted: bool,
    /// The vault is soft-deleted: it and its key answer as not found, its settings wait.
    vault_deleted: bool,
    rotation: RotationModel,
}

/// The model of the key's versions under RotateKey and a rotation policy (no expiry time: new
/// versions have no exp).
#[derive(Default)]
struct RotationModel {
    /// Versions beyond the first.
    rotations: usize,
    /// Broker-clock creation time of the newest version.
    newest_created: i64,
    /// The policy's Rotate timeAfterCreate, in days.
    after_days: Option<i64>,
}

const DAY: i64 = 86_400;

impl RotationModel {
    /// A clock move to `at`: the policy rotates once when its time has come.
    fn clock_reaches(&mut self, at: i64) {
        if self.after_days.is_some_and(|d| at >= self.newest_created + d * DAY) {
            self.rotations += 1;
            self.newest_created = at;
        }
    }
}

/// What the control-plane and key-changing calls on a soft-deleted vault answer.
const VAULT_GONE: (Code, &str) = (Code::NotFound, "ResourceNotFound");

impl Model {
    /// The vault as a purge leaves it and the world creates it again: no policies but the
    /// admin's, no role assignments at its scope, default settings, a fresh key. Identities stay.
    fn purged(&mut self) {
        *self = Model { identity_deleted: self.identity_deleted, ..Model::default() };
    }

    /// The expected (code, reason) of a call, `None` for success.
    fn expect(&self, who: usize, source: usize, p: Perm) -> Option<(Code, &'static str)> {
        if who == 3 && self.identity_deleted {
            return Some((Code::Unauthenticated, "Unauthorized"));
        }
        if self.vault_deleted {
            return Some(VAULT_GONE);
        }
        if self.deny_by_default && !self.ip_rules.contains(&source) {
            return Some((Code::PermissionDenied, "ForbiddenByFirewall"));
        }
        let allowed = if self.rbac {
            self.roles.get(&who).is_some_and(|rs| rs.iter().any(|r| r.grants(p)))
        } else {
            self.policies.get(&who).is_some_and(|ps| ps.contains(&p))
        };
        if !allowed {
            return Some((
                Code::PermissionDenied,
                if self.rbac { "ForbiddenByRbac" } else { "AccessDenied" },
            ));
        }
        if p == Perm::Get {
            return None;
        }
        if self.disabled {
            return Some((Code::PermissionDenied, "KeyDisabled"));
        }
        if self.expired && p == Perm::Wrap {
            return Some((Code::PermissionDenied, "KeyExpired"));
        }
        None
    }
}

struct World {
    b: TestBroker,
    key: String,
    wrapped: Vec<u8>,
    principals: Vec<Who>,
    identity_resource: String,
    clients: HashMap<(usize, usize), Kv>,
}

/// Creates the vault with its key `k` and a DEK wrapped under it; the admin keeps its rights
/// under both permission models to drive the changes. Returns the key's kid and the wrapped DEK.
async fn vault_with_key(b: &TestBroker) -> (String, Vec<u8>) {
    b.vault(VAULT, false).await;
    let key = kid(&b.key(VAULT, "k", "RSA", 2048).await);
    let wrapped =
        b.kv().wrap_key(crypto_req(&key, "RSA-OAEP-256", &DEK)).await.expect("wrap").into_inner().value;
    b.assign(&format!("https://{VAULT}.vault.azure.net"), &b.admin.object_id, "Key Vault Administrator")
        .await;
    (key, wrapped)
}

async fn world() -> World {
    let b = start().await;
    let (key, wrapped) = vault_with_key(&b).await;
    let mut principals = Vec::new();
    for i in 0..3 {
        principals.push(b.user(&format!("model-user-{i}")).await);
    }
    let (id, who) = b.identity("model-rg", "model-umi").await;
    principals.push(who);
    World { b, key, wrapped, principals, identity_resource: id.resource_id, clients: HashMap::new() }
}

/// The (code, reason) of a refusal, `None` for success.
fn outcome<T>(r: Result<T, tonic::Status>) -> Option<(Code, String)> {
    r.err().map(|s| (s.code(), tde_broker::grpc::status::reason(&s).unwrap_or_default()))
}

fn gone() -> Option<(Code, String)> {
    Some((VAULT_GONE.0, VAULT_GONE.1.to_string()))
}

impl World {
    async fn client(&mut self, who: usize, source: usize) -> &mut Kv {
        if !self.clients.contains_key(&(who, source)) {
            let kv = self.b.kv_from(SOURCES[source], &self.principals[who].token).await;
            self.clients.insert((who, source), kv);
        }
        self.clients.get_mut(&(who, source)).expect("just inserted")
    }

    async fn apply(&mut self, step: &Step, m: &mut Model) -> Result<(), TestCaseError> {
        let b = &self.b;
        match step {
            Step::SetPolicy(w, perms) => {
                let names: Vec<&str> = perms.iter().map(|p| p.name()).collect();
                if *w == 3 && m.identity_deleted {
                    return Ok(());
                }
                if m.vault_deleted {
                    let r = b
                        .vaults()
                        .set_access_policy(proto::SetAccessPolicyRequest {
                            vault_name: VAULT.into(),
                            object_id: self.principals[*w].object_id.clone(),
                            key_permissions: names.iter().map(|p| p.to_string()).collect(),
                        })
                        .await;
                    prop_assert_eq!(outcome(r), gone(), "SetAccessPolicy on a deleted vault");
                    return Ok(());
                }
                b.policy(VAULT, &self.principals[*w].object_id, &names).await;
                m.policies.insert(*w, perms.iter().copied().collect());
            }
            Step::AddRole(w, role, at_key) => {
                if *w == 3 && m.identity_deleted || m.roles.get(w).is_some_and(|r| r.contains(role)) {
                    return Ok(());
                }
                // One scope per (principal, role) keeps the model's bookkeeping simple.
                let scope =
                    if *at_key { b.key_uri(VAULT, "k") } else { format!("https://{VAULT}.vault.azure.net") };
                b.assign(&scope, &self.principals[*w].object_id, role.name()).await;
                m.roles.entry(*w).or_default().push(*role);
            }
            Step::RemoveRoles(w) => {
                let list = b
                    .vaults()
                    .list_role_assignments(proto::ListRoleAssignmentsRequest::default())
                    .await
                    .expect("list")
                    .into_inner();
                for a in list.assignments.iter().filter(|a| a.principal_id == self.principals[*w].object_id) {
                    b.vaults()
                        .delete_role_assignment(proto::DeleteRoleAssignmentRequest { id: a.id.clone() })
                        .await
                        .expect("delete");
                }
                m.roles.remove(w);
            }
            Step::SetRbac(on) => {
                let r = b
                    .vaults()
                    .update_vault(proto::UpdateVaultRequest {
                        name: VAULT.into(),
                        enable_rbac_authorization: Some(*on),
                        ..Default::default()
                    })
                    .await;
                if m.vault_deleted {
                    prop_assert_eq!(outcome(r), gone(), "UpdateVault on a deleted vault");
                } else {
                    r.expect("rbac");
                    m.rbac = *on;
                }
            }
            Step::SetEnabled(on) => {
                let r = b
                    .kv()
                    .update_key(proto::UpdateKeyRequest {
                        key_id: self.key.clone(),
                        enabled: Some(*on),
                        ..Default::default()
                    })
                    .await;
                if m.vault_deleted {
                    prop_assert_eq!(outcome(r), gone(), "UpdateKey in a deleted vault");
                } else {
                    r.expect("enable");
                    m.disabled = !on;
                }
            }
            Step::SetExpired(expired) => {
                let req = if *expired {
                    proto::UpdateKeyRequest {
                        key_id: self.key.clone(),
                        expires: Some(b.now().await),
                        ..Default::default()
                    }
                } else {
                    proto::UpdateKeyRequest {
                        key_id: self.key.clone(),
                        clear_expires: true,
                        ..Default::default()
                    }
                };
                let r = b.kv().update_key(req).await;
                if m.vault_deleted {
                    prop_assert_eq!(outcome(r), gone(), "UpdateKey in a deleted vault");
                } else {
                    r.expect("expiry");
                    m.expired = *expired;
                }
            }
            Step::SetFirewall(allow, rules) => {
                // The admin changes keys from 127.0.0.1 (source 0): that address is always in the
                // rules, so the admin stays able to drive the key-state steps.
                let acl = proto::NetworkAcls {
                    default_action: if *allow { "Allow" } else { "Deny" }.into(),
                    bypass: "None".into(),
                    ip_rules: std::iter::once(0)
                        .chain(rules.iter().copied())
                        .map(|i| SOURCES[i].to_string())
                        .collect(),
                    virtual_network_rules: vec![],
                };
                if m.vault_deleted {
                    let r = b
                        .vaults()
                        .update_vault(proto::UpdateVaultRequest {
                            name: VAULT.into(),
                            network_acls: Some(acl),
                            ..Default::default()
                        })
                        .await;
                    prop_assert_eq!(outcome(r), gone(), "UpdateVault on a deleted vault");
                    return Ok(());
                }
                b.firewall(VAULT, acl, None).await;
                m.deny_by_default = !allow;
                m.ip_rules = std::iter::once(0).chain(rules.iter().copied()).collect();
            }
            Step::DeleteIdentity => {
                if !m.identity_deleted {
                    b.ids()
                        .delete_user_assigned_identity(proto::DeleteUserAssignedIdentityRequest {
                            resource_id: self.identity_resource.clone(),
                            force: false,
                        })
                        .await
                        .expect("delete identity");
                    m.identity_deleted = true;
                }
            }
            Step::DeleteVault => {
                let r = b.vaults().delete_vault(proto::DeleteVaultRequest { name: VAULT.into() }).await;
                let want = if m.vault_deleted { gone() } else { None };
                prop_assert_eq!(outcome(r), want, "DeleteVault");
                m.vault_deleted = true;
            }
            Step::RecoverVault => {
                let r = b
                    .vaults()
                    .recover_deleted_vault(proto::RecoverDeletedVaultRequest { name: VAULT.into() })
                    .await;
                let want = if m.vault_deleted { None } else { gone() };
                prop_assert_eq!(outcome(r), want, "RecoverDeletedVault");
                m.vault_deleted = false;
            }
            Step::PurgeVault => {
                let r = b
                    .vaults()
                    .purge_deleted_vault(proto::PurgeDeletedVaultRequest { name: VAULT.into() })
                    .await;
                if !m.vault_deleted {
                    prop_assert_eq!(outcome(r), gone(), "PurgeDeletedVault of a live vault");
                    return Ok(());
                }
                prop_assert_eq!(outcome(r), None, "PurgeDeletedVault");
                let (key, wrapped) = vault_with_key(b).await;
                self.key = key;
                self.wrapped = wrapped;
                m.purged();
                // The new key has one version and no rotation policy.
                m.rotation.newest_created = b.now().await;
            }
            // Rotation is not modelled while the vault is soft-deleted (its key answers as not found
            // and its clock-driven rotation waits): those steps are left out.
            Step::Rotation(_) if m.vault_deleted => {}
            Step::Rotation(r) => self.rotation(r, &mut m.rotation).await?,
            Step::Call(w, s, p) => {
                let expected = m.expect(*w, *s, *p);
                let (key, wrapped) = (self.key.clone(), self.wrapped.clone());
                let kv = self.client(*w, *s).await;
                let got = match p {
                    Perm::Get => kv.get_key(proto::GetKeyRequest { key_id: key }).await.map(drop),
                    Perm::Wrap => kv.wrap_key(crypto_req(&key, "RSA-OAEP-256", &DEK)).await.map(drop),
                    Perm::Unwrap => {
                        kv.unwrap_key(unwrap_req(&key, "RSA-OAEP-256", &wrapped)).await.and_then(|r| {
                            if r.get_ref().value == DEK {
                                Ok(())
                            } else {
                                Err(tonic::Status::internal("wrong plaintext"))
                            }
                        })
                    }
                };
                let got =
                    got.err().map(|s| (s.code(), tde_broker::grpc::status::reason(&s).unwrap_or_default()));
                let want = expected.map(|(c, r)| (c, r.to_string()));
                prop_assert_eq!(got, want, "principal {} from {} doing {:?}", w, SOURCES[*s], p);
            }
        }
        Ok(())
    }
}

impl World {
    async fn rotation(&mut self, step: &RotationStep, m: &mut RotationModel) -> Result<(), TestCaseError> {
        let b = &self.b;
        let key = b.key_uri(VAULT, "k");
        match step {
            RotationStep::Rotate => {
                b.kv().rotate_key(proto::RotateKeyRequest { key_id: key }).await.expect("rotate");
                m.rotations += 1;
                m.newest_created = b.now().await;
            }
            RotationStep::SetPolicy(days) => {
                b.kv()
                    .update_key_rotation_policy(proto::UpdateKeyRotationPolicyRequest {
                        key_id: key,
                        policy: Some(proto::KeyRotationPolicy {
                            lifetime_actions: vec![proto::LifetimeAction {
                                action: "Rotate".into(),
                                time_after_create: format!("P{days}D"),
                                ..Default::default()
                            }],
                            ..Default::default()
                        }),
                    })
                    .await
                    .expect("set rotation policy");
                m.after_days = Some(*days);
            }
            RotationStep::AdvanceAndBack(days) => {
                let at = b.advance(days * DAY).await;
                m.clock_reaches(at);
                b.advance(-days * DAY).await;
            }
            RotationStep::Check => {
                let listed = b
                    .kv()
                    .list_key_versions(proto::ListKeyVersionsRequest {
                        key_id: key.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("versions")
                    .into_inner()
                    .keys;
                prop_assert_eq!(listed.len(), 1 + m.rotations, "versions of the key");
                let newest =
                    b.kv().get_key(proto::GetKeyRequest { key_id: key }).await.expect("get").into_inner();
                let newest_kid = kid(&newest);
                prop_assert_eq!(newest_kid == self.key, m.rotations == 0, "the newest version");
                if m.rotations > 0 {
                    let a = newest.attributes.unwrap_or_default();
                    prop_assert_eq!((a.created, a.expires, a.enabled), (m.newest_created, None, Some(true)));
                }
            }
        }
        Ok(())
    }
}

fn cases() -> u32 {
    std::env::var("TDE_BROKER_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(12)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn broker_answers_equal_the_reference_model(steps in proptest::collection::vec(step(), 1..60)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(async {
            let mut w = world().await;
            let mut m = Model::default();
            m.rotation.newest_created = w.b.now().await;
            for s in &steps {
                w.apply(s, &mut m).await?;
            }
            w.b.stop().await;
            Ok::<(), TestCaseError>(())
        })?;
    }
}
