//! The `engine` example (examples/engine.rs) as separate processes against a real broker: pages
//! survive an engine restart because the wrapped DEK does, and revoking the server identity's
//! access to the protector cuts the engine off from its own data.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use tde_broker::grpc::proto;

/// How long any engine process may run before it is killed and the test fails.
const LIMIT: Duration = Duration::from_secs(30);
/// The broker's probe interval, seconds of its clock.
const PROBE: i64 = 600;

/// The example binary next to this test's: target/<profile>/deps/<test> → target/<profile>/examples.
fn engine_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("examples").join(format!("engine{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --examples` (or a plain `cargo test`, which builds examples)",
        bin.display()
    );
    // `cargo test --test engine_example` does not rebuild examples: refuse a stale binary.
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/engine.rs");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).expect("mtime");
    assert!(
        modified(&bin) >= modified(&source),
        "{} is older than examples/engine.rs: run `cargo build --examples`",
        bin.display()
    );
    bin
}

/// One engine process: its stdout arrives line by line, stderr at the end.
struct EngineProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::thread::JoinHandle<String>,
    started: Instant,
}

/// What a finished engine process did.
struct Finished {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

impl EngineProcess {
    fn spawn(args: &[String]) -> EngineProcess {
        let mut child = Command::new(engine_binary())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the engine example");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        EngineProcess { child, lines, stderr, started: Instant::now() }
    }

    /// The next stdout line, within what is left of the time limit.
    fn next_line(&mut self) -> String {
        let left = LIMIT.saturating_sub(self.started.elapsed());
        match self.lines.recv_timeout(left) {
            Ok(line) => line,
            Err(_) => {
                let _ = self.child.kill();
                panic!("the engine printed nothing more within {LIMIT:?}");
            }
        }
    }

    /// Waits for the exit (killing the process at the time limit) and collects the output.
    fn finish(mut self) -> Finished {
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for the engine") {
                break status;
            }
            if self.started.elapsed() > LIMIT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the engine did not finish within {LIMIT:?}: killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = self.stderr.join().expect("stderr reader");
        // The reader ends with the pipe, so every line is in the channel by now.
        let stdout = self.lines.iter().collect();
        Finished { status, stdout, stderr }
    }
}

/// Runs the engine to completion off the runtime's workers (the broker serves on them).
async fn engine(args: Vec<String>) -> Finished {
    tokio::task::spawn_blocking(move || EngineProcess::spawn(&args).finish()).await.expect("join")
}

fn assert_ok(f: &Finished, what: &str) {
    assert!(f.status.success(), "{what}: {}; stderr: {}", f.status, f.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_survive_a_restart_and_revocation_cuts_the_engine_off() {
    engine_binary();
    let b = start().await;

    // A CMK server as tests/tde.rs sets it up: purge-protected vault, RSA key, a UMI with
    // get/wrapKey/unwrapKey, the server created with both, and database db1.
    b.vault("engine-kv", true).await;
    b.key("engine-kv", "tde", "RSA", 2048).await;
    let (umi, who) = b.identity("id-rg", "engine-umi").await;
    b.policy("engine-kv", &who.object_id, &["get", "wrapKey", "unwrapKey"]).await;
    let server = b
        .servers()
        .create_server(proto::CreateServerRequest {
            resource_group: "sql-rg".into(),
            name: "engine-sql".into(),
            kind: proto::ServerKind::SqlServer as i32,
            identity: Some(proto::ServerIdentity {
                user_assigned_identity_ids: vec![umi.resource_id.clone()],
                ..Default::default()
            }),
            key_id: b.key_uri("engine-kv", "tde"),
            ..Default::default()
        })
        .await
        .expect("CMK server")
        .into_inner();
    b.servers()
        .create_database(proto::CreateDatabaseRequest { server_id: server.id.clone(), name: "db1".into() })
        .await
        .expect("database");
    let host = b
        .servers()
        .issue_host_credential(proto::IssueHostCredentialRequest { server_id: server.id.clone() })
        .await
        .expect("host credential")
        .into_inner();

    let dir = tempfile::tempdir().expect("tempdir");
    let base: Vec<String> = [
        "--server",
        &format!("http://{}", b.addr),
        "--token",
        &host.token,
        "--database",
        "db1",
        "--dir",
        &dir.path().display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let with = |extra: &[&str]| [base.clone(), extra.iter().map(|s| s.to_string()).collect()].concat();

    // Two pages; only the wrapped DEK is kept on disk, never the pages in the clear.
    assert_ok(&engine(with(&["write", "page one"])).await, "write page one");
    assert_ok(&engine(with(&["write", "page two"])).await, "write page two");
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("dek.json")).expect("dek.json")).expect("json");
    assert!(
        stored["kid"].as_str().is_some_and(|k| k.starts_with(&b.key_uri("engine-kv", "tde"))),
        "{stored}"
    );
    assert!(stored.get("dek").is_none(), "{stored}");
    let pages = std::fs::read(dir.path().join("pages.bin")).expect("pages.bin");
    assert!(!pages.windows(8).any(|w| w == b"page one"), "pages.bin holds plaintext");

    // A new process (the engine "restarted") unwraps the DEK and reads both pages.
    let read = engine(with(&["read"])).await;
    assert_ok(&read, "read");
    assert_eq!(read.stdout, ["page one", "page two"]);

    // A watcher, subscribed before anything changes.
    let watch_args = with(&["--server-id", &server.id, "--admin-token", &b.token, "watch"]);
    let (watcher, first) = tokio::task::spawn_blocking(move || {
        let mut p = EngineProcess::spawn(&watch_args);
        let first = p.next_line();
        (p, first)
    })
    .await
    .expect("join");
    assert_eq!(first, "watching db1 (ONLINE)");

    // The key owner takes the identity's access away; the next probe finds out.
    b.policy("engine-kv", &umi.principal_id, &[]).await;
    b.advance(PROBE).await;
    let watched = tokio::task::spawn_blocking(move || watcher.finish()).await.expect("join");
    assert_ok(&watched, "watch");
    assert_eq!(watched.stdout.last().map(String::as_str), Some("INACCESSIBLE IDENTITY_MISSING_PERMISSIONS"));

    // The engine can no longer open its own data.
    let read = engine(with(&["read"])).await;
    assert_eq!(read.status.code(), Some(3), "stdout: {:?}; stderr: {}", read.stdout, read.stderr);
    assert_eq!(read.stdout, ["INACCESSIBLE"]);
    b.stop().await;
}
