//! The runc runtime: each sandbox is an OCI bundle run by the `runc` binary.
//!
//! Owns, under the agent's data directory:
//! - `runc/`: runc's state root (`--root`), never the system default, so the
//!   agent only ever sees and touches its own containers;
//! - `sandboxes/<id>/`: the bundle — `config.json` (generated here with
//!   oci-spec), `rootfs` (an overlayfs mount of the image's root filesystem
//!   with `upper/` and `work/` beside it, or a plain copy when overlay cannot
//!   be mounted, marked by `rootfs.copy`), and the main process's
//!   `stdout.log` / `stderr.log`, and `exit_code` once the main process
//!   has ended and its code is known.
//!
//! Exit codes: `runc run --detach` leaves the container's init without a
//! parent, so nobody learns how it ended. When the agent is a child
//! subreaper ([`become_subreaper`], which the binary does at start), the
//! inits of the containers it starts are re-parented to it; the runtime
//! reaps them by pid once runc sees them stopped and records the code
//! (128 + signal for a signal) in the bundle, where a later agent finds it.
//! Containers started by an earlier agent process have no parent to tell, so
//! their exit code stays unknown.
//!
//! The container id is the sandbox id. Labels live in the bundle's
//! annotations (`corral.sandbox_id`, `corral.image`, `corral.label.<k>`, and
//! the TTL deadline as `corral.expires_at_unix_ms` when there is one), so
//! runc plus the bundle directories are the whole truth: a new agent over the
//! same data directory re-discovers everything, and an agent restart never
//! touches a running container. runc is always run with an argument vector,
//! never through a shell; ids and image names are validated before they reach
//! a path or an argument.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use oci_spec::runtime::{
    LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxIdMappingBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResourcesBuilder, RootBuilder, Spec,
};
use serde::Deserialize;

use crate::exec_io;
use crate::images;
use crate::runtime::{
    expiry_from_unix_ms, expiry_to_unix_ms, validate_exec, validate_sandbox_id, validate_spec,
    ExecOutput, ExecSpec, Phase, Runtime, RuntimeError, SandboxLocks, SandboxSpec, SandboxStatus,
};

/// Annotation keys written into every bundle.
pub const ANNOTATION_SANDBOX_ID: &str = "corral.sandbox_id";
pub const ANNOTATION_IMAGE: &str = "corral.image";
pub const ANNOTATION_LABEL_PREFIX: &str = "corral.label.";
/// The TTL deadline in Unix milliseconds; absent when the sandbox has none.
pub const ANNOTATION_EXPIRES_AT: &str = "corral.expires_at_unix_ms";

/// CFS period used for the CPU quota.
const CPU_PERIOD_US: u64 = 100_000;
/// Bound on any single runc invocation other than exec.
const RUNC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for a container to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How often the state is polled while waiting for a stop.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Marker file: the bundle's rootfs is a copy, not an overlay mount.
const COPY_MARKER: &str = "rootfs.copy";
/// How long a runc state directory without `state.json` may be a live
/// `runc run` still writing it before it counts as debris.
const DEBRIS_WAIT: Duration = Duration::from_secs(3);
/// The main process's exit code, written when it is reaped.
const EXIT_CODE_FILE: &str = "exit_code";

/// Makes this process a child subreaper, so the inits of the containers it
/// starts with `runc run --detach` become its children and their exit codes
/// can be collected. Process-wide; call once, at start.
pub fn become_subreaper() -> Result<(), RuntimeError> {
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| RuntimeError::runtime("becoming a child subreaper", e))
}

/// The runc-backed runtime. Cheap to construct; two instances over the same
/// data directory see the same sandboxes.
#[derive(Debug)]
pub struct RuncRuntime {
    data_dir: PathBuf,
    runc: PathBuf,
    locks: SandboxLocks,
    /// Container id -> pid of its init, for the containers this process
    /// started and has not reaped yet.
    inits: std::sync::Mutex<HashMap<String, i32>>,
}

/// What `runc state` and `runc list --format json` say about a container.
#[derive(Debug, Clone, Deserialize)]
struct RuncState {
    id: String,
    status: String,
    #[serde(default)]
    bundle: String,
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
}

/// What a sandbox's annotations say: its image and its TTL deadline. An
/// unreadable deadline counts as none (and is logged): the control plane's
/// TTL still applies.
fn annotated(id: &str, annotations: &HashMap<String, String>) -> (String, Option<SystemTime>) {
    let image = annotations
        .get(ANNOTATION_IMAGE)
        .cloned()
        .unwrap_or_default();
    let expires_at = annotations
        .get(ANNOTATION_EXPIRES_AT)
        .and_then(|v| match v.parse::<i64>() {
            Ok(ms) => expiry_from_unix_ms(ms),
            Err(_) => {
                tracing::warn!(sandbox.id = %id, value = %v, "ignoring an unreadable TTL annotation");
                None
            }
        });
    (image, expires_at)
}

impl RuncState {
    fn phase(&self) -> Phase {
        match self.status.as_str() {
            "running" => Phase::Running,
            "stopped" => Phase::Stopped,
            // "created", "creating", "paused": present, not running its work.
            _ => Phase::Created,
        }
    }
}

/// Builds the OCI runtime config of a sandbox: the main process as an
/// argument vector, its env (with a default PATH), working directory,
/// hostname, the root at `rootfs` (read-only when asked), the
/// pid/mount/uts/ipc namespaces plus network (unless `host_network`) and
/// user (when `user_namespace`), CPU, memory and pids limits, the hardening
/// of [`crate::hardening`] (no new privileges, the reduced capability set,
/// the default seccomp profile), and the corral annotations.
pub fn oci_config(spec: &SandboxSpec) -> Result<Spec, RuntimeError> {
    let invalid = |e: oci_spec::OciSpecError| RuntimeError::runtime("building the OCI config", e);
    let mut oci = Spec::default();

    let mut process = oci.process().clone().unwrap_or_default();
    process.set_args(Some(spec.command.clone()));
    process.set_env(Some(spec.env_list()));
    process.set_cwd(PathBuf::from(spec.workdir.as_deref().unwrap_or("/")));
    process.set_terminal(Some(false));
    process.set_no_new_privileges(Some(true));
    let caps: oci_spec::runtime::Capabilities =
        crate::hardening::CAPABILITIES.iter().copied().collect();
    process.set_capabilities(Some(
        LinuxCapabilitiesBuilder::default()
            .bounding(caps.clone())
            .effective(caps.clone())
            .permitted(caps)
            .inheritable(oci_spec::runtime::Capabilities::new())
            .ambient(oci_spec::runtime::Capabilities::new())
            .build()
            .map_err(invalid)?,
    ));
    oci.set_process(Some(process));

    oci.set_hostname(Some(spec.effective_hostname()));
    oci.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(spec.read_only_root)
            .build()
            .map_err(invalid)?,
    ));

    let mut namespaces = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Ipc,
    ];
    if !spec.host_network {
        // Its own network namespace: loopback only.
        namespaces.push(LinuxNamespaceType::Network);
    }
    if spec.user_namespace {
        if !crate::hardening::user_namespaces_supported() {
            return Err(RuntimeError::Unsupported(
                "this host does not support user namespaces".into(),
            ));
        }
        namespaces.push(LinuxNamespaceType::User);
    }
    let namespaces = namespaces
        .into_iter()
        .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;

    let mut resources = LinuxResourcesBuilder::default()
        .pids(
            LinuxPidsBuilder::default()
                .limit(i64::from(spec.effective_pids_limit()))
                .build()
                .map_err(invalid)?,
        )
        .devices(vec![
            // Deny every device; runc adds its default allow-list (null, zero,
            // full, tty, random, urandom) after it.
            LinuxDeviceCgroupBuilder::default()
                .allow(false)
                .access("rwm")
                .build()
                .map_err(invalid)?,
        ]);
    if spec.cpu_millis > 0 {
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(i64::from(spec.cpu_millis) * 100)
                .period(CPU_PERIOD_US)
                .build()
                .map_err(invalid)?,
        );
    }
    if spec.memory_mb > 0 {
        let bytes = spec
            .memory_mb
            .checked_mul(1024 * 1024)
            .and_then(|b| i64::try_from(b).ok())
            .ok_or_else(|| RuntimeError::InvalidArgument("memory_mb is too large".into()))?;
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(bytes)
                .build()
                .map_err(invalid)?,
        );
    }
    let default_linux = oci.linux().clone().unwrap_or_default();
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources.build().map_err(invalid)?)
        .cgroups_path(PathBuf::from(format!("/corral/{}", spec.id)))
        .masked_paths(default_linux.masked_paths().clone().unwrap_or_default())
        .readonly_paths(default_linux.readonly_paths().clone().unwrap_or_default())
        .seccomp(crate::hardening::seccomp_profile()?);
    if spec.user_namespace {
        // Root inside is USERNS_HOST_BASE outside, and so on for 64k ids.
        let mapping = LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(crate::hardening::USERNS_HOST_BASE)
            .size(crate::hardening::USERNS_SIZE)
            .build()
            .map_err(invalid)?;
        linux = linux
            .uid_mappings(vec![mapping])
            .gid_mappings(vec![mapping]);
    }
    let linux = linux.build().map_err(invalid)?;
    oci.set_linux(Some(linux));

    let mut annotations = HashMap::new();
    annotations.insert(ANNOTATION_SANDBOX_ID.to_string(), spec.id.clone());
    annotations.insert(ANNOTATION_IMAGE.to_string(), spec.image.clone());
    match expiry_to_unix_ms(spec.expires_at) {
        0 => {}
        ms => {
            annotations.insert(ANNOTATION_EXPIRES_AT.to_string(), ms.to_string());
        }
    }
    for (k, v) in &spec.labels {
        annotations.insert(format!("{ANNOTATION_LABEL_PREFIX}{k}"), v.clone());
    }
    oci.set_annotations(Some(annotations));
    Ok(oci)
}

impl RuncRuntime {
    /// A runtime keeping its state under `data_dir` and driving
    /// `runc_binary`. Nothing is touched until the first call.
    pub fn new(data_dir: impl Into<PathBuf>, runc_binary: PathBuf) -> Self {
        let data_dir = data_dir.into();
        let data_dir = std::path::absolute(&data_dir).unwrap_or(data_dir);
        Self {
            data_dir,
            runc: runc_binary,
            locks: SandboxLocks::default(),
            inits: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// runc's state root.
    pub fn runc_root(&self) -> PathBuf {
        self.data_dir.join("runc")
    }

    /// The bundle directory of a (validated) sandbox id.
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("sandboxes").join(id)
    }

    fn runc_command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.runc);
        cmd.arg("--root")
            .arg(self.runc_root())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `runc --root R <args>` to completion with captured output.
    async fn runc_output(&self, args: &[OsString]) -> Result<Output, RuntimeError> {
        let what = args
            .first()
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut cmd = self.runc_command();
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        match tokio::time::timeout(RUNC_TIMEOUT, cmd.output()).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(RuntimeError::runtime(
                format!("running {} {what}", self.runc.display()),
                e,
            )),
            Err(_) => Err(RuntimeError::Runtime(format!(
                "runc {what} did not finish within {RUNC_TIMEOUT:?}"
            ))),
        }
    }

    /// Like `runc_output`, but a non-zero exit is an error carrying stderr.
    async fn runc_ok(&self, args: &[OsString]) -> Result<Output, RuntimeError> {
        let out = self.runc_output(args).await?;
        if out.status.success() {
            Ok(out)
        } else {
            let what = args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ");
            Err(RuntimeError::Runtime(format!(
                "runc {what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// runc's view of one container; `None` when runc does not know it.
    async fn state(&self, id: &str) -> Result<Option<RuncState>, RuntimeError> {
        // runc keeps one directory per container under its root.
        if !self.runc_root().join(id).join("state.json").exists() {
            return Ok(None);
        }
        let out = self.runc_output(&args(["state", id])).await?;
        if !out.status.success() {
            // It may have been deleted in between.
            if !self.runc_root().join(id).exists() {
                return Ok(None);
            }
            return Err(RuntimeError::Runtime(format!(
                "runc state {id} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| RuntimeError::runtime("parsing runc state", e))
    }

    /// The annotations of a bundle's `config.json`.
    fn bundle_annotations(&self, id: &str) -> Option<HashMap<String, String>> {
        let spec = Spec::load(self.bundle_dir(id).join("config.json")).ok()?;
        spec.annotations().clone()
    }

    /// The image and TTL deadline of a sandbox: from runc's copy of the
    /// annotations when it has them, else from the bundle's config.
    fn labels_of(&self, id: &str, state: Option<&RuncState>) -> (String, Option<SystemTime>) {
        let from_state = state
            .and_then(|s| s.annotations.as_ref())
            .filter(|a| a.contains_key(ANNOTATION_IMAGE));
        match from_state {
            Some(a) => annotated(id, a),
            None => self
                .bundle_annotations(id)
                .map(|a| annotated(id, &a))
                .unwrap_or_default(),
        }
    }

    fn has_bundle(&self, id: &str) -> bool {
        self.bundle_dir(id).join("config.json").is_file()
    }

    /// The sandbox's status, or `None` when neither runc nor a bundle has it.
    /// A bundle runc does not know (its container was deleted, or the runc
    /// state was lost) is a stopped sandbox that `start` can run again.
    async fn current(
        &self,
        id: &str,
    ) -> Result<Option<(SandboxStatus, Option<RuncState>)>, RuntimeError> {
        let state = self.state(id).await?;
        let phase = match &state {
            Some(s) => s.phase(),
            None if self.has_bundle(id) => Phase::Stopped,
            None => return Ok(None),
        };
        let (image, expires_at) = self.labels_of(id, state.as_ref());
        // After the state: an init runc saw stopped is reaped here.
        self.reap_inits();
        Ok(Some((
            SandboxStatus {
                id: id.to_string(),
                phase,
                exit_code: self.exit_code(id, phase),
                image,
                expires_at,
            },
            state,
        )))
    }

    async fn status_or_not_found(&self, id: &str) -> Result<SandboxStatus, RuntimeError> {
        self.current(id)
            .await?
            .map(|(s, _)| s)
            .ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))
    }

    /// Makes `<bundle>/rootfs` the image's root filesystem: an overlay mount
    /// (lower = image, upper/work in the bundle), or a copy if overlay fails.
    /// Does nothing when it is already mounted or copied.
    async fn prepare_rootfs(&self, id: &str, image: &str) -> Result<(), RuntimeError> {
        let bundle = self.bundle_dir(id);
        let rootfs = bundle.join("rootfs");
        if bundle.join(COPY_MARKER).exists() || is_mount_point(&rootfs) {
            return Ok(());
        }
        let lower = images::rootfs(&self.data_dir, image)?;
        for dir in ["upper", "work", "rootfs"] {
            std::fs::create_dir_all(bundle.join(dir))
                .map_err(|e| RuntimeError::runtime(format!("creating {dir} of {id}"), e))?;
        }
        match mount_overlay(&lower, &bundle.join("upper"), &bundle.join("work"), &rootfs) {
            Ok(()) => {
                tracing::info!(sandbox.id = id, image, "rootfs is an overlay mount");
                Ok(())
            }
            Err(reason) => {
                tracing::warn!(sandbox.id = id, image, %reason, "overlay mount failed; copying the image rootfs instead");
                let (from, to) = (lower.clone(), rootfs.clone());
                tokio::task::spawn_blocking(move || copy_tree(&from, &to))
                    .await
                    .map_err(|e| RuntimeError::runtime("copying the rootfs", e))?
                    .map_err(|e| RuntimeError::runtime("copying the rootfs", e))?;
                std::fs::write(bundle.join(COPY_MARKER), b"")
                    .map_err(|e| RuntimeError::runtime("marking the rootfs copy", e))?;
                Ok(())
            }
        }
    }

    /// `runc run --detach` of an existing bundle, the main process's output
    /// appended to the bundle's log files.
    async fn run_container(&self, id: &str) -> Result<(), RuntimeError> {
        self.clear_runc_debris(id).await?;
        let bundle = self.bundle_dir(id);
        let log = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(bundle.join(name))
                .map_err(|e| RuntimeError::runtime(format!("opening {name}"), e))
        };
        let (stdout, stderr) = (log("stdout.log")?, log("stderr.log")?);
        let pid_file = bundle.join("init.pid");
        let _ = std::fs::remove_file(&pid_file);
        let mut cmd = self.runc_command();
        cmd.arg("run")
            .arg("--detach")
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("--bundle")
            .arg(&bundle)
            .arg(id)
            .stdout(stdout)
            .stderr(stderr);
        let status = match tokio::time::timeout(RUNC_TIMEOUT, cmd.status()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => return Err(RuntimeError::runtime("running runc run", e)),
            Err(_) => {
                return Err(RuntimeError::Runtime(format!(
                    "runc run {id} did not finish within {RUNC_TIMEOUT:?}"
                )))
            }
        };
        if status.success() {
            // Its init is now our child if we are a subreaper: remember it to
            // collect its exit code, even if it has already ended. Otherwise
            // its pid is not ours to wait on (it could be reused by one of
            // our own children).
            if !nix::sys::prctl::get_child_subreaper().unwrap_or(false) {
                return Ok(());
            }
            let pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .filter(|p| *p > 0);
            if let Some(pid) = pid {
                lock_inits(&self.inits).insert(id.to_string(), pid);
            }
            Ok(())
        } else {
            // runc reports its own failure on the stderr it was given.
            Err(RuntimeError::Runtime(format!(
                "runc run {id} failed ({status}): {}",
                tail(&bundle.join("stderr.log"), 1024)
            )))
        }
    }

    /// Removes what a `runc run` killed half way (with the agent, by a
    /// service manager stopping it) leaves: a state directory without
    /// `state.json`. Nothing runs from it (runc does not even list it), but
    /// runc refuses the id while it exists, so the sandbox could never run.
    /// A live runc writes `state.json` within moments: wait for that first.
    async fn clear_runc_debris(&self, id: &str) -> Result<(), RuntimeError> {
        let dir = self.runc_root().join(id);
        let deadline = tokio::time::Instant::now() + DEBRIS_WAIT;
        while dir.exists() && !dir.join("state.json").exists() {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(sandbox.id = %id, "removing the state of a runc run that died half way");
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| RuntimeError::runtime(format!("removing {}", dir.display()), e))?;
                break;
            }
            tokio::time::sleep(STOP_POLL).await;
        }
        Ok(())
    }

    /// Removes a bundle: unmount its rootfs, then delete the directory. The
    /// directory is never removed while something is still mounted in it.
    async fn remove_bundle(&self, id: &str) -> Result<(), RuntimeError> {
        let bundle = self.bundle_dir(id);
        let rootfs = bundle.join("rootfs");
        if is_mount_point(&rootfs) {
            unmount(&rootfs)?;
        }
        if bundle.exists() {
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&bundle))
                .await
                .map_err(|e| RuntimeError::runtime("removing the bundle", e))?
                .map_err(|e| RuntimeError::runtime(format!("removing the bundle of {id}"), e))?;
        }
        Ok(())
    }

    /// Waits until runc reports the container stopped (or gone), up to `wait`.
    async fn wait_stopped(&self, id: &str, wait: Duration) -> Result<bool, RuntimeError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.state(id).await? {
                None => return Ok(true),
                Some(s) if s.phase() == Phase::Stopped => return Ok(true),
                Some(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(STOP_POLL).await;
        }
    }

    /// Reaps the inits this process started that have ended, recording each
    /// exit code in its bundle. Never blocks; never waits on a pid that is
    /// not a container init this process started, so the children tokio
    /// waits for are left alone.
    fn reap_inits(&self) {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        let mut inits = lock_inits(&self.inits);
        inits.retain(|id, pid| {
            let code = match waitpid(nix::unistd::Pid::from_raw(*pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => code,
                Ok(WaitStatus::Signaled(_, signal, _)) => 128 + signal as i32,
                Ok(_) => return true,
                // Not our child (no subreaper): its code cannot be known.
                Err(_) => return false,
            };
            let bundle = self.bundle_dir(id);
            if bundle.is_dir() {
                let tmp = bundle.join(format!("{EXIT_CODE_FILE}.tmp"));
                let written = std::fs::write(&tmp, code.to_string())
                    .and_then(|()| std::fs::rename(&tmp, bundle.join(EXIT_CODE_FILE)));
                if let Err(e) = written {
                    tracing::warn!(sandbox.id = %id, error = %e, "could not record the exit code");
                }
            }
            tracing::info!(sandbox.id = %id, exit_code = code, "main process exited");
            false
        });
    }

    /// The recorded exit code of a stopped sandbox.
    fn exit_code(&self, id: &str, phase: Phase) -> Option<i32> {
        if phase != Phase::Stopped {
            return None;
        }
        std::fs::read_to_string(self.bundle_dir(id).join(EXIT_CODE_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Writes the bundle and runs it; answers with the image and TTL
    /// deadline as the annotations record them (what a later read reports).
    async fn create_locked(
        &self,
        spec: &SandboxSpec,
    ) -> Result<(String, Option<SystemTime>), RuntimeError> {
        let id = &spec.id;
        let config = oci_config(spec)?;
        let labels = config
            .annotations()
            .as_ref()
            .map(|a| annotated(id, a))
            .unwrap_or_default();
        let bundle = self.bundle_dir(id);
        std::fs::create_dir_all(&bundle)
            .map_err(|e| RuntimeError::runtime(format!("creating the bundle of {id}"), e))?;
        self.prepare_rootfs(id, &spec.image).await?;
        let tmp = bundle.join("config.json.tmp");
        config
            .save(&tmp)
            .map_err(|e| RuntimeError::runtime("writing config.json", e))?;
        std::fs::rename(&tmp, bundle.join("config.json"))
            .map_err(|e| RuntimeError::runtime("writing config.json", e))?;
        self.run_container(id).await?;
        Ok(labels)
    }

    /// The status of a sandbox `runc run --detach` has just started. While
    /// its init is a child we watch and has not been reaped it is running,
    /// so no `runc state` is needed (a process start: about a tenth of a
    /// create); otherwise runc is asked.
    async fn started(
        &self,
        id: &str,
        (image, expires_at): (String, Option<SystemTime>),
    ) -> Result<SandboxStatus, RuntimeError> {
        self.reap_inits();
        if !lock_inits(&self.inits).contains_key(id) {
            return self.status_or_not_found(id).await;
        }
        Ok(SandboxStatus {
            id: id.to_string(),
            phase: Phase::Running,
            exit_code: None,
            image,
            expires_at,
        })
    }

    /// [`Runtime::stop`] with the sandbox's lock already held.
    async fn stop_locked(&self, id: &str, grace: Duration) -> Result<SandboxStatus, RuntimeError> {
        let (status, state) = self
            .current(id)
            .await?
            .ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))?;
        if status.phase == Phase::Stopped || state.is_none() {
            return Ok(status);
        }
        // Errors are expected when the process exits in between.
        let term = self.runc_output(&args(["kill", id, "TERM"])).await?;
        if !term.status.success() {
            tracing::debug!(sandbox.id = %id, stderr = %String::from_utf8_lossy(&term.stderr).trim(), "runc kill TERM failed");
        }
        if !self.wait_stopped(id, grace).await? {
            tracing::info!(sandbox.id = %id, ?grace, "still running after the grace period; killing");
            let _ = self.runc_output(&args(["kill", id, "KILL"])).await?;
            if !self.wait_stopped(id, KILL_WAIT).await? {
                return Err(RuntimeError::Runtime(format!(
                    "sandbox {id} did not stop after SIGKILL"
                )));
            }
        }
        tracing::info!(sandbox.id = %id, "sandbox stopped");
        self.status_or_not_found(id).await
    }
}

fn lock_inits(
    inits: &std::sync::Mutex<HashMap<String, i32>>,
) -> std::sync::MutexGuard<'_, HashMap<String, i32>> {
    inits.lock().unwrap_or_else(|p| p.into_inner())
}

fn args<const N: usize>(a: [&str; N]) -> Vec<OsString> {
    a.iter().map(OsString::from).collect()
}

/// The last `max` bytes of a file, lossily decoded and trimmed.
fn tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = file.take(max).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

/// Mount points of this mount namespace (from /proc/self/mountinfo).
fn mount_points() -> HashSet<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return HashSet::new();
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(value) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_mount_point(path: &Path) -> bool {
    let Ok(canonical) = path.canonicalize() else {
        return false;
    };
    mount_points().contains(&canonical)
}

fn mount_overlay(lower: &Path, upper: &Path, work: &Path, target: &Path) -> Result<(), String> {
    let paths = [lower, upper, work];
    let mut canonical = Vec::with_capacity(3);
    for p in paths {
        let c = p
            .canonicalize()
            .map_err(|e| format!("{}: {e}", p.display()))?;
        let s = c.to_str().ok_or("a non-UTF-8 path")?.to_string();
        // These would be read as option separators by overlayfs.
        if s.contains([',', ':', '\\']) {
            return Err(format!(
                "{s} contains a character overlayfs options cannot carry"
            ));
        }
        canonical.push(s);
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        canonical[0], canonical[1], canonical[2]
    );
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| e.to_string())
}

fn unmount(target: &Path) -> Result<(), RuntimeError> {
    use nix::mount::{umount2, MntFlags};
    match umount2(target, MntFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(nix::errno::Errno::EBUSY) => {
            // Something still holds it (a process that escaped runc's kill);
            // detach it so the bundle can go, the kernel frees it later.
            umount2(target, MntFlags::MNT_DETACH).map_err(|e| {
                RuntimeError::runtime(format!("unmounting {}", target.display()), e)
            })?;
        }
        Err(e) => {
            return Err(RuntimeError::runtime(
                format!("unmounting {}", target.display()),
                e,
            ))
        }
    }
    if is_mount_point(target) {
        return Err(RuntimeError::Runtime(format!(
            "{} is still mounted",
            target.display()
        )));
    }
    Ok(())
}

/// Copies a directory tree, keeping symlinks as symlinks and permissions.
/// Special files (devices, sockets, fifos) are skipped: runc provides /dev.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to)?;
    let meta = std::fs::symlink_metadata(from)?;
    std::fs::set_permissions(
        to,
        std::fs::Permissions::from_mode(meta.permissions().mode()),
    )?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let ty = entry.file_type()?;
        if ty.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if ty.is_dir() {
            copy_tree(&src, &dst)?;
        } else if ty.is_file() {
            std::fs::copy(&src, &dst)?;
        } else {
            tracing::debug!(path = %src.display(), "skipping a special file in the rootfs copy");
        }
    }
    Ok(())
}

#[async_trait]
impl Runtime for RuncRuntime {
    fn kind(&self) -> &'static str {
        "runc"
    }

    fn isolated(&self) -> bool {
        true
    }

    fn images(&self) -> Vec<String> {
        images::list(&self.data_dir)
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<SandboxStatus, RuntimeError> {
        validate_spec(spec)?;
        let id = &spec.id;
        let _guard = self.locks.lock(id).await;
        if let Some((status, _)) = self.current(id).await? {
            return Ok(status);
        }
        // Checked before anything is written, so an unknown image leaves no
        // bundle behind.
        images::rootfs(&self.data_dir, &spec.image)?;
        // A leftover bundle without config.json is a create that died half
        // way; start from scratch.
        self.remove_bundle(id).await?;
        let labels = match self.create_locked(spec).await {
            Ok(labels) => labels,
            Err(err) => {
                tracing::warn!(sandbox.id = %id, error = %err, "create failed; cleaning up");
                if self.runc_root().join(id).exists() {
                    let _ = self.runc_output(&args(["delete", "--force", id])).await;
                }
                if let Err(cleanup) = self.remove_bundle(id).await {
                    tracing::error!(sandbox.id = %id, error = %cleanup, "could not clean up a failed create");
                }
                return Err(err);
            }
        };
        tracing::info!(sandbox.id = %id, image = %spec.image, "sandbox created");
        self.started(id, labels).await
    }

    async fn start(&self, id: &str) -> Result<SandboxStatus, RuntimeError> {
        validate_sandbox_id(id)?;
        let _guard = self.locks.lock(id).await;
        let (status, state) = self
            .current(id)
            .await?
            .ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))?;
        match (status.phase, state) {
            (Phase::Running, _) => return Ok(status),
            (Phase::Created, Some(s)) if s.status == "paused" => {
                self.runc_ok(&args(["resume", id])).await?;
            }
            (Phase::Created, Some(_)) => {
                self.runc_ok(&args(["start", id])).await?;
            }
            (_, state) => {
                if state.is_some() {
                    // A stopped container cannot be restarted in place:
                    // delete it and run the same bundle again (the overlay's
                    // upper dir keeps the sandbox's files).
                    self.runc_ok(&args(["delete", id])).await?;
                }
                let _ = std::fs::remove_file(self.bundle_dir(id).join(EXIT_CODE_FILE));
                self.prepare_rootfs(id, &status.image).await?;
                self.run_container(id).await?;
            }
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
            Some((status, _)) if status.is_overdue(now, margin) => {
                self.stop_locked(id, grace).await.map(Some)
            }
            _ => Ok(None),
        }
    }

    async fn destroy(&self, id: &str) -> Result<SandboxStatus, RuntimeError> {
        validate_sandbox_id(id)?;
        let _guard = self.locks.lock(id).await;
        let image = self
            .current(id)
            .await?
            .map(|(s, _)| s.image)
            .unwrap_or_default();
        if self.runc_root().join(id).exists() {
            let out = self.runc_output(&args(["delete", "--force", id])).await?;
            if !out.status.success() && self.runc_root().join(id).exists() {
                return Err(RuntimeError::Runtime(format!(
                    "runc delete {id} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        self.reap_inits();
        self.remove_bundle(id).await?;
        tracing::info!(sandbox.id = %id, "sandbox destroyed");
        Ok(SandboxStatus::absent(id, &image))
    }

    async fn exec(&self, id: &str, spec: ExecSpec) -> Result<ExecOutput, RuntimeError> {
        validate_sandbox_id(id)?;
        validate_exec(&spec)?;
        let (status, _) = self
            .current(id)
            .await?
            .ok_or_else(|| RuntimeError::SandboxNotFound(id.to_string()))?;
        if status.phase != Phase::Running {
            return Err(RuntimeError::InvalidState(format!(
                "sandbox {id} is not running"
            )));
        }
        let pid_file = self
            .bundle_dir(id)
            .join(format!("exec-{:016x}.pid", fastrand::u64(..)));
        let mut cmd = self.runc_command();
        cmd.arg("exec").arg("--pid-file").arg(&pid_file);
        for (k, v) in &spec.env {
            cmd.arg("--env").arg(format!("{k}={v}"));
        }
        if let Some(cwd) = &spec.workdir {
            cmd.arg("--cwd").arg(cwd);
        }
        // Everything after the container id is the command, verbatim.
        cmd.arg(id)
            .args(&spec.argv)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .map_err(|e| RuntimeError::runtime("running runc exec", e))?;
        let kill_pid_file = pid_file.clone();
        let result = exec_io::collect(child, spec.timeout, spec.max_output_bytes, move || {
            // Killing runc alone would leave the process in the container.
            let pid = std::fs::read_to_string(&kill_pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if let Some(pid) = pid.filter(|p| *p > 1) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        })
        .await;
        let _ = std::fs::remove_file(&pid_file);
        result
    }

    async fn list(&self) -> Result<Vec<SandboxStatus>, RuntimeError> {
        let mut found: BTreeMap<String, SandboxStatus> = BTreeMap::new();
        if self.runc_root().exists() {
            let out = self.runc_ok(&args(["list", "--format", "json"])).await?;
            // After the listing: every init it shows stopped is reaped now,
            // so its exit code is known in this very listing.
            self.reap_inits();
            // An empty root prints `null`.
            let states: Option<Vec<RuncState>> = serde_json::from_slice(&out.stdout)
                .map_err(|e| RuntimeError::runtime("parsing runc list", e))?;
            for s in states.unwrap_or_default() {
                if validate_sandbox_id(&s.id).is_err() {
                    tracing::warn!(container = %s.id, bundle = %s.bundle, "ignoring a container with a foreign id");
                    continue;
                }
                let (image, expires_at) = self.labels_of(&s.id, Some(&s));
                found.insert(
                    s.id.clone(),
                    SandboxStatus {
                        id: s.id.clone(),
                        phase: s.phase(),
                        exit_code: self.exit_code(&s.id, s.phase()),
                        image,
                        expires_at,
                    },
                );
            }
        }
        // Bundles runc does not know are stopped sandboxes.
        if let Ok(entries) = std::fs::read_dir(self.data_dir.join("sandboxes")) {
            for entry in entries.filter_map(|e| e.ok()) {
                let Ok(id) = entry.file_name().into_string() else {
                    continue;
                };
                if found.contains_key(&id)
                    || validate_sandbox_id(&id).is_err()
                    || !self.has_bundle(&id)
                {
                    continue;
                }
                let (image, expires_at) = self.labels_of(&id, None);
                found.insert(
                    id.clone(),
                    SandboxStatus {
                        exit_code: self.exit_code(&id, Phase::Stopped),
                        id,
                        phase: Phase::Stopped,
                        image,
                        expires_at,
                    },
                );
            }
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
    fn the_oci_config_is_hardened_and_honours_the_options() {
        let oci = oci_config(&spec()).expect("config");
        let process = oci.process().as_ref().expect("process");
        assert_eq!(process.no_new_privileges(), Some(true));
        let caps = process.capabilities().as_ref().expect("capabilities");
        let want: oci_spec::runtime::Capabilities =
            crate::hardening::CAPABILITIES.iter().copied().collect();
        assert_eq!(caps.bounding().as_ref(), Some(&want));
        assert_eq!(caps.effective().as_ref(), Some(&want));
        assert_eq!(caps.permitted().as_ref(), Some(&want));
        assert!(caps.ambient().as_ref().is_none_or(|a| a.is_empty()));
        let linux = oci.linux().as_ref().expect("linux");
        assert!(linux.seccomp().is_some(), "the default seccomp profile");
        let pids = linux
            .resources()
            .as_ref()
            .and_then(|r| r.pids().as_ref())
            .map(|p| p.limit());
        assert_eq!(pids, Some(i64::from(crate::runtime::DEFAULT_PIDS_LIMIT)));
        let has_ns = |oci: &Spec, typ: LinuxNamespaceType| {
            oci.linux()
                .as_ref()
                .and_then(|l| l.namespaces().as_ref())
                .is_some_and(|n| n.iter().any(|ns| ns.typ() == typ))
        };
        assert!(has_ns(&oci, LinuxNamespaceType::Network));
        assert!(!has_ns(&oci, LinuxNamespaceType::User));
        assert_eq!(oci.root().as_ref().and_then(|r| r.readonly()), Some(false));

        let opted = SandboxSpec {
            host_network: true,
            read_only_root: true,
            pids_limit: 99_999,
            ..spec()
        };
        let oci = oci_config(&opted).expect("config");
        assert!(!has_ns(&oci, LinuxNamespaceType::Network), "host network");
        assert_eq!(oci.root().as_ref().and_then(|r| r.readonly()), Some(true));
        let pids = oci
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.pids().as_ref())
            .map(|p| p.limit());
        assert_eq!(
            pids,
            Some(i64::from(crate::runtime::MAX_PIDS_LIMIT)),
            "capped"
        );

        let userns = SandboxSpec {
            user_namespace: true,
            ..spec()
        };
        match oci_config(&userns) {
            Ok(oci) => {
                assert!(has_ns(&oci, LinuxNamespaceType::User));
                let maps = oci
                    .linux()
                    .as_ref()
                    .and_then(|l| l.uid_mappings().clone())
                    .expect("uid mappings");
                assert_eq!(maps[0].container_id(), 0);
                assert_eq!(maps[0].host_id(), crate::hardening::USERNS_HOST_BASE);
            }
            Err(err) => {
                assert!(!crate::hardening::user_namespaces_supported());
                assert!(matches!(err, RuntimeError::Unsupported(_)), "{err:?}");
            }
        }
    }

    #[test]
    fn the_oci_config_carries_argv_env_limits_and_annotations() {
        let oci = oci_config(&spec()).expect("config");
        let process = oci.process().as_ref().expect("process");
        assert_eq!(
            process.args().as_deref(),
            Some(
                &[
                    "sh".to_string(),
                    "-c".into(),
                    "echo $GREETING; sleep 1".into()
                ][..]
            ),
            "the argv is passed as is, no shell added"
        );
        let env = process.env().as_ref().expect("env");
        assert!(env.contains(&"GREETING=hi there".to_string()));
        assert!(env.iter().any(|e| e.starts_with("PATH=")));
        assert_eq!(process.cwd(), Path::new("/tmp"));
        assert_eq!(process.terminal(), Some(false));
        assert_eq!(oci.hostname().as_deref(), Some("sbx_0123"));
        let root = oci.root().as_ref().expect("root");
        assert_eq!(root.path(), Path::new("rootfs"));
        assert_eq!(root.readonly(), Some(false));

        let linux = oci.linux().as_ref().expect("linux");
        let resources = linux.resources().as_ref().expect("resources");
        let cpu = resources.cpu().as_ref().expect("cpu");
        assert_eq!(cpu.quota(), Some(50_000));
        assert_eq!(cpu.period(), Some(100_000));
        let memory = resources.memory().as_ref().expect("memory");
        assert_eq!(memory.limit(), Some(64 * 1024 * 1024));
        let namespaces: Vec<_> = linux
            .namespaces()
            .as_ref()
            .expect("namespaces")
            .iter()
            .map(|n| n.typ())
            .collect();
        for ns in [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Network,
        ] {
            assert!(namespaces.contains(&ns), "{ns:?}");
        }

        let annotations = oci.annotations().as_ref().expect("annotations");
        assert_eq!(
            annotations.get("corral.sandbox_id").map(String::as_str),
            Some("sbx_0123")
        );
        assert_eq!(
            annotations.get("corral.image").map(String::as_str),
            Some("busybox")
        );
        assert_eq!(
            annotations.get("corral.label.team").map(String::as_str),
            Some("infra")
        );
        assert!(
            !annotations.contains_key(ANNOTATION_EXPIRES_AT),
            "no TTL, no annotation"
        );

        // It round-trips through JSON as runc reads it.
        let json = serde_json::to_string(&oci).expect("serialise");
        let back: Spec = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, oci);
    }

    #[test]
    fn zero_limits_mean_no_limits_and_the_default_cwd_is_root() {
        let mut s = spec();
        s.cpu_millis = 0;
        s.memory_mb = 0;
        s.workdir = None;
        s.hostname = Some("custom".into());
        let oci = oci_config(&s).expect("config");
        let resources = oci
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .expect("resources");
        assert!(resources.cpu().is_none());
        assert!(resources.memory().is_none());
        assert_eq!(
            oci.process().as_ref().expect("process").cwd(),
            Path::new("/")
        );
        assert_eq!(oci.hostname().as_deref(), Some("custom"));
    }

    #[test]
    fn the_ttl_deadline_is_an_annotation_that_reads_back() {
        let mut s = spec();
        s.expires_at = expiry_from_unix_ms(1_700_000_000_123);
        let oci = oci_config(&s).expect("config");
        let annotations = oci.annotations().clone().expect("annotations");
        assert_eq!(
            annotations
                .get("corral.expires_at_unix_ms")
                .map(String::as_str),
            Some("1700000000123")
        );
        assert_eq!(
            annotated("sbx_0123", &annotations),
            ("busybox".to_string(), s.expires_at)
        );
        let mut garbled = annotations;
        garbled.insert(ANNOTATION_EXPIRES_AT.into(), "soon".into());
        assert_eq!(annotated("sbx_0123", &garbled).1, None);
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mountinfo(r"/end\"), r"/end\");
    }

    #[test]
    fn runc_states_map_to_phases() {
        let state = |status: &str| RuncState {
            id: "x".into(),
            status: status.into(),
            bundle: String::new(),
            annotations: None,
        };
        assert_eq!(state("running").phase(), Phase::Running);
        assert_eq!(state("stopped").phase(), Phase::Stopped);
        assert_eq!(state("created").phase(), Phase::Created);
        assert_eq!(state("paused").phase(), Phase::Created);
    }
}
