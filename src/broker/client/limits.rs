//! The external-API limits section of the library (`acquireLimit`, `recordLimitUsage`,
//! `clearLimitReason`) as typed calls, used by `connectors::limits` and the workers; `deferJob`
//! is a lifecycle write. Outside the broker nothing names these functions or orders their
//! arguments.

use std::time::Duration;

use redis::{FromRedisValue, cmd};

use super::Broker;
use crate::broker::{BrokerError, redis_err};

/// One budget as `acquireLimit` takes it: a spacing between requests with a burst tolerance
/// (GCRA, 0 for none) and daily caps (0 for none).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LimitBudget {
    /// Milliseconds between two requests at the steady rate.
    pub interval_ms: f64,
    /// How far ahead of the steady rate a burst may run, in milliseconds.
    pub tolerance_ms: f64,
    /// Requests a quota day admits.
    pub daily_requests: u64,
    /// Tokens a quota day admits.
    pub daily_tokens: u64,
}

/// The quota day a call counts in: its name and its end (epoch milliseconds).
#[derive(Debug, Clone, Copy)]
pub struct QuotaDay<'a> {
    /// The local date on which it started.
    pub name: &'a str,
    /// The next reset.
    pub end_ms: i64,
}

/// What `acquireLimit` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitAnswer {
    /// The request may go now.
    Admitted,
    /// Over the rate: ask again after this long.
    Wait(Duration),
    /// A daily quota is used up.
    Quota {
        /// Until the quota day ends.
        resets_in: Duration,
        /// Whether it is the customer's quota (else the API's).
        customer_scope: bool,
        /// The library's words.
        reason: String,
    },
}

impl Broker {
    /// Asks the fleet-wide limits to admit one request to `api` for `customer` (empty: none).
    pub async fn acquire_limit(
        &self,
        api: &str,
        customer: &str,
        day: QuotaDay<'_>,
        api_budget: LimitBudget,
        customer_budget: LimitBudget,
    ) -> Result<LimitAnswer, BrokerError> {
        let end = day.end_ms.to_string();
        let budgets: Vec<String> = [api_budget, customer_budget]
            .iter()
            .flat_map(|b| {
                [
                    format!("{:.3}", b.interval_ms),
                    format!("{:.3}", b.tolerance_ms),
                    b.daily_requests.to_string(),
                    b.daily_tokens.to_string(),
                ]
            })
            .collect();
        let mut args: Vec<&str> = vec![api, customer, day.name, &end];
        args.extend(budgets.iter().map(String::as_str));
        let (word, millis, scope, reason): (String, i64, String, String) =
            self.call_limits("acquireLimit", &args).await?;
        let after = Duration::from_millis(u64::try_from(millis).unwrap_or(0));
        Ok(match word.as_str() {
            "ok" => LimitAnswer::Admitted,
            // A wait of 0 would ask again at once.
            "wait" => LimitAnswer::Wait(after.max(Duration::from_millis(1))),
            "quota" => LimitAnswer::Quota {
                resets_in: after,
                customer_scope: scope == "customer",
                reason,
            },
            other => {
                return Err(BrokerError::Protocol {
                    op: "acquireLimit",
                    detail: format!("answered `{other}`, which this version does not know"),
                });
            }
        })
    }

    /// Adds `tokens` a finished request used to today's usage of `api` (for `daily_tokens`).
    pub async fn record_limit_usage(
        &self,
        api: &str,
        customer: &str,
        day: QuotaDay<'_>,
        tokens: u64,
    ) -> Result<(), BrokerError> {
        let (end, tokens) = (day.end_ms.to_string(), tokens.to_string());
        let _: i64 = self
            .call_limits("recordLimitUsage", &[api, customer, day.name, &end, &tokens])
            .await?;
        Ok(())
    }

    /// Clears the `limit_reason` a job kept from waiting for a quota, once it runs.
    pub async fn clear_limit_reason(&self, job_id: &str) -> Result<(), BrokerError> {
        let _: i64 = self.call_limits("clearLimitReason", &[job_id]).await?;
        Ok(())
    }

    /// Today's fleet-wide `(requests, tokens)` of `api` in quota period `period`, as
    /// `acquireLimit` and `recordLimitUsage` count them; `None` for a count not written yet.
    pub(crate) async fn limit_usage(&self, api: &str, period: &str) -> Result<(Option<u64>, Option<u64>), BrokerError> {
        let mut conn = self.connection();
        cmd("HMGET")
            .arg(self.key(&format!("limits:{api}:usage:{period}")))
            .arg("requests")
            .arg("tokens")
            .query_async(&mut conn)
            .await
            .map_err(redis_err("limits usage"))
    }

    /// Calls a limits function with the key prefix as its first argument.
    pub(super) async fn call_limits<T: FromRedisValue>(
        &self,
        function: &'static str,
        args: &[&str],
    ) -> Result<T, BrokerError> {
        let mut all = vec![self.inner.opts.key_prefix.as_str()];
        all.extend_from_slice(args);
        self.call(function, &all).await
    }
}
