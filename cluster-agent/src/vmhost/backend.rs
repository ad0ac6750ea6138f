//! `FencedBackend`: csv-volume's [`FencedDisk`] behind vmm-node's [`DiskBackend`].
//!
//! The disk sits in an `Arc<Mutex<_>>` shared between the virtio slot (which owns the
//! boxed backend) and the VM's disk table, so that after the slot lets the backend go
//! the table can take the `FencedDisk` back and hand it to the csv-volume hooks
//! (`release_on_stop`, `handoff_release`), and so that fencing state can be read while
//! the guest runs.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use csv_volume::FencedDisk;
use vmm_node::disk::DiskBackend;

/// A shared handle on one open fenced disk.
pub type SharedDisk = Arc<Mutex<FencedDisk>>;

/// Locks the disk; a panic elsewhere while holding the lock leaves nothing half-written
/// that matters (every I/O is one positioned syscall), so poisoning is ignored.
pub(crate) fn lock(disk: &SharedDisk) -> MutexGuard<'_, FencedDisk> {
    disk.lock().unwrap_or_else(|e| e.into_inner())
}

/// The adapter the virtio-blk slot holds.
pub struct FencedBackend {
    disk: SharedDisk,
    len_bytes: u64,
    description: String,
}

impl FencedBackend {
    /// Wraps `disk`; its length is fixed at this point (as `DiskBackend` requires).
    pub fn new(disk: SharedDisk) -> Self {
        let (len_bytes, description) = {
            let d = lock(&disk);
            (d.len(), d.describe())
        };
        FencedBackend {
            disk,
            len_bytes,
            description,
        }
    }
}

impl DiskBackend for FencedBackend {
    fn len(&self) -> u64 {
        self.len_bytes
    }

    fn read_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        lock(&self.disk).read_at(buf, off)
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        lock(&self.disk).write_at(buf, off)
    }

    fn flush(&mut self) -> io::Result<()> {
        lock(&self.disk).flush()
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}
