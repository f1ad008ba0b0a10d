//! Ciphertext framing: the input as an RSA ciphertext (three algorithms), an AES key wrap, an
//! AES-GCM IV/tag/ciphertext, and a sealed blob.
#![no_main]

#[path = "../../tests/fuzz/alloc.rs"]
mod alloc;
#[path = "../../tests/fuzz/checks.rs"]
mod checks;

use std::sync::OnceLock;
use tde_broker::crypto::{Algorithm, RsaPrivateKey, Sealer};

#[global_allocator]
static COUNTING: alloc::Counting = alloc::Counting;

struct Keys {
    rsa: RsaPrivateKey,
    sealer: Sealer,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let der = tde_broker::crypto::generate_rsa_pkcs8(2048).expect("an RSA key");
        Keys {
            rsa: RsaPrivateKey::from_pkcs8(&der).expect("the key"),
            sealer: Sealer::new(&[7u8; 32]).expect("a sealer"),
        }
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let k = keys();
    let Some((&selector, rest)) = data.split_first() else { return };
    let alg = Algorithm::ALL[usize::from(selector) % Algorithm::ALL.len()];
    checks::check_rsa_decrypt(&k.rsa, alg, rest, None);
    // The AES key's length comes from the input too (0..=40 bytes).
    let key_len = usize::from(selector >> 2).min(40).min(rest.len());
    let (key, rest) = rest.split_at(key_len);
    checks::check_aes_kw(key, rest, None);
    let iv_len = rest.first().map_or(0, |b| usize::from(b % 16)).min(rest.len());
    let (iv, rest) = rest.split_at(iv_len);
    let tag_len = 16.min(rest.len());
    let (tag, ct) = rest.split_at(tag_len);
    checks::check_aes_gcm(key, iv, b"aad", ct, tag, None);
    checks::check_unseal(&k.sealer, b"aad", data, None);
});
