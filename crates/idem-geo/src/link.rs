//! The connection to one other region: its nodes' addresses, the one that answered
//! last, a bound on calls in flight, and (for `idem demo` only) an emulated round trip.
//!
//! Every call has a deadline. A node that does not answer is skipped for the next one
//! of the same region; a call never waits longer than its deadline in total.

use crate::wire::{ApplyRequest, ApplyResponse, Call};
use idem_core::CommandResult;
use idem_proto::internal::geo_client::GeoClient;
use idem_proto::internal::GeoMessage;
use idem_raft::codec::{decode, encode};
use idem_raft::{Channels, GroupError, Stamper};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Most calls in one `Apply` batch.
const MAX_BATCH: usize = 256;
/// Batches in flight to one region at once.
const BATCHES_IN_FLIGHT: usize = 16;

/// The answer to one batched call.
pub type ApplyReply = Result<Answer, LinkError>;

#[derive(Debug)]
pub struct Answer {
    /// The answering node's hybrid logical clock, and the node (0: unknown).
    pub hlc: u64,
    pub node: u64,
    pub result: Result<CommandResult, GroupError>,
}

struct PendingCall {
    hlc: u64,
    call: Call,
    reply: oneshot::Sender<ApplyReply>,
}

#[derive(Debug, Error, Clone)]
pub enum LinkError {
    #[error("region {region} did not answer within {timeout:?}")]
    Timeout { region: u16, timeout: Duration },
    #[error("region {region} is unreachable: {detail}")]
    Unreachable { region: u16, detail: String },
    #[error("region {region} refused the call: {detail}")]
    Refused { region: u16, detail: String },
    #[error("too many calls in flight to region {0}")]
    Busy(u16),
}

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Apply,
    Merge,
    Digest,
    Fetch,
}

pub struct RegionLink {
    pub region: u16,
    pub name: String,
    addrs: Vec<String>,
    preferred: AtomicUsize,
    channels: Channels,
    in_flight: Arc<Semaphore>,
    /// Emulated round trip (demo only): half before the call, half after.
    emulated_rtt: Duration,
    my_region: u16,
    /// Calls waiting for the batcher (bounded: a full queue refuses new calls).
    queue: mpsc::Sender<PendingCall>,
    /// This node's clocks: every exchange measures the peer's offset.
    stamper: Arc<Stamper>,
    /// When a node of the region last answered (any call, a clock probe included), and
    /// when the link was made.
    last_answer: std::sync::Mutex<Option<Instant>>,
    created: Instant,
}

impl RegionLink {
    /// A link, with its batcher running on the current tokio runtime.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        my_region: u16,
        region: u16,
        name: String,
        addrs: Vec<String>,
        channels: Channels,
        max_in_flight: usize,
        emulated_rtt: Duration,
        timeout: Duration,
        max_response_bytes: usize,
        stamper: Arc<Stamper>,
    ) -> Arc<RegionLink> {
        let (queue, rx) = mpsc::channel(max_in_flight.max(1));
        let link = Arc::new(RegionLink {
            region,
            name,
            addrs,
            preferred: AtomicUsize::new(0),
            channels,
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
            emulated_rtt,
            my_region,
            queue,
            stamper,
            last_answer: std::sync::Mutex::new(None),
            created: Instant::now(),
        });
        tokio::spawn(batcher(
            Arc::downgrade(&link),
            rx,
            timeout,
            max_response_bytes,
        ));
        link
    }

    /// Run one command on the region's group, batched with the other calls waiting
    /// for this region: calls that arrive while earlier batches are on the wire leave
    /// together in the next `Apply`, with no added wait.
    pub async fn apply(&self, hlc: u64, call: Call) -> ApplyReply {
        let (tx, rx) = oneshot::channel();
        self.queue
            .try_send(PendingCall {
                hlc,
                call,
                reply: tx,
            })
            .map_err(|_| LinkError::Busy(self.region))?;
        rx.await.map_err(|_| LinkError::Unreachable {
            region: self.region,
            detail: "the batch was dropped".into(),
        })?
    }

    /// How long since a node of the region last answered (since the link was made, if
    /// none ever did): the region's replication health as this node sees it.
    pub fn since_last_answer(&self) -> Duration {
        let last = *self.last_answer.lock().unwrap_or_else(|p| p.into_inner());
        last.unwrap_or(self.created).elapsed()
    }

    /// Send an `Apply` and measure the answering node's clock offset from ours.
    async fn apply_measured(
        &self,
        req: &ApplyRequest,
        timeout: Duration,
    ) -> Result<ApplyResponse, LinkError> {
        let sent = self.stamper.now_ms();
        let bytes = self.call(Kind::Apply, encode(req), timeout).await?;
        let received = self.stamper.now_ms();
        let resp = decode::<ApplyResponse>(&bytes).map_err(|e| LinkError::Refused {
            region: self.region,
            detail: e.to_string(),
        })?;
        if resp.node != 0 && resp.clock_ms != 0 {
            self.stamper
                .record_peer_clock(resp.node, resp.clock_ms, sent, received);
        }
        Ok(resp)
    }

    /// An `Apply` with no calls to every node of the region: only the clocks are
    /// exchanged, so that each peer node's offset is known without traffic (the geo
    /// layer probes every link this way once a second). The answers' HLCs are not
    /// adopted (nothing they order), so a probe works whichever side's clock is off.
    pub async fn probe_clocks(&self, timeout: Duration) {
        let from_node = self.stamper.identity().node_id;
        futures::future::join_all(self.addrs.iter().map(|addr| async move {
            let (hlc, _) = self.stamper.mint();
            let req = ApplyRequest {
                hlc: idem_core::Hlc::compose(hlc, 0),
                calls: Vec::new(),
                from_node,
            };
            let sent = self.stamper.now_ms();
            let bytes = match self
                .call_node(addr, Kind::Apply, encode(&req), timeout)
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(addr, error = %e, "clock probe failed");
                    return;
                }
            };
            let received = self.stamper.now_ms();
            if let Ok(resp) = decode::<ApplyResponse>(&bytes) {
                if resp.node != 0 && resp.clock_ms != 0 {
                    self.stamper
                        .record_peer_clock(resp.node, resp.clock_ms, sent, received);
                }
            }
        }))
        .await;
    }

    /// Send one message and wait for the answer, trying the region's nodes in turn.
    pub async fn call(
        &self,
        kind: Kind,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, LinkError> {
        let _permit = self
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| LinkError::Busy(self.region))?;
        let deadline = Instant::now() + timeout;
        let half = self.emulated_rtt / 2;
        if !half.is_zero() {
            tokio::time::sleep(half).await;
        }
        let n = self.addrs.len().max(1);
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = LinkError::Unreachable {
            region: self.region,
            detail: "no node address configured".into(),
        };
        for i in 0..n {
            let idx = (start + i) % n;
            let Some(addr) = self.addrs.get(idx) else {
                break;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LinkError::Timeout {
                    region: self.region,
                    timeout,
                });
            }
            // Give the first node most of the time, but leave some for another.
            let budget = if i + 1 < n { left.mul_f64(0.6) } else { left };
            match self.call_node(addr, kind, payload.clone(), budget).await {
                Ok(bytes) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    if !half.is_zero() {
                        tokio::time::sleep(half).await;
                    }
                    return Ok(bytes);
                }
                Err(e @ LinkError::Refused { .. }) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn call_node(
        &self,
        addr: &str,
        kind: Kind,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, LinkError> {
        let ch = self
            .channels
            .get(addr)
            .map_err(|e| LinkError::Unreachable {
                region: self.region,
                detail: e.to_string(),
            })?;
        let mut client = GeoClient::new(ch)
            .max_decoding_message_size(idem_raft::MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(idem_raft::MAX_PEER_MESSAGE_BYTES);
        let mut req = tonic::Request::new(GeoMessage {
            from_region: self.my_region.into(),
            payload,
        });
        req.set_timeout(timeout);
        let fut = async {
            match kind {
                Kind::Apply => client.apply(req).await,
                Kind::Merge => client.merge(req).await,
                Kind::Digest => client.digest(req).await,
                Kind::Fetch => client.fetch(req).await,
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(LinkError::Timeout {
                region: self.region,
                timeout,
            }),
            Ok(Ok(resp)) => {
                // The first answer from this region is recorded durably before it is
                // used (once per region): a region that later loses every node's data
                // is then known to have taken part (`idem_raft::incarnations`).
                if let Some(inc) = self.channels.incarnations() {
                    inc.region_answered(self.region)
                        .map_err(|e| LinkError::Unreachable {
                            region: self.region,
                            detail: format!("cannot record the region's first answer: {e}"),
                        })?;
                }
                *self.last_answer.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                Ok(resp.into_inner().payload)
            }
            Ok(Err(st)) => Err(match st.code() {
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => LinkError::Timeout {
                    region: self.region,
                    timeout,
                },
                tonic::Code::InvalidArgument | tonic::Code::Unimplemented => LinkError::Refused {
                    region: self.region,
                    detail: st.message().to_owned(),
                },
                _ => LinkError::Unreachable {
                    region: self.region,
                    detail: format!("{addr}: {}", st.message()),
                },
            }),
        }
    }
}

/// Drain the queue into batches, at most `BATCHES_IN_FLIGHT` on the wire at once.
async fn batcher(
    link: Weak<RegionLink>,
    rx: mpsc::Receiver<PendingCall>,
    timeout: Duration,
    max_response_bytes: usize,
) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    let mut rx = idem_raft::batch::Batcher::new(rx);
    let bounds = idem_raft::batch::Bounds {
        max_items: MAX_BATCH,
        max_bytes: idem_raft::MAX_BATCH_BYTES,
        size: |p: &PendingCall| {
            p.call.key.approx_bytes() + p.call.op.round_trip_bytes(max_response_bytes)
        },
    };
    while let Some((slot, mut batch)) = rx.next_batch(&slots, &bounds).await {
        let Some(link) = link.upgrade() else {
            return;
        };
        // A proposal whose caller is gone was withdrawn (or answered): its Propose must
        // not reach the region after the withdraw, where it would hold the key for
        // nobody. Other ops still go (a Complete beyond the majority adds a witness).
        batch.retain(|p| {
            !(matches!(p.call.op, idem_core::Op::Propose { .. }) && p.reply.is_closed())
        });
        if batch.is_empty() {
            drop(slot);
            continue;
        }
        tokio::spawn(async move {
            let hlc = batch.iter().map(|p| p.hlc).max().unwrap_or(0);
            let (calls, replies): (Vec<Call>, Vec<oneshot::Sender<ApplyReply>>) =
                batch.into_iter().map(|p| (p.call, p.reply)).unzip();
            let n = calls.len();
            let req = ApplyRequest {
                hlc,
                calls,
                from_node: link.stamper.identity().node_id,
            };
            match link.apply_measured(&req, timeout).await {
                Ok(resp) if resp.results.len() == n => {
                    for (r, tx) in resp.results.into_iter().zip(replies) {
                        let _ = tx.send(Ok(Answer {
                            hlc: resp.hlc,
                            node: resp.node,
                            result: r,
                        }));
                    }
                }
                Ok(resp) => {
                    let e = LinkError::Refused {
                        region: link.region,
                        detail: format!("{} results for {n} calls", resp.results.len()),
                    };
                    for tx in replies {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for tx in replies {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
            drop(slot);
        });
    }
}
