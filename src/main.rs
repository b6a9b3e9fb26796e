//! The `taskcast` binary: parse the command line, set up logging, and run.

use std::process::ExitCode;

use taskcast::App;
use taskcast::auth::Secret;
use taskcast::auth::subscribe;
use taskcast::cli::{Cli, Command};
use taskcast::config::Config;
use taskcast::domain::{IdKind, StatusMap};
use taskcast::store::report::Severity;
use taskcast::store::schema;
use taskcast::telemetry::LogFormat;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse_shown();
    match cli.command {
        Some(Command::Migrate(args)) => {
            taskcast::telemetry::init(LogFormat::Text);
            let map = match StatusMap::parse(&args.status_map) {
                Ok(map) => map,
                Err(message) => {
                    eprintln!("taskcast migrate: {message}");
                    return ExitCode::FAILURE;
                }
            };
            match schema::migrate_with_channel(&args.database_url, &args.notify_channel).await {
                Ok(changes) if changes.is_empty() => out("up to date\n"),
                Ok(changes) => changes.iter().for_each(|c| out(&format!("{c}\n"))),
                Err(e) => {
                    eprintln!("taskcast migrate failed: {}", e.chain());
                    return ExitCode::FAILURE;
                }
            }
            // What taskcast will do with the table as it is, before any push.
            match schema::table_report(&args.database_url, &map).await {
                Ok(findings) => {
                    let mut servable = true;
                    for f in &findings {
                        let level = match f.severity {
                            Severity::Ok => "ok",
                            Severity::Warn => "warn",
                            Severity::Fail => "FAIL",
                            Severity::Critical => "CRITICAL",
                        };
                        servable &= f.severity != Severity::Fail;
                        out(&format!("{level}: {}\n", f.message));
                        if let Some(fix) = &f.fix {
                            out(&format!("      fix: {fix}\n"));
                        }
                    }
                    if servable {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!(
                            "taskcast migrate: taskcast cannot serve this table yet (see FAIL above)"
                        );
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("taskcast migrate: reading the table failed: {}", e.chain());
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Doctor(args)) => {
            let env = |name: &str| std::env::var(name).ok();
            let report = taskcast::doctor::run(&env).await;
            if args.json {
                out(&format!("{}\n", report.to_json()));
            } else {
                out(&report.render_text());
            }
            if report.failed() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Some(Command::Token(args)) if args.user.is_some() => {
            let secret = Secret::new(args.subscribe_secret.trim());
            let user = args.user.expect("matched on is_some");
            out(&format!(
                "{}\n",
                subscribe::mint_user(&secret, user, args.ttl)
            ));
            ExitCode::SUCCESS
        }
        Some(Command::Token(args)) => {
            let tasks: Result<Vec<_>, _> =
                args.tasks.iter().map(|t| IdKind::Text.parse(t)).collect();
            match tasks {
                Ok(tasks) => {
                    let secret = Secret::new(args.subscribe_secret.trim());
                    let token = subscribe::mint_with(&secret, &tasks, args.ttl, args.cancel);
                    out(&format!("{token}\n"));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("taskcast token: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Serve(args)) => serve(*args).await,
        None => serve(cli.serve).await,
    }
}

async fn serve(args: taskcast::cli::ServeArgs) -> ExitCode {
    taskcast::telemetry::init(args.log_format);
    let config = match Config::from_args(args, |name| std::env::var(name).ok()) {
        Ok(config) => config,
        Err(message) => {
            tracing::error!("{message}");
            return ExitCode::FAILURE;
        }
    };
    let app = match App::build(config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e.chain(), "taskcast could not start");
            return ExitCode::FAILURE;
        }
    };
    app.run_until(shutdown_signal()).await;
    ExitCode::SUCCESS
}

/// Writes to stdout; a reader that went away (`taskcast doctor | head`) is not an error.
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes());
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
