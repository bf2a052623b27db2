//! `create-latency`: `POST /v1/sandboxes` (waiting for `running`) on the real
//! stack (`corral server` + `corral-agent` on runc, busybox image) against
//! `runc run -d` of an equivalent bundle (the agent's own `config.json`,
//! the same image as an overlay rootfs), interleaved in one run so both see
//! the same machine. Needs root, runc and busybox.

use std::path::Path;
use std::time::Instant;

use reqwest::StatusCode;
use serde_json::json;

use super::{Params, Report};
use crate::{runc_missing_prerequisite, RuncStack};

pub const TARGET_MEDIAN_RATIO: f64 = 1.25;
pub const TARGET_P99_RATIO: f64 = 2.0;

pub async fn run(params: &Params) -> Report {
    run_with(params.quick, if params.quick { 10 } else { 50 }).await
}

pub async fn run_with(quick: bool, iterations: usize) -> Report {
    let report = Report::new(
        "create-latency",
        quick,
        &format!("median <= {TARGET_MEDIAN_RATIO}x raw runc run -d, p99 <= {TARGET_P99_RATIO}x"),
    );
    if let Some(reason) = runc_missing_prerequisite() {
        return report.skip(reason);
    }
    match measure(report.clone(), iterations).await {
        Ok(report) => report,
        Err(err) => report.skip(format!("could not run: {err:#}")),
    }
}

fn run_cmd(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("{cmd:?}: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A bundle like the agent's, ready for `runc run`.
fn prepare_raw_bundle(
    bundle: &Path,
    image_rootfs: &Path,
    config: &serde_json::Value,
) -> anyhow::Result<()> {
    for d in ["upper", "work", "rootfs"] {
        std::fs::create_dir_all(bundle.join(d))?;
    }
    run_cmd(
        std::process::Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                image_rootfs.display(),
                bundle.join("upper").display(),
                bundle.join("work").display()
            ))
            .arg(bundle.join("rootfs")),
    )?;
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(config)?)?;
    Ok(())
}

async fn measure(mut report: Report, iterations: usize) -> anyhow::Result<Report> {
    let stack = RuncStack::start().await;
    let raw_root = stack.dir.path().join("raw-runc");
    let raw_bundles = stack.dir.path().join("raw-bundles");
    std::fs::create_dir_all(&raw_root)?;
    std::fs::create_dir_all(&raw_bundles)?;
    let image_rootfs = stack.agent_dir().join("images/busybox/rootfs");
    let mut corral = Vec::new();
    let mut raw = Vec::new();
    let mut template: Option<serde_json::Value> = None;

    let body = json!({"image": "busybox", "command": ["sleep", "3600"]});
    // One of each first, untimed: the page cache, runc's first exec.
    for i in 0..=iterations {
        let timed = i > 0;
        let corral_first = i % 2 == 0;
        for turn in 0..2 {
            if (turn == 0) == corral_first {
                let t = Instant::now();
                let (status, sandbox) = stack.api.post("/v1/sandboxes", body.clone()).await;
                let took = t.elapsed();
                anyhow::ensure!(
                    status == StatusCode::CREATED && sandbox["state"] == "running",
                    "create failed: {sandbox}"
                );
                let id = sandbox["id"].as_str().unwrap_or_default().to_string();
                if timed {
                    corral.push(took);
                }
                if template.is_none() {
                    let text = std::fs::read_to_string(stack.bundle_dir(&id).join("config.json"))?;
                    template = Some(serde_json::from_str(&text)?);
                }
                let (status, gone) = stack.api.delete(&format!("/v1/sandboxes/{id}")).await;
                anyhow::ensure!(status == StatusCode::OK, "delete failed: {gone}");
            } else if let Some(template) = &template {
                let raw_id = format!("raw-{i}");
                let mut config = template.clone();
                config["linux"]["cgroupsPath"] = json!(format!("/corral-raw/{raw_id}"));
                config["root"]["path"] = json!("rootfs");
                let bundle = raw_bundles.join(&raw_id);
                prepare_raw_bundle(&bundle, &image_rootfs, &config)?;
                let t = Instant::now();
                let status = tokio::process::Command::new("runc")
                    .arg("--root")
                    .arg(&raw_root)
                    .args(["run", "-d", "--bundle"])
                    .arg(&bundle)
                    .arg(&raw_id)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .await?;
                let took = t.elapsed();
                anyhow::ensure!(status.success(), "runc run -d {raw_id} failed");
                if timed {
                    raw.push(took);
                }
                run_cmd(
                    std::process::Command::new("runc")
                        .arg("--root")
                        .arg(&raw_root)
                        .args(["delete", "-f", &raw_id]),
                )?;
                run_cmd(
                    std::process::Command::new("umount")
                        .arg("-l")
                        .arg(bundle.join("rootfs")),
                )?;
                let _ = std::fs::remove_dir_all(&bundle);
            }
        }
    }
    let c = report.latencies("corral_create", &corral);
    let r = report.latencies("raw_runc_run", &raw);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
    let median_ratio = ratio(c.p50_ms, r.p50_ms);
    let p99_ratio = ratio(c.p99_ms, r.p99_ms);
    report.figure("iterations", iterations as f64, "");
    report.figure("median_ratio", median_ratio, "x");
    report.figure("p99_ratio", p99_ratio, "x");
    report.pass = Some(median_ratio <= TARGET_MEDIAN_RATIO && p99_ratio <= TARGET_P99_RATIO);
    drop(stack);
    Ok(report)
}
