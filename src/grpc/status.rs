//! The one place where core errors become gRPC statuses: the cloud's text as the message and a
//! `google.rpc.ErrorInfo` with the cloud's code as `reason` and `tdebroker` as `domain`.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::model::{BrokerError, ErrorClass};

/// `ErrorInfo.domain` of every error.
pub const ERROR_DOMAIN: &str = "tdebroker";

/// Maps a core error to its status.
pub fn to_status(e: BrokerError) -> Status {
    let code = match e.class() {
        ErrorClass::Unauthenticated => Code::Unauthenticated,
        ErrorClass::Forbidden => Code::PermissionDenied,
        ErrorClass::NotFound => Code::NotFound,
        ErrorClass::AlreadyExists => Code::AlreadyExists,
        ErrorClass::FailedPrecondition => Code::FailedPrecondition,
        ErrorClass::InvalidArgument => Code::InvalidArgument,
        ErrorClass::Unavailable => Code::Unavailable,
        ErrorClass::ResourceExhausted => Code::ResourceExhausted,
        ErrorClass::Internal => Code::Internal,
    };
    let details = ErrorDetails::with_error_info(e.code(), ERROR_DOMAIN, HashMap::<String, String>::new());
    let mut status = Status::with_error_details(code, e.to_string(), details);
    // Throttling: seconds until the vault's window ends (an HTTP-style hint; the cloud's 429s
    // carry no Retry-After).
    if let BrokerError::Throttled { retry_after } = e {
        status.metadata_mut().insert(RETRY_AFTER, retry_after.into());
    }
    status
}

/// The metadata key of a throttled request's retry hint, in whole seconds.
pub const RETRY_AFTER: &str = "retry-after";

/// The `retry-after` seconds of a status, if it carries them (used by clients and tests).
pub fn retry_after(status: &Status) -> Option<u32> {
    status.metadata().get(RETRY_AFTER)?.to_str().ok()?.parse().ok()
}

/// The `ErrorInfo.reason` of a status, if it carries one (used by clients and tests).
pub fn reason(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}
