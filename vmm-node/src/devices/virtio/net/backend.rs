//! Where a NIC's frames go: [`NetBackend`], and the TAP device that implements it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use super::NET_HDR_BYTES;

/// The host side of a NIC. Frames in both directions start with a
/// [`NET_HDR_BYTES`]-byte `virtio_net_hdr`.
pub trait NetBackend: Send {
    /// Read one frame into `buf`; `ErrorKind::WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Write one frame (header included).
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()>;
    /// Tell the backend which receive offloads (`TUN_F_*`) the guest accepts.
    fn set_offloads(&mut self, tun_flags: u32) -> std::io::Result<()>;
    /// File descriptor that is readable when a frame is waiting (for the I/O thread's
    /// epoll); `None` for backends that are polled by hand (tests).
    fn readable_fd(&self) -> Option<RawFd>;
    /// For logs.
    fn describe(&self) -> String;
}

/// A TAP device opened `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attach to the existing TAP device `name` (it must exist in this network namespace).
    pub fn open(name: &str) -> Result<Self, crate::kvm::SysError> {
        let file = crate::kvm::open_tap(name, NET_HDR_BYTES as i32)?;
        crate::kvm::tap_set_offload(&file, 0).map_err(|source| crate::kvm::SysError::Tap {
            name: name.to_string(),
            op: "TUNSETOFFLOAD",
            source,
        })?;
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The TAP's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(std::io::Error::other(format!(
                "short write to the TAP ({n} of {} bytes)",
                frame.len()
            )));
        }
        Ok(())
    }

    fn set_offloads(&mut self, tun_flags: u32) -> std::io::Result<()> {
        crate::kvm::tap_set_offload(&self.file, tun_flags)
    }

    fn readable_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn describe(&self) -> String {
        format!("tap {}", self.name)
    }
}
