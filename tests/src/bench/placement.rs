//! `placement`: decisions per second of the pure scheduler
//! ([`choose_host`]) over a fleet of hosts with uneven load, each decision
//! followed by its reservation, as the Scheduler actor does.

use std::collections::HashMap;
use std::time::Instant;

use corral_actors::actors::scheduler::{choose_host, HostCapacity};
use corral_actors::domain::Resources;

use super::{Params, Report};

/// Below this the scheduler alone would cap the create rate under the
/// throughput target.
pub const TARGET_PER_SEC: f64 = 5_000.0;

pub fn run(params: &Params) -> Report {
    let hosts = 10_000;
    let decisions = if params.quick { 20_000 } else { 100_000 };
    run_with(params.quick, hosts, decisions)
}

pub fn run_with(quick: bool, hosts: usize, decisions: usize) -> Report {
    let mut report = Report::new(
        "placement",
        quick,
        &format!("choose_host over {hosts} hosts >= {TARGET_PER_SEC:.0} decisions/s"),
    );
    let mut fleet: HashMap<String, HostCapacity> = (0..hosts)
        .map(|i| {
            let capacity = HostCapacity {
                allocatable: Resources {
                    cpu_millis: 64_000,
                    memory_mb: 262_144,
                },
                // Uneven load, so the scores differ.
                allocated: Resources {
                    cpu_millis: (i as u64 * 7919) % 32_000,
                    memory_mb: (i as u64 * 104_729) % 131_072,
                },
                // A few are down, as in a real fleet.
                schedulable: i % 50 != 0,
            };
            (format!("hst_{i:08}"), capacity)
        })
        .collect();
    let request = Resources {
        cpu_millis: 10,
        memory_mb: 16,
    };
    let started = Instant::now();
    let mut placed = 0usize;
    for _ in 0..decisions {
        let Ok(id) = choose_host(fleet.iter(), request).cloned() else {
            continue;
        };
        if let Some(host) = fleet.get_mut(&id) {
            host.allocated.cpu_millis += request.cpu_millis;
            host.allocated.memory_mb += request.memory_mb;
            placed += 1;
        }
    }
    let elapsed = started.elapsed();
    let rate = decisions as f64 / elapsed.as_secs_f64();
    report.figure("hosts", hosts as f64, "");
    report.figure("decisions", decisions as f64, "");
    report.figure("placed", placed as f64, "");
    report.figure("decisions_per_sec", rate, "/s");
    report.figure(
        "mean_decision_us",
        elapsed.as_secs_f64() * 1e6 / decisions as f64,
        "us",
    );
    report.pass = Some(rate >= TARGET_PER_SEC);
    report
}
