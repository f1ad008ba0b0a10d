//! The deployment files in `deploy/`, checked without a Docker engine or a cluster:
//!
//! - Kubernetes manifests (`deploy/k8s/`) against the API schemas of the oldest and newest
//!   supported Kubernetes versions with `kubernetes-validate --strict` (and a broken manifest that
//!   must fail, so a validator that passes everything is caught), then against each other: names,
//!   selectors, probes, security context, the container's command line parsed by the real CLI,
//!   the ConfigMap's TOML resolved by the real configuration code.
//! - `compose.yaml`, `otel-collector.yaml` and `prometheus.yml`, parsed with PyYAML: services,
//!   ports, volumes, health checks, collector pipelines, scrape targets.
//! - The Dockerfile: stages, a fixed non-root `USER`, `HEALTHCHECK`, the command (real CLI).
//! - The systemd unit: a structural check, `systemd-analyze verify` and `systemd-analyze security`
//!   (`apt-get install systemd` where it is missing); then the unit's own
//!   `ExecStart` shell line runs the real binary with a master key passed as a systemd credential,
//!   and the container health check script judges that broker healthy, and unhealthy once it is
//!   gone.
//!
//! PyYAML and kubernetes-validate live in a virtualenv at `target/pyenv-deploy`, created and filled
//! from PyPI on the first run and reused after. Nothing is skipped: without `python3` and its
//! `venv` module the tests fail and say what to install (`tests/common/python.rs`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use serde_json::Value;
use tde_broker::cli::{Cli, Command as CliCommand};
use tde_broker::config::{Config, ServeArgs, TlsMode};

use common::python::{python_command, text};

/// The virtualenv of these tests, `target/pyenv-deploy`.
const VENV: &str = "pyenv-deploy";
/// The Python packages of the virtualenv; kubernetes-validate is pinned so that the Kubernetes
/// versions below stay known to it.
const PIP_PACKAGES: [&str; 2] = ["kubernetes-validate==1.37.0", "PyYAML>=6,<7"];
/// The oldest Kubernetes the manifests support and the newest the pinned validator knows.
const K8S_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
/// The image's fixed user (deploy/Dockerfile) = the Deployment's runAsUser/fsGroup.
const IMAGE_UID: i64 = 10001;
const NAMESPACE: &str = "tde-broker";

// ------------------------------------------------------------------------------------------------
// Paths and processes

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(rel: &str) -> PathBuf {
    root().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn output(command: &mut Command, what: &str) -> Output {
    command.output().unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

/// The interpreter of the virtualenv `target/pyenv-deploy` with PyYAML and kubernetes-validate
/// importable, made once per test binary (the tests of this file share it).
fn python() -> PathBuf {
    common::python::python_venv(VENV, &PIP_PACKAGES, "yaml, kubernetes_validate")
}

/// Every YAML document of `path`, as JSON, parsed by PyYAML (`safe_load_all`).
fn yaml_docs(path: &Path) -> Vec<Value> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        with open(sys.argv[1], encoding='utf-8') as f:\n    \
            docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
        json.dump(docs, sys.stdout, default=str)\n";
    let out = output(python_command(python()).args(["-c", SCRIPT]).arg(path), "PyYAML");
    assert!(out.status.success(), "PyYAML cannot parse {}: {}", path.display(), text(&out.stderr));
    match serde_json::from_slice(&out.stdout).expect("JSON from PyYAML") {
        Value::Array(docs) => docs,
        other => panic!("unexpected PyYAML output {other}"),
    }
}

fn yaml_doc(path: &Path) -> Value {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{} should hold one YAML document", path.display());
    docs.remove(0)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or_else(|| panic!("no string at {pointer} in {v:#}"))
}

fn array_at<'a>(v: &'a Value, pointer: &str) -> &'a Vec<Value> {
    v.pointer(pointer).and_then(Value::as_array).unwrap_or_else(|| panic!("no array at {pointer} in {v:#}"))
}

fn strings(v: &[Value]) -> Vec<String> {
    v.iter().map(|x| x.as_str().unwrap_or_else(|| panic!("{x} is not a string")).to_string()).collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ------------------------------------------------------------------------------------------------
// The broker's own command line and configuration code

/// Parses `tde-broker ARGV…` with the real CLI; it must be `serve`.
fn serve_args(argv: &[String], origin: &str) -> ServeArgs {
    let cli = Cli::try_parse_from(std::iter::once("tde-broker".to_string()).chain(argv.iter().cloned()))
        .unwrap_or_else(|e| panic!("{origin}: `tde-broker {}` is refused by the CLI:\n{e}", argv.join(" ")));
    match cli.command {
        CliCommand::Serve(args) => args,
        other => panic!("{origin}: `tde-broker {}` is not serve but {other:?}", argv.join(" ")),
    }
}

/// Resolves the configuration like `serve` does at start, with the config file read from
/// `config_file` instead of the path the deployment gives (which exists only where it runs).
fn resolve(mut args: ServeArgs, config_file: Option<&Path>, origin: &str) -> Config {
    if let Some(file) = config_file {
        assert!(args.config.is_some(), "{origin}: no --config although a config file ships with it");
        args.config = Some(file.to_path_buf());
    }
    Config::resolve(args).unwrap_or_else(|e| panic!("{origin}: the broker would refuse to start: {e}"))
}

// ------------------------------------------------------------------------------------------------
// Kubernetes

/// The manifests of deploy/k8s/ (all YAML files but the kustomization).
fn k8s_manifests() -> Vec<PathBuf> {
    let dir = deploy("k8s");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "expected the manifests in {}, found {files:?}", dir.display());
    files
}

/// Runs kubernetes-validate --strict on `files` for every version of K8S_VERSIONS.
fn kubernetes_validate(files: &[PathBuf]) -> Output {
    let bin = python().with_file_name("kubernetes-validate");
    let mut command = python_command(&bin);
    command.arg("--strict");
    for v in K8S_VERSIONS {
        command.args(["-k", v]);
    }
    output(command.args(files), "kubernetes-validate")
}

#[test]
fn kubernetes_manifests_validate_against_the_api_schemas() {
    let files = k8s_manifests();
    let resources: usize = files.iter().map(|f| yaml_docs(f).len()).sum();
    let out = kubernetes_validate(&files);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "kubernetes-validate failed:\n{stdout}\n{}", text(&out.stderr));
    // An unknown kind or apiVersion is only a WARN with exit status 0: every resource must have
    // passed against every version, and nothing else may be said.
    let passed =
        stdout.lines().filter(|l| l.starts_with("INFO ") && l.contains(" passed for resource ")).count();
    let other: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("INFO ")).collect();
    assert!(other.is_empty(), "kubernetes-validate complained:\n{}", other.join("\n"));
    assert_eq!(passed, resources * K8S_VERSIONS.len(), "not every resource was validated:\n{stdout}");

    // The validator does reject a broken manifest (a misspelt field and a wrong type).
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    let deployment = read(&deploy("k8s/deployment.yaml"))
        .replacen("  replicas: 1\n", "  replicaz: 1\n", 1)
        .replacen("periodSeconds: 10", "periodSeconds: ten", 1);
    assert!(
        deployment.contains("replicaz") && deployment.contains("ten"),
        "the negative control edits nothing"
    );
    std::fs::write(&broken, deployment).unwrap();
    let out = kubernetes_validate(&[broken]);
    assert!(
        !out.status.success(),
        "kubernetes-validate accepted a broken Deployment:\n{}",
        text(&out.stdout)
    );
}

/// The manifests by kind (each kind once).
fn k8s_by_kind() -> BTreeMap<String, (PathBuf, Value)> {
    let mut by_kind = BTreeMap::new();
    for file in k8s_manifests() {
        for doc in yaml_docs(&file) {
            let kind = str_at(&doc, "/kind").to_string();
            let previous = by_kind.insert(kind.clone(), (file.clone(), doc));
            assert!(previous.is_none(), "two {kind} manifests");
        }
    }
    by_kind
}

fn labels_match(selector: &Value, labels: &Value, what: &str) {
    let selector = selector.as_object().unwrap_or_else(|| panic!("{what}: selector {selector} is not a map"));
    assert!(!selector.is_empty(), "{what}: empty selector");
    for (k, v) in selector {
        assert_eq!(labels.get(k), Some(v), "{what}: selector {k}={v} does not match the pod labels {labels}");
    }
}

#[test]
fn kubernetes_manifests_fit_together_and_the_broker_accepts_their_configuration() {
    let by_kind = k8s_by_kind();
    let get = |kind: &str| &by_kind.get(kind).unwrap_or_else(|| panic!("no {kind} in deploy/k8s")).1;
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "PodDisruptionBudget",
    ] {
        get(kind);
    }
    assert_eq!(str_at(get("Namespace"), "/metadata/name"), NAMESPACE);
    for (kind, (file, doc)) in &by_kind {
        if kind != "Namespace" {
            assert_eq!(str_at(doc, "/metadata/namespace"), NAMESPACE, "{kind} in {}", file.display());
        }
    }

    // kubectl apply -k: every manifest but the Secret (applying the placeholder would reset a
    // real master key).
    let kustomization = yaml_doc(&deploy("k8s/kustomization.yaml"));
    let listed: BTreeSet<String> = strings(array_at(&kustomization, "/resources")).into_iter().collect();
    let expected: BTreeSet<String> = k8s_manifests()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "secret.yaml")
        .collect();
    assert_eq!(listed, expected, "kustomization.yaml resources");

    // The Secret's placeholder must not be usable as a key: a broker given it refuses to start.
    let secret = get("Secret");
    let secret_name = str_at(secret, "/metadata/name");
    let placeholder = secret.pointer("/stringData").and_then(Value::as_object).expect("Secret stringData");
    assert_eq!(placeholder.len(), 1, "one key in the Secret");
    let (secret_key, placeholder) = placeholder.iter().next().unwrap();
    let decoded = base64::engine::general_purpose::STANDARD.decode(placeholder.as_str().unwrap().trim());
    assert!(
        decoded.is_err(),
        "the Secret's placeholder decodes as base64: a broker would start with a published key"
    );

    let deployment = get("Deployment");
    assert_eq!(deployment["spec"]["replicas"], 1, "one writer of the SQLite store");
    assert_eq!(
        str_at(deployment, "/spec/strategy/type"),
        "Recreate",
        "never two brokers on one data directory"
    );
    let pod = &deployment["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];
    labels_match(&deployment["spec"]["selector"]["matchLabels"], pod_labels, "Deployment");
    labels_match(&get("Service")["spec"]["selector"], pod_labels, "Service");
    labels_match(
        &get("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        pod_labels,
        "PodDisruptionBudget",
    );
    labels_match(&get("NetworkPolicy")["spec"]["podSelector"]["matchLabels"], pod_labels, "NetworkPolicy");
    assert_eq!(str_at(pod, "/spec/serviceAccountName"), str_at(get("ServiceAccount"), "/metadata/name"));

    let pod_security = &pod["spec"]["securityContext"];
    assert_eq!(pod_security["runAsNonRoot"], true);
    assert_eq!(pod_security["runAsUser"], IMAGE_UID);
    assert_eq!(pod_security["fsGroup"], IMAGE_UID, "the data volume must be writable by the image's user");
    let containers = array_at(pod, "/spec/containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["runAsNonRoot"], true);
    assert!(
        strings(array_at(sc, "/capabilities/drop")).contains(&"ALL".to_string()),
        "capabilities drop ALL"
    );
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(c["resources"][kind][resource].is_string(), "resources.{kind}.{resource}");
        }
    }

    // Ports, probes and the Service.
    let ports: BTreeMap<String, i64> = array_at(c, "/ports")
        .iter()
        .map(|p| (str_at(p, "/name").to_string(), p["containerPort"].as_i64().unwrap()))
        .collect();
    assert_eq!(ports.get("grpc"), Some(&50051));
    assert_eq!(ports.get("http-admin"), Some(&9090));
    for (probe, path) in
        [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")]
    {
        assert_eq!(str_at(c, &format!("/{probe}/httpGet/path")), path, "{probe}");
        let port = &c[probe]["httpGet"]["port"];
        assert!(port == "http-admin" || port == 9090, "{probe} port {port}");
    }
    for p in array_at(get("Service"), "/spec/ports") {
        let target = &p["targetPort"];
        assert!(
            target.as_str().is_some_and(|t| ports.contains_key(t)) || target.as_i64().is_some(),
            "Service targetPort {target} names no container port"
        );
    }

    // NetworkPolicy: gRPC from labelled clients, the admin port from the monitoring namespace.
    let policy = get("NetworkPolicy");
    let rules = array_at(policy, "/spec/ingress");
    let rule_for = |port: i64| {
        rules
            .iter()
            .find(|r| array_at(r, "/ports").iter().any(|p| p["port"] == port))
            .unwrap_or_else(|| panic!("no NetworkPolicy ingress rule for port {port}"))
    };
    let grpc_from = array_at(rule_for(50051), "/from");
    assert!(
        grpc_from
            .iter()
            .all(|peer| peer["podSelector"]["matchLabels"].as_object().is_some_and(|m| !m.is_empty())),
        "port 50051 must be open to labelled client pods only: {grpc_from:?}"
    );
    let admin_from = array_at(rule_for(9090), "/from");
    assert!(
        admin_from
            .iter()
            .all(|peer| peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                == "monitoring"),
        "port 9090 must be open to the monitoring namespace only: {admin_from:?}"
    );

    // Volumes: the PVC, the ConfigMap, the Secret are the ones defined here.
    let volumes = array_at(pod, "/spec/volumes");
    let claim =
        volumes.iter().find_map(|v| v.pointer("/persistentVolumeClaim/claimName")).expect("a PVC volume");
    assert_eq!(claim, &get("PersistentVolumeClaim")["metadata"]["name"]);
    let config_map = volumes.iter().find_map(|v| v.pointer("/configMap/name")).expect("a ConfigMap volume");
    assert_eq!(config_map, &get("ConfigMap")["metadata"]["name"]);
    let env = array_at(c, "/env");
    let master =
        env.iter().find(|e| e["name"] == "TDE_BROKER_MASTER_KEY").expect("TDE_BROKER_MASTER_KEY env");
    assert_eq!(str_at(master, "/valueFrom/secretKeyRef/name"), secret_name);
    assert_eq!(str_at(master, "/valueFrom/secretKeyRef/key"), secret_key);
    let mounts = array_at(c, "/volumeMounts");
    let mount_of = |name: &str| {
        let volume = volumes
            .iter()
            .find(|v| v.pointer(name).is_some())
            .and_then(|v| v["name"].as_str())
            .unwrap_or_else(|| panic!("no volume with {name}"));
        str_at(mounts.iter().find(|m| m["name"] == volume).expect("mounted"), "/mountPath").to_string()
    };
    let data_mount = mount_of("/persistentVolumeClaim");
    let config_mount = mount_of("/configMap");
    assert!(
        mounts.iter().any(|m| m["mountPath"] == "/tmp"),
        "a writable /tmp (the root file system is read-only; SQLite may spill temp files there)"
    );

    // The container's command line, parsed by the real CLI, with the ConfigMap's TOML resolved
    // by the real configuration code (which refuses unknown keys).
    let args = strings(array_at(c, "/args"));
    let dir = tempfile::tempdir().unwrap();
    let toml_key =
        get("ConfigMap")["data"].as_object().expect("ConfigMap data").keys().next().unwrap().clone();
    let toml_file = dir.path().join(&toml_key);
    std::fs::write(&toml_file, str_at(get("ConfigMap"), &format!("/data/{toml_key}"))).unwrap();
    let parsed = serve_args(&args, "deployment.yaml args");
    assert_eq!(
        parsed.config.as_deref(),
        Some(Path::new(&config_mount).join(&toml_key).as_path()),
        "--config must name the mounted ConfigMap key"
    );
    let cfg = resolve(parsed, Some(&toml_file), "deployment.yaml");
    assert_eq!(cfg.listen, "0.0.0.0:50051".parse::<SocketAddr>().unwrap());
    assert_eq!(cfg.tls, TlsMode::Auto);
    assert!(
        cfg.data_dir.starts_with(&data_mount) && cfg.data_dir != Path::new(&data_mount),
        "the data directory {} must be a subdirectory of the volume {data_mount} (the broker sets it to 0700, \
         which it cannot do to a volume root owned by root)",
        cfg.data_dir.display()
    );
    let data_env = env.iter().find(|e| e["name"] == "TDE_BROKER_DATA_DIR").expect("TDE_BROKER_DATA_DIR env");
    assert_eq!(
        Path::new(str_at(data_env, "/value")),
        cfg.data_dir,
        "the CLI in `kubectl exec` finds the data"
    );
    let service = format!("{}.{NAMESPACE}.svc", str_at(get("Service"), "/metadata/name"));
    assert!(
        cfg.tls_names.contains(&service),
        "the dev server certificate must name {service}: {:?}",
        cfg.tls_names
    );
}

// ------------------------------------------------------------------------------------------------
// Compose, the collector, Prometheus

/// Splits `host:container[:ro]` volume and `[ip:]host:container` port strings.
fn split_colon(s: &str) -> Vec<&str> {
    s.split(':').collect()
}

#[test]
fn compose_collector_and_prometheus_files_hold_together() {
    let compose = yaml_doc(&deploy("compose.yaml"));
    let services = compose["services"].as_object().expect("services");
    for name in ["broker", "otel-collector", "prometheus"] {
        assert!(services.contains_key(name), "compose service {name}");
    }
    let named_volumes: BTreeSet<&str> =
        compose["volumes"].as_object().map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default();
    // Every bind mount's source exists; every named volume is declared; ports are strings (an
    // unquoted 50051:50051 is a base-60 integer in YAML 1.1).
    for (name, service) in services {
        for v in service["volumes"].as_array().map(|a| strings(a)).unwrap_or_default() {
            let source = split_colon(&v)[0];
            if source.starts_with('.') || source.starts_with('/') {
                assert!(deploy(source).exists(), "{name}: bind mount source {source} is missing");
            } else {
                assert!(named_volumes.contains(source), "{name}: volume {source} is not declared");
            }
        }
        if let Some(ports) = service["ports"].as_array() {
            strings(ports);
        }
        let image = service["image"].as_str().unwrap_or_else(|| panic!("{name}: no image"));
        assert!(!image.ends_with(":latest") && image.contains(':'), "{name}: pin the image tag ({image})");
    }

    let broker = &services["broker"];
    let context = deploy(str_at(broker, "/build/context"));
    assert!(context.join("Cargo.lock").is_file(), "the broker's build context must be the repository root");
    assert!(context.join(str_at(broker, "/build/dockerfile")).is_file(), "the broker's dockerfile");
    let published: BTreeSet<String> = strings(array_at(broker, "/ports"))
        .iter()
        .map(|p| split_colon(p).last().unwrap().to_string())
        .collect();
    assert_eq!(
        published,
        BTreeSet::from(["50051".to_string(), "8443".to_string(), "9090".to_string()]),
        "broker ports: gRPC, HTTPS (REST, token endpoints, Vault-KV), admin"
    );
    let volumes = strings(array_at(broker, "/volumes"));
    assert!(
        volumes.iter().any(|v| split_colon(v).get(1) == Some(&"/var/lib/tde-broker")),
        "the broker's data volume at /var/lib/tde-broker: {volumes:?}"
    );
    let test = strings(array_at(broker, "/healthcheck/test"));
    assert!(
        test.first().is_some_and(|t| t == "CMD" || t == "CMD-SHELL")
            && test.iter().any(|t| t.contains("tde-broker-healthcheck")),
        "broker healthcheck {test:?}"
    );
    let tls_names = str_at(broker, "/environment/TDE_BROKER_TLS_NAMES");
    assert!(tls_names.split(',').any(|n| n == "broker"), "the certificate must name the service `broker`");
    assert!(
        broker["environment"].get("TDE_BROKER_MASTER_KEY").is_none(),
        "an empty TDE_BROKER_MASTER_KEY stops the broker; leave it to an override file"
    );

    let collector_service = &services["otel-collector"];
    assert!(str_at(collector_service, "/image").starts_with("otel/opentelemetry-collector-contrib:"));
    let collector_config_mount = strings(array_at(collector_service, "/volumes"))
        .into_iter()
        .find(|v| v.starts_with("./otel-collector.yaml:"))
        .expect("otel-collector.yaml mounted");
    let command = strings(array_at(collector_service, "/command"));
    assert!(
        command.contains(&format!("--config={}", split_colon(&collector_config_mount)[1])),
        "the collector's --config names the mounted file: {command:?}"
    );
    assert!(
        strings(array_at(&services["prometheus"], "/volumes"))
            .iter()
            .any(|v| v.starts_with("./prometheus.yml:/etc/prometheus/prometheus.yml")),
        "prometheus.yml mounted"
    );

    // The collector: OTLP gRPC on 4317, every pipeline component defined, Prometheus and debug
    // exporters in use.
    let collector = yaml_doc(&deploy("otel-collector.yaml"));
    assert!(str_at(&collector, "/receivers/otlp/protocols/grpc/endpoint").ends_with(":4317"));
    let pipelines = collector["service"]["pipelines"].as_object().expect("service.pipelines");
    let mut used_exporters = BTreeSet::new();
    for (name, pipeline) in pipelines {
        for section in ["receivers", "processors", "exporters"] {
            for component in strings(pipeline[section].as_array().map(Vec::as_slice).unwrap_or_default()) {
                assert!(
                    collector[section].get(&component).is_some(),
                    "pipeline {name}: {section} {component} is not defined"
                );
                if section == "exporters" {
                    used_exporters.insert(component);
                }
            }
        }
    }
    for extension in
        strings(collector["service"]["extensions"].as_array().map(Vec::as_slice).unwrap_or_default())
    {
        assert!(collector["extensions"].get(&extension).is_some(), "extension {extension} is not defined");
    }
    assert!(used_exporters.contains("prometheus") && used_exporters.contains("debug"), "{used_exporters:?}");
    let exported_port =
        str_at(&collector, "/exporters/prometheus/endpoint").rsplit(':').next().unwrap().to_string();
    let telemetry_port = collector
        .pointer("/service/telemetry/metrics/readers/0/pull/exporter/prometheus/port")
        .map(Value::to_string);

    // Prometheus scrapes the broker's /metrics and the collector.
    let prometheus = yaml_doc(&deploy("prometheus.yml"));
    let mut targets = BTreeMap::new();
    for job in array_at(&prometheus, "/scrape_configs") {
        for sc in array_at(job, "/static_configs") {
            for t in strings(array_at(sc, "/targets")) {
                targets.insert(t, job.clone());
            }
        }
    }
    let broker_job = targets.get("broker:9090").expect("a scrape target broker:9090");
    assert_eq!(broker_job.get("metrics_path").and_then(Value::as_str).unwrap_or("/metrics"), "/metrics");
    assert!(
        targets.contains_key(&format!("otel-collector:{exported_port}")),
        "scrape the collector's exporter"
    );
    if let Some(port) = telemetry_port {
        assert!(
            targets.contains_key(&format!("otel-collector:{port}")),
            "scrape the collector's own metrics"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Dockerfile

/// The instructions of a Dockerfile: continuation lines joined, comments dropped.
fn dockerfile_instructions(source: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in source.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, rest) = current.split_once(char::is_whitespace).unwrap_or((current.as_str(), ""));
        out.push((keyword.to_ascii_uppercase(), rest.trim().to_string()));
        current.clear();
    }
    out
}

/// The runtime stage's `ENV key=value …` settings.
fn dockerfile_env() -> BTreeMap<String, String> {
    let instructions = dockerfile_instructions(&read(&deploy("Dockerfile")));
    let runtime = instructions.iter().rposition(|(k, _)| k == "FROM").expect("FROM");
    instructions[runtime..]
        .iter()
        .filter(|(k, _)| k == "ENV")
        .flat_map(|(_, v)| v.split_whitespace())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("ENV {kv}: use the key=value form"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn json_argv(rest: &str, what: &str) -> Vec<String> {
    serde_json::from_str(rest)
        .unwrap_or_else(|e| panic!("{what} must be a JSON array (exec form): {rest}: {e}"))
}

#[test]
fn dockerfile_builds_on_bookworm_and_runs_as_a_fixed_non_root_user_with_a_healthcheck() {
    let instructions = dockerfile_instructions(&read(&deploy("Dockerfile")));
    let stages: Vec<usize> =
        instructions.iter().enumerate().filter(|(_, (k, _))| k == "FROM").map(|(i, _)| i).collect();
    assert_eq!(stages.len(), 2, "a builder and a runtime stage");
    let builder = &instructions[stages[0]..stages[1]];
    let runtime = &instructions[stages[1]..];
    assert!(
        builder[0].1.to_ascii_lowercase().starts_with("rust:1-bookworm as "),
        "builder: {}",
        builder[0].1
    );
    assert!(
        builder.iter().any(|(k, v)| k == "RUN" && v.contains("cargo build --release --locked")),
        "the builder runs cargo build --release --locked"
    );
    let base = &runtime[0].1;
    assert!(
        base == "debian:bookworm-slim" || base.starts_with("gcr.io/distroless/cc"),
        "runtime base image {base}"
    );
    let last = |keyword: &str| {
        runtime
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {keyword} in the runtime stage"))
    };

    // USER: numeric, so that Kubernetes' runAsNonRoot can check it, and not root.
    let user = last("USER");
    let uid: i64 =
        user.split(':').next().unwrap().parse().unwrap_or_else(|_| panic!("USER {user} is not numeric"));
    assert_eq!(uid, IMAGE_UID, "USER {user}: a fixed, non-root UID");
    let healthcheck = last("HEALTHCHECK");
    let cmd = healthcheck
        .split_once("CMD")
        .map(|(_, c)| c.trim())
        .unwrap_or_else(|| panic!("HEALTHCHECK {healthcheck}"));
    let probe = json_argv(cmd, "HEALTHCHECK CMD");
    let copied_to = |dest: &str| {
        runtime
            .iter()
            .filter(|(k, _)| k == "COPY")
            .find(|(_, v)| v.split_whitespace().last() == Some(dest))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("nothing is copied to {dest}"))
    };
    let script = copied_to(&probe[0]);
    let script_source = script.split_whitespace().rev().nth(1).unwrap();
    let script_text = read(&root().join(script_source));
    assert!(script_text.starts_with("#!/bin/bash\n"), "{script_source} runs with bash (it uses /dev/tcp)");
    let exposed: BTreeSet<&str> =
        runtime.iter().filter(|(k, _)| k == "EXPOSE").flat_map(|(_, v)| v.split_whitespace()).collect();
    assert!(exposed.contains("50051") && exposed.contains("9090"), "EXPOSE {exposed:?}");
    assert!(last("VOLUME").contains("/var/lib/tde-broker"), "VOLUME /var/lib/tde-broker");

    // What the container runs: ENTRYPOINT + CMD, through the real CLI and configuration code.
    let entrypoint = json_argv(&last("ENTRYPOINT"), "ENTRYPOINT");
    assert_eq!(entrypoint, ["/usr/local/bin/tde-broker"]);
    let argv = json_argv(&last("CMD"), "CMD");
    let cfg = resolve(serve_args(&argv, "Dockerfile CMD"), None, "Dockerfile CMD");
    assert_eq!(cfg.listen, "0.0.0.0:50051".parse::<SocketAddr>().unwrap());
    assert_eq!(cfg.data_dir, Path::new("/var/lib/tde-broker"));
    assert_eq!(cfg.tls, TlsMode::Auto);
    assert!(argv.windows(2).any(|w| w[0] == "--http-listen" && w[1] == "0.0.0.0:9090"), "CMD --http-listen");
    // The CLI in the container and the health check's gRPC call reach that broker.
    let env = dockerfile_env();
    assert_eq!(
        env.get("TDE_BROKER_DATA_DIR").map(PathBuf::from).as_ref(),
        Some(&cfg.data_dir),
        "ENV TDE_BROKER_DATA_DIR"
    );
    assert_eq!(
        env.get("TDE_BROKER_SERVER").map(String::as_str),
        Some(format!("https://127.0.0.1:{}", cfg.listen.port()).as_str()),
        "ENV TDE_BROKER_SERVER"
    );

    // The build context leaves out build output, history and secrets.
    let ignore: BTreeSet<String> = read(&deploy("Dockerfile.dockerignore"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    for must in ["target", ".git", "**/master.key", "**/admin.token"] {
        assert!(ignore.contains(must), "Dockerfile.dockerignore must exclude {must}");
    }
    assert!(!ignore.iter().any(|l| l.contains("healthcheck")), "the image copies deploy/healthcheck.sh");
}

// ------------------------------------------------------------------------------------------------
// systemd

/// The unit's `key=value` lines by section (a key may repeat).
fn unit_sections(source: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current = None;
    for line in source.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.to_string());
            sections.entry(name.to_string()).or_default();
            continue;
        }
        let section = current.clone().unwrap_or_else(|| panic!("line outside a section: {line}"));
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("not key=value: {line}"));
        sections.get_mut(&section).unwrap().push((k.trim().to_string(), v.trim().to_string()));
    }
    sections
}

fn unit_values<'a>(
    sections: &'a BTreeMap<String, Vec<(String, String)>>,
    section: &str,
    key: &str,
) -> Vec<&'a str> {
    sections.get(section).into_iter().flatten().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
}

/// The shell script of `ExecStart=/bin/sh -c '…'`, with systemd's `$$` turned into `$`.
fn exec_start_script(exec_start: &str) -> String {
    let quoted =
        exec_start.strip_prefix("/bin/sh -c '").and_then(|s| s.strip_suffix('\'')).unwrap_or_else(|| {
            panic!("ExecStart should be /bin/sh -c '…' (it reads the credential first): {exec_start}")
        });
    assert!(!quoted.contains('\''), "one single-quoted script");
    quoted.replace("$$", "$")
}

/// The broker's argv in the unit's script (after `exec /usr/local/bin/tde-broker`).
fn exec_start_argv(script: &str) -> Vec<String> {
    let (_, command) =
        script.split_once("exec /usr/local/bin/tde-broker ").expect("exec /usr/local/bin/tde-broker");
    command.split_whitespace().map(str::to_string).collect()
}

#[test]
fn systemd_unit_is_verified_and_hardened() {
    let path = deploy("systemd/tde-broker.service");
    let source = read(&path);
    let sections = unit_sections(&source);
    for section in ["Unit", "Service", "Install"] {
        assert!(sections.contains_key(section), "[{section}] section");
    }
    let one = |key: &str| {
        let v = unit_values(&sections, "Service", key);
        assert_eq!(v.len(), 1, "one {key}= in [Service]: {v:?}");
        v[0]
    };
    assert!(
        unit_values(&sections, "Service", "DynamicUser") == ["yes"]
            || !unit_values(&sections, "Service", "User").is_empty(),
        "DynamicUser=yes or a dedicated User="
    );
    for (key, value) in [
        ("StateDirectory", "tde-broker"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("ProtectHome", "yes"),
    ] {
        assert_eq!(one(key), value, "{key}=");
    }
    let families = one("RestrictAddressFamilies");
    assert!(
        families.contains("AF_INET") && !families.contains("AF_PACKET") && !families.contains("AF_NETLINK")
    );
    assert!(unit_values(&sections, "Service", "SystemCallFilter").contains(&"@system-service"));
    let credential = one("LoadCredential");
    assert!(credential.starts_with("master.key:/"), "LoadCredential=master.key:<path>: {credential}");
    assert!(!unit_values(&sections, "Install", "WantedBy").is_empty(), "WantedBy= in [Install]");

    // ExecStart: every `$` is systemd's `$$` escape (a lone `$` would be expanded by systemd,
    // not by the shell); the broker's command passes the real CLI and configuration code.
    let exec_start = one("ExecStart");
    let lone_dollar = exec_start.replace("$$", "").contains('$');
    assert!(!lone_dollar, "ExecStart has a `$` that systemd would expand itself: {exec_start}");
    let script = exec_start_script(exec_start);
    assert!(
        script.contains("${CREDENTIALS_DIRECTORY}/master.key") && script.contains("TDE_BROKER_MASTER_KEY")
    );
    let argv = exec_start_argv(&script);
    let cfg = resolve(serve_args(&argv, "ExecStart"), Some(&deploy("systemd/config.toml")), "ExecStart");
    assert_eq!(
        cfg.data_dir,
        Path::new("/var/lib").join(one("StateDirectory")),
        "--data-dir is the StateDirectory"
    );
    assert!(cfg.listen.ip().is_loopback(), "loopback by default (IPAddressAllow=localhost)");
    let config_flag = argv.windows(2).find(|w| w[0] == "--config").map(|w| w[1].clone()).expect("--config");
    assert!(config_flag.starts_with(&format!("/etc/{}/", one("ConfigurationDirectory"))));

    // systemd's own checks.
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze is needed to verify deploy/systemd/tde-broker.service: apt-get install systemd"
    );
    let out = output(Command::new("systemd-analyze").arg("verify").arg(&path), "systemd-analyze verify");
    // verify exits 0 on unknown keys and unparsable values and only says so: any word is a failure.
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success() && said.is_empty(), "systemd-analyze verify {}:\n{said}", path.display());
    eprintln!("ran the structural check and systemd-analyze verify");
    let out = output(
        Command::new("systemd-analyze").args(["security", "--offline=yes", "--threshold=20"]).arg(&path),
        "systemd-analyze security",
    );
    let said = text(&out.stderr);
    if said.contains("unrecognized option") || said.contains("Unknown option") {
        eprintln!("this systemd-analyze has no offline security check (systemd < 250): {said}");
    } else {
        let report = text(&out.stdout);
        let overall = report.lines().find(|l| l.contains("Overall exposure level")).unwrap_or("");
        assert!(out.status.success(), "systemd-analyze security: exposure above 2.0:\n{report}\n{said}");
        eprintln!("ran systemd-analyze security: {overall}");
    }
}

// ------------------------------------------------------------------------------------------------
// The unit's start line and the container health check against the real binary

/// Runs deploy/healthcheck.sh with `env`; returns (exit code, output).
fn healthcheck(env: &[(&str, String)]) -> (i32, String) {
    let mut command = Command::new("bash");
    command.arg(deploy("healthcheck.sh")).env_remove("TDE_BROKER_HEALTHCHECK_HTTP");
    for (k, v) in env {
        command.env(k, v);
    }
    let started = Instant::now();
    let out = output(&mut command, "bash deploy/healthcheck.sh");
    assert!(started.elapsed() < Duration::from_secs(15), "the health check took {:?}", started.elapsed());
    (out.status.code().unwrap_or(-1), format!("{}{}", text(&out.stdout), text(&out.stderr)))
}

/// An HTTP server answering one request with `status_line` (or with nothing when `None`);
/// returns its address and the request line it got.
fn one_shot_http(status_line: Option<&'static str>) -> (String, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        // Never block the suite forever: a health check that does not even connect is a failure.
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return format!("(no connection: {e})"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        if let Some(status) = status_line {
            let body = "ok";
            let response =
                format!("{status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            stream.write_all(response.as_bytes()).unwrap();
        }
        String::from_utf8_lossy(&request).lines().next().unwrap_or_default().to_string()
    });
    (addr, handle)
}

#[test]
fn healthcheck_judges_the_http_admin_listener_by_its_healthz_status() {
    for (status, healthy) in
        [(Some("HTTP/1.1 200 OK"), true), (Some("HTTP/1.1 503 Service Unavailable"), false), (None, false)]
    {
        let (addr, server) = one_shot_http(status);
        // A gRPC fallback could not succeed: the verdict is the HTTP answer's.
        let (code, said) = healthcheck(&[
            ("TDE_BROKER_HEALTHCHECK_HTTP", addr.clone()),
            ("TDE_BROKER_BIN", "/nonexistent/tde-broker".to_string()),
        ]);
        assert_eq!(server.join().unwrap(), "GET /healthz HTTP/1.1");
        assert_eq!(code, if healthy { 0 } else { 1 }, "answer {status:?}: {said}");
        assert!(said.contains(&addr) && !said.contains("gRPC"), "{said}");
    }
}

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_units_start_line_runs_the_broker_with_the_credential_and_the_healthcheck_follows_it() {
    let bin = env!("CARGO_BIN_EXE_tde-broker");
    let unit = read(&deploy("systemd/tde-broker.service"));
    let sections = unit_sections(&unit);
    let script = exec_start_script(unit_values(&sections, "Service", "ExecStart")[0]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    std::fs::write(credentials.join("master.key"), format!("{key}\n")).unwrap();

    // The unit's script with this machine's paths and free ports.
    let grpc_port = free_port();
    let http_port = free_port();
    let argv = exec_start_argv(&script);
    let value_of = |flag: &str| argv.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone());
    let mut script = script
        .replace("/usr/local/bin/tde-broker", bin)
        .replace(&value_of("--listen").unwrap(), &format!("127.0.0.1:{grpc_port}"))
        .replace(&value_of("--data-dir").unwrap(), data.to_str().unwrap())
        .replace(&value_of("--config").unwrap(), deploy("systemd/config.toml").to_str().unwrap());
    let http = value_of("--http-listen").expect("--http-listen in ExecStart");
    script = script.replace(&http, &format!("127.0.0.1:{http_port}"));
    let http_addr = format!("127.0.0.1:{http_port}");
    let log = dir.path().join("broker.log");
    let child = Command::new("/bin/sh")
        .args(["-c", &script])
        .env("CREDENTIALS_DIRECTORY", &credentials)
        .env("RUST_LOG", "warn")
        .env_remove("TDE_BROKER_MASTER_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("run the unit's ExecStart script");
    let mut broker = Broker(child);

    let deadline = Instant::now() + Duration::from_secs(60);
    while !(data.join("admin.token").is_file()
        && TcpStream::connect(("127.0.0.1", grpc_port)).is_ok()
        && data.join("tls/ca.pem").is_file())
    {
        if let Some(status) = broker.0.try_wait().unwrap() {
            panic!("the broker started by the unit's script exited ({status}):\n{}", read(&log));
        }
        assert!(Instant::now() < deadline, "the broker did not come up:\n{}", read(&log));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !data.join("master.key").exists(),
        "the broker generated its own master key instead of using the credential"
    );

    let env = [
        ("TDE_BROKER_HEALTHCHECK_HTTP", http_addr),
        ("TDE_BROKER_BIN", bin.to_string()),
        // The image's own setting, on this test's port.
        (
            "TDE_BROKER_SERVER",
            dockerfile_env()["TDE_BROKER_SERVER"].replace(":50051", &format!(":{grpc_port}")),
        ),
        ("TDE_BROKER_DATA_DIR", data.to_str().unwrap().to_string()),
    ];
    let (code, said) = healthcheck(&env);
    assert_eq!(code, 0, "a running broker is unhealthy: {said}\nbroker log:\n{}", read(&log));
    assert!(said.contains("healthy:"), "{said}");

    broker.0.kill().unwrap();
    broker.0.wait().unwrap();
    let (code, said) = healthcheck(&env);
    assert_eq!(code, 1, "a stopped broker is healthy: {said}");
    assert!(said.contains("unhealthy"), "{said}");
}
