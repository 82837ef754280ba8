//! Tenants from bearer tokens. The token's SHA-256 is looked up in the configured map;
//! the token itself is never stored. With auth disabled every caller is `default`.

use crate::config::AuthConfig;
use idem_proto::errors::{status, ErrorReason};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use tonic::metadata::MetadataMap;
use tonic::Status;

pub const DEFAULT_TENANT: &str = "default";

#[derive(Clone, Debug)]
pub struct Auth {
    enabled: bool,
    by_hash: BTreeMap<[u8; 32], String>,
}

impl Auth {
    pub fn new(cfg: &AuthConfig) -> Auth {
        let by_hash = cfg
            .tokens
            .iter()
            .filter_map(|t| {
                let h: [u8; 32] = hex::decode(&t.sha256).ok()?.try_into().ok()?;
                Some((h, t.tenant.clone()))
            })
            .collect();
        Auth {
            enabled: cfg.enabled,
            by_hash,
        }
    }

    /// The caller's tenant, from `authorization: Bearer <token>`.
    pub fn tenant(&self, md: &MetadataMap) -> Result<String, Status> {
        if !self.enabled {
            return Ok(DEFAULT_TENANT.to_string());
        }
        let unauth = |msg: &str| status(ErrorReason::Unauthenticated, msg, &[], None);
        let header = md
            .get("authorization")
            .ok_or_else(|| unauth("missing authorization metadata (Bearer token)"))?
            .to_str()
            .map_err(|_| unauth("authorization metadata is not ASCII"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| unauth("authorization must be `Bearer <token>`"))?;
        let hash: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        self.by_hash
            .get(&hash)
            .cloned()
            .ok_or_else(|| unauth("unknown token"))
    }
}

/// The hex SHA-256 of a token, as the config stores it.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenConfig;

    #[test]
    fn tokens_map_to_tenants() {
        let auth = Auth::new(&AuthConfig {
            enabled: true,
            tokens: vec![TokenConfig {
                tenant: "acme".into(),
                sha256: token_hash("s3cret"),
            }],
        });
        let mut md = MetadataMap::new();
        assert_eq!(
            auth.tenant(&md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        md.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert_eq!(auth.tenant(&md).unwrap(), "acme");
        md.insert("authorization", "Bearer wrong".parse().unwrap());
        assert_eq!(
            auth.tenant(&md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let open = Auth::new(&AuthConfig::default());
        assert_eq!(open.tenant(&MetadataMap::new()).unwrap(), DEFAULT_TENANT);
    }
}
