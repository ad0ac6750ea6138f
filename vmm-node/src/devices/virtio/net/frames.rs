//! Frames the device itself sends: the announcement after a restore.

use super::NET_HDR_BYTES;

/// EtherType of RARP.
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// Minimum Ethernet frame without FCS.
pub const ETH_FRAME_MIN_BYTES: usize = 60;

/// A RARP "reverse request" from `mac` to the broadcast address, as QEMU's announce-self
/// sends it (sender and target hardware address `mac`, protocol addresses 0), padded to
/// the Ethernet minimum, preceded by an all-zero `virtio_net_hdr` (no offloads).
pub fn rarp_announcement(mac: [u8; 6]) -> [u8; NET_HDR_BYTES + ETH_FRAME_MIN_BYTES] {
    let mut f = [0u8; NET_HDR_BYTES + ETH_FRAME_MIN_BYTES];
    let e = &mut f[NET_HDR_BYTES..];
    e[0..6].copy_from_slice(&[0xff; 6]);
    e[6..12].copy_from_slice(&mac);
    e[12..14].copy_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    e[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    e[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    e[18] = 6; // hardware address length
    e[19] = 4; // protocol address length
    e[20..22].copy_from_slice(&3u16.to_be_bytes()); // op: reverse request
    e[22..28].copy_from_slice(&mac); // sender hardware address
    e[32..38].copy_from_slice(&mac); // target hardware address
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_layout() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_announcement(mac);
        assert!(f[..NET_HDR_BYTES].iter().all(|b| *b == 0));
        let e = &f[NET_HDR_BYTES..];
        assert_eq!(e.len(), 60);
        assert_eq!(&e[0..6], &[0xff; 6]);
        assert_eq!(&e[6..12], &mac);
        assert_eq!(&e[12..14], &[0x80, 0x35]);
        assert_eq!(&e[20..22], &[0, 3]);
        assert_eq!(&e[22..28], &mac);
        assert_eq!(&e[28..32], &[0; 4]);
        assert_eq!(&e[32..38], &mac);
        assert!(e[42..].iter().all(|b| *b == 0));
    }
}
