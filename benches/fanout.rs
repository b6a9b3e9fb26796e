//! Fan-out: what one delivered progress frame costs taskcast, next to the floor.
//!
//! Starts the release `taskcast` binary, creates `BENCH_TASKS` tasks and opens `BENCH_SUBS`
//! WebSockets to each, then pushes over HTTP at each rate of `BENCH_RATES`. Measured:
//! deliveries/s achieved vs offered, push→receive latency (p50/p99/p999, commit included),
//! server CPU per delivered frame and per push and server RSS, from /proc; with Postgres,
//! the CPU of the Postgres backends serving the bench database per push (and of the whole
//! cluster, which other work on the machine shares), also from /proc; pushes per commit and
//! the mean commit time from the server's own histograms, and Postgres's own WAL flush
//! ("fsync") time from pg_stat_wal (timed on the throwaway bench database's sessions). Then the same load
//! against the floors, a minimal tokio-tungstenite broadcaster built into this bench (see
//! `common/floor.rs`), run as its own process: the **HTTP floor** takes its pushes as
//! keep-alive POSTs parsed with httparse and answered 200 (what any HTTP push path pays);
//! the **TCP floor** takes them as plain lines, unanswered. Ratios are taskcast's CPU
//! per frame over each floor's, at the same rate in the same run. Then a saturation ladder,
//! refined by two bisection steps: the highest paced rate at which ≥ 99% of the frames
//! arrive with p99 < 100 ms, received at ≥ 95% of the offered pace.
//!
//! Two workloads:
//! - `BENCH_WORKLOAD=fanout` (default): 1,000 tasks × 10 subscribers = 10,000 WebSockets,
//!   one push per task per second (10,000 deliveries/s).
//! - `BENCH_WORKLOAD=single`: one subscriber per task, the image-generation case (one
//!   person watching each generation): 2,000 tasks, 5,000, 10,000 and 15,000 pushes/s,
//!   the saturation ladder from 8,000 pushes/s.
//!
//! ```text
//! cargo bench --bench fanout
//! BENCH_WORKLOAD=single cargo bench --bench fanout
//! BENCH_WORKLOAD=single BENCH_SATURATION=taskcast BENCH_FLOORS=http cargo bench --bench fanout
//! BENCH_TASKS=200 BENCH_SUBS=5 BENCH_STORE=memory cargo bench --bench fanout
//! ```
//!
//! Settings (environment; a workload only changes the defaults): BENCH_WORKLOAD, BENCH_TASKS,
//! BENCH_SUBS, BENCH_RATES (pushes/s, comma-separated; one window of rounds each; default
//! one push per task per second), BENCH_STORE (auto | postgres | memory; auto uses Postgres
//! when TASKCAST_BENCH_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres,
//! answers), BENCH_FLOORS (http,tcp: the floors to measure; `none` for none),
//! BENCH_WARMUP_SECS (3), BENCH_ROUNDS (3) × BENCH_ROUND_SECS (5) at each rate,
//! BENCH_STEP_SECS (4) per saturation step, BENCH_SATURATION (1: every server; taskcast:
//! taskcast only; 0: none), BENCH_LADDER_FROM (the lowest push rate the ladder tries),
//! BENCH_INFLIGHT (256: pushes in flight at most; at a commit time of `t` the pusher
//! offers at most BENCH_INFLIGHT / `t` pushes/s, so a slow commit caps the offered rate);
//! BENCH_PG_OPTIONS (say `-c synchronous_commit=off` or `-c commit_delay=100`: settings for
//! taskcast's sessions only, the database's configuration is left alone); BENCH_PUSH
//! (`post`, the default: one POST per push; `stream`: taskcast's pushes go as lines of
//! four push streams, `POST /api/progress/stream`, each answer line timed; the TCP floor
//! is then the like-for-like floor, lines without HTTP);
//! other `TASKCAST_*` variables are passed to the server (say TASKCAST_COMMIT_INTERVAL_MS=0);
//! TASKCAST_BIN runs another taskcast binary, BENCH_WRAPPER (say `valgrind
//! --tool=callgrind`) runs the servers under a profiler. Figures go to
//! `target/bench/fanout.{json,svg}` (`fanout-single.*` for the single workload; under
//! CARGO_TARGET_DIR if set), with the servers' logs.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::load::{LoadStats, MAX_PHASES, PushTarget, Pusher, Subscribe, Subscribers, epoch};
use common::postgres::{self, BenchDatabase};
use common::proc::{CpuDelta, Proc, cpu_by_command, cpu_by_command_line, cpu_used, machine_busy};
use common::report::{self, Progress, Table, Target, jnum, num};
use common::server::Server;
use common::stats::median;
use common::svg::{self, Bar, BarChart, LineChart, Rule, Series};
use common::{BoxError, PUSH_KEY, env_secs, env_usize};

/// Saturation steps, as multiples of the default rate (one push per task per second);
/// past the last, each step is 25% above the one before.
const LADDER: [f64; 12] = [
    2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0,
];

fn ladder() -> impl Iterator<Item = f64> {
    let last = LADDER[LADDER.len() - 1];
    LADDER
        .into_iter()
        .chain((1..).map(move |k| last * 1.25f64.powi(k)))
}
/// Bisection steps after the ladder, between its best pass and its first failure.
const REFINE_STEPS: usize = 2;
/// A step passes when this share of its frames arrived...
const MIN_ARRIVED: f64 = 0.99;
/// ...with a p99 below this...
const MAX_P99_MS: f64 = 100.0;
/// ...and the frames kept pace: received per second during the step at least this share of
/// the offered rate (a server that falls behind and catches up later did not sustain it).
const MIN_PACE: f64 = 0.95;

/// Which servers the saturation search runs against.
#[derive(Clone, Copy, PartialEq)]
enum Saturation {
    None,
    TaskcastOnly,
    All,
}

/// The servers measured: taskcast, and the floor with each of its publish paths.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Taskcast,
    HttpFloor,
    TcpFloor,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Taskcast => "taskcast",
            Kind::HttpFloor => "floor (HTTP)",
            Kind::TcpFloor => "floor (TCP)",
        }
    }
}

struct Settings {
    /// `single` for one subscriber per task, else `fanout`.
    workload: &'static str,
    tasks: usize,
    subs: usize,
    /// Pushes per second of the measured rounds, one set of rounds each.
    rates: Vec<f64>,
    floors: Vec<Kind>,
    warmup: Duration,
    rounds: usize,
    round: Duration,
    step: Duration,
    saturation: Saturation,
    ladder_from: f64,
    /// Pushes in flight at most: with commits taking `t`, the pusher offers at most
    /// `inflight / t` pushes per second.
    inflight: usize,
    /// BENCH_PUSH=stream: taskcast's pushes go as lines of push streams, not POSTs.
    stream: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let single = std::env::var("BENCH_WORKLOAD").is_ok_and(|w| w.trim() == "single");
        let (workload, tasks, subs) = match single {
            true => ("single", 2000, 1),
            false => ("fanout", 1000, 10),
        };
        let tasks = env_usize("BENCH_TASKS", tasks);
        let default_rates = match single {
            true => vec![5000.0, 10000.0, 15000.0],
            false => vec![tasks as f64],
        };
        let rates: Vec<f64> = std::env::var("BENCH_RATES")
            .ok()
            .map(|v| {
                v.split(',')
                    .filter_map(|r| r.trim().replace('_', "").parse::<f64>().ok())
                    .filter(|r| *r > 0.0)
                    .collect()
            })
            .filter(|r: &Vec<f64>| !r.is_empty())
            .unwrap_or(default_rates);
        let floors = std::env::var("BENCH_FLOORS").unwrap_or_else(|_| "http,tcp".into());
        let floors = floors
            .split(',')
            .filter_map(|f| match f.trim() {
                "http" => Some(Kind::HttpFloor),
                "tcp" => Some(Kind::TcpFloor),
                _ => None,
            })
            .collect();
        let saturation = match std::env::var("BENCH_SATURATION").as_deref().map(str::trim) {
            Ok("0") => Saturation::None,
            Ok("taskcast") => Saturation::TaskcastOnly,
            _ => Saturation::All,
        };
        let ladder_from = std::env::var("BENCH_LADDER_FROM")
            .ok()
            .and_then(|v| v.trim().replace('_', "").parse().ok())
            .unwrap_or(if single { 8000.0 } else { 0.0 });
        Settings {
            workload,
            tasks,
            subs: env_usize("BENCH_SUBS", subs),
            rates,
            floors,
            warmup: env_secs("BENCH_WARMUP_SECS", 3.0),
            rounds: env_usize("BENCH_ROUNDS", 3).min(8),
            round: env_secs("BENCH_ROUND_SECS", 5.0),
            step: env_secs("BENCH_STEP_SECS", 4.0),
            saturation,
            ladder_from,
            inflight: env_usize("BENCH_INFLIGHT", 256),
            stream: std::env::var("BENCH_PUSH").is_ok_and(|p| p.trim() == "stream"),
        }
    }

    /// Pushes per second of the ladder's unit: one per task.
    fn push_rate(&self) -> f64 {
        self.tasks as f64
    }

    fn connections(&self) -> usize {
        self.tasks * self.subs
    }

    fn saturates(&self, kind: Kind) -> bool {
        match self.saturation {
            Saturation::None => false,
            Saturation::TaskcastOnly => kind == Kind::Taskcast,
            Saturation::All => true,
        }
    }

    /// The figures' file name, without extension.
    fn file_stem(&self) -> &'static str {
        match self.workload {
            "single" => "fanout-single",
            _ => "fanout",
        }
    }
}

/// One measured stretch at a fixed rate.
struct Window {
    /// Pushes per second the schedule offered.
    push_rate: f64,
    /// Deliveries per second the schedule offered.
    offered: f64,
    /// Frames received per second during the window.
    achieved: f64,
    /// Share of the window's frames that arrived (after a drain).
    arrived: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    /// Server CPU per received frame: total, user, system (µs).
    cpu: (f64, f64, f64),
    /// Server CPU per push sent (µs).
    cpu_per_push: f64,
    /// The bench process's own CPU per received frame (µs).
    load_cpu: f64,
    pushes_failed: u64,
    ack_p50: f64,
    ack_p99: f64,
    /// CPU of the Postgres backends serving the bench database, per push sent (µs).
    pg_backend_per_push: f64,
    /// CPU of every Postgres process (the shared WAL writer, checkpointer and other work's
    /// backends included), per push sent (µs).
    pg_all_per_push: f64,
    /// Cores busy with Postgres during the window.
    postgres_cores: f64,
    /// Cores busy with anything else on the machine (other builds, tests...): noise.
    other_cores: f64,
    /// Pushes per commit (Postgres) and the mean commit time in ms, from the server's own
    /// `taskcast_batch_size` and `taskcast_commit_duration_seconds` histograms.
    per_commit: f64,
    commit_ms: f64,
    /// WAL flushes per commit and the mean flush time in ms (Postgres's own
    /// pg_stat_wal timing: the disk's part of a commit).
    syncs_per_commit: f64,
    sync_ms: f64,
}

impl Window {
    fn passes(&self) -> bool {
        self.arrived >= MIN_ARRIVED
            && self.p99 < MAX_P99_MS
            && self.achieved >= MIN_PACE * self.offered
    }

    fn to_json(&self) -> Value {
        json!({
            "offered_pushes_per_sec": jnum(self.push_rate),
            "offered_per_sec": jnum(self.offered), "achieved_per_sec": jnum(self.achieved),
            "arrived_share": jnum(self.arrived),
            "latency_ms": {"p50": jnum(self.p50), "p99": jnum(self.p99), "p999": jnum(self.p999)},
            "server_cpu_us_per_frame": jnum(self.cpu.0),
            "server_user_us_per_frame": jnum(self.cpu.1),
            "server_system_us_per_frame": jnum(self.cpu.2),
            "server_cpu_us_per_push": jnum(self.cpu_per_push),
            "load_cpu_us_per_frame": jnum(self.load_cpu),
            "pushes_failed": self.pushes_failed,
            "ack_ms": {"p50": jnum(self.ack_p50), "p99": jnum(self.ack_p99)},
            "postgres_backend_cpu_us_per_push": jnum(self.pg_backend_per_push),
            "postgres_all_cpu_us_per_push": jnum(self.pg_all_per_push),
            "postgres_cores": jnum(self.postgres_cores),
            "other_cores": jnum(self.other_cores),
            "pushes_per_commit": jnum(self.per_commit),
            "commit_ms": jnum(self.commit_ms),
            "wal_syncs_per_commit": jnum(self.syncs_per_commit),
            "wal_sync_ms": jnum(self.sync_ms),
        })
    }
}

/// Everything measured against one server.
struct Run {
    kind: Kind,
    /// The measured rounds, at every rate of the settings.
    rounds: Vec<Window>,
    /// The ladder's steps, then the bisection steps after it.
    steps: Vec<Window>,
    ladder_len: usize,
    rss_kib: u64,
    lost: u64,
}

impl Run {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// The median over the rounds at `push_rate`.
    fn median_at(&self, push_rate: f64, f: impl Fn(&Window) -> f64) -> f64 {
        median(
            self.rounds
                .iter()
                .filter(|w| w.push_rate == push_rate)
                .map(f),
        )
    }

    /// The highest rate that passed: on the ladder before two failures in a row (the
    /// measured rounds count as passes where most of a rate's rounds passed), or in the
    /// bisection after it.
    fn sustainable(&self) -> f64 {
        let refined = self.steps[self.ladder_len..]
            .iter()
            .filter(|w| w.passes())
            .map(|w| w.offered);
        refined.fold(self.ladder_best(), f64::max)
    }

    /// The lowest rate above `rate` that failed.
    fn first_failure_above(&self, rate: f64) -> Option<f64> {
        self.steps
            .iter()
            .filter(|w| !w.passes() && w.offered > rate)
            .map(|w| w.offered)
            .reduce(f64::min)
    }

    fn ladder_best(&self) -> f64 {
        let mut best: f64 = 0.0;
        let mut rates: Vec<f64> = self.rounds.iter().map(|w| w.push_rate).collect();
        rates.dedup();
        for rate in rates {
            let at: Vec<&Window> = self.rounds.iter().filter(|w| w.push_rate == rate).collect();
            if at.iter().filter(|w| w.passes()).count() * 2 > at.len() {
                best = best.max(self.median_at(rate, |w| w.offered));
            }
        }
        let mut fails = 0;
        for step in &self.steps[..self.ladder_len] {
            if step.passes() {
                best = best.max(step.offered);
                fails = 0;
            } else {
                fails += 1;
                if fails == 2 {
                    break;
                }
            }
        }
        best
    }

    fn to_json(&self, rates: &[f64]) -> Value {
        let medians: Vec<Value> = rates
            .iter()
            .map(|&r| {
                json!({
                    "offered_pushes_per_sec": jnum(r),
                    "offered_per_sec": jnum(self.median_at(r, |w| w.offered)),
                    "achieved_per_sec": jnum(self.median_at(r, |w| w.achieved)),
                    "arrived_share": jnum(self.median_at(r, |w| w.arrived)),
                    "latency_ms": {"p50": jnum(self.median_at(r, |w| w.p50)), "p99": jnum(self.median_at(r, |w| w.p99)), "p999": jnum(self.median_at(r, |w| w.p999))},
                    "server_cpu_us_per_frame": jnum(self.median_at(r, |w| w.cpu.0)),
                    "server_cpu_us_per_push": jnum(self.median_at(r, |w| w.cpu_per_push)),
                    "postgres_backend_cpu_us_per_push": jnum(self.median_at(r, |w| w.pg_backend_per_push)),
                    "load_cpu_us_per_frame": jnum(self.median_at(r, |w| w.load_cpu)),
                })
            })
            .collect();
        json!({
            "server": self.name(),
            "medians_per_rate": medians,
            "rounds": self.rounds.iter().map(Window::to_json).collect::<Vec<_>>(),
            "saturation_steps": self.steps.iter().map(Window::to_json).collect::<Vec<_>>(),
            "sustainable_per_sec": jnum(self.sustainable()),
            "server_rss_kib": self.rss_kib,
            "connections_lost": self.lost,
        })
    }
}

fn main() -> Result<(), BoxError> {
    if std::env::args().any(|a| a == "--floor-server") {
        return common::floor::run();
    }
    let settings = Settings::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        epoch();
        let admin = postgres::admin_url();
        let use_postgres = match std::env::var("BENCH_STORE").as_deref().map(str::trim) {
            Ok("memory") => false,
            Ok("postgres") => true,
            _ => postgres::answers(&admin).await,
        };
        let db = match use_postgres {
            true => Some(BenchDatabase::create(&admin).await?),
            false => None,
        };
        let database = db
            .as_ref()
            .map(|d| (with_session_options(&d.url), d.name.clone()));
        let result = tokio::select! {
            r = bench(&settings, database) => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        };
        if let Some(db) = db {
            db.drop_database().await;
        }
        result
    })
}

/// `url` with BENCH_PG_OPTIONS (say `-c synchronous_commit=off`) as its `options`
/// parameter: settings for taskcast's own sessions, to see what they would give without
/// changing the database's configuration.
fn with_session_options(url: &str) -> String {
    let Some(options) = std::env::var("BENCH_PG_OPTIONS")
        .ok()
        .filter(|o| !o.trim().is_empty())
    else {
        return url.to_string();
    };
    let encoded = options
        .trim()
        .replace('%', "%25")
        .replace(' ', "%20")
        .replace('=', "%3D");
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options={encoded}")
}

/// `database`: the bench database's URL and name, or `None` for the in-memory store.
async fn bench(settings: &Settings, database: Option<(String, String)>) -> Result<(), BoxError> {
    let store = if database.is_some() {
        "postgres (each push committed before it is fanned out)"
    } else {
        "memory (no DATABASE_URL: no durable commit in the path)"
    };
    let rates: Vec<String> = settings.rates.iter().map(|r| num(*r, 0)).collect();
    eprintln!(
        "fanout ({}): {} tasks × {} subscribers = {} WebSockets, {} pushes/s offered; store: {store}",
        settings.workload,
        settings.tasks,
        settings.subs,
        settings.connections(),
        rates.join(", "),
    );
    let mut env = vec![
        ("TASKCAST_MAX_CONNECTIONS", "19000".to_string()),
        ("TASKCAST_MAX_SUBSCRIBES_PER_SEC", "100000".to_string()),
        ("TASKCAST_IDLE_TIMEOUT_SECS", "3600".to_string()),
    ];
    if let Some((url, _)) = &database {
        env.push(("DATABASE_URL", url.clone()));
    }
    // taskcast settings given to the bench (say TASKCAST_COMMIT_INTERVAL_MS=0) reach the
    // server, which otherwise starts with a clean environment.
    let given: Vec<(String, String)> = std::env::vars()
        .filter(|(name, _)| {
            name.starts_with("TASKCAST_")
                && !["TASKCAST_BIN", "TASKCAST_BENCH_", "TASKCAST_TEST_"]
                    .iter()
                    .any(|skip| name.starts_with(skip))
        })
        .collect();
    for (name, value) in &given {
        env.push((name.as_str(), value.clone()));
    }
    let db_name = database.as_ref().map(|(_, name)| name.as_str());
    let server = Server::taskcast("fanout-taskcast", &env).await?;
    let mut runs = vec![measure(settings, server, Kind::Taskcast, db_name).await?];
    for &kind in &settings.floors {
        let label = match kind {
            Kind::TcpFloor => "fanout-floor-tcp",
            _ => "fanout-floor",
        };
        let server = Server::floor(label).await?;
        runs.push(measure(settings, server, kind, db_name).await?);
    }
    report(settings, store, database.is_some(), &runs)
}

/// The load against one server: its subscribers' stats, the pusher, and the processes
/// whose CPU is read.
struct Load<'a> {
    server: &'a Server,
    this: Proc,
    stats: Arc<LoadStats>,
    pusher: Pusher,
    progress: Progress,
    subs: f64,
    /// The bench database's name, whose backends' CPU is counted.
    database: Option<&'a str>,
}

/// Connects the subscribers, runs the rounds at each rate and the saturation ladder.
async fn measure(
    settings: &Settings,
    mut server: Server,
    kind: Kind,
    database: Option<&str>,
) -> Result<Run, BoxError> {
    let name = kind.name();
    eprintln!("{name}: pid {}, log {}", server.pid(), server.log.display());
    let progress = Progress::new(&format!("fanout {name}"));
    let (subscribe, target) = match kind {
        Kind::Taskcast => create_tasks(&server, settings, &progress).await?,
        Kind::HttpFloor => floor_topics(&server, settings, false)?,
        Kind::TcpFloor => floor_topics(&server, settings, true)?,
    };
    let stats = Arc::new(LoadStats::default());
    let subscribers = Subscribers::open(subscribe, stats.clone(), 200, &progress).await?;
    let load = Load {
        server: &server,
        this: Proc::this(),
        stats: stats.clone(),
        pusher: Pusher::new(target, settings.inflight)?,
        progress,
        subs: settings.subs as f64,
        database,
    };
    load.window("warm-up", settings.rates[0], settings.warmup, 0)
        .await?;

    let mut run = Run {
        kind,
        rounds: Vec::new(),
        steps: Vec::new(),
        ladder_len: 0,
        rss_kib: 0,
        lost: 0,
    };
    let mut phase = 0;
    for &rate in &settings.rates {
        let mut pending = Vec::new();
        for round in 1..=settings.rounds {
            phase += 1;
            let label = format!(
                "{} pushes/s, round {round}/{}",
                num(rate, 0),
                settings.rounds
            );
            pending.push((
                load.window(&label, rate, settings.round, phase).await?,
                phase,
            ));
        }
        drain(&stats).await;
        for ((w, scheduled), phase) in pending {
            run.rounds.push(load.finish(w, phase, scheduled));
        }
    }
    run.rss_kib = server.sample()?.rss_kib;

    if settings.saturates(kind) {
        let mut fails = 0;
        let steps = ladder()
            .map(|m| settings.push_rate() * m)
            .filter(|&rate| rate >= settings.ladder_from);
        for rate in steps {
            phase += 1;
            if phase >= MAX_PHASES {
                break;
            }
            let label = format!("saturation {} pushes/s", num(rate, 0));
            let (w, scheduled) = load.window(&label, rate, settings.step, phase).await?;
            drain(&stats).await;
            let w = load.finish(w, phase, scheduled);
            fails = if w.passes() { 0 } else { fails + 1 };
            run.steps.push(w);
            if fails == 2 {
                break;
            }
        }
        // The ladder's steps are 25-33% apart: bisect between the best rate that passed
        // and the first that failed, so the figure is within ~8% of the real limit.
        run.ladder_len = run.steps.len();
        for round in 0..REFINE_STEPS {
            let low = run.sustainable();
            let Some(high) = run.first_failure_above(low) else {
                break;
            };
            phase += 1;
            if low <= 0.0 || phase >= MAX_PHASES {
                break;
            }
            let offered = (low + high) / 2.0;
            let label = format!("bisection {}/{REFINE_STEPS}", round + 1);
            let (w, scheduled) = load
                .window(&label, offered / settings.subs as f64, settings.step, phase)
                .await?;
            drain(&stats).await;
            run.steps.push(load.finish(w, phase, scheduled));
        }
    }
    run.lost = stats.lost();
    load.progress.finish(&format!(
        "done: {} connections, {} lost",
        subscribers.len(),
        run.lost
    ));
    drop(load);
    subscribers.close().await;
    server.check_alive()?;
    server.stop().await;
    Ok(run)
}

impl Load<'_> {
    /// Pushes at `push_rate` for `duration`, reading the server's CPU and the arrivals
    /// around it. The latency and the arrived share are filled in by [`Load::finish`]
    /// once late frames have had time to arrive. Returns the window and the pushes the
    /// schedule called for.
    async fn window(
        &self,
        label: &str,
        push_rate: f64,
        duration: Duration,
        phase: usize,
    ) -> Result<(Window, u64), BoxError> {
        let backends = || cpu_by_command_line("postgres", self.database.unwrap_or("\0"));
        let commits0 = self.commits().await;
        let wal0 = self.wal().await;
        let (server0, machine0, pg0, backends0) = (
            self.server.sample()?,
            machine_busy(),
            cpu_by_command("postgres"),
            backends(),
        );
        let (this0, arrivals0, started) =
            (self.this.sample()?, self.stats.arrivals(), Instant::now());
        let run = self.pusher.run(push_rate, duration, phase);
        let pushed = ticking(
            &self.progress,
            &self.stats,
            label,
            push_rate * self.subs,
            run,
        )
        .await;
        let (this1, arrivals1, elapsed) = (
            self.this.sample()?,
            self.stats.arrivals(),
            started.elapsed(),
        );
        let (server1, machine1, pg1, backends1) = (
            self.server.sample()?,
            machine_busy(),
            cpu_by_command("postgres"),
            backends(),
        );
        let commits1 = self.commits().await;
        let wal1 = self.wal().await;
        let frames = arrivals1 - arrivals0;
        let secs = elapsed.as_secs_f64();
        let server_cpu = CpuDelta::between(&server0, &server1);
        let load_cpu = CpuDelta::between(&this0, &this1);
        let postgres = cpu_used(&pg0, &pg1).as_secs_f64();
        let backend = cpu_used(&backends0, &backends1).as_secs_f64();
        let per_push = |secs: f64| secs * 1e6 / (pushed.ok.max(1) as f64);
        let busy = machine1.saturating_sub(machine0).as_secs_f64();
        let others =
            busy - server_cpu.total().as_secs_f64() - load_cpu.total().as_secs_f64() - postgres;
        let window = Window {
            push_rate,
            offered: push_rate * self.subs,
            achieved: frames as f64 / secs,
            arrived: f64::NAN,
            p50: f64::NAN,
            p99: f64::NAN,
            p999: f64::NAN,
            cpu: server_cpu.per(frames),
            cpu_per_push: per_push(server_cpu.total().as_secs_f64()),
            load_cpu: load_cpu.per(frames).0,
            pushes_failed: pushed.failed,
            ack_p50: pushed.ack.quantile_ms(0.5),
            ack_p99: pushed.ack.quantile_ms(0.99),
            pg_backend_per_push: match self.database {
                Some(_) => per_push(backend),
                None => f64::NAN,
            },
            pg_all_per_push: per_push(postgres),
            postgres_cores: postgres / secs,
            other_cores: (others / secs).max(0.0),
            per_commit: commits1.pushes_per_commit(&commits0),
            commit_ms: commits1.commit_ms(&commits0),
            syncs_per_commit: (wal1.0 - wal0.0) / (commits1.commits - commits0.commits),
            sync_ms: match wal1.1 - wal0.1 {
                0.0 => f64::NAN,
                ms => ms / (wal1.0 - wal0.0),
            },
        };
        Ok((window, pushed.scheduled))
    }

    /// Postgres's WAL flushes and their time so far (zeros without a database).
    async fn wal(&self) -> (f64, f64) {
        match self.database {
            Some(_) => postgres::wal_syncs(&postgres::admin_url()).await,
            None => (0.0, 0.0),
        }
    }

    /// The server's commit histograms (zeros for a floor, which has none).
    async fn commits(&self) -> Commits {
        let url = format!("http://{}/metrics", self.server.addr);
        let Ok(response) = reqwest::get(url).await else {
            return Commits::default();
        };
        Commits::parse(&response.text().await.unwrap_or_default())
    }

    fn finish(&self, mut w: Window, phase: usize, scheduled: u64) -> Window {
        let expected = scheduled as f64 * self.subs;
        w.arrived = self.stats.delivered(phase) as f64 / expected.max(1.0);
        let latency = &self.stats.phases[phase].latency;
        (w.p50, w.p99, w.p999) = (
            latency.quantile_ms(0.5),
            latency.quantile_ms(0.99),
            latency.quantile_ms(0.999),
        );
        w
    }
}

/// Sums and counts of the server's batch-size and commit-time histograms.
#[derive(Default)]
struct Commits {
    pushes: f64,
    commits: f64,
    seconds: f64,
}

impl Commits {
    fn parse(metrics: &str) -> Commits {
        let value = |name: &str| {
            (metrics.lines())
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or(0.0)
        };
        Commits {
            pushes: value("taskcast_batch_size_sum"),
            commits: value("taskcast_batch_size_count"),
            seconds: value("taskcast_commit_duration_seconds_sum"),
        }
    }

    fn pushes_per_commit(&self, before: &Commits) -> f64 {
        (self.pushes - before.pushes) / (self.commits - before.commits)
    }

    fn commit_ms(&self, before: &Commits) -> f64 {
        (self.seconds - before.seconds) * 1e3 / (self.commits - before.commits)
    }
}

/// Waits until frames stop arriving (at most three seconds).
async fn drain(stats: &LoadStats) {
    let started = Instant::now();
    let mut last = stats.arrivals();
    while started.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = stats.arrivals();
        if now == last {
            return;
        }
        last = now;
    }
}

/// Awaits `work` while showing the receive rate twice a second.
async fn ticking<T>(
    progress: &Progress,
    stats: &LoadStats,
    label: &str,
    offered: f64,
    work: impl Future<Output = T>,
) -> T {
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last = (Instant::now(), stats.arrivals());
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                let (now, arrivals) = (Instant::now(), stats.arrivals());
                let rate = (arrivals - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
                last = (now, arrivals);
                progress.update(&format!("{label}: {} of {} frames/s", num(rate, 0), num(offered, 0)));
            }
        }
    }
}

/// Creates the tasks over HTTP (each answer carries a subscribe token) and lists the
/// subscriptions and push URLs.
async fn create_tasks(
    server: &Server,
    settings: &Settings,
    progress: &Progress,
) -> Result<(Vec<Subscribe>, PushTarget), BoxError> {
    use futures::StreamExt;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("http://{}/api/tasks", server.addr);
    let mut created = Vec::with_capacity(settings.tasks);
    let mut answers = futures::stream::iter(0..settings.tasks)
        .map(|_| {
            let request = client.post(&url).bearer_auth(PUSH_KEY).json(&json!({}));
            async move {
                let body: Value = request.send().await?.error_for_status()?.json().await?;
                let id = body["task_id"].as_str().ok_or("no task_id")?.to_string();
                let token = body["token"].as_str().ok_or("no token")?.to_string();
                Ok::<_, BoxError>((id, token))
            }
        })
        .buffer_unordered(32);
    while let Some(task) = answers.next().await {
        created.push(task?);
        if created.len() % 100 == 0 {
            progress.update(&format!(
                "created {}/{} tasks",
                created.len(),
                settings.tasks
            ));
        }
    }
    let addr = server.addr;
    let subscribe = (0..settings.subs)
        .flat_map(|_| created.iter())
        .map(|(id, token)| Subscribe {
            url: format!("ws://{addr}/ws?task_id={id}&token={token}"),
            server: addr,
            source: None,
        })
        .collect();
    let mut target = PushTarget {
        urls: created
            .iter()
            .map(|(id, _)| format!("http://{addr}/api/tasks/{id}/progress"))
            .collect(),
        authorization: Some(format!("Bearer {PUSH_KEY}")),
        tcp: None,
        stream: None,
    };
    if settings.stream {
        // The same tasks, pushed as lines of push streams.
        target.urls = created.iter().map(|(id, _)| id.clone()).collect();
        target.stream = Some(addr);
    }
    Ok((subscribe, target))
}

/// The floor's subscriptions and push target: HTTP POSTs, or with `tcp` plain lines.
fn floor_topics(
    server: &Server,
    settings: &Settings,
    tcp: bool,
) -> Result<(Vec<Subscribe>, PushTarget), BoxError> {
    let (ws, push) = (server.addr, server.push_addr);
    let subscribe = (0..settings.subs)
        .flat_map(|_| 0..settings.tasks)
        .map(|topic| Subscribe {
            url: format!("ws://{ws}/ws/{topic}"),
            server: ws,
            source: None,
        })
        .collect();
    let target = match tcp {
        true => PushTarget {
            urls: (0..settings.tasks).map(|topic| topic.to_string()).collect(),
            authorization: None,
            tcp: Some(server.tcp_addr.ok_or("the floor has no TCP push port")?),
            stream: None,
        },
        false => PushTarget {
            urls: (0..settings.tasks)
                .map(|topic| format!("http://{push}/push/{topic}"))
                .collect(),
            authorization: None,
            tcp: None,
            stream: None,
        },
    };
    Ok((subscribe, target))
}

fn report(settings: &Settings, store: &str, durable: bool, runs: &[Run]) -> Result<(), BoxError> {
    let taskcast = &runs[0];
    let floor_of = |kind: Kind| runs.iter().find(|r| r.kind == kind);
    println!();
    println!(
        "fanout ({}, taskcast pushed by {}): {} tasks × {} subscribers, {} rounds of {:.0} s at each rate (medians); store: {store}",
        settings.workload,
        if settings.stream {
            "push streams"
        } else {
            "POSTs"
        },
        settings.tasks,
        settings.subs,
        settings.rounds,
        settings.round.as_secs_f64()
    );
    let mut table = Table::new(&[
        "server",
        "pushes/s",
        "offered/s",
        "achieved/s",
        "arrived",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "CPU µs/frame",
        "user",
        "sys",
        "µs/push",
        "× HTTP floor",
        "× TCP floor",
        "ack p99 ms",
        "load µs/frame",
        "pg µs/push",
        "pg all µs/push",
        "per commit",
        "commit ms",
        "fsync ms",
        "other cores",
    ]);
    let ratio = |run: &Run, rate: f64, kind: Kind| match floor_of(kind) {
        Some(floor) => num(
            run.median_at(rate, |w| w.cpu.0) / floor.median_at(rate, |w| w.cpu.0),
            2,
        ),
        None => "-".into(),
    };
    for &rate in &settings.rates {
        for run in runs {
            let m = |f: &dyn Fn(&Window) -> f64| run.median_at(rate, f);
            let pg = run.kind == Kind::Taskcast && durable;
            table.row(vec![
                run.name().to_string(),
                num(rate, 0),
                num(m(&|w| w.offered), 0),
                num(m(&|w| w.achieved), 0),
                format!("{}%", num(m(&|w| w.arrived) * 100.0, 2)),
                num(m(&|w| w.p50), 2),
                num(m(&|w| w.p99), 2),
                num(m(&|w| w.p999), 2),
                num(m(&|w| w.cpu.0), 1),
                num(m(&|w| w.cpu.1), 1),
                num(m(&|w| w.cpu.2), 1),
                num(m(&|w| w.cpu_per_push), 1),
                ratio(run, rate, Kind::HttpFloor),
                ratio(run, rate, Kind::TcpFloor),
                num(m(&|w| w.ack_p99), 2),
                num(m(&|w| w.load_cpu), 1),
                if pg {
                    num(m(&|w| w.pg_backend_per_push), 1)
                } else {
                    "-".into()
                },
                if pg {
                    num(m(&|w| w.pg_all_per_push), 1)
                } else {
                    "-".into()
                },
                if pg {
                    num(m(&|w| w.per_commit), 1)
                } else {
                    "-".into()
                },
                if pg {
                    num(m(&|w| w.commit_ms), 2)
                } else {
                    "-".into()
                },
                if pg {
                    num(m(&|w| w.sync_ms), 2)
                } else {
                    "-".into()
                },
                num(m(&|w| w.other_cores), 2),
            ]);
        }
    }
    table.print();
    let searched: Vec<&Run> = runs.iter().filter(|r| settings.saturates(r.kind)).collect();
    if !searched.is_empty() {
        println!();
        println!(
            "saturation: paced steps; a step passes with ≥ 99% arrived, p99 < 100 ms and ≥ 95% of the offered rate received during the step"
        );
        let mut table = Table::new(&[
            "server",
            "pushes/s",
            "offered/s",
            "achieved/s",
            "arrived",
            "p99 ms",
            "CPU µs/frame",
            "pg µs/push",
            "per commit",
            "failed pushes",
            "other cores",
            "pass",
        ]);
        for run in &searched {
            for w in &run.steps {
                table.row(vec![
                    run.name().to_string(),
                    num(w.push_rate, 0),
                    num(w.offered, 0),
                    num(w.achieved, 0),
                    format!("{}%", num(w.arrived * 100.0, 2)),
                    num(w.p99, 2),
                    num(w.cpu.0, 1),
                    num(w.pg_backend_per_push, 1),
                    num(w.per_commit, 1),
                    w.pushes_failed.to_string(),
                    num(w.other_cores, 2),
                    if w.passes() { "yes" } else { "no" }.to_string(),
                ]);
            }
        }
        table.print();
    }

    let targets = targets(settings, durable, runs);
    println!();
    report::print_targets(&targets);

    let json = json!({
        "bench": "fanout",
        "workload": settings.workload,
        "push_path": if settings.stream { "stream" } else { "post" },
        "machine": report::machine(),
        "store": if durable { "postgres" } else { "memory" },
        "tasks": settings.tasks, "subscribers_per_task": settings.subs,
        "connections": settings.connections(),
        "push_rates": settings.rates,
        "round_secs": settings.round.as_secs_f64(), "rounds": settings.rounds,
        "step_secs": settings.step.as_secs_f64(),
        "taskcast": taskcast.to_json(&settings.rates),
        "floors": runs[1..].iter().map(|r| r.to_json(&settings.rates)).collect::<Vec<_>>(),
        "targets": targets.iter().map(Target::to_json).collect::<Vec<_>>(),
    });
    let stem = settings.file_stem();
    let json_path = report::write_json(&format!("{stem}.json"), &json)?;
    let svg_path = report::write_file(&format!("{stem}.svg"), &plot(settings, runs))?;
    println!();
    println!(
        "figures: {}\nplot:    {}",
        json_path.display(),
        svg_path.display()
    );
    Ok(())
}

/// The issue's goals for this workload and store, against the HTTP floor in this run.
fn targets(settings: &Settings, durable: bool, runs: &[Run]) -> Vec<Target> {
    let taskcast = &runs[0];
    let single = settings.subs == 1;
    let limit = match (single, durable) {
        (true, false) => 1.5,
        (true, true) => 1.8,
        (false, false) => 1.15,
        (false, true) => 1.3,
    };
    let mut targets = Vec::new();
    if let Some(floor) = runs.iter().find(|r| r.kind == Kind::HttpFloor) {
        for &rate in &settings.rates {
            let (t, f) = (
                taskcast.median_at(rate, |w| w.cpu.0),
                floor.median_at(rate, |w| w.cpu.0),
            );
            targets.push(Target::new(
                &format!("CPU per frame vs HTTP floor at {} pushes/s", num(rate, 0)),
                format!("{} vs {} µs = {}×", num(t, 1), num(f, 1), num(t / f, 2)),
                &format!("≤ {limit}×"),
                t <= limit * f,
            ));
        }
    }
    if durable && single {
        for &rate in settings.rates.iter().filter(|&&r| r >= 10_000.0) {
            let pg = taskcast.median_at(rate, |w| w.pg_backend_per_push);
            targets.push(Target::new(
                &format!("Postgres CPU per push at {} pushes/s", num(rate, 0)),
                format!("{} µs", num(pg, 1)),
                "≤ 15 µs",
                pg <= 15.0,
            ));
        }
    }
    let first = settings.rates[0];
    let p99 = taskcast.median_at(first, |w| w.p99);
    targets.push(Target::new(
        &format!(
            "p99 push→receive at {} deliveries/s{}",
            num(first * settings.subs as f64, 0),
            if durable {
                ", commit included"
            } else {
                " (memory store)"
            }
        ),
        format!("{} ms", num(p99, 2)),
        "≤ 10 ms",
        p99 <= 10.0,
    ));
    if settings.saturates(Kind::Taskcast) {
        let sat = taskcast.sustainable();
        if single && durable {
            targets.push(Target::new(
                "sustained durable pushes, 1 subscriber each",
                format!("{}/s", num(sat, 0)),
                "≥ 18,000/s",
                sat >= 18_000.0,
            ));
        }
        if let Some(floor) = runs
            .iter()
            .find(|r| r.kind == Kind::HttpFloor && settings.saturates(r.kind))
        {
            let sat_f = floor.sustainable();
            targets.push(Target::new(
                "saturation vs HTTP floor",
                format!(
                    "{}/s vs {}/s = {}%",
                    num(sat, 0),
                    num(sat_f, 0),
                    num(sat / sat_f * 100.0, 0)
                ),
                "≥ 80%",
                sat >= 0.8 * sat_f,
            ));
        }
    }
    targets
}

fn plot(settings: &Settings, runs: &[Run]) -> String {
    let colors = [svg::BLUE, svg::GREY, svg::ORANGE];
    let first = settings.rates[0];
    let cpu = BarChart {
        title: format!(
            "Server CPU per delivered frame at {} pushes/s",
            num(first, 0)
        ),
        y_label: "µs of CPU per frame".into(),
        groups: runs
            .iter()
            .map(|run| {
                let bars = vec![
                    Bar::new("user", run.median_at(first, |w| w.cpu.1), svg::BLUE),
                    Bar::new("system", run.median_at(first, |w| w.cpu.2), svg::ORANGE),
                    Bar::new("total", run.median_at(first, |w| w.cpu.0), svg::GREY),
                ];
                (run.name().to_string(), bars)
            })
            .collect(),
        rules: vec![],
    };
    let points = |run: &Run, f: &dyn Fn(&Window) -> f64| -> Vec<(f64, f64)> {
        let mut points: Vec<(f64, f64)> = settings
            .rates
            .iter()
            .map(|&r| (run.median_at(r, |w| w.offered), run.median_at(r, f)))
            .chain(run.steps.iter().map(|w| (w.offered, f(w))))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points
    };
    let series = |f: &dyn Fn(&Window) -> f64| {
        runs.iter()
            .zip(colors)
            .map(|(run, color)| Series {
                name: run.name().into(),
                color,
                points: points(run, f),
            })
            .collect::<Vec<_>>()
    };
    let achieved = LineChart {
        title: "Delivered vs offered frames/s".into(),
        x_label: "offered deliveries/s".into(),
        y_label: "received frames/s".into(),
        series: series(&|w| w.achieved),
        rules: vec![],
        log_y: false,
        from_zero: true,
    };
    let latency = LineChart {
        title: "p99 push→receive latency".into(),
        x_label: "offered deliveries/s".into(),
        y_label: "p99 latency, ms (log)".into(),
        series: series(&|w| w.p99),
        rules: vec![
            Rule {
                y: MAX_P99_MS,
                label: "saturation limit 100 ms".into(),
                color: svg::RED,
            },
            Rule {
                y: 10.0,
                label: "target: 10 ms".into(),
                color: svg::GREEN,
            },
        ],
        log_y: true,
        from_zero: false,
    };
    let title = format!(
        "taskcast fan-out vs floors: {} tasks × {} subscribers",
        settings.tasks, settings.subs
    );
    svg::document(&title, &[cpu.render(), achieved.render(), latency.render()])
}
