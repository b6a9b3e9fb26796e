//! The servers under test, each its own process so /proc shows its cost alone: the
//! release `taskcast` binary, or the floor (this bench binary re-executed with
//! `--floor-server`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::proc::{Proc, Sample};
use super::{BoxError, PUSH_KEY, SUBSCRIBE_SECRET, out_dir};

/// How long a server may take to answer its first request (generous: it may run under
/// valgrind, see [`wrapped`]).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The release `taskcast` binary: `TASKCAST_BIN` if set; else the one `cargo bench` built
/// beside this bench; else `cargo build --release` is run and target/release/taskcast used.
pub fn taskcast_binary() -> Result<PathBuf, BoxError> {
    if let Some(path) = std::env::var_os("TASKCAST_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_taskcast"));
    let is_release = built
        .parent()
        .is_some_and(|dir| dir.file_name().is_some_and(|n| n == "release"));
    if is_release && built.exists() {
        return Ok(built);
    }
    // A debug build of the bench (`cargo build --benches`): build the release binary.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building the release taskcast binary (cargo build --release --bin taskcast)");
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "--bin", "taskcast", "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .status()?;
    if !status.success() {
        return Err("cargo build --release failed".into());
    }
    Ok(super::target_dir().join("release").join("taskcast"))
}

/// A running server process. Dropping it kills the process.
pub struct Server {
    child: Child,
    proc: Proc,
    /// Where WebSocket clients connect (and, for taskcast, pushes go).
    pub addr: SocketAddr,
    /// The floor's separate push port; taskcast takes pushes on `addr`.
    pub push_addr: SocketAddr,
    /// The floor's port for pushes as plain TCP lines (taskcast has none).
    pub tcp_addr: Option<SocketAddr>,
    pub log: PathBuf,
    pub label: String,
}

impl Server {
    /// Starts `taskcast serve` on a free loopback port with a clean environment: the bench
    /// keys, RUST_LOG=warn, and `env` on top (DATABASE_URL, limits, write mode).
    pub async fn taskcast(label: &str, env: &[(&str, String)]) -> Result<Server, BoxError> {
        let binary = taskcast_binary()?;
        let addr = free_port()?;
        let log = out_dir()?.join(format!("{label}.log"));
        let mut command = wrapped(&binary);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env("TASKCAST_LISTEN", addr.to_string())
            .env("TASK_PROCESS_SECRET_KEY", PUSH_KEY)
            .env("TASKCAST_SUBSCRIBE_SECRET", SUBSCRIBE_SECRET);
        for (name, value) in env {
            command.env(name, value);
        }
        let file = std::fs::File::create(&log)?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let mut server = Server::new(child, addr, addr, log, label)?;
        server.wait_ready().await?;
        Ok(server)
    }

    /// Starts the floor: this executable with `--floor-server`, which prints its ports.
    pub async fn floor(label: &str) -> Result<Server, BoxError> {
        let log = out_dir()?.join(format!("{label}.log"));
        let mut child = wrapped(&std::env::current_exe()?)
            .arg("--floor-server")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| "the floor server did not start")??
            .ok_or("the floor server exited")?;
        // "floor ws=127.0.0.1:1234 push=127.0.0.1:1235 tcp=127.0.0.1:1236"
        let field = |name: &str| -> Result<SocketAddr, BoxError> {
            let value = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .ok_or_else(|| format!("unexpected floor banner {line:?}"))?;
            Ok(value.parse()?)
        };
        let (ws, push) = (field("ws=")?, field("push=")?);
        let mut server = Server::new(child, ws, push, log, label)?;
        server.tcp_addr = Some(field("tcp=")?);
        Ok(server)
    }

    fn new(
        child: Child,
        addr: SocketAddr,
        push_addr: SocketAddr,
        log: PathBuf,
        label: &str,
    ) -> Result<Server, BoxError> {
        let pid = child.id().ok_or("the server exited at once")?;
        Ok(Server {
            child,
            proc: Proc::new(pid),
            addr,
            push_addr,
            tcp_addr: None,
            log,
            label: label.to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// CPU and memory now, from /proc.
    pub fn sample(&self) -> Result<Sample, BoxError> {
        self.proc.sample()
    }

    /// Fails with the end of the server's log if it has exited.
    pub fn check_alive(&mut self) -> Result<(), BoxError> {
        if let Some(status) = self.child.try_wait()? {
            return Err(format!(
                "{} exited ({status}); its log ends with:\n{}",
                self.label,
                self.log_tail()
            )
            .into());
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    async fn wait_ready(&mut self) -> Result<(), BoxError> {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let url = format!("http://{}/healthz", self.addr);
        let started = Instant::now();
        loop {
            self.check_alive()?;
            if let Ok(r) = client.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(
                    format!("{} did not answer {url}:\n{}", self.label, self.log_tail()).into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process and waits for it.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// `binary`, or `BENCH_WRAPPER binary` when that is set (say, `valgrind
/// --tool=callgrind` to profile the server under the bench's load).
fn wrapped(binary: &Path) -> Command {
    let wrapper = std::env::var("BENCH_WRAPPER").unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(words).arg(binary);
            command
        }
        None => Command::new(binary),
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<SocketAddr, BoxError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}
