//! Key Vault throttling (docs/RULES.md, Cloud behaviour, Throttling) on the manual clock: per
//! vault, 10-second windows, weighted by key type and size, CREATE counted apart; refusals are
//! RESOURCE_EXHAUSTED with reason `Throttled`, the cloud's 429 text and a `retry-after`, and do not
//! count.

mod common;

use common::*;
use tde_broker::grpc::proto;
use tde_broker::grpc::status::retry_after;
use tonic::{Code, Status};

const THROTTLED: &str =
    "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached";
/// Concurrent requests in flight.
const WORKERS: usize = 64;

fn profile(profile: &str, vault: &str) -> proto::SetThrottlingRequest {
    proto::SetThrottlingRequest { profile: profile.into(), vault_name: vault.into(), ..Default::default() }
}

fn custom(vault: &str, all_other: u32, create: u32) -> proto::SetThrottlingRequest {
    proto::SetThrottlingRequest {
        profile: "custom".into(),
        all_other_per_10s: all_other,
        create_per_10s: create,
        vault_name: vault.into(),
    }
}

fn algorithm(kid: &str) -> &'static str {
    if kid.contains("/keys/aes") { "A256KW" } else { "RSA-OAEP-256" }
}

async fn wrap(b: &TestBroker, kid: &str) -> Result<proto::KeyOperationResult, Status> {
    b.kv().wrap_key(crypto_req(kid, algorithm(kid), &[7u8; 32])).await.map(|r| r.into_inner())
}

/// `n` wraps with `kid`, `WORKERS` at a time; returns the failures.
async fn wraps(b: &TestBroker, kid: &str, n: usize) -> Vec<Status> {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let share = n / WORKERS + usize::from(w < n % WORKERS);
        let mut kv = b.kv();
        let kid = kid.to_string();
        tasks.spawn(async move {
            let mut failed = Vec::new();
            for _ in 0..share {
                if let Err(s) = kv.wrap_key(crypto_req(&kid, algorithm(&kid), &[7u8; 32])).await {
                    failed.push(s);
                }
            }
            failed
        });
    }
    let mut failed = Vec::new();
    while let Some(r) = tasks.join_next().await {
        failed.extend(r.expect("worker"));
    }
    failed
}

/// Asserts the throttling refusal and returns its `retry-after`.
fn assert_throttled<T: std::fmt::Debug>(r: Result<T, Status>) -> u32 {
    let s = r.expect_err("expected a throttling refusal");
    assert_eq!(s.code(), Code::ResourceExhausted, "message: {}", s.message());
    assert_eq!(tde_broker::grpc::status::reason(&s).as_deref(), Some("Throttled"));
    assert_eq!(s.message(), THROTTLED);
    retry_after(&s).expect("retry-after metadata")
}

/// A vault with one key per kind; the broker's clock at the start of a window.
async fn setup(b: &TestBroker, vault: &str, keys: &[(&str, &str, i32)]) -> Vec<String> {
    b.vault(vault, false).await;
    let mut kids = Vec::new();
    for (name, kty, size) in keys {
        kids.push(kid(&b.key(vault, name, kty, *size).await));
    }
    assert_eq!(b.now().await % 10, 0, "tests start at the start of a window");
    kids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_profile_lets_4000_rsa_2048_ops_through_per_window_and_refuses_the_next() {
    let b = start().await;
    let kids = setup(&b, "thr-kv", &[("k2048", "RSA", 2048)]).await;
    let k2048 = &kids[0];
    // Off by default: the key creations above were not counted.
    let r = b.emu().set_throttling(profile("azure", "")).await.unwrap().into_inner();
    assert_eq!(
        r.throttling,
        vec![proto::VaultThrottling {
            vault_name: String::new(),
            profile: "azure".into(),
            all_other_per_10s: 4000,
            create_per_10s: 20,
        }]
    );

    let failed = wraps(&b, k2048, 4000).await;
    assert!(failed.is_empty(), "{} of 4000 refused: {:?}", failed.len(), failed.first());
    assert_eq!(assert_throttled(wrap(&b, k2048).await), 10);
    // Every kind of request counts in "all other": a GetKey is refused too.
    assert_throttled(b.kv().get_key(proto::GetKeyRequest { key_id: k2048.clone() }).await);
    // The retry hint is the rest of the window.
    b.advance(3).await;
    assert_eq!(assert_throttled(wrap(&b, k2048).await), 7);

    // The next window starts empty.
    b.advance(7).await;
    wrap(&b, k2048).await.expect("a new window");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_do_not_count_and_weights_add_up_across_key_sizes() {
    let b = start().await;
    let kids = setup(&b, "thr-mix", &[("k2048", "RSA", 2048), ("k3072", "RSA", 3072)]).await;
    let (k2048, k3072) = (&kids[0], &kids[1]);
    // A small budget, weights as in the cloud: 40 RSA-2048 ops or 10 RSA-3072 ops.
    b.emu().set_throttling(custom("thr-mix", 40, 20)).await.unwrap();

    // With 3 units left, a 3072 op (weight 4) is refused and the 3 RSA-2048 ops after it still
    // fit: the refusal used nothing.
    assert!(wraps(&b, k2048, 37).await.is_empty());
    assert_throttled(wrap(&b, k3072).await);
    for _ in 0..3 {
        wrap(&b, k2048).await.expect("refused requests do not count");
    }
    assert_throttled(wrap(&b, k2048).await);

    // 36 RSA-2048 ops leave room for exactly one 3072 op.
    b.advance(10).await;
    assert!(wraps(&b, k2048, 36).await.is_empty());
    wrap(&b, k3072).await.expect("4 units left");
    assert_throttled(wrap(&b, k2048).await);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3072_op_weighs_4_and_a_4096_op_weighs_8() {
    let b = start().await;
    let kids = setup(&b, "thr-sizes", &[("k3072", "RSA", 3072), ("k4096", "RSA", 4096)]).await;
    b.emu().set_throttling(profile("azure", "thr-sizes")).await.unwrap();

    assert!(wraps(&b, &kids[0], 1000).await.is_empty());
    assert_throttled(wrap(&b, &kids[0]).await);

    b.advance(10).await;
    assert!(wraps(&b, &kids[1], 500).await.is_empty());
    assert_throttled(wrap(&b, &kids[1]).await);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_keys_weigh_twice_and_oct_hsm_counts_like_rsa_2048_hsm() {
    let b = start().await;
    let kids = setup(
        &b,
        "thr-hsm",
        &[
            ("r2048", "RSA", 2048),
            ("h2048", "RSA-HSM", 2048),
            ("h4096", "RSA-HSM", 4096),
            ("aes", "oct-HSM", 256),
        ],
    )
    .await;
    // A budget of 32 RSA-2048 software units per window.
    b.emu().set_throttling(custom("thr-hsm", 32, 20)).await.unwrap();
    for (kid, fit) in [(&kids[0], 32), (&kids[1], 16), (&kids[2], 2), (&kids[3], 16)] {
        assert!(wraps(&b, kid, fit).await.is_empty(), "{kid}");
        assert_throttled(wrap(&b, kid).await);
        b.advance(10).await;
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_import_rotate_and_restore_share_the_create_limit() {
    let b = start().await;
    let kids = setup(&b, "thr-create", &[("wrapper", "RSA", 2048)]).await;
    b.emu().set_throttling(profile("azure", "thr-create")).await.unwrap();
    let create = |name: String, kty: &str| proto::CreateKeyRequest {
        vault_name: "thr-create".into(),
        name,
        kty: kty.into(),
        ..Default::default()
    };

    // 20 software creates per window; the 21st is refused, "all other" requests still pass.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut kv = b.kv();
        let req = create(format!("sw{i}"), "RSA");
        tasks.spawn(async move { kv.create_key(req).await.map(drop) });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().expect("20 creates fit");
    }
    assert_throttled(b.create_key(create("sw20".into(), "RSA")).await);
    wrap(&b, &kids[0]).await.expect("the create class counts apart");
    let rotate = |key: &str| proto::RotateKeyRequest { key_id: b.key_uri("thr-create", key) };
    assert_throttled(b.kv().rotate_key(rotate("sw0")).await);

    // HSM creates weigh 2: 10 per window. Rotation and restore are in the create class.
    b.advance(10).await;
    for i in 0..8 {
        b.create_key(create(format!("hsm{i}"), "oct-HSM")).await.expect("HSM create");
    }
    b.kv().rotate_key(rotate("hsm0")).await.expect("9th");
    let backup = b
        .kv()
        .backup_key(proto::BackupKeyRequest { key_id: b.key_uri("thr-create", "sw1") })
        .await
        .expect("backup is in all other")
        .into_inner();
    b.kv().delete_key(proto::DeleteKeyRequest { key_id: b.key_uri("thr-create", "sw1") }).await.unwrap();
    b.kv()
        .purge_deleted_key(proto::PurgeDeletedKeyRequest {
            vault_name: "thr-create".into(),
            name: "sw1".into(),
        })
        .await
        .unwrap();
    let restore = || proto::RestoreKeyRequest { vault_name: "thr-create".into(), blob: backup.blob.clone() };
    b.kv().restore_key(restore()).await.expect("10th, a software key: 19 of 20 units");
    assert_throttled(b.create_key(create("hsm9".into(), "oct-HSM")).await);
    b.create_key(create("sw21".into(), "RSA")).await.expect("1 unit left for a software create");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vaults_own_profile_wins_and_inherit_returns_it_to_every_vaults() {
    let b = start().await;
    let a = setup(&b, "thr-a", &[("k", "RSA", 2048)]).await;
    let c = setup(&b, "thr-c", &[("k", "RSA", 2048)]).await;
    b.emu().set_throttling(custom("", 2, 1)).await.unwrap();
    let r = b.emu().set_throttling(profile("off", "thr-c")).await.unwrap().into_inner();
    let names: Vec<_> = r.throttling.iter().map(|t| (t.vault_name.as_str(), t.profile.as_str())).collect();
    assert_eq!(names, [("", "custom"), ("thr-c", "off")]);
    assert!(wraps(&b, &a[0], 2).await.is_empty());
    assert_throttled(wrap(&b, &a[0]).await);
    assert!(wraps(&b, &c[0], 50).await.is_empty(), "thr-c is not throttled");

    b.emu().set_throttling(profile("inherit", "thr-c")).await.unwrap();
    assert!(wraps(&b, &c[0], 2).await.is_empty());
    assert_throttled(wrap(&b, &c[0]).await);
    let got = b.emu().get_throttling(proto::GetThrottlingRequest {}).await.unwrap().into_inner();
    assert_eq!(got.throttling.len(), 1);

    // Turning it off for every vault.
    b.emu().set_throttling(profile("off", "")).await.unwrap();
    assert!(wraps(&b, &a[0], 20).await.is_empty());

    // Bad requests are refused with the reason.
    for bad in [
        profile("fast", ""),
        profile("inherit", ""),
        custom("", 0, 5),
        proto::SetThrottlingRequest { profile: "azure".into(), all_other_per_10s: 5, ..Default::default() },
        profile("azure", "Not_A_Vault!"),
    ] {
        assert_status(b.emu().set_throttling(bad).await, Code::InvalidArgument, "BadParameter");
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_turns_the_azure_profile_on() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    std::fs::write(&file, "throttling = \"azure\"\n").unwrap();
    let cfg = tde_broker::config::Config::resolve(tde_broker::config::ServeArgs {
        config: Some(file.clone()),
        data_dir: Some(dir.path().join("data")),
        ..Default::default()
    })
    .expect("valid configuration");
    assert_eq!(cfg.throttling, tde_broker::broker::throttle::ThrottleProfile::Azure);
    std::fs::write(&file, "throttling = \"custom\"\n").unwrap();
    assert!(
        tde_broker::config::Config::resolve(tde_broker::config::ServeArgs {
            config: Some(file),
            ..Default::default()
        })
        .is_err()
    );

    let b = start_with(|cfg| cfg.throttling = tde_broker::broker::throttle::ThrottleProfile::Azure).await;
    let got = b.emu().get_throttling(proto::GetThrottlingRequest {}).await.unwrap().into_inner();
    assert_eq!(got.throttling[0].profile, "azure");
    b.stop().await;
}
