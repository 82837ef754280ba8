//! Joining: what a node with a new data directory does before it takes any part.
//!
//! A node started on an empty directory under an id its peers know has forgotten the
//! votes it cast and the log entries it acknowledged. If it voted and acknowledged again
//! as if it remembered, two leaders could be elected in one term and a committed entry
//! could be lost (and with it a region's accept of a claim: a second NEW). So before its
//! groups start, a new directory asks every other node of its region (`Identify`):
//!
//! - a peer that knows this node id under another incarnation means the data was lost:
//!   the node refuses to start and says how to bring it back (`--rejoin`);
//! - with `--rejoin`, each peer records the new incarnation (the old one is refused from
//!   then on) and tells its groups' positions; the node then votes in a group only in
//!   terms above every peer's term and only for a candidate whose log is at least the
//!   most advanced of theirs, and stands for election only once its own log is
//!   (`idem_raft::Gates`); its directory is confirmed once every gate is passed (a
//!   restart before that rejoins again: its peers know the new incarnation);
//! - if no peer of its region has a confirmed directory (the whole region is new) but a
//!   node of another region has heard from this region before, the region lost all its
//!   data: its accepts are gone and it must not vote, so the node refuses to start.
//!
//! It waits (and says so on `/healthz`) until every peer of its region has answered, and
//! for the region check until nodes of a majority of regions have.

use idem_proto::internal::raft_client::RaftClient;
use idem_proto::internal::IdentifyRequest;
use idem_raft::{Channels, Gate, LogPosition};
use idem_storage::Identity;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long one `Identify` may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long between two rounds of asking.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How long a node of a region that took part before waits for silent peers of its
/// region to show their data before it concludes the region was lost.
const LOST_REGION_WAIT: Duration = Duration::from_secs(30);

/// A node to ask: its id and address.
#[derive(Clone, Debug)]
pub struct Member {
    pub id: u64,
    pub addr: String,
}

/// What a node that joined must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Joined {
    /// Take part at once: no peer knew this node (a new member, or a new cluster).
    Confirmed,
    /// Rejoined with an empty directory: vote only past these gates, by shard.
    Rejoined(BTreeMap<u32, Gate>),
}

/// Why the node must not start.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// A peer knows this node id under another incarnation.
    LostDirectory {
        node: u64,
        peer: u64,
        known: u64,
        mine: u64,
    },
    /// Every node of the region that answered is new, and another region has heard
    /// from it before (`silent`: the region's nodes that did not answer).
    LostRegion {
        region: u16,
        witness: u64,
        silent: Vec<u64>,
    },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::LostDirectory {
                node,
                peer,
                known,
                mine,
            } => write!(
                f,
                "node {node}'s data directory is new (incarnation {mine:016x}), but node {peer} \
                 knows node {node} as incarnation {known:016x}: the data directory was lost, with \
                 the votes and log entries this node acknowledged, and a node that forgot them \
                 must not vote as if it remembered. If the old directory can be restored, stop \
                 and restore it. Otherwise start this node again with `idem server --rejoin`: \
                 its peers then forget the old incarnation, and it copies its groups' logs from \
                 them and votes only once it holds everything they held, and only in later terms \
                 (docs/operations.md, Replacing a node)"
            ),
            Refused::LostRegion {
                region,
                witness,
                silent,
            } => write!(
                f,
                "every node of region {region} that answered has a new data directory{}, but \
                 node {witness} of another region has heard from region {region} before: the \
                 region lost all its data, including the accepts it gave other regions' \
                 proposals, and must not vote until it is rebuilt. Rebuilding a region from the \
                 others is not supported yet; restore at least one node's data directory \
                 (docs/operations.md, Losing a region)",
                if silent.is_empty() {
                    String::new()
                } else {
                    format!(" (nodes {silent:?} did not answer)")
                }
            ),
        }
    }
}

/// What the node shows while it joins (for `/healthz`).
#[derive(Clone, Default)]
pub struct JoinStatus(Arc<Mutex<Option<String>>>);

impl JoinStatus {
    pub fn set(&self, s: Option<String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct Answer {
    known: u64,
    confirmed: bool,
    seen_region: bool,
    /// By shard: the highest term and the last log id.
    groups: Vec<(u32, u64, LogPosition)>,
}

async fn ask(channels: &Channels, m: &Member, me: &Identity, rejoin: bool) -> Option<Answer> {
    let ch = channels.get(&m.addr).ok()?;
    let mut req = tonic::Request::new(IdentifyRequest {
        node_id: me.node_id,
        region: me.region.into(),
        incarnation: me.incarnation,
        rejoin,
    });
    req.set_timeout(ASK_TIMEOUT);
    let r = tokio::time::timeout(ASK_TIMEOUT, RaftClient::new(ch).identify(req))
        .await
        .ok()?
        .ok()?
        .into_inner();
    Some(Answer {
        known: r.known_incarnation,
        confirmed: r.confirmed,
        seen_region: r.seen_region,
        groups: r
            .groups
            .iter()
            .map(|g| {
                let log = LogPosition {
                    term: g.last_log_term,
                    node: g.last_log_node,
                    index: g.last_log_index,
                };
                (g.shard, g.term, log)
            })
            .collect(),
    })
}

/// Ask every node of `nodes` at once; the answers of those that answered.
async fn ask_all(
    channels: &Channels,
    nodes: &[Member],
    me: &Identity,
    rejoin: bool,
) -> Vec<(u64, Answer)> {
    let asks = nodes
        .iter()
        .map(|m| async move { (m.id, ask(channels, m, me, rejoin).await) });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .filter_map(|(id, a)| Some((id, a?)))
        .collect()
}

/// Join: ask `region_peers` (the other nodes of this node's region) and `others` (the
/// nodes of the other regions, by region) until the node may start or must not.
///
/// A refusal may rest on some answers (refusing is always safe); taking part needs every
/// peer of the region to have answered. Answers are asked again every round, so a peer
/// that joined in the meantime (a new cluster whose nodes start one after the other)
/// counts as the member it has become.
pub async fn join(
    me: &Identity,
    region_peers: &[Member],
    others: &[(u16, Vec<Member>)],
    channels: &Channels,
    rejoin: bool,
    status: &JoinStatus,
) -> Result<Joined, Refused> {
    let started = std::time::Instant::now();
    let mut answers: BTreeMap<u64, Answer> = BTreeMap::new();
    let regions = others.len() + 1;
    loop {
        // Another region that heard from this one first, this region's peers after: a
        // peer that joined before any region heard from this one (a new cluster whose
        // nodes start one after the other) then answers as the member it has become.
        let mut witness = None;
        let mut regions_answered = 1; // this one
        for (_, nodes) in others {
            let got = ask_all(channels, nodes, me, false).await;
            regions_answered += usize::from(!got.is_empty());
            witness = witness.or(got.iter().find(|(_, a)| a.seen_region).map(|(id, _)| *id));
        }
        for (id, a) in ask_all(channels, region_peers, me, rejoin).await {
            if a.known != 0 && a.known != me.incarnation && !rejoin {
                return Err(Refused::LostDirectory {
                    node: me.node_id,
                    peer: id,
                    known: a.known,
                    mine: me.incarnation,
                });
            }
            answers.insert(id, a);
        }
        let missing: Vec<u64> = region_peers
            .iter()
            .filter(|m| !answers.contains_key(&m.id))
            .map(|m| m.id)
            .collect();
        // Lost: a region none of whose nodes has its data, that another region heard from.
        let member = answers.values().any(|a| a.confirmed);
        let witness = witness.filter(|_| !member);
        match witness {
            // The region took part before and no node of it has shown its data: lost,
            // once every peer answered so (or the silent ones stayed silent a while).
            Some(w) if missing.is_empty() || started.elapsed() > LOST_REGION_WAIT => {
                return Err(Refused::LostRegion {
                    region: me.region,
                    witness: w,
                    silent: missing,
                });
            }
            None if missing.is_empty() && (member || regions_answered > regions / 2) => break,
            _ => {}
        }
        status.set(Some(if !missing.is_empty() {
            format!("joining: a new data directory waits for its region's nodes {missing:?} to answer")
        } else if witness.is_some() {
            "joining: no node of this region has its data, and another region heard from it before"
                .to_string()
        } else {
            format!(
                "joining: a new region waits for nodes of a majority of regions to answer ({regions_answered} of {regions})"
            )
        }));
        tokio::time::sleep(RETRY_EVERY).await;
    }
    // A peer that already knows this incarnation saw it rejoin (and maybe vote) before
    // a restart: it goes on rejoining, behind gates from the peers' positions now.
    let known_here = answers.values().any(|a| a.known == me.incarnation);
    tracing::info!(
        peers = ?answers.keys().collect::<Vec<_>>(),
        rejoin,
        known_here,
        "joined"
    );
    status.set(None);
    if !rejoin && !known_here {
        return Ok(Joined::Confirmed);
    }
    let mut gates: BTreeMap<u32, Gate> = BTreeMap::new();
    for a in answers.values() {
        for &(shard, term, log) in &a.groups {
            let g = gates.entry(shard).or_default();
            g.term = g.term.max(term);
            g.log = g.log.max(log);
        }
    }
    Ok(Joined::Rejoined(gates))
}
