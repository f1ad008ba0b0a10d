//! Interop with an independent gRPC client: Python's `grpcio`, with stubs that `grpc_tools.protoc`
//! generates from `proto/tdebroker/v1/*.proto`, gets a managed identity's token and wraps and
//! unwraps with it (`tests/python/wrap_with_identity.py`).
//!
//! The client lives in a virtualenv at `target/pyenv`, created and filled from PyPI (`grpcio`,
//! `grpcio-tools`) on the first run and reused after. Nothing is skipped: without `python3` and
//! its `venv` module the test fails and says what to install (`tests/common/python.rs`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::python::{python_command, text};
use serde_json::Value;
use tde_broker::grpc::proto;

/// The repository root: the proto files and the script are found from here.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command to completion; `None` when it cannot be started at all.
fn run(command: &mut Command) -> Option<Output> {
    command.output().ok()
}

/// The interpreter of the virtualenv `target/pyenv` with `grpc` and `grpc_tools` importable.
fn python_with_grpc() -> PathBuf {
    common::python::python_venv("pyenv", &["grpcio", "grpcio-tools"], "grpc, grpc_tools")
}

/// Python stubs of every proto file of the contract, generated into `out`.
fn generate_stubs(python: &Path, out: &Path) {
    let dir = root().join("proto/tdebroker/v1");
    let mut protos: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".proto"))
        .map(|name| format!("proto/tdebroker/v1/{name}"))
        .collect();
    protos.sort();
    assert!(protos.iter().any(|p| p.ends_with("/identities.proto")), "no identities.proto in {protos:?}");
    let mut protoc = python_command(python);
    protoc
        .current_dir(root())
        .args(["-m", "grpc_tools.protoc", "-Iproto"])
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .args(&protos);
    let result = run(&mut protoc).expect("run grpc_tools.protoc");
    assert!(result.status.success(), "grpc_tools.protoc failed: {}", text(&result.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_wraps_and_unwraps_as_a_user_assigned_identity() {
    let started = std::time::Instant::now();
    let b = common::start().await;
    b.vault("py-vault", false).await;
    let key = b.key("py-vault", "tde", "RSA", 2048).await;
    let kid = common::kid(&key);
    let key_uri = b.key_uri("py-vault", "tde");

    let id = b
        .ids()
        .create_user_assigned_identity(proto::CreateUserAssignedIdentityRequest {
            resource_group: "rg-interop".into(),
            name: "py-client".into(),
            ..Default::default()
        })
        .await
        .expect("create identity")
        .into_inner();
    b.policy("py-vault", &id.principal_id, &["get", "wrapKey", "unwrapKey"]).await;
    // The key itself permits encrypt: the script's refused Encrypt is the identity's missing
    // permission, not the key's operations.
    let encrypt = proto::EncryptRequest {
        key_id: key_uri.clone(),
        algorithm: "RSA-OAEP-256".into(),
        value: vec![7; 32],
        ..Default::default()
    };
    b.kv().encrypt(encrypt).await.expect("the admin encrypts with the key");

    let addr = b.addr.to_string();
    let admin = b.token.clone();
    let client_id = id.client_id.clone();
    let script_key = key_uri.clone();
    let (out, setup) = tokio::task::spawn_blocking(move || {
        let python = python_with_grpc();
        let stubs = tempfile::tempdir().expect("tempdir");
        generate_stubs(&python, stubs.path());
        let setup = started.elapsed();
        let mut script = python_command(&python);
        script.arg(root().join("tests/python/wrap_with_identity.py")).args([
            &addr,
            &admin,
            &client_id,
            &script_key,
        ]);
        let out = run(script.env("PYTHONPATH", stubs.path())).expect("run the python script");
        (out, setup)
    })
    .await
    .expect("join");
    eprintln!("python interop: setup {setup:?}, total {:?}", started.elapsed());

    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "wrap_with_identity.py exited with {}:\nstdout: {stdout}\nstderr: {}",
        out.status,
        text(&out.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    let r: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("the script printed no JSON ({e}): {stdout}"));
    eprintln!("python interop: {line}");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["failures"], serde_json::json!([]), "{r}");
    assert_eq!(r["round_trip"], true, "{r}");
    assert_eq!(r["wrapped_kid"], kid.as_str(), "{r}");
    assert_eq!(r["wrapped_len"], 256, "RSA-2048 ciphertext: {r}");
    assert_eq!(r["token_appid"], id.client_id.as_str(), "{r}");
    assert_eq!(r["token_oid"], id.principal_id.as_str(), "{r}");
    let now = b.now().await;
    assert!(r["token_expires_on"].as_i64().is_some_and(|t| t > now), "{r}");
    assert_eq!(r["encrypt"]["code"], "PERMISSION_DENIED", "{r}");
    assert!(r["encrypt"]["message"].as_str().is_some_and(|m| m.contains("encrypt")), "{r}");
    assert_eq!(r["no_metadata"]["code"], "UNAUTHENTICATED", "{r}");
    b.stop().await;
}
