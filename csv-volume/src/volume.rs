//! Volumes and the disks on them: real file I/O on a directory every node can reach.
//!
//! A [`VolumeRegistry`] maps volume names to root directories (a cluster file system
//! or NFS mount in production, a temp directory in tests) and resolves
//! [`DiskName`]s (`volume/dir/disk.img`) to files under them. Disks are raw sparse
//! images (`set_len`). Every check that can fail runs before anything on the volume
//! is changed; resolution refuses a symlink anywhere below the volume root, and files
//! are opened with `O_NOFOLLOW`.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::fence::{self, fence_path};
use crate::lock::{DiskLock, LockMode, LockTable, NodeId};
use crate::name::{
    validate_disk_size, validate_volume_name, DiskName, NameError, SizeError, COMPONENTS_MAX,
    FENCE_SUFFIX, FENCE_TMP_MARKER,
};

/// Why a volume or disk operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid name")]
    Name(#[source] NameError),
    #[error("invalid size for disk {name}")]
    Size {
        name: DiskName,
        #[source]
        source: SizeError,
    },
    #[error("volume {volume} is already registered")]
    VolumeExists { volume: String },
    #[error("volume root {root} is not reachable")]
    RootUnreachable {
        root: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("volume root {root} is not a directory")]
    RootNotDirectory { root: PathBuf },
    #[error("no volume named {volume} is registered")]
    UnknownVolume { volume: String },
    #[error("disk {name} already exists")]
    DiskExists { name: DiskName },
    #[error("disk {name} does not exist")]
    DiskNotFound { name: DiskName },
    #[error("disk {name}: {path} is not a regular file")]
    NotAFile { name: DiskName, path: PathBuf },
    #[error("disk {name}: {path} is not a directory")]
    NotADirectory { name: DiskName, path: PathBuf },
    #[error("disk {name}: {path} is a symlink; symlinks are not followed inside a volume")]
    Symlink { name: DiskName, path: PathBuf },
    #[error("disk {name} is {current_bytes} bytes; it can only grow, not to {requested_bytes}")]
    NotLarger {
        name: DiskName,
        current_bytes: u64,
        requested_bytes: u64,
    },
    #[error("disk {name} is locked {} by node(s) {:?}", lock.mode, lock.holders)]
    Locked { name: DiskName, lock: Box<DiskLock> },
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the fence record of disk {name}")]
    Fence {
        name: DiskName,
        #[source]
        source: fence::FenceError,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> VolumeError + 'a {
    move |source| VolumeError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// One volume as written in a node's configuration file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Namespace name, one component (`vol1`).
    pub name: String,
    /// Directory every node reaches at the same or its own local path.
    pub path: PathBuf,
}

/// One registered volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    name: String,
    root: PathBuf,
}

impl Volume {
    /// The volume name (first namespace component).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The canonical root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// A disk as listed: size, space used, and its lock (from the lock table passed in).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiskInfo {
    pub name: DiskName,
    pub path: PathBuf,
    pub size_bytes: u64,
    /// Bytes actually allocated on the volume (sparse images use less).
    pub allocated_bytes: u64,
    pub lock: Option<DiskLock>,
}

impl DiskInfo {
    fn new(name: &DiskName, path: PathBuf, meta: &fs::Metadata, locks: &LockTable) -> Self {
        DiskInfo {
            name: name.clone(),
            path,
            size_bytes: meta.len(),
            allocated_bytes: meta.blocks() * 512,
            lock: locks.lock(name).cloned(),
        }
    }
}

/// Where a name resolves to, after the symlink checks.
struct Resolved {
    path: PathBuf,
    /// Directories between the root and the file that do not exist yet.
    missing_dirs: Vec<PathBuf>,
    exists: bool,
}

/// The set of volumes this node knows, one namespace for all of them.
#[derive(Debug, Clone, Default)]
pub struct VolumeRegistry {
    volumes: BTreeMap<String, Volume>,
}

impl VolumeRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry with every volume of `configs`; the first bad entry is the error.
    pub fn from_config(configs: &[VolumeConfig]) -> Result<Self, VolumeError> {
        let mut reg = Self::new();
        for c in configs {
            reg.register(&c.name, &c.path)?;
        }
        Ok(reg)
    }

    /// Registers volume `name` at directory `root` (must exist; its own path may
    /// contain symlinks, which are resolved once here).
    pub fn register(&mut self, name: &str, root: &Path) -> Result<&Volume, VolumeError> {
        validate_volume_name(name).map_err(VolumeError::Name)?;
        if self.volumes.contains_key(name) {
            return Err(VolumeError::VolumeExists {
                volume: name.into(),
            });
        }
        let canonical = fs::canonicalize(root).map_err(|source| VolumeError::RootUnreachable {
            root: root.to_owned(),
            source,
        })?;
        let meta = fs::metadata(&canonical).map_err(|source| VolumeError::RootUnreachable {
            root: root.to_owned(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(VolumeError::RootNotDirectory {
                root: root.to_owned(),
            });
        }
        tracing::info!(volume = name, root = %canonical.display(), "volume registered");
        Ok(self.volumes.entry(name.to_owned()).or_insert(Volume {
            name: name.to_owned(),
            root: canonical,
        }))
    }

    /// The registered volumes, in name order.
    pub fn volumes(&self) -> impl Iterator<Item = &Volume> {
        self.volumes.values()
    }

    /// The volume `name`.
    pub fn volume(&self, name: &str) -> Result<&Volume, VolumeError> {
        self.volumes
            .get(name)
            .ok_or_else(|| VolumeError::UnknownVolume {
                volume: name.into(),
            })
    }

    fn resolve(&self, name: &DiskName) -> Result<Resolved, VolumeError> {
        let volume = self.volume(name.volume())?;
        let mut path = volume.root.clone();
        let mut missing_dirs = Vec::new();
        let components: Vec<&str> = name.relative_path().split('/').collect();
        let last = components.len() - 1;
        for (i, component) in components.iter().enumerate() {
            path.push(component);
            if !missing_dirs.is_empty() {
                if i < last {
                    missing_dirs.push(path.clone());
                }
                continue;
            }
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(VolumeError::Symlink {
                        name: name.clone(),
                        path,
                    })
                }
                Ok(meta) if i < last && !meta.is_dir() => {
                    return Err(VolumeError::NotADirectory {
                        name: name.clone(),
                        path,
                    })
                }
                Ok(meta) if i == last && !meta.is_file() => {
                    return Err(VolumeError::NotAFile {
                        name: name.clone(),
                        path,
                    })
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if i < last {
                        missing_dirs.push(path.clone());
                    } else {
                        return Ok(Resolved {
                            path,
                            missing_dirs,
                            exists: false,
                        });
                    }
                }
                Err(e) => return Err(io_err("inspect", &path)(e)),
            }
        }
        let exists = missing_dirs.is_empty();
        Ok(Resolved {
            path,
            missing_dirs,
            exists,
        })
    }

    /// The path of an existing disk image, after the symlink checks.
    pub fn disk_path(&self, name: &DiskName) -> Result<PathBuf, VolumeError> {
        let r = self.resolve(name)?;
        if !r.exists {
            return Err(VolumeError::DiskNotFound { name: name.clone() });
        }
        Ok(r.path)
    }

    /// Creates a sparse raw image of `size_bytes`, making missing directories.
    /// Refuses to replace an existing disk.
    pub fn create_disk(&self, name: &DiskName, size_bytes: u64) -> Result<DiskInfo, VolumeError> {
        validate_disk_size(size_bytes).map_err(|source| VolumeError::Size {
            name: name.clone(),
            source,
        })?;
        let r = self.resolve(name)?;
        if r.exists {
            return Err(VolumeError::DiskExists { name: name.clone() });
        }
        let mut made = Vec::new();
        let result = (|| {
            for dir in &r.missing_dirs {
                match fs::create_dir(dir) {
                    Ok(()) => made.push(dir.clone()),
                    // Another node made it meanwhile: fine if it is a real directory.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        let meta = fs::symlink_metadata(dir).map_err(io_err("inspect", dir))?;
                        if meta.file_type().is_symlink() {
                            return Err(VolumeError::Symlink {
                                name: name.clone(),
                                path: dir.clone(),
                            });
                        }
                        if !meta.is_dir() {
                            return Err(VolumeError::NotADirectory {
                                name: name.clone(),
                                path: dir.clone(),
                            });
                        }
                    }
                    Err(e) => return Err(io_err("create directory", dir)(e)),
                }
            }
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&r.path)
                .map_err(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        VolumeError::DiskExists { name: name.clone() }
                    } else {
                        io_err("create", &r.path)(e)
                    }
                })?;
            // From here on the file is ours to remove on failure.
            let sized = file
                .set_len(size_bytes)
                .and_then(|()| file.sync_all())
                .map_err(io_err("size", &r.path));
            if let Err(e) = sized {
                let _ = fs::remove_file(&r.path);
                return Err(e);
            }
            fence::sync_parent(&r.path).map_err(|source| VolumeError::Fence {
                name: name.clone(),
                source,
            })?;
            file.metadata().map_err(io_err("stat", &r.path))
        })();
        match result {
            Ok(meta) => {
                tracing::info!(disk = %name, size_bytes, "disk created");
                Ok(DiskInfo::new(name, r.path, &meta, &LockTable::new()))
            }
            Err(e) => {
                for dir in made.iter().rev() {
                    let _ = fs::remove_dir(dir);
                }
                Err(e)
            }
        }
    }

    /// Grows a disk to `new_size_bytes`. Refused while any node other than `node`
    /// holds it, or while it is held shared (readers expect it not to change).
    pub fn grow_disk(
        &self,
        name: &DiskName,
        new_size_bytes: u64,
        node: NodeId,
        locks: &LockTable,
    ) -> Result<DiskInfo, VolumeError> {
        validate_disk_size(new_size_bytes).map_err(|source| VolumeError::Size {
            name: name.clone(),
            source,
        })?;
        if let Some(lock) = locks.lock(name) {
            if !(lock.mode == LockMode::Exclusive && lock.holders.contains(&node)) {
                return Err(VolumeError::Locked {
                    name: name.clone(),
                    lock: Box::new(lock.clone()),
                });
            }
        }
        let path = self.disk_path(name)?;
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let current_bytes = file.metadata().map_err(io_err("stat", &path))?.len();
        if new_size_bytes <= current_bytes {
            return Err(VolumeError::NotLarger {
                name: name.clone(),
                current_bytes,
                requested_bytes: new_size_bytes,
            });
        }
        file.set_len(new_size_bytes)
            .and_then(|()| file.sync_all())
            .map_err(io_err("grow", &path))?;
        let meta = file.metadata().map_err(io_err("stat", &path))?;
        tracing::info!(disk = %name, current_bytes, new_size_bytes, "disk grown");
        Ok(DiskInfo::new(name, path, &meta, locks))
    }

    /// Deletes a disk and its fence record. Refused while the disk is locked.
    pub fn delete_disk(&self, name: &DiskName, locks: &LockTable) -> Result<(), VolumeError> {
        if let Some(lock) = locks.lock(name) {
            return Err(VolumeError::Locked {
                name: name.clone(),
                lock: Box::new(lock.clone()),
            });
        }
        let path = self.disk_path(name)?;
        fs::remove_file(&path).map_err(io_err("delete", &path))?;
        let fence = fence_path(&path);
        match fs::remove_file(&fence) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("delete", &fence)(e)),
        }
        fence::sync_parent(&path).map_err(|source| VolumeError::Fence {
            name: name.clone(),
            source,
        })?;
        tracing::info!(disk = %name, "disk deleted");
        Ok(())
    }

    /// Every disk on every volume, in name order, with its lock from `locks`.
    /// Fence records, temporaries, symlinks and files whose names are not valid disk
    /// names are skipped.
    pub fn list(&self, locks: &LockTable) -> Result<Vec<DiskInfo>, VolumeError> {
        let mut out = Vec::new();
        for volume in self.volumes.values() {
            walk(&volume.root, &volume.name, 1, locks, &mut out)?;
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// One disk, with its lock from `locks`.
    pub fn info(&self, name: &DiskName, locks: &LockTable) -> Result<DiskInfo, VolumeError> {
        let path = self.disk_path(name)?;
        let meta = fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
        Ok(DiskInfo::new(name, path, &meta, locks))
    }
}

fn walk(
    dir: &Path,
    prefix: &str,
    depth: usize,
    locks: &LockTable,
    out: &mut Vec<DiskInfo>,
) -> Result<(), VolumeError> {
    if depth >= COMPONENTS_MAX {
        return Ok(());
    }
    let entries = fs::read_dir(dir).map_err(io_err("list", dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        let Some(file_name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
        let full = format!("{prefix}/{file_name}");
        if meta.is_dir() {
            walk(&path, &full, depth + 1, locks, out)?;
        } else if meta.is_file()
            && !file_name.ends_with(FENCE_SUFFIX)
            && !file_name.contains(FENCE_TMP_MARKER)
        {
            let Ok(name) = DiskName::parse(&full) else {
                tracing::debug!(path = %path.display(), "skipping file with an invalid disk name");
                continue;
            };
            out.push(DiskInfo::new(&name, path, &meta, locks));
        }
    }
    Ok(())
}
