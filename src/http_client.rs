//! The one way the machine builds its HTTP clients (reqwest): with the system's CA store when
//! it has one, else with the Mozilla roots built into the binary (`webpki-root-certs`).
//!
//! reqwest's default TLS setup reads the system's CA store when a client is built and refuses
//! to build without one ("No CA certificates were loaded from the system"). A slim container
//! image may ship without `ca-certificates`; the machine must still start there (as PID 1 a
//! panic ends the container) and reach HTTPS services, as the Redis client does with its
//! bundled roots. Which roots apply is decided once per process, with one warning when the
//! system has none; a store given through `SSL_CERT_FILE`/`SSL_CERT_DIR` that loads is used.

use std::sync::OnceLock;

/// Where the trust roots of every client come from.
enum Roots {
    /// The system's CA store (`/etc/ssl/certs`, `SSL_CERT_FILE`, ...) loaded.
    System,
    /// The system has no usable store: the bundled roots.
    Bundled(Vec<reqwest::Certificate>),
}

fn roots() -> &'static Roots {
    static ROOTS: OnceLock<Roots> = OnceLock::new();
    ROOTS.get_or_init(|| match reqwest::Client::builder().build() {
        Ok(_) => Roots::System,
        Err(e) => {
            tracing::warn!(
                "no CA certificates from the system ({}); HTTPS uses the Mozilla roots built into the machine",
                crate::logging::error_chain(&e)
            );
            Roots::Bundled(bundled())
        }
    })
}

/// The bundled roots as reqwest certificates; a root that does not parse (none does not) is
/// left out rather than failing every client.
fn bundled() -> Vec<reqwest::Certificate> {
    webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .filter_map(|der| reqwest::Certificate::from_der(der).ok())
        .collect()
}

/// A client builder with the roots this process uses. Its `build` fails only for settings
/// the caller adds, never for a missing CA store.
pub(crate) fn builder() -> reqwest::ClientBuilder {
    match roots() {
        Roots::System => reqwest::Client::builder(),
        Roots::Bundled(certs) => reqwest::Client::builder().tls_certs_only(certs.iter().cloned()),
    }
}

/// The blocking client's builder with the same roots (see [`builder`]).
pub(crate) fn blocking_builder() -> reqwest::blocking::ClientBuilder {
    match roots() {
        Roots::System => reqwest::blocking::Client::builder(),
        Roots::Bundled(certs) => reqwest::blocking::Client::builder().tls_certs_only(certs.iter().cloned()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bundled_roots_parse_and_build_a_client() {
        let certs = super::bundled();
        assert!(certs.len() > 100, "{} roots", certs.len());
        reqwest::Client::builder()
            .tls_certs_only(certs)
            .build()
            .expect("a client with only the bundled roots builds");
    }
}
