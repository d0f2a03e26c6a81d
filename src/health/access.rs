//! Who may do what on the health server: the bearer token of a request (or the control
//! socket's own) checked against the control and read tokens, compared in constant time. The
//! server's routes and the control routes both ask here, so neither imports the other for it.

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::HealthState;

/// What a guarded route lets the caller do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// Read logs, status or metrics: the read token or the control token.
    Read,
    /// Restart services or shut down: the control token only.
    Control,
}

/// Checks `Authorization: Bearer <token>` against the tokens that grant `access` and returns
/// the refusal when it does not hold; with no such token configured the route is refused.
pub(super) fn refuse(s: &HealthState, headers: &HeaderMap, access: Access) -> Option<Response> {
    // The control socket grants everything: its file mode is the access check.
    if is_local(s, headers) {
        return None;
    }
    let tokens: Vec<&str> = match access {
        Access::Control => s.control_token.iter().map(|t| t.expose()).collect(),
        Access::Read => s
            .control_token
            .iter()
            .chain(&s.access.read_token)
            .map(|t| t.expose())
            .collect(),
    };
    if tokens.is_empty() {
        let error = match access {
            Access::Control => "control routes are disabled: set MACHINE_CONTROL_TOKEN",
            Access::Read => {
                "this route needs a token: set MACHINE_READ_TOKEN or MACHINE_CONTROL_TOKEN (or open it in [health])"
            }
        };
        return Some((StatusCode::FORBIDDEN, axum::Json(json!({ "error": error }))).into_response());
    }
    let given = bearer(headers).unwrap_or("");
    // Every token is compared, so the timing does not say which one came close.
    let matched = tokens
        .iter()
        .fold(false, |ok, t| constant_time_eq(given.as_bytes(), t.as_bytes()) | ok);
    if matched {
        None
    } else if access == Access::Control && granted(s, headers) == Some(Access::Read) {
        // A valid token that only reads: the caller is known, it lacks the right, and the
        // answer names the token that has it.
        Some(
            (
                StatusCode::FORBIDDEN,
                axum::Json(json!({
                    "error": "this token only reads: restarts, stop and reload need the control token (MACHINE_CONTROL_TOKEN)"
                })),
            )
                .into_response(),
        )
    } else {
        Some(
            (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({ "error": "missing or wrong bearer token" })),
            )
                .into_response(),
        )
    }
}

/// What the request's bearer token lets it do: `Control` for the control token (or the control
/// socket), `Read` for the read token, `None` for no or a wrong token.
pub(super) fn granted(s: &HealthState, headers: &HeaderMap) -> Option<Access> {
    if is_local(s, headers) {
        return Some(Access::Control);
    }
    let given = bearer(headers)?;
    // Both are compared whatever the first gives, so the timing does not say which matched.
    let control = s
        .control_token
        .as_ref()
        .is_some_and(|t| constant_time_eq(given.as_bytes(), t.expose().as_bytes()));
    let read = s
        .access
        .read_token
        .as_ref()
        .is_some_and(|t| constant_time_eq(given.as_bytes(), t.expose().as_bytes()));
    if control {
        Some(Access::Control)
    } else if read {
        Some(Access::Read)
    } else {
        None
    }
}

/// Whether the request came through the control socket, which sends the local token.
fn is_local(s: &HealthState, headers: &HeaderMap) -> bool {
    bearer(headers).is_some_and(|given| constant_time_eq(given.as_bytes(), s.local_token.expose().as_bytes()))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Compares without an early exit, so response timing does not reveal how much of a guess was
/// right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"", b"abc"));
    }
}
