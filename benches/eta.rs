//! How good is the time-left estimate? Drives `taskcast::eta::Estimator` with simulated image
//! generations and prints the estimate's absolute error as a share of the true time left, at
//! 10 %, 25 %, 50 % and 75 % of the way, next to the naive estimate
//! `elapsed × (100 − p) / p` from the same runs.
//!
//! A simulated generation (all durations scaled by a per-task speed factor, uniform in
//! 0.7–1.3, i.e. ±30 %):
//! - loading the model: 1.5 s, then progress 5 %;
//! - sampling: `total_steps` steps (20, 30 or 50, chosen at random) of 250 ms each with ±15 %
//!   noise per step, the first step 4× slower (warm-up), progress 5 → 90 %;
//! - decoding and upscaling: 3 s in two halves, progress 90 → 95 → 100 %.
//!
//! The first `BENCH_ETA_WARMUP` tasks (default 100) teach the estimator and are not scored;
//! the next `BENCH_ETA_TASKS` (default 3000) are. `BENCH_ETA_SEED` changes the random stream.
//!
//!     cargo bench --bench eta

use taskcast::eta::{Estimator, EtaOptions, Observation, Phase};

/// A small deterministic generator (xorshift64*), enough for simulation noise.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..hi`.
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One push of a simulated run: time since the task started running, and progress in %.
struct Push {
    at_ms: f64,
    percent: f64,
}

fn simulate(rng: &mut Rng, total_steps: u32) -> Vec<Push> {
    let speed = rng.uniform(0.7, 1.3);
    let mut pushes = vec![Push {
        at_ms: 0.0,
        percent: 0.0,
    }];
    let mut t = 1_500.0 * speed;
    pushes.push(Push {
        at_ms: t,
        percent: 5.0,
    });
    for step in 1..=total_steps {
        let warm_up = if step == 1 { 4.0 } else { 1.0 };
        t += 250.0 * speed * warm_up * rng.uniform(0.85, 1.15);
        pushes.push(Push {
            at_ms: t,
            percent: 5.0 + 85.0 * f64::from(step) / f64::from(total_steps),
        });
    }
    for percent in [95.0, 100.0] {
        t += 1_500.0 * speed * rng.uniform(0.9, 1.1);
        pushes.push(Push { at_ms: t, percent });
    }
    pushes
}

const CHECKPOINTS: [f64; 4] = [10.0, 25.0, 50.0, 75.0];

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let warmup = env("BENCH_ETA_WARMUP", 100);
    let scored = env("BENCH_ETA_TASKS", 3_000);
    let mut rng = Rng(env("BENCH_ETA_SEED", 0x5EED_1234_ABCD_0001) | 1);
    let mut estimator = Estimator::new(EtaOptions::default());
    // errors[checkpoint] = (model, naive)
    let mut errors: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); CHECKPOINTS.len()];
    let mut missing = 0u64;
    let mut clock = 0u64;
    for task in 0..warmup + scored {
        let total_steps = [20, 30, 50][(rng.next() % 3) as usize];
        let pushes = simulate(&mut rng, total_steps);
        let end = pushes.last().map_or(0.0, |p| p.at_ms);
        let mut next_checkpoint = 0;
        for push in &pushes[..pushes.len() - 1] {
            let at_ms = clock + push.at_ms as u64;
            let left = estimator.observe(
                task,
                Observation {
                    at_ms,
                    phase: Phase::Running,
                    fraction: Some(push.percent / 100.0),
                    total_steps: Some(total_steps),
                },
            );
            if task < warmup {
                continue;
            }
            while next_checkpoint < CHECKPOINTS.len()
                && push.percent >= CHECKPOINTS[next_checkpoint]
            {
                let truth = end - push.at_ms;
                let naive = push.at_ms * (100.0 - push.percent) / push.percent;
                let (model, naive_errors) = &mut errors[next_checkpoint];
                match left {
                    Some(left) => model.push((left as f64 - truth).abs() / truth),
                    None => missing += 1,
                }
                naive_errors.push((naive - truth).abs() / truth);
                next_checkpoint += 1;
            }
        }
        estimator.observe(
            task,
            Observation {
                at_ms: clock + end as u64,
                phase: Phase::Finished { succeeded: true },
                fraction: Some(1.0),
                total_steps: Some(total_steps),
            },
        );
        clock += end as u64 + 1_000;
    }
    println!(
        "eta: {scored} scored generations after {warmup} learned from; error = |estimate - true time left| / true time left"
    );
    println!(
        "{:>10} | {:>12} {:>12} | {:>12} {:>12}",
        "progress", "model median", "model p90", "naive median", "naive p90"
    );
    for (checkpoint, (model, naive)) in CHECKPOINTS.iter().zip(errors.iter_mut()) {
        model.sort_by(f64::total_cmp);
        naive.sort_by(f64::total_cmp);
        println!(
            "{:>9}% | {:>11.1}% {:>11.1}% | {:>11.1}% {:>11.1}%",
            checkpoint,
            100.0 * percentile(model, 0.5),
            100.0 * percentile(model, 0.9),
            100.0 * percentile(naive, 0.5),
            100.0 * percentile(naive, 0.9),
        );
    }
    println!(
        "estimates missing at a checkpoint: {missing}; profiles learned: {}",
        estimator.profiles()
    );
}
