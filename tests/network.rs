//! docs/RULES.md R3 over real gRPC: vault firewalls judged on the real peer address of each
//! connection (client sockets bound to 127.0.0.2, 127.0.0.3, … before connecting), VNet rules,
//! private endpoints, and the trusted-service bypass for SQL servers' TDE calls.

mod common;

use common::*;
use tde_broker::grpc::proto;
use tonic::Code;

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const TDE_PERMS: [&str; 3] = ["get", "wrapKey", "unwrapKey"];
const APP_SUBNET: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/net-rg/providers/Microsoft.Network/virtualNetworks/vnet1/subnets/app";
const PE_SUBNET: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/net-rg/providers/Microsoft.Network/virtualNetworks/vnet1/subnets/pe";

fn deny(ip_rules: &[&str], vnets: &[&str], bypass: &str) -> proto::NetworkAcls {
    proto::NetworkAcls {
        default_action: "Deny".into(),
        bypass: bypass.into(),
        ip_rules: ip_rules.iter().map(|s| s.to_string()).collect(),
        virtual_network_rules: vnets.iter().map(|s| s.to_string()).collect(),
    }
}

fn allow() -> proto::NetworkAcls {
    proto::NetworkAcls {
        default_action: "Allow".into(),
        bypass: "AzureServices".into(),
        ..Default::default()
    }
}

/// A vault with one key and a user holding every key permission.
async fn setup(b: &TestBroker, vault: &str) -> (String, Who) {
    b.vault(vault, true).await;
    b.key(vault, "k", "RSA", 2048).await;
    let user = b.user(&format!("{vault}-user")).await;
    b.policy(vault, &user.object_id, &["all"]).await;
    (b.key_uri(vault, "k"), user)
}

async fn get_from(
    b: &TestBroker,
    source: &str,
    who: &Who,
    key: &str,
) -> Result<proto::KeyBundle, tonic::Status> {
    b.kv_from(source, &who.token)
        .await
        .get_key(proto::GetKeyRequest { key_id: key.into() })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn ip_rules_admit_by_address_and_by_cidr() {
    let b = start().await;
    let (key, user) = setup(&b, "ip-kv").await;
    b.firewall("ip-kv", deny(&["127.0.0.2", "127.0.0.64/26"], &[], "None"), None).await;
    let v = b.vaults().get_vault(proto::GetVaultRequest { name: "ip-kv".into() }).await.unwrap().into_inner();
    assert_eq!(
        v.network_acls.unwrap().ip_rules,
        vec!["127.0.0.2/32", "127.0.0.64/26"],
        "a single address is normalised to /32"
    );
    assert!(get_from(&b, "127.0.0.2", &user, &key).await.is_ok());
    assert!(get_from(&b, "127.0.0.100", &user, &key).await.is_ok());
    let msg = assert_status(
        get_from(&b, "127.0.0.3", &user, &key).await,
        Code::PermissionDenied,
        "ForbiddenByFirewall",
    );
    assert_eq!(
        msg,
        format!(
            "Client address is not authorized and caller is not a trusted service.\r\nClient address: 127.0.0.3\r\nCaller: appid={};oid={};iss=https://sts.windows.net/{TENANT}/\r\nVault: ip-kv;location=westus",
            user.app_id, user.object_id
        )
    );
    b.stop().await;
}

#[tokio::test]
async fn the_firewall_is_checked_before_permissions() {
    let b = start().await;
    let (key, _) = setup(&b, "order-kv").await;
    let stranger = b.user("stranger").await;
    b.firewall("order-kv", deny(&["127.0.0.2"], &[], "None"), None).await;
    assert_status(
        get_from(&b, "127.0.0.3", &stranger, &key).await,
        Code::PermissionDenied,
        "ForbiddenByFirewall",
    );
    assert_status(get_from(&b, "127.0.0.2", &stranger, &key).await, Code::PermissionDenied, "AccessDenied");
    b.stop().await;
}

#[tokio::test]
async fn vnet_rules_admit_clients_through_their_subnet() {
    let b = start().await;
    let (key, user) = setup(&b, "vnet-kv").await;
    b.vaults()
        .put_subnet(proto::PutSubnetRequest {
            subnet_id: APP_SUBNET.into(),
            address_prefixes: vec!["127.0.0.8/29".into()],
        })
        .await
        .unwrap();
    b.firewall("vnet-kv", deny(&[], &[APP_SUBNET], "None"), None).await;
    assert!(get_from(&b, "127.0.0.9", &user, &key).await.is_ok());
    assert!(get_from(&b, "127.0.0.14", &user, &key).await.is_ok());
    assert_status(
        get_from(&b, "127.0.0.17", &user, &key).await,
        Code::PermissionDenied,
        "ForbiddenByFirewall",
    );
    let listed = b.vaults().list_subnets(proto::ListSubnetsRequest {}).await.unwrap().into_inner();
    assert_eq!(listed.subnets[0].address_prefixes, vec!["127.0.0.8/29"]);
    b.stop().await;
}

#[tokio::test]
async fn default_allow_admits_every_address() {
    let b = start().await;
    let (key, user) = setup(&b, "open-kv").await;
    for src in ["127.0.0.2", "127.0.0.33", "127.0.0.250"] {
        assert!(get_from(&b, src, &user, &key).await.is_ok(), "{src}");
    }
    b.stop().await;
}

#[tokio::test]
async fn public_access_disabled_admits_private_endpoints_only() {
    let b = start().await;
    let (key, user) = setup(&b, "pe-kv").await;
    b.firewall("pe-kv", allow(), Some("Disabled")).await;
    let msg = assert_status(
        get_from(&b, "127.0.0.2", &user, &key).await,
        Code::PermissionDenied,
        "ForbiddenByConnection",
    );
    assert!(
        msg.starts_with("Public network access is disabled and request is not from a trusted service nor via an approved private link.\r\nCaller: appid="),
        "{msg}"
    );
    b.vaults()
        .put_subnet(proto::PutSubnetRequest {
            subnet_id: PE_SUBNET.into(),
            address_prefixes: vec!["127.0.1.0/24".into()],
        })
        .await
        .unwrap();
    b.vaults()
        .create_private_endpoint(proto::CreatePrivateEndpointRequest {
            vault_name: "pe-kv".into(),
            subnet_id: PE_SUBNET.into(),
        })
        .await
        .unwrap();
    assert!(get_from(&b, "127.0.1.5", &user, &key).await.is_ok(), "over the private endpoint");
    assert_status(
        get_from(&b, "127.0.0.2", &user, &key).await,
        Code::PermissionDenied,
        "ForbiddenByConnection",
    );
    b.stop().await;
}

/// A SQL logical server with CMK whose vault is open, plus a database.
async fn tde_server(
    b: &TestBroker,
    vault: &str,
    name: &str,
    kind: proto::ServerKind,
    subnet: &str,
    smi: bool,
) -> (proto::Server, String) {
    b.vault(vault, true).await;
    b.key(vault, "tde", "RSA", 2048).await;
    let key = b.key_uri(vault, "tde");
    let (umi, who) = b.identity("id-rg", &format!("{name}-umi")).await;
    b.policy(vault, &who.object_id, &TDE_PERMS).await;
    let identity = if smi {
        proto::ServerIdentity { system_assigned: true, ..Default::default() }
    } else {
        proto::ServerIdentity {
            user_assigned_identity_ids: vec![umi.resource_id.clone()],
            ..Default::default()
        }
    };
    let server = b
        .servers()
        .create_server(proto::CreateServerRequest {
            resource_group: "sql-rg".into(),
            name: name.into(),
            kind: kind as i32,
            identity: Some(identity),
            key_id: if smi { String::new() } else { key.clone() },
            subnet_id: subnet.into(),
            ..Default::default()
        })
        .await
        .expect("server")
        .into_inner();
    (server, key)
}

async fn set_protector(
    b: &TestBroker,
    server_id: &str,
    key: &str,
) -> Result<proto::EncryptionProtector, tonic::Status> {
    b.servers()
        .set_encryption_protector(proto::SetEncryptionProtectorRequest {
            server_id: server_id.into(),
            server_key_type: "AzureKeyVault".into(),
            key_id: key.into(),
            auto_rotation_enabled: false,
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn the_seed_scenario_firewall_needs_the_trusted_service_bypass_and_hides_the_key_list() {
    let b = start().await;
    let (server, key) =
        tde_server(&b, "seed-fw-kv", "seed-fw", proto::ServerKind::SqlServer, "", false).await;
    b.servers()
        .set_encryption_protector(proto::SetEncryptionProtectorRequest {
            server_id: server.id.clone(),
            server_key_type: "ServiceManaged".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let portal_user = b.user("portal-user").await;
    b.policy("seed-fw-kv", &portal_user.object_id, &["all"]).await;
    // Behind a firewall without the bypass: the protector cannot be set, with the seed's text.
    b.firewall("seed-fw-kv", deny(&[], &[], "None"), None).await;
    let msg = assert_status(
        set_protector(&b, &server.id, &key).await,
        Code::FailedPrecondition,
        "AzureKeyVaultMissingPermissions",
    );
    assert!(msg.starts_with("Failed to save Transparent Data Encryption settings for SQL resource: seed-fw. Error message: The managed identity with ID '"), "{msg}");
    assert!(msg.ends_with("ensure you select the 'Allow trusted Microsoft services to bypass this firewall' option. (https://aka.ms/sqltdebyokcreateserver)."), "{msg}");
    // With the bypass: it works, by key identifier, and databases stay ONLINE ...
    b.firewall("seed-fw-kv", deny(&[], &[], "AzureServices"), None).await;
    set_protector(&b, &server.id, &key).await.expect("set by key identifier with the bypass on");
    b.servers()
        .create_database(proto::CreateDatabaseRequest { server_id: server.id.clone(), name: "db1".into() })
        .await
        .unwrap();
    let mut engine = b.engine(&server.id).await;
    assert!(
        engine
            .generate_database_key(proto::GenerateDatabaseKeyRequest { database: "db1".into() })
            .await
            .is_ok()
    );
    b.advance(600).await;
    assert_eq!(b.database(&server.id, "db1").await.state, proto::DatabaseState::Online as i32);
    // ... while a user outside the firewall cannot list the keys (the portal limitation).
    let r = b
        .kv_from("127.0.0.5", &portal_user.token)
        .await
        .list_keys(proto::ListKeysRequest { vault_name: "seed-fw-kv".into(), ..Default::default() })
        .await;
    assert_status(r, Code::PermissionDenied, "ForbiddenByFirewall");
    b.stop().await;
}

#[tokio::test]
async fn turning_the_firewall_on_under_a_running_server_makes_databases_inaccessible_and_the_bypass_heals_them()
 {
    let b = start().await;
    let (server, _) = tde_server(&b, "live-fw-kv", "live-fw", proto::ServerKind::SqlServer, "", false).await;
    b.servers()
        .create_database(proto::CreateDatabaseRequest { server_id: server.id.clone(), name: "db1".into() })
        .await
        .unwrap();
    b.firewall("live-fw-kv", deny(&[], &[], "None"), None).await;
    b.advance(600).await;
    let db = b.database(&server.id, "db1").await;
    assert_eq!((db.state, db.reason.as_str()), (proto::DatabaseState::Inaccessible as i32, "FIREWALL"));
    b.firewall("live-fw-kv", deny(&[], &[], "AzureServices"), None).await;
    b.advance(600).await;
    let db = b.database(&server.id, "db1").await;
    assert_eq!(
        (db.state, db.reason.as_str()),
        (proto::DatabaseState::Online as i32, ""),
        "healed inside the window"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_managed_instance_is_no_trusted_service_and_is_judged_by_its_subnet() {
    let b = start().await;
    b.vaults()
        .put_subnet(proto::PutSubnetRequest {
            subnet_id: APP_SUBNET.into(),
            address_prefixes: vec!["127.0.0.8/29".into()],
        })
        .await
        .unwrap();
    let (mi, key) =
        tde_server(&b, "mi-fw-kv", "mi-fw", proto::ServerKind::ManagedInstance, APP_SUBNET, true).await;
    let smi = mi.identity.unwrap().system_principal_id;
    b.policy("mi-fw-kv", &smi, &TDE_PERMS).await;
    // Firewall with the bypass on: a managed instance does not benefit from it.
    b.firewall("mi-fw-kv", deny(&[], &[], "AzureServices"), None).await;
    assert_status(
        set_protector(&b, &mi.id, &key).await,
        Code::FailedPrecondition,
        "AzureKeyVaultMissingPermissions",
    );
    // Its subnet allowed by a VNet rule: it gets in.
    b.firewall("mi-fw-kv", deny(&[], &[APP_SUBNET], "None"), None).await;
    set_protector(&b, &mi.id, &key).await.expect("managed instance from an allowed subnet");
    b.stop().await;
}

#[tokio::test]
async fn national_clouds_have_no_trusted_service_bypass() {
    let (cfg, _dir) = config_from_toml("cloud = \"AzureChinaCloud\"\n");
    assert!(!cfg.trusted_service_bypass);
    let b = start_cfg(cfg).await;
    let (server, key) = tde_server(&b, "cn-kv", "cn-sql", proto::ServerKind::SqlServer, "", false).await;
    b.firewall("cn-kv", deny(&[], &[], "AzureServices"), None).await;
    let msg = assert_status(
        set_protector(&b, &server.id, &key).await,
        Code::FailedPrecondition,
        "AzureKeyVaultMissingPermissions",
    );
    assert!(
        msg.ends_with(
            "(https://docs.azure.cn/azure-sql/database/transparent-data-encryption-byok-create-server)."
        ),
        "{msg}"
    );
    b.stop().await;
}

#[tokio::test]
async fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
    let (cfg, _dir) = config_from_toml("trusted_proxies = [\"127.0.0.50\"]\n");
    let b = start_cfg(cfg).await;
    let (key, user) = setup(&b, "xff-kv").await;
    b.firewall("xff-kv", deny(&["127.0.0.2"], &[], "None"), None).await;
    let forwarded = |source: &'static str| {
        let b = &b;
        let token = user.token.clone();
        let key = key.clone();
        async move {
            let mut req = tonic::Request::new(proto::GetKeyRequest { key_id: key });
            req.metadata_mut().insert("x-forwarded-for", "127.0.0.2".parse().unwrap());
            b.kv_from(source, &token).await.get_key(req).await
        }
    };
    assert!(forwarded("127.0.0.50").await.is_ok(), "the proxy forwards an allowed client");
    assert_status(forwarded("127.0.0.51").await, Code::PermissionDenied, "ForbiddenByFirewall");
    b.stop().await;
}
