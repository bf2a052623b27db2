//! Queries for the security edge: key usage stamps and the audit log.

use chrono::{DateTime, Duration, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    Set,
};

use super::{api_key, audit_event, Store};
use crate::error::Result;

/// A mutating request, as the audit layer saw it.
#[derive(Debug, Clone)]
pub struct NewAuditEvent {
    pub org_id: Option<String>,
    pub actor: String,
    pub action: String,
    pub method: String,
    pub path: String,
    pub target_id: Option<String>,
    pub status: i32,
    pub source_addr: Option<String>,
    pub request_id: String,
}

/// One page of audit events.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this org's events (`None`: every org's, platform-admin only).
    pub org_id: Option<String>,
    /// Events with an id greater than this.
    pub after: Option<i64>,
    pub limit: u64,
}

/// `last_used_at` is written at most this often per key, so a busy key does
/// not cost a write per request.
pub const LAST_USED_RESOLUTION_SECS: i64 = 60;

impl Store {
    /// Stamps `last_used_at` if the stored stamp is older than the
    /// resolution. The condition is in SQL too, so concurrent requests
    /// rarely write twice.
    pub async fn touch_api_key(&self, key: &api_key::Model, now: DateTime<Utc>) -> Result<()> {
        let stale_before = now - Duration::seconds(LAST_USED_RESOLUTION_SECS);
        if key.last_used_at.is_some_and(|at| at > stale_before) {
            return Ok(());
        }
        api_key::Entity::update_many()
            .col_expr(api_key::Column::LastUsedAt, Expr::value(now))
            .filter(api_key::Column::Id.eq(key.id.as_str()))
            .filter(
                Condition::any()
                    .add(api_key::Column::LastUsedAt.is_null())
                    .add(api_key::Column::LastUsedAt.lt(stale_before)),
            )
            .exec(&self.writer)
            .await?;
        Ok(())
    }

    pub async fn record_audit(&self, event: NewAuditEvent) -> Result<()> {
        audit_event::ActiveModel {
            org_id: Set(event.org_id),
            actor: Set(event.actor),
            action: Set(event.action),
            method: Set(event.method),
            path: Set(event.path),
            target_id: Set(event.target_id),
            status: Set(event.status),
            source_addr: Set(event.source_addr),
            request_id: Set(event.request_id),
            created_at: Set(Utc::now()),
            ..Default::default()
        }
        .insert(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<audit_event::Model>> {
        let mut query = audit_event::Entity::find().order_by_asc(audit_event::Column::Id);
        if let Some(org_id) = &filter.org_id {
            query = query.filter(audit_event::Column::OrgId.eq(org_id.as_str()));
        }
        if let Some(after) = filter.after {
            query = query.filter(audit_event::Column::Id.gt(after));
        }
        Ok(query.limit(filter.limit).all(self.connection()).await?)
    }
}
