//! The catalogue of error reasons every Idem gRPC error carries in
//! `google.rpc.ErrorInfo` (domain `idem.dev`). Reasons are stable API: clients branch on
//! them, so a reason is never renamed or reused.

use std::time::Duration;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub const DOMAIN: &str = "idem.dev";
/// Metadata key (gRPC A6 retry pushback) telling the caller how long to wait.
pub const RETRY_PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorReason {
    InvalidArgument,
    InvalidFingerprint,
    LeaseLost,
    KeyTooOld,
    AlreadyCompleted,
    NotFound,
    Unauthenticated,
    Unavailable,
    NotLeader,
    Internal,
    /// This node cannot serve (its disk failed, its data directory is new and not yet
    /// confirmed by its peers); another node can: a client moves to the next endpoint.
    NodeUnavailable,
}

impl ErrorReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorReason::InvalidArgument => "INVALID_ARGUMENT",
            ErrorReason::InvalidFingerprint => "INVALID_FINGERPRINT",
            ErrorReason::LeaseLost => "LEASE_LOST",
            ErrorReason::KeyTooOld => "KEY_TOO_OLD",
            ErrorReason::AlreadyCompleted => "ALREADY_COMPLETED",
            ErrorReason::NotFound => "NOT_FOUND",
            ErrorReason::Unauthenticated => "UNAUTHENTICATED",
            ErrorReason::Unavailable => "UNAVAILABLE",
            ErrorReason::NotLeader => "NOT_LEADER",
            ErrorReason::Internal => "INTERNAL",
            ErrorReason::NodeUnavailable => "NODE_UNAVAILABLE",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorReason> {
        use ErrorReason::*;
        [
            InvalidArgument,
            InvalidFingerprint,
            LeaseLost,
            KeyTooOld,
            AlreadyCompleted,
            NotFound,
            Unauthenticated,
            Unavailable,
            NotLeader,
            Internal,
            NodeUnavailable,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    pub fn code(self) -> Code {
        match self {
            ErrorReason::InvalidArgument | ErrorReason::InvalidFingerprint => Code::InvalidArgument,
            ErrorReason::LeaseLost | ErrorReason::KeyTooOld | ErrorReason::AlreadyCompleted => {
                Code::FailedPrecondition
            }
            ErrorReason::NotFound => Code::NotFound,
            ErrorReason::Unauthenticated => Code::Unauthenticated,
            ErrorReason::Unavailable | ErrorReason::NotLeader | ErrorReason::NodeUnavailable => {
                Code::Unavailable
            }
            ErrorReason::Internal => Code::Internal,
        }
    }
}

/// Build a status with its ErrorInfo (and RetryInfo plus the pushback metadata when the
/// caller should wait).
pub fn status(
    reason: ErrorReason,
    message: impl Into<String>,
    metadata: &[(&str, String)],
    retry_after: Option<Duration>,
) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        reason.as_str(),
        DOMAIN,
        metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<std::collections::HashMap<_, _>>(),
    );
    if let Some(d) = retry_after {
        details.set_retry_info(Some(d));
    }
    let mut st = Status::with_error_details(reason.code(), message, details);
    if let Some(d) = retry_after {
        if let Ok(v) = d.as_millis().to_string().parse() {
            st.metadata_mut().insert(RETRY_PUSHBACK_HEADER, v);
        }
    }
    st
}

/// `INVALID_ARGUMENT` naming the field.
pub fn invalid(e: &idem_core::ValidationError) -> Status {
    let reason = if e.field == "fingerprint" {
        ErrorReason::InvalidFingerprint
    } else {
        ErrorReason::InvalidArgument
    };
    status(
        reason,
        e.to_string(),
        &[("field", e.field.to_string())],
        None,
    )
}

/// The reason of a status produced by `status`, if it has one.
pub fn reason_of(st: &Status) -> Option<ErrorReason> {
    st.get_details_error_info()
        .and_then(|i| ErrorReason::parse(&i.reason))
}

/// The field an `INVALID_ARGUMENT` names.
pub fn field_of(st: &Status) -> Option<String> {
    st.get_details_error_info()
        .and_then(|i| i.metadata.get("field").cloned())
}

/// How long the server asked the caller to wait, from the pushback metadata or RetryInfo.
pub fn pushback_of(st: &Status) -> Option<Duration> {
    if let Some(ms) = st
        .metadata()
        .get(RETRY_PUSHBACK_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        return Some(Duration::from_millis(ms));
    }
    st.get_details_retry_info().and_then(|r| r.retry_delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_reason_field_and_pushback() {
        let e = idem_core::ValidationError::new("key", "must not be empty");
        let st = invalid(&e);
        assert_eq!(st.code(), Code::InvalidArgument);
        assert_eq!(reason_of(&st), Some(ErrorReason::InvalidArgument));
        assert_eq!(field_of(&st).as_deref(), Some("key"));
        let st = status(
            ErrorReason::Unavailable,
            "busy",
            &[],
            Some(Duration::from_millis(250)),
        );
        assert_eq!(pushback_of(&st), Some(Duration::from_millis(250)));
        assert_eq!(st.code(), Code::Unavailable);
    }
}
