//! Identifiers in the cloud's shapes: vault names, key names, key versions and key URIs
//! (docs/RULES.md, Domain: `https://{vault}.{suffix}/keys/{name}/{version}`).

use std::borrow::Cow;

use super::error::BrokerError;

/// Validates a vault name: 3–24 characters, letters, digits and hyphens, starting with a letter,
/// ending with a letter or digit, no consecutive hyphens (the cloud's rule). Returns it lower-cased,
/// since vault names are case-insensitive.
pub fn vault_name(name: &str) -> Result<String, BrokerError> {
    vault_name_of(name).map(Cow::into_owned)
}

/// [`vault_name`] borrowed when the name is already lower case (every wrap and unwrap parses one).
pub fn vault_name_of(name: &str) -> Result<Cow<'_, str>, BrokerError> {
    let ok = (3..=24).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !name.contains("--");
    if ok {
        Ok(key_index_of(name))
    } else {
        Err(BrokerError::bad_parameter(format!(
            "The vault name '{}' is invalid. A vault's name must be between 3-24 alphanumeric characters. The name must begin with a letter, end with a letter or digit, and not contain consecutive hyphens.",
            printable(name)
        )))
    }
}

/// Validates a key name: 1–127 characters of `0-9 a-z A-Z -` (SPEC75 pattern `^[0-9a-zA-Z-]+$`).
/// Key names are case-insensitive: callers index keys by [`key_index`].
pub fn key_name(name: &str) -> Result<&str, BrokerError> {
    if (1..=127).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        Ok(name)
    } else {
        Err(BrokerError::bad_parameter(format!(
            "The key name '{}' is invalid. A key name must be 1-127 characters long and contain only 0-9, a-z, A-Z and -.",
            printable(name)
        )))
    }
}

/// The case-insensitive index of a key name.
pub fn key_index(name: &str) -> String {
    key_index_of(name).into_owned()
}

/// [`key_index`] borrowed when the name is already lower case: lookups (every wrap and unwrap
/// does several) copy nothing for the names clients usually send.
pub fn key_index_of(name: &str) -> Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// Validates a key version: 32 lowercase hexadecimal characters (system generated).
pub fn key_version(version: &str) -> Result<&str, BrokerError> {
    if version.len() == 32 && version.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(version)
    } else {
        Err(BrokerError::bad_parameter(format!(
            "The key version '{}' is invalid. A key version is 32 lowercase hexadecimal characters.",
            printable(version)
        )))
    }
}

/// A parsed key URI: `https://{vault}.{suffix}[:port]/keys/{name}[/{version}][/]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyId {
    /// Vault name, lower-cased.
    pub vault: String,
    /// Key name as written by the caller.
    pub name: String,
    /// Specific version, or `None` for the newest.
    pub version: Option<String>,
}

impl KeyId {
    /// Parses a key URI whose host must be `{vault}.{suffix}` (case-insensitive).
    pub fn parse(uri: &str, suffix: &str) -> Result<Self, BrokerError> {
        KeyIdRef::parse(uri, suffix).map(|id| KeyId {
            vault: id.vault.into_owned(),
            name: id.name.to_string(),
            version: id.version.map(str::to_string),
        })
    }
}

/// A [`KeyId`] that borrows its parts from the URI (the vault name is copied only when it has
/// upper-case letters): the hot path parses one per call and keeps none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyIdRef<'a> {
    /// Vault name, lower-cased.
    pub vault: Cow<'a, str>,
    /// Key name as written by the caller.
    pub name: &'a str,
    /// Specific version, or `None` for the newest.
    pub version: Option<&'a str>,
}

impl<'a> KeyIdRef<'a> {
    /// Parses a key URI whose host must be `{vault}.{suffix}` (case-insensitive).
    pub fn parse(uri: &'a str, suffix: &str) -> Result<Self, BrokerError> {
        let bad = || {
            BrokerError::bad_parameter(format!(
                "The key identifier '{}' is invalid. Expected https://{{vault-name}}.{suffix}/keys/{{key-name}}[/{{key-version}}].",
                printable(uri)
            ))
        };
        let rest = strip_prefix_ignore_case(uri, "https://").ok_or_else(bad)?;
        let (authority, path) = rest.split_once('/').ok_or_else(bad)?;
        let host = authority.split_once(':').map_or(authority, |(h, _port)| h);
        let vault = host
            .len()
            .checked_sub(suffix.len() + 1)
            .filter(|&cut| {
                host.is_char_boundary(cut)
                    && host[cut..].starts_with('.')
                    && host[cut + 1..].eq_ignore_ascii_case(suffix)
            })
            .map(|cut| &host[..cut])
            .ok_or_else(bad)?;
        let vault = vault_name_of(vault)?;
        let path = path.strip_suffix('/').unwrap_or(path);
        let mut parts = path.split('/');
        if parts.next() != Some("keys") {
            return Err(bad());
        }
        let name = key_name(parts.next().ok_or_else(bad)?)?;
        let version = match parts.next() {
            None | Some("") => None,
            Some(v) => Some(key_version(v)?),
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(KeyIdRef { vault, name, version })
    }
}

/// `https://{vault}.{suffix}`.
pub fn vault_uri(vault: &str, suffix: &str) -> String {
    format!("https://{vault}.{suffix}")
}

/// `https://{vault}.{suffix}/keys/{name}` or with `/{version}`.
pub fn key_uri(vault: &str, suffix: &str, name: &str, version: Option<&str>) -> String {
    // Built by hand, in one allocation: every wrap and unwrap answers with this kid.
    let parts = ["https://", vault, ".", suffix, "/keys/", name];
    let extra = version.map_or(0, |v| 1 + v.len());
    let mut uri = String::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + extra);
    for part in parts {
        uri.push_str(part);
    }
    if let Some(v) = version {
        uri.push('/');
        uri.push_str(v);
    }
    uri
}

/// `https://{vault}.{suffix}/deletedkeys/{name}`.
pub fn recovery_id(vault: &str, suffix: &str, name: &str) -> String {
    format!("https://{vault}.{suffix}/deletedkeys/{name}")
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

/// Caller-supplied text made safe to echo in an error: control characters escaped, length capped.
pub fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(200).flat_map(char::escape_debug).collect();
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUFFIX: &str = "vault.azure.net";

    #[test]
    fn key_indexes_borrow_lower_case_names_and_lower_the_others() {
        assert!(matches!(key_index_of("my-key-01"), Cow::Borrowed("my-key-01")));
        assert!(matches!(key_index_of("My-Key"), Cow::Owned(ref s) if s == "my-key"));
        for name in ["my-key-01", "My-Key", "MYKEY"] {
            assert_eq!(key_index(name), key_index_of(name));
        }
    }

    #[test]
    fn key_uris_are_built_the_cloud_way() {
        assert_eq!(
            key_uri("v1", "vault.azure.net", "k", Some("0123abcd")),
            "https://v1.vault.azure.net/keys/k/0123abcd"
        );
        assert_eq!(key_uri("v1", "vault.azure.net", "k", None), "https://v1.vault.azure.net/keys/k");
    }

    #[test]
    fn key_uri_with_version_parses() {
        let id = KeyId::parse(
            "https://MyVault.vault.azure.net/keys/tde-key/0698c2156c1a4e1da5b6bab6f6422fd6",
            SUFFIX,
        )
        .unwrap();
        assert_eq!(id.vault, "myvault");
        assert_eq!(id.name, "tde-key");
        assert_eq!(id.version.as_deref(), Some("0698c2156c1a4e1da5b6bab6f6422fd6"));
    }

    #[test]
    fn key_uri_without_version_or_with_trailing_slash_means_latest() {
        for uri in [
            "https://vault1.vault.azure.net/keys/k",
            "https://vault1.vault.azure.net/keys/k/",
            "https://vault1.vault.azure.net:8443/keys/k",
        ] {
            let id = KeyId::parse(uri, SUFFIX).unwrap();
            assert_eq!((id.vault.as_str(), id.name.as_str(), id.version), ("vault1", "k", None));
        }
    }

    #[test]
    fn key_id_refs_borrow_their_parts_and_lower_the_vault_name() {
        let uri = format!("https://Vault1.{SUFFIX}/keys/Key-A/{}", "0123456789abcdef0123456789abcdef");
        let id = KeyIdRef::parse(&uri, SUFFIX).unwrap();
        assert_eq!(id.vault, "vault1");
        assert!(matches!(id.vault, Cow::Owned(_)));
        assert_eq!((id.name, id.version), ("Key-A", Some("0123456789abcdef0123456789abcdef")));
        let lower = format!("https://vault1.{SUFFIX}/keys/k");
        let id = KeyIdRef::parse(&lower, SUFFIX).unwrap();
        assert!(matches!(id.vault, Cow::Borrowed("vault1")));
        assert_eq!(KeyId::parse(&uri, SUFFIX).unwrap().vault, "vault1");
    }

    #[test]
    fn malformed_key_uris_are_bad_parameters() {
        for uri in [
            "",
            "http://vault1.vault.azure.net/keys/k",
            "https://vault1.example.com/keys/k",
            "https://vault1.vault.azure.net/secrets/k",
            "https://vault1.vault.azure.net/keys/",
            "https://vault1.vault.azure.net/keys/k/NOTHEX",
            "https://vault1.vault.azure.net/keys/k/0698c2156c1a4e1da5b6bab6f6422fd6/x",
            "https://v.vault.azure.net/keys/k",
            "https://vault1.vault.azure.net/keys/bad_name",
            "https://\u{e9}\u{e9}.vault.azure.net/keys/k",
            "https://vault.azure.net/keys/k",
        ] {
            let err = KeyId::parse(uri, SUFFIX).unwrap_err();
            assert_eq!(err.code(), "BadParameter", "{uri}");
        }
    }

    #[test]
    fn vault_names_follow_the_cloud_rule() {
        assert_eq!(vault_name("Contoso-Vault2").unwrap(), "contoso-vault2");
        for bad in ["ab", "1abc", "abc-", "a--b", "a_bc", &"a".repeat(25)] {
            assert!(vault_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn printable_escapes_control_characters_and_caps_length() {
        assert_eq!(printable("a\nb"), "a\\nb");
        assert_eq!(printable(&"x".repeat(300)).chars().count(), 201);
    }
}
