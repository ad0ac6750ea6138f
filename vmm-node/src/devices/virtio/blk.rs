//! virtio-blk over virtio-mmio, with a hot-pluggable backing store.
//!
//! A [`VirtioBlk`] is one fixed *slot*: it always answers as a block device, with
//! capacity 0 while no [`DiskBackend`] is attached. [`VirtioBlk::attach`] and
//! [`VirtioBlk::detach`] change the backing on a running VM and announce it with a
//! configuration-change interrupt and a new configuration generation.
//!
//! Requests are processed synchronously when the guest writes `QueueNotify` (on the
//! vCPU thread that exited), so no request is ever in flight between two calls into the
//! device; [`VirtioBlk::quiesce`] additionally drains chains the guest made available
//! without notifying, before a snapshot.
//!
//! Every guest-supplied value is checked: descriptor count and direction, header and
//! status placement, sector range against capacity, data lengths, guest-memory bounds.
//! A malformed chain completes with `VIRTIO_BLK_S_IOERR` when a status byte can be
//! placed, otherwise it is returned to the guest with a used length of 0.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::mmio::{self, MmioEvent, MmioStateError, MmioTransport, MmioTransportState};
use crate::devices::{IrqLine, MmioDevice};
use crate::disk::{DiskBackend, SECTOR_SIZE_BYTES};
use crate::GuestMem;

/// virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Feature bit: `size_max` (largest data segment) is valid.
pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
/// Feature bit: `seg_max` (most data segments per request) is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Feature bit: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature bit: the device supports `VIRTIO_BLK_T_FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Request type: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error (also every malformed request).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request type.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the `GET_ID` string.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// Queue size offered to the driver.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Longest descriptor chain accepted (also bounds indirect tables).
pub const MAX_CHAIN_DESCRIPTORS: usize = 258;
/// Largest data payload of a single request (bytes).
pub const MAX_REQUEST_DATA_BYTES: u64 = 32 << 20;
/// `seg_max` offered: data descriptors per request (plus header and status this stays
/// within the queue size and `MAX_CHAIN_DESCRIPTORS`).
pub const SEG_MAX: u32 = 126;
/// `size_max` offered: bytes per data descriptor. `SEG_MAX * SIZE_MAX_BYTES` stays
/// within `MAX_REQUEST_DATA_BYTES`, so a driver that honours both never gets `IOERR`
/// for size alone.
pub const SIZE_MAX_BYTES: u32 = 256 << 10;
const _: () = assert!(SEG_MAX as u64 * SIZE_MAX_BYTES as u64 <= MAX_REQUEST_DATA_BYTES);
const _: () = assert!(SEG_MAX as usize + 2 <= MAX_CHAIN_DESCRIPTORS);
/// Size of the request header (`type`, `reserved`, `sector`).
const REQUEST_HEADER_BYTES: u32 = 16;
/// Bounce-buffer chunk between guest memory and the backend.
const CHUNK_BYTES: usize = 64 << 10;
/// Guest-triggered warnings logged per device before rate limiting kicks in.
const GUEST_WARNINGS_LOGGED_MAX: u64 = 16;

/// Features every slot offers; `VIRTIO_BLK_F_RO` is added while a read-only disk is
/// attached.
pub const BASE_FEATURES: u64 =
    mmio::VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX;
const ALL_FEATURES: u64 = BASE_FEATURES | VIRTIO_BLK_F_RO;

/// Errors from the hot-plug and snapshot API.
#[derive(Debug, thiserror::Error)]
pub enum VirtioBlkError {
    /// `attach` on a slot that already has a disk.
    #[error("virtio-blk slot {slot} already holds disk {current}")]
    SlotOccupied {
        /// Slot index.
        slot: u8,
        /// The attached disk's description.
        current: String,
    },
    /// `detach` on an empty slot.
    #[error("virtio-blk slot {slot} holds no disk")]
    SlotEmpty {
        /// Slot index.
        slot: u8,
    },
    /// A disk smaller than one sector.
    #[error("disk {disk} is smaller than one sector and cannot back slot {slot}")]
    DiskTooSmall {
        /// Slot index.
        slot: u8,
        /// The disk's description.
        disk: String,
    },
    /// Flushing before detach failed; the disk stays attached.
    #[error("flushing disk {disk} before detaching it from slot {slot} failed; it stays attached")]
    DetachFlush {
        /// Slot index.
        slot: u8,
        /// The disk's description.
        disk: String,
        /// The backend's error.
        #[source]
        source: std::io::Error,
    },
    /// The saved transport state is inconsistent.
    #[error("saved state of virtio-blk slot {slot} is invalid")]
    State {
        /// Slot index.
        slot: u8,
        /// What was wrong.
        #[source]
        source: MmioStateError,
    },
    /// The saved state has a disk but none was supplied, or the other way round.
    #[error("saved state of virtio-blk slot {slot} {saved} a disk but the restore {supplied} one")]
    BackingPresence {
        /// Slot index.
        slot: u8,
        /// "had" or "had no".
        saved: &'static str,
        /// "supplied" or "supplied no".
        supplied: &'static str,
    },
    /// The supplied disk's size differs from the saved one.
    #[error("disk {disk} for slot {slot} holds {actual_bytes} bytes, the saved state expects {saved_bytes}")]
    BackingSize {
        /// Slot index.
        slot: u8,
        /// The supplied disk's description.
        disk: String,
        /// Saved size.
        saved_bytes: u64,
        /// Supplied size.
        actual_bytes: u64,
    },
    /// The slot index in the saved state is not the one being restored.
    #[error("saved state is for virtio-blk slot {saved}, not slot {slot}")]
    SlotMismatch {
        /// Slot being restored.
        slot: u8,
        /// Slot in the saved state.
        saved: u8,
    },
}

/// Description of the disk backing a slot, as saved in snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotBacking {
    /// `DiskBackend::describe()` (for a raw file: its path).
    pub description: String,
    /// Writes are refused.
    pub read_only: bool,
    /// Size in bytes.
    pub size_bytes: u64,
}

/// Complete device state of one slot (no guest memory, no disk contents).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioBlkState {
    /// Slot index.
    pub slot: u8,
    /// Transport registers and queue.
    pub transport: MmioTransportState,
    /// The attached disk, if any.
    pub backing: Option<SlotBacking>,
}

/// Upper bound of an encoded [`VirtioBlkState`] (the disk description dominates).
pub const STATE_BYTES_MAX: u64 = 64 << 10;

/// Errors decoding a saved slot state.
#[derive(Debug, thiserror::Error)]
pub enum StateDecodeError {
    /// Longer than [`STATE_BYTES_MAX`].
    #[error(
        "virtio-blk slot state is {len_bytes} bytes, more than the {STATE_BYTES_MAX}-byte limit"
    )]
    TooLarge {
        /// Length of the input.
        len_bytes: usize,
    },
    /// Not a bincode `VirtioBlkState`.
    #[error("virtio-blk slot state is malformed")]
    Malformed(#[source] bincode::Error),
}

fn state_codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::options()
        .with_fixint_encoding()
        .with_limit(STATE_BYTES_MAX)
        .reject_trailing_bytes()
}

impl VirtioBlkState {
    /// Encode for a snapshot file or the migration stream (bincode, fixed-width ints).
    pub fn encode(&self) -> Vec<u8> {
        use bincode::Options;
        state_codec()
            .serialize(self)
            .expect("a VirtioBlkState always serializes within the limit")
    }

    /// Decode what [`VirtioBlkState::encode`] produced, refusing oversized or malformed
    /// input. The result is still untrusted: [`VirtioBlk::restore`] validates it.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateDecodeError> {
        use bincode::Options;
        if bytes.len() as u64 > STATE_BYTES_MAX {
            return Err(StateDecodeError::TooLarge {
                len_bytes: bytes.len(),
            });
        }
        state_codec()
            .deserialize(bytes)
            .map_err(StateDecodeError::Malformed)
    }
}

/// Counters a test or the debug binary can read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// Requests completed with `VIRTIO_BLK_S_OK`.
    pub requests_ok: u64,
    /// Requests completed with an error status.
    pub requests_failed: u64,
    /// Chains returned without a status (no place to put one).
    pub chains_skipped: u64,
    /// Bytes read from the backend into guest memory.
    pub read_bytes: u64,
    /// Bytes written from guest memory to the backend.
    pub written_bytes: u64,
    /// Flushes passed to the backend.
    pub flushes: u64,
    /// Register accesses or queue states the specification forbids.
    pub guest_errors: u64,
}

struct Attached {
    disk: Box<dyn DiskBackend>,
    read_only: bool,
    capacity_sectors: u64,
}

/// One virtio-blk slot on the MMIO bus.
pub struct VirtioBlk {
    slot: u8,
    transport: MmioTransport,
    backing: Option<Attached>,
    mem: GuestMem,
    irq: Arc<dyn IrqLine>,
    stats: BlkStats,
    chunk: Vec<u8>,
}

impl std::fmt::Debug for VirtioBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("slot", &self.slot)
            .field("transport", &self.transport)
            .field("backing", &self.backing_description())
            .field("stats", &self.stats)
            .finish()
    }
}

/// Why a chain could not be served; becomes `VIRTIO_BLK_S_IOERR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    ChainTooLong,
    ChainBroken,
    Header,
    Direction,
    DataLength,
    SectorRange,
    GuestMemory,
    NoDisk,
    ReadOnly,
    Backend,
}

impl Fault {
    fn status(self) -> u8 {
        VIRTIO_BLK_S_IOERR
    }
}

/// A descriptor as the device uses it.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    writable: bool,
    has_next: bool,
}

impl From<Descriptor> for Desc {
    fn from(d: Descriptor) -> Self {
        Self {
            addr: d.addr().0,
            len: d.len(),
            writable: d.is_write_only(),
            has_next: d.has_next(),
        }
    }
}

impl VirtioBlk {
    /// An empty slot.
    pub fn new(slot: u8, mem: GuestMem, irq: Arc<dyn IrqLine>) -> Self {
        Self {
            slot,
            transport: MmioTransport::new(VIRTIO_ID_BLOCK, QUEUE_MAX_SIZE)
                .expect("QUEUE_MAX_SIZE is a valid power of two"),
            backing: None,
            mem,
            irq,
            stats: BlkStats::default(),
            chunk: Vec::new(),
        }
    }

    /// The guest memory the device works on.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// The slot's interrupt line.
    pub fn irq(&self) -> Arc<dyn IrqLine> {
        self.irq.clone()
    }

    /// Slot index.
    pub fn slot(&self) -> u8 {
        self.slot
    }

    /// Counters.
    pub fn stats(&self) -> BlkStats {
        self.stats
    }

    /// The transport (status, features, interrupt bits) for inspection.
    pub fn transport(&self) -> &MmioTransport {
        &self.transport
    }

    /// Capacity the guest sees, in 512-byte sectors (0 for an empty slot).
    pub fn capacity_sectors(&self) -> u64 {
        self.backing.as_ref().map_or(0, |a| a.capacity_sectors)
    }

    /// `describe()` of the attached disk.
    pub fn backing_description(&self) -> Option<String> {
        self.backing.as_ref().map(|a| a.disk.describe())
    }

    /// Features offered now.
    pub fn device_features(&self) -> u64 {
        match &self.backing {
            Some(a) if a.read_only => BASE_FEATURES | VIRTIO_BLK_F_RO,
            _ => BASE_FEATURES,
        }
    }

    /// The configuration space (`struct virtio_blk_config` up to `blk_size`, 60 bytes
    /// as in the specification): `capacity` le64 @0, `size_max` le32 @8, `seg_max` le32
    /// @12; the fields of features not offered read as zero.
    fn config_bytes(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX_BYTES.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }

    /// Hot-add: back this slot with `disk`. The guest gets a configuration-change
    /// interrupt and sees the new capacity.
    #[tracing::instrument(skip(self, disk), fields(slot = self.slot, disk = %disk.describe()))]
    pub fn attach(
        &mut self,
        disk: Box<dyn DiskBackend>,
        read_only: bool,
    ) -> Result<(), VirtioBlkError> {
        if let Some(current) = self.backing_description() {
            return Err(VirtioBlkError::SlotOccupied {
                slot: self.slot,
                current,
            });
        }
        let capacity_sectors = disk.len() / SECTOR_SIZE_BYTES;
        if capacity_sectors == 0 {
            return Err(VirtioBlkError::DiskTooSmall {
                slot: self.slot,
                disk: disk.describe(),
            });
        }
        self.backing = Some(Attached {
            disk,
            read_only,
            capacity_sectors,
        });
        self.announce_config_change();
        tracing::info!(capacity_sectors, read_only, "disk attached");
        Ok(())
    }

    /// Hot-remove: flush the disk, empty the slot and return the disk. The guest gets a
    /// configuration-change interrupt and sees capacity 0; later requests fail with
    /// `VIRTIO_BLK_S_IOERR`. If the flush fails the disk stays attached.
    #[tracing::instrument(skip(self), fields(slot = self.slot))]
    pub fn detach(&mut self) -> Result<Box<dyn DiskBackend>, VirtioBlkError> {
        let Some(attached) = self.backing.as_mut() else {
            return Err(VirtioBlkError::SlotEmpty { slot: self.slot });
        };
        attached
            .disk
            .flush()
            .map_err(|source| VirtioBlkError::DetachFlush {
                slot: self.slot,
                disk: attached.disk.describe(),
                source,
            })?;
        let attached = self.backing.take().expect("checked above");
        self.announce_config_change();
        tracing::info!(disk = %attached.disk.describe(), "disk detached");
        Ok(attached.disk)
    }

    fn announce_config_change(&mut self) {
        self.transport.config_changed();
        if self.transport.driver_ok() {
            self.irq.trigger();
        }
    }

    /// Serve every chain the guest has made available (whether or not it notified).
    /// Called by the core after pausing vCPUs and before `save_state`. Returns the
    /// number of chains completed.
    pub fn quiesce(&mut self) -> usize {
        if !self.transport.driver_ok() || !self.transport.queue_mut().ready() {
            return 0;
        }
        self.process_queue()
    }

    /// Snapshot of the slot (call `quiesce` first).
    pub fn save_state(&self) -> VirtioBlkState {
        VirtioBlkState {
            slot: self.slot,
            transport: self.transport.save(),
            backing: self.backing.as_ref().map(|a| SlotBacking {
                description: a.disk.describe(),
                read_only: a.read_only,
                size_bytes: a.disk.len(),
            }),
        }
    }

    /// Rebuild a slot from `state`, on (a copy of) the guest memory it was saved with,
    /// with `disk` reopened by the caller (or `None` for a slot that was empty).
    pub fn restore(
        state: &VirtioBlkState,
        mem: GuestMem,
        irq: Arc<dyn IrqLine>,
        disk: Option<Box<dyn DiskBackend>>,
    ) -> Result<Self, VirtioBlkError> {
        let slot = state.slot;
        let transport = MmioTransport::restore(
            VIRTIO_ID_BLOCK,
            QUEUE_MAX_SIZE,
            ALL_FEATURES,
            &state.transport,
        )
        .map_err(|source| VirtioBlkError::State { slot, source })?;
        let backing = match (&state.backing, disk) {
            (None, None) => None,
            (Some(saved), Some(disk)) => {
                if disk.len() != saved.size_bytes {
                    return Err(VirtioBlkError::BackingSize {
                        slot,
                        disk: disk.describe(),
                        saved_bytes: saved.size_bytes,
                        actual_bytes: disk.len(),
                    });
                }
                let capacity_sectors = disk.len() / SECTOR_SIZE_BYTES;
                if capacity_sectors == 0 {
                    return Err(VirtioBlkError::DiskTooSmall {
                        slot,
                        disk: disk.describe(),
                    });
                }
                Some(Attached {
                    disk,
                    read_only: saved.read_only,
                    capacity_sectors,
                })
            }
            (Some(_), None) => {
                return Err(VirtioBlkError::BackingPresence {
                    slot,
                    saved: "had",
                    supplied: "supplied no",
                })
            }
            (None, Some(_)) => {
                return Err(VirtioBlkError::BackingPresence {
                    slot,
                    saved: "had no",
                    supplied: "supplied",
                })
            }
        };
        Ok(Self {
            slot,
            transport,
            backing,
            mem,
            irq,
            stats: BlkStats::default(),
            chunk: Vec::new(),
        })
    }

    /// Restore `state` into this slot in place (slot index must match), keeping its
    /// memory and IRQ line.
    pub fn restore_in_place(
        &mut self,
        state: &VirtioBlkState,
        disk: Option<Box<dyn DiskBackend>>,
    ) -> Result<(), VirtioBlkError> {
        if state.slot != self.slot {
            return Err(VirtioBlkError::SlotMismatch {
                slot: self.slot,
                saved: state.slot,
            });
        }
        *self = Self::restore(state, self.mem.clone(), self.irq.clone(), disk)?;
        Ok(())
    }

    fn guest_error(&mut self, what: &'static str) {
        self.stats.guest_errors += 1;
        let n = self.stats.guest_errors;
        if n <= GUEST_WARNINGS_LOGGED_MAX || n.is_power_of_two() {
            tracing::warn!(
                slot = self.slot,
                occurrences = n,
                "virtio-blk guest error: {what}"
            );
        }
    }

    /// Pop and serve every available chain; returns how many were completed.
    fn process_queue(&mut self) -> usize {
        let mem = self.mem.clone();
        let mut completions: Vec<(u16, u32)> = Vec::new();
        let iter_result = {
            // Split borrows: the queue iterator borrows the transport, serving borrows
            // the backend and counters.
            let Self {
                transport,
                backing,
                stats,
                chunk,
                ..
            } = self;
            match transport.queue_mut().iter(&mem) {
                Ok(iter) => {
                    for chain in iter {
                        let head = chain.head_index();
                        let mut descs = Vec::new();
                        let mut too_long = false;
                        for d in chain {
                            if descs.len() == MAX_CHAIN_DESCRIPTORS {
                                too_long = true;
                                break;
                            }
                            descs.push(d);
                        }
                        let used_len =
                            serve_chain(&mem, &descs, too_long, backing.as_mut(), stats, chunk);
                        completions.push((head, used_len));
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        if let Err(e) = iter_result {
            // The available index is corrupt (more entries than the queue holds): the
            // driver broke the protocol; stop using the queue until it resets the device.
            self.guest_error("available ring index is invalid");
            tracing::debug!(slot = self.slot, error = %e, "virtqueue unusable");
            self.transport.set_needs_reset();
            self.irq.trigger();
            return 0;
        }
        let mut done = 0;
        let queue_size = self.transport.queue_mut().size();
        for (head, len) in completions {
            if head >= queue_size {
                // Not a descriptor index: there is nothing the driver could recognise.
                self.guest_error("available ring names a descriptor beyond the queue");
                continue;
            }
            if self
                .transport
                .queue_mut()
                .add_used(&mem, head, len)
                .is_err()
            {
                self.guest_error("used ring entry could not be written");
                self.transport.set_needs_reset();
                self.irq.trigger();
                break;
            }
            done += 1;
        }
        if done > 0 {
            self.transport.raise(mmio::INT_VRING);
            self.irq.trigger();
        }
        done
    }
}

/// Serve one chain; returns the used length (bytes written into guest memory).
fn serve_chain(
    mem: &GuestMem,
    descs: &[Descriptor],
    too_long: bool,
    backing: Option<&mut Attached>,
    stats: &mut BlkStats,
    chunk: &mut Vec<u8>,
) -> u32 {
    let descs: Vec<Desc> = descs.iter().copied().map(Desc::from).collect();
    // The status byte goes into the last descriptor; without a writable one there is
    // nowhere to report anything.
    let Some(status_desc) = descs.last().copied().filter(|d| d.writable && d.len >= 1) else {
        stats.chains_skipped += 1;
        return 0;
    };
    let status_addr = GuestAddress(status_desc.addr);
    if !mem.check_range(status_addr, 1, vm_memory::Permissions::Write) {
        stats.chains_skipped += 1;
        return 0;
    }
    let broken = too_long || descs.len() < 2 || last_has_next(&descs);
    let outcome = if broken {
        Err(if too_long {
            Fault::ChainTooLong
        } else {
            Fault::ChainBroken
        })
    } else {
        execute(mem, &descs, backing, stats, chunk)
    };
    let (status, data_len) = match outcome {
        Ok(Served {
            status,
            written_bytes,
        }) => (status, written_bytes),
        Err(fault) => {
            tracing::debug!(?fault, "virtio-blk request failed");
            (fault.status(), 0)
        }
    };
    if status == VIRTIO_BLK_S_OK {
        stats.requests_ok += 1;
    } else {
        stats.requests_failed += 1;
    }
    if mem.write_obj(status, status_addr).is_err() {
        stats.chains_skipped += 1;
        return 0;
    }
    data_len.saturating_add(1)
}

/// The chain iterator stops silently at a loop (after queue-size steps), an index past
/// the table or an unreadable descriptor; the last descriptor it yielded then still
/// says "next", which marks the chain as broken.
fn last_has_next(descs: &[Desc]) -> bool {
    descs.last().is_some_and(|d| d.has_next)
}

struct Served {
    status: u8,
    written_bytes: u32,
}

fn execute(
    mem: &GuestMem,
    descs: &[Desc],
    backing: Option<&mut Attached>,
    stats: &mut BlkStats,
    chunk: &mut Vec<u8>,
) -> Result<Served, Fault> {
    let header = descs[0];
    if header.writable || header.len < REQUEST_HEADER_BYTES {
        return Err(Fault::Header);
    }
    let mut raw = [0u8; REQUEST_HEADER_BYTES as usize];
    mem.read_slice(&mut raw, GuestAddress(header.addr))
        .map_err(|_| Fault::GuestMemory)?;
    let req_type = u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
    let data = &descs[1..descs.len() - 1];
    let ok = Served {
        status: VIRTIO_BLK_S_OK,
        written_bytes: 0,
    };
    match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = req_type == VIRTIO_BLK_T_OUT;
            let attached = backing.ok_or(Fault::NoDisk)?;
            if write && attached.read_only {
                return Err(Fault::ReadOnly);
            }
            let mut total: u64 = 0;
            for d in data {
                // Device-writable buffers for reads, device-readable ones for writes.
                if d.writable == write {
                    return Err(Fault::Direction);
                }
                if !mem.check_range(
                    GuestAddress(d.addr),
                    d.len as usize,
                    vm_memory::Permissions::ReadWrite,
                ) {
                    return Err(Fault::GuestMemory);
                }
                total += u64::from(d.len);
            }
            if total == 0
                || !total.is_multiple_of(SECTOR_SIZE_BYTES)
                || total > MAX_REQUEST_DATA_BYTES
            {
                return Err(Fault::DataLength);
            }
            let end_sector = sector
                .checked_add(total / SECTOR_SIZE_BYTES)
                .ok_or(Fault::SectorRange)?;
            if end_sector > attached.capacity_sectors {
                return Err(Fault::SectorRange);
            }
            if chunk.len() < CHUNK_BYTES {
                chunk.resize(CHUNK_BYTES, 0);
            }
            let mut disk_off = sector * SECTOR_SIZE_BYTES;
            for d in data {
                let mut done: u64 = 0;
                while done < u64::from(d.len) {
                    let n = (u64::from(d.len) - done).min(CHUNK_BYTES as u64) as usize;
                    let buf = &mut chunk[..n];
                    let gaddr = GuestAddress(d.addr + done);
                    if write {
                        mem.read_slice(buf, gaddr).map_err(|_| Fault::GuestMemory)?;
                        attached
                            .disk
                            .write_at(buf, disk_off)
                            .map_err(|_| Fault::Backend)?;
                    } else {
                        attached
                            .disk
                            .read_at(buf, disk_off)
                            .map_err(|_| Fault::Backend)?;
                        mem.write_slice(buf, gaddr)
                            .map_err(|_| Fault::GuestMemory)?;
                    }
                    done += n as u64;
                    disk_off += n as u64;
                }
            }
            if write {
                stats.written_bytes += total;
                Ok(ok)
            } else {
                stats.read_bytes += total;
                Ok(Served {
                    status: VIRTIO_BLK_S_OK,
                    written_bytes: total as u32,
                })
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            let attached = backing.ok_or(Fault::NoDisk)?;
            attached.disk.flush().map_err(|_| Fault::Backend)?;
            stats.flushes += 1;
            Ok(ok)
        }
        VIRTIO_BLK_T_GET_ID => {
            let attached = backing.ok_or(Fault::NoDisk)?;
            let Some(d) = data.first().filter(|d| d.writable) else {
                return Err(Fault::Direction);
            };
            let id = disk_id(&attached.disk.describe());
            let n = (d.len as usize).min(VIRTIO_BLK_ID_BYTES);
            mem.write_slice(&id[..n], GuestAddress(d.addr))
                .map_err(|_| Fault::GuestMemory)?;
            Ok(Served {
                status: VIRTIO_BLK_S_OK,
                written_bytes: n as u32,
            })
        }
        _ => Ok(Served {
            status: VIRTIO_BLK_S_UNSUPP,
            written_bytes: 0,
        }),
    }
}

/// The `GET_ID` string: the last path component of the disk's description, truncated
/// to 20 bytes and zero padded (no terminator when exactly 20 bytes, as the spec allows).
pub fn disk_id(description: &str) -> [u8; VIRTIO_BLK_ID_BYTES] {
    let name = description.rsplit('/').next().unwrap_or(description);
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
    let bytes = name.as_bytes();
    let n = bytes.len().min(VIRTIO_BLK_ID_BYTES);
    id[..n].copy_from_slice(&bytes[..n]);
    id
}

impl MmioDevice for VirtioBlk {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        if let Some(what) = self
            .transport
            .read(offset, data, self.device_features(), &config)
        {
            self.guest_error(what);
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        let features = self.device_features();
        match self.transport.write(offset, data, features, &self.mem) {
            MmioEvent::None => {}
            MmioEvent::Reset => tracing::debug!(slot = self.slot, "virtio-blk reset by the driver"),
            MmioEvent::QueueNotify(_) => {
                self.process_queue();
            }
            MmioEvent::GuestError(what) => self.guest_error(what),
        }
    }
}

#[cfg(test)]
#[path = "blk_tests.rs"]
mod tests;
