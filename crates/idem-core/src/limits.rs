//! Named limits on everything a caller can send. Every bound is a field with a default;
//! the server's config can tighten or loosen them, and `validate_*` names the offending
//! field so the API can answer `INVALID_ARGUMENT` with it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const DAY_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest idempotency key, in bytes.
    pub max_key_bytes: usize,
    /// Largest scope, in bytes.
    pub max_scope_bytes: usize,
    /// Largest stored response (body plus header names and values), in bytes.
    pub max_response_bytes: usize,
    /// Most headers stored with one response.
    pub max_response_headers: usize,
    /// Shortest and longest lease a Reserve or Extend may ask for.
    pub min_lease_ms: u64,
    pub max_lease_ms: u64,
    /// Lease used when the caller sends 0.
    pub default_lease_ms: u64,
    /// Shortest and longest retention a Reserve may ask for.
    pub min_retention_ms: u64,
    pub max_retention_ms: u64,
    /// Retention used when the caller sends 0.
    pub default_retention_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 256,
            max_scope_bytes: 128,
            max_response_bytes: 1 << 20,
            max_response_headers: 64,
            min_lease_ms: 100,
            max_lease_ms: 60 * 60 * 1000,
            default_lease_ms: 30_000,
            min_retention_ms: 60 * 60 * 1000,
            max_retention_ms: 90 * DAY_MS,
            default_retention_ms: 30 * DAY_MS,
        }
    }
}

/// A caller-supplied value out of bounds. `field` is the API field name.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    pub field: &'static str,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ValidationError {
            field,
            reason: reason.into(),
        }
    }
}

impl Limits {
    /// Check the limits themselves (a config error names the key).
    pub fn check(&self) -> Result<(), ValidationError> {
        let bad = |f, r: &str| Err(ValidationError::new(f, r));
        if self.max_key_bytes == 0 {
            return bad("limits.max_key_bytes", "must be at least 1");
        }
        if self.min_lease_ms == 0 || self.min_lease_ms > self.max_lease_ms {
            return bad(
                "limits.min_lease_ms",
                "must be at least 1 and at most limits.max_lease_ms",
            );
        }
        if !(self.min_lease_ms..=self.max_lease_ms).contains(&self.default_lease_ms) {
            return bad(
                "limits.default_lease_ms",
                "must lie between limits.min_lease_ms and limits.max_lease_ms",
            );
        }
        if self.min_retention_ms == 0 || self.min_retention_ms > self.max_retention_ms {
            return bad(
                "limits.min_retention_ms",
                "must be at least 1 and at most limits.max_retention_ms",
            );
        }
        if !(self.min_retention_ms..=self.max_retention_ms).contains(&self.default_retention_ms) {
            return bad(
                "limits.default_retention_ms",
                "must lie between limits.min_retention_ms and limits.max_retention_ms",
            );
        }
        Ok(())
    }

    pub fn validate_key(&self, key: &[u8]) -> Result<(), ValidationError> {
        if key.is_empty() {
            return Err(ValidationError::new("key", "must not be empty"));
        }
        if key.len() > self.max_key_bytes {
            return Err(ValidationError::new(
                "key",
                format!(
                    "is {} bytes, the limit is {}",
                    key.len(),
                    self.max_key_bytes
                ),
            ));
        }
        Ok(())
    }

    pub fn validate_scope(&self, scope: &str) -> Result<(), ValidationError> {
        if scope.len() > self.max_scope_bytes {
            return Err(ValidationError::new(
                "scope",
                format!(
                    "is {} bytes, the limit is {}",
                    scope.len(),
                    self.max_scope_bytes
                ),
            ));
        }
        Ok(())
    }

    /// The lease to grant for a requested `lease_ms` (0 = default).
    pub fn lease(&self, field: &'static str, lease_ms: u64) -> Result<u64, ValidationError> {
        if lease_ms == 0 {
            return Ok(self.default_lease_ms);
        }
        if !(self.min_lease_ms..=self.max_lease_ms).contains(&lease_ms) {
            return Err(ValidationError::new(
                field,
                format!(
                    "{lease_ms} ms is outside [{}, {}] ms",
                    self.min_lease_ms, self.max_lease_ms
                ),
            ));
        }
        Ok(lease_ms)
    }

    /// The retention to store for a requested `retention_ms` (0 = default).
    pub fn retention(&self, retention_ms: u64) -> Result<u64, ValidationError> {
        if retention_ms == 0 {
            return Ok(self.default_retention_ms);
        }
        if !(self.min_retention_ms..=self.max_retention_ms).contains(&retention_ms) {
            return Err(ValidationError::new(
                "retention_ms",
                format!(
                    "{retention_ms} ms is outside [{}, {}] ms",
                    self.min_retention_ms, self.max_retention_ms
                ),
            ));
        }
        Ok(retention_ms)
    }

    pub fn validate_response(
        &self,
        response: &crate::StoredResponse,
    ) -> Result<(), ValidationError> {
        if response.headers.len() > self.max_response_headers {
            return Err(ValidationError::new(
                "response.headers",
                format!(
                    "{} headers, the limit is {}",
                    response.headers.len(),
                    self.max_response_headers
                ),
            ));
        }
        if response.headers.iter().any(|h| h.name.is_empty()) {
            return Err(ValidationError::new(
                "response.headers.name",
                "must not be empty",
            ));
        }
        let size = response.size();
        if size > self.max_response_bytes {
            return Err(ValidationError::new(
                "response",
                format!("is {size} bytes, the limit is {}", self.max_response_bytes),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_consistent() {
        Limits::default().check().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let l = Limits::default();
        assert_eq!(l.validate_key(b"").unwrap_err().field, "key");
        assert_eq!(l.validate_key(&[b'k'; 257]).unwrap_err().field, "key");
        assert!(l.validate_key(&[b'k'; 256]).is_ok());
        assert_eq!(
            l.validate_scope(&"s".repeat(129)).unwrap_err().field,
            "scope"
        );
        assert_eq!(l.lease("lease_ms", 5).unwrap_err().field, "lease_ms");
        assert_eq!(l.lease("lease_ms", 0).unwrap(), 30_000);
        assert_eq!(l.retention(1).unwrap_err().field, "retention_ms");
        let big = crate::StoredResponse {
            status: 200,
            headers: vec![],
            body: vec![0; (1 << 20) + 1],
        };
        assert_eq!(l.validate_response(&big).unwrap_err().field, "response");
    }
}
