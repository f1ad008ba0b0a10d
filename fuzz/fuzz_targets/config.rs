//! The TOML configuration file through `Config::resolve`.
#![no_main]

#[path = "../../tests/fuzz/alloc.rs"]
mod alloc;
#[path = "../../tests/fuzz/checks.rs"]
mod checks;

use std::path::PathBuf;
use std::sync::OnceLock;

#[global_allocator]
static COUNTING: alloc::Counting = alloc::Counting;

fn paths() -> &'static (PathBuf, PathBuf) {
    static PATHS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    PATHS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tde-broker-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        (dir.join("config.toml"), dir.join("data"))
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (path, data_dir) = paths();
    let _ = checks::check_config(path, data_dir, &String::from_utf8_lossy(data));
});
