//! Who is calling, and what they may do. An org API key (`Authorization:
//! Bearer ck_...`) makes the caller act for that key's organisation and
//! nothing else, within the key's role; the platform admin token opens the
//! admin routes. Both are compared by hash.
//!
//! Roles are enforced here, in one place: the [`OrgCaller`] extractor looks
//! the matched route up in [`permission_for`] and refuses the request with
//! 403 `forbidden` if the key's role does not grant it. A route missing from
//! that table is refused for every role (fail closed). Authenticated callers
//! are also rate-limited here, keyed on the key id (never on an address a
//! client could spoof: LESSONS 32).
//!
//! A verified API key is remembered for a few seconds ([`ApiKeyCache`]), so
//! a busy client does not cost a database round trip per request. Revoking
//! a key through the API empties the cache at once, and a cached key past
//! its expiry is refused, so both still take effect immediately.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, MatchedPath};
use axum::http::request::Parts;
use axum::http::Method;
use chrono::Utc;
use corral_actors::store::{api_key, hash_secret};

use crate::audit::AuditSlot;
use crate::error::ApiError;
use crate::AppState;

/// What an API key may do, from most to least powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Billing read only.
    Billing,
    /// Read only: sandboxes and billing.
    Viewer,
    /// Sandboxes read/write and exec, billing read.
    Developer,
    /// Everything in the org, keys and the audit log included.
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Self::Admin),
            "developer" => Some(Self::Developer),
            "viewer" => Some(Self::Viewer),
            "billing" => Some(Self::Billing),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Developer => "developer",
            Self::Viewer => "viewer",
            Self::Billing => "billing",
        }
    }

    pub fn allows(self, permission: Permission) -> bool {
        use Permission as P;
        match self {
            Self::Admin => true,
            Self::Developer => matches!(
                permission,
                P::SandboxRead | P::SandboxWrite | P::BillingRead
            ),
            Self::Viewer => matches!(permission, P::SandboxRead | P::BillingRead),
            Self::Billing => matches!(permission, P::BillingRead),
        }
    }

    /// Whether a key of this role may issue a key of `other`: only admins
    /// issue keys, and never above their own role.
    pub fn may_issue(self, other: Role) -> bool {
        self == Self::Admin && other <= self
    }
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    SandboxRead,
    SandboxWrite,
    BillingRead,
    /// Keys and the audit log.
    OrgAdmin,
}

impl Permission {
    fn describe(self) -> &'static str {
        match self {
            Self::SandboxRead => "reading sandboxes",
            Self::SandboxWrite => "changing sandboxes",
            Self::BillingRead => "reading billing",
            Self::OrgAdmin => "managing keys and reading the audit log",
        }
    }
}

/// The permission each org route needs, by method and route template.
/// `None`: not an org route; refused for every key.
pub fn permission_for(method: &Method, route: &str) -> Option<Permission> {
    use Permission as P;
    let read = method == Method::GET || method == Method::HEAD;
    Some(match route {
        "/v1/sandboxes" | "/v1/sandboxes/{id}" | "/v1/events" if read => P::SandboxRead,
        // The hosts the org's sandboxes may run on: every role may look.
        "/v1/hosts" | "/v1/hosts/{id}" | "/v1/placement" if read => P::SandboxRead,
        "/v1/sandboxes"
        | "/v1/sandboxes/{id}"
        | "/v1/sandboxes/{id}/start"
        | "/v1/sandboxes/{id}/stop"
        | "/v1/sandboxes/{id}/exec" => P::SandboxWrite,
        "/v1/billing" | "/v1/billing/ledger" | "/v1/usage" if read => P::BillingRead,
        "/v1/api-keys" | "/v1/api-keys/{id}" | "/v1/audit" => P::OrgAdmin,
        _ => return None,
    })
}

/// A caller authenticated by an org API key and allowed on this route.
#[derive(Debug, Clone)]
pub struct OrgCaller {
    pub org_id: String,
    pub key_id: String,
    pub role: Role,
}

/// A caller holding the platform admin token.
#[derive(Debug, Clone)]
pub struct AdminCaller;

/// API keys verified recently, by the hash of their secret.
#[derive(Debug)]
pub struct ApiKeyCache {
    entries: Mutex<HashMap<String, (api_key::Model, Instant)>>,
    ttl: Duration,
}

/// More entries than this and the cache starts over (a bound against a
/// flood of distinct valid keys, not a cost in practice).
const MAX_CACHED_KEYS: usize = 10_000;

impl Default for ApiKeyCache {
    fn default() -> Self {
        Self::new(Duration::from_secs(10))
    }
}

impl ApiKeyCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, (api_key::Model, Instant)>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, hash: &str) -> Option<api_key::Model> {
        let entries = self.entries();
        let (key, at) = entries.get(hash)?;
        (at.elapsed() < self.ttl).then(|| key.clone())
    }

    fn put(&self, hash: String, key: api_key::Model) {
        let mut entries = self.entries();
        if entries.len() >= MAX_CACHED_KEYS {
            entries.clear();
        }
        entries.insert(hash, (key, Instant::now()));
    }

    /// Forgets every key: called when one is revoked.
    pub fn clear(&self) {
        self.entries().clear();
    }
}

/// The audit log's name for the platform admin.
pub const PLATFORM_ADMIN: &str = "platform-admin";

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn forbidden(message: String) -> ApiError {
    ApiError::forbidden(message)
}

impl FromRequestParts<AppState> for OrgCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(ApiError::unauthorized)?;
        let store = state.control_plane.store();
        let hash = hash_secret(token);
        let key = match state.api_keys.get(&hash) {
            Some(key) if key.expires_at.is_none_or(|at| at > Utc::now()) => key,
            Some(_) => return Err(ApiError::unauthorized()),
            // Stamped only when the key is read from the database: a cached
            // key was stamped less than the cache's lifetime (10 s) ago,
            // well inside the stamp's one-minute resolution, so the hot path
            // writes nothing.
            None => {
                let key = store
                    .authenticate_api_key(token)
                    .await?
                    .ok_or_else(ApiError::unauthorized)?;
                if let Err(err) = store.touch_api_key(&key, Utc::now()).await {
                    // Bookkeeping only: the request goes on.
                    tracing::warn!(key.id = %key.id, error = %err, "could not stamp last_used_at");
                }
                state.api_keys.put(hash, key.clone());
                key
            }
        };
        if let Some(slot) = parts.extensions.get::<AuditSlot>() {
            slot.set(key.id.clone(), Some(key.org_id.clone()));
        }
        state.limits.check_rate(&key.id)?;
        // A stored role we do not know grants nothing.
        let role = Role::parse(&key.role)
            .ok_or_else(|| forbidden(format!("this key's role {:?} is unknown", key.role)))?;
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        let permission = permission_for(&parts.method, &route)
            .ok_or_else(|| forbidden("this route is not open to API keys".to_string()))?;
        if !role.allows(permission) {
            return Err(forbidden(format!(
                "a {} key may not do this ({} needs an admin{} key)",
                role.as_str(),
                permission.describe(),
                match permission {
                    Permission::SandboxWrite => " or developer",
                    Permission::SandboxRead => ", developer or viewer",
                    Permission::BillingRead => ", developer, viewer or billing",
                    Permission::OrgAdmin => "",
                }
            )));
        }
        Ok(OrgCaller {
            org_id: key.org_id,
            key_id: key.id,
            role,
        })
    }
}

impl FromRequestParts<AppState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(ApiError::unauthorized)?;
        match &state.admin_token_hash {
            Some(expected) if *expected == hash_secret(token) => {
                if let Some(slot) = parts.extensions.get::<AuditSlot>() {
                    slot.set(PLATFORM_ADMIN.to_string(), None);
                }
                state.limits.check_rate(PLATFORM_ADMIN)?;
                Ok(AdminCaller)
            }
            _ => Err(ApiError::unauthorized()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_what_the_reference_says() {
        use Permission as P;
        let all = [P::SandboxRead, P::SandboxWrite, P::BillingRead, P::OrgAdmin];
        let granted = |role: Role| all.into_iter().filter(|p| role.allows(*p)).count();
        assert_eq!(granted(Role::Admin), 4);
        assert!(Role::Developer.allows(P::SandboxWrite) && !Role::Developer.allows(P::OrgAdmin));
        assert!(Role::Viewer.allows(P::SandboxRead) && !Role::Viewer.allows(P::SandboxWrite));
        assert_eq!(granted(Role::Billing), 1);
        assert!(Role::Admin.may_issue(Role::Admin));
        assert!(!Role::Developer.may_issue(Role::Viewer));
    }

    #[test]
    fn unknown_routes_need_a_permission_no_role_has() {
        assert_eq!(permission_for(&Method::GET, "/v1/admin/orgs"), None);
        assert_eq!(
            permission_for(&Method::GET, "/v1/sandboxes/{id}"),
            Some(Permission::SandboxRead)
        );
        assert_eq!(
            permission_for(&Method::DELETE, "/v1/sandboxes/{id}"),
            Some(Permission::SandboxWrite)
        );
        assert_eq!(permission_for(&Method::POST, "/v1/billing"), None);
    }
}
