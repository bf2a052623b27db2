//! Who is calling. An org API key (`Authorization: Bearer ck_...`) makes the
//! caller act for that key's organisation and nothing else; the platform
//! admin token opens the admin routes. Both are compared by hash.
//!
//! A verified API key is remembered for a few seconds ([`ApiKeyCache`]), so
//! a busy client does not cost a database round trip per request. Revoking
//! a key through the API empties the cache at once, so revocation is still
//! immediate within this process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use corral_actors::store::hash_secret;

use crate::error::ApiError;
use crate::AppState;

/// A caller authenticated by an org API key.
#[derive(Debug, Clone)]
pub struct OrgCaller {
    pub org_id: String,
    pub key_id: String,
}

/// A caller holding the platform admin token.
#[derive(Debug, Clone)]
pub struct AdminCaller;

/// API keys verified recently, by the hash of their secret.
#[derive(Debug)]
pub struct ApiKeyCache {
    entries: Mutex<HashMap<String, (OrgCaller, Instant)>>,
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

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, (OrgCaller, Instant)>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, hash: &str) -> Option<OrgCaller> {
        let entries = self.entries();
        let (caller, at) = entries.get(hash)?;
        (at.elapsed() < self.ttl).then(|| caller.clone())
    }

    fn put(&self, hash: String, caller: OrgCaller) {
        let mut entries = self.entries();
        if entries.len() >= MAX_CACHED_KEYS {
            entries.clear();
        }
        entries.insert(hash, (caller, Instant::now()));
    }

    /// Forgets every key: called when one is revoked.
    pub fn clear(&self) {
        self.entries().clear();
    }
}

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

impl FromRequestParts<AppState> for OrgCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(ApiError::unauthorized)?;
        let hash = hash_secret(token);
        if let Some(caller) = state.api_keys.get(&hash) {
            return Ok(caller);
        }
        let key = state
            .control_plane
            .store()
            .authenticate_api_key(token)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        let caller = OrgCaller {
            org_id: key.org_id,
            key_id: key.id,
        };
        state.api_keys.put(hash, caller.clone());
        Ok(caller)
    }
}

impl FromRequestParts<AppState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(ApiError::unauthorized)?;
        match &state.admin_token_hash {
            Some(expected) if *expected == hash_secret(token) => Ok(AdminCaller),
            _ => Err(ApiError::unauthorized()),
        }
    }
}
