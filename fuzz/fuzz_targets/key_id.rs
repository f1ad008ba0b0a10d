//! Key identifiers and names: `tests/fuzz/checks.rs` `check_key_id`, `check_names`.
#![no_main]

#[path = "../../tests/fuzz/alloc.rs"]
mod alloc;
#[path = "../../tests/fuzz/checks.rs"]
mod checks;

#[global_allocator]
static COUNTING: alloc::Counting = alloc::Counting;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    checks::check_names(&text);
    checks::check_key_id(&text);
    // The same bytes as the path of a URI on the right host.
    checks::check_key_id(&format!("https://vault1.{}/{text}", checks::SUFFIX));
});
