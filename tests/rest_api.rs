//! Key Vault's keys REST API over real HTTPS on loopback (HTTP/1.1 and h2), trusting only the
//! broker's dev CA: the bearer challenge, every route's happy path and main refusals, paging,
//! path tolerance, interop with the gRPC surface, throttling, the firewall on the peer address,
//! metrics and audit records.

mod common;

use common::https::{Proto, RestBroker, start_rest};
use common::unwrap_req;
use serde_json::json;
use tde_broker::grpc::proto;

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

async fn vault(b: &RestBroker, name: &str) {
    b.b.vault(name, true).await;
}

async fn create_rsa(c: &mut common::https::Client, name: &str) -> serde_json::Value {
    let r =
        c.call("POST", &format!("/keys/{name}/create"), Some(json!({"kty": "RSA", "key_size": 2048}))).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

fn version_of(kid: &str) -> String {
    kid.rsplit('/').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_bearer_token_get_key_vaults_challenge_over_http1_and_h2() {
    let b = start_rest(|_| {}).await;
    vault(&b, "chal-kv").await;
    let port = b.rest.port();
    for proto in [Proto::Http1, Proto::H2] {
        let mut c = b.client("chal-kv", None, proto).await;
        // The SDKs' first request carries no token and no body.
        let r = c.call("POST", "/keys/k/create", None).await;
        assert_eq!(r.status, 401, "{proto:?}");
        assert_eq!(
            r.header("www-authenticate"),
            Some(
                format!(
                    "Bearer authorization=\"https://localhost:{port}/{TENANT}\", resource=\"https://vault.localhost:{port}\""
                )
                .as_str()
            )
        );
        assert_eq!(
            r.json(),
            json!({"error": {"code": "Unauthorized", "message": "Request is missing a Bearer or PoP token."}})
        );
        assert!(r.header("x-ms-request-id").is_some_and(|id| !id.is_empty()));
        assert_eq!(r.header("content-type"), Some("application/json; charset=utf-8"));
    }
    // The token is checked before the body is read: the 401 comes while the announced body has
    // not been sent at all.
    let host = format!("chal-kv.vault.localhost:{port}");
    let head = format!(
        "POST /keys/k/create?api-version=7.6 HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    );
    let answer = common::https::raw_head(b.rest, &b.ca, &host, &head).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("www-authenticate: bearer authorization="), "{answer}");
    // With a token, a body over the size limit is refused for its size.
    let big = json!({"kty": "RSA", "padding": "x".repeat(300 * 1024)});
    let mut admin = b.client("chal-kv", Some(&b.b.token.clone()), Proto::H2).await;
    let r = admin.call("POST", "/keys/k/create", Some(big)).await;
    assert_eq!((r.status, r.error_codes().0.as_str()), (413, "RequestTooLarge"));
    // A token that does not verify is refused the same way, with the challenge.
    let mut c = b.client("chal-kv", Some("not.a.token"), Proto::Http1).await;
    let r = c.call("GET", "/keys", None).await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").is_some_and(|h| h.starts_with("Bearer authorization=")));
    b.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_created_imported_read_updated_and_versioned_with_key_vaults_json() {
    let b = start_rest(|_| {}).await;
    vault(&b, "life-kv").await;
    let base = b.vault_url("life-kv");
    let mut c = b.admin_client("life-kv").await;

    let created = c
        .call(
            "POST",
            "/keys/rsa-key/create",
            Some(json!({"kty": "RSA", "key_size": 2048, "tags": {"env": "test"}, "attributes": {"enabled": true}})),
        )
        .await;
    assert_eq!(created.status, 200);
    let k = created.json();
    let kid = k["key"]["kid"].as_str().unwrap().to_string();
    assert!(kid.starts_with(&format!("{base}/keys/rsa-key/")), "kid on the URL the client called: {kid}");
    assert_eq!(k["key"]["kty"], "RSA");
    assert_eq!(k["key"]["e"], "AQAB", "base64url without padding");
    assert_eq!(k["key"]["n"].as_str().unwrap().len(), 342, "2048-bit modulus, base64url, no padding");
    assert!(k["key"]["key_ops"].as_array().unwrap().iter().any(|o| o == "unwrapKey"));
    assert_eq!(k["attributes"]["enabled"], true);
    assert_eq!(k["attributes"]["recoveryLevel"], "Recoverable");
    assert_eq!(k["attributes"]["recoverableDays"], 90);
    assert!(k["attributes"]["created"].is_i64() && k["attributes"]["updated"].is_i64());
    assert_eq!(k["tags"], json!({"env": "test"}));

    let ec = c.call("POST", "/keys/ec-key/create", Some(json!({"kty": "EC", "crv": "P-256"}))).await;
    assert_eq!(ec.status, 200);
    let ec = ec.json();
    assert_eq!((ec["key"]["kty"].as_str(), ec["key"]["crv"].as_str()), (Some("EC"), Some("P-256")));
    assert_eq!(ec["key"]["x"].as_str().unwrap().len(), 43);
    assert_eq!(ec["key"]["y"].as_str().unwrap().len(), 43);

    // Get: newest (no version segment) and a given version.
    let latest = c.call("GET", "/keys/rsa-key", None).await;
    assert_eq!((latest.status, latest.json()["key"]["kid"].as_str()), (200, Some(kid.as_str())));
    let v1 = version_of(&kid);
    let by_version = c.call("GET", &format!("/keys/rsa-key/{v1}"), None).await;
    assert_eq!(by_version.json()["key"]["kid"], kid);

    // A second version; versions lists both with versioned kids.
    let second = create_rsa(&mut c, "rsa-key").await;
    let versions = c.call("GET", "/keys/rsa-key/versions", None).await.json();
    let kids: Vec<&str> =
        versions["value"].as_array().unwrap().iter().map(|i| i["kid"].as_str().unwrap()).collect();
    assert_eq!(kids, vec![kid.as_str(), second["key"]["kid"].as_str().unwrap()]);
    assert!(versions["nextLink"].is_null());

    // Update: attributes, tags and key_ops of the newest version.
    let updated = c
        .call(
            "PATCH",
            "/keys/rsa-key",
            Some(json!({"attributes": {"exp": 1_900_000_000}, "tags": {"a": "b"}, "key_ops": ["wrapKey", "unwrapKey"]})),
        )
        .await;
    assert_eq!(updated.status, 200, "{}", String::from_utf8_lossy(&updated.body));
    let u = updated.json();
    assert_eq!(u["attributes"]["exp"], 1_900_000_000);
    assert_eq!(u["tags"], json!({"a": "b"}));
    assert_eq!(u["key"]["key_ops"], json!(["wrapKey", "unwrapKey"]));

    // Import a JWK (a 128-bit AES key): the key material is never returned.
    let jwk = json!({"kty": "oct-HSM", "k": "AAECAwQFBgcICQoLDA0ODw"});
    let imported =
        c.call("PUT", "/keys/imported", Some(json!({"key": jwk, "attributes": {"enabled": true}}))).await;
    assert_eq!(imported.status, 200, "{}", String::from_utf8_lossy(&imported.body));
    let i = imported.json();
    assert_eq!(i["key"]["kty"], "oct-HSM");
    assert!(i["key"].get("k").is_none(), "key material is never returned: {i}");
    let w = c
        .call(
            "POST",
            "/keys/imported/wrapkey",
            Some(json!({"alg": "A128KW", "value": "AAECAwQFBgcICQoLDA0ODw"})),
        )
        .await;
    assert_eq!(w.status, 200, "{}", String::from_utf8_lossy(&w.body));
    b.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_keys_are_read_listed_recovered_and_purged_as_the_sdk_pollers_expect() {
    let b = start_rest(|_| {}).await;
    // Without purge protection, so that purge is allowed.
    b.b.vault("del-kv", false).await;
    let base = b.vault_url("del-kv");
    let mut c = b.admin_client("del-kv").await;
    create_rsa(&mut c, "gone").await;

    let deleted = c.call("DELETE", "/keys/gone", None).await;
    assert_eq!(deleted.status, 200);
    let d = deleted.json();
    assert_eq!(d["recoveryId"], format!("{base}/deletedkeys/gone"));
    let (deleted_date, purge_date) =
        (d["deletedDate"].as_i64().unwrap(), d["scheduledPurgeDate"].as_i64().unwrap());
    assert_eq!(purge_date - deleted_date, 90 * 86_400);
    assert!(d["key"]["kid"].as_str().unwrap().starts_with(&format!("{base}/keys/gone/")));

    // The delete poller reads the deleted key; the key itself is gone.
    assert_eq!(c.call("GET", "/deletedkeys/gone", None).await.status, 200);
    let missing = c.call("GET", "/keys/gone", None).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error_codes().0, "KeyNotFound");
    let listed = c.call("GET", "/deletedkeys", None).await.json();
    assert_eq!(listed["value"][0]["recoveryId"], format!("{base}/deletedkeys/gone"));
    assert_eq!(listed["value"][0]["kid"], format!("{base}/keys/gone"));

    // Recover: the recover poller reads the key again.
    let recovered = c.call("POST", "/deletedkeys/gone/recover", None).await;
    assert_eq!(recovered.status, 200);
    assert_eq!(c.call("GET", "/keys/gone", None).await.status, 200);
    assert_eq!(c.call("GET", "/deletedkeys/gone", None).await.status, 404);

    // Delete again, purge: 204 without a body, and the name is free.
    assert_eq!(c.call("DELETE", "/keys/gone", None).await.status, 200);
    let purged = c.call("DELETE", "/deletedkeys/gone", None).await;
    assert_eq!((purged.status, purged.body.len()), (204, 0));
    assert_eq!(c.call("GET", "/deletedkeys/gone", None).await.status, 404);
    create_rsa(&mut c, "gone").await;
    b.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_after_a_purge_and_rotation_follows_its_policy() {
    let b = start_rest(|_| {}).await;
    b.b.vault("bk-kv", false).await;
    let mut c = b.admin_client("bk-kv").await;
    let original = create_rsa(&mut c, "bk").await;

    let backup = c.call("POST", "/keys/bk/backup", None).await;
    assert_eq!(backup.status, 200);
    let blob = backup.json()["value"].as_str().unwrap().to_string();
    assert!(!blob.contains('=') && !blob.contains('+') && !blob.contains('/'), "base64url without padding");
    c.call("DELETE", "/keys/bk", None).await;
    assert_eq!(c.call("DELETE", "/deletedkeys/bk", None).await.status, 204);
    let restored = c.call("POST", "/keys/restore", Some(json!({"value": blob}))).await;
    assert_eq!(restored.status, 200, "{}", String::from_utf8_lossy(&restored.body));
    assert_eq!(restored.json()["key"]["n"], original["key"]["n"]);

    // Rotation policy: the default, then one set here, then a rotation makes a new version.
    let default = c.call("GET", "/keys/bk/rotationpolicy", None).await;
    assert_eq!(default.status, 200);
    assert!(default.json()["id"].as_str().unwrap().ends_with("/keys/bk/rotationpolicy"));
    let policy = json!({
        "lifetimeActions": [{"trigger": {"timeAfterCreate": "P90D"}, "action": {"type": "Rotate"}}],
        "attributes": {"expiryTime": "P2Y"}
    });
    let set = c.call("PUT", "/keys/bk/rotationpolicy", Some(policy)).await;
    assert_eq!(set.status, 200, "{}", String::from_utf8_lossy(&set.body));
    let p = c.call("GET", "/keys/bk/rotationpolicy", None).await.json();
    assert_eq!(p["lifetimeActions"][0]["trigger"]["timeAfterCreate"], "P90D");
    assert_eq!(p["lifetimeActions"][0]["action"]["type"], "Rotate");
    assert_eq!(p["attributes"]["expiryTime"], "P2Y");
    let rotated = c.call("POST", "/keys/bk/rotate", None).await;
    assert_eq!(rotated.status, 200);
    assert_ne!(rotated.json()["key"]["kid"], restored.json()["key"]["kid"]);
    assert!(rotated.json()["attributes"]["exp"].is_i64(), "the policy's expiry applies");
    b.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrap_unwrap_encrypt_decrypt_sign_verify_and_random_bytes_work_over_h2() {
    let b = start_rest(|_| {}).await;
    vault(&b, "cr-kv").await;
    let mut c = b.client("cr-kv", Some(&b.b.token.clone()), Proto::H2).await;
    let k = create_rsa(&mut c, "cr").await;
    let kid = k["key"]["kid"].as_str().unwrap().to_string();
    let v = version_of(&kid);
    let dek = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"; // 32 bytes, base64url
    for alg in ["RSA-OAEP", "RSA-OAEP-256", "RSA1_5"] {
        let w =
            c.call("POST", &format!("/keys/cr/{v}/wrapkey"), Some(json!({"alg": alg, "value": dek}))).await;
        assert_eq!(w.status, 200, "{alg}: {}", String::from_utf8_lossy(&w.body));
        let w = w.json();
        assert_eq!(w["kid"], kid);
        let u = c
            .call("POST", &format!("/keys/cr/{v}/unwrapkey"), Some(json!({"alg": alg, "value": w["value"]})))
            .await;
        assert_eq!((u.status, u.json()["value"].as_str()), (200, Some(dek)), "{alg}");
    }
    let e = c
        .call("POST", "/keys/cr/encrypt", Some(json!({"alg": "RSA-OAEP-256", "value": "aGVsbG8"})))
        .await
        .json();
    let d =
        c.call("POST", "/keys/cr/decrypt", Some(json!({"alg": "RSA-OAEP-256", "value": e["value"]}))).await;
    assert_eq!(d.json()["value"], "aGVsbG8");

    use base64::Engine as _;
    use sha2::Digest as _;
    let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(b"message"));
    let s = c.call("POST", "/keys/cr/sign", Some(json!({"alg": "RS256", "value": digest}))).await;
    assert_eq!(s.status, 200, "{}", String::from_utf8_lossy(&s.body));
    let sig = s.json()["value"].clone();
    let ok = c
        .call("POST", "/keys/cr/verify", Some(json!({"alg": "RS256", "digest": digest, "value": sig})))
        .await;
    assert_eq!(ok.json(), json!({"value": true}));
    let other = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(b"other"));
    let bad =
        c.call("POST", "/keys/cr/verify", Some(json!({"alg": "RS256", "digest": other, "value": sig}))).await;
    assert_eq!(bad.json(), json!({"value": false}));

    let rng = c.call("POST", "/rng", Some(json!({"count": 32}))).await;
    assert_eq!(rng.status, 200);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(rng.json()["value"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes.len(), 32);
    b.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_wrapped_over_rest_unwraps_over_grpc_and_the_other_way_round() {
    let b = start_rest(|_| {}).await;
    vault(&b, "x-kv").await;
    let mut c = b.admin_client("x-kv").await;
    let rest_kid = create_rsa(&mut c, "x").await["key"]["kid"].as_str().unwrap().to_string();
    let dek = [7u8; 32];
    use base64::Engine as _;
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);

    // REST wrap → gRPC unwrap, with the REST kid (vault.localhost) as the gRPC key id.
    let w = c
        .call("POST", "/keys/x/wrapkey", Some(json!({"alg": "RSA-OAEP-256", "value": b64(&dek)})))
        .await
        .json();
    let wrapped =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(w["value"].as_str().unwrap()).unwrap();
    let plain =
        b.b.kv().unwrap_key(unwrap_req(&rest_kid, "RSA-OAEP-256", &wrapped)).await.expect("gRPC unwrap");
    assert_eq!(plain.into_inner().value, dek);

    // gRPC wrap (with the cloud-style kid) → REST unwrap.
    let grpc_kid = b.b.key_uri("x-kv", "x");
    let w =
        b.b.kv()
            .wrap_key(common::crypto_req(&grpc_kid, "RSA-OAEP", &dek))
            .await
            .expect("gRPC wrap")
            .into_inner();
    assert!(w.kid.starts_with("https://x-kv.vault.azure.net/keys/x/"));
    let u =
        c.call("POST", "/keys/x/unwrapkey", Some(json!({"alg": "RSA-OAEP", "value": b64(&w.value)}))).await;
    assert_eq!(u.json()["value"], b64(&dek));
    b.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_35_keys_pages_through_next_links_with_and_without_maxresults() {
    let b = start_rest(|_| {}).await;
    vault(&b, "page-kv").await;
    for i in 0..35 {
        b.b.key("page-kv", &format!("k{i:02}"), "RSA", 2048).await;
    }
    let mut c = b.admin_client("page-kv").await;
    for (maxresults, pages) in [(None, 2), (Some(10), 4)] {
        let mut path = match maxresults {
            Some(n) => format!("/keys?api-version=7.6&maxresults={n}"),
            None => "/keys?api-version=7.6".to_string(),
        };
        let mut names = Vec::new();
        let mut seen_pages = 0;
        loop {
            let page = c.send("GET", &path, None).await;
            assert_eq!(page.status, 200, "{}", String::from_utf8_lossy(&page.body));
            let j = page.json();
            seen_pages += 1;
            let items = j["value"].as_array().unwrap();
            assert!(items.len() <= maxresults.unwrap_or(25));
            names.extend(
                items.iter().map(|i| i["kid"].as_str().unwrap().rsplit('/').next().unwrap().to_string()),
            );
            match j["nextLink"].as_str() {
                Some(next) => {
                    let prefix = b.vault_url("page-kv");
                    assert!(next.starts_with(&format!("{prefix}/keys?api-version=7.6")), "{next}");
                    path = next.strip_prefix(&prefix).unwrap().to_string();
                }
                None => break,
            }
        }
        assert_eq!(seen_pages, pages, "maxresults {maxresults:?}");
        assert_eq!(names, (0..35).map(|i| format!("k{i:02}")).collect::<Vec<_>>());
    }
    let bad = c.send("GET", "/keys?api-version=7.6&maxresults=26", None).await;
    assert_eq!((bad.status, bad.error_codes().0.as_str()), (400, "BadParameter"));
    b.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_match_case_insensitively_with_a_trailing_slash_and_without_a_version() {
    let b = start_rest(|_| {}).await;
    vault(&b, "case-kv").await;
    let mut c = b.admin_client("case-kv").await;
    let kid = create_rsa(&mut c, "Case").await["key"]["kid"].as_str().unwrap().to_string();
    let v = version_of(&kid);
    assert_eq!(c.call("GET", "/keys/Case/", None).await.status, 200, "trailing slash means newest");
    assert_eq!(c.call("GET", &format!("/KEYS/case/{v}"), None).await.status, 200);
    // .NET's CryptographyClient: camelCase operation, no version segment.
    let w = c.call("POST", "/keys/Case/wrapKey", Some(json!({"alg": "RSA-OAEP", "value": "AAEC"}))).await;
    assert_eq!(w.status, 200, "{}", String::from_utf8_lossy(&w.body));
    assert_eq!(w.json()["kid"], kid);
    let u = c
        .call(
            "POST",
            &format!("/Keys/Case/{v}/UnwrapKey"),
            Some(json!({"alg": "RSA-OAEP", "value": w.json()["value"]})),
        )
        .await;
    assert_eq!(u.json()["value"], "AAEC");
    // Percent-encoded query names and path segments, as the JavaScript SDK sends them.
    assert_eq!(c.send("GET", "/keys/C%61se?api%2Dversion=7.6", None).await.status, 200);
    // An empty version segment, as the SDKs write a key id without a version, means the newest.
    let e = c.call("POST", "/keys/case//encrypt", Some(json!({"alg": "RSA-OAEP", "value": "AAEC"}))).await;
    assert_eq!((e.status, e.json()["kid"].as_str()), (200, Some(kid.as_str())));
    b.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vaults_are_reached_under_the_configured_dns_suffix_too_and_other_hosts_are_not_key_vault() {
    let b = start_rest(|_| {}).await;
    vault(&b, "sfx-kv").await;
    let host = format!("sfx-kv.vault.azure.net:{}", b.rest.port());
    let token = Some(b.b.token.as_str());
    // The certificate covers *.vault.azure.net as well; kids follow the host called.
    let mut c = common::https::connect(b.rest, &b.ca, &host, token, Proto::H2, None).await;
    let k = create_rsa(&mut c, "s").await;
    assert!(k["key"]["kid"].as_str().unwrap().starts_with(&format!("https://{host}/keys/s/")));
    // A host that names no vault is not Key Vault's: with no other surface, 404.
    let mut plain = common::https::connect(
        b.rest,
        &b.ca,
        &format!("localhost:{}", b.rest.port()),
        token,
        Proto::Http1,
        None,
    )
    .await;
    let r = plain.call("GET", "/keys", None).await;
    assert_eq!(r.status, 404);
    assert!(r.header("x-ms-request-id").is_some());
    b.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_key_vaults_status_code_text_and_inner_code() {
    let b = start_rest(|_| {}).await;
    vault(&b, "deny-kv").await;
    let mut admin = b.admin_client("deny-kv").await;
    create_rsa(&mut admin, "k").await;
    let user = b.b.user("wrap-only").await;
    b.b.policy("deny-kv", &user.object_id, &["wrapKey", "unwrapKey"]).await;
    let mut c = b.client("deny-kv", Some(&user.token), Proto::Http1).await;

    // 403: the access policy's text, innererror AccessDenied.
    let r = c.call("GET", "/keys/k", None).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error_codes(), ("Forbidden".to_string(), Some("AccessDenied".to_string())));
    assert_eq!(
        r.error_message(),
        format!(
            "The user, group or application 'appid={};oid={};iss=https://sts.windows.net/{TENANT}/' does not have keys get permission on key vault 'deny-kv;location=westus'. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125287",
            user.app_id, user.object_id
        )
    );
    // The wrap the permission allows works.
    let w = c.call("POST", "/keys/k/wrapkey", Some(json!({"alg": "RSA-OAEP", "value": "AAEC"}))).await;
    assert_eq!(w.status, 200);

    // 403 on a disabled key, KeyDisabled.
    admin.call("PATCH", "/keys/k", Some(json!({"attributes": {"enabled": false}}))).await;
    let r = c
        .call("POST", "/keys/k/unwrapkey", Some(json!({"alg": "RSA-OAEP", "value": w.json()["value"]})))
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error_codes(), ("Forbidden".to_string(), Some("KeyDisabled".to_string())));
    assert_eq!(r.error_message(), "Operation unwrapKey is not allowed on a disabled key.");

    // 404 KeyNotFound with the cloud's text.
    let r = admin.call("GET", "/keys/nope", None).await;
    assert_eq!((r.status, r.error_codes().0.as_str()), (404, "KeyNotFound"));
    assert!(r.error_message().starts_with("A key with (name/id) nope was not found in this key vault."));

    // 400 BadParameter: an algorithm the key does not take, undecodable base64url.
    admin.call("PATCH", "/keys/k", Some(json!({"attributes": {"enabled": true}}))).await;
    let r = admin.call("POST", "/keys/k/wrapkey", Some(json!({"alg": "A256KW", "value": "AAEC"}))).await;
    assert_eq!((r.status, r.error_codes().0.as_str()), (400, "BadParameter"), "{}", r.error_message());
    let r = admin.call("POST", "/keys/k/wrapkey", Some(json!({"alg": "RSA-OAEP", "value": "!!"}))).await;
    assert_eq!((r.status, r.error_codes().0.as_str()), (400, "BadParameter"));

    // api-version: required and checked.
    let r = admin.send("GET", "/keys/k?api-version=1.0", None).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.error_message(),
        "The specified version (1.0) is not recognized. Consider using the latest supported version (2025-07-01)."
    );
    assert_eq!(admin.send("GET", "/keys/k", None).await.status, 400);
    assert_eq!(admin.send("GET", "/keys/k?api-version=2025-07-01", None).await.status, 200);
    b.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_vault_answers_429_with_retry_after() {
    let b = start_rest(|_| {}).await;
    vault(&b, "thr-kv").await;
    let mut c = b.admin_client("thr-kv").await;
    create_rsa(&mut c, "t").await;
    b.b.emu()
        .set_throttling(proto::SetThrottlingRequest {
            vault_name: "thr-kv".into(),
            profile: "custom".into(),
            all_other_per_10s: 3,
            create_per_10s: 1,
        })
        .await
        .expect("set throttling");
    for _ in 0..3 {
        assert_eq!(c.call("GET", "/keys/t", None).await.status, 200);
    }
    let r = c.call("GET", "/keys/t", None).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error_codes().0, "Throttled");
    assert_eq!(r.header("retry-after"), Some("10"));
    b.b.advance(4).await;
    assert_eq!(c.call("GET", "/keys/t", None).await.header("retry-after"), Some("6"));
    b.b.advance(6).await;
    assert_eq!(c.call("GET", "/keys/t", None).await.status, 200, "a new window");
    b.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_firewall_decides_on_the_tcp_peer_address() {
    let b = start_rest(|_| {}).await;
    vault(&b, "fw-kv").await;
    b.b.key("fw-kv", "k", "RSA", 2048).await;
    b.b.firewall(
        "fw-kv",
        proto::NetworkAcls {
            default_action: "Deny".into(),
            bypass: "None".into(),
            ip_rules: vec!["127.0.0.2".into()],
            virtual_network_rules: vec![],
        },
        None,
    )
    .await;
    let host = format!("fw-kv.vault.localhost:{}", b.rest.port());
    let token = Some(b.b.token.as_str());
    let mut allowed =
        common::https::connect(b.rest, &b.ca, &host, token, Proto::Http1, Some("127.0.0.2")).await;
    assert_eq!(allowed.call("GET", "/keys/k", None).await.status, 200);
    let mut denied = common::https::connect(b.rest, &b.ca, &host, token, Proto::H2, Some("127.0.0.3")).await;
    let r = denied.call("GET", "/keys/k", None).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error_codes(), ("Forbidden".to_string(), Some("ForbiddenByFirewall".to_string())));
    assert!(r.error_message().contains("Client address: 127.0.0.3"), "{}", r.error_message());
    assert_eq!(
        r.header("x-ms-keyvault-network-info"),
        Some("conn_type=Ipv4;addr=127.0.0.3;act_addr_fam=InterNetwork;")
    );
    b.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_requests_are_counted_in_metrics_and_written_to_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let path = log.clone();
    let b = start_rest(move |cfg| cfg.audit_log = tde_broker::config::AuditLog::File(path)).await;
    vault(&b, "obs-kv").await;
    let mut c = b.admin_client("obs-kv").await;
    let kid = create_rsa(&mut c, "o").await["key"]["kid"].as_str().unwrap().to_string();
    let w = c.call("POST", "/keys/o/wrapkey", Some(json!({"alg": "RSA-OAEP", "value": "AAEC"}))).await.json();
    let unwrap = json!({"alg": "RSA-OAEP", "value": w["value"]});
    assert_eq!(c.call("POST", "/keys/o/unwrapkey", Some(unwrap.clone())).await.status, 200);
    assert_eq!(c.call("POST", "/keys/o/unwrapkey", Some(unwrap)).await.status, 200);
    let mut anonymous = b.client("obs-kv", None, Proto::Http1).await;
    assert_eq!(anonymous.call("GET", "/keys/o", None).await.status, 401);

    let text = tde_broker::telemetry::metrics().render(&[], None);
    assert!(
        text.lines().any(|l| l.starts_with(
            "tdebroker_requests_total{service=\"KeyVault\",method=\"UnwrapKey\",outcome=\"OK\"}"
        )),
        "REST unwraps are counted under service KeyVault"
    );
    assert!(text.contains("service=\"KeyVault\",method=\"GetKey\",outcome=\"Unauthorized\""));

    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let unwraps: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["operation"] == "KeyVault/UnwrapKey").collect();
    assert_eq!(unwraps.len(), 2, "one record per request");
    assert_eq!(unwraps[0]["principal"], b.b.admin.object_id);
    assert_eq!(unwraps[0]["outcome"], "OK");
    assert!(unwraps[0]["caller_address"].as_str().unwrap().starts_with("127.0.0.1"));
    assert_eq!(unwraps[0]["resource"], "https://obs-kv.vault.azure.net/keys/o");
    assert_eq!(unwraps[1]["cache_hit"], true, "the second unwrap is served from the unwrap cache");
    let refused = records.iter().find(|r| r["operation"] == "KeyVault/GetKey").expect("the 401 is audited");
    assert_eq!(
        (refused["outcome"].as_str(), refused["grpc_status"].as_i64()),
        (Some("Unauthorized"), Some(16))
    );
    // gRPC's records name the proto service; REST's the Key Vault operation.
    assert!(records.iter().any(|r| r["operation"] == "tdebroker.v1.Vaults/CreateVault"));
    assert!(kid.starts_with("https://obs-kv.vault.localhost:"));
    b.b.stop().await;
}

#[test]
fn the_rest_listener_defaults_to_loopback_8443_and_is_set_by_flag_file_or_off() {
    use tde_broker::config::{Config, ServeArgs};
    let dir = tempfile::tempdir().unwrap();
    let args = || ServeArgs { data_dir: Some(dir.path().to_path_buf()), ..Default::default() };
    let cfg = Config::resolve(args()).unwrap();
    assert_eq!((cfg.rest_listen, cfg.rest_listen_explicit), (Some("127.0.0.1:8443".parse().unwrap()), false));
    let cfg = Config::resolve(ServeArgs { rest_listen: Some("off".into()), ..args() }).unwrap();
    assert_eq!(cfg.rest_listen, None);
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "rest_listen = \"127.0.0.1:9443\"\n").unwrap();
    let cfg = Config::resolve(ServeArgs { config: Some(file), ..args() }).unwrap();
    assert_eq!((cfg.rest_listen, cfg.rest_listen_explicit), (Some("127.0.0.1:9443".parse().unwrap()), true));
    let err = Config::resolve(ServeArgs { rest_listen: Some("nowhere".into()), ..args() }).unwrap_err();
    assert!(err.to_string().contains("rest_listen 'nowhere' is not IP:PORT or `off`"), "{err}");
}

/// A surface that answers `/hello` and drops `/drop`: what the token endpoints and the Vault KV
/// surface plug in as.
struct Hello;

impl tde_broker::rest::Surface for Hello {
    fn handle<'a>(
        &'a self,
        request: &'a tde_broker::rest::RestRequest,
    ) -> tde_broker::rest::BoxFuture<'a, Option<tde_broker::rest::Handled>> {
        use tde_broker::rest::{Handled, Reply};
        Box::pin(async move {
            let reply = match request.parts.uri.path() {
                "/hello" => Reply::Http(
                    http::Response::builder()
                        .status(200)
                        .body(bytes::Bytes::from(format!("hello {}", request.body.len())))
                        .unwrap(),
                ),
                "/drop" => Reply::Drop,
                _ => return None,
            };
            Some(Handled {
                reply,
                operation: "Hello/Greet",
                outcome: "OK".into(),
                principal: Some("someone".into()),
                resource: Some(request.peer.ip().to_string()),
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_surfaces_get_the_requests_that_name_no_vault_and_are_observed() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let mut cfg = tde_broker::config::Config::for_data_dir(&dir.path().join("data"));
    cfg.rest_listen = None;
    let app = tde_broker::server::App::open(cfg.clone()).await.expect("broker starts");
    let audit = std::sync::Arc::new(tde_broker::audit::AuditLog::open(
        &tde_broker::config::AuditLog::File(log.clone()),
        false,
    ));
    let surfaces: Vec<std::sync::Arc<dyn tde_broker::rest::Surface>> = vec![std::sync::Arc::new(Hello)];
    let service = std::sync::Arc::new(tde_broker::rest::serve::RestService::new(
        app.broker.clone(),
        app.auth.clone(),
        surfaces,
        audit,
        None,
    ));
    let tls = tde_broker::tls::rest_server_tls(&cfg).expect("REST TLS");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(service.serve(listener, tls, cfg.listener, async {
        let _ = stopped.await;
    }));
    let ca = std::fs::read(app.ca_path()).unwrap();
    let host = format!("localhost:{}", addr.port());

    let mut c = common::https::connect(addr, &ca, &host, None, Proto::H2, None).await;
    let r = c.send("POST", "/hello", Some(json!({"a": 1}))).await;
    assert_eq!((r.status, String::from_utf8_lossy(&r.body).as_ref()), (200, "hello 7"));
    assert!(r.header("x-ms-request-id").is_some(), "the listener adds the request id");
    assert_eq!(c.send("GET", "/elsewhere", None).await.status, 404);
    // A dropped request gets no answer: HTTP/1.1 closes the connection.
    let mut h1 = common::https::connect(addr, &ca, &host, None, Proto::Http1, None).await;
    let dropped = h1.try_send("GET", "/drop").await;
    assert!(dropped.is_err(), "no response to a dropped request: {dropped:?}");

    let text = tde_broker::telemetry::metrics().render(&[], None);
    assert!(
        text.contains("tdebroker_requests_total{service=\"Hello\",method=\"Greet\",outcome=\"OK\"} 2"),
        "{text}"
    );
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let hello = records.iter().find(|r| r["operation"] == "Hello/Greet").expect("audited");
    assert_eq!(
        (hello["principal"].as_str(), hello["resource"].as_str()),
        (Some("someone"), Some("127.0.0.1"))
    );
    assert!(records.iter().any(|r| r["operation"] == "Rest/Unknown" && r["outcome"] == "NotFound"));
    let _ = stop.send(());
    served.await.expect("the listener stops and drains");
}

/// An SDK that waits out a `Retry-After` reuses its pooled HTTP/1.1 connection afterwards: the
/// listener must not close a keep-alive connection while its client waits (a close racing the
/// next request fails that request). The idle bound is longer than the handshake timeout and than
/// any Retry-After (10 s at most).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_idle_longer_than_the_handshake_timeout_still_serves_its_next_request() {
    let b = start_rest(|c| c.listener.handshake_timeout = std::time::Duration::from_millis(300)).await;
    vault(&b, "idle-kv").await;
    let mut c = b.admin_client("idle-kv").await;
    assert_eq!(c.call("GET", "/keys", None).await.status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    // `call` fails the test if the connection was closed under it.
    let again = c.call("GET", "/keys", None).await;
    assert_eq!(again.status, 200, "the same connection after five handshake timeouts of idleness");
    b.b.stop().await;
}
