//! The docker runtime against the real Docker engine with the busybox image
//! imported from the same root filesystem the runc runtime uses: the whole
//! lifecycle (create, exec, stop, start, destroy), the limits and hardening
//! the container really gets (read back from the engine's inspect), exec
//! capping and timeouts, an agent restart (a second runtime over the same
//! engine and namespace) re-discovering a running sandbox, unknown images
//! refused (and a pull that cannot reach a registry failing within its
//! bound), a failed create cleaned up, and the TTL watchdog.
//!
//! Every test works in a namespace of its own and removes its containers
//! when it ends, whatever its outcome. Needs root, a Docker engine and
//! busybox-static; without them each test says why and skips, except in CI
//! (`CI` set), where it fails.

mod common;
use common::*;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use corral_agent::docker::{self, DockerConfig, DockerRuntime};
use corral_agent::runtime::{Phase, Runtime, RuntimeError, SandboxSpec};
use corral_agent::{images, AgentConfig, WatchdogConfig};

fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

/// The engine, with the busybox image imported, or why the test cannot run.
async fn prerequisites() -> Result<Docker, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not running as root".into());
    }
    if images::find_busybox().is_none() {
        return Err("busybox-static is not installed".into());
    }
    let engine = docker::connect()
        .await
        .map_err(|e| format!("no Docker engine: {e}"))?;
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root = images::build_busybox(tmp.path(), None).map_err(|e| e.to_string())?;
    docker::import_rootfs(&engine, "busybox", &root)
        .await
        .map_err(|e| format!("importing busybox: {e}"))?;
    Ok(engine)
}

/// The engine, or `None` after saying why the test skips (panics in CI).
async fn engine_or_skip(test: &str) -> Option<Docker> {
    match prerequisites().await {
        Ok(engine) => Some(engine),
        Err(reason) => {
            assert!(!required(), "CI must run {test}: {reason}");
            eprintln!("SKIPPED: {test}: {reason}");
            None
        }
    }
}

/// A namespace of the test's own; its containers are removed on drop.
struct Namespace(String);

impl Namespace {
    fn new() -> Self {
        Self(format!("t{:012x}", fastrand::u64(..) >> 16))
    }

    fn config(&self) -> DockerConfig {
        DockerConfig {
            namespace: self.0.clone(),
            ..DockerConfig::default()
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let listed = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label=corral.namespace={}", self.0))
            .output();
        if let Ok(out) = listed {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f", id])
                    .output();
            }
        }
    }
}

fn unique_id(prefix: &str) -> String {
    format!("{prefix}_{:016x}", fastrand::u64(..))
}

#[tokio::test]
async fn docker_sandbox_lifecycle_with_busybox() {
    let Some(engine) = engine_or_skip("docker_sandbox_lifecycle_with_busybox").await else {
        return;
    };
    let ns = Namespace::new();
    let rt = DockerRuntime::new(engine.clone(), ns.config())
        .await
        .expect("runtime");
    assert!(
        rt.images().contains(&"busybox".to_string()),
        "{:?}",
        rt.images()
    );
    assert_eq!(rt.kind(), "docker");
    assert!(rt.isolated());
    let id = unique_id("sbx_docker");

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
    let again = rt.create(&spec).await.expect("create is idempotent");
    assert_eq!(again.phase, Phase::Running);

    // The engine's own view: limits, hardening, labels, no network.
    let inspected = engine
        .inspect_container(&rt.container_name(&id), None)
        .await
        .expect("inspect");
    let host = inspected.host_config.clone().expect("host config");
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.memory, Some(64 * 1024 * 1024));
    assert_eq!(host.network_mode.as_deref(), Some("none"));
    assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
    assert_eq!(
        host.security_opt,
        Some(vec!["no-new-privileges".to_string()])
    );
    assert_eq!(host.privileged, Some(false));
    let labels = inspected.config.and_then(|c| c.labels).expect("labels");
    assert_eq!(labels.get("corral.sandbox_id"), Some(&id));
    assert_eq!(
        labels.get("corral.label.suite").map(String::as_str),
        Some("agent")
    );

    // Exec: output, env, cwd, exit codes.
    let out = exec(&rt, &id, &["echo", "hello"]).await;
    assert_eq!(stdout(&out), "hello\n");
    assert_eq!(out.exit_code, 0);
    let mut with_env = exec_spec(&["sh", "-c", "echo $GREETING $EXTRA; pwd; echo oops >&2"]);
    with_env.env.insert("EXTRA".into(), "and more".into());
    with_env.workdir = Some("/tmp".into());
    let out = rt.exec(&id, with_env).await.expect("exec");
    assert_eq!(stdout(&out), "hello from corral and more\n/tmp\n");
    assert_eq!(out.stderr, b"oops\n");
    assert_eq!(exec(&rt, &id, &["sh", "-c", "exit 3"]).await.exit_code, 3);

    // Isolation: the main process is PID 1, its own hostname, loopback only,
    // and only runc's default capabilities (CapEff of KILL, NET_BIND_SERVICE
    // and AUDIT_WRITE: bits 5, 10 and 29).
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
    let status = stdout(&exec(&rt, &id, &["cat", "/proc/1/status"]).await);
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .expect("CapEff");
    assert_eq!(cap_eff, "0000000020000420", "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')),
        "{status}"
    );

    // Capped output and a timeout that kills the process in the container.
    let mut capped = exec_spec(&["head", "-c", "200000", "/dev/zero"]);
    capped.max_output_bytes = 1000;
    let out = rt.exec(&id, capped).await.expect("exec");
    assert_eq!(out.stdout.len(), 1000);
    assert!(out.stdout_truncated);
    assert!(!out.stderr_truncated);
    let mut slow = exec_spec(&["sleep", "37"]);
    slow.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let out = rt.exec(&id, slow).await.expect("exec");
    assert!(out.timed_out);
    assert_eq!(out.exit_code, -1);
    assert!(started.elapsed() < Duration::from_secs(5));
    eventually(
        "the timed-out process to be gone from the container",
        || async {
            let ps = exec(&rt, &id, &["ps", "-o", "args"]).await;
            !stdout(&ps).contains("sleep 37")
        },
    )
    .await;

    // An agent restart: a new runtime on the same namespace sees it running;
    // a runtime of another namespace does not see it at all.
    let restarted = DockerRuntime::new(engine.clone(), ns.config())
        .await
        .expect("runtime");
    let listed = restarted.list().await.expect("list");
    let found = listed.iter().find(|s| s.id == id).expect("re-discovered");
    assert_eq!(found.phase, Phase::Running);
    assert_eq!(found.image, "busybox");
    let other = Namespace::new();
    let stranger = DockerRuntime::new(engine.clone(), other.config())
        .await
        .expect("runtime");
    assert!(stranger.list().await.expect("list").is_empty());

    // Files written survive a stop and a start (the container's layer).
    exec(&rt, &id, &["sh", "-c", "echo kept > /root/file"]).await;
    let started = Instant::now();
    let stopped = rt
        .stop(&id, Duration::from_millis(300))
        .await
        .expect("stop");
    assert_eq!(stopped.phase, Phase::Stopped);
    assert_eq!(
        stopped.exit_code,
        Some(137),
        "sleep as PID 1 ignores TERM: killed"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the grace is the runtime's, in milliseconds: {:?}",
        started.elapsed()
    );
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
    let found = listed.iter().find(|s| s.id == id).expect("listed");
    assert_eq!((found.phase, found.exit_code), (Phase::Stopped, Some(137)));

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

    // Destroy: gone from the engine; a second destroy is fine.
    let gone = rt.destroy(&id).await.expect("destroy");
    assert_eq!(gone.phase, Phase::Absent);
    assert!(engine
        .inspect_container(&rt.container_name(&id), None)
        .await
        .is_err());
    assert_eq!(
        rt.destroy(&id).await.expect("destroy again").phase,
        Phase::Absent
    );
    assert!(rt.list().await.expect("list").iter().all(|s| s.id != id));
    assert!(matches!(
        rt.start(&id).await,
        Err(RuntimeError::SandboxNotFound(_))
    ));
    assert!(matches!(
        rt.exec(&id, exec_spec(&["true"])).await,
        Err(RuntimeError::SandboxNotFound(_))
    ));
}

#[tokio::test]
async fn docker_refuses_unknown_images_and_leaves_nothing_behind() {
    let Some(engine) =
        engine_or_skip("docker_refuses_unknown_images_and_leaves_nothing_behind").await
    else {
        return;
    };
    let ns = Namespace::new();
    let rt = DockerRuntime::new(engine, ns.config())
        .await
        .expect("runtime");
    let spec = SandboxSpec {
        id: unique_id("sbx_noimg"),
        image: "no-such-image".into(),
        command: vec!["true".into()],
        ..Default::default()
    };
    let err = rt.create(&spec).await.expect_err("unknown image");
    assert_eq!(err, RuntimeError::ImageNotFound("no-such-image".into()));
    assert!(rt.list().await.expect("list").is_empty());
    assert!(!rt.images().contains(&"no-such-image".to_string()));
}

#[tokio::test]
async fn a_pull_from_an_unreachable_registry_fails_cleanly_within_its_bound() {
    let Some(engine) =
        engine_or_skip("a_pull_from_an_unreachable_registry_fails_cleanly_within_its_bound").await
    else {
        return;
    };
    // A "registry" on loopback that accepts connections and never answers:
    // the engine waits on it, so only our bound ends the pull.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let registry = silent.local_addr().expect("addr").to_string();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    let ns = Namespace::new();
    let mut config = ns.config();
    config.pull_timeout = Some(Duration::from_secs(2));
    config.registry = Some(registry);
    let rt = DockerRuntime::new(engine.clone(), config)
        .await
        .expect("runtime");
    let spec = SandboxSpec {
        id: unique_id("sbx_pull"),
        image: "not-local-anywhere".into(),
        command: vec!["true".into()],
        ..Default::default()
    };
    let started = Instant::now();
    let err = rt.create(&spec).await.expect_err("no registry answers");
    let took = started.elapsed();
    held.abort();
    assert!(
        matches!(&err, RuntimeError::ImageNotFound(m) if m.contains("not-local-anywhere") && m.contains("pulling it")),
        "{err:?}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "bounded by the pull timeout: {took:?}"
    );
    assert!(rt.list().await.expect("list").is_empty());

    // The engine's default registry is not reachable from here either (no
    // network): that fails with a clear error too, however fast.
    let mut config = ns.config();
    config.pull_timeout = Some(Duration::from_secs(5));
    let rt = DockerRuntime::new(engine, config).await.expect("runtime");
    let err = rt.create(&spec).await.expect_err("no registry reachable");
    assert!(
        matches!(&err, RuntimeError::ImageNotFound(m) if m.contains("pulling it")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_main_process_that_cannot_start_fails_the_create_cleanly() {
    let Some(engine) =
        engine_or_skip("a_main_process_that_cannot_start_fails_the_create_cleanly").await
    else {
        return;
    };
    let ns = Namespace::new();
    let rt = DockerRuntime::new(engine, ns.config())
        .await
        .expect("runtime");
    let spec = SandboxSpec {
        id: unique_id("sbx_nocmd"),
        image: "busybox".into(),
        command: vec!["/no/such/binary".into()],
        ..Default::default()
    };
    let err = rt.create(&spec).await.expect_err("the start fails");
    assert!(matches!(err, RuntimeError::Runtime(_)), "{err:?}");
    assert!(
        rt.list().await.expect("list").is_empty(),
        "a failed create leaves no container"
    );
}

fn to_millis(t: SystemTime) -> SystemTime {
    let ms = t
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis();
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).expect("fits"))
}

#[tokio::test]
async fn the_watchdog_stops_a_docker_sandbox_past_its_ttl_and_the_deadline_is_a_label() {
    let Some(engine) = engine_or_skip(
        "the_watchdog_stops_a_docker_sandbox_past_its_ttl_and_the_deadline_is_a_label",
    )
    .await
    else {
        return;
    };
    let ns = Namespace::new();
    let rt = DockerRuntime::new(engine.clone(), ns.config())
        .await
        .expect("runtime");
    let now = SystemTime::now();
    let expired_id = unique_id("sbx_ttl");
    let later_id = unique_id("sbx_later");
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
        assert_eq!(created.expires_at, Some(expires_at));
    }

    let shared: Arc<dyn Runtime> = Arc::new(
        DockerRuntime::new(engine.clone(), ns.config())
            .await
            .expect("runtime"),
    );
    let config = AgentConfig {
        control_plane_url: "http://127.0.0.1:1".into(),
        token: "host-token".into(),
        poll_interval: Duration::from_millis(100),
        tls: Default::default(),
        ..AgentConfig::default()
    };
    let watchdog = WatchdogConfig {
        ttl_margin: Duration::from_secs(1),
        stop_grace: Duration::from_millis(300),
    };
    let agent = tokio::spawn(corral_agent::run_agent_with(
        config,
        watchdog,
        shared,
        std::future::pending(),
    ));
    eventually("the watchdog stops the expired docker sandbox", || async {
        rt.list()
            .await
            .expect("list")
            .iter()
            .any(|s| s.id == expired_id && s.phase == Phase::Stopped)
    })
    .await;
    agent.abort();

    let fresh = DockerRuntime::new(engine, ns.config())
        .await
        .expect("runtime");
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
}
