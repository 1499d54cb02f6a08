//! What each caller of a shared gateway may do and has done: a token bucket of requests
//! per key (429 with `Retry-After` when it is empty) and the tokens and cost of its
//! answers, the cost being what the gateway's client countersigned for them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde::Serialize;

use super::request::ApiError;

/// Requests a key may make: `per_minute` on average, up to `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_minute: f64,
    pub burst: u32,
}

impl RateLimit {
    /// Seconds until the bucket holds one more request.
    fn refill_secs(&self) -> f64 {
        60.0 / self.per_minute
    }
}

/// One key's answers so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Micro-units countersigned for this key's answers (receipts, witness checks and
    /// fail-overs included): what the mesh was paid on its behalf.
    pub cost: u64,
}

/// One answer's share of [`Usage`].
#[derive(Clone, Copy, Debug)]
pub struct Answer {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cost: u64,
}

#[derive(Debug)]
struct Account {
    /// Requests the bucket holds now (fractions refill over time).
    tokens: f64,
    refilled: Instant,
    usage: Usage,
}

/// Every caller's bucket and usage. The callers are the key file's names (or the one
/// anonymous caller), so the map never grows past them.
#[derive(Debug)]
pub struct Accounts {
    limit: Option<RateLimit>,
    accounts: Mutex<HashMap<String, Account>>,
}

impl Accounts {
    pub fn new<'a>(callers: impl IntoIterator<Item = &'a str>, limit: Option<RateLimit>) -> Self {
        let now = Instant::now();
        let burst = limit.map_or(0.0, |l| f64::from(l.burst));
        let accounts = callers
            .into_iter()
            .map(|name| {
                let account = Account {
                    tokens: burst,
                    refilled: now,
                    usage: Usage::default(),
                };
                (name.to_string(), account)
            })
            .collect();
        Self {
            limit,
            accounts: Mutex::new(accounts),
        }
    }

    /// Take one request from `caller`'s bucket, or refuse with OpenAI's 429 and the
    /// seconds to wait (`Retry-After`, whole seconds rounded up).
    pub fn admit(&self, caller: &str, now: Instant) -> Result<(), (ApiError, u64)> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let Some(account) = accounts.get_mut(caller) else {
            return Ok(());
        };
        let elapsed = now
            .saturating_duration_since(account.refilled)
            .as_secs_f64();
        account.tokens =
            (account.tokens + elapsed / limit.refill_secs()).min(f64::from(limit.burst));
        account.refilled = now;
        if account.tokens >= 1.0 {
            account.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - account.tokens) * limit.refill_secs());
        let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let error = ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "Rate limit reached for {caller}: {} requests per minute (bursts of {}). \
                 Please try again in {retry_after}s.",
                limit.per_minute, limit.burst
            ),
            param: None,
            code: Some("rate_limit_exceeded"),
        };
        Err((error, retry_after))
    }

    /// Add one answer to `caller`'s usage.
    pub fn record(&self, caller: &str, answer: Answer) {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(account) = accounts.get_mut(caller) {
            let u = &mut account.usage;
            u.requests += 1;
            u.prompt_tokens += answer.prompt_tokens as u64;
            u.completion_tokens += answer.completion_tokens as u64;
            u.cost += answer.cost;
        }
    }

    /// `caller`'s usage so far.
    pub fn usage(&self, caller: &str) -> Usage {
        let accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        accounts.get(caller).map(|a| a.usage).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_past_the_bucket_waits_for_its_refill() {
        let limit = RateLimit {
            per_minute: 6.0,
            burst: 2,
        };
        let accounts = Accounts::new(["a", "b"], Some(limit));
        let t0 = Instant::now();
        assert!(accounts.admit("a", t0).is_ok());
        assert!(accounts.admit("a", t0).is_ok());
        let (e, retry) = accounts.admit("a", t0).unwrap_err();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(retry, 10, "one request every 10 s");
        // Another key has its own bucket.
        assert!(accounts.admit("b", t0).is_ok());
        // 4 s later, 6 s are left to wait; 10 s later one request is back.
        let (_, retry) = accounts
            .admit("a", t0 + Duration::from_secs(4))
            .unwrap_err();
        assert_eq!(retry, 6);
        assert!(accounts.admit("a", t0 + Duration::from_secs(10)).is_ok());
        assert!(accounts.admit("a", t0 + Duration::from_secs(10)).is_err());
    }

    #[test]
    fn usage_adds_up_per_caller() {
        let accounts = Accounts::new(["a"], None);
        for cost in [5, 7] {
            accounts.record(
                "a",
                Answer {
                    prompt_tokens: 3,
                    completion_tokens: 2,
                    cost,
                },
            );
        }
        let u = accounts.usage("a");
        assert_eq!(
            (u.requests, u.prompt_tokens, u.completion_tokens, u.cost),
            (2, 6, 4, 12)
        );
        assert_eq!(accounts.usage("nobody"), Usage::default());
    }
}
