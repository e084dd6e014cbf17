//! Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And Jitter"):
//! the n-th retry waits a uniformly random time in `[0, min(cap, base * 2^n)]`. The attempt
//! counter resets once a link has proved itself (welcomed, and traffic answered: [`reset`]), or
//! has stayed up for `stable_after`. A server that says it is going away (close 1001: a restart
//! or a drain) is expected back at once: [`after_going_away`] waits a short jitter instead of the
//! grown backoff, and counts afresh from there.
//!
//! [`reset`]: Backoff::reset
//! [`after_going_away`]: Backoff::after_going_away

use std::time::{Duration, Instant};

use rand::Rng;

/// After a 1001 the next attempt waits a uniformly random time up to this.
pub const GOING_AWAY_JITTER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    stable_after: Duration,
    attempt: u32,
    up_since: Option<Instant>,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, stable_after: Duration) -> Self {
        Backoff {
            base,
            cap,
            stable_after,
            attempt: 0,
            up_since: None,
        }
    }

    /// The upper bound of the next delay: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(31));
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before the next attempt; advances the attempt counter.
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(if ms == 0 { 0 } else { rng.random_range(0..=ms) })
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The link proved itself (see the connection actor): the next failure starts from `base`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The delay after the server's "going away" (1001): a short jitter, and the counter
    /// starts again from `base` should the server not be back yet.
    pub fn after_going_away<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        self.attempt = 0;
        let ms = GOING_AWAY_JITTER.as_millis() as u64;
        Duration::from_millis(rng.random_range(0..=ms))
    }

    /// The link came up at `now`.
    pub fn connected(&mut self, now: Instant) {
        self.up_since = Some(now);
    }

    /// The link went down at `now`: a link that had been stable resets the counter.
    pub fn disconnected(&mut self, now: Instant) {
        if let Some(since) = self.up_since.take() {
            if now.saturating_duration_since(since) >= self.stable_after {
                self.attempt = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn b() -> Backoff {
        Backoff::new(
            Duration::from_millis(500),
            Duration::from_secs(60),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn jitter_stays_within_the_exponential_ceiling() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut bo = b();
        for n in 0..20u32 {
            let ceiling = bo.ceiling();
            let expected = Duration::from_millis(500)
                .saturating_mul(2u32.saturating_pow(n))
                .min(Duration::from_secs(60));
            assert_eq!(ceiling, expected, "attempt {n}");
            let d = bo.next_delay(&mut rng);
            assert!(d <= ceiling, "attempt {n}: {d:?} > {ceiling:?}");
        }
    }

    #[test]
    fn delays_are_spread_not_constant() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut bo = b();
            for _ in 0..8 {
                bo.next_delay(&mut rng);
            }
            seen.insert(bo.next_delay(&mut rng).as_millis());
        }
        assert!(
            seen.len() > 40,
            "full jitter should spread delays: {}",
            seen.len()
        );
        assert!(seen.iter().all(|&ms| ms <= 60_000));
    }

    #[test]
    fn ceiling_is_capped() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut bo = b();
        for _ in 0..100 {
            bo.next_delay(&mut rng);
        }
        assert_eq!(bo.ceiling(), Duration::from_secs(60));
    }

    #[test]
    fn a_proven_link_or_a_going_away_starts_the_count_again() {
        let mut rng = StdRng::seed_from_u64(9);
        let mut bo = b();
        for _ in 0..7 {
            bo.next_delay(&mut rng);
        }
        assert_eq!(bo.ceiling(), Duration::from_secs(60));
        bo.reset();
        assert_eq!(bo.ceiling(), Duration::from_millis(500));
        for _ in 0..7 {
            bo.next_delay(&mut rng);
        }
        for _ in 0..100 {
            assert!(bo.after_going_away(&mut rng) <= GOING_AWAY_JITTER);
        }
        assert_eq!(bo.ceiling(), Duration::from_millis(500));
    }

    #[test]
    fn stable_link_resets_attempts_and_short_one_does_not() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut bo = b();
        for _ in 0..5 {
            bo.next_delay(&mut rng);
        }
        let t0 = Instant::now();
        bo.connected(t0);
        bo.disconnected(t0 + Duration::from_secs(5));
        assert_eq!(bo.attempt(), 5, "a 5 s link is not stable");
        bo.connected(t0);
        bo.disconnected(t0 + Duration::from_secs(61));
        assert_eq!(bo.attempt(), 0);
        assert_eq!(bo.ceiling(), Duration::from_millis(500));
    }
}
