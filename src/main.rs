//! `tde-broker`: a checklist — allocator, logging, crypto provider, arguments, run.
fn main() -> std::process::ExitCode {
    cap_malloc_arenas();
    tde_broker::telemetry::init();
    tde_broker::cli::main()
}

/// glibc gives each thread that allocates under contention an arena of its own, up to eight per
/// core, and memory freed into one arena is not reused by threads allocating from another. The
/// broker's RSA work runs on a pool of blocking threads, so with 10,000 keys and 100,000 cached
/// DEKs the extra arenas held about 15 MiB of free but unreturned memory (benches/footprint.rs,
/// 130 → 114 MiB). One arena per core keeps the same throughput (per-thread caches still serve
/// small allocations without a lock) without that waste. `MALLOC_ARENA_MAX` in the environment
/// still wins: it is only set here when absent.
fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only changes a malloc tunable; it runs before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}
