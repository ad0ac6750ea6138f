//! virtio-net over virtio-mmio, backed by a TAP device.
//!
//! # Layout
//! * [`device`]: [`VirtioNet`], one NIC: registers, configuration space, the transmit path
//!   (served on the vCPU thread that writes `QueueNotify`) and the receive path (served by
//!   the NIC's I/O thread).
//! * [`backend`]: [`NetBackend`], where frames go to and come from; [`Tap`] is the real one
//!   (opened `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` with a 12-byte `virtio_net_hdr`).
//! * [`state`]: [`NetState`], the saved device state (its own format number).
//! * [`nics`]: [`VirtioNics`], every NIC of a VM as core's `NetDevices`, with one I/O thread
//!   per NIC (epoll on the TAP and a kick eventfd; no async runtime), and
//!   [`install_virtio_nics`].
//! * [`frames`]: the announcement frame (RARP, as QEMU's announce-self sends).
//!
//! # Slots
//! NIC `i` of `VmConfig::nics` is in virtio-net slot `nics[i].slot` (default `i`): MMIO
//! window [`nic_mmio_base`]`(slot)` (right after the virtio-blk slots), interrupt
//! [`nic_irq`]`(slot)`. All [`NIC_SLOTS`] windows are on the bus; an empty one answers
//! device id 0 (no device). Hot add fills a slot and raises a configuration-change
//! interrupt, hot remove empties it; virtio-mmio has no hot-plug notification, so only a
//! driver that polls the slots (the test guest) sees NICs come and go, a Linux guest only
//! the NICs present when it probed the devices at boot.
//!
//! # Features
//! Offered ([`OFFERED_FEATURES`]): `VERSION_1`, `MAC` (from the config), `MTU` (68..=9000),
//! `STATUS` (link always up), `MRG_RXBUF`, checksum offload both ways (`CSUM`,
//! `GUEST_CSUM`) and TSO both ways (`HOST_TSO4/6`, `HOST_ECN`, `GUEST_TSO4/6`, `GUEST_ECN`).
//! The guest's transmit offloads pass through to the TAP in the `virtio_net_hdr` (the host
//! kernel completes checksums and segments); the receive offloads the guest accepted are
//! given to the TAP with `TUNSETOFFLOAD` when the driver sets `DRIVER_OK`, so the host
//! kernel only hands over partial checksums or GSO frames the guest can take. UFO is not
//! offered (Linux removed it). Feature dependencies of the specification (§5.1.3.1) are
//! enforced at `FEATURES_OK`.
//!
//! # Guest input
//! Descriptor chains are guest-controlled: every chain is bounded
//! ([`MAX_CHAIN_DESCRIPTORS`], [`FRAME_BYTES_MAX`]), every buffer is checked against guest
//! memory, direction is checked (receive buffers device-writable, transmit buffers
//! device-readable), and a transmit header that asks for an offload the guest did not
//! negotiate drops the frame. A malformed chain is a guest error (counted, rate-limit
//! logged); a broken ring marks the device `DEVICE_NEEDS_RESET`. Every byte written to
//! guest memory goes through `GuestMem` (dirty tracking for live migration).
//!
//! # Pause, save, restore, announce
//! The receive thread writes guest memory only under the device lock and only while the
//! device is not paused; `NetDevices::pause` takes the lock and sets `paused`, so once it
//! returns the NIC holds still. Saving a paused NIC takes the frames waiting in its TAP
//! (bounded: [`state::CARRIED_FRAMES_MAX`], [`state::CARRIED_BYTES_MAX`]) into its state; the
//! NIC that resumes with it (here after a rollback, or the restored one) delivers them before
//! its TAP's. A restored NIC (snapshot restore, migration target) sends [`ANNOUNCE_ROUNDS`]
//! RARP frames for its MAC on its TAP when it is next resumed, so bridges and switches learn
//! the VM's new port at once; a migration target sends the first one earlier, while still
//! paused, as soon as the source's state arrived ([`VirtioNet::announce_early`]), so frames
//! sent during the rest of the blackout wait in its TAP. A NIC whose state was saved also
//! announces when it resumes where it was (a rolled-back migration).

pub mod backend;
pub mod device;
pub mod frames;
pub mod nics;
pub mod state;

use std::time::Duration;

pub use backend::{NetBackend, Tap};
pub use device::{NetStats, RxOutcome, VirtioNet};
pub use nics::{install_virtio_nics, VirtioNics};
pub use state::{NetState, NET_STATE_FORMAT};

use super::mmio::VIRTIO_F_VERSION_1;

/// virtio device id of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Feature: the device takes frames with a partial checksum (guest transmit offload).
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
/// Feature: the driver takes frames with a partial checksum (guest receive offload).
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
/// Feature: `mtu` in the configuration space is valid.
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
/// Feature: `mac` in the configuration space is valid.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Feature: the driver takes TCPv4 GSO frames.
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
/// Feature: the driver takes TCPv6 GSO frames.
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
/// Feature: the driver takes GSO frames with ECN.
pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
/// Feature: the device takes TCPv4 GSO frames.
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
/// Feature: the device takes TCPv6 GSO frames.
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
/// Feature: the device takes GSO frames with ECN.
pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
/// Feature: a received frame may span several receive buffers (`num_buffers`).
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// Feature: `status` in the configuration space is valid.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// `status`: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Features every NIC offers.
pub const OFFERED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_MTU
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_GUEST_ECN
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_ECN
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_NET_F_STATUS;

/// `virtio_net_hdr` size (virtio 1.x: always with `num_buffers`).
pub const NET_HDR_BYTES: usize = 12;
/// Header flag: the frame has a partial checksum (`csum_start`, `csum_offset`).
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// Header flag: the checksum was verified.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// GSO type: none.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// GSO type: TCPv4.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// GSO type: TCPv6.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// GSO flag: ECN.
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// `TUN_F_CSUM` (for `TUNSETOFFLOAD`).
pub const TUN_F_CSUM: u32 = 0x01;
/// `TUN_F_TSO4`.
pub const TUN_F_TSO4: u32 = 0x02;
/// `TUN_F_TSO6`.
pub const TUN_F_TSO6: u32 = 0x04;
/// `TUN_F_TSO_ECN`.
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// Receive queue index.
pub const RX_QUEUE: u16 = 0;
/// Transmit queue index.
pub const TX_QUEUE: u16 = 1;
/// Queues per NIC (one pair, no control queue).
pub const QUEUES: usize = 2;
/// Queue size offered to the driver.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Longest descriptor chain accepted (also bounds indirect tables).
pub const MAX_CHAIN_DESCRIPTORS: usize = 258;
/// Largest frame (without the `virtio_net_hdr`): a 64 KiB GSO frame plus Ethernet and
/// VLAN headers.
pub const FRAME_BYTES_MAX: usize = 65550;
/// Smallest frame the transmit path passes on (an Ethernet header).
pub const FRAME_BYTES_MIN: usize = 14;
/// Frames the receive thread delivers per wakeup before it lets others take the lock.
pub const RX_FRAMES_PER_WAKEUP: usize = 64;
/// Announcement frames sent after a restore.
pub const ANNOUNCE_ROUNDS: u8 = 3;
/// Delay before announcement round `i + 1` (round 0 goes out at resume).
pub const ANNOUNCE_INTERVALS: [Duration; 2] =
    [Duration::from_millis(50), Duration::from_millis(100)];
const _: () = assert!(ANNOUNCE_INTERVALS.len() + 1 == ANNOUNCE_ROUNDS as usize);
/// Guest-triggered warnings logged per NIC before rate limiting kicks in.
pub const GUEST_WARNINGS_LOGGED_MAX: u64 = 16;

/// Number of virtio-net slots (= most NICs per VM).
pub const NIC_SLOTS: usize = crate::config::NICS_MAX;
/// Guest-physical base of NIC slot 0's MMIO window (after the eight virtio-blk slots).
pub const NIC_MMIO_BASE: u64 = super::slot_mmio_base(super::VIRTIO_BLK_SLOTS);
/// Interrupt line of NIC slot 0 (slot `i` uses `NIC0_IRQ + i`).
pub const NIC0_IRQ: u32 = 16;
const _: () = assert!(NIC0_IRQ >= super::SLOT0_IRQ + super::VIRTIO_BLK_SLOTS as u32);
const _: () = assert!(NIC0_IRQ + NIC_SLOTS as u32 <= crate::mptable::IOAPIC_PINS as u32);

/// Guest-physical base of NIC slot `slot`'s MMIO window.
pub const fn nic_mmio_base(slot: usize) -> u64 {
    NIC_MMIO_BASE + slot as u64 * super::SLOT_MMIO_SIZE_BYTES
}

/// Interrupt line of NIC slot `slot`.
pub const fn nic_irq(slot: usize) -> u32 {
    NIC0_IRQ + slot as u32
}

/// The Linux kernel command-line fragment that declares NIC slot `slot`.
pub fn nic_kernel_cmdline(slot: usize) -> String {
    format!(
        "virtio_mmio.device=4K@{:#x}:{}",
        nic_mmio_base(slot),
        nic_irq(slot)
    )
}

/// Why the driver's feature set is refused (virtio 1.x §5.1.3.1 dependencies).
pub fn check_feature_dependencies(f: u64) -> Result<(), &'static str> {
    let has = |b: u64| f & b != 0;
    if (has(VIRTIO_NET_F_GUEST_TSO4) || has(VIRTIO_NET_F_GUEST_TSO6))
        && !has(VIRTIO_NET_F_GUEST_CSUM)
    {
        return Err("virtio-net: GUEST_TSO4/6 accepted without GUEST_CSUM");
    }
    if has(VIRTIO_NET_F_GUEST_ECN)
        && !(has(VIRTIO_NET_F_GUEST_TSO4) || has(VIRTIO_NET_F_GUEST_TSO6))
    {
        return Err("virtio-net: GUEST_ECN accepted without GUEST_TSO4/6");
    }
    if (has(VIRTIO_NET_F_HOST_TSO4) || has(VIRTIO_NET_F_HOST_TSO6)) && !has(VIRTIO_NET_F_CSUM) {
        return Err("virtio-net: HOST_TSO4/6 accepted without CSUM");
    }
    if has(VIRTIO_NET_F_HOST_ECN) && !(has(VIRTIO_NET_F_HOST_TSO4) || has(VIRTIO_NET_F_HOST_TSO6)) {
        return Err("virtio-net: HOST_ECN accepted without HOST_TSO4/6");
    }
    Ok(())
}

/// The `TUNSETOFFLOAD` flags for a driver that accepted `features`.
pub fn tun_offloads(features: u64) -> u32 {
    let mut t = 0;
    if features & VIRTIO_NET_F_GUEST_CSUM != 0 {
        t |= TUN_F_CSUM;
        if features & VIRTIO_NET_F_GUEST_TSO4 != 0 {
            t |= TUN_F_TSO4;
        }
        if features & VIRTIO_NET_F_GUEST_TSO6 != 0 {
            t |= TUN_F_TSO6;
        }
        if t & (TUN_F_TSO4 | TUN_F_TSO6) != 0 && features & VIRTIO_NET_F_GUEST_ECN != 0 {
            t |= TUN_F_TSO_ECN;
        }
    }
    t
}

/// Errors of the virtio-net devices (creation, save/restore, installation).
#[derive(Debug, thiserror::Error)]
pub enum VirtioNetError {
    /// The NIC's MAC in the config does not parse (the config was not validated).
    #[error("NIC {slot}: MAC {mac:?} is invalid")]
    Mac {
        /// Slot.
        slot: u8,
        /// The configured text.
        mac: String,
    },
    /// The TAP could not be opened or configured.
    #[error("NIC {slot}: cannot use TAP device {tap}")]
    Tap {
        /// Slot.
        slot: u8,
        /// TAP name.
        tap: String,
        /// The OS error.
        #[source]
        source: crate::kvm::SysError,
    },
    /// The NIC's interrupt line could not be created.
    #[error("NIC {slot}: cannot create its interrupt line (GSI {gsi})")]
    Irq {
        /// Slot.
        slot: u8,
        /// Its GSI.
        gsi: u32,
        /// The VMM's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An OS resource (eventfd, epoll, thread) could not be created.
    #[error("NIC {slot}: {what}")]
    Os {
        /// Slot.
        slot: u8,
        /// What failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A saved NIC state does not decode.
    #[error("saved state of NIC {slot} cannot be decoded: {what}")]
    StateDecode {
        /// Slot (as listed beside the state).
        slot: u8,
        /// What was wrong.
        what: String,
    },
    /// A saved NIC state has a newer format than this build reads.
    #[error("saved state of NIC {slot} has format {found}, this vmm-node reads up to {NET_STATE_FORMAT}")]
    StateFormat {
        /// Slot.
        slot: u8,
        /// Format found.
        found: u16,
    },
    /// A saved NIC state does not fit this NIC.
    #[error("saved state of NIC {slot} does not fit: {what}")]
    StateMismatch {
        /// Slot.
        slot: u8,
        /// What differs.
        what: String,
    },
    /// The saved transport state is inconsistent.
    #[error("saved transport state of NIC {slot} is invalid")]
    Transport {
        /// Slot.
        slot: u8,
        /// What was wrong.
        #[source]
        source: super::mmio::MmioStateError,
    },
    /// The saved states do not list every NIC exactly once.
    #[error("saved NIC states list slots {saved:?}, this VM has NICs in slots {occupied:?}")]
    SlotList {
        /// Slots listed.
        saved: Vec<u8>,
        /// Slots holding a NIC.
        occupied: Vec<u8>,
    },
    /// Every NIC slot holds a NIC.
    #[error("every NIC slot (0..{NIC_SLOTS}) holds a NIC; detach one first")]
    NoFreeSlot,
    /// A slot number outside `0..NIC_SLOTS`.
    #[error("NIC slot {slot} does not exist (slots are 0..{NIC_SLOTS})")]
    NoSuchSlot {
        /// The slot asked for.
        slot: usize,
    },
    /// The slot asked for holds a NIC.
    #[error("NIC slot {slot} already holds a NIC")]
    SlotOccupied {
        /// Slot.
        slot: u8,
    },
    /// Another NIC of the VM has the MAC.
    #[error("MAC {mac} is already used by the NIC in slot {slot}")]
    MacInUse {
        /// The MAC.
        mac: String,
        /// The slot of the NIC that has it.
        slot: u8,
    },
    /// No NIC of the VM has the MAC.
    #[error("the VM has no NIC with MAC {mac}")]
    NoSuchMac {
        /// The MAC asked for.
        mac: String,
    },
}

#[cfg(test)]
mod tests;
