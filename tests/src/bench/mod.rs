//! The benchmark suite behind `corral-bench` (issue 8). Each scenario is a
//! module with a `run(&Params) -> Report` entry point that starts what it
//! needs (an in-process control plane, `corral server` as a child process,
//! simulated or in-process agents), measures, cleans up and returns its
//! figures with the target and whether it was met. The binary prints the
//! report; the smoke test (`tests/tests/bench_smoke.rs`) runs the cheap
//! scenarios at a tiny scale through the same functions.
//!
//! Nothing here asserts a timing: figures are measured and reported, and the
//! verdict is data in the report.

pub mod create_latency;
pub mod density;
pub mod detection;
pub mod fleet;
pub mod placement;
pub mod recovery;
pub mod server_proc;
pub mod sim_agent;
pub mod throughput;

use std::time::Duration;

use serde::Serialize;

/// The highest per-key rate limit the server accepts: a benchmark's load
/// generator is one API key, and the default limit (200/s) would be what
/// a create-rate figure measured.
pub const UNLIMITED: u32 = 1_000_000;

/// [`UNLIMITED`] as `corral server` flags.
pub const NO_RATE_LIMIT: [&str; 4] = [
    "--rate-limit-per-second",
    "1000000",
    "--rate-limit-burst",
    "1000000",
];

/// The scenarios, in the order `all` runs them.
pub const SCENARIOS: &[&str] = &[
    "placement",
    "detection",
    "throughput",
    "fleet",
    "density",
    "recovery",
    "create-latency",
];

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
}

/// What a scenario measured, against what it should reach.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub quick: bool,
    pub figures: Vec<Figure>,
    /// The target in words.
    pub target: String,
    /// `None` when the scenario was skipped or has nothing to judge.
    pub pass: Option<bool>,
    /// Why it was skipped, if it was.
    pub skipped: Option<String>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str, quick: bool, target: &str) -> Self {
        Self {
            scenario: scenario.to_string(),
            quick,
            figures: Vec::new(),
            target: target.to_string(),
            pass: None,
            skipped: None,
            notes: Vec::new(),
        }
    }

    pub fn skip(mut self, reason: impl Into<String>) -> Self {
        self.skipped = Some(reason.into());
        self
    }

    pub fn figure(&mut self, name: &str, value: f64, unit: &str) {
        self.figures.push(Figure {
            name: name.to_string(),
            value,
            unit: unit.to_string(),
        });
    }

    /// Records latency percentiles (ms) of `samples` under `prefix`.
    pub fn latencies(&mut self, prefix: &str, samples: &[Duration]) -> Percentiles {
        let p = Percentiles::of(samples);
        self.figure(&format!("{prefix}_p50"), p.p50_ms, "ms");
        self.figure(&format!("{prefix}_p99"), p.p99_ms, "ms");
        self.figure(&format!("{prefix}_max"), p.max_ms, "ms");
        p
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The value of a figure, for tests and summaries.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value)
    }

    /// A readable summary.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "== {}{} ==\n",
            self.scenario,
            if self.quick { " (quick)" } else { "" }
        );
        if let Some(reason) = &self.skipped {
            out.push_str(&format!("  SKIPPED: {reason}\n"));
            return out;
        }
        for f in &self.figures {
            out.push_str(&format!(
                "  {:<34} {:>14} {}\n",
                f.name,
                fmt_value(f.value),
                f.unit
            ));
        }
        out.push_str(&format!("  target: {}\n", self.target));
        out.push_str(&format!(
            "  result: {}\n",
            match self.pass {
                Some(true) => "MET",
                Some(false) => "NOT MET",
                None => "n/a",
            }
        ));
        for n in &self.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
        out
    }
}

fn fmt_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Median, 99th percentile and maximum of a sample, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub count: usize,
}

impl Percentiles {
    pub fn of(samples: &[Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        Self {
            p50_ms: percentile(&ms, 50.0),
            p99_ms: percentile(&ms, 99.0),
            max_ms: ms[ms.len() - 1],
            count: ms.len(),
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Scale knobs shared by the scenarios.
#[derive(Debug, Clone)]
pub struct Params {
    pub quick: bool,
}

/// CPU time (user + system) a process has used, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / clock_ticks(),
    ))
}

/// Resident set size of a process, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// nproc, memory and kernel, as /proc tells them.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {:.1} GiB memory, kernel {}",
        mem_kb as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

/// Runs `count` futures made by `make` with at most `concurrency` at once.
pub async fn bounded<F, Fut, T>(count: usize, concurrency: usize, make: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    use futures::stream::StreamExt;
    futures::stream::iter((0..count).map(make))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}
