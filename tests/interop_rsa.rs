//! Interop with independent RSA implementations: ciphertexts made outside the broker from its
//! public `n`/`e` unwrap inside it (RustCrypto `rsa` 0.10), and ciphertexts made inside decrypt
//! outside it (`openssl pkeyutl` with the same key, imported as PEM).

mod common;

use common::*;
use rsa::traits::PublicKeyParts;
use rsa::{BoxedUint, Oaep, Pkcs1v15Encrypt, PublicKey};
use tde_broker::grpc::proto;

const DEK: &[u8] = b"0123456789abcdef0123456789abcdef";

fn public_key(bundle: &proto::KeyBundle) -> PublicKey {
    let k = bundle.key.as_ref().unwrap();
    let n = BoxedUint::from_be_slice_vartime(&k.n);
    let e = BoxedUint::from_be_slice_vartime(&k.e);
    PublicKey::new(n, e).expect("public key from n/e")
}

#[tokio::test]
async fn ciphertext_made_outside_from_public_n_and_e_unwraps_inside() {
    let b = start().await;
    b.vault("io-vault", false).await;
    for (size, name) in [(2048, "k2048"), (3072, "k3072")] {
        let bundle = b.key("io-vault", name, "RSA", size).await;
        let pk = public_key(&bundle);
        assert_eq!(pk.size() * 8, size as usize);
        let id = kid(&bundle);
        let oaep256 = pk.encrypt(&mut TestRng, Oaep::<sha2::Sha256>::new(), DEK).unwrap();
        let oaep1 = pk.encrypt(&mut TestRng, Oaep::<sha1::Sha1>::new(), DEK).unwrap();
        let pkcs1 = pk.encrypt(&mut TestRng, Pkcs1v15Encrypt, DEK).unwrap();
        for (alg, ct) in [("RSA-OAEP-256", oaep256), ("RSA-OAEP", oaep1), ("RSA1_5", pkcs1)] {
            let out =
                b.kv().unwrap_key(unwrap_req(&id, alg, &ct)).await.unwrap_or_else(|e| panic!("{alg}: {e:?}"));
            assert_eq!(out.into_inner().value, DEK, "{size} {alg}");
        }
    }
    b.stop().await;
}

#[tokio::test]
async fn ciphertext_made_inside_decrypts_with_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let key_pem = dir.path().join("key.pem");
    let key_path = key_pem.to_str().unwrap();
    let hint = "apt-get install openssl";
    run_tool(
        "openssl",
        &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key_path],
        hint,
    );
    let pem = std::fs::read_to_string(&key_pem).unwrap();

    let b = start().await;
    b.vault("ossl-vault", false).await;
    let bundle = b
        .kv()
        .import_key(proto::ImportKeyRequest {
            vault_name: "ossl-vault".into(),
            name: "imported".into(),
            pem,
            ..Default::default()
        })
        .await
        .expect("import PEM")
        .into_inner();
    let id = kid(&bundle);
    for (alg, opts) in [
        (
            "RSA-OAEP-256",
            &[
                "-pkeyopt",
                "rsa_padding_mode:oaep",
                "-pkeyopt",
                "rsa_oaep_md:sha256",
                "-pkeyopt",
                "rsa_mgf1_md:sha256",
            ][..],
        ),
        ("RSA-OAEP", &["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha1"][..]),
        ("RSA1_5", &["-pkeyopt", "rsa_padding_mode:pkcs1"][..]),
    ] {
        let wrapped = b.kv().wrap_key(crypto_req(&id, alg, DEK)).await.unwrap().into_inner().value;
        let ct = dir.path().join(format!("{alg}.bin"));
        std::fs::write(&ct, &wrapped).unwrap();
        let pt = dir.path().join(format!("{alg}.out"));
        let mut args = vec![
            "pkeyutl",
            "-decrypt",
            "-inkey",
            key_path,
            "-in",
            ct.to_str().unwrap(),
            "-out",
            pt.to_str().unwrap(),
        ];
        args.extend_from_slice(opts);
        run_tool("openssl", &args, hint);
        assert_eq!(std::fs::read(&pt).unwrap(), DEK, "{alg}");
    }
    b.stop().await;
}

#[tokio::test]
async fn keys_imported_as_pkcs8_der_and_private_jwk_work_like_the_original() {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use rsa::pkcs8::EncodePrivateKey;
    use rsa::traits::PrivateKeyParts;

    let sk = rsa::PrivateKey::new(&mut TestRng, 2048).unwrap();
    let pk = sk.to_public_key();
    let be = |x: &BoxedUint| {
        let bytes = x.to_be_bytes();
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        B64.encode(&bytes[start..])
    };
    let primes = sk.primes();
    let jwk = serde_json::json!({
        "kty": "RSA",
        "n": be(pk.n()),
        "e": be(pk.e()),
        "d": be(sk.d()),
        "p": be(&primes[0]),
        "q": be(&primes[1]),
    })
    .to_string();
    let der = sk.to_pkcs8_der().unwrap().as_bytes().to_vec();

    let b = start().await;
    b.vault("imp-vault", false).await;
    let from_der = b
        .kv()
        .import_key(proto::ImportKeyRequest {
            vault_name: "imp-vault".into(),
            name: "der".into(),
            pkcs8_der: der,
            hsm: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let from_jwk = b
        .kv()
        .import_key(proto::ImportKeyRequest {
            vault_name: "imp-vault".into(),
            name: "jwk".into(),
            jwk_json: jwk,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(from_der.key.as_ref().unwrap().kty, "RSA-HSM");
    assert_eq!(from_der.key.as_ref().unwrap().n, from_jwk.key.as_ref().unwrap().n);
    let ct = pk.encrypt(&mut TestRng, Oaep::<sha2::Sha256>::new(), DEK).unwrap();
    for bundle in [&from_der, &from_jwk] {
        let out =
            b.kv().unwrap_key(unwrap_req(&kid(bundle), "RSA-OAEP-256", &ct)).await.unwrap().into_inner();
        assert_eq!(out.value, DEK);
    }
    // Inside → outside: the rsa crate decrypts what the broker wrapped.
    let wrapped =
        b.kv().wrap_key(crypto_req(&kid(&from_jwk), "RSA-OAEP", DEK)).await.unwrap().into_inner().value;
    assert_eq!(sk.decrypt(Oaep::<sha1::Sha1>::new(), &wrapped).unwrap(), DEK);
    // Garbage material is refused clearly.
    let bad = b
        .kv()
        .import_key(proto::ImportKeyRequest {
            vault_name: "imp-vault".into(),
            name: "bad".into(),
            pem: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
            ..Default::default()
        })
        .await;
    assert_status(bad, tonic::Code::InvalidArgument, "BadParameter");
    b.stop().await;
}
