//! The REST API: routes, request and response shapes, and the OpenAPI
//! document generated from them. Handlers are thin: extract, validate into
//! domain types, call the [`ControlPlane`](corral_actors::ControlPlane) once,
//! map the result. Every org route is scoped to the caller's organisation;
//! another org's sandbox is a 404, never a 403, so ids do not leak.

use std::collections::BTreeMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, RawQuery, Request, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post, put};
use axum::{middleware, Json, Router};
use chrono::{DateTime, Utc};
use corral_actors::domain::{self, limits, DesiredState, ExecSpec, SandboxSpec, SandboxState};
use corral_actors::store::{self, SandboxFilter};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::auth::{AdminCaller, OrgCaller, Role};
use crate::billing;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::AppState;

/// `Json<T>` whose rejections use our error shape.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the request body is larger than this server accepts",
                ))
            }
            Err(rejection) => Err(ApiError::new(
                rejection.status(),
                "invalid_body",
                rejection.body_text(),
            )),
        }
    }
}

// ---- shapes ---------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrgRequest {
    pub name: String,
    /// An opening deposit, in micro-units (reference `initial`).
    pub credits_micros: Option<i64>,
    /// A price plan name (default: `default`).
    pub plan: Option<String>,
    /// Metered but never gated.
    pub exempt: Option<bool>,
    pub quota: Option<crate::billing::QuotaView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrgView {
    pub id: String,
    pub name: String,
    pub billing_status: String,
    pub created_at: DateTime<Utc>,
    /// Its sandboxes go only to its private pool.
    pub private_pool_only: bool,
}

impl From<store::org::Model> for OrgView {
    fn from(m: store::org::Model) -> Self {
        Self {
            id: m.id,
            name: m.name,
            billing_status: m.billing_status,
            created_at: m.created_at,
            private_pool_only: m.private_pool_only,
        }
    }
}

/// The org-level placement settings (`PUT /v1/admin/orgs/{id}/placement`);
/// a PUT replaces both.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrgPlacementRequest {
    /// Every sandbox of the org goes only to its private pool, whatever
    /// its request asks.
    pub private_pool_only: bool,
    /// Whether the org's create requests may choose `placement.strategy`:
    /// true or false for this org, absent or null to follow the deployment
    /// (`--no-strategy-override`).
    #[serde(default)]
    pub allow_strategy_override: Option<bool>,
}

/// An org's placement settings.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrgPlacementView {
    pub org_id: String,
    /// Every sandbox of the org goes only to its private pool (a create
    /// with no private host free gets `no_capacity`).
    pub private_pool_only: bool,
    /// The org's own permission to choose the strategy; null when it
    /// follows the deployment.
    pub allow_strategy_override: Option<bool>,
    /// Whether its requests may choose the strategy now (its own setting,
    /// else the deployment's).
    pub strategy_override_allowed: bool,
}

impl OrgPlacementView {
    fn of(org: store::org::Model, control_plane: &corral_actors::ControlPlane) -> Self {
        Self {
            strategy_override_allowed: control_plane.allows_strategy_override(&org.id),
            org_id: org.id,
            private_pool_only: org.private_pool_only,
            allow_strategy_override: org.allow_strategy_override,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedOrg {
    pub org: OrgView,
    pub api_key: CreatedApiKey,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrgList {
    pub orgs: Vec<OrgView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    pub name: String,
    /// admin, developer (default), viewer or billing; at most the caller's
    /// own role.
    pub role: Option<String>,
    /// When the key stops working (RFC 3339). Not with `ttl_seconds`.
    pub expires_at: Option<DateTime<Utc>>,
    /// The key stops working this many seconds from now.
    pub ttl_seconds: Option<u64>,
}

/// The longest a key or host token may be issued for: ten years.
const MAX_CREDENTIAL_TTL_SECONDS: u64 = 10 * 366 * 86_400;

/// The expiry of a new credential from `expires_at` or `ttl_seconds`.
fn credential_expiry(
    expires_at: Option<DateTime<Utc>>,
    ttl_seconds: Option<u64>,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    let now = Utc::now();
    match (expires_at, ttl_seconds) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "give expires_at or ttl_seconds, not both",
        )),
        (Some(at), None) => {
            if at <= now {
                return Err(ApiError::bad_request("expires_at must be in the future"));
            }
            if at > now + chrono::Duration::seconds(MAX_CREDENTIAL_TTL_SECONDS as i64) {
                return Err(ApiError::bad_request("expires_at must be within ten years"));
            }
            Ok(Some(at))
        }
        (None, Some(ttl)) => {
            let ttl = domain::validate_range("ttl_seconds", ttl, 1, MAX_CREDENTIAL_TTL_SECONDS)?;
            Ok(Some(now + chrono::Duration::seconds(ttl as i64)))
        }
        (None, None) => Ok(None),
    }
}

/// An API key as listed: the secret is never shown again.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyView {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub role: String,
    pub expires_at: Option<DateTime<Utc>>,
}

impl From<store::api_key::Model> for ApiKeyView {
    fn from(m: store::api_key::Model) -> Self {
        Self {
            id: m.id,
            name: m.name,
            prefix: m.prefix,
            created_at: m.created_at,
            last_used_at: m.last_used_at,
            revoked_at: m.revoked_at,
            role: m.role,
            expires_at: m.expires_at,
        }
    }
}

/// A new API key; `secret` is shown this once and stored only as a hash.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApiKey {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub secret: String,
    pub created_at: DateTime<Utc>,
    pub role: String,
    pub expires_at: Option<DateTime<Utc>>,
}

impl From<store::Issued<store::api_key::Model>> for CreatedApiKey {
    fn from(issued: store::Issued<store::api_key::Model>) -> Self {
        Self {
            id: issued.record.id,
            name: issued.record.name,
            prefix: issued.record.prefix,
            secret: issued.secret,
            created_at: issued.record.created_at,
            role: issued.record.role,
            expires_at: issued.record.expires_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    pub api_keys: Vec<ApiKeyView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateHostTokenRequest {
    pub name: String,
    /// Issue the token for an existing host (e.g. to rotate its token).
    pub host_id: Option<String>,
    /// When the token stops working (RFC 3339). Not with `ttl_seconds`.
    pub expires_at: Option<DateTime<Utc>>,
    /// The token stops working this many seconds from now.
    pub ttl_seconds: Option<u64>,
    /// Issue the token for a host of this org's private pool: it takes
    /// only that org's sandboxes.
    pub org_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HostTokenView {
    pub id: String,
    pub host_id: String,
    /// The org whose private pool the host joins; null for the shared fleet.
    pub org_id: Option<String>,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl From<store::host_token::Model> for HostTokenView {
    fn from(m: store::host_token::Model) -> Self {
        Self {
            id: m.id,
            host_id: m.host_id,
            org_id: m.org_id,
            name: m.name,
            prefix: m.prefix,
            created_at: m.created_at,
            revoked_at: m.revoked_at,
            expires_at: m.expires_at,
        }
    }
}

/// A new host token; `token` is shown this once and stored only as a hash.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedHostToken {
    pub id: String,
    pub host_id: String,
    pub org_id: Option<String>,
    pub name: String,
    pub prefix: String,
    pub token: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HostTokenList {
    pub host_tokens: Vec<HostTokenView>,
}

#[derive(Debug, Serialize, ToSchema, Default)]
pub struct ResourcesView {
    pub cpu_millis: u64,
    pub memory_mb: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HostView {
    pub id: String,
    pub hostname: String,
    /// Connection state: ready, disconnected or offline.
    pub state: String,
    /// Operator state: active, cordoned, draining or decommissioned.
    pub admin_state: String,
    /// Whether the host takes new placements now.
    pub schedulable: bool,
    pub runtime: String,
    pub isolated: bool,
    /// What the agent reported.
    pub capacity: ResourcesView,
    /// What sandboxes may reserve: capacity less the reserve, times the
    /// overcommit ratio.
    pub allocatable: ResourcesView,
    /// The reservations of the sandboxes placed there.
    pub allocated: ResourcesView,
    /// What the agent last reported in use.
    pub usage: ResourcesView,
    pub labels: BTreeMap<String, String>,
    /// The org whose private pool it is in; null for the shared fleet.
    pub org_id: Option<String>,
    /// Sandboxes holding a reservation on it.
    pub sandbox_count: u32,
    pub images: Vec<String>,
    pub agent_version: String,
    pub last_seen_at: Option<DateTime<Utc>>,
}

impl From<corral_actors::HostView> for HostView {
    fn from(h: corral_actors::HostView) -> Self {
        let cap = h.capacity.unwrap_or_default();
        let view = |r: domain::Resources| ResourcesView {
            cpu_millis: r.cpu_millis,
            memory_mb: r.memory_mb,
        };
        HostView {
            capacity: ResourcesView {
                cpu_millis: u64::try_from(h.row.cpu_millis).unwrap_or(0),
                memory_mb: u64::try_from(h.row.memory_mb).unwrap_or(0),
            },
            allocatable: view(cap.allocatable),
            allocated: view(cap.allocated),
            usage: view(cap.usage),
            schedulable: cap.schedulable,
            sandbox_count: cap.sandboxes,
            labels: h
                .row
                .labels
                .and_then(|l| serde_json::from_value(l).ok())
                .unwrap_or_default(),
            org_id: h.row.org_id,
            admin_state: h.row.admin_state,
            images: serde_json::from_value(h.row.images).unwrap_or_default(),
            id: h.row.id,
            hostname: h.row.hostname,
            state: h.row.state,
            runtime: h.row.runtime,
            isolated: h.row.isolated,
            agent_version: h.row.agent_version,
            last_seen_at: h.row.last_seen_at,
        }
    }
}

/// Where a sandbox may go (`placement` of a create request).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementBody {
    /// `spread` or `binpack`; overrides the deployment's strategy unless it
    /// was started with `--no-strategy-override`.
    pub strategy: Option<String>,
    /// Host labels the host must carry, e.g. `{"region": "eu", "gpu": "a100"}`.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The runtime kind the host must run: runc, docker, process or fake.
    pub runtime: Option<String>,
    /// Spread the sandboxes sharing this label's value over hosts
    /// (anti-affinity); the sandbox must carry the label.
    pub spread_by: Option<String>,
    /// Only the org's private pool, never the shared fleet.
    pub private_pool_only: Option<bool>,
    /// Wait up to this long for capacity instead of failing with
    /// `no_capacity` at once (at most 300000, and at most half the server's
    /// request timeout).
    pub wait_timeout_ms: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HostList {
    pub hosts: Vec<HostView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxRequest {
    /// Name of an image the host holds, e.g. `busybox`.
    pub image: String,
    /// The main process, as an argument vector (no shell is involved).
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub name: Option<String>,
    pub workdir: Option<String>,
    /// Thousandths of a CPU core (default 1000).
    pub cpu_millis: Option<u32>,
    /// Memory limit in MiB (default 256).
    pub memory_mb: Option<u64>,
    pub ttl_seconds: Option<u64>,
    /// Constraints on the host (see docs/scheduling.md).
    pub placement: Option<PlacementBody>,
    /// `never` (default) or `on_host_loss`: created again on another host
    /// when its host is lost or drained.
    pub restart_policy: Option<String>,
    /// Env values that are secret: encrypted at rest, shown as `***`,
    /// decrypted only for the host. Same rules as `env`; a key may not be
    /// in both. Needs a secret key on the server (else 422
    /// `secrets_unavailable`).
    #[serde(default)]
    pub secret_env: BTreeMap<String, String>,
    /// `none` (default: loopback only) or `host` (the host's network; only
    /// when the server allows it, else 403 `network_not_allowed`).
    pub network: Option<String>,
    /// Mount the root filesystem read-only (default false).
    pub read_only_root: Option<bool>,
    /// Most processes/threads in the sandbox (8-32768; default: the host's,
    /// 1024 unless configured).
    pub pids_limit: Option<u32>,
    /// Run in a user namespace: root inside is an unprivileged user on the
    /// host (default false; the host must support it).
    pub user_namespace: Option<bool>,
}

/// A sandbox as its owner sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxView {
    pub id: String,
    pub name: Option<String>,
    pub image: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub cpu_millis: i64,
    pub memory_mb: i64,
    pub ttl_seconds: Option<i64>,
    /// Observed state: pending, scheduled, creating, running, starting,
    /// stopping, stopped, destroying, destroyed, failed or lost.
    pub state: String,
    /// What the owner asked for: running, stopped or destroyed.
    pub desired_state: String,
    pub failure_reason: Option<String>,
    pub exit_code: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    /// The host it is placed on.
    pub host_id: Option<String>,
    /// never or on_host_loss.
    pub restart_policy: String,
    /// The secret env keys, each with the value `***`.
    pub secret_env: BTreeMap<String, String>,
    /// `none` or `host`.
    pub network: String,
    pub read_only_root: bool,
    /// `null`: the host's default.
    pub pids_limit: Option<u32>,
    pub user_namespace: bool,
}

impl From<store::sandbox::Model> for SandboxView {
    fn from(m: store::sandbox::Model) -> Self {
        let security: domain::SandboxSecurity = m
            .security
            .as_ref()
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        Self {
            secret_env: corral_actors::secrets::redacted(m.secret_env.as_ref()),
            network: security.network.as_str().to_string(),
            read_only_root: security.read_only_root,
            pids_limit: security.pids_limit,
            user_namespace: security.user_namespace,
            id: m.id,
            name: m.name,
            image: m.image,
            command: serde_json::from_value(m.command).unwrap_or_default(),
            env: serde_json::from_value(m.env).unwrap_or_default(),
            labels: serde_json::from_value(m.labels).unwrap_or_default(),
            workdir: m.workdir,
            cpu_millis: m.cpu_millis,
            memory_mb: m.memory_mb,
            ttl_seconds: m.ttl_seconds,
            state: m.state,
            desired_state: m.desired_state,
            failure_reason: m.failure_reason,
            exit_code: m.exit_code,
            created_at: m.created_at,
            updated_at: m.updated_at,
            started_at: m.started_at,
            expires_at: m.expires_at,
            host_id: m.host_id,
            restart_policy: m.restart_policy,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<SandboxView>,
    /// Pass as `after` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    /// Default 60000, at most 600000.
    pub timeout_ms: Option<u32>,
    /// Cap on each of stdout and stderr; default 65536, at most 1048576.
    pub max_output_bytes: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExecResponse {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    /// True when stdout was cut at `max_output_bytes`.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub duration_ms: u64,
    pub timed_out: bool,
}

#[derive(Debug, Deserialize)]
pub struct WaitQuery {
    #[serde(default = "default_wait")]
    pub wait: bool,
}

fn default_wait() -> bool {
    true
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
}

// ---- validation -----------------------------------------------------------

/// The longest a create may wait for capacity (and never more than half the
/// request timeout).
const MAX_WAIT_TIMEOUT_MS: u64 = 300_000;

fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message.into())
}

/// Checks a create's placement and restart policy; 422 with a stable code
/// for each kind of mistake.
fn validate_placement(
    body: Option<PlacementBody>,
    restart_policy: Option<&str>,
    labels: &BTreeMap<String, String>,
    allow_strategy_override: bool,
    max_wait_ms: u64,
) -> Result<(domain::Placement, domain::RestartPolicy), ApiError> {
    let restart_policy = match restart_policy {
        None => domain::RestartPolicy::Never,
        Some(text) => domain::RestartPolicy::parse(text).ok_or_else(|| {
            unprocessable(
                "invalid_restart_policy",
                "restart_policy must be never or on_host_loss",
            )
        })?,
    };
    let Some(body) = body else {
        return Ok((domain::Placement::default(), restart_policy));
    };
    let strategy = match body.strategy.as_deref() {
        None => None,
        Some(text) => {
            let strategy = domain::PlacementStrategy::parse(text).ok_or_else(|| {
                unprocessable("invalid_strategy", "strategy must be spread or binpack")
            })?;
            if !allow_strategy_override {
                return Err(unprocessable(
                    "strategy_override_not_allowed",
                    "this organisation may not choose the placement strategy; leave placement.strategy out",
                ));
            }
            Some(strategy)
        }
    };
    domain::validate_labels(&body.selector)
        .map_err(|e| unprocessable("invalid_selector", format!("selector: {e}")))?;
    if let Some(runtime) = &body.runtime {
        if !["runc", "docker", "process", "fake"].contains(&runtime.as_str()) {
            return Err(unprocessable(
                "invalid_runtime",
                "runtime must be runc, docker, process or fake",
            ));
        }
    }
    if let Some(key) = &body.spread_by {
        if !labels.contains_key(key) {
            return Err(unprocessable(
                "invalid_spread_by",
                format!("spread_by names the label {key:?}, which the sandbox does not carry"),
            ));
        }
    }
    if body.wait_timeout_ms.is_some_and(|ms| ms > max_wait_ms) {
        return Err(unprocessable(
            "invalid_wait_timeout",
            format!(
                "wait_timeout_ms must be at most {max_wait_ms} (the server's request timeout, less the time to create)"
            ),
        ));
    }
    Ok((
        domain::Placement {
            strategy,
            selector: body.selector,
            runtime: body.runtime,
            spread_by: body.spread_by,
            private_pool_only: body.private_pool_only.unwrap_or(false),
            wait_timeout_ms: body.wait_timeout_ms,
        },
        restart_policy,
    ))
}

fn validate_create(
    req: CreateSandboxRequest,
    allow_strategy_override: bool,
    max_wait_ms: u64,
) -> Result<SandboxSpec, ApiError> {
    domain::validate_sandbox_fields(
        req.name.as_deref(),
        &req.image,
        &req.command,
        &req.env,
        &req.labels,
        req.workdir.as_deref(),
    )?;
    let cpu_millis = domain::validate_range(
        "cpu_millis",
        req.cpu_millis.unwrap_or(limits::DEFAULT_CPU_MILLIS),
        limits::MIN_CPU_MILLIS,
        limits::MAX_CPU_MILLIS,
    )?;
    let memory_mb = domain::validate_range(
        "memory_mb",
        req.memory_mb.unwrap_or(limits::DEFAULT_MEMORY_MB),
        limits::MIN_MEMORY_MB,
        limits::MAX_MEMORY_MB,
    )?;
    let ttl_seconds = req
        .ttl_seconds
        .map(|ttl| domain::validate_range("ttl_seconds", ttl, 1, limits::MAX_TTL_SECONDS))
        .transpose()?;
    let (placement, restart_policy) = validate_placement(
        req.placement,
        req.restart_policy.as_deref(),
        &req.labels,
        allow_strategy_override,
        max_wait_ms,
    )?;
    domain::validate_secret_env(&req.env, &req.secret_env)?;
    let network = match req.network.as_deref() {
        None => domain::Network::None,
        Some(text) => domain::Network::parse(text)
            .ok_or_else(|| ApiError::bad_request("network must be \"none\" or \"host\""))?,
    };
    let pids_limit = req
        .pids_limit
        .map(|p| {
            domain::validate_range(
                "pids_limit",
                p,
                limits::MIN_PIDS_LIMIT,
                limits::MAX_PIDS_LIMIT,
            )
        })
        .transpose()?;
    let security = domain::SandboxSecurity {
        network,
        read_only_root: req.read_only_root.unwrap_or(false),
        pids_limit,
        user_namespace: req.user_namespace.unwrap_or(false),
    };
    Ok(SandboxSpec {
        secret_env: domain::SecretEnv(req.secret_env),
        security,
        name: req.name,
        image: req.image,
        command: req.command,
        env: req.env,
        labels: req.labels,
        workdir: req.workdir,
        cpu_millis,
        memory_mb,
        ttl_seconds,
        placement,
        restart_policy,
    })
}

fn validate_exec(req: ExecRequest) -> Result<ExecSpec, ApiError> {
    domain::validate_argv("argv", &req.argv)?;
    domain::validate_env(&req.env)?;
    if let Some(workdir) = &req.workdir {
        domain::validate_workdir(workdir)?;
    }
    Ok(ExecSpec {
        argv: req.argv,
        env: req.env,
        workdir: req.workdir,
        timeout_ms: domain::validate_range(
            "timeout_ms",
            req.timeout_ms.unwrap_or(limits::DEFAULT_EXEC_TIMEOUT_MS),
            1,
            limits::MAX_EXEC_TIMEOUT_MS,
        )?,
        max_output_bytes: domain::validate_range(
            "max_output_bytes",
            req.max_output_bytes
                .unwrap_or(limits::DEFAULT_EXEC_OUTPUT_BYTES),
            0,
            limits::MAX_EXEC_OUTPUT_BYTES,
        )?,
    })
}

pub(crate) fn validate_display_name(what: &str, name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        Err(ApiError::bad_request(format!(
            "{what} must be 1-128 printable characters"
        )))
    } else {
        Ok(())
    }
}

/// Sandbox ids are `sbx_` and 32 hex digits; anything else cannot exist.
fn check_sandbox_id(id: &str) -> Result<(), ApiError> {
    let ok = id.len() == 36
        && id.starts_with("sbx_")
        && id[4..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    if ok {
        Ok(())
    } else {
        Err(ApiError::not_found("sandbox"))
    }
}

// ---- handlers: health -----------------------------------------------------

#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

#[utoipa::path(get, path = "/readyz", responses((status = 200, body = Health), (status = 503, body = ErrorBody)))]
async fn readyz(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    if !state.control_plane.is_alive() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the actor tree is not running",
        ));
    }
    state.control_plane.store().ping().await?;
    Ok(Json(Health {
        status: "ready".into(),
    }))
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

// ---- handlers: admin ------------------------------------------------------

#[utoipa::path(post, path = "/v1/admin/orgs", request_body = CreateOrgRequest,
    responses((status = 201, body = CreatedOrg), (status = 409, body = ErrorBody)), tag = "admin")]
async fn create_org(
    _: AdminCaller,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateOrgRequest>,
) -> ApiResult<(StatusCode, Json<CreatedOrg>)> {
    validate_display_name("name", &req.name)?;
    // Everything that can be refused is checked before anything is written.
    if let Some(amount) = req.credits_micros {
        domain::validate_range("credits_micros", amount, 0, billing::MAX_CREDIT_MICROS)?;
    }
    let store = state.control_plane.store();
    if let Some(plan) = &req.plan {
        if store.find_plan_by_name(plan).await?.is_none() {
            return Err(ApiError::bad_request(format!("no plan named {plan:?}")));
        }
    }
    let org = store.create_org(&req.name).await?;
    let key = store.create_api_key(&org.id, "initial").await?;
    // Credit first: the settings below evaluate the status, and an org
    // with its opening credit is not in grace.
    if let Some(amount) = req.credits_micros.filter(|a| *a != 0) {
        state
            .control_plane
            .credit(
                &org.id,
                corral_actors::actors::ledger::CreditKind::Deposit,
                amount,
                "initial",
                "opening credit",
            )
            .await?;
    }
    if req.plan.is_some() || req.exempt.is_some() || req.quota.is_some() {
        let settings = crate::billing::BillingSettingsRequest {
            plan: req.plan,
            exempt: req.exempt,
            quota: req.quota,
        };
        crate::billing::configure(&state, &org.id, settings).await?;
    }
    let org = store.get_org(&org.id).await?.unwrap_or(org);
    Ok((
        StatusCode::CREATED,
        Json(CreatedOrg {
            org: org.into(),
            api_key: key.into(),
        }),
    ))
}

#[utoipa::path(get, path = "/v1/admin/orgs", responses((status = 200, body = OrgList)), tag = "admin")]
async fn list_orgs(_: AdminCaller, State(state): State<AppState>) -> ApiResult<Json<OrgList>> {
    let orgs = state.control_plane.store().list_orgs().await?;
    Ok(Json(OrgList {
        orgs: orgs.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(put, path = "/v1/admin/orgs/{id}/placement", params(("id" = String, Path)),
    request_body = OrgPlacementRequest,
    responses((status = 200, body = OrgPlacementView), (status = 404, body = ErrorBody)), tag = "admin")]
async fn set_org_placement(
    _: AdminCaller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<OrgPlacementRequest>,
) -> ApiResult<Json<OrgPlacementView>> {
    let org = state
        .control_plane
        .set_org_placement(&id, req.private_pool_only, req.allow_strategy_override)
        .await?;
    Ok(Json(OrgPlacementView::of(org, &state.control_plane)))
}

#[utoipa::path(get, path = "/v1/placement",
    responses((status = 200, body = OrgPlacementView, description = "The org's placement setting")), tag = "org")]
async fn org_placement(
    caller: OrgCaller,
    State(state): State<AppState>,
) -> ApiResult<Json<OrgPlacementView>> {
    let org = state
        .control_plane
        .store()
        .get_org(&caller.org_id)
        .await?
        .ok_or_else(|| ApiError::not_found("organisation"))?;
    Ok(Json(OrgPlacementView::of(org, &state.control_plane)))
}

#[utoipa::path(post, path = "/v1/admin/host-tokens", request_body = CreateHostTokenRequest,
    responses((status = 201, body = CreatedHostToken)), tag = "admin")]
async fn create_host_token(
    _: AdminCaller,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateHostTokenRequest>,
) -> ApiResult<(StatusCode, Json<CreatedHostToken>)> {
    validate_display_name("name", &req.name)?;
    let expires_at = credential_expiry(req.expires_at, req.ttl_seconds)?;
    if let Some(host_id) = &req.host_id {
        let known = state.control_plane.store().list_host_tokens().await?;
        if !known.iter().any(|t| &t.host_id == host_id) {
            return Err(ApiError::not_found("host"));
        }
    }
    if let Some(org_id) = &req.org_id {
        if state.control_plane.store().get_org(org_id).await?.is_none() {
            return Err(ApiError::not_found("organisation"));
        }
    }
    let issued = state
        .control_plane
        .store()
        .issue_host_token(&req.name, req.host_id, expires_at, req.org_id)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedHostToken {
            id: issued.record.id,
            host_id: issued.record.host_id,
            org_id: issued.record.org_id,
            name: issued.record.name,
            prefix: issued.record.prefix,
            token: issued.secret,
            created_at: issued.record.created_at,
            expires_at: issued.record.expires_at,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/admin/host-tokens", responses((status = 200, body = HostTokenList)), tag = "admin")]
async fn list_host_tokens(
    _: AdminCaller,
    State(state): State<AppState>,
) -> ApiResult<Json<HostTokenList>> {
    let tokens = state.control_plane.store().list_host_tokens().await?;
    Ok(Json(HostTokenList {
        host_tokens: tokens.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(delete, path = "/v1/admin/host-tokens/{id}", params(("id" = String, Path)),
    responses((status = 200, body = HostTokenView), (status = 404, body = ErrorBody)), tag = "admin")]
async fn revoke_host_token(
    _: AdminCaller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<HostTokenView>> {
    let token = state.control_plane.store().revoke_host_token(&id).await?;
    // Revocation is immediate: a stream the token opened ends now, not at
    // the agent's next reconnect.
    let ended = state
        .agent_streams
        .end_streams_of(&token.id, "host token revoked");
    if ended > 0 {
        tracing::info!(host.id = %token.host_id, token.id = %token.id, ended, "ended the agent streams of a revoked host token");
    }
    Ok(Json(token.into()))
}

#[utoipa::path(get, path = "/v1/admin/hosts", responses((status = 200, body = HostList)), tag = "admin")]
async fn list_hosts(_: AdminCaller, State(state): State<AppState>) -> ApiResult<Json<HostList>> {
    let hosts = state.control_plane.list_hosts().await?;
    Ok(Json(HostList {
        hosts: hosts.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(get, path = "/v1/admin/hosts/{id}", params(("id" = String, Path)),
    responses((status = 200, body = HostView), (status = 404, body = ErrorBody)), tag = "admin")]
async fn admin_get_host(
    _: AdminCaller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<HostView>> {
    Ok(Json(state.control_plane.get_host(&id).await?.into()))
}

async fn set_admin(
    state: &AppState,
    id: &str,
    admin: domain::HostAdminState,
) -> ApiResult<Json<HostView>> {
    Ok(Json(
        state
            .control_plane
            .set_host_admin(id, admin, None)
            .await?
            .into(),
    ))
}

#[utoipa::path(post, path = "/v1/admin/hosts/{id}/cordon", params(("id" = String, Path)),
    responses((status = 200, body = HostView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), tag = "admin")]
async fn cordon_host(
    _: AdminCaller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<HostView>> {
    set_admin(&state, &id, domain::HostAdminState::Cordoned).await
}

#[utoipa::path(post, path = "/v1/admin/hosts/{id}/uncordon", params(("id" = String, Path)),
    responses((status = 200, body = HostView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), tag = "admin")]
async fn uncordon_host(
    _: AdminCaller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<HostView>> {
    set_admin(&state, &id, domain::HostAdminState::Active).await
}

/// The longest drain deadline accepted, in seconds.
const MAX_DRAIN_DEADLINE_SECONDS: u64 = 3600;

#[utoipa::path(post, path = "/v1/admin/hosts/{id}/drain",
    params(("id" = String, Path),
        ("deadline_seconds" = Option<u64>, Query, description = "How long each stopping sandbox gets to exit before it is killed (1-3600; default: the server's stop grace)")),
    responses((status = 200, body = HostView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody, description = "invalid_deadline")), tag = "admin")]
async fn drain_host(
    _: AdminCaller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<HostView>> {
    let mut deadline = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if key == "deadline_seconds" {
            let seconds = value
                .parse::<u64>()
                .ok()
                .filter(|s| (1..=MAX_DRAIN_DEADLINE_SECONDS).contains(s))
                .ok_or_else(|| {
                    unprocessable(
                        "invalid_deadline",
                        format!(
                            "deadline_seconds must be a whole number from 1 to {MAX_DRAIN_DEADLINE_SECONDS}"
                        ),
                    )
                })?;
            deadline = Some(std::time::Duration::from_secs(seconds));
        }
    }
    Ok(Json(
        state
            .control_plane
            .set_host_admin(&id, domain::HostAdminState::Draining, deadline)
            .await?
            .into(),
    ))
}

#[utoipa::path(post, path = "/v1/admin/hosts/{id}/decommission", params(("id" = String, Path)),
    responses((status = 200, body = HostView), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "conflict: the host still holds sandboxes")), tag = "admin")]
async fn decommission_host(
    _: AdminCaller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<HostView>> {
    let (view, tokens) = state.control_plane.decommission_host(&id).await?;
    for token in tokens {
        state
            .agent_streams
            .end_streams_of(&token, "host decommissioned");
    }
    Ok(Json(view.into()))
}

/// Whether an org may see a host: the shared fleet and its own pool.
fn visible_to(org_id: &str, host: &corral_actors::HostView) -> bool {
    host.row.org_id.as_deref().is_none_or(|o| o == org_id)
        && host.row.admin_state != domain::HostAdminState::Decommissioned.as_str()
}

#[utoipa::path(get, path = "/v1/hosts",
    responses((status = 200, body = HostList, description = "The shared fleet and the org's private pool")), tag = "org")]
async fn org_list_hosts(
    caller: OrgCaller,
    State(state): State<AppState>,
) -> ApiResult<Json<HostList>> {
    let hosts = state.control_plane.list_hosts().await?;
    Ok(Json(HostList {
        hosts: hosts
            .into_iter()
            .filter(|h| visible_to(&caller.org_id, h))
            .map(Into::into)
            .collect(),
    }))
}

const ACTOR_KINDS: &[&str] = &[
    "root",
    "scheduler",
    "orgs",
    "fleet",
    "host",
    "connection",
    "sandbox",
    "ledger",
];

fn actor_tree_filter(query: Option<String>) -> ApiResult<corral_actors::tree::TreeFilter> {
    let mut filter = corral_actors::tree::TreeFilter::default();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let value = value.into_owned();
        if value.is_empty() || value.len() > 128 {
            return Err(ApiError::bad_request(format!(
                "{key} must be 1 to 128 characters"
            )));
        }
        match key.as_ref() {
            "kind" => {
                if !ACTOR_KINDS.contains(&value.as_str()) {
                    return Err(ApiError::bad_request(format!(
                        "kind must be one of {}",
                        ACTOR_KINDS.join(", ")
                    )));
                }
                filter.kind = Some(value);
            }
            "org_id" | "org" => filter.org_id = Some(value),
            "host_id" | "host" => filter.host_id = Some(value),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}"
                )))
            }
        }
    }
    Ok(filter)
}

/// The live supervision tree, read off the async workers: a tree of
/// 100,000 actors never holds up a request.
#[utoipa::path(get, path = "/v1/hosts/{id}", params(("id" = String, Path)),
    responses((status = 200, body = HostView), (status = 404, body = ErrorBody)), tag = "org")]
async fn org_get_host(
    caller: OrgCaller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<HostView>> {
    let host = state.control_plane.get_host(&id).await?;
    if !visible_to(&caller.org_id, &host) {
        return Err(ApiError::not_found("host"));
    }
    Ok(Json(host.into()))
}

#[utoipa::path(get, path = "/v1/admin/actors",
    params(
        ("kind" = Option<String>, Query, description = "Only actors of this kind (root, scheduler, orgs, fleet, host, connection, sandbox, ledger), with their ancestors"),
        ("org_id" = Option<String>, Query, description = "Only actors of this org (sandboxes, ledgers), with their ancestors"),
        ("host_id" = Option<String>, Query, description = "Only actors of this host (the host, its connection and sandboxes), with their ancestors"),
    ),
    responses(
        (status = 200, description = "The live supervision tree: {kind, id?, status, state? (hosts: connection/operator state), org_id?, host_id?, uptime_seconds?, restarts, mailbox (messages waiting), last_error?, children?}"),
        (status = 400, body = ErrorBody)), tag = "admin")]
async fn actor_tree(
    _: AdminCaller,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<corral_actors::tree::ActorNode>> {
    let filter = actor_tree_filter(query)?;
    Ok(Json(
        state.control_plane.actor_tree_with_states(filter).await?,
    ))
}

// ---- handlers: org --------------------------------------------------------

#[utoipa::path(post, path = "/v1/api-keys", request_body = CreateApiKeyRequest,
    responses((status = 201, body = CreatedApiKey)), tag = "org")]
async fn create_api_key(
    caller: OrgCaller,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateApiKeyRequest>,
) -> ApiResult<(StatusCode, Json<CreatedApiKey>)> {
    validate_display_name("name", &req.name)?;
    let role = match &req.role {
        None => Role::Developer,
        Some(name) => Role::parse(name).ok_or_else(|| {
            ApiError::bad_request("role must be admin, developer, viewer or billing")
        })?,
    };
    if !caller.role.may_issue(role) {
        return Err(ApiError::forbidden(format!(
            "a {} key may not issue a {} key",
            caller.role.as_str(),
            role.as_str()
        )));
    }
    let expires_at = credential_expiry(req.expires_at, req.ttl_seconds)?;
    let issued = state
        .control_plane
        .store()
        .issue_api_key(&caller.org_id, &req.name, role.as_str(), expires_at)
        .await?;
    Ok((StatusCode::CREATED, Json(issued.into())))
}

#[utoipa::path(get, path = "/v1/api-keys", responses((status = 200, body = ApiKeyList)), tag = "org")]
async fn list_api_keys(
    caller: OrgCaller,
    State(state): State<AppState>,
) -> ApiResult<Json<ApiKeyList>> {
    let keys = state
        .control_plane
        .store()
        .list_api_keys(&caller.org_id)
        .await?;
    Ok(Json(ApiKeyList {
        api_keys: keys.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(delete, path = "/v1/api-keys/{id}", params(("id" = String, Path)),
    responses((status = 200, body = ApiKeyView), (status = 404, body = ErrorBody)), tag = "org")]
async fn revoke_api_key(
    caller: OrgCaller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<ApiKeyView>> {
    let key = state
        .control_plane
        .store()
        .revoke_api_key(&caller.org_id, &id)
        .await?;
    state.api_keys.clear();
    Ok(Json(key.into()))
}

#[utoipa::path(post, path = "/v1/sandboxes", request_body = CreateSandboxRequest,
    params(("wait" = Option<bool>, Query, description = "Answer once running (default true)")),
    responses((status = 201, body = SandboxView), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "network_not_allowed"),
        (status = 422, body = ErrorBody, description = "The host refused, e.g. image_not_found; or secrets_unavailable"),
        (status = 503, body = ErrorBody, description = "no_capacity, host_unavailable")), tag = "sandboxes")]
async fn create_sandbox(
    caller: OrgCaller,
    State(state): State<AppState>,
    Query(q): Query<WaitQuery>,
    ApiJson(req): ApiJson<CreateSandboxRequest>,
) -> ApiResult<(StatusCode, Json<SandboxView>)> {
    // A wait for capacity must end well within the request's deadline.
    let max_wait_ms = u64::try_from(state.limits.config.request_timeout.as_millis() / 2)
        .unwrap_or(u64::MAX)
        .min(MAX_WAIT_TIMEOUT_MS);
    let spec = validate_create(
        req,
        state.control_plane.allows_strategy_override(&caller.org_id),
        max_wait_ms,
    )?;
    if !spec.secret_env.is_empty() && state.control_plane.store().secrets().is_none() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "secrets_unavailable",
            "secret_env needs a secret key on the server (--secret-key-file); none is configured",
        ));
    }
    if spec.security.network == domain::Network::Host && !state.allow_host_network {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "network_not_allowed",
            "network \"host\" is not allowed on this server (--allow-host-network)",
        ));
    }
    let row = state
        .control_plane
        .create_sandbox(&caller.org_id, spec, q.wait)
        .await?;
    if row.state == SandboxState::Failed.as_str() {
        // The host refused it: report why, with the sandbox id to inspect.
        let reason = row.failure_reason.clone().unwrap_or_default();
        let code = if reason.starts_with("image_not_found") {
            "image_not_found"
        } else if reason.starts_with("secrets_unavailable") {
            "secrets_unavailable"
        } else {
            "sandbox_failed"
        };
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            code,
            format!("sandbox {} failed to start: {reason}", row.id),
        ));
    }
    Ok((StatusCode::CREATED, Json(row.into())))
}

#[utoipa::path(get, path = "/v1/sandboxes",
    params(("state" = Option<String>, Query), ("label" = Option<String>, Query, description = "k=v; repeatable"),
        ("after" = Option<String>, Query, description = "cursor"), ("limit" = Option<u64>, Query)),
    responses((status = 200, body = SandboxList)), tag = "sandboxes")]
async fn list_sandboxes(
    caller: OrgCaller,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<SandboxList>> {
    let mut filter = SandboxFilter {
        limit: 100,
        ..Default::default()
    };
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "state" => {
                filter.state =
                    Some(SandboxState::parse(&value).ok_or_else(|| {
                        ApiError::bad_request(format!("unknown state {value:?}"))
                    })?);
            }
            "label" => {
                let (k, v) = value
                    .split_once('=')
                    .ok_or_else(|| ApiError::bad_request("label filters are key=value"))?;
                filter.labels.insert(k.to_string(), v.to_string());
            }
            "after" => filter.after = Some(value.into_owned()),
            "limit" => {
                let limit: u64 = value
                    .parse()
                    .map_err(|_| ApiError::bad_request("limit must be a number"))?;
                filter.limit = domain::validate_range("limit", limit, 1, 1000)?;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}"
                )))
            }
        }
    }
    let rows = state
        .control_plane
        .list_sandboxes(&caller.org_id, &filter)
        .await?;
    let next_cursor = if rows.len() as u64 == filter.limit {
        rows.last().map(|r| r.id.clone())
    } else {
        None
    };
    Ok(Json(SandboxList {
        sandboxes: rows.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}", params(("id" = String, Path)),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorBody)), tag = "sandboxes")]
async fn get_sandbox(
    caller: OrgCaller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<SandboxView>> {
    check_sandbox_id(&id)?;
    Ok(Json(
        state
            .control_plane
            .get_sandbox(&caller.org_id, &id)
            .await?
            .into(),
    ))
}

async fn set_desired(
    caller: OrgCaller,
    state: AppState,
    id: String,
    desired: DesiredState,
    wait: bool,
) -> ApiResult<Json<SandboxView>> {
    check_sandbox_id(&id)?;
    let row = state
        .control_plane
        .set_desired(&caller.org_id, &id, desired, wait)
        .await?;
    Ok(Json(row.into()))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/start", params(("id" = String, Path), ("wait" = Option<bool>, Query)),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), tag = "sandboxes")]
async fn start_sandbox(
    caller: OrgCaller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<Json<SandboxView>> {
    set_desired(caller, state, id, DesiredState::Running, q.wait).await
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/stop", params(("id" = String, Path), ("wait" = Option<bool>, Query)),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorBody)), tag = "sandboxes")]
async fn stop_sandbox(
    caller: OrgCaller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<Json<SandboxView>> {
    set_desired(caller, state, id, DesiredState::Stopped, q.wait).await
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}", params(("id" = String, Path), ("wait" = Option<bool>, Query)),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorBody)), tag = "sandboxes")]
async fn destroy_sandbox(
    caller: OrgCaller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<Json<SandboxView>> {
    set_desired(caller, state, id, DesiredState::Destroyed, q.wait).await
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", params(("id" = String, Path)), request_body = ExecRequest,
    responses((status = 200, body = ExecResponse), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), tag = "sandboxes")]
async fn exec_sandbox(
    caller: OrgCaller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> ApiResult<Json<ExecResponse>> {
    check_sandbox_id(&id)?;
    let spec = validate_exec(req)?;
    let _slot = state.limits.exec_slot(&caller.org_id, &id)?;
    let out = state.control_plane.exec(&caller.org_id, &id, spec).await?;
    Ok(Json(ExecResponse {
        exit_code: out.exit_code,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout_truncated: out.stdout_truncated,
        stderr_truncated: out.stderr_truncated,
        duration_ms: out.duration_ms,
        timed_out: out.timed_out,
    }))
}

// ---- handlers: audit ------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEventView {
    pub id: i64,
    pub org_id: Option<String>,
    /// An API key id, `platform-admin` or `anonymous`.
    pub actor: String,
    /// `METHOD /route/{id}`.
    pub action: String,
    pub path: String,
    pub target_id: Option<String>,
    /// The HTTP status the request ended with.
    pub status: i32,
    pub source_addr: Option<String>,
    pub request_id: String,
    pub created_at: DateTime<Utc>,
}

impl From<store::audit_event::Model> for AuditEventView {
    fn from(m: store::audit_event::Model) -> Self {
        Self {
            id: m.id,
            org_id: m.org_id,
            actor: m.actor,
            action: m.action,
            path: m.path,
            target_id: m.target_id,
            status: m.status,
            source_addr: m.source_addr,
            request_id: m.request_id,
            created_at: m.created_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditList {
    pub events: Vec<AuditEventView>,
    /// Pass as `after` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// `after`, `limit` and (admin only) `org` from a query string.
fn audit_filter(query: Option<String>, allow_org: bool) -> Result<store::AuditFilter, ApiError> {
    let mut filter = store::AuditFilter {
        limit: 100,
        ..Default::default()
    };
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "after" => {
                filter.after = Some(value.parse::<i64>().map_err(|_| {
                    ApiError::bad_request("after must be a cursor from next_cursor")
                })?);
            }
            "limit" => {
                let limit: u64 = value
                    .parse()
                    .map_err(|_| ApiError::bad_request("limit must be a number"))?;
                filter.limit = domain::validate_range("limit", limit, 1, 1000)?;
            }
            "org" if allow_org => filter.org_id = Some(value.into_owned()),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}"
                )))
            }
        }
    }
    Ok(filter)
}

async fn audit_page(state: &AppState, filter: store::AuditFilter) -> ApiResult<Json<AuditList>> {
    let rows = state.control_plane.store().list_audit(&filter).await?;
    let next_cursor = if rows.len() as u64 == filter.limit {
        rows.last().map(|r| r.id.to_string())
    } else {
        None
    };
    Ok(Json(AuditList {
        events: rows.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

#[utoipa::path(get, path = "/v1/audit",
    params(("after" = Option<String>, Query, description = "cursor"), ("limit" = Option<u64>, Query)),
    responses((status = 200, body = AuditList), (status = 403, body = ErrorBody)), tag = "org")]
async fn org_audit(
    caller: OrgCaller,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<AuditList>> {
    let mut filter = audit_filter(query, false)?;
    filter.org_id = Some(caller.org_id);
    audit_page(&state, filter).await
}

#[utoipa::path(get, path = "/v1/admin/audit",
    params(("org" = Option<String>, Query, description = "one org's events; all when absent"),
        ("after" = Option<String>, Query, description = "cursor"), ("limit" = Option<u64>, Query)),
    responses((status = 200, body = AuditList)), tag = "admin")]
async fn admin_audit(
    _: AdminCaller,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<AuditList>> {
    audit_page(&state, audit_filter(query, true)?).await
}

async fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such route")
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Corral", description = "Sandbox orchestrator REST API. Authenticate with `Authorization: Bearer <API key>` (org routes) or the platform admin token (admin routes)."),
    paths(healthz, readyz, create_org, list_orgs, set_org_placement, org_placement, create_host_token, list_host_tokens,
        revoke_host_token, list_hosts, admin_get_host, cordon_host, uncordon_host, drain_host,
        decommission_host, org_list_hosts, org_get_host, actor_tree, create_api_key, list_api_keys, revoke_api_key,
        billing::get_billing, billing::get_ledger, billing::get_usage, billing::credit_org,
        billing::get_org_billing, billing::set_org_billing, billing::create_plan, billing::list_plans,
        billing::audit, org_audit, admin_audit, crate::events::events,
        create_sandbox, list_sandboxes, get_sandbox, start_sandbox, stop_sandbox, destroy_sandbox, exec_sandbox),
    tags((name = "sandboxes"), (name = "org"), (name = "billing"), (name = "admin"))
)]
pub struct ApiDoc;

/// Every route, in one place that reads like the API reference.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi_json))
        .route("/metrics", get(crate::observe::metrics))
        .route("/v1/admin/orgs", post(create_org).get(list_orgs))
        .route("/v1/admin/orgs/{id}/credits", post(billing::credit_org))
        .route("/v1/admin/orgs/{id}/placement", put(set_org_placement))
        .route("/v1/placement", get(org_placement))
        .route(
            "/v1/admin/orgs/{id}/billing",
            get(billing::get_org_billing).put(billing::set_org_billing),
        )
        .route(
            "/v1/admin/plans",
            post(billing::create_plan).get(billing::list_plans),
        )
        .route("/v1/admin/billing/audit", get(billing::audit))
        .route(
            "/v1/admin/host-tokens",
            post(create_host_token).get(list_host_tokens),
        )
        .route("/v1/admin/host-tokens/{id}", delete(revoke_host_token))
        .route("/v1/admin/hosts", get(list_hosts))
        .route("/v1/admin/hosts/{id}", get(admin_get_host))
        .route("/v1/admin/hosts/{id}/cordon", post(cordon_host))
        .route("/v1/admin/hosts/{id}/uncordon", post(uncordon_host))
        .route("/v1/admin/hosts/{id}/drain", post(drain_host))
        .route("/v1/admin/hosts/{id}/decommission", post(decommission_host))
        .route("/v1/hosts", get(org_list_hosts))
        .route("/v1/hosts/{id}", get(org_get_host))
        .route("/v1/admin/actors", get(actor_tree))
        .route("/v1/api-keys", post(create_api_key).get(list_api_keys))
        .route("/v1/api-keys/{id}", delete(revoke_api_key))
        .route("/v1/billing", get(billing::get_billing))
        .route("/v1/billing/ledger", get(billing::get_ledger))
        .route("/v1/usage", get(billing::get_usage))
        .route("/v1/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route(
            "/v1/sandboxes/{id}",
            get(get_sandbox).delete(destroy_sandbox),
        )
        .route("/v1/sandboxes/{id}/start", post(start_sandbox))
        .route("/v1/sandboxes/{id}/stop", post(stop_sandbox))
        .route("/v1/sandboxes/{id}/exec", post(exec_sandbox))
        .route("/v1/audit", get(org_audit))
        .route("/v1/events", get(crate::events::events))
        .route("/v1/admin/audit", get(admin_audit))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(state.limits.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::audit::edge,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::observe::http,
        ))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    /// Every org route in the API reference has an entry in the role
    /// table (a route missing from it would be refused to every key).
    #[test]
    fn every_org_route_has_a_permission() {
        let doc = ApiDoc::openapi();
        let mut checked = 0;
        for (path, item) in &doc.paths.paths {
            if !path.starts_with("/v1/") || path.starts_with("/v1/admin/") {
                continue;
            }
            let methods = [
                (Method::GET, item.get.is_some()),
                (Method::POST, item.post.is_some()),
                (Method::PUT, item.put.is_some()),
                (Method::DELETE, item.delete.is_some()),
                (Method::PATCH, item.patch.is_some()),
            ];
            for (method, present) in methods {
                if present {
                    assert!(
                        crate::auth::permission_for(&method, path).is_some(),
                        "{method} {path} has no permission"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 14, "only {checked} org routes found");
    }
}
