//! What a DynamoDB Streams call's failure means, decided once from the SDK's typed errors
//! (not by comparing error-code strings at each call site), and mapped onto the daemon's one
//! error policy (the kinds of [`crate::retry::Failure`]).

use aws_sdk_dynamodbstreams::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodbstreams::operation::describe_stream::DescribeStreamError;
use aws_sdk_dynamodbstreams::operation::get_records::GetRecordsError;
use aws_sdk_dynamodbstreams::operation::get_shard_iterator::GetShardIteratorError;

use crate::retry::Failure;

/// The kinds of Streams failure a reader or the shard map acts on differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFault {
    /// The iterator is older than 15 minutes: get a new one after the last record read.
    IteratorExpired,
    /// Records expired (24 h retention) before they were read: lost upstream, said by name.
    Trimmed,
    /// The stream or the shard does not exist (any more).
    Gone,
    /// The stream was disabled.
    Disabled,
    /// Throttled (the shard's read limit, or the account's): slow down, counted.
    Throttled,
    /// Credentials or permissions refused: a person must act; retried slowly.
    Refused,
    /// Network, timeouts, a 500: heals by itself.
    Transient,
}

/// Service error codes AWS returns for throttling through any operation (not modelled per
/// operation, so they arrive unhandled with their code).
const THROTTLE_CODES: &[&str] = &[
    "LimitExceededException",
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
];

/// Codes that mean the request's identity or permissions are wrong.
const REFUSED_CODES: &[&str] = &[
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "MissingAuthenticationToken",
    "IncompleteSignature",
    "ExpiredTokenException",
];

impl StreamFault {
    /// A `GetRecords` failure.
    pub fn of_get_records(e: &SdkError<GetRecordsError>) -> StreamFault {
        Self::get_records(e.as_service_error(), e.code())
    }

    fn get_records(e: Option<&GetRecordsError>, code: Option<&str>) -> StreamFault {
        match e {
            Some(GetRecordsError::ExpiredIteratorException(_)) => StreamFault::IteratorExpired,
            Some(GetRecordsError::TrimmedDataAccessException(_)) => StreamFault::Trimmed,
            Some(GetRecordsError::ResourceNotFoundException(_)) => StreamFault::Gone,
            Some(GetRecordsError::LimitExceededException(_)) => StreamFault::Throttled,
            Some(GetRecordsError::InternalServerError(_)) => StreamFault::Transient,
            _ => Self::by_code(code),
        }
    }

    /// A `GetShardIterator` failure.
    pub fn of_get_shard_iterator(e: &SdkError<GetShardIteratorError>) -> StreamFault {
        Self::get_shard_iterator(e.as_service_error(), e.code())
    }

    fn get_shard_iterator(e: Option<&GetShardIteratorError>, code: Option<&str>) -> StreamFault {
        match e {
            Some(GetShardIteratorError::TrimmedDataAccessException(_)) => StreamFault::Trimmed,
            Some(GetShardIteratorError::ResourceNotFoundException(_)) => StreamFault::Gone,
            Some(GetShardIteratorError::InternalServerError(_)) => StreamFault::Transient,
            _ => Self::by_code(code),
        }
    }

    /// A `DescribeStream` failure.
    pub fn of_describe_stream(e: &SdkError<DescribeStreamError>) -> StreamFault {
        match e.as_service_error() {
            Some(DescribeStreamError::ResourceNotFoundException(_)) => StreamFault::Gone,
            Some(DescribeStreamError::InternalServerError(_)) => StreamFault::Transient,
            _ => Self::by_code(e.code()),
        }
    }

    /// The errors every operation can return, known only by their code.
    fn by_code(code: Option<&str>) -> StreamFault {
        match code {
            Some(c) if THROTTLE_CODES.contains(&c) => StreamFault::Throttled,
            Some(c) if REFUSED_CODES.contains(&c) => StreamFault::Refused,
            _ => StreamFault::Transient,
        }
    }

    /// The daemon's failure kind: what the policy decides and how the log line is labelled.
    pub fn failure(&self) -> Failure {
        match self {
            StreamFault::Refused | StreamFault::Gone | StreamFault::Disabled => Failure::Fatal,
            _ => Failure::Transient,
        }
    }
}

/// The message of a Streams failure: code and message of a service error, the cause chain of
/// anything else (a connection refused, missing credentials).
pub fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(e: &SdkError<E>) -> String {
    match e {
        SdkError::ServiceError(s) => {
            format!("{}: {}", s.err().code().unwrap_or("error"), s.err().message().unwrap_or(""))
        }
        other => crate::sink::search::aws_error_text(other),
    }
}

/// A failure of `DescribeStream`, with its kind, for the shard map.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct DescribeFailure {
    /// What it means.
    pub fault: StreamFault,
    /// What AWS said.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodbstreams::types::error::{ExpiredIteratorException, TrimmedDataAccessException};

    #[test]
    fn typed_errors_and_generic_codes_are_classified() {
        let e = GetRecordsError::ExpiredIteratorException(ExpiredIteratorException::builder().message("old").build());
        assert_eq!(StreamFault::get_records(Some(&e), e.code()), StreamFault::IteratorExpired);
        let e = GetShardIteratorError::TrimmedDataAccessException(TrimmedDataAccessException::builder().build());
        assert_eq!(StreamFault::get_shard_iterator(Some(&e), e.code()), StreamFault::Trimmed);
        let unhandled = |code: &str| {
            GetRecordsError::generic(aws_sdk_dynamodbstreams::error::ErrorMetadata::builder().code(code).build())
        };
        let e = unhandled("ThrottlingException");
        assert_eq!(StreamFault::get_records(Some(&e), e.code()), StreamFault::Throttled);
        let e = unhandled("AccessDeniedException");
        assert_eq!(StreamFault::get_records(Some(&e), e.code()), StreamFault::Refused);
        assert_eq!(StreamFault::Refused.failure(), Failure::Fatal);
        let e = unhandled("SomethingNew");
        assert_eq!(StreamFault::get_records(Some(&e), e.code()), StreamFault::Transient);
        assert_eq!(StreamFault::get_records(None, None), StreamFault::Transient, "a network error");
    }
}
