//! Fence records: the on-volume copy of a disk's current fencing token.
//!
//! Beside each disk `d.img` lives `d.img.fence`, a 36-byte record naming the lock
//! epoch (token, owner node, mode, term) that may currently use the disk. The node
//! that was granted the lock writes it **atomically** (write a temp file, fsync,
//! rename over the record, fsync the directory), so a reader sees either the old or
//! the new record, never a torn one, and records are **never modified in place**: a
//! new record is always a new inode.
//!
//! [`FenceWatch`] turns that into a cheap per-write check: it keeps the record it
//! last read *open* (so its inode number cannot be reused) and on each check does a
//! single `stat` of the record path; only when the (device, inode) pair differs does
//! it re-read and decode the record.
//!
//! Layout (little-endian):
//! ```text
//! 0  magic "CSVF"   4  version u16   6  mode u8   7  reserved u8 (0)
//! 8  token u64      16 node u64      24 term u64  32 crc32 of bytes 0..32
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::lock::{FencingToken, LockGrant, LockMode, NodeId};
use crate::name::{FENCE_SUFFIX, FENCE_TMP_MARKER};

/// Size of an encoded record.
pub const FENCE_RECORD_LEN_BYTES: usize = 36;
/// Most bytes the decoder will ever read from a record file.
pub const FENCE_READ_LIMIT_BYTES: u64 = 64;
const MAGIC: [u8; 4] = *b"CSVF";
const VERSION: u16 = 1;

/// The contents of a fence record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceRecord {
    pub token: FencingToken,
    pub node: NodeId,
    pub mode: LockMode,
    pub term: u64,
}

impl From<&LockGrant> for FenceRecord {
    fn from(g: &LockGrant) -> Self {
        FenceRecord {
            token: g.token,
            node: g.node,
            mode: g.mode,
            term: g.term,
        }
    }
}

/// Why a fence record could not be read, decoded or written.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("cannot {op} fence record {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("fence record {path} is missing")]
    Missing { path: PathBuf },
    #[error("fence record is {len_bytes} bytes, expected {FENCE_RECORD_LEN_BYTES}")]
    BadLength { len_bytes: usize },
    #[error("fence record has bad magic {found:02x?}")]
    BadMagic { found: [u8; 4] },
    #[error("fence record version {version} is not supported (this build reads {VERSION})")]
    UnsupportedVersion { version: u16 },
    #[error("fence record has unknown mode byte {byte}")]
    BadMode { byte: u8 },
    #[error("fence record checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum { stored: u32, computed: u32 },
    #[error("fence record {path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: Box<FenceError>,
    },
    #[error("refusing to write token {writing} over newer token {current} in {path}")]
    WouldRollBack {
        path: PathBuf,
        writing: FencingToken,
        current: FencingToken,
    },
    #[error("token {token} in {path} already belongs to node {recorded_node} ({recorded_mode}), not node {node} ({mode})")]
    EpochConflict {
        path: PathBuf,
        token: FencingToken,
        node: NodeId,
        mode: LockMode,
        recorded_node: NodeId,
        recorded_mode: LockMode,
    },
}

impl FenceRecord {
    /// Encodes the record with its checksum.
    pub fn encode(&self) -> [u8; FENCE_RECORD_LEN_BYTES] {
        let mut b = [0u8; FENCE_RECORD_LEN_BYTES];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6] = match self.mode {
            LockMode::Exclusive => 1,
            LockMode::Shared => 2,
        };
        b[8..16].copy_from_slice(&self.token.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.node.to_le_bytes());
        b[24..32].copy_from_slice(&self.term.to_le_bytes());
        let crc = crc32fast::hash(&b[..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a record; any byte string is safe to pass.
    pub fn decode(bytes: &[u8]) -> Result<Self, FenceError> {
        let b: &[u8; FENCE_RECORD_LEN_BYTES] =
            bytes.try_into().map_err(|_| FenceError::BadLength {
                len_bytes: bytes.len(),
            })?;
        let u64_at = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(FenceError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(FenceError::UnsupportedVersion { version });
        }
        let stored = u32::from_le_bytes([b[32], b[33], b[34], b[35]]);
        let computed = crc32fast::hash(&b[..32]);
        if stored != computed {
            return Err(FenceError::BadChecksum { stored, computed });
        }
        let mode = match b[6] {
            1 => LockMode::Exclusive,
            2 => LockMode::Shared,
            byte => return Err(FenceError::BadMode { byte }),
        };
        Ok(FenceRecord {
            token: FencingToken(u64_at(8)),
            node: u64_at(16),
            mode,
            term: u64_at(24),
        })
    }
}

/// The fence record path for a disk image path (`d.img` → `d.img.fence`).
pub fn fence_path(disk_path: &Path) -> PathBuf {
    let mut s = disk_path.as_os_str().to_owned();
    s.push(FENCE_SUFFIX);
    PathBuf::from(s)
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FenceError + 'a {
    move |source| FenceError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn open_record(path: &Path) -> Result<Option<File>, FenceError> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("open", path)(e)),
    }
}

fn read_open_record(file: &File, path: &Path) -> Result<FenceRecord, FenceError> {
    let mut buf = Vec::with_capacity(FENCE_RECORD_LEN_BYTES);
    file.take(FENCE_READ_LIMIT_BYTES)
        .read_to_end(&mut buf)
        .map_err(io_err("read", path))?;
    FenceRecord::decode(&buf).map_err(|e| FenceError::Corrupt {
        path: path.to_owned(),
        source: Box::new(e),
    })
}

/// Reads the fence record of the disk at `disk_path`; `None` if there is none yet.
pub fn read_fence_record(disk_path: &Path) -> Result<Option<FenceRecord>, FenceError> {
    let path = fence_path(disk_path);
    match open_record(&path)? {
        Some(f) => read_open_record(&f, &path).map(Some),
        None => Ok(None),
    }
}

/// Whether `record` must be written: `false` when the current record names the same
/// epoch; an error when it would roll a newer record back or conflict with its epoch.
fn needs_writing(disk_path: &Path, record: &FenceRecord) -> Result<bool, FenceError> {
    let path = fence_path(disk_path);
    if let Some(current) = read_fence_record(disk_path)? {
        if current.token > record.token {
            return Err(FenceError::WouldRollBack {
                path,
                writing: record.token,
                current: current.token,
            });
        }
        if current.token == record.token {
            let same_epoch = current.mode == record.mode
                && (record.mode == LockMode::Shared || current.node == record.node);
            if same_epoch {
                return Ok(false);
            }
            return Err(FenceError::EpochConflict {
                path,
                token: record.token,
                node: record.node,
                mode: record.mode,
                recorded_node: current.node,
                recorded_mode: current.mode,
            });
        }
    }
    Ok(true)
}

/// Atomically installs `record` as the fence record of the disk at `disk_path`.
///
/// Never rolls a record back: an existing record with a newer token is an error. The
/// same token is accepted again when it names the same epoch (idempotent retries, and
/// further readers of one shared epoch); the record is then left as it is.
///
/// Returns `true` when a new record was written.
pub fn write_fence_record(disk_path: &Path, record: &FenceRecord) -> Result<bool, FenceError> {
    let path = fence_path(disk_path);
    if !needs_writing(disk_path, record)? {
        return Ok(false);
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(
        "{}.{}.{}",
        &FENCE_TMP_MARKER[FENCE_SUFFIX.len()..],
        record.node,
        std::process::id()
    ));
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        write_new_synced(&tmp, record)?;
        fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
        sync_parent(&path)
    })();
    if result.is_err() {
        // Best effort: do not leave a half-made temporary behind.
        let _ = fs::remove_file(&tmp);
    }
    result?;
    tracing::info!(
        path = %path.display(),
        token = record.token.0,
        node = record.node,
        mode = %record.mode,
        "fence record written"
    );
    Ok(true)
}

/// Creates `path` (it must not exist; no symlink followed) holding `record`, fsynced.
fn write_new_synced(path: &Path, record: &FenceRecord) -> Result<(), FenceError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("create temporary", path))?;
    f.write_all(&record.encode())
        .map_err(io_err("write temporary", path))?;
    f.sync_all().map_err(io_err("sync temporary", path))
}

/// Where [`stage_fence_record`] keeps `record` for the disk at `disk_path` until it is
/// installed: beside the record, named by its token and node (a fence temporary, so
/// volume listings skip it).
pub fn staged_path(disk_path: &Path, record: &FenceRecord) -> PathBuf {
    let mut s = fence_path(disk_path).into_os_string();
    s.push(format!(
        "{}.staged.{}.{}",
        &FENCE_TMP_MARKER[FENCE_SUFFIX.len()..],
        record.token.0,
        record.node
    ));
    PathBuf::from(s)
}

/// Staged handoff, before the source pauses: writes `record` (the reserved epoch) durably
/// beside the current record without installing it, so that installing it later is one
/// rename ([`install_fence_record`]). Refused like [`write_fence_record`] when it would roll
/// a newer record back; nothing is staged when the current record already names this
/// epoch.
pub fn stage_fence_record(disk_path: &Path, record: &FenceRecord) -> Result<(), FenceError> {
    if !needs_writing(disk_path, record)? {
        return Ok(());
    }
    let staged = staged_path(disk_path, record);
    match fs::remove_file(&staged) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove stale staged record", &staged)(e)),
    }
    let result = write_new_synced(&staged, record);
    if result.is_err() {
        let _ = fs::remove_file(&staged);
    }
    result
}

/// Installs `record` for the disk at `disk_path`: by renaming the copy
/// [`stage_fence_record`] left (it must hold exactly this record), or, without one, as
/// [`write_fence_record`] does. Never rolls a newer record back. With a staged copy the
/// rename is visible at once but made durable only by [`sync_record_dir`] (the caller's
/// choice: a staged handoff's target syncs after its VM resumed, when the old holder has
/// long closed the disk). Returns `true` when a record was installed.
pub fn install_fence_record(disk_path: &Path, record: &FenceRecord) -> Result<bool, FenceError> {
    let staged = staged_path(disk_path, record);
    let Some(f) = open_record(&staged)? else {
        return write_fence_record(disk_path, record);
    };
    let matches = read_open_record(&f, &staged).is_ok_and(|r| r == *record);
    drop(f);
    if !matches || !needs_writing(disk_path, record)? {
        let _ = fs::remove_file(&staged);
        if !matches {
            return write_fence_record(disk_path, record);
        }
        return Ok(false);
    }
    let path = fence_path(disk_path);
    fs::rename(&staged, &path).map_err(io_err("rename staged record into place", &path))?;
    tracing::info!(
        path = %path.display(),
        token = record.token.0,
        node = record.node,
        "staged fence record installed"
    );
    Ok(true)
}

/// Drops a record staged for `record` (a migration that ended before it was installed).
pub fn discard_staged_record(disk_path: &Path, record: &FenceRecord) {
    let _ = fs::remove_file(staged_path(disk_path, record));
}

/// Makes an installed record's rename durable (fsync of its directory).
pub fn sync_record_dir(disk_path: &Path) -> Result<(), FenceError> {
    sync_parent(&fence_path(disk_path))
}

/// fsyncs the directory holding `path`, making a rename or unlink durable.
pub(crate) fn sync_parent(path: &Path) -> Result<(), FenceError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory of", path))
}

/// A cached view of one fence record, cheap to re-check. See the module docs.
#[derive(Debug)]
pub struct FenceWatch {
    path: PathBuf,
    /// Keeps the inode of `record` alive so its number cannot be reused.
    _pinned: File,
    dev: u64,
    ino: u64,
    record: FenceRecord,
}

impl FenceWatch {
    /// Reads the record of the disk at `disk_path`; a missing record is an error.
    pub fn open(disk_path: &Path) -> Result<Self, FenceError> {
        let path = fence_path(disk_path);
        let (file, record) = Self::load(&path)?;
        let meta = file.metadata().map_err(io_err("stat", &path))?;
        Ok(FenceWatch {
            dev: meta.dev(),
            ino: meta.ino(),
            path,
            _pinned: file,
            record,
        })
    }

    fn load(path: &Path) -> Result<(File, FenceRecord), FenceError> {
        let file = open_record(path)?.ok_or_else(|| FenceError::Missing {
            path: path.to_owned(),
        })?;
        let record = read_open_record(&file, path)?;
        Ok((file, record))
    }

    /// The record as of the last check.
    pub fn cached(&self) -> FenceRecord {
        self.record
    }

    /// The record path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the current record: one `stat`, plus a re-read when it was replaced.
    pub fn current(&mut self) -> Result<FenceRecord, FenceError> {
        let meta = match fs::symlink_metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(FenceError::Missing {
                    path: self.path.clone(),
                })
            }
            Err(e) => return Err(io_err("stat", &self.path)(e)),
        };
        if meta.dev() == self.dev && meta.ino() == self.ino {
            return Ok(self.record);
        }
        let (file, record) = Self::load(&self.path)?;
        let pinned = file.metadata().map_err(io_err("stat", &self.path))?;
        self.dev = pinned.dev();
        self.ino = pinned.ino();
        self._pinned = file;
        self.record = record;
        tracing::debug!(path = %self.path.display(), token = record.token.0, "fence record changed");
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(token: u64, node: NodeId, mode: LockMode) -> FenceRecord {
        FenceRecord {
            token: FencingToken(token),
            node,
            mode,
            term: 3,
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let r = rec(u64::MAX - 1, 42, LockMode::Shared);
        assert_eq!(FenceRecord::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn decoder_refuses_damage() {
        let good = rec(7, 1, LockMode::Exclusive).encode();
        assert!(matches!(
            FenceRecord::decode(&good[..35]),
            Err(FenceError::BadLength { len_bytes: 35 })
        ));
        assert!(matches!(
            FenceRecord::decode(&[0u8; 100]),
            Err(FenceError::BadLength { .. })
        ));
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            FenceRecord::decode(&b),
            Err(FenceError::BadMagic { .. })
        ));
        let mut b = good;
        b[4] = 9;
        assert!(matches!(
            FenceRecord::decode(&b),
            Err(FenceError::UnsupportedVersion { version: 9 })
        ));
        let mut b = good;
        b[10] ^= 1;
        assert!(matches!(
            FenceRecord::decode(&b),
            Err(FenceError::BadChecksum { .. })
        ));
    }

    #[test]
    fn write_is_monotonic_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        assert_eq!(read_fence_record(&disk).unwrap(), None);
        assert!(write_fence_record(&disk, &rec(5, 1, LockMode::Exclusive)).unwrap());
        assert!(!write_fence_record(&disk, &rec(5, 1, LockMode::Exclusive)).unwrap());
        let err = write_fence_record(&disk, &rec(4, 2, LockMode::Exclusive)).unwrap_err();
        assert!(matches!(err, FenceError::WouldRollBack { .. }), "{err}");
        let err = write_fence_record(&disk, &rec(5, 2, LockMode::Exclusive)).unwrap_err();
        assert!(matches!(err, FenceError::EpochConflict { .. }), "{err}");
        assert_eq!(
            read_fence_record(&disk).unwrap(),
            Some(rec(5, 1, LockMode::Exclusive))
        );
        assert!(write_fence_record(&disk, &rec(9, 2, LockMode::Shared)).unwrap());
        assert!(!write_fence_record(&disk, &rec(9, 3, LockMode::Shared)).unwrap());
        // No temporaries left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("d.img.fence")]);
    }

    #[test]
    fn watch_sees_replacement_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        write_fence_record(&disk, &rec(5, 1, LockMode::Exclusive)).unwrap();
        let mut w = FenceWatch::open(&disk).unwrap();
        assert_eq!(w.current().unwrap().token, FencingToken(5));
        // Many replacements: each one must be seen even if inode numbers get reused.
        for t in 6..40 {
            write_fence_record(&disk, &rec(t, 2, LockMode::Exclusive)).unwrap();
            assert_eq!(w.current().unwrap().token, FencingToken(t));
        }
        fs::remove_file(fence_path(&disk)).unwrap();
        assert!(matches!(w.current(), Err(FenceError::Missing { .. })));
    }

    #[test]
    fn corrupt_record_is_reported_with_path() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        fs::write(fence_path(&disk), b"garbage").unwrap();
        let err = read_fence_record(&disk).unwrap_err();
        assert!(err.to_string().contains("d.img.fence"), "{err}");
        assert!(matches!(err, FenceError::Corrupt { .. }));
        // Writing over a corrupt record is refused too: a person must look at it.
        assert!(write_fence_record(&disk, &rec(1, 1, LockMode::Exclusive)).is_err());
    }
}
