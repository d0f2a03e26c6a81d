//! The control socket: the machine's operator interface for the `machine` commands run beside
//! it (`status`, `logs`, `restart`, `stop`, and whatever is added later, such as `reload`).
//!
//! The socket (`<workspace>/run/control.sock`, mode 0600) serves the health server's own routes,
//! so there is one protocol and one set of routes: HTTP/1.1, the same JSON documents. A request
//! that arrives through the socket is granted control access, as supervisorctl's socket is: the
//! file's owner-only mode is the access check, so no token is needed locally. Over TCP the same
//! routes keep asking for the read or control token.
//!
//! The routes only the commands need (following a log, stopping with or without the drain) live
//! in `routes.rs` and are merged into the health router; a new command adds its route there.

mod routes;
mod socket;

pub(super) use routes::routes;
pub(super) use socket::serve;
pub use socket::{ControlError, ControlSocket, SOCKET, bind, socket_path};

/// The bearer token the control socket sends on its callers' behalf: random, new each start,
/// never printed, never sent anywhere.
#[derive(Clone, PartialEq, Eq)]
pub struct LocalToken(String);

impl LocalToken {
    /// A fresh random token.
    pub fn new() -> LocalToken {
        LocalToken(format!("{:032x}", rand::random::<u128>()))
    }

    /// The token, for the socket that sends it and the check that compares it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Default for LocalToken {
    fn default() -> LocalToken {
        LocalToken::new()
    }
}

impl std::fmt::Debug for LocalToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalToken(***)")
    }
}
