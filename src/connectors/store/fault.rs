//! Whose fault a store's refusal is, read from the store's own error code.
//!
//! S3 and Azure answer a refused request with an XML body whose `<Code>` names the reason;
//! `object_store` keeps that body in its error's message, and its error's variant keeps the
//! HTTP status class. The code decides first: a signature or key the store does not accept
//! (`SignatureDoesNotMatch`, `InvalidAccessKeyId`, Azure `AuthenticationFailed` and
//! `AuthorizationFailure` on the account, an expired token, any 401) is the machine's
//! misconfiguration, and the job is given back untouched while the worker waits for its
//! credentials to be accepted again; access refused on the bucket the job names
//! (`AccessDenied`, `AuthorizationPermissionMismatch`) or a bucket or container that does not
//! exist is the job's destination's fault, and the job fails at once. A store that does not
//! answer, or answers 5xx, 408 or 429, is down for now: the upload is tried again for a while.
//! Anything else it refuses (400, 501, ...) is refused for good.

use serde::Serialize;

/// Whose fault a store's refusal is, and so what becomes of the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreFault {
    /// The store refuses the machine's credentials: the job goes back untouched and the worker
    /// is held until the store accepts them.
    Credentials,
    /// The job's destination: access refused on its bucket, or the bucket is missing. The job
    /// fails at once.
    Destination,
    /// The store is unreachable or failing for now: worth trying again.
    Unavailable,
    /// The store refused the request for good (a bad request, an operation it does not
    /// implement). The job fails at once.
    Refused,
}

/// Store error codes that refuse the machine's credentials.
const CREDENTIAL_CODES: &[&str] = &[
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidClientTokenId",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthenticationFailed",
    "AuthorizationFailure",
    "InvalidAuthenticationInfo",
    "NoAuthenticationInformation",
    "MissingSecurityHeader",
];

/// Store error codes that refuse the job's destination.
const DESTINATION_CODES: &[&str] = &[
    "AccessDenied",
    "AuthorizationPermissionMismatch",
    "AuthorizationResourceTypeMismatch",
    "AllAccessDisabled",
    "NoSuchBucket",
    "ContainerNotFound",
    "ContainerBeingDeleted",
    "ContainerDisabled",
    "InvalidBucketName",
    "InvalidResourceName",
];

/// The store's error code in `text` (the XML body `object_store` keeps in its message).
pub fn error_code(text: &str) -> Option<&str> {
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    Some(text[start..start + len].trim()).filter(|c| !c.is_empty())
}

/// The HTTP status `object_store` reports in `text`, when it got an answer.
fn status(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// Whose fault `e` is; `text` is its whole message (with the store's answer).
pub fn fault_of(e: &object_store::Error, text: &str) -> StoreFault {
    use object_store::Error as E;
    if let Some(code) = error_code(text) {
        if CREDENTIAL_CODES.contains(&code) {
            return StoreFault::Credentials;
        }
        if DESTINATION_CODES.contains(&code) {
            return StoreFault::Destination;
        }
    }
    match e {
        E::Unauthenticated { .. } => StoreFault::Credentials,
        E::PermissionDenied { .. } | E::NotFound { .. } => StoreFault::Destination,
        E::InvalidPath { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. }
        | E::UnknownConfigurationKey { .. }
        | E::AlreadyExists { .. }
        | E::Precondition { .. }
        | E::NotModified { .. } => StoreFault::Refused,
        _ => match status(text) {
            // No answer at all (refused connection, timeout, reset): down for now.
            None => StoreFault::Unavailable,
            Some(s) if s >= 500 && s != 501 && s != 505 => StoreFault::Unavailable,
            Some(408 | 429) => StoreFault::Unavailable,
            Some(_) => StoreFault::Refused,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(text: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: text.into(),
        }
    }

    #[test]
    fn codes_decide_before_statuses() {
        let signature = "Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code></Error>";
        let e = object_store::Error::PermissionDenied {
            path: "p".into(),
            source: signature.into(),
        };
        assert_eq!(fault_of(&e, signature), StoreFault::Credentials);
        let denied = signature.replace("SignatureDoesNotMatch", "AccessDenied");
        assert_eq!(fault_of(&e, &denied), StoreFault::Destination);
        let azure = "403 Server failed to authenticate the request <Error><Code>AuthorizationFailure</Code>";
        assert_eq!(fault_of(&e, azure), StoreFault::Credentials);
        let missing = "<Error><Code>ContainerNotFound</Code></Error>";
        let e404 = object_store::Error::NotFound {
            path: "p".into(),
            source: missing.into(),
        };
        assert_eq!(fault_of(&e404, missing), StoreFault::Destination);
        let e401 = object_store::Error::Unauthenticated {
            path: "p".into(),
            source: "401".into(),
        };
        assert_eq!(fault_of(&e401, "401"), StoreFault::Credentials);
    }

    #[test]
    fn outages_are_retried_and_bad_requests_are_not() {
        for (text, fault) in [
            ("error sending request: connection refused", StoreFault::Unavailable),
            (
                "Server returned non-2xx status code: 503 Service Unavailable: ",
                StoreFault::Unavailable,
            ),
            (
                "Server returned non-2xx status code: 500 Internal Server Error: ",
                StoreFault::Unavailable,
            ),
            (
                "Server returned non-2xx status code: 429 Too Many Requests: ",
                StoreFault::Unavailable,
            ),
            (
                "Server returned non-2xx status code: 501 Not Implemented: ",
                StoreFault::Refused,
            ),
            (
                "Server returned non-2xx status code: 400 Bad Request: ",
                StoreFault::Refused,
            ),
        ] {
            assert_eq!(fault_of(&generic(text), text), fault, "{text}");
        }
        assert_eq!(error_code("<Code></Code>"), None);
    }
}
