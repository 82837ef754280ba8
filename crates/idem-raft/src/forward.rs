//! Requests a follower sends on to its group's leader, batched: one `ForwardBatch` call
//! carries every request queued while earlier calls were on the wire. Under light load a
//! batch holds one request and leaves at once; under load the batches grow instead of
//! the calls, so the leader decodes one HTTP/2 request per batch rather than per client
//! call.

use crate::codec::{decode, encode};
use crate::group::{Forwarded, ForwardedReply, GroupError};
use crate::network::Channels;
use crate::router::GroupId;
use idem_proto::internal::RaftMessage;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Most requests in one batch (the leader refuses larger ones).
pub(crate) const MAX_BATCH: usize = 512;
/// Batches on the wire at once per group; requests queue behind them.
const MAX_IN_FLIGHT: usize = 4;
/// Requests waiting for a batch; beyond it callers wait for room.
const QUEUE: usize = 8 * MAX_BATCH;

pub(crate) type Reply = Result<ForwardedReply, GroupError>;

struct Pending {
    leader: u64,
    addr: String,
    req: Forwarded,
    reply: oneshot::Sender<Reply>,
}

/// Bytes a forwarded request and its answer may take: its own bytes, plus the largest
/// stored response for a request whose answer may carry one (a Reserve's REPLAY, a read).
pub(crate) fn wire_bytes(req: &Forwarded, max_response_bytes: usize) -> usize {
    match req {
        Forwarded::Write { key, op } => {
            key.approx_bytes() + op.round_trip_bytes(max_response_bytes)
        }
        Forwarded::Read { key } => key.approx_bytes() + 256 + max_response_bytes,
    }
}

#[derive(Clone)]
pub(crate) struct Forwarder {
    tx: mpsc::Sender<Pending>,
    timeout: Duration,
}

impl Forwarder {
    /// Start the batching task of one group (it ends when the group is dropped).
    pub(crate) fn start(
        group: GroupId,
        channels: Channels,
        timeout: Duration,
        max_response_bytes: usize,
    ) -> Forwarder {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(group, channels, timeout, max_response_bytes, rx));
        Forwarder { tx, timeout }
    }

    /// Send `req` to `leader` (at `addr`) in the next batch and wait for its answer.
    pub(crate) async fn call(&self, leader: u64, addr: String, req: Forwarded) -> Reply {
        let (reply, rx) = oneshot::channel();
        let pending = Pending {
            leader,
            addr,
            req,
            reply,
        };
        // One deadline for waiting for room in the queue and for the answer.
        let answer = async {
            if self.tx.send(pending).await.is_err() {
                return Err(GroupError::Unavailable("the group is shutting down".into()));
            }
            rx.await
                .unwrap_or_else(|_| Err(GroupError::Unavailable("forwarding stopped".into())))
        };
        tokio::time::timeout(self.timeout, answer)
            .await
            .unwrap_or(Err(GroupError::Timeout(self.timeout)))
    }
}

async fn run(
    group: GroupId,
    channels: Channels,
    timeout: Duration,
    max_response_bytes: usize,
    rx: mpsc::Receiver<Pending>,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut rx = crate::batch::Batcher::new(rx);
    let bounds = crate::batch::Bounds {
        max_items: MAX_BATCH,
        max_bytes: crate::MAX_BATCH_BYTES,
        size: |p: &Pending| wire_bytes(&p.req, max_response_bytes),
    };
    // What arrives while every slot is busy joins the next batch.
    while let Some((permit, batch)) = rx.next_batch(&slots, &bounds).await {
        // Normally one leader; during a leader change requests may name two.
        let mut by_leader: BTreeMap<u64, Vec<Pending>> = BTreeMap::new();
        for p in batch {
            by_leader.entry(p.leader).or_default().push(p);
        }
        let permit = Arc::new(permit);
        for (leader, items) in by_leader {
            let addr = items[0].addr.clone();
            let channels = channels.clone();
            let permit = permit.clone();
            tokio::spawn(async move {
                send(group, &channels, timeout, leader, &addr, items).await;
                drop(permit);
            });
        }
    }
}

async fn send(
    group: GroupId,
    channels: &Channels,
    timeout: Duration,
    leader: u64,
    addr: &str,
    items: Vec<Pending>,
) {
    let (reqs, replies): (Vec<Forwarded>, Vec<oneshot::Sender<Reply>>) =
        items.into_iter().map(|p| (p.req, p.reply)).unzip();
    let result = call_leader(group, channels, timeout, leader, addr, &reqs).await;
    match result {
        Ok(answers) if answers.len() == replies.len() => {
            for (tx, a) in replies.into_iter().zip(answers) {
                let _ = tx.send(a);
            }
        }
        Ok(answers) => {
            let e = GroupError::Fatal(format!(
                "leader {leader} answered {} of {} forwarded requests",
                answers.len(),
                replies.len()
            ));
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
}

async fn call_leader(
    group: GroupId,
    channels: &Channels,
    timeout: Duration,
    leader: u64,
    addr: &str,
    reqs: &[Forwarded],
) -> Result<Vec<Reply>, GroupError> {
    let mut client = channels
        .client(addr)
        .map_err(|e| GroupError::Unavailable(e.to_string()))?;
    let (from_node, from_incarnation) = channels.me();
    let mut req = tonic::Request::new(RaftMessage {
        group: Some(group.to_wire()),
        payload: encode(&reqs),
        from_node,
        from_incarnation,
    });
    req.set_timeout(timeout);
    let resp = client
        .forward_batch(req)
        .await
        .map_err(|st| match st.code() {
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => GroupError::Timeout(timeout),
            _ => GroupError::Unavailable(format!("leader {leader} at {addr}: {}", st.message())),
        })?;
    decode::<Vec<Reply>>(&resp.into_inner().payload).map_err(|e| GroupError::Fatal(e.to_string()))
}
