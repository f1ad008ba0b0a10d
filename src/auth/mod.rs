//! Authentication (docs/API.md, Authentication; docs/RULES.md R5): the broker issues RS256 JWTs
//! with the cloud's claims and validates them on every call — signature, issuer, audience, lifetime
//! on the broker's clock, and that the principal still exists. The interceptor puts the [`Caller`]
//! into the request's extensions; a request without one never reaches a handler.

pub mod jwt;

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::broker::Broker;
use crate::crypto::TokenSigningKey;
use crate::model::{BrokerError, Caller, Principal};
use jwt::{Audience, Claims};

/// Audience of data-plane (Key Vault) tokens.
pub const VAULT_AUDIENCE: &str = "https://vault.azure.net";
/// Key Vault's application id, also accepted as a data-plane audience.
pub const VAULT_APP_ID: &str = "cfa8b339-82a2-471a-a3c9-0fc0be7a4093";
/// Audience of control-plane (ARM) tokens.
pub const MANAGEMENT_AUDIENCE: &str = "https://management.azure.com/";
/// Tolerated clock skew, seconds (the cloud's token libraries allow five minutes).
pub const CLOCK_SKEW: i64 = 300;

/// The canonical audience for a requested resource: the Key Vault or ARM resource, with or
/// without a trailing slash or `/.default` (an empty request means Key Vault).
pub fn canonical_audience(requested: &str) -> Result<&'static str, BrokerError> {
    let r = requested.trim();
    let r = r.strip_suffix("/.default").unwrap_or(r).trim_end_matches('/');
    if r.is_empty() || r.eq_ignore_ascii_case(VAULT_AUDIENCE) || r.eq_ignore_ascii_case(VAULT_APP_ID) {
        Ok(VAULT_AUDIENCE)
    } else if r.eq_ignore_ascii_case(MANAGEMENT_AUDIENCE.trim_end_matches('/')) {
        Ok(MANAGEMENT_AUDIENCE)
    } else {
        Err(BrokerError::bad_parameter(format!(
            "The audience '{}' is not served here. Use {VAULT_AUDIENCE} or {MANAGEMENT_AUDIENCE}.",
            crate::model::ids::printable(requested)
        )))
    }
}

/// Which plane a service belongs to: decides the audience a token must carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plane {
    /// KeyVault service: `https://vault.azure.net`.
    Data,
    /// Vaults, Emulation and the other control services: `https://management.azure.com/`.
    Control,
}

impl Plane {
    fn accepts(self, aud: &str) -> bool {
        match self {
            Plane::Data => aud.trim_end_matches('/') == VAULT_AUDIENCE || aud == VAULT_APP_ID,
            Plane::Control => aud.trim_end_matches('/') == MANAGEMENT_AUDIENCE.trim_end_matches('/'),
        }
    }

    fn expected(self) -> String {
        match self {
            Plane::Data => format!("{VAULT_AUDIENCE} or {VAULT_APP_ID}"),
            Plane::Control => MANAGEMENT_AUDIENCE.to_string(),
        }
    }
}

/// Issues and validates the broker's tokens.
pub struct Authenticator {
    key: TokenSigningKey,
    /// `kid` header of issued tokens: identifies the signing key.
    kid: String,
    broker: Arc<Broker>,
    /// Tokens whose signature already verified. A token cannot change, so its signature needs
    /// checking once; issuer, audience, lifetime (on the broker's clock) and the principal's
    /// existence are still checked on every call.
    verified: VerifiedTokens,
    /// The issuer every token must name (the tenant is fixed for the broker's life).
    issuer: String,
}

impl Authenticator {
    /// Wraps the signing key.
    pub fn new(key: TokenSigningKey, kid: String, broker: Arc<Broker>) -> Self {
        let verified = VerifiedTokens::new(VERIFIED_TOKENS);
        let issuer = broker.settings.issuer();
        Authenticator { key, kid, broker, verified, issuer }
    }

    /// Issues a token for `principal` valid for `lifetime` seconds from the broker's now.
    /// Returns the token and its expiry.
    pub fn issue_user_token(
        &self,
        principal: &Principal,
        audiences: &[&str],
        lifetime: i64,
    ) -> Result<(String, i64), BrokerError> {
        self.issue_for_user(principal, audiences, lifetime, false)
    }

    /// Issues an operator's token for `principal` (the bootstrap admin's `admin.token`): like
    /// [`Self::issue_user_token`], but its times are wall-clock time and it is validated against
    /// the system clock, so no move of the manual clock (back before its `nbf`, or past its
    /// `exp`) locks the operator out of the controls that would undo the move.
    pub fn issue_operator_token(
        &self,
        principal: &Principal,
        audiences: &[&str],
        lifetime: i64,
    ) -> Result<(String, i64), BrokerError> {
        self.issue_for_user(principal, audiences, lifetime, true)
    }

    fn issue_for_user(
        &self,
        principal: &Principal,
        audiences: &[&str],
        lifetime: i64,
        wall_clock: bool,
    ) -> Result<(String, i64), BrokerError> {
        let now = if wall_clock { crate::broker::clock::system_now() } else { self.broker.clock.now() };
        let claims = Claims {
            iss: self.broker.settings.issuer(),
            aud: Audience::from_list(audiences),
            sub: principal.object_id.clone(),
            oid: principal.object_id.clone(),
            tid: self.broker.settings.tenant_id.clone(),
            appid: principal.app_id.clone(),
            idtyp: "user".to_string(),
            name: Some(principal.name.clone()),
            xms_mirid: None,
            wall_clock,
            iat: now,
            nbf: now,
            exp: now.saturating_add(lifetime),
        };
        let token = jwt::encode(&claims, &self.kid, &self.key)?;
        Ok((token, claims.exp))
    }

    /// Issues a managed identity's token for one audience, with `xms_mirid` naming the resource.
    pub fn issue_identity_token(
        &self,
        identity: &Principal,
        audience: &str,
        lifetime: i64,
    ) -> Result<(String, i64), BrokerError> {
        let now = self.broker.clock.now();
        let claims = Claims {
            iss: self.broker.settings.issuer(),
            aud: Audience::One(audience.to_string()),
            sub: identity.object_id.clone(),
            oid: identity.object_id.clone(),
            tid: self.broker.settings.tenant_id.clone(),
            appid: identity.app_id.clone(),
            idtyp: "app".to_string(),
            name: None,
            xms_mirid: identity.resource_id.clone(),
            wall_clock: false,
            iat: now,
            nbf: now,
            exp: now.saturating_add(lifetime),
        };
        let token = jwt::encode(&claims, &self.kid, &self.key)?;
        Ok((token, claims.exp))
    }

    /// Validates a bearer token for `plane` and names its caller.
    pub fn validate(&self, token: &str, plane: Plane) -> Result<Caller, BrokerError> {
        let digest = crate::crypto::sha256(token.as_bytes());
        let verified = match self.verified.get(&digest) {
            Some(v) => v,
            None => {
                let v = Arc::new(Verified::new(jwt::decode(token, &self.kid, &self.key)?));
                self.verified.insert(digest, v.clone(), self.broker.clock.now());
                v
            }
        };
        let claims = &verified.claims;
        let expected_iss = &self.issuer;
        if claims.iss != *expected_iss {
            return Err(BrokerError::InvalidIssuer {
                expected: expected_iss.clone(),
                found: claims.iss.clone(),
            });
        }
        if !claims.aud.iter().any(|a| plane.accepts(a)) {
            return Err(BrokerError::InvalidAudience {
                expected: plane.expected(),
                found: claims.aud.joined(),
            });
        }
        let now =
            if claims.wall_clock { crate::broker::clock::system_now() } else { self.broker.clock.now() };
        if now >= claims.exp.saturating_add(CLOCK_SKEW) {
            return Err(BrokerError::TokenExpired { expires: claims.exp, now });
        }
        if now < claims.nbf.saturating_sub(CLOCK_SKEW) {
            return Err(BrokerError::TokenNotYetValid { not_before: claims.nbf, now });
        }
        if !self.broker.principal_exists(&claims.oid) {
            return Err(BrokerError::PrincipalDeleted { object_id: claims.oid.clone() });
        }
        Ok(verified.caller.clone())
    }

    /// The caller a verified client certificate names (mTLS): the principal must exist.
    pub fn caller_for_principal(
        &self,
        object_id: &str,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<Caller, BrokerError> {
        let principal = self
            .broker
            .principal(object_id)
            .ok_or_else(|| BrokerError::PrincipalDeleted { object_id: object_id.to_string() })?;
        let issuer = self.broker.settings.issuer();
        Ok(Caller { peer, ..Caller::new(&principal.object_id, &principal.app_id, &issuer) })
    }
}

/// Most verified tokens remembered (a few hundred bytes of claims each).
const VERIFIED_TOKENS: usize = 100_000;

/// A token whose signature verified: its claims, and the caller it names (built once; each
/// request of the token shares its names).
struct Verified {
    claims: Claims,
    caller: Caller,
}

impl Verified {
    fn new(claims: Claims) -> Self {
        let valid_until = Some(crate::model::principal::CredentialEnd {
            at: claims.exp.saturating_add(CLOCK_SKEW),
            wall_clock: claims.wall_clock,
        });
        let caller = Caller { valid_until, ..Caller::new(&claims.oid, &claims.appid, &claims.iss) };
        Verified { claims, caller }
    }
}

/// Tokens whose signature verified, by SHA-256 of the token: a map under a
/// read-write lock (every call reads it; only a token's first call writes). When full, the
/// expired tokens are dropped, and if every token is still live, all of them (each is verified
/// again on its next call).
struct VerifiedTokens {
    map: RwLock<HashMap<[u8; 32], Arc<Verified>>>,
    capacity: usize,
}

impl VerifiedTokens {
    fn new(capacity: usize) -> Self {
        VerifiedTokens { map: RwLock::new(HashMap::new()), capacity }
    }

    fn get(&self, digest: &[u8; 32]) -> Option<Arc<Verified>> {
        self.map.read().unwrap_or_else(PoisonError::into_inner).get(digest).cloned()
    }

    fn insert(&self, digest: [u8; 32], token: Arc<Verified>, now: i64) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= self.capacity && !map.contains_key(&digest) {
            map.retain(|_, v| now < v.claims.exp.saturating_add(CLOCK_SKEW));
            if map.len() >= self.capacity {
                map.clear();
            }
        }
        map.insert(digest, token);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.read().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// The tonic interceptor that authenticates every request of one service (default deny).
#[derive(Clone)]
pub struct AuthInterceptor {
    auth: Arc<Authenticator>,
    plane: Plane,
}

impl AuthInterceptor {
    /// An interceptor for a service of `plane`.
    pub fn new(auth: Arc<Authenticator>, plane: Plane) -> Self {
        AuthInterceptor { auth, plane }
    }

    /// Authenticates the request's metadata; the edge turns an error into UNAUTHENTICATED.
    /// A bearer token, when present, decides; without one, the verified client certificate
    /// (`client_cert`: the leaf, DER) authenticates as the principal its SAN URI names.
    /// CIDRs of reverse proxies whose forwarded address is believed.
    pub fn trusted_proxies(&self) -> &[String] {
        &self.auth.broker.settings.trusted_proxies
    }

    /// Authenticates a request (see [`AuthInterceptor`]).
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        peer: Option<std::net::SocketAddr>,
        client_cert: Option<&[u8]>,
    ) -> Result<Caller, BrokerError> {
        let Some(header) = authorization else {
            let oid =
                client_cert.and_then(crate::tls::principal_from_cert).ok_or(BrokerError::MissingToken)?;
            return self.auth.caller_for_principal(&oid, peer);
        };
        let (scheme, token) = header.trim().split_once(' ').ok_or(BrokerError::MissingToken)?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(BrokerError::MissingToken);
        }
        let mut caller = self.auth.validate(token.trim(), self.plane)?;
        caller.peer = peer;
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Arc<Verified> {
        Arc::new(Verified::new(Claims {
            iss: "https://sts.windows.net/t/".to_string(),
            aud: Audience::One(VAULT_AUDIENCE.to_string()),
            sub: "s".to_string(),
            oid: "s".to_string(),
            tid: "t".to_string(),
            appid: "a".to_string(),
            idtyp: "app".to_string(),
            name: None,
            xms_mirid: None,
            wall_clock: false,
            iat: 0,
            nbf: 0,
            exp,
        }))
    }

    #[test]
    fn a_full_verified_token_cache_drops_expired_tokens_first_and_stays_bounded() {
        let cache = VerifiedTokens::new(3);
        let now = 1_000_000;
        cache.insert([1; 32], claims(now - CLOCK_SKEW - 1), now); // expired, skew included
        cache.insert([2; 32], claims(now + 3600), now);
        cache.insert([3; 32], claims(now + 3600), now);
        // Full: the expired token makes room, the live ones stay.
        cache.insert([4; 32], claims(now + 3600), now);
        assert!(cache.get(&[1; 32]).is_none());
        for live in [[2; 32], [3; 32], [4; 32]] {
            assert_eq!(cache.get(&live).map(|v| v.claims.exp), Some(now + 3600));
        }
        // Full of live tokens: it starts over rather than grow.
        cache.insert([5; 32], claims(now + 3600), now);
        assert_eq!(cache.len(), 1);
        assert!(cache.get(&[5; 32]).is_some());
        // A token already present is replaced in place, without dropping the others.
        cache.insert([6; 32], claims(now + 3600), now);
        cache.insert([6; 32], claims(now + 7200), now);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&[6; 32]).map(|v| v.claims.exp), Some(now + 7200));
    }
}
