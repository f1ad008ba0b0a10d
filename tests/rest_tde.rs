//! TDE with a customer-managed key while the vault's operator works through Key Vault's REST API
//! (the Azure SDK for Python) and the SQL engine host keeps calling the broker over gRPC: a key
//! state changed over REST is the key state TDE sees (docs/TDE-SCENARIOS.md, key states).

mod common;
#[path = "common/sdk.rs"]
mod sdk;

use common::*;
use sdk::ok;
use serde_json::{Value, json};
use tde_broker::grpc::proto;
use tonic::Code;

const TDE_PERMS: [&str; 3] = ["get", "wrapKey", "unwrapKey"];
/// Seconds past which the broker has probed the protector again.
const PROBE: i64 = 600;
const ONLINE: i32 = proto::DatabaseState::Online as i32;
const INACCESSIBLE: i32 = proto::DatabaseState::Inaccessible as i32;

/// A purge-protected vault with an RSA protector key, a SQL server whose primary user-assigned
/// identity holds get/wrapKey/unwrapKey on it, a database `db1` with a DEK the engine generated
/// over gRPC, and a service principal operating the vault through the SDK.
struct Tde {
    rest: sdk::Rest,
    server_id: String,
    operator: Vec<(String, String)>,
    dek: proto::GenerateDatabaseKeyResponse,
}

async fn tde(vault: &str) -> Tde {
    let rest = sdk::start(|_| {}).await;
    let b = &rest.broker;
    b.vault(vault, true).await;
    b.key(vault, "tde", "RSA", 2048).await;
    let (umi, who) = b.identity("id-rg", &format!("{vault}-umi")).await;
    b.policy(vault, &who.object_id, &TDE_PERMS).await;
    let server = b
        .servers()
        .create_server(proto::CreateServerRequest {
            resource_group: "sql-rg".into(),
            name: format!("{vault}-sql"),
            kind: proto::ServerKind::SqlServer as i32,
            identity: Some(proto::ServerIdentity {
                user_assigned_identity_ids: vec![umi.resource_id.clone()],
                ..Default::default()
            }),
            key_id: b.key_uri(vault, "tde"),
            ..Default::default()
        })
        .await
        .expect("server with a customer-managed key")
        .into_inner();
    b.servers()
        .create_database(proto::CreateDatabaseRequest { server_id: server.id.clone(), name: "db1".into() })
        .await
        .expect("database");
    let dek = b
        .engine(&server.id)
        .await
        .generate_database_key(proto::GenerateDatabaseKeyRequest { database: "db1".into() })
        .await
        .expect("DEK")
        .into_inner();
    let sp = rest.service_principal(&format!("{vault}-operator"), vault, &["all"]).await;
    let operator = rest.secret(&sp);
    Tde { server_id: server.id, operator, dek, rest }
}

impl Tde {
    /// The database's state and reason after the next probe.
    async fn state_after_probe(&self) -> (i32, String) {
        self.rest.broker.advance(PROBE).await;
        let db = self.rest.broker.database(&self.server_id, "db1").await;
        (db.state, db.reason)
    }

    /// The engine host unwraps the database's DEK over gRPC.
    async fn engine_unwraps(&self) -> Result<Vec<u8>, tonic::Status> {
        self.rest
            .broker
            .engine(&self.server_id)
            .await
            .unwrap_database_key(proto::UnwrapDatabaseKeyRequest {
                database: "db1".into(),
                kid: self.dek.kid.clone(),
                wrapped_dek: self.dek.wrapped_dek.clone(),
            })
            .await
            .map(|r| r.into_inner().dek)
    }

    /// Runs SDK steps as the vault's operator; every step must succeed.
    async fn operator(&self, vault: &str, steps: Value) -> Vec<Value> {
        let out = self.rest.python(vault, &self.operator, steps).await;
        for s in &out {
            ok(s);
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_the_protector_through_the_sdk_makes_the_database_inaccessible_and_enabling_it_heals() {
    let t = tde("rt-dis").await;
    assert_eq!(t.engine_unwraps().await.expect("online"), t.dek.dek);
    t.operator("rt-dis", json!([{"op": "update", "name": "tde", "enabled": false}])).await;
    assert_eq!(t.state_after_probe().await, (INACCESSIBLE, "KEY_DISABLED".to_string()));
    assert_status(t.engine_unwraps().await, Code::FailedPrecondition, "DatabaseInaccessible");

    t.operator("rt-dis", json!([{"op": "update", "name": "tde", "enabled": true}])).await;
    assert_eq!(t.state_after_probe().await, (ONLINE, String::new()), "healed within the window");
    assert_eq!(t.engine_unwraps().await.expect("online again"), t.dek.dek);
    t.rest.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_the_protector_through_the_sdk_makes_the_database_inaccessible_and_extending_it_heals() {
    let t = tde("rt-exp").await;
    let now = t.rest.broker.now().await;
    let set = t.operator("rt-exp", json!([{"op": "update", "name": "tde", "expires_on": now + 60}])).await;
    assert_eq!(ok(&set[0])["expires_on"], json!(now + 60), "the expiry set over REST");
    assert_eq!(t.state_after_probe().await, (INACCESSIBLE, "KEY_EXPIRED".to_string()));

    let later = t.rest.broker.now().await + 365 * 24 * 3600;
    t.operator("rt-exp", json!([{"op": "update", "name": "tde", "expires_on": later}])).await;
    assert_eq!(t.state_after_probe().await, (ONLINE, String::new()), "healed within the window");
    assert_eq!(t.engine_unwraps().await.expect("online again"), t.dek.dek);
    t.rest.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_protector_through_the_sdk_makes_the_database_inaccessible_and_recovering_it_heals() {
    let t = tde("rt-del").await;
    t.operator("rt-del", json!([{"op": "delete", "name": "tde"}])).await;
    assert_eq!(t.state_after_probe().await, (INACCESSIBLE, "KEY_DELETED".to_string()));
    assert_status(t.engine_unwraps().await, Code::FailedPrecondition, "DatabaseInaccessible");

    t.operator("rt-del", json!([{"op": "recover", "name": "tde"}])).await;
    assert_eq!(t.state_after_probe().await, (ONLINE, String::new()), "healed within the window");
    assert_eq!(t.engine_unwraps().await.expect("online again"), t.dek.dek);
    t.rest.broker.stop().await;
}
