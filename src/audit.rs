//! The audit log: one JSON line per RPC (data-plane operations, control-plane changes and reads),
//! written by the per-RPC observation layer (`grpc::observe`) before the response leaves the broker.
//!
//! A record names who (`principal`, `caller_address`), what (`operation`, `resource`), when (the
//! broker's clock, RFC 3339 and Unix seconds), the `outcome` (`OK` or the `ErrorInfo` reason),
//! whether a cache answered, the latency and the request id. It never holds key material, values,
//! tokens or messages: the layer only sees metadata and what the interceptor and services note
//! in the request context (ARCHITECTURE.md invariant 6).
//!
//! With `audit_required`, a request that cannot be audited is refused (UNAVAILABLE,
//! `AuditUnavailable`): before it runs when the log is known to be broken (it cannot be opened,
//! or a write failed in the last second), and after it ran when its record cannot be written —
//! the caller then gets no result (a change it made stays applied). Records are written with one
//! `write` on an `O_APPEND` file (no fsync: the page cache holds them across a broker crash, not
//! across a machine crash).

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Where audit records go (`--audit-log`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Destination {
    /// No audit log.
    #[default]
    Off,
    /// One JSON line per record on standard output.
    Stdout,
    /// Appended to this file (created 0600).
    File(PathBuf),
}

/// How long a broken log is left alone before it is reopened.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// One audit record. Field names are the log's schema.
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    /// The broker's clock, RFC 3339 (UTC, seconds).
    pub time: String,
    /// The broker's clock, Unix seconds.
    pub unix: i64,
    /// `x-request-id` metadata of the request, or a new GUID (echoed in the response).
    pub request_id: &'a str,
    /// Object id of the authenticated caller; `null` when authentication failed.
    pub principal: Option<&'a str>,
    /// The caller's address (the forwarded one behind a trusted proxy).
    pub caller_address: Option<String>,
    /// `service/method`, e.g. `tdebroker.v1.KeyVault/WrapKey`.
    pub operation: String,
    /// The key id, vault, server or database the request names, when known.
    pub resource: Option<&'a str>,
    /// `OK`, or the `ErrorInfo` reason (`AccessDenied`, `KeyNotFound`, ...).
    pub outcome: &'a str,
    /// The gRPC status code.
    pub grpc_status: i32,
    /// Whether the broker's caches answered (`null`: no cache was consulted).
    pub cache_hit: Option<bool>,
    /// Time until the response headers, milliseconds.
    pub latency_ms: f64,
    /// The request's trace id, with OpenTelemetry on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

enum Sink {
    Off,
    Stdout,
    File(PathBuf),
}

struct State {
    file: Option<File>,
    /// When the log last failed (open or write); `None` while healthy.
    failed_at: Option<Instant>,
}

/// The audit log of a broker.
pub struct AuditLog {
    sink: Sink,
    required: bool,
    state: Mutex<State>,
}

impl AuditLog {
    /// Opens the destination (a file is created 0600 and appended to). A file that cannot be
    /// opened is reported and retried later; with `required`, requests are refused meanwhile.
    pub fn open(destination: &Destination, required: bool) -> AuditLog {
        let sink = match destination {
            Destination::Off => Sink::Off,
            Destination::Stdout => Sink::Stdout,
            Destination::File(p) => Sink::File(p.clone()),
        };
        let log = AuditLog { sink, required, state: Mutex::new(State { file: None, failed_at: None }) };
        if let Sink::File(path) = &log.sink {
            let mut st = log.lock();
            match open_file(path) {
                Ok(f) => st.file = Some(f),
                Err(e) => {
                    st.failed_at = Some(Instant::now());
                    tracing::error!(path = %path.display(), error = %e, required, "cannot open the audit log");
                }
            }
        }
        log
    }

    /// No audit log.
    pub fn off() -> AuditLog {
        AuditLog::open(&Destination::Off, false)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether records are written at all.
    pub fn enabled(&self) -> bool {
        !matches!(self.sink, Sink::Off)
    }

    /// Whether requests that cannot be audited are refused.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Whether a record can be written now, as far as the broker knows: a broken log is
    /// reopened at most once per [`RETRY_AFTER`].
    pub fn available(&self) -> bool {
        let mut st = self.lock();
        match &self.sink {
            Sink::Off => true,
            Sink::Stdout => st.failed_at.is_none_or(|t| t.elapsed() >= RETRY_AFTER),
            Sink::File(path) => {
                if st.file.is_some() {
                    return true;
                }
                if st.failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
                    return false;
                }
                match open_file(path) {
                    Ok(f) => {
                        st.file = Some(f);
                        st.failed_at = None;
                        tracing::info!(path = %path.display(), "the audit log is writable again");
                        true
                    }
                    Err(_) => {
                        st.failed_at = Some(Instant::now());
                        false
                    }
                }
            }
        }
    }

    /// Appends one record as a JSON line.
    pub fn write(&self, record: &AuditRecord<'_>) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut st = self.lock();
        let result = match &self.sink {
            Sink::Off => return Ok(()),
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&line).and_then(|()| out.flush())
            }
            Sink::File(path) => {
                if st.file.is_none() {
                    st.file = open_file(path).ok();
                }
                match st.file.as_mut() {
                    Some(f) => f.write_all(&line),
                    None => Err(std::io::Error::other("the audit log is not open")),
                }
            }
        };
        match result {
            Ok(()) => {
                st.failed_at = None;
                Ok(())
            }
            Err(e) => {
                if st.failed_at.is_none() {
                    tracing::error!(error = %e, required = self.required, "writing the audit log failed");
                }
                st.failed_at = Some(Instant::now());
                st.file = None;
                crate::telemetry::metrics().audit_failure();
                Err(e)
            }
        }
    }
}

fn open_file(path: &std::path::Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_not_an_audit_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(&Destination::File(dir.path().to_path_buf()), true);
        assert!(!log.available());
    }
}
