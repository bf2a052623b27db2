//! The docker runtime: each sandbox is a container of the local Docker
//! Engine, driven through its API (bollard), never through the `docker` CLI
//! or a shell.
//!
//! Owns the containers labelled `corral.namespace=<namespace>` on the
//! engine, and nothing else: two agents (or two test runs) sharing an engine
//! use different namespaces and never see each other's containers. A
//! sandbox's container is named `<namespace>-<sandbox id>` and carries its
//! whole record in labels (`corral.sandbox_id`, `corral.image`,
//! `corral.expires_at_unix_ms` when it has a TTL, `corral.label.<k>`), so
//! the engine is the only truth: a restarted agent lists the same containers
//! and never touches a running one.
//!
//! Semantics mirror the runc runtime: the main process is PID 1 of the
//! container (no init is injected), stop is SIGTERM, then SIGKILL after the
//! grace, timed to the millisecond by the runtime itself; a stopped
//! container keeps its writable layer, so `start` resumes with the
//! sandbox's files. Hardening mirrors the runc runtime's: every capability
//! is dropped but `AUDIT_WRITE`, `KILL` and `NET_BIND_SERVICE`
//! ([`crate::hardening`]), `no-new-privileges`, an open-files limit of 1024,
//! the pids limit, a read-only root when asked, the engine's default seccomp
//! profile (which ours is modelled on) and masked paths, no restart policy,
//! and network mode `none` (loopback only, as runc's fresh network
//! namespace) unless the sandbox asked for `host`, so a sandbox reaches
//! neither the host nor other sandboxes. User namespaces are the engine's
//! (`userns-remap`): a sandbox asking for one is refused as unsupported.
//!
//! Images: a Corral image name `X` is the engine's local image `X:latest`
//! ([`docker_reference`]); `corral-agent image build-busybox --docker`
//! imports the same busybox root filesystem the runc runtime uses
//! ([`import_rootfs`], the API's `docker import`). An image missing locally
//! is pulled only when a pull timeout is configured, bounded by it, and a
//! failed or timed-out pull is a clear `ImageNotFound`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HostConfig,
    HostConfigLogConfig, ResourcesUlimits, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, ListImagesOptionsBuilder, RemoveContainerOptionsBuilder,
    TagImageOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;

use crate::exec_io::CappedBuffer;
use crate::runtime::{
    expiry_from_unix_ms, expiry_to_unix_ms, validate_exec, validate_image_name,
    validate_sandbox_id, validate_spec, ExecOutput, ExecSpec, Phase, Runtime, RuntimeError,
    SandboxLocks, SandboxSpec, SandboxStatus,
};

/// Labels written on every container.
pub const LABEL_NAMESPACE: &str = "corral.namespace";
pub const LABEL_SANDBOX_ID: &str = "corral.sandbox_id";
pub const LABEL_IMAGE: &str = "corral.image";
pub const LABEL_EXPIRES_AT: &str = "corral.expires_at_unix_ms";
pub const LABEL_PREFIX: &str = "corral.label.";

/// The namespace when none is configured.
pub const DEFAULT_NAMESPACE: &str = "corral";
/// The tag every Corral image has on the engine.
pub const IMAGE_TAG: &str = "latest";
/// The only capabilities a sandbox keeps (the runc runtime's set).
pub const CAPABILITIES: &[&str] = crate::hardening::DOCKER_CAPABILITIES;
/// The open-files limit runc's default config sets.
const NOFILE_LIMIT: i64 = 1024;
/// Bound on every engine request other than an exec's output and a pull.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for a container to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How often the state is polled while waiting for a stop.
const STOP_POLL: Duration = Duration::from_millis(50);
/// How long an exec's exit code may lag behind the end of its output.
const EXEC_EXIT_WAIT: Duration = Duration::from_secs(5);

/// How the docker runtime is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerConfig {
    /// Which containers are this agent's (the `corral.namespace` label and
    /// the container-name prefix). Same rule as an image name.
    pub namespace: String,
    /// Pull a missing image, for at most this long; `None` never pulls.
    pub pull_timeout: Option<Duration>,
    /// The registry to pull from (`host[:port]`); `None` is the engine's
    /// default registry.
    pub registry: Option<String>,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.into(),
            pull_timeout: None,
            registry: None,
        }
    }
}

/// The Docker-Engine-backed runtime.
#[derive(Debug)]
pub struct DockerRuntime {
    docker: Docker,
    config: DockerConfig,
    locks: SandboxLocks,
    /// The usable local images, refreshed by every `list` and `create`
    /// (`Runtime::images` cannot ask the engine: it is not async).
    images: Mutex<Vec<String>>,
}

/// The engine's reference of Corral image `name`: `name:latest`.
pub fn docker_reference(name: &str) -> String {
    format!("{name}:{IMAGE_TAG}")
}

/// The Corral image names among the engine's repo tags: `X:latest` with a
/// valid image name `X`; sorted, without duplicates.
pub fn corral_images<'a>(repo_tags: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut names: Vec<String> = repo_tags
        .into_iter()
        .filter_map(|tag| tag.strip_suffix(&format!(":{IMAGE_TAG}")))
        .filter(|name| validate_image_name(name).is_ok())
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The container name of a sandbox.
pub fn container_name(namespace: &str, id: &str) -> String {
    format!("{namespace}-{id}")
}

/// The labels of a sandbox's container.
pub fn container_labels(namespace: &str, spec: &SandboxSpec) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> = spec
        .labels
        .iter()
        .map(|(k, v)| (format!("{LABEL_PREFIX}{k}"), v.clone()))
        .collect();
    labels.insert(LABEL_NAMESPACE.into(), namespace.into());
    labels.insert(LABEL_SANDBOX_ID.into(), spec.id.clone());
    labels.insert(LABEL_IMAGE.into(), spec.image.clone());
    match expiry_to_unix_ms(spec.expires_at) {
        0 => {}
        ms => {
            labels.insert(LABEL_EXPIRES_AT.into(), ms.to_string());
        }
    }
    labels
}

/// The image and TTL deadline a container's labels record. An unreadable
/// deadline counts as none (and is logged): the control plane's TTL still
/// applies.
pub fn labelled(id: &str, labels: &HashMap<String, String>) -> (String, Option<SystemTime>) {
    let image = labels.get(LABEL_IMAGE).cloned().unwrap_or_default();
    let expires_at = labels
        .get(LABEL_EXPIRES_AT)
        .and_then(|v| match v.parse::<i64>() {
            Ok(ms) => expiry_from_unix_ms(ms),
            Err(_) => {
                tracing::warn!(sandbox.id = %id, value = %v, "ignoring an unreadable TTL label");
                None
            }
        });
    (image, expires_at)
}

/// The container a sandbox spec becomes: the argv as `Cmd` with no
/// entrypoint (never a shell), env with a default PATH, working directory,
/// hostname, limits, hardening and labels.
pub fn container_config(
    namespace: &str,
    spec: &SandboxSpec,
) -> Result<ContainerCreateBody, RuntimeError> {
    let memory = match spec.memory_mb {
        0 => None,
        mb => Some(
            mb.checked_mul(1024 * 1024)
                .and_then(|b| i64::try_from(b).ok())
                .ok_or_else(|| RuntimeError::InvalidArgument("memory_mb is too large".into()))?,
        ),
    };
    if spec.user_namespace {
        // The engine maps users per daemon (`userns-remap`), not per
        // container: a sandbox cannot ask for it here.
        return Err(RuntimeError::Unsupported(
            "user_namespace is not supported on the docker runtime (configure the engine's userns-remap instead)".into(),
        ));
    }
    let host_config = HostConfig {
        nano_cpus: (spec.cpu_millis > 0).then(|| i64::from(spec.cpu_millis) * 1_000_000),
        memory,
        // No swap beyond the limit, as runc's limit alone gives.
        memory_swap: memory,
        network_mode: Some(if spec.host_network { "host" } else { "none" }.into()),
        cap_drop: Some(vec!["ALL".into()]),
        cap_add: Some(CAPABILITIES.iter().map(|c| c.to_string()).collect()),
        security_opt: Some(vec!["no-new-privileges".into()]),
        readonly_rootfs: Some(spec.read_only_root),
        pids_limit: Some(i64::from(spec.effective_pids_limit())),
        privileged: Some(false),
        init: Some(false),
        ulimits: Some(vec![ResourcesUlimits {
            name: Some("nofile".into()),
            soft: Some(NOFILE_LIMIT),
            hard: Some(NOFILE_LIMIT),
        }]),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([
                ("max-size".to_string(), "10m".to_string()),
                ("max-file".to_string(), "2".to_string()),
            ])),
        }),
        ..Default::default()
    };
    Ok(ContainerCreateBody {
        image: Some(docker_reference(&spec.image)),
        cmd: Some(spec.command.clone()),
        // An image's entrypoint would wrap the argv; there is none.
        entrypoint: Some(Vec::new()),
        env: Some(spec.env_list()),
        working_dir: Some(spec.workdir.clone().unwrap_or_else(|| "/".into())),
        hostname: Some(spec.effective_hostname()),
        labels: Some(container_labels(namespace, spec)),
        tty: Some(false),
        attach_stdin: Some(false),
        open_stdin: Some(false),
        host_config: Some(host_config),
        ..Default::default()
    })
}

/// The phase of an engine container state.
pub fn phase_of(status: Option<ContainerStateStatusEnum>) -> Phase {
    use ContainerStateStatusEnum as S;
    match status {
        Some(S::RUNNING | S::RESTARTING | S::STOPPING) => Phase::Running,
        Some(S::EXITED | S::DEAD | S::REMOVING) => Phase::Stopped,
        // created, paused: present, not running its work.
        _ => Phase::Created,
    }
}

/// The exit code in a container list's status text, `"Exited (137) 2
/// seconds ago"`.
pub fn exit_code_in_status(status: &str) -> Option<i32> {
    let rest = status.strip_prefix("Exited (")?;
    rest.split(')').next()?.parse().ok()
}

fn engine_error(context: impl std::fmt::Display, e: bollard::errors::Error) -> RuntimeError {
    RuntimeError::runtime(context, e)
}

fn is_status(e: &bollard::errors::Error, code: u16) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code, .. } if *status_code == code)
}

/// Bounds an engine request.
async fn bounded<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<Result<T, bollard::errors::Error>, RuntimeError> {
    tokio::time::timeout(ENGINE_TIMEOUT, fut)
        .await
        .map_err(|_| {
            RuntimeError::Runtime(format!(
                "{what}: the engine did not answer within {ENGINE_TIMEOUT:?}"
            ))
        })
}

/// Connects to the local engine (`DOCKER_HOST` or the default socket) and
/// agrees on an API version it speaks.
pub async fn connect() -> Result<Docker, RuntimeError> {
    let docker = Docker::connect_with_local_defaults()
        .map_err(|e| engine_error("connecting to the Docker engine", e))?;
    bounded(
        "negotiating the engine API version",
        docker.negotiate_version(),
    )
    .await?
    .map_err(|e| engine_error("reaching the Docker engine", e))
}

/// Imports a root filesystem directory as the engine's image
/// `<name>:latest` (the API's `docker import`), replacing the tag if it
/// exists.
pub async fn import_rootfs(docker: &Docker, name: &str, rootfs: &Path) -> Result<(), RuntimeError> {
    validate_image_name(name)?;
    let dir = rootfs.to_path_buf();
    let tarball = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        builder.follow_symlinks(false);
        builder.append_dir_all(".", &dir)?;
        builder.into_inner()
    })
    .await
    .map_err(|e| RuntimeError::runtime("packing the rootfs", e))?
    .map_err(|e| RuntimeError::runtime(format!("packing {}", rootfs.display()), e))?;
    let options = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo(name)
        .tag(IMAGE_TAG)
        .build();
    let mut stream = docker.create_image(
        Some(options),
        Some(bollard::body_full(tarball.into())),
        None,
    );
    let import = async {
        while let Some(item) = stream.next().await {
            item.map_err(|e| engine_error(format!("importing image {name}"), e))?;
        }
        Ok::<(), RuntimeError>(())
    };
    tokio::time::timeout(ENGINE_TIMEOUT, import)
        .await
        .map_err(|_| {
            RuntimeError::Runtime(format!(
                "importing image {name} took longer than {ENGINE_TIMEOUT:?}"
            ))
        })??;
    tracing::info!(image = name, "image imported into the Docker engine");
    Ok(())
}

impl DockerRuntime {
    /// A runtime on `docker` (see [`connect`]). Reads the image list once.
    pub async fn new(docker: Docker, config: DockerConfig) -> Result<Self, RuntimeError> {
        validate_image_name(&config.namespace).map_err(|_| {
            RuntimeError::InvalidArgument(format!(
                "invalid docker namespace {:?}: [a-z0-9][a-z0-9._-]{{0,63}}",
                config.namespace
            ))
        })?;
        let runtime = Self {
            docker,
            config,
            locks: SandboxLocks::default(),
            images: Mutex::new(Vec::new()),
        };
        runtime.refresh_images().await?;
        Ok(runtime)
    }

    /// The engine client.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The container name of a sandbox of this runtime.
    pub fn container_name(&self, id: &str) -> String {
        container_name(&self.config.namespace, id)
    }

    async fn refresh_images(&self) -> Result<Vec<String>, RuntimeError> {
        let listed = bounded(
            "listing images",
            self.docker
                .list_images(Some(ListImagesOptionsBuilder::default().build())),
        )
        .await?
        .map_err(|e| engine_error("listing images", e))?;
        let names = corral_images(
            listed
                .iter()
                .flat_map(|i| i.repo_tags.iter().map(String::as_str)),
        );
        *self.images.lock().unwrap_or_else(|p| p.into_inner()) = names.clone();
        Ok(names)
    }

    /// The container of a sandbox, or `None` when the engine has none.
    async fn inspect(&self, id: &str) -> Result<Option<ContainerInspectResponse>, RuntimeError> {
        let name = self.container_name(id);
        match bounded(
            "inspecting a container",
            self.docker.inspect_container(&name, None),
        )
        .await?
        {
            Ok(c) => {
                let ours = c
                    .config
                    .as_ref()
                    .and_then(|c| c.labels.as_ref())
                    .and_then(|l| l.get(LABEL_NAMESPACE))
                    .is_some_and(|ns| *ns == self.config.namespace);
                if ours {
                    Ok(Some(c))
                } else {
                    Err(RuntimeError::Runtime(format!(
                        "container {name} exists but is not labelled as this agent's"
                    )))
                }
            }
            Err(e) if is_status(&e, 404) => Ok(None),
            Err(e) => Err(engine_error(format!("inspecting {name}"), e)),
        }
    }

    fn status_of(&self, id: &str, c: &ContainerInspectResponse) -> SandboxStatus {
        let empty = HashMap::new();
        let labels = c
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .unwrap_or(&empty);
        let (image, expires_at) = labelled(id, labels);
        let state = c.state.as_ref();
        let phase = phase_of(state.and_then(|s| s.status));
        let exit_code = match phase {
            Phase::Stopped => state
                .and_then(|s| s.exit_code)
                .and_then(|c| i32::try_from(c).ok()),
            _ => None,
        };
        SandboxStatus {
            id: id.to_string(),
            phase,
            exit_code,
            image,
            expires_at,
        }
    }

    async fn current(&self, id: &str) -> Result<Option<SandboxStatus>, RuntimeError> {
        Ok(self.inspect(id).await?.map(|c| self.status_of(id, &c)))
    }

    async fn status_or_not_found(&self, id: &str) -> Result<SandboxStatus, RuntimeError> {
        self.current(id)
            .await?
            .ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))
    }

    /// Makes sure image `name` is local: pulled (bounded) when it is not and
    /// pulling is configured, else `ImageNotFound`.
    async fn ensure_image(&self, name: &str) -> Result<(), RuntimeError> {
        let reference = docker_reference(name);
        match bounded("inspecting an image", self.docker.inspect_image(&reference)).await? {
            Ok(_) => return Ok(()),
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(engine_error(format!("inspecting image {reference}"), e)),
        }
        let Some(timeout) = self.config.pull_timeout else {
            return Err(RuntimeError::ImageNotFound(name.to_string()));
        };
        let started = Instant::now();
        match tokio::time::timeout(timeout, self.pull(name)).await {
            Ok(Ok(())) => {
                tracing::info!(image = name, elapsed = ?started.elapsed(), "image pulled");
                let _ = self.refresh_images().await;
                Ok(())
            }
            Ok(Err(reason)) => {
                tracing::warn!(image = name, %reason, "pulling the image failed");
                Err(RuntimeError::ImageNotFound(format!(
                    "{name} (not on this host, and pulling it failed: {reason})"
                )))
            }
            Err(_) => {
                tracing::warn!(image = name, ?timeout, "pulling the image timed out");
                Err(RuntimeError::ImageNotFound(format!(
                    "{name} (not on this host, and pulling it did not finish within {timeout:?})"
                )))
            }
        }
    }

    /// Pulls `name:latest` from the configured registry and tags it as the
    /// local `name:latest`.
    async fn pull(&self, name: &str) -> Result<(), String> {
        let from = match &self.config.registry {
            Some(registry) => format!("{registry}/{name}"),
            None => name.to_string(),
        };
        let options = CreateImageOptionsBuilder::default()
            .from_image(&from)
            .tag(IMAGE_TAG)
            .build();
        let mut stream = self.docker.create_image(Some(options), None, None);
        while let Some(item) = stream.next().await {
            item.map_err(|e| e.to_string())?;
        }
        if self.config.registry.is_some() {
            let tag = TagImageOptionsBuilder::default()
                .repo(name)
                .tag(IMAGE_TAG)
                .build();
            self.docker
                .tag_image(&format!("{from}:{IMAGE_TAG}"), Some(tag))
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let name = self.container_name(id);
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match bounded(
            "removing a container",
            self.docker.remove_container(&name, Some(options)),
        )
        .await?
        {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(engine_error(format!("removing {name}"), e)),
        }
    }

    async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        let name = self.container_name(id);
        bounded(
            "starting a container",
            self.docker.start_container(&name, None),
        )
        .await?
        .map_err(|e| engine_error(format!("starting {name}"), e))
    }

    async fn signal(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        let name = self.container_name(id);
        let options = KillContainerOptionsBuilder::default()
            .signal(signal)
            .build();
        match bounded(
            "signalling a container",
            self.docker.kill_container(&name, Some(options)),
        )
        .await?
        {
            Ok(()) => Ok(()),
            // Not running (any more), or gone: the process exited meanwhile.
            Err(e) if is_status(&e, 409) || is_status(&e, 404) => Ok(()),
            Err(e) => Err(engine_error(format!("sending {signal} to {name}"), e)),
        }
    }

    /// Waits until the container is stopped (or gone), up to `wait`.
    async fn wait_stopped(&self, id: &str, wait: Duration) -> Result<bool, RuntimeError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.current(id).await? {
                None => return Ok(true),
                Some(s) if s.phase == Phase::Stopped => return Ok(true),
                Some(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(STOP_POLL).await;
        }
    }

    async fn create_locked(&self, spec: &SandboxSpec) -> Result<(), RuntimeError> {
        let name = self.container_name(&spec.id);
        let config = container_config(&self.config.namespace, spec)?;
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        bounded(
            "creating a container",
            self.docker.create_container(Some(options), config),
        )
        .await?
        .map_err(|e| engine_error(format!("creating {name}"), e))?;
        self.start_container(&spec.id).await
    }

    /// [`Runtime::stop`] with the sandbox's lock already held.
    async fn stop_locked(&self, id: &str, grace: Duration) -> Result<SandboxStatus, RuntimeError> {
        let status = self.status_or_not_found(id).await?;
        if status.phase == Phase::Stopped {
            return Ok(status);
        }
        if status.phase == Phase::Created {
            // Never started (or paused): nothing runs its work. A paused
            // container must be resumed for its signals to arrive.
            if let Some(c) = self.inspect(id).await? {
                if c.state.as_ref().and_then(|s| s.status) != Some(ContainerStateStatusEnum::PAUSED)
                {
                    return Ok(status);
                }
                let _ = self
                    .docker
                    .unpause_container(&self.container_name(id))
                    .await;
            }
        }
        self.signal(id, "SIGTERM").await?;
        if !self.wait_stopped(id, grace).await? {
            tracing::info!(sandbox.id = %id, ?grace, "still running after the grace period; killing");
            self.signal(id, "SIGKILL").await?;
            if !self.wait_stopped(id, KILL_WAIT).await? {
                return Err(RuntimeError::Runtime(format!(
                    "sandbox {id} did not stop after SIGKILL"
                )));
            }
        }
        tracing::info!(sandbox.id = %id, "sandbox stopped");
        self.status_or_not_found(id).await
    }

    /// Kills an exec'd process that outlived its timeout: the engine has no
    /// call for it, so by its host pid (the engine is local).
    async fn kill_exec(&self, exec_id: &str) {
        let pid = self
            .docker
            .inspect_exec(exec_id)
            .await
            .ok()
            .and_then(|e| e.pid)
            .and_then(|p| i32::try_from(p).ok())
            .filter(|p| *p > 1);
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// The exit code of a finished exec, once the engine has it.
    async fn exec_exit_code(&self, exec_id: &str) -> Result<i32, RuntimeError> {
        let deadline = tokio::time::Instant::now() + EXEC_EXIT_WAIT;
        loop {
            let inspected = bounded("inspecting an exec", self.docker.inspect_exec(exec_id))
                .await?
                .map_err(|e| engine_error("inspecting an exec", e))?;
            if inspected.running != Some(true) {
                if let Some(code) = inspected.exit_code {
                    return Ok(i32::try_from(code).unwrap_or(-1));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::Runtime(
                    "the engine did not report the exec's exit code".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn isolated(&self) -> bool {
        true
    }

    fn images(&self) -> Vec<String> {
        self.images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<SandboxStatus, RuntimeError> {
        validate_spec(spec)?;
        let id = &spec.id;
        let _guard = self.locks.lock(id).await;
        if let Some(status) = self.current(id).await? {
            return Ok(status);
        }
        // Checked before anything is created, so an unknown image leaves no
        // container behind.
        self.ensure_image(&spec.image).await?;
        if let Err(err) = self.create_locked(spec).await {
            tracing::warn!(sandbox.id = %id, error = %err, "create failed; cleaning up");
            if let Err(cleanup) = self.remove_container(id).await {
                tracing::error!(sandbox.id = %id, error = %cleanup, "could not clean up a failed create");
            }
            return Err(err);
        }
        tracing::info!(sandbox.id = %id, image = %spec.image, "sandbox created");
        self.status_or_not_found(id).await
    }

    async fn start(&self, id: &str) -> Result<SandboxStatus, RuntimeError> {
        validate_sandbox_id(id)?;
        let _guard = self.locks.lock(id).await;
        let container = self
            .inspect(id)
            .await?
            .ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))?;
        let status = self.status_of(id, &container);
        if status.phase == Phase::Running {
            return Ok(status);
        }
        if container.state.as_ref().and_then(|s| s.status) == Some(ContainerStateStatusEnum::PAUSED)
        {
            bounded(
                "resuming a container",
                self.docker.unpause_container(&self.container_name(id)),
            )
            .await?
            .map_err(|e| engine_error("resuming a container", e))?;
        } else {
            // A stopped container starts again with its writable layer, so
            // the sandbox's files are kept.
            self.start_container(id).await?;
        }
        tracing::info!(sandbox.id = %id, "sandbox started");
        self.status_or_not_found(id).await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<SandboxStatus, RuntimeError> {
        validate_sandbox_id(id)?;
        let _guard = self.locks.lock(id).await;
        self.stop_locked(id, grace).await
    }

    async fn stop_if_overdue(
        &self,
        id: &str,
        now: SystemTime,
        margin: Duration,
        grace: Duration,
    ) -> Result<Option<SandboxStatus>, RuntimeError> {
        validate_sandbox_id(id)?;
        let _guard = self.locks.lock(id).await;
        match self.current(id).await? {
            Some(status) if status.is_overdue(now, margin) => {
                self.stop_locked(id, grace).await.map(Some)
            }
            _ => Ok(None),
        }
    }

    async fn destroy(&self, id: &str) -> Result<SandboxStatus, RuntimeError> {
        validate_sandbox_id(id)?;
        let _guard = self.locks.lock(id).await;
        let image = self.current(id).await?.map(|s| s.image).unwrap_or_default();
        self.remove_container(id).await?;
        tracing::info!(sandbox.id = %id, "sandbox destroyed");
        Ok(SandboxStatus::absent(id, &image))
    }

    async fn exec(&self, id: &str, spec: ExecSpec) -> Result<ExecOutput, RuntimeError> {
        validate_sandbox_id(id)?;
        validate_exec(&spec)?;
        let status = self.status_or_not_found(id).await?;
        if status.phase != Phase::Running {
            return Err(RuntimeError::InvalidState(format!(
                "sandbox {id} is not running"
            )));
        }
        let name = self.container_name(id);
        let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let options = CreateExecOptions {
            attach_stdin: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            env: (!env.is_empty()).then_some(env),
            cmd: Some(spec.argv.clone()),
            working_dir: spec.workdir.clone(),
            ..Default::default()
        };
        let started = Instant::now();
        let created =
            match bounded("creating an exec", self.docker.create_exec(&name, options)).await? {
                Ok(created) => created,
                // The container stopped or went away in between.
                Err(e) if is_status(&e, 409) => {
                    return Err(RuntimeError::InvalidState(format!(
                        "sandbox {id} is not running"
                    )))
                }
                Err(e) if is_status(&e, 404) => {
                    return Err(RuntimeError::SandboxNotFound(id.to_string()))
                }
                Err(e) => return Err(engine_error("creating an exec", e)),
            };
        let start = StartExecOptions {
            detach: false,
            tty: false,
            output_capacity: None,
        };
        let output = match bounded(
            "starting an exec",
            self.docker.start_exec(&created.id, Some(start)),
        )
        .await?
        {
            Ok(StartExecResults::Attached { output, .. }) => output,
            Ok(StartExecResults::Detached) => {
                return Err(RuntimeError::Runtime("the exec started detached".into()))
            }
            Err(e) => return Err(engine_error("starting an exec", e)),
        };
        let mut out = CappedBuffer::new(spec.max_output_bytes);
        let mut err = CappedBuffer::new(spec.max_output_bytes);
        let read = async {
            let mut output = output;
            while let Some(chunk) = output.next().await {
                match chunk {
                    Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                        out.push(&message)
                    }
                    Ok(LogOutput::StdErr { message }) => err.push(&message),
                    Ok(LogOutput::StdIn { .. }) => {}
                    Err(e) => {
                        tracing::debug!(sandbox.id = %id, error = %e, "the exec's output ended with an error");
                        break;
                    }
                }
            }
        };
        let timed_out = tokio::time::timeout(spec.timeout, read).await.is_err();
        let exit_code = if timed_out {
            self.kill_exec(&created.id).await;
            -1
        } else {
            self.exec_exit_code(&created.id).await?
        };
        Ok(ExecOutput {
            exit_code,
            stdout: out.bytes,
            stderr: err.bytes,
            stdout_truncated: out.truncated,
            stderr_truncated: err.truncated,
            duration: started.elapsed(),
            timed_out,
        })
    }

    async fn list(&self) -> Result<Vec<SandboxStatus>, RuntimeError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_NAMESPACE}={}", self.config.namespace)],
        )]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let listed = bounded(
            "listing containers",
            self.docker.list_containers(Some(options)),
        )
        .await?
        .map_err(|e| engine_error("listing containers", e))?;
        let mut found: BTreeMap<String, SandboxStatus> = BTreeMap::new();
        for c in listed {
            let labels = c.labels.unwrap_or_default();
            let Some(id) = labels.get(LABEL_SANDBOX_ID).cloned() else {
                continue;
            };
            if validate_sandbox_id(&id).is_err() {
                tracing::warn!(container = ?c.names, "ignoring a container with a foreign sandbox id");
                continue;
            }
            let (image, expires_at) = labelled(&id, &labels);
            let phase = phase_of(c.state.map(|s| match s {
                bollard::models::ContainerSummaryStateEnum::RUNNING => {
                    ContainerStateStatusEnum::RUNNING
                }
                bollard::models::ContainerSummaryStateEnum::RESTARTING => {
                    ContainerStateStatusEnum::RESTARTING
                }
                bollard::models::ContainerSummaryStateEnum::STOPPING => {
                    ContainerStateStatusEnum::STOPPING
                }
                bollard::models::ContainerSummaryStateEnum::EXITED => {
                    ContainerStateStatusEnum::EXITED
                }
                bollard::models::ContainerSummaryStateEnum::DEAD => ContainerStateStatusEnum::DEAD,
                bollard::models::ContainerSummaryStateEnum::REMOVING => {
                    ContainerStateStatusEnum::REMOVING
                }
                bollard::models::ContainerSummaryStateEnum::PAUSED => {
                    ContainerStateStatusEnum::PAUSED
                }
                _ => ContainerStateStatusEnum::CREATED,
            }));
            let exit_code = match phase {
                Phase::Stopped => match c.status.as_deref().and_then(exit_code_in_status) {
                    Some(code) => Some(code),
                    // An unusual status text: ask the container itself.
                    None => self
                        .current(&id)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|s| s.exit_code),
                },
                _ => None,
            };
            found.insert(
                id.clone(),
                SandboxStatus {
                    id,
                    phase,
                    exit_code,
                    image,
                    expires_at,
                },
            );
        }
        if let Err(e) = self.refresh_images().await {
            tracing::debug!(error = %e, "could not refresh the image list");
        }
        Ok(found.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SandboxSpec {
        let mut labels = BTreeMap::new();
        labels.insert("team".to_string(), "infra".to_string());
        let mut env = BTreeMap::new();
        env.insert("GREETING".to_string(), "hi there".to_string());
        SandboxSpec {
            id: "sbx_0123".into(),
            image: "busybox".into(),
            command: vec!["sh".into(), "-c".into(), "echo $GREETING; sleep 1".into()],
            env,
            workdir: Some("/tmp".into()),
            cpu_millis: 500,
            memory_mb: 64,
            labels,
            hostname: None,
            expires_at: None,
            ..SandboxSpec::default()
        }
    }

    #[test]
    fn the_container_config_carries_argv_env_limits_hardening_and_labels() {
        let c = container_config("ns1", &spec()).expect("config");
        assert_eq!(c.image.as_deref(), Some("busybox:latest"));
        assert_eq!(
            c.cmd.as_deref(),
            Some(
                &[
                    "sh".to_string(),
                    "-c".into(),
                    "echo $GREETING; sleep 1".into()
                ][..]
            ),
            "the argv is passed as is, no shell added"
        );
        assert_eq!(
            c.entrypoint.as_deref(),
            Some(&[][..]),
            "no image entrypoint wraps it"
        );
        let env = c.env.as_ref().expect("env");
        assert!(env.contains(&"GREETING=hi there".to_string()));
        assert!(env.iter().any(|e| e.starts_with("PATH=")));
        assert_eq!(c.working_dir.as_deref(), Some("/tmp"));
        assert_eq!(c.hostname.as_deref(), Some("sbx_0123"));
        assert_eq!(c.tty, Some(false));

        let host = c.host_config.as_ref().expect("host config");
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.memory, Some(64 * 1024 * 1024));
        assert_eq!(host.memory_swap, Some(64 * 1024 * 1024));
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.cap_drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(
            host.cap_add.clone().unwrap_or_default(),
            vec!["AUDIT_WRITE", "KILL", "NET_BIND_SERVICE"]
        );
        assert_eq!(
            host.security_opt.as_deref(),
            Some(&["no-new-privileges".to_string()][..])
        );
        assert_eq!(host.privileged, Some(false));
        assert_eq!(
            host.init,
            Some(false),
            "the main process is PID 1, as with runc"
        );
        assert_eq!(
            host.restart_policy.as_ref().and_then(|r| r.name),
            Some(RestartPolicyNameEnum::NO)
        );

        let labels = c.labels.as_ref().expect("labels");
        assert_eq!(
            labels.get("corral.namespace").map(String::as_str),
            Some("ns1")
        );
        assert_eq!(
            labels.get("corral.sandbox_id").map(String::as_str),
            Some("sbx_0123")
        );
        assert_eq!(
            labels.get("corral.image").map(String::as_str),
            Some("busybox")
        );
        assert_eq!(
            labels.get("corral.label.team").map(String::as_str),
            Some("infra")
        );
        assert!(!labels.contains_key(LABEL_EXPIRES_AT), "no TTL, no label");
        assert_eq!(container_name("ns1", "sbx_0123"), "ns1-sbx_0123");
    }

    #[test]
    fn zero_limits_mean_no_limits_and_the_default_cwd_is_root() {
        let mut s = spec();
        s.cpu_millis = 0;
        s.memory_mb = 0;
        s.workdir = None;
        s.hostname = Some("custom".into());
        let c = container_config("corral", &s).expect("config");
        let host = c.host_config.as_ref().expect("host config");
        assert_eq!(host.nano_cpus, None);
        assert_eq!(host.memory, None);
        assert_eq!(host.memory_swap, None);
        assert_eq!(c.working_dir.as_deref(), Some("/"));
        assert_eq!(c.hostname.as_deref(), Some("custom"));
        let mut huge = spec();
        huge.memory_mb = u64::MAX;
        assert!(matches!(
            container_config("corral", &huge),
            Err(RuntimeError::InvalidArgument(_))
        ));
    }

    #[test]
    fn the_ttl_deadline_is_a_label_that_reads_back() {
        let mut s = spec();
        s.expires_at = expiry_from_unix_ms(1_700_000_000_123);
        let labels = container_labels("corral", &s);
        assert_eq!(
            labels.get("corral.expires_at_unix_ms").map(String::as_str),
            Some("1700000000123")
        );
        assert_eq!(
            labelled("sbx_0123", &labels),
            ("busybox".to_string(), s.expires_at)
        );
        let mut garbled = labels;
        garbled.insert(LABEL_EXPIRES_AT.into(), "soon".into());
        assert_eq!(labelled("sbx_0123", &garbled).1, None);
    }

    #[test]
    fn engine_states_map_to_phases() {
        use ContainerStateStatusEnum as S;
        assert_eq!(phase_of(Some(S::RUNNING)), Phase::Running);
        assert_eq!(phase_of(Some(S::RESTARTING)), Phase::Running);
        assert_eq!(phase_of(Some(S::EXITED)), Phase::Stopped);
        assert_eq!(phase_of(Some(S::DEAD)), Phase::Stopped);
        assert_eq!(phase_of(Some(S::CREATED)), Phase::Created);
        assert_eq!(phase_of(Some(S::PAUSED)), Phase::Created);
        assert_eq!(phase_of(None), Phase::Created);
    }

    #[test]
    fn exit_codes_are_read_from_the_list_status() {
        assert_eq!(exit_code_in_status("Exited (137) 2 seconds ago"), Some(137));
        assert_eq!(
            exit_code_in_status("Exited (0) About a minute ago"),
            Some(0)
        );
        assert_eq!(exit_code_in_status("Up 3 seconds"), None);
        assert_eq!(exit_code_in_status("Exited (x)"), None);
        assert_eq!(exit_code_in_status(""), None);
    }

    #[test]
    fn only_latest_tags_with_valid_names_are_corral_images() {
        assert_eq!(
            corral_images([
                "busybox:latest",
                "alpine:3.20",
                "registry.local/x:latest",
                "Upper:latest",
                "busybox:latest",
                "<none>:<none>",
                "a-b.c_d:latest",
            ]),
            vec!["a-b.c_d".to_string(), "busybox".into()]
        );
        assert_eq!(docker_reference("busybox"), "busybox:latest");
    }
}
