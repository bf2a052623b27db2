//! The process runtime with real child processes: the whole lifecycle
//! (create, exec, stop, start, destroy), exit codes recorded by the reaper,
//! the agent's environment kept out of sandboxes, a timed-out exec's process
//! group killed, and an agent restart (a second runtime over the same data
//! directory) re-discovering a running sandbox, and the TTL deadline kept in
//! meta.json for the watchdog's stop.

mod common;
use common::*;

use std::time::{Duration, SystemTime};

use corral_agent::process::ProcessRuntime;
use corral_agent::runtime::{Phase, Runtime, RuntimeError, SandboxSpec};

fn unique_id(prefix: &str) -> String {
    format!("{prefix}_{:016x}", fastrand::u64(..))
}

/// Kills the sandbox's processes whatever the test's outcome.
struct Cleanup<'a>(&'a ProcessRuntime, String);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let meta = std::fs::read_to_string(self.0.sandbox_dir(&self.1).join("meta.json"))
            .unwrap_or_default();
        let pid = serde_json::from_str::<serde_json::Value>(&meta)
            .ok()
            .and_then(|m| m["pid"].as_i64())
            .and_then(|p| i32::try_from(p).ok());
        if let Some(pid) = pid.filter(|p| *p > 1) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[tokio::test]
async fn process_sandbox_lifecycle() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rt = ProcessRuntime::new(tmp.path());
    assert!(!rt.isolated());
    assert_eq!(rt.images(), vec!["host".to_string()]);
    let id = unique_id("sbx_proc");
    let _cleanup = Cleanup(&rt, id.clone());
    let mut spec = SandboxSpec {
        id: id.clone(),
        image: "host".into(),
        command: vec!["sleep".into(), "600".into()],
        ..Default::default()
    };
    spec.env
        .insert("GREETING".into(), "hello from corral".into());

    let created = rt.create(&spec).await.expect("create");
    assert_eq!(created.phase, Phase::Running);
    assert_eq!(
        rt.create(&spec).await.expect("idempotent").phase,
        Phase::Running
    );

    let out = rt
        .exec(&id, exec_spec(&["echo", "hello"]))
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"hello\n");
    assert_eq!(out.exit_code, 0);
    // The sandbox's env and working directory; never the agent's env.
    std::env::var("PATH").expect("the test has a PATH");
    let out = rt
        .exec(
            &id,
            exec_spec(&[
                "sh",
                "-c",
                "echo $GREETING; pwd; env | grep -c CARGO || true",
            ]),
        )
        .await
        .expect("exec");
    let dir = rt.sandbox_dir(&id).canonicalize().expect("dir");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("hello from corral\n{}\n0\n", dir.display())
    );
    assert_eq!(
        rt.exec(&id, exec_spec(&["sh", "-c", "exit 3"]))
            .await
            .expect("exec")
            .exit_code,
        3
    );
    let missing = rt
        .exec(&id, exec_spec(&["/no/such/binary"]))
        .await
        .expect("exec");
    assert_eq!(missing.exit_code, 127);

    // A timed-out exec takes its whole process group with it.
    let marker = format!("{}", 30_000 + fastrand::u32(0..10_000));
    let mut slow = exec_spec(&[
        "sh",
        "-c",
        &format!("sleep {marker} & sleep {marker}; true"),
    ]);
    slow.timeout = Duration::from_millis(300);
    let out = rt.exec(&id, slow).await.expect("exec");
    assert!(out.timed_out);
    eventually("the exec's children to be killed", || {
        let marker = marker.clone();
        async move {
            let ps = std::process::Command::new("pgrep")
                .args(["-f", &format!("sleep {marker}")])
                .output();
            match ps {
                Ok(out) => out.stdout.is_empty(),
                // No pgrep: look through /proc.
                Err(_) => !std::fs::read_dir("/proc").is_ok_and(|d| {
                    d.filter_map(|e| e.ok()).any(|e| {
                        std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                            String::from_utf8_lossy(&c).contains(&format!("sleep\0{marker}"))
                        })
                    })
                }),
            }
        }
    })
    .await;

    // An agent restart re-discovers it, running.
    let restarted = ProcessRuntime::new(tmp.path());
    let listed = restarted.list().await.expect("list");
    let found = listed.iter().find(|s| s.id == id).expect("re-discovered");
    assert_eq!(
        (found.phase, found.image.as_str()),
        (Phase::Running, "host")
    );

    // `sleep` dies of SIGTERM: the exit code is 128 + 15.
    let stopped = rt.stop(&id, Duration::from_secs(5)).await.expect("stop");
    assert_eq!(stopped.phase, Phase::Stopped);
    assert_eq!(stopped.exit_code, Some(143));
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

    assert_eq!(rt.start(&id).await.expect("start").phase, Phase::Running);
    assert_eq!(
        rt.start(&id).await.expect("start again").phase,
        Phase::Running
    );
    let listed = rt.list().await.expect("list");
    assert_eq!(
        listed.iter().find(|s| s.id == id).map(|s| s.phase),
        Some(Phase::Running)
    );

    let gone = rt.destroy(&id).await.expect("destroy");
    assert_eq!(gone.phase, Phase::Absent);
    assert!(!rt.sandbox_dir(&id).exists());
    assert_eq!(
        rt.destroy(&id).await.expect("destroy again").phase,
        Phase::Absent
    );
    assert!(rt.list().await.expect("list").is_empty());
    assert!(matches!(
        rt.start(&id).await,
        Err(RuntimeError::SandboxNotFound(_))
    ));
}

#[tokio::test]
async fn a_process_that_exits_on_its_own_is_stopped_with_its_code() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rt = ProcessRuntime::new(tmp.path());
    let id = unique_id("sbx_exit");
    let _cleanup = Cleanup(&rt, id.clone());
    let spec = SandboxSpec {
        id: id.clone(),
        image: "host".into(),
        command: vec!["sh".into(), "-c".into(), "exit 7".into()],
        ..Default::default()
    };
    rt.create(&spec).await.expect("create");
    eventually("the exit to be recorded", || async {
        let listed = rt.list().await.expect("list");
        listed
            .iter()
            .any(|s| s.id == id && s.phase == Phase::Stopped && s.exit_code == Some(7))
    })
    .await;
    // A main process that runs longer than its grace is killed.
    let spec = SandboxSpec {
        id: unique_id("sbx_stubborn"),
        image: "host".into(),
        command: vec![
            "sh".into(),
            "-c".into(),
            "trap '' TERM; touch ready; while true; do sleep 1; done".into(),
        ],
        ..Default::default()
    };
    let _cleanup2 = Cleanup(&rt, spec.id.clone());
    rt.create(&spec).await.expect("create");
    let ready = rt.sandbox_dir(&spec.id).join("ready");
    eventually("the trap to be set", || {
        let ready = ready.clone();
        async move { ready.exists() }
    })
    .await;
    let stopped = rt
        .stop(&spec.id, Duration::from_millis(200))
        .await
        .expect("stop");
    assert_eq!(stopped.phase, Phase::Stopped);
    assert_eq!(
        stopped.exit_code,
        Some(137),
        "killed by SIGKILL after the grace"
    );
}

#[tokio::test]
async fn unknown_images_and_bad_ids_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rt = ProcessRuntime::new(tmp.path());
    let spec = SandboxSpec {
        id: unique_id("sbx_img"),
        image: "alpine".into(),
        command: vec!["true".into()],
        ..Default::default()
    };
    assert!(matches!(
        rt.create(&spec).await,
        Err(RuntimeError::ImageNotFound(_))
    ));
    assert!(!rt.sandbox_dir(&spec.id).exists());
    let bad = SandboxSpec {
        id: "../escape".into(),
        ..spec
    };
    assert!(matches!(
        rt.create(&bad).await,
        Err(RuntimeError::InvalidArgument(_))
    ));
    assert!(matches!(
        rt.destroy("../escape").await,
        Err(RuntimeError::InvalidArgument(_))
    ));
    assert!(!tmp.path().join("escape").exists());
}

#[tokio::test]
async fn the_ttl_deadline_is_kept_and_only_an_overdue_sandbox_is_stopped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rt = ProcessRuntime::new(tmp.path());
    let id = unique_id("sbx_ttl");
    let _cleanup = Cleanup(&rt, id.clone());
    let now = SystemTime::now();
    let expires_at = now - Duration::from_secs(10);
    let spec = SandboxSpec {
        id: id.clone(),
        image: "host".into(),
        command: vec!["sleep".into(), "600".into()],
        expires_at: Some(expires_at),
        ..Default::default()
    };
    assert_eq!(
        rt.create(&spec).await.expect("create").expires_at,
        Some(expires_at)
    );

    // A restarted agent reads the deadline back from meta.json.
    let fresh = ProcessRuntime::new(tmp.path());
    let listed = fresh.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].expires_at, Some(expires_at));

    let inside_margin = fresh
        .stop_if_overdue(&id, now, Duration::from_secs(60), Duration::ZERO)
        .await
        .expect("inside the margin");
    assert_eq!(inside_margin, None);
    assert_eq!(fresh.list().await.expect("list")[0].phase, Phase::Running);
    let stopped = fresh
        .stop_if_overdue(&id, now, Duration::from_secs(1), Duration::from_secs(5))
        .await
        .expect("overdue")
        .expect("stopped");
    assert_eq!(stopped.phase, Phase::Stopped);
    assert_eq!(stopped.expires_at, Some(expires_at));
    assert_eq!(
        fresh
            .stop_if_overdue(&id, now, Duration::from_secs(1), Duration::ZERO)
            .await
            .expect("already stopped"),
        None
    );
    assert_eq!(rt.destroy(&id).await.expect("destroy").phase, Phase::Absent);
}
