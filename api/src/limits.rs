//! Limits that keep one caller from starving the rest: a token bucket per
//! authenticated key (in memory, per control-plane process), a cap on
//! concurrent execs per sandbox, the request body limit and the request
//! timeout (the last two are applied by the router and [`crate::audit`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use crate::error::ApiError;

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Sustained requests per second per key.
    pub rate_per_second: u32,
    /// Requests a key may make at once before the rate applies.
    pub burst: u32,
    pub max_body_bytes: usize,
    /// Deadline of every route but exec (which has its own timeout).
    pub request_timeout: Duration,
    pub max_execs_per_sandbox: usize,
}

/// A token bucket: `tokens` refill at `rate` per second up to `burst`.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self, rate: u32, burst: u32, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(rate.max(1));
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst.max(1)));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

#[derive(Debug)]
pub struct Limits {
    pub config: LimitsConfig,
    buckets: Mutex<HashMap<String, Bucket>>,
    execs: Mutex<HashMap<(String, String), usize>>,
}

impl Limits {
    pub fn new(config: LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            buckets: Mutex::default(),
            execs: Mutex::default(),
        })
    }

    /// One request by `caller` (a key id, or the platform admin). The map
    /// only ever holds authenticated callers, so it cannot be grown by
    /// strangers.
    pub fn check_rate(&self, caller: &str) -> Result<(), ApiError> {
        let now = Instant::now();
        let (rate, burst) = (self.config.rate_per_second, self.config.burst);
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bucket = buckets
            .entry(caller.to_string())
            .or_insert_with(|| Bucket::full(burst, now));
        bucket.take(rate, burst, now).map_err(|wait| {
            let mut err = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("this key may make {rate} requests per second (burst {burst}); slow down"),
            );
            err.retry_after_secs = Some(wait.as_secs().max(1));
            err
        })
    }

    /// A slot for one exec in `sandbox_id` of `org_id`, held until the
    /// returned guard drops. Keyed by org too, so another org's attempts on
    /// an id can never use up the owner's slots.
    pub fn exec_slot(
        self: &Arc<Self>,
        org_id: &str,
        sandbox_id: &str,
    ) -> Result<ExecSlot, ApiError> {
        let key = (org_id.to_string(), sandbox_id.to_string());
        let mut execs = self
            .execs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let running = execs.entry(key.clone()).or_insert(0);
        if *running >= self.config.max_execs_per_sandbox {
            let mut err = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_execs",
                format!(
                    "this sandbox already runs {} execs, the most it may at once",
                    self.config.max_execs_per_sandbox
                ),
            );
            err.retry_after_secs = Some(1);
            return Err(err);
        }
        *running += 1;
        Ok(ExecSlot {
            limits: Arc::clone(self),
            key,
        })
    }
}

/// One running exec; frees its slot when dropped (also when the request is
/// cancelled).
#[derive(Debug)]
pub struct ExecSlot {
    limits: Arc<Limits>,
    key: (String, String),
}

impl Drop for ExecSlot {
    fn drop(&mut self) {
        let mut execs = self
            .limits
            .execs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(running) = execs.get_mut(&self.key) {
            *running = running.saturating_sub(1);
            if *running == 0 {
                execs.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::full(3, start);
        for _ in 0..3 {
            assert!(bucket.take(2, 3, start).is_ok());
        }
        let wait = bucket.take(2, 3, start).expect_err("empty");
        assert!(wait <= Duration::from_millis(500), "{wait:?}");
        assert!(bucket
            .take(2, 3, start + Duration::from_millis(500))
            .is_ok());
        assert!(bucket
            .take(2, 3, start + Duration::from_millis(500))
            .is_err());
        // Refill never exceeds the burst.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(bucket.take(2, 3, later).is_ok());
        }
        assert!(bucket.take(2, 3, later).is_err());
    }

    #[test]
    fn exec_slots_are_capped_and_freed() {
        let limits = Limits::new(LimitsConfig {
            rate_per_second: 1,
            burst: 1,
            max_body_bytes: 1,
            request_timeout: Duration::from_secs(1),
            max_execs_per_sandbox: 2,
        });
        let a = limits.exec_slot("org", "sbx").expect("first");
        let _b = limits.exec_slot("org", "sbx").expect("second");
        assert!(limits.exec_slot("org", "sbx").is_err());
        assert!(limits.exec_slot("other", "sbx").is_ok(), "per org");
        drop(a);
        assert!(limits.exec_slot("org", "sbx").is_ok());
    }
}
