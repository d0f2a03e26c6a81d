//! What the status page reads besides the page itself: the live status stream, `GET /events`
//! (Server-Sent Events), and the fleet, `GET /fleet`, read from Redis at most once every
//! [`FLEET_FRESH`] however many pages show it.
//!
//! One publisher task builds the status document once a second, records the GPUs' readings in
//! the history, and publishes the document's JSON when it changed (the uptime alone does not
//! count); every stream only forwards that text, so a hundred open pages cost what one does and
//! none of them polls. A stream sends `event: status` with the current document at once, then
//! `event: history` with the GPU readings of the last minutes (so that charts have a past),
//! then `event: status` on each change, and a comment every [`KEEP_ALIVE`] so that proxies and
//! the server's own idle timeout see it alive. At most [`MAX_STREAMS`] are open at once.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::fleet::FleetMessage;
use super::status::FleetDocument;
use super::{HealthState, StatusDocument};
use crate::broker::BrokerError;

/// The most event streams open at once.
pub const MAX_STREAMS: usize = 32;

/// How often the status document is rebuilt (and the GPUs sampled).
const PERIOD: Duration = Duration::from_secs(1);

/// How often an idle stream sends a comment.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How long a fleet read from Redis is served again instead of reading anew.
const FLEET_FRESH: Duration = Duration::from_secs(2);

/// How long `/fleet` waits for Redis before it answers that Redis does not answer.
const FLEET_TIMEOUT: Duration = Duration::from_secs(3);

/// The latest status document as JSON text; `None` until the publisher's first round.
type Snapshot = Option<Arc<str>>;

/// What a fleet read gave.
type FleetRead = Result<Arc<FleetDocument>, Arc<FleetError>>;

/// The last fleet read and when it was made.
type FleetCache = Option<(Instant, FleetRead)>;

/// Why the fleet could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The broker has not connected (yet).
    #[error("the fleet is read from Redis, which is not connected: {why}")]
    NotConnected {
        /// The broker's last error, or that it has not tried yet.
        why: String,
    },
    /// Redis answered with an error.
    #[error("failed to read the fleet from Redis")]
    Read(#[source] BrokerError),
    /// Redis did not answer in time.
    #[error("Redis did not answer within {}s", FLEET_TIMEOUT.as_secs())]
    Timeout,
}

/// Why a stream was not opened.
#[derive(Debug, thiserror::Error)]
#[error("too many live status streams are open ({MAX_STREAMS}); close one or try again later")]
pub struct TooManyStreams;

/// What the `/events` route hands each stream: the publisher's latest document, the permits
/// that bound the streams, and the server's stop (which ends every stream).
#[derive(Debug, Clone)]
pub struct Hub {
    snapshot: watch::Receiver<Snapshot>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
    /// Held while reading, so that pages asking at once share one read.
    fleet: Arc<tokio::sync::Mutex<FleetCache>>,
}

impl Hub {
    /// The hub, and its publisher to run until `stop` is cancelled.
    pub fn new(state: Arc<HealthState>, stop: CancellationToken) -> (Hub, impl Future<Output = ()> + Send + 'static) {
        let (tx, snapshot) = watch::channel(None);
        let hub = Hub {
            snapshot,
            permits: Arc::new(Semaphore::new(MAX_STREAMS)),
            stop: stop.clone(),
            fleet: Arc::default(),
        };
        (hub, publish(state, tx, stop))
    }

    /// Opens a stream for one client, or refuses when [`MAX_STREAMS`] are open.
    pub fn open(&self, state: Arc<HealthState>) -> Result<Response, TooManyStreams> {
        let permit = Arc::clone(&self.permits)
            .try_acquire_owned()
            .map_err(|_| TooManyStreams)?;
        let feed = Feed {
            snapshot: self.snapshot.clone(),
            state,
            stop: self.stop.clone(),
            step: Step::First,
            _permit: permit,
        };
        let sse = Sse::new(feed.into_stream()).keep_alive(KeepAlive::new().interval(KEEP_ALIVE));
        // Proxies such as nginx buffer responses unless told not to, which would hold events back.
        Ok(([("x-accel-buffering", "no")], sse).into_response())
    }
}

impl Hub {
    /// Every machine's stored fleet status, by machine id: the last read when it is fresh,
    /// else a new one. A failed read is kept as fresh as a good one, so that while Redis hangs
    /// the pages waiting for the read all get its answer instead of each waiting out its own.
    pub async fn fleet(&self, state: &HealthState) -> FleetRead {
        let mut cache = self.fleet.lock().await;
        if let Some((at, read)) = cache.as_ref() {
            if at.elapsed() < FLEET_FRESH {
                return read.clone();
            }
        }
        let read = read_fleet(state).await.map(Arc::new).map_err(Arc::new);
        *cache = Some((Instant::now(), read.clone()));
        read
    }
}

/// Reads every machine's stored fleet status from Redis, by machine id.
async fn read_fleet(state: &HealthState) -> Result<FleetDocument, FleetError> {
    let broker = state.broker().ok_or_else(|| FleetError::NotConnected {
        why: state
            .redis()
            .last_error
            .unwrap_or_else(|| "not connected yet".to_owned()),
    })?;
    let stored = tokio::time::timeout(FLEET_TIMEOUT, broker.machine_statuses())
        .await
        .map_err(|_| FleetError::Timeout)?
        .map_err(FleetError::Read)?;
    // A message this version cannot read (another version's) is left out rather than failing
    // the whole list.
    let mut machines: Vec<FleetMessage> = stored.iter().filter_map(|m| serde_json::from_str(m).ok()).collect();
    machines.sort_by(|a, b| a.machine_id.cmp(&b.machine_id));
    Ok(FleetDocument { machines })
}

/// Rebuilds the document every [`PERIOD`] until `stop`, sampling the GPUs and publishing the
/// document when it changed.
async fn publish(state: Arc<HealthState>, tx: watch::Sender<Snapshot>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<StatusDocument> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let doc = state.status_document();
        state.record_gpus(&doc);
        if last.as_ref().is_some_and(|l| same_but_uptime(l, &doc)) {
            continue;
        }
        match serde_json::to_string(&doc) {
            Ok(text) => {
                tx.send_replace(Some(text.into()));
                last = Some(doc);
            }
            Err(e) => tracing::warn!("failed to encode the status document for /events: {e}"),
        }
    }
}

/// Whether two documents differ in nothing but the machine's uptime (which the page counts on
/// by itself between events).
fn same_but_uptime(a: &StatusDocument, b: &StatusDocument) -> bool {
    let mut b = b.clone();
    b.machine.uptime_ms = a.machine.uptime_ms;
    *a == b
}

/// Where a stream is in its sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The current document comes next.
    First,
    /// The GPU history comes next.
    History,
    /// Each change comes next.
    Changes,
}

/// One client's stream; holds its permit while it lives.
#[derive(Debug)]
struct Feed {
    snapshot: watch::Receiver<Snapshot>,
    state: Arc<HealthState>,
    stop: CancellationToken,
    step: Step,
    _permit: OwnedSemaphorePermit,
}

impl Feed {
    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
        futures_util::stream::unfold(self, |mut feed| async move {
            let event = match feed.step {
                Step::First => {
                    feed.step = Step::History;
                    // The publisher's first round may not have finished yet.
                    let text = loop {
                        if let Some(text) = feed.snapshot.borrow_and_update().clone() {
                            break text;
                        }
                        feed.next_change().await?;
                    };
                    status_event(&text)
                }
                Step::History => {
                    feed.step = Step::Changes;
                    match serde_json::to_string(&feed.state.gpu_history()) {
                        Ok(json) => Event::default().event("history").data(json),
                        Err(e) => Event::default().comment(format!("no history: {e}")),
                    }
                }
                Step::Changes => {
                    feed.next_change().await?;
                    let text = feed.snapshot.borrow_and_update().clone()?;
                    status_event(&text)
                }
            };
            Some((Ok(event), feed))
        })
    }

    /// Waits for the next document; `None` when the server stops.
    async fn next_change(&mut self) -> Option<()> {
        tokio::select! {
            () = self.stop.cancelled() => None,
            changed = self.snapshot.changed() => changed.ok(),
        }
    }
}

fn status_event(json: &str) -> Event {
    Event::default().event("status").data(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_uptime_changing_is_no_change() {
        let a = super::super::status::sample();
        let mut b = a.clone();
        b.machine.uptime_ms += 1000;
        assert!(same_but_uptime(&a, &b));
        b.workers[0]
            .current_job
            .as_mut()
            .expect("the sample runs a job")
            .progress += 1.0;
        assert!(!same_but_uptime(&a, &b));
    }
}
