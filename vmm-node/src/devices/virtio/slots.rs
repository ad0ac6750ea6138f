//! All virtio-blk slots of one VM as a unit: what the VM core creates, puts on its MMIO
//! bus, snapshots and restores, and what hot-plug and the migration storage handoff go
//! through.

use std::sync::{Arc, Mutex, MutexGuard};

use super::blk::{SlotBacking, StateDecodeError, VirtioBlk, VirtioBlkError, VirtioBlkState};
use super::{slot_irq, slot_mmio_base, SLOT_MMIO_SIZE_BYTES, VIRTIO_BLK_SLOTS};
use crate::devices::{IrqLine, MmioDevice};
use crate::disk::DiskBackend;
use crate::GuestMem;

/// Errors of the slot set.
#[derive(Debug, thiserror::Error)]
pub enum SlotsError {
    /// A slot number outside `0..VIRTIO_BLK_SLOTS`.
    #[error("virtio-blk slot {slot} does not exist (slots are 0..{VIRTIO_BLK_SLOTS})")]
    NoSuchSlot {
        /// The slot asked for.
        slot: usize,
    },
    /// The interrupt line of a slot could not be created.
    #[error("cannot create the interrupt line (GSI {gsi}) of virtio-blk slot {slot}")]
    Irq {
        /// Slot.
        slot: usize,
        /// Its GSI.
        gsi: u32,
        /// The VMM's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A slot operation failed.
    #[error(transparent)]
    Slot(#[from] VirtioBlkError),
    /// A saved slot state could not be decoded.
    #[error("saved state of virtio-blk slot {slot} cannot be decoded")]
    Decode {
        /// Slot.
        slot: usize,
        /// The decoder's error.
        #[source]
        source: StateDecodeError,
    },
    /// Restore was given a state list that does not cover every slot exactly once.
    #[error(
        "saved virtio-blk state lists slots {saved:?}, expected each of 0..{VIRTIO_BLK_SLOTS} once"
    )]
    SlotList {
        /// Slots listed.
        saved: Vec<u8>,
    },
    /// The caller's opener could not open the disk a saved slot had.
    #[error("cannot reopen disk {disk} for virtio-blk slot {slot}")]
    Open {
        /// Slot.
        slot: usize,
        /// The saved description (path).
        disk: String,
        /// The opener's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The `VIRTIO_BLK_SLOTS` block slots of a VM.
pub struct BlkSlots {
    slots: Vec<Arc<Mutex<VirtioBlk>>>,
}

impl std::fmt::Debug for BlkSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries((0..self.slots.len()).map(|i| self.lock(i).backing_description()))
            .finish()
    }
}

/// Saved state of one slot as the snapshot carries it: slot number + encoded state.
pub type EncodedSlotState = (u8, Vec<u8>);

/// A disk taken out of a slot, with the slot number.
pub type DetachedDisk = (u8, Box<dyn DiskBackend>);

impl BlkSlots {
    /// Create every slot empty. `irq_for(gsi)` supplies slot `i`'s interrupt line
    /// (`slot_irq(i)`), e.g. `|gsi| vm.irq_line(gsi)`.
    pub fn new<E>(
        mem: &GuestMem,
        mut irq_for: impl FnMut(u32) -> Result<Arc<dyn IrqLine>, E>,
    ) -> Result<Self, SlotsError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut slots = Vec::with_capacity(VIRTIO_BLK_SLOTS);
        for slot in 0..VIRTIO_BLK_SLOTS {
            let gsi = slot_irq(slot);
            let irq = irq_for(gsi).map_err(|e| SlotsError::Irq {
                slot,
                gsi,
                source: Box::new(e),
            })?;
            slots.push(Arc::new(Mutex::new(VirtioBlk::new(
                slot as u8,
                mem.clone(),
                irq,
            ))));
        }
        Ok(Self { slots })
    }

    /// `(base, len, device)` of every slot, for the MMIO bus.
    pub fn bus_devices(&self) -> impl Iterator<Item = (u64, u64, Arc<Mutex<dyn MmioDevice>>)> + '_ {
        self.slots.iter().enumerate().map(|(i, s)| {
            let dev: Arc<Mutex<dyn MmioDevice>> = s.clone();
            (slot_mmio_base(i), SLOT_MMIO_SIZE_BYTES, dev)
        })
    }

    /// The device of slot `slot` (shared with the MMIO bus).
    pub fn slot(&self, slot: usize) -> Result<&Arc<Mutex<VirtioBlk>>, SlotsError> {
        self.slots.get(slot).ok_or(SlotsError::NoSuchSlot { slot })
    }

    fn lock(&self, slot: usize) -> MutexGuard<'_, VirtioBlk> {
        // A vCPU thread that panicked while holding the lock left the device in a
        // consistent register state (no request spans a lock release), so go on.
        self.slots[slot].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hot-add `disk` into `slot` (see [`VirtioBlk::attach`]).
    pub fn attach(
        &self,
        slot: usize,
        disk: Box<dyn DiskBackend>,
        read_only: bool,
    ) -> Result<(), SlotsError> {
        self.slot(slot)?;
        Ok(self.lock(slot).attach(disk, read_only)?)
    }

    /// Hot-remove the disk of `slot` (flushes; see [`VirtioBlk::detach`]).
    pub fn detach(&self, slot: usize) -> Result<Box<dyn DiskBackend>, SlotsError> {
        self.slot(slot)?;
        Ok(self.lock(slot).detach()?)
    }

    /// Flush and take out every attached disk (the source side of a storage handoff;
    /// dropping the returned disks closes them). Stops at the first flush failure: that
    /// disk stays attached, and disks detached before it are dropped (closed).
    pub fn detach_all(&self) -> Result<Vec<DetachedDisk>, SlotsError> {
        let mut out = Vec::new();
        for i in 0..self.slots.len() {
            let mut s = self.lock(i);
            if s.backing_description().is_some() {
                out.push((i as u8, s.detach()?));
            }
        }
        Ok(out)
    }

    /// What backs each slot now.
    pub fn backings(&self) -> Vec<Option<SlotBacking>> {
        (0..self.slots.len())
            .map(|i| self.lock(i).save_state().backing)
            .collect()
    }

    /// Serve every request the guest made available (vCPUs must be paused). Returns the
    /// number of requests completed.
    pub fn quiesce(&self) -> usize {
        (0..self.slots.len()).map(|i| self.lock(i).quiesce()).sum()
    }

    /// Quiesce and save every slot.
    pub fn save(&self) -> Vec<EncodedSlotState> {
        (0..self.slots.len())
            .map(|i| {
                let mut s = self.lock(i);
                s.quiesce();
                (i as u8, s.save_state().encode())
            })
            .collect()
    }

    /// Restore every slot from `saved` (as produced by [`BlkSlots::save`]). Disks are
    /// reopened through `open(slot, backing)` — the caller decides how (and may move a shared
    /// volume's lock first). Everything is decoded, validated and opened before any slot
    /// changes, so on error the slots are as they were.
    pub fn restore<E>(
        &self,
        saved: &[EncodedSlotState],
        mut open: impl FnMut(u8, &SlotBacking) -> Result<Box<dyn DiskBackend>, E>,
    ) -> Result<(), SlotsError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut listed: Vec<u8> = saved.iter().map(|(s, _)| *s).collect();
        listed.sort_unstable();
        if listed != (0..VIRTIO_BLK_SLOTS as u8).collect::<Vec<_>>() {
            return Err(SlotsError::SlotList { saved: listed });
        }
        // Decode and check everything before opening any disk.
        let mut states = Vec::with_capacity(saved.len());
        for (slot, bytes) in saved {
            let slot = usize::from(*slot);
            let state = VirtioBlkState::decode(bytes)
                .map_err(|source| SlotsError::Decode { slot, source })?;
            if usize::from(state.slot) != slot {
                return Err(VirtioBlkError::SlotMismatch {
                    slot: slot as u8,
                    saved: state.slot,
                }
                .into());
            }
            states.push((slot, state));
        }
        let mut staged = Vec::with_capacity(states.len());
        for (slot, state) in states {
            let disk = match &state.backing {
                None => None,
                Some(b) => Some(open(slot as u8, b).map_err(|e| SlotsError::Open {
                    slot,
                    disk: b.description.clone(),
                    source: Box::new(e),
                })?),
            };
            let (mem, irq) = {
                let current = self.lock(slot);
                (current.memory().clone(), current.irq())
            };
            staged.push((slot, VirtioBlk::restore(&state, mem, irq, disk)?));
        }
        for (slot, dev) in staged {
            *self.lock(slot) = dev;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::RawFileDisk;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct CountIrq(AtomicUsize);
    impl IrqLine for CountIrq {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn slots() -> BlkSlots {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        BlkSlots::new(&mem, |_gsi| {
            Ok::<_, std::io::Error>(Arc::new(CountIrq::default()) as Arc<dyn IrqLine>)
        })
        .unwrap()
    }

    fn image(sectors: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(sectors * 512).unwrap();
        f
    }

    fn open(img: &tempfile::NamedTempFile) -> Box<dyn DiskBackend> {
        Box::new(RawFileDisk::open(img.path(), false).unwrap())
    }

    #[test]
    fn bus_layout_attach_detach_and_bad_slot() {
        let s = slots();
        let bases: Vec<u64> = s.bus_devices().map(|(b, l, _)| b + l).collect();
        assert_eq!(bases.len(), VIRTIO_BLK_SLOTS);
        assert_eq!(bases[0], 0xd000_1000);
        let img = image(8);
        s.attach(6, open(&img), true).unwrap();
        let b = s.backings();
        assert_eq!(b[6].as_ref().unwrap().size_bytes, 4096);
        assert!(b[6].as_ref().unwrap().read_only);
        assert!(b.iter().filter(|b| b.is_some()).count() == 1);
        assert!(matches!(
            s.attach(8, open(&img), false),
            Err(SlotsError::NoSuchSlot { slot: 8 })
        ));
        assert!(matches!(
            s.detach(3),
            Err(SlotsError::Slot(VirtioBlkError::SlotEmpty { slot: 3 }))
        ));
        let all = s.detach_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, 6);
        assert!(s.backings().iter().all(Option::is_none));
    }

    #[test]
    fn save_restore_round_trip_and_atomic_failure() {
        let src = slots();
        let a = image(8);
        let b = image(16);
        src.attach(0, open(&a), false).unwrap();
        src.attach(7, open(&b), true).unwrap();
        let saved = src.save();
        assert_eq!(saved.len(), VIRTIO_BLK_SLOTS);

        let dst = slots();
        let mut opened = Vec::new();
        dst.restore(&saved, |_, bk| {
            opened.push(bk.description.clone());
            RawFileDisk::open(&bk.description, bk.read_only)
                .map(|d| Box::new(d) as Box<dyn DiskBackend>)
        })
        .unwrap();
        assert_eq!(opened.len(), 2);
        assert_eq!(dst.backings(), src.backings());

        // A failing opener leaves the target untouched.
        let fresh = slots();
        let err = fresh
            .restore(&saved, |_, bk| {
                if bk.read_only {
                    Err(std::io::Error::other("volume lock held elsewhere"))
                } else {
                    RawFileDisk::open(&bk.description, false)
                        .map(|d| Box::new(d) as Box<dyn DiskBackend>)
                        .map_err(std::io::Error::other)
                }
            })
            .unwrap_err();
        assert!(matches!(err, SlotsError::Open { slot: 7, .. }), "{err}");
        assert!(fresh.backings().iter().all(Option::is_none));

        // Missing or duplicated slots, and garbage bytes, are refused.
        let err = fresh
            .restore(&saved[1..], |_, _| Err(std::io::Error::other("unused")))
            .unwrap_err();
        assert!(matches!(err, SlotsError::SlotList { .. }), "{err}");
        let mut garbage = saved.clone();
        garbage[2].1 = vec![1, 2, 3];
        let err = fresh
            .restore(&garbage, |_, _| Err(std::io::Error::other("unused")))
            .unwrap_err();
        assert!(matches!(err, SlotsError::Decode { slot: 2, .. }), "{err}");
        let mut swapped = saved.clone();
        swapped.swap(0, 1);
        swapped[0].0 = 0;
        swapped[1].0 = 1;
        let err = fresh
            .restore(&swapped, |_, bk| {
                RawFileDisk::open(&bk.description, bk.read_only)
                    .map(|d| Box::new(d) as Box<dyn DiskBackend>)
            })
            .unwrap_err();
        assert!(
            matches!(err, SlotsError::Slot(VirtioBlkError::SlotMismatch { .. })),
            "{err}"
        );
        assert!(fresh.backings().iter().all(Option::is_none));
    }
}
