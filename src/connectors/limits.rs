//! Fleet-wide limits of the external APIs: a rate limit (GCRA) and daily quotas per API and,
//! optionally, per customer, shared by every machine through the `acquireLimit` function of the
//! `jobMatching` library (one atomic call per request).
//!
//! A [`Limiter`] is shared by every worker of one external connector on a machine. Before each
//! request that creates work at the API (a completion, a prediction, an endpoint run; not the
//! polls that follow one), the connector calls [`Limiter::acquire`]: over the rate it waits the
//! time Redis names (the job does not fail), and with a daily quota used up it returns
//! [`ConnectorError::QuotaReached`], which the worker turns into a deferral (the job goes back
//! to the queue with the reason, and the worker takes other work until the quota resets).
//!
//! The quota day starts at the configured local hour in the configured zone; the day is named by
//! its local date, computed here (Lua in Redis has no time zones), so machines whose clocks
//! agree to within a second agree on the day.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{ConnectorError, ProgressSink};
use crate::broker::{Broker, LimitAnswer, LimitBudget, QuotaDay};
use crate::config::{Budget, Limits};
use crate::logging::error_chain;

/// The longest single sleep while over the rate: the limiter is asked again afterwards, so a
/// limit lowered by an operator (or a clock step) is seen within this time.
const MAX_WAIT_STEP: Duration = Duration::from_secs(10);

/// Redis failures in a row after which a request is given up (the job fails retryably).
const REDIS_ATTEMPTS: u32 = 5;

/// The fleet-wide limits of one external API.
#[derive(Debug)]
pub struct Limiter {
    api: String,
    limits: Limits,
    zone: jiff::tz::TimeZone,
    broker: OnceLock<Broker>,
    admitted: AtomicU64,
    waits: AtomicU64,
    waited_ms: AtomicU64,
    quota_refusals: AtomicU64,
}

/// What a limiter has done on this machine since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LimiterStats {
    /// Requests admitted.
    pub admitted: u64,
    /// Times a request had to wait for the rate limit.
    pub waits: u64,
    /// Total time spent waiting for the rate limit, in milliseconds.
    pub waited_ms: u64,
    /// Requests refused because a daily quota was used up.
    pub quota_refusals: u64,
}

/// Today's fleet-wide usage of one API, as Redis counts it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DailyUsage {
    /// The quota day (its local date).
    pub period: String,
    /// Requests admitted today, fleet-wide.
    pub requests: u64,
    /// Tokens recorded today, fleet-wide.
    pub tokens: u64,
    /// The configured daily request quota, if any.
    pub daily_requests: Option<u64>,
    /// The configured daily token quota, if any.
    pub daily_tokens: Option<u64>,
}

impl Limiter {
    /// A limiter for `api` (the connector's name, which names its Redis keys). The zone was
    /// checked when the configuration was loaded; an unknown one falls back to UTC.
    pub fn new(api: impl Into<String>, limits: Limits) -> Limiter {
        let zone = jiff::tz::TimeZone::get(&limits.zone).unwrap_or(jiff::tz::TimeZone::UTC);
        Limiter {
            api: api.into(),
            limits,
            zone,
            broker: OnceLock::new(),
            admitted: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            waited_ms: AtomicU64::new(0),
            quota_refusals: AtomicU64::new(0),
        }
    }

    /// The API this limiter guards.
    pub fn api(&self) -> &str {
        &self.api
    }

    /// Connects the limiter to the fleet's Redis (the machine's broker, once it is connected);
    /// only the first broker given is kept.
    pub fn attach(&self, broker: Broker) {
        let _ = self.broker.set(broker);
    }

    /// What this limiter did so far.
    pub fn stats(&self) -> LimiterStats {
        LimiterStats {
            admitted: self.admitted.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
            waited_ms: self.waited_ms.load(Ordering::Relaxed),
            quota_refusals: self.quota_refusals.load(Ordering::Relaxed),
        }
    }

    fn broker(&self) -> Result<&Broker, ConnectorError> {
        self.broker.get().ok_or_else(|| ConnectorError::Unavailable {
            message: format!(
                "the fleet-wide limiter of the {} API is not connected to redis yet",
                self.api
            ),
            source: None,
        })
    }

    /// Waits until the fleet's limits admit one request for `customer` (empty: none), or
    /// returns [`ConnectorError::QuotaReached`] when a daily quota is used up. Returns
    /// `Cancelled` as soon as `cancel` fires. A wait is reported on `progress`, so the job says
    /// what it waits for.
    pub async fn acquire(
        &self,
        customer: &str,
        progress: Option<&ProgressSink>,
        cancel: &CancellationToken,
    ) -> Result<(), ConnectorError> {
        let mut failures = 0;
        loop {
            let answer = tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(ConnectorError::Cancelled),
                a = self.ask(customer) => a,
            };
            let delay = match answer {
                Ok(LimitAnswer::Admitted) => {
                    self.admitted.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Ok(LimitAnswer::Wait(d)) => {
                    failures = 0;
                    self.waits.fetch_add(1, Ordering::Relaxed);
                    let d = d.min(MAX_WAIT_STEP);
                    self.waited_ms
                        .fetch_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
                    tracing::debug!(api = %self.api, wait = ?d, "over the fleet-wide rate limit; waiting");
                    if let Some(p) = progress {
                        p.percent(
                            0.0,
                            format!("waiting for the fleet-wide rate limit of the {} API", self.api),
                        );
                    }
                    d
                }
                Ok(LimitAnswer::Quota {
                    resets_in,
                    customer_scope,
                    reason,
                }) => {
                    self.quota_refusals.fetch_add(1, Ordering::Relaxed);
                    return Err(ConnectorError::QuotaReached {
                        api: self.api.clone(),
                        customer: customer_scope.then(|| customer.to_owned()),
                        reason,
                        resets_in,
                    });
                }
                Err(e) => {
                    failures += 1;
                    if failures >= REDIS_ATTEMPTS {
                        return Err(e);
                    }
                    tracing::warn!(api = %self.api, error = %e.chain(), "failed to ask the fleet-wide limiter; retrying");
                    Duration::from_millis(100 << failures)
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return Err(ConnectorError::Cancelled),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn ask(&self, customer: &str) -> Result<LimitAnswer, ConnectorError> {
        let broker = self.broker()?;
        let (period, end_ms) = quota_period(jiff::Timestamp::now(), self.limits.reset_hour, &self.zone);
        let customer_budget = if customer.is_empty() {
            Budget::default()
        } else {
            self.limits.customer.clone().unwrap_or_default()
        };
        let day = QuotaDay { name: &period, end_ms };
        broker
            .acquire_limit(
                &self.api,
                customer,
                day,
                limit_budget(&self.limits.api()),
                limit_budget(&customer_budget),
            )
            .await
            .map_err(|e| ConnectorError::Unavailable {
                message: "failed to check the fleet-wide limits in redis".to_owned(),
                source: Some(Box::new(e)),
            })
    }

    /// Adds the tokens a finished request used to today's usage (for `daily_tokens`). Failures
    /// are logged: the job's result stands, and the usage is also in its result.
    pub async fn record_tokens(&self, customer: &str, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let Ok(broker) = self.broker() else { return };
        let (period, end_ms) = quota_period(jiff::Timestamp::now(), self.limits.reset_hour, &self.zone);
        let day = QuotaDay { name: &period, end_ms };
        if let Err(e) = broker.record_limit_usage(&self.api, customer, day, tokens).await {
            tracing::warn!(api = %self.api, error = %error_chain(&e), "failed to record token usage");
        }
    }

    /// Today's fleet-wide usage of this API.
    pub async fn usage(&self) -> Result<DailyUsage, crate::broker::BrokerError> {
        let broker = self.broker.get().ok_or_else(|| crate::broker::BrokerError::Protocol {
            op: "limits usage",
            detail: "the limiter is not connected to redis yet".to_owned(),
        })?;
        let (period, _) = quota_period(jiff::Timestamp::now(), self.limits.reset_hour, &self.zone);
        let (requests, tokens) = broker.limit_usage(&self.api, &period).await?;
        Ok(DailyUsage {
            period,
            requests: requests.unwrap_or(0),
            tokens: tokens.unwrap_or(0),
            daily_requests: self.limits.daily_requests,
            daily_tokens: self.limits.daily_tokens,
        })
    }
}

/// One budget as the limits library takes it: GCRA spacing and tolerance, daily caps (0 = none).
fn limit_budget(b: &Budget) -> LimitBudget {
    let (interval_ms, tolerance_ms) = match b.rate() {
        Some(r) => {
            let interval = 1000.0 / r.per_second;
            (interval, interval * f64::from(r.burst.saturating_sub(1)))
        }
        None => (0.0, 0.0),
    };
    LimitBudget {
        interval_ms,
        tolerance_ms,
        daily_requests: b.daily_requests.unwrap_or(0),
        daily_tokens: b.daily_tokens.unwrap_or(0),
    }
}

/// The quota day `now` falls in: its name (the local date on which it started) and its end
/// (the next reset, epoch milliseconds). A day starts at `reset_hour` local time; on a day
/// when that hour does not exist (a DST gap) it starts at the first instant after the gap.
pub(crate) fn quota_period(now: jiff::Timestamp, reset_hour: u8, zone: &jiff::tz::TimeZone) -> (String, i64) {
    let local = now.to_zoned_datetime(zone.clone());
    let reset_on = |date: jiff::civil::Date| {
        date.at(i8::try_from(reset_hour.min(23)).unwrap_or(0), 0, 0, 0)
            .to_zoned_datetime(zone.clone())
            .map(|z| z.timestamp())
    };
    let today = local.date();
    let start_date = match reset_on(today) {
        Ok(t) if t <= now => today,
        _ => today.yesterday().unwrap_or(today),
    };
    let next = start_date
        .tomorrow()
        .ok()
        .and_then(|d| reset_on(d).ok())
        .unwrap_or_else(|| now + jiff::SignedDuration::from_hours(24));
    (start_date.to_string(), next.as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().expect("a valid timestamp")
    }

    #[test]
    fn quota_days_start_at_the_reset_hour_in_the_zone() {
        let ny = jiff::tz::TimeZone::get("America/New_York").unwrap();
        // 03:30 UTC on 2 Dec is 22:30 on 1 Dec in New York: before a 23:00 reset.
        let (p, end) = quota_period(ts("2026-12-02T03:30:00Z"), 23, &ny);
        assert_eq!(p, "2026-11-30");
        assert_eq!(end, ts("2026-12-02T04:00:00Z").as_millisecond());
        let (p, end) = quota_period(ts("2026-12-02T04:00:00Z"), 23, &ny);
        assert_eq!(p, "2026-12-01");
        assert_eq!(end, ts("2026-12-03T04:00:00Z").as_millisecond());
        let (p, _) = quota_period(ts("2026-12-02T00:00:00Z"), 0, &jiff::tz::TimeZone::UTC);
        assert_eq!(p, "2026-12-02");
    }

    #[test]
    fn quota_days_across_a_dst_change_are_23_or_25_hours() {
        let ny = jiff::tz::TimeZone::get("America/New_York").unwrap();
        // The night of 8 March 2026 loses an hour in New York.
        let (p, end) = quota_period(ts("2026-03-08T12:00:00Z"), 0, &ny);
        assert_eq!(p, "2026-03-08");
        assert_eq!(end, ts("2026-03-09T04:00:00Z").as_millisecond());
        // 02:00 does not exist that night: the day starts after the gap.
        let (p, _) = quota_period(ts("2026-03-08T08:00:00Z"), 2, &ny);
        assert_eq!(p, "2026-03-08");
    }

    #[test]
    fn budgets_become_gcra_arguments() {
        let b = Budget {
            requests_per_minute: Some(300.0),
            burst: Some(3),
            daily_requests: Some(100),
            ..Budget::default()
        };
        let gcra = limit_budget(&b);
        assert!(
            (gcra.interval_ms - 200.0).abs() < 1e-9 && (gcra.tolerance_ms - 400.0).abs() < 1e-9,
            "{gcra:?}"
        );
        assert_eq!((gcra.daily_requests, gcra.daily_tokens), (100, 0));
        assert_eq!(limit_budget(&Budget::default()), LimitBudget::default());
    }
}
