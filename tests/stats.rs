//! Emulation.GetStats and `tde-broker stats`: object counts and the epoch of one broker (exact),
//! the process's request, latency, cache and RSA counters (deltas: brokers of this test process
//! share them), cache entries, throttled and injected failures, who may ask, and the CLI's
//! JSON and table output.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;
use tde_broker::grpc::proto;
use tonic::Code;

const KV: &str = "tdebroker.v1.KeyVault";
const EMULATION: &str = "tdebroker.v1.Emulation";
const ALG: &str = "RSA-OAEP-256";

async fn stats(b: &TestBroker) -> proto::StatsResponse {
    b.emu().get_stats(proto::GetStatsRequest {}).await.expect("stats").into_inner()
}

fn objects(s: &proto::StatsResponse) -> proto::ObjectCounts {
    s.objects.expect("objects")
}

fn databases(s: &proto::StatsResponse) -> proto::DatabaseCounts {
    s.databases.clone().expect("databases")
}

/// Requests of one service, method and outcome so far (0 when none).
fn requests(s: &proto::StatsResponse, service: &str, method: &str, outcome: &str) -> u64 {
    s.requests
        .iter()
        .find(|r| r.service == service && r.method == method && r.outcome == outcome)
        .map_or(0, |r| r.count)
}

fn latency(s: &proto::StatsResponse, service: &str, method: &str) -> proto::MethodLatency {
    s.latencies.iter().find(|l| l.service == service && l.method == method).cloned().unwrap_or_else(|| {
        proto::MethodLatency { service: service.into(), method: method.into(), ..Default::default() }
    })
}

fn cache(s: &proto::StatsResponse, name: &str) -> proto::CacheStats {
    s.caches.iter().find(|c| c.name == name).cloned().unwrap_or_else(|| panic!("no cache {name}"))
}

fn rsa(s: &proto::StatsResponse, op: &str) -> u64 {
    s.rsa_operations.iter().find(|r| r.op == op).map_or(0, |r| r.count)
}

#[tokio::test]
async fn wrap_and_two_unwraps_show_in_requests_latency_caches_and_rsa_operations() {
    let b = start().await;
    let s0 = stats(&b).await;
    assert_eq!(s0.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(s0.now, b.now().await);
    let o = objects(&s0);
    assert_eq!((o.vaults, o.keys, o.key_versions, o.deleted_keys), (0, 0, 0, 0));
    assert_eq!(o.users, 1, "the bootstrap admin");
    let names: Vec<&str> = s0.caches.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["decision", "unwrap"]);
    for c in &s0.caches {
        assert!(c.enabled, "{c:?}");
        assert_eq!((c.entries, c.capacity, c.ttl_seconds), (0, 100_000, 300), "{c:?}");
    }

    b.vault("st-kv", false).await;
    let kid = kid(&b.key("st-kv", "k", "RSA", 2048).await);
    let s1 = stats(&b).await;
    let o = objects(&s1);
    assert_eq!((o.vaults, o.keys, o.key_versions, o.deleted_keys), (1, 1, 1, 0));
    assert!(s1.epoch > s0.epoch, "changes move the epoch: {} then {}", s0.epoch, s1.epoch);
    // The previous GetStats was counted once it had answered.
    assert!(requests(&s1, EMULATION, "GetStats", "OK") >= 1);

    let wrapped = b.kv().wrap_key(crypto_req(&kid, ALG, &[7u8; 32])).await.expect("wrap").into_inner();
    for _ in 0..2 {
        let plain =
            b.kv().unwrap_key(unwrap_req(&kid, ALG, &wrapped.value)).await.expect("unwrap").into_inner();
        assert_eq!(plain.value, [7u8; 32]);
    }
    let s2 = stats(&b).await;
    assert_eq!(s2.epoch, s1.epoch, "crypto operations change nothing");
    assert!(requests(&s2, KV, "WrapKey", "OK") > requests(&s1, KV, "WrapKey", "OK"));
    assert!(requests(&s2, KV, "UnwrapKey", "OK") >= requests(&s1, KV, "UnwrapKey", "OK") + 2);
    let (l1, l2) = (latency(&s1, KV, "UnwrapKey"), latency(&s2, KV, "UnwrapKey"));
    assert!(l2.count >= l1.count + 2);
    assert!(l2.total_seconds > l1.total_seconds);
    assert!(l2.mean_ms > 0.0 && (l2.mean_ms - l2.total_seconds * 1000.0 / l2.count as f64).abs() < 1e-6);
    // The second unwrap of the same ciphertext is answered from the unwrap cache.
    let (u1, u2) = (cache(&s1, "unwrap"), cache(&s2, "unwrap"));
    assert!(u2.hits > u1.hits, "unwrap hits {} then {}", u1.hits, u2.hits);
    assert!(u2.misses > u1.misses, "the first unwrap missed");
    assert_eq!(u2.entries, 1, "one ciphertext unwrapped");
    // wrapKey and unwrapKey decisions at this epoch.
    assert!(cache(&s2, "decision").entries >= 2);
    assert!(rsa(&s2, "encrypt") > rsa(&s1, "encrypt"));
    assert!(rsa(&s2, "decrypt") > rsa(&s1, "decrypt"));

    // A refusal is counted under its reason.
    let bad = b.kv().wrap_key(crypto_req(&kid, "RSA-OAEP-384", &[7u8; 32])).await;
    let reason = tde_broker::grpc::status::reason(&bad.expect_err("unknown algorithm")).expect("reason");
    let s3 = stats(&b).await;
    assert!(requests(&s3, KV, "WrapKey", &reason) > requests(&s2, KV, "WrapKey", &reason));

    // Versions and soft-deleted keys.
    b.kv().rotate_key(proto::RotateKeyRequest { key_id: b.key_uri("st-kv", "k") }).await.expect("rotate");
    let o = objects(&stats(&b).await);
    assert_eq!((o.keys, o.key_versions, o.deleted_keys), (1, 2, 0));
    b.kv().delete_key(proto::DeleteKeyRequest { key_id: b.key_uri("st-kv", "k") }).await.expect("delete");
    let o = objects(&stats(&b).await);
    assert_eq!((o.vaults, o.keys, o.key_versions, o.deleted_keys), (1, 0, 0, 1));
    b.stop().await;
}

async fn create_server(
    b: &TestBroker,
    name: &str,
    identity: proto::ServerIdentity,
    key_id: &str,
) -> proto::Server {
    b.servers()
        .create_server(proto::CreateServerRequest {
            resource_group: "st-rg".into(),
            name: name.into(),
            kind: proto::ServerKind::SqlServer as i32,
            identity: Some(identity),
            key_id: key_id.into(),
            ..Default::default()
        })
        .await
        .expect("create server")
        .into_inner()
}

async fn create_database(b: &TestBroker, server_id: &str, name: &str) {
    b.servers()
        .create_database(proto::CreateDatabaseRequest { server_id: server_id.into(), name: name.into() })
        .await
        .expect("create database");
}

#[tokio::test]
async fn identities_servers_and_databases_by_state_are_counted_exactly() {
    let b = start().await;
    b.user("st-user").await;
    // A CMK server whose user-assigned identity may use the protector, with two databases.
    b.vault("st-cmk", true).await;
    b.key("st-cmk", "tde", "RSA", 2048).await;
    let key = b.key_uri("st-cmk", "tde");
    let (umi, who) = b.identity("st-rg", "st-umi").await;
    b.policy("st-cmk", &who.object_id, &["get", "wrapKey", "unwrapKey"]).await;
    let cmk = create_server(
        &b,
        "st-cmk-sql",
        proto::ServerIdentity {
            user_assigned_identity_ids: vec![umi.resource_id.clone()],
            ..Default::default()
        },
        &key,
    )
    .await;
    create_database(&b, &cmk.id, "db1").await;
    create_database(&b, &cmk.id, "db2").await;
    // A service-managed server with a system-assigned identity and one database.
    let sm = create_server(
        &b,
        "st-sm-sql",
        proto::ServerIdentity { system_assigned: true, ..Default::default() },
        "",
    )
    .await;
    create_database(&b, &sm.id, "db1").await;

    let s = stats(&b).await;
    let o = objects(&s);
    assert_eq!((o.users, o.user_assigned_identities, o.system_assigned_identities), (2, 1, 1));
    assert_eq!((o.servers, o.engine_hosts, o.databases), (2, 2, 3));
    assert_eq!((o.vaults, o.keys), (1, 1));
    let d = databases(&s);
    assert_eq!((d.online, d.inaccessible), (3, 0));
    assert!(d.inaccessible_by_reason.is_empty());

    // The protector is disabled: at the next probe the CMK databases become inaccessible.
    b.kv()
        .update_key(proto::UpdateKeyRequest {
            key_id: key.clone(),
            enabled: Some(false),
            ..Default::default()
        })
        .await
        .expect("disable");
    b.advance(600).await;
    let d = databases(&stats(&b).await);
    assert_eq!((d.online, d.inaccessible), (1, 2));
    assert_eq!(d.inaccessible_by_reason, [proto::ReasonCount { reason: "KEY_DISABLED".into(), count: 2 }]);
    b.stop().await;
}

#[tokio::test]
async fn throttled_and_injected_failures_of_this_broker_are_counted_exactly() {
    let b = start().await;
    b.vault("st-thr", false).await;
    let kid = kid(&b.key("st-thr", "k", "RSA", 2048).await);
    let wrap = || {
        let mut kv = b.kv();
        let req = crypto_req(&kid, ALG, &[7u8; 32]);
        async move { kv.wrap_key(req).await }
    };
    let s0 = stats(&b).await;
    assert_eq!((s0.throttled_requests, s0.injected_errors), (0, 0));

    // fail_next 2: two refusals, then the vault answers.
    b.emu()
        .set_faults(proto::SetFaultsRequest {
            vault_name: "st-thr".into(),
            fail_next: 2,
            ..Default::default()
        })
        .await
        .expect("set faults");
    for _ in 0..2 {
        assert_status(wrap().await, Code::Unavailable, "ServiceUnavailable");
    }
    wrap().await.expect("the faults are used up");
    let s1 = stats(&b).await;
    assert_eq!((s1.throttled_requests, s1.injected_errors), (0, 2));
    assert!(
        requests(&s1, KV, "WrapKey", "ServiceUnavailable")
            >= requests(&s0, KV, "WrapKey", "ServiceUnavailable") + 2
    );

    // A budget of 3 RSA-2048 requests per 10 s: of 5 wraps in one window, 2 are refused.
    assert_eq!(b.now().await % 10, 0, "the test starts at the start of a window");
    b.emu()
        .set_throttling(proto::SetThrottlingRequest {
            profile: "custom".into(),
            all_other_per_10s: 3,
            create_per_10s: 1,
            vault_name: "st-thr".into(),
        })
        .await
        .expect("throttling");
    let mut refused = 0;
    for _ in 0..5 {
        if let Err(s) = wrap().await {
            assert_eq!(s.code(), Code::ResourceExhausted);
            refused += 1;
        }
    }
    assert_eq!(refused, 2);
    let s2 = stats(&b).await;
    assert_eq!((s2.throttled_requests, s2.injected_errors), (2, 2));
    assert!(requests(&s2, KV, "WrapKey", "Throttled") >= requests(&s1, KV, "WrapKey", "Throttled") + 2);
    b.stop().await;
}

#[tokio::test]
async fn switched_off_caches_are_reported_off_and_hold_nothing() {
    let b = start_with(|cfg| cfg.caches.enabled = false).await;
    b.vault("st-off", false).await;
    let kid = kid(&b.key("st-off", "k", "RSA", 2048).await);
    let wrapped = b.kv().wrap_key(crypto_req(&kid, ALG, &[1u8; 32])).await.expect("wrap").into_inner();
    for _ in 0..2 {
        b.kv().unwrap_key(unwrap_req(&kid, ALG, &wrapped.value)).await.expect("unwrap");
    }
    let s = stats(&b).await;
    assert_eq!(s.caches.len(), 2);
    for c in &s.caches {
        assert!(!c.enabled, "{c:?}");
        assert_eq!((c.entries, c.capacity, c.ttl_seconds), (0, 0, 0), "{c:?}");
    }
    b.stop().await;
}

#[tokio::test]
async fn only_callers_with_emulation_read_rights_get_stats() {
    let b = start().await;
    // No credentials.
    let anonymous = tde_broker::grpc::proto::emulation_client::EmulationClient::with_interceptor(
        b.channel.clone(),
        Bearer(None),
    )
    .get_stats(proto::GetStatsRequest {})
    .await;
    assert_eq!(anonymous.expect_err("no token").code(), Code::Unauthenticated);
    // A user without a control-plane role, as for GetClock.
    let user = b.user("st-nobody").await;
    let emu = || {
        tde_broker::grpc::proto::emulation_client::EmulationClient::with_interceptor(
            b.channel.clone(),
            bearer(&user.token),
        )
    };
    assert_status(
        emu().get_stats(proto::GetStatsRequest {}).await,
        Code::PermissionDenied,
        "AuthorizationFailed",
    );
    assert_status(
        emu().get_clock(proto::GetClockRequest {}).await,
        Code::PermissionDenied,
        "AuthorizationFailed",
    );
    // Owner at "/" (what the bootstrap admin holds) is enough.
    b.assign("/", &user.object_id, "Owner").await;
    emu().get_stats(proto::GetStatsRequest {}).await.expect("an Owner reads the stats");
    b.stop().await;
}

/// Runs the `tde-broker` binary against `b` as its admin (off the runtime's workers).
async fn cli(b: &TestBroker, args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tde-broker"));
    command
        .env_remove("TDE_BROKER_TOKEN")
        .env_remove("TDE_BROKER_SERVER")
        .env_remove("TDE_BROKER_DATA_DIR")
        .env("RUST_LOG", "off")
        .arg("--server")
        .arg(format!("http://{}", b.addr))
        .arg("--data-dir")
        .arg(Path::new(&b.data_dir))
        .args(args);
    tokio::task::spawn_blocking(move || command.output().expect("run tde-broker")).await.expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_stats_prints_json_and_a_table() {
    let b = start().await;
    b.vault("st-cli", false).await;
    let kid = kid(&b.key("st-cli", "k", "RSA", 2048).await);
    let wrapped = b.kv().wrap_key(crypto_req(&kid, ALG, &[3u8; 32])).await.expect("wrap").into_inner();
    for _ in 0..2 {
        b.kv().unwrap_key(unwrap_req(&kid, ALG, &wrapped.value)).await.expect("unwrap");
    }

    let out = cli(&b, &["stats", "--output", "json"]).await;
    assert!(out.status.success(), "stats failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime_seconds"].as_i64().is_some_and(|u| u >= 0), "{v}");
    assert!(v["epoch"].as_u64().is_some_and(|e| e > 0), "{v}");
    assert_eq!(v["now"].as_i64(), Some(b.now().await));
    assert_eq!(v["objects"]["vaults"], 1);
    assert_eq!(v["objects"]["keys"], 1);
    assert_eq!(v["databases"]["online"], 0);
    assert_eq!(v["throttled_requests"], 0);
    assert_eq!(v["injected_errors"], 0);
    assert!(v["audit_write_failures"].is_u64());
    let unwrap_cache = v["caches"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "unwrap"))
        .unwrap_or_else(|| panic!("no unwrap cache in {v}"));
    assert_eq!(unwrap_cache["enabled"], true);
    assert_eq!(unwrap_cache["entries"], 1);
    assert!(unwrap_cache["hits"].as_u64().is_some_and(|h| h >= 1), "{unwrap_cache}");
    let unwraps = v["requests"]
        .as_array()
        .and_then(|r| {
            r.iter().find(|r| r["service"] == KV && r["method"] == "UnwrapKey" && r["outcome"] == "OK")
        })
        .unwrap_or_else(|| panic!("no UnwrapKey OK in {v}"));
    assert!(unwraps["count"].as_u64().is_some_and(|c| c >= 2), "{unwraps}");
    let latency = v["latencies"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["service"] == KV && l["method"] == "UnwrapKey"))
        .unwrap_or_else(|| panic!("no UnwrapKey latency in {v}"));
    assert!(latency["count"].as_u64().is_some_and(|c| c >= 2) && latency["mean_ms"].is_f64(), "{latency}");
    assert!(v["rsa_operations"].as_array().is_some_and(|r| r.iter().any(|r| r["op"] == "decrypt")), "{v}");

    // The table: summary lines, the caches, one row per method.
    let out = cli(&b, &["stats"]).await;
    assert!(out.status.success(), "stats failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("vaults") && l.ends_with(" 1")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("CACHE") && l.contains("HIT RATE")), "{text}");
    let unwrap_row = text.lines().find(|l| l.starts_with("unwrap ")).unwrap_or_else(|| panic!("{text}"));
    assert_eq!(unwrap_row.split_whitespace().nth(2), Some("1"), "one entry: {unwrap_row}");
    assert!(
        text.lines().any(|l| l.starts_with("KeyVault") && l.contains("UnwrapKey") && l.contains("OK=")),
        "{text}"
    );

    // A token without rights is refused with the cloud's code.
    let user = b.user("st-cli-nobody").await;
    let out = cli(&b, &["stats", "--token", &user.token]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AuthorizationFailed"), "{err}");
    b.stop().await;
}
