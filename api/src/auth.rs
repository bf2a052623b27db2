//! Who is calling. An org API key (`Authorization: Bearer ck_...`) makes the
//! caller act for that key's organisation and nothing else; the platform
//! admin token opens the admin routes. Both are compared by hash.

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
        let key = state
            .control_plane
            .store()
            .authenticate_api_key(token)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        Ok(OrgCaller {
            org_id: key.org_id,
            key_id: key.id,
        })
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
