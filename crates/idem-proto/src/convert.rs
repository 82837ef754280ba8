//! Validating conversions between wire messages and domain values.

use crate::v1;
use idem_core::{
    ClaimId, Fence, Fingerprint, Header, Limits, Phase, Record, StoredResponse, ValidationError,
};

/// A validated Reserve: every bound checked, defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reserve {
    pub scope: String,
    pub key: Vec<u8>,
    pub fingerprint: Fingerprint,
    pub lease_ms: u64,
    pub retention_ms: u64,
    pub first_attempt_ms: u64,
    pub client_attempt: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Complete {
    pub scope: String,
    pub key: Vec<u8>,
    pub fence: Fence,
    pub response: StoredResponse,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    pub scope: String,
    pub key: Vec<u8>,
    pub fence: Fence,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extend {
    pub scope: String,
    pub key: Vec<u8>,
    pub fence: Fence,
    pub lease_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Get {
    pub scope: String,
    pub key: Vec<u8>,
}

fn scope_and_key(
    limits: &Limits,
    scope: &str,
    key: &[u8],
) -> Result<(String, Vec<u8>), ValidationError> {
    limits.validate_scope(scope)?;
    limits.validate_key(key)?;
    Ok((scope.to_owned(), key.to_vec()))
}

pub fn reserve(r: &v1::ReserveRequest, limits: &Limits) -> Result<Reserve, ValidationError> {
    let (scope, key) = scope_and_key(limits, &r.scope, &r.key)?;
    let fingerprint = Fingerprint::from_slice(&r.fingerprint).ok_or_else(|| {
        ValidationError::new(
            "fingerprint",
            format!("must be 32 bytes, got {}", r.fingerprint.len()),
        )
    })?;
    Ok(Reserve {
        scope,
        key,
        fingerprint,
        lease_ms: limits.lease("lease_ms", r.lease_ms)?,
        retention_ms: limits.retention(r.retention_ms)?,
        first_attempt_ms: r.first_attempt_ms,
        client_attempt: r.attempt,
    })
}

pub fn fence(f: Option<&v1::Fence>) -> Result<Fence, ValidationError> {
    let f = f.ok_or_else(|| ValidationError::new("fence", "is required"))?;
    let c = f
        .claim
        .as_ref()
        .ok_or_else(|| ValidationError::new("fence.claim", "is required"))?;
    let narrow = |v: u32, field| {
        u16::try_from(v).map_err(|_| ValidationError::new(field, "does not fit in 16 bits"))
    };
    if f.generation == 0 {
        return Err(ValidationError::new(
            "fence.generation",
            "must be at least 1",
        ));
    }
    Ok(Fence {
        generation: f.generation,
        claim: ClaimId {
            hlc: c.hlc,
            region: narrow(c.region, "fence.claim.region")?,
            node: narrow(c.node, "fence.claim.node")?,
            nonce: c.nonce,
        },
    })
}

pub fn response(
    r: Option<&v1::StoredResponse>,
    limits: &Limits,
) -> Result<StoredResponse, ValidationError> {
    let r = r.ok_or_else(|| ValidationError::new("response", "is required"))?;
    let out = from_wire_response(r);
    limits.validate_response(&out)?;
    Ok(out)
}

pub fn complete(r: &v1::CompleteRequest, limits: &Limits) -> Result<Complete, ValidationError> {
    let (scope, key) = scope_and_key(limits, &r.scope, &r.key)?;
    Ok(Complete {
        scope,
        key,
        fence: fence(r.fence.as_ref())?,
        response: response(r.response.as_ref(), limits)?,
    })
}

pub fn release(r: &v1::ReleaseRequest, limits: &Limits) -> Result<Release, ValidationError> {
    let (scope, key) = scope_and_key(limits, &r.scope, &r.key)?;
    Ok(Release {
        scope,
        key,
        fence: fence(r.fence.as_ref())?,
    })
}

pub fn extend(r: &v1::ExtendRequest, limits: &Limits) -> Result<Extend, ValidationError> {
    let (scope, key) = scope_and_key(limits, &r.scope, &r.key)?;
    Ok(Extend {
        scope,
        key,
        fence: fence(r.fence.as_ref())?,
        lease_ms: limits.lease("lease_ms", r.lease_ms)?,
    })
}

pub fn get(r: &v1::GetRequest, limits: &Limits) -> Result<Get, ValidationError> {
    let (scope, key) = scope_and_key(limits, &r.scope, &r.key)?;
    Ok(Get { scope, key })
}

pub fn to_wire_fence(f: &Fence) -> v1::Fence {
    v1::Fence {
        generation: f.generation,
        claim: Some(v1::ClaimId {
            hlc: f.claim.hlc,
            region: f.claim.region.into(),
            node: f.claim.node.into(),
            nonce: f.claim.nonce,
        }),
    }
}

pub fn to_wire_response(r: &StoredResponse) -> v1::StoredResponse {
    v1::StoredResponse {
        status: r.status,
        headers: r
            .headers
            .iter()
            .map(|h| v1::Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect(),
        body: r.body.clone(),
    }
}

/// The reverse of `to_wire_response`, for clients (no limits: the server enforced them).
pub fn from_wire_response(r: &v1::StoredResponse) -> StoredResponse {
    StoredResponse {
        status: r.status,
        headers: r
            .headers
            .iter()
            .map(|h| Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect(),
        body: r.body.clone(),
    }
}

pub fn to_wire_record(r: &Record) -> v1::GetResponse {
    v1::GetResponse {
        phase: match r.phase {
            Phase::Reserved => v1::Phase::Reserved,
            Phase::Released => v1::Phase::Released,
            Phase::Completed => v1::Phase::Completed,
        } as i32,
        fence: Some(to_wire_fence(&r.fence())),
        fingerprint: r.fingerprint.0.to_vec(),
        lease_expires_ms: r.lease_expires_ms,
        created_ms: r.created_ms,
        expires_ms: r.expires_ms,
        attempts: r.attempts,
        r#final: r.is_final,
        response: r.response.as_ref().map(to_wire_response),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> v1::ReserveRequest {
        v1::ReserveRequest {
            scope: "payments".into(),
            key: b"order-1".to_vec(),
            fingerprint: vec![1; 32],
            ..Default::default()
        }
    }

    #[test]
    fn reserve_fills_defaults_and_names_bad_fields() {
        let l = Limits::default();
        let r = reserve(&req(), &l).unwrap();
        assert_eq!(r.lease_ms, l.default_lease_ms);
        assert_eq!(r.retention_ms, l.default_retention_ms);

        let mut bad = req();
        bad.fingerprint = vec![1; 31];
        assert_eq!(reserve(&bad, &l).unwrap_err().field, "fingerprint");
        let mut bad = req();
        bad.key.clear();
        assert_eq!(reserve(&bad, &l).unwrap_err().field, "key");
        let mut bad = req();
        bad.lease_ms = l.max_lease_ms + 1;
        assert_eq!(reserve(&bad, &l).unwrap_err().field, "lease_ms");
    }

    #[test]
    fn fence_round_trip_and_errors() {
        let f = Fence {
            generation: 3,
            claim: ClaimId {
                hlc: 9,
                region: 1,
                node: 2,
                nonce: 7,
            },
        };
        assert_eq!(fence(Some(&to_wire_fence(&f))).unwrap(), f);
        assert_eq!(fence(None).unwrap_err().field, "fence");
        let mut w = to_wire_fence(&f);
        w.claim.as_mut().unwrap().node = 70_000;
        assert_eq!(fence(Some(&w)).unwrap_err().field, "fence.claim.node");
    }
}
