//! Vault network rules (docs/RULES.md R3), decided on the real origin of a call: the connection's
//! peer address, or, for the broker's own calls on behalf of a server, a trusted service (SQL
//! logical server) or a subnet (managed instance). Checked before permissions, data plane only.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::model::{BrokerError, CallerDescription, Vault};

pub use crate::model::vault::Subnet;

/// Where a data-plane call comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The peer address (for clients) — never a header, unless from a trusted proxy.
    pub addr: Option<IpAddr>,
    /// A trusted Microsoft service (a SQL logical server acting for TDE).
    pub trusted_service: bool,
    /// The subnet the call comes from, when known by identity rather than by address (a
    /// managed instance's own subnet).
    pub subnet: Option<String>,
}

/// Whether `addr` lies in the CIDR `cidr` (`a.b.c.d/n` or IPv6).
pub fn cidr_contains(cidr: &str, addr: IpAddr) -> bool {
    let Some((net, len)) = cidr.split_once('/') else { return false };
    let (Ok(net), Ok(len)) = (net.parse::<IpAddr>(), len.parse::<u32>()) else { return false };
    match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) if len <= 128 => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        // An IPv4 client seen as an IPv4-mapped IPv6 address.
        (IpAddr::V4(_), IpAddr::V6(a)) => {
            a.to_ipv4_mapped().is_some_and(|v4| cidr_contains(cidr, IpAddr::V4(v4)))
        }
        _ => false,
    }
}

/// The client address of a connection: its peer, or the last address of `x-forwarded-for` when
/// the peer is one of the trusted proxies. A header from anyone else is ignored.
pub fn client_address(
    peer: Option<std::net::SocketAddr>,
    forwarded_for: Option<&str>,
    trusted_proxies: &[String],
) -> Option<std::net::SocketAddr> {
    let peer = peer?;
    if !trusted_proxies.iter().any(|c| cidr_contains(c, peer.ip())) {
        return Some(peer);
    }
    let forwarded =
        forwarded_for.and_then(|h| h.rsplit(',').next()).and_then(|a| a.trim().parse::<IpAddr>().ok());
    Some(forwarded.map_or(peer, |ip| std::net::SocketAddr::new(ip, 0)))
}

/// Whether the origin is inside one of `subnet_ids` (by its subnet, or by address).
fn in_any(subnet_ids: &[String], subnets: &BTreeMap<String, Subnet>, origin: &Origin) -> bool {
    subnet_ids.iter().any(|id| {
        origin.subnet.as_deref().is_some_and(|s| s.eq_ignore_ascii_case(id))
            || origin.addr.is_some_and(|a| {
                subnets
                    .get(&id.to_ascii_lowercase())
                    .is_some_and(|s| s.prefixes.iter().any(|c| cidr_contains(c, a)))
            })
    })
}

/// The address shown in denial texts.
fn shown(origin: &Origin) -> String {
    match (&origin.addr, &origin.subnet) {
        (Some(a), _) => a.to_string(),
        (None, Some(s)) => format!("(unknown address) from subnet {s}"),
        (None, None) => "(unknown)".to_string(),
    }
}

/// Decides whether the vault's network settings let the call in.
/// `bypass_available` is false in national clouds (English seed).
pub fn check(
    vault: &Vault,
    subnets: &BTreeMap<String, Subnet>,
    origin: &Origin,
    bypass_available: bool,
    caller: &CallerDescription,
    location: &str,
) -> Result<(), BrokerError> {
    let acl = &vault.network_acls;
    // Trusted services get through when the vault allows the bypass, also with public access
    // disabled ("The bypass continues to apply to trusted services").
    if origin.trusted_service && bypass_available && acl.bypass_azure_services {
        return Ok(());
    }
    // Traffic over a private endpoint is not subject to the public firewall.
    if in_any(&vault.private_endpoints, subnets, origin) {
        return Ok(());
    }
    if !vault.public_network_access {
        return Err(BrokerError::ForbiddenByConnection {
            caller: Box::new(caller.clone()),
            vault: vault.name.clone(),
            location: location.to_string(),
        });
    }
    if acl.default_allow {
        return Ok(());
    }
    let by_ip = origin.addr.is_some_and(|a| acl.ip_rules.iter().any(|c| cidr_contains(c, a)));
    if by_ip || in_any(&acl.virtual_network_rules, subnets, origin) {
        return Ok(());
    }
    Err(BrokerError::ForbiddenByFirewall {
        client: shown(origin),
        caller: Box::new(caller.clone()),
        vault: vault.name.clone(),
        location: location.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NetworkAcls;

    fn vault(acl: NetworkAcls, public: bool, pe: &[&str]) -> Vault {
        Vault {
            name: "v".into(),
            retention_days: 90,
            purge_protection: true,
            rbac: false,
            network_acls: acl,
            public_network_access: public,
            access_policies: Default::default(),
            private_endpoints: pe.iter().map(|s| s.to_string()).collect(),
            created: 0,
        }
    }

    fn deny(ip_rules: &[&str], vnets: &[&str], bypass: bool) -> NetworkAcls {
        NetworkAcls {
            default_allow: false,
            bypass_azure_services: bypass,
            ip_rules: ip_rules.iter().map(|s| s.to_string()).collect(),
            virtual_network_rules: vnets.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn subnets() -> BTreeMap<String, Subnet> {
        let mut m = BTreeMap::new();
        m.insert("/s/app".into(), Subnet { id: "/s/app".into(), prefixes: vec!["127.0.0.8/29".into()] });
        m.insert("/s/pe".into(), Subnet { id: "/s/pe".into(), prefixes: vec!["127.0.1.0/24".into()] });
        m
    }

    fn from(ip: &str) -> Origin {
        Origin { addr: Some(ip.parse().unwrap()), ..Default::default() }
    }

    fn who() -> CallerDescription {
        CallerDescription { app_id: "a".into(), object_id: "o".into(), issuer: "i".into() }
    }

    fn run(v: &Vault, o: &Origin) -> Result<(), BrokerError> {
        check(v, &subnets(), o, true, &who(), "westus")
    }

    #[test]
    fn ip_rules_admit_by_address_and_by_cidr() {
        let v = vault(deny(&["127.0.0.2/32", "127.0.0.64/26"], &[], false), true, &[]);
        assert!(run(&v, &from("127.0.0.2")).is_ok());
        assert!(run(&v, &from("127.0.0.100")).is_ok());
        let e = run(&v, &from("127.0.0.3")).unwrap_err();
        assert_eq!(e.code(), "ForbiddenByFirewall");
        assert!(e.to_string().contains("Client address: 127.0.0.3\r\n"));
    }

    #[test]
    fn vnet_rules_admit_addresses_of_the_subnet() {
        let v = vault(deny(&[], &["/S/APP"], false), true, &[]);
        assert!(run(&v, &from("127.0.0.9")).is_ok());
        assert!(run(&v, &from("127.0.0.17")).is_err());
        assert!(run(&v, &Origin { subnet: Some("/s/app".into()), ..Default::default() }).is_ok());
    }

    #[test]
    fn trusted_services_pass_only_with_bypass_and_where_it_is_available() {
        let trusted = Origin { trusted_service: true, ..Default::default() };
        assert!(run(&vault(deny(&[], &[], true), true, &[]), &trusted).is_ok());
        assert!(run(&vault(deny(&[], &[], false), true, &[]), &trusted).is_err());
        let national =
            check(&vault(deny(&[], &[], true), true, &[]), &subnets(), &trusted, false, &who(), "l");
        assert!(national.is_err());
        // The bypass still applies with public access disabled.
        assert!(run(&vault(deny(&[], &[], true), false, &[]), &trusted).is_ok());
    }

    #[test]
    fn public_access_disabled_admits_private_endpoints_only() {
        let v = vault(NetworkAcls::default(), false, &["/s/pe"]);
        assert!(run(&v, &from("127.0.1.7")).is_ok());
        let e = run(&v, &from("127.0.0.2")).unwrap_err();
        assert_eq!(e.code(), "ForbiddenByConnection");
        assert!(e.to_string().starts_with("Public network access is disabled and request is not from a trusted service nor via an approved private link."));
        assert!(run(&vault(NetworkAcls::default(), false, &[]), &from("127.0.1.7")).is_err());
    }

    #[test]
    fn default_allow_admits_everyone() {
        assert!(run(&vault(NetworkAcls::default(), true, &[]), &from("127.0.0.77")).is_ok());
    }

    #[test]
    fn forwarded_addresses_count_only_from_trusted_proxies() {
        let peer: std::net::SocketAddr = "127.0.0.9:5000".parse().unwrap();
        let proxies = vec!["127.0.0.8/29".to_string()];
        let via_proxy = client_address(Some(peer), Some("203.0.113.7, 127.0.0.44"), &proxies).unwrap();
        assert_eq!(via_proxy.ip().to_string(), "127.0.0.44");
        assert_eq!(client_address(Some(peer), Some("203.0.113.7"), &[]).unwrap(), peer);
        assert_eq!(client_address(Some(peer), Some("garbage"), &proxies).unwrap(), peer);
    }

    #[test]
    fn ipv4_mapped_ipv6_peers_match_ipv4_rules() {
        assert!(cidr_contains("127.0.0.0/8", "::ffff:127.0.0.5".parse().unwrap()));
        assert!(!cidr_contains("10.0.0.0/8", "::ffff:127.0.0.5".parse().unwrap()));
    }
}
