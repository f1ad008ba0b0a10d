//! A toy database engine that stores its data encrypted under a key it never keeps: what "TDE
//! with customer-managed keys" looks like from the engine's side.
//!
//! The engine's data is a page file. Every page is sealed with AES-256-GCM under the database
//! encryption key (DEK). The DEK comes from the broker (`TdeEngine.GenerateDatabaseKey`), which
//! wraps it under the server's TDE protector: an RSA key in a vault, reached with the server's
//! managed identity. The engine writes down only the *wrapped* DEK and the kid that wrapped it
//! (`dek.json`), and asks the broker to unwrap it every time it opens the database. So the key
//! owner stays in control: take the identity's access to the key away and the broker makes the
//! database inaccessible — the engine can no longer read its own pages.
//!
//! ```text
//! engine --server URL --token HOST_TOKEN --database NAME --dir DIR write TEXT   # append a page
//! engine --server URL --token HOST_TOKEN --database NAME --dir DIR read         # print every page
//! engine ... --server-id ID --admin-token TOKEN watch   # wait until the database is cut off
//! ```
//!
//! `HOST_TOKEN` is the server's host credential (`tde-broker server host-credential ID`).
//! Files in DIR: `dek.json` = `{"wrapped_dek": base64, "kid": versioned key URI}`; `pages.bin` =
//! records of a 4-byte big-endian length and `iv (12) ‖ tag (16) ‖ ciphertext`, each page bound
//! (AAD) to its database and position. Exit codes: 0 done, 3 the database is inaccessible
//! (`FAILED_PRECONDITION`, reason `DatabaseInaccessible`), 1 anything else.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Parser, Subcommand};
use tde_broker::crypto::{Zbytes, aes_gcm_decrypt, aes_gcm_encrypt};
use tde_broker::grpc::proto;
use tde_broker::grpc::proto::servers_client::ServersClient;
use tde_broker::grpc::proto::tde_engine_client::TdeEngineClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;

#[derive(Parser)]
#[command(about = "A toy database engine whose pages are encrypted under a DEK from tde-broker")]
struct Args {
    /// Broker address, e.g. http://127.0.0.1:50051.
    #[arg(long, value_name = "URL")]
    server: String,
    /// The host credential of the engine's server (a bearer token).
    #[arg(long, value_name = "HOST_TOKEN")]
    token: String,
    /// Database name on that server.
    #[arg(long, value_name = "NAME")]
    database: String,
    /// Where dek.json and pages.bin live.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// ARM id of the server (for `watch`).
    #[arg(long, value_name = "ID")]
    server_id: Option<String>,
    /// A control-plane token that may read the server (for `watch`).
    #[arg(long, value_name = "TOKEN")]
    admin_token: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Encrypt TEXT as a new page (creating the DEK on first use).
    Write { text: String },
    /// Decrypt and print every page, one per line.
    Read,
    /// Print the database's state transitions; exit 0 once it becomes inaccessible.
    Watch,
}

/// Why the engine stopped.
enum Failure {
    /// The broker refused the key: the database is inaccessible (exit code 3).
    Inaccessible(String),
    Other(String),
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        let reason = tde_broker::grpc::status::reason(&s);
        if s.code() == Code::FailedPrecondition && reason.as_deref() == Some("DatabaseInaccessible") {
            Failure::Inaccessible(s.message().to_string())
        } else {
            Failure::Other(format!("{:?} ({}): {}", s.code(), reason.unwrap_or_default(), s.message()))
        }
    }
}

fn other(e: impl std::fmt::Display) -> Failure {
    Failure::Other(e.to_string())
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

fn bearer(token: &str) -> Result<Bearer, Failure> {
    format!("Bearer {}", token.trim()).parse().map(Bearer).map_err(|_| other("the token is not ASCII"))
}

type Engine = TdeEngineClient<InterceptedService<Channel, Bearer>>;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Inaccessible(message)) => {
            println!("INACCESSIBLE");
            eprintln!("engine: {message}");
            ExitCode::from(3)
        }
        Err(Failure::Other(message)) => {
            eprintln!("engine: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Failure> {
    let channel = Channel::from_shared(args.server.clone()).map_err(other)?.connect().await.map_err(other)?;
    let mut engine = TdeEngineClient::with_interceptor(channel.clone(), bearer(&args.token)?);
    let pages = args.dir.join("pages.bin");
    match args.command {
        Cmd::Write { text } => {
            let dek = open_dek(&mut engine, &args.database, &args.dir).await?;
            let index = read_records(&pages)?.len();
            let aad = format!("{}:{index}", args.database);
            let sealed = aes_gcm_encrypt(&dek, None, aad.as_bytes(), text.as_bytes()).map_err(other)?;
            let record = [sealed.iv, sealed.tag, sealed.ciphertext].concat();
            let mut bytes = std::fs::read(&pages).or_else(|e| missing_is_empty(e, &pages))?;
            bytes.extend_from_slice(&(record.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&record);
            std::fs::write(&pages, bytes).map_err(|e| io(&pages, e))?;
            println!("wrote page {index}");
        }
        Cmd::Read => {
            let dek = open_dek(&mut engine, &args.database, &args.dir).await?;
            for (index, record) in read_records(&pages)?.iter().enumerate() {
                if record.len() < IV_LEN + TAG_LEN {
                    return Err(other(format!("page {index} is truncated")));
                }
                let (iv, rest) = record.split_at(IV_LEN);
                let (tag, ciphertext) = rest.split_at(TAG_LEN);
                let aad = format!("{}:{index}", args.database);
                let text = aes_gcm_decrypt(&dek, iv, aad.as_bytes(), ciphertext, tag)
                    .map_err(|e| other(format!("page {index}: {e}")))?;
                println!("{}", String::from_utf8_lossy(&text));
            }
        }
        Cmd::Watch => {
            let server_id = args.server_id.ok_or_else(|| other("watch needs --server-id"))?;
            let admin = args.admin_token.ok_or_else(|| other("watch needs --admin-token"))?;
            let mut servers = ServersClient::with_interceptor(channel, bearer(&admin)?);
            let request = proto::WatchDatabaseStatesRequest { server_id: server_id.clone() };
            let mut events = servers.watch_database_states(request).await?.into_inner();
            // Where the database stands now, as the engine sees it (the stream has only changes).
            let status = engine
                .get_protector_status(proto::GetProtectorStatusRequest { database: args.database.clone() })
                .await?
                .into_inner();
            println!("watching {} ({})", args.database, state_name(status.state));
            while let Some(e) = events.message().await? {
                let db = e.database.unwrap_or_default();
                println!("{} {} {} {} {}", e.time, e.event, db.name, state_name(db.state), db.reason);
                if e.event == "MakeDatabaseInaccessible" && db.name == args.database {
                    println!("INACCESSIBLE {}", db.reason);
                    return Ok(());
                }
            }
            return Err(other("the broker ended the watch"));
        }
    }
    Ok(())
}

/// The DEK in plaintext, for this run only: unwrapped from `dek.json`, or generated by the broker
/// on first use with only its wrapped form written down.
async fn open_dek(engine: &mut Engine, database: &str, dir: &Path) -> Result<Zbytes, Failure> {
    let path = dir.join("dek.json");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let stored: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| io(&path, e))?;
            let field = |name: &str| {
                stored[name].as_str().map(str::to_string).ok_or_else(|| io(&path, format!("no {name}")))
            };
            let wrapped_dek = B64.decode(field("wrapped_dek")?).map_err(|e| io(&path, e))?;
            let request = proto::UnwrapDatabaseKeyRequest {
                database: database.into(),
                kid: field("kid")?,
                wrapped_dek,
            };
            Ok(Zbytes::new(engine.unwrap_database_key(request).await?.into_inner().dek))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let request = proto::GenerateDatabaseKeyRequest { database: database.into() };
            let g = engine.generate_database_key(request).await?.into_inner();
            let stored = serde_json::json!({ "wrapped_dek": B64.encode(&g.wrapped_dek), "kid": g.kid });
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
            std::fs::write(&path, format!("{stored:#}\n")).map_err(|e| io(&path, e))?;
            Ok(Zbytes::new(g.dek))
        }
        Err(e) => Err(io(&path, e)),
    }
}

/// The records of the page file (none when it does not exist yet).
fn read_records(path: &Path) -> Result<Vec<Vec<u8>>, Failure> {
    let bytes = std::fs::read(path).or_else(|e| missing_is_empty(e, path))?;
    let mut records = Vec::new();
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let (len, body) = rest.split_at_checked(4).ok_or_else(|| io(path, "truncated record"))?;
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
        let (record, next) = body.split_at_checked(len).ok_or_else(|| io(path, "truncated record"))?;
        records.push(record.to_vec());
        rest = next;
    }
    Ok(records)
}

fn missing_is_empty(e: std::io::Error, path: &Path) -> Result<Vec<u8>, Failure> {
    if e.kind() == std::io::ErrorKind::NotFound { Ok(Vec::new()) } else { Err(io(path, e)) }
}

fn io(path: &Path, e: impl std::fmt::Display) -> Failure {
    Failure::Other(format!("{}: {e}", path.display()))
}

fn state_name(state: i32) -> &'static str {
    proto::DatabaseState::try_from(state).map_or("UNKNOWN", |s| s.as_str_name())
}
