//! Where the master is: the URL's own node, or the node the Sentinels name for it.
//!
//! Every connection the broker and the operator commands open goes through [`client`], so a
//! replicated Redis is followed through a failover by opening again: the Sentinels are asked
//! afresh each time (no cached answer: the one that matters is the one after a failover), and
//! the `redis` crate's own Sentinel support checks that the node they name says `master` to
//! `ROLE` before it is used.

use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{IntoConnectionInfo, RedisError};

use crate::config::RedisUrl;

/// A client of the writable master of `url`: its own node, or with Sentinels the node they
/// name (with the URL's user, password, database and TLS). Connects to the Sentinels and the
/// master's node; callers bound it with their own timeout.
pub async fn client(url: &RedisUrl) -> Result<redis::Client, RedisError> {
    match watcher(url)? {
        None => redis::Client::open(url.expose()),
        Some(mut sentinel) => sentinel.async_get_client().await,
    }
}

/// A client of `url`'s Sentinels that keeps its connections to them, for asking often where
/// the master is (see `Broker::run_probe`); `None` without Sentinels.
pub fn watcher(url: &RedisUrl) -> Result<Option<SentinelClient>, RedisError> {
    let Some(target) = url.sentinels() else {
        return Ok(None);
    };
    let info = url.expose().into_connection_info()?;
    let tls = match info.addr() {
        redis::ConnectionAddr::TcpTls { insecure, .. } => Some(if *insecure {
            redis::TlsMode::Insecure
        } else {
            redis::TlsMode::Secure
        }),
        _ => None,
    };
    let mut node = SentinelNodeConnectionInfo::default().set_redis_connection_info(info.redis_settings().clone());
    if let Some(tls) = tls {
        node = node.set_tls_mode(tls);
    }
    let sentinels: Vec<String> = target
        .nodes
        .iter()
        .map(|(host, port)| format!("redis://{host}:{port}"))
        .collect();
    SentinelClient::build(sentinels, &target.master, Some(node), SentinelServerType::Master).map(Some)
}
