//! Issue 17, fuzzing: property-based fuzz targets for every parser that sees input, on stable,
//! as part of `cargo test`. Each target feeds arbitrary bytes and structure-aware mutations of
//! valid inputs (a token with a changed segment, a PKCS#8 key with flipped bytes, a backup blob
//! resealed around a changed payload, ...) and asserts, through `fuzz/checks.rs` (shared with
//! the cargo-fuzz targets under `fuzz/`): no panic, the expected typed error, valid inputs still
//! accepted (round trips), and no single allocation past a bound (the counting allocator below).
//!
//! Cases per target: a default sized for a debug build, or `TDE_BROKER_FUZZ_CASES` (the costly
//! targets take a fraction of it, see [`cases`]). `docs/reliability/fuzzing.md` lists the
//! targets and the commands.

#[path = "fuzz/alloc.rs"]
mod alloc;
#[path = "fuzz/checks.rs"]
mod checks;
mod common;
#[path = "fuzz/mutate.rs"]
mod mutate;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64URL};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestCaseError, TestRunner};
use tde_broker::auth::{AuthInterceptor, Plane};
use tde_broker::config::{ClockKind, Config};
use tde_broker::crypto::{self, Algorithm, RsaPrivateKey, Sealer};
use tde_broker::grpc::proto;
use tde_broker::model::{BrokerError, Caller};
use tde_broker::server::App;

use checks::*;
use mutate::{ByteEdit, StrEdit, apply_bytes, apply_str, byte_edits, str_edits};

#[global_allocator]
static COUNTING: alloc::Counting = alloc::Counting;

/// Environment variable: cases per target for a long run.
const CASES_ENV: &str = "TDE_BROKER_FUZZ_CASES";

/// Cases for a target: `default`, or `TDE_BROKER_FUZZ_CASES / cost` (at least 1) when set, so a
/// costly target (RSA key checks, a store commit, a gRPC round trip) runs fewer.
fn cases(default: u32, cost: u32) -> u32 {
    match std::env::var(CASES_ENV).ok().and_then(|v| v.parse::<u32>().ok()) {
        Some(n) => (n / cost).max(1),
        None => default,
    }
}

/// A runner for `cases` cases. Failures are not persisted: a defect found gets a named
/// regression test instead.
fn runner(cases: u32) -> TestRunner {
    TestRunner::new(PtConfig { cases, failure_persistence: None, ..PtConfig::default() })
}

/// Runs `test` over `strategy`, failing the Rust test with the shrunk input.
fn fuzz<S: Strategy>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value))
where
    S::Value: std::fmt::Debug,
{
    let started = std::time::Instant::now();
    let result = runner(cases).run(&strategy, |v| {
        test(v);
        Ok::<(), TestCaseError>(())
    });
    if let Err(e) = result {
        panic!("fuzz target {name}: {e}");
    }
    eprintln!("fuzz target {name}: {cases} cases in {:.2?}", started.elapsed());
}

/// Arbitrary text: any `char`s, or any bytes read lossily.
fn any_text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<char>(), 0..max).prop_map(|v| v.into_iter().collect()),
        prop::collection::vec(any::<u8>(), 0..max).prop_map(|v| String::from_utf8_lossy(&v).into_owned()),
    ]
}

fn any_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

// ---- Identifiers --------------------------------------------------------------------------

/// Valid key URIs, built from valid parts.
fn valid_key_uri() -> impl Strategy<Value = String> {
    (
        "[a-zA-Z]([a-zA-Z0-9]|-[a-zA-Z0-9]){2,11}",
        "[0-9a-zA-Z-]{1,40}",
        proptest::option::of("[0-9a-f]{32}"),
        proptest::option::of(1u16..),
        any::<bool>(),
    )
        .prop_map(|(vault, name, version, port, slash)| {
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            let version = version.map(|v| format!("/{v}")).unwrap_or_default();
            let slash = if slash { "/" } else { "" };
            format!("https://{vault}.{SUFFIX}{port}/keys/{name}{version}{slash}")
        })
}

#[test]
fn fuzz_key_identifiers() {
    let n = cases(2000, 1);
    fuzz("names (arbitrary)", n, any_text(64), |s| check_names(&s));
    fuzz("names (mutated)", n, ("[a-zA-Z][a-zA-Z0-9-]{1,30}", str_edits(3)), |(s, edits)| {
        check_names(&apply_str(&s, &edits))
    });
    fuzz("key id (arbitrary)", n, any_text(300), |s| check_key_id(&s));
    fuzz("key id (valid)", n, valid_key_uri(), |uri| {
        check_key_id(&uri);
        assert!(tde_broker::model::ids::KeyId::parse(&uri, SUFFIX).is_ok(), "{uri}");
    });
    fuzz("key id (mutated)", n, (valid_key_uri(), str_edits(4)), |(uri, edits)| {
        check_key_id(&apply_str(&uri, &edits))
    });
}

/// Found by this target? No: kept to show the bound the checks hold an error text to.
#[test]
fn an_identifier_error_quotes_at_most_200_escaped_characters() {
    let long = "\u{10ffff}".repeat(100_000);
    let e = tde_broker::model::ids::KeyId::parse(&format!("https://{long}"), SUFFIX).unwrap_err();
    assert_eq!(e.code(), "BadParameter");
    assert!(e.to_string().len() < 4096);
}

// ---- Tokens -------------------------------------------------------------------------------

/// Segment-level changes of a compact JWS.
#[derive(Clone, Debug)]
enum TokenEdit {
    /// Text edits anywhere.
    Text(Vec<StrEdit>),
    /// Segment `i` replaced by the base64url of these bytes.
    Segment(usize, Vec<u8>),
    /// Segments `i` and `j` swapped.
    Swap(usize, usize),
    /// One more segment.
    Extra(String),
    /// Segment `i` dropped.
    Drop(usize),
}

fn token_edit() -> impl Strategy<Value = TokenEdit> {
    prop_oneof![
        str_edits(3).prop_map(TokenEdit::Text),
        (0usize..3, any_bytes(64)).prop_map(|(i, b)| TokenEdit::Segment(i, b)),
        (0usize..3, 0usize..3).prop_map(|(i, j)| TokenEdit::Swap(i, j)),
        "[A-Za-z0-9_-]{0,8}".prop_map(TokenEdit::Extra),
        (0usize..3).prop_map(TokenEdit::Drop),
    ]
}

fn apply_token_edit(token: &str, edit: &TokenEdit) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    match edit {
        TokenEdit::Text(edits) => return apply_str(token, edits),
        TokenEdit::Segment(i, bytes) => {
            let n = parts.len();
            parts[*i % n] = B64URL.encode(bytes)
        }
        TokenEdit::Swap(i, j) => {
            let n = parts.len();
            parts.swap(*i % n, *j % n)
        }
        TokenEdit::Extra(s) => parts.push(s.clone()),
        TokenEdit::Drop(i) => {
            let n = parts.len();
            parts.remove(*i % n);
        }
    }
    parts.join(".")
}

/// Headers worth signing: the good one, algorithm confusion, another key, missing members,
/// or any bytes.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(good_header()),
        Just(format!(r#"{{"alg":"none","typ":"JWT","kid":"{KID}"}}"#).into_bytes()),
        Just(format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{KID}"}}"#).into_bytes()),
        Just(br#"{"alg":"RS256","typ":"JWT","kid":"other"}"#.to_vec()),
        Just(format!(r#"{{"alg":"RS256","kid":"{KID}"}}"#).into_bytes()),
        Just(format!(r#"{{"alg":"RS256","typ":"JWT","kid":"{KID}","alg":"RS256"}}"#).into_bytes()),
        any_bytes(64),
    ]
}

/// A JSON value of any kind, small.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        any_text(20).prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The claims `jwt::encode` writes, as JSON.
fn good_claims() -> serde_json::Value {
    serde_json::json!({
        "iss": "https://sts.windows.net/t/", "aud": "https://vault.azure.net", "sub": "o",
        "oid": "o", "tid": "t", "appid": "a", "idtyp": "user", "iat": 1, "nbf": 1, "exp": 2
    })
}

const CLAIM_NAMES: [&str; 12] =
    ["iss", "aud", "sub", "oid", "tid", "appid", "idtyp", "name", "xms_mirid", "iat", "nbf", "exp"];

/// Claims with one member replaced by any JSON value, or removed; or any bytes.
fn claims_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => (0usize..CLAIM_NAMES.len(), proptest::option::of(json_value())).prop_map(|(i, v)| {
            let mut c = good_claims();
            let object = c.as_object_mut().expect("an object");
            match v {
                Some(v) => object.insert(CLAIM_NAMES[i].to_string(), v),
                None => object.remove(CLAIM_NAMES[i]),
            };
            serde_json::to_vec(&c).expect("JSON")
        }),
        1 => any_bytes(128),
    ]
}

#[test]
fn fuzz_jwt_decode() {
    let fx = JwtFixture::new();
    check_jwt(&fx, &fx.token);
    let n = cases(1000, 1);
    fuzz("jwt (arbitrary)", n, any_text(200), |t| check_jwt(&fx, &t));
    let dotted = prop::collection::vec(any_text(40), 0..5).prop_map(|p| p.join("."));
    fuzz("jwt (arbitrary, dotted)", n, dotted, |t| check_jwt(&fx, &t));
    fuzz("jwt (mutated)", n, prop::collection::vec(token_edit(), 1..3), |edits| {
        let token = edits.iter().fold(fx.token.clone(), |t, e| apply_token_edit(&t, e));
        check_jwt(&fx, &token)
    });
    fuzz("jwt (signed, any header and claims)", n, (header_bytes(), claims_bytes()), |(h, c)| {
        check_signed_jwt(&fx, &h, &c)
    });
}

/// An `App` on a manual clock in a fresh data directory (kept by the returned guard).
async fn open_app() -> (App, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::for_data_dir(dir.path());
    cfg.clock = ClockKind::Manual;
    cfg.clock_start = Some(1_800_000_000);
    (App::open(cfg).await.expect("broker starts"), dir)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime")
}

/// The Authenticator's token path as the interceptor runs it: `authorization` header → scheme →
/// cache → `jwt::decode` → issuer, audience, lifetime, principal.
#[test]
fn fuzz_authenticator_token_validation() {
    let rt = rt();
    let (app, _dir) = rt.block_on(open_app());
    let token = app.admin_token().expect("admin token");
    let admin = app.admin.object_id.clone();
    let data = AuthInterceptor::new(app.auth.clone(), Plane::Data);
    let control = AuthInterceptor::new(app.auth.clone(), Plane::Control);
    let check = |header: &str| {
        for gate in [&data, &control] {
            let out = bounded("authenticate", header.len(), || gate.authenticate(Some(header), None, None));
            let exact = header
                .trim()
                .split_once(' ')
                .is_some_and(|(s, t)| s.eq_ignore_ascii_case("bearer") && t.trim() == token);
            match out {
                Ok(caller) => {
                    assert!(exact, "accepted {header:?}");
                    assert_eq!(caller.object_id.as_ref(), admin.as_str());
                }
                Err(e) => {
                    assert!(!exact, "refused the admin token: {e:?}");
                    assert!(
                        matches!(
                            e,
                            BrokerError::MissingToken
                                | BrokerError::InvalidToken { .. }
                                | BrokerError::InvalidIssuer { .. }
                                | BrokerError::InvalidAudience { .. }
                                | BrokerError::TokenExpired { .. }
                                | BrokerError::TokenNotYetValid { .. }
                                | BrokerError::PrincipalDeleted { .. }
                        ),
                        "{header:?}: {e:?}"
                    );
                }
            }
        }
    };
    check(&format!("Bearer {token}"));
    let n = cases(1000, 1);
    fuzz("authorization (arbitrary)", n, any_text(200), |h| check(&h));
    let schemes = prop_oneof![Just("Bearer "), Just("bearer  "), Just("Basic "), Just(""), Just(" Bearer\t")];
    fuzz(
        "authorization (mutated token)",
        n,
        (schemes, prop::collection::vec(token_edit(), 0..3)),
        |(s, edits)| {
            let t = edits.iter().fold(token.clone(), |t, e| apply_token_edit(&t, e));
            check(&format!("{s}{t}"))
        },
    );
}

// ---- Key import ---------------------------------------------------------------------------

fn shared_pkcs8() -> &'static [u8] {
    static KEY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    KEY.get_or_init(|| crypto::generate_rsa_pkcs8(2048).expect("an RSA key").to_vec())
}

fn pem_of(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let lines: Vec<&str> =
        b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).expect("ascii")).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

fn pkcs1_of(pkcs8: &[u8]) -> Vec<u8> {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::DecodePrivateKey;
    rsa::PrivateKey::from_pkcs8_der(pkcs8)
        .expect("PKCS#8")
        .to_pkcs1_der()
        .expect("PKCS#1")
        .as_bytes()
        .to_vec()
}

fn rsa_jwk(pkcs8: &[u8]) -> serde_json::Value {
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::traits::{PrivateKeyParts, PublicKeyParts};
    let key = rsa::PrivateKey::from_pkcs8_der(pkcs8).expect("PKCS#8");
    let b = |v: Vec<u8>| B64URL.encode(v);
    serde_json::json!({
        "kty": "RSA",
        "n": b(key.n().to_be_bytes_trimmed_vartime().to_vec()),
        "e": b(key.e().to_be_bytes_trimmed_vartime().to_vec()),
        "d": b(key.d().to_be_bytes_trimmed_vartime().to_vec()),
        "p": b(key.primes()[0].to_be_bytes_trimmed_vartime().to_vec()),
        "q": b(key.primes()[1].to_be_bytes_trimmed_vartime().to_vec()),
    })
}

#[test]
fn fuzz_pkcs8_import() {
    check_pkcs8(shared_pkcs8());
    assert!(crypto::import_pkcs8_der(shared_pkcs8()).is_ok());
    let n = cases(600, 4);
    fuzz("pkcs8 (arbitrary)", n, any_bytes(2048), |b| check_pkcs8(&b));
    fuzz("pkcs8 (mutated)", n, byte_edits(4), |edits| check_pkcs8(&apply_bytes(shared_pkcs8(), &edits)));
}

#[test]
fn fuzz_pem_import() {
    let pem8 = pem_of("PRIVATE KEY", shared_pkcs8());
    let pem1 = pem_of("RSA PRIVATE KEY", &pkcs1_of(shared_pkcs8()));
    for pem in [&pem8, &pem1] {
        check_pem(pem);
        assert!(crypto::import_pem(pem).is_ok());
    }
    let n = cases(600, 4);
    fuzz("pem (arbitrary)", n, any_text(512), |t| check_pem(&t));
    let framed =
        any_text(300).prop_map(|t| format!("-----BEGIN PRIVATE KEY-----\n{t}\n-----END PRIVATE KEY-----"));
    fuzz("pem (arbitrary body)", n, framed, |t| check_pem(&t));
    fuzz("pem (mutated)", n, (any::<bool>(), str_edits(4)), |(one, edits)| {
        check_pem(&apply_str(if one { &pem1 } else { &pem8 }, &edits))
    });
}

#[test]
fn fuzz_jwk_import() {
    let jwk = rsa_jwk(shared_pkcs8());
    check_jwk(&jwk.to_string());
    assert!(crypto::import_jwk(&jwk.to_string()).is_ok());
    let n = cases(600, 4);
    fuzz("jwk (arbitrary)", n, any_text(256), |t| check_jwk(&t));
    let members = ["kty", "n", "e", "d", "p", "q", "dp", "dq", "qi", "k"];
    let member_value = prop_oneof![
        json_value(),
        any_bytes(600).prop_map(|b| serde_json::Value::from(B64URL.encode(b))),
        Just(serde_json::Value::from("RSA")),
        Just(serde_json::Value::from("oct")),
    ];
    fuzz("jwk (a member changed)", n, (0..members.len(), member_value), |(i, v)| {
        let mut j = jwk.clone();
        j[members[i]] = v;
        check_jwk(&j.to_string())
    });
    fuzz("jwk (oct)", n, (any_bytes(48), prop_oneof![Just("oct"), Just("oct-HSM")]), |(k, kty)| {
        check_jwk(&serde_json::json!({"kty": kty, "k": B64URL.encode(&k)}).to_string())
    });
    fuzz("jwk (text mutated)", n, str_edits(4), |edits| check_jwk(&apply_str(&jwk.to_string(), &edits)));
}

// ---- Ciphertext framing -------------------------------------------------------------------

fn any_alg() -> impl Strategy<Value = Algorithm> {
    prop::sample::select(Algorithm::ALL.to_vec())
}

#[test]
fn fuzz_rsa_decrypt() {
    let key = RsaPrivateKey::from_pkcs8(shared_pkcs8()).expect("key");
    let n = cases(600, 4);
    let lengths = prop_oneof![
        any_bytes(600),
        any_bytes(256).prop_map(|mut v| {
            v.resize(256, 0);
            v
        })
    ];
    fuzz("rsa decrypt (arbitrary)", n, (any_alg(), lengths), |(alg, ct)| {
        check_rsa_decrypt(&key, alg, &ct, None)
    });
    let rsa = prop::sample::select(vec![Algorithm::RsaOaep, Algorithm::RsaOaep256, Algorithm::Rsa1_5]);
    fuzz("rsa decrypt (round trip, mutated)", n, (rsa, any_bytes(100), byte_edits(2)), |(alg, pt, edits)| {
        let ct = key.encrypt(alg, &pt).expect("encrypt");
        check_rsa_decrypt(&key, alg, &ct, Some(&pt));
        let changed = apply_bytes(&ct, &edits);
        check_rsa_decrypt(&key, alg, &changed, (changed == ct).then_some(&pt[..]));
    });
}

#[test]
fn fuzz_aes_unwrap_and_gcm_decrypt() {
    let n = cases(1000, 1);
    fuzz("aes-kw (arbitrary)", n, (any_bytes(40), any_bytes(96)), |(k, w)| check_aes_kw(&k, &w, None));
    let key =
        prop::sample::select(vec![16usize, 24, 32]).prop_flat_map(|l| prop::collection::vec(any::<u8>(), l));
    let pt = (2usize..9).prop_flat_map(|blocks| prop::collection::vec(any::<u8>(), blocks * 8));
    fuzz("aes-kw (round trip, mutated)", n, (key.clone(), pt, byte_edits(2)), |(k, pt, edits)| {
        let w = crypto::aes_kw_wrap(&k, &pt).expect("wrap");
        check_aes_kw(&k, &w, Some(&pt));
        let changed = apply_bytes(&w, &edits);
        check_aes_kw(&k, &changed, (changed == w).then_some(&pt[..]));
    });
    let parts = (any_bytes(40), any_bytes(20), any_bytes(32), any_bytes(64), any_bytes(24));
    fuzz("aes-gcm (arbitrary)", n, parts, |(k, iv, aad, ct, tag)| {
        check_aes_gcm(&k, &iv, &aad, &ct, &tag, None)
    });
    fuzz(
        "aes-gcm (round trip, mutated)",
        n,
        (key, any_bytes(32), any_bytes(64), 0usize..4, byte_edits(2)),
        |(k, aad, pt, which, edits)| {
            let out = crypto::aes_gcm_encrypt(&k, None, &aad, &pt).expect("encrypt");
            check_aes_gcm(&k, &out.iv, &aad, &out.ciphertext, &out.tag, Some(&pt));
            let mut parts = [out.iv.clone(), aad.clone(), out.ciphertext.clone(), out.tag.clone()];
            parts[which] = apply_bytes(&parts[which], &edits);
            let same = parts == [out.iv, aad, out.ciphertext, out.tag];
            check_aes_gcm(&k, &parts[0], &parts[1], &parts[2], &parts[3], same.then_some(&pt[..]));
        },
    );
}

#[test]
fn fuzz_unseal() {
    let sealer = Sealer::new(&Sealer::generate_master_key()).expect("sealer");
    let n = cases(1000, 1);
    fuzz("unseal (arbitrary)", n, (any_bytes(16), any_bytes(128)), |(aad, b)| {
        check_unseal(&sealer, &aad, &b, None)
    });
    fuzz(
        "unseal (round trip, mutated)",
        n,
        (any_bytes(32), any_bytes(128), byte_edits(2), byte_edits(1), any::<bool>()),
        |(aad, pt, edits, aad_edits, change_aad)| {
            let blob = sealer.seal(&aad, &pt).expect("seal");
            check_unseal(&sealer, &aad, &blob, Some(&pt));
            let (blob2, aad2) = if change_aad {
                (blob.clone(), apply_bytes(&aad, &aad_edits))
            } else {
                (apply_bytes(&blob, &edits), aad.clone())
            };
            let same = blob2 == blob && aad2 == aad;
            check_unseal(&sealer, &aad2, &blob2, same.then_some(&pt[..]));
        },
    );
}

// ---- Configuration ------------------------------------------------------------------------

/// A configuration file that sets most settings.
const GOOD_CONFIG: &str = r#"listen = "127.0.0.1:50999"
clock = "manual"
clock_start = 1800000000
vault_dns_suffix = "vault.example.test"
location = "northeurope"
tenant_id = "11111111-2222-3333-4444-555555555555"
admin_token_lifetime = 7200
token_lifetime = 1800
cloud = "AzureChinaCloud"
probe_interval = 60
trusted_proxies = ["10.0.0.0/8", "192.168.1.1"]
http_listen = "off"
audit_log = "off"
decision_cache_entries = 10
unwrap_cache_ttl = 5
throttling = "azure"
store_check = "full"
max_connections = 100
handshake_timeout = 3
max_header_list_size = 8192
"#;

/// A TOML value of any type, including very deep arrays and inline tables.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        Just("18446744073709551616".to_string()),
        Just("-0".to_string()),
        Just("1e400".to_string()),
        Just("nan".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any_text(40).prop_map(|s| toml::Value::from(s).to_string()),
        Just(r#""""#.to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
        (0usize..5000).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d))),
        (0usize..5000).prop_map(|d| format!("{}{}", "{a=".repeat(d) + "1", "}".repeat(d))),
        prop::collection::vec(any_text(10), 0..4).prop_map(|v| toml::Value::from(v).to_string()),
    ]
}

#[test]
fn fuzz_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, data) = (dir.path().join("config.toml"), dir.path().join("data"));
    let cfg = check_config(&path, &data, GOOD_CONFIG).expect("the good configuration is accepted");
    assert_eq!(cfg.vault_dns_suffix, "vault.example.test");
    assert_eq!(cfg.trusted_proxies, ["10.0.0.0/8", "192.168.1.1/32"]);
    assert_eq!(cfg.listener.max_connections, 100);
    let n = cases(1000, 1);
    fuzz("config (arbitrary)", n, any_text(300), |t| {
        let _ = check_config(&path, &data, &t);
    });
    let keys: Vec<String> =
        GOOD_CONFIG.lines().filter_map(|l| l.split_once(" = ")).map(|(k, _)| k.to_string()).collect();
    let extra = prop_oneof![
        Just("unknown_key".to_string()),
        Just("seed".to_string()),
        Just("cache_enabled".to_string()),
        "[a-z_]{1,12}"
    ];
    fuzz("config (a value changed)", n, (prop::sample::select(keys), toml_value()), |(key, value)| {
        let text: String = GOOD_CONFIG
            .lines()
            .map(|l| {
                if l.starts_with(&format!("{key} = ")) {
                    format!("{key} = {value}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        if let Err(problems) = check_config(&path, &data, &text) {
            assert!(
                problems.iter().any(|p| p.contains(&key) || p.contains("config.toml")),
                "{key} = {value}: {problems:?}"
            );
        }
    });
    fuzz("config (a key added)", n, (extra, toml_value()), |(key, value)| {
        let _ = check_config(&path, &data, &format!("{GOOD_CONFIG}{key} = {value}\n"));
    });
    fuzz("config (text mutated)", n, str_edits(4), |edits| {
        let _ = check_config(&path, &data, &apply_str(GOOD_CONFIG, &edits));
    });
}

// ---- Backup blobs through Broker::restore_key ---------------------------------------------

/// What the backup blob is sealed under (`src/broker/keys/backup.rs`): the blob is
/// `TDEBKP1 || seal(BACKUP_AAD, json)`.
const BACKUP_MAGIC: &[u8] = b"TDEBKP1";
const BACKUP_AAD: &[u8] = b"tde-broker/backup/v1";

/// Changes to a backup payload made by someone holding the master key: the broker must still
/// refuse what it could not serve.
#[derive(Clone, Debug)]
enum PayloadEdit {
    /// The key's name.
    Name(String),
    /// A member of version `i`'s metadata set to a value.
    Meta(usize, String, serde_json::Value),
    /// Version `i`'s material replaced (base64 of these bytes, or this text).
    Material(usize, Result<Vec<u8>, String>),
    /// Version `i` listed twice.
    Duplicate(usize),
    /// No versions.
    NoVersions,
    /// Any JSON instead of the payload.
    Replace(serde_json::Value),
}

const META_MEMBERS: [&str; 8] = ["version", "kty", "bits", "key_ops", "attributes", "tags", "n", "e"];

fn payload_edit() -> impl Strategy<Value = PayloadEdit> {
    prop_oneof![
        prop_oneof![any_text(20), "[a-zA-Z0-9-]{1,20}", Just(String::new()), Just("a".repeat(128))]
            .prop_map(PayloadEdit::Name),
        (
            0usize..2,
            prop::sample::select(META_MEMBERS.to_vec()).prop_map(str::to_string),
            prop_oneof![
                json_value(),
                "[0-9a-f]{31,33}".prop_map(serde_json::Value::from),
                Just(serde_json::json!("oct-HSM"))
            ]
        )
            .prop_map(|(i, m, v)| PayloadEdit::Meta(i, m, v)),
        (0usize..2, prop_oneof![any_bytes(64).prop_map(Ok), any_text(20).prop_map(Err)])
            .prop_map(|(i, m)| PayloadEdit::Material(i, m)),
        (0usize..2).prop_map(PayloadEdit::Duplicate),
        Just(PayloadEdit::NoVersions),
        json_value().prop_map(PayloadEdit::Replace),
    ]
}

fn apply_payload_edit(payload: &serde_json::Value, edit: &PayloadEdit) -> serde_json::Value {
    let mut p = payload.clone();
    let versions = p["versions"].as_array().map_or(0, Vec::len).max(1);
    match edit {
        PayloadEdit::Name(n) => p["name"] = n.clone().into(),
        PayloadEdit::Meta(i, m, v) => p["versions"][i % versions]["meta"][m] = v.clone(),
        PayloadEdit::Material(i, m) => {
            p["versions"][i % versions]["material"] = match m {
                Ok(bytes) => STANDARD.encode(bytes).into(),
                Err(text) => text.clone().into(),
            }
        }
        PayloadEdit::Duplicate(i) => {
            let v = p["versions"][i % versions].clone();
            if let Some(list) = p["versions"].as_array_mut() {
                list.push(v);
            }
        }
        PayloadEdit::NoVersions => p["versions"] = serde_json::json!([]),
        PayloadEdit::Replace(v) => p = v.clone(),
    }
    p
}

/// A broker serving on loopback whose `Broker` the test also calls, a vault where the admin may
/// do anything, and its token.
struct Served {
    app_broker: Arc<tde_broker::broker::Broker>,
    caller: Caller,
    token: String,
    addr: std::net::SocketAddr,
    channel: tonic::transport::Channel,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn served() -> Served {
    let (app, dir) = open_app().await;
    let token = app.admin_token().expect("token");
    let caller = app.auth.validate(&token, Plane::Data).expect("caller");
    let app_broker = app.broker.clone();
    let (addr, stop, _served) = common::spawn_serving(app).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let vaults =
        || proto::vaults_client::VaultsClient::with_interceptor(channel.clone(), common::bearer(&token));
    for vault in ["src", "dst"] {
        vaults()
            .create_vault(proto::CreateVaultRequest { name: format!("{vault}vault"), ..Default::default() })
            .await
            .expect("vault");
        vaults()
            .set_access_policy(proto::SetAccessPolicyRequest {
                vault_name: format!("{vault}vault"),
                object_id: caller.object_id.to_string(),
                key_permissions: vec!["all".into()],
            })
            .await
            .expect("policy");
    }
    Served { app_broker, caller, token, addr, channel, _dir: dir, _stop: stop }
}

impl Served {
    fn kv(&self) -> common::Kv {
        proto::key_vault_client::KeyVaultClient::with_interceptor(
            self.channel.clone(),
            common::bearer(&self.token),
        )
    }
}

/// A refusal of a restore: the blob or a name in it is a bad parameter.
fn assert_blob_refused(what: &str, e: &BrokerError) {
    assert!(matches!(e, BrokerError::BadParameter { .. }), "{what}: expected BadParameter, got {e:?}");
}

#[test]
fn fuzz_backup_restore() {
    let rt = rt();
    let s = rt.block_on(served());
    // A key with two versions (an RSA key and an oct-HSM key), backed up.
    let (rsa_blob, oct_blob) = rt.block_on(async {
        let mut blobs = Vec::new();
        for (name, kty, size) in [("rsakey", "RSA", 2048), ("octkey", "oct-HSM", 256)] {
            for _ in 0..2 {
                s.kv()
                    .create_key(proto::CreateKeyRequest {
                        vault_name: "srcvault".into(),
                        name: name.into(),
                        kty: kty.into(),
                        key_size: size,
                        ..Default::default()
                    })
                    .await
                    .expect("key");
            }
            let blob = s
                .kv()
                .backup_key(proto::BackupKeyRequest {
                    key_id: format!("https://srcvault.{SUFFIX}/keys/{name}"),
                })
                .await
                .expect("backup")
                .into_inner()
                .blob;
            blobs.push(blob);
        }
        (blobs.remove(0), blobs.remove(0))
    });
    let restore = |blob: &[u8]| rt.block_on(s.app_broker.restore_key(&s.caller, "dstvault", blob));
    // Round trip: each blob restores once into the other vault; a second time it is a conflict.
    for blob in [&rsa_blob, &oct_blob] {
        let view = restore(blob).expect("a blob restores");
        assert!(view.kid.starts_with(&format!("https://dstvault.{SUFFIX}/keys/")), "{}", view.kid);
        let again = restore(blob).expect_err("the name is taken now");
        assert!(matches!(again, BrokerError::KeyAlreadyExists { .. }), "{again:?}");
    }
    let n = cases(1000, 1);
    fuzz("restore (arbitrary)", n, any_bytes(512), |b| {
        let mut blob = if b.first().is_some_and(|x| x % 2 == 0) { BACKUP_MAGIC.to_vec() } else { Vec::new() };
        blob.extend_from_slice(&b);
        let e = bounded("restore", blob.len(), || restore(&blob)).expect_err("a random blob restores");
        assert_blob_refused("arbitrary", &e);
    });
    fuzz("restore (mutated blob)", n, (any::<bool>(), byte_edits(3)), |(rsa, edits)| {
        let base = if rsa { &rsa_blob } else { &oct_blob };
        let blob = apply_bytes(base, &edits);
        let out = bounded("restore", blob.len(), || restore(&blob));
        match out {
            Err(BrokerError::KeyAlreadyExists { .. }) => assert_eq!(&blob, base, "an altered blob opened"),
            Err(e) => assert_blob_refused("mutated", &e),
            Ok(v) => panic!("an altered blob restored {}", v.kid),
        }
    });
    // Payloads resealed under the broker's own master key, as only its holder could.
    let payloads: Vec<serde_json::Value> = [&rsa_blob, &oct_blob]
        .iter()
        .map(|b| {
            let json =
                s.app_broker.sealer().unseal(BACKUP_AAD, &b[BACKUP_MAGIC.len()..]).expect("our own blob");
            serde_json::from_slice(&json).expect("payload JSON")
        })
        .collect();
    let fresh = AtomicUsize::new(0);
    fuzz(
        "restore (payload changed, resealed)",
        cases(2000, 4),
        (any::<bool>(), payload_edit()),
        |(rsa, edit)| {
            let mut p = apply_payload_edit(&payloads[usize::from(!rsa)], &edit);
            if !matches!(edit, PayloadEdit::Name(_) | PayloadEdit::Replace(_)) {
                // A fresh name, so that a payload the broker accepts is restored, not a conflict.
                p["name"] = format!("k{}", fresh.fetch_add(1, Ordering::Relaxed)).into();
            }
            let json = serde_json::to_vec(&p).expect("JSON");
            let mut blob = BACKUP_MAGIC.to_vec();
            blob.extend(s.app_broker.sealer().seal(BACKUP_AAD, &json).expect("seal"));
            match bounded("restore", blob.len(), || restore(&blob)) {
                Ok(view) => check_restored(&s, &rt, &view.kid, &p),
                Err(BrokerError::KeyAlreadyExists { .. } | BrokerError::KeyDeletedButRecoverable { .. }) => {}
                Err(e) => assert_blob_refused(&format!("{edit:?}"), &e),
            }
        },
    );
}

/// A restored key is served: every version in the payload is listed under its own valid id,
/// and the newest one wraps and unwraps (its material is the key its metadata describes).
fn check_restored(s: &Served, rt: &tokio::runtime::Runtime, kid: &str, payload: &serde_json::Value) {
    let id = tde_broker::model::ids::KeyId::parse(kid, SUFFIX)
        .unwrap_or_else(|e| panic!("restored kid {kid:?}: {e}"));
    let version = id.version.clone().unwrap_or_else(|| panic!("restored kid without a version: {kid}"));
    let versions = payload["versions"].as_array().map_or(0, Vec::len);
    let listed = s.app_broker.list_key_versions(
        &s.caller,
        &format!("https://dstvault.{SUFFIX}/keys/{}", id.name),
        0,
        "",
    );
    let listed = listed.unwrap_or_else(|e| panic!("list versions of {kid}: {e:?}"));
    assert_eq!(listed.0.len(), versions, "{kid}: versions listed");
    let alg = if payload["versions"][0]["meta"]["kty"] == "oct-HSM" { "A256KW" } else { "RSA-OAEP-256" };
    let dek = [7u8; 32];
    // The key's own rules, restored with it (its key_ops, enabled, nbf/exp), may refuse.
    let own_rule = |e: &tonic::Status| {
        let reason = tde_broker::grpc::status::reason(e);
        matches!(
            reason.as_deref(),
            Some("KeyOperationForbidden" | "KeyDisabled" | "KeyExpired" | "KeyNotYetValid")
        )
    };
    rt.block_on(async {
        let wrapped = match s.kv().wrap_key(common::crypto_req(kid, alg, &dek)).await {
            Err(e) if own_rule(&e) => return,
            other => {
                other
                    .unwrap_or_else(|e| panic!("wrap with restored {kid} ({version}): {e:?}"))
                    .into_inner()
                    .value
            }
        };
        let plain = match s.kv().unwrap_key(common::unwrap_req(kid, alg, &wrapped)).await {
            Err(e) if own_rule(&e) => return,
            other => other.unwrap_or_else(|e| panic!("unwrap with restored {kid}: {e:?}")).into_inner().value,
        };
        assert_eq!(plain, dek);
    });
}

// ---- gRPC request bodies over a real loopback broker --------------------------------------

type H2 = h2::client::SendRequest<tonic::codegen::Bytes>;

/// A gRPC frame: compression flag 0, big-endian length, message.
fn frame(message: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + message.len());
    v.push(0);
    v.extend_from_slice(&u32::try_from(message.len()).expect("a small message").to_be_bytes());
    v.extend_from_slice(message);
    v
}

/// Posts `body` to `path` as one gRPC request with the admin token; returns the gRPC status
/// (from the headers of a trailers-only answer, or the trailers), or the HTTP/2 error that
/// ended the stream or the connection.
async fn post(
    h2: &H2,
    addr: std::net::SocketAddr,
    token: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<tonic::Status, String> {
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .map_err(|e| e.to_string())?;
    let mut ready = h2.clone().ready().await.map_err(|e| format!("connection: {e}"))?;
    let (response, mut send) = ready.send_request(request, false).map_err(|e| format!("send: {e}"))?;
    send.send_data(tonic::codegen::Bytes::from(body), true).map_err(|e| format!("body: {e}"))?;
    let response = response.await.map_err(|e| format!("response: {e}"))?;
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return Ok(status);
    }
    let mut recv = response.into_body();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(|e| format!("data: {e}"))?;
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    let trailers = recv.trailers().await.map_err(|e| format!("trailers: {e}"))?;
    trailers.as_ref().and_then(tonic::Status::from_header_map).ok_or_else(|| "no gRPC status".to_string())
}

/// How a fuzzed body is made.
#[derive(Clone, Debug)]
enum Body {
    /// Any bytes, not framed.
    Raw(Vec<u8>),
    /// Any bytes in a well-formed frame.
    Framed(Vec<u8>),
    /// The RPC's valid message, edited, in a frame.
    Mutated(Vec<ByteEdit>),
    /// A frame header that says anything (flag, length) before a few bytes.
    Header(u8, u32, Vec<u8>),
    /// The valid message framed twice (a unary call takes one).
    Twice,
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        1 => any_bytes(256).prop_map(Body::Raw),
        1 => any_bytes(256).prop_map(Body::Framed),
        3 => byte_edits(3).prop_map(Body::Mutated),
        1 => (any::<u8>(), prop_oneof![any::<u32>(), Just(u32::MAX), Just(4 << 20), Just((4 << 20) - 1), 0u32..64], any_bytes(32))
            .prop_map(|(f, l, b)| Body::Header(f, l, b)),
        1 => Just(Body::Twice),
    ]
}

/// The compression flag a body's first frame header carries (its first byte).
fn body_flag(body: &Body) -> Option<u8> {
    match body {
        Body::Raw(b) => b.first().copied(),
        Body::Header(flag, _, _) => Some(*flag),
        Body::Framed(_) | Body::Mutated(_) | Body::Twice => Some(0),
    }
}

fn make_body(valid: &[u8], body: &Body) -> Vec<u8> {
    match body {
        Body::Raw(b) => b.clone(),
        Body::Framed(b) => frame(b),
        Body::Mutated(edits) => frame(&apply_bytes(valid, edits)),
        Body::Header(flag, len, b) => {
            let mut v = vec![*flag];
            v.extend_from_slice(&len.to_be_bytes());
            v.extend_from_slice(b);
            v
        }
        Body::Twice => [frame(valid), frame(valid)].concat(),
    }
}

#[test]
fn fuzz_grpc_request_bodies() {
    use prost::Message as _;
    use tonic::Code;
    let rt = rt();
    let s = rt.block_on(served());
    let kid = format!("https://srcvault.{SUFFIX}/keys/k");
    let (wrapped, blob) = rt.block_on(async {
        let req = proto::CreateKeyRequest {
            vault_name: "srcvault".into(),
            name: "k".into(),
            kty: "RSA".into(),
            key_size: 2048,
            ..Default::default()
        };
        s.kv().create_key(req).await.expect("key");
        let wrapped = s
            .kv()
            .wrap_key(common::crypto_req(&kid, "RSA-OAEP-256", &[7; 32]))
            .await
            .expect("wrap")
            .into_inner()
            .value;
        let blob = s
            .kv()
            .backup_key(proto::BackupKeyRequest { key_id: kid.clone() })
            .await
            .expect("backup")
            .into_inner()
            .blob;
        (wrapped, blob)
    });
    let pem = pem_of("PRIVATE KEY", shared_pkcs8());
    // (path, a valid message of the RPC)
    let rpcs: Vec<(&str, Vec<u8>)> = vec![
        ("/tdebroker.v1.KeyVault/GetKey", proto::GetKeyRequest { key_id: kid.clone() }.encode_to_vec()),
        (
            "/tdebroker.v1.KeyVault/WrapKey",
            common::crypto_req(&kid, "RSA-OAEP-256", &[7; 32]).encode_to_vec(),
        ),
        (
            "/tdebroker.v1.KeyVault/UnwrapKey",
            common::unwrap_req(&kid, "RSA-OAEP-256", &wrapped).encode_to_vec(),
        ),
        (
            "/tdebroker.v1.KeyVault/RestoreKey",
            proto::RestoreKeyRequest { vault_name: "dstvault".into(), blob }.encode_to_vec(),
        ),
        (
            "/tdebroker.v1.KeyVault/ImportKey",
            proto::ImportKeyRequest {
                vault_name: "dstvault".into(),
                name: "imported".into(),
                pem,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/tdebroker.v1.Vaults/CreateVault",
            proto::CreateVaultRequest { name: "fuzzvault".into(), ..Default::default() }.encode_to_vec(),
        ),
        ("/grpc.health.v1.Health/Check", Vec::new()),
    ];
    let h2 = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(s.addr).await.expect("connect");
        let (h2, conn) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
        tokio::spawn(conn);
        h2
    });
    // Each valid message is served (or refused for what it says, not for how it is encoded).
    for (path, valid) in &rpcs {
        let status = rt.block_on(post(&h2, s.addr, &s.token, path, frame(valid))).expect("an answer");
        assert_ne!(tde_broker::grpc::status::reason(&status).as_deref(), Some("MalformedRequest"), "{path}");
    }
    let n = cases(1000, 4);
    fuzz("grpc bodies", n, (0..rpcs.len(), body()), |(i, b)| {
        let (path, valid) = &rpcs[i];
        let body = make_body(valid, &b);
        let len = body.len();
        // tonic reserves the length a frame header announces (up to the 4 MiB message limit)
        // before the bytes arrive: a 5-byte body can cost one 4 MiB allocation (address space,
        // untouched until written). The bound is that, never more.
        let announced = body.get(1..5).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
        let reserved = if announced <= tde_broker::server::MAX_MESSAGE_BYTES { announced } else { 0 };
        let bound = alloc_bound(len) + reserved;
        let (status, largest) = alloc::measure(|| rt.block_on(post(&h2, s.addr, &s.token, path, body)));
        assert!(largest <= bound, "{path} {b:?}: one allocation of {largest} bytes (bound {bound})");
        let status = status.unwrap_or_else(|e| panic!("{path} {b:?}: no gRPC answer: {e}"));
        let reason = tde_broker::grpc::status::reason(&status);
        // gRPC's compression rules: a compressed-flag without a grpc-encoding MUST fail with
        // INTERNAL; the broker names it with its reason.
        if status.code() == Code::Internal {
            assert_eq!(reason.as_deref(), Some("CompressionNotSupported"), "{path} {b:?}: {status:?}");
            assert!(body_flag(&b).is_some_and(|f| f != 0), "{path} {b:?}: {status:?}");
            return;
        }
        assert!(
            matches!(
                status.code(),
                Code::Ok
                    | Code::InvalidArgument
                    | Code::NotFound
                    | Code::AlreadyExists
                    | Code::PermissionDenied
                    | Code::FailedPrecondition
                    | Code::ResourceExhausted
            ),
            "{path} {b:?}: {:?} {reason:?} {}",
            status.code(),
            status.message()
        );
        if status.code() != Code::Ok {
            assert!(reason.is_some(), "{path} {b:?}: a refusal without ErrorInfo: {status:?}");
        }
    });
    // The broker still serves a normal client.
    let key =
        rt.block_on(s.kv().get_key(proto::GetKeyRequest { key_id: kid.clone() })).expect("served afterwards");
    assert!(key.into_inner().key.is_some());
}

// ---- Regressions: defects this fuzzing found ----------------------------------------------

/// A served broker, a key `k` (two RSA versions) in `srcvault`, and its backup payload.
fn backed_up(rt: &tokio::runtime::Runtime) -> (Served, serde_json::Value) {
    let s = rt.block_on(served());
    let blob = rt.block_on(async {
        for _ in 0..2 {
            let req = proto::CreateKeyRequest {
                vault_name: "srcvault".into(),
                name: "k".into(),
                kty: "RSA".into(),
                key_size: 2048,
                ..Default::default()
            };
            s.kv().create_key(req).await.expect("key");
        }
        let req = proto::BackupKeyRequest { key_id: format!("https://srcvault.{SUFFIX}/keys/k") };
        s.kv().backup_key(req).await.expect("backup").into_inner().blob
    });
    let json = s.app_broker.sealer().unseal(BACKUP_AAD, &blob[BACKUP_MAGIC.len()..]).expect("our blob");
    (s, serde_json::from_slice(&json).expect("payload"))
}

/// Restores `payload` sealed as the broker seals a backup.
fn restore_payload(
    rt: &tokio::runtime::Runtime,
    s: &Served,
    payload: &serde_json::Value,
) -> Result<tde_broker::broker::keys::KeyView, BrokerError> {
    let mut blob = BACKUP_MAGIC.to_vec();
    blob.extend(
        s.app_broker.sealer().seal(BACKUP_AAD, &serde_json::to_vec(payload).expect("JSON")).expect("seal"),
    );
    rt.block_on(s.app_broker.restore_key(&s.caller, "dstvault", &blob))
}

/// Defect: a backup listing one version twice reached the store, whose constraint violation was
/// answered UNAVAILABLE `ServiceUnavailable` (retry) instead of a refusal of the blob.
#[test]
fn a_backup_listing_a_version_twice_is_refused_not_reported_as_store_unavailable() {
    let rt = rt();
    let (s, mut payload) = backed_up(&rt);
    let first = payload["versions"][0].clone();
    payload["versions"].as_array_mut().expect("versions").push(first);
    let e = restore_payload(&rt, &s, &payload).expect_err("refused");
    assert!(matches!(e, BrokerError::BadParameter { .. }), "{e:?}");
    assert!(e.to_string().contains("backup blob is invalid"), "{e}");
}

/// Defect: a version id that is not 32 lowercase hex characters was restored, giving a key
/// version no key identifier can name.
#[test]
fn a_backup_with_a_version_id_that_is_not_a_key_version_is_refused() {
    let rt = rt();
    let (s, mut payload) = backed_up(&rt);
    for bad in ["", "x", "../../secrets/s", "0698C2156C1A4E1DA5B6BAB6F6422FD6"] {
        payload["versions"][1]["meta"]["version"] = bad.into();
        let e = restore_payload(&rt, &s, &payload).expect_err("refused");
        assert!(matches!(e, BrokerError::BadParameter { .. }), "{bad:?}: {e:?}");
    }
}

/// Defect: material that is not the key its metadata describes (an AES key of the wrong size,
/// another RSA key, bytes that are no key) was restored; every later operation on the key then
/// failed with "The key material is invalid", as if the caller's request were at fault.
#[test]
fn a_backup_whose_material_is_not_the_key_its_metadata_describes_is_refused() {
    let rt = rt();
    let (s, payload) = backed_up(&rt);
    let other = crypto::generate_rsa_pkcs8(2048).expect("another key");
    for material in [STANDARD.encode([0u8; 32]), STANDARD.encode(&other[..]), STANDARD.encode(b"no key")] {
        let mut p = payload.clone();
        p["versions"][0]["material"] = material.into();
        let e = restore_payload(&rt, &s, &p).expect_err("refused");
        assert!(matches!(e, BrokerError::BadParameter { .. }), "{e:?}");
    }
    // The payload as made restores, and its key works.
    let view = restore_payload(&rt, &s, &payload).expect("restores");
    check_restored(&s, &rt, &view.kid, &payload);
}

/// The allocation bound the targets assert is live: an allocation past it fails the check, and
/// one under it passes.
#[test]
fn the_allocation_bound_fails_a_target_that_allocates_past_it() {
    let small = bounded("small", 10, || vec![1u8; 1000].len());
    assert_eq!(small, 1000);
    let big = std::panic::catch_unwind(|| bounded("big", 10, || vec![1u8; alloc_bound(10) + 1].len()));
    let message = big.expect_err("past the bound");
    let text = message.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(text.contains("one allocation of"), "{text}");
}

// ---- Rotation policies --------------------------------------------------------------------

/// ISO 8601 durations and rotation policies as a request gives them: never a panic; a duration
/// read is a `P…` text of a non-negative length; a policy's error text quotes at most a bounded,
/// printable piece of the input.
#[test]
fn fuzz_rotation_policy_durations() {
    use tde_broker::model::rotation::{IsoDuration, KeyRotationPolicy, LifetimeActionSpec};
    let n = cases(2000, 1);
    let check = |s: &str| {
        if let Ok(d) = IsoDuration::parse(s) {
            assert!(d.as_str().starts_with('P') && d.seconds() >= 0, "{s:?}");
        }
    };
    fuzz("duration (arbitrary)", n, any_text(40), |s| check(&s));
    fuzz("duration (shaped)", n, "P([0-9]{0,11}[YMWD]){0,4}(T([0-9]{0,11}[HMS]){0,3})?", |s| check(&s));
    let text = prop_oneof![any_text(24), "P[0-9]{1,3}[DMYW]", Just(String::new())];
    let action = (
        prop_oneof![any_text(10), Just("Rotate".to_string()), Just("Notify".to_string())],
        text.clone(),
        text.clone(),
    );
    fuzz("rotation policy", n, (text, prop::collection::vec(action, 0..4)), |(expiry, actions)| {
        let specs: Vec<LifetimeActionSpec> = actions
            .into_iter()
            .map(|(action, after, before)| LifetimeActionSpec {
                action,
                time_after_create: after,
                time_before_expiry: before,
            })
            .collect();
        if let Err(e) = KeyRotationPolicy::from_spec(&expiry, &specs) {
            assert!(e.to_string().chars().count() < 600, "{e}");
        }
    });
}
