//! `placement`: decisions per second of the pure scheduler
//! ([`placement::choose`]: filter, score, best-of-64 sampling above 256
//! hosts) over a fleet of 10,000 hosts with uneven load, labels and a few
//! hosts down, each decision followed by its reservation, as the Scheduler
//! actor does. Requests vary in size; one in four carries a selector.

use std::collections::BTreeMap;
use std::time::Instant;

use corral_actors::domain::{Placement, Resources};
use corral_actors::placement::{self, HostCapacity, MapFleet, PlacementRequest, Rng};

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
        &format!("placement::choose over {hosts} hosts >= {TARGET_PER_SEC:.0} decisions/s"),
    );
    let regions = ["eu", "us", "ap"];
    let mut fleet = MapFleet::default();
    for i in 0..hosts {
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
            labels: BTreeMap::from([("region".to_string(), regions[i % 3].to_string())]),
            runtime: "fake".into(),
            images: ["busybox".to_string()].into_iter().collect(),
            ..Default::default()
        };
        fleet.insert(&format!("hst_{i:08}"), capacity);
    }
    let mut rng = Rng::new(0x5eed);
    let started = Instant::now();
    let mut placed = 0usize;
    for n in 0..decisions {
        let mut request = PlacementRequest {
            org_id: "org_bench".into(),
            resources: Resources {
                cpu_millis: 10 + (n as u64 % 7) * 40,
                memory_mb: 16 + (n as u64 % 5) * 64,
            },
            image: "busybox".into(),
            ..Default::default()
        };
        if n % 4 == 0 {
            request.placement = Placement {
                selector: BTreeMap::from([("region".to_string(), "eu".to_string())]),
                ..Default::default()
            };
        }
        let Ok(id) = placement::choose(&fleet, &request, &mut rng) else {
            continue;
        };
        if let Some(host) = fleet.hosts.get_mut(&id) {
            host.allocated.cpu_millis += request.resources.cpu_millis;
            host.allocated.memory_mb += request.resources.memory_mb;
            placed += 1;
        }
    }
    let elapsed = started.elapsed();
    let rate = decisions as f64 / elapsed.as_secs_f64();
    let over = fleet
        .hosts
        .values()
        .filter(|h| {
            h.allocated.cpu_millis > h.allocatable.cpu_millis
                || h.allocated.memory_mb > h.allocatable.memory_mb
        })
        .count();
    report.figure("hosts", hosts as f64, "");
    report.figure("decisions", decisions as f64, "");
    report.figure("placed", placed as f64, "");
    report.figure("hosts_over_allocatable", over as f64, "");
    report.figure("decisions_per_sec", rate, "/s");
    report.figure(
        "mean_decision_us",
        elapsed.as_secs_f64() * 1e6 / decisions as f64,
        "us",
    );
    report.pass = Some(rate >= TARGET_PER_SEC && over == 0);
    report
}
