//! The one retry schedule: exponential backoff with jitter, used wherever a
//! role waits to try again (the LISTEN reconnect, the broadcaster's first
//! read of the shard count, the reference client's reconnect). Jitter keeps
//! a fleet that lost the same Postgres from coming back in lockstep.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Waits start at `first` and double up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// After a success: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The wait before the next attempt: the current step plus up to half of
    /// it again at random. The step after is twice as long, up to `max`.
    pub fn next_wait(&mut self) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(self.max);
        step + step.mul_f64(fastrand::f64() * 0.5)
    }

    /// Sleep [`Backoff::next_wait`]; false if `shutdown` came first.
    pub async fn sleep(&mut self, shutdown: &CancellationToken) -> bool {
        let wait = self.next_wait();
        // Cancel safety: sleep and cancelled are both cancel-safe.
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = shutdown.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn waits_double_up_to_the_cap_with_at_most_half_again_of_jitter() {
        let mut b = Backoff::new(ms(100), ms(500));
        for step in [100, 200, 400, 500, 500] {
            let w = b.next_wait();
            assert!(
                w >= ms(step) && w <= ms(step) * 3 / 2,
                "{w:?} for step {step}"
            );
        }
        b.reset();
        assert!(b.next_wait() <= ms(150), "reset starts over");
    }
}
