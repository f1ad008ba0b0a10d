//! The README's front door, run as written: its two set-up commands, then its walkthrough's
//! shell blocks pasted in order into a terminal. Every command must succeed, except those the
//! README shows failing (a following `#   error: …` line), which must fail with that error; a
//! command with a trailing `# WORDS` comment must print those words.
//!
//! What cannot run here is mapped, and only that: `cargo run --release --` is the binary under
//! test (what it runs once built), placed at `./target/release/tde-broker` of a fresh directory;
//! the broker listens on free ports given through the environment (`TDE_BROKER_LISTEN`,
//! `TDE_BROKER_SERVER`), so a broker the developer runs on the default port does not interfere.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const README: &str = include_str!("../README.md");

/// The text of the section that starts with `heading` (a `## ` line), up to the next `## `.
fn section(heading: &str) -> &'static str {
    let start = README.find(&format!("\n{heading}\n")).unwrap_or_else(|| panic!("README has no {heading}"));
    let body = &README[start + heading.len() + 2..];
    let end = body.find("\n## ").unwrap_or(body.len());
    &body[..end]
}

/// The ```sh blocks of a text, in order.
fn sh_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("```sh\n") {
        let body = &rest[open + 6..];
        let close = body.find("\n```").expect("a closed block");
        blocks.push(body[..close].to_string());
        rest = &body[close + 4..];
    }
    blocks
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// A directory laid out as a clone after the set-up command built the release binary.
struct Clone {
    dir: tempfile::TempDir,
    grpc: u16,
    http: u16,
}

impl Clone {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let release = dir.path().join("target/release");
        std::fs::create_dir_all(&release).expect("target/release");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_tde-broker"), release.join("tde-broker"))
            .expect("symlink");
        Clone { dir, grpc: free_port(), http: free_port() }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `bash -c script` in the clone with the broker's addresses in the environment.
    fn bash(&self, script: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg("-c")
            .arg(script)
            .current_dir(self.path())
            .env_remove("TDE_BROKER_TOKEN")
            .env_remove("TDE_BROKER_DATA_DIR")
            .env("TDE_BROKER_LISTEN", format!("127.0.0.1:{}", self.grpc))
            .env("TDE_BROKER_HTTP_LISTEN", format!("127.0.0.1:{}", self.http))
            .env("TDE_BROKER_SERVER", format!("http://127.0.0.1:{}", self.grpc))
            .env("RUST_LOG", "warn");
        c
    }

    /// Starts a broker block (as terminal 1 would run it) and waits until it serves.
    fn serve(&self, block: &str) -> Broker {
        let log = self.path().join(format!("serve-{}.log", Instant::now().elapsed().as_nanos()));
        let out = std::fs::File::create(&log).expect("log");
        let child = self
            .bash(&format!("exec {}", block.trim()))
            .stdout(Stdio::from(out.try_clone().expect("log")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("bash");
        let mut broker = Broker { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        let token = self.path().join("tde-broker-data/admin.token");
        while !(token.is_file() && std::net::TcpStream::connect(("127.0.0.1", self.grpc)).is_ok()) {
            if let Ok(Some(status)) = broker.child.try_wait() {
                panic!("`{block}` exited with {status}:\n{}", broker.log_text());
            }
            assert!(Instant::now() < deadline, "`{block}` did not start serving:\n{}", broker.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        broker
    }
}

/// A broker started from a README block; Ctrl-C (SIGINT) stops it, as a person would.
struct Broker {
    child: Child,
    log: PathBuf,
}

impl Broker {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn interrupt(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    assert!(
                        status.success(),
                        "the broker did not stop cleanly on Ctrl-C: {status}\n{}",
                        self.log_text()
                    );
                    return;
                }
                _ if Instant::now() > deadline => panic!("the broker ignored Ctrl-C:\n{}", self.log_text()),
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `'text'` for bash.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// One command of a block: the command (continuation lines joined), the error the README shows
/// it failing with, and the words its trailing comment says it prints.
#[derive(Debug, Default, PartialEq)]
struct Step {
    command: String,
    error: Option<String>,
    prints: Vec<String>,
}

/// The commands of shell blocks, as a person pastes them.
fn steps(blocks: &[String]) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let text = blocks.join("\n");
    let mut pending = String::new();
    for line in text.lines() {
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        let trimmed = line.trim();
        if let Some(error) = trimmed.strip_prefix("#   error: ") {
            steps.last_mut().expect("an error follows a command").error = Some(error.to_string());
            continue;
        }
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (command, prints) = match trimmed.split_once("  # ") {
            Some((c, words)) => {
                (c.trim().to_string(), words.split_whitespace().map(str::to_string).collect())
            }
            None => (trimmed.to_string(), Vec::new()),
        };
        steps.push(Step { command, error: None, prints });
    }
    steps
}

/// A bash script that runs the steps in one shell (variables and aliases carry over), checks
/// each, and stops at the first that does not do what the README says.
fn script(steps: &[Step]) -> String {
    let mut s = String::from(
        "shopt -s expand_aliases\nset -o pipefail\nOUT=$(mktemp) ERR=$(mktemp)\n\
         fail() { echo \"README step failed: $1\"; echo '--- stdout'; cat \"$OUT\"; echo '--- stderr'; cat \"$ERR\"; exit 1; }\n",
    );
    for step in steps {
        let q = quoted(&step.command);
        if let Some(background) = step.command.strip_suffix('&') {
            s.push_str(&format!("{} >>watch.log 2>&1 &\n", background.trim()));
            continue;
        }
        s.push_str(&format!("echo \"+ \"{q}\n{{ {}\n}} >\"$OUT\" 2>\"$ERR\"; rc=$?\n", step.command));
        match &step.error {
            Some(error) => s.push_str(&format!(
                "[ $rc -ne 0 ] || fail {q}' succeeded but the README shows it failing'\n\
                 grep -qF -- {} \"$ERR\" || fail {q}' failed otherwise than the README shows'\ncat \"$ERR\"\n",
                quoted(error)
            )),
            None => s.push_str(&format!("[ $rc -eq 0 ] || fail {q}\ncat \"$OUT\"\n")),
        }
        for word in &step.prints {
            s.push_str(&format!(
                "grep -qF -- {} \"$OUT\" || fail {q}' did not print '{}\n",
                quoted(word),
                quoted(word)
            ));
        }
    }
    s
}

#[test]
fn the_readme_has_exactly_two_set_up_commands_and_they_are_the_ones_run_here() {
    let setup = sh_blocks(section("## Set up"));
    assert_eq!(setup, ["cargo run --release -- serve", "cargo test"], "README's set-up blocks");
}

#[test]
fn the_step_reader_joins_lines_and_reads_errors_and_printed_words() {
    let blocks = ["a \\\n  b\n# note\nc\n#   error: X (Y): z.\nd   # ONLINE  OK\ne &".to_string()];
    let got = steps(&blocks);
    assert_eq!(got.len(), 4);
    assert_eq!(got[0].command, "a   b");
    assert_eq!(got[1], Step { command: "c".into(), error: Some("X (Y): z.".into()), prints: vec![] });
    assert_eq!(got[2].prints, ["ONLINE", "OK"]);
    assert_eq!(got[3].command, "e &");
}

#[test]
fn the_readme_walkthrough_runs_as_written_after_the_set_up() {
    let have_python = Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(have_python, "the README's walkthrough uses python3: apt-get install python3");
    let clone = Clone::new();

    // Set-up: `cargo run --release -- serve` (the built binary with the embedded defaults).
    let setup = sh_blocks(section("## Set up"));
    let serve = setup[0].replace("cargo run --release --", "./target/release/tde-broker");
    clone.serve(&serve).interrupt();

    // The walkthrough: terminal 1 restarts the broker as shown; terminal 2 pastes the rest.
    let mut blocks = sh_blocks(section("## Five-minute walkthrough"));
    assert!(blocks.len() >= 3, "walkthrough blocks: {blocks:?}");
    let restart = blocks.remove(0);
    assert!(restart.contains(" serve"), "the walkthrough starts with the broker's block: {restart}");
    let broker = clone.serve(&restart);
    let steps = steps(&blocks);
    assert!(steps.iter().any(|s| s.error.is_some()), "the walkthrough shows failures: {steps:?}");
    let out = clone.bash(&script(&steps)).output().expect("bash");
    let transcript =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{transcript}\n--- broker log\n{}", broker.log_text());
    println!("{transcript}");

    // The background `db watch` saw the database go INACCESSIBLE and heal.
    let watched = std::fs::read_to_string(clone.path().join("watch.log")).unwrap_or_default();
    assert!(watched.contains("INACCESSIBLE") && watched.contains("ONLINE"), "db watch printed:\n{watched}");
    broker.interrupt();
}
