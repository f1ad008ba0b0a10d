//! Why a command failed: [`CliError`] (every subcommand but `loadtest`, whose own error wraps
//! it), [`ArgError`] (values clap parses with our functions), gRPC code names and status text,
//! and an error with its causes on one line.

use std::net::SocketAddr;
use std::path::PathBuf;

use tonic::{Code, Status};

/// Why a subcommand failed; `Display` is what the user reads after "error: ".
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No `--token` and no admin token file (its absolute path): no broker ran on that data
    /// directory, or the CLI runs from another directory than the broker.
    #[error(
        "no token: {} does not exist. A broker writes its admin token there when it starts on that data directory. If the broker runs with another data directory (or was started from another working directory), point the CLI at it with --data-dir DIR (or TDE_BROKER_DATA_DIR), or pass a token with --token (or TDE_BROKER_TOKEN); if no broker runs, start one with `tde-broker serve`",
        .0.display()
    )]
    NoToken(PathBuf),
    /// The token (`--token` or the admin token file, named by `origin`) is blank.
    #[error("no token: {origin} is empty")]
    EmptyToken {
        /// `--token`, or the path of the token file.
        origin: String,
    },
    /// The token cannot be sent as an HTTP header value.
    #[error("the token holds characters that cannot go into a header")]
    TokenNotAHeader(#[source] tonic::metadata::errors::InvalidMetadataValue),
    /// The token carries no readable `oid` claim, so the caller's object id is unknown.
    #[error(
        "cannot read the caller's object id (oid claim) from the token; pass --no-default-policy and grant access with `policy set`"
    )]
    NoObjectIdClaim,
    /// Only a client certificate authenticates, and it names no principal.
    #[error(
        "the client certificate names no principal; pass --no-default-policy and grant access with `policy set`"
    )]
    NoCertPrincipal,
    /// A local file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file (`stdout` for standard output).
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A certificate, key or CA file is unusable, or the dev CA could not sign.
    #[error("{0}")]
    Pki(#[from] crate::tls::TlsError),
    /// `--server` is not a URL tonic can dial.
    #[error("--server '{server}' is not a valid address: {source}")]
    BadServer {
        /// The `--server` value.
        server: String,
        /// What tonic said.
        source: tonic::transport::Error,
    },
    /// The client TLS configuration was refused.
    #[error("TLS: {}", error_chain(.0))]
    Tls(#[source] tonic::transport::Error),
    /// A client certificate was given for a plaintext `http://` server.
    #[error("--client-cert needs TLS: point --server at https://host:port")]
    CertNeedsTls,
    /// An `https://` server, no `--ca-cert`, and no dev CA at this path.
    #[error(
        "an https:// server needs the CA that signs its certificate: pass --ca-cert (no dev CA at {})",
        .0.display()
    )]
    NoCa(PathBuf),
    /// Nothing (or nothing working) answered at the broker's address.
    #[error(
        "cannot reach the broker at {addr}: {cause}; start it with `tde-broker serve` or point --server at it"
    )]
    Connect {
        /// The address tried.
        addr: String,
        /// What went wrong with the connection.
        #[source]
        cause: ConnectCause,
    },
    /// `--server` answered in HTTP/1, not gRPC (HTTP/2).
    #[error(
        "{addr} is not a gRPC port: it answered \"{answer}\". The broker's HTTP admin port (--http-listen, default 127.0.0.1:9090) serves /metrics and health; point --server at its gRPC address (--listen, default 127.0.0.1:50051)"
    )]
    NotGrpc {
        /// The `--server` URL.
        addr: String,
        /// The status line it answered with.
        answer: String,
    },
    /// A relative time (`+1h`, `now`) could not be resolved: reading the broker's clock failed.
    #[error(
        "a relative time (now, +1h, -30m) counts from the broker's clock, which could not be read ({0}); give an absolute time instead (Unix seconds or RFC 3339)"
    )]
    RelativeTime(#[source] Box<CliError>),
    /// The broker refused the request.
    #[error("{}", rpc_text(*.code, .reason.as_deref(), .message))]
    Rpc {
        /// The gRPC status code.
        code: Code,
        /// `ErrorInfo.reason`: the cloud's error code, e.g. `KeyDisabled`.
        reason: Option<String>,
        /// The cloud's error text.
        message: String,
    },
    /// `serve`, `cert` or `loadtest` was dispatched as a client subcommand.
    #[error("`serve` and `cert` run locally; they are not client subcommands")]
    NotAClient,
    /// `db watch` was dispatched as a command with one result.
    #[error("`db watch` streams; it has no single result")]
    Streams,
    /// `vault network set` without anything to set.
    #[error(
        "nothing to change: give --default-action, --bypass, --ip-rule, --vnet-rule, --clear-ip-rules, --clear-vnet-rules or --public-network-access"
    )]
    NothingToChange,
    /// A crypto operation without an input value.
    #[error("give the value: --value-b64, --value-hex or --in")]
    NoValue,
    /// A hex flag (`--value-hex`, `--digest-hex`, `--signature-hex`) is not hexadecimal.
    #[error("the hex value is not hex: {0}")]
    NotHex(#[source] hex::FromHexError),
    /// `key sign|verify --in` with an algorithm whose hash is unknown.
    #[error("{0}")]
    UnknownAlgorithm(String),
    /// `key verify`: the broker answered that the signature does not verify.
    #[error("the signature does not verify: {alg} with {key_id} gives valid = false")]
    SignatureInvalid {
        /// The key.
        key_id: String,
        /// The algorithm.
        alg: String,
    },
    /// A base64 flag holds no base64 in any of the accepted alphabets.
    #[error("{flag} is not base64")]
    NotBase64 {
        /// The flag, e.g. `--iv-b64`.
        flag: &'static str,
        /// Why standard base64 refused it.
        source: base64::DecodeError,
    },
    /// `cert issue --principal` is not a GUID.
    #[error("{0}")]
    BadPrincipal(#[source] uuid::Error),
    /// `serve`: the configuration is invalid.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// `serve`: the broker could not start or stopped with an error.
    #[error("{0}")]
    Start(#[from] crate::server::StartError),
    /// `serve`: the gRPC address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl CliError {
    /// What to do about a refusal whose cloud text names the rule but not the fix; printed on
    /// a `hint:` line after the error. The cloud's text itself is kept as it is.
    pub(crate) fn hint(&self) -> Option<&'static str> {
        let CliError::Rpc { reason: Some(reason), .. } = self else { return None };
        Some(match reason.as_str() {
            "SecurityInvalidAzureKeyVaultRecoveryLevel" => {
                "a TDE protector's vault needs purge protection: `tde-broker vault update VAULT --purge-protection` (it cannot be turned off again)"
            }
            "AzureKeyVaultMissingPermissions" | "UmiMissingAkvPermissions" => {
                "grant the server's identity get, wrapKey and unwrapKey on the vault: `tde-broker policy set VAULT --object-id PRINCIPAL_ID --permissions get,wrapKey,unwrapKey` (or the Key Vault Crypto Service Encryption User role on an RBAC vault)"
            }
            "AzureKeyVaultNoServerIdentity" => {
                "give the server an identity first: `tde-broker server identity SERVER_ID --umi IDENTITY_RESOURCE_ID` (or --system-assigned)"
            }
            "AccessDenied" => {
                "grant the caller the key permission the message names: `tde-broker policy set VAULT --object-id OBJECT_ID --permissions …` (it replaces that object id's list)"
            }
            "ForbiddenByRbac" => {
                "assign the caller a Key Vault data role on the vault or key: `tde-broker role assign --scope SCOPE --principal-id OBJECT_ID --role \"Key Vault Crypto User\"`"
            }
            "KeyDisabled" | "AzureKeyVaultKeyDisabled" => {
                "enable the key: `tde-broker key update KEY_ID --enable`"
            }
            "KeyExpired" => {
                "move the key's expiry: `tde-broker key update KEY_ID --exp +1y` (or --clear-exp); unwrap and decrypt still work on an expired key"
            }
            "ConflictError" => {
                "a soft-deleted vault holds the name: `tde-broker vault deleted recover NAME` brings it back, `tde-broker vault deleted purge NAME` frees the name (refused under purge protection)"
            }
            "ClockNotManual" => {
                "restart the broker with `tde-broker serve --clock manual`; its clock resumes from the saved time"
            }
            _ => return None,
        })
    }

    /// A closure for `map_err` that names the file an I/O error is about.
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
        move |source| CliError::Io { path: path.to_path_buf(), source }
    }
}

/// What went wrong with the connection to the broker.
#[derive(Debug, thiserror::Error)]
pub enum ConnectCause {
    /// The transport could not connect.
    #[error("{}", error_chain(.0))]
    Transport(#[source] tonic::transport::Error),
    /// A call failed with a bare `UNAVAILABLE` (no `ErrorInfo`): the transport, not the broker.
    #[error("{}", .0.message())]
    Unavailable(#[source] Box<Status>),
    /// The broker closed a `db watch` stream.
    #[error("the broker ended the watch")]
    WatchEnded,
}

/// A value clap hands to one of our parsers that it does not accept; clap prints it after
/// "invalid value '…' for '--flag <VALUE>': ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    /// `--tag` without `KEY=VALUE`.
    #[error("'{0}' is not a tag: use KEY=VALUE")]
    Tag(String),
    /// `clock advance`: not seconds or a number with s, m, h, d or w.
    #[error("'{0}' is not a duration: use seconds or a number with s, m, h, d or w (90d, 25h, 30m)")]
    ClockDuration(String),
    /// `clock advance`: more seconds than an i64 holds.
    #[error("'{0}' is too large")]
    TooLarge(String),
    /// `loadtest --duration/--warmup`: not a time.
    #[error("'{0}' is not a duration: use e.g. 10s, 500ms, 2m or a number of seconds")]
    Time(String),
    /// `--nbf`, `--exp`, `clock set`: not a time.
    #[error(
        "'{0}' is not a time: use Unix seconds (1800000000), an RFC 3339 time or date (2027-01-15T08:00:00Z, 2027-01-15), `now`, or a move from the broker's now (+1h, -30m, +90d)"
    )]
    When(String),
    /// `loadtest --rate`: not a positive rate.
    #[error("'{0}' is not a rate: use requests per second, e.g. 5000")]
    Rate(String),
}

/// `CODE (Reason): message`, or `CODE: message` without a reason.
pub(crate) fn rpc_text(code: Code, reason: Option<&str>, message: &str) -> String {
    match reason {
        Some(r) => format!("{} ({r}): {message}", code_name(code)),
        None => format!("{}: {message}", code_name(code)),
    }
}

/// A status as [`rpc_text`] renders it, with the `ErrorInfo` reason the broker attached.
pub(crate) fn status_text(status: &Status) -> String {
    rpc_text(status.code(), crate::grpc::status::reason(status).as_deref(), status.message())
}

/// The gRPC code as the spec spells it (`PERMISSION_DENIED`).
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error and its causes on one line (tonic's transport errors hide the useful part).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_the_specs() {
        assert_eq!(code_name(Code::PermissionDenied), "PERMISSION_DENIED");
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
    }

    #[test]
    fn rpc_text_names_the_reason_when_there_is_one() {
        assert_eq!(
            rpc_text(Code::NotFound, Some("KeyNotFound"), "no key"),
            "NOT_FOUND (KeyNotFound): no key"
        );
        assert_eq!(rpc_text(Code::Internal, None, "boom"), "INTERNAL: boom");
        let e = CliError::Rpc { code: Code::NotFound, reason: None, message: "gone".into() };
        assert_eq!(e.to_string(), "NOT_FOUND: gone");
    }

    #[test]
    fn connect_errors_read_as_before() {
        let e = CliError::Connect { addr: "http://h:1".into(), cause: ConnectCause::WatchEnded };
        assert_eq!(
            e.to_string(),
            "cannot reach the broker at http://h:1: the broker ended the watch; start it with `tde-broker serve` or point --server at it"
        );
        let status = Box::new(Status::unavailable("connection reset"));
        let e = CliError::Connect { addr: "http://h:1".into(), cause: ConnectCause::Unavailable(status) };
        assert!(e.to_string().contains("http://h:1: connection reset; start it"), "{e}");
    }
}
