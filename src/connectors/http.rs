//! HTTP plumbing shared by the connectors: one client configuration, how a status code is
//! classified, `Retry-After` on top of the retry [`Backoff`], and [`send_retrying`], the
//! request loop of the external API connectors (limiter, retries, `Retry-After`, timeouts).

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use tokio_util::sync::CancellationToken;

pub(crate) use crate::backoff::Backoff;

use super::limits::Limiter;
use super::{ArtifactBody, ConnectorError, ProgressSink, or_cancelled};

/// The HTTP client connectors use: short connect timeout (a dead local service is noticed at
/// once), no overall timeout (jobs may legitimately run for many minutes; the worker's job
/// timeout and cancellation bound them).
pub(crate) fn client() -> reqwest::Client {
    crate::http_client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .expect("timeouts on a builder whose roots are known to load always build (crate::http_client)")
}

/// Whether a service answers its health check at `url` with a success within a few seconds
/// (what a connector asks after a stall: is the service wedged, or only the job?).
pub(crate) async fn answers(client: &reqwest::Client, url: reqwest::Url) -> bool {
    let answer = client.get(url).timeout(Duration::from_secs(3)).send().await;
    answer.is_ok_and(|r| r.status().is_success())
}

/// The error for a failed request that never got an answer.
pub(crate) fn send_error(what: &str, e: reqwest::Error) -> ConnectorError {
    ConnectorError::unavailable(format!("failed to {what}"), e)
}

/// The error for a non-success answer: 4xx (other than 408 and 429) means the request is wrong
/// and fails without retry; everything else may succeed later.
pub(crate) fn status_error(what: &str, status: StatusCode, body: &str) -> ConnectorError {
    let body = snippet(body);
    if status.is_client_error() && !retryable_status(status) {
        ConnectorError::Rejected {
            message: format!("{what}: HTTP {status}: {body}"),
        }
    } else {
        ConnectorError::Unavailable {
            message: format!("{what}: HTTP {status}: {body}"),
            source: None,
        }
    }
}

/// A refusal of the machine's credentials for `api` rather than of the job, or `None`: a 401
/// (the key), a 402 (Replicate's "Insufficient credit"), a 429 saying `insufficient_quota`
/// (OpenAI's account out of credit), or a 403 that names no model, version, deployment or
/// endpoint (a 403 for one of those is the job's: another model may be allowed).
pub(crate) fn refusal(api: &str, what: &str, status: StatusCode, body: &str, message: &str) -> Option<ConnectorError> {
    let lower = message.to_ascii_lowercase();
    let names_target = ["model", "version", "deployment", "endpoint"]
        .iter()
        .any(|w| lower.contains(w));
    let credit = match status.as_u16() {
        401 => false,
        403 if !names_target => false,
        402 => true,
        429 if body.contains("insufficient_quota") => true,
        _ => return None,
    };
    Some(ConnectorError::CredentialsRefused {
        api: api.to_owned(),
        credit,
        message: format!("{what}: HTTP {status}: {}", snippet(message)),
    })
}

/// Whether a status is worth retrying: 408, 429 and 5xx.
pub(crate) fn retryable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// The first 500 characters of a response body, for error messages.
pub(crate) fn snippet(body: &str) -> String {
    let trimmed = body.trim();
    match trimmed.char_indices().nth(500) {
        Some((i, _)) => format!("{}…", &trimmed[..i]),
        None => trimmed.to_owned(),
    }
}

/// The delay a server asked for: `retry-after-ms` (OpenAI's), else `Retry-After` in seconds or
/// as an HTTP date (a date in the past means now).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    retry_after_at(headers, jiff::Timestamp::now())
}

fn retry_after_at(headers: &HeaderMap, now: jiff::Timestamp) -> Option<Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64(ms.min(86_400_000.0) / 1000.0));
        }
    }
    let value = get("retry-after")?;
    if let Ok(s) = value.parse::<f64>() {
        return (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s.min(86_400.0)));
    }
    // The HTTP-date form (RFC 9110 IMF-fixdate) is an RFC 2822 date with the `GMT` zone.
    let at = jiff::fmt::rfc2822::DateTimeParser::new().parse_timestamp(value).ok()?;
    let wait = now.duration_until(at);
    Some(
        Duration::try_from(wait)
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(86_400)),
    )
}

/// How [`send_retrying`] sends one logical request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retrying<'a> {
    /// What the request does, for errors (`create a Replicate prediction`).
    pub what: &'a str,
    /// The API (`replicate`, `runpod`), for a refusal of its credentials.
    pub api: &'a str,
    /// Attempts on 408/429/5xx and connection failures (at least 1).
    pub attempts: u32,
    /// Delays between attempts (a server's `Retry-After` wins, capped by `max`).
    pub backoff: Backoff,
    /// The limit of one attempt.
    pub timeout: Option<Duration>,
    /// The fleet-wide limiter each attempt passes first, with the job's customer.
    pub limiter: Option<(&'a Limiter, &'a str)>,
    /// For a request that creates paid work, the API's name: such a request is retried only
    /// when the API cannot have acted on it (see [`send_retrying`]).
    pub creates: Option<&'a str>,
    /// Where a wait for the fleet-wide limiter is reported.
    pub progress: Option<&'a ProgressSink>,
}

/// Sends the request `build` makes until it succeeds, retrying what may succeed later (408,
/// 429, 5xx, no answer) with the backoff and the server's `Retry-After`, each attempt admitted
/// by the limiter first. A 4xx input error fails at once, as `Rejected` with the API's message
/// (`message` extracts it from the body).
///
/// A request that creates work (`creates`) is retried only after a 429 or a connection that
/// failed before the request was sent: neither Replicate nor RunPod has an idempotency key,
/// and RunPod cannot list jobs, so a create retried after a 5xx or a timeout may pay twice for
/// one job and leave the first run unfollowed. Those end in [`ConnectorError::MaybeCreated`].
pub(crate) async fn send_retrying(
    build: impl Fn() -> reqwest::RequestBuilder,
    how: Retrying<'_>,
    message: fn(&str) -> String,
    cancel: &CancellationToken,
) -> Result<reqwest::Response, ConnectorError> {
    let mut retry = 0;
    loop {
        if let Some((limiter, customer)) = how.limiter {
            limiter.acquire(customer, how.progress, cancel).await?;
        }
        let mut req = build();
        if let Some(t) = how.timeout {
            req = req.timeout(t);
        }
        let answer = or_cancelled(cancel, async { Ok(req.send().await) }).await?;
        let (err, asked) = match answer {
            Err(e) => {
                let unsent = e.is_connect();
                let err = send_error(how.what, e);
                match how.creates {
                    Some(api) if !unsent => return Err(maybe_created(api, err)),
                    _ => (err, None),
                }
            }
            Ok(resp) if resp.status().is_success() => return Ok(resp),
            Ok(resp) => {
                let status = resp.status();
                let asked = retry_after(resp.headers());
                let text = or_cancelled(cancel, async { Ok(resp.text().await.unwrap_or_default()) }).await?;
                if let Some(refused) = refusal(how.api, how.what, status, &text, &message(&text)) {
                    return Err(refused);
                }
                let err = status_error(how.what, status, &message(&text));
                if !retryable_status(status) {
                    return Err(err);
                }
                match how.creates {
                    Some(api) if status != StatusCode::TOO_MANY_REQUESTS => return Err(maybe_created(api, err)),
                    _ => (err, asked),
                }
            }
        };
        if retry + 1 >= how.attempts.max(1) {
            return Err(err);
        }
        let delay = retry_delay(&how.backoff, retry, asked);
        tracing::info!(error = %err.chain(), ?delay, "API request will be retried");
        tokio::select! {
            () = cancel.cancelled() => return Err(ConnectorError::Cancelled),
            () = tokio::time::sleep(delay) => {}
        }
        retry += 1;
    }
}

/// The error for a create the API may have acted on although it did not say so.
pub(crate) fn maybe_created(api: &str, err: ConnectorError) -> ConnectorError {
    ConnectorError::MaybeCreated {
        api: api.to_owned(),
        message: err.chain(),
    }
}

/// Sends a cheap authenticated request (a credentials re-check): `Ok` on a success, else why not.
pub(crate) async fn check(req: reqwest::RequestBuilder) -> Result<(), String> {
    match req.timeout(Duration::from_secs(10)).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => {
            let status = r.status();
            Err(format!(
                "HTTP {status}: {}",
                snippet(&r.text().await.unwrap_or_default())
            ))
        }
        Err(e) => Err(crate::logging::error_chain(&e)),
    }
}

/// The delay before retry number `retry` (0-based): the server's request when it made one,
/// else the backoff's own delay; never more than the backoff's `max`.
pub(crate) fn retry_delay(backoff: &Backoff, retry: u32, server_asked: Option<Duration>) -> Duration {
    server_asked.map_or_else(|| backoff.delay(retry, 0.0), |asked| asked.min(backoff.max))
}

/// Downloads an output an API handed out as a URL (`what` names it in errors). A failed
/// download keeps the URL, where the output stays reachable for a while, rather than failing
/// a job the API finished; a cancel ends the download at once.
pub(crate) async fn fetch_output(
    client: &reqwest::Client,
    url: &str,
    what: &str,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<ArtifactBody, ConnectorError> {
    let fetched = or_cancelled(cancel, async {
        let r = client
            .get(url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| send_error(what, e))?;
        if !r.status().is_success() {
            return Err(status_error(what, r.status(), ""));
        }
        r.bytes().await.map_err(|e| send_error(what, e))
    })
    .await;
    match fetched {
        Ok(bytes) => Ok(ArtifactBody::Bytes(bytes)),
        Err(ConnectorError::Cancelled) => Err(ConnectorError::Cancelled),
        Err(e) => {
            tracing::warn!(error = %e.chain(), url, "failed to {what}; keeping its URL");
            Ok(ArtifactBody::Url(url.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        h.clear();
        h.insert("retry-after", HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        let now: jiff::Timestamp = "2015-10-21T07:27:57.5Z".parse().unwrap();
        assert_eq!(retry_after_at(&h, now), Some(Duration::from_millis(2500)));
        assert_eq!(retry_after(&h), Some(Duration::ZERO), "a date in the past means now");
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn credential_refusals_are_told_from_the_jobs() {
        let refused =
            |status: u16, body: &str| refusal("replicate", "x", StatusCode::from_u16(status).unwrap(), body, body);
        assert!(matches!(
            refused(401, "Unauthenticated"),
            Some(ConnectorError::CredentialsRefused { credit: false, .. })
        ));
        assert!(matches!(
            refused(403, "Forbidden"),
            Some(ConnectorError::CredentialsRefused { credit: false, .. })
        ));
        assert!(
            refused(403, "You do not have access to this model").is_none(),
            "the job's"
        );
        assert!(matches!(
            refused(402, "Insufficient credit"),
            Some(ConnectorError::CredentialsRefused { credit: true, .. })
        ));
        let quota = r#"{"error":{"code":"insufficient_quota","message":"You exceeded your current quota"}}"#;
        assert!(matches!(
            refused(429, quota),
            Some(ConnectorError::CredentialsRefused { credit: true, .. })
        ));
        assert!(refused(429, "Rate limit reached").is_none());
        assert!(refused(404, "Not found").is_none());
    }

    #[test]
    fn statuses_are_classified() {
        use crate::connectors::ErrorClass;
        assert_eq!(
            status_error("x", StatusCode::BAD_REQUEST, "").class(),
            ErrorClass::Fatal
        );
        assert_eq!(
            status_error("x", StatusCode::TOO_MANY_REQUESTS, "").class(),
            ErrorClass::Retryable
        );
        assert_eq!(
            status_error("x", StatusCode::BAD_GATEWAY, "").class(),
            ErrorClass::Retryable
        );
        assert!(snippet(&"a".repeat(600)).ends_with('…'));
    }

    proptest! {
        #[test]
        fn backoff_grows_and_is_capped(
            initial_ms in 1u64..5_000,
            max_ms in 1u64..120_000,
            retry in 0u32..100,
            asked_ms in proptest::option::of(0u64..1_000_000),
        ) {
            let b = Backoff::doubling(Duration::from_millis(initial_ms), Duration::from_millis(max_ms));
            let asked = asked_ms.map(Duration::from_millis);
            let d = retry_delay(&b, retry, asked);
            prop_assert!(d <= b.max);
            if let Some(a) = asked {
                prop_assert_eq!(d, a.min(b.max));
            } else {
                prop_assert!(retry_delay(&b, retry + 1, None) >= d);
                if retry == 0 { prop_assert_eq!(d, b.initial.min(b.max)); }
            }
        }
    }
}
