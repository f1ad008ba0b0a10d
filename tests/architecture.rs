//! The layering rules of ARCHITECTURE.md ("Layers: who may import whom"), checked on the source:
//! every `crate::<module>` a file of `src/` names (outside its `#[cfg(test)]` modules) is an edge
//! from its top-level module to that module. A rule broken or a cycle closed fails with the file
//! and the import, so the map in ARCHITECTURE.md stays true.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `(from, to, why)`: imports that must never exist.
const NEVER: &[(&str, &str, &str)] = &[
    ("model", "*", "the rules know no runtime, storage or wire"),
    ("telemetry", "*", "observing does not reach into the broker, the adapters or the audit log"),
    ("policy", "store", "decisions are pure"),
    ("policy", "broker", "decisions are pure"),
    ("crypto", "store", "crypto does no I/O"),
    ("crypto", "broker", "crypto knows no runtime"),
    ("store", "broker", "storage does not call up"),
    ("audit", "config", "the audit log owns its configuration type"),
    ("audit", "broker", "the audit log records what the edge tells it"),
    ("broker", "grpc", "only the adapters know the wire"),
    ("broker", "http", "only the adapters know the wire"),
    ("broker", "rest", "only the adapters know the wire"),
    ("grpc", "rest", "adapters are independent of each other"),
    ("rest", "grpc", "adapters are independent of each other"),
    ("broker", "server", "the core does not know how it is started"),
    ("broker", "cli", "the core does not know its command line"),
    ("broker", "audit", "the edge writes audit records"),
    ("broker", "config", "the broker takes its settings as values"),
    ("seed", "server", "start-up calls the seed, not the other way round"),
];

/// The layout of `src/lib.rs`, leaves first: a module imports only modules before it.
const ORDER: &[&str] = &[
    "model",
    "policy",
    "crypto",
    "store",
    "telemetry",
    "broker",
    "audit",
    "listener",
    "config",
    "tls",
    "auth",
    "grpc",
    "http",
    "rest",
    "seed",
    "server",
    "cli",
];

/// Modules below the adapters may import only these (beyond themselves).
const ALLOWED: &[(&str, &[&str])] = &[
    ("model", &[]),
    ("telemetry", &[]),
    ("policy", &["model"]),
    ("crypto", &["model"]),
    ("store", &["model"]),
    ("audit", &["telemetry"]),
    ("listener", &[]),
    ("broker", &["model", "policy", "crypto", "store", "telemetry"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text of a file without its `#[cfg(test)] mod … { … }` blocks (test-only imports do not
/// count) and without comments (a doc link is not an import).
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let Some(open) = after.find('{') else {
            rest = "";
            break;
        };
        let header = &after[..open];
        if !header.contains("mod ") || header.contains(';') {
            // Not a test module: keep the attribute and go on.
            out.push_str("#[cfg(test)]");
            rest = &after["#[cfg(test)]".len()..];
            continue;
        }
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Top-level modules named by `crate::x` or `crate::{x, y::z}` in `code`.
fn imported(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut names = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let after = &code[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let inside = group.split('}').next().unwrap_or("");
            names.extend(inside.split(',').map(|p| ident(p.trim())).filter(|n| !n.is_empty()));
        } else {
            let n = ident(after);
            if !n.is_empty() {
                names.insert(n);
            }
        }
    }
    names
}

/// Edges `from -> to` with the files that make them.
fn edges() -> BTreeMap<(String, String), BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let top = rel.components().next().expect("a component").as_os_str().to_string_lossy();
        let from = top.strip_suffix(".rs").unwrap_or(&top).to_string();
        if from == "lib" || from == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read source");
        for to in imported(&code_of(&text)) {
            if to != from {
                edges.entry((from.clone(), to)).or_default().insert(rel.display().to_string());
            }
        }
    }
    edges
}

#[test]
fn the_import_scanner_sees_groups_paths_and_skips_tests_and_comments() {
    let code = code_of(
        "use crate::{model::Key, policy};\nlet x = crate::store::open();\n// crate::grpc in a comment\n\
         #[cfg(test)]\nmod tests {\n    use crate::broker::Broker;\n    fn f() { if true { } }\n}\n\
         #[cfg(test)]\nfn helper() { crate::cli::run(); }\n",
    );
    let names: Vec<String> = imported(&code).into_iter().collect();
    assert_eq!(names, ["cli", "model", "policy", "store"]);
}

#[test]
fn no_module_imports_what_its_layer_forbids() {
    let edges = edges();
    assert!(edges.len() > 20, "the scan found too few imports: {edges:?}");
    let mut broken = Vec::new();
    for ((from, to), files) in &edges {
        for (f, t, why) in NEVER {
            if f == from && (*t == "*" || t == to) {
                broken.push(format!("{from} -> {to} ({why}): {files:?}"));
            }
        }
        if let Some((_, allowed)) = ALLOWED.iter().find(|(m, _)| m == from)
            && !allowed.contains(&to.as_str())
        {
            broken.push(format!("{from} -> {to} (not in {from}'s allowed imports {allowed:?}): {files:?}"));
        }
    }
    assert!(broken.is_empty(), "layering rules broken:\n{}", broken.join("\n"));
}

#[test]
fn every_import_points_down_the_layout_of_lib_rs() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).expect("lib.rs");
    let declared: Vec<&str> =
        lib.lines().filter_map(|l| l.strip_prefix("pub mod ")).map(|l| l.trim_end_matches(';')).collect();
    let mut listed: Vec<&str> = ORDER.to_vec();
    listed.sort_unstable();
    assert_eq!(listed, declared, "ORDER names every module of src/lib.rs");
    let documented: Vec<&str> =
        lib.lines().filter_map(|l| l.strip_prefix("//! - [`")).filter_map(|l| l.split('`').next()).collect();
    assert_eq!(documented, ORDER, "src/lib.rs's layout comment lists the modules in layer order");
    let rank = |m: &str| ORDER.iter().position(|o| *o == m);
    let upward: Vec<String> = edges()
        .into_iter()
        .filter(|((from, to), _)| rank(to) >= rank(from))
        .map(|((from, to), files)| format!("{from} -> {to}: {files:?}"))
        .collect();
    assert!(upward.is_empty(), "imports pointing up the layout:\n{}", upward.join("\n"));
}

#[test]
fn top_level_modules_form_no_cycle() {
    let edges = edges();
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        graph.entry(from).or_default().insert(to);
    }
    // Depth-first search for a back edge; reports the cycle it closes.
    fn visit<'a>(
        node: &'a str,
        graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(at) = path.iter().position(|n| *n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node);
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            let files: Vec<_> = cycle
                .windows(2)
                .map(|w| format!("{} -> {}: {:?}", w[0], w[1], edges[&(w[0].to_string(), w[1].to_string())]))
                .collect();
            panic!("module cycle {}:\n{}", cycle.join(" -> "), files.join("\n"));
        }
    }
}
