//! openraft's own storage test suite, run against the RocksDB log store and state
//! machine: log state, reads, votes, truncation, purge, initial state and re-apply,
//! snapshot build, transfer and install. Every storage implementation Idem uses
//! passes it.

use crate::log_store::LogStore;
use crate::state_machine::StateMachine;
use crate::types::TypeConfig;
use idem_storage::{LogEngine, StateEngine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::StorageError;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let err = |e: &dyn std::fmt::Display| {
            StorageError::read(TypeConfig::err_from_string(e.to_string()))
        };
        let dir = tempfile::tempdir().map_err(|e| err(&e))?;
        let log = LogEngine::open(&dir.path().join("log")).map_err(|e| err(&e))?;
        let state = StateEngine::open(&dir.path().join("state")).map_err(|e| err(&e))?;
        let sm = StateMachine::open(state, 5).map_err(|e| err(&e))?;
        Ok((dir, LogStore::new(log, 5), sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocksdb_storage_passes_openraft_suite() {
    Suite::test_all(RocksBuilder).await.expect("storage suite");
}
