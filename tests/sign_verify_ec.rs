//! docs/RULES.md R1.11: Sign and Verify over digests, EC and EC-HSM keys, GetRandomBytes — over
//! real gRPC, with the texts callers see; and interop: EC and RSA-PSS signatures made by the
//! broker verify with `openssl`, and those made by `openssl` verify in the broker; RSA
//! signatures agree with the RustCrypto `rsa` crate both ways.

mod common;

use base64::Engine as _;
use common::*;
use rsa::pkcs8::EncodePrivateKey;
use sha2::Digest as _;
use tde_broker::crypto::{ecdsa_der_to_raw, ecdsa_raw_to_der};
use tde_broker::grpc::proto;
use tde_broker::model::Curve;
use tonic::Code;

const OPENSSL: &str = "apt-get install openssl";

fn sha(bits: usize, data: &[u8]) -> Vec<u8> {
    match bits {
        256 => sha2::Sha256::digest(data).to_vec(),
        384 => sha2::Sha384::digest(data).to_vec(),
        _ => sha2::Sha512::digest(data).to_vec(),
    }
}

async fn sign(
    kv: &mut Kv,
    key_id: &str,
    alg: &str,
    digest: &[u8],
) -> Result<proto::KeyOperationResult, tonic::Status> {
    kv.sign(proto::SignRequest { key_id: key_id.into(), algorithm: alg.into(), digest: digest.to_vec() })
        .await
        .map(|r| r.into_inner())
}

async fn verify(
    kv: &mut Kv,
    key_id: &str,
    alg: &str,
    digest: &[u8],
    signature: &[u8],
) -> Result<bool, tonic::Status> {
    kv.verify(proto::VerifyRequest {
        key_id: key_id.into(),
        algorithm: alg.into(),
        digest: digest.to_vec(),
        signature: signature.to_vec(),
    })
    .await
    .map(|r| r.into_inner().valid)
}

async fn ec_key(b: &TestBroker, vault: &str, name: &str, kty: &str, crv: &str) -> proto::KeyBundle {
    b.create_key(proto::CreateKeyRequest {
        vault_name: vault.into(),
        name: name.into(),
        kty: kty.into(),
        crv: crv.into(),
        ..Default::default()
    })
    .await
    .expect("create EC key")
}

async fn update(b: &TestBroker, req: proto::UpdateKeyRequest) {
    b.kv().update_key(req).await.expect("update");
}

/// The public key of an EC JWK as PEM (SubjectPublicKeyInfo), for openssl.
fn ec_public_pem(key: &proto::JsonWebKey) -> String {
    // SPKI prefixes: SEQUENCE { AlgorithmIdentifier { id-ecPublicKey, curve }, BIT STRING 0x00 || point }.
    let prefix = match key.crv.as_str() {
        "P-256" => "3059301306072a8648ce3d020106082a8648ce3d030107034200",
        "P-256K" => "3056301006072a8648ce3d020106052b8104000a034200",
        "P-384" => "3076301006072a8648ce3d020106052b81040022036200",
        "P-521" => "30819b301006072a8648ce3d020106052b8104002303818600",
        other => panic!("curve {other}"),
    };
    let mut der = hex::decode(prefix).unwrap();
    der.push(4);
    der.extend_from_slice(&key.x);
    der.extend_from_slice(&key.y);
    pem("PUBLIC KEY", &der)
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

fn curve(name: &str) -> Curve {
    Curve::ALL.into_iter().find(|c| c.name() == name).unwrap()
}

#[tokio::test]
async fn every_signature_algorithm_signs_and_verifies_on_its_key_type() {
    let b = start().await;
    b.vault("svault", false).await;
    let rsa = kid(&b.key("svault", "rsa", "RSA", 2048).await);
    let mut kv = b.kv();
    let mut cases: Vec<(String, &str, usize, usize)> = Vec::new();
    for (alg, bits) in
        [("RS256", 256), ("RS384", 384), ("RS512", 512), ("PS256", 256), ("PS384", 384), ("PS512", 512)]
    {
        cases.push((rsa.clone(), alg, bits, 256));
    }
    for (crv, alg, bits, kty) in [
        ("P-256", "ES256", 256, "EC"),
        ("P-256K", "ES256K", 256, "EC-HSM"),
        ("P-384", "ES384", 384, "EC"),
        ("P-521", "ES512", 512, "EC-HSM"),
    ] {
        let bundle = ec_key(&b, "svault", &format!("ec-{}", crv.to_lowercase()), kty, crv).await;
        cases.push((kid(&bundle), alg, bits, 2 * curve(crv).coordinate_len()));
    }
    for (key_id, alg, bits, sig_len) in cases {
        let digest = sha(bits, b"the message");
        let r = sign(&mut kv, &key_id, alg, &digest).await.unwrap_or_else(|e| panic!("{alg}: {e:?}"));
        assert_eq!(r.kid, key_id, "{alg}: the versioned kid that signed");
        assert_eq!(r.value.len(), sig_len, "{alg}: R||S for EC, the modulus size for RSA");
        assert!(verify(&mut kv, &key_id, alg, &digest, &r.value).await.unwrap(), "{alg}");
        // A wrong signature or another digest is valid = false, not an error.
        let mut bad = r.value.clone();
        bad[sig_len / 2] ^= 1;
        assert!(!verify(&mut kv, &key_id, alg, &digest, &bad).await.unwrap(), "{alg}");
        let other = sha(bits, b"another message");
        assert!(!verify(&mut kv, &key_id, alg, &other, &r.value).await.unwrap(), "{alg}");
    }
    b.stop().await;
}

#[tokio::test]
async fn ec_keys_are_created_on_every_curve_with_p256_and_sign_verify_by_default() {
    let b = start().await;
    b.vault("ecv", false).await;
    let k = ec_key(&b, "ecv", "default", "EC", "").await.key.unwrap();
    assert_eq!((k.kty.as_str(), k.crv.as_str()), ("EC", "P-256"));
    assert_eq!(k.key_ops, ["sign", "verify"]);
    assert_eq!((k.x.len(), k.y.len()), (32, 32));
    assert!(k.n.is_empty() && k.e.is_empty());
    for (crv, len) in [("P-256K", 32), ("P-384", 48), ("P-521", 66)] {
        let k = ec_key(&b, "ecv", &format!("k{len}"), "EC-HSM", crv).await.key.unwrap();
        assert_eq!((k.kty.as_str(), k.crv.as_str(), k.x.len(), k.y.len()), ("EC-HSM", crv, len, len));
    }
    // GetKey shows the public point only, and rotation keeps the curve.
    let id = b.key_uri("ecv", "k48");
    let got = b.kv().get_key(proto::GetKeyRequest { key_id: id.clone() }).await.unwrap().into_inner();
    let rotated = b.kv().rotate_key(proto::RotateKeyRequest { key_id: id }).await.unwrap().into_inner();
    let (got, rotated) = (got.key.unwrap(), rotated.key.unwrap());
    assert_eq!(rotated.crv, "P-384");
    assert_ne!(rotated.x, got.x);
    let msg = assert_status(
        b.create_key(proto::CreateKeyRequest {
            vault_name: "ecv".into(),
            name: "bad".into(),
            kty: "EC".into(),
            crv: "P-224".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "BadParameter",
    );
    assert_eq!(msg, "The curve 'P-224' is not supported. Supported curves are P-256, P-256K, P-384, P-521.");
    let msg = assert_status(
        b.create_key(proto::CreateKeyRequest {
            vault_name: "ecv".into(),
            name: "bad".into(),
            kty: "RSA".into(),
            crv: "P-256".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "BadParameter",
    );
    assert_eq!(msg, "The curve (crv) applies to EC and EC-HSM keys only, not to key type RSA.");
    let msg = assert_status(
        b.create_key(proto::CreateKeyRequest {
            vault_name: "ecv".into(),
            name: "bad".into(),
            kty: "EC".into(),
            key_size: 384,
            crv: "P-384".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "BadParameter",
    );
    assert_eq!(
        msg,
        "The key size applies to RSA and oct-HSM keys; a key of type EC takes its size from its curve (crv)."
    );
    b.stop().await;
}

#[tokio::test]
async fn a_digest_of_the_wrong_length_is_refused_with_bad_parameter() {
    let b = start().await;
    b.vault("dlen", false).await;
    let rsa = kid(&b.key("dlen", "rsa", "RSA", 2048).await);
    let ec = kid(&ec_key(&b, "dlen", "ec", "EC", "P-384").await);
    let mut kv = b.kv();
    let msg =
        assert_status(sign(&mut kv, &rsa, "RS256", &[0u8; 20]).await, Code::InvalidArgument, "BadParameter");
    assert_eq!(msg, "The digest is 20 bytes long; algorithm RS256 needs a digest of 32 bytes.");
    let msg = assert_status(
        verify(&mut kv, &ec, "ES384", &sha(256, b"x"), &[1u8; 96]).await,
        Code::InvalidArgument,
        "BadParameter",
    );
    assert_eq!(msg, "The digest is 32 bytes long; algorithm ES384 needs a digest of 48 bytes.");
    let msg = assert_status(
        sign(&mut kv, &ec, "ES385", &sha(384, b"x")).await,
        Code::InvalidArgument,
        "BadParameter",
    );
    assert!(msg.starts_with("The algorithm 'ES385' is not supported."), "{msg}");
    b.stop().await;
}

#[tokio::test]
async fn algorithms_that_do_not_fit_the_key_are_refused_with_bad_parameter() {
    let b = start().await;
    b.vault("fit", false).await;
    let rsa = kid(&b.key("fit", "rsa", "RSA", 2048).await);
    let oct = kid(&b.key("fit", "oct", "oct-HSM", 256).await);
    let ec = kid(&ec_key(&b, "fit", "ec", "EC", "P-256").await);
    let mut kv = b.kv();
    let d32 = sha(256, b"m");
    for (key_id, alg, text) in [
        (
            &ec,
            "ES256K",
            "Algorithm ES256K is not supported for operation sign on a key of type EC and curve P-256.",
        ),
        (
            &ec,
            "RS256",
            "Algorithm RS256 is not supported for operation sign on a key of type EC and curve P-256.",
        ),
        (
            &rsa,
            "ES256",
            "Algorithm ES256 is not supported for operation sign on a key of type RSA and size 2048.",
        ),
        (
            &oct,
            "PS256",
            "Algorithm PS256 is not supported for operation sign on a key of type oct-HSM and size 256.",
        ),
    ] {
        let msg =
            assert_status(sign(&mut kv, key_id, alg, &d32).await, Code::InvalidArgument, "BadParameter");
        assert_eq!(msg, text);
    }
    // An EC key does no encryption: wrap, unwrap, encrypt and decrypt are bad parameters.
    let text = |op: &str| {
        format!(
            "Algorithm RSA-OAEP-256 is not supported for operation {op} on a key of type EC and curve P-256."
        )
    };
    let value = vec![7u8; 32];
    let msg = assert_status(
        kv.wrap_key(crypto_req(&ec, "RSA-OAEP-256", &value)).await,
        Code::InvalidArgument,
        "BadParameter",
    );
    assert_eq!(msg, text("wrapKey"));
    let msg = assert_status(
        kv.unwrap_key(unwrap_req(&ec, "RSA-OAEP-256", &value)).await,
        Code::InvalidArgument,
        "BadParameter",
    );
    assert_eq!(msg, text("unwrapKey"));
    let enc = proto::EncryptRequest {
        key_id: ec.clone(),
        algorithm: "RSA-OAEP-256".into(),
        value: value.clone(),
        ..Default::default()
    };
    let msg = assert_status(kv.encrypt(enc).await, Code::InvalidArgument, "BadParameter");
    assert_eq!(msg, text("encrypt"));
    let dec = proto::DecryptRequest {
        key_id: ec.clone(),
        algorithm: "RSA-OAEP-256".into(),
        value,
        ..Default::default()
    };
    let msg = assert_status(kv.decrypt(dec).await, Code::InvalidArgument, "BadParameter");
    assert_eq!(msg, text("decrypt"));
    b.stop().await;
}

#[tokio::test]
async fn sign_honours_nbf_and_exp_and_verify_works_outside_them() {
    let b = start().await;
    b.vault("win", false).await;
    let ec = kid(&ec_key(&b, "win", "ec", "EC", "P-256").await);
    let mut kv = b.kv();
    let digest = sha(256, b"m");
    let signature = sign(&mut kv, &ec, "ES256", &digest).await.unwrap().value;
    let now = b.now().await;
    update(&b, proto::UpdateKeyRequest { key_id: ec.clone(), expires: Some(now + 60), ..Default::default() })
        .await;
    b.advance(60).await;
    let msg = assert_status(sign(&mut kv, &ec, "ES256", &digest).await, Code::PermissionDenied, "KeyExpired");
    assert_eq!(msg, "Operation sign is not allowed on an expired key.");
    assert!(
        verify(&mut kv, &ec, "ES256", &digest, &signature).await.unwrap(),
        "verify works on an expired key"
    );
    let later = b.now().await + 3600;
    update(
        &b,
        proto::UpdateKeyRequest {
            key_id: ec.clone(),
            clear_expires: true,
            not_before: Some(later),
            ..Default::default()
        },
    )
    .await;
    let msg =
        assert_status(sign(&mut kv, &ec, "ES256", &digest).await, Code::PermissionDenied, "KeyNotYetValid");
    assert_eq!(msg, "Operation sign is not allowed on a key that is not yet valid.");
    assert!(verify(&mut kv, &ec, "ES256", &digest, &signature).await.unwrap());
    b.advance(3600).await;
    assert!(sign(&mut kv, &ec, "ES256", &digest).await.is_ok());
    b.stop().await;
}

#[tokio::test]
async fn a_disabled_key_refuses_sign_and_verify() {
    let b = start().await;
    b.vault("dis", false).await;
    let rsa = kid(&b.key("dis", "rsa", "RSA", 2048).await);
    let mut kv = b.kv();
    let digest = sha(256, b"m");
    let signature = sign(&mut kv, &rsa, "PS256", &digest).await.unwrap().value;
    update(&b, proto::UpdateKeyRequest { key_id: rsa.clone(), enabled: Some(false), ..Default::default() })
        .await;
    let msg =
        assert_status(sign(&mut kv, &rsa, "PS256", &digest).await, Code::PermissionDenied, "KeyDisabled");
    assert_eq!(msg, "Operation sign is not allowed on a disabled key.");
    let msg = assert_status(
        verify(&mut kv, &rsa, "PS256", &digest, &signature).await,
        Code::PermissionDenied,
        "KeyDisabled",
    );
    assert_eq!(msg, "Operation verify is not allowed on a disabled key.");
    b.stop().await;
}

#[tokio::test]
async fn key_ops_limit_sign_and_verify() {
    let b = start().await;
    b.vault("ops", false).await;
    let ec = kid(&b
        .create_key(proto::CreateKeyRequest {
            vault_name: "ops".into(),
            name: "verify-only".into(),
            kty: "EC".into(),
            key_ops: vec!["verify".into()],
            ..Default::default()
        })
        .await
        .unwrap());
    let mut kv = b.kv();
    let msg = assert_status(
        sign(&mut kv, &ec, "ES256", &sha(256, b"m")).await,
        Code::PermissionDenied,
        "KeyOperationForbidden",
    );
    assert_eq!(msg, "Operation sign is not permitted on this key.");
    assert!(!verify(&mut kv, &ec, "ES256", &sha(256, b"m"), &[1u8; 64]).await.unwrap());
    b.stop().await;
}

#[tokio::test]
async fn sign_and_verify_need_their_own_permission_or_data_action() {
    let b = start().await;
    b.vault("perm", false).await;
    let ec = kid(&ec_key(&b, "perm", "ec", "EC", "P-256").await);
    let digest = sha(256, b"m");
    let signature = sign(&mut b.kv(), &ec, "ES256", &digest).await.unwrap().value;
    let user = b.user("verifier").await;
    b.policy("perm", &user.object_id, &["Verify"]).await;
    let mut kv = b.kv_with(bearer(&user.token));
    assert!(verify(&mut kv, &ec, "ES256", &digest, &signature).await.unwrap());
    let msg =
        assert_status(sign(&mut kv, &ec, "ES256", &digest).await, Code::PermissionDenied, "AccessDenied");
    assert!(msg.contains("does not have keys sign permission on key vault 'perm;location="), "{msg}");

    // RBAC: Key Vault Crypto User holds .../keys/sign/action and .../keys/verify/action;
    // Key Vault Reader holds neither.
    b.vaults()
        .create_vault(proto::CreateVaultRequest {
            name: "perm-rbac".into(),
            enable_rbac_authorization: true,
            ..Default::default()
        })
        .await
        .unwrap();
    b.assign("https://perm-rbac.vault.azure.net", &b.admin.object_id, "Key Vault Administrator").await;
    let ec = kid(&ec_key(&b, "perm-rbac", "ec", "EC", "P-256").await);
    let (reader, user) = (b.user("reader").await, b.user("crypto-user").await);
    b.assign("https://perm-rbac.vault.azure.net", &reader.object_id, "Key Vault Reader").await;
    b.assign("https://perm-rbac.vault.azure.net", &user.object_id, "Key Vault Crypto User").await;
    let signature = sign(&mut b.kv_with(bearer(&user.token)), &ec, "ES256", &digest).await.unwrap().value;
    assert!(verify(&mut b.kv_with(bearer(&user.token)), &ec, "ES256", &digest, &signature).await.unwrap());
    let mut kv = b.kv_with(bearer(&reader.token));
    let msg =
        assert_status(sign(&mut kv, &ec, "ES256", &digest).await, Code::PermissionDenied, "ForbiddenByRbac");
    assert!(msg.contains("Action: 'Microsoft.KeyVault/vaults/keys/sign/action'"), "{msg}");
    let msg = assert_status(
        verify(&mut kv, &ec, "ES256", &digest, &signature).await,
        Code::PermissionDenied,
        "ForbiddenByRbac",
    );
    assert!(msg.contains("Action: 'Microsoft.KeyVault/vaults/keys/verify/action'"), "{msg}");
    b.stop().await;
}

#[tokio::test]
async fn sign_and_verify_pass_the_data_plane_gate() {
    let b = start().await;
    b.vault("gated", false).await;
    let ec = kid(&ec_key(&b, "gated", "ec", "EC", "P-256").await);
    b.emu()
        .set_faults(proto::SetFaultsRequest {
            vault_name: "gated".into(),
            outage: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut kv = b.kv();
    let digest = sha(256, b"m");
    assert_status(sign(&mut kv, &ec, "ES256", &digest).await, Code::Unavailable, "ServiceUnavailable");
    assert_status(
        verify(&mut kv, &ec, "ES256", &digest, &[1u8; 64]).await,
        Code::Unavailable,
        "ServiceUnavailable",
    );
    assert_status(
        kv.get_random_bytes(proto::GetRandomBytesRequest { vault_name: "gated".into(), count: 8 }).await,
        Code::Unavailable,
        "ServiceUnavailable",
    );
    b.stop().await;
}

#[tokio::test]
async fn random_bytes_come_1_to_128_at_a_time_and_other_counts_are_bad_parameters() {
    let b = start().await;
    b.vault("rng", false).await;
    let mut kv = b.kv();
    let get = |count| {
        let mut kv = kv.clone();
        async move {
            kv.get_random_bytes(proto::GetRandomBytesRequest { vault_name: "rng".into(), count })
                .await
                .map(|r| r.into_inner().value)
        }
    };
    assert_eq!(get(1).await.unwrap().len(), 1);
    let (x, y) = (get(128).await.unwrap(), get(128).await.unwrap());
    assert_eq!(x.len(), 128);
    assert_ne!(x, y);
    for count in [0, -1, 129] {
        let msg = assert_status(get(count).await, Code::InvalidArgument, "BadParameter");
        assert_eq!(msg, format!("The count {count} is invalid. It must be between 1 and 128."));
    }
    assert_status(
        kv.get_random_bytes(proto::GetRandomBytesRequest { vault_name: "nope".into(), count: 8 }).await,
        Code::NotFound,
        "ResourceNotFound",
    );
    b.stop().await;
}

#[tokio::test]
async fn ec_keys_import_as_pkcs8_pem_and_sec1_and_survive_backup_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    run_tool(
        "openssl",
        &["ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out", &path("sec1.pem")],
        OPENSSL,
    );
    run_tool(
        "openssl",
        &["pkcs8", "-topk8", "-nocrypt", "-in", &path("sec1.pem"), "-out", &path("p8.pem")],
        OPENSSL,
    );
    run_tool(
        "openssl",
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            &path("sec1.pem"),
            "-outform",
            "DER",
            "-out",
            &path("p8.der"),
        ],
        OPENSSL,
    );
    let b = start().await;
    b.vault("imp", true).await;
    let import = |name: &str, r: proto::ImportKeyRequest| {
        let mut kv = b.kv();
        let r = proto::ImportKeyRequest { vault_name: "imp".into(), name: name.into(), ..r };
        async move { kv.import_key(r).await.map(|r| r.into_inner().key.unwrap()) }
    };
    let sec1 = std::fs::read_to_string(path("sec1.pem")).unwrap();
    let a =
        import("sec1", proto::ImportKeyRequest { pem: sec1, hsm: true, ..Default::default() }).await.unwrap();
    let p8 = std::fs::read_to_string(path("p8.pem")).unwrap();
    let c = import("p8pem", proto::ImportKeyRequest { pem: p8, ..Default::default() }).await.unwrap();
    let der = std::fs::read(path("p8.der")).unwrap();
    let d = import("p8der", proto::ImportKeyRequest { pkcs8_der: der, ..Default::default() }).await.unwrap();
    assert_eq!((a.kty.as_str(), a.crv.as_str()), ("EC-HSM", "P-384"));
    assert_eq!((c.kty.as_str(), d.kty.as_str()), ("EC", "EC"));
    assert!(a.x == c.x && c.x == d.x && a.y == d.y, "one key, three encodings");
    // A public JWK is no key to import.
    let public = serde_json::json!({"kty": "EC", "crv": "P-384",
        "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&a.x),
        "y": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&a.y)});
    let msg = assert_status(
        import("jwk", proto::ImportKeyRequest { jwk_json: public.to_string(), ..Default::default() }).await,
        Code::InvalidArgument,
        "BadParameter",
    );
    assert_eq!(msg, "The key to import is invalid: invalid key material: JWK member \"d\" is missing.");

    let mut kv = b.kv();
    let digest = sha(384, b"backed up");
    let signature = sign(&mut kv, &a.kid, "ES384", &digest).await.unwrap().value;
    let blob = kv
        .backup_key(proto::BackupKeyRequest { key_id: b.key_uri("imp", "sec1") })
        .await
        .unwrap()
        .into_inner()
        .blob;
    let restored =
        kv.restore_key(proto::RestoreKeyRequest { vault_name: "imp".into(), blob: blob.clone() }).await;
    assert_status(restored, Code::AlreadyExists, "Conflict");
    b.vault("imp2", false).await;
    let restored = kv
        .restore_key(proto::RestoreKeyRequest { vault_name: "imp2".into(), blob })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!((restored.kty.as_str(), restored.crv.as_str(), &restored.x), ("EC-HSM", "P-384", &a.x));
    assert!(verify(&mut kv, &restored.kid, "ES384", &digest, &signature).await.unwrap());
    b.stop().await;
}

#[tokio::test]
async fn ec_signatures_made_by_the_broker_verify_with_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let data_path = dir.path().join("data.bin");
    std::fs::write(&data_path, b"signed by the broker, verified by openssl").unwrap();
    let data = data_path.to_str().unwrap();
    let b = start().await;
    b.vault("eco", false).await;
    for (crv, alg, md, bits) in [
        ("P-256", "ES256", "-sha256", 256),
        ("P-256K", "ES256K", "-sha256", 256),
        ("P-384", "ES384", "-sha384", 384),
        ("P-521", "ES512", "-sha512", 512),
    ] {
        let bundle = ec_key(&b, "eco", &format!("k{bits}{}", crv.len()), "EC", crv).await;
        let key = bundle.key.unwrap();
        let digest = sha(bits, &std::fs::read(&data_path).unwrap());
        let raw = sign(&mut b.kv(), &key.kid, alg, &digest).await.unwrap().value;
        let pub_path = dir.path().join(format!("{crv}.pub.pem"));
        let sig_path = dir.path().join(format!("{crv}.sig.der"));
        std::fs::write(&pub_path, ec_public_pem(&key)).unwrap();
        std::fs::write(&sig_path, ecdsa_raw_to_der(&raw).unwrap()).unwrap();
        let out = run_tool(
            "openssl",
            &[
                "dgst",
                md,
                "-verify",
                pub_path.to_str().unwrap(),
                "-signature",
                sig_path.to_str().unwrap(),
                data,
            ],
            OPENSSL,
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Verified OK", "{crv}");
    }
    b.stop().await;
}

#[tokio::test]
async fn ec_signatures_made_by_openssl_verify_in_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    std::fs::write(path("data.bin"), b"signed by openssl, verified by the broker").unwrap();
    let b = start().await;
    b.vault("eci", false).await;
    for (name, crv, alg, md, bits) in [
        ("prime256v1", "P-256", "ES256", "-sha256", 256),
        ("secp256k1", "P-256K", "ES256K", "-sha256", 256),
        ("secp384r1", "P-384", "ES384", "-sha384", 384),
        ("secp521r1", "P-521", "ES512", "-sha512", 512),
    ] {
        let key = path(&format!("{name}.pem"));
        run_tool(
            "openssl",
            &["genpkey", "-algorithm", "EC", "-pkeyopt", &format!("ec_paramgen_curve:{name}"), "-out", &key],
            OPENSSL,
        );
        let sig = path(&format!("{name}.sig"));
        run_tool("openssl", &["dgst", md, "-sign", &key, "-out", &sig, &path("data.bin")], OPENSSL);
        let pem = std::fs::read_to_string(&key).unwrap();
        let imported = b
            .kv()
            .import_key(proto::ImportKeyRequest {
                vault_name: "eci".into(),
                name: name.into(),
                pem,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap();
        assert_eq!(imported.crv, crv);
        let raw = ecdsa_der_to_raw(&std::fs::read(&sig).unwrap(), curve(crv)).unwrap();
        let digest = sha(bits, &std::fs::read(path("data.bin")).unwrap());
        assert!(verify(&mut b.kv(), &imported.kid, alg, &digest, &raw).await.unwrap(), "{crv}");
        assert!(!verify(&mut b.kv(), &imported.kid, alg, &sha(bits, b"other"), &raw).await.unwrap(), "{crv}");
    }
    b.stop().await;
}

#[tokio::test]
async fn rsa_pss_signatures_interoperate_with_openssl_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    std::fs::write(path("data.bin"), b"PSS both ways").unwrap();
    run_tool(
        "openssl",
        &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", &path("key.pem")],
        OPENSSL,
    );
    run_tool("openssl", &["pkey", "-in", &path("key.pem"), "-pubout", "-out", &path("pub.pem")], OPENSSL);
    let b = start().await;
    b.vault("pss", false).await;
    let pem = std::fs::read_to_string(path("key.pem")).unwrap();
    let key_id = kid(&b
        .kv()
        .import_key(proto::ImportKeyRequest {
            vault_name: "pss".into(),
            name: "k".into(),
            pem,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner());
    let data = std::fs::read(path("data.bin")).unwrap();
    for (alg, md, bits) in [("PS256", "sha256", 256), ("PS384", "sha384", 384), ("PS512", "sha512", 512)] {
        let openssl = |action: &[String]| {
            let mut args: Vec<String> = [&format!("-{md}"), "-sigopt", "rsa_padding_mode:pss", "-sigopt"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.extend(["rsa_pss_saltlen:digest".into(), "-sigopt".into(), format!("rsa_mgf1_md:{md}")]);
            args.insert(0, "dgst".into());
            args.extend(action.iter().cloned());
            args.push(path("data.bin"));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            run_tool("openssl", &refs, OPENSSL)
        };
        // Broker → openssl.
        let digest = sha(bits, &data);
        let signature = sign(&mut b.kv(), &key_id, alg, &digest).await.unwrap().value;
        std::fs::write(path("broker.sig"), &signature).unwrap();
        let out = openssl(&["-verify".into(), path("pub.pem"), "-signature".into(), path("broker.sig")]);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Verified OK", "{alg}");
        // openssl → broker.
        openssl(&["-sign".into(), path("key.pem"), "-out".into(), path("openssl.sig")]);
        let theirs = std::fs::read(path("openssl.sig")).unwrap();
        assert!(verify(&mut b.kv(), &key_id, alg, &digest, &theirs).await.unwrap(), "{alg}");
    }
    b.stop().await;
}

#[tokio::test]
async fn rsa_signatures_agree_with_the_rsa_crate_both_ways() {
    let private = rsa::PrivateKey::new(&mut TestRng, 2048).expect("rsa key");
    let public = private.to_public_key();
    let der = private.to_pkcs8_der().unwrap();
    let b = start().await;
    b.vault("rcrate", false).await;
    let key_id = kid(&b
        .kv()
        .import_key(proto::ImportKeyRequest {
            vault_name: "rcrate".into(),
            name: "k".into(),
            pkcs8_der: der.as_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner());
    let mut kv = b.kv();
    macro_rules! both_ways {
        ($bits:literal, $hash:ty) => {{
            let digest = sha($bits, b"differential");
            // PKCS#1 v1.5 is deterministic: both sides make the same signature.
            let theirs =
                private.sign_with_rng(&mut TestRng, rsa::Pkcs1v15Sign::new::<$hash>(), &digest).unwrap();
            let ours = sign(&mut kv, &key_id, concat!("RS", $bits), &digest).await.unwrap().value;
            assert_eq!(ours, theirs, concat!("RS", $bits));
            assert!(verify(&mut kv, &key_id, concat!("RS", $bits), &digest, &theirs).await.unwrap());
            // PSS is randomized (salt as long as the hash): each side verifies the other's.
            let theirs = private.sign_with_rng(&mut TestRng, rsa::Pss::<$hash>::new(), &digest).unwrap();
            assert!(verify(&mut kv, &key_id, concat!("PS", $bits), &digest, &theirs).await.unwrap());
            let ours = sign(&mut kv, &key_id, concat!("PS", $bits), &digest).await.unwrap().value;
            public.verify(rsa::Pss::<$hash>::new(), &digest, &ours).expect(concat!("PS", $bits));
        }};
    }
    both_ways!(256, sha2::Sha256);
    both_ways!(384, sha2::Sha384);
    both_ways!(512, sha2::Sha512);
    b.stop().await;
}

#[tokio::test]
async fn ec_keys_weigh_like_rsa_2048_keys_in_the_throttling_budget() {
    let b = start().await;
    b.vault("thr-ec", false).await;
    let soft = kid(&ec_key(&b, "thr-ec", "soft", "EC", "P-521").await);
    let hsm = kid(&ec_key(&b, "thr-ec", "hsm", "EC-HSM", "P-384").await);
    // A budget of 8 RSA-2048 software units per window: 8 EC operations, or 4 EC-HSM ones,
    // whatever the curve.
    b.emu()
        .set_throttling(proto::SetThrottlingRequest {
            profile: "custom".into(),
            all_other_per_10s: 8,
            create_per_10s: 20,
            vault_name: "thr-ec".into(),
        })
        .await
        .unwrap();
    let mut kv = b.kv();
    for (key_id, alg, bits, fit) in [(&soft, "ES512", 512, 8), (&hsm, "ES384", 384, 4)] {
        let digest = sha(bits, b"m");
        for i in 0..fit {
            sign(&mut kv, key_id, alg, &digest).await.unwrap_or_else(|e| panic!("{alg} #{i}: {e:?}"));
        }
        assert_status(sign(&mut kv, key_id, alg, &digest).await, Code::ResourceExhausted, "Throttled");
        b.advance(10).await;
    }
    b.stop().await;
}
