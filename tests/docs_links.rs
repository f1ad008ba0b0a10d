//! The repository stands on its own: nothing in it points at documents a reader of the
//! repository cannot open. The contract lives in `docs/API.md`, the design rules and the cloud's
//! behaviour in `docs/RULES.md`, the TDE statements the scenarios are named after in
//! `docs/TDE-SCENARIOS.md`, the performance targets in `docs/PERFORMANCE.md`.
//!
//! Two checks over every text file git knows of (tracked, or new and not ignored), `target/`
//! and `.git` aside:
//! - no reference to the documents the project was started from, which live outside it (the
//!   phrases are spelled out in `outside_references`);
//! - every relative Markdown link `[text](path)` or `[text](path#anchor)` of a `.md` file names
//!   a file inside the repository, and its anchor (or a pure `#anchor`) a heading or an `id` of
//!   that file. Web and mail links are not followed.
//!
//! Further checks keep the documents true: the tests that docs/RULES.md and docs/TDE-SCENARIOS.md
//! cite exist, every scenario test of `tests/tde.rs` is described, the README's configuration table
//! names every flag of `tde-broker serve`, and every `tde-broker:<tag>` image reference under
//! `deploy/` and in the README is the package version.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Text files of the repository, relative to its root: what git tracks plus new files it does
/// not ignore (so a document added in the same change is checked before it is committed).
fn text_files() -> Vec<PathBuf> {
    let out = Command::new("git")
        .args(["ls-files", "-z", "--cached", "--others", "--exclude-standard"])
        .current_dir(root())
        .output()
        .expect("run `git ls-files` (the test reads the repository's file list from git)");
    assert!(out.status.success(), "git ls-files failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut files: Vec<PathBuf> = out
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(String::from_utf8_lossy(p).into_owned()))
        .filter(|p| {
            let first = p.components().next().and_then(|c| c.as_os_str().to_str()).unwrap_or("");
            first != "target" && first != ".git"
        })
        .filter(|p| root().join(p).is_file())
        .collect();
    files.sort();
    files.dedup();
    assert!(files.len() > 50, "too few files found ({}): is this the repository root?", files.len());
    files
}

/// The file's text, or `None` for a binary file.
fn read_text(rel: &Path) -> Option<String> {
    let bytes = std::fs::read(root().join(rel)).ok()?;
    if bytes.contains(&0) {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// Phrases that name documents outside the repository. Spelled in pieces so this file does not
/// match itself.
fn outside_references() -> Vec<String> {
    vec![
        ["..", "/shared"].concat(),
        ["shared", "/seeds"].concat(),
        ["/work", "/shared"].concat(),
        ["DESIGN", " §"].concat(),
        ["DESIGN", ".md"].concat(),
        ["azure", "-semantics"].concat(),
    ]
}

#[test]
fn no_link_points_outside_the_repository() {
    let phrases = outside_references();
    let mut problems = Vec::new();
    let mut markdown = 0;
    for rel in text_files() {
        let Some(text) = read_text(&rel) else { continue };
        for (n, line) in text.lines().enumerate() {
            for p in &phrases {
                if line.contains(p.as_str()) {
                    problems.push(format!(
                        "{}:{}: names `{p}`, which is outside the repository: {}",
                        rel.display(),
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
        if rel.extension().is_some_and(|e| e == "md") {
            markdown += 1;
            problems.extend(broken_links(&rel, &text));
        }
    }
    assert!(markdown >= 4, "the Markdown files were not found ({markdown})");
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}

/// Every relative link of a Markdown file that does not resolve, as `file:line: why`.
fn broken_links(rel: &Path, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let dir = rel.parent().unwrap_or(Path::new(""));
    for (line_no, target) in links(text) {
        let at = format!("{}:{line_no}", rel.display());
        let lower = target.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = match target.split_once('#') {
            Some((p, a)) => (p, Some(a)),
            None => (target.as_str(), None),
        };
        let file = if path.is_empty() {
            rel.to_path_buf()
        } else {
            if path.starts_with('/') || path.contains("://") {
                problems.push(format!("{at}: link `{target}` is not relative to the repository"));
                continue;
            }
            match normalize(&dir.join(path)) {
                Some(p) => p,
                None => {
                    problems.push(format!("{at}: link `{target}` leaves the repository"));
                    continue;
                }
            }
        };
        let full = root().join(&file);
        if !full.exists() {
            problems.push(format!("{at}: link `{target}`: {} does not exist", file.display()));
            continue;
        }
        let Some(anchor) = anchor.filter(|a| !a.is_empty()) else { continue };
        if file.extension().is_some_and(|e| e == "md") {
            let text = std::fs::read_to_string(&full).unwrap_or_default();
            if !anchors(&text).contains(anchor) {
                problems.push(format!(
                    "{at}: link `{target}`: {} has no heading or id `{anchor}`",
                    file.display()
                ));
            }
        }
    }
    problems
}

/// `(line, target)` of every inline link `[text](target)` outside fenced code blocks and code
/// spans.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut fenced = false;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop code spans: `[a](b)` inside backticks is not a link.
        let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = prose.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            // A title after the target (`[a](b "title")`) is not part of it.
            let target = after[..end].split_whitespace().next().unwrap_or("");
            let target = target.trim_start_matches('<').trim_end_matches('>');
            if !target.is_empty() {
                found.push((n + 1, target.to_string()));
            }
            rest = &after[end + 1..];
        }
    }
    found
}

/// `a/b/../c` → `a/c`; `None` when the path climbs above the repository root.
fn normalize(p: &Path) -> Option<PathBuf> {
    let mut out: Vec<&std::ffi::OsStr> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop()?;
            }
            Component::Normal(s) => out.push(s),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out.iter().collect())
}

/// The anchors a Markdown file offers: its headings as GitHub slugs them (lower case, spaces to
/// hyphens, punctuation but `-` and `_` dropped; a repeated heading gets `-1`, `-2`, ...) and
/// every `id="…"` or `name="…"` of an HTML element.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        if let Some(h) = line.strip_prefix('#') {
            let title = h.trim_start_matches('#');
            if title.starts_with(' ') {
                let base = slug(title.trim());
                let mut candidate = base.clone();
                let mut n = 0;
                while set.contains(&candidate) {
                    n += 1;
                    candidate = format!("{base}-{n}");
                }
                set.insert(candidate);
            }
        }
        for attr in ["id=\"", "name=\""] {
            let mut rest = line;
            while let Some(i) = rest.find(attr) {
                let after = &rest[i + attr.len()..];
                let Some(end) = after.find('"') else { break };
                set.insert(after[..end].to_string());
                rest = &after[end..];
            }
        }
    }
    set
}

fn slug(title: &str) -> String {
    // Inline markup does not reach the slug: `code` keeps its text, links keep their text.
    let mut s = String::new();
    for ch in title.chars() {
        if ch.is_alphanumeric() || ch == '-' || ch == '_' {
            s.extend(ch.to_lowercase());
        } else if ch == ' ' {
            s.push('-');
        }
    }
    s
}

#[test]
fn the_link_checker_reads_links_anchors_and_paths_as_github_does() {
    let text = "# Rules and `names`\n\n## R1. Keys: the data plane\n<a id=\"r1-2\"></a>\n\
                see [a](docs/API.md#errors \"title\") and `[not](a-link)`\n```\n[x](nowhere)\n```\n\
                [web](https://example.com) [here](#rules-and-names)\n";
    let found: Vec<String> = links(text).into_iter().map(|(_, t)| t).collect();
    assert_eq!(found, ["docs/API.md#errors", "https://example.com", "#rules-and-names"]);
    let a = anchors(text);
    for want in ["rules-and-names", "r1-keys-the-data-plane", "r1-2"] {
        assert!(a.contains(want), "{want} in {a:?}");
    }
    assert_eq!(normalize(Path::new("docs/../README.md")), Some(PathBuf::from("README.md")));
    assert_eq!(normalize(Path::new("docs/../../x.md")), None);
    assert!(outside_references().iter().all(|p| !p.is_empty()));
}

#[test]
fn deployment_files_tag_the_image_with_the_package_version() {
    let version = env!("CARGO_PKG_VERSION");
    let mut tags = Vec::new();
    for rel in text_files() {
        let in_deploy = rel.starts_with("deploy");
        if !in_deploy && rel != Path::new("README.md") {
            continue;
        }
        let Some(text) = read_text(&rel) else { continue };
        for (n, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(i) = rest.find("tde-broker:") {
                let after = &rest[i + "tde-broker:".len()..];
                let tag: String = after
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                    .collect();
                // `tde-broker:/path` (a container path) and `tde-broker: text` are no image tags.
                if tag.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) {
                    tags.push((format!("{}:{}", rel.display(), n + 1), tag));
                }
                rest = after;
            }
        }
    }
    assert!(
        tags.iter().any(|(at, _)| at.starts_with("deploy/k8s/")),
        "the Kubernetes Deployment names the image: {tags:?}"
    );
    let wrong: Vec<_> = tags.iter().filter(|(_, t)| t != version).collect();
    assert!(wrong.is_empty(), "image tags other than the package version {version}: {wrong:?}");
}

/// Every test a rule or scenario document cites exists: `file::test` for `tests/file.rs`, and
/// `module::tests::test` or `…::test` for a unit test somewhere in `src/`.
#[test]
fn the_tests_the_documents_cite_exist() {
    let tests_dir = root().join("tests");
    let src: String = text_files()
        .iter()
        .filter(|p| p.starts_with("src") && p.extension().is_some_and(|e| e == "rs"))
        .filter_map(|p| read_text(p))
        .collect::<Vec<_>>()
        .join("\n");
    let mut problems = Vec::new();
    let mut cited = 0;
    for doc in ["docs/RULES.md", "docs/TDE-SCENARIOS.md"] {
        let text = std::fs::read_to_string(root().join(doc)).unwrap_or_else(|e| panic!("{doc}: {e}"));
        for token in text.split('`').skip(1).step_by(2) {
            let parts: Vec<&str> = token.split("::").collect();
            let Some(name) = parts.last().filter(|_| parts.len() >= 2) else { continue };
            if !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
                continue;
            }
            let file = tests_dir.join(format!("{}.rs", parts[0]));
            let found = if parts.len() == 2 && file.is_file() {
                std::fs::read_to_string(&file).unwrap_or_default().contains(&format!("fn {name}("))
            } else if parts[0] == "…" || parts.contains(&"tests") {
                src.contains(&format!("fn {name}("))
            } else {
                continue;
            };
            cited += 1;
            if !found {
                problems.push(format!("{doc}: `{token}` names no test"));
            }
        }
    }
    assert!(cited > 100, "only {cited} test citations found");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every scenario test of `tests/tde.rs` is described in docs/TDE-SCENARIOS.md.
#[test]
fn every_tde_scenario_is_described() {
    let tde = std::fs::read_to_string(root().join("tests/tde.rs")).expect("tests/tde.rs");
    let doc = std::fs::read_to_string(root().join("docs/TDE-SCENARIOS.md")).expect("docs/TDE-SCENARIOS.md");
    let mut missing = Vec::new();
    let mut lines = tde.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "#[tokio::test]" {
            continue;
        }
        let Some(f) = lines.next() else { break };
        let Some(name) = f.trim().strip_prefix("async fn ").and_then(|r| r.split('(').next()) else {
            continue;
        };
        if !doc.contains(&format!("tde::{name}`")) {
            missing.push(name.to_string());
        }
    }
    assert!(missing.is_empty(), "tests of tests/tde.rs not in docs/TDE-SCENARIOS.md: {missing:?}");
}

/// The README's configuration table names every flag of `tde-broker serve`.
#[test]
fn the_readme_lists_every_serve_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_tde-broker"))
        .args(["serve", "--help"])
        .output()
        .expect("serve --help");
    let help = String::from_utf8_lossy(&out.stdout);
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let client_options = help.find("Client options:").unwrap_or(help.len());
    let flags: Vec<&str> = help[..client_options]
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .filter_map(|l| l.split([' ', '=']).next())
        .filter(|f| *f != "help")
        .collect();
    assert!(flags.len() > 15, "flags of serve --help: {flags:?}");
    let missing: Vec<_> = flags.iter().filter(|f| !readme.contains(&format!("`--{f}"))).collect();
    assert!(missing.is_empty(), "README.md's configuration table misses {missing:?}");
}
