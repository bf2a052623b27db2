//! The billing routes: an org's balance, status, plan and burn rate, its
//! ledger and its usage; and the admin side: credits, price plans, an org's
//! plan, exemption and quota, and the ledger audit. Every change goes to the
//! org's LedgerActor through the control plane; these handlers only read
//! rows for the ledger and usage listings.

use std::collections::BTreeMap;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, NaiveDate, Utc};
use corral_actors::actors::ledger::{BillingSettings, CreditKind, LedgerAudit, LedgerSummary};
use corral_actors::billing::Quota;
use corral_actors::domain::{self, new_id};
use corral_actors::store;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{AdminCaller, OrgCaller};
use crate::error::{ApiError, ApiResult};
use crate::rest::ApiJson;
use crate::AppState;

// ---- shapes -----------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditRequest {
    /// `deposit` (default), `adjustment` (may be negative) or `refund`.
    #[serde(default = "default_kind")]
    #[schema(value_type = String)]
    pub kind: CreditKind,
    pub amount_micros: i64,
    /// Idempotency reference: the same reference never credits twice.
    pub reference: String,
    #[serde(default)]
    pub description: String,
}

fn default_kind() -> CreditKind {
    CreditKind::Deposit
}

#[derive(Debug, Serialize, Deserialize, ToSchema, Clone, Copy, Default)]
#[serde(deny_unknown_fields)]
pub struct QuotaView {
    pub max_sandboxes: Option<u64>,
    pub max_cpu_millis: Option<u64>,
    pub max_memory_mb: Option<u64>,
    pub max_ttl_seconds: Option<u64>,
}

impl From<Quota> for QuotaView {
    fn from(q: Quota) -> Self {
        Self {
            max_sandboxes: q.max_sandboxes,
            max_cpu_millis: q.max_cpu_millis,
            max_memory_mb: q.max_memory_mb,
            max_ttl_seconds: q.max_ttl_seconds,
        }
    }
}

impl From<QuotaView> for Quota {
    fn from(q: QuotaView) -> Self {
        Self {
            max_sandboxes: q.max_sandboxes,
            max_cpu_millis: q.max_cpu_millis,
            max_memory_mb: q.max_memory_mb,
            max_ttl_seconds: q.max_ttl_seconds,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanView {
    pub id: String,
    pub name: String,
    pub cpu_micros_per_vcpu_hour: i64,
    pub memory_micros_per_gib_hour: i64,
    pub stopped_memory_micros_per_gib_hour: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageNow {
    pub sandboxes: u64,
    pub cpu_millis: u64,
    pub memory_mb: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BillingView {
    pub org_id: String,
    /// Credit left as of the last billing tick: the ledger's entries less
    /// the running time charged since each sandbox's last written usage
    /// period (written at least every `--billing-write-every-ms`).
    pub balance_micros: i64,
    /// active, warning, grace, suspended or exempt.
    pub status: String,
    pub exempt: bool,
    pub plan: PlanView,
    pub quota: QuotaView,
    pub usage: UsageNow,
    pub burn_rate_micros_per_hour: i64,
    pub held_micros: i64,
    pub grace_deadline: Option<DateTime<Utc>>,
}

impl From<LedgerSummary> for BillingView {
    fn from(s: LedgerSummary) -> Self {
        Self {
            org_id: s.org_id,
            balance_micros: s.balance_micros,
            status: s.status.as_str().to_string(),
            exempt: s.exempt,
            plan: PlanView {
                id: s.plan.id,
                name: s.plan.name,
                cpu_micros_per_vcpu_hour: s.plan.cpu_micros_per_vcpu_hour,
                memory_micros_per_gib_hour: s.plan.memory_micros_per_gib_hour,
                stopped_memory_micros_per_gib_hour: s.plan.stopped_memory_micros_per_gib_hour,
            },
            quota: s.quota.into(),
            usage: UsageNow {
                sandboxes: s.usage.sandboxes,
                cpu_millis: s.usage.cpu_millis,
                memory_mb: s.usage.memory_mb,
            },
            burn_rate_micros_per_hour: s.burn_rate_micros_per_hour,
            held_micros: s.held_micros,
            grace_deadline: s.grace_deadline,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerEntryView {
    pub id: i64,
    /// deposit, adjustment, refund or usage.
    pub kind: String,
    pub amount_micros: i64,
    pub sandbox_id: Option<String>,
    pub period_start: Option<DateTime<Utc>>,
    pub period_end: Option<DateTime<Utc>>,
    pub description: String,
    pub created_at: DateTime<Utc>,
}

impl From<store::ledger_entry::Model> for LedgerEntryView {
    fn from(e: store::ledger_entry::Model) -> Self {
        Self {
            id: e.id,
            kind: e.kind,
            amount_micros: e.amount_micros,
            sandbox_id: e.sandbox_id,
            period_start: e.period_start,
            period_end: e.period_end,
            description: e.description,
            created_at: e.created_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerPage {
    pub entries: Vec<LedgerEntryView>,
    /// Pass as `after` for the next page; absent on the last one.
    pub next: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxUsage {
    pub sandbox_id: String,
    pub running_ms: i64,
    pub stopped_ms: i64,
    pub charged_micros: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DayUsage {
    /// The UTC day the periods started on.
    pub day: NaiveDate,
    pub charged_micros: i64,
    pub running_ms: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub total_micros: i64,
    pub sandboxes: Vec<SandboxUsage>,
    pub days: Vec<DayUsage>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePlanRequest {
    pub name: String,
    pub cpu_micros_per_vcpu_hour: i64,
    pub memory_micros_per_gib_hour: i64,
    #[serde(default)]
    pub stopped_memory_micros_per_gib_hour: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanList {
    pub plans: Vec<PlanView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BillingSettingsRequest {
    /// A plan name.
    pub plan: Option<String>,
    pub exempt: Option<bool>,
    /// Replaces the whole quota; an absent limit is unlimited.
    pub quota: Option<QuotaView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    pub org_id: String,
    pub balance_micros: i64,
    pub entries_sum_micros: i64,
    pub overlapping_periods: u64,
    pub ok: bool,
}

impl From<LedgerAudit> for AuditView {
    fn from(a: LedgerAudit) -> Self {
        Self {
            org_id: a.org_id,
            balance_micros: a.balance_micros,
            entries_sum_micros: a.entries_sum_micros,
            overlapping_periods: a.overlapping_periods,
            ok: a.ok,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditReport {
    pub ok: bool,
    pub orgs: Vec<AuditView>,
}

fn plan_view(p: store::price_plan::Model) -> PlanView {
    PlanView {
        id: p.id,
        name: p.name,
        cpu_micros_per_vcpu_hour: p.cpu_micros_per_vcpu_hour,
        memory_micros_per_gib_hour: p.memory_micros_per_gib_hour,
        stopped_memory_micros_per_gib_hour: p.stopped_memory_micros_per_gib_hour,
    }
}

/// The highest amount a single credit may carry (a typo guard: 10^12
/// micro-units).
pub(crate) const MAX_CREDIT_MICROS: i64 = 1_000_000_000_000;

fn parse_time(what: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{what} must be an RFC 3339 time or a YYYY-MM-DD date"
            ))
        })
}

// ---- org routes ---------------------------------------------------------------

#[utoipa::path(get, path = "/v1/billing", responses((status = 200, body = BillingView)), tag = "billing")]
pub async fn get_billing(
    caller: OrgCaller,
    State(state): State<AppState>,
) -> ApiResult<Json<BillingView>> {
    Ok(Json(
        state.control_plane.billing(&caller.org_id).await?.into(),
    ))
}

#[utoipa::path(get, path = "/v1/billing/ledger",
    params(("after" = Option<i64>, Query, description = "cursor: the last entry id seen"),
        ("limit" = Option<u64>, Query)),
    responses((status = 200, body = LedgerPage)), tag = "billing")]
pub async fn get_ledger(
    caller: OrgCaller,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<LedgerPage>> {
    let (mut after, mut limit) = (None, 100u64);
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "after" => {
                after = Some(
                    value
                        .parse::<i64>()
                        .map_err(|_| ApiError::bad_request("after must be an entry id"))?,
                )
            }
            "limit" => {
                let n: u64 = value
                    .parse()
                    .map_err(|_| ApiError::bad_request("limit must be a number"))?;
                limit = domain::validate_range("limit", n, 1, 1000)?;
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
        .store()
        .list_ledger_entries(&caller.org_id, after, limit)
        .await?;
    let next = (rows.len() as u64 == limit)
        .then(|| rows.last().map(|e| e.id))
        .flatten();
    Ok(Json(LedgerPage {
        entries: rows.into_iter().map(Into::into).collect(),
        next,
    }))
}

#[utoipa::path(get, path = "/v1/usage",
    params(("from" = Option<String>, Query, description = "RFC 3339 or YYYY-MM-DD (default: 30 days ago)"),
        ("to" = Option<String>, Query, description = "exclusive (default: now)")),
    responses((status = 200, body = UsageReport), (status = 400, body = crate::error::ErrorBody)), tag = "billing")]
pub async fn get_usage(
    caller: OrgCaller,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<UsageReport>> {
    let now = Utc::now();
    let (mut from, mut to) = (now - chrono::Duration::days(30), now);
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "from" => from = parse_time("from", &value)?,
            "to" => to = parse_time("to", &value)?,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}"
                )))
            }
        }
    }
    if to <= from || to - from > chrono::Duration::days(366) {
        return Err(ApiError::bad_request(
            "`to` must be after `from`, at most 366 days later",
        ));
    }
    let entries = state
        .control_plane
        .store()
        .usage_between(&caller.org_id, from, to)
        .await?;
    let mut sandboxes: BTreeMap<String, SandboxUsage> = BTreeMap::new();
    let mut days: BTreeMap<NaiveDate, DayUsage> = BTreeMap::new();
    let mut total_micros = 0i64;
    for e in entries {
        let (Some(start), Some(end), Some(sandbox_id)) =
            (e.period_start, e.period_end, e.sandbox_id)
        else {
            continue;
        };
        let ms = (end - start).num_milliseconds();
        let charged = -e.amount_micros;
        let running = e.description.starts_with("running");
        total_micros += charged;
        let s = sandboxes.entry(sandbox_id.clone()).or_insert(SandboxUsage {
            sandbox_id,
            running_ms: 0,
            stopped_ms: 0,
            charged_micros: 0,
        });
        s.charged_micros += charged;
        if running {
            s.running_ms += ms;
        } else {
            s.stopped_ms += ms;
        }
        let day = start.date_naive();
        let d = days.entry(day).or_insert(DayUsage {
            day,
            charged_micros: 0,
            running_ms: 0,
        });
        d.charged_micros += charged;
        if running {
            d.running_ms += ms;
        }
    }
    Ok(Json(UsageReport {
        from,
        to,
        total_micros,
        sandboxes: sandboxes.into_values().collect(),
        days: days.into_values().collect(),
    }))
}

// ---- admin routes -------------------------------------------------------------

#[utoipa::path(post, path = "/v1/admin/orgs/{id}/credits", params(("id" = String, Path)), request_body = CreditRequest,
    responses((status = 200, body = BillingView), (status = 404, body = crate::error::ErrorBody)), tag = "admin")]
pub async fn credit_org(
    _: AdminCaller,
    State(state): State<AppState>,
    Path(org_id): Path<String>,
    ApiJson(req): ApiJson<CreditRequest>,
) -> ApiResult<Json<BillingView>> {
    crate::rest::validate_display_name("reference", &req.reference)?;
    if req.amount_micros.abs() > MAX_CREDIT_MICROS {
        return Err(ApiError::bad_request(format!(
            "amount_micros must be at most {MAX_CREDIT_MICROS} in size"
        )));
    }
    if req.description.len() > 1024 {
        return Err(ApiError::bad_request(
            "description must be at most 1024 bytes",
        ));
    }
    let summary = state
        .control_plane
        .credit(
            &org_id,
            req.kind,
            req.amount_micros,
            &req.reference,
            &req.description,
        )
        .await?;
    Ok(Json(summary.into()))
}

#[utoipa::path(get, path = "/v1/admin/orgs/{id}/billing", params(("id" = String, Path)),
    responses((status = 200, body = BillingView), (status = 404, body = crate::error::ErrorBody)), tag = "admin")]
pub async fn get_org_billing(
    _: AdminCaller,
    State(state): State<AppState>,
    Path(org_id): Path<String>,
) -> ApiResult<Json<BillingView>> {
    if state
        .control_plane
        .store()
        .get_org(&org_id)
        .await?
        .is_none()
    {
        return Err(corral_actors::CorralError::NotFound("organisation").into());
    }
    Ok(Json(state.control_plane.billing(&org_id).await?.into()))
}

#[utoipa::path(put, path = "/v1/admin/orgs/{id}/billing", params(("id" = String, Path)), request_body = BillingSettingsRequest,
    responses((status = 200, body = BillingView), (status = 404, body = crate::error::ErrorBody)), tag = "admin")]
pub async fn set_org_billing(
    _: AdminCaller,
    State(state): State<AppState>,
    Path(org_id): Path<String>,
    ApiJson(req): ApiJson<BillingSettingsRequest>,
) -> ApiResult<Json<BillingView>> {
    Ok(Json(configure(&state, &org_id, req).await?.into()))
}

/// Applies billing settings (also used when an org is created).
pub async fn configure(
    state: &AppState,
    org_id: &str,
    req: BillingSettingsRequest,
) -> Result<LedgerSummary, ApiError> {
    let plan_id = match &req.plan {
        Some(name) => Some(
            state
                .control_plane
                .store()
                .find_plan_by_name(name)
                .await?
                .ok_or_else(|| ApiError::bad_request(format!("no plan named {name:?}")))?
                .id,
        ),
        None => None,
    };
    Ok(state
        .control_plane
        .configure_billing(
            org_id,
            BillingSettings {
                plan_id,
                exempt: req.exempt,
                quota: req.quota.map(Into::into),
            },
        )
        .await?)
}

#[utoipa::path(post, path = "/v1/admin/plans", request_body = CreatePlanRequest,
    responses((status = 201, body = PlanView), (status = 409, body = crate::error::ErrorBody)), tag = "admin")]
pub async fn create_plan(
    _: AdminCaller,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreatePlanRequest>,
) -> ApiResult<(StatusCode, Json<PlanView>)> {
    crate::rest::validate_display_name("name", &req.name)?;
    for (what, price) in [
        ("cpu_micros_per_vcpu_hour", req.cpu_micros_per_vcpu_hour),
        ("memory_micros_per_gib_hour", req.memory_micros_per_gib_hour),
        (
            "stopped_memory_micros_per_gib_hour",
            req.stopped_memory_micros_per_gib_hour,
        ),
    ] {
        if !(0..=MAX_CREDIT_MICROS).contains(&price) {
            return Err(ApiError::bad_request(format!(
                "{what} must be between 0 and {MAX_CREDIT_MICROS}"
            )));
        }
    }
    let plan = state
        .control_plane
        .store()
        .create_plan(store::price_plan::Model {
            id: new_id("plan"),
            name: req.name,
            cpu_micros_per_vcpu_hour: req.cpu_micros_per_vcpu_hour,
            memory_micros_per_gib_hour: req.memory_micros_per_gib_hour,
            stopped_memory_micros_per_gib_hour: req.stopped_memory_micros_per_gib_hour,
            created_at: Utc::now(),
        })
        .await?;
    Ok((StatusCode::CREATED, Json(plan_view(plan))))
}

#[utoipa::path(get, path = "/v1/admin/plans", responses((status = 200, body = PlanList)), tag = "admin")]
pub async fn list_plans(
    _: AdminCaller,
    State(state): State<AppState>,
) -> ApiResult<Json<PlanList>> {
    let plans = state.control_plane.store().list_plans().await?;
    Ok(Json(PlanList {
        plans: plans.into_iter().map(plan_view).collect(),
    }))
}

#[utoipa::path(get, path = "/v1/admin/billing/audit", responses((status = 200, body = AuditReport)), tag = "admin")]
pub async fn audit(_: AdminCaller, State(state): State<AppState>) -> ApiResult<Json<AuditReport>> {
    let orgs: Vec<AuditView> = state
        .control_plane
        .audit_ledgers()
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(AuditReport {
        ok: orgs.iter().all(|o| o.ok),
        orgs,
    }))
}
