//! Client commands: one call each, human output or one JSON object (`--json`) with the
//! result in an `outcome` field.

use crate::DEFAULT_ENDPOINT;
use anyhow::Context;
use clap::Args;
use idem_client::{
    Client, ClientConfig, Error, Fence, Fingerprint, Header, Lease, Reservation, ReserveRequest,
    StoredResponse,
};
use serde_json::{json, Value};
use std::process::ExitCode;

#[derive(Args, Clone)]
pub struct Common {
    /// Node to call (HOST:PORT).
    #[arg(long, default_value = DEFAULT_ENDPOINT, env = "IDEM_ENDPOINT")]
    pub endpoint: String,
    /// Bearer token (maps to the tenant).
    #[arg(long, env = "IDEM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Clone)]
pub struct KeyArgs {
    #[arg(long, default_value = "")]
    pub scope: String,
    #[arg(long)]
    pub key: String,
}

#[derive(Args)]
pub struct ReserveArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub k: KeyArgs,
    /// The request body; the fingerprint is computed from method, path and body.
    #[arg(long, conflicts_with = "fingerprint")]
    pub body: Option<String>,
    #[arg(long, default_value = "POST")]
    pub method: String,
    #[arg(long, default_value = "/")]
    pub path: String,
    /// The fingerprint itself, 64 hex digits.
    #[arg(long)]
    pub fingerprint: Option<String>,
    /// Lease in ms (0 = server default).
    #[arg(long, default_value_t = 0)]
    pub lease_ms: u64,
    /// Retention in ms (0 = server default, 30 days).
    #[arg(long, default_value_t = 0)]
    pub retention_ms: u64,
}

#[derive(Args)]
pub struct CompleteArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub k: KeyArgs,
    /// The fence NEW returned (GENERATION:CLAIM).
    #[arg(long)]
    pub fence: String,
    #[arg(long, default_value_t = 200)]
    pub status: u32,
    /// Response header, NAME=VALUE (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Response body.
    #[arg(long, default_value = "")]
    pub body: String,
    /// Response body read from a file, byte for byte (binary or large bodies).
    #[arg(long, conflicts_with = "body")]
    pub body_file: Option<std::path::PathBuf>,
}

#[derive(Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub k: KeyArgs,
    #[arg(long)]
    pub fence: String,
}

#[derive(Args)]
pub struct ExtendArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub k: KeyArgs,
    #[arg(long)]
    pub fence: String,
    #[arg(long, default_value_t = 0)]
    pub lease_ms: u64,
}

#[derive(Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub k: KeyArgs,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub common: Common,
}

async fn client(c: &Common) -> anyhow::Result<Client> {
    let mut cfg = ClientConfig::new(c.endpoint.clone());
    cfg.token = c.token.clone();
    Ok(Client::connect(cfg).await?)
}

fn emit(json_mode: bool, value: Value, human: String) {
    if json_mode {
        println!("{value}");
    } else {
        println!("{human}");
    }
}

/// Print an error as the chosen format and return the exit code.
fn fail(json_mode: bool, e: &Error) -> ExitCode {
    let (reason, field) = match e {
        Error::InvalidArgument { field, .. } => ("INVALID_ARGUMENT", Some(field.clone())),
        Error::LeaseLost(_) => ("LEASE_LOST", None),
        Error::KeyTooOld(_) => ("KEY_TOO_OLD", None),
        Error::AlreadyCompleted => ("ALREADY_COMPLETED", None),
        Error::NotFound(_) => ("NOT_FOUND", None),
        Error::Unauthenticated(_) => ("UNAUTHENTICATED", None),
        Error::Unavailable { .. } | Error::Connect(_) => ("UNAVAILABLE", None),
        Error::Server(_) => ("INTERNAL", None),
    };
    emit(
        json_mode,
        json!({"outcome": "error", "reason": reason, "field": field, "message": e.to_string()}),
        format!("ERROR {reason}: {e}"),
    );
    ExitCode::from(1)
}

fn body_text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Bodies up to this size that are UTF-8 are shown as text; others by size and digest.
const SHOWN_BODY_BYTES: usize = 1024;

fn body_sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// The body as a terminal line shows it: the text itself when short and UTF-8, its size
/// and SHA-256 otherwise (compare with `sha256sum` of the file it was completed with).
fn body_line(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(t) if b.len() <= SHOWN_BODY_BYTES => format!("{t:?}"),
        _ => format!("<{} bytes, sha256 {}>", b.len(), body_sha256(b)),
    }
}

pub fn response_json(r: &StoredResponse) -> Value {
    json!({
        "status": r.status,
        "headers": r.headers.iter().map(|h| json!({"name": h.name, "value": body_text(&h.value)})).collect::<Vec<_>>(),
        "body": body_text(&r.body),
        "body_bytes": r.body.len(),
        "body_sha256": body_sha256(&r.body),
    })
}

pub fn describe(res: &Reservation) -> (Value, String) {
    match res {
        Reservation::New(l) => (
            json!({"outcome": "new", "fence": l.fence.to_string(), "generation": l.fence.generation, "lease_expires_ms": l.expires_at_ms, "takeover": l.took_over.is_some(), "previous_fence": l.took_over.map(|f| f.to_string())}),
            format!(
                "NEW fence={} lease_expires_ms={}{}",
                l.fence,
                l.expires_at_ms,
                l.took_over
                    .map(|f| format!(" (took over from {f} after its lease expired)"))
                    .unwrap_or_default()
            ),
        ),
        Reservation::InFlight { retry_after } => (
            json!({"outcome": "in_flight", "retry_after_ms": retry_after.as_millis() as u64}),
            format!(
                "IN_FLIGHT another attempt holds the key; retry after {} ms",
                retry_after.as_millis()
            ),
        ),
        Reservation::Replay(r) => (
            json!({"outcome": "replay", "response": response_json(r)}),
            format!("REPLAY status={} body={}", r.status, body_line(&r.body)),
        ),
        Reservation::Mismatch { stored_fingerprint } => (
            json!({"outcome": "mismatch", "stored_fingerprint": hex::encode(stored_fingerprint)}),
            "MISMATCH the key was used with a different request".to_string(),
        ),
    }
}

fn parse_fence(s: &str) -> anyhow::Result<Fence> {
    s.parse::<Fence>()
        .map_err(|e| anyhow::anyhow!("--fence: {e}"))
}

fn lease_for(k: &KeyArgs, fence: Fence) -> Lease {
    Lease::from_fence(k.scope.clone(), k.key.as_bytes().to_vec(), fence)
}

pub async fn reserve(a: ReserveArgs) -> anyhow::Result<ExitCode> {
    let fp = match (&a.fingerprint, &a.body) {
        (Some(h), _) => Fingerprint::from_hex(h).context("--fingerprint must be 64 hex digits")?,
        (None, Some(b)) => Fingerprint::of_request(&a.method, &a.path, b.as_bytes()),
        (None, None) => anyhow::bail!("give the request as --body TEXT or --fingerprint HEX"),
    };
    let c = client(&a.common).await?;
    let mut req = ReserveRequest::new(a.k.scope.clone(), a.k.key.as_bytes().to_vec(), fp);
    req.lease_ms = a.lease_ms;
    req.retention_ms = a.retention_ms;
    match c.reserve(&req).await {
        Ok(res) => {
            let (v, h) = describe(&res);
            emit(a.common.json, v, h);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(fail(a.common.json, &e)),
    }
}

pub async fn complete(a: CompleteArgs) -> anyhow::Result<ExitCode> {
    let fence = parse_fence(&a.fence)?;
    let mut headers = Vec::new();
    for h in &a.headers {
        let (n, v) = h
            .split_once('=')
            .with_context(|| format!("--header {h:?} is not NAME=VALUE"))?;
        headers.push(Header {
            name: n.to_string(),
            value: v.as_bytes().to_vec(),
        });
    }
    let body = match &a.body_file {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("--body-file {}: cannot read it", path.display()))?,
        None => a.body.into_bytes(),
    };
    let resp = StoredResponse {
        status: a.status,
        headers,
        body,
    };
    let c = client(&a.common).await?;
    match c.complete(&lease_for(&a.k, fence), &resp).await {
        Ok(()) => {
            emit(
                a.common.json,
                json!({"outcome": "completed", "fence": fence.to_string()}),
                format!("COMPLETED fence={fence}"),
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(fail(a.common.json, &e)),
    }
}

pub async fn release(a: ReleaseArgs) -> anyhow::Result<ExitCode> {
    let fence = parse_fence(&a.fence)?;
    let c = client(&a.common).await?;
    match c.release(&lease_for(&a.k, fence)).await {
        Ok(()) => {
            emit(
                a.common.json,
                json!({"outcome": "released", "fence": fence.to_string()}),
                format!("RELEASED fence={fence}"),
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(fail(a.common.json, &e)),
    }
}

pub async fn extend(a: ExtendArgs) -> anyhow::Result<ExitCode> {
    let fence = parse_fence(&a.fence)?;
    let c = client(&a.common).await?;
    let mut lease = lease_for(&a.k, fence);
    match c.extend(&mut lease, a.lease_ms).await {
        Ok(()) => {
            emit(
                a.common.json,
                json!({"outcome": "extended", "lease_expires_ms": lease.expires_at_ms}),
                format!("EXTENDED lease_expires_ms={}", lease.expires_at_ms),
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(fail(a.common.json, &e)),
    }
}

pub async fn get(a: GetArgs) -> anyhow::Result<ExitCode> {
    let c = client(&a.common).await?;
    match c.get(&a.k.scope, a.k.key.as_bytes()).await {
        Ok(r) => {
            let phase = match r.phase {
                1 => "reserved",
                2 => "released",
                3 => "completed",
                _ => "unknown",
            };
            let fence = idem_proto::convert::fence(r.fence.as_ref())
                .map(|f| f.to_string())
                .unwrap_or_default();
            let resp = r
                .response
                .as_ref()
                .map(|x| response_json(&idem_proto::convert::from_wire_response(x)));
            emit(
                a.common.json,
                json!({"outcome": "found", "phase": phase, "fence": fence, "fingerprint": hex::encode(&r.fingerprint), "lease_expires_ms": r.lease_expires_ms, "created_ms": r.created_ms, "expires_ms": r.expires_ms, "attempts": r.attempts, "final": r.r#final, "response": resp}),
                format!(
                    "{} fence={} attempts={} expires_ms={}{}",
                    phase.to_uppercase(),
                    fence,
                    r.attempts,
                    r.expires_ms,
                    resp.map(|v| format!(" response={v}")).unwrap_or_default()
                ),
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(fail(a.common.json, &e)),
    }
}

pub async fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let endpoint = format!("http://{}", a.common.endpoint);
    let mut admin = idem_proto::internal::admin_client::AdminClient::connect(endpoint.clone())
        .await
        .with_context(|| format!("cannot reach {}", a.common.endpoint))?;
    let s = admin
        .status(idem_proto::internal::StatusRequest {})
        .await?
        .into_inner();
    let groups: Vec<Value> = s
        .groups
        .iter()
        .map(|g| json!({"group": g.group.as_ref().map(|x| format!("r{}/s{}", x.region, x.shard)), "state": g.state, "term": g.term, "leader": g.has_leader.then_some(g.leader), "last_log_index": g.last_log_index, "applied_index": g.applied_index, "voters": g.voters}))
        .collect();
    let mut human = format!(
        "node {} region {} ({}) grpc {} http http://{} version {}\nrecords ~{} state {} B log {} B\n",
        s.node_id, s.region_name, s.region, s.grpc_addr, s.http_addr, s.version, s.records, s.state_disk_bytes, s.log_disk_bytes
    );
    for g in &s.groups {
        let id = g
            .group
            .as_ref()
            .map(|x| format!("r{}/s{}", x.region, x.shard))
            .unwrap_or_default();
        human.push_str(&format!(
            "  group {id}: {} term {} leader {} log {} applied {} voters {:?}\n",
            g.state,
            g.term,
            if g.has_leader {
                g.leader.to_string()
            } else {
                "none".into()
            },
            g.last_log_index,
            g.applied_index,
            g.voters
        ));
    }
    emit(
        a.common.json,
        json!({"outcome": "ok", "node_id": s.node_id, "region": s.region_name, "grpc_addr": s.grpc_addr, "http_addr": s.http_addr, "records": s.records, "groups": groups}),
        human.trim_end().to_string(),
    );
    Ok(ExitCode::SUCCESS)
}
