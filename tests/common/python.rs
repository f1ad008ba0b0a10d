//! Python virtualenvs for tests that check the broker against independent Python tools (PyYAML,
//! kubernetes-validate, grpcio, prometheus-client).
//!
//! A virtualenv lives at `target/<name>` (under `CARGO_TARGET_DIR` when that is set), is created
//! and filled from PyPI on the first run and reused after. Nothing is skipped: without `python3`
//! and its `venv` module the tests fail and say what to install.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

pub const INSTALL_PYTHON: &str = "install python3 and python3-venv (apt-get install python3 python3-venv)";

/// The repository root.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<name>` (under `CARGO_TARGET_DIR` when that is set, relative to the repository root
/// when that is relative).
pub fn venv_dir(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    let target = if target.is_absolute() { target } else { root().join(target) };
    target.join(name)
}

/// A Python interpreter (or a script of a virtualenv) unaffected by the caller's Python settings,
/// leaving no `__pycache__`.
pub fn python_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    command.env("PYTHONDONTWRITEBYTECODE", "1").env_remove("PYTHONPATH").env_remove("PYTHONHOME");
    command
}

/// Output as trimmed text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

fn succeeds(command: &mut Command) -> bool {
    command.output().is_ok_and(|o| o.status.success())
}

/// The interpreter of the virtualenv `target/<name>` in which `import <imports>` succeeds (e.g.
/// `"yaml, kubernetes_validate"`), creating the virtualenv and `pip install`ing `packages` from
/// PyPI when that import fails. Panics, saying what to install, when python3 or its `venv`
/// module is missing, and when the installation fails.
///
/// Made once per test binary and name: the tests of a binary that ask for the same virtualenv
/// wait for the first one to make it. Across processes (two `cargo test` runs at once, which
/// cargo does not serialize while tests run) the making is guarded by an exclusive `flock` on
/// `target/<name>.lock`.
pub fn python_venv(name: &str, packages: &[&str], imports: &str) -> PathBuf {
    static VENVS: Mutex<BTreeMap<String, Arc<OnceLock<PathBuf>>>> = Mutex::new(BTreeMap::new());
    let once = {
        // A test that panicked while holding the map left nothing half-done in it.
        let mut venvs = VENVS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        venvs.entry(name.to_string()).or_default().clone()
    };
    once.get_or_init(|| make_venv(name, packages, imports)).clone()
}

fn make_venv(name: &str, packages: &[&str], imports: &str) -> PathBuf {
    let venv = venv_dir(name);
    let python = venv.join("bin").join("python");
    let ready = |python: &Path| succeeds(python_command(python).args(["-c", &format!("import {imports}")]));
    if ready(&python) {
        return python;
    }
    let version = python_command("python3").arg("--version").output().unwrap_or_else(|e| {
        panic!("cannot run python3 to make the virtualenv {} ({e}): {INSTALL_PYTHON}", venv.display())
    });
    assert!(
        version.status.success(),
        "python3 --version failed ({}): {INSTALL_PYTHON}",
        text(&version.stderr)
    );
    let _lock = FileLock::acquire(&venv_dir(&format!("{name}.lock")));
    // Another process may have made it while this one waited for the lock.
    if ready(&python) {
        return python;
    }
    // A virtualenv whose interpreter does not start (half-made, or its python3 is gone) is made
    // again from scratch.
    if !succeeds(python_command(&python).args(["-c", "pass"])) {
        let out = python_command("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 -m venv ({e}): {INSTALL_PYTHON}"));
        assert!(
            out.status.success(),
            "python3 -m venv {} failed: {}\n{INSTALL_PYTHON}",
            venv.display(),
            text(&out.stderr)
        );
    }
    let out = python_command(&python)
        .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
        .args(packages)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} -m pip ({e}): {INSTALL_PYTHON}", python.display()));
    assert!(
        out.status.success(),
        "pip install {} into {} failed (it needs PyPI): {}\n{}",
        packages.join(" "),
        venv.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        ready(&python),
        "{} were installed into {} but `import {imports}` fails",
        packages.join(", "),
        venv.display()
    );
    python
}

/// An exclusive lock (`flock`) on a file, held for as long as this value lives. The kernel lets
/// go when the file is closed: when this is dropped, and also when the test process dies, so a
/// killed run leaves no stale lock.
pub(crate) struct FileLock(
    #[expect(dead_code, reason = "held, never read: the lock lasts as long as the file is open")]
    std::fs::File,
);

impl FileLock {
    pub(crate) fn acquire(path: &Path) -> FileLock {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("cannot open the lock file {}: {e}", path.display()));
        file.lock().unwrap_or_else(|e| panic!("cannot lock {}: {e}", path.display()));
        FileLock(file)
    }
}
