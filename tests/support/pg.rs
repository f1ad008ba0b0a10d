//! A throwaway PostgreSQL for tests, from the distribution's own binaries: `initdb` on a temporary
//! directory, `pg_ctl start` on a free loopback port with a unix socket directory of its own, and
//! `pg_ctl stop` plus removal of the directory when the [`PgServer`] is dropped.
//!
//! The binaries are looked up on `PATH`, then under `/usr/lib/postgresql/*/bin` (Debian's
//! layout, newest version first). `initdb` refuses to run as root: as root the cluster is made and
//! run by the `postgres` user (created by Debian's `postgresql` package) through `runuser`, and
//! the temporary directory is handed to that user; as any other user it runs as that user.
//!
//! Used by the integration tests (`tests/common/mod.rs`) and by the store's unit tests
//! (`src/store/postgres.rs`), both through `#[path]`: it needs nothing but `std` and `tempfile`.
//!
//! ```ignore
//! let server = pg::PgServer::shared();      // one cluster per test process, while it is used
//! let db = server.create_database();        // a fresh, empty database of its own
//! let url = db.url();                       // postgres://postgres@127.0.0.1:PORT/NAME
//! ```
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// What to do when PostgreSQL's binaries are missing.
pub const INSTALL_HINT: &str = "install postgresql (apt-get install postgresql)";

/// The superuser of every test cluster (trust authentication, loopback only).
pub const SUPERUSER: &str = "postgres";

/// A running PostgreSQL cluster in a temporary directory; stopped and removed on drop.
pub struct PgServer {
    bin: PathBuf,
    /// Runs the server's own commands (`initdb`, `pg_ctl`) as this user (through `runuser`)
    /// when the tests run as root.
    run_as: Option<String>,
    dir: tempfile::TempDir,
    port: u16,
    next_db: AtomicU64,
}

/// A database of its own on a [`PgServer`]; keeps the server running while it lives.
pub struct PgDatabase {
    server: Arc<PgServer>,
    name: String,
}

impl PgDatabase {
    /// The connection URL: `postgres://postgres@127.0.0.1:PORT/NAME`.
    pub fn url(&self) -> String {
        self.server.url(&self.name)
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server it lives on.
    pub fn server(&self) -> &Arc<PgServer> {
        &self.server
    }
}

static SHARED: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());

impl PgServer {
    /// The cluster this test process shares, started when no test holds it: tests that run at
    /// the same time share one cluster (each in a database of its own), and it stops when the
    /// last of them drops it. Panics, saying what to install, when PostgreSQL is missing.
    pub fn shared() -> Arc<PgServer> {
        let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(server) = shared.upgrade() {
            return server;
        }
        let server = Arc::new(PgServer::start());
        *shared = Arc::downgrade(&server);
        server
    }

    /// A cluster of its own (for tests that stop or restart it). Panics, saying what to
    /// install, when PostgreSQL is missing, and with PostgreSQL's log when it does not start.
    pub fn start() -> PgServer {
        let bin = find_bin_dir().unwrap_or_else(|| {
            panic!("PostgreSQL's initdb and pg_ctl were not found on PATH or under /usr/lib/postgresql/*/bin: {INSTALL_HINT}")
        });
        let run_as = if is_root() { Some(SUPERUSER.to_string()) } else { None };
        let dir = tempfile::Builder::new().prefix("tde-broker-pg-").tempdir().expect("temporary directory");
        if let Some(user) = &run_as {
            let uid = user_id(user).unwrap_or_else(|| {
                panic!("running as root, the test cluster runs as the user {user:?}, which does not exist: {INSTALL_HINT}")
            });
            std::os::unix::fs::chown(dir.path(), Some(uid.0), Some(uid.1))
                .expect("hand the cluster's directory to its user");
        }
        let mut server = PgServer { bin, run_as, dir, port: 0, next_db: AtomicU64::new(1) };
        server.init();
        // A free port can be taken by someone else before the server binds it: a few tries.
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.try_start() {
                Ok(()) => return server,
                Err(log) => last = log,
            }
        }
        panic!("PostgreSQL did not start:\n{last}");
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The directory that holds the unix socket (`host=` for libpq).
    pub fn socket_directory(&self) -> PathBuf {
        self.socket_dir()
    }

    /// The loopback TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{name}", self.port)
    }

    /// A command of the server's binaries, as the user that owns the cluster.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn init(&self) {
        std::fs::create_dir(self.socket_dir()).expect("socket directory");
        if let Some((uid, gid)) = self.run_as.as_deref().and_then(user_id) {
            std::os::unix::fs::chown(self.socket_dir(), Some(uid), Some(gid))
                .expect("socket directory owner");
        }
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data())
            .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running initdb: {e}: {INSTALL_HINT}"));
        check(&out, "initdb");
    }

    /// Starts the server on `self.port`; on failure returns its log.
    fn try_start(&self) -> Result<(), String> {
        // Loopback only; no durability work (the tests never crash the server's machine); room
        // for the connection pools of many stores at once.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300 -c shared_buffers=16MB",
            self.port,
            self.socket_dir().display()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log())
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running pg_ctl: {e}: {INSTALL_HINT}"));
        if out.status.success() && self.is_ready() {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        Err(format!(
            "{}\n{}\n{log}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Whether the server accepts connections (`pg_isready`, retried for a while).
    fn is_ready(&self) -> bool {
        for _ in 0..100 {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", SUPERUSER, "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Stops the server (fast shutdown: open connections are ended). What was committed stays.
    pub fn stop(&self) {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "fast", "stop"])
            .stdin(Stdio::null())
            .output()
            .expect("running pg_ctl stop");
        check(&out, "pg_ctl stop");
    }

    /// Starts the server again after [`PgServer::stop`], on the same port.
    pub fn restart(&self) {
        if let Err(log) = self.try_start() {
            panic!("PostgreSQL did not start again:\n{log}");
        }
    }

    /// A new, empty database of its own.
    pub fn create_database(self: &Arc<Self>) -> PgDatabase {
        let n = self.next_db.fetch_add(1, Ordering::Relaxed);
        let name = format!("test_{}_{n}", std::process::id());
        let out = Command::new(self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", SUPERUSER, &name])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running createdb: {e}: {INSTALL_HINT}"));
        check(&out, "createdb");
        PgDatabase { server: self.clone(), name }
    }

    /// Runs one SQL statement as the superuser in database `db` (`psql -c`), returning its
    /// output (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", SUPERUSER, "-d", db])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running psql: {e}: {INSTALL_HINT}"));
        check(&out, "psql");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Immediate: nothing needs to survive, and open connections must not delay the stop.
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "immediate", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // The temporary directory is removed when `dir` drops (root may remove the files the
        // `postgres` user made; a normal user made them itself).
    }
}

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The directory of `initdb` and `pg_ctl`: on `PATH` (resolving a symbolic link, so that the
/// server's other binaries are found beside it), else the newest `/usr/lib/postgresql/*/bin`.
fn find_bin_dir() -> Option<PathBuf> {
    let has_all = |dir: &Path| {
        ["initdb", "pg_ctl", "pg_isready", "createdb", "psql"].iter().all(|b| dir.join(b).is_file())
    };
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.is_file() {
                let real = std::fs::canonicalize(&initdb).ok()?;
                if let Some(parent) = real.parent()
                    && has_all(parent)
                {
                    return Some(parent.to_path_buf());
                }
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_all(bin))
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The uid and gid of `user`, from `id`.
fn user_id(user: &str) -> Option<(u32, u32)> {
    let field = |flag: &str| -> Option<u32> {
        let out = Command::new("id").arg(flag).arg(user).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((field("-u")?, field("-g")?))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
