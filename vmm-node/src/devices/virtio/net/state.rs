//! Saved state of one NIC.
//!
//! Encoding: a little-endian `u16` format number followed by the bincode (fixed-width
//! integers) of that format's state type. A newer format than this build reads is refused
//! by number before its body is looked at.
//!
//! Formats:
//! * 1 ([`NetStateV1`]): registers and queues.
//! * 2 ([`NetState`]): format 1 plus the frames carried over ([`NetState::rx_frames`]):
//!   frames that had reached the NIC's TAP but not the guest when the VM was paused (a
//!   live migration delivers them on the target). A state without carried frames is still
//!   written as format 1, so a build that reads only format 1 takes it.

use serde::{Deserialize, Serialize};

use super::{VirtioNetError, FRAME_BYTES_MAX, FRAME_BYTES_MIN, NET_HDR_BYTES};
use crate::devices::virtio::mmio::{MmioTransportState, QueueSnapshot};

/// Highest format number this build writes and reads.
pub const NET_STATE_FORMAT: u16 = 2;
/// Most frames one NIC carries over (beyond them, frames waiting in the TAP stay there and
/// are lost with it).
pub const CARRIED_FRAMES_MAX: usize = 512;
/// Most bytes (headers included) of the frames one NIC carries over.
pub const CARRIED_BYTES_MAX: usize = 2 << 20;
/// Upper bound of an encoded state without carried frames.
pub const NET_STATE_BYTES_MAX: u64 = 4 << 10;
/// Upper bound of an encoded state with carried frames (each frame adds an 8-byte length).
pub const NET_STATE_CARRY_BYTES_MAX: u64 =
    NET_STATE_BYTES_MAX + CARRIED_BYTES_MAX as u64 + 8 * CARRIED_FRAMES_MAX as u64;
// Every NIC of a VM with a full carry fits in half of a migration's (and a snapshot's) state
// payload, leaving the rest to the vCPUs and the other devices.
const _: () = assert!(
    (NET_STATE_CARRY_BYTES_MAX + 2) * super::NIC_SLOTS as u64
        <= crate::migration::protocol::MAX_STATE_PAYLOAD_BYTES as u64 / 2
);
const _: () = assert!(
    (NET_STATE_CARRY_BYTES_MAX + 2) * super::NIC_SLOTS as u64
        <= crate::snapshot::STATE_BYTES_MAX / 2
);

/// Device state of one NIC (no guest memory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// Slot index.
    pub slot: u8,
    /// MAC the guest saw.
    pub mac: [u8; 6],
    /// MTU the guest saw.
    pub mtu: u16,
    /// Transport registers and the receive queue (queue 0).
    pub transport: MmioTransportState,
    /// The transmit queue (queue 1).
    pub tx_queue: QueueSnapshot,
    /// Frames received from the backend and not yet delivered to the guest, oldest first,
    /// each with its `virtio_net_hdr` (at most [`CARRIED_FRAMES_MAX`] frames and
    /// [`CARRIED_BYTES_MAX`] bytes, each frame between a header plus an Ethernet header and
    /// a header plus [`FRAME_BYTES_MAX`]).
    pub rx_frames: Vec<Vec<u8>>,
}

/// Format 1 of [`NetState`]: without carried frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetStateV1 {
    /// Slot index.
    pub slot: u8,
    /// MAC the guest saw.
    pub mac: [u8; 6],
    /// MTU the guest saw.
    pub mtu: u16,
    /// Transport registers and the receive queue (queue 0).
    pub transport: MmioTransportState,
    /// The transmit queue (queue 1).
    pub tx_queue: QueueSnapshot,
}

impl From<NetStateV1> for NetState {
    fn from(v: NetStateV1) -> Self {
        NetState {
            slot: v.slot,
            mac: v.mac,
            mtu: v.mtu,
            transport: v.transport,
            tx_queue: v.tx_queue,
            rx_frames: Vec::new(),
        }
    }
}

fn codec(limit: u64) -> impl bincode::Options {
    use bincode::Options;
    bincode::options()
        .with_fixint_encoding()
        .with_limit(limit)
        .reject_trailing_bytes()
}

/// Why carried frames are not acceptable (count, total, or one frame's size).
pub fn check_carried_frames(frames: &[Vec<u8>]) -> Result<(), String> {
    if frames.len() > CARRIED_FRAMES_MAX {
        return Err(format!(
            "{} carried frames, more than {CARRIED_FRAMES_MAX}",
            frames.len()
        ));
    }
    let mut total = 0usize;
    for (i, f) in frames.iter().enumerate() {
        if f.len() < NET_HDR_BYTES + FRAME_BYTES_MIN || f.len() > NET_HDR_BYTES + FRAME_BYTES_MAX {
            return Err(format!("carried frame {i} has {} bytes", f.len()));
        }
        total += f.len();
    }
    if total > CARRIED_BYTES_MAX {
        return Err(format!(
            "carried frames hold {total} bytes, more than {CARRIED_BYTES_MAX}"
        ));
    }
    Ok(())
}

impl NetState {
    /// Encode (format number + body): format 1 when no frame is carried, else format 2.
    pub fn encode(&self) -> Vec<u8> {
        use bincode::Options;
        if self.rx_frames.is_empty() {
            let v1 = NetStateV1 {
                slot: self.slot,
                mac: self.mac,
                mtu: self.mtu,
                transport: self.transport.clone(),
                tx_queue: self.tx_queue,
            };
            let mut out = 1u16.to_le_bytes().to_vec();
            out.extend(
                codec(NET_STATE_BYTES_MAX)
                    .serialize(&v1)
                    .expect("a NetState always serializes within the limit"),
            );
            return out;
        }
        let mut out = NET_STATE_FORMAT.to_le_bytes().to_vec();
        out.extend(
            codec(NET_STATE_CARRY_BYTES_MAX)
                .serialize(self)
                .expect("carried frames are bounded by the limit"),
        );
        out
    }

    /// Decode what [`NetState::encode`] produced (`slot` only names the NIC in errors). The
    /// result is still untrusted: `VirtioNet::check_restore` checks it against the NIC (the
    /// carried frames' bounds are checked here).
    pub fn decode(slot: u8, bytes: &[u8]) -> Result<Self, VirtioNetError> {
        use bincode::Options;
        let err = |what: String| VirtioNetError::StateDecode { slot, what };
        if bytes.len() as u64 > NET_STATE_CARRY_BYTES_MAX + 2 {
            return Err(err(format!("{} bytes, more than the limit", bytes.len())));
        }
        let Some((format, body)) = bytes.split_first_chunk::<2>() else {
            return Err(err("shorter than its format number".into()));
        };
        match u16::from_le_bytes(*format) {
            1 => codec(NET_STATE_BYTES_MAX)
                .deserialize::<NetStateV1>(body)
                .map(NetState::from)
                .map_err(|e| err(e.to_string())),
            2 => {
                let s: NetState = codec(NET_STATE_CARRY_BYTES_MAX)
                    .deserialize(body)
                    .map_err(|e| err(e.to_string()))?;
                check_carried_frames(&s.rx_frames).map_err(err)?;
                Ok(s)
            }
            found if found > NET_STATE_FORMAT => Err(VirtioNetError::StateFormat { slot, found }),
            found => Err(err(format!("unknown format {found}"))),
        }
    }
}
