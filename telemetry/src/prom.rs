//! The Prometheus text exposition format (version 0.0.4): labelled counters
//! and histograms that count without blocking anyone for long (one short
//! lock per observation), and a writer for gauges computed at scrape time.
//! Label values must come from bounded sets (routes, states, kinds), never
//! from ids a client chooses.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// The content type of a `/metrics` answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Latency buckets in seconds, from 1 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels_text(names: &[&str], values: &[String], extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect();
    if let Some((n, v)) = extra {
        parts.push(format!("{n}=\"{}\"", escape(v)));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes the `# HELP` and `# TYPE` lines of a family.
pub fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Writes one sample line.
pub fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    let names: Vec<&str> = labels.iter().map(|(n, _)| *n).collect();
    let values: Vec<String> = labels.iter().map(|(_, v)| (*v).to_string()).collect();
    let _ = writeln!(out, "{name}{} {value}", labels_text(&names, &values, None));
}

/// A gauge family computed at scrape time: `rows` of (label values, value).
pub fn gauge(
    out: &mut String,
    name: &str,
    help: &str,
    label_names: &[&str],
    rows: &[(Vec<String>, f64)],
) {
    header(out, name, help, "gauge");
    for (values, value) in rows {
        let _ = writeln!(
            out,
            "{name}{} {value}",
            labels_text(label_names, values, None)
        );
    }
}

/// A counter with labels.
#[derive(Debug)]
pub struct CounterVec {
    name: &'static str,
    help: &'static str,
    label_names: &'static [&'static str],
    values: Mutex<BTreeMap<Vec<String>, f64>>,
}

impl CounterVec {
    pub fn new(
        name: &'static str,
        help: &'static str,
        label_names: &'static [&'static str],
    ) -> Self {
        Self {
            name,
            help,
            label_names,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn inc(&self, labels: &[&str]) {
        self.add(labels, 1.0);
    }

    pub fn add(&self, labels: &[&str], by: f64) {
        let key: Vec<String> = labels.iter().map(|l| (*l).to_string()).collect();
        *lock(&self.values).entry(key).or_insert(0.0) += by;
    }

    /// The current value for `labels` (tests).
    pub fn get(&self, labels: &[&str]) -> f64 {
        let key: Vec<String> = labels.iter().map(|l| (*l).to_string()).collect();
        lock(&self.values).get(&key).copied().unwrap_or(0.0)
    }

    pub fn render(&self, out: &mut String) {
        header(out, self.name, self.help, "counter");
        for (values, value) in lock(&self.values).iter() {
            let _ = writeln!(
                out,
                "{}{} {value}",
                self.name,
                labels_text(self.label_names, values, None)
            );
        }
    }
}

#[derive(Debug, Clone)]
struct Hist {
    buckets: Vec<u64>,
    count: u64,
    sum: f64,
}

/// A histogram with labels and fixed buckets.
#[derive(Debug)]
pub struct HistogramVec {
    name: &'static str,
    help: &'static str,
    label_names: &'static [&'static str],
    bounds: &'static [f64],
    values: Mutex<BTreeMap<Vec<String>, Hist>>,
}

impl HistogramVec {
    pub fn new(
        name: &'static str,
        help: &'static str,
        label_names: &'static [&'static str],
        bounds: &'static [f64],
    ) -> Self {
        Self {
            name,
            help,
            label_names,
            bounds,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn observe(&self, labels: &[&str], value: f64) {
        let key: Vec<String> = labels.iter().map(|l| (*l).to_string()).collect();
        let mut values = lock(&self.values);
        let hist = values.entry(key).or_insert_with(|| Hist {
            buckets: vec![0; self.bounds.len()],
            count: 0,
            sum: 0.0,
        });
        for (i, bound) in self.bounds.iter().enumerate() {
            if value <= *bound {
                hist.buckets[i] += 1;
            }
        }
        hist.count += 1;
        hist.sum += value;
    }

    /// How many observations `labels` has (tests).
    pub fn count(&self, labels: &[&str]) -> u64 {
        let key: Vec<String> = labels.iter().map(|l| (*l).to_string()).collect();
        lock(&self.values).get(&key).map_or(0, |h| h.count)
    }

    pub fn render(&self, out: &mut String) {
        header(out, self.name, self.help, "histogram");
        let values = lock(&self.values).clone();
        for (labels, hist) in &values {
            for (bound, n) in self.bounds.iter().zip(&hist.buckets) {
                let le = bound.to_string();
                let _ = writeln!(
                    out,
                    "{}_bucket{} {n}",
                    self.name,
                    labels_text(self.label_names, labels, Some(("le", &le)))
                );
            }
            let _ = writeln!(
                out,
                "{}_bucket{} {}",
                self.name,
                labels_text(self.label_names, labels, Some(("le", "+Inf"))),
                hist.count
            );
            let plain = labels_text(self.label_names, labels, None);
            let _ = writeln!(out, "{}_sum{plain} {}", self.name, hist.sum);
            let _ = writeln!(out, "{}_count{plain} {}", self.name, hist.count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets() {
        let h = HistogramVec::new("x_seconds", "X.", &["route"], &[0.1, 1.0]);
        h.observe(&["/a"], 0.05);
        h.observe(&["/a"], 0.5);
        h.observe(&["/a"], 5.0);
        let mut out = String::new();
        h.render(&mut out);
        assert!(out.contains("x_seconds_bucket{route=\"/a\",le=\"0.1\"} 1\n"));
        assert!(out.contains("x_seconds_bucket{route=\"/a\",le=\"1\"} 2\n"));
        assert!(out.contains("x_seconds_bucket{route=\"/a\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_seconds_count{route=\"/a\"} 3\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        let c = CounterVec::new("y_total", "Y.", &["why"]);
        c.inc(&["a\"b\\c\nd"]);
        let mut out = String::new();
        c.render(&mut out);
        assert!(
            out.contains("y_total{why=\"a\\\"b\\\\c\\nd\"} 1\n"),
            "{out}"
        );
    }
}
