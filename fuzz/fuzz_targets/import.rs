//! Key import: the input as PKCS#8 DER, as PEM text and as a JWK.
#![no_main]

#[path = "../../tests/fuzz/alloc.rs"]
mod alloc;
#[path = "../../tests/fuzz/checks.rs"]
mod checks;

#[global_allocator]
static COUNTING: alloc::Counting = alloc::Counting;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::check_pkcs8(data);
    let text = String::from_utf8_lossy(data);
    checks::check_pem(&text);
    checks::check_jwk(&text);
});
