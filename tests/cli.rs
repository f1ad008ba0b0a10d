//! End-to-end tests of the `tde-broker` client subcommands: the real binary against a broker
//! served in-process on an ephemeral loopback port.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::CommandFactory as _;
use serde_json::Value;
use tde_broker::config::{ClockKind, Config};
use tde_broker::server::App;

/// A broker on a manual clock serving in this process; dropped with the test's runtime.
struct Broker {
    server: String,
    data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

async fn start_broker() -> Broker {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::for_data_dir(dir.path());
    cfg.clock = ClockKind::Manual;
    let app = App::open(cfg).await.expect("broker starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(app.serve(listener, std::future::pending()));
    Broker { server: format!("http://{addr}"), data_dir: dir.path().to_path_buf(), _dir: dir }
}

/// Runs the binary (blocking, so off the runtime's workers) with a clean environment.
async fn cli(server: &str, data_dir: &Path, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tde-broker"));
    command
        .env_remove("TDE_BROKER_TOKEN")
        .env_remove("TDE_BROKER_SERVER")
        .env_remove("TDE_BROKER_DATA_DIR")
        .env("RUST_LOG", "off")
        .arg("--server")
        .arg(server)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args);
    tokio::task::spawn_blocking(move || command.output().expect("run tde-broker")).await.expect("join")
}

impl Broker {
    async fn run(&self, args: &[&str]) -> Output {
        cli(&self.server, &self.data_dir, args).await
    }

    /// Runs a command that must succeed with `--output json` and parses its document.
    async fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.run(&all).await;
        assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
        })
    }

    /// Runs a command that must fail, returning its stderr.
    async fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or_else(|| panic!("no string '{field}' in {v}"))
}

#[test]
fn command_line_definition_is_consistent() {
    tde_broker::cli::Cli::command().debug_assert();
    tde_broker::cli::command().debug_assert();
}

/// The long flags a (sub)command's help lists.
fn help_flags(path: &[&str]) -> Vec<String> {
    let mut cmd = tde_broker::cli::command();
    // Global options reach the subcommands when the command is built.
    cmd.build();
    for name in path {
        cmd = cmd.find_subcommand(name).unwrap_or_else(|| panic!("no subcommand {name}")).clone();
    }
    let help = cmd.render_long_help().to_string();
    help.split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-').to_string())
        .collect()
}

const CLIENT_ONLY: [&str; 6] =
    ["--server", "--token", "--ca-cert", "--client-cert", "--client-key", "--output"];

#[test]
fn every_subcommands_help_lists_only_the_options_that_apply_to_it() {
    for path in [&["serve"][..], &["cert", "issue"]] {
        let flags = help_flags(path);
        for flag in CLIENT_ONLY {
            assert!(!flags.iter().any(|f| f == flag), "`{}` --help lists {flag}: {flags:?}", path.join(" "));
        }
        assert!(flags.iter().any(|f| f == "--data-dir"), "{path:?}: {flags:?}");
    }
    assert!(help_flags(&["serve"]).iter().any(|f| f == "--listen"));
    // Every other leaf subcommand is a client: it lists the client options and no serving ones.
    let mut cmd = tde_broker::cli::command();
    cmd.build();
    fn leaves(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<Vec<String>>) {
        let subs: Vec<_> = cmd.get_subcommands().filter(|s| s.get_name() != "help").collect();
        if subs.is_empty() {
            out.push(path);
            return;
        }
        for s in subs {
            let mut p = path.clone();
            p.push(s.get_name().to_string());
            leaves(s, p, out);
        }
    }
    let mut all = Vec::new();
    leaves(&cmd, Vec::new(), &mut all);
    let clients: Vec<Vec<String>> = all.into_iter().filter(|p| p[0] != "serve" && p[0] != "cert").collect();
    assert!(clients.len() > 40, "{clients:?}");
    for path in &clients {
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        let path = &path[..];
        let flags = help_flags(path);
        for flag in ["--server", "--token", "--output", "--data-dir"] {
            assert!(flags.iter().any(|f| f == flag), "`{}` --help lacks {flag}: {flags:?}", path.join(" "));
        }
        for flag in ["--listen", "--insecure", "--tls-cert", "--reinitialize"] {
            assert!(!flags.iter().any(|f| f == flag), "`{}` --help lists {flag}", path.join(" "));
        }
    }
}

#[test]
fn client_options_given_to_serve_or_cert_are_refused_not_ignored() {
    use tde_broker::cli::parse_from;
    for args in [
        &["tde-broker", "serve", "--token", "x"][..],
        &["tde-broker", "--output", "json", "serve"],
        &[
            "tde-broker",
            "cert",
            "issue",
            "--principal",
            "00000000-0000-0000-0000-000000000001",
            "--server",
            "http://h:1",
        ],
    ] {
        let err = parse_from(args).map(|_| ()).expect_err("refused").to_string();
        assert!(err.contains("is an option of the client subcommands"), "{args:?}: {err}");
    }
    // What they do take still parses, and client options still follow any client subcommand.
    parse_from(["tde-broker", "serve", "--data-dir", "d", "--listen", "127.0.0.1:1"]).expect("serve");
    parse_from(["tde-broker", "key", "list", "v", "--output", "json", "--token", "t"]).expect("key list");
    parse_from(["tde-broker", "--server", "http://h:1", "key", "list", "v"]).expect("before the subcommand");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough_wrap_disable_expire() {
    let b = start_broker().await;

    let vault = b.json(&["vault", "create", "cli-vault"]).await;
    assert_eq!(str_of(&vault, "name"), "cli-vault");
    assert_eq!(vault["access_policy"]["key_permissions"][0], "all");
    let policies = b.json(&["policy", "list", "cli-vault"]).await;
    assert_eq!(policies.as_array().map(Vec::len), Some(1));

    let key = b.json(&["key", "create", "cli-vault", "tde", "--ops", "wrapKey,unwrapKey"]).await;
    let kid = str_of(&key, "kid").to_string();
    assert_eq!(key["kty"], "RSA");

    // A 32-byte DEK round-trips.
    let dek: Vec<u8> = (0u8..32).collect();
    let dek_hex = hex::encode(&dek);
    let wrapped = b.json(&["key", "wrap", &kid, "--alg", "RSA-OAEP-256", "--value-hex", &dek_hex]).await;
    assert_eq!(str_of(&wrapped, "kid"), kid);
    let ciphertext = str_of(&wrapped, "value").to_string();
    let unwrapped =
        b.json(&["key", "unwrap", &kid, "--alg", "RSA-OAEP-256", "--value-b64", &ciphertext]).await;
    assert_eq!(B64.decode(str_of(&unwrapped, "value")).expect("base64"), dek);

    // Table output of the same call: `kid` and `value` lines.
    let table = b.run(&["key", "unwrap", &kid, "--alg", "RSA-OAEP-256", "--value-b64", &ciphertext]).await;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.lines().any(|l| l.starts_with("kid") && l.ends_with(&kid)), "{text}");
    assert!(text.lines().any(|l| l.starts_with("value") && l.ends_with(&B64.encode(&dek))), "{text}");

    // Disabled: wrap is refused with the cloud's code.
    b.json(&["key", "update", &kid, "--disable"]).await;
    let err = b.fails(&["key", "wrap", &kid, "--alg", "RSA-OAEP-256", "--value-hex", &dek_hex]).await;
    assert!(err.contains("KeyDisabled"), "{err}");

    // Enabled again with an expiry one hour ahead, then the clock moves past it.
    let now = b.json(&["clock", "show"]).await["now"].as_i64().expect("now");
    let exp = (now + 3600).to_string();
    let updated = b.json(&["key", "update", &kid, "--enable", "--exp", &exp]).await;
    assert_eq!(updated["attributes"]["enabled"], true);
    assert_eq!(updated["attributes"]["expires"].as_i64(), Some(now + 3600));
    let moved = b.json(&["clock", "advance", "2h"]).await;
    assert_eq!(moved["now"].as_i64(), Some(now + 7200));

    // Expired: unwrap still works (so data stays readable), wrap does not.
    let unwrapped =
        b.json(&["key", "unwrap", &kid, "--alg", "RSA-OAEP-256", "--value-b64", &ciphertext]).await;
    assert_eq!(B64.decode(str_of(&unwrapped, "value")).expect("base64"), dek);
    let err = b.fails(&["key", "wrap", &kid, "--alg", "RSA-OAEP-256", "--value-hex", &dek_hex]).await;
    assert!(err.contains("KeyExpired"), "{err}");
    assert!(err.starts_with("error: ") && err.contains(" (KeyExpired): "), "{err}");

    // Listings page through and print a header.
    let versions = b.json(&["key", "versions", &kid]).await;
    assert_eq!(versions.as_array().map(Vec::len), Some(1));
    let list = b.run(&["key", "list", "cli-vault"]).await;
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.starts_with("NAME"), "{text}");
    assert!(text.lines().nth(1).is_some_and(|l| l.starts_with("tde ")), "{text}");

    // Errors name the gRPC code and the cloud's reason.
    let err = b.fails(&["vault", "show", "no-such-vault"]).await;
    assert!(err.starts_with("error: NOT_FOUND ("), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_file_and_unreachable_broker_are_explained() {
    let empty = tempfile::tempdir().expect("tempdir");
    let out = cli("http://127.0.0.1:9", empty.path(), &["vault", "list"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let token_path = empty.path().join("admin.token");
    assert!(err.contains(&format!("no token: {} does not exist.", token_path.display())), "{err}");
    for hint in ["--data-dir DIR", "--token", "tde-broker serve"] {
        assert!(err.contains(hint), "{err}");
    }

    // Run from another directory with the default data directory: the path printed is absolute.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tde-broker"));
    command
        .current_dir(elsewhere.path())
        .env_remove("TDE_BROKER_TOKEN")
        .env_remove("TDE_BROKER_DATA_DIR")
        .env("RUST_LOG", "off")
        .args(["vault", "list", "--server", "http://127.0.0.1:9"]);
    let out = tokio::task::spawn_blocking(move || command.output().expect("run")).await.expect("join");
    let err = String::from_utf8_lossy(&out.stderr);
    let absolute = elsewhere.path().canonicalize().expect("canonical").join("tde-broker-data/admin.token");
    let printed = elsewhere.path().join("tde-broker-data/admin.token");
    assert!(
        err.contains(&format!("no token: {} does not exist", printed.display()))
            || err.contains(&format!("no token: {} does not exist", absolute.display())),
        "{err}"
    );

    // A port nobody listens on: the message names the address and how to start a broker.
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let server = format!("127.0.0.1:{port}");
    let out = cli(&server, empty.path(), &["clock", "show", "--token", "x.y.z"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("http://127.0.0.1:{port}")), "{err}");
    assert!(err.contains("tde-broker serve"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_address_that_is_the_admin_http_port_is_named_as_not_grpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::for_data_dir(dir.path());
    cfg.http_listen = Some("127.0.0.1:0".parse().expect("addr"));
    let app = App::open(cfg).await.expect("broker starts");
    let http = app.http_addr().expect("the admin listener runs");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    tokio::spawn(app.serve(listener, std::future::pending()));
    let out = cli(&format!("http://{http}"), dir.path(), &["vault", "list"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("http://{http} is not a gRPC port: it answered \"HTTP/1.1 ")), "{err}");
    assert!(err.contains("--listen, default 127.0.0.1:50051"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_are_rfc3339_dates_or_moves_from_the_brokers_clock() {
    let b = start_broker().await;
    b.json(&["vault", "create", "when-vault"]).await;
    let set = b.json(&["clock", "set", "2027-01-15T08:00:00Z"]).await;
    assert_eq!(set["now"].as_i64(), Some(1_800_000_000));
    let set = b.json(&["clock", "set", "+1h"]).await;
    assert_eq!(set["now"].as_i64(), Some(1_800_003_600));
    let set = b.json(&["clock", "set", "-30m"]).await;
    assert_eq!(set["now"].as_i64(), Some(1_800_001_800));
    let key = b.json(&["key", "create", "when-vault", "k", "--nbf", "now", "--exp", "+90d"]).await;
    assert_eq!(key["attributes"]["not_before"].as_i64(), Some(1_800_001_800));
    assert_eq!(key["attributes"]["expires"].as_i64(), Some(1_800_001_800 + 90 * 86_400));
    let kid = str_of(&key, "kid").to_string();
    let updated = b.json(&["key", "update", &kid, "--exp", "2027-03-01"]).await;
    assert_eq!(updated["attributes"]["expires"].as_i64(), Some(1_803_859_200));
    let err = b.fails(&["key", "update", &kid, "--exp", "soon"]).await;
    assert!(err.contains("'soon' is not a time") && err.contains("RFC 3339") && err.contains("+1h"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_policy_token_then_crypto_as_the_identity_and_roles() {
    let b = start_broker().await;
    let vault = b.json(&["vault", "create", "id-vault"]).await;
    let vault_uri = str_of(&vault, "uri").trim_end_matches('/').to_string();
    let key = b.json(&["key", "create", "id-vault", "tde"]).await;
    let kid = str_of(&key, "kid").to_string();
    let key_uri = kid.rsplit_once('/').expect("versioned kid").0.to_string();

    // A user-assigned identity, found again by each of its ids and in the listing.
    let id = b.json(&["identity", "create", "app-id", "--resource-group", "rg-cli"]).await;
    let principal_id = str_of(&id, "principal_id").to_string();
    let client_id = str_of(&id, "client_id").to_string();
    let resource_id = str_of(&id, "resource_id").to_string();
    assert_eq!(str_of(&id, "kind"), "UserAssigned");
    assert!(resource_id.contains("/resourceGroups/rg-cli/") && resource_id.ends_with("/app-id"), "{id}");
    for (flag, value) in
        [("--client-id", &client_id), ("--principal-id", &principal_id), ("--resource-id", &resource_id)]
    {
        assert_eq!(b.json(&["identity", "show", flag, value]).await, id, "{flag}");
    }
    let err =
        b.fails(&["identity", "show", "--client-id", &client_id, "--principal-id", &principal_id]).await;
    assert!(err.contains("cannot be used with"), "{err}");
    let list = b.json(&["identity", "list"]).await;
    assert!(list.as_array().is_some_and(|l| l.contains(&id)), "{list}");
    let table = b.run(&["identity", "list"]).await;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("NAME"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("app-id ") && l.ends_with(&resource_id)), "{text}");

    // get/wrapKey/unwrapKey for the identity, next to the creator's own policy.
    let set = b
        .json(&[
            "policy",
            "set",
            "id-vault",
            "--object-id",
            &principal_id,
            "--permissions",
            "get,wrapKey,unwrapKey",
        ])
        .await;
    assert_eq!(set["key_permissions"], serde_json::json!(["get", "wrapKey", "unwrapKey"]));
    let policies = b.json(&["policy", "list", "id-vault"]).await;
    assert_eq!(policies.as_array().map(Vec::len), Some(2), "{policies}");
    assert!(policies.as_array().is_some_and(|p| p.iter().any(|p| p["object_id"] == principal_id.as_str())));

    // The identity's token: JSON has the token and its expiry, the table is the token alone.
    let token = b.json(&["token", "get", "--client-id", &client_id]).await;
    let access_token = str_of(&token, "access_token").to_string();
    assert!(token["expires_on"].as_i64().is_some_and(|t| t > 0), "{token}");
    assert_eq!(access_token.split('.').count(), 3, "{access_token}");
    let plain = b.run(&["token", "get", "--principal-id", &principal_id]).await;
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
    let plain = String::from_utf8_lossy(&plain.stdout);
    assert_eq!(plain.lines().count(), 1, "{plain}");
    assert_eq!(plain.trim().split('.').count(), 3, "{plain}");

    // As the identity: wrap and unwrap round-trip; encrypt is not among its permissions.
    let dek_hex = hex::encode([0x5au8; 32]);
    let as_id = ["--token", access_token.as_str()];
    let wrap =
        [["key", "wrap", &key_uri, "--alg", "RSA-OAEP-256", "--value-hex", &dek_hex].as_slice(), &as_id]
            .concat();
    let wrapped = b.json(&wrap).await;
    assert_eq!(str_of(&wrapped, "kid"), kid);
    let ciphertext = str_of(&wrapped, "value").to_string();
    let unwrap =
        [["key", "unwrap", &kid, "--alg", "RSA-OAEP-256", "--value-b64", &ciphertext].as_slice(), &as_id]
            .concat();
    let unwrapped = b.json(&unwrap).await;
    assert_eq!(B64.decode(str_of(&unwrapped, "value")).expect("base64"), [0x5au8; 32]);
    let encrypt =
        [["key", "encrypt", &key_uri, "--alg", "RSA-OAEP-256", "--value-hex", &dek_hex].as_slice(), &as_id]
            .concat();
    let err = b.fails(&encrypt).await;
    assert!(err.starts_with("error: PERMISSION_DENIED"), "{err}");

    // A role assignment at the vault, listed in full and by scope, then deleted.
    let role = "Key Vault Crypto Service Encryption User";
    let assigned = b
        .json(&["role", "assign", "--scope", &vault_uri, "--principal-id", &principal_id, "--role", role])
        .await;
    let assignment_id = str_of(&assigned, "id").to_string();
    assert_eq!(str_of(&assigned, "role_name"), role);
    assert_eq!(str_of(&assigned, "principal_id"), principal_id);
    assert!(str_of(&assigned, "normalized_scope").ends_with("/vaults/id-vault"), "{assigned}");
    let all = b.json(&["role", "list"]).await;
    assert!(all.as_array().is_some_and(|l| l.contains(&assigned)), "{all}");
    let at_vault = b.json(&["role", "list", "--scope", &vault_uri]).await;
    assert!(at_vault.as_array().is_some_and(|l| l.contains(&assigned)), "{at_vault}");
    let table = b.run(&["role", "list"]).await;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("ID"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with(&assignment_id) && l.contains(role) && l.contains(&principal_id)),
        "{text}"
    );
    assert_eq!(b.json(&["role", "delete", &assignment_id]).await["deleted"], assignment_id.as_str());
    let all = b.json(&["role", "list"]).await;
    assert!(all.as_array().is_some_and(|l| l.iter().all(|a| a["id"] != assignment_id.as_str())), "{all}");

    // Removing the policy takes the identity's wrap right away.
    let removed = b.json(&["policy", "delete", "id-vault", "--object-id", &principal_id]).await;
    assert_eq!(removed["key_permissions"], serde_json::json!([]));
    assert_eq!(b.json(&["policy", "list", "id-vault"]).await.as_array().map(Vec::len), Some(1));
    let err = b.fails(&wrap).await;
    assert!(err.starts_with("error: PERMISSION_DENIED"), "{err}");

    // A user: its principal id, name and a token.
    let user = b.json(&["user", "create", "alice"]).await;
    assert_eq!(str_of(&user, "name"), "alice");
    assert!(
        !str_of(&user, "principal_id").is_empty() && str_of(&user, "token").split('.').count() == 3,
        "{user}"
    );
    assert!(user["expires_on"].as_i64().is_some_and(|t| t > 0), "{user}");

    // Deleting the identity: it is gone, and so is its token.
    assert_eq!(b.json(&["identity", "delete", &resource_id]).await["deleted"], resource_id.as_str());
    let err = b.fails(&["identity", "show", "--client-id", &client_id]).await;
    assert!(err.starts_with("error: NOT_FOUND"), "{err}");
    let err = b.fails(&["token", "get", "--client-id", &client_id]).await;
    assert!(err.starts_with("error: NOT_FOUND"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_that_name_a_rule_print_the_command_that_fixes_it() {
    let b = start_broker().await;
    b.json(&["vault", "create", "nopp-vault"]).await;
    let key = b.json(&["key", "create", "nopp-vault", "tde"]).await;
    let key_uri = str_of(&key, "kid").rsplit_once('/').expect("versioned kid").0.to_string();
    let umi = b.json(&["identity", "create", "nopp-umi", "--resource-group", "id-rg"]).await;
    let umi_id = str_of(&umi, "resource_id").to_string();
    let create = [
        "server",
        "create",
        "nopp-sql",
        "--resource-group",
        "sql-rg",
        "--umi",
        &umi_id,
        "--key-id",
        &key_uri,
    ];

    // The cloud's text and code stay; the hint says how to get past it.
    let err = b.fails(&create).await;
    assert!(
        err.contains("(SecurityInvalidAzureKeyVaultRecoveryLevel): The provided Key Vault uri is not valid."),
        "{err}"
    );
    assert!(err.contains("\nhint: ") && err.contains("vault update VAULT --purge-protection"), "{err}");
    b.json(&["vault", "update", "nopp-vault", "--purge-protection"]).await;

    // Next: the identity lacks key permissions.
    let err = b.fails(&create).await;
    assert!(err.contains("hint: grant the server's identity get, wrapKey and unwrapKey"), "{err}");
    let principal = str_of(&umi, "principal_id").to_string();
    let grant =
        ["policy", "set", "nopp-vault", "--object-id", &principal, "--permissions", "get,wrapKey,unwrapKey"];
    b.json(&grant).await;
    b.json(&create).await;

    // A disabled key says how to enable it; errors without a known fix print no hint.
    let kid = str_of(&key, "kid").to_string();
    b.json(&["key", "update", &kid, "--disable"]).await;
    let err = b.fails(&["key", "wrap", &kid, "--alg", "RSA-OAEP-256", "--value-hex", "00"]).await;
    assert!(err.contains("hint: enable the key: `tde-broker key update KEY_ID --enable`"), "{err}");
    let err = b.fails(&["vault", "show", "no-such-vault"]).await;
    assert!(!err.contains("hint:"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_go_in_with_in_and_out_with_out_and_values_print_as_asked() {
    use std::os::unix::fs::PermissionsExt as _;
    let b = start_broker().await;
    let files = tempfile::tempdir().expect("tempdir");
    let file = |name: &str| files.path().join(name).display().to_string();
    b.json(&["vault", "create", "io-vault"]).await;
    let key = b.json(&["key", "create", "io-vault", "k"]).await;
    let kid = str_of(&key, "kid").to_string();

    // A DEK in from a file, wrapped, unwrapped back as hex and into a private file.
    let dek: Vec<u8> = (100u8..132).collect();
    std::fs::write(file("dek.bin"), &dek).expect("write dek");
    let wrapped = b
        .json(&[
            "key",
            "wrap",
            &kid,
            "--alg",
            "RSA-OAEP-256",
            "--in",
            &file("dek.bin"),
            "--out",
            &file("wrapped.bin"),
        ])
        .await;
    assert_eq!(wrapped["bytes"].as_u64(), Some(256), "{wrapped}");
    assert!(wrapped.get("value").is_none(), "{wrapped}");
    let hex_out = b
        .json(&["key", "unwrap", &kid, "--alg", "RSA-OAEP-256", "--in", &file("wrapped.bin"), "--hex"])
        .await;
    assert_eq!(str_of(&hex_out, "value"), hex::encode(&dek));
    let table =
        b.run(&["key", "unwrap", &kid, "--alg", "RSA-OAEP-256", "--in", &file("wrapped.bin"), "--hex"]).await;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.lines().any(|l| l.starts_with("value") && l.ends_with(&hex::encode(&dek))), "{text}");
    b.json(&[
        "key",
        "unwrap",
        &kid,
        "--alg",
        "RSA-OAEP-256",
        "--in",
        &file("wrapped.bin"),
        "--out",
        &file("dek.out"),
    ])
    .await;
    assert_eq!(std::fs::read(file("dek.out")).expect("dek.out"), dek);
    let mode = std::fs::metadata(file("dek.out")).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "an unwrapped key is written for its owner only");

    // Backup out, restore in (after the key is deleted and purged).
    let key_uri = kid.rsplit_once('/').expect("versioned").0.to_string();
    let backup = b.json(&["key", "backup", &key_uri, "--out", &file("k.backup")]).await;
    assert!(backup["bytes"].as_u64().is_some_and(|n| n > 0), "{backup}");
    b.json(&["key", "delete", &key_uri]).await;
    b.json(&["key", "purge", "io-vault", "k"]).await;
    let restored = b.json(&["key", "restore", "io-vault", "--in", &file("k.backup")]).await;
    assert_eq!(str_of(&restored, "kid"), kid);
    // The former flag still works.
    b.json(&["key", "backup", &key_uri, "--file", &file("k2.backup")]).await;

    // Import reads PEM, JWK or DER from --in by content.
    use rsa::pkcs8::EncodePrivateKey as _;
    let sk = rsa::PrivateKey::new(&mut common::TestRng, 2048).expect("rsa key");
    let der = sk.to_pkcs8_der().expect("pkcs8").as_bytes().to_vec();
    let body = B64
        .encode(&der)
        .as_bytes()
        .chunks(64)
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect::<Vec<_>>();
    let pem = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", body.join("\n"));
    std::fs::write(file("imp.pem"), pem).expect("write pem");
    std::fs::write(file("imp.der"), &der).expect("write der");
    let from_pem = b.json(&["key", "import", "io-vault", "imp", "--in", &file("imp.pem")]).await;
    let from_der = b.json(&["key", "import", "io-vault", "imp", "--in", &file("imp.der")]).await;
    assert_eq!(from_pem["kty"], "RSA", "{from_pem}");
    assert_eq!(from_pem["n"], from_der["n"], "the same key from PEM and DER");
    std::fs::write(file("oct.jwk"), r#"{"kty":"oct","k":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"}"#)
        .expect("jwk");
    let imported = b.json(&["key", "import", "io-vault", "oct", "--in", &file("oct.jwk")]).await;
    assert_eq!(imported["kty"], "oct-HSM", "{imported}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmk_server_database_watch_and_revalidate() {
    let b = start_broker().await;

    // A purge-protected vault, an RSA protector key, and a UMI that holds get/wrapKey/unwrapKey.
    b.json(&["vault", "create", "cmk-vault", "--purge-protection"]).await;
    let key = b.json(&["key", "create", "cmk-vault", "tde"]).await;
    let kid = str_of(&key, "kid").to_string();
    let key_uri = kid.rsplit_once('/').expect("versioned kid").0.to_string();
    let umi = b.json(&["identity", "create", "cmk-umi", "--resource-group", "id-rg"]).await;
    let umi_id = str_of(&umi, "resource_id").to_string();
    let umi_principal = str_of(&umi, "principal_id").to_string();
    let tde_perms = ["--object-id", umi_principal.as_str(), "--permissions", "get,wrapKey,unwrapKey"];
    b.json(&[["policy", "set", "cmk-vault"].as_slice(), &tde_perms].concat()).await;

    // The server uses the key from creation; its only UMI becomes the primary.
    let server = b
        .json(&[
            "server",
            "create",
            "cmk-sql",
            "--resource-group",
            "sql-rg",
            "--umi",
            &umi_id,
            "--key-id",
            &key_uri,
        ])
        .await;
    let server_id = str_of(&server, "id").to_string();
    assert!(
        server_id.ends_with("/resourceGroups/sql-rg/providers/Microsoft.Sql/servers/cmk-sql"),
        "{server}"
    );
    assert_eq!(server["kind"], "SQL_SERVER");
    assert_eq!(server["identity"]["primary_user_assigned_identity_id"], umi_id.as_str());
    assert_eq!(server["protector"]["server_key_type"], "AzureKeyVault");
    assert_eq!(server["protector"]["kid"], kid.as_str());
    assert_eq!(b.json(&["server", "show", &server_id]).await, server);
    let protector = b.json(&["server", "protector-show", &server_id]).await;
    assert_eq!(protector, server["protector"]);
    let list = b.run(&["server", "list"]).await;
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.starts_with("NAME"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("cmk-sql ") && l.ends_with(&server_id)), "{text}");

    // A database, ONLINE, in both renderings and in the listing.
    let db = b.json(&["db", "create", &server_id, "db1"]).await;
    assert_eq!(str_of(&db, "state"), "ONLINE", "{db}");
    let shown = b.json(&["db", "show", &server_id, "db1"]).await;
    assert_eq!(str_of(&shown, "state"), "ONLINE", "{shown}");
    assert_eq!(str_of(&shown, "reason"), "", "{shown}");
    let table = b.run(&["db", "show", &server_id, "db1"]).await;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.lines().any(|l| l.starts_with("state") && l.ends_with("ONLINE")), "{text}");
    let list = b.json(&["db", "list", &server_id]).await;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    // The engine host's credential: the token alone on stdout.
    let cred = b.run(&["server", "host-credential", &server_id]).await;
    assert!(cred.status.success(), "{}", String::from_utf8_lossy(&cred.stderr));
    assert_eq!(String::from_utf8_lossy(&cred.stdout).trim().split('.').count(), 3);

    // A watcher sees the database go when the UMI loses its access (found by the next probe).
    let mut watcher = std::process::Command::new(env!("CARGO_BIN_EXE_tde-broker"));
    watcher
        .env_remove("TDE_BROKER_TOKEN")
        .env_remove("TDE_BROKER_SERVER")
        .env_remove("TDE_BROKER_DATA_DIR")
        .env("RUST_LOG", "off")
        .args(["--server", &b.server, "--data-dir"])
        .arg(&b.data_dir)
        .args(["db", "watch", &server_id, "--count", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = watcher.spawn().expect("run tde-broker db watch");
    let stdout = child.stdout.take().expect("piped stdout");
    let (header_tx, header_rx) = tokio::sync::oneshot::channel();
    let reader = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        let mut lines = std::io::BufReader::new(stdout).lines();
        // The header is printed once the subscription stands.
        let _ = header_tx.send(lines.next().and_then(Result::ok));
        lines.map_while(Result::ok).collect::<Vec<_>>()
    });
    let header = tokio::time::timeout(std::time::Duration::from_secs(30), header_rx)
        .await
        .expect("watch header within 30 s")
        .expect("reader alive")
        .expect("a header line");
    assert!(header.starts_with("TIME") && header.ends_with("REASON"), "{header}");
    b.json(&["policy", "delete", "cmk-vault", "--object-id", &umi_principal]).await;
    b.json(&["clock", "advance", "10m"]).await;
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("db watch did not stop after its one event within 30 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    })
    .await
    .expect("join");
    assert!(status.success(), "db watch failed: {status}");
    let rows = reader.await.expect("join");
    assert_eq!(rows.len(), 1, "{rows:?}");
    let cells: Vec<&str> = rows[0].split_whitespace().collect();
    assert_eq!(
        cells[1..],
        ["MakeDatabaseInaccessible", "db1", "INACCESSIBLE", "IDENTITY_MISSING_PERMISSIONS"]
    );
    let shown = b.json(&["db", "show", &server_id, "db1"]).await;
    assert_eq!(str_of(&shown, "state"), "INACCESSIBLE", "{shown}");
    assert_eq!(str_of(&shown, "reason"), "IDENTITY_MISSING_PERMISSIONS", "{shown}");

    // Access back, revalidated: ONLINE again.
    b.json(&[["policy", "set", "cmk-vault"].as_slice(), &tde_perms].concat()).await;
    let revalidated = b.json(&["server", "revalidate", &server_id]).await;
    assert_eq!(revalidated["server_key_type"], "AzureKeyVault");
    assert_eq!(str_of(&b.json(&["db", "show", &server_id, "db1"]).await, "state"), "ONLINE");

    // Service-managed again; then the database and the server go.
    let protector = b.json(&["server", "protector", &server_id, "--service-managed"]).await;
    assert_eq!(protector["server_key_type"], "ServiceManaged");
    assert_eq!(b.json(&["db", "delete", &server_id, "db1"]).await["deleted"], "db1");
    assert_eq!(b.json(&["db", "list", &server_id]).await, serde_json::json!([]));
    assert_eq!(b.json(&["server", "delete", &server_id]).await["deleted"], server_id.as_str());
    let err = b.fails(&["server", "show", &server_id]).await;
    assert!(err.starts_with("error: NOT_FOUND"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_delete_soft_deletes_and_vault_deleted_lists_shows_recovers_and_purges() {
    let b = start_broker().await;
    b.json(&["vault", "create", "cli-sd", "--retention-days", "7"]).await;
    let kid = str_of(&b.json(&["key", "create", "cli-sd", "k"]).await, "kid").to_string();
    b.run(&["vault", "delete", "cli-sd"]).await;
    let err = b.fails(&["key", "show", &kid]).await;
    assert!(err.contains("Microsoft.KeyVault/vaults/cli-sd' was not found"), "{err}");
    let err = b.fails(&["vault", "create", "cli-sd"]).await;
    assert!(
        err.contains("already exists in deleted state") && err.contains("vault deleted recover"),
        "the refusal and the hint: {err}"
    );

    let list = b.json(&["vault", "deleted", "list"]).await;
    let listed = &list.as_array().expect("a list")[0];
    assert_eq!(listed["vault"]["name"], "cli-sd", "{list}");
    let deleted = listed["deleted_date"].as_i64().expect("deleted_date");
    assert_eq!(listed["scheduled_purge_date"].as_i64(), Some(deleted + 7 * 86_400), "{list}");
    let table = String::from_utf8_lossy(&b.run(&["vault", "deleted", "list"]).await.stdout).into_owned();
    assert!(table.starts_with("NAME") && table.lines().any(|l| l.starts_with("cli-sd ")), "{table}");
    let show = b.json(&["vault", "deleted", "show", "cli-sd"]).await;
    assert_eq!(show, *listed);

    let recovered = b.json(&["vault", "deleted", "recover", "cli-sd"]).await;
    assert_eq!(str_of(&recovered, "name"), "cli-sd");
    b.json(&["key", "show", &kid]).await;

    b.run(&["vault", "delete", "cli-sd"]).await;
    let purged = b.json(&["vault", "deleted", "purge", "cli-sd"]).await;
    assert_eq!(purged["purged"], "cli-sd");
    assert_eq!(b.json(&["vault", "deleted", "list"]).await, serde_json::json!([]));
    b.json(&["vault", "create", "cli-sd"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subnets_network_rules_private_endpoint_and_injected_outage() {
    use serde_json::json;
    let b = start_broker().await;
    let net = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/net-rg/providers/Microsoft.Network/virtualNetworks/vnet1/subnets";
    let app_subnet = format!("{net}/app");
    let local_subnet = format!("{net}/local");

    // A subnet: a single address becomes /32; the listing has it, by name and id.
    let put =
        b.json(&["subnet", "put", &app_subnet, "--prefix", "10.1.0.0/24", "--prefix", "10.1.1.5"]).await;
    assert_eq!(str_of(&put, "subnet_id"), app_subnet);
    assert_eq!(put["address_prefixes"], json!(["10.1.0.0/24", "10.1.1.5/32"]));
    let err = b.fails(&["subnet", "put", &app_subnet]).await;
    assert!(err.contains("--prefix"), "{err}");
    let list = b.json(&["subnet", "list"]).await;
    assert!(list.as_array().is_some_and(|l| l.contains(&put)), "{list}");
    let table = b.run(&["subnet", "list"]).await;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("NAME"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("app ")
            && l.contains(" 10.1.0.0/24,10.1.1.5/32 ")
            && l.ends_with(&app_subnet)),
        "{text}"
    );

    // A vault with a key, open by default.
    b.json(&["vault", "create", "net-vault"]).await;
    let kid = str_of(&b.json(&["key", "create", "net-vault", "tde"]).await, "kid").to_string();
    let open = b.json(&["vault", "network", "show", "net-vault"]).await;
    assert_eq!(open["public_network_access"], "Enabled", "{open}");
    assert_eq!(open["default_action"], "Allow", "{open}");
    assert_eq!(open["ip_rules"], json!([]), "{open}");

    // Deny, one IP rule and one VNet rule; the bypass stays as it was.
    let set = b
        .json(&[
            "vault",
            "network",
            "set",
            "net-vault",
            "--default-action",
            "Deny",
            "--ip-rule",
            "127.0.0.2",
            "--vnet-rule",
            &app_subnet,
        ])
        .await;
    assert_eq!(set["default_action"], "Deny", "{set}");
    assert_eq!(set["bypass"], "AzureServices", "{set}");
    assert_eq!(set["ip_rules"], json!(["127.0.0.2/32"]), "{set}");
    assert_eq!(set["virtual_network_rules"], json!([&app_subnet]), "{set}");
    assert_eq!(b.json(&["vault", "network", "show", "net-vault"]).await, set);
    let shown = b.run(&["vault", "network", "show", "net-vault"]).await;
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.lines().any(|l| l.starts_with("ip rules") && l.ends_with("127.0.0.2/32")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("default action") && l.ends_with("Deny")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("vnet rules") && l.ends_with(&app_subnet)), "{text}");
    let err = b.fails(&["vault", "network", "set", "net-vault"]).await;
    assert!(err.starts_with("error: nothing to change"), "{err}");

    // The CLI calls from 127.0.0.1: the firewall refuses it now.
    let err = b.fails(&["key", "show", &kid]).await;
    assert!(err.contains(" (ForbiddenByFirewall): "), "{err}");

    // --ip-rule adds to the rules; --clear-ip-rules starts over; VNet rules stay.
    let added = b.json(&["vault", "network", "set", "net-vault", "--ip-rule", "10.9.0.0/16"]).await;
    assert_eq!(added["ip_rules"], json!(["10.9.0.0/16", "127.0.0.2/32"]), "{added}");
    let replaced =
        b.json(&["vault", "network", "set", "net-vault", "--clear-ip-rules", "--ip-rule", "127.0.0.2"]).await;
    assert_eq!(replaced["ip_rules"], json!(["127.0.0.2/32"]), "{replaced}");
    assert_eq!(replaced["virtual_network_rules"], json!([&app_subnet]), "{replaced}");
    assert_eq!(replaced["default_action"], "Deny", "{replaced}");

    // A private endpoint from the CLI's own subnet gets it past the firewall.
    b.json(&["subnet", "put", &local_subnet, "--prefix", "127.0.0.1"]).await;
    let pe = b.json(&["vault", "private-endpoint", "create", "net-vault", "--subnet", &local_subnet]).await;
    assert_eq!(pe["private_endpoint_subnet_ids"], json!([&local_subnet]), "{pe}");
    let shown = b.run(&["vault", "network", "show", "net-vault"]).await;
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.lines().any(|l| l.starts_with("private endpoint subnets") && l.ends_with(&local_subnet)),
        "{text}"
    );
    assert_eq!(str_of(&b.json(&["key", "show", &kid]).await, "kid"), kid);

    // An injected outage of the vault: data-plane calls are UNAVAILABLE until it is cleared.
    let faults = b.json(&["faults", "set", "--vault", "net-vault", "--outage"]).await;
    assert_eq!(faults, json!([{ "vault_name": "net-vault", "outage": true }]));
    let err = b.fails(&["key", "show", &kid]).await;
    assert!(err.starts_with("error: UNAVAILABLE (ServiceUnavailable): "), "{err}");
    assert_eq!(b.json(&["faults", "clear", "--vault", "net-vault"]).await, json!([]));
    assert_eq!(str_of(&b.json(&["key", "show", &kid]).await, "kid"), kid);

    // Without --vault: every vault (`*` in the table); a plain clear removes it.
    let set = b.run(&["faults", "set", "--outage"]).await;
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    let text = String::from_utf8_lossy(&set.stdout);
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows, [["VAULT", "OUTAGE"], ["*", "true"]], "{text}");
    let err = b.fails(&["key", "show", &kid]).await;
    assert!(err.starts_with("error: UNAVAILABLE (ServiceUnavailable): "), "{err}");
    assert_eq!(b.json(&["faults", "clear"]).await, json!([]));
    assert_eq!(str_of(&b.json(&["key", "show", &kid]).await, "kid"), kid);
}

/// `throttling show` as table rows split on whitespace, header first.
async fn throttling_rows(b: &Broker) -> Vec<Vec<String>> {
    let out = b.run(&["throttling", "show"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().map(|l| l.split_whitespace().map(str::to_string).collect()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_azure_profile_custom_limits_and_off() {
    use serde_json::json;
    let b = start_broker().await;
    b.json(&["vault", "create", "thr-vault"]).await;
    let kid = str_of(&b.json(&["key", "create", "thr-vault", "tde"]).await, "kid").to_string();
    let header = ["VAULT", "PROFILE", "ALL-OTHER/10S", "CREATE/10S"];

    // Off by default: one row for every vault.
    assert_eq!(throttling_rows(&b).await, [header, ["*", "off", "-", "-"]]);

    // The cloud's limits on one vault; `set` answers with the whole list, as `show` does.
    let set = b.json(&["throttling", "set", "--vault", "thr-vault", "--profile", "azure"]).await;
    let azure = json!([
        { "vault_name": "", "profile": "off", "all_other_per_10s": 0, "create_per_10s": 0 },
        { "vault_name": "thr-vault", "profile": "azure", "all_other_per_10s": 4000, "create_per_10s": 20 },
    ]);
    assert_eq!(set, azure);
    assert_eq!(b.json(&["throttling", "show"]).await, azure);
    assert_eq!(
        throttling_rows(&b).await,
        [header, ["*", "off", "-", "-"], ["thr-vault", "azure", "4000", "20"]]
    );

    // Own limits for every vault; the vault with its own profile keeps it.
    b.json(&["throttling", "set", "--all-other", "100", "--create", "5"]).await;
    assert_eq!(
        throttling_rows(&b).await,
        [header, ["*", "custom", "100", "5"], ["thr-vault", "azure", "4000", "20"]]
    );
    let shown = b.json(&["throttling", "show"]).await;
    assert_eq!(
        shown[0],
        json!({ "vault_name": "", "profile": "custom", "all_other_per_10s": 100, "create_per_10s": 5 })
    );

    // --create defaults to the cloud's 20; the limits bite (the manual clock stays in one window).
    b.json(&["throttling", "set", "--vault", "thr-vault", "--all-other", "1"]).await;
    assert_eq!(
        throttling_rows(&b).await,
        [header, ["*", "custom", "100", "5"], ["thr-vault", "custom", "1", "20"]]
    );
    assert_eq!(str_of(&b.json(&["key", "show", &kid]).await, "kid"), kid);
    let err = b.fails(&["key", "show", &kid]).await;
    assert!(err.starts_with("error: RESOURCE_EXHAUSTED (Throttled): "), "{err}");

    // Off again: the vault off explicitly, then following every vault's profile, which is off.
    b.json(&["throttling", "set", "--vault", "thr-vault", "--profile", "off"]).await;
    assert_eq!(
        throttling_rows(&b).await,
        [header, ["*", "custom", "100", "5"], ["thr-vault", "off", "-", "-"]]
    );
    b.json(&["throttling", "set", "--vault", "thr-vault", "--profile", "inherit"]).await;
    b.json(&["throttling", "set", "--profile", "off"]).await;
    assert_eq!(throttling_rows(&b).await, [header, ["*", "off", "-", "-"]]);
    assert_eq!(
        b.json(&["throttling", "show"]).await,
        json!([{ "vault_name": "", "profile": "off", "all_other_per_10s": 0, "create_per_10s": 0 }])
    );
    assert_eq!(str_of(&b.json(&["key", "show", &kid]).await, "kid"), kid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_set_refuses_bad_combinations() {
    let b = start_broker().await;

    // A profile and own limits together, limits without --all-other, or nothing at all: the
    // command line refuses them before calling.
    let err = b.fails(&["throttling", "set", "--profile", "azure", "--all-other", "5"]).await;
    assert!(err.contains("'--profile <PROFILE>' cannot be used with '--all-other <N>'"), "{err}");
    let err = b.fails(&["throttling", "set", "--profile", "azure", "--create", "5"]).await;
    assert!(err.contains("cannot be used with"), "{err}");
    let err = b.fails(&["throttling", "set", "--create", "5"]).await;
    assert!(err.contains("--all-other <N>"), "{err}");
    let err = b.fails(&["throttling", "set", "--vault", "v1"]).await;
    assert!(err.contains("required") && err.contains("--profile") && err.contains("--all-other"), "{err}");

    // The broker checks the values.
    let err = b.fails(&["throttling", "set", "--profile", "fast"]).await;
    assert!(err.contains("The throttling profile 'fast' is not supported."), "{err}");
    let err = b.fails(&["throttling", "set", "--profile", "inherit"]).await;
    assert!(err.contains("needs a vault name"), "{err}");
    let err = b.fails(&["throttling", "set", "--all-other", "0"]).await;
    assert!(err.starts_with("error: INVALID_ARGUMENT ("), "{err}");

    // Nothing changed.
    assert_eq!(
        b.json(&["throttling", "show"]).await,
        serde_json::json!([{ "vault_name": "", "profile": "off", "all_other_per_10s": 0, "create_per_10s": 0 }])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_sign_and_verify_take_digests_or_files_and_random_prints_bytes() {
    let b = start_broker().await;
    let files = tempfile::tempdir().expect("tempdir");
    let file = |name: &str| files.path().join(name).display().to_string();
    b.json(&["vault", "create", "sig-vault"]).await;
    let key = b.json(&["key", "create", "sig-vault", "ec", "--kty", "EC", "--crv", "P-384"]).await;
    assert_eq!((key["kty"].as_str(), key["crv"].as_str()), (Some("EC"), Some("P-384")), "{key}");
    let kid = str_of(&key, "kid").to_string();
    std::fs::write(file("data.txt"), b"sign me").expect("write data");
    let digest = {
        use sha2::Digest as _;
        sha2::Sha384::digest(b"sign me").to_vec()
    };

    // --in hashes the file with the algorithm's hash: the same signature input as --digest-hex.
    let signed = b.json(&["key", "sign", &kid, "--alg", "ES384", "--in", &file("data.txt")]).await;
    let signature = B64.decode(str_of(&signed, "value")).expect("base64 signature");
    assert_eq!(signature.len(), 96, "R||S of P-384");
    let valid = b
        .json(&[
            "key",
            "verify",
            &kid,
            "--alg",
            "ES384",
            "--digest-hex",
            &hex::encode(&digest),
            "--signature-b64",
            str_of(&signed, "value"),
        ])
        .await;
    assert_eq!(valid["valid"], true, "{valid}");
    b.json(&[
        "key",
        "sign",
        &kid,
        "--alg",
        "ES384",
        "--digest-b64",
        &B64.encode(&digest),
        "--out",
        &file("sig"),
    ])
    .await;
    let ok = b
        .run(&[
            "key",
            "verify",
            &kid,
            "--alg",
            "ES384",
            "--in",
            &file("data.txt"),
            "--signature-in",
            &file("sig"),
        ])
        .await;
    assert!(ok.status.success());
    assert!(
        String::from_utf8_lossy(&ok.stdout).lines().any(|l| l.starts_with("valid") && l.ends_with("true"))
    );

    // A signature that does not verify prints valid false and exits 1, saying so.
    std::fs::write(file("other.txt"), b"not what was signed").expect("write other");
    let bad = b
        .run(&[
            "key",
            "verify",
            &kid,
            "--alg",
            "ES384",
            "--in",
            &file("other.txt"),
            "--signature-in",
            &file("sig"),
        ])
        .await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stdout).lines().any(|l| l.starts_with("valid") && l.ends_with("false"))
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("the signature does not verify: ES384 with"), "{stderr}");

    // A digest of the wrong length is the broker's refusal.
    let stderr = b.fails(&["key", "sign", &kid, "--alg", "ES384", "--digest-hex", "00112233"]).await;
    assert!(
        stderr.contains("The digest is 4 bytes long; algorithm ES384 needs a digest of 48 bytes."),
        "{stderr}"
    );

    let random = b.json(&["random", "sig-vault", "--count", "16", "--hex"]).await;
    assert_eq!(str_of(&random, "value").len(), 32, "{random}");
    let stderr = b.fails(&["random", "sig-vault", "--count", "129"]).await;
    assert!(stderr.contains("The count 129 is invalid. It must be between 1 and 128."), "{stderr}");
}

/// docs/RULES.md R1.12 from the command line: the default policy, `set` with each kind of
/// action, a refusal with the rule's text, and `clock advance` rotating at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_policy_show_set_and_clock_advance_rotates() {
    let b = start_broker().await;
    b.json(&["vault", "create", "cli-rot"]).await;
    let key = b.json(&["key", "create", "cli-rot", "k"]).await;
    let kid = str_of(&key, "kid").to_string();
    let key_id = kid.rsplit_once('/').map(|(k, _)| k.to_string()).expect("versioned kid");

    let default = b.json(&["key", "rotation-policy", "show", &key_id]).await;
    assert_eq!(str_of(&default, "id"), format!("{key_id}/rotationpolicy"));
    assert_eq!(default["lifetime_actions"][0]["action"], "Notify");
    assert_eq!(default["lifetime_actions"][0]["time_before_expiry"], "P30D");
    let table = b.run(&["key", "rotation-policy", "show", &key_id]).await;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.lines().any(|l| l.starts_with("lifetime action") && l.ends_with("Notify P30D before expiry")),
        "{text}"
    );

    let set = b
        .json(&[
            "key",
            "rotation-policy",
            "set",
            &key_id,
            "--expiry-time",
            "P90D",
            "--rotate-after-create",
            "P30D",
            "--notify-before-expiry",
            "P30D",
        ])
        .await;
    assert_eq!(set["expiry_time"], "P90D");
    assert_eq!(set["lifetime_actions"][0]["action"], "Rotate");
    assert_eq!(set["lifetime_actions"][0]["time_after_create"], "P30D");
    assert_eq!(set["lifetime_actions"][1]["action"], "Notify");

    let err = b.fails(&["key", "rotation-policy", "set", &key_id, "--rotate-after-create", "P3D"]).await;
    assert!(err.contains("(BadParameter)") && err.contains("the minimum is 7 days from creation"), "{err}");
    let err = b
        .fails(&[
            "key",
            "rotation-policy",
            "set",
            &key_id,
            "--rotate-after-create",
            "P30D",
            "--rotate-before-expiry",
            "P7D",
        ])
        .await;
    assert!(err.contains("cannot be used with"), "{err}");

    b.json(&["clock", "advance", "30d"]).await;
    let versions = b.json(&["key", "versions", &key_id]).await;
    assert_eq!(versions.as_array().map(Vec::len), Some(2), "{versions}");
}
