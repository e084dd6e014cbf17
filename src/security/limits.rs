//! Token buckets: per-session message rate, and gateway-wide handshake admission (protects
//! against reconnect storms).

use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate_per_s: f64, burst: f64) -> Self {
        TokenBucket {
            rate: rate_per_s.max(0.0),
            burst: burst.max(1.0),
            tokens: burst.max(1.0),
            last: Instant::now(),
        }
    }

    /// Takes one token at `now`; false when the bucket is empty.
    pub fn take_at(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn take(&mut self) -> bool {
        self.take_at(Instant::now())
    }
}

/// A bucket shared by every HTTP worker.
#[derive(Debug)]
pub struct SharedBucket(Mutex<TokenBucket>);

impl SharedBucket {
    pub fn new(rate_per_s: f64, burst: f64) -> Self {
        SharedBucket(Mutex::new(TokenBucket::new(rate_per_s, burst)))
    }
    pub fn take(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let mut b = TokenBucket::new(10.0, 5.0);
        let t0 = Instant::now();
        assert!((0..5).all(|_| b.take_at(t0)));
        assert!(!b.take_at(t0), "burst exhausted");
        assert!(
            b.take_at(t0 + Duration::from_millis(100)),
            "one token per 100 ms"
        );
        assert!(!b.take_at(t0 + Duration::from_millis(110)));
        assert!(
            (0..5).all(|_| b.take_at(t0 + Duration::from_secs(10))),
            "refills to burst only"
        );
        assert!(!b.take_at(t0 + Duration::from_secs(10)));
    }
}
