//! Reading a job's `ctx`: where its outputs go, under which prefix and name.
//!
//! The existing fleet's API writes two shapes and both occur: the destination under
//! `ctx.storage` (`{"storage": {"provider", "bucket", "cdnUrl"}, "prefix", "filename"}`) and the
//! same fields flat on `ctx` itself. `provider`, `bucket` and `cdnUrl` are read from
//! `ctx.storage` first, `prefix` from `ctx` first, as the existing workers read them. A `ctx`
//! that carries no storage setting at all (absent, `null`, or none of `storage`, `provider`,
//! `bucket`, `cdnUrl`, `prefix`, `filename`) means the machine's local output directory, and so
//! does `provider = "local"`; any other must name all of provider, bucket and prefix, as the
//! existing asset saver requires ("Storage provider is required"): a job that says where its
//! outputs go never completes with a `file://` URL no client can open. The prefix and filename
//! are kept as the job wrote them, so the key is the one the existing workers build (`prefix`,
//! a `/` unless it ends with one, the filename); only what is unsafe is refused, naming the
//! field: a `..` segment or a control character. Everything here is checked before a job
//! runs, so a bad `ctx` fails the job at once instead of after the work is done.

use serde_json::Value;

use super::StoreError;
use crate::cloud::Provider;

/// The cloud provider a `provider` field names.
fn provider_named(name: &str) -> Option<Provider> {
    match name.trim().to_ascii_lowercase().as_str() {
        "s3" | "aws" | "amazon" | "r2" | "minio" => Some(Provider::S3),
        "azure" | "azblob" | "azure_blob" | "blob" => Some(Provider::Azure),
        "gcs" | "gcp" | "google" => Some(Provider::Gcs),
        _ => None,
    }
}

/// Where one job's outputs go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Place {
    /// The machine's local output directory.
    Local,
    /// A bucket (an Azure container) of a cloud provider.
    Cloud {
        provider: Provider,
        bucket: String,
        /// `cdnUrl` as a URL base without its trailing `/` (`https://` added when it names no
        /// scheme; an `http://` one stays `http://`), when given.
        cdn: Option<String>,
    },
}

/// A job's validated output destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Spec {
    pub place: Place,
    /// The key prefix as the job wrote it (empty only for local outputs).
    pub prefix: String,
    /// The `filename` as the job wrote it, when given.
    pub filename: Option<String>,
    /// The attempt number `ctx` itself carries (`retry_count`, `retryCount` or
    /// `workflow_context.retry_attempt`), which the existing API sets on workflow retries.
    pub retry_hint: u32,
}

/// Decodes the job hash's `ctx` field: absent or empty is `null`; anything else must be JSON.
pub fn parse_ctx(raw: Option<&str>) -> Result<Value, StoreError> {
    match raw.map(str::trim) {
        None | Some("") => Ok(Value::Null),
        Some(text) => serde_json::from_str(text).map_err(|e| StoreError::BadCtx(format!("ctx is not JSON ({e})"))),
    }
}

/// Reads and checks the destination a `ctx` names.
pub(super) fn spec(ctx: &Value) -> Result<Spec, StoreError> {
    let bad = StoreError::BadCtx;
    let ctx = match ctx {
        Value::Null => {
            return Ok(Spec {
                place: Place::Local,
                prefix: String::new(),
                filename: None,
                retry_hint: 0,
            });
        }
        Value::Object(map) => map,
        other => return Err(bad(format!("ctx must be a JSON object, not {}", kind(other)))),
    };
    let storage = match ctx.get("storage") {
        None | Some(Value::Null) => None,
        Some(Value::Object(s)) => Some(s),
        Some(other) => return Err(bad(format!("ctx.storage must be an object, not {}", kind(other)))),
    };
    // A field from `ctx.storage` first, then from `ctx` (or the other way round).
    let pick = |name: &str, storage_first: bool| -> Result<Option<String>, StoreError> {
        let in_storage = storage.and_then(|s| s.get(name)).filter(|v| !v.is_null());
        let in_ctx = ctx.get(name).filter(|v| !v.is_null());
        let (first, second) = if storage_first {
            (in_storage, in_ctx)
        } else {
            (in_ctx, in_storage)
        };
        match first.or(second) {
            None => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
            Some(other) => Err(bad(format!("`{name}` must be a string, not {}", kind(other)))),
        }
    };
    let provider = pick("provider", true)?;
    let bucket = match pick("bucket", true)? {
        Some(b) => Some(b),
        None => pick("container", true)?,
    };
    let cdn = pick("cdnUrl", true)?.or(pick("cdn_url", true)?);
    // The prefix and the filename are kept as written (not trimmed): they are the object key.
    let verbatim = |name: &str, storage_first: bool| -> Result<Option<String>, StoreError> {
        let in_storage = storage.and_then(|s| s.get(name)).filter(|v| !v.is_null());
        let in_ctx = ctx.get(name).filter(|v| !v.is_null());
        let found = if storage_first {
            in_storage.or(in_ctx)
        } else {
            in_ctx.or(in_storage)
        };
        match found {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(bad(format!("`{name}` must be a string, not {}", kind(other)))),
        }
    };
    let prefix = verbatim("prefix", false)?;
    let filename = verbatim("filename", false)?;
    if let Some(p) = &prefix {
        check_key_part("prefix", "ctx.prefix or ctx.storage.prefix", p)?;
    }
    if let Some(f) = &filename {
        check_key_part("filename", "ctx.filename", f)?;
    }
    let retry_hint = retry_hint(ctx);
    // Any storage setting means the job names a destination; only a job with none (or
    // `provider = "local"`) stores on this machine.
    let settings = storage.is_some()
        || [
            "provider",
            "bucket",
            "container",
            "cdnUrl",
            "cdn_url",
            "prefix",
            "filename",
        ]
        .iter()
        .any(|k| ctx.get(*k).is_some_and(|v| !v.is_null()));

    let place = match (provider.as_deref(), &bucket) {
        (Some(p), _) if p.eq_ignore_ascii_case("local") => Place::Local,
        (None, _) if !settings => Place::Local,
        (None, _) => {
            return Err(bad(
                "`provider` is missing (ctx.storage.provider or ctx.provider): the job names where its outputs go, so they are not kept on this machine"
                    .to_owned(),
            ));
        }
        (Some(p), bucket) => {
            let provider = provider_named(p)
                .ok_or_else(|| bad(format!("unknown provider `{p}` (known: azure, s3, gcs, local)")))?;
            let bucket = bucket
                .clone()
                .ok_or_else(|| bad("`bucket` is missing (ctx.storage.bucket or ctx.bucket)".to_owned()))?;
            if prefix.is_none() {
                return Err(bad("`prefix` is missing (ctx.prefix or ctx.storage.prefix)".to_owned()));
            }
            let cdn = cdn.map(|c| cdn_base(&c)).filter(|c| !c.is_empty());
            Place::Cloud { provider, bucket, cdn }
        }
    };
    let prefix = prefix.unwrap_or_default();
    Ok(Spec {
        place,
        prefix,
        filename,
        retry_hint,
    })
}

fn retry_hint(ctx: &serde_json::Map<String, Value>) -> u32 {
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    let hint = n(ctx.get("retry_count"))
        .max(n(ctx.get("retryCount")))
        .max(n(ctx.get("workflow_context").and_then(|w| w.get("retry_attempt"))));
    u32::try_from(hint).unwrap_or(u32::MAX)
}

/// A `cdnUrl` as a URL base, as the existing workers build it: `https://` added unless it
/// starts with `http` (so `http://` stays), without the trailing `/`.
fn cdn_base(cdn: &str) -> String {
    let cdn = cdn.trim_end_matches('/');
    if cdn.is_empty() || cdn.starts_with("http") {
        cdn.to_owned()
    } else {
        format!("https://{cdn}")
    }
}

/// Refuses what is unsafe in a part of an object key (`field`, found at `at`): a control
/// character, or a `..` segment that would climb out of the prefix (on the local disk, out of
/// the output directory). Everything else is the job's to choose.
fn check_key_part(field: &str, at: &str, value: &str) -> Result<(), StoreError> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(StoreError::BadCtx(format!(
            "`{field}` has a control character ({:?}) ({at})",
            c
        )));
    }
    if value.split(['/', '\\']).any(|segment| segment == "..") {
        return Err(StoreError::BadCtx(format!("`{field}` has a `..` segment ({at})")));
    }
    Ok(())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(ctx: Value) -> String {
        spec(&ctx).unwrap_err().to_string()
    }

    #[test]
    fn both_shapes_are_read() {
        let nested = spec(
            &json!({"storage": {"provider": "azure", "bucket": "b", "cdnUrl": "https://cdn.x/"},
                                   "prefix": "/a//b/", "filename": "x.jpg"}),
        )
        .unwrap();
        let flat = spec(
            &json!({"provider": "azure", "bucket": "b", "cdnUrl": "cdn.x", "prefix": "a/b",
                                 "filename": "x.jpg"}),
        )
        .unwrap();
        assert_eq!(nested.place, flat.place);
        assert_eq!(
            nested.place,
            Place::Cloud {
                provider: Provider::Azure,
                bucket: "b".into(),
                cdn: Some("https://cdn.x".into())
            }
        );
        assert_eq!(nested.prefix, "/a//b/", "kept as written");
        assert_eq!(flat.prefix, "a/b");
        assert_eq!(nested.filename.as_deref(), Some("x.jpg"));
    }

    #[test]
    fn no_storage_setting_means_local() {
        assert_eq!(spec(&Value::Null).unwrap().place, Place::Local);
        assert_eq!(spec(&json!({})).unwrap().place, Place::Local);
        assert_eq!(spec(&json!({"storage": null})).unwrap().place, Place::Local);
        assert_eq!(
            spec(&json!({"workflow_context": {"retry_attempt": 1}})).unwrap().place,
            Place::Local
        );
        assert_eq!(
            spec(&json!({"storage": {"provider": "local"}, "prefix": "p"}))
                .unwrap()
                .place,
            Place::Local
        );
    }

    #[test]
    fn each_problem_names_its_field() {
        assert!(
            err(json!({"storage": {"provider": "ftp", "bucket": "b"}, "prefix": "p"}))
                .contains("unknown provider `ftp`")
        );
        assert!(err(json!({"storage": {"provider": "s3"}, "prefix": "p"})).contains("`bucket` is missing"));
        assert!(err(json!({"storage": {"provider": "s3", "bucket": "b"}})).contains("`prefix` is missing"));
        assert!(err(json!({"bucket": "b", "prefix": "p"})).contains("`provider` is missing"));
        // Storage settings without a provider or bucket are not local outputs (issue 23).
        for ctx in [
            json!({"storage": {"cdnUrl": "cdn.example.test"}, "prefix": "p", "filename": "f.png"}),
            json!({"storage": {}}),
            json!({"prefix": "p"}),
            json!({"filename": "f.png"}),
        ] {
            assert!(err(ctx.clone()).contains("`provider` is missing"), "{ctx}");
        }
        assert!(
            err(json!({"storage": {"provider": "s3", "cdnUrl": "c"}, "prefix": "p"})).contains("`bucket` is missing")
        );
        assert!(
            err(json!({"storage": {"provider": "s3", "bucket": "b"}, "prefix": "a/../b"}))
                .contains("`prefix` has a `..` segment")
        );
        assert!(
            err(json!({"storage": {"provider": "s3", "bucket": "b"}, "prefix": "p", "filename": "../x.png"}))
                .contains("`filename` has a `..` segment")
        );
        assert!(
            err(json!({"storage": {"provider": "s3", "bucket": "b"}, "prefix": "p\nq"}))
                .contains("`prefix` has a control character")
        );
        assert!(err(json!({"provider": 3})).contains("`provider` must be a string"));
        assert!(err(json!("x")).contains("ctx must be a JSON object"));
        assert!(err(json!({"storage": "azure"})).contains("ctx.storage must be an object"));
    }

    #[test]
    fn ctx_must_be_json() {
        assert_eq!(parse_ctx(None).unwrap(), Value::Null);
        assert_eq!(parse_ctx(Some("  ")).unwrap(), Value::Null);
        let e = parse_ctx(Some("{not json")).unwrap_err().to_string();
        assert!(e.starts_with("invalid ctx: ctx is not JSON"), "{e}");
    }

    #[test]
    fn retry_hints_come_from_any_known_field() {
        assert_eq!(
            spec(&json!({"workflow_context": {"retry_attempt": 2}}))
                .unwrap()
                .retry_hint,
            2
        );
        assert_eq!(spec(&json!({"retryCount": 1})).unwrap().retry_hint, 1);
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_keep_what_the_job_wrote_and_cdn_schemes_stay() {
        let s = spec(
            &json!({"storage": {"provider": "s3", "bucket": "b", "cdnUrl": "http://cdn.example/"},
            "prefix": "user@example.com/My Session x", "filename": "My Pic.jpg"}),
        )
        .unwrap();
        assert_eq!(s.prefix, "user@example.com/My Session x");
        assert_eq!(s.filename.as_deref(), Some("My Pic.jpg"));
        assert!(matches!(s.place, Place::Cloud { cdn: Some(ref c), .. } if c == "http://cdn.example"));
        assert_eq!(cdn_base("cdn.example"), "https://cdn.example");
        assert_eq!(cdn_base("https://cdn.example//"), "https://cdn.example");
    }
}
