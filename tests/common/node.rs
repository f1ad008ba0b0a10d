//! The Azure SDK for JavaScript, installed once from npm into `target/node-sdk` (under
//! `CARGO_TARGET_DIR` when that is set) at the exact versions of `tests/sdk/package-lock.json`,
//! and reused after. Nothing is skipped: without `node` and `npm` the tests fail and say what to
//! install.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::python::{FileLock, text, venv_dir};

pub const INSTALL_NODE: &str = "install nodejs and npm (apt-get install nodejs npm)";

/// `tests/sdk`: the package manifest, its lock and the scripts.
pub fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("sdk")
}

/// The `node_modules` folder holding `tests/sdk/package-lock.json`'s packages, installing them
/// with `npm ci` when the folder does not hold that lock yet. Made once per test binary; across
/// processes guarded by an exclusive `flock` on `target/node-sdk.lock`. Panics, saying what to
/// install, when node or npm is missing, and when the installation fails.
pub fn node_modules() -> PathBuf {
    static MODULES: OnceLock<PathBuf> = OnceLock::new();
    MODULES.get_or_init(install).clone()
}

fn install() -> PathBuf {
    let dir = venv_dir("node-sdk");
    let lock = std::fs::read(sdk_dir().join("package-lock.json")).expect("tests/sdk/package-lock.json");
    // What `npm ci` installed last, kept beside node_modules: the folder is current when it
    // matches the repository's lock.
    let installed = dir.join("installed-package-lock.json");
    let current = || std::fs::read(&installed).is_ok_and(|l| l == lock);
    for tool in ["node", "npm"] {
        let out = Command::new(tool)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool} ({e}): {INSTALL_NODE}"));
        assert!(out.status.success(), "{tool} --version failed ({}): {INSTALL_NODE}", text(&out.stderr));
    }
    if current() {
        return dir.join("node_modules");
    }
    let _lock = FileLock::acquire(&venv_dir("node-sdk.lock"));
    if current() {
        return dir.join("node_modules");
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let _ = std::fs::remove_file(&installed);
    for file in ["package.json", "package-lock.json"] {
        std::fs::copy(sdk_dir().join(file), dir.join(file))
            .unwrap_or_else(|e| panic!("copy tests/sdk/{file} to {}: {e}", dir.display()));
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"])
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run npm ({e}): {INSTALL_NODE}"));
    assert!(
        out.status.success(),
        "npm ci in {} failed (it needs the npm registry): {}\n{}",
        dir.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
    std::fs::write(&installed, &lock).unwrap_or_else(|e| panic!("{}: {e}", installed.display()));
    dir.join("node_modules")
}
