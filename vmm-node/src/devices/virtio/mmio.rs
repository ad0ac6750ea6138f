//! The virtio-mmio transport (virtio 1.x, register layout version 2), as a register
//! state machine with one or more split virtqueues.
//!
//! [`MmioTransport`] knows nothing about block or network devices: it decodes the guest's
//! register accesses, negotiates features, configures the queues and tells its owner what
//! happened through [`MmioEvent`]. Device-specific parts (features offered, feature
//! dependencies, configuration space, what a queue notification does) are passed in by the
//! owner. virtio-blk uses one queue; virtio-net two (receive, transmit).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;

use crate::GuestMem;

/// `MagicValue` register contents ("virt").
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Register layout version: 2 is the modern (virtio 1.x) layout.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("VMND").
pub const MMIO_VENDOR_ID: u32 = 0x444e_4d56;

/// Register offsets from the window base.
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.x §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bit: the used ring was updated.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration space changed.
pub const INT_CONFIG: u32 = 2;

/// Feature bit: virtio 1.x (modern) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// What a guest register write asks the owner to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioEvent {
    /// Nothing beyond the register update.
    None,
    /// The guest notified the queue with this index (always below the queue count).
    QueueNotify(u16),
    /// The guest reset the device (status 0); the transport is already reset.
    Reset,
    /// The guest accessed a register in a way the specification forbids (wrong width,
    /// unknown offset, bad queue configuration). Counted and rate-limit logged.
    GuestError(&'static str),
}

/// Checks a feature set the driver accepted (beyond "offered by the device"); returns why
/// it is refused.
pub type FeatureCheck = fn(u64) -> Result<(), &'static str>;

/// The transport registers and the virtqueues.
#[derive(Debug)]
pub struct MmioTransport {
    device_id: u32,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    status: u32,
    queue_sel: u32,
    queues: Vec<Queue>,
    interrupt_status: u32,
    config_generation: u32,
    feature_check: Option<FeatureCheck>,
}

/// Serializable snapshot of [`MmioTransport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmioTransportState {
    /// Last value the guest wrote to `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// Features the driver acknowledged.
    pub driver_features: u64,
    /// Last value the guest wrote to `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// Device status register.
    pub status: u32,
    /// Last value the guest wrote to `QueueSel`.
    pub queue_sel: u32,
    /// Pending interrupt status bits.
    pub interrupt_status: u32,
    /// Configuration generation counter.
    pub config_generation: u32,
    /// The virtqueue (queue 0; a device with more queues saves the others beside this
    /// state, see [`MmioTransport::save_queues`]).
    pub queue: QueueSnapshot,
}

/// Serializable form of virtio-queue's [`QueueState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSnapshot {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Size the driver selected.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table guest-physical address.
    pub desc_table: u64,
    /// Available (driver) ring guest-physical address.
    pub avail_ring: u64,
    /// Used (device) ring guest-physical address.
    pub used_ring: u64,
    /// Next available-ring index the device will read.
    pub next_avail: u16,
    /// Next used-ring index the device will write.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` in effect.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

/// Errors restoring a transport from a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum MmioStateError {
    /// The saved queue is not one this device could have produced.
    #[error("saved virtqueue state is invalid (max size {max_size}, size {size})")]
    Queue {
        /// Saved maximum size.
        max_size: u16,
        /// Saved size.
        size: u16,
        /// virtio-queue's verdict.
        #[source]
        source: virtio_queue::Error,
    },
    /// The saved queue maximum differs from this device's.
    #[error("saved virtqueue maximum size {saved} differs from the device's {device}")]
    QueueMax {
        /// Saved value.
        saved: u16,
        /// This device's value.
        device: u16,
    },
    /// The saved state has another number of queues than the device.
    #[error("saved state has {saved} virtqueues, the device has {device}")]
    QueueCount {
        /// Saved value.
        saved: usize,
        /// This device's value.
        device: usize,
    },
    /// The saved features include bits this device does not offer.
    #[error(
        "saved driver features {saved:#x} include bits the device does not offer ({offered:#x})"
    )]
    Features {
        /// Saved value.
        saved: u64,
        /// Features offered.
        offered: u64,
    },
}

impl MmioTransport {
    /// A transport for device type `device_id` with one queue of at most `queue_max_size`
    /// entries (a power of two).
    pub fn new(device_id: u32, queue_max_size: u16) -> Result<Self, virtio_queue::Error> {
        Self::with_queues(device_id, queue_max_size, 1)
    }

    /// A transport with `queues` queues (at least one) of at most `queue_max_size` entries.
    pub fn with_queues(
        device_id: u32,
        queue_max_size: u16,
        queues: usize,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = (0..queues.max(1))
            .map(|_| Queue::new(queue_max_size))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device_id,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            status: 0,
            queue_sel: 0,
            queues,
            interrupt_status: 0,
            config_generation: 0,
            feature_check: None,
        })
    }

    /// Refuse `FEATURES_OK` when `check` refuses the driver's feature set (e.g. an offload
    /// accepted without the feature it depends on).
    pub fn set_feature_check(&mut self, check: FeatureCheck) {
        self.feature_check = Some(check);
    }

    /// Number of virtqueues.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver acknowledged.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// True once the driver set `DRIVER_OK` and the device is not failed or in need of reset.
    pub fn driver_ok(&self) -> bool {
        self.status & status::DRIVER_OK != 0
            && self.status & (status::FAILED | status::DEVICE_NEEDS_RESET) == 0
    }

    /// Pending interrupt status bits.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Configuration generation counter.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// Queue 0 (the only queue of a single-queue device).
    pub fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queues[0]
    }

    /// Queue `index`, if it exists.
    pub fn queue_at(&mut self, index: usize) -> Option<&mut Queue> {
        self.queues.get_mut(index)
    }

    /// The selected queue, if `QueueSel` names one.
    fn selected(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Set interrupt status bits (the owner triggers the IRQ line).
    pub fn raise(&mut self, bits: u32) {
        self.interrupt_status |= bits;
    }

    /// Record a configuration change: bump the generation and set `INT_CONFIG`.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt_status |= INT_CONFIG;
    }

    /// Mark the device as needing a reset (after the driver broke the queue protocol).
    pub fn set_needs_reset(&mut self) {
        if self.status & status::DRIVER_OK != 0 {
            self.status |= status::DEVICE_NEEDS_RESET;
            self.config_changed();
        }
    }

    fn reset(&mut self) {
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.status = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt_status = 0;
    }

    /// A guest read at `offset`. `device_features` is what the device offers now;
    /// `config` is the device configuration space.
    pub fn read(
        &self,
        offset: u64,
        data: &mut [u8],
        device_features: u64,
        config: &[u8],
    ) -> Option<&'static str> {
        data.fill(0);
        if offset >= reg::CONFIG {
            let start = (offset - reg::CONFIG) as usize;
            if !matches!(data.len(), 1 | 2 | 4 | 8) {
                return Some("configuration read of unsupported width");
            }
            if let Some(src) = start
                .checked_add(data.len())
                .and_then(|end| config.get(start..end))
            {
                data.copy_from_slice(src);
                return None;
            }
            return Some("configuration read beyond the configuration space");
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return Some("register read that is not an aligned 32-bit access");
        }
        let selected = self.selected();
        let value: u32 = match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => device_features as u32,
                1 => (device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => selected.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => u32::from(selected.is_some_and(|q| q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX, // no shared memory regions
            reg::CONFIG_GENERATION => self.config_generation,
            _ => return Some("read of a write-only or unknown register"),
        };
        data.copy_from_slice(&value.to_le_bytes());
        None
    }

    /// A guest write at `offset`. `device_features` is what the device offers now; `mem`
    /// is used to validate the queue layout when the driver sets `QueueReady`.
    pub fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        device_features: u64,
        mem: &GuestMem,
    ) -> MmioEvent {
        if offset >= reg::CONFIG {
            // virtio-blk's configuration space is read-only for the features we offer.
            return MmioEvent::GuestError("write to the read-only configuration space");
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return MmioEvent::GuestError("register write that is not a 32-bit access");
        };
        if !offset.is_multiple_of(4) {
            return MmioEvent::GuestError("unaligned register write");
        }
        let v = u32::from_le_bytes(bytes);
        let negotiating =
            self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0;
        let sel = self.queue_sel as usize;
        let queue_configurable = negotiating && self.queues.get(sel).is_some_and(|q| !q.ready());
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK != 0 || self.status & status::DRIVER == 0 {
                    return MmioEvent::GuestError("driver features written outside negotiation");
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ if v != 0 => return MmioEvent::GuestError("driver acked unknown features"),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM if queue_configurable => {
                let Ok(size) = u16::try_from(v) else {
                    return MmioEvent::GuestError("queue size does not fit 16 bits");
                };
                if self.queues[sel].try_set_size(size).is_err() {
                    return MmioEvent::GuestError(
                        "queue size is not a power of two within the maximum",
                    );
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH if queue_configurable => {
                let a = merge_half(
                    self.queues[sel].desc_table(),
                    offset == reg::QUEUE_DESC_HIGH,
                    v,
                );
                if self.queues[sel]
                    .try_set_desc_table_address(GuestAddress(a))
                    .is_err()
                {
                    return MmioEvent::GuestError("descriptor table is not 16-byte aligned");
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH if queue_configurable => {
                let a = merge_half(
                    self.queues[sel].avail_ring(),
                    offset == reg::QUEUE_DRIVER_HIGH,
                    v,
                );
                if self.queues[sel]
                    .try_set_avail_ring_address(GuestAddress(a))
                    .is_err()
                {
                    return MmioEvent::GuestError("available ring is not 2-byte aligned");
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH if queue_configurable => {
                let a = merge_half(
                    self.queues[sel].used_ring(),
                    offset == reg::QUEUE_DEVICE_HIGH,
                    v,
                );
                if self.queues[sel]
                    .try_set_used_ring_address(GuestAddress(a))
                    .is_err()
                {
                    return MmioEvent::GuestError("used ring is not 4-byte aligned");
                }
            }
            reg::QUEUE_READY if sel < self.queues.len() => match v {
                0 => self.queues[sel].set_ready(false),
                1 if queue_configurable => {
                    if !rings_in_memory(&self.queues[sel], mem) {
                        return MmioEvent::GuestError("queue rings lie outside guest memory");
                    }
                    self.queues[sel].set_ready(true);
                }
                _ => return MmioEvent::GuestError("queue ready written in the wrong state"),
            },
            reg::QUEUE_NUM
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
            | reg::QUEUE_READY => {
                return MmioEvent::GuestError("queue configured in the wrong state or queue index")
            }
            reg::QUEUE_NOTIFY => {
                let Some(q) = self.queues.get(v as usize) else {
                    return MmioEvent::GuestError("notification for a queue that does not exist");
                };
                if !self.driver_ok() || !q.ready() {
                    return MmioEvent::GuestError("queue notified before the device is live");
                }
                return MmioEvent::QueueNotify(v as u16);
            }
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => return self.write_status(v, device_features),
            reg::SHM_SEL => {}
            _ => return MmioEvent::GuestError("write to a read-only or unknown register"),
        }
        MmioEvent::None
    }

    fn write_status(&mut self, v: u32, device_features: u64) -> MmioEvent {
        if v == 0 {
            self.reset();
            return MmioEvent::Reset;
        }
        // The driver may only add bits (virtio 1.x §2.1.2); DEVICE_NEEDS_RESET is the
        // device's to set.
        let old = self.status;
        let v = v & !status::DEVICE_NEEDS_RESET | (old & status::DEVICE_NEEDS_RESET);
        if v & old != old {
            return MmioEvent::GuestError("driver cleared device status bits without a reset");
        }
        let new_bits = v & !old;
        if new_bits & status::FEATURES_OK != 0 {
            let ok = self.driver_features & !device_features == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // Leave FEATURES_OK clear: the driver reads the status back and gives up.
                self.status = v & !status::FEATURES_OK;
                return MmioEvent::GuestError(
                    "driver accepted features the device does not offer or not VERSION_1",
                );
            }
            if let Some(Err(why)) = self.feature_check.map(|c| c(self.driver_features)) {
                self.status = v & !status::FEATURES_OK;
                return MmioEvent::GuestError(why);
            }
        }
        if new_bits & status::DRIVER_OK != 0 && v & status::FEATURES_OK == 0 {
            self.status = v & !status::DRIVER_OK;
            return MmioEvent::GuestError("DRIVER_OK set before FEATURES_OK");
        }
        self.status = v;
        MmioEvent::None
    }

    /// Snapshot of the registers and queue.
    pub fn save(&self) -> MmioTransportState {
        MmioTransportState {
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            status: self.status,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queue: self.queues[0].state().into(),
        }
    }

    /// Snapshots of queues 1.. (empty for a single-queue device).
    pub fn save_queues(&self) -> Vec<QueueSnapshot> {
        self.queues[1..].iter().map(|q| q.state().into()).collect()
    }

    /// Rebuild a transport for device `device_id` from a snapshot, checking it against
    /// what this device offers.
    pub fn restore(
        device_id: u32,
        queue_max_size: u16,
        device_features: u64,
        state: &MmioTransportState,
    ) -> Result<Self, MmioStateError> {
        Self::restore_queues(device_id, queue_max_size, device_features, state, &[], 1)
    }

    /// [`MmioTransport::restore`] for a device with `queues` queues: `extra` holds the
    /// snapshots of queues 1.. (as [`MmioTransport::save_queues`] returned them).
    pub fn restore_queues(
        device_id: u32,
        queue_max_size: u16,
        device_features: u64,
        state: &MmioTransportState,
        extra: &[QueueSnapshot],
        queues: usize,
    ) -> Result<Self, MmioStateError> {
        if extra.len() + 1 != queues {
            return Err(MmioStateError::QueueCount {
                saved: extra.len() + 1,
                device: queues,
            });
        }
        if state.driver_features & !device_features != 0 {
            return Err(MmioStateError::Features {
                saved: state.driver_features,
                offered: device_features,
            });
        }
        let mut restored = Vec::with_capacity(queues);
        for snap in std::iter::once(&state.queue).chain(extra) {
            if snap.max_size != queue_max_size {
                return Err(MmioStateError::QueueMax {
                    saved: snap.max_size,
                    device: queue_max_size,
                });
            }
            let queue = Queue::try_from(QueueState::from(*snap)).map_err(|source| {
                MmioStateError::Queue {
                    max_size: snap.max_size,
                    size: snap.size,
                    source,
                }
            })?;
            restored.push(queue);
        }
        Ok(Self {
            device_id,
            device_features_sel: state.device_features_sel,
            driver_features: state.driver_features,
            driver_features_sel: state.driver_features_sel,
            status: state.status,
            queue_sel: state.queue_sel,
            queues: restored,
            interrupt_status: state.interrupt_status,
            config_generation: state.config_generation,
            feature_check: None,
        })
    }
}

/// Whether the descriptor table and both rings of `queue` lie in guest memory (the
/// check virtio-queue's `is_valid` does, without its guest-triggerable log lines).
fn rings_in_memory(queue: &Queue, mem: &GuestMem) -> bool {
    use vm_memory::GuestMemoryBackend;
    let n = u64::from(queue.size());
    let fits = |addr: u64, len: u64| mem.check_range(GuestAddress(addr), len as usize);
    fits(queue.desc_table(), 16 * n)
        && fits(queue.avail_ring(), 6 + 2 * n)
        && fits(queue.used_ring(), 6 + 8 * n)
}

fn merge_half(old: u64, high: bool, v: u32) -> u64 {
    if high {
        (old & 0xffff_ffff) | (u64::from(v) << 32)
    } else {
        (old & !0xffff_ffff) | u64::from(v)
    }
}
