//! A process's CPU time and memory, read from /proc/<pid>/stat and /proc/<pid>/status
//! alone (no help from the process being measured).

use std::time::Duration;

use super::BoxError;

/// CPU time split into user and kernel, and resident memory, at one instant.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub user: Duration,
    pub system: Duration,
    /// VmRSS, in KiB.
    pub rss_kib: u64,
    /// VmHWM (peak RSS), in KiB.
    pub peak_kib: u64,
}

impl Sample {
    pub fn cpu(&self) -> Duration {
        self.user + self.system
    }
}

/// CPU used between two samples, split into user and kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuDelta {
    pub user: Duration,
    pub system: Duration,
}

impl CpuDelta {
    pub fn between(before: &Sample, after: &Sample) -> Self {
        CpuDelta {
            user: after.user.saturating_sub(before.user),
            system: after.system.saturating_sub(before.system),
        }
    }

    pub fn total(&self) -> Duration {
        self.user + self.system
    }

    /// Microseconds per event, total and (user, system).
    pub fn per(&self, events: u64) -> (f64, f64, f64) {
        if events == 0 {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        let n = events as f64;
        let us = |d: Duration| d.as_secs_f64() * 1e6 / n;
        (us(self.total()), us(self.user), us(self.system))
    }
}

/// Reads one process; `pid` 0 means this process.
pub struct Proc {
    pid: u32,
    tick: f64,
}

impl Proc {
    pub fn new(pid: u32) -> Self {
        Proc {
            pid,
            tick: clock_ticks_per_second(),
        }
    }

    pub fn this() -> Self {
        Proc::new(std::process::id())
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn sample(&self) -> Result<Sample, BoxError> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        // The command name (field 2) may hold spaces; fields after its `)` are plain.
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .ok_or("malformed /proc/<pid>/stat")?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after `)`.
        let ticks = |i: usize| -> Result<f64, BoxError> {
            Ok(fields
                .get(i)
                .ok_or("short /proc/<pid>/stat")?
                .parse::<f64>()?)
        };
        let user = Duration::from_secs_f64(ticks(11)? / self.tick);
        let system = Duration::from_secs_f64(ticks(12)? / self.tick);
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let kib = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(Sample {
            user,
            system,
            rss_kib: kib("VmRSS:"),
            peak_kib: kib("VmHWM:"),
        })
    }
}

/// USER_HZ, from `getconf CLK_TCK`; 100 (the value on every common Linux) if that fails.
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|&t| t > 0.0)
            .unwrap_or(100.0)
    })
}

/// CPU time of every process whose command name is `name` (say, all `postgres`
/// backends), per pid, so a later reading can count processes born in between.
pub fn cpu_by_command(name: &str) -> std::collections::HashMap<u32, Duration> {
    cpu_by_command_line(name, "")
}

/// Like [`cpu_by_command`], but only the processes whose command line (as the process
/// shows it: a Postgres backend writes `postgres: <user> <database> <client> <state>`
/// there) contains `part`. With a bench database's name this counts the backends serving
/// the bench, not those of other work sharing the cluster.
pub fn cpu_by_command_line(name: &str, part: &str) -> std::collections::HashMap<u32, Duration> {
    let tick = clock_ticks_per_second();
    let mut out = std::collections::HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] != name {
            continue;
        }
        if !part.is_empty() {
            let line = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if !line.windows(part.len()).any(|w| w == part.as_bytes()) {
                continue;
            }
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        out.insert(pid, Duration::from_secs_f64((ticks(11) + ticks(12)) / tick));
    }
    out
}

/// CPU used between two [`cpu_by_command`] readings (processes that exited in between
/// are not counted).
pub fn cpu_used(
    before: &std::collections::HashMap<u32, Duration>,
    after: &std::collections::HashMap<u32, Duration>,
) -> Duration {
    after
        .iter()
        .map(|(pid, cpu)| cpu.saturating_sub(before.get(pid).copied().unwrap_or_default()))
        .sum()
}

/// CPU time the whole machine has spent busy, from the first line of /proc/stat (user,
/// nice, system, irq, softirq and steal; not idle or iowait).
pub fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or(0.0);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
    Duration::from_secs_f64(busy / clock_ticks_per_second())
}
