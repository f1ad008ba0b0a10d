//! `tde-broker loadtest` end to end: the real binary against its own baseline and against a
//! broker in this process. The report's shape and correctness only — no timing thresholds.

mod common;

use serde_json::Value;
use tde_broker::grpc::proto;

/// Runs `tde-broker loadtest ARGS --output json`; it must succeed and print one JSON document.
fn loadtest(args: &[&str]) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tde-broker"))
        .arg("loadtest")
        .args(args)
        .args(["--output", "json"])
        .output()
        .expect("run tde-broker loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadtest {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

/// Runs `loadtest ARGS` against broker `b` with its admin token, off the test's runtime (the
/// broker answers on it while the tool runs).
async fn loadtest_against(b: &common::TestBroker, args: &'static [&'static str]) -> Value {
    let (server, token) = (format!("http://{}", b.addr), b.token.clone());
    tokio::task::spawn_blocking(move || {
        loadtest(&[&["--server", server.as_str(), "--token", token.as_str()][..], args].concat())
    })
    .await
    .expect("loadtest thread")
}

/// Requests succeeded, none failed, and the percentiles are ordered.
fn assert_clean_report(r: &Value) {
    let ok = r["ok"].as_u64().expect("ok count");
    assert!(ok > 0, "no request succeeded: {r:#}");
    assert_eq!(r["errors"]["total"], 0, "{r:#}");
    assert_eq!(r["errors"]["by_code"], serde_json::json!({}), "{r:#}");
    assert_eq!(r["requests"].as_u64(), Some(ok), "{r:#}");
    assert!(r["throughput_ok_per_s"].as_f64().expect("throughput") > 0.0, "{r:#}");
    let l = &r["latency_us"];
    let p = |name: &str| l[name].as_u64().unwrap_or_else(|| panic!("latency_us.{name}: {r:#}"));
    let (p50, p90, p99, p999, max) = (p("p50"), p("p90"), p("p99"), p("p99_9"), p("max"));
    assert!(p50 > 0, "{r:#}");
    assert!(p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max, "unordered percentiles: {l:#}");
}

#[test]
fn baseline_unwrap_reports_throughput_and_ordered_percentiles() {
    let r = loadtest(&["--baseline", "--op", "unwrap", "--duration", "1s", "--concurrency", "4"]);
    assert_clean_report(&r);
    assert_eq!(r["target"], "baseline");
    assert_eq!(r["op"], "unwrap");
    assert_eq!(r["load"]["mode"], "closed");
    assert_eq!(r["load"]["concurrency"], 4);
}

#[test]
fn rest_baseline_answers_unwrap_over_http1_and_h2_with_every_plaintext_checked() {
    for (http, connections) in [("1", 4), ("2", 2)] {
        let r = loadtest(&[
            "--protocol",
            "rest",
            "--http",
            http,
            "--baseline",
            "--op",
            "unwrap",
            "--duration",
            "1s",
            "--concurrency",
            "4",
            "--connections",
            "2",
        ]);
        assert_clean_report(&r);
        assert_eq!(r["target"], "baseline");
        assert_eq!(r["protocol"], format!("rest-h{http}"));
        assert!(r["server"].as_str().is_some_and(|s| s.starts_with("https://127.0.0.1:")), "{r:#}");
        // HTTP/1.1 holds one keep-alive connection per request in flight; h2 multiplexes.
        assert_eq!(r["load"]["connections"], connections, "{r:#}");
    }
}

#[test]
fn rest_baseline_answers_wrap_and_get() {
    for op in ["wrap", "get"] {
        let r = loadtest(&["--protocol", "rest", "--baseline", "--op", op, "--duration", "500ms"]);
        assert_clean_report(&r);
        assert_eq!(r["op"], op);
    }
}

#[test]
fn engine_unwrap_over_rest_is_refused_as_grpc_only() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tde-broker"))
        .args(["loadtest", "--protocol", "rest", "--op", "engine-unwrap", "--baseline"])
        .output()
        .expect("run tde-broker loadtest");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--op engine-unwrap is a gRPC-only operation"), "{stderr}");
}

/// The names of the vaults (soft-deleted ones too) and servers a load test could leave behind.
async fn leftovers(b: &common::TestBroker) -> Vec<String> {
    let vaults = b.vaults().list_vaults(proto::ListVaultsRequest {}).await.expect("list vaults").into_inner();
    let deleted = b
        .vaults()
        .list_deleted_vaults(proto::ListDeletedVaultsRequest {})
        .await
        .expect("list deleted vaults")
        .into_inner();
    let servers =
        b.servers().list_servers(proto::ListServersRequest {}).await.expect("list servers").into_inner();
    vaults
        .vaults
        .into_iter()
        .chain(deleted.vaults.into_iter().filter_map(|d| d.vault))
        .map(|v| v.name)
        .chain(servers.servers.into_iter().map(|s| s.name))
        .filter(|n| n.starts_with("loadtest-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwrap_against_a_broker_checks_every_plaintext_and_cleans_up() {
    let b = common::start().await;
    // No warm-up: the first use of each of the 2 × 4 ciphertexts is measured.
    let args = &["--keys", "2", "--distinct-ciphertexts", "4", "--duration", "1s", "--warmup", "0s"];
    let r = loadtest_against(&b, args).await;
    assert_clean_report(&r);
    assert_eq!(r["target"], "broker");
    assert_eq!((r["keys"].as_u64(), r["distinct_ciphertexts"].as_u64()), (Some(2), Some(4)));
    let share = r["cache_miss_share"].as_f64().expect("cache_miss_share");
    let expected = 8.0 / r["requests"].as_f64().expect("requests");
    assert!((share - expected).abs() < 1e-9, "cache-miss share {share}, expected {expected}");
    assert!(leftovers(&b).await.is_empty(), "left behind: {:?}", leftovers(&b).await);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_unwrap_sets_up_a_cmk_server_and_removes_it() {
    let b = common::start().await;
    let args =
        &["--op", "engine-unwrap", "--distinct-ciphertexts", "2", "--duration", "1s", "--warmup", "0s"];
    let r = loadtest_against(&b, args).await;
    assert_clean_report(&r);
    assert_eq!(r["op"], "engine-unwrap");
    // The purge-protected vault stays (its keys cannot be purged); the server goes.
    let left = leftovers(&b).await;
    assert!(left.iter().all(|n| !n.contains("-sql")), "servers left behind: {left:?}");
    b.stop().await;
}

/// Latency injected with `Emulation.SetFaults` on every vault shows in the load test's
/// percentiles: a fixed 40 ms plus a log-normal part (p50 10 ms, p99 60 ms) puts every request
/// above 40 ms and spreads them out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_latency_shows_in_the_percentiles() {
    let b = common::start().await;
    b.emu()
        .set_faults(proto::SetFaultsRequest {
            vault_name: String::new(),
            latency_ms: 40,
            latency_p50_ms: 10,
            latency_p99_ms: 60,
            ..Default::default()
        })
        .await
        .expect("set faults on every vault");
    let args = &["--op", "unwrap", "--concurrency", "8", "--duration", "1s", "--warmup", "0s"];
    let r = loadtest_against(&b, args).await;
    assert_clean_report(&r);
    let l = &r["latency_us"];
    let (min, p50, p99) = (l["min"].as_u64(), l["p50"].as_u64(), l["p99"].as_u64());
    // Every unwrap waited the fixed 40 ms and a positive random part on top.
    assert!(min.is_some_and(|m| m >= 40_000), "min below the injected 40 ms: {l:#}");
    assert!(p50.is_some_and(|p| p > 40_000), "p50 shows no random part: {l:#}");
    assert!(p99 > p50, "the injected distribution does not spread the latencies: {l:#}");
    b.stop().await;
}

/// A free TCP port on 127.0.0.1 (free a moment ago).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// `tde-broker serve` in a child process of its own, with its REST listener; killed on drop.
struct ServedBroker {
    child: std::process::Child,
    grpc: String,
    rest: String,
    data: tempfile::TempDir,
}

impl ServedBroker {
    fn start() -> Self {
        let data = tempfile::tempdir().expect("temp dir");
        let (grpc_port, rest_port) = (free_port(), free_port());
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tde-broker"))
            .args(["serve", "--data-dir"])
            .arg(data.path())
            .args(["--listen", &format!("127.0.0.1:{grpc_port}"), "--http-listen", "off"])
            .args(["--rest-listen", &format!("127.0.0.1:{rest_port}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start tde-broker serve");
        let broker = ServedBroker {
            child,
            grpc: format!("http://127.0.0.1:{grpc_port}"),
            rest: format!("https://127.0.0.1:{rest_port}"),
            data,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let up = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        while !(broker.data.path().join("admin.token").is_file() && up(grpc_port) && up(rest_port)) {
            assert!(std::time::Instant::now() < deadline, "the broker did not start listening within 30 s");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        broker
    }

    /// `loadtest ARGS --output json` against this broker.
    fn loadtest(&self, args: &[&str]) -> Value {
        let data = self.data.path().to_str().expect("UTF-8 temp dir");
        let connection =
            ["--server", self.grpc.as_str(), "--data-dir", data, "--rest-server", self.rest.as_str()];
        loadtest(&[&connection[..], args].concat())
    }

    /// The names of the vaults the broker lists, soft-deleted ones too.
    fn vault_names(&self) -> String {
        let data = self.data.path().to_str().expect("UTF-8 temp dir");
        let mut names = String::new();
        for list in [&["vault", "list"][..], &["vault", "deleted", "list"][..]] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_tde-broker"))
                .args(["--server", self.grpc.as_str(), "--data-dir", data, "--output", "json"])
                .args(list)
                .output()
                .expect("run tde-broker vault list");
            assert!(out.status.success(), "vault {list:?}: {}", String::from_utf8_lossy(&out.stderr));
            names.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        names
    }
}

impl Drop for ServedBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn rest_unwrap_against_a_broker_checks_every_plaintext_beside_its_baseline_and_grpc() {
    let broker = ServedBroker::start();
    for http in ["1", "2"] {
        let r = broker.loadtest(&[
            "--protocol",
            "rest",
            "--http",
            http,
            "--compare-baseline",
            "--with-grpc",
            "--keys",
            "2",
            "--distinct-ciphertexts",
            "3",
            "--concurrency",
            "4",
            "--duration",
            "1s",
            "--warmup",
            "0s",
        ]);
        for part in ["broker", "baseline", "grpc"] {
            assert_clean_report(&r[part]);
        }
        assert_eq!(r["broker"]["protocol"], format!("rest-h{http}"));
        assert_eq!(r["broker"]["server"], broker.rest.as_str());
        assert_eq!(r["grpc"]["protocol"], "grpc");
        assert_eq!(r["baseline"]["protocol"], format!("rest-h{http}"));
        // No warm-up: the first use of each of the 2 × 3 ciphertexts is measured, over REST.
        let share = r["broker"]["cache_miss_share"].as_f64().expect("cache_miss_share");
        let expected = 6.0 / r["broker"]["requests"].as_f64().expect("requests");
        assert!((share - expected).abs() < 1e-9, "cache-miss share {share}, expected {expected}");
        for ratios in ["ratio", "rest_vs_grpc"] {
            assert!(r[ratios]["throughput"].as_f64().is_some_and(|t| t > 0.0), "{ratios}: {r:#}");
        }
    }
    let left = broker.vault_names();
    assert!(!left.contains("loadtest-"), "left behind: {left}");
}
