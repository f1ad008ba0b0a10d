//! Principals (who calls) and control-plane role assignments (DESIGN §1.2).

use serde::{Deserialize, Serialize};

/// What kind of principal a token names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrincipalKind {
    /// A human or automation user of the control plane (the bootstrap admin is one).
    User,
}

/// An authenticated party. Tokens name it by `object_id` and stop working once it is gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// Object id (GUID), the token's `oid`.
    pub object_id: String,
    /// Application (client) id (GUID), the token's `appid`.
    pub app_id: String,
    /// Display name.
    pub name: String,
    /// Kind.
    pub kind: PrincipalKind,
    /// Creation time.
    pub created: i64,
}

/// Built-in ARM roles known to the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArmRole {
    /// Every action, including role assignments.
    Owner,
    /// Every action except role assignments.
    Contributor,
    /// Read actions only.
    Reader,
}

impl ArmRole {
    /// The cloud's role name.
    pub fn name(self) -> &'static str {
        match self {
            ArmRole::Owner => "Owner",
            ArmRole::Contributor => "Contributor",
            ArmRole::Reader => "Reader",
        }
    }
}

/// A control-plane role assignment at a scope (`/`, a subscription, a resource group, a resource).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmAssignment {
    /// Assignment id (GUID).
    pub id: String,
    /// ARM scope, `/` for everything.
    pub scope: String,
    /// Object id of the assignee.
    pub principal_id: String,
    /// The role.
    pub role: ArmRole,
}

/// The authenticated caller of one request, as the auth layer established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Object id of the principal (`oid`).
    pub object_id: String,
    /// Application id (`appid`).
    pub app_id: String,
    /// Issuer of the credential.
    pub issuer: String,
    /// The connection's real peer address, when known.
    pub peer: Option<std::net::SocketAddr>,
}

impl Caller {
    /// How the caller appears in denial texts.
    pub fn description(&self) -> super::error::CallerDescription {
        super::error::CallerDescription {
            app_id: self.app_id.clone(),
            object_id: self.object_id.clone(),
            issuer: self.issuer.clone(),
        }
    }
}
