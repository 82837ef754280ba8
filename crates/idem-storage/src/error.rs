use thiserror::Error;

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// A write or sync failed earlier: the node writes and acknowledges nothing more
    /// until it is restarted (see `disk.rs`).
    #[error("the disk failed and the node stopped writing ({0}); restart it to recover from what is on disk")]
    DiskFailed(String),
    #[error("the data directory {dir} belongs to {found}, not to {expected}")]
    WrongNode {
        dir: String,
        found: String,
        expected: String,
    },
}

impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Io(e) => e,
            other => std::io::Error::other(other),
        }
    }
}
