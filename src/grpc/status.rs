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
    let mut status = edge_status(code, e.code(), e.to_string());
    // Throttling: seconds until the vault's window ends (an HTTP-style hint; the cloud's 429s
    // carry no Retry-After).
    if let BrokerError::Throttled { retry_after } = e {
        status.metadata_mut().insert(RETRY_AFTER, retry_after.into());
    }
    status
}

/// A status with its `ErrorInfo{reason, domain="tdebroker"}`: every error the broker answers
/// carries one, whether a `BrokerError` or the edge itself (a request it could not decode, an
/// audit log it cannot write) is behind it.
pub fn edge_status(code: Code, reason: &str, message: impl Into<String>) -> Status {
    let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::<String, String>::new());
    Status::with_error_details(code, message, details)
}

/// `ErrorInfo.reason` of a request message larger than the broker decodes (RESOURCE_EXHAUSTED).
pub const MESSAGE_TOO_LARGE: &str = "MessageTooLarge";
/// `ErrorInfo.reason` of a request body that is not a gRPC-framed protobuf message of the
/// method's type (INVALID_ARGUMENT).
pub const MALFORMED_REQUEST: &str = "MalformedRequest";
/// Reason of a compressed message (the broker takes none; gRPC requires INTERNAL for it).
pub const COMPRESSION_NOT_SUPPORTED: &str = "CompressionNotSupported";
/// tonic's text for a message flagged compressed without a `grpc-encoding`.
const COMPRESSED_WITHOUT_ENCODING: &str =
    "protocol error: received message with compressed-flag but no grpc-encoding";
/// `ErrorInfo.reason` of a request whose header list is larger than the broker serves
/// (RESOURCE_EXHAUSTED).
pub const HEADER_LIST_TOO_LARGE: &str = "HeaderListTooLarge";

/// How the broker answers a refusal of tonic's codec, which decodes requests before the
/// services see them: a message over the size limit (tonic: OUT_OF_RANGE) is RESOURCE_EXHAUSTED
/// `MessageTooLarge`, as gRPC's status code guide has it; a body that cannot be decoded (tonic:
/// INTERNAL) is the client's error, INVALID_ARGUMENT `MalformedRequest`. The codec's statuses
/// are told apart by their texts (and, by the caller, by carrying no `ErrorInfo`, which every
/// status of the broker has). A compressed message without `grpc-encoding` stays INTERNAL, as
/// the gRPC compression spec requires, with the `ErrorInfo` reason `CompressionNotSupported`
/// (the broker accepts no compressed message).
pub fn codec_refusal(code: Code, message: &str) -> Option<(Code, &'static str)> {
    const TOO_LARGE: &str = "Error, decoded message length too large";
    const UNDECODABLE: [&str; 4] = [
        "failed to decode Protobuf message",
        "protocol error: received message with invalid compression flag",
        "Unexpected EOF decoding stream",
        // A unary request whose body holds no message at all.
        "Missing request message",
    ];
    match code {
        Code::OutOfRange if message.starts_with(TOO_LARGE) => {
            Some((Code::ResourceExhausted, MESSAGE_TOO_LARGE))
        }
        Code::Internal if UNDECODABLE.iter().any(|p| message.starts_with(p)) => {
            Some((Code::InvalidArgument, MALFORMED_REQUEST))
        }
        Code::Internal if message.starts_with(COMPRESSED_WITHOUT_ENCODING) => {
            Some((Code::Internal, COMPRESSION_NOT_SUPPORTED))
        }
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_store_is_resource_exhausted_store_full_without_a_retry_hint() {
        let status = to_status(BrokerError::StoreFull);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(reason(&status).as_deref(), Some("StoreFull"));
        assert!(status.message().contains("out of disk space"), "{}", status.message());
        // Unlike throttling, no time is known after which a retry succeeds.
        assert_eq!(retry_after(&status), None);
    }

    #[test]
    fn only_the_codecs_refusals_are_rewritten() {
        let too_large =
            "Error, decoded message length too large: found 5242885 bytes, the limit is: 4194304 bytes";
        assert_eq!(
            codec_refusal(Code::OutOfRange, too_large),
            Some((Code::ResourceExhausted, MESSAGE_TOO_LARGE))
        );
        for undecodable in [
            "failed to decode Protobuf message: invalid wire type value: 7",
            "protocol error: received message with invalid compression flag: 104 (valid flags are 0 and 1), while sending request",
            "Unexpected EOF decoding stream.",
            "Missing request message.",
        ] {
            assert_eq!(
                codec_refusal(Code::Internal, undecodable),
                Some((Code::InvalidArgument, MALFORMED_REQUEST)),
                "{undecodable}"
            );
        }
        // The spec's compression case stays INTERNAL, with the broker's reason.
        assert_eq!(
            codec_refusal(
                Code::Internal,
                "protocol error: received message with compressed-flag but no grpc-encoding was specified"
            ),
            Some((Code::Internal, COMPRESSION_NOT_SUPPORTED))
        );
        // The broker's own INTERNAL and other codes stay.
        assert_eq!(codec_refusal(Code::Internal, &BrokerError::Internal.to_string()), None);
        assert_eq!(codec_refusal(Code::InvalidArgument, "failed to decode Protobuf message: x"), None);
        assert_eq!(codec_refusal(Code::OutOfRange, "something else"), None);
    }
}
