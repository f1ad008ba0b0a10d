//! The manual clock in the hands of a new user: no move of it locks the admin out, its time
//! survives a restart, and every token but the operator's still lives on it.

mod common;

use common::*;
use tde_broker::config::ClockKind;
use tde_broker::grpc::proto;
use tonic::Code;

const DAY: i64 = 86_400;

async fn list_vaults_with(b: &TestBroker, token: &str) -> Result<(), tonic::Status> {
    b.vaults_with(bearer(token)).list_vaults(proto::ListVaultsRequest {}).await.map(|_| ())
}

async fn set_clock(b: &TestBroker, now: i64) -> i64 {
    b.emu().set_clock(proto::SetClockRequest { now }).await.expect("set clock").into_inner().now
}

#[tokio::test]
async fn no_move_of_the_manual_clock_locks_the_admin_out() {
    let b = start().await;
    let file_token = std::fs::read_to_string(b.data_dir.join("admin.token")).expect("admin.token");
    let start_time = b.now().await;

    // Two days back: before the admin token's `nbf` on the broker's clock.
    assert_eq!(b.advance(-2 * DAY).await, start_time - 2 * DAY);
    list_vaults_with(&b, &b.token).await.expect("the admin's token after moving back");
    list_vaults_with(&b, file_token.trim()).await.expect("admin.token after moving back");

    // 400 days on: past the 365-day lifetime of the admin token.
    assert_eq!(b.advance(402 * DAY).await, start_time + 400 * DAY);
    list_vaults_with(&b, &b.token).await.expect("the admin's token 400 days on");
    list_vaults_with(&b, file_token.trim()).await.expect("admin.token 400 days on");

    // Far back, then the undoing move itself succeeds.
    assert_eq!(set_clock(&b, 0).await, 0);
    list_vaults_with(&b, file_token.trim()).await.expect("admin.token at 1970");
    assert_eq!(set_clock(&b, start_time).await, start_time);
    b.stop().await;
}

#[tokio::test]
async fn tokens_other_than_the_operators_still_live_on_the_brokers_clock() {
    let b = start().await;
    let user = b.user("clock-user").await;
    let (_, umi) = b.identity("clock-rg", "clock-umi").await;
    b.vault("clock-kv", false).await;
    b.policy("clock-kv", &umi.object_id, &["get"]).await;
    b.key("clock-kv", "k", "RSA", 2048).await;
    let get = proto::GetKeyRequest { key_id: b.key_uri("clock-kv", "k") };
    b.kv_with(bearer(&umi.token)).get_key(get.clone()).await.expect("the identity's token works");

    // Back before their `nbf` (beyond the five minutes of tolerated skew).
    b.advance(-600).await;
    let msg = assert_status(
        b.kv_with(bearer(&umi.token)).get_key(get.clone()).await,
        Code::Unauthenticated,
        "Unauthorized",
    );
    assert!(msg.contains("IDX10222"), "{msg}");
    assert_status(list_vaults_with(&b, &user.token).await, Code::Unauthenticated, "Unauthorized");

    // And past their `exp`: an identity token lives an hour of the broker's clock.
    b.advance(600 + 3600 + 301).await;
    let msg = assert_status(
        b.kv_with(bearer(&umi.token)).get_key(get).await,
        Code::Unauthenticated,
        "Unauthorized",
    );
    assert!(msg.contains("IDX10223"), "{msg}");
    b.stop().await;
}

#[tokio::test]
async fn the_manual_clock_resumes_its_time_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = start_in(dir.path(), ClockKind::Manual).await;
    let start_time = b.now().await;
    b.vault("resume-kv", false).await;
    // A key that expires in a day.
    let key = b
        .create_key(proto::CreateKeyRequest {
            vault_name: "resume-kv".into(),
            name: "short".into(),
            kty: "RSA".into(),
            key_size: 2048,
            attributes: Some(proto::KeyAttributes { expires: Some(start_time + DAY), ..Default::default() }),
            ..Default::default()
        })
        .await
        .expect("create key");
    let moved = b.advance(2 * DAY).await;
    let wrap = || crypto_req(&kid(&key), "RSA-OAEP-256", &[7u8; 32]);
    let refused = assert_status(b.kv().wrap_key(wrap()).await, Code::PermissionDenied, "KeyExpired");
    b.stop().await;

    // The harness starts the broker with `--clock-start` at the original time: the saved time
    // wins, so the key is still expired and nothing jumps back.
    let b = start_in(dir.path(), ClockKind::Manual).await;
    assert_eq!(b.now().await, moved);
    let again = assert_status(b.kv().wrap_key(wrap()).await, Code::PermissionDenied, "KeyExpired");
    assert_eq!(again, refused);
    // Moves after the restart are saved too.
    assert_eq!(b.advance(-DAY).await, moved - DAY);
    b.stop().await;
    let b = start_in(dir.path(), ClockKind::Manual).await;
    assert_eq!(b.now().await, moved - DAY);
    b.stop().await;
}
