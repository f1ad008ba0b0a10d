//! Authentication (docs/API.md, Authentication; docs/RULES.md R5): the broker issues RS256 JWTs
//! with the cloud's claims and validates them on every call — signature, issuer, audience, lifetime
//! on the broker's clock, and that the principal still exists. The interceptor puts the [`Caller`]
//! into the request's extensions; a request without one never reaches a handler.

pub mod jwt;
pub mod secret;

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

/// The local Key Vault resource: the audience SDKs ask for when a vault's URL is
/// `https://<vault>.vault.localhost[:port]` (they take the resource from the bearer challenge).
pub const VAULT_LOCAL_AUDIENCE: &str = "https://vault.localhost";

/// Whether `aud` names the local Key Vault resource: `https://vault.localhost`, optionally with
/// a port (1-65535), a trailing slash or `/.default`, in any case.
pub fn is_local_vault_audience(aud: &str) -> bool {
    let a = aud.trim();
    let a = a.strip_suffix("/.default").unwrap_or(a).trim_end_matches('/');
    let Some(prefix) = a.get(..VAULT_LOCAL_AUDIENCE.len()) else {
        return false;
    };
    if !prefix.eq_ignore_ascii_case(VAULT_LOCAL_AUDIENCE) {
        return false;
    }
    match &a[VAULT_LOCAL_AUDIENCE.len()..] {
        "" => true,
        rest => rest.strip_prefix(':').is_some_and(|port| {
            !port.is_empty()
                && port.len() <= 5
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        }),
    }
}

/// The canonical audience for a requested resource: the Key Vault or ARM resource, with or
/// without a trailing slash or `/.default` (an empty request means Key Vault). The local vault
/// resource (`https://vault.localhost[:port]`, see [`is_local_vault_audience`]) is Key Vault:
/// its tokens carry the cloud's audience, which every vault URL accepts.
pub fn canonical_audience(requested: &str) -> Result<&'static str, BrokerError> {
    let r = requested.trim();
    let r = r.strip_suffix("/.default").unwrap_or(r).trim_end_matches('/');
    if r.is_empty()
        || r.eq_ignore_ascii_case(VAULT_AUDIENCE)
        || r.eq_ignore_ascii_case(VAULT_APP_ID)
        || is_local_vault_audience(r)
    {
        Ok(VAULT_AUDIENCE)
    } else if r.eq_ignore_ascii_case(MANAGEMENT_AUDIENCE.trim_end_matches('/')) {
        Ok(MANAGEMENT_AUDIENCE)
    } else {
        Err(BrokerError::bad_parameter(format!(
            "The audience '{}' is not served here. Use {VAULT_AUDIENCE}, {VAULT_LOCAL_AUDIENCE}[:port] or {MANAGEMENT_AUDIENCE}.",
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
            Plane::Data => {
                aud.trim_end_matches('/') == VAULT_AUDIENCE
                    || aud == VAULT_APP_ID
                    || is_local_vault_audience(aud)
            }
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

    /// Issues an application's token for one audience: a managed identity's (with `xms_mirid`
    /// naming its resource) or a service principal's (client credentials; no `xms_mirid`).
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

    /// The `kid` of the signing key (the header of every issued token).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JSON Web Key Set of the signing key (an OpenID authority's `jwks_uri`): one RSA
    /// key, `use` `sig`, `alg` RS256, named by the tokens' `kid`.
    pub fn jwks(&self) -> Result<serde_json::Value, BrokerError> {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let (n, e) = rsa_public_key_parts(self.key.public_key_der()).ok_or(BrokerError::Internal)?;
        Ok(serde_json::json!({
            "keys": [{
                "kty": "RSA",
                "use": "sig",
                "alg": "RS256",
                "kid": self.kid,
                "n": b64(n),
                "e": b64(e),
            }]
        }))
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

/// The modulus and exponent of a PKCS#1 `RSAPublicKey` (DER: `SEQUENCE { INTEGER n, INTEGER e }`),
/// big-endian without leading zero bytes, as a JWK carries them.
fn rsa_public_key_parts(der: &[u8]) -> Option<(&[u8], &[u8])> {
    /// One DER element of `tag` at the start of `input`: its contents and what follows.
    fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (&t, rest) = input.split_first()?;
        if t != tag {
            return None;
        }
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            let len = rest[..count].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, &rest[count..])
        };
        (rest.len() >= len).then(|| rest.split_at(len))
    }
    fn unsigned(int: &[u8]) -> &[u8] {
        let start = int.iter().position(|&b| b != 0).unwrap_or(int.len().saturating_sub(1));
        &int[start..]
    }
    let (seq, trailing) = element(der, 0x30)?;
    let (n, rest) = element(seq, 0x02)?;
    let (e, rest) = element(rest, 0x02)?;
    (trailing.is_empty() && rest.is_empty() && !n.is_empty() && !e.is_empty())
        .then(|| (unsigned(n), unsigned(e)))
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
    fn local_vault_audiences_with_or_without_a_port_are_key_vault() {
        for aud in [
            "https://vault.localhost",
            "https://vault.localhost/",
            "https://vault.localhost:8443",
            "https://vault.localhost:8443/.default",
            "HTTPS://Vault.LocalHost:1",
            "https://vault.azure.net/.default",
            "https://vault.azure.net",
            "",
        ] {
            assert_eq!(canonical_audience(aud).ok(), Some(VAULT_AUDIENCE), "{aud}");
        }
        for aud in ["https://management.azure.com/.default", "https://management.azure.com"] {
            assert_eq!(canonical_audience(aud).ok(), Some(MANAGEMENT_AUDIENCE), "{aud}");
        }
        for aud in [
            "https://vault.localhost:0",
            "https://vault.localhost:65536",
            "https://vault.localhost:",
            "https://vault.localhost:84a3",
            "https://vault.localhost.evil.example",
            "https://vault.localhostx",
            "http://vault.localhost",
            "https://storage.azure.com",
        ] {
            assert!(canonical_audience(aud).is_err(), "{aud} must be refused");
            assert!(!Plane::Data.accepts(aud), "{aud} must not pass the data plane");
        }
    }

    #[test]
    fn data_tokens_pass_the_data_plane_whichever_vault_audience_they_carry() {
        for aud in [VAULT_AUDIENCE, VAULT_APP_ID, "https://vault.localhost", "https://vault.localhost:8443"] {
            assert!(Plane::Data.accepts(aud), "{aud}");
            assert!(!Plane::Control.accepts(aud), "{aud} is not a control-plane audience");
        }
        assert!(Plane::Control.accepts(MANAGEMENT_AUDIENCE));
        assert!(!Plane::Data.accepts(MANAGEMENT_AUDIENCE));
    }

    #[test]
    fn the_jwks_publishes_the_signing_keys_modulus_and_exponent() {
        let (key, _) = TokenSigningKey::generate().unwrap();
        let (n, e) = rsa_public_key_parts(key.public_key_der()).expect("PKCS#1 public key");
        assert_eq!(n.len(), 256, "RSA-2048 modulus without a leading zero");
        assert_eq!(e, [1, 0, 1]);
        assert!(rsa_public_key_parts(&key.public_key_der()[1..]).is_none());
        assert!(rsa_public_key_parts(&[]).is_none());
        assert!(rsa_public_key_parts(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
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
