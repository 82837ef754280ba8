//! A data directory's identity: the node it belongs to and which *incarnation* of that
//! node it is. A node whose data directory was lost and is started again under its old
//! id has forgotten the votes it cast and the log entries it acknowledged; quorum
//! intersection (Raft's, and the regions' majority for NEW) needs every acceptor to
//! remember them. The incarnation, a random number drawn when a directory is created,
//! lets peers tell the old node from its forgetful successor (see `idem-raft`'s
//! `incarnations`), so the successor can be refused or brought back safely.
//!
//! The file (`IDENTITY`) is text, versioned, written to a temporary name, synced,
//! renamed and its directory synced.

use crate::{sync_dir, StorageError};
use std::io::Write;
use std::path::Path;

const FILE: &str = "IDENTITY";
const VERSION: &str = "idem-identity 1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub node_id: u64,
    pub region: u16,
    /// Drawn at random when the directory was created; never 0.
    pub incarnation: u64,
    /// Whether the node's peers have confirmed this incarnation (a new directory is not,
    /// until the node has joined).
    pub confirmed: bool,
}

/// What opening a data directory found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// The directory's identity, as written before.
    Existing(Identity),
    /// A directory with engines but no identity (written by a release without them):
    /// its data is there, so it is confirmed.
    Upgraded(Identity),
    /// An empty directory: a new incarnation, not yet confirmed.
    New(Identity),
}

impl Found {
    pub fn identity(&self) -> Identity {
        match self {
            Found::Existing(i) | Found::Upgraded(i) | Found::New(i) => *i,
        }
    }
}

fn corrupt(detail: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        what: "IDENTITY",
        detail: detail.into(),
    }
}

impl Identity {
    /// Read `dir`'s identity, or give a new directory one (`incarnation` drawn by the
    /// caller). A directory of another node is refused.
    pub fn open(
        dir: &Path,
        node_id: u64,
        region: u16,
        incarnation: u64,
    ) -> Result<Found, StorageError> {
        let path = dir.join(FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let id = Identity::parse(&text)?;
                if id.node_id != node_id || id.region != region {
                    return Err(StorageError::WrongNode {
                        dir: dir.display().to_string(),
                        found: format!("node {} of region {}", id.node_id, id.region),
                        expected: format!("node {node_id} of region {region}"),
                    });
                }
                Ok(Found::Existing(id))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let had_data = ["log", "state"].iter().any(|d| dir.join(d).exists());
                let id = Identity {
                    node_id,
                    region,
                    incarnation: incarnation.max(1),
                    confirmed: had_data,
                };
                id.write(dir)?;
                Ok(if had_data {
                    Found::Upgraded(id)
                } else {
                    Found::New(id)
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Record that the peers confirmed this incarnation.
    pub fn confirm(&mut self, dir: &Path) -> Result<(), StorageError> {
        self.confirmed = true;
        self.write(dir)
    }

    fn write(&self, dir: &Path) -> Result<(), StorageError> {
        let tmp = dir.join(format!("{FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        write!(
            f,
            "{VERSION}\nnode_id = {}\nregion = {}\nincarnation = {:016x}\nconfirmed = {}\n",
            self.node_id, self.region, self.incarnation, self.confirmed
        )?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(FILE))?;
        sync_dir(dir)?;
        Ok(())
    }

    fn parse(text: &str) -> Result<Identity, StorageError> {
        let mut lines = text.lines();
        match lines.next() {
            Some(VERSION) => {}
            other => return Err(corrupt(format!("unknown format {other:?}"))),
        }
        let mut get = |name: &str| -> Result<String, StorageError> {
            let line = lines
                .next()
                .ok_or_else(|| corrupt(format!("missing {name}")))?;
            let (k, v) = line
                .split_once(" = ")
                .ok_or_else(|| corrupt(format!("bad line {line:?}")))?;
            if k != name {
                return Err(corrupt(format!("expected {name}, found {k}")));
            }
            Ok(v.to_string())
        };
        let node_id = get("node_id")?
            .parse()
            .map_err(|e| corrupt(format!("node_id: {e}")))?;
        let region = get("region")?
            .parse()
            .map_err(|e| corrupt(format!("region: {e}")))?;
        let incarnation = u64::from_str_radix(&get("incarnation")?, 16)
            .map_err(|e| corrupt(format!("incarnation: {e}")))?;
        let confirmed = get("confirmed")?
            .parse()
            .map_err(|e| corrupt(format!("confirmed: {e}")))?;
        if incarnation == 0 {
            return Err(corrupt("incarnation 0"));
        }
        Ok(Identity {
            node_id,
            region,
            incarnation,
            confirmed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_gets_an_unconfirmed_identity_that_survives_reopening() {
        let t = tempfile::tempdir().unwrap();
        let found = Identity::open(t.path(), 4, 1, 0xabc).unwrap();
        let mut id = match found {
            Found::New(id) => id,
            other => panic!("{other:?}"),
        };
        assert_eq!((id.incarnation, id.confirmed), (0xabc, false));
        // Reopened (with another drawn number): the same incarnation, still unconfirmed.
        assert_eq!(
            Identity::open(t.path(), 4, 1, 0xdef).unwrap(),
            Found::Existing(id)
        );
        id.confirm(t.path()).unwrap();
        assert!(
            Identity::open(t.path(), 4, 1, 7)
                .unwrap()
                .identity()
                .confirmed
        );
    }

    #[test]
    fn another_nodes_directory_is_refused_naming_both() {
        let t = tempfile::tempdir().unwrap();
        Identity::open(t.path(), 4, 1, 9).unwrap();
        let e = Identity::open(t.path(), 5, 1, 9).unwrap_err().to_string();
        assert!(
            e.contains("node 4 of region 1") && e.contains("node 5 of region 1"),
            "{e}"
        );
    }

    #[test]
    fn a_directory_with_data_but_no_identity_is_an_upgrade_and_confirmed() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("state")).unwrap();
        match Identity::open(t.path(), 1, 0, 5).unwrap() {
            Found::Upgraded(id) => assert!(id.confirmed),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_damaged_identity_is_an_error_not_a_new_node() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join(FILE), "idem-identity 1\nnode_id = 1\n").unwrap();
        let e = Identity::open(t.path(), 1, 0, 5).unwrap_err().to_string();
        assert!(e.contains("IDENTITY") && e.contains("region"), "{e}");
        std::fs::write(t.path().join(FILE), "idem-identity 9\n").unwrap();
        assert!(Identity::open(t.path(), 1, 0, 5).is_err());
    }
}
