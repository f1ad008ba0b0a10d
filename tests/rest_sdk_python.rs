//! The unmodified Azure SDK for Python (azure-keyvault-keys, azure-identity, pinned, in a
//! virtualenv under `target/`) against the broker's Key Vault REST API and token endpoints: an
//! application changes only its vault URL and its credential's environment, and sees the keys,
//! permissions, refusal texts and retries it would see on Azure — the same as over gRPC.
//!
//! Needs python3 with venv and PyPI the first time (the test says what to install). No test
//! turns TLS verification off or patches the SDK: the broker's dev CA is trusted through
//! `REQUESTS_CA_BUNDLE`, credentials come from their documented environment variables.

mod common;
#[path = "common/sdk.rs"]
mod sdk;

use common::*;
use sdk::{b64, err, ok, unb64};
use serde_json::{Value, json};
use tde_broker::grpc::proto;
use tonic::Code;

const DEK: [u8; 32] = [0x5a; 32];

/// The step results' values at `index`.
fn step(results: &[Value], index: usize) -> &Value {
    results.get(index).unwrap_or_else(|| panic!("no result {index} in {results:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_client_creates_gets_updates_and_lists_rsa_and_ec_keys_across_pages() {
    let r = sdk::start(|_| {}).await;
    let operator = r.vault_with_operator("sdk-keys").await;
    let mut steps = vec![
        json!({"op": "create_rsa", "name": "rsa-key", "size": 2048}),
        json!({"op": "create_ec", "name": "ec-key", "curve": "P-256"}),
        json!({"op": "get", "name": "rsa-key"}),
        json!({"op": "update", "name": "rsa-key", "enabled": false, "tags": {"purpose": "tde"}}),
        json!({"op": "get", "name": "rsa-key"}),
    ];
    for i in 0..33 {
        steps.push(json!({"op": "create_ec", "name": format!("many-{i:02}")}));
    }
    steps.push(json!({"op": "list", "max_page_size": 10}));
    let out = r.python("sdk-keys", &operator, Value::Array(steps)).await;

    let rsa = ok(step(&out, 0));
    assert_eq!(rsa["kty"], "RSA");
    assert_eq!(rsa["n_bits"], 2048);
    let prefix = format!("{}/keys/rsa-key/", r.vault_url("sdk-keys"));
    assert!(rsa["id"].as_str().unwrap().starts_with(&prefix), "key id on the URL called: {}", rsa["id"]);
    let ec = ok(step(&out, 1));
    assert_eq!(ec["kty"], "EC");
    assert_eq!(ec["crv"], "P-256");
    assert_eq!(ok(step(&out, 2))["id"], rsa["id"], "get returns the key created");
    assert_eq!(ok(step(&out, 2))["enabled"], true);
    let updated = ok(step(&out, 3));
    assert_eq!(updated["enabled"], false);
    assert_eq!(updated["tags"], json!({"purpose": "tde"}));
    let read = ok(step(&out, 4));
    assert_eq!((read["enabled"].clone(), read["tags"].clone()), (json!(false), json!({"purpose": "tde"})));

    // The same key seen over gRPC: the update made through the SDK is the key's state.
    let got =
        r.broker.kv().get_key(proto::GetKeyRequest { key_id: r.broker.key_uri("sdk-keys", "rsa-key") }).await;
    let got = got.expect("get over gRPC").into_inner();
    assert_eq!(got.attributes.expect("attributes").enabled, Some(false));

    let listing = ok(step(&out, out.len() - 1));
    let mut names: Vec<&str> =
        listing["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    names.sort_unstable();
    let mut expected: Vec<String> = (0..33).map(|i| format!("many-{i:02}")).collect();
    expected.extend(["ec-key".to_string(), "rsa-key".to_string()]);
    expected.sort_unstable();
    assert_eq!(names, expected, "every key listed exactly once across the pages");
    let pages: Vec<u64> =
        listing["page_sizes"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
    assert!(pages.len() >= 4, "35 keys in pages of at most 10: {pages:?}");
    assert!(pages.iter().all(|&n| n <= 10), "maxresults honoured: {pages:?}");
    r.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_client_deletes_recovers_deletes_again_and_purges_through_the_pollers() {
    let r = sdk::start(|_| {}).await;
    let operator = r.vault_with_operator("sdk-soft").await;
    let out = r
        .python(
            "sdk-soft",
            &operator,
            json!([
                {"op": "create_rsa", "name": "k"},
                {"op": "delete", "name": "k"},
                {"op": "deleted_names"},
                {"op": "get", "name": "k"},
                {"op": "recover", "name": "k"},
                {"op": "get", "name": "k"},
                {"op": "delete", "name": "k"},
                {"op": "purge", "name": "k"},
                {"op": "deleted_names"},
                {"op": "get", "name": "k"},
            ]),
        )
        .await;
    let created = ok(step(&out, 0));
    let deleted = ok(step(&out, 1));
    assert_eq!(deleted["name"], "k");
    assert!(deleted["recovery_id"].as_str().is_some_and(|id| id.contains("/deletedkeys/k")), "{deleted}");
    assert_eq!(
        (deleted["deleted_on"].clone(), deleted["scheduled_purge"].clone()),
        (json!(true), json!(true))
    );
    assert_eq!(ok(step(&out, 2)), &json!(["k"]));
    let gone = err(step(&out, 3));
    assert_eq!((gone["status"].clone(), gone["code"].clone()), (json!(404), json!("KeyNotFound")), "{gone}");
    assert_eq!(gone["type"], "ResourceNotFoundError");
    assert_eq!(ok(step(&out, 4))["id"], created["id"], "the recovered key is the same version");
    assert_eq!(ok(step(&out, 5))["id"], created["id"]);
    ok(step(&out, 6));
    assert_eq!(ok(step(&out, 7)), &json!(true));
    assert_eq!(ok(step(&out, 8)), &json!([]), "purged: no longer among the deleted keys");
    assert_eq!(err(step(&out, 9))["status"], 404);
    r.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_client_backs_up_purges_and_restores_a_key() {
    let r = sdk::start(|_| {}).await;
    let operator = r.vault_with_operator("sdk-backup").await;
    let first = r
        .python(
            "sdk-backup",
            &operator,
            json!([
                {"op": "create_rsa", "name": "kept"},
                {"op": "backup", "name": "kept"},
                {"op": "delete", "name": "kept"},
                {"op": "purge", "name": "kept"},
                {"op": "get", "name": "kept"},
            ]),
        )
        .await;
    let created = ok(step(&first, 0)).clone();
    let backup = ok(step(&first, 1)).as_str().expect("backup blob").to_string();
    assert!(!unb64(&json!(backup)).is_empty());
    assert_eq!(err(step(&first, 4))["status"], 404, "purged");
    let second = r
        .python(
            "sdk-backup",
            &operator,
            json!([{"op": "restore", "backup": backup}, {"op": "get", "name": "kept"}]),
        )
        .await;
    assert_eq!(ok(step(&second, 0))["id"], created["id"], "restored with its version");
    assert_eq!(ok(step(&second, 1))["id"], created["id"]);
    r.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_client_rotates_a_key_and_sets_its_rotation_policy() {
    let r = sdk::start(|_| {}).await;
    let operator = r.vault_with_operator("sdk-rotate").await;
    let out = r
        .python(
            "sdk-rotate",
            &operator,
            json!([
                {"op": "create_rsa", "name": "r"},
                {"op": "rotate", "name": "r"},
                {"op": "versions", "name": "r"},
                {"op": "get", "name": "r"},
                {"op": "set_rotation_policy", "name": "r", "expires_in": "P90D", "rotate_before_expiry": "P30D"},
                {"op": "get_rotation_policy", "name": "r"},
            ]),
        )
        .await;
    let v1 = ok(step(&out, 0))["version"].as_str().unwrap().to_string();
    let v2 = ok(step(&out, 1))["version"].as_str().unwrap().to_string();
    assert_ne!(v1, v2, "rotation makes a new version");
    let mut both = vec![v1, v2.clone()];
    both.sort();
    assert_eq!(ok(step(&out, 2)), &json!(both));
    assert_eq!(ok(step(&out, 3))["version"], json!(v2), "the latest version is the rotated one");
    for i in [4, 5] {
        let policy = ok(step(&out, i));
        assert_eq!(policy["expires_in"], "P90D", "{policy}");
        let actions = policy["actions"].as_array().unwrap();
        assert!(
            actions.iter().any(|a| a["action"] == "rotate" && a["time_before_expiry"] == "P30D"),
            "{policy}"
        );
    }
    r.broker.stop().await;
}

/// An RSA key and an EC key in `vault`, and a service principal holding every cryptographic
/// permission but not `get`: the SDK's CryptographyClient cannot read the key and so performs
/// every operation remotely, over the REST API.
async fn crypto_setup(r: &sdk::Rest, vault: &str) -> (String, String, Vec<(String, String)>) {
    r.broker.vault(vault, false).await;
    let rsa = kid(&r.broker.key(vault, "rsa", "RSA", 2048).await);
    let ec = r
        .broker
        .create_key(proto::CreateKeyRequest {
            vault_name: vault.into(),
            name: "ec".into(),
            kty: "EC".into(),
            crv: "P-256".into(),
            ..Default::default()
        })
        .await
        .expect("EC key");
    let ec = kid(&ec);
    let perms = ["wrapKey", "unwrapKey", "encrypt", "decrypt", "sign", "verify"];
    let sp = r.service_principal(&format!("{vault}-crypto"), vault, &perms).await;
    // The key ids over REST are the vault URL's.
    let rest_id =
        |grpc_id: &str| grpc_id.replace(&format!("https://{vault}.vault.azure.net"), &r.vault_url(vault));
    (rest_id(&rsa), rest_id(&ec), r.secret(&sp))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cryptography_client_wraps_encrypts_and_signs_over_rest() {
    let r = sdk::start(|_| {}).await;
    let (rsa, ec, cred) = crypto_setup(&r, "sdk-crypto").await;
    let digest = [0x11u8; 32];
    let mut steps = Vec::new();
    for alg in ["RSA-OAEP", "RSA-OAEP-256", "RSA1_5"] {
        steps.push(json!({"op": "wrap", "kid": rsa, "alg": alg, "value": b64(&DEK)}));
    }
    steps.push(json!({"op": "encrypt", "kid": rsa, "alg": "RSA-OAEP-256", "value": b64(b"plain text")}));
    steps.push(json!({"op": "sign", "kid": rsa, "alg": "RS256", "digest": b64(&digest)}));
    steps.push(json!({"op": "sign", "kid": ec, "alg": "ES256", "digest": b64(&digest)}));
    let first = r.python("sdk-crypto", &cred, Value::Array(steps)).await;
    for s in &first {
        let kid_used = ok(s)["kid"].as_str().unwrap();
        assert!(kid_used.starts_with(&r.vault_url("sdk-crypto")), "done remotely, by the key: {kid_used}");
    }

    let mut steps = Vec::new();
    for (i, alg) in ["RSA-OAEP", "RSA-OAEP-256", "RSA1_5"].iter().enumerate() {
        steps.push(json!({"op": "unwrap", "kid": rsa, "alg": alg, "value": ok(&first[i])["value"]}));
    }
    steps.push(json!({"op": "decrypt", "kid": rsa, "alg": "RSA-OAEP-256", "value": ok(&first[3])["value"]}));
    steps.push(json!({"op": "verify", "kid": rsa, "alg": "RS256", "digest": b64(&digest), "signature": ok(&first[4])["signature"]}));
    steps.push(json!({"op": "verify", "kid": ec, "alg": "ES256", "digest": b64(&digest), "signature": ok(&first[5])["signature"]}));
    let mut tampered = unb64(&ok(&first[5])["signature"]);
    tampered[0] ^= 1;
    steps.push(json!({"op": "verify", "kid": ec, "alg": "ES256", "digest": b64(&digest), "signature": b64(&tampered)}));
    let second = r.python("sdk-crypto", &cred, Value::Array(steps)).await;
    for (alg, s) in ["RSA-OAEP", "RSA-OAEP-256", "RSA1_5"].iter().zip(&second) {
        assert_eq!(unb64(&ok(s)["value"]), DEK, "unwrap with {alg}");
    }
    assert_eq!(unb64(&ok(&second[3])["value"]), b"plain text");
    assert_eq!(ok(&second[4]), &json!(true), "RS256 signature verifies");
    assert_eq!(ok(&second[5]), &json!(true), "ES256 signature verifies");
    assert_eq!(ok(&second[6]), &json!(false), "a tampered signature does not");
    // Every operation above was answered by the broker: the SDK's key read was refused (403) and
    // each cryptographic call got its 200.
    for s in first.iter().chain(&second) {
        let statuses: Vec<i64> =
            s["responses"].as_array().unwrap().iter().map(|p| p[0].as_i64().unwrap()).collect();
        assert!(statuses.contains(&403) && statuses.last() == Some(&200), "{statuses:?}");
    }
    r.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_wrapped_over_rest_unwraps_over_grpc_and_the_other_way_round() {
    let r = sdk::start(|_| {}).await;
    let (rsa, _, cred) = crypto_setup(&r, "sdk-both").await;
    let grpc_id = r.broker.key_uri("sdk-both", "rsa");
    let over_grpc = r
        .broker
        .kv()
        .wrap_key(crypto_req(&grpc_id, "RSA-OAEP-256", &DEK))
        .await
        .expect("wrap over gRPC")
        .into_inner()
        .value;
    let out = r
        .python(
            "sdk-both",
            &cred,
            json!([
                {"op": "wrap", "kid": rsa, "alg": "RSA-OAEP-256", "value": b64(&DEK)},
                {"op": "unwrap", "kid": rsa, "alg": "RSA-OAEP-256", "value": b64(&over_grpc)},
            ]),
        )
        .await;
    assert_eq!(unb64(&ok(&out[1])["value"]), DEK, "wrapped over gRPC, unwrapped by the SDK");
    let over_rest = unb64(&ok(&out[0])["value"]);
    // The REST key id (the vault URL's) addresses the same key over gRPC.
    let rest_kid = ok(&out[0])["kid"].as_str().unwrap().to_string();
    for id in [grpc_id.as_str(), rest_kid.as_str()] {
        let plain = r
            .broker
            .kv()
            .unwrap_key(unwrap_req(id, "RSA-OAEP-256", &over_rest))
            .await
            .unwrap_or_else(|e| panic!("unwrap over gRPC with {id}: {e:?}"))
            .into_inner()
            .value;
        assert_eq!(plain, DEK, "wrapped by the SDK, unwrapped over gRPC by {id}");
    }
    r.broker.stop().await;
}

/// A user-assigned identity holding only wrapKey/unwrapKey on an RSA key of `vault`: its
/// identity, its gRPC token, and the key's id over REST.
async fn wrap_only_identity(r: &sdk::Rest, vault: &str) -> (proto::Identity, Who, String) {
    r.broker.vault(vault, false).await;
    let key = kid(&r.broker.key(vault, "tde", "RSA", 2048).await);
    let (identity, who) = r.broker.identity("rg", &format!("{vault}-mi")).await;
    r.broker.policy(vault, &identity.principal_id, &["wrapKey", "unwrapKey"]).await;
    let rest_id = key.replace(&format!("https://{vault}.vault.azure.net"), &r.vault_url(vault));
    (identity, who, rest_id)
}

/// The message gRPC gives `who` for a refused operation.
async fn grpc_refusal<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
) -> (Code, String) {
    let status = result.expect_err("refused over gRPC");
    (status.code(), status.message().to_string())
}

async fn managed_identity_wraps_and_is_refused_get_key(protocol: &str) {
    let r = sdk::start(|_| {}).await;
    let vault = format!("sdk-{protocol}");
    let (identity, who, key) = wrap_only_identity(&r, &vault).await;
    let cred = if protocol == "appservice" {
        r.app_service(&identity.client_id)
    } else {
        r.imds(&identity.client_id)
    };
    let out = r
        .python(
            &vault,
            &cred,
            json!([
                {"op": "wrap", "kid": key, "alg": "RSA-OAEP-256", "value": b64(&DEK)},
                {"op": "get", "name": "tde"},
            ]),
        )
        .await;
    let wrapped = ok(&out[0])["value"].clone();
    let back = r
        .python(&vault, &cred, json!([{"op": "unwrap", "kid": key, "alg": "RSA-OAEP-256", "value": wrapped}]))
        .await;
    assert_eq!(unb64(&ok(&back[0])["value"]), DEK);

    let refused = err(&out[1]);
    assert_eq!(refused["type"], "HttpResponseError", "{refused}");
    assert_eq!(
        (refused["status"].clone(), refused["code"].clone()),
        (json!(403), json!("Forbidden")),
        "{refused}"
    );
    assert_eq!(refused["inner"], "AccessDenied", "{refused}");
    let (code, message) = grpc_refusal(
        r.broker
            .kv_with(bearer(&who.token))
            .get_key(proto::GetKeyRequest { key_id: r.broker.key_uri(&vault, "tde") })
            .await,
    )
    .await;
    assert_eq!(code, Code::PermissionDenied);
    assert_eq!(refused["message"], json!(message), "the SDK's 403 carries Key Vault's text, as gRPC does");
    assert!(message.contains("does not have keys get permission on key vault"), "{message}");
    r.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_identity_over_app_service_wraps_and_unwraps_and_get_key_raises_key_vaults_403() {
    managed_identity_wraps_and_is_refused_get_key("appservice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_identity_over_imds_wraps_and_unwraps_and_get_key_raises_key_vaults_403() {
    managed_identity_wraps_and_is_refused_get_key("imds").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_key_refuses_the_sdk_with_the_grpc_text_and_an_enabled_one_serves_it() {
    let r = sdk::start(|_| {}).await;
    let (identity, who, key) = wrap_only_identity(&r, "sdk-disabled").await;
    let cred = r.app_service(&identity.client_id);
    let grpc_id = r.broker.key_uri("sdk-disabled", "tde");
    let wrapped =
        r.broker.kv().wrap_key(crypto_req(&grpc_id, "RSA-OAEP-256", &DEK)).await.unwrap().into_inner().value;
    let set_enabled = |enabled: bool| proto::UpdateKeyRequest {
        key_id: grpc_id.clone(),
        enabled: Some(enabled),
        ..Default::default()
    };
    r.broker.kv().update_key(set_enabled(false)).await.expect("disable");

    let out = r
        .python(
            "sdk-disabled",
            &cred,
            json!([
                {"op": "wrap", "kid": key, "alg": "RSA-OAEP-256", "value": b64(&DEK)},
                {"op": "unwrap", "kid": key, "alg": "RSA-OAEP-256", "value": b64(&wrapped)},
            ]),
        )
        .await;
    let user = r.broker.kv_with(bearer(&who.token));
    let grpc = [
        grpc_refusal(user.clone().wrap_key(crypto_req(&grpc_id, "RSA-OAEP-256", &DEK)).await).await,
        grpc_refusal(user.clone().unwrap_key(unwrap_req(&grpc_id, "RSA-OAEP-256", &wrapped)).await).await,
    ];
    for (i, (code, message)) in grpc.iter().enumerate() {
        let e = err(&out[i]);
        assert_eq!(*code, Code::PermissionDenied);
        assert_eq!((e["status"].clone(), e["inner"].clone()), (json!(403), json!("KeyDisabled")), "{e}");
        assert_eq!(e["message"], json!(message), "same text as gRPC");
        assert!(message.contains("is not allowed on a disabled key"), "{message}");
    }

    r.broker.kv().update_key(set_enabled(true)).await.expect("enable");
    let out = r
        .python(
            "sdk-disabled",
            &cred,
            json!([{"op": "unwrap", "kid": key, "alg": "RSA-OAEP-256", "value": b64(&wrapped)}]),
        )
        .await;
    assert_eq!(unb64(&ok(&out[0])["value"]), DEK, "enabled again: unwraps");
    r.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_refuses_wrap_and_still_unwraps_for_the_sdk_as_over_grpc() {
    let r = sdk::start(|_| {}).await;
    let (identity, who, key) = wrap_only_identity(&r, "sdk-expired").await;
    let cred = r.imds(&identity.client_id);
    let grpc_id = r.broker.key_uri("sdk-expired", "tde");
    let wrapped =
        r.broker.kv().wrap_key(crypto_req(&grpc_id, "RSA-OAEP-256", &DEK)).await.unwrap().into_inner().value;
    let now = r.broker.now().await;
    let expire =
        proto::UpdateKeyRequest { key_id: grpc_id.clone(), expires: Some(now + 60), ..Default::default() };
    r.broker.kv().update_key(expire).await.expect("set expiry");
    r.broker.advance(120).await;

    let out = r
        .python(
            "sdk-expired",
            &cred,
            json!([
                {"op": "wrap", "kid": key, "alg": "RSA-OAEP-256", "value": b64(&DEK)},
                {"op": "unwrap", "kid": key, "alg": "RSA-OAEP-256", "value": b64(&wrapped)},
            ]),
        )
        .await;
    let (code, message) = grpc_refusal(
        r.broker.kv_with(bearer(&who.token)).wrap_key(crypto_req(&grpc_id, "RSA-OAEP-256", &DEK)).await,
    )
    .await;
    assert_eq!(code, Code::PermissionDenied);
    let e = err(&out[0]);
    assert_eq!((e["status"].clone(), e["message"].clone()), (json!(403), json!(message)), "{e}");
    assert_eq!(e["inner"], "KeyExpired", "{e}");
    assert!(message.contains("is not allowed on an expired key"), "{message}");
    assert_eq!(unb64(&ok(&out[1])["value"]), DEK, "an expired key still unwraps (no crypto-lock)");
    r.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vault_firewall_refuses_the_sdk_with_the_grpc_text_until_its_address_is_allowed() {
    let r = sdk::start(|_| {}).await;
    let (identity, who, key) = wrap_only_identity(&r, "sdk-fw").await;
    let cred = r.app_service(&identity.client_id);
    let acls = |ip: &str| proto::NetworkAcls {
        default_action: "Deny".into(),
        bypass: "None".into(),
        ip_rules: vec![ip.into()],
        ..Default::default()
    };
    r.broker.firewall("sdk-fw", acls("127.0.0.2"), None).await;
    let wrap = json!([{"op": "wrap", "kid": key, "alg": "RSA-OAEP-256", "value": b64(&DEK)}]);
    let out = r.python("sdk-fw", &cred, wrap.clone()).await;
    let grpc_id = r.broker.key_uri("sdk-fw", "tde");
    let (code, message) = grpc_refusal(
        r.broker.kv_with(bearer(&who.token)).wrap_key(crypto_req(&grpc_id, "RSA-OAEP-256", &DEK)).await,
    )
    .await;
    assert_eq!(code, Code::PermissionDenied);
    let e = err(&out[0]);
    assert_eq!((e["status"].clone(), e["inner"].clone()), (json!(403), json!("ForbiddenByFirewall")), "{e}");
    assert_eq!(e["message"], json!(message), "same text as gRPC (both connect from 127.0.0.1)");

    r.broker.firewall("sdk-fw", acls("127.0.0.1"), None).await;
    let out = r.python("sdk-fw", &cred, wrap).await;
    ok(&out[0]);
    r.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_sdk_waits_out_retry_after_and_succeeds() {
    // Wall-clock time: the SDK sleeps the Retry-After it is given, and the vault's window must
    // move on while it sleeps.
    let r = sdk::start(|cfg| cfg.clock = tde_broker::config::ClockKind::System).await;
    let (identity, _, key) = wrap_only_identity(&r, "sdk-throttle").await;
    let cred = r.app_service(&identity.client_id);
    r.broker
        .emu()
        .set_throttling(proto::SetThrottlingRequest {
            profile: "custom".into(),
            all_other_per_10s: 3,
            create_per_10s: 3,
            vault_name: "sdk-throttle".into(),
        })
        .await
        .expect("throttling");
    let steps: Vec<Value> = (0..5)
        .map(|_| json!({"op": "wrap", "kid": key, "alg": "RSA-OAEP-256", "value": b64(&DEK)}))
        .collect();
    let out = r.python("sdk-throttle", &cred, Value::Array(steps)).await;
    for s in &out {
        ok(s);
    }
    let responses: Vec<&Value> = out.iter().flat_map(|s| s["responses"].as_array().unwrap()).collect();
    let throttled: Vec<&&Value> = responses.iter().filter(|p| p[0] == 429).collect();
    assert!(!throttled.is_empty(), "the vault throttled the SDK: {responses:?}");
    for p in &throttled {
        let after: u64 = p[1]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("429 without Retry-After: {p}"));
        assert!((1..=10).contains(&after), "Retry-After within the 10-second window: {after}");
    }
    r.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_credential_authenticates_a_service_principal_with_its_permissions() {
    let r = sdk::start(|_| {}).await;
    r.broker.vault("sdk-sp", false).await;
    r.broker.key("sdk-sp", "k", "RSA", 2048).await;
    let sp = r.service_principal("reader", "sdk-sp", &["get"]).await;
    let cred = r.secret(&sp);
    let key = format!("{}/keys/k", r.vault_url("sdk-sp"));
    let out = r
        .python(
            "sdk-sp",
            &cred,
            json!([
                {"op": "get", "name": "k"},
                {"op": "unwrap", "kid": key, "alg": "RSA-OAEP-256", "value": b64(&[1u8; 256])},
            ]),
        )
        .await;
    assert_eq!(ok(&out[0])["kty"], "RSA", "the service principal reads the key");
    let e = err(&out[1]);
    assert_eq!((e["status"].clone(), e["inner"].clone()), (json!(403), json!("AccessDenied")), "{e}");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains(&format!("oid={}", sp.object_id)), "names the principal: {message}");
    assert!(message.contains("does not have keys unwrapKey permission"), "{message}");
    r.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_python_example_runs_as_written() {
    let r = sdk::start(|_| {}).await;
    let printed = r.readme_example("python", "app-kv").await;
    let prefix = format!("{}/keys/app-key-py/", r.vault_url("app-kv"));
    assert!(printed.starts_with(&prefix) && printed.trim_end().ends_with(" unwrapped"), "{printed}");
    r.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_identity_credentials_name_their_identity_by_object_id_or_resource_id_on_both_protocols() {
    let r = sdk::start(|_| {}).await;
    let (identity, _, key) = wrap_only_identity(&r, "sdk-select").await;
    // A second identity with no access: naming the wrong one would be refused.
    r.broker.identity("rg", "bystander").await;
    let wrap = json!([{"op": "wrap", "kid": key, "alg": "RSA-OAEP-256", "value": b64(&DEK)}]);
    for protocol in ["appservice", "imds"] {
        for (selector, value) in
            [("MI_OBJECT_ID", &identity.principal_id), ("MI_RESOURCE_ID", &identity.resource_id)]
        {
            let mut cred = if protocol == "appservice" { r.app_service("") } else { r.imds("") };
            cred.retain(|(k, _)| k != "MI_CLIENT_ID");
            cred.push((selector.to_string(), value.clone()));
            let out = r.python("sdk-select", &cred, wrap.clone()).await;
            let wrapped = ok(&out[0])["value"].clone();
            let plain = r
                .broker
                .kv()
                .unwrap_key(unwrap_req(
                    &r.broker.key_uri("sdk-select", "tde"),
                    "RSA-OAEP-256",
                    &unb64(&wrapped),
                ))
                .await
                .unwrap_or_else(|e| panic!("{protocol} by {selector}: {e:?}"))
                .into_inner()
                .value;
            assert_eq!(plain, DEK, "{protocol} by {selector}");
        }
    }
    r.broker.stop().await;
}
