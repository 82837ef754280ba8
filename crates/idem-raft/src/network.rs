//! openraft's network over tonic. One HTTP/2 channel per peer address is shared by every
//! group of the node (requests of many groups are multiplexed on it); each message names
//! its group. Payloads are versioned MessagePack (see `codec`).

use crate::codec::{decode, encode};
use crate::incarnations::{AdmitError, Incarnations};
use crate::router::GroupId;
use crate::types::{Snapshot, TypeConfig, Vote};
use idem_proto::internal::raft_client::RaftClient;
use idem_proto::internal::{RaftMessage, SnapshotChunk};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tonic::transport::{Channel, Endpoint};

/// Bytes of snapshot data per streamed chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Chunks buffered ahead of the network while a snapshot streams.
const SNAPSHOT_CHUNKS_IN_FLIGHT: usize = 4;
/// Most peer addresses kept connected.
const MAX_CHANNELS: usize = 1024;

/// Connections to peers, shared by every group on the node.
#[derive(Clone, Default)]
pub struct Channels {
    inner: Arc<Mutex<HashMap<String, Channel>>>,
    /// Source address of outgoing connections (`None`: the kernel chooses).
    local: Option<std::net::IpAddr>,
    /// This node's incarnation, sent with every Raft message, and what it knows of its
    /// peers' (`None`: a test group that does not check them).
    incarnations: Option<Arc<Incarnations>>,
}

impl Channels {
    /// Channels whose connections leave from `addr` (so that per-node firewall rules,
    /// as the fault suite sets them, see each node's own address).
    pub fn with_local_address(addr: Option<std::net::IpAddr>) -> Channels {
        Channels {
            inner: Arc::default(),
            local: addr,
            incarnations: None,
        }
    }

    /// Send this node's incarnation with every Raft message and check the peers'.
    pub fn with_incarnations(mut self, incarnations: Arc<Incarnations>) -> Channels {
        self.incarnations = Some(incarnations);
        self
    }

    pub fn incarnations(&self) -> Option<&Arc<Incarnations>> {
        self.incarnations.as_ref()
    }

    /// (node, incarnation) to send, or zeros.
    pub(crate) fn me(&self) -> (u64, u64) {
        self.incarnations.as_ref().map_or((0, 0), |i| i.me())
    }

    /// Admit an answer from a peer: its incarnation recorded the first time, refused if
    /// it changed (a node that lost its data must not be counted).
    pub(crate) fn admit(&self, node: u64, incarnation: u64) -> Result<(), AdmitError> {
        match &self.incarnations {
            Some(i) => i.admit(node, incarnation),
            None => Ok(()),
        }
    }

    /// A lazily connected channel to `addr` (host:port).
    pub fn get(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .local_address(self.local)
            .connect_lazy();
        if map.len() >= MAX_CHANNELS {
            map.clear();
        }
        map.insert(addr.to_owned(), ch.clone());
        Ok(ch)
    }

    pub fn client(&self, addr: &str) -> Result<RaftClient<Channel>, tonic::transport::Error> {
        Ok(RaftClient::new(self.get(addr)?)
            .max_decoding_message_size(crate::MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(crate::MAX_PEER_MESSAGE_BYTES))
    }
}

pub struct NetworkFactory {
    pub group: GroupId,
    pub channels: Channels,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, _target: u64, node: &BasicNode) -> Network {
        Network {
            group: self.group,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
        }
    }
}

pub struct Network {
    group: GroupId,
    addr: String,
    channels: Channels,
}

fn unreachable(e: &(impl std::error::Error + 'static)) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(e))
}

fn status_error(st: tonic::Status) -> RPCError<TypeConfig> {
    match st.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown => unreachable(&st),
        _ => RPCError::Network(NetworkError::new(&st)),
    }
}

fn decode_error(e: std::io::Error) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&e))
}

impl Network {
    fn message(&self, payload: Vec<u8>) -> RaftMessage {
        let (from_node, from_incarnation) = self.channels.me();
        RaftMessage {
            group: Some(self.group.to_wire()),
            payload,
            from_node,
            from_incarnation,
        }
    }

    /// The payload of a peer's answer, once its incarnation is admitted.
    fn admitted(&self, m: RaftMessage) -> Result<Vec<u8>, RPCError<TypeConfig>> {
        match self.channels.admit(m.from_node, m.from_incarnation) {
            Ok(()) => Ok(m.payload),
            Err(e) => {
                tracing::error!(group = %self.group, peer = %self.addr, error = %e, "answer refused");
                Err(RPCError::Network(NetworkError::from_string(e.to_string())))
            }
        }
    }

    fn client(&self) -> Result<RaftClient<Channel>, RPCError<TypeConfig>> {
        self.channels
            .client(&self.addr)
            .map_err(|e| unreachable(&e))
    }

    async fn vote_rpc(
        &mut self,
        pre: bool,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut req = tonic::Request::new(self.message(encode(&(pre, rpc))));
        req.set_timeout(option.hard_ttl());
        let resp = self.client()?.vote(req).await.map_err(status_error)?;
        decode::<Result<VoteResponse<TypeConfig>, String>>(&self.admitted(resp.into_inner())?)
            .map_err(decode_error)?
            .map_err(|e| RPCError::Network(NetworkError::from_string(e)))
    }
}

/// How many of `entries`, from the first, fit in `max_bytes` (at least one), and their
/// bytes (as estimated for batching).
fn append_prefix(entries: &[crate::types::Entry], max_bytes: usize) -> (usize, usize) {
    let mut bytes = 0usize;
    for (i, e) in entries.iter().enumerate() {
        let n = match &e.payload {
            openraft::EntryPayload::Normal(cmd) => cmd.key.approx_bytes() + cmd.op.approx_bytes(),
            _ => 256,
        };
        if i > 0 && bytes.saturating_add(n) > max_bytes {
            return (i, bytes);
        }
        bytes = bytes.saturating_add(n);
    }
    (entries.len(), bytes)
}

/// The deadline of an AppendEntries carrying `bytes` of entries: openraft's time-to-live
/// plus time for the bytes at [`crate::APPEND_BYTES_PER_MS`].
pub(crate) fn append_deadline(ttl: Duration, bytes: usize) -> Duration {
    ttl + Duration::from_millis(bytes.div_ceil(crate::APPEND_BYTES_PER_MS) as u64)
}

impl RaftNetworkV2<TypeConfig> for Network {
    type SnapshotData = idem_storage::SnapshotFile;

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // Bounded in bytes as well as entries: send the longest prefix that fits (at
        // least one entry) and report a partial success, so openraft sends the rest next.
        let (sent, bytes) = append_prefix(&rpc.entries, crate::MAX_APPEND_BYTES);
        let partial = (sent < rpc.entries.len()).then(|| {
            rpc.entries.truncate(sent);
            let last = rpc.entries.last().map(|e| e.log_id);
            // The follower may commit only what it holds.
            rpc.leader_commit = rpc.leader_commit.min(last);
            last
        });
        let mut req = tonic::Request::new(self.message(encode(&rpc)));
        req.set_timeout(append_deadline(option.hard_ttl(), bytes));
        let resp = self
            .client()?
            .append_entries(req)
            .await
            .map_err(status_error)?;
        let answer = decode::<Result<AppendEntriesResponse<TypeConfig>, String>>(
            &self.admitted(resp.into_inner())?,
        )
        .map_err(decode_error)?
        .map_err(|e| RPCError::Network(NetworkError::from_string(e)))?;
        Ok(match (answer, partial) {
            (AppendEntriesResponse::Success, Some(last)) => {
                AppendEntriesResponse::PartialSuccess(last)
            }
            (a, _) => a,
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.vote_rpc(false, rpc, option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.vote_rpc(true, rpc, option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let group = self.group.to_wire();
        let (from_node, from_incarnation) = self.channels.me();
        let meta = encode(&(vote, snapshot.meta.clone()));
        let path = snapshot.snapshot.path.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(SNAPSHOT_CHUNKS_IN_FLIGHT);
        // Reads the file in bounded chunks; stops when the receiver goes away.
        let reader = tokio::spawn(async move {
            let mut file = tokio::fs::File::open(&path).await?;
            let mut first = true;
            loop {
                let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
                let n = file.read(&mut buf).await?;
                if n == 0 && !first {
                    return Ok::<(), std::io::Error>(());
                }
                buf.truncate(n);
                let chunk = SnapshotChunk {
                    group: Some(group),
                    meta: if first { meta.clone() } else { Vec::new() },
                    data: buf,
                    from_node,
                    from_incarnation,
                };
                first = false;
                if tx.send(chunk).await.is_err() {
                    return Ok(());
                }
                if n == 0 {
                    return Ok(());
                }
            }
        });
        let mut client = self
            .client()
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let send = client.install_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx));
        let result = tokio::select! {
            closed = cancel => {
                reader.abort();
                return Err(StreamingError::Closed(closed));
            }
            r = send => r,
        };
        reader.abort();
        let resp = result.map_err(|st| StreamingError::Network(NetworkError::new(&st)))?;
        let payload = self
            .admitted(resp.into_inner())
            .map_err(|e| StreamingError::Network(NetworkError::from_string(e.to_string())))?;
        decode::<Result<SnapshotResponse<TypeConfig>, String>>(&payload)
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?
            .map_err(|e| StreamingError::Network(NetworkError::from_string(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Entry, LogId, TypeConfig};
    use idem_core::{ClaimId, Command, Fence, Key, Op, StoredResponse};
    use openraft::vote::RaftLeaderIdExt;

    fn entry(index: u64, body: usize) -> Entry {
        let leader = <TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(2, 1);
        let op = Op::Complete {
            fence: Fence::default(),
            response: StoredResponse {
                status: 200,
                headers: Vec::new(),
                body: vec![1; body],
            },
            quorum: 2,
        };
        let cmd = Command {
            now_ms: 1_700_000_000_000,
            skew_margin_ms: 500,
            claim: ClaimId::default(),
            region_bit: 1,
            key: Key::default(),
            op,
        };
        Entry {
            log_id: LogId::new(leader, index),
            payload: openraft::EntryPayload::Normal(cmd),
        }
    }

    #[test]
    fn an_append_carries_at_most_its_byte_bound_and_gets_time_for_its_bytes() {
        const KIB: usize = 1 << 10;
        let ttl = Duration::from_millis(50);
        // Three entries of 600 KiB: one per AppendEntries, each given time for its bytes.
        let big: Vec<Entry> = (1..=3).map(|i| entry(i, 600 * KIB)).collect();
        let (n, bytes) = append_prefix(&big, crate::MAX_APPEND_BYTES);
        assert_eq!(n, 1);
        assert!(bytes >= 600 * KIB, "{bytes}");
        assert!(append_deadline(ttl, bytes) >= ttl + Duration::from_millis(1_200));
        // An entry above the bound travels alone rather than never.
        let (n, bytes) = append_prefix(&[entry(1, 3 << 20), entry(2, 10)], crate::MAX_APPEND_BYTES);
        assert_eq!((n, bytes >= 3 << 20), (1, true));
        // Small entries go together, with the heartbeat's time-to-live and little more.
        let small: Vec<Entry> = (1..=100).map(|i| entry(i, 100)).collect();
        let (n, bytes) = append_prefix(&small, crate::MAX_APPEND_BYTES);
        assert_eq!(n, 100);
        assert!(append_deadline(ttl, bytes) < ttl + Duration::from_millis(100));
    }
}
