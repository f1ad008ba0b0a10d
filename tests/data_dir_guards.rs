//! What start-up refuses about a data directory (issue 17), one test per defect: a store that is
//! gone or another directory's is not replaced by an empty one, a damaged store is refused (and a
//! commit that meets damage says so), a second broker is kept out, a lost master key is not
//! replaced, and the broker's files are private.

mod common;

use std::io::Write as _;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use tde_broker::config::{AuditLog, ClockKind, Config, StoreCheck};
use tde_broker::grpc::proto;
use tde_broker::server::{ADMIN_TOKEN_FILE, App, DB_FILE, MASTER_KEY_FILE, StartError};
use tde_broker::store::datadir::{LOCK_FILE, STORE_ID_FILE};
use tonic::Code;

/// A data directory that has held a store: a broker ran on it, made a vault, and stopped. Its
/// store's write-ahead log is checkpointed into the database file.
async fn used_data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let b = start_in(dir.path(), ClockKind::Manual).await;
    b.vault("kept-kv", false).await;
    b.stop().await;
    drop(checkpointed(&dir.path().join(DB_FILE)));
    dir
}

/// A connection to the database at `db`, once its write-ahead log is copied into the file.
fn checkpointed(db: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).unwrap();
    let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).unwrap();
    assert_eq!(busy, 0, "the checkpoint was blocked");
    conn
}

fn config(dir: &Path) -> Config {
    let mut cfg = Config::for_data_dir(dir);
    cfg.clock = ClockKind::Manual;
    cfg
}

/// Start-up's refusal as text.
async fn refusal(cfg: Config) -> String {
    match App::open(cfg).await {
        Ok(_) => panic!("the broker started"),
        Err(e) => e.to_string(),
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// Starting on `dir` after `damage` is refused with a message that names the store and says how
/// to restore it, and leaves the admin token, the master key and the store id as they were.
async fn assert_refused_untouched(dir: &Path, damage: impl FnOnce(&Path), says: &[&str]) {
    let kept = [ADMIN_TOKEN_FILE, MASTER_KEY_FILE, STORE_ID_FILE].map(|f| (f, read(&dir.join(f))));
    damage(&dir.join(DB_FILE));
    let err = refusal(config(dir)).await;
    for words in [DB_FILE, "backup", "--reinitialize"].iter().chain(says) {
        assert!(err.contains(words), "the refusal does not say {words:?}: {err}");
    }
    for (file, before) in kept {
        assert_eq!(read(&dir.join(file)), before, "{file} changed");
    }
}

// 1. A truncated or deleted store starts empty, silently.

#[tokio::test]
async fn a_truncated_store_is_refused_instead_of_started_empty() {
    let dir = used_data_dir().await;
    let truncate = |db: &Path| std::fs::File::create(db).map(drop).unwrap();
    assert_refused_untouched(dir.path(), truncate, &["is empty (0 bytes)", STORE_ID_FILE]).await;
}

#[tokio::test]
async fn a_deleted_store_is_refused_instead_of_started_empty() {
    let dir = used_data_dir().await;
    let delete = |db: &Path| std::fs::remove_file(db).unwrap();
    assert_refused_untouched(dir.path(), delete, &["is missing", STORE_ID_FILE]).await;
}

#[tokio::test]
async fn a_directory_from_before_store_ids_is_refused_when_its_store_is_deleted() {
    let dir = used_data_dir().await;
    // As an earlier version left it: no store.id, but master.key and admin.token.
    std::fs::remove_file(dir.path().join(STORE_ID_FILE)).unwrap();
    let kept = read(&dir.path().join(ADMIN_TOKEN_FILE));
    std::fs::remove_file(dir.path().join(DB_FILE)).unwrap();
    let err = refusal(config(dir.path())).await;
    assert!(
        err.contains("is missing") && err.contains(MASTER_KEY_FILE) && err.contains(ADMIN_TOKEN_FILE),
        "{err}"
    );
    assert_eq!(read(&dir.path().join(ADMIN_TOKEN_FILE)), kept);
}

#[tokio::test]
async fn another_directorys_store_is_refused() {
    let dir = used_data_dir().await;
    let other = used_data_dir().await;
    std::fs::copy(other.path().join(DB_FILE), dir.path().join(DB_FILE)).unwrap();
    let err = refusal(config(dir.path())).await;
    assert!(err.contains("another data directory's store") && err.contains(STORE_ID_FILE), "{err}");
}

#[tokio::test]
async fn reinitialize_starts_afresh_only_when_asked_and_sets_the_old_store_aside() {
    let dir = used_data_dir().await;
    let old_admin = App::open(config(dir.path())).await.unwrap().admin.object_id.clone();
    let old_id = read(&dir.path().join(STORE_ID_FILE));
    let db = dir.path().join(DB_FILE);
    std::fs::write(&db, b"").unwrap();

    let mut cfg = config(dir.path());
    cfg.reinitialize = true;
    let b = start_cfg(cfg).await;
    assert_ne!(b.admin.object_id, old_admin, "a new admin for the new store");
    let vaults = b.vaults().list_vaults(proto::ListVaultsRequest {}).await.unwrap().into_inner();
    assert!(vaults.vaults.is_empty(), "the new store is empty: {vaults:?}");
    b.stop().await;
    assert_ne!(read(&dir.path().join(STORE_ID_FILE)), old_id, "the new store has its own id");
    let aside: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("broker.sqlite.set-aside-"))
        .collect();
    assert_eq!(aside.len(), 1, "the emptied store is renamed aside, not deleted: {aside:?}");
    // The new store is the directory's own: an ordinary start takes it.
    start_in(dir.path(), ClockKind::Manual).await.stop().await;
}

// 2. Start-up does not check the store's integrity.

/// The principals' unique index as bytes of the database file: its root page's offset and the
/// page size, with the write-ahead log checkpointed into the file first.
fn principals_index_page(db: &Path) -> (u64, usize) {
    let conn = checkpointed(db);
    let page_size: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
    let root: u64 = conn
        .query_row(
            "SELECT rootpage FROM sqlite_master WHERE type = 'index' AND tbl_name = 'principals'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(root > 1, "the index is not on the first page");
    ((root - 1) * page_size, page_size as usize)
}

/// Overwrites the principals' index root page with garbage.
fn wreck_principals_index(db: &Path) {
    let (offset, size) = principals_index_page(db);
    let file = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    file.write_all_at(&vec![0xA5; size], offset).unwrap();
    file.sync_all().unwrap();
}

/// What SQLite itself says of the database: the first fault `PRAGMA <check>` lists (its lines
/// joined with spaces).
fn sqlite_says(db: &Path, check: &str) -> String {
    let conn = rusqlite::Connection::open(db).unwrap();
    let first: String = conn.query_row(&format!("PRAGMA {check}"), [], |r| r.get(0)).unwrap();
    assert_ne!(first, "ok", "SQLite finds nothing wrong");
    first.replace('\n', " ")
}

#[tokio::test]
async fn a_damaged_store_is_refused_at_start_with_sqlites_message() {
    let dir = used_data_dir().await;
    let db = dir.path().join(DB_FILE);
    wreck_principals_index(&db);
    let sqlite = sqlite_says(&db, "quick_check");
    let err = refusal(config(dir.path())).await;
    assert!(err.contains(&sqlite), "SQLite said {sqlite:?}; the refusal: {err}");
    assert!(err.contains("damaged") && err.contains("backup"), "{err}");
}

#[tokio::test]
async fn store_check_full_finds_an_index_that_no_longer_matches_its_table() {
    let dir = used_data_dir().await;
    let db = dir.path().join(DB_FILE);
    let admin = std::fs::read_to_string(dir.path().join(ADMIN_TOKEN_FILE)).unwrap();
    let oid = claims(admin.trim())["oid"].as_str().unwrap().to_string();
    // The index's one entry names another principal than its row: well formed, but wrong.
    let (offset, size) = principals_index_page(&db);
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&db).unwrap();
    let mut page = vec![0; size];
    file.read_exact_at(&mut page, offset).unwrap();
    let at = page.windows(oid.len()).position(|w| w == oid.as_bytes()).expect("the admin in the index");
    page[at + oid.len() - 1] ^= 0x01;
    file.write_all_at(&page, offset).unwrap();
    drop(file);
    let sqlite = sqlite_says(&db, "integrity_check");

    // The quick check reads every page, but does not match indexes to tables.
    drop(App::open(config(dir.path())).await.expect("the quick check passes"));
    let mut cfg = config(dir.path());
    cfg.store_check = StoreCheck::Full;
    let err = refusal(cfg).await;
    assert!(
        err.contains("integrity_check") && err.contains(&sqlite),
        "SQLite said {sqlite:?}; the refusal: {err}"
    );
}

#[tokio::test]
async fn a_store_damaged_while_serving_fails_writes_as_damaged_not_retry_later() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_in(dir.path(), ClockKind::Manual).await;
    let db = dir.path().join(DB_FILE);
    wreck_principals_index(&db);
    // A write by another connection moves the log on, so the broker drops the pages it cached.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("INSERT INTO meta (k, v) VALUES ('test-poke', x'00')", [])
        .unwrap();
    let r = b.ids().create_user(proto::CreateUserRequest { name: "after-damage".into() }).await;
    let msg = assert_status(r, Code::Internal, "StoreCorrupt");
    assert!(msg.contains("damaged") && msg.contains("backup") && !msg.contains("Retry later"), "{msg}");
    b.stop().await;
}

// 3. Nothing stops two brokers on one data directory.

#[tokio::test]
async fn a_second_broker_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_in(dir.path(), ClockKind::Manual).await;
    let err = match App::open(config(dir.path())).await {
        Ok(_) => panic!("a second broker opened the directory"),
        Err(e) => e,
    };
    assert!(matches!(err, StartError::DataDir(_)), "{err:?}");
    let pid = std::process::id();
    assert!(err.to_string().contains(&format!("in use by PID {pid}")), "{err}");
    assert_eq!(std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap().trim(), pid.to_string());
    b.stop().await;
    // Stopped, it lets go: the next broker opens the directory.
    start_in(dir.path(), ClockKind::Manual).await.stop().await;
}

#[tokio::test]
async fn the_data_directory_lock_is_let_go_when_the_app_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        drop(App::open(config(dir.path())).await.expect("the directory is free again"));
    }
}

// 4. A missing master.key is replaced by a new one.

#[tokio::test]
async fn a_missing_master_key_is_not_replaced_for_a_store_that_holds_data() {
    let dir = used_data_dir().await;
    let key = dir.path().join(MASTER_KEY_FILE);
    std::fs::remove_file(&key).unwrap();
    let err = refusal(config(dir.path())).await;
    assert!(err.contains(&format!("{} is missing", key.display())), "{err}");
    assert!(err.contains("TDE_BROKER_MASTER_KEY") && err.contains("backup"), "{err}");
    assert!(!key.exists(), "a new master key was made");
}

// 5. Files 0644.

#[tokio::test]
async fn the_store_its_log_and_the_audit_log_are_private_files() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    // An audit log made by someone else, readable by all.
    std::fs::File::create(&audit).unwrap().write_all(b"").unwrap();
    std::fs::set_permissions(&audit, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data = dir.path().join("data");
    let mut cfg = config(&data);
    cfg.audit_log = AuditLog::File(audit.clone());
    let b = start_cfg(cfg.clone()).await;
    b.vault("private-kv", false).await;
    let db = data.join(DB_FILE);
    let wal = data.join(format!("{DB_FILE}-wal"));
    let shm = data.join(format!("{DB_FILE}-shm"));
    for file in [&db, &wal, &shm, &data.join(STORE_ID_FILE), &data.join(LOCK_FILE), &audit] {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    b.stop().await;
    // A store left readable by an earlier version is narrowed at the next start.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    start_cfg(cfg).await.stop().await;
    assert_eq!(mode(&db), 0o600);
}
