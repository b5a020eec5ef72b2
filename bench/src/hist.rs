//! Latency histograms: a log-linear histogram of microseconds shared by all
//! clients of a run, and a meter that files each frame under the phase its
//! trade was stamped in.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Sub-buckets per power of two above 128 µs: about 1.6 % resolution.
const HIST_SUB: usize = 64;
/// Values are clamped below 2^40 µs (12 days), whose bucket index is < 35 * 64.
const HIST_BUCKETS: usize = 35 * HIST_SUB;

/// A log-linear histogram of microseconds, shared by all clients of a run
/// (relaxed atomics: counts are read only after the writers are done or as
/// a snapshot).
pub struct Hist {
    counts: Box<[AtomicU64]>,
    n: AtomicU64,
    max: AtomicU64,
}

fn bucket(v: u64) -> usize {
    let v = v.min((1 << 40) - 1);
    if v < 2 * HIST_SUB as u64 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - 6;
    (shift as usize + 1) * HIST_SUB + ((v >> shift) as usize - HIST_SUB)
}

/// The largest value that falls in bucket `i`.
fn bucket_high(i: usize) -> u64 {
    if i < 2 * HIST_SUB {
        return i as u64;
    }
    let shift = (i / HIST_SUB - 1) as u32;
    let sub = (i % HIST_SUB + HIST_SUB) as u64;
    ((sub + 1) << shift) - 1
}

impl Hist {
    pub fn new() -> Hist {
        Hist {
            counts: (0..HIST_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            n: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }

    pub fn record(&self, us: u64) {
        self.counts[bucket(us)].fetch_add(1, Ordering::Relaxed);
        self.n.fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }

    /// The q-quantile in µs, with `undelivered` more samples counted as
    /// infinitely late (infinity when the quantile falls among them, NaN when
    /// there is no sample at all).
    pub fn quantile(&self, q: f64, undelivered: u64) -> f64 {
        let n = self.count();
        let total = n + undelivered;
        if total == 0 {
            return f64::NAN;
        }
        let rank = ((q * total as f64).ceil() as u64).max(1);
        if rank > n {
            return f64::INFINITY;
        }
        let max = self.max.load(Ordering::Relaxed);
        let mut cum = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c.load(Ordering::Relaxed);
            if cum >= rank {
                return bucket_high(i).min(max) as f64;
            }
        }
        max as f64
    }

    /// (quantile, ms) points for a percentile plot: q from 0 to 1 - 1e-5,
    /// evenly spaced in -log10(1 - q) (50 %, 90 %, 99 %, ... equally apart).
    pub fn curve(&self) -> Vec<(f64, f64)> {
        if self.count() == 0 {
            return Vec::new();
        }
        (0..=100)
            .map(|i| {
                let x = i as f64 * 0.05; // -log10(1 - q), 0 ..= 5
                let q = 1.0 - 10f64.powf(-x);
                (q, self.quantile(q, 0) / 1000.0)
            })
            .collect()
    }

    pub fn max_us(&self) -> f64 {
        if self.count() == 0 {
            f64::NAN
        } else {
            self.max.load(Ordering::Relaxed) as f64
        }
    }
}

/// Latency histograms per phase, by the trade's `ts`: phase k holds the trades
/// stamped in `[t0 + k*period, t0 + (k+1)*period)`; earlier ones (warm-up) are
/// not recorded, later ones go to the last phase.
pub struct Meter {
    /// Unix µs; i64::MAX until the schedule is known (nothing is recorded).
    pub t0_us: AtomicI64,
    period_us: i64,
    pub phases: Vec<Hist>,
}

impl Meter {
    pub fn new(phases: usize, period: Duration) -> Meter {
        Meter {
            t0_us: AtomicI64::new(i64::MAX),
            period_us: period.as_micros() as i64,
            phases: (0..phases.max(1)).map(|_| Hist::new()).collect(),
        }
    }

    /// Make phase `k` start at `start_us` (unix µs) from now on, for a
    /// schedule whose phases are not evenly spaced (S2's ladder waits for
    /// the server to recover after a failing step). Only ever moves t0
    /// later, so a late frame of an earlier phase is filed under an earlier
    /// phase, never under `k`.
    pub fn anchor(&self, k: usize, start_us: i64) {
        let t0 = start_us - k as i64 * self.period_us;
        let cur = self.t0_us.load(Ordering::Relaxed);
        if cur == i64::MAX || t0 > cur {
            self.t0_us.store(t0, Ordering::Relaxed);
        }
    }

    pub fn phase(&self, ts_us: i64) -> Option<usize> {
        let t0 = self.t0_us.load(Ordering::Relaxed);
        if ts_us < t0 {
            return None;
        }
        let k = ((ts_us - t0) / self.period_us.max(1)) as usize;
        Some(k.min(self.phases.len() - 1))
    }

    pub fn record(&self, ts_us: i64, now_us: i64) {
        if let Some(p) = self.phase(ts_us) {
            self.phases[p].record((now_us - ts_us).max(0) as u64);
        }
    }
}

pub fn unix_us(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A monotonic instant and the wall clock at (nearly) the same moment.
pub fn clocks() -> (Instant, i64) {
    (Instant::now(), unix_us(SystemTime::now()))
}
