//! The agent's data directory: an identity marker plus the RocksDB store.
//!
//! Layout: `<data_dir>/identity.json` (format version, node id, cluster id once
//! known) and `<data_dir>/raft/` (RocksDB). The marker is written only after the store
//! exists, so "marker present, store absent" always means damage. Nothing here ever
//! deletes or overwrites existing data: every mismatch is an error.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::raft::store::{self, LogStore, SmStore, StoreError};

pub const IDENTITY_FILE: &str = "identity.json";
pub const STORE_DIR: &str = "raft";
pub const IDENTITY_FORMAT_VERSION: u32 = 1;
const IDENTITY_LEN_MAX: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub format_version: u32,
    pub node_id: u64,
    pub cluster_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot create data dir {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data dir {path} is not empty and has no {IDENTITY_FILE}; refusing to use it (point data_dir at an empty or agent-owned directory)")]
    Foreign { path: PathBuf },
    #[error("{path} is corrupted; the data dir was left untouched")]
    CorruptIdentity {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path} is {len} bytes, larger than any identity marker; the data dir was left untouched"
    )]
    IdentityTooLarge { path: PathBuf, len: u64 },
    #[error("{path} has format version {found}; this agent understands {IDENTITY_FORMAT_VERSION}")]
    IdentityVersion { path: PathBuf, found: u32 },
    #[error("data dir {path} belongs to node {found}, but this agent is configured as node {configured}")]
    NodeIdMismatch {
        path: PathBuf,
        found: u64,
        configured: u64,
    },
    #[error("data dir {path} has an identity marker but its Raft store {store} is missing; restore it from a backup or start with a new data dir and join again")]
    StoreMissing { path: PathBuf, store: PathBuf },
    #[error("the Raft store in {path} cannot be opened; the data dir was left untouched")]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("data dir {path} belongs to cluster {marker}, but its store holds cluster {stored}")]
    ClusterMismatch {
        path: PathBuf,
        marker: String,
        stored: String,
    },
}

/// An opened data directory.
pub struct DataDir {
    pub path: PathBuf,
    pub identity: Identity,
    pub fresh: bool,
}

impl DataDir {
    /// Open or create the data dir for `node_id`; returns the store halves.
    pub fn open(path: &Path, node_id: u64) -> Result<(DataDir, LogStore, SmStore), DataDirError> {
        let marker = path.join(IDENTITY_FILE);
        let store_path = path.join(STORE_DIR);
        let exists = path.exists();
        let empty = if exists {
            let mut rd = std::fs::read_dir(path).map_err(|source| DataDirError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            rd.next().is_none()
        } else {
            false
        };
        if !exists || empty {
            std::fs::create_dir_all(path).map_err(|source| DataDirError::Create {
                path: path.to_path_buf(),
                source,
            })?;
            let (l, s) = store::open(&store_path, true).map_err(|source| DataDirError::Store {
                path: path.to_path_buf(),
                source,
            })?;
            let identity = Identity {
                format_version: IDENTITY_FORMAT_VERSION,
                node_id,
                cluster_id: None,
            };
            let dd = DataDir {
                path: path.to_path_buf(),
                identity,
                fresh: true,
            };
            dd.write_identity()?;
            return Ok((dd, l, s));
        }
        if !marker.exists() {
            return Err(DataDirError::Foreign {
                path: path.to_path_buf(),
            });
        }
        let len = std::fs::metadata(&marker)
            .map_err(|source| DataDirError::Io {
                path: marker.clone(),
                source,
            })?
            .len();
        if len > IDENTITY_LEN_MAX {
            return Err(DataDirError::IdentityTooLarge { path: marker, len });
        }
        let text = std::fs::read(&marker).map_err(|source| DataDirError::Io {
            path: marker.clone(),
            source,
        })?;
        let identity: Identity =
            serde_json::from_slice(&text).map_err(|source| DataDirError::CorruptIdentity {
                path: marker.clone(),
                source,
            })?;
        if identity.format_version != IDENTITY_FORMAT_VERSION {
            return Err(DataDirError::IdentityVersion {
                path: marker,
                found: identity.format_version,
            });
        }
        if identity.node_id != node_id {
            return Err(DataDirError::NodeIdMismatch {
                path: path.to_path_buf(),
                found: identity.node_id,
                configured: node_id,
            });
        }
        if !store_path.join("CURRENT").exists() {
            return Err(DataDirError::StoreMissing {
                path: path.to_path_buf(),
                store: store_path,
            });
        }
        let (l, s) = store::open(&store_path, false).map_err(|source| DataDirError::Store {
            path: path.to_path_buf(),
            source,
        })?;
        if let (Some(marker_id), Some(info)) = (
            identity.cluster_id.as_ref(),
            s.shared()
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .state
                .cluster
                .clone(),
        ) {
            if *marker_id != info.cluster_id {
                return Err(DataDirError::ClusterMismatch {
                    path: path.to_path_buf(),
                    marker: marker_id.clone(),
                    stored: info.cluster_id,
                });
            }
        }
        Ok((
            DataDir {
                path: path.to_path_buf(),
                identity,
                fresh: false,
            },
            l,
            s,
        ))
    }

    /// Record the cluster id in the marker (write to a temp file, fsync, rename).
    pub fn set_cluster_id(&mut self, cluster_id: &str) -> Result<(), DataDirError> {
        if self.identity.cluster_id.as_deref() == Some(cluster_id) {
            return Ok(());
        }
        self.identity.cluster_id = Some(cluster_id.to_string());
        self.write_identity()
    }

    fn write_identity(&self) -> Result<(), DataDirError> {
        use std::io::Write;
        let marker = self.path.join(IDENTITY_FILE);
        let tmp = self.path.join(format!("{IDENTITY_FILE}.tmp"));
        let io = |source| DataDirError::Io {
            path: marker.clone(),
            source,
        };
        let bytes =
            serde_json::to_vec_pretty(&self.identity).map_err(|e| io(std::io::Error::other(e)))?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &marker).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
    }

    #[test]
    fn fresh_then_reopen() {
        let d = tmp();
        let p = d.path().join("node");
        {
            let (mut dd, _, _) = DataDir::open(&p, 4).unwrap_or_else(|e| panic!("{e}"));
            assert!(dd.fresh);
            dd.set_cluster_id("abc").unwrap_or_else(|e| panic!("{e}"));
        }
        let (dd, _, _) = DataDir::open(&p, 4).unwrap_or_else(|e| panic!("{e}"));
        assert!(!dd.fresh);
        assert_eq!(dd.identity.cluster_id.as_deref(), Some("abc"));
    }

    #[test]
    fn mismatches_and_damage_are_refused_without_changes() {
        let d = tmp();
        let p = d.path().join("node");
        drop(DataDir::open(&p, 4).unwrap_or_else(|e| panic!("{e}")));
        let e = DataDir::open(&p, 5)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("belongs to node 4") && e.contains("node 5"),
            "{e}"
        );

        std::fs::write(p.join(IDENTITY_FILE), b"{ not json").unwrap_or_else(|e| panic!("{e}"));
        let e = DataDir::open(&p, 4).err();
        assert!(
            matches!(e, Some(DataDirError::CorruptIdentity { .. })),
            "{e:?}"
        );
        assert_eq!(
            std::fs::read(p.join(IDENTITY_FILE)).unwrap_or_default(),
            b"{ not json"
        );

        let foreign = d.path().join("foreign");
        std::fs::create_dir_all(&foreign).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(foreign.join("precious.txt"), b"keep").unwrap_or_else(|e| panic!("{e}"));
        let e = DataDir::open(&foreign, 1).err();
        assert!(matches!(e, Some(DataDirError::Foreign { .. })), "{e:?}");
        assert_eq!(
            std::fs::read(foreign.join("precious.txt")).unwrap_or_default(),
            b"keep"
        );
    }

    #[test]
    fn missing_store_is_refused() {
        let d = tmp();
        let p = d.path().join("node");
        drop(DataDir::open(&p, 2).unwrap_or_else(|e| panic!("{e}")));
        std::fs::rename(p.join(STORE_DIR), d.path().join("moved"))
            .unwrap_or_else(|e| panic!("{e}"));
        let e = DataDir::open(&p, 2).err();
        assert!(
            matches!(e, Some(DataDirError::StoreMissing { .. })),
            "{e:?}"
        );
        assert!(!p.join(STORE_DIR).exists(), "must not recreate the store");
    }
}
