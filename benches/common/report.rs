//! What a bench shows: a one-line progress indicator while it runs, then tables, the
//! targets with pass/fail, a JSON file of the figures and an SVG plot under
//! `<target>/bench/`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::Value;

use super::{BoxError, out_dir};

/// A status line on stderr, rewritten in place with `\r`.
pub struct Progress {
    label: String,
    started: Instant,
}

impl Progress {
    pub fn new(label: &str) -> Progress {
        Progress {
            label: label.to_string(),
            started: Instant::now(),
        }
    }

    pub fn update(&self, message: &str) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r[{} {elapsed:6.1}s] {message:<78}", self.label);
        let _ = err.flush();
    }

    /// Ends the status line so the next output starts on a fresh one.
    pub fn finish(&self, message: &str) {
        self.update(message);
        eprintln!();
    }
}

/// A plain text table: the first column left-aligned, the others right-aligned.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self) {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, cell) in cells.iter().enumerate().take(columns) {
                let pad = widths[i].saturating_sub(cell.chars().count());
                if i == 0 {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(pad));
                } else {
                    out.push_str("  ");
                    out.push_str(&" ".repeat(pad));
                    out.push_str(cell);
                }
            }
            println!("{}", out.trim_end());
        };
        line(&self.headers);
        let total: usize = widths.iter().sum::<usize>() + 2 * (columns - 1);
        println!("{}", "-".repeat(total));
        for row in &self.rows {
            line(row);
        }
    }
}

/// One target of issue 7 next to the figure that meets or misses it.
pub struct Target {
    pub name: String,
    pub figure: String,
    pub target: String,
    pub pass: bool,
}

impl Target {
    pub fn new(name: &str, figure: String, target: &str, pass: bool) -> Target {
        Target {
            name: name.to_string(),
            figure,
            target: target.to_string(),
            pass,
        }
    }

    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "name": self.name, "figure": self.figure, "target": self.target, "pass": self.pass,
        })
    }
}

pub fn print_targets(targets: &[Target]) {
    let mut table = Table::new(&["target", "figure", "wanted", "result"]);
    for t in targets {
        table.row(vec![
            t.name.clone(),
            t.figure.clone(),
            t.target.clone(),
            if t.pass { "PASS" } else { "FAIL" }.to_string(),
        ]);
    }
    table.print();
}

/// Writes `<target>/bench/<name>` and returns its path.
pub fn write_file(name: &str, contents: &str) -> Result<PathBuf, BoxError> {
    let path = out_dir()?.join(name);
    std::fs::write(&path, contents)?;
    Ok(path)
}

pub fn write_json(name: &str, value: &Value) -> Result<PathBuf, BoxError> {
    write_file(name, &serde_json::to_string_pretty(value)?)
}

/// A number with thousands separators and `decimals` places; "-" for NaN.
pub fn num(value: f64, decimals: usize) -> String {
    if !value.is_finite() {
        return "-".to_string();
    }
    let text = format!("{:.*}", decimals, value.abs());
    let (int, frac) = text
        .split_once('.')
        .map_or((text.as_str(), ""), |(i, f)| (i, f));
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let sign = if value < 0.0 { "-" } else { "" };
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

/// JSON number, or null for NaN/infinite.
pub fn jnum(value: f64) -> Value {
    serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
}

/// A short description of the machine for the report: CPU model, cores, kernel.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    serde_json::json!({ "cpu": model, "cores": cores, "kernel": kernel.trim() })
}
