//! The load test's baseline: a bare tonic `KeyVault` service with the broker's message shapes
//! and fixed answers (no auth, no logic), served by a child process of this executable so that
//! it pays the same cross-process costs as the broker.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{BASELINE_DEK, BASELINE_KID, LoadtestError, WRAPPED_BYTES};
use crate::cli::error::CliError;
use crate::cli::error::error_chain;
use crate::cli::session::CONNECT_TIMEOUT;
use crate::grpc::proto;
use crate::grpc::proto::key_vault_server::{KeyVault, KeyVaultServer};
use crate::server::MAX_MESSAGE_BYTES;

/// Why the baseline could not start; `Display` follows "baseline: ".
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    /// The path of this executable is unknown.
    #[error("this executable: {0}")]
    Exe(#[source] std::io::Error),
    /// The child process did not start.
    #[error("cannot start {} loadtest {flag}: {source}", .exe.display())]
    Spawn {
        /// This executable.
        exe: std::path::PathBuf,
        /// `--serve-baseline` or `--serve-rest-baseline`.
        flag: String,
        /// Why.
        source: std::io::Error,
    },
    /// The child process has no stdout pipe.
    #[error("no stdout")]
    NoStdout,
    /// The child process said nothing in time.
    #[error("the server process did not say where it listens")]
    Silent,
    /// Reading the child process's stdout failed.
    #[error("reading the server process: {0}")]
    Read(#[source] std::io::Error),
    /// The child process said something other than `listening ADDR`.
    #[error("the server process said {0:?}")]
    Unexpected(String),
    /// Binding the listening socket failed.
    #[error("cannot listen on 127.0.0.1: {0}")]
    Listen(#[source] std::io::Error),
    /// The bound socket has no local address.
    #[error("{0}")]
    LocalAddr(#[source] std::io::Error),
    /// The server's runtime did not start.
    #[error("cannot start a runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The server's thread did not start.
    #[error("cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The REST baseline's certificate could not be made.
    #[error("certificate: {0}")]
    Certificate(#[source] rcgen::Error),
    /// The REST baseline's TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
}

/// The bare service: the broker's message shapes, fixed answers, no auth and no logic.
struct Baseline {
    /// Every UnwrapKey's answer: [`BASELINE_DEK`].
    unwrapped: proto::KeyOperationResult,
    /// Every WrapKey's answer: 256 bytes.
    wrapped: proto::KeyOperationResult,
    /// Every GetKey's answer: an RSA-2048 public key.
    bundle: proto::KeyBundle,
}

impl Baseline {
    /// The fixed answers.
    fn new() -> Self {
        let ops = ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"];
        Baseline {
            unwrapped: proto::KeyOperationResult {
                kid: BASELINE_KID.to_string(),
                value: BASELINE_DEK.to_vec(),
                ..Default::default()
            },
            wrapped: proto::KeyOperationResult {
                kid: BASELINE_KID.to_string(),
                value: vec![0xa5; WRAPPED_BYTES],
                ..Default::default()
            },
            bundle: proto::KeyBundle {
                key: Some(proto::JsonWebKey {
                    kid: BASELINE_KID.to_string(),
                    kty: "RSA".to_string(),
                    key_ops: ops.map(String::from).to_vec(),
                    n: vec![0xc3; WRAPPED_BYTES],
                    e: vec![1, 0, 1],
                    ..Default::default()
                }),
                attributes: Some(proto::KeyAttributes {
                    enabled: Some(true),
                    created: 1_800_000_000,
                    updated: 1_800_000_000,
                    recoverable_days: 90,
                    recovery_level: "Recoverable+Purgeable".to_string(),
                    ..Default::default()
                }),
                tags: Default::default(),
            },
        }
    }
}

/// The `KeyVault` implementation of [`Baseline`]: the answering methods as given, every other
/// method of the service `UNIMPLEMENTED`.
macro_rules! baseline_service {
    (
        answers { $($answer:item)* }
        refuses { $($method:ident($request:ident) -> $response:ident;)* }
    ) => {
        #[tonic::async_trait]
        impl KeyVault for Baseline {
            $($answer)*

            $(
                async fn $method(
                    &self,
                    _: Request<proto::$request>,
                ) -> Result<Response<proto::$response>, Status> {
                    Err(Status::unimplemented(
                        "the load-test baseline answers UnwrapKey, WrapKey and GetKey only",
                    ))
                }
            )*
        }
    };
}

baseline_service! {
    answers {
        async fn unwrap_key(
            &self,
            _: Request<proto::UnwrapKeyRequest>,
        ) -> Result<Response<proto::KeyOperationResult>, Status> {
            Ok(Response::new(self.unwrapped.clone()))
        }

        async fn wrap_key(
            &self,
            _: Request<proto::WrapKeyRequest>,
        ) -> Result<Response<proto::KeyOperationResult>, Status> {
            Ok(Response::new(self.wrapped.clone()))
        }

        async fn get_key(&self, _: Request<proto::GetKeyRequest>) -> Result<Response<proto::KeyBundle>, Status> {
            Ok(Response::new(self.bundle.clone()))
        }
    }
    refuses {
        create_key(CreateKeyRequest) -> KeyBundle;
        import_key(ImportKeyRequest) -> KeyBundle;
        list_keys(ListKeysRequest) -> ListKeysResponse;
        list_key_versions(ListKeyVersionsRequest) -> ListKeyVersionsResponse;
        update_key(UpdateKeyRequest) -> KeyBundle;
        rotate_key(RotateKeyRequest) -> KeyBundle;
        get_key_rotation_policy(GetKeyRotationPolicyRequest) -> KeyRotationPolicy;
        update_key_rotation_policy(UpdateKeyRotationPolicyRequest) -> KeyRotationPolicy;
        delete_key(DeleteKeyRequest) -> DeletedKeyBundle;
        get_deleted_key(GetDeletedKeyRequest) -> DeletedKeyBundle;
        list_deleted_keys(ListDeletedKeysRequest) -> ListDeletedKeysResponse;
        recover_deleted_key(RecoverDeletedKeyRequest) -> KeyBundle;
        purge_deleted_key(PurgeDeletedKeyRequest) -> PurgeDeletedKeyResponse;
        backup_key(BackupKeyRequest) -> BackupKeyResponse;
        restore_key(RestoreKeyRequest) -> KeyBundle;
        encrypt(EncryptRequest) -> KeyOperationResult;
        decrypt(DecryptRequest) -> KeyOperationResult;
        sign(SignRequest) -> KeyOperationResult;
        verify(VerifyRequest) -> VerifyResponse;
        get_random_bytes(GetRandomBytesRequest) -> GetRandomBytesResponse;
    }
}

/// The baseline in a child process (this executable with `loadtest --serve-baseline`): a
/// process of its own, as the broker is, so both comparisons pay the same cross-process
/// wake-ups and neither shares an allocator or a scheduler with the load generator.
pub(super) struct BaselineProcess {
    /// Where it listens.
    pub(super) addr: SocketAddr,
    /// What the line said after the address (the REST baseline's CA certificate).
    pub(super) extra: String,
    /// The process.
    child: tokio::process::Child,
}

impl BaselineProcess {
    /// Starts the child process (`loadtest FLAG`) and reads where it listens.
    pub(super) async fn start(flag: &str) -> Result<Self, BaselineError> {
        use tokio::io::AsyncBufReadExt as _;
        let exe = std::env::current_exe().map_err(BaselineError::Exe)?;
        let mut child = tokio::process::Command::new(&exe)
            .args(["loadtest", flag])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| BaselineError::Spawn { exe: exe.clone(), flag: flag.to_string(), source })?;
        let stdout = child.stdout.take().ok_or(BaselineError::NoStdout)?;
        let mut line = String::new();
        let read =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio::io::BufReader::new(stdout).read_line(&mut line))
                .await
                .map_err(|_| BaselineError::Silent)?;
        read.map_err(BaselineError::Read)?;
        let said = line.trim().strip_prefix("listening ").unwrap_or_default();
        let (addr, extra) = said.split_once(' ').unwrap_or((said, ""));
        let addr = addr.parse().map_err(|_| BaselineError::Unexpected(line.clone()))?;
        Ok(BaselineProcess { addr, extra: extra.to_string(), child })
    }

    /// Closes the child's stdin (it stops serving) and waits for it.
    pub(super) async fn stop(mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// `loadtest --serve-baseline`: the child side of [`BaselineProcess`].
pub(super) async fn serve_until_stdin_ends() -> Result<(), LoadtestError> {
    let server = BaselineServer::start()?;
    println!("listening {}", server.addr);
    std::io::stdout().flush().map_err(CliError::io(std::path::Path::new("stdout")))?;
    wait_for_stdin_end().await;
    server.stop();
    Ok(())
}

/// Returns when stdin ends (the parent closed it, or exited).
pub(super) async fn wait_for_stdin_end() {
    use tokio::io::AsyncReadExt as _;
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {}
}

/// The baseline serving on 127.0.0.1 on a runtime of its own.
struct BaselineServer {
    /// Where it listens.
    addr: SocketAddr,
    /// Tells it to stop.
    stop: tokio::sync::oneshot::Sender<()>,
}

impl BaselineServer {
    /// Binds 127.0.0.1 on an ephemeral port and serves there on a thread of its own.
    fn start() -> Result<Self, BaselineError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(BaselineError::Listen)?;
        let addr = listener.local_addr().map_err(BaselineError::LocalAddr)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("loadtest-baseline")
            .enable_all()
            .build()
            .map_err(BaselineError::Runtime)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("loadtest-baseline".to_string())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return eprintln!("loadtest: baseline: {e}"),
                    };
                    // A bare tonic server as `Server::serve` sets one up: TCP_NODELAY on every
                    // accepted connection (without it, answers that h2 writes in two pieces wait
                    // for the client's delayed ACK, ~40 ms).
                    let served = tonic::transport::Server::builder()
                        .add_service(
                            KeyVaultServer::new(Baseline::new()).max_decoding_message_size(MAX_MESSAGE_BYTES),
                        )
                        .serve_with_incoming_shutdown(
                            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                            async {
                                let _ = stopped.await;
                            },
                        )
                        .await;
                    if let Err(e) = served {
                        eprintln!("loadtest: baseline server: {}", error_chain(&e));
                    }
                });
            })
            .map_err(BaselineError::Thread)?;
        Ok(BaselineServer { addr, stop })
    }

    /// Asks the server to stop; its thread ends once the connections are gone.
    fn stop(self) {
        let _ = self.stop.send(());
    }
}
