//! Vaults: soft-delete retention, purge protection, permission model, network settings
//! (docs/RULES.md, Domain; network rules are enforced by a later issue, stored and validated here).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::error::BrokerError;
use super::ids::printable;

/// The cloud's default soft-delete retention.
pub const DEFAULT_RETENTION_DAYS: i32 = 90;

/// Key permissions of an access policy (docs/RULES.md R2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)]
pub enum KeyPermission {
    Get,
    List,
    Update,
    Create,
    Import,
    Delete,
    Recover,
    Backup,
    Restore,
    Decrypt,
    Encrypt,
    UnwrapKey,
    WrapKey,
    Sign,
    Verify,
    Purge,
    Rotate,
    /// Read a key's rotation policy.
    GetRotationPolicy,
    /// Set a key's rotation policy.
    SetRotationPolicy,
}

impl KeyPermission {
    /// Every key permission.
    pub const ALL: [KeyPermission; 19] = [
        KeyPermission::Get,
        KeyPermission::List,
        KeyPermission::Update,
        KeyPermission::Create,
        KeyPermission::Import,
        KeyPermission::Delete,
        KeyPermission::Recover,
        KeyPermission::Backup,
        KeyPermission::Restore,
        KeyPermission::Decrypt,
        KeyPermission::Encrypt,
        KeyPermission::UnwrapKey,
        KeyPermission::WrapKey,
        KeyPermission::Sign,
        KeyPermission::Verify,
        KeyPermission::Purge,
        KeyPermission::Rotate,
        KeyPermission::GetRotationPolicy,
        KeyPermission::SetRotationPolicy,
    ];

    /// The cloud's spelling (`unwrapKey`, …), as in denial texts.
    pub fn name(self) -> &'static str {
        use KeyPermission::*;
        match self {
            Get => "get",
            List => "list",
            Update => "update",
            Create => "create",
            Import => "import",
            Delete => "delete",
            Recover => "recover",
            Backup => "backup",
            Restore => "restore",
            Decrypt => "decrypt",
            Encrypt => "encrypt",
            UnwrapKey => "unwrapKey",
            WrapKey => "wrapKey",
            Sign => "sign",
            Verify => "verify",
            Purge => "purge",
            Rotate => "rotate",
            GetRotationPolicy => "getrotationpolicy",
            SetRotationPolicy => "setrotationpolicy",
        }
    }

    /// Parses a permission name, case-insensitively (as ARM does).
    pub fn parse(s: &str) -> Result<Self, BrokerError> {
        Self::ALL.into_iter().find(|p| p.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            BrokerError::bad_parameter(format!(
                "The key permission '{}' is invalid. Valid permissions are get, list, update, create, import, delete, recover, backup, restore, decrypt, encrypt, unwrapKey, wrapKey, sign, verify, purge, rotate, getrotationpolicy, setrotationpolicy.",
                printable(s)
            ))
        })
    }
}

/// Firewall settings of a vault (ARM `networkAcls`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAcls {
    /// `true` = "Allow", `false` = "Deny".
    pub default_allow: bool,
    /// `true` = "AzureServices", `false` = "None".
    pub bypass_azure_services: bool,
    /// Normalised CIDRs (a single address becomes /32 or /128).
    pub ip_rules: Vec<String>,
    /// Subnet resource ids.
    pub virtual_network_rules: Vec<String>,
}

impl Default for NetworkAcls {
    fn default() -> Self {
        NetworkAcls {
            default_allow: true,
            bypass_azure_services: true,
            ip_rules: vec![],
            virtual_network_rules: vec![],
        }
    }
}

impl NetworkAcls {
    /// Builds validated ACLs from the wire's strings; empty strings take the defaults.
    pub fn parse(
        default_action: &str,
        bypass: &str,
        ip_rules: &[String],
        virtual_network_rules: &[String],
    ) -> Result<Self, BrokerError> {
        let default_allow = match default_action {
            "" | "Allow" => true,
            "Deny" => false,
            other => {
                return Err(BrokerError::bad_parameter(format!(
                    "The network default action '{}' is invalid. Use Allow or Deny.",
                    printable(other)
                )));
            }
        };
        let bypass_azure_services = match bypass {
            "" | "AzureServices" => true,
            "None" => false,
            other => {
                return Err(BrokerError::bad_parameter(format!(
                    "The network bypass '{}' is invalid. Use AzureServices or None.",
                    printable(other)
                )));
            }
        };
        let mut rules = ip_rules.iter().map(|r| normalise_cidr(r)).collect::<Result<Vec<_>, _>>()?;
        rules.sort();
        rules.dedup();
        let mut vnets: Vec<String> = virtual_network_rules.to_vec();
        vnets.sort();
        vnets.dedup();
        Ok(NetworkAcls {
            default_allow,
            bypass_azure_services,
            ip_rules: rules,
            virtual_network_rules: vnets,
        })
    }
}

/// Parses `addr` or `addr/prefix`, returning the canonical `network/prefix` form.
pub fn normalise_cidr(rule: &str) -> Result<String, BrokerError> {
    let bad = || {
        BrokerError::bad_parameter(format!(
            "The IP rule '{}' is invalid. Use an IPv4 or IPv6 address or CIDR range.",
            printable(rule)
        ))
    };
    let (addr, prefix) = match rule.trim().split_once('/') {
        Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
        None => (rule.trim(), None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = prefix.unwrap_or(max);
    if prefix > max {
        return Err(bad());
    }
    let network = match addr {
        IpAddr::V4(a) => {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
            IpAddr::from((u32::from(a) & mask).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
            IpAddr::from((u128::from(a) & mask).to_be_bytes())
        }
    };
    Ok(format!("{network}/{prefix}"))
}

/// A subnet resource id mapped to address ranges, so that VNet rules and private endpoints
/// apply to real peer addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    /// `/subscriptions/…/virtualNetworks/{vnet}/subnets/{name}`.
    pub id: String,
    /// Normalised CIDRs.
    pub prefixes: Vec<String>,
}

/// Validates a subnet resource id.
pub fn subnet_id(id: &str) -> Result<String, BrokerError> {
    let parts: Vec<&str> = id.trim().trim_end_matches('/').split('/').collect();
    let ok = parts.len() == 11
        && parts[0].is_empty()
        && parts[1].eq_ignore_ascii_case("subscriptions")
        && parts[3].eq_ignore_ascii_case("resourceGroups")
        && parts[5].eq_ignore_ascii_case("providers")
        && parts[6].eq_ignore_ascii_case("Microsoft.Network")
        && parts[7].eq_ignore_ascii_case("virtualNetworks")
        && parts[9].eq_ignore_ascii_case("subnets")
        && [2, 4, 8, 10].iter().all(|&i| !parts[i].is_empty() && !parts[i].contains(char::is_whitespace));
    if ok {
        Ok(parts.join("/"))
    } else {
        Err(BrokerError::bad_parameter(format!(
            "The subnet id '{}' is invalid. Expected /subscriptions/{{sub}}/resourceGroups/{{rg}}/providers/Microsoft.Network/virtualNetworks/{{vnet}}/subnets/{{name}}.",
            printable(id)
        )))
    }
}

/// A key vault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vault {
    /// Lower-cased name.
    pub name: String,
    /// Soft-delete retention, 7–90 days, fixed at creation.
    pub retention_days: i32,
    /// Irreversible once on: deleted keys cannot be purged before retention ends.
    pub purge_protection: bool,
    /// RBAC permission model instead of access policies.
    pub rbac: bool,
    /// Firewall settings.
    pub network_acls: NetworkAcls,
    /// `false` = publicNetworkAccess Disabled.
    pub public_network_access: bool,
    /// Access policies: object id → key permissions.
    pub access_policies: BTreeMap<String, BTreeSet<KeyPermission>>,
    /// Subnets with a private endpoint to this vault.
    #[serde(default)]
    pub private_endpoints: Vec<String>,
    /// Creation time.
    pub created: i64,
}

impl Vault {
    /// Validates retention (0 = default 90).
    pub fn retention(days: i32) -> Result<i32, BrokerError> {
        match days {
            0 => Ok(DEFAULT_RETENTION_DAYS),
            7..=90 => Ok(days),
            d => Err(BrokerError::bad_parameter(format!(
                "The soft delete retention period {d} is invalid. It must be between 7 and 90 days."
            ))),
        }
    }

    /// Parses `public_network_access` ("" = Enabled).
    pub fn parse_public_access(s: &str) -> Result<bool, BrokerError> {
        match s {
            "" | "Enabled" => Ok(true),
            "Disabled" => Ok(false),
            other => Err(BrokerError::bad_parameter(format!(
                "The public network access value '{}' is invalid. Use Enabled or Disabled.",
                printable(other)
            ))),
        }
    }

    /// Key Vault's DeletionRecoveryLevel for keys in this vault (soft delete is always on).
    pub fn recovery_level(&self) -> &'static str {
        match (self.retention_days < DEFAULT_RETENTION_DAYS, self.purge_protection) {
            (false, false) => "Recoverable+Purgeable",
            (false, true) => "Recoverable",
            (true, false) => "CustomizedRecoverable+Purgeable",
            (true, true) => "CustomizedRecoverable",
        }
    }

    /// Turning purge protection off is refused; on stays on.
    pub fn set_purge_protection(&mut self, on: bool) -> Result<(), BrokerError> {
        if self.purge_protection && !on {
            return Err(BrokerError::PurgeProtectionIrreversible);
        }
        self.purge_protection = on;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault() -> Vault {
        Vault {
            name: "v".into(),
            retention_days: 90,
            purge_protection: false,
            rbac: false,
            network_acls: NetworkAcls::default(),
            public_network_access: true,
            access_policies: BTreeMap::new(),
            private_endpoints: vec![],
            created: 0,
        }
    }

    #[test]
    fn purge_protection_cannot_be_turned_off() {
        let mut v = vault();
        v.set_purge_protection(true).unwrap();
        assert_eq!(v.set_purge_protection(false), Err(BrokerError::PurgeProtectionIrreversible));
        assert!(v.purge_protection);
    }

    #[test]
    fn retention_is_between_7_and_90_days() {
        assert_eq!(Vault::retention(0).unwrap(), 90);
        assert_eq!(Vault::retention(7).unwrap(), 7);
        assert!(Vault::retention(6).is_err());
        assert!(Vault::retention(91).is_err());
    }

    #[test]
    fn recovery_level_follows_retention_and_purge_protection() {
        let mut v = vault();
        assert_eq!(v.recovery_level(), "Recoverable+Purgeable");
        v.purge_protection = true;
        assert_eq!(v.recovery_level(), "Recoverable");
        v.retention_days = 7;
        assert_eq!(v.recovery_level(), "CustomizedRecoverable");
    }

    #[test]
    fn single_addresses_are_normalised_to_host_prefixes() {
        assert_eq!(normalise_cidr("124.56.78.91").unwrap(), "124.56.78.91/32");
        assert_eq!(normalise_cidr("10.1.2.3/8").unwrap(), "10.0.0.0/8");
        assert_eq!(normalise_cidr("2001:db8::1").unwrap(), "2001:db8::1/128");
        assert!(normalise_cidr("10.0.0.0/33").is_err());
        assert!(normalise_cidr("nonsense").is_err());
    }

    #[test]
    fn key_permissions_parse_case_insensitively() {
        assert_eq!(KeyPermission::parse("UnwrapKey").unwrap(), KeyPermission::UnwrapKey);
        assert_eq!(KeyPermission::parse("SIGN").unwrap(), KeyPermission::Sign);
        assert_eq!(KeyPermission::parse("verify").unwrap(), KeyPermission::Verify);
        assert!(KeyPermission::parse("release").is_err());
    }
}
