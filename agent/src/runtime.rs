//! The `Runtime` trait every sandbox runtime implements, the plain Rust types
//! it speaks (spec, phase, status, exec input and output, error), the
//! validation of everything that reaches a file system path or an argument
//! vector (sandbox ids, image names, env, argv), the per-sandbox locks that
//! serialise lifecycle work inside a runtime, the TTL test every runtime and
//! the watchdog share ([`SandboxStatus::is_overdue`]), and the one place where
//! those types are converted to and from the protocol's `pb` types.
//!
//! A sandbox's TTL deadline is an `Option<SystemTime>` (`expires_at`, `None`
//! = no TTL) in the spec and the status; on the wire it is Unix milliseconds
//! with 0 meaning none ([`expiry_from_unix_ms`], [`expiry_to_unix_ms`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use corral_proto::pb;

/// Longest sandbox id accepted.
pub const MAX_SANDBOX_ID_LEN: usize = 80;
/// Longest image name accepted (first character included).
pub const MAX_IMAGE_NAME_LEN: usize = 64;
/// Hard cap on each of stdout and stderr of an exec, whatever the request
/// says: a reply must stay well under gRPC's default 4 MiB message limit, or
/// it would break the whole stream.
pub const MAX_EXEC_OUTPUT_BYTES: usize = 1024 * 1024;
/// Output cap when the request leaves it at 0.
pub const DEFAULT_EXEC_OUTPUT_BYTES: usize = 64 * 1024;
/// Exec timeout when the request leaves it at 0.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// The PATH a sandbox's processes get when their env does not set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A sandbox's process limit when the request leaves it at 0.
pub const DEFAULT_PIDS_LIMIT: u32 = 1024;
/// The largest process limit a runtime applies, whatever the request says.
pub const MAX_PIDS_LIMIT: u32 = 32_768;

/// What to create: the runtime-independent description of a sandbox. Its
/// Debug output shows env keys only (values may be secrets).
#[derive(Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SandboxSpec {
    pub id: String,
    pub image: String,
    /// The main process as an argument vector (never a shell string).
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Working directory of the main process; `None` means the runtime's
    /// default ("/" in a container).
    pub workdir: Option<String>,
    /// Thousandths of a core; 0 means no CPU limit.
    pub cpu_millis: u32,
    /// 0 means no memory limit.
    pub memory_mb: u64,
    pub labels: BTreeMap<String, String>,
    /// `None` means the sandbox id (cut to 63 characters).
    pub hostname: Option<String>,
    /// When the sandbox's TTL runs out; `None` means no TTL. Every runtime
    /// persists it with the sandbox and reports it in [`SandboxStatus`], so
    /// the agent's watchdog finds it again after an agent restart.
    #[serde(default)]
    pub expires_at: Option<SystemTime>,
    /// Share the host's network; otherwise a network namespace with only
    /// loopback (runtimes that cannot isolate the network ignore this).
    #[serde(default)]
    pub host_network: bool,
    /// Mount the root filesystem read-only.
    #[serde(default)]
    pub read_only_root: bool,
    /// Process/thread limit; 0 means [`DEFAULT_PIDS_LIMIT`].
    #[serde(default)]
    pub pids_limit: u32,
    /// Run in a user namespace (root inside is unprivileged outside).
    #[serde(default)]
    pub user_namespace: bool,
}

impl std::fmt::Debug for SandboxSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxSpec")
            .field("id", &self.id)
            .field("image", &self.image)
            .field("command", &self.command)
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .field("workdir", &self.workdir)
            .field("cpu_millis", &self.cpu_millis)
            .field("memory_mb", &self.memory_mb)
            .field("labels", &self.labels)
            .field("hostname", &self.hostname)
            .field("expires_at", &self.expires_at)
            .field("host_network", &self.host_network)
            .field("read_only_root", &self.read_only_root)
            .field("pids_limit", &self.pids_limit)
            .field("user_namespace", &self.user_namespace)
            .finish()
    }
}

impl SandboxSpec {
    /// The process limit to apply: the request's, or the default, capped.
    pub fn effective_pids_limit(&self) -> u32 {
        match self.pids_limit {
            0 => DEFAULT_PIDS_LIMIT,
            n => n.min(MAX_PIDS_LIMIT),
        }
    }

    /// The hostname the sandbox gets.
    pub fn effective_hostname(&self) -> String {
        match &self.hostname {
            Some(h) if !h.is_empty() => h.clone(),
            _ => self.id.chars().take(63).collect(),
        }
    }

    /// The env of the main process as `K=V` strings, with a default PATH.
    pub fn env_list(&self) -> Vec<String> {
        env_with_path(&self.env)
    }
}

/// `K=V` strings for `env`, sorted by key, plus `PATH` when it is absent.
pub fn env_with_path(env: &BTreeMap<String, String>) -> Vec<String> {
    let mut out: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !env.contains_key("PATH") {
        out.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    out
}

/// Where a sandbox is in its life, as the runtime sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    /// Known to the runtime but not started (or being set up).
    Created,
    Running,
    Stopped,
    /// The runtime does not have it.
    Absent,
}

/// What the runtime knows about one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxStatus {
    pub id: String,
    pub phase: Phase,
    /// Set once the main process has exited, when the runtime knows it.
    pub exit_code: Option<i32>,
    pub image: String,
    /// The TTL deadline the sandbox was created with; `None` means no TTL.
    pub expires_at: Option<SystemTime>,
}

impl SandboxStatus {
    /// The status of a sandbox the runtime does not hold.
    pub fn absent(id: &str, image: &str) -> Self {
        Self {
            id: id.to_string(),
            phase: Phase::Absent,
            exit_code: None,
            image: image.to_string(),
            expires_at: None,
        }
    }

    /// True when the sandbox is running and `now` is at or past its TTL
    /// deadline plus `margin`. Without a TTL, or when not running (created,
    /// stopped, absent), it is never overdue; a deadline so far away that
    /// adding the margin overflows is never reached.
    pub fn is_overdue(&self, now: SystemTime, margin: Duration) -> bool {
        self.phase == Phase::Running
            && self
                .expires_at
                .and_then(|at| at.checked_add(margin))
                .is_some_and(|deadline| now >= deadline)
    }
}

/// The protocol's TTL deadline (Unix milliseconds; 0 or less = none) as a
/// time.
pub fn expiry_from_unix_ms(ms: i64) -> Option<SystemTime> {
    let ms = u64::try_from(ms).ok().filter(|ms| *ms > 0)?;
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// A TTL deadline in the protocol's form: Unix milliseconds, 0 for none (and
/// for a time not after the epoch, which the protocol cannot carry).
pub fn expiry_to_unix_ms(expires_at: Option<SystemTime>) -> i64 {
    expires_at
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A command to run inside a running sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub timeout: Duration,
    /// Cap for each of stdout and stderr.
    pub max_output_bytes: usize,
}

impl Default for ExecSpec {
    fn default() -> Self {
        Self {
            argv: Vec::new(),
            env: BTreeMap::new(),
            workdir: None,
            timeout: DEFAULT_EXEC_TIMEOUT,
            max_output_bytes: DEFAULT_EXEC_OUTPUT_BYTES,
        }
    }
}

/// The outcome of an exec.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecOutput {
    /// The process's exit code; 128 + signal when a signal ended it; -1 when
    /// it timed out.
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub duration: Duration,
    pub timed_out: bool,
}

/// A runtime failure; maps 1:1 onto `pb::ErrorCode` (see [`RuntimeError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    #[error("sandbox {0} not found")]
    SandboxNotFound(String),
    #[error("image {0} not found")]
    ImageNotFound(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("invalid state: {0}")]
    InvalidState(String),
    #[error("runtime error: {0}")]
    Runtime(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl RuntimeError {
    /// Shorthand for a `Runtime` error with context.
    pub fn runtime(context: impl std::fmt::Display, err: impl std::fmt::Display) -> Self {
        Self::Runtime(format!("{context}: {err}"))
    }

    /// The protocol error code of this error.
    pub fn code(&self) -> pb::ErrorCode {
        match self {
            Self::SandboxNotFound(_) => pb::ErrorCode::SandboxNotFound,
            Self::ImageNotFound(_) => pb::ErrorCode::ImageNotFound,
            Self::InvalidArgument(_) => pb::ErrorCode::InvalidArgument,
            Self::InvalidState(_) => pb::ErrorCode::InvalidState,
            Self::Runtime(_) => pb::ErrorCode::Runtime,
            Self::Unsupported(_) => pb::ErrorCode::Unsupported,
        }
    }
}

/// How sandboxes are made. Every method is idempotent on its target state,
/// and the runtime (not the agent's memory) is the source of truth, so a
/// fresh instance over the same host state sees the same sandboxes.
#[async_trait]
pub trait Runtime: Send + Sync {
    /// "runc", "docker", "process" or "fake".
    fn kind(&self) -> &'static str;
    /// False when sandboxes are not isolated from the host.
    fn isolated(&self) -> bool;
    /// The images sandboxes can be created from.
    fn images(&self) -> Vec<String>;
    /// Creates the sandbox and starts its main process. An existing id
    /// returns its current status unchanged.
    async fn create(&self, spec: &SandboxSpec) -> Result<SandboxStatus, RuntimeError>;
    /// Starts a stopped sandbox; a running one is returned as is.
    async fn start(&self, id: &str) -> Result<SandboxStatus, RuntimeError>;
    /// SIGTERM, then SIGKILL after `grace`; a stopped one is returned as is.
    async fn stop(&self, id: &str, grace: Duration) -> Result<SandboxStatus, RuntimeError>;
    /// Removes the sandbox and everything it owns; an absent one is success.
    /// Returns phase `Absent`.
    async fn destroy(&self, id: &str) -> Result<SandboxStatus, RuntimeError>;
    /// Runs a command in a running sandbox.
    async fn exec(&self, id: &str, spec: ExecSpec) -> Result<ExecOutput, RuntimeError>;
    /// Every sandbox the runtime holds, each with its TTL deadline.
    async fn list(&self) -> Result<Vec<SandboxStatus>, RuntimeError>;
    /// The TTL watchdog's stop. Holding the sandbox's lock (so a concurrent
    /// start, stop or destroy runs wholly before or wholly after it), it
    /// re-reads the sandbox and stops it as [`Runtime::stop`] does only if it
    /// is still [overdue](SandboxStatus::is_overdue) at `now` with `margin`.
    /// Returns the stopped status, or `None` when it did nothing (the sandbox
    /// is gone, no longer running, or not overdue).
    async fn stop_if_overdue(
        &self,
        id: &str,
        now: SystemTime,
        margin: Duration,
        grace: Duration,
    ) -> Result<Option<SandboxStatus>, RuntimeError>;
}

// ---------------------------------------------------------------------------
// Validation. Everything here runs before any file system path is built.

/// Sandbox ids: 1 to 80 of lowercase letters, digits, '_' and '-', starting
/// with a letter or digit (so it can never be read as a flag by runc, and
/// never be "." or ".." or contain a path separator).
pub fn validate_sandbox_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_SANDBOX_ID_LEN
        && id.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::InvalidArgument(format!(
            "invalid sandbox id {:?}: 1-{MAX_SANDBOX_ID_LEN} of [a-z0-9_-], starting with [a-z0-9]",
            truncate_for_message(id)
        )))
    }
}

/// Image names: `[a-z0-9][a-z0-9._-]{0,63}`.
pub fn validate_image_name(name: &str) -> Result<(), RuntimeError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IMAGE_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_' || c == '-'
        });
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::InvalidArgument(format!(
            "invalid image name {:?}: [a-z0-9][a-z0-9._-]{{0,63}}",
            truncate_for_message(name)
        )))
    }
}

fn validate_env(env: &BTreeMap<String, String>) -> Result<(), RuntimeError> {
    for (k, v) in env {
        let key_ok = !k.is_empty()
            && k.len() <= 256
            && !k.contains(['=', '\0'])
            && !k.starts_with(|c: char| c.is_ascii_digit());
        if !key_ok {
            return Err(RuntimeError::InvalidArgument(format!(
                "invalid env key {:?}",
                truncate_for_message(k)
            )));
        }
        if v.contains('\0') || v.len() > 64 * 1024 {
            return Err(RuntimeError::InvalidArgument(format!(
                "invalid value for env {k}"
            )));
        }
    }
    Ok(())
}

fn validate_argv(what: &str, argv: &[String]) -> Result<(), RuntimeError> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err(RuntimeError::InvalidArgument(format!(
            "{what} must not be empty"
        )));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(RuntimeError::InvalidArgument(format!(
            "{what} must not contain NUL bytes"
        )));
    }
    Ok(())
}

fn validate_workdir(workdir: &Option<String>) -> Result<(), RuntimeError> {
    match workdir {
        Some(w) if !w.starts_with('/') || w.contains('\0') => {
            Err(RuntimeError::InvalidArgument(format!(
                "workdir must be an absolute path, got {:?}",
                truncate_for_message(w)
            )))
        }
        _ => Ok(()),
    }
}

/// Checks everything in a create request that a runtime passes on.
pub fn validate_spec(spec: &SandboxSpec) -> Result<(), RuntimeError> {
    validate_sandbox_id(&spec.id)?;
    validate_image_name(&spec.image)?;
    validate_argv("command", &spec.command)?;
    validate_env(&spec.env)?;
    validate_workdir(&spec.workdir)?;
    if let Some(h) = &spec.hostname {
        let ok = h.len() <= 63
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
        if !ok {
            return Err(RuntimeError::InvalidArgument(format!(
                "invalid hostname {:?}",
                truncate_for_message(h)
            )));
        }
    }
    for (k, v) in &spec.labels {
        let ok = !k.is_empty()
            && k.len() <= 128
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
            && v.len() <= 1024
            && !v.contains('\0');
        if !ok {
            return Err(RuntimeError::InvalidArgument(format!(
                "invalid label {:?}",
                truncate_for_message(k)
            )));
        }
    }
    Ok(())
}

/// Checks an exec request.
pub fn validate_exec(spec: &ExecSpec) -> Result<(), RuntimeError> {
    validate_argv("argv", &spec.argv)?;
    validate_env(&spec.env)?;
    validate_workdir(&spec.workdir)
}

fn truncate_for_message(s: &str) -> String {
    s.chars().take(100).collect()
}

// ---------------------------------------------------------------------------
// Per-sandbox serialisation inside a runtime: two commands for the same
// sandbox (a create retried while the first is still running), or a command
// and the TTL watchdog's stop, must not interleave their file system and
// runc steps.

/// A map of async locks keyed by sandbox id; entries go away when unused.
#[derive(Debug, Default)]
pub(crate) struct SandboxLocks {
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// Held while one command works on one sandbox.
pub(crate) struct SandboxLockGuard {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    id: String,
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl SandboxLocks {
    pub(crate) async fn lock(&self, id: &str) -> SandboxLockGuard {
        let lock = {
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(id.to_string()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        SandboxLockGuard {
            guard: Some(guard),
            id: id.to_string(),
            locks: self.locks.clone(),
        }
    }
}

impl Drop for SandboxLockGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map holds it: nobody waits on it, so it can go.
        if map.get(&self.id).is_some_and(|l| Arc::strong_count(l) == 1) {
            map.remove(&self.id);
        }
    }
}

// ---------------------------------------------------------------------------
// Conversions to and from the protocol. Nothing else in the crate builds or
// reads `pb` sandbox and exec types.

impl From<Phase> for pb::SandboxPhase {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::Created => pb::SandboxPhase::Created,
            Phase::Running => pb::SandboxPhase::Running,
            Phase::Stopped => pb::SandboxPhase::Stopped,
            Phase::Absent => pb::SandboxPhase::Absent,
        }
    }
}

impl From<&SandboxStatus> for pb::SandboxStatus {
    fn from(s: &SandboxStatus) -> Self {
        pb::SandboxStatus {
            sandbox_id: s.id.clone(),
            phase: pb::SandboxPhase::from(s.phase) as i32,
            exit_code: s.exit_code,
            image: s.image.clone(),
            expires_at_unix_ms: expiry_to_unix_ms(s.expires_at),
        }
    }
}

impl From<SandboxStatus> for pb::SandboxStatus {
    fn from(s: SandboxStatus) -> Self {
        pb::SandboxStatus::from(&s)
    }
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

impl From<pb::CreateSandbox> for SandboxSpec {
    fn from(c: pb::CreateSandbox) -> Self {
        // Secret values join the env here; the control plane refuses a key
        // in both, and should one come anyway the secret wins.
        let mut env: BTreeMap<String, String> = c.env.into_iter().collect();
        env.extend(c.secret_env);
        SandboxSpec {
            id: c.sandbox_id,
            image: c.image,
            command: c.command,
            env,
            host_network: c.network == "host",
            read_only_root: c.read_only_root,
            pids_limit: c.pids_limit,
            user_namespace: c.user_namespace,
            workdir: non_empty(c.workdir),
            cpu_millis: c.cpu_millis,
            memory_mb: c.memory_mb,
            labels: c.labels.into_iter().collect(),
            hostname: non_empty(c.hostname),
            expires_at: expiry_from_unix_ms(c.expires_at_unix_ms),
        }
    }
}

impl ExecSpec {
    /// The runtime's view of an exec request: 0 means the default for the
    /// timeout and the output cap, and the cap is bounded by
    /// [`MAX_EXEC_OUTPUT_BYTES`].
    pub fn from_pb(e: pb::ExecRequest) -> (String, Self) {
        let timeout = if e.timeout_ms == 0 {
            DEFAULT_EXEC_TIMEOUT
        } else {
            Duration::from_millis(u64::from(e.timeout_ms))
        };
        let max_output_bytes = if e.max_output_bytes == 0 {
            DEFAULT_EXEC_OUTPUT_BYTES
        } else {
            usize::try_from(e.max_output_bytes)
                .unwrap_or(MAX_EXEC_OUTPUT_BYTES)
                .min(MAX_EXEC_OUTPUT_BYTES)
        };
        (
            e.sandbox_id,
            ExecSpec {
                argv: e.argv,
                env: e.env.into_iter().collect(),
                workdir: non_empty(e.workdir),
                timeout,
                max_output_bytes,
            },
        )
    }
}

impl From<ExecOutput> for pb::ExecResult {
    fn from(o: ExecOutput) -> Self {
        pb::ExecResult {
            exit_code: o.exit_code,
            stdout: o.stdout,
            stderr: o.stderr,
            stdout_truncated: o.stdout_truncated,
            stderr_truncated: o.stderr_truncated,
            duration_ms: u64::try_from(o.duration.as_millis()).unwrap_or(u64::MAX),
            timed_out: o.timed_out,
        }
    }
}

impl From<&RuntimeError> for pb::Error {
    fn from(e: &RuntimeError) -> Self {
        pb::Error {
            code: e.code() as i32,
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_that_could_escape_or_inject_are_refused() {
        for ok in ["sbx_0193abcdef", "a", "abc-def_1", &"a".repeat(80)] {
            assert!(validate_sandbox_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".",
            "../etc",
            "a/b",
            "-rf",
            "_x",
            "Sbx_1",
            "sbx 1",
            "sbx\0",
            "sbx.1",
            &"a".repeat(81),
            "sbx_é",
        ] {
            assert!(
                matches!(
                    validate_sandbox_id(bad),
                    Err(RuntimeError::InvalidArgument(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn image_names_are_single_safe_path_components() {
        for ok in ["busybox", "alpine-3.20", "a", "0img_x", &"a".repeat(64)] {
            assert!(validate_image_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            ".hidden",
            "-x",
            "Busybox",
            "a b",
            &"a".repeat(65),
        ] {
            assert!(validate_image_name(bad).is_err(), "{bad:?}");
        }
    }

    fn spec() -> SandboxSpec {
        SandboxSpec {
            id: "sbx_1".into(),
            image: "busybox".into(),
            command: vec!["sleep".into(), "1".into()],
            ..Default::default()
        }
    }

    #[test]
    fn specs_with_bad_env_argv_or_workdir_are_refused() {
        assert!(validate_spec(&spec()).is_ok());
        let mut s = spec();
        s.command.clear();
        assert!(validate_spec(&s).is_err());
        let mut s = spec();
        s.env.insert("A=B".into(), "x".into());
        assert!(validate_spec(&s).is_err());
        let mut s = spec();
        s.env.insert("A".into(), "x\0y".into());
        assert!(validate_spec(&s).is_err());
        let mut s = spec();
        s.workdir = Some("relative".into());
        assert!(validate_spec(&s).is_err());
        let mut s = spec();
        s.hostname = Some("a/b".into());
        assert!(validate_spec(&s).is_err());
        let mut s = spec();
        s.image = "../../etc".into();
        assert!(validate_spec(&s).is_err());
    }

    #[test]
    fn a_default_path_is_added_only_when_absent() {
        let mut env = BTreeMap::new();
        env.insert("A".to_string(), "1".to_string());
        assert_eq!(
            env_with_path(&env),
            vec![format!("PATH={DEFAULT_PATH}"), "A=1".into()]
        );
        env.insert("PATH".to_string(), "/x".to_string());
        assert_eq!(
            env_with_path(&env),
            vec!["A=1".to_string(), "PATH=/x".into()]
        );
    }

    #[test]
    fn exec_requests_get_defaults_and_a_bounded_output_cap() {
        let (id, e) = ExecSpec::from_pb(pb::ExecRequest {
            sandbox_id: "sbx_1".into(),
            argv: vec!["true".into()],
            ..Default::default()
        });
        assert_eq!(id, "sbx_1");
        assert_eq!(e.timeout, DEFAULT_EXEC_TIMEOUT);
        assert_eq!(e.max_output_bytes, DEFAULT_EXEC_OUTPUT_BYTES);
        let (_, e) = ExecSpec::from_pb(pb::ExecRequest {
            max_output_bytes: u32::MAX,
            timeout_ms: 1500,
            ..Default::default()
        });
        assert_eq!(e.max_output_bytes, MAX_EXEC_OUTPUT_BYTES);
        assert_eq!(e.timeout, Duration::from_millis(1500));
    }

    #[test]
    fn errors_map_onto_protocol_codes() {
        let cases = [
            (
                RuntimeError::SandboxNotFound("x".into()),
                pb::ErrorCode::SandboxNotFound,
            ),
            (
                RuntimeError::ImageNotFound("x".into()),
                pb::ErrorCode::ImageNotFound,
            ),
            (
                RuntimeError::InvalidArgument("x".into()),
                pb::ErrorCode::InvalidArgument,
            ),
            (
                RuntimeError::InvalidState("x".into()),
                pb::ErrorCode::InvalidState,
            ),
            (RuntimeError::Runtime("x".into()), pb::ErrorCode::Runtime),
            (
                RuntimeError::Unsupported("x".into()),
                pb::ErrorCode::Unsupported,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(pb::Error::from(&err).code, code as i32);
        }
    }

    #[test]
    fn statuses_convert_to_protocol_statuses() {
        let s = SandboxStatus {
            id: "sbx_1".into(),
            phase: Phase::Stopped,
            exit_code: Some(3),
            image: "busybox".into(),
            expires_at: expiry_from_unix_ms(1_700_000_000_123),
        };
        let p = pb::SandboxStatus::from(&s);
        assert_eq!(p.phase, pb::SandboxPhase::Stopped as i32);
        assert_eq!(p.exit_code, Some(3));
        assert_eq!(p.sandbox_id, "sbx_1");
        assert_eq!(p.expires_at_unix_ms, 1_700_000_000_123);
        let none = SandboxStatus::absent("sbx_1", "busybox");
        assert_eq!(pb::SandboxStatus::from(&none).expires_at_unix_ms, 0);
    }

    #[test]
    fn ttl_deadlines_round_trip_and_zero_or_negative_means_none() {
        assert_eq!(expiry_from_unix_ms(0), None);
        assert_eq!(expiry_from_unix_ms(-5), None);
        let at = expiry_from_unix_ms(1_700_000_000_123).expect("a deadline");
        assert_eq!(
            at,
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            "milliseconds are exact"
        );
        assert_eq!(expiry_to_unix_ms(Some(at)), 1_700_000_000_123);
        assert_eq!(expiry_to_unix_ms(None), 0);
        assert_eq!(expiry_to_unix_ms(Some(UNIX_EPOCH)), 0);
        let spec = SandboxSpec::from(pb::CreateSandbox {
            sandbox_id: "sbx_1".into(),
            expires_at_unix_ms: 1_700_000_000_123,
            ..Default::default()
        });
        assert_eq!(spec.expires_at, Some(at));
        let spec = SandboxSpec::from(pb::CreateSandbox::default());
        assert_eq!(spec.expires_at, None);
    }

    #[test]
    fn secret_env_joins_env_and_debug_shows_no_values() {
        let spec = SandboxSpec::from(pb::CreateSandbox {
            sandbox_id: "sbx_1".into(),
            env: [("PLAIN".to_string(), "p-value".to_string())].into(),
            secret_env: [("TOKEN".to_string(), "hunter2".to_string())].into(),
            network: "host".into(),
            read_only_root: true,
            pids_limit: 64,
            ..Default::default()
        });
        assert_eq!(spec.env.get("TOKEN").map(String::as_str), Some("hunter2"));
        assert_eq!(spec.env.get("PLAIN").map(String::as_str), Some("p-value"));
        assert!(spec.host_network && spec.read_only_root);
        assert_eq!(spec.effective_pids_limit(), 64);
        let text = format!("{spec:?}");
        assert!(text.contains("TOKEN"), "{text}");
        assert!(
            !text.contains("hunter2") && !text.contains("p-value"),
            "{text}"
        );
        let default = SandboxSpec::from(pb::CreateSandbox::default());
        assert!(!default.host_network);
        assert_eq!(default.effective_pids_limit(), DEFAULT_PIDS_LIMIT);
    }

    #[tokio::test]
    async fn sandbox_locks_serialise_and_clean_up() {
        let locks = SandboxLocks::default();
        let g = locks.lock("a").await;
        let pending = tokio::time::timeout(Duration::from_millis(20), locks.lock("a")).await;
        assert!(pending.is_err(), "a second lock on the same id waits");
        let _other = locks.lock("b").await;
        drop(g);
        drop(locks.lock("a").await);
        let map = locks.locks.lock().unwrap_or_else(|p| p.into_inner());
        assert!(!map.contains_key("a"));
    }
}
