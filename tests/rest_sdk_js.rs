//! The unmodified Azure SDK for JavaScript (@azure/keyvault-keys, @azure/identity, pinned by
//! `tests/sdk/package-lock.json`, installed under `target/node-sdk`) against the broker: the
//! core flow of an application — a credential, a key, wrap and unwrap, and Key Vault's 403 text
//! when the identity may not read the key.
//!
//! Needs node and npm, and the npm registry the first time (the test says what to install). The
//! broker's dev CA is trusted through `NODE_EXTRA_CA_CERTS`; credentials come from their
//! documented environment variables and options.

mod common;
#[path = "common/sdk.rs"]
mod sdk;

use common::*;
use sdk::{b64, err, ok, unb64};
use serde_json::json;
use tde_broker::grpc::proto;

const DEK: [u8; 32] = [0x3c; 32];

async fn core_flow(protocol: &str) {
    let r = sdk::start(|_| {}).await;
    let vault = format!("js-{protocol}");
    let operator = r.vault_with_operator(&vault).await;
    let created =
        r.node("keyvault.js", &vault, &operator, json!([{"op": "create_rsa", "name": "tde"}])).await;
    let created = ok(&created[0]);
    assert_eq!(created["kty"], "RSA");
    let kid = created["id"].as_str().unwrap().to_string();
    assert!(
        kid.starts_with(&format!("{}/keys/tde/", r.vault_url(&vault))),
        "key id on the URL called: {kid}"
    );

    let (identity, who) = r.broker.identity("rg", &format!("{vault}-mi")).await;
    r.broker.policy(&vault, &identity.principal_id, &["wrapKey", "unwrapKey"]).await;
    let cred = if protocol == "appservice" {
        r.app_service(&identity.client_id)
    } else {
        r.imds(&identity.client_id)
    };
    let out = r
        .node(
            "keyvault.js",
            &vault,
            &cred,
            json!([
                {"op": "wrap", "kid": kid, "alg": "RSA-OAEP-256", "value": b64(&DEK)},
                {"op": "get", "name": "tde"},
            ]),
        )
        .await;
    let wrapped = ok(&out[0])["value"].clone();
    let back = r
        .node(
            "keyvault.js",
            &vault,
            &cred,
            json!([{"op": "unwrap", "kid": kid, "alg": "RSA-OAEP-256", "value": wrapped}]),
        )
        .await;
    assert_eq!(unb64(&ok(&back[0])["value"]), DEK, "wrapped and unwrapped by the broker");

    // The same wrapped key unwraps over gRPC: one key behind both surfaces.
    let plain = r
        .broker
        .kv()
        .unwrap_key(unwrap_req(&kid, "RSA-OAEP-256", &unb64(&wrapped)))
        .await
        .expect("unwrap over gRPC")
        .into_inner()
        .value;
    assert_eq!(plain, DEK);

    let refused = err(&out[1]);
    assert_eq!(refused["type"], "RestError", "{refused}");
    assert_eq!(
        (refused["status"].clone(), refused["code"].clone()),
        (json!(403), json!("Forbidden")),
        "{refused}"
    );
    let grpc = r
        .broker
        .kv_with(bearer(&who.token))
        .get_key(proto::GetKeyRequest { key_id: r.broker.key_uri(&vault, "tde") })
        .await
        .expect_err("refused over gRPC");
    assert_eq!(
        refused["message"],
        json!(grpc.message()),
        "the SDK's 403 carries Key Vault's text, as gRPC does"
    );
    assert!(grpc.message().contains("does not have keys get permission on key vault"), "{}", grpc.message());
    r.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_sdk_app_service_identity_wraps_unwraps_and_gets_key_vaults_403_text() {
    core_flow("appservice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_sdk_imds_identity_wraps_unwraps_and_gets_key_vaults_403_text() {
    core_flow("imds").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_javascript_example_runs_as_written() {
    let r = sdk::start(|_| {}).await;
    let printed = r.readme_example("js", "app-kv").await;
    let prefix = format!("{}/keys/app-key-js/", r.vault_url("app-kv"));
    assert!(printed.starts_with(&prefix) && printed.trim_end().ends_with(" unwrapped"), "{printed}");
    r.broker.stop().await;
}
