//! A lock-free latency histogram (microseconds, ~1.6% resolution above 1 ms) that many
//! tasks record into at once, and small helpers for medians.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Values below this are counted exactly, one bucket per microsecond.
const LINEAR: u64 = 1024;
const LINEAR_BITS: u32 = 10;
/// Sub-buckets per power of two above `LINEAR`.
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = LINEAR as usize + (64 - LINEAR_BITS as usize) * SUB as usize;

pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

fn index(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros();
    let sub = (us >> (exp - SUB_BITS)) & (SUB - 1);
    (LINEAR + u64::from(exp - LINEAR_BITS) * SUB + sub) as usize
}

/// The upper bound of a bucket, so percentiles never understate.
fn upper(index: usize) -> u64 {
    let i = index as u64;
    if i < LINEAR {
        return i;
    }
    let exp = (i - LINEAR) / SUB + u64::from(LINEAR_BITS);
    let sub = (i - LINEAR) % SUB;
    let width = 1u64 << (exp - u64::from(SUB_BITS));
    (1u64 << exp) + (sub + 1) * width - 1
}

impl Histogram {
    pub fn record(&self, value: Duration) {
        self.record_us(value.as_micros().min(u128::from(u64::MAX)) as u64);
    }

    pub fn record_us(&self, us: u64) {
        self.buckets[index(us)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Adds another histogram's counts to this one.
    pub fn merge(&self, other: &Histogram) {
        for (mine, theirs) in self.buckets.iter().zip(other.buckets.iter()) {
            let n = theirs.load(Ordering::Relaxed);
            if n > 0 {
                mine.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(other.count(), Ordering::Relaxed);
        self.max
            .fetch_max(other.max.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The `q` quantile (0..=1) in microseconds; NaN when empty.
    pub fn quantile_us(&self, q: f64) -> f64 {
        let count = self.count();
        if count == 0 {
            return f64::NAN;
        }
        if q >= 1.0 {
            return self.max.load(Ordering::Relaxed) as f64;
        }
        let rank = ((count as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            seen += bucket.load(Ordering::Relaxed);
            if seen >= rank {
                return upper(i).min(self.max.load(Ordering::Relaxed)) as f64;
            }
        }
        self.max.load(Ordering::Relaxed) as f64
    }

    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.quantile_us(q) / 1e3
    }
}

/// The median of some numbers (NaN ignored; NaN when none are left).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}
