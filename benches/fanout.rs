//! Fan-out: what one delivered progress frame costs taskcast, next to the floor.
//!
//! Starts the release `taskcast` binary, creates `BENCH_TASKS` tasks (default 1,000) and
//! opens `BENCH_SUBS` WebSockets to each (default 10: 10,000 connections), then pushes one
//! update per task per second (10,000 deliveries/s) over HTTP. Measured: deliveries/s
//! achieved vs offered, push→receive latency (p50/p99/p999, commit included), server CPU
//! per delivered frame and server RSS, from /proc. Then the same load against the floor, a
//! minimal tokio-tungstenite broadcaster built into this bench (see `common/floor.rs`),
//! run as its own process. Then a saturation ladder for both, refined by two bisection
//! steps: the highest paced rate at which ≥ 99% of the frames arrive with p99 < 100 ms,
//! received at ≥ 95% of the offered pace.
//!
//! ```text
//! cargo bench --bench fanout
//! BENCH_TASKS=200 BENCH_SUBS=5 BENCH_STORE=memory cargo bench --bench fanout
//! ```
//!
//! Settings (environment): BENCH_TASKS, BENCH_SUBS, BENCH_STORE (auto | postgres |
//! memory; auto uses Postgres when TASKCAST_BENCH_DATABASE_URL, default
//! postgres://postgres@127.0.0.1:5432/postgres, answers), BENCH_WARMUP_SECS (3),
//! BENCH_ROUNDS (3) × BENCH_ROUND_SECS (5) at the default rate, BENCH_STEP_SECS (4) per
//! saturation step, BENCH_SATURATION=0 to skip the ladder; TASKCAST_BIN runs another
//! taskcast binary, BENCH_WRAPPER (say `valgrind --tool=callgrind`) runs both servers under
//! a profiler. Figures go to `target/bench/fanout.{json,svg}` (or under CARGO_TARGET_DIR),
//! with the servers' logs.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::load::{LoadStats, MAX_PHASES, PushTarget, Pusher, Subscribe, Subscribers, epoch};
use common::postgres::{self, BenchDatabase};
use common::proc::{CpuDelta, Proc, cpu_by_command, cpu_used, machine_busy};
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

struct Settings {
    tasks: usize,
    subs: usize,
    warmup: Duration,
    rounds: usize,
    round: Duration,
    step: Duration,
    saturation: bool,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            tasks: env_usize("BENCH_TASKS", 1000),
            subs: env_usize("BENCH_SUBS", 10),
            warmup: env_secs("BENCH_WARMUP_SECS", 3.0),
            rounds: env_usize("BENCH_ROUNDS", 3).min(8),
            round: env_secs("BENCH_ROUND_SECS", 5.0),
            step: env_secs("BENCH_STEP_SECS", 4.0),
            saturation: std::env::var("BENCH_SATURATION").map_or(true, |v| v.trim() != "0"),
        }
    }

    /// Pushes per second at the default load: one per task.
    fn push_rate(&self) -> f64 {
        self.tasks as f64
    }

    fn connections(&self) -> usize {
        self.tasks * self.subs
    }
}

/// One measured stretch at a fixed rate.
struct Window {
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
    /// The bench process's own CPU per received frame (µs).
    load_cpu: f64,
    pushes_failed: u64,
    ack_p50: f64,
    ack_p99: f64,
    /// Cores busy with Postgres during the window.
    postgres_cores: f64,
    /// Cores busy with anything else on the machine (other builds, tests...): noise.
    other_cores: f64,
}

impl Window {
    fn passes(&self) -> bool {
        self.arrived >= MIN_ARRIVED
            && self.p99 < MAX_P99_MS
            && self.achieved >= MIN_PACE * self.offered
    }

    fn to_json(&self) -> Value {
        json!({
            "offered_per_sec": jnum(self.offered), "achieved_per_sec": jnum(self.achieved),
            "arrived_share": jnum(self.arrived),
            "latency_ms": {"p50": jnum(self.p50), "p99": jnum(self.p99), "p999": jnum(self.p999)},
            "server_cpu_us_per_frame": jnum(self.cpu.0),
            "server_user_us_per_frame": jnum(self.cpu.1),
            "server_system_us_per_frame": jnum(self.cpu.2),
            "load_cpu_us_per_frame": jnum(self.load_cpu),
            "pushes_failed": self.pushes_failed,
            "ack_ms": {"p50": jnum(self.ack_p50), "p99": jnum(self.ack_p99)},
            "postgres_cores": jnum(self.postgres_cores),
            "other_cores": jnum(self.other_cores),
        })
    }
}

/// Everything measured against one server.
struct Run {
    name: String,
    rounds: Vec<Window>,
    /// The ladder's steps, then the bisection steps after it.
    steps: Vec<Window>,
    ladder_len: usize,
    rss_kib: u64,
    lost: u64,
}

impl Run {
    fn median(&self, f: impl Fn(&Window) -> f64) -> f64 {
        median(self.rounds.iter().map(f))
    }

    /// The highest rate that passed: on the ladder before two failures in a row (the
    /// default rate counts as the first step), or in the bisection after it.
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
        let mut best = if self.rounds.iter().filter(|w| w.passes()).count() * 2 > self.rounds.len()
        {
            self.median(|w| w.offered)
        } else {
            0.0
        };
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

    fn to_json(&self) -> Value {
        json!({
            "server": self.name,
            "default_load_median": {
                "offered_per_sec": jnum(self.median(|w| w.offered)),
                "achieved_per_sec": jnum(self.median(|w| w.achieved)),
                "arrived_share": jnum(self.median(|w| w.arrived)),
                "latency_ms": {"p50": jnum(self.median(|w| w.p50)), "p99": jnum(self.median(|w| w.p99)), "p999": jnum(self.median(|w| w.p999))},
                "server_cpu_us_per_frame": jnum(self.median(|w| w.cpu.0)),
                "load_cpu_us_per_frame": jnum(self.median(|w| w.load_cpu)),
            },
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
        let url = db.as_ref().map(|d| d.url.clone());
        let result = tokio::select! {
            r = bench(&settings, url) => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        };
        if let Some(db) = db {
            db.drop_database().await;
        }
        result
    })
}

async fn bench(settings: &Settings, database_url: Option<String>) -> Result<(), BoxError> {
    let store = if database_url.is_some() {
        "postgres (each push committed before it is fanned out)"
    } else {
        "memory (no DATABASE_URL: no durable commit in the path)"
    };
    eprintln!(
        "fanout: {} tasks × {} subscribers = {} WebSockets, {} deliveries/s offered; store: {store}",
        settings.tasks,
        settings.subs,
        settings.connections(),
        num(settings.push_rate() * settings.subs as f64, 0)
    );
    let mut env = vec![
        ("TASKCAST_MAX_CONNECTIONS", "19000".to_string()),
        ("TASKCAST_MAX_SUBSCRIBES_PER_SEC", "100000".to_string()),
        ("TASKCAST_IDLE_TIMEOUT_SECS", "3600".to_string()),
    ];
    if let Some(url) = &database_url {
        env.push(("DATABASE_URL", url.clone()));
    }
    let server = Server::taskcast("fanout-taskcast", &env).await?;
    let taskcast = measure(settings, server, true).await?;
    let server = Server::floor("fanout-floor").await?;
    let floor = measure(settings, server, false).await?;
    report(settings, store, database_url.is_some(), &taskcast, &floor)
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
}

/// Connects the subscribers, runs the default-rate rounds and the saturation ladder.
async fn measure(settings: &Settings, mut server: Server, taskcast: bool) -> Result<Run, BoxError> {
    let name = if taskcast { "taskcast" } else { "floor" };
    eprintln!("{name}: pid {}, log {}", server.pid(), server.log.display());
    let progress = Progress::new(&format!("fanout {name}"));
    let (subscribe, target) = if taskcast {
        create_tasks(&server, settings, &progress).await?
    } else {
        floor_topics(&server, settings)
    };
    let stats = Arc::new(LoadStats::default());
    let subscribers = Subscribers::open(subscribe, stats.clone(), 200, &progress).await?;
    let load = Load {
        server: &server,
        this: Proc::this(),
        stats: stats.clone(),
        pusher: Pusher::new(target, 256)?,
        progress,
        subs: settings.subs as f64,
    };
    let rate = settings.push_rate();
    load.window("warm-up", rate, settings.warmup, 0).await?;

    let mut run = Run {
        name: name.to_string(),
        rounds: Vec::new(),
        steps: Vec::new(),
        ladder_len: 0,
        rss_kib: 0,
        lost: 0,
    };
    let mut pending = Vec::new();
    for round in 1..=settings.rounds {
        let label = format!("round {round}/{} at 1×", settings.rounds);
        pending.push(load.window(&label, rate, settings.round, round).await?);
    }
    drain(&stats).await;
    run.rss_kib = server.sample()?.rss_kib;
    for (round, (w, scheduled)) in pending.into_iter().enumerate() {
        run.rounds.push(load.finish(w, round + 1, scheduled));
    }

    if settings.saturation {
        let mut fails = 0;
        for (i, multiple) in ladder().enumerate() {
            let phase = settings.rounds + 1 + i;
            if phase >= MAX_PHASES {
                break;
            }
            let label = format!("saturation {multiple:.0}×");
            let (w, scheduled) = load
                .window(&label, rate * multiple, settings.step, phase)
                .await?;
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
            let phase = settings.rounds + 1 + run.steps.len();
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
        let (server0, machine0, pg0) = (
            self.server.sample()?,
            machine_busy(),
            cpu_by_command("postgres"),
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
        let (server1, machine1, pg1) = (
            self.server.sample()?,
            machine_busy(),
            cpu_by_command("postgres"),
        );
        let frames = arrivals1 - arrivals0;
        let secs = elapsed.as_secs_f64();
        let server_cpu = CpuDelta::between(&server0, &server1);
        let load_cpu = CpuDelta::between(&this0, &this1);
        let postgres = cpu_used(&pg0, &pg1).as_secs_f64();
        let busy = machine1.saturating_sub(machine0).as_secs_f64();
        let others =
            busy - server_cpu.total().as_secs_f64() - load_cpu.total().as_secs_f64() - postgres;
        let window = Window {
            offered: push_rate * self.subs,
            achieved: frames as f64 / secs,
            arrived: f64::NAN,
            p50: f64::NAN,
            p99: f64::NAN,
            p999: f64::NAN,
            cpu: server_cpu.per(frames),
            load_cpu: load_cpu.per(frames).0,
            pushes_failed: pushed.failed,
            ack_p50: pushed.ack.quantile_ms(0.5),
            ack_p99: pushed.ack.quantile_ms(0.99),
            postgres_cores: postgres / secs,
            other_cores: (others / secs).max(0.0),
        };
        Ok((window, pushed.scheduled))
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
    let target = PushTarget {
        urls: created
            .iter()
            .map(|(id, _)| format!("http://{addr}/api/tasks/{id}/progress"))
            .collect(),
        authorization: Some(format!("Bearer {PUSH_KEY}")),
    };
    Ok((subscribe, target))
}

fn floor_topics(server: &Server, settings: &Settings) -> (Vec<Subscribe>, PushTarget) {
    let (ws, push) = (server.addr, server.push_addr);
    let subscribe = (0..settings.subs)
        .flat_map(|_| 0..settings.tasks)
        .map(|topic| Subscribe {
            url: format!("ws://{ws}/ws/{topic}"),
            server: ws,
            source: None,
        })
        .collect();
    let target = PushTarget {
        urls: (0..settings.tasks)
            .map(|topic| format!("http://{push}/push/{topic}"))
            .collect(),
        authorization: None,
    };
    (subscribe, target)
}

fn report(
    settings: &Settings,
    store: &str,
    durable: bool,
    taskcast: &Run,
    floor: &Run,
) -> Result<(), BoxError> {
    println!();
    println!(
        "fanout: {} tasks × {} subscribers, {} rounds of {:.0} s at the default rate (medians); store: {store}",
        settings.tasks,
        settings.subs,
        settings.rounds,
        settings.round.as_secs_f64()
    );
    let mut table = Table::new(&[
        "server",
        "offered/s",
        "achieved/s",
        "arrived",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "CPU µs/frame",
        "user",
        "sys",
        "RSS MiB",
        "ack p99 ms",
        "load µs/frame",
        "pg cores",
        "other cores",
    ]);
    for run in [taskcast, floor] {
        table.row(vec![
            run.name.clone(),
            num(run.median(|w| w.offered), 0),
            num(run.median(|w| w.achieved), 0),
            format!("{}%", num(run.median(|w| w.arrived) * 100.0, 2)),
            num(run.median(|w| w.p50), 2),
            num(run.median(|w| w.p99), 2),
            num(run.median(|w| w.p999), 2),
            num(run.median(|w| w.cpu.0), 1),
            num(run.median(|w| w.cpu.1), 1),
            num(run.median(|w| w.cpu.2), 1),
            num(run.rss_kib as f64 / 1024.0, 1),
            num(run.median(|w| w.ack_p99), 2),
            num(run.median(|w| w.load_cpu), 1),
            num(run.median(|w| w.postgres_cores), 2),
            num(run.median(|w| w.other_cores), 2),
        ]);
    }
    table.print();
    if settings.saturation {
        println!();
        println!(
            "saturation: paced steps; a step passes with ≥ 99% arrived, p99 < 100 ms and ≥ 95% of the offered rate received during the step"
        );
        let mut table = Table::new(&[
            "server",
            "offered/s",
            "achieved/s",
            "arrived",
            "p99 ms",
            "CPU µs/frame",
            "failed pushes",
            "other cores",
            "pass",
        ]);
        for run in [taskcast, floor] {
            for w in &run.steps {
                table.row(vec![
                    run.name.clone(),
                    num(w.offered, 0),
                    num(w.achieved, 0),
                    format!("{}%", num(w.arrived * 100.0, 2)),
                    num(w.p99, 2),
                    num(w.cpu.0, 1),
                    w.pushes_failed.to_string(),
                    num(w.other_cores, 2),
                    if w.passes() { "yes" } else { "no" }.to_string(),
                ]);
            }
        }
        table.print();
    }

    let (cpu_t, cpu_f) = (taskcast.median(|w| w.cpu.0), floor.median(|w| w.cpu.0));
    let (sat_t, sat_f) = (taskcast.sustainable(), floor.sustainable());
    let p99 = taskcast.median(|w| w.p99);
    let mut targets = vec![
        Target::new(
            "fan-out CPU per frame ≤ 1.25× floor",
            format!(
                "{} vs {} µs = {}×",
                num(cpu_t, 1),
                num(cpu_f, 1),
                num(cpu_t / cpu_f, 2)
            ),
            "≤ 1.25×",
            cpu_t <= 1.25 * cpu_f,
        ),
        Target::new(
            if durable {
                "p99 push→receive, commit included"
            } else {
                "p99 push→receive (memory store)"
            },
            format!("{} ms", num(p99, 2)),
            "≤ 10 ms",
            p99 <= 10.0,
        ),
    ];
    if settings.saturation {
        targets.push(Target::new(
            "saturation ≥ 80% of floor",
            format!(
                "{}/s vs {}/s = {}%",
                num(sat_t, 0),
                num(sat_f, 0),
                num(sat_t / sat_f * 100.0, 0)
            ),
            "≥ 80%",
            sat_t >= 0.8 * sat_f,
        ));
    }
    println!();
    report::print_targets(&targets);

    let json = json!({
        "bench": "fanout",
        "machine": report::machine(),
        "store": if durable { "postgres" } else { "memory" },
        "tasks": settings.tasks, "subscribers_per_task": settings.subs,
        "connections": settings.connections(),
        "round_secs": settings.round.as_secs_f64(), "rounds": settings.rounds,
        "step_secs": settings.step.as_secs_f64(),
        "taskcast": taskcast.to_json(), "floor": floor.to_json(),
        "targets": targets.iter().map(Target::to_json).collect::<Vec<_>>(),
    });
    let json_path = report::write_json("fanout.json", &json)?;
    let svg_path = report::write_file("fanout.svg", &plot(settings, taskcast, floor))?;
    println!();
    println!(
        "figures: {}\nplot:    {}",
        json_path.display(),
        svg_path.display()
    );
    Ok(())
}

fn plot(settings: &Settings, taskcast: &Run, floor: &Run) -> String {
    let cpu_f = floor.median(|w| w.cpu.0);
    let cpu = BarChart {
        title: "Server CPU per delivered frame (default load)".into(),
        y_label: "µs of CPU per frame".into(),
        groups: [taskcast, floor]
            .iter()
            .map(|run| {
                let bars = vec![
                    Bar::new("user", run.median(|w| w.cpu.1), svg::BLUE),
                    Bar::new("system", run.median(|w| w.cpu.2), svg::ORANGE),
                    Bar::new("total", run.median(|w| w.cpu.0), svg::GREY),
                ];
                (run.name.clone(), bars)
            })
            .collect(),
        rules: vec![Rule {
            y: 1.25 * cpu_f,
            label: "target: 1.25× floor".into(),
            color: svg::RED,
        }],
    };
    let points = |run: &Run, f: &dyn Fn(&Window) -> f64| -> Vec<(f64, f64)> {
        let first = (run.median(|w| w.offered), run.median(f));
        let mut points: Vec<(f64, f64)> = std::iter::once(first)
            .chain(run.steps.iter().map(|w| (w.offered, f(w))))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points
    };
    let series = |f: &dyn Fn(&Window) -> f64| {
        vec![
            Series {
                name: "taskcast".into(),
                color: svg::BLUE,
                points: points(taskcast, f),
            },
            Series {
                name: "floor".into(),
                color: svg::GREY,
                points: points(floor, f),
            },
        ]
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
                label: "target at default load: 10 ms".into(),
                color: svg::GREEN,
            },
        ],
        log_y: true,
        from_zero: false,
    };
    let title = format!(
        "taskcast fan-out vs floor: {} tasks × {} subscribers",
        settings.tasks, settings.subs
    );
    svg::document(&title, &[cpu.render(), achieved.render(), latency.render()])
}
