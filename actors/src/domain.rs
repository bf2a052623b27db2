//! Domain vocabulary: identifiers, the sandbox and host state machines,
//! resources, and validation of everything a client may send. Pure code, no
//! I/O: the REST layer validates into these types and the actors trust them.

use std::collections::BTreeMap;

use crate::error::CorralError;

/// A fresh, time-ordered identifier with a kind prefix, e.g. `sbx_0193...`.
/// Ordering by id is ordering by creation time, which cursor pagination uses.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// Where a sandbox is in its lifecycle (the observed state).
    SandboxState {
        Pending = "pending",
        Scheduled = "scheduled",
        Creating = "creating",
        Running = "running",
        Starting = "starting",
        Stopping = "stopping",
        Stopped = "stopped",
        Destroying = "destroying",
        Destroyed = "destroyed",
        Failed = "failed",
        Lost = "lost",
    }
);

string_enum!(
    /// What the owner of a sandbox wants it to be.
    DesiredState {
        Running = "running",
        Stopped = "stopped",
        Destroyed = "destroyed",
    }
);

string_enum!(
    /// A host's connection and scheduling state.
    HostState {
        Ready = "ready",
        Cordoned = "cordoned",
        Draining = "draining",
        Disconnected = "disconnected",
        Offline = "offline",
    }
);

string_enum!(
    /// What operators decided about a host, beside its connection state:
    /// `active` takes placements; `cordoned` takes none (what runs stays);
    /// `draining` takes none and its sandboxes move or stop;
    /// `decommissioned` left the fleet for good.
    HostAdminState {
        Active = "active",
        Cordoned = "cordoned",
        Draining = "draining",
        Decommissioned = "decommissioned",
    }
);

string_enum!(
    /// What happens to a sandbox when its host is lost or drained: `never`
    /// leaves it `lost` (host lost) or `stopped` (drained); `on_host_loss`
    /// creates it again on another host, with the same id.
    RestartPolicy {
        Never = "never",
        OnHostLoss = "on_host_loss",
    }
);

string_enum!(
    /// How the scheduler chooses among the hosts that can take a sandbox:
    /// `spread` the least loaded (the default), `binpack` the fullest that
    /// still fits.
    PlacementStrategy {
        Spread = "spread",
        Binpack = "binpack",
    }
);

string_enum!(
    /// An organisation's billing status.
    BillingStatus {
        Active = "active",
        Warning = "warning",
        Grace = "grace",
        Suspended = "suspended",
        Exempt = "exempt",
    }
);

// The enums come from `string_enum!`, which takes no `#[default]`.
#[allow(clippy::derivable_impls)]
impl Default for HostAdminState {
    fn default() -> Self {
        Self::Active
    }
}

// The enums come from `string_enum!`, which takes no `#[default]`.
#[allow(clippy::derivable_impls)]
impl Default for RestartPolicy {
    fn default() -> Self {
        Self::Never
    }
}

// The enums come from `string_enum!`, which takes no `#[default]`.
#[allow(clippy::derivable_impls)]
impl Default for PlacementStrategy {
    fn default() -> Self {
        Self::Spread
    }
}

impl SandboxState {
    /// A sandbox in a terminal state has no actor and never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Destroyed)
    }

    /// States in the middle of a step toward the desired state.
    pub fn is_transitional(self) -> bool {
        matches!(
            self,
            Self::Creating | Self::Starting | Self::Stopping | Self::Destroying
        )
    }

    /// States in which the sandbox holds a reservation on its host.
    pub fn holds_capacity(self) -> bool {
        !matches!(
            self,
            Self::Destroyed | Self::Failed | Self::Lost | Self::Pending
        )
    }
}

/// CPU (thousandths of a core) and memory (MiB).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_mb: u64,
}

impl Resources {
    pub fn fits_in(self, free: Resources) -> bool {
        self.cpu_millis <= free.cpu_millis && self.memory_mb <= free.memory_mb
    }
}

/// Where a sandbox may go, as its creator asked (validated at the edge,
/// stored on the sandbox row and reused when it is placed again).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Placement {
    /// Overrides the deployment's strategy (if the deployment allows).
    pub strategy: Option<PlacementStrategy>,
    /// Host labels the host must carry, all of them (`region`, `arch`,
    /// `gpu`, any key).
    pub selector: BTreeMap<String, String>,
    /// The runtime kind the host must run (`runc`, `docker`, `process`,
    /// `fake`).
    pub runtime: Option<String>,
    /// Anti-affinity: spread the sandboxes that share this label's value
    /// (the sandbox's own label of that key) over as many hosts as possible.
    pub spread_by: Option<String>,
    /// Only the org's private pool, never the shared fleet.
    pub private_pool_only: bool,
    /// Wait up to this long for capacity instead of failing at once.
    pub wait_timeout_ms: Option<u64>,
}

/// A validated request for a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    pub name: Option<String>,
    pub image: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub cpu_millis: u32,
    pub memory_mb: u64,
    pub ttl_seconds: Option<u64>,
    pub placement: Placement,
    pub restart_policy: RestartPolicy,
    /// Env values marked secret: encrypted at rest, redacted in views and
    /// in Debug output, decrypted only into the message to the agent.
    pub secret_env: SecretEnv,
    /// Hardening options (network, read-only root, pids, user namespace).
    pub security: SandboxSecurity,
}

/// Secret env values. Its Debug shows the keys only, so a spec (or anything
/// holding one) can be logged without leaking them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretEnv(pub BTreeMap<String, String>);

impl std::fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "***")))
            .finish()
    }
}

impl SecretEnv {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

string_enum!(
    /// A sandbox's network: `none` (its own namespace, loopback only) or
    /// `host` (the host's network; only where the operator allows it).
    Network {
        None = "none",
        Host = "host",
    }
);

/// Hardening a client may choose per sandbox. Stored with the sandbox (the
/// `security` column) and sent to the agent with every create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxSecurity {
    pub network: Network,
    /// Mount the root filesystem read-only.
    pub read_only_root: bool,
    /// Process/thread limit; `None` means the agent's default.
    pub pids_limit: Option<u32>,
    /// Run in a user namespace (root inside maps to an unprivileged range).
    pub user_namespace: bool,
}

impl Default for SandboxSecurity {
    fn default() -> Self {
        Self {
            network: Network::None,
            read_only_root: false,
            pids_limit: None,
            user_namespace: false,
        }
    }
}

impl SandboxSpec {
    pub fn resources(&self) -> Resources {
        Resources {
            cpu_millis: u64::from(self.cpu_millis),
            memory_mb: self.memory_mb,
        }
    }
}

/// A validated exec request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub timeout_ms: u32,
    pub max_output_bytes: u32,
}

/// The outcome of an exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub duration_ms: u64,
    pub timed_out: bool,
}

/// Limits on what a client may ask for. One place, so that the API docs,
/// validation and tests agree.
pub mod limits {
    pub const MIN_CPU_MILLIS: u32 = 10;
    pub const MAX_CPU_MILLIS: u32 = 64_000;
    pub const DEFAULT_CPU_MILLIS: u32 = 1_000;
    pub const MIN_MEMORY_MB: u64 = 16;
    pub const MAX_MEMORY_MB: u64 = 256 * 1024;
    pub const DEFAULT_MEMORY_MB: u64 = 256;
    pub const MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;
    pub const MAX_ARGS: usize = 256;
    pub const MAX_ARG_BYTES: usize = 4096;
    pub const MAX_ARGV_TOTAL_BYTES: usize = 64 * 1024;
    pub const MAX_ENV_ENTRIES: usize = 128;
    pub const MAX_ENV_KEY_BYTES: usize = 128;
    pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
    pub const MAX_LABELS: usize = 32;
    pub const MAX_LABEL_KEY_BYTES: usize = 63;
    pub const MAX_LABEL_VALUE_BYTES: usize = 256;
    pub const MAX_PATH_BYTES: usize = 1024;
    pub const MAX_EXEC_TIMEOUT_MS: u32 = 10 * 60 * 1000;
    pub const DEFAULT_EXEC_TIMEOUT_MS: u32 = 60 * 1000;
    pub const MAX_EXEC_OUTPUT_BYTES: u32 = 1024 * 1024;
    pub const DEFAULT_EXEC_OUTPUT_BYTES: u32 = 64 * 1024;
    /// Bounds of a sandbox's `pids_limit` (the agent's default applies
    /// when it is not given).
    pub const MIN_PIDS_LIMIT: u32 = 8;
    pub const MAX_PIDS_LIMIT: u32 = 32_768;
}

fn invalid(message: impl Into<String>) -> CorralError {
    CorralError::InvalidArgument(message.into())
}

/// `[a-z0-9]` then up to 62 of `[a-z0-9-]`: sandbox names.
pub fn validate_name(name: &str) -> Result<(), CorralError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "name must be 1-63 characters of a-z, 0-9 and '-', not starting with '-'",
        ))
    }
}

/// Local image names: `[a-z0-9]` then up to 63 of `[a-z0-9._-]`. No path
/// separators, so an image name can never escape the agent's image store.
pub fn validate_image(image: &str) -> Result<(), CorralError> {
    let ok = !image.is_empty()
        && image.len() <= 64
        && image
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && image.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "image must be 1-64 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit",
        ))
    }
}

/// An argument vector: non-empty, bounded, no NUL bytes.
pub fn validate_argv(what: &str, argv: &[String]) -> Result<(), CorralError> {
    if argv.is_empty() {
        return Err(invalid(format!("{what} must have at least one element")));
    }
    if argv.len() > limits::MAX_ARGS {
        return Err(invalid(format!(
            "{what} has {} elements; at most {} are allowed",
            argv.len(),
            limits::MAX_ARGS
        )));
    }
    if argv[0].is_empty() {
        return Err(invalid(format!("{what}[0] must not be empty")));
    }
    let mut total = 0;
    for (i, arg) in argv.iter().enumerate() {
        if arg.len() > limits::MAX_ARG_BYTES {
            return Err(invalid(format!(
                "{what}[{i}] is longer than {} bytes",
                limits::MAX_ARG_BYTES
            )));
        }
        if arg.contains('\0') {
            return Err(invalid(format!("{what}[{i}] contains a NUL byte")));
        }
        total += arg.len();
    }
    if total > limits::MAX_ARGV_TOTAL_BYTES {
        return Err(invalid(format!(
            "{what} is longer than {} bytes in total",
            limits::MAX_ARGV_TOTAL_BYTES
        )));
    }
    Ok(())
}

/// Environment variables: POSIX-style keys, bounded values without NUL.
pub fn validate_env(env: &BTreeMap<String, String>) -> Result<(), CorralError> {
    if env.len() > limits::MAX_ENV_ENTRIES {
        return Err(invalid(format!(
            "env has {} entries; at most {} are allowed",
            env.len(),
            limits::MAX_ENV_ENTRIES
        )));
    }
    for (key, value) in env {
        let key_ok = !key.is_empty()
            && key.len() <= limits::MAX_ENV_KEY_BYTES
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !key.as_bytes()[0].is_ascii_digit();
        if !key_ok {
            return Err(invalid(format!(
                "env key {key:?} must be 1-{} characters of A-Z, a-z, 0-9 and '_', not starting with a digit",
                limits::MAX_ENV_KEY_BYTES
            )));
        }
        if value.len() > limits::MAX_ENV_VALUE_BYTES || value.contains('\0') {
            return Err(invalid(format!(
                "env value of {key} must be at most {} bytes without NUL",
                limits::MAX_ENV_VALUE_BYTES
            )));
        }
    }
    Ok(())
}

/// Secret env: the same rules as env, the two together within the env
/// bounds, and no key in both.
pub fn validate_secret_env(
    env: &BTreeMap<String, String>,
    secret_env: &BTreeMap<String, String>,
) -> Result<(), CorralError> {
    validate_env(secret_env).map_err(|e| match e {
        CorralError::InvalidArgument(m) => invalid(format!("secret_{m}")),
        other => other,
    })?;
    if let Some(key) = secret_env.keys().find(|k| env.contains_key(*k)) {
        return Err(invalid(format!(
            "env key {key:?} is in both env and secret_env"
        )));
    }
    if env.len() + secret_env.len() > limits::MAX_ENV_ENTRIES {
        return Err(invalid(format!(
            "env and secret_env have more than {} entries together",
            limits::MAX_ENV_ENTRIES
        )));
    }
    Ok(())
}

/// Labels: lowercase keys (`[a-z0-9]` then `[a-z0-9._/-]`), short printable values.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), CorralError> {
    if labels.len() > limits::MAX_LABELS {
        return Err(invalid(format!(
            "at most {} labels are allowed",
            limits::MAX_LABELS
        )));
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= limits::MAX_LABEL_KEY_BYTES
            && key.as_bytes()[0].is_ascii_alphanumeric()
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b));
        if !key_ok {
            return Err(invalid(format!(
                "label key {key:?} must be 1-{} characters of a-z, 0-9, '.', '_', '/' and '-'",
                limits::MAX_LABEL_KEY_BYTES
            )));
        }
        if value.len() > limits::MAX_LABEL_VALUE_BYTES || value.chars().any(char::is_control) {
            return Err(invalid(format!(
                "label {key} must have a value of at most {} printable bytes",
                limits::MAX_LABEL_VALUE_BYTES
            )));
        }
    }
    Ok(())
}

/// The fields of a create request that need no server setting, in the
/// order the API checks them (the create fuzz target runs the same).
pub fn validate_sandbox_fields(
    name: Option<&str>,
    image: &str,
    command: &[String],
    env: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
    workdir: Option<&str>,
) -> Result<(), CorralError> {
    if let Some(name) = name {
        validate_name(name)?;
    }
    validate_image(image)?;
    validate_argv("command", command)?;
    validate_env(env)?;
    validate_labels(labels)?;
    if let Some(workdir) = workdir {
        validate_workdir(workdir)?;
    }
    Ok(())
}

/// An absolute path with no `..` components.
pub fn validate_workdir(path: &str) -> Result<(), CorralError> {
    let ok = path.starts_with('/')
        && path.len() <= limits::MAX_PATH_BYTES
        && !path.contains('\0')
        && !path.split('/').any(|part| part == "..");
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "workdir must be an absolute path without '..' of at most 1024 bytes",
        ))
    }
}

/// Checks that `value` is within `[min, max]`.
pub fn validate_range<T: PartialOrd + std::fmt::Display>(
    what: &str,
    value: T,
    min: T,
    max: T,
) -> Result<T, CorralError> {
    if value < min || value > max {
        Err(invalid(format!("{what} must be between {min} and {max}")))
    } else {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_text() {
        for state in SandboxState::ALL {
            assert_eq!(SandboxState::parse(state.as_str()), Some(*state));
        }
        assert_eq!(SandboxState::parse("nonsense"), None);
    }

    #[test]
    fn image_names_cannot_escape_the_image_store() {
        assert!(validate_image("busybox").is_ok());
        assert!(validate_image("alpine-3.20_x").is_ok());
        for bad in [
            "",
            "../etc",
            "a/b",
            ".hidden",
            "UPPER",
            "x\0y",
            &"a".repeat(65),
        ] {
            assert!(validate_image(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn workdir_must_be_absolute_without_parent_components() {
        assert!(validate_workdir("/").is_ok());
        assert!(validate_workdir("/srv/app").is_ok());
        assert!(validate_workdir("relative").is_err());
        assert!(validate_workdir("/srv/../etc").is_err());
    }

    #[test]
    fn env_keys_and_values_are_checked() {
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), "/bin".to_string());
        env.insert("_X1".to_string(), String::new());
        assert!(validate_env(&env).is_ok());
        for bad in ["1X", "A-B", "", "A B"] {
            let env = BTreeMap::from([(bad.to_string(), "v".to_string())]);
            assert!(validate_env(&env).is_err(), "{bad:?} must be rejected");
        }
        let env = BTreeMap::from([("K".to_string(), "a\0b".to_string())]);
        assert!(validate_env(&env).is_err());
    }

    #[test]
    fn secret_env_is_checked_like_env_and_never_printed() {
        let env = BTreeMap::from([("A".to_string(), "1".to_string())]);
        let secret = BTreeMap::from([("TOKEN".to_string(), "hunter2".to_string())]);
        assert!(validate_secret_env(&env, &secret).is_ok());
        let both = BTreeMap::from([("A".to_string(), "2".to_string())]);
        assert!(validate_secret_env(&env, &both).is_err());
        let bad = BTreeMap::from([("1X".to_string(), "v".to_string())]);
        assert!(validate_secret_env(&env, &bad).is_err());
        let shown = format!("{:?}", SecretEnv(secret));
        assert!(
            shown.contains("TOKEN") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn argv_bounds() {
        assert!(validate_argv("command", &["echo".into(), "hi".into()]).is_ok());
        assert!(validate_argv("command", &[]).is_err());
        assert!(validate_argv("command", &[String::new()]).is_err());
        assert!(validate_argv("command", &vec!["x".to_string(); 257]).is_err());
        assert!(validate_argv("command", &["a\0".to_string()]).is_err());
    }

    #[test]
    fn labels_and_names() {
        assert!(validate_name("web-1").is_ok());
        assert!(validate_name("-web").is_err());
        assert!(validate_name("Web").is_err());
        let labels = BTreeMap::from([("team/app".to_string(), "Billing API".to_string())]);
        assert!(validate_labels(&labels).is_ok());
        let labels = BTreeMap::from([("Team".to_string(), "x".to_string())]);
        assert!(validate_labels(&labels).is_err());
    }
}
