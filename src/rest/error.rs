//! The one place where core errors become Key Vault's HTTP errors: a status, the envelope
//! `{"error":{"code","message","innererror":{"code"}}}` with the cloud's text (`Display`) and code
//! ([`BrokerError::code`]), and `Retry-After` on throttling. The REST twin of `grpc::status`.

use http::StatusCode;

use crate::model::{BrokerError, ErrorClass};

/// An error as the REST surface answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestError {
    /// HTTP status.
    pub status: StatusCode,
    /// The envelope's outer `code` (Key Vault's family code: `Forbidden`, `BadParameter`, ...).
    pub code: &'static str,
    /// The inner code, when it says more than the outer one (`AccessDenied`, `KeyDisabled`).
    pub inner: Option<&'static str>,
    /// The cloud's text.
    pub message: String,
    /// Seconds a throttled caller should wait (`Retry-After`).
    pub retry_after: Option<u32>,
}

impl RestError {
    /// An error the edge makes itself (bad route, bad api-version, unreadable body).
    pub fn edge(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        RestError { status, code, inner: None, message: message.into(), retry_after: None }
    }

    /// A `400 BadParameter`.
    pub fn bad_parameter(message: impl Into<String>) -> Self {
        Self::edge(StatusCode::BAD_REQUEST, "BadParameter", message)
    }

    /// The outcome label of metrics and audit records: the inner code when there is one (the
    /// `ErrorInfo` reason the gRPC twin carries), else the code.
    pub fn outcome(&self) -> &'static str {
        self.inner.unwrap_or(self.code)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let mut error = serde_json::json!({ "code": self.code, "message": self.message });
        if let Some(inner) = self.inner {
            error["innererror"] = serde_json::json!({ "code": inner });
        }
        serde_json::json!({ "error": error })
    }

    /// The gRPC status code of the same refusal (what the audit record's `grpc_status` holds,
    /// so records of both surfaces compare).
    pub fn grpc_code(&self) -> i32 {
        grpc_code_of(self.status)
    }
}

/// The gRPC code an HTTP status corresponds to (for audit records and spans).
pub fn grpc_code_of(status: StatusCode) -> i32 {
    match status.as_u16() {
        200..=299 => 0,
        400 | 413 | 431 => 3,
        401 => 16,
        403 => 7,
        404 | 405 => 5,
        409 => 9,
        429 | 507 => 8,
        503 => 14,
        _ => 13,
    }
}

/// Maps a core error to Key Vault's HTTP error.
pub fn to_rest(e: BrokerError) -> RestError {
    let reason = e.code();
    let (status, outer) = match e.class() {
        ErrorClass::Unauthenticated => (StatusCode::UNAUTHORIZED, "Unauthorized"),
        ErrorClass::Forbidden => (StatusCode::FORBIDDEN, "Forbidden"),
        ErrorClass::NotFound => (StatusCode::NOT_FOUND, reason),
        ErrorClass::AlreadyExists | ErrorClass::FailedPrecondition => (StatusCode::CONFLICT, "Conflict"),
        ErrorClass::InvalidArgument => (StatusCode::BAD_REQUEST, "BadParameter"),
        ErrorClass::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
        ErrorClass::ResourceExhausted if matches!(e, BrokerError::Throttled { .. }) => {
            (StatusCode::TOO_MANY_REQUESTS, "Throttled")
        }
        ErrorClass::ResourceExhausted => (StatusCode::INSUFFICIENT_STORAGE, reason),
        ErrorClass::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
    };
    let retry_after = match e {
        BrokerError::Throttled { retry_after } => Some(retry_after),
        _ => None,
    };
    RestError {
        status,
        code: outer,
        inner: (reason != outer).then_some(reason),
        message: e.to_string(),
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_the_family_code_outside_and_the_clouds_code_inside() {
        let e = to_rest(BrokerError::KeyDisabled { operation: "unwrapKey" });
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert_eq!(e.body()["error"]["code"], "Forbidden");
        assert_eq!(e.body()["error"]["innererror"]["code"], "KeyDisabled");
        assert_eq!(e.outcome(), "KeyDisabled");
    }

    #[test]
    fn bad_parameters_have_no_inner_code_and_throttling_a_retry_hint() {
        let e = to_rest(BrokerError::bad_parameter("x"));
        assert_eq!((e.status, e.code, e.inner), (StatusCode::BAD_REQUEST, "BadParameter", None));
        assert!(e.body()["error"].get("innererror").is_none());
        let t = to_rest(BrokerError::Throttled { retry_after: 7 });
        assert_eq!((t.status, t.retry_after), (StatusCode::TOO_MANY_REQUESTS, Some(7)));
    }
}
