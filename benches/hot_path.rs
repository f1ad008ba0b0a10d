//! The hot path, piece by piece (docs/PERFORMANCE.md): the data-plane policy decision, an unwrap
//! through an in-process broker (cache hit, and with the caches off), RSA-OAEP-256 decryption
//! alone, and token validation. Numbers only, no thresholds: compare them with `openssl speed
//! rsa2048` and `tde-broker loadtest` on the same machine.
//!
//! `cargo bench --bench hot_path` (append `-- rsa` to run the matching ones only).

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tde_broker::auth::Plane;
use tde_broker::broker::keys::{CryptoRequest, NewAttributes, NewKey, NewMaterial};
use tde_broker::broker::vaults::VaultSpec;
use tde_broker::config::Config;
use tde_broker::crypto::{Algorithm, RsaPrivateKey, generate_rsa_pkcs8, random_bytes};
use tde_broker::model::{Caller, CallerDescription, CryptoOp, KeyPermission, KeyType, NetworkAcls, Vault};
use tde_broker::policy::data::{DataRequest, authorize};
use tde_broker::server::App;

const ALGORITHM: &str = "RSA-OAEP-256";
const VAULT: &str = "bench-kv";

/// `authorize` on an access-policy vault with 50 policies; the caller holds the 37th.
fn policy_decision(c: &mut Criterion) {
    use KeyPermission::*;
    let ids: Vec<String> = (0..50).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let access_policies: BTreeMap<String, BTreeSet<KeyPermission>> =
        ids.iter().map(|id| (id.clone(), [Get, List, WrapKey, UnwrapKey].into_iter().collect())).collect();
    let vault = Vault {
        name: VAULT.to_string(),
        retention_days: 90,
        purge_protection: true,
        rbac: false,
        network_acls: NetworkAcls::default(),
        public_network_access: true,
        access_policies,
        private_endpoints: vec![],
        created: 0,
    };
    let caller = CallerDescription {
        app_id: uuid::Uuid::new_v4().to_string(),
        object_id: ids[36].clone(),
        issuer: "https://sts.windows.net/00000000-0000-0000-0000-000000000000/".to_string(),
    };
    let resource = format!(
        "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/{VAULT}/keys/tde"
    );
    let request =
        DataRequest { caller: &caller, permission: UnwrapKey, resource: &resource, location: "westus" };
    c.bench_function("policy/authorize/50-access-policies", |b| {
        b.iter(|| authorize(black_box(&vault), &[], black_box(&request)))
    });
}

/// A broker opened in a temporary data directory, with one RSA-2048 key the admin may use and
/// a DEK wrapped under it.
struct InProcess {
    runtime: tokio::runtime::Runtime,
    app: App,
    token: String,
    caller: Caller,
    kid: String,
    wrapped: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl InProcess {
    fn open(caches: bool) -> Self {
        let dir = tempfile::tempdir().expect("temporary data directory");
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        let mut config = Config::for_data_dir(dir.path());
        config.caches.enabled = caches;
        let app = runtime.block_on(App::open(config)).expect("broker opens");
        let token = app.admin_token().expect("admin token");
        let caller = app.auth.validate(&token, Plane::Data).expect("admin token validates");
        let broker = app.broker.clone();
        let (kid, wrapped) = runtime.block_on(async {
            let spec =
                VaultSpec { name: VAULT.to_string(), public_network_access: true, ..Default::default() };
            broker.create_vault(&caller, spec).await.expect("vault");
            broker
                .set_access_policy(&caller, VAULT, &caller.object_id, &["all".to_string()])
                .await
                .expect("access policy");
            let key = broker
                .add_key_version(
                    &caller,
                    NewKey {
                        vault: VAULT.to_string(),
                        name: "tde".to_string(),
                        material: NewMaterial::Generate { kty: KeyType::Rsa, size: 2048, curve: None },
                        key_ops: vec![],
                        attributes: NewAttributes::default(),
                        tags: BTreeMap::new(),
                    },
                )
                .await
                .expect("key");
            let wrapped = broker
                .crypto(&caller, crypto_request(CryptoOp::WrapKey, &key.kid, random_bytes(32)))
                .await
                .expect("wrap");
            (key.kid, wrapped.value.to_vec())
        });
        InProcess { runtime, app, token, caller, kid, wrapped, _dir: dir }
    }

    /// One UnwrapKey of the same ciphertext, as the gRPC handler calls it.
    fn unwrap(&self) -> usize {
        let request = crypto_request(CryptoOp::UnwrapKey, &self.kid, self.wrapped.clone());
        let result = self.runtime.block_on(self.app.broker.crypto(&self.caller, request)).expect("unwrap");
        result.value.len()
    }
}

fn crypto_request(op: CryptoOp, kid: &str, value: Vec<u8>) -> CryptoRequest {
    CryptoRequest {
        op,
        key_id: kid.to_string(),
        algorithm: ALGORITHM.to_string(),
        value,
        iv: vec![],
        aad: vec![],
        tag: vec![],
    }
}

/// `Broker::crypto` UnwrapKey in process (no gRPC), the same ciphertext every time; with the
/// caches on that is a cache hit after the first call. Includes a `block_on` per call.
fn broker_unwrap(c: &mut Criterion) {
    let cached = InProcess::open(true);
    cached.unwrap();
    c.bench_function("broker/unwrap/rsa2048/cache-hit", |b| b.iter(|| black_box(cached.unwrap())));
    drop(cached);
    let uncached = InProcess::open(false);
    c.bench_function("broker/unwrap/rsa2048/caches-off", |b| b.iter(|| black_box(uncached.unwrap())));
}

/// `RsaPrivateKey::decrypt` RSA-OAEP-256 alone: the cost of every unwrap-cache miss.
fn rsa_decrypt(c: &mut Criterion) {
    for bits in [2048, 3072] {
        let der = generate_rsa_pkcs8(bits).expect("RSA key");
        let key = RsaPrivateKey::from_pkcs8(&der).expect("PKCS#8");
        let wrapped = key.encrypt(Algorithm::RsaOaep256, &random_bytes(32)).expect("encrypt");
        c.bench_function(&format!("rsa/oaep256-decrypt/{bits}"), |b| {
            b.iter(|| key.decrypt(Algorithm::RsaOaep256, black_box(&wrapped)).expect("decrypt"))
        });
    }
}

/// `Authenticator::validate` of the admin token for the data plane (RS256 verify, claims, the
/// principal still existing).
fn token_validation(c: &mut Criterion) {
    let broker = InProcess::open(true);
    c.bench_function("auth/validate/data-plane", |b| {
        b.iter(|| broker.app.auth.validate(black_box(&broker.token), Plane::Data).expect("valid"))
    });
}

criterion_group! {
    name = hot_path;
    // Short runs: a 2-core machine, and these are for comparison, not for gating.
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = policy_decision, broker_unwrap, rsa_decrypt, token_validation
}
criterion_main!(hot_path);
