//! `corral-bench SCENARIO [--quick] [--json]`: runs one benchmark scenario
//! (or `all`), prints a readable summary and, with `--json`, one JSON object
//! per scenario with its figures, target and verdict. See
//! docs/performance.md.

use corral_tests::bench::{self, Params, Report};

/// jemalloc: glibc's malloc was a sixth of the CPU under load, and
/// mimalloc held a third more memory (docs/performance.md, "Optimisations").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn usage() -> ! {
    eprintln!(
        "usage: corral-bench SCENARIO|all [--quick] [--json]\nscenarios: {}",
        bench::SCENARIOS.join(", ")
    );
    std::process::exit(2);
}

async fn run(name: &str, params: &Params) -> Report {
    match name {
        "create-latency" => bench::create_latency::run(params).await,
        "throughput" => bench::throughput::run(params).await,
        "fleet" => bench::fleet::run(params).await,
        "density" => bench::density::run(params).await,
        "recovery" => bench::recovery::run(params).await,
        "detection" => bench::detection::run(params).await,
        "placement" => bench::placement::run(params),
        _ => usage(),
    }
}

fn main() {
    let mut scenario = None;
    let (mut quick, mut json) = (false, false);
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => quick = true,
            "--json" => json = true,
            "-h" | "--help" => usage(),
            other if scenario.is_none() && !other.starts_with('-') => {
                scenario = Some(other.to_string())
            }
            _ => usage(),
        }
    }
    let Some(scenario) = scenario else { usage() };
    // The in-process control planes log through the harness's subscriber:
    // keep the summary readable unless asked otherwise.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "error");
    }
    let names: Vec<&str> = if scenario == "all" {
        bench::SCENARIOS.to_vec()
    } else if bench::SCENARIOS.contains(&scenario.as_str()) {
        vec![scenario.as_str()]
    } else {
        usage()
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("corral-bench: cannot start the runtime: {err}");
            std::process::exit(1);
        }
    };
    let params = Params { quick };
    eprintln!("machine: {}", bench::machine());
    let mut failed = false;
    for name in names {
        let report = runtime.block_on(run(name, &params));
        failed |= report.pass == Some(false);
        if json {
            match serde_json::to_string(&report) {
                Ok(line) => println!("{line}"),
                Err(err) => eprintln!("corral-bench: {err}"),
            }
            eprint!("{}", report.summary());
        } else {
            print!("{}", report.summary());
        }
    }
    // Targets missed are reported, not failures of the harness.
    let _ = failed;
}
