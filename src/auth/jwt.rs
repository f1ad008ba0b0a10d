//! Compact JWS (RFC 7515) with RS256 only: the broker signs and verifies its own tokens. The
//! header is checked strictly (`alg` must be RS256 and `kid` the broker's), which rules out
//! algorithm-confusion tricks such as `alg: none` or HS256 keyed with the public key.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::{Deserialize, Serialize};

use crate::crypto::TokenSigningKey;
use crate::model::BrokerError;

/// Largest token accepted, to bound work on hostile input.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// `aud`: a string or a list of strings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// One audience.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Audience {
    /// One audience as a string, several as a list.
    pub fn from_list(list: &[&str]) -> Self {
        match list {
            [one] => Audience::One((*one).to_string()),
            many => Audience::Many(many.iter().map(|s| s.to_string()).collect()),
        }
    }

    /// Every audience.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let slice: &[String] = match self {
            Audience::One(s) => std::slice::from_ref(s),
            Audience::Many(v) => v,
        };
        slice.iter().map(String::as_str)
    }

    /// Comma-joined, for error texts.
    pub fn joined(&self) -> String {
        self.iter().collect::<Vec<_>>().join(", ")
    }
}

/// The claims the broker issues (the cloud's names).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    /// `https://sts.windows.net/{tenant}/`.
    pub iss: String,
    /// Audience(s).
    pub aud: Audience,
    /// Subject (the object id).
    pub sub: String,
    /// Object id of the principal.
    pub oid: String,
    /// Tenant id.
    pub tid: String,
    /// Application id.
    pub appid: String,
    /// `user` or `app`.
    pub idtyp: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Resource id of a managed identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xms_mirid: Option<String>,
    /// `true` on an operator's token (the bootstrap admin's): its times are wall-clock time,
    /// checked against the system clock, so moving the manual clock never locks the operator
    /// out. Every other token's times are the broker's clock. Signed like every claim.
    #[serde(default, rename = "xms_tb_wall_clock", skip_serializing_if = "std::ops::Not::not")]
    pub wall_clock: bool,
    /// Issued at.
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Expiry.
    pub exp: i64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

fn invalid(reason: &str) -> BrokerError {
    BrokerError::InvalidToken { reason: reason.to_string() }
}

/// Signs `claims` into a compact JWS.
pub fn encode(claims: &Claims, kid: &str, key: &TokenSigningKey) -> Result<String, BrokerError> {
    let header = Header { alg: "RS256".into(), typ: "JWT".into(), kid: kid.into() };
    let h = serde_json::to_vec(&header).map_err(|_| BrokerError::Internal)?;
    let c = serde_json::to_vec(claims).map_err(|_| BrokerError::Internal)?;
    let signing_input = format!("{}.{}", B64URL.encode(h), B64URL.encode(c));
    let sig = key.sign(signing_input.as_bytes()).map_err(|_| BrokerError::Internal)?;
    Ok(format!("{signing_input}.{}", B64URL.encode(sig)))
}

/// Verifies the signature and header of a compact JWS and returns its claims. Time, issuer and
/// audience are checked by the caller.
pub fn decode(token: &str, kid: &str, key: &TokenSigningKey) -> Result<Claims, BrokerError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(invalid("IDX10400: the token is too large."));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(invalid("IDX12741: the token is not a well-formed JWT (three dot-separated parts)."));
    };
    let header: Header = B64URL
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| invalid("IDX12729: the token header does not decode."))?;
    if header.alg != "RS256" {
        return Err(invalid("IDX10511: only RS256 tokens are accepted."));
    }
    if header.kid != kid {
        return Err(invalid("IDX10503: the token was not signed by this broker's key."));
    }
    let sig = B64URL.decode(s).map_err(|_| invalid("IDX10511: the signature does not decode."))?;
    let signing_input_len = h.len() + 1 + c.len();
    key.verify(&token.as_bytes()[..signing_input_len], &sig)
        .map_err(|_| invalid("IDX10511: Signature validation failed."))?;
    B64URL
        .decode(c)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| invalid("IDX12723: the token claims do not decode."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            iss: "https://sts.windows.net/t/".into(),
            aud: Audience::from_list(&["a", "b"]),
            sub: "o".into(),
            oid: "o".into(),
            tid: "t".into(),
            appid: "app".into(),
            idtyp: "user".into(),
            name: None,
            xms_mirid: None,
            wall_clock: false,
            iat: 1,
            nbf: 1,
            exp: 2,
        }
    }

    #[test]
    fn signed_tokens_round_trip() {
        let (key, _) = TokenSigningKey::generate().unwrap();
        let t = encode(&claims(), "k1", &key).unwrap();
        let c = decode(&t, "k1", &key).unwrap();
        assert_eq!(c.oid, "o");
        assert_eq!(c.aud.joined(), "a, b");
    }

    #[test]
    fn forged_tampered_and_foreign_tokens_are_refused() {
        let (key, _) = TokenSigningKey::generate().unwrap();
        let (other, _) = TokenSigningKey::generate().unwrap();
        let t = encode(&claims(), "k1", &key).unwrap();
        // Signed by another key.
        assert!(decode(&encode(&claims(), "k1", &other).unwrap(), "k1", &key).is_err());
        // Claims swapped after signing.
        let mut forged = claims();
        forged.oid = "admin".into();
        let forged_payload = B64URL.encode(serde_json::to_vec(&forged).unwrap());
        let parts: Vec<&str> = t.split('.').collect();
        assert!(decode(&format!("{}.{}.{}", parts[0], forged_payload, parts[2]), "k1", &key).is_err());
        // alg none.
        let none = B64URL.encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#);
        assert!(decode(&format!("{none}.{}.", parts[1]), "k1", &key).is_err());
        // Garbage.
        for junk in ["", "a.b", "a.b.c.d", "...", "\u{0}.\u{0}.\u{0}"] {
            assert_eq!(decode(junk, "k1", &key).unwrap_err().code(), "Unauthorized");
        }
        assert!(decode(&t, "k2", &key).is_err());
    }
}
