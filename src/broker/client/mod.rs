//! The async broker API the workers use: claim, lifecycle, leases, heartbeats, wake-ups.
//!
//! One [`Broker`] per machine holds ONE multiplexed command connection (a `ConnectionManager`,
//! which reconnects by itself) shared by every worker, plus — while [`Broker::run_events`]
//! runs — ONE pub/sub connection that fans `job_submitted` / `job_requeued` wake-ups out to
//! waiting claimers (per service) and `cancel_job` notices to a broadcast channel. Every write
//! goes through an atomic function of the `jobMatching` library, and every lifecycle write is
//! fenced: a job cancelled or re-assigned meanwhile yields [`BrokerError::Cancelled`] or
//! [`BrokerError::LeaseLost`] instead of a silent overwrite.

mod claim;
mod events;
mod lifecycle;
mod limits;
mod operator;
mod record;
mod registry;
mod reply;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, FromRedisValue, RedisError, ServerErrorKind, cmd};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::capabilities::Capabilities;
use super::library::{self, InstallReport, Library, Mode};
use super::outage::{FaultKind, RedisHealth};
use super::retry::retry;
use super::{BrokerError, redis_err};
use crate::backoff::Backoff;
use crate::config::{MachineConfig, RedisUrl};

pub use claim::ClaimedJob;
#[cfg(test)]
pub(crate) use claim::JobFields;
pub use events::{SWEEP_EVERY, SweepReport};
pub use lifecycle::{AttemptUsage, Disposition, Failure, Fault, LeaseStatus, ReapReport};
pub use limits::{LimitAnswer, LimitBudget, QuotaDay};
pub use operator::{Cancellation, JobView, NewJob, pending_score};
pub use record::{JobField, JobProgress, JobRecord, JobState, Meaning};

/// Tunables of the broker; the defaults are the contract's.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// How long a claim holds a job without renewal (default 60 s).
    pub lease: Duration,
    /// How often an idle claimer retries without a wake-up (default 5 s).
    pub safety_poll: Duration,
    /// How long a worker that failed a job is held off it once its retry delay is over, so that
    /// another capable worker takes it first (default 30 s).
    pub failed_holdoff: Duration,
    /// How long a retryable failure waits before the job can be claimed again.
    pub retry_delay: RetryDelay,
    /// `findMatchingJob`'s second argument: how many held-off jobs of one group it skips.
    pub max_examine: u32,
    /// A job's `max_retries` counts as at most this (`worker.max_retries_cap`, default 10; 0:
    /// no cap), so that a job asking for a billion retries does not circle the fleet for years.
    pub max_retries_cap: u32,
    /// Prefix of every key and channel ("" in production; scratch prefixes for self-checks).
    pub key_prefix: String,
    /// Whether progress updates also append to the `progress:<id>` stream (capped, expiring),
    /// for a reader that wants it; nothing in the existing broker reads it (default off).
    pub progress_stream: bool,
    /// Where every command's outcome is recorded (the machine passes the one its health
    /// server reads; the start-up loop records into it before the broker exists).
    pub health: RedisHealth,
}

impl BrokerOptions {
    /// The options the machine's configuration asks for (`[worker]`'s lease, retry delay,
    /// retries cap and progress stream; the contract's defaults for the rest), recording every
    /// command's outcome in `health`.
    pub fn of(config: &MachineConfig, health: RedisHealth) -> BrokerOptions {
        BrokerOptions {
            lease: config.worker.lease,
            retry_delay: config.worker.retry_delay,
            max_retries_cap: config.worker.max_retries_cap,
            progress_stream: config.worker.progress_stream,
            health,
            ..BrokerOptions::default()
        }
    }
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(60),
            safety_poll: Duration::from_secs(5),
            failed_holdoff: Duration::from_secs(30),
            retry_delay: DEFAULT_RETRY_DELAY,
            max_examine: 100,
            max_retries_cap: 10,
            key_prefix: String::new(),
            progress_stream: false,
            health: RedisHealth::new(),
        }
    }
}

/// How long a retryable failure waits before its job can be claimed again. Jitter only ever
/// shortens the delay, so that jobs that failed together (an outage of a storage bucket) do not
/// all return at once and none waits longer than the policy says.
pub type RetryDelay = Backoff;

/// The contract's job retry delay: 5 s, doubling, at most 5 min, up to a fifth shorter.
pub const DEFAULT_RETRY_DELAY: RetryDelay = Backoff {
    initial: Duration::from_secs(5),
    factor: 2.0,
    max: Duration::from_secs(300),
    jitter: 0.2,
};

/// The broker handle; cheap to clone, shared by all workers of a machine.
#[derive(Debug, Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    url: RedisUrl,
    /// The client of the node commands go to now, and its command connection: replaced
    /// together by [`Broker::reconnect`] when that node stops being the writable master.
    client: RwLock<redis::Client>,
    conn: RwLock<ConnectionManager>,
    /// Held while a reconnect runs, with when the last one ended, so that the workers that all
    /// saw the same `READONLY` reconnect once.
    reconnecting: tokio::sync::Mutex<Option<std::time::Instant>>,
    /// Behind Sentinels, a client of them (its connections kept) that [`Broker::run_probe`]
    /// asks where the master is.
    sentinel: Option<tokio::sync::Mutex<redis::sentinel::SentinelClient>>,
    lib: Library,
    mode: RwLock<Mode>,
    opts: BrokerOptions,
    /// The lease of the next claim and renewal, in milliseconds: `opts.lease` until a reload
    /// changes it ([`Broker::set_lease`]).
    lease_ms: AtomicU64,
    wake: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Per worker id, the wake-ups the fleet's indexer sends it alone (see `claim_next`).
    wake_workers: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// The machines whose wake channel (`jobs:wake:<machine>`) [`Broker::run_events`] listens
    /// to: those of the workers that claimed through this broker.
    wake_machines: watch::Sender<std::collections::BTreeSet<String>>,
    cancels: broadcast::Sender<String>,
    observer: std::sync::OnceLock<ClaimObserver>,
    /// The workers this broker registered, to register again when Redis comes back empty.
    registered: Mutex<HashMap<String, Capabilities>>,
    /// Per worker id, its capabilities and their JSON as last sent: a worker claims with the
    /// same capabilities every time, and serialising them was about a tenth of the client's
    /// work per job (issue 27). Bounded: emptied when it reaches `CAPS_JSON_MAX` workers.
    caps_json: Mutex<HashMap<String, (Capabilities, Arc<str>)>>,
    /// `findMatchingJob`'s `max_examine` and `claimOrPark`'s park time as sent (they never change).
    max_examine_arg: String,
    park_ms_arg: String,
    /// The state of [`Broker::run_events`]' index catch-up: claimers wait for it (see
    /// [`Broker::claim_next`]).
    catch_up: watch::Sender<CatchUp>,
    /// This broker's name as the holder of the fleet's sweeper and indexer leases (its process
    /// id and a random part).
    sweeper_id: String,
    /// Whether [`Broker::run_events`] listens as the fleet's indexer now: the sweeper's
    /// periodic call tries the indexer lease only while it does not.
    indexing: std::sync::atomic::AtomicBool,
    /// Told by the sweeper when its call found the indexer lease this machine's (taken now, or
    /// still held after a reconnect): [`Broker::run_events`] then starts indexing.
    indexer_held: tokio::sync::Notify,
}

/// Whether jobs queued while no machine listened are in the index yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CatchUp {
    /// [`Broker::run_events`] is not running: claims repair the index themselves.
    NotRunning,
    /// The first catch-up after subscribing is running.
    Running,
    /// Done (or failed; claims then repair the index in steps).
    Done,
}

/// Told the round-trip time of every `findMatchingJob` call and whether it claimed a job (for
/// the machine's metrics).
pub type ClaimObserver = Arc<dyn Fn(Duration, bool) + Send + Sync>;

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("version", &self.lib.version())
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// Every key matching `pattern`, through `SCAN` (never `KEYS`: this may be a busy production
/// Redis). `SCAN` may return a key twice; callers that care remove the repeats.
async fn scan(conn: &mut ConnectionManager, pattern: &str, op: &'static str) -> Result<Vec<String>, BrokerError> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .map_err(redis_err(op))?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            return Ok(keys);
        }
    }
}

/// How long connecting may take, TCP, TLS and the handshake together: an endpoint that accepts
/// and never answers (`rediss://` to a plain Redis) fails within this instead of holding the
/// machine's start, and its shutdown.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The client of `url`'s master (through the Sentinels when it has them) and its command
/// connection, within [`CONNECT_TIMEOUT`] in all.
async fn open(url: &RedisUrl) -> Result<(redis::Client, ConnectionManager), BrokerError> {
    let failed = |source| BrokerError::Connect {
        url: url.masked(),
        source,
    };
    // Behind Sentinels a lost node is not retried for long: asking the Sentinels again (a
    // reconnect) is what finds the new master.
    let retries = if url.sentinels().is_some() { 1 } else { 3 };
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_number_of_retries(retries)
        .set_max_delay(Duration::from_secs(5));
    let connect = async {
        let client = super::sentinel::client(url).await?;
        let conn = client.get_connection_manager_with_config(config).await?;
        Ok::<_, RedisError>((client, conn))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| {
            failed(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
            )))
        })?
        .map_err(failed)
}

impl Broker {
    /// Connects the command connection. Pub/sub starts with [`Broker::run_events`].
    pub async fn connect(url: &RedisUrl, opts: BrokerOptions) -> Result<Broker, BrokerError> {
        let (client, conn) = open(url).await?;
        let sentinel = super::sentinel::watcher(url)
            .map_err(|source| BrokerError::Connect {
                url: url.masked(),
                source,
            })?
            .map(tokio::sync::Mutex::new);
        let (cancels, _) = broadcast::channel(256);
        let max_examine_arg = opts.max_examine.to_string();
        // Parked until three safety polls from now: it parks again at each, so only a worker
        // that stopped polling (a dead machine) drops out.
        let park_ms_arg = (opts.safety_poll * 3).as_millis().max(1).to_string();
        Ok(Broker {
            inner: Arc::new(Inner {
                url: url.clone(),
                client: RwLock::new(client),
                conn: RwLock::new(conn),
                reconnecting: tokio::sync::Mutex::new(None),
                sentinel,
                lib: Library::new(),
                mode: RwLock::new(Mode::Functions),
                lease_ms: AtomicU64::new(u64::try_from(opts.lease.as_millis()).unwrap_or(u64::MAX)),
                opts,
                wake: Mutex::new(HashMap::new()),
                wake_workers: Mutex::new(HashMap::new()),
                wake_machines: watch::channel(std::collections::BTreeSet::new()).0,
                cancels,
                observer: std::sync::OnceLock::new(),
                registered: Mutex::new(HashMap::new()),
                caps_json: Mutex::new(HashMap::new()),
                max_examine_arg,
                park_ms_arg,
                catch_up: watch::channel(CatchUp::NotRunning).0,
                sweeper_id: format!("{}-{:016x}", std::process::id(), rand::random::<u64>()),
                indexing: std::sync::atomic::AtomicBool::new(false),
                indexer_held: tokio::sync::Notify::new(),
            }),
        })
    }

    /// The machine's one broker: connects to its Redis ([`MachineConfig::broker_url`]) with the
    /// options its configuration asks for ([`BrokerOptions::of`]), retrying until Redis answers
    /// or `stop` ([`Broker::connect_until`]); failures are recorded in `health` (for the status
    /// page and `/ready`).
    pub async fn connect_machine(
        config: &MachineConfig,
        health: &RedisHealth,
        stop: &CancellationToken,
    ) -> Option<Broker> {
        Broker::connect_until(&config.broker_url(), BrokerOptions::of(config, health.clone()), stop).await
    }

    /// Connects to `url` and loads the function library, retrying with the one backoff while
    /// Redis is unreachable (in local mode it is still starting); `None` when `stop` comes first.
    /// Each failure is logged with its whole cause chain and recorded in `opts.health`.
    pub async fn connect_until(url: &RedisUrl, opts: BrokerOptions, stop: &CancellationToken) -> Option<Broker> {
        let health = opts.health.clone();
        let what = format!("set up the broker at {}", url.masked());
        let attempt = || {
            let opts = opts.clone();
            async move {
                let broker = Broker::connect(url, opts).await?;
                broker.ensure_functions().await?;
                Ok::<_, BrokerError>(broker)
            }
        };
        // No broker records these failures: Redis out of reach is an outage that `health`
        // says once when it starts and once when it ends; anything else is a fault of its own.
        let record = |e: &BrokerError| {
            if health.record_err(e).is_none() {
                health.record_fault(FaultKind::Other, crate::logging::error_chain(e));
            }
        };
        let broker = retry(&health, stop, &what, attempt, record).await?;
        health.record_ok();
        Some(broker)
    }

    /// The lease the next claim and renewal ask for.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.inner.lease_ms.load(Ordering::Relaxed))
    }

    /// Changes the lease from the next claim and renewal on (a reload); jobs already claimed
    /// keep theirs until their next renewal.
    pub fn set_lease(&self, lease: Duration) {
        let ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        self.inner.lease_ms.store(ms, Ordering::Relaxed);
    }

    /// Sets the observer of claim calls; only the first one set is kept.
    pub fn observe_claims(&self, observer: ClaimObserver) {
        let _ = self.inner.observer.set(observer);
    }

    /// A clone of the shared command connection, for tests that inspect Redis directly. The
    /// machine's subsystems and commands ask the broker for an operation instead (for instance
    /// [`Broker::publish_machine_status`], [`Broker::limit_usage`], [`Broker::loaded_library`]),
    /// so that every command goes through one connection with one timeout and reconnect policy.
    pub fn connection(&self) -> ConnectionManager {
        self.inner
            .conn
            .read()
            .expect("the connection lock is never poisoned: no panics while held")
            .clone()
    }

    /// The client of the node commands go to now (pub/sub connects through it).
    fn client(&self) -> redis::Client {
        self.inner
            .client
            .read()
            .expect("the connection lock is never poisoned: no panics while held")
            .clone()
    }

    /// What this broker knows of its Redis (see [`RedisHealth`]).
    pub fn health(&self) -> &RedisHealth {
        &self.inner.opts.health
    }

    /// Replaces the command connection with a new one to the current master: the node the
    /// connection reaches answered `READONLY` (a failover made it a replica, and a managed
    /// Redis's address may now lead elsewhere), or, behind Sentinels, the connection was lost
    /// (the Sentinels are asked again for the master). The connection manager reconnects by
    /// itself only to the same node, never when its node changes role. Workers that saw the
    /// same error reconnect once: a successful reconnect within the last second counts for
    /// them, while a failed one (the Sentinels still name the old master) is tried again by
    /// the next caller.
    pub(crate) async fn reconnect(&self) -> Result<(), BrokerError> {
        let mut last = self.inner.reconnecting.lock().await;
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return Ok(());
        }
        let (client, conn) = open(&self.inner.url).await?;
        *last = Some(std::time::Instant::now());
        *self
            .inner
            .client
            .write()
            .expect("the connection lock is never poisoned: no panics while held") = client;
        *self
            .inner
            .conn
            .write()
            .expect("the connection lock is never poisoned: no panics while held") = conn;
        tracing::info!(redis = %self.inner.url.masked(), "reconnected to redis");
        Ok(())
    }

    /// Whether a fault of this kind calls for a new connection to the current master: a
    /// `READONLY` answer always; a lost or refused connection behind Sentinels, whose answer
    /// may be another node now.
    fn needs_reconnect(&self, kind: Option<FaultKind>) -> bool {
        match kind {
            Some(FaultKind::ReadOnly) => true,
            Some(FaultKind::Unreachable) => self.inner.url.sentinels().is_some(),
            _ => false,
        }
    }

    /// Records a command's outcome in [`RedisHealth`]; a `READONLY` answer (and behind
    /// Sentinels a lost connection) reconnects.
    async fn observe<T>(&self, result: Result<T, BrokerError>) -> Result<T, BrokerError> {
        match &result {
            Ok(_) => self.health().record_ok(),
            Err(e) => {
                if self.needs_reconnect(self.health().record_err(e)) {
                    if let Err(again) = self.reconnect().await {
                        self.health().record_err(&again);
                    }
                }
            }
        }
        result
    }

    /// The version of the library loaded in Redis with its functions, or `None` when no
    /// `jobMatching` library is loaded.
    pub async fn loaded_library(&self) -> Result<Option<(String, Vec<library::FunctionInfo>)>, BrokerError> {
        let mut conn = self.connection();
        let Some(version) = library::loaded_version(&mut conn).await? else {
            return Ok(None);
        };
        Ok(Some((version, library::list(&mut conn).await?)))
    }

    /// Deletes the `jobMatching` library from Redis; `false` when it was not loaded.
    pub async fn delete_library(&self) -> Result<bool, BrokerError> {
        library::delete(&mut self.connection()).await
    }

    /// Deletes every key under this broker's scratch key prefix (a self-check's), scanning
    /// rather than `KEYS` since it may run against a busy production Redis. A broker without a
    /// prefix (the production key space) deletes nothing and returns 0.
    pub async fn purge_scratch_keys(&self) -> Result<u64, BrokerError> {
        let prefix = &self.inner.opts.key_prefix;
        if prefix.is_empty() {
            return Ok(0);
        }
        let mut conn = self.connection();
        let keys = scan(&mut conn, &format!("{prefix}*"), "SCAN").await?;
        let mut deleted = 0;
        for batch in keys.chunks(1000) {
            let n: u64 = cmd("DEL")
                .arg(batch)
                .query_async(&mut conn)
                .await
                .map_err(redis_err("DEL"))?;
            deleted += n;
        }
        Ok(deleted)
    }

    /// The version of this binary's `jobMatching` library: the one loaded in Redis once
    /// [`Broker::ensure_functions`] succeeded (it fails on any other).
    pub fn library_version(&self) -> &str {
        self.inner.lib.version()
    }

    /// Loads the library when needed (see [`library::install`]) and remembers how to call it.
    pub async fn ensure_functions(&self) -> Result<InstallReport, BrokerError> {
        let mut conn = self.connection();
        let report = library::install(&mut conn, &self.inner.lib).await?;
        *self
            .inner
            .mode
            .write()
            .expect("the mode lock is never poisoned: no panics while held") = report.mode.clone();
        Ok(report)
    }

    /// Runs the library through `EVALSHA` even on Redis 7 (tests of the < 7.0 path).
    pub async fn use_eval_mode(&self) -> Result<(), BrokerError> {
        let mut conn = self.connection();
        let sha = library::load_script(&mut conn, &self.inner.lib).await?;
        *self
            .inner
            .mode
            .write()
            .expect("the mode lock is never poisoned: no panics while held") = Mode::Eval { sha };
        Ok(())
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.inner.opts.key_prefix)
    }

    fn command(&self, function: &str, args: &[&str]) -> redis::Cmd {
        // Sized for its arguments at once (a claim's capabilities are hundreds of bytes).
        let size = 32 + function.len() + args.iter().map(|a| a.len() + 16).sum::<usize>();
        let mode = self
            .inner
            .mode
            .read()
            .expect("the mode lock is never poisoned: no panics while held");
        match &*mode {
            Mode::Functions => {
                let mut c = redis::Cmd::with_capacity(args.len() + 3, size);
                c.arg("FCALL").arg(function).arg(0).arg(args);
                c
            }
            Mode::Eval { sha } => {
                let mut c = redis::Cmd::with_capacity(args.len() + 4, size + sha.len());
                c.arg("EVALSHA").arg(sha).arg(0).arg(function).arg(args);
                c
            }
        }
    }

    /// Calls a library function. When the library is missing (a restarted or flushed Redis, or
    /// a script cache without our script), it is loaded again and the call retried once, so a
    /// worker never idles silently on a missing function (defect 4).
    async fn call<T: FromRedisValue>(&self, function: &'static str, args: &[&str]) -> Result<T, BrokerError> {
        let result = self.call_once(function, args).await;
        self.observe(result).await
    }

    async fn call_once<T: FromRedisValue>(&self, function: &'static str, args: &[&str]) -> Result<T, BrokerError> {
        let mut conn = self.connection();
        match self.command(function, args).query_async::<T>(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) if self.library_missing(&e).await => {
                tracing::warn!(function, "the jobMatching library is missing; loading it again");
                self.ensure_functions().await?;
                // A Redis that lost the library (restarted empty) lost the workers too.
                self.register_again().await;
                self.command(function, args)
                    .query_async::<T>(&mut conn)
                    .await
                    .map_err(redis_err(function))
            }
            Err(source) => Err(BrokerError::Redis { op: function, source }),
        }
    }

    async fn library_missing(&self, e: &RedisError) -> bool {
        match e.kind() {
            ErrorKind::Server(ServerErrorKind::NoScript) => true,
            ErrorKind::Server(ServerErrorKind::ResponseError) => {
                let functions = matches!(
                    *self
                        .inner
                        .mode
                        .read()
                        .expect("the mode lock is never poisoned: no panics while held"),
                    Mode::Functions
                );
                let mut conn = self.connection();
                functions
                    && library::loaded_version(&mut conn)
                        .await
                        .is_ok_and(|v| v.as_deref() != Some(self.inner.lib.version()))
            }
            _ => false,
        }
    }

    /// The machine's background broker work until `shutdown`: the event subscription
    /// ([`Broker::run_events`]), the reaper every `reap_every` ([`Broker::run_reaper`]) and the
    /// fleet's sweeper when this machine holds its lease ([`Broker::run_sweeper`]).
    pub async fn run(&self, reap_every: Duration, shutdown: CancellationToken) -> Result<(), BrokerError> {
        let (events, reaper, sweeper, ()) = tokio::join!(
            self.run_events(shutdown.clone()),
            self.run_reaper(reap_every, shutdown.clone()),
            self.run_sweeper(shutdown.clone()),
            self.run_probe(shutdown)
        );
        events.and(reaper).and(sweeper)
    }

    /// While Redis fails, asks it every [`PROBE_EVERY`] whether it is a writable master again
    /// (`ROLE`), so that the first success is seen within that, whatever backoff the workers
    /// sleep ([`RedisHealth::answering_again`] wakes them). A replica is `READONLY` and makes
    /// the broker reconnect. Faults of single commands (kind `other`) are the commands', not
    /// the link's: they are left to the callers' retries.
    async fn run_probe(&self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(PROBE_EVERY) => {}
            }
            let link_fault = self
                .health()
                .snapshot()
                .fault
                .is_some_and(|(kind, _)| kind != FaultKind::Other);
            if !link_fault {
                self.follow_sentinels().await;
                continue;
            }
            let mut conn = self.connection();
            let ask = cmd("ROLE");
            let role = tokio::select! {
                () = shutdown.cancelled() => return,
                r = ask.query_async::<redis::Value>(&mut conn) => r,
            };
            match role {
                Ok(redis::Value::Array(items)) if is_master(items.first()) => self.health().record_ok(),
                Ok(_) => {
                    self.health().record_fault(
                        FaultKind::ReadOnly,
                        format!("{} is a replica (ROLE)", self.inner.url.masked()),
                    );
                    if let Err(e) = self.reconnect().await {
                        self.health().record_err(&e);
                    }
                }
                Err(source) => {
                    let kind = self.health().record_err(&BrokerError::Redis { op: "ROLE", source });
                    if self.needs_reconnect(kind) {
                        // Behind Sentinels the new connection's node said `master` to `ROLE`
                        // (the Sentinel client checks it): Redis answers again now, and the
                        // workers need not wait for the next probe.
                        match self.reconnect().await {
                            Ok(()) => self.health().record_ok(),
                            Err(e) => {
                                self.health().record_err(&e);
                            }
                        }
                    }
                }
            }
        }
    }
}

impl Broker {
    /// Behind Sentinels, asks them where the master is and reconnects when it moved. A
    /// `SENTINEL FAILOVER` promotes the replica while the old master still takes writes for
    /// seconds (until the Sentinels turn it into a replica): without asking, the machine
    /// would go on claiming from the old master, which is about to drop what it took.
    async fn follow_sentinels(&self) {
        let Some(sentinel) = &self.inner.sentinel else {
            return;
        };
        let named = {
            let mut sentinel = sentinel.lock().await;
            tokio::time::timeout(PROBE_EVERY * 4, sentinel.async_get_client()).await
        };
        // No answer, or no master the Sentinels agree on: the commands' own faults say so.
        let Ok(Ok(named)) = named else {
            return;
        };
        let now = format!("{:?}", self.client().get_connection_info().addr());
        if format!("{:?}", named.get_connection_info().addr()) != now {
            tracing::info!(redis = %self.inner.url.masked(), "the sentinels name another master");
            if let Err(e) = self.reconnect().await {
                self.health().record_err(&e);
            }
        }
    }
}

/// How often [`Broker::run_probe`] asks a failing Redis whether it is back (and, behind
/// Sentinels, asks them where the master is).
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Whether the first item of a `ROLE` reply says `master`.
fn is_master(first: Option<&redis::Value>) -> bool {
    match first {
        Some(redis::Value::BulkString(b)) => b.as_slice() == b"master",
        Some(redis::Value::SimpleString(s)) => s == "master",
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_are_capped_and_jittered() {
        let d = DEFAULT_RETRY_DELAY;
        assert_eq!(d.delay(0, 0.0), Duration::from_secs(5));
        assert_eq!(d.delay(1, 0.0), Duration::from_secs(10));
        assert_eq!(d.delay(30, 0.0), Duration::from_secs(300));
        assert_eq!(d.delay(0, -1.0), Duration::from_secs(4));
    }
}
