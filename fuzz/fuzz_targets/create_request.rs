//! Input validation: arbitrary bytes as the JSON body of a sandbox create
//! request, through the validators of `actors/src/domain.rs` (compiled in by
//! path with a stand-in for the crate's error type, so no database crates
//! are built). Validation must never panic, and whatever it accepts must
//! hold the properties the rest of the system relies on (no path escapes,
//! no NUL bytes, bounded sizes).

#![no_main]
#![allow(dead_code, unreachable_patterns)]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;

/// Stand-in for `corral_actors::error`: the validators only build
/// `InvalidArgument`.
mod error {
    #[derive(Debug)]
    pub enum CorralError {
        InvalidArgument(String),
    }
}

#[path = "../../actors/src/domain.rs"]
mod domain;

use domain::limits;

/// The create request's shape (api/src/rest.rs `CreateSandboxRequest`),
/// without placement fields the validators do not see.
#[derive(serde::Deserialize)]
struct CreateRequest {
    image: String,
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    name: Option<String>,
    workdir: Option<String>,
    cpu_millis: Option<u32>,
    memory_mb: Option<u64>,
    ttl_seconds: Option<u64>,
    #[serde(default)]
    secret_env: BTreeMap<String, String>,
    network: Option<String>,
    pids_limit: Option<u32>,
}

fn validate(req: &CreateRequest) -> Result<(), error::CorralError> {
    domain::validate_sandbox_fields(
        req.name.as_deref(),
        &req.image,
        &req.command,
        &req.env,
        &req.labels,
        req.workdir.as_deref(),
    )?;
    domain::validate_range(
        "cpu_millis",
        req.cpu_millis.unwrap_or(limits::DEFAULT_CPU_MILLIS),
        limits::MIN_CPU_MILLIS,
        limits::MAX_CPU_MILLIS,
    )?;
    domain::validate_range(
        "memory_mb",
        req.memory_mb.unwrap_or(limits::DEFAULT_MEMORY_MB),
        limits::MIN_MEMORY_MB,
        limits::MAX_MEMORY_MB,
    )?;
    if let Some(ttl) = req.ttl_seconds {
        domain::validate_range("ttl_seconds", ttl, 1, limits::MAX_TTL_SECONDS)?;
    }
    domain::validate_secret_env(&req.env, &req.secret_env)?;
    if let Some(network) = &req.network {
        if domain::Network::parse(network).is_none() {
            return Err(error::CorralError::InvalidArgument("network".into()));
        }
    }
    if let Some(p) = req.pids_limit {
        domain::validate_range(
            "pids_limit",
            p,
            limits::MIN_PIDS_LIMIT,
            limits::MAX_PIDS_LIMIT,
        )?;
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<CreateRequest>(data) else {
        return;
    };
    if validate(&req).is_err() {
        return;
    }
    // Accepted: the properties the agent and the store rely on.
    assert!(!req.image.contains('/') && !req.image.starts_with('.'));
    assert!(!req.command.is_empty() && !req.command[0].is_empty());
    assert!(req.command.iter().all(|a| !a.contains('\0')));
    if let Some(w) = &req.workdir {
        assert!(w.starts_with('/') && !w.split('/').any(|p| p == ".."));
    }
    for (k, v) in req.env.iter().chain(&req.secret_env) {
        assert!(!k.is_empty() && !k.contains('=') && !v.contains('\0'));
    }
    assert!(req.env.keys().all(|k| !req.secret_env.contains_key(k)));
    assert!(req.env.len() + req.secret_env.len() <= limits::MAX_ENV_ENTRIES);
    if let Some(name) = &req.name {
        assert!(name.len() <= 63 && !name.contains('/'));
    }
});
