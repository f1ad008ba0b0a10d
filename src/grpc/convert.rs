//! Conversions between broker views and proto messages.

use crate::broker::keys::{DeletedKeyView, KeyItemView, KeyView};
use crate::grpc::proto;
use crate::model::{KeyAttributes, KeyVersion, NetworkAcls, Vault};

/// Proto attributes of a version.
pub fn attributes(a: &KeyAttributes, recoverable_days: i32, recovery_level: &str) -> proto::KeyAttributes {
    proto::KeyAttributes {
        enabled: Some(a.enabled),
        not_before: a.not_before,
        expires: a.expires,
        created: a.created,
        updated: a.updated,
        recoverable_days,
        recovery_level: recovery_level.to_string(),
    }
}

fn jwk(kid: String, v: &KeyVersion) -> proto::JsonWebKey {
    proto::JsonWebKey {
        kid,
        kty: v.kty.name().to_string(),
        key_ops: v.key_ops.iter().map(|o| o.name().to_string()).collect(),
        n: v.n.clone(),
        e: v.e.clone(),
        crv: v.crv.map(|c| c.name().to_string()).unwrap_or_default(),
        x: v.x.clone(),
        y: v.y.clone(),
    }
}

/// KeyBundle of a view.
pub fn bundle(v: KeyView) -> proto::KeyBundle {
    proto::KeyBundle {
        attributes: Some(attributes(&v.version.attributes, v.recoverable_days, v.recovery_level)),
        key: Some(jwk(v.kid, &v.version)),
        tags: v.version.tags.into_iter().collect(),
    }
}

/// DeletedKeyBundle of a view.
pub fn deleted_bundle(v: DeletedKeyView) -> proto::DeletedKeyBundle {
    proto::DeletedKeyBundle {
        key: Some(bundle(v.key)),
        recovery_id: v.recovery_id,
        deleted_date: v.deletion.deleted_date,
        scheduled_purge_date: v.deletion.scheduled_purge_date,
    }
}

/// KeyItem of a list entry.
pub fn item(v: KeyItemView) -> proto::KeyItem {
    proto::KeyItem {
        kid: v.kid,
        attributes: Some(attributes(&v.version.attributes, v.recoverable_days, v.recovery_level)),
        tags: v.version.tags.into_iter().collect(),
    }
}

/// Proto vault.
pub fn vault(v: Vault, suffix: &str) -> proto::Vault {
    proto::Vault {
        uri: crate::model::ids::vault_uri(&v.name, suffix),
        name: v.name,
        soft_delete_retention_days: v.retention_days,
        enable_purge_protection: v.purge_protection,
        enable_rbac_authorization: v.rbac,
        network_acls: Some(network_acls(&v.network_acls)),
        public_network_access: if v.public_network_access { "Enabled" } else { "Disabled" }.to_string(),
        private_endpoint_subnet_ids: v.private_endpoints,
    }
}

/// Proto network ACLs.
pub fn network_acls(a: &NetworkAcls) -> proto::NetworkAcls {
    proto::NetworkAcls {
        default_action: if a.default_allow { "Allow" } else { "Deny" }.to_string(),
        bypass: if a.bypass_azure_services { "AzureServices" } else { "None" }.to_string(),
        ip_rules: a.ip_rules.clone(),
        virtual_network_rules: a.virtual_network_rules.clone(),
    }
}

/// Proto identity of a managed identity principal.
pub fn identity(p: &crate::model::Principal, tenant_id: &str) -> proto::Identity {
    proto::Identity {
        resource_id: p.resource_id.clone().unwrap_or_default(),
        principal_id: p.object_id.clone(),
        client_id: p.app_id.clone(),
        tenant_id: tenant_id.to_string(),
        kind: match p.kind {
            crate::model::PrincipalKind::UserAssignedIdentity => "UserAssigned",
            crate::model::PrincipalKind::SystemAssignedIdentity => "SystemAssigned",
            crate::model::PrincipalKind::User => "User",
            crate::model::PrincipalKind::ServerHost => "ServerHost",
        }
        .to_string(),
    }
}

/// Proto role assignment.
pub fn role_assignment(a: crate::model::RoleAssignment) -> proto::RoleAssignment {
    proto::RoleAssignment {
        id: a.id,
        scope: a.display_scope,
        principal_id: a.principal_id,
        role_name: a.role.name().to_string(),
        normalized_scope: a.scope,
    }
}

/// Proto server.
pub fn server(s: &crate::model::server::Server) -> proto::Server {
    use crate::model::server::ServerKind;
    proto::Server {
        id: s.id.clone(),
        name: s.name.clone(),
        kind: match s.kind {
            ServerKind::SqlServer => proto::ServerKind::SqlServer,
            ServerKind::ManagedInstance => proto::ServerKind::ManagedInstance,
        } as i32,
        identity: Some(proto::ServerIdentity {
            system_assigned: s.identity.system_principal_id.is_some(),
            system_principal_id: s.identity.system_principal_id.clone().unwrap_or_default(),
            user_assigned_identity_ids: s.identity.user_assigned.clone(),
            primary_user_assigned_identity_id: s.identity.primary.clone().unwrap_or_default(),
        }),
        protector: Some(protector(&s.protector)),
        subnet_id: s.subnet_id.clone().unwrap_or_default(),
    }
}

/// Proto encryption protector.
pub fn protector(p: &crate::model::server::Protector) -> proto::EncryptionProtector {
    use crate::model::server::Protector;
    match p {
        Protector::ServiceManaged => {
            proto::EncryptionProtector { server_key_type: "ServiceManaged".into(), ..Default::default() }
        }
        Protector::AzureKeyVault { key_id, kid, auto_rotation } => proto::EncryptionProtector {
            server_key_type: "AzureKeyVault".into(),
            key_id: key_id.clone(),
            kid: kid.clone(),
            auto_rotation_enabled: *auto_rotation,
        },
    }
}

/// Proto database state.
pub fn db_state(reason: Option<crate::model::server::Reason>) -> proto::DatabaseState {
    if reason.is_some() { proto::DatabaseState::Inaccessible } else { proto::DatabaseState::Online }
}

/// Proto database.
pub fn database(d: &crate::model::server::Database) -> proto::Database {
    proto::Database {
        server_id: d.server_id.clone(),
        name: d.name.clone(),
        state: db_state(d.reason) as i32,
        reason: d.reason.map(|r| r.name().to_string()).unwrap_or_default(),
        state_since: d.state_since,
    }
}

/// A key's rotation policy.
pub fn rotation_policy(v: crate::broker::keys::RotationPolicyView) -> proto::KeyRotationPolicy {
    use crate::model::rotation::Trigger;
    proto::KeyRotationPolicy {
        expiry_time: v.policy.expiry_time.as_ref().map(|d| d.as_str().to_string()).unwrap_or_default(),
        lifetime_actions: v
            .policy
            .lifetime_actions
            .iter()
            .map(|a| {
                let (after, before) = match &a.trigger {
                    Trigger::AfterCreate(d) => (d.as_str().to_string(), String::new()),
                    Trigger::BeforeExpiry(d) => (String::new(), d.as_str().to_string()),
                };
                proto::LifetimeAction {
                    action: a.action.name().to_string(),
                    time_after_create: after,
                    time_before_expiry: before,
                }
            })
            .collect(),
        id: v.id,
        created: v.policy.created,
        updated: v.policy.updated,
    }
}
