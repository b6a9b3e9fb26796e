//! Connections: server RSS per idle subscribed WebSocket, at 1k, 5k and 15k connections.
//!
//! Starts the release `taskcast` binary (in-memory store), creates one task per
//! `BENCH_SUBS_PER_TASK` (default 1) connections, reads the server's RSS from
//! /proc/<pid>/status as the baseline, then opens subscribed connections in steps up to
//! each level of `BENCH_LEVELS` (default 1000,2500,5000,10000,15000), letting the server
//! settle `BENCH_SETTLE_SECS` (3) before each reading. Each connection waits for its
//! snapshot, so every one is subscribed. Connections come from 127.0.0.2, 127.0.0.3, ...
//! (`BENCH_PER_SOURCE`, 5,000 each) so no source address runs short of ports; the server
//! must stay under its ~20,000 open files, the bench process likewise.
//! The floor (a minimal tokio-tungstenite server with a 4 KiB read buffer, see
//! `common/floor.rs`) is measured the same way for comparison; BENCH_FLOOR=0 skips it.
//!
//! ```text
//! cargo bench --bench connections
//! ```

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use common::load::{LoadStats, Subscribe, Subscribers};
use common::report::{self, Progress, Table, Target, jnum, num};
use common::server::Server;
use common::svg::{self, LineChart, Rule, Series};
use common::{BoxError, PUSH_KEY, env_secs, env_usize};

/// The most an idle subscribed connection may cost, in KiB.
const TARGET_KIB: f64 = 4.0;
/// The levels the targets are checked at.
const CHECKED: [usize; 3] = [1000, 5000, 15000];

struct Settings {
    levels: Vec<usize>,
    subs_per_task: usize,
    settle: Duration,
    per_source: usize,
    floor: bool,
}

/// RSS at one number of connections.
struct Level {
    connections: usize,
    rss_kib: u64,
    /// (RSS − baseline) / connections.
    kib_per_conn: f64,
    /// RSS growth since the previous level, per connection added.
    marginal_kib: f64,
}

struct Run {
    name: String,
    baseline_kib: u64,
    levels: Vec<Level>,
}

impl Run {
    fn at(&self, connections: usize) -> Option<&Level> {
        self.levels.iter().find(|l| l.connections == connections)
    }

    fn to_json(&self) -> Value {
        json!({
            "server": self.name,
            "baseline_rss_kib": self.baseline_kib,
            "levels": self.levels.iter().map(|l| json!({
                "connections": l.connections, "rss_kib": l.rss_kib,
                "kib_per_connection": jnum(l.kib_per_conn), "marginal_kib_per_connection": jnum(l.marginal_kib),
            })).collect::<Vec<_>>(),
        })
    }
}

fn main() -> Result<(), BoxError> {
    if std::env::args().any(|a| a == "--floor-server") {
        return common::floor::run();
    }
    let mut levels: Vec<usize> = std::env::var("BENCH_LEVELS")
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|n| n.trim().parse().ok())
                .filter(|&n| n > 0)
                .collect()
        })
        .unwrap_or_else(|| vec![1000, 2500, 5000, 10_000, 15_000]);
    levels.sort_unstable();
    levels.dedup();
    let settings = Settings {
        levels,
        subs_per_task: env_usize("BENCH_SUBS_PER_TASK", 1),
        settle: env_secs("BENCH_SETTLE_SECS", 3.0),
        per_source: env_usize("BENCH_PER_SOURCE", 5000),
        floor: std::env::var("BENCH_FLOOR").map_or(true, |v| v.trim() != "0"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut runs = Vec::new();
        let max = *settings.levels.last().ok_or("BENCH_LEVELS is empty")?;
        let env = [
            ("TASKCAST_MAX_CONNECTIONS", (max + 1000).to_string()),
            ("TASKCAST_MAX_SUBSCRIBES_PER_SEC", "100000".to_string()),
            ("TASKCAST_IDLE_TIMEOUT_SECS", "3600".to_string()),
        ];
        let server = Server::taskcast("connections-taskcast", &env).await?;
        runs.push(measure(&settings, server, true).await?);
        if settings.floor {
            let server = Server::floor("connections-floor").await?;
            runs.push(measure(&settings, server, false).await?);
        }
        report(&settings, &runs)
    })
}

async fn measure(settings: &Settings, mut server: Server, taskcast: bool) -> Result<Run, BoxError> {
    let name = if taskcast { "taskcast" } else { "floor" };
    let progress = Progress::new(&format!("connections {name}"));
    let max = *settings.levels.last().ok_or("no levels")?;
    let tasks = max.div_ceil(settings.subs_per_task);
    let urls = if taskcast {
        create_tasks(&server, tasks, &progress).await?
    } else {
        (0..tasks)
            .map(|t| format!("ws://{}/ws/{t}", server.addr))
            .collect()
    };
    tokio::time::sleep(settings.settle).await;
    let baseline_kib = server.sample()?.rss_kib;
    let stats = Arc::new(LoadStats::default());
    let mut open = Vec::new();
    let mut levels: Vec<Level> = Vec::new();
    let mut connected = 0;
    for &level in &settings.levels {
        let specs = (connected..level)
            .map(|i| Subscribe {
                url: urls[i % tasks].clone(),
                server: server.addr,
                source: Some(Ipv4Addr::new(
                    127,
                    0,
                    0,
                    2 + (i / settings.per_source) as u8,
                )),
            })
            .collect();
        open.push(Subscribers::open(specs, stats.clone(), 200, &progress).await?);
        connected = level;
        progress.update(&format!("{level} connections: settling"));
        tokio::time::sleep(settings.settle).await;
        server.check_alive()?;
        let rss_kib = server.sample()?.rss_kib;
        let (prev_n, prev_rss) = levels
            .last()
            .map_or((0, baseline_kib), |l| (l.connections, l.rss_kib));
        levels.push(Level {
            connections: level,
            rss_kib,
            kib_per_conn: (rss_kib as f64 - baseline_kib as f64) / level as f64,
            marginal_kib: (rss_kib as f64 - prev_rss as f64) / (level - prev_n) as f64,
        });
    }
    let lost = stats.lost();
    progress.finish(&format!("done: {connected} connections, {lost} lost"));
    if lost > 0 {
        return Err(format!("{name}: {lost} connections were closed by the server").into());
    }
    for subscribers in open {
        subscribers.close().await;
    }
    server.stop().await;
    Ok(Run {
        name: name.to_string(),
        baseline_kib,
        levels,
    })
}

/// Creates `count` tasks; returns each one's subscribe URL (with its token).
async fn create_tasks(
    server: &Server,
    count: usize,
    progress: &Progress,
) -> Result<Vec<String>, BoxError> {
    use futures::StreamExt;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("http://{}/api/tasks", server.addr);
    let addr = server.addr;
    let mut urls = Vec::with_capacity(count);
    let mut answers = futures::stream::iter(0..count)
        .map(|_| {
            let request = client.post(&url).bearer_auth(PUSH_KEY).json(&json!({}));
            async move {
                let body: Value = request.send().await?.error_for_status()?.json().await?;
                let id = body["task_id"].as_str().ok_or("no task_id")?;
                let token = body["token"].as_str().ok_or("no token")?;
                Ok::<_, BoxError>(format!("ws://{addr}/ws?task_id={id}&token={token}"))
            }
        })
        .buffer_unordered(32);
    while let Some(url) = answers.next().await {
        urls.push(url?);
        if urls.len() % 500 == 0 {
            progress.update(&format!("created {}/{count} tasks", urls.len()));
        }
    }
    Ok(urls)
}

fn report(settings: &Settings, runs: &[Run]) -> Result<(), BoxError> {
    println!();
    println!(
        "connections: idle subscribed WebSockets, {} per task, RSS read after {:.0} s of settling",
        settings.subs_per_task,
        settings.settle.as_secs_f64()
    );
    let mut table = Table::new(&[
        "server",
        "connections",
        "RSS MiB",
        "baseline MiB",
        "KiB/conn",
        "marginal KiB/conn",
    ]);
    for run in runs {
        for l in &run.levels {
            table.row(vec![
                run.name.clone(),
                num(l.connections as f64, 0),
                num(l.rss_kib as f64 / 1024.0, 1),
                num(run.baseline_kib as f64 / 1024.0, 1),
                num(l.kib_per_conn, 2),
                num(l.marginal_kib, 2),
            ]);
        }
    }
    table.print();

    let mut targets = Vec::new();
    let taskcast = &runs[0];
    for n in CHECKED {
        if let Some(l) = taskcast.at(n) {
            targets.push(Target::new(
                &format!("RSS per idle connection at {}", num(n as f64, 0)),
                format!("{} KiB", num(l.kib_per_conn, 2)),
                "≤ 4 KiB",
                l.kib_per_conn <= TARGET_KIB,
            ));
        }
    }
    if let (Some(low), Some(high)) = (taskcast.at(CHECKED[0]), taskcast.at(CHECKED[2])) {
        let ratio = high.kib_per_conn / low.kib_per_conn;
        targets.push(Target::new(
            "flat from 1k to 15k (per-connection ratio)",
            format!("{}×", num(ratio, 2)),
            "0.75×-1.25×",
            (0.75..=1.25).contains(&ratio),
        ));
    }
    println!();
    report::print_targets(&targets);

    let json = json!({
        "bench": "connections", "machine": report::machine(),
        "subscribers_per_task": settings.subs_per_task,
        "settle_secs": settings.settle.as_secs_f64(),
        "runs": runs.iter().map(Run::to_json).collect::<Vec<_>>(),
        "targets": targets.iter().map(Target::to_json).collect::<Vec<_>>(),
    });
    let json_path = report::write_json("connections.json", &json)?;
    let colors = [svg::BLUE, svg::GREY];
    let series = |f: &dyn Fn(&Level) -> f64| -> Vec<Series> {
        runs.iter()
            .zip(colors)
            .map(|(run, color)| Series {
                name: run.name.clone(),
                color,
                points: run
                    .levels
                    .iter()
                    .map(|l| (l.connections as f64, f(l)))
                    .collect(),
            })
            .collect()
    };
    let rss = LineChart {
        title: "Server RSS".into(),
        x_label: "idle subscribed connections".into(),
        y_label: "RSS, MiB".into(),
        series: series(&|l| l.rss_kib as f64 / 1024.0),
        rules: vec![],
        log_y: false,
        from_zero: true,
    };
    let per_conn = LineChart {
        title: "RSS per connection (above the baseline)".into(),
        x_label: "idle subscribed connections".into(),
        y_label: "KiB per connection".into(),
        series: series(&|l| l.kib_per_conn),
        rules: vec![Rule {
            y: TARGET_KIB,
            label: "target 4 KiB".into(),
            color: svg::RED,
        }],
        log_y: false,
        from_zero: true,
    };
    let svg_path = report::write_file(
        "connections.svg",
        &svg::document(
            "taskcast: memory per idle WebSocket",
            &[rss.render(), per_conn.render()],
        ),
    )?;
    println!();
    println!(
        "figures: {}\nplot:    {}",
        json_path.display(),
        svg_path.display()
    );
    Ok(())
}
