//! The op rate limit of one connection: a token bucket (`--rate-per-sec`
//! sustained, `--rate-burst` above it).

use std::time::Instant;

/// Token bucket for client ops.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    pub(super) burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        RateLimit {
            rate: rate as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
        }
    }
    pub fn allow(&mut self, now: Instant) -> bool {
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rate_limit_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut rl = RateLimit::new(10, 5, t0);
        assert_eq!((0..10).filter(|_| rl.allow(t0)).count(), 5);
        assert!(
            rl.allow(t0 + Duration::from_millis(100)),
            "one token per 100ms"
        );
        assert!(!rl.allow(t0 + Duration::from_millis(100)));
    }
}
