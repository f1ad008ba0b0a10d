//! Compact JWS decoding: `check_jwt` on the input as a token, and `check_signed_jwt` with the
//! input split into a header and claims that are then correctly signed.
#![no_main]

#[path = "../../tests/fuzz/alloc.rs"]
mod alloc;
#[path = "../../tests/fuzz/checks.rs"]
mod checks;

use std::sync::OnceLock;

#[global_allocator]
static COUNTING: alloc::Counting = alloc::Counting;

fn fixture() -> &'static checks::JwtFixture {
    static FX: OnceLock<checks::JwtFixture> = OnceLock::new();
    FX.get_or_init(checks::JwtFixture::new)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    checks::check_jwt(fx, &String::from_utf8_lossy(data));
    // First byte: where the header ends.
    if let Some((&cut, rest)) = data.split_first() {
        let cut = usize::from(cut).min(rest.len());
        let (header, claims) = rest.split_at(cut);
        checks::check_signed_jwt(fx, header, claims);
    }
});
