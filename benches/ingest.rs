//! Ingest: committed updates per second with group commit, with one UPDATE per push
//! (TASKCAST_WRITE_MODE=naive), and through the batch endpoint `POST /api/progress`.
//!
//! Needs Postgres: a fresh `bench_<uuid>` database is created next to
//! TASKCAST_BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres),
//! migrated with `taskcast migrate`, seeded with `BENCH_DB_TASKS` rows (default 10,000),
//! and dropped at the end. Each round starts the release `taskcast` binary once per write
//! mode against that same database; in each, `BENCH_PUSHERS` (64) closed-loop pushers send
//! single pushes for `BENCH_SECS` (5), then batches of `BENCH_BATCH` (100) updates for as
//! long. A push counts as committed when its answer is 200 with `"applied":true` (it is
//! sent only after the commit). Reported: medians over `BENCH_ROUNDS` (3) rounds.
//!
//! ```text
//! cargo bench --bench ingest
//! ```

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use common::postgres::{self, BenchDatabase};
use common::proc::{CpuDelta, cpu_by_command, cpu_used};
use common::report::{self, Progress, Table, Target, jnum, num};
use common::server::Server;
use common::stats::{Histogram, median};
use common::svg::{self, Bar, BarChart, Rule};
use common::{BoxError, PUSH_KEY, env_secs, env_usize};

struct Settings {
    pushers: usize,
    duration: Duration,
    rounds: usize,
    batch: usize,
    rows: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Group,
    Naive,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Group => "group",
            Mode::Naive => "naive",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    /// `POST /api/tasks/{id}/progress`, one update per request.
    Single,
    /// `POST /api/progress`, `batch` updates per request.
    Batch,
}

/// One phase: a mode, an endpoint, and what came of it.
struct Phase {
    mode: Mode,
    endpoint: Endpoint,
    committed_per_sec: f64,
    ack_p50: f64,
    ack_p99: f64,
    server_us_per_update: f64,
    postgres_us_per_update: f64,
    errors: u64,
}

impl Phase {
    fn label(&self) -> String {
        match self.endpoint {
            Endpoint::Single => format!("{} single", self.mode.name()),
            Endpoint::Batch => format!("{} batch", self.mode.name()),
        }
    }
}

fn main() -> Result<(), BoxError> {
    let settings = Settings {
        pushers: env_usize("BENCH_PUSHERS", 64),
        duration: env_secs("BENCH_SECS", 5.0),
        rounds: env_usize("BENCH_ROUNDS", 3),
        batch: env_usize("BENCH_BATCH", 100),
        rows: env_usize("BENCH_DB_TASKS", 10_000),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let admin = postgres::admin_url();
        if !postgres::answers(&admin).await {
            return Err(format!(
                "ingest needs Postgres: {admin} does not answer (set TASKCAST_BENCH_DATABASE_URL)"
            )
            .into());
        }
        let db = BenchDatabase::create(&admin).await?;
        let result = tokio::select! {
            r = bench(&settings, &db) => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        };
        db.drop_database().await;
        result
    })
}

async fn bench(settings: &Settings, db: &BenchDatabase) -> Result<(), BoxError> {
    let rows = settings.rows.max(settings.pushers * settings.batch);
    let client = db.connect().await?;
    let ids: Vec<String> = client
        .query(
            "INSERT INTO public.image_tasks (status) SELECT 'processing' \
             FROM generate_series(1, $1::int) RETURNING id::text",
            &[&(rows as i32)],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    client
        .batch_execute("VACUUM ANALYZE public.image_tasks")
        .await?;
    eprintln!(
        "ingest: {} pushers, {} rows, {} s per phase, batches of {}, {} rounds",
        settings.pushers,
        rows,
        settings.duration.as_secs_f64(),
        settings.batch,
        settings.rounds
    );
    let ids = Arc::new(ids);
    let progress = Progress::new("ingest");
    let mut phases = Vec::new();
    for round in 0..settings.rounds {
        // Alternate which mode goes first so a drift in the machine favours neither.
        let order = if round % 2 == 0 {
            [Mode::Group, Mode::Naive]
        } else {
            [Mode::Naive, Mode::Group]
        };
        for mode in order {
            let env = [
                ("DATABASE_URL", db.url.clone()),
                ("TASKCAST_WRITE_MODE", mode.name().to_string()),
            ];
            let mut server = Server::taskcast(&format!("ingest-{}", mode.name()), &env).await?;
            for endpoint in [Endpoint::Single, Endpoint::Batch] {
                let label = format!("round {}/{}", round + 1, settings.rounds);
                phases
                    .push(phase(settings, &server, &ids, mode, endpoint, &progress, &label).await?);
                server.check_alive()?;
            }
            server.stop().await;
        }
    }
    progress.finish("done");
    report(settings, rows, &phases)
}

/// Runs the pushers against one server for one endpoint.
async fn phase(
    settings: &Settings,
    server: &Server,
    ids: &Arc<Vec<String>>,
    mode: Mode,
    endpoint: Endpoint,
    progress: &Progress,
    round: &str,
) -> Result<Phase, BoxError> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(settings.pushers)
        .timeout(Duration::from_secs(30))
        .build()?;
    let committed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let ack = Arc::new(Histogram::default());
    let (server0, pg0) = (server.sample()?, cpu_by_command("postgres"));
    let started = Instant::now();
    let deadline = started + settings.duration;
    let mut pushers = Vec::new();
    for p in 0..settings.pushers {
        let worker = Worker {
            client: client.clone(),
            base: format!("http://{}", server.addr),
            ids: ids.clone(),
            committed: committed.clone(),
            errors: errors.clone(),
            ack: ack.clone(),
        };
        let (pushers_n, batch) = (settings.pushers, settings.batch);
        pushers.push(tokio::spawn(async move {
            match endpoint {
                Endpoint::Single => worker.singles(p, pushers_n, deadline).await,
                Endpoint::Batch => worker.batches(p, batch, deadline).await,
            }
        }));
    }
    let what = format!(
        "{round}: {} {}",
        mode.name(),
        if endpoint == Endpoint::Batch {
            "batch"
        } else {
            "single"
        }
    );
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let rate = committed.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        progress.update(&format!("{what}: {} committed/s", num(rate, 0)));
    }
    for pusher in pushers {
        pusher.await?;
    }
    let elapsed = started.elapsed();
    let (server1, pg1) = (server.sample()?, cpu_by_command("postgres"));
    let n = committed.load(Ordering::Relaxed);
    Ok(Phase {
        mode,
        endpoint,
        committed_per_sec: n as f64 / elapsed.as_secs_f64(),
        ack_p50: ack.quantile_ms(0.5),
        ack_p99: ack.quantile_ms(0.99),
        server_us_per_update: CpuDelta::between(&server0, &server1).per(n).0,
        postgres_us_per_update: cpu_used(&pg0, &pg1).as_secs_f64() * 1e6 / n.max(1) as f64,
        errors: errors.load(Ordering::Relaxed),
    })
}

/// One closed-loop pusher: sends the next request when the previous one is answered.
struct Worker {
    client: reqwest::Client,
    base: String,
    ids: Arc<Vec<String>>,
    committed: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    ack: Arc<Histogram>,
}

fn update_fields(n: u64) -> String {
    format!(
        r#""progress":{},"stage":"sampling step {}/50, dpm++ 2m karras, cfg 7.0","status":"processing""#,
        n % 100,
        n % 50 + 1
    )
}

impl Worker {
    /// Pushes to tasks `p`, `p + stride`, ... in turn, one at a time.
    async fn singles(self, p: usize, stride: usize, deadline: Instant) {
        let mine: Vec<&String> = self.ids.iter().skip(p).step_by(stride).collect();
        let mut n = 0u64;
        while Instant::now() < deadline {
            let id = mine[n as usize % mine.len()];
            let url = format!("{}/api/tasks/{id}/progress", self.base);
            let body = format!("{{{}}}", update_fields(n));
            let sent = Instant::now();
            let answer = self.send(&url, body).await;
            match answer {
                Some(text) if text.contains(r#""applied":true"#) => {
                    self.ack.record(sent.elapsed());
                    self.committed.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            n += 1;
        }
    }

    /// Posts batches of `size` updates for this pusher's own `size` tasks.
    async fn batches(self, p: usize, size: usize, deadline: Instant) {
        let mine = &self.ids[p * size..(p + 1) * size];
        let url = format!("{}/api/progress", self.base);
        let mut n = 0u64;
        while Instant::now() < deadline {
            let items: Vec<String> = mine
                .iter()
                .map(|id| format!(r#"{{"task_id":"{id}",{}}}"#, update_fields(n)))
                .collect();
            let body = format!(r#"{{"updates":[{}]}}"#, items.join(","));
            let sent = Instant::now();
            match self.send(&url, body).await {
                Some(text) => {
                    let ok = text.matches(r#"{"status":200"#).count() as u64;
                    self.ack.record(sent.elapsed());
                    self.committed.fetch_add(ok, Ordering::Relaxed);
                    self.errors
                        .fetch_add(size as u64 - ok.min(size as u64), Ordering::Relaxed);
                }
                None => {
                    self.errors.fetch_add(size as u64, Ordering::Relaxed);
                }
            }
            n += 1;
        }
    }

    /// The answer's body if it is a 200.
    async fn send(&self, url: &str, body: String) -> Option<String> {
        let response = self
            .client
            .post(url)
            .bearer_auth(PUSH_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.text().await.ok()
    }
}

fn report(settings: &Settings, rows: usize, phases: &[Phase]) -> Result<(), BoxError> {
    let kinds = [
        (Mode::Naive, Endpoint::Single),
        (Mode::Group, Endpoint::Single),
        (Mode::Group, Endpoint::Batch),
        (Mode::Naive, Endpoint::Batch),
    ];
    let of = |mode, endpoint| {
        phases
            .iter()
            .filter(move |p| p.mode == mode && p.endpoint == endpoint)
    };
    let med = |mode, endpoint, f: &dyn Fn(&Phase) -> f64| median(of(mode, endpoint).map(f));
    println!();
    println!(
        "ingest: {} pushers, {} rows, {} rounds of {:.0} s per phase (medians); batches of {} updates",
        settings.pushers,
        rows,
        settings.rounds,
        settings.duration.as_secs_f64(),
        settings.batch
    );
    let mut table = Table::new(&[
        "write mode / endpoint",
        "committed/s",
        "ack p50 ms",
        "ack p99 ms",
        "server µs/update",
        "postgres µs/update",
        "errors",
    ]);
    let mut summary = Vec::new();
    for (mode, endpoint) in kinds {
        let label = of(mode, endpoint)
            .next()
            .map(Phase::label)
            .unwrap_or_default();
        let row = (
            med(mode, endpoint, &|p| p.committed_per_sec),
            med(mode, endpoint, &|p| p.ack_p50),
            med(mode, endpoint, &|p| p.ack_p99),
            med(mode, endpoint, &|p| p.server_us_per_update),
            med(mode, endpoint, &|p| p.postgres_us_per_update),
            of(mode, endpoint).map(|p| p.errors).sum::<u64>(),
        );
        table.row(vec![
            label.clone(),
            num(row.0, 0),
            num(row.1, 2),
            num(row.2, 2),
            num(row.3, 1),
            num(row.4, 1),
            row.5.to_string(),
        ]);
        summary.push(json!({
            "mode": mode.name(), "endpoint": if endpoint == Endpoint::Batch { "POST /api/progress" } else { "POST /api/tasks/{id}/progress" },
            "committed_per_sec": jnum(row.0), "ack_p50_ms": jnum(row.1), "ack_p99_ms": jnum(row.2),
            "server_cpu_us_per_update": jnum(row.3), "postgres_cpu_us_per_update": jnum(row.4),
            "errors": row.5,
            "rounds": of(mode, endpoint).map(|p| jnum(p.committed_per_sec)).collect::<Vec<_>>(),
        }));
    }
    table.print();
    let naive = med(Mode::Naive, Endpoint::Single, &|p| p.committed_per_sec);
    let group = med(Mode::Group, Endpoint::Single, &|p| p.committed_per_sec);
    let batch = med(Mode::Group, Endpoint::Batch, &|p| p.committed_per_sec);
    let targets = [
        Target::new(
            "group commit ≥ 4× naive",
            format!(
                "{}/s vs {}/s = {}×",
                num(group, 0),
                num(naive, 0),
                num(group / naive, 1)
            ),
            "≥ 4×",
            group >= 4.0 * naive,
        ),
        Target::new(
            "batch endpoint ≥ 10× naive",
            format!(
                "{}/s vs {}/s = {}×",
                num(batch, 0),
                num(naive, 0),
                num(batch / naive, 1)
            ),
            "≥ 10×",
            batch >= 10.0 * naive,
        ),
    ];
    println!();
    report::print_targets(&targets);

    let json = json!({
        "bench": "ingest", "machine": report::machine(),
        "pushers": settings.pushers, "rows": rows, "phase_secs": settings.duration.as_secs_f64(),
        "rounds": settings.rounds, "batch_size": settings.batch,
        "results": summary,
        "targets": targets.iter().map(Target::to_json).collect::<Vec<_>>(),
    });
    let json_path = report::write_json("ingest.json", &json)?;
    let throughput = BarChart {
        title: "Committed updates per second".into(),
        y_label: "updates/s".into(),
        groups: vec![
            (
                "naive, single".into(),
                vec![Bar::new("committed/s", naive, svg::GREY)],
            ),
            (
                "group, single".into(),
                vec![Bar::new("committed/s", group, svg::BLUE)],
            ),
            (
                "group, batch".into(),
                vec![Bar::new("committed/s", batch, svg::GREEN)],
            ),
            (
                "naive, batch".into(),
                vec![Bar::new(
                    "committed/s",
                    med(Mode::Naive, Endpoint::Batch, &|p| p.committed_per_sec),
                    svg::GREY,
                )],
            ),
        ],
        rules: vec![
            Rule {
                y: 4.0 * naive,
                label: "target 4× naive".into(),
                color: svg::ORANGE,
            },
            Rule {
                y: 10.0 * naive,
                label: "target 10× naive".into(),
                color: svg::RED,
            },
        ],
    };
    let latency = BarChart {
        title: "Acknowledgement latency (per request)".into(),
        y_label: "ms".into(),
        groups: kinds
            .iter()
            .map(|&(mode, endpoint)| {
                let name = format!(
                    "{}, {}",
                    mode.name(),
                    if endpoint == Endpoint::Batch {
                        "batch"
                    } else {
                        "single"
                    }
                );
                let bars = vec![
                    Bar::new("p50", med(mode, endpoint, &|p| p.ack_p50), svg::BLUE),
                    Bar::new("p99", med(mode, endpoint, &|p| p.ack_p99), svg::ORANGE),
                ];
                (name, bars)
            })
            .collect(),
        rules: vec![],
    };
    let title = format!("taskcast ingest: {} pushers, Postgres", settings.pushers);
    let svg_path = report::write_file(
        "ingest.svg",
        &svg::document(&title, &[throughput.render(), latency.render()]),
    )?;
    println!();
    println!(
        "figures: {}\nplot:    {}",
        json_path.display(),
        svg_path.display()
    );
    Ok(())
}
