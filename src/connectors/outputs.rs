//! The files in an external API's output, wherever they sit in it.
//!
//! Replicate and RunPod answer with arbitrary JSON: a URL, a list of URLs, an object whose
//! values are lists (Cog's `Output(BaseModel)`), RunPod's worker-comfyui
//! `{"images": [{"filename", "type": "base64", "data"}]}`, or `data:` URIs. [`take_files`] walks
//! the whole output at any depth and finds every file: http(s) URLs (downloaded by the
//! connector, since the providers delete them after a while) and inline bytes (base64 objects
//! and `data:` URIs, decoded here). Inline bytes are cut out of the output and replaced by
//! `artifacts[N]`, the place of their stored copy in the result's `artifacts`, so that no
//! output's bytes reach Redis.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::http;
use super::{Artifact, ArtifactBody, ConnectorError};

/// One file found in an output.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Found {
    /// A file the API hands out as a URL.
    Url(String),
    /// A file inline in the output, decoded.
    Inline {
        /// The name the output gave it, if any.
        name: Option<String>,
        /// The MIME type a `data:` URI declared, if any.
        content_type: Option<String>,
        /// The bytes.
        bytes: Bytes,
    },
}

/// Every file in `output` (lists in order, objects by key); inline bytes are decoded and replaced in
/// `output` by `artifacts[N]` (N their index among the files). A base64 object or `data:` URI
/// that does not decode fails the job: the API answered with a broken file.
pub(crate) fn take_files(output: &mut Value) -> Result<Vec<Found>, ConnectorError> {
    let mut found = Vec::new();
    walk(output, &mut found)?;
    Ok(found)
}

fn walk(v: &mut Value, found: &mut Vec<Found>) -> Result<(), ConnectorError> {
    match v {
        Value::String(s) if s.starts_with("http://") || s.starts_with("https://") => {
            found.push(Found::Url(s.clone()));
        }
        Value::String(s) if s.starts_with("data:") => {
            if let Some((content_type, bytes)) = data_uri(s)? {
                *v = Value::String(format!("artifacts[{}]", found.len()));
                found.push(Found::Inline {
                    name: None,
                    content_type,
                    bytes,
                });
            }
        }
        Value::Array(items) => {
            for item in items {
                walk(item, found)?;
            }
        }
        Value::Object(map) => {
            // RunPod's worker-comfyui (and handlers written after it): one image as
            // `{"filename", "type": "base64", "data": "<base64>"}`.
            let inline = map.get("type").and_then(Value::as_str) == Some("base64")
                && map.get("data").is_some_and(Value::is_string);
            if inline {
                let data = map.get("data").and_then(Value::as_str).unwrap_or_default();
                let bytes = decode(data).map_err(|e| broken(&format!("a base64 output ({e})")))?;
                let name = map.get("filename").and_then(Value::as_str).map(str::to_owned);
                map.insert("data".to_owned(), Value::String(format!("artifacts[{}]", found.len())));
                found.push(Found::Inline {
                    name,
                    content_type: None,
                    bytes,
                });
                return Ok(());
            }
            for item in map.values_mut() {
                walk(item, found)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A `data:[<type>][;base64],<data>` URI's type and bytes; `None` for one that is not base64
/// (text inline in the output, small by nature, stays as it is).
fn data_uri(s: &str) -> Result<Option<(Option<String>, Bytes)>, ConnectorError> {
    let Some((head, data)) = s["data:".len()..].split_once(',') else {
        return Ok(None);
    };
    let Some(media) = head.strip_suffix(";base64") else {
        return Ok(None);
    };
    let bytes = decode(data).map_err(|e| broken(&format!("a data: URI output ({e})")))?;
    let media = media.split(';').next().unwrap_or_default().trim();
    Ok(Some(((!media.is_empty()).then(|| media.to_owned()), bytes)))
}

/// Standard base64, with or without padding and line breaks.
fn decode(data: &str) -> Result<Bytes, base64::DecodeError> {
    let clean: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let clean = clean.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(clean)
        .map(Bytes::from)
}

fn broken(what: &str) -> ConnectorError {
    ConnectorError::Failed {
        message: format!("the API answered with {what} that is not valid base64"),
        retryable: false,
    }
}

/// The files of `found` as artifacts: inline bytes as they are, URLs downloaded (kept as URLs
/// when the download fails). Names come from the output, the URL's last segment or the index.
pub(crate) async fn artifacts(
    client: &reqwest::Client,
    found: Vec<Found>,
    cancel: &CancellationToken,
) -> Result<Vec<Artifact>, ConnectorError> {
    let mut out = Vec::with_capacity(found.len());
    for (i, file) in found.into_iter().enumerate() {
        let artifact = match file {
            Found::Url(url) => {
                let name = url_file_name(&url, i);
                let content_type = super::guess_content_type(&name).to_owned();
                let what = "download an output";
                let body = http::fetch_output(client, &url, what, Duration::from_secs(120), cancel).await?;
                Artifact {
                    name,
                    content_type,
                    body,
                }
            }
            Found::Inline {
                name,
                content_type,
                bytes,
            } => {
                let name = name
                    .filter(|n| !n.trim().is_empty())
                    .map_or_else(|| format!("output_{i}"), |n| format!("{i}_{n}"));
                let content_type = content_type.unwrap_or_else(|| super::guess_content_type(&name).to_owned());
                Artifact {
                    name,
                    content_type,
                    body: ArtifactBody::Bytes(bytes),
                }
            }
        };
        out.push(artifact);
    }
    Ok(out)
}

/// A file name for output `i` from its URL's last path segment.
pub(crate) fn url_file_name(url: &str, i: usize) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.path_segments().and_then(|mut s| s.next_back().map(str::to_owned)))
        .filter(|s| !s.is_empty())
        .map_or_else(|| format!("output_{i}"), |s| format!("{i}_{s}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn urls_are_found_at_any_depth() {
        let mut out = json!({"images": ["https://a/1.png", "https://a/2.png"], "seed": 7,
                             "deep": {"x": [[{"y": {"z": "http://b/3.webp"}}]]}, "text": "hello"});
        // Objects are walked by key: `deep` before `images`.
        let before = out.clone();
        let found = take_files(&mut out).unwrap();
        assert_eq!(
            found,
            ["http://b/3.webp", "https://a/1.png", "https://a/2.png"]
                .map(|u| Found::Url(u.to_owned()))
                .to_vec()
        );
        assert_eq!(out, before, "URLs stay in the output");
    }

    #[test]
    fn inline_bytes_are_decoded_and_cut_out() {
        let png = b"\x89PNG\r\n\x1a\nrest";
        let mut out = json!({"images": [
            {"filename": "ComfyUI_0001_.png", "type": "base64", "data": b64(png)},
            {"filename": "b.png", "type": "s3_url", "data": "https://bucket/b.png"},
        ], "uri": format!("data:image/webp;base64,{}", b64(b"RIFFxxxxWEBP")), "note": "data:,plain"});
        let found = take_files(&mut out).unwrap();
        assert_eq!(found.len(), 3);
        assert_eq!(
            found[0],
            Found::Inline {
                name: Some("ComfyUI_0001_.png".into()),
                content_type: None,
                bytes: Bytes::from_static(png)
            }
        );
        assert_eq!(found[1], Found::Url("https://bucket/b.png".into()));
        assert!(
            matches!(&found[2], Found::Inline { content_type: Some(t), .. } if t == "image/webp"),
            "{found:?}"
        );
        assert_eq!(out["images"][0]["data"], "artifacts[0]");
        assert_eq!(out["uri"], "artifacts[2]");
        assert_eq!(out["note"], "data:,plain", "a text data: URI is not a file");
        let mut bad = json!([{"type": "base64", "data": "not*base64"}]);
        assert!(matches!(
            take_files(&mut bad),
            Err(ConnectorError::Failed { retryable: false, .. })
        ));
    }

    #[test]
    fn names() {
        assert_eq!(url_file_name("https://x/y/out.png", 0), "0_out.png");
        assert_eq!(url_file_name("https://x/", 3), "output_3");
    }
}
