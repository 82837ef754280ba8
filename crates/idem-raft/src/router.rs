//! From a group id to the group running on this node.

use crate::group::Group;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// A Raft group: the group of `shard` inside `region`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId {
    pub region: u16,
    pub shard: u32,
}

impl GroupId {
    pub fn to_wire(self) -> idem_proto::internal::GroupId {
        idem_proto::internal::GroupId {
            region: self.region.into(),
            shard: self.shard,
        }
    }

    pub fn from_wire(g: Option<&idem_proto::internal::GroupId>) -> Option<GroupId> {
        let g = g?;
        Some(GroupId {
            region: u16::try_from(g.region).ok()?,
            shard: g.shard,
        })
    }
}

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "r{}/s{}", self.region, self.shard)
    }
}

#[derive(Clone, Default)]
pub struct Router {
    groups: Arc<RwLock<BTreeMap<GroupId, Arc<Group>>>>,
}

impl Router {
    pub fn insert(&self, group: Arc<Group>) {
        self.groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group.id(), group);
    }

    pub fn get(&self, id: GroupId) -> Option<Arc<Group>> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<Group>> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
