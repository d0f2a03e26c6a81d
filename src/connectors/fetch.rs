//! Outputs still at their service: what a connector hands back instead of the bytes when the
//! service keeps a finished job's files and serves them (ComfyUI's `/view`), so that the
//! worker's upload stage fetches them while the service already runs the next job.
//!
//! A [`Fetch`] is one `GET` through the connector's own client. It fails the way the connector's
//! own request would have (no answer or a 5xx: retryable; a 4xx: the request is wrong), so a job
//! whose outputs cannot be fetched is blamed exactly as when the connector fetched them itself.
//! The size is told as soon as it is known (the response's `Content-Length`, else the body once
//! read), so the worker counts it against its byte budget before the body is in memory.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;

use super::{ConnectorError, http};

/// The longest one output may take to arrive from its service: a stopped process accepts the
/// connection and never answers, and the job must end (retryably) rather than hang on it.
const FETCH_LIMIT: Duration = Duration::from_secs(120);

/// One output to be fetched from its service by the worker.
#[derive(Clone)]
pub struct Fetch {
    client: reqwest::Client,
    url: reqwest::Url,
    /// What is fetched, for errors (`ComfyUI /view ComfyUI_00001_.png`).
    what: String,
}

/// The bytes of a fetched output and the type its service declared (`None` when it declared
/// none, or only `application/octet-stream`).
#[derive(Debug)]
pub struct Fetched {
    /// The output's bytes.
    pub bytes: Bytes,
    /// Its MIME type, as the service said.
    pub content_type: Option<String>,
}

impl Fetch {
    /// A `GET url` through `client` (the connector's, with whatever its service needs); `what`
    /// names it in errors.
    pub(crate) fn new(client: reqwest::Client, url: reqwest::Url, what: impl Into<String>) -> Fetch {
        Fetch {
            client,
            url,
            what: what.into(),
        }
    }

    /// Where the output is fetched from.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// Fetches the output; `sized` is told its size once, as soon as it is known.
    pub async fn get(&self, sized: impl FnOnce(u64)) -> Result<Fetched, ConnectorError> {
        let resp = self
            .client
            .get(self.url.clone())
            .timeout(FETCH_LIMIT)
            .send()
            .await
            .map_err(|e| http::send_error(&format!("fetch {}", self.what), e))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(http::status_error(&self.what, status, &text));
        }
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .filter(|c| *c != "application/octet-stream")
            .map(str::to_owned);
        let mut sized = Some(sized);
        if let Some(len) = resp.content_length() {
            if let Some(tell) = sized.take() {
                tell(len);
            }
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| http::send_error(&format!("read {}", self.what), e))?;
        if let Some(tell) = sized {
            tell(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
        }
        Ok(Fetched { bytes, content_type })
    }
}

/// Two fetches are the same when they get the same thing from the same place (the client is
/// how, not what).
impl PartialEq for Fetch {
    fn eq(&self, other: &Fetch) -> bool {
        self.url == other.url && self.what == other.what
    }
}

impl fmt::Debug for Fetch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fetch({})", self.url)
    }
}
