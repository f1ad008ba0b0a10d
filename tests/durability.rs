//! Durability: the real binary is SIGKILLed right after CreateKey/RotateKey returned; restarted on
//! the same data directory, every acknowledged key is there and unwraps earlier ciphertexts; the
//! database files hold no private key bytes.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rsa::pkcs8::EncodePrivateKey;
use rsa::traits::PrivateKeyParts;
use tde_broker::grpc::proto;
use tde_broker::grpc::proto::key_vault_client::KeyVaultClient;
use tde_broker::grpc::proto::vaults_client::VaultsClient;
use tonic::transport::Channel;

const DEK: &[u8] = b"0123456789abcdef0123456789abcdef";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn_broker(data_dir: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tde-broker"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir", data_dir.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn tde-broker serve")
}

async fn connect(port: u16, data_dir: &Path) -> (Channel, Bearer) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(ch) = Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await
            && let Ok(token) = std::fs::read_to_string(data_dir.join("admin.token"))
        {
            return (ch, bearer(token.trim()));
        }
        assert!(Instant::now() < deadline, "the broker did not come up on port {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn acknowledged_keys_survive_sigkill_and_no_private_bytes_reach_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sk = rsa::PrivateKey::new(&mut TestRng, 2048).unwrap();
    let der = sk.to_pkcs8_der().unwrap().as_bytes().to_vec();
    let d = sk.d().to_be_bytes().to_vec();

    let port = free_port();
    let mut child = spawn_broker(&data, port);
    let (ch, auth) = connect(port, &data).await;
    let mut vaults = VaultsClient::with_interceptor(ch.clone(), auth.clone());
    let mut kv = KeyVaultClient::with_interceptor(ch, auth);
    vaults
        .create_vault(proto::CreateVaultRequest { name: "dur-vault".into(), ..Default::default() })
        .await
        .unwrap();
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let oid = {
        use base64::Engine as _;
        let payload = token.trim().split('.').nth(1).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap(),
        )
        .unwrap();
        claims["oid"].as_str().unwrap().to_string()
    };
    vaults
        .set_access_policy(proto::SetAccessPolicyRequest {
            vault_name: "dur-vault".into(),
            object_id: oid,
            key_permissions: vec!["all".into()],
        })
        .await
        .unwrap();
    let imported = kv
        .import_key(proto::ImportKeyRequest {
            vault_name: "dur-vault".into(),
            name: "imported".into(),
            pkcs8_der: der.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let created = kv
        .create_key(proto::CreateKeyRequest {
            vault_name: "dur-vault".into(),
            name: "created".into(),
            kty: "RSA".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let w_imported =
        kv.wrap_key(crypto_req(&kid(&imported), "RSA-OAEP-256", DEK)).await.unwrap().into_inner().value;
    let w_created =
        kv.wrap_key(crypto_req(&kid(&created), "RSA-OAEP-256", DEK)).await.unwrap().into_inner().value;
    let rotated = kv
        .rotate_key(proto::RotateKeyRequest {
            key_id: "https://dur-vault.vault.azure.net/keys/created".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // SIGKILL right after the acknowledgement: no graceful shutdown, no chance to flush.
    child.kill().unwrap();
    child.wait().unwrap();

    let port = free_port();
    let mut child = spawn_broker(&data, port);
    let (ch, auth) = connect(port, &data).await;
    let mut kv = KeyVaultClient::with_interceptor(ch, auth);
    let got = kv
        .get_key(proto::GetKeyRequest { key_id: "https://dur-vault.vault.azure.net/keys/created".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kid(&got), kid(&rotated), "the rotation acknowledged before the kill is there");
    for (key, wrapped) in [(&imported, &w_imported), (&created, &w_created)] {
        let out = kv.unwrap_key(unwrap_req(&kid(key), "RSA-OAEP-256", wrapped)).await.unwrap().into_inner();
        assert_eq!(out.value, DEK);
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // No private key bytes in any database file (main, WAL, shared memory).
    let mut checked = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("broker.sqlite") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        checked += 1;
        for (what, needle) in [("PKCS#8 DER", &der[..]), ("private exponent", &d[d.len() - 64..])] {
            let window = &needle[needle.len().saturating_sub(64)..];
            assert!(!bytes.windows(window.len()).any(|w| w == window), "{name} contains the key's {what}");
        }
    }
    assert!(checked >= 1, "no database file found in {}", data.display());
}
