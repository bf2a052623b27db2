//! The agent <-> control plane protocol (`corral.agent.v1`), generated from
//! `proto/corral/agent/v1/agent.proto`. See `docs/protocol.md`.

#[allow(clippy::all, missing_docs)]
pub mod agent {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/corral.agent.v1.rs"));
    }
}

pub use agent::v1 as pb;

/// The protocol version this build speaks; sent by the agent as part of its
/// user agent and checked by nothing yet.
pub const PROTOCOL_VERSION: &str = "corral.agent.v1";

/// Env values redacted: a `CreateSandbox` may hold secrets, and messages are
/// logged with `{:?}`.
impl std::fmt::Debug for pb::CreateSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn keys(m: &std::collections::HashMap<String, String>) -> Vec<&str> {
            let mut keys: Vec<&str> = m.keys().map(String::as_str).collect();
            keys.sort_unstable();
            keys
        }
        f.debug_struct("CreateSandbox")
            .field("sandbox_id", &self.sandbox_id)
            .field("image", &self.image)
            .field("command", &self.command)
            .field("env_keys", &keys(&self.env))
            .field("secret_env_keys", &keys(&self.secret_env))
            .field("workdir", &self.workdir)
            .field("cpu_millis", &self.cpu_millis)
            .field("memory_mb", &self.memory_mb)
            .field("labels", &self.labels)
            .field("hostname", &self.hostname)
            .field("expires_at_unix_ms", &self.expires_at_unix_ms)
            .field("network", &self.network)
            .field("read_only_root", &self.read_only_root)
            .field("pids_limit", &self.pids_limit)
            .field("user_namespace", &self.user_namespace)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::pb;

    #[test]
    fn create_sandbox_debug_shows_no_env_values() {
        let msg = pb::CreateSandbox {
            sandbox_id: "sbx_1".into(),
            env: [("PLAIN".to_string(), "visible-value".to_string())].into(),
            secret_env: [("TOKEN".to_string(), "hunter2".to_string())].into(),
            ..Default::default()
        };
        let wrapped = pb::ControlMessage {
            payload: Some(pb::control_message::Payload::Create(msg)),
            ..Default::default()
        };
        let text = format!("{wrapped:?}");
        assert!(text.contains("TOKEN") && text.contains("PLAIN"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("visible-value"), "{text}");
    }
}
