//! vmm-node: the embedded KVM VMM. See `ARCHITECTURE.md` (vmm-node: internal seams) for the seams between its parts and
//! `ARCHITECTURE.md` for the codemap.
#![deny(unsafe_code)]

pub mod acpi;
pub mod bench_stats;
pub mod boot;
pub mod config;
pub mod control;
pub mod devices;
pub mod disk;
pub mod facts;
pub mod guest_protocol;
#[allow(unsafe_code)]
pub mod kvm;
pub mod memory;
pub mod mptable;
pub mod snapshot;
pub mod state;
pub mod test_guest;
pub mod usage;
pub mod vcpu;
pub mod vm;

pub use config::{BootProtocol, DiskSlotConfig, VmConfig};
pub use state::VmState;
pub use vcpu::StopReason;
pub use vm::{Vm, VmError, VmStatus};

/// Guest memory with vm-memory's write bitmap, so writes the VMM's devices make into
/// guest memory are tracked for live migration alongside KVM's dirty log.
pub type GuestMem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
pub mod migration;
