//! The runc runtime against the real runc binary with a real busybox image:
//! the whole lifecycle (create, exec, stop, start, destroy), the limits and
//! namespaces the sandbox really gets, exec capping and timeouts, and an
//! agent restart (a second runtime over the same data directory)
//! re-discovering a running sandbox, and the TTL watchdog stopping a sandbox
//! past its deadline whose deadline survives in the container's annotations.
//!
//! Needs root, runc on PATH and busybox-static; without them each test says
//! why and skips (it does not silently pass).

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use corral_agent::runc::RuncRuntime;
use corral_agent::runtime::{Phase, Runtime, RuntimeError, SandboxSpec};
use corral_agent::{images, AgentConfig, WatchdogConfig};

fn which(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|p| p.join(name))
        .find(|p| p.is_file())
}

/// The runc binary, or why the test cannot run here.
fn prerequisites() -> Result<PathBuf, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not running as root".into());
    }
    let runc = which("runc").ok_or("runc is not installed")?;
    if images::find_busybox().is_none() {
        return Err("busybox-static is not installed".into());
    }
    Ok(runc)
}

fn unique_id(prefix: &str) -> String {
    format!("{prefix}_{:016x}", fastrand::u64(..))
}

/// Removes the container and its mount whatever the test's outcome.
struct Cleanup {
    runc: PathBuf,
    root: PathBuf,
    bundle: PathBuf,
    id: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.runc)
            .arg("--root")
            .arg(&self.root)
            .args(["delete", "--force", &self.id])
            .output();
        let _ = nix::mount::umount2(
            &self.bundle.join("rootfs"),
            nix::mount::MntFlags::MNT_DETACH,
        );
    }
}

async fn runc_lists(runc: &Path, root: &Path, id: &str) -> bool {
    let out = tokio::process::Command::new(runc)
        .arg("--root")
        .arg(root)
        .args(["list", "--format", "json"])
        .output()
        .await
        .expect("runc list");
    String::from_utf8_lossy(&out.stdout).contains(id)
}

#[tokio::test]
async fn runc_sandbox_lifecycle_with_busybox() {
    let runc = match prerequisites() {
        Ok(runc) => runc,
        Err(reason) => {
            eprintln!("SKIPPED: runc lifecycle test: {reason}");
            return;
        }
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    images::build_busybox(data, None).expect("build the busybox image");
    let rt = RuncRuntime::new(data, runc.clone());
    assert_eq!(rt.images(), vec!["busybox".to_string()]);
    let id = unique_id("sbx_runc");
    let _cleanup = Cleanup {
        runc: runc.clone(),
        root: rt.runc_root(),
        bundle: rt.bundle_dir(&id),
        id: id.clone(),
    };

    let mut spec = SandboxSpec {
        id: id.clone(),
        image: "busybox".into(),
        command: vec!["sleep".into(), "600".into()],
        cpu_millis: 500,
        memory_mb: 64,
        ..Default::default()
    };
    spec.env
        .insert("GREETING".into(), "hello from corral".into());
    spec.labels.insert("suite".into(), "agent".into());

    let created = rt.create(&spec).await.expect("create");
    assert_eq!(created.phase, Phase::Running);
    assert_eq!(created.image, "busybox");
    assert!(
        runc_lists(&runc, &rt.runc_root(), &id).await,
        "runc runs the container"
    );
    let rootfs = rt
        .bundle_dir(&id)
        .join("rootfs")
        .canonicalize()
        .expect("rootfs");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let overlay = mountinfo
        .lines()
        .any(|l| l.split(' ').nth(4) == rootfs.to_str() && l.contains(" - overlay "));
    let copied = rt.bundle_dir(&id).join("rootfs.copy").exists();
    assert!(
        overlay != copied,
        "the rootfs is either an overlay mount or a copy"
    );
    eprintln!(
        "rootfs of {id}: {}",
        if overlay { "overlay mount" } else { "copy" }
    );
    let again = rt.create(&spec).await.expect("create is idempotent");
    assert_eq!(again.phase, Phase::Running);

    // Exec: output, env, cwd, exit codes.
    let out = exec(&rt, &id, &["echo", "hello"]).await;
    assert_eq!(stdout(&out), "hello\n");
    assert_eq!(out.exit_code, 0);
    let mut with_env = exec_spec(&["sh", "-c", "echo $GREETING $EXTRA; pwd"]);
    with_env.env.insert("EXTRA".into(), "and more".into());
    with_env.workdir = Some("/tmp".into());
    let out = rt.exec(&id, with_env).await.expect("exec");
    assert_eq!(stdout(&out), "hello from corral and more\n/tmp\n");
    assert_eq!(exec(&rt, &id, &["sh", "-c", "exit 3"]).await.exit_code, 3);

    // Isolation: its own pid namespace (the main process is PID 1), its own
    // hostname, no network but loopback.
    let out = exec(&rt, &id, &["cat", "/proc/1/cmdline"]).await;
    assert_eq!(stdout(&out), "sleep\x00600\x00");
    assert_eq!(
        stdout(&exec(&rt, &id, &["hostname"]).await),
        format!("{id}\n")
    );
    let out = exec(&rt, &id, &["ls", "/sys/class/net"]).await;
    assert_eq!(
        stdout(&out).split_whitespace().collect::<Vec<_>>(),
        vec!["lo"]
    );

    // Limits: the cgroup the container runs in has them.
    let v1 = PathBuf::from("/sys/fs/cgroup/memory/corral").join(&id);
    let v2 = PathBuf::from("/sys/fs/cgroup/corral").join(&id);
    if v1.exists() {
        let limit =
            std::fs::read_to_string(v1.join("memory.limit_in_bytes")).expect("memory limit");
        assert_eq!(limit.trim(), (64u64 * 1024 * 1024).to_string());
        let quota = std::fs::read_to_string(
            PathBuf::from("/sys/fs/cgroup/cpu/corral")
                .join(&id)
                .join("cpu.cfs_quota_us"),
        )
        .expect("cpu quota");
        assert_eq!(quota.trim(), "50000");
    } else if v2.exists() {
        let limit = std::fs::read_to_string(v2.join("memory.max")).expect("memory.max");
        assert_eq!(limit.trim(), (64u64 * 1024 * 1024).to_string());
        let cpu = std::fs::read_to_string(v2.join("cpu.max")).expect("cpu.max");
        assert_eq!(cpu.trim(), "50000 100000");
    } else {
        panic!(
            "no cgroup for the sandbox at {} or {}",
            v1.display(),
            v2.display()
        );
    }

    // Capped output and a timeout that kills the process in the container.
    let mut capped = exec_spec(&["head", "-c", "200000", "/dev/zero"]);
    capped.max_output_bytes = 1000;
    let out = rt.exec(&id, capped).await.expect("exec");
    assert_eq!(out.stdout.len(), 1000);
    assert!(out.stdout_truncated);
    let mut slow = exec_spec(&["sleep", "37"]);
    slow.timeout = Duration::from_millis(300);
    let out = rt.exec(&id, slow).await.expect("exec");
    assert!(out.timed_out);
    assert_eq!(out.exit_code, -1);
    eventually(
        "the timed-out process to be gone from the container",
        || async {
            let ps = exec(&rt, &id, &["ps", "-o", "args"]).await;
            !stdout(&ps).contains("sleep 37")
        },
    )
    .await;

    // An agent restart: a new runtime over the same data dir sees it running.
    let restarted = RuncRuntime::new(data, runc.clone());
    let listed = restarted.list().await.expect("list");
    let found = listed.iter().find(|s| s.id == id).expect("re-discovered");
    assert_eq!(found.phase, Phase::Running);
    assert_eq!(found.image, "busybox");

    // Files written survive a stop and a start (the overlay upper dir).
    exec(&rt, &id, &["sh", "-c", "echo kept > /root/file"]).await;
    let stopped = rt
        .stop(&id, Duration::from_millis(300))
        .await
        .expect("stop");
    assert_eq!(stopped.phase, Phase::Stopped);
    let err = rt
        .exec(&id, exec_spec(&["true"]))
        .await
        .expect_err("no exec when stopped");
    assert!(matches!(err, RuntimeError::InvalidState(_)), "{err:?}");
    assert_eq!(
        rt.stop(&id, Duration::ZERO)
            .await
            .expect("stop again")
            .phase,
        Phase::Stopped
    );
    let listed = restarted.list().await.expect("list");
    assert_eq!(
        listed.iter().find(|s| s.id == id).map(|s| s.phase),
        Some(Phase::Stopped)
    );

    let started = rt.start(&id).await.expect("start");
    assert_eq!(started.phase, Phase::Running);
    assert_eq!(
        rt.start(&id).await.expect("start again").phase,
        Phase::Running
    );
    assert_eq!(
        stdout(&exec(&rt, &id, &["cat", "/root/file"]).await),
        "kept\n"
    );
    let listed = rt.list().await.expect("list");
    let found = listed.iter().find(|s| s.id == id).expect("listed");
    assert_eq!(
        (found.phase, found.image.as_str()),
        (Phase::Running, "busybox")
    );

    // Destroy: gone from runc and from disk; a second destroy is fine.
    let gone = rt.destroy(&id).await.expect("destroy");
    assert_eq!(gone.phase, Phase::Absent);
    assert!(
        !runc_lists(&runc, &rt.runc_root(), &id).await,
        "runc no longer has it"
    );
    assert!(!rt.bundle_dir(&id).exists(), "the bundle is gone");
    assert_eq!(
        rt.destroy(&id).await.expect("destroy again").phase,
        Phase::Absent
    );
    assert!(rt.list().await.expect("list").iter().all(|s| s.id != id));
    assert!(matches!(
        rt.start(&id).await,
        Err(RuntimeError::SandboxNotFound(_))
    ));
}

#[tokio::test]
async fn runc_refuses_unknown_images_and_leaves_nothing_behind() {
    let runc = match prerequisites() {
        Ok(runc) => runc,
        Err(reason) => {
            eprintln!("SKIPPED: runc image test: {reason}");
            return;
        }
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let rt = RuncRuntime::new(tmp.path(), runc);
    let id = unique_id("sbx_noimg");
    let spec = SandboxSpec {
        id: id.clone(),
        image: "no-such-image".into(),
        command: vec!["true".into()],
        ..Default::default()
    };
    let err = rt.create(&spec).await.expect_err("unknown image");
    assert!(matches!(err, RuntimeError::ImageNotFound(_)), "{err:?}");
    assert!(!rt.bundle_dir(&id).exists());
    assert!(rt.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn a_main_process_that_cannot_start_fails_the_create_cleanly() {
    let runc = match prerequisites() {
        Ok(runc) => runc,
        Err(reason) => {
            eprintln!("SKIPPED: runc failed-create test: {reason}");
            return;
        }
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    images::build_busybox(tmp.path(), None).expect("build the busybox image");
    let rt = RuncRuntime::new(tmp.path(), runc.clone());
    let id = unique_id("sbx_nocmd");
    let _cleanup = Cleanup {
        runc,
        root: rt.runc_root(),
        bundle: rt.bundle_dir(&id),
        id: id.clone(),
    };
    let spec = SandboxSpec {
        id: id.clone(),
        image: "busybox".into(),
        command: vec!["/no/such/binary".into()],
        ..Default::default()
    };
    let err = rt.create(&spec).await.expect_err("runc run fails");
    assert!(matches!(err, RuntimeError::Runtime(_)), "{err:?}");
    assert!(
        !rt.bundle_dir(&id).exists(),
        "a failed create leaves no bundle"
    );
    assert!(rt.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn without_overlayfs_the_rootfs_is_a_copy_with_the_same_lifecycle() {
    let runc = match prerequisites() {
        Ok(runc) => runc,
        Err(reason) => {
            eprintln!("SKIPPED: runc copy-fallback test: {reason}");
            return;
        }
    };
    // A ',' in the path cannot be carried in overlayfs mount options, so
    // the runtime must fall back to copying the image.
    let tmp = tempfile::Builder::new()
        .prefix("corral,copy")
        .tempdir()
        .expect("tempdir");
    images::build_busybox(tmp.path(), None).expect("build the busybox image");
    let rt = RuncRuntime::new(tmp.path(), runc.clone());
    let id = unique_id("sbx_copy");
    let _cleanup = Cleanup {
        runc,
        root: rt.runc_root(),
        bundle: rt.bundle_dir(&id),
        id: id.clone(),
    };
    let spec = SandboxSpec {
        id: id.clone(),
        image: "busybox".into(),
        command: vec!["sleep".into(), "600".into()],
        ..Default::default()
    };
    assert_eq!(
        rt.create(&spec).await.expect("create").phase,
        Phase::Running
    );
    assert!(
        rt.bundle_dir(&id).join("rootfs.copy").exists(),
        "the rootfs is a copy"
    );
    exec(&rt, &id, &["sh", "-c", "echo kept > /root/file"]).await;
    assert_eq!(
        rt.stop(&id, Duration::ZERO).await.expect("stop").phase,
        Phase::Stopped
    );
    assert_eq!(rt.start(&id).await.expect("start").phase, Phase::Running);
    assert_eq!(
        stdout(&exec(&rt, &id, &["cat", "/root/file"]).await),
        "kept\n"
    );
    assert_eq!(rt.destroy(&id).await.expect("destroy").phase, Phase::Absent);
    assert!(!rt.bundle_dir(&id).exists());
    assert!(
        images::rootfs(tmp.path(), "busybox")
            .expect("image")
            .join("bin/busybox")
            .exists(),
        "the image itself is untouched"
    );
}

/// `t` cut to whole milliseconds, as the protocol and the annotation keep it.
fn to_millis(t: SystemTime) -> SystemTime {
    let ms = t
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis();
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).expect("fits"))
}

#[tokio::test]
async fn the_watchdog_stops_a_runc_sandbox_past_its_ttl_and_the_deadline_is_persisted() {
    let runc = match prerequisites() {
        Ok(runc) => runc,
        Err(reason) => {
            eprintln!("SKIPPED: runc TTL watchdog test: {reason}");
            return;
        }
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path();
    images::build_busybox(data, None).expect("build the busybox image");
    let rt = RuncRuntime::new(data, runc.clone());
    let now = SystemTime::now();
    let expired_id = unique_id("sbx_ttl");
    let later_id = unique_id("sbx_later");
    let _cleanup = [&expired_id, &later_id].map(|id| Cleanup {
        runc: runc.clone(),
        root: rt.runc_root(),
        bundle: rt.bundle_dir(id),
        id: id.clone(),
    });
    let expired_at = to_millis(now - Duration::from_secs(60));
    let later_at = to_millis(now + Duration::from_secs(3600));
    for (id, expires_at) in [(&expired_id, expired_at), (&later_id, later_at)] {
        let spec = SandboxSpec {
            id: id.clone(),
            image: "busybox".into(),
            command: vec!["sleep".into(), "600".into()],
            expires_at: Some(expires_at),
            ..Default::default()
        };
        let created = rt.create(&spec).await.expect("create");
        assert_eq!(created.phase, Phase::Running);
        assert_eq!(created.expires_at, Some(expires_at));
    }

    // The deadline is in the bundle's config and in runc's own state.
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(rt.bundle_dir(&expired_id).join("config.json")).expect("config.json"),
    )
    .expect("json");
    let expected_ms = expired_at
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis()
        .to_string();
    assert_eq!(
        config["annotations"]["corral.expires_at_unix_ms"].as_str(),
        Some(expected_ms.as_str())
    );
    let state = tokio::process::Command::new(&runc)
        .arg("--root")
        .arg(rt.runc_root())
        .args(["state", expired_id.as_str()])
        .output()
        .await
        .expect("runc state");
    let state: serde_json::Value = serde_json::from_slice(&state.stdout).expect("state json");
    assert_eq!(
        state["annotations"]["corral.expires_at_unix_ms"].as_str(),
        Some(expected_ms.as_str())
    );

    // The watchdog, with no control plane reachable (nothing on port 1).
    let shared: Arc<dyn Runtime> = Arc::new(RuncRuntime::new(data, runc.clone()));
    let config = AgentConfig {
        control_plane_url: "http://127.0.0.1:1".into(),
        token: "host-token".into(),
        poll_interval: Duration::from_millis(100),
        tls: Default::default(),
        ..AgentConfig::default()
    };
    let watchdog = WatchdogConfig {
        ttl_margin: Duration::from_secs(1),
        // busybox sleep as pid 1 ignores SIGTERM: this exercises the SIGKILL.
        stop_grace: Duration::from_millis(300),
    };
    let agent = tokio::spawn(corral_agent::run_agent_with(
        config,
        watchdog,
        shared,
        std::future::pending(),
    ));
    eventually("the watchdog stops the expired runc sandbox", || async {
        rt.list()
            .await
            .expect("list")
            .iter()
            .any(|s| s.id == expired_id && s.phase == Phase::Stopped)
    })
    .await;
    agent.abort();

    // A fresh runtime (an agent restart) re-lists both deadlines from the
    // containers alone; the stopped sandbox is still there, not destroyed.
    let fresh = RuncRuntime::new(data, runc.clone());
    let listed = fresh.list().await.expect("list");
    let expired = listed
        .iter()
        .find(|s| s.id == expired_id)
        .expect("stopped, not destroyed");
    assert_eq!(expired.phase, Phase::Stopped);
    assert_eq!(expired.expires_at, Some(expired_at));
    let later = listed.iter().find(|s| s.id == later_id).expect("listed");
    assert_eq!(later.phase, Phase::Running, "not yet due");
    assert_eq!(later.expires_at, Some(later_at));
    assert!(runc_lists(&runc, &rt.runc_root(), &expired_id).await);

    for id in [&expired_id, &later_id] {
        assert_eq!(rt.destroy(id).await.expect("destroy").phase, Phase::Absent);
    }
}
