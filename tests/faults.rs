//! Injected faults (Emulation.SetFaults) on the data plane: `fail_next`, `error_rate` with each
//! code, added latency, precedence of a vault's own faults, ClearFaults.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tde_broker::grpc::proto;
use tonic::{Code, Status};

const VAULT: &str = "flt-kv";

async fn wrap(b: &TestBroker, kid: &str) -> Result<proto::KeyOperationResult, Status> {
    b.kv().wrap_key(crypto_req(kid, "RSA-OAEP-256", &[7u8; 32])).await.map(|r| r.into_inner())
}

fn faults(vault: &str) -> proto::SetFaultsRequest {
    proto::SetFaultsRequest { vault_name: vault.into(), ..Default::default() }
}

async fn set(b: &TestBroker, req: proto::SetFaultsRequest) -> Vec<proto::VaultFaults> {
    b.emu().set_faults(req).await.expect("set faults").into_inner().faults
}

async fn clear(b: &TestBroker, vault: &str) -> Vec<proto::VaultFaults> {
    b.emu()
        .clear_faults(proto::ClearFaultsRequest { vault_name: vault.into() })
        .await
        .expect("clear faults")
        .into_inner()
        .faults
}

async fn setup(b: &TestBroker) -> String {
    b.vault(VAULT, false).await;
    kid(&b.key(VAULT, "k", "RSA", 2048).await)
}

#[tokio::test]
async fn fail_next_fails_exactly_that_many_calls_with_unavailable() {
    let b = start().await;
    let kid = setup(&b).await;
    let list = set(&b, proto::SetFaultsRequest { fail_next: 3, ..faults(VAULT) }).await;
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].vault_name.as_str(), list[0].fail_next), (VAULT, 3));
    for _ in 0..3 {
        assert_status(wrap(&b, &kid).await, Code::Unavailable, "ServiceUnavailable");
    }
    wrap(&b, &kid).await.expect("the fourth call succeeds");
    wrap(&b, &kid).await.expect("and the ones after it");
    // Used up, the fault is gone.
    assert!(clear(&b, "").await.is_empty());

    // Every data-plane call counts, a create once (it checks authorization twice).
    set(&b, proto::SetFaultsRequest { fail_next: 2, ..faults(VAULT) }).await;
    let get = || proto::GetKeyRequest { key_id: b.key_uri(VAULT, "k") };
    assert_status(b.kv().get_key(get()).await, Code::Unavailable, "ServiceUnavailable");
    let create = proto::CreateKeyRequest {
        vault_name: VAULT.into(),
        name: "k2".into(),
        kty: "oct-HSM".into(),
        ..Default::default()
    };
    assert_status(b.create_key(create.clone()).await, Code::Unavailable, "ServiceUnavailable");
    b.create_key(create).await.expect("third call");
    b.kv().get_key(get()).await.expect("fourth call");
    b.stop().await;
}

#[tokio::test]
async fn error_rate_one_fails_every_call_with_the_chosen_code() {
    let b = start().await;
    let kid = setup(&b).await;
    for (code_name, code, reason) in [
        ("UNAVAILABLE", Code::Unavailable, "ServiceUnavailable"),
        ("RESOURCE_EXHAUSTED", Code::ResourceExhausted, "Throttled"),
        ("INTERNAL", Code::Internal, "InternalError"),
        ("PERMISSION_DENIED", Code::PermissionDenied, "Forbidden"),
    ] {
        let list = set(
            &b,
            proto::SetFaultsRequest { error_rate: 1.0, error_code: code_name.into(), ..faults(VAULT) },
        )
        .await;
        assert_eq!(list[0].error_code, code_name);
        for _ in 0..3 {
            let r = wrap(&b, &kid).await;
            if code == Code::ResourceExhausted {
                let s = r.as_ref().expect_err("throttled");
                assert!(tde_broker::grpc::status::retry_after(s).is_some_and(|s| (1..=10).contains(&s)));
            }
            assert_status(r, code, reason);
        }
    }
    // Without a code, UNAVAILABLE.
    set(&b, proto::SetFaultsRequest { error_rate: 1.0, ..faults(VAULT) }).await;
    assert_status(wrap(&b, &kid).await, Code::Unavailable, "ServiceUnavailable");
    // ClearFaults restores the vault.
    assert!(clear(&b, VAULT).await.is_empty());
    wrap(&b, &kid).await.expect("faults cleared");
    // A rate of 0.5 fails some calls and not others.
    set(&b, proto::SetFaultsRequest { error_rate: 0.5, ..faults(VAULT) }).await;
    let mut failed = 0;
    for _ in 0..64 {
        failed += usize::from(wrap(&b, &kid).await.is_err());
    }
    assert!((1..64).contains(&failed), "{failed} of 64 failed at rate 0.5");
    b.stop().await;
}

#[tokio::test]
async fn latency_delays_every_data_plane_call() {
    let b = start().await;
    let kid = setup(&b).await;
    set(&b, proto::SetFaultsRequest { latency_ms: 200, ..faults(VAULT) }).await;
    let t = Instant::now();
    wrap(&b, &kid).await.expect("slow but fine");
    assert!(t.elapsed() >= Duration::from_millis(200), "took {:?}", t.elapsed());
    // The random part adds on top: p50 = p99 = 100 is a fixed 100 ms.
    set(&b, proto::SetFaultsRequest { latency_ms: 50, latency_p50_ms: 100, ..faults(VAULT) }).await;
    let t = Instant::now();
    b.kv().rotate_key(proto::RotateKeyRequest { key_id: b.key_uri(VAULT, "k") }).await.expect("rotate");
    assert!(t.elapsed() >= Duration::from_millis(150), "took {:?}", t.elapsed());
    // A distribution: every draw is positive, so each call waits at least the fixed part.
    let list = set(
        &b,
        proto::SetFaultsRequest { latency_ms: 20, latency_p50_ms: 5, latency_p99_ms: 40, ..faults("") },
    )
    .await;
    assert_eq!((list[0].vault_name.as_str(), list[0].latency_p50_ms, list[0].latency_p99_ms), ("", 5, 40));
    clear(&b, VAULT).await;
    let t = Instant::now();
    wrap(&b, &kid).await.expect("every vault's latency");
    assert!(t.elapsed() >= Duration::from_millis(20), "took {:?}", t.elapsed());
    // Cleared: nothing left.
    assert!(clear(&b, "").await.is_empty());
    b.stop().await;
}

#[tokio::test]
async fn a_vaults_own_faults_win_over_every_vaults_and_outages_of_either_apply() {
    let b = start().await;
    let kid = setup(&b).await;
    b.vault("flt-other", false).await;
    let other = common::kid(&b.key("flt-other", "k", "RSA", 2048).await);
    set(&b, proto::SetFaultsRequest { error_rate: 1.0, error_code: "INTERNAL".into(), ..faults("") }).await;
    set(&b, proto::SetFaultsRequest { latency_ms: 1, ..faults(VAULT) }).await;
    wrap(&b, &kid).await.expect("the vault's own faults apply, not every vault's");
    assert_status(wrap(&b, &other).await, Code::Internal, "InternalError");
    // An outage for every vault still reaches a vault with faults of its own.
    set(&b, proto::SetFaultsRequest { outage: true, ..faults("") }).await;
    assert_status(wrap(&b, &kid).await, Code::Unavailable, "ServiceUnavailable");
    assert!(clear(&b, "").await.is_empty());
    wrap(&b, &kid).await.expect("all clear");
    wrap(&b, &other).await.expect("all clear");
    b.stop().await;
}

#[tokio::test]
async fn out_of_range_faults_are_refused() {
    let b = start().await;
    for bad in [
        proto::SetFaultsRequest { error_rate: 1.5, ..faults(VAULT) },
        proto::SetFaultsRequest { error_rate: -0.1, ..faults(VAULT) },
        proto::SetFaultsRequest { error_rate: 1.0, error_code: "DEADLINE_EXCEEDED".into(), ..faults(VAULT) },
        proto::SetFaultsRequest { latency_p50_ms: 50, latency_p99_ms: 10, ..faults(VAULT) },
        proto::SetFaultsRequest { latency_p99_ms: 10, ..faults(VAULT) },
        proto::SetFaultsRequest { latency_ms: 60_001, ..faults(VAULT) },
    ] {
        assert_status(b.emu().set_faults(bad).await, Code::InvalidArgument, "BadParameter");
    }
    assert!(clear(&b, "").await.is_empty());
    b.stop().await;
}

#[tokio::test]
async fn faults_for_a_vault_that_does_not_exist_are_refused() {
    let b = start().await;
    setup(&b).await;
    let msg = assert_status(
        b.emu().set_faults(proto::SetFaultsRequest { fail_next: 1, ..faults("no-such-kv") }).await,
        Code::NotFound,
        "ResourceNotFound",
    );
    assert!(msg.contains("no-such-kv"), "{msg}");
    assert!(clear(&b, "").await.is_empty(), "nothing was set");
    // Clearing a name that has no faults is harmless, whether or not the vault exists.
    assert!(clear(&b, "no-such-kv").await.is_empty());
    b.stop().await;
}
