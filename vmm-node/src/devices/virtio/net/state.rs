//! Saved state of one NIC.
//!
//! Encoding: a little-endian `u16` format number ([`NET_STATE_FORMAT`]) followed by the
//! bincode (fixed-width integers) of that format's state type. A newer format is refused
//! by number before its body is looked at; a later format adds its own type here and
//! converts the older ones on load.

use serde::{Deserialize, Serialize};

use super::VirtioNetError;
use crate::devices::virtio::mmio::{MmioTransportState, QueueSnapshot};

/// Format number written by this build.
pub const NET_STATE_FORMAT: u16 = 1;
/// Upper bound of an encoded state.
pub const NET_STATE_BYTES_MAX: u64 = 4 << 10;

/// Device state of one NIC (no guest memory, no frames in flight: a frame read from the
/// TAP but not yet delivered is not part of it, the network may lose it).
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
}

fn codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::options()
        .with_fixint_encoding()
        .with_limit(NET_STATE_BYTES_MAX)
        .reject_trailing_bytes()
}

impl NetState {
    /// Encode (format number + body).
    pub fn encode(&self) -> Vec<u8> {
        use bincode::Options;
        let mut out = NET_STATE_FORMAT.to_le_bytes().to_vec();
        out.extend(
            codec()
                .serialize(self)
                .expect("a NetState always serializes within the limit"),
        );
        out
    }

    /// Decode what [`NetState::encode`] produced (`slot` only names the NIC in errors). The
    /// result is still untrusted: `VirtioNet::restore` checks it against the NIC.
    pub fn decode(slot: u8, bytes: &[u8]) -> Result<Self, VirtioNetError> {
        use bincode::Options;
        if bytes.len() as u64 > NET_STATE_BYTES_MAX + 2 {
            return Err(VirtioNetError::StateDecode {
                slot,
                what: format!("{} bytes, more than the limit", bytes.len()),
            });
        }
        let Some((format, body)) = bytes.split_first_chunk::<2>() else {
            return Err(VirtioNetError::StateDecode {
                slot,
                what: "shorter than its format number".into(),
            });
        };
        match u16::from_le_bytes(*format) {
            NET_STATE_FORMAT => {
                codec()
                    .deserialize(body)
                    .map_err(|e| VirtioNetError::StateDecode {
                        slot,
                        what: e.to_string(),
                    })
            }
            found if found > NET_STATE_FORMAT => Err(VirtioNetError::StateFormat { slot, found }),
            found => Err(VirtioNetError::StateDecode {
                slot,
                what: format!("unknown format {found}"),
            }),
        }
    }
}
