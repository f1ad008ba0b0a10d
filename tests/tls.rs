//! TLS and mTLS (docs/API.md, Authentication; docs/RULES.md R5): `--tls auto` and its dev CA,
//! certificate files, client certificates that authenticate as a principal, and the plaintext rule
//! for public addresses.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{Bearer, assert_status, bearer, start_with, tls_channel};
use tde_broker::auth::{AuthInterceptor, Plane};
use tde_broker::config::{Config, ServeArgs, TlsMode, TlsSetting};
use tde_broker::grpc::proto::{self, vaults_client::VaultsClient};
use tde_broker::model::BrokerError;
use tde_broker::tls::{self, DevPki, PRINCIPAL_URI_PREFIX};
use tonic::Code;
use tonic::transport::Channel;
use x509_cert::der::Decode as _;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

fn auto(cfg: &mut Config) {
    cfg.tls = TlsMode::Auto;
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

/// The DNS names and IP addresses of a PEM certificate's SAN, as text.
fn san_names(pem: &str) -> Vec<String> {
    let cert = x509_cert::Certificate::from_der(&der_of(pem)).expect("certificate");
    let (_, san) =
        cert.tbs_certificate().get_extension::<SubjectAltName>().expect("SAN parses").expect("SAN");
    san.0
        .iter()
        .filter_map(|n| match n {
            GeneralName::DnsName(d) => Some(d.to_string()),
            GeneralName::IpAddress(ip) => match ip.as_bytes().len() {
                4 => <[u8; 4]>::try_from(ip.as_bytes()).ok().map(|b| std::net::IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(ip.as_bytes()).ok().map(|b| std::net::IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn der_of(pem: &str) -> Vec<u8> {
    tls::certs_from_pem(Path::new("pem"), pem.as_bytes()).expect("PEM certificate").swap_remove(0).to_vec()
}

async fn list_vaults(channel: Channel, auth: Bearer) -> Result<proto::ListVaultsResponse, tonic::Status> {
    VaultsClient::with_interceptor(channel, auth)
        .list_vaults(proto::ListVaultsRequest {})
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_auto_creates_a_dev_ca_and_server_certificate_that_clients_trust() {
    let b = start_with(|cfg| {
        auto(cfg);
        cfg.tls_names = vec!["broker.test".into(), "10.1.2.3".into()];
    })
    .await;
    let pki = DevPki::in_data_dir(&b.data_dir);
    for path in [&pki.ca_cert, &pki.ca_key, &pki.server_cert, &pki.server_key] {
        assert!(path.is_file(), "{} exists", path.display());
    }
    assert_eq!(mode(&pki.ca_key), 0o600);
    assert_eq!(mode(&pki.server_key), 0o600);
    let names = san_names(&std::fs::read_to_string(&pki.server_cert).expect("server cert"));
    for wanted in ["localhost", "127.0.0.1", "::1", "broker.test", "10.1.2.3"] {
        assert!(names.iter().any(|n| n == wanted), "SAN {wanted} in {names:?}");
    }

    // `channel` trusts the dev CA and speaks https; the admin token works as over plaintext.
    list_vaults(b.channel.clone(), bearer(&b.token))
        .await
        .expect("list vaults over TLS with the admin token");
    b.vaults()
        .create_vault(proto::CreateVaultRequest { name: "tlsvault".into(), ..Default::default() })
        .await
        .expect("create");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_cannot_talk_to_a_tls_broker() {
    let b = start_with(auto).await;
    let plain = Channel::from_shared(format!("http://{}", b.addr)).expect("uri").connect().await;
    let refused = match plain {
        Err(_) => true,
        Ok(channel) => list_vaults(channel, bearer(&b.token)).await.is_err(),
    };
    assert!(refused, "a plaintext request must not be served by a TLS broker");
    b.stop().await;
}

#[test]
fn the_dev_ca_is_reused_and_the_server_certificate_follows_the_configured_names() {
    tls::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = tls::ensure_dev_pki(dir.path(), &[]).expect("dev PKI");
    let ca = std::fs::read(&pki.ca_cert).expect("ca");
    let server = std::fs::read(&pki.server_cert).expect("server");

    tls::ensure_dev_pki(dir.path(), &[]).expect("again");
    assert_eq!(std::fs::read(&pki.ca_cert).expect("ca"), ca, "the CA is reused");
    assert_eq!(std::fs::read(&pki.server_cert).expect("server"), server, "a covering server cert is reused");

    tls::ensure_dev_pki(dir.path(), &["db.example.internal".to_string()]).expect("new name");
    assert_eq!(std::fs::read(&pki.ca_cert).expect("ca"), ca, "a new name keeps the CA");
    let renewed = std::fs::read_to_string(&pki.server_cert).expect("server");
    assert_ne!(renewed.as_bytes(), server.as_slice(), "a new name replaces the server certificate");
    assert!(san_names(&renewed).iter().any(|n| n == "db.example.internal"));

    let err = tls::ensure_dev_pki(dir.path(), &["not a name!".to_string()]).expect_err("bad name");
    assert!(err.to_string().contains("not a name!"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_for_the_admin_authenticates_without_a_token() {
    let b = start_with(auto).await;
    let (cert, key) = tls::issue_client_cert(&b.data_dir, &b.admin.object_id).expect("issue");
    assert_eq!(tls::principal_from_cert(&der_of(&cert)).as_deref(), Some(b.admin.object_id.as_str()));
    let ca = std::fs::read(DevPki::in_data_dir(&b.data_dir).ca_cert).expect("ca");
    let channel = tls_channel(b.addr, &ca, Some((&cert, &key))).await.expect("mTLS connect");

    list_vaults(channel.clone(), Bearer(None)).await.expect("the certificate alone authenticates");
    // The caller really is the admin: Owner at / may create vaults.
    VaultsClient::with_interceptor(channel.clone(), Bearer(None))
        .create_vault(proto::CreateVaultRequest { name: "bycert".into(), ..Default::default() })
        .await
        .expect("create a vault as the admin by certificate");

    // A bearer token, when present, decides — even a bad one beside a good certificate.
    let r = list_vaults(channel, bearer("not.a.token")).await;
    assert_status(r, Code::Unauthenticated, "Unauthorized");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_certificate_and_no_token_is_unauthenticated() {
    let b = start_with(auto).await;
    let r = list_vaults(b.channel.clone(), Bearer(None)).await;
    assert_status(r, Code::Unauthenticated, "Unauthorized");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_fails_the_handshake() {
    let b = start_with(auto).await;
    // A second broker's dev CA (same code path as its first start), naming a real principal.
    let other = tempfile::tempdir().expect("tempdir");
    tls::ensure_dev_pki(other.path(), &[]).expect("other dev PKI");
    let (cert, key) = tls::issue_client_cert(other.path(), &b.admin.object_id).expect("issue");
    let ca = std::fs::read(DevPki::in_data_dir(&b.data_dir).ca_cert).expect("ca");

    // TLS 1.3: the client may finish its side before the server's alert arrives, so the refusal
    // shows up at connect or at the first call, as the alert or as the closed connection.
    match tls_channel(b.addr, &ca, Some((&cert, &key))).await {
        Err(_) => {}
        Ok(channel) => {
            let status = list_vaults(channel, Bearer(None)).await.expect_err("must not get through");
            assert_ne!(status.code(), Code::Unauthenticated, "refused by TLS, not by auth: {status:?}");
            assert_eq!(tde_broker::grpc::status::reason(&status), None, "no broker answer: {status:?}");
        }
    }

    // The broker still serves well-behaved clients afterwards.
    list_vaults(b.channel.clone(), bearer(&b.token)).await.expect("still serving");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_naming_an_unknown_principal_is_unauthenticated() {
    let b = start_with(auto).await;
    let stranger = uuid::Uuid::new_v4().to_string();
    let (cert, key) = tls::issue_client_cert(&b.data_dir, &stranger).expect("issue");
    let ca = std::fs::read(DevPki::in_data_dir(&b.data_dir).ca_cert).expect("ca");
    let channel = tls_channel(b.addr, &ca, Some((&cert, &key))).await.expect("mTLS connect");
    let message =
        assert_status(list_vaults(channel, Bearer(None)).await, Code::Unauthenticated, "Unauthorized");
    assert!(!message.is_empty());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_without_the_principal_uri_names_nobody() {
    let b = start_with(auto).await;
    // The server certificate is signed by the same CA but carries no principal URI.
    let server_pem =
        std::fs::read_to_string(DevPki::in_data_dir(&b.data_dir).server_cert).expect("server cert");
    let der = der_of(&server_pem);
    assert_eq!(tls::principal_from_cert(&der), None);
    let interceptor = AuthInterceptor::new(b.auth.clone(), Plane::Control);
    let err = interceptor.authenticate(None, None, Some(&der)).expect_err("no principal");
    assert!(matches!(err, BrokerError::MissingToken), "{err:?}");

    // A certificate naming a principal that does not exist.
    let (cert, _) = tls::issue_client_cert(&b.data_dir, &uuid::Uuid::new_v4().to_string()).expect("issue");
    let err = interceptor.authenticate(None, None, Some(&der_of(&cert))).expect_err("unknown");
    assert!(matches!(err, BrokerError::PrincipalDeleted { .. }), "{err:?}");

    // The admin's certificate, through the same entry point.
    let (cert, _) = tls::issue_client_cert(&b.data_dir, &b.admin.object_id).expect("issue");
    let caller = interceptor.authenticate(None, None, Some(&der_of(&cert))).expect("admin");
    assert_eq!(&*caller.object_id, b.admin.object_id.as_str());
    assert_eq!(&*caller.app_id, b.admin.app_id.as_str());
    b.stop().await;
}

#[test]
fn principal_from_cert_never_panics_on_hostile_der() {
    tls::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    tls::ensure_dev_pki(dir.path(), &[]).expect("dev PKI");
    let oid = uuid::Uuid::new_v4().to_string();
    let (cert, _) = tls::issue_client_cert(dir.path(), &oid).expect("issue");
    let der = der_of(&cert);
    assert_eq!(tls::principal_from_cert(&der), Some(oid));

    assert_eq!(tls::principal_from_cert(&[]), None);
    assert_eq!(tls::principal_from_cert(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    assert_eq!(tls::principal_from_cert(&[0x30; 4096]), None);
    for len in 0..der.len() {
        assert_eq!(tls::principal_from_cert(&der[..len]), None, "truncated at {len}");
    }
    for i in 0..der.len() {
        let mut flipped = der.clone();
        flipped[i] ^= 0xff;
        let _ = tls::principal_from_cert(&flipped);
    }
    let random = tde_broker::crypto::random_bytes(2048);
    let _ = tls::principal_from_cert(&random);
}

#[test]
fn client_certificates_name_a_guid_principal_and_need_the_dev_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = tls::issue_client_cert(dir.path(), &uuid::Uuid::new_v4().to_string()).expect_err("no CA yet");
    assert!(err.to_string().contains("--tls auto"), "{err}");
    tls::ensure_dev_pki(dir.path(), &[]).expect("dev PKI");
    let err = tls::issue_client_cert(dir.path(), "admin/../x").expect_err("not a GUID");
    assert!(err.to_string().contains("GUID"), "{err}");
    let oid = uuid::Uuid::new_v4();
    let (cert, _) = tls::issue_client_cert(dir.path(), &oid.to_string().to_uppercase()).expect("issue");
    assert_eq!(tls::principal_from_cert(&der_of(&cert)), Some(oid.to_string()), "normalized to lowercase");
    assert!(PRINCIPAL_URI_PREFIX.starts_with("spiffe://"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_serve_tls_and_their_client_ca_verifies_clients() {
    tls::install_crypto_provider();
    // Files made by another data directory's dev CA stand in for an operator's own PKI.
    let pki_dir = tempfile::tempdir().expect("tempdir");
    let pki = tls::ensure_dev_pki(pki_dir.path(), &[]).expect("PKI");
    let files = pki.clone();
    let b = start_with(move |cfg| {
        cfg.tls = TlsMode::Files { cert: files.server_cert.clone(), key: files.server_key.clone() };
        cfg.client_ca = Some(files.ca_cert.clone());
    })
    .await;
    assert!(!DevPki::in_data_dir(&b.data_dir).ca_cert.exists(), "no dev CA without --tls auto");
    list_vaults(b.channel.clone(), bearer(&b.token)).await.expect("token over TLS");
    let (cert, key) = tls::issue_client_cert(pki_dir.path(), &b.admin.object_id).expect("issue");
    let ca = std::fs::read(&pki.ca_cert).expect("ca");
    let channel = tls_channel(b.addr, &ca, Some((&cert, &key))).await.expect("mTLS connect");
    list_vaults(channel, Bearer(None)).await.expect("certificate signed by --client-ca");
    b.stop().await;
}

#[test]
fn plaintext_on_a_public_address_is_refused_but_tls_auto_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ServeArgs {
        listen: Some("0.0.0.0:50051".into()),
        data_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let err = Config::resolve(args.clone()).expect_err("plaintext on 0.0.0.0");
    assert!(err.to_string().contains("--insecure"), "{err}");
    assert!(err.to_string().contains("--tls auto"), "the error names the TLS way out: {err}");

    let cfg =
        Config::resolve(ServeArgs { tls: Some(TlsSetting::Auto), ..args.clone() }).expect("TLS on 0.0.0.0");
    assert_eq!(cfg.tls, TlsMode::Auto);
    assert!(Config::resolve(ServeArgs { insecure: true, ..args }).is_ok(), "--insecure still allows it");
    assert_eq!(Config::for_data_dir(dir.path()).tls, TlsMode::Off, "TLS is off by default");
}

#[test]
fn tls_settings_that_do_not_fit_together_are_all_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("server.pem");
    std::fs::write(&cert, "x").expect("write");
    let base = ServeArgs { data_dir: Some(dir.path().to_path_buf()), ..Default::default() };

    let err = Config::resolve(ServeArgs {
        tls_cert: Some(cert.clone()),
        client_ca: Some(dir.path().join("missing-ca.pem")),
        tls_names: vec!["extra.test".into()],
        ..base.clone()
    })
    .expect_err("cert without key");
    let text = err.to_string();
    assert!(text.contains("--tls-cert needs --tls-key"), "{text}");
    assert!(text.contains("missing-ca.pem"), "{text}");
    assert!(text.contains("--client-ca needs TLS"), "{text}");
    assert!(text.contains("only to --tls auto"), "{text}");
    assert_eq!(err.0.len(), 4, "{text}");

    let err = Config::resolve(ServeArgs {
        tls: Some(TlsSetting::Auto),
        tls_key: Some(cert.clone()),
        ..base.clone()
    })
    .expect_err("auto with files");
    assert!(err.to_string().contains("--tls auto makes its own"), "{err}");
    let err = Config::resolve(ServeArgs {
        tls: Some(TlsSetting::Off),
        tls_cert: Some(cert.clone()),
        tls_key: Some(cert.clone()),
        ..base.clone()
    })
    .expect_err("off with files");
    assert!(err.to_string().contains("--tls off"), "{err}");

    let toml = dir.path().join("c.toml");
    std::fs::write(
        &toml,
        "tls = \"auto\"\ntls_names = [\"db.test\", \"192.0.2.7\"]\nlisten = \"0.0.0.0:7000\"\n",
    )
    .expect("write");
    let cfg = Config::resolve(ServeArgs { config: Some(toml), ..base }).expect("TOML TLS settings");
    assert_eq!(cfg.tls, TlsMode::Auto);
    assert_eq!(cfg.tls_names, vec!["db.test".to_string(), "192.0.2.7".to_string()]);
}

/// Runs the real binary (off the runtime's workers) with a clean environment.
async fn cli(args: Vec<String>) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tde-broker"));
    for var in [
        "TDE_BROKER_TOKEN",
        "TDE_BROKER_SERVER",
        "TDE_BROKER_DATA_DIR",
        "TDE_BROKER_CA_CERT",
        "TDE_BROKER_CLIENT_CERT",
        "TDE_BROKER_CLIENT_KEY",
    ] {
        command.env_remove(var);
    }
    command.env("RUST_LOG", "off").args(args);
    tokio::task::spawn_blocking(move || command.output().expect("run tde-broker")).await.expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_issue_writes_a_private_key_for_the_owner_only_and_the_cli_authenticates_with_it() {
    let b = start_with(auto).await;
    let out_dir = tempfile::tempdir().expect("tempdir");
    let data_dir = b.data_dir.display().to_string();
    let out = cli(vec![
        "cert".into(),
        "issue".into(),
        "--principal".into(),
        b.admin.object_id.clone(),
        "--data-dir".into(),
        data_dir.clone(),
        "--out-dir".into(),
        out_dir.path().display().to_string(),
    ])
    .await;
    assert!(out.status.success(), "cert issue: {}", String::from_utf8_lossy(&out.stderr));
    let cert = out_dir.path().join(format!("{}.pem", b.admin.object_id));
    let key = out_dir.path().join(format!("{}.key", b.admin.object_id));
    assert_eq!(mode(&key), 0o600);
    let pem = std::fs::read_to_string(&cert).expect("cert");
    assert_eq!(tls::principal_from_cert(&der_of(&pem)).as_deref(), Some(b.admin.object_id.as_str()));

    // The CLI over https, trusting <data-dir>/tls/ca.pem by default, authenticated by the
    // certificate alone: with no admin token file around, a token could not be the reason.
    std::fs::remove_file(b.data_dir.join(tde_broker::server::ADMIN_TOKEN_FILE)).expect("rm admin.token");
    let server = format!("https://{}", b.addr);
    let out = cli(vec![
        "--server".into(),
        server.clone(),
        "--data-dir".into(),
        data_dir.clone(),
        "--client-cert".into(),
        cert.display().to_string(),
        "--client-key".into(),
        key.display().to_string(),
        "vault".into(),
        "create".into(),
        "clivault".into(),
    ])
    .await;
    assert!(out.status.success(), "vault create by certificate: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&b.admin.object_id),
        "the default access policy names the cert's principal: {text}"
    );

    // Without a certificate or a token the CLI has nothing to authenticate with.
    let out =
        cli(vec!["--server".into(), server, "--data-dir".into(), data_dir, "vault".into(), "list".into()])
            .await;
    assert!(!out.status.success());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_credential_carries_a_client_certificate_that_authenticates_the_engine() {
    let b = start_with(auto).await;
    b.vault("host-tls-kv", true).await;
    let key = common::kid(&b.key("host-tls-kv", "tde", "RSA", 2048).await);
    let (umi, who) = b.identity("id-rg", "host-tls-umi").await;
    b.policy("host-tls-kv", &who.object_id, &["get", "wrapKey", "unwrapKey"]).await;
    let server = b
        .servers()
        .create_server(proto::CreateServerRequest {
            resource_group: "rg".into(),
            name: "host-tls-sql".into(),
            kind: proto::ServerKind::SqlServer as i32,
            identity: Some(proto::ServerIdentity {
                user_assigned_identity_ids: vec![umi.resource_id.clone()],
                ..Default::default()
            }),
            key_id: key,
            ..Default::default()
        })
        .await
        .expect("server")
        .into_inner();
    b.servers()
        .create_database(proto::CreateDatabaseRequest { server_id: server.id.clone(), name: "db1".into() })
        .await
        .expect("db");
    let cred = b
        .servers()
        .issue_host_credential(proto::IssueHostCredentialRequest { server_id: server.id.clone() })
        .await
        .expect("credential")
        .into_inner();
    assert!(cred.cert_pem.contains("BEGIN CERTIFICATE") && cred.key_pem.contains("PRIVATE KEY"));
    let host_oid = common::claims(&cred.token)["oid"].as_str().expect("oid").to_string();
    assert_eq!(tls::principal_from_cert(&der_of(&cred.cert_pem)).as_deref(), Some(host_oid.as_str()));
    let ca = std::fs::read(DevPki::in_data_dir(&b.data_dir).ca_cert).expect("ca");
    let channel =
        tls_channel(b.addr, &ca, Some((&cred.cert_pem, &cred.key_pem))).await.expect("mTLS connect");
    let mut engine =
        tde_broker::grpc::proto::tde_engine_client::TdeEngineClient::with_interceptor(channel, Bearer(None));
    let g = engine
        .generate_database_key(proto::GenerateDatabaseKeyRequest { database: "db1".into() })
        .await
        .expect("the engine authenticates by its certificate alone")
        .into_inner();
    assert_eq!(g.dek.len(), 32);
    b.stop().await;
}
