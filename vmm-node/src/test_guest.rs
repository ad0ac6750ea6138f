//! The project's test guest: a PVH ELF built from `guest/` by `build.rs` with the system C
//! compiler. Its CPL0 stub enables long mode and drops to CPL3 with IOPL=3, where the
//! workloads run at native speed and talk to the VMM through port I/O (see
//! [`crate::guest_protocol`] for the command line parameters and the console lines).

/// Path of the built test guest ELF.
pub const PATH: &str = env!("VMM_TEST_GUEST_PATH");
