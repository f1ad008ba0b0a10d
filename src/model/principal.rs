//! Principals (who calls) and control-plane role assignments (docs/RULES.md R2).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What kind of principal a token names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrincipalKind {
    /// A human or automation user (the bootstrap admin is one).
    User,
    /// A user-assigned managed identity: a standalone resource.
    UserAssignedIdentity,
    /// A server's system-assigned identity: created and deleted with its server.
    SystemAssignedIdentity,
    /// The engine host of a server: calls TdeEngine and acts with the server's identity.
    ServerHost,
}

/// An authenticated party. Tokens name it by `object_id` and stop working once it is gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// Object id (GUID), the token's `oid`; a managed identity's principal id.
    pub object_id: String,
    /// Application (client) id (GUID), the token's `appid`; a managed identity's client id.
    pub app_id: String,
    /// Display name.
    pub name: String,
    /// Kind.
    pub kind: PrincipalKind,
    /// ARM resource id of a managed identity (`xms_mirid` in its tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// Creation time.
    pub created: i64,
    /// A service principal's client secret, hashed (`auth::secret`): the secret itself is shown
    /// once, when the user is created, and never stored. Absent for principals without one
    /// (identities, engine hosts, users created before service principals existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_hash: Option<String>,
}

/// The authenticated caller of one request, as the auth layer established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Object id of the principal (`oid`). The three names are shared, not copied, between
    /// the verified-token cache and each request of that token.
    pub object_id: Arc<str>,
    /// Application id (`appid`).
    pub app_id: Arc<str>,
    /// Issuer of the credential.
    pub issuer: Arc<str>,
    /// The connection's real peer address, when known.
    pub peer: Option<std::net::SocketAddr>,
    /// The broker's own call for a SQL logical server: a trusted Microsoft service.
    pub trusted_service: bool,
    /// The broker's own call for a managed instance: it comes from this subnet.
    pub source_subnet: Option<String>,
    /// When the credential stops being accepted (a token's `exp` plus the tolerated skew), for
    /// calls that outlive their first check (a watch); `None` for a credential without an end
    /// (a client certificate, the broker's own calls).
    pub valid_until: Option<CredentialEnd>,
}

/// The end of a credential's life and the clock it is read on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CredentialEnd {
    /// Unix seconds.
    pub at: i64,
    /// On the system clock (an operator's token) rather than the broker's.
    pub wall_clock: bool,
}

impl CredentialEnd {
    /// Whether the credential has ended, given the broker's and the system clock's now.
    pub fn passed(&self, broker_now: i64, system_now: i64) -> bool {
        (if self.wall_clock { system_now } else { broker_now }) >= self.at
    }
}

impl Caller {
    /// A caller authenticated by a credential `issuer` issued to principal `object_id` of
    /// application `app_id`, from an unknown address, neither a trusted service nor a subnet.
    pub fn new(object_id: &str, app_id: &str, issuer: &str) -> Self {
        Caller {
            object_id: object_id.into(),
            app_id: app_id.into(),
            issuer: issuer.into(),
            peer: None,
            trusted_service: false,
            source_subnet: None,
            valid_until: None,
        }
    }

    /// How the caller appears in denial texts.
    pub fn description(&self) -> super::error::CallerDescription {
        super::error::CallerDescription {
            app_id: self.app_id.to_string(),
            object_id: self.object_id.to_string(),
            issuer: self.issuer.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_stored_before_client_secrets_existed_still_load() {
        let stored = r#"{"object_id":"o","app_id":"a","name":"n","kind":"User","created":1}"#;
        let p: Principal = serde_json::from_str(stored).expect("an older principal document");
        assert_eq!(p.client_secret_hash, None);
        // And a principal without a secret is written as before (no new field).
        assert_eq!(serde_json::to_string(&p).expect("json"), stored);
        let with = Principal { client_secret_hash: Some("ab".repeat(32)), ..p };
        let doc = serde_json::to_string(&with).expect("json");
        assert_eq!(serde_json::from_str::<Principal>(&doc).expect("round trip"), with);
    }
}
