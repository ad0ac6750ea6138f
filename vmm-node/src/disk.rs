//! Disk backends for virtio-blk slots.
//!
//! A [`DiskBackend`] is a byte-addressed, fixed-size store. [`RawFileDisk`] is a raw image
//! file accessed with positioned reads and writes (`pread`/`pwrite` through std's
//! [`FileExt`]); `flush` is `fdatasync` (`File::sync_data`). The cluster agent later wraps
//! csv-volume's fenced disks in the same trait.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Bytes per virtio-blk sector (fixed by the virtio specification).
pub const SECTOR_SIZE_BYTES: u64 = 512;

/// A fixed-size, byte-addressed block store behind a virtio-blk slot.
pub trait DiskBackend: Send {
    /// Size in bytes. Constant for the life of the backend.
    fn len(&self) -> u64;
    /// True when the backend holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill `buf` from byte offset `off`; the whole range must lie inside `len()`.
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Write all of `buf` at byte offset `off`; the whole range must lie inside `len()`.
    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Human-readable identity of the backing store (for a file: its path).
    fn describe(&self) -> String;
}

impl std::fmt::Debug for dyn DiskBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskBackend")
            .field("describe", &self.describe())
            .field("len", &self.len())
            .finish()
    }
}

/// Errors opening a disk backend.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image file could not be opened.
    #[error("cannot open disk image {path}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The image file's size could not be read.
    #[error("cannot read the size of disk image {path}")]
    Metadata {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The image is not a regular file.
    #[error("disk image {path} is not a regular file")]
    NotAFile {
        /// The image path.
        path: PathBuf,
    },
    /// The image is smaller than one sector, so the guest would see no usable block.
    #[error(
        "disk image {path} holds {len_bytes} bytes, less than one {SECTOR_SIZE_BYTES}-byte sector"
    )]
    TooSmall {
        /// The image path.
        path: PathBuf,
        /// Its size.
        len_bytes: u64,
    },
}

/// A raw disk image file (no format, byte `n` of the file is byte `n` of the disk).
#[derive(Debug)]
pub struct RawFileDisk {
    file: File,
    path: PathBuf,
    len_bytes: u64,
}

impl RawFileDisk {
    /// Open an existing image. `read_only` opens it without write permission, so even a
    /// device bug cannot modify it. The file is opened with `O_CLOEXEC` (std's default).
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self, DiskError> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| DiskError::Open {
                path: path.clone(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| DiskError::Metadata {
            path: path.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(DiskError::NotAFile { path });
        }
        let len_bytes = meta.len();
        if len_bytes < SECTOR_SIZE_BYTES {
            return Err(DiskError::TooSmall { path, len_bytes });
        }
        Ok(Self {
            file,
            path,
            len_bytes,
        })
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_range(&self, len: usize, off: u64) -> io::Result<()> {
        let end = off.checked_add(len as u64);
        match end {
            Some(end) if end <= self.len_bytes => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {off}+{len} lies beyond the end of {} ({} bytes)",
                    self.path.display(),
                    self.len_bytes
                ),
            )),
        }
    }
}

impl DiskBackend for RawFileDisk {
    fn len(&self) -> u64 {
        self.len_bytes
    }

    fn read_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.check_range(buf.len(), off)?;
        self.file.read_exact_at(buf, off)
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        self.check_range(buf.len(), off)?;
        self.file.write_all_at(buf, off)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        f
    }

    #[test]
    fn raw_file_round_trip_and_bounds() {
        let img = image(4096);
        let mut d = RawFileDisk::open(img.path(), false).unwrap();
        assert_eq!(d.len(), 4096);
        d.write_at(&[7u8; 512], 1024).unwrap();
        d.flush().unwrap();
        let mut buf = [0u8; 512];
        d.read_at(&mut buf, 1024).unwrap();
        assert_eq!(buf, [7u8; 512]);
        let on_disk = std::fs::read(img.path()).unwrap();
        assert_eq!(&on_disk[1024..1536], &[7u8; 512]);
        let err = d.read_at(&mut buf, 4000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = d.write_at(&buf, u64::MAX - 10).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(d.describe(), img.path().display().to_string());
    }

    #[test]
    fn read_only_open_refuses_writes() {
        let img = image(4096);
        let mut d = RawFileDisk::open(img.path(), true).unwrap();
        assert!(d.write_at(&[1u8; 512], 0).is_err());
        let on_disk = std::fs::read(img.path()).unwrap();
        assert!(on_disk.iter().all(|b| *b == 0));
    }

    #[test]
    fn open_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.img");
        let err = RawFileDisk::open(&missing, false).unwrap_err();
        assert!(matches!(err, DiskError::Open { .. }), "{err}");
        assert!(err.to_string().contains("missing.img"));
        let err = RawFileDisk::open(dir.path(), true).unwrap_err();
        assert!(matches!(err, DiskError::NotAFile { .. }), "{err}");
        let small = image(100);
        let err = RawFileDisk::open(small.path(), false).unwrap_err();
        assert!(
            matches!(err, DiskError::TooSmall { len_bytes: 100, .. }),
            "{err}"
        );
    }
}
