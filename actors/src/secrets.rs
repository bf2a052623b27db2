//! Sandbox secrets at rest: the control plane's secret key and the sealing
//! of secret env values (ChaCha20-Poly1305, a random 96-bit nonce per value,
//! the sandbox id and env key as associated data so a sealed value cannot be
//! moved to another sandbox or key). Rows hold `{"KEY": "v1:<hex nonce+ct>"}`;
//! plaintext exists only in the create request and in the message to the
//! agent. Nothing here implements `Debug` that would show key or plaintext.

use std::collections::BTreeMap;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

use crate::domain::SecretEnv;
use crate::error::{CorralError, Result};

const VERSION: &str = "v1:";
const NONCE_LEN: usize = 12;
/// Key files hold the 32-byte key as 64 hex digits (whitespace around it is
/// ignored).
pub const KEY_HEX_LEN: usize = 64;

/// The 256-bit key that seals secret env values.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(***)")
    }
}

impl SecretKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)
            .map_err(|e| CorralError::Internal(format!("no randomness for a key: {e}")))?;
        Ok(Self(key))
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> std::result::Result<Self, String> {
        let text = text.trim();
        if text.len() != KEY_HEX_LEN {
            return Err(format!(
                "a secret key is {KEY_HEX_LEN} hex digits (32 bytes)"
            ));
        }
        let bytes = hex::decode(text).map_err(|_| "the secret key is not hex".to_string())?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "a secret key is 32 bytes".to_string())?;
        Ok(Self(key))
    }

    /// Reads a key file (64 hex digits).
    pub fn from_file(path: &Path) -> std::result::Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the secret key file {}: {e}", path.display()))?;
        Self::from_hex(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The key as a key file's contents.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Seals and opens secret env values with one key.
#[derive(Clone)]
pub struct SecretBox {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(***)")
    }
}

fn aad(sandbox_id: &str, key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(sandbox_id.len() + key.len() + 1);
    aad.extend_from_slice(sandbox_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(key.as_bytes());
    aad
}

impl SecretBox {
    pub fn new(key: &SecretKey) -> Self {
        Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key.0)),
        }
    }

    /// Seals one value of `sandbox_id`'s env `key`.
    pub fn seal(&self, sandbox_id: &str, key: &str, value: &str) -> Result<String> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|e| CorralError::Internal(format!("no randomness for a nonce: {e}")))?;
        let aad = aad(sandbox_id, key);
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| CorralError::Internal("sealing a secret failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!("{VERSION}{}", hex::encode(out)))
    }

    /// Opens a value [`Self::seal`] made for the same sandbox and key.
    pub fn open(&self, sandbox_id: &str, key: &str, sealed: &str) -> Result<String> {
        let broken = || CorralError::Internal(format!("secret env {key} cannot be decrypted"));
        let bytes = sealed
            .strip_prefix(VERSION)
            .and_then(|h| hex::decode(h).ok())
            .filter(|b| b.len() > NONCE_LEN)
            .ok_or_else(broken)?;
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let aad = aad(sandbox_id, key);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| broken())?;
        String::from_utf8(plain).map_err(|_| broken())
    }

    /// Seals every value: the JSON stored in the `secret_env` column.
    pub fn seal_env(&self, sandbox_id: &str, env: &SecretEnv) -> Result<serde_json::Value> {
        let mut out = serde_json::Map::new();
        for (k, v) in &env.0 {
            out.insert(
                k.clone(),
                serde_json::Value::String(self.seal(sandbox_id, k, v)?),
            );
        }
        Ok(serde_json::Value::Object(out))
    }

    /// Opens a `secret_env` column.
    pub fn open_env(
        &self,
        sandbox_id: &str,
        sealed: &serde_json::Value,
    ) -> Result<BTreeMap<String, String>> {
        let Some(map) = sealed.as_object() else {
            return Ok(BTreeMap::new());
        };
        map.iter()
            .map(|(k, v)| {
                let text = v.as_str().unwrap_or_default();
                Ok((k.clone(), self.open(sandbox_id, k, text)?))
            })
            .collect()
    }
}

/// The keys of a `secret_env` column, each with the value `***`: what views
/// show.
pub fn redacted(sealed: Option<&serde_json::Value>) -> BTreeMap<String, String> {
    sealed
        .and_then(serde_json::Value::as_object)
        .map(|m| m.keys().map(|k| (k.clone(), "***".to_string())).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_for_their_sandbox_and_key() {
        let key = SecretKey::generate().expect("key");
        let sb = SecretBox::new(&key);
        let env = SecretEnv(BTreeMap::from([(
            "TOKEN".to_string(),
            "hunter2".to_string(),
        )]));
        let sealed = sb.seal_env("sbx_1", &env).expect("seal");
        let text = sealed.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert_eq!(sb.open_env("sbx_1", &sealed).expect("open"), env.0);
        // Moved to another sandbox: refused.
        assert!(sb.open_env("sbx_2", &sealed).is_err());
        // Another key: refused.
        let other = SecretBox::new(&SecretKey::generate().expect("key"));
        assert!(other.open_env("sbx_1", &sealed).is_err());
        // Two seals of one value differ (fresh nonces).
        assert_ne!(
            sb.seal("sbx_1", "K", "v").expect("seal"),
            sb.seal("sbx_1", "K", "v").expect("seal")
        );
        assert_eq!(
            redacted(Some(&sealed)).get("TOKEN").map(String::as_str),
            Some("***")
        );
    }

    #[test]
    fn key_files_are_hex_and_never_printed() {
        let key = SecretKey::generate().expect("key");
        let back = SecretKey::from_hex(&format!(" {}\n", key.to_hex())).expect("parse");
        assert_eq!(back.0, key.0);
        assert!(SecretKey::from_hex("abcd").is_err());
        assert!(SecretKey::from_hex(&"zz".repeat(32)).is_err());
        assert_eq!(format!("{key:?}"), "SecretKey(***)");
    }
}
