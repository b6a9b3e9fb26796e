//! Time left for a running task, estimated from what this node has seen.
//!
//! Two things are combined:
//!
//! - **What finished tasks looked like** (learned, per `total_steps`, or one profile for tasks
//!   without steps): the typical run time `D`, and the typical *shape* of a run — the share of
//!   the run time that had passed when progress reached 0 %, 5 %, …, 100 % (`f(p)`, 21
//!   points). The shape is what makes a slow first step or a slow last stage harmless: a task
//!   at 50 % of its progress may be only 40 % of the way in time, and the shape says so.
//! - **How fast this task is going**: the time since it started running, `t`, compared with
//!   the time a typical task takes to cover the same part of its shape, which gives the task's
//!   speed factor `s_own = t / ((f(p) − f(p₀)) · D)` (p₀ is the progress it was first seen
//!   running at). This is a cumulative average, so one noisy step moves it little.
//!
//! The estimate is `remaining = s · D · (1 − f(p))`, where `s` blends the task's own speed with
//! the typical speed 1 by how much of the typical run it has covered:
//! `s = w · s_own + (1 − w) · 1`, `w = covered / (covered + K)`. Early on a task gets the typical
//! remaining time; by half-way its own speed dominates. With nothing learned yet (`D`
//! unknown) the shape is a straight line and the estimate is the task's own rate alone,
//! `t · (1 − p) / (p − p₀)`.
//!
//! Learning happens when a task this node saw start (first seen pending, or running at
//! under 5 %) succeeds: its duration and shape are averaged into its profile (a running mean
//! for the first samples, then an exponential average so the profile follows a changing
//! generator). Failed and cancelled runs are not learned from. Memory is bounded: at most
//! `max_tasks` running tasks are tracked (about 150 bytes each; the least recently changed
//! half is dropped when full) and at most `max_profiles` profiles (about 200 bytes each).
//!
//! Time is passed in as milliseconds from any fixed origin, so the estimator is a pure
//! function of what it is shown and the benchmark can drive it without sleeping.

use std::collections::HashMap;
use std::hash::Hash;

/// Points of a run's shape: progress 0 %, 5 %, …, 100 %.
const BINS: usize = 20;
/// How much covered shape makes the task's own speed weigh as much as the typical speed.
const OWN_WEIGHT_AT: f64 = 0.08;
/// After this many samples a profile becomes an exponential average with this weight.
const MEAN_SAMPLES: u32 = 20;
const EWMA_WEIGHT: f64 = 1.0 / MEAN_SAMPLES as f64;

/// Bounds on what the estimator keeps.
#[derive(Clone, Copy, Debug)]
pub struct EtaOptions {
    /// Running tasks tracked at once.
    pub max_tasks: usize,
    /// Learned profiles (one per distinct `total_steps`, plus one for tasks without steps).
    pub max_profiles: usize,
}

impl Default for EtaOptions {
    fn default() -> Self {
        EtaOptions {
            max_tasks: 50_000,
            max_profiles: 64,
        }
    }
}

/// Where a task is in its life, as far as time left is concerned.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    /// Waiting to start.
    Pending,
    /// Running.
    Running,
    /// Finished; only a success is learned from.
    Finished { succeeded: bool },
}

/// One change of a task, as the estimator sees it.
#[derive(Clone, Copy, Debug)]
pub struct Observation {
    /// Milliseconds from the caller's fixed origin (monotonic).
    pub at_ms: u64,
    pub phase: Phase,
    /// Progress from 0.0 to 1.0, when known.
    pub fraction: Option<f64>,
    /// The task's step count, when it reports steps; selects the profile.
    pub total_steps: Option<u32>,
}

/// A run's typical shape and length.
#[derive(Clone, Debug)]
struct Profile {
    /// Share of the run time passed when progress reached `i / BINS`.
    shape: [f64; BINS + 1],
    duration_ms: f64,
    samples: u32,
    last_used: u64,
}

impl Profile {
    fn new() -> Self {
        let mut shape = [0.0; BINS + 1];
        for (i, point) in shape.iter_mut().enumerate() {
            *point = i as f64 / BINS as f64;
        }
        Profile {
            shape,
            duration_ms: 0.0,
            samples: 0,
            last_used: 0,
        }
    }

    /// `f(p)`: the typical share of the run time passed at progress `p`.
    fn at(&self, p: f64) -> f64 {
        let x = p.clamp(0.0, 1.0) * BINS as f64;
        let i = (x.floor() as usize).min(BINS - 1);
        let within = x - i as f64;
        self.shape[i] + (self.shape[i + 1] - self.shape[i]) * within
    }

    fn learn(&mut self, times: &[Option<u32>; BINS + 1], duration_ms: u64) {
        let weight = if self.samples < MEAN_SAMPLES {
            1.0 / f64::from(self.samples + 1)
        } else {
            EWMA_WEIGHT
        };
        let total = duration_ms as f64;
        for (point, time) in self.shape.iter_mut().zip(times) {
            if let Some(t) = time {
                *point += (f64::from(*t) / total - *point) * weight;
            }
        }
        // Keep the shape a non-decreasing curve from 0 to 1 whatever the samples did.
        self.shape[0] = 0.0;
        self.shape[BINS] = 1.0;
        for i in 1..=BINS {
            self.shape[i] = self.shape[i].max(self.shape[i - 1]);
        }
        self.duration_ms += (total - self.duration_ms) * weight;
        self.samples += 1;
    }
}

/// What is tracked of one running task.
#[derive(Clone, Debug)]
struct Track {
    /// When it was first seen running, and at which progress.
    started_ms: Option<u64>,
    start_fraction: f64,
    /// Whether this node saw the start (so its run may be learned from).
    saw_start: bool,
    /// Milliseconds after the start at which progress first reached each point of the shape.
    times: [Option<u32>; BINS + 1],
    last_fraction: Option<f64>,
    last_elapsed: u32,
    last_ms: u64,
    total_steps: Option<u32>,
}

impl Track {
    fn new(at_ms: u64) -> Self {
        Track {
            started_ms: None,
            start_fraction: 0.0,
            saw_start: false,
            times: [None; BINS + 1],
            last_fraction: None,
            last_elapsed: 0,
            last_ms: at_ms,
            total_steps: None,
        }
    }

    /// Records the times at which progress crossed points of the shape since the last change,
    /// interpolating between the two changes.
    fn record(&mut self, fraction: f64, elapsed: u32) {
        let (from_p, from_t) = match self.last_fraction {
            Some(p) => (p, self.last_elapsed),
            None => (fraction, elapsed),
        };
        let last_point = (fraction * BINS as f64 + 1e-9).floor() as usize;
        for i in 0..=last_point.min(BINS) {
            if self.times[i].is_some() || (i as f64) / (BINS as f64) < self.start_fraction - 1e-9 {
                continue;
            }
            let p = i as f64 / BINS as f64;
            let t = if fraction > from_p {
                let share = ((p - from_p) / (fraction - from_p)).clamp(0.0, 1.0);
                f64::from(from_t) + share * f64::from(elapsed.saturating_sub(from_t))
            } else {
                f64::from(elapsed)
            };
            self.times[i] = Some(t.round() as u32);
        }
        self.last_fraction = Some(fraction);
        self.last_elapsed = elapsed;
    }
}

/// Estimates time left per task; see the module comment for the model.
#[derive(Debug)]
pub struct Estimator<K> {
    options: EtaOptions,
    tasks: HashMap<K, Track>,
    profiles: HashMap<Option<u32>, Profile>,
    uses: u64,
}

impl<K: Hash + Eq + Copy> Estimator<K> {
    pub fn new(options: EtaOptions) -> Self {
        Estimator {
            options,
            tasks: HashMap::new(),
            profiles: HashMap::new(),
            uses: 0,
        }
    }

    /// Takes one change of `task` and returns the estimated milliseconds left, when the task is
    /// running and there is anything to go on.
    pub fn observe(&mut self, task: K, change: Observation) -> Option<u64> {
        match change.phase {
            Phase::Finished { succeeded } => {
                let track = self.tasks.remove(&task)?;
                if succeeded {
                    self.learn(&track, change.at_ms);
                }
                None
            }
            Phase::Pending => {
                let track = self.track(task, change.at_ms);
                track.last_ms = change.at_ms;
                None
            }
            Phase::Running => self.running(task, change),
        }
    }

    /// Forgets a task (deleted, or no longer of interest).
    pub fn forget(&mut self, task: &K) {
        self.tasks.remove(task);
    }

    /// Tasks tracked now.
    pub fn tracked(&self) -> usize {
        self.tasks.len()
    }

    /// Profiles learned so far.
    pub fn profiles(&self) -> usize {
        self.profiles.values().filter(|p| p.samples > 0).count()
    }

    fn running(&mut self, task: K, change: Observation) -> Option<u64> {
        let fresh = !self.tasks.contains_key(&task);
        let track = self.track(task, change.at_ms);
        let seen_pending = !fresh && track.started_ms.is_none();
        track.last_ms = change.at_ms;
        if change.total_steps.is_some() {
            track.total_steps = change.total_steps;
        }
        let fraction = change.fraction.or(track.last_fraction)?.clamp(0.0, 1.0);
        let started = *track.started_ms.get_or_insert_with(|| {
            // A task seen waiting started with this change: whatever progress it reports now
            // took no running time.
            track.start_fraction = if seen_pending { 0.0 } else { fraction };
            track.saw_start = seen_pending || fraction < 1.0 / BINS as f64;
            change.at_ms
        });
        let elapsed = u32::try_from(change.at_ms.saturating_sub(started)).unwrap_or(u32::MAX);
        if change.fraction.is_some() {
            track.record(fraction, elapsed);
        }
        let (start_fraction, key) = (track.start_fraction, track.total_steps);
        let profile = self.profile(key);
        let covered = profile.at(fraction) - profile.at(start_fraction);
        let left = 1.0 - profile.at(fraction);
        let elapsed = f64::from(elapsed);
        let estimate = if profile.samples > 0 {
            let typical = profile.duration_ms;
            let speed = if covered > 0.0 && elapsed > 0.0 {
                let own = elapsed / (covered * typical);
                let weight = covered / (covered + OWN_WEIGHT_AT);
                weight * own + (1.0 - weight)
            } else {
                1.0
            };
            speed * typical * left
        } else if covered > 0.0 && elapsed > 0.0 {
            elapsed * left / covered
        } else {
            return None;
        };
        estimate
            .is_finite()
            .then(|| estimate.max(0.0).round() as u64)
    }

    fn learn(&mut self, track: &Track, at_ms: u64) {
        let Some(started) = track.started_ms.filter(|_| track.saw_start) else {
            return;
        };
        let duration = at_ms.saturating_sub(started);
        if duration == 0 || duration > u64::from(u32::MAX) {
            return;
        }
        let mut times = track.times;
        times[BINS] = Some(duration as u32);
        self.profile(track.total_steps).learn(&times, duration);
    }

    fn track(&mut self, task: K, at_ms: u64) -> &mut Track {
        if !self.tasks.contains_key(&task) && self.tasks.len() >= self.options.max_tasks.max(1) {
            self.drop_older_half();
        }
        self.tasks.entry(task).or_insert_with(|| Track::new(at_ms))
    }

    /// Drops the least recently changed half of the tracked tasks (amortised O(1) per insert).
    fn drop_older_half(&mut self) {
        let mut seen: Vec<u64> = self.tasks.values().map(|t| t.last_ms).collect();
        let middle = seen.len() / 2;
        let (_, &mut cutoff, _) = seen.select_nth_unstable(middle);
        self.tasks.retain(|_, t| t.last_ms > cutoff);
    }

    fn profile(&mut self, key: Option<u32>) -> &mut Profile {
        self.uses += 1;
        if !self.profiles.contains_key(&key)
            && self.profiles.len() >= self.options.max_profiles.max(1)
        {
            let oldest = self
                .profiles
                .iter()
                .min_by_key(|(_, p)| p.last_used)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                self.profiles.remove(&oldest);
            }
        }
        let uses = self.uses;
        let profile = self.profiles.entry(key).or_insert_with(Profile::new);
        profile.last_used = uses;
        profile
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(at_ms: u64, phase: Phase, percent: Option<f64>) -> Observation {
        Observation {
            at_ms,
            phase,
            fraction: percent.map(|p| p / 100.0),
            total_steps: None,
        }
    }

    const RUN: Phase = Phase::Running;
    const DONE: Phase = Phase::Finished { succeeded: true };

    /// One run from 0 to 100 % in `steps` equal steps of `step_ms`, started at `from`.
    fn linear_run(e: &mut Estimator<u32>, task: u32, from: u64, steps: u64, step_ms: u64) {
        for i in 0..=steps {
            e.observe(
                task,
                at(from + i * step_ms, RUN, Some((i * 100 / steps) as f64)),
            );
        }
        e.observe(task, at(from + steps * step_ms + 1, DONE, Some(100.0)));
    }

    #[test]
    fn with_nothing_learned_the_estimate_is_the_tasks_own_rate() {
        let mut e = Estimator::new(EtaOptions::default());
        assert_eq!(
            e.observe(1, at(0, RUN, Some(0.0))),
            None,
            "nothing to go on"
        );
        // 10 % in 1 s: 9 s left.
        assert_eq!(e.observe(1, at(1_000, RUN, Some(10.0))), Some(9_000));
        // 50 % in 4 s: 4 s left.
        assert_eq!(e.observe(1, at(4_000, RUN, Some(50.0))), Some(4_000));
    }

    #[test]
    fn a_learned_duration_gives_an_estimate_from_the_first_push() {
        let mut e = Estimator::new(EtaOptions::default());
        linear_run(&mut e, 1, 0, 10, 1_000);
        assert_eq!(e.profiles(), 1);
        assert_eq!(e.tracked(), 0, "a finished task is no longer tracked");
        let left = e.observe(2, at(50_000, RUN, Some(0.0))).unwrap();
        assert!((9_900..=10_100).contains(&left), "{left}");
    }

    #[test]
    fn a_slow_first_step_learned_from_earlier_runs_does_not_inflate_the_estimate() {
        // Each run: 0 → 10 % takes 5 s (warm-up), then 10 % per second: 14 s in all.
        let run = |e: &mut Estimator<u32>, task: u32, from: u64| {
            e.observe(task, at(from, RUN, Some(0.0)));
            let mut t = from + 5_000;
            for p in 1..=10u64 {
                e.observe(task, at(t, RUN, Some((p * 10) as f64)));
                t += 1_000;
            }
            e.observe(task, at(t - 1_000, DONE, Some(100.0)))
        };
        let mut e = Estimator::new(EtaOptions::default());
        for task in 0..5 {
            run(&mut e, task, u64::from(task) * 100_000);
        }
        // A new run at 10 % after its 5 s warm-up: 9 s left. The naive estimate says 45 s.
        let from = 1_000_000;
        e.observe(9, at(from, RUN, Some(0.0)));
        let left = e.observe(9, at(from + 5_000, RUN, Some(10.0))).unwrap();
        assert!((8_500..=9_500).contains(&left), "{left}");
    }

    #[test]
    fn a_task_slower_than_typical_gets_a_longer_estimate_as_it_goes() {
        let mut e = Estimator::new(EtaOptions::default());
        for task in 0..5 {
            linear_run(&mut e, task, u64::from(task) * 100_000, 10, 1_000);
        }
        // This one runs at half speed: 2 s per 10 %. At 50 % (10 s in), 10 s are left.
        let from = 1_000_000;
        e.observe(7, at(from, RUN, Some(0.0)));
        let left = e.observe(7, at(from + 10_000, RUN, Some(50.0))).unwrap();
        // The blend still leans a little on the typical 5 s left.
        assert!((8_500..=10_000).contains(&left), "{left}");
    }

    #[test]
    fn failed_runs_and_runs_seen_only_half_way_are_not_learned_from() {
        let mut e = Estimator::new(EtaOptions::default());
        e.observe(1, at(0, RUN, Some(0.0)));
        e.observe(1, at(1_000, RUN, Some(50.0)));
        e.observe(1, at(1_500, Phase::Finished { succeeded: false }, None));
        e.observe(2, at(0, RUN, Some(60.0)));
        e.observe(2, at(1_000, DONE, Some(100.0)));
        assert_eq!(e.profiles(), 0);
    }

    #[test]
    fn a_task_first_seen_pending_is_learned_from_when_it_starts_past_zero() {
        let mut e = Estimator::new(EtaOptions::default());
        e.observe(1, at(0, Phase::Pending, None));
        e.observe(1, at(1_000, RUN, Some(30.0)));
        e.observe(1, at(2_000, RUN, Some(65.0)));
        e.observe(1, at(3_000, DONE, Some(100.0)));
        assert_eq!(e.profiles(), 1);
    }

    #[test]
    fn profiles_are_kept_per_total_steps_and_bounded() {
        let mut e = Estimator::new(EtaOptions {
            max_tasks: 100,
            max_profiles: 3,
        });
        for steps in 1..=10u32 {
            let change = |at_ms, phase, p: f64| Observation {
                at_ms,
                phase,
                fraction: Some(p),
                total_steps: Some(steps),
            };
            e.observe(steps, change(0, RUN, 0.0));
            e.observe(steps, change(u64::from(steps) * 1_000, DONE, 1.0));
        }
        assert_eq!(e.profiles(), 3);
        // The newest profile (10 steps, 10 s) is among those kept.
        let left = e.observe(
            99,
            Observation {
                at_ms: 0,
                phase: RUN,
                fraction: Some(0.0),
                total_steps: Some(10),
            },
        );
        assert_eq!(left, Some(10_000));
    }

    #[test]
    fn tracked_tasks_are_bounded() {
        let mut e = Estimator::new(EtaOptions {
            max_tasks: 1_000,
            max_profiles: 4,
        });
        for task in 0..100_000u32 {
            e.observe(task, at(u64::from(task), RUN, Some(10.0)));
        }
        assert!(e.tracked() <= 1_000, "{}", e.tracked());
        // The most recent task survived the trimming.
        assert!(e.observe(99_999, at(200_000, RUN, Some(20.0))).is_some());
    }

    #[test]
    fn progress_absent_from_a_change_keeps_the_last_known_progress() {
        let mut e = Estimator::new(EtaOptions::default());
        e.observe(1, at(0, RUN, Some(0.0)));
        e.observe(1, at(1_000, RUN, Some(25.0)));
        assert_eq!(e.observe(1, at(1_000, RUN, None)), Some(3_000));
        assert_eq!(e.observe(2, at(0, RUN, None)), None);
    }
}
