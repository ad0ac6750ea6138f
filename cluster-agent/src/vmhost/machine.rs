//! `HostedVm`: one VM of this host — the vmm-node [`Vm`], its eight virtio-blk slots and
//! the table of disks open in them (spec, grant, shared fenced-disk handle).
//!
//! Everything that touches the slots lives here: attaching a disk opened through a lock
//! grant, detaching it back into the `LockCommand` the agent must propose, and saving /
//! restoring the slots together with the VM state (migration and quick migration).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bincode::Options;
use csv_volume::{hooks, DiskName, LockCommand, LockGrant, LockMode, NodeId, VolumeRegistry};
use serde::{Deserialize, Serialize};
use vmm_node::config::VIRTIO_BLK_SLOTS;
use vmm_node::devices::virtio::{
    slot_irq, slot_mmio_base, VirtioBlk, VirtioBlkState, SLOT_MMIO_SIZE_BYTES,
};
use vmm_node::devices::{IrqLine, MmioDevice};
use vmm_node::migration::protocol::MAX_STATE_PAYLOAD_BYTES;
use vmm_node::state::DiskSlotState;
use vmm_node::{Vm, VmState};

use super::backend::{self, FencedBackend, SharedDisk};
use super::spec::{DiskSpec, VmSpec};
use super::VmHostError;

/// How a disk is opened for its grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Normal start / hot attach / rollback: [`hooks::open_for_vm`].
    Start,
    /// Target of a migration: [`hooks::handoff_open`] for read-write disks.
    Handoff,
    /// Failover: [`hooks::takeover_open`], waiting out the old owner's lease.
    Takeover {
        old_lease_deadline: std::time::Instant,
    },
}

/// One disk open in a slot.
pub(crate) struct AttachedDisk {
    pub spec: DiskSpec,
    pub grant: LockGrant,
    pub handle: SharedDisk,
}

/// A disk and the slot it sits in, as carried by migration and quick migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotDisk {
    pub slot: u8,
    pub disk: DiskSpec,
}

pub(crate) struct HostedVm {
    pub spec: VmSpec,
    pub vm: Vm,
    pub slots: Vec<Arc<Mutex<VirtioBlk>>>,
    pub disks: Mutex<Vec<Option<AttachedDisk>>>,
    /// The NICs present now, each with its slot (hot add and remove edit it).
    pub nics: Mutex<Vec<super::spec::NicSpec>>,
    /// Set for the whole of an operation that must not interleave with another one
    /// (migration, quick save, hot attach/detach, stop); see [`HostedVm::claim`].
    busy: AtomicBool,
}

/// Exclusive right to operate on a VM; cleared on drop. `Send`, so a migration thread
/// can hold it.
pub(crate) struct Claim(Arc<HostedVm>);

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::SeqCst);
    }
}

fn state_opts() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(u64::from(MAX_STATE_PAYLOAD_BYTES))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks that `grant` is for `disk`, this node, and the mode the disk needs.
pub(crate) fn check_grant(
    disk: &DiskSpec,
    grant: &LockGrant,
    node: NodeId,
) -> Result<(), VmHostError> {
    let want = if disk.read_only {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    if grant.disk != disk.name || grant.node != node || grant.mode != want {
        return Err(VmHostError::GrantMismatch {
            disk: disk.name.to_string(),
            want_node: node,
            want_mode: want,
            got_node: grant.node,
            got_mode: grant.mode,
        });
    }
    Ok(())
}

/// Finds the grant for `disk` in `grants`.
pub(crate) fn grant_for<'a>(
    grants: &'a [LockGrant],
    disk: &DiskName,
) -> Result<&'a LockGrant, VmHostError> {
    grants
        .iter()
        .find(|g| &g.disk == disk)
        .ok_or_else(|| VmHostError::MissingGrant {
            disk: disk.to_string(),
        })
}

/// Opens `disk` with `grant` the way `mode` says.
pub(crate) fn open_disk(
    registry: &VolumeRegistry,
    node: NodeId,
    disk: &DiskSpec,
    grant: &LockGrant,
    mode: OpenMode,
) -> Result<SharedDisk, VmHostError> {
    check_grant(disk, grant, node)?;
    let r = match mode {
        OpenMode::Start => hooks::open_for_vm(registry, node, grant),
        OpenMode::Handoff if !disk.read_only => hooks::handoff_open(registry, node, grant),
        OpenMode::Handoff => hooks::open_for_vm(registry, node, grant),
        OpenMode::Takeover { old_lease_deadline } => {
            hooks::takeover_open(registry, node, grant, old_lease_deadline)
        }
    };
    let d = r.map_err(|source| VmHostError::Open {
        disk: disk.name.to_string(),
        source,
    })?;
    Ok(Arc::new(Mutex::new(d)))
}

/// Takes the fenced disk out of its shared handle once the slot has dropped its side.
fn unshare(disk: &DiskName, handle: SharedDisk) -> Result<csv_volume::FencedDisk, VmHostError> {
    Arc::try_unwrap(handle)
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .map_err(|_| VmHostError::DiskStillShared {
            disk: disk.to_string(),
        })
}

/// What to do with a disk's lock when it is closed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum CloseFor {
    /// VM stop / hot detach: `Release`.
    Stop,
    /// Migration away to `to`: `Handoff` for read-write disks, `Release` for shared ones.
    Handoff { to: NodeId },
}

impl HostedVm {
    /// Wraps a created (paused) VM and puts eight empty slots on its MMIO bus.
    pub fn new(spec: VmSpec, vm: Vm) -> Result<HostedVm, VmHostError> {
        let mut slots = Vec::with_capacity(VIRTIO_BLK_SLOTS);
        for i in 0..VIRTIO_BLK_SLOTS {
            let irq: Arc<dyn IrqLine> =
                vm.irq_line(slot_irq(i)).map_err(|source| VmHostError::Vm {
                    vm: spec.name.clone(),
                    op: "create a disk interrupt line",
                    source,
                })?;
            let dev = Arc::new(Mutex::new(VirtioBlk::new(
                i as u8,
                vm.memory().clone(),
                irq,
            )));
            let bus: Arc<Mutex<dyn MmioDevice>> = dev.clone();
            vm.register_mmio_device(slot_mmio_base(i), SLOT_MMIO_SIZE_BYTES, bus)
                .map_err(|source| VmHostError::Vm {
                    vm: spec.name.clone(),
                    op: "register a disk slot",
                    source,
                })?;
            slots.push(dev);
        }
        let mut pinned = spec.clone();
        pinned.pin_nic_slots();
        Ok(HostedVm {
            nics: Mutex::new(pinned.nics),
            spec,
            vm,
            slots,
            disks: Mutex::new((0..VIRTIO_BLK_SLOTS).map(|_| None).collect()),
            busy: AtomicBool::new(false),
        })
    }

    /// Claims the VM for one operation, or says it is busy.
    pub fn claim(self: &Arc<Self>) -> Result<Claim, VmHostError> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(VmHostError::Busy(self.spec.name.clone()));
        }
        Ok(Claim(self.clone()))
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The spec with the disks as they are attached now (slot order) and the NICs present
    /// now (with their slots).
    pub fn current_spec(&self) -> VmSpec {
        let mut s = self.spec.clone();
        s.disks = self.slot_disks().into_iter().map(|d| d.disk).collect();
        s.nics = lock(&self.nics).clone();
        s
    }

    /// The attached disks and their slots.
    pub fn slot_disks(&self) -> Vec<SlotDisk> {
        lock(&self.disks)
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                d.as_ref().map(|d| SlotDisk {
                    slot: i as u8,
                    disk: d.spec.clone(),
                })
            })
            .collect()
    }

    /// Puts an opened disk into `slot` (hot-plug if the VM runs).
    pub fn attach(
        &self,
        slot: usize,
        spec: DiskSpec,
        grant: LockGrant,
        handle: SharedDisk,
    ) -> Result<(), VmHostError> {
        let mut disks = lock(&self.disks);
        if disks.iter().flatten().any(|d| d.spec.name == spec.name) {
            return Err(VmHostError::DiskAlreadyAttached {
                vm: self.name().to_owned(),
                disk: spec.name.to_string(),
            });
        }
        let Some(entry) = disks.get_mut(slot) else {
            return Err(VmHostError::NoFreeSlot {
                vm: self.name().to_owned(),
            });
        };
        lock(&self.slots[slot])
            .attach(Box::new(FencedBackend::new(handle.clone())), spec.read_only)
            .map_err(|source| VmHostError::Slot {
                vm: self.spec.name.clone(),
                slot: slot as u8,
                source,
            })?;
        tracing::info!(vm = %self.name(), disk = %spec.name, slot, token = grant.token.0, "disk attached");
        *entry = Some(AttachedDisk {
            spec,
            grant,
            handle,
        });
        Ok(())
    }

    /// First free slot.
    pub fn free_slot(&self) -> Result<usize, VmHostError> {
        lock(&self.disks)
            .iter()
            .position(Option::is_none)
            .ok_or_else(|| VmHostError::NoFreeSlot {
                vm: self.name().to_owned(),
            })
    }

    /// The slot holding `disk`.
    pub fn slot_of(&self, disk: &DiskName) -> Result<usize, VmHostError> {
        lock(&self.disks)
            .iter()
            .position(|d| d.as_ref().is_some_and(|d| &d.spec.name == disk))
            .ok_or_else(|| VmHostError::DiskNotAttached {
                vm: self.name().to_owned(),
                disk: disk.to_string(),
            })
    }

    /// Detaches the disk in `slot` (the slot flushes it), closes it and returns the lock
    /// command to propose. On a flush failure (e.g. the disk was fenced) the disk stays
    /// in the slot and the error says why.
    pub fn detach(&self, slot: usize, why: CloseFor) -> Result<LockCommand, VmHostError> {
        let mut disks = lock(&self.disks);
        let Some(att) = disks.get_mut(slot).and_then(Option::take) else {
            return Err(VmHostError::SlotEmpty {
                vm: self.name().to_owned(),
                slot: slot as u8,
            });
        };
        let detached = lock(&self.slots[slot]).detach();
        match detached {
            Ok(b) => drop(b),
            Err(source) => {
                let name = att.spec.name.to_string();
                disks[slot] = Some(att);
                return Err(VmHostError::Slot {
                    vm: format!("{} (disk {name})", self.spec.name),
                    slot: slot as u8,
                    source,
                });
            }
        }
        let disk = unshare(&att.spec.name, att.handle)?;
        let cmd = match why {
            CloseFor::Stop => hooks::release_on_stop(disk),
            CloseFor::Handoff { to } if att.grant.mode == LockMode::Exclusive => {
                hooks::handoff_release(disk, to)
            }
            CloseFor::Handoff { .. } => hooks::release_on_stop(disk),
        }
        .map_err(|source| VmHostError::Close {
            disk: att.spec.name.to_string(),
            source,
        })?;
        tracing::info!(vm = %self.name(), disk = %att.spec.name, slot, "disk detached");
        Ok(cmd)
    }

    /// Slots with a disk.
    pub fn occupied_slots(&self) -> Vec<usize> {
        lock(&self.disks)
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.as_ref().map(|_| i))
            .collect()
    }

    /// Per-disk status.
    pub fn disk_status(&self) -> Vec<super::DiskStatus> {
        lock(&self.disks)
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                d.as_ref().map(|d| {
                    // Lock order: a vCPU doing disk I/O holds the slot, then the disk
                    // handle (inside `FencedBackend`); never hold the handle while taking
                    // the slot here.
                    let fenced_by = backend::lock(&d.handle).fenced_by();
                    let stats = lock(&self.slots[i]).stats();
                    super::DiskStatus {
                        slot: i as u8,
                        name: d.spec.name.clone(),
                        read_only: d.spec.read_only,
                        token: d.grant.token,
                        mode: d.grant.mode,
                        fenced_by,
                        requests_ok: stats.requests_ok,
                        requests_failed: stats.requests_failed,
                        written_bytes: stats.written_bytes,
                    }
                })
            })
            .collect()
    }

    /// Saves the paused VM's state with the slot states inside, bincode-encoded; also
    /// returns the slot states (for a rollback).
    pub fn save_state_blob(&self) -> Result<(Vec<u8>, Vec<DiskSlotState>), VmHostError> {
        let mut st = self.save_state()?;
        st.devices.disks = self.save_slots();
        let slots = st.devices.disks.clone();
        let blob = state_opts()
            .serialize(&st)
            .map_err(|source| VmHostError::StateCodec {
                vm: self.spec.name.clone(),
                source,
            })?;
        Ok((blob, slots))
    }

    fn save_state(&self) -> Result<VmState, VmHostError> {
        self.vm.save_state().map_err(|source| VmHostError::Vm {
            vm: self.spec.name.clone(),
            op: "save state",
            source,
        })
    }

    /// Drains every slot's queue (the VM is paused) and saves the slots.
    pub fn save_slots(&self) -> Vec<DiskSlotState> {
        self.slots
            .iter()
            .map(|s| {
                let mut s = lock(s);
                s.quiesce();
                DiskSlotState {
                    slot: s.slot(),
                    device: s.save_state().encode(),
                }
            })
            .collect()
    }

    /// Restores saved slots into this (paused) VM, opening each saved backing through
    /// `open` (slot, spec) → handle.
    pub fn restore_slots(
        &self,
        saved: &[DiskSlotState],
        layout: &[SlotDisk],
        grants: &[LockGrant],
        mut open: impl FnMut(&DiskSpec, &LockGrant) -> Result<SharedDisk, VmHostError>,
    ) -> Result<(), VmHostError> {
        let mut disks = lock(&self.disks);
        for st in saved {
            let slot = usize::from(st.slot);
            if slot >= VIRTIO_BLK_SLOTS {
                return Err(VmHostError::BadSlotState {
                    vm: self.spec.name.clone(),
                    what: format!("slot {slot} out of range"),
                });
            }
            let state =
                VirtioBlkState::decode(&st.device).map_err(|e| VmHostError::BadSlotState {
                    vm: self.spec.name.clone(),
                    what: e.to_string(),
                })?;
            let layout_disk = layout.iter().find(|d| usize::from(d.slot) == slot);
            let backend: Option<(SharedDisk, &DiskSpec, &LockGrant)> =
                match (&state.backing, layout_disk) {
                    (None, None) => None,
                    (Some(_), Some(d)) => {
                        let g = grant_for(grants, &d.disk.name)?;
                        Some((open(&d.disk, g)?, &d.disk, g))
                    }
                    (Some(_), None) | (None, Some(_)) => {
                        return Err(VmHostError::BadSlotState {
                            vm: self.spec.name.clone(),
                            what: format!("slot {slot}: saved device and disk list disagree"),
                        })
                    }
                };
            let boxed = backend.as_ref().map(|(h, _, _)| {
                Box::new(FencedBackend::new(h.clone())) as Box<dyn vmm_node::disk::DiskBackend>
            });
            lock(&self.slots[slot])
                .restore_in_place(&state, boxed)
                .map_err(|source| VmHostError::Slot {
                    vm: self.spec.name.clone(),
                    slot: st.slot,
                    source,
                })?;
            disks[slot] = backend.map(|(handle, spec, grant)| AttachedDisk {
                spec: spec.clone(),
                grant: grant.clone(),
                handle,
            });
        }
        Ok(())
    }

    /// Restores a state blob made by [`HostedVm::save_state_blob`] into this paused VM.
    pub fn restore_state_blob(
        &self,
        blob: &[u8],
        layout: &[SlotDisk],
        grants: &[LockGrant],
        open: impl FnMut(&DiskSpec, &LockGrant) -> Result<SharedDisk, VmHostError>,
    ) -> Result<(), VmHostError> {
        let mut st: VmState =
            state_opts()
                .deserialize(blob)
                .map_err(|source| VmHostError::StateCodec {
                    vm: self.spec.name.clone(),
                    source,
                })?;
        // The slots are this module's (no `DiskSlots` is installed in the `Vm`: opening a
        // disk needs its grant), so the VM restores everything but them.
        let disks = std::mem::take(&mut st.devices.disks);
        self.vm
            .restore_state(&st)
            .map_err(|source| VmHostError::Vm {
                vm: self.spec.name.clone(),
                op: "restore state",
                source,
            })?;
        self.restore_slots(&disks, layout, grants, open)
    }

    /// Detaches every disk for `why`, returning the lock commands. If one fails, the
    /// disks already detached are put back (restored from `saved` with their old grants)
    /// and the error is returned.
    /// Flushes every read-write disk (still attached, the VM may run on): a live
    /// migration does this just before it pauses, so the flush inside its blackout finds
    /// little or nothing left to sync.
    pub fn flush_disks(&self) -> Result<(), VmHostError> {
        let handles: Vec<(String, SharedDisk)> = lock(&self.disks)
            .iter()
            .flatten()
            .filter(|d| !d.spec.read_only)
            .map(|d| (d.spec.name.to_string(), d.handle.clone()))
            .collect();
        for (disk, handle) in handles {
            backend::lock(&handle)
                .flush()
                .map_err(|source| VmHostError::Flush {
                    vm: self.name().to_owned(),
                    disk,
                    source,
                })?;
        }
        Ok(())
    }

    pub fn detach_all(
        &self,
        why: CloseFor,
        saved: &[DiskSlotState],
        registry: &VolumeRegistry,
        node: NodeId,
    ) -> Result<Vec<LockCommand>, VmHostError> {
        let layout = self.slot_disks();
        let grants: Vec<LockGrant> = lock(&self.disks)
            .iter()
            .flatten()
            .map(|d| d.grant.clone())
            .collect();
        let mut done = Vec::new();
        let mut cmds = Vec::new();
        for slot in self.occupied_slots() {
            match self.detach(slot, why) {
                Ok(c) => {
                    done.push(slot);
                    cmds.push(c);
                }
                Err(e) => {
                    if let Err(r) = self.reattach(saved, &done, &layout, &grants, registry, node) {
                        tracing::error!(vm = %self.name(), error = %r, "cannot put detached disks back");
                    }
                    return Err(e);
                }
            }
        }
        Ok(cmds)
    }

    /// Puts the disks of `slots` back as saved in `saved`, opened with `grants`.
    pub fn reattach(
        &self,
        saved: &[DiskSlotState],
        slots: &[usize],
        layout: &[SlotDisk],
        grants: &[LockGrant],
        registry: &VolumeRegistry,
        node: NodeId,
    ) -> Result<(), VmHostError> {
        let saved: Vec<DiskSlotState> = saved
            .iter()
            .filter(|s| slots.contains(&usize::from(s.slot)))
            .cloned()
            .collect();
        let layout: Vec<SlotDisk> = layout
            .iter()
            .filter(|d| slots.contains(&usize::from(d.slot)))
            .cloned()
            .collect();
        self.restore_slots(&saved, &layout, grants, |d, g| {
            open_disk(registry, node, d, g, OpenMode::Start)
        })
    }
}
